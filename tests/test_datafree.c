/*
 * Data-free saliency. The ReLU and ReLU6 closed forms are checked against
 * Simpson integration and Monte Carlo. Predicted moments are checked against
 * the moments that graph_forward produces on random Gaussian inputs, with the
 * batch-norm running statistics set to their true values. The scores are
 * checked for the weight-to-channel mapping of convs, grouped convs and dense
 * layers after a flatten, for the floor on dead channels, for the errors, and
 * on every prunable layer of the real MobileNetV2.
 */
#include <stdarg.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "datafree.h"
#include "model.h"
#include "test.h"

/* Relative tolerance of measured against predicted moments. The largest
 * errors measured with these seeds are 1.3 % to 1.9 %, mostly sampling error,
 * because values of overlapping conv windows are correlated. */
#define MOMENT_TOL 0.03

/* ---- helpers ------------------------------------------------------------- */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double rng_uniform(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return ((double)(rng_state >> 11) + 0.5) / 9007199254740992.0;
}

static double rng_normal(void)
{
    double u = rng_uniform(), v = rng_uniform();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

static void fill_normal(float *v, size_t count, double scale)
{
    for (size_t i = 0; i < count; i++)
        v[i] = (float)(scale * rng_normal());
}

static int add_node(graph *g, op_kind op, const char *name, const node_attrs *attrs,
                    int n_inputs, ...)
{
    int inputs[GRAPH_MAX_INPUTS];
    va_list ap;
    va_start(ap, n_inputs);
    for (int k = 0; k < n_inputs; k++)
        inputs[k] = va_arg(ap, int);
    va_end(ap);
    top_error err;
    top_error_clear(&err);
    int index = -1;
    top_status st = graph_add_node(g, op, name, inputs, n_inputs, attrs, &index, &err);
    CHECK_MSG(st == TOP_OK, "adding node %s: %s", name, err.message);
    return index;
}

/* Adds a parameter with the given values (numel of the shape), or N(0, scale^2)
 * values when `values` is NULL. */
static void add_param(graph *g, int node, int slot, const char *name, param_role role,
                      const float *values, double scale, int ndim, const int64_t *shape)
{
    tensor t;
    top_error err;
    top_error_clear(&err);
    top_status st = tensor_init(&t, ndim, shape, &err);
    CHECK_MSG(st == TOP_OK, "allocating %s: %s", name, err.message);
    if (st != TOP_OK)
        return;
    if (values)
        memcpy(t.data, values, t.numel * sizeof(float));
    else
        fill_normal(t.data, t.numel, scale);
    st = graph_add_param(g, node, slot, name, role, &t, PARAM_LAYOUT_SAME, NULL, 0, &err);
    CHECK_MSG(st == TOP_OK, "adding %s: %s", name, err.message);
    tensor_free(&t);
}

#define SHAPE(...)                                                                             \
    (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), (const int64_t[])         \
    {                                                                                          \
        __VA_ARGS__                                                                            \
    }

static node_attrs input_attrs(int c, int h, int w)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.conv.c = c;
    a.conv.h = h;
    a.conv.w = w;
    return a;
}

static node_attrs conv_attrs(int k, int r, int stride, int pad, int groups)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.conv.k = k;
    a.conv.r = a.conv.s = r;
    a.conv.stride_h = a.conv.stride_w = stride;
    a.conv.dilation_h = a.conv.dilation_w = 1;
    a.conv.pad_top = a.conv.pad_bottom = a.conv.pad_left = a.conv.pad_right = pad;
    a.conv.groups = groups;
    return a;
}

/* Adds a conv with N(0, 1 / fan-in) weights and no bias. */
static int add_conv(graph *g, const char *name, int from, int c, int k, int r, int stride,
                    int pad, int groups)
{
    node_attrs a = conv_attrs(k, r, stride, pad, groups);
    int node = add_node(g, OP_CONV2D, name, &a, 1, from);
    char pname[64];
    snprintf(pname, sizeof pname, "%s.weight", name);
    add_param(g, node, PARAM_WEIGHT, pname, PARAM_ROLE_WEIGHT, NULL,
              1.0 / sqrt((double)(c / groups * r * r)), SHAPE(k, c / groups, r, r));
    return node;
}

