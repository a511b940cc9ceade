/*
 * Keras functional models (TF.js layers model.json + weight shards) to graph.
 *
 * Steps: parse the JSON with jansson. Read the weights manifest into a table
 * of tensors (offset, storage dtype, optional affine quantization) and check
 * that its byte sizes add up to the shard bytes. Order the layers so that each
 * follows its inbound layers, and import each into one or more graph nodes,
 * converting its weights to the engine layout. Check that every manifest
 * weight was used, then finalize the graph.
 *
 * Layouts: Keras activations are NHWC and the engine's are NCHW, so only the
 * weights move: conv kernel (R, S, C, K) -> (K, C, R, S), depthwise kernel
 * (R, S, C, M) -> (C*M, 1, R, S), dense kernel (IN, OUT) -> (OUT, IN). Flatten
 * keeps the Keras (H, W, C) order (attrs.flatten_nhwc), so dense kernels after
 * it need no row permutation. Quantized weights decode as
 * value = q * scale + min, computed in double and rounded to float32 as
 * TF.js does.
 *
 * Keras "same" padding: total = max((ceil(in/stride) - 1) * stride +
 * (k - 1) * dilation + 1 - in, 0), top = total / 2 and the extra row or column
 * goes to the bottom or right. "same" average pooling divides by the count of
 * in-bounds cells.
 *
 * Config keys that only matter for training in Keras (initializers,
 * regularizers, constraints, trainable, batch-norm momentum, dropout seed) are
 * accepted and ignored; any other unknown key is rejected. A BatchNormalization
 * with scale = false or center = false gets a constant gamma of ones or beta
 * of zeros with the role PARAM_ROLE_STATISTIC, so the graph neither trains nor
 * counts it; keras_param_is_constant() tells them apart.
 *
 * Thread-safety: no shared state. Not supported: Sequential models, shared
 * layers (a layer called more than once), channels_first, Keras 3's
 * inbound-node format, layers and activations not listed in layer_table.
 */
#include "import_keras.h"
#include "fileio.h"

#include <jansson.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>

#include "half.h"
#include "tensor.h"

/*
 * Shape legend: H x W spatial size, C channels, R x S kernel, K conv filters,
 * M depthwise multiplier, IN/OUT dense features. Keras tensors are tracked per
 * sample as (H, W, C) (rank 3) or (C) (rank 1).
 */

typedef enum keras_storage {
    KERAS_STORAGE_F32,
    KERAS_STORAGE_F16,
    KERAS_STORAGE_U8,
    KERAS_STORAGE_U16,
} keras_storage;

/* One tensor of the weights manifest. */
typedef struct keras_weight {
    const char *name; /* borrowed from the JSON document */
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    size_t numel;
    keras_storage storage;
    int affine; /* value = q * scale + min */
    double scale, min;
    size_t offset, bytes; /* in the concatenated shards */
    int used;
} keras_weight;

/* One layer of the topology and, once imported, its output. */
typedef struct keras_layer {
    const char *name, *class_name; /* borrowed from the JSON document */
    json_t *config;
    int n_in;
    int in[GRAPH_MAX_INPUTS]; /* indices of the inbound layers */
    int done;
    int node; /* graph node of the output */
    int rank; /* 3: (H, W, C), 1: (C) */
    int h, w, c;
} keras_layer;

typedef struct keras_name {
    const char *name;
    int index;
} keras_name;

typedef struct keras_ctx {
    graph *g;
    keras_layer *layers;
    int n_layers;
    keras_name *layer_names; /* sorted by name */
    keras_weight *weights;
    int n_weights;
    keras_name *weight_names; /* sorted by name */
    const unsigned char *data;
    size_t data_len;
    top_error *err;
} keras_ctx;

typedef top_status (*keras_import_fn)(keras_ctx *ctx, keras_layer *l);

/* ---- JSON and config helpers ---------------------------------------------- */

static int name_compare(const void *a, const void *b)
{
    return strcmp(((const keras_name *)a)->name, ((const keras_name *)b)->name);
}

static int name_find(const keras_name *names, int count, const char *name)
{
    keras_name key = {name, -1};
    const keras_name *hit = bsearch(&key, names, (size_t)count, sizeof *names, name_compare);
    return hit ? hit->index : -1;
}

/* Writes a short rendering of a JSON value for error messages. */
static const char *json_brief(char *buf, size_t size, const json_t *v)
{
    if (!v) {
        snprintf(buf, size, "missing");
        return buf;
    }
    char *text = json_dumps(v, JSON_ENCODE_ANY | JSON_COMPACT);
    if (!text) {
        snprintf(buf, size, "(unprintable)");
        return buf;
    }
    if (strlen(text) >= size && size > 4)
        snprintf(buf, size, "%.*s...", (int)(size - 4), text);
    else
        snprintf(buf, size, "%s", text);
    free(text);
    return buf;
}

static top_status config_error(keras_ctx *ctx, const keras_layer *l, const char *key,
                               const json_t *v, const char *expected)
{
    char shown[96];
    return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                         "layer '%s' (%s): config '%s' is %s; expected %s", l->name,
                         l->class_name, key, json_brief(shown, sizeof shown, v), expected);
}

/* An integer config value in [lo, hi]; a missing key takes dflt unless
 * required. */
static top_status config_int(keras_ctx *ctx, const keras_layer *l, const char *key,
                             int required, int dflt, int lo, int hi, int *out)
{
    json_t *v = json_object_get(l->config, key);
    if (!v && !required) {
        *out = dflt;
        return TOP_OK;
    }
    if (!json_is_integer(v) || json_integer_value(v) < lo || json_integer_value(v) > hi) {
        char expected[64];
        snprintf(expected, sizeof expected, "an integer in [%d, %d]", lo, hi);
        return config_error(ctx, l, key, v, expected);
    }
    *out = (int)json_integer_value(v);
    return TOP_OK;
}

/* A pair of integers in [lo, hi], written as [a, b] or as one integer. */
static top_status config_pair(keras_ctx *ctx, const keras_layer *l, const char *key, int lo,
                              int hi, int out[2])
{
    json_t *v = json_object_get(l->config, key);
    json_t *items[2] = {v, v};
    if (json_is_array(v)) {
        if (json_array_size(v) != 2)
            items[0] = NULL;
        else
            items[0] = json_array_get(v, 0), items[1] = json_array_get(v, 1);
    }
    for (int i = 0; i < 2; i++) {
        if (!json_is_integer(items[i]) || json_integer_value(items[i]) < lo ||
            json_integer_value(items[i]) > hi) {
            char expected[80];
            snprintf(expected, sizeof expected, "two integers in [%d, %d]", lo, hi);
            return config_error(ctx, l, key, v, expected);
        }
        out[i] = (int)json_integer_value(items[i]);
    }
    return TOP_OK;
}

static top_status config_bool(keras_ctx *ctx, const keras_layer *l, const char *key, int dflt,
                              int *out)
{
    json_t *v = json_object_get(l->config, key);
    if (!v) {
        *out = dflt;
        return TOP_OK;
    }
    if (!json_is_boolean(v))
        return config_error(ctx, l, key, v, "true or false");
    *out = json_is_true(v);
    return TOP_OK;
}

/* A finite number in [lo, hi] (integer or real); missing takes dflt. */
static top_status config_number(keras_ctx *ctx, const keras_layer *l, const char *key,
                                double dflt, double lo, double hi, double *out)
{
    json_t *v = json_object_get(l->config, key);
    if (!v) {
        *out = dflt;
        return TOP_OK;
    }
    double x = json_number_value(v);
    if (!json_is_number(v) || !isfinite(x) || x < lo || x > hi) {
        char expected[80];
        snprintf(expected, sizeof expected, "a number in [%g, %g]", lo, hi);
        return config_error(ctx, l, key, v, expected);
    }
    *out = x;
    return TOP_OK;
}

/* The key must be absent, null or equal to `value` (a JSON literal). */
static top_status config_default(keras_ctx *ctx, const keras_layer *l, const char *key,
                                 json_t *value)
{
    json_t *v = json_object_get(l->config, key);
    if (!v || json_is_null(v) || (value && json_equal(v, value)))
        return TOP_OK;
    char expected[64], shown[32];
    snprintf(expected, sizeof expected, "%s (the only value supported)",
             value ? json_brief(shown, sizeof shown, value) : "null");
    return config_error(ctx, l, key, v, expected);
}

static top_status config_data_format(keras_ctx *ctx, const keras_layer *l)
{
    json_t *v = json_object_get(l->config, "data_format");
    if (!v || json_is_null(v) ||
        (json_is_string(v) && strcmp(json_string_value(v), "channels_last") == 0))
        return TOP_OK;
    return config_error(ctx, l, "data_format", v, "\"channels_last\"");
}

/* Reads "padding": "valid" (0) or "same" (1). */
static top_status config_padding_mode(keras_ctx *ctx, const keras_layer *l, int *same)
{
    json_t *v = json_object_get(l->config, "padding");
    const char *s = json_string_value(v);
    if (s && strcmp(s, "valid") == 0)
        *same = 0;
    else if (s && strcmp(s, "same") == 0)
        *same = 1;
    else
        return config_error(ctx, l, "padding", v, "\"valid\" or \"same\"");
    return TOP_OK;
}

static int key_has_suffix(const char *key, const char *suffix)
{
    size_t n = strlen(key), m = strlen(suffix);
    return n >= m && strcmp(key + n - m, suffix) == 0;
}

