/*
 * PyTorch checkpoint importers: torchvision ResNet and Vision Transformers
 * (torchvision or timm/DINO tensor names) from safetensors into the model
 * graph; see import_torch.h.
 *
 * ResNet: conv1 7x7/2 -> bn1 -> relu -> maxpool 3x3/2 -> four stages of
 * BasicBlock (3x3, 3x3) or Bottleneck (1x1, 3x3, 1x1 with the stride on the
 * 3x3, torchvision's v1.5) -> global average pool -> fc. A block has a
 * projection shortcut (downsample: 1x1 conv + batch norm) exactly where
 * torchvision builds one: stride 2 or a change of the channel count.
 * ViT: patch embedding (PxP/P conv, class token, position embedding), then per
 * block x += MHSA(LN1(x)) and x += fc2(GELU(fc1(LN2(x)))), then a final LN,
 * the class token and the head dense layer (absent in DINO backbones).
 *
 * Layout: weights keep their PyTorch layout and names (PARAM_LAYOUT_SAME). The
 * class token (1, 1, D) and the position embedding (1, T, D) become (D) and
 * (T, D) in the graph and keep their file shape as src_shape. F32, F16, BF16
 * and F64 tensors are converted to float32.
 * Thread-safety: all state lives in one import context on the stack.
 * Not supported: grouped 3x3 convolutions (ResNeXt) and ViT variants with
 * extra tensors (layer scale, register tokens, pre-logits, pooled heads). Such
 * checkpoints fail to import with the name of the first tensor that differs.
 */
#include "import_torch.h"

#include <limits.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

/* Shape legend: D hidden size, T = 1 + HW tokens, P patch side, M MLP size,
 * K classes, W stage width. */

#define ANY_DIM (-1)
#define RESNET_BN_EPS 1e-5f
#define VIT_LN_EPS 1e-6f
#define VIT_MAX_IMAGE_SIDE 8192 /* keeps T = 1 + (side / P)^2 within int */

/* A tensor shape of rank <= 4 as a value, written SHAPE(64, 3, 7, 7). */
typedef struct shape4 {
    int ndim;
    int64_t d[4];
} shape4;

#define SHAPE(...)                                                                             \
    ((shape4){.ndim = (int)(sizeof((int64_t[]){__VA_ARGS__}) / sizeof(int64_t)),               \
              .d = {__VA_ARGS__}})

typedef struct torch_ctx {
    const st_file *f;
    graph *g;
    unsigned char *used; /* one flag per tensor, in file order */
    size_t n_tensors;
    char architecture[64]; /* for messages, set once detected */
} torch_ctx;

/* ---- tensors ------------------------------------------------------------------ */

static char *format_expected(char *buf, size_t size, const shape4 *s)
{
    char dim[32];
    snprintf(buf, size, "(");
    for (int i = 0; i < s->ndim; i++) {
        if (s->d[i] == ANY_DIM)
            snprintf(dim, sizeof dim, "%s*", i ? ", " : "");
        else
            snprintf(dim, sizeof dim, "%s%lld", i ? ", " : "", (long long)s->d[i]);
        strncat(buf, dim, size - strlen(buf) - 1);
    }
    strncat(buf, ")", size - strlen(buf) - 1);
    return buf;
}

static size_t tensor_index(const torch_ctx *c, const st_tensor_info *t)
{
    for (size_t i = 0; i < c->n_tensors; i++) {
        const st_tensor_info *u = st_tensor_at(c->f, i);
        if (u == t || strcmp(u->name, t->name) == 0)
            return i;
    }
    return c->n_tensors;
}

static int shape_matches(const st_tensor_info *t, const shape4 *expect)
{
    if (t->ndim != expect->ndim)
        return 0;
    for (int i = 0; i < expect->ndim; i++)
        if (expect->d[i] != ANY_DIM && expect->d[i] != t->shape[i])
            return 0;
    return 1;
}

/* Looks up a tensor that must exist, without using it (for reading sizes). */
static top_status peek_tensor(const torch_ctx *c, const char *name, int ndim,
                              const st_tensor_info **out, top_error *err)
{
    const st_tensor_info *t = st_find(c->f, name);
    char got[160];
    if (!t)
        return top_error_set(err, TOP_ERR_NOT_FOUND,
                             "missing tensor '%s' in the %s checkpoint; the file is "
                             "incomplete or from another architecture",
                             name, c->architecture);
    if (t->ndim != ndim)
        return top_error_set(
            err, TOP_ERR_SHAPE, "tensor '%s' has shape %s, expected rank %d in a %s checkpoint",
            name, tensor_shape_str(got, sizeof got, t->ndim, t->shape), ndim, c->architecture);
    *out = t;
    return TOP_OK;
}

/* Finds tensor `name`, checks its shape against expect (ANY_DIM matches any
 * size) and marks it used. */