/* Adds a batch norm with the given gamma and beta, running mean 0, var 1. */
static int add_batchnorm(graph *g, const char *name, int from, int c, const float *gamma,
                         const float *beta)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.eps = 1e-3f;
    int node = add_node(g, OP_BATCHNORM, name, &a, 1, from);
    float zeros[64] = {0}, ones[64];
    for (int i = 0; i < 64; i++)
        ones[i] = 1.0f;
    const char *suffix[4] = {"gamma", "beta", "mean", "var"};
    const float *values[4] = {gamma, beta, zeros, ones};
    param_role roles[4] = {PARAM_ROLE_NORM, PARAM_ROLE_NORM, PARAM_ROLE_STATISTIC,
                           PARAM_ROLE_STATISTIC};
    for (int slot = 0; slot < 4; slot++) {
        char pname[64];
        snprintf(pname, sizeof pname, "%s.%s", name, suffix[slot]);
        add_param(g, node, slot, pname, roles[slot], values[slot], 0, SHAPE(c));
    }
    return node;
}

static int finalize_ok(graph *g)
{
    top_error err;
    top_error_clear(&err);
    top_status st = graph_finalize(g, &err);
    CHECK_MSG(st == TOP_OK, "graph_finalize: %s", err.message);
    return st == TOP_OK;
}

static int forward_ok(graph *g, const float *x, int n)
{
    top_error err;
    top_error_clear(&err);
    top_status st = graph_forward(g, x, n, GRAPH_MODE_INFERENCE, &err);
    CHECK_MSG(st == TOP_OK, "graph_forward: %s", err.message);
    return st == TOP_OK;
}

/* Per-channel mean and second moment of node `node`'s (N, C, H, W) output
 * from the last forward. */
static void measure_moments(double *mean, double *second, const graph *g, int node, int n)
{
    const graph_node *nd = &g->nodes[node];
    const float *y = graph_node_output(g, node);
    size_t c_count = (size_t)nd->dims[0], hw = nd->sample_numel / c_count;
    for (size_t c = 0; c < c_count; c++) {
        double m = 0, s = 0;
        for (size_t i = 0; i < (size_t)n; i++)
            for (size_t j = 0; j < hw; j++) {
                double v = y[(i * c_count + c) * hw + j];
                m += v;
                s += v * v;
            }
        mean[c] = m / ((double)n * (double)hw);
        second[c] = s / ((double)n * (double)hw);
    }
}

/* Runs x through g and sets the running statistics of batch norm `bn` to the
 * mean and population variance of its input. */
static void calibrate_batchnorm(graph *g, int bn, const float *x, int n)
{
    if (!forward_ok(g, x, n))
        return;
    const graph_node *nd = &g->nodes[bn];
    double mean[64], second[64];
    measure_moments(mean, second, g, nd->inputs[0], n);
    float *running_mean = g->params[nd->params[PARAM_MEAN]].value.data;
    float *running_var = g->params[nd->params[PARAM_VAR]].value.data;
    for (int64_t c = 0; c < nd->dims[0]; c++) {
        running_mean[c] = (float)mean[c];
        running_var[c] = (float)(second[c] - mean[c] * mean[c]);
    }
}

/* Sets the running statistics of batch norm `bn`, which follows a bias-free
 * conv of i.i.d. N(0, 1) inputs without padding, to their true values: each
 * output channel k is N(0, sum of w_k^2). */
static void set_gaussian_statistics(graph *g, int bn)
{
    const graph_node *nd = &g->nodes[bn];
    const graph_node *conv = &g->nodes[nd->inputs[0]];
    const tensor *w = &g->params[conv->params[PARAM_WEIGHT]].value;
    float *running_mean = g->params[nd->params[PARAM_MEAN]].value.data;
    float *running_var = g->params[nd->params[PARAM_VAR]].value.data;
    size_t row = w->numel / (size_t)w->shape[0];
    for (int64_t k = 0; k < w->shape[0]; k++) {
        double sum = 0;
        for (size_t i = 0; i < row; i++)
            sum += (double)w->data[k * row + i] * w->data[k * row + i];
        running_mean[k] = 0.0f;
        running_var[k] = (float)sum;
    }
}

