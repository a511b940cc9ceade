/*
 * Tests of masked fine-tuning: the head loss against finite differences, and
 * on the real MobileNetV2 (nsfwjs) with the OpenCV digits at 96 x 96 pixels
 * that pruned weights stay exactly zero, kept ones move, frozen batch norm
 * keeps its statistics, and the training loss goes down.
 * Models and data come from tools/fetch-models.sh and tools/fetch-data.sh
 * under $TOPIARY_DATA_DIR (default "data").
 */
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "dataset.h"
#include "finetune.h"
#include "model.h"
#include "test.h"

static const char *data_dir(void)
{
    const char *d = getenv("TOPIARY_DATA_DIR");
    return d && *d ? d : "data";
}

static double uniform(uint64_t *state)
{
    return (double)(task_splitmix64(state) >> 11) / 9007199254740992.0;
}

/* A head with random coefficients in [-scale, scale]: (C, D) and (C). */
static int random_head(ridge_model *h, size_t classes, size_t dim, double scale, uint64_t seed)
{
    h->n_classes = classes;
    h->n_features = dim;
    h->coef = malloc(classes * dim * sizeof *h->coef);
    h->intercept = malloc(classes * sizeof *h->intercept);
    if (!h->coef || !h->intercept)
        return -1;
    for (size_t i = 0; i < classes * dim; i++)
        h->coef[i] = scale * (2.0 * uniform(&seed) - 1.0);
    for (size_t j = 0; j < classes; j++)
        h->intercept[j] = 0.1 * (2.0 * uniform(&seed) - 1.0);
    return 0;
}

/* dL/dfeat of the head loss against central differences of the loss. */
static void test_head_loss_gradient(void)
{
    enum { N = 3, D = 7, C = 4 };
    ridge_model h;
    CHECK(random_head(&h, C, D, 1.5, 11) == 0);
    float feat[N * D], dfeat[N * D], scratch[N * D];
    double scores[N * C];
    int labels[N] = {0, 3, 2};
    uint64_t seed = 5;
    for (int i = 0; i < N * D; i++)
        feat[i] = (float)(2.0 * uniform(&seed) - 1.0);
    double loss = 0.0;
    size_t correct = 0;
    finetune_head_loss(&loss, &correct, dfeat, scores, &h, feat, labels, N);
    CHECK(isfinite(loss));
    CHECK(loss > 0.0);
    double worst = 0.0;
    for (int i = 0; i < N * D; i++) {
        const float step = 1e-2f;
        float keep = feat[i];
        double lp = 0.0, lm = 0.0;
        feat[i] = keep + step;
        finetune_head_loss(&lp, &correct, scratch, scores, &h, feat, labels, N);
        feat[i] = keep - step;
        finetune_head_loss(&lm, &correct, scratch, scores, &h, feat, labels, N);
        feat[i] = keep;
        double fd = (lp - lm) / (2.0 * (double)step);
        double e = fabs(fd - dfeat[i]) / (fabs(fd) + 1e-3);
        worst = e > worst ? e : worst;
    }
    printf("  head loss %.4f, worst relative gradient error %.2e\n", loss, worst);
    CHECK(worst < 1e-3);
    ridge_model_free(&h);
}

/* dL/dfeat of the distill loss against central differences of the loss. */
static void test_distill_loss_gradient(void)
{
    enum { N = 3, D = 5 };
    float feat[N * D], target[N * D], dfeat[N * D], scratch[N * D];
    const float *rows[N];
    uint64_t seed = 17;
    for (int i = 0; i < N * D; i++) {
        feat[i] = (float)(2.0 * uniform(&seed) - 1.0);
        target[i] = (float)(2.0 * uniform(&seed) - 1.0);
    }
    for (int s = 0; s < N; s++)
        rows[s] = target + (size_t)(N - 1 - s) * D; /* targets need not be in batch order */
    double loss = 0.0;
    finetune_distill_loss(&loss, dfeat, feat, rows, N, D);
    CHECK(loss > 0.0);
    double worst = 0.0;
    for (int i = 0; i < N * D; i++) {
        const float step = 1e-2f;
        float keep = feat[i];
        double lp = 0.0, lm = 0.0;
        feat[i] = keep + step;
        finetune_distill_loss(&lp, scratch, feat, rows, N, D);
        feat[i] = keep - step;
        finetune_distill_loss(&lm, scratch, feat, rows, N, D);
        feat[i] = keep;
        double fd = (lp - lm) / (2.0 * (double)step);
        double e = fabs(fd - dfeat[i]) / (fabs(fd) + 1e-3);
        worst = e > worst ? e : worst;
    }
    printf("  distill loss %.4f, worst relative gradient error %.2e\n", loss, worst);
    CHECK(worst < 1e-3);
}

