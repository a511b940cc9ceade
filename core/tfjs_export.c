/*
 * A graph imported from a TF.js layers model, written back as one: the
 * source model.json with a new float32 weightsManifest, plus one shard.
 *
 * Steps: check that the graph came from the Keras importer and that the
 * source is a TF.js layers model.json. Walk the source manifest in order and
 * pair each weight with the graph parameter of the same name, checking its
 * source shape. Every other graph parameter must be a constant that the
 * importer added (keras_param_is_constant) and that still has its fill value,
 * because the source layer has no weight to store a changed one. Then write
 * the shard (each weight permuted back into its Keras layout, little-endian
 * float32, in manifest order, no padding) and the model.json to temporary
 * files in the output folder, and rename them into place.
 *
 * Layouts (engine -> source): conv kernel (K, C, R, S) -> (R, S, C, K),
 * depthwise kernel (C*M, 1, R, S) -> (R, S, C, M), dense kernel (OUT, IN) ->
 * (IN, OUT); everything else is copied.
 *
 * The output JSON is the parsed source re-serialised by jansson: field order
 * and values are kept, and numbers are printed with 17 significant digits,
 * which reads back as the same double. Whitespace and number spelling may
 * differ from the source file.
 *
 * NOTE: the two renames are separate steps. A reader that opens an older
 * model.json in out_dir between them gets the new shard with the old
 * manifest, so the output folder should be new or not in use.
 *
 * Thread-safety: no shared state; the graph is only read.
 */
#include "tfjs_export.h"

#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "fileio.h"
#include "import_keras.h"
#include "tensor.h"

/*
 * Shape legend: R x S kernel, C input channels, K conv filters, M depthwise
 * multiplier, IN/OUT dense features.
 */

/* A graph parameter by name, for binary search. */
typedef struct param_ref {
    const char *name;
    int index;
} param_ref;

/* What the export writes: the new manifest and the parameters in its order. */
typedef struct export_plan {
    json_t *root;     /* the source document */
    json_t *manifest; /* the new weightsManifest */
    int *params;      /* graph parameter of each manifest weight, in order */
    size_t count;
    size_t bytes;     /* float32 bytes of all weights */
    size_t max_numel; /* largest weight, for the conversion buffers */
} export_plan;

/* ---- layouts ------------------------------------------------------------------ */

/* 1 if gp's source shape is its engine shape under gp's layout. */
static int layout_matches(const graph_param *gp)
{
    const int64_t *v = gp->value.shape, *s = gp->src_shape;
    switch (gp->layout) {
    case PARAM_LAYOUT_HWIO:
        return gp->value.ndim == 4 && gp->src_ndim == 4 && s[0] == v[2] && s[1] == v[3] &&
               s[2] == v[1] && s[3] == v[0];
    case PARAM_LAYOUT_HWC1:
        return gp->value.ndim == 4 && gp->src_ndim == 4 && v[1] == 1 && s[0] == v[2] &&
               s[1] == v[3] && s[2] > 0 && s[3] > 0 && v[0] % s[3] == 0 && v[0] / s[3] == s[2];
    case PARAM_LAYOUT_IO:
        return gp->value.ndim == 2 && gp->src_ndim == 2 && s[0] == v[1] && s[1] == v[0];
    case PARAM_LAYOUT_SAME: break;
    }
    if (gp->src_ndim == 0)
        return 1;
    size_t numel = 1;
    for (int d = 0; d < gp->src_ndim; d++)
        if (s[d] < 0 || top_size_mul(&numel, numel, (size_t)s[d]))
            return 0;
    return numel == gp->value.numel;
}

/* v: (K, C, R, S)  dst: (R, S, C, K) */
static void hwio_from_engine(float *dst, const float *v, size_t r_n, size_t s_n, size_t c_n,
                             size_t k_n)
{
    for (size_t k = 0; k < k_n; k++)
        for (size_t c = 0; c < c_n; c++)
            for (size_t r = 0; r < r_n; r++)
                for (size_t q = 0; q < s_n; q++)
                    dst[((r * s_n + q) * c_n + c) * k_n + k] =
                        v[((k * c_n + c) * r_n + r) * s_n + q];
}

