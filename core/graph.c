/*
 * The model graph runtime: structure, shape inference, forward and backward.
 *
 * graph_finalize infers each node's per-sample shape from the input node and
 * checks every parameter's shape. graph_forward runs the nodes in index order
 * (a topological order, because inputs are always earlier nodes) and keeps each
 * output. graph_backward seeds the gradient of one node and walks the nodes in
 * reverse; the kernels of ops.h accumulate into input and parameter gradients,
 * so a node read by several consumers receives the sum of their gradients:
 * dL/dx = sum over consumers j of (dy_j/dx)^T dL/dy_j.
 *
 * Layout: activations are (N, per-sample shape), row-major fp32; (C, H, W)
 * samples are NCHW, (T, D) samples are token-major. Memory: one output buffer
 * per node, one gradient buffer per node on the path of a backward that has a
 * trainable parameter at or above it (every node on the path when the caller
 * asks for the input gradient), the tensors each op saves for its backward,
 * and one workspace shared by all nodes and sized as the largest need. Buffers
 * stay allocated while the batch size stays the same.
 *
 * Thread-safety: one thread uses a graph at a time; kernels parallelise inside.
 * Not done here: in-place execution or early release of activations, so a
 * forward holds every activation of the batch at once.
 */
#include "graph.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/*
 * Shape legend: N batch, C channels, H x W spatial size, K conv output
 * channels, R x S kernel, P x Q conv or pool output, T tokens, D features,
 * HEADS attention heads, IN/OUT dense features.
 */

#define RUN_MAX_SAVED 3
/* Offsets inside the shared workspace are rounded to 16 floats (64 bytes). */
#define WORK_ALIGN_FLOATS 16

/* Buffers of one node for the batch size of the last forward. */
typedef struct node_run {
    float *y;                    /* output (N, sample) */
    float *dy;                   /* gradient of the output, set by backward */
    float *saved[RUN_MAX_SAVED]; /* tensors the op keeps for its backward */
    int needs_grad;              /* the backward needs this node's gradient */
    int upstream;                /* it or an ancestor has a trainable parameter */
} node_run;

typedef struct op_info {
    const char *name;
    int min_inputs, max_inputs;
    int n_slots;
    const char *slots[GRAPH_MAX_PARAMS];
} op_info;

static const op_info op_table[OP_COUNT] = {
    [OP_INPUT] = {"input", 0, 0, 0, {NULL}},
    [OP_CONV2D] = {"conv2d", 1, 1, 2, {"weight", "bias"}},
    [OP_BATCHNORM] = {"batchnorm", 1, 1, 4, {"gamma", "beta", "running_mean", "running_var"}},
    [OP_RELU] = {"relu", 1, 1, 0, {NULL}},
    [OP_RELU6] = {"relu6", 1, 1, 0, {NULL}},
    [OP_GELU] = {"gelu", 1, 1, 0, {NULL}},
    [OP_SIGMOID] = {"sigmoid", 1, 1, 0, {NULL}},
    [OP_SOFTMAX] = {"softmax", 1, 1, 0, {NULL}},
    [OP_ADD] = {"add", 2, GRAPH_MAX_INPUTS, 0, {NULL}},
    [OP_CONCAT] = {"concat", 1, GRAPH_MAX_INPUTS, 0, {NULL}},
    [OP_MAXPOOL] = {"maxpool", 1, 1, 0, {NULL}},
    [OP_AVGPOOL] = {"avgpool", 1, 1, 0, {NULL}},
    [OP_GLOBAL_AVGPOOL] = {"global_avgpool", 1, 1, 0, {NULL}},
    [OP_DENSE] = {"dense", 1, 1, 2, {"weight", "bias"}},
    [OP_FLATTEN] = {"flatten", 1, 1, 0, {NULL}},
    [OP_ZEROPAD] = {"zeropad", 1, 1, 0, {NULL}},
    [OP_DROPOUT] = {"dropout", 1, 1, 0, {NULL}},
    [OP_LAYERNORM] = {"layernorm", 1, 1, 2, {"gamma", "beta"}},
    [OP_MHSA] = {"mhsa", 1, 1, 4, {"qkv_weight", "qkv_bias", "out_weight", "out_bias"}},
    [OP_PATCH_EMBED] = {"patch_embed", 1, 1, 4, {"weight", "bias", "class_token", "position"}},
    [OP_TOKEN_SELECT] = {"token_select", 1, 1, 0, {NULL}},
};

const char *op_kind_str(op_kind op)
{
    if ((int)op < 0 || op >= OP_COUNT)
        return "unknown";
    return op_table[op].name;
}

/* ---- small helpers -------------------------------------------------------- */

static node_run *run_of(const graph *g, int i)
{
    return (node_run *)g->nodes[i].run;
}

static const graph_node *input_node(const graph *g, const graph_node *nd, int k)
{
    return &g->nodes[nd->inputs[k]];
}

static const float *input_y(const graph *g, const graph_node *nd, int k)
{
    return run_of(g, nd->inputs[k])->y;
}

static const float *param_data(const graph *g, const graph_node *nd, int slot)
{
    int p = nd->params[slot];
    return p < 0 ? NULL : g->params[p].value.data;
}

/* Statistics (batch-norm running mean and variance) never get a gradient. */
static int param_is_trainable(const graph *g, int p)
{
    const graph_param *gp = &g->params[p];
    if (gp->role == PARAM_ROLE_STATISTIC)
        return 0;
    return !(g->nodes[gp->node].op == OP_BATCHNORM &&
             (gp->slot == PARAM_MEAN || gp->slot == PARAM_VAR));
}

static float *param_grad(const graph *g, const graph_node *nd, int slot)
{
    int p = nd->params[slot];
    return p < 0 || !param_is_trainable(g, p) ? NULL : g->params[p].grad;
}

static int64_t last_dim(const graph_node *nd)
{
    return nd->dims[nd->ndim - 1];
}

/* Rows of a per-last-dimension op: N x (sample numel / last dim). */
static size_t rows_of(const graph_node *nd, int n)
{
    return (size_t)n * (nd->sample_numel / (size_t)last_dim(nd));
}

static int spatial_of(const graph_node *nd)
{
    return nd->ndim == 3 ? (int)(nd->dims[1] * nd->dims[2]) : 1;
}

static void add_into(float *dst, const float *src, size_t count)
{
    for (size_t i = 0; i < count; i++)
        dst[i] += src[i];
}

static char *shape_str(char *buf, size_t size, const graph_node *nd)
{
    return tensor_shape_str(buf, size, nd->ndim, nd->dims);
}

static size_t round_up_floats(size_t floats)
{
    return (floats + WORK_ALIGN_FLOATS - 1) / WORK_ALIGN_FLOATS * WORK_ALIGN_FLOATS;
}

/* 64-bit mixer (splitmix64 finaliser) for per-node dropout seeds. */
static uint64_t mix_seed(uint64_t z)
{
    z += UINT64_C(0x9e3779b97f4a7c15);
    z = (z ^ (z >> 30)) * UINT64_C(0xbf58476d1ce4e5b9);
    z = (z ^ (z >> 27)) * UINT64_C(0x94d049bb133111eb);
    return z ^ (z >> 31);
}

/* ---- construction ----------------------------------------------------------- */

top_status graph_new(graph **out, top_error *err)
{
    if (!out)
        return top_error_set(err, TOP_ERR_INVALID, "graph_new: the output pointer is NULL");
    *out = NULL;
    graph *g = calloc(1, sizeof *g);
    if (!g)
        return top_error_set(err, TOP_ERR_NOMEM, "allocating the graph (%zu bytes) failed",
                             sizeof *g);
    g->output = -1;
    *out = g;
    return TOP_OK;
}

static void run_release(node_run *run)
{
    if (!run)
        return;
    top_aligned_free(run->y);
    top_aligned_free(run->dy);
    for (int k = 0; k < RUN_MAX_SAVED; k++)
        top_aligned_free(run->saved[k]);
    memset(run, 0, sizeof *run);
}

/* Frees every activation, gradient and saved buffer and the workspace. */
static void graph_release_buffers(graph *g)
{
    for (int i = 0; i < g->n_nodes; i++)
        run_release(run_of(g, i));
    top_aligned_free(g->workspace);
    g->workspace = NULL;
    g->workspace_floats = 0;
    g->batch = 0;
}

void graph_free(graph *g)
{
    if (!g)
        return;
    graph_release_buffers(g);
    for (int i = 0; i < g->n_nodes; i++)
        free(g->nodes[i].run);
    for (int p = 0; p < g->n_params; p++) {
        tensor_free(&g->params[p].value);
        top_aligned_free(g->params[p].grad);
    }
    free(g->nodes);
    free(g->params);
    free(g);
}

