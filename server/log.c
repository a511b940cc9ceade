/* Structured logging; see log.h. Stub bodies until the implementation lands. */
#include "log.h"

#include <stdio.h>
#include <string.h>
#include <time.h>

int log_level_parse(const char *name, log_level *out) { (void)name; *out = LOG_INFO; return 0; }
int log_format_parse(const char *name, log_format *out) { (void)name; *out = LOG_FORMAT_TEXT; return 0; }
void log_init(log_level threshold, log_format format) { (void)threshold, (void)format; }
void log_set_fd(int fd) { (void)fd; }
int log_enabled(log_level level) { return level >= LOG_INFO; }
void log_write(log_level level, const char *component, const char *id, const char *msg, const char *kv, ...)
{
    (void)level, (void)id, (void)kv;
    fprintf(stderr, "%s %s\n", component, msg);
}
char *log_redact(char *out, size_t cap, const char *secret) { snprintf(out, cap, "[redacted %zu bytes]", strlen(secret)); return out; }
char *log_redact_url(char *out, size_t cap, const char *url) { (void)url; snprintf(out, cap, "[redacted]"); return out; }
void log_format_time(char out[LOG_TIME_MAX], int64_t ms) { (void)ms; out[0] = '\0'; }
int64_t log_now_ms(void) { struct timespec ts; clock_gettime(CLOCK_REALTIME, &ts); return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000; }
