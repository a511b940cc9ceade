/*
 * Bearer-token authentication. Tokens come from the token file (one per
 * line: "TOKEN" for full access or "TOKEN read-only"; '#' starts a comment)
 * and from TOPIARY_API_TOKENS (comma-separated "TOKEN" or "TOKEN:read-only").
 * Only the SHA-256 of each token is kept, and a presented token is hashed and
 * compared with every stored digest without an early exit, so the time taken
 * depends neither on where the first differing byte is nor on which token
 * matched. Loaded on the main thread, read-only afterwards.
 *
 * 401 (with WWW-Authenticate) means no valid credentials; 403 means a valid
 * read-only token on a method that changes state.
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_internal.h"
#include "log.h"
#include "sha256.h"

static top_status add_token(api *a, const char *token, int read_only, top_error *err)
{
    if (!*token)
        return TOP_OK;
    if (a->n_tokens == API_MAX_TOKENS)
        return top_error_set(err, TOP_ERR_LIMIT, "more than %d bearer tokens; remove some",
                             API_MAX_TOKENS);
    api_token *t = &a->tokens[a->n_tokens++];
    sha256_buffer(t->digest, token, strlen(token));
    t->read_only = read_only;
    return TOP_OK;
}

static char *trim(char *s)
{
    while (*s == ' ' || *s == '\t')
        s++;
    size_t n = strlen(s);
    while (n && (s[n - 1] == ' ' || s[n - 1] == '\t' || s[n - 1] == '\n' || s[n - 1] == '\r'))
        s[--n] = '\0';
    return s;
}

static top_status load_file(api *a, const char *path, top_error *err)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return top_error_set(err, TOP_ERR_IO,
                             "cannot open the token file '%s'; check "
                             "token_file",
                             path);
    char line[1024];
    top_status st = TOP_OK;
    for (int lineno = 1; st == TOP_OK && fgets(line, sizeof line, f); lineno++) {
        char *s = trim(line);
        if (!*s || *s == '#')
            continue;
        char *scope = strpbrk(s, " \t");
        int read_only = 0;
        if (scope) {
            *scope++ = '\0';
            scope = trim(scope);
            if (!strcmp(scope, "read-only"))
                read_only = 1;
            else if (strcmp(scope, "read-write"))
                st = top_error_set(err, TOP_ERR_INVALID,
                                   "token file '%s' line %d: unknown scope '%s'; use "
                                   "read-only or read-write",
                                   path, lineno, scope);
        }
        if (st == TOP_OK)
            st = add_token(a, s, read_only, err);
    }
    fclose(f);
    return st;
}

static top_status load_env(api *a, top_error *err)
{
    const char *env = getenv("TOPIARY_API_TOKENS");
    if (!env || !*env)
        return TOP_OK;
    char *copy = strdup(env);
    if (!copy)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory reading TOPIARY_API_TOKENS");
    top_status st = TOP_OK;
    char *save = NULL;
    for (char *t = strtok_r(copy, ",", &save); t && st == TOP_OK;
         t = strtok_r(NULL, ",", &save)) {
        char *scope = strrchr(t, ':');
        int read_only = scope && !strcmp(scope, ":read-only");
        if (read_only)
            *scope = '\0';
        st = add_token(a, trim(t), read_only, err);
    }
    free(copy);
    return st;
}

top_status api_tokens_load(api *a, top_error *err)
{
    a->n_tokens = 0;
    top_status st = TOP_OK;
    if (a->cfg->token_file && *a->cfg->token_file)
        st = load_file(a, a->cfg->token_file, err);
    if (st == TOP_OK)
        st = load_env(a, err);
    if (st == TOP_OK && a->n_tokens == 0)
        log_warn("api", NULL, "no bearer tokens configured; every request is allowed",
                 "token_file=%s", a->cfg->token_file ? a->cfg->token_file : "");
    return st;
}

/* Index of the matching token or -1; examines every token whatever matches. */
static int find_token(const api *a, const char *token)
{
    uint8_t digest[32];
    sha256_buffer(digest, token, strlen(token));
    int found = -1;
    for (int i = 0; i < a->n_tokens; i++) {
        unsigned diff = 0;
        for (int b = 0; b < 32; b++)
            diff |= (unsigned)(digest[b] ^ a->tokens[i].digest[b]);
        /* Branch-free select: found becomes i when diff is 0. */
        int match = (int)(((diff | (0u - diff)) >> 31) ^ 1u);
        found = match ? i : found;
    }
    return found;
}

static struct MHD_Response *unauthorized(http_request *req, const char *error,
                                         const char *detail)
{
    struct MHD_Response *resp =
        api_problem(req, 401, "unauthorized", "Unauthorized", detail, NULL);
    if (resp) {
        char value[128];
        snprintf(value, sizeof value, "Bearer realm=\"topiary\"%s%s%s",
                 error ? ", error=\"" : "", error ? error : "", error ? "\"" : "");
        MHD_add_response_header(resp, MHD_HTTP_HEADER_WWW_AUTHENTICATE, value);
    }
    return resp;
}

struct MHD_Response *api_authorize(api *a, http_request *req, const api_route *route)
{
    if (a->n_tokens == 0 || (route && route->public_route))
        return NULL;
    const char *h =
        MHD_lookup_connection_value(req->conn, MHD_HEADER_KIND, MHD_HTTP_HEADER_AUTHORIZATION);
    if (!h)
        return unauthorized(req, NULL, "this endpoint needs an Authorization: Bearer token");
    if (strncasecmp(h, "Bearer ", 7) != 0)
        return unauthorized(req, "invalid_request",
                            "the Authorization header is not a Bearer token; send "
                            "'Authorization: Bearer TOKEN'");
    int i = find_token(a, h + 7);
    if (i < 0)
        return unauthorized(req, "invalid_token", "the bearer token is not valid");
    int safe = !strcmp(req->method, "GET") || !strcmp(req->method, "HEAD");
    if (a->tokens[i].read_only && !safe)
        return api_problem(
            req, 403, "forbidden", "Forbidden",
            "this token is read-only and may only send GET and HEAD requests; use a "
            "read-write token",
            NULL);
    return NULL;
}
