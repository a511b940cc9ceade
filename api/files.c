/*
 * Checkpoint downloads and the job's event stream.
 *
 * GET /v1/jobs/{id}/checkpoint serves the artifact file by descriptor
 * (libmicrohttpd sends it with sendfile where it can), so it is never read
 * into memory. The ETag is the quoted sha256 recorded by the executor;
 * If-None-Match answers 304; one "bytes=" range answers 206 with
 * Content-Range, an unsatisfiable or malformed one 416, and several ranges
 * are ignored (200 with the whole file, as RFC 9110 allows).
 *
 * GET /v1/jobs/{id}/events is a Server-Sent Events stream. Its reader runs on
 * the connection's thread and polls the job with its own store connection
 * every EVENT_POLL_MS, sends a "progress" event on each change, a comment as
 * a keep-alive, and a final "done" event when the job reaches a final state.
 */
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "api_internal.h"
#include "log.h"

#define EVENT_POLL_MS 200
#define EVENT_KEEPALIVE_S 10.0
#define EVENT_MAX_S (6.0 * 3600.0) /* a stream ends after this; the client reconnects */

/* ---- checkpoint ---------------------------------------------------------- */

/* True when the If-None-Match list contains etag or "*". */
static int etag_matches(const char *list, const char *etag)
{
    if (!list)
        return 0;
    size_t n = strlen(etag);
    for (const char *p = list; *p;) {
        p += strspn(p, " \t,");
        if (*p == '*')
            return 1;
        if (!strncmp(p, "W/", 2))
            p += 2;
        if (!strncmp(p, etag, n) && (p[n] == '\0' || p[n] == ',' || p[n] == ' '))
            return 1;
        p += strcspn(p, ",");
    }
    return 0;
}

typedef enum range_kind { RANGE_NONE, RANGE_ONE, RANGE_BAD } range_kind;

/* Parses a single "bytes=a-b", "bytes=a-" or "bytes=-n" against size. */
static range_kind parse_range(const char *h, uint64_t size, uint64_t *first, uint64_t *last)
{
    if (!h)
        return RANGE_NONE;
    if (strncmp(h, "bytes=", 6) != 0)
        return RANGE_BAD;
    const char *s = h + 6;
    if (strchr(s, ','))
        return RANGE_NONE;
    char *end;
    if (*s == '-') {
        if (s[1] < '0' || s[1] > '9')
            return RANGE_BAD;
        errno = 0;
        uint64_t n = strtoull(s + 1, &end, 10);
        if (errno || *end || n == 0 || size == 0)
            return RANGE_BAD;
        *first = n >= size ? 0 : size - n;
        *last = size - 1;
        return RANGE_ONE;
    }
    if (*s < '0' || *s > '9')
        return RANGE_BAD;
    errno = 0;
    *first = strtoull(s, &end, 10);
    if (errno || *end != '-' || *first >= size)
        return RANGE_BAD;
    s = end + 1;
    if (*s == '\0') {
        *last = size - 1;
        return RANGE_ONE;
    }
    if (*s < '0' || *s > '9')
        return RANGE_BAD;
    *last = strtoull(s, &end, 10);
    if (errno || *end || *last < *first)
        return RANGE_BAD;
    if (*last >= size)
        *last = size - 1;
    return RANGE_ONE;
}

/* Looks up the artifact of a succeeded job; fills path and etag or returns a problem. */
static struct MHD_Response *find_artifact(api *a, http_request *req, api_call *call,
                                          const char *format, char *path, size_t cap,
                                          char *etag, size_t etag_cap)
{
    top_error err;
    top_error_clear(&err);
    json_t *job = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_job_get(db, call->params[0], &job, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    struct MHD_Response *resp = NULL;
    const char *status = json_string_value(json_object_get(job, "status"));
    const json_t *art = json_object_get(json_object_get(job, "artifacts"), format);
    if (!strncmp(format, "tfjs-", 5)) {
        /* TF.js files are listed in the job's report, not in the artifact columns. */
        art = json_object_get(json_object_get(json_object_get(job, "result"), "checkpoints"),
                              "tfjs");
        if (!strcmp(format, "tfjs-weights"))
            art = json_object_get(art, "weights");
    }
    const char *p = json_string_value(json_object_get(art, "path"));
    const char *sha = json_string_value(json_object_get(art, "sha256"));
    if (!status || strcmp(status, "succeeded")) {
        char detail[160];
        snprintf(detail, sizeof detail, "job %s is %s; a checkpoint exists once it succeeded",
                 call->params[0], status ? status : "unknown");
        resp =
            api_problem(req, 409, "conflict", "Conflict with the resource state", detail, NULL);
    } else if (!p || !sha) {
        resp = api_problem(req, 404, "not-found", "Not found",
                           "the job has no checkpoint in this format", NULL);
    } else {
        snprintf(path, cap, "%s", p);
        snprintf(etag, etag_cap, "\"%s\"", sha);
    }
    json_decref(job);
    return resp;
}

static void add_download_headers(struct MHD_Response *resp, const char *etag, const char *id,
                                 const char *format)
{
    char disposition[160];
    /* A TF.js model.json names its shard, so both files keep the names it expects. */
    if (!strcmp(format, "tfjs-model"))
        snprintf(disposition, sizeof disposition, "attachment; filename=\"model.json\"");
    else if (!strcmp(format, "tfjs-weights"))
        snprintf(disposition, sizeof disposition,
                 "attachment; filename=\"group1-shard1of1.bin\"");
    else
        snprintf(disposition, sizeof disposition, "attachment; filename=\"%s-%s.safetensors\"",
                 id, format);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE,
                            strcmp(format, "tfjs-model") ? "application/octet-stream"
                                                         : "application/json");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
    MHD_add_response_header(resp, MHD_HTTP_HEADER_ACCEPT_RANGES, "bytes");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_DISPOSITION, disposition);
}

