/*
 * Compressed checkpoint writer and reader (format in checkpoint.h), on top of
 * the safetensors writer and reader. Values move as raw little-endian bytes
 * (memcpy, never through float arithmetic), so -0.0 and NaN payloads keep
 * their bits. The "tensors" index is JSON built and parsed with jansson.
 * Reentrant.
 */
#include "checkpoint.h"

#include <jansson.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#define NAME_FMT "'%.160s'"

/* ---- writer -------------------------------------------------------------- */

/* "name" + suffix in a new string, or NULL. */
static char *part_name(const char *name, const char *suffix)
{
    size_t len = strlen(name) + strlen(suffix) + 1;
    char *s = malloc(len);
    if (s)
        snprintf(s, len, "%s%s", name, suffix);
    return s;
}

static size_t count_zero_bits(const void *data, size_t numel)
{
    const uint8_t *p = data;
    size_t zeros = 0;
    for (size_t i = 0; i < numel; i++) {
        uint32_t u;
        memcpy(&u, p + 4 * i, 4);
        zeros += u == 0;
    }
    return zeros;
}

/* Builds the mask and packed values of a float32 tensor and adds both.
 *   data: (numel) float32 bytes  mask: (ceil(numel / 8))  values: (nnz) */
static top_status add_sparse(st_writer *w, const ckpt_input *t, size_t numel, size_t nnz,
                             top_error *err)
{
    size_t mask_bytes = numel / 8 + (numel % 8 != 0);
    uint8_t *mask = calloc(mask_bytes ? mask_bytes : 1, 1);
    uint8_t *values = malloc(nnz ? nnz * 4 : 1);
    char *mask_name = part_name(t->name, "::mask"),
         *values_name = part_name(t->name, "::values");
    top_status st = TOP_OK;
    if (!mask || !values || !mask_name || !values_name) {
        st = top_error_set(err, TOP_ERR_NOMEM,
                           "tensor " NAME_FMT ": cannot allocate %zu bytes "
                           "of mask and values",
                           t->name, mask_bytes + nnz * 4);
        goto done;
    }

    const uint8_t *src = t->data;
    size_t k = 0;
    for (size_t i = 0; i < numel; i++) {
        uint32_t u;
        memcpy(&u, src + 4 * i, 4);
        if (u == 0)
            continue;
        mask[i / 8] |= (uint8_t)(1u << (i % 8));
        memcpy(values + 4 * k++, src + 4 * i, 4);
    }

    int64_t mask_shape[1] = {(int64_t)mask_bytes}, values_shape[1] = {(int64_t)nnz};
    st = st_writer_add(w, mask_name, ST_DTYPE_U8, 1, mask_shape, mask, mask_bytes, err);
    if (st == TOP_OK)
        st = st_writer_add(w, values_name, ST_DTYPE_F32, 1, values_shape, values, nnz * 4, err);

done:
    free(mask);
    free(values);
    free(mask_name);
    free(values_name);
    return st;
}

/* The "tensors" index entry of one input. */
static json_t *index_entry(const ckpt_input *t, int sparse, size_t nnz)
{
    json_t *entry = json_object(), *shape = json_array();
    if (!entry || !shape) {
        json_decref(entry);
        json_decref(shape);
        return NULL;
    }
    int bad = json_object_set_new(entry, "dtype", json_string(st_dtype_str(t->dtype)));
    for (int i = 0; i < t->ndim; i++)
        bad |= json_array_append_new(shape, json_integer((json_int_t)t->shape[i]));
    bad |= json_object_set_new(entry, "shape", shape);
    bad |= json_object_set_new(entry, "encoding", json_string(sparse ? "sparse" : "dense"));
    if (sparse)
        bad |= json_object_set_new(entry, "nonzero", json_integer((json_int_t)nnz));
    if (bad) {
        json_decref(entry);
        return NULL;
    }
    return entry;
}

