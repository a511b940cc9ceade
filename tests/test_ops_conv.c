/*
 * Convolutional kernels: fast conv2d against its naive twin on a table of
 * geometries, central finite differences for every input and parameter,
 * hand-computed cases that pin the semantics, and accumulation of backward.
 *
 * Finite differences: the float32 kernel runs at x +- h with h = 1e-3, the
 * loss L = sum(y * g) for a fixed random g is summed in double, and the
 * analytic gradient a is compared with n = (L+ - L-) / (2h) by the normalized
 * error |a - n| / max(1, |a|, |n|), tolerance 1e-2 (FD_TOL).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "test.h"

#define FD_STEP 1e-3
#define FD_TOL 1e-2
/* Fast against naive: |a - b| <= MATCH_TOL * max(1, |b|). */
#define MATCH_TOL 1e-4
/* Hand-computed values are exact in float up to rounding of one division. */
#define EXACT_TOL 1e-6

/* ---- helpers ------------------------------------------------------------------ */

static uint64_t rng_state = 0x9e3779b97f4a7c15u;

/* Uniform in [-1, 1) from a splitmix64 stream. */
static float rand_uniform(void)
{
    uint64_t z = (rng_state += 0x9e3779b97f4a7c15u);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9u;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebu;
    z ^= z >> 31;
    return (float)((double)(z >> 11) / 9007199254740992.0 * 2.0 - 1.0);
}

static float *alloc_floats(size_t count)
{
    float *p = calloc(count ? count : 1, sizeof *p);
    if (!p) {
        fprintf(stderr, "out of memory allocating %zu floats\n", count);
        exit(2);
    }
    return p;
}

static float *alloc_random(size_t count)
{
    float *p = alloc_floats(count);
    for (size_t i = 0; i < count; i++)
        p[i] = rand_uniform();
    return p;
}

static float *alloc_copy(const float *src, size_t count)
{
    float *p = alloc_floats(count);
    memcpy(p, src, count * sizeof *p);
    return p;
}

/* Checks |actual - expected| <= tol * max(1, |expected|) entrywise and
 * reports the first few mismatches with index, values and tolerance. */
static void check_arrays(const char *label, const float *actual, const float *expected,
                         size_t count, double tol)
{
    int reported = 0;
    for (size_t i = 0; i < count; i++) {
        double a = actual[i], e = expected[i];
        double bound = tol * fmax(1.0, fabs(e));
        if (!(fabs(a - e) <= bound) && reported++ < 5)
            TEST_FAIL_AT("%s[%zu] = %.9g, expected %.9g (tolerance %.3g)", label, i, a, e,
                         bound);
    }
}

/* Checks actual == 2 * single, the result of running an accumulating
 * backward twice into zeros. */
static void check_doubled(const char *label, const float *twice, const float *once,
                          size_t count)
{
    float *expected = alloc_floats(count);
    for (size_t i = 0; i < count; i++)
        expected[i] = 2.0f * once[i];
    check_arrays(label, twice, expected, count, 1e-5);
    free(expected);
}

/* ---- finite differences --------------------------------------------------------- */

/* An op under test: forward() fills y (y_count floats) from the op's own inputs. */
typedef struct fd_op {
    void (*forward)(struct fd_op *op);
    float *y;
    size_t y_count;
    const float *g; /* loss weights, y_count floats */
    void *ctx;
} fd_op;

static double fd_loss(fd_op *op)
{
    op->forward(op);
    double loss = 0.0;
    for (size_t i = 0; i < op->y_count; i++)
        loss += (double)op->y[i] * op->g[i];
    return loss;
}

/*
 * Compares the analytic gradient grad of param (count floats) with central
 * differences of the loss, at most about 64 evenly spaced entries. Fails with
 * index, both values and tolerance; prints the max normalized error.
 */
static void fd_check(const char *label, fd_op *op, float *param, const float *grad,
                     size_t count)
{
    size_t step = count > 64 ? count / 64 : 1;
    double max_err = 0.0;
    for (size_t i = 0; i < count; i += step) {
        float orig = param[i];
        float up = (float)(orig + FD_STEP), down = (float)(orig - FD_STEP);
        param[i] = up;
        double loss_up = fd_loss(op);
        param[i] = down;
        double loss_down = fd_loss(op);
        param[i] = orig;
        double numeric = (loss_up - loss_down) / ((double)up - (double)down);
        double a = grad[i];
        double err = fabs(a - numeric) / fmax(1.0, fmax(fabs(a), fabs(numeric)));
        if (err > max_err)
            max_err = err;
        CHECK_MSG(err <= FD_TOL,
                  "%s: d/d[%zu] analytic %.7g, finite difference %.7g, normalized error "
                  "%.3g (tolerance %.3g)",
                  label, i, a, numeric, err, FD_TOL);
    }
    printf("     %-36s max normalized error %.2e (step %.0e, tolerance %.0e)\n", label, max_err,
           FD_STEP, FD_TOL);
}

/* ---- conv2d cases ---------------------------------------------------------------- */

typedef struct conv_case {
    const char *name;
    int n, c, h, w, k, r, s, stride_h, stride_w, dilation_h, dilation_w;
    int pad_top, pad_bottom, pad_left, pad_right, groups, bias;
} conv_case;

