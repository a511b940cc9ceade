/*
 * The catalog routes: models (register by file:// URI, upload by PUT, list,
 * get), tasks (register a labelled data set URI with default split sizes,
 * list, get) and the pruning methods with their parameters.
 *
 * Registration imports the model (model_load) or opens the data set
 * (dataset_open) on the connection's thread, so a broken file is rejected
 * with the importer's message (422) instead of failing a job later. Uploads
 * stream to a temporary file in ARTIFACT_DIR/models, hashed on the way, then
 * fsync and rename to the sha256 name, so no half-written file ever carries
 * a final name.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "api_internal.h"
#include "dataset.h"
#include "log.h"
#include "model.h"
#include "sha256.h"

/* ---- shared -------------------------------------------------------------- */

static struct MHD_Response *created(http_request *req, const char *kind, const char *id,
                                    json_t *body)
{
    struct MHD_Response *resp = api_json(req, 201, body);
    if (resp) {
        char loc[96];
        snprintf(loc, sizeof loc, "/v1/%s/%s", kind, id);
        MHD_add_response_header(resp, MHD_HTTP_HEADER_LOCATION, loc);
    }
    return resp;
}

typedef top_status (*list_fn)(store *s, const char *cursor, size_t limit, json_t **out,
                              top_error *err);

static struct MHD_Response *list_page(api *a, http_request *req, api_call *call, list_fn fn)
{
    api_invalid bad = {0};
    size_t limit;
    if (api_query_size(req, "limit", 1, STORE_LIST_LIMIT_MAX, STORE_LIST_LIMIT_DEFAULT, &limit,
                       &bad))
        return api_problem_invalid(req, &bad);
    const char *cursor =
        MHD_lookup_connection_value(req->conn, MHD_GET_ARGUMENT_KIND, "cursor");
    top_error err;
    top_error_clear(&err);
    json_t *page = NULL;
    store *db = api_store(a, call, &err);
    if (!db || fn(db, cursor, limit, &page, &err) != TOP_OK) {
        if (err.status == TOP_ERR_INVALID)
            return api_problem_field(req, 400, "cursor", json_string(cursor ? cursor : ""),
                                     err.message, "pass the next_cursor of a previous page");
        return api_problem_from_error(req, &err);
    }
    return api_json(req, 200, page);
}

/* ---- models -------------------------------------------------------------- */

/* sha256 over a folder's regular files in name order: name, NUL, contents. */
static top_status sha256_folder(char hex[SHA256_HEX_BYTES], const char *dir, top_error *err)
{
    struct dirent **list = NULL;
    int n = scandir(dir, &list, NULL, alphasort);
    if (n < 0)
        return top_error_set(err, TOP_ERR_IO, "cannot list '%s': %s", dir, strerror(errno));
    sha256_ctx ctx;
    sha256_init(&ctx);
    top_status st = TOP_OK;
    for (int i = 0; i < n && st == TOP_OK; i++) {
        char path[4096 + 256];
        snprintf(path, sizeof path, "%s/%s", dir, list[i]->d_name);
        struct stat sb;
        if (list[i]->d_name[0] == '.' || stat(path, &sb) != 0 || !S_ISREG(sb.st_mode))
            continue;
        char file_hex[SHA256_HEX_BYTES];
        st = sha256_file(file_hex, path, err);
        sha256_update(&ctx, list[i]->d_name, strlen(list[i]->d_name) + 1);
        sha256_update(&ctx, file_hex, 64);
    }
    for (int i = 0; i < n; i++)
        free(list[i]);
    free(list);
    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_final(&ctx, digest);
    sha256_hex(hex, digest);
    return st;
}

/* Imports the model at path and fills architecture, parameter count and sha256. */
static top_status inspect_model(const char *path, char arch[64], int64_t *params,
                                char hex[SHA256_HEX_BYTES], top_error *err)
{
    graph *g = NULL;
    top_status st = model_load(&g, path, err);
    if (st != TOP_OK)
        return st;
    graph_stats gs;
    graph_get_stats(g, &gs);
    snprintf(arch, 64, "%s", g->architecture);
    *params = (int64_t)gs.params;
    graph_free(g);
    struct stat sb;
    if (stat(path, &sb) == 0 && S_ISDIR(sb.st_mode))
        return sha256_folder(hex, path, err);
    return sha256_file(hex, path, err);
}

