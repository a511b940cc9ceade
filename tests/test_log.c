/*
 * Structured logging: the text and JSON line formats, escaping, the level
 * threshold, redaction of secret keys and URLs, truncation of long lines, and
 * whole lines from several threads writing at once.
 */
#include <fcntl.h>
#include <jansson.h>
#include <pthread.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

#include "log.h"
#include "test.h"

static int pipe_fds[2];

/* Reads what the logger wrote to the pipe so far (non-blocking after the first line). */
static char *drain(void)
{
    static char buf[1 << 20];
    ssize_t n = read(pipe_fds[0], buf, sizeof buf - 1);
    buf[n > 0 ? n : 0] = '\0';
    return buf;
}

static void test_text_format(void)
{
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    log_info("store", "job_0123456789abcdef", "job claimed", "attempts=%d stage=%s eta=%.1f", 2,
             "calibration data", 12.25);
    char *line = drain();
    CHECK_MSG(strlen(line) > 25 && line[4] == '-' && line[10] == 'T' && line[23] == 'Z',
              "time stamp: %s", line);
    CHECK_MSG(strstr(line, " INFO store id=job_0123456789abcdef msg=\"job claimed\" attempts=2 "
                           "stage=\"calibration data\" eta=12.2") != NULL,
              "line: %s", line);
    CHECK(line[strlen(line) - 1] == '\n');
    CHECK(strchr(line, '\n') == line + strlen(line) - 1);

    log_warn("http", NULL, "bad header", "value=%s n=%zu big=%llu", "a\"b\\c\nd", (size_t)7,
             18446744073709551615ull);
    line = drain();
    CHECK_MSG(strstr(line, " WARN http msg=\"bad header\" value=\"a\\\"b\\\\c\\nd\" n=7 "
                           "big=18446744073709551615\n") != NULL,
              "line: %s", line);
}

static void test_json_format(void)
{
    log_init(LOG_DEBUG, LOG_FORMAT_JSON);
    log_debug("executor", "job_1", "stage done", "stage=%s seconds=%g rows=%ld ok=%u empty=%s",
              "saliency \"fisher\"", 1.5, -3L, 1u, getenv("TOPIARY_TEST_LOG_UNSET"));
    char *line = drain();
    json_error_t jerr;
    json_t *obj = json_loads(line, 0, &jerr);
    CHECK_MSG(obj != NULL, "not JSON (%s): %s", jerr.text, line);
    CHECK(!strcmp(json_string_value(json_object_get(obj, "level")), "debug"));
    CHECK(!strcmp(json_string_value(json_object_get(obj, "component")), "executor"));
    CHECK(!strcmp(json_string_value(json_object_get(obj, "id")), "job_1"));
    CHECK(!strcmp(json_string_value(json_object_get(obj, "stage")), "saliency \"fisher\""));
    CHECK_CLOSE(json_number_value(json_object_get(obj, "seconds")), 1.5, 0.0);
    CHECK_INT_EQ(json_integer_value(json_object_get(obj, "rows")), -3);
    CHECK(json_is_null(json_object_get(obj, "empty")));
    json_decref(obj);

    log_info("x", NULL, "nan", "v=%g", 0.0 / 0.0);
    obj = json_loads(drain(), 0, &jerr);
    CHECK_MSG(obj && json_is_string(json_object_get(obj, "v")), "NaN must be a JSON string");
    json_decref(obj);
}

static void test_level_threshold(void)
{
    log_init(LOG_WARN, LOG_FORMAT_TEXT);
    CHECK(!log_enabled(LOG_INFO));
    CHECK(log_enabled(LOG_ERROR));
    log_info("x", NULL, "dropped", NULL);
    log_error("x", NULL, "kept", NULL);
    char *out = drain();
    CHECK_MSG(!strstr(out, "dropped") && strstr(out, "ERROR x msg=kept"), "output: %s", out);

    log_level level;
    CHECK_INT_EQ(log_level_parse("warning", &level), 0);
    CHECK_INT_EQ(level, LOG_WARN);
    CHECK(log_level_parse("verbose", &level) == -1);
    log_format format;
    CHECK_INT_EQ(log_format_parse("json", &format), 0);
    CHECK_INT_EQ(format, LOG_FORMAT_JSON);
    CHECK(log_format_parse("xml", &format) == -1);
}

