/*
 * Convolutional kernels of ops.h: 2-D convolution, max and average pooling,
 * global average pooling, batch norm, channel concat, zero padding and the
 * NCHW <-> NHWC layout changes, each forward with its backward.
 *
 * conv2d: y[n,k,p,q] = b[k] + sum_{c,r,t} w[k,c,r,t] *
 *                      x[n, g*C/G + c, p*sh - pt + r*dh, q*sw - pl + t*dw]
 * with g = k / (K/G) the group of output channel k and out-of-range x read as 0.
 * Three fast paths, chosen by conv_path_select:
 * - depthwise (C/G = 1, G > 1, so K = m*C): a direct kernel, OpenMP over
 *   (n, k) planes in the forward and over channels in the backward. 3x3
 *   kernels of stride 1 and 2 copy each plane into a zero-bordered scratch
 *   plane, so every output cell takes one fused, vectorised sum;
 * - pointwise (1x1, stride 1, no padding): one sgemm per image and group,
 *   since the input already has the column layout;
 * - everything else: im2col of a tile of output rows of one image and group
 *   into the workspace, then sgemm. The backward pass reuses the tile for
 *   dW += dy * col^T and then for dcol = W^T * dy, which col2im adds into dx.
 * The sgemm paths split the images of a batch over OpenMP threads. Each
 * thread has its own column tile, and the backward pass keeps one dW partial
 * sum per chunk of images, added in a fixed order. OpenBLAS runs on one thread
 * meanwhile (openblas_set_num_threads, restored afterwards), because OpenBLAS
 * workers spinning next to OpenMP workers on the same cores cost more than
 * they gain on these per-image products. A batch of one image keeps the
 * OpenBLAS threads.
 *
 * Layout: float32, NCHW row-major; conv weights (K, C/G, R, S).
 * Accumulation in double: batch-norm statistics and gradient sums, pooling
 * and bias-gradient sums, the naive conv twins. sgemm accumulates in float.
 * Thread-safety: kernels touch only their arguments and the workspace; the
 * OpenBLAS thread count is process state, so a concurrent caller's sgemm may
 * run on one thread while a batch convolution is in progress.
 * Not here: running-statistics updates of batch norm, which the graph owns.
 * PyTorch updates running_var with the unbiased variance, while training-mode
 * normalisation here (as in PyTorch) uses the biased one. No ceil-mode pooling.
 */
#include "ops.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/*
 * Shape legend: N batch, C input channels, H W input height and width,
 * K output channels, R S kernel height and width, P Q output height and width,
 * G groups, CG = C/G and KG = K/G channels per group, HW = H*W, PQ = P*Q.
 */

/* Work below this many multiply-adds stays on one OpenMP thread. */
#define PARALLEL_MIN_WORK 32768

/* Hot loops marked CONV_CLONES are compiled for AVX2 and for the baseline ISA, picked at load
 * time. The arithmetic and its order are the same in both clones (the build
 * does not contract to FMA), so results do not depend on the CPU. */
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define CONV_CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CONV_CLONES
#endif

/* Sums in eight double lanes: exact float-to-double products and several
 * independent chains, so the loops vectorise without reassociating one sum. */
#define LANES 8

/* Returns sum_i a[i] in double. */
CONV_CLONES
static double sum_f64(const float *a, size_t n)
{
    double lane[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++)
            lane[l] += a[i + l];
    for (; i < n; i++)
        lane[0] += a[i];
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
           ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

/* Returns sum_i (a[i] - mu)^2 in double. */
CONV_CLONES
static double sum_sq_dev_f64(const float *a, size_t n, double mu)
{
    double lane[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            double d = a[i + l] - mu;
            lane[l] += d * d;
        }
    for (; i < n; i++)
        lane[0] += (a[i] - mu) * (a[i] - mu);
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
           ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

/* *sum_a = sum_i a[i] and *sum_ab = sum_i a[i] * (b[i] - mu), in double, in
 * one pass over a; the first sum has the lanes and order of sum_f64. */
CONV_CLONES
static void sum_and_prod_dev_f64(double *sum_a, double *sum_ab, const float *a, const float *b,
                                 size_t n, double mu)
{
    double la[LANES] = {0}, lab[LANES] = {0};
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++) {
            la[l] += a[i + l];
            lab[l] += (double)a[i + l] * (b[i + l] - mu);
        }
    for (; i < n; i++) {
        la[0] += a[i];
        lab[0] += (double)a[i] * (b[i] - mu);
    }
    *sum_a = ((la[0] + la[1]) + (la[2] + la[3])) + ((la[4] + la[5]) + (la[6] + la[7]));
    *sum_ab = ((lab[0] + lab[1]) + (lab[2] + lab[3])) + ((lab[4] + lab[5]) + (lab[6] + lab[7]));
}

/* dst[i] += src[i] for n floats, in blocks of LANES so that -O2 vectorises. */
CONV_CLONES
static void add_floats(float *restrict dst, const float *restrict src, size_t n)
{
    size_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int l = 0; l < LANES; l++)
            dst[i + l] += src[i + l];
    for (; i < n; i++)
        dst[i] += src[i];
}

/* ---- shape validation ------------------------------------------------------ */

/* Fails unless every factor is positive and the product fits in an int. */
static top_status check_int_product(const char *what, const long long *dims, int count,
                                    top_error *err)
{
    long long product = 1;
    for (int i = 0; i < count; i++) {
        if (dims[i] < 1)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "%s has a dimension %lld below 1; all sizes must be positive",
                                 what, dims[i]);
        if (product > INT_MAX / dims[i])
            return top_error_set(err, TOP_ERR_OVERFLOW,
                                 "%s exceeds %d elements; use a smaller batch or input", what,
                                 INT_MAX);
        product *= dims[i];
    }
    return TOP_OK;
}

/* Output size along one axis, or -1 when the padded input is shorter than
 * the dilated window. */
static long long pooled_extent(int in, int pad_a, int pad_b, long long window, int stride)
{
    long long span = (long long)in + pad_a + pad_b - window;
    return span < 0 ? -1 : span / stride + 1;
}

static top_status check_conv_params(const conv2d_shape *s, top_error *err)
{
    if (s->stride_h < 1 || s->stride_w < 1 || s->dilation_h < 1 || s->dilation_w < 1)
        return top_error_set(err, TOP_ERR_INVALID,
                             "conv2d stride (%d, %d) and dilation (%d, %d) must be at least 1",
                             s->stride_h, s->stride_w, s->dilation_h, s->dilation_w);
    if (s->pad_top < 0 || s->pad_bottom < 0 || s->pad_left < 0 || s->pad_right < 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "conv2d padding (%d, %d, %d, %d) must not be negative", s->pad_top,
                             s->pad_bottom, s->pad_left, s->pad_right);
    if (s->groups < 1 || s->c % s->groups || s->k % s->groups)
        return top_error_set(err, TOP_ERR_SHAPE,
                             "conv2d groups %d must divide input channels %d and output "
                             "channels %d",
                             s->groups, s->c, s->k);
    return TOP_OK;
}

top_status conv2d_shape_derive(conv2d_shape *s, top_error *err)
{
    long long in_dims[4] = {s->n, s->c, s->h, s->w};
    long long kernel_dims[3] = {s->k, s->r, s->s};
    top_status st = check_int_product("conv2d input", in_dims, 4, err);
    if (st == TOP_OK)
        st = check_int_product("conv2d kernel", kernel_dims, 3, err);
    if (st == TOP_OK)
        st = check_conv_params(s, err);
    if (st != TOP_OK)
        return st;

    long long window_h = (long long)s->dilation_h * (s->r - 1) + 1;
    long long window_w = (long long)s->dilation_w * (s->s - 1) + 1;
    long long p = pooled_extent(s->h, s->pad_top, s->pad_bottom, window_h, s->stride_h);
    long long q = pooled_extent(s->w, s->pad_left, s->pad_right, window_w, s->stride_w);
    if (p < 1 || q < 1)
        return top_error_set(err, TOP_ERR_SHAPE,
                             "conv2d window %lldx%lld is larger than the padded input "
                             "%lldx%lld; pad the input or use a smaller kernel",
                             window_h, window_w, (long long)s->h + s->pad_top + s->pad_bottom,
                             (long long)s->w + s->pad_left + s->pad_right);

    /* Every per-image product must fit the int sizes of BLAS. */
    long long out_dims[4] = {s->n, s->k, p, q};
    long long weight_dims[4] = {s->k, s->c / s->groups, s->r, s->s};
    long long col_dims[5] = {s->c / s->groups, s->r, s->s, p, q};
    st = check_int_product("conv2d output", out_dims, 4, err);
    if (st == TOP_OK)
        st = check_int_product("conv2d weight", weight_dims, 4, err);
    if (st == TOP_OK)
        st = check_int_product("conv2d column buffer", col_dims, 5, err);
    if (st != TOP_OK)
        return st;
    s->p = (int)p;
    s->q = (int)q;
    return TOP_OK;
}

/* ---- conv2d: path selection and helpers ------------------------------------ */

typedef enum conv_path {
    CONV_PATH_DEPTHWISE, /* C/G = 1 with G > 1: direct kernel */
    CONV_PATH_POINTWISE, /* 1x1, stride 1, unpadded: sgemm on x itself */
    CONV_PATH_IM2COL,    /* everything else: im2col + sgemm */
} conv_path;

static conv_path conv_path_select(const conv2d_shape *s)
{
    if (s->groups > 1 && s->c == s->groups)
        return CONV_PATH_DEPTHWISE;
    if (s->r == 1 && s->s == 1 && s->stride_h == 1 && s->stride_w == 1 && s->pad_top == 0 &&
        s->pad_bottom == 0 && s->pad_left == 0 && s->pad_right == 0)
        return CONV_PATH_POINTWISE;
    return CONV_PATH_IM2COL;
}