static const conv_case conv_cases[] = {
    {"1x1 pointwise", 2, 8, 5, 6, 12, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 1, 1},
    {"1x1 stride 2", 2, 8, 7, 7, 6, 1, 1, 2, 2, 1, 1, 0, 0, 0, 0, 1, 0},
    {"3x3 s1 p1", 2, 4, 7, 6, 5, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    {"3x3 s2 tf same", 1, 3, 8, 8, 4, 3, 3, 2, 2, 1, 1, 0, 1, 0, 1, 1, 1},
    {"7x7 s2 p3 stem", 2, 3, 15, 13, 4, 7, 7, 2, 2, 1, 1, 3, 3, 3, 3, 1, 0},
    {"3x3 dilation 2", 1, 3, 9, 10, 4, 3, 3, 1, 1, 2, 2, 2, 2, 2, 2, 1, 1},
    {"grouped g2", 2, 4, 6, 6, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1},
    {"grouped g4 s2", 1, 8, 7, 7, 8, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 4, 0},
    {"depthwise 3x3", 2, 6, 7, 7, 6, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 6, 1},
    {"depthwise s2 tf same", 2, 5, 8, 9, 5, 3, 3, 2, 2, 1, 1, 0, 1, 0, 1, 5, 0},
    {"depthwise multiplier 2", 2, 4, 6, 5, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 4, 1},
    {"depthwise 5x5 dilated", 1, 3, 9, 9, 3, 5, 5, 1, 1, 2, 2, 4, 4, 4, 4, 3, 1},
    {"depthwise 3x3 s2 dilation 2", 2, 4, 9, 11, 4, 3, 3, 2, 2, 2, 2, 2, 2, 2, 2, 4, 0},
    {"depthwise narrow", 1, 3, 3, 2, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 3, 1},
    {"depthwise wide", 2, 2, 5, 21, 2, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 2, 1},
    {"depthwise wide s2", 1, 2, 6, 37, 4, 3, 3, 2, 2, 1, 1, 0, 1, 0, 1, 2, 1},
    {"depthwise pad 3", 1, 2, 4, 12, 2, 3, 3, 1, 1, 1, 1, 3, 0, 3, 2, 2, 0},
    {"depthwise wide s2 p1", 2, 3, 11, 29, 3, 3, 3, 2, 2, 1, 1, 1, 1, 1, 1, 3, 1},
    {"depthwise wide s2 p3", 1, 2, 9, 27, 2, 3, 3, 2, 2, 1, 1, 3, 3, 3, 3, 2, 0},
    {"1x3", 2, 3, 5, 7, 4, 1, 3, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1},
    {"3x1", 2, 3, 7, 5, 4, 3, 1, 1, 1, 1, 1, 1, 1, 0, 0, 1, 1},
    {"odd sizes batch 3", 3, 5, 11, 9, 7, 3, 3, 2, 1, 1, 1, 1, 0, 2, 1, 1, 1},
    {"single input channel", 2, 1, 6, 6, 3, 3, 3, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1},
    {"padding beyond kernel", 1, 2, 4, 4, 3, 3, 3, 1, 1, 1, 1, 3, 3, 3, 3, 1, 1},
};
#define CONV_CASE_COUNT (sizeof conv_cases / sizeof conv_cases[0])

static conv2d_shape conv_shape_of(const conv_case *cc)
{
    conv2d_shape s = {
        .n = cc->n,
        .c = cc->c,
        .h = cc->h,
        .w = cc->w,
        .k = cc->k,
        .r = cc->r,
        .s = cc->s,
        .stride_h = cc->stride_h,
        .stride_w = cc->stride_w,
        .dilation_h = cc->dilation_h,
        .dilation_w = cc->dilation_w,
        .pad_top = cc->pad_top,
        .pad_bottom = cc->pad_bottom,
        .pad_left = cc->pad_left,
        .pad_right = cc->pad_right,
        .groups = cc->groups,
    };
    return s;
}

/* Tensors of one conv2d problem with random contents. */
typedef struct conv_data {
    conv2d_shape s;
    size_t x_count, w_count, y_count, work_count;
    float *x, *w, *b, *y, *g, *work;
    int naive; /* forward with the naive twin */
} conv_data;

static int conv_data_init(conv_data *d, const conv_case *cc)
{
    top_error err;
    top_error_clear(&err);
    d->s = conv_shape_of(cc);
    if (conv2d_shape_derive(&d->s, &err) != TOP_OK) {
        TEST_FAIL_AT("%s: shape rejected: %s", cc->name, err.message);
        return -1;
    }
    const conv2d_shape *s = &d->s;
    d->x_count = (size_t)s->n * s->c * s->h * s->w;
    d->w_count = (size_t)s->k * (s->c / s->groups) * s->r * s->s;
    d->y_count = (size_t)s->n * s->k * s->p * s->q;
    d->work_count = conv2d_workspace_floats(s);
    d->x = alloc_random(d->x_count);
    d->w = alloc_random(d->w_count);
    d->b = cc->bias ? alloc_random((size_t)s->k) : NULL;
    d->y = alloc_floats(d->y_count);
    d->g = alloc_random(d->y_count);
    /* Exactly the advertised size, so ASan catches an overrun. */
    d->work = d->work_count ? malloc(d->work_count * sizeof(float)) : NULL;
    d->naive = 0;
    return 0;
}

static void conv_data_free(conv_data *d)
{
    free(d->x);
    free(d->w);
    free(d->b);
    free(d->y);
    free(d->g);
    free(d->work);
}

static void conv_fd_forward(fd_op *op)
{
    conv_data *d = op->ctx;
    if (d->naive)
        conv2d_forward_naive(d->y, d->x, d->w, d->b, &d->s);
    else
        conv2d_forward(d->y, d->x, d->w, d->b, &d->s, d->work);
}

/* ---- conv2d: fast against naive ---------------------------------------------------- */

static void check_conv_case_matches_naive(const conv_case *cc)
{
    conv_data d;
    if (conv_data_init(&d, cc))
        return;
    char label[96];
    float *y_naive = alloc_floats(d.y_count);
    conv2d_forward(d.y, d.x, d.w, d.b, &d.s, d.work);
    conv2d_forward_naive(y_naive, d.x, d.w, d.b, &d.s);
    snprintf(label, sizeof label, "%s: y", cc->name);
    check_arrays(label, d.y, y_naive, d.y_count, MATCH_TOL);

    /* Start every gradient from the same random values: both must add. */
    size_t kb = (size_t)d.s.k;
    float *dx = alloc_random(d.x_count), *dw = alloc_random(d.w_count), *db = alloc_random(kb);
    float *dx_naive = alloc_copy(dx, d.x_count), *dw_naive = alloc_copy(dw, d.w_count);
    float *db_naive = alloc_copy(db, kb);
    conv2d_backward(dx, dw, db, d.g, d.x, d.w, &d.s, d.work);
    conv2d_backward_naive(dx_naive, dw_naive, db_naive, d.g, d.x, d.w, &d.s);
    snprintf(label, sizeof label, "%s: dx", cc->name);
    check_arrays(label, dx, dx_naive, d.x_count, MATCH_TOL);
    snprintf(label, sizeof label, "%s: dw", cc->name);
    check_arrays(label, dw, dw_naive, d.w_count, MATCH_TOL);
    snprintf(label, sizeof label, "%s: db", cc->name);
    check_arrays(label, db, db_naive, kb, MATCH_TOL);

    free(y_naive);
    free(dx);
    free(dw);
    free(db);
    free(dx_naive);
    free(dw_naive);
    free(db_naive);
    conv_data_free(&d);
}

static void test_conv_fast_matches_naive(void)
{
    for (size_t i = 0; i < CONV_CASE_COUNT; i++)
        check_conv_case_matches_naive(&conv_cases[i]);
}

/* Only dx, only dw, only db: the NULL gradients are skipped. */
static void test_conv_backward_skips_null(void)
{
    for (size_t i = 0; i < CONV_CASE_COUNT; i++) {
        conv_data d;
        if (conv_data_init(&d, &conv_cases[i]))
            continue;
        size_t kb = (size_t)d.s.k;
        float *dx = alloc_floats(d.x_count), *dw = alloc_floats(d.w_count);
        float *db = alloc_floats(kb), *dx_all = alloc_floats(d.x_count);
        float *dw_all = alloc_floats(d.w_count), *db_all = alloc_floats(kb);
        conv2d_backward(dx_all, dw_all, db_all, d.g, d.x, d.w, &d.s, d.work);
        conv2d_backward(dx, NULL, NULL, d.g, d.x, d.w, &d.s, d.work);
        conv2d_backward(NULL, dw, NULL, d.g, d.x, d.w, &d.s, d.work);
        conv2d_backward(NULL, NULL, db, d.g, d.x, d.w, &d.s, d.work);
        check_arrays(conv_cases[i].name, dx, dx_all, d.x_count, 1e-6);
        check_arrays(conv_cases[i].name, dw, dw_all, d.w_count, 1e-6);
        check_arrays(conv_cases[i].name, db, db_all, kb, 1e-6);
        free(dx);
        free(dw);
        free(db);
        free(dx_all);
        free(dw_all);
        free(db_all);
        conv_data_free(&d);
    }
}

/* ---- conv2d: finite differences ------------------------------------------------------- */

static void check_conv_case_fd(const conv_case *cc, int naive)
{
    conv_data d;
    if (conv_data_init(&d, cc))
        return;
    d.naive = naive;
    size_t kb = (size_t)d.s.k;
    float *dx = alloc_floats(d.x_count), *dw = alloc_floats(d.w_count), *db = alloc_floats(kb);
    if (naive)
        conv2d_backward_naive(dx, dw, d.b ? db : NULL, d.g, d.x, d.w, &d.s);
    else
        conv2d_backward(dx, dw, d.b ? db : NULL, d.g, d.x, d.w, &d.s, d.work);

    fd_op op = {conv_fd_forward, d.y, d.y_count, d.g, &d};
    char label[96];
    snprintf(label, sizeof label, "%s %s dx", naive ? "naive" : "fast", cc->name);
    fd_check(label, &op, d.x, dx, d.x_count);
    snprintf(label, sizeof label, "%s %s dw", naive ? "naive" : "fast", cc->name);
    fd_check(label, &op, d.w, dw, d.w_count);
    if (d.b) {
        snprintf(label, sizeof label, "%s %s db", naive ? "naive" : "fast", cc->name);
        fd_check(label, &op, d.b, db, kb);
    }
    free(dx);
    free(dw);
    free(db);
    conv_data_free(&d);
}

static void test_conv_finite_differences(void)
{
    /* pointwise, 3x3, tf same, dilation, grouped, depthwise with multiplier */
    static const size_t picks[] = {0, 2, 3, 5, 7, 10, 4};
    for (size_t i = 0; i < sizeof picks / sizeof picks[0]; i++) {
        check_conv_case_fd(&conv_cases[picks[i]], 0);
        check_conv_case_fd(&conv_cases[picks[i]], 1);
    }
}

/* ---- pooling: finite differences -------------------------------------------------------- */

typedef struct pool_data {
    pool2d_shape s;
    float *x, *y, *g;
    size_t x_count, y_count;
    int max; /* max pool, else average pool */
} pool_data;

static void pool_fd_forward(fd_op *op)
{
    pool_data *d = op->ctx;
    if (d->max)
        maxpool2d_forward(d->y, d->x, &d->s);
    else
        avgpool2d_forward(d->y, d->x, &d->s);
}

/* Distinct values 0.05 apart in shuffled order, so no perturbation of
 * FD_STEP changes which cell wins a max. */
static float *alloc_distinct(size_t count)
{
    float *p = alloc_floats(count);
    for (size_t i = 0; i < count; i++)
        p[i] = 0.05f * (float)i - 0.025f * (float)count;
    for (size_t i = count; i > 1; i--) {
        size_t j = (size_t)((rand_uniform() + 1.0f) * 0.5f * (float)i) % i;
        float t = p[i - 1];
        p[i - 1] = p[j];
        p[j] = t;
    }
    return p;
}

static void check_pool_fd(const char *label, pool2d_shape s, int max)
{
    top_error err;
    top_error_clear(&err);
    if (pool2d_shape_derive(&s, &err) != TOP_OK) {
        TEST_FAIL_AT("%s: shape rejected: %s", label, err.message);
        return;
    }
    pool_data d = {.s = s, .max = max};
    d.x_count = (size_t)s.n * s.c * s.h * s.w;
    d.y_count = (size_t)s.n * s.c * s.p * s.q;
    d.x = alloc_distinct(d.x_count);
    d.y = alloc_floats(d.y_count);
    d.g = alloc_random(d.y_count);
    float *dx = alloc_floats(d.x_count);
    if (max)
        maxpool2d_backward(dx, d.g, d.x, &d.s);
    else
        avgpool2d_backward(dx, d.g, &d.s);
    fd_op op = {pool_fd_forward, d.y, d.y_count, d.g, &d};
    fd_check(label, &op, d.x, dx, d.x_count);
    free(dx);
    free(d.x);
    free(d.y);
    free(d.g);
}

static void test_pool_finite_differences(void)
{
    pool2d_shape s = {.n = 2,
                      .c = 3,
                      .h = 7,
                      .w = 6,
                      .r = 3,
                      .s = 3,
                      .stride_h = 2,
                      .stride_w = 2,
                      .pad_top = 1,
                      .pad_bottom = 1,
                      .pad_left = 1,
                      .pad_right = 1};
    check_pool_fd("maxpool 3x3 s2 p1 dx", s, 1);
    s.count_include_pad = 1;
    check_pool_fd("avgpool include pad dx", s, 0);
    s.count_include_pad = 0;
    check_pool_fd("avgpool exclude pad dx", s, 0);
    pool2d_shape asym = {.n = 1,
                         .c = 2,
                         .h = 6,
                         .w = 5,
                         .r = 2,
                         .s = 3,
                         .stride_h = 1,
                         .stride_w = 2,
                         .pad_top = 0,
                         .pad_bottom = 1,
                         .pad_left = 2,
                         .pad_right = 0};
    check_pool_fd("maxpool 2x3 asymmetric dx", asym, 1);
    check_pool_fd("avgpool 2x3 asymmetric dx", asym, 0);
}

typedef struct gap_data {
    float *x, *y;
    int n, c, hw;
} gap_data;

static void gap_fd_forward(fd_op *op)
{
    gap_data *d = op->ctx;
    global_avgpool_forward(d->y, d->x, d->n, d->c, d->hw);
}

static void test_global_avgpool_finite_differences(void)
{
    gap_data d = {.n = 2, .c = 3, .hw = 10};
    size_t x_count = (size_t)d.n * d.c * d.hw, y_count = (size_t)d.n * d.c;
    d.x = alloc_random(x_count);
    d.y = alloc_floats(y_count);
    float *g = alloc_random(y_count), *dx = alloc_floats(x_count);
    global_avgpool_backward(dx, g, d.n, d.c, d.hw);
    fd_op op = {gap_fd_forward, d.y, y_count, g, &d};
    fd_check("global avgpool dx", &op, d.x, dx, x_count);
    free(d.x);
    free(d.y);
    free(g);
    free(dx);
}

/* ---- batch norm: finite differences ---------------------------------------------------------
 */

typedef struct bn_data {
    float *x, *y, *gamma, *beta, *mean, *var, *save_mean, *save_invstd;
    float eps;
    int n, c, hw, train;
} bn_data;

static void bn_fd_forward(fd_op *op)
{
    bn_data *d = op->ctx;
    if (d->train)
        batchnorm_forward_train(d->y, d->save_mean, d->save_invstd, d->x, d->gamma, d->beta,
                                d->eps, d->n, d->c, d->hw);
    else
        batchnorm_forward_inference(d->y, d->x, d->gamma, d->beta, d->mean, d->var, d->eps,
                                    d->n, d->c, d->hw);
}

static void check_bn_fd(int train)
{
    bn_data d = {.eps = 1e-5f, .n = 3, .c = 2, .hw = 5, .train = train};
    size_t count = (size_t)d.n * d.c * d.hw, c = (size_t)d.c;
    d.x = alloc_random(count);
    d.y = alloc_floats(count);
    d.gamma = alloc_random(c);
    d.beta = alloc_random(c);
    d.mean = alloc_random(c);
    d.var = alloc_floats(c);
    d.save_mean = alloc_floats(c);
    d.save_invstd = alloc_floats(c);
    for (size_t j = 0; j < c; j++) {
        d.gamma[j] += 1.5f;
        d.var[j] = 0.5f + 0.25f * (float)j;
    }
    float *g = alloc_random(count), *dx = alloc_floats(count);
    float *dgamma = alloc_floats(c), *dbeta = alloc_floats(c);
    bn_fd_forward(&(fd_op){.ctx = &d});
    if (train)
        batchnorm_backward_train(dx, dgamma, dbeta, g, d.x, d.gamma, d.save_mean, d.save_invstd,
                                 d.n, d.c, d.hw);
    else
        batchnorm_backward_inference(dx, dgamma, dbeta, g, d.x, d.gamma, d.mean, d.var, d.eps,
                                     d.n, d.c, d.hw);

    fd_op op = {bn_fd_forward, d.y, count, g, &d};
    fd_check(train ? "batchnorm train dx" : "batchnorm inference dx", &op, d.x, dx, count);
    fd_check(train ? "batchnorm train dgamma" : "batchnorm inference dgamma", &op, d.gamma,
             dgamma, c);
    fd_check(train ? "batchnorm train dbeta" : "batchnorm inference dbeta", &op, d.beta, dbeta,
             c);
    float *all[] = {d.x,         d.y,           d.gamma, d.beta, d.mean, d.var,
                    d.save_mean, d.save_invstd, g,       dx,     dgamma, dbeta};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        free(all[i]);
}

static void test_batchnorm_finite_differences(void)
{
    check_bn_fd(0);
    check_bn_fd(1);
}

/* ---- concat and zero padding: finite differences
 * ------------------------------------------------ */

typedef struct concat_data {
    float *xs[3], *y;
    int channels[3], n, hw;
} concat_data;

static void concat_fd_forward(fd_op *op)
{
    concat_data *d = op->ctx;
    const float *xs[3] = {d->xs[0], d->xs[1], d->xs[2]};
    concat_forward(d->y, xs, d->channels, 3, d->n, d->hw);
}

static void test_concat_finite_differences(void)
{
    concat_data d = {.channels = {2, 1, 3}, .n = 2, .hw = 4};
    size_t y_count = (size_t)d.n * 6 * d.hw;
    float *dxs[3];
    for (int i = 0; i < 3; i++) {
        d.xs[i] = alloc_random((size_t)d.n * d.channels[i] * d.hw);
        dxs[i] = alloc_floats((size_t)d.n * d.channels[i] * d.hw);
    }
    d.y = alloc_floats(y_count);
    float *g = alloc_random(y_count);
    concat_backward(dxs, g, d.channels, 3, d.n, d.hw);
    fd_op op = {concat_fd_forward, d.y, y_count, g, &d};
    const char *names[3] = {"concat dx0", "concat dx1", "concat dx2"};
    for (int i = 0; i < 3; i++)
        fd_check(names[i], &op, d.xs[i], dxs[i], (size_t)d.n * d.channels[i] * d.hw);
    for (int i = 0; i < 3; i++) {
        free(d.xs[i]);
        free(dxs[i]);
    }
    free(d.y);
    free(g);
}

typedef struct zeropad_data {
    float *x, *y;
    int n, c, h, w, top, bottom, left, right;
} zeropad_data;

static void zeropad_fd_forward(fd_op *op)
{
    zeropad_data *d = op->ctx;
    zeropad2d_forward(d->y, d->x, d->n, d->c, d->h, d->w, d->top, d->bottom, d->left, d->right);
}

static void test_zeropad_finite_differences(void)
{
    zeropad_data d = {
        .n = 2, .c = 2, .h = 3, .w = 4, .top = 0, .bottom = 1, .left = 2, .right = 1};
    size_t x_count = (size_t)d.n * d.c * d.h * d.w;
    size_t y_count = (size_t)d.n * d.c * (d.h + 1) * (d.w + 3);
    d.x = alloc_random(x_count);
    d.y = alloc_floats(y_count);
    float *g = alloc_random(y_count), *dx = alloc_floats(x_count);
    zeropad2d_backward(dx, g, d.n, d.c, d.h, d.w, d.top, d.bottom, d.left, d.right);
    fd_op op = {zeropad_fd_forward, d.y, y_count, g, &d};
    fd_check("zeropad dx", &op, d.x, dx, x_count);
    free(d.x);
    free(d.y);
    free(g);
    free(dx);
}

/* ---- hand-computed cases
 * ---------------------------------------------------------------------- */

/* x = 1..9 (3x3), w = [[1, 2], [3, 4]], b = 0.5, no padding. */
static void test_conv_hand_2x2(void)
{
    top_error err;
    top_error_clear(&err);
    conv2d_shape s = {.n = 1,
                      .c = 1,
                      .h = 3,
                      .w = 3,
                      .k = 1,
                      .r = 2,
                      .s = 2,
                      .stride_h = 1,
                      .stride_w = 1,
                      .dilation_h = 1,
                      .dilation_w = 1,
                      .groups = 1};
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_OK);
    CHECK_INT_EQ(s.p, 2);
    CHECK_INT_EQ(s.q, 2);
    const float x[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9}, w[4] = {1, 2, 3, 4}, b[1] = {0.5f};
    const float y_expected[4] = {37.5f, 47.5f, 67.5f, 77.5f};
    const float dy[4] = {1, 1, 1, 1};
    const float dx_expected[9] = {1, 3, 2, 4, 10, 6, 3, 7, 4};
    const float dw_expected[4] = {12, 16, 24, 28}, db_expected[1] = {4};
    float *work = alloc_floats(conv2d_workspace_floats(&s));
    for (int naive = 0; naive <= 1; naive++) {
        float y[4], dx[9] = {0}, dw[4] = {0}, db[1] = {0};
        if (naive) {
            conv2d_forward_naive(y, x, w, b, &s);
            conv2d_backward_naive(dx, dw, db, dy, x, w, &s);
        } else {
            conv2d_forward(y, x, w, b, &s, work);
            conv2d_backward(dx, dw, db, dy, x, w, &s, work);
        }
        check_arrays(naive ? "naive y" : "fast y", y, y_expected, 4, EXACT_TOL);
        check_arrays(naive ? "naive dx" : "fast dx", dx, dx_expected, 9, EXACT_TOL);
        check_arrays(naive ? "naive dw" : "fast dw", dw, dw_expected, 4, EXACT_TOL);
        check_arrays(naive ? "naive db" : "fast db", db, db_expected, 1, EXACT_TOL);
    }
    free(work);
}

