/*
 * Configuration of `topiary serve`: defaults, the precedence flag > env >
 * file > default, error messages that name the option, the source, the value
 * and the bounds, the --print-config round trip, and the committed sample
 * file deploy/topiary.conf.sample kept in sync with the table.
 */
#include <string.h>
#include <unistd.h>

#include "config.h"
#include "test.h"

static char tmp_dir[64];

static void write_file(const char *path, const char *text)
{
    FILE *f = fopen(path, "w");
    CHECK_MSG(f != NULL, "cannot write %s", path);
    if (!f)
        return;
    fputs(text, f);
    fclose(f);
}

/*
 * Parses argv (NULL-terminated, argv[0] = "serve") with the given environment
 * (NULL-terminated, NULL for an empty one), from writable copies of both.
 */
static top_status parse(server_config *cfg, const char *const *argv, const char *const *envp,
                        config_action *action, top_error *err)
{
    char *args[32] = {0}, *env[32] = {0};
    int argc = 0, envc = 0;
    while (argv[argc] && argc < 31) {
        args[argc] = strdup(argv[argc]);
        argc++;
    }
    while (envp && envp[envc] && envc < 31) {
        env[envc] = strdup(envp[envc]);
        envc++;
    }
    top_status rc = config_parse(cfg, argc, args, env, action, err);
    for (int i = 0; i < argc; i++)
        free(args[i]);
    for (int i = 0; i < envc; i++)
        free(env[i]);
    return rc;
}

/* Expects a parse failure whose message contains every one of the words. */
static void expect_error(const char *const *argv, const char *const *envp, top_status want,
                         const char *words[])
{
    server_config cfg;
    config_action action;
    top_error err = {0};
    top_status rc = parse(&cfg, argv, envp, &action, &err);
    CHECK_MSG(rc == want, "parse returned %d, expected %d (%s)", rc, want, err.message);
    for (int i = 0; words[i]; i++)
        CHECK_MSG(strstr(err.message, words[i]) != NULL, "message lacks '%s': %s", words[i],
                  err.message);
    if (rc == TOP_OK)
        config_free(&cfg);
}

static void test_defaults(void)
{
    server_config cfg;
    top_error err = {0};
    CHECK(config_defaults(&cfg, &err) == TOP_OK);
    CHECK(!strcmp(cfg.listen_address, "127.0.0.1"));
    CHECK_INT_EQ(cfg.port, 8080);
    CHECK_INT_EQ(cfg.workers, 1);
    CHECK_INT_EQ(cfg.max_body_bytes, 1 << 20);
    CHECK_INT_EQ(cfg.max_upload_bytes, 1 << 30);
    CHECK_INT_EQ(cfg.max_job_attempts, 3);
    CHECK(!cfg.sqlite_sync_full);
    CHECK_CLOSE(cfg.shutdown_grace_s, 30.0, 0.0);
    CHECK(!strcmp(cfg.file_roots, ""));
    CHECK(!strcmp(cfg.log_format, "text"));
    CHECK(config_validate(&cfg, &err) == TOP_OK);
    config_free(&cfg);
    CHECK(cfg.listen_address == NULL);
}

