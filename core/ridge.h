/*
 * Closed-form multi-class ridge classifier, as scikit-learn's RidgeClassifier
 * fits it: one-vs-all targets in {-1, +1}, an intercept from centering,
 * optional balanced class weights, and the prediction argmax over classes.
 *
 *   sw_i = 1, or n / (C * count(y_i)) when balanced
 *   x_mean = sum_i sw_i x_i / sum_i sw_i, y_mean likewise
 *   (Xc^T S Xc + alpha I) B = Xc^T S Yc,  Xc = X - x_mean, S = diag(sw)
 *   coef = B^T (C, D),  intercept = y_mean - coef x_mean
 *
 * With two classes scikit-learn fits one column and predicts by its sign.
 * Here both columns are fitted and the second is the negation of the first,
 * so the argmax gives the same predictions.
 *
 * Features arrive as float32 (n, D) row-major; the normal equations are
 * accumulated and solved in double by Cholesky (dpotrf + dpotrs). Reentrant.
 */
#ifndef TOPIARY_RIDGE_H
#define TOPIARY_RIDGE_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

typedef struct ridge_options {
    double alpha; /* L2 penalty, > 0 (scikit-learn's default is 1.0) */
    int balanced; /* nonzero: class_weight="balanced" */
} ridge_options;

typedef struct ridge_model {
    size_t n_features; /* D */
    size_t n_classes;  /* C */
    double *coef;      /* (C, D), owned */
    double *intercept; /* (C), owned */
} ridge_model;

/*
 * Fits a model on x: (n, D) with labels in [0, C). model is overwritten and
 * owns its arrays on success (free with ridge_model_free). Errors:
 * TOP_ERR_INVALID for a label out of range, C < 2, alpha <= 0 or a
 * non-finite feature (the message names the sample); with balanced weights,
 * a class without samples. TOP_ERR_NUMERIC if the Cholesky fails.
 */
top_status ridge_fit(ridge_model *model, const float *x, const int32_t *labels, size_t n,
                     size_t n_features, size_t n_classes, const ridge_options *opt,
                     top_error *err);

/* Frees the arrays of a fitted model; safe on a zeroed model. */
void ridge_model_free(ridge_model *model);

/* scores: (n, C) = x coef^T + intercept, in double.  x: (n, D) */
void ridge_decision(double *scores, const ridge_model *model, const float *x, size_t n);

/* Top-1 labels: argmax of the decision scores, the lowest class on ties.
 * Allocates an (n, C) buffer in chunks; TOP_ERR_NOMEM if that fails. */
top_status ridge_predict(int32_t *labels, const ridge_model *model, const float *x, size_t n,
                         top_error *err);

/* Fraction of samples whose predicted label equals labels[i]; 0 for n = 0. */
top_status ridge_accuracy(double *accuracy, const ridge_model *model, const float *x,
                          const int32_t *labels, size_t n, top_error *err);

#endif
