/*
 * Tests of the Keras (TF.js layers model) importer.
 *
 * Golden: the nsfwjs@4.4.0 MobileNetV2 and InceptionV3 from
 * tools/fetch-models.sh, run on the darknet photos (Debian package darknet)
 * and compared with tests/golden/nsfwjs_reference.json, which
 * tools/tfjs/make-reference.js computed with TF.js 4.22 (tolerance 1e-4 per
 * probability, same top-1 class). The reference stores the byte sum of each
 * decoded photo, so a decoder mismatch is reported as such.
 *
 * Unit: a hand-written six-layer model with every weight encoding (float32,
 * float16, uint8 and uint16 affine, float16 quantization) is compared with a
 * direct NHWC implementation of the Keras layers. Corrupt variants of it and
 * of the real model.json must fail with an error that names the value.
 *
 * TOPIARY_KERAS_SKIP_INCEPTION=1 skips the InceptionV3 golden test (for slow
 * sanitizer builds).
 */
#include <jansson.h>
#include <stdint.h>
#include <string.h>

#include "half.h"
#include "image.h"
#include "import_keras.h"
#include "test.h"

#define REFERENCE_JSON "tests/golden/nsfwjs_reference.json"
#define PHOTO_DIR "/usr/share/darknet/data"
#define GOLDEN_TOL 1e-4

#define CHECK_STR_EQ(actual, expected)                                             \
    do {                                                                           \
        const char *a_ = (actual), *e_ = (expected);                               \
        if (!a_ || !e_ || strcmp(a_, e_) != 0)                                     \
            TEST_FAIL_AT("%s = \"%s\", expected \"%s\"", #actual, a_ ? a_ : "(null)", \
                         e_ ? e_ : "(null)");                                      \
    } while (0)

static const char *data_dir(void)
{
    const char *dir = getenv("TOPIARY_DATA_DIR");
    return dir && dir[0] ? dir : "data";
}

static void model_path(char *buf, size_t size, const char *model, const char *file)
{
    snprintf(buf, size, "%s/models/nsfwjs/%s/%s", data_dir(), model, file);
}

/* Reads a whole file; returns NULL (and reports) if it cannot. */
static unsigned char *read_all(const char *path, size_t *len)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long size = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(size > 0 ? (size_t)size + 1 : 1);
    if (buf && size > 0 && fread(buf, 1, (size_t)size, f) != (size_t)size) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *len = size > 0 ? (size_t)size : 0;
    return buf;
}

/* ---- golden tests on the real models ------------------------------------ */

static size_t count_params(const graph *g, int statistics)
{
    size_t total = 0;
    for (int i = 0; i < g->n_params; i++) {
        if (keras_param_is_constant(g, i))
            continue;
        if (!statistics || g->params[i].role == PARAM_ROLE_STATISTIC)
            total += g->params[i].value.numel;
    }
    return total;
}

static graph *load_real_model(const char *model)
{
    char path[1024];
    model_path(path, sizeof path, model, "model.json");
    FILE *f = fopen(path, "rb");
    if (!f) {
        TEST_FAIL_AT("%s is missing; run tools/fetch-models.sh (or set TOPIARY_DATA_DIR)",
                     path);
        return NULL;
    }
    fclose(f);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = keras_import(&g, path, &err);
    if (st != TOP_OK)
        TEST_FAIL_AT("keras_import(%s): %s", path, err.message);
    return g;
}

/*
 * Decodes the reference photos, checks them against the decoded-pixel
 * checksums, and fills x: (N, C, H, W) for g's preprocessing.
 */
static int make_photo_batch(float *x, const graph *g, json_t *images)
{
    size_t i, sample = (size_t)g->preprocess.channels * (size_t)g->preprocess.height *
                       (size_t)g->preprocess.width;
    json_t *ref;
    json_array_foreach(images, i, ref) {
        char path[512];
        snprintf(path, sizeof path, "%s/%s", PHOTO_DIR,
                 json_string_value(json_object_get(ref, "name")));
        image_u8 img = {0};
        top_error err;
        top_error_clear(&err);
        if (image_load(&img, path, NULL, &err) != TOP_OK) {
            TEST_FAIL_AT("%s: %s (the photos come from the Debian package darknet)", path,
                         err.message);
            return -1;
        }
        uint64_t sum = 0;
        for (size_t p = 0; p < (size_t)img.height * img.width * img.channels; p++)
            sum += img.pixels[p];
        CHECK_INT_EQ(img.height, json_integer_value(json_object_get(ref, "height")));
        CHECK_INT_EQ(img.width, json_integer_value(json_object_get(ref, "width")));
        if (sum != (uint64_t)json_integer_value(json_object_get(ref, "pixel_sum")))
            TEST_FAIL_AT("%s: decoded pixel sum %llu, djpeg's %lld: the JPEG decoders "
                         "disagree, so model outputs cannot be compared", path,
                         (unsigned long long)sum,
                         (long long)json_integer_value(json_object_get(ref, "pixel_sum")));
        top_status st = image_preprocess(x + i * sample, &img, &g->preprocess, &err);
        image_free(&img);
        if (st != TOP_OK) {
            TEST_FAIL_AT("image_preprocess(%s): %s", path, err.message);
            return -1;
        }
    }
    return 0;
}

static int argmax5(const float *p)
{
    int best = 0;
    for (int k = 1; k < 5; k++)
        if (p[k] > p[best])
            best = k;
    return best;
}

