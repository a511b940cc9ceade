/*
 * Data-free OBD saliency from batch-norm statistics (see datafree.h).
 *
 *   score_i = 0.5 w_i^2 (t_i E[x_j^2] + floor)
 *
 * Every node gets a per-channel (mean m, second moment s) pair, variance
 * v = max(s - m^2, 0), propagated in topological order:
 *   input         pixels uniform on [0, 255], then the recorded preprocessing
 *                 x = (pixel * scale - mean_c) / std_c: m = (127.5 scale -
 *                 mean_c) / std_c, v = (255 scale)^2 / 12 / std_c^2
 *   batch norm    N(beta, gamma^2 var / (var + eps)), assuming its input
 *                 follows its running statistics (exact for a Gaussian input)
 *   layer norm    mean beta, variance gamma^2 (per feature)
 *   relu, relu6   closed forms of max(X, 0) and min(max(X, 0), 6) for a
 *                 Gaussian X with the input's m and v
 *   gelu, sigmoid Simpson's rule over the Gaussian with the input's m and v
 *   add           means add, variances add (the branches taken independent)
 *   concat        the inputs' channels in order
 *   avg pools     the mean is kept; the second moment is kept too, an upper
 *                 bound (an average of correlated values varies less) that
 *                 is loose after a global pool of sparse activations
 *   max pool      kept (the mean is then an underestimate)
 *   zero padding  kept: these are the interior moments, and the conv that
 *                 reads the padded map counts the zeros per kernel tap (t_i)
 *   dropout, token select, flatten   kept (flatten maps each feature to its
 *                 channel in NCHW or NHWC order)
 *   conv, dense, patch embedding, attention, softmax   unknown: fallback
 *                 m = 0, s = 1, the moments of a standardized feature
 * NOTE: a conv or dense layer that is not followed by a batch norm or layer
 * norm passes only the fallback on, so layers after it score close to 0.5 w^2
 * times a constant, which is magnitude pruning within that layer.
 *
 * Moments are doubles; weights and scores are float32. Reentrant: the graph
 * is only read, and the workspace is allocated per call.
 */
#include "datafree.h"

#include <float.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

/* Legend: C channels (or features) of a node; conv weight (K, C/G, R, S) with
 * G groups; P, Q conv output height and width. */

#define FALLBACK_MEAN 0.0
#define FALLBACK_SECOND 1.0
/* Simpson's rule for gelu and sigmoid: z in [-8, 8] in 128 intervals. The
 * Gaussian mass beyond 8 standard deviations is about 1.2e-15. */
#define QUAD_HALF_WIDTH 8.0
#define QUAD_INTERVALS 128

#define INV_SQRT_2PI 0.39894228040143267794
#define INV_SQRT_2 0.70710678118654752440

/* Per-channel moments of one node's output. */
typedef struct moments {
    double *mean;
    double *second;
    size_t count;
} moments;

/* ---- Gaussian moments ------------------------------------------------------- */

static double normal_pdf(double z)
{
    return isinf(z) ? 0.0 : INV_SQRT_2PI * exp(-0.5 * z * z);
}

static double normal_cdf(double z)
{
    return 0.5 * erfc(-z * INV_SQRT_2);
}

/* 1 - cdf(z), accurate in the upper tail. */
static double normal_sf(double z)
{
    return 0.5 * erfc(z * INV_SQRT_2);
}

/* P(a < Z < b), computed in the tail the interval lies in to avoid cancellation. */
static double normal_mass(double a, double b)
{
    if (a >= 0)
        return normal_sf(a) - normal_sf(b);
    if (b <= 0)
        return normal_cdf(b) - normal_cdf(a);
    return 1.0 - normal_cdf(a) - normal_sf(b);
}

/*
 * Moments of min(max(X, lo), hi) for X ~ N(mu, sigma^2); hi may be INFINITY.
 * With A = (lo - mu) / sigma, B = (hi - mu) / sigma and the truncated moments
 *   E[X 1{lo<X<hi}]   = mu (cdf B - cdf A) + sigma (pdf A - pdf B)
 *   E[X^2 1{lo<X<hi}] = (mu^2 + sigma^2)(cdf B - cdf A)
 *                       + sigma ((mu + lo) pdf A - (mu + hi) pdf B),
 * the clipped mass adds lo^k cdf(A) + hi^k (1 - cdf B).
 */
