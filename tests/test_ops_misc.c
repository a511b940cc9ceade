/*
 * Tests of the non-convolutional kernels in core/ops_misc.c:
 * - central finite differences of L = sum(y * g) against every backward pass,
 *   for inputs and parameters, scored by |a - n| / max(1, |a|, |n|);
 * - a second backward call doubles every gradient (kernels accumulate);
 * - dense_forward against dense_forward_naive;
 * - PyTorch 1.13 reference values from tests/golden/ops_misc.json (made by
 *   tests/golden/make_ops_misc_golden.py) for gelu, layer norm, softmax,
 *   multi-head self-attention and cross-entropy;
 * - dropout mask statistics and repeatability, add_forward, chunked attention.
 * Run from the repository root, where the fixture path is relative.
 */
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "ops.h"
#include "test.h"

/* Finite differences in float32 with step FD_STEP: normalized error limit. */
#define FD_STEP 1e-3f
#define FD_TOL 1e-2
/* A second backward call must give twice the first gradient to this
 * normalized error (only float rounding of the sum differs). */
#define DOUBLE_TOL 1e-6
/* PyTorch reference: |a - e| <= GOLDEN_ATOL + GOLDEN_RTOL * |e|. */
#define GOLDEN_ATOL 1e-5
#define GOLDEN_RTOL 1e-5
/* Failing elements printed per compared array; the rest are only counted. */
#define MAX_REPORTED 5

#define GOLDEN_PATH "tests/golden/ops_misc.json"
#define MAX_PARAMS 6
#define MAX_BUFFERS 24

/* ---- random numbers and buffers --------------------------------------------- */

static uint64_t rng_state = 0x853c49e6748fea9bULL;

static float rand_uniform(float lo, float hi)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return lo + (hi - lo) * (float)(rng_state >> 40) * 0x1.0p-24f;
}

static void fill_uniform(float *p, size_t count, float lo, float hi)
{
    for (size_t i = 0; i < count; i++)
        p[i] = rand_uniform(lo, hi);
}

/* Values of magnitude in [lo, hi] with a random sign: away from the kink at 0. */
static void fill_away_from_zero(float *p, size_t count, float lo, float hi)
{
    for (size_t i = 0; i < count; i++)
        p[i] = rand_uniform(lo, hi) * (rand_uniform(0.0f, 1.0f) < 0.5f ? -1.0f : 1.0f);
}

static double normalized_error(double a, double n)
{
    double scale = fmax(1.0, fmax(fabs(a), fabs(n)));
    return fabs(a - n) / scale;
}

static double sum_product(const float *y, const float *g, size_t count)
{
    double sum = 0.0;
    for (size_t i = 0; i < count; i++)
        sum += (double)y[i] * g[i];
    return sum;
}

/* ---- gradient-check cases ----------------------------------------------------- */

/* One op under test: its buffers, the differentiated parameters and two
 * callbacks. loss() runs the forward pass and returns L = sum(y * g);
 * backward() runs the forward pass (for saved tensors), then the backward pass
 * with dy = g, accumulating into grad[]. */
typedef struct grad_case {
    const char *name;
    double (*loss)(struct grad_case *c);
    void (*backward)(struct grad_case *c);
    int accumulates; /* 0 for cross-entropy, whose dlogits is overwritten */
    int nparams;
    const char *param_name[MAX_PARAMS];
    float *param[MAX_PARAMS], *grad[MAX_PARAMS];
    size_t count[MAX_PARAMS];

    /* Op buffers; the op's functions give them meaning. */
    float *x, *y, *g, *w, *b, *w2, *b2, *s1, *s2, *s3, *work;
    int32_t *labels;
    size_t rows, size;
    int n, t, d, heads, in, out, index;
    float eps;

    void *allocs[MAX_BUFFERS];
    int nallocs;
} grad_case;

static float *case_alloc(grad_case *c, size_t count)
{
    float *p = calloc(count ? count : 1, sizeof(float));
    if (!p || c->nallocs == MAX_BUFFERS) {
        fprintf(stderr, "test_ops_misc: out of memory or buffer slots\n");
        abort();
    }
    c->allocs[c->nallocs++] = p;
    return p;
}

static void case_free(grad_case *c)
{
    for (int i = 0; i < c->nallocs; i++)
        free(c->allocs[i]);
    free(c->labels);
}

/* Adds a parameter: its buffer and a zeroed gradient buffer of the same size. */
static void case_param(grad_case *c, const char *name, float *param, size_t count)
{
    int k = c->nparams++;
    c->param_name[k] = name;
    c->param[k] = param;
    c->grad[k] = case_alloc(c, count);
    c->count[k] = count;
}

/* Compares the analytic gradient of one parameter with central differences. */
static void check_param_fd(grad_case *c, int k)
{
    float *p = c->param[k];
    const float *analytic = c->grad[k];
    double max_err = 0.0;
    int failures = 0;
    for (size_t i = 0; i < c->count[k]; i++) {
        float v = p[i];
        float hi = v + FD_STEP, lo = v - FD_STEP;
        p[i] = hi;
        double lhi = c->loss(c);
        p[i] = lo;
        double llo = c->loss(c);
        p[i] = v;

        double numeric = (lhi - llo) / ((double)hi - (double)lo);
        double err = normalized_error(analytic[i], numeric);
        max_err = fmax(max_err, err);
        if (!(err <= FD_TOL) && failures++ < MAX_REPORTED)
            TEST_FAIL_AT("%s d%s[%zu]: analytic %.7g, numeric %.7g, normalized error %.3g "
                         "(tolerance %.3g)",
                         c->name, c->param_name[k], i, analytic[i], numeric, err, FD_TOL);
    }
    printf("  %-14s d%-6s max normalized error %.2e over %zu elements (tolerance %.0e)\n",
           c->name, c->param_name[k], max_err, c->count[k], FD_TOL);
}

