/*
 * Convolutional kernels of ops.h: conv2d, pooling, batch norm, concat, zero
 * padding and layout changes, each with forward and backward.
 * Skeleton: every function exists with a naive body; the fast paths follow.
 */
#include "ops.h"

#include <math.h>
#include <string.h>

top_status conv2d_shape_derive(conv2d_shape *s, top_error *err)
{
    if (s->n < 1 || s->c < 1 || s->h < 1 || s->w < 1 || s->k < 1 || s->r < 1 || s->s < 1 ||
        s->stride_h < 1 || s->stride_w < 1 || s->dilation_h < 1 || s->dilation_w < 1 ||
        s->groups < 1 || s->pad_top < 0 || s->pad_bottom < 0 || s->pad_left < 0 ||
        s->pad_right < 0)
        return top_error_set(err, TOP_ERR_INVALID, "invalid conv2d shape");
    if (s->c % s->groups || s->k % s->groups)
        return top_error_set(err, TOP_ERR_SHAPE, "groups must divide channels");
    long eh = (long)s->h + s->pad_top + s->pad_bottom - (long)s->dilation_h * (s->r - 1) - 1;
    long ew = (long)s->w + s->pad_left + s->pad_right - (long)s->dilation_w * (s->s - 1) - 1;
    if (eh < 0 || ew < 0)
        return top_error_set(err, TOP_ERR_SHAPE, "conv2d output is empty");
    s->p = (int)(eh / s->stride_h + 1);
    s->q = (int)(ew / s->stride_w + 1);
    return TOP_OK;
}

size_t conv2d_workspace_floats(const conv2d_shape *s)
{
    (void)s;
    return 0;
}

void conv2d_forward_naive(float *y, const float *x, const float *w, const float *b,
                          const conv2d_shape *s)
{
    int cg = s->c / s->groups, kg = s->k / s->groups;
    for (int n = 0; n < s->n; n++)
        for (int k = 0; k < s->k; k++) {
            int g = k / kg;
            for (int p = 0; p < s->p; p++)
                for (int q = 0; q < s->q; q++) {
                    double acc = b ? b[k] : 0.0;
                    for (int c = 0; c < cg; c++)
                        for (int r = 0; r < s->r; r++) {
                            int ih = p * s->stride_h - s->pad_top + r * s->dilation_h;
                            if (ih < 0 || ih >= s->h)
                                continue;
                            for (int t = 0; t < s->s; t++) {
                                int iw = q * s->stride_w - s->pad_left + t * s->dilation_w;
                                if (iw < 0 || iw >= s->w)
                                    continue;
                                acc += (double)x[(((size_t)n * s->c + g * cg + c) * s->h + ih) * s->w + iw] *
                                       w[(((size_t)k * cg + c) * s->r + r) * s->s + t];
                            }
                        }
                    y[(((size_t)n * s->k + k) * s->p + p) * s->q + q] = (float)acc;
                }
        }
}

void conv2d_forward(float *y, const float *x, const float *w, const float *b,
                    const conv2d_shape *s, float *work)
{
    (void)work;
    conv2d_forward_naive(y, x, w, b, s);
}

void conv2d_backward_naive(float *dx, float *dw, float *db, const float *dy,
                           const float *x, const float *w, const conv2d_shape *s)
{
    int cg = s->c / s->groups, kg = s->k / s->groups;
    for (int n = 0; n < s->n; n++)
        for (int k = 0; k < s->k; k++) {
            int g = k / kg;
            for (int p = 0; p < s->p; p++)
                for (int q = 0; q < s->q; q++) {
                    float d = dy[(((size_t)n * s->k + k) * s->p + p) * s->q + q];
                    if (db)
                        db[k] += d;
                    for (int c = 0; c < cg; c++)
                        for (int r = 0; r < s->r; r++) {
                            int ih = p * s->stride_h - s->pad_top + r * s->dilation_h;
                            if (ih < 0 || ih >= s->h)
                                continue;
                            for (int t = 0; t < s->s; t++) {
                                int iw = q * s->stride_w - s->pad_left + t * s->dilation_w;
                                if (iw < 0 || iw >= s->w)
                                    continue;
                                size_t xi = (((size_t)n * s->c + g * cg + c) * s->h + ih) * s->w + iw;
                                size_t wi = (((size_t)k * cg + c) * s->r + r) * s->s + t;
                                if (dx)
                                    dx[xi] += d * w[wi];
                                if (dw)
                                    dw[wi] += d * x[xi];
                            }
                        }
                }
        }
}

void conv2d_backward(float *dx, float *dw, float *db, const float *dy, const float *x,
                     const float *w, const conv2d_shape *s, float *work)
{
    (void)work;
    conv2d_backward_naive(dx, dw, db, dy, x, w, s);
}

