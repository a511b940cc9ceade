/*
 * The job routes: submit (POST /v1/jobs), list, get, cancel and delete.
 *
 * A submission is validated member by member into a normalised request
 * (every default filled in) plus a "resolved" member with the server paths
 * of the model and the data sets; the executor runs from that object alone,
 * and the store compares it for Idempotency-Key retries. Unknown members are
 * 400, values out of range 422 naming the field, the value and the fix.
 * Runs on connection threads; submit_mu makes the queue-capacity check and
 * the insert one step.
 */
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/statvfs.h>
#include <unistd.h>

#include "api_internal.h"
#include "job_cache.h"
#include "log.h"
#include "pipeline.h"

#define COUNT_MAX 100000 /* images in one split */

typedef struct job_defaults {
    json_int_t calib_images, calib_fit, eval_fit, eval_images;
} job_defaults;

/* Reads an optional integer member in [lo, hi]; keeps *out when absent. */
static int int_member(const json_t *obj, const char *key, const char *field, json_int_t lo,
                      json_int_t hi, json_int_t *out, api_invalid *bad)
{
    const json_t *v = json_object_get(obj, key);
    if (!v)
        return 0;
    char fix[96];
    snprintf(fix, sizeof fix, "pass an integer from %lld to %lld", (long long)lo,
             (long long)hi);
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi)
        return api_invalid_set(bad, 422, field, v, fix, "%s must be an integer in [%lld, %lld]",
                               field, (long long)lo, (long long)hi);
    *out = json_integer_value(v);
    return 0;
}

static int object_member(const json_t *obj, const char *key, const json_t **out,
                         api_invalid *bad)
{
    *out = json_object_get(obj, key);
    if (*out && !json_is_object(*out))
        return api_invalid_set(bad, 422, key, *out, "pass a JSON object",
                               "%s must be an object", key);
    return 0;
}

/* Resolves the model member (a registered id or a file:// URI) to a path. */
static int resolve_model(api *a, api_call *call, const json_t *v, json_t *resolved,
                         api_invalid *bad)
{
    if (!json_is_string(v))
        return api_invalid_set(bad, 422, "model", v,
                               "pass a registered model id or a file:// URI",
                               "model is missing or not a string");
    const char *model = json_string_value(v);
    char path[4096];
    if (!strncmp(model, "file://", 7)) {
        if (api_resolve_path(a, model, path, sizeof path, bad, "model"))
            return -1;
    } else {
        top_error err;
        top_error_clear(&err);
        json_t *m = NULL;
        store *db = api_store(a, call, &err);
        if (!db || store_model_get(db, model, &m, &err) != TOP_OK)
            return api_invalid_set(bad, err.status == TOP_ERR_NOT_FOUND ? 422 : 503, "model", v,
                                   "register the model with POST /v1/models first",
                                   "model '%s' is not registered: %s", model, err.message);
        const char *stored = json_string_value(json_object_get(m, "path"));
        const char *uri = json_string_value(json_object_get(m, "uri"));
        int rc = stored ? (snprintf(path, sizeof path, "%s", stored), 0)
                        : api_resolve_path(a, uri ? uri : "", path, sizeof path, bad, "model");
        json_decref(m);
        if (rc)
            return -1;
    }
    json_object_set_new(resolved, "model_path", json_string(path));
    return 0;
}

/* Resolves a task reference (a registered task id or a data set URI) to a data set URI
 * and reads the task's default split sizes. */
static int resolve_task(api *a, api_call *call, const json_t *v, const char *field, char *uri,
                        size_t cap, job_defaults *d, api_invalid *bad)
{
    if (!json_is_string(v) || json_string_length(v) == 0)
        return api_invalid_set(bad, 422, field, v, "pass a task id or a data set URI",
                               "%s must be a non-empty string", field);
    const char *ref = json_string_value(v);
    if (strchr(ref, ':'))
        return api_resolve_dataset_uri(a, ref, uri, cap, bad, field);

    top_error err;
    top_error_clear(&err);
    json_t *t = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_task_get(db, ref, &t, &err) != TOP_OK)
        return api_invalid_set(bad, err.status == TOP_ERR_NOT_FOUND ? 422 : 503, field, v,
                               "register the task with POST /v1/tasks first",
                               "task '%s' is not registered", ref);
    const json_t *spec = json_object_get(t, "spec");
    const json_t *split = json_object_get(spec, "split");
    if (d) {
        const json_t *n;
        if (json_is_integer(n = json_object_get(split, "calibration_images")))
            d->calib_images = json_integer_value(n);
        if (json_is_integer(n = json_object_get(split, "head_fit_images")))
            d->calib_fit = d->eval_fit = json_integer_value(n);
        if (json_is_integer(n = json_object_get(split, "eval_images")))
            d->eval_images = json_integer_value(n);
    }
    int rc = api_resolve_dataset_uri(a, json_string_value(json_object_get(spec, "uri")), uri,
                                     cap, bad, field);
    json_decref(t);
    return rc;
}