/* A second backward call on top of the first must double every gradient. */
static void check_doubling(grad_case *c, float *const *first)
{
    c->backward(c);
    for (int k = 0; k < c->nparams; k++) {
        int failures = 0;
        for (size_t i = 0; i < c->count[k]; i++) {
            double expected = 2.0 * first[k][i];
            double err = normalized_error(c->grad[k][i], expected);
            if (!(err <= DOUBLE_TOL) && failures++ < MAX_REPORTED)
                TEST_FAIL_AT("%s d%s[%zu] after two backward calls: %.9g, expected %.9g "
                             "(tolerance %.1g)",
                             c->name, c->param_name[k], i, c->grad[k][i], expected, DOUBLE_TOL);
        }
    }
}

/* Runs the finite-difference and accumulation checks of a case, then frees it. */
static void run_grad_case(grad_case *c)
{
    float *first[MAX_PARAMS];
    c->backward(c);
    for (int k = 0; k < c->nparams; k++) {
        first[k] = case_alloc(c, c->count[k]);
        memcpy(first[k], c->grad[k], c->count[k] * sizeof(float));
    }
    for (int k = 0; k < c->nparams; k++)
        check_param_fd(c, k);
    if (c->accumulates)
        check_doubling(c, first);
    case_free(c);
}

/* ---- elementwise cases -------------------------------------------------------- */

enum { ACT_RELU, ACT_RELU6, ACT_GELU, ACT_SIGMOID, ACT_DROPOUT };

static void act_forward(grad_case *c)
{
    switch (c->index) {
    case ACT_RELU: relu_forward(c->y, c->x, c->size); break;
    case ACT_RELU6: relu6_forward(c->y, c->x, c->size); break;
    case ACT_GELU: gelu_forward(c->y, c->x, c->size); break;
    case ACT_SIGMOID: sigmoid_forward(c->y, c->x, c->size); break;
    default: dropout_forward(c->y, c->x, c->s1, c->size); break;
    }
}

static double act_loss(grad_case *c)
{
    act_forward(c);
    return sum_product(c->y, c->g, c->size);
}

static void act_backward(grad_case *c)
{
    act_forward(c);
    switch (c->index) {
    case ACT_RELU: relu_backward(c->grad[0], c->g, c->x, c->size); break;
    case ACT_RELU6: relu6_backward(c->grad[0], c->g, c->x, c->size); break;
    case ACT_GELU: gelu_backward(c->grad[0], c->g, c->x, c->size); break;
    case ACT_SIGMOID: sigmoid_backward(c->grad[0], c->g, c->y, c->size); break;
    default: dropout_backward(c->grad[0], c->g, c->s1, c->size); break;
    }
}

static void setup_act(grad_case *c, const char *name, int kind)
{
    memset(c, 0, sizeof(*c));
    c->name = name;
    c->loss = act_loss;
    c->backward = act_backward;
    c->accumulates = 1;
    c->index = kind;
    c->size = 64;
    c->x = case_alloc(c, c->size);
    c->y = case_alloc(c, c->size);
    c->g = case_alloc(c, c->size);
    c->s1 = case_alloc(c, c->size);
    fill_uniform(c->g, c->size, -1.0f, 1.0f);
    case_param(c, "x", c->x, c->size);
}

static void test_relu_gradient(void)
{
    grad_case c;
    setup_act(&c, "relu", ACT_RELU);
    fill_away_from_zero(c.x, c.size, 0.05f, 3.0f);
    run_grad_case(&c);
}

static void test_relu6_gradient(void)
{
    grad_case c;
    setup_act(&c, "relu6", ACT_RELU6);
    /* Thirds of the buffer below 0, inside (0, 6) and above 6, off the kinks. */
    for (size_t i = 0; i < c.size; i++) {
        if (i % 3 == 0)
            c.x[i] = rand_uniform(-3.0f, -0.05f);
        else if (i % 3 == 1)
            c.x[i] = rand_uniform(0.05f, 5.95f);
        else
            c.x[i] = rand_uniform(6.05f, 9.0f);
    }
    run_grad_case(&c);
}

static void test_gelu_gradient(void)
{
    grad_case c;
    setup_act(&c, "gelu", ACT_GELU);
    fill_uniform(c.x, c.size, -5.0f, 5.0f);
    run_grad_case(&c);
}

static void test_sigmoid_gradient(void)
{
    grad_case c;
    setup_act(&c, "sigmoid", ACT_SIGMOID);
    fill_uniform(c.x, c.size, -8.0f, 8.0f);
    run_grad_case(&c);
}

static void test_dropout_gradient(void)
{
    grad_case c;
    setup_act(&c, "dropout", ACT_DROPOUT);
    fill_uniform(c.x, c.size, -2.0f, 2.0f);
    dropout_mask(c.s1, c.size, 0.4f, 7);
    run_grad_case(&c);
}

