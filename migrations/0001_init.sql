-- Initial schema: models, tasks, jobs and per-task results.
-- Times are RFC 3339 UTC strings with milliseconds, so text order is time order.
-- schema_migrations itself is created by the store before any migration runs.

CREATE TABLE models (
    id              TEXT PRIMARY KEY,
    uri             TEXT NOT NULL,
    sha256          TEXT NOT NULL CHECK (length(sha256) = 64),
    architecture    TEXT NOT NULL,
    parameter_count INTEGER NOT NULL CHECK (parameter_count >= 0),
    path            TEXT,
    created_at      TEXT NOT NULL
);
CREATE INDEX models_by_created ON models (created_at, id);

CREATE TABLE tasks (
    id         TEXT PRIMARY KEY,
    spec       TEXT NOT NULL CHECK (json_valid(spec)),
    created_at TEXT NOT NULL
);
CREATE INDEX tasks_by_created ON tasks (created_at, id);

CREATE TABLE jobs (
    id                TEXT PRIMARY KEY,
    status            TEXT NOT NULL
                      CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    stage             TEXT,
    progress          REAL NOT NULL DEFAULT 0 CHECK (progress >= 0 AND progress <= 1),
    eta_seconds       REAL,
    request           TEXT NOT NULL CHECK (json_valid(request)),
    idempotency_key   TEXT UNIQUE,
    attempts          INTEGER NOT NULL DEFAULT 0 CHECK (attempts >= 0),
    error             TEXT,
    cancel_requested  INTEGER NOT NULL DEFAULT 0 CHECK (cancel_requested IN (0, 1)),
    result            TEXT CHECK (result IS NULL OR json_valid(result)),
    dense_path        TEXT,
    dense_size        INTEGER,
    dense_sha256      TEXT,
    compressed_path   TEXT,
    compressed_size   INTEGER,
    compressed_sha256 TEXT,
    created_at        TEXT NOT NULL,
    started_at        TEXT,
    finished_at       TEXT,
    updated_at        TEXT NOT NULL
);
CREATE INDEX jobs_by_created ON jobs (created_at, id);
CREATE INDEX jobs_by_status ON jobs (status, created_at, id);

CREATE TABLE job_task_results (
    job_id             TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    task               TEXT NOT NULL,
    dense_accuracy     REAL,
    pruned_accuracy    REAL,
    finetuned_accuracy REAL,
    PRIMARY KEY (job_id, task)
);
