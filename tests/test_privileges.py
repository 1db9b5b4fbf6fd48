"""Least privilege: the loader as the role sql/roles.sql makes (docker-compose's `ingestion` service).

Each test applies sql/roles.sql to a fresh test database for a throwaway role, with the real psql,
either directly (`psql -v ingest_user=... -v ingest_password=... -f sql/roles.sql`, the documented
use outside Docker) or through docker/initdb/010_ingest_schema_and_role.sh, the script the
TimescaleDB container runs on its first start. Then it runs ``ingest.main`` as that role.

Roles are cluster-wide: each test makes its own uniquely named one and drops it afterwards, which
needs CREATEROLE for the dev role (scripts/dev-db.sh grants it).
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
import uuid
from dataclasses import dataclass

import psycopg2
import pytest
from psycopg2 import errors, sql

from tests.conftest import ROOT, SETTINGS, connect, rec

ROLES_SQL = ROOT / "sql" / "roles.sql"
INIT_SCRIPT = ROOT / "docker" / "initdb" / "010_ingest_schema_and_role.sh"
TABLES = ("raw_data", "ingest_runs", "ingest_files", "ingest_run_keys")
TIMESCALE_SCHEMAS = ("_timescaledb_catalog", "_timescaledb_functions", "_timescaledb_config",
                     "_timescaledb_internal")


def _find_psql() -> str | None:
    found = shutil.which("psql")
    if found:
        return found
    candidates = sorted(glob.glob("/usr/lib/postgresql/*/bin/psql"))
    return candidates[-1] if candidates else None


PSQL = _find_psql()
pytestmark = pytest.mark.skipif(PSQL is None, reason="psql not found (scripts/dev-db.sh up installs it)")


@dataclass
class Role:
    name: str
    password: str


def _owner_env(db, **extra: str) -> dict:
    """Environment for psql as the test database's owner (the dev role), over TCP."""
    env = {**os.environ,
           "PATH": f"{os.path.dirname(PSQL)}{os.pathsep}{os.environ.get('PATH', '')}",
           "PGHOST": str(SETTINGS["POSTGRES_HOST"]), "PGPORT": str(SETTINGS["POSTGRES_PORT"]),
           "PGUSER": str(SETTINGS["POSTGRES_USER"]), "PGPASSWORD": str(SETTINGS["POSTGRES_PASSWORD"]),
           "PGDATABASE": db.name, "PGCONNECT_TIMEOUT": "10"}
    env.update(extra)
    return env