/* TF "same" with stride 2 on 4x4: one extra row and column of zeros at the
 * bottom and right only. x = 0..15, 3x3 kernel of ones. */
static void test_conv_hand_tf_same_stride2(void)
{
    top_error err;
    top_error_clear(&err);
    conv2d_shape s = {.n = 1,
                      .c = 1,
                      .h = 4,
                      .w = 4,
                      .k = 1,
                      .r = 3,
                      .s = 3,
                      .stride_h = 2,
                      .stride_w = 2,
                      .dilation_h = 1,
                      .dilation_w = 1,
                      .pad_bottom = 1,
                      .pad_right = 1,
                      .groups = 1};
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_OK);
    CHECK_INT_EQ(s.p, 2);
    CHECK_INT_EQ(s.q, 2);
    float x[16], w[9], y[4], y_naive[4];
    for (int i = 0; i < 16; i++)
        x[i] = (float)i;
    for (int i = 0; i < 9; i++)
        w[i] = 1.0f;
    const float y_expected[4] = {45, 39, 66, 50};
    float *work = alloc_floats(conv2d_workspace_floats(&s));
    conv2d_forward(y, x, w, NULL, &s, work);
    conv2d_forward_naive(y_naive, x, w, NULL, &s);
    check_arrays("fast y", y, y_expected, 4, EXACT_TOL);
    check_arrays("naive y", y_naive, y_expected, 4, EXACT_TOL);
    free(work);
}

