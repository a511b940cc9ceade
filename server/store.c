/* SQLite job store; see store.h. Stub bodies until the implementation lands. */
#include "store.h"

#include <string.h>

static top_status not_yet(top_error *err)
{
    return top_error_set(err, TOP_ERR_UNSUPPORTED, "the job store is not implemented yet");
}

const char *store_job_status_str(store_job_status status)
{
    static const char *const names[] = {"queued", "running", "succeeded", "failed", "cancelled"};
    return (unsigned)status < STORE_JOB_STATUS_COUNT ? names[status] : "unknown";
}

int store_job_status_parse(const char *name, store_job_status *out)
{
    for (int i = 0; i < STORE_JOB_STATUS_COUNT; i++)
        if (name && !strcmp(name, store_job_status_str((store_job_status)i))) {
            *out = (store_job_status)i;
            return 0;
        }
    return -1;
}

bool store_job_status_is_final(store_job_status status)
{
    return status == STORE_JOB_SUCCEEDED || status == STORE_JOB_FAILED ||
           status == STORE_JOB_CANCELLED;
}

top_status store_open(store **out, const char *path, const store_options *opts, top_error *err)
{
    (void)path, (void)opts;
    *out = NULL;
    return not_yet(err);
}
void store_close(store *s) { (void)s; }
top_status store_schema_version(store *s, int *version, top_error *err) { (void)s, (void)version; return not_yet(err); }
top_status store_integrity_check(store *s, top_error *err) { (void)s; return not_yet(err); }
void store_set_clock(store *s, store_clock_fn fn, void *ctx) { (void)s, (void)fn, (void)ctx; }
top_status store_new_id(char out[STORE_ID_MAX], const char *prefix, top_error *err) { (void)out, (void)prefix; return not_yet(err); }
top_status store_job_insert(store *s, const json_t *request, const char *idempotency_key, char id[STORE_ID_MAX], bool *existed, top_error *err) { (void)s, (void)request, (void)idempotency_key, (void)id, (void)existed; return not_yet(err); }
top_status store_job_get(store *s, const char *id, json_t **out, top_error *err) { (void)s, (void)id; *out = NULL; return not_yet(err); }
top_status store_job_list(store *s, const store_job_query *q, json_t **out, top_error *err) { (void)s, (void)q; *out = NULL; return not_yet(err); }
top_status store_job_claim(store *s, json_t **out, top_error *err) { (void)s; *out = NULL; return not_yet(err); }
top_status store_job_transition(store *s, const char *id, store_job_status from, store_job_status to, top_error *err) { (void)s, (void)id, (void)from, (void)to; return not_yet(err); }
top_status store_job_progress(store *s, const char *id, const char *stage, double progress, double eta_seconds, bool *cancel_requested, top_error *err) { (void)s, (void)id, (void)stage, (void)progress, (void)eta_seconds, (void)cancel_requested; return not_yet(err); }
top_status store_job_cancel(store *s, const char *id, store_job_status *status, top_error *err) { (void)s, (void)id, (void)status; return not_yet(err); }
top_status store_job_succeed(store *s, const char *id, const store_job_outcome *outcome, top_error *err) { (void)s, (void)id, (void)outcome; return not_yet(err); }
top_status store_job_fail(store *s, const char *id, const char *message, top_error *err) { (void)s, (void)id, (void)message; return not_yet(err); }
top_status store_job_delete(store *s, const char *id, json_t **artifact_paths, top_error *err) { (void)s, (void)id, (void)artifact_paths; return not_yet(err); }
top_status store_jobs_recover(store *s, int max_attempts, size_t *requeued, size_t *failed, top_error *err) { (void)s, (void)max_attempts, (void)requeued, (void)failed; return not_yet(err); }
top_status store_job_counts(store *s, int64_t counts[STORE_JOB_STATUS_COUNT], top_error *err) { (void)s, (void)counts; return not_yet(err); }
top_status store_model_insert(store *s, const store_model *m, char id[STORE_ID_MAX], top_error *err) { (void)s, (void)m, (void)id; return not_yet(err); }
top_status store_model_get(store *s, const char *id, json_t **out, top_error *err) { (void)s, (void)id; *out = NULL; return not_yet(err); }
top_status store_model_list(store *s, const char *cursor, size_t limit, json_t **out, top_error *err) { (void)s, (void)cursor, (void)limit; *out = NULL; return not_yet(err); }
top_status store_task_insert(store *s, const char *id, const json_t *spec, char id_out[STORE_ID_MAX], top_error *err) { (void)s, (void)id, (void)spec, (void)id_out; return not_yet(err); }
top_status store_task_get(store *s, const char *id, json_t **out, top_error *err) { (void)s, (void)id; *out = NULL; return not_yet(err); }
top_status store_task_list(store *s, const char *cursor, size_t limit, json_t **out, top_error *err) { (void)s, (void)cursor, (void)limit; *out = NULL; return not_yet(err); }