static top_status take_tensor(torch_ctx *c, const char *name, shape4 expect,
                              const st_tensor_info **out, top_error *err)
{
    const st_tensor_info *t = st_find(c->f, name);
    char want[160], got[160];
    format_expected(want, sizeof want, &expect);
    if (!t)
        return top_error_set(err, TOP_ERR_NOT_FOUND,
                             "missing tensor '%s' (expected shape %s) in the %s checkpoint; "
                             "the file is incomplete or from another architecture",
                             name, want, c->architecture);
    if (!shape_matches(t, &expect))
        return top_error_set(
            err, TOP_ERR_SHAPE, "tensor '%s' has shape %s, expected %s in a %s checkpoint",
            name, tensor_shape_str(got, sizeof got, t->ndim, t->shape), want, c->architecture);
    size_t i = tensor_index(c, t);
    if (i == c->n_tensors || c->used[i])
        return top_error_set(err, TOP_ERR_STATE,
                             "tensor '%s' is read twice or not listed in the file; this is "
                             "an importer bug",
                             name);
    c->used[i] = 1;
    *out = t;
    return TOP_OK;
}

static int dtype_is_float(st_dtype d)
{
    return d == ST_DTYPE_F32 || d == ST_DTYPE_F16 || d == ST_DTYPE_BF16 || d == ST_DTYPE_F64;
}

/*
 * Takes tensor `name` with file shape `expect` and attaches it as float32 to
 * slot `slot` of node `node`. `engine` reshapes it for the graph (same element
 * count, same order); NULL keeps the file shape.
 */
static top_status attach_param(torch_ctx *c, int node, int slot, const char *name,
                               param_role role, shape4 expect, const shape4 *engine,
                               top_error *err)
{
    const st_tensor_info *info;
    top_status st = take_tensor(c, name, expect, &info, err);
    if (st != TOP_OK)
        return st;
    if (!dtype_is_float(info->dtype))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor '%s' has dtype %s; weights must be F32, F16, BF16 or "
                             "F64",
                             name, st_dtype_str(info->dtype));

    tensor value = {0};
    st = st_read_f32(c->f, info, &value, err);
    if (st != TOP_OK)
        return st;
    for (size_t i = 0; i < value.numel; i++)
        if (!isfinite(value.data[i])) {
            st = top_error_set(err, TOP_ERR_FORMAT,
                               "tensor '%s': element %zu is not finite (%g); the checkpoint "
                               "is corrupt",
                               name, i, (double)value.data[i]);
            tensor_free(&value);
            return st;
        }
    const int64_t *src_shape = NULL;
    int src_ndim = 0;
    if (engine) {
        size_t numel;
        st = tensor_shape_numel(&numel, engine->ndim, engine->d, name, err);
        if (st == TOP_OK && numel != value.numel)
            st = top_error_set(err, TOP_ERR_STATE,
                               "tensor '%s': reshape from %zu to %zu elements; this is an "
                               "importer bug",
                               name, value.numel, numel);
        if (st != TOP_OK) {
            tensor_free(&value);
            return st;
        }
        value.ndim = engine->ndim;
        for (int i = 0; i < engine->ndim; i++)
            value.shape[i] = engine->d[i];
        src_shape = info->shape;
        src_ndim = info->ndim;
    }
    st = graph_add_param(c->g, node, slot, name, role, &value, PARAM_LAYOUT_SAME, src_shape,
                         src_ndim, err);
    tensor_free(&value);
    return st;
}

int torch_tensor_is_unused(const char *name)
{
    static const char suffix[] = "num_batches_tracked";
    size_t n = strlen(name), k = sizeof suffix - 1;
    if (n < k || strcmp(name + n - k, suffix) != 0)
        return 0;
    return n == k || name[n - k - 1] == '.';
}

/* Consumes the optional `<bn>.num_batches_tracked` counter: one integer. */
static top_status take_batch_counter(torch_ctx *c, const char *bn, top_error *err)
{
    char name[GRAPH_NAME_MAX + 32];
    snprintf(name, sizeof name, "%s.num_batches_tracked", bn);
    const st_tensor_info *t = st_find(c->f, name);
    if (!t)
        return TOP_OK;
    char got[160];
    if (dtype_is_float(t->dtype) || t->dtype == ST_DTYPE_BOOL || t->numel != 1 || t->ndim > 1)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor '%s' has dtype %s and shape %s, expected one integer "
                             "(a batch counter)",
                             name, st_dtype_str(t->dtype),
                             tensor_shape_str(got, sizeof got, t->ndim, t->shape));
    const st_tensor_info *same;
    return take_tensor(c, name, (shape4){.ndim = t->ndim, .d = {1, 1, 1, 1}}, &same, err);
}

/* ---- nodes ---------------------------------------------------------------------- */

/* Writes prefix + "." + suffix (or just suffix for an empty prefix) into out. */
static top_status join_name(char out[GRAPH_NAME_MAX], const char *prefix, const char *suffix,
                            top_error *err)
{
    int n = prefix[0] ? snprintf(out, GRAPH_NAME_MAX, "%s.%s", prefix, suffix)
                      : snprintf(out, GRAPH_NAME_MAX, "%s", suffix);
    if (n < 0 || n >= GRAPH_NAME_MAX)
        return top_error_set(err, TOP_ERR_LIMIT, "name '%s.%s' is longer than %d characters",
                             prefix, suffix, GRAPH_NAME_MAX - 1);
    return TOP_OK;
}

static top_status add_node1(torch_ctx *c, op_kind op, const char *name, int x,
                            const node_attrs *attrs, int *y, top_error *err)
{
    node_attrs none;
    memset(&none, 0, sizeof none);
    return graph_add_node(c->g, op, name, &x, 1, attrs ? attrs : &none, y, err);
}

/* Adds the weight (and bias, when `with_bias`) of the conv or dense node `node`
 * named `name`: `<name>.weight` of shape w, `<name>.bias` of shape (w.d[0]). */
