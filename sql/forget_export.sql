-- Forget one export's rows, so that it can be loaded again with the right settings (a wrong
-- --user-id or --source-timezone): run as the table's owner (the loader's role cannot delete).
--
--   psql -v user_id=takeout-wrong -v data_dir=/data -v path_prefix=Takeout/ -f sql/forget_export.sql
--
-- Deletes, in one transaction, the rows of public.raw_data stored under user_id, and the manifest
-- rows (public.ingest_files) of the files under data_dir whose path starts with path_prefix; prints
-- how many of each. Then run the loader with the right settings. See docs/operations.md, "Loaded
-- with the wrong settings".
\set ON_ERROR_STOP on
\if :{?user_id}
\else
\echo 'set the user id whose rows go: psql -v user_id=... -v data_dir=... -v path_prefix=... -f sql/forget_export.sql'
\quit
\endif
\if :{?data_dir}
\else
\echo 'set the data directory (as the loader resolves DATA_DIR): -v data_dir=/data'
\quit
\endif
\if :{?path_prefix}
\else
\echo 'set the files (their path under data_dir starts with it; '''' for all): -v path_prefix=Takeout/'
\quit
\endif
BEGIN;
WITH gone AS (DELETE FROM public.raw_data WHERE user_id = :'user_id' RETURNING 1)
SELECT count(*) AS rows_deleted FROM gone;
WITH gone AS (
    DELETE FROM public.ingest_files
    WHERE data_dir = :'data_dir' AND left(path, length(:'path_prefix')) = :'path_prefix'
    RETURNING 1
)
SELECT count(*) AS manifest_rows_deleted FROM gone;
COMMIT;
