/*
 * PNG and JPEG decoding to 8-bit (H, W, C) pixels, and image_preprocess.
 *
 * Decoding: the format comes from the magic bytes, never the file name.
 * libpng and libjpeg report fatal errors through callbacks that longjmp back
 * here (libjpeg's default handler would call exit()). Width, height and pixel
 * count are checked against the limits from the header, before the pixel
 * buffer is allocated. A JPEG that ends early is an error, although libjpeg
 * only warns and pads it with gray. PNG gray stays 1 channel, and palette,
 * gray+alpha, RGB and RGBA become 1 or 3 channels of 8 bits. 16-bit samples
 * keep their high byte, and alpha is dropped, not composited.
 *
 * Preprocessing, per output pixel (y, x) and channel c:
 *   src = y * (in - 1) / (out - 1)                     align_corners = 1
 *   src = max(0, (y + 0.5) * in / out - 0.5)           align_corners = 0
 *   v   = lerp(lerp(tl, tr, fx), lerp(bl, br, fx), fy) (double, then float)
 *   out = (v * scale - mean[c]) / std[c]               (float)
 * align_corners = 1 follows the TF.js CPU kernel of resizeBilinear
 * (alignCorners = true): the same interpolation order, computed in double and
 * rounded to float once. align_corners = 0 is PyTorch's F.interpolate
 * (align_corners = False, antialias = False).
 *
 * Thread-safe: no shared state. Not done: alpha compositing, colour
 * management (ICC, gamma), EXIF orientation, antialiased downscaling (so a
 * large downscale differs from PIL's or torchvision's antialiased resize).
 */
#include "image.h"
#include "fileio.h"

#include <errno.h>
#include <math.h>
#include <png.h>
#include <setjmp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <jerror.h>
#include <jpeglib.h>

/* Shapes: H, W, C of the decoded image; (C, H, W) of the model input. */

/* Files larger than this are rejected before they are read. */
#define IMAGE_MAX_FILE_BYTES ((size_t)1 << 30)

static const unsigned char png_magic[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};

static void resolve_limits(image_limits *out, const image_limits *lim)
{
    out->max_width = (lim && lim->max_width > 0) ? lim->max_width : IMAGE_DEFAULT_MAX_SIDE;
    out->max_height = (lim && lim->max_height > 0) ? lim->max_height : IMAGE_DEFAULT_MAX_SIDE;
    out->max_pixels = (lim && lim->max_pixels > 0) ? lim->max_pixels : IMAGE_DEFAULT_MAX_PIXELS;
}

/* Checks a header's dimensions against the limits; returns the pixel count. */
static top_status check_dims(size_t *pixels, unsigned long width, unsigned long height,
                             const image_limits *lim, const char *what, top_error *err)
{
    if (width == 0 || height == 0)
        return top_error_set(err, TOP_ERR_FORMAT, "%s: image has zero size (%lux%lu)", what,
                             width, height);
    if (width > (unsigned long)lim->max_width || height > (unsigned long)lim->max_height)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: image is %lux%lu, over the maximum of %dx%d; "
                             "shrink it or raise the image limits",
                             what, width, height, lim->max_width, lim->max_height);
    if (top_size_mul(pixels, width, height) != 0 || *pixels > lim->max_pixels)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: image is %lux%lu, over the maximum of %zu pixels; "
                             "shrink it or raise the image limits",
                             what, width, height, lim->max_pixels);
    return TOP_OK;
}

/* ---- PNG ---------------------------------------------------------------- */

typedef struct png_source {
    const unsigned char *data;
    size_t size, pos;
    char message[200]; /* libpng's fatal error text */
} png_source;

static void png_read_memory(png_structp png, png_bytep out, size_t n)
{
    png_source *src = png_get_io_ptr(png);
    if (n > src->size - src->pos)
        png_error(png, "file is truncated");
    memcpy(out, src->data + src->pos, n);
    src->pos += n;
}

static void png_on_error(png_structp png, png_const_charp message)
{
    png_source *src = png_get_error_ptr(png);
    snprintf(src->message, sizeof src->message, "%s", message);
    png_longjmp(png, 1);
}

static void png_on_warning(png_structp png, png_const_charp message)
{
    (void)png;
    (void)message;
}

