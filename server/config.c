/*
 * The configuration table of `topiary serve` and everything it drives: the
 * defaults, --help, parsing from the config file, the environment and the
 * command line, validation, --print-config and the sample file. See config.h
 * for the precedence and the file format.
 *
 * Every value, the defaults included, goes through one parser per type, which
 * checks the bounds of the table, so a default outside its own bounds fails
 * config_defaults() instead of starting a server. Runs on the main thread
 * only; nothing here is shared.
 */
#include "config.h"

#include <arpa/inet.h>
#include <errno.h>
#include <math.h>
#include <stddef.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>

#include "log.h"

#define CONFIG_FILE_MAX (1u << 20) /* a config file beyond 1 MiB is certainly a mistake */
#define CONFIG_LINE_MAX 4096

extern char **environ;

typedef enum option_type { OPT_STRING, OPT_INT, OPT_DOUBLE, OPT_BOOL, OPT_SIZE } option_type;

typedef struct option_def {
    const char *name; /* the option's name in messages */
    const char *flag; /* command-line flag */
    const char *env;  /* environment variable and config file key */
    option_type type;
    size_t offset;   /* of the field in server_config */
    const char *def; /* default, parsed like any other value */
    double min, max; /* bounds of numeric types (sizes in bytes) */
    int (*check)(const char *value, char *reason, size_t cap); /* extra check of a string */
    const char *help;
} option_def;

static int check_address(const char *value, char *reason, size_t cap);
static int check_roots(const char *value, char *reason, size_t cap);
static int check_hosts(const char *value, char *reason, size_t cap);
static int check_log_level(const char *value, char *reason, size_t cap);
static int check_log_format(const char *value, char *reason, size_t cap);

#define F(field) offsetof(server_config, field)
#define KIB 1024.0
#define MIB (1024.0 * 1024.0)
#define GIB (1024.0 * 1024.0 * 1024.0)