/* v: (C*M, 1, R, S)  dst: (R, S, C, M) */
static void hwcm_from_engine(float *dst, const float *v, size_t r_n, size_t s_n, size_t c_n,
                             size_t m_n)
{
    for (size_t c = 0; c < c_n; c++)
        for (size_t m = 0; m < m_n; m++)
            for (size_t r = 0; r < r_n; r++)
                for (size_t q = 0; q < s_n; q++)
                    dst[((r * s_n + q) * c_n + c) * m_n + m] =
                        v[((c * m_n + m) * r_n + r) * s_n + q];
}

top_status tfjs_param_to_source(float *dst, const graph_param *gp, top_error *err)
{
    if (!dst || !gp)
        return top_error_set(err, TOP_ERR_INVALID, "tfjs_param_to_source: dst or gp is NULL");
    if (!layout_matches(gp)) {
        char engine[96], source[96];
        return top_error_set(
            err, TOP_ERR_SHAPE,
            "parameter '%s': engine shape %s does not match source shape %s "
            "under its layout; the graph was not built by the Keras importer",
            gp->name, tensor_shape_str(engine, sizeof engine, gp->value.ndim, gp->value.shape),
            tensor_shape_str(source, sizeof source, gp->src_ndim, gp->src_shape));
    }
    const float *v = gp->value.data;
    const int64_t *s = gp->src_shape;
    switch (gp->layout) {
    case PARAM_LAYOUT_HWIO:
        hwio_from_engine(dst, v, (size_t)s[0], (size_t)s[1], (size_t)s[2], (size_t)s[3]);
        break;
    case PARAM_LAYOUT_HWC1:
        hwcm_from_engine(dst, v, (size_t)s[0], (size_t)s[1], (size_t)s[2], (size_t)s[3]);
        break;
    case PARAM_LAYOUT_IO: {
        /* v: (OUT, IN)  dst: (IN, OUT) */
        size_t in = (size_t)s[0], out = (size_t)s[1];
        for (size_t o = 0; o < out; o++)
            for (size_t i = 0; i < in; i++)
                dst[i * out + o] = v[o * in + i];
        break;
    }
    case PARAM_LAYOUT_SAME:
        if (gp->value.numel)
            memcpy(dst, v, gp->value.numel * sizeof *dst);
        break;
    }
    return TOP_OK;
}

/* ---- the source document --------------------------------------------------------- */

/* Reads and parses path into *root, which must be a TF.js layers model.json. */
static top_status read_source(json_t **root, const char *path, top_error *err)
{
    *root = NULL;
    top_error open_err;
    top_error_clear(&open_err);
    FILE *f = top_fopen_regular(path, &open_err);
    if (!f)
        return top_error_set(err, TOP_ERR_IO,
                             "%s; pass the model.json the graph was imported from",
                             open_err.message);
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0 || (uint64_t)sb.st_size > KERAS_MAX_JSON_BYTES) {
        fclose(f);
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "'%s' is not a TF.js layers model.json: it is larger than %zu "
                             "bytes; pass the model.json the graph was imported from",
                             path, KERAS_MAX_JSON_BYTES);
    }
    json_error_t jerr;
    *root = json_loadf(f, JSON_REJECT_DUPLICATES, &jerr);
    fclose(f);
    if (!*root)
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "'%s' is not a TF.js layers model.json (invalid JSON at line %d: "
                             "%s); TF.js export needs a model imported from a model.json",
                             path, jerr.line, jerr.text);
    if (!json_is_object(*root) || !json_is_object(json_object_get(*root, "modelTopology")) ||
        !json_is_array(json_object_get(*root, "weightsManifest"))) {
        json_decref(*root);
        *root = NULL;
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "'%s' is not a TF.js layers model.json: it lacks the object "
                             "modelTopology or the array weightsManifest; TF.js export needs a "
                             "model imported from a model.json",
                             path);
    }
    return TOP_OK;
}

/* ---- the plan ---------------------------------------------------------------------- */

static int param_ref_compare(const void *a, const void *b)
{
    return strcmp(((const param_ref *)a)->name, ((const param_ref *)b)->name);
}