/*
 * Output indices o in [*lo, *hi) whose input index o*stride + offset lies in
 * [0, in). The range is empty (lo == hi) when no output reads a real cell.
 */
/* Returns value / stride for value >= 0, without a division for the common
 * strides, because the depthwise kernel calls this for every row and tap. */
static inline int divide_by_stride(int value, int stride)
{
    if (stride == 1)
        return value;
    if (stride == 2)
        return value >> 1;
    return value / stride;
}

static void valid_output_range(int *lo, int *hi, int out, int in, int stride, int offset)
{
    int first = offset >= 0 ? 0 : divide_by_stride(-offset + stride - 1, stride);
    int last = in - 1 - offset < 0 ? -1 : divide_by_stride(in - 1 - offset, stride);
    if (last > out - 1)
        last = out - 1;
    *lo = first < out ? first : out;
    *hi = last + 1 > *lo ? last + 1 : *lo;
}

/* Sets each of the kg planes of y (kg, PQ) to its bias value. */
static void fill_bias(float *y, const float *b, int kg, size_t pq)
{
    for (int k = 0; k < kg; k++)
        for (size_t i = 0; i < pq; i++)
            y[(size_t)k * pq + i] = b[k];
}

/* db: (K) += sum over n, p, q of dy: (N, K, PQ), accumulated in double. */
static void conv_bias_backward(float *db, const float *dy, int n, int k, size_t pq)
{
#pragma omp parallel for schedule(static) if ((size_t)n * k * pq > PARALLEL_MIN_WORK)
    for (int j = 0; j < k; j++) {
        double sum = 0.0;
        for (int i = 0; i < n; i++)
            sum += sum_f64(dy + ((size_t)i * k + j) * pq, pq);
        db[j] += (float)sum;
    }
}

/* ---- conv2d: depthwise direct kernel ------------------------------------------ */

/*
 * One row of a 1-D correlation, accumulated:
 * out[o] += sum_t wt[t * wt_step] * in[o*stride + t*dilation - pad]
 * over the taps whose input index lies in [0, in_len). wt_step = -1 walks the
 * taps backwards, which turns the correlation into a transposed convolution.
 * Three-tap rows of stride 1 or 2 (the common depthwise 3x3) take one fused
 * pass over the outputs that see all taps.
 */
CONV_CLONES
static void row_correlate(float *restrict out, int out_len, const float *restrict in,
                          int in_len, const float *wt, int wt_step, int taps, int stride,
                          int dilation, int pad)
{
    int lo_all = 0, hi_all = out_len;
    for (int t = 0; t < taps; t++) {
        int lo, hi;
        valid_output_range(&lo, &hi, out_len, in_len, stride, t * dilation - pad);
        lo_all = lo > lo_all ? lo : lo_all;
        hi_all = hi < hi_all ? hi : hi_all;
    }
    int fused = taps == 3 && (stride == 1 || stride == 2) && lo_all < hi_all;
    if (fused) {
        float w0 = wt[0], w1 = wt[wt_step], w2 = wt[2 * wt_step];
        int off0 = -pad, off1 = dilation - pad, off2 = 2 * dilation - pad;
        int o = lo_all;
        /* Blocks of LANES outputs with a constant stride, so -O2 vectorises them. */
        if (stride == 1)
            for (; o + LANES <= hi_all; o += LANES)
                for (int l = 0; l < LANES; l++)
                    out[o + l] +=
                        w0 * in[o + l + off0] + w1 * in[o + l + off1] + w2 * in[o + l + off2];
        else
            for (; o + LANES <= hi_all; o += LANES)
                for (int l = 0; l < LANES; l++)
                    out[o + l] += w0 * in[2 * (o + l) + off0] + w1 * in[2 * (o + l) + off1] +
                                  w2 * in[2 * (o + l) + off2];
        for (; o < hi_all; o++) {
            int at = o * stride;
            out[o] += w0 * in[at + off0] + w1 * in[at + off1] + w2 * in[at + off2];
        }
    }

    /* Tap by tap: everything when not fused, else the edges the fused pass
     * left out (lo <= lo_all and hi_all <= hi for every tap). */
    for (int t = 0; t < taps; t++) {
        int lo, hi, offset = t * dilation - pad;
        valid_output_range(&lo, &hi, out_len, in_len, stride, offset);
        float wv = wt[t * wt_step];
        int mid_lo = fused ? lo_all : hi, mid_hi = fused ? hi_all : hi;
        for (int o = lo; o < mid_lo; o++)
            out[o] += wv * in[o * stride + offset];
        for (int o = mid_hi; o < hi; o++)
            out[o] += wv * in[o * stride + offset];
    }
}

/* Returns y[p, q] of one depthwise output plane with bounds checks, for the
 * edge cells that the fused 3x3 loop leaves out. */
static float depthwise_cell(const float *x, const float *w, float bias, int p, int q,
                            const conv2d_shape *s)
{
    float sum = bias;
    for (int r = 0; r < s->r; r++) {
        int ih = p * s->stride_h - s->pad_top + r * s->dilation_h;
        for (int t = 0; ih >= 0 && ih < s->h && t < s->s; t++) {
            int iw = q * s->stride_w - s->pad_left + t * s->dilation_w;
            if (iw >= 0 && iw < s->w)
                sum += w[r * s->s + t] * x[(size_t)ih * s->w + iw];
        }
    }
    return sum;
}

/*
 * One output row of a 3x3 depthwise kernel with stride 1 or 2 (the same
 * along both axes) and no dilation, whose three input rows start at xr and
 * are all inside the image. Columns [lo, hi) see every tap and take one
 * fused pass; the others go through depthwise_cell.
 */
CONV_CLONES
static void depthwise_row_3x3(float *restrict row, const float *restrict xr, const float *w,
                              float bias, int p, int lo, int hi, const float *x,
                              const conv2d_shape *s)
{
    size_t wd = (size_t)s->w;
    const float *x0 = xr, *x1 = xr + wd, *x2 = xr + 2 * wd;
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5];
    const float w6 = w[6], w7 = w[7], w8 = w[8];
    int pad = s->pad_left, stride = s->stride_w;

    /* Blocks of LANES outputs with a constant stride, so -O2 vectorises them.
     * The last block overlaps the one before it instead of leaving a scalar
     * tail; it stores the same values again, because each cell is assigned. */
    for (int q = lo; q < hi; q += LANES) {
        if (q + LANES > hi)
            q = hi - LANES >= lo ? hi - LANES : q;
        if (q + LANES > hi) {
            for (; q < hi; q++)
                row[q] = depthwise_cell(x, w, bias, p, q, s);
            break;
        }
        if (stride == 1)
            for (int l = 0; l < LANES; l++) {
                int at = q + l - pad;
                row[q + l] = bias + (w0 * x0[at] + w1 * x0[at + 1] + w2 * x0[at + 2]) +
                             (w3 * x1[at] + w4 * x1[at + 1] + w5 * x1[at + 2]) +
                             (w6 * x2[at] + w7 * x2[at + 1] + w8 * x2[at + 2]);
            }
        else
            for (int l = 0; l < LANES; l++) {
                int at = 2 * (q + l) - pad;
                row[q + l] = bias + (w0 * x0[at] + w1 * x0[at + 1] + w2 * x0[at + 2]) +
                             (w3 * x1[at] + w4 * x1[at + 1] + w5 * x1[at + 2]) +
                             (w6 * x2[at] + w7 * x2[at + 1] + w8 * x2[at + 2]);
            }
    }
    for (int q = 0; q < lo; q++)
        row[q] = depthwise_cell(x, w, bias, p, q, s);
    for (int q = hi; q < s->q; q++)
        row[q] = depthwise_cell(x, w, bias, p, q, s);
}

/* Whether depthwise_row_3x3 applies to this geometry. */
static int depthwise_is_3x3(const conv2d_shape *s)
{
    return s->r == 3 && s->s == 3 && s->dilation_h == 1 && s->dilation_w == 1 &&
           s->stride_h == s->stride_w && (s->stride_w == 1 || s->stride_w == 2);
}

/* Height and width of the zero-padded copy of an input plane that
 * depthwise_plane_padded reads: the rows and columns of every window. */
static void depthwise_padded_size(int *hp, int *wp, const conv2d_shape *s)
{
    int rows = (s->p - 1) * s->stride_h + 3, cols = (s->q - 1) * s->stride_w + 3;
    *hp = s->pad_top + s->h > rows ? s->pad_top + s->h : rows;
    *wp = s->pad_left + s->w > cols ? s->pad_left + s->w : cols;
}

/* Whether the padded path applies: a depthwise_is_3x3 geometry whose
 * padding is within the window, so the copy holds every cell it reads. */
static int depthwise_padded_fits(const conv2d_shape *s)
{
    return depthwise_is_3x3(s) && s->pad_top >= 0 && s->pad_left >= 0 && s->pad_top <= 2 &&
           s->pad_left <= 2;
}

/*
 * One output plane of a depthwise_padded_fits geometry. y: (P, Q)
 * xp: (HP, WP) the input plane at offset (pad_top, pad_left) of a zero
 * border, so every cell takes the same fused 3x3 sum without bounds checks.
 * Blocks of LANES columns with a constant stride, so -O2 vectorises them.
 */
