/*
 * Tests of the TF.js layers-model export (core/tfjs_export.c).
 *
 * Without arguments: the real nsfwjs MobileNetV2 (from tools/fetch-models.sh)
 * and a hand-written model with a depthwise multiplier of 2 and a batch norm
 * without scale are exported and checked. An unpruned export must hold
 * exactly the source values in the source layout, decoded here from the
 * source shards independently of the importer. A pruned export must import
 * back into the same graph bit for bit and keep the source topology. The
 * errors are checked too: a PyTorch graph, a source that is not a model.json,
 * a missing or extra weight, a wrong shape, NaN, a FIFO target, the source
 * folder as the target.
 *
 * With `--export DIR IMAGE...`: writes the cases that tools/tfjs/check-export.js
 * checks with TF.js (tests/test_tfjs_export.sh runs both). Each case folder
 * DIR/<case>/ gets tfjs/ (the export of a pruned model), input.bin (the
 * preprocessed batch, (N, H, W, C) little-endian float32) and expected.json
 * (topiary's output probabilities on that batch and how each weight was
 * changed). Cases: mobilenet_v2 on the images, tiny on random inputs.
 */
#include "test.h"

#include <dirent.h>
#include <errno.h>
#include <ftw.h>
#include <jansson.h>
#include <stdint.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>

#include "graph.h"
#include "image.h"
#include "import_keras.h"
#include "model.h"
#include "safetensors.h"
#include "tfjs_export.h"

#define PRUNE_FRACTION 0.3

static char tmp_root[256];
static int tmp_count;

static const char *data_dir(void)
{
    const char *d = getenv("TOPIARY_DATA_DIR");
    return d && d[0] ? d : "data";
}

static void real_model_path(char *buf, size_t size)
{
    snprintf(buf, size, "%s/models/nsfwjs/mobilenet_v2/model.json", data_dir());
}

/* A new empty folder under tmp_root. */
static void new_dir(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "%s/%02d-%s", tmp_root, tmp_count++, name);
    if (mkdir(buf, 0777) != 0)
        TEST_FAIL_AT("cannot create %s: %s", buf, strerror(errno));
}

static int remove_entry(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb, (void)flag, (void)ftw;
    return remove(path);
}

static int read_bytes(const char *path, unsigned char **data, size_t *len)
{
    *data = NULL;
    *len = 0;
    FILE *f = fopen(path, "rb");
    if (!f)
        return -1;
    struct stat sb;
    if (fstat(fileno(f), &sb) != 0) {
        fclose(f);
        return -1;
    }
    *len = (size_t)sb.st_size;
    *data = malloc(*len ? *len : 1);
    int ok = *data && fread(*data, 1, *len, f) == *len;
    fclose(f);
    if (!ok) {
        free(*data);
        *data = NULL;
        return -1;
    }
    return 0;
}

static float f32_at(const unsigned char *p)
{
    uint32_t bits =
        (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
    float v;
    memcpy(&v, &bits, sizeof v);
    return v;
}

static void put_f32(FILE *f, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    for (int b = 0; b < 4; b++)
        fputc((int)(bits >> (8 * b)) & 0xff, f);
}

static graph *load_real(void)
{
    char path[1024];
    real_model_path(path, sizeof path);
    if (access(path, R_OK) != 0) {
        TEST_FAIL_AT("%s is missing; run tools/fetch-models.sh (or set TOPIARY_DATA_DIR)",
                     path);
        return NULL;
    }
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    if (model_load(&g, path, &err) != TOP_OK)
        TEST_FAIL_AT("model_load(%s): %s", path, err.message);
    return g;
}

/* Runs the export and records a failure with its message. Returns 1 on success. */
static int export_ok(const graph *g, const char *source, const char *dir)
{
    top_error err;
    top_error_clear(&err);
    top_status st = tfjs_export_write(g, source, dir, &err);
    CHECK_MSG(st == TOP_OK, "tfjs_export_write(%s -> %s): %s", source, dir, err.message);
    return st == TOP_OK;
}

/* Runs the export, expects status `want` and a message containing `part`,
 * and checks that no model.json appeared in dir. */
static void export_fails(const graph *g, const char *source, const char *dir, top_status want,
                         const char *part)
{
    top_error err;
    top_error_clear(&err);
    top_status st = tfjs_export_write(g, source, dir, &err);
    CHECK_MSG(st == want, "status %s, expected %s (%s)", top_status_str(st),
              top_status_str(want), err.message);
    CHECK_MSG(strstr(err.message, part) != NULL, "message '%s' lacks '%s'", err.message, part);
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, TFJS_EXPORT_MODEL_JSON);
    struct stat sb;
    CHECK_MSG(lstat(path, &sb) != 0 || !S_ISREG(sb.st_mode), "%s was written", path);
}

/* Counts the entries of dir whose name contains ".tmp.". */
static int count_temp_files(const char *dir)
{
    DIR *d = opendir(dir);
    if (!d)
        return -1;
    int n = 0;
    for (struct dirent *e = readdir(d); e; e = readdir(d))
        n += strstr(e->d_name, ".tmp.") != NULL;
    closedir(d);
    return n;
}

/* ---- pruning the way a job would ------------------------------------------------- */

static int compare_float(const void *a, const void *b)
{
    float x = *(const float *)a, y = *(const float *)b;
    return (x > y) - (x < y);
}