static void check_golden(const char *model, const char *architecture, int side,
                         size_t expected_params)
{
    size_t len;
    char *text = (char *)read_all(REFERENCE_JSON, &len);
    json_error_t jerr;
    json_t *root = text ? json_loadb(text, len, 0, &jerr) : NULL;
    free(text);
    if (!root) {
        TEST_FAIL_AT("cannot read %s; run tools/tfjs/make-reference.js", REFERENCE_JSON);
        return;
    }
    graph *g = load_real_model(model);
    if (!g) {
        json_decref(root);
        return;
    }

    CHECK_STR_EQ(g->architecture, architecture);
    graph_stats stats;
    graph_get_stats(g, &stats);
    size_t total = count_params(g, 0), statistics = count_params(g, 1);
    printf("  %s: %zu parameters (%zu trainable, %zu batch-norm statistics), %.2f GFLOPs\n",
           model, total, stats.params, statistics, stats.flops / 1e9);
    CHECK_INT_EQ(total, expected_params);
    CHECK_INT_EQ(stats.params, total - statistics);
    CHECK_INT_EQ(g->preprocess.height, side);
    CHECK_INT_EQ(g->preprocess.width, side);
    CHECK_INT_EQ(g->preprocess.channels, 3);
    CHECK_INT_EQ(g->preprocess.align_corners, 1);
    CHECK_CLOSE(g->preprocess.scale, 1.0 / 255.0, 1e-9);

    json_t *images = json_object_get(root, "images");
    json_t *results = json_object_get(json_object_get(json_object_get(root, "models"), model),
                                      "results");
    json_t *classes = json_object_get(root, "classes");
    int n = (int)json_array_size(images);
    CHECK_INT_EQ(n, 7);
    CHECK_INT_EQ(json_array_size(results), n);
    size_t sample = (size_t)3 * side * side;
    float *x = malloc((size_t)n * sample * sizeof *x);
    top_error err;
    top_error_clear(&err);
    if (x && n == (int)json_array_size(results) && make_photo_batch(x, g, images) == 0) {
        if (graph_forward(g, x, n, GRAPH_MODE_INFERENCE, &err) != TOP_OK) {
            TEST_FAIL_AT("graph_forward: %s", err.message);
        } else {
            const float *y = graph_node_output(g, g->output);
            double max_diff = 0;
            for (int i = 0; i < n; i++) {
                json_t *r = json_array_get(results, (size_t)i);
                json_t *probs = json_object_get(r, "probabilities");
                for (int k = 0; k < 5; k++) {
                    double want = json_number_value(json_array_get(probs, (size_t)k));
                    double diff = fabs(y[i * 5 + k] - want);
                    max_diff = diff > max_diff ? diff : max_diff;
                    CHECK_CLOSE_AT(y[i * 5 + k], want, GOLDEN_TOL, i * 5 + k);
                }
                const char *top = json_string_value(json_array_get(classes,
                                                                   (size_t)argmax5(y + i * 5)));
                CHECK_STR_EQ(top, json_string_value(json_object_get(r, "top1")));
            }
            printf("  %s: max |probability - TF.js| over %d photos = %.3g\n", model, n,
                   max_diff);
        }
    }
    free(x);
    graph_free(g);
    json_decref(root);
}

static void test_mobilenet_v2_golden(void)
{
    check_golden("mobilenet_v2", "keras:mobilenetv2", 224, 2619461);
}

static void test_inception_v3_golden(void)
{
    const char *skip = getenv("TOPIARY_KERAS_SKIP_INCEPTION");
    if (skip && strcmp(skip, "1") == 0) {
        printf("  skipped: TOPIARY_KERAS_SKIP_INCEPTION=1\n");
        return;
    }
    check_golden("inception_v3", "keras:inceptionv3", 299, 22360869);
}

/* The 7x7 average pool before the head becomes a global one, so the model
 * runs at 112 px; a size whose feature map is too small is rejected and the
 * graph keeps its old size. */
static void test_real_model_other_input_size(void)
{
    graph *g = load_real_model("mobilenet_v2");
    if (!g)
        return;
    top_error err;
    top_error_clear(&err);
    int pool = graph_find_node(g, "average_pooling2d_1");
    CHECK(pool >= 0);
    if (pool >= 0)
        CHECK_INT_EQ(g->nodes[pool].op, OP_GLOBAL_AVGPOOL);

    CHECK_INT_EQ(graph_set_input_size(g, 112, 112, &err), TOP_OK);
    CHECK_INT_EQ(g->preprocess.height, 112);
    int last_conv = graph_find_node(g, "Conv_1");
    CHECK(last_conv >= 0);
    if (last_conv >= 0) {
        /* 112 -> 56 -> 28 -> 14 -> 7 -> 3: the explicit ZeroPadding2D before each
         * stride-2 block keeps its 224-px amounts (bottom and right only). */
        CHECK_INT_EQ(g->nodes[last_conv].dims[1], 3);
        CHECK_INT_EQ(g->nodes[last_conv].dims[2], 3);
    }
    float *x = calloc(3 * 112 * 112, sizeof(float));
    CHECK(x != NULL);
    if (x && graph_forward(g, x, 1, GRAPH_MODE_INFERENCE, &err) == TOP_OK) {
        const float *y = graph_node_output(g, g->output);
        double sum = 0;
        for (int i = 0; i < 5; i++)
            sum += y[i];
        CHECK_CLOSE(sum, 1.0, 1e-5);
    } else {
        CHECK_MSG(0, "forward at 112 px failed: %s", err.message);
    }
    free(x);

    top_error_clear(&err);
    CHECK_INT_EQ(graph_set_input_size(g, 0, 112, &err), TOP_ERR_INVALID);
    CHECK_INT_EQ(g->preprocess.height, 112);
    graph_free(g);
}

static void test_real_model_weight_layouts(void)
{
    graph *g = load_real_model("mobilenet_v2");
    if (!g)
        return;
    static const struct {
        const char *name;
        param_layout layout;
        int src_ndim;
        int64_t src[4], engine[4];
    } cases[] = {
        {"Conv1/kernel", PARAM_LAYOUT_HWIO, 4, {3, 3, 3, 32}, {32, 3, 3, 3}},
        {"expanded_conv_depthwise/depthwise_kernel", PARAM_LAYOUT_HWC1, 4, {3, 3, 32, 1},
         {32, 1, 3, 3}},
        {"dense_1/kernel", PARAM_LAYOUT_IO, 2, {1280, 256}, {256, 1280}},
        {"bn_Conv1/moving_variance", PARAM_LAYOUT_SAME, 1, {32}, {32}},
    };
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        int p = graph_find_param(g, cases[i].name);
        CHECK(p >= 0);
        if (p < 0)
            continue;
        const graph_param *gp = &g->params[p];
        CHECK_INT_EQ(gp->layout, cases[i].layout);
        CHECK_INT_EQ(gp->src_ndim, cases[i].src_ndim);
        CHECK_INT_EQ(gp->value.ndim, cases[i].src_ndim);
        for (int d = 0; d < cases[i].src_ndim; d++) {
            CHECK_INT_EQ(gp->src_shape[d], cases[i].src[d]);
            CHECK_INT_EQ(gp->value.shape[d], cases[i].engine[d]);
        }
    }
    /* The fused Dense activations are separate nodes; the output is the softmax. */
    CHECK(graph_find_node(g, "dense_1/relu") >= 0);
    CHECK_INT_EQ(g->output, graph_find_node(g, "dense_3/softmax"));
    CHECK_INT_EQ(g->nodes[graph_find_node(g, "flatten_1")].attrs.flatten_nhwc, 1);
    graph_free(g);
}

