/*
 * `topiary serve`: parses the configuration, recovers jobs that a crash left
 * running, starts the executor and the HTTP server, then waits on the main
 * thread for SIGTERM or SIGINT. A signal drains the service: the server stops
 * accepting connections, running jobs get their cancel flag and go back to
 * queued (interrupted, run again at the next start), and the process exits 0
 * once the workers stop or shutdown_grace_s passes.
 *
 * The signals are blocked before any thread starts, so every thread inherits
 * the mask and only the main thread's sigwait receives them.
 */
#include <errno.h>
#include <pthread.h>
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/stat.h>

#include "api.h"
#include "cli.h"
#include "config.h"
#include "executor.h"
#include "http.h"
#include "log.h"
#include "store.h"

#define SERVE_CONNECTION_LIMIT 256
#define SERVE_TIMEOUT_S 60

static int setup_logging(const server_config *cfg)
{
    log_level level = LOG_INFO;
    log_format format = LOG_FORMAT_TEXT;
    if ((cfg->log_level && log_level_parse(cfg->log_level, &level) != 0) ||
        (cfg->log_format && log_format_parse(cfg->log_format, &format) != 0)) {
        fprintf(stderr, "topiary serve: invalid log_level or log_format; use debug, info, "
                        "warn or error, and text or json\n");
        return -1;
    }
    log_init(level, format);
    return 0;
}

static store_options store_opts(const server_config *cfg)
{
    return (store_options){.busy_timeout_ms = cfg->busy_timeout_ms,
                           .synchronous_full = cfg->sqlite_sync_full};
}

/* Opens the store once on the main thread: migrations, integrity, recovery. */
static top_status recover_jobs(const server_config *cfg, top_error *err)
{
    store *db = NULL;
    store_options opts = store_opts(cfg);
    top_status st = store_open(&db, cfg->database_path, &opts, err);
    if (st == TOP_OK)
        st = store_integrity_check(db, err);
    size_t requeued = 0, failed = 0;
    if (st == TOP_OK)
        st = store_jobs_recover(db, cfg->max_job_attempts, &requeued, &failed, err);
    if (st == TOP_OK && (requeued || failed))
        log_warn("serve", NULL, "recovered jobs interrupted by a crash",
                 "requeued=%zu failed=%zu", requeued, failed);
    store_close(db);
    return st;
}

static int wait_for_signal(void)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    int sig = 0;
    while (sigwait(&set, &sig) != 0)
        ;
    return sig;
}

static int run(const server_config *cfg)
{
    top_error err;
    top_error_clear(&err);
    executor *ex = NULL;
    api *a = NULL;
    http_server *srv = NULL;

    if (mkdir(cfg->artifact_dir, 0750) != 0 && errno != EEXIST) {
        log_error("serve", NULL, "cannot create the artifact folder", "path=%s error=%s",
                  cfg->artifact_dir, strerror(errno));
        return 1;
    }
    executor_config ec = {.database_path = cfg->database_path,
                          .store_opts = store_opts(cfg),
                          .artifact_dir = cfg->artifact_dir,
                          .workers = cfg->workers,
                          .progress_interval_ms = cfg->progress_interval_ms,
                          .poll_interval_ms = 1000};
    top_status st = recover_jobs(cfg, &err);
    if (st == TOP_OK)
        st = executor_start(&ex, &ec, &err);
    if (st == TOP_OK)
        st = api_new(&a, cfg, ex, &err);
    http_config hc = {.host = cfg->listen_address,
                      .port = (uint16_t)cfg->port,
                      .connection_limit = SERVE_CONNECTION_LIMIT,
                      .timeout_s = SERVE_TIMEOUT_S,
                      .default_body_cap = cfg->max_body_bytes};
    http_handler handler = {0};
    if (st == TOP_OK) {
        handler = api_handler(a);
        st = http_server_start(&srv, &hc, &handler, &err);
    }
    if (st != TOP_OK) {
        log_error("serve", NULL, "cannot start", "error=%s", err.message);
        executor_free(ex);
        api_free(a);
        return 1;
    }
    log_info("serve", NULL, "listening", "address=%s port=%u workers=%d database=%s",
             cfg->listen_address, (unsigned)http_server_port(srv), cfg->workers,
             cfg->database_path);

    int sig = wait_for_signal();
    log_info("serve", NULL, "draining", "signal=%s grace_s=%g",
             sig == SIGTERM ? "SIGTERM" : "SIGINT", cfg->shutdown_grace_s);
    api_set_stopping(a);
    http_server_quiesce(srv);
    executor_drain(ex, cfg->shutdown_grace_s);
    http_server_stop(srv);
    executor_free(ex);
    api_free(a);
    log_info("serve", NULL, "stopped", "signal=%d", sig);
    return 0;
}

int cli_serve(int argc, char **argv)
{
    sigset_t set;
    sigemptyset(&set);
    sigaddset(&set, SIGTERM);
    sigaddset(&set, SIGINT);
    sigaddset(&set, SIGPIPE);
    pthread_sigmask(SIG_BLOCK, &set, NULL);

    server_config cfg;
    config_action action = CONFIG_ACTION_RUN;
    top_error err;
    top_error_clear(&err);
    if (config_parse(&cfg, argc, argv, NULL, &action, &err) != TOP_OK) {
        fprintf(stderr, "topiary serve: %s\n", err.message);
        return 2;
    }
    int rc = 0;
    switch (action) {
    case CONFIG_ACTION_HELP: config_print_help(stdout); break;
    case CONFIG_ACTION_PRINT: config_write(stdout, &cfg); break;
    case CONFIG_ACTION_PRINT_SAMPLE: config_write_sample(stdout); break;
    case CONFIG_ACTION_RUN: rc = setup_logging(&cfg) ? 2 : run(&cfg); break;
    }
    config_free(&cfg);
    return rc;
}
