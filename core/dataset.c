/*
 * Data set readers (IDX, class folders, safetensors bundles, the OpenCV
 * digits grid), stratified task splits, and the prefetching batch iterator.
 *
 * Layout: fixed-size data sets keep pixels as (N, H, W, C) u8, either in
 * memory (`pixels`), behind a file descriptor at `data_offset` (streaming
 * IDX), or in a memory-mapped bundle. Folder data sets keep only the sorted
 * file list. Labels are always held as (N) int.
 *
 * Every size read from a file is bounded before use: counts by
 * DATASET_MAX_IMAGES, sides by the image limits, products overflow-checked.
 * See dataset.h for the URI forms, the memory budget and thread-safety.
 */
#include "dataset.h"
#include "fileio.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <unistd.h>
#include <zlib.h>

#include "safetensors.h"

/* Shapes: N images, H x W pixels, C channels, K classes. */

#define IDX_IMAGES_MAGIC 0x00000803u
#define IDX_LABELS_MAGIC 0x00000801u
#define READ_CHUNK ((size_t)1 << 16)

/* The OpenCV digits grid. */
#define GRID_WIDTH 2000
#define GRID_HEIGHT 1000
#define GRID_CELL 20
#define GRID_ROWS_PER_CLASS 5

typedef enum dataset_kind {
    DATASET_KIND_IDX,
    DATASET_KIND_FOLDER,
    DATASET_KIND_BUNDLE,
    DATASET_KIND_GRID,
} dataset_kind;

struct dataset {
    dataset_kind kind;
    char *uri;
    char *pixel_source; /* file named in pixel read errors */
    size_t n;
    int n_classes;
    char **class_names;          /* (K) */
    int *labels;                 /* (N) */
    int height, width, channels; /* 0 for folders: sizes vary per file */
    size_t image_bytes;          /* H * W * C */
    size_t budget;
    image_limits limits;

    unsigned char *pixels; /* resident (N, H, W, C), or NULL */
    size_t resident;
    int fd;      /* streaming: pixels at data_offset, or -1 */
    FILE *spill; /* anonymous temporary file behind fd, or NULL */
    off_t data_offset;
    char **files; /* folders: (N) paths */
    st_file *bundle;
    const unsigned char *bundle_pixels;
};

/* ---- small helpers ------------------------------------------------------ */

static char *dup_string(const char *s)
{
    size_t len = strlen(s);
    char *copy = malloc(len + 1);
    if (copy)
        memcpy(copy, s, len + 1);
    return copy;
}

static uint32_t read_be32(const unsigned char *p)
{
    return ((uint32_t)p[0] << 24) | ((uint32_t)p[1] << 16) | ((uint32_t)p[2] << 8) | p[3];
}

static top_status dataset_alloc(dataset **out, dataset_kind kind, const char *uri,
                                const dataset_options *opt, top_error *err)
{
    dataset *ds = calloc(1, sizeof *ds);
    if (!ds || !(ds->uri = dup_string(uri))) {
        free(ds);
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", uri);
    }
    ds->kind = kind;
    ds->fd = -1;
    ds->budget =
        (opt && opt->memory_budget) ? opt->memory_budget : DATASET_DEFAULT_MEMORY_BUDGET;
    if (opt)
        ds->limits = opt->limits;
    if (ds->limits.max_width <= 0)
        ds->limits.max_width = IMAGE_DEFAULT_MAX_SIDE;
    if (ds->limits.max_height <= 0)
        ds->limits.max_height = IMAGE_DEFAULT_MAX_SIDE;
    if (ds->limits.max_pixels == 0)
        ds->limits.max_pixels = IMAGE_DEFAULT_MAX_PIXELS;
    *out = ds;
    return TOP_OK;
}

void dataset_close(dataset *ds)
{
    if (!ds)
        return;
    if (ds->class_names)
        for (int c = 0; c < ds->n_classes; c++)
            free(ds->class_names[c]);
    free(ds->class_names);
    if (ds->files)
        for (size_t i = 0; i < ds->n; i++)
            free(ds->files[i]);
    free(ds->files);
    free(ds->labels);
    free(ds->pixels);
    if (ds->spill)
        fclose(ds->spill);
    else if (ds->fd >= 0)
        close(ds->fd);
    st_close(ds->bundle);
    free(ds->pixel_source);
    free(ds->uri);
    free(ds);
}

/* Sets the class count from the labels and names classes "0", "1", ... */
static top_status name_classes_by_number(dataset *ds, top_error *err)
{
    int max_label = -1;
    for (size_t i = 0; i < ds->n; i++)
        if (ds->labels[i] > max_label)
            max_label = ds->labels[i];
    ds->n_classes = max_label + 1;
    if (ds->n_classes == 0)
        return top_error_set(err, TOP_ERR_FORMAT, "%s: the data set has no images", ds->uri);
    ds->class_names = calloc((size_t)ds->n_classes, sizeof *ds->class_names);
    if (!ds->class_names)
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", ds->uri);
    for (int c = 0; c < ds->n_classes; c++) {
        char name[16];
        snprintf(name, sizeof name, "%d", c);
        if (!(ds->class_names[c] = dup_string(name)))
            return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", ds->uri);
    }
    return TOP_OK;
}

top_status dataset_set_class_names(dataset *ds, const char *const *names, int n, top_error *err)
{
    if (!ds || !names || n < ds->n_classes || n > DATASET_MAX_CLASSES)
        return top_error_set(err, TOP_ERR_INVALID,
                             "dataset_set_class_names: %d names for %d classes; give one name "
                             "per class",
                             n, ds ? ds->n_classes : 0);
    char **copy = calloc((size_t)n, sizeof *copy);
    if (!copy)
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", ds->uri);
    for (int c = 0; c < n; c++) {
        if (!names[c] || !(copy[c] = dup_string(names[c]))) {
            for (int k = 0; k < c; k++)
                free(copy[k]);
            free(copy);
            return top_error_set(err, TOP_ERR_INVALID, "%s: class name %d is missing", ds->uri,
                                 c);
        }
    }
    for (int c = 0; c < ds->n_classes; c++)
        free(ds->class_names[c]);
    free(ds->class_names);
    ds->class_names = copy;
    ds->n_classes = n;
    return TOP_OK;
}

/* ---- byte readers: a gzip or plain file, or memory ---------------------- */

typedef struct byte_reader {
    const char *what;
    gzFile gz;                /* file source (gzip or plain) */
    const unsigned char *mem; /* memory source */
    size_t mem_size, mem_pos;
    z_stream zs; /* gzip in memory */
    int inflating, inflate_done;
} byte_reader;

static top_status reader_open_file(byte_reader *r, const char *path, top_error *err)
{
    memset(r, 0, sizeof *r);
    r->what = path;
    int fd = top_open_regular(path, err);
    if (fd < 0)
        return err ? err->status : TOP_ERR_IO;
    r->gz = gzdopen(fd, "rb");
    if (!r->gz) {
        close(fd);
        return top_error_set(err, TOP_ERR_IO, "%s: cannot open: out of memory", path);
    }
    gzbuffer(r->gz, 1 << 17);
    return TOP_OK;
}

