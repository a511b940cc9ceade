/*
 * A minimal HTTP/1.1 client over one TCP socket per request (see
 * client_http.h). The response is read through a fixed 16 KiB buffer: the
 * status line and headers line by line (each bounded), then the body by
 * Content-Length, by chunks (hex size line, data, CRLF, until a zero size and
 * the trailer lines) or until the peer closes. It does not follow redirects,
 * speak TLS or reuse connections. Reentrant.
 */
#include "client_http.h"

#include <errno.h>
#include <netdb.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <unistd.h>

#define READ_BUFFER 16384

typedef struct reader {
    int fd;
    char buf[READ_BUFFER];
    size_t pos, len;
    int eof;
} reader;

/* Where body bytes go: a sink, or a growing buffer bounded by max. */
typedef struct body_out {
    http_sink sink;
    void *ctx;
    http_response *resp;
    size_t max, cap;
} body_out;

top_status http_url_parse(http_url *out, const char *url, top_error *err)
{
    memset(out, 0, sizeof *out);
    if (!url || strncmp(url, "http://", 7))
        return top_error_set(err, TOP_ERR_INVALID,
                             "server url '%s' must start with http:// (https is not supported)",
                             url ? url : "");
    const char *h = url + 7, *end;
    if (*h == '[') {
        end = strchr(h, ']');
        if (!end)
            return top_error_set(err, TOP_ERR_INVALID, "server url '%s' lacks the closing ']'",
                                 url);
        h++;
    } else {
        end = h + strcspn(h, ":/");
    }
    size_t n = (size_t)(end - h);
    if (n == 0 || n >= sizeof out->host)
        return top_error_set(err, TOP_ERR_INVALID, "server url '%s' has no valid host", url);
    memcpy(out->host, h, n);
    const char *p = *end == ']' ? end + 1 : end;
    strcpy(out->port, "80");
    if (*p == ':') {
        size_t m = strspn(p + 1, "0123456789");
        if (m == 0 || m > 5 || atoi(p + 1) > 65535)
            return top_error_set(err, TOP_ERR_INVALID, "server url '%s' has an invalid port",
                                 url);
        memcpy(out->port, p + 1, m);
        out->port[m] = '\0';
        p += 1 + m;
    }
    if (*p && *p != '/')
        return top_error_set(err, TOP_ERR_INVALID,
                             "server url '%s' is malformed after the host", url);
    size_t plen = strlen(p);
    while (plen && p[plen - 1] == '/')
        plen--;
    if (plen >= sizeof out->prefix)
        return top_error_set(err, TOP_ERR_INVALID, "server url '%s' has a path over %zu bytes",
                             url, sizeof out->prefix - 1);
    memcpy(out->prefix, p, plen);
    return TOP_OK;
}

static top_status connect_to(int *fd_out, const http_url *url, int timeout_s, top_error *err)
{
    struct addrinfo hints = {0}, *res = NULL;
    hints.ai_family = AF_UNSPEC;
    hints.ai_socktype = SOCK_STREAM;
    int rc = getaddrinfo(url->host, url->port, &hints, &res);
    if (rc)
        return top_error_set(err, TOP_ERR_IO, "cannot resolve server host '%s': %s", url->host,
                             gai_strerror(rc));
    int fd = -1, last = 0;
    for (struct addrinfo *a = res; a; a = a->ai_next) {
        fd = socket(a->ai_family, a->ai_socktype | SOCK_CLOEXEC, a->ai_protocol);
        if (fd < 0)
            continue;
        struct timeval tv = {.tv_sec = timeout_s};
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
        if (connect(fd, a->ai_addr, a->ai_addrlen) == 0)
            break;
        last = errno;
        close(fd);
        fd = -1;
    }
    freeaddrinfo(res);
    if (fd < 0)
        return top_error_set(err, TOP_ERR_IO,
                             "cannot connect to %s port %s: %s; is the server "
                             "running there?",
                             url->host, url->port, strerror(last));
    *fd_out = fd;
    return TOP_OK;
}

