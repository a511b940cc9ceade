/*
 * The SQLite job store on real database files in a temporary directory:
 * migrations from empty and from every earlier version, rejection of a newer
 * schema, every job transition (legal and illegal) and lost races,
 * idempotency keys, cursor pagination with equal timestamps, atomic claims
 * from two threads, crash recovery in a child process, deletes, models,
 * tasks, the busy timeout and the integrity check.
 */
#include <math.h>
#include <pthread.h>
#include <sqlite3.h>
#include <string.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "log.h"
#include "store.h"
#include "test.h"

static char tmp_dir[64];
static int db_counter;

/* A new database path in the temporary directory. */
static void new_db_path(char *buf, size_t size)
{
    snprintf(buf, size, "%s/store%d.db", tmp_dir, db_counter++);
}

static store *open_new(char *path, size_t size)
{
    new_db_path(path, size);
    store *s = NULL;
    top_error err = {0};
    top_status rc = store_open(&s, path, NULL, &err);
    CHECK_MSG(rc == TOP_OK, "store_open(%s) = %d: %s", path, rc, err.message);
    return s;
}

static int newest_version(void)
{
    size_t n;
    const store_migration *m = store_migrations(&n);
    return n ? m[n - 1].version : 0;
}

/* A string member, or "" when missing, so checks can strcmp it. */
static const char *jstr(const json_t *obj, const char *key)
{
    const char *v = json_string_value(json_object_get(obj, key));
    return v ? v : "";
}

static const char *jstr_at(const json_t *arr, size_t i)
{
    const char *v = json_string_value(json_array_get(arr, i));
    return v ? v : "";
}

static json_t *request_for(int i)
{
    return json_pack("{s:s, s:f, s:i}", "model", "model_x", "sparsity", 0.5, "seed", i);
}

static void insert_job(store *s, int i, char id[STORE_ID_MAX])
{
    json_t *req = request_for(i);
    bool existed = true;
    top_error err = {0};
    top_status rc = store_job_insert(s, req, NULL, id, &existed, &err);
    CHECK_MSG(rc == TOP_OK, "insert job %d: %s", i, err.message);
    CHECK(!existed);
    json_decref(req);
}

static const char *job_status_of(store *s, const char *id, json_t **job)
{
    top_error err = {0};
    if (store_job_get(s, id, job, &err) != TOP_OK) {
        TEST_FAIL_AT("get %s: %s", id, err.message);
        return "";
    }
    return json_string_value(json_object_get(*job, "status"));
}

static void check_status(store *s, const char *id, store_job_status want)
{
    json_t *job = NULL;
    const char *got = job_status_of(s, id, &job);
    CHECK_MSG(got && !strcmp(got, store_job_status_str(want)), "job %s is %s, expected %s", id,
              got ? got : "(null)", store_job_status_str(want));
    json_decref(job);
}

/* Drives a new job to the given status along legal moves. */
static void job_in_status(store *s, store_job_status status, char id[STORE_ID_MAX])
{
    insert_job(s, 1000 + (int)status, id);
    top_error err = {0};
    if (status == STORE_JOB_QUEUED)
        return;
    if (status == STORE_JOB_CANCELLED) {
        CHECK(store_job_transition(s, id, STORE_JOB_QUEUED, STORE_JOB_CANCELLED, &err) ==
              TOP_OK);
        return;
    }
    CHECK(store_job_transition(s, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, &err) == TOP_OK);
    if (status != STORE_JOB_RUNNING)
        CHECK(store_job_transition(s, id, STORE_JOB_RUNNING, status, &err) == TOP_OK);
    CHECK_MSG(err.status == TOP_OK, "driving %s to %s: %s", id, store_job_status_str(status),
              err.message);
}

static int count_rows(const char *path, const char *sql)
{
    sqlite3 *db;
    int n = -1;
    if (sqlite3_open(path, &db) == SQLITE_OK) {
        sqlite3_stmt *st;
        if (sqlite3_prepare_v2(db, sql, -1, &st, NULL) == SQLITE_OK) {
            if (sqlite3_step(st) == SQLITE_ROW)
                n = sqlite3_column_int(st, 0);
            sqlite3_finalize(st);
        }
    }
    sqlite3_close(db);
    return n;
}

/* ---- migrations ---- */

static void test_migrate_from_empty(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    int version = -1;
    top_error err = {0};
    CHECK(store_schema_version(s, &version, &err) == TOP_OK);
    CHECK_INT_EQ(version, newest_version());
    CHECK(newest_version() >= 2);
    store_close(s);
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM schema_migrations"), newest_version());
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM schema_migrations WHERE "
                                  "applied_at LIKE '____-__-__T__:__:__.___Z'"),
                 newest_version());
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM sqlite_master WHERE name IN "
                                  "('jobs', 'models', 'tasks', 'job_task_results', "
                                  "'job_layer_sparsity')"),
                 5);

    /* Reopening applies nothing twice. */
    err = (top_error){0};
    CHECK(store_open(&s, path, NULL, &err) == TOP_OK);
    store_close(s);
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM schema_migrations"), newest_version());
}