static struct MHD_Response *register_model(api *a, http_request *req, api_call *call,
                                           const char *uri, const char *path,
                                           const char *stored_path)
{
    top_error err;
    top_error_clear(&err);
    char arch[64], hex[SHA256_HEX_BYTES];
    int64_t params = 0;
    if (inspect_model(path, arch, &params, hex, &err) != TOP_OK) {
        log_warn("api", req->id, "model rejected", "uri=%s error=%s", uri, err.message);
        return api_problem_field(req, 422, stored_path ? "content" : "uri", json_string(uri),
                                 err.message,
                                 "pass a TF.js layers model or a torchvision/timm safetensors "
                                 "checkpoint");
    }
    store_model m = {.uri = uri,
                     .sha256 = hex,
                     .architecture = arch,
                     .parameter_count = params,
                     .path = stored_path};
    char id[STORE_ID_MAX];
    json_t *model = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_model_insert(db, &m, id, &err) != TOP_OK ||
        store_model_get(db, id, &model, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    log_info("api", id, "model registered", "architecture=%s parameters=%lld request_id=%s",
             arch, (long long)params, req->id);
    json_object_del(model, "path");
    return created(req, "models", id, model);
}

struct MHD_Response *api_post_model(api *a, http_request *req, api_call *call)
{
    static const char *const members[] = {"uri", NULL};
    api_invalid bad = {0};
    json_t *body = api_parse_body(a, req, &bad);
    if (!body || api_check_members(body, "", members, &bad)) {
        json_decref(body);
        return api_problem_invalid(req, &bad);
    }
    const json_t *uri = json_object_get(body, "uri");
    char path[4096];
    int rc = 0;
    if (!json_is_string(uri) || strncmp(json_string_value(uri), "file://", 7) != 0)
        rc = api_invalid_set(&bad, 422, "uri", uri,
                             "pass file:///path/to/model under a configured file root",
                             "uri must be a file:// URI");
    else
        rc = api_resolve_path(a, json_string_value(uri), path, sizeof path, &bad, "uri");
    struct MHD_Response *resp =
        rc ? api_problem_invalid(req, &bad)
           : register_model(a, req, call, json_string_value(uri), path, NULL);
    json_decref(body);
    return resp;
}

struct MHD_Response *api_list_models(api *a, http_request *req, api_call *call)
{
    struct MHD_Response *resp = list_page(a, req, call, store_model_list);
    return resp;
}

struct MHD_Response *api_get_model(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    json_t *model = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_model_get(db, call->params[0], &model, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    json_object_del(model, "path");
    return api_json(req, 200, model);
}

/* ---- uploads ------------------------------------------------------------- */

struct upload_state {
    int fd;
    char tmp[4096 + 32];
    char dir[4096];
    uint64_t size, cap;
    int over_cap;
    int io_errno;
    sha256_ctx sha;
};

static int upload_sink(void *user, const char *data, size_t size)
{
    upload_state *u = user;
    if (size > u->cap - u->size) {
        u->over_cap = 1;
        return -1;
    }
    sha256_update(&u->sha, data, size);
    for (size_t done = 0; done < size;) {
        ssize_t n = write(u->fd, data + done, size - done);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            u->io_errno = errno;
            return -1;
        }
        done += (size_t)n;
    }
    u->size += size;
    return 0;
}

void api_upload_begin(api *a, http_request *req, api_call *call)
{
    upload_state *u = calloc(1, sizeof *u);
    if (!u)
        return;
    u->fd = -1;
    u->cap = a->cfg->max_upload_bytes;
    sha256_init(&u->sha);
    snprintf(u->dir, sizeof u->dir, "%s/models", a->cfg->artifact_dir);
    if (mkdir(u->dir, 0750) != 0 && errno != EEXIST) {
        u->io_errno = errno;
    } else {
        snprintf(u->tmp, sizeof u->tmp, "%s/.upload-XXXXXX", u->dir);
        u->fd = mkstemp(u->tmp);
        if (u->fd < 0)
            u->io_errno = errno;
    }
    call->upload = u;
    if (u->fd >= 0) {
        req->sink = upload_sink;
        req->sink_user = u;
    }
}

void api_upload_free(upload_state *u)
{
    if (!u)
        return;
    if (u->fd >= 0) {
        close(u->fd);
        unlink(u->tmp);
    }
    free(u);
}

static int valid_name(const char *s)
{
    size_t n = strlen(s);
    if (n < 1 || n > 31)
        return 0;
    for (size_t i = 0; i < n; i++)
        if (!strchr("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.-", s[i]))
            return 0;
    return 1;
}

/* fsync the file, rename it to DIR/SHA.safetensors and fsync the folder. */
static int upload_commit(upload_state *u, char *final, size_t cap, char hex[SHA256_HEX_BYTES])
{
    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_final(&u->sha, digest);
    sha256_hex(hex, digest);
    snprintf(final, cap, "%s/%s.safetensors", u->dir, hex);
    if (fsync(u->fd) != 0 || close(u->fd) != 0) {
        u->io_errno = errno;
        u->fd = -1;
        unlink(u->tmp);
        return -1;
    }
    u->fd = -1;
    if (rename(u->tmp, final) != 0) {
        u->io_errno = errno;
        unlink(u->tmp);
        return -1;
    }
    int dfd = open(u->dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (dfd >= 0) {
        fsync(dfd);
        close(dfd);
    }
    return 0;
}

struct MHD_Response *api_put_model_content(api *a, http_request *req, api_call *call)
{
    upload_state *u = call->upload;
    if (!valid_name(call->params[0]))
        return api_problem_field(req, 422, "name", json_string(call->params[0]),
                                 "invalid upload name",
                                 "use 1 to 31 characters from A-Z a-z 0-9 _ . -");
    if (!u || u->io_errno || u->fd < 0) {
        int e = u ? u->io_errno : ENOMEM;
        unsigned code = e == ENOSPC ? 507 : 503;
        char detail[160];
        snprintf(detail, sizeof detail, "cannot store the upload: %s", strerror(e));
        return api_problem(req, code, code == 507 ? "insufficient-storage" : "unavailable",
                           code == 507 ? "Insufficient storage" : "Service unavailable", detail,
                           NULL);
    }
    if (u->over_cap) {
        char detail[128];
        snprintf(detail, sizeof detail,
                 "the upload exceeds %llu bytes; raise max_upload_bytes "
                 "or upload a smaller model",
                 (unsigned long long)u->cap);
        return api_problem(req, 413, "too-large", "Request too large", detail,
                           json_pack("{s:I}", "max_bytes", (json_int_t)u->cap));
    }
    if (u->size == 0)
        return api_problem_field(req, 422, "content", NULL, "the upload is empty",
                                 "send the safetensors file as the request body");
    char final[4096 + 128], hex[SHA256_HEX_BYTES], uri[64];
    if (upload_commit(u, final, sizeof final, hex) != 0) {
        top_error err;
        top_error_clear(&err);
        top_error_set(&err, TOP_ERR_IO, "cannot store the upload: %s", strerror(u->io_errno));
        return api_problem_from_error(req, &err);
    }
    snprintf(uri, sizeof uri, "upload:%s", call->params[0]);
    struct MHD_Response *resp = register_model(a, req, call, uri, final, final);
    if (req->status != 201)
        unlink(final);
    return resp;
}

/* ---- tasks --------------------------------------------------------------- */

static int parse_split(const json_t *split, api_invalid *bad)
{
    static const char *const members[] = {"calibration_images", "head_fit_images",
                                          "eval_images", NULL};
    if (!json_is_object(split))
        return api_invalid_set(bad, 422, "split", split, "pass an object of image counts",
                               "split must be an object");
    if (api_check_members(split, "split.", members, bad))
        return -1;
    for (const char *const *k = members; *k; k++) {
        const json_t *v = json_object_get(split, *k);
        json_int_t lo = strcmp(*k, "eval_images") ? 2 : 1;
        char field[64];
        snprintf(field, sizeof field, "split.%s", *k);
        if (v && (!json_is_integer(v) || json_integer_value(v) < lo ||
                  json_integer_value(v) > 100000))
            return api_invalid_set(bad, 422, field, v, "pass an integer from 2 to 100000",
                                   "%s out of range", field);
    }
    return 0;
}

/* Opens the data set to check it; adds classes and images to spec. */
static int probe_dataset(const char *uri, json_t *spec, api_invalid *bad)
{
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    if (dataset_open(&ds, uri, NULL, &err) != TOP_OK) {
        json_t *v = json_string(uri);
        api_invalid_set(bad, 422, "uri", v, "check the data set files on the server", "%s",
                        err.message);
        json_decref(v);
        return -1;
    }
    json_object_set_new(spec, "classes", json_integer(dataset_class_count(ds)));
    json_object_set_new(spec, "images", json_integer((json_int_t)dataset_count(ds)));
    dataset_close(ds);
    return 0;
}

struct MHD_Response *api_post_task(api *a, http_request *req, api_call *call)
{
    static const char *const members[] = {"id", "uri", "split", NULL};
    api_invalid bad = {0};
    json_t *body = api_parse_body(a, req, &bad);
    if (!body || api_check_members(body, "", members, &bad)) {
        json_decref(body);
        return api_problem_invalid(req, &bad);
    }
    const json_t *id = json_object_get(body, "id");
    const json_t *uri = json_object_get(body, "uri");
    const json_t *split = json_object_get(body, "split");
    char resolved[8192];
    int rc = 0;
    if (id && (!json_is_string(id) || !valid_name(json_string_value(id))))
        rc =
            api_invalid_set(&bad, 422, "id", id,
                            "use 1 to 31 characters from A-Z a-z 0-9 _ . -", "invalid task id");
    else if (!json_is_string(uri))
        rc = api_invalid_set(
            &bad, 422, "uri", uri,
            "pass idx:IMAGES,LABELS, folder:DIR, bundle:FILE or digits-grid:FILE",
            "uri is missing or not a string");
    else if (split && parse_split(split, &bad))
        rc = -1;
    else
        rc = api_resolve_dataset_uri(a, json_string_value(uri), resolved, sizeof resolved, &bad,
                                     "uri");
    json_t *spec =
        rc ? NULL : json_pack("{s:O, s:O}", "uri", uri, "split", split ? split : json_object());
    if (spec && probe_dataset(resolved, spec, &bad))
        rc = -1;
    if (rc) {
        json_decref(spec);
        json_decref(body);
        return api_problem_invalid(req, &bad);
    }

    top_error err;
    top_error_clear(&err);
    char id_out[STORE_ID_MAX];
    json_t *row = NULL;
    store *db = api_store(a, call, &err);
    top_status st =
        db ? store_task_insert(db, json_string_value(id), spec, id_out, &err) : err.status;
    json_decref(spec);
    json_decref(body);
    if (st == TOP_OK)
        st = store_task_get(db, id_out, &row, &err);
    if (st != TOP_OK)
        return api_problem_from_error(req, &err);
    return created(req, "tasks", id_out, row);
}

struct MHD_Response *api_list_tasks(api *a, http_request *req, api_call *call)
{
    return list_page(a, req, call, store_task_list);
}

struct MHD_Response *api_get_task(api *a, http_request *req, api_call *call)
{
    top_error err;
    top_error_clear(&err);
    json_t *row = NULL;
    store *db = api_store(a, call, &err);
    if (!db || store_task_get(db, call->params[0], &row, &err) != TOP_OK)
        return api_problem_from_error(req, &err);
    return api_json(req, 200, row);
}

/* ---- methods ------------------------------------------------------------- */

struct MHD_Response *api_get_methods(api *a, http_request *req, api_call *call)
{
    (void)a, (void)call;
    json_t *damping = json_pack(
        "[{s:s, s:s, s:f, s:f, s:s}, {s:s, s:s, s:s, s:[s,s], s:s}]", "name", "damping", "type",
        "number", "default", 1e-3, "minimum", 0.0, "description",
        "lambda added to the Fisher diagonal: damping * mean(F) (relative) or damping", "name",
        "damping_mode", "type", "string", "default", "relative", "enum", "relative", "absolute",
        "description", "how damping is applied");
    json_t *obs_params = json_pack(
        "[{s:s, s:s, s:i, s:i, s:i, s:s}, {s:s, s:s, s:b, s:s}]", "name", "block_size", "type",
        "integer", "default", 64, "minimum", 1, "maximum", 1024, "description",
        "consecutive weights per Fisher block", "name", "obs_update", "type", "boolean",
        "default", 1, "description", "apply the OBS update to the kept weights of each block");
    json_array_extend(obs_params, damping);
    json_t *layer_params =
        json_pack("[{s:s, s:s, s:s, s:[s,s,s], s:s}]", "name", "allocation", "type", "string",
                  "default", "magnitude", "enum", "magnitude", "obd", "uniform", "description",
                  "per-layer densities: those of a global magnitude or obd mask, or uniform");
    json_t *methods = json_pack(
        "{s:[{s:s, s:s, s:b, s:[]}, {s:s, s:s, s:b, s:o}, {s:s, s:s, s:b, s:o}, "
        "{s:s, s:s, s:b, s:o}, {s:s, s:s, s:b, s:[]}]}",
        "methods", "name", "magnitude", "saliency", "|w|", "needs_calibration", 0, "parameters",
        "name", "obd", "saliency",
        "0.5 * w^2 * (F_ii + lambda), F_ii the empirical Fisher diagonal", "needs_calibration",
        1, "parameters", damping, "name", "obs", "saliency",
        "w^2 / (2 [(F_B + lambda I)^-1]_ii) over blocks of B weights, then the OBS update",
        "needs_calibration", 1, "parameters", obs_params, "name", "layer_obs", "saliency",
        "layer-wise OBS (SparseGPT): H = 2 X^T X / n per layer, to the allocation's density",
        "needs_calibration", 1, "parameters", layer_params, "name", "data_free", "saliency",
        "0.5 * w^2 * E[x_j^2], E[x_j^2] of the input feature predicted from the preceding "
        "batch norms",
        "needs_calibration", 0, "parameters");
    return api_json(req, 200, methods);
}