static top_status add_tensor(st_writer *w, json_t *index, const ckpt_input *t, top_error *err)
{
    size_t numel;
    if (!t->name || !t->name[0] || strstr(t->name, "::"))
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor name " NAME_FMT " is empty or contains \"::\", which the "
                             "compressed format reserves; rename the tensor",
                             t->name ? t->name : "");
    if (json_object_get(index, t->name))
        return top_error_set(err, TOP_ERR_INVALID, "tensor " NAME_FMT " is listed twice",
                             t->name);
    if (tensor_shape_numel(&numel, t->ndim, t->shape, t->name, NULL) != TOP_OK)
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor " NAME_FMT ": rank %d or shape is invalid", t->name,
                             t->ndim);

    /* Sparse only when smaller: 4 bytes per zero saved vs 1 bit per element. */
    size_t nnz = numel, mask_bytes = numel / 8 + (numel % 8 != 0);
    int sparse = 0;
    if (t->dtype == ST_DTYPE_F32 && t->bytes == numel * 4) {
        size_t zeros = count_zero_bits(t->data, numel);
        nnz = numel - zeros;
        sparse = zeros * 4 > mask_bytes;
    }

    top_status st =
        sparse ? add_sparse(w, t, numel, nnz, err)
               : st_writer_add(w, t->name, t->dtype, t->ndim, t->shape, t->data, t->bytes, err);
    if (st != TOP_OK)
        return st;
    if (json_object_set_new(index, t->name, index_entry(t, sparse, nnz)))
        return top_error_set(err, TOP_ERR_INVALID,
                             "tensor " NAME_FMT ": cannot index the name (is it UTF-8?)",
                             t->name);
    return TOP_OK;
}

static int is_reserved_key(const char *key)
{
    return !strcmp(key, "format") || !strcmp(key, "format_version") || !strcmp(key, "tensors");
}

top_status ckpt_write(const char *path, const ckpt_input *tensors, size_t count,
                      const ckpt_metadata_entry *metadata, size_t n_metadata, top_error *err)
{
    st_writer *w = NULL;
    json_t *index = json_object();
    char *index_text = NULL;
    top_status st = TOP_OK;
    if (!index) {
        st = top_error_set(err, TOP_ERR_NOMEM, "cannot allocate the checkpoint index");
        goto done;
    }
    for (size_t i = 0; i < n_metadata; i++)
        if (!metadata[i].key || is_reserved_key(metadata[i].key)) {
            st = top_error_set(err, TOP_ERR_INVALID,
                               "metadata key '%.64s' is reserved by the compressed format; "
                               "choose another key",
                               metadata[i].key ? metadata[i].key : "(null)");
            goto done;
        }
    if ((st = st_writer_new(&w, err)) != TOP_OK)
        goto done;

    for (size_t i = 0; i < count && st == TOP_OK; i++)
        st = add_tensor(w, index, &tensors[i], err);
    if (st != TOP_OK)
        goto done;

    index_text = json_dumps(index, JSON_COMPACT | JSON_PRESERVE_ORDER);
    if (!index_text) {
        st = top_error_set(err, TOP_ERR_NOMEM, "cannot serialise the checkpoint index");
        goto done;
    }
    st = st_writer_set_metadata(w, "format", CKPT_FORMAT, err);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "format_version", CKPT_FORMAT_VERSION, err);
    if (st == TOP_OK)
        st = st_writer_set_metadata(w, "tensors", index_text, err);
    for (size_t i = 0; i < n_metadata && st == TOP_OK; i++)
        st = st_writer_set_metadata(w, metadata[i].key, metadata[i].value, err);
    if (st == TOP_OK)
        st = st_writer_write(w, path, err);

done:
    free(index_text);
    json_decref(index);
    st_writer_free(w);
    return st;
}

/* ---- reader -------------------------------------------------------------- */