static void test_migrate_from_each_version(void)
{
    for (int v = 1; v < newest_version(); v++) {
        char path[128], id[STORE_ID_MAX];
        new_db_path(path, sizeof path);
        store *s = NULL;
        top_error err = {0};
        store_options opts = {.max_version = v};
        CHECK_MSG(store_open(&s, path, &opts, &err) == TOP_OK, "open at v%d: %s", v,
                  err.message);
        if (!s)
            continue;
        int version = -1;
        CHECK(store_schema_version(s, &version, &err) == TOP_OK);
        CHECK_INT_EQ(version, v);
        insert_job(s, v, id); /* a row written under the old schema */
        store_close(s);

        CHECK_MSG(store_open(&s, path, NULL, &err) == TOP_OK, "reopen from v%d: %s", v,
                  err.message);
        if (!s)
            continue;
        CHECK(store_schema_version(s, &version, &err) == TOP_OK);
        CHECK_INT_EQ(version, newest_version());
        check_status(s, id, STORE_JOB_QUEUED);
        CHECK(store_integrity_check(s, &err) == TOP_OK);
        store_close(s);
    }
}

static void test_future_version_rejected(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    store_close(s);
    sqlite3 *db;
    CHECK(sqlite3_open(path, &db) == SQLITE_OK);
    char sql[160];
    snprintf(sql, sizeof sql,
             "INSERT INTO schema_migrations VALUES (%d, 'from_the_future', "
             "'2099-01-01T00:00:00.000Z')",
             newest_version() + 1);
    CHECK(sqlite3_exec(db, sql, NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(db);

    top_error err = {0};
    s = (store *)1;
    CHECK_INT_EQ(store_open(&s, path, NULL, &err), TOP_ERR_UNSUPPORTED);
    CHECK(s == NULL);
    CHECK_MSG(strstr(err.message, "newer") != NULL, "message: %s", err.message);
    char version[16];
    snprintf(version, sizeof version, "%d", newest_version() + 1);
    CHECK_MSG(strstr(err.message, version) != NULL, "message lacks %s: %s", version,
              err.message);
}

static void test_renamed_migration_rejected(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    store_close(s);
    sqlite3 *db;
    CHECK(sqlite3_open(path, &db) == SQLITE_OK);
    CHECK(sqlite3_exec(db, "UPDATE schema_migrations SET name = 'other' WHERE version = 1",
                       NULL, NULL, NULL) == SQLITE_OK);
    sqlite3_close(db);
    top_error err = {0};
    CHECK_INT_EQ(store_open(&s, path, NULL, &err), TOP_ERR_UNSUPPORTED);
    CHECK_MSG(strstr(err.message, "'other'") != NULL, "message: %s", err.message);
}

static void test_open_bad_path(void)
{
    store *s = NULL;
    top_error err = {0};
    CHECK_INT_EQ(store_open(&s, "/nonexistent-dir/x/y.db", NULL, &err), TOP_ERR_IO);
    CHECK_MSG(strstr(err.message, "/nonexistent-dir/x/y.db") != NULL, "message: %s",
              err.message);
    err = (top_error){0};
    CHECK_INT_EQ(store_open(&s, "", NULL, &err), TOP_ERR_INVALID);
}

/* ---- the state machine ---- */

static void test_every_transition(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    int legal = 0;
    for (int from = 0; from < STORE_JOB_STATUS_COUNT; from++)
        for (int to = 0; to < STORE_JOB_STATUS_COUNT; to++) {
            char id[STORE_ID_MAX];
            job_in_status(s, (store_job_status)from, id);
            bool want_ok = (from == STORE_JOB_QUEUED &&
                            (to == STORE_JOB_RUNNING || to == STORE_JOB_CANCELLED)) ||
                           (from == STORE_JOB_RUNNING &&
                            (to == STORE_JOB_SUCCEEDED || to == STORE_JOB_FAILED ||
                             to == STORE_JOB_CANCELLED || to == STORE_JOB_QUEUED));
            top_error err = {0};
            top_status rc =
                store_job_transition(s, id, (store_job_status)from, (store_job_status)to, &err);
            CHECK_MSG(rc == (want_ok ? TOP_OK : TOP_ERR_STATE), "%s -> %s returned %d (%s)",
                      store_job_status_str((store_job_status)from),
                      store_job_status_str((store_job_status)to), rc, err.message);
            check_status(s, id, want_ok ? (store_job_status)to : (store_job_status)from);
            legal += want_ok;
            if (!want_ok)
                CHECK_MSG(strstr(err.message, id) != NULL, "message lacks the id: %s",
                          err.message);
        }
    CHECK_INT_EQ(legal, 6);
    store_close(s);
}

static void test_transition_fields(void)
{
    char path[128], id[STORE_ID_MAX];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    top_error err = {0};
    insert_job(s, 1, id);
    json_t *job = NULL;
    job_status_of(s, id, &job);
    CHECK(json_is_null(json_object_get(job, "started_at")));
    CHECK_INT_EQ(json_integer_value(json_object_get(job, "attempts")), 0);
    json_decref(job);

    CHECK(store_job_transition(s, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, &err) == TOP_OK);
    CHECK(store_job_progress(s, id, "calibration", 0.4, 12.5, NULL, &err) == TOP_OK);
    CHECK(store_job_transition(s, id, STORE_JOB_RUNNING, STORE_JOB_QUEUED, &err) == TOP_OK);
    job_status_of(s, id, &job);
    CHECK_INT_EQ(json_integer_value(json_object_get(job, "attempts")), 1);
    CHECK_CLOSE(json_real_value(json_object_get(job, "progress")), 0.0, 0.0);
    CHECK(json_is_null(json_object_get(job, "stage")));
    CHECK(json_is_null(json_object_get(job, "finished_at")));
    json_decref(job);

    CHECK(store_job_transition(s, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, &err) == TOP_OK);
    CHECK(store_job_fail(s, id, "model file is truncated", &err) == TOP_OK);
    job_status_of(s, id, &job);
    CHECK(json_is_string(json_object_get(job, "started_at")));
    CHECK(json_is_string(json_object_get(job, "finished_at")));
    CHECK(json_is_string(json_object_get(job, "request")) == 0);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(job, "request"), "seed")),
                 1);
    CHECK_MSG(!strcmp(jstr(job, "error"), "model file is truncated"), "error: %s",
              json_string_value(json_object_get(job, "error")));
    json_decref(job);
    CHECK(err.status == TOP_OK);

    /* A missing job is not found, not a state error. */
    err = (top_error){0};
    CHECK_INT_EQ(store_job_transition(s, "job_0000000000000000", STORE_JOB_QUEUED,
                                      STORE_JOB_RUNNING, &err),
                 TOP_ERR_NOT_FOUND);
    store_close(s);
}