static void clip_moments(double *mean, double *second, double mu, double sigma, double lo,
                         double hi)
{
    if (!(sigma > 0)) {
        double y = fmin(fmax(mu, lo), hi);
        *mean = y;
        *second = y * y;
        return;
    }
    double a = (lo - mu) / sigma, b = isinf(hi) ? INFINITY : (hi - mu) / sigma;
    double mid = normal_mass(a, b), pdf_a = normal_pdf(a), below = normal_cdf(a);
    double m = lo * below + mu * mid + sigma * pdf_a;
    double s = lo * lo * below + (mu * mu + sigma * sigma) * mid + sigma * (mu + lo) * pdf_a;
    if (!isinf(hi)) {
        double pdf_b = normal_pdf(b), above = normal_sf(b);
        m += hi * above - sigma * pdf_b;
        s += hi * hi * above - sigma * (mu + hi) * pdf_b;
    }

    /* Rounding in the far tails can push the sums just outside their range. */
    m = fmin(fmax(m, lo), hi);
    s = fmax(s, m * m);
    if (!isinf(hi))
        s = fmin(s, hi * hi);
    *mean = m;
    *second = s;
}

void datafree_relu_moments(double *mean, double *second, double mu, double sigma)
{
    clip_moments(mean, second, mu, sigma, 0.0, INFINITY);
}

void datafree_relu6_moments(double *mean, double *second, double mu, double sigma)
{
    clip_moments(mean, second, mu, sigma, 0.0, 6.0);
}

static double smooth_activation(op_kind op, double x)
{
    if (op == OP_GELU)
        return 0.5 * x * erfc(-x * INV_SQRT_2);
    return 1.0 / (1.0 + exp(-x));
}

/* Moments of gelu(X) or sigmoid(X) for X ~ N(mu, sigma^2) by Simpson's rule,
 * normalized by the quadrature's own mass. */
static void smooth_moments(double *mean, double *second, op_kind op, double mu, double sigma)
{
    if (!(sigma > 0)) {
        double y = smooth_activation(op, mu);
        *mean = y;
        *second = y * y;
        return;
    }
    double h = 2.0 * QUAD_HALF_WIDTH / QUAD_INTERVALS, mass = 0, m = 0, s = 0;
    for (int i = 0; i <= QUAD_INTERVALS; i++) {
        double z = -QUAD_HALF_WIDTH + i * h;
        double weight = (i == 0 || i == QUAD_INTERVALS) ? 1.0 : (i % 2 ? 4.0 : 2.0);
        weight *= normal_pdf(z);
        double y = smooth_activation(op, mu + sigma * z);
        mass += weight;
        m += weight * y;
        s += weight * y * y;
    }
    *mean = m / mass;
    *second = s / mass;
}

/* ---- propagation through the graph ------------------------------------------ */

/* Channels of a node's output: C of (C, H, W), D of (T, D) and (D). */
static size_t node_channels(const graph_node *nd)
{
    return nd->ndim == 2 ? (size_t)nd->dims[1] : (size_t)nd->dims[0];
}

static const float *param_values(const graph *g, const graph_node *nd, int slot)
{
    int p = nd->params[slot];
    return p >= 0 ? g->params[p].value.data : NULL;
}

static double variance_of(const moments *x, size_t c)
{
    return fmax(x->second[c] - x->mean[c] * x->mean[c], 0.0);
}

static void fallback_moments(moments *out)
{
    for (size_t c = 0; c < out->count; c++) {
        out->mean[c] = FALLBACK_MEAN;
        out->second[c] = FALLBACK_SECOND;
    }
}

static void input_moments(moments *out, const graph_preprocess *pp)
{
    for (size_t c = 0; c < out->count; c++) {
        double scale = pp->scale, std = c < 3 ? pp->std[c] : 0.0;
        if (!(scale > 0 && std > 0 && isfinite(scale) && isfinite(std))) {
            out->mean[c] = FALLBACK_MEAN;
            out->second[c] = FALLBACK_SECOND;
            continue;
        }
        double range = 255.0 * scale;
        double m = (0.5 * range - pp->mean[c]) / std, v = range * range / 12.0 / (std * std);
        out->mean[c] = m;
        out->second[c] = v + m * m;
    }
}

