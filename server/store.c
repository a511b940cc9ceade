/*
 * The SQLite job store; the contract is in store.h.
 *
 * Threads: each function runs on the thread that owns the connection (the
 * HTTP thread or one executor thread); the connection is opened with
 * SQLITE_OPEN_NOMUTEX, so sharing one `store` between threads is a bug.
 * Concurrency between connections comes from SQLite: WAL mode lets readers
 * proceed during a write, and every write starts with BEGIN IMMEDIATE, which
 * takes the write lock up front. A connection that finds the lock taken waits
 * up to busy_timeout_ms inside SQLite, then this file retries BEGIN up to
 * busy_retries more times before it gives up with TOP_ERR_LIMIT.
 *
 * Durability: synchronous=NORMAL by default. In WAL mode that survives a
 * crash of the process with every committed transaction, and a power loss
 * with a consistent database that may lack the last commits. A lost commit
 * here leaves a job queued or running, which startup recovery re-runs, so
 * the fsync per commit of FULL is an option (sqlite_sync_full), not the
 * default.
 *
 * Statements are prepared per call and finalized on every path; the rates of
 * a job service (a few requests and progress writes per second) do not need
 * a statement cache.
 */
#include "store.h"

#include <errno.h>
#include <fcntl.h>
#include <math.h>
#include <sqlite3.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "log.h"

#define STORE_IDEMPOTENCY_KEY_MAX 255
#define STORE_TEXT_MAX 4096 /* stage names, error messages, paths */

struct store {
    sqlite3 *db;
    int busy_timeout_ms;
    int busy_retries;
    store_clock_fn clock;
    void *clock_ctx;
};

/* ---- small helpers ---- */

const char *store_job_status_str(store_job_status status)
{
    static const char *const names[] = {"queued", "running", "succeeded", "failed",
                                        "cancelled"};
    return (unsigned)status < STORE_JOB_STATUS_COUNT ? names[status] : "unknown";
}

int store_job_status_parse(const char *name, store_job_status *out)
{
    for (int i = 0; name && i < STORE_JOB_STATUS_COUNT; i++)
        if (!strcmp(name, store_job_status_str((store_job_status)i))) {
            *out = (store_job_status)i;
            return 0;
        }
    return -1;
}

bool store_job_status_is_final(store_job_status status)
{
    return status == STORE_JOB_SUCCEEDED || status == STORE_JOB_FAILED ||
           status == STORE_JOB_CANCELLED;
}

static int64_t real_clock(void *ctx)
{
    (void)ctx;
    return log_now_ms();
}

void store_set_clock(store *s, store_clock_fn fn, void *ctx)
{
    s->clock = fn ? fn : real_clock;
    s->clock_ctx = fn ? ctx : NULL;
}

static void now_text(store *s, char out[LOG_TIME_MAX])
{
    log_format_time(out, s->clock(s->clock_ctx));
}

/* Maps an SQLite result code to a status and records "what: sqlite message". */
static top_status db_error(store *s, top_error *err, const char *what)
{
    int code = sqlite3_extended_errcode(s->db);
    const char *msg = sqlite3_errmsg(s->db);
    switch (code & 0xff) {
    case SQLITE_NOMEM:
        return top_error_set(err, TOP_ERR_NOMEM, "store: %s: out of memory", what);
    case SQLITE_BUSY:
    case SQLITE_LOCKED:
        return top_error_set(err, TOP_ERR_LIMIT,
                             "store: %s: the database stayed locked for %d ms and %d retries; "
                             "retry later or raise the busy timeout",
                             what, s->busy_timeout_ms, s->busy_retries);
    case SQLITE_CONSTRAINT:
        return top_error_set(err, TOP_ERR_INVALID, "store: %s: constraint failed: %s", what,
                             msg);
    default:
        return top_error_set(err, TOP_ERR_IO, "store: %s: %s (sqlite code %d)", what, msg,
                             code);
    }
}

static top_status prepare(store *s, const char *sql, sqlite3_stmt **stmt, top_error *err)
{
    if (sqlite3_prepare_v2(s->db, sql, -1, stmt, NULL) != SQLITE_OK) {
        *stmt = NULL;
        return db_error(s, err, "prepare");
    }
    return TOP_OK;
}

/* Runs one statement without results outside a prepared-statement cache. */
static top_status exec(store *s, const char *sql, top_error *err)
{
    if (sqlite3_exec(s->db, sql, NULL, NULL, NULL) != SQLITE_OK)
        return db_error(s, err, sql);
    return TOP_OK;
}

static void sleep_ms(int ms)
{
    struct timespec ts = {ms / 1000, (long)(ms % 1000) * 1000000L};
    while (nanosleep(&ts, &ts) != 0 && errno == EINTR)
        ;
}

/* BEGIN IMMEDIATE with bounded retries of SQLITE_BUSY beyond the busy timeout. */
static top_status tx_begin(store *s, top_error *err)
{
    for (int attempt = 0;; attempt++) {
        int rc = sqlite3_exec(s->db, "BEGIN IMMEDIATE", NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            return TOP_OK;
        if ((rc & 0xff) != SQLITE_BUSY || attempt >= s->busy_retries)
            return db_error(s, err, "begin transaction");
        log_warn("store", NULL, "database busy, retrying", "attempt=%d retries=%d", attempt + 1,
                 s->busy_retries);
        sleep_ms(10 * (attempt + 1));
    }
}

static top_status tx_commit(store *s, top_error *err)
{
    for (int attempt = 0;; attempt++) {
        int rc = sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL);
        if (rc == SQLITE_OK)
            return TOP_OK;
        if ((rc & 0xff) != SQLITE_BUSY || attempt >= s->busy_retries) {
            top_status st = db_error(s, err, "commit");
            sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
            return st;
        }
        sleep_ms(10 * (attempt + 1));
    }
}

/* Ends a transaction: commit when st is TOP_OK, else roll back. Returns the final status. */
static top_status tx_end(store *s, top_status st, top_error *err)
{
    if (st == TOP_OK)
        return tx_commit(s, err);
    if (!sqlite3_get_autocommit(s->db))
        sqlite3_exec(s->db, "ROLLBACK", NULL, NULL, NULL);
    return st;
}

/* Read transactions give multi-statement reads one snapshot. */
static top_status tx_begin_read(store *s, top_error *err)
{
    return exec(s, "BEGIN", err);
}

static bool is_hex(const char *v, size_t n)
{
    if (strlen(v) != n)
        return false;
    for (size_t i = 0; i < n; i++)
        if (!((v[i] >= '0' && v[i] <= '9') || (v[i] >= 'a' && v[i] <= 'f')))
            return false;
    return true;
}

top_status store_new_id(char out[STORE_ID_MAX], const char *prefix, top_error *err)
{
    unsigned char bytes[8];
    size_t plen = strlen(prefix);
    if (plen + 2 * sizeof bytes + 1 > STORE_ID_MAX)
        return top_error_set(err, TOP_ERR_INVALID, "id prefix '%s' is too long", prefix);
    int fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return top_error_set(err, TOP_ERR_IO, "cannot open /dev/urandom: %s", strerror(errno));
    size_t got = 0;
    while (got < sizeof bytes) {
        ssize_t r = read(fd, bytes + got, sizeof bytes - got);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            close(fd);
            return top_error_set(err, TOP_ERR_IO, "cannot read /dev/urandom");
        }
        got += (size_t)r;
    }
    close(fd);
    memcpy(out, prefix, plen);
    for (size_t i = 0; i < sizeof bytes; i++)
        snprintf(out + plen + 2 * i, 3, "%02x", bytes[i]);
    return TOP_OK;
}

/* ---- JSON from rows ---- */

typedef struct json_builder {
    json_t *obj;
    bool oom;
} json_builder;

static void jset(json_builder *b, const char *key, json_t *value)
{
    if (!value || json_object_set_new(b->obj, key, value) != 0)
        b->oom = true;
}

