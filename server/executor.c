/*
 * The job executor (see executor.h).
 *
 * Loop thread: runs a uv_loop with one uv_async (wake) and one uv_timer
 * (poll). Both call dispatch(), which claims queued jobs from the store with
 * the loop's own connection while a worker slot is idle and hands each job to
 * that slot. Worker threads: each waits on its slot's condition variable,
 * runs the job with its own store connection, records the outcome and sends
 * the wake signal so that the loop claims the next job.
 *
 * Progress: the pipeline reports (stage, done, total); run_progress maps that
 * to a fraction of the whole job with fixed stage weights and writes it to the
 * store at most once per progress_interval_ms (and at each new stage). The
 * store returns the job's cancel_requested flag on every write, which raises
 * the worker's cancel flag; executor_cancel raises it at once.
 *
 * Owns: the loop, its handles, the worker threads and slots, and the job
 * duration histogram (guarded by mu).
 */
#include "executor.h"

#include <errno.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <uv.h>

#include "head_cache.h"
#include "log.h"

const double executor_duration_bounds[EXECUTOR_DURATION_BUCKETS] = {
    1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600,
};

typedef struct worker_slot {
    struct executor *ex;
    int index;
    uv_thread_t thread;
    uv_cond_t cond;
    json_t *job; /* the claimed job, or NULL when idle */
    char job_id[STORE_ID_MAX];
    volatile int cancel; /* read by pipeline_run between batches */
    int alive;
    int started;
} worker_slot;

struct executor {
    executor_config cfg;
    char *database_path;
    char *artifact_dir;

    uv_loop_t loop;
    uv_async_t wake;
    uv_timer_t poll;
    uv_thread_t loop_thread;
    int loop_started;
    store *loop_store;

    uv_mutex_t mu;       /* guards everything below and each slot's job fields */
    uv_cond_t idle_cond; /* signalled when a worker finishes a job */
    worker_slot *slots;
    int draining;
    int stopping; /* the loop closes its handles */
    int quit;     /* the workers exit */
    uint64_t duration_counts[EXECUTOR_DURATION_BUCKETS + 1];
    double duration_sum_s;
    uint64_t duration_count;
};

/* ---- progress ------------------------------------------------------------ */

/* The pipeline's stages in order and the share of a job's time each takes;
 * ft marks the fine-tuning stages, which get FT_SHARE of a job that
 * fine-tunes and none of one that does not. A stage the pipeline runs twice
 * (the batch-norm correction after fine-tuning) counts once: progress never
 * goes back.
 * NOTE: the shares are rough guesses, so progress and ETA are estimates; only
 * the stage order is exact. */
static const struct {
    const char *name;
    double weight;
    int ft;
} stage_weights[] = {
    {"load", 0.02, 0},
    {"dense features", 0.40, 0},
    {"bn dense statistics", 0.03, 0},
    {"saliency", 0.15, 0},
    {"mask", 0.02, 0},
    {"layer obs", 0.0, 0}, /* layer_obs runs it instead of saliency */
    {"bn recalibration", 0.0, 0},
    {"bn correction", 0.10, 0},
    {"pruned evaluation", 0.23, 0},
    {"fine-tuning", 0.85, 1},
    {"fine-tuned evaluation", 0.15, 1},
    {"checkpoints", 0.05, 0},
};
#define FT_SHARE 0.5
#define N_STAGES (sizeof stage_weights / sizeof stage_weights[0])

typedef struct run_state {
    worker_slot *slot;
    store *db;
    double start_s;
    double last_write_s;
    int stage;       /* index into stage_weights, -1 before the first */
    int finetune;    /* the job fine-tunes */
    double progress; /* 0..1, never decreases */
} run_state;

static double monotonic_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static double stage_weight(const run_state *rs, int i)
{
    if (stage_weights[i].ft)
        return rs->finetune ? FT_SHARE * stage_weights[i].weight : 0.0;
    return rs->finetune ? (1.0 - FT_SHARE) * stage_weights[i].weight : stage_weights[i].weight;
}