static void test_lost_race_is_state_error(void)
{
    char path[128], id[STORE_ID_MAX];
    store *a = open_new(path, sizeof path);
    store *b = NULL;
    top_error err = {0};
    CHECK(store_open(&b, path, NULL, &err) == TOP_OK);
    if (!a || !b)
        return;
    insert_job(a, 1, id);
    CHECK(store_job_transition(a, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, &err) == TOP_OK);
    /* b still believes the job is queued. */
    CHECK_INT_EQ(store_job_transition(b, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, &err),
                 TOP_ERR_STATE);
    CHECK_MSG(strstr(err.message, id) && strstr(err.message, "is running") &&
                  strstr(err.message, "not queued"),
              "message: %s", err.message);

    /* The worker finishes while the API cancels: the cancel after the finish loses. */
    err = (top_error){0};
    CHECK(store_job_succeed(a, id, NULL, &err) == TOP_OK);
    CHECK_INT_EQ(store_job_transition(b, id, STORE_JOB_RUNNING, STORE_JOB_CANCELLED, &err),
                 TOP_ERR_STATE);
    CHECK_MSG(strstr(err.message, "succeeded") != NULL, "message: %s", err.message);
    check_status(b, id, STORE_JOB_SUCCEEDED);
    store_close(a);
    store_close(b);
}

/* ---- inserts, progress, cancel, results ---- */

static void test_idempotency_key(void)
{
    char path[128], id1[STORE_ID_MAX], id2[STORE_ID_MAX];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    top_error err = {0};
    bool existed = true;
    json_t *req = request_for(7);
    CHECK(store_job_insert(s, req, "key-1", id1, &existed, &err) == TOP_OK);
    CHECK(!existed);
    CHECK(strncmp(id1, "job_", 4) == 0);
    CHECK_INT_EQ(strlen(id1), 20);

    /* The same request with keys in another order is the same request. */
    json_t *same = json_pack("{s:i, s:f, s:s}", "seed", 7, "sparsity", 0.5, "model", "model_x");
    CHECK(store_job_insert(s, same, "key-1", id2, &existed, &err) == TOP_OK);
    CHECK(existed);
    CHECK_MSG(!strcmp(id1, id2), "retried key returned %s, first job is %s", id2, id1);

    json_t *other = request_for(8);
    CHECK_INT_EQ(store_job_insert(s, other, "key-1", id2, &existed, &err), TOP_ERR_STATE);
    CHECK_MSG(strstr(err.message, "key-1") && strstr(err.message, id1), "message: %s",
              err.message);

    /* Without a key every insert is a new job. */
    err = (top_error){0};
    CHECK(store_job_insert(s, req, NULL, id2, &existed, &err) == TOP_OK);
    CHECK(!existed);
    CHECK(strcmp(id1, id2) != 0);
    int64_t counts[STORE_JOB_STATUS_COUNT];
    CHECK(store_job_counts(s, counts, &err) == TOP_OK);
    CHECK_INT_EQ(counts[STORE_JOB_QUEUED], 2);

    json_t *array = json_array();
    CHECK_INT_EQ(store_job_insert(s, array, NULL, id2, &existed, &err), TOP_ERR_INVALID);
    json_decref(array);
    json_decref(req);
    json_decref(same);
    json_decref(other);
    store_close(s);
}

