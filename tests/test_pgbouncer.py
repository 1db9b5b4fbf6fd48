"""The loader behind PgBouncer, in session and in transaction pooling mode, with PgBouncer's defaults.

`scripts/dev-db.sh pgbouncer up` starts the two poolers in front of the dev database (`make test` does,
and exports their ports): 127.0.0.1 at POSTGRES_PORT+1 (pool_mode=session) and POSTGRES_PORT+2
(pool_mode=transaction), default_pool_size=2 and the default ignore_startup_parameters, so a client may
send no `options` startup parameter. In transaction mode consecutive transactions of one client may run
on different server connections, and a server connection outlives the client that used it: the loader
may only use per-transaction state (SET LOCAL, transaction-level advisory locks), or it leaks into the
next client of that server connection.
"""
from __future__ import annotations

import datetime as dt
import os
import time

import psycopg2
import pytest

from tests.conftest import SETTINGS, rec

pytestmark = pytest.mark.skipif(
    not os.environ.get("PGBOUNCER_SESSION_PORT"),
    reason="PGBOUNCER_SESSION_PORT is not set: start the poolers with `scripts/dev-db.sh pgbouncer up` and "
           "`eval \"$(scripts/dev-db.sh pgbouncer env)\"` (`make test` does both)")

POOL_MODES = ("session", "transaction")
HOST = os.environ.get("PGBOUNCER_HOST", "127.0.0.1")  # dev-db.sh's poolers listen on 127.0.0.1 only


def _port(mode: str) -> int:
    session = int(os.environ["PGBOUNCER_SESSION_PORT"])
    if mode == "session":
        return session
    return int(os.environ.get("PGBOUNCER_TRANSACTION_PORT") or session + 1)  # dev-db.sh's layout


def _ts(hms: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"2024-01-01T{hms}+00:00")


def _write_sample(run) -> list[tuple]:
    """Three files, seven distinct records; the rows they must give, in Db.rows() order."""
    run.write("a.json", [rec(ts=f"2024-01-01T00:00:0{i}Z", value=60 + i) for i in range(3)])
    run.write("b/heart.json", [rec(user="u2", metric="heart_rate", ts=f"2024-01-01T00:00:0{i}Z", value=70 + i)
                               for i in range(2)])
    run.write("c.json", [rec(metric="spo2", ts="2024-01-01T00:01:00Z", value=95),
                         rec(user="u2", metric="spo2", ts="2024-01-01T00:01:00Z", value=96)])
    return sorted([("u1", "activity", _ts(f"00:00:0{i}"), 60.0 + i) for i in range(3)]
                  + [("u2", "heart_rate", _ts(f"00:00:0{i}"), 70.0 + i) for i in range(2)]
                  + [("u1", "spo2", _ts("00:01:00"), 95.0), ("u2", "spo2", _ts("00:01:00"), 96.0)])


@pytest.fixture(params=POOL_MODES)
def pooled(request, run, monkeypatch):
    """The runner, pointed at the pooler of one mode (the `db` fixture's database, through PgBouncer)."""
    port = _port(request.param)
    monkeypatch.setenv("POSTGRES_HOST", HOST)
    monkeypatch.setenv("POSTGRES_PORT", str(port))
    monkeypatch.delenv("STATEMENT_TIMEOUT", raising=False)  # each test states the settings it uses
    run.pool_mode, run.pool_port = request.param, port
    yield run
    # The pooler keeps its server connections to the test database open; end them, so that dropping
    # the database does not first wait (5 s) for them. PgBouncer drops a pool's closed connections.
    run.db.query("SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity WHERE datname = current_database() "
                 "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")


def _pooler_connect(port: int, dbname: str):
    return psycopg2.connect(host=HOST, port=port, user=SETTINGS["POSTGRES_USER"],
                            password=SETTINGS["POSTGRES_PASSWORD"], dbname=dbname, connect_timeout=5)


def _assert_loads_and_reruns(run, db) -> None:
    expected = _write_sample(run)
    assert run() == 0
    s = run.summary()
    assert (s["status"], s["files_loaded"], s["files_failed"], s["rows_inserted"]) == ("ok", 3, 0, 7)
    assert db.rows() == expected
    assert run() == 0
    s = run.summary()
    assert (s["status"], s["files_skipped"], s["files_loaded"], s["rows_inserted"]) == ("ok", 3, 0, 0)
    assert db.rows() == expected