static top_status reader_open_memory(byte_reader *r, const void *data, size_t size,
                                     const char *what, top_error *err)
{
    memset(r, 0, sizeof *r);
    r->what = what;
    r->mem = data;
    r->mem_size = data ? size : 0;
    if (r->mem_size >= 2 && r->mem[0] == 0x1f && r->mem[1] == 0x8b) {
        if (inflateInit2(&r->zs, 16 + MAX_WBITS) != Z_OK)
            return top_error_set(err, TOP_ERR_NOMEM, "%s: cannot start gzip inflation", what);
        r->zs.next_in = (Bytef *)(uintptr_t)r->mem;
        r->zs.avail_in = (uInt)(r->mem_size > UINT32_MAX ? UINT32_MAX : r->mem_size);
        r->inflating = 1;
    }
    return TOP_OK;
}

static void reader_close(byte_reader *r)
{
    if (r->gz)
        gzclose(r->gz);
    if (r->inflating)
        inflateEnd(&r->zs);
    memset(r, 0, sizeof *r);
}

static top_status reader_inflate(byte_reader *r, unsigned char *buf, size_t n, size_t *got,
                                 top_error *err)
{
    while (*got < n && !r->inflate_done) {
        size_t want = n - *got > UINT32_MAX ? UINT32_MAX : n - *got;
        r->zs.next_out = buf + *got;
        r->zs.avail_out = (uInt)want;
        int rc = inflate(&r->zs, Z_NO_FLUSH);
        *got += want - r->zs.avail_out;
        if (rc == Z_STREAM_END)
            r->inflate_done = 1;
        else if (rc == Z_BUF_ERROR || (rc == Z_OK && r->zs.avail_in == 0 && r->zs.avail_out))
            return top_error_set(err, TOP_ERR_FORMAT, "%s: gzip data is truncated", r->what);
        else if (rc != Z_OK)
            return top_error_set(err, TOP_ERR_FORMAT, "%s: invalid gzip data: %s", r->what,
                                 r->zs.msg ? r->zs.msg : "inflate failed");
    }
    return TOP_OK;
}

/* Reads up to n bytes; *got < n only at the end of the data. */
static top_status reader_read(byte_reader *r, void *buf, size_t n, size_t *got, top_error *err)
{
    *got = 0;
    if (r->gz) {
        while (*got < n) {
            unsigned want = n - *got > (1u << 30) ? (1u << 30) : (unsigned)(n - *got);
            int k = gzread(r->gz, (unsigned char *)buf + *got, want);
            int code = Z_OK;
            const char *msg = k < (int)want ? gzerror(r->gz, &code) : NULL;
            if (k < 0 || (code != Z_OK && code != Z_STREAM_END)) {
                return top_error_set(err, TOP_ERR_FORMAT, "%s: %s data: %s", r->what,
                                     code == Z_BUF_ERROR ? "truncated gzip" : "invalid gzip",
                                     msg && *msg ? msg : "read failed");
            }
            *got += (size_t)k;
            if (k < (int)want)
                break;
        }
        return TOP_OK;
    }
    if (r->inflating)
        return reader_inflate(r, buf, n, got, err);
    size_t left = r->mem_size - r->mem_pos;
    *got = n < left ? n : left;
    if (*got)
        memcpy(buf, r->mem + r->mem_pos, *got);
    r->mem_pos += *got;
    return TOP_OK;
}

/* Reads exactly n bytes or fails with a truncation error naming `part`. */
static top_status reader_read_exact(byte_reader *r, void *buf, size_t n, const char *part,
                                    top_error *err)
{
    size_t got;
    top_status st = reader_read(r, buf, n, &got, err);
    if (st != TOP_OK)
        return st;
    if (got != n)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: file is truncated: %s needs %zu bytes, found %zu", r->what,
                             part, n, got);
    return TOP_OK;
}

/* ---- IDX ---------------------------------------------------------------- */

/* Parses an IDX header of u8 data with ndim dims; magic is 0x0000080N. */
static top_status idx_read_header(uint32_t *dims, byte_reader *r, uint32_t magic, int ndim,
                                  top_error *err)
{
    unsigned char hdr[16];
    size_t bytes = 4 + 4 * (size_t)ndim;
    top_status st = reader_read_exact(r, hdr, bytes, "the idx header", err);
    if (st != TOP_OK)
        return st;
    uint32_t found = read_be32(hdr);
    if (found != magic)
        return top_error_set(
            err, TOP_ERR_FORMAT, "%s: wrong idx magic 0x%08x, expected 0x%08x (%s)", r->what,
            found, magic, magic == IDX_IMAGES_MAGIC ? "u8 images, 3 dims" : "u8 labels, 1 dim");
    for (int d = 0; d < ndim; d++)
        dims[d] = read_be32(hdr + 4 + 4 * d);
    if (dims[0] == 0 || dims[0] > DATASET_MAX_IMAGES)
        return top_error_set(err, TOP_ERR_FORMAT, "%s: idx count %u is out of range 1..%zu",
                             r->what, dims[0], DATASET_MAX_IMAGES);
    return TOP_OK;
}

/* Labels are read in chunks, so a header that claims more labels than the
 * file contains costs no more memory than the file's real size. */
static top_status idx_read_labels(dataset *ds, byte_reader *r, top_error *err)
{
    uint32_t dims[1];
    top_status st = idx_read_header(dims, r, IDX_LABELS_MAGIC, 1, err);
    if (st != TOP_OK)
        return st;
    ds->n = dims[0];
    unsigned char *raw = malloc(READ_CHUNK);
    if (!raw)
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", r->what);
    for (size_t done = 0; st == TOP_OK && done < ds->n;) {
        size_t n = ds->n - done < READ_CHUNK ? ds->n - done : READ_CHUNK;
        int *grown = realloc(ds->labels, (done + n) * sizeof *grown);
        if (!grown) {
            st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory for %zu labels", r->what,
                               ds->n);
            break;
        }
        ds->labels = grown;
        size_t got;
        st = reader_read(r, raw, n, &got, err);
        if (st == TOP_OK && got != n)
            st = top_error_set(err, TOP_ERR_FORMAT,
                               "%s: file is truncated: the header promises %zu labels, found "
                               "%zu",
                               r->what, ds->n, done + got);
        for (size_t i = 0; st == TOP_OK && i < n; i++)
            ds->labels[done + i] = raw[i];
        done += n;
    }
    free(raw);
    return st;
}

/* Copies the rest of r into an anonymous temporary file read by offset. */
static top_status idx_spill(dataset *ds, byte_reader *r, size_t total, top_error *err)
{
    ds->spill = tmpfile();
    if (!ds->spill)
        return top_error_set(err, TOP_ERR_IO, "%s: cannot create a temporary file: %s", r->what,
                             strerror(errno));
    ds->fd = fileno(ds->spill);
    ds->data_offset = 0;
    unsigned char *chunk = malloc(READ_CHUNK);
    if (!chunk)
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", r->what);
    top_status st = TOP_OK;
    for (size_t done = 0; st == TOP_OK && done < total;) {
        size_t n = total - done < READ_CHUNK ? total - done : READ_CHUNK;
        st = reader_read_exact(r, chunk, n, "the images", err);
        if (st == TOP_OK && fwrite(chunk, 1, n, ds->spill) != n)
            st = top_error_set(err, TOP_ERR_IO, "%s: cannot write a temporary file: %s",
                               r->what, strerror(errno));
        done += n;
    }
    if (st == TOP_OK && fflush(ds->spill) != 0)
        st = top_error_set(err, TOP_ERR_IO, "%s: cannot write a temporary file: %s", r->what,
                           strerror(errno));
    free(chunk);
    return st;
}