static top_status attach_weight_bias(torch_ctx *c, int node, const char *name, shape4 w,
                                     int with_bias, top_error *err)
{
    char pname[GRAPH_NAME_MAX];
    top_status st = join_name(pname, name, "weight", err);
    if (st == TOP_OK)
        st = attach_param(c, node, PARAM_WEIGHT, pname, PARAM_ROLE_WEIGHT, w, NULL, err);
    if (st != TOP_OK || !with_bias)
        return st;
    st = join_name(pname, name, "bias", err);
    if (st == TOP_OK)
        st =
            attach_param(c, node, PARAM_BIAS, pname, PARAM_ROLE_BIAS, SHAPE(w.d[0]), NULL, err);
    return st;
}

typedef struct conv_geom {
    int k, c, r, stride, pad; /* out channels, in channels, square kernel side */
} conv_geom;

/* Bias-free square conv (torchvision ResNet convs): weight (K, C, R, R). */
static top_status add_conv(torch_ctx *c, const char *name, int x, conv_geom geo, int *y,
                           top_error *err)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.conv.k = geo.k;
    a.conv.r = a.conv.s = geo.r;
    a.conv.stride_h = a.conv.stride_w = geo.stride;
    a.conv.dilation_h = a.conv.dilation_w = 1;
    a.conv.pad_top = a.conv.pad_bottom = a.conv.pad_left = a.conv.pad_right = geo.pad;
    a.conv.groups = 1;
    top_status st = add_node1(c, OP_CONV2D, name, x, &a, y, err);
    if (st != TOP_OK)
        return st;
    return attach_weight_bias(c, *y, name, SHAPE(geo.k, geo.c, geo.r, geo.r), 0, err);
}

/* Batch norm over `channels` with gamma, beta, running mean and variance (C). */
static top_status add_batchnorm(torch_ctx *c, const char *name, int x, int channels, int *y,
                                top_error *err)
{
    static const char *const suffix[4] = {"weight", "bias", "running_mean", "running_var"};
    static const int slot[4] = {PARAM_GAMMA, PARAM_BETA, PARAM_MEAN, PARAM_VAR};
    static const param_role role[4] = {PARAM_ROLE_NORM, PARAM_ROLE_NORM, PARAM_ROLE_STATISTIC,
                                       PARAM_ROLE_STATISTIC};
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.eps = RESNET_BN_EPS;
    top_status st = add_node1(c, OP_BATCHNORM, name, x, &a, y, err);
    for (int i = 0; i < 4 && st == TOP_OK; i++) {
        char pname[GRAPH_NAME_MAX];
        st = join_name(pname, name, suffix[i], err);
        if (st == TOP_OK)
            st = attach_param(c, *y, slot[i], pname, role[i], SHAPE(channels), NULL, err);
    }
    if (st == TOP_OK)
        st = take_batch_counter(c, name, err);
    return st;
}

/* Layer norm over the last dimension D with gamma and beta (D). */
static top_status add_layernorm(torch_ctx *c, const char *name, int x, int d, int *y,
                                top_error *err)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.eps = VIT_LN_EPS;
    char pname[GRAPH_NAME_MAX];
    top_status st = add_node1(c, OP_LAYERNORM, name, x, &a, y, err);
    if (st == TOP_OK)
        st = join_name(pname, name, "weight", err);
    if (st == TOP_OK)
        st = attach_param(c, *y, PARAM_GAMMA, pname, PARAM_ROLE_NORM, SHAPE(d), NULL, err);
    if (st == TOP_OK)
        st = join_name(pname, name, "bias", err);
    if (st == TOP_OK)
        st = attach_param(c, *y, PARAM_BETA, pname, PARAM_ROLE_NORM, SHAPE(d), NULL, err);
    return st;
}

/* Dense layer with weight (OUT, IN) and bias (OUT); out = ANY_DIM reads OUT
 * from the weight. */
static top_status add_dense(torch_ctx *c, const char *name, int x, int64_t out, int64_t in,
                            int *y, top_error *err)
{
    char pname[GRAPH_NAME_MAX];
    const st_tensor_info *w;
    top_status st = join_name(pname, name, "weight", err);
    if (st == TOP_OK && out == ANY_DIM) {
        st = peek_tensor(c, pname, 2, &w, err);
        if (st == TOP_OK)
            out = w->shape[0];
    }
    if (st == TOP_OK && (out < 1 || out > INT_MAX))
        st = top_error_set(err, TOP_ERR_SHAPE,
                           "tensor '%s' has %lld output features, "
                           "expected 1..%d",
                           pname, (long long)out, INT_MAX);
    if (st != TOP_OK)
        return st;

    node_attrs a;
    memset(&a, 0, sizeof a);
    a.dense_out = (int)out;
    st = add_node1(c, OP_DENSE, name, x, &a, y, err);
    if (st == TOP_OK)
        st = attach_weight_bias(c, *y, name, SHAPE(out, in), 1, err);
    return st;
}

/* ---- ResNet ------------------------------------------------------------------ */

typedef struct resnet_block_dims {
    int in, width, out, stride;
} resnet_block_dims;