static json_t *col_text(sqlite3_stmt *st, int i)
{
    const unsigned char *v = sqlite3_column_text(st, i);
    return v ? json_string((const char *)v) : json_null();
}

static json_t *col_real(sqlite3_stmt *st, int i)
{
    return sqlite3_column_type(st, i) == SQLITE_NULL ? json_null()
                                                     : json_real(sqlite3_column_double(st, i));
}

/* Parses a stored JSON column; NULL stays null, malformed text is an error. */
static json_t *col_json(sqlite3_stmt *st, int i, bool *malformed)
{
    const char *v = (const char *)sqlite3_column_text(st, i);
    if (!v)
        return json_null();
    json_t *j = json_loads(v, JSON_DECODE_ANY, NULL);
    if (!j)
        *malformed = true;
    return j;
}

static void bind_text_or_null(sqlite3_stmt *st, int i, const char *v)
{
    if (v)
        sqlite3_bind_text(st, i, v, -1, SQLITE_TRANSIENT);
    else
        sqlite3_bind_null(st, i);
}

/* ---- migrations ---- */

static top_status read_schema_version(store *s, int *version, top_error *err)
{
    sqlite3_stmt *st;
    top_status rc =
        prepare(s, "SELECT coalesce(max(version), 0) FROM schema_migrations", &st, err);
    if (rc != TOP_OK)
        return rc;
    if (sqlite3_step(st) == SQLITE_ROW)
        *version = sqlite3_column_int(st, 0);
    else
        rc = db_error(s, err, "read schema version");
    sqlite3_finalize(st);
    return rc;
}

top_status store_schema_version(store *s, int *version, top_error *err)
{
    return read_schema_version(s, version, err);
}

/* Checks that every applied migration embedded in the binary has its embedded name. */
static top_status check_applied_names(store *s, const store_migration *m, size_t n,
                                      top_error *err)
{
    sqlite3_stmt *st;
    top_status rc =
        prepare(s, "SELECT version, name FROM schema_migrations ORDER BY version", &st, err);
    if (rc != TOP_OK)
        return rc;
    int step;
    while (rc == TOP_OK && (step = sqlite3_step(st)) == SQLITE_ROW) {
        int version = sqlite3_column_int(st, 0);
        const char *name = (const char *)sqlite3_column_text(st, 1);
        for (size_t i = 0; i < n; i++)
            if (m[i].version == version && (!name || strcmp(name, m[i].name) != 0))
                rc = top_error_set(err, TOP_ERR_UNSUPPORTED,
                                   "database migration %d is named '%s' but this binary's is "
                                   "'%s'; the database was made by another build of topiary",
                                   version, name ? name : "", m[i].name);
    }
    if (rc == TOP_OK && step != SQLITE_DONE)
        rc = db_error(s, err, "read schema_migrations");
    sqlite3_finalize(st);
    return rc;
}

/* Applies one migration and records it, in one transaction; skips it if another process did. */
static top_status apply_migration(store *s, const store_migration *m, top_error *err)
{
    top_status rc = tx_begin(s, err);
    if (rc != TOP_OK)
        return rc;
    int current = 0;
    rc = read_schema_version(s, &current, err);
    if (rc == TOP_OK && current >= m->version)
        return tx_end(s, TOP_OK, err);
    if (rc == TOP_OK && sqlite3_exec(s->db, m->sql, NULL, NULL, NULL) != SQLITE_OK) {
        char what[96];
        snprintf(what, sizeof what, "migration %04d_%s", m->version, m->name);
        rc = db_error(s, err, what);
    }
    sqlite3_stmt *st = NULL;
    if (rc == TOP_OK)
        rc = prepare(
            s, "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
            &st, err);
    if (rc == TOP_OK) {
        char now[LOG_TIME_MAX];
        now_text(s, now);
        sqlite3_bind_int(st, 1, m->version);
        sqlite3_bind_text(st, 2, m->name, -1, SQLITE_STATIC);
        sqlite3_bind_text(st, 3, now, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "record migration");
    }
    sqlite3_finalize(st);
    rc = tx_end(s, rc, err);
    if (rc == TOP_OK)
        log_info("store", NULL, "migration applied", "version=%d name=%s", m->version, m->name);
    return rc;
}

static top_status migrate(store *s, int max_version, top_error *err)
{
    size_t n;
    const store_migration *m = store_migrations(&n);
    top_status rc = exec(s,
                         "CREATE TABLE IF NOT EXISTS schema_migrations ("
                         "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                         "applied_at TEXT NOT NULL)",
                         err);
    int current = 0;
    if (rc == TOP_OK)
        rc = read_schema_version(s, &current, err);
    if (rc != TOP_OK)
        return rc;
    int newest = n ? m[n - 1].version : 0;
    if (current > newest)
        return top_error_set(err, TOP_ERR_UNSUPPORTED,
                             "database schema version %d is newer than this binary's newest "
                             "migration %d; run a newer topiary or use another database",
                             current, newest);
    rc = check_applied_names(s, m, n, err);
    for (size_t i = 0; rc == TOP_OK && i < n; i++) {
        if (m[i].version <= current || (max_version > 0 && m[i].version > max_version))
            continue;
        rc = apply_migration(s, &m[i], err);
    }
    return rc;
}

/* ---- open and close ---- */

static top_status set_pragmas(store *s, bool synchronous_full, top_error *err)
{
    sqlite3_stmt *st;
    top_status rc = prepare(s, "PRAGMA journal_mode=WAL", &st, err);
    if (rc != TOP_OK)
        return rc;
    if (sqlite3_step(st) != SQLITE_ROW) {
        rc = db_error(s, err, "set journal_mode=WAL");
    } else {
        const char *mode = (const char *)sqlite3_column_text(st, 0);
        if (!mode || strcmp(mode, "wal") != 0)
            rc =
                top_error_set(err, TOP_ERR_UNSUPPORTED,
                              "the database did not switch to WAL mode (journal_mode is '%s'); "
                              "put it on a local file system",
                              mode ? mode : "");
    }
    sqlite3_finalize(st);
    if (rc == TOP_OK)
        rc = exec(s, "PRAGMA foreign_keys=ON", err);
    if (rc == TOP_OK)
        rc = exec(s, synchronous_full ? "PRAGMA synchronous=FULL" : "PRAGMA synchronous=NORMAL",
                  err);
    return rc;
}

top_status store_open(store **out, const char *path, const store_options *opts, top_error *err)
{
    *out = NULL;
    store_options o = opts ? *opts : (store_options){0};
    if (!path || !*path)
        return top_error_set(err, TOP_ERR_INVALID,
                             "store: empty database path; set a file name");
    if (o.busy_timeout_ms < 0 || o.busy_retries < 0 || o.max_version < 0)
        return top_error_set(err, TOP_ERR_INVALID,
                             "store: negative option (busy timeout %d ms, retries %d, "
                             "max version %d); use 0 for the default",
                             o.busy_timeout_ms, o.busy_retries, o.max_version);
    store *s = calloc(1, sizeof *s);
    if (!s)
        return top_error_set(err, TOP_ERR_NOMEM, "store: out of memory");
    s->busy_timeout_ms = o.busy_timeout_ms ? o.busy_timeout_ms : 5000;
    s->busy_retries = o.busy_retries ? o.busy_retries : 3;
    store_set_clock(s, NULL, NULL);

    top_status rc = TOP_OK;
    int flags = SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_NOMUTEX;
    if (sqlite3_open_v2(path, &s->db, flags, NULL) != SQLITE_OK) {
        rc = s->db
                 ? top_error_set(err, TOP_ERR_IO,
                                 "store: cannot open database '%s': %s; "
                                 "check that its directory exists and is writable",
                                 path, sqlite3_errmsg(s->db))
                 : top_error_set(err, TOP_ERR_NOMEM, "store: out of memory opening '%s'", path);
        goto fail;
    }
    sqlite3_extended_result_codes(s->db, 1);
    sqlite3_busy_timeout(s->db, s->busy_timeout_ms);
    rc = set_pragmas(s, o.synchronous_full, err);
    if (rc == TOP_OK)
        rc = migrate(s, o.max_version, err);
    if (rc != TOP_OK)
        goto fail;
    *out = s;
    return TOP_OK;

fail:
    store_close(s);
    return rc;
}