/* Makes room for one more element in a growable array. */
static top_status grow_array(void **array, int *cap, int count, size_t elem_size,
                             const char *what, top_error *err)
{
    if (count < *cap)
        return TOP_OK;
    if (*cap > INT_MAX / 2)
        return top_error_set(err, TOP_ERR_LIMIT, "the graph has too many %s (%d)", what, count);
    int new_cap = *cap ? *cap * 2 : 16;
    size_t bytes;
    if (top_size_mul(&bytes, (size_t)new_cap, elem_size))
        return top_error_set(err, TOP_ERR_OVERFLOW, "the %s array of %d entries overflows",
                             what, new_cap);
    void *grown = realloc(*array, bytes);
    if (!grown)
        return top_error_set(err, TOP_ERR_NOMEM, "growing the %s array to %zu bytes failed",
                             what, bytes);
    *array = grown;
    *cap = new_cap;
    return TOP_OK;
}

static top_status check_name(const char *name, const char *what, top_error *err)
{
    if (!name || !name[0])
        return top_error_set(err, TOP_ERR_INVALID,
                             "the %s name is missing; give every %s a "
                             "unique, non-empty name",
                             what, what);
    if (strlen(name) >= GRAPH_NAME_MAX)
        return top_error_set(err, TOP_ERR_INVALID,
                             "the %s name '%.64s...' has %zu bytes; "
                             "the limit is %d",
                             what, name, strlen(name), GRAPH_NAME_MAX - 1);
    return TOP_OK;
}

static top_status check_node_inputs(const graph *g, op_kind op, const char *name,
                                    const int *inputs, int n_inputs, top_error *err)
{
    const op_info *info = &op_table[op];
    if (n_inputs < info->min_inputs || n_inputs > info->max_inputs)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (%s): %d inputs given, the op takes %d to %d", name,
                             info->name, n_inputs, info->min_inputs, info->max_inputs);
    if (n_inputs > 0 && !inputs)
        return top_error_set(err, TOP_ERR_INVALID, "node '%s' (%s): the inputs array is NULL",
                             name, info->name);
    for (int k = 0; k < n_inputs; k++)
        if (inputs[k] < 0 || inputs[k] >= g->n_nodes)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "node '%s' (%s): input %d is node %d, which is not an "
                                 "earlier node (0..%d); add nodes in topological order",
                                 name, info->name, k, inputs[k], g->n_nodes - 1);
    if (op == OP_INPUT && g->n_nodes > 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (input): the input node must be the first node and "
                             "the only one; the graph already has %d nodes",
                             name, g->n_nodes);
    return TOP_OK;
}

top_status graph_add_node(graph *g, op_kind op, const char *name, const int *inputs,
                          int n_inputs, const node_attrs *attrs, int *index, top_error *err)
{
    if (!g)
        return top_error_set(err, TOP_ERR_INVALID, "graph_add_node: the graph is NULL");
    if (g->finalized)
        return top_error_set(err, TOP_ERR_STATE,
                             "node '%s': the graph is finalized; add "
                             "nodes before graph_finalize",
                             name ? name : "");
    if ((int)op < 0 || op >= OP_COUNT)
        return top_error_set(err, TOP_ERR_INVALID, "node '%s': op %d is not an op_kind",
                             name ? name : "", (int)op);
    top_status st = check_name(name, "node", err);
    if (st != TOP_OK)
        return st;
    int other = graph_find_node(g, name);
    if (other >= 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node name '%s' is already used by node "
                             "%d; node names must be unique",
                             name, other);
    st = check_node_inputs(g, op, name, inputs, n_inputs, err);
    if (st != TOP_OK)
        return st;
    st = grow_array((void **)&g->nodes, &g->cap_nodes, g->n_nodes, sizeof *g->nodes, "nodes",
                    err);
    if (st != TOP_OK)
        return st;

    graph_node *nd = &g->nodes[g->n_nodes];
    memset(nd, 0, sizeof *nd);
    snprintf(nd->name, sizeof nd->name, "%s", name);
    nd->op = op;
    if (attrs)
        nd->attrs = *attrs;
    nd->n_inputs = n_inputs;
    for (int k = 0; k < n_inputs; k++)
        nd->inputs[k] = inputs[k];
    for (int s = 0; s < GRAPH_MAX_PARAMS; s++)
        nd->params[s] = -1;
    if (index)
        *index = g->n_nodes;
    g->n_nodes++;
    return TOP_OK;
}

static top_status check_param_args(const graph *g, int node, int slot, const char *name,
                                   const tensor *value, int src_ndim, top_error *err)
{
    if (node < 0 || node >= g->n_nodes)
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter '%s': node %d does not exist "
                             "(the graph has %d nodes)",
                             name, node, g->n_nodes);
    const graph_node *nd = &g->nodes[node];
    const op_info *info = &op_table[nd->op];
    if (slot < 0 || slot >= info->n_slots)
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter '%s': node '%s' (%s) has "
                             "parameter slots 0..%d, not %d",
                             name, nd->name, info->name, info->n_slots - 1, slot);
    if (nd->params[slot] >= 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter '%s': slot %d (%s) of node "
                             "'%s' already holds '%s'",
                             name, slot, info->slots[slot], nd->name,
                             g->params[nd->params[slot]].name);
    if (graph_find_param(g, name) >= 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter name '%s' is already used; "
                             "parameter names must be unique",
                             name);
    if (!value || !value->data || value->ndim < 1 || value->ndim > TENSOR_MAX_DIMS)
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter '%s': the value is empty or "
                             "its rank is outside 1..%d",
                             name, TENSOR_MAX_DIMS);
    if (src_ndim < 0 || src_ndim > TENSOR_MAX_DIMS)
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter '%s': source rank %d is "
                             "outside 0..%d",
                             name, src_ndim, TENSOR_MAX_DIMS);
    return TOP_OK;
}

top_status graph_add_param(graph *g, int node, int slot, const char *name, param_role role,
                           tensor *value, param_layout layout, const int64_t *src_shape,
                           int src_ndim, top_error *err)
{
    if (!g)
        return top_error_set(err, TOP_ERR_INVALID, "graph_add_param: the graph is NULL");
    if (g->finalized)
        return top_error_set(err, TOP_ERR_STATE,
                             "parameter '%s': the graph is finalized; "
                             "add parameters before graph_finalize",
                             name ? name : "");
    top_status st = check_name(name, "parameter", err);
    if (st == TOP_OK)
        st = check_param_args(g, node, slot, name, value, src_ndim, err);
    if (st != TOP_OK)
        return st;
    if (src_ndim > 0 && !src_shape)
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter '%s': src_ndim is %d but "
                             "src_shape is NULL",
                             name, src_ndim);
    st = grow_array((void **)&g->params, &g->cap_params, g->n_params, sizeof *g->params,
                    "parameters", err);
    if (st != TOP_OK)
        return st;

    graph_param *gp = &g->params[g->n_params];
    memset(gp, 0, sizeof *gp);
    if (value->owned) {
        gp->value = *value;
    } else {
        /* A view (for example of a mapped file): the graph keeps its own copy. */
        st = tensor_clone(&gp->value, value, err);
        if (st != TOP_OK)
            return st;
    }
    memset(value, 0, sizeof *value);

    snprintf(gp->name, sizeof gp->name, "%s", name);
    gp->node = node;
    gp->slot = slot;
    gp->role = role;
    gp->layout = layout;
    gp->src_ndim = src_ndim > 0 ? src_ndim : gp->value.ndim;
    for (int d = 0; d < gp->src_ndim; d++)
        gp->src_shape[d] = src_ndim > 0 ? src_shape[d] : gp->value.shape[d];
    g->nodes[node].params[slot] = g->n_params;
    g->n_params++;
    return TOP_OK;
}

int graph_find_node(const graph *g, const char *name)
{
    if (!g || !name)
        return -1;
    for (int i = 0; i < g->n_nodes; i++)
        if (strcmp(g->nodes[i].name, name) == 0)
            return i;
    return -1;
}

int graph_find_param(const graph *g, const char *name)
{
    if (!g || !name)
        return -1;
    for (int p = 0; p < g->n_params; p++)
        if (strcmp(g->params[p].name, name) == 0)
            return p;
    return -1;
}

/* ---- shape inference -------------------------------------------------------- */

static void set_shape(graph_node *nd, int ndim, int64_t d0, int64_t d1, int64_t d2)
{
    nd->ndim = ndim;
    nd->dims[0] = d0;
    nd->dims[1] = d1;
    nd->dims[2] = d2;
}

static void copy_shape(graph_node *nd, const graph_node *from)
{
    set_shape(nd, from->ndim, from->dims[0], from->dims[1], from->dims[2]);
}

/* Checks that input k has a rank in rank_mask (bit r set = rank r allowed). */
static top_status expect_rank(const graph *g, const graph_node *nd, int k, int rank_mask,
                              const char *expected, top_error *err)
{
    const graph_node *in = input_node(g, nd, k);
    if (rank_mask & (1 << in->ndim))
        return TOP_OK;
    char have[96];
    return top_error_set(err, TOP_ERR_SHAPE,
                         "node '%s' (%s): input '%s' has shape %s, but "
                         "the op needs %s",
                         nd->name, op_kind_str(nd->op), in->name,
                         shape_str(have, sizeof have, in), expected);
}