static int stage_index(const char *name)
{
    for (size_t i = 0; i < N_STAGES; i++)
        if (!strcmp(stage_weights[i].name, name))
            return (int)i;
    return -1;
}

static void run_progress(void *user, const char *stage, size_t done, size_t total)
{
    run_state *rs = user;
    int idx = stage_index(stage);
    int new_stage = idx >= 0 && idx != rs->stage;
    if (idx >= 0)
        rs->stage = idx;

    double before = 0.0;
    for (int i = 0; i < rs->stage; i++)
        before += stage_weight(rs, i);
    double within = total ? (double)done / (double)total : 0.0;
    double p = rs->stage >= 0 ? before + stage_weight(rs, rs->stage) * within : 0.0;
    if (p > rs->progress)
        rs->progress = p < 1.0 ? p : 1.0;

    double now = monotonic_s();
    if (!new_stage && now - rs->last_write_s < 1e-3 * rs->slot->ex->cfg.progress_interval_ms)
        return;
    rs->last_write_s = now;
    double elapsed = now - rs->start_s;
    double eta = rs->progress > 0.02 ? elapsed * (1.0 - rs->progress) / rs->progress : -1.0;

    bool cancel_requested = false;
    top_error err;
    top_error_clear(&err);
    if (store_job_progress(rs->db, rs->slot->job_id, stage, rs->progress, eta,
                           &cancel_requested, &err) != TOP_OK)
        log_warn("executor", rs->slot->job_id, "progress write failed", "error=%s",
                 err.message);
    if (cancel_requested)
        rs->slot->cancel = 1;
}

/* ---- one job ------------------------------------------------------------- */

static const char *json_str(const json_t *obj, const char *key)
{
    return json_string_value(json_object_get(obj, key));
}

static top_status bad_member(top_error *err, const char *name)
{
    return top_error_set(err, TOP_ERR_FORMAT,
                         "job request member '%s' is missing or has the wrong type; "
                         "resubmit the job",
                         name);
}

static top_status counts_from(size_t *a, size_t *b, const json_t *obj, const char *ka,
                              const char *kb, top_error *err)
{
    json_t *va = json_object_get(obj, ka), *vb = json_object_get(obj, kb);
    if (!json_is_integer(va) || json_integer_value(va) < 1)
        return bad_member(err, ka);
    if (!json_is_integer(vb) || json_integer_value(vb) < 1)
        return bad_member(err, kb);
    *a = (size_t)json_integer_value(va);
    *b = (size_t)json_integer_value(vb);
    return TOP_OK;
}

static top_status eval_from_request(pipeline_options *opt, const json_t *request,
                                    const json_t *resolved, top_error *err)
{
    const json_t *uris = json_object_get(resolved, "evaluation_uris");
    if (!json_is_array(uris) || json_array_size(uris) == 0 ||
        json_array_size(uris) > PIPELINE_MAX_EVAL_TASKS)
        return bad_member(err, "resolved.evaluation_uris");
    for (size_t i = 0; i < json_array_size(uris); i++) {
        opt->eval_uris[i] = json_string_value(json_array_get(uris, i));
        if (!opt->eval_uris[i])
            return bad_member(err, "resolved.evaluation_uris");
    }
    opt->n_eval = (int)json_array_size(uris);
    return counts_from(&opt->eval_fit_count, &opt->eval_count,
                       json_object_get(request, "evaluation"), "head_fit_images", "images",
                       err);
}