/* Depthwise with multiplier 2: output channel k reads input channel k / 2. */
static void test_conv_hand_depthwise_multiplier(void)
{
    top_error err;
    top_error_clear(&err);
    conv2d_shape s = {.n = 1,
                      .c = 2,
                      .h = 1,
                      .w = 2,
                      .k = 4,
                      .r = 1,
                      .s = 1,
                      .stride_h = 1,
                      .stride_w = 1,
                      .dilation_h = 1,
                      .dilation_w = 1,
                      .groups = 2};
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_OK);
    const float x[4] = {1, 2, 10, 20}, w[4] = {1, 2, 3, 4}, b[4] = {0, 0, 0, 0.5f};
    const float y_expected[8] = {1, 2, 2, 4, 30, 60, 40.5f, 80.5f};
    float y[8], *work = alloc_floats(conv2d_workspace_floats(&s));
    conv2d_forward(y, x, w, b, &s, work);
    check_arrays("depthwise y", y, y_expected, 8, EXACT_TOL);
    float dy[8] = {1, 1, 1, 1, 1, 1, 1, 1}, dx[4] = {0}, dw[4] = {0};
    const float dx_expected[4] = {3, 3, 7, 7}, dw_expected[4] = {3, 3, 30, 30};
    conv2d_backward(dx, dw, NULL, dy, x, w, &s, work);
    check_arrays("depthwise dx", dx, dx_expected, 4, EXACT_TOL);
    check_arrays("depthwise dw", dw, dw_expected, 4, EXACT_TOL);
    free(work);
}

