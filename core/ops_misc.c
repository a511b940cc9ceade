/*
 * Non-convolutional kernels of ops.h: elementwise activations, softmax, add,
 * dropout, dense, layer norm, multi-head self-attention, ViT token assembly and
 * the cross-entropy loss, each with its backward pass.
 *
 * Formulas: gelu(x) = x * Phi(x) with Phi(x) = (1 + erf(x / sqrt 2)) / 2;
 * softmax(x)_j = exp(x_j - max x) / sum_i exp(x_i - max x); dense y = x w^T + b;
 * layernorm y = (x - mean) / sqrt(var + eps) * gamma + beta (biased variance);
 * attention = softmax(q k^T / sqrt(D/H)) v per head.
 *
 * Layout: fp32 row-major buffers. Dense and the attention projections call
 * OpenBLAS sgemm. The attention products call one sgemm per (sample, head) on
 * strided views of the qkv buffer, so no head is copied. Means, variances,
 * bias gradients and the log-sum-exp of the loss accumulate in double.
 *
 * Thread-safety: kernels touch only their arguments. Row loops use OpenMP.
 * Dense products of at least OPS_SPLIT_MIN_ROWS rows split into row blocks
 * (dx, y) or output-row blocks (dw), and the attention products into
 * (sample, head) pairs, over OpenMP threads that each call sgemm with
 * OpenBLAS on one thread (openblas_set_num_threads, restored afterwards), as
 * in ops_conv.c. The OpenBLAS thread count is process state, so a concurrent
 * caller's sgemm may run on one thread meanwhile. Smaller products keep the
 * OpenBLAS threads.
 * Sizes are not validated here (the graph does that, see ops.h).
 */
#include "ops.h"

#include <cblas.h>
#include <limits.h>
#include <math.h>
#include <omp.h>
#include <string.h>

/*
 * Shape legend:
 *   N  batch            T  tokens per sample      D  model width
 *   H  attention heads  DH = D / H head width     HW patches per sample
 *   ROWS  leading rows of a (ROWS, features) matrix
 *   K  classes of the loss
 */

/* Elementwise loops shorter than this run on one thread. */
#define OPS_PARALLEL_MIN 65536
/* Columns per block when bias-like gradients sum rows into double. */
#define OPS_COLUMN_BLOCK 64
/* Rows of one attention backward chunk; the workspace scales with it. */
#define MHSA_CHUNK_ROWS 1024
/* sgemm takes int sizes, so longer row counts are split into chunks. */
#define OPS_GEMM_MAX_ROWS ((size_t)1 << 30)

/* ---- elementwise ---------------------------------------------------------- */

/* x, y: (COUNT). NaN passes through, as in PyTorch. */
void relu_forward(float *y, const float *x, size_t count)
{
#pragma omp parallel for simd if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++)
        y[i] = x[i] < 0.0f ? 0.0f : x[i];
}

/* dx, dy, x: (COUNT). The gradient at x = 0 is 0, as in PyTorch. */
void relu_backward(float *dx, const float *dy, const float *x, size_t count)
{
    if (!dx)
        return;
#pragma omp parallel for simd if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++) {
        float g = dy[i]; /* loaded unconditionally, so the loop vectorises */
        dx[i] += x[i] > 0.0f ? g : 0.0f;
    }
}

/* x, y: (COUNT). NaN passes through, as in PyTorch. */
void relu6_forward(float *y, const float *x, size_t count)
{
#pragma omp parallel for simd if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++) {
        float v = x[i] < 0.0f ? 0.0f : x[i];
        y[i] = v > 6.0f ? 6.0f : v;
    }
}

/* dx, dy, x: (COUNT). The gradient is dy on the open interval (0, 6), else 0. */
void relu6_backward(float *dx, const float *dy, const float *x, size_t count)
{
    if (!dx)
        return;
#pragma omp parallel for simd if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++) {
        float v = x[i], g = dy[i];
        dx[i] += ((v > 0.0f) & (v < 6.0f)) ? g : 0.0f;
    }
}

#define OPS_SQRT1_2 0.70710678118654752440f
#define OPS_INV_SQRT_2PI 0.39894228040143267794f

/*
 * exp and erf in float without calls or float branches, so that the `omp simd`
 * loops that use them vectorise: glibc's expf and erff stay scalar without
 * fast-math, and under -ftrapping-math GCC does not if-convert float compares.
 */
static inline uint32_t float_bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof(u));
    return u;
}

static inline float bits_float(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof(f));
    return f;
}