/*
 * Checks the parameter in `slot` against the expected shape (ndim, expected).
 * A missing parameter is an error only when `required` is set.
 */
static top_status check_param(const graph *g, const graph_node *nd, int slot, int required,
                              int ndim, const int64_t *expected, top_error *err)
{
    char want[96], have[96];
    tensor_shape_str(want, sizeof want, ndim, expected);
    int p = nd->params[slot];
    if (p < 0) {
        if (!required)
            return TOP_OK;
        return top_error_set(err, TOP_ERR_NOT_FOUND,
                             "node '%s' (%s): the %s parameter "
                             "(slot %d) is missing; attach a tensor of shape %s",
                             nd->name, op_kind_str(nd->op), op_table[nd->op].slots[slot], slot,
                             want);
    }
    const tensor *t = &g->params[p].value;
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++)
        same = t->shape[d] == expected[d];
    if (same)
        return TOP_OK;
    return top_error_set(err, TOP_ERR_SHAPE,
                         "node '%s' (%s): parameter '%s' (%s) has shape "
                         "%s, expected %s",
                         nd->name, op_kind_str(nd->op), g->params[p].name,
                         op_table[nd->op].slots[slot],
                         tensor_shape_str(have, sizeof have, t->ndim, t->shape), want);
}

static top_status infer_input(graph_node *nd, top_error *err)
{
    const conv2d_shape *s = &nd->attrs.conv;
    if (s->c < 1 || s->h < 1 || s->w < 1)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (input): attrs.conv.c, .h, .w "
                             "are (%d, %d, %d); set the model's input channels, height and "
                             "width (each at least 1)",
                             nd->name, s->c, s->h, s->w);
    set_shape(nd, 3, s->c, s->h, s->w);
    return TOP_OK;
}

/* Fills the conv geometry of a conv2d or patch-embed node from its input, for
 * batch size n. */
static top_status conv_geometry(conv2d_shape *s, const graph *g, const graph_node *nd, int n,
                                top_error *err)
{
    const graph_node *in = input_node(g, nd, 0);
    *s = nd->attrs.conv;
    s->n = n;
    s->c = (int)in->dims[0];
    s->h = (int)in->dims[1];
    s->w = (int)in->dims[2];
    top_error local;
    top_error_clear(&local);
    top_status st = conv2d_shape_derive(s, &local);
    if (st != TOP_OK)
        return top_error_set(err, st,
                             "node '%s' (%s): %s (input '%s' of %d x %d x %d, "
                             "kernel %d x %d, %d groups, batch %d)",
                             nd->name, op_kind_str(nd->op), local.message, in->name, s->c, s->h,
                             s->w, s->r, s->s, s->groups, n);
    return TOP_OK;
}

static top_status infer_conv(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, 1 << 3, "a (C, H, W) input", err);
    conv2d_shape s;
    if (st == TOP_OK)
        st = conv_geometry(&s, g, nd, 1, err);
    if (st != TOP_OK)
        return st;
    nd->attrs.conv = s;
    int64_t weight[4] = {s.k, s.c / s.groups, s.r, s.s};
    st = check_param(g, nd, PARAM_WEIGHT, 1, 4, weight, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_BIAS, 0, 1, (const int64_t[]){s.k}, err);
    if (st == TOP_OK)
        set_shape(nd, 3, s.k, s.p, s.q);
    return st;
}

static top_status check_eps(const graph_node *nd, top_error *err)
{
    if (nd->attrs.eps > 0 && isfinite(nd->attrs.eps))
        return TOP_OK;
    return top_error_set(err, TOP_ERR_INVALID,
                         "node '%s' (%s): attrs.eps is %g; set the "
                         "epsilon of the source model (a positive number)",
                         nd->name, op_kind_str(nd->op), (double)nd->attrs.eps);
}

static top_status infer_batchnorm(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, (1 << 1) | (1 << 3), "a (C) or (C, H, W) input", err);
    if (st == TOP_OK)
        st = check_eps(nd, err);
    if (st != TOP_OK)
        return st;
    const graph_node *in = input_node(g, nd, 0);
    for (int slot = 0; slot < 4 && st == TOP_OK; slot++)
        st = check_param(g, nd, slot, 1, 1, &in->dims[0], err);
    if (st == TOP_OK)
        copy_shape(nd, in);
    return st;
}

static top_status infer_unary(const graph *g, graph_node *nd, top_error *err)
{
    if (nd->op == OP_DROPOUT) {
        float rate = nd->attrs.dropout_rate;
        if (!(rate >= 0 && rate < 1))
            return top_error_set(err, TOP_ERR_INVALID,
                                 "node '%s' (dropout): rate %g is "
                                 "outside [0, 1)",
                                 nd->name, (double)rate);
    }
    copy_shape(nd, input_node(g, nd, 0));
    return TOP_OK;
}

static top_status infer_add(const graph *g, graph_node *nd, top_error *err)
{
    const graph_node *first = input_node(g, nd, 0);
    for (int k = 1; k < nd->n_inputs; k++) {
        const graph_node *in = input_node(g, nd, k);
        int same = in->ndim == first->ndim;
        for (int d = 0; same && d < in->ndim; d++)
            same = in->dims[d] == first->dims[d];
        if (!same) {
            char a[96], b[96];
            return top_error_set(err, TOP_ERR_SHAPE,
                                 "node '%s' (add): input %d '%s' has "
                                 "shape %s, but input 0 '%s' has shape %s",
                                 nd->name, k, in->name, shape_str(a, sizeof a, in), first->name,
                                 shape_str(b, sizeof b, first));
        }
    }
    copy_shape(nd, first);
    return TOP_OK;
}

static top_status infer_concat(const graph *g, graph_node *nd, top_error *err)
{
    const graph_node *first = input_node(g, nd, 0);
    int64_t channels = 0;
    for (int k = 0; k < nd->n_inputs; k++) {
        top_status st =
            expect_rank(g, nd, k, (1 << 1) | (1 << 3), "(C) or (C, H, W) inputs", err);
        if (st != TOP_OK)
            return st;
        const graph_node *in = input_node(g, nd, k);
        if (in->ndim != first->ndim || (in->ndim == 3 && (in->dims[1] != first->dims[1] ||
                                                          in->dims[2] != first->dims[2]))) {
            char a[96], b[96];
            return top_error_set(err, TOP_ERR_SHAPE,
                                 "node '%s' (concat): input %d '%s' has "
                                 "shape %s, but input 0 '%s' has shape %s; inputs may differ "
                                 "only in channels",
                                 nd->name, k, in->name, shape_str(a, sizeof a, in), first->name,
                                 shape_str(b, sizeof b, first));
        }
        channels += in->dims[0];
    }
    set_shape(nd, first->ndim, channels, first->dims[1], first->dims[2]);
    return TOP_OK;
}

/* Fills the pool geometry of a pool node for batch size n. */
static top_status pool_geometry(pool2d_shape *s, const graph *g, const graph_node *nd, int n,
                                top_error *err)
{
    const graph_node *in = input_node(g, nd, 0);
    *s = nd->attrs.pool;
    s->n = n;
    s->c = (int)in->dims[0];
    s->h = (int)in->dims[1];
    s->w = (int)in->dims[2];
    top_error local;
    top_error_clear(&local);
    top_status st = pool2d_shape_derive(s, &local);
    if (st != TOP_OK)
        return top_error_set(err, st,
                             "node '%s' (%s): %s (input '%s' of %d x %d x %d, "
                             "window %d x %d, batch %d)",
                             nd->name, op_kind_str(nd->op), local.message, in->name, s->c, s->h,
                             s->w, s->r, s->s, n);
    return TOP_OK;
}

static top_status infer_pool(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, 1 << 3, "a (C, H, W) input", err);
    pool2d_shape s;
    if (st == TOP_OK)
        st = pool_geometry(&s, g, nd, 1, err);
    if (st != TOP_OK)
        return st;
    nd->attrs.pool = s;
    set_shape(nd, 3, s.c, s.p, s.q);
    return TOP_OK;
}

static top_status infer_global_avgpool(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, 1 << 3, "a (C, H, W) input", err);
    if (st == TOP_OK)
        set_shape(nd, 1, input_node(g, nd, 0)->dims[0], 0, 0);
    return st;
}

static top_status infer_dense(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, (1 << 1) | (1 << 2),
                                "a (IN) or (T, IN) input (add a flatten or a global average "
                                "pool before the dense layer)",
                                err);
    if (st != TOP_OK)
        return st;
    const graph_node *in = input_node(g, nd, 0);
    int64_t out = nd->attrs.dense_out;
    if (out < 1)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (dense): attrs.dense_out is "
                             "%lld; set the number of output features",
                             nd->name, (long long)out);
    int64_t weight[2] = {out, last_dim(in)};
    st = check_param(g, nd, PARAM_WEIGHT, 1, 2, weight, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_BIAS, 0, 1, &out, err);
    if (st != TOP_OK)
        return st;
    copy_shape(nd, in);
    nd->dims[nd->ndim - 1] = out;
    return TOP_OK;
}

