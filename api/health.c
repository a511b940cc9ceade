/*
 * Health, readiness and Prometheus metrics. /healthz answers while the
 * process serves HTTP; /readyz also checks the store (a connection and
 * PRAGMA integrity_check), that every worker thread is alive and that no
 * drain is in progress. /metrics exposes jobs by state and the queue depth
 * (from the store), the job duration histogram (from the executor) and HTTP
 * requests by route, method and status (counted here under metrics_mu).
 */
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_internal.h"

void api_metrics_count(api *a, const char *route, const char *method, unsigned status)
{
    pthread_mutex_lock(&a->metrics_mu);
    int i = 0;
    while (i < a->n_metrics &&
           !(a->metrics[i].route == route && a->metrics[i].status == status &&
             !strcmp(a->metrics[i].method, method)))
        i++;
    if (i == a->n_metrics && a->n_metrics < API_METRIC_SLOTS) {
        /* route points into the static route table or is a literal; method is one of
         * a few literals MHD interns per request, so keep a static copy. */
        static const char *const known[] = {"GET",    "HEAD",  "POST",   "PUT",
                                            "DELETE", "PATCH", "OPTIONS"};
        const char *m = "OTHER";
        for (size_t k = 0; k < sizeof known / sizeof known[0]; k++)
            if (!strcmp(known[k], method))
                m = known[k];
        a->metrics[i] = (api_metric){.route = route, .method = m, .status = status};
        a->n_metrics++;
    }
    if (i < a->n_metrics)
        a->metrics[i].count++;
    pthread_mutex_unlock(&a->metrics_mu);
}

struct MHD_Response *api_get_healthz(api *a, http_request *req, api_call *call)
{
    (void)a, (void)call;
    return api_json(req, 200, json_pack("{s:s}", "status", "ok"));
}

struct MHD_Response *api_get_readyz(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    executor_stats es;
    executor_get_stats(a->ex, &es);
    store *db = api_store(a, call, &err);
    const char *store_state = "ok";
    if (!db || store_integrity_check(db, &err) != TOP_OK)
        store_state = err.message;
    int ready = db && err.status == TOP_OK && es.workers_alive == es.workers && !es.draining &&
                !a->stopping;
    json_t *body =
        json_pack("{s:s, s:s, s:i, s:i, s:b}", "status", ready ? "ready" : "not ready", "store",
                  store_state, "workers", es.workers, "workers_alive", es.workers_alive,
                  "draining", es.draining || a->stopping);
    if (ready)
        return api_json(req, 200, body);
    struct MHD_Response *resp =
        api_problem(req, 503, "not-ready", "Not ready",
                    "the service is not ready: check the store, the workers or a drain in "
                    "progress",
                    body);
    return resp;
}

/* Appends printf output to a growing buffer; returns -1 when out of memory. */
static int buf_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));

static int buf_printf(char **buf, size_t *len, size_t *cap, const char *fmt, ...)
{
    for (;;) {
        va_list ap;
        va_start(ap, fmt);
        int n = vsnprintf(*buf ? *buf + *len : NULL, *buf ? *cap - *len : 0, fmt, ap);
        va_end(ap);
        if (n < 0)
            return -1;
        if (*buf && (size_t)n < *cap - *len) {
            *len += (size_t)n;
            return 0;
        }
        size_t want = *cap * 2 + (size_t)n + 1024;
        char *grown = realloc(*buf, want);
        if (!grown)
            return -1;
        *buf = grown;
        *cap = want;
    }
}

static int write_jobs(char **b, size_t *len, size_t *cap, const int64_t *counts)
{
    int rc = buf_printf(b, len, cap,
                        "# HELP topiary_jobs Jobs in the store by state.\n"
                        "# TYPE topiary_jobs gauge\n");
    for (int s = 0; s < STORE_JOB_STATUS_COUNT && !rc; s++)
        rc = buf_printf(b, len, cap, "topiary_jobs{state=\"%s\"} %lld\n",
                        store_job_status_str((store_job_status)s), (long long)counts[s]);
    if (!rc)
        rc = buf_printf(b, len, cap,
                        "# HELP topiary_queue_depth Jobs waiting for a worker.\n"
                        "# TYPE topiary_queue_depth gauge\ntopiary_queue_depth %lld\n",
                        (long long)counts[STORE_JOB_QUEUED]);
    return rc;
}

static int write_executor(char **b, size_t *len, size_t *cap, const executor_stats *es)
{
    int rc = buf_printf(b, len, cap,
                        "# HELP topiary_workers_busy Worker threads running a job.\n"
                        "# TYPE topiary_workers_busy gauge\ntopiary_workers_busy %d\n"
                        "# HELP topiary_job_duration_seconds Run time of finished jobs.\n"
                        "# TYPE topiary_job_duration_seconds histogram\n",
                        es->running);
    uint64_t cumulative = 0;
    for (int i = 0; i <= EXECUTOR_DURATION_BUCKETS && !rc; i++) {
        cumulative += es->duration_counts[i];
        if (i < EXECUTOR_DURATION_BUCKETS)
            rc =
                buf_printf(b, len, cap, "topiary_job_duration_seconds_bucket{le=\"%g\"} %llu\n",
                           executor_duration_bounds[i], (unsigned long long)cumulative);
        else
            rc = buf_printf(b, len, cap,
                            "topiary_job_duration_seconds_bucket{le=\"+Inf\"} %llu\n",
                            (unsigned long long)cumulative);
    }
    if (!rc)
        rc = buf_printf(b, len, cap,
                        "topiary_job_duration_seconds_sum %.6f\n"
                        "topiary_job_duration_seconds_count %llu\n",
                        es->duration_sum_s, (unsigned long long)es->duration_count);
    return rc;
}

static int write_http(api *a, char **b, size_t *len, size_t *cap)
{
    int rc =
        buf_printf(b, len, cap,
                   "# HELP topiary_http_requests_total HTTP requests by route and status.\n"
                   "# TYPE topiary_http_requests_total counter\n");
    pthread_mutex_lock(&a->metrics_mu);
    for (int i = 0; i < a->n_metrics && !rc; i++)
        rc = buf_printf(b, len, cap,
                        "topiary_http_requests_total{route=\"%s\",method=\"%s\",status=\"%u\"} "
                        "%llu\n",
                        a->metrics[i].route, a->metrics[i].method, a->metrics[i].status,
                        (unsigned long long)a->metrics[i].count);
    pthread_mutex_unlock(&a->metrics_mu);
    return rc;
}

struct MHD_Response *api_get_metrics(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    int64_t counts[STORE_JOB_STATUS_COUNT] = {0};
    store *db = api_store(a, call, &err);
    if (!db || store_job_counts(db, counts, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    executor_stats es;
    executor_get_stats(a->ex, &es);

    char *b = NULL;
    size_t len = 0, cap = 0;
    int rc = write_jobs(&b, &len, &cap, counts);
    if (!rc)
        rc = write_executor(&b, &len, &cap, &es);
    if (!rc)
        rc = write_http(a, &b, &len, &cap);
    if (rc) {
        free(b);
        return api_problem(req, 503, "unavailable", "Service unavailable",
                           "out of memory writing the metrics; retry later", NULL);
    }
    struct MHD_Response *resp = MHD_create_response_from_buffer(len, b, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(b);
        return NULL;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                            "text/plain; version=0.0.4; charset=utf-8");
    req->status = 200;
    req->bytes = len;
    return resp;
}