/* The one table of options. Order is the order of --help and the sample file. */
static const option_def options[] = {
    {"listen_address", "--listen", "TOPIARY_LISTEN_ADDRESS", OPT_STRING, F(listen_address),
     "127.0.0.1", 0, 0, check_address,
     "IP address the HTTP server binds to (IPv4 or IPv6 literal); 0.0.0.0 or :: listens on "
     "every interface"},
    {"port", "--port", "TOPIARY_PORT", OPT_INT, F(port), "8080", 0, 65535, NULL,
     "TCP port of the HTTP server; 0 picks a free port"},
    {"database_path", "--db", "TOPIARY_DB", OPT_STRING, F(database_path), "var/topiary.db", 0,
     0, NULL, "SQLite database file of jobs, models and tasks (created if missing)"},
    {"artifact_dir", "--artifact-dir", "TOPIARY_ARTIFACT_DIR", OPT_STRING, F(artifact_dir),
     "var/artifacts", 0, 0, NULL, "directory of checkpoints and uploaded models"},
    {"workers", "--workers", "TOPIARY_WORKERS", OPT_INT, F(workers), "1", 1, 64, NULL,
     "executor threads, each running one job at a time"},
    {"queue_capacity", "--queue-capacity", "TOPIARY_QUEUE_CAPACITY", OPT_INT, F(queue_capacity),
     "64", 1, 100000, NULL, "queued jobs accepted before new submissions get 503"},
    {"max_body_bytes", "--max-body", "TOPIARY_MAX_BODY", OPT_SIZE, F(max_body_bytes), "1M", KIB,
     64 * MIB, NULL, "largest JSON request body, in bytes (suffix k, M, G)"},
    {"max_upload_bytes", "--max-upload", "TOPIARY_MAX_UPLOAD", OPT_SIZE, F(max_upload_bytes),
     "1G", MIB, 64 * GIB, NULL, "largest model upload, in bytes (suffix k, M, G)"},
    {"max_json_depth", "--max-json-depth", "TOPIARY_MAX_JSON_DEPTH", OPT_INT, F(max_json_depth),
     "32", 2, 256, NULL, "deepest nesting of arrays and objects accepted in a request"},
    {"file_roots", "--file-roots", "TOPIARY_FILE_ROOTS", OPT_STRING, F(file_roots), "", 0, 0,
     check_roots,
     "colon-separated absolute directories that file:// model and data URIs may read; empty "
     "allows none"},
    {"http_allowed_hosts", "--http-allowed-hosts", "TOPIARY_HTTP_ALLOWED_HOSTS", OPT_STRING,
     F(http_allowed_hosts), "", 0, 0, check_hosts,
     "comma-separated host names that http(s):// URIs may fetch from; empty allows none"},
    {"token_file", "--token-file", "TOPIARY_TOKEN_FILE", OPT_STRING, F(token_file), "", 0, 0,
     NULL, "file of bearer tokens, one per line; empty disables authentication"},
    {"progress_interval_ms", "--progress-interval-ms", "TOPIARY_PROGRESS_INTERVAL_MS", OPT_INT,
     F(progress_interval_ms), "1000", 10, 60000, NULL,
     "least time between two progress writes of one job, in milliseconds"},
    {"max_job_attempts", "--max-job-attempts", "TOPIARY_MAX_JOB_ATTEMPTS", OPT_INT,
     F(max_job_attempts), "3", 1, 100, NULL,
     "times a job may start; one interrupted by a crash this often is marked failed"},
    {"busy_timeout_ms", "--busy-timeout-ms", "TOPIARY_BUSY_TIMEOUT_MS", OPT_INT,
     F(busy_timeout_ms), "5000", 1, 600000, NULL,
     "how long a database write waits for another writer, in milliseconds"},
    {"sqlite_sync_full", "--sqlite-sync-full", "TOPIARY_SQLITE_SYNC_FULL", OPT_BOOL,
     F(sqlite_sync_full), "false", 0, 0, NULL,
     "fsync the database on every commit (synchronous=FULL) so a power loss keeps the last "
     "commits"},
    {"shutdown_grace_s", "--shutdown-grace", "TOPIARY_SHUTDOWN_GRACE", OPT_DOUBLE,
     F(shutdown_grace_s), "30", 0, 3600, NULL,
     "seconds a shutdown waits for running jobs before re-queueing them"},
    {"log_level", "--log-level", "TOPIARY_LOG_LEVEL", OPT_STRING, F(log_level), "info", 0, 0,
     check_log_level, "lowest level logged: debug, info, warn or error"},
    {"log_format", "--log-format", "TOPIARY_LOG_FORMAT", OPT_STRING, F(log_format), "text", 0,
     0, check_log_format, "log line format: text (key=value) or json"},
};

#define OPTION_COUNT (sizeof options / sizeof options[0])

/* ---- checks of string options ---- */

static int check_address(const char *value, char *reason, size_t cap)
{
    unsigned char buf[16];
    if (inet_pton(AF_INET, value, buf) == 1 || inet_pton(AF_INET6, value, buf) == 1)
        return 0;
    snprintf(reason, cap, "must be an IPv4 or IPv6 address such as 127.0.0.1 or ::1");
    return -1;
}

static int check_roots(const char *value, char *reason, size_t cap)
{
    const char *p = value;
    while (*p) {
        size_t n = strcspn(p, ":");
        if (n == 0 || p[0] != '/') {
            snprintf(reason, cap,
                     "every entry must be an absolute directory such as /srv/models");
            return -1;
        }
        p += n;
        if (*p == ':')
            p++;
    }
    return 0;
}

static int check_hosts(const char *value, char *reason, size_t cap)
{
    for (const char *p = value; *p; p++) {
        char c = *p;
        bool ok = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
                  c == '.' || c == '-' || c == ',' || c == ':' || c == '[' || c == ']';
        if (!ok || (c == ',' && (p == value || p[1] == ',' || p[1] == '\0'))) {
            snprintf(reason, cap,
                     "must be host names separated by commas, such as a.example,b.example");
            return -1;
        }
    }
    return 0;
}

static int check_log_level(const char *value, char *reason, size_t cap)
{
    log_level level;
    if (log_level_parse(value, &level) == 0)
        return 0;
    snprintf(reason, cap, "must be debug, info, warn or error");
    return -1;
}

static int check_log_format(const char *value, char *reason, size_t cap)
{
    log_format format;
    if (log_format_parse(value, &format) == 0)
        return 0;
    snprintf(reason, cap, "must be text or json");
    return -1;
}