/* The real MobileNetV2 at 96 x 96, its pooled feature node, and 40 digits. */
typedef struct fixture {
    graph *g;
    int feature;
    dataset *ds;
    task t;
    ridge_model head;
    int prunable[256];
    int n_prunable;
    int stem; /* the first conv's weight, trained but never masked */
} fixture;

static int fixture_open(fixture *f)
{
    char path[1024], uri[1100];
    top_error err;
    memset(f, 0, sizeof *f);
    snprintf(path, sizeof path, "%s/models/nsfwjs/mobilenet_v2/model.json", data_dir());
    if (model_load(&f->g, path, &err) != TOP_OK) {
        printf("  cannot load %s: %s; run tools/fetch-models.sh\n", path, err.message);
        return -1;
    }
    if (graph_set_input_size(f->g, 96, 96, &err) != TOP_OK)
        return -1;
    f->feature = -1;
    for (int i = 0; i < f->g->n_nodes; i++)
        if (f->g->nodes[i].op == OP_GLOBAL_AVGPOOL)
            f->feature = i;
    snprintf(uri, sizeof uri, "digits-grid:%s/datasets/digits/digits.png", data_dir());
    if (f->feature < 0 || dataset_open(&f->ds, uri, NULL, &err) != TOP_OK) {
        printf("  cannot open %s; run tools/fetch-data.sh\n", uri);
        return -1;
    }
    task_spec spec = {.calib_per_class = 4, .seed = 3};
    if (task_make(&f->t, f->ds, NULL, &spec, &err) != TOP_OK)
        return -1;
    /* Conv and dense weights before the feature node, without the stem. */
    int first = 1;
    for (int p = 0; p < f->g->n_params && f->n_prunable < 256; p++) {
        if (!graph_param_is_prunable(f->g, p) || f->g->params[p].node >= f->feature)
            continue;
        if (first) {
            first = 0;
            f->stem = p;
            continue;
        }
        f->prunable[f->n_prunable++] = p;
    }
    return random_head(&f->head, 10, f->g->nodes[f->feature].sample_numel, 0.5, 9);
}

static void fixture_close(fixture *f)
{
    ridge_model_free(&f->head);
    if (f->ds)
        task_free(&f->t);
    dataset_close(f->ds);
    graph_free(f->g);
}

/* Zeroes every other weight of the prunable layers; returns their count. */
static size_t prune_half(fixture *f)
{
    size_t zeros = 0;
    for (int l = 0; l < f->n_prunable; l++) {
        tensor *v = &f->g->params[f->prunable[l]].value;
        for (size_t i = 0; i < v->numel; i++)
            if (i % 2 == 0 || v->data[i] == 0.0f) {
                v->data[i] = 0.0f;
                zeros++;
            }
    }
    return zeros;
}

/* Copies of every parameter's values, so changes can be counted. */
static float **snapshot(const graph *g)
{
    float **s = calloc((size_t)g->n_params, sizeof *s);
    for (int p = 0; s && p < g->n_params; p++) {
        s[p] = malloc(g->params[p].value.numel * sizeof(float));
        if (s[p])
            memcpy(s[p], g->params[p].value.data, g->params[p].value.numel * sizeof(float));
    }
    return s;
}

static void snapshot_free(float **s, int n)
{
    for (int p = 0; s && p < n; p++)
        free(s[p]);
    free(s);
}

/* Entries of parameter p that differ from the snapshot. */
static size_t changed(const graph *g, float *const *before, int p)
{
    size_t n = 0;
    const tensor *v = &g->params[p].value;
    for (size_t i = 0; i < v->numel; i++)
        n += memcmp(&v->data[i], &before[p][i], sizeof(float)) != 0;
    return n;
}