/* exp(x) for x <= 0 (a positive x is read as -x). exp(x) = 2^n e^r with
 * n = round(x / ln 2), |r| <= ln 2 / 2 and e^r by its Taylor series to degree
 * 7. Against double exp on 2e7 points of [-87, 0] the max relative error is
 * 1.02e-7. |x| is clamped to 110 by integer operations that leave NaN as NaN,
 * and 2^n is applied as two factors, so results below FLT_MIN underflow to
 * subnormals and then 0. */
static inline float exp_nonpositive(float x)
{
    /* limit is the bits of 110.0f. Adding round_magic = 1.5 * 2^23 rounds a
     * float of magnitude below 2^22 to an integer. */
    const uint32_t bias = 0x007fffffu, limit = 0x42dc0000u;
    const float round_magic = 12582912.0f;

    /* Adding bias makes NaN magnitudes negative as int32, so min keeps them. */
    uint32_t mag = float_bits(x) & 0x7fffffffu;
    int32_t key = (int32_t)(mag + bias), cap = (int32_t)(limit + bias);
    key = key < cap ? key : cap;
    float xc = -bits_float((uint32_t)key - bias);

    float t = xc * 1.44269504088896341f + round_magic;
    float n = t - round_magic;
    float r = (xc - n * 0.693145751953125f) - n * 1.42860682030941723e-6f;
    float p = 1.0f / 5040.0f;
    p = p * r + 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;

    /* The low mantissa bits of t hold n; n >= -159 splits into two normal
     * powers of two. */
    int32_t ni = (int32_t)(float_bits(t) - float_bits(round_magic));
    int32_t n1 = ni / 2, n2 = ni - n1;
    float s1 = bits_float((uint32_t)(n1 + 127) << 23);
    float s2 = bits_float((uint32_t)(n2 + 127) << 23);
    return p * s1 * s2;
}

/* erf by Abramowitz and Stegun 7.1.26: absolute error below 1.5e-7 before
 * float rounding, of the order of float rounding of 1 + erf(x). */
static inline float erf_approx(float x)
{
    float ax = fabsf(x);
    float t = 1.0f / (1.0f + 0.3275911f * ax);
    float p = 1.061405429f;
    p = p * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    return copysignf(1.0f - p * t * exp_nonpositive(-ax * ax), x);
}

/* x, y: (COUNT) */
void gelu_forward(float *y, const float *x, size_t count)
{
#pragma omp parallel for simd if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++)
        y[i] = 0.5f * x[i] * (1.0f + erf_approx(x[i] * OPS_SQRT1_2));
}

/* dx, dy, x: (COUNT). d gelu / dx = Phi(x) + x * phi(x). */
void gelu_backward(float *dx, const float *dy, const float *x, size_t count)
{
    if (!dx)
        return;
#pragma omp parallel for simd if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++) {
        float cdf = 0.5f * (1.0f + erf_approx(x[i] * OPS_SQRT1_2));
        float pdf = OPS_INV_SQRT_2PI * exp_nonpositive(-0.5f * x[i] * x[i]);
        dx[i] += dy[i] * (cdf + x[i] * pdf);
    }
}

/* x, y: (COUNT). Both branches avoid exp of a large positive argument. */
void sigmoid_forward(float *y, const float *x, size_t count)
{
#pragma omp parallel for if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++) {
        if (x[i] >= 0.0f) {
            y[i] = 1.0f / (1.0f + expf(-x[i]));
        } else {
            float e = expf(x[i]);
            y[i] = e / (1.0f + e);
        }
    }
}

/* dx, dy, y: (COUNT) */
void sigmoid_backward(float *dx, const float *dy, const float *y, size_t count)
{
    if (!dx)
        return;
#pragma omp parallel for if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++)
        dx[i] += dy[i] * y[i] * (1.0f - y[i]);
}

/* ---- softmax ------------------------------------------------------------- */

/* x, y: (COLS); y may alias x. */
static void softmax_row(float *y, const float *x, int cols)
{
    float max = x[0];
    for (int j = 1; j < cols; j++)
        max = x[j] > max ? x[j] : max;

#pragma omp simd
    for (int j = 0; j < cols; j++)
        y[j] = exp_nonpositive(x[j] - max);
    double sum = 0.0;
#pragma omp simd reduction(+ : sum)
    for (int j = 0; j < cols; j++)
        sum += y[j];

    float inv = (float)(1.0 / sum);
#pragma omp simd
    for (int j = 0; j < cols; j++)
        y[j] *= inv;
}

/* x, y: (ROWS, COLS) */
void softmax_forward(float *y, const float *x, size_t rows, int cols)
{
    size_t c = (size_t)cols;
    if (cols <= 0)
        return;
#pragma omp parallel for if (rows * c >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t r = 0; r < rows; r++)
        softmax_row(y + r * c, x + r * c, cols);
}