/* The obs and layer_obs members of method_options, into out. A member of
 * another method is rejected so that a typo does not pass silently. */
static int parse_obs_options(const json_t *mo, const char *method, json_t *out,
                             api_invalid *bad)
{
    int obs = !strcmp(method, "obs"), layer = !strcmp(method, "layer_obs");
    json_int_t block = 64;
    const json_t *up = json_object_get(mo, "obs_update");
    const json_t *al = json_object_get(mo, "allocation");
    const json_t *bs = json_object_get(mo, "block_size");
    if ((bs || up) && !obs)
        return api_invalid_set(
            bad, 422, bs ? "method_options.block_size" : "method_options.obs_update",
            bs ? bs : up, "drop it, or use method obs", "applies to method obs only");
    if (al && !layer)
        return api_invalid_set(bad, 422, "method_options.allocation", al,
                               "drop it, or use method layer_obs",
                               "applies to method layer_obs only");
    if (int_member(mo, "block_size", "method_options.block_size", 1, 1024, &block, bad))
        return -1;
    if (up && !json_is_boolean(up))
        return api_invalid_set(bad, 422, "method_options.obs_update", up, "pass true or false",
                               "obs_update must be a boolean");
    const char *alloc = al ? json_string_value(al) : "magnitude";
    if (!alloc ||
        (strcmp(alloc, "magnitude") && strcmp(alloc, "obd") && strcmp(alloc, "uniform")))
        return api_invalid_set(bad, 422, "method_options.allocation", al,
                               "use magnitude, obd or uniform", "unknown allocation");
    if (obs) {
        json_object_set_new(out, "block_size", json_integer(block));
        json_object_set_new(out, "obs_update", json_boolean(!up || json_is_true(up)));
    }
    if (layer)
        json_object_set_new(out, "allocation", json_string(alloc));
    return 0;
}

static int parse_method(const json_t *req, json_t *out, api_invalid *bad)
{
    static const char *const mo_members[] = {"damping",    "damping_mode", "block_size",
                                             "obs_update", "allocation",   NULL};
    const json_t *v = json_object_get(req, "method");
    const char *method = v ? json_string_value(v) : "magnitude";
    if (!method ||
        (strcmp(method, "magnitude") && strcmp(method, "obd") && strcmp(method, "obs") &&
         strcmp(method, "layer_obs") && strcmp(method, "data_free")))
        return api_invalid_set(bad, 422, "method", v,
                               "use magnitude, obd, obs, layer_obs or data_free "
                               "(GET /v1/methods)",
                               "unknown pruning method");
    json_object_set_new(out, "method", json_string(method));

    const json_t *mo;
    if (object_member(req, "method_options", &mo, bad) ||
        (mo && api_check_members(mo, "method_options.", mo_members, bad)))
        return -1;
    double damping = 1e-3;
    const json_t *dv = json_object_get(mo, "damping");
    const json_t *dm = json_object_get(mo, "damping_mode");
    if ((dv || dm) && (!strcmp(method, "magnitude") || !strcmp(method, "data_free")))
        return api_invalid_set(bad, 422,
                               dv ? "method_options.damping" : "method_options.damping_mode",
                               dv ? dv : dm, "drop it, or use method obd, obs or layer_obs",
                               "damping applies to the Fisher of obd, obs and layer_obs only");
    if (dv && (!json_is_number(dv) || !(json_number_value(dv) >= 0.0) ||
               !(json_number_value(dv) < 1e30)))
        return api_invalid_set(bad, 422, "method_options.damping", dv,
                               "pass a number >= 0, such as 0.001", "damping out of range");
    if (dv)
        damping = json_number_value(dv);
    const json_t *mode = json_object_get(mo, "damping_mode");
    const char *m = mode ? json_string_value(mode) : "relative";
    if (!m || (strcmp(m, "relative") && strcmp(m, "absolute")))
        return api_invalid_set(bad, 422, "method_options.damping_mode", mode,
                               "use relative or absolute", "unknown damping mode");
    json_t *opts = json_pack("{s:f, s:s}", "damping", damping, "damping_mode", m);
    json_object_set_new(out, "method_options", opts);
    return parse_obs_options(mo, method, opts, bad);
}