static struct MHD_Response *range_not_satisfiable(http_request *req, uint64_t size)
{
    char detail[128], cr[64];
    snprintf(detail, sizeof detail,
             "the Range header does not select bytes of this %" PRIu64
             "-byte file; use bytes=FIRST-LAST with FIRST < %" PRIu64,
             size, size);
    struct MHD_Response *resp =
        api_problem(req, 416, "range-not-satisfiable", "Range not satisfiable", detail, NULL);
    snprintf(cr, sizeof cr, "bytes */%" PRIu64, size);
    if (resp)
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
    return resp;
}

struct MHD_Response *api_get_checkpoint(api *a, http_request *req, api_call *call)
{
    const char *format =
        MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, "format");
    if (!format)
        format = "compressed";
    if (strcmp(format, "compressed") && strcmp(format, "dense") &&
        strcmp(format, "tfjs-model") && strcmp(format, "tfjs-weights"))
        return api_problem_field(req, 400, "format", json_string(format),
                                 "unknown checkpoint format",
                                 "use compressed, dense, tfjs-model or tfjs-weights");
    char path[4096], etag[80];
    struct MHD_Response *resp =
        find_artifact(a, req, call, format, path, sizeof path, etag, sizeof etag);
    if (resp)
        return resp;

    const char *inm =
        MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_IF_NONE_MATCH);
    if (etag_matches(inm, etag)) {
        resp = MHD_create_response_from_buffer(0, NULL, MHD_RESPMEM_PERSISTENT);
        if (resp)
            MHD_add_response_header(resp, MHD_HTTP_HEADER_ETAG, etag);
        req->status = 304;
        return resp;
    }

    int fd = open(path, O_RDONLY | O_CLOEXEC);
    struct stat sb;
    if (fd < 0 || fstat(fd, &sb) != 0) {
        if (fd >= 0)
            close(fd);
        log_error("api", req->id, "cannot open a checkpoint", "path=%s error=%s", path,
                  strerror(errno));
        return api_problem(req, 500, "internal", "Internal error",
                           "the checkpoint file is missing on the server", NULL);
    }
    uint64_t size = (uint64_t)sb.st_size, first = 0, last = size ? size - 1 : 0;
    const char *rh =
        MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_RANGE);
    range_kind rk = parse_range(rh, size, &first, &last);
    if (rk == RANGE_BAD) {
        close(fd);
        return range_not_satisfiable(req, size);
    }
    uint64_t length = rk == RANGE_ONE ? last - first + 1 : size;
    resp = MHD_create_response_from_fd_at_offset64(length, fd, rk == RANGE_ONE ? first : 0);
    if (!resp) {
        close(fd);
        return NULL;
    }
    add_download_headers(resp, etag, call->params[0], format);
    req->status = rk == RANGE_ONE ? 206 : 200;
    req->bytes = length;
    if (rk == RANGE_ONE) {
        char cr[96];
        snprintf(cr, sizeof cr, "bytes %" PRIu64 "-%" PRIu64 "/%" PRIu64, first, last, size);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_RANGE, cr);
    }
    return resp;
}

/* ---- events -------------------------------------------------------------- */

typedef struct event_stream {
    api *a;
    store *db;
    char id[STORE_ID_MAX];
    char *pending; /* formatted bytes not yet sent */
    size_t pending_len, pending_off;
    char last_state[256]; /* status, stage and progress of the last event */
    double start_s, last_send_s;
    int finished; /* the done event was queued */
} event_stream;

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

