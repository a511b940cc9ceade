/*
 * safetensors reader and writer; the format and the contract are in
 * safetensors.h.
 *
 * Layout: bytes [0, 8) hold the header length L (little-endian u64), bytes
 * [8, 8 + L) the header JSON, and the data section starts at 8 + L. A
 * tensor's bytes are data[begin, end), little-endian and row-major, with
 * end - begin = numel * dtype size.
 *
 * The data section is not necessarily aligned (a file may have any header
 * length), so every value is read with memcpy, never through a cast pointer.
 * The writer pads the header with spaces to make 8 + L a multiple of 8, as
 * the reference implementation does.
 *
 * Thread-safety: an st_file is immutable after st_open and may be read by
 * many threads; an st_writer belongs to one thread.
 *
 * Not done: big-endian hosts, because the F32 fast path and the writer copy
 * bytes as they are. Float8 dtypes are rejected as unsupported. The whole
 * header is validated at open, with no lazy parsing.
 */
#include "safetensors.h"
#include "fileio.h"

#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>

#include "half.h"

/* ---- dtypes ------------------------------------------------------------- */

static const struct {
    const char *name;
    size_t size;
} st_dtypes[ST_DTYPE_COUNT] = {
    [ST_DTYPE_F64] = {"F64", 8},   [ST_DTYPE_F32] = {"F32", 4}, [ST_DTYPE_F16] = {"F16", 2},
    [ST_DTYPE_BF16] = {"BF16", 2}, [ST_DTYPE_I64] = {"I64", 8}, [ST_DTYPE_I32] = {"I32", 4},
    [ST_DTYPE_I16] = {"I16", 2},   [ST_DTYPE_I8] = {"I8", 1},   [ST_DTYPE_U64] = {"U64", 8},
    [ST_DTYPE_U32] = {"U32", 4},   [ST_DTYPE_U16] = {"U16", 2}, [ST_DTYPE_U8] = {"U8", 1},
    [ST_DTYPE_BOOL] = {"BOOL", 1},
};

const char *st_dtype_str(st_dtype dtype)
{
    if ((int)dtype < 0 || dtype >= ST_DTYPE_COUNT)
        return NULL;
    return st_dtypes[dtype].name;
}

size_t st_dtype_size(st_dtype dtype)
{
    if ((int)dtype < 0 || dtype >= ST_DTYPE_COUNT)
        return 0;
    return st_dtypes[dtype].size;
}

/* ---- reader ------------------------------------------------------------- */

struct st_file {
    const uint8_t *base; /* the whole file or buffer */
    size_t size;
    int mapped;          /* 1 if base is an mmap to unmap on close */
    const uint8_t *data; /* base + 8 + header length */
    size_t data_size;
    st_tensor_info *tensors; /* sorted by (begin, end, name) */
    size_t count;
    st_tensor_info **by_name; /* sorted by name, for st_find */
    char **meta_keys, **meta_values;
    size_t meta_count;
};

/* Names a JSON value's type for messages ("an array"). */
static const char *st_json_kind(const json_t *v)
{
    switch (json_typeof(v)) {
    case JSON_OBJECT: return "an object";
    case JSON_ARRAY: return "an array";
    case JSON_STRING: return "a string";
    case JSON_INTEGER: return "an integer";
    case JSON_REAL: return "a real number";
    case JSON_TRUE:
    case JSON_FALSE: return "a boolean";
    case JSON_NULL: return "null";
    }
    return "an unknown JSON value";
}

/* Tensor names are printed at most this long in messages, so a long name
 * cannot push the offending value out of the fixed-size message. */
#define ST_NAME_FMT "'%.160s'"

static top_status st_parse_dtype(st_tensor_info *t, const json_t *value, top_error *err)
{
    if (!json_is_string(value))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " ST_NAME_FMT ": dtype is %s, not a string; expected "
                             "one of F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL",
                             t->name, st_json_kind(value));
    const char *s = json_string_value(value);
    for (int d = 0; d < ST_DTYPE_COUNT; d++) {
        if (strcmp(s, st_dtypes[d].name) == 0) {
            t->dtype = (st_dtype)d;
            return TOP_OK;
        }
    }
    return top_error_set(err, TOP_ERR_UNSUPPORTED,
                         "tensor " ST_NAME_FMT ": dtype '%.32s' is not supported; convert it "
                         "to one of F64 F32 F16 BF16 I64 I32 I16 I8 U64 U32 U16 U8 BOOL",
                         t->name, s);
}