static int param_find(const param_ref *refs, int count, const char *name)
{
    param_ref key = {name, -1};
    const param_ref *hit = bsearch(&key, refs, (size_t)count, sizeof *refs, param_ref_compare);
    return hit ? hit->index : -1;
}

/* The shape the manifest must list for gp: its source shape, if recorded. */
static json_t *source_shape_json(const graph_param *gp)
{
    int ndim = gp->src_ndim ? gp->src_ndim : gp->value.ndim;
    const int64_t *shape = gp->src_ndim ? gp->src_shape : gp->value.shape;
    json_t *a = json_array();
    for (int d = 0; a && d < ndim; d++)
        json_array_append_new(a, json_integer((json_int_t)shape[d]));
    return a;
}

/* Checks one source manifest entry against its graph parameter and appends
 * the float32 entry to `weights`. */
static top_status plan_weight(export_plan *p, json_t *weights, const graph *g,
                              const param_ref *refs, unsigned char *used, json_t *entry,
                              const char *source, top_error *err)
{
    const char *name = json_string_value(json_object_get(entry, "name"));
    if (!name)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: weightsManifest entry %zu has no name; the model.json is "
                             "malformed",
                             source, p->count);
    int pi = param_find(refs, g->n_params, name);
    if (pi < 0)
        return top_error_set(
            err, TOP_ERR_NOT_FOUND,
            "%s: weight '%s' of the weights manifest is not a parameter of the "
            "graph; export the graph that was imported from this model.json",
            source, name);
    if (used[pi])
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: weight '%s' is listed twice in the weights manifest", source,
                             name);
    used[pi] = 1;

    const graph_param *gp = &g->params[pi];
    json_t *shape = source_shape_json(gp);
    json_t *listed = json_object_get(entry, "shape");
    int same = shape && json_equal(shape, listed) && layout_matches(gp);
    if (!same) {
        char have[96], engine[96];
        json_decref(shape);
        return top_error_set(
            err, TOP_ERR_SHAPE,
            "%s: weight '%s' has another shape in the weights manifest than "
            "the graph parameter (source shape %s, engine shape %s); export "
            "the graph that was imported from this model.json",
            source, name,
            gp->src_ndim ? tensor_shape_str(have, sizeof have, gp->src_ndim, gp->src_shape)
                         : "unrecorded",
            tensor_shape_str(engine, sizeof engine, gp->value.ndim, gp->value.shape));
    }
    if (json_array_append_new(weights, json_pack("{s:s, s:o, s:s}", "name", name, "shape",
                                                 shape, "dtype", "float32")) != 0)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for manifest entry '%s'", name);
    size_t bytes;
    if (top_size_mul(&bytes, gp->value.numel, sizeof(float)) ||
        top_size_add(&p->bytes, p->bytes, bytes) || p->bytes > KERAS_MAX_WEIGHT_BYTES)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: the float32 weights up to '%s' need more than %zu bytes, the "
                             "limit of a TF.js export; export a smaller model",
                             source, name, KERAS_MAX_WEIGHT_BYTES);
    if (gp->value.numel > p->max_numel)
        p->max_numel = gp->value.numel;
    p->params[p->count++] = pi;
    return TOP_OK;
}

/* Checks that a graph parameter outside the manifest is an importer constant
 * that still has its fill value (gamma 1, beta 0). */
static top_status check_unlisted(const graph *g, int i, const char *source, top_error *err)
{
    const graph_param *gp = &g->params[i];
    if (!keras_param_is_constant(g, i))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "graph parameter '%s' is not in the weights manifest of %s; "
                             "export the graph that was imported from this model.json",
                             gp->name, source);
    float fill = gp->slot == PARAM_GAMMA ? 1.0f : 0.0f;
    for (size_t k = 0; k < gp->value.numel; k++)
        if (gp->value.data[k] != fill)
            return top_error_set(err, TOP_ERR_UNSUPPORTED,
                                 "parameter '%s' is %g at index %zu, but its batch-norm layer "
                                 "has %s = false in %s, so TF.js can only store %g there; keep "
                                 "that parameter unchanged",
                                 gp->name, (double)gp->value.data[k], k,
                                 gp->slot == PARAM_GAMMA ? "scale" : "center", source,
                                 (double)fill);
    return TOP_OK;
}

