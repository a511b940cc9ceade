/*
 * Saliency scores and the block OBS (WoodFisher) update.
 *
 *   magnitude  s_i = |w_i|
 *   OBD        s_i = 0.5 w_i^2 (F_ii + lambda)
 *   block OBS  F_B = (1/N) G_B^T G_B + lambda I,  s_i = w_i^2 / (2 [F_B^-1]_ii)
 *   update     delta = -F^-1[:, P] (F^-1[P, P])^-1 w_P,  then w_P = 0
 *
 * G is the (N, count) matrix of per-sample gradients of one layer, row-major;
 * block b covers the columns [b * B, min((b + 1) * B, count)). Fisher blocks,
 * their inverses and the update are computed in double; weights, gradients
 * and scores are float32. LAPACK is called in column-major order on the
 * symmetric matrices, which is the same memory as row-major.
 *
 * Reentrant. Blocks are processed one after another; NOTE: a layer with
 * many blocks is not parallelised here (OpenBLAS threads the factorisations).
 */
#include "prune.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Legend: N samples, b block length (<= B), P pruned indices of a block. */

void prune_saliency_magnitude(float *scores, const float *w, size_t n)
{
    /* w, scores: (n) */
    for (size_t i = 0; i < n; i++)
        scores[i] = fabsf(w[i]);
}

top_status prune_saliency_obd(float *scores, const float *w, const float *fisher_diag, size_t n,
                              double lambda, top_error *err)
{
    /* w, fisher_diag, scores: (n) */
    if (!(lambda >= 0.0 && isfinite(lambda)))
        return top_error_set(err, TOP_ERR_INVALID, "damping lambda %g must be finite and >= 0",
                             lambda);
    for (size_t i = 0; i < n; i++) {
        double wi = w[i];
        scores[i] = (float)(0.5 * wi * wi * ((double)fisher_diag[i] + lambda));
    }
    return TOP_OK;
}

/* Copies the upper triangle of a symmetric row-major (b, b) matrix to the
 * lower one. */
static void mirror_upper(double *a, size_t b)
{
    for (size_t i = 0; i < b; i++)
        for (size_t j = 0; j < i; j++)
            a[i * b + j] = a[j * b + i];
}

void obs_fisher_block(double *f, const float *grads, size_t ld, size_t n_samples, size_t b,
                      double *work)
{
    /* grads: (N, ld), block columns [0, b)  work: (N, b)  f: (b, b) */
    for (size_t s = 0; s < n_samples; s++)
        for (size_t j = 0; j < b; j++)
            work[s * b + j] = grads[s * ld + j];

    double scale = n_samples ? 1.0 / (double)n_samples : 0.0;
    memset(f, 0, b * b * sizeof *f);
    if (n_samples > 0)
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)b, (int)n_samples, scale, work,
                    (int)b, 0.0, f, (int)b);

    /* dsyrk fills the upper triangle only. */
    mirror_upper(f, b);
}

top_status obs_invert_spd(double *a, size_t b, double lambda, obs_damping *damping,
                          double *work, top_error *err)
{
    /* a: (b, b) symmetric, in/out  work: (b, b) */
    if (b == 0)
        return TOP_OK;
    if (!(lambda >= 0.0 && isfinite(lambda)))
        return top_error_set(err, TOP_ERR_INVALID, "damping lambda %g must be finite and >= 0",
                             lambda);
    double mean_diag = 0.0;
    for (size_t i = 0; i < b * b; i++)
        if (!isfinite(a[i]))
            return top_error_set(err, TOP_ERR_NUMERIC,
                                 "matrix entry (%zu, %zu) is %g; check the gradients for "
                                 "NaN or Inf",
                                 i / b, i % b, a[i]);
    for (size_t i = 0; i < b; i++)
        mean_diag += a[i * b + i] / (double)b;
    memcpy(work, a, b * b * sizeof *a);

    /* Factorise a + lambda I; on failure retry with 10x the damping. */
    lapack_int info = 0;
    int retries = 0;
    for (;;) {
        memcpy(a, work, b * b * sizeof *a);
        for (size_t i = 0; i < b; i++)
            a[i * b + i] += lambda;
        info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', (lapack_int)b, a, (lapack_int)b);
        if (info == 0)
            info = LAPACKE_dpotri(LAPACK_COL_MAJOR, 'U', (lapack_int)b, a, (lapack_int)b);
        if (info <= 0 || retries == OBS_MAX_RETRIES)
            break;
        retries++;
        lambda = lambda > 0.0 ? lambda * 10.0 : (mean_diag > 0.0 ? 1e-8 * mean_diag : 1e-8);
    }

    if (damping) {
        damping->retries += retries;
        damping->blocks++;
        if (lambda > damping->lambda)
            damping->lambda = lambda;
    }
    if (info != 0)
        return top_error_set(err, TOP_ERR_NUMERIC,
                             "matrix of size %zu is not positive definite at index %d after "
                             "%d retries (damping %g); raise the damping",
                             b, (int)info - 1, retries, lambda);
    /* Column-major upper is row-major lower; fill the other triangle. */
    for (size_t i = 0; i < b; i++)
        for (size_t j = i + 1; j < b; j++)
            a[i * b + j] = a[j * b + i];
    return TOP_OK;
}

