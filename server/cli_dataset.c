/*
 * `topiary dataset inspect URI` and `topiary dataset convert URI --out FILE`:
 * look at a labelled data set (counts per class, image sizes) and turn any
 * readable data set into a safetensors bundle. Run on the calling thread.
 */
#include <getopt.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jansson.h>

#include "cli.h"
#include "dataset.h"
#include "safetensors.h"

/* The bundle is built in memory (the pixels are held twice while writing),
 * so convert refuses data sets over this many pixel bytes. */
#define CONVERT_MAX_BYTES ((size_t)1 << 30)

/* Images decoded by inspect to report sizes: spread evenly over the set. */
#define INSPECT_SIZE_SAMPLES 1000

static int open_dataset(dataset **ds, const char *uri)
{
    top_error err;
    top_error_clear(&err);
    if (dataset_open(ds, uri, NULL, &err) != TOP_OK) {
        fprintf(stderr, "topiary: cannot open data set: %s\n", err.message);
        return -1;
    }
    return 0;
}

static int dataset_inspect(const char *uri)
{
    dataset *ds = NULL;
    if (open_dataset(&ds, uri))
        return 1;
    size_t n = dataset_count(ds);
    int classes = dataset_class_count(ds);
    size_t *per_class = calloc((size_t)classes + 1, sizeof *per_class);
    if (!per_class) {
        dataset_close(ds);
        return 1;
    }
    const int *labels = dataset_labels(ds);
    for (size_t i = 0; i < n; i++)
        per_class[labels[i]]++;

    int min_h = 0, max_h = 0, min_w = 0, max_w = 0, channels = 0, sampled = 0;
    size_t step = n > INSPECT_SIZE_SAMPLES ? n / INSPECT_SIZE_SAMPLES : 1;
    for (size_t i = 0; i < n; i += step) {
        image_u8 img = {0};
        top_error err;
        top_error_clear(&err);
        if (dataset_get(ds, i, &img, &err) != TOP_OK) {
            fprintf(stderr, "topiary: %s\n", err.message);
            free(per_class);
            dataset_close(ds);
            return 1;
        }
        if (!sampled++ || img.height < min_h)
            min_h = img.height;
        if (sampled == 1 || img.width < min_w)
            min_w = img.width;
        max_h = img.height > max_h ? img.height : max_h;
        max_w = img.width > max_w ? img.width : max_w;
        channels |= img.channels;
        image_free(&img);
    }

    printf("data set   %s\n", dataset_uri(ds));
    printf("images     %zu%s\n", n, dataset_is_streaming(ds) ? " (streamed)" : "");
    printf("classes    %d\n", classes);
    printf("sizes      %dx%d to %dx%d (height x width), %s, from %d decoded images\n", min_h,
           min_w, max_h, max_w,
           channels == 1   ? "gray"
           : channels == 3 ? "RGB"
                           : "gray and RGB",
           sampled);
    printf("\n%-6s %-24s %s\n", "class", "name", "images");
    for (int c = 0; c < classes; c++)
        printf("%-6d %-24s %zu\n", c, dataset_class_name(ds, c), per_class[c]);
    free(per_class);
    dataset_close(ds);
    return 0;
}

/* Copies every image into one (N, H, W, C) buffer; all images must share
 * one size and channel count. */
static int gather_images(unsigned char **pixels, int shape[3], const dataset *ds)
{
    size_t n = dataset_count(ds), per_image = 0;
    *pixels = NULL;
    for (size_t i = 0; i < n; i++) {
        image_u8 img = {0};
        top_error err;
        top_error_clear(&err);
        if (dataset_get(ds, i, &img, &err) != TOP_OK) {
            fprintf(stderr, "topiary: %s\n", err.message);
            return -1;
        }
        if (i == 0) {
            shape[0] = img.height, shape[1] = img.width, shape[2] = img.channels;
            per_image = (size_t)img.height * (size_t)img.width * (size_t)img.channels;
            size_t total;
            if (top_size_mul(&total, per_image, n) || total > CONVERT_MAX_BYTES) {
                fprintf(stderr,
                        "topiary: %zu images of %zu bytes exceed the %zu-byte limit of "
                        "dataset convert; convert a class subset or a smaller data set\n",
                        n, per_image, CONVERT_MAX_BYTES);
                image_free(&img);
                return -1;
            }
            *pixels = malloc(total);
        }
        if (img.height != shape[0] || img.width != shape[1] || img.channels != shape[2]) {
            fprintf(stderr,
                    "topiary: image %zu is %dx%dx%d but image 0 is %dx%dx%d; a bundle needs "
                    "one size, so resize the images first\n",
                    i, img.height, img.width, img.channels, shape[0], shape[1], shape[2]);
            image_free(&img);
            return -1;
        }
        if (!*pixels) {
            fprintf(stderr, "topiary: out of memory for %zu images of %zu bytes\n", n,
                    per_image);
            image_free(&img);
            return -1;
        }
        memcpy(*pixels + per_image * i, img.pixels, per_image);
        image_free(&img);
    }
    return 0;
}