static int parse_calibration(api *a, api_call *call, const json_t *req, json_t *out,
                             json_t *resolved, api_invalid *bad)
{
    static const char *const members[] = {"task", "images", "head_fit_images", "head", NULL};
    const json_t *c;
    if (object_member(req, "calibration", &c, bad))
        return -1;
    if (!c) {
        const char *method = json_string_value(json_object_get(out, "method"));
        if (strcmp(method, "magnitude") && strcmp(method, "data_free"))
            return api_invalid_set(bad, 422, "calibration", NULL,
                                   "add calibration.task, or use method magnitude",
                                   "method %s needs a calibration task", method);
        json_object_set_new(out, "calibration", json_null());
        json_object_set_new(resolved, "calibration_uri", json_null());
        return 0;
    }
    if (api_check_members(c, "calibration.", members, bad))
        return -1;
    char uri[8192];
    job_defaults d = {.calib_images = 64, .calib_fit = 200};
    if (resolve_task(a, call, json_object_get(c, "task"), "calibration.task", uri, sizeof uri,
                     &d, bad) ||
        int_member(c, "images", "calibration.images", 2, COUNT_MAX, &d.calib_images, bad) ||
        int_member(c, "head_fit_images", "calibration.head_fit_images", 2, COUNT_MAX,
                   &d.calib_fit, bad))
        return -1;
    const json_t *head = json_object_get(c, "head");
    const char *h = head ? json_string_value(head) : "ridge";
    if (!h || (strcmp(h, "ridge") && strcmp(h, "model")))
        return api_invalid_set(bad, 422, "calibration.head", head,
                               "use ridge, or model when the task's labels are the model's "
                               "classes",
                               "unknown calibration head");
    json_object_set_new(out, "calibration",
                        json_pack("{s:O, s:I, s:I, s:s}", "task", json_object_get(c, "task"),
                                  "images", d.calib_images, "head_fit_images", d.calib_fit,
                                  "head", h));
    json_object_set_new(resolved, "calibration_uri", json_string(uri));
    return 0;
}

/* Rejects an evaluation task that repeats another or the calibration task. */
static int check_overlap(const json_t *uris, size_t i, const char *uri, const json_t *resolved,
                         const json_t *v, api_invalid *bad)
{
    char field[64];
    snprintf(field, sizeof field, "evaluation.tasks[%zu]", i);
    for (size_t j = 0; j < i; j++)
        if (!strcmp(json_string_value(json_array_get(uris, j)), uri))
            return api_invalid_set(bad, 422, field, v, "list each evaluation task once",
                                   "evaluation task %zu repeats evaluation task %zu", i, j);
    const char *calib = json_string_value(json_object_get(resolved, "calibration_uri"));
    if (calib && !strcmp(calib, uri))
        return api_invalid_set(bad, 422, field, v,
                               "evaluate on tasks other than the calibration task",
                               "evaluation task %zu is the calibration task; the evaluation "
                               "must be zero-shot",
                               i);
    return 0;
}

static int parse_evaluation(api *a, api_call *call, const json_t *req, json_t *out,
                            json_t *resolved, api_invalid *bad)
{
    static const char *const members[] = {"tasks", "head_fit_images", "images", NULL};
    const json_t *e;
    if (object_member(req, "evaluation", &e, bad))
        return -1;
    if (!e)
        return api_invalid_set(bad, 422, "evaluation", NULL,
                               "add evaluation.tasks with 1 to 16 task ids",
                               "evaluation is required");
    if (api_check_members(e, "evaluation.", members, bad))
        return -1;
    const json_t *tasks = json_object_get(e, "tasks");
    size_t n = json_array_size(tasks);
    if (!json_is_array(tasks) || n < 1 || n > PIPELINE_MAX_EVAL_TASKS)
        return api_invalid_set(
            bad, 422, "evaluation.tasks", tasks, "pass an array of 1 to 16 task ids",
            "evaluation.tasks must list 1 to %d tasks", PIPELINE_MAX_EVAL_TASKS);
    json_t *uris = json_array();
    job_defaults d = {.eval_fit = 200, .eval_images = 200};
    for (size_t i = 0; i < n; i++) {
        char field[64], uri[8192];
        snprintf(field, sizeof field, "evaluation.tasks[%zu]", i);
        job_defaults td = d;
        const json_t *v = json_array_get(tasks, i);
        if (resolve_task(a, call, v, field, uri, sizeof uri, &td, bad) ||
            check_overlap(uris, i, uri, resolved, v, bad)) {
            json_decref(uris);
            return -1;
        }
        /* The pipeline uses one split size for every evaluation task: the smallest. */
        if (i == 0 || td.eval_fit < d.eval_fit)
            d.eval_fit = td.eval_fit;
        if (i == 0 || td.eval_images < d.eval_images)
            d.eval_images = td.eval_images;
        json_array_append_new(uris, json_string(uri));
    }
    json_object_set_new(resolved, "evaluation_uris", uris);
    if (int_member(e, "head_fit_images", "evaluation.head_fit_images", 2, COUNT_MAX,
                   &d.eval_fit, bad) ||
        int_member(e, "images", "evaluation.images", 1, COUNT_MAX, &d.eval_images, bad))
        return -1;
    json_object_set_new(out, "evaluation",
                        json_pack("{s:O, s:I, s:I}", "tasks", tasks, "head_fit_images",
                                  d.eval_fit, "images", d.eval_images));
    return 0;
}

