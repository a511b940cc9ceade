/*
 * Structured logging; see log.h for the line formats and the key=value
 * grammar.
 *
 * Each line is built in a stack buffer of LOG_LINE_MAX bytes and written with
 * one write() call; no lock is taken. POSIX makes a write() of at most
 * PIPE_BUF bytes (4096 on Linux, equal to LOG_LINE_MAX) to a pipe atomic, and
 * pipes are what journald and container runtimes read. Regular files opened
 * with O_APPEND keep such lines whole in practice on Linux, but terminals
 * promise nothing. The threshold, the format and the fd are atomics, so a
 * change races with no line, but it is meant to happen once at start. This
 * file does not rotate, buffer or rate-limit, so callers that may repeat an
 * event count it themselves.
 */
#include "log.h"

#include <errno.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdbool.h>
#include <stdio.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

/* Room kept at the end of the buffer for the truncation marker and newline. */
#define LOG_TAIL_RESERVE 32
/* A single string value is cut after this many input bytes. */
#define LOG_VALUE_MAX 1024

static atomic_int log_threshold = LOG_INFO;
static atomic_int log_fmt = LOG_FORMAT_TEXT;
static atomic_int log_fd = 2;

typedef struct line_buf {
    char *buf;
    size_t len;
    size_t cap; /* usable bytes, excluding the reserved tail */
    bool full;
} line_buf;

int log_level_parse(const char *name, log_level *out)
{
    static const struct {
        const char *name;
        log_level level;
    } names[] = {{"debug", LOG_DEBUG},
                 {"info", LOG_INFO},
                 {"warn", LOG_WARN},
                 {"warning", LOG_WARN},
                 {"error", LOG_ERROR}};
    for (size_t i = 0; name && i < sizeof names / sizeof names[0]; i++)
        if (!strcmp(name, names[i].name)) {
            *out = names[i].level;
            return 0;
        }
    return -1;
}

int log_format_parse(const char *name, log_format *out)
{
    if (name && !strcmp(name, "text")) {
        *out = LOG_FORMAT_TEXT;
        return 0;
    }
    if (name && !strcmp(name, "json")) {
        *out = LOG_FORMAT_JSON;
        return 0;
    }
    return -1;
}

void log_init(log_level threshold, log_format format)
{
    atomic_store(&log_threshold, (int)threshold);
    atomic_store(&log_fmt, (int)format);
}

void log_set_fd(int fd)
{
    atomic_store(&log_fd, fd);
}

int log_enabled(log_level level)
{
    return (int)level >= atomic_load(&log_threshold);
}

int64_t log_now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

void log_format_time(char out[LOG_TIME_MAX], int64_t ms_since_epoch)
{
    int64_t ms = ms_since_epoch % 1000;
    int64_t secs = ms_since_epoch / 1000;
    if (ms < 0) { /* floor division for times before 1970 */
        ms += 1000;
        secs -= 1;
    }
    time_t t = (time_t)secs;
    struct tm tm;
    if (!gmtime_r(&t, &tm)) {
        snprintf(out, LOG_TIME_MAX, "1970-01-01T00:00:00.000Z");
        return;
    }
    char date[24];
    if (strftime(date, sizeof date, "%Y-%m-%dT%H:%M:%S", &tm) == 0)
        snprintf(date, sizeof date, "9999-12-31T23:59:59");
    snprintf(out, LOG_TIME_MAX, "%s.%03uZ", date, (unsigned)ms % 1000u);
}

static void put_bytes(line_buf *b, const char *s, size_t n)
{
    if (b->full)
        return;
    if (n > b->cap - b->len) {
        b->full = true;
        return;
    }
    memcpy(b->buf + b->len, s, n);
    b->len += n;
}

static void put_str(line_buf *b, const char *s)
{
    put_bytes(b, s, strlen(s));
}

static void put_char(line_buf *b, char c)
{
    put_bytes(b, &c, 1);
}

static bool text_needs_quotes(const char *s)
{
    if (!*s)
        return true;
    for (const unsigned char *p = (const unsigned char *)s; *p; p++)
        if (*p <= ' ' || *p == '"' || *p == '=' || *p == '\\' || *p == 0x7f)
            return true;
    return false;
}

/* Appends s escaped for a text value (quoted when needed) or a JSON string. */
static void put_escaped(line_buf *b, const char *s, bool json)
{
    bool quote = json || text_needs_quotes(s);
    size_t n = strlen(s);
    bool cut = n > LOG_VALUE_MAX;
    if (cut)
        n = LOG_VALUE_MAX;
    if (quote)
        put_char(b, '"');
    for (size_t i = 0; i < n; i++) {
        unsigned char c = (unsigned char)s[i];
        char esc[8];
        if (c == '"' || c == '\\') {
            esc[0] = '\\', esc[1] = (char)c, esc[2] = '\0';
        } else if (c == '\n') {
            strcpy(esc, "\\n");
        } else if (c == '\t') {
            strcpy(esc, "\\t");
        } else if (c == '\r') {
            strcpy(esc, "\\r");
        } else if (c < 0x20 || c == 0x7f) {
            snprintf(esc, sizeof esc, json ? "\\u%04x" : "\\x%02x", c);
        } else {
            put_char(b, (char)c);
            continue;
        }
        put_str(b, esc);
    }
    if (cut)
        put_str(b, "...");
    if (quote)
        put_char(b, '"');
}

