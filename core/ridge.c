/*
 * Ridge classifier head: weighted, centered normal equations accumulated in
 * chunks of samples (so no (n, D) double copy is held), solved by Cholesky in
 * double. See ridge.h for the formulas. Reentrant.
 */
#include "ridge.h"

#include <cblas.h>
#include <lapacke.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Legend: n samples, D features, C classes, m rows of one chunk. */

#define RIDGE_CHUNK_ROWS 1024

static top_status validate_fit(const float *x, const int32_t *labels, size_t n, size_t d,
                               size_t c, const ridge_options *opt, top_error *err)
{
    if (n == 0 || d == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "ridge fit needs samples and features (got %zu x %zu)", n, d);
    if (c < 2)
        return top_error_set(err, TOP_ERR_INVALID,
                             "ridge fit needs at least 2 classes (got %zu)", c);
    if (!(opt->alpha > 0.0 && isfinite(opt->alpha)))
        return top_error_set(err, TOP_ERR_INVALID,
                             "ridge alpha %g must be finite and > 0 (1.0 is the usual default)",
                             opt->alpha);
    for (size_t i = 0; i < n; i++) {
        if (labels[i] < 0 || (size_t)labels[i] >= c)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "label %d of sample %zu is outside [0, %zu)", (int)labels[i],
                                 i, c);
        for (size_t j = 0; j < d; j++)
            if (!isfinite(x[i * d + j]))
                return top_error_set(err, TOP_ERR_INVALID,
                                     "feature %zu of sample %zu is %g; check the backbone "
                                     "outputs",
                                     j, i, (double)x[i * d + j]);
    }
    return TOP_OK;
}

/* sw: (n) sample weights; 1, or n / (C count_c) when balanced. */
static top_status sample_weights(double *sw, const int32_t *labels, size_t n, size_t c,
                                 int balanced, top_error *err)
{
    for (size_t i = 0; i < n; i++)
        sw[i] = 1.0;
    if (!balanced)
        return TOP_OK;
    size_t *counts = calloc(c, sizeof *counts);
    if (!counts)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate %zu class counts", c);
    for (size_t i = 0; i < n; i++)
        counts[labels[i]]++;
    top_status st = TOP_OK;
    for (size_t k = 0; k < c && st == TOP_OK; k++)
        if (counts[k] == 0)
            st = top_error_set(err, TOP_ERR_INVALID,
                               "class %zu has no training samples, so balanced weights are "
                               "undefined; drop the class or disable balanced weights",
                               k);
    for (size_t i = 0; i < n && st == TOP_OK; i++)
        sw[i] = (double)n / ((double)c * (double)counts[labels[i]]);
    free(counts);
    return st;
}

/* Target of sample i for class k: +1 for its own class, -1 otherwise. */
static double target(const int32_t *labels, size_t i, size_t k)
{
    return (size_t)labels[i] == k ? 1.0 : -1.0;
}

/* Weighted means.  x_mean: (D)  y_mean: (C) */
static void weighted_means(double *x_mean, double *y_mean, const float *x,
                           const int32_t *labels, const double *sw, size_t n, size_t d,
                           size_t c)
{
    double total = 0.0;
    memset(x_mean, 0, d * sizeof *x_mean);
    memset(y_mean, 0, c * sizeof *y_mean);
    for (size_t i = 0; i < n; i++) {
        total += sw[i];
        for (size_t j = 0; j < d; j++)
            x_mean[j] += sw[i] * x[i * d + j];
        for (size_t k = 0; k < c; k++)
            y_mean[k] += sw[i] * target(labels, i, k);
    }
    for (size_t j = 0; j < d; j++)
        x_mean[j] /= total;
    for (size_t k = 0; k < c; k++)
        y_mean[k] /= total;
}

/*
 * a += Xs^T Xs (upper triangle), b += Xs^T Ys over all samples, where
 * Xs = sqrt(sw) (X - x_mean) and Ys = sqrt(sw) (Y - y_mean).
 *   a: (D, D)  b: (D, C)  xs: (m, D)  ys: (m, C)
 */