/* The mask: {scope, granularity, min_density, rounds}, all optional. */
static int parse_mask(const json_t *req, json_t *out, api_invalid *bad)
{
    static const char *const members[] = {"scope",  "granularity", "min_density", "rounds",
                                          "layers", "skip_layers", NULL};
    const json_t *m;
    if (object_member(req, "mask", &m, bad) ||
        (m && api_check_members(m, "mask.", members, bad)))
        return -1;
    const json_t *scope = json_object_get(m, "scope");
    if (scope && (!json_is_string(scope) || (strcmp(json_string_value(scope), "global") &&
                                             strcmp(json_string_value(scope), "per_layer"))))
        return api_invalid_set(bad, 422, "mask.scope", scope, "use global or per_layer",
                               "unknown mask scope");
    const json_t *gran = json_object_get(m, "granularity");
    int nm_n = 0, nm_m = 0;
    if (gran) {
        const char *g = json_is_string(gran) ? json_string_value(gran) : "";
        char tail;
        if (strcmp(g, "unstructured") &&
            (sscanf(g, "%d:%d%c", &nm_n, &nm_m, &tail) != 2 || nm_n < 1 || nm_n >= nm_m ||
             nm_m > PRUNE_NM_MAX_GROUP))
            return api_invalid_set(bad, 422, "mask.granularity", gran,
                                   "use unstructured or N:M with N < M <= 64, such as 2:4",
                                   "unknown mask granularity");
    }
    const json_t *md = json_object_get(m, "min_density");
    double q = json_number_value(json_object_get(out, "sparsity"));
    if (md && (!json_is_number(md) || !(json_number_value(md) >= 0.0) ||
               !(json_number_value(md) <= 1.0 - q)))
        return api_invalid_set(bad, 422, "mask.min_density", md,
                               "pass a fraction in [0, 1 - sparsity], such as 0.02",
                               "min_density out of range");
    json_int_t rounds = 1;
    if (int_member(m, "rounds", "mask.rounds", 1, 100, &rounds, bad))
        return -1;
    if (nm_m && q < 1.0 - (double)nm_n / nm_m - 1e-12)
        return api_invalid_set(bad, 422, "sparsity", json_object_get(out, "sparsity"),
                               "raise sparsity to at least 1 - N/M for an N:M granularity",
                               "sparsity below what the N:M granularity forces");
    if (nm_m && rounds != 1)
        return api_invalid_set(bad, 422, "mask.rounds", json_object_get(m, "rounds"),
                               "use one round with an N:M granularity",
                               "rounds must be 1 with N:M");
    const char *globs[2] = {NULL, NULL};
    static const char *const glob_keys[2] = {"layers", "skip_layers"};
    for (int i = 0; i < 2; i++) {
        const json_t *v = json_object_get(m, glob_keys[i]);
        char field[32];
        snprintf(field, sizeof field, "mask.%s", glob_keys[i]);
        if (v &&
            (!json_is_string(v) || !json_string_value(v)[0] || json_string_length(v) > 4096))
            return api_invalid_set(
                bad, 422, field, v, "pass comma-separated name globs, such as \"block_1*\"",
                "%s must be a non-empty string of at most 4096 bytes", field);
        globs[i] = v ? json_string_value(v) : NULL;
    }
    json_object_set_new(out, "mask",
                        json_pack("{s:s, s:s, s:f, s:I, s:s?, s:s?}", "scope",
                                  scope ? json_string_value(scope) : "global", "granularity",
                                  gran ? json_string_value(gran) : "unstructured",
                                  "min_density", md ? json_number_value(md) : 0.0, "rounds",
                                  rounds, "layers", globs[0], "skip_layers", globs[1]));
    return 0;
}

/* Reads an optional number member in [lo, hi] (lo excluded when open_lo);
 * keeps *out when absent. fix is the advice for a bad value. */
static int real_member(const json_t *obj, const char *key, const char *field, double lo,
                       double hi, int open_lo, const char *fix, double *out, api_invalid *bad)
{
    const json_t *v = json_object_get(obj, key);
    if (!v)
        return 0;
    double x = json_is_number(v) ? json_number_value(v) : NAN;
    if (!(open_lo ? x > lo : x >= lo) || !(x <= hi))
        return api_invalid_set(bad, 422, field, v, fix, "%s must be a number in %c%g, %g]",
                               field, open_lo ? '(' : '[', lo, hi);
    *out = x;
    return 0;
}

/* Reads an optional string member that must be one of two words. */
static int choice_member(const json_t *obj, const char *key, const char *field, const char *a,
                         const char *b, const char **out, api_invalid *bad)
{
    const json_t *v = json_object_get(obj, key);
    if (!v)
        return 0;
    const char *s = json_string_value(v);
    if (!s || (strcmp(s, a) && strcmp(s, b))) {
        char fix[96];
        snprintf(fix, sizeof fix, "use %s or %s", a, b);
        return api_invalid_set(bad, 422, field, v, fix, "%s must be \"%s\" or \"%s\"", field, a,
                               b);
    }
    *out = s;
    return 0;
}