/* dx, dy, y: (ROWS, COLS). dx_j += y_j * (dy_j - sum_i dy_i y_i). */
void softmax_backward(float *dx, const float *dy, const float *y, size_t rows, int cols)
{
    size_t c = (size_t)cols;
    if (!dx || cols <= 0)
        return;
#pragma omp parallel for if (rows * c >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *yr = y + r * c, *dyr = dy + r * c;
        float *dxr = dx + r * c;
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (int j = 0; j < cols; j++)
            dot += (double)dyr[j] * yr[j];
        float fdot = (float)dot;
#pragma omp simd
        for (int j = 0; j < cols; j++)
            dxr[j] += yr[j] * (dyr[j] - fdot);
    }
}

/* ---- add and dropout ------------------------------------------------------- */

/* xs: COUNT buffers of (SIZE)  y: (SIZE). y may alias any input. */
void add_forward(float *y, const float *const *xs, int count, size_t size)
{
    if (count == 2) { /* the residual case, as one vectorised pass */
        const float *a = xs[0], *b = xs[1];
#pragma omp parallel for simd if (size >= OPS_PARALLEL_MIN) schedule(static)
        for (size_t i = 0; i < size; i++)
            y[i] = 0.0f + a[i] + b[i];
        return;
    }
#pragma omp parallel for if (size >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < size; i++) {
        float sum = 0.0f;
        for (int k = 0; k < count; k++)
            sum += xs[k][i];
        y[i] = sum;
    }
}

/* splitmix64 of a counter: element i draws from the seed and i alone, so the
 * mask does not depend on the thread count. */
static uint64_t splitmix64_at(uint64_t seed, uint64_t i)
{
    uint64_t z = seed + (i + 1) * 0x9e3779b97f4a7c15ULL;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* m: (COUNT). Element i is dropped when its uniform draw u in [0, 1), made
 * from 24 random bits, satisfies u < rate. rate <= 0 keeps everything and
 * rate >= 1 drops everything (m = 0, never infinity). */
void dropout_mask(float *m, size_t count, float rate, uint64_t seed)
{
    float keep = rate < 1.0f ? 1.0f / (1.0f - rate) : 0.0f;
    if (rate <= 0.0f)
        keep = 1.0f;
#pragma omp parallel for if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++) {
        float u = (float)(splitmix64_at(seed, i) >> 40) * 0x1.0p-24f;
        m[i] = u < rate ? 0.0f : keep;
    }
}

/* x, m, y: (COUNT) */
void dropout_forward(float *y, const float *x, const float *m, size_t count)
{
#pragma omp parallel for if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++)
        y[i] = x[i] * m[i];
}

/* dx, dy, m: (COUNT) */
void dropout_backward(float *dx, const float *dy, const float *m, size_t count)
{
    if (!dx)
        return;
#pragma omp parallel for if (count >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t i = 0; i < count; i++)
        dx[i] += dy[i] * m[i];
}

/* ---- threads around sgemm ------------------------------------------------------ */

/* Rows below which a dense product stays one sgemm with OpenBLAS threads. */
#define OPS_SPLIT_MIN_ROWS 64

/* OpenMP threads that split `jobs` independent products: 1 inside an
 * enclosing OpenMP region or when there is only one job. */
static int ops_threads(size_t jobs)
{
    if (omp_in_parallel() || jobs < 2)
        return 1;
    int t = omp_get_max_threads();
    return (size_t)t < jobs ? t : (int)jobs;
}

/*
 * While threads > 1, each OpenMP thread calls sgemm on its own part, so
 * OpenBLAS must not start its own threads as well: its workers spin next to
 * the OpenMP workers and both slow down. Returns the count to restore.
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

/* First index of part t of `count` items split over `parts` threads. */
static size_t part_start(size_t count, int t, int parts)
{
    size_t base = count / (size_t)parts, extra = count % (size_t)parts;
    return base * (size_t)t + (extra < (size_t)t ? extra : (size_t)t);
}

/* ---- dense ------------------------------------------------------------------ */

/* dy: (ROWS, COLS) with row stride LD  db: (COLS). db += column sums of dy,
 * accumulated in double one block of columns at a time. */