/* ---- softmax, dense, layer norm -------------------------------------------------- */

static double softmax_loss(grad_case *c)
{
    softmax_forward(c->y, c->x, c->rows, c->d);
    return sum_product(c->y, c->g, c->size);
}

static void softmax_backward_case(grad_case *c)
{
    softmax_forward(c->y, c->x, c->rows, c->d);
    softmax_backward(c->grad[0], c->g, c->y, c->rows, c->d);
}

static void test_softmax_gradient(void)
{
    grad_case c;
    memset(&c, 0, sizeof(c));
    c.name = "softmax";
    c.loss = softmax_loss;
    c.backward = softmax_backward_case;
    c.accumulates = 1;
    c.rows = 4;
    c.d = 7;
    c.size = c.rows * (size_t)c.d;
    c.x = case_alloc(&c, c.size);
    c.y = case_alloc(&c, c.size);
    c.g = case_alloc(&c, c.size);
    fill_uniform(c.x, c.size, -3.0f, 3.0f);
    fill_uniform(c.g, c.size, -1.0f, 1.0f);
    case_param(&c, "x", c.x, c.size);
    run_grad_case(&c);
}

static double dense_loss(grad_case *c)
{
    dense_forward(c->y, c->x, c->w, c->b, c->rows, c->in, c->out);
    return sum_product(c->y, c->g, c->rows * (size_t)c->out);
}

static void dense_backward_case(grad_case *c)
{
    dense_backward(c->grad[0], c->grad[1], c->grad[2], c->g, c->x, c->w, c->rows, c->in,
                   c->out);
}

static void test_dense_gradient(void)
{
    grad_case c;
    memset(&c, 0, sizeof(c));
    c.name = "dense";
    c.loss = dense_loss;
    c.backward = dense_backward_case;
    c.accumulates = 1;
    c.rows = 6;
    c.in = 5;
    c.out = 4;
    c.x = case_alloc(&c, c.rows * 5);
    c.w = case_alloc(&c, 4 * 5);
    c.b = case_alloc(&c, 4);
    c.y = case_alloc(&c, c.rows * 4);
    c.g = case_alloc(&c, c.rows * 4);
    fill_uniform(c.x, c.rows * 5, -1.0f, 1.0f);
    fill_uniform(c.w, 20, -1.0f, 1.0f);
    fill_uniform(c.b, 4, -1.0f, 1.0f);
    fill_uniform(c.g, c.rows * 4, -1.0f, 1.0f);
    case_param(&c, "x", c.x, c.rows * 5);
    case_param(&c, "w", c.w, 20);
    case_param(&c, "b", c.b, 4);
    run_grad_case(&c);
}

static double layernorm_loss(grad_case *c)
{
    layernorm_forward(c->y, c->s1, c->s2, c->x, c->w, c->b, c->eps, c->rows, c->d);
    return sum_product(c->y, c->g, c->size);
}

static void layernorm_backward_case(grad_case *c)
{
    layernorm_forward(c->y, c->s1, c->s2, c->x, c->w, c->b, c->eps, c->rows, c->d);
    layernorm_backward(c->grad[0], c->grad[1], c->grad[2], c->g, c->x, c->s1, c->s2, c->w,
                       c->rows, c->d);
}

static void test_layernorm_gradient(void)
{
    grad_case c;
    memset(&c, 0, sizeof(c));
    c.name = "layernorm";
    c.loss = layernorm_loss;
    c.backward = layernorm_backward_case;
    c.accumulates = 1;
    c.rows = 5;
    c.d = 9;
    c.eps = 1e-5f;
    c.size = c.rows * (size_t)c.d;
    c.x = case_alloc(&c, c.size);
    c.y = case_alloc(&c, c.size);
    c.g = case_alloc(&c, c.size);
    c.w = case_alloc(&c, (size_t)c.d);
    c.b = case_alloc(&c, (size_t)c.d);
    c.s1 = case_alloc(&c, c.rows);
    c.s2 = case_alloc(&c, c.rows);
    fill_uniform(c.x, c.size, -2.0f, 2.0f);
    fill_uniform(c.g, c.size, -1.0f, 1.0f);
    fill_uniform(c.w, (size_t)c.d, 0.5f, 1.5f);
    fill_uniform(c.b, (size_t)c.d, -0.5f, 0.5f);
    case_param(&c, "x", c.x, c.size);
    case_param(&c, "gamma", c.w, (size_t)c.d);
    case_param(&c, "beta", c.b, (size_t)c.d);
    run_grad_case(&c);
}

/* ---- attention and tokens ---------------------------------------------------------- */

static double mhsa_loss(grad_case *c)
{
    mhsa_forward(c->y, c->s1, c->s2, c->s3, c->x, c->w, c->b, c->w2, c->b2, c->n, c->t, c->d,
                 c->heads, c->work);
    return sum_product(c->y, c->g, c->size);
}

static void mhsa_backward_case(grad_case *c)
{
    mhsa_loss(c);
    mhsa_backward(c->grad[0], c->grad[1], c->grad[2], c->grad[3], c->grad[4], c->g, c->x, c->s1,
                  c->s2, c->s3, c->w, c->w2, c->n, c->t, c->d, c->heads, c->work);
}