/* Batch norm: N(beta, gamma^2 var / (var + eps)); layer norm: N(beta, gamma^2). */
static void norm_moments(moments *out, const graph *g, const graph_node *nd)
{
    const float *gamma = param_values(g, nd, PARAM_GAMMA),
                *beta = param_values(g, nd, PARAM_BETA);
    const float *var = nd->op == OP_BATCHNORM ? param_values(g, nd, PARAM_VAR) : NULL;
    for (size_t c = 0; c < out->count; c++) {
        double ratio = 1.0;
        if (var) {
            double v = fmax((double)var[c], 0.0);
            ratio = v / (v + (double)nd->attrs.eps);
        }
        double b = beta[c], gm = gamma[c];
        out->mean[c] = b;
        out->second[c] = b * b + gm * gm * ratio;
    }
}

static void activation_moments(moments *out, const moments *in, op_kind op)
{
    for (size_t c = 0; c < out->count; c++) {
        double mu = in->mean[c], sigma = sqrt(variance_of(in, c));
        if (op == OP_RELU)
            datafree_relu_moments(&out->mean[c], &out->second[c], mu, sigma);
        else if (op == OP_RELU6)
            datafree_relu6_moments(&out->mean[c], &out->second[c], mu, sigma);
        else
            smooth_moments(&out->mean[c], &out->second[c], op, mu, sigma);
    }
}

static void add_moments(moments *out, const moments *all, const graph_node *nd)
{
    for (size_t c = 0; c < out->count; c++) {
        double m = 0, v = 0;
        for (int k = 0; k < nd->n_inputs; k++) {
            const moments *in = &all[nd->inputs[k]];
            m += in->mean[c];
            v += variance_of(in, c);
        }
        out->mean[c] = m;
        out->second[c] = v + m * m;
    }
}

static void concat_moments(moments *out, const moments *all, const graph_node *nd)
{
    size_t at = 0;
    for (int k = 0; k < nd->n_inputs; k++) {
        const moments *in = &all[nd->inputs[k]];
        memcpy(out->mean + at, in->mean, in->count * sizeof(double));
        memcpy(out->second + at, in->second, in->count * sizeof(double));
        at += in->count;
    }
}

/* Feature f of the flatten takes the moments of the channel it comes from. */
static void flatten_moments(moments *out, const moments *in, const graph_node *from,
                            const graph_node *nd)
{
    size_t spatial = 1;
    if (from->ndim == 3)
        spatial = (size_t)from->dims[1] * (size_t)from->dims[2];
    for (size_t f = 0; f < out->count; f++) {
        size_t c;
        if (from->ndim == 3 && !nd->attrs.flatten_nhwc)
            c = f / spatial;
        else
            c = f % in->count; /* NHWC order, (T, D) rows, or already flat */
        out->mean[f] = in->mean[c];
        out->second[f] = in->second[c];
    }
}

static void copy_moments(moments *out, const moments *in)
{
    memcpy(out->mean, in->mean, out->count * sizeof(double));
    memcpy(out->second, in->second, out->count * sizeof(double));
}

static top_status check_finite(const moments *out, const graph_node *nd, top_error *err)
{
    for (size_t c = 0; c < out->count; c++)
        if (!isfinite(out->mean[c]) || !isfinite(out->second[c]))
            return top_error_set(err, TOP_ERR_NUMERIC,
                                 "node '%s' (%s): the predicted moment of channel %zu is not "
                                 "finite; check the node's parameters and the ones before it "
                                 "for NaN or infinite values",
                                 nd->name, op_kind_str(nd->op), c);
    return TOP_OK;
}

/* Fills all[i] from the moments of the node's inputs. */
static top_status node_moments(moments *all, const graph *g, int i, top_error *err)
{
    const graph_node *nd = &g->nodes[i];
    moments *out = &all[i];
    const moments *in = nd->n_inputs > 0 ? &all[nd->inputs[0]] : NULL;
    switch (nd->op) {
    case OP_INPUT: input_moments(out, &g->preprocess); break;
    case OP_BATCHNORM:
    case OP_LAYERNORM: norm_moments(out, g, nd); break;
    case OP_RELU:
    case OP_RELU6:
    case OP_GELU:
    case OP_SIGMOID: activation_moments(out, in, nd->op); break;
    case OP_ADD: add_moments(out, all, nd); break;
    case OP_CONCAT: concat_moments(out, all, nd); break;
    case OP_FLATTEN: flatten_moments(out, in, &g->nodes[nd->inputs[0]], nd); break;
    case OP_MAXPOOL:
    case OP_AVGPOOL:
    case OP_GLOBAL_AVGPOOL:
    case OP_ZEROPAD:
    case OP_DROPOUT:
    case OP_TOKEN_SELECT: copy_moments(out, in); break;
    default: fallback_moments(out); break; /* conv, dense, patch embed, mhsa, softmax */
    }
    return check_finite(out, nd, err);
}