static void column_sums_add(float *db, const float *dy, size_t rows, int cols, size_t ld)
{
    int blocks = (cols + OPS_COLUMN_BLOCK - 1) / OPS_COLUMN_BLOCK;
#pragma omp parallel for if (rows * (size_t)cols >= OPS_PARALLEL_MIN) schedule(static)
    for (int b = 0; b < blocks; b++) {
        double acc[OPS_COLUMN_BLOCK] = {0.0};
        int c0 = b * OPS_COLUMN_BLOCK;
        int width = cols - c0 < OPS_COLUMN_BLOCK ? cols - c0 : OPS_COLUMN_BLOCK;
        for (size_t r = 0; r < rows; r++) {
            const float *row = dy + r * ld + (size_t)c0;
#pragma omp simd
            for (int j = 0; j < width; j++)
                acc[j] += row[j];
        }
        for (int j = 0; j < width; j++)
            db[c0 + j] += (float)acc[j];
    }
}

/* x: (ROWS, IN)  w: (OUT, IN)  b: (OUT) or NULL  y: (ROWS, OUT) */
void dense_forward(float *y, const float *x, const float *w, const float *b, size_t rows,
                   int in, int out)
{
    size_t o = (size_t)out, i = (size_t)in;
    if (rows == 0 || out <= 0)
        return;
    if (in <= 0) {
        for (size_t r = 0; r < rows; r++)
            for (size_t j = 0; j < o; j++)
                y[r * o + j] = b ? b[j] : 0.0f;
        return;
    }

    /* Start from the bias rows, then let sgemm add x w^T (beta = 1). */
    float beta = 0.0f;
    if (b) {
#pragma omp parallel for if (rows * o >= OPS_PARALLEL_MIN) schedule(static)
        for (size_t r = 0; r < rows; r++)
            memcpy(y + r * o, b, o * sizeof(float));
        beta = 1.0f;
    }
    /* Row blocks split over the threads, one sgemm each. */
    int threads = ops_threads(rows >= OPS_SPLIT_MIN_ROWS ? rows : 1);
    int blas = blas_serial_begin(threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = omp_get_thread_num();
        size_t end = part_start(rows, t + 1, threads);
        for (size_t r0 = part_start(rows, t, threads); r0 < end; r0 += OPS_GEMM_MAX_ROWS) {
            size_t m = end - r0 < OPS_GEMM_MAX_ROWS ? end - r0 : OPS_GEMM_MAX_ROWS;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)m, out, in, 1.0f,
                        x + r0 * i, in, w, in, beta, y + r0 * o, out);
        }
    }
    blas_serial_end(threads, blas);
}

/* x: (ROWS, IN)  w: (OUT, IN)  b: (OUT) or NULL  y: (ROWS, OUT); dot products in
 * double, the oracle for dense_forward. */
void dense_forward_naive(float *y, const float *x, const float *w, const float *b, size_t rows,
                         int in, int out)
{
    size_t o = (size_t)out, i = (size_t)in;
    for (size_t r = 0; r < rows; r++) {
        for (size_t j = 0; j < o; j++) {
            double sum = b ? b[j] : 0.0;
            for (size_t k = 0; k < i; k++)
                sum += (double)x[r * i + k] * w[j * i + k];
            y[r * o + j] = (float)sum;
        }
    }
}

/* dy: (ROWS, OUT)  x, dx: (ROWS, IN)  w, dw: (OUT, IN)  db: (OUT).
 * dx += dy w, dw += dy^T x, db += column sums of dy. */
void dense_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                    const float *w, size_t rows, int in, int out)
{
    size_t o = (size_t)out, i = (size_t)in;
    if (rows == 0 || out <= 0)
        return;

    /* dx by row blocks and dw by blocks of its output rows, so no two
     * threads write the same cell. */
    int threads = ops_threads(rows >= OPS_SPLIT_MIN_ROWS && out >= 2 ? rows : 1);
    threads = threads < out ? threads : out;
    int blas = blas_serial_begin(threads);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        int t = omp_get_thread_num();
        size_t end = part_start(rows, t + 1, threads);
        for (size_t r0 = part_start(rows, t, threads); dx && in > 0 && r0 < end;
             r0 += OPS_GEMM_MAX_ROWS) {
            size_t m = end - r0 < OPS_GEMM_MAX_ROWS ? end - r0 : OPS_GEMM_MAX_ROWS;
            cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)m, in, out, 1.0f,
                        dy + r0 * o, out, w, in, 1.0f, dx + r0 * i, in);
        }
        size_t o0 = part_start(o, t, threads), o1 = part_start(o, t + 1, threads);
        for (size_t r0 = 0; dw && in > 0 && o1 > o0 && r0 < rows; r0 += OPS_GEMM_MAX_ROWS) {
            size_t m = rows - r0 < OPS_GEMM_MAX_ROWS ? rows - r0 : OPS_GEMM_MAX_ROWS;
            cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, (int)(o1 - o0), in, (int)m,
                        1.0f, dy + r0 * o + o0, out, x + r0 * i, in, 1.0f, dw + o0 * i, in);
        }
    }
    blas_serial_end(threads, blas);
    if (db)
        column_sums_add(db, dy, rows, out, o);
}