CONV_CLONES
static void depthwise_plane_padded(float *restrict y, const float *restrict xp, int wp,
                                   const float *w, float bias, const conv2d_shape *s)
{
    const float w0 = w[0], w1 = w[1], w2 = w[2], w3 = w[3], w4 = w[4], w5 = w[5];
    const float w6 = w[6], w7 = w[7], w8 = w[8];
    int stride = s->stride_w, blocks = s->q / LANES * LANES;
    for (int p = 0; p < s->p; p++) {
        const float *x0 = xp + (size_t)p * s->stride_h * wp, *x1 = x0 + wp, *x2 = x1 + wp;
        float *row = y + (size_t)p * s->q;
        int q = 0;
        if (stride == 1)
            for (; q < blocks; q += LANES)
                for (int l = 0; l < LANES; l++) {
                    int at = q + l;
                    row[at] = bias + (w0 * x0[at] + w1 * x0[at + 1] + w2 * x0[at + 2]) +
                              (w3 * x1[at] + w4 * x1[at + 1] + w5 * x1[at + 2]) +
                              (w6 * x2[at] + w7 * x2[at + 1] + w8 * x2[at + 2]);
                }
        else
            for (; q < blocks; q += LANES)
                for (int l = 0; l < LANES; l++) {
                    int at = 2 * (q + l);
                    row[q + l] = bias + (w0 * x0[at] + w1 * x0[at + 1] + w2 * x0[at + 2]) +
                                 (w3 * x1[at] + w4 * x1[at + 1] + w5 * x1[at + 2]) +
                                 (w6 * x2[at] + w7 * x2[at + 1] + w8 * x2[at + 2]);
                }
        for (; q < s->q; q++) {
            int at = q * stride;
            row[q] = bias + (w0 * x0[at] + w1 * x0[at + 1] + w2 * x0[at + 2]) +
                     (w3 * x1[at] + w4 * x1[at + 1] + w5 * x1[at + 2]) +
                     (w6 * x2[at] + w7 * x2[at + 1] + w8 * x2[at + 2]);
        }
    }
}

/* Scratch of one thread for the padded path: a zeroed (HP, WP) plane whose
 * border stays zero, because each plane copies only its interior. NULL when
 * the path does not apply or the allocation fails (the row path runs then). */
static float *depthwise_scratch_new(const conv2d_shape *s)
{
    if (!depthwise_padded_fits(s))
        return NULL;
    int hp, wp;
    depthwise_padded_size(&hp, &wp, s);
    return calloc((size_t)hp * wp, sizeof(float));
}

/* y: (P, Q) of x: (H, W) through the padded copy in scratch. */
static void depthwise_plane_forward_padded(float *y, const float *x, const float *w, float bias,
                                           const conv2d_shape *s, float *scratch)
{
    int hp, wp;
    depthwise_padded_size(&hp, &wp, s);
    for (int i = 0; i < s->h; i++)
        memcpy(scratch + (size_t)(i + s->pad_top) * wp + s->pad_left, x + (size_t)i * s->w,
               (size_t)s->w * sizeof *x);
    depthwise_plane_padded(y, scratch, wp, w, bias, s);
}

/* One output plane. y: (P, Q)  x: (H, W) of the input channel  w: (R, S) */
static void depthwise_plane_forward(float *y, const float *x, const float *w, float bias,
                                    const conv2d_shape *s)
{
    /* Columns whose three taps all read inside the row, for the 3x3 path. */
    int lo = 0, hi = s->q, fast = depthwise_is_3x3(s);
    for (int t = 0; fast && t < 3; t++) {
        int tap_lo, tap_hi;
        valid_output_range(&tap_lo, &tap_hi, s->q, s->w, s->stride_w, t - s->pad_left);
        lo = tap_lo > lo ? tap_lo : lo;
        hi = tap_hi < hi ? tap_hi : hi;
    }
    if (hi < lo)
        hi = lo;

    for (int p = 0; p < s->p; p++) {
        float *row = y + (size_t)p * s->q;
        int top = p * s->stride_h - s->pad_top;
        if (fast && top >= 0 && top + 2 < s->h) {
            depthwise_row_3x3(row, x + (size_t)top * s->w, w, bias, p, lo, hi, x, s);
            continue;
        }
        for (int q = 0; q < s->q; q++)
            row[q] = bias;
        for (int r = 0; r < s->r; r++) {
            int ih = top + r * s->dilation_h;
            if (ih >= 0 && ih < s->h)
                row_correlate(row, s->q, x + (size_t)ih * s->w, s->w, w + r * s->s, 1, s->s,
                              s->stride_w, s->dilation_w, s->pad_left);
        }
    }
}

/* xrow: (W) += wv * drow[q] at column q*sw - pl + t*dw, for q in [from, to)
 * where that column is inside the row. */
static void row_scatter_tap(float *xrow, const float *drow, float wv, int from, int to, int t,
                            const conv2d_shape *s)
{
    int offset = t * s->dilation_w - s->pad_left, lo, hi;
    valid_output_range(&lo, &hi, s->q, s->w, s->stride_w, offset);
    lo = lo > from ? lo : from;
    hi = hi < to ? hi : to;
    for (int q = lo; q < hi; q++)
        xrow[q * s->stride_w + offset] += wv * drow[q];
}

/*
 * xrow: (W) += the transposed row of drow: (Q) for three taps w[0..2] of
 * stride 2 and no dilation. Column 2q - pl gathers w0*dy[q] + w2*dy[q-1] and
 * column 2q - pl + 1 gets w1*dy[q], so each q writes its own two cells and
 * the loop vectorises. Outputs whose cells leave the row scatter tap by tap.
 */
CONV_CLONES
static void row_transpose_3tap_s2(float *restrict xrow, const float *restrict drow,
                                  const float *w, const conv2d_shape *s)
{
    int pad = s->pad_left, first = (pad + 1) / 2 > 1 ? (pad + 1) / 2 : 1;
    int last = s->w - 2 + pad < 0 ? 0 : (s->w - 2 + pad) / 2 + 1;
    last = last < s->q ? last : s->q;
    if (first >= last) {
        for (int t = 0; t < 3; t++)
            row_scatter_tap(xrow, drow, w[t], 0, s->q, t, s);
        return;
    }
    float w0 = w[0], w1 = w[1], w2 = w[2];
    int q = first;
    for (; q + LANES <= last; q += LANES)
        for (int l = 0; l < LANES; l++) {
            xrow[2 * (q + l) - pad] += w0 * drow[q + l] + w2 * drow[q + l - 1];
            xrow[2 * (q + l) - pad + 1] += w1 * drow[q + l];
        }
    for (; q < last; q++) {
        xrow[2 * q - pad] += w0 * drow[q] + w2 * drow[q - 1];
        xrow[2 * q - pad + 1] += w1 * drow[q];
    }

    /* The loop covered taps 0 and 1 of q in [first, last) and tap 2 of q in
     * [first - 1, last - 1); the rest scatter. */
    for (int t = 0; t < 2; t++) {
        row_scatter_tap(xrow, drow, w[t], 0, first, t, s);
        row_scatter_tap(xrow, drow, w[t], last, s->q, t, s);
    }
    row_scatter_tap(xrow, drow, w2, 0, first - 1, 2, s);
    row_scatter_tap(xrow, drow, w2, last - 1, s->q, 2, s);
}

/* dx: (H, W) += the transposed convolution of dy: (P, Q) with w: (R, S). With
 * stride 1, input column j reads dy[j + pl - t*dw]: a correlation with the
 * taps reversed. Wider strides scatter tap by tap. */
static void depthwise_plane_backward_input(float *dx, const float *dy, const float *w,
                                           const conv2d_shape *s)
{
    int back_pad = (s->s - 1) * s->dilation_w - s->pad_left;
    int three_tap_s2 = s->s == 3 && s->stride_w == 2 && s->dilation_w == 1;
    for (int p = 0; p < s->p; p++) {
        const float *drow = dy + (size_t)p * s->q;
        for (int r = 0; r < s->r; r++) {
            int ih = p * s->stride_h - s->pad_top + r * s->dilation_h;
            if (ih < 0 || ih >= s->h)
                continue;
            float *xrow = dx + (size_t)ih * s->w;
            if (s->stride_w == 1)
                row_correlate(xrow, s->w, drow, s->q, w + r * s->s + s->s - 1, -1, s->s, 1,
                              s->dilation_w, back_pad);
            else if (three_tap_s2)
                row_transpose_3tap_s2(xrow, drow, w + r * s->s, s);
            else
                for (int t = 0; t < s->s; t++)
                    row_scatter_tap(xrow, drow, w[r * s->s + t], 0, s->q, t, s);
        }
    }
}

/* Returns sum_{p,q} dy[p,q] * x[p*sh - pt + r*dh, q*sw - pl + t*dw] for one
 * tap of one plane, summed in eight float lanes so the loop vectorises
 * without reassociating a single sum. */
CONV_CLONES
static double depthwise_tap_gradient(const float *dy, const float *x, int r, int t,
                                     const conv2d_shape *s)
{
    int offset = t * s->dilation_w - s->pad_left, stride = s->stride_w, lo, hi;
    valid_output_range(&lo, &hi, s->q, s->w, stride, offset);
    float lane[LANES] = {0};
    for (int p = 0; p < s->p && lo < hi; p++) {
        int ih = p * s->stride_h - s->pad_top + r * s->dilation_h;
        if (ih < 0 || ih >= s->h)
            continue;
        const float *a = dy + (size_t)p * s->q + lo;
        const float *b = x + (size_t)ih * s->w + offset + (size_t)lo * stride;
        int n = hi - lo, o = 0;
        if (stride == 1)
            for (; o + LANES <= n; o += LANES)
                for (int l = 0; l < LANES; l++)
                    lane[l] += a[o + l] * b[o + l];
        else if (stride == 2)
            for (; o + LANES <= n; o += LANES)
                for (int l = 0; l < LANES; l++)
                    lane[l] += a[o + l] * b[2 * (o + l)];
        for (; o < n; o++)
            lane[o % LANES] += a[o] * b[(size_t)o * stride];
    }
    return ((lane[0] + lane[1]) + (lane[2] + lane[3])) +
           ((lane[4] + lane[5]) + (lane[6] + lane[7]));
}

/* The geometry of the stride-1 3x3 input gradient as a forward pass over
 * dy: (P, Q) into (H, W) with padding 2 - pad. */