static void accumulate_normal_equations(double *a, double *b, const float *x,
                                        const int32_t *labels, const double *sw,
                                        const double *x_mean, const double *y_mean, size_t n,
                                        size_t d, size_t c, double *xs, double *ys)
{
    for (size_t s0 = 0; s0 < n; s0 += RIDGE_CHUNK_ROWS) {
        size_t m = n - s0 < RIDGE_CHUNK_ROWS ? n - s0 : RIDGE_CHUNK_ROWS;
        for (size_t r = 0; r < m; r++) {
            size_t i = s0 + r;
            double root = sqrt(sw[i]);
            for (size_t j = 0; j < d; j++)
                xs[r * d + j] = root * ((double)x[i * d + j] - x_mean[j]);
            for (size_t k = 0; k < c; k++)
                ys[r * c + k] = root * (target(labels, i, k) - y_mean[k]);
        }
        cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, (int)d, (int)m, 1.0, xs, (int)d, 1.0,
                    a, (int)d);
        cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)d, (int)c, (int)m, 1.0, xs,
                    (int)d, ys, (int)c, 1.0, b, (int)c);
    }
}

/* Solves (a + alpha I) z = b in place of b; a contains its upper triangle.
 *   a: (D, D)  b: (D, C) */
static top_status solve_ridge(double *a, double *b, size_t d, size_t c, double alpha,
                              top_error *err)
{
    for (size_t j = 0; j < d; j++)
        a[j * d + j] += alpha;
    lapack_int info = LAPACKE_dpotrf(LAPACK_ROW_MAJOR, 'U', (lapack_int)d, a, (lapack_int)d);
    if (info == 0)
        info = LAPACKE_dpotrs(LAPACK_ROW_MAJOR, 'U', (lapack_int)d, (lapack_int)c, a,
                              (lapack_int)d, b, (lapack_int)c);
    if (info != 0)
        return top_error_set(err, TOP_ERR_NUMERIC,
                             "ridge normal equations are not positive definite (info %d, "
                             "alpha %g); raise alpha",
                             (int)info, alpha);
    return TOP_OK;
}

top_status ridge_fit(ridge_model *model, const float *x, const int32_t *labels, size_t n,
                     size_t n_features, size_t n_classes, const ridge_options *opt,
                     top_error *err)
{
    /* x: (n, D)  labels: (n)  coef: (C, D)  intercept: (C) */
    size_t d = n_features, c = n_classes, dd, dc, chunk_x, chunk_y;
    memset(model, 0, sizeof *model);
    top_status st = validate_fit(x, labels, n, d, c, opt, err);
    if (st != TOP_OK)
        return st;
    if (top_size_mul(&dd, d, d) || top_size_mul(&dc, d, c) ||
        top_size_mul(&chunk_x, RIDGE_CHUNK_ROWS, d) ||
        top_size_mul(&chunk_y, RIDGE_CHUNK_ROWS, c) || dd > SIZE_MAX / sizeof(double) ||
        chunk_x > SIZE_MAX / sizeof(double) || chunk_y > SIZE_MAX / sizeof(double) ||
        n > SIZE_MAX / sizeof(double))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "ridge buffers for %zu features and %zu classes overflow", d, c);

    double *sw = malloc(n * sizeof *sw), *x_mean = malloc(d * sizeof *x_mean);
    double *y_mean = malloc(c * sizeof *y_mean), *a = calloc(dd, sizeof *a);
    double *b = calloc(dc, sizeof *b), *xs = malloc(chunk_x * sizeof *xs);
    double *ys = malloc(chunk_y * sizeof *ys);
    model->coef = malloc(dc * sizeof *model->coef);
    model->intercept = malloc(c * sizeof *model->intercept);
    if (!sw || !x_mean || !y_mean || !a || !b || !xs || !ys || !model->coef ||
        !model->intercept) {
        st = top_error_set(err, TOP_ERR_NOMEM,
                           "cannot allocate ridge buffers for %zu features (%zu MiB)", d,
                           dd * sizeof(double) >> 20);
        goto done;
    }

    if ((st = sample_weights(sw, labels, n, c, opt->balanced, err)) != TOP_OK)
        goto done;
    weighted_means(x_mean, y_mean, x, labels, sw, n, d, c);
    accumulate_normal_equations(a, b, x, labels, sw, x_mean, y_mean, n, d, c, xs, ys);
    if ((st = solve_ridge(a, b, d, c, opt->alpha, err)) != TOP_OK)
        goto done;

    /* coef = B^T; intercept = y_mean - coef x_mean. */
    for (size_t k = 0; k < c; k++) {
        double dot = 0.0;
        for (size_t j = 0; j < d; j++) {
            model->coef[k * d + j] = b[j * c + k];
            dot += b[j * c + k] * x_mean[j];
        }
        model->intercept[k] = y_mean[k] - dot;
    }
    model->n_features = d;
    model->n_classes = c;