static top_status options_from_method(pipeline_options *opt, const json_t *request,
                                      top_error *err)
{
    const char *method = json_str(request, "method");
    if (!method)
        return bad_member(err, "method");
    if (!strcmp(method, "magnitude"))
        opt->method = PIPELINE_METHOD_MAGNITUDE;
    else if (!strcmp(method, "obd"))
        opt->method = PIPELINE_METHOD_OBD;
    else if (!strcmp(method, "obs"))
        opt->method = PIPELINE_METHOD_OBS;
    else if (!strcmp(method, "layer_obs"))
        opt->method = PIPELINE_METHOD_LAYER_OBS;
    else if (!strcmp(method, "data_free"))
        opt->method = PIPELINE_METHOD_DATA_FREE;
    else
        return bad_member(err, "method");
    const json_t *mo = json_object_get(request, "method_options");
    const json_t *v;
    if (json_is_integer(v = json_object_get(mo, "block_size")))
        opt->obs_block = (size_t)json_integer_value(v);
    if (json_is_boolean(v = json_object_get(mo, "obs_update")))
        opt->obs_update = json_is_true(v);
    const char *alloc = json_str(mo, "allocation");
    if (alloc)
        opt->allocation = !strcmp(alloc, "obd")       ? PIPELINE_ALLOC_OBD
                          : !strcmp(alloc, "uniform") ? PIPELINE_ALLOC_UNIFORM
                                                      : PIPELINE_ALLOC_MAGNITUDE;
    const json_t *damping = json_object_get(mo, "damping");
    if (json_is_number(damping))
        opt->damping = json_number_value(damping);
    const char *mode = json_str(mo, "damping_mode");
    if (mode)
        opt->damping_mode =
            strcmp(mode, "absolute") ? PIPELINE_DAMPING_RELATIVE : PIPELINE_DAMPING_ABSOLUTE;
    return TOP_OK;
}

static void options_from_extra(pipeline_options *opt, const json_t *request)
{
    const json_t *o = json_object_get(request, "options");
    const json_t *v;
    if (json_is_integer(v = json_object_get(o, "seed")))
        opt->seed = (uint64_t)json_integer_value(v);
    if (json_is_number(v = json_object_get(o, "ridge_alpha")))
        opt->ridge_alpha = json_number_value(v);
    if (json_is_integer(v = json_object_get(o, "batch_size")))
        opt->batch_size = (int)json_integer_value(v);
    if (json_is_boolean(v = json_object_get(o, "bn_recalibration")))
        opt->bn_recalibration = json_is_true(v);
    const char *bn = json_str(o, "bn_correction");
    if (bn && !strcmp(bn, "none"))
        opt->bn_recalibration = 0;
    else if (bn)
        opt->bn_mode =
            strcmp(bn, "reestimate") ? PIPELINE_BN_MATCH_DENSE : PIPELINE_BN_REESTIMATE;
    if (json_is_integer(v = json_object_get(o, "bn_passes")))
        opt->bn_passes = (int)json_integer_value(v);

    const json_t *m = json_object_get(request, "mask");
    const char *scope = json_str(m, "scope");
    if (scope)
        opt->scope = strcmp(scope, "per_layer") ? PRUNE_SCOPE_GLOBAL : PRUNE_SCOPE_PER_LAYER;
    const char *gran = json_str(m, "granularity");
    if (gran && strcmp(gran, "unstructured") &&
        sscanf(gran, "%d:%d", &opt->nm_n, &opt->nm_m) != 2)
        opt->nm_n = opt->nm_m = 0;
    if (json_is_number(v = json_object_get(m, "min_density")))
        opt->min_density = json_number_value(v);
    if (json_is_integer(v = json_object_get(m, "rounds")))
        opt->rounds = (int)json_integer_value(v);
    opt->layers = json_str(m, "layers");
    opt->skip_layers = json_str(m, "skip_layers");
    opt->feature_node = json_str(o, "feature_node");
}

/* Copies the normalised finetune object (api/jobs.c fills every member) into opt. */
static void options_from_finetune(pipeline_options *opt, const json_t *request)
{
    const json_t *f = json_object_get(request, "finetune"), *v;
    if (!json_is_object(f))
        return;
    opt->finetune = 1;
    finetune_options *ft = &opt->ft;
    if (json_is_integer(v = json_object_get(f, "images")))
        opt->finetune_count = (size_t)json_integer_value(v);
    if (json_is_integer(v = json_object_get(f, "epochs")))
        ft->epochs = (int)json_integer_value(v);
    if (json_is_integer(v = json_object_get(f, "batch_size")))
        ft->batch_size = (int)json_integer_value(v);
    if (json_is_number(v = json_object_get(f, "lr")))
        ft->lr = json_number_value(v);
    if (json_is_number(v = json_object_get(f, "momentum")))
        ft->momentum = json_number_value(v);
    if (json_is_number(v = json_object_get(f, "weight_decay")))
        ft->weight_decay = json_number_value(v);
    const char *s = json_str(f, "schedule");
    if (s)
        ft->schedule =
            strcmp(s, "constant") ? FINETUNE_SCHEDULE_COSINE : FINETUNE_SCHEDULE_CONSTANT;
    s = json_str(f, "loss");
    if (s)
        ft->loss = strcmp(s, "distill") ? FINETUNE_LOSS_CROSS_ENTROPY : FINETUNE_LOSS_DISTILL;
    s = json_str(f, "batch_norm");
    if (s)
        ft->bn_train = !strcmp(s, "train");
}