/* Rejects config keys that are neither in `known` nor training-only. */
static top_status config_check_keys(keras_ctx *ctx, const keras_layer *l,
                                    const char *const *known)
{
    const char *key;
    json_t *v;
    json_object_foreach(l->config, key, v)
    {
        int ok = strcmp(key, "name") == 0 || strcmp(key, "trainable") == 0 ||
                 key_has_suffix(key, "_initializer") || key_has_suffix(key, "_regularizer") ||
                 key_has_suffix(key, "_constraint");
        for (int i = 0; !ok && known[i]; i++)
            ok = strcmp(key, known[i]) == 0;
        if (strcmp(key, "dtype") == 0) {
            const char *s = json_string_value(v);
            if (!s || strcmp(s, "float32") != 0)
                return config_error(ctx, l, key, v, "\"float32\"");
            ok = 1;
        }
        if (!ok) {
            char shown[64];
            return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                                 "layer '%s' (%s): config key '%s' (value %s) is not "
                                 "supported by this importer",
                                 l->name, l->class_name, key,
                                 json_brief(shown, sizeof shown, v));
        }
    }
    return TOP_OK;
}

/* ---- weights manifest ------------------------------------------------------- */

static top_status manifest_error(keras_ctx *ctx, const char *name, const char *what,
                                 const json_t *v, const char *expected)
{
    char shown[96];
    return top_error_set(ctx->err, TOP_ERR_FORMAT,
                         "weights manifest: weight '%s': %s is %s; expected %s",
                         name ? name : "?", what, json_brief(shown, sizeof shown, v), expected);
}

static top_status parse_weight_shape(keras_ctx *ctx, keras_weight *w, json_t *shape)
{
    if (!json_is_array(shape) || json_array_size(shape) > TENSOR_MAX_DIMS)
        return manifest_error(ctx, w->name, "shape", shape, "an array of at most 8 dims");
    w->ndim = (int)json_array_size(shape);
    for (int d = 0; d < w->ndim; d++) {
        json_t *dim = json_array_get(shape, (size_t)d);
        if (!json_is_integer(dim) || json_integer_value(dim) < 1 ||
            json_integer_value(dim) > ((json_int_t)1 << 32))
            return manifest_error(ctx, w->name, "shape", shape,
                                  "positive integer dims of at most 2^32");
        w->shape[d] = (int64_t)json_integer_value(dim);
    }
    return tensor_shape_numel(&w->numel, w->ndim, w->shape, w->name, ctx->err);
}

/* Reads dtype and quantization: the storage type and the affine constants. */
static top_status parse_weight_dtype(keras_ctx *ctx, keras_weight *w, json_t *entry)
{
    json_t *dtype = json_object_get(entry, "dtype");
    json_t *quant = json_object_get(entry, "quantization");
    const char *s = json_string_value(dtype);
    if (s && strcmp(s, "float32") == 0)
        w->storage = KERAS_STORAGE_F32;
    else if (s && strcmp(s, "float16") == 0)
        w->storage = KERAS_STORAGE_F16;
    else
        return manifest_error(ctx, w->name, "dtype", dtype, "\"float32\" or \"float16\"");
    if (!quant || json_is_null(quant))
        return TOP_OK;

    json_t *qdtype = json_object_get(quant, "dtype");
    const char *q = json_string_value(qdtype);
    if (!json_is_object(quant) || !q)
        return manifest_error(ctx, w->name, "quantization", quant, "an object with a dtype");
    if (strcmp(q, "float16") == 0) {
        w->storage = KERAS_STORAGE_F16;
        return TOP_OK;
    }
    if (strcmp(q, "uint8") == 0)
        w->storage = KERAS_STORAGE_U8;
    else if (strcmp(q, "uint16") == 0)
        w->storage = KERAS_STORAGE_U16;
    else
        return manifest_error(ctx, w->name, "quantization dtype", qdtype,
                              "\"uint8\", \"uint16\" or \"float16\"");
    json_t *scale = json_object_get(quant, "scale"), *min = json_object_get(quant, "min");
    w->affine = 1;
    w->scale = json_number_value(scale);
    w->min = json_number_value(min);
    if (!json_is_number(scale) || !isfinite(w->scale))
        return manifest_error(ctx, w->name, "quantization scale", scale, "a finite number");
    if (!json_is_number(min) || !isfinite(w->min))
        return manifest_error(ctx, w->name, "quantization min", min, "a finite number");
    return TOP_OK;
}

static size_t storage_bytes(keras_storage s)
{
    switch (s) {
    case KERAS_STORAGE_F32: return 4;
    case KERAS_STORAGE_F16:
    case KERAS_STORAGE_U16: return 2;
    case KERAS_STORAGE_U8: return 1;
    }
    return 4;
}

static top_status parse_weight(keras_ctx *ctx, keras_weight *w, json_t *entry, size_t *offset)
{
    memset(w, 0, sizeof *w);
    w->name = json_string_value(json_object_get(entry, "name"));
    if (!json_is_object(entry) || !w->name || !w->name[0])
        return manifest_error(ctx, w->name, "the entry", entry,
                              "an object with a non-empty name");
    top_status st = parse_weight_shape(ctx, w, json_object_get(entry, "shape"));
    if (st == TOP_OK)
        st = parse_weight_dtype(ctx, w, entry);
    if (st != TOP_OK)
        return st;
    if (top_size_mul(&w->bytes, w->numel, storage_bytes(w->storage)) ||
        top_size_add(offset, *offset, w->bytes) || *offset > KERAS_MAX_WEIGHT_BYTES)
        return top_error_set(ctx->err, TOP_ERR_LIMIT,
                             "weights manifest: the weights up to '%s' need more than %zu "
                             "bytes, the importer's limit",
                             w->name, KERAS_MAX_WEIGHT_BYTES);
    w->offset = *offset - w->bytes;
    return TOP_OK;
}

/* Counts the manifest's weights and shard paths, checking its structure. */
static top_status manifest_count(json_t *manifest, size_t *n_weights, size_t *n_paths,
                                 top_error *err)
{
    *n_weights = *n_paths = 0;
    if (!json_is_array(manifest))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "model.json: weightsManifest is missing or "
                             "not an array; export the model as a TF.js layers model");
    size_t i;
    json_t *group;
    json_array_foreach(manifest, i, group)
    {
        json_t *paths = json_object_get(group, "paths");
        json_t *weights = json_object_get(group, "weights");
        if (!json_is_array(paths) || !json_is_array(weights))
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "model.json: weightsManifest group %zu "
                                 "needs the arrays 'paths' and 'weights'",
                                 i);
        *n_paths += json_array_size(paths);
        *n_weights += json_array_size(weights);
    }
    if (*n_weights > KERAS_MAX_WEIGHTS)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "model.json: the manifest lists %zu weights; "
                             "the limit is %d",
                             *n_weights, KERAS_MAX_WEIGHTS);
    if (*n_paths > KERAS_MAX_SHARDS)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "model.json: the manifest lists %zu shards; "
                             "the limit is %d",
                             *n_paths, KERAS_MAX_SHARDS);
    return TOP_OK;
}

static top_status parse_manifest(keras_ctx *ctx, json_t *manifest)
{
    size_t n_weights, n_paths;
    top_status st = manifest_count(manifest, &n_weights, &n_paths, ctx->err);
    if (st != TOP_OK)
        return st;
    ctx->weights = calloc(n_weights ? n_weights : 1, sizeof *ctx->weights);
    ctx->weight_names = calloc(n_weights ? n_weights : 1, sizeof *ctx->weight_names);
    if (!ctx->weights || !ctx->weight_names)
        return top_error_set(ctx->err, TOP_ERR_NOMEM, "allocating %zu manifest entries failed",
                             n_weights);

    size_t offset = 0, i, j;
    json_t *group, *entry;
    json_array_foreach(manifest, i, group)
    {
        json_array_foreach(json_object_get(group, "weights"), j, entry)
        {
            keras_weight *w = &ctx->weights[ctx->n_weights];
            st = parse_weight(ctx, w, entry, &offset);
            if (st != TOP_OK)
                return st;
            ctx->weight_names[ctx->n_weights] = (keras_name){w->name, ctx->n_weights};
            ctx->n_weights++;
        }
    }
    if (offset != ctx->data_len)
        return top_error_set(
            ctx->err, TOP_ERR_FORMAT,
            "weights manifest: the weights need %zu bytes but the shards hold "
            "%zu; the shards are truncated or do not belong to this model.json",
            offset, ctx->data_len);
    qsort(ctx->weight_names, (size_t)ctx->n_weights, sizeof *ctx->weight_names, name_compare);
    for (int k = 1; k < ctx->n_weights; k++)
        if (strcmp(ctx->weight_names[k - 1].name, ctx->weight_names[k].name) == 0)
            return top_error_set(ctx->err, TOP_ERR_FORMAT,
                                 "weights manifest: weight '%s' is "
                                 "listed twice",
                                 ctx->weight_names[k].name);
    return TOP_OK;
}

/* ---- weight decoding and layout conversion ---------------------------------- */