static top_status st_parse_shape(st_tensor_info *t, const json_t *value, top_error *err)
{
    if (!json_is_array(value))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " ST_NAME_FMT ": shape is %s, not an array of integers",
                             t->name, st_json_kind(value));
    size_t rank = json_array_size(value);
    if (rank > TENSOR_MAX_DIMS)
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "tensor " ST_NAME_FMT ": rank %zu is above the maximum of %d; "
                             "reshape the tensor to at most %d dimensions",
                             t->name, rank, TENSOR_MAX_DIMS, TENSOR_MAX_DIMS);
    t->ndim = (int)rank;

    size_t numel = 1;
    for (size_t i = 0; i < rank; i++) {
        const json_t *dim = json_array_get(value, i);
        if (!json_is_integer(dim))
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "tensor " ST_NAME_FMT ": shape dimension %zu is %s, not an "
                                 "integer",
                                 t->name, i, st_json_kind(dim));
        if (json_integer_value(dim) < 0)
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "tensor " ST_NAME_FMT ": shape dimension %zu is %lld; "
                                 "dimensions must be non-negative",
                                 t->name, i, (long long)json_integer_value(dim));
        t->shape[i] = (int64_t)json_integer_value(dim);
        if ((uint64_t)t->shape[i] > TENSOR_MAX_ELEMENTS ||
            top_size_mul(&numel, numel, (size_t)t->shape[i]) || numel > TENSOR_MAX_ELEMENTS) {
            char buf[160];
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "tensor " ST_NAME_FMT ": shape %s has more than %zu elements; "
                                 "the file is corrupt",
                                 t->name,
                                 tensor_shape_str(buf, sizeof buf, (int)rank, t->shape),
                                 TENSOR_MAX_ELEMENTS);
        }
    }
    t->numel = numel;
    return TOP_OK;
}

/* Reads one of the two data_offsets into *out. */
static int st_offset_value(size_t *out, const json_t *value)
{
    if (!json_is_integer(value) || json_integer_value(value) < 0)
        return -1;
    *out = (size_t)json_integer_value(value);
    return 0;
}

/* Checks data_offsets against the data section size and the shape, so the
 * dtype and shape must be parsed first. */
static top_status st_parse_offsets(st_tensor_info *t, const json_t *value, size_t data_size,
                                   top_error *err)
{
    if (!json_is_array(value) || json_array_size(value) != 2 ||
        st_offset_value(&t->begin, json_array_get(value, 0)) ||
        st_offset_value(&t->end, json_array_get(value, 1)))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " ST_NAME_FMT ": data_offsets is not an array of two "
                             "non-negative integers [begin, end]",
                             t->name);
    if (t->end < t->begin)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " ST_NAME_FMT ": data_offsets [%zu, %zu] end before they "
                             "begin",
                             t->name, t->begin, t->end);
    if (t->end > data_size)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " ST_NAME_FMT ": data_offsets [%zu, %zu] run past the %zu "
                             "bytes of data; the file is truncated or corrupt",
                             t->name, t->begin, t->end, data_size);

    size_t bytes;
    if (top_size_mul(&bytes, t->numel, st_dtypes[t->dtype].size) ||
        t->end - t->begin != bytes) {
        char buf[160];
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " ST_NAME_FMT ": data_offsets [%zu, %zu] do not match "
                             "shape %s of %s (%zu bytes)",
                             t->name, t->begin, t->end,
                             tensor_shape_str(buf, sizeof buf, t->ndim, t->shape),
                             st_dtypes[t->dtype].name, t->numel * st_dtypes[t->dtype].size);
    }
    return TOP_OK;
}