void obs_block_saliency(float *scores, const float *w, const double *finv, size_t b)
{
    /* w, scores: (b)  finv: (b, b) */
    for (size_t i = 0; i < b; i++) {
        double wi = w[i];
        scores[i] = (float)(wi * wi / (2.0 * finv[i * b + i]));
    }
}

top_status obs_block_update(float *w, const uint8_t *mask, const double *finv, size_t b,
                            double *work, top_error *err)
{
    /* w, mask: (b)  finv: (b, b)  work: s (p, p), z (p), delta (b) */
    size_t p = 0;
    for (size_t i = 0; i < b; i++)
        p += mask[i] == 0;
    if (p == 0)
        return TOP_OK;
    double *s = work, *z = work + b * b, *delta = z + b;

    /* s = finv[P, P], z = w[P]. */
    size_t r = 0;
    for (size_t i = 0; i < b; i++) {
        if (mask[i])
            continue;
        size_t c = 0;
        for (size_t j = 0; j < b; j++)
            if (!mask[j])
                s[r * p + c++] = finv[i * b + j];
        z[r++] = w[i];
    }

    /* z = s^-1 w[P]; s is a principal block of an SPD matrix. */
    lapack_int info = LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'U', (lapack_int)p, s, (lapack_int)p);
    if (info == 0)
        info = LAPACKE_dpotrs(LAPACK_COL_MAJOR, 'U', (lapack_int)p, 1, s, (lapack_int)p, z,
                              (lapack_int)p);
    if (info != 0)
        return top_error_set(err, TOP_ERR_NUMERIC,
                             "OBS update: inverse-Fisher block of %zu pruned weights is not "
                             "positive definite (info %d); raise the damping",
                             p, (int)info);

    /* delta = -finv[:, P] z, applied to the survivors; w[P] = 0 exactly. */
    for (size_t i = 0; i < b; i++) {
        double acc = 0.0;
        size_t k = 0;
        for (size_t j = 0; j < b; j++)
            if (!mask[j])
                acc += finv[i * b + j] * z[k++];
        delta[i] = -acc;
    }
    for (size_t i = 0; i < b; i++)
        w[i] = mask[i] ? (float)((double)w[i] + delta[i]) : 0.0f;
    return TOP_OK;
}

/* Buffers of the layer-level loops; sized for blocks of length `block`. */
typedef struct obs_work {
    double *f, *inv_work, *grad_work;
} obs_work;

static top_status obs_work_alloc(obs_work *w, size_t block, size_t n_samples, top_error *err)
{
    size_t bb, fw, gw;
    memset(w, 0, sizeof *w);
    if (top_size_mul(&bb, block, block) || top_size_add(&fw, bb, 2 * block) ||
        top_size_mul(&gw, n_samples, block) || fw > SIZE_MAX / sizeof(double) ||
        gw > SIZE_MAX / sizeof(double))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "block OBS workspace for block %zu and %zu samples overflows",
                             block, n_samples);
    w->f = malloc(bb * sizeof(double));
    w->inv_work = malloc(fw * sizeof(double));
    w->grad_work = malloc((gw ? gw : 1) * sizeof(double));
    if (!w->f || !w->inv_work || !w->grad_work) {
        free(w->f);
        free(w->inv_work);
        free(w->grad_work);
        memset(w, 0, sizeof *w);
        return top_error_set(err, TOP_ERR_NOMEM,
                             "cannot allocate the block OBS workspace (block %zu, %zu "
                             "samples); lower the block size or the samples",
                             block, n_samples);
    }
    return TOP_OK;
}

static void obs_work_free(obs_work *w)
{
    free(w->f);
    free(w->inv_work);
    free(w->grad_work);
}