static void test_progress_and_cancel(void)
{
    char path[128], id[STORE_ID_MAX], queued[STORE_ID_MAX];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    top_error err = {0};
    insert_job(s, 1, id);
    CHECK_INT_EQ(store_job_progress(s, id, "x", 0.1, 1, NULL, &err), TOP_ERR_STATE);
    err = (top_error){0};
    CHECK(store_job_transition(s, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, &err) == TOP_OK);
    bool cancel = true;
    CHECK(store_job_progress(s, id, "saliency", 1.7, -1, &cancel, &err) == TOP_OK);
    CHECK(!cancel);
    json_t *job = NULL;
    job_status_of(s, id, &job);
    CHECK_CLOSE(json_real_value(json_object_get(job, "progress")), 1.0, 0.0); /* clamped */
    CHECK(json_is_null(json_object_get(job, "eta_seconds")));
    CHECK(!strcmp(jstr(job, "stage"), "saliency"));
    json_decref(job);

    store_job_status after;
    CHECK(store_job_cancel(s, id, &after, &err) == TOP_OK);
    CHECK_INT_EQ(after, STORE_JOB_RUNNING);
    CHECK(store_job_progress(s, id, NULL, 0.5, 3.0, &cancel, &err) == TOP_OK);
    CHECK(cancel);
    job_status_of(s, id, &job);
    CHECK(!strcmp(jstr(job, "stage"), "saliency"));
    CHECK_CLOSE(json_real_value(json_object_get(job, "eta_seconds")), 3.0, 0.0);
    json_decref(job);
    CHECK(store_job_transition(s, id, STORE_JOB_RUNNING, STORE_JOB_CANCELLED, &err) == TOP_OK);
    CHECK_INT_EQ(store_job_cancel(s, id, &after, &err), TOP_ERR_STATE);

    err = (top_error){0};
    insert_job(s, 2, queued);
    CHECK(store_job_cancel(s, queued, &after, &err) == TOP_OK);
    CHECK_INT_EQ(after, STORE_JOB_CANCELLED);
    check_status(s, queued, STORE_JOB_CANCELLED);
    CHECK_INT_EQ(store_job_cancel(s, "job_ffffffffffffffff", &after, &err), TOP_ERR_NOT_FOUND);
    store_close(s);
}

static void test_succeed_records_outcome(void)
{
    char path[128], id[STORE_ID_MAX];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    top_error err = {0};
    insert_job(s, 1, id);
    CHECK(store_job_transition(s, id, STORE_JOB_QUEUED, STORE_JOB_RUNNING, &err) == TOP_OK);
    const char *sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    store_task_result tasks[2] = {{"digits", 0.98, 0.95, NAN}, {"flowers", 0.80, 0.61, 0.75}};
    store_layer_sparsity layers[2] = {{"conv1.weight", 864, 432}, {"fc.weight", 1000, 900}};
    json_t *report = json_pack("{s:f}", "sparsity", 0.6);
    store_job_outcome o = {report,
                           {"/a/dense.safetensors", 1234, sha},
                           {"/a/compressed.safetensors", 99, sha},
                           tasks,
                           2,
                           layers,
                           2};

    /* A bad digest is rejected before anything is written. */
    store_job_outcome bad = o;
    bad.dense.sha256 = "XYZ";
    CHECK_INT_EQ(store_job_succeed(s, id, &bad, &err), TOP_ERR_INVALID);
    check_status(s, id, STORE_JOB_RUNNING);
    err = (top_error){0};

    CHECK_MSG(store_job_succeed(s, id, &o, &err) == TOP_OK, "succeed: %s", err.message);
    json_t *job = NULL;
    job_status_of(s, id, &job);
    json_t *dense = json_object_get(json_object_get(job, "artifacts"), "dense");
    CHECK_INT_EQ(json_integer_value(json_object_get(dense, "size")), 1234);
    CHECK(!strcmp(jstr(dense, "sha256"), sha));
    CHECK_CLOSE(json_real_value(json_object_get(json_object_get(job, "result"), "sparsity")),
                0.6, 1e-12);
    json_t *results = json_object_get(job, "task_results");
    CHECK_INT_EQ(json_array_size(results), 2);
    json_t *digits = json_array_get(results, 0);
    CHECK(!strcmp(jstr(digits, "task"), "digits"));
    CHECK_CLOSE(json_real_value(json_object_get(digits, "pruned_accuracy")), 0.95, 1e-12);
    CHECK(json_is_null(json_object_get(digits, "finetuned_accuracy")));
    json_t *layer_rows = json_object_get(job, "layers");
    CHECK_INT_EQ(json_array_size(layer_rows), 2);
    CHECK_CLOSE(json_real_value(json_object_get(json_array_get(layer_rows, 1), "sparsity")),
                0.9, 1e-12);
    CHECK_CLOSE(json_real_value(json_object_get(job, "progress")), 1.0, 0.0);
    json_decref(job);
    json_decref(report);
    store_close(s);
}