/* Parses one tensor entry into t, whose name the caller has set. */
static top_status st_parse_entry(st_tensor_info *t, json_t *entry, size_t data_size,
                                 top_error *err)
{
    if (!json_is_object(entry))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " ST_NAME_FMT ": entry is %s, not an object with dtype, "
                             "shape and data_offsets",
                             t->name, st_json_kind(entry));
    for (void *it = json_object_iter(entry); it; it = json_object_iter_next(entry, it)) {
        const char *key = json_object_iter_key(it);
        if (strcmp(key, "dtype") && strcmp(key, "shape") && strcmp(key, "data_offsets"))
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "tensor " ST_NAME_FMT
                                 ": unknown key '%.64s'; an entry has only "
                                 "dtype, shape and data_offsets",
                                 t->name, key);
    }
    const char *required[3] = {"dtype", "shape", "data_offsets"};
    for (int i = 0; i < 3; i++) {
        if (!json_object_get(entry, required[i]))
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "tensor " ST_NAME_FMT ": key '%s' is missing", t->name,
                                 required[i]);
    }

    top_status st = st_parse_dtype(t, json_object_get(entry, "dtype"), err);
    if (st == TOP_OK)
        st = st_parse_shape(t, json_object_get(entry, "shape"), err);
    if (st == TOP_OK)
        st = st_parse_offsets(t, json_object_get(entry, "data_offsets"), data_size, err);
    return st;
}

static top_status st_parse_metadata(st_file *f, json_t *meta, top_error *err)
{
    if (!json_is_object(meta))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "__metadata__ is %s, not an object of string values",
                             st_json_kind(meta));
    size_t n = json_object_size(meta);
    if (n == 0)
        return TOP_OK;
    f->meta_keys = calloc(n, sizeof *f->meta_keys);
    f->meta_values = calloc(n, sizeof *f->meta_values);
    if (!f->meta_keys || !f->meta_values)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate %zu metadata entries", n);

    for (void *it = json_object_iter(meta); it; it = json_object_iter_next(meta, it)) {
        const char *key = json_object_iter_key(it);
        const json_t *value = json_object_iter_value(it);
        if (!json_is_string(value))
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "__metadata__ entry '%.160s' is %s; metadata values must be "
                                 "JSON strings",
                                 key, st_json_kind(value));
        char *k = strdup(key), *v = strdup(json_string_value(value));
        if (!k || !v) {
            free(k);
            free(v);
            return top_error_set(err, TOP_ERR_NOMEM, "cannot copy metadata entry '%.160s'",
                                 key);
        }
        f->meta_keys[f->meta_count] = k;
        f->meta_values[f->meta_count] = v;
        f->meta_count++;
    }
    return TOP_OK;
}

/* Walks the header object, filling f->tensors and the metadata. */
static top_status st_parse_entries(st_file *f, json_t *root, top_error *err)
{
    size_t n = json_object_size(root);
    if (n > 0) {
        f->tensors = calloc(n, sizeof *f->tensors);
        if (!f->tensors)
            return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate %zu tensor entries", n);
    }

    for (void *it = json_object_iter(root); it; it = json_object_iter_next(root, it)) {
        const char *key = json_object_iter_key(it);
        json_t *value = json_object_iter_value(it);
        top_status st;
        if (strcmp(key, "__metadata__") == 0) {
            st = st_parse_metadata(f, value, err);
        } else {
            st_tensor_info *t = &f->tensors[f->count];
            t->name = strdup(key);
            if (!t->name)
                return top_error_set(err, TOP_ERR_NOMEM, "cannot copy tensor name");
            f->count++;
            st = st_parse_entry(t, value, f->data_size, err);
        }
        if (st != TOP_OK)
            return st;
    }
    return TOP_OK;
}

static int st_compare_offsets(const void *pa, const void *pb)
{
    const st_tensor_info *a = pa, *b = pb;
    if (a->begin != b->begin)
        return a->begin < b->begin ? -1 : 1;
    if (a->end != b->end)
        return a->end < b->end ? -1 : 1;
    return strcmp(a->name, b->name);
}

static int st_compare_names(const void *pa, const void *pb)
{
    const st_tensor_info *const *a = pa, *const *b = pb;
    return strcmp((*a)->name, (*b)->name);
}

/* Sorts the tensors by offset, rejects overlaps and builds the name index.
 * A tensor overlaps when its begin falls inside an earlier tensor's
 * [begin, end), so an empty tensor may sit only on a boundary. */
