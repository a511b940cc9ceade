/*
 * Masked fine-tuning (see finetune.h for the loss, the update and the masks).
 *
 * Shapes: n images per batch, D feature width, C classes of the head.
 *   features: (n, D) float32 from the graph; scores: (n, C) double;
 *   dfeat: (n, D) float32, the gradient handed to graph_backward.
 * Each epoch visits the split in a new order (Fisher-Yates on a copy of the
 * split, splitmix64 seeded with seed + epoch). When batch norm trains, a last
 * batch of a single image is skipped: batch statistics need two values.
 */
#include "finetune.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "dataset.h"

typedef struct trained_param {
    int index;       /* graph parameter */
    float *velocity; /* (numel) momentum buffer */
    uint8_t *keep;   /* (numel) 1 = trainable entry; NULL: every entry trains */
} trained_param;

typedef struct ft_ctx {
    graph *g;
    int feature;
    const ridge_model *head;
    const float *targets; /* distill: (split count, D) in split order */
    const size_t *pos;    /* this epoch: split position of each shuffled image */
    const float **rows;   /* (batch) target row of each sample of a batch */
    const finetune_options *opt;
    trained_param *params;
    int n_params;
    double *scores; /* (batch, C) */
    float *dfeat;   /* (batch, D) */
    size_t step, total_steps;
    finetune_progress_fn progress;
    void *user;
    const volatile int *cancel;
} ft_ctx;

void finetune_options_init(finetune_options *opt)
{
    memset(opt, 0, sizeof *opt);
    opt->epochs = 2;
    opt->batch_size = 16;
    opt->lr = 5e-5;
    opt->momentum = 0.9;
    opt->weight_decay = 0.0;
    opt->schedule = FINETUNE_SCHEDULE_COSINE;
}

const char *finetune_schedule_name(finetune_schedule s)
{
    return s == FINETUNE_SCHEDULE_CONSTANT ? "constant" : "cosine";
}

const char *finetune_loss_name(finetune_loss l)
{
    return l == FINETUNE_LOSS_DISTILL ? "distill" : "cross_entropy";
}