/* Builds the new manifest from the source's, in its order. */
static top_status plan_build(export_plan *p, const graph *g, const char *source, top_error *err)
{
    param_ref *refs = calloc((size_t)g->n_params + 1, sizeof *refs);
    unsigned char *used = calloc((size_t)g->n_params + 1, 1);
    p->params = calloc((size_t)g->n_params + 1, sizeof *p->params);
    json_t *weights = json_array();
    p->manifest = json_pack("[{s:[s], s:o}]", "paths", TFJS_EXPORT_SHARD, "weights", weights);
    top_status st = TOP_OK;
    if (!refs || !used || !p->params || !weights || !p->manifest) {
        st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for the manifest of %d weights",
                           g->n_params);
        goto done;
    }
    for (int i = 0; i < g->n_params; i++)
        refs[i] = (param_ref){g->params[i].name, i};
    qsort(refs, (size_t)g->n_params, sizeof *refs, param_ref_compare);

    size_t gi, wi;
    json_t *group, *entry;
    json_array_foreach(json_object_get(p->root, "weightsManifest"), gi, group)
    {
        json_t *list = json_object_get(group, "weights");
        if (!json_is_array(list)) {
            st = top_error_set(err, TOP_ERR_FORMAT,
                               "%s: weightsManifest group %zu has no array 'weights'; the "
                               "model.json is malformed",
                               source, gi);
            goto done;
        }
        json_array_foreach(list, wi, entry)
        {
            /* plan_weight uses each parameter once, so p->params cannot overflow. */
            st = plan_weight(p, weights, g, refs, used, entry, source, err);
            if (st != TOP_OK)
                goto done;
        }
    }
    for (int i = 0; st == TOP_OK && i < g->n_params; i++)
        if (!used[i])
            st = check_unlisted(g, i, source, err);
done:
    free(refs);
    free(used);
    return st;
}

static void plan_free(export_plan *p)
{
    json_decref(p->root);
    json_decref(p->manifest);
    free(p->params);
}

/* ---- files -------------------------------------------------------------------------- */

static int write_all(int fd, const void *data, size_t n)
{
    const unsigned char *c = data;
    while (n > 0) {
        ssize_t k = write(fd, c, n);
        if (k < 0 && errno == EINTR)
            continue;
        if (k < 0)
            return -1;
        c += k;
        n -= (size_t)k;
    }
    return 0;
}

/* Stores dir + "/" + name in a new string *out. */
static top_status join_path(char **out, const char *dir, const char *name, top_error *err)
{
    size_t len;
    *out = NULL;
    if (top_size_add(&len, strlen(dir), strlen(name)) || top_size_add(&len, len, 2))
        return top_error_set(err, TOP_ERR_OVERFLOW, "the path '%s' is too long", dir);
    *out = malloc(len);
    if (!*out)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for a path in '%s'", dir);
    snprintf(*out, len, "%s/%s", dir, name);
    return TOP_OK;
}

/* Creates out_dir if missing and rejects it if it is the source's folder. */
static top_status prepare_dir(const char *out_dir, const char *source, top_error *err)
{
    struct stat out_sb, src_sb;
    if (mkdir(out_dir, 0777) != 0 && errno != EEXIST)
        return top_error_set(err, TOP_ERR_IO,
                             "cannot create output folder '%s': %s; create its parent or pick "
                             "another path",
                             out_dir, strerror(errno));
    if (stat(out_dir, &out_sb) != 0 || !S_ISDIR(out_sb.st_mode))
        return top_error_set(err, TOP_ERR_INVALID,
                             "output folder '%s' is not a folder; pass a folder path", out_dir);
    const char *slash = strrchr(source, '/');
    char *src_dir =
        slash ? strndup(source, slash == source ? 1 : (size_t)(slash - source)) : strdup(".");
    if (!src_dir)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the folder of '%s'",
                             source);
    int same = stat(src_dir, &src_sb) == 0 && src_sb.st_dev == out_sb.st_dev &&
               src_sb.st_ino == out_sb.st_ino;
    free(src_dir);
    if (same)
        return top_error_set(err, TOP_ERR_INVALID,
                             "output folder '%s' contains the source model '%s', which the "
                             "export would replace; pick another folder",
                             out_dir, source);
    return TOP_OK;
}