/* ---- listing ---- */

typedef struct fixed_clock {
    int64_t ms;
    int calls;
} fixed_clock;

/* Advances one millisecond every fourth call, so groups of jobs share a timestamp. */
static int64_t step_clock(void *ctx)
{
    fixed_clock *c = ctx;
    return c->ms + (c->calls++ / 4);
}

static void test_pagination(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    fixed_clock clock = {1733350000000, 0};
    store_set_clock(s, step_clock, &clock);
    enum { N = 23 };
    char ids[N][STORE_ID_MAX];
    for (int i = 0; i < N; i++)
        insert_job(s, i, ids[i]);
    top_error err = {0};
    CHECK(store_job_transition(s, ids[3], STORE_JOB_QUEUED, STORE_JOB_CANCELLED, &err) ==
          TOP_OK);

    char seen[N][STORE_ID_MAX];
    char prev_created[LOG_TIME_MAX] = "9999", prev_id[STORE_ID_MAX] = "job_~";
    int total = 0, pages = 0;
    char *cursor = NULL;
    for (;;) {
        json_t *page = NULL;
        store_job_query q = {.cursor = cursor, .limit = 5};
        CHECK_MSG(store_job_list(s, &q, &page, &err) == TOP_OK, "list: %s", err.message);
        free(cursor);
        cursor = NULL;
        if (!page)
            break;
        pages++;
        size_t i;
        json_t *job;
        json_array_foreach(json_object_get(page, "jobs"), i, job)
        {
            const char *c = json_string_value(json_object_get(job, "created_at"));
            const char *id = json_string_value(json_object_get(job, "id"));
            int order = strcmp(c, prev_created);
            CHECK_MSG(order < 0 || (order == 0 && strcmp(id, prev_id) < 0),
                      "(%s, %s) does not follow (%s, %s)", c, id, prev_created, prev_id);
            CHECK(json_object_get(job, "request") == NULL);
            snprintf(prev_created, sizeof prev_created, "%s", c);
            snprintf(prev_id, sizeof prev_id, "%s", id);
            if (total < N)
                snprintf(seen[total], STORE_ID_MAX, "%s", id);
            total++;
        }
        json_t *next = json_object_get(page, "next_cursor");
        if (json_is_string(next))
            cursor = strdup(json_string_value(next));
        json_decref(page);
        if (!cursor || pages > N)
            break;
    }
    CHECK_INT_EQ(total, N);
    CHECK_INT_EQ(pages, (N + 4) / 5);
    for (int i = 0; i < N && i < total; i++) {
        int found = 0;
        for (int j = 0; j < total && j < N; j++)
            found += !strcmp(ids[i], seen[j]);
        CHECK_MSG(found == 1, "job %s seen %d times", ids[i], found);
    }

    /* Status filter and the limit cap. */
    json_t *page = NULL;
    store_job_query q = {.has_status = true, .status = STORE_JOB_CANCELLED};
    CHECK(store_job_list(s, &q, &page, &err) == TOP_OK);
    CHECK_INT_EQ(json_array_size(json_object_get(page, "jobs")), 1);
    CHECK(json_is_null(json_object_get(page, "next_cursor")));
    json_decref(page);
    q = (store_job_query){.limit = 100000};
    CHECK(store_job_list(s, &q, &page, &err) == TOP_OK);
    CHECK_INT_EQ(json_array_size(json_object_get(page, "jobs")), N);
    json_decref(page);

    q = (store_job_query){.cursor = "zz"};
    CHECK_INT_EQ(store_job_list(s, &q, &page, &err), TOP_ERR_INVALID);
    CHECK(page == NULL);
    store_close(s);
}

/* ---- claims from two threads ---- */

enum { CLAIM_JOBS = 200 };

static pthread_barrier_t claim_start;

typedef struct claimer {
    const char *path;
    char ids[CLAIM_JOBS][STORE_ID_MAX];
    int count;
    int errors;
} claimer;

static void *claim_all(void *arg)
{
    claimer *c = arg;
    store *s = NULL;
    top_error err = {0};
    store_options opts = {.busy_timeout_ms = 10000};
    top_status rc = store_open(&s, c->path, &opts, &err);
    pthread_barrier_wait(&claim_start);
    if (rc != TOP_OK) {
        c->errors++;
        return NULL;
    }
    for (;;) {
        json_t *job = NULL;
        top_error e = {0};
        if (store_job_claim(s, &job, &e) != TOP_OK) {
            c->errors++;
            break;
        }
        if (!job)
            break;
        if (c->count < CLAIM_JOBS)
            snprintf(c->ids[c->count], STORE_ID_MAX, "%s",
                     json_string_value(json_object_get(job, "id")));
        c->count++;
        json_decref(job);
        /* A short pause, as a worker would take, lets the other thread in between claims. */
        struct timespec pause = {0, 500000};
        nanosleep(&pause, NULL);
    }
    store_close(s);
    return NULL;
}