/* All-negative 2x2 input, 2x2 window, stride 1, padding 1: padding never wins. */
static void test_maxpool_hand_ignores_padding(void)
{
    top_error err;
    top_error_clear(&err);
    pool2d_shape s = {.n = 1,
                      .c = 1,
                      .h = 2,
                      .w = 2,
                      .r = 2,
                      .s = 2,
                      .stride_h = 1,
                      .stride_w = 1,
                      .pad_top = 1,
                      .pad_bottom = 1,
                      .pad_left = 1,
                      .pad_right = 1};
    CHECK_INT_EQ(pool2d_shape_derive(&s, &err), TOP_OK);
    CHECK_INT_EQ(s.p, 3);
    CHECK_INT_EQ(s.q, 3);
    const float x[4] = {-5, -3, -4, -6};
    const float y_expected[9] = {-5, -3, -3, -4, -3, -3, -4, -4, -6};
    const float dy[9] = {1, 1, 1, 1, 1, 1, 1, 1, 1}, dx_expected[4] = {1, 4, 3, 1};
    float y[9], dx[4] = {0};
    maxpool2d_forward(y, x, &s);
    maxpool2d_backward(dx, dy, x, &s);
    check_arrays("maxpool y", y, y_expected, 9, EXACT_TOL);
    check_arrays("maxpool dx", dx, dx_expected, 4, EXACT_TOL);
}