/* Decodes weight w into src (w->numel floats, source layout). */
static top_status decode_weight(keras_ctx *ctx, float *src, const keras_weight *w)
{
    const unsigned char *p = ctx->data + w->offset;
    for (size_t i = 0; i < w->numel; i++) {
        float v;
        switch (w->storage) {
        case KERAS_STORAGE_F32: {
            uint32_t bits = (uint32_t)p[4 * i] | (uint32_t)p[4 * i + 1] << 8 |
                            (uint32_t)p[4 * i + 2] << 16 | (uint32_t)p[4 * i + 3] << 24;
            memcpy(&v, &bits, sizeof v);
            break;
        }
        case KERAS_STORAGE_F16:
            v = half_to_float((uint16_t)(p[2 * i] | p[2 * i + 1] << 8));
            break;
        case KERAS_STORAGE_U8: v = (float)((double)p[i] * w->scale + w->min); break;
        default: v = (float)((double)(p[2 * i] | p[2 * i + 1] << 8) * w->scale + w->min); break;
        }
        if (!isfinite(v))
            return top_error_set(ctx->err, TOP_ERR_NUMERIC,
                                 "weight '%s': element %zu is not "
                                 "finite (%g); the weights are corrupt",
                                 w->name, i, (double)v);
        src[i] = v;
    }
    return TOP_OK;
}

/* Copies src (w->numel floats, Keras layout) into dst (engine layout). */
static void permute_weight(float *dst, const float *src, param_layout layout,
                           const keras_weight *w)
{
    const int64_t *s = w->shape;
    if (layout == PARAM_LAYOUT_HWIO || layout == PARAM_LAYOUT_HWC1) {
        /* src: (R, S, C, K)  dst: (K, C, R, S). Depthwise src: (R, S, C, M)
         * dst: (C*M, 1, R, S) with output channel c*M + m. */
        size_t r_n = (size_t)s[0], s_n = (size_t)s[1], c_n = (size_t)s[2], k_n = (size_t)s[3];
        for (size_t r = 0; r < r_n; r++)
            for (size_t q = 0; q < s_n; q++)
                for (size_t c = 0; c < c_n; c++)
                    for (size_t k = 0; k < k_n; k++) {
                        size_t from = ((r * s_n + q) * c_n + c) * k_n + k;
                        size_t to = layout == PARAM_LAYOUT_HWIO
                                        ? ((k * c_n + c) * r_n + r) * s_n + q
                                        : ((c * k_n + k) * r_n + r) * s_n + q;
                        dst[to] = src[from];
                    }
    } else if (layout == PARAM_LAYOUT_IO) {
        /* src: (IN, OUT)  dst: (OUT, IN) */
        size_t in = (size_t)s[0], out = (size_t)s[1];
        for (size_t i = 0; i < in; i++)
            for (size_t o = 0; o < out; o++)
                dst[o * in + i] = src[i * out + o];
    } else {
        memcpy(dst, src, w->numel * sizeof *dst);
    }
}

/* The engine shape of a source shape under a layout. */
static int engine_shape(int64_t *dst, param_layout layout, const int64_t *s, int ndim)
{
    switch (layout) {
    case PARAM_LAYOUT_HWIO:
        dst[0] = s[3], dst[1] = s[2], dst[2] = s[0], dst[3] = s[1];
        return 4;
    case PARAM_LAYOUT_HWC1:
        dst[0] = s[2] * s[3], dst[1] = 1, dst[2] = s[0], dst[3] = s[1];
        return 4;
    case PARAM_LAYOUT_IO: dst[0] = s[1], dst[1] = s[0]; return 2;
    default:
        for (int d = 0; d < ndim; d++)
            dst[d] = s[d];
        return ndim;
    }
}

/* What a layer expects of one of its weights. */
typedef struct weight_request {
    const char *suffix; /* "kernel", "bias", "gamma" ... */
    int ndim;
    int64_t shape[4]; /* source (Keras) shape */
    param_layout layout;
    int slot;
    param_role role;
} weight_request;

/*
 * Finds "<layer>/<suffix>" in the manifest, checks its shape, converts it to
 * the engine layout and attaches it to node `node`.
 */
static top_status take_weight(keras_ctx *ctx, const keras_layer *l, int node,
                              const weight_request *req)
{
    char name[GRAPH_NAME_MAX], want[96], have[96];
    if (snprintf(name, sizeof name, "%s/%s", l->name, req->suffix) >= (int)sizeof name)
        return top_error_set(ctx->err, TOP_ERR_LIMIT,
                             "layer '%s' (%s): the weight name is "
                             "longer than %d bytes",
                             l->name, l->class_name, GRAPH_NAME_MAX - 1);
    int index = name_find(ctx->weight_names, ctx->n_weights, name);
    if (index < 0)
        return top_error_set(ctx->err, TOP_ERR_NOT_FOUND,
                             "layer '%s' (%s): weight '%s' is "
                             "missing from the weights manifest",
                             l->name, l->class_name, name);
    keras_weight *w = &ctx->weights[index];
    int same = w->ndim == req->ndim;
    for (int d = 0; same && d < req->ndim; d++)
        same = w->shape[d] == req->shape[d];
    if (!same)
        return top_error_set(ctx->err, TOP_ERR_SHAPE,
                             "layer '%s' (%s): weight '%s' has shape "
                             "%s in the manifest, the layer needs %s",
                             l->name, l->class_name, name,
                             tensor_shape_str(have, sizeof have, w->ndim, w->shape),
                             tensor_shape_str(want, sizeof want, req->ndim, req->shape));
    w->used = 1;

    int64_t shape[TENSOR_MAX_DIMS];
    int ndim = engine_shape(shape, req->layout, w->shape, w->ndim);
    tensor value = {0};
    float *src = malloc(w->numel * sizeof *src);
    top_status st = src ? TOP_OK
                        : top_error_set(ctx->err, TOP_ERR_NOMEM,
                                        "weight '%s': allocating %zu "
                                        "floats failed",
                                        name, w->numel);
    if (st == TOP_OK)
        st = decode_weight(ctx, src, w);
    if (st == TOP_OK)
        st = tensor_init(&value, ndim, shape, ctx->err);
    if (st == TOP_OK) {
        permute_weight(value.data, src, req->layout, w);
        st = graph_add_param(ctx->g, node, req->slot, name, req->role, &value, req->layout,
                             w->shape, w->ndim, ctx->err);
    }
    free(src);
    tensor_free(&value);
    return st;
}

/* Attaches a constant (c channels of `fill`) that the manifest lacks. */
static top_status add_constant(keras_ctx *ctx, const keras_layer *l, int node, int slot,
                               const char *suffix, int c, float fill)
{
    char name[GRAPH_NAME_MAX];
    if (snprintf(name, sizeof name, "%s/%s", l->name, suffix) >= (int)sizeof name)
        return top_error_set(ctx->err, TOP_ERR_LIMIT,
                             "layer '%s' (%s): the parameter name is "
                             "longer than %d bytes",
                             l->name, l->class_name, GRAPH_NAME_MAX - 1);
    if (name_find(ctx->weight_names, ctx->n_weights, name) >= 0)
        return top_error_set(ctx->err, TOP_ERR_FORMAT,
                             "layer '%s' (%s): the manifest has "
                             "weight '%s' but the layer config turns it off",
                             l->name, l->class_name, name);
    int64_t shape[1] = {c};
    tensor value;
    top_status st = tensor_init(&value, 1, shape, ctx->err);
    if (st != TOP_OK)
        return st;
    for (int i = 0; i < c; i++)
        value.data[i] = fill;
    st = graph_add_param(ctx->g, node, slot, name, PARAM_ROLE_STATISTIC, &value,
                         PARAM_LAYOUT_SAME, NULL, 0, ctx->err);
    tensor_free(&value);
    return st;
}

/* ---- layers ----------------------------------------------------------------- */

static const keras_layer *input_of(const keras_ctx *ctx, const keras_layer *l, int k)
{
    return &ctx->layers[l->in[k]];
}

static top_status require_rank(keras_ctx *ctx, const keras_layer *l, int rank)
{
    for (int k = 0; k < l->n_in; k++) {
        const keras_layer *in = input_of(ctx, l, k);
        if (in->rank != rank)
            return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                                 "layer '%s' (%s): input '%s' has rank %d, the importer "
                                 "supports this layer on rank-%d inputs only (%s)",
                                 l->name, l->class_name, in->name, in->rank, rank,
                                 rank == 3 ? "(height, width, channels)" : "(features)");
    }
    return TOP_OK;
}

static top_status require_inputs(keras_ctx *ctx, const keras_layer *l, int lo, int hi)
{
    if (l->n_in >= lo && l->n_in <= hi)
        return TOP_OK;
    return top_error_set(ctx->err, TOP_ERR_FORMAT,
                         "layer '%s' (%s): %d inbound tensors, the "
                         "layer takes %d to %d",
                         l->name, l->class_name, l->n_in, lo, hi);
}

static void set_output(keras_layer *l, int rank, int h, int w, int c)
{
    l->rank = rank;
    l->h = h, l->w = w, l->c = c;
}

static void copy_output(keras_layer *l, const keras_layer *from)
{
    set_output(l, from->rank, from->h, from->w, from->c);
    l->node = from->node;
}

/* Adds a node that reads the outputs of l's inbound layers and makes it l's output. */
static top_status add_layer_node(keras_ctx *ctx, keras_layer *l, op_kind op,
                                 const node_attrs *attrs)
{
    int inputs[GRAPH_MAX_INPUTS];
    for (int k = 0; k < l->n_in; k++)
        inputs[k] = input_of(ctx, l, k)->node;
    return graph_add_node(ctx->g, op, l->name, inputs, l->n_in, attrs, &l->node, ctx->err);
}

/*
 * Appends the node of a Keras activation after l's output node and makes it
 * the output; "linear" adds nothing. `name` names the new node.
 */
