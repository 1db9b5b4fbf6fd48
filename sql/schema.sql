-- Schema of the Fitbit ingestion pipeline. Applied by ingest.py at every start (unless
-- --no-bootstrap), so every statement is idempotent; ingest.py runs the whole file in one
-- transaction under an advisory lock, so two loaders starting at once apply it one after the other.
--
-- Contract with downstream readers (API, aggregation jobs): the table raw_data and its columns
-- user_id, metric, "timestamp", value keep these names and types.
--
-- Every table is named with its schema, public: a search_path that puts another schema first
-- (ALTER DATABASE ... SET search_path = reporting, public) can neither hide these tables behind
-- someone else's nor make this file skip them because a table of that name exists elsewhere.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE IF NOT EXISTS public.raw_data (
    user_id     TEXT             NOT NULL,
    metric      TEXT             NOT NULL,
    "timestamp" TIMESTAMPTZ      NOT NULL,
    value       DOUBLE PRECISION NOT NULL,
    PRIMARY KEY (user_id, metric, "timestamp")
);

-- A raw_data left by an older loader may lack the key that ON CONFLICT relies on: add it
-- (this fails, with PostgreSQL's own message naming the duplicate, if that table holds duplicates).
DO $$
BEGIN
    IF NOT EXISTS (
        SELECT 1
        FROM pg_index i
        WHERE i.indrelid = 'public.raw_data'::regclass
          AND i.indisunique
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
               FROM unnest(i.indkey) AS k(attnum)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
              = ARRAY['metric', 'timestamp', 'user_id']
    ) THEN
        IF EXISTS (SELECT 1 FROM pg_index WHERE indrelid = 'public.raw_data'::regclass AND indisprimary) THEN
            -- Another primary key (an id column, say): the key goes in as a unique index.
            CREATE UNIQUE INDEX raw_data_user_id_metric_timestamp_key ON public.raw_data (user_id, metric, "timestamp");
        ELSE
            ALTER TABLE public.raw_data ADD PRIMARY KEY (user_id, metric, "timestamp");
        END IF;
    END IF;
END
$$;

-- Chunk interval: one day. Task-0 writes one reading per second per user for heart rate
-- (86,400 rows a user a day; the other metrics are sparser), about 140 bytes a row with the
-- primary-key index, so one day is ~12 MB per user: a chunk for a few hundred users stays well
-- inside shared_buffers, which is TimescaleDB's sizing rule (the chunks being written, with their
-- indexes, should fit in ~25% of memory). Downstream jobs aggregate per day, so a day-query
-- touches one chunk. With thousands of users, shorten it: SELECT set_chunk_time_interval(...).
-- migrate_data converts a plain raw_data that already holds rows instead of failing.
SELECT create_hypertable(
    'public.raw_data', 'timestamp',
    chunk_time_interval => INTERVAL '1 day',
    if_not_exists => TRUE,
    migrate_data => TRUE
);

-- ---------------------------------------------------------------------------------------------
-- Bookkeeping of the loader itself (not part of the downstream contract).
-- ---------------------------------------------------------------------------------------------

-- One row per run: what each cron run did. A running run touches heartbeat_at between files (at
-- most every 30 s); a run killed before it could finish stays 'running' until a later run finds
-- its heartbeat older than 15 minutes and marks it 'interrupted'. (No session-level lock: the
-- loader keeps no state beyond its own transactions, so it works through a pooler.)
CREATE TABLE IF NOT EXISTS public.ingest_runs (
    run_id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    started_at       TIMESTAMPTZ NOT NULL DEFAULT now(),
    finished_at      TIMESTAMPTZ,
    status           TEXT        NOT NULL DEFAULT 'running',
    host             TEXT        NOT NULL,
    pid              INTEGER     NOT NULL,
    version          TEXT        NOT NULL,
    data_dir         TEXT        NOT NULL,
    on_conflict      TEXT        NOT NULL,
    files_seen       BIGINT      NOT NULL DEFAULT 0,
    files_loaded     BIGINT      NOT NULL DEFAULT 0,
    files_skipped    BIGINT      NOT NULL DEFAULT 0,
    files_failed     BIGINT      NOT NULL DEFAULT 0,
    records_read     BIGINT      NOT NULL DEFAULT 0,
    records_rejected BIGINT      NOT NULL DEFAULT 0,
    rows_inserted    BIGINT      NOT NULL DEFAULT 0,
    rows_updated     BIGINT      NOT NULL DEFAULT 0,
    rows_duplicate   BIGINT      NOT NULL DEFAULT 0,
    error            TEXT
);
ALTER TABLE public.ingest_runs ADD COLUMN IF NOT EXISTS heartbeat_at TIMESTAMPTZ;

