/*
 * The ridge head cache (see head_cache.h for the key, the file layout and the
 * failure policy).
 *
 * Shapes: C classes, D features.  coef: (C, D) row-major, intercept: (C),
 * dense_accuracy: (1), all float64 stored little-endian whatever the host.
 *
 * Loading reads the whole file into memory (bounded by the size the expected
 * shapes allow) and validates it with st_open_memory, so a file truncated or
 * replaced while it is read gives a miss and never a SIGBUS. Storing writes
 * through st_writer_write under a unique hidden name, then renames.
 *
 * Thread-safety: reentrant; the only shared state is an atomic counter that
 * keeps temporary names of one process apart.
 */
#include "head_cache.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/random.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "fileio.h"
#include "model.h"
#include "safetensors.h"

#define HC_MAGIC "topiary-head-cache"
#define HC_SUFFIX ".safetensors"
#define HC_KEY_LEN 64
#define HC_MAX_HEADER_BYTES ((size_t)65536) /* a real entry's header is < 1 KiB */
#define HC_MAX_ENTRIES ((size_t)10000000)
#define HC_STALE_TEMP_SECONDS 3600
#define HC_MAX_JSON_BYTES ((size_t)64 << 20) /* the TF.js importer's model.json cap */

static atomic_ulong temp_counter;

/* ---- small helpers ------------------------------------------------------- */

static void put_u64le(uint8_t out[8], uint64_t v)
{
    for (int i = 0; i < 8; i++)
        out[i] = (uint8_t)(v >> (8 * i));
}

static uint64_t get_u64le(const uint8_t in[8])
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = (v << 8) | in[i];
    return v;
}

/* 1 if s is exactly 64 lower-case hex digits. */
static int is_hex_digest(const char *s)
{
    if (!s)
        return 0;
    for (size_t i = 0; i < HC_KEY_LEN; i++)
        if (!((s[i] >= '0' && s[i] <= '9') || (s[i] >= 'a' && s[i] <= 'f')))
            return 0;
    return s[HC_KEY_LEN] == '\0';
}

/* Returns "a/b" in a new string, or NULL when out of memory. */
static char *path_join(const char *a, const char *b)
{
    size_t la = strlen(a), lb = strlen(b);
    char *p = malloc(la + lb + 2);
    if (!p)
        return NULL;
    memcpy(p, a, la);
    p[la] = '/';
    memcpy(p + la + 1, b, lb + 1);
    return p;
}

static top_status entry_path(char **out, const char *dir, const char *key, top_error *err)
{
    char name[HC_KEY_LEN + sizeof HC_SUFFIX];
    snprintf(name, sizeof name, "%s%s", key, HC_SUFFIX);
    *out = path_join(dir, name);
    if (!*out)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a cache path in '%s'", dir);
    return TOP_OK;
}

/* Parses a decimal size written by this module: digits only, no sign. */
static int parse_size(const char *s, size_t *out)
{
    if (!s || !s[0] || strlen(s) > 20)
        return 0;
    for (const char *p = s; *p; p++)
        if (*p < '0' || *p > '9')
            return 0;
    errno = 0;
    unsigned long long v = strtoull(s, NULL, 10);
    if (errno != 0 || v > SIZE_MAX)
        return 0;
    *out = (size_t)v;
    return 1;
}

static int cmp_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

static void free_names(char **names, size_t n)
{
    for (size_t i = 0; names && i < n; i++)
        free(names[i]);
    free(names);
}

/* Lists the names in dir in byte order, without "." and "..", and without
 * every name that starts with '.' when skip_hidden is set. */
static top_status list_names(char ***out, size_t *count, const char *dir, int skip_hidden,
                             top_error *err)
{
    *out = NULL;
    *count = 0;
    DIR *d = opendir(dir);
    if (!d)
        return top_error_set(err, TOP_ERR_IO, "cannot list '%s': %s", dir, strerror(errno));
    char **names = NULL;
    size_t n = 0, cap = 0;
    top_status st = TOP_OK;
    for (;;) {
        errno = 0;
        const struct dirent *e = readdir(d);
        if (!e) {
            if (errno != 0)
                st = top_error_set(err, TOP_ERR_IO, "cannot list '%s': %s", dir,
                                   strerror(errno));
            break;
        }
        const char *name = e->d_name;
        if (!strcmp(name, ".") || !strcmp(name, "..") || (skip_hidden && name[0] == '.'))
            continue;
        if (n == HC_MAX_ENTRIES) {
            st = top_error_set(err, TOP_ERR_LIMIT, "'%s' has more than %zu entries", dir,
                               HC_MAX_ENTRIES);
            break;
        }
        if (n == cap) {
            size_t grown_cap = cap ? 2 * cap : 64;
            char **grown = realloc(names, grown_cap * sizeof *names);
            if (!grown) {
                st = top_error_set(err, TOP_ERR_NOMEM, "out of memory listing '%s'", dir);
                break;
            }
            names = grown;
            cap = grown_cap;
        }
        if (!(names[n] = strdup(name))) {
            st = top_error_set(err, TOP_ERR_NOMEM, "out of memory listing '%s'", dir);
            break;
        }
        n++;
    }
    closedir(d);
    if (st != TOP_OK) {
        free_names(names, n);
        return st;
    }
    if (n > 1)
        qsort(names, n, sizeof *names, cmp_names);
    *out = names;
    *count = n;
    return TOP_OK;
}