top_status executor_options_from_request(pipeline_options *opt, const json_t *request,
                                         top_error *err)
{
    pipeline_options_init(opt);
    const json_t *resolved = json_object_get(request, "resolved");
    opt->model_path = json_str(resolved, "model_path");
    if (!opt->model_path)
        return bad_member(err, "resolved.model_path");
    const json_t *q = json_object_get(request, "sparsity");
    if (!json_is_number(q))
        return bad_member(err, "sparsity");
    opt->sparsity = json_number_value(q);
    top_status st = options_from_method(opt, request, err);
    if (st != TOP_OK)
        return st;

    opt->calib_uri = json_str(resolved, "calibration_uri");
    const char *head = json_str(json_object_get(request, "calibration"), "head");
    opt->calib_model_head = head && !strcmp(head, "model");
    if (opt->calib_uri) {
        st = counts_from(&opt->calib_count, &opt->calib_fit_count,
                         json_object_get(request, "calibration"), "images", "head_fit_images",
                         err);
        if (st != TOP_OK)
            return st;
    }
    st = eval_from_request(opt, request, resolved, err);
    if (st != TOP_OK)
        return st;
    options_from_extra(opt, request);
    options_from_finetune(opt, request);
    return TOP_OK;
}

static void record_duration(executor *ex, double seconds)
{
    uv_mutex_lock(&ex->mu);
    int b = 0;
    while (b < EXECUTOR_DURATION_BUCKETS && seconds > executor_duration_bounds[b])
        b++;
    ex->duration_counts[b]++;
    ex->duration_sum_s += seconds;
    ex->duration_count++;
    uv_mutex_unlock(&ex->mu);
}

static void artifact_from(store_artifact *a, const json_t *ckpt)
{
    a->path = json_str(ckpt, "path");
    a->size = (uint64_t)json_integer_value(json_object_get(ckpt, "bytes"));
    a->sha256 = json_str(ckpt, "sha256");
}

/* Records a successful run: report, artifacts and per-task accuracies. */
static top_status record_success(store *db, const char *id, const json_t *request,
                                 const json_t *report, top_error *err)
{
    store_job_outcome out = {.result = report};
    const json_t *ckpts = json_object_get(report, "checkpoints");
    artifact_from(&out.dense, json_object_get(ckpts, "dense"));
    artifact_from(&out.compressed, json_object_get(ckpts, "compressed"));

    const json_t *tasks = json_object_get(report, "tasks");
    const json_t *names = json_object_get(json_object_get(request, "evaluation"), "tasks");
    store_task_result results[PIPELINE_MAX_EVAL_TASKS];
    size_t n = json_array_size(tasks);
    if (n > PIPELINE_MAX_EVAL_TASKS)
        n = PIPELINE_MAX_EVAL_TASKS;
    for (size_t i = 0; i < n; i++) {
        const json_t *t = json_array_get(tasks, i);
        const char *warning = json_str(t, "head_cache_warning");
        if (warning)
            log_warn("executor", id, "the head cache failed; the head was fitted anew",
                     "task=%s error=%s", json_str(t, "uri"), warning);
        const json_t *dense = json_object_get(t, "dense_accuracy");
        const json_t *pruned = json_object_get(t, "pruned_accuracy");
        const json_t *tuned = json_object_get(t, "finetuned_accuracy");
        const char *name = json_string_value(json_array_get(names, i));
        results[i] = (store_task_result){
            .task = name ? name : json_str(t, "uri"),
            .dense_accuracy = json_is_number(dense) ? json_number_value(dense) : NAN,
            .pruned_accuracy = json_is_number(pruned) ? json_number_value(pruned) : NAN,
            .finetuned_accuracy = json_is_number(tuned) ? json_number_value(tuned) : NAN,
        };
    }
    out.tasks = results;
    out.task_count = n;

    const json_t *layers = json_object_get(report, "layers");
    size_t n_layers = json_array_size(layers);
    store_layer_sparsity *ls = n_layers ? calloc(n_layers, sizeof *ls) : NULL;
    if (n_layers && !ls)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for %zu layer results",
                             n_layers);
    for (size_t i = 0; i < n_layers; i++) {
        const json_t *l = json_array_get(layers, i);
        ls[i] = (store_layer_sparsity){
            .layer = json_str(l, "name") ? json_str(l, "name") : "",
            .weights = (int64_t)json_integer_value(json_object_get(l, "count")),
            .zeros = (int64_t)json_integer_value(json_object_get(l, "zeros")),
        };
    }
    out.layers = ls;
    out.layer_count = n_layers;
    top_status st = store_job_succeed(db, id, &out, err);
    free(ls);
    return st;
}