/* ---- layer norm ---------------------------------------------------------------- */

/* x, y: (ROWS, D)  gamma, beta: (D)  save_mean, save_rstd: (ROWS) */
void layernorm_forward(float *y, float *save_mean, float *save_rstd, const float *x,
                       const float *gamma, const float *beta, float eps, size_t rows, int d)
{
    size_t dd = (size_t)d;
    if (d <= 0)
        return;
#pragma omp parallel for if (rows * dd >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * dd;
        float *yr = y + r * dd;

        /* Two passes in double: the mean, then the biased variance about it. */
        double sum = 0.0;
#pragma omp simd reduction(+ : sum)
        for (size_t j = 0; j < dd; j++)
            sum += xr[j];
        double mean = sum / (double)d;
        double var = 0.0;
#pragma omp simd reduction(+ : var)
        for (size_t j = 0; j < dd; j++) {
            double c = xr[j] - mean;
            var += c * c;
        }
        var /= (double)d;
        float rstd = (float)(1.0 / sqrt(var + (double)eps));
        float fmean = (float)mean;

#pragma omp simd
        for (size_t j = 0; j < dd; j++)
            yr[j] = (xr[j] - fmean) * rstd * gamma[j] + beta[j];
        save_mean[r] = fmean;
        save_rstd[r] = rstd;
    }
}

/* dy, x: (ROWS, D)  gamma: (D)  save_mean, save_rstd: (ROWS). With xhat the
 * normalised row and g = dy * gamma:
 * dx += rstd * (g - mean(g) - xhat * mean(g * xhat)). */
static void layernorm_backward_input(float *dx, const float *dy, const float *x,
                                     const float *save_mean, const float *save_rstd,
                                     const float *gamma, size_t rows, int d)
{
    size_t dd = (size_t)d;
#pragma omp parallel for if (rows * dd >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *xr = x + r * dd, *dyr = dy + r * dd;
        float *dxr = dx + r * dd;
        float mean = save_mean[r], rstd = save_rstd[r];

        double sum_g = 0.0, sum_gx = 0.0;
#pragma omp simd reduction(+ : sum_g, sum_gx)
        for (size_t j = 0; j < dd; j++) {
            float g = dyr[j] * gamma[j];
            sum_g += g;
            sum_gx += (double)g * ((xr[j] - mean) * rstd);
        }
        float mean_g = (float)(sum_g / (double)d);
        float mean_gx = (float)(sum_gx / (double)d);

#pragma omp simd
        for (size_t j = 0; j < dd; j++) {
            float xhat = (xr[j] - mean) * rstd;
            dxr[j] += rstd * (dyr[j] * gamma[j] - mean_g - xhat * mean_gx);
        }
    }
}

/* dgamma += sum over rows of dy * xhat, dbeta += sum over rows of dy, in double,
 * with threads splitting the columns. */
static void layernorm_backward_params(float *dgamma, float *dbeta, const float *dy,
                                      const float *x, const float *save_mean,
                                      const float *save_rstd, size_t rows, int d)
{
    size_t dd = (size_t)d;
    int blocks = (d + OPS_COLUMN_BLOCK - 1) / OPS_COLUMN_BLOCK;
#pragma omp parallel for if (rows * dd >= OPS_PARALLEL_MIN) schedule(static)
    for (int b = 0; b < blocks; b++) {
        double acc_g[OPS_COLUMN_BLOCK] = {0.0}, acc_b[OPS_COLUMN_BLOCK] = {0.0};
        int c0 = b * OPS_COLUMN_BLOCK;
        int width = d - c0 < OPS_COLUMN_BLOCK ? d - c0 : OPS_COLUMN_BLOCK;
        for (size_t r = 0; r < rows; r++) {
            const float *xr = x + r * dd + (size_t)c0, *dyr = dy + r * dd + (size_t)c0;
            float mean = save_mean[r], rstd = save_rstd[r];
#pragma omp simd
            for (int j = 0; j < width; j++) {
                acc_g[j] += (double)dyr[j] * ((xr[j] - mean) * rstd);
                acc_b[j] += dyr[j];
            }
        }
        for (int j = 0; j < width; j++) {
            if (dgamma)
                dgamma[c0 + j] += (float)acc_g[j];
            if (dbeta)
                dbeta[c0 + j] += (float)acc_b[j];
        }
    }
}