static top_status send_all(int fd, const char *data, size_t n, top_error *err)
{
    while (n) {
        ssize_t w = send(fd, data, n, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return top_error_set(err, TOP_ERR_IO, "sending the request failed: %s",
                                 w < 0 ? strerror(errno) : "connection closed");
        data += w;
        n -= (size_t)w;
    }
    return TOP_OK;
}

static top_status send_request(int fd, const http_url *url, const http_request *req,
                               top_error *err)
{
    char head[4096];
    int n = snprintf(head, sizeof head,
                     "%s %s%s HTTP/1.1\r\nHost: %s%s%s:%s\r\nUser-Agent: topiary\r\n"
                     "Connection: close\r\n",
                     req->method, url->prefix, req->path, strchr(url->host, ':') ? "[" : "",
                     url->host, strchr(url->host, ':') ? "]" : "", url->port);
    if (req->token)
        n += snprintf(head + n, sizeof head - (size_t)n, "Authorization: Bearer %s\r\n",
                      req->token);
    if (req->accept)
        n += snprintf(head + n, sizeof head - (size_t)n, "Accept: %s\r\n", req->accept);
    if (req->idempotency_key)
        n += snprintf(head + n, sizeof head - (size_t)n, "Idempotency-Key: %s\r\n",
                      req->idempotency_key);
    if (req->body && req->content_type)
        n += snprintf(head + n, sizeof head - (size_t)n, "Content-Type: %s\r\n",
                      req->content_type);
    n += snprintf(head + n, sizeof head - (size_t)n, "Content-Length: %zu\r\n\r\n",
                  req->body ? req->body_len : 0);
    if (n <= 0 || (size_t)n >= sizeof head)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "request head is over %zu bytes; shorten the path or the token",
                             sizeof head);
    top_status st = send_all(fd, head, (size_t)n, err);
    if (st == TOP_OK && req->body && req->body_len)
        st = send_all(fd, req->body, req->body_len, err);
    return st;
}

static top_status fill(reader *r, top_error *err)
{
    if (r->pos < r->len || r->eof)
        return TOP_OK;
    for (;;) {
        ssize_t got = recv(r->fd, r->buf, sizeof r->buf, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got < 0)
            return top_error_set(err, TOP_ERR_IO, "reading the response failed: %s",
                                 errno == EAGAIN || errno == EWOULDBLOCK ? "timed out"
                                                                         : strerror(errno));
        r->pos = 0;
        r->len = (size_t)got;
        r->eof = got == 0;
        return TOP_OK;
    }
}

/* Reads one line without its CRLF into out (cap bytes with the NUL). */
static top_status read_line(reader *r, char *out, size_t cap, top_error *err)
{
    size_t n = 0;
    for (;;) {
        top_status st = fill(r, err);
        if (st != TOP_OK)
            return st;
        if (r->eof)
            return top_error_set(err, TOP_ERR_FORMAT, "the connection closed inside a line");
        char c = r->buf[r->pos++];
        if (c == '\n')
            break;
        if (n + 1 >= cap)
            return top_error_set(err, TOP_ERR_LIMIT, "a response line is over %zu bytes",
                                 cap - 1);
        out[n++] = c;
    }
    if (n && out[n - 1] == '\r')
        n--;
    out[n] = '\0';
    return TOP_OK;
}

static top_status emit(body_out *o, const char *data, size_t n, top_error *err)
{
    if (o->sink)
        return o->sink(o->ctx, data, n)
                   ? top_error_set(err, TOP_ERR_CANCELLED,
                                   "the transfer was stopped by the reader")
                   : TOP_OK;
    http_response *resp = o->resp;
    if (resp->body_len + n > o->max)
        return top_error_set(err, TOP_ERR_LIMIT, "the response body is over %zu bytes", o->max);
    if (resp->body_len + n + 1 > o->cap) {
        size_t cap = o->cap ? o->cap : 4096;
        while (cap < resp->body_len + n + 1)
            cap *= 2;
        char *grown = realloc(resp->body, cap);
        if (!grown)
            return top_error_set(err, TOP_ERR_NOMEM, "no memory for a %zu-byte response", cap);
        resp->body = grown;
        o->cap = cap;
    }
    memcpy(resp->body + resp->body_len, data, n);
    resp->body_len += n;
    resp->body[resp->body_len] = '\0';
    return TOP_OK;
}

/* Copies up to `want` body bytes (SIZE_MAX: until the peer closes). */
static top_status copy_bytes(reader *r, body_out *o, size_t want, top_error *err)
{
    while (want) {
        top_status st = fill(r, err);
        if (st != TOP_OK)
            return st;
        if (r->eof)
            return want == SIZE_MAX
                       ? TOP_OK
                       : top_error_set(err, TOP_ERR_FORMAT,
                                       "the connection closed %zu bytes before the "
                                       "end of the body",
                                       want);
        size_t n = r->len - r->pos;
        if (n > want)
            n = want;
        st = emit(o, r->buf + r->pos, n, err);
        if (st != TOP_OK)
            return st;
        r->pos += n;
        if (want != SIZE_MAX)
            want -= n;
    }
    return TOP_OK;
}

