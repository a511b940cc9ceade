/*
 * Forward and backward kernels of every graph op, on float32 buffers.
 *
 * Layout: activations of convolutional ops are NCHW, row-major; token
 * activations of transformer ops are (N, T, D); dense ops see (rows, features).
 * Weights use PyTorch layouts: conv (K, C/groups, R, S), dense (OUT, IN).
 *
 * Conventions shared by every kernel:
 * - Outputs come first, then inputs, then sizes, then workspace.
 * - Forward kernels overwrite their output.
 * - Backward kernels ACCUMULATE (+=) into every gradient they are given
 *   (input and parameter gradients alike), so a graph can sum the gradients of
 *   a tensor read by several consumers. A NULL gradient pointer is skipped.
 * - Sizes are validated by the caller (the graph, via the *_derive helpers);
 *   kernels do not fail and return void. The caller allocates workspace of the
 *   size the matching *_workspace_floats() function returns.
 * - Every optimised kernel has a `_naive` twin, the oracle in tests.
 * - No fast-math. Reductions over large counts accumulate in double where the
 *   comment says so.
 * Thread-safety: kernels touch only their arguments; parallel loops use
 * OpenMP inside a kernel, and BLAS calls use OpenBLAS threads.
 */
#ifndef TOPIARY_OPS_H
#define TOPIARY_OPS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

/* ---- 2-D convolution ---------------------------------------------------- */

/* Geometry of one conv2d call. Callers set the input and kernel fields,
 * conv2d_shape_derive fills p and q and validates everything. */
typedef struct conv2d_shape {
    int n, c, h, w; /* input: batch, channels, height, width */
    int k, r, s;    /* output channels, kernel height, width */
    int stride_h, stride_w;
    int dilation_h, dilation_w;
    int pad_top, pad_bottom, pad_left, pad_right;
    int groups; /* c and k are multiples of groups */
    int p, q;   /* output height, width (derived) */
} conv2d_shape;

/* Validates s (positive sizes, groups dividing c and k, output at least 1x1,
 * products within int range) and fills s->p, s->q. */
top_status conv2d_shape_derive(conv2d_shape *s, top_error *err);

/* Workspace, in floats, that conv2d_forward and conv2d_backward need. */
size_t conv2d_workspace_floats(const conv2d_shape *s);

/* x: (N, C, H, W)  w: (K, C/G, R, S)  b: (K) or NULL  y: (N, K, P, Q) */
void conv2d_forward(float *y, const float *x, const float *w, const float *b,
                    const conv2d_shape *s, float *work);
void conv2d_forward_naive(float *y, const float *x, const float *w, const float *b,
                          const conv2d_shape *s);

/* dy: (N, K, P, Q)  dx: (N, C, H, W)  dw: (K, C/G, R, S)  db: (K) */
void conv2d_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                     const float *w, const conv2d_shape *s, float *work);
void conv2d_backward_naive(float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, const conv2d_shape *s);

/* ---- pooling ------------------------------------------------------------- */

typedef struct pool2d_shape {
    int n, c, h, w;
    int r, s; /* window height, width */
    int stride_h, stride_w;
    int pad_top, pad_bottom, pad_left, pad_right;
    int count_include_pad; /* average pool: divide by r*s (1) or by
                              the in-bounds count (0, Keras "same") */
    int p, q;              /* output height, width (derived) */
} pool2d_shape;

top_status pool2d_shape_derive(pool2d_shape *s, top_error *err);

/* x: (N, C, H, W)  y: (N, C, P, Q). Max pool ignores padded cells; a window
 * that is all padding yields 0. Ties: the first maximum in row-major order
 * receives the gradient. */
void maxpool2d_forward(float *y, const float *x, const pool2d_shape *s);
void maxpool2d_backward(float *dx, const float *dy, const float *x, const pool2d_shape *s);
void avgpool2d_forward(float *y, const float *x, const pool2d_shape *s);
void avgpool2d_backward(float *dx, const float *dy, const pool2d_shape *s);

/* x: (N, C, HW)  y: (N, C) */
void global_avgpool_forward(float *y, const float *x, int n, int c, int hw);
void global_avgpool_backward(float *dx, const float *dy, int n, int c, int hw);

/* ---- normalisation ------------------------------------------------------- */

/* Batch norm over channels of x: (N, C, HW); HW = 1 for (N, C) inputs.
 * gamma, beta, mean, var: (C). y = gamma * (x - mean) / sqrt(var + eps) + beta. */
void batchnorm_forward_inference(float *y, const float *x, const float *gamma,
                                 const float *beta, const float *mean, const float *var,
                                 float eps, int n, int c, int hw);
/* Training mode: statistics of this batch (biased variance, double accumulation),
 * saved in save_mean and save_invstd (C) for the backward pass. */
void batchnorm_forward_train(float *y, float *save_mean, float *save_invstd, const float *x,
                             const float *gamma, const float *beta, float eps, int n, int c,
                             int hw);
/* Inference-mode gradient: mean and var are constants. */
void batchnorm_backward_inference(float *dx, float *dgamma, float *dbeta, const float *dy,
                                  const float *x, const float *gamma, const float *mean,
                                  const float *var, float eps, int n, int c, int hw);
/* Training-mode gradient through the batch statistics. */
void batchnorm_backward_train(float *dx, float *dgamma, float *dbeta, const float *dy,
                              const float *x, const float *gamma, const float *save_mean,
                              const float *save_invstd, int n, int c, int hw);

/* Layer norm over the last dimension of x: (ROWS, D). gamma, beta: (D).
 * save_mean, save_rstd: (ROWS). */