void store_close(store *s)
{
    if (!s)
        return;
    /* sqlite3_close_v2 defers the close if a statement leaked; none should. */
    sqlite3_close_v2(s->db);
    free(s);
}

top_status store_integrity_check(store *s, top_error *err)
{
    sqlite3_stmt *st;
    top_status rc = prepare(s, "PRAGMA integrity_check", &st, err);
    if (rc != TOP_OK)
        return rc;
    if (sqlite3_step(st) != SQLITE_ROW) {
        rc = db_error(s, err, "integrity_check");
    } else {
        const char *r = (const char *)sqlite3_column_text(st, 0);
        if (!r || strcmp(r, "ok") != 0)
            rc = top_error_set(err, TOP_ERR_FORMAT, "store: integrity check failed: %s",
                               r ? r : "(no result)");
    }
    sqlite3_finalize(st);
    return rc;
}

/* ---- cursors ---- */

/* A cursor is the hex encoding of "created_at\nid" of the last row of a page. */
static char *cursor_encode(const char *created_at, const char *id)
{
    size_t n = strlen(created_at) + 1 + strlen(id);
    char *out = malloc(2 * n + 1);
    if (!out)
        return NULL;
    char *p = out;
    for (const char *c = created_at; *c; c++, p += 2)
        snprintf(p, 3, "%02x", (unsigned char)*c);
    snprintf(p, 3, "%02x", '\n');
    p += 2;
    for (const char *c = id; *c; c++, p += 2)
        snprintf(p, 3, "%02x", (unsigned char)*c);
    *p = '\0';
    return out;
}

static int hex_value(char c)
{
    if (c >= '0' && c <= '9')
        return c - '0';
    if (c >= 'a' && c <= 'f')
        return c - 'a' + 10;
    return -1;
}

/* Splits a cursor into created_at and id (buffers of 64 bytes); returns 0, or -1 if malformed.
 */
static int cursor_decode(const char *cursor, char created_at[64], char id[64])
{
    size_t n = strlen(cursor);
    char plain[128];
    if (n == 0 || n % 2 || n / 2 >= sizeof plain)
        return -1;
    for (size_t i = 0; i < n / 2; i++) {
        int hi = hex_value(cursor[2 * i]), lo = hex_value(cursor[2 * i + 1]);
        if (hi < 0 || lo < 0)
            return -1;
        plain[i] = (char)(hi * 16 + lo);
        if (plain[i] == '\0')
            return -1;
    }
    plain[n / 2] = '\0';
    char *nl = strchr(plain, '\n');
    if (!nl || nl == plain || !nl[1] || strlen(nl + 1) >= 64 || (size_t)(nl - plain) >= 64)
        return -1;
    *nl = '\0';
    strcpy(created_at, plain);
    strcpy(id, nl + 1);
    return 0;
}

typedef json_t *(*row_to_json_fn)(sqlite3_stmt *st, bool *malformed);

typedef struct page_query {
    const char *sql; /* binds ?1 status (if used), ?2 created_at, ?3 id, ?4 limit + 1 */
    const char *status;
    const char *cursor;
    size_t limit;
    const char *key;    /* "jobs", "models", "tasks" */
    row_to_json_fn row; /* must emit "id" and "created_at" */
} page_query;

static top_status list_page(store *s, const page_query *q, json_t **out, top_error *err)
{
    char created[64] = "", id[64] = "";
    if (q->cursor && *q->cursor && cursor_decode(q->cursor, created, id) != 0)
        return top_error_set(
            err, TOP_ERR_INVALID,
            "malformed cursor '%.64s'; pass the next_cursor of a previous page", q->cursor);
    size_t limit = q->limit == 0 ? STORE_LIST_LIMIT_DEFAULT : q->limit;
    if (limit > STORE_LIST_LIMIT_MAX)
        limit = STORE_LIST_LIMIT_MAX;

    sqlite3_stmt *st;
    top_status rc = prepare(s, q->sql, &st, err);
    if (rc != TOP_OK)
        return rc;
    bind_text_or_null(st, 1, q->status); /* unused by queries without a status filter */
    bind_text_or_null(st, 2, *created ? created : NULL);
    bind_text_or_null(st, 3, *id ? id : NULL);
    sqlite3_bind_int64(st, 4, (sqlite3_int64)limit + 1);

    json_t *rows = json_array();
    json_t *page = json_object();
    char *next = NULL;
    bool malformed = false, oom = !rows || !page, more = false;
    size_t count = 0;
    int step = SQLITE_DONE;
    while (!oom && !malformed && (step = sqlite3_step(st)) == SQLITE_ROW) {
        if (count == limit) { /* the query asked for one row more than a page */
            more = true;
            step = SQLITE_DONE;
            break;
        }
        json_t *row = q->row(st, &malformed);
        if (!row || json_array_append_new(rows, row) != 0)
            oom = !malformed;
        count++;
    }
    if (oom)
        rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory listing %s", q->key);
    else if (malformed)
        rc = top_error_set(err, TOP_ERR_FORMAT, "store: a stored %s row holds malformed JSON",
                           q->key);
    else if (step != SQLITE_DONE)
        rc = db_error(s, err, "list");
    sqlite3_finalize(st);
    if (rc == TOP_OK && more) {
        /* The cursor names the last row returned, not the extra one. */
        json_t *last = json_array_get(rows, count - 1);
        next = cursor_encode(json_string_value(json_object_get(last, "created_at")),
                             json_string_value(json_object_get(last, "id")));
        if (!next)
            rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory listing %s", q->key);
    }
    if (rc == TOP_OK &&
        (json_object_set_new(page, q->key, rows) != 0 ||
         json_object_set_new(page, "next_cursor", next ? json_string(next) : json_null()) != 0))
        rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory listing %s", q->key);
    else if (rc == TOP_OK)
        rows = NULL; /* now owned by page */
    free(next);
    json_decref(rows);
    if (rc != TOP_OK) {
        json_decref(page);
        return rc;
    }
    *out = page;
    return TOP_OK;
}

/* ---- jobs: reading ---- */

#define JOB_COLUMNS                                                                            \
    "id, status, stage, progress, eta_seconds, request, idempotency_key, attempts, error, "    \
    "cancel_requested, result, dense_path, dense_size, dense_sha256, compressed_path, "        \
    "compressed_size, compressed_sha256, created_at, started_at, finished_at, updated_at"

enum {
    JC_ID,
    JC_STATUS,
    JC_STAGE,
    JC_PROGRESS,
    JC_ETA,
    JC_REQUEST,
    JC_IDEM,
    JC_ATTEMPTS,
    JC_ERROR,
    JC_CANCEL,
    JC_RESULT,
    JC_DENSE_PATH,
    JC_DENSE_SIZE,
    JC_DENSE_SHA,
    JC_COMP_PATH,
    JC_COMP_SIZE,
    JC_COMP_SHA,
    JC_CREATED,
    JC_STARTED,
    JC_FINISHED,
    JC_UPDATED
};

static json_t *artifact_json(sqlite3_stmt *st, int path_col)
{
    if (sqlite3_column_type(st, path_col) == SQLITE_NULL)
        return json_null();
    json_builder b = {json_object(), false};
    if (!b.obj)
        return NULL;
    jset(&b, "path", col_text(st, path_col));
    jset(&b, "size", json_integer(sqlite3_column_int64(st, path_col + 1)));
    jset(&b, "sha256", col_text(st, path_col + 2));
    if (b.oom) {
        json_decref(b.obj);
        return NULL;
    }
    return b.obj;
}