static top_status read_chunked(reader *r, body_out *o, top_error *err)
{
    char line[256];
    for (;;) {
        top_status st = read_line(r, line, sizeof line, err);
        if (st != TOP_OK)
            return st;
        char *end;
        errno = 0;
        unsigned long long size = strtoull(line, &end, 16);
        if (end == line || errno || size > SIZE_MAX / 2)
            return top_error_set(err, TOP_ERR_FORMAT, "bad chunk size line '%.40s'", line);
        if (size == 0)
            break;
        st = copy_bytes(r, o, (size_t)size, err);
        if (st == TOP_OK)
            st = read_line(r, line, sizeof line, err);
        if (st != TOP_OK)
            return st;
        if (line[0])
            return top_error_set(err, TOP_ERR_FORMAT, "a chunk does not end with CRLF");
    }
    for (int i = 0; i < 64; i++) { /* trailer lines until the empty one */
        top_status st = read_line(r, line, sizeof line, err);
        if (st != TOP_OK || !line[0])
            return st;
    }
    return top_error_set(err, TOP_ERR_LIMIT, "more than 64 trailer lines");
}

static void copy_header(char *dst, size_t cap, const char *value)
{
    snprintf(dst, cap, "%s", value);
}

/* Reads the status line and headers; sets *length (SIZE_MAX if absent) and *chunked. */
static top_status read_head(reader *r, http_response *resp, size_t *length, int *chunked,
                            top_error *err)
{
    char line[HTTP_CLIENT_LINE_MAX];
    top_status st = read_line(r, line, sizeof line, err);
    if (st != TOP_OK)
        return st;
    int major = 0, minor = 0;
    if (sscanf(line, "HTTP/%d.%d %3d", &major, &minor, &resp->status) != 3 || major != 1 ||
        resp->status < 100 || resp->status > 599)
        return top_error_set(err, TOP_ERR_FORMAT, "not an HTTP/1.x status line: '%.60s'", line);
    *length = SIZE_MAX;
    *chunked = 0;
    size_t total = 0;
    for (;;) {
        st = read_line(r, line, sizeof line, err);
        if (st != TOP_OK)
            return st;
        if (!line[0])
            return TOP_OK;
        total += strlen(line) + 2;
        if (total > HTTP_CLIENT_HEADERS_MAX)
            return top_error_set(err, TOP_ERR_LIMIT, "response headers are over %d bytes",
                                 HTTP_CLIENT_HEADERS_MAX);
        char *colon = strchr(line, ':');
        if (!colon)
            return top_error_set(err, TOP_ERR_FORMAT, "header line without ':': '%.60s'", line);
        *colon = '\0';
        const char *v = colon + 1 + strspn(colon + 1, " \t");
        if (!strcasecmp(line, "Content-Length")) {
            char *end;
            errno = 0;
            unsigned long long n = strtoull(v, &end, 10);
            if (end == v || *end || errno)
                return top_error_set(err, TOP_ERR_FORMAT, "bad Content-Length '%.40s'", v);
            *length = (size_t)n;
        } else if (!strcasecmp(line, "Transfer-Encoding")) {
            *chunked = strcasestr(v, "chunked") != NULL;
        } else if (!strcasecmp(line, "Location")) {
            copy_header(resp->location, sizeof resp->location, v);
        } else if (!strcasecmp(line, "Content-Type")) {
            copy_header(resp->content_type, sizeof resp->content_type, v);
        }
    }
}

top_status http_do(http_response *resp, const http_url *url, const http_request *req,
                   http_sink sink, void *ctx, size_t max_body, top_error *err)
{
    memset(resp, 0, sizeof *resp);
    reader *r = malloc(sizeof *r);
    if (!r)
        return top_error_set(err, TOP_ERR_NOMEM, "no memory for the response buffer");
    r->fd = -1;
    r->pos = r->len = 0;
    r->eof = 0;
    top_status st = connect_to(&r->fd, url, req->timeout_s > 0 ? req->timeout_s : 30, err);
    if (st != TOP_OK)
        goto done;
    st = send_request(r->fd, url, req, err);
    if (st != TOP_OK)
        goto done;
    size_t length;
    int chunked;
    st = read_head(r, resp, &length, &chunked, err);
    if (st != TOP_OK)
        goto done;
    body_out o = {.sink = sink, .ctx = ctx, .resp = resp, .max = max_body};
    int no_body = !strcmp(req->method, "HEAD") || resp->status == 204 || resp->status == 304;
    if (no_body)
        st = TOP_OK;
    else if (chunked)
        st = read_chunked(r, &o, err);
    else
        st = copy_bytes(r, &o, length, err);
    if (st == TOP_OK && !sink)
        st = emit(&o, "", 0, err); /* a NUL-terminated body even when empty */
done:
    if (r->fd >= 0)
        close(r->fd);
    free(r);
    return st;
}

void http_response_free(http_response *resp)
{
    free(resp->body);
    resp->body = NULL;
    resp->body_len = 0;
}