void layernorm_forward(float *y, float *save_mean, float *save_rstd, const float *x,
                       const float *gamma, const float *beta, float eps, size_t rows, int d);
void layernorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                        const float *save_mean, const float *save_rstd, const float *gamma,
                        size_t rows, int d);

/* ---- elementwise ---------------------------------------------------------- */

void relu_forward(float *y, const float *x, size_t count);
void relu_backward(float *dx, const float *dy, const float *x, size_t count);
void relu6_forward(float *y, const float *x, size_t count);
void relu6_backward(float *dx, const float *dy, const float *x, size_t count);
/* Exact GELU, x * Phi(x) with erf (PyTorch's default, approximate='none'). */
void gelu_forward(float *y, const float *x, size_t count);
void gelu_backward(float *dx, const float *dy, const float *x, size_t count);
void sigmoid_forward(float *y, const float *x, size_t count);
/* Uses the forward output y. */
void sigmoid_backward(float *dx, const float *dy, const float *y, size_t count);

/* Softmax over the last dimension of x: (ROWS, COLS); backward uses y. */
void softmax_forward(float *y, const float *x, size_t rows, int cols);
void softmax_backward(float *dx, const float *dy, const float *y, size_t rows, int cols);

/* y = sum of `count` inputs, each of `size` floats. */
void add_forward(float *y, const float *const *xs, int count, size_t size);

/* Concatenation along dim 1 of (N, C_i, HW) inputs into y: (N, sum C_i, HW). */
void concat_forward(float *y, const float *const *xs, const int *channels, int count, int n,
                    int hw);
/* dxs[i] may be NULL for inputs that need no gradient. */
void concat_backward(float *const *dxs, const float *dy, const int *channels, int count, int n,
                     int hw);

/* Dropout with keep mask m (N elements of 0 or 1/(1-rate)); y = x * m. The
 * mask comes from dropout_mask with an explicit seed, so runs repeat. */
void dropout_mask(float *m, size_t count, float rate, uint64_t seed);
void dropout_forward(float *y, const float *x, const float *m, size_t count);
void dropout_backward(float *dx, const float *dy, const float *m, size_t count);

/* Zero padding of x: (N, C, H, W) to y: (N, C, H+top+bottom, W+left+right). */
void zeropad2d_forward(float *y, const float *x, int n, int c, int h, int w, int top,
                       int bottom, int left, int right);
void zeropad2d_backward(float *dx, const float *dy, int n, int c, int h, int w, int top,
                        int bottom, int left, int right);

/* Layout change (N, C, H, W) <-> (N, H, W, C); Keras Flatten flattens NHWC. */
void nchw_to_nhwc(float *y, const float *x, int n, int c, int h, int w);
void nhwc_to_nchw(float *y, const float *x, int n, int c, int h, int w);

/* ---- dense ----------------------------------------------------------------- */

/* x: (ROWS, IN)  w: (OUT, IN)  b: (OUT) or NULL  y: (ROWS, OUT); y = x w^T + b */
void dense_forward(float *y, const float *x, const float *w, const float *b, size_t rows,
                   int in, int out);
void dense_forward_naive(float *y, const float *x, const float *w, const float *b, size_t rows,
                         int in, int out);
/* dy: (ROWS, OUT)  dx: (ROWS, IN)  dw: (OUT, IN)  db: (OUT) */
void dense_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, size_t rows, int in, int out);

/* ---- transformer ----------------------------------------------------------- */

/* Multi-head self-attention, PyTorch nn.MultiheadAttention semantics with
 * batch_first, no mask, no dropout.
 * x: (N, T, D)  w_qkv: (3D, D) rows q|k|v  b_qkv: (3D)  w_out: (D, D)  b_out: (D)
 * y: (N, T, D). Saved for backward: qkv (N, T, 3D), att (N, H, T, T) softmax
 * probabilities, ctx (N, T, D) the heads' outputs before the out projection.
 * Scale 1/sqrt(D/H). */
size_t mhsa_workspace_floats(int t, int d, int heads);
void mhsa_forward(float *y, float *qkv, float *att, float *ctx, const float *x,
                  const float *w_qkv, const float *b_qkv, const float *w_out,
                  const float *b_out, int n, int t, int d, int heads, float *work);
void mhsa_backward(float *dx, float *dw_qkv, float *db_qkv, float *dw_out, float *db_out,
                   const float *dy, const float *x, const float *qkv, const float *att,
                   const float *ctx, const float *w_qkv, const float *w_out, int n, int t,
                   int d, int heads, float *work);

/* Token assembly after the patch convolution: tokens (N, D, HW) from the conv
 * become y: (N, 1 + HW, D) with the class token cls (D) first and the position
 * embedding pos (1 + HW, D) added. */
void patch_tokens_forward(float *y, const float *patches, const float *cls, const float *pos,
                          int n, int d, int hw);
void patch_tokens_backward(float *dpatches, float *dcls, float *dpos, const float *dy, int n,
                           int d, int hw);

/* y: (N, D) = x[:, index, :] of x: (N, T, D). */
void token_select_forward(float *y, const float *x, int n, int t, int d, int index);
void token_select_backward(float *dx, const float *dy, int n, int t, int d, int index);

/* ---- loss -------------------------------------------------------------------- */

/* Mean softmax cross-entropy of logits (N, K) against labels (N) in [0, K).
 * Returns the loss; writes dlogits (N, K) = (softmax - onehot) / N if non-NULL
 * (overwritten, not accumulated). Uses log-sum-exp in double. */
double cross_entropy_forward_backward(float *dlogits, const float *logits,
                                      const int32_t *labels, int n, int k);

#endif
