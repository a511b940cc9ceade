/*
 * Float32 tensors: a shape of up to TENSOR_MAX_DIMS dimensions and a 64-byte
 * aligned, row-major buffer. Every size product is overflow-checked, and a
 * tensor larger than TENSOR_MAX_ELEMENTS is rejected before allocation, so a
 * corrupt file cannot make the process allocate absurd amounts.
 *
 * A tensor either owns its buffer (`owned` = 1, freed by tensor_free) or is a
 * view on memory owned elsewhere (an mmap, another tensor). Not thread-safe:
 * one tensor is written by one thread at a time.
 */
#ifndef TOPIARY_TENSOR_H
#define TOPIARY_TENSOR_H

#include <stddef.h>
#include <stdint.h>

#include "status.h"

#define TENSOR_MAX_DIMS 8
#define TENSOR_ALIGN 64
/* 2^34 floats = 64 GiB: far above any model here, far below size_t limits. */
#define TENSOR_MAX_ELEMENTS ((size_t)1 << 34)

typedef struct tensor {
    int ndim;
    int64_t shape[TENSOR_MAX_DIMS];
    size_t numel;
    float *data;
    int owned;
} tensor;

/* Computes the element count of a shape into *numel, rejecting negative or
 * absurd dims and overflowing products. `what` names the tensor in errors. */
top_status tensor_shape_numel(size_t *numel, int ndim, const int64_t *shape, const char *what,
                              top_error *err);

/* Allocates t->data (zero-filled, aligned) for the given shape; t is
 * overwritten. On failure t is left empty (data NULL). */
top_status tensor_init(tensor *t, int ndim, const int64_t *shape, top_error *err);

/* Makes t a non-owning view of data with the given shape. */
top_status tensor_view(tensor *t, float *data, int ndim, const int64_t *shape, top_error *err);

/* Copies src into a new owned tensor dst (dst is overwritten). */
top_status tensor_clone(tensor *dst, const tensor *src, top_error *err);

/* Frees an owned buffer and empties t; safe on an empty or viewed tensor. */
void tensor_free(tensor *t);

/* Returns 1 if a and b have the same rank and dims. */
int tensor_same_shape(const tensor *a, const tensor *b);

/* Writes "(2, 3, 4)" into buf (always terminated). Returns buf. */
char *tensor_shape_str(char *buf, size_t size, int ndim, const int64_t *shape);

/* Aligned allocation of bytes (NULL on failure or bytes == 0); free with
 * top_aligned_free. Not zero-filled. */
void *top_aligned_alloc(size_t bytes);
void top_aligned_free(void *p);

#endif