/*
 * Zeroes, in every prunable weight, the elements whose magnitude is at most
 * the PRUNE_FRACTION quantile of its magnitudes. Records {"kind": "pruned",
 * "threshold": t} per weight in `kinds` when it is not NULL. Returns the
 * number of zeroed elements.
 */
static size_t prune_by_magnitude(graph *g, json_t *kinds)
{
    size_t zeroed = 0;
    for (int p = 0; p < g->n_params; p++) {
        if (!graph_param_is_prunable(g, p))
            continue;
        tensor *t = &g->params[p].value;
        float *mag = malloc(t->numel * sizeof *mag);
        if (!mag) {
            TEST_FAIL_AT("out of memory for %zu magnitudes", t->numel);
            return zeroed;
        }
        for (size_t i = 0; i < t->numel; i++)
            mag[i] = fabsf(t->data[i]);
        qsort(mag, t->numel, sizeof *mag, compare_float);
        float threshold = mag[(size_t)(PRUNE_FRACTION * (double)(t->numel - 1))];
        free(mag);
        for (size_t i = 0; i < t->numel; i++)
            if (fabsf(t->data[i]) <= threshold) {
                t->data[i] = 0.0f;
                zeroed++;
            }
        if (kinds)
            json_object_set_new(
                kinds, g->params[p].name,
                json_pack("{s:s, s:f}", "kind", "pruned", "threshold", (double)threshold));
    }
    return zeroed;
}

/* Shifts the running means and scales the running variances of the batch
 * norms whose names start with prefix, as a batch-norm correction would. */
static int perturb_statistics(graph *g, const char *prefix, json_t *kinds)
{
    int changed = 0;
    for (int p = 0; p < g->n_params; p++) {
        graph_param *gp = &g->params[p];
        if (gp->role != PARAM_ROLE_STATISTIC || keras_param_is_constant(g, p) ||
            strncmp(gp->name, prefix, strlen(prefix)) != 0)
            continue;
        for (size_t i = 0; i < gp->value.numel; i++)
            gp->value.data[i] =
                gp->slot == PARAM_VAR ? gp->value.data[i] * 1.25f : gp->value.data[i] + 0.05f;
        if (kinds)
            json_object_set_new(kinds, gp->name, json_pack("{s:s}", "kind", "modified"));
        changed++;
    }
    return changed;
}

/* ---- a hand-written model ---------------------------------------------------------- */

/*
 * input (5, 4, 3) -> DepthwiseConv2D 3x3 "same", multiplier 2, with bias
 * -> BatchNormalization with scale = false -> Conv2D 2 filters 1x2 "valid"
 * -> GlobalAveragePooling2D -> Dense 3 + softmax. Every weight is float32;
 * the manifest is in two groups (the second with two shards), out of layer
 * order.
 */
static const char tiny_json[] =
    "{\"format\": \"layers-model\", \"generatedBy\": \"hand\", \"convertedBy\": null,"
    " \"modelTopology\": {\"class_name\": \"Model\", \"config\": {\"name\": \"tiny\", "
    "\"layers\": ["
    "{\"name\": \"x\", \"class_name\": \"InputLayer\", \"config\": {\"name\": \"x\", "
    "\"batch_input_shape\": [null, 5, 4, 3], \"dtype\": \"float32\", \"sparse\": false}, "
    "\"inbound_nodes\": []},"
    "{\"name\": \"dw\", \"class_name\": \"DepthwiseConv2D\", \"config\": {\"name\": \"dw\", "
    "\"kernel_size\": [3, 3], \"strides\": [1, 1], \"padding\": \"same\", \"data_format\": "
    "\"channels_last\", \"dilation_rate\": [1, 1], \"activation\": \"linear\", \"use_bias\": "
    "true, \"depth_multiplier\": 2}, \"inbound_nodes\": [[[\"x\", 0, 0, {}]]]},"
    "{\"name\": \"bn\", \"class_name\": \"BatchNormalization\", \"config\": {\"name\": \"bn\", "
    "\"axis\": -1, \"epsilon\": 0.001, \"center\": true, \"scale\": false}, "
    "\"inbound_nodes\": [[[\"dw\", 0, 0, {}]]]},"
    "{\"name\": \"conv\", \"class_name\": \"Conv2D\", \"config\": {\"name\": \"conv\", "
    "\"filters\": 2, \"kernel_size\": [1, 2], \"strides\": [1, 1], \"padding\": \"valid\", "
    "\"data_format\": \"channels_last\", \"dilation_rate\": [1, 1], \"activation\": \"relu\", "
    "\"use_bias\": true}, \"inbound_nodes\": [[[\"bn\", 0, 0, {}]]]},"
    "{\"name\": \"gap\", \"class_name\": \"GlobalAveragePooling2D\", \"config\": {\"name\": "
    "\"gap\", \"data_format\": \"channels_last\"}, \"inbound_nodes\": [[[\"conv\", 0, 0, {}]]]},"
    "{\"name\": \"fc\", \"class_name\": \"Dense\", \"config\": {\"name\": \"fc\", \"units\": 3, "
    "\"activation\": \"softmax\", \"use_bias\": true}, \"inbound_nodes\": [[[\"gap\", 0, 0, "
    "{}]]]}], \"input_layers\": [[\"x\", 0, 0]], \"output_layers\": [[\"fc\", 0, 0]]}, "
    "\"keras_version\": \"2.2.4\", \"backend\": \"tensorflow\"},"
    " \"weightsManifest\": ["
    "{\"paths\": [\"group1-shard1of1.bin\"], \"weights\": ["
    "{\"name\": \"conv/kernel\", \"shape\": [1, 2, 6, 2], \"dtype\": \"float32\"},"
    "{\"name\": \"dw/depthwise_kernel\", \"shape\": [3, 3, 3, 2], \"dtype\": \"float32\"},"
    "{\"name\": \"fc/bias\", \"shape\": [3], \"dtype\": \"float32\"}]},"
    "{\"paths\": [\"group2-shard1of2.bin\", \"group2-shard2of2.bin\"], \"weights\": ["
    "{\"name\": \"bn/beta\", \"shape\": [6], \"dtype\": \"float32\"},"
    "{\"name\": \"bn/moving_mean\", \"shape\": [6], \"dtype\": \"float32\"},"
    "{\"name\": \"bn/moving_variance\", \"shape\": [6], \"dtype\": \"float32\"},"
    "{\"name\": \"dw/bias\", \"shape\": [6], \"dtype\": \"float32\"},"
    "{\"name\": \"conv/bias\", \"shape\": [2], \"dtype\": \"float32\"},"
    "{\"name\": \"fc/kernel\", \"shape\": [2, 3], \"dtype\": \"float32\"}]}]}";

