/*
 * Tests of core/image.c: decoded pixels of real PNG and JPEG files against
 * Pillow, PNG layouts that need conversion, bilinear resizing against
 * PyTorch, normalisation, and clear errors on bad files.
 *
 * Fixtures: tests/golden/image_pixels.json, the PNGs in tests/golden/png/ and
 * tests/golden/resize_bilinear.json, written by tests/golden/make_image_golden.py.
 * The real files come from tools/fetch-data.sh under $TOPIARY_DATA_DIR
 * (default "data").
 */
#include <jansson.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "image.h"
#include "test.h"

static const char *data_dir(void)
{
    const char *d = getenv("TOPIARY_DATA_DIR");
    return d && *d ? d : "data";
}

static uint64_t fnv1a64(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) {
        h ^= p[i];
        h *= 0x100000001b3ull;
    }
    return h;
}

static json_t *load_json(const char *path)
{
    json_error_t e;
    json_t *doc = json_load_file(path, 0, &e);
    CHECK_MSG(doc != NULL, "cannot read %s: %s (line %d)", path, e.text, e.line);
    return doc;
}

static unsigned char *read_file(const char *path, size_t *size)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    fseek(f, 0, SEEK_END);
    long n = ftell(f);
    fseek(f, 0, SEEK_SET);
    unsigned char *buf = malloc(n > 0 ? (size_t)n : 1);
    if (buf && fread(buf, 1, (size_t)n, f) != (size_t)n) {
        free(buf);
        buf = NULL;
    }
    fclose(f);
    *size = (size_t)n;
    return buf;
}

static int write_file(const char *path, const void *data, size_t size)
{
    FILE *f = fopen(path, "wb");
    if (!f)
        return -1;
    size_t n = fwrite(data, 1, size, f);
    return fclose(f) == 0 && n == size ? 0 : -1;
}

/* Real files: size, channels, 64 sampled pixels and a hash of all bytes. */
static void test_real_images_match_pillow(void)
{
    json_t *doc = load_json("tests/golden/image_pixels.json");
    if (!doc)
        return;
    json_t *images = json_object_get(doc, "images");
    CHECK(json_array_size(images) >= 7);
    size_t i;
    json_t *entry;
    json_array_foreach(images, i, entry)
    {
        char path[1024];
        snprintf(path, sizeof path, "%s/datasets/%s", data_dir(),
                 json_string_value(json_object_get(entry, "file")));
        if (access(path, R_OK) != 0) {
            TEST_FAIL_AT("%s is missing; run tools/fetch-data.sh first", path);
            continue;
        }
        image_u8 img;
        top_error err;
        top_error_clear(&err);
        top_status st = image_load(&img, path, NULL, &err);
        CHECK_MSG(st == TOP_OK, "%s: %s", path, err.message);
        if (st != TOP_OK)
            continue;
        CHECK_INT_EQ(img.width, json_integer_value(json_object_get(entry, "width")));
        CHECK_INT_EQ(img.height, json_integer_value(json_object_get(entry, "height")));
        CHECK_INT_EQ(img.channels, json_integer_value(json_object_get(entry, "channels")));
        size_t j;
        json_t *s;
        int mismatches = 0;
        json_array_foreach(json_object_get(entry, "samples"), j, s)
        {
            int y = (int)json_integer_value(json_array_get(s, 0));
            int x = (int)json_integer_value(json_array_get(s, 1));
            for (int c = 0; c < img.channels; c++) {
                int want = (int)json_integer_value(json_array_get(s, 2 + (size_t)c));
                int got = img.pixels[((size_t)y * (size_t)img.width + (size_t)x) *
                                         (size_t)img.channels +
                                     (size_t)c];
                if (got != want && mismatches++ < 5)
                    TEST_FAIL_AT("%s pixel (%d, %d) channel %d = %d, Pillow gives %d", path, y,
                                 x, c, got, want);
            }
        }
        char hash[17];
        snprintf(
            hash, sizeof hash, "%016llx",
            (unsigned long long)fnv1a64(img.pixels, (size_t)img.width * (size_t)img.height *
                                                        (size_t)img.channels));
        const char *want_hash = json_string_value(json_object_get(entry, "fnv1a64"));
        CHECK_MSG(strcmp(hash, want_hash) == 0, "%s: pixel hash %s, Pillow's is %s", path, hash,
                  want_hash);
        image_free(&img);
    }
    json_decref(doc);
}