static bool key_is_secret(const char *key, size_t n)
{
    static const char *const words[] = {"token", "secret", "password", "authorization"};
    char lower[64];
    if (n >= sizeof lower)
        n = sizeof lower - 1;
    for (size_t i = 0; i < n; i++)
        lower[i] = (char)(key[i] >= 'A' && key[i] <= 'Z' ? key[i] - 'A' + 'a' : key[i]);
    lower[n] = '\0';
    for (size_t i = 0; i < sizeof words / sizeof words[0]; i++)
        if (strstr(lower, words[i]))
            return true;
    return false;
}

/* Appends the separator and the key: ` key=` (text) or `,"key":` (json). */
static void put_key(line_buf *b, const char *key, size_t n, bool json)
{
    put_str(b, json ? ",\"" : " ");
    for (size_t i = 0; i < n; i++) {
        char c = key[i];
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '_' || c == '.' || c == '-';
        put_char(b, ok ? c : '_');
    }
    put_str(b, json ? "\":" : "=");
}

typedef enum kv_type { KV_INT, KV_UINT, KV_DOUBLE, KV_STRING, KV_BAD } kv_type;

/*
 * Parses one conversion at *p ("%s", "%zu", "%.3f", ...), advancing *p past
 * it. Stores the integer length ('i' int, 'l' long, 'L' long long, 'z'
 * size_t) in *length and the precision (-1 for none) in *precision.
 */
static kv_type parse_conversion(const char **p, char *length, int *precision)
{
    const char *s = *p;
    *length = 'i';
    *precision = -1;
    if (*s++ != '%')
        return KV_BAD;
    if (*s == '.') {
        s++;
        *precision = 0;
        while (*s >= '0' && *s <= '9' && *precision < 100)
            *precision = *precision * 10 + (*s++ - '0');
    }
    if (s[0] == 'l' && s[1] == 'l') {
        *length = 'L';
        s += 2;
    } else if (*s == 'l' || *s == 'z') {
        *length = *s++;
    }
    char conv = *s++;
    *p = s;
    switch (conv) {
    case 'd': return KV_INT;
    case 'u': return KV_UINT;
    case 'f':
    case 'g': return *length == 'i' ? KV_DOUBLE : KV_BAD;
    case 's': return *length == 'i' && *precision < 0 ? KV_STRING : KV_BAD;
    default: return KV_BAD;
    }
}

/* Fetches one value of the parsed type and formats it into text (strings are left in *str). */
static void fetch_value(va_list *ap, kv_type type, char length, int precision, char *text,
                        size_t cap, const char **str)
{
    *str = NULL;
    if (type == KV_STRING) {
        *str = va_arg(*ap, const char *);
    } else if (type == KV_DOUBLE) {
        double v = va_arg(*ap, double);
        if (precision >= 0)
            snprintf(text, cap, "%.*f", precision, v);
        else
            snprintf(text, cap, "%.17g", v);
    } else if (type == KV_INT) {
        long long v = length == 'L'   ? va_arg(*ap, long long)
                      : length == 'l' ? va_arg(*ap, long)
                      : length == 'z' ? (long long)va_arg(*ap, ptrdiff_t)
                                      : va_arg(*ap, int);
        snprintf(text, cap, "%lld", v);
    } else {
        unsigned long long v = length == 'L'   ? va_arg(*ap, unsigned long long)
                               : length == 'l' ? va_arg(*ap, unsigned long)
                               : length == 'z' ? va_arg(*ap, size_t)
                                               : va_arg(*ap, unsigned);
        snprintf(text, cap, "%llu", v);
    }
}

