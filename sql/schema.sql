-- Schema of the Fitbit ingestion pipeline. Applied by ingest.py at every start (unless
-- --no-bootstrap), so every statement is idempotent; ingest.py runs the whole file in one
-- transaction under an advisory lock, so two loaders starting at once apply it one after the other.
--
-- Contract with downstream readers (API, aggregation jobs): the table raw_data and its columns
-- user_id, metric, "timestamp", value keep these names and types.

CREATE EXTENSION IF NOT EXISTS timescaledb;

CREATE TABLE IF NOT EXISTS raw_data (
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
        WHERE i.indrelid = 'raw_data'::regclass
          AND i.indisunique
          AND (SELECT array_agg(a.attname::text ORDER BY a.attname)
               FROM unnest(i.indkey) AS k(attnum)
               JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum)
              = ARRAY['metric', 'timestamp', 'user_id']
    ) THEN
        ALTER TABLE raw_data ADD PRIMARY KEY (user_id, metric, "timestamp");
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
    'raw_data', 'timestamp',
    chunk_time_interval => INTERVAL '1 day',
    if_not_exists => TRUE,
    migrate_data => TRUE
);