static top_status infer_flatten(const graph *g, graph_node *nd)
{
    set_shape(nd, 1, (int64_t)input_node(g, nd, 0)->sample_numel, 0, 0);
    return TOP_OK;
}

static top_status infer_zeropad(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, 1 << 3, "a (C, H, W) input", err);
    if (st != TOP_OK)
        return st;
    const node_attrs *a = &nd->attrs;
    if (a->pad_top < 0 || a->pad_bottom < 0 || a->pad_left < 0 || a->pad_right < 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (zeropad): the paddings "
                             "(top %d, bottom %d, left %d, right %d) must not be negative",
                             nd->name, a->pad_top, a->pad_bottom, a->pad_left, a->pad_right);
    const graph_node *in = input_node(g, nd, 0);
    set_shape(nd, 3, in->dims[0], in->dims[1] + a->pad_top + a->pad_bottom,
              in->dims[2] + a->pad_left + a->pad_right);
    return TOP_OK;
}

static top_status infer_layernorm(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, (1 << 1) | (1 << 2), "a (D) or (T, D) input", err);
    if (st == TOP_OK)
        st = check_eps(nd, err);
    if (st != TOP_OK)
        return st;
    const graph_node *in = input_node(g, nd, 0);
    int64_t d = last_dim(in);
    st = check_param(g, nd, PARAM_GAMMA, 1, 1, &d, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_BETA, 1, 1, &d, err);
    if (st == TOP_OK)
        copy_shape(nd, in);
    return st;
}

static top_status infer_mhsa(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, 1 << 2, "a (T, D) input", err);
    if (st != TOP_OK)
        return st;
    const graph_node *in = input_node(g, nd, 0);
    int64_t d = in->dims[1];
    int heads = nd->attrs.heads;
    if (heads < 1 || d % heads != 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (mhsa): %d heads do not divide "
                             "the model width %lld; set attrs.heads to a divisor",
                             nd->name, heads, (long long)d);
    int64_t qkv_weight[2] = {3 * d, d}, qkv_bias = 3 * d, out_weight[2] = {d, d};
    st = check_param(g, nd, PARAM_QKV_WEIGHT, 1, 2, qkv_weight, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_QKV_BIAS, 1, 1, &qkv_bias, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_OUT_WEIGHT, 1, 2, out_weight, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_OUT_BIAS, 1, 1, &d, err);
    if (st == TOP_OK)
        copy_shape(nd, in);
    return st;
}

static top_status infer_patch_embed(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, 1 << 3, "a (C, H, W) input", err);
    conv2d_shape s;
    if (st == TOP_OK)
        st = conv_geometry(&s, g, nd, 1, err);
    if (st != TOP_OK)
        return st;
    nd->attrs.conv = s;
    int64_t d = s.k, tokens = 1 + (int64_t)s.p * s.q;
    int64_t weight[4] = {d, s.c / s.groups, s.r, s.s}, position[2] = {tokens, d};
    st = check_param(g, nd, PARAM_WEIGHT, 1, 4, weight, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_BIAS, 0, 1, &d, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_CLASS_TOKEN, 1, 1, &d, err);
    if (st == TOP_OK)
        st = check_param(g, nd, PARAM_POSITION, 1, 2, position, err);
    if (st == TOP_OK)
        set_shape(nd, 2, tokens, d, 0);
    return st;
}

static top_status infer_token_select(const graph *g, graph_node *nd, top_error *err)
{
    top_status st = expect_rank(g, nd, 0, 1 << 2, "a (T, D) input", err);
    if (st != TOP_OK)
        return st;
    const graph_node *in = input_node(g, nd, 0);
    int index = nd->attrs.token_index;
    if (index < 0 || index >= in->dims[0])
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (token_select): token index %d "
                             "is outside 0..%lld of input '%s'",
                             nd->name, index, (long long)in->dims[0] - 1, in->name);
    set_shape(nd, 1, in->dims[1], 0, 0);
    return TOP_OK;
}

static top_status infer_op(const graph *g, graph_node *nd, top_error *err)
{
    switch (nd->op) {
    case OP_INPUT: return infer_input(nd, err);
    case OP_CONV2D: return infer_conv(g, nd, err);
    case OP_BATCHNORM: return infer_batchnorm(g, nd, err);
    case OP_RELU:
    case OP_RELU6:
    case OP_GELU:
    case OP_SIGMOID:
    case OP_SOFTMAX:
    case OP_DROPOUT: return infer_unary(g, nd, err);
    case OP_ADD: return infer_add(g, nd, err);
    case OP_CONCAT: return infer_concat(g, nd, err);
    case OP_MAXPOOL:
    case OP_AVGPOOL: return infer_pool(g, nd, err);
    case OP_GLOBAL_AVGPOOL: return infer_global_avgpool(g, nd, err);
    case OP_DENSE: return infer_dense(g, nd, err);
    case OP_FLATTEN: return infer_flatten(g, nd);
    case OP_ZEROPAD: return infer_zeropad(g, nd, err);
    case OP_LAYERNORM: return infer_layernorm(g, nd, err);
    case OP_MHSA: return infer_mhsa(g, nd, err);
    case OP_PATCH_EMBED: return infer_patch_embed(g, nd, err);
    case OP_TOKEN_SELECT: return infer_token_select(g, nd, err);
    case OP_COUNT: break;
    }
    return top_error_set(err, TOP_ERR_INVALID, "node '%s': op %d is not an op_kind", nd->name,
                         (int)nd->op);
}

/* Infers the shape of node i and checks that it fits the kernels' int sizes. */
static top_status infer_node(graph *g, int i, top_error *err)
{
    graph_node *nd = &g->nodes[i];
    top_status st = infer_op(g, nd, err);
    if (st != TOP_OK)
        return st;
    for (int d = 0; d < nd->ndim; d++)
        if (nd->dims[d] < 1 || nd->dims[d] > INT_MAX) {
            char shape[96];
            return top_error_set(err, TOP_ERR_LIMIT,
                                 "node '%s' (%s): output shape %s has a "
                                 "dimension outside 1..%d",
                                 nd->name, op_kind_str(nd->op),
                                 shape_str(shape, sizeof shape, nd), INT_MAX);
        }
    return tensor_shape_numel(&nd->sample_numel, nd->ndim, nd->dims, nd->name, err);
}

top_status graph_finalize(graph *g, top_error *err)
{
    if (!g)
        return top_error_set(err, TOP_ERR_INVALID, "graph_finalize: the graph is NULL");
    if (g->n_nodes == 0 || g->nodes[0].op != OP_INPUT)
        return top_error_set(err, TOP_ERR_INVALID,
                             "the graph has no input node; add an "
                             "OP_INPUT node first");
    if (g->output >= g->n_nodes)
        return top_error_set(err, TOP_ERR_INVALID,
                             "the output node %d does not exist (the "
                             "graph has %d nodes)",
                             g->output, g->n_nodes);
    for (int i = 0; i < g->n_nodes; i++) {
        top_status st = infer_node(g, i, err);
        if (st != TOP_OK)
            return st;
    }
    if (g->output < 0)
        g->output = g->n_nodes - 1;
    g->finalized = 1;
    return TOP_OK;
}

/* Re-runs shape inference of a finalized graph for an input of h x w. */
static top_status graph_reinfer(graph *g, int h, int w, top_error *err)
{
    g->nodes[0].attrs.conv.h = h;
    g->nodes[0].attrs.conv.w = w;
    for (int i = 0; i < g->n_nodes; i++) {
        top_status st = infer_node(g, i, err);
        if (st != TOP_OK)
            return st;
    }
    return TOP_OK;
}

top_status graph_set_input_size(graph *g, int h, int w, top_error *err)
{
    if (!g || !g->finalized)
        return top_error_set(err, TOP_ERR_STATE,
                             "graph_set_input_size needs a finalized graph");
    if (h < 1 || w < 1 || h > 16384 || w > 16384)
        return top_error_set(err, TOP_ERR_INVALID,
                             "input size %d x %d is outside 1..16384; pick a size the "
                             "model's layers accept",
                             h, w);
    int old_h = g->nodes[0].attrs.conv.h, old_w = g->nodes[0].attrs.conv.w;
    graph_release_buffers(g);
    top_status st = graph_reinfer(g, h, w, err);
    if (st != TOP_OK) {
        /* Restore the old shapes; they were valid before, so this succeeds. */
        graph_reinfer(g, old_h, old_w, NULL);
        return st;
    }
    graph_preprocess *pp = &g->preprocess;
    if (pp->resize_short_side > 0 && pp->height > 0)
        pp->resize_short_side = (int)((long)pp->resize_short_side * h / pp->height);
    pp->height = h;
    pp->width = w;
    return TOP_OK;
}

/* ---- buffers ------------------------------------------------------------------ */

/* Stores a * b * c in *out; returns 0, or -1 on overflow. */
static int size_mul3(size_t *out, size_t a, size_t b, size_t c)
{
    size_t ab;
    return top_size_mul(&ab, a, b) || top_size_mul(out, ab, c) ? -1 : 0;
}

