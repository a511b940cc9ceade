/*
 * The offline pruning job (see pipeline.h for the steps and the formulas).
 *
 * Shapes: N images per batch, D feature width, C classes of a task.
 *   features: (n, D) float32, row-major; ridge coef (C, D) in double.
 *
 * Memory: the graph keeps every activation of the last forward, so a batch
 * of B images at 224 x 224 costs about B x 80 MB for MobileNetV2; features
 * of the head-fit and evaluation splits are held whole.
 *
 * Thread-safety: everything lives in one pipeline_ctx on the caller's stack;
 * the batch iterators add one decoding thread each.
 *
 * Not done here: the
 * --size option (the graph has no way to change its input size yet).
 */
#include "pipeline.h"

#include <errno.h>
#include <fnmatch.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <dirent.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>
#include <time.h>

#include "checkpoint.h"
#include "datafree.h"
#include "fileio.h"
#include "head_cache.h"
#include "dataset.h"
#include "model.h"
#include "prune.h"
#include "ridge.h"
#include "safetensors.h"
#include "sha256.h"
#include "tfjs_export.h"

typedef struct pipeline_task {
    dataset *ds;
    task t;
    ridge_model head;
    float *fit_x, *eval_x; /* (fit count, D), (eval count, D) */
    double dense_accuracy, pruned_accuracy, finetuned_accuracy;
    int head_cached;                                /* the head came from the cache */
    char head_cache_warning[TOP_ERROR_MESSAGE_MAX]; /* why the cache failed, or "" */
} pipeline_task;

typedef struct pipeline_ctx {
    const pipeline_options *opt;
    pipeline_progress_fn progress;
    void *user;
    const volatile int *cancel;
    graph *g;
    int feature;   /* feature node */
    size_t dim;    /* D */
    int *prunable; /* (n_prunable) param indices */
    int n_prunable;
    pipeline_task calib; /* ds is NULL without a calibration task */
    pipeline_task eval[PIPELINE_MAX_EVAL_TASKS];
    int bn_ran, bn_layers;
    size_t bn_images;
    double **bn_dense; /* match_dense: (2, C) per BN node, mean then var */
    float **bn_orig;   /* match_dense: the original running mean and var per BN node */
    int bn_passes_run;
    double bn_max_shift;        /* largest |mu_p - mu_d| / sd_d in the last pass */
    double lambda;              /* obd and obs damping used */
    float **grads;              /* obs: (n, numel) per-sample gradients per layer */
    size_t obs_memory;          /* obs: bytes the estimate gave */
    obs_damping obs_damping;    /* obs and layer_obs: retries and factorisations */
    size_t layer_obs_rows_used; /* layer_obs: the maximum rows used by one layer */
    size_t memory_estimate;     /* bytes of pruning state, from memory_stage */
    size_t ft_memory;           /* bytes of fine-tuning activations, from memory_stage */
    char model_sha256[SHA256_HEX_BYTES]; /* for the head cache, "" until needed */
    int ft_ran, ft_bn_corrected;
    task ft_task;      /* its calib split is the fine-tuning split */
    int ft_task_made;  /* ft_task needs task_free */
    float *ft_targets; /* distill: (fine-tuning images, D) dense features */
    finetune_result ft;
    double timings[10];
    json_t *checkpoints;
} pipeline_ctx;

enum { T_LOAD, T_DENSE, T_SALIENCY, T_MASK, T_UPDATE, T_BN, T_PRUNED, T_FT, T_CKPT, T_TOTAL };
static const char *const timing_names[] = {
    "load",        "dense_features", "saliency",    "mask",  "update", "bn_recalibration",
    "pruned_eval", "finetune",       "checkpoints", "total",
};

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static void report_progress(const pipeline_ctx *c, const char *stage, size_t done, size_t total)
{
    if (c->progress)
        c->progress(c->user, stage, done, total);
}

static top_status check_cancel(const pipeline_ctx *c, top_error *err)
{
    if (c->cancel && *c->cancel)
        return top_error_set(err, TOP_ERR_CANCELLED, "the pruning job was cancelled");
    return TOP_OK;
}

void pipeline_options_init(pipeline_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->method = PIPELINE_METHOD_MAGNITUDE;
    opt->sparsity = 0.5;
    opt->calib_count = 64;
    opt->calib_fit_count = 200;
    opt->eval_fit_count = 200;
    opt->eval_count = 200;
    opt->ridge_alpha = 1.0;
    opt->ridge_balanced = 1;
    opt->damping_mode = PIPELINE_DAMPING_RELATIVE;
    opt->damping = 1e-3;
    opt->scope = PRUNE_SCOPE_GLOBAL;
    opt->rounds = 1;
    opt->bn_recalibration = -1;
    opt->bn_mode = PIPELINE_BN_MATCH_DENSE;
    opt->bn_passes = 1;
    opt->batch_size = 16;
    opt->obs_block = 64;
    opt->obs_update = 1;
    opt->obs_memory_budget = (size_t)4 << 30;
    opt->allocation = PIPELINE_ALLOC_MAGNITUDE;
    opt->layer_obs_rows = 4096;
    opt->layer_obs_damping = 0.01;
    opt->layer_obs_sequential = 1;
    opt->finetune_count = 512;
    opt->finetune_bn_correction = 1;
    finetune_options_init(&opt->ft);
}

const char *pipeline_method_name(pipeline_method m)
{
    switch (m) {
    case PIPELINE_METHOD_MAGNITUDE: return "magnitude";
    case PIPELINE_METHOD_OBD: return "obd";
    case PIPELINE_METHOD_OBS: return "obs";
    case PIPELINE_METHOD_LAYER_OBS: return "layer_obs";
    case PIPELINE_METHOD_DATA_FREE: return "data_free";
    }
    return "unknown";
}

const char *pipeline_allocation_name(pipeline_allocation a)
{
    switch (a) {
    case PIPELINE_ALLOC_MAGNITUDE: return "magnitude";
    case PIPELINE_ALLOC_OBD: return "obd";
    case PIPELINE_ALLOC_UNIFORM: return "uniform";
    }
    return "unknown";
}

/* 1 if the method computes calibration gradients (and so needs a head). */
static int needs_gradients(const pipeline_options *o)
{
    return o->method == PIPELINE_METHOD_OBD || o->method == PIPELINE_METHOD_OBS ||
           (o->method == PIPELINE_METHOD_LAYER_OBS && o->allocation == PIPELINE_ALLOC_OBD);
}

/* Checks the options of obs and layer_obs. */
static top_status validate_obs_options(const pipeline_options *o, top_error *err)
{
    if (o->method == PIPELINE_METHOD_OBS &&
        (o->obs_block < 1 || o->obs_block > PIPELINE_OBS_BLOCK_MAX))
        return top_error_set(err, TOP_ERR_INVALID,
                             "obs block size %zu is outside 1..%d; "
                             "use e.g. 64",
                             o->obs_block, PIPELINE_OBS_BLOCK_MAX);
    if (o->method != PIPELINE_METHOD_LAYER_OBS)
        return TOP_OK;
    if (!o->calib_uri)
        return top_error_set(err, TOP_ERR_INVALID,
                             "method layer_obs needs a calibration "
                             "task; pass a calibration data set or use magnitude");
    if (o->allocation != PIPELINE_ALLOC_MAGNITUDE && o->allocation != PIPELINE_ALLOC_OBD &&
        o->allocation != PIPELINE_ALLOC_UNIFORM)
        return top_error_set(err, TOP_ERR_INVALID,
                             "layer_obs allocation %d is unknown; use "
                             "magnitude, obd or uniform",
                             (int)o->allocation);
    if (o->nm_m != 0 || o->rounds != 1)
        return top_error_set(err, TOP_ERR_INVALID,
                             "method layer_obs takes neither an N:M "
                             "pattern nor rounds (got %d:%d, %d rounds); drop them or use "
                             "obs",
                             o->nm_n, o->nm_m, o->rounds);
    if (o->layer_obs_rows < 16 || o->layer_obs_rows > PIPELINE_LAYER_OBS_ROWS_MAX)
        return top_error_set(err, TOP_ERR_INVALID,
                             "layer_obs rows %zu is outside 16..%d; "
                             "use e.g. 4096",
                             o->layer_obs_rows, PIPELINE_LAYER_OBS_ROWS_MAX);
    if (!(o->layer_obs_damping > 0.0 && o->layer_obs_damping <= 1.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "layer_obs damping %g is outside (0, 1]; "
                             "use e.g. 0.01",
                             o->layer_obs_damping);
    return TOP_OK;
}

static top_status validate_finetune_options(const pipeline_options *o, top_error *err)
{
    if (!o->finetune)
        return TOP_OK;
    if (!o->calib_uri)
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning needs a calibration task (the source task it "
                             "trains on); pass a calibration data set or turn fine-tuning off");
    if (o->finetune_count < 2 || o->finetune_count > 1000000)
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning image count %zu is outside 2..1000000; "
                             "use e.g. 512",
                             o->finetune_count);
    return finetune_validate_options(&o->ft, err);
}