static int queue_text(event_stream *es, const char *text)
{
    free(es->pending);
    es->pending = strdup(text);
    es->pending_len = es->pending ? strlen(text) : 0;
    es->pending_off = 0;
    return es->pending ? 0 : -1;
}

static int queue_event(event_stream *es, const char *name, json_t *data)
{
    char *d = json_dumps(data, JSON_COMPACT);
    json_decref(data);
    if (!d)
        return -1;
    size_t n = strlen(d) + strlen(name) + 32;
    char *text = malloc(n);
    if (text)
        snprintf(text, n, "event: %s\ndata: %s\n\n", name, d);
    free(d);
    if (!text)
        return -1;
    free(es->pending);
    es->pending = text;
    es->pending_len = strlen(text);
    es->pending_off = 0;
    return 0;
}

/* Polls the job once; queues an event when it changed. Returns -1 to end the stream. */
static int poll_job(event_stream *es)
{
    json_t *job = NULL;
    top_error err;
    top_error_clear(&err);
    if (store_job_get(es->db, es->id, &job, &err) != TOP_OK) {
        json_t *data = json_pack("{s:s, s:s}", "id", es->id, "error", err.message);
        es->finished = 1;
        return queue_event(es, "error", data);
    }
    const char *status = json_string_value(json_object_get(job, "status"));
    const char *stage = json_string_value(json_object_get(job, "stage"));
    double progress = json_number_value(json_object_get(job, "progress"));
    char state[256];
    snprintf(state, sizeof state, "%s|%s|%.4f", status ? status : "", stage ? stage : "",
             progress);
    int final = 0;
    store_job_status st;
    if (status && store_job_status_parse(status, &st) == 0)
        final = store_job_status_is_final(st);
    int rc = 0;
    if (strcmp(state, es->last_state) != 0 || final) {
        snprintf(es->last_state, sizeof es->last_state, "%s", state);
        json_t *data = json_pack(
            "{s:s, s:O, s:O, s:O, s:O, s:O}", "id", es->id, "status",
            json_object_get(job, "status"), "stage", json_object_get(job, "stage"), "progress",
            json_object_get(job, "progress"), "eta_seconds",
            json_object_get(job, "eta_seconds"), "error", json_object_get(job, "error"));
        es->finished = final;
        rc = queue_event(es, final ? "done" : "progress", data);
    }
    json_decref(job);
    return rc;
}

static ssize_t read_events(void *cls, uint64_t pos, char *buf, size_t max)
{
    (void)pos;
    event_stream *es = cls;
    for (;;) {
        if (es->pending_off < es->pending_len) {
            size_t n = es->pending_len - es->pending_off;
            n = n < max ? n : max;
            memcpy(buf, es->pending + es->pending_off, n);
            es->pending_off += n;
            es->last_send_s = now_s();
            return (ssize_t)n;
        }
        if (es->finished || es->a->stopping || now_s() - es->start_s > EVENT_MAX_S)
            return MHD_CONTENT_READER_END_OF_STREAM;
        if (poll_job(es) != 0)
            return MHD_CONTENT_READER_END_WITH_ERROR;
        if (es->pending_off < es->pending_len)
            continue;
        if (now_s() - es->last_send_s > EVENT_KEEPALIVE_S) {
            if (queue_text(es, ": keep-alive\n\n") != 0)
                return MHD_CONTENT_READER_END_WITH_ERROR;
            continue;
        }
        struct timespec ts = {0, EVENT_POLL_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
}

static void free_events(void *cls)
{
    event_stream *es = cls;
    store_close(es->db);
    free(es->pending);
    free(es);
}

struct MHD_Response *api_get_events(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    json_t *job = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_job_get(db, call->params[0], &job, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    json_decref(job);

    event_stream *es = calloc(1, sizeof *es);
    if (!es)
        return api_problem(req, 503, "unavailable", "Service unavailable",
                           "out of memory; retry later", NULL);
    es->a = a;
    /* The stream outlives the request, so it gets a connection of its own. */
    es->db = api_store_open_private(a, &err);
    if (!es->db) {
        free(es);
        return api_problem_from_error(req, &err);
    }
    snprintf(es->id, sizeof es->id, "%.*s", STORE_ID_MAX - 1, call->params[0]);
    es->start_s = es->last_send_s = now_s();
    if (queue_text(es, "retry: 2000\n\n") != 0) {
        free_events(es);
        return NULL;
    }
    struct MHD_Response *resp =
        MHD_create_response_from_callback(MHD_SIZE_UNKNOWN, 4096, read_events, es, free_events);
    if (!resp) {
        free_events(es);
        return NULL;
    }
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CONTENT_TYPE, "text/event-stream");
    MHD_add_response_header(resp, MHD_HTTP_HEADER_CACHE_CONTROL, "no-store");
    req->status = 200;
    return resp;
}
