/*
 * JSON responses and RFC 9457 problem documents (application/problem+json),
 * and the one mapping from top_status to HTTP status codes. Runs on the
 * connection threads; no shared state.
 */
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_internal.h"
#include "log.h"

struct MHD_Response *api_json(http_request *req, unsigned status, json_t *body)
{
    char *text = body ? json_dumps(body, JSON_COMPACT | JSON_PRESERVE_ORDER) : NULL;
    json_decref(body);
    if (!text)
        return NULL;
    size_t n = strlen(text);
    struct MHD_Response *resp = MHD_create_response_from_buffer(n, text, MHD_RESPMEM_MUST_FREE);
    if (!resp) {
        free(text);
        return NULL;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    req->status = status;
    req->bytes = n;
    return resp;
}

struct MHD_Response *api_problem(http_request *req, unsigned status, const char *slug,
                                 const char *title, const char *detail, json_t *extra)
{
    char type[96];
    snprintf(type, sizeof type, "/problems/%s", slug);
    json_t *doc = json_pack("{s:s, s:s, s:i, s:s, s:s, s:s}", "type", type, "title", title,
                            "status", (int)status, "detail", detail ? detail : title,
                            "instance", req->path, "request_id", req->id);
    if (doc && extra)
        json_object_update(doc, extra);
    json_decref(extra);
    struct MHD_Response *resp = api_json(req, status, doc);
    if (resp) {
        MHD_del_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/json");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "application/problem+json");
    }
    return resp;
}

/* The HTTP status, problem slug and title of a status code. */
static void status_for(top_status st, unsigned *code, const char **slug, const char **title)
{
    switch (st) {
    case TOP_ERR_NOT_FOUND: *code = 404, *slug = "not-found", *title = "Not found"; return;
    case TOP_ERR_STATE:
        *code = 409, *slug = "conflict", *title = "Conflict with the resource state";
        return;
    case TOP_ERR_INVALID:
    case TOP_ERR_FORMAT:
    case TOP_ERR_SHAPE: *code = 422, *slug = "invalid-value", *title = "Invalid value"; return;
    case TOP_ERR_UNSUPPORTED:
        *code = 422, *slug = "unsupported", *title = "Unsupported input";
        return;
    case TOP_ERR_LIMIT:
    case TOP_ERR_OVERFLOW:
        *code = 413, *slug = "too-large", *title = "Request too large";
        return;
    case TOP_ERR_IO:
        *code = 503, *slug = "storage-unavailable", *title = "Storage unavailable";
        return;
    case TOP_ERR_NOMEM:
        *code = 503, *slug = "unavailable", *title = "Service unavailable";
        return;
    default: *code = 500, *slug = "internal", *title = "Internal error"; return;
    }
}

struct MHD_Response *api_problem_from_error(http_request *req, const top_error *err)
{
    unsigned code;
    const char *slug, *title;
    status_for(err->status, &code, &slug, &title);
    if (code >= 500)
        log_error("api", req->id, "request failed", "route=%s status=%u error=%s",
                  req->route ? req->route : "", code, err->message);
    return api_problem(req, code, slug, title, err->message, NULL);
}

struct MHD_Response *api_problem_field(http_request *req, unsigned status, const char *field,
                                       json_t *value, const char *detail, const char *fix)
{
    json_t *extra = json_pack("{s:s, s:o, s:s}", "field", field, "value",
                              value ? value : json_null(), "fix", fix ? fix : "");
    const char *slug = status == 400 ? "bad-request" : "invalid-value";
    const char *title = status == 400 ? "Bad request" : "Invalid value";
    return api_problem(req, status, slug, title, detail, extra);
}

struct MHD_Response *api_problem_invalid(http_request *req, api_invalid *bad)
{
    json_t *value = bad->value;
    bad->value = NULL;
    return api_problem_field(req, bad->status ? bad->status : 400, bad->field, value,
                             bad->detail, bad->fix);
}

static pthread_key_t thread_store_key;
static pthread_once_t thread_store_once = PTHREAD_ONCE_INIT;

static void thread_store_close(void *db)
{
    store_close(db);
}

static void thread_store_key_create(void)
{
    pthread_key_create(&thread_store_key, thread_store_close);
}

store *api_store_open_private(api *a, top_error *err)
{
    store_options opts = {
        .busy_timeout_ms = a->cfg->busy_timeout_ms,
        .synchronous_full = a->cfg->sqlite_sync_full,
    };
    store *db = NULL;
    if (store_open(&db, a->cfg->database_path, &opts, err) != TOP_OK)
        return NULL;
    return db;
}

store *api_store(api *a, api_call *call, top_error *err)
{
    if (call->db)
        return call->db;
    pthread_once(&thread_store_once, thread_store_key_create);
    store *db = pthread_getspecific(thread_store_key);
    if (!db) {
        db = api_store_open_private(a, err);
        if (!db)
            return NULL;
        if (pthread_setspecific(thread_store_key, db) != 0) {
            store_close(db);
            top_error_set(err, TOP_ERR_NOMEM,
                          "cannot keep the store connection of an HTTP "
                          "thread; retry later");
            return NULL;
        }
    }
    call->db = db;
    return db;
}