/* Ties go to the first maximum in row-major order; all-padding windows give 0. */
static void test_maxpool_hand_ties_and_empty(void)
{
    top_error err;
    top_error_clear(&err);
    pool2d_shape tie = {
        .n = 1, .c = 1, .h = 2, .w = 2, .r = 2, .s = 2, .stride_h = 1, .stride_w = 1};
    CHECK_INT_EQ(pool2d_shape_derive(&tie, &err), TOP_OK);
    const float x[4] = {1, 2, 2, 2}, dy[1] = {1}, dx_expected[4] = {0, 1, 0, 0};
    float y[1], dx[4] = {0};
    maxpool2d_forward(y, x, &tie);
    maxpool2d_backward(dx, dy, x, &tie);
    CHECK_CLOSE(y[0], 2.0, EXACT_TOL);
    check_arrays("maxpool tie dx", dx, dx_expected, 4, EXACT_TOL);

    /* A NaN wins the window, as in PyTorch, and the first NaN gets the gradient. */
    const float with_nan[4] = {5, NAN, 7, NAN}, dx_nan_expected[4] = {0, 1, 0, 0};
    float dx_nan[4] = {0};
    maxpool2d_forward(y, with_nan, &tie);
    maxpool2d_backward(dx_nan, dy, with_nan, &tie);
    CHECK_MSG(isnan(y[0]), "maxpool of a window with NaN = %g, expected NaN", y[0]);
    check_arrays("maxpool nan dx", dx_nan, dx_nan_expected, 4, EXACT_TOL);

    /* 1x1 input, 1x1 window, padding 1: only the centre window reads x. */
    pool2d_shape empty = {.n = 1,
                          .c = 1,
                          .h = 1,
                          .w = 1,
                          .r = 1,
                          .s = 1,
                          .stride_h = 1,
                          .stride_w = 1,
                          .pad_top = 1,
                          .pad_bottom = 1,
                          .pad_left = 1,
                          .pad_right = 1};
    CHECK_INT_EQ(pool2d_shape_derive(&empty, &err), TOP_OK);
    const float one[1] = {-7};
    const float y_expected[9] = {0, 0, 0, 0, -7, 0, 0, 0, 0};
    float y9[9], dy9[9], dx1[1] = {0};
    for (int i = 0; i < 9; i++)
        dy9[i] = (float)(i + 1);
    maxpool2d_forward(y9, one, &empty);
    check_arrays("maxpool empty y", y9, y_expected, 9, EXACT_TOL);
    maxpool2d_backward(dx1, dy9, one, &empty);
    CHECK_CLOSE(dx1[0], 5.0, EXACT_TOL);
    empty.count_include_pad = 0;
    avgpool2d_forward(y9, one, &empty);
    check_arrays("avgpool empty y", y9, y_expected, 9, EXACT_TOL);
    dx1[0] = 0;
    avgpool2d_backward(dx1, dy9, &empty);
    CHECK_CLOSE(dx1[0], 5.0, EXACT_TOL);
}

/* x = 1..9, 3x3 window, stride 1, padding 1; the corner window contains
 * 1, 2, 4, 5 and 5 padded cells. */
static void test_avgpool_hand_corner(void)
{
    top_error err;
    top_error_clear(&err);
    const float x[9] = {1, 2, 3, 4, 5, 6, 7, 8, 9};
    for (int include = 0; include <= 1; include++) {
        pool2d_shape s = {.n = 1,
                          .c = 1,
                          .h = 3,
                          .w = 3,
                          .r = 3,
                          .s = 3,
                          .stride_h = 1,
                          .stride_w = 1,
                          .pad_top = 1,
                          .pad_bottom = 1,
                          .pad_left = 1,
                          .pad_right = 1,
                          .count_include_pad = include};
        CHECK_INT_EQ(pool2d_shape_derive(&s, &err), TOP_OK);
        float y[9], dy[9] = {1, 0, 0, 0, 0, 0, 0, 0, 0}, dx[9] = {0};
        avgpool2d_forward(y, x, &s);
        avgpool2d_backward(dx, dy, &s);
        double divisor = include ? 9.0 : 4.0;
        CHECK_CLOSE_AT(y[0], 12.0 / divisor, EXACT_TOL, include);
        CHECK_CLOSE_AT(y[4], 5.0, EXACT_TOL, include);
        /* top edge: 1+2+3+4+5+6 over 9 or 6 cells */
        CHECK_CLOSE_AT(y[1], 21.0 / (include ? 9.0 : 6.0), EXACT_TOL, include);
        const int corner[4] = {0, 1, 3, 4};
        for (int i = 0; i < 4; i++)
            CHECK_CLOSE_AT(dx[corner[i]], 1.0 / divisor, EXACT_TOL, corner[i]);
        CHECK_CLOSE_AT(dx[2], 0.0, 0.0, 2);
        CHECK_CLOSE_AT(dx[8], 0.0, 0.0, 8);
    }
}

static void test_global_avgpool_hand(void)
{
    const float x[8] = {1, 2, 3, 4, -1, -1, -1, 3}, dy[2] = {2, -4};
    const float y_expected[2] = {2.5f, 0},
                dx_expected[8] = {.5f, .5f, .5f, .5f, -1, -1, -1, -1};
    float y[2], dx[8] = {0};
    global_avgpool_forward(y, x, 1, 2, 4);
    global_avgpool_backward(dx, dy, 1, 2, 4);
    check_arrays("global avgpool y", y, y_expected, 2, EXACT_TOL);
    check_arrays("global avgpool dx", dx, dx_expected, 8, EXACT_TOL);
}

/* One channel, x = [1, 3], gamma 2, beta 1, mean 1, var 3, eps 1: y = x. */
static void test_batchnorm_hand_inference(void)
{
    const float x[2] = {1, 3}, gamma[1] = {2}, beta[1] = {1}, mean[1] = {1}, var[1] = {3};
    const float dy[2] = {1, 1};
    float y[2], dx[2] = {0}, dgamma[1] = {0}, dbeta[1] = {0};
    batchnorm_forward_inference(y, x, gamma, beta, mean, var, 1.0f, 2, 1, 1);
    check_arrays("batchnorm inference y", y, x, 2, EXACT_TOL);
    batchnorm_backward_inference(dx, dgamma, dbeta, dy, x, gamma, mean, var, 1.0f, 2, 1, 1);
    CHECK_CLOSE_AT(dx[0], 1.0, EXACT_TOL, 0);
    CHECK_CLOSE_AT(dx[1], 1.0, EXACT_TOL, 1);
    CHECK_CLOSE(dgamma[0], 1.0, EXACT_TOL);
    CHECK_CLOSE(dbeta[0], 2.0, EXACT_TOL);
}

/* N = 2, C = 2, HW = 2, eps = 0. Channel 0 contains -1, 1, -1, 1 (mean 0,
 * biased variance 1, unbiased 4/3); channel 1 contains 0, 2, 4, 6 (mean 3,
 * biased variance 5). */