/* Palette, 16-bit, gray+alpha, 1-bit and RGBA PNGs become 8-bit gray or RGB. */
static void test_png_layouts_convert(void)
{
    json_t *doc = load_json("tests/golden/image_pixels.json");
    if (!doc)
        return;
    size_t i;
    json_t *entry;
    json_array_foreach(json_object_get(doc, "synthetic"), i, entry)
    {
        char path[512];
        snprintf(path, sizeof path, "tests/golden/png/%s",
                 json_string_value(json_object_get(entry, "file")));
        image_u8 img;
        top_error err;
        top_error_clear(&err);
        if (image_load(&img, path, NULL, &err) != TOP_OK) {
            TEST_FAIL_AT("%s: %s", path, err.message);
            continue;
        }
        CHECK_INT_EQ(img.width, json_integer_value(json_object_get(entry, "width")));
        CHECK_INT_EQ(img.height, json_integer_value(json_object_get(entry, "height")));
        CHECK_INT_EQ(img.channels, json_integer_value(json_object_get(entry, "channels")));
        json_t *want = json_object_get(entry, "pixels");
        size_t n = (size_t)img.width * (size_t)img.height * (size_t)img.channels;
        CHECK_INT_EQ(json_array_size(want), n);
        for (size_t k = 0; k < n && k < json_array_size(want); k++) {
            int expected = (int)json_integer_value(json_array_get(want, k));
            if (img.pixels[k] != expected) {
                TEST_FAIL_AT("%s byte %zu = %d, expected %d", path, k, img.pixels[k], expected);
                break;
            }
        }
        image_free(&img);
    }
    json_decref(doc);
}

/* image_decode from memory gives the same pixels as image_load. */
static void test_decode_memory_matches_load(void)
{
    char path[1024];
    snprintf(path, sizeof path, "%s/datasets/photos/dog.jpg", data_dir());
    size_t size;
    unsigned char *data = read_file(path, &size);
    if (!data) {
        TEST_FAIL_AT("%s is missing; run tools/fetch-data.sh first", path);
        return;
    }
    image_u8 a, b;
    CHECK(image_load(&a, path, NULL, NULL) == TOP_OK);
    CHECK(image_decode(&b, data, size, "dog", NULL, NULL) == TOP_OK);
    CHECK_INT_EQ(a.width * a.height * a.channels, b.width * b.height * b.channels);
    if (a.pixels && b.pixels)
        CHECK(memcmp(a.pixels, b.pixels, (size_t)a.width * (size_t)a.height * 3) == 0);
    image_free(&a);
    image_free(&b);
    free(data);
}

/* Every case of the fixture: PyTorch bilinear (and torchvision resize+crop). */
static void test_resize_matches_pytorch(void)
{
    json_t *doc = load_json("tests/golden/resize_bilinear.json");
    if (!doc)
        return;
    size_t i;
    json_t *cs;
    CHECK(json_array_size(json_object_get(doc, "cases")) >= 17);
    json_array_foreach(json_object_get(doc, "cases"), i, cs)
    {
        image_u8 img = {
            .height = (int)json_integer_value(json_object_get(cs, "in_height")),
            .width = (int)json_integer_value(json_object_get(cs, "in_width")),
            .channels = (int)json_integer_value(json_object_get(cs, "channels")),
        };
        json_t *px = json_object_get(cs, "pixels");
        img.pixels = malloc(json_array_size(px));
        for (size_t k = 0; k < json_array_size(px); k++)
            img.pixels[k] = (unsigned char)json_integer_value(json_array_get(px, k));
        graph_preprocess pp = {
            .channels = img.channels,
            .height = (int)json_integer_value(json_object_get(cs, "out_height")),
            .width = (int)json_integer_value(json_object_get(cs, "out_width")),
            .align_corners = (int)json_integer_value(json_object_get(cs, "align_corners")),
            .resize_short_side =
                (int)json_integer_value(json_object_get(cs, "resize_short_side")),
            .scale = 1.0f,
            .std = {1, 1, 1},
        };
        json_t *want = json_object_get(cs, "expected");
        size_t n = (size_t)pp.channels * (size_t)pp.height * (size_t)pp.width;
        CHECK_INT_EQ(json_array_size(want), n);
        float *out = malloc(n * sizeof *out);
        top_error err;
        top_error_clear(&err);
        CHECK_MSG(image_preprocess(out, &img, &pp, &err) == TOP_OK, "case %zu: %s", i,
                  err.message);
        double worst = 0;
        size_t worst_at = 0;
        for (size_t k = 0; k < n && k < json_array_size(want); k++) {
            double d = fabs(out[k] - json_number_value(json_array_get(want, k)));
            if (d > worst) {
                worst = d;
                worst_at = k;
            }
        }
        CHECK_MSG(worst <= 2e-4,
                  "case %zu (%dx%d -> %dx%d, align_corners %d, short side %d): max error %g "
                  "at %zu, tolerance 2e-4",
                  i, img.width, img.height, pp.width, pp.height, pp.align_corners,
                  pp.resize_short_side, worst, worst_at);
        free(out);
        free(img.pixels);
    }
    json_decref(doc);
}

