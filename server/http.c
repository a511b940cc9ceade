/*
 * libmicrohttpd glue (see http.h). The daemon runs a thread per connection;
 * on_access runs on that thread for every piece of a request, and
 * on_completed when the exchange ends. A request's body is appended to a
 * buffer that never grows past body_cap (the rest is read and dropped) or
 * passed to the handler's sink. A Content-Length over the cap is answered
 * before the body is read, so a client that sent Expect: 100-continue never
 * uploads it. Owns the daemon and each in-flight http_request.
 */
#include "http.h"

#include <arpa/inet.h>
#include <errno.h>
#include <netinet/in.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

struct http_server {
    struct MHD_Daemon *daemon;
    http_handler handler;
    http_config cfg;
    uint16_t port;
    uint64_t id_seed;
    atomic_uint_fast64_t next_id;
};

double http_now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* splitmix64 finaliser: request ids look random but stay unique per process. */
static uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

static http_request *request_new(http_server *s, struct MHD_Connection *conn, const char *url,
                                 const char *method)
{
    http_request *req = calloc(1, sizeof *req);
    if (!req)
        return NULL;
    req->conn = conn;
    req->method = method;
    req->path = url;
    req->start_s = http_now_s();
    req->body_cap = s->cfg.default_body_cap;
    uint64_t n = atomic_fetch_add(&s->next_id, 1);
    snprintf(req->id, sizeof req->id, "%016llx",
             (unsigned long long)mix64(s->id_seed + n * 0x9e3779b97f4a7c15ull));
    return req;
}

static enum MHD_Result send_response(http_request *req, struct MHD_Response *resp)
{
    if (!resp)
        return MHD_NO;
    MHD_add_response_header(resp, "X-Request-Id", req->id);
    enum MHD_Result r = MHD_queue_response(req->conn, req->status, resp);
    MHD_destroy_response(resp);
    return r;
}

/* A declared Content-Length over the cap of a buffered body. */
static int declared_too_large(const http_request *req)
{
    if (req->sink)
        return 0;
    const char *cl =
        MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_CONTENT_LENGTH);
    if (!cl)
        return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(cl, &end, 10);
    return errno || *end != '\0' || v > req->body_cap;
}

static void body_append(http_request *req, const char *data, size_t size)
{
    if (req->sink) {
        if (!req->sink_stopped && req->sink(req->sink_user, data, size) != 0)
            req->sink_stopped = 1;
        return;
    }
    if (req->body_over_cap)
        return;
    if (size > req->body_cap - req->body_len) {
        req->body_over_cap = 1;
        free(req->body);
        req->body = NULL;
        req->body_len = 0;
        return;
    }
    char *grown = realloc(req->body, req->body_len + size + 1);
    if (!grown) {
        /* NOTE: an allocation failure is reported as a body over the cap (413). */
        req->body_over_cap = 1;
        return;
    }
    memcpy(grown + req->body_len, data, size);
    req->body = grown;
    req->body_len += size;
    req->body[req->body_len] = '\0';
}

static enum MHD_Result on_access(void *cls, struct MHD_Connection *conn, const char *url,
                                 const char *method, const char *version,
                                 const char *upload_data, size_t *upload_data_size,
                                 void **con_cls)
{
    (void)version;
    http_server *s = cls;
    http_request *req = *con_cls;

    if (!req) {
        req = request_new(s, conn, url, method);
        if (!req)
            return MHD_NO;
        *con_cls = req;
        s->handler.begin(s->handler.user, req);
        if (req->early) {
            req->status = req->early_status;
            struct MHD_Response *early = req->early;
            req->early = NULL;
            return send_response(req, early);
        }
        if (declared_too_large(req)) {
            req->body_over_cap = 1;
            return send_response(req, s->handler.finish(s->handler.user, req));
        }
        return MHD_YES;
    }
    if (*upload_data_size) {
        body_append(req, upload_data, *upload_data_size);
        *upload_data_size = 0;
        return MHD_YES;
    }
    return send_response(req, s->handler.finish(s->handler.user, req));
}