/* Plain file over the budget: read by offset from the file itself. */
static top_status idx_stream_plain(dataset *ds, const char *path, size_t total, top_error *err)
{
    ds->fd = top_open_regular(path, err);
    if (ds->fd < 0)
        return err ? err->status : TOP_ERR_IO;
    struct stat sb;
    if (fstat(ds->fd, &sb) != 0)
        return top_error_set(err, TOP_ERR_IO, "%s: cannot stat: %s", path, strerror(errno));
    ds->data_offset = 16;
    if ((uint64_t)sb.st_size < (uint64_t)total + 16)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: file is truncated: the images need %zu bytes, found %lld",
                             path, total, (long long)sb.st_size - 16);
    return TOP_OK;
}

/*
 * Reads the image header and then the pixels: whole when they fit the
 * budget, else by offset. `path` is NULL for memory sources.
 */
static top_status idx_read_images(dataset *ds, byte_reader *r, const char *path, top_error *err)
{
    uint32_t dims[3];
    top_status st = idx_read_header(dims, r, IDX_IMAGES_MAGIC, 3, err);
    if (st != TOP_OK)
        return st;
    if (dims[0] != ds->n)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: %u images but %zu labels; the two files must belong together",
                             r->what, dims[0], ds->n);
    if (dims[1] == 0 || dims[2] == 0 || dims[1] > (uint32_t)ds->limits.max_height ||
        dims[2] > (uint32_t)ds->limits.max_width ||
        (size_t)dims[1] * dims[2] > ds->limits.max_pixels)
        return top_error_set(err, TOP_ERR_LIMIT, "%s: images are %ux%u, outside 1x1 .. %dx%d",
                             r->what, dims[2], dims[1], ds->limits.max_width,
                             ds->limits.max_height);
    ds->height = (int)dims[1];
    ds->width = (int)dims[2];
    ds->channels = 1;
    ds->image_bytes = (size_t)dims[1] * dims[2];
    size_t total;
    if (top_size_mul(&total, ds->image_bytes, ds->n) != 0)
        return top_error_set(err, TOP_ERR_OVERFLOW, "%s: image bytes overflow", r->what);
    if (!(ds->pixel_source = dup_string(r->what)))
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", r->what);

    if (total <= ds->budget) {
        if (!(ds->pixels = malloc(total)))
            return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory for %zu bytes", r->what,
                                 total);
        ds->resident = total;
        return reader_read_exact(r, ds->pixels, total, "the images", err);
    }
    if (!path)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: images need %zu bytes, over the memory budget of %zu",
                             r->what, total, ds->budget);
    if (gzdirect(r->gz))
        return idx_stream_plain(ds, path, total, err);
    return idx_spill(ds, r, total, err);
}

static top_status open_idx(dataset *ds, const char *spec, top_error *err)
{
    const char *comma = strchr(spec, ',');
    if (!comma || comma == spec || !comma[1] || strchr(comma + 1, ','))
        return top_error_set(err, TOP_ERR_INVALID,
                             "%s: expected idx:IMAGES,LABELS (two paths, one comma)", ds->uri);
    size_t len = (size_t)(comma - spec);
    char *images = malloc(len + 1);
    if (!images)
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", ds->uri);
    memcpy(images, spec, len);
    images[len] = '\0';

    byte_reader lab, img;
    top_status st = reader_open_file(&lab, comma + 1, err);
    if (st == TOP_OK) {
        st = idx_read_labels(ds, &lab, err);
        reader_close(&lab);
    }
    if (st == TOP_OK && (st = reader_open_file(&img, images, err)) == TOP_OK) {
        st = idx_read_images(ds, &img, images, err);
        reader_close(&img);
    }
    free(images);
    if (st == TOP_OK)
        st = name_classes_by_number(ds, err);
    return st;
}

top_status dataset_open_idx_memory(dataset **out, const void *images, size_t images_size,
                                   const void *labels, size_t labels_size, const char *what,
                                   const dataset_options *opt, top_error *err)
{
    if (!out)
        return top_error_set(err, TOP_ERR_INVALID, "dataset_open_idx_memory: out is NULL");
    *out = NULL;
    if (!what)
        what = "idx data";
    dataset *ds = NULL;
    top_status st = dataset_alloc(&ds, DATASET_KIND_IDX, what, opt, err);
    if (st != TOP_OK)
        return st;

    byte_reader r;
    if ((st = reader_open_memory(&r, labels, labels_size, what, err)) == TOP_OK) {
        st = idx_read_labels(ds, &r, err);
        reader_close(&r);
    }
    if (st == TOP_OK &&
        (st = reader_open_memory(&r, images, images_size, what, err)) == TOP_OK) {
        st = idx_read_images(ds, &r, NULL, err);
        reader_close(&r);
    }
    if (st == TOP_OK)
        st = name_classes_by_number(ds, err);
    if (st != TOP_OK) {
        dataset_close(ds);
        return st;
    }
    *out = ds;
    return TOP_OK;
}

/* ---- class folders ------------------------------------------------------ */

typedef struct name_list {
    char **names;
    size_t count, cap;
} name_list;

static void name_list_free(name_list *l)
{
    for (size_t i = 0; i < l->count; i++)
        free(l->names[i]);
    free(l->names);
    memset(l, 0, sizeof *l);
}