int ckpt_is_compressed(const st_file *f)
{
    const char *format = st_metadata_get(f, "format");
    return format && strcmp(format, CKPT_FORMAT) == 0;
}

/* Fills dtype, shape and numel of t from its index entry; *nonzero gets the
 * "nonzero" count of a sparse entry. */
static top_status parse_entry(ckpt_tensor *t, size_t *nonzero, const json_t *entry,
                              top_error *err)
{
    const char *name = t->name;
    json_t *dtype = json_object_get(entry, "dtype"), *shape = json_object_get(entry, "shape");
    json_t *encoding = json_object_get(entry, "encoding");
    if (!json_is_object(entry) || !json_is_string(dtype) || !json_is_array(shape) ||
        !json_is_string(encoding))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": index entry needs string dtype, array "
                             "shape and string encoding; the file is corrupt",
                             name);

    t->dtype = ST_DTYPE_COUNT;
    for (int d = 0; d < ST_DTYPE_COUNT; d++)
        if (strcmp(json_string_value(dtype), st_dtype_str((st_dtype)d)) == 0)
            t->dtype = (st_dtype)d;
    if (t->dtype == ST_DTYPE_COUNT)
        return top_error_set(err, TOP_ERR_FORMAT, "tensor " NAME_FMT ": unknown dtype '%.16s'",
                             name, json_string_value(dtype));

    size_t rank = json_array_size(shape);
    if (rank > TENSOR_MAX_DIMS)
        return top_error_set(err, TOP_ERR_FORMAT, "tensor " NAME_FMT ": rank %zu is above %d",
                             name, rank, TENSOR_MAX_DIMS);
    t->ndim = (int)rank;
    for (size_t i = 0; i < rank; i++) {
        json_t *dim = json_array_get(shape, i);
        if (!json_is_integer(dim) || json_integer_value(dim) < 0)
            return top_error_set(err, TOP_ERR_FORMAT,
                                 "tensor " NAME_FMT ": shape dimension %zu is not a "
                                 "non-negative integer",
                                 name, i);
        t->shape[i] = (int64_t)json_integer_value(dim);
    }
    if (tensor_shape_numel(&t->numel, t->ndim, t->shape, name, NULL) != TOP_OK)
        return top_error_set(err, TOP_ERR_FORMAT, "tensor " NAME_FMT ": shape is too large",
                             name);

    const char *enc = json_string_value(encoding);
    t->sparse = strcmp(enc, "sparse") == 0;
    if (!t->sparse && strcmp(enc, "dense") != 0)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": unknown encoding '%.16s'; expected sparse "
                             "or dense",
                             name, enc);
    if (!t->sparse)
        return TOP_OK;
    json_t *nz = json_object_get(entry, "nonzero");
    if (t->dtype != ST_DTYPE_F32 || !json_is_integer(nz) || json_integer_value(nz) < 0 ||
        (uint64_t)json_integer_value(nz) > t->numel)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": a sparse entry needs dtype F32 and a "
                             "nonzero count in [0, %zu]",
                             name, t->numel);
    *nonzero = (size_t)json_integer_value(nz);
    return TOP_OK;
}

/* The stored tensor name + suffix, checked to be 1-D of dtype and length. */
static top_status find_part(const st_tensor_info **out, const st_file *f, const char *name,
                            const char *suffix, st_dtype dtype, size_t length, top_error *err)
{
    char *full = part_name(name, suffix);
    if (!full)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate a tensor name");
    const st_tensor_info *info = st_find(f, full);
    free(full);
    if (!info)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": part '%s' is missing; the file is corrupt",
                             name, suffix);
    if (info->dtype != dtype || info->ndim != 1 || info->numel != length)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": part '%s' is %s with %zu elements, "
                             "expected 1-D %s with %zu",
                             name, suffix, st_dtype_str(info->dtype), info->numel,
                             st_dtype_str(dtype), length);
    *out = info;
    return TOP_OK;
}