/* Floats in manifest group 1 (conv/kernel 24, dw/depthwise_kernel 54,
 * fc/bias 3) and in all, and the first of bn/moving_variance. */
#define TINY_GROUP1 81
#define TINY_FLOATS 113
#define TINY_VARIANCE_FIRST 93 /* bn/moving_variance */

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double uniform(double lo, double hi)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return lo + (hi - lo) * (double)(rng_state >> 11) / 9007199254740992.0;
}

/* Source values of the tiny model in manifest order (variances positive). */
static void tiny_values(float v[TINY_FLOATS])
{
    for (int i = 0; i < TINY_FLOATS; i++)
        v[i] = (float)uniform(-1.0, 1.0);
    for (int i = TINY_VARIANCE_FIRST; i < TINY_VARIANCE_FIRST + 6; i++)
        v[i] = (float)uniform(0.5, 2.0);
}

static int write_floats(const char *dir, const char *name, const float *v, size_t n)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/%s", dir, name);
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    for (size_t i = 0; i < n; i++)
        put_f32(f, v[i]);
    return fclose(f);
}

/* Writes the tiny model into dir; path receives dir/model.json. */
static int write_tiny(char *path, size_t size, const char *dir, const float v[TINY_FLOATS])
{
    snprintf(path, size, "%s/model.json", dir);
    FILE *f = fopen(path, "wb");
    if (!f || fputs(tiny_json, f) < 0 || fclose(f) != 0)
        return -1;
    if (write_floats(dir, "group1-shard1of1.bin", v, TINY_GROUP1) ||
        write_floats(dir, "group2-shard1of2.bin", v + TINY_GROUP1, 10) ||
        write_floats(dir, "group2-shard2of2.bin", v + TINY_GROUP1 + 10,
                     TINY_FLOATS - TINY_GROUP1 - 10))
        return -1;
    return 0;
}

/* Writes and imports the tiny model; path receives its model.json. */
static graph *load_tiny(char *path, size_t size, const float v[TINY_FLOATS])
{
    char dir[512];
    new_dir(dir, sizeof dir, "tiny-source");
    if (write_tiny(path, size, dir, v) != 0) {
        TEST_FAIL_AT("cannot write the tiny model into %s", dir);
        return NULL;
    }
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    if (keras_import(&g, path, &err) != TOP_OK)
        TEST_FAIL_AT("keras_import(%s): %s", path, err.message);
    return g;
}

/* ---- checks of an export --------------------------------------------------------- */

/* Checks that every parameter of `want` is in `got` with the same bits. */
static void check_same_params(const graph *got, const graph *want)
{
    CHECK_INT_EQ(got->n_params, want->n_params);
    for (int p = 0; p < want->n_params; p++) {
        const graph_param *w = &want->params[p];
        int q = graph_find_param(got, w->name);
        CHECK_MSG(q >= 0, "parameter '%s' is missing after the round trip", w->name);
        if (q < 0)
            continue;
        const tensor *t = &got->params[q].value;
        CHECK_MSG(t->numel == w->value.numel && tensor_same_shape(t, &w->value),
                  "parameter '%s' changed shape", w->name);
        if (t->numel != w->value.numel)
            continue;
        size_t diff = 0, first = 0;
        for (size_t i = 0; i < t->numel; i++)
            if (memcmp(&t->data[i], &w->value.data[i], sizeof(float)) != 0 && diff++ == 0)
                first = i;
        CHECK_MSG(diff == 0,
                  "parameter '%s': %zu of %zu elements differ, first at %zu (%.9g, "
                  "expected %.9g)",
                  w->name, diff, t->numel, first, (double)t->data[first],
                  (double)w->value.data[first]);
    }
}

static json_t *load_json(const char *path)
{
    json_error_t jerr;
    json_t *root = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        TEST_FAIL_AT("cannot parse %s: line %d: %s", path, jerr.line, jerr.text);
    return root;
}

/* Checks dir/model.json against the source: the same fields but for the
 * manifest, which lists the source weights in order as float32. Returns the
 * number of float32 values the manifest lists. */