/* ---- a hand-written model -------------------------------------------------- */

/*
 * input (6, 7, 3) -> DepthwiseConv2D 3x3, stride 2, "same", multiplier 2
 * (pads: top 0, bottom 1, left 1, right 1) -> BatchNormalization without
 * scale -> Conv2D 3 filters 2x2 "valid" + relu -> Flatten -> Dense 4 + softmax.
 * Two manifest groups, one with two shards; the buffers API takes the shards
 * concatenated.
 */
static const char tiny_json[] =
    "{\"format\": \"layers-model\", \"modelTopology\": {\"model_config\": {"
    "\"class_name\": \"Model\", \"config\": {\"name\": \"tiny\", \"layers\": ["
    "{\"name\": \"in\", \"class_name\": \"InputLayer\", \"config\": {\"batch_input_shape\": "
    "[null, 6, 7, 3], \"dtype\": \"float32\", \"sparse\": false, \"name\": \"in\"}, "
    "\"inbound_nodes\": []},"
    "{\"name\": \"dw\", \"class_name\": \"DepthwiseConv2D\", \"config\": {\"name\": \"dw\", "
    "\"trainable\": true, \"kernel_size\": [3, 3], \"strides\": [2, 2], \"padding\": \"same\", "
    "\"data_format\": \"channels_last\", \"dilation_rate\": [1, 1], \"activation\": "
    "\"linear\", \"use_bias\": false, \"depth_multiplier\": 2, \"depthwise_initializer\": "
    "{\"class_name\": \"Zeros\", \"config\": {}}}, \"inbound_nodes\": [[[\"in\", 0, 0, {}]]]},"
    "{\"name\": \"bn\", \"class_name\": \"BatchNormalization\", \"config\": {\"name\": \"bn\", "
    "\"axis\": -1, \"momentum\": 0.99, \"epsilon\": 0.01, \"center\": true, \"scale\": false}, "
    "\"inbound_nodes\": [[[\"dw\", 0, 0, {}]]]},"
    "{\"name\": \"conv\", \"class_name\": \"Conv2D\", \"config\": {\"name\": \"conv\", "
    "\"filters\": 3, \"kernel_size\": [2, 2], \"strides\": [1, 1], \"padding\": \"valid\", "
    "\"data_format\": \"channels_last\", \"dilation_rate\": [1, 1], \"activation\": \"relu\", "
    "\"use_bias\": true}, \"inbound_nodes\": [[[\"bn\", 0, 0, {}]]]},"
    "{\"name\": \"flat\", \"class_name\": \"Flatten\", \"config\": {\"name\": \"flat\", "
    "\"data_format\": \"channels_last\"}, \"inbound_nodes\": [[[\"conv\", 0, 0, {}]]]},"
    "{\"name\": \"dense\", \"class_name\": \"Dense\", \"config\": {\"name\": \"dense\", "
    "\"units\": 4, \"activation\": \"softmax\", \"use_bias\": true}, "
    "\"inbound_nodes\": [[[\"flat\", 0, 0, {}]]]}"
    "], \"input_layers\": [[\"in\", 0, 0]], \"output_layers\": [[\"dense\", 0, 0]]}}},"
    "\"weightsManifest\": ["
    "{\"paths\": [\"group1-shard1of1.bin\"], \"weights\": ["
    "{\"name\": \"dw/depthwise_kernel\", \"shape\": [3, 3, 3, 2], \"dtype\": \"float32\", "
    "\"quantization\": {\"dtype\": \"uint8\", \"scale\": 0.01, \"min\": -1.2}},"
    "{\"name\": \"bn/beta\", \"shape\": [6], \"dtype\": \"float32\"},"
    "{\"name\": \"bn/moving_mean\", \"shape\": [6], \"dtype\": \"float32\"},"
    "{\"name\": \"bn/moving_variance\", \"shape\": [6], \"dtype\": \"float16\"}]},"
    "{\"paths\": [\"group2-shard1of2.bin\", \"group2-shard2of2.bin\"], \"weights\": ["
    "{\"name\": \"conv/kernel\", \"shape\": [2, 2, 6, 3], \"dtype\": \"float32\"},"
    "{\"name\": \"conv/bias\", \"shape\": [3], \"dtype\": \"float32\", "
    "\"quantization\": {\"dtype\": \"uint16\", \"scale\": 0.0001, \"min\": -3}},"
    "{\"name\": \"dense/kernel\", \"shape\": [18, 4], \"dtype\": \"float32\", "
    "\"quantization\": {\"dtype\": \"float16\"}},"
    "{\"name\": \"dense/bias\", \"shape\": [4], \"dtype\": \"float32\"}]}]}";

#define TINY_BYTES (54 + 24 + 24 + 12 + 288 + 6 + 144 + 16)

/* The decoded Keras values (source layouts) and their encoded bytes. */
typedef struct tiny_model {
    float dw[3][3][3][2], beta[6], mean[6], var[6];
    float conv_k[2][2][6][3], conv_b[3], dense_k[18][4], dense_b[4];
    unsigned char bytes[TINY_BYTES + 64];
    size_t len;
} tiny_model;

static uint32_t lcg_state = 12345;

static double uniform(double lo, double hi)
{
    lcg_state = lcg_state * 1664525u + 1013904223u;
    return lo + (hi - lo) * (double)(lcg_state >> 8) / (double)(1u << 24);
}

