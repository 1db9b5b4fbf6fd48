-- Least-privilege login role for the loader (ingest.py --no-bootstrap). Run as the owner of the
-- schema (the role that applied sql/schema.sql), connected to the loader's database, after
-- sql/schema.sql:
--
--   psql -v ingest_user=NAME -v ingest_password=SECRET -d DB -f sql/roles.sql
--
-- docker/initdb/010_ingest_schema_and_role.sh runs it on the container's first start.
-- Re-runnable: it creates the role if missing, (re)sets its password, and converges its grants to
-- exactly the list below (anything else granted earlier on these objects is revoked). It fails,
-- changing nothing, if the named role exists and is not a plain login role (superuser, owner of
-- anything, member of another role, ...). Roles are cluster-wide; the grants are per database.
--
-- What the loader may do, and why:
--   database   CONNECT, TEMPORARY   log in; it stages a file's rows in a temp table (ingest_stage)
--   public     USAGE                see the tables; no CREATE (revoked from PUBLIC, as PG >= 15 does)
--   raw_data   SELECT, INSERT,      COPY/INSERT ... ON CONFLICT need INSERT (+ SELECT for the
--              UPDATE               conflict target); UPDATE for --on-conflict update.
--                                   No DELETE, no TRUNCATE. TimescaleDB copies the hypertable's
--                                   grants to every chunk (existing and new), and creates new
--                                   chunks with the hypertable owner's rights: no CREATE needed.
--   ingest_runs, ingest_files   SELECT, INSERT, UPDATE   its run log and file manifest; the
--                                   identity column needs no sequence privilege for INSERT
--                                   (RETURNING run_id reads the column, hence SELECT)
--   ingest_run_keys   SELECT, INSERT, UPDATE, DELETE   per-run scratch keys, emptied by DELETE
--   _timescaledb_catalog, _timescaledb_functions, _timescaledb_config, _timescaledb_internal:
--              USAGE, which TimescaleDB grants to PUBLIC; every query on a hypertable needs it.
--              Not granted here (those schemas belong to the extension's owner), only checked.

\set ON_ERROR_STOP on
\set QUIET on

\if :{?ingest_user}
\else
DO $$ BEGIN RAISE EXCEPTION 'set the loader role: psql -v ingest_user=NAME -v ingest_password=SECRET -f sql/roles.sql'; END $$;
\endif
\if :{?ingest_password}
\else
DO $$ BEGIN RAISE EXCEPTION 'set the loader password: psql -v ingest_user=NAME -v ingest_password=SECRET -f sql/roles.sql'; END $$;
\endif
SELECT :'ingest_user' = '' OR :'ingest_password' = '' AS roles_sql_empty_setting \gset
\if :roles_sql_empty_setting
DO $$ BEGIN RAISE EXCEPTION 'ingest_user and ingest_password must not be empty'; END $$;
\endif

BEGIN;

-- Keep the password out of the server log where we may (these settings are superuser-only).
DO $$
BEGIN
    IF (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) THEN
        PERFORM set_config('log_statement', 'none', true);
        PERFORM set_config('log_min_duration_statement', '-1', true);
    END IF;
END
$$;

-- The role name reaches the DO blocks below through a transaction-local setting (psql does not
-- interpolate variables inside dollar quotes). The password never does.
SELECT set_config('roles_sql.ingest_user', :'ingest_user', true) AS roles_sql_ignored \gset

-- Refuse a role that is, or could act as, more than a plain loader. Checked before the password is
-- set, so a mistyped INGEST_DB_USER naming the owner never gets its password changed.
DO $$
DECLARE
    loader text := current_setting('roles_sql.ingest_user');
    r      pg_roles%ROWTYPE;
BEGIN
    IF loader = current_user OR loader = session_user THEN
        RAISE EXCEPTION 'ingest_user % is the role running this script; the loader needs a role of its own',
            quote_ident(loader);
    END IF;
    SELECT * INTO r FROM pg_roles WHERE rolname = loader;
    IF NOT FOUND THEN
        RETURN;  -- created below
    END IF;
    IF r.rolsuper OR r.rolcreaterole OR r.rolcreatedb OR r.rolreplication OR r.rolbypassrls THEN
        RAISE EXCEPTION 'role % has SUPERUSER, CREATEROLE, CREATEDB, REPLICATION or BYPASSRLS; the loader must not',
            quote_ident(loader);
    END IF;
    IF EXISTS (SELECT FROM pg_auth_members WHERE member = r.oid) THEN
        RAISE EXCEPTION 'role % is a member of other roles (and may use their privileges); the loader must not be',
            quote_ident(loader);
    END IF;
    -- Owner dependencies in any database (temporary objects record none).
    IF EXISTS (SELECT FROM pg_shdepend
               WHERE refclassid = 'pg_authid'::regclass AND refobjid = r.oid AND deptype = 'o') THEN
        RAISE EXCEPTION 'role % owns objects; the loader must own nothing',
            quote_ident(loader);
    END IF;
END
$$;

SELECT format('CREATE ROLE %I LOGIN', :'ingest_user')
WHERE NOT EXISTS (SELECT FROM pg_roles WHERE rolname = :'ingest_user') \gexec
-- Every run, so a changed password takes effect.
SELECT format('ALTER ROLE %I WITH LOGIN PASSWORD %L', :'ingest_user', :'ingest_password') \gexec

-- Nobody but the owner creates objects in public (PostgreSQL 15+ default; 14 grants it to PUBLIC).
REVOKE CREATE ON SCHEMA public FROM PUBLIC;

-- Converge: drop whatever the role had on these objects, then grant exactly the list.
SELECT format('REVOKE ALL ON DATABASE %I FROM %I', current_database(), :'ingest_user') \gexec
SELECT format('REVOKE ALL ON SCHEMA public FROM %I', :'ingest_user') \gexec
SELECT format('REVOKE ALL ON TABLE public.raw_data, public.ingest_runs, public.ingest_files, public.ingest_run_keys FROM %I',
              :'ingest_user') \gexec
SELECT format('REVOKE ALL ON SEQUENCE %s FROM %I', seq, :'ingest_user')
FROM pg_get_serial_sequence('public.ingest_runs', 'run_id') AS seq WHERE seq IS NOT NULL \gexec

SELECT format('GRANT CONNECT, TEMPORARY ON DATABASE %I TO %I', current_database(), :'ingest_user') \gexec
SELECT format('GRANT USAGE ON SCHEMA public TO %I', :'ingest_user') \gexec
SELECT format('GRANT SELECT, INSERT, UPDATE ON TABLE public.raw_data TO %I', :'ingest_user') \gexec
SELECT format('GRANT SELECT, INSERT, UPDATE ON TABLE public.ingest_runs, public.ingest_files TO %I',
              :'ingest_user') \gexec
SELECT format('GRANT SELECT, INSERT, UPDATE, DELETE ON TABLE public.ingest_run_keys TO %I',
              :'ingest_user') \gexec

-- Check the result, including what the role holds through PUBLIC, which the grants above cannot
-- see: fail (and roll everything back) rather than leave a loader that can do more, or less.
DO $$
DECLARE
    loader  text := current_setting('roles_sql.ingest_user');
    problem text;
BEGIN
    SELECT string_agg(p, '; ') INTO problem FROM (
        SELECT format('can %s %s', priv, obj) AS p
        FROM (VALUES ('public.raw_data', 'DELETE'), ('public.raw_data', 'TRUNCATE'),
                     ('public.raw_data', 'REFERENCES'), ('public.raw_data', 'TRIGGER'),
                     ('public.ingest_runs', 'DELETE'), ('public.ingest_runs', 'TRUNCATE'),
                     ('public.ingest_files', 'DELETE'), ('public.ingest_files', 'TRUNCATE'),
                     ('public.ingest_run_keys', 'TRUNCATE')) AS t(obj, priv)
        WHERE has_table_privilege(loader, obj, priv)
        UNION ALL
        SELECT format('can CREATE in schema %s', nspname)
        FROM pg_namespace
        WHERE (nspname = 'public' OR nspname LIKE '\_timescaledb%' OR nspname LIKE 'timescaledb%')
          AND has_schema_privilege(loader, oid, 'CREATE')
        UNION ALL
        SELECT format('lacks %s on database %s', priv, current_database())
        FROM unnest(ARRAY['CONNECT', 'TEMPORARY']) AS priv
        WHERE NOT has_database_privilege(loader, current_database(), priv)
        UNION ALL
        SELECT format('lacks USAGE on schema %s (TimescaleDB grants it to PUBLIC; as its owner: GRANT USAGE ON SCHEMA %s TO %s)',
                      s, s, quote_ident(loader))
        FROM unnest(ARRAY['_timescaledb_catalog', '_timescaledb_functions', '_timescaledb_config',
                          '_timescaledb_internal']) AS s
        WHERE to_regnamespace(s) IS NOT NULL AND NOT has_schema_privilege(loader, s, 'USAGE')
    ) AS problems;
    IF problem IS NOT NULL THEN
        RAISE EXCEPTION 'loader role % %', quote_ident(loader), problem;
    END IF;
END
$$;

COMMIT;

\echo sql/roles.sql: loader role :"ingest_user" ready in database :"DBNAME"