/* Appends the key=value items of kv, consuming their arguments from ap. */
static void put_kv(line_buf *b, const char *kv, va_list *ap, bool json)
{
    const char *p = kv;
    while (*p) {
        while (*p == ' ')
            p++;
        if (!*p)
            break;
        const char *key = p;
        while (*p && *p != '=' && *p != ' ')
            p++;
        size_t key_len = (size_t)(p - key);
        if (*p != '=' || key_len == 0) {
            put_str(b, json ? ",\"log_format_error\":true" : " log_format_error=true");
            return;
        }
        p++;
        char length;
        int precision;
        kv_type type = parse_conversion(&p, &length, &precision);
        if (type == KV_BAD) {
            /* The argument types are unknown from here on; stop reading them. */
            put_str(b, json ? ",\"log_format_error\":true" : " log_format_error=true");
            return;
        }
        char text[64];
        const char *str;
        fetch_value(ap, type, length, precision, text, sizeof text, &str);

        size_t mark = b->len;
        put_key(b, key, key_len, json);
        if (key_is_secret(key, key_len))
            put_escaped(b, "[redacted]", json);
        else if (type == KV_STRING && str)
            put_escaped(b, str, json);
        else if (type == KV_STRING)
            put_str(b, json ? "null" : "\"\"");
        else if (type == KV_DOUBLE && json && !(strspn(text, "-0123456789.e+") == strlen(text)))
            put_escaped(b, text, json); /* nan and inf are not JSON numbers */
        else
            put_str(b, text);
        if (b->full) {
            b->len = mark; /* drop the item that did not fit */
            return;
        }
    }
}

static const char *level_name(log_level level, bool json)
{
    static const char *const upper[] = {"DEBUG", "INFO", "WARN", "ERROR"};
    static const char *const lower[] = {"debug", "info", "warn", "error"};
    if ((unsigned)level > LOG_ERROR)
        level = LOG_ERROR;
    return json ? lower[level] : upper[level];
}

static void put_head(line_buf *b, log_level level, const char *component, const char *id,
                     const char *msg, bool json)
{
    char now[LOG_TIME_MAX];
    log_format_time(now, log_now_ms());
    if (json) {
        put_str(b, "{\"time\":\"");
        put_str(b, now);
        put_str(b, "\",\"level\":\"");
        put_str(b, level_name(level, true));
        put_str(b, "\",\"component\":");
        put_escaped(b, component ? component : "-", true);
    } else {
        put_str(b, now);
        put_char(b, ' ');
        put_str(b, level_name(level, false));
        put_char(b, ' ');
        put_escaped(b, component ? component : "-", false);
    }
    if (id) {
        put_key(b, "id", 2, json);
        put_escaped(b, id, json);
    }
    if (msg) {
        put_key(b, "msg", 3, json);
        put_escaped(b, msg, json);
    }
}

void log_write(log_level level, const char *component, const char *id, const char *msg,
               const char *kv, ...)
{
    if (!log_enabled(level))
        return;
    bool json = atomic_load(&log_fmt) == LOG_FORMAT_JSON;
    char buf[LOG_LINE_MAX];
    line_buf b = {buf, 0, LOG_LINE_MAX - LOG_TAIL_RESERVE, false};

    put_head(&b, level, component, id, msg, json);
    if (kv && !b.full) {
        va_list ap;
        va_start(ap, kv);
        put_kv(&b, kv, &ap, json);
        va_end(ap);
    }

    /* The tail always fits: cap leaves LOG_TAIL_RESERVE bytes. */
    b.cap = LOG_LINE_MAX;
    bool cut = b.full;
    b.full = false;
    if (cut)
        put_str(&b, json ? ",\"truncated\":true" : " ...");
    put_str(&b, json ? "}\n" : "\n");

    int fd = atomic_load(&log_fd);
    ssize_t w;
    do
        w = write(fd, buf, b.len);
    while (w < 0 && errno == EINTR);
}

char *log_redact(char *out, size_t cap, const char *secret)
{
    if (cap == 0)
        return out;
    snprintf(out, cap, "[redacted %zu bytes]", secret ? strlen(secret) : (size_t)0);
    return out;
}

char *log_redact_url(char *out, size_t cap, const char *url)
{
    if (cap == 0)
        return out;
    line_buf b = {out, 0, cap - 1, false};
    const char *p = url ? url : "";
    const char *scheme_end = strstr(p, "://");
    if (scheme_end) {
        put_bytes(&b, p, (size_t)(scheme_end - p) + 3);
        p = scheme_end + 3;
        size_t authority = strcspn(p, "/?#");
        const char *at = NULL; /* userinfo ends at the last '@' of the authority */
        for (size_t i = 0; i < authority; i++)
            if (p[i] == '@')
                at = p + i;
        if (at) {
            authority -= (size_t)(at + 1 - p);
            p = at + 1;
        }
        put_bytes(&b, p, authority);
        p += authority;
    }
    size_t path = strcspn(p, "?#");
    put_bytes(&b, p, path);
    p += path;
    if (*p == '?') {
        /* Keep the parameter names, replace every value. */
        p++;
        put_char(&b, '?');
        while (*p && *p != '#') {
            size_t name = strcspn(p, "=&#");
            put_bytes(&b, p, name);
            p += name;
            if (*p == '=') {
                put_str(&b, "=redacted");
                p += strcspn(p, "&#");
            }
            if (*p == '&')
                put_char(&b, *p++);
        }
    }
    out[b.len] = '\0'; /* the fragment is dropped */
    return out;
}