static void test_precedence(void)
{
    char path[128], config_arg[160], env_config[160];
    snprintf(path, sizeof path, "%s/a.conf", tmp_dir);
    write_file(path, "# comment\n\n  TOPIARY_PORT = 1000\nTOPIARY_WORKERS=2\n"
                     "TOPIARY_LOG_LEVEL=debug\r\nTOPIARY_MAX_BODY=2M\n");
    snprintf(env_config, sizeof env_config, "TOPIARY_CONFIG=%s", path);
    const char *envp[] = {env_config, "TOPIARY_PORT=2000", "TOPIARY_WORKERS=3",
                          "TOPIARY_DATA_DIR=x", NULL};
    const char *argv[] = {"serve", "--port", "3000", "--sqlite-sync-full", NULL};
    server_config cfg;
    config_action action = CONFIG_ACTION_HELP;
    top_error err = {0};
    CHECK_MSG(parse(&cfg, argv, envp, &action, &err) == TOP_OK, "parse: %s", err.message);
    if (err.status != TOP_OK)
        return;
    CHECK_INT_EQ(action, CONFIG_ACTION_RUN);
    CHECK_INT_EQ(cfg.port, 3000);              /* flag over env over file */
    CHECK_INT_EQ(cfg.workers, 3);              /* env over file */
    CHECK(!strcmp(cfg.log_level, "debug"));    /* file over default */
    CHECK_INT_EQ(cfg.max_body_bytes, 2 << 20); /* file, with a suffix */
    CHECK_INT_EQ(cfg.queue_capacity, 64);      /* default */
    CHECK(cfg.sqlite_sync_full);               /* a bare boolean flag */
    CHECK(cfg.config_file && !strcmp(cfg.config_file, path));
    config_free(&cfg);

    /* --config beats TOPIARY_CONFIG, and --flag=value works. */
    char other[128];
    snprintf(other, sizeof other, "%s/b.conf", tmp_dir);
    write_file(other, "TOPIARY_WORKERS=5\n");
    snprintf(config_arg, sizeof config_arg, "--config=%s", other);
    const char *envp2[] = {env_config, NULL};
    const char *argv2[] = {"serve", config_arg, "--port=0", "--sqlite-sync-full=off", NULL};
    CHECK_MSG(parse(&cfg, argv2, envp2, &action, &err) == TOP_OK, "parse: %s", err.message);
    if (err.status != TOP_OK)
        return;
    CHECK_INT_EQ(cfg.workers, 5);
    CHECK_INT_EQ(cfg.port, 0);
    CHECK(!cfg.sqlite_sync_full);
    CHECK(!strcmp(cfg.log_level, "info")); /* a.conf was not read */
    config_free(&cfg);
}

static void test_bounds_errors_name_option(void)
{
    expect_error((const char *[]){"serve", "--workers", "65", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"workers", "'65'", "1..64", "flag --workers", NULL});
    expect_error((const char *[]){"serve", NULL}, (const char *[]){"TOPIARY_WORKERS=0", NULL},
                 TOP_ERR_INVALID,
                 (const char *[]){"workers", "'0'", "1..64",
                                  "environment variable TOPIARY_WORKERS", NULL});
    expect_error((const char *[]){"serve", "--max-body", "100G", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"max_body_bytes", "100G", "1k..64M", NULL});
    expect_error((const char *[]){"serve", "--max-body", "10X", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"max_body_bytes", "suffix", NULL});
    expect_error((const char *[]){"serve", "--port", "80a", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"port", "'80a'", "whole number", NULL});
    expect_error((const char *[]){"serve", "--port", "99999999999999999999", NULL}, NULL,
                 TOP_ERR_INVALID, (const char *[]){"port", NULL});
    expect_error((const char *[]){"serve", "--shutdown-grace", "nan", NULL}, NULL,
                 TOP_ERR_INVALID, (const char *[]){"shutdown_grace_s", "finite", NULL});
    expect_error((const char *[]){"serve", "--shutdown-grace", "-1", NULL}, NULL,
                 TOP_ERR_INVALID, (const char *[]){"shutdown_grace_s", "0..3600", NULL});
    expect_error((const char *[]){"serve", "--log-level", "loud", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"log_level", "'loud'", "debug, info, warn or error", NULL});
    expect_error((const char *[]){"serve", "--listen", "localhost", NULL}, NULL,
                 TOP_ERR_INVALID, (const char *[]){"listen_address", "'localhost'", NULL});
    expect_error((const char *[]){"serve", "--file-roots", "/srv/models:data", NULL}, NULL,
                 TOP_ERR_INVALID, (const char *[]){"file_roots", "absolute", NULL});
    expect_error((const char *[]){"serve", "--http-allowed-hosts", "a.example,,b", NULL}, NULL,
                 TOP_ERR_INVALID, (const char *[]){"http_allowed_hosts", NULL});
    expect_error((const char *[]){"serve", "--sqlite-sync-full=maybe", NULL}, NULL,
                 TOP_ERR_INVALID, (const char *[]){"sqlite_sync_full", "true or false", NULL});
}

static void test_usage_errors(void)
{
    expect_error((const char *[]){"serve", "--wrokers", "2", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"unknown argument '--wrokers'", "--help", NULL});
    expect_error((const char *[]){"serve", "extra", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"'extra'", NULL});
    expect_error((const char *[]){"serve", "--port", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"--port needs a value", NULL});
    expect_error((const char *[]){"serve", "--config", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"--config", NULL});
    expect_error((const char *[]){"serve", "--config", "/nonexistent/topiary.conf", NULL}, NULL,
                 TOP_ERR_IO, (const char *[]){"/nonexistent/topiary.conf", NULL});
}

