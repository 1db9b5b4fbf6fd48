#!/usr/bin/env bash
# First-start bootstrap of the TimescaleDB container, mounted by docker-compose.yml as
# /docker-entrypoint-initdb.d/010_ingest_schema_and_role.sh (next to the image's own 000_/001_
# scripts, which install TimescaleDB). The postgres entrypoint runs it once, on an empty data
# volume, as POSTGRES_USER (the database owner) against POSTGRES_DB:
#   1. sql/schema.sql, in one transaction (the loader itself runs with --no-bootstrap);
#   2. sql/roles.sql: the loader's login role INGEST_DB_USER / INGEST_DB_PASSWORD and its grants.
# Both are idempotent, so on an existing volume (or after changing either file, or the password)
# run it again by hand: docker-compose exec timescaledb /docker-entrypoint-initdb.d/010_ingest_schema_and_role.sh
#
# SQL_DIR (default /sql, the read-only mount of ./sql) and the libpq PG* variables may be set to
# run it elsewhere; tests/test_privileges.py does so against the local database.
#
# Works executed or sourced (the entrypoint sources scripts that lack the execute bit): the body
# runs in a subshell, so its shell options and exits stay its own.
(
    set -euo pipefail

    sql_dir=${SQL_DIR:-/sql}
    fail() { printf '%s: error: %s\n' "${BASH_SOURCE[0]##*/}" "$*" >&2; exit 1; }

    [[ -n ${POSTGRES_USER:-} && -n ${POSTGRES_DB:-} ]] || fail "POSTGRES_USER and POSTGRES_DB must be set"
    [[ -n ${INGEST_DB_USER:-} ]] || fail "INGEST_DB_USER is not set (the loader's login role; see .env.example)"
    [[ -n ${INGEST_DB_PASSWORD:-} ]] || fail "INGEST_DB_PASSWORD is not set (see .env.example)"
    [[ $INGEST_DB_USER != "$POSTGRES_USER" ]] ||
        fail "INGEST_DB_USER must differ from POSTGRES_USER (the owner); the loader needs a role of its own"
    [[ -r $sql_dir/schema.sql && -r $sql_dir/roles.sql ]] ||
        fail "$sql_dir/schema.sql and $sql_dir/roles.sql must be readable (is ./sql mounted at $sql_dir?)"

    psql_owner() {
        psql -X -v ON_ERROR_STOP=1 --no-password --username "$POSTGRES_USER" --dbname "$POSTGRES_DB" "$@"
    }

    PGOPTIONS='-c client_min_messages=warning' psql_owner --single-transaction --quiet \
        --output /dev/null --file "$sql_dir/schema.sql"

    # The password goes to psql through its environment (a backquoted command psql runs), not
    # its command line, which `ps` would show. Same variables as `psql -v ingest_user=...
    # -v ingest_password=... -f sql/roles.sql`; roles.sql quotes both (format %I / %L).
    export INGEST_DB_PASSWORD
    psql_owner -v ingest_user="$INGEST_DB_USER" <<EOF
\\set ingest_password \`printf '%s' "\$INGEST_DB_PASSWORD"\`
\\i '$sql_dir/roles.sql'
EOF
)