static int compare_names(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Lists the entries of dir (names starting with '.' skipped), sorted. */
static top_status list_dir(name_list *out, const char *dir, top_error *err)
{
    memset(out, 0, sizeof *out);
    DIR *d = opendir(dir);
    if (!d)
        return top_error_set(err, TOP_ERR_IO, "%s: cannot open folder: %s", dir,
                             strerror(errno));
    top_status st = TOP_OK;
    struct dirent *e;
    while ((e = readdir(d)) != NULL) {
        if (e->d_name[0] == '.')
            continue;
        if (out->count == out->cap) {
            size_t cap = out->cap ? out->cap * 2 : 64;
            char **grown = realloc(out->names, cap * sizeof *grown);
            if (!grown) {
                st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory listing", dir);
                break;
            }
            out->names = grown;
            out->cap = cap;
        }
        if (!(out->names[out->count] = dup_string(e->d_name))) {
            st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory listing", dir);
            break;
        }
        out->count++;
    }
    closedir(d);
    if (st == TOP_OK && out->count > 1)
        qsort(out->names, out->count, sizeof *out->names, compare_names);
    if (st != TOP_OK)
        name_list_free(out);
    return st;
}

static char *join_path(const char *dir, const char *name)
{
    size_t a = strlen(dir), b = strlen(name);
    char *p = malloc(a + b + 2);
    if (p) {
        memcpy(p, dir, a);
        p[a] = '/';
        memcpy(p + a + 1, name, b + 1);
    }
    return p;
}

/* Reads the width and height of a JPEG from its first SOF marker. */
static int probe_jpeg(FILE *f, unsigned long *w, unsigned long *h)
{
    if (fseek(f, 2, SEEK_SET) != 0)
        return -1;
    for (int guard = 0; guard < 100000; guard++) {
        int c = fgetc(f);
        if (c != 0xff)
            return -1;
        while ((c = fgetc(f)) == 0xff) {
        }
        if (c == EOF)
            return -1;
        if (c == 0x01 || (c >= 0xd0 && c <= 0xd8))
            continue;
        unsigned char len[2];
        if (fread(len, 1, 2, f) != 2)
            return -1;
        long seg = ((long)len[0] << 8 | len[1]) - 2;
        int is_sof = c >= 0xc0 && c <= 0xcf && c != 0xc4 && c != 0xc8 && c != 0xcc;
        if (is_sof) {
            unsigned char sof[5];
            if (seg < 5 || fread(sof, 1, 5, f) != 5)
                return -1;
            *h = (unsigned long)sof[1] << 8 | sof[2];
            *w = (unsigned long)sof[3] << 8 | sof[4];
            return 0;
        }
        if (seg < 0 || fseek(f, seg, SEEK_CUR) != 0)
            return -1;
    }
    return -1;
}

/*
 * Checks that path starts like a PNG or JPEG and that its header dimensions
 * fit the limits, without decoding the pixels.
 */
static top_status probe_image(const char *path, const image_limits *lim, top_error *err)
{
    FILE *f = top_fopen_regular(path, err);
    if (!f)
        return err ? err->status : TOP_ERR_IO;
    unsigned char head[24];
    size_t n = fread(head, 1, sizeof head, f);
    static const unsigned char png_sig[8] = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1a, '\n'};
    unsigned long w = 0, h = 0;
    int known = 0;
    if (n == 24 && memcmp(head, png_sig, 8) == 0 && memcmp(head + 12, "IHDR", 4) == 0) {
        w = read_be32(head + 16);
        h = read_be32(head + 20);
        known = 1;
    } else if (n >= 3 && head[0] == 0xff && head[1] == 0xd8 && head[2] == 0xff) {
        known = probe_jpeg(f, &w, &h) == 0;
    }
    fclose(f);
    if (!known)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: not a png or jpeg image; remove it from the class folder",
                             path);
    if (w == 0 || h == 0 || w > (unsigned long)lim->max_width ||
        h > (unsigned long)lim->max_height || (size_t)w * h > lim->max_pixels)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: image is %lux%lu, outside 1x1 .. %dx%d (max %zu pixels); "
                             "shrink it or raise the image limits",
                             path, w, h, lim->max_width, lim->max_height, lim->max_pixels);
    return TOP_OK;
}

/* Appends the files of one class folder (probed) to ds. */
static top_status folder_add_class(dataset *ds, size_t *cap, const char *class_dir, int label,
                                   top_error *err)
{
    name_list files;
    top_status st = list_dir(&files, class_dir, err);
    if (st != TOP_OK)
        return st;
    if (files.count == 0)
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "%s: class folder is empty; add images or remove it", class_dir);
    for (size_t i = 0; st == TOP_OK && i < files.count; i++) {
        char *path = join_path(class_dir, files.names[i]);
        if (!path) {
            st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", class_dir);
            break;
        }
        if (ds->n == *cap) {
            size_t grown_cap = *cap ? *cap * 2 : 1024;
            char **f = realloc(ds->files, grown_cap * sizeof *f);
            int *l = f ? realloc(ds->labels, grown_cap * sizeof *l) : NULL;
            if (f)
                ds->files = f;
            if (l)
                ds->labels = l;
            if (!f || !l) {
                free(path);
                st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", class_dir);
                break;
            }
            *cap = grown_cap;
        }
        if (ds->n >= DATASET_MAX_IMAGES ||
            (st = probe_image(path, &ds->limits, err)) != TOP_OK) {
            if (st == TOP_OK)
                st = top_error_set(err, TOP_ERR_LIMIT, "%s: more than %zu images", ds->uri,
                                   DATASET_MAX_IMAGES);
            free(path);
            break;
        }
        ds->files[ds->n] = path;
        ds->labels[ds->n] = label;
        ds->n++;
    }
    name_list_free(&files);
    return st;
}

static top_status open_folder(dataset *ds, const char *dir, top_error *err)
{
    name_list classes;
    top_status st = list_dir(&classes, dir, err);
    if (st != TOP_OK)
        return st;
    if (classes.count == 0 || classes.count > DATASET_MAX_CLASSES)
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "%s: found %zu class folders, expected 1..%d (one subfolder per "
                           "class)",
                           dir, classes.count, DATASET_MAX_CLASSES);
    if (st == TOP_OK && !(ds->class_names = calloc(classes.count, sizeof(char *))))
        st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", dir);

    size_t cap = 0;
    for (size_t c = 0; st == TOP_OK && c < classes.count; c++) {
        char *class_dir = join_path(dir, classes.names[c]);
        struct stat sb;
        if (!class_dir)
            st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", dir);
        else if (stat(class_dir, &sb) != 0 || !S_ISDIR(sb.st_mode))
            st = top_error_set(err, TOP_ERR_FORMAT,
                               "%s: not a class folder; the top level may hold only one "
                               "subfolder per class",
                               class_dir);
        else
            st = folder_add_class(ds, &cap, class_dir, (int)c, err);
        free(class_dir);
        if (st == TOP_OK) {
            ds->class_names[c] = classes.names[c];
            classes.names[c] = NULL;
            ds->n_classes = (int)c + 1;
        }
    }
    name_list_free(&classes);
    return st;
}

/* ---- safetensors bundles ------------------------------------------------ */

/* Reads one integer label of any integer dtype; returns -1 if out of range. */
static long long bundle_label_at(const unsigned char *p, st_dtype dtype, size_t i)
{
    switch (dtype) {
    case ST_DTYPE_U8: return p[i];
    case ST_DTYPE_I8: return (int8_t)p[i];
    case ST_DTYPE_U16: {
        uint16_t v;
        memcpy(&v, p + 2 * i, 2);
        return v;
    }
    case ST_DTYPE_I16: {
        int16_t v;
        memcpy(&v, p + 2 * i, 2);
        return v;
    }
    case ST_DTYPE_U32: {
        uint32_t v;
        memcpy(&v, p + 4 * i, 4);
        return v;
    }
    case ST_DTYPE_I32: {
        int32_t v;
        memcpy(&v, p + 4 * i, 4);
        return v;
    }
    case ST_DTYPE_U64: {
        uint64_t v;
        memcpy(&v, p + 8 * i, 8);
        return v > (uint64_t)INT32_MAX ? -1 : (long long)v;
    }
    case ST_DTYPE_I64: {
        int64_t v;
        memcpy(&v, p + 8 * i, 8);
        return v;
    }
    default: return -1;
    }
}

static top_status bundle_read_labels(dataset *ds, const st_tensor_info *t, top_error *err)
{
    int integer = t->dtype == ST_DTYPE_U8 || t->dtype == ST_DTYPE_I8 ||
                  t->dtype == ST_DTYPE_U16 || t->dtype == ST_DTYPE_I16 ||
                  t->dtype == ST_DTYPE_U32 || t->dtype == ST_DTYPE_I32 ||
                  t->dtype == ST_DTYPE_U64 || t->dtype == ST_DTYPE_I64;
    if (!integer || t->ndim != 1 || (size_t)t->shape[0] != ds->n)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: tensor \"labels\" must be an integer vector of %zu entries "
                             "(one per image)",
                             ds->uri, ds->n);
    if (!(ds->labels = malloc(ds->n * sizeof *ds->labels)))
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", ds->uri);
    const unsigned char *p = st_tensor_data(ds->bundle, t);
    for (size_t i = 0; i < ds->n; i++) {
        long long v = bundle_label_at(p, t->dtype, i);
        if (v < 0 || v >= DATASET_MAX_CLASSES)
            return top_error_set(err, TOP_ERR_FORMAT, "%s: label %zu is %lld, outside 0..%d",
                                 ds->uri, i, v, DATASET_MAX_CLASSES - 1);
        ds->labels[i] = (int)v;
    }
    return TOP_OK;
}