/* Asks libpng for 8-bit gray or 8-bit RGB, without alpha. */
static void png_set_transforms(png_structp png, png_infop info)
{
    int color = png_get_color_type(png, info);
    if (color == PNG_COLOR_TYPE_PALETTE)
        png_set_palette_to_rgb(png);
    if (color == PNG_COLOR_TYPE_GRAY && png_get_bit_depth(png, info) < 8)
        png_set_expand_gray_1_2_4_to_8(png);
    if (png_get_bit_depth(png, info) == 16)
        png_set_strip_16(png);
    if (color & PNG_COLOR_MASK_ALPHA)
        png_set_strip_alpha(png);
    png_set_interlace_handling(png);
    png_read_update_info(png, info);
}

typedef struct png_job {
    png_structp png;
    png_infop info;
    unsigned char *pixels;
    png_bytep *rows;
} png_job;

/* Runs every libpng call that may longjmp; returns 0 or -1 after an error.
 * Kept apart so that no local of the caller changes between setjmp and
 * longjmp. */
static int png_decode_steps(png_job *job, image_u8 *out, const image_limits *lim,
                            const char *what, top_error *err)
{
    png_structp png = job->png;
    png_infop info = job->info;
    if (setjmp(png_jmpbuf(png)))
        return -1;

    png_read_info(png, info);
    size_t pixels;
    if (check_dims(&pixels, png_get_image_width(png, info), png_get_image_height(png, info),
                   lim, what, err) != TOP_OK)
        return -2;

    png_set_transforms(png, info);
    int channels = png_get_channels(png, info);
    int width = (int)png_get_image_width(png, info);
    int height = (int)png_get_image_height(png, info);
    if ((channels != 1 && channels != 3) ||
        png_get_rowbytes(png, info) != (size_t)width * (size_t)channels) {
        top_error_set(err, TOP_ERR_UNSUPPORTED,
                      "%s: png layout with %d channels is not supported", what, channels);
        return -2;
    }

    job->pixels = malloc(pixels * (size_t)channels);
    job->rows = malloc((size_t)height * sizeof *job->rows);
    if (!job->pixels || !job->rows) {
        top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory for a %dx%d image", what, width,
                      height);
        return -2;
    }
    for (int y = 0; y < height; y++)
        job->rows[y] = job->pixels + (size_t)y * (size_t)width * (size_t)channels;
    png_read_image(png, job->rows);
    png_read_end(png, NULL);

    out->width = width;
    out->height = height;
    out->channels = channels;
    return 0;
}

static top_status decode_png(image_u8 *out, const void *data, size_t size, const char *what,
                             const image_limits *lim, top_error *err)
{
    png_source src = {.data = data, .size = size};
    png_job job = {0};
    top_status st = TOP_OK;

    job.png = png_create_read_struct(PNG_LIBPNG_VER_STRING, &src, png_on_error, png_on_warning);
    if (job.png)
        job.info = png_create_info_struct(job.png);
    if (!job.png || !job.info) {
        st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory for the png decoder", what);
        goto done;
    }
    png_set_read_fn(job.png, &src, png_read_memory);

    int rc = png_decode_steps(&job, out, lim, what, err);
    if (rc == -1)
        st = top_error_set(err, TOP_ERR_FORMAT, "%s: invalid png: %s", what, src.message);
    else if (rc == -2)
        st = err ? err->status : TOP_ERR_FORMAT;
    if (st == TOP_OK) {
        out->pixels = job.pixels;
        job.pixels = NULL;
    }

done:
    png_destroy_read_struct(job.png ? &job.png : NULL, job.info ? &job.info : NULL, NULL);
    free(job.rows);
    free(job.pixels);
    return st;
}

/* ---- JPEG --------------------------------------------------------------- */

typedef struct jpeg_error {
    struct jpeg_error_mgr mgr;
    jmp_buf jump;
    char message[JMSG_LENGTH_MAX];
} jpeg_error;

static void jpeg_on_error(j_common_ptr cinfo)
{
    jpeg_error *e = (jpeg_error *)cinfo->err;
    e->mgr.format_message(cinfo, e->message);
    longjmp(e->jump, 1);
}

/* libjpeg only warns when data ends early and pads the image with gray; a
 * truncated file is an error here. Other warnings are ignored. */
static void jpeg_on_message(j_common_ptr cinfo, int level)
{
    jpeg_error *e = (jpeg_error *)cinfo->err;
    if (level == -1 && (e->mgr.msg_code == JWRN_JPEG_EOF || e->mgr.msg_code == JWRN_HIT_MARKER))
        jpeg_on_error(cinfo);
}