/* dy, x, dx: (ROWS, D)  gamma, dgamma, dbeta: (D)  save_mean, save_rstd: (ROWS) */
void layernorm_backward(float *dx, float *dgamma, float *dbeta, const float *dy, const float *x,
                        const float *save_mean, const float *save_rstd, const float *gamma,
                        size_t rows, int d)
{
    if (d <= 0 || rows == 0)
        return;
    if (dx)
        layernorm_backward_input(dx, dy, x, save_mean, save_rstd, gamma, rows, d);
    if (dgamma || dbeta)
        layernorm_backward_params(dgamma, dbeta, dy, x, save_mean, save_rstd, rows, d);
}

/* ---- multi-head self-attention ------------------------------------------------ */

/* Samples per backward chunk: enough for about MHSA_CHUNK_ROWS rows. */
static size_t mhsa_chunk_samples(int t)
{
    size_t tt = t > 0 ? (size_t)t : 1;
    size_t samples = (MHSA_CHUNK_ROWS + tt - 1) / tt;
    return samples > 0 ? samples : 1;
}

/* The backward pass works on chunks of samples: dctx (rows, D), dqkv
 * (rows, 3D) and the attention-score gradients (samples, H, T, T). The forward
 * pass needs no workspace. Returns 0 if the size overflows size_t. */
size_t mhsa_workspace_floats(int t, int d, int heads)
{
    if (t <= 0 || d <= 0 || heads <= 0)
        return 0;
    size_t samples = mhsa_chunk_samples(t), rows, per_row, scores, total;
    if (top_size_mul(&rows, samples, (size_t)t) || top_size_mul(&per_row, (size_t)d, 4) ||
        top_size_mul(&total, rows, per_row) || top_size_mul(&scores, rows, (size_t)t) ||
        top_size_mul(&scores, scores, (size_t)heads) || top_size_add(&total, total, scores))
        return 0;
    return total;
}

/* x: (N, T, D)  w_qkv: (3D, D)  b_qkv: (3D)  w_out: (D, D)  b_out: (D)
 * qkv: (N, T, 3D)  att: (N, H, T, T)  ctx, y: (N, T, D). work is unused. */
void mhsa_forward(float *y, float *qkv, float *att, float *ctx, const float *x,
                  const float *w_qkv, const float *b_qkv, const float *w_out,
                  const float *b_out, int n, int t, int d, int heads, float *work)
{
    (void)work;
    if (n <= 0 || t <= 0 || d <= 0 || heads <= 0)
        return;
    size_t rows = (size_t)n * (size_t)t, tt = (size_t)t, d3 = 3 * (size_t)d;
    int dh = d / heads;
    float scale = 1.0f / sqrtf((float)dh);

    dense_forward(qkv, x, w_qkv, b_qkv, rows, d, 3 * d);

    /* Per (sample, head), read in place from qkv: scores q k^T * scale, their
     * softmax, and att v into the head's (T, DH) slice of ctx. The pairs
     * write disjoint slices, so they split over the threads. */
    size_t pairs = (size_t)n * (size_t)heads;
    int threads = ops_threads(pairs);
    int blas = blas_serial_begin(threads);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
    for (size_t s = 0; s < pairs; s++) {
        size_t i = s / (size_t)heads, h = s % (size_t)heads;
        const float *q = qkv + i * tt * d3 + h * (size_t)dh, *v = q + 2 * (size_t)d;
        float *a = att + s * tt * tt;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, dh, scale, q, (int)d3, q + d,
                    (int)d3, 0.0f, a, t);
        softmax_forward(a, a, tt, t);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, dh, t, 1.0f, a, t, v, (int)d3,
                    0.0f, ctx + i * tt * d + h * dh, d);
    }
    blas_serial_end(threads, blas);

    dense_forward(y, ctx, w_out, b_out, rows, d, d);
}

/* p, dp: (ROWS, T). dp <- scale * p * (dp - sum_j dp_j p_j), overwriting dp
 * with the gradient of the pre-softmax scores. */
static void softmax_grad_inplace(float *dp, const float *p, size_t rows, int t, float scale)
{
    size_t tt = (size_t)t;
#pragma omp parallel for if (rows * tt >= OPS_PARALLEL_MIN) schedule(static)
    for (size_t r = 0; r < rows; r++) {
        const float *pr = p + r * tt;
        float *dr = dp + r * tt;
        double dot = 0.0;
#pragma omp simd reduction(+ : dot)
        for (size_t j = 0; j < tt; j++)
            dot += (double)dr[j] * pr[j];
        float fdot = (float)dot;
#pragma omp simd
        for (size_t j = 0; j < tt; j++)
            dr[j] = scale * pr[j] * (dr[j] - fdot);
    }
}

