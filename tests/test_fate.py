"""A file's fate is its own: one file's problem never blocks, loses or hides another's.

Each test names a class of failure; the examples inside it vary the class. Real TimescaleDB.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import ingest
from tests.conftest import ROOT, SETTINGS, rec


def statuses(run) -> dict[str, str]:
    return {f["file"]: f["status"] for f in run.summary()["files"]}


def manifest(db) -> dict[str, tuple]:
    return {path: (status, error) for path, status, error in db.query("SELECT path, status, error FROM ingest_files")}


def deny_opening(monkeypatch, name: str):
    """chmod 000 as root cannot stop root: opening ``name`` raises EACCES instead, until undone."""
    real = os.open

    def guarded(path, flags, *args, **kwargs):
        if os.fsdecode(path).endswith(name):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(ingest.os, "open", guarded)
    return lambda: monkeypatch.setattr(ingest.os, "open", real)


# --- 1. a failed file is retried when its cause may have gone; no run exits 0 without it -----
def test_unreadable_file_is_retried_every_run_until_it_loads(run, db, monkeypatch):
    run.write("a.json", [rec()])
    run.write("b.json", [rec(ts="2024-01-01T00:00:01Z")])
    allow = deny_opening(monkeypatch, "b.json")
    for _ in range(2):  # still unreadable: failed again, never "unchanged"
        assert run() == 1
        assert statuses(run)["b.json"] == "failed"
        assert "Permission denied" in manifest(db)["b.json"][1] and manifest(db)["b.json"][0] == "error"
    allow()
    assert run() == 0
    assert statuses(run) == {"a.json": "skipped", "b.json": "loaded"} and db.count() == 2


def test_file_the_table_refused_loads_once_the_table_accepts_it(run, db):
    db.query("ALTER TABLE raw_data ADD CONSTRAINT small CHECK (value < 1000)")
    run.write("a.json", [rec(value=5)])
    run.write("b.json", [rec(value=5000, ts="2024-01-01T00:00:01Z")])
    assert run() == 1
    assert statuses(run)["b.json"] == "failed" and run.summary()["files_failed"] == 1
    assert run() == 1  # unchanged bytes, but the cause was the table: tried again, failed again
    assert statuses(run)["b.json"] == "failed"
    db.query("ALTER TABLE raw_data DROP CONSTRAINT small")
    assert run() == 0
    assert statuses(run)["b.json"] == "loaded" and db.count() == 2


@pytest.mark.parametrize("content, fragment", [
    ('[{"user_id": "u1", ', "file ends inside"),
    (b"[\xc3\x28 not text", "not valid utf-8"),
    ("[1, 2] [3]", "unexpected data after the JSON array"),
])
def test_file_whose_bytes_fail_is_not_loaded_and_every_run_says_so(run, db, content, fragment):
    run.write("a.json", [rec()])
    run.write("bad.json", content)
    assert run() == 1
    assert fragment in run.summary()["files"][1]["error"]
    assert run() == 1  # skipped without reading, but never as a clean run
    s = run.summary()
    assert (s["files_failed_before"], s["files_skipped"], s["status"]) == (1, 1, "rejects")
    assert statuses(run)["bad.json"] == "failed_before"
    run.write("bad.json", [rec(ts="2024-01-01T00:00:09Z")])  # fixed: loads
    assert run() == 0 and db.count() == 2


# --- 2. no file blocks another; the server's whole message is kept --------------------------
def test_database_refusals_fail_their_file_alone_with_detail_and_hint(run, db):
    db.query("""
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF NEW.user_id = 'blocked' THEN
                RAISE EXCEPTION 'user %% is blocked', NEW.user_id
                    USING DETAIL = 'blocked users are kept out', HINT = 'unblock the user first';
            END IF;
            RETURN NEW;
        END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON raw_data FOR EACH ROW EXECUTE FUNCTION refuse();""")
    db.query("ALTER TABLE raw_data ADD CONSTRAINT plausible CHECK (value <> 4242)")
    run.write("1.json", [rec(ts="2024-01-01T00:00:01Z")])
    run.write("2.json", [rec(user="blocked")])
    run.write("3.json", [rec(ts="2024-01-01T00:00:03Z", value=4242)])
    run.write("4.json", [rec(ts="2024-01-01T00:00:04Z")])
    assert run() == 1
    s = run.summary()
    assert (s["files_seen"], s["files_loaded"], s["files_failed"]) == (4, 2, 2)
    errors = {f["file"]: f["error"] for f in s["files"]}
    assert "user blocked is blocked" in errors["2.json"]
    assert "DETAIL: blocked users are kept out" in errors["2.json"] and "HINT: unblock the user first" in errors["2.json"]
    assert "violates check constraint" in errors["3.json"] and "DETAIL: Failing row contains" in errors["3.json"]
    assert db.count() == 2
    assert {r["file"]: r["reason"] for r in run.reject_lines()}["2.json"].startswith("file failed: the database refused")


def test_every_file_refused_means_the_database_is_unusable_exit_3(run, db):
    db.query("ALTER TABLE raw_data ADD CONSTRAINT nothing_fits CHECK (value < 0)")
    run.write("1.json", [rec()])
    run.write("2.json", [rec(ts="2024-01-01T00:00:01Z")])
    assert run() == 3
    assert run.summary()["files_failed"] == 2 and "refused every file" in run.summary()["error"]


# --- 3. a file spanning thousands of days loads, in parts, and resumes after kill -9 ---------
def _years_of_days(run, days: int) -> None:
    import datetime as dt
    start = dt.datetime(2010, 1, 1, 12, tzinfo=dt.UTC)
    run.write("years.json", [rec(metric="hrv", ts=(start + dt.timedelta(days=d)).isoformat(), value=d % 400)
                             for d in range(days)])


def test_file_spanning_fifteen_years_of_daily_chunks_loads_exactly(run, db):
    assert db.query("SELECT current_setting('max_locks_per_transaction')::int, "
                    "current_setting('max_connections')::int") == [(64, 100)]  # PostgreSQL's defaults
    _years_of_days(run, 5480)
    assert run() == 0
    s = run.summary()
    # One query over all 5,480 chunks would itself need more locks than these defaults allow.
    rows = sum(db.query('SELECT count(*) FROM raw_data WHERE "timestamp" >= %s AND "timestamp" < %s',
                        (f"{year}-01-01T00:00:00Z", f"{year + 1}-01-01T00:00:00Z"))[0][0] for year in range(2010, 2026))
    assert (s["records_read"], s["rows_inserted"], rows) == (5480, 5480, 5480)
    assert db.query("SELECT count(*) FROM timescaledb_information.chunks WHERE hypertable_name = 'raw_data'") \
        == [(5480,)]
    assert db.query("SELECT status, records_done, records_read, rows_inserted FROM ingest_files") == \
        [("loaded", 5480, 5480, 5480)]
    assert run() == 0 and statuses(run) == {"years.json": "skipped"}


def test_kill_9_between_parts_then_rerun_equals_a_clean_load(run, db, other_db):
    _years_of_days(run, 1200)
    base = [sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data), "--reject-file", str(run.rejects)]
    clean = subprocess.run(base, env={**os.environ, **other_db.env()}, capture_output=True, text=True, check=False)
    assert clean.returncode == 0, clean.stderr
    for target in (300, 700):  # records committed before the kill
        proc = subprocess.Popen(base + ["--force"] if target > 300 else base, env={**os.environ, **db.env()},
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            done = db.query("SELECT coalesce(max(records_done), 0) FROM ingest_files WHERE status = 'partial'")
            if done[0][0] >= target:
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL, f"the load ended before it could be killed ({target})"
        assert db.query("SELECT status FROM ingest_files") == [("partial",)]
    rerun = subprocess.run(base, env={**os.environ, **db.env()}, capture_output=True, text=True, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "resuming after record" in rerun.stderr
    assert db.fingerprint() == other_db.fingerprint()


# --- 4 and 5. any value is a reject with a plain reason quoting the text as written -----------
HUGE = "9" * 5000
ODD_VALUES = [
    (HUGE, "is too large for a double precision number"),
    ("-" + HUGE, "is too large for a double precision number"),
    ("1e309", "value 1e309 is too large"),
    ("1e-400", "value 1e-400 is too small"),
    ("0.0000000000" + "0" * 400 + "1", "is too small"),
    ("300.00000000001", "value 300.00000000001 is outside the plausible range for heart_rate (20..300)"),
]


def _record_text(value: str, metric: str = "heart_rate", ts: str = "2024-01-01T00:00:00Z") -> str:
    return f'{{"user_id": "u1", "metric": "{metric}", "timestamp": "{ts}", "value": {value}}}'


@pytest.mark.parametrize("args", [(), ("--workers", "2"), ("--dry-run",)], ids=["plain", "workers", "dry-run"])
@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_numbers_of_any_size_are_rejects_never_crashes(run, db, args, suffix):
    good = _record_text("60", ts="2024-01-01T00:01:00Z")
    bad = [_record_text(value) for value, _ in ODD_VALUES]
    texts = [good, *bad]
    run.write("a" + suffix, ("[" + ",\n".join(texts) + "]") if suffix == ".json" else "\n".join(texts) + "\n")
    run.write("b.json", [rec(ts="2024-01-01T00:02:00Z")])  # the next file still loads
    assert run(*args) == 1
    s = run.summary()
    assert (s["records_read"], s["records_rejected"]) == (len(texts) + 1, len(bad))
    rejects = run.reject_lines()
    for (value, fragment), line in zip(ODD_VALUES, rejects, strict=True):
        assert fragment in line["reason"]
        assert value[:100] in line["record"] and "Infinity" not in line["record"]
    if "--dry-run" not in args:
        assert db.count() == 2


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_a_key_named_twice_is_rejected_not_guessed(run, db, suffix):
    texts = ['{"user_id": "u1", "metric": "heart_rate", "timestamp": "2024-01-01T00:00:00Z", "value": 60, "value": 500}',
             '{"user_id": "u1", "user_id": "u2", "metric": "heart_rate", "timestamp": "2024-01-01T00:00:01Z", "value": 6}',
             '{"user_id": "u1", "metric": "heart_rate", "timestamp": "2024-01-01T00:00:02Z", "value": 61, "x": 1, "x": 2}']
    good = [json.dumps(rec(metric="heart_rate", ts=f"2024-01-01T01:{i // 60:02d}:{i % 60:02d}Z", value=70))
            for i in range(300)]
    body = good[:150] + texts + good[150:]  # inside a window the fast decoder reads in one go
    run.write("a" + suffix, ("[" + ",\n".join(body) + "]") if suffix == ".json" else "\n".join(body) + "\n")
    assert run() == 1
    reasons = [line["reason"] for line in run.reject_lines()]
    assert reasons == ["key 'value' appears more than once in the record (ambiguous)",
                       "key 'user_id' appears more than once in the record (ambiguous)",
                       "key 'x' appears more than once in the record (ambiguous)"]
    assert db.count() == 300


@pytest.mark.parametrize("obj, fragment", [
    (rec(ts="2024-01-01T00:00:00+99:00"), "'2024-01-01T00:00:00+99:00' has a UTC offset outside -23:59..+23:59"),
    (rec(ts="2024-01-01T00:00:00+05:75"), "has a UTC offset outside"),
    (rec(ts="2024-02-30T00:00:00Z"), '"2024-02-30T00:00:00Z" is not a real date and time'),
    (rec(value="72"), 'value must be a number, got string "72"'),
    (rec(metric="heart_rate", value=300.00000000001), "value 300.00000000001 is outside"),
])
def test_reasons_name_the_rule_and_the_text(obj, fragment):
    with pytest.raises(ingest.ValidationError) as info:
        ingest.validate_record(obj)
    assert fragment.replace("'", '"') in str(info.value).replace("'", '"')
    assert "timedelta" not in str(info.value)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_deep_nesting_is_reported_where_it_starts(run, db, suffix):
    head = '{"user_id": "u1", "metric": "heart_rate", "timestamp": "2024-01-01T00:00:00Z", "value": '
    deep = head + "[" * 100_000 + "]" * 100_000 + "}"
    if suffix == ".json":
        run.write("a.json", "[" + deep + "]")
        assert run() == 1
        assert f"at character {len(head) + 2}" in run.summary()["files"][0]["error"]
    else:
        run.write("a.jsonl", json.dumps(rec()) + "\n" + deep + "\n")
        assert run() == 1
        assert f"from column {len(head) + 1}" in run.reject_lines()[0]["reason"]


# --- 6. any file name --------------------------------------------------------------------------
def test_names_that_are_not_utf8_or_hold_newlines_load_and_are_escaped(run, db, capsys):
    raw = os.fsencode(run.data)
    with open(raw + b"/\xff.json", "w") as f:  # sorts first
        json.dump([rec()], f)
    run.write("forged\n2026-01-01 00:00:00,000 INFO loaded x.json.json", [rec(ts="2024-01-01T00:00:01Z")])
    run.write("z.json", [rec(ts="2024-01-01T00:00:02Z")])
    assert run() == 0
    assert db.count() == 3
    paths = sorted(p for (p,) in db.query("SELECT path FROM ingest_files"))
    assert paths == ["\\xff.json", "forged\\x0a2026-01-01 00:00:00,000 INFO loaded x.json.json", "z.json"]
    err = capsys.readouterr().err
    assert not any(line.startswith("2026-01-01 00:00:00,000") for line in err.splitlines())
    assert db.query("SELECT status FROM ingest_runs") == [("ok",)]
    assert run() == 0 and run.summary()["files_skipped"] == 3


# --- 7. unreadable directories --------------------------------------------------------------------
def test_unreadable_data_dir_is_a_configuration_error(run, db, monkeypatch):
    real = os.listdir
    monkeypatch.setattr(ingest.os, "listdir", lambda p=".": (_ for _ in ()).throw(
        PermissionError(errno.EACCES, "Permission denied", str(p))) if Path(p) == run.data else real(p))
    run.write("a.json", [rec()])
    assert run() == 2
    assert db.count() == 0


def test_unreadable_subdirectory_is_a_failure_in_the_summary(run, db, monkeypatch):
    run.write("a.json", [rec()])
    run.write("locked/b.json", [rec(ts="2024-01-01T00:00:01Z")])
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path).endswith("locked"):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert run() == 1
    s = run.summary()
    assert s["files_failed"] == 1 and statuses(run) == {"a.json": "loaded", "locked/": "failed"}
    assert "cannot list directory: Permission denied" in s["files"][1]["error"]


# --- 8. claims never collide -----------------------------------------------------------------------
def test_paths_with_the_same_32_bit_hash_never_block_each_other(run, db):
    (a, b), = db.query("SELECT min(p), max(p) FROM (SELECT 'f' || i || '.json' AS p FROM generate_series(1, 300000) i) s "
                       "GROUP BY hashtext(p) HAVING count(*) > 1 LIMIT 1")
    run.write(a, [rec()])
    run.write(b, [rec(ts="2024-01-01T00:00:01Z")])
    assert run("--workers", "2") == 0
    assert statuses(run) == {a: "loaded", b: "loaded"} and db.count() == 2


# --- 9. a raw_data of another shape is never written wrongly ----------------------------------------
LEGACY = 'CREATE TABLE raw_data (user_id TEXT NOT NULL, metric TEXT NOT NULL, "timestamp" {ts} NOT NULL, ' \
         'value {value} NOT NULL{key})'
KEY = ', PRIMARY KEY (user_id, metric, "timestamp")'


@pytest.mark.parametrize("ddl, fragment", [
    (LEGACY.format(ts="TIMESTAMP", value="DOUBLE PRECISION", key=KEY),
     'column "timestamp" is timestamp without time zone, but the loader writes timestamp with time zone'),
    (LEGACY.format(ts="TIMESTAMPTZ", value="REAL", key=KEY),
     'column "value" is real, but the loader writes double precision'),
])
def test_legacy_table_of_another_type_is_refused_with_the_fix(run, empty_db, ddl, fragment, capsys):
    empty_db.query(ddl)
    run.mp.setenv("POSTGRES_DB", empty_db.name)
    run.write("a.json", [rec(ts="2024-01-01T00:00:00+05:00", value=61.123456789)])
    assert run() == 2
    err = capsys.readouterr().err
    assert fragment in err and "Fix: ALTER TABLE public.raw_data ALTER COLUMN" in err
    assert empty_db.query("SELECT count(*) FROM raw_data") == [(0,)]


@pytest.mark.parametrize("ddl, fragment", [
    (LEGACY.format(ts="TIMESTAMPTZ", value="DOUBLE PRECISION", key="")
     + "; INSERT INTO raw_data VALUES ('u', 'spo2', '2024-01-01', 1), ('u', 'spo2', '2024-01-01', 2)",
     'DETAIL: Key (user_id, metric, "timestamp")'),
    (LEGACY.format(ts="TIMESTAMPTZ", value="DOUBLE PRECISION", key=", id SERIAL PRIMARY KEY"),
     "HINT: If you're creating a hypertable"),
])
def test_legacy_table_without_the_key_shows_the_server_detail_and_exits_2(run, empty_db, ddl, fragment, capsys):
    empty_db.query(ddl)
    run.mp.setenv("POSTGRES_DB", empty_db.name)
    run.write("a.json", [rec()])
    assert run() == 2
    err = capsys.readouterr().err
    assert fragment in err and "hint:" in err


# --- 12. secrets stay secret in malformed settings --------------------------------------------------
SECRET = "pa@ss%zz'w0rd"


@pytest.mark.parametrize("url", [
    "postgresql://{u}:pa@ss@{h}:{p}/db",
    "postgresql://{u}:pa%zzss@{h}:{p}/db",
    "postgresql://{u}@{h}:{p}/db?password=pa%zzss",
    "host={h} port={p} user={u} password='pa ss",
    "postgresql://{u}:pa/ss@{h}:{p}/db",
])
def test_malformed_database_url_never_shows_any_part_of_the_password(run, url):
    s = SETTINGS
    dsn = url.format(u=s["POSTGRES_USER"], h=s["POSTGRES_HOST"], p=s["POSTGRES_PORT"])
    run.write("a.json", [rec()])
    proc = run.subprocess("--verbose", "--summary-json", str(run.summary_path), env={"DATABASE_URL": dsn})
    assert proc.returncode == 2
    out = proc.stderr + proc.stdout + (run.summary_path.read_text() if run.summary_path.exists() else "")
    assert "error: DATABASE_URL" in proc.stderr
    for piece in ("pa@ss", "pa%zzss", "pa ss", "pa/ss", "ss@", "%zz", "ss'"):
        assert piece not in out, piece


# --- 14. --summary-json is checked at start ------------------------------------------------------
@pytest.mark.parametrize("where", ["dir", "file-in-a-file"])
def test_unwritable_summary_is_refused_before_loading(run, db, where):
    run.write("a.json", [rec()])
    (run.tmp / "plain").write_text("x")
    target = run.tmp / "adir" if where == "dir" else run.tmp / "plain" / "s.json"
    (run.tmp / "adir").mkdir()
    code = ingest.main(["--data-dir", str(run.data), "--reject-file", str(run.rejects), "--summary-json", str(target)])
    assert code == 2 and db.count() == 0


# --- 11. a frozen server cannot hang the loader ---------------------------------------------------
def _big_file(run, rows: int = 400_000) -> None:
    with open(run.data / "big.jsonl", "w") as f:
        f.writelines(f'{{"user_id": "u{i % 3}", "metric": "activity", "timestamp": "2024-01-0{1 + i // 86400 % 9}T'
                     f'{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z", "value": {i % 1000}}}\n'
                     for i in range(rows))


def _loader_backends(db, query_like: str = "%COPY %", running_for: float = 0.0) -> list[int]:
    """The loader's backends whose (last) statement is like ``query_like``; with ``running_for``,
    only those still running it after that many seconds."""
    busy = " AND state = 'active' AND query_start <= clock_timestamp() - make_interval(secs => %s)"
    return [pid for (pid,) in db.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'fitbit-ingest' "
                                       "AND datname = current_database() AND query LIKE %s" + (busy if running_for else ""),
                                       (query_like, running_for) if running_for else (query_like,))]


def _start_and_freeze(run, db, *args: str, env: dict | None = None,
                      running_for: float = 0.0) -> tuple[subprocess.Popen, list[int]]:
    """Start the loader; freeze (SIGSTOP) the server backends of its COPY (``running_for``: those in
    a COPY that has run that long, i.e. a large file's, not a one-record file's loading beside it)."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                             "--reject-file", str(run.rejects), "--summary-json", str(run.summary_path), *args],
                            env={**os.environ, **db.env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and proc.poll() is None:
        pids = _loader_backends(db, running_for=running_for)
        if pids:
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            return proc, pids
        time.sleep(0.01)
    proc.kill()
    pytest.fail("the loader never reached its COPY")


def _thaw(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_while_the_server_is_frozen_ends_the_loader_within_10_seconds(run, db, workers):
    _big_file(run)
    run.write("small.json", [rec(ts="2030-01-01T00:00:00Z")])
    # With two workers, small.json loads beside big.jsonl: the COPY frozen must be big.jsonl's.
    proc, pids = _start_and_freeze(run, db, "--workers", workers, running_for=0.5)
    try:
        time.sleep(0.5)  # the server is frozen with the COPY in flight
        asked = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
        took = time.monotonic() - asked
    finally:
        _thaw(pids)
    assert proc.returncode == 143, err
    assert took < 10, took
    assert "big.jsonl" not in {f["file"] for f in run.summary()["files"] if f["status"] == "loaded"}
    deadline = time.monotonic() + 30
    while _loader_backends(db, "%") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert db.query("SELECT count(*) FROM raw_data WHERE user_id LIKE 'u%%' AND metric = 'activity' "
                    "AND \"timestamp\" < '2030-01-01'") == [(0,)]  # the file in flight rolled back whole


def test_a_stalled_connection_is_dropped_and_the_file_retried(run, db):
    _big_file(run, 100_000)
    proc, pids = _start_and_freeze(run, db, env={"STALL_TIMEOUT": "2"})
    try:
        deadline, line = time.monotonic() + 30, ""
        while time.monotonic() < deadline and proc.poll() is None and "retrying in" not in line:
            line = proc.stderr.readline()
        # Cut by the watchdog (STALL_TIMEOUT) or by TCP (tcp_user_timeout, set to the same limit).
        assert "retrying in" in line, line
    finally:
        _thaw(pids)  # the old backend sees its client gone, ends, and frees the file's claim
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert db.count() == 100_000


def test_a_long_wait_on_the_server_is_not_a_stall(run, db):
    """A lock another session holds: the server is working (waiting on a lock), not frozen. The
    watchdog asks it over a second connection at each STALL_TIMEOUT and leaves the call alone."""
    run.write("a.json", [rec()])
    blocker = psycopg2_connect(db)
    with blocker.cursor() as cur:
        cur.execute("LOCK TABLE raw_data IN ACCESS EXCLUSIVE MODE")
    try:
        proc = subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                                 "--reject-file", str(run.rejects)], env={**os.environ, **db.env(), "STALL_TIMEOUT": "1"},
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not _loader_backends(db):
            time.sleep(0.05)
        time.sleep(4)  # four stall limits go by while the COPY waits for the lock
        assert proc.poll() is None
    finally:
        blocker.rollback()
        blocker.close()
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "STALL_TIMEOUT" not in err and "retrying" not in err
    assert db.count() == 1


def psycopg2_connect(db):
    from tests.conftest import connect

    return connect(db.name)
