/*
 * The API's entry points: the route table, dispatch from the http glue's
 * begin/finish/done callbacks, and the access log. begin matches the route,
 * authenticates and checks the Content-Type before any body byte is read, so
 * 401/403/404/405/415 never wait for an upload. finish runs the route's
 * handler; done counts the request in the metrics, writes one access-log line
 * and closes the request's store connection. All run on connection threads.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_internal.h"
#include "log.h"

static const api_route routes[] = {
    {"GET", "/healthz", api_get_healthz, 0, 1},
    {"GET", "/readyz", api_get_readyz, 0, 1},
    {"GET", "/metrics", api_get_metrics, 0, 1},
    {"POST", "/v1/jobs", api_post_job, 1, 0},
    {"GET", "/v1/jobs", api_list_jobs, 0, 0},
    {"GET", "/v1/jobs/{id}", api_get_job, 0, 0},
    {"DELETE", "/v1/jobs/{id}", api_delete_job, 0, 0},
    {"POST", "/v1/jobs/{id}/cancel", api_cancel_job, 0, 0},
    {"GET", "/v1/jobs/{id}/checkpoint", api_get_checkpoint, 0, 0},
    {"GET", "/v1/jobs/{id}/events", api_get_events, 0, 0},
    {"POST", "/v1/models", api_post_model, 1, 0},
    {"GET", "/v1/models", api_list_models, 0, 0},
    {"GET", "/v1/models/{id}", api_get_model, 0, 0},
    {"PUT", "/v1/models/{id}/content", api_put_model_content, 0, 0},
    {"POST", "/v1/tasks", api_post_task, 1, 0},
    {"GET", "/v1/tasks", api_list_tasks, 0, 0},
    {"GET", "/v1/tasks/{id}", api_get_task, 0, 0},
    {"GET", "/v1/methods", api_get_methods, 0, 0},
};
#define N_ROUTES (sizeof routes / sizeof routes[0])

/* Matches path against pattern, copying {x} segments into params. */
static int match_path(const char *pattern, const char *path,
                      char params[API_MAX_PARAMS][API_PARAM_MAX])
{
    int n = 0;
    while (*pattern && *path) {
        if (*pattern == '{') {
            const char *close = strchr(pattern, '}');
            size_t len = strcspn(path, "/");
            if (!close || len == 0 || len >= API_PARAM_MAX || n == API_MAX_PARAMS)
                return 0;
            memcpy(params[n], path, len);
            params[n++][len] = '\0';
            pattern = close + 1;
            path += len;
        } else if (*pattern++ != *path++) {
            return 0;
        }
    }
    return *pattern == '\0' && *path == '\0';
}

/* 1 if a HEAD request may use this GET route: every one but the event
 * stream, whose body never ends. libmicrohttpd sends the headers of a HEAD
 * response and drops its body. */
static int head_allowed(const api_route *r)
{
    return !strcmp(r->method, "GET") && r->fn != api_get_events;
}

/* Finds the route; *allow gets the methods the path accepts when none matches. */
static const api_route *find_route(const char *method, const char *path, api_call *call,
                                   char *allow, size_t cap, const char **pattern)
{
    allow[0] = '\0';
    *pattern = NULL;
    char params[API_MAX_PARAMS][API_PARAM_MAX];
    int head = !strcmp(method, "HEAD");
    for (size_t i = 0; i < N_ROUTES; i++) {
        if (!match_path(routes[i].pattern, path, params))
            continue;
        *pattern = routes[i].pattern;
        if (!strcmp(routes[i].method, method) || (head && head_allowed(&routes[i]))) {
            memcpy(call->params, params, sizeof params);
            return &routes[i];
        }
        size_t used = strlen(allow);
        snprintf(allow + used, cap - used, "%s%s%s", used ? ", " : "", routes[i].method,
                 head_allowed(&routes[i]) ? ", HEAD" : "");
    }
    return NULL;
}

static int is_json_type(const char *ct)
{
    if (!ct)
        return 0;
    size_t n = strcspn(ct, ";");
    while (n && ct[n - 1] == ' ')
        n--;
    return n == 16 && !strncasecmp(ct, "application/json", 16);
}