static void depthwise_back_shape(conv2d_shape *back, const conv2d_shape *s)
{
    *back = *s;
    back->h = s->p;
    back->w = s->q;
    back->p = s->h;
    back->q = s->w;
    back->pad_top = 2 - s->pad_top;
    back->pad_left = 2 - s->pad_left;
    back->pad_bottom = s->h + 2 - s->p - back->pad_top;
    back->pad_right = s->w + 2 - s->q - back->pad_left;
}

/* dx: (H, W) += the input gradient of one plane for a 3x3 kernel of
 * stride 1, computed as the forward pass over dy: (P, Q) with the kernel
 * flipped (depthwise_back_shape), into the scratch plane tmp: (H, W).
 * scratch: depthwise_scratch_new(back) or NULL. */
static void depthwise_plane_backward_input_3x3(float *dx, float *tmp, float *scratch,
                                               const float *dy, const float *w,
                                               const conv2d_shape *back)
{
    float flipped[9];
    for (int i = 0; i < 9; i++)
        flipped[i] = w[8 - i];
    if (scratch)
        depthwise_plane_forward_padded(tmp, dy, flipped, 0.0f, back, scratch);
    else
        depthwise_plane_forward(tmp, dy, flipped, 0.0f, back);
    add_floats(dx, tmp, (size_t)back->p * back->q);
}

/* sums[r*3 + t] += the gradient of tap (r, t) over one plane pair, for
 * depthwise_is_3x3 geometries: the three taps of a kernel row share each pass
 * over dy: (P, Q) and x: (H, W), in eight float lanes per tap. */
CONV_CLONES
static void depthwise_plane_gradient_3x3(double *sums, const float *dy, const float *x,
                                         const conv2d_shape *s)
{
    int stride = s->stride_w, pad = s->pad_left, lo = 0, hi = s->q, tap_lo[3], tap_hi[3];
    for (int t = 0; t < 3; t++) {
        valid_output_range(&tap_lo[t], &tap_hi[t], s->q, s->w, stride, t - pad);
        lo = tap_lo[t] > lo ? tap_lo[t] : lo;
        hi = tap_hi[t] < hi ? tap_hi[t] : hi;
    }
    int blocks_end = hi - lo >= LANES ? lo + (hi - lo) / LANES * LANES : lo;
    for (int r = 0; r < 3; r++) {
        float acc0[LANES] = {0}, acc1[LANES] = {0}, acc2[LANES] = {0};
        for (int p = 0; p < s->p; p++) {
            int ih = p * s->stride_h - s->pad_top + r;
            if (ih < 0 || ih >= s->h)
                continue;
            const float *a = dy + (size_t)p * s->q, *b = x + (size_t)ih * s->w;
            for (int q = lo; q < blocks_end && stride == 1; q += LANES)
                for (int l = 0; l < LANES; l++) {
                    acc0[l] += a[q + l] * b[q + l - pad];
                    acc1[l] += a[q + l] * b[q + l - pad + 1];
                    acc2[l] += a[q + l] * b[q + l - pad + 2];
                }
            for (int q = lo; q < blocks_end && stride == 2; q += LANES)
                for (int l = 0; l < LANES; l++) {
                    acc0[l] += a[q + l] * b[2 * (q + l) - pad];
                    acc1[l] += a[q + l] * b[2 * (q + l) - pad + 1];
                    acc2[l] += a[q + l] * b[2 * (q + l) - pad + 2];
                }
            /* Cells outside the blocks, tap by tap: [tap_lo, lo) and [blocks_end, tap_hi). */
            float *accs[3] = {acc0, acc1, acc2};
            for (int t = 0; t < 3; t++) {
                float *acc = accs[t];
                for (int q = tap_lo[t]; q < lo; q++)
                    acc[q % LANES] += a[q] * b[q * stride + t - pad];
                for (int q = blocks_end; q < tap_hi[t]; q++)
                    acc[q % LANES] += a[q] * b[q * stride + t - pad];
            }
        }
        float *acc[3] = {acc0, acc1, acc2};
        for (int t = 0; t < 3; t++)
            sums[r * 3 + t] += ((acc[t][0] + acc[t][1]) + (acc[t][2] + acc[t][3])) +
                               ((acc[t][4] + acc[t][5]) + (acc[t][6] + acc[t][7]));
    }
}

/* sums[r*3 + t] += the gradient of tap (r, t) over one plane pair, for
 * depthwise_padded_fits geometries: dy: (P, Q) and the zero-bordered copy
 * xp: (HP, WP) of the input plane, so every cell takes the blocked loop (the
 * border adds products with zero). Eight float lanes per tap. */
CONV_CLONES
static void depthwise_plane_gradient_padded(double *sums, const float *restrict dy,
                                            const float *restrict xp, int wp,
                                            const conv2d_shape *s)
{
    int stride = s->stride_w, blocks = s->q / LANES * LANES;
    for (int r = 0; r < 3; r++) {
        float acc0[LANES] = {0}, acc1[LANES] = {0}, acc2[LANES] = {0};
        for (int p = 0; p < s->p; p++) {
            const float *a = dy + (size_t)p * s->q;
            const float *b = xp + ((size_t)p * s->stride_h + r) * wp;
            int q = 0;
            if (stride == 1)
                for (; q < blocks; q += LANES)
                    for (int l = 0; l < LANES; l++) {
                        acc0[l] += a[q + l] * b[q + l];
                        acc1[l] += a[q + l] * b[q + l + 1];
                        acc2[l] += a[q + l] * b[q + l + 2];
                    }
            else
                for (; q < blocks; q += LANES)
                    for (int l = 0; l < LANES; l++) {
                        acc0[l] += a[q + l] * b[2 * (q + l)];
                        acc1[l] += a[q + l] * b[2 * (q + l) + 1];
                        acc2[l] += a[q + l] * b[2 * (q + l) + 2];
                    }
            for (; q < s->q; q++) {
                acc0[q % LANES] += a[q] * b[q * stride];
                acc1[q % LANES] += a[q] * b[q * stride + 1];
                acc2[q % LANES] += a[q] * b[q * stride + 2];
            }
        }
        float *acc[3] = {acc0, acc1, acc2};
        for (int t = 0; t < 3; t++)
            sums[r * 3 + t] += ((acc[t][0] + acc[t][1]) + (acc[t][2] + acc[t][3])) +
                               ((acc[t][4] + acc[t][5]) + (acc[t][6] + acc[t][7]));
    }
}

/* Taps whose double sums one pass over the batch keeps on the stack. */
#define DEPTHWISE_TAP_BLOCK 64

/* dwk: (R, S) += the gradient of output channel k over the batch.
 * dy: plane k of image 0 of (N, K, P, Q)  x: its input plane of (N, C, H, W).
 * Images go outside the taps so both planes stay in cache for every tap.
 * scratch: depthwise_scratch_new(s) or NULL. */
static void depthwise_weight_gradient(float *dwk, const float *dy, const float *x,
                                      const conv2d_shape *s, float *scratch)
{
    int taps = s->r * s->s;
    size_t dy_step = (size_t)s->k * s->p * s->q, x_step = (size_t)s->c * s->h * s->w;
    if (scratch) {
        int hp, wp;
        depthwise_padded_size(&hp, &wp, s);
        double sum[9] = {0};
        for (int n = 0; n < s->n; n++) {
            const float *xn = x + n * x_step;
            for (int i = 0; i < s->h; i++)
                memcpy(scratch + (size_t)(i + s->pad_top) * wp + s->pad_left,
                       xn + (size_t)i * s->w, (size_t)s->w * sizeof *xn);
            depthwise_plane_gradient_padded(sum, dy + n * dy_step, scratch, wp, s);
        }
        for (int j = 0; j < 9; j++)
            dwk[j] += (float)sum[j];
        return;
    }
    if (depthwise_is_3x3(s)) {
        double sum[9] = {0};
        for (int n = 0; n < s->n; n++)
            depthwise_plane_gradient_3x3(sum, dy + n * dy_step, x + n * x_step, s);
        for (int j = 0; j < 9; j++)
            dwk[j] += (float)sum[j];
        return;
    }
    for (int first = 0; first < taps; first += DEPTHWISE_TAP_BLOCK) {
        int count = taps - first < DEPTHWISE_TAP_BLOCK ? taps - first : DEPTHWISE_TAP_BLOCK;
        double sum[DEPTHWISE_TAP_BLOCK] = {0};
        for (int n = 0; n < s->n; n++)
            for (int j = 0; j < count; j++)
                sum[j] += depthwise_tap_gradient(dy + n * dy_step, x + n * x_step,
                                                 (first + j) / s->s, (first + j) % s->s, s);
        for (int j = 0; j < count; j++)
            dwk[first + j] += (float)sum[j];
    }
}

/* x: (N, C, H, W)  w: (K, 1, R, S)  y: (N, K, P, Q), K = m*C */
static void depthwise_forward(float *y, const float *x, const float *w, const float *b,
                              const conv2d_shape *s)
{
    int m = s->k / s->c;
    size_t hw = (size_t)s->h * s->w, pq = (size_t)s->p * s->q, rs = (size_t)s->r * s->s;
    int planes = s->n * s->k;
#pragma omp parallel if (planes * pq * rs > PARALLEL_MIN_WORK)
    {
        float *scratch = depthwise_scratch_new(s);
#pragma omp for schedule(dynamic, 16)
        for (int i = 0; i < planes; i++) {
            int n = i / s->k, k = i % s->k;
            const float *xc = x + ((size_t)n * s->c + k / m) * hw;
            float bias = b ? b[k] : 0.0f;
            if (scratch)
                depthwise_plane_forward_padded(y + (size_t)i * pq, xc, w + k * rs, bias, s,
                                               scratch);
            else
                depthwise_plane_forward(y + (size_t)i * pq, xc, w + k * rs, bias, s);
        }
        free(scratch);
    }
}

/* dy: (N, K, P, Q)  dx: (N, C, H, W)  dw: (K, 1, R, S)
 * The loop runs in parallel over input channels, so the m output channels
 * that read one input channel never race on dx. Without the scratch planes
 * (an allocation failed) the row path runs. */