static char *class_names_json(const dataset *ds)
{
    json_t *names = json_array();
    for (int c = 0; c < dataset_class_count(ds); c++)
        json_array_append_new(names, json_string(dataset_class_name(ds, c)));
    char *text = json_dumps(names, JSON_COMPACT);
    json_decref(names);
    return text;
}

static int write_bundle(const dataset *ds, const unsigned char *pixels, const int shape[3],
                        const char *out)
{
    size_t n = dataset_count(ds);
    int32_t *labels = malloc(n * sizeof *labels + 1);
    char *names = class_names_json(ds);
    st_writer *w = NULL;
    top_error err;
    top_error_clear(&err);
    int rc = -1;
    if (!labels || !names) {
        fprintf(stderr, "topiary: out of memory for %zu labels\n", n);
        goto done;
    }
    for (size_t i = 0; i < n; i++)
        labels[i] = dataset_labels(ds)[i];
    int64_t image_shape[4] = {(int64_t)n, shape[0], shape[1], shape[2]};
    int64_t label_shape[1] = {(int64_t)n};
    size_t image_bytes = n * (size_t)shape[0] * (size_t)shape[1] * (size_t)shape[2];
    if (st_writer_new(&w, &err) != TOP_OK ||
        st_writer_set_metadata(w, "class_names", names, &err) != TOP_OK ||
        st_writer_add(w, "images", ST_DTYPE_U8, 4, image_shape, pixels, image_bytes, &err) !=
            TOP_OK ||
        st_writer_add(w, "labels", ST_DTYPE_I32, 1, label_shape, labels, n * sizeof *labels,
                      &err) != TOP_OK ||
        st_writer_write(w, out, &err) != TOP_OK) {
        fprintf(stderr, "topiary: cannot write bundle: %s\n", err.message);
        goto done;
    }
    printf("wrote %s: %zu images of %dx%dx%d, %d classes\n", out, n, shape[0], shape[1],
           shape[2], dataset_class_count(ds));
    rc = 0;
done:
    st_writer_free(w);
    free(names);
    free(labels);
    return rc;
}

static int dataset_convert(const char *uri, const char *out)
{
    dataset *ds = NULL;
    if (open_dataset(&ds, uri))
        return 1;
    unsigned char *pixels = NULL;
    int shape[3] = {0, 0, 0};
    int rc = 1;
    if (dataset_count(ds) == 0)
        fprintf(stderr, "topiary: data set '%s' has no images\n", uri);
    else if (gather_images(&pixels, shape, ds) == 0 &&
             write_bundle(ds, pixels, shape, out) == 0)
        rc = 0;
    free(pixels);
    dataset_close(ds);
    return rc;
}

static void dataset_usage(FILE *out)
{
    fprintf(out, "usage: topiary dataset inspect URI\n"
                 "       topiary dataset convert URI --out FILE.safetensors\n\n"
                 "inspect prints the image count, the images per class and the image sizes.\n"
                 "convert writes any data set whose images share one size as a bundle\n"
                 "(safetensors: images U8 N x H x W x C, labels I32, class names).\n"
                 "URI forms: idx:IMAGES,LABELS  folder:DIR  bundle:FILE  digits-grid:FILE\n");
}

int cli_dataset(int argc, char **argv)
{
    if (argc >= 2 && (!strcmp(argv[1], "--help") || !strcmp(argv[1], "-h"))) {
        dataset_usage(stdout);
        return 0;
    }
    if (argc == 3 && !strcmp(argv[1], "inspect"))
        return dataset_inspect(argv[2]);
    if (argc == 5 && !strcmp(argv[1], "convert") && !strcmp(argv[3], "--out"))
        return dataset_convert(argv[2], argv[4]);
    dataset_usage(stderr);
    return 2;
}