/* Pruned entries (zero in the snapshot) that are not +0.0 now. */
static size_t unpruned(const fixture *f, float *const *before)
{
    size_t n = 0;
    for (int l = 0; l < f->n_prunable; l++) {
        int p = f->prunable[l];
        const tensor *v = &f->g->params[p].value;
        for (size_t i = 0; i < v->numel; i++)
            if (before[p][i] == 0.0f && (v->data[i] != 0.0f || signbit(v->data[i])))
                n++;
    }
    return n;
}

static void run_masks(int bn_train)
{
    fixture f;
    if (fixture_open(&f) != 0) {
        CHECK_MSG(0, "the MobileNetV2 fixture did not open");
        fixture_close(&f);
        return;
    }
    size_t zeros = prune_half(&f);
    float **before = snapshot(f.g);
    CHECK(before != NULL);
    finetune_options o;
    finetune_options_init(&o);
    o.epochs = 1;
    o.lr = 1e-2; /* large, so that every kept weight moves */
    o.weight_decay = 1e-3;
    o.bn_train = bn_train;
    finetune_result r;
    top_error err;
    top_status st = finetune_run(&r, f.g, f.feature, &f.head, NULL, &f.t.calib, f.prunable,
                                 f.n_prunable, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "%s", err.message);
    CHECK_INT_EQ(r.masked, zeros);
    CHECK_INT_EQ(r.steps, 3); /* 40 images, batches of 16, 16, 8 */
    CHECK_INT_EQ(unpruned(&f, before), 0);
    size_t moved = 0, kept = 0, stats_moved = 0, norms_moved = 0;
    for (int l = 0; l < f.n_prunable; l++) {
        moved += changed(f.g, before, f.prunable[l]);
        kept += f.g->params[f.prunable[l]].value.numel;
    }
    kept -= zeros;
    for (int p = 0; p < f.g->n_params; p++) {
        if (f.g->params[p].role == PARAM_ROLE_STATISTIC)
            stats_moved += changed(f.g, before, p);
        if (f.g->params[p].role == PARAM_ROLE_NORM)
            norms_moved += changed(f.g, before, p);
    }
    printf("  batch norm %s: %zu of %zu kept weights moved, %zu statistics and %zu "
           "gamma/beta values moved, loss %.4f\n",
           bn_train ? "trains" : "frozen", moved, kept, stats_moved, norms_moved, r.loss_last);
    CHECK(moved > kept / 2);
    CHECK(changed(f.g, before, f.stem) > 0);
    if (bn_train) {
        CHECK(stats_moved > 0);
        CHECK(norms_moved > 0);
    } else {
        CHECK_INT_EQ(stats_moved, 0);
        CHECK_INT_EQ(norms_moved, 0);
    }
    snapshot_free(before, f.g->n_params);
    fixture_close(&f);
}

static void test_masks_hold_bn_frozen(void)
{
    run_masks(0);
}
static void test_masks_hold_bn_train(void)
{
    run_masks(1);
}

/* Five epochs over the same 40 images lower the training loss. */
static void test_loss_goes_down(void)
{
    fixture f;
    if (fixture_open(&f) != 0) {
        CHECK_MSG(0, "the MobileNetV2 fixture did not open");
        fixture_close(&f);
        return;
    }
    prune_half(&f);
    finetune_options o;
    finetune_options_init(&o);
    o.epochs = 5;
    o.lr = 1e-3;
    o.schedule = FINETUNE_SCHEDULE_CONSTANT;
    finetune_result r;
    top_error err;
    top_status st = finetune_run(&r, f.g, f.feature, &f.head, NULL, &f.t.calib, f.prunable,
                                 f.n_prunable, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "%s", err.message);
    printf("  loss %.4f -> %.4f, training accuracy %.3f -> %.3f in %zu steps\n", r.loss_first,
           r.loss_last, r.accuracy_first, r.accuracy_last, r.steps);
    CHECK(r.loss_last < r.loss_first);
    fixture_close(&f);
}