static size_t check_document(const char *dir, const char *source)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/model.json", dir);
    json_t *out = load_json(path), *src = load_json(source);
    size_t floats = 0;
    if (!out || !src)
        goto done;
    static const char *const kept[] = {"format", "generatedBy", "convertedBy", "modelTopology"};
    for (size_t k = 0; k < sizeof kept / sizeof kept[0]; k++)
        CHECK_MSG(json_equal(json_object_get(out, kept[k]), json_object_get(src, kept[k])),
                  "field %s changed", kept[k]);
    CHECK_INT_EQ(json_object_size(out), json_object_size(src));

    json_t *groups = json_object_get(out, "weightsManifest");
    json_t *weights = json_object_get(json_array_get(groups, 0), "weights");
    json_t *paths = json_object_get(json_array_get(groups, 0), "paths");
    CHECK_INT_EQ(json_array_size(groups), 1);
    CHECK_INT_EQ(json_array_size(paths), 1);
    CHECK(strcmp(json_string_value(json_array_get(paths, 0)), TFJS_EXPORT_SHARD) == 0);
    size_t gi, wi, n = 0;
    json_t *group, *entry;
    json_array_foreach(json_object_get(src, "weightsManifest"), gi, group)
    {
        json_array_foreach(json_object_get(group, "weights"), wi, entry)
        {
            json_t *o = json_array_get(weights, n++);
            CHECK_MSG(json_equal(json_object_get(o, "name"), json_object_get(entry, "name")),
                      "manifest entry %zu is '%s', expected '%s'", n - 1,
                      json_string_value(json_object_get(o, "name")),
                      json_string_value(json_object_get(entry, "name")));
            CHECK(json_equal(json_object_get(o, "shape"), json_object_get(entry, "shape")));
            CHECK(strcmp(json_string_value(json_object_get(o, "dtype")), "float32") == 0);
            CHECK(json_object_get(o, "quantization") == NULL);
            size_t numel = 1, d;
            json_t *dim;
            json_array_foreach(json_object_get(entry, "shape"), d, dim) numel *=
                (size_t)json_integer_value(dim);
            floats += numel;
        }
    }
    CHECK_INT_EQ(json_array_size(weights), n);
done:
    json_decref(out);
    json_decref(src);
    return floats;
}

/*
 * Decodes the source weights of the real model in manifest order: uint8
 * affine (value = q * scale + min, in double, rounded to float32, as TF.js
 * does) or float32. Returns the number of floats, 0 on failure.
 */
static size_t decode_source(float **values, const char *source)
{
    char shard[1024];
    unsigned char *bytes = NULL;
    size_t len = 0, n = 0, off = 0;
    json_t *src = load_json(source);
    *values = NULL;
    snprintf(shard, sizeof shard, "%.*s/group1-shard1of1.bin",
             (int)(strrchr(source, '/') - source), source);
    json_t *groups = json_object_get(src, "weightsManifest");
    if (!src || json_array_size(groups) != 1 || read_bytes(shard, &bytes, &len) != 0) {
        TEST_FAIL_AT("cannot read the single-shard model %s", source);
        goto done;
    }
    *values = malloc(len * sizeof **values); /* at most one float per byte of uint8 */
    if (!*values) {
        TEST_FAIL_AT("out of memory for %zu floats", len);
        goto done;
    }
    size_t wi, d;
    json_t *entry, *dim;
    json_array_foreach(json_object_get(json_array_get(groups, 0), "weights"), wi, entry)
    {
        size_t numel = 1;
        json_array_foreach(json_object_get(entry, "shape"), d, dim) numel *=
            (size_t)json_integer_value(dim);
        json_t *q = json_object_get(entry, "quantization");
        const char *qtype = json_string_value(json_object_get(q, "dtype"));
        int u8 = qtype && strcmp(qtype, "uint8") == 0;
        double scale = json_number_value(json_object_get(q, "scale"));
        double min = json_number_value(json_object_get(q, "min"));
        size_t need = numel * (u8 ? 1 : 4);
        if ((q && !u8) || off + need > len || n + numel > len) {
            TEST_FAIL_AT("%s: weight %zu is neither uint8 nor float32, or the shard is short",
                         source, wi);
            n = 0;
            goto done;
        }
        for (size_t i = 0; i < numel; i++)
            (*values)[n++] = u8 ? (float)((double)bytes[off + i] * scale + min)
                                : f32_at(bytes + off + 4 * i);
        off += need;
    }
done:
    json_decref(src);
    free(bytes);
    return n;
}

/* Compares dir's shard with `want` (n floats) bit for bit. */
static void check_shard_values(const char *dir, const float *want, size_t n)
{
    char path[1024];
    unsigned char *bytes = NULL;
    size_t len = 0;
    snprintf(path, sizeof path, "%s/%s", dir, TFJS_EXPORT_SHARD);
    CHECK_MSG(read_bytes(path, &bytes, &len) == 0, "cannot read %s", path);
    CHECK_INT_EQ(len, n * 4);
    size_t diff = 0, first = 0;
    for (size_t i = 0; bytes && len == n * 4 && i < n; i++) {
        float v = f32_at(bytes + 4 * i);
        if (memcmp(&v, &want[i], sizeof v) != 0 && diff++ == 0)
            first = i;
    }
    CHECK_MSG(diff == 0,
              "%zu of %zu exported floats differ from the source, first at %zu "
              "(%.9g, expected %.9g)",
              diff, n, first, diff ? (double)f32_at(bytes + 4 * first) : 0.0,
              (double)want[first]);
    free(bytes);
}

/* ---- the real model ------------------------------------------------------------- */

