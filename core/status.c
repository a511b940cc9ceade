/* Status strings and the first-error-wins error struct; see status.h. */
#include "status.h"

#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>

const char *top_status_str(top_status status)
{
    switch (status) {
    case TOP_OK: return "ok";
    case TOP_ERR_NOMEM: return "out of memory";
    case TOP_ERR_INVALID: return "invalid argument";
    case TOP_ERR_IO: return "input/output error";
    case TOP_ERR_FORMAT: return "malformed input";
    case TOP_ERR_UNSUPPORTED: return "unsupported";
    case TOP_ERR_OVERFLOW: return "size overflow";
    case TOP_ERR_SHAPE: return "shape mismatch";
    case TOP_ERR_NOT_FOUND: return "not found";
    case TOP_ERR_NUMERIC: return "numerical failure";
    case TOP_ERR_CANCELLED: return "cancelled";
    case TOP_ERR_LIMIT: return "limit exceeded";
    case TOP_ERR_STATE: return "illegal state";
    }
    return "unknown status";
}

void top_error_clear(top_error *err)
{
    if (!err)
        return;
    err->status = TOP_OK;
    err->message[0] = '\0';
}

top_status top_error_set(top_error *err, top_status status, const char *fmt, ...)
{
    if (!err || err->status != TOP_OK)
        return status;
    err->status = status;
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(err->message, sizeof err->message, fmt, ap);
    va_end(ap);
    return status;
}

int top_size_mul(size_t *out, size_t a, size_t b)
{
    if (a != 0 && b > SIZE_MAX / a)
        return -1;
    *out = a * b;
    return 0;
}

int top_size_add(size_t *out, size_t a, size_t b)
{
    if (b > SIZE_MAX - a)
        return -1;
    *out = a + b;
    return 0;
}