/* Fsyncs a directory, so a rename in it is durable. */
static top_status sync_dir(const char *dir, top_error *err)
{
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0) {
        int saved = errno;
        if (fd >= 0)
            close(fd);
        return top_error_set(err, TOP_ERR_IO, "cannot fsync the cache directory '%s': %s", dir,
                             strerror(saved));
    }
    close(fd);
    return TOP_OK;
}

/* ---- key ------------------------------------------------------------------ */

/* Hashes one field: its name and a NUL, the 8-byte little-endian length of
 * the value, then the value's bytes. */
static void key_field(sha256_ctx *ctx, const char *name, const void *bytes, size_t len)
{
    uint8_t n[8];
    sha256_update(ctx, name, strlen(name) + 1);
    put_u64le(n, (uint64_t)len);
    sha256_update(ctx, n, sizeof n);
    sha256_update(ctx, bytes, len);
}

static void key_u64(sha256_ctx *ctx, const char *name, uint64_t v)
{
    uint8_t b[8];
    put_u64le(b, v);
    key_field(ctx, name, b, sizeof b);
}

static void key_string(sha256_ctx *ctx, const char *name, const char *s)
{
    key_field(ctx, name, s, strlen(s));
}

static top_status check_string(const char *s, const char *what, int allow_empty, top_error *err)
{
    if (!s)
        return top_error_set(err, TOP_ERR_INVALID, "the cache key's %s is NULL; pass a string",
                             what);
    if (!allow_empty && !s[0])
        return top_error_set(err, TOP_ERR_INVALID, "the cache key's %s is empty; pass a value",
                             what);
    if (strnlen(s, HEAD_CACHE_MAX_STRING + 1) > HEAD_CACHE_MAX_STRING)
        return top_error_set(err, TOP_ERR_INVALID,
                             "the cache key's %s is longer than %d bytes; shorten it", what,
                             HEAD_CACHE_MAX_STRING);
    return TOP_OK;
}

static top_status check_inputs(const head_cache_inputs *in, const char *code, top_error *err)
{
    top_status st = check_string(code, "code version", 1, err);
    if (st == TOP_OK)
        st = check_string(in->feature_node, "feature node", 0, err);
    if (st == TOP_OK)
        st = check_string(in->dataset_uri, "data set uri", 0, err);
    if (st == TOP_OK)
        st = check_string(in->dataset_fingerprint, "data set fingerprint", 1, err);
    if (st != TOP_OK)
        return st;
    if (!is_hex_digest(in->model_sha256))
        return top_error_set(err, TOP_ERR_INVALID,
                             "model digest '%.80s' is not 64 lower-case hex digits; compute "
                             "it with head_cache_model_sha256",
                             in->model_sha256 ? in->model_sha256 : "(null)");
    if (in->input_height == 0 || in->input_width == 0 || in->fit_count == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "input size %zux%zu or fit count %zu is zero; pass the model's "
                             "input size and the head-fit split size",
                             in->input_height, in->input_width, in->fit_count);
    if (!(isfinite(in->alpha) && in->alpha > 0.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "ridge alpha %g is not finite and positive; pass the alpha the "
                             "head is fitted with",
                             in->alpha);
    return TOP_OK;
}

top_status head_cache_key(char key[SHA256_HEX_BYTES], const head_cache_inputs *in,
                          top_error *err)
{
    if (!key || !in)
        return top_error_set(err, TOP_ERR_INVALID, "head_cache_key: key or inputs is NULL");
    key[0] = '\0';
    const char *code = in->code_version ? in->code_version : "";
    top_status st = check_inputs(in, code, err);
    if (st != TOP_OK)
        return st;

    sha256_ctx ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, HC_MAGIC, sizeof HC_MAGIC); /* with its NUL */
    key_u64(&ctx, "format_version", HEAD_CACHE_FORMAT_VERSION);
    key_string(&ctx, "code_version", code);
    key_string(&ctx, "model_sha256", in->model_sha256);
    key_string(&ctx, "feature_node", in->feature_node);
    key_u64(&ctx, "input_height", in->input_height);
    key_u64(&ctx, "input_width", in->input_width);
    key_string(&ctx, "dataset_uri", in->dataset_uri);
    key_string(&ctx, "dataset_fingerprint", in->dataset_fingerprint);
    key_u64(&ctx, "calib_count", in->calib_count);
    key_u64(&ctx, "fit_count", in->fit_count);
    key_u64(&ctx, "eval_count", in->eval_count);
    key_u64(&ctx, "seed", in->seed);
    uint64_t alpha_bits;
    memcpy(&alpha_bits, &in->alpha, sizeof alpha_bits);
    key_u64(&ctx, "alpha", alpha_bits);
    key_u64(&ctx, "balanced", in->balanced != 0);

    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_final(&ctx, digest);
    sha256_hex(key, digest);
    return TOP_OK;
}

/* ---- fingerprints --------------------------------------------------------- */

typedef struct fp_walk {
    sha256_ctx ctx;
    size_t entries;
    top_error *err;
} fp_walk;