/* Floats of each tensor that node i saves for its backward, for batch n. */
static int saved_floats(const graph_node *nd, int n, size_t floats[RUN_MAX_SAVED])
{
    int bad = 0;
    memset(floats, 0, RUN_MAX_SAVED * sizeof *floats);
    switch (nd->op) {
    case OP_BATCHNORM: floats[0] = floats[1] = (size_t)nd->dims[0]; break;
    case OP_LAYERNORM: floats[0] = floats[1] = rows_of(nd, n); break;
    case OP_MHSA: {
        size_t t = (size_t)nd->dims[0], d = (size_t)nd->dims[1];
        bad |= size_mul3(&floats[0], (size_t)n, t, 3 * d);
        bad |= size_mul3(&floats[1], (size_t)n * (size_t)nd->attrs.heads, t, t);
        bad |= size_mul3(&floats[2], (size_t)n, t, d);
        break;
    }
    case OP_DROPOUT: bad |= top_size_mul(&floats[0], (size_t)n, nd->sample_numel); break;
    case OP_PATCH_EMBED:
        bad |= size_mul3(&floats[0], (size_t)n, (size_t)nd->attrs.conv.k,
                         (size_t)nd->attrs.conv.p * (size_t)nd->attrs.conv.q);
        break;
    default: break;
    }
    return bad ? -1 : 0;
}

/* Workspace floats that node i needs for forward and backward at batch n. */
static top_status workspace_floats(const graph *g, const graph_node *nd, int n, size_t *out,
                                   top_error *err)
{
    *out = 0;
    conv2d_shape s;
    top_status st = TOP_OK;
    switch (nd->op) {
    case OP_CONV2D:
        st = conv_geometry(&s, g, nd, n, err);
        if (st == TOP_OK)
            *out = conv2d_workspace_floats(&s);
        return st;
    case OP_PATCH_EMBED:
        /* The gradient of the patch tokens (N, D, P*Q), then the conv workspace. */
        st = conv_geometry(&s, g, nd, n, err);
        if (st == TOP_OK &&
            (size_mul3(out, (size_t)n, (size_t)s.k, (size_t)s.p * (size_t)s.q) ||
             top_size_add(out, round_up_floats(*out), conv2d_workspace_floats(&s))))
            st = top_error_set(err, TOP_ERR_OVERFLOW,
                               "node '%s': the workspace size "
                               "overflows at batch %d",
                               nd->name, n);
        return st;
    case OP_MHSA:
        *out = mhsa_workspace_floats((int)nd->dims[0], (int)nd->dims[1], nd->attrs.heads);
        return TOP_OK;
    case OP_FLATTEN:
        /* Backward converts the NHWC gradient to NCHW here before adding it. */
        if (nd->attrs.flatten_nhwc)
            *out = (size_t)n * nd->sample_numel;
        return TOP_OK;
    default: return TOP_OK;
    }
}

/* Allocates `floats` floats (not zeroed) for a buffer of node nd. */
static top_status buffer_alloc(float **out, size_t floats, const graph_node *nd,
                               const char *what, top_error *err)
{
    *out = NULL;
    if (floats == 0)
        return TOP_OK;
    if (floats > TENSOR_MAX_ELEMENTS)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "node '%s' (%s): the %s buffer needs %zu "
                             "floats, above the limit of %zu; use a smaller batch",
                             nd->name, op_kind_str(nd->op), what, floats,
                             (size_t)TENSOR_MAX_ELEMENTS);
    *out = top_aligned_alloc(floats * sizeof(float));
    if (!*out)
        return top_error_set(err, TOP_ERR_NOMEM,
                             "node '%s' (%s): allocating the %s buffer "
                             "(%zu bytes) failed; use a smaller batch",
                             nd->name, op_kind_str(nd->op), what, floats * sizeof(float));
    return TOP_OK;
}

/* Allocates the output and saved buffers of node i for batch n, and raises
 * *work to the node's workspace need. */
static top_status node_alloc(graph *g, int i, int n, size_t *work, top_error *err)
{
    graph_node *nd = &g->nodes[i];
    if (!nd->run) {
        nd->run = calloc(1, sizeof(node_run));
        if (!nd->run)
            return top_error_set(err, TOP_ERR_NOMEM,
                                 "node '%s': allocating its run state "
                                 "(%zu bytes) failed",
                                 nd->name, sizeof(node_run));
    }
    node_run *run = nd->run;
    size_t out_floats, saved[RUN_MAX_SAVED], need;
    if (top_size_mul(&out_floats, (size_t)n, nd->sample_numel) || saved_floats(nd, n, saved))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "node '%s' (%s): the buffer sizes "
                             "overflow at batch %d",
                             nd->name, op_kind_str(nd->op), n);
    top_status st = buffer_alloc(&run->y, out_floats, nd, "output", err);
    for (int k = 0; k < RUN_MAX_SAVED && st == TOP_OK; k++)
        st = buffer_alloc(&run->saved[k], saved[k], nd, "saved", err);
    if (st == TOP_OK)
        st = workspace_floats(g, nd, n, &need, err);
    if (st == TOP_OK && need > *work)
        *work = need;
    return st;
}

/* Sizes every buffer for batch n unless they already are. */
static top_status graph_prepare(graph *g, int n, top_error *err)
{
    if (g->batch == n)
        return TOP_OK;
    graph_release_buffers(g);
    size_t work = 0;
    for (int i = 0; i < g->n_nodes; i++) {
        top_status st = node_alloc(g, i, n, &work, err);
        if (st != TOP_OK) {
            graph_release_buffers(g);
            return st;
        }
    }
    top_status st = buffer_alloc(&g->workspace, work, &g->nodes[0], "workspace", err);
    if (st != TOP_OK) {
        graph_release_buffers(g);
        return st;
    }
    g->workspace_floats = work;
    g->batch = n;
    return TOP_OK;
}

/* ---- forward -------------------------------------------------------------------- */

static top_status forward_conv(graph *g, const graph_node *nd, int n, top_error *err)
{
    /* x: (N, C, H, W)  w: (K, C/G, R, S)  b: (K) or NULL  y: (N, K, P, Q) */
    conv2d_shape s;
    top_status st = conv_geometry(&s, g, nd, n, err);
    if (st != TOP_OK)
        return st;
    conv2d_forward(((node_run *)nd->run)->y, input_y(g, nd, 0), param_data(g, nd, PARAM_WEIGHT),
                   param_data(g, nd, PARAM_BIAS), &s, g->workspace);
    return TOP_OK;
}

/*
 * Updates the running statistics from x: (N, C, HW) as PyTorch does:
 * stat = (1 - momentum) * stat + momentum * batch value, with the unbiased
 * batch variance (divided by N*HW - 1). Accumulates in double.
 */
static void batchnorm_update_running(graph *g, const graph_node *nd, const float *x, int n,
                                     int c, int hw)
{
    float *mean = g->params[nd->params[PARAM_MEAN]].value.data;
    float *var = g->params[nd->params[PARAM_VAR]].value.data;
    double count = (double)n * hw, m = GRAPH_BN_MOMENTUM;
    for (int ch = 0; ch < c; ch++) {
        double sum = 0, sq = 0;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < hw; j++)
                sum += x[((size_t)i * c + ch) * hw + j];
        double mu = sum / count;
        for (int i = 0; i < n; i++)
            for (int j = 0; j < hw; j++) {
                double dev = x[((size_t)i * c + ch) * hw + j] - mu;
                sq += dev * dev;
            }
        mean[ch] = (float)((1 - m) * mean[ch] + m * mu);
        var[ch] = (float)((1 - m) * var[ch] + m * sq / (count - 1));
    }
}

static top_status forward_batchnorm(graph *g, const graph_node *nd, int n, top_error *err)
{
    /* x: (N, C, HW)  gamma, beta, mean, var: (C)  y: (N, C, HW) */
    node_run *run = nd->run;
    const float *x = input_y(g, nd, 0);
    int c = (int)nd->dims[0], hw = spatial_of(nd);
    const float *gamma = param_data(g, nd, PARAM_GAMMA), *beta = param_data(g, nd, PARAM_BETA);
    if (g->mode == GRAPH_MODE_INFERENCE) {
        batchnorm_forward_inference(run->y, x, gamma, beta, param_data(g, nd, PARAM_MEAN),
                                    param_data(g, nd, PARAM_VAR), nd->attrs.eps, n, c, hw);
        return TOP_OK;
    }
    if ((size_t)n * (size_t)hw < 2)
        return top_error_set(err, TOP_ERR_INVALID,
                             "node '%s' (batchnorm): training mode "
                             "needs more than one value per channel, but the batch has %d "
                             "sample(s) of %d value(s); use a larger batch",
                             nd->name, n, hw);
    batchnorm_forward_train(run->y, run->saved[0], run->saved[1], x, gamma, beta, nd->attrs.eps,
                            n, c, hw);
    batchnorm_update_running(g, nd, x, n, c, hw);
    return TOP_OK;
}

