/*
 * The offline pruning job: load a model, fit ridge heads on the dense model's
 * features, score the prunable weights, prune to a target sparsity,
 * recalibrate batch norm, evaluate the pruned model zero-shot with the frozen
 * dense heads, and write checkpoints. One call runs one job from start to end.
 *
 * Steps (pipeline_run):
 *   1. model_load; the feature node is the backbone's pooled output (the last
 *      global average pool, or the flatten after the last pool), or a named node.
 *   2. per evaluation task: dense features of the head-fit split -> ridge_fit
 *      -> dense accuracy on the evaluation split; the head is kept frozen.
 *      With head_cache_dir, the head and the dense accuracy are read from
 *      there when a job with the same model, feature node, input size, task,
 *      splits, seed and ridge options stored them (head_cache.h).
 *   3. saliency over the prunable weights (conv and dense weights of nodes
 *      before the feature node, without the first conv):
 *        magnitude  |w|
 *        obd        0.5 w^2 (F_ii + lambda), F_ii = mean over calibration
 *                   images of the squared per-sample gradient of the
 *                   cross-entropy of the calibration task's ridge head
 *                   (softmax over its decision scores); lambda = damping *
 *                   mean(F) (relative, default 1e-3) or damping (absolute)
 *        data_free  0.5 w^2 E[x_j^2], with E[x_j^2] the second moment of the
 *                   weight's input feature predicted from the batch-norm
 *                   statistics alone (datafree.h); no data
 *   4. a mask (prune_mask_compute): global or per-layer ranking, unstructured or
 *      N:M, a minimum density per layer; pruned weights = +0.0. With R rounds,
 *      steps 3 and 4 repeat with sparsity 1 - k^(r/R), k = 1 - q, r = 1..R;
 *      pruned weights score 0 and stay pruned.
 *   5. batch-norm correction from the calibration images (no labels), in
 *      one of two modes:
 *      match_dense (default): before pruning, the mean mu_d and variance
 *        var_d of every BN input channel are measured on the dense model;
 *        after pruning, the pruned model's mu_p and var_p. Each BN is moved
 *        so that its output on the calibration data has the dense model's
 *        mean and spread: s' = s * sqrt(var_p / var_d) with s = sqrt(v + eps),
 *        m' = mu_p - (mu_d - m) * s' / s, with sqrt(var_p / var_d) clamped
 *        to [1/2, 2]. Layers are corrected one at a time in graph order, each
 *        measured after the ones before it were corrected (one forward pass
 *        over the calibration images per BN layer, stopped at that layer), so
 *        one pass is exact;
 *        `bn_passes` repeats the sweep. The report gives the largest mean
 *        shift corrected in the last sweep.
 *      reestimate: running mean and variance = the average of the per-batch
 *        mean and unbiased variance of each BN input, in one training-mode
 *        pass (PyTorch's recipe). NOTE: the dense heads were fitted with the
 *        original statistics, and re-estimating them on gray digit or
 *        clothing images moves the features away from those heads. Measured
 *        on MobileNetV2 with 100 head-fit and 100 evaluation digits: 0.81
 *        dense, 0.21 after re-estimation alone (q = 0).
 *   6. pruned accuracy of every evaluation task with its dense head
 *   7. optional masked fine-tuning (finetune.h) on finetune_count labeled
 *      images of the calibration task, drawn like its calibration split
 *      from its training images, with the calibration task's frozen ridge
 *      head; then every evaluation task again with its dense head
 *   8. a JSON report; optional dense and compressed checkpoints (of the
 *      fine-tuned model when fine-tuning ran)
 *
 * Split sizes are totals over the task's classes: each class gets
 * ceil(count / classes) images and the shuffled split is cut to count.
 *
 * No global state; progress goes to a callback and the job polls a cancel
 * flag between batches. One job uses its own graph; jobs may run on several
 * threads at once.
 */
#ifndef TOPIARY_PIPELINE_H
#define TOPIARY_PIPELINE_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "finetune.h"
#include "graph.h"
#include "prune.h"
#include "status.h"

#define PIPELINE_MAX_EVAL_TASKS 16

typedef enum pipeline_method {
    PIPELINE_METHOD_MAGNITUDE,
    PIPELINE_METHOD_OBD,
    PIPELINE_METHOD_OBS,       /* block OBS (WoodFisher) */
    PIPELINE_METHOD_LAYER_OBS, /* layer-wise OBS (SparseGPT style) */
    PIPELINE_METHOD_DATA_FREE, /* 0.5 w^2 E[x^2], E[x^2] from BN statistics (datafree.h) */
} pipeline_method;

/* How layer_obs picks each layer's density. */
typedef enum pipeline_allocation {
    PIPELINE_ALLOC_MAGNITUDE, /* densities of the global magnitude mask */
    PIPELINE_ALLOC_OBD,       /* densities of the global obd mask */
    PIPELINE_ALLOC_UNIFORM,   /* the requested sparsity in every layer */
} pipeline_allocation;

#define PIPELINE_OBS_BLOCK_MAX 1024
#define PIPELINE_LAYER_OBS_ROWS_MAX 1048576

typedef enum pipeline_damping {
    PIPELINE_DAMPING_RELATIVE, /* lambda = damping * mean(F) over prunable weights */
    PIPELINE_DAMPING_ABSOLUTE, /* lambda = damping */
} pipeline_damping;

typedef enum pipeline_bn_mode {
    PIPELINE_BN_MATCH_DENSE, /* match the dense model's BN input statistics */
    PIPELINE_BN_REESTIMATE,  /* re-estimate running statistics from the data */
} pipeline_bn_mode;