static void test_claim_two_threads(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    char ids[CLAIM_JOBS][STORE_ID_MAX];
    for (int i = 0; i < CLAIM_JOBS; i++)
        insert_job(s, i, ids[i]);
    store_close(s);

    static claimer c[2];
    memset(c, 0, sizeof c);
    pthread_t t[2];
    pthread_barrier_init(&claim_start, NULL, 2);
    for (int i = 0; i < 2; i++) {
        c[i].path = path;
        CHECK(pthread_create(&t[i], NULL, claim_all, &c[i]) == 0);
    }
    for (int i = 0; i < 2; i++)
        pthread_join(t[i], NULL);
    pthread_barrier_destroy(&claim_start);
    CHECK_INT_EQ(c[0].errors + c[1].errors, 0);
    CHECK_INT_EQ(c[0].count + c[1].count, CLAIM_JOBS);
    for (int i = 0; i < CLAIM_JOBS; i++) {
        int found = 0;
        for (int k = 0; k < 2; k++)
            for (int j = 0; j < c[k].count && j < CLAIM_JOBS; j++)
                found += !strcmp(ids[i], c[k].ids[j]);
        CHECK_MSG(found == 1, "job %s claimed %d times", ids[i], found);
    }
    printf("  claims split %d / %d between the threads\n", c[0].count, c[1].count);
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM jobs WHERE status = 'running'"),
                 CLAIM_JOBS);
}

static void test_claim_oldest_first(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    fixed_clock clock = {1733350000000, 0};
    store_set_clock(s, step_clock, &clock);
    char ids[6][STORE_ID_MAX];
    for (int i = 0; i < 6; i++) {
        clock.calls = i * 4; /* one millisecond apart */
        insert_job(s, i, ids[i]);
    }
    top_error err = {0};
    for (int i = 0; i < 6; i++) {
        json_t *job = NULL;
        CHECK(store_job_claim(s, &job, &err) == TOP_OK);
        const char *id = json_string_value(json_object_get(job, "id"));
        CHECK_MSG(id && !strcmp(id, ids[i]), "claim %d got %s, expected %s", i, id ? id : "-",
                  ids[i]);
        CHECK(!strcmp(jstr(job, "status"), "running"));
        json_decref(job);
    }
    json_t *none = (json_t *)1;
    CHECK(store_job_claim(s, &none, &err) == TOP_OK);
    CHECK(none == NULL);
    store_close(s);
}

/* ---- crash recovery ---- */

/* A child process claims n jobs and exits without finishing or closing anything. */
static void crash_while_running(const char *path, int n)
{
    fflush(NULL);
    pid_t pid = fork();
    if (pid == 0) {
        store *s = NULL;
        if (store_open(&s, path, NULL, NULL) != TOP_OK)
            _exit(3);
        for (int i = 0; i < n; i++) {
            json_t *job = NULL;
            if (store_job_claim(s, &job, NULL) != TOP_OK || !job)
                _exit(4);
            json_decref(job);
        }
        _exit(0);
    }
    int status = 0;
    CHECK(pid > 0 && waitpid(pid, &status, 0) == pid);
    CHECK_MSG(WIFEXITED(status) && WEXITSTATUS(status) == 0, "child exit status %d", status);
}

static void recover(const char *path, int max_attempts, size_t want_requeued,
                    size_t want_failed)
{
    store *s = NULL;
    top_error err = {0};
    CHECK_MSG(store_open(&s, path, NULL, &err) == TOP_OK, "reopen: %s", err.message);
    if (!s)
        return;
    size_t requeued = 99, failed = 99;
    CHECK(store_jobs_recover(s, max_attempts, &requeued, &failed, &err) == TOP_OK);
    CHECK_INT_EQ(requeued, want_requeued);
    CHECK_INT_EQ(failed, want_failed);
    CHECK(store_integrity_check(s, &err) == TOP_OK);
    store_close(s);
}

static void test_recover_after_crash(void)
{
    char path[128], id[STORE_ID_MAX], other[STORE_ID_MAX];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    insert_job(s, 1, id);
    store_close(s);

    /* max_attempts = 3: the job runs at most three times. */
    for (int round = 1; round <= 3; round++) {
        crash_while_running(path, 1);
        CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM jobs WHERE status = 'running'"), 1);
        recover(path, 3, round < 3 ? 1 : 0, round < 3 ? 0 : 1);
    }
    top_error err = {0};
    CHECK(store_open(&s, path, NULL, &err) == TOP_OK);
    if (!s)
        return;
    json_t *job = NULL;
    CHECK(!strcmp(job_status_of(s, id, &job), "failed"));
    CHECK_INT_EQ(json_integer_value(json_object_get(job, "attempts")), 3);
    CHECK_MSG(strstr(jstr(job, "error"), "3 interrupted"), "error: %s",
              json_string_value(json_object_get(job, "error")));
    json_decref(job);

    /* A running job with a cancel request is cancelled, not re-run. */
    insert_job(s, 2, other);
    store_job_status after;
    json_t *claimed = NULL;
    CHECK(store_job_claim(s, &claimed, &err) == TOP_OK);
    json_decref(claimed);
    CHECK(store_job_cancel(s, other, &after, &err) == TOP_OK);
    store_close(s);
    recover(path, 3, 0, 0);
    CHECK(store_open(&s, path, NULL, &err) == TOP_OK);
    check_status(s, other, STORE_JOB_CANCELLED);
    CHECK_INT_EQ(store_jobs_recover(s, 0, NULL, NULL, &err), TOP_ERR_INVALID);
    store_close(s);
}