static size_t popcount_bytes(const uint8_t *p, size_t n)
{
    size_t c = 0;
    for (size_t i = 0; i < n; i++)
        c += (size_t)__builtin_popcount(p[i]);
    return c;
}

/* Checks the mask and values of a sparse tensor, then expands them. */
static top_status decode_sparse(ckpt_tensor *t, const st_file *f, size_t nonzero,
                                top_error *err)
{
    const st_tensor_info *mi, *vi;
    size_t numel = t->numel, mask_bytes = numel / 8 + (numel % 8 != 0);
    top_status st = find_part(&mi, f, t->name, "::mask", ST_DTYPE_U8, mask_bytes, err);
    if (st == TOP_OK)
        st = find_part(&vi, f, t->name, "::values", ST_DTYPE_F32, nonzero, err);
    if (st != TOP_OK)
        return st;

    const uint8_t *mask = st_tensor_data(f, mi), *values = st_tensor_data(f, vi);
    size_t bits = popcount_bytes(mask, mask_bytes);
    if (bits != nonzero)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": mask has %zu set bits but there are %zu "
                             "values; the file is corrupt",
                             t->name, bits, nonzero);
    if (numel % 8 && mask[mask_bytes - 1] >> (numel % 8))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": mask bits past element %zu are set; the "
                             "file is corrupt",
                             t->name, numel);

    t->bytes = numel * 4;
    t->data = numel ? top_aligned_alloc(t->bytes) : NULL;
    if (numel && !t->data)
        return top_error_set(err, TOP_ERR_NOMEM,
                             "tensor " NAME_FMT ": cannot allocate %zu bytes", t->name,
                             t->bytes);
    uint8_t *dst = t->data;
    size_t k = 0;
    for (size_t i = 0; i < numel; i++) {
        if (mask[i / 8] >> (i % 8) & 1u)
            memcpy(dst + 4 * i, values + 4 * k++, 4);
        else
            memset(dst + 4 * i, 0, 4);
    }
    return TOP_OK;
}

/* Checks a dense tensor against its index entry and copies it. */
static top_status decode_dense(ckpt_tensor *t, const st_file *f, top_error *err)
{
    const st_tensor_info *info = st_find(f, t->name);
    if (!info)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT " is in the index but not in the file",
                             t->name);
    int same = info->dtype == t->dtype && info->ndim == t->ndim;
    for (int i = 0; same && i < t->ndim; i++)
        same = info->shape[i] == t->shape[i];
    if (!same)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "tensor " NAME_FMT ": stored dtype or shape disagrees with the "
                             "index; the file is corrupt",
                             t->name);
    t->bytes = info->end - info->begin;
    t->data = t->bytes ? top_aligned_alloc(t->bytes) : NULL;
    if (t->bytes && !t->data)
        return top_error_set(err, TOP_ERR_NOMEM,
                             "tensor " NAME_FMT ": cannot allocate %zu bytes", t->name,
                             t->bytes);
    if (t->bytes)
        memcpy(t->data, st_tensor_data(f, info), t->bytes);
    return TOP_OK;
}

/* Checks the format and version keys and parses the index. */
static top_status load_index(json_t **index, const st_file *f, top_error *err)
{
    const char *format = st_metadata_get(f, "format");
    const char *version = st_metadata_get(f, "format_version");
    const char *text = st_metadata_get(f, "tensors");
    if (!format || strcmp(format, CKPT_FORMAT) != 0)
        return top_error_set(err, TOP_ERR_FORMAT,
                             "metadata format is '%.32s', not '" CKPT_FORMAT "'; a dense "
                             "checkpoint is read with st_open alone",
                             format ? format : "(missing)");
    if (!version || strcmp(version, CKPT_FORMAT_VERSION) != 0)
        return top_error_set(
            err, TOP_ERR_UNSUPPORTED,
            "format_version '%.16s' is not supported (this build reads " CKPT_FORMAT_VERSION
            "); use a newer topiary",
            version ? version : "(missing)");
    json_error_t jerr;
    *index = text ? json_loads(text, JSON_REJECT_DUPLICATES, &jerr) : NULL;
    if (!json_is_object(*index)) {
        json_decref(*index);
        *index = NULL;
        return top_error_set(err, TOP_ERR_FORMAT,
                             "metadata 'tensors' is missing or not a JSON object; the file is "
                             "corrupt");
    }
    return TOP_OK;
}

