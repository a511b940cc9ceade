/*
 * The model graph: one intermediate representation for every imported model.
 *
 * A graph is a DAG of nodes stored in topological order (a node's inputs are
 * always earlier nodes; graph_add_node enforces it). Each node has an op, its
 * attributes, up to GRAPH_MAX_INPUTS inputs and up to GRAPH_MAX_PARAMS
 * parameter slots. Parameters are tensors in the engine's layout (PyTorch
 * layouts, see ops.h) plus what is needed to write them back in the layout and
 * under the name they had in the source file.
 *
 * Activations are per-sample shapes of rank 1 (D), 2 (T, D) or 3 (C, H, W);
 * a batch adds a leading N. graph_forward keeps every node's output until the
 * next forward so that graph_backward can use them.
 *
 * Ownership: the graph owns its nodes, parameters, activations and gradients.
 * Thread-safety: one thread uses a graph at a time; kernels parallelise inside.
 */
#ifndef TOPIARY_GRAPH_H
#define TOPIARY_GRAPH_H

#include <stddef.h>
#include <stdint.h>

#include "ops.h"
#include "status.h"
#include "tensor.h"

#define GRAPH_MAX_INPUTS 16
#define GRAPH_MAX_PARAMS 4
#define GRAPH_NAME_MAX 256
/* Weight of the batch statistics in the running mean and variance updated by
 * a training-mode forward (PyTorch's default momentum). */
#define GRAPH_BN_MOMENTUM 0.1

typedef enum op_kind {
    OP_INPUT,     /* the image batch, (C, H, W) */
    OP_CONV2D,    /* params: weight (K, C/G, R, S), bias (K) optional */
    OP_BATCHNORM, /* params: gamma, beta, running mean, running var (C) */
    OP_RELU,
    OP_RELU6,
    OP_GELU,
    OP_SIGMOID,
    OP_SOFTMAX, /* over the last dimension */
    OP_ADD,     /* two or more inputs of one shape */
    OP_CONCAT,  /* along channels of (C, H, W) inputs */
    OP_MAXPOOL,
    OP_AVGPOOL,
    OP_GLOBAL_AVGPOOL, /* (C, H, W) -> (C) */
    OP_DENSE,          /* params: weight (OUT, IN), bias (OUT) optional; applies
                          to the last dimension, so (T, D) inputs work per token */
    OP_FLATTEN,        /* any -> (numel); attrs.flatten_nhwc for Keras order */
    OP_ZEROPAD,
    OP_DROPOUT,      /* identity unless the graph runs in training mode */
    OP_LAYERNORM,    /* params: gamma, beta (D), over the last dimension */
    OP_MHSA,         /* params: w_qkv (3D, D), b_qkv (3D), w_out (D, D), b_out (D) */
    OP_PATCH_EMBED,  /* params: weight (D, C, P, P), bias (D), class token (D),
                        position embedding (1 + HW, D); (C, H, W) -> (1+HW, D) */
    OP_TOKEN_SELECT, /* (T, D) -> (D), token attrs.token_index */
    OP_COUNT
} op_kind;

/* Parameter slots by op. */
enum {
    PARAM_WEIGHT = 0,
    PARAM_BIAS = 1, /* conv, dense, patch embed */
    PARAM_GAMMA = 0,
    PARAM_BETA = 1, /* batch norm, layer norm */
    PARAM_MEAN = 2,
    PARAM_VAR = 3, /* batch norm */
    PARAM_QKV_WEIGHT = 0,
    PARAM_QKV_BIAS = 1, /* attention */
    PARAM_OUT_WEIGHT = 2,
    PARAM_OUT_BIAS = 3,
    PARAM_CLASS_TOKEN = 2,
    PARAM_POSITION = 3, /* patch embed */
};