/* One job row as JSON; full adds request and result. */
static json_t *job_from_row(sqlite3_stmt *st, bool full, bool *malformed)
{
    json_builder b = {json_object(), false};
    if (!b.obj)
        return NULL;
    jset(&b, "id", col_text(st, JC_ID));
    jset(&b, "status", col_text(st, JC_STATUS));
    jset(&b, "stage", col_text(st, JC_STAGE));
    jset(&b, "progress", json_real(sqlite3_column_double(st, JC_PROGRESS)));
    jset(&b, "eta_seconds", col_real(st, JC_ETA));
    if (full)
        jset(&b, "request", col_json(st, JC_REQUEST, malformed));
    jset(&b, "idempotency_key", col_text(st, JC_IDEM));
    jset(&b, "attempts", json_integer(sqlite3_column_int64(st, JC_ATTEMPTS)));
    jset(&b, "error", col_text(st, JC_ERROR));
    jset(&b, "cancel_requested", json_boolean(sqlite3_column_int(st, JC_CANCEL) != 0));
    if (full)
        jset(&b, "result", col_json(st, JC_RESULT, malformed));
    json_t *artifacts = json_object();
    if (artifacts) {
        json_builder a = {artifacts, false};
        jset(&a, "dense", artifact_json(st, JC_DENSE_PATH));
        jset(&a, "compressed", artifact_json(st, JC_COMP_PATH));
        b.oom |= a.oom;
    }
    jset(&b, "artifacts", artifacts);
    jset(&b, "created_at", col_text(st, JC_CREATED));
    jset(&b, "started_at", col_text(st, JC_STARTED));
    jset(&b, "finished_at", col_text(st, JC_FINISHED));
    jset(&b, "updated_at", col_text(st, JC_UPDATED));
    if (b.oom || *malformed) {
        json_decref(b.obj);
        return NULL;
    }
    return b.obj;
}

static json_t *job_summary_row(sqlite3_stmt *st, bool *malformed)
{
    return job_from_row(st, false, malformed);
}

/* Appends the per-task results and per-layer sparsity of a job to obj. */
static top_status job_add_details(store *s, const char *id, json_t *obj, top_error *err)
{
    static const char *const sql[2] = {
        "SELECT task, dense_accuracy, pruned_accuracy, finetuned_accuracy "
        "FROM job_task_results WHERE job_id = ? ORDER BY task",
        "SELECT layer, weights, zeros FROM job_layer_sparsity WHERE job_id = ? ORDER BY rowid"};
    static const char *const keys[2] = {"task_results", "layers"};
    top_status rc = TOP_OK;
    for (int k = 0; k < 2 && rc == TOP_OK; k++) {
        sqlite3_stmt *st;
        json_t *arr = json_array();
        rc = arr ? prepare(s, sql[k], &st, err)
                 : top_error_set(err, TOP_ERR_NOMEM, "store: out of memory");
        if (rc != TOP_OK) {
            json_decref(arr);
            break;
        }
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        int step;
        bool oom = false;
        while (!oom && (step = sqlite3_step(st)) == SQLITE_ROW) {
            json_builder b = {json_object(), false};
            if (!b.obj) {
                oom = true;
                break;
            }
            jset(&b, k ? "layer" : "task", col_text(st, 0));
            if (k == 0) {
                jset(&b, "dense_accuracy", col_real(st, 1));
                jset(&b, "pruned_accuracy", col_real(st, 2));
                jset(&b, "finetuned_accuracy", col_real(st, 3));
            } else {
                int64_t w = sqlite3_column_int64(st, 1), z = sqlite3_column_int64(st, 2);
                jset(&b, "weights", json_integer(w));
                jset(&b, "zeros", json_integer(z));
                jset(&b, "sparsity", json_real(w > 0 ? (double)z / (double)w : 0.0));
            }
            oom = b.oom || json_array_append_new(arr, b.obj) != 0;
        }
        if (oom)
            rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory reading job %s", id);
        else if (step != SQLITE_DONE)
            rc = db_error(s, err, "read job details");
        sqlite3_finalize(st);
        if (rc == TOP_OK && json_object_set_new(obj, keys[k], arr) != 0)
            rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory reading job %s", id);
        else if (rc != TOP_OK)
            json_decref(arr);
    }
    return rc;
}

static top_status job_get_in_tx(store *s, const char *id, json_t **out, top_error *err)
{
    sqlite3_stmt *st;
    top_status rc = prepare(s, "SELECT " JOB_COLUMNS " FROM jobs WHERE id = ?", &st, err);
    if (rc != TOP_OK)
        return rc;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    json_t *job = NULL;
    bool malformed = false;
    int step = sqlite3_step(st);
    if (step == SQLITE_ROW) {
        job = job_from_row(st, true, &malformed);
        if (!job)
            rc = malformed ? top_error_set(err, TOP_ERR_FORMAT,
                                           "store: job %s holds malformed JSON", id)
                           : top_error_set(err, TOP_ERR_NOMEM, "store: out of memory");
    } else if (step == SQLITE_DONE) {
        rc = top_error_set(err, TOP_ERR_NOT_FOUND, "job %s not found", id);
    } else {
        rc = db_error(s, err, "read job");
    }
    sqlite3_finalize(st);
    if (rc == TOP_OK)
        rc = job_add_details(s, id, job, err);
    if (rc != TOP_OK) {
        json_decref(job);
        return rc;
    }
    *out = job;
    return TOP_OK;
}

top_status store_job_get(store *s, const char *id, json_t **out, top_error *err)
{
    *out = NULL;
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "job id is missing");
    top_status rc = tx_begin_read(s, err);
    if (rc != TOP_OK)
        return rc;
    rc = job_get_in_tx(s, id, out, err);
    sqlite3_exec(s->db, "COMMIT", NULL, NULL, NULL); /* ends a read; nothing to write */
    return rc;
}

top_status store_job_list(store *s, const store_job_query *q, json_t **out, top_error *err)
{
    *out = NULL;
    store_job_query none = {0};
    if (!q)
        q = &none;
    page_query pq = {
        .sql =
            "SELECT " JOB_COLUMNS " FROM jobs "
            "WHERE (?1 IS NULL OR status = ?1) AND (?2 IS NULL OR (created_at, id) < (?2, ?3)) "
            "ORDER BY created_at DESC, id DESC LIMIT ?4",
        .status = q->has_status ? store_job_status_str(q->status) : NULL,
        .cursor = q->cursor,
        .limit = q->limit,
        .key = "jobs",
        .row = job_summary_row,
    };
    if (q->has_status && (unsigned)q->status >= STORE_JOB_STATUS_COUNT)
        return top_error_set(err, TOP_ERR_INVALID, "unknown job status %d", (int)q->status);
    return list_page(s, &pq, out, err);
}

top_status store_job_counts(store *s, int64_t counts[STORE_JOB_STATUS_COUNT], top_error *err)
{
    for (int i = 0; i < STORE_JOB_STATUS_COUNT; i++)
        counts[i] = 0;
    sqlite3_stmt *st;
    top_status rc = prepare(s, "SELECT status, count(*) FROM jobs GROUP BY status", &st, err);
    if (rc != TOP_OK)
        return rc;
    int step;
    while ((step = sqlite3_step(st)) == SQLITE_ROW) {
        store_job_status status;
        if (store_job_status_parse((const char *)sqlite3_column_text(st, 0), &status) == 0)
            counts[status] = sqlite3_column_int64(st, 1);
    }
    if (step != SQLITE_DONE)
        rc = db_error(s, err, "count jobs");
    sqlite3_finalize(st);
    return rc;
}

/* ---- jobs: the state machine ---- */

static bool transition_is_legal(store_job_status from, store_job_status to)
{
    switch (from) {
    case STORE_JOB_QUEUED: return to == STORE_JOB_RUNNING || to == STORE_JOB_CANCELLED;
    case STORE_JOB_RUNNING:
        return to == STORE_JOB_SUCCEEDED || to == STORE_JOB_FAILED ||
               to == STORE_JOB_CANCELLED || to == STORE_JOB_QUEUED;
    default: return false;
    }
}