/* Allocates and fills an attention case; the caller adds parameters. */
static void setup_mhsa(grad_case *c, int n, int t, int d, int heads)
{
    memset(c, 0, sizeof(*c));
    c->name = "mhsa";
    c->loss = mhsa_loss;
    c->backward = mhsa_backward_case;
    c->accumulates = 1;
    c->n = n;
    c->t = t;
    c->d = d;
    c->heads = heads;
    size_t dd = (size_t)d, tokens = (size_t)n * (size_t)t;
    c->size = tokens * dd;
    c->x = case_alloc(c, c->size);
    c->y = case_alloc(c, c->size);
    c->g = case_alloc(c, c->size);
    c->w = case_alloc(c, 3 * dd * dd);
    c->b = case_alloc(c, 3 * dd);
    c->w2 = case_alloc(c, dd * dd);
    c->b2 = case_alloc(c, dd);
    c->s1 = case_alloc(c, 3 * c->size);
    c->s2 = case_alloc(c, (size_t)n * (size_t)heads * (size_t)t * (size_t)t);
    c->s3 = case_alloc(c, c->size);
    c->work = case_alloc(c, mhsa_workspace_floats(t, d, heads));
    fill_uniform(c->x, c->size, -1.0f, 1.0f);
    fill_uniform(c->g, c->size, -1.0f, 1.0f);
    fill_uniform(c->w, 3 * dd * dd, -0.6f, 0.6f);
    fill_uniform(c->b, 3 * dd, -0.3f, 0.3f);
    fill_uniform(c->w2, dd * dd, -0.6f, 0.6f);
    fill_uniform(c->b2, dd, -0.3f, 0.3f);
}

static void test_mhsa_gradient(void)
{
    grad_case c;
    setup_mhsa(&c, 2, 5, 8, 2);
    case_param(&c, "x", c.x, c.size);
    case_param(&c, "w_qkv", c.w, 3 * 8 * 8);
    case_param(&c, "b_qkv", c.b, 3 * 8);
    case_param(&c, "w_out", c.w2, 8 * 8);
    case_param(&c, "b_out", c.b2, 8);
    run_grad_case(&c);
}

static double patch_loss(grad_case *c)
{
    patch_tokens_forward(c->y, c->x, c->w, c->b, c->n, c->d, c->t);
    return sum_product(c->y, c->g, c->size);
}

static void patch_backward_case(grad_case *c)
{
    patch_tokens_backward(c->grad[0], c->grad[1], c->grad[2], c->g, c->n, c->d, c->t);
}

static void test_patch_tokens_gradient(void)
{
    grad_case c;
    memset(&c, 0, sizeof(c));
    c.name = "patch_tokens";
    c.loss = patch_loss;
    c.backward = patch_backward_case;
    c.accumulates = 1;
    c.n = 3;
    c.d = 4;
    c.t = 6; /* patches per sample (HW) */
    size_t patches = 3 * 4 * 6, tokens = 7;
    c.size = 3 * tokens * 4;
    c.x = case_alloc(&c, patches);
    c.w = case_alloc(&c, 4);
    c.b = case_alloc(&c, tokens * 4);
    c.y = case_alloc(&c, c.size);
    c.g = case_alloc(&c, c.size);
    fill_uniform(c.x, patches, -1.0f, 1.0f);
    fill_uniform(c.w, 4, -1.0f, 1.0f);
    fill_uniform(c.b, tokens * 4, -1.0f, 1.0f);
    fill_uniform(c.g, c.size, -1.0f, 1.0f);
    case_param(&c, "patch", c.x, patches);
    case_param(&c, "cls", c.w, 4);
    case_param(&c, "pos", c.b, tokens * 4);
    run_grad_case(&c);
}

static double select_loss(grad_case *c)
{
    token_select_forward(c->y, c->x, c->n, c->t, c->d, c->index);
    return sum_product(c->y, c->g, (size_t)c->n * (size_t)c->d);
}

static void select_backward_case(grad_case *c)
{
    token_select_backward(c->grad[0], c->g, c->n, c->t, c->d, c->index);
}

static void test_token_select_gradient(void)
{
    grad_case c;
    memset(&c, 0, sizeof(c));
    c.name = "token_select";
    c.loss = select_loss;
    c.backward = select_backward_case;
    c.accumulates = 1;
    c.n = 2;
    c.t = 4;
    c.d = 3;
    c.index = 2;
    c.size = 2 * 4 * 3;
    c.x = case_alloc(&c, c.size);
    c.y = case_alloc(&c, 6);
    c.g = case_alloc(&c, 6);
    fill_uniform(c.x, c.size, -1.0f, 1.0f);
    fill_uniform(c.g, 6, -1.0f, 1.0f);
    case_param(&c, "x", c.x, c.size);
    run_grad_case(&c);
}

/* L is the loss itself here, not sum(y * g). */
static double cross_entropy_loss(grad_case *c)
{
    return cross_entropy_forward_backward(NULL, c->x, c->labels, c->n, c->d);
}

static void cross_entropy_backward_case(grad_case *c)
{
    cross_entropy_forward_backward(c->grad[0], c->x, c->labels, c->n, c->d);
}