top_status pool2d_shape_derive(pool2d_shape *s, top_error *err)
{
    if (s->n < 1 || s->c < 1 || s->h < 1 || s->w < 1 || s->r < 1 || s->s < 1 ||
        s->stride_h < 1 || s->stride_w < 1 || s->pad_top < 0 || s->pad_bottom < 0 ||
        s->pad_left < 0 || s->pad_right < 0)
        return top_error_set(err, TOP_ERR_INVALID, "invalid pool2d shape");
    long eh = (long)s->h + s->pad_top + s->pad_bottom - s->r;
    long ew = (long)s->w + s->pad_left + s->pad_right - s->s;
    if (eh < 0 || ew < 0)
        return top_error_set(err, TOP_ERR_SHAPE, "pool2d output is empty");
    s->p = (int)(eh / s->stride_h + 1);
    s->q = (int)(ew / s->stride_w + 1);
    return TOP_OK;
}

void maxpool2d_forward(float *y, const float *x, const pool2d_shape *s) { (void)y; (void)x; (void)s; }
void maxpool2d_backward(float *dx, const float *dy, const float *x, const pool2d_shape *s) { (void)dx; (void)dy; (void)x; (void)s; }
void avgpool2d_forward(float *y, const float *x, const pool2d_shape *s) { (void)y; (void)x; (void)s; }
void avgpool2d_backward(float *dx, const float *dy, const pool2d_shape *s) { (void)dx; (void)dy; (void)s; }

void global_avgpool_forward(float *y, const float *x, int n, int c, int hw)
{
    for (size_t i = 0; i < (size_t)n * c; i++) {
        double acc = 0;
        for (int j = 0; j < hw; j++)
            acc += x[i * hw + j];
        y[i] = (float)(acc / hw);
    }
}

void global_avgpool_backward(float *dx, const float *dy, int n, int c, int hw)
{
    for (size_t i = 0; i < (size_t)n * c; i++)
        for (int j = 0; j < hw; j++)
            dx[i * hw + j] += dy[i] / (float)hw;
}

void batchnorm_forward_inference(float *y, const float *x, const float *gamma,
                                 const float *beta, const float *mean, const float *var,
                                 float eps, int n, int c, int hw)
{
    for (int i = 0; i < n; i++)
        for (int j = 0; j < c; j++) {
            float a = gamma[j] / sqrtf(var[j] + eps);
            size_t o = ((size_t)i * c + j) * hw;
            for (int t = 0; t < hw; t++)
                y[o + t] = (x[o + t] - mean[j]) * a + beta[j];
        }
}

void batchnorm_forward_train(float *y, float *save_mean, float *save_invstd,
                             const float *x, const float *gamma, const float *beta,
                             float eps, int n, int c, int hw)
{
    (void)y; (void)save_mean; (void)save_invstd; (void)x; (void)gamma; (void)beta; (void)eps; (void)n; (void)c; (void)hw;
}

void batchnorm_backward_inference(float *dx, float *dgamma, float *dbeta, const float *dy,
                                  const float *x, const float *gamma, const float *mean,
                                  const float *var, float eps, int n, int c, int hw)
{
    (void)dx; (void)dgamma; (void)dbeta; (void)dy; (void)x; (void)gamma; (void)mean; (void)var; (void)eps; (void)n; (void)c; (void)hw;
}

void batchnorm_backward_train(float *dx, float *dgamma, float *dbeta, const float *dy,
                              const float *x, const float *gamma, const float *save_mean,
                              const float *save_invstd, int n, int c, int hw)
{
    (void)dx; (void)dgamma; (void)dbeta; (void)dy; (void)x; (void)gamma; (void)save_mean; (void)save_invstd; (void)n; (void)c; (void)hw;
}

void concat_forward(float *y, const float *const *xs, const int *channels, int count,
                    int n, int hw)
{
    (void)y; (void)xs; (void)channels; (void)count; (void)n; (void)hw;
}

void concat_backward(float *const *dxs, const float *dy, const int *channels, int count,
                     int n, int hw)
{
    (void)dxs; (void)dy; (void)channels; (void)count; (void)n; (void)hw;
}

void zeropad2d_forward(float *y, const float *x, int n, int c, int h, int w, int top,
                       int bottom, int left, int right)
{
    (void)y; (void)x; (void)n; (void)c; (void)h; (void)w; (void)top; (void)bottom; (void)left; (void)right;
}

void zeropad2d_backward(float *dx, const float *dy, int n, int c, int h, int w, int top,
                        int bottom, int left, int right)
{
    (void)dx; (void)dy; (void)n; (void)c; (void)h; (void)w; (void)top; (void)bottom; (void)left; (void)right;
}

void nchw_to_nhwc(float *y, const float *x, int n, int c, int h, int w)
{
    (void)y; (void)x; (void)n; (void)c; (void)h; (void)w;
}

void nhwc_to_nchw(float *y, const float *x, int n, int c, int h, int w)
{
    (void)y; (void)x; (void)n; (void)c; (void)h; (void)w;
}