/*
 * Allocates and computes the moments of nodes 0..last into *all (last + 1
 * entries sharing one buffer). The caller frees (*all)[0].mean and *all.
 */
static top_status propagate_moments(moments **all, const graph *g, int last, top_error *err)
{
    size_t total = 0, bytes;
    for (int i = 0; i <= last; i++)
        if (top_size_add(&total, total, node_channels(&g->nodes[i])) != 0)
            return top_error_set(err, TOP_ERR_OVERFLOW, "the graph's channel count overflows");
    if (top_size_mul(&bytes, total, 2 * sizeof(double)) != 0)
        return top_error_set(err, TOP_ERR_OVERFLOW, "the graph's channel count %zu overflows",
                             total);

    moments *m = calloc((size_t)last + 1, sizeof *m);
    double *buffer = malloc(bytes > 0 ? bytes : 1);
    if (!m || !buffer) {
        free(m);
        free(buffer);
        return top_error_set(err, TOP_ERR_NOMEM,
                             "out of memory for the moments of %zu channels (%zu bytes)", total,
                             bytes);
    }

    double *at = buffer;
    for (int i = 0; i <= last; i++) {
        m[i].count = node_channels(&g->nodes[i]);
        m[i].mean = at;
        m[i].second = at + m[i].count;
        at += 2 * m[i].count;
        top_status st = node_moments(m, g, i, err);
        if (st != TOP_OK) {
            free(buffer);
            free(m);
            return st;
        }
    }
    *all = m;
    return TOP_OK;
}

static void moments_free(moments *all)
{
    if (all)
        free(all[0].mean);
    free(all);
}

static top_status check_graph(const graph *g, top_error *err)
{
    if (!g || !g->finalized || g->n_nodes < 1)
        return top_error_set(
            err, TOP_ERR_INVALID,
            "the graph is missing or not finalized; call graph_finalize first");
    return TOP_OK;
}

top_status datafree_moments(double *mean, double *second, const graph *g, int node,
                            top_error *err)
{
    top_status st = check_graph(g, err);
    if (st != TOP_OK)
        return st;
    if (node < 0 || node >= g->n_nodes)
        return top_error_set(err, TOP_ERR_INVALID, "node index %d is outside 0..%d", node,
                             g->n_nodes - 1);
    if (!mean || !second)
        return top_error_set(err, TOP_ERR_INVALID,
                             "the mean and second-moment outputs are NULL");

    moments *all = NULL;
    st = propagate_moments(&all, g, node, err);
    if (st != TOP_OK)
        return st;
    copy_moments(&(moments){mean, second, all[node].count}, &all[node]);
    moments_free(all);
    return TOP_OK;
}

/* ---- scores ------------------------------------------------------------------ */

static float score_value(float w, double h)
{
    double v = 0.5 * (double)w * (double)w * h;
    return v > FLT_MAX ? FLT_MAX : (float)v;
}

/* DATAFREE_FLOOR times the mean second moment of the layer's input features. */
static double layer_floor(const double *second, size_t count)
{
    double sum = 0;
    for (size_t j = 0; j < count; j++)
        sum += second[j];
    double mean = count > 0 ? sum / (double)count : 0.0;
    return mean > 0 && isfinite(mean) ? DATAFREE_FLOOR * mean : DATAFREE_FLOOR;
}

/* Share of the `out_size` output rows at which kernel tap `tap` reads inside
 * an input of `in_size` rows that has `pad_before` zero rows before it. */
static double tap_share(int tap, int out_size, int in_size, int stride, int dilation,
                        int pad_before)
{
    long inside = 0;
    for (long p = 0; p < out_size; p++) {
        long row = p * stride + (long)tap * dilation - pad_before;
        inside += row >= 0 && row < in_size;
    }
    return out_size > 0 ? (double)inside / (double)out_size : 0.0;
}