/* TF.js resizeBilinear(alignCorners = true) on [2, 2; 4, 4] -> 3x3 (its own
 * unit test's values), then scale, mean and std. */
static void test_preprocess_align_corners_and_normalise(void)
{
    unsigned char px[4] = {2, 2, 4, 4};
    image_u8 img = {.height = 2, .width = 2, .channels = 1, .pixels = px};
    graph_preprocess pp = {.channels = 1,
                           .height = 3,
                           .width = 3,
                           .align_corners = 1,
                           .scale = 0.5f,
                           .mean = {1.0f},
                           .std = {2.0f}};
    float out[9];
    CHECK(image_preprocess(out, &img, &pp, NULL) == TOP_OK);
    const float resized[9] = {2, 2, 2, 3, 3, 3, 4, 4, 4};
    for (int k = 0; k < 9; k++)
        CHECK_CLOSE_AT(out[k], (resized[k] * 0.5f - 1.0f) / 2.0f, 1e-6, k);
}

/* Gray replicates to RGB; RGB becomes gray by BT.601 luma. */
static void test_preprocess_channel_conversion(void)
{
    unsigned char gray[1] = {200};
    image_u8 g = {.height = 1, .width = 1, .channels = 1, .pixels = gray};
    graph_preprocess to_rgb = {.channels = 3,
                               .height = 1,
                               .width = 1,
                               .align_corners = 1,
                               .scale = 1.0f,
                               .mean = {0, 10, 20},
                               .std = {1, 1, 2}};
    float rgb[3];
    CHECK(image_preprocess(rgb, &g, &to_rgb, NULL) == TOP_OK);
    CHECK_CLOSE_AT(rgb[0], 200.0, 1e-5, 0);
    CHECK_CLOSE_AT(rgb[1], 190.0, 1e-5, 1);
    CHECK_CLOSE_AT(rgb[2], 90.0, 1e-5, 2);

    unsigned char color[3] = {255, 0, 100};
    image_u8 c = {.height = 1, .width = 1, .channels = 3, .pixels = color};
    graph_preprocess to_gray = {
        .channels = 1, .height = 1, .width = 1, .scale = 1.0f, .std = {1}};
    float v;
    CHECK(image_preprocess(&v, &c, &to_gray, NULL) == TOP_OK);
    CHECK_CLOSE(v, 0.299 * 255 + 0.114 * 100, 1e-4);
}

static void test_preprocess_rejects_bad_arguments(void)
{
    unsigned char px[4] = {0};
    image_u8 img = {.height = 2, .width = 2, .channels = 1, .pixels = px};
    graph_preprocess pp = {.channels = 1, .height = 4, .width = 4, .scale = 1, .std = {0}};
    float out[16];
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(image_preprocess(out, &img, &pp, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "std[0]") != NULL, "message: %s", err.message);

    pp.std[0] = 1;
    pp.resize_short_side = 2; /* a 2x2 resize cannot hold a 4x4 crop */
    top_error_clear(&err);
    CHECK_INT_EQ(image_preprocess(out, &img, &pp, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "center crop") != NULL, "message: %s", err.message);
}