/* Stores the outcome of pipeline_run; st and run_err are its result. */
static void record_outcome(worker_slot *slot, store *db, const json_t *request,
                           const json_t *report, const char *dir, top_status st,
                           const top_error *run_err)
{
    executor *ex = slot->ex;
    top_error err;
    top_error_clear(&err);
    top_status wst;
    const char *outcome;
    if (st == TOP_OK) {
        outcome = "succeeded";
        wst = record_success(db, slot->job_id, request, report, &err);
    } else if (st == TOP_ERR_CANCELLED && ex->draining) {
        outcome = "interrupted";
        pipeline_remove_outputs(dir);
        wst = store_job_transition(db, slot->job_id, STORE_JOB_RUNNING, STORE_JOB_QUEUED, &err);
    } else if (st == TOP_ERR_CANCELLED) {
        outcome = "cancelled";
        pipeline_remove_outputs(dir);
        wst = store_job_transition(db, slot->job_id, STORE_JOB_RUNNING, STORE_JOB_CANCELLED,
                                   &err);
    } else {
        outcome = "failed";
        pipeline_remove_outputs(dir);
        wst = store_job_fail(db, slot->job_id, run_err->message, &err);
    }
    if (st != TOP_OK && st != TOP_ERR_CANCELLED)
        log_warn("executor", slot->job_id, "job failed", "status=%s error=%s",
                 top_status_str(st), run_err->message);
    if (wst != TOP_OK)
        log_error("executor", slot->job_id, "cannot record the job outcome",
                  "outcome=%s error=%s", outcome, err.message);
    else
        log_info("executor", slot->job_id, "job finished", "outcome=%s worker=%d", outcome,
                 slot->index);
}

/* The head cache keeps its most recently used entries up to this size (a
 * head of 10 classes on 1,280 features takes about 100 KB). */
#define EXECUTOR_HEAD_CACHE_BYTES ((size_t)256 << 20)

