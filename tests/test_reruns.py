"""Re-runs: manifest, run log, update mode, kill -9, database restart, concurrent loaders, signals."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

import ingest
from tests.conftest import ROOT, SETTINGS, rec


def sample(run, *args: str) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample.py"), str(run.data), *args],
                   check=True, capture_output=True)


def loaded_files(summary: dict) -> list[str]:
    return [f["file"] for f in summary["files"] if f["status"] == "loaded"]


# --- the manifest ----------------------------------------------------------------------------
def test_manifest_row_is_written_with_the_files_rows(run, db):
    path = run.write("a.json", [rec(value=1), rec(value=2), rec(ts="2024-01-01T00:00:01Z", value="x")])
    assert run() == 1
    run_id = run.summary()["run_id"]
    (row,) = db.query("SELECT path, size, mtime_ns, sha256, status, records_read, records_rejected, "
                      "rows_inserted, rows_duplicate, run_id FROM ingest_files")
    st = path.stat()
    assert row == ("a.json", st.st_size, st.st_mtime_ns, hashlib.sha256(path.read_bytes()).hexdigest(),
                   "loaded", 3, 1, 1, 1, run_id)


def test_unchanged_file_is_skipped_without_being_parsed(run, db, monkeypatch):
    run.write("a.json", [rec()])
    assert run() == 0

    def no_parsing(self, digest=None):
        raise AssertionError(f"{self.rel} was parsed")

    monkeypatch.setattr(ingest.DataFile, "records", no_parsing)
    assert run() == 0
    s = run.summary()
    assert (s["files_seen"], s["files_skipped"], s["records_read"]) == (1, 1, 0)
    assert s["files"][0]["status"] == "skipped"


def test_touched_but_identical_file_is_skipped_by_hash(run, db, monkeypatch):
    path = run.write("a.json", [rec()])
    assert run() == 0
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 5_000_000_000))
    monkeypatch.setattr(ingest.DataFile, "records", lambda self, digest=None: iter(()))  # would load 0
    assert run() == 0
    assert run.summary()["files_skipped"] == 1
    assert db.query("SELECT mtime_ns FROM ingest_files") == [(path.stat().st_mtime_ns,)]


def test_changed_file_is_processed_again(run, db):
    path = run.write("a.json", [rec(value=1)])
    assert run() == 0
    path.write_text(json.dumps([rec(value=1), rec(ts="2024-01-01T00:00:09Z", value=9)]))
    assert run() == 0
    s = run.summary()
    assert (s["files_loaded"], s["rows_inserted"], s["rows_duplicate"]) == (1, 1, 1)
    assert db.count() == 2
    assert db.query("SELECT records_read, size FROM ingest_files") == [(2, path.stat().st_size)]


def test_failed_file_is_recorded_and_skipped_until_it_changes(run, db):
    path = run.write("a.json", "[{broken")
    assert run() == 1
    assert db.query("SELECT status, error LIKE 'invalid JSON%%' FROM ingest_files") == [("failed", True)]
    assert run() == 1  # not parsed again, but not loaded either: never a clean exit
    assert run.summary()["files"][0]["status"] == "failed_before"
    path.write_text(json.dumps([rec()]))
    assert run() == 0
    assert db.count() == 1 and db.query("SELECT status FROM ingest_files") == [("loaded",)]


def test_run_log_records_each_run(run, db):
    run.write("a.json", [rec(value=1), rec(value="bad")])
    assert run() == 1
    assert run() == 0
    runs = db.query("SELECT run_id, status, files_seen, files_loaded, files_skipped, records_read, "
                    "records_rejected, rows_inserted, host, version, finished_at IS NOT NULL FROM ingest_runs "
                    "ORDER BY run_id")
    assert [r[1:8] for r in runs] == [("rejects", 1, 1, 0, 2, 1, 1), ("ok", 1, 0, 1, 0, 0, 0)]
    assert all(r[9] == ingest.__version__ and r[10] for r in runs)
    assert runs[1][0] == run.summary()["run_id"]


# --- --on-conflict update --------------------------------------------------------------------
def test_update_mode_stores_changed_values_and_counts_them(run, db):
    path = run.write("a.json", [rec(ts=f"2024-01-01T00:00:0{i}Z", value=i) for i in range(4)])
    assert run() == 0
    path.write_text(json.dumps([rec(ts="2024-01-01T00:00:00Z", value=0),  # same value
                                rec(ts="2024-01-01T00:00:01Z", value=10),  # changed
                                rec(ts="2024-01-01T00:00:01Z", value=11),  # repeated: first wins
                                rec(ts="2024-01-01T00:00:05Z", value=5)]))  # new
    assert run("--on-conflict", "update") == 0
    s = run.summary()
    assert (s["rows_inserted"], s["rows_updated"], s["rows_duplicate"]) == (1, 1, 2)
    assert [r[3] for r in db.rows()] == [0.0, 10.0, 2.0, 3.0, 5.0]
    assert db.query("SELECT count(*) FROM ingest_run_keys") == [(0,)]  # scratch emptied at the end


def test_update_mode_keeps_first_in_order_across_files_of_one_run(run, db, monkeypatch):
    db.query("INSERT INTO raw_data VALUES ('u1', 'activity', '2024-01-01T00:00:00Z', 1)")
    run.write("a.json", [rec(value=2)])
    run.write("b.json", [rec(value=3)])
    monkeypatch.setenv("ON_CONFLICT", "update")
    assert run() == 0
    assert [r[3] for r in db.rows()] == [2.0]
    assert [(f["file"], f["rows_updated"], f["rows_duplicate"]) for f in run.summary()["files"]] == \
        [("a.json", 1, 0), ("b.json", 0, 1)]


def test_default_mode_never_updates(run, db):
    path = run.write("a.json", [rec(value=1)])
    assert run() == 0
    path.write_text(json.dumps([rec(value=2)]))
    assert run() == 0
    assert [r[3] for r in db.rows()] == [1.0]
    assert run.summary()["rows_updated"] == 0


# --- interruptions ---------------------------------------------------------------------------
def _big_sample(run, users: int = 16) -> None:
    sample(run, "--users", str(users), "--seconds", "40000", "--layout", "per-user")  # 6 files, ~42k records a user


def test_kill_9_at_several_points_then_rerun_equals_a_clean_load(run, db, other_db):
    _big_sample(run)
    clean = subprocess.run([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                            "--reject-file", str(run.tmp / "clean.jsonl")],
                           env={**os.environ, **other_db.env()}, capture_output=True, text=True, check=False)
    assert clean.returncode == 0, clean.stderr
    kills = 0
    # Kill by progress, not by the clock: after the k-th file of each run, and a moment into the
    # next one (mid-COPY, mid-commit or between files, wherever that lands).
    for k, pause in ((1, 0.0), (3, 0.02), (6, 0.05), (10, 0.1)):
        proc = subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                                 "--reject-file", str(run.rejects)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        loaded = 0
        for line in proc.stderr:
            loaded += " loaded " in line
            if loaded == k:
                time.sleep(pause)
                proc.send_signal(signal.SIGKILL)
                kills += 1
                break
        proc.wait()
        proc.stderr.close()
    assert kills == 4
    assert db.fingerprint() != other_db.fingerprint()  # the kills did leave work undone...
    assert run() == 0  # ...which the next run finishes
    assert db.fingerprint() == other_db.fingerprint()
    statuses = [s for (s,) in db.query("SELECT status FROM ingest_runs ORDER BY run_id")]
    assert statuses[:-1] == ["interrupted"] * (len(statuses) - 1) and statuses[-1] == "ok"


def test_sigterm_stops_between_files_with_exit_143(run, db):
    _big_sample(run)
    proc = subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                             "--reject-file", str(run.rejects), "--summary-json", str(run.summary_path)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if " loaded " in line:  # the first file is in; stop during the second
            proc.send_signal(signal.SIGTERM)
            break
    proc.stderr.read()
    assert proc.wait(timeout=60) == 143
    s = run.summary()
    assert s["status"] == "interrupted" and 1 <= s["files_loaded"] < 96
    assert db.query("SELECT count(*) FROM ingest_files") == [(s["files_loaded"],)]
    assert db.count() == s["rows_inserted"]  # only whole files, and every committed one counted
    assert db.query("SELECT status FROM ingest_runs") == [("interrupted",)]
    assert run() == 0
    assert run.summary()["files_skipped"] == s["files_loaded"]


def _dev_db_restart() -> None:
    for command in ("down", "up"):
        subprocess.run(["bash", str(ROOT / "scripts" / "dev-db.sh"), command], check=True, capture_output=True)


@pytest.mark.skipif(subprocess.run(["bash", str(ROOT / "scripts" / "dev-db.sh"), "status"],
                                   capture_output=True, check=False).returncode != 0,
                    reason="the database is not the one scripts/dev-db.sh manages, so it cannot be restarted")
def test_database_restart_mid_load_is_survived(run, db, other_db):
    _big_sample(run, users=48)  # long enough (~3M records) to be loading while the server restarts
    clean = subprocess.run([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                            "--reject-file", str(run.tmp / "clean.jsonl")],
                           env={**os.environ, **other_db.env()}, capture_output=True, text=True, check=False)
    assert clean.returncode == 0
    proc = subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                             "--reject-file", str(run.rejects), "--summary-json", str(run.summary_path)],
                            stderr=subprocess.PIPE, text=True)
    for line in proc.stderr:
        if " loaded " in line:
            break
    db.conn.close()
    other_db.conn.close()
    _dev_db_restart()
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 0, err
    assert "retrying" in err
    db.conn = ingest.connect_db({"host": SETTINGS["POSTGRES_HOST"], "port": SETTINGS["POSTGRES_PORT"],
                                 "user": SETTINGS["POSTGRES_USER"], "password": SETTINGS["POSTGRES_PASSWORD"],
                                 "dbname": db.name})
    db.conn.autocommit = True
    other_db.conn = ingest.connect_db({**db.conn.info.dsn_parameters, "dbname": other_db.name,
                                       "password": SETTINGS["POSTGRES_PASSWORD"]})
    other_db.conn.autocommit = True
    assert db.fingerprint()[0] == other_db.fingerprint()[0]
    assert [m[:5] for m in db.fingerprint()[1]] == [m[:5] for m in other_db.fingerprint()[1]]


def test_lasting_outage_mid_run_ends_with_exit_3(run, db, monkeypatch, capsys):
    run.write("a.json", [rec()])
    run.write("b.json", [rec(ts="2024-01-01T00:00:01Z")])
    monkeypatch.setattr(ingest, "RETRY_FIRST_DELAY", 0.01)
    monkeypatch.setattr(ingest, "RETRY_MAX_DELAY", 0.02)
    real_load_file = ingest._Loader._load_file

    def flaky(self, conn, df, wait_ms):
        if df.rel == "b.json":
            conn.close()  # the server "goes away" for good while b.json loads
            monkeypatch.setitem(self.cfg.conninfo, "port", 1)
        return real_load_file(self, conn, df, wait_ms)

    monkeypatch.setattr(ingest._Loader, "_load_file", flaky)
    assert run() == 3
    err = capsys.readouterr().err
    assert "error: cannot connect to" in err or "gave up after" in err
    assert db.count() == 1  # a.json stays loaded, b.json left nothing
    assert db.query("SELECT path FROM ingest_files") == [("a.json",)]


# --- concurrent loaders ----------------------------------------------------------------------
def test_three_loaders_started_together_claim_each_file_once(run, db):
    sample(run, "--users", "10", "--seconds", "3600", "--layout", "per-user")  # 60 files
    procs = [subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                               "--reject-file", str(run.rejects), "--summary-json", str(run.tmp / f"s{i}.json")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(3)]
    errs = [p.communicate(timeout=300)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], errs
    summaries = [json.loads((run.tmp / f"s{i}.json").read_text()) for i in range(3)]
    loaded = [f for s in summaries for f in loaded_files(s)]
    assert sorted(loaded) == sorted(set(loaded)) and len(loaded) == 60  # each file exactly once
    assert sum(s["rows_inserted"] for s in summaries) == db.count() > 0
    assert sum(s["rows_inserted"] for s in summaries) == sum(s["records_read"] for s in summaries)
    assert db.query("SELECT count(*), count(DISTINCT run_id) <= 3 FROM ingest_files") == [(60, True)]


def test_workers_load_files_in_parallel_each_once(run, db):
    sample(run, "--users", "6", "--seconds", "3600", "--layout", "per-user")  # 36 files
    assert run("--workers", "3") == 0
    s = run.summary()
    assert (s["files_loaded"], s["files_busy"]) == (36, 0)
    assert s["rows_inserted"] == db.count() == s["records_read"]
    assert [f["file"] for f in s["files"]] == sorted(f["file"] for f in s["files"])
    assert run("--workers", "3") == 0
    assert run.summary()["files_skipped"] == 36


def test_second_signal_aborts_at_once_and_the_file_in_flight_rolls_back(run, db):
    sample(run, "--users", "30", "--seconds", "86400", "--metrics", "heart_rate")  # one ~2.6M-record file
    proc = subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                             "--reject-file", str(run.rejects), "--summary-json", str(run.summary_path)],
                            stderr=subprocess.PIPE, text=True)
    time.sleep(1.5)
    assert proc.poll() is None, "the load finished before it could be stopped: make the sample bigger"
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    err = proc.communicate(timeout=60)[1]
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert db.count() == 0 and db.query("SELECT count(*) FROM ingest_files") == [(0,)]
    assert db.query("SELECT status FROM ingest_runs") == [("interrupted",)]
    assert run.summary()["status"] == "interrupted"