static top_status validate_options(const pipeline_options *o, top_error *err)
{
    if (!o->model_path)
        return top_error_set(err, TOP_ERR_INVALID, "no model path; pass the model to prune");
    if (!(o->sparsity >= 0.0 && o->sparsity < 1.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "sparsity %g is outside [0, 1); pass a "
                             "fraction such as 0.5",
                             o->sparsity);
    if (o->method != PIPELINE_METHOD_MAGNITUDE && o->method != PIPELINE_METHOD_OBD &&
        o->method != PIPELINE_METHOD_OBS && o->method != PIPELINE_METHOD_LAYER_OBS &&
        o->method != PIPELINE_METHOD_DATA_FREE)
        return top_error_set(err, TOP_ERR_INVALID,
                             "method %d is unknown; use magnitude, "
                             "obd, obs, layer_obs or data_free",
                             (int)o->method);
    if (needs_gradients(o) && !o->calib_uri)
        return top_error_set(err, TOP_ERR_INVALID,
                             "method %s needs a calibration task; "
                             "pass a calibration data set or use magnitude",
                             pipeline_method_name(o->method));
    if (o->scope != PRUNE_SCOPE_GLOBAL && o->scope != PRUNE_SCOPE_PER_LAYER)
        return top_error_set(err, TOP_ERR_INVALID,
                             "mask scope %d is unknown; use global or "
                             "per_layer",
                             (int)o->scope);
    if (o->nm_m != 0 && (o->nm_n < 1 || o->nm_n >= o->nm_m || o->nm_m > PRUNE_NM_MAX_GROUP))
        return top_error_set(err, TOP_ERR_INVALID,
                             "N:M pattern %d:%d is invalid; use N < M "
                             "<= %d, such as 2:4",
                             o->nm_n, o->nm_m, PRUNE_NM_MAX_GROUP);
    if (o->nm_m != 0 && o->sparsity < 1.0 - (double)o->nm_n / o->nm_m - 1e-12)
        return top_error_set(err, TOP_ERR_INVALID,
                             "sparsity %g is below the %g that %d:%d "
                             "forces; raise it to at least %g",
                             o->sparsity, 1.0 - (double)o->nm_n / o->nm_m, o->nm_n, o->nm_m,
                             1.0 - (double)o->nm_n / o->nm_m);
    if (o->rounds < 1 || o->rounds > 100 || (o->nm_m != 0 && o->rounds != 1))
        return top_error_set(err, TOP_ERR_INVALID,
                             "rounds %d is invalid; use 1 to 100 "
                             "(1 with an N:M pattern)",
                             o->rounds);
    if (!(o->min_density >= 0.0 && o->min_density <= 1.0 - o->sparsity))
        return top_error_set(err, TOP_ERR_INVALID,
                             "minimum density %g is outside [0, 1 - "
                             "sparsity = %g]; lower it",
                             o->min_density, 1.0 - o->sparsity);
    if (o->bn_mode != PIPELINE_BN_MATCH_DENSE && o->bn_mode != PIPELINE_BN_REESTIMATE)
        return top_error_set(err, TOP_ERR_INVALID,
                             "batch-norm mode %d is unknown; use "
                             "match_dense or reestimate",
                             (int)o->bn_mode);
    if (o->bn_passes < 1 || o->bn_passes > 16)
        return top_error_set(err, TOP_ERR_INVALID, "batch-norm passes %d is outside 1..16",
                             o->bn_passes);
    if (o->bn_recalibration == 1 && !o->calib_uri)
        return top_error_set(err, TOP_ERR_INVALID,
                             "batch-norm recalibration needs a "
                             "calibration task; pass one or turn recalibration off");
    if (o->calib_uri && (o->calib_count < 2 || o->calib_fit_count < 2))
        return top_error_set(err, TOP_ERR_INVALID,
                             "calibration split %zu,%zu is too small; "
                             "use at least 2 images in each",
                             o->calib_count, o->calib_fit_count);
    if (o->n_eval < 1 || o->n_eval > PIPELINE_MAX_EVAL_TASKS)
        return top_error_set(err, TOP_ERR_INVALID, "%d evaluation tasks; pass 1 to %d",
                             o->n_eval, PIPELINE_MAX_EVAL_TASKS);
    if (o->eval_fit_count < 2 || o->eval_count < 1)
        return top_error_set(err, TOP_ERR_INVALID,
                             "evaluation split %zu,%zu is too small; "
                             "use at least 2 head-fit images and 1 evaluation image",
                             o->eval_fit_count, o->eval_count);
    if (!(o->ridge_alpha > 0.0) || !(o->damping >= 0.0) || !isfinite(o->damping))
        return top_error_set(err, TOP_ERR_INVALID,
                             "ridge alpha %g or damping %g is out of "
                             "range; alpha must be > 0 and damping >= 0",
                             o->ridge_alpha, o->damping);
    if (o->batch_size < 2 || o->batch_size > 1024)
        return top_error_set(err, TOP_ERR_INVALID, "batch size %d is outside 2..1024",
                             o->batch_size);
    top_status st = validate_finetune_options(o, err);
    if (st != TOP_OK)
        return st;
    return validate_obs_options(o, err);
}

/* ---- model and prunable set ------------------------------------------------- */

/* Returns the last global average pool, or else the flatten of the last 1x1
 * pooled map, or -1. */
static int default_feature_node(const graph *g)
{
    for (int i = g->n_nodes - 1; i > 0; i--)
        if (g->nodes[i].op == OP_GLOBAL_AVGPOOL)
            return i;
    for (int i = g->n_nodes - 1; i > 0; i--) {
        const graph_node *nd = &g->nodes[i];
        if (nd->op != OP_FLATTEN || nd->n_inputs != 1)
            continue;
        const graph_node *in = &g->nodes[nd->inputs[0]];
        if ((in->op == OP_AVGPOOL || in->op == OP_MAXPOOL) && in->ndim == 3 &&
            in->dims[1] == 1 && in->dims[2] == 1)
            return i;
    }
    return -1;
}

/* Returns 1 if name matches one of the comma-separated glob patterns
 * (fnmatch, so '*' and '?' also match '/'). */
static int matches_any(const char *patterns, const char *name)
{
    char pat[GRAPH_NAME_MAX];
    for (const char *p = patterns; *p;) {
        size_t n = strcspn(p, ",");
        if (n > 0 && n < sizeof pat) {
            memcpy(pat, p, n);
            pat[n] = '\0';
            if (fnmatch(pat, name, 0) == 0)
                return 1;
        }
        p += n + (p[n] == ',');
    }
    return 0;
}

/* The first pattern of the list that matches none of the candidates, or -1;
 * its text goes to out. */
static int unmatched_pattern(char *out, size_t cap, const char *patterns, const graph *g,
                             int feature)
{
    for (const char *p = patterns; *p;) {
        size_t n = strcspn(p, ",");
        snprintf(out, cap, "%.*s", (int)n, p);
        int hit = 0;
        for (int q = 0; !hit && q < g->n_params; q++)
            hit = graph_param_is_prunable(g, q) && g->params[q].node < feature &&
                  matches_any(out, g->params[q].name);
        if (!hit)
            return 0;
        p += n + (p[n] == ',');
    }
    return -1;
}

/* The prunable set: conv and dense weights before the feature node, without
 * the first conv (the stem), or those matching opt->layers when it is set;
 * minus those matching opt->skip_layers. */
static top_status select_prunable(pipeline_ctx *c, top_error *err)
{
    const pipeline_options *o = c->opt;
    char bad[GRAPH_NAME_MAX];
    if (o->layers && unmatched_pattern(bad, sizeof bad, o->layers, c->g, c->feature) == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "layer pattern '%s' matches no conv or dense weight before the "
                             "feature node; list the names with topiary inspect --model M "
                             "--params",
                             bad);
    c->prunable = malloc((size_t)c->g->n_params * sizeof *c->prunable);
    if (!c->prunable)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the prunable list");
    int first_conv = -1;
    for (int p = 0; p < c->g->n_params; p++) {
        const graph_param *gp = &c->g->params[p];
        if (!graph_param_is_prunable(c->g, p) || gp->node >= c->feature)
            continue;
        int stem = first_conv < 0 && c->g->nodes[gp->node].op == OP_CONV2D;
        if (stem)
            first_conv = p;
        int chosen = o->layers ? matches_any(o->layers, gp->name) : !stem;
        if (chosen && o->skip_layers && matches_any(o->skip_layers, gp->name))
            chosen = 0;
        if (chosen)
            c->prunable[c->n_prunable++] = p;
    }
    if (c->n_prunable == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "no prunable weights before feature node '%s' are left by the "
                             "layer patterns; name a later feature node or change the "
                             "patterns",
                             c->g->nodes[c->feature].name);
    return TOP_OK;
}

static top_status load_model(pipeline_ctx *c, top_error *err)
{
    top_status st = model_load(&c->g, c->opt->model_path, err);
    if (st != TOP_OK)
        return st;
    const char *name = c->opt->feature_node;
    c->feature = name ? graph_find_node(c->g, name) : default_feature_node(c->g);
    if (c->feature < 0)
        return name ? top_error_set(err, TOP_ERR_NOT_FOUND,
                                    "feature node '%s' is not in "
                                    "the model; pick a name from topiary inspect --nodes",
                                    name)
                    : top_error_set(err, TOP_ERR_NOT_FOUND,
                                    "the model has no pooled "
                                    "backbone output; name the feature node");
    c->dim = c->g->nodes[c->feature].sample_numel;

    return select_prunable(c, err);
}

/* ---- tasks and features -------------------------------------------------- */

static top_status open_task(pipeline_task *pt, const char *uri, size_t calib, size_t fit,
                            size_t eval, uint64_t seed, top_error *err)
{
    top_status st = dataset_open(&pt->ds, uri, NULL, err);
    if (st != TOP_OK)
        return st;
    size_t k = (size_t)dataset_class_count(pt->ds);
    task_spec spec = {
        .calib_per_class = (calib + k - 1) / k,
        .fit_per_class = (fit + k - 1) / k,
        .eval_per_class = (eval + k - 1) / k,
        .seed = seed,
    };
    st = task_make(&pt->t, pt->ds, NULL, &spec, err);
    if (st != TOP_OK)
        return st;
    /* The splits are shuffled across classes, so a prefix stays mixed. */
    pt->t.calib.count = calib < pt->t.calib.count ? calib : pt->t.calib.count;
    pt->t.fit.count = fit < pt->t.fit.count ? fit : pt->t.fit.count;
    pt->t.eval.count = eval < pt->t.eval.count ? eval : pt->t.eval.count;
    return TOP_OK;
}

/* Runs the graph in inference mode over the split into feat: (split count, D). */
static top_status extract_features(float *feat, pipeline_ctx *c, const task_split *split,
                                   const char *stage, top_error *err)
{
    batch_iter *it = NULL;
    top_status st = batch_iter_new(&it, split, &c->g->preprocess, c->opt->batch_size, err);
    if (st != TOP_OK)
        return st;
    report_progress(c, stage, 0, split->count);
    for (;;) {
        const batch *b = NULL;
        st = batch_iter_next(it, &b, err);
        if (st == TOP_OK)
            st = check_cancel(c, err);
        if (st != TOP_OK || b->n == 0)
            break;
        st = graph_forward(c->g, b->x, b->n, GRAPH_MODE_INFERENCE, err);
        if (st != TOP_OK)
            break;
        memcpy(feat + b->first * c->dim, graph_node_output(c->g, c->feature),
               (size_t)b->n * c->dim * sizeof(float));
        report_progress(c, stage, b->first + (size_t)b->n, split->count);
    }
    batch_iter_free(it);
    return st;
}

static top_status alloc_features(float **out, size_t n, size_t dim, top_error *err)
{
    size_t bytes;
    if (top_size_mul(&bytes, n, dim) || top_size_mul(&bytes, bytes, sizeof(float)))
        return top_error_set(err, TOP_ERR_OVERFLOW, "features of %zu images overflow", n);
    *out = malloc(bytes ? bytes : 1);
    if (!*out)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for %zu bytes of features",
                             bytes);
    return TOP_OK;
}

/* Changes whenever preprocessing, the forward pass or ridge_fit change what a
 * cached head would hold. */
#define PIPELINE_HEAD_CACHE_VERSION "topiary-pipeline-1"

/* The cache key of pt's head; errors go to cache_err, which only warns. */
static top_status head_cache_key_of(char key[SHA256_HEX_BYTES], pipeline_ctx *c,
                                    const pipeline_task *pt, int with_eval,
                                    top_error *cache_err)
{
    const pipeline_options *o = c->opt;
    int is_calib = pt == &c->calib;
    char fingerprint[SHA256_HEX_BYTES];
    top_status st = TOP_OK;
    if (!c->model_sha256[0])
        st = head_cache_model_sha256(c->model_sha256, o->model_path, cache_err);
    if (st == TOP_OK)
        st = head_cache_dataset_fingerprint(fingerprint, dataset_uri(pt->ds), cache_err);
    if (st != TOP_OK)
        return st;
    head_cache_inputs in = {
        .code_version = PIPELINE_HEAD_CACHE_VERSION,
        .model_sha256 = c->model_sha256,
        .feature_node = c->g->nodes[c->feature].name,
        .input_height = (size_t)c->g->preprocess.height,
        .input_width = (size_t)c->g->preprocess.width,
        .dataset_uri = dataset_uri(pt->ds),
        .dataset_fingerprint = fingerprint,
        .calib_count = is_calib ? o->calib_count : 0,
        .fit_count = is_calib ? o->calib_fit_count : o->eval_fit_count,
        .eval_count = with_eval ? o->eval_count : 0,
        .seed = o->seed,
        .alpha = o->ridge_alpha,
        .balanced = o->ridge_balanced,
    };
    return head_cache_key(key, &in, cache_err);
}

/* Returns 1 on a hit. key is "" when the cache failed, and then
 * pt->head_cache_warning gives the reason. A broken cache slows a job down, it does
 * not fail it. */
static int load_cached_head(char key[SHA256_HEX_BYTES], pipeline_ctx *c, pipeline_task *pt,
                            int with_eval)
{
    top_error cache_err;
    top_error_clear(&cache_err);
    int hit = 0;
    double accuracy = 0.0;
    size_t fit_n = 0, eval_n = 0;
    top_status st = head_cache_key_of(key, c, pt, with_eval, &cache_err);
    if (st == TOP_OK)
        st =
            head_cache_load(&hit, &pt->head, &accuracy, &fit_n, &eval_n, c->opt->head_cache_dir,
                            key, c->dim, (size_t)pt->t.n_classes, &cache_err);
    if (st != TOP_OK) {
        key[0] = '\0';
        snprintf(pt->head_cache_warning, sizeof pt->head_cache_warning, "%s",
                 cache_err.message);
        return 0;
    }
    if (hit && (fit_n != pt->t.fit.count || eval_n != (with_eval ? pt->t.eval.count : 0))) {
        ridge_model_free(&pt->head);
        hit = 0;
    }
    pt->head_cached = hit;
    if (hit)
        pt->dense_accuracy = accuracy;
    return hit;
}

static void store_cached_head(pipeline_task *pt, const char *dir, const char *key,
                              int with_eval)
{
    top_error cache_err;
    top_error_clear(&cache_err);
    if (head_cache_store(dir, key, &pt->head, with_eval ? pt->dense_accuracy : 0.0,
                         pt->t.fit.count, with_eval ? pt->t.eval.count : 0,
                         &cache_err) != TOP_OK)
        snprintf(pt->head_cache_warning, sizeof pt->head_cache_warning, "%s",
                 cache_err.message);
}

/* Fits the task's ridge head on dense features of its fit split, and measures
 * the dense accuracy on its evaluation split when with_eval is set. With a
 * head cache, a hit skips both (the evaluation buffer is still allocated for
 * the pruned evaluation). */