static void test_config_file_errors(void)
{
    char path[128], arg[160];
    snprintf(path, sizeof path, "%s/bad.conf", tmp_dir);
    snprintf(arg, sizeof arg, "--config=%s", path);

    write_file(path, "TOPIARY_PORT=1\nTOPIARY_NOPE=2\n");
    expect_error((const char *[]){"serve", arg, NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"line 2", "TOPIARY_NOPE", NULL});
    write_file(path, "# ok\nTOPIARY_WORKERS=100\n");
    expect_error((const char *[]){"serve", arg, NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"workers", "'100'", "1..64", "line 2", path, NULL});
    write_file(path, "port 8080\n");
    expect_error((const char *[]){"serve", arg, NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"line 1", "KEY=VALUE", NULL});
    /* An invalid file value is an error even when a flag overrides it. */
    write_file(path, "TOPIARY_PORT=x\n");
    expect_error((const char *[]){"serve", arg, "--port", "1", NULL}, NULL, TOP_ERR_INVALID,
                 (const char *[]){"port", "line 1", NULL});
}

static void test_actions(void)
{
    const struct {
        const char *flag;
        config_action want;
    } cases[] = {{"--help", CONFIG_ACTION_HELP},
                 {"-h", CONFIG_ACTION_HELP},
                 {"--print-config", CONFIG_ACTION_PRINT},
                 {"--print-config-sample", CONFIG_ACTION_PRINT_SAMPLE}};
    for (size_t i = 0; i < sizeof cases / sizeof cases[0]; i++) {
        const char *argv[] = {"serve", cases[i].flag, NULL};
        server_config cfg;
        config_action action = CONFIG_ACTION_RUN;
        top_error err = {0};
        CHECK(parse(&cfg, argv, NULL, &action, &err) == TOP_OK);
        CHECK_MSG(action == cases[i].want, "%s gave action %d, expected %d", cases[i].flag,
                  action, cases[i].want);
        config_free(&cfg);
    }
}

static char *capture(void (*write_fn)(FILE *, const server_config *), const server_config *cfg,
                     size_t *size)
{
    char *text = NULL;
    FILE *f = open_memstream(&text, size);
    if (!f)
        return NULL;
    write_fn(f, cfg);
    fclose(f);
    return text;
}

static void write_sample(FILE *out, const server_config *cfg)
{
    (void)cfg;
    config_write_sample(out);
}

static void test_print_config_round_trip(void)
{
    const char *argv[] = {
        "serve",         "--workers",        "7",   "--max-upload", "3G",   "--file-roots",
        "/srv/a:/srv/b", "--shutdown-grace", "2.5", "--log-format", "json", NULL};
    server_config cfg, again;
    config_action action;
    top_error err = {0};
    CHECK(parse(&cfg, argv, NULL, &action, &err) == TOP_OK);
    size_t n1 = 0, n2 = 0;
    char *first = capture(config_write, &cfg, &n1);
    CHECK(first && strstr(first, "TOPIARY_MAX_UPLOAD=3G\n"));
    CHECK(first && strstr(first, "TOPIARY_SHUTDOWN_GRACE=2.5\n"));

    char path[128], arg[160];
    snprintf(path, sizeof path, "%s/printed.conf", tmp_dir);
    write_file(path, first ? first : "");
    snprintf(arg, sizeof arg, "--config=%s", path);
    const char *argv2[] = {"serve", arg, NULL};
    CHECK_MSG(parse(&again, argv2, NULL, &action, &err) == TOP_OK, "reparse: %s", err.message);
    char *second = capture(config_write, &again, &n2);
    CHECK_MSG(first && second && !strcmp(first, second),
              "--print-config output does not read back to the same configuration");
    CHECK_INT_EQ(again.workers, 7);
    CHECK_INT_EQ(again.max_upload_bytes, 3ull << 30);
    free(first);
    free(second);
    config_free(&cfg);
    config_free(&again);
}

