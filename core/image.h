/*
 * Images: PNG and JPEG decoding (libpng, libjpeg-turbo) to 8-bit HWC pixels,
 * and the conversion of one image to a model's input per graph_preprocess.
 *
 * Decoding is bounded: images over the configured maximum width, height or
 * pixel count are rejected before their pixels are allocated. Errors name the
 * file and the problem. Thread-safe: no shared state.
 */
#ifndef TOPIARY_IMAGE_H
#define TOPIARY_IMAGE_H

#include <stddef.h>
#include <stdint.h>

#include "graph.h"
#include "status.h"

typedef struct image_u8 {
    int height, width, channels; /* channels: 1 (gray) or 3 (RGB) */
    unsigned char *pixels;       /* (H, W, C), row-major, owned */
} image_u8;

typedef struct image_limits {
    int max_width, max_height; /* 0: the defaults below */
    size_t max_pixels;
} image_limits;

#define IMAGE_DEFAULT_MAX_SIDE 8192
#define IMAGE_DEFAULT_MAX_PIXELS ((size_t)40000000)

/* Decodes a PNG or JPEG file (detected by its magic bytes). Gray stays 1
 * channel, gray+alpha and RGBA drop alpha, palette and 16-bit PNGs become 8-bit.
 * lim may be NULL for the defaults. */
top_status image_load(image_u8 *out, const char *path, const image_limits *lim, top_error *err);
/* The same from memory; `what` names the source in errors. */
top_status image_decode(image_u8 *out, const void *data, size_t size, const char *what,
                        const image_limits *lim, top_error *err);
void image_free(image_u8 *img);

/*
 * Writes the model input for img into out: (C, H, W) float32 with C, H, W from
 * pp. Steps: gray to RGB (or RGB to gray if pp->channels is 1), optional
 * short-side resize and center crop, bilinear resize to (H, W) with pp's
 * align-corners convention, then v = (pixel * scale - mean[c]) / std[c].
 */
top_status image_preprocess(float *out, const image_u8 *img, const graph_preprocess *pp,
                            top_error *err);

#endif