static void test_real_unpruned_matches_source(void)
{
    char source[1024], dir[512];
    real_model_path(source, sizeof source);
    graph *g = load_real();
    float *want = NULL;
    if (!g)
        return;
    new_dir(dir, sizeof dir, "real-unpruned");
    size_t n = decode_source(&want, source);
    CHECK_INT_EQ(n, 2619461);
    if (n && export_ok(g, source, dir)) {
        CHECK_INT_EQ(check_document(dir, source), n);
        check_shard_values(dir, want, n);
    }
    free(want);
    graph_free(g);
}

static void test_real_pruned_round_trip(void)
{
    char source[1024], dir[512], path[1024];
    real_model_path(source, sizeof source);
    graph *g = load_real(), *back = NULL;
    if (!g)
        return;
    size_t zeroed = prune_by_magnitude(g, NULL);
    CHECK_MSG(zeroed > 600000, "only %zu weights were zeroed", zeroed);
    CHECK(perturb_statistics(g, "block_6_", NULL) == 6);
    new_dir(dir, sizeof dir, "real-pruned");
    if (export_ok(g, source, dir)) {
        CHECK_INT_EQ(check_document(dir, source), 2619461);
        snprintf(path, sizeof path, "%s/model.json", dir);
        top_error err;
        top_error_clear(&err);
        CHECK_MSG(keras_import(&back, path, &err) == TOP_OK, "re-import: %s", err.message);
        if (back)
            check_same_params(back, g);
        CHECK_INT_EQ(count_temp_files(dir), 0);
    }
    graph_free(back);
    graph_free(g);
}

static void test_existing_export_replaced(void)
{
    char source[1024], dir[512], path[1024];
    real_model_path(source, sizeof source);
    graph *g = load_real(), *back = NULL;
    if (!g)
        return;
    new_dir(dir, sizeof dir, "replace");
    export_ok(g, source, dir);
    prune_by_magnitude(g, NULL);
    if (export_ok(g, source, dir)) {
        snprintf(path, sizeof path, "%s/model.json", dir);
        top_error err;
        top_error_clear(&err);
        CHECK_MSG(keras_import(&back, path, &err) == TOP_OK, "re-import: %s", err.message);
        if (back)
            check_same_params(back, g);
    }
    graph_free(back);
    graph_free(g);
}

/* ---- the hand-written model ---------------------------------------------------------- */

static void test_tiny_exports_source_values(void)
{
    char source[1024], dir[512];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    new_dir(dir, sizeof dir, "tiny-export");
    if (export_ok(g, source, dir)) {
        CHECK_INT_EQ(check_document(dir, source), TINY_FLOATS);
        check_shard_values(dir, v, TINY_FLOATS);
    }
    graph_free(g);
}

static void test_tiny_changed_constant_rejected(void)
{
    char source[1024], dir[512];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    int p = graph_find_param(g, "bn/gamma");
    CHECK(p >= 0);
    CHECK(keras_param_is_constant(g, p));
    if (p >= 0) {
        g->params[p].value.data[4] = 0.5f;
        new_dir(dir, sizeof dir, "tiny-constant");
        export_fails(g, source, dir, TOP_ERR_UNSUPPORTED, "'bn/gamma' is 0.5 at index 4");
    }
    graph_free(g);
}

static void test_tiny_depthwise_layout_by_hand(void)
{
    char source[1024];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    /* Source (R, S, C, M) = (3, 3, 3, 2) starts at float 24 of the manifest;
     * element (r, s, c, m) is engine element (c*2 + m, 0, r, s) of (6, 1, 3, 3). */
    int p = graph_find_param(g, "dw/depthwise_kernel");
    float out[54];
    top_error err;
    top_error_clear(&err);
    CHECK(p >= 0);
    if (p < 0) {
        graph_free(g);
        return;
    }
    CHECK_INT_EQ(tfjs_param_to_source(out, &g->params[p], &err), TOP_OK);
    for (int r = 0; r < 3; r++)
        for (int s = 0; s < 3; s++)
            for (int c = 0; c < 3; c++)
                for (int m = 0; m < 2; m++) {
                    int src = ((r * 3 + s) * 3 + c) * 2 + m;
                    int eng = ((c * 2 + m) * 3 + r) * 3 + s;
                    CHECK_CLOSE_AT(out[src], v[24 + src], 0.0, src);
                    CHECK_CLOSE_AT(g->params[p].value.data[eng], v[24 + src], 0.0, eng);
                }
    graph_free(g);
}