static void test_cross_entropy_gradient(void)
{
    grad_case c;
    memset(&c, 0, sizeof(c));
    c.name = "cross_entropy";
    c.loss = cross_entropy_loss;
    c.backward = cross_entropy_backward_case;
    c.accumulates = 0;
    c.n = 4;
    c.d = 6;
    c.x = case_alloc(&c, 24);
    c.labels = malloc(4 * sizeof(int32_t));
    CHECK(c.labels != NULL);
    if (!c.labels) {
        case_free(&c);
        return;
    }
    fill_uniform(c.x, 24, -4.0f, 4.0f);
    for (int i = 0; i < 4; i++)
        c.labels[i] = (int32_t)((i * 5 + 1) % 6);
    case_param(&c, "logits", c.x, 24);
    run_grad_case(&c);
}

/* ---- direct checks ------------------------------------------------------------------ */

static void test_dense_matches_naive(void)
{
    /* Odd sizes, with and without bias, one large enough for threaded sgemm. */
    static const int sizes[][3] = {{1, 1, 1}, {37, 65, 33}, {197, 256, 300}};
    for (size_t s = 0; s < sizeof(sizes) / sizeof(sizes[0]); s++) {
        size_t rows = (size_t)sizes[s][0];
        int in = sizes[s][1], out = sizes[s][2];
        float *x = malloc(rows * (size_t)in * sizeof(float));
        float *w = malloc((size_t)out * (size_t)in * sizeof(float));
        float *b = malloc((size_t)out * sizeof(float));
        float *y = malloc(rows * (size_t)out * sizeof(float));
        float *ref = malloc(rows * (size_t)out * sizeof(float));
        CHECK(x && w && b && y && ref);
        if (x && w && b && y && ref) {
            fill_uniform(x, rows * (size_t)in, -1.0f, 1.0f);
            fill_uniform(w, (size_t)out * (size_t)in, -1.0f, 1.0f);
            fill_uniform(b, (size_t)out, -1.0f, 1.0f);
            /* Float sums of `in` products of magnitude <= 1 drift by about
             * in * 2^-24 * sqrt(in); 1e-6 * in bounds that with margin. */
            double tol = 1e-6 * in;
            for (int with_bias = 0; with_bias < 2; with_bias++) {
                const float *bias = with_bias ? b : NULL;
                dense_forward(y, x, w, bias, rows, in, out);
                dense_forward_naive(ref, x, w, bias, rows, in, out);
                int failures = 0;
                for (size_t i = 0; i < rows * (size_t)out; i++)
                    if (!(fabs(y[i] - ref[i]) <= tol) && failures++ < MAX_REPORTED)
                        TEST_FAIL_AT("dense %zux%dx%d bias=%d y[%zu] = %.9g, naive %.9g "
                                     "(tolerance %.3g)",
                                     rows, in, out, with_bias, i, y[i], ref[i], tol);
            }
        }
        free(x);
        free(w);
        free(b);
        free(y);
        free(ref);
    }
}

static void test_dropout_mask_statistics(void)
{
    const size_t count = 100000;
    const float rate = 0.3f;
    float *m = malloc(count * sizeof(float)), *m2 = malloc(count * sizeof(float));
    CHECK(m && m2);
    if (m && m2) {
        dropout_mask(m, count, rate, 42);
        size_t dropped = 0, other = 0;
        for (size_t i = 0; i < count; i++) {
            if (m[i] == 0.0f)
                dropped++;
            else if (m[i] != 1.0f / (1.0f - rate))
                other++;
        }
        CHECK_INT_EQ(other, 0);
        /* The binomial standard deviation is about 0.0015; allow 0.01. */
        CHECK_CLOSE((double)dropped / count, rate, 0.01);

        dropout_mask(m2, count, rate, 42);
        CHECK(memcmp(m, m2, count * sizeof(float)) == 0);
        dropout_mask(m2, count, rate, 43);
        CHECK(memcmp(m, m2, count * sizeof(float)) != 0);

        dropout_mask(m2, count, 0.0f, 42);
        for (size_t i = 0; i < count; i++)
            CHECK_CLOSE_AT(m2[i], 1.0f, 0.0, i);
        dropout_mask(m2, 16, 1.0f, 42);
        for (size_t i = 0; i < 16; i++)
            CHECK_CLOSE_AT(m2[i], 0.0f, 0.0, i);
    }
    free(m);
    free(m2);
}

/* gelu uses its own vectorised erf and exp, so compare it with double erf on
 * a dense grid, including the tails where 1 + erf(x / sqrt 2) cancels. */
static void test_gelu_matches_erf_grid(void)
{
    const size_t count = 40001;
    const double tol = 1e-6; /* absolute, on y and on dy/dx */
    float *x = malloc(count * sizeof(float)), *y = malloc(count * sizeof(float));
    float *ones = malloc(count * sizeof(float)), *dx = calloc(count, sizeof(float));
    CHECK(x && y && ones && dx);
    if (x && y && ones && dx) {
        for (size_t i = 0; i < count; i++) {
            x[i] = -10.0f + 20.0f * (float)i / (float)(count - 1);
            ones[i] = 1.0f;
        }
        gelu_forward(y, x, count);
        gelu_backward(dx, ones, x, count);
        double max_y = 0.0, max_dx = 0.0;
        for (size_t i = 0; i < count; i++) {
            double xd = x[i], cdf = 0.5 * (1.0 + erf(xd / sqrt(2.0)));
            double ref_y = xd * cdf;
            double ref_dx = cdf + xd * exp(-0.5 * xd * xd) / sqrt(2.0 * M_PI);
            max_y = fmax(max_y, fabs(y[i] - ref_y));
            max_dx = fmax(max_dx, fabs(dx[i] - ref_dx));
            CHECK_CLOSE_AT(y[i], ref_y, tol, i);
            CHECK_CLOSE_AT(dx[i], ref_dx, tol, i);
        }
        printf("  gelu grid max abs error y %.2e, dy/dx %.2e (tolerance %.0e)\n", max_y, max_dx,
               tol);

        float special[3] = {NAN, 0.0f, INFINITY}, out[3];
        gelu_forward(out, special, 3);
        CHECK(isnan(out[0]));
        CHECK_CLOSE(out[1], 0.0, 0.0);
        CHECK(isinf(out[2]));
        CHECK(out[2] > 0.0f);
    }
    free(x);
    free(y);
    free(ones);
    free(dx);
}

