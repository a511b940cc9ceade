/*
 * The graph runtime: shape inference and its errors, forward, backward
 * against central finite differences through whole graphs, fan-out, batch
 * consistency, training-mode batch norm and dropout, and the statistics.
 *
 * Gradient checks score each tensor by the normalized error
 * ||analytic - numeric|| / max(||analytic||, ||numeric||) of the loss
 * L = mean cross-entropy of the output node on fixed labels, with central
 * differences of step GRAD_STEP in float32 forwards.
 */
#include <stdarg.h>
#include <stdint.h>
#include <string.h>

#include "graph.h"
#include "test.h"

#define GRAD_STEP 1e-3
/* With float32 forwards these graphs score 3e-5 to 5e-3 (measured over 20
 * random weight draws), and a wrong gradient scores near 1. */
#define GRAD_TOL 1e-2
/* Absolute bound for gradients that are zero in exact arithmetic. */
#define ZERO_GRAD_TOL 1e-4
/* At most this share of a tensor's entries may be left out as kinks. */
#define KINK_MAX_SHARE 0.5

static uint64_t rng_state = 0x2545f4914f6cdd1dULL;

/* Uniform in [-1, 1) from xorshift64*. */
static float rand_uniform(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    uint64_t r = rng_state * UINT64_C(2685821657736338717);
    return (float)((double)(r >> 40) / (double)(1 << 23) - 1.0);
}

static void fill_uniform(float *v, size_t count, float scale, float offset)
{
    for (size_t i = 0; i < count; i++)
        v[i] = offset + scale * rand_uniform();
}

/* Adds a node with the given inputs and returns its index, or -1 after failing the test. */
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

/* Adds a parameter of the given shape filled with offset + scale * U(-1, 1). */
static void add_param(graph *g, int node, int slot, const char *name, param_role role,
                      float scale, float offset, int ndim, const int64_t *shape)
{
    tensor t;
    top_error err;
    top_error_clear(&err);
    top_status st = tensor_init(&t, ndim, shape, &err);
    CHECK_MSG(st == TOP_OK, "allocating %s: %s", name, err.message);
    if (st != TOP_OK)
        return;
    fill_uniform(t.data, t.numel, scale, offset);
    st = graph_add_param(g, node, slot, name, role, &t, PARAM_LAYOUT_SAME, NULL, 0, &err);
    CHECK_MSG(st == TOP_OK, "adding %s: %s", name, err.message);
    CHECK(t.data == NULL);
    tensor_free(&t);
}

#define SHAPE(...) (int)(sizeof((const int64_t[]){__VA_ARGS__}) / sizeof(int64_t)), \
                   (const int64_t[]){__VA_ARGS__}

static node_attrs input_attrs(int c, int h, int w)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.conv.c = c;
    a.conv.h = h;
    a.conv.w = w;
    return a;
}

static node_attrs conv_attrs(int k, int r, int stride, int pad_top, int pad_bottom,
                             int pad_left, int pad_right, int groups)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.conv.k = k;
    a.conv.r = a.conv.s = r;
    a.conv.stride_h = a.conv.stride_w = stride;
    a.conv.dilation_h = a.conv.dilation_w = 1;
    a.conv.pad_top = pad_top;
    a.conv.pad_bottom = pad_bottom;
    a.conv.pad_left = pad_left;
    a.conv.pad_right = pad_right;
    a.conv.groups = groups;
    return a;
}

static node_attrs pool_attrs(int r, int stride, int pad, int count_include_pad)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.pool.r = a.pool.s = r;
    a.pool.stride_h = a.pool.stride_w = stride;
    a.pool.pad_top = a.pool.pad_bottom = a.pool.pad_left = a.pool.pad_right = pad;
    a.pool.count_include_pad = count_include_pad;
    return a;
}

static node_attrs scalar_attrs(float eps, int dense_out, int heads)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.eps = eps;
    a.dense_out = dense_out;
    a.heads = heads;
    return a;
}

static graph *new_graph(void)
{
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(graph_new(&g, &err), TOP_OK);
    return g;
}

static int finalize_ok(graph *g)
{
    top_error err;
    top_error_clear(&err);
    top_status st = graph_finalize(g, &err);
    CHECK_MSG(st == TOP_OK, "graph_finalize: %s", err.message);
    return st == TOP_OK;
}

/*
 * Mini CNN on (3, 9, 9): conv 3x3 stride 2 with asymmetric padding, batch
 * norm, relu6, a depthwise conv and a 1x1-conv branch added together, concat
 * with the depthwise output, max pool, average pool, global average pool,
 * dense, softmax. Output (5).
 */