/* conv -> bn (-> relu when relu_name is non-NULL), names `<prefix>.<conv>` etc. */
static top_status add_conv_bn(torch_ctx *c, const char *prefix, const char *conv,
                              const char *bn, const char *relu_name, int x, conv_geom geo,
                              int *y, top_error *err)
{
    char name[GRAPH_NAME_MAX];
    top_status st = join_name(name, prefix, conv, err);
    if (st == TOP_OK)
        st = add_conv(c, name, x, geo, y, err);
    if (st == TOP_OK)
        st = join_name(name, prefix, bn, err);
    if (st == TOP_OK)
        st = add_batchnorm(c, name, *y, geo.k, y, err);
    if (st == TOP_OK && relu_name) {
        st = join_name(name, prefix, relu_name, err);
        if (st == TOP_OK)
            st = add_node1(c, OP_RELU, name, *y, NULL, y, err);
    }
    return st;
}

/* One BasicBlock or Bottleneck `prefix` ("layer2.0") on input node x. */
static top_status resnet_block(torch_ctx *c, const char *prefix, int bottleneck,
                               resnet_block_dims d, int x, int *y, top_error *err)
{
    int h, shortcut = x;
    top_status st;
    if (bottleneck) {
        st = add_conv_bn(c, prefix, "conv1", "bn1", "relu1", x,
                         (conv_geom){d.width, d.in, 1, 1, 0}, &h, err);
        if (st == TOP_OK)
            st = add_conv_bn(c, prefix, "conv2", "bn2", "relu2", h,
                             (conv_geom){d.width, d.width, 3, d.stride, 1}, &h, err);
        if (st == TOP_OK)
            st = add_conv_bn(c, prefix, "conv3", "bn3", NULL, h,
                             (conv_geom){d.out, d.width, 1, 1, 0}, &h, err);
    } else {
        st = add_conv_bn(c, prefix, "conv1", "bn1", "relu1", x,
                         (conv_geom){d.width, d.in, 3, d.stride, 1}, &h, err);
        if (st == TOP_OK)
            st = add_conv_bn(c, prefix, "conv2", "bn2", NULL, h,
                             (conv_geom){d.out, d.width, 3, 1, 1}, &h, err);
    }
    /* torchvision adds the projection exactly when the identity cannot match. */
    if (st == TOP_OK && (d.stride != 1 || d.in != d.out))
        st = add_conv_bn(c, prefix, "downsample.0", "downsample.1", NULL, x,
                         (conv_geom){d.out, d.in, 1, d.stride, 0}, &shortcut, err);

    char name[GRAPH_NAME_MAX];
    int sum[2] = {h, shortcut};
    node_attrs none;
    memset(&none, 0, sizeof none);
    if (st == TOP_OK)
        st = join_name(name, prefix, "add", err);
    if (st == TOP_OK)
        st = graph_add_node(c->g, OP_ADD, name, sum, 2, &none, &h, err);
    if (st == TOP_OK)
        st = join_name(name, prefix, "relu3", err);
    if (st == TOP_OK)
        st = add_node1(c, OP_RELU, name, h, NULL, y, err);
    return st;
}

/* Reads dimension `axis` of tensor `name` (of rank `ndim`) as a positive int. */
static top_status read_dim(const torch_ctx *c, const char *name, int ndim, int axis, int *out,
                           top_error *err)
{
    const st_tensor_info *t = NULL;
    top_status st = peek_tensor(c, name, ndim, &t, err);
    if (st != TOP_OK)
        return st;
    if (t->shape[axis] < 1 || t->shape[axis] > INT_MAX / 64)
        return top_error_set(err, TOP_ERR_SHAPE,
                             "tensor '%s' has size %lld in dimension %d, expected 1..%d", name,
                             (long long)t->shape[axis], axis, INT_MAX / 64);
    *out = (int)t->shape[axis];
    return TOP_OK;
}

/* Counts the blocks of stage s (1..4) by their `layer<s>.<i>.conv1.weight`. */
static int resnet_count_blocks(const torch_ctx *c, int s)
{
    int n = 0;
    for (;; n++) {
        char name[64];
        snprintf(name, sizeof name, "layer%d.%d.conv1.weight", s, n);
        if (!st_find(c->f, name))
            return n;
    }
}

/* One stage: widths from its first block, stride 2 except in stage 1. */
static top_status resnet_stage(torch_ctx *c, int s, int blocks, int bottleneck, int *channels,
                               int *x, top_error *err)
{
    char prefix[64], name[96];
    resnet_block_dims d = {.in = *channels, .stride = s == 1 ? 1 : 2};
    snprintf(name, sizeof name, "layer%d.0.conv1.weight", s);
    top_status st = read_dim(c, name, 4, 0, &d.width, err);
    if (st == TOP_OK && bottleneck) {
        snprintf(name, sizeof name, "layer%d.0.conv3.weight", s);
        st = read_dim(c, name, 4, 0, &d.out, err);
    } else {
        d.out = d.width;
    }
    for (int b = 0; b < blocks && st == TOP_OK; b++) {
        snprintf(prefix, sizeof prefix, "layer%d.%d", s, b);
        st = resnet_block(c, prefix, bottleneck, d, *x, x, err);
        d.in = d.out;
        d.stride = 1;
    }
    *channels = d.out;
    return st;
}

