/*
 * Compressed checkpoints ("topiary-sparse", format version 1): a safetensors
 * file in which every float32 tensor that has enough zeros is stored as a
 * bitmask and its packed nonzero values, and every other tensor is stored
 * unchanged under its own name.
 *
 * A float32 tensor `name` with numel elements is stored sparse when that is
 * smaller than dense, i.e. when zeros * 4 > ceil(numel / 8):
 *   "name::mask"    U8, shape [ceil(numel / 8)]: bit (i % 8) of byte i / 8
 *                   (least significant bit first) is 1 iff element i is
 *                   stored in values; the unused high bits of the last byte
 *                   are 0
 *   "name::values"  F32, shape [popcount(mask)]: the stored elements in
 *                   index order, bit-exact
 * "Zero" means the bit pattern 0x00000000 (+0.0) only. -0.0 and every NaN
 * are stored as values, so decoding restores every tensor bit for bit.
 *
 * __metadata__ (all values are strings):
 *   "format"          "topiary-sparse"
 *   "format_version"  "1"
 *   "tensors"         JSON object, one entry per original tensor in the
 *                     caller's order: {"dtype": "F32", "shape": [..],
 *                     "encoding": "sparse" | "dense", "nonzero": n}, where
 *                     "nonzero" is present for sparse entries only
 *   plus the caller's entries (method, per-tensor sparsity, source sha256).
 *
 * The reader checks every part of a tensor before it decodes it, returns
 * either all tensors or none, and every error names the tensor. Reentrant;
 * the st_file may be shared read-only.
 */
#ifndef TOPIARY_CHECKPOINT_H
#define TOPIARY_CHECKPOINT_H

#include <stddef.h>
#include <stdint.h>

#include "safetensors.h"
#include "status.h"
#include "tensor.h"

#define CKPT_FORMAT "topiary-sparse"
#define CKPT_FORMAT_VERSION "1"

/* One tensor to write: little-endian bytes = numel * dtype size. */
typedef struct ckpt_input {
    const char *name; /* must not contain "::" */
    st_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    const void *data;
    size_t bytes;
} ckpt_input;

typedef struct ckpt_metadata_entry {
    const char *key; /* not "format", "format_version" or "tensors" */
    const char *value;
} ckpt_metadata_entry;

/*
 * Writes a compressed checkpoint to path (through st_writer_write: a
 * temporary file, fsync, rename). Returns TOP_ERR_INVALID for a name with
 * "::", a duplicate name, or a reserved metadata key.
 */
top_status ckpt_write(const char *path, const ckpt_input *tensors, size_t count,
                      const ckpt_metadata_entry *metadata, size_t n_metadata, top_error *err);

/* One decoded tensor; data is owned (top_aligned_alloc, NULL when bytes = 0). */
typedef struct ckpt_tensor {
    char *name;
    st_dtype dtype;
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    size_t numel;
    void *data;
    size_t bytes;
    int sparse; /* 1 if stored as mask + values */
} ckpt_tensor;

typedef struct ckpt_dense {
    ckpt_tensor *tensors; /* in the order of the "tensors" metadata */
    size_t count;
} ckpt_dense;

/* Returns 1 if the file's metadata has "format": "topiary-sparse". */
int ckpt_is_compressed(const st_file *f);

/*
 * Validates a compressed checkpoint and decodes every tensor to dense bytes.
 * out is overwritten; free it with ckpt_dense_free. Errors: TOP_ERR_FORMAT
 * for a missing or malformed part (mask length, values count != popcount,
 * set padding bits, a missing or unlisted tensor, a dtype or shape that
 * disagrees with the metadata), TOP_ERR_UNSUPPORTED for another
 * format_version, TOP_ERR_NOMEM. Allocation is bounded by the file: a sparse
 * tensor has at most 8 elements per mask byte.
 */
top_status ckpt_read(ckpt_dense *out, const st_file *f, top_error *err);

void ckpt_dense_free(ckpt_dense *d);

#endif