static top_status fit_head(pipeline_ctx *c, pipeline_task *pt, int with_eval, top_error *err)
{
    char key[SHA256_HEX_BYTES] = "";
    if (c->opt->head_cache_dir && load_cached_head(key, c, pt, with_eval))
        return with_eval ? alloc_features(&pt->eval_x, pt->t.eval.count, c->dim, err) : TOP_OK;
    top_status st = alloc_features(&pt->fit_x, pt->t.fit.count, c->dim, err);
    if (st == TOP_OK)
        st = extract_features(pt->fit_x, c, &pt->t.fit, "dense features", err);
    ridge_options ro = {.alpha = c->opt->ridge_alpha, .balanced = c->opt->ridge_balanced};
    if (st == TOP_OK)
        st = ridge_fit(&pt->head, pt->fit_x, pt->t.fit.labels, pt->t.fit.count, c->dim,
                       (size_t)pt->t.n_classes, &ro, err);
    if (st == TOP_OK && with_eval) {
        st = alloc_features(&pt->eval_x, pt->t.eval.count, c->dim, err);
        if (st == TOP_OK)
            st = extract_features(pt->eval_x, c, &pt->t.eval, "dense features", err);
        if (st == TOP_OK)
            st = ridge_accuracy(&pt->dense_accuracy, &pt->head, pt->eval_x, pt->t.eval.labels,
                                pt->t.eval.count, err);
    }
    if (st == TOP_OK && key[0])
        store_cached_head(pt, c->opt->head_cache_dir, key, with_eval);
    return st;
}

/* With the model's own head as the calibration loss, the calibration task's
 * classes must be classes of the model's output. */
static top_status check_model_head(pipeline_ctx *c, top_error *err)
{
    size_t k = c->g->nodes[c->g->output].sample_numel;
    int n = dataset_class_count(c->calib.ds);
    if (n < 1 || (size_t)n > k)
        return top_error_set(err, TOP_ERR_INVALID,
                             "the calibration data set '%s' has %d classes but the model's "
                             "own head has %zu outputs; use the ridge head for the "
                             "calibration loss, or a data set in the model's label space",
                             dataset_uri(c->calib.ds), n, k);
    return TOP_OK;
}

/* Draws the fine-tuning split: finetune_count images of the calibration data
 * set, drawn like its calibration split; for distill, also the dense
 * features of those images (the targets), before anything is pruned. */
static top_status ft_prepare(pipeline_ctx *c, top_error *err)
{
    const pipeline_options *o = c->opt;
    size_t k = (size_t)dataset_class_count(c->calib.ds);
    task_spec spec = {.calib_per_class = (o->finetune_count + k - 1) / k, .seed = o->seed};
    top_error e;
    top_error_clear(&e);
    top_status st = task_make(&c->ft_task, c->calib.ds, NULL, &spec, &e);
    if (st != TOP_OK)
        return top_error_set(err, st,
                             "fine-tuning images %zu: %s; lower the fine-tuning image count",
                             o->finetune_count, e.message);
    c->ft_task_made = 1;
    task_split *split = &c->ft_task.calib;
    split->count = o->finetune_count < split->count ? o->finetune_count : split->count;
    if (o->ft.loss != FINETUNE_LOSS_DISTILL)
        return TOP_OK;
    st = alloc_features(&c->ft_targets, split->count, c->dim, err);
    return st == TOP_OK ? extract_features(c->ft_targets, c, split, "dense features", err) : st;
}

static top_status dense_stage(pipeline_ctx *c, top_error *err)
{
    const pipeline_options *o = c->opt;
    top_status st = TOP_OK;
    if (o->calib_uri) {
        int head = (needs_gradients(o) && !o->calib_model_head) ||
                   (o->finetune && o->ft.loss == FINETUNE_LOSS_CROSS_ENTROPY);
        size_t fit = head ? o->calib_fit_count : 0;
        st = open_task(&c->calib, o->calib_uri, o->calib_count, fit, 0, o->seed, err);
        if (st == TOP_OK && o->calib_model_head)
            st = check_model_head(c, err);
        if (st == TOP_OK && head)
            st = fit_head(c, &c->calib, 0, err);
        if (st == TOP_OK && o->finetune)
            st = ft_prepare(c, err);
    }
    for (int i = 0; st == TOP_OK && i < o->n_eval; i++) {
        st = open_task(&c->eval[i], o->eval_uris[i], 0, o->eval_fit_count, o->eval_count,
                       o->seed, err);
        if (st == TOP_OK)
            st = fit_head(c, &c->eval[i], 1, err);
    }
    return st;
}

/* ---- saliency ---------------------------------------------------------------- */

/* Where per-sample gradients go: fisher[l] (numel) += g^2, and, when rows is
 * set, rows[l] (n samples, numel) row `index` = g. */
typedef struct grad_sink {
    double **fisher;
    float **rows;
} grad_sink;

/* One image: forward, backward from the feature node, then into the sink. */
/* dy = the gradient of -log p_label at the model's own output node: for a
 * softmax output p, -1 / p_label at the label and 0 elsewhere; for logits z,
 * softmax(z) - onehot(label).  out, dy: (K) */
static void model_head_loss_grad(float *dy, const graph *g, const float *out, int label)
{
    size_t k = g->nodes[g->output].sample_numel;
    if (g->nodes[g->output].op == OP_SOFTMAX) {
        memset(dy, 0, k * sizeof *dy);
        double p = out[label] > 1e-12f ? (double)out[label] : 1e-12;
        dy[label] = (float)(-1.0 / p);
        return;
    }
    double mx = out[0], sum = 0.0;
    for (size_t j = 1; j < k; j++)
        mx = out[j] > mx ? out[j] : mx;
    for (size_t j = 0; j < k; j++)
        sum += exp((double)out[j] - mx);
    for (size_t j = 0; j < k; j++)
        dy[j] = (float)(exp((double)out[j] - mx) / sum - (j == (size_t)label ? 1.0 : 0.0));
}

static top_status fisher_sample(const grad_sink *sink, pipeline_ctx *c, const float *x,
                                int label, size_t index, float *dy, double *scores,
                                top_error *err)
{
    top_status st = graph_forward(c->g, x, 1, GRAPH_MODE_INFERENCE, err);
    if (st != TOP_OK)
        return st;
    int from = c->opt->calib_model_head ? c->g->output : c->feature;
    const float *out = graph_node_output(c->g, from);
    double loss = 0.0; /* only dy is used here */
    size_t correct = 0;
    if (c->opt->calib_model_head)
        model_head_loss_grad(dy, c->g, out, label);
    else /* the fine-tuning loss at batch 1: dy = W^T (softmax(s) - onehot(label)) */
        finetune_head_loss(&loss, &correct, dy, scores, &c->calib.head, out, &label, 1);
    graph_zero_grad(c->g);
    st = graph_backward(c->g, from, dy, NULL, err);
    if (st != TOP_OK)
        return st;
    for (int l = 0; l < c->n_prunable; l++) {
        const graph_param *gp = &c->g->params[c->prunable[l]];
        double *f = sink->fisher[l];
        for (size_t i = 0; i < gp->value.numel; i++)
            f[i] += (double)gp->grad[i] * gp->grad[i];
        if (sink->rows)
            memcpy(sink->rows[l] + index * gp->value.numel, gp->grad,
                   gp->value.numel * sizeof(float));
    }
    return TOP_OK;
}

/* Accumulates the sum of squared per-sample gradients over the calibration split. */
static top_status fisher_accumulate(const grad_sink *sink, pipeline_ctx *c, top_error *err)
{
    const task_split *split = &c->calib.t.calib;
    size_t out_dim = c->g->nodes[c->g->output].sample_numel;
    float *dy = malloc((c->dim > out_dim ? c->dim : out_dim) * sizeof *dy);
    double *scores = malloc((c->calib.head.n_classes + 1) * sizeof *scores);
    batch_iter *it = NULL;
    top_status st = (!dy || !scores) ? top_error_set(err, TOP_ERR_NOMEM,
                                                     "out of memory for the loss "
                                                     "gradient")
                                     : batch_iter_new(&it, split, &c->g->preprocess,
                                                      c->opt->batch_size, err);
    const graph_preprocess *pp = &c->g->preprocess;
    size_t per_image = (size_t)pp->channels * (size_t)pp->height * (size_t)pp->width;
    report_progress(c, "saliency", 0, split->count);
    while (st == TOP_OK) {
        const batch *b = NULL;
        st = batch_iter_next(it, &b, err);
        if (st != TOP_OK || b->n == 0)
            break;
        for (int i = 0; st == TOP_OK && i < b->n; i++) {
            st = check_cancel(c, err);
            if (st == TOP_OK)
                st = fisher_sample(sink, c, b->x + (size_t)i * per_image, b->labels[i],
                                   b->first + (size_t)i, dy, scores, err);
            report_progress(c, "saliency", b->first + (size_t)i + 1, split->count);
        }
    }
    batch_iter_free(it);
    free(dy);
    free(scores);
    return st;
}

static void layers_free(void **arrays, int n)
{
    for (int l = 0; arrays && l < n; l++)
        free(arrays[l]);
    free(arrays);
}

/* obs: checks the memory budget, then allocates c->grads, (n, numel) per layer. */
static top_status obs_alloc_rows(pipeline_ctx *c, top_error *err)
{
    size_t n = c->calib.t.calib.count, *counts = malloc((size_t)c->n_prunable * sizeof *counts);
    if (!counts)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the layer sizes");
    for (int l = 0; l < c->n_prunable; l++)
        counts[l] = c->g->params[c->prunable[l]].value.numel;
    obs_memory mem;
    top_status st = obs_memory_estimate(&mem, counts, (size_t)c->n_prunable, c->opt->obs_block,
                                        n, c->opt->obs_memory_budget, err);
    c->obs_memory = mem.total;
    c->grads = st == TOP_OK ? calloc((size_t)c->n_prunable, sizeof *c->grads) : NULL;
    if (st == TOP_OK && !c->grads)
        st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the gradient rows");
    for (int l = 0; st == TOP_OK && l < c->n_prunable; l++) {
        c->grads[l] = malloc(n * counts[l] * sizeof(float)); /* checked by the estimate */
        if (!c->grads[l])
            st = top_error_set(err, TOP_ERR_NOMEM,
                               "out of memory for %zu x %zu gradients; "
                               "lower the calibration images",
                               n, counts[l]);
    }
    free(counts);
    return st;
}

/* Sets c->lambda from the Fisher diagonal sums (F = sum / n) and the options. */
static void set_lambda(pipeline_ctx *c, double *const *fisher)
{
    double n = (double)c->calib.t.calib.count, total = 0.0, count = 0.0;
    for (int l = 0; l < c->n_prunable; l++) {
        size_t numel = c->g->params[c->prunable[l]].value.numel;
        for (size_t i = 0; i < numel; i++)
            total += fisher[l][i] / n;
        count += (double)numel;
    }
    c->lambda = c->opt->damping_mode == PIPELINE_DAMPING_ABSOLUTE
                    ? c->opt->damping
                    : c->opt->damping * (count > 0 ? total / count : 0.0);
}

/* OBD scores 0.5 w^2 (F_ii + lambda) of layer l. */
static top_status layer_obd_scores(float *scores, pipeline_ctx *c, int l, const double *fisher,
                                   top_error *err)
{
    const tensor *w = &c->g->params[c->prunable[l]].value;
    double n = (double)c->calib.t.calib.count;
    float *diag = malloc(w->numel * sizeof *diag);
    if (!diag)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the Fisher diagonal");
    for (size_t i = 0; i < w->numel; i++)
        diag[i] = (float)(fisher[i] / n);
    top_status st = prune_saliency_obd(scores, w->data, diag, w->numel, c->lambda, err);
    free(diag);
    return st;
}

/* Computes OBD scores 0.5 w^2 (F + lambda), or with obs set the block OBS
 * scores w^2 / (2 [(F_B + lambda I)^-1]_ii); obs keeps the per-sample
 * gradients in c->grads for the update. */