/* Validates the optional finetune object (masked fine-tuning on the calibration task)
 * into out, with every default filled in. */
static int parse_finetune(const json_t *req, json_t *out, api_invalid *bad)
{
    static const char *const members[] = {
        "images",       "epochs",   "batch_size", "lr",   "momentum",
        "weight_decay", "schedule", "batch_norm", "loss", NULL};
    const json_t *f = json_object_get(req, "finetune");
    if (json_is_null(f))
        f = NULL; /* the same as absent: no fine-tuning */
    else if (object_member(req, "finetune", &f, bad) ||
             (f && api_check_members(f, "finetune.", members, bad)))
        return -1;
    if (!f) {
        json_object_set_new(out, "finetune", json_null());
        return 0;
    }
    if (json_is_null(json_object_get(out, "calibration")))
        return api_invalid_set(bad, 422, "finetune", f,
                               "add calibration.task (the source task to fine-tune on), or "
                               "drop finetune",
                               "fine-tuning trains on the calibration task, and there is none");
    json_int_t images = 512, epochs = 2, batch = 16;
    double lr = 5e-5, momentum = 0.9, decay = 0.0;
    const char *schedule = "cosine", *bn = "frozen", *loss = "cross_entropy";
    if (int_member(f, "images", "finetune.images", 2, 1000000, &images, bad) ||
        int_member(f, "epochs", "finetune.epochs", 1, 100, &epochs, bad) ||
        int_member(f, "batch_size", "finetune.batch_size", 2, 1024, &batch, bad) ||
        real_member(f, "lr", "finetune.lr", 0.0, 1.0, 1, "pass a rate such as 5e-5", &lr,
                    bad) ||
        real_member(f, "momentum", "finetune.momentum", 0.0, 0.999, 0,
                    "pass a value in [0, 0.999], such as 0.9", &momentum, bad) ||
        real_member(f, "weight_decay", "finetune.weight_decay", 0.0, 1.0, 0,
                    "pass a value in [0, 1], such as 1e-4", &decay, bad) ||
        choice_member(f, "schedule", "finetune.schedule", "cosine", "constant", &schedule,
                      bad) ||
        choice_member(f, "batch_norm", "finetune.batch_norm", "frozen", "train", &bn, bad) ||
        choice_member(f, "loss", "finetune.loss", "cross_entropy", "distill", &loss, bad))
        return -1;
    json_object_set_new(out, "finetune",
                        json_pack("{s:I, s:I, s:I, s:f, s:f, s:f, s:s, s:s, s:s}", "images",
                                  images, "epochs", epochs, "batch_size", batch, "lr", lr,
                                  "momentum", momentum, "weight_decay", decay, "schedule",
                                  schedule, "batch_norm", bn, "loss", loss));
    return 0;
}

static int parse_options(const json_t *req, json_t *out, api_invalid *bad)
{
    static const char *const members[] = {
        "seed",          "ridge_alpha", "batch_size",   "bn_recalibration",
        "bn_correction", "bn_passes",   "feature_node", NULL};
    const json_t *o;
    if (object_member(req, "options", &o, bad) ||
        (o && api_check_members(o, "options.", members, bad)))
        return -1;
    json_int_t seed = 0, batch = 16;
    if (int_member(o, "seed", "options.seed", 0, 2147483647, &seed, bad) ||
        int_member(o, "batch_size", "options.batch_size", 2, 1024, &batch, bad))
        return -1;
    const json_t *alpha = json_object_get(o, "ridge_alpha");
    if (alpha && (!json_is_number(alpha) || !(json_number_value(alpha) > 0.0) ||
                  !(json_number_value(alpha) < 1e30)))
        return api_invalid_set(bad, 422, "options.ridge_alpha", alpha,
                               "pass a ridge penalty > 0, such as 1.0",
                               "ridge_alpha out of range");
    const json_t *bn = json_object_get(o, "bn_recalibration");
    if (bn && !json_is_boolean(bn))
        return api_invalid_set(bad, 422, "options.bn_recalibration", bn, "pass true or false",
                               "bn_recalibration must be a boolean");
    const json_t *bc = json_object_get(o, "bn_correction");
    if (bc && (!json_is_string(bc) || (strcmp(json_string_value(bc), "match_dense") &&
                                       strcmp(json_string_value(bc), "reestimate") &&
                                       strcmp(json_string_value(bc), "none"))))
        return api_invalid_set(bad, 422, "options.bn_correction", bc,
                               "use match_dense, reestimate or none",
                               "unknown batch-norm correction");
    json_int_t passes = 1;
    if (int_member(o, "bn_passes", "options.bn_passes", 1, 16, &passes, bad))
        return -1;
    const json_t *fn = json_object_get(o, "feature_node");
    if (fn && !json_is_string(fn))
        return api_invalid_set(bad, 422, "options.feature_node", fn, "pass a node name",
                               "feature_node must be a string");
    json_object_set_new(out, "options",
                        json_pack("{s:I, s:f, s:I, s:O, s:O, s:I, s:O}", "seed", seed,
                                  "ridge_alpha", alpha ? json_number_value(alpha) : 1.0,
                                  "batch_size", batch, "bn_recalibration",
                                  bn ? bn : json_null(), "bn_correction", bc ? bc : json_null(),
                                  "bn_passes", passes, "feature_node", fn ? fn : json_null()));
    return 0;
}