/* Hashes a relative name and its identity: type, size, mtime, inode. */
static void fp_add_stat(sha256_ctx *ctx, const char *rel, const struct stat *sb)
{
    uint8_t b[8];
    char type = S_ISDIR(sb->st_mode) ? 'd' : S_ISREG(sb->st_mode) ? 'f' : 'o';
    sha256_update(ctx, rel, strlen(rel) + 1);
    sha256_update(ctx, &type, 1);
    put_u64le(b, (uint64_t)sb->st_size);
    sha256_update(ctx, b, sizeof b);
    put_u64le(b, (uint64_t)sb->st_mtim.tv_sec);
    sha256_update(ctx, b, sizeof b);
    put_u64le(b, (uint64_t)sb->st_mtim.tv_nsec);
    sha256_update(ctx, b, sizeof b);
    put_u64le(b, (uint64_t)sb->st_ino);
    sha256_update(ctx, b, sizeof b);
}

/* Hashes the entries of dir (rel is its name relative to the root), and
 * those of its subdirectories while depth > 1. */
static top_status fp_hash_dir(fp_walk *w, const char *dir, const char *rel, int depth)
{
    char **names;
    size_t n;
    top_status st = list_names(&names, &n, dir, 1, w->err);
    for (size_t i = 0; st == TOP_OK && i < n; i++) {
        char *full = path_join(dir, names[i]);
        char *sub = rel[0] ? path_join(rel, names[i]) : strdup(names[i]);
        struct stat sb;
        if (!full || !sub)
            st = top_error_set(w->err, TOP_ERR_NOMEM, "out of memory walking '%s'", dir);
        else if (stat(full, &sb) != 0)
            st = top_error_set(w->err, TOP_ERR_IO, "cannot stat '%s': %s", full,
                               strerror(errno));
        else if (++w->entries > HC_MAX_ENTRIES)
            st = top_error_set(w->err, TOP_ERR_LIMIT,
                               "'%s' holds more than %zu entries; fingerprint a smaller "
                               "folder",
                               dir, HC_MAX_ENTRIES);
        if (st == TOP_OK) {
            fp_add_stat(&w->ctx, sub, &sb);
            if (S_ISDIR(sb.st_mode) && depth > 1)
                st = fp_hash_dir(w, full, sub, depth - 1);
        }
        free(full);
        free(sub);
    }
    free_names(names, n);
    return st;
}

top_status head_cache_file_fingerprint(char *out, size_t cap, const char *path, top_error *err)
{
    if (!out || !path || cap < SHA256_HEX_BYTES)
        return top_error_set(err, TOP_ERR_INVALID,
                             "head_cache_file_fingerprint: out, path or a capacity of at "
                             "least %d bytes is missing",
                             SHA256_HEX_BYTES);
    out[0] = '\0';
    struct stat sb;
    if (stat(path, &sb) != 0)
        return top_error_set(err, TOP_ERR_IO, "cannot stat '%s': %s; check the data set path",
                             path, strerror(errno));

    fp_walk w = {.entries = 0, .err = err};
    sha256_init(&w.ctx);
    sha256_update(&w.ctx, "topiary-fingerprint", sizeof "topiary-fingerprint");
    fp_add_stat(&w.ctx, "", &sb);
    if (S_ISDIR(sb.st_mode)) {
        top_status st = fp_hash_dir(&w, path, "", 2);
        if (st != TOP_OK)
            return st;
    }
    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_final(&w.ctx, digest);
    sha256_hex(out, digest);
    return TOP_OK;
}

/* Adds the fingerprint of path (a copy of len bytes) to ctx. */
static top_status fp_add_path(sha256_ctx *ctx, const char *path, size_t len, top_error *err)
{
    char *copy = strndup(path, len);
    if (!copy)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a data set path");
    char hex[SHA256_HEX_BYTES];
    top_status st = head_cache_file_fingerprint(hex, sizeof hex, copy, err);
    free(copy);
    if (st == TOP_OK)
        sha256_update(ctx, hex, HC_KEY_LEN);
    return st;
}

top_status head_cache_dataset_fingerprint(char out[SHA256_HEX_BYTES], const char *uri,
                                          top_error *err)
{
    static const char *const schemes[] = {"idx:", "folder:", "bundle:", "digits-grid:"};
    if (!out || !uri)
        return top_error_set(err, TOP_ERR_INVALID,
                             "head_cache_dataset_fingerprint: out or uri is NULL");
    out[0] = '\0';
    const char *scheme = NULL;
    for (size_t s = 0; s < sizeof schemes / sizeof schemes[0]; s++)
        if (!strncmp(uri, schemes[s], strlen(schemes[s])))
            scheme = schemes[s];
    const char *rest = scheme ? uri + strlen(scheme) : NULL;
    if (!rest || !rest[0])
        return top_error_set(err, TOP_ERR_INVALID,
                             "data set uri \"%.200s\" is not one of idx:IMAGES,LABELS "
                             "folder:DIR bundle:FILE digits-grid:FILE",
                             uri);

    sha256_ctx ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, scheme, strlen(scheme) + 1);
    top_status st;
    if (!strcmp(scheme, "idx:")) {
        const char *comma = strchr(rest, ',');
        if (!comma || comma == rest || !comma[1] || strchr(comma + 1, ','))
            return top_error_set(err, TOP_ERR_INVALID,
                                 "data set uri \"%.200s\" needs idx:IMAGES,LABELS (two "
                                 "paths, one comma)",
                                 uri);
        st = fp_add_path(&ctx, rest, (size_t)(comma - rest), err);
        if (st == TOP_OK)
            st = fp_add_path(&ctx, comma + 1, strlen(comma + 1), err);
    } else {
        st = fp_add_path(&ctx, rest, strlen(rest), err);
    }
    if (st != TOP_OK)
        return st;
    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_final(&ctx, digest);
    sha256_hex(out, digest);
    return TOP_OK;
}