typedef struct pipeline_options {
    const char *model_path;
    const char *feature_node; /* NULL: the pooled backbone output */
    pipeline_method method;
    double sparsity; /* q in [0, 1) */

    const char *calib_uri;  /* NULL: no calibration task */
    size_t calib_count;     /* calibration images */
    size_t calib_fit_count; /* head-fit images of the calibration task (obd) */
    int calib_model_head;   /* the saliency loss is the cross-entropy of the model's own
                               output (the task is in its label space), not of a ridge
                               head fitted on the task (0) */

    const char *eval_uris[PIPELINE_MAX_EVAL_TASKS];
    int n_eval;
    size_t eval_fit_count; /* head-fit images per evaluation task */
    size_t eval_count;     /* evaluation images per evaluation task */

    uint64_t seed;
    double ridge_alpha; /* > 0; 1.0 is scikit-learn's default */
    int ridge_balanced; /* balanced class weights */
    pipeline_damping damping_mode;
    double damping;                 /* see pipeline_damping; >= 0 */
    prune_scope scope;              /* global ranking (default) or per layer */
    int nm_n, nm_m;                 /* N:M pattern; nm_m = 0: unstructured */
    double min_density;             /* each layer keeps >= this fraction; 0: off */
    int rounds;                     /* R: prune to 1 - k^(r/R), r = 1..R, rescoring */
    int bn_recalibration;           /* -1: on iff a calibration task is given */
    pipeline_bn_mode bn_mode;       /* how the correction moves the statistics */
    int bn_passes;                  /* match_dense passes, 1..16 (default 1) */
    int batch_size;                 /* images per forward (not obd, which uses 1) */
    size_t obs_block;               /* obs: weights per Fisher block, 1..1024 (64) */
    int obs_update;                 /* obs: apply the OBS update to kept weights (1) */
    size_t obs_memory_budget;       /* obs: bytes of gradients and work allowed (4 GiB) */
    pipeline_allocation allocation; /* layer_obs: per-layer densities (magnitude) */
    size_t layer_obs_rows;          /* layer_obs: calibration rows per layer, 16..2^20 */
    double layer_obs_damping;       /* layer_obs: relative damping of H (0.01) */
    int layer_obs_sequential;       /* layer_obs: inputs from the partly pruned model (1)
                                       or from the dense model (0) */
    int finetune;                   /* masked fine-tuning on the calibration task (0) */
    size_t finetune_count;          /* fine-tuning images of the calibration task (512) */
    finetune_options ft;            /* finetune_options_init's defaults */
    int finetune_bn_correction;     /* match_dense again after fine-tuning (1) */
    const char *layers;             /* comma-separated globs of weights to prune; NULL: every
                                       conv and dense weight before the feature node but the
                                       first conv */
    const char *skip_layers;    /* comma-separated globs of weights never to prune, or NULL */
    const char *head_cache_dir; /* NULL: heads are not cached between jobs */
    const char *out_dir;        /* NULL: no checkpoints */
} pipeline_options;

/* Fills the defaults: magnitude, q = 0.5, alpha 1.0, balanced, relative
 * damping 1e-3, BN recalibration automatic, batch 16, seed 0. */
void pipeline_options_init(pipeline_options *opt);

/* Static names: "magnitude", "obd", "obs", "layer_obs", "data_free"; and "magnitude",
 * "obd", "uniform". */
const char *pipeline_method_name(pipeline_method m);
const char *pipeline_allocation_name(pipeline_allocation a);

/* Called at the start of every stage and after each batch: the stage name
 * ("dense features", "saliency", ...) and done out of total units. */
typedef void (*pipeline_progress_fn)(void *user, const char *stage, size_t done, size_t total);

/*
 * Runs one job. On success *report is a new JSON object the caller owns
 * (json_decref), and if pruned is non-NULL *pruned is the pruned graph, which
 * the caller frees. progress and cancel may be NULL; a raised *cancel makes
 * the job stop with TOP_ERR_CANCELLED at the next batch.
 *
 * Report keys: model, architecture, method, feature_node, feature_dim,
 * sparsity_requested, sparsity_achieved (zeros counted in the tensors),
 * prunable_weights, zero_weights, layers [{name, count, zeros, sparsity}],
 * mask {scope, nm, min_density, rounds}, damping (obd), bn_recalibration {ran, mode, layers,
 * images, passes, max_mean_shift}, calibration, tasks [{uri, classes, fit_images, eval_images,
 * dense_accuracy, pruned_accuracy, finetuned_accuracy (null without fine-tuning),
 * head_cache ("hit", "miss" or "off"), head_cache_warning (only when the cache failed)}],
 * finetune (null, or {images, epochs, steps, batch_size, lr, schedule, momentum, weight_decay,
 * batch_norm, trained_values, masked_values, loss_first_epoch, loss_last_epoch,
 * train_accuracy_first_epoch, train_accuracy_last_epoch}), timings_s, checkpoints (with --out:
 * dense and compressed, each {path, bytes, sha256}).
 */
top_status pipeline_run(json_t **report, graph **pruned, const pipeline_options *opt,
                        pipeline_progress_fn progress, void *user, const volatile int *cancel,
                        top_error *err);

/*
 * Removes the checkpoint folder a job wrote (out_dir): every file in it and
 * in its tfjs/ folder, left-over temporary files included, then both
 * folders. Other subfolders and their files stay. Errors are ignored: a file
 * that cannot be removed stays, and so does its folder.
 */
void pipeline_remove_outputs(const char *out_dir);

#endif
