/*
 * Masked fine-tuning of a pruned backbone on the source task.
 *
 * Losses, over a batch of n images, with f(x) the feature node's output (D):
 *   cross_entropy: mean cross-entropy of softmax(head(f(x))) against the task
 *     label, with the task's ridge head frozen (scores s = W f + b, W: (C, D));
 *     dL/df = W^T (softmax(s) - onehot(y)) / n.
 *   distill: mean squared distance to the dense model's features t(x) of the
 *     same images, L = sum ||f - t||^2 / (n D); dL/df = 2 (f - t) / (n D).
 *     Needs no labels and pulls the pruned features back to the dense ones
 *     that every evaluation head was fitted on.
 *
 * Update: SGD with momentum, the L2 weight decay added to the gradient (the
 * rule of torch.optim.SGD), for every trained parameter w with gradient g:
 *   g' = g + weight_decay * w;  v = momentum * v + g';  w = w - lr_t * v
 * with lr_t from the schedule: constant, or cosine, lr_t = lr * (1 + cos(pi
 * t / T)) / 2 for step t = 0 .. T - 1 of T steps.
 *
 * Trained: conv and dense weights and biases of the nodes before the feature
 * node; batch-norm gamma and beta too when batch norm trains. Frozen batch
 * norm runs in inference mode (running statistics, the update leaves gamma
 * and beta alone); training batch norm uses batch statistics and moves the
 * running ones by GRAPH_BN_MOMENTUM per batch.
 *
 * Masks: in each parameter listed in `masked`, the entries that are zero when
 * fine-tuning starts are pruned. Their gradient, velocity and value are set to
 * +0.0 after every step, so they end exactly zero and the sparsity measured on
 * the tensors does not change.
 *
 * Not done: gradient clipping, learning-rate warm-up, mixed precision.
 * Thread-safety: one call uses the graph alone; the batch iterator adds one
 * decoding thread.
 */
#ifndef TOPIARY_FINETUNE_H
#define TOPIARY_FINETUNE_H

#include <stddef.h>
#include <stdint.h>

#include "graph.h"
#include "ridge.h"
#include "status.h"

struct task_split; /* dataset.h */

typedef enum finetune_schedule {
    FINETUNE_SCHEDULE_COSINE,
    FINETUNE_SCHEDULE_CONSTANT,
} finetune_schedule;

typedef enum finetune_loss {
    FINETUNE_LOSS_CROSS_ENTROPY,
    FINETUNE_LOSS_DISTILL,
} finetune_loss;

typedef struct finetune_options {
    int epochs;          /* passes over the split, 1..100 */
    int batch_size;      /* 2..1024 images per step */
    double lr;           /* peak learning rate, > 0 */
    double momentum;     /* [0, 1) */
    double weight_decay; /* >= 0, L2 on the trained parameters */
    finetune_schedule schedule;
    finetune_loss loss; /* cross_entropy (default) or distill */
    int bn_train;       /* 0: batch norm frozen (default); 1: it trains */
    uint64_t seed;      /* order of the images in each epoch */
} finetune_options;

typedef struct finetune_result {
    size_t steps, images; /* optimiser steps, images per epoch */
    size_t trained;       /* values in the trained tensors, masked ones included */
    size_t masked;        /* pruned entries held at zero */
    double loss_first;    /* mean loss of the first epoch */
    double loss_last;     /* mean loss of the last epoch */
    double accuracy_first, accuracy_last; /* training top-1 with the head (NaN for distill) */
} finetune_result;

/* Defaults: 2 epochs, batch 16, lr 5e-5, momentum 0.9, weight decay 0,
 * cosine, batch norm frozen, seed 0. */
void finetune_options_init(finetune_options *opt);

/*
 * The loss of one batch: *loss += mean cross-entropy of softmax(head(feat))
 * against labels, *correct += top-1 hits, dfeat = its gradient with respect
 * to feat. feat, dfeat: (n, D); scores: (n, C) workspace.
 */
void finetune_head_loss(double *loss, size_t *correct, float *dfeat, double *scores,
                        const ridge_model *head, const float *feat, const int *labels, int n);

/* TOP_ERR_INVALID naming the first option out of range. */
top_status finetune_validate_options(const finetune_options *opt, top_error *err);

/* Static names: "cosine", "constant"; "cross_entropy", "distill". */
const char *finetune_schedule_name(finetune_schedule s);
const char *finetune_loss_name(finetune_loss l);

/* The distill loss of one batch: *loss += sum ||feat - target||^2 / (n D) and
 * dfeat = its gradient. targets[s] is the target row (D) of sample s.
 *   feat, dfeat: (n, D) */
void finetune_distill_loss(double *loss, float *dfeat, const float *feat,
                           const float *const *targets, int n, size_t d);

/* Called after every step: done out of total steps and the batch loss. */
typedef void (*finetune_progress_fn)(void *user, size_t done, size_t total, double loss);

/*
 * Fine-tunes g in place on split through the feature node `feature`. The
 * cross-entropy loss needs head (labels are its classes); distill needs
 * targets, (split count, D) dense features in split order. masked:
 * (n_masked) parameter indices whose zero entries stay zero. A raised *cancel stops at the next
 * batch with TOP_ERR_CANCELLED; progress and cancel may be NULL. On failure
 * the weights may be partly updated.
 */
top_status finetune_run(finetune_result *res, graph *g, int feature, const ridge_model *head,
                        const float *targets, const struct task_split *split, const int *masked,
                        int n_masked, const finetune_options *opt,
                        finetune_progress_fn progress, void *user, const volatile int *cancel,
                        top_error *err);

#endif