static void test_batchnorm_hand_train(void)
{
    const float x[8] = {-1, 1, 0, 2, -1, 1, 4, 6};
    const float gamma[2] = {2, 1}, beta[2] = {0.5f, 0};
    float y[8], save_mean[2], save_invstd[2];
    batchnorm_forward_train(y, save_mean, save_invstd, x, gamma, beta, 0.0f, 2, 2, 2);
    CHECK_CLOSE_AT(save_mean[0], 0.0, EXACT_TOL, 0);
    CHECK_CLOSE_AT(save_invstd[0], 1.0, EXACT_TOL, 0);
    CHECK_CLOSE_AT(save_mean[1], 3.0, EXACT_TOL, 1);
    CHECK_CLOSE_AT(save_invstd[1], 1.0 / sqrt(5.0), EXACT_TOL, 1);
    const float y_expected_c0[4] = {-1.5f, 2.5f, -1.5f, 2.5f};
    const int c0[4] = {0, 1, 4, 5};
    for (int i = 0; i < 4; i++)
        CHECK_CLOSE_AT(y[c0[i]], y_expected_c0[i], EXACT_TOL, c0[i]);
    CHECK_CLOSE_AT(y[7], 3.0 / sqrt(5.0), EXACT_TOL, 7);

    /* dy = 1 at the first cell of channel 0: mean(dy) = 1/4, mean(dy*xhat) = -1/4,
     * dx = gamma * (dy - 1/4 + xhat/4) = [1, -1, 0, 0] over that channel. */
    const float dy[8] = {1, 0, 0, 0, 0, 0, 0, 0};
    float dx[8] = {0}, dgamma[2] = {0}, dbeta[2] = {0};
    batchnorm_backward_train(dx, dgamma, dbeta, dy, x, gamma, save_mean, save_invstd, 2, 2, 2);
    const float dx_expected[8] = {1, 0, 0, 0, -1, 0, 0, 0};
    check_arrays("batchnorm train dx", dx, dx_expected, 8, EXACT_TOL);
    CHECK_CLOSE_AT(dgamma[0], -1.0, EXACT_TOL, 0);
    CHECK_CLOSE_AT(dbeta[0], 1.0, EXACT_TOL, 0);
    CHECK_CLOSE_AT(dgamma[1], 0.0, 0.0, 1);
}

static void test_concat_hand(void)
{
    const float a[4] = {1, 2, 3, 4}, b[8] = {5, 6, 7, 8, 9, 10, 11, 12};
    const float *xs[2] = {a, b};
    const int channels[2] = {1, 2};
    const float y_expected[12] = {1, 2, 5, 6, 7, 8, 3, 4, 9, 10, 11, 12};
    float y[12], db[8] = {0};
    concat_forward(y, xs, channels, 2, 2, 2);
    check_arrays("concat y", y, y_expected, 12, EXACT_TOL);
    float *dxs[2] = {NULL, db};
    concat_backward(dxs, y, channels, 2, 2, 2);
    check_arrays("concat db", db, b, 8, EXACT_TOL);
}

static void test_zeropad_and_layout_hand(void)
{
    const float x[4] = {1, 2, 3, 4};
    const float y_expected[12] = {0, 0, 0, 0, 1, 2, 0, 0, 3, 4, 0, 0};
    float y[12], dx[4] = {0};
    zeropad2d_forward(y, x, 1, 1, 2, 2, 1, 0, 0, 2);
    check_arrays("zeropad y", y, y_expected, 12, EXACT_TOL);
    zeropad2d_backward(dx, y, 1, 1, 2, 2, 1, 0, 0, 2);
    check_arrays("zeropad dx", dx, x, 4, EXACT_TOL);

    /* (N=2, C=2, H=1, W=3) */
    const float nchw[12] = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12};
    const float nhwc_expected[12] = {1, 4, 2, 5, 3, 6, 7, 10, 8, 11, 9, 12};
    float nhwc[12], back[12];
    nchw_to_nhwc(nhwc, nchw, 2, 2, 1, 3);
    check_arrays("nhwc", nhwc, nhwc_expected, 12, EXACT_TOL);
    nhwc_to_nchw(back, nhwc, 2, 2, 1, 3);
    check_arrays("nchw", back, nchw, 12, EXACT_TOL);
}

/* ---- backward accumulates
 * ---------------------------------------------------------------------- */

static void test_conv_backward_accumulates(void)
{
    static const size_t picks[] = {0, 2, 8};
    for (size_t i = 0; i < sizeof picks / sizeof picks[0]; i++) {
        conv_data d;
        if (conv_data_init(&d, &conv_cases[picks[i]]))
            continue;
        size_t kb = (size_t)d.s.k;
        float *dx = alloc_floats(d.x_count), *dw = alloc_floats(d.w_count),
              *db = alloc_floats(kb);
        conv2d_backward(dx, dw, db, d.g, d.x, d.w, &d.s, d.work);
        float *dx1 = alloc_copy(dx, d.x_count), *dw1 = alloc_copy(dw, d.w_count);
        float *db1 = alloc_copy(db, kb);
        conv2d_backward(dx, dw, db, d.g, d.x, d.w, &d.s, d.work);
        check_doubled(conv_cases[picks[i]].name, dx, dx1, d.x_count);
        check_doubled(conv_cases[picks[i]].name, dw, dw1, d.w_count);
        check_doubled(conv_cases[picks[i]].name, db, db1, kb);
        free(dx);
        free(dw);
        free(db);
        free(dx1);
        free(dw1);
        free(db1);
        conv_data_free(&d);
    }
}

static void test_pool_backward_accumulates(void)
{
    top_error err;
    top_error_clear(&err);
    pool2d_shape s = {.n = 1,
                      .c = 2,
                      .h = 5,
                      .w = 5,
                      .r = 3,
                      .s = 3,
                      .stride_h = 2,
                      .stride_w = 2,
                      .pad_top = 1,
                      .pad_bottom = 1,
                      .pad_left = 1,
                      .pad_right = 1};
    CHECK_INT_EQ(pool2d_shape_derive(&s, &err), TOP_OK);
    size_t xc = 50, yc = (size_t)2 * s.p * s.q;
    float *x = alloc_distinct(xc), *dy = alloc_random(yc);
    float *dx = alloc_floats(xc), *once = alloc_floats(xc);
    maxpool2d_backward(once, dy, x, &s);
    maxpool2d_backward(dx, dy, x, &s);
    maxpool2d_backward(dx, dy, x, &s);
    check_doubled("maxpool dx", dx, once, xc);
    memset(dx, 0, xc * sizeof *dx);
    memset(once, 0, xc * sizeof *once);
    avgpool2d_backward(once, dy, &s);
    avgpool2d_backward(dx, dy, &s);
    avgpool2d_backward(dx, dy, &s);
    check_doubled("avgpool dx", dx, once, xc);
    memset(dx, 0, xc * sizeof *dx);
    memset(once, 0, xc * sizeof *once);
    global_avgpool_backward(once, dy, 2, 5, 5);
    global_avgpool_backward(dx, dy, 2, 5, 5);
    global_avgpool_backward(dx, dy, 2, 5, 5);
    check_doubled("global avgpool dx", dx, once, xc);
    free(x);
    free(dy);
    free(dx);
    free(once);
}