static top_status add_activation(keras_ctx *ctx, keras_layer *l, json_t *activation,
                                 const char *name)
{
    const char *s = json_string_value(activation);
    op_kind op = OP_COUNT;
    if (s && strcmp(s, "linear") == 0)
        return TOP_OK;
    if (s && strcmp(s, "relu") == 0)
        op = OP_RELU;
    else if (s && strcmp(s, "relu6") == 0)
        op = OP_RELU6;
    else if (s && strcmp(s, "sigmoid") == 0)
        op = OP_SIGMOID;
    else if (s && strcmp(s, "softmax") == 0)
        op = OP_SOFTMAX;
    if (op == OP_COUNT)
        return config_error(ctx, l, "activation", activation,
                            "one of linear, relu, relu6, sigmoid, softmax");
    /* The graph's softmax runs over the last dimension, which is W in NCHW. */
    if (op == OP_SOFTMAX && l->rank != 1)
        return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                             "layer '%s' (%s): softmax over "
                             "the channels of a (height, width, channels) tensor is not "
                             "supported; only (features) tensors",
                             l->name, l->class_name);
    int input = l->node;
    return graph_add_node(ctx->g, op, name, &input, 1, NULL, &l->node, ctx->err);
}

/* The fused activation of Conv2D, DepthwiseConv2D and Dense, as node "<layer>/<name>". */
static top_status add_fused_activation(keras_ctx *ctx, keras_layer *l)
{
    json_t *activation = json_object_get(l->config, "activation");
    char name[GRAPH_NAME_MAX];
    const char *s = json_string_value(activation);
    if (!activation)
        return TOP_OK; /* Keras's default is linear */
    if (snprintf(name, sizeof name, "%s/%s", l->name, s ? s : "?") >= (int)sizeof name)
        return top_error_set(ctx->err, TOP_ERR_LIMIT,
                             "layer '%s' (%s): the activation node "
                             "name is longer than %d bytes",
                             l->name, l->class_name, GRAPH_NAME_MAX - 1);
    return add_activation(ctx, l, activation, name);
}

/*
 * Output size and padding along one axis of a window op (conv or pool), with
 * Keras's "same" rule: the extra padded row or column goes at the end.
 */
static top_status window_axis(keras_ctx *ctx, const keras_layer *l, const char *axis, int in,
                              int k, int stride, int dilation, int same, int pads[2], int *out)
{
    int64_t extent = (int64_t)(k - 1) * dilation + 1;
    if (same) {
        int64_t o = (in + (int64_t)stride - 1) / stride;
        int64_t total = (o - 1) * stride + extent - in;
        if (total < 0)
            total = 0;
        *out = (int)o;
        pads[0] = (int)(total / 2);
        pads[1] = (int)(total - total / 2);
        return TOP_OK;
    }
    if (extent > in)
        return top_error_set(ctx->err, TOP_ERR_SHAPE,
                             "layer '%s' (%s): the window spans %lld "
                             "along the %s but the input has %d (padding \"valid\")",
                             l->name, l->class_name, (long long)extent, axis, in);
    *out = (int)((in - extent) / stride + 1);
    pads[0] = pads[1] = 0;
    return TOP_OK;
}

/* Window geometry of a conv or pool layer from its config. */
typedef struct window {
    int k[2], stride[2], dilation[2];
    int pad_h[2], pad_w[2];
    int same;
    int out_h, out_w;
} window;

static top_status read_window(keras_ctx *ctx, const keras_layer *l, const char *size_key,
                              int has_dilation, window *win)
{
    const keras_layer *in = input_of(ctx, l, 0);
    top_status st = config_pair(ctx, l, size_key, 1, KERAS_MAX_KERNEL, win->k);
    json_t *strides = json_object_get(l->config, "strides");
    if (st == TOP_OK && !has_dilation && json_is_null(strides))
        win->stride[0] = win->k[0], win->stride[1] = win->k[1]; /* pooling default */
    else if (st == TOP_OK)
        st = config_pair(ctx, l, "strides", 1, KERAS_MAX_KERNEL, win->stride);
    win->dilation[0] = win->dilation[1] = 1;
    if (st == TOP_OK && has_dilation && json_object_get(l->config, "dilation_rate"))
        st = config_pair(ctx, l, "dilation_rate", 1, KERAS_MAX_KERNEL, win->dilation);
    if (st == TOP_OK)
        st = config_padding_mode(ctx, l, &win->same);
    if (st == TOP_OK)
        st = config_data_format(ctx, l);
    if (st != TOP_OK)
        return st;
    if ((win->stride[0] > 1 || win->stride[1] > 1) &&
        (win->dilation[0] > 1 || win->dilation[1] > 1))
        return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                             "layer '%s' (%s): strides (%d, %d) "
                             "and dilation_rate (%d, %d) are both above 1, which Keras does "
                             "not allow",
                             l->name, l->class_name, win->stride[0], win->stride[1],
                             win->dilation[0], win->dilation[1]);
    st = window_axis(ctx, l, "height", in->h, win->k[0], win->stride[0], win->dilation[0],
                     win->same, win->pad_h, &win->out_h);
    if (st == TOP_OK)
        st = window_axis(ctx, l, "width", in->w, win->k[1], win->stride[1], win->dilation[1],
                         win->same, win->pad_w, &win->out_w);
    return st;
}

static void window_to_conv(conv2d_shape *conv, const window *win)
{
    conv->r = win->k[0], conv->s = win->k[1];
    conv->stride_h = win->stride[0], conv->stride_w = win->stride[1];
    conv->dilation_h = win->dilation[0], conv->dilation_w = win->dilation[1];
    conv->pad_top = win->pad_h[0], conv->pad_bottom = win->pad_h[1];
    conv->pad_left = win->pad_w[0], conv->pad_right = win->pad_w[1];
}

static top_status import_input(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"batch_input_shape", "batch_shape", "sparse", "ragged",
                                       NULL};
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = config_default(ctx, l, "sparse", json_false());
    if (st == TOP_OK)
        st = config_default(ctx, l, "ragged", json_false());
    if (st != TOP_OK)
        return st;
    const char *key =
        json_object_get(l->config, "batch_input_shape") ? "batch_input_shape" : "batch_shape";
    json_t *shape = json_object_get(l->config, key);
    int dims[3];
    int limits[3] = {KERAS_MAX_SIDE, KERAS_MAX_SIDE, 3};
    int ok = json_is_array(shape) && json_array_size(shape) == 4 &&
             json_is_null(json_array_get(shape, 0));
    for (int d = 0; ok && d < 3; d++) {
        json_t *v = json_array_get(shape, (size_t)d + 1);
        ok = json_is_integer(v) && json_integer_value(v) >= 1 &&
             json_integer_value(v) <= limits[d];
        dims[d] = ok ? (int)json_integer_value(v) : 0;
    }
    if (!ok || (dims[2] != 1 && dims[2] != 3))
        return config_error(ctx, l, key, shape,
                            "[null, height, width, channels] with height "
                            "and width in [1, 8192] and 1 or 3 channels");

    node_attrs attrs = {0};
    attrs.conv.c = dims[2], attrs.conv.h = dims[0], attrs.conv.w = dims[1];
    st = graph_add_node(ctx->g, OP_INPUT, l->name, NULL, 0, &attrs, &l->node, ctx->err);
    if (st != TOP_OK)
        return st;
    set_output(l, 3, dims[0], dims[1], dims[2]);
    graph_preprocess *pp = &ctx->g->preprocess;
    pp->channels = dims[2], pp->height = dims[0], pp->width = dims[1];
    pp->align_corners = 1;
    pp->resize_short_side = 0;
    pp->scale = 1.0f / 255.0f;
    for (int c = 0; c < 3; c++)
        pp->mean[c] = 0.0f, pp->std[c] = 1.0f;
    return TOP_OK;
}

/* Conv2D and DepthwiseConv2D. */
static top_status import_conv(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"filters",          "kernel_size", "strides",
                                       "padding",          "data_format", "dilation_rate",
                                       "activation",       "use_bias",    "groups",
                                       "depth_multiplier", NULL};
    int depthwise = strcmp(l->class_name, "DepthwiseConv2D") == 0;
    const keras_layer *in = input_of(ctx, l, 0);
    int filters = 0, multiplier = 1, groups = 1, use_bias = 1;
    window win;
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK && depthwise)
        st = config_int(ctx, l, "depth_multiplier", 0, 1, 1, KERAS_MAX_CHANNELS, &multiplier);
    else if (st == TOP_OK)
        st = config_int(ctx, l, "filters", 1, 0, 1, KERAS_MAX_CHANNELS, &filters);
    if (st == TOP_OK && !depthwise)
        st = config_int(ctx, l, "groups", 0, 1, 1, 1, &groups);
    if (st == TOP_OK && depthwise && json_object_get(l->config, "filters"))
        st = config_default(ctx, l, "filters", NULL);
    if (st == TOP_OK)
        st = config_bool(ctx, l, "use_bias", 1, &use_bias);
    if (st == TOP_OK)
        st = read_window(ctx, l, "kernel_size", 1, &win);
    if (st != TOP_OK)
        return st;
    if (depthwise && (int64_t)in->c * multiplier > KERAS_MAX_CHANNELS)
        return top_error_set(ctx->err, TOP_ERR_LIMIT,
                             "layer '%s' (%s): %d channels times "
                             "depth_multiplier %d exceed the limit of %d",
                             l->name, l->class_name, in->c, multiplier, KERAS_MAX_CHANNELS);

    node_attrs attrs = {0};
    window_to_conv(&attrs.conv, &win);
    attrs.conv.k = depthwise ? in->c * multiplier : filters;
    attrs.conv.groups = depthwise ? in->c : 1;
    st = add_layer_node(ctx, l, OP_CONV2D, &attrs);
    weight_request kernel = {depthwise ? "depthwise_kernel" : "kernel",
                             4,
                             {win.k[0], win.k[1], in->c, depthwise ? multiplier : filters},
                             depthwise ? PARAM_LAYOUT_HWC1 : PARAM_LAYOUT_HWIO,
                             PARAM_WEIGHT,
                             PARAM_ROLE_WEIGHT};
    weight_request bias = {"bias",         1, {attrs.conv.k}, PARAM_LAYOUT_SAME, PARAM_BIAS,
                           PARAM_ROLE_BIAS};
    if (st == TOP_OK)
        st = take_weight(ctx, l, l->node, &kernel);
    if (st == TOP_OK && use_bias)
        st = take_weight(ctx, l, l->node, &bias);
    if (st != TOP_OK)
        return st;
    set_output(l, 3, win.out_h, win.out_w, attrs.conv.k);
    return add_fused_activation(ctx, l);
}