static top_status st_index(st_file *f, top_error *err)
{
    if (f->count == 0)
        return TOP_OK;
    qsort(f->tensors, f->count, sizeof *f->tensors, st_compare_offsets);
    const st_tensor_info *reach = &f->tensors[0]; /* the tensor with the largest end */
    for (size_t i = 1; i < f->count; i++) {
        const st_tensor_info *t = &f->tensors[i];
        if (t->begin < reach->end)
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "tensors " ST_NAME_FMT " [%zu, %zu] and " ST_NAME_FMT
                                 " [%zu, %zu] overlap; each tensor needs its own bytes",
                                 reach->name, reach->begin, reach->end, t->name, t->begin,
                                 t->end);
        if (t->end > reach->end)
            reach = t;
    }

    f->by_name = malloc(f->count * sizeof *f->by_name);
    if (!f->by_name)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate the tensor name index");
    for (size_t i = 0; i < f->count; i++)
        f->by_name[i] = &f->tensors[i];
    qsort(f->by_name, f->count, sizeof *f->by_name, st_compare_names);
    return TOP_OK;
}

/* Validates f->base[0, f->size) and fills the rest of f. */
static top_status st_parse(st_file *f, top_error *err)
{
    if (f->size < 8)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "file is %zu bytes, shorter than the 8-byte header length; it is "
                             "truncated or not a safetensors file",
                             f->size);
    uint64_t header_len = 0;
    for (int i = 7; i >= 0; i--)
        header_len = header_len << 8 | f->base[i];
    if (header_len > ST_MAX_HEADER_BYTES)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "header length %llu is above the limit of %zu bytes; the file is "
                             "corrupt or not a safetensors file",
                             (unsigned long long)header_len, ST_MAX_HEADER_BYTES);
    if (header_len > f->size - 8)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "header length %llu is more than the %zu bytes after the length "
                             "field; the file is truncated or not a safetensors file",
                             (unsigned long long)header_len, f->size - 8);
    f->data = f->base + 8 + header_len;
    f->data_size = f->size - 8 - (size_t)header_len;

    json_error_t jerr;
    json_t *root = json_loadb((const char *)f->base + 8, (size_t)header_len,
                              JSON_REJECT_DUPLICATES, &jerr);
    if (!root)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "header JSON is invalid at byte %d of %llu: %s", jerr.position,
                             (unsigned long long)header_len, jerr.text);
    top_status st;
    if (!json_is_object(root))
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "header JSON is %s, not an object that maps tensor names to "
                           "entries",
                           st_json_kind(root));
    else
        st = st_parse_entries(f, root, err);
    json_decref(root);
    if (st == TOP_OK)
        st = st_index(f, err);
    return st;
}

void st_close(st_file *f)
{
    if (!f)
        return;
    for (size_t i = 0; i < f->count; i++)
        free(f->tensors[i].name);
    free(f->tensors);
    free(f->by_name);
    for (size_t i = 0; i < f->meta_count; i++) {
        free(f->meta_keys[i]);
        free(f->meta_values[i]);
    }
    free(f->meta_keys);
    free(f->meta_values);
    if (f->mapped)
        munmap((void *)(uintptr_t)f->base, f->size);
    free(f);
}

top_status st_open_memory(st_file **out, const void *data, size_t size, top_error *err)
{
    *out = NULL;
    if (!data && size > 0)
        return top_error_set(err, TOP_ERR_INVALID, "buffer is NULL but its size is %zu", size);
    st_file *f = calloc(1, sizeof *f);
    if (!f)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate a safetensors handle");
    f->base = data;
    f->size = size;
    top_status st = st_parse(f, err);
    if (st != TOP_OK) {
        st_close(f);
        return st;
    }
    *out = f;
    return TOP_OK;
}

/* Maps path read-only into *base and *size.
 * NOTE: a file truncated by another process while mapped raises SIGBUS on
 * access; checkpoints are replaced by rename, never rewritten in place. */
static top_status st_map(const uint8_t **base, size_t *size, const char *path, top_error *err)
{
    int fd = top_open_regular(path, err);
    if (fd < 0)
        return err ? err->status : TOP_ERR_IO;
    struct stat sb;
    top_status st = TOP_OK;
    if (fstat(fd, &sb) != 0) {
        st = top_error_set(err, TOP_ERR_IO, "cannot stat '%s': %s", path, strerror(errno));
        goto out;
    }
    if (!S_ISREG(sb.st_mode)) {
        st = top_error_set(err, TOP_ERR_IO, "cannot read '%s': %s", path,
                           S_ISDIR(sb.st_mode) ? strerror(EISDIR) : "not a regular file");
        goto out;
    }
    *size = (size_t)sb.st_size;
    *base = NULL;
    if (*size < 8)
        goto out; /* st_parse rejects it with the size in the message */
    void *p = mmap(NULL, *size, PROT_READ, MAP_PRIVATE, fd, 0);
    if (p == MAP_FAILED) {
        st = top_error_set(err, TOP_ERR_IO, "cannot mmap '%s' (%zu bytes): %s", path, *size,
                           strerror(errno));
        goto out;
    }
    *base = p;
out:
    close(fd);
    return st;
}