/* Applies __metadata__ "class_names" (a JSON array of strings) if present. */
static top_status bundle_read_names(dataset *ds, top_error *err)
{
    const char *text = st_metadata_get(ds->bundle, "class_names");
    if (!text)
        return TOP_OK;

    top_status st = TOP_OK;
    const char **names = NULL;
    json_error_t jerr;
    json_t *arr = json_loads(text, 0, &jerr);
    size_t n = json_is_array(arr) ? json_array_size(arr) : 0;
    if (n == 0 || n > DATASET_MAX_CLASSES) {
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "%s: metadata \"class_names\" must be a JSON array of 1..%d strings",
                           ds->uri, DATASET_MAX_CLASSES);
        goto done;
    }
    if ((int)n < ds->n_classes) {
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "%s: metadata \"class_names\" has %zu names but labels reach %d",
                           ds->uri, n, ds->n_classes - 1);
        goto done;
    }
    names = calloc(n, sizeof *names);
    if (!names) {
        st = top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", ds->uri);
        goto done;
    }
    for (size_t i = 0; i < n; i++) {
        names[i] = json_string_value(json_array_get(arr, i));
        if (!names[i]) {
            st = top_error_set(err, TOP_ERR_FORMAT,
                               "%s: metadata \"class_names\" entry %zu is not a string",
                               ds->uri, i);
            goto done;
        }
    }
    st = dataset_set_class_names(ds, names, (int)n, err);

done:
    free(names);
    json_decref(arr);
    return st;
}

static top_status open_bundle(dataset *ds, const char *path, top_error *err)
{
    top_status st = st_open(&ds->bundle, path, err);
    if (st != TOP_OK)
        return st;
    const st_tensor_info *images = st_find(ds->bundle, "images");
    const st_tensor_info *labels = st_find(ds->bundle, "labels");
    if (!images || !labels)
        return top_error_set(err, TOP_ERR_NOT_FOUND,
                             "%s: a bundle needs tensors \"images\" and \"labels\"", path);
    if (images->dtype != ST_DTYPE_U8 || images->ndim != 4 ||
        (images->shape[3] != 1 && images->shape[3] != 3))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "%s: tensor \"images\" must be U8 (N, H, W, C) with C 1 or 3",
                             path);
    if (images->shape[0] <= 0 || (size_t)images->shape[0] > DATASET_MAX_IMAGES ||
        images->shape[1] <= 0 || images->shape[1] > ds->limits.max_height ||
        images->shape[2] <= 0 || images->shape[2] > ds->limits.max_width ||
        (size_t)(images->shape[1] * images->shape[2]) > ds->limits.max_pixels)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: tensor \"images\" has %lld images of %lldx%lld; the limits "
                             "are 1..%zu images of at most %dx%d",
                             path, (long long)images->shape[0], (long long)images->shape[2],
                             (long long)images->shape[1], DATASET_MAX_IMAGES,
                             ds->limits.max_width, ds->limits.max_height);
    ds->n = (size_t)images->shape[0];
    ds->height = (int)images->shape[1];
    ds->width = (int)images->shape[2];
    ds->channels = (int)images->shape[3];
    ds->image_bytes = (size_t)ds->height * (size_t)ds->width * (size_t)ds->channels;
    ds->bundle_pixels = st_tensor_data(ds->bundle, images);
    if (!(ds->pixel_source = dup_string(path)))
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", path);

    if ((st = bundle_read_labels(ds, labels, err)) != TOP_OK)
        return st;
    if ((st = name_classes_by_number(ds, err)) != TOP_OK)
        return st;
    return bundle_read_names(ds, err);
}

/* ---- the OpenCV digits grid --------------------------------------------- */

static top_status open_grid(dataset *ds, const char *path, top_error *err)
{
    size_t total = (size_t)GRID_WIDTH * GRID_HEIGHT;
    if (ds->budget < total)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "%s: the digits grid needs %zu bytes resident, over the memory "
                             "budget of %zu",
                             path, total, ds->budget);
    image_limits lim = {GRID_WIDTH, GRID_HEIGHT, total};
    image_u8 img;
    top_status st = image_load(&img, path, &lim, err);
    if (st != TOP_OK)
        return st;
    if (img.width != GRID_WIDTH || img.height != GRID_HEIGHT || img.channels != 1) {
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "%s: a digits grid is a %dx%d gray png, found %dx%d with %d "
                           "channels",
                           path, GRID_WIDTH, GRID_HEIGHT, img.width, img.height, img.channels);
        image_free(&img);
        return st;
    }

    int cols = GRID_WIDTH / GRID_CELL, rows = GRID_HEIGHT / GRID_CELL;
    ds->n = (size_t)rows * (size_t)cols;
    ds->height = ds->width = GRID_CELL;
    ds->channels = 1;
    ds->image_bytes = GRID_CELL * GRID_CELL;
    ds->pixels = malloc(total);
    ds->labels = malloc(ds->n * sizeof *ds->labels);
    ds->pixel_source = dup_string(path);
    if (!ds->pixels || !ds->labels || !ds->pixel_source) {
        image_free(&img);
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", path);
    }
    ds->resident = total;
    /* Cell (row, col) becomes image row * cols + col, (20, 20) row-major. */
    for (int r = 0; r < rows; r++) {
        for (int c = 0; c < cols; c++) {
            size_t i = (size_t)r * (size_t)cols + (size_t)c;
            unsigned char *dst = ds->pixels + i * ds->image_bytes;
            for (int y = 0; y < GRID_CELL; y++)
                memcpy(dst + (size_t)y * GRID_CELL,
                       img.pixels + (size_t)(r * GRID_CELL + y) * GRID_WIDTH +
                           (size_t)c * GRID_CELL,
                       GRID_CELL);
            ds->labels[i] = r / GRID_ROWS_PER_CLASS;
        }
    }
    image_free(&img);
    return name_classes_by_number(ds, err);
}

/* ---- open, get, accessors ----------------------------------------------- */

top_status dataset_open(dataset **out, const char *uri, const dataset_options *opt,
                        top_error *err)
{
    if (!out || !uri)
        return top_error_set(err, TOP_ERR_INVALID, "dataset_open: out or uri is NULL");
    *out = NULL;
    static const struct {
        const char *scheme;
        dataset_kind kind;
    } schemes[] = {
        {"idx:", DATASET_KIND_IDX},
        {"folder:", DATASET_KIND_FOLDER},
        {"bundle:", DATASET_KIND_BUNDLE},
        {"digits-grid:", DATASET_KIND_GRID},
    };
    int found = -1;
    for (size_t s = 0; s < sizeof schemes / sizeof schemes[0]; s++)
        if (strncmp(uri, schemes[s].scheme, strlen(schemes[s].scheme)) == 0)
            found = (int)s;
    if (found < 0 || !uri[strlen(schemes[found].scheme)])
        return top_error_set(err, TOP_ERR_INVALID,
                             "data set uri \"%s\" is not one of idx:IMAGES,LABELS folder:DIR "
                             "bundle:FILE digits-grid:FILE",
                             uri);

    dataset *ds;
    top_status st = dataset_alloc(&ds, schemes[found].kind, uri, opt, err);
    if (st != TOP_OK)
        return st;
    const char *rest = uri + strlen(schemes[found].scheme);
    switch (ds->kind) {
    case DATASET_KIND_IDX: st = open_idx(ds, rest, err); break;
    case DATASET_KIND_FOLDER: st = open_folder(ds, rest, err); break;
    case DATASET_KIND_BUNDLE: st = open_bundle(ds, rest, err); break;
    case DATASET_KIND_GRID: st = open_grid(ds, rest, err); break;
    }
    if (st != TOP_OK) {
        dataset_close(ds);
        return st;
    }
    *out = ds;
    return TOP_OK;
}