static void resnet_preprocess(graph_preprocess *pp)
{
    static const float mean[3] = {0.485f, 0.456f, 0.406f};
    static const float std[3] = {0.229f, 0.224f, 0.225f};
    pp->channels = 3;
    pp->height = pp->width = 224;
    pp->align_corners = 0;
    pp->resize_short_side = 256;
    pp->scale = 1.0f / 255.0f;
    memcpy(pp->mean, mean, sizeof mean);
    memcpy(pp->std, std, sizeof std);
}

static top_status add_input(torch_ctx *c, top_error *err)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.conv.c = c->g->preprocess.channels;
    a.conv.h = c->g->preprocess.height;
    a.conv.w = c->g->preprocess.width;
    int index;
    return graph_add_node(c->g, OP_INPUT, "input", NULL, 0, &a, &index, err);
}

/* Builds a torchvision ResNet; block type and counts come from the names. */
static top_status resnet_build(torch_ctx *c, top_error *err)
{
    int blocks[4], total = 0;
    int bottleneck = st_find(c->f, "layer1.0.conv3.weight") != NULL;
    for (int s = 0; s < 4; s++) {
        blocks[s] = resnet_count_blocks(c, s + 1);
        if (blocks[s] == 0)
            return top_error_set(err, TOP_ERR_NOT_FOUND,
                                 "missing tensor 'layer%d.0.conv1.weight': a torchvision "
                                 "resnet has four stages layer1..layer4",
                                 s + 1);
        total += blocks[s];
    }
    int depth = (bottleneck ? 3 : 2) * total + 2;
    snprintf(c->architecture, sizeof c->architecture, "resnet%d", depth);
    snprintf(c->g->architecture, sizeof c->g->architecture, "%s", c->architecture);
    resnet_preprocess(&c->g->preprocess);

    int x, channels;
    top_status st = add_input(c, err);
    if (st == TOP_OK)
        st = read_dim(c, "conv1.weight", 4, 0, &channels, err);
    if (st == TOP_OK)
        st = add_conv_bn(c, "", "conv1", "bn1", "relu", 0, (conv_geom){channels, 3, 7, 2, 3},
                         &x, err);
    node_attrs pool;
    memset(&pool, 0, sizeof pool);
    pool.pool.r = pool.pool.s = 3;
    pool.pool.stride_h = pool.pool.stride_w = 2;
    pool.pool.pad_top = pool.pool.pad_bottom = pool.pool.pad_left = pool.pool.pad_right = 1;
    if (st == TOP_OK)
        st = add_node1(c, OP_MAXPOOL, "maxpool", x, &pool, &x, err);
    for (int s = 0; s < 4 && st == TOP_OK; s++)
        st = resnet_stage(c, s + 1, blocks[s], bottleneck, &channels, &x, err);
    if (st == TOP_OK)
        st = add_node1(c, OP_GLOBAL_AVGPOOL, "avgpool", x, NULL, &x, err);
    if (st == TOP_OK)
        st = add_dense(c, "fc", x, ANY_DIM, channels, &x, err);
    return st;
}

/* ---- Vision Transformer -------------------------------------------------------- */

/* Tensor names of one ViT naming scheme; block names are relative to the block. */
typedef struct vit_names {
    const char *scheme; /* for messages */
    const char *patch, *cls, *pos;
    const char *block; /* block i is named block + i */
    const char *ln1, *ln2, *attn;
    const char *qkv_w, *qkv_b, *out;
    const char *fc1, *fc1_alt, *act, *fc2, *fc2_alt;
    const char *norm, *head;
    int head_optional;
} vit_names;

static const vit_names vit_torchvision = {
    "torchvision",
    "conv_proj",
    "class_token",
    "encoder.pos_embedding",
    "encoder.layers.encoder_layer_",
    "ln_1",
    "ln_2",
    "self_attention",
    "in_proj_weight",
    "in_proj_bias",
    "out_proj",
    "mlp.0",
    "mlp.linear_1",
    "mlp.1",
    "mlp.3",
    "mlp.linear_2",
    "encoder.ln",
    "heads.head",
    0,
};

static const vit_names vit_timm = {
    "timm",
    "patch_embed.proj",
    "cls_token",
    "pos_embed",
    "blocks.",
    "norm1",
    "norm2",
    "attn",
    "qkv.weight",
    "qkv.bias",
    "proj",
    "mlp.fc1",
    NULL,
    "mlp.act",
    "mlp.fc2",
    NULL,
    "norm",
    "head",
    1,
};

typedef struct vit_dims {
    int d, patch, image, tokens, depth, heads;
} vit_dims;

/* The attention head count: safetensors metadata "num_heads", else D / 64. */
static top_status vit_heads(const torch_ctx *c, int d, int *heads, top_error *err)
{
    const char *meta = st_metadata_get(c->f, "num_heads");
    if (!meta) {
        if (d % 64 != 0)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "cannot infer the attention head count: hidden size %d is "
                                 "not a multiple of 64; set the safetensors metadata key "
                                 "num_heads",
                                 d);
        *heads = d / 64;
        return TOP_OK;
    }
    char *end;
    long h = strtol(meta, &end, 10);
    if (end == meta || *end != '\0' || h < 1 || h > d || d % h != 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "metadata num_heads '%s' is invalid: expected a positive "
                             "divisor of the hidden size %d",
                             meta, d);
    *heads = (int)h;
    return TOP_OK;
}

