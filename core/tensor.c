/* Shapes, aligned allocation and views for float32 tensors; see tensor.h. */
#include "tensor.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>

void *top_aligned_alloc(size_t bytes)
{
    if (bytes == 0)
        return NULL;
    size_t rounded;
    if (top_size_add(&rounded, bytes, TENSOR_ALIGN - 1))
        return NULL;
    rounded -= rounded % TENSOR_ALIGN;
    return aligned_alloc(TENSOR_ALIGN, rounded);
}

void top_aligned_free(void *p)
{
    free(p);
}

char *tensor_shape_str(char *buf, size_t size, int ndim, const int64_t *shape)
{
    size_t used = 0;
    if (size == 0)
        return buf;
    buf[0] = '\0';
    int n = snprintf(buf, size, "(");
    used = n > 0 ? (size_t)n : 0;
    for (int i = 0; i < ndim && used < size; i++) {
        n = snprintf(buf + used, size - used, "%s%lld", i ? ", " : "", (long long)shape[i]);
        if (n < 0)
            break;
        used += (size_t)n;
    }
    if (used < size)
        snprintf(buf + used, size - used, ")");
    return buf;
}

top_status tensor_shape_numel(size_t *numel, int ndim, const int64_t *shape, const char *what,
                              top_error *err)
{
    if (ndim < 0 || ndim > TENSOR_MAX_DIMS)
        return top_error_set(err, TOP_ERR_INVALID, "tensor '%s': rank %d is outside 0..%d",
                             what, ndim, TENSOR_MAX_DIMS);
    size_t total = 1;
    for (int i = 0; i < ndim; i++) {
        if (shape[i] < 0)
            return top_error_set(err, TOP_ERR_INVALID,
                                 "tensor '%s': dimension %d is negative (%lld)", what, i,
                                 (long long)shape[i]);
        if ((uint64_t)shape[i] > TENSOR_MAX_ELEMENTS ||
            top_size_mul(&total, total, (size_t)shape[i]) || total > TENSOR_MAX_ELEMENTS) {
            char buf[160];
            return top_error_set(
                err, TOP_ERR_OVERFLOW, "tensor '%s': shape %s has more than %zu elements", what,
                tensor_shape_str(buf, sizeof buf, ndim, shape), TENSOR_MAX_ELEMENTS);
        }
    }
    *numel = total;
    return TOP_OK;
}

static void tensor_set_shape(tensor *t, int ndim, const int64_t *shape, size_t numel)
{
    memset(t, 0, sizeof *t);
    t->ndim = ndim;
    for (int i = 0; i < ndim; i++)
        t->shape[i] = shape[i];
    t->numel = numel;
}

top_status tensor_init(tensor *t, int ndim, const int64_t *shape, top_error *err)
{
    size_t numel;
    memset(t, 0, sizeof *t);
    top_status st = tensor_shape_numel(&numel, ndim, shape, "(new)", err);
    if (st != TOP_OK)
        return st;
    tensor_set_shape(t, ndim, shape, numel);
    if (numel == 0)
        return TOP_OK;
    t->data = top_aligned_alloc(numel * sizeof(float));
    if (!t->data)
        return top_error_set(err, TOP_ERR_NOMEM, "cannot allocate %zu floats for a tensor",
                             numel);
    memset(t->data, 0, numel * sizeof(float));
    t->owned = 1;
    return TOP_OK;
}

top_status tensor_view(tensor *t, float *data, int ndim, const int64_t *shape, top_error *err)
{
    size_t numel;
    top_status st = tensor_shape_numel(&numel, ndim, shape, "(view)", err);
    if (st != TOP_OK)
        return st;
    tensor_set_shape(t, ndim, shape, numel);
    t->data = data;
    return TOP_OK;
}

top_status tensor_clone(tensor *dst, const tensor *src, top_error *err)
{
    top_status st = tensor_init(dst, src->ndim, src->shape, err);
    if (st == TOP_OK && src->numel)
        memcpy(dst->data, src->data, src->numel * sizeof(float));
    return st;
}

void tensor_free(tensor *t)
{
    if (!t)
        return;
    if (t->owned)
        top_aligned_free(t->data);
    memset(t, 0, sizeof *t);
}

int tensor_same_shape(const tensor *a, const tensor *b)
{
    if (a->ndim != b->ndim)
        return 0;
    for (int i = 0; i < a->ndim; i++)
        if (a->shape[i] != b->shape[i])
            return 0;
    return 1;
}