static void depthwise_backward(float *dx, float *dw, const float *dy, const float *x,
                               const float *w, const conv2d_shape *s)
{
    int m = s->k / s->c, flip = dx && depthwise_is_3x3(s) && s->stride_w == 1;
    size_t hw = (size_t)s->h * s->w, pq = (size_t)s->p * s->q, rs = (size_t)s->r * s->s;
    conv2d_shape back;
    depthwise_back_shape(&back, s);
#pragma omp parallel if (s->n * s->k * pq > PARALLEL_MIN_WORK)
    {
        float *tmp = flip ? malloc(hw * sizeof *tmp) : NULL;
        float *scratch = tmp ? depthwise_scratch_new(&back) : NULL;
        float *x_scratch = dw ? depthwise_scratch_new(s) : NULL;
#pragma omp for schedule(dynamic, 1)
        for (int c = 0; c < s->c; c++)
            for (int k = c * m; k < (c + 1) * m; k++) {
                for (int n = 0; dx && n < s->n; n++) {
                    float *dx_plane = dx + ((size_t)n * s->c + c) * hw;
                    const float *dy_plane = dy + ((size_t)n * s->k + k) * pq;
                    if (tmp)
                        depthwise_plane_backward_input_3x3(dx_plane, tmp, scratch, dy_plane,
                                                           w + k * rs, &back);
                    else
                        depthwise_plane_backward_input(dx_plane, dy_plane, w + k * rs, s);
                }
                if (dw)
                    depthwise_weight_gradient(dw + k * rs, dy + (size_t)k * pq,
                                              x + (size_t)c * hw, s, x_scratch);
            }
        free(x_scratch);
        free(scratch);
        free(tmp);
    }
}

/* ---- conv2d: im2col + sgemm ---------------------------------------------------- */

/* Column-buffer budget in floats (1 MiB): a tile of that size stays in the
 * L2 cache between im2col and the sgemm that reads it. */
#define CONV_TILE_FLOATS 262144

/* Output rows per im2col tile: as many as fit the budget, at least one. */
static int conv_tile_rows(const conv2d_shape *s)
{
    size_t depth = (size_t)(s->c / s->groups) * s->r * s->s;
    size_t rows = CONV_TILE_FLOATS / (depth * (size_t)s->q);
    if (rows < 1)
        rows = 1;
    return rows < (size_t)s->p ? (int)rows : s->p;
}

/*
 * col: (CG*R*S, T) with T = (p1 - p0) * Q, the columns of output rows
 * [p0, p1) for x: (CG, H, W) of one image and group. Row (c, r, t) of col
 * contains x[c, p*sh - pt + r*dh, q*sw - pl + t*dw], 0 where that is padding.
 */
static void im2col_rows(float *col, const float *x, int cg, int p0, int p1,
                        const conv2d_shape *s)
{
    int rows = cg * s->r * s->s;
    size_t width = (size_t)(p1 - p0) * s->q, hw = (size_t)s->h * s->w;
    for (int row = 0; row < rows; row++) {
        int t = row % s->s, r = row / s->s % s->r, c = row / (s->r * s->s);
        int offset = t * s->dilation_w - s->pad_left, lo, hi;
        valid_output_range(&lo, &hi, s->q, s->w, s->stride_w, offset);
        for (int p = p0; p < p1; p++) {
            float *dst = col + (size_t)row * width + (size_t)(p - p0) * s->q;
            int ih = p * s->stride_h - s->pad_top + r * s->dilation_h;
            if (ih < 0 || ih >= s->h) {
                memset(dst, 0, (size_t)s->q * sizeof *dst);
                continue;
            }
            const float *src = x + c * hw + (size_t)ih * s->w;
            memset(dst, 0, (size_t)lo * sizeof *dst);
            if (s->stride_w == 1)
                memcpy(dst + lo, src + lo + offset, (size_t)(hi - lo) * sizeof *dst);
            else
                for (int q = lo; q < hi; q++)
                    dst[q] = src[q * s->stride_w + offset];
            memset(dst + hi, 0, (size_t)(s->q - hi) * sizeof *dst);
        }
    }
}

/* dx: (CG, H, W) += the cells of col (laid out as im2col_rows leaves it for
 * output rows [p0, p1)) that im2col_rows read from x. */
static void col2im_rows_add(float *dx, const float *col, int cg, int p0, int p1,
                            const conv2d_shape *s)
{
    int rows = cg * s->r * s->s;
    size_t width = (size_t)(p1 - p0) * s->q, hw = (size_t)s->h * s->w;
    for (int row = 0; row < rows; row++) {
        int t = row % s->s, r = row / s->s % s->r, c = row / (s->r * s->s);
        int offset = t * s->dilation_w - s->pad_left, lo, hi;
        valid_output_range(&lo, &hi, s->q, s->w, s->stride_w, offset);
        for (int p = p0; p < p1; p++) {
            int ih = p * s->stride_h - s->pad_top + r * s->dilation_h;
            if (ih < 0 || ih >= s->h)
                continue;
            const float *src = col + (size_t)row * width + (size_t)(p - p0) * s->q;
            float *dst = dx + c * hw + (size_t)ih * s->w;
            if (s->stride_w == 1)
                for (int q = lo; q < hi; q++)
                    dst[q + offset] += src[q];
            else
                for (int q = lo; q < hi; q++)
                    dst[q * s->stride_w + offset] += src[q];
        }
    }
}

/* One image and group of the forward pass. xg: (CG, H, W)  wg: (KG, CG*R*S)
 * bg: (KG) or NULL  yg: (KG, P, Q)  work: the column tile */
static void conv_group_forward(float *yg, const float *xg, const float *wg, const float *bg,
                               conv_path path, const conv2d_shape *s, float *work)
{
    int cg = s->c / s->groups, kg = s->k / s->groups, depth = cg * s->r * s->s;
    int pq = s->p * s->q;
    if (bg)
        fill_bias(yg, bg, kg, (size_t)pq);
    if (path == CONV_PATH_POINTWISE) {
        /* yg (KG, PQ) = wg (KG, CG) * xg (CG, PQ) [+ yg] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, kg, pq, depth, 1.0f, wg, depth,
                    xg, pq, bg ? 1.0f : 0.0f, yg, pq);
        return;
    }
    int tile = conv_tile_rows(s);
    for (int p0 = 0; p0 < s->p; p0 += tile) {
        int p1 = p0 + tile < s->p ? p0 + tile : s->p, width = (p1 - p0) * s->q;
        im2col_rows(work, xg, cg, p0, p1, s);
        /* yg[:, tile] (KG, T) = wg (KG, CG*R*S) * col (CG*R*S, T) [+ yg] */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, kg, width, depth, 1.0f, wg,
                    depth, work, width, bg ? 1.0f : 0.0f, yg + (size_t)p0 * s->q, pq);
    }
}

/* One image and group of the backward pass; dxg and dwg may be NULL.
 * dyg: (KG, P, Q)  xg, dxg: (CG, H, W)  wg, dwg: (KG, CG*R*S) */
static void conv_group_backward(float *dxg, float *dwg, const float *dyg, const float *xg,
                                const float *wg, conv_path path, const conv2d_shape *s,
                                float *work)
{
    int cg = s->c / s->groups, kg = s->k / s->groups, depth = cg * s->r * s->s;
    int pq = s->p * s->q;
    if (path == CONV_PATH_POINTWISE) {
        /* dwg (KG, CG) += dyg (KG, PQ) * xg^T (PQ, CG); dxg (CG, PQ) += wg^T * dyg */
        if (dwg)
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, kg, depth, pq, 1.0f, dyg, pq,
                        xg, pq, 1.0f, dwg, depth);
        if (dxg)
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, depth, pq, kg, 1.0f, wg, depth,
                        dyg, pq, 1.0f, dxg, pq);
        return;
    }
    int tile = conv_tile_rows(s);
    for (int p0 = 0; p0 < s->p; p0 += tile) {
        int p1 = p0 + tile < s->p ? p0 + tile : s->p, width = (p1 - p0) * s->q;
        const float *dy_tile = dyg + (size_t)p0 * s->q;
        if (dwg) {
            /* dwg (KG, CG*R*S) += dy_tile (KG, T) * col^T (T, CG*R*S) */
            im2col_rows(work, xg, cg, p0, p1, s);
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, kg, depth, width, 1.0f,
                        dy_tile, pq, work, width, 1.0f, dwg, depth);
        }
        if (dxg) {
            /* dcol (CG*R*S, T) = wg^T (CG*R*S, KG) * dy_tile (KG, T), then col2im */
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, depth, width, kg, 1.0f, wg,
                        depth, dy_tile, pq, 0.0f, work, width);
            col2im_rows_add(dxg, work, cg, p0, p1, s);
        }
    }
}

/* ---- conv2d: threads over images ------------------------------------------------ */

/* Threads that split the images of one call: one per image up to
 * omp_get_max_threads(), and 1 inside an enclosing OpenMP region. */
static int conv_threads(const conv2d_shape *s)
{
    if (omp_in_parallel())
        return 1;
    int t = omp_get_max_threads();
    return t < s->n ? t : s->n;
}

/*
 * While threads > 1, each thread calls sgemm on its own images, so OpenBLAS
 * must not start its own threads as well: two kinds of workers on the same
 * cores slow each other down. Returns the OpenBLAS thread count to restore.
 */
static int blas_serial_begin(int threads)
{
    int previous = openblas_get_num_threads();
    if (threads > 1 && previous != 1)
        openblas_set_num_threads(1);
    return previous;
}

static void blas_serial_end(int threads, int previous)
{
    if (threads > 1 && previous != 1)
        openblas_set_num_threads(previous);
}

/* Floats of one thread's column tile: CG*R*S rows, conv_tile_rows(s) * Q columns. */
static size_t conv_tile_floats(const conv2d_shape *s)
{
    if (conv_path_select(s) != CONV_PATH_IM2COL)
        return 0;
    return (size_t)(s->c / s->groups) * s->r * s->s * (size_t)conv_tile_rows(s) * s->q;
}