static top_status read_batchnorm_axis(keras_ctx *ctx, const keras_layer *l, int rank)
{
    json_t *axis = json_object_get(l->config, "axis");
    json_t *v =
        json_is_array(axis) && json_array_size(axis) == 1 ? json_array_get(axis, 0) : axis;
    if (!axis ||
        (json_is_integer(v) && (json_integer_value(v) == -1 || json_integer_value(v) == rank)))
        return TOP_OK;
    return config_error(ctx, l, "axis", axis,
                        rank == 3 ? "-1 or 3 (the channels)" : "-1 or 1 (the features)");
}

static top_status import_batchnorm(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"axis",
                                       "momentum",
                                       "epsilon",
                                       "center",
                                       "scale",
                                       "renorm",
                                       "renorm_clipping",
                                       "renorm_momentum",
                                       "fused",
                                       "virtual_batch_size",
                                       "adjustment",
                                       "synchronized",
                                       NULL};
    const keras_layer *in = input_of(ctx, l, 0);
    int center = 1, scale = 1;
    double eps = 1e-3, momentum;
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = read_batchnorm_axis(ctx, l, in->rank);
    if (st == TOP_OK)
        st = config_number(ctx, l, "epsilon", 1e-3, 1e-12, 1.0, &eps);
    if (st == TOP_OK)
        st = config_number(ctx, l, "momentum", 0.99, 0.0, 1.0, &momentum);
    if (st == TOP_OK)
        st = config_bool(ctx, l, "center", 1, &center);
    if (st == TOP_OK)
        st = config_bool(ctx, l, "scale", 1, &scale);
    if (st == TOP_OK)
        st = config_default(ctx, l, "renorm", json_false());
    if (st == TOP_OK)
        st = config_default(ctx, l, "synchronized", json_false());
    if (st == TOP_OK)
        st = config_default(ctx, l, "virtual_batch_size", NULL);
    if (st == TOP_OK)
        st = config_default(ctx, l, "adjustment", NULL);
    if (st != TOP_OK)
        return st;

    node_attrs attrs = {0};
    attrs.eps = (float)eps;
    st = add_layer_node(ctx, l, OP_BATCHNORM, &attrs);
    weight_request gamma = {"gamma",           1,           {in->c},
                            PARAM_LAYOUT_SAME, PARAM_GAMMA, PARAM_ROLE_NORM};
    weight_request beta = {"beta", 1, {in->c}, PARAM_LAYOUT_SAME, PARAM_BETA, PARAM_ROLE_NORM};
    weight_request mean = {"moving_mean",     1,          {in->c},
                           PARAM_LAYOUT_SAME, PARAM_MEAN, PARAM_ROLE_STATISTIC};
    weight_request var = {"moving_variance", 1,         {in->c},
                          PARAM_LAYOUT_SAME, PARAM_VAR, PARAM_ROLE_STATISTIC};
    if (st == TOP_OK)
        st = scale ? take_weight(ctx, l, l->node, &gamma)
                   : add_constant(ctx, l, l->node, PARAM_GAMMA, "gamma", in->c, 1.0f);
    if (st == TOP_OK)
        st = center ? take_weight(ctx, l, l->node, &beta)
                    : add_constant(ctx, l, l->node, PARAM_BETA, "beta", in->c, 0.0f);
    if (st == TOP_OK)
        st = take_weight(ctx, l, l->node, &mean);
    if (st == TOP_OK)
        st = take_weight(ctx, l, l->node, &var);
    if (st == TOP_OK)
        set_output(l, in->rank, in->h, in->w, in->c);
    return st;
}

static top_status import_relu(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"max_value", "negative_slope", "threshold", NULL};
    double slope, threshold;
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = config_number(ctx, l, "negative_slope", 0.0, 0.0, 0.0, &slope);
    if (st == TOP_OK)
        st = config_number(ctx, l, "threshold", 0.0, 0.0, 0.0, &threshold);
    if (st != TOP_OK)
        return st;
    json_t *max_value = json_object_get(l->config, "max_value");
    op_kind op = OP_RELU;
    if (json_is_number(max_value) && json_number_value(max_value) == 6.0)
        op = OP_RELU6;
    else if (max_value && !json_is_null(max_value))
        return config_error(ctx, l, "max_value", max_value, "null or 6");
    st = add_layer_node(ctx, l, op, NULL);
    if (st == TOP_OK) {
        const keras_layer *in = input_of(ctx, l, 0);
        set_output(l, in->rank, in->h, in->w, in->c);
    }
    return st;
}

static top_status import_activation(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"activation", NULL};
    top_status st = config_check_keys(ctx, l, keys);
    if (st != TOP_OK)
        return st;
    json_t *activation = json_object_get(l->config, "activation");
    if (!activation)
        return config_error(ctx, l, "activation", NULL, "an activation name");
    /* "linear" is the identity: the layer's output is its input's node. */
    copy_output(l, input_of(ctx, l, 0));
    return add_activation(ctx, l, activation, l->name);
}

/* ZeroPadding2D's padding: n, [h, w] or [[top, bottom], [left, right]]. */
static top_status read_zero_padding(keras_ctx *ctx, const keras_layer *l, int pads[4])
{
    json_t *v = json_object_get(l->config, "padding");
    json_t *items[4] = {v, v, v, v};
    if (json_is_array(v) && json_array_size(v) == 2) {
        for (int a = 0; a < 2; a++) {
            json_t *axis = json_array_get(v, (size_t)a);
            int pair = json_is_array(axis) && json_array_size(axis) == 2;
            items[2 * a] = pair ? json_array_get(axis, 0) : axis;
            items[2 * a + 1] = pair ? json_array_get(axis, 1) : axis;
        }
    } else if (json_is_array(v)) {
        items[0] = NULL;
    }
    for (int i = 0; i < 4; i++) {
        if (!json_is_integer(items[i]) || json_integer_value(items[i]) < 0 ||
            json_integer_value(items[i]) > KERAS_MAX_PADDING)
            return config_error(ctx, l, "padding", v,
                                "n, [h, w] or [[top, bottom], [left, "
                                "right]] with integers in [0, 4096]");
        pads[i] = (int)json_integer_value(items[i]);
    }
    return TOP_OK;
}

static top_status import_zeropad(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"padding", "data_format", NULL};
    const keras_layer *in = input_of(ctx, l, 0);
    int pads[4];
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = config_data_format(ctx, l);
    if (st == TOP_OK)
        st = read_zero_padding(ctx, l, pads);
    if (st != TOP_OK)
        return st;
    node_attrs attrs = {0};
    attrs.pad_top = pads[0], attrs.pad_bottom = pads[1];
    attrs.pad_left = pads[2], attrs.pad_right = pads[3];
    st = add_layer_node(ctx, l, OP_ZEROPAD, &attrs);
    if (st == TOP_OK)
        set_output(l, 3, in->h + pads[0] + pads[1], in->w + pads[2] + pads[3], in->c);
    return st;
}

/* Add and Concatenate. */
static top_status import_merge(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"axis", NULL};
    int concat = strcmp(l->class_name, "Concatenate") == 0;
    const keras_layer *first = input_of(ctx, l, 0);
    int axis = -1;
    int64_t channels = 0;
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = require_inputs(ctx, l, 2, GRAPH_MAX_INPUTS);
    if (st == TOP_OK && concat)
        st = config_int(ctx, l, "axis", 0, -1, -1, 3, &axis);
    else if (st == TOP_OK && json_object_get(l->config, "axis"))
        st = config_error(ctx, l, "axis", json_object_get(l->config, "axis"), "no axis");
    if (st == TOP_OK && concat && (axis == 0 || axis == 1 || axis == 2))
        st = config_error(ctx, l, "axis", json_object_get(l->config, "axis"),
                          "-1 or 3 (the channels)");
    if (st == TOP_OK && concat)
        st = require_rank(ctx, l, 3);
    for (int k = 0; st == TOP_OK && k < l->n_in; k++) {
        const keras_layer *in = input_of(ctx, l, k);
        channels += in->c;
        if (in->rank != first->rank || in->h != first->h || in->w != first->w ||
            (!concat && in->c != first->c))
            st = top_error_set(ctx->err, TOP_ERR_SHAPE,
                               "layer '%s' (%s): input '%s' is "
                               "(%d, %d, %d) but input '%s' is (%d, %d, %d)",
                               l->name, l->class_name, in->name, in->h, in->w, in->c,
                               first->name, first->h, first->w, first->c);
    }
    if (st == TOP_OK && channels > (int64_t)KERAS_MAX_ACTIVATION)
        st = top_error_set(ctx->err, TOP_ERR_LIMIT, "layer '%s' (%s): %lld channels in all",
                           l->name, l->class_name, (long long)channels);
    if (st == TOP_OK)
        st = add_layer_node(ctx, l, concat ? OP_CONCAT : OP_ADD, NULL);
    if (st == TOP_OK)
        set_output(l, first->rank, first->h, first->w, concat ? (int)channels : first->c);
    return st;
}