top_status st_open(st_file **out, const char *path, top_error *err)
{
    *out = NULL;
    const uint8_t *base = NULL;
    size_t size = 0;
    top_status st = st_map(&base, &size, path, err);
    if (st != TOP_OK)
        return st;

    st_file *f = calloc(1, sizeof *f);
    if (!f) {
        if (base)
            munmap((void *)(uintptr_t)base, size);
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate a safetensors handle");
    }
    f->base = base;
    f->size = size;
    f->mapped = base != NULL;

    /* Parse into a local error so the message can be prefixed with the path. */
    top_error local;
    top_error_clear(&local);
    st = st_parse(f, &local);
    if (st != TOP_OK) {
        st_close(f);
        return top_error_set(err, st, "%s: %s", path, local.message);
    }
    *out = f;
    return TOP_OK;
}

size_t st_tensor_count(const st_file *f)
{
    return f->count;
}

const st_tensor_info *st_tensor_at(const st_file *f, size_t i)
{
    return i < f->count ? &f->tensors[i] : NULL;
}

const st_tensor_info *st_find(const st_file *f, const char *name)
{
    size_t lo = 0, hi = f->count;
    while (lo < hi) {
        size_t mid = lo + (hi - lo) / 2;
        int c = strcmp(name, f->by_name[mid]->name);
        if (c == 0)
            return f->by_name[mid];
        if (c < 0)
            hi = mid;
        else
            lo = mid + 1;
    }
    return NULL;
}

const void *st_tensor_data(const st_file *f, const st_tensor_info *t)
{
    return f->data + t->begin;
}

size_t st_metadata_count(const st_file *f)
{
    return f->meta_count;
}

const char *st_metadata_key(const st_file *f, size_t i)
{
    return i < f->meta_count ? f->meta_keys[i] : NULL;
}

const char *st_metadata_value(const st_file *f, size_t i)
{
    return i < f->meta_count ? f->meta_values[i] : NULL;
}

const char *st_metadata_get(const st_file *f, const char *key)
{
    for (size_t i = 0; i < f->meta_count; i++) {
        if (strcmp(f->meta_keys[i], key) == 0)
            return f->meta_values[i];
    }
    return NULL;
}

/* ---- conversion to float32 ---------------------------------------------- */

/* Loads an n-byte little-endian unsigned integer (n <= 8). */
static uint64_t st_load_le(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    for (size_t i = n; i-- > 0;)
        v = v << 8 | p[i];
    return v;
}

/* Converts element i of the little-endian bytes src. Narrowing unsigned to
 * signed casts wrap modulo 2^n, as GCC and Clang define them. */
static float st_element_f32(const uint8_t *src, st_dtype dtype, size_t i)
{
    size_t size = st_dtypes[dtype].size;
    uint64_t bits = st_load_le(src + i * size, size);
    switch (dtype) {
    case ST_DTYPE_F64: {
        double v;
        memcpy(&v, &bits, sizeof v);
        return (float)v;
    }
    case ST_DTYPE_F32: {
        uint32_t b32 = (uint32_t)bits;
        float v;
        memcpy(&v, &b32, sizeof v);
        return v;
    }
    case ST_DTYPE_F16: return half_to_float((uint16_t)bits);
    case ST_DTYPE_BF16: return bfloat16_to_float((uint16_t)bits);
    case ST_DTYPE_I64: return (float)(int64_t)bits;
    case ST_DTYPE_I32: return (float)(int32_t)(uint32_t)bits;
    case ST_DTYPE_I16: return (float)(int16_t)(uint16_t)bits;
    case ST_DTYPE_I8: return (float)(int8_t)(uint8_t)bits;
    case ST_DTYPE_U64:
    case ST_DTYPE_U32:
    case ST_DTYPE_U16:
    case ST_DTYPE_U8: return (float)bits;
    case ST_DTYPE_BOOL: return bits ? 1.0f : 0.0f;
    case ST_DTYPE_COUNT: break;
    }
    return 0.0f;
}