static void forward_elementwise(graph *g, const graph_node *nd, int n)
{
    float *y = ((node_run *)nd->run)->y;
    const float *x = input_y(g, nd, 0);
    size_t count = (size_t)n * nd->sample_numel;
    switch (nd->op) {
    case OP_RELU: relu_forward(y, x, count); break;
    case OP_RELU6: relu6_forward(y, x, count); break;
    case OP_GELU: gelu_forward(y, x, count); break;
    case OP_SIGMOID: sigmoid_forward(y, x, count); break;
    case OP_SOFTMAX: softmax_forward(y, x, rows_of(nd, n), (int)last_dim(nd)); break;
    default: break;
    }
}

static void forward_add_concat(graph *g, const graph_node *nd, int n)
{
    const float *xs[GRAPH_MAX_INPUTS];
    int channels[GRAPH_MAX_INPUTS];
    for (int k = 0; k < nd->n_inputs; k++) {
        xs[k] = input_y(g, nd, k);
        channels[k] = (int)input_node(g, nd, k)->dims[0];
    }
    float *y = ((node_run *)nd->run)->y;
    if (nd->op == OP_ADD)
        add_forward(y, xs, nd->n_inputs, (size_t)n * nd->sample_numel);
    else
        concat_forward(y, xs, channels, nd->n_inputs, n, spatial_of(nd));
}

static top_status forward_pool(graph *g, const graph_node *nd, int n, top_error *err)
{
    /* x: (N, C, H, W)  y: (N, C, P, Q) */
    float *y = ((node_run *)nd->run)->y;
    const float *x = input_y(g, nd, 0);
    const graph_node *in = input_node(g, nd, 0);
    if (nd->op == OP_GLOBAL_AVGPOOL) {
        global_avgpool_forward(y, x, n, (int)in->dims[0], spatial_of(in));
        return TOP_OK;
    }
    pool2d_shape s;
    top_status st = pool_geometry(&s, g, nd, n, err);
    if (st != TOP_OK)
        return st;
    if (nd->op == OP_MAXPOOL)
        maxpool2d_forward(y, x, &s);
    else
        avgpool2d_forward(y, x, &s);
    return TOP_OK;
}

static void forward_dense(graph *g, const graph_node *nd, int n)
{
    /* x: (ROWS, IN)  w: (OUT, IN)  b: (OUT) or NULL  y: (ROWS, OUT) */
    const graph_node *in = input_node(g, nd, 0);
    dense_forward(((node_run *)nd->run)->y, input_y(g, nd, 0), param_data(g, nd, PARAM_WEIGHT),
                  param_data(g, nd, PARAM_BIAS), rows_of(nd, n), (int)last_dim(in),
                  (int)last_dim(nd));
}

/* Flatten, zero padding and dropout: layout and masking ops. */
static void forward_reshape(graph *g, int i, const graph_node *nd, int n)
{
    node_run *run = nd->run;
    const float *x = input_y(g, nd, 0);
    const graph_node *in = input_node(g, nd, 0);
    size_t count = (size_t)n * nd->sample_numel;
    const node_attrs *a = &nd->attrs;
    if (nd->op == OP_FLATTEN && a->flatten_nhwc && in->ndim == 3) {
        nchw_to_nhwc(run->y, x, n, (int)in->dims[0], (int)in->dims[1], (int)in->dims[2]);
    } else if (nd->op == OP_ZEROPAD) {
        zeropad2d_forward(run->y, x, n, (int)in->dims[0], (int)in->dims[1], (int)in->dims[2],
                          a->pad_top, a->pad_bottom, a->pad_left, a->pad_right);
    } else if (nd->op == OP_DROPOUT && g->mode == GRAPH_MODE_TRAIN && a->dropout_rate > 0) {
        uint64_t seed = mix_seed(g->dropout_seed ^ mix_seed((uint64_t)i));
        dropout_mask(run->saved[0], count, a->dropout_rate, seed);
        dropout_forward(run->y, x, run->saved[0], count);
    } else {
        memcpy(run->y, x, count * sizeof(float));
    }
}

static void forward_transformer(graph *g, const graph_node *nd, int n)
{
    node_run *run = nd->run;
    const float *x = input_y(g, nd, 0);
    const graph_node *in = input_node(g, nd, 0);
    if (nd->op == OP_LAYERNORM) {
        /* x: (ROWS, D)  gamma, beta: (D) */
        layernorm_forward(run->y, run->saved[0], run->saved[1], x,
                          param_data(g, nd, PARAM_GAMMA), param_data(g, nd, PARAM_BETA),
                          nd->attrs.eps, rows_of(nd, n), (int)last_dim(nd));
    } else if (nd->op == OP_MHSA) {
        /* x: (N, T, D)  y: (N, T, D) */
        mhsa_forward(run->y, run->saved[0], run->saved[1], run->saved[2], x,
                     param_data(g, nd, PARAM_QKV_WEIGHT), param_data(g, nd, PARAM_QKV_BIAS),
                     param_data(g, nd, PARAM_OUT_WEIGHT), param_data(g, nd, PARAM_OUT_BIAS), n,
                     (int)nd->dims[0], (int)nd->dims[1], nd->attrs.heads, g->workspace);
    } else {
        /* x: (N, T, D)  y: (N, D) */
        token_select_forward(run->y, x, n, (int)in->dims[0], (int)in->dims[1],
                             nd->attrs.token_index);
    }
}

static top_status forward_patch_embed(graph *g, const graph_node *nd, int n, top_error *err)
{
    /* x: (N, C, H, W)  patches: (N, D, P*Q)  y: (N, 1 + P*Q, D) */
    node_run *run = nd->run;
    conv2d_shape s;
    top_status st = conv_geometry(&s, g, nd, n, err);
    if (st != TOP_OK)
        return st;
    conv2d_forward(run->saved[0], input_y(g, nd, 0), param_data(g, nd, PARAM_WEIGHT),
                   param_data(g, nd, PARAM_BIAS), &s, g->workspace);
    patch_tokens_forward(run->y, run->saved[0], param_data(g, nd, PARAM_CLASS_TOKEN),
                         param_data(g, nd, PARAM_POSITION), n, s.k, s.p * s.q);
    return TOP_OK;
}

static top_status forward_node(graph *g, int i, int n, top_error *err)
{
    const graph_node *nd = &g->nodes[i];
    switch (nd->op) {
    case OP_INPUT: return TOP_OK;
    case OP_CONV2D: return forward_conv(g, nd, n, err);
    case OP_BATCHNORM: return forward_batchnorm(g, nd, n, err);
    case OP_RELU:
    case OP_RELU6:
    case OP_GELU:
    case OP_SIGMOID:
    case OP_SOFTMAX: forward_elementwise(g, nd, n); return TOP_OK;
    case OP_ADD:
    case OP_CONCAT: forward_add_concat(g, nd, n); return TOP_OK;
    case OP_MAXPOOL:
    case OP_AVGPOOL:
    case OP_GLOBAL_AVGPOOL: return forward_pool(g, nd, n, err);
    case OP_DENSE: forward_dense(g, nd, n); return TOP_OK;
    case OP_FLATTEN:
    case OP_ZEROPAD:
    case OP_DROPOUT: forward_reshape(g, i, nd, n); return TOP_OK;
    case OP_LAYERNORM:
    case OP_MHSA:
    case OP_TOKEN_SELECT: forward_transformer(g, nd, n); return TOP_OK;
    case OP_PATCH_EMBED: return forward_patch_embed(g, nd, n, err);
    case OP_COUNT: break;
    }
    return top_error_set(err, TOP_ERR_INVALID, "node '%s': op %d is not an op_kind", nd->name,
                         (int)nd->op);
}

top_status graph_forward(graph *g, const float *x, int n, graph_mode mode, top_error *err)
{
    return graph_forward_to(g, x, n, mode, g ? g->n_nodes - 1 : 0, err);
}

top_status graph_forward_to(graph *g, const float *x, int n, graph_mode mode, int last,
                            top_error *err)
{
    if (!g || !x)
        return top_error_set(err, TOP_ERR_INVALID,
                             "graph_forward: the graph or the input "
                             "batch is NULL");
    if (!g->finalized)
        return top_error_set(err, TOP_ERR_STATE, "graph_forward: call graph_finalize first");
    if (n < 1)
        return top_error_set(err, TOP_ERR_INVALID,
                             "graph_forward: batch size %d is not "
                             "positive",
                             n);
    if (mode != GRAPH_MODE_INFERENCE && mode != GRAPH_MODE_TRAIN)
        return top_error_set(err, TOP_ERR_INVALID,
                             "graph_forward: mode %d is not a "
                             "graph_mode",
                             (int)mode);
    if (last < 0 || last >= g->n_nodes)
        return top_error_set(err, TOP_ERR_INVALID,
                             "graph_forward_to: last node %d is outside 0..%d", last,
                             g->n_nodes - 1);
    top_status st = graph_prepare(g, n, err);
    if (st != TOP_OK)
        return st;

    g->mode = mode;
    memcpy(run_of(g, 0)->y, x, (size_t)n * g->nodes[0].sample_numel * sizeof(float));
    for (int i = 1; i <= last; i++) {
        st = forward_node(g, i, n, err);
        if (st != TOP_OK) {
            graph_release_buffers(g);
            return st;
        }
    }
    if (mode == GRAPH_MODE_TRAIN)
        g->dropout_seed = mix_seed(g->dropout_seed);
    return TOP_OK;
}