static graph *build_cnn(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 9, 9);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = conv_attrs(4, 3, 2, 0, 1, 0, 1, 1);
    int conv = add_node(g, OP_CONV2D, "conv1", &a, 1, in);
    add_param(g, conv, PARAM_WEIGHT, "conv1.weight", PARAM_ROLE_WEIGHT, 0.4f, 0, SHAPE(4, 3, 3, 3));
    add_param(g, conv, PARAM_BIAS, "conv1.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(4));
    a = scalar_attrs(1e-5f, 0, 0);
    int bn = add_node(g, OP_BATCHNORM, "bn1", &a, 1, conv);
    add_param(g, bn, PARAM_GAMMA, "bn1.weight", PARAM_ROLE_NORM, 0.3f, 1, SHAPE(4));
    add_param(g, bn, PARAM_BETA, "bn1.bias", PARAM_ROLE_NORM, 0.2f, 0.5f, SHAPE(4));
    add_param(g, bn, PARAM_MEAN, "bn1.running_mean", PARAM_ROLE_STATISTIC, 0.2f, 0, SHAPE(4));
    add_param(g, bn, PARAM_VAR, "bn1.running_var", PARAM_ROLE_STATISTIC, 0.3f, 1.5f, SHAPE(4));
    int act = add_node(g, OP_RELU6, "relu6", NULL, 1, bn);
    a = conv_attrs(4, 3, 1, 1, 1, 1, 1, 4);
    int dw = add_node(g, OP_CONV2D, "dw", &a, 1, act);
    add_param(g, dw, PARAM_WEIGHT, "dw.weight", PARAM_ROLE_WEIGHT, 0.4f, 0, SHAPE(4, 1, 3, 3));
    add_param(g, dw, PARAM_BIAS, "dw.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(4));
    a = conv_attrs(4, 1, 1, 0, 0, 0, 0, 1);
    int pw = add_node(g, OP_CONV2D, "pw", &a, 1, act);
    add_param(g, pw, PARAM_WEIGHT, "pw.weight", PARAM_ROLE_WEIGHT, 0.5f, 0, SHAPE(4, 4, 1, 1));
    int sum = add_node(g, OP_ADD, "sum", NULL, 2, dw, pw);
    int cat = add_node(g, OP_CONCAT, "cat", NULL, 2, sum, dw);
    a = pool_attrs(2, 1, 0, 1);
    int maxpool = add_node(g, OP_MAXPOOL, "maxpool", &a, 1, cat);
    a = pool_attrs(3, 1, 1, 0);
    int avgpool = add_node(g, OP_AVGPOOL, "avgpool", &a, 1, maxpool);
    int gap = add_node(g, OP_GLOBAL_AVGPOOL, "gap", NULL, 1, avgpool);
    a = scalar_attrs(0, 5, 0);
    int fc = add_node(g, OP_DENSE, "fc", &a, 1, gap);
    add_param(g, fc, PARAM_WEIGHT, "fc.weight", PARAM_ROLE_WEIGHT, 1.0f, 0, SHAPE(5, 8));
    add_param(g, fc, PARAM_BIAS, "fc.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(5));
    add_node(g, OP_SOFTMAX, "softmax", NULL, 1, fc);
    if (!finalize_ok(g)) {
        graph_free(g);
        return NULL;
    }
    return g;
}

static void add_layernorm(graph *g, int node, const char *prefix)
{
    char name[64];
    snprintf(name, sizeof name, "%s.weight", prefix);
    add_param(g, node, PARAM_GAMMA, name, PARAM_ROLE_NORM, 0.3f, 1, SHAPE(8));
    snprintf(name, sizeof name, "%s.bias", prefix);
    add_param(g, node, PARAM_BETA, name, PARAM_ROLE_NORM, 0.2f, 0, SHAPE(8));
}

/*
 * Mini ViT on (3, 9, 9): patch embedding (patch 3, D = 8, so T = 1 + 9),
 * pre-norm attention block (2 heads) and MLP block with residuals, final layer
 * norm, class token, dense head. Output (5).
 */
static graph *build_vit(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 9, 9);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = conv_attrs(8, 3, 3, 0, 0, 0, 0, 1);
    int pe = add_node(g, OP_PATCH_EMBED, "patch", &a, 1, in);
    add_param(g, pe, PARAM_WEIGHT, "patch.weight", PARAM_ROLE_WEIGHT, 0.3f, 0, SHAPE(8, 3, 3, 3));
    add_param(g, pe, PARAM_BIAS, "patch.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(8));
    add_param(g, pe, PARAM_CLASS_TOKEN, "cls", PARAM_ROLE_EMBEDDING, 0.5f, 0, SHAPE(8));
    add_param(g, pe, PARAM_POSITION, "pos", PARAM_ROLE_EMBEDDING, 0.5f, 0, SHAPE(10, 8));
    a = scalar_attrs(1e-6f, 0, 0);
    int ln1 = add_node(g, OP_LAYERNORM, "ln1", &a, 1, pe);
    add_layernorm(g, ln1, "ln1");
    a = scalar_attrs(0, 0, 2);
    int att = add_node(g, OP_MHSA, "attn", &a, 1, ln1);
    add_param(g, att, PARAM_QKV_WEIGHT, "attn.in_proj_weight", PARAM_ROLE_WEIGHT, 0.5f, 0, SHAPE(24, 8));
    add_param(g, att, PARAM_QKV_BIAS, "attn.in_proj_bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(24));
    add_param(g, att, PARAM_OUT_WEIGHT, "attn.out_proj.weight", PARAM_ROLE_WEIGHT, 0.5f, 0, SHAPE(8, 8));
    add_param(g, att, PARAM_OUT_BIAS, "attn.out_proj.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(8));
    int res1 = add_node(g, OP_ADD, "res1", NULL, 2, pe, att);
    a = scalar_attrs(1e-6f, 0, 0);
    int ln2 = add_node(g, OP_LAYERNORM, "ln2", &a, 1, res1);
    add_layernorm(g, ln2, "ln2");
    a = scalar_attrs(0, 16, 0);
    int fc1 = add_node(g, OP_DENSE, "fc1", &a, 1, ln2);
    add_param(g, fc1, PARAM_WEIGHT, "fc1.weight", PARAM_ROLE_WEIGHT, 0.5f, 0, SHAPE(16, 8));
    add_param(g, fc1, PARAM_BIAS, "fc1.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(16));
    int gelu = add_node(g, OP_GELU, "gelu", NULL, 1, fc1);
    a = scalar_attrs(0, 8, 0);
    int fc2 = add_node(g, OP_DENSE, "fc2", &a, 1, gelu);
    add_param(g, fc2, PARAM_WEIGHT, "fc2.weight", PARAM_ROLE_WEIGHT, 0.4f, 0, SHAPE(8, 16));
    add_param(g, fc2, PARAM_BIAS, "fc2.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(8));
    int res2 = add_node(g, OP_ADD, "res2", NULL, 2, res1, fc2);
    a = scalar_attrs(1e-6f, 0, 0);
    int ln3 = add_node(g, OP_LAYERNORM, "ln3", &a, 1, res2);
    add_layernorm(g, ln3, "ln3");
    a = scalar_attrs(0, 0, 0);
    a.token_index = 0;
    int cls = add_node(g, OP_TOKEN_SELECT, "cls_token", &a, 1, ln3);
    a = scalar_attrs(0, 5, 0);
    int head = add_node(g, OP_DENSE, "head", &a, 1, cls);
    add_param(g, head, PARAM_WEIGHT, "head.weight", PARAM_ROLE_WEIGHT, 0.8f, 0, SHAPE(5, 8));
    add_param(g, head, PARAM_BIAS, "head.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(5));
    if (!finalize_ok(g)) {
        graph_free(g);
        return NULL;
    }
    return g;
}

/* (2, 4, 4) -> zero padding (1, 0, 0, 1) -> dropout 0.5 -> flatten NHWC -> dense 3. */
static graph *build_flatten(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(2, 4, 4);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    memset(&a, 0, sizeof a);
    a.pad_top = 1;
    a.pad_right = 1;
    int pad = add_node(g, OP_ZEROPAD, "pad", &a, 1, in);
    memset(&a, 0, sizeof a);
    a.dropout_rate = 0.5f;
    int drop = add_node(g, OP_DROPOUT, "drop", &a, 1, pad);
    memset(&a, 0, sizeof a);
    a.flatten_nhwc = 1;
    int flat = add_node(g, OP_FLATTEN, "flatten", &a, 1, drop);
    a = scalar_attrs(0, 3, 0);
    int fc = add_node(g, OP_DENSE, "fc", &a, 1, flat);
    add_param(g, fc, PARAM_WEIGHT, "fc.weight", PARAM_ROLE_WEIGHT, 0.5f, 0, SHAPE(3, 50));
    add_param(g, fc, PARAM_BIAS, "fc.bias", PARAM_ROLE_BIAS, 0.2f, 0, SHAPE(3));
    if (!finalize_ok(g)) {
        graph_free(g);
        return NULL;
    }
    return g;
}

static size_t input_floats(const graph *g, int n)
{
    return (size_t)n * g->nodes[0].sample_numel;
}

/* One finite-difference check: the graph, the batch and the fixed labels. */
typedef struct fd_check {
    graph *g;
    const float *x;
    int n;
    graph_mode mode;
    const int32_t *labels;
    uint64_t seed;          /* dropout seed restored before every forward */
    double loss0;           /* loss at the unperturbed point */
    uint64_t pieces0;       /* piece_hash at the unperturbed point */
} fd_check;

static uint64_t hash_step(uint64_t h, uint64_t v)
{
    return (h ^ v) * UINT64_C(1099511628211);
}

/* Hashes the position of the first maximum of every max-pool window. */
static uint64_t hash_maxpool_argmax(uint64_t h, const pool2d_shape *s, const float *x, int n)
{
    for (int i = 0; i < n * s->c; i++)
        for (int p = 0; p < s->p; p++)
            for (int q = 0; q < s->q; q++) {
                int best = -1;
                for (int r = 0; r < s->r; r++)
                    for (int t = 0; t < s->s; t++) {
                        int row = p * s->stride_h - s->pad_top + r;
                        int col = q * s->stride_w - s->pad_left + t;
                        if (row < 0 || row >= s->h || col < 0 || col >= s->w)
                            continue;
                        int at = row * s->w + col;
                        if (best < 0 || x[(size_t)i * s->h * s->w + at] >
                                            x[(size_t)i * s->h * s->w + best])
                            best = at;
                    }
                h = hash_step(h, (uint64_t)best);
            }
    return h;
}

/*
 * Hashes which linear piece every relu and relu6 input and every max-pool
 * window is on after the last forward. A finite difference across a change of
 * piece (a kink) is meaningless, so such entries are left out.
 */
static uint64_t piece_hash(const graph *g, int n)
{
    uint64_t h = UINT64_C(1469598103934665603);
    for (int i = 1; i < g->n_nodes; i++) {
        const graph_node *nd = &g->nodes[i];
        const float *x = graph_node_output(g, nd->inputs[0]);
        size_t count = (size_t)n * nd->sample_numel;
        if (nd->op == OP_MAXPOOL)
            h = hash_maxpool_argmax(h, &nd->attrs.pool, x, n);
        if (nd->op != OP_RELU && nd->op != OP_RELU6)
            continue;
        for (size_t j = 0; j < count; j++)
            h = hash_step(h, x[j] <= 0 ? 0 : (nd->op == OP_RELU6 && x[j] >= 6) ? 2 : 1);
    }
    return h;
}

/* Runs a forward and returns the mean cross-entropy of the output node;
 * writes dL/dlogits if dlogits is non-NULL. */
static double loss_at(const fd_check *c, float *dlogits)
{
    top_error err;
    top_error_clear(&err);
    c->g->dropout_seed = c->seed;
    top_status st = graph_forward(c->g, c->x, c->n, c->mode, &err);
    CHECK_MSG(st == TOP_OK, "graph_forward: %s", err.message);
    if (st != TOP_OK)
        return NAN;
    int k = (int)c->g->nodes[c->g->output].sample_numel;
    return cross_entropy_forward_backward(dlogits, graph_node_output(c->g, c->g->output),
                                          c->labels, c->n, k);
}

/* Returns the central difference of the loss with respect to *v, which is
 * restored. Sets *kink when a step changes the piece of a relu, relu6 or max pool. */
static double numeric_grad(const fd_check *c, float *v, int *kink)
{
    float saved = *v;
    float plus = (float)(saved + GRAD_STEP), minus = (float)(saved - GRAD_STEP);
    *v = plus;
    double loss_plus = loss_at(c, NULL);
    *kink = piece_hash(c->g, c->n) != c->pieces0;
    *v = minus;
    double loss_minus = loss_at(c, NULL);
    *kink |= piece_hash(c->g, c->n) != c->pieces0;
    *v = saved;
    return (loss_plus - loss_minus) / ((double)plus - (double)minus);
}

/* ||analytic - numeric|| / max(||analytic||, ||numeric||) over the entries
 * whose skip flag is 0. */
static double normalized_error(const float *analytic, const double *numeric,
                               const int *skip, size_t count, double *analytic_norm)
{
    double diff = 0, na = 0, nn = 0;
    for (size_t i = 0; i < count; i++) {
        if (skip[i])
            continue;
        double d = analytic[i] - numeric[i];
        diff += d * d;
        na += (double)analytic[i] * analytic[i];
        nn += numeric[i] * numeric[i];
    }
    *analytic_norm = sqrt(na);
    double denom = fmax(sqrt(na), sqrt(nn));
    return denom > 0 ? sqrt(diff) / denom : 0;
}

/* Scores one tensor's analytic gradient against central differences. Entries at
 * kinks are left out, but at most KINK_MAX_SHARE of them. */
static double check_tensor_grad(const fd_check *c, const char *what, float *values,
                                const float *grad, size_t count, int *kinks)
{
    CHECK_MSG(grad != NULL, "%s: no gradient was allocated", what);
    if (!grad)
        return INFINITY;
    double *numeric = malloc(count * sizeof *numeric);
    int *skip = malloc(count * sizeof *skip);
    size_t skipped = 0;
    for (size_t i = 0; i < count; i++) {
        numeric[i] = numeric_grad(c, &values[i], &skip[i]);
        skipped += (size_t)skip[i];
    }
    double norm, e = normalized_error(grad, numeric, skip, count, &norm);
    free(numeric);
    free(skip);
    CHECK_MSG(e <= GRAD_TOL, "%s: normalized gradient error %.3g > %.3g", what, e, GRAD_TOL);
    CHECK_MSG(norm > 0, "%s: the analytic gradient is all zero", what);
    CHECK_MSG(skipped <= KINK_MAX_SHARE * (double)count,
              "%s: %zu of %zu entries sit at kinks", what, skipped, count);
    *kinks += (int)skipped;
    return e;
}

/*
 * Checks a gradient that is zero in exact arithmetic. The normalized error
 * would only compare rounding noise there, so both gradients must stay below
 * an absolute bound instead.
 */
static void check_zero_grad(const fd_check *c, graph_param *gp)
{
    CHECK_MSG(gp->grad != NULL, "%s: no gradient was allocated", gp->name);
    for (size_t i = 0; gp->grad && i < gp->value.numel; i++) {
        int kink;
        double numeric = numeric_grad(c, &gp->value.data[i], &kink);
        CHECK_CLOSE_AT(gp->grad[i], 0.0, ZERO_GRAD_TOL, i);
        if (!kink)
            CHECK_CLOSE_AT(numeric, 0.0, ZERO_GRAD_TOL, i);
    }
}

/*
 * Checks dL/dx and dL/dparam of every trainable parameter against central
 * differences and prints the largest normalized error. The parameter named
 * zero_grad (none if NULL) must have a zero gradient instead.
 */
static void check_graph_grads(graph *g, float *x, int n, graph_mode mode,
                                const int32_t *labels, const char *zero_grad)
{
    fd_check c = {g, x, n, mode, labels, g->dropout_seed, 0, 0};
    int k = (int)g->nodes[g->output].sample_numel, kinks = 0;
    size_t xcount = input_floats(g, n);
    float *dlogits = malloc((size_t)n * k * sizeof(float));
    float *dx = malloc(xcount * sizeof(float));
    top_error err;
    top_error_clear(&err);

    graph_zero_grad(g);
    c.loss0 = loss_at(&c, dlogits);
    c.pieces0 = piece_hash(g, n);
    top_status st = graph_backward(g, g->output, dlogits, dx, &err);
    CHECK_MSG(st == TOP_OK, "graph_backward: %s", err.message);
    double worst = check_tensor_grad(&c, "input", x, dx, xcount, &kinks);
    for (int p = 0; p < g->n_params; p++) {
        graph_param *gp = &g->params[p];
        if (gp->role == PARAM_ROLE_STATISTIC) {
            CHECK_MSG(gp->grad == NULL, "%s: a statistic got a gradient buffer", gp->name);
            continue;
        }
        if (zero_grad && strcmp(gp->name, zero_grad) == 0) {
            check_zero_grad(&c, gp);
            continue;
        }
        double e = check_tensor_grad(&c, gp->name, gp->value.data, gp->grad, gp->value.numel,
                                     &kinks);
        worst = fmax(worst, e);
    }
    printf("     %s: max normalized gradient error %.2e, %d entries at kinks left out\n",
           mode == GRAPH_MODE_TRAIN ? "training" : "inference", worst, kinks);
    free(dlogits);
    free(dx);
}

static float *random_batch(const graph *g, int n)
{
    size_t count = input_floats(g, n);
    float *x = malloc(count * sizeof(float));
    fill_uniform(x, count, 1.0f, 0);
    return x;
}

static void test_cnn_grads_inference(void)
{
    graph *g = build_cnn();
    if (!g)
        return;
    float *x = random_batch(g, 2);
    int32_t labels[2] = {1, 3};
    check_graph_grads(g, x, 2, GRAPH_MODE_INFERENCE, labels, NULL);
    free(x);
    graph_free(g);
}

static void test_cnn_grads_training(void)
{
    graph *g = build_cnn();
    if (!g)
        return;
    float *x = random_batch(g, 3);
    int32_t labels[3] = {0, 4, 2};
    /* The training-mode batch norm subtracts the batch mean, so the bias of
     * the conv before it has a zero gradient. */
    check_graph_grads(g, x, 3, GRAPH_MODE_TRAIN, labels, "conv1.bias");
    free(x);
    graph_free(g);
}

static void test_vit_grads_inference(void)
{
    graph *g = build_vit();
    if (!g)
        return;
    float *x = random_batch(g, 2);
    int32_t labels[2] = {2, 0};
    check_graph_grads(g, x, 2, GRAPH_MODE_INFERENCE, labels, NULL);
    free(x);
    graph_free(g);
}

static void test_flatten_grads_and_dropout(void)
{
    graph *g = build_flatten();
    if (!g)
        return;
    float *x = random_batch(g, 2);
    int32_t labels[2] = {2, 1};
    check_graph_grads(g, x, 2, GRAPH_MODE_INFERENCE, labels, NULL);
    g->dropout_seed = 7;
    check_graph_grads(g, x, 2, GRAPH_MODE_TRAIN, labels, NULL);
    free(x);
    graph_free(g);
}

/* Zero padding then NHWC flatten: element (c, h, w) of the padded image
 * lands at (h * W + w) * C + c, and inference dropout is the identity. */
static void test_flatten_nhwc_order(void)
{
    graph *g = build_flatten();
    if (!g)
        return;
    float *x = random_batch(g, 2);
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(graph_forward(g, x, 2, GRAPH_MODE_INFERENCE, &err), TOP_OK);
    const float *pad = graph_node_output(g, 1), *drop = graph_node_output(g, 2);
    const float *flat = graph_node_output(g, 3);
    int c = 2, h = 5, w = 5;
    for (int n = 0; n < 2; n++)
        for (int ch = 0; ch < c; ch++)
            for (int i = 0; i < h; i++)
                for (int j = 0; j < w; j++) {
                    size_t src = (((size_t)n * c + ch) * h + i) * w + j;
                    size_t dst = (size_t)n * 50 + ((size_t)i * w + j) * c + ch;
                    float expected = (i == 0 || j == 4) ? 0.0f
                                                        : x[((n * c + ch) * 4 + i - 1) * 4 + j];
                    CHECK_CLOSE_AT(pad[src], expected, 0.0, src);
                    CHECK_CLOSE_AT(drop[src], pad[src], 0.0, src);
                    CHECK_CLOSE_AT(flat[dst], pad[src], 0.0, dst);
                }
    free(x);
    graph_free(g);
}

/* Training-mode dropout keeps each value scaled by 1 / (1 - rate) or zeroes
 * it, draws a new mask per forward and repeats a mask for a repeated seed. */
static void test_dropout_training_masks(void)
{
    graph *g = build_flatten();
    if (!g)
        return;
    float *x = random_batch(g, 2);
    size_t count = 2 * 50;
    float *first = malloc(count * sizeof(float));
    top_error err;
    top_error_clear(&err);
    g->dropout_seed = 42;
    CHECK_INT_EQ(graph_forward(g, x, 2, GRAPH_MODE_TRAIN, &err), TOP_OK);
    memcpy(first, graph_node_output(g, 2), count * sizeof(float));
    const float *pad = graph_node_output(g, 1);
    int dropped = 0, kept = 0;
    for (size_t i = 0; i < count; i++) {
        if (pad[i] == 0)
            continue;
        if (first[i] == 0)
            dropped++;
        else {
            kept++;
            CHECK_CLOSE_AT(first[i], 2.0f * pad[i], 1e-6, i);
        }
    }
    CHECK(dropped > 0);
    CHECK(kept > 0);
    CHECK(g->dropout_seed != 42);

    CHECK_INT_EQ(graph_forward(g, x, 2, GRAPH_MODE_TRAIN, &err), TOP_OK);
    CHECK(memcmp(first, graph_node_output(g, 2), count * sizeof(float)) != 0);
    g->dropout_seed = 42;
    CHECK_INT_EQ(graph_forward(g, x, 2, GRAPH_MODE_TRAIN, &err), TOP_OK);
    CHECK(memcmp(first, graph_node_output(g, 2), count * sizeof(float)) == 0);
    free(first);
    free(x);
    graph_free(g);
}

/* Training-mode batch norm: running = 0.9 running + 0.1 batch value, with the
 * unbiased variance of the conv output over N x H x W. */
static void test_batchnorm_running_update(void)
{
    graph *g = build_cnn();
    if (!g)
        return;
    int n = 3, c = 4, hw = 16;
    float *x = random_batch(g, n);
    const float *mean = g->params[graph_find_param(g, "bn1.running_mean")].value.data;
    const float *var = g->params[graph_find_param(g, "bn1.running_var")].value.data;
    float old_mean[4], old_var[4];
    memcpy(old_mean, mean, sizeof old_mean);
    memcpy(old_var, var, sizeof old_var);
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(graph_forward(g, x, n, GRAPH_MODE_TRAIN, &err), TOP_OK);
    const float *conv = graph_node_output(g, graph_find_node(g, "conv1"));
    for (int ch = 0; ch < c; ch++) {
        double sum = 0, sq = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < hw; j++)
                sum += conv[(i * c + ch) * hw + j];
        double mu = sum / (n * hw);
        for (int i = 0; i < n; i++)
            for (int j = 0; j < hw; j++)
                sq += pow(conv[(i * c + ch) * hw + j] - mu, 2);
        CHECK_CLOSE_AT(mean[ch], 0.9 * old_mean[ch] + 0.1 * mu, 1e-5, ch);
        CHECK_CLOSE_AT(var[ch], 0.9 * old_var[ch] + 0.1 * sq / (n * hw - 1), 1e-5, ch);
    }

    /* Inference leaves the statistics alone. */
    float after[4];
    memcpy(after, mean, sizeof after);
    CHECK_INT_EQ(graph_forward(g, x, n, GRAPH_MODE_INFERENCE, &err), TOP_OK);
    CHECK(memcmp(after, mean, sizeof after) == 0);
    free(x);
    graph_free(g);
}

/* Forward of a batch of 3 equals three forwards of one image. */
static void check_batch_consistency(graph *g)
{
    float *x = random_batch(g, 3);
    size_t per_image = input_floats(g, 1), k = g->nodes[g->output].sample_numel;
    float *batched = malloc(3 * k * sizeof(float));
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(graph_forward(g, x, 3, GRAPH_MODE_INFERENCE, &err), TOP_OK);
    memcpy(batched, graph_node_output(g, g->output), 3 * k * sizeof(float));
    for (int i = 0; i < 3; i++) {
        CHECK_INT_EQ(graph_forward(g, x + i * per_image, 1, GRAPH_MODE_INFERENCE, &err),
                     TOP_OK);
        const float *single = graph_node_output(g, g->output);
        for (size_t j = 0; j < k; j++)
            CHECK_CLOSE_AT(batched[i * k + j], single[j], 1e-5, i * k + j);
    }
    free(batched);
    free(x);
}

static void test_batch_consistency(void)
{
    graph *g = build_cnn();
    if (g)
        check_batch_consistency(g);
    graph_free(g);
    g = build_vit();
    if (g)
        check_batch_consistency(g);
    graph_free(g);
}

/* A forward that stops at a node gives that node and every earlier one the
 * outputs of the full forward, bit for bit, and rejects a node out of range. */
static void test_forward_to(void)
{
    graph *g = build_cnn();
    if (!g)
        return;
    enum { N = 3 };
    size_t in = g->nodes[0].sample_numel;
    float *x = malloc(N * in * sizeof *x);
    fill_uniform(x, N * in, 2.0f, -1.0f);
    int last = g->n_nodes / 2;
    float *full[64] = {0};
    top_error err;
    top_error_clear(&err);
    CHECK(graph_forward(g, x, N, GRAPH_MODE_INFERENCE, &err) == TOP_OK);
    for (int i = 0; i <= last && i < 64; i++) {
        size_t bytes = N * g->nodes[i].sample_numel * sizeof(float);
        full[i] = malloc(bytes);
        memcpy(full[i], graph_node_output(g, i), bytes);
    }
    float *y = malloc(N * in * sizeof *y);
    fill_uniform(y, N * in, 2.0f, -1.0f); /* another batch first, so stale data differs */
    CHECK(graph_forward(g, y, N, GRAPH_MODE_INFERENCE, &err) == TOP_OK);
    CHECK(graph_forward_to(g, x, N, GRAPH_MODE_INFERENCE, last, &err) == TOP_OK);
    for (int i = 0; i <= last && i < 64; i++)
        CHECK_MSG(memcmp(full[i], graph_node_output(g, i),
                         N * g->nodes[i].sample_numel * sizeof(float)) == 0,
                  "node %d differs after a forward to node %d", i, last);
    CHECK(graph_forward_to(g, x, N, GRAPH_MODE_INFERENCE, g->n_nodes, &err) == TOP_ERR_INVALID);
    CHECK(strstr(err.message, "outside 0..") != NULL);
    for (int i = 0; i < 64; i++)
        free(full[i]);
    free(x);
    free(y);
    graph_free(g);
}

/*
 * Fan-out: flatten feeds two dense layers whose outputs are added, so
 * dx = W_a^T dy + W_b^T dy. The add also reads its first input twice.
 */
static void test_fanout_sums_gradients(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(1, 2, 3);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    int flat = add_node(g, OP_FLATTEN, "flatten", NULL, 1, in);
    a = scalar_attrs(0, 4, 0);
    int da = add_node(g, OP_DENSE, "dense_a", &a, 1, flat);
    add_param(g, da, PARAM_WEIGHT, "a.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(4, 6));
    int db = add_node(g, OP_DENSE, "dense_b", &a, 1, flat);
    add_param(g, db, PARAM_WEIGHT, "b.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(4, 6));
    int sum = add_node(g, OP_ADD, "sum", NULL, 3, da, db, da);
    if (!finalize_ok(g)) {
        graph_free(g);
        return;
    }
    float x[6], dy[4], dx[6];
    fill_uniform(x, 6, 1, 0);
    fill_uniform(dy, 4, 1, 0);
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(graph_forward(g, x, 1, GRAPH_MODE_INFERENCE, &err), TOP_OK);
    const float *wa = g->params[0].value.data, *wb = g->params[1].value.data;

    /* From dense_a only: dense_b does not lead there and gets no gradient. */
    CHECK_INT_EQ(graph_backward(g, da, dy, dx, &err), TOP_OK);
    CHECK(g->params[0].grad != NULL);
    CHECK(g->params[1].grad == NULL);
    for (int j = 0; j < 6; j++) {
        double expected = 0;
        for (int o = 0; o < 4; o++)
            expected += (double)wa[o * 6 + j] * dy[o];
        CHECK_CLOSE_AT(dx[j], expected, 1e-5, j);
    }

    graph_zero_grad(g);
    CHECK_INT_EQ(graph_backward(g, sum, dy, dx, &err), TOP_OK);
    for (int j = 0; j < 6; j++) {
        double expected = 0;
        for (int o = 0; o < 4; o++)
            expected += 2.0 * wa[o * 6 + j] * dy[o] + (double)wb[o * 6 + j] * dy[o];
        CHECK_CLOSE_AT(dx[j], expected, 1e-5, j);
    }
    graph_free(g);
}

/* Parameter gradients accumulate over backward calls until graph_zero_grad. */
static void test_param_grads_accumulate(void)
{
    graph *g = build_vit();
    if (!g)
        return;
    float *x = random_batch(g, 2);
    float dlogits[10];
    int32_t labels[2] = {1, 4};
    top_error err;
    top_error_clear(&err);
    fd_check c = {g, x, 2, GRAPH_MODE_INFERENCE, labels, 0, 0, 0};
    loss_at(&c, dlogits);
    CHECK_INT_EQ(graph_backward(g, g->output, dlogits, NULL, &err), TOP_OK);
    int p = graph_find_param(g, "attn.in_proj_weight");
    size_t count = g->params[p].value.numel;
    float *once = malloc(count * sizeof(float));
    memcpy(once, g->params[p].grad, count * sizeof(float));
    CHECK_INT_EQ(graph_backward(g, g->output, dlogits, NULL, &err), TOP_OK);
    for (size_t i = 0; i < count; i++)
        CHECK_CLOSE_AT(g->params[p].grad[i], 2.0f * once[i], 1e-6 + 1e-5 * fabs(once[i]), i);
    graph_zero_grad(g);
    for (size_t i = 0; i < count; i++)
        CHECK_CLOSE_AT(g->params[p].grad[i], 0.0, 0.0, i);
    free(once);
    free(x);
    graph_free(g);
}

/* Finalizes g and checks the status and that the message contains each of
 * the given strings. */
static void check_finalize_error(graph *g, top_status expected, const char *a, const char *b,
                                 const char *c)
{
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(graph_finalize(g, &err), expected);
    const char *parts[3] = {a, b, c};
    for (int i = 0; i < 3; i++)
        CHECK_MSG(!parts[i] || strstr(err.message, parts[i]), "message '%s' lacks '%s'",
                  err.message, parts[i]);
}

static void test_error_conv_input_channels(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 8, 8);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = conv_attrs(4, 3, 1, 1, 1, 1, 1, 1);
    int conv = add_node(g, OP_CONV2D, "stem", &a, 1, in);
    add_param(g, conv, PARAM_WEIGHT, "stem.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(4, 2, 3, 3));
    check_finalize_error(g, TOP_ERR_SHAPE, "'stem'", "(4, 2, 3, 3)", "(4, 3, 3, 3)");
    CHECK(!g->finalized);
    graph_free(g);
}

static void test_error_batchnorm_missing_param(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 4, 4);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = scalar_attrs(1e-5f, 0, 0);
    int bn = add_node(g, OP_BATCHNORM, "bn0", &a, 1, in);
    add_param(g, bn, PARAM_GAMMA, "bn0.weight", PARAM_ROLE_NORM, 1, 0, SHAPE(3));
    add_param(g, bn, PARAM_BETA, "bn0.bias", PARAM_ROLE_NORM, 1, 0, SHAPE(3));
    add_param(g, bn, PARAM_MEAN, "bn0.running_mean", PARAM_ROLE_STATISTIC, 1, 0, SHAPE(3));
    check_finalize_error(g, TOP_ERR_NOT_FOUND, "'bn0'", "running_var", "(3)");
    graph_free(g);
}

static void test_error_add_shapes(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 4, 4);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = conv_attrs(4, 1, 1, 0, 0, 0, 0, 1);
    int c1 = add_node(g, OP_CONV2D, "branch", &a, 1, in);
    add_param(g, c1, PARAM_WEIGHT, "branch.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(4, 3, 1, 1));
    add_node(g, OP_ADD, "merge", NULL, 2, c1, in);
    check_finalize_error(g, TOP_ERR_SHAPE, "'merge'", "(3, 4, 4)", "(4, 4, 4)");
    graph_free(g);
}

static void test_error_dense_rank_and_weight(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 4, 4);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = scalar_attrs(0, 2, 0);
    int fc = add_node(g, OP_DENSE, "fc", &a, 1, in);
    add_param(g, fc, PARAM_WEIGHT, "fc.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(2, 48));
    check_finalize_error(g, TOP_ERR_SHAPE, "'fc'", "(3, 4, 4)", "flatten");
    graph_free(g);

    g = new_graph();
    a = input_attrs(3, 4, 4);
    in = add_node(g, OP_INPUT, "input", &a, 0);
    int gap = add_node(g, OP_GLOBAL_AVGPOOL, "gap", NULL, 1, in);
    a = scalar_attrs(0, 2, 0);
    fc = add_node(g, OP_DENSE, "fc", &a, 1, gap);
    add_param(g, fc, PARAM_WEIGHT, "fc.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(3, 2));
    check_finalize_error(g, TOP_ERR_SHAPE, "'fc'", "(3, 2)", "(2, 3)");
    graph_free(g);
}

static void test_error_attention_and_patch(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 6, 6);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = conv_attrs(4, 3, 3, 0, 0, 0, 0, 1);
    int pe = add_node(g, OP_PATCH_EMBED, "embed", &a, 1, in);
    add_param(g, pe, PARAM_WEIGHT, "embed.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(4, 3, 3, 3));
    add_param(g, pe, PARAM_CLASS_TOKEN, "embed.cls", PARAM_ROLE_EMBEDDING, 1, 0, SHAPE(4));
    add_param(g, pe, PARAM_POSITION, "embed.pos", PARAM_ROLE_EMBEDDING, 1, 0, SHAPE(4, 4));
    check_finalize_error(g, TOP_ERR_SHAPE, "'embed'", "(4, 4)", "(5, 4)");
    graph_free(g);

    g = new_graph();
    a = input_attrs(3, 6, 6);
    in = add_node(g, OP_INPUT, "input", &a, 0);
    a = conv_attrs(4, 3, 3, 0, 0, 0, 0, 1);
    pe = add_node(g, OP_PATCH_EMBED, "embed", &a, 1, in);
    add_param(g, pe, PARAM_WEIGHT, "embed.weight", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(4, 3, 3, 3));
    add_param(g, pe, PARAM_CLASS_TOKEN, "embed.cls", PARAM_ROLE_EMBEDDING, 1, 0, SHAPE(4));
    add_param(g, pe, PARAM_POSITION, "embed.pos", PARAM_ROLE_EMBEDDING, 1, 0, SHAPE(5, 4));
    a = scalar_attrs(0, 0, 2);
    int att = add_node(g, OP_MHSA, "attn", &a, 1, pe);
    add_param(g, att, PARAM_QKV_WEIGHT, "attn.qkv", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(12, 4));
    add_param(g, att, PARAM_QKV_BIAS, "attn.qkv_bias", PARAM_ROLE_BIAS, 1, 0, SHAPE(12));
    add_param(g, att, PARAM_OUT_WEIGHT, "attn.out", PARAM_ROLE_WEIGHT, 1, 0, SHAPE(4, 4));
    check_finalize_error(g, TOP_ERR_NOT_FOUND, "'attn'", "out_bias", "(4)");
    graph_free(g);
}

static void test_error_node_structure(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(3, 4, 4);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    add_node(g, OP_RELU, "act", NULL, 1, in);
    top_error err;
    top_error_clear(&err);
    int inputs[2] = {in, 5};
    int index = -7;

    CHECK_INT_EQ(graph_add_node(g, OP_RELU, "act", inputs, 1, NULL, &index, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'act'"), "message: %s", err.message);
    CHECK_INT_EQ(index, -7);

    top_error_clear(&err);
    CHECK_INT_EQ(graph_add_node(g, OP_RELU, "late", inputs + 1, 1, NULL, &index, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'late'") && strstr(err.message, "5"), "message: %s",
              err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(graph_add_node(g, OP_ADD, "lonely_add", inputs, 1, NULL, &index, &err),
                 TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'lonely_add'"), "message: %s", err.message);

    top_error_clear(&err);
    CHECK_INT_EQ(graph_add_node(g, OP_INPUT, "second_input", NULL, 0, NULL, &index, &err),
                 TOP_ERR_INVALID);
    CHECK_INT_EQ(g->n_nodes, 2);

    top_error_clear(&err);
    tensor t;
    CHECK_INT_EQ(tensor_init(&t, 1, (const int64_t[]){3}, &err), TOP_OK);
    CHECK_INT_EQ(graph_add_param(g, 1, 0, "act.weight", PARAM_ROLE_WEIGHT, &t,
                                 PARAM_LAYOUT_SAME, NULL, 0, &err),
                 TOP_ERR_INVALID);
    CHECK(t.data != NULL);
    tensor_free(&t);
    graph_free(g);
}

static void test_state_errors(void)
{
    graph *g = build_flatten();
    if (!g)
        return;
    top_error err;
    top_error_clear(&err);
    float dy[3] = {1, 2, 3};
    CHECK(graph_node_output(g, 4) == NULL);
    CHECK_INT_EQ(graph_backward(g, 4, dy, NULL, &err), TOP_ERR_STATE);
    top_error_clear(&err);
    CHECK_INT_EQ(graph_add_node(g, OP_RELU, "after", (const int[]){4}, 1, NULL, NULL, &err),
                 TOP_ERR_STATE);

    /* A batch whose buffers exceed the tensor limit fails cleanly and a
     * later forward of a normal batch works. */
    float x[32] = {0};
    top_error_clear(&err);
    top_status st = graph_forward(g, x, INT32_MAX / 2, GRAPH_MODE_INFERENCE, &err);
    CHECK(st == TOP_ERR_LIMIT || st == TOP_ERR_NOMEM);
    CHECK_MSG(strstr(err.message, "'input'"), "message: %s", err.message);
    CHECK(graph_node_output(g, 4) == NULL);
    top_error_clear(&err);
    CHECK_INT_EQ(graph_forward(g, x, 1, GRAPH_MODE_INFERENCE, &err), TOP_OK);
    CHECK(graph_node_output(g, 4) != NULL);
    graph_free(g);
}

/* Training mode rejects a batch norm with one value per channel. */
static void test_batchnorm_training_needs_two_values(void)
{
    graph *g = new_graph();
    node_attrs a = input_attrs(2, 1, 1);
    int in = add_node(g, OP_INPUT, "input", &a, 0);
    a = scalar_attrs(1e-5f, 0, 0);
    int bn = add_node(g, OP_BATCHNORM, "bn", &a, 1, in);
    add_param(g, bn, PARAM_GAMMA, "bn.weight", PARAM_ROLE_NORM, 0, 1, SHAPE(2));
    add_param(g, bn, PARAM_BETA, "bn.bias", PARAM_ROLE_NORM, 0, 0, SHAPE(2));
    add_param(g, bn, PARAM_MEAN, "bn.running_mean", PARAM_ROLE_STATISTIC, 0, 0, SHAPE(2));
    add_param(g, bn, PARAM_VAR, "bn.running_var", PARAM_ROLE_STATISTIC, 0, 1, SHAPE(2));
    if (!finalize_ok(g)) {
        graph_free(g);
        return;
    }
    float x[4] = {1, 2, 3, 5};
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(graph_forward(g, x, 1, GRAPH_MODE_TRAIN, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "'bn'"), "message: %s", err.message);
    top_error_clear(&err);
    CHECK_INT_EQ(graph_forward(g, x, 2, GRAPH_MODE_TRAIN, &err), TOP_OK);
    /* Channel 0 gets {1, 3}, so the batch mean is 2 and the unbiased variance 2. */
    CHECK_CLOSE(g->params[2].value.data[0], 0.1 * 2.0, 1e-6);
    CHECK_CLOSE(g->params[3].value.data[0], 0.9 * 1.0 + 0.1 * 2.0, 1e-6);
    graph_free(g);
}

/* Counts worked out by hand from the layer shapes in build_cnn and build_vit. */
static void test_stats_hand_counts(void)
{
    graph *g = build_cnn();
    if (!g)
        return;
    graph_stats s;
    graph_get_stats(g, &s);
    /* conv1 108 + 4, bn 4 + 4, dw 36 + 4, pw 16, fc 40 + 5 */
    CHECK_INT_EQ(s.params, 221);
    CHECK_INT_EQ(s.prunable_params, 108 + 36 + 16 + 40);
    /* Multiply-adds: conv1 4 x (4 x 4) outputs x 27 taps, dw 4 x 16 x 9,
     * pw 4 x 16 x 4, fc 8 x 5. */
    CHECK_CLOSE(s.flops, 2.0 * (1728 + 576 + 256 + 40), 0.0);
    CHECK(graph_param_is_prunable(g, graph_find_param(g, "conv1.weight")));
    CHECK(!graph_param_is_prunable(g, graph_find_param(g, "conv1.bias")));
    CHECK(!graph_param_is_prunable(g, graph_find_param(g, "bn1.weight")));
    CHECK(!graph_param_is_prunable(g, -1));
    graph_free(g);

    g = build_vit();
    if (!g)
        return;
    graph_get_stats(g, &s);
    /* patch 216 + 8 + 8 + 80, 3 layer norms x 16, attention 192 + 24 + 64 + 8,
     * fc1 128 + 16, fc2 128 + 8, head 40 + 5 */
    CHECK_INT_EQ(s.params, 312 + 48 + 288 + 144 + 136 + 45);
    CHECK_INT_EQ(s.prunable_params, 216 + 192 + 64 + 128 + 128 + 40);
    /* Multiply-adds: patch 8 x 9 x 27, attention (T = 10, D = 8) 10 x 8 x 24 +
     * 10 x 8 x 8 + 2 x 10 x 10 x 8, fc1 and fc2 10 x 8 x 16 each, head 8 x 5. */
    CHECK_CLOSE(s.flops, 2.0 * (1944 + 1920 + 640 + 1600 + 1280 + 1280 + 40), 0.0);
    CHECK(graph_param_is_prunable(g, graph_find_param(g, "attn.out_proj.weight")));
    CHECK(!graph_param_is_prunable(g, graph_find_param(g, "pos")));
    graph_free(g);
}

static void test_find_and_names(void)
{
    graph *g = build_cnn();
    if (!g)
        return;
    CHECK_INT_EQ(graph_find_node(g, "dw"), 4);
    CHECK_INT_EQ(graph_find_node(g, "missing"), -1);
    CHECK_INT_EQ(graph_find_param(g, "fc.bias"), g->n_params - 1);
    CHECK_INT_EQ(g->output, g->n_nodes - 1);
    CHECK(strcmp(op_kind_str(OP_PATCH_EMBED), "patch_embed") == 0);
    CHECK(strcmp(op_kind_str(OP_COUNT), "unknown") == 0);
    /* Shapes inferred by hand: (9 + 1 - 3) / 2 + 1 = 4 for the stem. */
    const graph_node *conv = &g->nodes[graph_find_node(g, "conv1")];
    CHECK_INT_EQ(conv->ndim, 3);
    CHECK_INT_EQ(conv->dims[1], 4);
    CHECK_INT_EQ(g->nodes[graph_find_node(g, "cat")].dims[0], 8);
    CHECK_INT_EQ(g->nodes[graph_find_node(g, "maxpool")].dims[1], 3);
    graph_free(g);
}

int main(void)
{
    TEST_RUN(test_find_and_names);
    TEST_RUN(test_forward_to);
    TEST_RUN(test_cnn_grads_inference);
    TEST_RUN(test_cnn_grads_training);
    TEST_RUN(test_vit_grads_inference);
    TEST_RUN(test_flatten_grads_and_dropout);
    TEST_RUN(test_flatten_nhwc_order);
    TEST_RUN(test_dropout_training_masks);
    TEST_RUN(test_batchnorm_running_update);
    TEST_RUN(test_batchnorm_training_needs_two_values);
    TEST_RUN(test_batch_consistency);
    TEST_RUN(test_fanout_sums_gradients);
    TEST_RUN(test_param_grads_accumulate);
    TEST_RUN(test_error_conv_input_channels);
    TEST_RUN(test_error_batchnorm_missing_param);
    TEST_RUN(test_error_add_shapes);
    TEST_RUN(test_error_dense_rank_and_weight);
    TEST_RUN(test_error_attention_and_patch);
    TEST_RUN(test_error_node_structure);
    TEST_RUN(test_state_errors);
    TEST_RUN(test_stats_hand_counts);
    return TEST_FINISH();
}