static void put_f32(tiny_model *m, float v)
{
    uint32_t bits;
    memcpy(&bits, &v, sizeof bits);
    for (int b = 0; b < 4; b++)
        m->bytes[m->len++] = (unsigned char)(bits >> (8 * b));
}

static void put_u16(tiny_model *m, uint16_t v)
{
    m->bytes[m->len++] = (unsigned char)(v & 0xff);
    m->bytes[m->len++] = (unsigned char)(v >> 8);
}

static void tiny_make(tiny_model *m)
{
    memset(m, 0, sizeof *m);
    float *dw = &m->dw[0][0][0][0], *ck = &m->conv_k[0][0][0][0], *dk = &m->dense_k[0][0];
    for (int i = 0; i < 54; i++) {
        unsigned q = (unsigned)uniform(0, 256);
        m->bytes[m->len++] = (unsigned char)q;
        dw[i] = (float)(q * 0.01 + -1.2);
    }
    for (int i = 0; i < 6; i++)
        put_f32(m, m->beta[i] = (float)uniform(-0.5, 0.5));
    for (int i = 0; i < 6; i++)
        put_f32(m, m->mean[i] = (float)uniform(-0.5, 0.5));
    for (int i = 0; i < 6; i++) {
        uint16_t h = float_to_half((float)uniform(0.5, 2.0));
        put_u16(m, h);
        m->var[i] = half_to_float(h);
    }
    for (int i = 0; i < 72; i++)
        put_f32(m, ck[i] = (float)uniform(-0.5, 0.5));
    for (int i = 0; i < 3; i++) {
        uint16_t q = (uint16_t)uniform(29000, 31000);
        put_u16(m, q);
        m->conv_b[i] = (float)(q * 0.0001 + -3.0);
    }
    for (int i = 0; i < 72; i++) {
        uint16_t h = float_to_half((float)uniform(-1, 1));
        put_u16(m, h);
        dk[i] = half_to_float(h);
    }
    for (int i = 0; i < 4; i++)
        put_f32(m, m->dense_b[i] = (float)uniform(-0.5, 0.5));
}

/* The Keras layers written out directly on NHWC data, in double.
 * x: (6, 7, 3)  out: (4) */
static void tiny_reference(double out[4], const tiny_model *m, const float x[6][7][3])
{
    double dw[3][4][6], conv[2][3][3], z[4], zmax = -1e300, zsum = 0;
    for (int oh = 0; oh < 3; oh++)
        for (int ow = 0; ow < 4; ow++)
            for (int c = 0; c < 3; c++)
                for (int mm = 0; mm < 2; mm++) {
                    double acc = 0;
                    for (int r = 0; r < 3; r++)
                        for (int s = 0; s < 3; s++) {
                            int ih = oh * 2 + r - 0, iw = ow * 2 + s - 1;
                            if (ih >= 0 && ih < 6 && iw >= 0 && iw < 7)
                                acc += (double)x[ih][iw][c] * m->dw[r][s][c][mm];
                        }
                    int ch = c * 2 + mm;
                    dw[oh][ow][ch] = (acc - m->mean[ch]) / sqrt((double)m->var[ch] + 0.01f) +
                                     m->beta[ch];
                }
    for (int oh = 0; oh < 2; oh++)
        for (int ow = 0; ow < 3; ow++)
            for (int k = 0; k < 3; k++) {
                double acc = m->conv_b[k];
                for (int r = 0; r < 2; r++)
                    for (int s = 0; s < 2; s++)
                        for (int c = 0; c < 6; c++)
                            acc += dw[oh + r][ow + s][c] * m->conv_k[r][s][c][k];
                conv[oh][ow][k] = acc > 0 ? acc : 0;
            }
    for (int o = 0; o < 4; o++) {
        z[o] = m->dense_b[o];
        for (int i = 0; i < 18; i++)
            z[o] += conv[i / 9][(i / 3) % 3][i % 3] * m->dense_k[i][o];
        zmax = z[o] > zmax ? z[o] : zmax;
    }
    for (int o = 0; o < 4; o++)
        zsum += exp(z[o] - zmax);
    for (int o = 0; o < 4; o++)
        out[o] = exp(z[o] - zmax) / zsum;
}

static void test_tiny_model_forward(void)
{
    tiny_model m;
    tiny_make(&m);
    CHECK_INT_EQ(m.len, TINY_BYTES);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = keras_import_buffers(&g, tiny_json, strlen(tiny_json), m.bytes, m.len, &err);
    CHECK_MSG(st == TOP_OK, "keras_import_buffers: %s", err.message);
    if (st != TOP_OK)
        return;
    CHECK_STR_EQ(g->architecture, "keras:tiny");
    CHECK_INT_EQ(g->preprocess.height, 6);
    CHECK_INT_EQ(g->preprocess.width, 7);
    CHECK_INT_EQ(g->preprocess.channels, 3);

    /* Two samples: x (N, 6, 7, 3) for the reference, (N, 3, 6, 7) for the graph. */
    float x[2][6][7][3], xg[2 * 3 * 6 * 7];
    for (int n = 0; n < 2; n++)
        for (int h = 0; h < 6; h++)
            for (int w = 0; w < 7; w++)
                for (int c = 0; c < 3; c++) {
                    x[n][h][w][c] = (float)uniform(0, 1);
                    xg[((n * 3 + c) * 6 + h) * 7 + w] = x[n][h][w][c];
                }
    st = graph_forward(g, xg, 2, GRAPH_MODE_INFERENCE, &err);
    CHECK_MSG(st == TOP_OK, "graph_forward: %s", err.message);
    if (st == TOP_OK) {
        CHECK_INT_EQ(g->output, graph_find_node(g, "dense/softmax"));
        const float *y = graph_node_output(g, g->output);
        for (int n = 0; n < 2; n++) {
            double want[4];
            tiny_reference(want, &m, (const float(*)[7][3])x[n]);
            for (int o = 0; o < 4; o++)
                CHECK_CLOSE_AT(y[n * 4 + o], want[o], 1e-5, n * 4 + o);
        }
    }
    graph_free(g);
}