/* Reads exactly n bytes at offset, retrying short reads. */
static top_status pread_exact(int fd, void *buf, size_t n, off_t offset, const char *what,
                              size_t index, top_error *err)
{
    size_t done = 0;
    while (done < n) {
        ssize_t k = pread(fd, (unsigned char *)buf + done, n - done, offset + (off_t)done);
        if (k < 0 && errno == EINTR)
            continue;
        if (k <= 0)
            return top_error_set(err, TOP_ERR_IO, "%s: reading image %zu failed: %s", what,
                                 index, k < 0 ? strerror(errno) : "unexpected end of file");
        done += (size_t)k;
    }
    return TOP_OK;
}

top_status dataset_get(const dataset *ds, size_t i, image_u8 *out, top_error *err)
{
    if (!ds || !out)
        return top_error_set(err, TOP_ERR_INVALID, "dataset_get: ds or out is NULL");
    memset(out, 0, sizeof *out);
    if (i >= ds->n)
        return top_error_set(err, TOP_ERR_INVALID, "%s: image index %zu is out of range 0..%zu",
                             ds->uri, i, ds->n - 1);
    if (ds->kind == DATASET_KIND_FOLDER)
        return image_load(out, ds->files[i], &ds->limits, err);

    unsigned char *pixels = malloc(ds->image_bytes);
    if (!pixels)
        return top_error_set(err, TOP_ERR_NOMEM, "%s: out of memory", ds->uri);
    size_t offset = i * ds->image_bytes;
    if (ds->pixels) {
        memcpy(pixels, ds->pixels + offset, ds->image_bytes);
    } else if (ds->bundle_pixels) {
        memcpy(pixels, ds->bundle_pixels + offset, ds->image_bytes);
    } else {
        top_status st = pread_exact(ds->fd, pixels, ds->image_bytes,
                                    ds->data_offset + (off_t)offset, ds->pixel_source, i, err);
        if (st != TOP_OK) {
            free(pixels);
            return st;
        }
    }
    out->height = ds->height;
    out->width = ds->width;
    out->channels = ds->channels;
    out->pixels = pixels;
    return TOP_OK;
}

size_t dataset_count(const dataset *ds)
{
    return ds ? ds->n : 0;
}
int dataset_class_count(const dataset *ds)
{
    return ds ? ds->n_classes : 0;
}
const int *dataset_labels(const dataset *ds)
{
    return ds ? ds->labels : NULL;
}
const char *dataset_uri(const dataset *ds)
{
    return ds ? ds->uri : NULL;
}
size_t dataset_resident_bytes(const dataset *ds)
{
    return ds ? ds->resident : 0;
}

const char *dataset_class_name(const dataset *ds, int c)
{
    if (!ds || c < 0 || c >= ds->n_classes)
        return NULL;
    return ds->class_names[c];
}

int dataset_is_streaming(const dataset *ds)
{
    return ds && ds->kind != DATASET_KIND_GRID && !ds->pixels;
}

/* ---- tasks -------------------------------------------------------------- */

#define SPLITMIX_GAMMA 0x9e3779b97f4a7c15ull
#define TEST_STREAM_OFFSET 0x5851f42d4c957f2dull

uint64_t task_splitmix64(uint64_t *state)
{
    uint64_t z = (*state += SPLITMIX_GAMMA);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

/* Uniform in 0 .. bound - 1 (bound > 0), by rejecting the biased tail. */
static uint64_t uniform_below(uint64_t *state, uint64_t bound)
{
    uint64_t limit = UINT64_MAX - UINT64_MAX % bound;
    uint64_t r;
    do
        r = task_splitmix64(state);
    while (r >= limit);
    return r % bound;
}

/* Fisher-Yates: for i from n - 1 down to 1, swap a[i] with a[j], j in 0..i. */
static void shuffle_indices(size_t *a, size_t n, uint64_t state)
{
    for (size_t i = n; i > 1; i--) {
        size_t j = (size_t)uniform_below(&state, i);
        size_t t = a[i - 1];
        a[i - 1] = a[j];
        a[j] = t;
    }
}

/* Shuffles a split's indices and labels together. */
static void shuffle_split(task_split *s, uint64_t state)
{
    for (size_t i = s->count; i > 1; i--) {
        size_t j = (size_t)uniform_below(&state, i);
        size_t ti = s->indices[i - 1];
        int tl = s->labels[i - 1];
        s->indices[i - 1] = s->indices[j];
        s->labels[i - 1] = s->labels[j];
        s->indices[j] = ti;
        s->labels[j] = tl;
    }
}

static uint64_t class_stream(uint64_t seed, int source_class)
{
    return seed ^ (SPLITMIX_GAMMA * (uint64_t)(source_class + 1));
}

void task_free(task *t)
{
    if (!t)
        return;
    free(t->classes);
    task_split *splits[3] = {&t->calib, &t->fit, &t->eval};
    for (int s = 0; s < 3; s++) {
        free(splits[s]->indices);
        free(splits[s]->labels);
    }
    memset(t, 0, sizeof *t);
}

static top_status split_alloc(task_split *s, const dataset *source, size_t count,
                              top_error *err)
{
    s->source = source;
    s->count = 0;
    s->indices = malloc((count ? count : 1) * sizeof *s->indices);
    s->labels = malloc((count ? count : 1) * sizeof *s->labels);
    if (!s->indices || !s->labels)
        return top_error_set(err, TOP_ERR_NOMEM, "task: out of memory for %zu images", count);
    return TOP_OK;
}

static void split_append(task_split *s, const size_t *idx, size_t n, int label)
{
    for (size_t i = 0; i < n; i++) {
        s->indices[s->count] = idx[i];
        s->labels[s->count] = label;
        s->count++;
    }
}

/* The indices of ds with label c, ascending, in a new array (*n of them). */
static top_status class_pool(size_t **pool, size_t *n, const dataset *ds, int c, top_error *err)
{
    *n = 0;
    for (size_t i = 0; i < ds->n; i++)
        *n += ds->labels[i] == c;
    *pool = malloc((*n ? *n : 1) * sizeof **pool);
    if (!*pool)
        return top_error_set(err, TOP_ERR_NOMEM, "task: out of memory");
    size_t k = 0;
    for (size_t i = 0; i < ds->n; i++)
        if (ds->labels[i] == c)
            (*pool)[k++] = i;
    return TOP_OK;
}

static top_status task_check_spec(const dataset *train, const dataset *test,
                                  const task_spec *spec, top_error *err)
{
    if (!train || !spec)
        return top_error_set(err, TOP_ERR_INVALID, "task_make: train or spec is NULL");
    if (spec->calib_per_class == TASK_ALL || spec->fit_per_class == TASK_ALL)
        return top_error_set(err, TOP_ERR_INVALID,
                             "task: only the evaluation split may take all remaining images");
    if (test && test->n_classes != train->n_classes)
        return top_error_set(err, TOP_ERR_INVALID,
                             "task: %s has %d classes but %s has %d; an official split must "
                             "share its classes",
                             train->uri, train->n_classes, test->uri, test->n_classes);
    if (spec->classes && (spec->n_classes <= 0 || spec->n_classes > train->n_classes))
        return top_error_set(err, TOP_ERR_INVALID, "task: %d classes requested, expected 1..%d",
                             spec->n_classes, train->n_classes);
    int n = spec->classes ? spec->n_classes : train->n_classes;
    for (int j = 0; spec->classes && j < n; j++) {
        if (spec->classes[j] < 0 || spec->classes[j] >= train->n_classes)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "task: class %d is out of range 0..%d of %s", spec->classes[j],
                                 train->n_classes - 1, train->uri);
        for (int k = 0; k < j; k++)
            if (spec->classes[k] == spec->classes[j])
                return top_error_set(err, TOP_ERR_INVALID, "task: class %d is listed twice",
                                     spec->classes[j]);
    }
    return TOP_OK;
}