/*
 * Returns 1 if an average pool covers its whole unpadded input and only
 * Flatten layers read it. It then equals a global average pool, which the
 * importer uses instead so the model also runs at other input sizes (the
 * nsfwjs MobileNetV2 ends in a 7x7 AveragePooling2D sized for 224 px).
 */
static int pools_whole_input_into_flatten(const keras_ctx *ctx, const keras_layer *l,
                                          const window *win)
{
    const keras_layer *in = input_of(ctx, l, 0);
    if (win->same || win->k[0] != in->h || win->k[1] != in->w || win->out_h != 1 ||
        win->out_w != 1)
        return 0;
    int readers = 0;
    for (int i = 0; i < ctx->n_layers; i++)
        for (int k = 0; k < ctx->layers[i].n_in; k++)
            if (&ctx->layers[ctx->layers[i].in[k]] == l) {
                if (strcmp(ctx->layers[i].class_name, "Flatten") != 0)
                    return 0;
                readers++;
            }
    return readers > 0;
}

/* MaxPooling2D and AveragePooling2D. */
static top_status import_pool(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"pool_size", "strides", "padding", "data_format", NULL};
    window win;
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = read_window(ctx, l, "pool_size", 0, &win);
    if (st != TOP_OK)
        return st;
    node_attrs attrs = {0};
    pool2d_shape *pool = &attrs.pool;
    pool->r = win.k[0], pool->s = win.k[1];
    pool->stride_h = win.stride[0], pool->stride_w = win.stride[1];
    pool->pad_top = win.pad_h[0], pool->pad_bottom = win.pad_h[1];
    pool->pad_left = win.pad_w[0], pool->pad_right = win.pad_w[1];
    pool->count_include_pad = !win.same; /* "same" divides by the in-bounds count */
    int max = strcmp(l->class_name, "MaxPooling2D") == 0;
    if (!max && pools_whole_input_into_flatten(ctx, l, &win))
        st = add_layer_node(ctx, l, OP_GLOBAL_AVGPOOL, NULL);
    else
        st = add_layer_node(ctx, l, max ? OP_MAXPOOL : OP_AVGPOOL, &attrs);
    if (st == TOP_OK)
        set_output(l, 3, win.out_h, win.out_w, input_of(ctx, l, 0)->c);
    return st;
}

static top_status import_global_avgpool(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"data_format", "keepdims", NULL};
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = config_data_format(ctx, l);
    if (st == TOP_OK)
        st = config_default(ctx, l, "keepdims", json_false());
    if (st == TOP_OK)
        st = add_layer_node(ctx, l, OP_GLOBAL_AVGPOOL, NULL);
    if (st == TOP_OK)
        set_output(l, 1, 1, 1, input_of(ctx, l, 0)->c);
    return st;
}

static top_status import_dense(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"units", "activation", "use_bias", NULL};
    const keras_layer *in = input_of(ctx, l, 0);
    int units = 0, use_bias = 1;
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = config_int(ctx, l, "units", 1, 0, 1, KERAS_MAX_CHANNELS, &units);
    if (st == TOP_OK)
        st = config_bool(ctx, l, "use_bias", 1, &use_bias);
    if (st != TOP_OK)
        return st;
    node_attrs attrs = {0};
    attrs.dense_out = units;
    st = add_layer_node(ctx, l, OP_DENSE, &attrs);
    weight_request kernel = {"kernel",         2, {in->c, units}, PARAM_LAYOUT_IO, PARAM_WEIGHT,
                             PARAM_ROLE_WEIGHT};
    weight_request bias = {"bias", 1, {units}, PARAM_LAYOUT_SAME, PARAM_BIAS, PARAM_ROLE_BIAS};
    if (st == TOP_OK)
        st = take_weight(ctx, l, l->node, &kernel);
    if (st == TOP_OK && use_bias)
        st = take_weight(ctx, l, l->node, &bias);
    if (st != TOP_OK)
        return st;
    set_output(l, 1, 1, 1, units);
    return add_fused_activation(ctx, l);
}

static top_status import_dropout(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"rate", "noise_shape", "seed", NULL};
    double rate = 0;
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = config_number(ctx, l, "rate", 0.0, 0.0, 1.0, &rate);
    if (st == TOP_OK && rate >= 1.0)
        st = config_error(ctx, l, "rate", json_object_get(l->config, "rate"),
                          "a number in [0, 1)");
    if (st == TOP_OK)
        st = config_default(ctx, l, "noise_shape", NULL);
    if (st != TOP_OK)
        return st;
    node_attrs attrs = {0};
    attrs.dropout_rate = (float)rate;
    st = add_layer_node(ctx, l, OP_DROPOUT, &attrs);
    if (st == TOP_OK) {
        const keras_layer *in = input_of(ctx, l, 0);
        set_output(l, in->rank, in->h, in->w, in->c);
    }
    return st;
}

static top_status import_flatten(keras_ctx *ctx, keras_layer *l)
{
    static const char *const keys[] = {"data_format", NULL};
    const keras_layer *in = input_of(ctx, l, 0);
    top_status st = config_check_keys(ctx, l, keys);
    if (st == TOP_OK)
        st = config_data_format(ctx, l);
    if (st != TOP_OK)
        return st;
    node_attrs attrs = {0};
    attrs.flatten_nhwc = 1; /* Keras flattens (H, W, C) in that order */
    st = add_layer_node(ctx, l, OP_FLATTEN, &attrs);
    if (st == TOP_OK)
        set_output(l, 1, 1, 1, in->h * in->w * in->c);
    return st;
}

typedef struct layer_kind {
    const char *class_name;
    keras_import_fn import;
    int rank; /* required input rank, 0 for any */
    int min_inputs, max_inputs;
} layer_kind;

static const layer_kind layer_table[] = {
    {"InputLayer", import_input, 0, 0, 0},
    {"Conv2D", import_conv, 3, 1, 1},
    {"DepthwiseConv2D", import_conv, 3, 1, 1},
    {"BatchNormalization", import_batchnorm, 0, 1, 1},
    {"ReLU", import_relu, 0, 1, 1},
    {"Activation", import_activation, 0, 1, 1},
    {"ZeroPadding2D", import_zeropad, 3, 1, 1},
    {"Add", import_merge, 0, 2, GRAPH_MAX_INPUTS},
    {"Concatenate", import_merge, 3, 2, GRAPH_MAX_INPUTS},
    {"MaxPooling2D", import_pool, 3, 1, 1},
    {"AveragePooling2D", import_pool, 3, 1, 1},
    {"GlobalAveragePooling2D", import_global_avgpool, 3, 1, 1},
    {"Dense", import_dense, 1, 1, 1},
    {"Dropout", import_dropout, 0, 1, 1},
    {"Flatten", import_flatten, 0, 1, 1},
};

static const layer_kind *find_layer_kind(const char *class_name)
{
    for (size_t i = 0; i < sizeof layer_table / sizeof layer_table[0]; i++)
        if (strcmp(layer_table[i].class_name, class_name) == 0)
            return &layer_table[i];
    return NULL;
}

/* Imports one layer whose inbound layers are already imported. */
static top_status import_layer(keras_ctx *ctx, keras_layer *l)
{
    const layer_kind *kind = find_layer_kind(l->class_name);
    top_status st = require_inputs(ctx, l, kind->min_inputs, kind->max_inputs);
    if (st == TOP_OK && kind->rank)
        st = require_rank(ctx, l, kind->rank);
    if (st == TOP_OK)
        st = kind->import(ctx, l);
    if (st != TOP_OK)
        return st;
    size_t numel;
    if (top_size_mul(&numel, (size_t)l->h, (size_t)l->w) ||
        top_size_mul(&numel, numel, (size_t)l->c) || numel > KERAS_MAX_ACTIVATION)
        return top_error_set(ctx->err, TOP_ERR_LIMIT,
                             "layer '%s' (%s): the output (%d, %d, "
                             "%d) has more than %zu elements per sample",
                             l->name, l->class_name, l->h, l->w, l->c, KERAS_MAX_ACTIVATION);
    l->done = 1;
    return TOP_OK;
}

/* ---- topology ----------------------------------------------------------------- */

