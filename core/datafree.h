/*
 * Data-free OBD saliency: the diagonal of each layer's Hessian predicted from
 * the network's own batch-norm statistics, for pruning without calibration
 * data.
 *
 * For y = W x the layer-wise Hessian of the output reconstruction error is
 * H = 2 E[x x^T], so removing w_{k,j} alone costs about w_{k,j}^2 E[x_j^2].
 * The second moment E[x_j^2] of every input feature is predicted by
 * propagating a per-channel (mean, second moment) pair through the graph:
 * a batch norm's output is taken as N(beta, gamma^2 var / (var + eps)), and
 * the ops after it map those moments in closed form (datafree.c lists the
 * rule of every op and the fallbacks).
 *
 * Thread-safety: the functions read the graph and write only their outputs,
 * so several threads may score one graph while nobody modifies it.
 */
#ifndef TOPIARY_DATAFREE_H
#define TOPIARY_DATAFREE_H

#include "graph.h"
#include "status.h"

/* Relative floor added to every predicted second moment of a layer's input,
 * as a multiple of the layer's mean predicted second moment (see
 * datafree_scores). */
#define DATAFREE_FLOOR 1e-4

/*
 * Stores in mean[c] and second[c] the predicted mean and second moment E[x^2]
 * of channel c of node `node`'s output, for every channel of it. The channel
 * count is dims[0] for (C, H, W) and (D) outputs and dims[1] for (T, D)
 * outputs. Moments are averages over the spatial positions or tokens of a
 * sample. Needs a finalized graph. Errors: TOP_ERR_INVALID (bad node index or
 * graph not finalized), TOP_ERR_NOMEM, TOP_ERR_NUMERIC (a batch-norm or
 * layer-norm parameter makes a moment non-finite; the message names the node).
 */
top_status datafree_moments(double *mean, double *second, const graph *g, int node,
                            top_error *err);

/*
 * Stores the data-free OBD score of every element of prunable parameter
 * `param` (graph_param_is_prunable) in scores, which has the parameter's
 * numel entries in its engine layout:
 *
 *   scores[i] = 0.5 * w_i^2 * (t_i * E[x_j^2] + floor)
 *
 * where x is the node's input and j the input feature weight i multiplies:
 *   conv (K, C/G, R, S): channel (k / (K/G)) * (C/G) + c of the input map;
 *   dense (OUT, IN): feature IN of the input's last dimension (a dense after a
 *     flatten of (C, H, W) gets the moments of the channel each feature comes
 *     from, in the flatten's NCHW or NHWC order);
 *   patch embedding (D, C, P, P): image channel c;
 *   attention w_qkv (3D, D): model feature i % D; w_out (D, D): 1 (fallback).
 * t_i (conv and patch embedding only) is the share of the output positions at
 * which kernel tap (r, s) reads inside the input rather than in its zero
 * padding, including the padding of a zero-padding node right before the
 * conv. floor = DATAFREE_FLOOR * mean_j E[x_j^2] (or DATAFREE_FLOOR when that
 * mean is 0), so weights on channels predicted dead still rank by |w|.
 *
 * Scores are finite and >= 0 (float overflow is clamped to FLT_MAX); higher
 * means keep, as prune_mask_compute expects. Errors: TOP_ERR_INVALID (param
 * out of range or not prunable, graph not finalized), TOP_ERR_NUMERIC (a
 * weight is not finite; the message names the parameter and the index),
 * TOP_ERR_NOMEM, and the errors of datafree_moments.
 */
top_status datafree_scores(float *scores, const graph *g, int param, top_error *err);

/*
 * Moments of max(X, 0) and of min(max(X, 0), 6) for X ~ N(mu, sigma^2), in
 * closed form with the normal pdf and cdf. sigma = 0 gives the point value.
 */
void datafree_relu_moments(double *mean, double *second, double mu, double sigma);
void datafree_relu6_moments(double *mean, double *second, double mu, double sigma);

#endif