def roles_sql(db, role: Role, *, check: bool = True) -> subprocess.CompletedProcess:
    """`psql -v ingest_user=... -v ingest_password=... -f sql/roles.sql` as the owner."""
    proc = subprocess.run([PSQL, "-X", "-v", f"ingest_user={role.name}", "-v", f"ingest_password={role.password}",
                           "-f", str(ROLES_SQL)],
                          env=_owner_env(db), capture_output=True, text=True, timeout=60, check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def init_script(db, role: Role, *, check: bool = True) -> subprocess.CompletedProcess:
    """The container's first-start script: schema.sql, then roles.sql, as POSTGRES_USER."""
    env = _owner_env(db, POSTGRES_USER=str(SETTINGS["POSTGRES_USER"]), POSTGRES_DB=db.name,
                     SQL_DIR=str(ROOT / "sql"), INGEST_DB_USER=role.name, INGEST_DB_PASSWORD=role.password)
    proc = subprocess.run(["bash", str(INIT_SCRIPT)], env=env, capture_output=True, text=True, timeout=60,
                          check=False)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


APPLY = {"psql": roles_sql, "init-script": init_script}


def connect_as(db, role: Role):
    conn = psycopg2.connect(host=SETTINGS["POSTGRES_HOST"], port=SETTINGS["POSTGRES_PORT"], user=role.name,
                            password=role.password, dbname=db.name, connect_timeout=5)
    conn.autocommit = True
    return conn


def _drop_role(db, name: str) -> None:
    """Revoke what roles.sql granted in the test database, then drop the (cluster-wide) role.

    DROP OWNED BY would need the role's own privileges, which the dev role (CREATEROLE, not a
    member) lacks; the role owns nothing, so revoking its grants is all there is to remove.
    """
    if not db.query("SELECT 1 FROM pg_roles WHERE rolname = %s", (name,)):
        return
    ident = sql.Identifier(name)
    with db.conn.cursor() as cur:
        cur.execute(sql.SQL("REVOKE ALL ON TABLE {} FROM {}").format(
            sql.SQL(", ").join(sql.Identifier("public", t) for t in TABLES), ident))
        cur.execute(sql.SQL("REVOKE ALL ON SEQUENCE {} FROM {}").format(
            sql.SQL(db.query("SELECT pg_get_serial_sequence('public.ingest_runs', 'run_id')")[0][0]), ident))
        cur.execute(sql.SQL("REVOKE ALL ON SCHEMA public FROM {}").format(ident))
        cur.execute(sql.SQL("REVOKE ALL ON DATABASE {} FROM {}").format(sql.Identifier(db.name), ident))
        cur.execute(sql.SQL("DROP ROLE {}").format(ident))


@pytest.fixture
def roles(db):
    """Make throwaway Role values (unique names, awkward passwords); drop those that exist at the end."""
    made: list[Role] = []

    def make(name: str | None = None, password: str | None = None) -> Role:
        tag = uuid.uuid4().hex[:10]
        role = Role(name or f"ingest_test_loader_{tag}", password or f"pw-{tag}-'q\"uo\\te $x :y")
        made.append(role)
        return role

    yield make
    for role in made:
        _drop_role(db, role.name)


def _chunks(db) -> dict[str, str]:
    """Chunk -> owner."""
    return dict(db.query("SELECT c.oid::regclass::text, pg_get_userbyid(c.relowner) "
                         "FROM show_chunks('raw_data') AS ch JOIN pg_class c ON c.oid = ch"))


def _acl_snapshot(db, role: Role) -> list:
    """The role's privileges on everything roles.sql manages."""
    out = [db.query("SELECT has_database_privilege(%s, current_database(), p) FROM unnest(%s) AS p",
                    (role.name, ["CONNECT", "TEMPORARY", "CREATE"]))]
    out.append(db.query("SELECT has_schema_privilege(%s, 'public', p) FROM unnest(%s) AS p",
                        (role.name, ["USAGE", "CREATE"])))
    for table in TABLES:
        out.append(db.query("SELECT has_table_privilege(%s, %s, p) FROM unnest(%s) AS p",
                            (role.name, f"public.{table}",
                             ["SELECT", "INSERT", "UPDATE", "DELETE", "TRUNCATE", "REFERENCES", "TRIGGER"])))
    return out


# ---------------------------------------------------------------------------------------------
def test_loader_role_loads_existing_and_new_chunks_with_no_bootstrap(db, run, roles, monkeypatch, capsys):
    # A chunk that exists before the grants (they must reach it) and ranges with no chunk yet.
    db.query("INSERT INTO raw_data VALUES ('seed', 'heart_rate', '2024-01-01T00:00:00Z', 1)")
    role = roles()
    init_script(db, role)  # as docker-compose does: schema.sql, then roles.sql
    before = _chunks(db)
    assert len(before) == 1
    owner = db.query("SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'public.raw_data'::regclass")[0][0]

    monkeypatch.setenv("POSTGRES_USER", role.name)
    monkeypatch.setenv("POSTGRES_PASSWORD", role.password)

    # 1. Straight COPY into raw_data: the existing chunk and two brand-new ones.
    run.write("a.json", [rec(ts="2024-01-01T00:00:01Z"),
                         rec(ts="2031-03-01T12:00:00Z", value=61), rec(ts="2031-03-02T12:00:00Z", value=62)])
    assert run("--no-bootstrap") == 0
    after = _chunks(db)
    new = set(after) - set(before)
    assert len(new) == 2, after
    # TimescaleDB made them with the hypertable owner's rights, and copied its grants to them.
    assert set(after.values()) == {owner}
    for chunk in after:
        privs = db.query("SELECT has_table_privilege(%s, %s, 'INSERT'), has_table_privilege(%s, %s, 'DELETE')",
                         (role.name, chunk, role.name, chunk))[0]
        assert privs == (True, False), chunk

    # 2. Keys that exist already: the staging path (temporary table, INSERT ... ON CONFLICT),
    #    plus one more new chunk.
    run.write("b.json", [rec(ts="2031-03-01T12:00:00Z", value=99), rec(ts="2031-04-01T00:00:00Z", value=63)])
    assert run("--no-bootstrap") == 0
    s = run.summary()
    assert (s["rows_inserted"], s["rows_duplicate"]) == (1, 1)
    assert len(_chunks(db)) == 4

    # 3. --on-conflict update: UPDATE on raw_data, and the run-key scratch table.
    run.write("c.json", [rec(ts="2031-03-02T12:00:00Z", value=72)])
    assert run("--no-bootstrap", "--on-conflict", "update") == 0
    assert db.query("SELECT value FROM raw_data WHERE \"timestamp\" = '2031-03-02T12:00:00Z'") == [(72.0,)]

    assert db.count() == 5
    assert db.query("SELECT value FROM raw_data WHERE \"timestamp\" = '2031-03-01T12:00:00Z'") == [(61.0,)]
    # The loader's bookkeeping went through as that role too: every run finished, none is left
    # 'running', and nothing was refused along the way.
    assert db.query("SELECT count(*) FROM ingest_runs WHERE status = 'running'") == [(0,)]
    err = capsys.readouterr().err
    assert "permission denied" not in err and "must be owner" not in err, err
    # The role still owns nothing (its temporary staging table went with its session).
    assert db.query("SELECT count(*) FROM pg_shdepend WHERE refclassid = 'pg_authid'::regclass "
                    "AND refobjid = %s::regrole AND deptype = 'o'", (role.name,)) == [(0,)]


def test_loader_role_cannot_delete_truncate_drop_or_create(db, roles):
    # As PostgreSQL 14 (the docker image) has it: PUBLIC may create in public. roles.sql revokes it.
    db.query("GRANT CREATE ON SCHEMA public TO PUBLIC")
    db.query("INSERT INTO raw_data VALUES ('seed', 'heart_rate', '2024-01-01T00:00:00Z', 1)")
    chunk = next(iter(_chunks(db)))
    role = roles()
    roles_sql(db, role)

    conn = connect_as(db, role)
    allowed = []
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO raw_data VALUES ('u', 'spo2', '2035-01-01T00:00:00Z', 97)")  # may insert
            for statement in (
                "DELETE FROM raw_data",
                "TRUNCATE raw_data",
                "DROP TABLE raw_data",
                "CREATE TABLE public.loader_owned (i int)",
                "CREATE TABLE loader_owned (i int)",
                "CREATE SCHEMA loader_owned",
                "ALTER TABLE raw_data ADD COLUMN extra int",
                "CREATE INDEX ON raw_data (value)",
                f"DELETE FROM {chunk}",
                f"TRUNCATE {chunk}",
                "SELECT drop_chunks('raw_data', older_than => '2100-01-01'::timestamptz)",
                "DELETE FROM ingest_runs",
                "DELETE FROM ingest_files",
                "TRUNCATE ingest_run_keys",
                "SELECT nextval(pg_get_serial_sequence('public.ingest_runs', 'run_id'))",
            ):
                try:
                    cur.execute(statement)
                except errors.InsufficientPrivilege:
                    continue
                allowed.append(statement)
    finally:
        conn.close()
    assert allowed == []
    assert db.query("SELECT to_regclass('public.raw_data') IS NOT NULL, count(*) FROM raw_data") == [(True, 2)]

    # Not the owner of anything, no role attributes, no memberships; no CREATE anywhere it can
    # reach; USAGE (through PUBLIC) on the TimescaleDB schemas every hypertable query needs.
    assert db.query("SELECT rolsuper, rolcreaterole, rolcreatedb, rolreplication, rolbypassrls, rolcanlogin "
                    "FROM pg_roles WHERE rolname = %s", (role.name,)) == [(False, False, False, False, False, True)]
    assert db.query("SELECT count(*) FROM pg_shdepend WHERE refclassid = 'pg_authid'::regclass "
                    "AND refobjid = %s::regrole AND deptype = 'o'", (role.name,)) == [(0,)]
    assert db.query("SELECT count(*) FROM pg_auth_members WHERE member = %s::regrole", (role.name,)) == [(0,)]
    assert db.query("SELECT nspname FROM pg_namespace WHERE has_schema_privilege(%s, oid, 'CREATE')",
                    (role.name,)) == []
    assert db.query("SELECT bool_and(has_schema_privilege(%s, s, 'USAGE')) FROM unnest(%s) AS s",
                    (role.name, list(TIMESCALE_SCHEMAS))) == [(True,)]


def test_without_no_bootstrap_the_loader_stops_with_one_clear_error(db, run, roles, monkeypatch, capsys):
    """Applying schema.sql needs CREATE on schema public, which the role lacks: exit 2, one line."""
    role = roles()
    roles_sql(db, role)
    monkeypatch.setenv("POSTGRES_USER", role.name)
    monkeypatch.setenv("POSTGRES_PASSWORD", role.password)
    run.write("a.json", [rec()])
    code = run()
    err = capsys.readouterr().err
    assert "Traceback" not in err and role.password not in err
    if code == 0:  # schema application became a no-op needing no privileges
        assert db.count() == 1
    else:
        assert code == 2, err
        assert "hint: " in err and "--no-bootstrap" in err
        errors_ = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors_) == 1, err
        assert "schema.sql" in errors_[0] and "permission denied" in errors_[0], errors_
        assert db.count() == 0