top_status finetune_validate_options(const finetune_options *o, top_error *err)
{
    if (o->epochs < 1 || o->epochs > 100)
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning epochs %d is out of range; pass 1 to 100", o->epochs);
    if (o->batch_size < 2 || o->batch_size > 1024)
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning batch size %d is out of range; pass 2 to 1024",
                             o->batch_size);
    if (!(o->lr > 0.0 && o->lr <= 1.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning learning rate %g is out of range; pass a value in "
                             "(0, 1], such as 5e-5",
                             o->lr);
    if (!(o->momentum >= 0.0 && o->momentum < 1.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning momentum %g is out of range; pass a value in [0, 1)",
                             o->momentum);
    if (!(o->weight_decay >= 0.0 && o->weight_decay <= 1.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning weight decay %g is out of range; pass a value in "
                             "[0, 1], such as 1e-4",
                             o->weight_decay);
    return TOP_OK;
}

static top_status validate(const finetune_options *o, const graph *g, int feature,
                           const ridge_model *head, const float *targets,
                           const task_split *split, top_error *err)
{
    top_status st = finetune_validate_options(o, err);
    if (st != TOP_OK)
        return st;
    if (o->loss == FINETUNE_LOSS_DISTILL ? !targets : !head)
        return top_error_set(
            err, TOP_ERR_INVALID, "fine-tuning loss %s needs %s; pass them to finetune_run",
            finetune_loss_name(o->loss),
            o->loss == FINETUNE_LOSS_DISTILL ? "the dense features as targets" : "a head");
    if (o->loss == FINETUNE_LOSS_DISTILL) {
        if (feature < 0 || feature >= g->n_nodes)
            return top_error_set(err, TOP_ERR_INVALID, "feature node %d is not in the graph",
                                 feature);
        return split->count < 2 ? top_error_set(err, TOP_ERR_INVALID,
                                                "fine-tuning needs at least 2 images, the "
                                                "split has %zu",
                                                split->count)
                                : TOP_OK;
    }
    if (feature < 0 || feature >= g->n_nodes)
        return top_error_set(err, TOP_ERR_INVALID, "feature node %d is not in the graph",
                             feature);
    if (head->n_features != g->nodes[feature].sample_numel)
        return top_error_set(
            err, TOP_ERR_SHAPE, "the head takes %zu features but node '%s' gives %zu",
            head->n_features, g->nodes[feature].name, g->nodes[feature].sample_numel);
    if (split->count < 2)
        return top_error_set(err, TOP_ERR_INVALID,
                             "fine-tuning needs at least 2 images, the split has %zu; "
                             "raise the fine-tuning image count",
                             split->count);
    for (size_t i = 0; i < split->count; i++)
        if (split->labels[i] < 0 || (size_t)split->labels[i] >= head->n_classes)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "fine-tuning label %d of image %zu is not a class of the "
                                 "head (%zu classes)",
                                 split->labels[i], i, head->n_classes);
    return TOP_OK;
}

/* ---- parameters --------------------------------------------------------------- */

static int is_trained(const graph *g, int p, int feature, int bn_train)
{
    const graph_param *gp = &g->params[p];
    if (gp->node >= feature)
        return 0;
    if (gp->role == PARAM_ROLE_WEIGHT || gp->role == PARAM_ROLE_BIAS)
        return 1;
    return bn_train && gp->role == PARAM_ROLE_NORM && g->nodes[gp->node].op == OP_BATCHNORM;
}

static int is_masked(int p, const int *masked, int n_masked)
{
    for (int i = 0; i < n_masked; i++)
        if (masked[i] == p)
            return 1;
    return 0;
}

static void params_free(trained_param *tp, int n)
{
    for (int i = 0; tp && i < n; i++) {
        free(tp[i].velocity);
        free(tp[i].keep);
    }
    free(tp);
}

/* Lists the trained parameters with zeroed velocities and, for masked ones,
 * the keep mask read off the current values. */
static top_status params_new(ft_ctx *c, finetune_result *res, const int *masked, int n_masked,
                             top_error *err)
{
    graph *g = c->g;
    c->params = calloc((size_t)g->n_params + 1, sizeof *c->params);
    if (!c->params)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the trained parameters");
    for (int p = 0; p < g->n_params; p++) {
        if (!is_trained(g, p, c->feature, c->opt->bn_train))
            continue;
        const tensor *v = &g->params[p].value;
        trained_param *tp = &c->params[c->n_params++];
        tp->index = p;
        tp->velocity = calloc(v->numel ? v->numel : 1, sizeof *tp->velocity);
        if (!tp->velocity)
            return top_error_set(err, TOP_ERR_NOMEM,
                                 "out of memory for the momentum of '%s' (%zu values)",
                                 g->params[p].name, v->numel);
        res->trained += v->numel;
        if (!is_masked(p, masked, n_masked))
            continue;
        tp->keep = malloc(v->numel ? v->numel : 1);
        if (!tp->keep)
            return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the mask of '%s'",
                                 g->params[p].name);
        for (size_t i = 0; i < v->numel; i++) {
            tp->keep[i] = v->data[i] != 0.0f;
            res->masked += !tp->keep[i];
        }
    }
    return TOP_OK;
}

/* One SGD step with momentum and weight decay; masked entries end at +0.0. */
static void sgd_step(ft_ctx *c, double lr)
{
    const finetune_options *o = c->opt;
    for (int i = 0; i < c->n_params; i++) {
        trained_param *tp = &c->params[i];
        graph_param *gp = &c->g->params[tp->index];
        float *w = gp->value.data, *v = tp->velocity;
        const float *grad = gp->grad;
        if (!grad)
            continue; /* not on the path of this backward */
        size_t n = gp->value.numel;
        for (size_t k = 0; k < n; k++) {
            if (tp->keep && !tp->keep[k]) {
                v[k] = 0.0f;
                w[k] = 0.0f;
                continue;
            }
            double gk = (double)grad[k] + o->weight_decay * (double)w[k];
            double vk = o->momentum * (double)v[k] + gk;
            v[k] = (float)vk;
            w[k] = (float)((double)w[k] - lr * vk);
        }
    }
}

static double schedule_lr(const finetune_options *o, size_t step, size_t total)
{
    if (o->schedule == FINETUNE_SCHEDULE_CONSTANT || total == 0)
        return o->lr;
    const double pi = 3.14159265358979323846;
    return o->lr * 0.5 * (1.0 + cos(pi * (double)step / (double)total));
}

/* ---- loss --------------------------------------------------------------------- */