/* ---- model digest ---------------------------------------------------------- */

/* Parses model.json, bounded by HC_MAX_JSON_BYTES. */
static top_status load_model_json(json_t **root, const char *path, top_error *err)
{
    *root = NULL;
    FILE *f = top_fopen_regular(path, err);
    if (!f)
        return TOP_ERR_IO;
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || (uint64_t)sb.st_size > HC_MAX_JSON_BYTES) {
        fclose(f);
        return top_error_set(err, TOP_ERR_LIMIT,
                             "'%s' cannot be sized or is larger than %zu bytes", path,
                             HC_MAX_JSON_BYTES);
    }
    json_error_t jerr;
    *root = json_loadf(f, 0, &jerr);
    fclose(f);
    if (!*root)
        return top_error_set(err, TOP_ERR_FORMAT, "%s: invalid JSON at line %d: %s", path,
                             jerr.line, jerr.text);
    return TOP_OK;
}

/* Hashes each shard of the manifest: its path, a NUL and its hex digest. */
static top_status hash_shards(sha256_ctx *ctx, json_t *manifest, const char *json_path,
                              top_error *err)
{
    if (!json_is_array(manifest))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: weightsManifest is missing or not an array", json_path);
    const char *slash = strrchr(json_path, '/');
    size_t dir_len = slash ? (size_t)(slash - json_path) : 0;
    char *dir = slash ? strndup(json_path, dir_len ? dir_len : 1) : strdup(".");
    if (!dir)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a model folder");
    top_status st = TOP_OK;
    size_t i, j;
    json_t *group, *path;
    json_array_foreach(manifest, i, group)
    {
        json_t *paths = json_object_get(group, "paths");
        if (!json_is_array(paths) && st == TOP_OK)
            st = top_error_set(err, TOP_ERR_FORMAT,
                               "%s: weightsManifest group %zu has no 'paths' array", json_path,
                               i);
        json_array_foreach(paths, j, path)
        {
            const char *rel = json_string_value(path);
            if (st != TOP_OK)
                break;
            /* The importer's rule: relative paths inside the model folder. */
            if (!rel || !rel[0] || rel[0] == '/' || strstr(rel, "..") || strchr(rel, '\\')) {
                st = top_error_set(err, TOP_ERR_FORMAT,
                                   "%s: shard path '%s' must be a relative path inside the "
                                   "model folder",
                                   json_path, rel ? rel : "");
                break;
            }
            char *full = path_join(dir, rel);
            char hex[SHA256_HEX_BYTES];
            st = full ? sha256_file(hex, full, err)
                      : top_error_set(err, TOP_ERR_NOMEM, "out of memory for a shard path");
            free(full);
            if (st == TOP_OK) {
                sha256_update(ctx, rel, strlen(rel) + 1);
                sha256_update(ctx, hex, HC_KEY_LEN);
            }
        }
    }
    free(dir);
    return st;
}

static top_status tfjs_sha256(char hex[SHA256_HEX_BYTES], const char *json_path, top_error *err)
{
    char json_hex[SHA256_HEX_BYTES];
    top_status st = sha256_file(json_hex, json_path, err);
    if (st != TOP_OK)
        return st;
    json_t *root;
    st = load_model_json(&root, json_path, err);
    if (st != TOP_OK)
        return st;
    sha256_ctx ctx;
    sha256_init(&ctx);
    sha256_update(&ctx, "tfjs", sizeof "tfjs");
    sha256_update(&ctx, json_hex, HC_KEY_LEN);
    st = hash_shards(&ctx, json_object_get(root, "weightsManifest"), json_path, err);
    json_decref(root);
    if (st != TOP_OK)
        return st;
    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_final(&ctx, digest);
    sha256_hex(hex, digest);
    return TOP_OK;
}

top_status head_cache_model_sha256(char hex[SHA256_HEX_BYTES], const char *model_path,
                                   top_error *err)
{
    if (!hex || !model_path)
        return top_error_set(err, TOP_ERR_INVALID,
                             "head_cache_model_sha256: hex or the model path is NULL");
    hex[0] = '\0';
    struct stat sb;
    switch (model_detect_format(model_path)) {
    case MODEL_FORMAT_SAFETENSORS: return sha256_file(hex, model_path, err);
    case MODEL_FORMAT_TFJS_LAYERS:
        if (stat(model_path, &sb) == 0 && S_ISDIR(sb.st_mode)) {
            char *json_path = path_join(model_path, "model.json");
            if (!json_path)
                return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a model path");
            top_status st = tfjs_sha256(hex, json_path, err);
            free(json_path);
            return st;
        }
        return tfjs_sha256(hex, model_path, err);
    case MODEL_FORMAT_UNKNOWN: break;
    }
    return top_error_set(err, TOP_ERR_UNSUPPORTED,
                         "model '%s' is neither a TF.js layers model nor a .safetensors "
                         "checkpoint; check the path",
                         model_path);
}