/* ---- deletes, counts, models, tasks ---- */

static void test_delete_only_finished(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    top_error err = {0};
    for (int st = 0; st < STORE_JOB_STATUS_COUNT; st++) {
        char id[STORE_ID_MAX];
        job_in_status(s, (store_job_status)st, id);
        json_t *paths = NULL;
        top_status rc = store_job_delete(s, id, &paths, &err);
        bool final = store_job_status_is_final((store_job_status)st);
        CHECK_MSG(rc == (final ? TOP_OK : TOP_ERR_STATE), "delete %s job returned %d",
                  store_job_status_str((store_job_status)st), rc);
        CHECK(final ? json_is_array(paths) : paths == NULL);
        json_decref(paths);
        json_t *job = NULL;
        rc = store_job_get(s, id, &job, &err);
        CHECK_INT_EQ(rc, final ? TOP_ERR_NOT_FOUND : TOP_OK);
        json_decref(job);
        err = (top_error){0};
    }

    /* Deleting a succeeded job returns its artifacts and drops its results. */
    char id[STORE_ID_MAX];
    job_in_status(s, STORE_JOB_RUNNING, id);
    const char *sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    store_task_result task = {"digits", 0.9, 0.8, 0.85};
    store_job_outcome o = {NULL, {"/a/d", 1, sha}, {"/a/c", 2, sha}, &task, 1, NULL, 0};
    CHECK(store_job_succeed(s, id, &o, &err) == TOP_OK);
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM job_task_results"), 1);
    json_t *paths = NULL;
    CHECK(store_job_delete(s, id, &paths, &err) == TOP_OK);
    CHECK_INT_EQ(json_array_size(paths), 2);
    CHECK(!strcmp(jstr_at(paths, 0), "/a/d"));
    CHECK(!strcmp(jstr_at(paths, 1), "/a/c"));
    json_decref(paths);
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM job_task_results"), 0);
    CHECK_INT_EQ(store_job_delete(s, id, NULL, &err), TOP_ERR_NOT_FOUND);
    store_close(s);
}

static void test_counts(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    int want[STORE_JOB_STATUS_COUNT] = {3, 2, 1, 0, 4};
    for (int st = 0; st < STORE_JOB_STATUS_COUNT; st++)
        for (int k = 0; k < want[st]; k++) {
            char id[STORE_ID_MAX];
            job_in_status(s, (store_job_status)st, id);
        }
    int64_t counts[STORE_JOB_STATUS_COUNT];
    top_error err = {0};
    CHECK(store_job_counts(s, counts, &err) == TOP_OK);
    for (int st = 0; st < STORE_JOB_STATUS_COUNT; st++)
        CHECK_MSG(counts[st] == want[st], "%s: %lld, expected %d",
                  store_job_status_str((store_job_status)st), (long long)counts[st], want[st]);
    store_close(s);
}

static void test_models_and_tasks(void)
{
    char path[128], id[STORE_ID_MAX], id2[STORE_ID_MAX];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    top_error err = {0};
    const char *sha = "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855";
    store_model m = {"file:///models/mnv2/model.json", sha, "mobilenet_v2", 2585349, NULL};
    CHECK(store_model_insert(s, &m, id, &err) == TOP_OK);
    CHECK(strncmp(id, "model_", 6) == 0);
    m.path = "/var/lib/topiary/models/x";
    CHECK(store_model_insert(s, &m, id2, &err) == TOP_OK);
    json_t *model = NULL;
    CHECK(store_model_get(s, id, &model, &err) == TOP_OK);
    CHECK_INT_EQ(json_integer_value(json_object_get(model, "parameter_count")), 2585349);
    CHECK(json_is_null(json_object_get(model, "path")));
    json_decref(model);
    json_t *page = NULL;
    CHECK(store_model_list(s, NULL, 1, &page, &err) == TOP_OK);
    CHECK_INT_EQ(json_array_size(json_object_get(page, "models")), 1);
    CHECK(json_is_string(json_object_get(page, "next_cursor")));
    json_t *second = NULL;
    CHECK(store_model_list(s, json_string_value(json_object_get(page, "next_cursor")), 1,
                           &second, &err) == TOP_OK);
    CHECK_INT_EQ(json_array_size(json_object_get(second, "models")), 1);
    CHECK(json_is_null(json_object_get(second, "next_cursor")));
    json_decref(page);
    json_decref(second);
    m.sha256 = "abc";
    CHECK_INT_EQ(store_model_insert(s, &m, id2, &err), TOP_ERR_INVALID);
    err = (top_error){0};
    CHECK_INT_EQ(store_model_get(s, "model_nope", &model, &err), TOP_ERR_NOT_FOUND);

    err = (top_error){0};
    json_t *spec = json_pack("{s:s, s:i}", "dataset", "digits", "classes", 10);
    CHECK(store_task_insert(s, "digits", spec, id, &err) == TOP_OK);
    CHECK(!strcmp(id, "digits"));
    CHECK_INT_EQ(store_task_insert(s, "digits", spec, id, &err), TOP_ERR_STATE);
    err = (top_error){0};
    CHECK_INT_EQ(store_task_insert(s, "bad id", spec, id, &err), TOP_ERR_INVALID);
    err = (top_error){0};
    CHECK(store_task_insert(s, NULL, spec, id2, &err) == TOP_OK);
    CHECK(strncmp(id2, "task_", 5) == 0);
    json_t *task = NULL;
    CHECK(store_task_get(s, "digits", &task, &err) == TOP_OK);
    CHECK_INT_EQ(json_integer_value(json_object_get(json_object_get(task, "spec"), "classes")),
                 10);
    json_decref(task);
    CHECK(store_task_list(s, NULL, 0, &page, &err) == TOP_OK);
    CHECK_INT_EQ(json_array_size(json_object_get(page, "tasks")), 2);
    json_decref(page);
    json_decref(spec);
    store_close(s);
}

