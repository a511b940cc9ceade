/*
 * safetensors files: read through mmap, written through a temporary file that
 * is fsynced and renamed into place.
 *
 * Format: an 8-byte little-endian header length L, L bytes of JSON mapping
 * each tensor name to {"dtype", "shape", "data_offsets": [begin, end]} (offsets
 * relative to the byte after the header) plus an optional "__metadata__"
 * object of string values, then the data.
 *
 * The reader validates everything before any tensor is used: the header length
 * against the file size and a cap, the JSON, each tensor's dtype, rank, dims
 * and the product of its dims times the dtype size against its offsets, the
 * offsets against the data size, and that no two tensors overlap. Every error
 * names the offending tensor. An open file is read-only and may be shared by
 * threads.
 */
#ifndef TOPIARY_SAFETENSORS_H
#define TOPIARY_SAFETENSORS_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"
#include "tensor.h"

/* The header JSON is capped; real checkpoints stay far below this. */
#define ST_MAX_HEADER_BYTES ((size_t)100 << 20)

typedef enum st_dtype {
    ST_DTYPE_F64,
    ST_DTYPE_F32,
    ST_DTYPE_F16,
    ST_DTYPE_BF16,
    ST_DTYPE_I64,
    ST_DTYPE_I32,
    ST_DTYPE_I16,
    ST_DTYPE_I8,
    ST_DTYPE_U64,
    ST_DTYPE_U32,
    ST_DTYPE_U16,
    ST_DTYPE_U8,
    ST_DTYPE_BOOL,
    ST_DTYPE_COUNT
} st_dtype;

/* "F32" etc.; NULL for an out-of-range value. */
const char *st_dtype_str(st_dtype dtype);
/* Size in bytes of one element. */
size_t st_dtype_size(st_dtype dtype);

typedef struct st_tensor_info {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    size_t numel;
    size_t begin, end; /* byte offsets into the data section */
} st_tensor_info;

typedef struct st_file st_file;

/* Opens and validates a file (mmap, read-only). */
top_status st_open(st_file **out, const char *path, top_error *err);
/* Validates a buffer already in memory; the buffer must outlive the st_file
 * and is not copied (used by the fuzz target and for uploads). */
top_status st_open_memory(st_file **out, const void *data, size_t size, top_error *err);
void st_close(st_file *f);

size_t st_tensor_count(const st_file *f);
/* Tensors in file order (ascending begin offset). */
const st_tensor_info *st_tensor_at(const st_file *f, size_t i);
/* The tensor with this name, or NULL. */
const st_tensor_info *st_find(const st_file *f, const char *name);
/* Raw little-endian bytes of a tensor (t->end - t->begin bytes). */
const void *st_tensor_data(const st_file *f, const st_tensor_info *t);

/* Converts a tensor of any numeric dtype to a new owned float32 tensor
 * (out is overwritten). */
top_status st_read_f32(const st_file *f, const st_tensor_info *t, tensor *out, top_error *err);

/* __metadata__ entries, in file order; the value for a key or NULL. */
size_t st_metadata_count(const st_file *f);
const char *st_metadata_key(const st_file *f, size_t i);
const char *st_metadata_value(const st_file *f, size_t i);
const char *st_metadata_get(const st_file *f, const char *key);

/* ---- writer ------------------------------------------------------------- */

typedef struct st_writer st_writer;

top_status st_writer_new(st_writer **out, top_error *err);
void st_writer_free(st_writer *w);

/* Adds a tensor. The data is copied; names must be unique and bytes must
 * equal numel * dtype size. Tensors are written in the order added. */
top_status st_writer_add(st_writer *w, const char *name, st_dtype dtype, int ndim,
                         const int64_t *shape, const void *data, size_t bytes, top_error *err);
/* Adds a float32 tensor from a tensor struct. */
top_status st_writer_add_f32(st_writer *w, const char *name, const tensor *t, top_error *err);
/* Sets a __metadata__ string entry (replacing an earlier value for the key). */
top_status st_writer_set_metadata(st_writer *w, const char *key, const char *value,
                                  top_error *err);
/* Writes path.tmp, fsyncs it, renames it to path and fsyncs the directory. */
top_status st_writer_write(st_writer *w, const char *path, top_error *err);

#endif