/* The conv geometry with the padding of a zero-padding input node folded in. */
static conv2d_shape effective_geometry(const graph *g, const graph_node *nd)
{
    conv2d_shape s = nd->attrs.conv;
    const graph_node *in = &g->nodes[nd->inputs[0]];
    if (in->op == OP_ZEROPAD) {
        s.pad_top += in->attrs.pad_top;
        s.pad_bottom += in->attrs.pad_bottom;
        s.pad_left += in->attrs.pad_left;
        s.pad_right += in->attrs.pad_right;
        s.h -= in->attrs.pad_top + in->attrs.pad_bottom;
        s.w -= in->attrs.pad_left + in->attrs.pad_right;
    }
    return s;
}

static top_status conv_scores(float *scores, const float *w, const graph *g,
                              const graph_node *nd, const moments *x, top_error *err)
{
    /* w, scores: (K, C/G, R, S)  x: (C) */
    conv2d_shape s = effective_geometry(g, nd);
    size_t cg = (size_t)(s.c / s.groups), per_group = (size_t)(s.k / s.groups);
    double *share = malloc(((size_t)s.r + (size_t)s.s) * sizeof *share);
    if (!share)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for %d + %d tap shares", s.r,
                             s.s);
    for (int r = 0; r < s.r; r++)
        share[r] = tap_share(r, s.p, s.h, s.stride_h, s.dilation_h, s.pad_top);
    for (int t = 0; t < s.s; t++)
        share[s.r + t] = tap_share(t, s.q, s.w, s.stride_w, s.dilation_w, s.pad_left);

    double floor = layer_floor(x->second, x->count);
    size_t i = 0;
    for (size_t k = 0; k < (size_t)s.k; k++)
        for (size_t c = 0; c < cg; c++) {
            double h = x->second[(k / per_group) * cg + c];
            for (int r = 0; r < s.r; r++)
                for (int t = 0; t < s.s; t++, i++)
                    scores[i] = score_value(w[i], share[r] * share[s.r + t] * h + floor);
        }
    free(share);
    return TOP_OK;
}

/* Dense (OUT, IN) and attention weights: weight i multiplies feature i % IN. */
static void row_scores(float *scores, const float *w, size_t count, const moments *x,
                       int fallback)
{
    /* w, scores: (OUT, IN)  x: (IN) */
    double floor =
        fallback ? DATAFREE_FLOOR * FALLBACK_SECOND : layer_floor(x->second, x->count);
    for (size_t i = 0; i < count; i++) {
        double h = fallback ? FALLBACK_SECOND : x->second[i % x->count];
        scores[i] = score_value(w[i], h + floor);
    }
}

static top_status check_weights(const graph_param *gp, top_error *err)
{
    for (size_t i = 0; i < gp->value.numel; i++)
        if (!isfinite(gp->value.data[i]))
            return top_error_set(err, TOP_ERR_NUMERIC,
                                 "parameter '%s': weight %zu is %g; data-free scores need "
                                 "finite weights",
                                 gp->name, i, (double)gp->value.data[i]);
    return TOP_OK;
}

top_status datafree_scores(float *scores, const graph *g, int param, top_error *err)
{
    top_status st = check_graph(g, err);
    if (st != TOP_OK)
        return st;
    if (!graph_param_is_prunable(g, param))
        return top_error_set(err, TOP_ERR_INVALID,
                             "parameter %d is not a prunable conv, dense or attention weight; "
                             "pass an index for which graph_param_is_prunable is 1",
                             param);
    if (!scores)
        return top_error_set(err, TOP_ERR_INVALID, "the scores output is NULL");
    const graph_param *gp = &g->params[param];
    const graph_node *nd = &g->nodes[gp->node];
    st = check_weights(gp, err);
    if (st != TOP_OK)
        return st;

    int input = nd->inputs[0];
    moments *all = NULL;
    st = propagate_moments(&all, g, input, err);
    if (st != TOP_OK)
        return st;
    const moments *x = &all[input];
    const float *w = gp->value.data;
    if (nd->op == OP_CONV2D || nd->op == OP_PATCH_EMBED)
        st = conv_scores(scores, w, g, nd, x, err);
    else
        row_scores(scores, w, gp->value.numel, x,
                   nd->op == OP_MHSA && gp->slot == PARAM_OUT_WEIGHT);
    moments_free(all);
    return st;
}