/* Validates a submission into the normalised request; NULL with bad filled on failure. */
static json_t *normalise_job(api *a, api_call *call, const json_t *req, api_invalid *bad)
{
    static const char *const members[] = {
        "model",      "sparsity", "method",  "method_options", "calibration",
        "evaluation", "mask",     "options", "finetune",       NULL};
    if (api_check_members(req, "", members, bad))
        return NULL;
    json_t *out = json_object(), *resolved = json_object();
    const json_t *q = json_object_get(req, "sparsity");
    int rc = resolve_model(a, call, json_object_get(req, "model"), resolved, bad);
    if (!rc &&
        (!json_is_number(q) || !(json_number_value(q) >= 0.0) || !(json_number_value(q) < 1.0)))
        rc = api_invalid_set(bad, 422, "sparsity", q,
                             "pass a fraction q with 0 <= q < 1, such as 0.5",
                             "sparsity must be a number in [0, 1)");
    if (!rc) {
        json_object_set(out, "model", json_object_get(req, "model"));
        json_object_set_new(out, "sparsity", json_real(json_number_value(q)));
        rc = parse_method(req, out, bad);
    }
    if (!rc)
        rc = parse_calibration(a, call, req, out, resolved, bad);
    if (!rc)
        rc = parse_evaluation(a, call, req, out, resolved, bad);
    if (!rc)
        rc = parse_mask(req, out, bad);
    if (!rc)
        rc = parse_options(req, out, bad);
    if (!rc)
        rc = parse_finetune(req, out, bad);
    if (rc) {
        json_decref(out);
        json_decref(resolved);
        return NULL;
    }
    json_object_set_new(out, "resolved", resolved);
    return out;
}

/* ---- responses ----------------------------------------------------------- */

static json_t *artifact_view(const json_t *art, const char *id, const char *format)
{
    if (!json_is_object(art))
        return json_null();
    char url[128];
    snprintf(url, sizeof url, "/v1/jobs/%s/checkpoint%s%s", id,
             strcmp(format, "compressed") ? "?format=" : "",
             strcmp(format, "compressed") ? format : "");
    const json_t *size = json_object_get(art, "size");
    if (!size)
        size = json_object_get(art, "bytes"); /* the report's name for it */
    return json_pack("{s:O, s:O, s:s}", "size", size, "sha256", json_object_get(art, "sha256"),
                     "url", url);
}

/* Adds each task's head_cache state (and warning) from the stored report to
 * the task rows, which come from the results table in the same order. */
static void merge_head_cache(json_t *rows, const json_t *report_tasks)
{
    size_t i;
    json_t *row;
    json_array_foreach(rows, i, row)
    {
        const json_t *t = json_array_get(report_tasks, i);
        const char *state = json_string_value(json_object_get(t, "head_cache"));
        const char *warning = json_string_value(json_object_get(t, "head_cache_warning"));
        if (state)
            json_object_set_new(row, "head_cache", json_string(state));
        if (warning)
            json_object_set_new(row, "head_cache_warning", json_string(warning));
    }
}

json_t *api_job_view(const json_t *job)
{
    json_t *v = json_deep_copy(job);
    if (!v)
        return NULL;
    const char *id = json_string_value(json_object_get(job, "id"));
    json_object_del(json_object_get(v, "request"), "resolved");
    json_t *result = json_object_get(job, "result");
    json_t *arts = json_object_get(job, "artifacts");
    if (json_is_object(result)) {
        json_t *results = json_pack(
            "{s:O*, s:O*, s:O*, s:O*, s:O*, s:O*, s:O*, s:O*, s:O*}", "sparsity_requested",
            json_object_get(result, "sparsity_requested"), "sparsity_achieved",
            json_object_get(result, "sparsity_achieved"), "prunable_weights",
            json_object_get(result, "prunable_weights"), "zero_weights",
            json_object_get(result, "zero_weights"), "layers", json_object_get(job, "layers"),
            "tasks", json_object_get(job, "task_results"), "bn_recalibration",
            json_object_get(result, "bn_recalibration"), "finetune",
            json_object_get(result, "finetune"), "timings_s",
            json_object_get(result, "timings_s"));
        /* The rows belong to the caller's job (possibly cached): change a copy. */
        json_t *rows = json_deep_copy(json_object_get(results, "tasks"));
        merge_head_cache(rows, json_object_get(result, "tasks"));
        json_object_set_new(results, "tasks", rows ? rows : json_array());
        json_object_set_new(v, "results", results);
    }
    json_object_del(v, "result");
    json_object_del(v, "task_results");
    json_object_del(v, "layers");
    const json_t *tfjs =
        json_object_get(json_object_get(json_object_get(job, "result"), "checkpoints"), "tfjs");
    json_t *av = json_pack(
        "{s:o, s:o}", "dense", artifact_view(json_object_get(arts, "dense"), id, "dense"),
        "compressed", artifact_view(json_object_get(arts, "compressed"), id, "compressed"));
    if (av && json_is_object(tfjs)) {
        json_object_set_new(av, "tfjs_model", artifact_view(tfjs, id, "tfjs-model"));
        json_object_set_new(
            av, "tfjs_weights",
            artifact_view(json_object_get(tfjs, "weights"), id, "tfjs-weights"));
    }
    json_object_set_new(v, "artifacts", av);
    return v;
}

