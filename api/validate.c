/*
 * Request validation shared by the routes: the JSON body with its caps
 * (nesting depth before parsing, string length after, duplicate keys
 * rejected), unknown members, query parameters, and file paths confined to
 * the configured roots. Runs on the connection threads; no shared state.
 */
#include <errno.h>
#include <limits.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "api_internal.h"

int api_invalid_set(api_invalid *bad, unsigned status, const char *field, const json_t *value,
                    const char *fix, const char *detail_fmt, ...)
{
    bad->status = status;
    snprintf(bad->field, sizeof bad->field, "%s", field);
    json_decref(bad->value);
    bad->value = value ? json_deep_copy(value) : NULL;
    snprintf(bad->fix, sizeof bad->fix, "%s", fix);
    va_list ap;
    va_start(ap, detail_fmt);
    vsnprintf(bad->detail, sizeof bad->detail, detail_fmt, ap);
    va_end(ap);
    return -1;
}

/* Deepest nesting of arrays and objects in text, strings skipped; stops past max. */
static int json_depth(const char *text, size_t n, int max)
{
    int depth = 0, deepest = 0, in_string = 0;
    for (size_t i = 0; i < n; i++) {
        char c = text[i];
        if (in_string) {
            if (c == '\\')
                i++;
            else if (c == '"')
                in_string = 0;
        } else if (c == '"') {
            in_string = 1;
        } else if (c == '{' || c == '[') {
            if (++depth > deepest)
                deepest = depth;
            if (deepest > max)
                return deepest;
        } else if (c == '}' || c == ']') {
            depth--;
        }
    }
    return deepest;
}

/* Finds a string (value or key) longer than API_MAX_STRING; returns its path or NULL. */
static int long_string(const json_t *v, char *path, size_t cap)
{
    if (json_is_string(v))
        return json_string_length(v) > API_MAX_STRING;
    size_t used = strlen(path);
    if (json_is_object(v)) {
        const char *key;
        json_t *item;
        json_object_foreach((json_t *)(uintptr_t)v, key, item)
        {
            snprintf(path + used, cap - used, "%s%s", used ? "." : "", key);
            if (strlen(key) > API_MAX_STRING || long_string(item, path, cap))
                return 1;
        }
    } else if (json_is_array(v)) {
        for (size_t i = 0; i < json_array_size(v); i++) {
            snprintf(path + used, cap - used, "[%zu]", i);
            if (long_string(json_array_get(v, i), path, cap))
                return 1;
        }
    }
    path[used] = '\0';
    return 0;
}

json_t *api_parse_body(const api *a, const http_request *req, api_invalid *bad)
{
    if (!req->body || req->body_len == 0) {
        api_invalid_set(bad, 400, "", NULL, "send a JSON object", "the request body is empty");
        return NULL;
    }
    int max_depth = a->cfg->max_json_depth > 0 ? a->cfg->max_json_depth : 16;
    if (json_depth(req->body, req->body_len, max_depth) > max_depth) {
        api_invalid_set(bad, 400, "", NULL, "flatten the document",
                        "the JSON body nests deeper than %d levels", max_depth);
        return NULL;
    }
    json_error_t jerr;
    json_t *doc = json_loadb(req->body, req->body_len, JSON_REJECT_DUPLICATES, &jerr);
    if (!doc) {
        api_invalid_set(bad, 400, "", NULL, "send a well-formed JSON object",
                        "malformed JSON at line %d, column %d: %s", jerr.line, jerr.column,
                        jerr.text);
        return NULL;
    }
    if (!json_is_object(doc)) {
        json_decref(doc);
        api_invalid_set(bad, 400, "", NULL, "send a JSON object",
                        "the request body is not a JSON object");
        return NULL;
    }
    char path[512] = "";
    if (long_string(doc, path, sizeof path)) {
        json_decref(doc);
        api_invalid_set(bad, 400, path, NULL, "shorten the string",
                        "the string at '%s' is longer than %d bytes", path, API_MAX_STRING);
        return NULL;
    }
    return doc;
}

int api_check_members(const json_t *obj, const char *prefix, const char *const *allowed,
                      api_invalid *bad)
{
    const char *key;
    json_t *item;
    json_object_foreach((json_t *)(uintptr_t)obj, key, item)
    {
        int known = 0;
        for (const char *const *k = allowed; *k && !known; k++)
            known = !strcmp(*k, key);
        if (known)
            continue;
        char field[128];
        snprintf(field, sizeof field, "%s%s", prefix, key);
        char fix[256] = "remove it; known members:";
        for (const char *const *k = allowed; *k; k++) {
            size_t used = strlen(fix);
            snprintf(fix + used, sizeof fix - used, " %s", *k);
        }
        return api_invalid_set(bad, 400, field, NULL, fix, "unknown member '%s'", field);
    }
    return 0;
}