/* Counts what each split needs and checks every class has enough images. */
static top_status task_plan(size_t counts[3], const task *t, const dataset *train,
                            const dataset *test, const task_spec *spec, top_error *err)
{
    counts[0] = counts[1] = counts[2] = 0;
    for (int j = 0; j < t->n_classes; j++) {
        int c = t->classes[j];
        size_t have = 0, have_test = 0;
        for (size_t i = 0; i < train->n; i++)
            have += train->labels[i] == c;
        for (size_t i = 0; test && i < test->n; i++)
            have_test += test->labels[i] == c;
        size_t need = spec->calib_per_class + spec->fit_per_class;
        if (need < spec->calib_per_class)
            return top_error_set(err, TOP_ERR_OVERFLOW, "task: split sizes overflow");
        size_t eval_pool = test ? have_test : (have >= need ? have - need : 0);
        size_t eval = spec->eval_per_class == TASK_ALL ? eval_pool : spec->eval_per_class;
        if (have < need || eval > eval_pool || (test ? 0 : have - need < eval))
            return top_error_set(err, TOP_ERR_LIMIT,
                                 "task: class %d (%s) has %zu images in %s%s but the splits "
                                 "need %zu + %zu + %zu; lower the per-class sizes",
                                 c, train->class_names[c], have, train->uri,
                                 test ? " (and more in the test set)" : "",
                                 spec->calib_per_class, spec->fit_per_class, eval);
        counts[0] += spec->calib_per_class;
        counts[1] += spec->fit_per_class;
        counts[2] += eval;
    }
    return TOP_OK;
}

static top_status task_draw_class(task *t, int j, const dataset *train, const dataset *test,
                                  const task_spec *spec, top_error *err)
{
    int c = t->classes[j];
    size_t *pool, n;
    top_status st = class_pool(&pool, &n, train, c, err);
    if (st != TOP_OK)
        return st;
    shuffle_indices(pool, n, class_stream(spec->seed, c));
    size_t calib = spec->calib_per_class, fit = spec->fit_per_class;
    split_append(&t->calib, pool, calib, j);
    split_append(&t->fit, pool + calib, fit, j);
    if (!test) {
        size_t rest = n - calib - fit;
        size_t eval = spec->eval_per_class == TASK_ALL ? rest : spec->eval_per_class;
        split_append(&t->eval, pool + calib + fit, eval, j);
        free(pool);
        return TOP_OK;
    }
    free(pool);

    if ((st = class_pool(&pool, &n, test, c, err)) != TOP_OK)
        return st;
    shuffle_indices(pool, n, class_stream(spec->seed + TEST_STREAM_OFFSET, c));
    split_append(&t->eval, pool, spec->eval_per_class == TASK_ALL ? n : spec->eval_per_class,
                 j);
    free(pool);
    return TOP_OK;
}

top_status task_make(task *out, const dataset *train, const dataset *test,
                     const task_spec *spec, top_error *err)
{
    if (!out)
        return top_error_set(err, TOP_ERR_INVALID, "task_make: out is NULL");
    memset(out, 0, sizeof *out);
    top_status st = task_check_spec(train, test, spec, err);
    if (st != TOP_OK)
        return st;

    out->n_classes = spec->classes ? spec->n_classes : train->n_classes;
    out->classes = malloc((size_t)out->n_classes * sizeof *out->classes);
    if (!out->classes)
        return top_error_set(err, TOP_ERR_NOMEM, "task: out of memory");
    for (int j = 0; j < out->n_classes; j++)
        out->classes[j] = spec->classes ? spec->classes[j] : j;

    size_t counts[3];
    st = task_plan(counts, out, train, test, spec, err);
    if (st == TOP_OK)
        st = split_alloc(&out->calib, train, counts[0], err);
    if (st == TOP_OK)
        st = split_alloc(&out->fit, train, counts[1], err);
    if (st == TOP_OK)
        st = split_alloc(&out->eval, test ? test : train, counts[2], err);
    for (int j = 0; st == TOP_OK && j < out->n_classes; j++)
        st = task_draw_class(out, j, train, test, spec, err);
    if (st != TOP_OK) {
        task_free(out);
        return st;
    }
    /* Each split gets its own stream, so batches mix the classes. */
    shuffle_split(&out->calib, spec->seed ^ 0x1ull);
    shuffle_split(&out->fit, spec->seed ^ 0x2ull);
    shuffle_split(&out->eval, spec->seed ^ 0x3ull);
    return TOP_OK;
}

top_status task_class_groups(int *groups, int n_classes, int n_groups, uint64_t seed,
                             top_error *err)
{
    if (!groups || n_classes <= 0 || n_classes > DATASET_MAX_CLASSES || n_groups <= 0 ||
        n_groups > n_classes)
        return top_error_set(err, TOP_ERR_INVALID,
                             "task_class_groups: %d classes cannot form %d groups", n_classes,
                             n_groups);
    size_t *order = malloc((size_t)n_classes * sizeof *order);
    if (!order)
        return top_error_set(err, TOP_ERR_NOMEM, "task_class_groups: out of memory");
    for (int c = 0; c < n_classes; c++)
        order[c] = (size_t)c;
    if (seed != 0)
        shuffle_indices(order, (size_t)n_classes, seed);

    int per = n_classes / n_groups;
    for (int g = 0; g < n_groups; g++) {
        int *dst = groups + (size_t)g * (size_t)per;
        for (int k = 0; k < per; k++)
            dst[k] = (int)order[(size_t)g * (size_t)per + (size_t)k];
        for (int a = 1; a < per; a++) /* insertion sort: groups are small */
            for (int b = a; b > 0 && dst[b - 1] > dst[b]; b--) {
                int tmp = dst[b];
                dst[b] = dst[b - 1];
                dst[b - 1] = tmp;
            }
    }
    free(order);
    return TOP_OK;
}

/* ---- batch iterator ----------------------------------------------------- */