/* ---- value parsers ---- */

static int parse_bool(const char *v, bool *out)
{
    static const char *const yes[] = {"true", "yes", "on", "1"};
    static const char *const no[] = {"false", "no", "off", "0"};
    for (size_t i = 0; i < 4; i++) {
        if (!strcasecmp(v, yes[i])) {
            *out = true;
            return 0;
        }
        if (!strcasecmp(v, no[i])) {
            *out = false;
            return 0;
        }
    }
    return -1;
}

/* Parses digits with an optional k, M or G suffix (powers of 1024). */
static int parse_size(const char *v, uint64_t *out)
{
    if (*v < '0' || *v > '9')
        return -1;
    errno = 0;
    char *end;
    unsigned long long n = strtoull(v, &end, 10);
    if (errno)
        return -1;
    unsigned shift = 0;
    if (*end == 'k' || *end == 'K')
        shift = 10;
    else if (*end == 'm' || *end == 'M')
        shift = 20;
    else if (*end == 'g' || *end == 'G')
        shift = 30;
    if (shift)
        end++;
    if (*end || n > (UINT64_MAX >> shift))
        return -1;
    *out = (uint64_t)n << shift;
    return 0;
}

static void format_size(char *out, size_t cap, uint64_t v)
{
    static const char suffix[] = {'G', 'M', 'k'};
    static const unsigned shift[] = {30, 20, 10};
    for (int i = 0; i < 3; i++)
        if (v && v % (1ull << shift[i]) == 0) {
            snprintf(out, cap, "%llu%c", (unsigned long long)(v >> shift[i]), suffix[i]);
            return;
        }
    snprintf(out, cap, "%llu", (unsigned long long)v);
}

static void format_bound(char *out, size_t cap, const option_def *o, double v)
{
    if (o->type == OPT_SIZE)
        format_size(out, cap, (uint64_t)v);
    else
        snprintf(out, cap, "%.15g", v);
}

/* Formats an option's current value in cfg as text the parser accepts. */
static void format_value(char *out, size_t cap, const option_def *o, const server_config *cfg)
{
    const char *field = (const char *)cfg + o->offset;
    switch (o->type) {
    case OPT_STRING: {
        const char *s = *(char *const *)(const void *)field;
        snprintf(out, cap, "%s", s ? s : "");
        break;
    }
    case OPT_INT: snprintf(out, cap, "%d", *(const int *)(const void *)field); break;
    case OPT_DOUBLE: snprintf(out, cap, "%.15g", *(const double *)(const void *)field); break;
    case OPT_BOOL:
        snprintf(out, cap, "%s", *(const bool *)(const void *)field ? "true" : "false");
        break;
    case OPT_SIZE: format_size(out, cap, *(const uint64_t *)(const void *)field); break;
    }
}

static top_status bad_value(top_error *err, const option_def *o, const char *source,
                            const char *value, const char *reason)
{
    return top_error_set(err, TOP_ERR_INVALID, "invalid %s '%.200s' (from %s): %s", o->name,
                         value, source, reason);
}

static top_status out_of_range(top_error *err, const option_def *o, const char *source,
                               const char *value)
{
    char lo[32], hi[32], reason[96];
    format_bound(lo, sizeof lo, o, o->min);
    format_bound(hi, sizeof hi, o, o->max);
    snprintf(reason, sizeof reason, "must be within %s..%s", lo, hi);
    return bad_value(err, o, source, value, reason);
}