static void test_batchnorm_backward_accumulates(void)
{
    int n = 2, c = 3, hw = 4;
    size_t count = 24;
    float *x = alloc_random(count), *dy = alloc_random(count), *gamma = alloc_random(3);
    float *var = alloc_floats(3), *mean = alloc_random(3);
    float save_mean[3], save_invstd[3], *y = alloc_floats(count);
    for (int j = 0; j < 3; j++)
        var[j] = 1.0f + (float)j;
    batchnorm_forward_train(y, save_mean, save_invstd, x, gamma, gamma, 1e-5f, n, c, hw);
    for (int train = 0; train <= 1; train++) {
        float *dx = alloc_floats(count), *dg = alloc_floats(3), *dbeta = alloc_floats(3);
        for (int call = 0; call < 2; call++) {
            if (call == 1) {
                float *dx1 = alloc_copy(dx, count), *dg1 = alloc_copy(dg, 3);
                float *db1 = alloc_copy(dbeta, 3);
                if (train)
                    batchnorm_backward_train(dx, dg, dbeta, dy, x, gamma, save_mean,
                                             save_invstd, n, c, hw);
                else
                    batchnorm_backward_inference(dx, dg, dbeta, dy, x, gamma, mean, var, 1e-5f,
                                                 n, c, hw);
                check_doubled(train ? "train dx" : "inference dx", dx, dx1, count);
                check_doubled(train ? "train dgamma" : "inference dgamma", dg, dg1, 3);
                check_doubled(train ? "train dbeta" : "inference dbeta", dbeta, db1, 3);
                free(dx1);
                free(dg1);
                free(db1);
            } else if (train) {
                batchnorm_backward_train(dx, dg, dbeta, dy, x, gamma, save_mean, save_invstd, n,
                                         c, hw);
            } else {
                batchnorm_backward_inference(dx, dg, dbeta, dy, x, gamma, mean, var, 1e-5f, n,
                                             c, hw);
            }
        }
        free(dx);
        free(dg);
        free(dbeta);
    }
    free(x);
    free(dy);
    free(gamma);
    free(var);
    free(mean);
    free(y);
}

static void test_concat_zeropad_backward_accumulates(void)
{
    const int channels[2] = {1, 2};
    float *dy = alloc_random(12), *d0 = alloc_floats(4), *d1 = alloc_floats(8);
    float *dxs[2] = {d0, d1};
    concat_backward(dxs, dy, channels, 2, 2, 2);
    float *once0 = alloc_copy(d0, 4), *once1 = alloc_copy(d1, 8);
    concat_backward(dxs, dy, channels, 2, 2, 2);
    check_doubled("concat dx0", d0, once0, 4);
    check_doubled("concat dx1", d1, once1, 8);

    float *pad_dy = alloc_random(30), *dx = alloc_floats(6);
    zeropad2d_backward(dx, pad_dy, 1, 1, 2, 3, 1, 2, 1, 1);
    float *once = alloc_copy(dx, 6);
    zeropad2d_backward(dx, pad_dy, 1, 1, 2, 3, 1, 2, 1, 1);
    check_doubled("zeropad dx", dx, once, 6);
    float *all[] = {dy, d0, d1, once0, once1, pad_dy, dx, once};
    for (size_t i = 0; i < sizeof all / sizeof all[0]; i++)
        free(all[i]);
}

/* ---- shape validation
 * ---------------------------------------------------------------------------- */

static void test_shape_derive_rejects_bad_input(void)
{
    top_error err;
    conv2d_shape s = {.n = 1,
                      .c = 6,
                      .h = 8,
                      .w = 8,
                      .k = 4,
                      .r = 3,
                      .s = 3,
                      .stride_h = 1,
                      .stride_w = 1,
                      .dilation_h = 1,
                      .dilation_w = 1,
                      .groups = 4};
    top_error_clear(&err);
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_ERR_SHAPE);
    CHECK(strstr(err.message, "groups 4") != NULL);

    s.groups = 2;
    s.r = 5;
    s.dilation_h = 2; /* window 9 on 8 rows */
    top_error_clear(&err);
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_ERR_SHAPE);
    s.pad_top = 1; /* window 9 on 9 rows: one output row */
    top_error_clear(&err);
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_OK);
    CHECK_INT_EQ(s.p, 1);
    CHECK_INT_EQ(s.q, 6);

    s.stride_w = 0;
    top_error_clear(&err);
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_ERR_INVALID);
    s.stride_w = 1;
    s.n = 1 << 20;
    s.h = s.w = 1 << 10;
    s.pad_top = 0;
    s.r = s.s = 1;
    top_error_clear(&err);
    CHECK_INT_EQ(conv2d_shape_derive(&s, &err), TOP_ERR_OVERFLOW);

    pool2d_shape ps = {
        .n = 1, .c = 1, .h = 2, .w = 2, .r = 3, .s = 3, .stride_h = 1, .stride_w = 1};
    top_error_clear(&err);
    CHECK_INT_EQ(pool2d_shape_derive(&ps, &err), TOP_ERR_SHAPE);
    ps.pad_bottom = ps.pad_right = 1;
    top_error_clear(&err);
    CHECK_INT_EQ(pool2d_shape_derive(&ps, &err), TOP_OK);
    CHECK_INT_EQ(ps.p, 1);
    ps.count_include_pad = 2;
    top_error_clear(&err);
    CHECK_INT_EQ(pool2d_shape_derive(&ps, &err), TOP_ERR_INVALID);
}

int main(void)
{
    TEST_RUN(test_conv_fast_matches_naive);
    TEST_RUN(test_conv_backward_skips_null);
    TEST_RUN(test_conv_finite_differences);
    TEST_RUN(test_pool_finite_differences);
    TEST_RUN(test_global_avgpool_finite_differences);
    TEST_RUN(test_batchnorm_finite_differences);
    TEST_RUN(test_concat_finite_differences);
    TEST_RUN(test_zeropad_finite_differences);
    TEST_RUN(test_conv_hand_2x2);
    TEST_RUN(test_conv_hand_tf_same_stride2);
    TEST_RUN(test_conv_hand_depthwise_multiplier);
    TEST_RUN(test_maxpool_hand_ignores_padding);
    TEST_RUN(test_maxpool_hand_ties_and_empty);
    TEST_RUN(test_avgpool_hand_corner);
    TEST_RUN(test_global_avgpool_hand);
    TEST_RUN(test_batchnorm_hand_inference);
    TEST_RUN(test_batchnorm_hand_train);
    TEST_RUN(test_concat_hand);
    TEST_RUN(test_zeropad_and_layout_hand);
    TEST_RUN(test_conv_backward_accumulates);
    TEST_RUN(test_pool_backward_accumulates);
    TEST_RUN(test_batchnorm_backward_accumulates);
    TEST_RUN(test_concat_zeropad_backward_accumulates);
    TEST_RUN(test_shape_derive_rejects_bad_input);
    return TEST_FINISH();
}