static void run_job(worker_slot *slot, store *db)
{
    executor *ex = slot->ex;
    const json_t *request = json_object_get(slot->job, "request");
    char dir[4096], cache[4096];
    snprintf(dir, sizeof dir, "%s/%s", ex->artifact_dir, slot->job_id);
    /* Heads are shared by every job: a second job on the same model and task
     * skips the dense features (job ids never take this name). */
    snprintf(cache, sizeof cache, "%s/head-cache", ex->artifact_dir);

    pipeline_options opt;
    top_error err;
    top_error_clear(&err);
    top_status st = executor_options_from_request(&opt, request, &err);
    if (st == TOP_OK && mkdir(dir, 0750) != 0 && errno != EEXIST)
        st = top_error_set(&err, TOP_ERR_IO, "cannot create the artifact folder '%s': %s", dir,
                           strerror(errno));
    opt.out_dir = dir;
    opt.head_cache_dir = cache;

    run_state rs = {.slot = slot,
                    .db = db,
                    .start_s = monotonic_s(),
                    .stage = -1,
                    .finetune = opt.finetune};
    json_t *report = NULL;
    log_info("executor", slot->job_id, "job started", "worker=%d model=%s sparsity=%g",
             slot->index, opt.model_path ? opt.model_path : "", opt.sparsity);
    if (st == TOP_OK)
        st = pipeline_run(&report, NULL, &opt, run_progress, &rs, &slot->cancel, &err);
    if (st == TOP_OK)
        run_progress(&rs, "checkpoints", 1, 1);
    record_outcome(slot, db, request, report, dir, st, &err);
    json_decref(report);
    top_error cache_err;
    top_error_clear(&cache_err);
    if (head_cache_prune(cache, EXECUTOR_HEAD_CACHE_BYTES, NULL, &cache_err) != TOP_OK)
        log_warn("executor", slot->job_id, "cannot trim the head cache", "dir=%s error=%s",
                 cache, cache_err.message);
    if (!(st == TOP_ERR_CANCELLED && ex->draining))
        record_duration(ex, monotonic_s() - rs.start_s);
}

/* ---- worker threads ------------------------------------------------------ */

static void worker_main(void *arg)
{
    worker_slot *slot = arg;
    executor *ex = slot->ex;
    store *db = NULL;
    top_error err;
    top_error_clear(&err);
    if (store_open(&db, ex->database_path, &ex->cfg.store_opts, &err) != TOP_OK) {
        log_error("executor", NULL, "worker cannot open the store", "worker=%d error=%s",
                  slot->index, err.message);
        uv_mutex_lock(&ex->mu);
        slot->alive = 0;
        uv_cond_broadcast(&ex->idle_cond);
        uv_mutex_unlock(&ex->mu);
        return;
    }
    uv_mutex_lock(&ex->mu);
    for (;;) {
        while (!slot->job && !ex->quit)
            uv_cond_wait(&slot->cond, &ex->mu);
        if (!slot->job)
            break;
        uv_mutex_unlock(&ex->mu);

        run_job(slot, db);

        uv_mutex_lock(&ex->mu);
        json_decref(slot->job);
        slot->job = NULL;
        slot->job_id[0] = '\0';
        slot->cancel = 0;
        uv_cond_broadcast(&ex->idle_cond);
        if (!ex->stopping)
            uv_async_send(&ex->wake);
    }
    slot->alive = 0;
    uv_mutex_unlock(&ex->mu);
    store_close(db);
}

/* ---- loop thread --------------------------------------------------------- */

static worker_slot *idle_slot(executor *ex)
{
    for (int i = 0; i < ex->cfg.workers; i++)
        if (ex->slots[i].alive && !ex->slots[i].job)
            return &ex->slots[i];
    return NULL;
}

/* Claims queued jobs while a worker is idle. Loop thread. */
static void dispatch(executor *ex)
{
    for (;;) {
        uv_mutex_lock(&ex->mu);
        worker_slot *slot = ex->draining ? NULL : idle_slot(ex);
        uv_mutex_unlock(&ex->mu);
        if (!slot)
            return;

        json_t *job = NULL;
        top_error err;
        top_error_clear(&err);
        if (store_job_claim(ex->loop_store, &job, &err) != TOP_OK) {
            log_error("executor", NULL, "cannot claim a job", "error=%s", err.message);
            return;
        }
        if (!job)
            return;

        uv_mutex_lock(&ex->mu);
        slot->job = job;
        snprintf(slot->job_id, sizeof slot->job_id, "%s", json_str(job, "id"));
        slot->cancel = ex->draining;
        uv_cond_signal(&slot->cond);
        uv_mutex_unlock(&ex->mu);
        log_info("executor", slot->job_id, "job claimed", "worker=%d attempts=%lld",
                 slot->index, (long long)json_integer_value(json_object_get(job, "attempts")));
    }
}