/* Reads a job's status; TOP_ERR_NOT_FOUND when it does not exist. */
static top_status job_status(store *s, const char *id, store_job_status *status, top_error *err)
{
    sqlite3_stmt *st;
    top_status rc = prepare(s, "SELECT status FROM jobs WHERE id = ?", &st, err);
    if (rc != TOP_OK)
        return rc;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    int step = sqlite3_step(st);
    if (step == SQLITE_ROW) {
        if (store_job_status_parse((const char *)sqlite3_column_text(st, 0), status) != 0)
            rc = top_error_set(err, TOP_ERR_FORMAT, "job %s has an unknown status", id);
    } else if (step == SQLITE_DONE) {
        rc = top_error_set(err, TOP_ERR_NOT_FOUND, "job %s not found", id);
    } else {
        rc = db_error(s, err, "read job status");
    }
    sqlite3_finalize(st);
    return rc;
}

/* The state machine's one UPDATE; runs inside the caller's write transaction. */
static top_status transition_in_tx(store *s, const char *id, store_job_status from,
                                   store_job_status to, top_error *err)
{
    if (!transition_is_legal(from, to))
        return top_error_set(err, TOP_ERR_STATE, "job %s: illegal transition from %s to %s", id,
                             store_job_status_str(from), store_job_status_str(to));
    sqlite3_stmt *st;
    top_status rc =
        prepare(s,
                "UPDATE jobs SET status = ?2, updated_at = ?4,"
                " started_at = CASE WHEN ?2 = 'running' THEN ?4 ELSE started_at END,"
                " finished_at = CASE WHEN ?2 IN ('succeeded', 'failed', 'cancelled') THEN ?4"
                "                    ELSE finished_at END,"
                " attempts = attempts + (?3 = 'running' AND ?2 = 'queued'),"
                " progress = CASE WHEN ?2 = 'queued' THEN 0 WHEN ?2 = 'succeeded' THEN 1"
                "                 ELSE progress END,"
                " stage = CASE WHEN ?2 = 'queued' THEN NULL ELSE stage END,"
                " eta_seconds = CASE WHEN ?2 = 'running' THEN eta_seconds ELSE NULL END"
                " WHERE id = ?1 AND status = ?3",
                &st, err);
    if (rc != TOP_OK)
        return rc;
    char now[LOG_TIME_MAX];
    now_text(s, now);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, store_job_status_str(to), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 3, store_job_status_str(from), -1, SQLITE_STATIC);
    sqlite3_bind_text(st, 4, now, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = db_error(s, err, "update job status");
    sqlite3_finalize(st);
    if (rc != TOP_OK || sqlite3_changes(s->db) == 1)
        return rc;

    /* No row matched: the job is missing or another caller moved it first. */
    store_job_status current;
    rc = job_status(s, id, &current, err);
    if (rc != TOP_OK)
        return rc;
    return top_error_set(err, TOP_ERR_STATE, "job %s is %s, not %s; it cannot move to %s", id,
                         store_job_status_str(current), store_job_status_str(from),
                         store_job_status_str(to));
}

top_status store_job_transition(store *s, const char *id, store_job_status from,
                                store_job_status to, top_error *err)
{
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "job id is missing");
    top_status rc = tx_begin(s, err);
    if (rc != TOP_OK)
        return rc;
    rc = transition_in_tx(s, id, from, to, err);
    return tx_end(s, rc, err);
}

/* ---- jobs: writing ---- */

/* Looks up a job by idempotency key and sets *found to whether it exists. */
static top_status find_by_key(store *s, const char *key, const char *request,
                              char id[STORE_ID_MAX], bool *found, top_error *err)
{
    sqlite3_stmt *st;
    top_status rc =
        prepare(s, "SELECT id, request FROM jobs WHERE idempotency_key = ?", &st, err);
    if (rc != TOP_OK)
        return rc;
    sqlite3_bind_text(st, 1, key, -1, SQLITE_TRANSIENT);
    *found = false;
    int step = sqlite3_step(st);
    if (step == SQLITE_ROW) {
        const char *existing_id = (const char *)sqlite3_column_text(st, 0);
        const char *existing_request = (const char *)sqlite3_column_text(st, 1);
        *found = true;
        snprintf(id, STORE_ID_MAX, "%s", existing_id ? existing_id : "");
        if (!existing_request || strcmp(existing_request, request) != 0)
            rc = top_error_set(err, TOP_ERR_STATE,
                               "idempotency key '%.64s' was already used by job %s with a "
                               "different request; use a new key",
                               key, id);
    } else if (step != SQLITE_DONE) {
        rc = db_error(s, err, "look up idempotency key");
    }
    sqlite3_finalize(st);
    return rc;
}

static top_status insert_job_row(store *s, const char *request, const char *key,
                                 char id[STORE_ID_MAX], top_error *err)
{
    top_status rc = store_new_id(id, "job_", err);
    sqlite3_stmt *st = NULL;
    if (rc == TOP_OK)
        rc = prepare(s,
                     "INSERT INTO jobs (id, status, request, idempotency_key, created_at, "
                     "updated_at) VALUES (?1, 'queued', ?2, ?3, ?4, ?4)",
                     &st, err);
    if (rc != TOP_OK)
        return rc;
    char now[LOG_TIME_MAX];
    now_text(s, now);
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    sqlite3_bind_text(st, 2, request, -1, SQLITE_TRANSIENT);
    bind_text_or_null(st, 3, key);
    sqlite3_bind_text(st, 4, now, -1, SQLITE_TRANSIENT);
    if (sqlite3_step(st) != SQLITE_DONE)
        rc = db_error(s, err, "insert job");
    sqlite3_finalize(st);
    return rc;
}

top_status store_job_insert(store *s, const json_t *request, const char *idempotency_key,
                            char id[STORE_ID_MAX], bool *existed, top_error *err)
{
    *existed = false;
    id[0] = '\0';
    if (!json_is_object(request))
        return top_error_set(err, TOP_ERR_INVALID, "job request must be a JSON object");
    if (idempotency_key &&
        (!*idempotency_key || strlen(idempotency_key) > STORE_IDEMPOTENCY_KEY_MAX))
        return top_error_set(err, TOP_ERR_INVALID,
                             "idempotency key of %zu bytes is out of range 1..%d",
                             strlen(idempotency_key), STORE_IDEMPOTENCY_KEY_MAX);
    char *text = json_dumps(request, JSON_COMPACT | JSON_SORT_KEYS);
    if (!text)
        return top_error_set(err, TOP_ERR_NOMEM, "store: out of memory serialising a request");

    top_status rc = tx_begin(s, err);
    if (rc == TOP_OK && idempotency_key)
        rc = find_by_key(s, idempotency_key, text, id, existed, err);
    if (rc == TOP_OK && !*existed)
        rc = insert_job_row(s, text, idempotency_key, id, err);
    rc = tx_end(s, rc, err);
    free(text);
    if (rc != TOP_OK && !*existed)
        id[0] = '\0';
    return rc;
}

top_status store_job_claim(store *s, json_t **out, top_error *err)
{
    *out = NULL;
    top_status rc = tx_begin(s, err);
    if (rc != TOP_OK)
        return rc;
    sqlite3_stmt *st;
    char id[STORE_ID_MAX] = "";
    rc = prepare(s,
                 "SELECT id FROM jobs WHERE status = 'queued' ORDER BY created_at, id LIMIT 1",
                 &st, err);
    if (rc == TOP_OK) {
        int step = sqlite3_step(st);
        if (step == SQLITE_ROW)
            snprintf(id, sizeof id, "%s", (const char *)sqlite3_column_text(st, 0));
        else if (step != SQLITE_DONE)
            rc = db_error(s, err, "find a queued job");
        sqlite3_finalize(st);
    }
    if (rc == TOP_OK && id[0])
        rc = transition_in_tx(s, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, err);
    if (rc == TOP_OK && id[0])
        rc = job_get_in_tx(s, id, out, err);
    rc = tx_end(s, rc, err);
    if (rc != TOP_OK) {
        json_decref(*out);
        *out = NULL;
    }
    return rc;
}

