/*
 * Numeric building blocks of second-order pruning, on plain arrays: keep
 * masks from saliency scores, saliency formulas (magnitude, OBD, block OBS),
 * the multi-weight OBS update, and layer-wise OBS in the SparseGPT style.
 * Nothing here depends on the model graph: callers pass weights, gradients and
 * calibration inputs as row-major float arrays.
 *
 *   masks      prune_mask.c       global or per-layer, unstructured or N:M
 *   saliency   prune_obs.c        |w|, 0.5 w^2 (F_ii + lambda), w^2 / (2 [F^-1]_ii)
 *   layer OBS  prune_layer_obs.c  H = 2 X^T X / n, column-wise pruning with
 *                                 error propagation through chol(H^-1)
 *
 * Factorisations (Fisher blocks, layer Hessians) run in double precision;
 * weights, scores and gradients stay float32. A mask byte is 1 for a kept
 * weight and 0 for a pruned one. All functions are reentrant: no global
 * state, and the caller owns every buffer passed in. OpenBLAS may use its own
 * threads inside a factorisation.
 */
#ifndef TOPIARY_PRUNE_H
#define TOPIARY_PRUNE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* ---- masks (prune_mask.c) ------------------------------------------------ */

/*
 * One prunable layer: `count` scores in row-major (rows, cols) order, where
 * cols is the input dimension (for a conv weight (K, C, R, S), cols = C*R*S).
 * Higher scores are kept. `mask` (count bytes) is written by prune_mask_compute.
 */
typedef struct prune_layer {
    const float *scores;
    uint8_t *mask;
    size_t count;
    size_t cols; /* row length; N:M groups never cross a row */
} prune_layer;

typedef enum prune_scope {
    PRUNE_SCOPE_GLOBAL = 0,    /* one ranking across all layers */
    PRUNE_SCOPE_PER_LAYER = 1, /* the same sparsity in every layer */
} prune_scope;

#define PRUNE_NM_MAX_GROUP 64

typedef struct prune_mask_options {
    double sparsity; /* q in [0, 1]: fraction of weights pruned */
    prune_scope scope;
    int nm_n, nm_m;     /* N:M (keep at most N of every M); nm_m = 0 is unstructured */
    double min_density; /* each layer keeps >= ceil(min_density * count); 0 disables */
} prune_mask_options;

/*
 * Computes keep masks for all layers.
 *
 * Ranking: a weight is pruned before another if its score is lower; equal
 * scores are pruned in ascending (layer index, weight index) order. Keeping
 * runs in the reverse order. The selection counts exactly, with no float
 * threshold, so the result is deterministic.
 *
 * Counts: with P = round(q * total), global scope prunes exactly P weights
 * unless the min-density floors (ceil each) require keeping more, in which
 * case it prunes fewer, by less than one weight per layer. Per-layer scope
 * prunes round(q * count) in each layer (clamped by the floor).
 *
 * N:M: in every group of M consecutive weights of a row, only the N best may
 * be kept (a shorter tail group also keeps at most N). The remaining weights
 * are then ranked as above, so q must be at least the sparsity N:M forces;
 * q = 1 - N/M gives exact N:M.
 *
 * Errors: TOP_ERR_INVALID for q or min_density outside [0, 1], min_density
 * above 1 - q, q below the N:M sparsity, an N:M pattern with N >= M or
 * M > PRUNE_NM_MAX_GROUP, a NaN score (message names layer and index), or
 * count not a multiple of cols.
 */
top_status prune_mask_compute(prune_layer *layers, size_t n_layers,
                              const prune_mask_options *opt, top_error *err);

/*
 * Density after round r of R of an iterative schedule toward the final
 * density k = 1 - q: k_r = k^(r / R), so each round removes the same
 * fraction of the remaining weights. r = R gives k, r = 0 gives 1.
 */
double prune_schedule_density(double final_density, int round, int rounds);

/* ---- saliency and block OBS (prune_obs.c) --------------------------------- */

/* Damping actually used by a factorisation, after retries. */
typedef struct obs_damping {
    double lambda; /* final damping added to the diagonal */
    int retries;   /* Cholesky failures retried with lambda *= 10 */
    size_t blocks; /* blocks (or Hessians) factorised */
} obs_damping;

#define OBS_MAX_RETRIES 6

/* scores[i] = |w[i]|.  w, scores: (n) */
void prune_saliency_magnitude(float *scores, const float *w, size_t n);

/* scores[i] = 0.5 * w[i]^2 * (fisher_diag[i] + lambda).  all: (n)
 * fisher_diag is the mean over samples of the squared per-sample gradient. */
top_status prune_saliency_obd(float *scores, const float *w, const float *fisher_diag, size_t n,
                              double lambda, top_error *err);

/*
 * Empirical Fisher of one block: f = (1/N) G^T G, where G is the (N, b) slice
 * of a gradient matrix whose rows are ld floats apart. Accumulates in double.
 *   f: (b, b)  work: n_samples * b doubles
 */
void obs_fisher_block(double *f, const float *grads, size_t ld, size_t n_samples, size_t b,
                      double *work);

/*
 * Replaces the symmetric (b, b) matrix a by (a + lambda I)^-1 (full matrix,
 * both triangles) using dpotrf + dpotri. A failed Cholesky (info > 0) is
 * retried on the original matrix with lambda *= 10, up to OBS_MAX_RETRIES
 * times; a lambda of 0 is first raised to 1e-8 * mean(diag(a)) (or 1e-8 if
 * that mean is 0). The used lambda and the retries are added to *damping
 * (may be NULL). work: b * b doubles. TOP_ERR_NUMERIC after the last retry.
 */