/* ---- load ---------------------------------------------------------------- */

/* The entry's content digest: the tensor bytes (coef, intercept, accuracy),
 * then the fit and evaluation counts as text, each with its NUL. It catches
 * a flipped byte that would still parse. */
static void content_sha256(char hex[SHA256_HEX_BYTES], const void *values, size_t bytes,
                           const char *fit_text, const char *eval_text)
{
    sha256_ctx ctx;
    uint8_t digest[SHA256_DIGEST_BYTES];
    sha256_init(&ctx);
    sha256_update(&ctx, values, bytes);
    sha256_update(&ctx, fit_text, strlen(fit_text) + 1);
    sha256_update(&ctx, eval_text, strlen(eval_text) + 1);
    sha256_final(&ctx, digest);
    sha256_hex(hex, digest);
}

/*
 * Reads the whole file at path when it is a regular file of at most max
 * bytes. A missing file, anything but a regular file, a larger file or one
 * that shrinks while it is read leaves *data NULL without an error.
 */
static top_status read_entry(uint8_t **data, size_t *size, const char *path, size_t max,
                             top_error *err)
{
    *data = NULL;
    *size = 0;
    int fd = open(path, O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0) {
        if (errno == ENOENT)
            return TOP_OK;
        return top_error_set(err, TOP_ERR_IO,
                             "cannot open cache entry '%s': %s; check the cache directory",
                             path, strerror(errno));
    }
    struct stat sb;
    if (fstat(fd, &sb) != 0) {
        int saved = errno;
        close(fd);
        return top_error_set(err, TOP_ERR_IO, "cannot stat cache entry '%s': %s", path,
                             strerror(saved));
    }
    if (!S_ISREG(sb.st_mode) || sb.st_size < 0 || (uint64_t)sb.st_size > max) {
        close(fd);
        return TOP_OK;
    }

    size_t n = (size_t)sb.st_size, done = 0;
    uint8_t *buf = malloc(n ? n : 1);
    if (!buf) {
        close(fd);
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory reading '%s'", path);
    }
    while (done < n) {
        ssize_t k = pread(fd, buf + done, n - done, (off_t)done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0) {
            int saved = errno;
            close(fd);
            free(buf);
            return top_error_set(err, TOP_ERR_IO, "cannot read cache entry '%s': %s", path,
                                 strerror(saved));
        }
        if (k == 0)
            break;
        done += (size_t)k;
    }
    close(fd);
    if (done < n) {
        free(buf);
        return TOP_OK;
    }
    *data = buf;
    *size = n;
    return TOP_OK;
}

static int tensor_matches(const st_tensor_info *t, int ndim, const int64_t *shape)
{
    if (!t || t->dtype != ST_DTYPE_F64 || t->ndim != ndim)
        return 0;
    size_t numel = 1;
    for (int i = 0; i < ndim; i++) {
        if (t->shape[i] != shape[i])
            return 0;
        numel *= (size_t)shape[i]; /* the caller checked the product */
    }
    return t->numel == numel && t->end - t->begin == numel * sizeof(double);
}

/* 1 if f is an entry for key with the expected shapes; reads the counts. */
static int entry_matches(const st_file *f, const char *key, size_t d, size_t c, size_t *fit_n,
                         size_t *eval_n)
{
    const char *format = st_metadata_get(f, "format");
    const char *stored_key = st_metadata_get(f, "key");
    size_t version;
    if (!format || strcmp(format, HC_MAGIC) != 0 || !stored_key || strcmp(stored_key, key) != 0)
        return 0;
    if (!parse_size(st_metadata_get(f, "format_version"), &version) ||
        version != HEAD_CACHE_FORMAT_VERSION)
        return 0;
    if (!parse_size(st_metadata_get(f, "fit_images"), fit_n) ||
        !parse_size(st_metadata_get(f, "eval_images"), eval_n))
        return 0;

    const int64_t coef_shape[2] = {(int64_t)c, (int64_t)d};
    const int64_t intercept_shape[1] = {(int64_t)c};
    const int64_t accuracy_shape[1] = {1};
    const st_tensor_info *tc = st_find(f, "coef"), *ti = st_find(f, "intercept");
    const st_tensor_info *ta = st_find(f, "dense_accuracy");
    if (st_tensor_count(f) != 3 || !tensor_matches(tc, 2, coef_shape) ||
        !tensor_matches(ti, 1, intercept_shape) || !tensor_matches(ta, 1, accuracy_shape))
        return 0;

    /* The writer lays the three tensors out back to back, in this order. */
    const char *stored_hex = st_metadata_get(f, "content_sha256");
    char hex[SHA256_HEX_BYTES];
    if (tc->begin != 0 || ti->begin != tc->end || ta->begin != ti->end)
        return 0;
    content_sha256(hex, st_tensor_data(f, tc), ta->end, st_metadata_get(f, "fit_images"),
                   st_metadata_get(f, "eval_images"));
    return stored_hex && strcmp(stored_hex, hex) == 0;
}

/* Decodes n little-endian float64 values; 0 if any is not finite. */
static int decode_finite(double *out, const void *src, size_t n)
{
    const uint8_t *p = src;
    for (size_t i = 0; i < n; i++) {
        uint64_t bits = get_u64le(p + 8 * i);
        memcpy(&out[i], &bits, sizeof bits);
        if (!isfinite(out[i]))
            return 0;
    }
    return 1;
}