const float *graph_node_output(const graph *g, int node)
{
    if (!g || node < 0 || node >= g->n_nodes || g->batch == 0 || !g->nodes[node].run)
        return NULL;
    return run_of(g, node)->y;
}

/* ---- backward ------------------------------------------------------------------- */

/* The gradient buffer of input k of nd, or NULL when no gradient flows there. */
static float *input_dy(const graph *g, const graph_node *nd, int k)
{
    const node_run *run = run_of(g, nd->inputs[k]);
    return run->needs_grad ? run->dy : NULL;
}

static top_status backward_conv(graph *g, const graph_node *nd, int n, top_error *err)
{
    /* dy: (N, K, P, Q)  dx: (N, C, H, W)  dw: (K, C/G, R, S)  db: (K) */
    conv2d_shape s;
    top_status st = conv_geometry(&s, g, nd, n, err);
    if (st != TOP_OK)
        return st;
    conv2d_backward(input_dy(g, nd, 0), param_grad(g, nd, PARAM_WEIGHT),
                    param_grad(g, nd, PARAM_BIAS), ((node_run *)nd->run)->dy, input_y(g, nd, 0),
                    param_data(g, nd, PARAM_WEIGHT), &s, g->workspace);
    return TOP_OK;
}

static void backward_batchnorm(graph *g, const graph_node *nd, int n)
{
    /* dy, dx: (N, C, HW)  dgamma, dbeta: (C) */
    node_run *run = nd->run;
    int c = (int)nd->dims[0], hw = spatial_of(nd);
    float *dx = input_dy(g, nd, 0);
    float *dgamma = param_grad(g, nd, PARAM_GAMMA), *dbeta = param_grad(g, nd, PARAM_BETA);
    const float *x = input_y(g, nd, 0), *gamma = param_data(g, nd, PARAM_GAMMA);
    if (g->mode == GRAPH_MODE_TRAIN)
        batchnorm_backward_train(dx, dgamma, dbeta, run->dy, x, gamma, run->saved[0],
                                 run->saved[1], n, c, hw);
    else
        batchnorm_backward_inference(dx, dgamma, dbeta, run->dy, x, gamma,
                                     param_data(g, nd, PARAM_MEAN),
                                     param_data(g, nd, PARAM_VAR), nd->attrs.eps, n, c, hw);
}

static void backward_elementwise(graph *g, const graph_node *nd, int n)
{
    node_run *run = nd->run;
    float *dx = input_dy(g, nd, 0);
    const float *x = input_y(g, nd, 0);
    size_t count = (size_t)n * nd->sample_numel;
    if (!dx)
        return;
    switch (nd->op) {
    case OP_RELU: relu_backward(dx, run->dy, x, count); break;
    case OP_RELU6: relu6_backward(dx, run->dy, x, count); break;
    case OP_GELU: gelu_backward(dx, run->dy, x, count); break;
    case OP_SIGMOID: sigmoid_backward(dx, run->dy, run->y, count); break;
    case OP_SOFTMAX:
        softmax_backward(dx, run->dy, run->y, rows_of(nd, n), (int)last_dim(nd));
        break;
    default: break;
    }
}

static void backward_add_concat(graph *g, const graph_node *nd, int n)
{
    const float *dy = ((node_run *)nd->run)->dy;
    float *dxs[GRAPH_MAX_INPUTS];
    int channels[GRAPH_MAX_INPUTS];
    for (int k = 0; k < nd->n_inputs; k++) {
        dxs[k] = input_dy(g, nd, k);
        channels[k] = (int)input_node(g, nd, k)->dims[0];
    }
    if (nd->op == OP_CONCAT) {
        concat_backward(dxs, dy, channels, nd->n_inputs, n, spatial_of(nd));
        return;
    }
    for (int k = 0; k < nd->n_inputs; k++)
        if (dxs[k])
            add_into(dxs[k], dy, (size_t)n * nd->sample_numel);
}

static top_status backward_pool(graph *g, const graph_node *nd, int n, top_error *err)
{
    /* dy: (N, C, P, Q)  dx: (N, C, H, W) */
    const float *dy = ((node_run *)nd->run)->dy;
    float *dx = input_dy(g, nd, 0);
    const graph_node *in = input_node(g, nd, 0);
    if (!dx)
        return TOP_OK;
    if (nd->op == OP_GLOBAL_AVGPOOL) {
        global_avgpool_backward(dx, dy, n, (int)in->dims[0], spatial_of(in));
        return TOP_OK;
    }
    pool2d_shape s;
    top_status st = pool_geometry(&s, g, nd, n, err);
    if (st != TOP_OK)
        return st;
    if (nd->op == OP_MAXPOOL)
        maxpool2d_backward(dx, dy, input_y(g, nd, 0), &s);
    else
        avgpool2d_backward(dx, dy, &s);
    return TOP_OK;
}

static void backward_dense(graph *g, const graph_node *nd, int n)
{
    /* dy: (ROWS, OUT)  dx: (ROWS, IN)  dw: (OUT, IN)  db: (OUT) */
    const graph_node *in = input_node(g, nd, 0);
    dense_backward(input_dy(g, nd, 0), param_grad(g, nd, PARAM_WEIGHT),
                   param_grad(g, nd, PARAM_BIAS), ((node_run *)nd->run)->dy, input_y(g, nd, 0),
                   param_data(g, nd, PARAM_WEIGHT), rows_of(nd, n), (int)last_dim(in),
                   (int)last_dim(nd));
}

static void backward_reshape(graph *g, const graph_node *nd, int n)
{
    node_run *run = nd->run;
    float *dx = input_dy(g, nd, 0);
    const graph_node *in = input_node(g, nd, 0);
    size_t count = (size_t)n * nd->sample_numel;
    const node_attrs *a = &nd->attrs;
    if (!dx)
        return;
    if (nd->op == OP_FLATTEN && a->flatten_nhwc && in->ndim == 3) {
        nhwc_to_nchw(g->workspace, run->dy, n, (int)in->dims[0], (int)in->dims[1],
                     (int)in->dims[2]);
        add_into(dx, g->workspace, count);
    } else if (nd->op == OP_ZEROPAD) {
        zeropad2d_backward(dx, run->dy, n, (int)in->dims[0], (int)in->dims[1], (int)in->dims[2],
                           a->pad_top, a->pad_bottom, a->pad_left, a->pad_right);
    } else if (nd->op == OP_DROPOUT && g->mode == GRAPH_MODE_TRAIN && a->dropout_rate > 0) {
        dropout_backward(dx, run->dy, run->saved[0], count);
    } else {
        add_into(dx, run->dy, count);
    }
}

static void backward_transformer(graph *g, const graph_node *nd, int n)
{
    node_run *run = nd->run;
    float *dx = input_dy(g, nd, 0);
    const float *x = input_y(g, nd, 0);
    const graph_node *in = input_node(g, nd, 0);
    if (nd->op == OP_LAYERNORM) {
        layernorm_backward(dx, param_grad(g, nd, PARAM_GAMMA), param_grad(g, nd, PARAM_BETA),
                           run->dy, x, run->saved[0], run->saved[1],
                           param_data(g, nd, PARAM_GAMMA), rows_of(nd, n), (int)last_dim(nd));
    } else if (nd->op == OP_MHSA) {
        mhsa_backward(dx, param_grad(g, nd, PARAM_QKV_WEIGHT),
                      param_grad(g, nd, PARAM_QKV_BIAS), param_grad(g, nd, PARAM_OUT_WEIGHT),
                      param_grad(g, nd, PARAM_OUT_BIAS), run->dy, x, run->saved[0],
                      run->saved[1], run->saved[2], param_data(g, nd, PARAM_QKV_WEIGHT),
                      param_data(g, nd, PARAM_OUT_WEIGHT), n, (int)nd->dims[0],
                      (int)nd->dims[1], nd->attrs.heads, g->workspace);
    } else if (dx) {
        token_select_backward(dx, run->dy, n, (int)in->dims[0], (int)in->dims[1],
                              nd->attrs.token_index);
    }
}