static const float *param_values(const graph *g, const char *name, int ndim,
                                 const int64_t *shape)
{
    int p = graph_find_param(g, name);
    CHECK_MSG(p >= 0, "parameter %s not found", name);
    if (p < 0)
        return NULL;
    const tensor *t = &g->params[p].value;
    int same = t->ndim == ndim;
    for (int d = 0; same && d < ndim; d++)
        same = t->shape[d] == shape[d];
    CHECK_MSG(same, "parameter %s has the wrong engine shape", name);
    return same ? t->data : NULL;
}

static void test_tiny_model_layouts(void)
{
    tiny_model m;
    tiny_make(&m);
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = keras_import_buffers(&g, tiny_json, strlen(tiny_json), m.bytes, m.len, &err);
    CHECK_MSG(st == TOP_OK, "keras_import_buffers: %s", err.message);
    if (st != TOP_OK)
        return;
    const float *dw = param_values(g, "dw/depthwise_kernel", 4, (int64_t[]){6, 1, 3, 3});
    const float *ck = param_values(g, "conv/kernel", 4, (int64_t[]){3, 6, 2, 2});
    const float *dk = param_values(g, "dense/kernel", 2, (int64_t[]){4, 18});
    const float *gamma = param_values(g, "bn/gamma", 1, (int64_t[]){6});
    for (int r = 0; dw && r < 3; r++)
        for (int s = 0; s < 3; s++)
            for (int c = 0; c < 3; c++)
                for (int mm = 0; mm < 2; mm++)
                    CHECK_CLOSE_AT(dw[((c * 2 + mm) * 3 + r) * 3 + s], m.dw[r][s][c][mm], 0, r);
    for (int r = 0; ck && r < 2; r++)
        for (int s = 0; s < 2; s++)
            for (int c = 0; c < 6; c++)
                for (int k = 0; k < 3; k++)
                    CHECK_CLOSE_AT(ck[((k * 6 + c) * 2 + r) * 2 + s], m.conv_k[r][s][c][k], 0, k);
    for (int i = 0; dk && i < 18; i++)
        for (int o = 0; o < 4; o++)
            CHECK_CLOSE_AT(dk[o * 18 + i], m.dense_k[i][o], 0, i);
    for (int c = 0; gamma && c < 6; c++)
        CHECK_CLOSE_AT(gamma[c], 1.0, 0, c);

    int p = graph_find_param(g, "bn/gamma");
    CHECK(p >= 0);
    CHECK(keras_param_is_constant(g, p));
    CHECK(!keras_param_is_constant(g, graph_find_param(g, "bn/beta")));
    p = graph_find_param(g, "dw/depthwise_kernel");
    if (p >= 0) {
        CHECK_INT_EQ(g->params[p].layout, PARAM_LAYOUT_HWC1);
        CHECK_INT_EQ(g->params[p].src_ndim, 4);
        CHECK_INT_EQ(g->params[p].src_shape[3], 2);
    }
    /* Trainable: depthwise 54, beta 6, conv 72 + 3, dense 72 + 4; the constant
     * gamma and the moving statistics are not counted. */
    graph_stats stats;
    graph_get_stats(g, &stats);
    CHECK_INT_EQ(stats.params, 54 + 6 + 72 + 3 + 72 + 4);
    graph_free(g);
}

/* Layers the tiny model lacks: pads, pools, merges, activations, dropout. */
static const char merge_json[] =
    "{\"modelTopology\": {\"model_config\": {\"class_name\": \"Functional\", \"config\": {"
    "\"name\": \"merge\", \"layers\": ["
    "{\"name\": \"in\", \"class_name\": \"InputLayer\", \"config\": "
    "{\"batch_input_shape\": [null, 8, 8, 3]}, \"inbound_nodes\": []},"
    "{\"name\": \"pad\", \"class_name\": \"ZeroPadding2D\", \"config\": "
    "{\"padding\": [[0, 1], [2, 3]]}, \"inbound_nodes\": [[[\"in\", 0, 0, {}]]]},"
    "{\"name\": \"mp\", \"class_name\": \"MaxPooling2D\", \"config\": {\"pool_size\": [3, 3], "
    "\"strides\": [2, 2], \"padding\": \"valid\"}, \"inbound_nodes\": [[[\"pad\", 0, 0, {}]]]},"
    "{\"name\": \"ap\", \"class_name\": \"AveragePooling2D\", \"config\": {\"pool_size\": [2, 2], "
    "\"strides\": null, \"padding\": \"same\"}, \"inbound_nodes\": [[[\"mp\", 0, 0, {}]]]},"
    "{\"name\": \"ap2\", \"class_name\": \"AveragePooling2D\", \"config\": {\"pool_size\": [3, 3], "
    "\"strides\": [1, 1], \"padding\": \"same\"}, \"inbound_nodes\": [[[\"mp\", 0, 0, {}]]]},"
    "{\"name\": \"lin\", \"class_name\": \"Activation\", \"config\": {\"activation\": \"linear\"}, "
    "\"inbound_nodes\": [[[\"ap2\", 0, 0, {}]]]},"
    "{\"name\": \"add\", \"class_name\": \"Add\", \"config\": {}, "
    "\"inbound_nodes\": [[[\"mp\", 0, 0, {}], [\"lin\", 0, 0, {}]]]},"
    "{\"name\": \"cat\", \"class_name\": \"Concatenate\", \"config\": {\"axis\": 3}, "
    "\"inbound_nodes\": [[[\"add\", 0, 0, {}], [\"mp\", 0, 0, {}]]]},"
    "{\"name\": \"r6\", \"class_name\": \"ReLU\", \"config\": {\"max_value\": 6.0}, "
    "\"inbound_nodes\": [[[\"cat\", 0, 0, {}]]]},"
    "{\"name\": \"sig\", \"class_name\": \"Activation\", \"config\": {\"activation\": \"sigmoid\"}, "
    "\"inbound_nodes\": [[[\"r6\", 0, 0, {}]]]},"
    "{\"name\": \"gap\", \"class_name\": \"GlobalAveragePooling2D\", \"config\": {}, "
    "\"inbound_nodes\": [[[\"sig\", 0, 0, {}]]]},"
    "{\"name\": \"drop\", \"class_name\": \"Dropout\", \"config\": {\"rate\": 0.25}, "
    "\"inbound_nodes\": [[[\"gap\", 0, 0, {}]]]}"
    "], \"input_layers\": [[\"in\", 0, 0]], \"output_layers\": [[\"drop\", 0, 0]]}}},"
    "\"weightsManifest\": []}";