top_status obs_invert_spd(double *a, size_t b, double lambda, obs_damping *damping,
                          double *work, top_error *err);

/* scores[i] = w[i]^2 / (2 finv[i][i]).  w, scores: (b)  finv: (b, b) */
void obs_block_saliency(float *scores, const float *w, const double *finv, size_t b);

/*
 * Multi-weight OBS update of one block: with P the indices where mask is 0,
 * w += -finv[:, P] (finv[P, P])^-1 w[P], then w[P] = 0 exactly. This is the
 * minimiser of 0.5 d^T F d subject to (w + d)[P] = 0.
 *   w: (b) in/out  mask: (b)  finv: (b, b)
 *   work: b * b + 2 * b doubles.
 */
top_status obs_block_update(float *w, const uint8_t *mask, const double *finv, size_t b,
                            double *work, top_error *err);

/*
 * Block OBS over one layer of `count` weights, in blocks of `block`
 * consecutive weights (the last block may be shorter). grads: (n_samples,
 * count) per-sample gradients, row-major. The Fisher of each block gets
 * damping lambda before inversion. Allocates its own workspace
 * (obs_memory_estimate gives the size).
 *   obs_layer_saliency writes scores: (count).
 *   obs_layer_update applies the OBS update of each block to w given mask.
 * Dead features (all-zero gradient columns) are handled by the damping.
 */
top_status obs_layer_saliency(float *scores, const float *w, const float *grads, size_t count,
                              size_t n_samples, size_t block, double lambda,
                              obs_damping *damping, top_error *err);
top_status obs_layer_update(float *w, const uint8_t *mask, const float *grads, size_t count,
                            size_t n_samples, size_t block, double lambda, obs_damping *damping,
                            top_error *err);

/* Memory needed by block OBS over layers of the given sizes (bytes). */
typedef struct obs_memory {
    size_t gradients; /* n_samples * total float per-sample gradients */
    size_t scores;    /* total floats */
    size_t workspace; /* the largest layer's block workspace */
    size_t total;
} obs_memory;

/*
 * Estimates the memory of block OBS with per-sample gradients held for every
 * layer at once. TOP_ERR_OVERFLOW if a product overflows; TOP_ERR_LIMIT if
 * total exceeds budget_bytes (0 = no budget), with a message that names the
 * need, the budget, and what to lower (samples, block size, or method).
 */
top_status obs_memory_estimate(obs_memory *out, const size_t *layer_counts, size_t n_layers,
                               size_t block, size_t n_samples, size_t budget_bytes,
                               top_error *err);

/* ---- layer-wise OBS (prune_layer_obs.c) ------------------------------------ */

typedef struct layer_obs_options {
    double sparsity;            /* fraction of the layer's weights pruned, [0, 1] */
    int nm_n, nm_m;             /* N:M per row instead of sparsity (then sparsity must be 0) */
    size_t block;               /* columns per lazy-update block (SparseGPT uses 128) */
    double damping;             /* relative: H += damping * mean(diag H) * I (0.01 typical) */
    const volatile int *cancel; /* polled between blocks; nonzero stops (may be NULL) */
} layer_obs_options;

/*
 * Prunes a linear layer W (rows, cols) against calibration inputs X (n, cols)
 * as SparseGPT does:
 *   H = 2 X^T X / n + damping * mean(diag H) I,  U = upper Cholesky of H^-1
 *   for each block of columns: choose the block's mask over all rows by the
 *   lowest w^2 / U_jj^2, then per column j prune, err = (w_j - q_j) / U_jj,
 *   and subtract err * U[j, j+1:] from the later columns.
 * The count is exact: blocks prune round(q * rows * c_end) -
 * round(q * rows * c_begin) weights, which sums to round(q * rows * cols).
 * Pruned weights are exactly 0; mask (rows, cols) is written (1 = kept).
 * With N:M, each row keeps at most N of every M columns instead (block must
 * be a multiple of M), chosen at the first column of each group.
 * Returns TOP_ERR_CANCELLED (w partly updated) if *cancel becomes nonzero.
 *
 * Dead inputs (an all-zero column of X, so H_jj = 0) are handled by the
 * damping alone: their inverse-Hessian diagonal is large, so their weights
 * score low and are pruned first, and the count stays exact. (SparseGPT
 * instead sets H_jj = 1 and zeroes W[:, j], which prunes extra weights.)
 *
 * Convolutions: pass the im2col'd input, X: (n * P * Q, C * R * S), with W
 * as (K, C * R * S). Depthwise convolutions have one small Hessian per
 * channel: call once per channel with W (1, R * S) and that channel's X.
 */
/* Bytes of workspace layer_obs_prune allocates for a (rows, cols) layer with
 * lazy-update blocks of `block` columns (the Hessian and its inverse
 * dominate: 2 cols^2 doubles). */
top_status layer_obs_workspace_bytes(size_t *bytes, size_t rows, size_t cols, size_t block,
                                     top_error *err);

top_status layer_obs_prune(float *w, uint8_t *mask, const float *x, size_t rows, size_t cols,
                           size_t n, const layer_obs_options *opt, obs_damping *damping,
                           top_error *err);

/* Computes *out = ||W X^T - W' X^T||_F^2, accumulated in double.
 *   w, w_pruned: (rows, cols)  x: (n, cols) */
top_status layer_obs_reconstruction_error(double *out, const float *w, const float *w_pruned,
                                          const float *x, size_t rows, size_t cols, size_t n,
                                          top_error *err);

#endif