/* Softmax of rows with large offsets, -inf entries and a NaN, against double. */
static void test_softmax_extreme_rows(void)
{
    enum { COLS = 6 };
    float x[3][COLS] = {{100.0f, 99.0f, 50.0f, -20.0f, 0.0f, 98.5f},
                        {-1000.0f, -1001.0f, -INFINITY, -1003.0f, -1000.5f, -INFINITY},
                        {1.0f, NAN, 2.0f, 3.0f, 4.0f, 5.0f}};
    float y[3][COLS];
    softmax_forward(&y[0][0], &x[0][0], 3, COLS);
    for (int r = 0; r < 2; r++) {
        double max = x[r][0], sum = 0.0;
        for (int j = 1; j < COLS; j++)
            max = fmax(max, x[r][j]);
        for (int j = 0; j < COLS; j++)
            sum += exp(x[r][j] - max);
        for (int j = 0; j < COLS; j++)
            CHECK_CLOSE_AT(y[r][j], exp(x[r][j] - max) / sum, 1e-7, r * COLS + j);
    }
    CHECK_CLOSE(y[1][2], 0.0, 0.0);
    for (int j = 0; j < COLS; j++)
        CHECK_MSG(isnan(y[2][j]), "softmax of a row with a NaN: y[2][%d] = %g, expected NaN", j,
                  y[2][j]);
}

/* A NaN input gives a NaN output, so a diverging model is not hidden. */
static void test_activation_nan_propagates(void)
{
    float x = NAN, y = 0.0f;
    relu_forward(&y, &x, 1);
    CHECK_MSG(isnan(y), "relu(NaN) = %g, expected NaN", y);
    relu6_forward(&y, &x, 1);
    CHECK_MSG(isnan(y), "relu6(NaN) = %g, expected NaN", y);
    sigmoid_forward(&y, &x, 1);
    CHECK_MSG(isnan(y), "sigmoid(NaN) = %g, expected NaN", y);

    float big[2] = {-1e30f, 1e30f}, out[2];
    relu6_forward(out, big, 2);
    CHECK_CLOSE(out[0], 0.0, 0.0);
    CHECK_CLOSE(out[1], 6.0, 0.0);
    sigmoid_forward(out, big, 2);
    CHECK_CLOSE(out[0], 0.0, 0.0);
    CHECK_CLOSE(out[1], 1.0, 0.0);
}

static void test_add_forward(void)
{
    float a[5], b[5], c[5], y[5];
    fill_uniform(a, 5, -1.0f, 1.0f);
    fill_uniform(b, 5, -1.0f, 1.0f);
    fill_uniform(c, 5, -1.0f, 1.0f);
    const float *xs[3] = {a, b, c};
    add_forward(y, xs, 3, 5);
    for (int i = 0; i < 5; i++)
        CHECK_CLOSE_AT(y[i], (a[i] + b[i]) + c[i], 0.0, i);

    /* In place: y aliases the first input. */
    float expected[5];
    for (int i = 0; i < 5; i++)
        expected[i] = a[i] + b[i];
    const float *pair[2] = {a, b};
    add_forward(a, pair, 2, 5);
    for (int i = 0; i < 5; i++)
        CHECK_CLOSE_AT(a[i], expected[i], 0.0, i);
}

/* Attention backward splits the batch into chunks; with T = 129 a chunk contains
 * 8 samples, so N = 9 spans two. Per-sample calls must give the same dx and
 * the same summed weight gradients. */