/* Checks predicted against measured moments of node `node` on batch x. */
static void check_node_moments(graph *g, int node, const float *x, int n)
{
    double pred_mean[64], pred_second[64], mean[64], second[64];
    top_error err;
    top_error_clear(&err);
    top_status st = datafree_moments(pred_mean, pred_second, g, node, &err);
    CHECK_MSG(st == TOP_OK, "datafree_moments: %s", err.message);
    if (st != TOP_OK || !forward_ok(g, x, n))
        return;
    measure_moments(mean, second, g, node, n);
    const graph_node *nd = &g->nodes[node];
    double worst_second = 0, worst_mean = 0;
    for (int64_t c = 0; c < nd->dims[0]; c++) {
        double scale = sqrt(second[c]);
        CHECK_CLOSE_AT(pred_second[c], second[c], MOMENT_TOL * second[c], c);
        CHECK_CLOSE_AT(pred_mean[c], mean[c], MOMENT_TOL * scale, c);
        worst_second = fmax(worst_second, fabs(pred_second[c] - second[c]) / second[c]);
        worst_mean = fmax(worst_mean, fabs(pred_mean[c] - mean[c]) / scale);
    }
    printf("  %s: largest error %.2f %% of E[x^2], %.2f %% of sqrt(E[x^2]) in the mean\n",
           nd->name, 100 * worst_second, 100 * worst_mean);
}

static float *normal_batch(size_t count)
{
    float *x = malloc(count * sizeof *x);
    if (x)
        fill_normal(x, count, 1.0);
    CHECK(x != NULL);
    return x;
}

/* ---- closed forms ----------------------------------------------------------- */

static double clip(double x, double hi)
{
    return fmin(fmax(x, 0.0), hi);
}

/* Integral of clip(mu + sigma z)^power phi(z) over [a, b] by Simpson's rule. */
static double simpson_piece(double mu, double sigma, double hi, int power, double a, double b)
{
    const int n = 4000;
    double h = (b - a) / n, sum = 0;
    for (int i = 0; i <= n; i++) {
        double z = a + i * h, y = clip(mu + sigma * z, hi);
        double weight = (i == 0 || i == n) ? 1.0 : (i % 2 ? 4.0 : 2.0);
        sum += weight * pow(y, power) * exp(-0.5 * z * z) * 0.3989422804014327;
    }
    return sum * h / 3.0;
}

/* E[clip(X)^power] for X ~ N(mu, sigma^2), over z in [-12, 12] split at the
 * kinks of the clip so that each piece is smooth. */
static double reference_moment(double mu, double sigma, double hi, int power)
{
    if (sigma == 0)
        return pow(clip(mu, hi), power);
    double cuts[4] = {-12.0, -mu / sigma, (hi - mu) / sigma, 12.0};
    int n_cuts = isinf(hi) ? 3 : 4;
    if (isinf(hi))
        cuts[2] = 12.0;
    double total = 0, from = -12.0;
    for (int i = 1; i < n_cuts; i++) {
        double to = fmin(fmax(cuts[i], -12.0), 12.0);
        if (to > from) {
            total += simpson_piece(mu, sigma, hi, power, from, to);
            from = to;
        }
    }
    return total;
}