static void test_merge_model_structure(void)
{
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = keras_import_buffers(&g, merge_json, strlen(merge_json), NULL, 0, &err);
    CHECK_MSG(st == TOP_OK, "keras_import_buffers: %s", err.message);
    if (st != TOP_OK)
        return;
    const graph_node *pad = &g->nodes[graph_find_node(g, "pad")];
    CHECK_INT_EQ(pad->attrs.pad_bottom, 1);
    CHECK_INT_EQ(pad->attrs.pad_left, 2);
    CHECK_INT_EQ(pad->attrs.pad_right, 3);
    /* pad: (3, 9, 13) -> mp 3x3 stride 2: (3, 4, 6) */
    const graph_node *mp = &g->nodes[graph_find_node(g, "mp")];
    CHECK_INT_EQ(mp->dims[1], 4);
    CHECK_INT_EQ(mp->dims[2], 6);
    /* ap: strides default to the pool size; "same" on 4 x 6 with 2 x 2 needs no pad. */
    const graph_node *ap = &g->nodes[graph_find_node(g, "ap")];
    CHECK_INT_EQ(ap->attrs.pool.stride_h, 2);
    CHECK_INT_EQ(ap->dims[1], 2);
    CHECK_INT_EQ(ap->dims[2], 3);
    const graph_node *ap2 = &g->nodes[graph_find_node(g, "ap2")];
    CHECK_INT_EQ(ap2->attrs.pool.pad_top, 1);
    CHECK_INT_EQ(ap2->attrs.pool.pad_bottom, 1);
    CHECK_INT_EQ(ap2->attrs.pool.count_include_pad, 0);
    /* A linear Activation adds no node: add reads ap2 directly. */
    CHECK_INT_EQ(graph_find_node(g, "lin"), -1);
    const graph_node *add = &g->nodes[graph_find_node(g, "add")];
    CHECK_INT_EQ(add->inputs[1], graph_find_node(g, "ap2"));
    const graph_node *cat = &g->nodes[graph_find_node(g, "cat")];
    CHECK_INT_EQ(cat->dims[0], 6);
    CHECK_INT_EQ(g->nodes[graph_find_node(g, "r6")].op, OP_RELU6);
    CHECK_INT_EQ(g->nodes[graph_find_node(g, "sig")].op, OP_SIGMOID);
    CHECK_INT_EQ(g->nodes[graph_find_node(g, "gap")].dims[0], 6);
    CHECK_CLOSE(g->nodes[graph_find_node(g, "drop")].attrs.dropout_rate, 0.25, 0);
    CHECK_INT_EQ(g->output, graph_find_node(g, "drop"));
    graph_free(g);
}

/* ---- corrupt inputs ---------------------------------------------------------- */

static json_t *find_named(json_t *array, const char *name)
{
    size_t i;
    json_t *item;
    json_array_foreach(array, i, item)
        if (json_string_value(json_object_get(item, "name")) &&
            strcmp(json_string_value(json_object_get(item, "name")), name) == 0)
            return item;
    return NULL;
}

static json_t *model_layers(json_t *root)
{
    json_t *topology = json_object_get(root, "modelTopology");
    return json_object_get(json_object_get(json_object_get(topology, "model_config"), "config"),
                           "layers");
}

static json_t *layer_of(json_t *root, const char *name)
{
    return find_named(model_layers(root), name);
}

static json_t *config_of(json_t *root, const char *name)
{
    return json_object_get(layer_of(root, name), "config");
}

static json_t *manifest_entry(json_t *root, const char *name)
{
    size_t i;
    json_t *group, *hit = NULL;
    json_array_foreach(json_object_get(root, "weightsManifest"), i, group)
        if (!hit)
            hit = find_named(json_object_get(group, "weights"), name);
    return hit;
}

/* Adds an entry of `floats` float32 values to the last manifest group. */
static void add_manifest_entry(json_t *root, const char *name, int floats)
{
    json_t *groups = json_object_get(root, "weightsManifest");
    json_t *group = json_array_get(groups, json_array_size(groups) - 1);
    json_array_append_new(json_object_get(group, "weights"),
                          json_pack("{s:s, s:[i], s:s}", "name", name, "shape", floats,
                                    "dtype", "float32"));
}

/* Each edit changes the tiny model and returns how many weight bytes to add
 * (negative: remove). */
static int edit_unknown_layer(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(layer_of(r, "conv"), "class_name", json_string("Conv3D")), 0;
}

static int edit_missing_weight(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(manifest_entry(r, "dense/bias"), "name",
                               json_string("dense/offset")), 0;
}

static int edit_unused_weight(json_t *r, tiny_model *m)
{
    (void)m;
    add_manifest_entry(r, "extra/kernel", 2);
    return 8;
}

static int edit_shape_mismatch(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(manifest_entry(r, "conv/kernel"), "shape",
                               json_pack("[i,i,i,i]", 2, 2, 3, 6)), 0;
}

static int edit_truncated_shard(json_t *r, tiny_model *m)
{
    (void)r, (void)m;
    return -1;
}

static int edit_absurd_input(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(config_of(r, "in"), "batch_input_shape",
                               json_pack("[n,i,i,i]", 100000, 7, 2)), 0;
}

static int edit_absurd_weight_dims(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(manifest_entry(r, "conv/kernel"), "shape",
                               json_pack("[I,I,I]", (json_int_t)1 << 31, (json_int_t)1 << 31,
                                         (json_int_t)1 << 31)), 0;
}

static int edit_absurd_filters(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(config_of(r, "conv"), "filters", json_integer(1 << 30)), 0;
}