def test_roles_sql_is_idempotent_and_converges(db, roles):
    role = roles()
    roles_sql(db, role)
    first = _acl_snapshot(db, role)
    assert first[0] == [(True,), (True,), (False,)]  # CONNECT, TEMPORARY, not CREATE
    assert first[1] == [(True,), (False,)]  # USAGE on public, not CREATE
    assert first[2] == [(True,), (True,), (True,), (False,), (False,), (False,), (False,)]  # raw_data
    assert first[5] == [(True,), (True,), (True,), (True,), (False,), (False,), (False,)]  # ingest_run_keys

    roles_sql(db, role)
    assert _acl_snapshot(db, role) == first
    init_script(db, role)
    assert _acl_snapshot(db, role) == first

    # Anything extra granted in between is revoked by the next run; a new password takes effect.
    db.query(sql.SQL("GRANT DELETE, TRUNCATE ON raw_data TO {}").format(sql.Identifier(role.name)).as_string(db.conn))
    new = Role(role.name, role.password + "-rotated")
    roles_sql(db, new)
    assert _acl_snapshot(db, role) == first
    connect_as(db, new).close()
    with pytest.raises(psycopg2.OperationalError, match="password authentication failed"):
        connect_as(db, role)


@pytest.mark.parametrize("via", sorted(APPLY))
def test_hostile_role_name_and_password_are_quoted(db, roles, via):
    tag = uuid.uuid4().hex[:8]
    role = roles(f'x"; DROP TABLE raw_data; -- {tag}', f"p'w\"; DROP TABLE raw_data; -- \\'' $x :y `id` {tag}")
    APPLY[via](db, role)
    assert db.query("SELECT rolname FROM pg_roles WHERE rolname = %s", (role.name,)) == [(role.name,)]
    assert db.query("SELECT to_regclass('public.raw_data') IS NOT NULL") == [(True,)]
    conn = connect_as(db, role)  # exactly that name, exactly that password
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT current_user, has_table_privilege('public.raw_data', 'INSERT')")
            assert cur.fetchone() == (role.name, True)
    finally:
        conn.close()


def test_roles_sql_refuses_unsafe_settings(db, roles):
    owner = str(SETTINGS["POSTGRES_USER"])
    # The owner itself (a mistyped INGEST_DB_USER): refused before its password could change.
    proc = roles_sql(db, Role(owner, "not-the-owner-password"), check=False)
    assert proc.returncode != 0 and "needs a role of its own" in proc.stderr
    connect(db.name).close()
    # A role with more than a loader needs.
    wide = roles()
    db.query(sql.SQL("CREATE ROLE {} LOGIN CREATEDB").format(sql.Identifier(wide.name)).as_string(db.conn))
    proc = roles_sql(db, wide, check=False)
    assert proc.returncode != 0 and "CREATEDB" in proc.stderr
    # Missing or empty settings.
    proc = subprocess.run([PSQL, "-X", "-f", str(ROLES_SQL)], env=_owner_env(db), capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode != 0 and "ingest_user" in proc.stderr
    proc = roles_sql(db, Role(roles().name, ""), check=False)
    assert proc.returncode != 0 and "must not be empty" in proc.stderr
    proc = init_script(db, Role("", "x"), check=False)
    assert proc.returncode != 0 and "INGEST_DB_USER is not set" in proc.stderr