static void test_param_shape_mismatch_rejected(void)
{
    char source[1024];
    float v[TINY_FLOATS], out[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    int p = graph_find_param(g, "fc/kernel");
    CHECK(p >= 0);
    if (p >= 0) {
        graph_param gp = g->params[p];
        gp.src_shape[0] = 3, gp.src_shape[1] = 2; /* (OUT, IN) written as if (IN, OUT) */
        top_error err;
        top_error_clear(&err);
        CHECK_INT_EQ(tfjs_param_to_source(out, &gp, &err), TOP_ERR_SHAPE);
        CHECK(strstr(err.message, "'fc/kernel'") != NULL);
    }
    graph_free(g);
}

/* ---- what the export rejects ----------------------------------------------------------- */

static void add_filled(st_writer *w, const char *name, int ndim, int64_t d0, int64_t d1,
                       int64_t d2, int64_t d3, float fill)
{
    int64_t shape[4] = {d0, d1, d2, d3};
    size_t numel = 1;
    for (int d = 0; d < ndim; d++)
        numel *= (size_t)shape[d];
    float *data = malloc(numel * sizeof *data);
    if (!data)
        return;
    for (size_t i = 0; i < numel; i++)
        data[i] = fill;
    top_error err;
    top_error_clear(&err);
    if (st_writer_add(w, name, ST_DTYPE_F32, ndim, shape, data, numel * sizeof *data, &err) !=
        TOP_OK)
        TEST_FAIL_AT("adding %s: %s", name, err.message);
    free(data);
}

static void add_bn(st_writer *w, const char *bn, int64_t c)
{
    static const char *const part[4] = {"weight", "bias", "running_mean", "running_var"};
    char name[128];
    for (int i = 0; i < 4; i++) {
        snprintf(name, sizeof name, "%s.%s", bn, part[i]);
        add_filled(w, name, 1, c, 0, 0, 0, i == 3 ? 1.0f : 0.1f);
    }
}

/* A torchvision ResNet-18 state dict with stage widths 2, 4, 8, 16. */
static int write_resnet18(const char *path)
{
    st_writer *w = NULL;
    top_error err;
    top_error_clear(&err);
    if (st_writer_new(&w, &err) != TOP_OK)
        return -1;
    add_filled(w, "conv1.weight", 4, 2, 3, 7, 7, 0.01f);
    add_bn(w, "bn1", 2);
    int64_t in = 2;
    for (int s = 0; s < 4; s++) {
        int64_t out = 2 << s;
        for (int b = 0; b < 2; b++) {
            char name[128];
            for (int k = 1; k <= 2; k++) {
                snprintf(name, sizeof name, "layer%d.%d.conv%d.weight", s + 1, b, k);
                add_filled(w, name, 4, out, k == 1 ? in : out, 3, 3, 0.01f);
                snprintf(name, sizeof name, "layer%d.%d.bn%d", s + 1, b, k);
                add_bn(w, name, out);
            }
            if (b == 0 && s > 0) {
                snprintf(name, sizeof name, "layer%d.0.downsample.0.weight", s + 1);
                add_filled(w, name, 4, out, in, 1, 1, 0.01f);
                snprintf(name, sizeof name, "layer%d.0.downsample.1", s + 1);
                add_bn(w, name, out);
            }
            in = out;
        }
    }
    add_filled(w, "fc.weight", 2, 5, in, 0, 0, 0.01f);
    add_filled(w, "fc.bias", 1, 5, 0, 0, 0, 0.0f);
    top_status st = st_writer_write(w, path, &err);
    if (st != TOP_OK)
        TEST_FAIL_AT("writing %s: %s", path, err.message);
    st_writer_free(w);
    return st == TOP_OK ? 0 : -1;
}

static void test_torch_graph_rejected(void)
{
    char dir[512], path[1024], real[1024];
    new_dir(dir, sizeof dir, "torch");
    snprintf(path, sizeof path, "%s/resnet18.safetensors", dir);
    real_model_path(real, sizeof real);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    if (write_resnet18(path) != 0)
        return;
    CHECK_MSG(model_load(&g, path, &err) == TOP_OK, "model_load: %s", err.message);
    if (!g)
        return;
    CHECK(strcmp(g->architecture, "resnet18") == 0);
    snprintf(path, sizeof path, "%s/out", dir);
    export_fails(g, real, path, TOP_ERR_UNSUPPORTED,
                 "resnet18 model was not imported from a TF.js layers model");
    snprintf(real, sizeof real, "%s/resnet18.safetensors", dir);
    export_fails(g, real, path, TOP_ERR_UNSUPPORTED, "TF.js export is only available");
    graph_free(g);
}

static void test_non_tfjs_source_rejected(void)
{
    char source[1024], dir[512], path[1024];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    new_dir(dir, sizeof dir, "not-tfjs");
    snprintf(path, sizeof path, "%s/weights.safetensors", dir);
    FILE *f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        CHECK_INT_EQ(fwrite("\x10\0\0\0\0\0\0\0{}", 1, 10, f), 10); /* an empty safetensors */
        CHECK_INT_EQ(fclose(f), 0);
    }
    export_fails(g, path, dir, TOP_ERR_UNSUPPORTED, "is not a TF.js layers model.json");
    snprintf(path, sizeof path, "%s/other.json", dir);
    f = fopen(path, "wb");
    CHECK(f != NULL);
    if (f) {
        CHECK(fputs("{\"modelTopology\": {}}", f) >= 0);
        CHECK_INT_EQ(fclose(f), 0);
    }
    export_fails(g, path, dir, TOP_ERR_UNSUPPORTED,
                 "lacks the object modelTopology or the array");
    snprintf(path, sizeof path, "%s/missing.json", dir);
    export_fails(g, path, dir, TOP_ERR_IO, "missing.json");
    graph_free(g);
}

static void test_missing_weight_named(void)
{
    char source[1024], dir[512];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    int p = graph_find_param(g, "conv/bias");
    CHECK(p >= 0);
    if (p >= 0) {
        snprintf(g->params[p].name, sizeof g->params[p].name, "conv/bias_renamed");
        new_dir(dir, sizeof dir, "missing");
        export_fails(g, source, dir, TOP_ERR_NOT_FOUND,
                     "weight 'conv/bias' of the weights manifest is not a parameter");
    }
    graph_free(g);
}