/* Image chunks per thread in the backward pass: more than one, so a thread
 * that other load delays leaves its later chunks to the others. */
#define CONV_CHUNKS_PER_THREAD 2

/* Chunks of images in the backward pass, each with its own dW partial sum. */
static int conv_chunks(const conv2d_shape *s, int threads)
{
    int chunks = threads > 1 ? threads * CONV_CHUNKS_PER_THREAD : 1;
    return chunks < s->n ? chunks : s->n;
}

/* One column tile per thread, then a weight-gradient partial sum
 * (K, C/G, R, S) for every backward chunk but the first. The size depends
 * on omp_get_max_threads(), which must not grow between this call and the
 * kernels that use the workspace. */
size_t conv2d_workspace_floats(const conv2d_shape *s)
{
    if (conv_path_select(s) == CONV_PATH_DEPTHWISE)
        return 0;
    int threads = conv_threads(s);
    size_t weights = (size_t)s->k * (size_t)(s->c / s->groups) * s->r * s->s;
    return (size_t)threads * conv_tile_floats(s) +
           (size_t)(conv_chunks(s, threads) - 1) * weights;
}

/* x: (N, C, H, W)  w: (K, C/G, R, S)  b: (K) or NULL  y: (N, K, P, Q)
 * work: conv2d_workspace_floats(s). Threads take the next image as they
 * finish one, so a thread that other load delays holds up the others less;
 * each image's result does not depend on the thread. */
void conv2d_forward(float *y, const float *x, const float *w, const float *b,
                    const conv2d_shape *s, float *work)
{
    conv_path path = conv_path_select(s);
    if (path == CONV_PATH_DEPTHWISE) {
        depthwise_forward(y, x, w, b, s);
        return;
    }

    int cg = s->c / s->groups, kg = s->k / s->groups, threads = conv_threads(s);
    size_t hw = (size_t)s->h * s->w, pq = (size_t)s->p * s->q;
    size_t w_group = (size_t)kg * cg * s->r * s->s, tile = conv_tile_floats(s);
    int blas = blas_serial_begin(threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *tile_t = work + (size_t)omp_get_thread_num() * tile;
#pragma omp for schedule(dynamic, 1)
        for (int n = 0; n < s->n; n++)
            for (int g = 0; g < s->groups; g++)
                conv_group_forward(y + ((size_t)n * s->k + (size_t)g * kg) * pq,
                                   x + ((size_t)n * s->c + (size_t)g * cg) * hw,
                                   w + g * w_group, b ? b + g * kg : NULL, path, s, tile_t);
    }
    blas_serial_end(threads, blas);
}

/* The images [n0, n1) of the backward pass; dw may be NULL, dx too. */
static void conv_images_backward(float *dx, float *dw, const float *dy, const float *x,
                                 const float *w, int n0, int n1, conv_path path,
                                 const conv2d_shape *s, float *work)
{
    int cg = s->c / s->groups, kg = s->k / s->groups;
    size_t pq = (size_t)s->p * s->q, hw = (size_t)s->h * s->w;
    size_t w_group = (size_t)kg * cg * s->r * s->s;
    for (int n = n0; n < n1; n++)
        for (int g = 0; g < s->groups; g++) {
            size_t x_at = ((size_t)n * s->c + (size_t)g * cg) * hw;
            conv_group_backward(dx ? dx + x_at : NULL, dw ? dw + g * w_group : NULL,
                                dy + ((size_t)n * s->k + (size_t)g * kg) * pq, x + x_at,
                                w + g * w_group, path, s, work);
        }
}

/* dy: (N, K, P, Q)  x: (N, C, H, W)  w: (K, C/G, R, S)
 * dx: (N, C, H, W)  dw: (K, C/G, R, S)  db: (K), each accumulated, NULL skipped
 * work: conv2d_workspace_floats(s). The images form conv_chunks fixed chunks
 * that threads take as they become free; the first chunk adds into dw, the
 * others into zeroed partial sums that are added to dw in chunk order
 * afterwards, so results do not depend on which thread ran what. */
void conv2d_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                     const float *w, const conv2d_shape *s, float *work)
{
    size_t pq = (size_t)s->p * s->q;
    if (db)
        conv_bias_backward(db, dy, s->n, s->k, pq);
    conv_path path = conv_path_select(s);
    if (path == CONV_PATH_DEPTHWISE) {
        depthwise_backward(dx, dw, dy, x, w, s);
        return;
    }
    if (!dx && !dw)
        return;

    int threads = conv_threads(s), chunks = conv_chunks(s, threads);
    size_t tile = conv_tile_floats(s);
    size_t weights = (size_t)s->k * (size_t)(s->c / s->groups) * s->r * s->s;
    float *partials = work + (size_t)threads * tile;
    int blas = blas_serial_begin(threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float *tile_t = work + (size_t)omp_get_thread_num() * tile;
#pragma omp for schedule(dynamic, 1)
        for (int c = 0; c < chunks; c++) {
            float *dw_c = dw && c > 0 ? partials + (size_t)(c - 1) * weights : dw;
            if (dw_c && c > 0)
                memset(dw_c, 0, weights * sizeof *dw_c);
            conv_images_backward(dx, dw_c, dy, x, w, s->n * c / chunks, s->n * (c + 1) / chunks,
                                 path, s, tile_t);
        }
    }
    blas_serial_end(threads, blas);
    for (int c = 1; dw && c < chunks; c++)
        add_floats(dw, partials + (size_t)(c - 1) * weights, weights);
}

/* ---- conv2d: naive twins (the oracle in tests) ------------------------------------ */

/* Returns x[n, c, ih, iw] or 0 outside the input. */
static double conv_input_at(const float *x, const conv2d_shape *s, int n, int c, int ih, int iw)
{
    if (ih < 0 || ih >= s->h || iw < 0 || iw >= s->w)
        return 0.0;
    return x[(((size_t)n * s->c + c) * s->h + ih) * s->w + iw];
}

/* Same operands as conv2d_forward; plain loops, double accumulation. */
void conv2d_forward_naive(float *y, const float *x, const float *w, const float *b,
                          const conv2d_shape *s)
{
    int cg = s->c / s->groups, kg = s->k / s->groups;
    for (int n = 0; n < s->n; n++)
        for (int k = 0; k < s->k; k++)
            for (int p = 0; p < s->p; p++)
                for (int q = 0; q < s->q; q++) {
                    double sum = b ? b[k] : 0.0;
                    for (int c = 0; c < cg; c++)
                        for (int r = 0; r < s->r; r++)
                            for (int t = 0; t < s->s; t++)
                                sum += w[(((size_t)k * cg + c) * s->r + r) * s->s + t] *
                                       conv_input_at(
                                           x, s, n, k / kg * cg + c,
                                           p * s->stride_h - s->pad_top + r * s->dilation_h,
                                           q * s->stride_w - s->pad_left + t * s->dilation_w);
                    y[(((size_t)n * s->k + k) * s->p + p) * s->q + q] = (float)sum;
                }
}

/* Output index o with o*stride + tap*dilation - pad = i, or -1 if there is none. */
static int conv_output_index(int i, int tap, int stride, int dilation, int pad, int out)
{
    int span = i + pad - tap * dilation;
    if (span < 0 || span % stride)
        return -1;
    return span / stride < out ? span / stride : -1;
}

/* dx[n, c, i, j] = sum over (k in group, r, t) of w * dy at the output that
 * reads input (i, j) through tap (r, t): a gather, unlike the fast scatter. */
static void conv_naive_backward_input(float *dx, const float *dy, const float *w,
                                      const conv2d_shape *s)
{
    int cg = s->c / s->groups, kg = s->k / s->groups;
    for (int n = 0; n < s->n; n++)
        for (int c = 0; c < s->c; c++)
            for (int i = 0; i < s->h; i++)
                for (int j = 0; j < s->w; j++) {
                    double sum = 0.0;
                    for (int k = c / cg * kg; k < (c / cg + 1) * kg; k++)
                        for (int r = 0; r < s->r; r++) {
                            int p = conv_output_index(i, r, s->stride_h, s->dilation_h,
                                                      s->pad_top, s->p);
                            for (int t = 0; p >= 0 && t < s->s; t++) {
                                int q = conv_output_index(j, t, s->stride_w, s->dilation_w,
                                                          s->pad_left, s->q);
                                if (q < 0)
                                    continue;
                                sum +=
                                    (double)
                                        w[(((size_t)k * cg + c % cg) * s->r + r) * s->s + t] *
                                    dy[(((size_t)n * s->k + k) * s->p + p) * s->q + q];
                            }
                        }
                    dx[(((size_t)n * s->c + c) * s->h + i) * s->w + j] += (float)sum;
                }
}

/* Same operands as conv2d_backward; plain loops, double accumulation. */
void conv2d_backward_naive(float *dx, float *dw, float *db, const float *dy, const float *x,
                           const float *w, const conv2d_shape *s)
{
    int cg = s->c / s->groups, kg = s->k / s->groups;
    size_t pq = (size_t)s->p * s->q;
    for (int k = 0; k < s->k; k++) {
        double bias_sum = 0.0;
        for (int n = 0; n < s->n; n++)
            for (size_t i = 0; i < pq; i++)
                bias_sum += dy[((size_t)n * s->k + k) * pq + i];
        if (db)
            db[k] += (float)bias_sum;
        for (int c = 0; dw && c < cg; c++)
            for (int r = 0; r < s->r; r++)
                for (int t = 0; t < s->s; t++) {
                    double sum = 0.0;
                    for (int n = 0; n < s->n; n++)
                        for (int p = 0; p < s->p; p++)
                            for (int q = 0; q < s->q; q++)
                                sum += dy[((size_t)n * s->k + k) * pq + (size_t)p * s->q + q] *
                                       conv_input_at(
                                           x, s, n, k / kg * cg + c,
                                           p * s->stride_h - s->pad_top + r * s->dilation_h,
                                           q * s->stride_w - s->pad_left + t * s->dilation_w);
                    dw[(((size_t)k * cg + c) * s->r + r) * s->s + t] += (float)sum;
                }
    }
    if (dx)
        conv_naive_backward_input(dx, dy, w, s);
}

