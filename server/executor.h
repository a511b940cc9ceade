/*
 * The job executor: a libuv loop thread that claims queued jobs from the
 * store, and its own fixed pool of worker threads (uv_thread_create, not
 * libuv's shared pool) that run pipeline_run on them. The loop claims a job
 * only when a worker is idle, so at most `workers` jobs are running and the
 * hand-off queue never holds more than one job per worker; the queue of
 * waiting jobs is the store's queued rows, which the API bounds.
 *
 * Threads: executor_start, executor_drain and executor_free run on the main
 * thread; executor_notify, executor_cancel and executor_get_stats may be
 * called from any thread. Each worker and the loop open their own store
 * connection.
 */
#ifndef TOPIARY_EXECUTOR_H
#define TOPIARY_EXECUTOR_H

#include <stddef.h>
#include <stdint.h>

#include <jansson.h>

#include "pipeline.h"
#include "status.h"
#include "store.h"

/* Upper bounds (seconds) of the job duration histogram; +Inf follows. */
#define EXECUTOR_DURATION_BUCKETS 10
extern const double executor_duration_bounds[EXECUTOR_DURATION_BUCKETS];

typedef struct executor_config {
    const char *database_path;
    store_options store_opts;
    const char *artifact_dir; /* each job writes ARTIFACT_DIR/JOB_ID/ */
    int workers;              /* 1 or more */
    int progress_interval_ms; /* min time between progress writes of one job */
    int poll_interval_ms;     /* the loop also looks for queued jobs this often */
} executor_config;

typedef struct executor_stats {
    int workers;       /* configured */
    int workers_alive; /* threads that started and have not exited */
    int running;       /* workers busy with a job */
    int draining;
    /* Finished jobs by duration: counts per bucket (not cumulative), then +Inf. */
    uint64_t duration_counts[EXECUTOR_DURATION_BUCKETS + 1];
    double duration_sum_s;
    uint64_t duration_count;
} executor_stats;

typedef struct executor executor;

/* Starts the loop thread and the workers; they begin claiming queued jobs. */
top_status executor_start(executor **out, const executor_config *cfg, top_error *err);

/* Wakes the loop to claim jobs (call after a job was queued). Any thread. */
void executor_notify(executor *ex);

/* Raises the cancel flag of the worker running job_id; returns 1 if one is. */
int executor_cancel(executor *ex, const char *job_id);

/* Copies the counters. Any thread. */
void executor_get_stats(executor *ex, executor_stats *out);

/*
 * Stops claiming, raises the cancel flag of every running job and waits up to
 * grace_s for the workers to put those jobs back to queued (they are
 * interrupted, not failed: the next start runs them again). Then stops the
 * workers and the loop. A job still running after the grace period is left
 * running in the store for store_jobs_recover() at the next start.
 */
void executor_drain(executor *ex, double grace_s);

/* Drains with no grace period if needed, then frees ex. NULL is ignored. */
void executor_free(executor *ex);

/*
 * Fills pipeline options from a normalised job request (the object the API
 * stores; see openapi.yaml, JobRequest, and its "resolved" member). Pointers
 * in *opt point into request, which must outlive opt. TOP_ERR_FORMAT names
 * the member that is missing or of the wrong type.
 */
top_status executor_options_from_request(pipeline_options *opt, const json_t *request,
                                         top_error *err);

#endif