static top_status check_layer_args(size_t count, size_t n_samples, size_t block, top_error *err)
{
    if (block == 0)
        return top_error_set(err, TOP_ERR_INVALID, "OBS block size is 0; use e.g. 128");
    if (n_samples == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "block OBS needs at least one calibration sample");
    size_t g;
    if (top_size_mul(&g, count, n_samples))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "gradient matrix of %zu samples x %zu weights overflows",
                             n_samples, count);
    return TOP_OK;
}

top_status obs_layer_saliency(float *scores, const float *w, const float *grads, size_t count,
                              size_t n_samples, size_t block, double lambda,
                              obs_damping *damping, top_error *err)
{
    /* scores, w: (count)  grads: (N, count) */
    top_status st = check_layer_args(count, n_samples, block, err);
    if (st != TOP_OK)
        return st;
    obs_work wk;
    if ((st = obs_work_alloc(&wk, block, n_samples, err)) != TOP_OK)
        return st;

    for (size_t start = 0; start < count; start += block) {
        size_t b = count - start < block ? count - start : block;
        obs_fisher_block(wk.f, grads + start, count, n_samples, b, wk.grad_work);
        st = obs_invert_spd(wk.f, b, lambda, damping, wk.inv_work, err);
        if (st != TOP_OK) {
            top_error_set(err, st, "block at weight %zu failed", start);
            break;
        }
        obs_block_saliency(scores + start, w + start, wk.f, b);
    }
    obs_work_free(&wk);
    return st;
}

top_status obs_layer_update(float *w, const uint8_t *mask, const float *grads, size_t count,
                            size_t n_samples, size_t block, double lambda, obs_damping *damping,
                            top_error *err)
{
    /* w, mask: (count)  grads: (N, count) */
    top_status st = check_layer_args(count, n_samples, block, err);
    if (st != TOP_OK)
        return st;
    obs_work wk;
    if ((st = obs_work_alloc(&wk, block, n_samples, err)) != TOP_OK)
        return st;

    for (size_t start = 0; start < count && st == TOP_OK; start += block) {
        size_t b = count - start < block ? count - start : block;
        size_t pruned = 0;
        for (size_t i = 0; i < b; i++)
            pruned += mask[start + i] == 0;
        if (pruned == 0)
            continue;
        obs_fisher_block(wk.f, grads + start, count, n_samples, b, wk.grad_work);
        st = obs_invert_spd(wk.f, b, lambda, damping, wk.inv_work, err);
        if (st == TOP_OK)
            st = obs_block_update(w + start, mask + start, wk.f, b, wk.inv_work, err);
    }
    obs_work_free(&wk);
    return st;
}

top_status obs_memory_estimate(obs_memory *out, const size_t *layer_counts, size_t n_layers,
                               size_t block, size_t n_samples, size_t budget_bytes,
                               top_error *err)
{
    size_t total = 0, largest = 0;
    memset(out, 0, sizeof *out);
    for (size_t l = 0; l < n_layers; l++) {
        if (top_size_add(&total, total, layer_counts[l]))
            return top_error_set(err, TOP_ERR_OVERFLOW, "total weight count overflows");
        if (layer_counts[l] > largest)
            largest = layer_counts[l];
    }
    size_t b = block < largest ? block : largest;

    /* workspace doubles: f (b^2) + inverse work (b^2 + 2b) + gradient copy (N b). */
    size_t bb, nb, ws = 0;
    int bad = top_size_mul(&out->gradients, total, n_samples) ||
              top_size_mul(&out->gradients, out->gradients, sizeof(float)) ||
              top_size_mul(&out->scores, total, sizeof(float)) || top_size_mul(&bb, b, b) ||
              top_size_mul(&nb, n_samples, b) || top_size_add(&ws, bb, bb) ||
              top_size_add(&ws, ws, 2 * b) || top_size_add(&ws, ws, nb) ||
              top_size_mul(&out->workspace, ws, sizeof(double)) ||
              top_size_add(&out->total, out->gradients, out->scores) ||
              top_size_add(&out->total, out->total, out->workspace);
    if (bad)
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "block OBS memory for %zu weights, %zu samples and block %zu "
                             "overflows; lower the samples or the block size",
                             total, n_samples, block);

    if (budget_bytes > 0 && out->total > budget_bytes)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "block OBS needs %.1f MiB (%zu samples x %zu weights of "
                             "gradients, block %zu) but the budget is %.1f MiB; lower the "
                             "calibration samples, raise the memory budget, or use method obd",
                             (double)out->total / 1048576.0, n_samples, total, block,
                             (double)budget_bytes / 1048576.0);
    return TOP_OK;
}