static top_status saliency_second_order(float **scores, pipeline_ctx *c, int obs,
                                        top_error *err)
{
    double **fisher = calloc((size_t)c->n_prunable, sizeof *fisher);
    top_status st = fisher ? TOP_OK : top_error_set(err, TOP_ERR_NOMEM, "out of memory");
    for (int l = 0; st == TOP_OK && l < c->n_prunable; l++) {
        fisher[l] = calloc(c->g->params[c->prunable[l]].value.numel, sizeof(double));
        if (!fisher[l])
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the Fisher diagonal");
    }
    if (st == TOP_OK && obs)
        st = obs_alloc_rows(c, err);
    grad_sink sink = {.fisher = fisher, .rows = obs ? c->grads : NULL};
    if (st == TOP_OK)
        st = fisher_accumulate(&sink, c, err);
    if (st == TOP_OK)
        set_lambda(c, fisher);
    size_t n = c->calib.t.calib.count;
    for (int l = 0; st == TOP_OK && l < c->n_prunable; l++) {
        const tensor *w = &c->g->params[c->prunable[l]].value;
        st = obs ? obs_layer_saliency(scores[l], w->data, c->grads[l], w->numel, n,
                                      c->opt->obs_block, c->lambda, &c->obs_damping, err)
                 : layer_obd_scores(scores[l], c, l, fisher[l], err);
        report_progress(c, "saliency", n + (size_t)l + 1, n + (size_t)c->n_prunable);
    }
    layers_free((void **)fisher, c->n_prunable);
    return st;
}

/* obs: the OBS update of every block of every layer given the masks, which
 * also sets the pruned weights to exactly 0. */
static top_status obs_update_stage(pipeline_ctx *c, uint8_t *const *masks, top_error *err)
{
    size_t n = c->calib.t.calib.count;
    top_status st = TOP_OK;
    report_progress(c, "obs update", 0, (size_t)c->n_prunable);
    for (int l = 0; st == TOP_OK && l < c->n_prunable; l++) {
        tensor *w = &c->g->params[c->prunable[l]].value;
        st = check_cancel(c, err);
        if (st == TOP_OK)
            st = obs_layer_update(w->data, masks[l], c->grads[l], w->numel, n,
                                  c->opt->obs_block, c->lambda, &c->obs_damping, err);
        report_progress(c, "obs update", (size_t)l + 1, (size_t)c->n_prunable);
    }
    return st;
}

/* ---- mask ------------------------------------------------------------------ */

static top_status prune_stage(pipeline_ctx *c, double sparsity, top_error *err)
{
    size_t n = (size_t)c->n_prunable;
    float **scores = calloc(n, sizeof *scores);
    uint8_t **masks = calloc(n, sizeof *masks);
    prune_layer *layers = calloc(n, sizeof *layers);
    top_status st = (scores && masks && layers)
                        ? TOP_OK
                        : top_error_set(err, TOP_ERR_NOMEM, "out of memory for the masks");
    for (size_t l = 0; st == TOP_OK && l < n; l++) {
        const tensor *w = &c->g->params[c->prunable[l]].value;
        scores[l] = malloc(w->numel * sizeof(float));
        masks[l] = malloc(w->numel);
        if (!scores[l] || !masks[l])
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the scores");
        else if (c->opt->method == PIPELINE_METHOD_MAGNITUDE)
            prune_saliency_magnitude(scores[l], w->data, w->numel);
        else if (c->opt->method == PIPELINE_METHOD_DATA_FREE)
            st = datafree_scores(scores[l], c->g, c->prunable[l], err);
        layers[l] = (prune_layer){scores[l], masks[l], w->numel,
                                  w->numel / (size_t)(w->shape[0] > 0 ? w->shape[0] : 1)};
    }
    double t0 = now_s();
    int second = c->opt->method == PIPELINE_METHOD_OBD || c->opt->method == PIPELINE_METHOD_OBS;
    if (st == TOP_OK && second)
        st = saliency_second_order(scores, c, c->opt->method == PIPELINE_METHOD_OBS, err);
    c->timings[T_SALIENCY] += now_s() - t0;

    t0 = now_s();
    report_progress(c, "mask", 0, 1);
    prune_mask_options mo = {.sparsity = sparsity,
                             .scope = c->opt->scope,
                             .nm_n = c->opt->nm_n,
                             .nm_m = c->opt->nm_m,
                             .min_density = c->opt->min_density};
    if (st == TOP_OK)
        st = prune_mask_compute(layers, n, &mo, err);
    c->timings[T_MASK] += now_s() - t0;
    t0 = now_s();
    if (st == TOP_OK && c->opt->method == PIPELINE_METHOD_OBS && c->opt->obs_update)
        st = obs_update_stage(c, masks, err);
    c->timings[T_UPDATE] += now_s() - t0;
    t0 = now_s();
    for (size_t l = 0; st == TOP_OK && l < n; l++) {
        tensor *w = &c->g->params[c->prunable[l]].value;
        for (size_t i = 0; i < w->numel; i++)
            if (!masks[l][i])
                w->data[i] = 0.0f;
    }
    c->timings[T_MASK] += now_s() - t0;
    for (size_t l = 0; l < n; l++) {
        free(scores ? scores[l] : NULL);
        free(masks ? masks[l] : NULL);
    }
    free(scores);
    free(masks);
    free(layers);
    layers_free((void **)c->grads, c->n_prunable);
    c->grads = NULL;
    return st;
}

/* ---- layer-wise OBS ---------------------------------------------------------- */

/* Masks of the allocation: a global (or, for uniform, per-layer) mask at q
 * from magnitude or obd scores. Only the per-layer and per-group zero counts
 * are used. */
static top_status allocation_masks(uint8_t **masks, pipeline_ctx *c, double q, top_error *err)
{
    size_t n = (size_t)c->n_prunable;
    float **scores = calloc(n, sizeof *scores);
    prune_layer *layers = calloc(n, sizeof *layers);
    top_status st =
        (scores && layers) ? TOP_OK : top_error_set(err, TOP_ERR_NOMEM, "out of memory");
    for (size_t l = 0; st == TOP_OK && l < n; l++) {
        const tensor *w = &c->g->params[c->prunable[l]].value;
        scores[l] = malloc(w->numel * sizeof(float));
        if (!scores[l])
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the scores");
        else
            prune_saliency_magnitude(scores[l], w->data, w->numel);
        layers[l] = (prune_layer){scores[l], masks[l], w->numel,
                                  w->numel / (size_t)(w->shape[0] > 0 ? w->shape[0] : 1)};
    }
    if (st == TOP_OK && c->opt->allocation == PIPELINE_ALLOC_OBD)
        st = saliency_second_order(scores, c, 0, err);
    prune_mask_options mo = {
        .sparsity = q,
        .scope = c->opt->allocation == PIPELINE_ALLOC_UNIFORM ? PRUNE_SCOPE_PER_LAYER
                                                              : c->opt->scope,
        .min_density = c->opt->min_density,
    };
    if (st == TOP_OK)
        st = prune_mask_compute(layers, n, &mo, err);
    layers_free((void **)scores, (int)n);
    free(layers);
    return st;
}

/* Decodes the calibration split once: imgs (count, C, H, W). */
static top_status load_calibration(float **imgs, pipeline_ctx *c, top_error *err)
{
    const task_split *split = &c->calib.t.calib;
    const graph_preprocess *pp = &c->g->preprocess;
    size_t per = (size_t)pp->channels * (size_t)pp->height * (size_t)pp->width, bytes;
    if (top_size_mul(&bytes, per, split->count) || top_size_mul(&bytes, bytes, sizeof(float)))
        return top_error_set(err, TOP_ERR_OVERFLOW, "%zu calibration images overflow",
                             split->count);
    *imgs = malloc(bytes ? bytes : 1);
    if (!*imgs)
        return top_error_set(err, TOP_ERR_NOMEM,
                             "out of memory for %zu calibration images; "
                             "lower the calibration images",
                             split->count);
    batch_iter *it = NULL;
    top_status st = batch_iter_new(&it, split, pp, c->opt->batch_size, err);
    while (st == TOP_OK) {
        const batch *b = NULL;
        st = batch_iter_next(it, &b, err);
        if (st != TOP_OK || b->n == 0)
            break;
        memcpy(*imgs + b->first * per, b->x, (size_t)b->n * per * sizeof(float));
    }
    batch_iter_free(it);
    return st;
}

/* The linear map of one prunable weight as layer OBS sees it: G groups of
 * (kg, cg) weight rows, each with its own input columns; ppi input rows per
 * image (conv output positions, or dense tokens). */
typedef struct linear_view {
    const graph_node *nd;
    conv2d_shape cv;
    size_t groups, kg, cg, ppi;
} linear_view;

static top_status linear_view_of(linear_view *v, const pipeline_ctx *c, int l, top_error *err)
{
    const graph_param *gp = &c->g->params[c->prunable[l]];
    memset(v, 0, sizeof *v);
    v->nd = &c->g->nodes[gp->node];
    v->cv = v->nd->attrs.conv;
    if (v->nd->op == OP_CONV2D && v->cv.groups > 0 && v->cv.p > 0 && v->cv.q > 0) {
        v->groups = (size_t)v->cv.groups;
        v->kg = (size_t)v->cv.k / v->groups;
        v->cg = (size_t)(v->cv.c / v->cv.groups) * (size_t)v->cv.r * (size_t)v->cv.s;
        v->ppi = (size_t)v->cv.p * (size_t)v->cv.q;
    } else if (v->nd->op == OP_DENSE && gp->value.ndim == 2) {
        const graph_node *in = &c->g->nodes[v->nd->inputs[0]];
        v->groups = 1;
        v->kg = (size_t)gp->value.shape[0];
        v->cg = (size_t)gp->value.shape[1];
        v->ppi = in->sample_numel / v->cg;
    }
    if (v->groups == 0 || v->ppi == 0 || v->kg * v->cg * v->groups != gp->value.numel)
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "layer_obs cannot view '%s' (op %s) "
                             "as a linear map; use obs or obd",
                             gp->name, op_kind_str(v->nd->op));
    return TOP_OK;
}

/* Copies input row `pos` of image `img` into row k of every group's X.
 *   in: (N, C, H, W) or (N, ppi, cg)  x: G blocks of (rows, cg) */
static void gather_row(float *x, const linear_view *v, const float *in, size_t img, size_t pos,
                       size_t k, size_t rows)
{
    if (v->nd->op == OP_DENSE) {
        memcpy(x + k * v->cg, in + (img * v->ppi + pos) * v->cg, v->cg * sizeof(float));
        return;
    }
    const conv2d_shape *s = &v->cv;
    size_t cpg = (size_t)(s->c / s->groups), hw = (size_t)s->h * (size_t)s->w;
    int py = (int)(pos / (size_t)s->q), px = (int)(pos % (size_t)s->q);
    for (size_t g = 0; g < v->groups; g++) {
        float *row = x + (g * rows + k) * v->cg;
        for (size_t cl = 0; cl < cpg; cl++) {
            const float *plane = in + (img * (size_t)s->c + g * cpg + cl) * hw;
            for (int r = 0; r < s->r; r++) {
                int iy = py * s->stride_h - s->pad_top + r * s->dilation_h;
                for (int t = 0; t < s->s; t++) {
                    int ix = px * s->stride_w - s->pad_left + t * s->dilation_w;
                    int in_bounds = iy >= 0 && iy < s->h && ix >= 0 && ix < s->w;
                    *row++ = in_bounds ? plane[(size_t)iy * (size_t)s->w + (size_t)ix] : 0.0f;
                }
            }
        }
    }
}

/* Stratified, deterministic choice of `rows` of `total` input rows:
 * sel[k] = floor((k + u_k) total / rows), u_k in [0, 1) from the seed. */
static void choose_rows(size_t *sel, size_t rows, size_t total, uint64_t seed)
{
    uint64_t z = seed ^ 0x9e3779b97f4a7c15ull;
    for (size_t k = 0; k < rows; k++) {
        z += 0x9e3779b97f4a7c15ull;
        uint64_t h = z;
        h = (h ^ (h >> 30)) * 0xbf58476d1ce4e5b9ull;
        h = (h ^ (h >> 27)) * 0x94d049bb133111ebull;
        h ^= h >> 31;
        double u = rows == total ? 0.0 : (double)(h >> 11) / 9007199254740992.0;
        size_t r = (size_t)(((double)k + u) * (double)total / (double)rows);
        sel[k] = r < total ? r : total - 1;
    }
}

/* Forward passes over the calibration images, gathering the sampled input
 * rows of layer v into x (G blocks of (rows, cg)). */