/* Reads a layer's one inbound node: [[name, 0, 0, {}], ...]. */
static top_status parse_inbound(keras_ctx *ctx, keras_layer *l, json_t *inbound)
{
    char shown[96];
    if (!json_is_array(inbound))
        return top_error_set(ctx->err, TOP_ERR_FORMAT,
                             "layer '%s' (%s): inbound_nodes is %s; "
                             "expected an array",
                             l->name, l->class_name, json_brief(shown, sizeof shown, inbound));
    if (json_array_size(inbound) == 0)
        return TOP_OK;
    if (json_array_size(inbound) > 1)
        return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                             "layer '%s' (%s) is called %zu "
                             "times; shared layers are not supported",
                             l->name, l->class_name, json_array_size(inbound));
    json_t *node = json_array_get(inbound, 0);
    if (!json_is_array(node) || json_array_size(node) < 1 ||
        json_array_size(node) > GRAPH_MAX_INPUTS)
        return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                             "layer '%s' (%s): inbound node %s "
                             "is not a list of 1 to %d [layer, node, tensor, kwargs] entries "
                             "(the Keras 2 format)",
                             l->name, l->class_name, json_brief(shown, sizeof shown, node),
                             GRAPH_MAX_INPUTS);
    size_t k;
    json_t *entry;
    json_array_foreach(node, k, entry)
    {
        json_t *kwargs = json_array_get(entry, 3);
        int ok = json_is_array(entry) &&
                 (json_array_size(entry) == 3 || json_array_size(entry) == 4) &&
                 json_is_string(json_array_get(entry, 0)) &&
                 json_is_integer(json_array_get(entry, 1)) &&
                 json_integer_value(json_array_get(entry, 1)) == 0 &&
                 json_is_integer(json_array_get(entry, 2)) &&
                 json_integer_value(json_array_get(entry, 2)) == 0 &&
                 (!kwargs || (json_is_object(kwargs) && json_object_size(kwargs) == 0));
        if (!ok)
            return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                                 "layer '%s' (%s): inbound "
                                 "entry %s is not supported; expected [layer name, 0, 0, {}]",
                                 l->name, l->class_name,
                                 json_brief(shown, sizeof shown, entry));
        const char *from = json_string_value(json_array_get(entry, 0));
        int index = name_find(ctx->layer_names, ctx->n_layers, from);
        if (index < 0)
            return top_error_set(ctx->err, TOP_ERR_NOT_FOUND,
                                 "layer '%s' (%s): inbound layer "
                                 "'%s' does not exist",
                                 l->name, l->class_name, from);
        l->in[l->n_in++] = index;
    }
    return TOP_OK;
}

static top_status parse_layer(keras_ctx *ctx, keras_layer *l, json_t *layer, size_t i)
{
    char shown[96];
    memset(l, 0, sizeof *l);
    l->name = json_string_value(json_object_get(layer, "name"));
    l->class_name = json_string_value(json_object_get(layer, "class_name"));
    l->config = json_object_get(layer, "config");
    l->node = -1;
    if (!l->name || !l->name[0] || !l->class_name || !json_is_object(l->config))
        return top_error_set(ctx->err, TOP_ERR_FORMAT,
                             "model.json: layer %zu (%s) needs a "
                             "non-empty name, a class_name and a config object",
                             i, json_brief(shown, sizeof shown, layer));
    if (strlen(l->name) >= GRAPH_NAME_MAX - 32)
        return top_error_set(ctx->err, TOP_ERR_LIMIT,
                             "model.json: layer %zu's name '%.40s...' "
                             "is longer than %d bytes",
                             i, l->name, GRAPH_NAME_MAX - 33);
    if (!find_layer_kind(l->class_name))
        return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                             "layer '%s': layer type '%s' is "
                             "not supported by the Keras importer",
                             l->name, l->class_name);
    return TOP_OK;
}

static top_status parse_layers(keras_ctx *ctx, json_t *layers)
{
    if (!json_is_array(layers) || json_array_size(layers) == 0)
        return top_error_set(ctx->err, TOP_ERR_FORMAT,
                             "model.json: model_config.config.layers "
                             "is missing or empty");
    if (json_array_size(layers) > KERAS_MAX_LAYERS)
        return top_error_set(ctx->err, TOP_ERR_LIMIT, "model.json: %zu layers; the limit is %d",
                             json_array_size(layers), KERAS_MAX_LAYERS);
    size_t n = json_array_size(layers);
    ctx->layers = calloc(n, sizeof *ctx->layers);
    ctx->layer_names = calloc(n, sizeof *ctx->layer_names);
    if (!ctx->layers || !ctx->layer_names)
        return top_error_set(ctx->err, TOP_ERR_NOMEM, "allocating %zu layers failed", n);

    size_t i;
    json_t *layer;
    int inputs = 0;
    json_array_foreach(layers, i, layer)
    {
        top_status st = parse_layer(ctx, &ctx->layers[i], layer, i);
        if (st != TOP_OK)
            return st;
        ctx->layer_names[i] = (keras_name){ctx->layers[i].name, (int)i};
        inputs += strcmp(ctx->layers[i].class_name, "InputLayer") == 0;
    }
    ctx->n_layers = (int)n;
    if (inputs != 1)
        return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                             "model.json: %d InputLayer layers; "
                             "the importer supports models with exactly one input",
                             inputs);
    qsort(ctx->layer_names, n, sizeof *ctx->layer_names, name_compare);
    for (size_t k = 1; k < n; k++)
        if (strcmp(ctx->layer_names[k - 1].name, ctx->layer_names[k].name) == 0)
            return top_error_set(ctx->err, TOP_ERR_FORMAT,
                                 "model.json: layer name '%s' is used "
                                 "twice",
                                 ctx->layer_names[k].name);
    json_array_foreach(layers, i, layer)
    {
        top_status st =
            parse_inbound(ctx, &ctx->layers[i], json_object_get(layer, "inbound_nodes"));
        if (st != TOP_OK)
            return st;
    }
    return TOP_OK;
}

/*
 * Imports the layers so that each follows its inbound layers (Kahn's
 * algorithm; ready layers go in the order the file lists them).
 */
static top_status import_in_order(keras_ctx *ctx)
{
    int n = ctx->n_layers, edges = 0, head = 0, tail = 0;
    top_status st = TOP_OK;
    for (int i = 0; i < n; i++)
        edges += ctx->layers[i].n_in;
    int *pending = calloc((size_t)n, sizeof *pending); /* inbound layers not done */
    int *start = calloc((size_t)n + 1, sizeof *start); /* consumers of i: start[i].. */
    int *fill = calloc((size_t)n + 1, sizeof *fill);
    int *consumers = calloc((size_t)edges + 1, sizeof *consumers);
    int *queue = calloc((size_t)n, sizeof *queue);
    if (!pending || !start || !fill || !consumers || !queue) {
        st = top_error_set(ctx->err, TOP_ERR_NOMEM, "allocating the layer order failed");
        goto done;
    }

    for (int i = 0; i < n; i++)
        for (int k = 0; k < ctx->layers[i].n_in; k++)
            start[ctx->layers[i].in[k] + 1]++;
    for (int i = 0; i < n; i++)
        fill[i + 1] = start[i + 1] += start[i];
    for (int i = 0; i < n; i++) {
        pending[i] = ctx->layers[i].n_in;
        for (int k = 0; k < ctx->layers[i].n_in; k++)
            consumers[fill[ctx->layers[i].in[k]]++] = i;
        if (pending[i] == 0)
            queue[tail++] = i;
    }

    while (head < tail && st == TOP_OK) {
        int i = queue[head++];
        st = import_layer(ctx, &ctx->layers[i]);
        for (int e = start[i]; st == TOP_OK && e < start[i + 1]; e++)
            if (--pending[consumers[e]] == 0)
                queue[tail++] = consumers[e];
    }
    for (int i = 0; st == TOP_OK && i < n; i++)
        if (!ctx->layers[i].done)
            st = top_error_set(ctx->err, TOP_ERR_FORMAT,
                               "layer '%s' (%s) depends on itself "
                               "through its inbound layers; the topology has a cycle",
                               ctx->layers[i].name, ctx->layers[i].class_name);
done:
    free(pending);
    free(start);
    free(fill);
    free(consumers);
    free(queue);
    return st;
}

/* Reads input_layers or output_layers: exactly one [name, 0, 0]. */
static top_status parse_layer_ref(keras_ctx *ctx, json_t *config, const char *key, int *index)
{
    char shown[96];
    json_t *refs = json_object_get(config, key);
    json_t *ref = json_array_get(refs, 0);
    const char *name = json_string_value(json_array_get(ref, 0));
    *index = name ? name_find(ctx->layer_names, ctx->n_layers, name) : -1;
    if (!json_is_array(refs) || json_array_size(refs) != 1 || !json_is_array(ref) ||
        json_array_size(ref) != 3 || json_integer_value(json_array_get(ref, 1)) != 0 ||
        json_integer_value(json_array_get(ref, 2)) != 0 || *index < 0)
        return top_error_set(ctx->err, TOP_ERR_UNSUPPORTED,
                             "model.json: %s is %s; expected "
                             "one [layer name, 0, 0] of an existing layer",
                             key, json_brief(shown, sizeof shown, refs));
    return TOP_OK;
}

static top_status check_all_weights_used(keras_ctx *ctx)
{
    for (int i = 0; i < ctx->n_weights; i++)
        if (!ctx->weights[i].used)
            return top_error_set(ctx->err, TOP_ERR_FORMAT,
                                 "weights manifest: weight '%s' is "
                                 "not used by any layer; the manifest and the topology do not "
                                 "match",
                                 ctx->weights[i].name);
    return TOP_OK;
}

/* Names the architecture by the layer names the Keras applications use,
 * because exported models are usually named "model_1". */