static void test_mhsa_chunked_backward(void)
{
    const int n = 9, t = 129, d = 8, heads = 2;
    grad_case c;
    setup_mhsa(&c, n, t, d, heads);
    case_param(&c, "x", c.x, c.size);
    case_param(&c, "w_qkv", c.w, 3 * 8 * 8);
    case_param(&c, "b_qkv", c.b, 3 * 8);
    case_param(&c, "w_out", c.w2, 8 * 8);
    case_param(&c, "b_out", c.b2, 8);
    mhsa_backward_case(&c);

    float *whole[MAX_PARAMS];
    for (int k = 0; k < c.nparams; k++) {
        whole[k] = case_alloc(&c, c.count[k]);
        memcpy(whole[k], c.grad[k], c.count[k] * sizeof(float));
        memset(c.grad[k], 0, c.count[k] * sizeof(float));
    }

    /* One sample at a time: views of x, y, g and the saved tensors. */
    size_t td = (size_t)t * d, tt = (size_t)t * t * heads;
    for (int i = 0; i < n; i++) {
        mhsa_forward(c.y + i * td, c.s1 + 3 * i * td, c.s2 + i * tt, c.s3 + i * td,
                     c.x + i * td, c.w, c.b, c.w2, c.b2, 1, t, d, heads, c.work);
        mhsa_backward(c.grad[0] + i * td, c.grad[1], c.grad[2], c.grad[3], c.grad[4],
                      c.g + i * td, c.x + i * td, c.s1 + 3 * i * td, c.s2 + i * tt,
                      c.s3 + i * td, c.w, c.w2, 1, t, d, heads, c.work);
    }

    double max_err = 0.0;
    for (int k = 0; k < c.nparams; k++) {
        int failures = 0;
        for (size_t i = 0; i < c.count[k]; i++) {
            double err = normalized_error(whole[k][i], c.grad[k][i]);
            max_err = fmax(max_err, err);
            if (!(err <= 1e-4) && failures++ < MAX_REPORTED)
                TEST_FAIL_AT("chunked d%s[%zu] = %.9g, per-sample %.9g (tolerance 1e-4)",
                             c.param_name[k], i, whole[k][i], c.grad[k][i]);
        }
    }
    printf("  chunked vs per-sample max normalized error %.2e (tolerance 1e-4)\n", max_err);
    case_free(&c);
}

/* ---- PyTorch reference values ------------------------------------------------------- */

/* Returns a malloc'd copy of tensor `key` of case `obj`, or NULL (with a
 * failure) if it is missing or its size is not `count`. */
static float *golden_tensor(json_t *obj, const char *key, size_t count)
{
    json_t *data = json_object_get(json_object_get(obj, key), "data");
    if (!json_is_array(data) || json_array_size(data) != count) {
        TEST_FAIL_AT("golden tensor %s: missing or not %zu values", key, count);
        return NULL;
    }
    float *out = malloc(count * sizeof(float));
    if (!out) {
        TEST_FAIL_AT("golden tensor %s: out of memory", key);
        return NULL;
    }
    for (size_t i = 0; i < count; i++)
        out[i] = (float)json_number_value(json_array_get(data, i));
    return out;
}

/* Compares `actual` with the reference tensor `key`; prints the max error. */
static void golden_compare(json_t *obj, const char *what, const char *key, const float *actual,
                           size_t count)
{
    float *expected = golden_tensor(obj, key, count);
    if (!expected)
        return;
    double max_err = 0.0;
    int failures = 0;
    for (size_t i = 0; i < count; i++) {
        double diff = fabs((double)actual[i] - expected[i]);
        double tol = GOLDEN_ATOL + GOLDEN_RTOL * fabs(expected[i]);
        max_err = fmax(max_err, diff);
        if (!(diff <= tol) && failures++ < MAX_REPORTED)
            TEST_FAIL_AT("%s %s[%zu] = %.9g, torch %.9g (tolerance %.3g)", what, key, i,
                         actual[i], expected[i], tol);
    }
    printf("  %-13s %-7s max abs error vs torch %.2e over %zu values\n", what, key, max_err,
           count);
    free(expected);
}

static json_t *golden_load(void)
{
    json_error_t jerr;
    json_t *root = json_load_file(GOLDEN_PATH, 0, &jerr);
    if (!root)
        TEST_FAIL_AT("cannot read %s: %s (run the test from the repository root)", GOLDEN_PATH,
                     jerr.text);
    return root;
}

static void test_golden_gelu(void)
{
    json_t *root = golden_load(), *c = json_object_get(root, "gelu");
    const size_t count = 25;
    float *x = golden_tensor(c, "x", count), *g = golden_tensor(c, "g", count);
    float y[25], dx[25] = {0};
    if (x && g) {
        gelu_forward(y, x, count);
        gelu_backward(dx, g, x, count);
        golden_compare(c, "gelu", "y", y, count);
        golden_compare(c, "gelu", "dx", dx, count);
    }
    free(x);
    free(g);
    json_decref(root);
}

static void test_golden_softmax(void)
{
    json_t *root = golden_load(), *c = json_object_get(root, "softmax");
    const size_t rows = 3, cols = 7, count = rows * cols;
    float *x = golden_tensor(c, "x", count), *g = golden_tensor(c, "g", count);
    float y[21], dx[21] = {0};
    if (x && g) {
        softmax_forward(y, x, rows, (int)cols);
        softmax_backward(dx, g, y, rows, (int)cols);
        golden_compare(c, "softmax", "y", y, count);
        golden_compare(c, "softmax", "dx", dx, count);
    }
    free(x);
    free(g);
    json_decref(root);
}

static void test_golden_layernorm(void)
{
    json_t *root = golden_load(), *c = json_object_get(root, "layernorm");
    const size_t rows = 4, d = 12, count = rows * d;
    float eps = (float)json_number_value(json_object_get(c, "eps"));
    float *x = golden_tensor(c, "x", count), *g = golden_tensor(c, "g", count);
    float *gamma = golden_tensor(c, "gamma", d), *beta = golden_tensor(c, "beta", d);
    float y[48], dx[48] = {0}, dgamma[12] = {0}, dbeta[12] = {0}, mean[4], rstd[4];
    CHECK(eps > 0.0f);
    if (x && g && gamma && beta) {
        layernorm_forward(y, mean, rstd, x, gamma, beta, eps, rows, (int)d);
        layernorm_backward(dx, dgamma, dbeta, g, x, mean, rstd, gamma, rows, (int)d);
        golden_compare(c, "layernorm", "y", y, count);
        golden_compare(c, "layernorm", "dx", dx, count);
        golden_compare(c, "layernorm", "dgamma", dgamma, d);
        golden_compare(c, "layernorm", "dbeta", dbeta, d);
    }
    free(x);
    free(g);
    free(gamma);
    free(beta);
    json_decref(root);
}