/* Parses value for option o and stores it in cfg; source names where it came from. */
static top_status set_option(server_config *cfg, const option_def *o, const char *value,
                             const char *source, top_error *err)
{
    char *field = (char *)cfg + o->offset;
    char reason[160] = "";
    char *end;
    switch (o->type) {
    case OPT_STRING: {
        if (o->check && o->check(value, reason, sizeof reason) != 0)
            return bad_value(err, o, source, value, reason);
        char *copy = strdup(value);
        if (!copy)
            return top_error_set(err, TOP_ERR_NOMEM, "out of memory reading %s", o->name);
        char **slot = (char **)(void *)field;
        free(*slot);
        *slot = copy;
        return TOP_OK;
    }
    case OPT_INT: {
        errno = 0;
        long long v = strtoll(value, &end, 10);
        if (!*value || *end || errno)
            return bad_value(err, o, source, value, "must be a whole number");
        if (v < o->min || v > o->max)
            return out_of_range(err, o, source, value);
        *(int *)(void *)field = (int)v;
        return TOP_OK;
    }
    case OPT_DOUBLE: {
        double v = strtod(value, &end);
        if (!*value || *end || !isfinite(v))
            return bad_value(err, o, source, value, "must be a finite number");
        if (v < o->min || v > o->max)
            return out_of_range(err, o, source, value);
        *(double *)(void *)field = v;
        return TOP_OK;
    }
    case OPT_BOOL:
        if (parse_bool(value, (bool *)(void *)field) != 0)
            return bad_value(err, o, source, value, "must be true or false");
        return TOP_OK;
    case OPT_SIZE: {
        uint64_t v;
        if (parse_size(value, &v) != 0)
            return bad_value(err, o, source, value,
                             "must be a byte count with an optional suffix k, M or G");
        if ((double)v < o->min || (double)v > o->max)
            return out_of_range(err, o, source, value);
        *(uint64_t *)(void *)field = v;
        return TOP_OK;
    }
    }
    return top_error_set(err, TOP_ERR_INVALID, "option %s has an unknown type", o->name);
}

static const option_def *find_by_env(const char *name, size_t n)
{
    for (size_t i = 0; i < OPTION_COUNT; i++)
        if (strlen(options[i].env) == n && !strncmp(options[i].env, name, n))
            return &options[i];
    return NULL;
}

static const option_def *find_by_flag(const char *flag, size_t n)
{
    for (size_t i = 0; i < OPTION_COUNT; i++)
        if (strlen(options[i].flag) == n && !strncmp(options[i].flag, flag, n))
            return &options[i];
    return NULL;
}

/* ---- public API ---- */

void config_free(server_config *cfg)
{
    if (!cfg)
        return;
    free(cfg->config_file);
    for (size_t i = 0; i < OPTION_COUNT; i++)
        if (options[i].type == OPT_STRING)
            free(*(char **)(void *)((char *)cfg + options[i].offset));
    memset(cfg, 0, sizeof *cfg);
}

top_status config_defaults(server_config *cfg, top_error *err)
{
    memset(cfg, 0, sizeof *cfg);
    for (size_t i = 0; i < OPTION_COUNT; i++) {
        top_status rc = set_option(cfg, &options[i], options[i].def, "the default", err);
        if (rc != TOP_OK) {
            config_free(cfg);
            return rc;
        }
    }
    return TOP_OK;
}

top_status config_validate(const server_config *cfg, top_error *err)
{
    /* Re-parsing the formatted value applies every bound and check of the table. */
    server_config scratch = {0};
    top_status rc = TOP_OK;
    for (size_t i = 0; rc == TOP_OK && i < OPTION_COUNT; i++) {
        char value[CONFIG_LINE_MAX];
        format_value(value, sizeof value, &options[i], cfg);
        rc = set_option(&scratch, &options[i], value, "the configuration", err);
    }
    config_free(&scratch);
    return rc;
}