/* Reads D, P, image side, depth and M from the shapes. */
static top_status vit_detect(const torch_ctx *c, const vit_names *nm, vit_dims *v,
                             top_error *err)
{
    char name[2 * GRAPH_NAME_MAX], got[160];
    const st_tensor_info *t = NULL;
    snprintf(name, sizeof name, "%s.weight", nm->patch);
    top_status st = peek_tensor(c, name, 4, &t, err);
    if (st != TOP_OK)
        return st;
    if (t->shape[0] < 1 || t->shape[0] > 65536 || t->shape[1] != 3 || t->shape[2] < 1 ||
        t->shape[2] > 4096 || t->shape[2] != t->shape[3])
        return top_error_set(err, TOP_ERR_SHAPE,
                             "tensor '%s' has shape %s, expected (D, 3, P, P) with D <= "
                             "65536 and P <= 4096",
                             name, tensor_shape_str(got, sizeof got, t->ndim, t->shape));
    v->d = (int)t->shape[0];
    v->patch = (int)t->shape[2];

    st = peek_tensor(c, nm->pos, 3, &t, err);
    if (st != TOP_OK)
        return st;
    int64_t grid = 1;
    while (t->shape[1] > 1 && (grid + 1) * (grid + 1) <= t->shape[1] - 1)
        grid++;
    if (t->shape[0] != 1 || t->shape[1] < 2 || grid * grid != t->shape[1] - 1 ||
        grid * v->patch > VIT_MAX_IMAGE_SIDE || t->shape[2] != v->d)
        return top_error_set(err, TOP_ERR_SHAPE,
                             "tensor '%s' has shape %s, expected (1, 1 + G*G, %d) for a "
                             "square grid of G*G patches of side %d and an image side of "
                             "at most %d",
                             nm->pos, tensor_shape_str(got, sizeof got, t->ndim, t->shape),
                             v->d, v->patch, VIT_MAX_IMAGE_SIDE);
    v->tokens = (int)t->shape[1];
    v->image = (int)grid * v->patch;

    for (v->depth = 0;; v->depth++) {
        char prefix[GRAPH_NAME_MAX];
        snprintf(prefix, sizeof prefix, "%s%d", nm->block, v->depth);
        snprintf(name, sizeof name, "%s.%s.weight", prefix, nm->ln1);
        if (!st_find(c->f, name))
            break;
    }
    if (v->depth == 0) {
        return top_error_set(err, TOP_ERR_NOT_FOUND,
                             "missing tensor '%s0.%s.weight': a %s vit needs at least one "
                             "encoder block",
                             nm->block, nm->ln1, nm->scheme);
    }
    return vit_heads(c, v->d, &v->heads, err);
}

static void vit_architecture(char *buf, size_t size, const vit_dims *v)
{
    static const struct {
        int d, depth;
        const char *size;
    } known[] = {
        {192, 12, "ti"}, {384, 12, "s"}, {768, 12, "b"}, {1024, 24, "l"}, {1280, 32, "h"},
    };
    for (size_t i = 0; i < sizeof known / sizeof known[0]; i++) {
        if (known[i].d != v->d || known[i].depth != v->depth)
            continue;
        if (v->image == 224)
            snprintf(buf, size, "vit-%s%d", known[i].size, v->patch);
        else
            snprintf(buf, size, "vit-%s%d-%d", known[i].size, v->patch, v->image);
        return;
    }
    snprintf(buf, size, "vit-d%d-l%d-p%d-i%d", v->d, v->depth, v->patch, v->image);
}

/* torchvision's ImageNet evaluation transform, scaled to the image side:
 * resize the short side to side * 256 / 224, center-crop side x side. */
static void vit_preprocess(graph_preprocess *pp, int side)
{
    resnet_preprocess(pp);
    pp->height = pp->width = side;
    pp->resize_short_side = (int)(((int64_t)side * 256 + 112) / 224);
}

/* Patch embedding node: conv (D, 3, P, P) + bias, class token, position embedding. */
static top_status vit_patch_embed(torch_ctx *c, const vit_names *nm, const vit_dims *v, int *y,
                                  top_error *err)
{
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.conv.k = v->d;
    a.conv.r = a.conv.s = v->patch;
    a.conv.stride_h = a.conv.stride_w = v->patch;
    a.conv.dilation_h = a.conv.dilation_w = 1;
    a.conv.groups = 1;
    top_status st = add_node1(c, OP_PATCH_EMBED, nm->patch, 0, &a, y, err);
    if (st == TOP_OK)
        st = attach_weight_bias(c, *y, nm->patch, SHAPE(v->d, 3, v->patch, v->patch), 1, err);
    shape4 cls = SHAPE(v->d), pos = SHAPE(v->tokens, v->d);
    if (st == TOP_OK)
        st = attach_param(c, *y, PARAM_CLASS_TOKEN, nm->cls, PARAM_ROLE_EMBEDDING,
                          SHAPE(1, 1, v->d), &cls, err);
    if (st == TOP_OK)
        st = attach_param(c, *y, PARAM_POSITION, nm->pos, PARAM_ROLE_EMBEDDING,
                          SHAPE(1, v->tokens, v->d), &pos, err);
    return st;
}