static void set_architecture(keras_ctx *ctx, const char *model_name)
{
    graph *g = ctx->g;
    if (name_find(ctx->layer_names, ctx->n_layers, "Conv1") >= 0 &&
        name_find(ctx->layer_names, ctx->n_layers, "block_16_project") >= 0)
        snprintf(g->architecture, sizeof g->architecture, "keras:mobilenetv2");
    else if (name_find(ctx->layer_names, ctx->n_layers, "mixed10") >= 0)
        snprintf(g->architecture, sizeof g->architecture, "keras:inceptionv3");
    else
        snprintf(g->architecture, sizeof g->architecture, "keras:%.50s",
                 model_name && model_name[0] ? model_name : "functional");
}

/* The Keras model config inside a TF.js model.json. */
static json_t *model_config_of(json_t *root, top_error *err)
{
    json_t *topology = json_object_get(root, "modelTopology");
    json_t *config = json_object_get(topology, "model_config");
    if (!config)
        config = topology; /* some exporters store the model config directly */
    const char *class_name = json_string_value(json_object_get(config, "class_name"));
    if (!json_is_object(root) || !json_is_object(config) || !class_name) {
        top_error_set(err, TOP_ERR_FORMAT,
                      "model.json: modelTopology.model_config with a "
                      "class_name is missing; export the model as a TF.js layers model");
        return NULL;
    }
    if (strcmp(class_name, "Model") != 0 && strcmp(class_name, "Functional") != 0) {
        top_error_set(err, TOP_ERR_UNSUPPORTED,
                      "model.json: model class '%s' is not "
                      "supported; only functional models (Model, Functional)",
                      class_name);
        return NULL;
    }
    return json_object_get(config, "config");
}

static top_status import_model(graph **out, json_t *root, const unsigned char *data,
                               size_t data_len, top_error *err)
{
    keras_ctx ctx = {.data = data, .data_len = data_len, .err = err};
    int input = -1, output = -1;
    json_t *config = model_config_of(root, err);
    top_status st = config ? TOP_OK : (err ? err->status : TOP_ERR_FORMAT);
    if (st == TOP_OK)
        st = parse_manifest(&ctx, json_object_get(root, "weightsManifest"));
    if (st == TOP_OK)
        st = parse_layers(&ctx, json_object_get(config, "layers"));
    if (st == TOP_OK)
        st = parse_layer_ref(&ctx, config, "input_layers", &input);
    if (st == TOP_OK && strcmp(ctx.layers[input].class_name, "InputLayer") != 0)
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "model.json: input layer '%s' is a %s, not "
                           "an InputLayer",
                           ctx.layers[input].name, ctx.layers[input].class_name);
    if (st == TOP_OK)
        st = parse_layer_ref(&ctx, config, "output_layers", &output);
    if (st == TOP_OK)
        st = graph_new(&ctx.g, err);
    if (st == TOP_OK)
        st = import_in_order(&ctx);
    if (st == TOP_OK)
        st = check_all_weights_used(&ctx);
    if (st == TOP_OK) {
        ctx.g->output = ctx.layers[output].node;
        set_architecture(&ctx, json_string_value(json_object_get(config, "name")));
        st = graph_finalize(ctx.g, err);
    }
    if (st != TOP_OK) {
        graph_free(ctx.g);
        ctx.g = NULL;
    }
    *out = ctx.g;
    free(ctx.layers);
    free(ctx.layer_names);
    free(ctx.weights);
    free(ctx.weight_names);
    return st;
}

static top_status parse_json(json_t **root, const char *json, size_t len, const char *what,
                             top_error *err)
{
    if (len > KERAS_MAX_JSON_BYTES)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: %zu bytes; the limit for a model.json "
                             "is %zu",
                             what, len, KERAS_MAX_JSON_BYTES);
    json_error_t jerr;
    *root = json_loadb(json, len, JSON_REJECT_DUPLICATES, &jerr);
    if (!*root)
        return top_error_set(err, TOP_ERR_FORMAT, "%s: invalid JSON at line %d, column %d: %s",
                             what, jerr.line, jerr.column, jerr.text);
    return TOP_OK;
}

top_status keras_import_buffers(graph **out, const char *json, size_t json_len,
                                const unsigned char *weights, size_t weights_len,
                                top_error *err)
{
    if (!out)
        return top_error_set(err, TOP_ERR_INVALID, "keras_import_buffers: out is NULL");
    *out = NULL;
    if (!json || (!weights && weights_len))
        return top_error_set(err, TOP_ERR_INVALID,
                             "keras_import_buffers: json or weights is "
                             "NULL");
    json_t *root = NULL;
    top_status st = parse_json(&root, json, json_len, "model.json", err);
    if (st != TOP_OK)
        return st;
    static const unsigned char empty[1];
    st = import_model(out, root, weights ? weights : empty, weights_len, err);
    json_decref(root);
    return st;
}

/* ---- files ---------------------------------------------------------------------- */

/* Reads a whole file of at most `cap` bytes into a new buffer (*data). */
static top_status read_file(unsigned char **data, size_t *len, const char *path, size_t cap,
                            top_error *err)
{
    *data = NULL;
    *len = 0;
    top_error open_err;
    top_error_clear(&open_err);
    FILE *f = top_fopen_regular(path, &open_err);
    if (!f)
        return top_error_set(err, TOP_ERR_IO, "%s; run tools/fetch-models.sh or check the path",
                             open_err.message);
    struct stat sb;
    top_status st = TOP_OK;
    if (fstat(fileno(f), &sb) != 0 || !S_ISREG(sb.st_mode))
        st = top_error_set(err, TOP_ERR_IO, "%s is not a regular file", path);
    else if ((uint64_t)sb.st_size > cap)
        st = top_error_set(err, TOP_ERR_LIMIT, "%s has %lld bytes; the limit is %zu", path,
                           (long long)sb.st_size, cap);
    if (st == TOP_OK) {
        *len = (size_t)sb.st_size;
        *data = malloc(*len ? *len : 1);
        if (!*data)
            st = top_error_set(err, TOP_ERR_NOMEM, "allocating %zu bytes for %s failed", *len,
                               path);
        else if (fread(*data, 1, *len, f) != *len)
            st = top_error_set(err, TOP_ERR_IO, "reading %zu bytes from %s failed", *len, path);
    }
    fclose(f);
    if (st != TOP_OK) {
        free(*data);
        *data = NULL;
    }
    return st;
}

/* Joins the model.json folder and a manifest path, rejecting paths that leave it. */
static top_status shard_path(char *buf, size_t size, const char *model_json_path,
                             const char *path, top_error *err)
{
    if (!path || !path[0] || path[0] == '/' || strstr(path, "..") || strchr(path, '\\'))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: shard path '%s' must be a relative path "
                             "inside the model folder",
                             model_json_path, path ? path : "");
    const char *slash = strrchr(model_json_path, '/');
    int dir_len = slash ? (int)(slash - model_json_path + 1) : 0;
    if (snprintf(buf, size, "%.*s%s", dir_len, model_json_path, path) >= (int)size)
        return top_error_set(err, TOP_ERR_LIMIT, "%s: shard path '%s' is too long",
                             model_json_path, path);
    return TOP_OK;
}

/* Reads every shard of the manifest, in order, into one buffer. */
static top_status read_shards(unsigned char **data, size_t *len, json_t *manifest,
                              const char *model_json_path, top_error *err)
{
    size_t n_weights, n_paths, i, j;
    top_status st = manifest_count(manifest, &n_weights, &n_paths, err);
    json_t *group, *path;
    *data = NULL;
    *len = 0;
    json_array_foreach(manifest, i, group)
    {
        json_array_foreach(json_object_get(group, "paths"), j, path)
        {
            char full[4096];
            unsigned char *shard = NULL, *grown;
            size_t shard_len = 0;
            if (st == TOP_OK)
                st = shard_path(full, sizeof full, model_json_path, json_string_value(path),
                                err);
            if (st == TOP_OK)
                st = read_file(&shard, &shard_len, full, KERAS_MAX_WEIGHT_BYTES - *len, err);
            if (st != TOP_OK)
                break;
            grown = realloc(*data, *len + shard_len + 1);
            if (!grown) {
                free(shard);
                st = top_error_set(err, TOP_ERR_NOMEM, "allocating %zu bytes of weights failed",
                                   *len + shard_len);
                break;
            }
            *data = grown;
            memcpy(*data + *len, shard, shard_len);
            *len += shard_len;
            free(shard);
        }
    }
    return st;
}

top_status keras_import(graph **out, const char *model_json_path, top_error *err)
{
    if (!out || !model_json_path)
        return top_error_set(err, TOP_ERR_INVALID, "keras_import: out or the path is NULL");
    *out = NULL;
    unsigned char *text = NULL, *weights = NULL;
    size_t text_len = 0, weights_len = 0;
    json_t *root = NULL;
    top_status st = read_file(&text, &text_len, model_json_path, KERAS_MAX_JSON_BYTES, err);
    if (st != TOP_OK)
        goto done;
    st = parse_json(&root, (const char *)text, text_len, model_json_path, err);
    if (st != TOP_OK)
        goto done;
    st = read_shards(&weights, &weights_len, json_object_get(root, "weightsManifest"),
                     model_json_path, err);
    if (st == TOP_OK)
        st = import_model(out, root, weights, weights_len, err);
done:
    json_decref(root);
    free(text);
    free(weights);
    return st;
}

int keras_param_is_constant(const graph *g, int i)
{
    if (!g || i < 0 || i >= g->n_params)
        return 0;
    const graph_param *p = &g->params[i];
    return g->nodes[p->node].op == OP_BATCHNORM &&
           (p->slot == PARAM_GAMMA || p->slot == PARAM_BETA) && p->role == PARAM_ROLE_STATISTIC;
}