/* dctx: (NC, T, D)  qkv, dqkv: (NC, T, 3D)  att, ds: (NC, H, T, T).
 * Attention backward of one chunk of NC samples: writes dqkv from dctx, using
 * ds as scratch for the score gradients. */
static void mhsa_backward_attention(float *dqkv, float *ds, const float *dctx, const float *qkv,
                                    const float *att, int nc, int t, int d, int heads)
{
    size_t tt = (size_t)t, d3 = 3 * (size_t)d, pairs = (size_t)nc * (size_t)heads;
    int dh = d / heads;
    float scale = 1.0f / sqrtf((float)dh);

    /* Per (sample, head): dv = att^T dctx_h and d(att) = dctx_h v^T, the
     * score gradient ds, then dq = ds k and dk = ds^T q with the scale already
     * inside ds. The pairs write disjoint slices, so they split over threads. */
    int threads = ops_threads(pairs);
    int blas = blas_serial_begin(threads);
#pragma omp parallel for num_threads(threads) if (threads > 1) schedule(dynamic, 1)
    for (size_t s = 0; s < pairs; s++) {
        size_t i = s / (size_t)heads, h = s % (size_t)heads, off = h * (size_t)dh;
        const float *dc = dctx + i * tt * d + off, *p = att + s * tt * tt;
        const float *q = qkv + i * tt * d3 + off, *v = q + 2 * (size_t)d;
        float *dq = dqkv + i * tt * d3 + off, *dv = dq + 2 * (size_t)d, *g = ds + s * tt * tt;
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, dh, t, 1.0f, p, t, dc, d, 0.0f,
                    dv, (int)d3);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, dh, 1.0f, dc, d, v, (int)d3,
                    0.0f, g, t);
        softmax_grad_inplace(g, p, tt, t, scale);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, dh, t, 1.0f, g, t, q + d,
                    (int)d3, 0.0f, dq, (int)d3);
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, dh, t, 1.0f, g, t, q, (int)d3,
                    0.0f, dq + d, (int)d3);
    }
    blas_serial_end(threads, blas);
}

/* dy, x, ctx, dx: (N, T, D)  qkv: (N, T, 3D)  att: (N, H, T, T)
 * w_qkv, dw_qkv: (3D, D)  db_qkv: (3D)  w_out, dw_out: (D, D)  db_out: (D)
 * work: mhsa_workspace_floats(T, D, H) floats. */
void mhsa_backward(float *dx, float *dw_qkv, float *db_qkv, float *dw_out, float *db_out,
                   const float *dy, const float *x, const float *qkv, const float *att,
                   const float *ctx, const float *w_qkv, const float *w_out, int n, int t,
                   int d, int heads, float *work)
{
    if (n <= 0 || t <= 0 || d <= 0 || heads <= 0)
        return;
    size_t tt = (size_t)t, dd = (size_t)d, rows = (size_t)n * tt;

    /* The out projection's weight gradients come from all rows in one sgemm. */
    dense_backward(NULL, dw_out, db_out, dy, ctx, w_out, rows, d, d);
    if (!dx && !dw_qkv && !db_qkv)
        return;

    size_t chunk = mhsa_chunk_samples(t);
    float *dctx = work;
    float *dqkv = dctx + chunk * tt * dd;
    float *ds = dqkv + chunk * tt * 3 * dd;
    for (size_t i0 = 0; i0 < (size_t)n; i0 += chunk) {
        size_t nc = (size_t)n - i0 < chunk ? (size_t)n - i0 : chunk;
        size_t r0 = i0 * tt, rc = nc * tt;

        /* dctx = dy w_out for this chunk. */
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, (int)rc, d, d, 1.0f,
                    dy + r0 * dd, d, w_out, d, 0.0f, dctx, d);
        mhsa_backward_attention(dqkv, ds, dctx, qkv + r0 * 3 * dd, att + i0 * heads * tt * tt,
                                (int)nc, t, d, heads);
        dense_backward(dx ? dx + r0 * dd : NULL, dw_qkv, db_qkv, dqkv, x + r0 * dd, w_qkv, rc,
                       d, 3 * d);
    }
}

/* ---- ViT tokens -------------------------------------------------------------- */