typedef struct jpeg_job {
    struct jpeg_decompress_struct cinfo;
    jpeg_error jerr;
    unsigned char *pixels;
} jpeg_job;

/* Runs every libjpeg call that may longjmp; returns 0, -1 after a libjpeg
 * error or -2 after an error recorded in err. */
static int jpeg_decode_steps(jpeg_job *job, image_u8 *out, const void *data, size_t size,
                             const image_limits *lim, const char *what, top_error *err)
{
    struct jpeg_decompress_struct *cinfo = &job->cinfo;
    if (setjmp(job->jerr.jump))
        return -1;

    jpeg_create_decompress(cinfo);
    jpeg_mem_src(cinfo, data, (unsigned long)size);
    jpeg_read_header(cinfo, TRUE);
    size_t pixels;
    if (check_dims(&pixels, cinfo->image_width, cinfo->image_height, lim, what, err) != TOP_OK)
        return -2;
    if (cinfo->jpeg_color_space == JCS_CMYK || cinfo->jpeg_color_space == JCS_YCCK) {
        top_error_set(err, TOP_ERR_UNSUPPORTED,
                      "%s: cmyk jpeg is not supported; convert it to rgb", what);
        return -2;
    }
    cinfo->out_color_space = cinfo->jpeg_color_space == JCS_GRAYSCALE ? JCS_GRAYSCALE : JCS_RGB;
    jpeg_start_decompress(cinfo);

    int channels = cinfo->output_components;
    size_t row_bytes = (size_t)cinfo->output_width * (size_t)channels;
    job->pixels = malloc(pixels * (size_t)channels);
    if (!job->pixels) {
        top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory for a %ux%u image", what,
                      cinfo->output_width, cinfo->output_height);
        return -2;
    }
    while (cinfo->output_scanline < cinfo->output_height) {
        JSAMPROW row = job->pixels + (size_t)cinfo->output_scanline * row_bytes;
        jpeg_read_scanlines(cinfo, &row, 1);
    }
    jpeg_finish_decompress(cinfo);

    out->width = (int)cinfo->output_width;
    out->height = (int)cinfo->output_height;
    out->channels = channels;
    return 0;
}

static top_status decode_jpeg(image_u8 *out, const void *data, size_t size, const char *what,
                              const image_limits *lim, top_error *err)
{
    jpeg_job *job = calloc(1, sizeof *job);
    if (!job)
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory for the jpeg decoder",
                             what);
    job->cinfo.err = jpeg_std_error(&job->jerr.mgr);
    job->jerr.mgr.error_exit = jpeg_on_error;
    job->jerr.mgr.emit_message = jpeg_on_message;

    top_status st = TOP_OK;
    int rc = jpeg_decode_steps(job, out, data, size, lim, what, err);
    if (rc == -1)
        st =
            top_error_set(err, TOP_ERR_FORMAT, "%s: invalid jpeg: %s", what, job->jerr.message);
    else if (rc == -2)
        st = err ? err->status : TOP_ERR_FORMAT;
    if (st == TOP_OK) {
        out->pixels = job->pixels;
        job->pixels = NULL;
    }
    jpeg_destroy_decompress(&job->cinfo);
    free(job->pixels);
    free(job);
    return st;
}

/* ---- entry points ------------------------------------------------------- */

top_status image_decode(image_u8 *out, const void *data, size_t size, const char *what,
                        const image_limits *lim, top_error *err)
{
    if (!out)
        return top_error_set(err, TOP_ERR_INVALID, "image_decode: out is NULL");
    memset(out, 0, sizeof *out);
    if (!what)
        what = "image";
    if (!data && size > 0)
        return top_error_set(err, TOP_ERR_INVALID, "%s: data is NULL", what);

    image_limits limits;
    resolve_limits(&limits, lim);
    const unsigned char *bytes = data;
    if (size >= 8 && memcmp(bytes, png_magic, 8) == 0)
        return decode_png(out, data, size, what, &limits, err);
    if (size >= 3 && bytes[0] == 0xff && bytes[1] == 0xd8 && bytes[2] == 0xff)
        return decode_jpeg(out, data, size, what, &limits, err);
    return top_error_set(err, TOP_ERR_FORMAT,
                         "%s: not a png or jpeg file (unknown magic bytes, %zu bytes long)",
                         what, size);
}