static void on_completed(void *cls, struct MHD_Connection *conn, void **con_cls,
                         enum MHD_RequestTerminationCode toe)
{
    (void)conn;
    http_server *s = cls;
    http_request *req = *con_cls;
    if (!req)
        return;
    s->handler.done(s->handler.user, req, toe == MHD_REQUEST_TERMINATED_COMPLETED_OK);
    if (req->early)
        MHD_destroy_response(req->early);
    free(req->body);
    free(req);
    *con_cls = NULL;
}

/* Fills addr from a dotted IPv4 or an IPv6 literal; returns 0, or -1. */
static int parse_address(struct sockaddr_storage *addr, unsigned *flags, const char *host,
                         uint16_t port)
{
    memset(addr, 0, sizeof *addr);
    struct sockaddr_in *v4 = (struct sockaddr_in *)addr;
    struct sockaddr_in6 *v6 = (struct sockaddr_in6 *)addr;
    if (inet_pton(AF_INET, host, &v4->sin_addr) == 1) {
        v4->sin_family = AF_INET;
        v4->sin_port = htons(port);
        return 0;
    }
    if (inet_pton(AF_INET6, host, &v6->sin6_addr) == 1) {
        v6->sin6_family = AF_INET6;
        v6->sin6_port = htons(port);
        *flags |= MHD_USE_IPv6;
        return 0;
    }
    return -1;
}

top_status http_server_start(http_server **out, const http_config *cfg,
                             const http_handler *handler, top_error *err)
{
    *out = NULL;
    unsigned flags = MHD_USE_THREAD_PER_CONNECTION | MHD_USE_INTERNAL_POLLING_THREAD |
                     MHD_USE_ITC | MHD_USE_ERROR_LOG;
    struct sockaddr_storage addr;
    if (parse_address(&addr, &flags, cfg->host, cfg->port) != 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "invalid listen address '%s'; pass an IPv4 or IPv6 literal such "
                             "as 127.0.0.1 or ::1",
                             cfg->host);
    http_server *s = calloc(1, sizeof *s);
    if (!s)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory starting the http server");
    s->handler = *handler;
    s->cfg = *cfg;
    s->id_seed = mix64((uint64_t)time(NULL) ^ ((uint64_t)getpid() << 32));
    atomic_init(&s->next_id, 1);

    s->daemon = MHD_start_daemon(flags, 0, NULL, NULL, on_access, s, MHD_OPTION_SOCK_ADDR,
                                 (struct sockaddr *)&addr, MHD_OPTION_CONNECTION_LIMIT,
                                 cfg->connection_limit, MHD_OPTION_CONNECTION_TIMEOUT,
                                 cfg->timeout_s, MHD_OPTION_NOTIFY_COMPLETED, on_completed, s,
                                 MHD_OPTION_LISTENING_ADDRESS_REUSE, 1u, MHD_OPTION_END);
    if (!s->daemon) {
        free(s);
        return top_error_set(err, TOP_ERR_IO,
                             "cannot listen on %s port %u; check that the port is free",
                             cfg->host, (unsigned)cfg->port);
    }
    const union MHD_DaemonInfo *info =
        MHD_get_daemon_info(s->daemon, MHD_DAEMON_INFO_BIND_PORT);
    s->port = info ? info->port : cfg->port;
    *out = s;
    return TOP_OK;
}

uint16_t http_server_port(const http_server *s)
{
    return s->port;
}

void http_server_quiesce(http_server *s)
{
    if (!s)
        return;
    MHD_socket fd = MHD_quiesce_daemon(s->daemon);
    if (fd != MHD_INVALID_SOCKET)
        close(fd);
}

void http_server_stop(http_server *s)
{
    if (!s)
        return;
    MHD_stop_daemon(s->daemon);
    free(s);
}
