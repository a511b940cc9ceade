/*
 * Declarations shared by the api/ files: the API context, the per-request
 * call state, the route handlers and the helpers for JSON responses, problem
 * documents and request validation. Not a public interface.
 */
#ifndef TOPIARY_API_INTERNAL_H
#define TOPIARY_API_INTERNAL_H

#include <pthread.h>
#include <stdint.h>

#include <jansson.h>

#include "api.h"
#include "store.h"

#define API_MAX_STRING 4096              /* bytes of any string in a request body */
#define API_MAX_PARAMS 2                 /* path parameters of one route */
#define API_PARAM_MAX 64                 /* bytes of one path parameter */
#define API_MIN_FREE_BYTES (64ull << 20) /* free disk below this: 507 */
#define API_MAX_TOKENS 64

typedef struct api_token {
    uint8_t digest[32]; /* sha256 of the token; compared in constant time */
    int read_only;
} api_token;

#define API_METRIC_SLOTS 256

typedef struct api_metric {
    const char *route;
    const char *method;
    unsigned status;
    uint64_t count;
} api_metric;

struct api {
    const server_config *cfg;
    executor *ex;
    api_token tokens[API_MAX_TOKENS];
    int n_tokens;
    volatile int stopping;
    pthread_mutex_t submit_mu; /* makes the queue-capacity check and insert atomic */
    pthread_mutex_t metrics_mu;
    api_metric metrics[API_METRIC_SLOTS];
    int n_metrics;
};

typedef struct api_call api_call;
typedef struct MHD_Response *(*api_route_fn)(api *a, http_request *req, api_call *call);

typedef struct api_route {
    const char *method;
    const char *pattern; /* "/v1/jobs/{id}"; {x} matches one segment */
    api_route_fn fn;
    int body;         /* 1: a JSON body is expected */
    int public_route; /* 1: no authentication */
} api_route;

typedef struct upload_state upload_state;

struct api_call {
    const api_route *route;
    char params[API_MAX_PARAMS][API_PARAM_MAX];
    store *db;            /* the HTTP thread's connection (api_store); not closed per call */
    upload_state *upload; /* PUT /v1/models/{id}/content */
};

/* ---- responses (problem.c) ---- */

/* A JSON response; takes the reference to body. */
struct MHD_Response *api_json(http_request *req, unsigned status, json_t *body);

/*
 * A problem document: type "/problems/SLUG", title, status, detail, instance
 * (the request path) and request_id, plus the members of extra (taken; may be
 * NULL).
 */
struct MHD_Response *api_problem(http_request *req, unsigned status, const char *slug,
                                 const char *title, const char *detail, json_t *extra);

/* The problem document for a failed call: the status code follows err->status. */
struct MHD_Response *api_problem_from_error(http_request *req, const top_error *err);

/* 400 or 422 naming one field: {field, value, fix} are added to the document. */
struct MHD_Response *api_problem_field(http_request *req, unsigned status, const char *field,
                                       json_t *value, const char *detail, const char *fix);

/* Opens the request's store connection on first use; NULL after a 503 was made. */
/* Returns the store connection of the calling HTTP thread, opened on its first
 * request and closed when the thread ends, so keep-alive clients do not pay a
 * SQLite open per request. NULL with err set if it cannot be opened. */
store *api_store(api *a, api_call *call, top_error *err);
/* Opens a connection the caller owns and closes (for an event stream, which
 * outlives its request). */
store *api_store_open_private(api *a, top_error *err);

/* ---- validation (validate.c) ---- */

typedef struct api_invalid {
    unsigned status; /* 400 or 422 */
    char field[128];
    json_t *value; /* a reference, or NULL */
    char detail[256];
    char fix[256];
} api_invalid;

/* Parses req->body as a JSON object with the caps; a failure fills bad (400). */
json_t *api_parse_body(const api *a, const http_request *req, api_invalid *bad);

/* Fails with 400 when obj has a member not in allowed (NULL-terminated). */
int api_check_members(const json_t *obj, const char *prefix, const char *const *allowed,
                      api_invalid *bad);

/* Sets bad and returns -1. */
int api_invalid_set(api_invalid *bad, unsigned status, const char *field, const json_t *value,
                    const char *fix, const char *detail_fmt, ...)
    __attribute__((format(printf, 6, 7)));

/* The response for a filled api_invalid; releases bad->value. */
struct MHD_Response *api_problem_invalid(http_request *req, api_invalid *bad);

/*
 * Resolves a file:// URI or a plain absolute path against the configured
 * roots: realpath, then a prefix check on whole path segments, so '..' and
 * symlinks that leave every root are rejected. out gets the resolved path.
 */
int api_resolve_path(const api *a, const char *uri, char *out, size_t cap, api_invalid *bad,
                     const char *field);

/* Resolves the paths inside a data set URI (idx:A,B folder:D bundle:F digits-grid:F). */
int api_resolve_dataset_uri(const api *a, const char *uri, char *out, size_t cap,
                            api_invalid *bad, const char *field);

/* Parses a decimal query parameter in [lo, hi]; def when absent. */
int api_query_size(http_request *req, const char *name, size_t lo, size_t hi, size_t def,
                   size_t *out, api_invalid *bad);

/* ---- auth (auth.c) ---- */

top_status api_tokens_load(api *a, top_error *err);

/* NULL when the request may proceed, else a 401 or 403 problem. */
struct MHD_Response *api_authorize(api *a, http_request *req, const api_route *route);

/* ---- metrics (health.c) ---- */

void api_metrics_count(api *a, const char *route, const char *method, unsigned status);

/* The public form of a stored job: no server paths, results in one member (jobs.c). */
json_t *api_job_view(const json_t *job);

/* ---- route handlers ---- */

struct MHD_Response *api_get_healthz(api *a, http_request *req, api_call *call);
struct MHD_Response *api_get_readyz(api *a, http_request *req, api_call *call);
struct MHD_Response *api_get_metrics(api *a, http_request *req, api_call *call);

struct MHD_Response *api_post_job(api *a, http_request *req, api_call *call);
struct MHD_Response *api_list_jobs(api *a, http_request *req, api_call *call);
struct MHD_Response *api_get_job(api *a, http_request *req, api_call *call);
struct MHD_Response *api_cancel_job(api *a, http_request *req, api_call *call);
struct MHD_Response *api_delete_job(api *a, http_request *req, api_call *call);

struct MHD_Response *api_get_checkpoint(api *a, http_request *req, api_call *call);
struct MHD_Response *api_get_events(api *a, http_request *req, api_call *call);

struct MHD_Response *api_post_model(api *a, http_request *req, api_call *call);
struct MHD_Response *api_list_models(api *a, http_request *req, api_call *call);
struct MHD_Response *api_get_model(api *a, http_request *req, api_call *call);
struct MHD_Response *api_put_model_content(api *a, http_request *req, api_call *call);
struct MHD_Response *api_post_task(api *a, http_request *req, api_call *call);
struct MHD_Response *api_list_tasks(api *a, http_request *req, api_call *call);
struct MHD_Response *api_get_task(api *a, http_request *req, api_call *call);
struct MHD_Response *api_get_methods(api *a, http_request *req, api_call *call);

/* Sets up the streamed upload of PUT /v1/models/{id}/content (catalog.c). */
void api_upload_begin(api *a, http_request *req, api_call *call);
void api_upload_free(upload_state *u);

#endif