-- The file manifest: one row per file (its DATA_DIR, and its path relative to it, both escaped), written in the same
-- transaction as the file's rows; a loader claims a file by locking its row. status: 'loaded';
-- 'failed' (its bytes cannot be read as records: skipped while unchanged); 'error' (the
-- environment failed it: permissions, I/O, a database refusal: tried again every run); 'partial'
-- (a file spanning many chunks, committed up to record records_done: resumed there); 'new' exists
-- only inside the transaction that claims a file for the first time. A 'loaded' or 'failed' file
-- whose size and modification time (or, when only the time changed, content hash) match its row
-- is skipped without being parsed.
CREATE TABLE IF NOT EXISTS public.ingest_files (
    data_dir         TEXT        NOT NULL DEFAULT '',
    path             TEXT        NOT NULL,
    size             BIGINT      NOT NULL,
    mtime_ns         BIGINT      NOT NULL,
    sha256           TEXT,
    status           TEXT        NOT NULL CHECK (status IN ('new', 'loaded', 'failed', 'error', 'partial')),
    records_read     BIGINT      NOT NULL DEFAULT 0,
    records_rejected BIGINT      NOT NULL DEFAULT 0,
    rows_inserted    BIGINT      NOT NULL DEFAULT 0,
    rows_updated     BIGINT      NOT NULL DEFAULT 0,
    rows_duplicate   BIGINT      NOT NULL DEFAULT 0,
    error            TEXT,
    loaded_at        TIMESTAMPTZ NOT NULL DEFAULT now(),
    run_id           BIGINT      REFERENCES public.ingest_runs (run_id) ON DELETE SET NULL,
    PRIMARY KEY (data_dir, path)
);
ALTER TABLE public.ingest_files ADD COLUMN IF NOT EXISTS records_done BIGINT NOT NULL DEFAULT 0;
-- The settings that shaped a file's rows (user id, time zone, format), to tell a re-run with
-- other ones that they differ.
ALTER TABLE public.ingest_files ADD COLUMN IF NOT EXISTS settings TEXT;
-- A file is known by its data directory and its path in it: two directories holding the same
-- names (two users, two cron jobs) never share a row. A manifest keyed by the path alone (before
-- 0.3) is keyed again, each row under the data directory of the run that wrote it.
ALTER TABLE public.ingest_files ADD COLUMN IF NOT EXISTS data_dir TEXT NOT NULL DEFAULT '';
DO $$
BEGIN
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conrelid = 'public.ingest_files'::regclass
                   AND contype = 'p' AND pg_get_constraintdef(oid) LIKE '%data_dir%') THEN
        UPDATE public.ingest_files f SET data_dir = r.data_dir
        FROM public.ingest_runs r WHERE f.data_dir = '' AND f.run_id = r.run_id;
        ALTER TABLE public.ingest_files DROP CONSTRAINT IF EXISTS ingest_files_pkey;
        ALTER TABLE public.ingest_files ADD PRIMARY KEY (data_dir, path);
    END IF;
END
$$;
DO $$
BEGIN
    -- A manifest made by version 0.1 allows only 'loaded' and 'failed'.
    IF NOT EXISTS (SELECT 1 FROM pg_constraint WHERE conname = 'ingest_files_status_check'
                   AND conrelid = 'public.ingest_files'::regclass
                   AND pg_get_constraintdef(oid) LIKE '%partial%') THEN
        ALTER TABLE public.ingest_files DROP CONSTRAINT IF EXISTS ingest_files_status_check;
        ALTER TABLE public.ingest_files ADD CONSTRAINT ingest_files_status_check
            CHECK (status IN ('new', 'loaded', 'failed', 'error', 'partial'));
    END IF;
END
$$;

-- Keys written during a run in --on-conflict update mode, so that a later file of the same run
-- does not overwrite a key an earlier file set (first in order wins in both modes). Unlogged and
-- emptied at the end of each run: it is scratch space, not history.
CREATE UNLOGGED TABLE IF NOT EXISTS public.ingest_run_keys (
    run_id      BIGINT      NOT NULL,
    user_id     TEXT        NOT NULL,
    metric      TEXT        NOT NULL,
    "timestamp" TIMESTAMPTZ NOT NULL,
    PRIMARY KEY (run_id, user_id, metric, "timestamp")
);
