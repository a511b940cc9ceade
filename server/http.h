/*
 * libmicrohttpd glue: one daemon bound to one IP address, a thread per
 * connection (MHD_USE_THREAD_PER_CONNECTION with the internal polling
 * thread), a connection limit and an idle timeout. The glue gathers each
 * request's body up to a cap, or hands it piece by piece to a sink the handler
 * installs, and then asks the handler for a response. It maps nothing to HTTP
 * status codes itself: a body over the cap only sets body_over_cap, and the
 * handler answers it. Every handler callback runs on the connection's thread,
 * so one request is never touched by two threads at once.
 */
#ifndef TOPIARY_HTTP_H
#define TOPIARY_HTTP_H

#include <stddef.h>
#include <stdint.h>

#include <microhttpd.h>

#include "status.h"

#define HTTP_REQUEST_ID_BYTES 17 /* 16 hex digits and a NUL */

/* Receives one piece of a streamed body; returns 0, or -1 to stop receiving
 * (the rest of the body is read and dropped). */
typedef int (*http_sink_fn)(void *user, const char *data, size_t size);

typedef struct http_request {
    struct MHD_Connection *conn;
    const char *method;
    const char *path; /* the URL path, without the query string */
    char id[HTTP_REQUEST_ID_BYTES];
    double start_s; /* monotonic seconds at the first byte */

    /* Set by the handler's begin callback. */
    size_t body_cap;   /* buffered body limit in bytes */
    http_sink_fn sink; /* non-NULL: stream the body here, buffer nothing */
    void *sink_user;
    struct MHD_Response *early; /* non-NULL: respond now without reading the body */
    unsigned early_status;

    /* The buffered body (NUL-terminated), or the state of the sink. */
    char *body;
    size_t body_len;
    int body_over_cap; /* the body exceeded body_cap */
    int sink_stopped;  /* the sink returned -1 */

    /* Set by the handler for the access log. */
    const char *route; /* the route pattern, such as "/v1/jobs/{id}" */
    unsigned status;
    uint64_t bytes; /* response body bytes, when known */
    void *state;    /* the handler's per-request state */
} http_request;

typedef struct http_handler {
    /* Headers are in; set body_cap, or sink, or early. */
    void (*begin)(void *user, http_request *req);
    /* The body is in; returns a response (a reference the glue releases)
     * and stores its status in req->status. NULL closes the connection. */
    struct MHD_Response *(*finish)(void *user, http_request *req);
    /* The exchange is over (sent or aborted); frees req->state and logs. */
    void (*done)(void *user, http_request *req, int completed);
    void *user;
} http_handler;

typedef struct http_config {
    const char *host; /* an IPv4 or IPv6 literal, such as "127.0.0.1" */
    uint16_t port;    /* 0: an ephemeral port; see http_server_port */
    unsigned connection_limit;
    unsigned timeout_s;      /* idle connection timeout */
    size_t default_body_cap; /* body_cap before begin runs */
} http_config;

typedef struct http_server http_server;

/* Starts the daemon; its threads call handler until http_server_stop. */
top_status http_server_start(http_server **out, const http_config *cfg,
                             const http_handler *handler, top_error *err);

/* The bound port, also when the configuration asked for port 0. */
uint16_t http_server_port(const http_server *s);

/* Stops accepting connections; open ones keep running until they end. */
void http_server_quiesce(http_server *s);

/* Closes every connection, joins the threads and frees s. NULL is ignored. */
void http_server_stop(http_server *s);

/* Monotonic clock in seconds. */
double http_now_s(void);

#endif
