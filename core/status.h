/*
 * One error convention for the whole code base: a status enum with a string
 * table, and a caller-owned error struct that keeps the first message set.
 *
 * Functions that can fail return a top_status and take a `top_error *err` as
 * their last argument. On failure they call top_error_set(), which records
 * the status and a lower-case message naming what failed, the value and what
 * to do. The first error set wins, so a low-level message is not overwritten
 * while the failure travels up. `err` may be NULL when the caller does not
 * want the message. Thread-safe: no global state.
 */
#ifndef TOPIARY_STATUS_H
#define TOPIARY_STATUS_H

#include <stddef.h>

typedef enum top_status {
    TOP_OK = 0,
    TOP_ERR_NOMEM = -1,       /* an allocation failed */
    TOP_ERR_INVALID = -2,     /* an argument or option is out of range */
    TOP_ERR_IO = -3,          /* a file could not be opened, read or written */
    TOP_ERR_FORMAT = -4,      /* a file or document is malformed */
    TOP_ERR_UNSUPPORTED = -5, /* well-formed, but a feature this build lacks */
    TOP_ERR_OVERFLOW = -6,    /* a size product does not fit in size_t */
    TOP_ERR_SHAPE = -7,       /* tensor shapes disagree */
    TOP_ERR_NOT_FOUND = -8,   /* a named tensor, node, file or key is missing */
    TOP_ERR_NUMERIC = -9,     /* a factorisation failed or a value is not finite */
    TOP_ERR_CANCELLED = -10,  /* the caller's cancel flag was raised */
    TOP_ERR_LIMIT = -11,      /* a configured limit (memory, size, count) is exceeded */
    TOP_ERR_STATE = -12,      /* the operation is illegal in the current state */
} top_status;

#define TOP_ERROR_MESSAGE_MAX 512

typedef struct top_error {
    top_status status;
    char message[TOP_ERROR_MESSAGE_MAX];
} top_error;

/* Returns a static, lower-case name for a status ("out of memory"). */
const char *top_status_str(top_status status);

/* Resets err to TOP_OK with an empty message. */
void top_error_clear(top_error *err);

/*
 * Records status and a printf-style message in err unless an error is already
 * recorded there. Returns status, so callers can write
 * `return top_error_set(err, TOP_ERR_INVALID, "...", ...);`.
 */
top_status top_error_set(top_error *err, top_status status, const char *fmt, ...)
    __attribute__((format(printf, 3, 4)));

/* Stores a * b in *out; returns 0, or -1 (and leaves *out alone) on overflow. */
int top_size_mul(size_t *out, size_t a, size_t b);

/* Stores a + b in *out; returns 0, or -1 on overflow. */
int top_size_add(size_t *out, size_t a, size_t b);

#endif
