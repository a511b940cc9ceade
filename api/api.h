/*
 * The HTTP API of `topiary serve`: routes, authentication, request
 * validation, JSON responses and RFC 9457 problem documents. This is the only
 * module that maps top_status values to HTTP status codes.
 *
 * Threads: api_new and api_free run on the main thread; the handler returned
 * by api_handler runs on libmicrohttpd's connection threads, each request on
 * one thread, with its own store connection opened per request.
 */
#ifndef TOPIARY_API_H
#define TOPIARY_API_H

#include "config.h"
#include "executor.h"
#include "http.h"
#include "status.h"

typedef struct api api;

/*
 * Creates the API over a parsed configuration and a running executor (both
 * must outlive it). Reads the bearer tokens from cfg->token_file and from the
 * TOPIARY_API_TOKENS environment variable; with neither, every request is
 * allowed and a warning is logged.
 */
top_status api_new(api **out, const server_config *cfg, executor *ex, top_error *err);

/* The callbacks to pass to http_server_start. */
http_handler api_handler(api *a);

/* Ends open event streams and makes /readyz report not ready (drain). */
void api_set_stopping(api *a);

void api_free(api *a);

#endif