static top_status gather_inputs(float *x, const size_t *sel, size_t rows, pipeline_ctx *c,
                                const linear_view *v, const float *imgs, size_t n_img,
                                top_error *err)
{
    const graph_preprocess *pp = &c->g->preprocess;
    size_t per = (size_t)pp->channels * (size_t)pp->height * (size_t)pp->width, k = 0;
    size_t bs = (size_t)c->opt->batch_size;
    for (size_t b0 = 0; b0 < n_img && k < rows; b0 += bs) {
        size_t nb = n_img - b0 < bs ? n_img - b0 : bs;
        top_status st = check_cancel(c, err);
        if (st == TOP_OK)
            st = graph_forward_to(c->g, imgs + b0 * per, (int)nb, GRAPH_MODE_INFERENCE,
                                  v->nd->inputs[0], err);
        if (st != TOP_OK)
            return st;
        const float *in = graph_node_output(c->g, v->nd->inputs[0]);
        for (; k < rows && sel[k] < (b0 + nb) * v->ppi; k++)
            gather_row(x, v, in, sel[k] / v->ppi - b0, sel[k] % v->ppi, k, rows);
    }
    return TOP_OK;
}

/* Prunes layer l into w (numel, the layer's weights or a copy) by layer OBS,
 * each group to the zero count that the allocation mask gives it. */
static top_status layer_obs_layer(float *w, uint8_t *mask, pipeline_ctx *c, int l,
                                  const float *imgs, size_t n_img, top_error *err)
{
    linear_view v;
    top_status st = linear_view_of(&v, c, l, err);
    if (st != TOP_OK)
        return st;
    size_t total = n_img * v.ppi, bytes;
    size_t rows = total < c->opt->layer_obs_rows ? total : c->opt->layer_obs_rows;
    if (top_size_mul(&bytes, rows, v.cg * v.groups) || top_size_mul(&bytes, bytes, 4))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "layer_obs inputs overflow; lower the "
                             "rows");
    float *x = malloc(bytes ? bytes : 1);
    size_t *sel = malloc(rows * sizeof *sel);
    st = (x && sel) ? TOP_OK
                    : top_error_set(err, TOP_ERR_NOMEM,
                                    "out of memory for %zu "
                                    "bytes of layer inputs; lower the rows",
                                    bytes);
    if (st == TOP_OK) {
        choose_rows(sel, rows, total, c->opt->seed + (uint64_t)l);
        st = gather_inputs(x, sel, rows, c, &v, imgs, n_img, err);
    }
    size_t gsize = v.kg * v.cg;
    for (size_t g = 0; st == TOP_OK && g < v.groups; g++) {
        size_t zeros = 0;
        for (size_t i = g * gsize; i < (g + 1) * gsize; i++)
            zeros += mask[i] == 0;
        layer_obs_options lo = {.sparsity = (double)zeros / (double)gsize,
                                .block = 128,
                                .damping = c->opt->layer_obs_damping,
                                .cancel = c->cancel};
        st = layer_obs_prune(w + g * gsize, mask + g * gsize, x + g * rows * v.cg, v.kg, v.cg,
                             rows, &lo, &c->obs_damping, err);
    }
    c->layer_obs_rows_used = rows > c->layer_obs_rows_used ? rows : c->layer_obs_rows_used;
    free(x);
    free(sel);
    return st;
}

/* Prunable layers in graph order (their nodes' topological order). */
static void layer_order(int *order, const pipeline_ctx *c)
{
    for (int l = 0; l < c->n_prunable; l++) {
        int j = l;
        for (; j > 0 &&
               c->g->params[c->prunable[order[j - 1]]].node > c->g->params[c->prunable[l]].node;
             j--)
            order[j] = order[j - 1];
        order[j] = l;
    }
}

/* Layer OBS of every layer in graph order; sequential inputs come from the
 * model with the earlier layers already pruned, dense inputs from the dense
 * model (the pruned weights are written back at the end). */
static top_status layer_obs_run(uint8_t **masks, pipeline_ctx *c, const float *imgs,
                                top_error *err)
{
    size_t n = (size_t)c->n_prunable, n_img = c->calib.t.calib.count;
    int seq = c->opt->layer_obs_sequential;
    int *order = malloc(n * sizeof *order);
    float **out = calloc(n, sizeof *out);
    top_status st = (order && out) ? TOP_OK
                                   : top_error_set(err, TOP_ERR_NOMEM,
                                                   "out of "
                                                   "memory");
    for (size_t l = 0; st == TOP_OK && l < n; l++) {
        tensor *w = &c->g->params[c->prunable[l]].value;
        out[l] = seq ? w->data : malloc(w->numel * sizeof(float));
        if (!out[l])
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for a weight copy");
        else if (!seq)
            memcpy(out[l], w->data, w->numel * sizeof(float));
    }
    if (st == TOP_OK)
        layer_order(order, c);
    report_progress(c, "layer obs", 0, n);
    for (size_t i = 0; st == TOP_OK && i < n; i++) {
        st = layer_obs_layer(out[order[i]], masks[order[i]], c, order[i], imgs, n_img, err);
        report_progress(c, "layer obs", i + 1, n);
    }
    for (size_t l = 0; st == TOP_OK && !seq && l < n; l++) {
        tensor *w = &c->g->params[c->prunable[l]].value;
        memcpy(w->data, out[l], w->numel * sizeof(float));
    }
    if (!seq)
        layers_free((void **)out, (int)n);
    else
        free(out);
    free(order);
    return st;
}

static top_status layer_obs_stage(pipeline_ctx *c, double q, top_error *err)
{
    size_t n = (size_t)c->n_prunable;
    uint8_t **masks = calloc(n, sizeof *masks);
    float *imgs = NULL;
    top_status st = masks ? TOP_OK : top_error_set(err, TOP_ERR_NOMEM, "out of memory");
    for (size_t l = 0; st == TOP_OK && l < n; l++) {
        masks[l] = malloc(c->g->params[c->prunable[l]].value.numel);
        if (!masks[l])
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the masks");
    }
    double t0 = now_s();
    if (st == TOP_OK)
        st = allocation_masks(masks, c, q, err);
    c->timings[T_SALIENCY] += now_s() - t0;
    t0 = now_s();
    if (st == TOP_OK)
        st = load_calibration(&imgs, c, err);
    if (st == TOP_OK)
        st = layer_obs_run(masks, c, imgs, err);
    c->timings[T_UPDATE] += now_s() - t0;
    free(imgs);
    layers_free((void **)masks, (int)n);
    return st;
}

/* ---- memory estimate ---------------------------------------------------------- */

/* layer_obs: the calibration images plus, for the layer that needs most, its
 * gathered input rows and one group's Hessian workspace. *worst names it. */
static top_status layer_obs_memory(size_t *bytes, int *worst, pipeline_ctx *c, top_error *err)
{
    const graph_preprocess *pp = &c->g->preprocess;
    size_t imgs, peak = 0;
    if (top_size_mul(&imgs, (size_t)pp->channels * (size_t)pp->height * (size_t)pp->width,
                     c->opt->calib_count) ||
        top_size_mul(&imgs, imgs, sizeof(float)))
        return top_error_set(err, TOP_ERR_OVERFLOW, "%zu calibration images overflow",
                             c->opt->calib_count);
    for (int l = 0; l < c->n_prunable; l++) {
        linear_view v;
        top_status st = linear_view_of(&v, c, l, err);
        if (st != TOP_OK)
            return st;
        size_t total, rows, x, ws;
        if (top_size_mul(&total, c->opt->calib_count, v.ppi))
            return top_error_set(err, TOP_ERR_OVERFLOW, "layer_obs rows overflow");
        rows = total < c->opt->layer_obs_rows ? total : c->opt->layer_obs_rows;
        if (top_size_mul(&x, rows, v.cg * v.groups) || top_size_mul(&x, x, sizeof(float)) ||
            top_size_add(&x, x, rows * sizeof(size_t)))
            return top_error_set(err, TOP_ERR_OVERFLOW, "layer_obs inputs overflow");
        st = layer_obs_workspace_bytes(&ws, v.kg, v.cg, 128, err);
        if (st != TOP_OK)
            return st;
        if (x + ws > peak) {
            peak = x + ws;
            *worst = l;
        }
    }
    return top_size_add(bytes, imgs, peak)
               ? top_error_set(err, TOP_ERR_OVERFLOW, "layer_obs memory overflows")
               : TOP_OK;
}

/*
 * Fine-tuning keeps every activation of a training batch and its gradient:
 * 2 floats per activation value times the batch (167 MiB per image for
 * MobileNetV2 at 224 px; the forward+backward benchmark peaked at 168 MiB
 * per image). Over obs_memory_budget the job fails now rather than at the
 * first step.
 */
static top_status finetune_memory(pipeline_ctx *c, top_error *err)
{
    const pipeline_options *o = c->opt;
    size_t per_image = 0, bytes;
    for (int i = 0; i < c->g->n_nodes; i++)
        per_image += c->g->nodes[i].sample_numel;
    if (top_size_mul(&bytes, per_image, 2 * sizeof(float)) ||
        top_size_mul(&bytes, bytes, (size_t)o->ft.batch_size))
        return top_error_set(err, TOP_ERR_OVERFLOW, "the fine-tuning memory overflows");
    c->ft_memory = bytes;
    if (o->obs_memory_budget > 0 && bytes > o->obs_memory_budget)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "fine-tuning with batches of %d images needs about %.1f MiB of "
                             "activations but the budget is %.1f MiB; lower the fine-tuning "
                             "batch size to %zu or less",
                             o->ft.batch_size, (double)bytes / 1048576.0,
                             (double)o->obs_memory_budget / 1048576.0,
                             o->obs_memory_budget / (per_image * 2 * sizeof(float)));
    return TOP_OK;
}

/*
 * Estimates, before any data is read, the bytes of pruning state the method
 * holds at its peak, beyond the model and its activations:
 *   every method: scores (4 B) and masks (1 B) per prunable weight
 *   obd, and layer_obs with obd allocation: the Fisher diagonal (8 B each)
 *   obs: obs_memory_estimate (per-sample gradients of every layer and the
 *     block workspace)
 *   layer_obs: layer_obs_memory
 * obs and layer_obs over opt->obs_memory_budget fail with TOP_ERR_LIMIT and
 * a message that says what to lower.
 */
static top_status memory_stage(pipeline_ctx *c, top_error *err)
{
    const pipeline_options *o = c->opt;
    size_t total = 0, extra = 0;
    for (int l = 0; l < c->n_prunable; l++)
        total += c->g->params[c->prunable[l]].value.numel;
    size_t per_weight = 5 + (needs_gradients(o) ? 8 : 0);
    if (top_size_mul(&c->memory_estimate, total, per_weight))
        return top_error_set(err, TOP_ERR_OVERFLOW, "the memory estimate overflows");
    top_status st = TOP_OK;
    if (o->method == PIPELINE_METHOD_OBS) {
        size_t *counts = malloc((size_t)c->n_prunable * sizeof *counts);
        if (!counts)
            return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the layer sizes");
        for (int l = 0; l < c->n_prunable; l++)
            counts[l] = c->g->params[c->prunable[l]].value.numel;
        obs_memory mem;
        st = obs_memory_estimate(&mem, counts, (size_t)c->n_prunable, o->obs_block,
                                 o->calib_count, o->obs_memory_budget, err);
        extra = mem.total;
        free(counts);
    } else if (o->method == PIPELINE_METHOD_LAYER_OBS) {
        int worst = 0;
        st = layer_obs_memory(&extra, &worst, c, err);
        if (st == TOP_OK && o->obs_memory_budget > 0 && extra > o->obs_memory_budget)
            st = top_error_set(
                err, TOP_ERR_LIMIT,
                "layer_obs needs %.1f MiB (%zu calibration images, and for layer '%s' its "
                "input rows and Hessian) but the budget is %.1f MiB; lower the calibration "
                "images or the layer_obs rows, or raise the memory budget",
                (double)extra / 1048576.0, o->calib_count,
                c->g->params[c->prunable[worst]].name,
                (double)o->obs_memory_budget / 1048576.0);
    }
    if (st == TOP_OK && top_size_add(&c->memory_estimate, c->memory_estimate, extra))
        st = top_error_set(err, TOP_ERR_OVERFLOW, "the memory estimate overflows");
    if (st == TOP_OK && o->finetune)
        st = finetune_memory(c, err);
    return st;
}

/* ---- batch-norm recalibration --------------------------------------------- */

/* Adds the batch mean and unbiased variance of each channel of BN node b's input.
 *   x: (N, C, HW)  sums: (2, C), means then variances */