static void test_relu_closed_forms(void)
{
    static const double cases[][2] = {
        {0, 1},    {1.5, 0.7},  {-3, 1},  {-40, 1},   {40, 2},    {3, 1e-9},  {0, 1e-9},
        {7, 1e-6}, {5.9, 0.05}, {3, 10},  {-10, 0.5}, {10, 0.5},  {6, 1},     {0, 0},
        {-2, 0},   {8, 0},      {2.5, 3}, {100, 30},  {-100, 30}, {6, 1e-12},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double mu = cases[i][0], sigma = cases[i][1];
        for (int six = 0; six < 2; six++) {
            double hi = six ? 6.0 : INFINITY, mean, second;
            if (six)
                datafree_relu6_moments(&mean, &second, mu, sigma);
            else
                datafree_relu_moments(&mean, &second, mu, sigma);
            double ref_mean = reference_moment(mu, sigma, hi, 1);
            double ref_second = reference_moment(mu, sigma, hi, 2);
            CHECK_MSG(fabs(mean - ref_mean) <= 1e-7 * fmax(1.0, fabs(ref_mean)),
                      "relu%s mean of N(%g, %g^2) = %.12g, expected %.12g", six ? "6" : "", mu,
                      sigma, mean, ref_mean);
            CHECK_MSG(fabs(second - ref_second) <= 1e-7 * fmax(1.0, fabs(ref_second)),
                      "relu%s second moment of N(%g, %g^2) = %.12g, expected %.12g",
                      six ? "6" : "", mu, sigma, second, ref_second);
            CHECK_MSG(second >= mean * mean, "relu%s of N(%g, %g^2): second %.12g < mean^2",
                      six ? "6" : "", mu, sigma, second);
        }
    }
}

/* A Monte Carlo check of the same closed forms, independent of the quadrature. */
static void test_relu_monte_carlo(void)
{
    static const double cases[][2] = {{1.0, 2.0}, {5.0, 1.5}, {-1.0, 1.0}};
    const int samples = 400000;
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        double mu = cases[i][0], sigma = cases[i][1], m6 = 0, s6 = 0;
        for (int k = 0; k < samples; k++) {
            double y = clip(mu + sigma * rng_normal(), 6.0);
            m6 += y;
            s6 += y * y;
        }
        m6 /= samples;
        s6 /= samples;
        double mean, second;
        datafree_relu6_moments(&mean, &second, mu, sigma);
        /* 5 standard errors of a mean of 400 000 values bounded by 6 and 36. */
        CHECK_CLOSE_AT(mean, m6, 5 * 6.0 / sqrt(samples), i);
        CHECK_CLOSE_AT(second, s6, 5 * 36.0 / sqrt(samples), i);
    }
}

/* ---- moments through small graphs -------------------------------------------- */

/*
 * input (6, 16, 16) -> conv 3x3 valid (8) -> batch norm -> relu6 -> conv 1x1.
 * The conv of Gaussian inputs is Gaussian, so with the true running
 * statistics the prediction at the relu6 is exact up to sampling.
 */
static void test_relu6_chain_matches_forward(void)
{
    static const float gamma[8] = {1.0f, 2.0f, 0.5f, 3.0f, 1.5f, 1.0f, 2.5f, 0.8f};
    static const float beta[8] = {-0.5f, 0.5f, 2.0f, 3.0f, 5.0f, 6.5f, 1.0f, 4.0f};
    const int n = 256;
    graph *g = NULL;
    CHECK_INT_EQ(graph_new(&g, NULL), TOP_OK);
    if (!g)
        return;
    node_attrs a = input_attrs(6, 16, 16);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    int conv1 = add_conv(g, "conv1", in, 6, 8, 3, 1, 0, 1);
    int bn = add_batchnorm(g, "bn1", conv1, 8, gamma, beta);
    int act = add_node(g, OP_RELU6, "relu6", NULL, 1, bn);
    add_conv(g, "conv2", act, 8, 4, 1, 1, 0, 1);
    float *x = normal_batch((size_t)n * 6 * 16 * 16);
    if (x && finalize_ok(g)) {
        set_gaussian_statistics(g, bn);
        check_node_moments(g, bn, x, n);
        check_node_moments(g, act, x, n);
    }
    free(x);
    graph_free(g);
}

/* Zeroes the input channels outside [first, first + count) of a conv weight
 * (K, C, R, S), so that the conv reads only those channels. */
static void keep_input_channels(graph *g, int conv, int first, int count)
{
    const graph_node *nd = &g->nodes[conv];
    tensor *w = &g->params[nd->params[PARAM_WEIGHT]].value;
    size_t c_count = (size_t)w->shape[1], rs = (size_t)(w->shape[2] * w->shape[3]);
    for (size_t i = 0; i < w->numel; i++) {
        int c = (int)((i / rs) % c_count);
        if (c < first || c >= first + count)
            w->data[i] = 0.0f;
    }
}

