/*
 * Layer-wise OBS in the SparseGPT style: prunes one linear layer so that its
 * output on calibration inputs changes as little as possible.
 *
 *   H = 2 X^T X / n + lambda I,  lambda = damping * mean(diag H)
 *   U = upper Cholesky factor of H^-1 (H^-1 = U^T U)
 *   column j pruned: err = w_j / U_jj, later columns -= err * U[j, j+1:]
 *
 * Columns are processed left to right in blocks of `block`. Inside a block
 * the error propagates column by column. The columns after the block get the
 * block's errors in one dgemm (the lazy batch update). The block's mask is chosen at its
 * start, over all rows, as the lowest w^2 / U_jj^2 (ties by row-major index).
 *
 * Layout: W (rows, cols) and X (n, cols) row-major float32. H, U and a
 * working copy of W are double. Reentrant; the caller owns every buffer.
 * Does not: handle grouped convolutions other than depthwise (the caller
 * splits them), or quantise.
 */
#include "prune.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Legend: R rows (outputs), C cols (inputs), n samples, b block columns. */

/* Rows of X converted to double per dsyrk call. */
#define X_CHUNK_ROWS 512

typedef struct ranked {
    double score;
    size_t index;
} ranked;

static int compare_ranked(const void *pa, const void *pb)
{
    const ranked *a = pa, *b = pb;
    if (a->score != b->score)
        return a->score < b->score ? -1 : 1;
    return (a->index > b->index) - (a->index < b->index);
}

/* h = (2/n) X^T X, full symmetric.  h: (C, C)  x: (n, C)  work: (X_CHUNK_ROWS, C) */
static void hessian_from_inputs(double *h, const float *x, size_t n, size_t cols, double *work)
{
    memset(h, 0, cols * cols * sizeof *h);
    for (size_t s0 = 0; s0 < n; s0 += X_CHUNK_ROWS) {
        size_t m = n - s0 < X_CHUNK_ROWS ? n - s0 : X_CHUNK_ROWS;
        for (size_t i = 0; i < m * cols; i++)
            work[i] = x[s0 * cols + i];
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)cols, (int)m, 2.0 / (double)n,
                    work, (int)cols, 1.0, h, (int)cols);
    }
    for (size_t i = 0; i < cols; i++)
        for (size_t j = 0; j < i; j++)
            h[i * cols + j] = h[j * cols + i];
}

/*
 * Replaces h by U, the row-major upper Cholesky factor of (h + lambda I)^-1.
 * Col-major 'L' of a symmetric matrix gives L with A = L L^T; read row-major,
 * that memory is L^T, an upper U with A = U^T U.
 */
static top_status inverse_cholesky_upper(double *h, size_t cols, double damping,
                                         obs_damping *report, double *work, top_error *err)
{
    double mean_diag = 0.0;
    for (size_t j = 0; j < cols; j++)
        mean_diag += h[j * cols + j] / (double)cols;
    /* All inputs dead: damp against 1 so the inverse exists. */
    double lambda = damping * (mean_diag > 0.0 ? mean_diag : 1.0);

    top_status st = obs_invert_spd(h, cols, lambda, report, work, err);
    if (st != TOP_OK)
        return st;
    lapack_int info =
        LAPACKE_dpotrf(LAPACK_COL_MAJOR, 'L', (lapack_int)cols, h, (lapack_int)cols);
    if (info != 0)
        return top_error_set(err, TOP_ERR_NUMERIC,
                             "inverse Hessian of %zu inputs is not positive definite at "
                             "index %d; raise the damping above %g",
                             cols, (int)info - 1, damping);
    for (size_t i = 0; i < cols; i++)
        for (size_t j = 0; j < i; j++)
            h[i * cols + j] = 0.0;
    return TOP_OK;
}

/* Chooses the `k` weights of columns [c0, c0 + b) with the lowest
 * w^2 / U_jj^2 over all rows and clears their mask bytes. */