/* Copies the tensors of a matching entry into head; *hit = 0 for a
 * non-finite value or an accuracy outside [0, 1]. */
static top_status decode_entry(int *hit, ridge_model *head, double *accuracy, const st_file *f,
                               size_t d, size_t c, top_error *err)
{
    ridge_model m = {.n_features = d, .n_classes = c};
    m.coef = malloc(c * d * sizeof *m.coef);
    m.intercept = malloc(c * sizeof *m.intercept);
    if (!m.coef || !m.intercept) {
        ridge_model_free(&m);
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a cached %zu x %zu head", c,
                             d);
    }
    double acc = NAN;
    const st_tensor_info *tc = st_find(f, "coef"), *ti = st_find(f, "intercept");
    const st_tensor_info *ta = st_find(f, "dense_accuracy");
    if (decode_finite(m.coef, st_tensor_data(f, tc), c * d) &&
        decode_finite(m.intercept, st_tensor_data(f, ti), c) &&
        decode_finite(&acc, st_tensor_data(f, ta), 1) && acc >= 0.0 && acc <= 1.0) {
        *head = m;
        *accuracy = acc;
        *hit = 1;
        return TOP_OK;
    }
    ridge_model_free(&m);
    return TOP_OK;
}

/* Bytes of the largest valid entry: 8 + header + (C D + C + 1) doubles. */
static int max_entry_bytes(size_t *out, size_t d, size_t c)
{
    size_t values;
    return top_size_mul(&values, c, d) || top_size_add(&values, values, c) ||
           top_size_add(&values, values, 1) || top_size_mul(&values, values, sizeof(double)) ||
           top_size_add(out, values, 8 + HC_MAX_HEADER_BYTES) || values > (size_t)INT64_MAX;
}

top_status head_cache_load(int *hit, ridge_model *head, double *dense_accuracy, size_t *fit_n,
                           size_t *eval_n, const char *dir, const char *key,
                           size_t expect_features, size_t expect_classes, top_error *err)
{
    if (!hit || !head || !dense_accuracy || !fit_n || !eval_n || !dir || !key)
        return top_error_set(err, TOP_ERR_INVALID, "head_cache_load: an argument is NULL");
    *hit = 0;
    memset(head, 0, sizeof *head);
    *dense_accuracy = 0.0;
    *fit_n = *eval_n = 0;
    if (!dir[0] || !is_hex_digest(key))
        return top_error_set(err, TOP_ERR_INVALID,
                             "cache directory '%s' is empty or key '%.80s' is not 64 "
                             "lower-case hex digits; compute it with head_cache_key",
                             dir, key);
    size_t max_bytes;
    if (expect_features == 0 || expect_classes == 0 ||
        max_entry_bytes(&max_bytes, expect_features, expect_classes))
        return top_error_set(err, TOP_ERR_INVALID,
                             "a cached head of %zu classes x %zu features is empty or too "
                             "large; pass the task's shape",
                             expect_classes, expect_features);

    char *path;
    top_status st = entry_path(&path, dir, key, err);
    if (st != TOP_OK)
        return st;
    uint8_t *data;
    size_t size;
    st = read_entry(&data, &size, path, max_bytes, err);
    st_file *f = NULL;
    if (st == TOP_OK && data && st_open_memory(&f, data, size, NULL) == TOP_OK) {
        size_t fit, eval;
        if (entry_matches(f, key, expect_features, expect_classes, &fit, &eval))
            st = decode_entry(hit, head, dense_accuracy, f, expect_features, expect_classes,
                              err);
        if (*hit) {
            *fit_n = fit;
            *eval_n = eval;
        }
        st_close(f);
    }
    /* A hit marks the entry as used for head_cache_prune; failing to is harmless. */
    if (*hit)
        (void)utimensat(AT_FDCWD, path, NULL, 0);
    free(data);
    free(path);
    return st;
}

/* ---- store ----------------------------------------------------------------- */

/* Creates dir and each missing parent with mode 0700. */
static top_status make_dirs(const char *dir, top_error *err)
{
    char *p = strdup(dir);
    if (!p)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a cache path");
    top_status st = TOP_OK;
    for (char *s = p + 1;; s++) {
        if (*s != '/' && *s != '\0')
            continue;
        char saved = *s;
        *s = '\0';
        if (mkdir(p, 0700) != 0 && errno != EEXIST) {
            st = top_error_set(err, TOP_ERR_IO, "cannot create cache directory '%s': %s", p,
                               strerror(errno));
            break;
        }
        *s = saved;
        if (!saved)
            break;
    }
    free(p);
    struct stat sb;
    if (st == TOP_OK && (stat(dir, &sb) != 0 || !S_ISDIR(sb.st_mode)))
        st = top_error_set(err, TOP_ERR_IO,
                           "cache directory '%s' is not a directory; pass another path", dir);
    return st;
}