/*
 * A residual block whose branches read disjoint input channels (so they are
 * independent): conv 3x3 -> bn -> relu -> conv 3x3 -> bn on channels 0..3,
 * conv 5x5 -> bn on channels 4..7, added, then relu6 -> conv 1x1.
 */
static void test_residual_add_matches_forward(void)
{
    static const float g1[8] = {1, 2, 1, 0.5f, 1.5f, 1, 2, 1};
    static const float b1[8] = {0, 0.5f, -0.5f, 1, 0, 2, -1, 0.2f};
    static const float g2[8] = {1, 1.5f, 0.5f, 2, 1, 0.7f, 1.2f, 2};
    static const float b2[8] = {1, 0, 2, -1, 3, 0.5f, 1, 2};
    static const float g3[8] = {0.5f, 1, 1.5f, 1, 2, 0.6f, 1, 1};
    static const float b3[8] = {1, 2, 0, 1, 0.5f, 1, 2, 3};
    const int n = 1024;
    graph *g = NULL;
    CHECK_INT_EQ(graph_new(&g, NULL), TOP_OK);
    if (!g)
        return;
    node_attrs a = input_attrs(8, 12, 12);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    int conv_a1 = add_conv(g, "a1", in, 8, 8, 3, 1, 0, 1);
    int bn_a1 = add_batchnorm(g, "a1_bn", conv_a1, 8, g1, b1);
    int relu = add_node(g, OP_RELU, "a1_relu", NULL, 1, bn_a1);
    int conv_a2 = add_conv(g, "a2", relu, 8, 8, 3, 1, 0, 1);
    int bn_a2 = add_batchnorm(g, "a2_bn", conv_a2, 8, g2, b2);
    int conv_b = add_conv(g, "b", in, 8, 8, 5, 1, 0, 1);
    int bn_b = add_batchnorm(g, "b_bn", conv_b, 8, g3, b3);
    int sum = add_node(g, OP_ADD, "sum", NULL, 2, bn_a2, bn_b);
    int act = add_node(g, OP_RELU6, "sum_relu6", NULL, 1, sum);
    add_conv(g, "out", act, 8, 4, 1, 1, 0, 1);
    size_t count = (size_t)n * 8 * 12 * 12;
    float *x = normal_batch(count);
    if (x && finalize_ok(g)) {
        keep_input_channels(g, conv_a1, 0, 4);
        keep_input_channels(g, conv_b, 4, 4);
        set_gaussian_statistics(g, bn_a1);
        set_gaussian_statistics(g, bn_b);
        calibrate_batchnorm(g, bn_a2, x, n);
        fill_normal(x, count, 1.0);
        check_node_moments(g, relu, x, n);
        check_node_moments(g, sum, x, n);
        check_node_moments(g, act, x, n);
    }
    free(x);
    graph_free(g);
}

/* ---- scores ------------------------------------------------------------------ */

/* Share of output positions (p, q) at which tap (r, s) of a conv with the
 * given geometry reads inside the input, by counting positions. */
static double count_tap_share(int r, int s, int h, int w, int stride, int pad)
{
    int p_count = (h + 2 * pad - 3) / stride + 1, q_count = (w + 2 * pad - 3) / stride + 1;
    int inside = 0;
    for (int p = 0; p < p_count; p++)
        for (int q = 0; q < q_count; q++) {
            int row = p * stride + r - pad, col = q * stride + s - pad;
            inside += row >= 0 && row < h && col >= 0 && col < w;
        }
    return (double)inside / (p_count * q_count);
}

static double floor_of(const double *second, size_t count)
{
    double sum = 0;
    for (size_t j = 0; j < count; j++)
        sum += second[j];
    return DATAFREE_FLOOR * sum / (double)count;
}

static float *scores_of(const graph *g, int param)
{
    size_t count = g->params[param].value.numel;
    float *scores = malloc(count * sizeof *scores);
    CHECK(scores != NULL);
    if (!scores)
        return NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = datafree_scores(scores, g, param, &err);
    CHECK_MSG(st == TOP_OK, "datafree_scores(%s): %s", g->params[param].name, err.message);
    if (st == TOP_OK)
        return scores;
    free(scores);
    return NULL;
}