/* patches: (N, D, HW)  cls: (D)  pos: (1 + HW, D)  y: (N, 1 + HW, D) */
void patch_tokens_forward(float *y, const float *patches, const float *cls, const float *pos,
                          int n, int d, int hw)
{
    size_t dd = (size_t)d, p = (size_t)hw, tokens = p + 1;
#pragma omp parallel for if ((size_t)n * tokens * dd >= OPS_PARALLEL_MIN) schedule(static)
    for (int i = 0; i < n; i++) {
        float *yi = y + (size_t)i * tokens * dd;
        const float *pi = patches + (size_t)i * dd * p;
        for (size_t j = 0; j < dd; j++)
            yi[j] = cls[j] + pos[j];
        /* Transpose (D, HW) to (HW, D) while adding the position embedding. */
        for (size_t k = 0; k < p; k++)
            for (size_t j = 0; j < dd; j++)
                yi[(k + 1) * dd + j] = pi[j * p + k] + pos[(k + 1) * dd + j];
    }
}

/* dy: (N, 1 + HW, D)  dpatches: (N, D, HW)  dcls: (D)  dpos: (1 + HW, D) */
void patch_tokens_backward(float *dpatches, float *dcls, float *dpos, const float *dy, int n,
                           int d, int hw)
{
    size_t dd = (size_t)d, p = (size_t)hw, tokens = p + 1;
    if (dpatches) {
#pragma omp parallel for if ((size_t)n * tokens * dd >= OPS_PARALLEL_MIN) schedule(static)
        for (int i = 0; i < n; i++) {
            const float *dyi = dy + (size_t)i * tokens * dd;
            float *dpi = dpatches + (size_t)i * dd * p;
            for (size_t j = 0; j < dd; j++)
                for (size_t k = 0; k < p; k++)
                    dpi[j * p + k] += dyi[(k + 1) * dd + j];
        }
    }
    if (dcls)
        column_sums_add(dcls, dy, (size_t)n, d, tokens * dd);
    if (dpos) {
        /* Sum over samples: dy viewed as N rows of (1 + HW) * D columns. */
        size_t cols = tokens * dd;
        for (size_t c0 = 0; c0 < cols; c0 += (size_t)INT_MAX / 2) {
            size_t width = cols - c0 < (size_t)INT_MAX / 2 ? cols - c0 : (size_t)INT_MAX / 2;
            column_sums_add(dpos + c0, dy + c0, (size_t)n, (int)width, cols);
        }
    }
}

/* x: (N, T, D)  y: (N, D) */
void token_select_forward(float *y, const float *x, int n, int t, int d, int index)
{
    size_t dd = (size_t)d;
    for (size_t i = 0; i < (size_t)n; i++)
        memcpy(y + i * dd, x + (i * (size_t)t + (size_t)index) * dd, dd * sizeof(float));
}

/* dy: (N, D)  dx: (N, T, D); only token `index` receives gradient. */
void token_select_backward(float *dx, const float *dy, int n, int t, int d, int index)
{
    size_t dd = (size_t)d;
    if (!dx)
        return;
    for (size_t i = 0; i < (size_t)n; i++) {
        float *row = dx + (i * (size_t)t + (size_t)index) * dd;
        for (size_t j = 0; j < dd; j++)
            row[j] += dy[i * dd + j];
    }
}

/* ---- loss ----------------------------------------------------------------------- */

/* logits, dlogits: (N, K)  labels: (N). Returns NAN, leaving dlogits zero
 * in that row, if a label is outside [0, K); the graph validates labels first. */
double cross_entropy_forward_backward(float *dlogits, const float *logits,
                                      const int32_t *labels, int n, int k)
{
    if (n <= 0 || k <= 0)
        return 0.0;
    size_t kk = (size_t)k;
    double total = 0.0;
    int bad = 0;
    for (size_t i = 0; i < (size_t)n; i++) {
        const float *row = logits + i * kk;
        int32_t label = labels[i];

        float max = row[0];
        for (size_t j = 1; j < kk; j++)
            max = row[j] > max ? row[j] : max;
        double sum = exp((double)row[0] - max);
        for (size_t j = 1; j < kk; j++)
            sum += exp((double)row[j] - max);
        double lse = max + log(sum);

        if (label < 0 || label >= k) {
            bad = 1;
            if (dlogits)
                memset(dlogits + i * kk, 0, kk * sizeof(float));
            continue;
        }
        total += lse - row[label];
        if (dlogits) {
            for (size_t j = 0; j < kk; j++) {
                double p = exp((double)row[j] - lse);
                dlogits[i * kk + j] = (float)((p - (j == (size_t)label ? 1.0 : 0.0)) / n);
            }
        }
    }
    return bad ? NAN : total / n;
}