/* Reads a KEY=VALUE file into cfg. */
static top_status read_config_file(server_config *cfg, const char *path, top_error *err)
{
    FILE *f = fopen(path, "r");
    if (!f)
        return top_error_set(err, TOP_ERR_IO, "cannot read config file '%s': %s", path,
                             strerror(errno));
    char line[CONFIG_LINE_MAX + 2];
    char source[CONFIG_LINE_MAX];
    top_status rc = TOP_OK;
    size_t total = 0;
    for (int lineno = 1; rc == TOP_OK && fgets(line, sizeof line, f); lineno++) {
        size_t n = strlen(line);
        total += n;
        snprintf(source, sizeof source, "config file %s line %d", path, lineno);
        if (total > CONFIG_FILE_MAX || (n == sizeof line - 1 && line[n - 1] != '\n')) {
            rc = top_error_set(err, TOP_ERR_LIMIT,
                               "%s: line or file too long (max %d bytes per "
                               "line, %u per file)",
                               source, CONFIG_LINE_MAX, CONFIG_FILE_MAX);
            break;
        }
        while (n && (line[n - 1] == '\n' || line[n - 1] == '\r' || line[n - 1] == ' ' ||
                     line[n - 1] == '\t'))
            line[--n] = '\0';
        char *p = line + strspn(line, " \t");
        if (!*p || *p == '#')
            continue;
        char *eq = strchr(p, '=');
        size_t key_len = eq ? (size_t)(eq - p) : strlen(p);
        while (key_len && (p[key_len - 1] == ' ' || p[key_len - 1] == '\t'))
            key_len--;
        const option_def *o = eq ? find_by_env(p, key_len) : NULL;
        if (!o) {
            rc = top_error_set(err, TOP_ERR_INVALID,
                               "%s: '%.64s' is not KEY=VALUE with a known key; run "
                               "'topiary serve --help' for the keys (the TOPIARY_* names)",
                               source, p);
            break;
        }
        char *value = eq + 1 + strspn(eq + 1, " \t");
        rc = set_option(cfg, o, value, source, err);
    }
    if (rc == TOP_OK && ferror(f))
        rc = top_error_set(err, TOP_ERR_IO, "cannot read config file '%s'", path);
    fclose(f);
    return rc;
}

static const char *env_lookup(char *const *envp, const char *name)
{
    size_t n = strlen(name);
    for (char *const *e = envp; e && *e; e++)
        if (!strncmp(*e, name, n) && (*e)[n] == '=')
            return *e + n + 1;
    return NULL;
}

static top_status read_environment(server_config *cfg, char *const *envp, top_error *err)
{
    char source[96];
    for (size_t i = 0; i < OPTION_COUNT; i++) {
        const char *v = env_lookup(envp, options[i].env);
        if (!v)
            continue;
        snprintf(source, sizeof source, "environment variable %s", options[i].env);
        top_status rc = set_option(cfg, &options[i], v, source, err);
        if (rc != TOP_OK)
            return rc;
    }
    return TOP_OK;
}

/* Finds --config in argv (the last one wins), else TOPIARY_CONFIG. */
static const char *config_file_path(int argc, char **argv, char *const *envp)
{
    const char *path = env_lookup(envp, "TOPIARY_CONFIG");
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--config") && i + 1 < argc)
            path = argv[++i];
        else if (!strncmp(argv[i], "--config=", 9))
            path = argv[i] + 9;
    }
    return path && *path ? path : NULL;
}

/* Applies one command-line argument at argv[*i], advancing *i past its value. */
static top_status read_flag(server_config *cfg, int argc, char **argv, int *i,
                            config_action *action, top_error *err)
{
    const char *arg = argv[*i];
    if (!strcmp(arg, "--help") || !strcmp(arg, "-h")) {
        *action = CONFIG_ACTION_HELP;
        return TOP_OK;
    }
    if (!strcmp(arg, "--print-config")) {
        *action = CONFIG_ACTION_PRINT;
        return TOP_OK;
    }
    if (!strcmp(arg, "--print-config-sample")) {
        *action = CONFIG_ACTION_PRINT_SAMPLE;
        return TOP_OK;
    }
    const char *eq = strchr(arg, '=');
    size_t n = eq ? (size_t)(eq - arg) : strlen(arg);
    if (n == 8 && !strncmp(arg, "--config", 8)) {
        *i += eq ? 0 : 1; /* read earlier by config_file_path */
        return *i < argc ? TOP_OK
                         : top_error_set(err, TOP_ERR_INVALID, "--config needs a file name");
    }
    const option_def *o = find_by_flag(arg, n);
    if (!o)
        return top_error_set(err, TOP_ERR_INVALID,
                             "unknown argument '%.100s'; run 'topiary serve --help' for the "
                             "options",
                             arg);
    char source[96];
    snprintf(source, sizeof source, "flag %s", o->flag);
    if (eq)
        return set_option(cfg, o, eq + 1, source, err);
    if (o->type == OPT_BOOL)
        return set_option(cfg, o, "true", source, err);
    if (*i + 1 >= argc)
        return top_error_set(err, TOP_ERR_INVALID, "%s needs a value (%s)", o->flag, o->help);
    return set_option(cfg, o, argv[++*i], source, err);
}