/* Checks scores[i] against 0.5 w^2 h with a relative tolerance. */
static void check_score(const float *scores, const float *w, size_t i, double h,
                        const char *what)
{
    double expected = 0.5 * (double)w[i] * w[i] * h;
    CHECK_MSG(fabs(scores[i] - expected) <= 1e-5 * expected + 1e-30,
              "%s score[%zu] = %.9g, expected %.9g", what, i, (double)scores[i], expected);
}

/*
 * input (4, 7, 7) -> depthwise 3x3 stride 2 pad 1 -> bn -> relu -> grouped
 * 1x1 conv (8, 2 groups) -> bn -> relu -> flatten -> dense (3). The expected
 * scores are rebuilt from datafree_moments and a per-position tap count.
 */
static void test_scores_map_channels(void)
{
    static const float gamma[8] = {1, 2, 0.5f, 3, 1, 0.2f, 2, 1};
    static const float beta[8] = {0, 1, -1, 2, 0.5f, 0, 3, -2};
    graph *g = NULL;
    CHECK_INT_EQ(graph_new(&g, NULL), TOP_OK);
    if (!g)
        return;
    node_attrs a = input_attrs(4, 7, 7);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    int dw = add_conv(g, "dw", in, 4, 4, 3, 2, 1, 4);
    int bn1 = add_batchnorm(g, "dw_bn", dw, 4, gamma, beta);
    int relu1 = add_node(g, OP_RELU, "dw_relu", NULL, 1, bn1);
    int pw = add_conv(g, "pw", relu1, 4, 8, 1, 1, 0, 2);
    int bn2 = add_batchnorm(g, "pw_bn", pw, 8, gamma, beta);
    int relu2 = add_node(g, OP_RELU, "pw_relu", NULL, 1, bn2);
    int flat = add_node(g, OP_FLATTEN, "flatten", NULL, 1, relu2);
    a = input_attrs(0, 0, 0);
    a.dense_out = 3;
    int fc = add_node(g, OP_DENSE, "fc", &a, 1, flat);
    add_param(g, fc, PARAM_WEIGHT, "fc.weight", PARAM_ROLE_WEIGHT, NULL, 1.0,
              SHAPE(3, 8 * 4 * 4));
    g->preprocess.scale = 1.0f / 255.0f;
    for (int c = 0; c < 3; c++)
        g->preprocess.std[c] = 0.25f, g->preprocess.mean[c] = 0.1f * (float)c;
    if (!finalize_ok(g)) {
        graph_free(g);
        return;
    }

    /* Depthwise: input channel k, image moments from the preprocessing
     * (channel 3 has no preprocessing entry and gets the fallback 1). */
    double mean[8], second[8];
    CHECK_INT_EQ(datafree_moments(mean, second, g, in, NULL), TOP_OK);
    double v = 1.0 / 12.0 / (0.25 * 0.25), m1 = (0.5 - 0.1) / 0.25;
    CHECK_CLOSE(second[1], v + m1 * m1, 1e-6);
    CHECK_CLOSE(second[3], 1.0, 0);
    float *s = scores_of(g, g->nodes[dw].params[PARAM_WEIGHT]);
    const float *w = g->params[g->nodes[dw].params[PARAM_WEIGHT]].value.data;
    double floor = floor_of(second, 4);
    for (size_t i = 0; s && i < 4 * 9; i++) {
        int k = (int)(i / 9), r = (int)(i % 9) / 3, t = (int)(i % 3);
        check_score(s, w, i, count_tap_share(r, t, 7, 7, 2, 1) * second[k] + floor, "dw");
    }
    free(s);

    /* Grouped 1x1: output k of group k / 4 reads channel (k / 4) * 2 + c. */
    CHECK_INT_EQ(datafree_moments(mean, second, g, relu1, NULL), TOP_OK);
    s = scores_of(g, g->nodes[pw].params[PARAM_WEIGHT]);
    w = g->params[g->nodes[pw].params[PARAM_WEIGHT]].value.data;
    floor = floor_of(second, 4);
    for (size_t i = 0; s && i < 8 * 2; i++)
        check_score(s, w, i, second[(i / 2 / 4) * 2 + i % 2] + floor, "grouped");
    free(s);

    /* Dense after an NCHW flatten: feature f comes from channel f / 16. */
    CHECK_INT_EQ(datafree_moments(mean, second, g, relu2, NULL), TOP_OK);
    s = scores_of(g, g->nodes[fc].params[PARAM_WEIGHT]);
    w = g->params[g->nodes[fc].params[PARAM_WEIGHT]].value.data;
    floor = floor_of(second, 8);
    for (size_t i = 0; s && i < 3 * 128; i++)
        check_score(s, w, i, second[(i % 128) / 16] + floor, "dense");
    free(s);
    graph_free(g);
}