void finetune_head_loss(double *loss, size_t *correct, float *dfeat, double *scores,
                        const ridge_model *h, const float *feat, const int *labels, int n)
{
    size_t k = h->n_classes, d = h->n_features;
    ridge_decision(scores, h, feat, (size_t)n);
    double total = 0.0;
    for (int s = 0; s < n; s++) {
        double *sc = scores + (size_t)s * k;
        size_t best = 0;
        for (size_t j = 1; j < k; j++)
            best = sc[j] > sc[best] ? j : best;
        *correct += best == (size_t)labels[s];
        double mx = sc[best], sum = exp(sc[0] - mx); /* the best class adds 1 */
        for (size_t j = 1; j < k; j++)
            sum += exp(sc[j] - mx);
        total += mx + log(sum) - sc[labels[s]];
        for (size_t j = 0; j < k; j++)
            sc[j] = (exp(sc[j] - mx) / sum - (j == (size_t)labels[s] ? 1.0 : 0.0)) / n;
        float *df = dfeat + (size_t)s * d;
        for (size_t i = 0; i < d; i++) {
            double acc = 0.0;
            for (size_t j = 0; j < k; j++)
                acc += h->coef[j * d + i] * sc[j];
            df[i] = (float)acc;
        }
    }
    *loss += total / n;
}

void finetune_distill_loss(double *loss, float *dfeat, const float *feat,
                           const float *const *targets, int n, size_t d)
{
    double total = 0.0, scale = 1.0 / ((double)n * (double)d);
    for (int s = 0; s < n; s++) {
        const float *f = feat + (size_t)s * d, *t = targets[s];
        float *df = dfeat + (size_t)s * d;
        for (size_t i = 0; i < d; i++) {
            double diff = (double)f[i] - (double)t[i];
            total += diff * diff;
            df[i] = (float)(2.0 * diff * scale);
        }
    }
    *loss += total * scale;
}

/* ---- epochs ------------------------------------------------------------------- */

/* A copy of split in a new order: indices and labels permuted together, and
 * pos[k] = the position in split of the k-th image of the copy. */
static top_status shuffled_split(task_split *out, size_t **pos_out, const task_split *in,
                                 uint64_t seed, top_error *err)
{
    *out = *in;
    out->indices = malloc(in->count * sizeof *out->indices);
    out->labels = malloc(in->count * sizeof *out->labels);
    size_t *pos = malloc(in->count * sizeof *pos);
    if (!out->indices || !out->labels || !pos) {
        free(out->indices);
        free(out->labels);
        free(pos);
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the order of %zu images",
                             in->count);
    }
    memcpy(out->indices, in->indices, in->count * sizeof *out->indices);
    memcpy(out->labels, in->labels, in->count * sizeof *out->labels);
    for (size_t i = 0; i < in->count; i++)
        pos[i] = i;
    *pos_out = pos;
    uint64_t state = seed;
    for (size_t i = in->count - 1; i > 0; i--) {
        size_t j = (size_t)(task_splitmix64(&state) % (uint64_t)(i + 1));
        size_t ti = out->indices[i];
        out->indices[i] = out->indices[j];
        out->indices[j] = ti;
        int tl = out->labels[i];
        out->labels[i] = out->labels[j];
        out->labels[j] = tl;
        size_t tp = pos[i];
        pos[i] = pos[j];
        pos[j] = tp;
    }
    return TOP_OK;
}

/* One training step on batch b: forward, loss, backward, update. */
static top_status train_batch(ft_ctx *c, const batch *b, double *loss, size_t *correct,
                              top_error *err)
{
    graph_mode mode = c->opt->bn_train ? GRAPH_MODE_TRAIN : GRAPH_MODE_INFERENCE;
    top_error e;
    top_error_clear(&e);
    top_status st = graph_forward(c->g, b->x, b->n, mode, &e);
    if (st == TOP_ERR_NOMEM || st == TOP_ERR_LIMIT)
        return top_error_set(err, st,
                             "fine-tuning batch of %d images: %s; lower the fine-tuning "
                             "batch size",
                             b->n, e.message);
    if (st != TOP_OK)
        return top_error_set(err, st, "%s", e.message);
    const float *feat = graph_node_output(c->g, c->feature);
    size_t d = c->g->nodes[c->feature].sample_numel;
    if (c->opt->loss == FINETUNE_LOSS_DISTILL) {
        for (int s = 0; s < b->n; s++)
            c->rows[s] = c->targets + c->pos[b->first + (size_t)s] * d;
        finetune_distill_loss(loss, c->dfeat, feat, c->rows, b->n, d);
    } else {
        finetune_head_loss(loss, correct, c->dfeat, c->scores, c->head, feat, b->labels, b->n);
    }
    graph_zero_grad(c->g);
    st = graph_backward(c->g, c->feature, c->dfeat, NULL, err);
    if (st != TOP_OK)
        return st;
    sgd_step(c, schedule_lr(c->opt, c->step, c->total_steps));
    c->step++;
    return TOP_OK;
}

