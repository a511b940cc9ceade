/*
 * Structured logging of the service: one line per event on stderr (or the fd
 * set by log_set_fd), written with a single write() so that lines from
 * different threads never interleave.
 *
 * text:  2024-12-04T21:34:00.123Z INFO store id=job_0123 msg="job claimed" attempts=1
 * json:  {"time":"...","level":"info","component":"store","id":"job_0123","msg":"job
 * claimed","attempts":1}
 *
 * The key=value list is a printf-like format of space-separated "key=%conv"
 * items; the supported conversions are %s, %d, %u, %ld, %lu, %lld, %llu, %zu,
 * %zd, %g, %f, %.Nf and %.Ng. String values are quoted and escaped when they
 * need it (text) or always (json). A value whose key contains "token",
 * "secret", "password" or "authorization" is replaced by "[redacted]".
 * A line longer than LOG_LINE_MAX is cut and ends with "...".
 *
 * Threads: log_init() and log_set_fd() are meant for the main thread before
 * other threads start; log_write() may be called from any thread.
 */
#ifndef TOPIARY_LOG_H
#define TOPIARY_LOG_H

#include <stddef.h>
#include <stdint.h>

#define LOG_LINE_MAX 4096
#define LOG_TIME_MAX 32 /* "2024-12-04T21:34:00.123Z" + NUL fits */

typedef enum log_level { LOG_DEBUG = 0, LOG_INFO, LOG_WARN, LOG_ERROR } log_level;

typedef enum log_format { LOG_FORMAT_TEXT = 0, LOG_FORMAT_JSON } log_format;

/* Parses "debug", "info", "warn" ("warning") or "error"; returns 0, or -1. */
int log_level_parse(const char *name, log_level *out);

/* Parses "text" or "json"; returns 0, or -1. */
int log_format_parse(const char *name, log_format *out);

/* Sets the threshold (lines below it are dropped) and the format. Default: info, text. */
void log_init(log_level threshold, log_format format);

/* Sends lines to fd instead of stderr (2). For tests. */
void log_set_fd(int fd);

/* True when a line at level would be written. */
int log_enabled(log_level level);

/*
 * Writes one line if level passes the threshold. id (a request or job id) and
 * kv may be NULL. kv is the format of the key=value list described above.
 */
void log_write(log_level level, const char *component, const char *id, const char *msg,
               const char *kv, ...) __attribute__((format(printf, 5, 6)));

#define log_debug(component, id, msg, ...) log_write(LOG_DEBUG, component, id, msg, __VA_ARGS__)
#define log_info(component, id, msg, ...) log_write(LOG_INFO, component, id, msg, __VA_ARGS__)
#define log_warn(component, id, msg, ...) log_write(LOG_WARN, component, id, msg, __VA_ARGS__)
#define log_error(component, id, msg, ...) log_write(LOG_ERROR, component, id, msg, __VA_ARGS__)

/*
 * Writes a loggable stand-in for a secret into out: "[redacted N bytes]".
 * Returns out.
 */
char *log_redact(char *out, size_t cap, const char *secret);

/*
 * Copies url into out without its userinfo and with every query value
 * replaced by "redacted" ("http://u:p@h/m?token=x" -> "http://h/m?token=redacted").
 * Returns out.
 */
char *log_redact_url(char *out, size_t cap, const char *url);

/* Formats the time ms_since_epoch as RFC 3339 UTC with milliseconds into out. */
void log_format_time(char out[LOG_TIME_MAX], int64_t ms_since_epoch);

/* Milliseconds since the Unix epoch from the real-time clock. */
int64_t log_now_ms(void);

#endif