top_status image_load(image_u8 *out, const char *path, const image_limits *lim, top_error *err)
{
    if (!out || !path)
        return top_error_set(err, TOP_ERR_INVALID, "image_load: out or path is NULL");
    memset(out, 0, sizeof *out);

    FILE *f = top_fopen_regular(path, err);
    if (!f)
        return err ? err->status : TOP_ERR_IO;
    top_status st = TOP_OK;
    unsigned char *data = NULL;
    long end = -1;
    if (fseek(f, 0, SEEK_END) == 0)
        end = ftell(f);
    if (end < 0 || fseek(f, 0, SEEK_SET) != 0) {
        st = top_error_set(err, TOP_ERR_IO, "%s: cannot seek: %s", path, strerror(errno));
        goto done;
    }
    if ((size_t)end > IMAGE_MAX_FILE_BYTES) {
        st = top_error_set(err, TOP_ERR_LIMIT, "%s: file is %ld bytes, over the maximum of %zu",
                           path, end, IMAGE_MAX_FILE_BYTES);
        goto done;
    }
    data = malloc(end > 0 ? (size_t)end : 1);
    if (!data) {
        st =
            top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory reading %ld bytes", path, end);
        goto done;
    }
    if (fread(data, 1, (size_t)end, f) != (size_t)end) {
        st = top_error_set(err, TOP_ERR_IO, "%s: read failed", path);
        goto done;
    }
    st = image_decode(out, data, (size_t)end, path, lim, err);

done:
    free(data);
    fclose(f);
    return st;
}

void image_free(image_u8 *img)
{
    if (!img)
        return;
    free(img->pixels);
    memset(img, 0, sizeof *img);
}

/* ---- preprocessing ------------------------------------------------------ */

/* Source sample positions along one axis: output index i reads source
 * indices lo[i] and hi[i] with weight frac[i] on hi. */
typedef struct axis_map {
    int *lo, *hi;
    double *frac;
} axis_map;

/*
 * Maps n_out outputs that start at `offset` inside a virtual resize of n_in
 * samples to n_mid samples (offset > 0 is a center crop of that resize).
 */
static void axis_map_fill(axis_map *m, int n_in, int n_mid, int offset, int n_out,
                          int align_corners)
{
    double ratio;
    if (align_corners && n_mid > 1)
        ratio = (double)(n_in - 1) / (double)(n_mid - 1);
    else
        ratio = (double)n_in / (double)n_mid;

    for (int i = 0; i < n_out; i++) {
        double t = (double)(i + offset);
        double src = align_corners ? ratio * t : ratio * (t + 0.5) - 0.5;
        if (src < 0.0)
            src = 0.0;
        double fl = floor(src);
        int lo = fl > (double)(n_in - 1) ? n_in - 1 : (int)fl;
        int hi = (int)ceil(src);
        if (hi > n_in - 1)
            hi = n_in - 1;
        m->lo[i] = lo;
        m->hi[i] = hi;
        m->frac[i] = src - (double)lo;
    }
}

/* One source sample converted to the output channel count: gray is
 * replicated to RGB, RGB becomes gray by ITU-R BT.601 luma. */
static double sample_at(const image_u8 *img, int y, int x, int c, int out_channels)
{
    const unsigned char *p =
        img->pixels + ((size_t)y * (size_t)img->width + (size_t)x) * (size_t)img->channels;
    if (img->channels == out_channels)
        return (double)p[c];
    if (img->channels == 1)
        return (double)p[0];
    return 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2];
}

/* Virtual resize target and crop offsets for pp (see graph_preprocess). */
static top_status plan_geometry(int *mid_h, int *mid_w, int *top, int *left,
                                const image_u8 *img, const graph_preprocess *pp, top_error *err)
{
    *mid_h = pp->height;
    *mid_w = pp->width;
    *top = *left = 0;
    if (pp->resize_short_side <= 0)
        return TOP_OK;

    /* torchvision Resize(int): the short side becomes S, the long side
     * int(S * long / short); CenterCrop rounds (mid - out) / 2 half to even. */
    double s = (double)pp->resize_short_side;
    if (img->height <= img->width) {
        *mid_h = pp->resize_short_side;
        *mid_w = (int)(s * img->width / img->height);
    } else {
        *mid_w = pp->resize_short_side;
        *mid_h = (int)(s * img->height / img->width);
    }
    if (*mid_h < pp->height || *mid_w < pp->width)
        return top_error_set(err, TOP_ERR_INVALID,
                             "preprocess: center crop %dx%d is larger than the resized "
                             "image %dx%d; raise resize_short_side",
                             pp->width, pp->height, *mid_w, *mid_h);
    *top = (int)nearbyint((*mid_h - pp->height) / 2.0);
    *left = (int)nearbyint((*mid_w - pp->width) / 2.0);
    return TOP_OK;
}