/* Rejects a target that exists as anything but a regular file, because the
 * rename would replace a folder, link, device, FIFO or socket. */
static top_status check_target(const char *path, top_error *err)
{
    struct stat sb;
    if (lstat(path, &sb) == 0 && !S_ISREG(sb.st_mode))
        return top_error_set(
            err, TOP_ERR_INVALID,
            "cannot write '%s': it exists and is not a regular file; remove it "
            "or pick another output folder",
            path);
    return TOP_OK;
}

/* Creates a temporary file next to target; *tmp is "TARGET.tmp.XXXXXX". */
static int open_temp(char **tmp, const char *target, top_error *err)
{
    size_t len = strlen(target) + sizeof ".tmp.XXXXXX";
    *tmp = malloc(len);
    if (!*tmp) {
        top_error_set(err, TOP_ERR_NOMEM, "out of memory for a temporary path");
        return -1;
    }
    snprintf(*tmp, len, "%s.tmp.XXXXXX", target);
    int fd = mkstemp(*tmp);
    if (fd < 0 || fchmod(fd, 0644) != 0) {
        top_error_set(err, TOP_ERR_IO,
                      "cannot create '%s': %s; check that the folder is writable", *tmp,
                      strerror(errno));
        if (fd >= 0) {
            close(fd);
            unlink(*tmp);
        }
        free(*tmp);
        *tmp = NULL;
        return -1;
    }
    return fd;
}

/* Fsyncs and closes fd; on failure err names tmp. */
static top_status finish_temp(int fd, const char *tmp, int write_failed, top_error *err)
{
    const char *step = "write";
    int failed = write_failed, saved = errno;
    if (!failed) {
        step = "fsync";
        failed = fsync(fd) != 0;
        saved = errno;
    }
    if (close(fd) != 0 && !failed) {
        step = "close";
        failed = 1;
        saved = errno;
    }
    if (failed)
        return top_error_set(err, TOP_ERR_IO, "cannot %s '%s': %s; check free space", step, tmp,
                             strerror(saved));
    return TOP_OK;
}

/* Writes every planned weight to fd: source layout, little-endian float32. */
static top_status write_weights(int fd, const char *tmp, const graph *g, const export_plan *p,
                                top_error *err)
{
    size_t max = p->max_numel ? p->max_numel : 1;
    float *values = malloc(max * sizeof *values);
    unsigned char *bytes = malloc(max * sizeof *values);
    top_status st = TOP_OK;
    if (!values || !bytes)
        st = top_error_set(err, TOP_ERR_NOMEM, "out of memory for %zu floats of weights", max);
    for (size_t w = 0; st == TOP_OK && w < p->count; w++) {
        const graph_param *gp = &g->params[p->params[w]];
        st = tfjs_param_to_source(values, gp, err);
        for (size_t i = 0; st == TOP_OK && i < gp->value.numel; i++) {
            if (!isfinite(values[i]))
                st = top_error_set(err, TOP_ERR_NUMERIC,
                                   "parameter '%s' is %g at index %zu of its source layout; "
                                   "TF.js export needs finite weights",
                                   gp->name, (double)values[i], i);
            uint32_t bits;
            memcpy(&bits, &values[i], sizeof bits);
            for (int b = 0; b < 4; b++)
                bytes[4 * i + (size_t)b] = (unsigned char)(bits >> (8 * b));
        }
        if (st == TOP_OK && write_all(fd, bytes, gp->value.numel * sizeof(float)) != 0)
            st = top_error_set(err, TOP_ERR_IO, "cannot write '%s': %s; check free space", tmp,
                               strerror(errno));
    }
    free(values);
    free(bytes);
    return st;
}

/* Writes the source document with the new manifest to fd. */
static top_status write_document(int fd, const char *tmp, const export_plan *p, top_error *err)
{
    json_t *out = json_object();
    const char *key;
    json_t *value;
    json_object_foreach(p->root, key, value)
    {
        json_object_set(out, key, strcmp(key, "weightsManifest") == 0 ? p->manifest : value);
    }
    char *text = out ? json_dumps(out, JSON_COMPACT) : NULL;
    json_decref(out);
    if (!text)
        return top_error_set(err, TOP_ERR_NOMEM, "out of memory for the text of '%s'", tmp);
    int failed = write_all(fd, text, strlen(text)) != 0 || write_all(fd, "\n", 1) != 0;
    free(text);
    if (failed)
        return top_error_set(err, TOP_ERR_IO, "cannot write '%s': %s; check free space", tmp,
                             strerror(errno));
    return TOP_OK;
}