/* Multi-head self-attention `<prefix>.<attn>` with qkv (3D, D) and out (D, D). */
static top_status vit_attention(torch_ctx *c, const vit_names *nm, const vit_dims *v,
                                const char *prefix, int x, int *y, top_error *err)
{
    char node[GRAPH_NAME_MAX], pname[GRAPH_NAME_MAX];
    node_attrs a;
    memset(&a, 0, sizeof a);
    a.heads = v->heads;
    top_status st = join_name(node, prefix, nm->attn, err);
    if (st == TOP_OK)
        st = add_node1(c, OP_MHSA, node, x, &a, y, err);
    if (st == TOP_OK)
        st = join_name(pname, node, nm->qkv_w, err);
    if (st == TOP_OK)
        st = attach_param(c, *y, PARAM_QKV_WEIGHT, pname, PARAM_ROLE_WEIGHT,
                          SHAPE(3 * (int64_t)v->d, v->d), NULL, err);
    if (st == TOP_OK)
        st = join_name(pname, node, nm->qkv_b, err);
    if (st == TOP_OK)
        st = attach_param(c, *y, PARAM_QKV_BIAS, pname, PARAM_ROLE_BIAS,
                          SHAPE(3 * (int64_t)v->d), NULL, err);
    char out[GRAPH_NAME_MAX];
    if (st == TOP_OK)
        st = join_name(out, node, nm->out, err);
    if (st == TOP_OK)
        st = join_name(pname, out, "weight", err);
    if (st == TOP_OK)
        st = attach_param(c, *y, PARAM_OUT_WEIGHT, pname, PARAM_ROLE_WEIGHT, SHAPE(v->d, v->d),
                          NULL, err);
    if (st == TOP_OK)
        st = join_name(pname, out, "bias", err);
    if (st == TOP_OK)
        st =
            attach_param(c, *y, PARAM_OUT_BIAS, pname, PARAM_ROLE_BIAS, SHAPE(v->d), NULL, err);
    return st;
}

/* Picks the MLP layer name: `name`, or `alt` when only `<alt>.weight` exists. */
static const char *vit_mlp_name(const torch_ctx *c, const char *prefix, const char *name,
                                const char *alt)
{
    char probe[GRAPH_NAME_MAX * 2];
    snprintf(probe, sizeof probe, "%s.%s.weight", prefix, name);
    if (!alt || st_find(c->f, probe))
        return name;
    snprintf(probe, sizeof probe, "%s.%s.weight", prefix, alt);
    return st_find(c->f, probe) ? alt : name;
}

/* MLP `fc1 (M, D) -> GELU -> fc2 (D, M)` on x; M is read from fc1. */
static top_status vit_mlp(torch_ctx *c, const vit_names *nm, const vit_dims *v,
                          const char *prefix, int x, int *y, top_error *err)
{
    char name[GRAPH_NAME_MAX];
    const char *fc1 = vit_mlp_name(c, prefix, nm->fc1, nm->fc1_alt);
    const char *fc2 = vit_mlp_name(c, prefix, nm->fc2, nm->fc2_alt);
    int hidden = -1;
    top_status st = join_name(name, prefix, fc1, err);
    if (st == TOP_OK)
        st = add_dense(c, name, x, ANY_DIM, v->d, &hidden, err);
    if (st == TOP_OK)
        st = join_name(name, prefix, nm->act, err);
    if (st == TOP_OK)
        st = add_node1(c, OP_GELU, name, hidden, NULL, y, err);
    int mlp = st == TOP_OK ? c->g->nodes[hidden].attrs.dense_out : 0;
    if (st == TOP_OK)
        st = join_name(name, prefix, fc2, err);
    if (st == TOP_OK)
        st = add_dense(c, name, *y, v->d, mlp, y, err);
    return st;
}

/* Adds node `<prefix>.<suffix>` = a + b. */
static top_status add_residual(torch_ctx *c, const char *prefix, const char *suffix, int a,
                               int b, int *y, top_error *err)
{
    char name[GRAPH_NAME_MAX];
    int in[2] = {a, b};
    node_attrs none;
    memset(&none, 0, sizeof none);
    top_status st = join_name(name, prefix, suffix, err);
    if (st == TOP_OK)
        st = graph_add_node(c->g, OP_ADD, name, in, 2, &none, y, err);
    return st;
}

/* Encoder block i: x += MHSA(LN1(x)); x += MLP(LN2(x)). */
static top_status vit_block(torch_ctx *c, const vit_names *nm, const vit_dims *v, int i, int *x,
                            top_error *err)
{
    char prefix[GRAPH_NAME_MAX], name[GRAPH_NAME_MAX];
    snprintf(prefix, sizeof prefix, "%s%d", nm->block, i);
    int h;
    top_status st = join_name(name, prefix, nm->ln1, err);
    if (st == TOP_OK)
        st = add_layernorm(c, name, *x, v->d, &h, err);
    if (st == TOP_OK)
        st = vit_attention(c, nm, v, prefix, h, &h, err);
    if (st == TOP_OK)
        st = add_residual(c, prefix, "add_1", *x, h, x, err);
    if (st == TOP_OK)
        st = join_name(name, prefix, nm->ln2, err);
    if (st == TOP_OK)
        st = add_layernorm(c, name, *x, v->d, &h, err);
    if (st == TOP_OK)
        st = vit_mlp(c, nm, v, prefix, h, &h, err);
    if (st == TOP_OK)
        st = add_residual(c, prefix, "add_2", *x, h, x, err);
    return st;
}

