"""Fixtures: a real PostgreSQL + TimescaleDB (the project's local one, `scripts/dev-db.sh up`).

Every test that needs the database gets a fresh one, copied from a template that holds
sql/schema.sql, and dropped afterwards. Connection settings come from the environment
(`eval "$(scripts/dev-db.sh env)"`, as `make test` does) or else from .env.example.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import psycopg2
import pytest
from dotenv import dotenv_values

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import ingest

TEMPLATE_DB = f"ingest_test_template_{os.getpid()}"  # per session: suites may run side by side


def _settings() -> dict:
    example = dotenv_values(ROOT / ".env.example")
    keys = ("POSTGRES_HOST", "POSTGRES_PORT", "POSTGRES_DB", "POSTGRES_USER", "POSTGRES_PASSWORD")
    return {k: os.environ.get(k) or example[k] for k in keys}


SETTINGS = _settings()


def connect(dbname: str, **kw):
    return psycopg2.connect(host=SETTINGS["POSTGRES_HOST"], port=SETTINGS["POSTGRES_PORT"],
                            user=SETTINGS["POSTGRES_USER"], password=SETTINGS["POSTGRES_PASSWORD"],
                            dbname=dbname, connect_timeout=5, **kw)


def _admin():
    conn = connect(SETTINGS["POSTGRES_DB"])
    conn.autocommit = True
    return conn


@pytest.fixture(scope="session")
def template_db():
    """Make (once per session) a template database with the schema applied."""
    try:
        admin = _admin()
    except psycopg2.OperationalError as exc:
        pytest.exit(f"test database unreachable ({str(exc).strip()}); run `scripts/dev-db.sh up` "
                    f"and `eval \"$(scripts/dev-db.sh env)\"` first", returncode=3)
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{TEMPLATE_DB}" WITH (FORCE)')
        cur.execute(f'CREATE DATABASE "{TEMPLATE_DB}"')
    conn = connect(TEMPLATE_DB)
    ingest.apply_schema(conn, ingest.SCHEMA_PATH.read_text())
    conn.close()
    admin.close()
    yield TEMPLATE_DB
    _drop_database(TEMPLATE_DB)  # a fresh connection: a test may have restarted the server


def _new_database(template: str) -> str:
    name = f"ingest_test_{uuid.uuid4().hex[:12]}"
    admin = _admin()
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    admin.close()
    return name


def _drop_database(name: str) -> None:
    """Plain DROP first: WITH (FORCE) cannot end an autovacuum worker for a non-superuser."""
    admin = _admin()
    try:
        for attempt in range(20):
            try:
                with admin.cursor() as cur:
                    cur.execute(f'DROP DATABASE IF EXISTS "{name}"' + (" WITH (FORCE)" if attempt % 2 else ""))
                return
            except psycopg2.errors.ObjectInUse:
                time.sleep(0.25)
            except psycopg2.errors.InsufficientPrivilege:
                time.sleep(0.25)
        raise RuntimeError(f"could not drop test database {name}")
    finally:
        admin.close()


class Db:
    """A fresh database and helpers to look into it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = connect(name)
        self.conn.autocommit = True

    def query(self, sql: str, params=()) -> list[tuple]:
        with self.conn.cursor() as cur:
            cur.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def rows(self) -> list[tuple]:
        return self.query('SELECT user_id, metric, "timestamp", value FROM raw_data '
                          'ORDER BY user_id, metric, "timestamp"')

    def count(self) -> int:
        return self.query("SELECT count(*) FROM raw_data")[0][0]

    def env(self) -> dict:
        return {**SETTINGS, "POSTGRES_DB": self.name}

    def fingerprint(self) -> tuple:
        """The whole table and the manifest (minus run ids and times), for exact comparison."""
        rows = self.query("SELECT count(*), md5(coalesce(string_agg(concat_ws('|', user_id, metric, "
                          "\"timestamp\", value), ',' ORDER BY user_id, metric, \"timestamp\"), '')) FROM raw_data")[0]
        manifest = self.query("SELECT path, size, mtime_ns, sha256, status, records_read, records_rejected, "
                              "rows_inserted, rows_updated, rows_duplicate FROM ingest_files ORDER BY path")
        return rows, manifest


def _fresh_database(template: str):
    name = _new_database(template)
    handle = Db(name)
    try:
        yield handle
    finally:
        handle.conn.close()
        _drop_database(name)


@pytest.fixture
def db(template_db):
    yield from _fresh_database(template_db)


@pytest.fixture
def other_db(template_db):
    """A second fresh database, e.g. for a clean reference load."""
    yield from _fresh_database(template_db)


@pytest.fixture
def empty_db(template_db):
    """A fresh database without the schema (the loader must bootstrap it)."""
    yield from _fresh_database("template1")


class Runner:
    """Runs ``ingest.main`` in-process, in an empty working directory, against one database."""

    def __init__(self, tmp_path: Path, monkeypatch, db: Db | None) -> None:
        self.tmp, self.db, self.mp = tmp_path, db, monkeypatch
        self.data = tmp_path / "data"
        self.data.mkdir()
        self.rejects = tmp_path / "rejects.jsonl"
        self.summary_path = tmp_path / "summary.json"
        monkeypatch.chdir(tmp_path)
        for key in ("DATABASE_URL", "DATA_DIR", "BATCH_SIZE", "SOURCE_TIMEZONE", "REJECT_FILE",
                    "LOG_LEVEL", "CONNECT_TIMEOUT"):
            monkeypatch.delenv(key, raising=False)
        for key, value in (db.env() if db else SETTINGS).items():
            monkeypatch.setenv(key, str(value))

    def write(self, rel: str, content) -> Path:
        path = self.data / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        elif isinstance(content, str):
            path.write_text(content, encoding="utf-8")
        else:
            path.write_text(json.dumps(content), encoding="utf-8")
        return path

    def __call__(self, *args: str) -> int:
        return ingest.main(["--data-dir", str(self.data), "--reject-file", str(self.rejects),
                            "--summary-json", str(self.summary_path), *args])

    def summary(self) -> dict:
        return json.loads(self.summary_path.read_text())

    def reject_lines(self) -> list[dict]:
        if not self.rejects.exists():
            return []
        return [json.loads(line) for line in self.rejects.read_text().splitlines()]

    def subprocess(self, *args: str, env: dict | None = None, timeout: float = 120):
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            [sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(self.data),
             "--reject-file", str(self.rejects), *args],
            check=False, env=full_env, capture_output=True, text=True, timeout=timeout, cwd=self.tmp)


@pytest.fixture
def run(tmp_path, monkeypatch, db):
    return Runner(tmp_path, monkeypatch, db)


def rec(user="u1", metric="activity", ts="2024-01-01T00:00:00Z", value=60, **extra) -> dict:
    return {"user_id": user, "metric": metric, "timestamp": ts, "value": value, **extra}

