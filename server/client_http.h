/*
 * A minimal HTTP/1.1 client for the topiary client commands: one request per
 * TCP connection ("Connection: close") to http://HOST[:PORT], plain text
 * only (no TLS, no proxies, no redirects).
 *
 * Response bodies framed by Content-Length, by chunked transfer coding or by
 * the end of the connection are all handed to a sink in pieces, so a
 * Server-Sent Events stream or a large download never sits in memory. Every
 * buffer is bounded: a header line at most HTTP_CLIENT_LINE_MAX bytes, all
 * headers at most HTTP_CLIENT_HEADERS_MAX bytes, a collected body at most the
 * caller's cap.
 *
 * Errors: TOP_ERR_IO when the server cannot be reached or the connection
 * fails or times out, TOP_ERR_FORMAT for a malformed response, TOP_ERR_LIMIT
 * for a response over a bound, TOP_ERR_CANCELLED when the sink stops the
 * transfer. A status of 4xx or 5xx is not an error here: the caller reads
 * resp->status. Reentrant: no global state.
 */
#ifndef TOPIARY_CLIENT_HTTP_H
#define TOPIARY_CLIENT_HTTP_H

#include <stddef.h>

#include "status.h"

#define HTTP_CLIENT_LINE_MAX 8192
#define HTTP_CLIENT_HEADERS_MAX 65536

/* A parsed base URL: http://HOST[:PORT][/PREFIX]; IPv6 hosts in brackets. */
typedef struct http_url {
    char host[256];
    char port[8];
    char prefix[256]; /* path prefix without a trailing '/', may be "" */
} http_url;

typedef struct http_request {
    const char *method;       /* "GET", "POST", ... */
    const char *path;         /* starts with '/', appended to the prefix */
    const char *token;        /* bearer token, or NULL */
    const char *content_type; /* of body, or NULL */
    const char *body;         /* may be NULL */
    size_t body_len;
    const char *accept;          /* Accept header, or NULL */
    const char *idempotency_key; /* or NULL */
    int timeout_s;               /* per send/receive call; 0 means 30 */
} http_request;

typedef struct http_response {
    int status;
    char location[512];     /* the Location header, or "" */
    char content_type[128]; /* the Content-Type header, or "" */
    char *body;             /* collected body (NUL-terminated) when no sink was given */
    size_t body_len;
} http_response;

/* Receives body bytes in order; returns 0 to go on, nonzero to stop. */
typedef int (*http_sink)(void *ctx, const char *data, size_t n);

top_status http_url_parse(http_url *out, const char *url, top_error *err);

/*
 * Sends req to url and reads the response. With sink NULL, the body is
 * collected in resp->body, at most max_body bytes (TOP_ERR_LIMIT beyond);
 * otherwise every body byte goes to sink and resp->body stays NULL. Free
 * resp with http_response_free, also after an error.
 */
top_status http_do(http_response *resp, const http_url *url, const http_request *req,
                   http_sink sink, void *ctx, size_t max_body, top_error *err);

void http_response_free(http_response *resp);

#endif
