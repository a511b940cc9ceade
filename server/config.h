/*
 * Configuration of `topiary serve`: one table (config.c) defines every option
 * with its name, command-line flag, environment variable, type, default,
 * bounds and help. The same table drives --help, parsing, validation,
 * --print-config and the sample file deploy/topiary.conf.sample.
 *
 * Precedence, highest first: command-line flag, environment variable
 * (TOPIARY_*), config file, default. The config file is named by --config or
 * TOPIARY_CONFIG; its lines are KEY=VALUE with the environment names as keys,
 * '#' starts a comment line, and values are taken verbatim (no quotes).
 *
 * Sizes accept a plain byte count or a suffix k, M, G (powers of 1024).
 * Booleans accept true/false, yes/no, on/off, 1/0.
 *
 * Threads: parse once on the main thread before any other starts; the filled
 * server_config is then read-only and may be shared.
 */
#ifndef TOPIARY_CONFIG_H
#define TOPIARY_CONFIG_H

#include <stdbool.h>
#include <stdint.h>
#include <stdio.h>

#include "status.h"

typedef struct server_config {
    char *config_file;    /* the file that was read, or NULL */
    char *listen_address; /* IPv4 or IPv6 literal */
    int port;
    char *database_path;       /* SQLite file */
    char *artifact_dir;        /* checkpoints and uploads */
    int workers;               /* executor threads */
    int queue_capacity;        /* max queued jobs; POST beyond it is 503 */
    uint64_t max_body_bytes;   /* JSON request bodies */
    uint64_t max_upload_bytes; /* model uploads */
    int max_json_depth;
    char *file_roots;         /* colon-separated directories file:// URIs may read; "" = none */
    char *http_allowed_hosts; /* comma-separated hosts http(s):// URIs may fetch; "" = none */
    char *token_file;         /* bearer tokens, one per line; "" = no authentication */
    int progress_interval_ms; /* min time between progress writes of one job */
    int max_job_attempts;     /* a job abandoned this often by a crash fails */
    int busy_timeout_ms;      /* SQLite lock wait */
    bool sqlite_sync_full;    /* synchronous=FULL instead of NORMAL */
    double shutdown_grace_s;  /* how long a drain waits for running jobs */
    char *log_level;          /* debug, info, warn, error */
    char *log_format;         /* text or json */
} server_config;

/* What the caller should do after config_parse(). */
typedef enum config_action {
    CONFIG_ACTION_RUN = 0,      /* start the server */
    CONFIG_ACTION_HELP,         /* --help: print config_print_help() and exit 0 */
    CONFIG_ACTION_PRINT,        /* --print-config: config_write(cfg, false) and exit 0 */
    CONFIG_ACTION_PRINT_SAMPLE, /* --print-config-sample: config_write_sample() and exit 0 */
} config_action;

/* Fills cfg with the defaults (strings are heap copies). */
top_status config_defaults(server_config *cfg, top_error *err);

/*
 * Fills cfg from defaults, the config file, the environment and argv (argv[0]
 * is the subcommand name and is skipped), in that order of increasing
 * precedence, then validates every option. envp is a NULL-terminated
 * "NAME=value" array, or NULL for the process environment. Flags take
 * "--flag value" or "--flag=value". Errors are TOP_ERR_INVALID naming the
 * option, its source, the value and the bounds; TOP_ERR_IO for an unreadable
 * config file. On failure cfg is left freed.
 */
top_status config_parse(server_config *cfg, int argc, char **argv, char *const *envp,
                        config_action *action, top_error *err);

/* Checks every option against its bounds (config_parse does this already). */
top_status config_validate(const server_config *cfg, top_error *err);

/* Frees the strings of cfg and zeroes it. */
void config_free(server_config *cfg);

/* Writes the usage of `topiary serve`: every flag, its variable, default, bounds and help. */
void config_print_help(FILE *out);

/* Writes cfg in the config file format, one KEY=VALUE line per option with its help above. */
void config_write(FILE *out, const server_config *cfg);

/* Writes the sample file: every option commented out at its default, with its help. */
void config_write_sample(FILE *out);

#endif