/* A channel that a batch norm with gamma 0 and beta -1 kills before a relu has
 * moment 0; its weights still score > 0 and rank by |w|. */
static void test_scores_floor_on_dead_channel(void)
{
    static const float gamma[2] = {0.0f, 1.0f};
    static const float beta[2] = {-1.0f, 0.5f};
    graph *g = NULL;
    CHECK_INT_EQ(graph_new(&g, NULL), TOP_OK);
    if (!g)
        return;
    node_attrs a = input_attrs(3, 5, 5);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    int conv1 = add_conv(g, "conv1", in, 3, 2, 1, 1, 0, 1);
    int bn = add_batchnorm(g, "bn", conv1, 2, gamma, beta);
    int relu = add_node(g, OP_RELU, "relu", NULL, 1, bn);
    int conv2 = add_conv(g, "conv2", relu, 2, 16, 1, 1, 0, 1);
    if (!finalize_ok(g)) {
        graph_free(g);
        return;
    }
    double mean[2], second[2];
    CHECK_INT_EQ(datafree_moments(mean, second, g, relu, NULL), TOP_OK);
    CHECK_CLOSE(second[0], 0.0, 0);
    CHECK(second[1] > 0.25);
    int p = g->nodes[conv2].params[PARAM_WEIGHT];
    float *s = scores_of(g, p);
    const float *w = g->params[p].value.data;
    for (size_t i = 0; s && i < 32; i += 2) { /* (16, 2): channel 0 at even i */
        CHECK_MSG(s[i] > 0, "dead-channel score[%zu] = %g, expected > 0", i, (double)s[i]);
        for (size_t j = 0; j < 32; j += 2)
            if (fabsf(w[i]) < fabsf(w[j]))
                CHECK_MSG(s[i] < s[j], "score[%zu] = %g not below score[%zu] = %g", i,
                          (double)s[i], j, (double)s[j]);
        CHECK_MSG(s[i] < s[i + 1] || fabsf(w[i]) > 30 * fabsf(w[i + 1]),
                  "dead score[%zu] = %g not below live score %g", i, (double)s[i],
                  (double)s[i + 1]);
    }
    free(s);
    graph_free(g);
}

static void test_errors(void)
{
    graph *g = NULL;
    CHECK_INT_EQ(graph_new(&g, NULL), TOP_OK);
    if (!g)
        return;
    node_attrs a = input_attrs(3, 4, 4);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    int conv = add_conv(g, "conv", in, 3, 2, 1, 1, 0, 1);
    float scores[6];
    double mean[3], second[3];
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(datafree_scores(scores, g, 0, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "graph_finalize") != NULL);
    if (!finalize_ok(g)) {
        graph_free(g);
        return;
    }
    CHECK_INT_EQ(datafree_moments(mean, second, g, 5, NULL), TOP_ERR_INVALID);
    CHECK_INT_EQ(datafree_moments(NULL, second, g, 0, NULL), TOP_ERR_INVALID);
    CHECK_INT_EQ(datafree_scores(scores, g, 1, NULL), TOP_ERR_INVALID);
    CHECK_INT_EQ(datafree_scores(NULL, g, 0, NULL), TOP_ERR_INVALID);
    g->params[g->nodes[conv].params[PARAM_WEIGHT]].value.data[4] = NAN;
    top_error_clear(&err);
    CHECK_INT_EQ(datafree_scores(scores, g, 0, &err), TOP_ERR_NUMERIC);
    CHECK(strstr(err.message, "weight 4") != NULL);
    graph_free(g);
}