top_status st_read_f32(const st_file *f, const st_tensor_info *t, tensor *out, top_error *err)
{
    top_error local;
    top_error_clear(&local);
    top_status st = tensor_init(out, t->ndim, t->shape, &local);
    if (st != TOP_OK)
        return top_error_set(err, st, "tensor " ST_NAME_FMT ": %s", t->name, local.message);
    const uint8_t *src = st_tensor_data(f, t);
    if (t->dtype == ST_DTYPE_F32) {
        if (t->numel)
            memcpy(out->data, src, t->numel * sizeof(float));
        return TOP_OK;
    }
    for (size_t i = 0; i < t->numel; i++)
        out->data[i] = st_element_f32(src, t->dtype, i);
    return TOP_OK;
}

/* ---- writer ------------------------------------------------------------- */

typedef struct st_writer_tensor {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    void *data;
    size_t bytes;
} st_writer_tensor;

struct st_writer {
    st_writer_tensor *tensors;
    size_t count, cap;
    char **meta_keys, **meta_values;
    size_t meta_count, meta_cap;
};

top_status st_writer_new(st_writer **out, top_error *err)
{
    *out = calloc(1, sizeof **out);
    if (!*out)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate a safetensors writer");
    return TOP_OK;
}

void st_writer_free(st_writer *w)
{
    if (!w)
        return;
    for (size_t i = 0; i < w->count; i++) {
        free(w->tensors[i].name);
        free(w->tensors[i].data);
    }
    free(w->tensors);
    for (size_t i = 0; i < w->meta_count; i++) {
        free(w->meta_keys[i]);
        free(w->meta_values[i]);
    }
    free(w->meta_keys);
    free(w->meta_values);
    free(w);
}

/* Returns 1 if s is valid UTF-8 without NUL, which JSON strings need. */
static int st_is_json_string(const char *s)
{
    json_t *j = json_string(s);
    json_decref(j);
    return j != NULL;
}

/* Checks the arguments of st_writer_add other than data. */
static top_status st_writer_check(const st_writer *w, const char *name, st_dtype dtype,
                                  int ndim, const int64_t *shape, size_t bytes, top_error *err)
{
    if (!name)
        return top_error_set(err, TOP_ERR_INVALID, "tensor name is NULL");
    if (!st_is_json_string(name))
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor name is not valid UTF-8; names are JSON strings");
    if (strcmp(name, "__metadata__") == 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor name '__metadata__' is reserved for metadata; rename the "
                             "tensor");
    if (!st_dtype_str(dtype))
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor " ST_NAME_FMT ": dtype %d is not "
                             "an st_dtype value",
                             name, (int)dtype);
    for (size_t i = 0; i < w->count; i++) {
        if (strcmp(w->tensors[i].name, name) == 0)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "tensor " ST_NAME_FMT " is already added; names must be "
                                 "unique",
                                 name);
    }
    size_t numel, expected;
    top_status st = tensor_shape_numel(&numel, ndim, shape, name, err);
    if (st != TOP_OK)
        return st;
    if (top_size_mul(&expected, numel, st_dtypes[dtype].size) || bytes != expected) {
        char buf[160];
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor " ST_NAME_FMT ": %zu bytes do not match shape %s of %s "
                             "(%zu bytes)",
                             name, bytes, tensor_shape_str(buf, sizeof buf, ndim, shape),
                             st_dtypes[dtype].name, numel * st_dtypes[dtype].size);
    }
    return TOP_OK;
}

top_status st_writer_add(st_writer *w, const char *name, st_dtype dtype, int ndim,
                         const int64_t *shape, const void *data, size_t bytes, top_error *err)
{
    top_status st = st_writer_check(w, name, dtype, ndim, shape, bytes, err);
    if (st != TOP_OK)
        return st;
    if (bytes > 0 && !data)
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor " ST_NAME_FMT ": data is NULL for %zu bytes", name, bytes);
    if (w->count == w->cap) {
        size_t cap = w->cap ? w->cap * 2 : 16;
        st_writer_tensor *grown = realloc(w->tensors, cap * sizeof *grown);
        if (!grown)
            return top_error_set(err, TOP_ERR_NOMEM, "cannot grow the writer to %zu tensors",
                                 cap);
        w->tensors = grown;
        w->cap = cap;
    }

    st_writer_tensor *t = &w->tensors[w->count];
    memset(t, 0, sizeof *t);
    t->name = strdup(name);
    t->data = bytes ? malloc(bytes) : NULL;
    if (!t->name || (bytes && !t->data)) {
        free(t->name);
        free(t->data);
        return top_error_set(err, TOP_ERR_NOMEM,
                             "cannot copy tensor " ST_NAME_FMT " (%zu bytes)", name, bytes);
    }
    if (bytes)
        memcpy(t->data, data, bytes);
    t->dtype = dtype;
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++)
        t->shape[i] = shape[i];
    t->bytes = bytes;
    w->count++;
    return TOP_OK;
}