static void test_secret_keys_redacted(void)
{
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    log_info("auth", NULL, "login", "user=%s token=%s Authorization=%s api_secret=%s", "ana",
             "s3cr3t-value", "Bearer s3cr3t-value", "s3cr3t-value");
    char *line = drain();
    CHECK_MSG(!strstr(line, "s3cr3t"), "secret leaked: %s", line);
    CHECK(strstr(line, "user=ana token=[redacted]") != NULL);

    char out[128];
    CHECK(!strcmp(log_redact(out, sizeof out, "abcdef"), "[redacted 6 bytes]"));
    CHECK_MSG(
        !strcmp(log_redact_url(out, sizeof out,
                               "https://user:pw@models.example:8443/m.json?token=abc&x=1#frag"),
                "https://models.example:8443/m.json?token=redacted&x=redacted"),
        "got %s", out);
    CHECK(!strcmp(log_redact_url(out, sizeof out, "file:///srv/m.json"), "file:///srv/m.json"));
    /* A short buffer gets a prefix of the redacted URL, never a piece past it. */
    log_redact_url(out, 12, "http://u:p@a.example/long/path");
    CHECK_MSG(strlen(out) < 12 && !strncmp("http://a.example/long/path", out, strlen(out)),
              "got %s", out);
}

static void test_long_line_truncated(void)
{
    log_init(LOG_INFO, LOG_FORMAT_JSON);
    static char big[3000];
    memset(big, 'v', sizeof big - 1);
    log_info("x", NULL, "long", "a=%s b=%s c=%s d=%s e=%d", big, big, big, big, 5);
    char *line = drain();
    CHECK(strlen(line) <= LOG_LINE_MAX);
    json_t *obj = json_loads(line, 0, NULL);
    CHECK_MSG(obj != NULL, "a truncated JSON line must stay JSON: %.80s...", line);
    CHECK(json_is_true(json_object_get(obj, "truncated")));
    CHECK(json_object_get(obj, "a") != NULL);
    CHECK(json_object_get(obj, "e") == NULL);
    json_decref(obj);
}

enum { THREADS = 4, LINES = 100 };

static void *log_many(void *arg)
{
    int t = (int)(intptr_t)arg;
    for (int i = 0; i < LINES; i++)
        log_info(
            "worker", NULL, "tick", "thread=%d i=%d pad=%s", t, i,
            "xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx");
    return NULL;
}

static void test_threads_whole_lines(void)
{
    log_init(LOG_INFO, LOG_FORMAT_TEXT);
    pthread_t t[THREADS];
    for (int i = 0; i < THREADS; i++)
        pthread_create(&t[i], NULL, log_many, (void *)(intptr_t)i);
    for (int i = 0; i < THREADS; i++)
        pthread_join(t[i], NULL);
    int lines = 0, bad = 0;
    char *out = drain();
    for (char *line = strtok(out, "\n"); line; line = strtok(NULL, "\n")) {
        lines++;
        bad += !(strstr(line, " INFO worker msg=tick thread=") && strstr(line, "pad=xxxx") &&
                 line[strlen(line) - 1] == 'x');
    }
    CHECK_INT_EQ(lines, THREADS * LINES);
    CHECK_INT_EQ(bad, 0);
}

int main(void)
{
    if (pipe(pipe_fds) != 0) {
        perror("pipe");
        return 1;
    }
    /* Room for every line of the thread test, which reads only after the writers finish. */
    if (fcntl(pipe_fds[1], F_SETPIPE_SZ, 1 << 20) < 0)
        perror("F_SETPIPE_SZ");
    log_set_fd(pipe_fds[1]);
    TEST_RUN(test_text_format);
    TEST_RUN(test_json_format);
    TEST_RUN(test_level_threshold);
    TEST_RUN(test_secret_keys_redacted);
    TEST_RUN(test_long_line_truncated);
    TEST_RUN(test_threads_whole_lines);
    log_set_fd(2);
    return TEST_FINISH();
}