/* Builds a ViT with the naming scheme nm; sizes come from the shapes. */
static top_status vit_build(torch_ctx *c, const vit_names *nm, top_error *err)
{
    vit_dims v = {0};
    snprintf(c->architecture, sizeof c->architecture, "%s vit", nm->scheme);
    top_status st = vit_detect(c, nm, &v, err);
    if (st != TOP_OK)
        return st;
    vit_architecture(c->architecture, sizeof c->architecture, &v);
    snprintf(c->g->architecture, sizeof c->g->architecture, "%s", c->architecture);
    vit_preprocess(&c->g->preprocess, v.image);

    int x;
    st = add_input(c, err);
    if (st == TOP_OK)
        st = vit_patch_embed(c, nm, &v, &x, err);
    for (int i = 0; i < v.depth && st == TOP_OK; i++)
        st = vit_block(c, nm, &v, i, &x, err);
    if (st == TOP_OK)
        st = add_layernorm(c, nm->norm, x, v.d, &x, err);
    node_attrs sel;
    memset(&sel, 0, sizeof sel);
    sel.token_index = 0;
    if (st == TOP_OK)
        st = add_node1(c, OP_TOKEN_SELECT, "select_class_token", x, &sel, &x, err);

    /* DINO backbones end here: the output is the class-token feature (D). */
    char name[GRAPH_NAME_MAX];
    snprintf(name, sizeof name, "%s.weight", nm->head);
    int has_head = st_find(c->f, name) != NULL;
    snprintf(name, sizeof name, "%s.bias", nm->head);
    has_head |= st_find(c->f, name) != NULL;
    if (st == TOP_OK && (has_head || !nm->head_optional))
        st = add_dense(c, nm->head, x, ANY_DIM, v.d, &x, err);
    return st;
}

/* ---- entry points ------------------------------------------------------------ */

/* Rejects the first tensor that no layer took. */
static top_status check_all_used(const torch_ctx *c, top_error *err)
{
    size_t unused = 0, first = 0;
    for (size_t i = 0; i < c->n_tensors; i++)
        if (!c->used[i] && unused++ == 0)
            first = i;
    if (unused == 0)
        return TOP_OK;
    const st_tensor_info *t = st_tensor_at(c->f, first);
    char got[160];
    return top_error_set(err, TOP_ERR_FORMAT,
                         "unexpected tensor '%s' with shape %s in a %s checkpoint (%zu "
                         "unexpected in all); no layer of this architecture uses it",
                         t->name, tensor_shape_str(got, sizeof got, t->ndim, t->shape),
                         c->architecture, unused);
}

static top_status reject_unknown(const torch_ctx *c, top_error *err)
{
    if (c->n_tensors == 0)
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "unknown architecture: the checkpoint has no tensors");
    const st_tensor_info *t = st_tensor_at(c->f, 0);
    char got[160];
    const char *hint = strncmp(t->name, "module.", 7) == 0
                           ? "; strip the 'module.' prefix of a DataParallel checkpoint"
                           : "";
    return top_error_set(err, TOP_ERR_UNSUPPORTED,
                         "unknown architecture: found %zu tensors, the first '%s' with shape "
                         "%s, but none of conv1.weight with layer1.0.conv1.weight "
                         "(torchvision resnet), conv_proj.weight (torchvision vit) or "
                         "patch_embed.proj.weight (timm vit)%s",
                         c->n_tensors, t->name,
                         tensor_shape_str(got, sizeof got, t->ndim, t->shape), hint);
}

static top_status import_detected(torch_ctx *c, top_error *err)
{
    if (st_find(c->f, "conv1.weight") && st_find(c->f, "layer1.0.conv1.weight")) {
        snprintf(c->architecture, sizeof c->architecture, "torchvision resnet");
        return resnet_build(c, err);
    }
    if (st_find(c->f, "conv_proj.weight"))
        return vit_build(c, &vit_torchvision, err);
    if (st_find(c->f, "patch_embed.proj.weight"))
        return vit_build(c, &vit_timm, err);
    return reject_unknown(c, err);
}

top_status torch_import_file(graph **out, const st_file *f, top_error *err)
{
    if (!out || !f)
        return top_error_set(err, TOP_ERR_INVALID, "torch_import_file: out and f must be set");
    *out = NULL;

    torch_ctx c;
    memset(&c, 0, sizeof c);
    c.f = f;
    c.n_tensors = st_tensor_count(f);
    c.used = calloc(c.n_tensors ? c.n_tensors : 1, 1);
    if (!c.used)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for %zu tensor flags",
                             c.n_tensors);
    top_status st = graph_new(&c.g, err);
    if (st != TOP_OK)
        goto done;

    st = import_detected(&c, err);
    if (st == TOP_OK)
        st = check_all_used(&c, err);
    if (st == TOP_OK) {
        c.g->output = c.g->n_nodes - 1;
        st = graph_finalize(c.g, err);
    }
    if (st == TOP_OK) {
        *out = c.g;
        c.g = NULL;
    }

done:
    if (c.g)
        graph_free(c.g);
    free(c.used);
    return st;
}

top_status torch_import(graph **out, const char *path, top_error *err)
{
    if (!out || !path)
        return top_error_set(err, TOP_ERR_INVALID, "torch_import: out and path must be set");
    *out = NULL;
    st_file *f;
    top_status st = st_open(&f, path, err);
    if (st != TOP_OK)
        return st;
    st = torch_import_file(out, f, err);
    st_close(f);
    return st;
}