static top_status check_head(const ridge_model *head, double accuracy, top_error *err)
{
    if (!head || !head->coef || !head->intercept || head->n_features == 0 ||
        head->n_classes == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "the head to cache is empty; pass a fitted ridge model");
    size_t cd;
    if (top_size_mul(&cd, head->n_classes, head->n_features) || cd > SIZE_MAX / 16)
        return top_error_set(err, TOP_ERR_OVERFLOW, "a head of %zu x %zu overflows",
                             head->n_classes, head->n_features);
    for (size_t i = 0; i < cd; i++)
        if (!isfinite(head->coef[i]))
            return top_error_set(err, TOP_ERR_INVALID,
                                 "head coefficient %zu is %g; only finite heads are cached", i,
                                 head->coef[i]);
    for (size_t i = 0; i < head->n_classes; i++)
        if (!isfinite(head->intercept[i]))
            return top_error_set(err, TOP_ERR_INVALID,
                                 "head intercept %zu is %g; only finite heads are cached", i,
                                 head->intercept[i]);
    if (!(accuracy >= 0.0 && accuracy <= 1.0))
        return top_error_set(err, TOP_ERR_INVALID,
                             "dense accuracy %g is outside [0, 1]; pass a fraction", accuracy);
    return TOP_OK;
}

static void encode_f64(uint8_t *dst, const double *src, size_t n)
{
    for (size_t i = 0; i < n; i++) {
        uint64_t bits;
        memcpy(&bits, &src[i], sizeof bits);
        put_u64le(dst + 8 * i, bits);
    }
}

/* Fills a writer with the three tensors and the metadata of an entry. */
static top_status fill_writer(st_writer *w, const char *key, const ridge_model *head,
                              double accuracy, size_t fit_n, size_t eval_n, top_error *err)
{
    size_t c = head->n_classes, d = head->n_features, cd = c * d; /* checked by check_head */
    uint8_t *buf = malloc((cd + c + 1) * sizeof(double));
    if (!buf)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a %zu x %zu head", c, d);
    encode_f64(buf, head->coef, cd);
    encode_f64(buf + 8 * cd, head->intercept, c);
    encode_f64(buf + 8 * (cd + c), &accuracy, 1);
    char fit_text[32], eval_text[32], version[16], content_hex[SHA256_HEX_BYTES];
    snprintf(fit_text, sizeof fit_text, "%zu", fit_n);
    snprintf(eval_text, sizeof eval_text, "%zu", eval_n);
    content_sha256(content_hex, buf, (cd + c + 1) * sizeof(double), fit_text, eval_text);

    const int64_t coef_shape[2] = {(int64_t)c, (int64_t)d}, c_shape[1] = {(int64_t)c};
    const int64_t one[1] = {1};
    snprintf(version, sizeof version, "%d", HEAD_CACHE_FORMAT_VERSION);
    top_status st = st_writer_add(w, "coef", ST_DTYPE_F64, 2, coef_shape, buf, 8 * cd, err);
    if (st == TOP_OK)
        st = st_writer_add(w, "intercept", ST_DTYPE_F64, 1, c_shape, buf + 8 * cd, 8 * c, err);
    if (st == TOP_OK)
        st = st_writer_add(w, "dense_accuracy", ST_DTYPE_F64, 1, one, buf + 8 * (cd + c), 8,
                           err);
    free(buf);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "format", HC_MAGIC, err);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "format_version", version, err);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "key", key, err);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "content_sha256", content_hex, err);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "fit_images", fit_text, err);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "eval_images", eval_text, err);
    return st;
}

/* Creates an empty file under a name no other store uses,
 * DIR/.<key>.<pid>.<counter>.<random>.part, and returns its path. */
static top_status reserve_temp(char **out, const char *dir, const char *key, top_error *err)
{
    *out = NULL;
    for (int attempt = 0; attempt < 16; attempt++) {
        uint64_t r;
        if (getrandom(&r, sizeof r, GRND_NONBLOCK) != (ssize_t)sizeof r) {
            struct timespec ts;
            clock_gettime(CLOCK_REALTIME, &ts);
            r = (uint64_t)ts.tv_nsec * 0x9e3779b97f4a7c15u ^ (uint64_t)ts.tv_sec;
        }
        char name[160];
        snprintf(name, sizeof name, ".%s.%ld.%lu.%016llx.part", key, (long)getpid(),
                 atomic_fetch_add(&temp_counter, 1), (unsigned long long)r);
        char *path = path_join(dir, name);
        if (!path)
            return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a temporary path");
        int fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0600);
        if (fd >= 0) {
            close(fd);
            *out = path;
            return TOP_OK;
        }
        int saved = errno;
        free(path);
        if (saved != EEXIST)
            return top_error_set(err, TOP_ERR_IO, "cannot create a temporary file in '%s': %s",
                                 dir, strerror(saved));
    }
    return top_error_set(err, TOP_ERR_IO, "no free temporary name in '%s' after 16 tries", dir);
}