/* Dense features of the fixture's split, in split order: (count, D). */
static float *dense_features(fixture *f)
{
    size_t d = f->g->nodes[f->feature].sample_numel, n = f->t.calib.count;
    float *out = malloc(n * d * sizeof *out);
    batch_iter *it = NULL;
    top_error err;
    if (!out || batch_iter_new(&it, &f->t.calib, &f->g->preprocess, 8, &err) != TOP_OK) {
        free(out);
        return NULL;
    }
    for (;;) {
        const batch *b = NULL;
        if (batch_iter_next(it, &b, &err) != TOP_OK || b->n == 0 ||
            graph_forward(f->g, b->x, b->n, GRAPH_MODE_INFERENCE, &err) != TOP_OK)
            break;
        memcpy(out + b->first * d, graph_node_output(f->g, f->feature),
               (size_t)b->n * d * sizeof(float));
    }
    batch_iter_free(it);
    return out;
}

/* Distillation towards the dense features: the distance goes down over five
 * epochs, pruned weights stay zero, and no head is needed. */
static void test_distill_pulls_back(void)
{
    fixture f;
    if (fixture_open(&f) != 0) {
        CHECK_MSG(0, "the MobileNetV2 fixture did not open");
        fixture_close(&f);
        return;
    }
    float *targets = dense_features(&f);
    CHECK(targets != NULL);
    prune_half(&f);
    float **before = snapshot(f.g);
    finetune_options o;
    finetune_options_init(&o);
    o.loss = FINETUNE_LOSS_DISTILL;
    o.epochs = 5;
    o.lr = 1e-2;
    o.schedule = FINETUNE_SCHEDULE_CONSTANT;
    finetune_result r;
    top_error err;
    top_error_clear(&err);
    top_status st = finetune_run(&r, f.g, f.feature, NULL, targets, &f.t.calib, f.prunable,
                                 f.n_prunable, &o, NULL, NULL, NULL, &err);
    CHECK_MSG(st == TOP_OK, "%s", err.message);
    printf("  distance to the dense features %.5f -> %.5f in %zu steps\n", r.loss_first,
           r.loss_last, r.steps);
    CHECK(r.loss_last < r.loss_first);
    CHECK(isnan(r.accuracy_last));
    CHECK_INT_EQ(unpruned(&f, before), 0);
    top_error_clear(&err);
    CHECK(finetune_run(&r, f.g, f.feature, NULL, NULL, &f.t.calib, f.prunable, f.n_prunable, &o,
                       NULL, NULL, NULL, &err) == TOP_ERR_INVALID);
    CHECK(strstr(err.message, "distill needs") != NULL);
    snapshot_free(before, f.g->n_params);
    free(targets);
    fixture_close(&f);
}

static void test_bad_options(void)
{
    finetune_options o;
    top_error err;
    finetune_options_init(&o);
    top_error_clear(&err);
    CHECK(finetune_validate_options(&o, &err) == TOP_OK);
    o.lr = 0.0;
    CHECK(finetune_validate_options(&o, &err) == TOP_ERR_INVALID);
    CHECK(strstr(err.message, "learning rate 0") != NULL);
    finetune_options_init(&o);
    top_error_clear(&err);
    o.momentum = 1.0;
    CHECK(finetune_validate_options(&o, &err) == TOP_ERR_INVALID);
    CHECK(strstr(err.message, "momentum 1") != NULL);
    finetune_options_init(&o);
    top_error_clear(&err);
    o.epochs = 0;
    CHECK(finetune_validate_options(&o, &err) == TOP_ERR_INVALID);
    CHECK(strstr(err.message, "epochs 0") != NULL);
    finetune_options_init(&o);
    top_error_clear(&err);
    o.weight_decay = NAN;
    CHECK(finetune_validate_options(&o, &err) == TOP_ERR_INVALID);
}

int main(void)
{
    TEST_RUN(test_head_loss_gradient);
    TEST_RUN(test_distill_loss_gradient);
    TEST_RUN(test_bad_options);
    TEST_RUN(test_masks_hold_bn_frozen);
    TEST_RUN(test_masks_hold_bn_train);
    TEST_RUN(test_loss_goes_down);
    TEST_RUN(test_distill_pulls_back);
    return TEST_FINISH();
}