static void bn_accumulate(double *sums, const pipeline_ctx *c, int b, int n)
{
    const graph_node *nd = &c->g->nodes[b];
    const float *x = graph_node_output(c->g, nd->inputs[0]);
    size_t ch = (size_t)nd->dims[0];
    size_t hw = nd->sample_numel / ch, m = (size_t)n * hw;
    for (size_t k = 0; k < ch; k++) {
        double s = 0.0, ss = 0.0;
        for (int i = 0; i < n; i++) {
            const float *p = x + (size_t)i * nd->sample_numel + k * hw;
            for (size_t j = 0; j < hw; j++)
                s += p[j];
        }
        double mean = s / (double)m;
        for (int i = 0; i < n; i++) {
            const float *p = x + (size_t)i * nd->sample_numel + k * hw;
            for (size_t j = 0; j < hw; j++)
                ss += ((double)p[j] - mean) * ((double)p[j] - mean);
        }
        sums[k] += mean;
        sums[ch + k] += ss / (double)(m - 1);
    }
}

/* Training-mode forwards over the calibration split: every BN normalises with
 * its batch statistics, as in the PyTorch recipe (momentum None), and the
 * running statistics become the average over batches of the batch statistics.
 * A trailing batch of one image is skipped (rank-1 BN needs two values). */
static top_status bn_pass(double **sums, int *batches, pipeline_ctx *c, top_error *err)
{
    const task_split *split = &c->calib.t.calib;
    batch_iter *it = NULL;
    top_status st = batch_iter_new(&it, split, &c->g->preprocess, c->opt->batch_size, err);
    report_progress(c, "bn recalibration", 0, split->count);
    while (st == TOP_OK) {
        const batch *b = NULL;
        st = batch_iter_next(it, &b, err);
        if (st == TOP_OK)
            st = check_cancel(c, err);
        if (st != TOP_OK || b->n == 0)
            break;
        if (b->n < 2 && *batches > 0)
            continue;
        st = graph_forward(c->g, b->x, b->n, GRAPH_MODE_TRAIN, err);
        for (int n = 0, i = 0; st == TOP_OK && i < c->g->n_nodes; i++)
            if (c->g->nodes[i].op == OP_BATCHNORM)
                bn_accumulate(sums[n++], c, i, b->n);
        if (st == TOP_OK) {
            (*batches)++;
            c->bn_images += (size_t)b->n;
        }
        report_progress(c, "bn recalibration", b->first + (size_t)b->n, split->count);
    }
    batch_iter_free(it);
    return st;
}

static top_status bn_stage(pipeline_ctx *c, top_error *err)
{
    int count = 0;
    for (int i = 0; i < c->g->n_nodes; i++)
        count += c->g->nodes[i].op == OP_BATCHNORM;
    double **sums = calloc((size_t)count + 1, sizeof *sums);
    top_status st = sums ? TOP_OK : top_error_set(err, TOP_ERR_NOMEM, "out of memory");
    for (int n = 0, i = 0; st == TOP_OK && i < c->g->n_nodes; i++) {
        if (c->g->nodes[i].op != OP_BATCHNORM)
            continue;
        sums[n] = calloc(2 * (size_t)c->g->nodes[i].dims[0], sizeof(double));
        if (!sums[n++])
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for BN statistics");
    }
    int batches = 0;
    if (st == TOP_OK)
        st = bn_pass(sums, &batches, c, err);
    for (int n = 0, i = 0; st == TOP_OK && batches > 0 && i < c->g->n_nodes; i++) {
        const graph_node *nd = &c->g->nodes[i];
        if (nd->op != OP_BATCHNORM)
            continue;
        size_t ch = (size_t)nd->dims[0];
        float *mean = c->g->params[nd->params[PARAM_MEAN]].value.data;
        float *var = c->g->params[nd->params[PARAM_VAR]].value.data;
        for (size_t k = 0; k < ch; k++) {
            mean[k] = (float)(sums[n][k] / batches);
            var[k] = (float)(sums[n][ch + k] / batches);
        }
        n++;
    }
    c->bn_ran = st == TOP_OK && batches > 0;
    c->bn_layers = count;
    for (int n = 0; sums && n < count; n++)
        free(sums[n]);
    free(sums);
    return st;
}

/* ---- batch-norm correction: match the dense statistics ---------------------- */

static int bn_count(const graph *g)
{
    int count = 0;
    for (int i = 0; i < g->n_nodes; i++)
        count += g->nodes[i].op == OP_BATCHNORM;
    return count;
}

static void bn_stats_free(double **stats, int count)
{
    for (int n = 0; stats && n < count; n++)
        free(stats[n]);
    free(stats);
}

/* Allocates (2, C) doubles per BN node, zeroed. */
static double **bn_stats_new(const graph *g, int count)
{
    double **stats = calloc((size_t)count + 1, sizeof *stats);
    for (int n = 0, i = 0; stats && i < g->n_nodes; i++) {
        if (g->nodes[i].op != OP_BATCHNORM)
            continue;
        stats[n] = calloc(2 * (size_t)g->nodes[i].dims[0], sizeof(double));
        if (!stats[n++]) {
            bn_stats_free(stats, count);
            return NULL;
        }
    }
    return stats;
}

/* Adds the per-channel sum and sum of squares of BN node b's input.
 *   x: (N, C, HW)  acc: (2, C) */
static void bn_add_moments(double *acc, const graph *g, int b, int n)
{
    const graph_node *nd = &g->nodes[b];
    const float *x = graph_node_output(g, nd->inputs[0]);
    size_t ch = (size_t)nd->dims[0], hw = nd->sample_numel / ch;
    for (int i = 0; i < n; i++)
        for (size_t k = 0; k < ch; k++) {
            const float *p = x + (size_t)i * nd->sample_numel + k * hw;
            double sum = 0.0, sq = 0.0;
            for (size_t j = 0; j < hw; j++) {
                sum += p[j];
                sq += (double)p[j] * p[j];
            }
            acc[k] += sum;
            acc[ch + k] += sq;
        }
}

/*
 * Measures the mean and (population) variance of every BN input channel over
 * the calibration split, with the graph in inference mode, into stats.
 */
/* Measures the mean and variance of every BN input up to node `last` over the
 * calibration images into stats (2, C) per BN layer, in graph order; later
 * layers are left as they were. The forwards stop at `last`. */
static top_status bn_measure(double **stats, pipeline_ctx *c, const char *stage, int last,
                             top_error *err)
{
    const task_split *split = &c->calib.t.calib;
    batch_iter *it = NULL;
    size_t images = 0;
    top_status st = batch_iter_new(&it, split, &c->g->preprocess, c->opt->batch_size, err);
    report_progress(c, stage, 0, split->count);
    while (st == TOP_OK) {
        const batch *b = NULL;
        st = batch_iter_next(it, &b, err);
        if (st == TOP_OK)
            st = check_cancel(c, err);
        if (st != TOP_OK || b->n == 0)
            break;
        st = graph_forward_to(c->g, b->x, b->n, GRAPH_MODE_INFERENCE, last, err);
        for (int n = 0, i = 0; st == TOP_OK && i <= last; i++)
            if (c->g->nodes[i].op == OP_BATCHNORM)
                bn_add_moments(stats[n++], c->g, i, b->n);
        images += st == TOP_OK ? (size_t)b->n : 0;
        report_progress(c, stage, b->first + (size_t)b->n, split->count);
    }
    batch_iter_free(it);
    for (int n = 0, i = 0; st == TOP_OK && images && i <= last; i++) {
        if (c->g->nodes[i].op != OP_BATCHNORM)
            continue;
        size_t ch = (size_t)c->g->nodes[i].dims[0];
        double m = (double)images * (double)(c->g->nodes[i].sample_numel / ch);
        for (size_t k = 0; k < ch; k++) {
            double mean = stats[n][k] / m;
            double var = stats[n][ch + k] / m - mean * mean;
            stats[n][k] = mean;
            stats[n][ch + k] = var > 0.0 ? var : 0.0;
        }
        n++;
    }
    c->bn_images = images;
    return st;
}

/* Records the dense model's BN input statistics, before the mask is applied. */
static top_status bn_dense_stage(pipeline_ctx *c, top_error *err)
{
    c->bn_layers = bn_count(c->g);
    c->bn_dense = bn_stats_new(c->g, c->bn_layers);
    if (!c->bn_dense)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for batch-norm statistics");
    return bn_measure(c->bn_dense, c, "bn dense statistics", c->g->n_nodes - 1, err);
}

/*
 * Moves one BN layer's running statistics so that its output on the pruned
 * inputs (mu_p, var_p) has the mean and spread the dense model's output had
 * on its inputs (mu_d, var_d): s' = s sqrt(var_p / var_d), m' = mu_p -
 * (mu_d - m) s' / s, from the original m and v (s = sqrt(v + eps)). Channels
 * whose dense input is constant keep their spread. Returns the largest
 * |mu_p - mu_d| / sqrt(var_d + eps) before the move.
 */
static double bn_match_layer(float *mean, float *var, const float *mean0, const float *var0,
                             const double *dense, const double *pruned, size_t ch, double eps)
{
    double shift = 0.0;
    for (size_t k = 0; k < ch; k++) {
        double mu_d = dense[k], var_d = dense[ch + k];
        double mu_p = pruned[k], var_p = pruned[ch + k];
        double d = fabs(mu_p - mu_d) / sqrt(var_d + eps);
        shift = d > shift ? d : shift;
        double s = sqrt((double)var0[k] + eps);
        /* The spread ratio is clamped to [1/2, 2]: a channel the pruning left
         * (nearly) constant would otherwise be amplified without bound. */
        double ratio = var_d > 1e-12 ? sqrt(var_p / var_d) : 1.0;
        ratio = fmax(0.5, fmin(ratio, 2.0));
        double s_new = s * ratio;
        double v_new = s_new * s_new - eps;
        mean[k] = (float)(mu_p - (mu_d - mean0[k]) * s_new / s);
        var[k] = (float)(v_new > 0.0 ? v_new : 0.0);
    }
    return shift;
}

/* Keeps a copy of every BN layer's original running mean and variance in
 * c->bn_orig (2 per layer), once: the correction moves them from these. */
static top_status bn_save_original(pipeline_ctx *c, top_error *err)
{
    int count = c->bn_layers;
    if (c->bn_orig)
        return TOP_OK;
    c->bn_orig = calloc(2 * (size_t)count + 1, sizeof *c->bn_orig);
    if (!c->bn_orig)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for batch-norm statistics");
    for (int n = 0, i = 0; i < c->g->n_nodes; i++) {
        const graph_node *nd = &c->g->nodes[i];
        if (nd->op != OP_BATCHNORM)
            continue;
        size_t bytes = (size_t)nd->dims[0] * sizeof(float);
        c->bn_orig[2 * n] = malloc(bytes);
        c->bn_orig[2 * n + 1] = malloc(bytes);
        if (!c->bn_orig[2 * n] || !c->bn_orig[2 * n + 1])
            return top_error_set(err, TOP_ERR_NOMEM, "out of memory for batch-norm statistics");
        memcpy(c->bn_orig[2 * n], c->g->params[nd->params[PARAM_MEAN]].value.data, bytes);
        memcpy(c->bn_orig[2 * n + 1], c->g->params[nd->params[PARAM_VAR]].value.data, bytes);
        n++;
    }
    return TOP_OK;
}

static top_status bn_match_stage(pipeline_ctx *c, top_error *err)
{
    int count = c->bn_layers;
    double **pruned = bn_stats_new(c->g, count);
    top_status st =
        pruned ? bn_save_original(c, err)
               : top_error_set(err, TOP_ERR_NOMEM, "out of memory for batch-norm statistics");
    float *const *saved = c->bn_orig;
    /* Gauss-Seidel order: each layer is measured after the layers before it
     * were corrected, so one pass is exact. Correcting every layer from one
     * measurement counts a shift twice (in the layer that causes it and in
     * every layer it reaches) and made accuracy worse than no correction. */
    int *nodes = calloc((size_t)count + 1, sizeof *nodes);
    if (st == TOP_OK && !nodes)
        st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for batch-norm statistics");
    for (int n = 0, i = 0; st == TOP_OK && i < c->g->n_nodes; i++)
        if (c->g->nodes[i].op == OP_BATCHNORM)
            nodes[n++] = i;
    for (int pass = 0; st == TOP_OK && pass < c->opt->bn_passes; pass++) {
        c->bn_max_shift = 0.0;
        for (int n = 0; st == TOP_OK && n < count; n++) {
            bn_stats_free(pruned, count); /* fresh zeroed sums for this layer */
            pruned = bn_stats_new(c->g, count);
            if (!pruned) {
                st = top_error_set(err, TOP_ERR_NOMEM,
                                   "out of memory for batch-norm statistics");
                break;
            }
            st = bn_measure(pruned, c, "bn correction", nodes[n], err);
            if (st != TOP_OK)
                break;
            const graph_node *nd = &c->g->nodes[nodes[n]];
            double shift = bn_match_layer(c->g->params[nd->params[PARAM_MEAN]].value.data,
                                          c->g->params[nd->params[PARAM_VAR]].value.data,
                                          saved[2 * n], saved[2 * n + 1], c->bn_dense[n],
                                          pruned[n], (size_t)nd->dims[0], nd->attrs.eps);
            c->bn_max_shift = shift > c->bn_max_shift ? shift : c->bn_max_shift;
        }
        c->bn_passes_run = pass + 1;
    }
    free(nodes);
    c->bn_ran = st == TOP_OK;
    bn_stats_free(pruned, count);
    return st;
}