top_status st_writer_add_f32(st_writer *w, const char *name, const tensor *t, top_error *err)
{
    size_t bytes;
    if (top_size_mul(&bytes, t->numel, sizeof(float)))
        return top_error_set(err, TOP_ERR_OVERFLOW,
                             "tensor " ST_NAME_FMT ": %zu floats overflow size_t", name,
                             t->numel);
    return st_writer_add(w, name, ST_DTYPE_F32, t->ndim, t->shape, t->data, bytes, err);
}

top_status st_writer_set_metadata(st_writer *w, const char *key, const char *value,
                                  top_error *err)
{
    if (!key || !value || !st_is_json_string(key) || !st_is_json_string(value))
        return top_error_set(err, TOP_ERR_INVALID,
                             "metadata key and value must be non-NULL UTF-8 strings");
    char *v = strdup(value);
    if (!v)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot copy a metadata value");
    for (size_t i = 0; i < w->meta_count; i++) {
        if (strcmp(w->meta_keys[i], key) == 0) {
            free(w->meta_values[i]);
            w->meta_values[i] = v;
            return TOP_OK;
        }
    }
    if (w->meta_count == w->meta_cap) {
        size_t cap = w->meta_cap ? w->meta_cap * 2 : 8;
        char **keys = realloc(w->meta_keys, cap * sizeof *keys);
        if (keys)
            w->meta_keys = keys;
        char **values = keys ? realloc(w->meta_values, cap * sizeof *values) : NULL;
        if (values)
            w->meta_values = values;
        if (!keys || !values) {
            free(v);
            return top_error_set(err, TOP_ERR_NOMEM, "cannot grow the metadata table");
        }
        w->meta_cap = cap;
    }
    char *k = strdup(key);
    if (!k) {
        free(v);
        return top_error_set(err, TOP_ERR_NOMEM, "cannot copy a metadata key");
    }
    w->meta_keys[w->meta_count] = k;
    w->meta_values[w->meta_count] = v;
    w->meta_count++;
    return TOP_OK;
}

/* Builds one header entry {"dtype", "shape", "data_offsets"}. */
static json_t *st_writer_entry(const st_writer_tensor *t, size_t begin)
{
    json_t *entry = json_object(), *shape = json_array(), *offsets = json_array();
    int bad = !entry || !shape || !offsets;
    for (int i = 0; !bad && i < t->ndim; i++)
        bad = json_array_append_new(shape, json_integer((json_int_t)t->shape[i])) != 0;
    if (!bad)
        bad = json_array_append_new(offsets, json_integer((json_int_t)begin)) ||
              json_array_append_new(offsets, json_integer((json_int_t)(begin + t->bytes)));
    if (!bad)
        bad = json_object_set_new(entry, "dtype", json_string(st_dtypes[t->dtype].name)) ||
              json_object_set(entry, "shape", shape) ||
              json_object_set(entry, "data_offsets", offsets);
    json_decref(shape);
    json_decref(offsets);
    if (bad) {
        json_decref(entry);
        return NULL;
    }
    return entry;
}

/* Builds the header: 8-byte length, JSON, spaces up to a multiple of 8.
 * The caller frees *out. */