static int edit_bad_quantization(json_t *r, tiny_model *m)
{
    (void)m;
    json_t *q = json_object_get(manifest_entry(r, "dw/depthwise_kernel"), "quantization");
    return json_object_set_new(q, "dtype", json_string("int8")), 0;
}

static int edit_quantization_scale(json_t *r, tiny_model *m)
{
    (void)m;
    json_t *q = json_object_get(manifest_entry(r, "conv/bias"), "quantization");
    return json_object_del(q, "scale"), 0;
}

static int edit_channels_first(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(config_of(r, "conv"), "data_format",
                               json_string("channels_first")), 0;
}

static int edit_unknown_activation(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(config_of(r, "conv"), "activation", json_string("elu")), 0;
}

static int edit_softmax_on_image(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(config_of(r, "conv"), "activation", json_string("softmax")), 0;
}

static int edit_unknown_key(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(config_of(r, "conv"), "lora_rank", json_integer(4)), 0;
}

static int edit_shared_layer(json_t *r, tiny_model *m)
{
    (void)m;
    json_t *inbound = json_object_get(layer_of(r, "flat"), "inbound_nodes");
    return json_array_append(inbound, json_array_get(inbound, 0)), 0;
}

static int edit_cycle(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(layer_of(r, "dw"), "inbound_nodes",
                               json_pack("[[[s,i,i,{}]]]", "bn", 0, 0)), 0;
}

static int edit_missing_inbound(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(layer_of(r, "dense"), "inbound_nodes",
                               json_pack("[[[s,i,i,{}]]]", "nope", 0, 0)), 0;
}

static int edit_keras3_inbound(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(layer_of(r, "dense"), "inbound_nodes",
                               json_pack("[{s:[s], s:{}}]", "args", "flat", "kwargs")), 0;
}

static int edit_gamma_present(json_t *r, tiny_model *m)
{
    (void)m;
    add_manifest_entry(r, "bn/gamma", 4);
    return 16;
}

static int edit_no_bias(json_t *r, tiny_model *m)
{
    (void)m;
    return json_object_set_new(config_of(r, "dense"), "use_bias", json_false()), 0;
}

static int edit_nan_weight(json_t *r, tiny_model *m)
{
    (void)r;
    uint32_t nan_bits = 0x7fc00000u;
    for (int b = 0; b < 4; b++)  /* bn/beta[0] starts after the 54 depthwise bytes */
        m->bytes[54 + b] = (unsigned char)(nan_bits >> (8 * b));
    return 0;
}

static int edit_leaky_relu(json_t *r, tiny_model *m)
{
    (void)m;
    json_t *layer = json_pack("{s:s, s:s, s:{s:s, s:n, s:f, s:i}, s:[[[s,i,i,{}]]]}", "name",
                              "leaky", "class_name", "ReLU", "config", "name", "leaky",
                              "max_value", "negative_slope", 0.1, "threshold", 0,
                              "inbound_nodes", "conv", 0, 0);
    json_array_append_new(model_layers(r), layer);
    return 0;
}

static int edit_two_inputs(json_t *r, tiny_model *m)
{
    (void)m;
    json_t *copy = json_deep_copy(layer_of(r, "in"));
    json_object_set_new(copy, "name", json_string("in2"));
    return json_array_append_new(model_layers(r), copy), 0;
}

typedef struct corrupt_case {
    const char *label;
    int (*edit)(json_t *root, tiny_model *m);
    top_status status;
    const char *message_part;       /* must appear in the error message */
} corrupt_case;

static const corrupt_case corrupt_cases[] = {
    {"unknown layer type", edit_unknown_layer, TOP_ERR_UNSUPPORTED, "Conv3D"},
    {"missing weight", edit_missing_weight, TOP_ERR_NOT_FOUND, "dense/bias"},
    {"unused extra weight", edit_unused_weight, TOP_ERR_FORMAT, "extra/kernel"},
    {"shape mismatch", edit_shape_mismatch, TOP_ERR_SHAPE, "conv/kernel"},
    {"truncated shard", edit_truncated_shard, TOP_ERR_FORMAT, "568"},
    {"absurd input size", edit_absurd_input, TOP_ERR_UNSUPPORTED, "batch_input_shape"},
    {"absurd weight dims", edit_absurd_weight_dims, TOP_ERR_OVERFLOW, "conv/kernel"},
    {"absurd filters", edit_absurd_filters, TOP_ERR_UNSUPPORTED, "filters"},
    {"bad quantization dtype", edit_bad_quantization, TOP_ERR_FORMAT, "int8"},
    {"quantization without scale", edit_quantization_scale, TOP_ERR_FORMAT, "scale"},
    {"channels_first", edit_channels_first, TOP_ERR_UNSUPPORTED, "channels_first"},
    {"unknown activation", edit_unknown_activation, TOP_ERR_UNSUPPORTED, "elu"},
    {"softmax on an image", edit_softmax_on_image, TOP_ERR_UNSUPPORTED, "softmax"},
    {"unknown config key", edit_unknown_key, TOP_ERR_UNSUPPORTED, "lora_rank"},
    {"shared layer", edit_shared_layer, TOP_ERR_UNSUPPORTED, "shared"},
    {"cycle", edit_cycle, TOP_ERR_FORMAT, "cycle"},
    {"missing inbound layer", edit_missing_inbound, TOP_ERR_NOT_FOUND, "nope"},
    {"keras 3 inbound format", edit_keras3_inbound, TOP_ERR_UNSUPPORTED, "Keras 2"},
    {"gamma with scale off", edit_gamma_present, TOP_ERR_FORMAT, "bn/gamma"},
    {"bias with use_bias off", edit_no_bias, TOP_ERR_FORMAT, "dense/bias"},
    {"non-finite weight", edit_nan_weight, TOP_ERR_NUMERIC, "bn/beta"},
    {"leaky relu", edit_leaky_relu, TOP_ERR_UNSUPPORTED, "negative_slope"},
    {"two inputs", edit_two_inputs, TOP_ERR_UNSUPPORTED, "InputLayer"},
};