static top_status run_epoch(ft_ctx *c, const task_split *split, int epoch, double *mean_loss,
                            double *accuracy, top_error *err)
{
    task_split order;
    size_t *pos = NULL;
    top_status st = shuffled_split(&order, &pos, split, c->opt->seed + (uint64_t)epoch, err);
    if (st != TOP_OK)
        return st;
    c->pos = pos;
    batch_iter *it = NULL;
    st = batch_iter_new(&it, &order, &c->g->preprocess, c->opt->batch_size, err);
    double loss = 0.0;
    size_t correct = 0, seen = 0;
    while (st == TOP_OK) {
        const batch *b = NULL;
        st = batch_iter_next(it, &b, err);
        if (st == TOP_OK && c->cancel && *c->cancel)
            st = top_error_set(err, TOP_ERR_CANCELLED, "fine-tuning was cancelled");
        if (st != TOP_OK || b->n == 0 || (c->opt->bn_train && b->n < 2))
            break;
        double batch_loss = 0.0;
        st = train_batch(c, b, &batch_loss, &correct, err);
        loss += batch_loss * b->n;
        seen += (size_t)b->n;
        if (st == TOP_OK && c->progress)
            c->progress(c->user, c->step, c->total_steps, batch_loss);
    }
    batch_iter_free(it);
    free(order.indices);
    free(order.labels);
    free(pos);
    c->pos = NULL;
    *mean_loss = seen ? loss / (double)seen : 0.0;
    *accuracy =
        !seen || c->opt->loss == FINETUNE_LOSS_DISTILL ? NAN : (double)correct / (double)seen;
    if (st == TOP_OK && !isfinite(*mean_loss))
        st = top_error_set(err, TOP_ERR_NUMERIC,
                           "fine-tuning diverged in epoch %d (loss %g); lower the learning "
                           "rate, now %g",
                           epoch + 1, *mean_loss, c->opt->lr);
    return st;
}

top_status finetune_run(finetune_result *res, graph *g, int feature, const ridge_model *head,
                        const float *targets, const task_split *split, const int *masked,
                        int n_masked, const finetune_options *opt,
                        finetune_progress_fn progress, void *user, const volatile int *cancel,
                        top_error *err)
{
    if (!res || !g || !split || !opt)
        return top_error_set(err, TOP_ERR_INVALID, "finetune_run: an argument is NULL");
    memset(res, 0, sizeof *res);
    top_status st = validate(opt, g, feature, head, targets, split, err);
    if (st != TOP_OK)
        return st;
    ft_ctx c = {.g = g,
                .feature = feature,
                .head = head,
                .targets = targets,
                .opt = opt,
                .progress = progress,
                .user = user,
                .cancel = cancel};
    size_t bsz = (size_t)opt->batch_size;
    size_t per_epoch = split->count / bsz + (split->count % bsz >= (opt->bn_train ? 2u : 1u));
    c.total_steps = per_epoch * (size_t)opt->epochs;
    size_t d = g->nodes[feature].sample_numel;
    c.scores = malloc(bsz * (head ? head->n_classes : 1) * sizeof *c.scores);
    c.dfeat = malloc(bsz * d * sizeof *c.dfeat);
    c.rows = malloc(bsz * sizeof *c.rows);
    if (!c.scores || !c.dfeat || !c.rows)
        st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the loss gradient");
    if (st == TOP_OK)
        st = params_new(&c, res, masked, n_masked, err);
    for (int e = 0; st == TOP_OK && e < opt->epochs; e++) {
        double loss = 0.0, acc = 0.0;
        st = run_epoch(&c, split, e, &loss, &acc, err);
        if (e == 0) {
            res->loss_first = loss;
            res->accuracy_first = acc;
        }
        res->loss_last = loss;
        res->accuracy_last = acc;
    }
    res->steps = c.step;
    res->images = split->count;
    graph_zero_grad(g);
    params_free(c.params, c.n_params);
    free(c.scores);
    free(c.dfeat);
    free(c.rows);
    return st;
}