/* ---- pruned evaluation and fine-tuning -------------------------------------- */

/* Accuracy of every evaluation task with its dense head on the current
 * weights, into pruned_accuracy or, with finetuned set, finetuned_accuracy. */
static top_status eval_stage(pipeline_ctx *c, int finetuned, top_error *err)
{
    const char *stage = finetuned ? "fine-tuned evaluation" : "pruned evaluation";
    top_status st = TOP_OK;
    for (int i = 0; st == TOP_OK && i < c->opt->n_eval; i++) {
        pipeline_task *pt = &c->eval[i];
        st = extract_features(pt->eval_x, c, &pt->t.eval, stage, err);
        if (st == TOP_OK)
            st =
                ridge_accuracy(finetuned ? &pt->finetuned_accuracy : &pt->pruned_accuracy,
                               &pt->head, pt->eval_x, pt->t.eval.labels, pt->t.eval.count, err);
    }
    return st;
}

static void finetune_progress(void *user, size_t done, size_t total, double loss)
{
    (void)loss;
    report_progress(user, "fine-tuning", done, total);
}

/* Fine-tunes on the split ft_prepare drew, with the calibration task's
 * frozen head (cross_entropy) or towards the dense features (distill). */
static top_status finetune_stage(pipeline_ctx *c, top_error *err)
{
    const pipeline_options *o = c->opt;
    report_progress(c, "fine-tuning", 0, 1);
    int ce = o->ft.loss == FINETUNE_LOSS_CROSS_ENTROPY;
    top_status st = finetune_run(&c->ft, c->g, c->feature, ce ? &c->calib.head : NULL,
                                 c->ft_targets, &c->ft_task.calib, c->prunable, c->n_prunable,
                                 &o->ft, finetune_progress, c, c->cancel, err);
    if (st == TOP_OK)
        c->ft_ran = 1;
    /* Fine-tuning moves the BN inputs again: match the dense statistics anew. */
    if (st == TOP_OK && o->finetune_bn_correction && c->bn_ran && c->bn_dense &&
        !o->ft.bn_train) {
        st = bn_match_stage(c, err);
        c->ft_bn_corrected = st == TOP_OK;
    }
    return st == TOP_OK ? eval_stage(c, 1, err) : st;
}

/* ---- checkpoints ------------------------------------------------------------- */

/* Copies a parameter from the engine layout into its source layout.
 *   HWIO: (K, C, R, S) -> (R, S, C, K)   HWC1: (C, 1, R, S) -> (R, S, C, 1)
 *   IO:   (OUT, IN) -> (IN, OUT) */
static top_status to_source_layout(float *dst, const graph_param *gp, top_error *err)
{
    const tensor *t = &gp->value;
    const float *src = t->data;
    int64_t r = 1, s = 1, ch = 1, k = 1;
    if (gp->layout == PARAM_LAYOUT_SAME) {
        memcpy(dst, src, t->numel * sizeof(float));
        return TOP_OK;
    }
    if (gp->layout == PARAM_LAYOUT_IO && t->ndim == 2) {
        k = t->shape[0];
        ch = t->shape[1];
        for (int64_t o = 0; o < k; o++)
            for (int64_t i = 0; i < ch; i++)
                dst[i * k + o] = src[o * ch + i];
        return TOP_OK;
    }
    if (t->ndim != 4)
        return top_error_set(err, TOP_ERR_SHAPE,
                             "parameter '%s' has rank %d; its source "
                             "layout needs rank 4",
                             gp->name, t->ndim);
    k = t->shape[0];
    ch = gp->layout == PARAM_LAYOUT_HWC1 ? 1 : t->shape[1];
    r = t->shape[2];
    s = t->shape[3];
    for (int64_t a = 0; a < k; a++) /* out channel (or channel for HWC1) */
        for (int64_t b = 0; b < ch; b++)
            for (int64_t y = 0; y < r; y++)
                for (int64_t x = 0; x < s; x++)
                    dst[((y * s + x) * ch + b) * k + a] = src[((a * ch + b) * r + y) * s + x];
    return TOP_OK;
}

/* Writes DIR/dense.safetensors: every parameter under its source name and layout.
 * NOTE: the tests check only zero counts and sums of this file. A manual
 * comparison with the dequantized TF.js weights of MobileNetV2 matched all
 * 266 tensors, but no test compares against the source checkpoint yet. */
static top_status write_dense(const pipeline_ctx *c, const char *path, top_error *err)
{
    st_writer *w = NULL;
    float *buf = NULL;
    top_status st = st_writer_new(&w, err);
    for (int p = 0; st == TOP_OK && p < c->g->n_params; p++) {
        const graph_param *gp = &c->g->params[p];
        buf = malloc(gp->value.numel ? gp->value.numel * sizeof(float) : 1);
        if (!buf) {
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for '%s'", gp->name);
            break;
        }
        st = to_source_layout(buf, gp, err);
        int same = gp->layout == PARAM_LAYOUT_SAME || gp->src_ndim == 0;
        if (st == TOP_OK)
            st = st_writer_add(w, gp->name, ST_DTYPE_F32, same ? gp->value.ndim : gp->src_ndim,
                               same ? gp->value.shape : gp->src_shape, buf,
                               gp->value.numel * sizeof(float), err);
        free(buf);
    }
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "source", c->opt->model_path, err);
    if (st == TOP_OK)
        st = st_writer_write(w, path, err);
    st_writer_free(w);
    return st;
}

/* Writes DIR/compressed.safetensors with engine names and layouts. */
static top_status write_compressed(const pipeline_ctx *c, const char *path, top_error *err)
{
    ckpt_input *in = calloc((size_t)c->g->n_params, sizeof *in);
    if (!in)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the checkpoint list");
    for (int p = 0; p < c->g->n_params; p++) {
        const graph_param *gp = &c->g->params[p];
        in[p] = (ckpt_input){.name = gp->name,
                             .dtype = ST_DTYPE_F32,
                             .ndim = gp->value.ndim,
                             .data = gp->value.data,
                             .bytes = gp->value.numel * sizeof(float)};
        memcpy(in[p].shape, gp->value.shape, sizeof in[p].shape);
    }
    char q[32];
    snprintf(q, sizeof q, "%.6g", c->opt->sparsity);
    const ckpt_metadata_entry meta[] = {
        {"method", pipeline_method_name(c->opt->method)},
        {"sparsity", q},
        {"source", c->opt->model_path},
    };
    top_status st = ckpt_write(path, in, (size_t)c->g->n_params, meta, 3, err);
    free(in);
    return st;
}