static void test_tiny_model_corrupt(void)
{
    for (size_t i = 0; i < sizeof corrupt_cases / sizeof corrupt_cases[0]; i++) {
        const corrupt_case *c = &corrupt_cases[i];
        tiny_model m;
        tiny_make(&m);
        json_error_t jerr;
        json_t *root = json_loads(tiny_json, 0, &jerr);
        if (!root) {
            TEST_FAIL_AT("tiny_json does not parse: %s", jerr.text);
            return;
        }
        int extra = c->edit(root, &m);
        size_t len = (size_t)((int)m.len + extra);
        char *text = json_dumps(root, JSON_COMPACT);
        graph *g = (graph *)&m;  /* must be reset to NULL on failure */
        top_error err;
        top_error_clear(&err);
        top_status st = keras_import_buffers(&g, text, strlen(text), m.bytes, len, &err);
        CHECK_MSG(st == c->status, "%s: status %s, expected %s (%s)", c->label,
                  top_status_str(st), top_status_str(c->status), err.message);
        CHECK_MSG(g == NULL, "%s: the graph is not NULL after a failure", c->label);
        CHECK_MSG(strstr(err.message, c->message_part) != NULL,
                  "%s: the message \"%s\" does not name \"%s\"", c->label, err.message,
                  c->message_part);
        if (st == TOP_OK)
            graph_free(g);
        free(text);
        json_decref(root);
    }
}

static void test_malformed_json(void)
{
    tiny_model m;
    tiny_make(&m);
    static const char *const docs[] = {"", "{", "[]", "null", "{\"modelTopology\": 3}",
                                       "{\"modelTopology\": {\"model_config\": {\"class_name\": "
                                       "\"Sequential\", \"config\": {}}}, "
                                       "\"weightsManifest\": []}"};
    for (size_t i = 0; i < sizeof docs / sizeof docs[0]; i++) {
        graph *g = NULL;
        top_error err;
        top_error_clear(&err);
        top_status st = keras_import_buffers(&g, docs[i], strlen(docs[i]), m.bytes, m.len, &err);
        CHECK_MSG(st != TOP_OK && g == NULL && err.message[0], "document %zu: status %s", i,
                  top_status_str(st));
    }
    /* Every prefix of the real document is malformed JSON. */
    size_t len = strlen(tiny_json);
    for (size_t cut = 0; cut < len; cut += 97) {
        graph *g = NULL;
        top_error err;
        top_error_clear(&err);
        top_status st = keras_import_buffers(&g, tiny_json, cut, m.bytes, m.len, &err);
        CHECK_MSG(st == TOP_ERR_FORMAT && g == NULL, "prefix of %zu bytes: status %s", cut,
                  top_status_str(st));
    }
}

static void test_missing_file(void)
{
    graph *g = NULL;
    top_error err;
    top_error_clear(&err);
    top_status st = keras_import(&g, "no/such/model.json", &err);
    CHECK_INT_EQ(st, TOP_ERR_IO);
    CHECK(g == NULL);
    CHECK(strstr(err.message, "no/such/model.json") != NULL);
}

/* Edits of the real MobileNetV2 model.json, imported from memory. */
static void test_real_model_corrupt(void)
{
    char path[1024];
    size_t json_len, weights_len;
    model_path(path, sizeof path, "mobilenet_v2", "model.json");
    char *text = (char *)read_all(path, &json_len);
    model_path(path, sizeof path, "mobilenet_v2", "group1-shard1of1.bin");
    unsigned char *weights = read_all(path, &weights_len);
    json_error_t jerr;
    json_t *orig = text ? json_loadb(text, json_len, 0, &jerr) : NULL;
    if (!orig || !weights) {
        TEST_FAIL_AT("cannot read the MobileNetV2 files under %s; run tools/fetch-models.sh",
                     data_dir());
        goto done;
    }
    for (int edit = 0; edit < 5; edit++) {
        json_t *root = json_deep_copy(orig);
        size_t len = weights_len;
        const char *part = NULL;
        switch (edit) {
        case 0: part = NULL; break;  /* unchanged: must import */
        case 1:
            json_object_set_new(config_of(root, "Conv1"), "kernel_size",
                                json_pack("[i,i]", 5, 5));
            part = "Conv1/kernel";
            break;
        case 2:
            json_object_set_new(layer_of(root, "out_relu"), "class_name",
                                json_string("LeakyReLU"));
            part = "LeakyReLU";
            break;
        case 3:
            json_object_set_new(json_object_get(manifest_entry(root, "Conv1/kernel"),
                                                "quantization"), "dtype", json_string("int4"));
            part = "int4";
            break;
        case 4:
            len = weights_len / 2;
            part = "shards";
            break;
        }
        char *doc = json_dumps(root, JSON_COMPACT);
        graph *g = NULL;
        top_error err;
        top_error_clear(&err);
        top_status st = keras_import_buffers(&g, doc, strlen(doc), weights, len, &err);
        if (!part) {
            CHECK_MSG(st == TOP_OK, "unchanged model.json: %s", err.message);
            CHECK(g != NULL);
            if (g)
                CHECK_INT_EQ(count_params(g, 0), 2619461);
        } else {
            CHECK_MSG(st != TOP_OK && g == NULL, "edit %d: status %s", edit,
                      top_status_str(st));
            CHECK_MSG(strstr(err.message, part) != NULL, "edit %d: \"%s\" does not name %s",
                      edit, err.message, part);
        }
        graph_free(g);
        free(doc);
        json_decref(root);
    }
done:
    json_decref(orig);
    free(text);
    free(weights);
}

int main(void)
{
    TEST_RUN(test_tiny_model_forward);
    TEST_RUN(test_tiny_model_layouts);
    TEST_RUN(test_merge_model_structure);
    TEST_RUN(test_tiny_model_corrupt);
    TEST_RUN(test_malformed_json);
    TEST_RUN(test_missing_file);
    TEST_RUN(test_real_model_weight_layouts);
    TEST_RUN(test_real_model_other_input_size);
    TEST_RUN(test_real_model_corrupt);
    TEST_RUN(test_mobilenet_v2_golden);
    TEST_RUN(test_inception_v3_golden);
    return TEST_FINISH();
}