/* Decodes one indexed tensor into t (name already set). *parts counts the
 * stored tensors it used. */
static top_status decode_entry(ckpt_tensor *t, size_t *parts, const st_file *f,
                               const json_t *entry, top_error *err)
{
    size_t nonzero = 0;
    if (!t->name[0] || strstr(t->name, "::"))
        return top_error_set(err, TOP_ERR_FORMAT,
                             "index name " NAME_FMT " is empty or contains \"::\"", t->name);
    top_status st = parse_entry(t, &nonzero, entry, err);
    if (st != TOP_OK)
        return st;
    *parts += t->sparse ? 2 : 1;
    return t->sparse ? decode_sparse(t, f, nonzero, err) : decode_dense(t, f, err);
}

/* Returns 1 if entry exists and has the given encoding. */
static int has_encoding(const json_t *entry, const char *encoding)
{
    const char *e = json_string_value(json_object_get(entry, "encoding"));
    return entry && e && strcmp(e, encoding) == 0;
}

/* The first stored tensor that no index entry claims, or "". */
static const char *first_unlisted(const st_file *f, const json_t *index)
{
    for (size_t i = 0; i < st_tensor_count(f); i++) {
        const char *name = st_tensor_at(f, i)->name;
        if (has_encoding(json_object_get(index, name), "dense"))
            continue;
        const char *sep = strstr(name, "::");
        if (sep && (!strcmp(sep, "::mask") || !strcmp(sep, "::values"))) {
            char *base = strndup(name, (size_t)(sep - name));
            int claimed = base && has_encoding(json_object_get(index, base), "sparse");
            free(base);
            if (claimed)
                continue;
        }
        return name;
    }
    return "";
}

top_status ckpt_read(ckpt_dense *out, const st_file *f, top_error *err)
{
    json_t *index = NULL;
    memset(out, 0, sizeof *out);
    top_status st = load_index(&index, f, err);
    if (st != TOP_OK)
        return st;

    size_t n = json_object_size(index), parts = 0;
    out->tensors = calloc(n ? n : 1, sizeof *out->tensors);
    if (!out->tensors) {
        json_decref(index);
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate %zu tensors", n);
    }

    const char *name;
    json_t *entry;
    json_object_foreach(index, name, entry)
    {
        ckpt_tensor *t = &out->tensors[out->count];
        t->name = strdup(name);
        if (!t->name) {
            st = top_error_set(err, TOP_ERR_NOMEM, "cannot copy a tensor name");
            break;
        }
        out->count++;
        if ((st = decode_entry(t, &parts, f, entry, err)) != TOP_OK)
            break;
    }

    /* Every stored tensor must belong to exactly one index entry. */
    if (st == TOP_OK && parts != st_tensor_count(f))
        st = top_error_set(err, TOP_ERR_FORMAT,
                           "the file stores %zu tensors but the index accounts for %zu; "
                           "tensor " NAME_FMT " is not listed",
                           st_tensor_count(f), parts, first_unlisted(f, index));
    json_decref(index);
    if (st != TOP_OK)
        ckpt_dense_free(out);
    return st;
}

void ckpt_dense_free(ckpt_dense *d)
{
    for (size_t i = 0; d->tensors && i < d->count; i++) {
        free(d->tensors[i].name);
        top_aligned_free(d->tensors[i].data);
    }
    free(d->tensors);
    memset(d, 0, sizeof *d);
}