/* Loads path and expects status st with a message naming the file and `what`. */
static void expect_load_error(const char *path, const image_limits *lim, top_status st,
                              const char *what)
{
    image_u8 img;
    top_error err;
    top_error_clear(&err);
    top_status got = image_load(&img, path, lim, &err);
    CHECK_MSG(got == st, "%s: status %s, expected %s (%s)", path, top_status_str(got),
              top_status_str(st), err.message);
    CHECK_MSG(strstr(err.message, path) != NULL, "message does not name %s: %s", path,
              err.message);
    CHECK_MSG(strcasestr(err.message, what) != NULL, "message lacks \"%s\": %s", what,
              err.message);
    CHECK(img.pixels == NULL);
    image_free(&img);
}

/* Writes the first `keep` bytes of src to dst. */
static int write_prefix(const char *dst, const char *src, double keep)
{
    size_t size;
    unsigned char *data = read_file(src, &size);
    if (!data)
        return -1;
    int rc = write_file(dst, data, (size_t)((double)size * keep));
    free(data);
    return rc;
}

static void test_bad_files_give_clear_errors(void)
{
    char dir[] = "/tmp/topiary-image-XXXXXX";
    if (!mkdtemp(dir)) {
        TEST_FAIL_AT("mkdtemp failed");
        return;
    }
    char src[1024], path[1200];

    snprintf(src, sizeof src, "%s/datasets/photos/graf1.png", data_dir());
    snprintf(path, sizeof path, "%s/half.png", dir);
    if (write_prefix(path, src, 0.5) != 0)
        TEST_FAIL_AT("%s is missing; run tools/fetch-data.sh first", src);
    else
        expect_load_error(path, NULL, TOP_ERR_FORMAT, "truncated");
    unlink(path);

    snprintf(src, sizeof src, "%s/datasets/photos/dog.jpg", data_dir());
    snprintf(path, sizeof path, "%s/half.jpg", dir);
    if (write_prefix(path, src, 0.5) != 0)
        TEST_FAIL_AT("%s is missing; run tools/fetch-data.sh first", src);
    else
        expect_load_error(path, NULL, TOP_ERR_FORMAT, "premature end");
    unlink(path);

    snprintf(path, sizeof path, "%s/notes.png", dir);
    const char *text = "this is a text file, not an image\n";
    CHECK(write_file(path, text, strlen(text)) == 0);
    expect_load_error(path, NULL, TOP_ERR_FORMAT, "not a png or jpeg");
    unlink(path);

    snprintf(path, sizeof path, "%s/empty.jpg", dir);
    CHECK(write_file(path, "", 0) == 0);
    expect_load_error(path, NULL, TOP_ERR_FORMAT, "not a png or jpeg");
    unlink(path);

    snprintf(path, sizeof path, "%s/missing.png", dir);
    expect_load_error(path, NULL, TOP_ERR_IO, "cannot open");

    /* graf1.png is 800x640 and dog.jpg 768x576: both over a 512 limit. */
    image_limits small = {.max_width = 512, .max_height = 512};
    snprintf(path, sizeof path, "%s/datasets/photos/graf1.png", data_dir());
    expect_load_error(path, &small, TOP_ERR_LIMIT, "over the maximum");
    snprintf(path, sizeof path, "%s/datasets/photos/dog.jpg", data_dir());
    expect_load_error(path, &small, TOP_ERR_LIMIT, "over the maximum");
    image_limits few = {.max_pixels = 1000};
    expect_load_error(path, &few, TOP_ERR_LIMIT, "1000 pixels");
    rmdir(dir);
}

int main(void)
{
    TEST_RUN(test_real_images_match_pillow);
    TEST_RUN(test_png_layouts_convert);
    TEST_RUN(test_decode_memory_matches_load);
    TEST_RUN(test_resize_matches_pytorch);
    TEST_RUN(test_preprocess_align_corners_and_normalise);
    TEST_RUN(test_preprocess_channel_conversion);
    TEST_RUN(test_preprocess_rejects_bad_arguments);
    TEST_RUN(test_bad_files_give_clear_errors);
    return TEST_FINISH();
}