/* A 200 response with a rendered JSON body, which the response takes over
 * (malloc'ed); the same headers as api_json. */
static struct MHD_Response *json_text_response(http_request *req, char *text, size_t len)
{
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(len, text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return NULL;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    req->status = 200;
    req->bytes = len;
    return resp;
}

static struct MHD_Response *job_response(http_request *req, unsigned status, const json_t *job)
{
    struct MHD_Response *resp = api_json(req, status, api_job_view(job));
    if (resp && status == 202) {
        char loc[96];
        snprintf(loc, sizeof loc, "/v1/jobs/%s", json_string_value(json_object_get(job, "id")));
        MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, loc);
    }
    return resp;
}

/* ---- submit -------------------------------------------------------------- */

static int disk_full(const api *a)
{
    struct statvfs sv;
    if (statvfs(a->cfg->artifact_dir, &sv) != 0)
        return 0;
    return (unsigned long long)sv.f_bavail * sv.f_frsize < API_MIN_FREE_BYTES;
}

static struct MHD_Response *queue_full(api *a, http_request *req, int64_t queued)
{
    executor_stats es;
    executor_get_stats(a->ex, &es);
    double mean = es.duration_count ? es.duration_sum_s / (double)es.duration_count : 10.0;
    double wait = mean * (double)(queued + 1) / (double)(es.workers > 0 ? es.workers : 1);
    long retry = (long)ceil(wait);
    if (retry < 1)
        retry = 1;
    if (retry > 3600)
        retry = 3600;
    char detail[160], value[24];
    snprintf(detail, sizeof detail,
             "the job queue is full (%lld queued, capacity %d); retry "
             "after %ld s",
             (long long)queued, a->cfg->queue_capacity, retry);
    snprintf(value, sizeof value, "%ld", retry);
    struct MHD_Response *resp = api_problem(req, 429, "queue-full", "Too many requests", detail,
                                            json_pack("{s:i}", "retry_after", (int)retry));
    if (resp)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_RETRY_AFTER, value);
    return resp;
}

/* Inserts the job under submit_mu; *full gets the queue depth when it is full. */
static top_status insert_job(api *a, store *db, const json_t *request, const char *key,
                             char id[STORE_ID_MAX], bool *existed, int64_t *full,
                             top_error *err)
{
    pthread_mutex_lock(&a->submit_mu);
    int64_t counts[STORE_JOB_STATUS_COUNT] = {0};
    *full = -1;
    top_status st = store_job_counts(db, counts, err);
    int over = st == TOP_OK && counts[STORE_JOB_QUEUED] >= a->cfg->queue_capacity;
    if (st == TOP_OK && (!over || key))
        st = store_job_insert(db, request, key, id, existed, err);
    if (st == TOP_OK && over && !*existed) {
        /* A new job over capacity: only a retried key may pass, so take it back out. */
        if (key) {
            store_job_cancel(db, id, NULL, NULL);
            store_job_delete(db, id, NULL, NULL);
        }
        *full = counts[STORE_JOB_QUEUED];
    }
    pthread_mutex_unlock(&a->submit_mu);
    return st;
}

struct MHD_Response *api_post_job(api *a, http_request *req, api_call *call)
{
    api_invalid bad = {0};
    json_t *body = api_parse_body(a, req, &bad);
    json_t *request = body ? normalise_job(a, call, body, &bad) : NULL;
    json_decref(body);
    if (!request)
        return api_problem_invalid(req, &bad);