static top_status backward_patch_embed(graph *g, const graph_node *nd, int n, top_error *err)
{
    /* dy: (N, 1 + P*Q, D) -> dpatches: (N, D, P*Q) in the workspace -> dx: (N, C, H, W) */
    node_run *run = nd->run;
    conv2d_shape s;
    top_status st = conv_geometry(&s, g, nd, n, err);
    if (st != TOP_OK)
        return st;
    size_t patch_floats = (size_t)n * (size_t)s.k * (size_t)s.p * (size_t)s.q;
    float *dpatches = g->workspace;
    memset(dpatches, 0, patch_floats * sizeof(float));
    patch_tokens_backward(dpatches, param_grad(g, nd, PARAM_CLASS_TOKEN),
                          param_grad(g, nd, PARAM_POSITION), run->dy, n, s.k, s.p * s.q);
    conv2d_backward(input_dy(g, nd, 0), param_grad(g, nd, PARAM_WEIGHT),
                    param_grad(g, nd, PARAM_BIAS), dpatches, input_y(g, nd, 0),
                    param_data(g, nd, PARAM_WEIGHT), &s,
                    g->workspace + round_up_floats(patch_floats));
    return TOP_OK;
}

static top_status backward_node(graph *g, int i, int n, top_error *err)
{
    const graph_node *nd = &g->nodes[i];
    switch (nd->op) {
    case OP_INPUT: return TOP_OK;
    case OP_CONV2D: return backward_conv(g, nd, n, err);
    case OP_BATCHNORM: backward_batchnorm(g, nd, n); return TOP_OK;
    case OP_RELU:
    case OP_RELU6:
    case OP_GELU:
    case OP_SIGMOID:
    case OP_SOFTMAX: backward_elementwise(g, nd, n); return TOP_OK;
    case OP_ADD:
    case OP_CONCAT: backward_add_concat(g, nd, n); return TOP_OK;
    case OP_MAXPOOL:
    case OP_AVGPOOL:
    case OP_GLOBAL_AVGPOOL: return backward_pool(g, nd, n, err);
    case OP_DENSE: backward_dense(g, nd, n); return TOP_OK;
    case OP_FLATTEN:
    case OP_ZEROPAD:
    case OP_DROPOUT: backward_reshape(g, nd, n); return TOP_OK;
    case OP_LAYERNORM:
    case OP_MHSA:
    case OP_TOKEN_SELECT: backward_transformer(g, nd, n); return TOP_OK;
    case OP_PATCH_EMBED: return backward_patch_embed(g, nd, n, err);
    case OP_COUNT: break;
    }
    return top_error_set(err, TOP_ERR_INVALID, "node '%s': op %d is not an op_kind", nd->name,
                         (int)nd->op);
}

/* 1 if node i has a trainable parameter. */
static int node_has_trainable(const graph *g, int i)
{
    for (int slot = 0; slot < GRAPH_MAX_PARAMS; slot++) {
        int p = g->nodes[i].params[slot];
        if (p >= 0 && param_is_trainable(g, p))
            return 1;
    }
    return 0;
}

/*
 * Marks the nodes whose output gradient the backward from `from` needs: the
 * nodes that lead to `from` (its ancestors and itself) and that have a
 * trainable parameter at or above them. Gradients of nodes fed by the input
 * alone, such as a zero padding in front of the first convolution, would
 * only flow back to the input batch, so they are needed only with want_dx.
 */
static void mark_needs_grad(graph *g, int from, int want_dx)
{
    for (int i = 0; i < g->n_nodes; i++)
        run_of(g, i)->needs_grad = i == from;
    for (int i = from; i > 0; i--) {
        if (!run_of(g, i)->needs_grad)
            continue;
        for (int k = 0; k < g->nodes[i].n_inputs; k++)
            run_of(g, g->nodes[i].inputs[k])->needs_grad = 1;
    }
    if (want_dx)
        return;
    /* Inputs come first, so one pass in index order settles upstream. */
    for (int i = 0; i <= from; i++) {
        node_run *run = run_of(g, i);
        run->upstream = node_has_trainable(g, i);
        for (int k = 0; k < g->nodes[i].n_inputs; k++)
            run->upstream |= run_of(g, g->nodes[i].inputs[k])->upstream;
        run->needs_grad &= run->upstream;
    }
}

/*
 * Allocates (once per batch size) and zeroes the gradient buffers of the
 * marked nodes, and allocates zeroed gradients of their trainable parameters
 * on first use.
 */
static top_status prepare_grads(graph *g, int n, top_error *err)
{
    for (int i = 0; i < g->n_nodes; i++) {
        graph_node *nd = &g->nodes[i];
        node_run *run = nd->run;
        if (!run->needs_grad)
            continue;
        size_t floats = (size_t)n * nd->sample_numel;
        if (!run->dy) {
            top_status st = buffer_alloc(&run->dy, floats, nd, "gradient", err);
            if (st != TOP_OK)
                return st;
        }
        memset(run->dy, 0, floats * sizeof(float));
        for (int slot = 0; slot < GRAPH_MAX_PARAMS; slot++) {
            int p = nd->params[slot];
            if (p < 0 || !param_is_trainable(g, p) || g->params[p].grad)
                continue;
            size_t bytes = g->params[p].value.numel * sizeof(float);
            g->params[p].grad = top_aligned_alloc(bytes);
            if (!g->params[p].grad)
                return top_error_set(err, TOP_ERR_NOMEM,
                                     "node '%s': allocating the gradient "
                                     "of parameter '%s' (%zu bytes) failed",
                                     nd->name, g->params[p].name, bytes);
            memset(g->params[p].grad, 0, bytes);
        }
    }
    return TOP_OK;
}

top_status graph_backward(graph *g, int from, const float *dy, float *dx, top_error *err)
{
    if (!g || !dy)
        return top_error_set(err, TOP_ERR_INVALID, "graph_backward: the graph or dy is NULL");
    if (g->batch == 0)
        return top_error_set(err, TOP_ERR_STATE,
                             "graph_backward: no forward pass to "
                             "back-propagate through; call graph_forward first");
    if (from < 0 || from >= g->n_nodes)
        return top_error_set(err, TOP_ERR_INVALID,
                             "graph_backward: node %d does not exist "
                             "(the graph has %d nodes)",
                             from, g->n_nodes);
    int n = g->batch;
    size_t floats = (size_t)n * g->nodes[from].sample_numel;
    mark_needs_grad(g, from, dx != NULL);
    top_status st = prepare_grads(g, n, err);
    if (st != TOP_OK)
        return st;

    if (run_of(g, from)->needs_grad)
        memcpy(run_of(g, from)->dy, dy, floats * sizeof(float));
    for (int i = from; i > 0; i--) {
        if (!run_of(g, i)->needs_grad)
            continue;
        st = backward_node(g, i, n, err);
        if (st != TOP_OK)
            return st;
    }
    size_t dx_bytes = (size_t)n * g->nodes[0].sample_numel * sizeof(float);
    if (dx && run_of(g, 0)->needs_grad)
        memcpy(dx, run_of(g, 0)->dy, dx_bytes);
    else if (dx) /* `from` does not depend on the input */
        memset(dx, 0, dx_bytes);
    return TOP_OK;
}

void graph_zero_grad(graph *g)
{
    if (!g)
        return;
    for (int p = 0; p < g->n_params; p++)
        if (g->params[p].grad)
            memset(g->params[p].grad, 0, g->params[p].value.numel * sizeof(float));
}

/* ---- statistics --------------------------------------------------------------- */

int graph_param_is_prunable(const graph *g, int i)
{
    if (!g || i < 0 || i >= g->n_params)
        return 0;
    const graph_param *gp = &g->params[i];
    switch (g->nodes[gp->node].op) {
    case OP_CONV2D:
    case OP_DENSE:
    case OP_PATCH_EMBED: return gp->slot == PARAM_WEIGHT;
    case OP_MHSA: return gp->slot == PARAM_QKV_WEIGHT || gp->slot == PARAM_OUT_WEIGHT;
    default: return 0;
    }
}

/* Returns the multiply-adds per image of a conv, dense or attention node, or 0. */
static double node_macs(const graph *g, const graph_node *nd)
{
    const conv2d_shape *s = &nd->attrs.conv;
    switch (nd->op) {
    case OP_CONV2D:
    case OP_PATCH_EMBED:
        return (double)s->k * s->p * s->q * (double)(s->c / s->groups) * s->r * s->s;
    case OP_DENSE: {
        const graph_node *in = input_node(g, nd, 0);
        return (double)(in->sample_numel / (size_t)last_dim(in)) * (double)last_dim(in) *
               (double)last_dim(nd);
    }
    case OP_MHSA: {
        /* Projections T x D x 3D and T x D x D, then Q K^T and att V, T x T x D each. */
        double t = (double)nd->dims[0], d = (double)nd->dims[1];
        return t * d * 3 * d + t * d * d + 2 * t * t * d;
    }
    default: return 0;
    }
}

void graph_get_stats(const graph *g, graph_stats *stats)
{
    if (!stats)
        return;
    memset(stats, 0, sizeof *stats);
    if (!g)
        return;
    for (int p = 0; p < g->n_params; p++) {
        if (!param_is_trainable(g, p))
            continue;
        stats->params += g->params[p].value.numel;
        if (graph_param_is_prunable(g, p))
            stats->prunable_params += g->params[p].value.numel;
    }
    if (!g->finalized)
        return;
    for (int i = 0; i < g->n_nodes; i++)
        stats->flops += 2 * node_macs(g, &g->nodes[i]);
}