/* ---- pooling ------------------------------------------------------------------------ */

top_status pool2d_shape_derive(pool2d_shape *s, top_error *err)
{
    long long in_dims[4] = {s->n, s->c, s->h, s->w};
    long long window_dims[2] = {s->r, s->s};
    top_status st = check_int_product("pool2d input", in_dims, 4, err);
    if (st == TOP_OK)
        st = check_int_product("pool2d window", window_dims, 2, err);
    if (st != TOP_OK)
        return st;
    if (s->stride_h < 1 || s->stride_w < 1)
        return top_error_set(err, TOP_ERR_INVALID, "pool2d stride (%d, %d) must be at least 1",
                             s->stride_h, s->stride_w);
    if (s->pad_top < 0 || s->pad_bottom < 0 || s->pad_left < 0 || s->pad_right < 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "pool2d padding (%d, %d, %d, %d) must not be negative", s->pad_top,
                             s->pad_bottom, s->pad_left, s->pad_right);
    if (s->count_include_pad != 0 && s->count_include_pad != 1)
        return top_error_set(err, TOP_ERR_INVALID, "pool2d count_include_pad %d must be 0 or 1",
                             s->count_include_pad);

    long long p = pooled_extent(s->h, s->pad_top, s->pad_bottom, s->r, s->stride_h);
    long long q = pooled_extent(s->w, s->pad_left, s->pad_right, s->s, s->stride_w);
    if (p < 1 || q < 1)
        return top_error_set(err, TOP_ERR_SHAPE,
                             "pool2d window %dx%d is larger than the padded input %lldx%lld; "
                             "pad the input or use a smaller window",
                             s->r, s->s, (long long)s->h + s->pad_top + s->pad_bottom,
                             (long long)s->w + s->pad_left + s->pad_right);
    long long out_dims[4] = {s->n, s->c, p, q};
    st = check_int_product("pool2d output", out_dims, 4, err);
    if (st != TOP_OK)
        return st;
    s->p = (int)p;
    s->q = (int)q;
    return TOP_OK;
}

/* The in-bounds part [*i0, *i1) x [*j0, *j1) of the window of output (p, q). */
static void pool_window(int *i0, int *i1, int *j0, int *j1, int p, int q, const pool2d_shape *s)
{
    int top = p * s->stride_h - s->pad_top, left = q * s->stride_w - s->pad_left;
    *i0 = top > 0 ? top : 0;
    *i1 = top + s->r < s->h ? top + s->r : s->h;
    *j0 = left > 0 ? left : 0;
    *j1 = left + s->s < s->w ? left + s->s : s->w;
}

/* Returns the maximum of the window of (p, q) in x: (H, W), or 0 if the
 * window is all padding. A NaN wins, as in PyTorch, so NaNs propagate. The
 * selects compile to branch-free code, which random data would mispredict. */
static float maxpool_window_max(const float *x, int p, int q, const pool2d_shape *s)
{
    int i0, i1, j0, j1;
    pool_window(&i0, &i1, &j0, &j1, p, q, s);
    if (i0 >= i1 || j0 >= j1)
        return 0.0f;
    float best = -INFINITY;
    int nan_seen = 0;
    for (int i = i0; i < i1; i++)
        for (int j = j0; j < j1; j++) {
            float v = x[(size_t)i * s->w + j];
            best = v > best ? v : best;
            nan_seen |= isnan(v);
        }
    return nan_seen ? NAN : best;
}

/* Index in x: (H, W) of the first cell in row-major order that equals the
 * window maximum (the first NaN if there is one), or -1 if the window is
 * all padding. */
static long maxpool_argmax(const float *x, int p, int q, const pool2d_shape *s)
{
    int i0, i1, j0, j1;
    pool_window(&i0, &i1, &j0, &j1, p, q, s);
    if (i0 >= i1 || j0 >= j1)
        return -1;
    float best = maxpool_window_max(x, p, q, s);
    int best_is_nan = isnan(best);
    long found = -1;
    /* A reverse scan with masks instead of an early exit: the position of the
     * maximum is random, so a branch on it would mispredict. */
    for (int i = i1 - 1; i >= i0; i--)
        for (int j = j1 - 1; j >= j0; j--) {
            long at = (long)i * s->w + j;
            float v = x[at];
            long mask = -(long)((v == best) | (isnan(v) & best_is_nan));
            found = (at & mask) | (found & ~mask);
        }
    return found;
}

/* x: (N, C, H, W)  y: (N, C, P, Q) */
void maxpool2d_forward(float *y, const float *x, const pool2d_shape *s)
{
    int planes = s->n * s->c;
    size_t hw = (size_t)s->h * s->w, pq = (size_t)s->p * s->q;
#pragma omp parallel for schedule(static) if (planes * hw > PARALLEL_MIN_WORK)
    for (int i = 0; i < planes; i++)
        for (int p = 0; p < s->p; p++)
            for (int q = 0; q < s->q; q++) {
                y[i * pq + (size_t)p * s->q + q] = maxpool_window_max(x + i * hw, p, q, s);
            }
}

/* dy: (N, C, P, Q)  x: (N, C, H, W)  dx: (N, C, H, W) += dy at each window's argmax */
void maxpool2d_backward(float *dx, const float *dy, const float *x, const pool2d_shape *s)
{
    int planes = s->n * s->c;
    size_t hw = (size_t)s->h * s->w, pq = (size_t)s->p * s->q;
#pragma omp parallel for schedule(static) if (planes * hw > PARALLEL_MIN_WORK)
    for (int i = 0; i < planes; i++)
        for (int p = 0; p < s->p; p++)
            for (int q = 0; q < s->q; q++) {
                long at = maxpool_argmax(x + i * hw, p, q, s);
                if (at >= 0)
                    dx[i * hw + (size_t)at] += dy[i * pq + (size_t)p * s->q + q];
            }
}

/* Divisor of the window of (p, q): r*s, or the in-bounds count (0 if none). */
static int avgpool_divisor(int i0, int i1, int j0, int j1, const pool2d_shape *s)
{
    if (s->count_include_pad)
        return s->r * s->s;
    return i1 > i0 && j1 > j0 ? (i1 - i0) * (j1 - j0) : 0;
}

/* x: (N, C, H, W)  y: (N, C, P, Q); an all-padding window without
 * count_include_pad gives 0. */
void avgpool2d_forward(float *y, const float *x, const pool2d_shape *s)
{
    int planes = s->n * s->c;
    size_t hw = (size_t)s->h * s->w, pq = (size_t)s->p * s->q;
#pragma omp parallel for schedule(static) if (planes * hw > PARALLEL_MIN_WORK)
    for (int i = 0; i < planes; i++)
        for (int p = 0; p < s->p; p++)
            for (int q = 0; q < s->q; q++) {
                int i0, i1, j0, j1;
                pool_window(&i0, &i1, &j0, &j1, p, q, s);
                int divisor = avgpool_divisor(i0, i1, j0, j1, s);
                double sum = 0.0;
                for (int a = i0; a < i1; a++)
                    for (int b = j0; b < j1; b++)
                        sum += x[i * hw + (size_t)a * s->w + b];
                y[i * pq + (size_t)p * s->q + q] = divisor ? (float)(sum / divisor) : 0.0f;
            }
}

/* dy: (N, C, P, Q)  dx: (N, C, H, W) += dy / divisor over each window's real cells */
void avgpool2d_backward(float *dx, const float *dy, const pool2d_shape *s)
{
    int planes = s->n * s->c;
    size_t hw = (size_t)s->h * s->w, pq = (size_t)s->p * s->q;
#pragma omp parallel for schedule(static) if (planes * hw > PARALLEL_MIN_WORK)
    for (int i = 0; i < planes; i++)
        for (int p = 0; p < s->p; p++)
            for (int q = 0; q < s->q; q++) {
                int i0, i1, j0, j1;
                pool_window(&i0, &i1, &j0, &j1, p, q, s);
                int divisor = avgpool_divisor(i0, i1, j0, j1, s);
                if (!divisor)
                    continue;
                float share = dy[i * pq + (size_t)p * s->q + q] / (float)divisor;
                for (int a = i0; a < i1; a++)
                    for (int b = j0; b < j1; b++)
                        dx[i * hw + (size_t)a * s->w + b] += share;
            }
}

/* x: (N, C, HW)  y: (N, C); sums in double */
void global_avgpool_forward(float *y, const float *x, int n, int c, int hw)
{
    int planes = n * c;
#pragma omp parallel for schedule(static) if ((size_t)planes * hw > PARALLEL_MIN_WORK)
    for (int i = 0; i < planes; i++) {
        y[i] = (float)(sum_f64(x + (size_t)i * hw, (size_t)hw) / hw);
    }
}

/* dy: (N, C)  dx: (N, C, HW) += dy / HW */
void global_avgpool_backward(float *dx, const float *dy, int n, int c, int hw)
{
    int planes = n * c;
#pragma omp parallel for schedule(static) if ((size_t)planes * hw > PARALLEL_MIN_WORK)
    for (int i = 0; i < planes; i++) {
        float share = dy[i] / (float)hw;
#pragma omp simd
        for (int j = 0; j < hw; j++)
            dx[(size_t)i * hw + j] += share;
    }
}

/* ---- batch norm ----------------------------------------------------------------------- */