/* Attributes of a node; each op reads only its own fields. */
typedef struct node_attrs {
    /* conv2d and patch embed: k, r, s, strides, dilations, pads, groups;
     * n, c, h, w, p, q are filled by the graph. */
    conv2d_shape conv;
    /* max and average pool: r, s, strides, pads, count_include_pad. */
    pool2d_shape pool;
    int pad_top, pad_bottom, pad_left, pad_right; /* zero padding */
    float eps;                                    /* batch norm, layer norm */
    float dropout_rate;
    int heads;        /* attention */
    int token_index;  /* token select */
    int flatten_nhwc; /* flatten in H, W, C order */
    int dense_out;    /* dense: output features */
} node_attrs;

/* How a parameter's engine layout maps back to its layout in the source file. */
typedef enum param_layout {
    PARAM_LAYOUT_SAME, /* identical (PyTorch sources) */
    PARAM_LAYOUT_HWIO, /* Keras conv kernel (R, S, C, K) -> (K, C, R, S) */
    PARAM_LAYOUT_HWC1, /* Keras depthwise kernel (R, S, C, 1) -> (C, 1, R, S) */
    PARAM_LAYOUT_IO,   /* Keras dense kernel (IN, OUT) -> (OUT, IN) */
} param_layout;

typedef enum param_role {
    PARAM_ROLE_WEIGHT, /* conv, dense, patch-embed and attention weights */
    PARAM_ROLE_BIAS,
    PARAM_ROLE_NORM,      /* batch-norm and layer-norm gamma and beta */
    PARAM_ROLE_STATISTIC, /* batch-norm running mean and variance */
    PARAM_ROLE_EMBEDDING, /* class token, position embedding */
} param_role;

typedef struct graph_param {
    char name[GRAPH_NAME_MAX]; /* name in the source ("layer1.0.conv1.weight") */
    int node;                  /* owning node */
    int slot;                  /* PARAM_* slot in that node */
    param_role role;
    tensor value; /* engine layout */
    float *grad;  /* same numel as value, allocated by graph_backward */
    param_layout layout;
    int src_ndim;
    int64_t src_shape[TENSOR_MAX_DIMS];
} graph_param;

typedef struct graph_node {
    char name[GRAPH_NAME_MAX];
    op_kind op;
    node_attrs attrs;
    int n_inputs;
    int inputs[GRAPH_MAX_INPUTS];
    int params[GRAPH_MAX_PARAMS]; /* indices into graph.params, -1 if empty */
    int ndim;                     /* per-sample output shape (filled by finalize) */
    int64_t dims[3];
    size_t sample_numel;
    void *run; /* buffers of the last forward (graph.c) */
} graph_node;

/* Input preprocessing the model expects, recorded by its importer. */
typedef struct graph_preprocess {
    int channels, height, width; /* model input size */
    int align_corners;           /* bilinear resize convention */
    int resize_short_side;       /* resize so the short side is this, then
                                    center-crop height x width; 0 = resize
                                    straight to height x width */
    float scale;                 /* pixel (0..255) * scale ... */
    float mean[3], std[3];       /* ... then (v - mean) / std per channel */
} graph_preprocess;

typedef enum graph_mode {
    GRAPH_MODE_INFERENCE, /* batch norm uses running statistics, no dropout */
    GRAPH_MODE_TRAIN,     /* batch statistics, dropout active */
} graph_mode;

typedef struct graph {
    char architecture[64]; /* "keras:mobilenetv2", "resnet50", "vit" ... */
    graph_node *nodes;
    int n_nodes, cap_nodes;
    graph_param *params;
    int n_params, cap_params;
    int output; /* the logits node (default: last node) */
    graph_preprocess preprocess;
    int finalized;
    int batch; /* batch size of the buffers now allocated */
    graph_mode mode;
    uint64_t dropout_seed;
    float *workspace;
    size_t workspace_floats;
} graph;

top_status graph_new(graph **out, top_error *err);
void graph_free(graph *g);

/*
 * Appends a node. Inputs must be indices of existing nodes. The name must be
 * unique (it is the importer's layer name). Stores the new index in *index.
 */
top_status graph_add_node(graph *g, op_kind op, const char *name, const int *inputs,
                          int n_inputs, const node_attrs *attrs, int *index, top_error *err);