top_status store_job_progress(store *s, const char *id, const char *stage, double progress,
                              double eta_seconds, bool *cancel_requested, top_error *err)
{
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "job id is missing");
    if (isnan(progress))
        return top_error_set(err, TOP_ERR_INVALID, "job %s: progress is NaN", id);
    progress = fmax(0.0, fmin(progress, 1.0));
    top_status rc = tx_begin(s, err);
    sqlite3_stmt *st = NULL;
    if (rc == TOP_OK)
        rc = prepare(s,
                     "UPDATE jobs SET stage = coalesce(?2, stage), progress = ?3, "
                     "eta_seconds = ?4, updated_at = ?5 WHERE id = ?1 AND status = 'running' "
                     "RETURNING cancel_requested",
                     &st, err);
    if (rc == TOP_OK) {
        char now[LOG_TIME_MAX];
        now_text(s, now);
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        bind_text_or_null(st, 2, stage);
        sqlite3_bind_double(st, 3, progress);
        if (eta_seconds >= 0 && isfinite(eta_seconds))
            sqlite3_bind_double(st, 4, eta_seconds);
        else
            sqlite3_bind_null(st, 4);
        sqlite3_bind_text(st, 5, now, -1, SQLITE_TRANSIENT);
        int step = sqlite3_step(st);
        if (step == SQLITE_ROW) {
            if (cancel_requested)
                *cancel_requested = sqlite3_column_int(st, 0) != 0;
            step = sqlite3_step(st);
        } else if (step == SQLITE_DONE) {
            store_job_status current;
            sqlite3_finalize(st);
            st = NULL;
            rc = job_status(s, id, &current, err);
            if (rc == TOP_OK)
                rc = top_error_set(err, TOP_ERR_STATE,
                                   "job %s is %s; only a running job records progress", id,
                                   store_job_status_str(current));
        }
        if (rc == TOP_OK && step != SQLITE_DONE)
            rc = db_error(s, err, "update job progress");
    }
    sqlite3_finalize(st);
    return tx_end(s, rc, err);
}

top_status store_job_cancel(store *s, const char *id, store_job_status *status, top_error *err)
{
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "job id is missing");
    top_status rc = tx_begin(s, err);
    if (rc != TOP_OK)
        return rc;
    store_job_status current;
    rc = job_status(s, id, &current, err);
    if (rc == TOP_OK && current == STORE_JOB_QUEUED) {
        rc = transition_in_tx(s, id, STORE_JOB_QUEUED, STORE_JOB_CANCELLED, err);
        current = STORE_JOB_CANCELLED;
    } else if (rc == TOP_OK && current == STORE_JOB_RUNNING) {
        sqlite3_stmt *st;
        rc = prepare(s,
                     "UPDATE jobs SET cancel_requested = 1, updated_at = ?2 "
                     "WHERE id = ?1 AND status = 'running'",
                     &st, err);
        if (rc == TOP_OK) {
            char now[LOG_TIME_MAX];
            now_text(s, now);
            sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
            sqlite3_bind_text(st, 2, now, -1, SQLITE_TRANSIENT);
            if (sqlite3_step(st) != SQLITE_DONE)
                rc = db_error(s, err, "request cancel");
            sqlite3_finalize(st);
        }
    } else if (rc == TOP_OK) {
        rc =
            top_error_set(err, TOP_ERR_STATE,
                          "job %s is already %s; only a queued or running job can be cancelled",
                          id, store_job_status_str(current));
    }
    rc = tx_end(s, rc, err);
    if (rc == TOP_OK && status)
        *status = current;
    return rc;
}

static top_status check_outcome(const char *id, const store_job_outcome *o, top_error *err)
{
    const store_artifact *arts[2] = {&o->dense, &o->compressed};
    for (int i = 0; i < 2; i++)
        if (arts[i]->path && (!arts[i]->sha256 || !is_hex(arts[i]->sha256, 64) ||
                              arts[i]->size > (uint64_t)INT64_MAX))
            return top_error_set(err, TOP_ERR_INVALID,
                                 "job %s: %s artifact needs a sha256 of 64 lower-case hex "
                                 "digits and a size below 2^63",
                                 id, i ? "compressed" : "dense");
    if ((o->task_count && !o->tasks) || (o->layer_count && !o->layers))
        return top_error_set(err, TOP_ERR_INVALID, "job %s: outcome counts without arrays", id);
    for (size_t i = 0; i < o->task_count; i++)
        if (!o->tasks[i].task || !*o->tasks[i].task)
            return top_error_set(err, TOP_ERR_INVALID, "job %s: task result %zu has no name",
                                 id, i);
    for (size_t i = 0; i < o->layer_count; i++) {
        const store_layer_sparsity *l = &o->layers[i];
        if (!l->layer || l->weights < 0 || l->zeros < 0 || l->zeros > l->weights)
            return top_error_set(
                err, TOP_ERR_INVALID, "job %s: layer %zu ('%s') has zeros %lld outside 0..%lld",
                id, i, l->layer ? l->layer : "", (long long)l->zeros, (long long)l->weights);
    }
    if (o->result && !json_is_object(o->result))
        return top_error_set(err, TOP_ERR_INVALID, "job %s: result must be a JSON object", id);
    return TOP_OK;
}

static void bind_artifact(sqlite3_stmt *st, int first, const store_artifact *a)
{
    bind_text_or_null(st, first, a->path);
    if (a->path)
        sqlite3_bind_int64(st, first + 1, (sqlite3_int64)a->size);
    else
        sqlite3_bind_null(st, first + 1);
    bind_text_or_null(st, first + 2, a->path ? a->sha256 : NULL);
}

static void bind_accuracy(sqlite3_stmt *st, int i, double v)
{
    if (isfinite(v))
        sqlite3_bind_double(st, i, v);
    else
        sqlite3_bind_null(st, i);
}

static top_status write_outcome_rows(store *s, const char *id, const store_job_outcome *o,
                                     top_error *err)
{
    sqlite3_stmt *st;
    top_status rc = prepare(s,
                            "INSERT INTO job_task_results (job_id, task, dense_accuracy, "
                            "pruned_accuracy, finetuned_accuracy) VALUES (?, ?, ?, ?, ?)",
                            &st, err);
    for (size_t i = 0; rc == TOP_OK && i < o->task_count; i++) {
        sqlite3_reset(st);
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, o->tasks[i].task, -1, SQLITE_TRANSIENT);
        bind_accuracy(st, 3, o->tasks[i].dense_accuracy);
        bind_accuracy(st, 4, o->tasks[i].pruned_accuracy);
        bind_accuracy(st, 5, o->tasks[i].finetuned_accuracy);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "insert task result");
    }
    sqlite3_finalize(st);
    if (rc != TOP_OK)
        return rc;
    rc = prepare(s,
                 "INSERT INTO job_layer_sparsity (job_id, layer, weights, zeros) "
                 "VALUES (?, ?, ?, ?)",
                 &st, err);
    for (size_t i = 0; rc == TOP_OK && i < o->layer_count; i++) {
        sqlite3_reset(st);
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, o->layers[i].layer, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 3, o->layers[i].weights);
        sqlite3_bind_int64(st, 4, o->layers[i].zeros);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "insert layer sparsity");
    }
    sqlite3_finalize(st);
    return rc;
}