static void choose_block_mask(uint8_t *mask, const double *wd, const double *u, size_t rows,
                              size_t cols, size_t c0, size_t b, size_t k, ranked *work)
{
    size_t m = 0;
    for (size_t r = 0; r < rows; r++)
        for (size_t j = c0; j < c0 + b; j++) {
            double d = u[j * cols + j], v = wd[r * cols + j];
            work[m].score = v * v / (d * d);
            work[m++].index = r * cols + j;
        }
    qsort(work, m, sizeof *work, compare_ranked);
    for (size_t i = 0; i < k; i++)
        mask[work[i].index] = 0;
}

/* N:M in one row: of columns [c0, c0 + len), prunes all but the n_keep with
 * the highest w^2 / U_jj^2 (ties prune the earlier column). */
static void choose_group_mask(uint8_t *mask_row, const double *w_row, const double *u,
                              size_t cols, size_t c0, size_t len, int n_keep, ranked *work)
{
    if (len <= (size_t)n_keep)
        return;
    for (size_t j = 0; j < len; j++) {
        double d = u[(c0 + j) * cols + c0 + j], v = w_row[c0 + j];
        work[j].score = v * v / (d * d);
        work[j].index = c0 + j;
    }
    qsort(work, len, sizeof *work, compare_ranked);
    for (size_t j = 0; j < len - (size_t)n_keep; j++)
        mask_row[work[j].index] = 0;
}

/* Prunes the columns [c0, c0 + b) column by column, propagating each
 * column's error inside the block, and stores the scaled errors. With N:M
 * (nm_m > 0), each row's group mask is chosen at the group's first column,
 * after the errors of the earlier columns have reached it.
 *   wd, mask: (R, C)  u: (C, C)  errs: (R, b)  ranks: (nm_m) */
static void prune_block_columns(double *wd, double *errs, uint8_t *mask, const double *u,
                                size_t rows, size_t cols, size_t c0, size_t b, int nm_n,
                                int nm_m, ranked *ranks)
{
    for (size_t r = 0; r < rows; r++) {
        double *wr = wd + r * cols;
        for (size_t j = c0; j < c0 + b; j++) {
            if (nm_m > 0 && j % (size_t)nm_m == 0) {
                size_t len = cols - j < (size_t)nm_m ? cols - j : (size_t)nm_m;
                choose_group_mask(mask + r * cols, wr, u, cols, j, len, nm_n, ranks);
            }
            double e = mask[r * cols + j] ? 0.0 : wr[j] / u[j * cols + j];
            errs[r * b + (j - c0)] = e;
            if (e == 0.0)
                continue;
            wr[j] = 0.0;
            for (size_t t = j + 1; t < c0 + b; t++)
                wr[t] -= e * u[j * cols + t];
        }
    }
}

static top_status validate_options(size_t rows, size_t cols, size_t n,
                                   const layer_obs_options *opt, top_error *err)
{
    if (rows == 0 || cols == 0 || n == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "layer OBS needs rows, cols and samples > 0 (got %zu, %zu, %zu)",
                             rows, cols, n);
    if (!(opt->sparsity >= 0.0 && opt->sparsity <= 1.0))
        return top_error_set(err, TOP_ERR_INVALID, "sparsity %g is outside [0, 1]",
                             opt->sparsity);
    if (!(opt->damping >= 0.0 && isfinite(opt->damping)))
        return top_error_set(err, TOP_ERR_INVALID,
                             "damping %g must be finite and >= 0 (0.01 is typical)",
                             opt->damping);
    if (opt->block == 0)
        return top_error_set(err, TOP_ERR_INVALID, "layer OBS block is 0; use e.g. 128");
    if (opt->nm_m != 0) {
        if (opt->nm_m < 1 || opt->nm_m > PRUNE_NM_MAX_GROUP || opt->nm_n < 0 ||
            opt->nm_n >= opt->nm_m)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "invalid N:M pattern %d:%d; need 0 <= N < M <= %d", opt->nm_n,
                                 opt->nm_m, PRUNE_NM_MAX_GROUP);
        if (opt->sparsity != 0.0)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "N:M sets the sparsity; pass sparsity 0 with %d:%d", opt->nm_n,
                                 opt->nm_m);
        if (opt->block % (size_t)opt->nm_m != 0)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "block %zu is not a multiple of M = %d; use e.g. 128",
                                 opt->block, opt->nm_m);
    }
    return TOP_OK;
}