done:
    if (st != TOP_OK)
        ridge_model_free(model);
    free(sw);
    free(x_mean);
    free(y_mean);
    free(a);
    free(b);
    free(xs);
    free(ys);
    return st;
}

void ridge_model_free(ridge_model *model)
{
    free(model->coef);
    free(model->intercept);
    memset(model, 0, sizeof *model);
}

void ridge_decision(double *scores, const ridge_model *model, const float *x, size_t n)
{
    /* scores: (n, C)  x: (n, D)  coef: (C, D) */
    size_t d = model->n_features, c = model->n_classes;
    for (size_t i = 0; i < n; i++)
        for (size_t k = 0; k < c; k++) {
            double acc = model->intercept[k];
            for (size_t j = 0; j < d; j++)
                acc += model->coef[k * d + j] * (double)x[i * d + j];
            scores[i * c + k] = acc;
        }
}

top_status ridge_predict(int32_t *labels, const ridge_model *model, const float *x, size_t n,
                         top_error *err)
{
    /* labels: (n)  x: (n, D) */
    size_t c = model->n_classes, cells;
    if (c == 0 || !model->coef)
        return top_error_set(err, TOP_ERR_STATE, "ridge model is not fitted; call ridge_fit");
    if (top_size_mul(&cells, RIDGE_CHUNK_ROWS, c) || cells > SIZE_MAX / sizeof(double))
        return top_error_set(err, TOP_ERR_OVERFLOW, "ridge scores for %zu classes overflow", c);
    double *scores = malloc(cells * sizeof *scores);
    if (!scores)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate ridge scores for %zu classes",
                             c);

    for (size_t s0 = 0; s0 < n; s0 += RIDGE_CHUNK_ROWS) {
        size_t m = n - s0 < RIDGE_CHUNK_ROWS ? n - s0 : RIDGE_CHUNK_ROWS;
        ridge_decision(scores, model, x + s0 * model->n_features, m);
        for (size_t r = 0; r < m; r++) {
            size_t best = 0;
            for (size_t k = 1; k < c; k++)
                if (scores[r * c + k] > scores[r * c + best])
                    best = k;
            labels[s0 + r] = (int32_t)best;
        }
    }
    free(scores);
    return TOP_OK;
}

top_status ridge_accuracy(double *accuracy, const ridge_model *model, const float *x,
                          const int32_t *labels, size_t n, top_error *err)
{
    *accuracy = 0.0;
    if (n == 0)
        return TOP_OK;
    if (n > SIZE_MAX / sizeof(int32_t))
        return top_error_set(err, TOP_ERR_OVERFLOW, "%zu samples overflow", n);
    int32_t *pred = malloc(n * sizeof *pred);
    if (!pred)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate %zu predictions", n);
    top_status st = ridge_predict(pred, model, x, n, err);
    if (st == TOP_OK) {
        size_t correct = 0;
        for (size_t i = 0; i < n; i++)
            correct += pred[i] == labels[i];
        *accuracy = (double)correct / (double)n;
    }
    free(pred);
    return st;
}