/* Writes the tiny model.json with `from` replaced by `to` as dir/name. */
static void write_variant(char *path, size_t size, const char *dir, const char *from,
                          const char *to)
{
    const char *at = strstr(tiny_json, from);
    CHECK_MSG(at != NULL, "'%s' is not in the tiny model", from);
    snprintf(path, size, "%s/variant.json", dir);
    FILE *f = fopen(path, "wb");
    if (!f || !at) {
        if (f)
            fclose(f);
        return;
    }
    fprintf(f, "%.*s%s%s", (int)(at - tiny_json), tiny_json, to, at + strlen(from));
    CHECK(fclose(f) == 0);
}

static void test_unlisted_param_named(void)
{
    char source[1024], dir[512], path[1024];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    new_dir(dir, sizeof dir, "unlisted");
    write_variant(path, sizeof path, dir,
                  ",{\"name\": \"fc/bias\", \"shape\": [3], \"dtype\": \"float32\"}]},", "]},");
    export_fails(g, path, dir, TOP_ERR_FORMAT,
                 "graph parameter 'fc/bias' is not in the weights manifest");
    write_variant(path, sizeof path, dir, "\"shape\": [1, 2, 6, 2]", "\"shape\": [2, 1, 6, 2]");
    export_fails(g, path, dir, TOP_ERR_SHAPE, "weight 'conv/kernel' has another shape");
    graph_free(g);
}

static void test_nan_weight_rejected(void)
{
    char source[1024], dir[512];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    int p = graph_find_param(g, "fc/kernel");
    CHECK(p >= 0);
    if (p >= 0) {
        g->params[p].value.data[1] = NAN; /* engine (0, 1) is source (1, 0), index 3 */
        new_dir(dir, sizeof dir, "nan");
        export_fails(g, source, dir, TOP_ERR_NUMERIC, "'fc/kernel' is nan at index 3");
        CHECK_INT_EQ(count_temp_files(dir), 0);
    }
    graph_free(g);
}

static void test_fifo_target_rejected(void)
{
    char source[1024], dir[512], path[1024];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    new_dir(dir, sizeof dir, "fifo");
    snprintf(path, sizeof path, "%s/%s", dir, TFJS_EXPORT_SHARD);
    CHECK(mkfifo(path, 0600) == 0);
    export_fails(g, source, dir, TOP_ERR_INVALID, "it exists and is not a regular file");
    struct stat sb;
    CHECK_INT_EQ(lstat(path, &sb), 0);
    CHECK(S_ISFIFO(sb.st_mode));
    CHECK_INT_EQ(count_temp_files(dir), 0);
    graph_free(g);
}

static void test_source_folder_rejected(void)
{
    char source[1024], dir[512];
    float v[TINY_FLOATS];
    tiny_values(v);
    graph *g = load_tiny(source, sizeof source, v);
    if (!g)
        return;
    snprintf(dir, sizeof dir, "%.*s", (int)(strrchr(source, '/') - source), source);
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(tfjs_export_write(g, source, dir, &err), TOP_ERR_INVALID);
    CHECK(strstr(err.message, "contains the source model") != NULL);
    unsigned char *bytes = NULL;
    size_t len = 0;
    CHECK_INT_EQ(read_bytes(source, &bytes, &len), 0);
    CHECK_INT_EQ(len, strlen(tiny_json));
    CHECK(bytes && len == strlen(tiny_json) && memcmp(bytes, tiny_json, len) == 0);
    free(bytes);
    graph_free(g);
}

/* ---- cases for TF.js ------------------------------------------------------------------- */

/* Writes x: (N, C, H, W) as dir/input.bin in (N, H, W, C) order. */
static int write_input(const char *dir, const float *x, int n, int c, int h, int w)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/input.bin", dir);
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    for (int i = 0; i < n; i++)
        for (int y = 0; y < h; y++)
            for (int q = 0; q < w; q++)
                for (int ch = 0; ch < c; ch++)
                    put_f32(f,
                            x[(((size_t)i * (size_t)c + (size_t)ch) * (size_t)h + (size_t)y) *
                                  (size_t)w +
                              (size_t)q]);
    return fclose(f);
}

/* Runs g on x, exports it, and writes input.bin and expected.json into dir. */
static int write_case(graph *g, const char *source, const char *dir, const float *x, int n,
                      json_t *kinds, double min_dense_difference)
{
    char path[1024];
    top_error err;
    top_error_clear(&err);
    const graph_preprocess *pp = &g->preprocess;
    snprintf(path, sizeof path, "%s/tfjs", dir);
    if (tfjs_export_write(g, source, path, &err) != TOP_OK ||
        graph_forward(g, x, n, GRAPH_MODE_INFERENCE, &err) != TOP_OK) {
        fprintf(stderr, "%s: %s\n", dir, err.message);
        return -1;
    }
    char *absolute = realpath(source, NULL); /* check-export.js runs from another folder */
    if (!absolute) {
        fprintf(stderr, "%s: %s\n", source, strerror(errno));
        return -1;
    }
    const float *y = graph_node_output(g, g->output);
    int classes = (int)g->nodes[g->output].sample_numel;
    json_t *probs = json_array();
    for (int i = 0; i < n; i++) {
        json_t *row = json_array();
        for (int k = 0; k < classes; k++)
            json_array_append_new(row, json_real((double)y[i * classes + k]));
        json_array_append_new(probs, row);
    }
    json_t *doc =
        json_pack("{s:s, s:s, s:{s:s, s:[i,i,i,i]}, s:o, s:O, s:f, s:f}", "source_model",
                  absolute, "model", "tfjs/model.json", "input", "file", "input.bin", "shape",
                  n, pp->height, pp->width, pp->channels, "probabilities", probs, "weights",
                  kinds, "tolerance", 1e-5, "min_dense_difference", min_dense_difference);
    free(absolute);
    snprintf(path, sizeof path, "%s/expected.json", dir);
    int rc = doc && json_dump_file(doc, path, JSON_INDENT(1)) == 0 ? 0 : -1;
    json_decref(doc);
    if (rc == 0)
        rc = write_input(dir, x, n, pp->channels, pp->height, pp->width);
    return rc;
}