/*
 * Attaches a parameter to slot `slot` of node `node`. The graph takes
 * ownership of value's buffer (value is emptied). src_shape/src_ndim give the
 * shape in the source file (NULL/0: same as value). A view (value.owned = 0)
 * is copied. On failure the caller still owns value.
 */
top_status graph_add_param(graph *g, int node, int slot, const char *name, param_role role,
                           tensor *value, param_layout layout, const int64_t *src_shape,
                           int src_ndim, top_error *err);

/*
 * The input node is node 0, and no other node may be an OP_INPUT. Its
 * per-sample shape (C, H, W) comes from its attrs.conv.c, .h and .w, which the
 * importer sets. Batch norm needs all four parameters, and layer norm and
 * attention need all of theirs. Conv, dense and patch-embed biases are optional.
 *
 * Infers every node's output shape from the input node's (C, H, W), checks
 * that each node has the parameters its op needs with the right shapes, and
 * freezes the structure. Errors name the node and the mismatch.
 */
top_status graph_finalize(graph *g, top_error *err);

/*
 * Changes the input height and width of a finalized graph and re-infers every
 * shape (convolutional models accept any size their strides and pooling
 * windows allow; a ViT's position embedding fixes its size). Scales the
 * recorded preprocessing to match. On failure the graph keeps its old size
 * and err names the node that rejected the new one.
 */
top_status graph_set_input_size(graph *g, int h, int w, top_error *err);

/*
 * Runs the graph on x: (N, C, H, W). Keeps every activation for backward.
 *
 * Training mode: batch norm normalises with the batch statistics and updates
 * the running mean and variance, stat = (1 - GRAPH_BN_MOMENTUM) * stat +
 * GRAPH_BN_MOMENTUM * batch value, with the unbiased batch variance (as
 * PyTorch does). It needs more than one value per channel. Dropout draws its
 * masks from g->dropout_seed, and each training forward then advances the seed.
 * Buffers are reused while n stays the same. On failure (TOP_ERR_NOMEM or
 * TOP_ERR_LIMIT naming the node and the size) the buffers are released and no
 * backward is possible until the next successful forward.
 */
top_status graph_forward(graph *g, const float *x, int n, graph_mode mode, top_error *err);

/*
 * graph_forward of nodes 0 .. last only, for callers that read one early
 * node (a layer's input, a batch norm's input) and would waste the rest of
 * the pass. The outputs of later nodes are stale until the next full forward;
 * graph_node_output of them and a backward from them are the caller's error.
 */
top_status graph_forward_to(graph *g, const float *x, int n, graph_mode mode, int last,
                            top_error *err);

/* The output of node `node` from the last forward, (N, per-sample shape). */
const float *graph_node_output(const graph *g, int node);

/*
 * Back-propagates dy (the gradient of the loss with respect to the output of
 * node `from`, shape (N, per-sample shape)) through the last forward.
 * Parameter gradients ACCUMULATE into param.grad (allocated and zeroed on
 * first use); graph_zero_grad clears them. If dx is non-NULL the gradient with
 * respect to the input batch is written there (overwritten).
 */
top_status graph_backward(graph *g, int from, const float *dy, float *dx, top_error *err);
void graph_zero_grad(graph *g);

/* Index of the node or parameter with this name, or -1. */
int graph_find_node(const graph *g, const char *name);
int graph_find_param(const graph *g, const char *name);

/* Per-image counts: parameters (all, or prunable only) and multiply-adds x 2.
 * `params` counts trainable tensors only (batch-norm running statistics are
 * left out, as PyTorch's parameters() does). FLOPs count conv, patch-embed,
 * dense and attention (projections and both T x T products) and are 0 before
 * graph_finalize. */
typedef struct graph_stats {
    size_t params;
    size_t prunable_params;
    double flops; /* forward FLOPs per image (2 per multiply-add) */
} graph_stats;
void graph_get_stats(const graph *g, graph_stats *stats);

/* 1 if parameter i is a conv or dense weight (a pruning candidate before
 * any name filter: attention and patch-embedding weights included). */
int graph_param_is_prunable(const graph *g, int i);

/* Returns a static name of the op ("conv2d"). */
const char *op_kind_str(op_kind op);

#endif