typedef struct layer_work {
    double *h, *inv_work, *wd, *errs;
    ranked *ranks;
} layer_work;

static void layer_work_free(layer_work *w)
{
    free(w->h);
    free(w->inv_work);
    free(w->wd);
    free(w->errs);
    free(w->ranks);
}

top_status layer_obs_workspace_bytes(size_t *bytes, size_t rows, size_t cols, size_t block,
                                     top_error *err)
{
    /* h (C^2) + inverse work (max(C^2, chunk C)) + wd (R C) doubles, and the
     * per-block errors and ranks (R b), as layer_work_alloc takes them. */
    size_t cc, rc, rb, xw, total;
    size_t b = block < cols ? block : cols;
    if (top_size_mul(&cc, cols, cols) || top_size_mul(&rc, rows, cols) ||
        top_size_mul(&rb, rows, b) || top_size_mul(&xw, X_CHUNK_ROWS, cols) ||
        top_size_add(&total, cc, cc > xw ? cc : xw) || top_size_add(&total, total, rc) ||
        top_size_add(&total, total, rb) || top_size_mul(&total, total, sizeof(double)) ||
        top_size_mul(&rb, rb, sizeof(ranked)) || top_size_add(&total, total, rb))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "layer OBS buffers for a (%zu, %zu) layer overflow", rows, cols);
    *bytes = total;
    return TOP_OK;
}

static top_status layer_work_alloc(layer_work *w, size_t rows, size_t cols, size_t b,
                                   top_error *err)
{
    size_t cc, rc, rb, xw;
    memset(w, 0, sizeof *w);
    if (top_size_mul(&cc, cols, cols) || top_size_mul(&rc, rows, cols) ||
        top_size_mul(&rb, rows, b) || top_size_mul(&xw, X_CHUNK_ROWS, cols) ||
        cc > SIZE_MAX / sizeof(double) || rc > SIZE_MAX / sizeof(double) ||
        rb > SIZE_MAX / sizeof(ranked))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "layer OBS buffers for a (%zu, %zu) layer overflow", rows, cols);
    w->h = malloc(cc * sizeof(double));
    w->inv_work = malloc((cc > xw ? cc : xw) * sizeof(double));
    w->wd = malloc(rc * sizeof(double));
    w->errs = malloc(rb * sizeof(double));
    w->ranks = malloc(rb * sizeof(ranked));
    if (!w->h || !w->inv_work || !w->wd || !w->errs || !w->ranks) {
        layer_work_free(w);
        return top_error_set(err, TOP_ERR_NOMEM,
                             "cannot allocate layer OBS buffers for a (%zu, %zu) layer "
                             "(%zu MiB for the Hessian)",
                             rows, cols, cc * sizeof(double) * 2 >> 20);
    }
    return TOP_OK;
}

/* Unstructured: clears the mask of the weights of columns [c0, c0 + b) that
 * this block prunes, round(q R (c0 + b)) - round(q R c0) of them, so the
 * blocks add up to exactly round(q R C). */
static void choose_unstructured_mask(uint8_t *mask, const layer_work *w, size_t rows,
                                     size_t cols, size_t c0, size_t b, double q)
{
    size_t before = (size_t)floor(q * (double)(rows * c0) + 0.5);
    size_t after = (size_t)floor(q * (double)(rows * (c0 + b)) + 0.5);
    choose_block_mask(mask, w->wd, w->h, rows, cols, c0, b, after - before, w->ranks);
}