int api_query_size(http_request *req, const char *name, size_t lo, size_t hi, size_t def,
                   size_t *out, api_invalid *bad)
{
    const char *s = MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, name);
    *out = def;
    if (!s)
        return 0;
    char *end;
    errno = 0;
    unsigned long long v = strtoull(s, &end, 10);
    char fix[96];
    snprintf(fix, sizeof fix, "pass an integer from %zu to %zu", lo, hi);
    json_t *value = json_string(s);
    int rc = 0;
    if (*s < '0' || *s > '9' || errno || *end || v < lo || v > hi)
        rc = api_invalid_set(bad, 400, name, value, fix, "invalid query parameter %s='%s'",
                             name, s);
    json_decref(value);
    *out = (size_t)v;
    return rc;
}

/* True when path equals root or lies below it (whole segments). */
static int under_root(const char *path, const char *root)
{
    size_t n = strlen(root);
    while (n > 1 && root[n - 1] == '/')
        n--;
    if (strncmp(path, root, n) != 0)
        return 0;
    return path[n] == '\0' || path[n] == '/' || (n == 1 && root[0] == '/');
}

int api_resolve_path(const api *a, const char *uri, char *out, size_t cap, api_invalid *bad,
                     const char *field)
{
    json_t *value = json_string(uri);
    const char *path = !strncmp(uri, "file://", 7) ? uri + 7 : uri;
    int rc = 0;
    char real[PATH_MAX];
    if (path[0] != '/') {
        rc = api_invalid_set(bad, 422, field, value, "pass file:///absolute/path",
                             "'%s' is not an absolute file:// URI or path", uri);
    } else if (!realpath(path, real)) {
        rc = api_invalid_set(bad, 422, field, value, "check the path on the server",
                             "cannot resolve '%s': %s", path, strerror(errno));
    } else {
        rc = -1;
        char roots[4096];
        snprintf(roots, sizeof roots, "%s", a->cfg->file_roots ? a->cfg->file_roots : "");
        char *save = NULL;
        for (char *r = strtok_r(roots, ":", &save); r && rc; r = strtok_r(NULL, ":", &save)) {
            char real_root[PATH_MAX];
            if (realpath(r, real_root) && under_root(real, real_root))
                rc = 0;
        }
        if (rc)
            api_invalid_set(bad, 422, field, value,
                            "place the file under a configured file root (file_roots)",
                            "'%s' is outside the configured file roots", uri);
        else if (strlen(real) >= cap)
            rc = api_invalid_set(bad, 422, field, value, "use a shorter path",
                                 "the path of '%s' is too long", uri);
        else
            memcpy(out, real, strlen(real) + 1);
    }
    json_decref(value);
    return rc;
}

int api_resolve_dataset_uri(const api *a, const char *uri, char *out, size_t cap,
                            api_invalid *bad, const char *field)
{
    static const char *const schemes[] = {"idx:", "folder:", "bundle:", "digits-grid:"};
    const char *scheme = NULL;
    for (size_t i = 0; i < sizeof schemes / sizeof schemes[0]; i++)
        if (!strncmp(uri, schemes[i], strlen(schemes[i])))
            scheme = schemes[i];
    if (!scheme) {
        json_t *value = json_string(uri);
        int rc = api_invalid_set(bad, 422, field, value,
                                 "use idx:IMAGES,LABELS, folder:DIR, bundle:FILE or "
                                 "digits-grid:FILE",
                                 "unknown data set URI scheme in '%s'", uri);
        json_decref(value);
        return rc;
    }
    char rest[API_MAX_STRING + 1];
    snprintf(rest, sizeof rest, "%s", uri + strlen(scheme));
    size_t used = (size_t)snprintf(out, cap, "%s", scheme);
    char *save = NULL;
    /* Only idx: has two paths; a comma elsewhere is part of the path. */
    const char *sep = strcmp(scheme, "idx:") ? "" : ",";
    char *piece = *sep ? strtok_r(rest, sep, &save) : rest;
    for (int i = 0; piece; i++) {
        char real[PATH_MAX];
        if (api_resolve_path(a, piece, real, sizeof real, bad, field))
            return -1;
        int n = snprintf(out + used, cap - used, "%s%s", i ? "," : "", real);
        if (n < 0 || (size_t)n >= cap - used)
            return api_invalid_set(bad, 422, field, NULL, "use shorter paths",
                                   "the data set URI is too long");
        used += (size_t)n;
        piece = *sep ? strtok_r(NULL, sep, &save) : NULL;
    }
    return 0;
}