/* Fsyncs out_dir, so the renames in it are durable. */
static top_status sync_dir(const char *out_dir, top_error *err)
{
    int fd = open(out_dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    top_status st = TOP_OK;
    if (fd < 0 || fsync(fd) != 0)
        st = top_error_set(err, TOP_ERR_IO, "wrote the TF.js model but cannot fsync '%s': %s",
                           out_dir, strerror(errno));
    if (fd >= 0)
        close(fd);
    return st;
}

/* ---- export ---------------------------------------------------------------------------- */

/* Writes both temporary files, then renames the shard and the model.json. */
static top_status write_files(const graph *g, const export_plan *p, const char *shard,
                              const char *json, top_error *err)
{
    char *shard_tmp = NULL, *json_tmp = NULL;
    top_status st = TOP_ERR_IO;
    int fd = open_temp(&shard_tmp, shard, err);
    if (fd < 0)
        goto done;
    st = write_weights(fd, shard_tmp, g, p, err);
    if (finish_temp(fd, shard_tmp, st != TOP_OK, err) != TOP_OK && st == TOP_OK)
        st = TOP_ERR_IO;
    if (st != TOP_OK)
        goto done;
    st = TOP_ERR_IO;
    fd = open_temp(&json_tmp, json, err);
    if (fd < 0)
        goto done;
    st = write_document(fd, json_tmp, p, err);
    if (finish_temp(fd, json_tmp, st != TOP_OK, err) != TOP_OK && st == TOP_OK)
        st = TOP_ERR_IO;
    if (st != TOP_OK)
        goto done;
    if (rename(shard_tmp, shard) != 0) {
        st = top_error_set(err, TOP_ERR_IO, "cannot rename '%s' to '%s': %s", shard_tmp, shard,
                           strerror(errno));
        goto done;
    }
    free(shard_tmp);
    shard_tmp = NULL;
    if (rename(json_tmp, json) != 0) {
        st = top_error_set(err, TOP_ERR_IO, "cannot rename '%s' to '%s': %s", json_tmp, json,
                           strerror(errno));
        goto done;
    }
    free(json_tmp);
    json_tmp = NULL;

done:
    if (shard_tmp)
        unlink(shard_tmp);
    if (json_tmp)
        unlink(json_tmp);
    free(shard_tmp);
    free(json_tmp);
    return st;
}

top_status tfjs_export_write(const graph *g, const char *source_model_json, const char *out_dir,
                             top_error *err)
{
    if (!g || !source_model_json || !out_dir || !out_dir[0])
        return top_error_set(err, TOP_ERR_INVALID,
                             "tfjs_export_write: the graph, the source path or the output "
                             "folder is missing");
    if (strncmp(g->architecture, "keras:", 6) != 0)
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "the %s model was not imported from a TF.js layers model "
                             "(model.json); TF.js export is only available for those",
                             g->architecture[0] ? g->architecture : "unnamed");

    export_plan p = {0};
    char *shard = NULL, *json = NULL;
    top_status st = read_source(&p.root, source_model_json, err);
    if (st == TOP_OK)
        st = plan_build(&p, g, source_model_json, err);
    if (st == TOP_OK)
        st = prepare_dir(out_dir, source_model_json, err);
    if (st == TOP_OK)
        st = join_path(&shard, out_dir, TFJS_EXPORT_SHARD, err);
    if (st == TOP_OK)
        st = join_path(&json, out_dir, TFJS_EXPORT_MODEL_JSON, err);
    if (st == TOP_OK)
        st = check_target(shard, err);
    if (st == TOP_OK)
        st = check_target(json, err);
    if (st == TOP_OK)
        st = write_files(g, &p, shard, json, err);
    if (st == TOP_OK)
        st = sync_dir(out_dir, err);
    free(shard);
    free(json);
    plan_free(&p);
    return st;
}