/* ---- locks and integrity ---- */

static void test_busy_timeout_is_bounded(void)
{
    char path[128], id[STORE_ID_MAX];
    store *s = open_new(path, sizeof path);
    store_close(s);
    sqlite3 *holder;
    CHECK(sqlite3_open(path, &holder) == SQLITE_OK);
    CHECK(sqlite3_exec(holder, "BEGIN IMMEDIATE", NULL, NULL, NULL) == SQLITE_OK);

    store_options opts = {.busy_timeout_ms = 50, .busy_retries = 2};
    top_error err = {0};
    CHECK(store_open(&s, path, &opts, &err) == TOP_OK);
    if (s) {
        int64_t t0 = log_now_ms();
        json_t *req = request_for(1);
        bool existed;
        CHECK_INT_EQ(store_job_insert(s, req, NULL, id, &existed, &err), TOP_ERR_LIMIT);
        int64_t elapsed = log_now_ms() - t0;
        CHECK_MSG(elapsed >= 50 && elapsed < 2000, "gave up after %lld ms", (long long)elapsed);
        CHECK_MSG(strstr(err.message, "50 ms") != NULL, "message: %s", err.message);
        /* Reads still work while another connection writes (WAL). */
        json_t *page = NULL;
        err = (top_error){0};
        CHECK(store_job_list(s, NULL, &page, &err) == TOP_OK);
        json_decref(page);
        sqlite3_exec(holder, "ROLLBACK", NULL, NULL, NULL);
        CHECK(store_job_insert(s, req, NULL, id, &existed, &err) == TOP_OK);
        json_decref(req);
        store_close(s);
    }
    sqlite3_close(holder);
}

static void test_integrity_check(void)
{
    char path[128];
    store *s = open_new(path, sizeof path);
    if (!s)
        return;
    top_error err = {0};
    CHECK(store_integrity_check(s, &err) == TOP_OK);
    CHECK_INT_EQ(count_rows(path, "SELECT count(*) FROM pragma_journal_mode WHERE "
                                  "journal_mode = 'wal'"),
                 1);
    store_close(s);
}

static void remove_tmp_dir(void)
{
    char cmd[128];
    snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmp_dir);
    if (system(cmd) != 0)
        fprintf(stderr, "could not remove %s\n", tmp_dir);
}

int main(void)
{
    snprintf(tmp_dir, sizeof tmp_dir, "/tmp/topiary-store-XXXXXX");
    if (!mkdtemp(tmp_dir)) {
        perror("mkdtemp");
        return 1;
    }
    log_init(LOG_ERROR, LOG_FORMAT_TEXT); /* recovery warnings are expected here */
    TEST_RUN(test_migrate_from_empty);
    TEST_RUN(test_migrate_from_each_version);
    TEST_RUN(test_future_version_rejected);
    TEST_RUN(test_renamed_migration_rejected);
    TEST_RUN(test_open_bad_path);
    TEST_RUN(test_every_transition);
    TEST_RUN(test_transition_fields);
    TEST_RUN(test_lost_race_is_state_error);
    TEST_RUN(test_idempotency_key);
    TEST_RUN(test_progress_and_cancel);
    TEST_RUN(test_succeed_records_outcome);
    TEST_RUN(test_pagination);
    TEST_RUN(test_claim_two_threads);
    TEST_RUN(test_claim_oldest_first);
    TEST_RUN(test_recover_after_crash);
    TEST_RUN(test_delete_only_finished);
    TEST_RUN(test_counts);
    TEST_RUN(test_models_and_tasks);
    TEST_RUN(test_busy_timeout_is_bounded);
    TEST_RUN(test_integrity_check);
    remove_tmp_dir();
    return TEST_FINISH();
}