static void test_golden_mhsa(void)
{
    json_t *root = golden_load(), *c = json_object_get(root, "mhsa");
    const int n = 2, t = 5, d = 8, heads = 2;
    CHECK_INT_EQ(json_integer_value(json_object_get(c, "n")), n);
    CHECK_INT_EQ(json_integer_value(json_object_get(c, "t")), t);
    CHECK_INT_EQ(json_integer_value(json_object_get(c, "d")), d);
    CHECK_INT_EQ(json_integer_value(json_object_get(c, "heads")), heads);

    grad_case k;
    setup_mhsa(&k, n, t, d, heads);
    float *src[6] = {golden_tensor(c, "x", k.size), golden_tensor(c, "w_qkv", 3 * 64),
                     golden_tensor(c, "b_qkv", 24), golden_tensor(c, "w_out", 64),
                     golden_tensor(c, "b_out", 8),  golden_tensor(c, "g", k.size)};
    float *dst[6] = {k.x, k.w, k.b, k.w2, k.b2, k.g};
    size_t counts[6] = {k.size, 3 * 64, 24, 64, 8, k.size};
    int ok = 1;
    for (int i = 0; i < 6; i++) {
        if (src[i])
            memcpy(dst[i], src[i], counts[i] * sizeof(float));
        ok = ok && src[i];
        free(src[i]);
    }
    if (ok) {
        case_param(&k, "x", k.x, k.size);
        case_param(&k, "w_qkv", k.w, 3 * 64);
        case_param(&k, "b_qkv", k.b, 24);
        case_param(&k, "w_out", k.w2, 64);
        case_param(&k, "b_out", k.b2, 8);
        mhsa_backward_case(&k);
        golden_compare(c, "mhsa", "y", k.y, k.size);
        golden_compare(c, "mhsa", "att", k.s2, (size_t)n * heads * t * t);
        golden_compare(c, "mhsa", "dx", k.grad[0], k.size);
        golden_compare(c, "mhsa", "dw_qkv", k.grad[1], 3 * 64);
        golden_compare(c, "mhsa", "db_qkv", k.grad[2], 24);
        golden_compare(c, "mhsa", "dw_out", k.grad[3], 64);
        golden_compare(c, "mhsa", "db_out", k.grad[4], 8);
    }
    case_free(&k);
    json_decref(root);
}

static void test_golden_cross_entropy(void)
{
    json_t *root = golden_load(), *c = json_object_get(root, "cross_entropy");
    const int n = 5, k = 6;
    json_t *labels_json = json_object_get(c, "labels");
    float *logits = golden_tensor(c, "logits", (size_t)n * k);
    float dlogits[30];
    int32_t labels[5];
    CHECK_INT_EQ(json_array_size(labels_json), n);
    for (int i = 0; i < n; i++)
        labels[i] = (int32_t)json_integer_value(json_array_get(labels_json, (size_t)i));
    if (logits && json_array_size(labels_json) == (size_t)n) {
        double expected = json_number_value(json_object_get(c, "loss"));
        double loss = cross_entropy_forward_backward(dlogits, logits, labels, n, k);
        CHECK_CLOSE(loss, expected, GOLDEN_ATOL + GOLDEN_RTOL * fabs(expected));
        printf("  cross_entropy loss %.9g, torch %.9g\n", loss, expected);
        golden_compare(c, "cross_entropy", "dlogits", dlogits, (size_t)n * k);

        /* A label outside [0, K) makes the loss NaN instead of reading out of
         * bounds. */
        labels[0] = k;
        CHECK(isnan(cross_entropy_forward_backward(NULL, logits, labels, n, k)));
    }
    free(logits);
    json_decref(root);
}

int main(void)
{
    TEST_RUN(test_relu_gradient);
    TEST_RUN(test_relu6_gradient);
    TEST_RUN(test_gelu_gradient);
    TEST_RUN(test_sigmoid_gradient);
    TEST_RUN(test_dropout_gradient);
    TEST_RUN(test_softmax_gradient);
    TEST_RUN(test_dense_gradient);
    TEST_RUN(test_layernorm_gradient);
    TEST_RUN(test_mhsa_gradient);
    TEST_RUN(test_patch_tokens_gradient);
    TEST_RUN(test_token_select_gradient);
    TEST_RUN(test_cross_entropy_gradient);
    TEST_RUN(test_dense_matches_naive);
    TEST_RUN(test_dropout_mask_statistics);
    TEST_RUN(test_gelu_matches_erf_grid);
    TEST_RUN(test_softmax_extreme_rows);
    TEST_RUN(test_activation_nan_propagates);
    TEST_RUN(test_add_forward);
    TEST_RUN(test_mhsa_chunked_backward);
    TEST_RUN(test_golden_gelu);
    TEST_RUN(test_golden_softmax);
    TEST_RUN(test_golden_layernorm);
    TEST_RUN(test_golden_mhsa);
    TEST_RUN(test_golden_cross_entropy);
    return TEST_FINISH();
}