static struct MHD_Response *route_error(api *a, http_request *req, api_call *call)
{
    char allow[64];
    const char *pattern;
    call->route = find_route(req->method, req->path, call, allow, sizeof allow, &pattern);
    if (call->route) {
        req->route = call->route->pattern;
        return NULL;
    }
    struct MHD_Response *resp = api_authorize(a, req, NULL);
    if (resp)
        return resp;
    if (!pattern) {
        req->route = "unmatched";
        return api_problem(req, 404, "not-found", "Not found",
                           "no route matches this path; see openapi.yaml for the routes", NULL);
    }
    req->route = pattern;
    char detail[128];
    snprintf(detail, sizeof detail, "%s is not allowed here; use %s", req->method, allow);
    resp = api_problem(req, 405, "method-not-allowed", "Method not allowed", detail, NULL);
    if (resp)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_ALLOW, allow);
    return resp;
}

static void on_begin(void *user, http_request *req)
{
    api *a = user;
    api_call *call = calloc(1, sizeof *call);
    req->state = call;
    req->body_cap = a->cfg->max_body_bytes;
    if (!call) {
        req->early = api_problem(req, 503, "unavailable", "Service unavailable",
                                 "out of memory; retry later", NULL);
        req->early_status = req->status;
        return;
    }
    struct MHD_Response *resp = route_error(a, req, call);
    if (!resp)
        resp = api_authorize(a, req, call->route);
    if (!resp && call->route->body) {
        const char *ct = MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND,
                                                     MHD_HTTP_HEADER_CONTENT_TYPE);
        if (!is_json_type(ct)) {
            char detail[160];
            snprintf(detail, sizeof detail,
                     "Content-Type '%.64s' is not supported; send "
                     "application/json",
                     ct ? ct : "(none)");
            resp = api_problem(req, 415, "unsupported-media-type", "Unsupported media type",
                               detail, NULL);
        }
    }
    if (!resp && call->route->fn == api_put_model_content)
        api_upload_begin(a, req, call);
    if (resp) {
        req->early = resp;
        req->early_status = req->status;
    }
}

static struct MHD_Response *on_finish(void *user, http_request *req)
{
    api *a = user;
    api_call *call = req->state;
    if (req->body_over_cap) {
        char detail[128];
        snprintf(detail, sizeof detail, "the request body exceeds %zu bytes; send less",
                 req->body_cap);
        json_t *extra = json_pack("{s:I}", "max_bytes", (json_int_t)req->body_cap);
        return api_problem(req, 413, "too-large", "Request too large", detail, extra);
    }
    return call->route->fn(a, req, call);
}

static void on_done(void *user, http_request *req, int completed)
{
    api *a = user;
    api_call *call = req->state;
    const char *route = req->route ? req->route : "unmatched";
    api_metrics_count(a, route, req->method, req->status);
    double ms = 1e3 * (http_now_s() - req->start_s);
    log_info("http", req->id, "request",
             "method=%s route=%s path=%s status=%u bytes=%llu "
             "duration_ms=%.1f completed=%d",
             req->method, route, req->path, req->status, (unsigned long long)req->bytes, ms,
             completed);
    if (call) {
        api_upload_free(call->upload);
        free(call);
    }
    req->state = NULL;
}

top_status api_new(api **out, const server_config *cfg, executor *ex, top_error *err)
{
    *out = NULL;
    api *a = calloc(1, sizeof *a);
    if (!a)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the api");
    a->cfg = cfg;
    a->ex = ex;
    pthread_mutex_init(&a->submit_mu, NULL);
    pthread_mutex_init(&a->metrics_mu, NULL);
    top_status st = api_tokens_load(a, err);
    if (st != TOP_OK) {
        api_free(a);
        return st;
    }
    *out = a;
    return TOP_OK;
}

http_handler api_handler(api *a)
{
    return (http_handler){.begin = on_begin, .finish = on_finish, .done = on_done, .user = a};
}

void api_set_stopping(api *a)
{
    a->stopping = 1;
}

void api_free(api *a)
{
    if (!a)
        return;
    pthread_mutex_destroy(&a->submit_mu);
    pthread_mutex_destroy(&a->metrics_mu);
    free(a);
}