top_status store_job_succeed(store *s, const char *id, const store_job_outcome *outcome,
                             top_error *err)
{
    store_job_outcome none = {0};
    const store_job_outcome *o = outcome ? outcome : &none;
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "job id is missing");
    top_status rc = check_outcome(id, o, err);
    char *result = NULL;
    if (rc == TOP_OK && o->result &&
        !(result = json_dumps(o->result, JSON_COMPACT | JSON_SORT_KEYS)))
        rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory serialising job %s", id);
    if (rc == TOP_OK)
        rc = tx_begin(s, err);
    if (rc != TOP_OK) {
        free(result);
        return rc;
    }
    rc = transition_in_tx(s, id, STORE_JOB_RUNNING, STORE_JOB_SUCCEEDED, err);
    sqlite3_stmt *st = NULL;
    if (rc == TOP_OK)
        rc = prepare(s,
                     "UPDATE jobs SET result = ?2, dense_path = ?3, dense_size = ?4, "
                     "dense_sha256 = ?5, compressed_path = ?6, compressed_size = ?7, "
                     "compressed_sha256 = ?8, eta_seconds = NULL WHERE id = ?1",
                     &st, err);
    if (rc == TOP_OK) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        bind_text_or_null(st, 2, result);
        bind_artifact(st, 3, &o->dense);
        bind_artifact(st, 6, &o->compressed);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "record job result");
    }
    sqlite3_finalize(st);
    if (rc == TOP_OK)
        rc = write_outcome_rows(s, id, o, err);
    free(result);
    return tx_end(s, rc, err);
}

top_status store_job_fail(store *s, const char *id, const char *message, top_error *err)
{
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "job id is missing");
    top_status rc = tx_begin(s, err);
    if (rc != TOP_OK)
        return rc;
    rc = transition_in_tx(s, id, STORE_JOB_RUNNING, STORE_JOB_FAILED, err);
    sqlite3_stmt *st = NULL;
    if (rc == TOP_OK)
        rc = prepare(s, "UPDATE jobs SET error = substr(?2, 1, ?3) WHERE id = ?1", &st, err);
    if (rc == TOP_OK) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, message && *message ? message : "failed without a message", -1,
                          SQLITE_TRANSIENT);
        sqlite3_bind_int(st, 3, STORE_TEXT_MAX);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "record job error");
    }
    sqlite3_finalize(st);
    return tx_end(s, rc, err);
}

top_status store_job_delete(store *s, const char *id, json_t **artifact_paths, top_error *err)
{
    if (artifact_paths)
        *artifact_paths = NULL;
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "job id is missing");
    json_t *paths = json_array();
    if (!paths)
        return top_error_set(err, TOP_ERR_NOMEM, "store: out of memory");
    top_status rc = tx_begin(s, err);
    sqlite3_stmt *st = NULL;
    if (rc == TOP_OK)
        rc = prepare(s, "SELECT status, dense_path, compressed_path FROM jobs WHERE id = ?",
                     &st, err);
    if (rc == TOP_OK) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        int step = sqlite3_step(st);
        store_job_status status = STORE_JOB_QUEUED;
        if (step == SQLITE_DONE)
            rc = top_error_set(err, TOP_ERR_NOT_FOUND, "job %s not found", id);
        else if (step != SQLITE_ROW)
            rc = db_error(s, err, "read job");
        else if (store_job_status_parse((const char *)sqlite3_column_text(st, 0), &status) !=
                     0 ||
                 !store_job_status_is_final(status))
            rc =
                top_error_set(err, TOP_ERR_STATE,
                              "job %s is %s; cancel it and wait until it stops before deleting",
                              id, store_job_status_str(status));
        for (int c = 1; rc == TOP_OK && c <= 2; c++)
            if (sqlite3_column_type(st, c) != SQLITE_NULL &&
                json_array_append_new(paths, col_text(st, c)) != 0)
                rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory");
    }
    sqlite3_finalize(st);
    st = NULL;
    if (rc == TOP_OK)
        rc = prepare(s, "DELETE FROM jobs WHERE id = ?", &st, err);
    if (rc == TOP_OK) {
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "delete job");
    }
    sqlite3_finalize(st);
    rc = tx_end(s, rc, err);
    if (rc == TOP_OK && artifact_paths)
        *artifact_paths = paths;
    else
        json_decref(paths);
    return rc;
}

/* Collects the ids and attempts of running jobs into a JSON array of [id, attempts, cancel]. */
static top_status running_jobs(store *s, json_t **out, top_error *err)
{
    sqlite3_stmt *st;
    top_status rc = prepare(s,
                            "SELECT id, attempts, cancel_requested FROM jobs "
                            "WHERE status = 'running' ORDER BY created_at, id",
                            &st, err);
    if (rc != TOP_OK)
        return rc;
    json_t *arr = json_array();
    int step = SQLITE_DONE;
    while (arr && (step = sqlite3_step(st)) == SQLITE_ROW) {
        json_t *row =
            json_pack("[s,I,b]", (const char *)sqlite3_column_text(st, 0),
                      (json_int_t)sqlite3_column_int64(st, 1), sqlite3_column_int(st, 2) != 0);
        if (!row || json_array_append_new(arr, row) != 0) {
            json_decref(arr);
            arr = NULL;
        }
    }
    if (!arr)
        rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory during recovery");
    else if (step != SQLITE_DONE)
        rc = db_error(s, err, "find running jobs");
    sqlite3_finalize(st);
    if (rc != TOP_OK) {
        json_decref(arr);
        return rc;
    }
    *out = arr;
    return TOP_OK;
}

/* Fails one abandoned job: attempts + 1 and an error message with the reason. */
static top_status abandon_in_tx(store *s, const char *id, int64_t attempts, top_error *err)
{
    top_status rc = transition_in_tx(s, id, STORE_JOB_RUNNING, STORE_JOB_FAILED, err);
    sqlite3_stmt *st = NULL;
    if (rc == TOP_OK)
        rc = prepare(s, "UPDATE jobs SET attempts = attempts + 1, error = ?2 WHERE id = ?1",
                     &st, err);
    if (rc == TOP_OK) {
        char msg[160];
        snprintf(msg, sizeof msg,
                 "abandoned after %lld interrupted attempts: the server stopped while the job "
                 "ran; submit it again",
                 (long long)attempts + 1);
        sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, msg, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "record abandoned job");
    }
    sqlite3_finalize(st);
    return rc;
}

top_status store_jobs_recover(store *s, int max_attempts, size_t *requeued, size_t *failed,
                              top_error *err)
{
    size_t n_requeued = 0, n_failed = 0;
    if (max_attempts < 1)
        return top_error_set(err, TOP_ERR_INVALID, "max job attempts %d is below 1",
                             max_attempts);
    top_status rc = tx_begin(s, err);
    if (rc != TOP_OK)
        return rc;
    json_t *jobs = NULL;
    rc = running_jobs(s, &jobs, err);
    size_t i;
    json_t *row;
    json_array_foreach(jobs, i, row)
    {
        if (rc != TOP_OK)
            break;
        const char *id = json_string_value(json_array_get(row, 0));
        int64_t attempts = json_integer_value(json_array_get(row, 1));
        bool cancel = json_is_true(json_array_get(row, 2));
        if (cancel) {
            rc = transition_in_tx(s, id, STORE_JOB_RUNNING, STORE_JOB_CANCELLED, err);
        } else if (attempts + 1 >= max_attempts) {
            rc = abandon_in_tx(s, id, attempts, err);
            n_failed++;
        } else {
            rc = transition_in_tx(s, id, STORE_JOB_RUNNING, STORE_JOB_QUEUED, err);
            n_requeued++;
        }
        const char *action = cancel                         ? "cancelled"
                             : attempts + 1 >= max_attempts ? "failed"
                                                            : "requeued";
        if (rc == TOP_OK)
            log_warn("store", id, "recovered a job left running",
                     "action=%s attempts=%lld max_attempts=%d", action, (long long)attempts + 1,
                     max_attempts);
    }
    json_decref(jobs);
    rc = tx_end(s, rc, err);
    if (rc != TOP_OK)
        return rc;
    if (requeued)
        *requeued = n_requeued;
    if (failed)
        *failed = n_failed;
    return TOP_OK;
}

/* ---- models ---- */

#define MODEL_COLUMNS "id, uri, sha256, architecture, parameter_count, path, created_at"

static json_t *model_from_row(sqlite3_stmt *st, bool *malformed)
{
    (void)malformed;
    json_builder b = {json_object(), false};
    if (!b.obj)
        return NULL;
    jset(&b, "id", col_text(st, 0));
    jset(&b, "uri", col_text(st, 1));
    jset(&b, "sha256", col_text(st, 2));
    jset(&b, "architecture", col_text(st, 3));
    jset(&b, "parameter_count", json_integer(sqlite3_column_int64(st, 4)));
    jset(&b, "path", col_text(st, 5));
    jset(&b, "created_at", col_text(st, 6));
    if (b.oom) {
        json_decref(b.obj);
        return NULL;
    }
    return b.obj;
}