/* ---- the real MobileNetV2 ------------------------------------------------------ */

static const char *data_dir(void)
{
    const char *dir = getenv("TOPIARY_DATA_DIR");
    return dir && dir[0] ? dir : "data";
}

/* Checks that a depthwise layer's scores / (0.5 w^2) at the centre tap, whose
 * share is 1 whenever the padding is at least 1, is E[x_k^2] of channel k plus
 * the floor. */
static void check_depthwise(const graph *g, int p, const float *s, int *checked)
{
    const graph_param *gp = &g->params[p];
    const graph_node *nd = &g->nodes[gp->node];
    const conv2d_shape *cs = &nd->attrs.conv;
    if (cs->groups == 1 || cs->groups != cs->c || cs->r != 3 || cs->s != 3)
        return;
    int from = nd->inputs[0];
    size_t c_count = (size_t)cs->c;
    double *mean = malloc(c_count * sizeof *mean), *second = malloc(c_count * sizeof *second);
    if (mean && second && datafree_moments(mean, second, g, from, NULL) == TOP_OK) {
        double floor = floor_of(second, c_count), lo = INFINITY, hi = 0;
        for (size_t k = 0; k < c_count; k++) {
            size_t i = k * 9 + 4;
            if (gp->value.data[i] == 0)
                continue;
            check_score(s, gp->value.data, i, second[k] + floor, gp->name);
            lo = fmin(lo, second[k]);
            hi = fmax(hi, second[k]);
        }
        CHECK_MSG(hi > 1.5 * lo, "%s: input moments %g..%g do not vary by channel", gp->name,
                  lo, hi);
        (*checked)++;
    }
    free(mean);
    free(second);
}

static void test_mobilenet_v2_scores(void)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/models/nsfwjs/mobilenet_v2/model.json", data_dir());
    FILE *f = fopen(path, "rb");
    if (!f) {
        printf("  skipped: %s is missing; run tools/fetch-models.sh (or set "
               "TOPIARY_DATA_DIR)\n",
               path);
        return;
    }
    fclose(f);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = model_load(&g, path, &err);
    CHECK_MSG(st == TOP_OK, "model_load(%s): %s", path, err.message);
    if (st != TOP_OK)
        return;

    clock_t start = clock();
    int layers = 0, depthwise = 0;
    size_t weights = 0, zero_scores = 0;
    for (int p = 0; p < g->n_params; p++) {
        if (!graph_param_is_prunable(g, p))
            continue;
        float *s = scores_of(g, p);
        if (!s)
            continue;
        size_t count = g->params[p].value.numel;
        for (size_t i = 0; i < count; i++) {
            CHECK_MSG(isfinite(s[i]) && s[i] >= 0, "%s score[%zu] = %g", g->params[p].name, i,
                      (double)s[i]);
            zero_scores += s[i] == 0;
        }
        check_depthwise(g, p, s, &depthwise);
        weights += count;
        layers++;
        free(s);
    }
    double seconds = (double)(clock() - start) / CLOCKS_PER_SEC;
    printf("  %d prunable layers (%d depthwise checked), %zu weights, %zu zero scores, "
           "%.2f s CPU\n",
           layers, depthwise, weights, zero_scores, seconds);
    CHECK(layers > 50);
    CHECK(depthwise >= 17);
    graph_free(g);
}

int main(void)
{
    TEST_RUN(test_relu_closed_forms);
    TEST_RUN(test_relu_monte_carlo);
    TEST_RUN(test_relu6_chain_matches_forward);
    TEST_RUN(test_residual_add_matches_forward);
    TEST_RUN(test_scores_map_channels);
    TEST_RUN(test_scores_floor_on_dead_channel);
    TEST_RUN(test_errors);
    TEST_RUN(test_mobilenet_v2_scores);
    return TEST_FINISH();
}