static int export_real_case(const char *dir, char **images, int n)
{
    char source[1024];
    real_model_path(source, sizeof source);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    if (model_load(&g, source, &err) != TOP_OK) {
        fprintf(stderr, "%s: %s; run tools/fetch-models.sh\n", source, err.message);
        return -1;
    }
    const graph_preprocess *pp = &g->preprocess;
    size_t per = (size_t)pp->channels * (size_t)pp->height * (size_t)pp->width;
    float *x = malloc(per * (size_t)n * sizeof *x);
    json_t *kinds = json_object();
    int rc = x ? 0 : -1;
    for (int i = 0; rc == 0 && i < n; i++) {
        image_u8 img = {0};
        if (image_load(&img, images[i], NULL, &err) != TOP_OK ||
            image_preprocess(x + per * (size_t)i, &img, pp, &err) != TOP_OK) {
            fprintf(stderr, "%s: %s\n", images[i], err.message);
            rc = -1;
        }
        image_free(&img);
    }
    prune_by_magnitude(g, kinds);
    perturb_statistics(g, "block_6_", kinds);
    if (rc == 0)
        rc = write_case(g, source, dir, x, n, kinds, 1e-3);
    json_decref(kinds);
    free(x);
    graph_free(g);
    return rc;
}

static int export_tiny_case(const char *dir)
{
    char source_dir[1100], source[1200];
    float v[TINY_FLOATS], x[4 * 3 * 5 * 4];
    snprintf(source_dir, sizeof source_dir, "%s/source", dir);
    tiny_values(v);
    for (size_t i = 0; i < sizeof x / sizeof x[0]; i++)
        x[i] = (float)uniform(0.0, 1.0);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    if (mkdir(source_dir, 0777) != 0 || write_tiny(source, sizeof source, source_dir, v) != 0 ||
        keras_import(&g, source, &err) != TOP_OK) {
        fprintf(stderr, "tiny model in %s: %s\n", source_dir, err.message);
        return -1;
    }
    json_t *kinds = json_object();
    prune_by_magnitude(g, kinds);
    perturb_statistics(g, "bn/", kinds);
    int rc = write_case(g, source, dir, x, 4, kinds, 1e-4);
    json_decref(kinds);
    graph_free(g);
    return rc;
}

/* --export DIR IMAGE...: writes DIR/mobilenet_v2 and DIR/tiny. */
static int export_for_tfjs(const char *dir, char **images, int n)
{
    char real[1024], tiny[1024];
    snprintf(real, sizeof real, "%s/mobilenet_v2", dir);
    snprintf(tiny, sizeof tiny, "%s/tiny", dir);
    if (mkdir(dir, 0777) != 0 || mkdir(real, 0777) != 0 || mkdir(tiny, 0777) != 0) {
        fprintf(stderr, "cannot create the case folders in %s: %s\n", dir, strerror(errno));
        return 1;
    }
    if (export_real_case(real, images, n) != 0 || export_tiny_case(tiny) != 0)
        return 1;
    printf("wrote %s and %s\n", real, tiny);
    return 0;
}

int main(int argc, char **argv)
{
    if (argc >= 2 && strcmp(argv[1], "--export") == 0) {
        if (argc < 4) {
            fprintf(stderr, "usage: test_tfjs_export --export DIR IMAGE...\n");
            return 2;
        }
        return export_for_tfjs(argv[2], argv + 3, argc - 3);
    }
    const char *tmp = getenv("TMPDIR");
    snprintf(tmp_root, sizeof tmp_root, "%s/topiary-tfjs-XXXXXX", tmp && tmp[0] ? tmp : "/tmp");
    if (!mkdtemp(tmp_root)) {
        fprintf(stderr, "cannot create a temporary folder: %s\n", strerror(errno));
        printf("0 passed, 1 failed\n");
        return 1;
    }
    TEST_RUN(test_real_unpruned_matches_source);
    TEST_RUN(test_real_pruned_round_trip);
    TEST_RUN(test_existing_export_replaced);
    TEST_RUN(test_tiny_exports_source_values);
    TEST_RUN(test_tiny_changed_constant_rejected);
    TEST_RUN(test_tiny_depthwise_layout_by_hand);
    TEST_RUN(test_param_shape_mismatch_rejected);
    TEST_RUN(test_torch_graph_rejected);
    TEST_RUN(test_non_tfjs_source_rejected);
    TEST_RUN(test_missing_weight_named);
    TEST_RUN(test_unlisted_param_named);
    TEST_RUN(test_nan_weight_rejected);
    TEST_RUN(test_fifo_target_rejected);
    TEST_RUN(test_source_folder_rejected);
    nftw(tmp_root, remove_entry, 16, FTW_DEPTH | FTW_PHYS);
    return TEST_FINISH();
}