static char *read_text(const char *path)
{
    FILE *f = fopen(path, "rb");
    if (!f)
        return NULL;
    char *buf = calloc(1, 1 << 20);
    size_t n = buf ? fread(buf, 1, (1 << 20) - 1, f) : 0;
    (void)n;
    fclose(f);
    return buf;
}

static void test_sample_file_in_sync(void)
{
    size_t n = 0;
    char *want = capture(write_sample, NULL, &n);
    char *have = read_text("deploy/topiary.conf.sample");
    CHECK_MSG(have != NULL,
              "deploy/topiary.conf.sample is missing (run from the repository root)");
    CHECK_MSG(want && have && !strcmp(want, have),
              "deploy/topiary.conf.sample is out of date; regenerate it with "
              "`topiary serve --print-config-sample > deploy/topiary.conf.sample`");

    /* Uncommenting every setting of the sample gives exactly the defaults. */
    char path[128], arg[160];
    snprintf(path, sizeof path, "%s/uncommented.conf", tmp_dir);
    FILE *f = fopen(path, "w");
    int settings = 0;
    for (char *line = want ? strtok(want, "\n") : NULL; f && line; line = strtok(NULL, "\n"))
        if (!strncmp(line, "# TOPIARY_", 10)) {
            fprintf(f, "%s\n", line + 2);
            settings++;
        }
    if (f)
        fclose(f);
    CHECK(settings >= 18);
    snprintf(arg, sizeof arg, "--config=%s", path);
    const char *argv[] = {"serve", arg, NULL};
    server_config cfg, defaults;
    config_action action;
    top_error err = {0};
    CHECK_MSG(parse(&cfg, argv, NULL, &action, &err) == TOP_OK, "sample: %s", err.message);
    CHECK(config_defaults(&defaults, &err) == TOP_OK);
    size_t n1, n2;
    char *a = capture(config_write, &cfg, &n1), *b = capture(config_write, &defaults, &n2);
    CHECK(a != NULL);
    CHECK(b != NULL);
    if (a && b)
        CHECK(strcmp(a, b) == 0);
    free(a);
    free(b);
    free(want);
    free(have);
    config_free(&cfg);
    config_free(&defaults);
}

static void test_validate_struct(void)
{
    server_config cfg;
    top_error err = {0};
    CHECK(config_defaults(&cfg, &err) == TOP_OK);
    cfg.workers = 0;
    CHECK_INT_EQ(config_validate(&cfg, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "workers") && strstr(err.message, "1..64"), "message: %s",
              err.message);
    cfg.workers = 1;
    free(cfg.log_format);
    cfg.log_format = NULL;
    err = (top_error){0};
    CHECK_INT_EQ(config_validate(&cfg, &err), TOP_ERR_INVALID);
    CHECK_MSG(strstr(err.message, "log_format") != NULL, "message: %s", err.message);
    config_free(&cfg);
}

static void test_help_lists_every_option(void)
{
    char *text = NULL;
    size_t n = 0;
    FILE *f = open_memstream(&text, &n);
    if (!f)
        return;
    config_print_help(f);
    fclose(f);
    const char *expected[] = {"--listen",
                              "TOPIARY_PORT",
                              "--db",
                              "--artifact-dir",
                              "--workers",
                              "1..64",
                              "--queue-capacity",
                              "--max-body",
                              "--max-upload",
                              "--max-json-depth",
                              "--file-roots",
                              "--http-allowed-hosts",
                              "--token-file",
                              "--progress-interval-ms",
                              "--max-job-attempts",
                              "--busy-timeout-ms",
                              "--log-level",
                              "--log-format",
                              "--config",
                              "--print-config"};
    for (size_t i = 0; i < sizeof expected / sizeof expected[0]; i++)
        CHECK_MSG(strstr(text, expected[i]) != NULL, "help lacks %s", expected[i]);
    free(text);
}

int main(void)
{
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/topiary-config-XXXXXX");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    TEST_RUN(test_defaults);
    TEST_RUN(test_precedence);
    TEST_RUN(test_bounds_errors_name_option);
    TEST_RUN(test_usage_errors);
    TEST_RUN(test_config_file_errors);
    TEST_RUN(test_actions);
    TEST_RUN(test_print_config_round_trip);
    TEST_RUN(test_sample_file_in_sync);
    TEST_RUN(test_validate_struct);
    TEST_RUN(test_help_lists_every_option);
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmp_dir);
    return TEST_FINISH();
}
