-- Per-layer sparsity of a finished job, one row per pruned parameter tensor,
-- so that the API can list it without parsing the result report.

CREATE TABLE job_layer_sparsity (
    job_id  TEXT NOT NULL REFERENCES jobs (id) ON DELETE CASCADE,
    layer   TEXT NOT NULL,
    weights INTEGER NOT NULL CHECK (weights >= 0),
    zeros   INTEGER NOT NULL CHECK (zeros >= 0 AND zeros <= weights),
    PRIMARY KEY (job_id, layer)
);