static top_status check_preprocess_args(const float *out, const image_u8 *img,
                                        const graph_preprocess *pp, top_error *err)
{
    if (!out || !img || !pp || !img->pixels)
        return top_error_set(err, TOP_ERR_INVALID,
                             "image_preprocess: NULL argument or empty image");
    if (img->channels != 1 && img->channels != 3)
        return top_error_set(err, TOP_ERR_INVALID,
                             "image_preprocess: image has %d channels, expected 1 or 3",
                             img->channels);
    if (img->width <= 0 || img->height <= 0)
        return top_error_set(err, TOP_ERR_INVALID, "image_preprocess: image is %dx%d",
                             img->width, img->height);
    if (pp->channels != 1 && pp->channels != 3)
        return top_error_set(err, TOP_ERR_INVALID,
                             "image_preprocess: model input has %d channels, expected 1 or 3",
                             pp->channels);
    if (pp->height <= 0 || pp->width <= 0 || pp->height > IMAGE_DEFAULT_MAX_SIDE ||
        pp->width > IMAGE_DEFAULT_MAX_SIDE || pp->resize_short_side > IMAGE_DEFAULT_MAX_SIDE)
        return top_error_set(err, TOP_ERR_INVALID,
                             "image_preprocess: model input %dx%d (short side %d) is out of "
                             "range 1..%d",
                             pp->width, pp->height, pp->resize_short_side,
                             IMAGE_DEFAULT_MAX_SIDE);
    for (int c = 0; c < pp->channels; c++)
        if (!(pp->std[c] != 0.0f) || !isfinite(pp->std[c]))
            return top_error_set(
                err, TOP_ERR_INVALID,
                "image_preprocess: std[%d] = %g; it must be finite and nonzero", c,
                (double)pp->std[c]);
    return TOP_OK;
}

/* out: (C, H, W) with C, H, W from pp.  img: (h, w, c) u8. */
top_status image_preprocess(float *out, const image_u8 *img, const graph_preprocess *pp,
                            top_error *err)
{
    top_status st = check_preprocess_args(out, img, pp, err);
    if (st != TOP_OK)
        return st;
    int mid_h, mid_w, top, left;
    st = plan_geometry(&mid_h, &mid_w, &top, &left, img, pp, err);
    if (st != TOP_OK)
        return st;

    int H = pp->height, W = pp->width, C = pp->channels;
    axis_map ym = {0}, xm = {0};
    ym.lo = malloc((size_t)H * sizeof(int));
    ym.hi = malloc((size_t)H * sizeof(int));
    ym.frac = malloc((size_t)H * sizeof(double));
    xm.lo = malloc((size_t)W * sizeof(int));
    xm.hi = malloc((size_t)W * sizeof(int));
    xm.frac = malloc((size_t)W * sizeof(double));
    if (!ym.lo || !ym.hi || !ym.frac || !xm.lo || !xm.hi || !xm.frac) {
        st = top_error_set(err, TOP_ERR_NOMEM, "image_preprocess: out of memory");
        goto done;
    }
    axis_map_fill(&ym, img->height, mid_h, top, H, pp->align_corners);
    axis_map_fill(&xm, img->width, mid_w, left, W, pp->align_corners);

    for (int c = 0; c < C; c++) {
        float *plane = out + (size_t)c * (size_t)H * (size_t)W;
        for (int y = 0; y < H; y++) {
            double fy = ym.frac[y];
            for (int x = 0; x < W; x++) {
                double fx = xm.frac[x];
                double tl = sample_at(img, ym.lo[y], xm.lo[x], c, C);
                double tr = sample_at(img, ym.lo[y], xm.hi[x], c, C);
                double bl = sample_at(img, ym.hi[y], xm.lo[x], c, C);
                double br = sample_at(img, ym.hi[y], xm.hi[x], c, C);
                double t = tl + (tr - tl) * fx;
                double b = bl + (br - bl) * fx;
                float v = (float)(t + (b - t) * fy);
                plane[(size_t)y * (size_t)W + (size_t)x] =
                    (v * pp->scale - pp->mean[c]) / pp->std[c];
            }
        }
    }

done:
    free(ym.lo);
    free(ym.hi);
    free(ym.frac);
    free(xm.lo);
    free(xm.hi);
    free(xm.frac);
    return st;
}
