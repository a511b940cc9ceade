/*
 * A small cache of rendered GET /v1/jobs/{id} bodies for finished jobs.
 * A job that has succeeded, failed or been cancelled never changes again
 * until it is deleted, so dashboards polling it need not reread SQLite and
 * re-render its per-layer results. Any HTTP thread may call these functions,
 * which share one mutex. The server process is the only writer of its
 * database, so dropping an entry on DELETE keeps the cache exact.
 */
#ifndef TOPIARY_JOB_CACHE_H
#define TOPIARY_JOB_CACHE_H

#include <stddef.h>

/* Entries kept; the least recently used is replaced. */
#define JOB_CACHE_ENTRIES 256
/* Bodies larger than this are not cached. */
#define JOB_CACHE_MAX_BODY ((size_t)256 << 10)

/* Copies the cached body for job id into a new malloc'ed buffer (*text,
 * *len) and returns 1, or returns 0 if the job is not cached. */
int job_cache_get(const char *id, char **text, size_t *len);

/* Stores a copy of body for job id (replacing an older one). */
void job_cache_put(const char *id, const char *body, size_t len);

/* Forgets job id (on DELETE). */
void job_cache_drop(const char *id);

#endif
