"""Faults and security: each fault ends in one clear line, the right exit code, nothing partial."""
from __future__ import annotations

import json

import pytest

import ingest
from tests.conftest import SETTINGS, rec


def _one_error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


def test_reject_file_on_a_full_disk_rolls_the_file_back(run, db):
    """/dev/full opens for appending but every write fails with ENOSPC."""
    run.write("a.json", [rec(value=1)])
    run.write("b.json", [rec(ts="2024-01-01T00:00:01Z", value=2), rec(value="bad")])
    proc = run.subprocess("--reject-file", "/dev/full")
    assert proc.returncode == 2
    assert "cannot write the reject file /dev/full: No space left on device" in _one_error_line(proc.stderr)
    assert [r[3] for r in db.rows()] == [1.0]  # a.json (no rejects) loaded, b.json rolled back whole
    assert db.query("SELECT path FROM ingest_files") == [("a.json",)]
    assert db.query("SELECT status FROM ingest_runs") == [("failed",)]


@pytest.mark.parametrize("path, reason", [
    ("/proc/no/such/dir/rejects.jsonl", "cannot write the reject file"),
    ("{tmp}", "cannot write the reject file"),  # a directory
])
def test_unwritable_reject_file_is_refused_before_any_work(run, db, path, reason):
    run.write("a.json", [rec()])
    proc = run.subprocess("--reject-file", path.format(tmp=run.tmp))
    assert proc.returncode == 2 and reason in _one_error_line(proc.stderr)
    assert db.count() == 0


def test_statement_timeout_ends_with_exit_3_and_nothing_partial(run, db):
    run.write("a.json", [rec(ts=f"2024-01-01T00:00:{i:02d}Z") for i in range(50)])
    blocker = ingest.connect_db(_conninfo(db.name))  # holds raw_data, so the loader's statements wait
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE raw_data IN ACCESS EXCLUSIVE MODE")
        proc = run.subprocess("--statement-timeout", "1", timeout=120)
    blocker.rollback()
    blocker.close()
    assert proc.returncode == 3
    assert "canceling statement due to statement timeout" in _one_error_line(proc.stderr)
    assert db.count() == 0


def _conninfo(dbname: str) -> dict:
    return {"host": SETTINGS["POSTGRES_HOST"], "port": SETTINGS["POSTGRES_PORT"], "dbname": dbname,
            "user": SETTINGS["POSTGRES_USER"], "password": SETTINGS["POSTGRES_PASSWORD"]}


def test_sslmode_is_passed_to_libpq(run, db):
    run.write("a.json", [rec()])
    proc = run.subprocess(env={"POSTGRES_SSLMODE": "require"})
    assert proc.returncode == 3  # the local server has no TLS: require must refuse to go on
    assert "server does not support SSL" in _one_error_line(proc.stderr)
    assert run.subprocess(env={"POSTGRES_SSLMODE": "disable"}).returncode == 0


def test_tls_settings_reach_the_connection(run, monkeypatch):
    for key, value in {"POSTGRES_SSLMODE": "verify-full", "POSTGRES_SSLROOTCERT": "/etc/ca.pem",
                       "POSTGRES_SSLCERT": "/etc/client.pem", "POSTGRES_SSLKEY": "/etc/client.key"}.items():
        monkeypatch.setenv(key, value)
    cfg = ingest._resolve_config(ingest._parser().parse_args(["--data-dir", str(run.data)]), dict(ingest.os.environ))
    assert {k: cfg.conninfo[k] for k in ("sslmode", "sslrootcert", "sslcert", "sslkey")} == {
        "sslmode": "verify-full", "sslrootcert": "/etc/ca.pem", "sslcert": "/etc/client.pem",
        "sslkey": "/etc/client.key"}


def test_password_never_appears_in_output_summary_rejects_or_run_log(run, db):
    secret = SETTINGS["POSTGRES_PASSWORD"]
    assert len(secret) >= 8
    run.write("a.json", [rec(), rec(value="bad")])
    proc = run.subprocess("--verbose", "--summary-json", str(run.summary_path), "--log-format", "json")
    assert proc.returncode == 1
    assert secret not in proc.stdout + proc.stderr
    assert secret not in run.summary_path.read_text() and secret not in run.rejects.read_text()
    assert secret not in json.dumps(db.query("SELECT * FROM ingest_runs"), default=str)
    # and not when the server refuses it either, nor in a URL
    url = f"postgresql://{SETTINGS['POSTGRES_USER']}:{secret}@127.0.0.1:1/{db.name}"
    proc = run.subprocess("--verbose", env={"DATABASE_URL": url, "CONNECT_TIMEOUT": "2"})
    assert proc.returncode == 3 and secret not in proc.stdout + proc.stderr
    assert "cannot connect to 127.0.0.1:1/" in proc.stderr


INJECTION = "x'); DROP TABLE raw_data; --"


@pytest.mark.parametrize("setting, code", [
    ("POSTGRES_DB", 2), ("POSTGRES_USER", 2), ("POSTGRES_HOST", 3), ("POSTGRES_PASSWORD", 2),
    ("POSTGRES_PORT", 2), ("DATABASE_URL", 2), ("DATA_DIR", 2), ("SOURCE_TIMEZONE", 2), ("BATCH_SIZE", 2),
    ("ON_CONFLICT", 2), ("WORKERS", 2), ("CONNECT_TIMEOUT", 2), ("STATEMENT_TIMEOUT", 2), ("LOG_LEVEL", 2),
    ("LOG_FORMAT", 2), ("POSTGRES_SSLMODE", 3),
])
def test_injection_through_a_setting_is_refused_or_harmless(run, db, setting, code):
    """Settings never reach SQL text: a hostile value fails as bad configuration or a failed login."""
    run.write("a.json", [rec()])
    env = {"CONNECT_TIMEOUT": "2", setting: INJECTION}
    proc = run.subprocess(*(["--data-dir", INJECTION] if setting == "DATA_DIR" else []), env=env)
    assert proc.returncode == code, proc.stderr
    assert db.query("SELECT to_regclass('raw_data') IS NOT NULL") == [(True,)]


def test_hostile_reject_file_name_and_data_are_only_data(run, db):
    run.write("a.json", [rec(user=INJECTION), rec(user="u2", value="'; DROP TABLE raw_data; --")])
    reject = run.tmp / INJECTION.replace("/", "_")
    proc = run.subprocess("--reject-file", str(reject))
    assert proc.returncode == 1
    assert db.rows()[0][0] == INJECTION and reject.exists()
    assert db.query("SELECT to_regclass('raw_data') IS NOT NULL") == [(True,)]