def test_load_through_pooler_inserts_rows_and_rerun_skips_them(pooled, db):
    _assert_loads_and_reruns(pooled, db)


def test_statement_timeout_works_through_pooler(pooled, db, monkeypatch):
    """STATEMENT_TIMEOUT must not travel as a startup parameter (`options=-c statement_timeout=...`):
    PgBouncer refuses those unless told to ignore them (ignore_startup_parameters), and in transaction
    mode a session-level SET would not stay with the client. Per transaction (SET LOCAL) it works."""
    monkeypatch.setenv("STATEMENT_TIMEOUT", "30")
    _assert_loads_and_reruns(pooled, db)


def _server_backends(db) -> set[int]:
    """The server connections to the test database other than the fixture's own: the pooler's."""
    return {pid for (pid,) in db.query(
        "SELECT pid FROM pg_stat_activity WHERE datname = current_database() "
        "AND backend_type = 'client backend' AND pid <> pg_backend_pid()")}


def _advisory_locks(db) -> int:
    # This database only: pg_locks is cluster-wide, and other suites may share the server.
    return db.query("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' "
                    "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")[0][0]


@pytest.mark.parametrize("statement_timeout", [None, "30"], ids=["defaults", "statement_timeout"])
def test_no_session_state_leaks_into_the_pool(pooled, db, monkeypatch, statement_timeout):
    """After the loader returns, every server connection it used is as a fresh session would find it:
    synchronous_commit and statement_timeout at their defaults, no advisory lock held."""
    if statement_timeout:
        monkeypatch.setenv("STATEMENT_TIMEOUT", statement_timeout)
    _write_sample(pooled)
    assert pooled() == 0
    assert db.count() == 7

    leaks = []
    # Locks first, before any other client touches the pool. In session mode PgBouncer resets (DISCARD
    # ALL) a released server connection asynchronously: allow it a moment. In transaction mode nothing
    # ever resets one, so a session-level lock stays held for as long as the server connection lives.
    deadline = time.monotonic() + 5
    while _advisory_locks(db) and time.monotonic() < deadline:
        time.sleep(0.1)
    locks = db.query("SELECT pid, classid, objid, mode FROM pg_locks WHERE locktype = 'advisory' "
                     "AND database = (SELECT oid FROM pg_database WHERE datname = current_database())")
    if locks:
        leaks.append(f"advisory locks still held after the loader returned (pid, classid, objid, mode): {locks}")

    backends = _server_backends(db)
    assert backends, "the pooler holds no server connection to the test database: nothing to check"
    # One open transaction per server connection: the pooler hands each client a different one (an
    # idle server before a new one; default_pool_size=2 caps them), so together they cover the
    # connections the loader used. A few rounds, as later clients would meet them. Each client ends
    # its transaction before it leaves: a client that disconnects inside one makes PgBouncer close
    # that server connection, which would hide what was left on it.
    for _ in range(3):
        seen: dict[int, tuple[str, str]] = {}
        clients = []
        try:
            for _ in backends:
                client = _pooler_connect(pooled.pool_port, db.name)
                clients.append(client)
                with client.cursor() as cur:  # autocommit off: the transaction keeps its server
                    cur.execute("SELECT pg_backend_pid()")
                    pid = cur.fetchone()[0]
                    cur.execute("SHOW synchronous_commit")
                    synchronous_commit = cur.fetchone()[0]
                    cur.execute("SHOW statement_timeout")
                    seen[pid] = (synchronous_commit, cur.fetchone()[0])
        finally:
            for client in clients:
                client.rollback()
                client.close()
        # Every server connection of the pool was looked at (bar any the pooler has closed since).
        assert not (backends - set(seen)) & _server_backends(db), \
            f"{pooled.pool_mode} pooler: server connections not reached"
        for pid, (synchronous_commit, timeout) in sorted(seen.items()):
            if (synchronous_commit, timeout) != ("on", "0"):
                leaks.append(f"server connection {pid}: synchronous_commit={synchronous_commit} "
                             f"statement_timeout={timeout} (want on, 0)")
        backends = _server_backends(db)

    assert not leaks, f"session state left behind on {pooled.pool_mode}-mode server connections:\n" + \
        "\n".join(dict.fromkeys(leaks))