/*
 * Two slots alternate: the worker fills batch k into slot k % 2 while the
 * consumer reads batch k - 1 from the other. A slot is `full` from the moment
 * the worker finishes it until the consumer requests the batch after it.
 * mu guards full, failed, werr and taken; stop is also read by the worker
 * between images without the lock.
 */
typedef struct batch_slot {
    batch b;
    size_t *indices;
    int full;
} batch_slot;

struct batch_iter {
    const task_split *split;
    graph_preprocess pp;
    int batch_size;
    size_t sample_floats; /* C * H * W */
    size_t n_batches, taken;
    int holding; /* the consumer reads slot (taken - 1) % 2 */
    batch_slot slots[2];
    batch end; /* n = 0 */

    pthread_t thread;
    int started;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    atomic_int stop;
    int failed;
    top_error werr;
};

/* Decodes and preprocesses batch k into slot s (worker thread, no lock). */
static top_status batch_fill(batch_iter *it, batch_slot *s, size_t k, top_error *err)
{
    size_t first = k * (size_t)it->batch_size;
    size_t left = it->split->count - first;
    int n = left < (size_t)it->batch_size ? (int)left : it->batch_size;
    for (int i = 0; i < n; i++) {
        if (atomic_load(&it->stop))
            return TOP_ERR_CANCELLED;
        size_t index = it->split->indices[first + (size_t)i];
        image_u8 img;
        top_status st = dataset_get(it->split->source, index, &img, err);
        if (st == TOP_OK)
            st = image_preprocess(s->b.x + (size_t)i * it->sample_floats, &img, &it->pp, err);
        image_free(&img);
        if (st != TOP_OK)
            return st;
        s->indices[i] = index;
        s->b.labels[i] = it->split->labels[first + (size_t)i];
    }
    s->b.n = n;
    s->b.first = first;
    return TOP_OK;
}

static void *batch_worker(void *arg)
{
    batch_iter *it = arg;
    for (size_t k = 0; k < it->n_batches; k++) {
        batch_slot *s = &it->slots[k % 2];
        pthread_mutex_lock(&it->mu);
        while (s->full && !atomic_load(&it->stop))
            pthread_cond_wait(&it->cv, &it->mu);
        pthread_mutex_unlock(&it->mu);
        if (atomic_load(&it->stop))
            break;

        top_error e;
        top_error_clear(&e);
        top_status st = batch_fill(it, s, k, &e);
        pthread_mutex_lock(&it->mu);
        if (st == TOP_OK) {
            s->full = 1;
        } else if (st != TOP_ERR_CANCELLED) {
            it->failed = 1;
            it->werr = e;
        }
        pthread_cond_broadcast(&it->cv);
        pthread_mutex_unlock(&it->mu);
        if (st != TOP_OK)
            break;
    }
    return NULL;
}

static top_status batch_iter_alloc(batch_iter *it, top_error *err)
{
    size_t floats;
    if (top_size_mul(&floats, it->sample_floats, (size_t)it->batch_size) != 0 ||
        floats > TENSOR_MAX_ELEMENTS)
        return top_error_set(err, TOP_ERR_LIMIT,
                             "batch iterator: a batch of %d images of %zu floats is too large",
                             it->batch_size, it->sample_floats);
    for (int s = 0; s < 2; s++) {
        batch_slot *slot = &it->slots[s];
        slot->b.x = top_aligned_alloc(floats * sizeof(float));
        slot->b.labels = malloc((size_t)it->batch_size * sizeof(int));
        slot->indices = malloc((size_t)it->batch_size * sizeof(size_t));
        slot->b.indices = slot->indices;
        if (!slot->b.x || !slot->b.labels || !slot->indices)
            return top_error_set(err, TOP_ERR_NOMEM,
                                 "batch iterator: out of memory for a batch of %d images",
                                 it->batch_size);
    }
    return TOP_OK;
}

top_status batch_iter_new(batch_iter **out, const task_split *split, const graph_preprocess *pp,
                          int batch_size, top_error *err)
{
    if (!out || !split || !pp || !split->source || (split->count && !split->indices))
        return top_error_set(err, TOP_ERR_INVALID, "batch_iter_new: NULL argument");
    *out = NULL;
    if (batch_size <= 0)
        return top_error_set(err, TOP_ERR_INVALID, "batch iterator: batch size %d must be > 0",
                             batch_size);
    if (pp->channels <= 0 || pp->height <= 0 || pp->width <= 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "batch iterator: model input (%d, %d, %d) must be positive",
                             pp->channels, pp->height, pp->width);
    batch_iter *it = calloc(1, sizeof *it);
    if (!it)
        return top_error_set(err, TOP_ERR_NOMEM, "batch iterator: out of memory");
    it->split = split;
    it->pp = *pp;
    it->batch_size = batch_size;
    it->sample_floats = (size_t)pp->channels * (size_t)pp->height * (size_t)pp->width;
    it->n_batches = (split->count + (size_t)batch_size - 1) / (size_t)batch_size;
    it->end.first = split->count;
    atomic_init(&it->stop, 0);
    pthread_mutex_init(&it->mu, NULL);
    pthread_cond_init(&it->cv, NULL);

    top_status st = batch_iter_alloc(it, err);
    if (st == TOP_OK) {
        int rc = pthread_create(&it->thread, NULL, batch_worker, it);
        if (rc != 0)
            st = top_error_set(err, TOP_ERR_NOMEM, "batch iterator: cannot start a thread: %s",
                               strerror(rc));
        it->started = rc == 0;
    }
    if (st != TOP_OK) {
        batch_iter_free(it);
        return st;
    }
    *out = it;
    return TOP_OK;
}

top_status batch_iter_next(batch_iter *it, const batch **b, top_error *err)
{
    if (!it || !b)
        return top_error_set(err, TOP_ERR_INVALID, "batch_iter_next: NULL argument");
    pthread_mutex_lock(&it->mu);
    if (it->holding) {
        it->slots[(it->taken - 1) % 2].full = 0;
        it->holding = 0;
        pthread_cond_broadcast(&it->cv);
    }
    if (it->taken == it->n_batches) {
        pthread_mutex_unlock(&it->mu);
        *b = &it->end;
        return TOP_OK;
    }
    batch_slot *s = &it->slots[it->taken % 2];
    while (!s->full && !it->failed)
        pthread_cond_wait(&it->cv, &it->mu);
    if (!s->full) {
        top_status st = top_error_set(err, it->werr.status, "%s", it->werr.message);
        pthread_mutex_unlock(&it->mu);
        *b = NULL;
        return st;
    }
    it->holding = 1;
    it->taken++;
    pthread_mutex_unlock(&it->mu);
    *b = &s->b;
    return TOP_OK;
}

void batch_iter_free(batch_iter *it)
{
    if (!it)
        return;
    if (it->started) {
        pthread_mutex_lock(&it->mu);
        atomic_store(&it->stop, 1);
        pthread_cond_broadcast(&it->cv);
        pthread_mutex_unlock(&it->mu);
        pthread_join(it->thread, NULL);
    }
    for (int s = 0; s < 2; s++) {
        top_aligned_free(it->slots[s].b.x);
        free(it->slots[s].b.labels);
        free(it->slots[s].indices);
    }
    pthread_cond_destroy(&it->cv);
    pthread_mutex_destroy(&it->mu);
    free(it);
}