static void on_wake(uv_async_t *h)
{
    executor *ex = h->data;
    uv_mutex_lock(&ex->mu);
    int stopping = ex->stopping;
    uv_mutex_unlock(&ex->mu);
    if (stopping) {
        uv_close((uv_handle_t *)&ex->wake, NULL);
        uv_close((uv_handle_t *)&ex->poll, NULL);
        return;
    }
    dispatch(ex);
}

static void on_poll(uv_timer_t *h)
{
    dispatch(h->data);
}

static void loop_main(void *arg)
{
    executor *ex = arg;
    uv_run(&ex->loop, UV_RUN_DEFAULT);
}

/* ---- lifecycle ----------------------------------------------------------- */

static top_status start_workers(executor *ex, top_error *err)
{
    ex->slots = calloc((size_t)ex->cfg.workers, sizeof *ex->slots);
    if (!ex->slots)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for %d worker slots",
                             ex->cfg.workers);
    for (int i = 0; i < ex->cfg.workers; i++) {
        worker_slot *slot = &ex->slots[i];
        slot->ex = ex;
        slot->index = i;
        if (uv_cond_init(&slot->cond) != 0)
            return top_error_set(err, TOP_ERR_NOMEM, "cannot create worker %d", i);
        slot->alive = 1;
        int rc = uv_thread_create(&slot->thread, worker_main, slot);
        if (rc != 0) {
            slot->alive = 0;
            uv_cond_destroy(&slot->cond);
            return top_error_set(err, TOP_ERR_NOMEM, "cannot start worker %d: %s", i,
                                 uv_strerror(rc));
        }
        slot->started = 1;
    }
    return TOP_OK;
}

static top_status start_loop(executor *ex, top_error *err)
{
    int rc = uv_loop_init(&ex->loop);
    if (rc == 0)
        rc = uv_async_init(&ex->loop, &ex->wake, on_wake);
    if (rc != 0)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot create the executor loop: %s",
                             uv_strerror(rc));
    ex->wake.data = ex;
    uv_timer_init(&ex->loop, &ex->poll);
    ex->poll.data = ex;
    uint64_t ms = (uint64_t)ex->cfg.poll_interval_ms;
    uv_timer_start(&ex->poll, on_poll, 0, ms);
    rc = uv_thread_create(&ex->loop_thread, loop_main, ex);
    if (rc != 0)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot start the executor loop: %s",
                             uv_strerror(rc));
    ex->loop_started = 1;
    return TOP_OK;
}

top_status executor_start(executor **out, const executor_config *cfg, top_error *err)
{
    *out = NULL;
    if (cfg->workers < 1 || cfg->workers > 256)
        return top_error_set(err, TOP_ERR_INVALID, "invalid worker count %d; pass 1 to 256",
                             cfg->workers);
    executor *ex = calloc(1, sizeof *ex);
    if (!ex)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the executor");
    ex->cfg = *cfg;
    if (ex->cfg.poll_interval_ms <= 0)
        ex->cfg.poll_interval_ms = 1000;
    ex->database_path = strdup(cfg->database_path);
    ex->artifact_dir = strdup(cfg->artifact_dir);
    uv_mutex_init(&ex->mu);
    uv_cond_init(&ex->idle_cond);
    top_status st = ex->database_path && ex->artifact_dir
                        ? TOP_OK
                        : top_error_set(err, TOP_ERR_NOMEM, "out of memory for the executor");
    if (st == TOP_OK)
        st = store_open(&ex->loop_store, ex->database_path, &ex->cfg.store_opts, err);
    if (st == TOP_OK)
        st = start_workers(ex, err);
    if (st == TOP_OK)
        st = start_loop(ex, err);
    if (st != TOP_OK) {
        executor_free(ex);
        return st;
    }
    log_info("executor", NULL, "executor started", "workers=%d progress_interval_ms=%d",
             cfg->workers, cfg->progress_interval_ms);
    *out = ex;
    return TOP_OK;
}

void executor_notify(executor *ex)
{
    uv_mutex_lock(&ex->mu);
    if (ex->loop_started && !ex->stopping)
        uv_async_send(&ex->wake);
    uv_mutex_unlock(&ex->mu);
}