/* x: (N, C, HW)  gamma, beta, mean, var: (C)  y: (N, C, HW) */
void batchnorm_forward_inference(float *y, const float *x, const float *gamma,
                                 const float *beta, const float *mean, const float *var,
                                 float eps, int n, int c, int hw)
{
    int planes = n * c;
#pragma omp parallel for schedule(static) if ((size_t)planes * hw > PARALLEL_MIN_WORK)
    for (int i = 0; i < planes; i++) {
        int j = i % c;
        float scale = gamma[j] / sqrtf(var[j] + eps);
        float shift = beta[j] - mean[j] * scale;
        const float *xp = x + (size_t)i * hw;
        float *yp = y + (size_t)i * hw;
#pragma omp simd
        for (int t = 0; t < hw; t++)
            yp[t] = xp[t] * scale + shift;
    }
}

/* Mean and 1/sqrt(biased variance + eps) of channel j of x: (N, C, HW), two
 * passes in double. */
static void batchnorm_channel_stats(double *mean, double *invstd, const float *x, int j,
                                    float eps, int n, int c, int hw)
{
    double sum = 0.0;
    for (int i = 0; i < n; i++)
        sum += sum_f64(x + ((size_t)i * c + j) * hw, (size_t)hw);
    double count = (double)n * hw, mu = sum / count, sq = 0.0;
    for (int i = 0; i < n; i++)
        sq += sum_sq_dev_f64(x + ((size_t)i * c + j) * hw, (size_t)hw, mu);
    *mean = mu;
    *invstd = 1.0 / sqrt(sq / count + eps);
}

/* x: (N, C, HW)  gamma, beta: (C)  y: (N, C, HW)  save_mean, save_invstd: (C) */
void batchnorm_forward_train(float *y, float *save_mean, float *save_invstd, const float *x,
                             const float *gamma, const float *beta, float eps, int n, int c,
                             int hw)
{
#pragma omp parallel for schedule(static) if ((size_t)n * c * hw > PARALLEL_MIN_WORK)
    for (int j = 0; j < c; j++) {
        double mean, invstd;
        batchnorm_channel_stats(&mean, &invstd, x, j, eps, n, c, hw);
        save_mean[j] = (float)mean;
        save_invstd[j] = (float)invstd;
        float scale = (float)(gamma[j] * invstd),
              shift = (float)(beta[j] - mean * gamma[j] * invstd);
        for (int i = 0; i < n; i++) {
            const float *xp = x + ((size_t)i * c + j) * hw;
            float *yp = y + ((size_t)i * c + j) * hw;
#pragma omp simd
            for (int t = 0; t < hw; t++)
                yp[t] = xp[t] * scale + shift;
        }
    }
}

/* Sums over channel j of dy and of dy * (x - mean), in double. */
static void batchnorm_channel_sums(double *sum_dy, double *sum_dy_xc, const float *dy,
                                   const float *x, double mean, int j, int n, int c, int hw)
{
    double a = 0.0, b = 0.0;
    for (int i = 0; i < n; i++) {
        size_t base = ((size_t)i * c + j) * hw;
        double sum_a, sum_ab;
        sum_and_prod_dev_f64(&sum_a, &sum_ab, dy + base, x + base, (size_t)hw, mean);
        a += sum_a;
        b += sum_ab;
    }
    *sum_dy = a;
    *sum_dy_xc = b;
}

/* dy, x: (N, C, HW)  gamma, mean, var: (C)  dx: (N, C, HW)  dgamma, dbeta: (C);
 * dx += dy * gamma * invstd with mean and var held constant. */
void batchnorm_backward_inference(float *dx, float *dgamma, float *dbeta, const float *dy,
                                  const float *x, const float *gamma, const float *mean,
                                  const float *var, float eps, int n, int c, int hw)
{
#pragma omp parallel for schedule(static) if ((size_t)n * c * hw > PARALLEL_MIN_WORK)
    for (int j = 0; j < c; j++) {
        double invstd = 1.0 / sqrt((double)var[j] + eps), sum_dy, sum_dy_xc;
        if (dgamma || dbeta) {
            batchnorm_channel_sums(&sum_dy, &sum_dy_xc, dy, x, mean[j], j, n, c, hw);
            if (dgamma)
                dgamma[j] += (float)(sum_dy_xc * invstd);
            if (dbeta)
                dbeta[j] += (float)sum_dy;
        }
        float scale = (float)(gamma[j] * invstd);
        for (int i = 0; dx && i < n; i++) {
            const float *dyp = dy + ((size_t)i * c + j) * hw;
            float *dxp = dx + ((size_t)i * c + j) * hw;
#pragma omp simd
            for (int t = 0; t < hw; t++)
                dxp[t] += dyp[t] * scale;
        }
    }
}

/* dy, x: (N, C, HW)  gamma, save_mean, save_invstd: (C)  dx: (N, C, HW)
 * dgamma, dbeta: (C). With xhat = (x - mean) * invstd and M = N*HW:
 * dx += gamma * invstd * (dy - sum(dy)/M - xhat * sum(dy * xhat)/M). */
void batchnorm_backward_train(float *dx, float *dgamma, float *dbeta, const float *dy,
                              const float *x, const float *gamma, const float *save_mean,
                              const float *save_invstd, int n, int c, int hw)
{
#pragma omp parallel for schedule(static) if ((size_t)n * c * hw > PARALLEL_MIN_WORK)
    for (int j = 0; j < c; j++) {
        double mean = save_mean[j], invstd = save_invstd[j], sum_dy, sum_dy_xc;
        batchnorm_channel_sums(&sum_dy, &sum_dy_xc, dy, x, mean, j, n, c, hw);
        if (dgamma)
            dgamma[j] += (float)(sum_dy_xc * invstd);
        if (dbeta)
            dbeta[j] += (float)sum_dy;
        if (!dx)
            continue;
        double count = (double)n * hw, scale = gamma[j] * invstd;
        double proj = sum_dy_xc * invstd * invstd / count;
        float a = (float)scale, b = (float)(scale * proj), mean_dy = (float)(sum_dy / count);
        float mu = (float)mean;
        for (int i = 0; i < n; i++) {
            const float *dyp = dy + ((size_t)i * c + j) * hw,
                        *xp = x + ((size_t)i * c + j) * hw;
            float *dxp = dx + ((size_t)i * c + j) * hw;
#pragma omp simd
            for (int t = 0; t < hw; t++)
                dxp[t] += a * (dyp[t] - mean_dy) - b * (xp[t] - mu);
        }
    }
}

/* ---- concat, zero padding, layout ------------------------------------------------------- */

/* xs[i]: (N, channels[i], HW)  y: (N, sum channels, HW) */
void concat_forward(float *y, const float *const *xs, const int *channels, int count, int n,
                    int hw)
{
    size_t total = 0;
    for (int i = 0; i < count; i++)
        total += (size_t)channels[i];
    for (int b = 0; b < n; b++) {
        float *dst = y + (size_t)b * total * hw;
        for (int i = 0; i < count; i++) {
            size_t len = (size_t)channels[i] * hw;
            memcpy(dst, xs[i] + (size_t)b * len, len * sizeof *dst);
            dst += len;
        }
    }
}

/* dy: (N, sum channels, HW)  dxs[i]: (N, channels[i], HW) += its slice; NULL skipped */
void concat_backward(float *const *dxs, const float *dy, const int *channels, int count, int n,
                     int hw)
{
    size_t total = 0;
    for (int i = 0; i < count; i++)
        total += (size_t)channels[i];
    for (int b = 0; b < n; b++) {
        const float *src = dy + (size_t)b * total * hw;
        for (int i = 0; i < count; i++) {
            size_t len = (size_t)channels[i] * hw;
            if (dxs[i])
                add_floats(dxs[i] + (size_t)b * len, src, len);
            src += len;
        }
    }
}

/* x: (N, C, H, W)  y: (N, C, H + top + bottom, W + left + right) */
void zeropad2d_forward(float *y, const float *x, int n, int c, int h, int w, int top,
                       int bottom, int left, int right)
{
    int ph = h + top + bottom, pw = w + left + right, planes = n * c;
    size_t out_plane = (size_t)ph * pw;
    memset(y, 0, (size_t)planes * out_plane * sizeof *y);
    for (int i = 0; i < planes; i++)
        for (int a = 0; a < h; a++)
            memcpy(y + i * out_plane + (size_t)(a + top) * pw + left,
                   x + ((size_t)i * h + a) * w, (size_t)w * sizeof *y);
}

/* dy: (N, C, H + top + bottom, W + left + right)  dx: (N, C, H, W) += the interior */
void zeropad2d_backward(float *dx, const float *dy, int n, int c, int h, int w, int top,
                        int bottom, int left, int right)
{
    int ph = h + top + bottom, pw = w + left + right, planes = n * c;
    size_t out_plane = (size_t)ph * pw;
    for (int i = 0; i < planes; i++)
        for (int a = 0; a < h; a++) {
            const float *src = dy + i * out_plane + (size_t)(a + top) * pw + left;
            float *dst = dx + ((size_t)i * h + a) * w;
            for (int b = 0; b < w; b++)
                dst[b] += src[b];
        }
}

/* x: (N, C, H, W)  y: (N, H, W, C) */
void nchw_to_nhwc(float *y, const float *x, int n, int c, int h, int w)
{
    size_t hw = (size_t)h * w, plane = (size_t)c * hw;
    for (int b = 0; b < n; b++)
        for (size_t t = 0; t < hw; t++)
            for (int j = 0; j < c; j++)
                y[b * plane + t * c + j] = x[b * plane + (size_t)j * hw + t];
}

/* x: (N, H, W, C)  y: (N, C, H, W) */
void nhwc_to_nchw(float *y, const float *x, int n, int c, int h, int w)
{
    size_t hw = (size_t)h * w, plane = (size_t)c * hw;
    for (int b = 0; b < n; b++)
        for (int j = 0; j < c; j++)
            for (size_t t = 0; t < hw; t++)
                y[b * plane + (size_t)j * hw + t] = x[b * plane + t * c + j];
}