static top_status st_writer_header(char **out, size_t *out_len, const st_writer *w,
                                   top_error *err)
{
    json_t *root = json_object();
    int bad = root == NULL;
    if (!bad && w->meta_count) {
        json_t *meta = json_object();
        bad = json_object_set_new(root, "__metadata__", meta) != 0;
        for (size_t i = 0; !bad && i < w->meta_count; i++)
            bad = json_object_set_new(meta, w->meta_keys[i], json_string(w->meta_values[i]));
    }
    size_t offset = 0;
    for (size_t i = 0; !bad && i < w->count; i++) {
        bad = json_object_set_new(root, w->tensors[i].name,
                                  st_writer_entry(&w->tensors[i], offset)) != 0;
        offset += w->tensors[i].bytes;
    }
    char *text = bad ? NULL : json_dumps(root, JSON_COMPACT);
    json_decref(root);
    if (!text)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot build the header JSON");

    size_t len = strlen(text);
    size_t padded = (len + 7) / 8 * 8;
    char *buf = malloc(8 + padded);
    if (!buf) {
        free(text);
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate a %zu-byte header", padded);
    }
    for (int i = 0; i < 8; i++)
        buf[i] = (char)(uint8_t)((uint64_t)padded >> (8 * i));
    memcpy(buf + 8, text, len);
    memset(buf + 8 + len, ' ', padded - len);
    free(text);
    *out = buf;
    *out_len = 8 + padded;
    return TOP_OK;
}

/* Writes all n bytes of p to fd. Returns 0, or -1 with errno set. */
static int st_write_all(int fd, const void *p, size_t n)
{
    const char *c = p;
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

/* Writes header and data to tmp and fsyncs it. On failure tmp is left for
 * the caller to remove. */
static top_status st_writer_write_tmp(const st_writer *w, const char *tmp, const char *header,
                                      size_t header_len, top_error *err)
{
    int fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
    if (fd < 0)
        return top_error_set(err, TOP_ERR_IO, "cannot create '%s': %s", tmp, strerror(errno));
    int failed = st_write_all(fd, header, header_len);
    for (size_t i = 0; !failed && i < w->count; i++)
        failed = st_write_all(fd, w->tensors[i].data, w->tensors[i].bytes);
    const char *step = "write";
    if (!failed) {
        step = "fsync";
        failed = fsync(fd);
    }
    int saved = errno;
    if (close(fd) != 0 && !failed) {
        step = "close";
        failed = 1;
        saved = errno;
    }
    if (failed)
        return top_error_set(err, TOP_ERR_IO, "cannot %s '%s': %s", step, tmp, strerror(saved));
    return TOP_OK;
}

/* Fsyncs the directory that contains path, so a rename in it is durable. */
static top_status st_sync_dir(const char *path, top_error *err)
{
    const char *slash = strrchr(path, '/');
    char *dir = slash ? strndup(path, slash == path ? 1 : (size_t)(slash - path)) : strdup(".");
    if (!dir)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot copy the directory of '%s'", path);
    top_status st = TOP_OK;
    int fd = open(dir, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
    if (fd < 0 || fsync(fd) != 0)
        st =
            top_error_set(err, TOP_ERR_IO, "wrote '%s' but cannot fsync its directory '%s': %s",
                          path, dir, strerror(errno));
    if (fd >= 0)
        close(fd);
    free(dir);
    return st;
}

/* Rejects an empty path and a path that exists as anything but a regular
 * file, since the rename would replace a device, FIFO or socket. */
static top_status st_check_target(const char *path, top_error *err)
{
    struct stat sb;
    if (path[0] == '\0')
        return top_error_set(err, TOP_ERR_INVALID,
                             "the output path is empty; pass a file path");
    if (lstat(path, &sb) == 0 && !S_ISREG(sb.st_mode))
        return top_error_set(err, TOP_ERR_INVALID,
                             "cannot write '%s': it exists and is not a regular file; pass "
                             "a new file path",
                             path);
    return TOP_OK;
}

top_status st_writer_write(st_writer *w, const char *path, top_error *err)
{
    top_status check = st_check_target(path, err);
    if (check != TOP_OK)
        return check;
    size_t path_len = strlen(path);
    char *tmp = malloc(path_len + sizeof ".tmp");
    if (!tmp)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate a temporary path");
    memcpy(tmp, path, path_len);
    memcpy(tmp + path_len, ".tmp", sizeof ".tmp");

    char *header = NULL;
    size_t header_len = 0;
    top_status st = st_writer_header(&header, &header_len, w, err);
    if (st != TOP_OK)
        goto out;
    st = st_writer_write_tmp(w, tmp, header, header_len, err);
    if (st != TOP_OK)
        goto fail;
    if (rename(tmp, path) != 0) {
        st = top_error_set(err, TOP_ERR_IO, "cannot rename '%s' to '%s': %s", tmp, path,
                           strerror(errno));
        goto fail;
    }
    st = st_sync_dir(path, err);
    goto out;

fail:
    unlink(tmp);
out:
    free(header);
    free(tmp);
    return st;
}