top_status head_cache_store(const char *dir, const char *key, const ridge_model *head,
                            double dense_accuracy, size_t fit_n, size_t eval_n, top_error *err)
{
    if (!dir || !dir[0] || !is_hex_digest(key))
        return top_error_set(err, TOP_ERR_INVALID,
                             "cache directory '%s' is empty or key '%.80s' is not 64 "
                             "lower-case hex digits; compute it with head_cache_key",
                             dir ? dir : "(null)", key ? key : "(null)");
    top_status st = check_head(head, dense_accuracy, err);
    if (st == TOP_OK)
        st = make_dirs(dir, err);
    if (st != TOP_OK)
        return st;

    st_writer *w = NULL;
    char *final_path = NULL, *temp = NULL;
    st = st_writer_new(&w, err);
    if (st == TOP_OK)
        st = fill_writer(w, key, head, dense_accuracy, fit_n, eval_n, err);
    if (st == TOP_OK)
        st = entry_path(&final_path, dir, key, err);
    if (st == TOP_OK)
        st = reserve_temp(&temp, dir, key, err);
    /* The writer writes temp.tmp, fsyncs it and renames it over temp. */
    if (st == TOP_OK)
        st = st_writer_write(w, temp, err);
    if (st == TOP_OK && rename(temp, final_path) != 0)
        st = top_error_set(err, TOP_ERR_IO, "cannot rename '%s' to '%s': %s", temp, final_path,
                           strerror(errno));
    if (st == TOP_OK)
        st = sync_dir(dir, err);
    else if (temp)
        unlink(temp);
    st_writer_free(w);
    free(final_path);
    free(temp);
    return st;
}

/* ---- prune ----------------------------------------------------------------- */

typedef struct hc_entry {
    char *name;
    size_t bytes;
    struct timespec mtime;
} hc_entry;

static int is_entry_name(const char *name)
{
    return strlen(name) == HC_KEY_LEN + strlen(HC_SUFFIX) &&
           !strcmp(name + HC_KEY_LEN, HC_SUFFIX) &&
           strspn(name, "0123456789abcdef") == HC_KEY_LEN;
}

/* ".<key>." starts every temporary name of a store. */
static int is_temp_name(const char *name)
{
    return name[0] == '.' && strspn(name + 1, "0123456789abcdef") == HC_KEY_LEN &&
           name[1 + HC_KEY_LEN] == '.';
}

static int cmp_entries(const void *a, const void *b)
{
    const hc_entry *x = a, *y = b;
    if (x->mtime.tv_sec != y->mtime.tv_sec)
        return x->mtime.tv_sec < y->mtime.tv_sec ? -1 : 1;
    if (x->mtime.tv_nsec != y->mtime.tv_nsec)
        return x->mtime.tv_nsec < y->mtime.tv_nsec ? -1 : 1;
    return strcmp(x->name, y->name);
}

/* Deletes dir/name; a file that is already gone counts as deleted. */
static top_status remove_file(const char *dir, const char *name, top_error *err)
{
    char *path = path_join(dir, name);
    if (!path)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a cache path");
    top_status st = TOP_OK;
    if (unlink(path) != 0 && errno != ENOENT)
        st = top_error_set(err, TOP_ERR_IO, "cannot delete cache file '%s': %s", path,
                           strerror(errno));
    free(path);
    return st;
}

/* Collects the entries of dir with their sizes, and deletes stale
 * temporary files on the way. */
static top_status collect_entries(hc_entry *entries, size_t *n_entries, size_t *total,
                                  size_t *removed, const char *dir, char **names, size_t n,
                                  top_error *err)
{
    time_t now = time(NULL);
    top_status st = TOP_OK;
    for (size_t i = 0; st == TOP_OK && i < n; i++) {
        int entry = is_entry_name(names[i]), temp = is_temp_name(names[i]);
        if (!entry && !temp)
            continue;
        char *path = path_join(dir, names[i]);
        struct stat sb;
        if (!path)
            return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a cache path");
        int ok = lstat(path, &sb) == 0 && S_ISREG(sb.st_mode);
        free(path);
        if (!ok)
            continue;
        if (temp && now - sb.st_mtim.tv_sec > HC_STALE_TEMP_SECONDS) {
            st = remove_file(dir, names[i], err);
            *removed += st == TOP_OK;
        } else if (entry) {
            hc_entry *e = &entries[(*n_entries)++];
            e->name = names[i];
            e->bytes = (size_t)sb.st_size;
            e->mtime = sb.st_mtim;
            *total = *total > SIZE_MAX - e->bytes ? SIZE_MAX : *total + e->bytes;
        }
    }
    return st;
}

top_status head_cache_prune(const char *dir, size_t max_bytes, size_t *removed, top_error *err)
{
    size_t count = 0;
    if (removed)
        *removed = 0;
    if (!dir || !dir[0])
        return top_error_set(err, TOP_ERR_INVALID, "the cache directory is empty or NULL");
    struct stat sb;
    if (stat(dir, &sb) != 0 && errno == ENOENT)
        return TOP_OK;

    char **names;
    size_t n;
    top_status st = list_names(&names, &n, dir, 0, err);
    if (st != TOP_OK)
        return st;
    hc_entry *entries = malloc((n ? n : 1) * sizeof *entries);
    size_t n_entries = 0, total = 0;
    if (!entries)
        st = top_error_set(err, TOP_ERR_NOMEM, "out of memory listing '%s'", dir);
    if (st == TOP_OK)
        st = collect_entries(entries, &n_entries, &total, &count, dir, names, n, err);
    if (st == TOP_OK && n_entries > 1)
        qsort(entries, n_entries, sizeof *entries, cmp_entries);
    for (size_t i = 0; st == TOP_OK && i < n_entries && total > max_bytes; i++) {
        st = remove_file(dir, entries[i].name, err);
        if (st == TOP_OK) {
            total -= entries[i].bytes;
            count++;
        }
    }
    free(entries);
    free_names(names, n);
    if (removed)
        *removed = count;
    return st;
}