int executor_cancel(executor *ex, const char *job_id)
{
    int found = 0;
    uv_mutex_lock(&ex->mu);
    for (int i = 0; i < ex->cfg.workers; i++)
        if (ex->slots[i].job && !strcmp(ex->slots[i].job_id, job_id)) {
            ex->slots[i].cancel = 1;
            found = 1;
        }
    uv_mutex_unlock(&ex->mu);
    return found;
}

void executor_get_stats(executor *ex, executor_stats *out)
{
    memset(out, 0, sizeof *out);
    uv_mutex_lock(&ex->mu);
    out->workers = ex->cfg.workers;
    for (int i = 0; i < ex->cfg.workers; i++) {
        out->workers_alive += ex->slots[i].alive;
        out->running += ex->slots[i].job != NULL;
    }
    out->draining = ex->draining;
    memcpy(out->duration_counts, ex->duration_counts, sizeof out->duration_counts);
    out->duration_sum_s = ex->duration_sum_s;
    out->duration_count = ex->duration_count;
    uv_mutex_unlock(&ex->mu);
}

static int busy_workers(const executor *ex)
{
    int n = 0;
    for (int i = 0; i < ex->cfg.workers; i++)
        n += ex->slots[i].job != NULL;
    return n;
}

/* Waits until every worker is idle or grace_s passed; returns the busy count. */
static int wait_idle(executor *ex, double grace_s)
{
    double deadline = monotonic_s() + grace_s;
    uv_mutex_lock(&ex->mu);
    int busy;
    while ((busy = busy_workers(ex)) > 0) {
        double left = deadline - monotonic_s();
        if (left <= 0)
            break;
        uv_cond_timedwait(&ex->idle_cond, &ex->mu, (uint64_t)(left * 1e9));
    }
    uv_mutex_unlock(&ex->mu);
    return busy;
}

void executor_drain(executor *ex, double grace_s)
{
    if (!ex || !ex->slots)
        return;
    uv_mutex_lock(&ex->mu);
    int already = ex->draining;
    ex->draining = 1;
    for (int i = 0; i < ex->cfg.workers; i++)
        if (ex->slots[i].job)
            ex->slots[i].cancel = 1;
    int running = busy_workers(ex);
    uv_mutex_unlock(&ex->mu);
    if (already)
        return;
    log_info("executor", NULL, "draining", "running=%d grace_s=%g", running, grace_s);
    int left = wait_idle(ex, grace_s);
    if (left > 0)
        log_warn("executor", NULL, "jobs still running after the grace period", "running=%d",
                 left);
    else
        log_info("executor", NULL, "drained", "requeued=%d", running);
}

static void stop_threads(executor *ex)
{
    uv_mutex_lock(&ex->mu);
    ex->quit = 1;
    ex->stopping = 1;
    for (int i = 0; ex->slots && i < ex->cfg.workers; i++)
        if (ex->slots[i].started)
            uv_cond_signal(&ex->slots[i].cond);
    if (ex->loop_started)
        uv_async_send(&ex->wake);
    uv_mutex_unlock(&ex->mu);

    /* A worker still in a job finishes it (its cancel flag is up) before it exits. */
    for (int i = 0; ex->slots && i < ex->cfg.workers; i++)
        if (ex->slots[i].started)
            uv_thread_join(&ex->slots[i].thread);
    if (ex->loop_started)
        uv_thread_join(&ex->loop_thread);
}

void executor_free(executor *ex)
{
    if (!ex)
        return;
    executor_drain(ex, 0.0);
    stop_threads(ex);
    if (ex->loop_started) {
        uv_run(&ex->loop, UV_RUN_NOWAIT);
        uv_loop_close(&ex->loop);
    }
    for (int i = 0; ex->slots && i < ex->cfg.workers; i++) {
        if (ex->slots[i].started)
            uv_cond_destroy(&ex->slots[i].cond);
        json_decref(ex->slots[i].job);
    }
    free(ex->slots);
    store_close(ex->loop_store);
    uv_cond_destroy(&ex->idle_cond);
    uv_mutex_destroy(&ex->mu);
    free(ex->database_path);
    free(ex->artifact_dir);
    free(ex);
}