top_status layer_obs_prune(float *w, uint8_t *mask, const float *x, size_t rows, size_t cols,
                           size_t n, const layer_obs_options *opt, obs_damping *damping,
                           top_error *err)
{
    /* w, mask: (R, C)  x: (n, C) */
    top_status st = validate_options(rows, cols, n, opt, err);
    if (st != TOP_OK)
        return st;
    size_t block = opt->block < cols ? opt->block : cols;
    layer_work wk;
    if ((st = layer_work_alloc(&wk, rows, cols, block, err)) != TOP_OK)
        return st;

    hessian_from_inputs(wk.h, x, n, cols, wk.inv_work);
    st = inverse_cholesky_upper(wk.h, cols, opt->damping, damping, wk.inv_work, err);
    if (st != TOP_OK)
        goto done;
    for (size_t i = 0; i < rows * cols; i++)
        wk.wd[i] = w[i];
    memset(mask, 1, rows * cols);

    for (size_t c0 = 0; c0 < cols; c0 += block) {
        if (opt->cancel && *opt->cancel) {
            st = top_error_set(err, TOP_ERR_CANCELLED, "layer OBS cancelled at column %zu", c0);
            goto done;
        }
        size_t b = cols - c0 < block ? cols - c0 : block;
        if (opt->nm_m == 0)
            choose_unstructured_mask(mask, &wk, rows, cols, c0, b, opt->sparsity);
        prune_block_columns(wk.wd, wk.errs, mask, wk.h, rows, cols, c0, b, opt->nm_n, opt->nm_m,
                            wk.ranks);

        /* Lazy batch update: W[:, c0+b:] -= E U[c0:c0+b, c0+b:]. */
        if (c0 + b < cols)
            cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rows,
                        (int)(cols - c0 - b), (int)b, -1.0, wk.errs, (int)b,
                        wk.h + c0 * cols + c0 + b, (int)cols, 1.0, wk.wd + c0 + b, (int)cols);
    }
    for (size_t i = 0; i < rows * cols; i++)
        w[i] = mask[i] ? (float)wk.wd[i] : 0.0f;

done:
    layer_work_free(&wk);
    return st;
}

top_status layer_obs_reconstruction_error(double *out, const float *w, const float *w_pruned,
                                          const float *x, size_t rows, size_t cols, size_t n,
                                          top_error *err)
{
    /* w, w_pruned: (R, C)  x: (n, C)  d: (R, C)  xc: (chunk, C)  e: (chunk, R) */
    size_t rc, xc_n, e_n;
    *out = 0.0;
    if (top_size_mul(&rc, rows, cols) || top_size_mul(&xc_n, X_CHUNK_ROWS, cols) ||
        top_size_mul(&e_n, X_CHUNK_ROWS, rows) || rc > SIZE_MAX / sizeof(double))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "reconstruction error buffers for (%zu, %zu) overflow", rows,
                             cols);
    double *d = malloc((rc ? rc : 1) * sizeof *d);
    double *xc = malloc((xc_n ? xc_n : 1) * sizeof *xc);
    double *e = malloc((e_n ? e_n : 1) * sizeof *e);
    top_status st = TOP_OK;
    if (!d || !xc || !e) {
        st = top_error_set(err, TOP_ERR_NOMEM,
                           "cannot allocate reconstruction error buffers for (%zu, %zu)", rows,
                           cols);
        goto done;
    }
    for (size_t i = 0; i < rc; i++)
        d[i] = (double)w[i] - (double)w_pruned[i];

    double sum = 0.0;
    for (size_t s0 = 0; s0 < n && rows > 0 && cols > 0; s0 += X_CHUNK_ROWS) {
        size_t m = n - s0 < X_CHUNK_ROWS ? n - s0 : X_CHUNK_ROWS;
        for (size_t i = 0; i < m * cols; i++)
            xc[i] = x[s0 * cols + i];
        cblas_dgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, (int)rows, (int)cols, 1.0,
                    xc, (int)cols, d, (int)cols, 0.0, e, (int)rows);
        for (size_t i = 0; i < m * rows; i++)
            sum += e[i] * e[i];
    }
    *out = sum;

done:
    free(d);
    free(xc);
    free(e);
    return st;
}