static top_status describe_file(json_t *obj, const char *path, top_error *err)
{
    struct stat sb;
    char hex[SHA256_HEX_BYTES];
    if (stat(path, &sb) != 0)
        return top_error_set(err, TOP_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
    top_status st = sha256_file(hex, path, err);
    if (st != TOP_OK)
        return st;
    json_object_set_new(obj, "path", json_string(path));
    json_object_set_new(obj, "bytes", json_integer((json_int_t)sb.st_size));
    json_object_set_new(obj, "sha256", json_string(hex));
    return TOP_OK;
}

/* Copies labels.txt (the class names topiary forward prints) from the source
 * model's folder to out, when there is one; a failure only loses the names. */
static void copy_labels(const char *source_json, const char *out)
{
    char from[4200], to[4200];
    const char *slash = strrchr(source_json, '/');
    int dir_len = slash ? (int)(slash - source_json) : 1;
    snprintf(from, sizeof from, "%.*s/labels.txt", dir_len, slash ? source_json : ".");
    snprintf(to, sizeof to, "%s/labels.txt", out);
    FILE *in = top_fopen_regular(from, NULL); /* a FIFO must not hang the job */
    if (!in)
        return;
    FILE *dst = fopen(to, "wb");
    char buf[4096];
    size_t n;
    while (dst && (n = fread(buf, 1, sizeof buf, in)) > 0)
        if (fwrite(buf, 1, n, dst) != n)
            break;
    if (dst && fclose(dst) != 0)
        unlink(to);
    fclose(in);
}

/* Writes DIR/tfjs/model.json and its one float32 shard for a model that came
 * as a TF.js layers model (a model.json, or a folder holding one), and adds
 * both files to the report as checkpoints.tfjs {path, bytes, sha256, weights}. */
static top_status write_tfjs(pipeline_ctx *c, const char *dir, top_error *err)
{
    const char *model = c->opt->model_path;
    char source[4096], out[4096], path[4200];
    struct stat sb;
    if (stat(model, &sb) == 0 && S_ISDIR(sb.st_mode))
        snprintf(source, sizeof source, "%s/model.json", model);
    else
        snprintf(source, sizeof source, "%s", model);
    snprintf(out, sizeof out, "%s/tfjs", dir);
    json_t *tfjs = json_object(), *shard = json_object();
    json_object_set_new(c->checkpoints, "tfjs", tfjs);
    json_object_set_new(tfjs, "layout", json_string("source"));
    json_object_set_new(tfjs, "weights", shard);
    top_status st = tfjs_export_write(c->g, source, out, err);
    if (st == TOP_OK)
        copy_labels(source, out);
    snprintf(path, sizeof path, "%s/%s", out, TFJS_EXPORT_MODEL_JSON);
    if (st == TOP_OK)
        st = describe_file(tfjs, path, err);
    snprintf(path, sizeof path, "%s/%s", out, TFJS_EXPORT_SHARD);
    if (st == TOP_OK)
        st = describe_file(shard, path, err);
    return st;
}

static top_status checkpoint_stage(pipeline_ctx *c, top_error *err)
{
    const char *dir = c->opt->out_dir;
    if (mkdir(dir, 0777) != 0 && errno != EEXIST)
        return top_error_set(err, TOP_ERR_IO,
                             "cannot create output folder '%s': %s; create "
                             "its parent or pick another path",
                             dir, strerror(errno));
    char path[4096];
    json_t *dense = json_object(), *comp = json_object();
    c->checkpoints = json_object();
    json_object_set_new(c->checkpoints, "dense", dense);
    json_object_set_new(c->checkpoints, "compressed", comp);
    report_progress(c, "checkpoints", 0, 3);
    snprintf(path, sizeof path, "%s/dense.safetensors", dir);
    top_status st = write_dense(c, path, err);
    if (st == TOP_OK)
        st = describe_file(dense, path, err);
    json_object_set_new(dense, "layout", json_string("source"));
    report_progress(c, "checkpoints", 1, 2);
    snprintf(path, sizeof path, "%s/compressed.safetensors", dir);
    if (st == TOP_OK)
        st = write_compressed(c, path, err);
    if (st == TOP_OK)
        st = describe_file(comp, path, err);
    json_object_set_new(comp, "layout", json_string("engine"));
    int tfjs = model_detect_format(c->opt->model_path) == MODEL_FORMAT_TFJS_LAYERS;
    report_progress(c, "checkpoints", 2, 2 + tfjs);
    if (st == TOP_OK && tfjs) {
        st = write_tfjs(c, dir, err);
        report_progress(c, "checkpoints", 3, 3);
    }
    return st;
}

/* ---- report -------------------------------------------------------------------- */

/* Builds the per-layer sparsity entries from zeros counted in the tensors. */
static json_t *report_layers(const pipeline_ctx *c, size_t *zeros_out, size_t *count_out)
{
    json_t *layers = json_array();
    size_t zeros = 0, count = 0;
    for (int l = 0; l < c->n_prunable; l++) {
        const graph_param *gp = &c->g->params[c->prunable[l]];
        size_t z = 0;
        for (size_t i = 0; i < gp->value.numel; i++)
            z += gp->value.data[i] == 0.0f;
        zeros += z;
        count += gp->value.numel;
        json_array_append_new(
            layers, json_pack("{s:s, s:I, s:I, s:f}", "name", gp->name, "count",
                              (json_int_t)gp->value.numel, "zeros", (json_int_t)z, "sparsity",
                              gp->value.numel ? (double)z / (double)gp->value.numel : 0.0));
    }
    *zeros_out = zeros;
    *count_out = count;
    return layers;
}

static json_t *report_task(const pipeline_task *pt, int pruned, int finetuned, int cache_on)
{
    json_t *t = json_pack(
        "{s:s, s:i, s:I, s:I, s:f, s:o, s:o, s:s}", "uri", dataset_uri(pt->ds), "classes",
        pt->t.n_classes, "fit_images", (json_int_t)pt->t.fit.count, "eval_images",
        (json_int_t)pt->t.eval.count, "dense_accuracy", pt->dense_accuracy, "pruned_accuracy",
        pruned ? json_real(pt->pruned_accuracy) : json_null(), "finetuned_accuracy",
        finetuned ? json_real(pt->finetuned_accuracy) : json_null(), "head_cache",
        !cache_on         ? "off"
        : pt->head_cached ? "hit"
                          : "miss");
    if (t && pt->head_cache_warning[0])
        json_object_set_new(t, "head_cache_warning", json_string(pt->head_cache_warning));
    return t;
}

static json_t *report_finetune(const pipeline_ctx *c)
{
    if (!c->ft_ran)
        return json_null();
    const finetune_options *f = &c->opt->ft;
    const finetune_result *r = &c->ft;
    json_t *acc_first =
        isfinite(r->accuracy_first) ? json_real(r->accuracy_first) : json_null();
    json_t *acc_last = isfinite(r->accuracy_last) ? json_real(r->accuracy_last) : json_null();
    return json_pack(
        "{s:I, s:s, s:i, s:I, s:i, s:f, s:s, s:f, s:f, s:s, s:b, s:I, s:I, s:f, "
        "s:f, s:o, s:o}",
        "images", (json_int_t)r->images, "loss", finetune_loss_name(f->loss), "epochs",
        f->epochs, "steps", (json_int_t)r->steps, "batch_size", f->batch_size, "lr", f->lr,
        "schedule", finetune_schedule_name(f->schedule), "momentum", f->momentum,
        "weight_decay", f->weight_decay, "batch_norm", f->bn_train ? "train" : "frozen",
        "bn_correction", c->ft_bn_corrected, "trained_values", (json_int_t)r->trained,
        "masked_values", (json_int_t)r->masked, "loss_first_epoch", r->loss_first,
        "loss_last_epoch", r->loss_last, "train_accuracy_first_epoch", acc_first,
        "train_accuracy_last_epoch", acc_last);
}

static json_t *report_build(const pipeline_ctx *c)
{
    const pipeline_options *o = c->opt;
    size_t zeros, count;
    json_t *r = json_object();
    json_object_set_new(r, "model", json_string(o->model_path));
    json_object_set_new(r, "architecture", json_string(c->g->architecture));
    json_object_set_new(r, "method", json_string(pipeline_method_name(o->method)));
    json_object_set_new(r, "feature_node", json_string(c->g->nodes[c->feature].name));
    json_object_set_new(r, "feature_dim", json_integer((json_int_t)c->dim));
    json_object_set_new(r, "sparsity_requested", json_real(o->sparsity));
    json_t *layers = report_layers(c, &zeros, &count);
    json_object_set_new(r, "sparsity_achieved",
                        json_real(count ? (double)zeros / (double)count : 0.0));
    json_object_set_new(r, "prunable_weights", json_integer((json_int_t)count));
    json_object_set_new(r, "zero_weights", json_integer((json_int_t)zeros));
    json_object_set_new(r, "layers", layers);
    json_object_set_new(r, "memory",
                        json_pack("{s:I, s:I, s:I}", "estimate_bytes",
                                  (json_int_t)c->memory_estimate, "finetune_bytes",
                                  (json_int_t)c->ft_memory, "budget_bytes",
                                  (json_int_t)o->obs_memory_budget));
    if (o->method == PIPELINE_METHOD_OBS)
        json_object_set_new(r, "obs",
                            json_pack("{s:I, s:b, s:I, s:I, s:i, s:I}", "block_size",
                                      (json_int_t)o->obs_block, "obs_update", o->obs_update,
                                      "memory_bytes", (json_int_t)c->obs_memory,
                                      "memory_budget_bytes", (json_int_t)o->obs_memory_budget,
                                      "cholesky_retries", c->obs_damping.retries, "blocks",
                                      (json_int_t)c->obs_damping.blocks));
    if (o->method == PIPELINE_METHOD_LAYER_OBS)
        json_object_set_new(
            r, "layer_obs",
            json_pack("{s:s, s:I, s:f, s:s, s:i, s:I, s:I}", "allocation",
                      pipeline_allocation_name(o->allocation), "max_rows",
                      (json_int_t)o->layer_obs_rows, "damping", o->layer_obs_damping, "inputs",
                      o->layer_obs_sequential ? "sequential" : "dense", "cholesky_retries",
                      c->obs_damping.retries, "hessians", (json_int_t)c->obs_damping.blocks,
                      "rows_used", (json_int_t)c->layer_obs_rows_used));
    if (o->method == PIPELINE_METHOD_OBD || o->method == PIPELINE_METHOD_OBS)
        json_object_set_new(
            r, "damping",
            json_pack("{s:s, s:f, s:f}", "mode",
                      o->damping_mode == PIPELINE_DAMPING_ABSOLUTE ? "absolute" : "relative",
                      "value", o->damping, "lambda", c->lambda));
    char nm_text[32];
    snprintf(nm_text, sizeof nm_text, "%d:%d", o->nm_n, o->nm_m);
    json_object_set_new(r, "mask",
                        json_pack("{s:s, s:s, s:f, s:i, s:s?, s:s?}", "scope",
                                  c->opt->scope == PRUNE_SCOPE_GLOBAL ? "global" : "per_layer",
                                  "nm", c->opt->nm_m ? nm_text : "unstructured", "min_density",
                                  c->opt->min_density, "rounds", c->opt->rounds, "layers",
                                  c->opt->layers, "skip_layers", c->opt->skip_layers));
    const char *bn_mode = !c->bn_ran                                   ? "none"
                          : c->opt->bn_mode == PIPELINE_BN_MATCH_DENSE ? "match_dense"
                                                                       : "reestimate";
    json_object_set_new(r, "bn_recalibration",
                        json_pack("{s:b, s:s, s:i, s:I, s:i, s:f}", "ran", c->bn_ran, "mode",
                                  bn_mode, "layers", c->bn_layers, "images",
                                  (json_int_t)c->bn_images, "passes", c->bn_passes_run,
                                  "max_mean_shift", c->bn_max_shift));
    json_object_set_new(
        r, "calibration",
        c->calib.ds ? json_pack("{s:s, s:s, s:I, s:I}", "uri", dataset_uri(c->calib.ds), "head",
                                o->calib_model_head ? "model" : "ridge", "calibration_images",
                                (json_int_t)c->calib.t.calib.count, "fit_images",
                                (json_int_t)(c->calib.head.coef ? c->calib.t.fit.count : 0))
                    : json_null());
    json_object_set_new(r, "finetune", report_finetune(c));
    json_t *tasks = json_array();
    for (int i = 0; i < o->n_eval; i++)
        json_array_append_new(
            tasks, report_task(&c->eval[i], 1, c->ft_ran, o->head_cache_dir != NULL));
    json_object_set_new(r, "tasks", tasks);
    json_t *t = json_object();
    for (int i = 0; i <= T_TOTAL; i++)
        json_object_set_new(t, timing_names[i], json_real(c->timings[i]));
    json_object_set_new(r, "timings_s", t);
    json_object_set_new(r, "checkpoints",
                        c->checkpoints ? json_incref(c->checkpoints) : json_null());
    return r;
}

/* ---- removing outputs -------------------------------------------------------------- */

/* Unlinks every entry of dir that is not a folder; the folder stays. */
static void remove_files_in(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return;
    int fd = dirfd(d);
    for (struct dirent *e; (e = readdir(d)) != NULL;) {
        struct stat sb;
        if (fstatat(fd, e->d_name, &sb, AT_SYMLINK_NOFOLLOW) == 0 && !S_ISDIR(sb.st_mode))
            unlinkat(fd, e->d_name, 0);
    }
    closedir(d);
}

void pipeline_remove_outputs(const char *out_dir)
{
    char tfjs[4200];
    snprintf(tfjs, sizeof tfjs, "%s/tfjs", out_dir);
    remove_files_in(tfjs);
    rmdir(tfjs);
    remove_files_in(out_dir);
    rmdir(out_dir);
}

/* ---- the job ------------------------------------------------------------------- */

static void task_release(pipeline_task *pt)
{
    ridge_model_free(&pt->head);
    free(pt->fit_x);
    free(pt->eval_x);
    if (pt->ds)
        task_free(&pt->t);
    dataset_close(pt->ds);
}

static top_status run_stages(pipeline_ctx *c, top_error *err)
{
    double t0 = now_s();
    report_progress(c, "load", 0, 1);
    top_status st = load_model(c, err);
    if (st == TOP_OK)
        st = memory_stage(c, err);
    c->timings[T_LOAD] = now_s() - t0;

    t0 = now_s();
    if (st == TOP_OK)
        st = dense_stage(c, err);
    c->timings[T_DENSE] = now_s() - t0;
    int bn =
        c->opt->bn_recalibration < 0 ? c->opt->calib_uri != NULL : c->opt->bn_recalibration;
    int match = bn && c->opt->bn_mode == PIPELINE_BN_MATCH_DENSE;
    t0 = now_s();
    if (st == TOP_OK && match)
        st = bn_dense_stage(c, err);
    double dense_bn_time = now_s() - t0;
    /* Iterative rounds: density k^(r/R); the last round hits q exactly. */
    for (int r = 1; st == TOP_OK && r <= c->opt->rounds; r++) {
        double q = r == c->opt->rounds ? c->opt->sparsity
                                       : 1.0 - prune_schedule_density(1.0 - c->opt->sparsity, r,
                                                                      c->opt->rounds);
        st = c->opt->method == PIPELINE_METHOD_LAYER_OBS ? layer_obs_stage(c, q, err)
                                                         : prune_stage(c, q, err);
    }

    t0 = now_s();
    if (st == TOP_OK && bn)
        st = match ? bn_match_stage(c, err) : bn_stage(c, err);
    c->timings[T_BN] = now_s() - t0 + dense_bn_time;

    t0 = now_s();
    if (st == TOP_OK)
        st = eval_stage(c, 0, err);
    c->timings[T_PRUNED] = now_s() - t0;

    t0 = now_s();
    if (st == TOP_OK && c->opt->finetune)
        st = finetune_stage(c, err);
    c->timings[T_FT] = now_s() - t0;

    t0 = now_s();
    if (st == TOP_OK && c->opt->out_dir)
        st = checkpoint_stage(c, err);
    c->timings[T_CKPT] = now_s() - t0;
    return st;
}

top_status pipeline_run(json_t **report, graph **pruned, const pipeline_options *opt,
                        pipeline_progress_fn progress, void *user, const volatile int *cancel,
                        top_error *err)
{
    if (!report || !opt)
        return top_error_set(err, TOP_ERR_INVALID, "pipeline_run: report or options is NULL");
    *report = NULL;
    if (pruned)
        *pruned = NULL;
    top_status st = validate_options(opt, err);
    if (st != TOP_OK)
        return st;

    pipeline_ctx c = {.opt = opt, .progress = progress, .user = user, .cancel = cancel};
    double t0 = now_s();
    st = run_stages(&c, err);
    c.timings[T_TOTAL] = now_s() - t0;
    if (st == TOP_OK) {
        *report = report_build(&c);
        if (!*report)
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the report");
    }
    if (st == TOP_OK && pruned) {
        *pruned = c.g;
        c.g = NULL;
    }
    if (c.ft_task_made)
        task_free(&c.ft_task);
    free(c.ft_targets);
    task_release(&c.calib);
    for (int i = 0; i < PIPELINE_MAX_EVAL_TASKS; i++)
        task_release(&c.eval[i]);
    json_decref(c.checkpoints);
    bn_stats_free(c.bn_dense, c.bn_layers);
    for (int n = 0; c.bn_orig && n < 2 * c.bn_layers; n++)
        free(c.bn_orig[n]);
    free(c.bn_orig);
    free(c.prunable);
    graph_free(c.g);
    return st;
}