    const char *key =
        MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, "Idempotency-Key");
    if (key && (strlen(key) == 0 || strlen(key) > 255)) {
        json_decref(request);
        return api_problem_field(req, 400, "Idempotency-Key", json_string(key),
                                 "the Idempotency-Key header must have 1 to 255 characters",
                                 "send a shorter key, such as a UUID");
    }
    if (disk_full(a)) {
        json_decref(request);
        return api_problem(req, 507, "insufficient-storage", "Insufficient storage",
                           "the artifact folder has too little free space for a new job; free "
                           "disk space or delete finished jobs",
                           NULL);
    }

    top_error err;
    top_error_clear(&err);
    store *db = api_store(a, call, &err);
    char id[STORE_ID_MAX];
    bool existed = false;
    int64_t full = -1;
    top_status st =
        db ? insert_job(a, db, request, key, id, &existed, &full, &err) : err.status;
    json_decref(request);
    if (st == TOP_ERR_STATE)
        return api_problem(
            req, 422, "idempotency-key-reused", "Idempotency key reused", err.message,
            json_pack("{s:s}", "fix", "use a new Idempotency-Key for a new request"));
    if (st != TOP_OK)
        return api_problem_from_error(req, &err);
    if (full >= 0)
        return queue_full(a, req, full);

    json_t *job = NULL;
    if (store_job_get(db, id, &job, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    if (!existed) {
        executor_notify(a->ex);
        log_info("api", id, "job queued", "request_id=%s", req->id);
    }
    struct MHD_Response *resp = job_response(req, 202, job);
    if (resp && existed)
        MHD_add_response_header(resp, "Idempotent-Replayed", "true");
    json_decref(job);
    return resp;
}

/* ---- list, get, cancel, delete ------------------------------------------- */

struct MHD_Response *api_list_jobs(api *a, http_request *req, api_call *call)
{
    api_invalid bad = {0};
    store_job_query q = {0};
    const char *status =
        MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, "status");
    if (status && store_job_status_parse(status, &q.status) != 0)
        return api_problem_field(req, 400, "status", json_string(status),
                                 "unknown job status in ?status=",
                                 "use queued, running, succeeded, failed or cancelled");
    q.has_status = status != NULL;
    q.cursor = MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, "cursor");
    if (api_query_size(req, "limit", 1, STORE_LIST_LIMIT_MAX, STORE_LIST_LIMIT_DEFAULT,
                       &q.limit, &bad))
        return api_problem_invalid(req, &bad);

    top_error err;
    top_error_clear(&err);
    json_t *page = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_job_list(db, &q, &page, &err) != TOP_OK) {
        if (err.status == TOP_ERR_INVALID)
            return api_problem_field(req, 400, "cursor", json_string(q.cursor ? q.cursor : ""),
                                     err.message, "pass the next_cursor of a previous page");
        return api_problem_from_error(req, &err);
    }
    json_t *jobs = json_object_get(page, "jobs");
    for (size_t i = 0; i < json_array_size(jobs); i++)
        json_array_set_new(jobs, i, api_job_view(json_array_get(jobs, i)));
    return api_json(req, 200, page);
}

struct MHD_Response *api_get_job(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    json_t *job = NULL;
    char *text = NULL;
    size_t len = 0;
    if (job_cache_get(call->params[0], &text, &len))
        return json_text_response(req, text, len);
    store *db = api_store(a, call, &err);
    if (!db || store_job_get(db, call->params[0], &job, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    const char *status = json_string_value(json_object_get(job, "status"));
    struct MHD_Response *resp = NULL;
    if (status && (!strcmp(status, "succeeded") || !strcmp(status, "failed") ||
                   !strcmp(status, "cancelled"))) {
        /* A finished job never changes until it is deleted, so its body is cached. */
        json_t *view = api_job_view(job);
        text = view ? json_dumps(view, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
        json_decref(view);
        if (text) {
            len = strlen(text);
            job_cache_put(call->params[0], text, len);
            resp = json_text_response(req, text, len);
        }
    } else {
        resp = job_response(req, 200, job);
    }
    json_decref(job);
    return resp;
}

struct MHD_Response *api_cancel_job(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    store_job_status after = STORE_JOB_QUEUED;
    json_t *job = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_job_cancel(db, call->params[0], &after, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    if (after == STORE_JOB_RUNNING)
        executor_cancel(a->ex, call->params[0]);
    log_info("api", call->params[0], "cancel requested", "request_id=%s status=%s", req->id,
             store_job_status_str(after));
    if (store_job_get(db, call->params[0], &job, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    struct MHD_Response *resp = job_response(req, after == STORE_JOB_RUNNING ? 202 : 200, job);
    json_decref(job);
    return resp;
}

struct MHD_Response *api_delete_job(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    json_t *paths = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_job_delete(db, call->params[0], &paths, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    job_cache_drop(call->params[0]);
    for (size_t i = 0; i < json_array_size(paths); i++) {
        const char *p = json_string_value(json_array_get(paths, i));
        if (p && unlink(p) != 0)
            log_warn("api", call->params[0], "cannot remove an artifact", "path=%s", p);
    }
    json_decref(paths);
    char dir[4096];
    snprintf(dir, sizeof dir, "%s/%s", a->cfg->artifact_dir, call->params[0]);
    pipeline_remove_outputs(dir);
    log_info("api", call->params[0], "job deleted", "request_id=%s", req->id);
    struct MHD_Response *resp =
        MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
    req->status = 204;
    return resp;
}