top_status config_parse(server_config *cfg, int argc, char **argv, char *const *envp,
                        config_action *action, top_error *err)
{
    *action = CONFIG_ACTION_RUN;
    if (!envp)
        envp = environ;
    top_status rc = config_defaults(cfg, err);
    if (rc != TOP_OK)
        return rc;

    const char *path = config_file_path(argc, argv, envp);
    if (path) {
        cfg->config_file = strdup(path);
        rc = cfg->config_file ? read_config_file(cfg, path, err)
                              : top_error_set(err, TOP_ERR_NOMEM, "out of memory");
    }
    if (rc == TOP_OK)
        rc = read_environment(cfg, envp, err);
    for (int i = 1; rc == TOP_OK && i < argc; i++)
        rc = read_flag(cfg, argc, argv, &i, action, err);
    if (rc == TOP_OK)
        rc = config_validate(cfg, err);
    if (rc != TOP_OK)
        config_free(cfg);
    return rc;
}

/* "1..64", "1k..64M" or "" for options without numeric bounds. */
static void format_range(char *out, size_t cap, const option_def *o)
{
    out[0] = '\0';
    if (o->type != OPT_INT && o->type != OPT_DOUBLE && o->type != OPT_SIZE)
        return;
    char lo[32], hi[32];
    format_bound(lo, sizeof lo, o, o->min);
    format_bound(hi, sizeof hi, o, o->max);
    snprintf(out, cap, "%s..%s", lo, hi);
}

static const char *type_metavar(option_type t)
{
    switch (t) {
    case OPT_STRING: return "TEXT";
    case OPT_INT: return "N";
    case OPT_DOUBLE: return "X";
    case OPT_BOOL: return "[=BOOL]";
    case OPT_SIZE: return "BYTES";
    }
    return "";
}

void config_print_help(FILE *out)
{
    fprintf(out, "usage: topiary serve [OPTIONS]\n\n"
                 "Runs the HTTP/JSON pruning service. Each option can also be set by its\n"
                 "environment variable or as KEY=VALUE in the config file; flags override\n"
                 "the environment, which overrides the file, which overrides the default.\n\n");
    fprintf(out, "  --config FILE  (TOPIARY_CONFIG)\n      config file of KEY=VALUE lines\n");
    for (size_t i = 0; i < OPTION_COUNT; i++) {
        const option_def *o = &options[i];
        char range[80];
        format_range(range, sizeof range, o);
        fprintf(out, "  %s %s  (%s)\n      %s\n      default '%s'%s%s\n", o->flag,
                type_metavar(o->type), o->env, o->help, o->def, *range ? ", range " : "",
                range);
    }
    fprintf(out, "  --print-config          print the effective configuration and exit\n"
                 "  --print-config-sample   print the sample config file and exit\n"
                 "  -h, --help              print this help and exit\n");
}

static void write_entry(FILE *out, const option_def *o, const char *value, bool commented)
{
    char range[80];
    format_range(range, sizeof range, o);
    fprintf(out, "# %s\n# flag %s, default '%s'%s%s\n%s%s=%s\n\n", o->help, o->flag, o->def,
            *range ? ", range " : "", range, commented ? "# " : "", o->env, value);
}

void config_write(FILE *out, const server_config *cfg)
{
    fprintf(out, "# topiary serve configuration (effective values)\n\n");
    for (size_t i = 0; i < OPTION_COUNT; i++) {
        char value[CONFIG_LINE_MAX];
        format_value(value, sizeof value, &options[i], cfg);
        write_entry(out, &options[i], value, false);
    }
}

void config_write_sample(FILE *out)
{
    fprintf(out,
            "# Sample configuration of `topiary serve`, generated by\n"
            "# `topiary serve --print-config-sample`. Uncomment a line to change it.\n"
            "# Environment variables of the same names override this file, and\n"
            "# command-line flags override both. Values are taken verbatim (no quotes).\n\n");
    for (size_t i = 0; i < OPTION_COUNT; i++)
        write_entry(out, &options[i], options[i].def, true);
}