top_status store_model_insert(store *s, const store_model *m, char id[STORE_ID_MAX],
                              top_error *err)
{
    id[0] = '\0';
    if (!m || !m->uri || !*m->uri || !m->architecture || !*m->architecture)
        return top_error_set(err, TOP_ERR_INVALID, "a model needs a uri and an architecture");
    if (!m->sha256 || !is_hex(m->sha256, 64))
        return top_error_set(err, TOP_ERR_INVALID,
                             "model sha256 '%.80s' is not 64 lower-case hex digits",
                             m->sha256 ? m->sha256 : "");
    if (m->parameter_count < 0)
        return top_error_set(err, TOP_ERR_INVALID, "model parameter count %lld is negative",
                             (long long)m->parameter_count);
    char new_id[STORE_ID_MAX];
    top_status rc = store_new_id(new_id, "model_", err);
    if (rc == TOP_OK)
        rc = tx_begin(s, err);
    if (rc != TOP_OK)
        return rc;
    sqlite3_stmt *st;
    rc = prepare(s, "INSERT INTO models (" MODEL_COLUMNS ") VALUES (?, ?, ?, ?, ?, ?, ?)", &st,
                 err);
    if (rc == TOP_OK) {
        char now[LOG_TIME_MAX];
        now_text(s, now);
        sqlite3_bind_text(st, 1, new_id, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, m->uri, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, m->sha256, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 4, m->architecture, -1, SQLITE_TRANSIENT);
        sqlite3_bind_int64(st, 5, m->parameter_count);
        bind_text_or_null(st, 6, m->path);
        sqlite3_bind_text(st, 7, now, -1, SQLITE_TRANSIENT);
        if (sqlite3_step(st) != SQLITE_DONE)
            rc = db_error(s, err, "insert model");
        sqlite3_finalize(st);
    }
    rc = tx_end(s, rc, err);
    if (rc == TOP_OK)
        memcpy(id, new_id, STORE_ID_MAX);
    return rc;
}

/* Reads one row by id with sql (one ?), converting it with row. */
static top_status get_one(store *s, const char *sql, const char *what, const char *id,
                          row_to_json_fn row, json_t **out, top_error *err)
{
    *out = NULL;
    if (!id)
        return top_error_set(err, TOP_ERR_INVALID, "%s id is missing", what);
    sqlite3_stmt *st;
    top_status rc = prepare(s, sql, &st, err);
    if (rc != TOP_OK)
        return rc;
    sqlite3_bind_text(st, 1, id, -1, SQLITE_TRANSIENT);
    int step = sqlite3_step(st);
    bool malformed = false;
    if (step == SQLITE_ROW) {
        *out = row(st, &malformed);
        if (!*out)
            rc = malformed ? top_error_set(err, TOP_ERR_FORMAT, "%s %s holds malformed JSON",
                                           what, id)
                           : top_error_set(err, TOP_ERR_NOMEM, "store: out of memory");
    } else if (step == SQLITE_DONE) {
        rc = top_error_set(err, TOP_ERR_NOT_FOUND, "%s %s not found", what, id);
    } else {
        rc = db_error(s, err, what);
    }
    sqlite3_finalize(st);
    return rc;
}

top_status store_model_get(store *s, const char *id, json_t **out, top_error *err)
{
    return get_one(s, "SELECT " MODEL_COLUMNS " FROM models WHERE id = ?", "model", id,
                   model_from_row, out, err);
}

top_status store_model_list(store *s, const char *cursor, size_t limit, json_t **out,
                            top_error *err)
{
    *out = NULL;
    page_query pq = {
        .sql = "SELECT " MODEL_COLUMNS " FROM models "
               "WHERE (?2 IS NULL OR (created_at, id) < (?2, ?3)) "
               "ORDER BY created_at DESC, id DESC LIMIT ?4",
        .cursor = cursor,
        .limit = limit,
        .key = "models",
        .row = model_from_row,
    };
    return list_page(s, &pq, out, err);
}

/* ---- tasks ---- */

static json_t *task_from_row(sqlite3_stmt *st, bool *malformed)
{
    json_builder b = {json_object(), false};
    if (!b.obj)
        return NULL;
    jset(&b, "id", col_text(st, 0));
    jset(&b, "spec", col_json(st, 1, malformed));
    jset(&b, "created_at", col_text(st, 2));
    if (b.oom || *malformed) {
        json_decref(b.obj);
        return NULL;
    }
    return b.obj;
}

static bool task_id_is_valid(const char *id)
{
    size_t n = strlen(id);
    if (n == 0 || n >= STORE_ID_MAX)
        return false;
    for (size_t i = 0; i < n; i++) {
        char c = id[i];
        if (!((c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
              c == '_' || c == '.' || c == '-'))
            return false;
    }
    return true;
}

top_status store_task_insert(store *s, const char *id, const json_t *spec,
                             char id_out[STORE_ID_MAX], top_error *err)
{
    id_out[0] = '\0';
    if (id && !task_id_is_valid(id))
        return top_error_set(err, TOP_ERR_INVALID,
                             "task id '%.64s' must be 1..%d characters of A-Z a-z 0-9 _ . -",
                             id, STORE_ID_MAX - 1);
    if (!json_is_object(spec))
        return top_error_set(err, TOP_ERR_INVALID, "task spec must be a JSON object");
    char new_id[STORE_ID_MAX];
    top_status rc = id ? TOP_OK : store_new_id(new_id, "task_", err);
    if (id)
        snprintf(new_id, sizeof new_id, "%s", id);
    char *text = rc == TOP_OK ? json_dumps(spec, JSON_COMPACT | JSON_SORT_KEYS) : NULL;
    if (rc == TOP_OK && !text)
        rc = top_error_set(err, TOP_ERR_NOMEM, "store: out of memory serialising a task");
    if (rc == TOP_OK)
        rc = tx_begin(s, err);
    if (rc != TOP_OK) {
        free(text);
        return rc;
    }
    sqlite3_stmt *st;
    rc = prepare(s, "INSERT INTO tasks (id, spec, created_at) VALUES (?, ?, ?)", &st, err);
    if (rc == TOP_OK) {
        char now[LOG_TIME_MAX];
        now_text(s, now);
        sqlite3_bind_text(st, 1, new_id, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 2, text, -1, SQLITE_TRANSIENT);
        sqlite3_bind_text(st, 3, now, -1, SQLITE_TRANSIENT);
        int step = sqlite3_step(st);
        if (step == SQLITE_CONSTRAINT_PRIMARYKEY)
            rc = top_error_set(err, TOP_ERR_STATE, "task %s already exists; choose another id",
                               new_id);
        else if (step != SQLITE_DONE)
            rc = db_error(s, err, "insert task");
        sqlite3_finalize(st);
    }
    free(text);
    rc = tx_end(s, rc, err);
    if (rc == TOP_OK)
        memcpy(id_out, new_id, STORE_ID_MAX);
    return rc;
}

top_status store_task_get(store *s, const char *id, json_t **out, top_error *err)
{
    return get_one(s, "SELECT id, spec, created_at FROM tasks WHERE id = ?", "task", id,
                   task_from_row, out, err);
}

top_status store_task_list(store *s, const char *cursor, size_t limit, json_t **out,
                           top_error *err)
{
    *out = NULL;
    page_query pq = {
        .sql = "SELECT id, spec, created_at FROM tasks "
               "WHERE (?2 IS NULL OR (created_at, id) < (?2, ?3)) "
               "ORDER BY created_at DESC, id DESC LIMIT ?4",
        .cursor = cursor,
        .limit = limit,
        .key = "tasks",
        .row = task_from_row,
    };
    return list_page(s, &pq, out, err);
}
