"""Operator experience: --dry-run, progress on a terminal, JSON logs, status, warnings, help."""
from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time

import ingest
from tests.conftest import ROOT, rec


def test_dry_run_validates_writes_rejects_and_summary_without_a_database(run, db, monkeypatch):
    run.write("a.json", [rec(value=1), rec(ts="2024-01-01T00:00:01Z", value="x"), rec(value=1)])
    run.write("b.json", "[{broken")
    monkeypatch.setenv("POSTGRES_PORT", "1")  # no database there: a dry run must not need one
    assert run("--dry-run") == 1
    s = run.summary()
    assert (s["files_checked"], s["files_failed"], s["records_read"], s["records_rejected"],
            s["rows_inserted"], s["rows_duplicate"], s["run_id"]) == (1, 1, 3, 1, 0, 1, None)
    reasons = [(r["file"], r["reason"][:22]) for r in run.reject_lines()]
    assert reasons == [("a.json", "value must be a number"), ("b.json", "file failed: invalid J")]
    assert db.count() == 0 and db.query("SELECT count(*) FROM ingest_runs") == [(0,)]


def test_dry_run_of_clean_data_exits_0(run, db):
    run.write("a.json", [rec()])
    assert run("--dry-run") == 0
    assert run.summary()["status"] == "ok" and db.count() == 0


def _run_on_a_terminal(run, *args: str, timeout: float = 60) -> tuple[int, str]:
    """Run the loader with stderr on a pseudo-terminal; return its exit code and what it drew."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                             "--reject-file", str(run.rejects), *args],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=terminal, cwd=run.tmp)
    os.close(terminal)
    chunks, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([controller], [], [], 0.5)
        if ready:
            try:
                data = os.read(controller, 65536)
            except OSError:  # the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
        elif proc.poll() is not None:
            break
    os.close(controller)
    return proc.wait(timeout=timeout), b"".join(chunks).decode("utf-8", "replace")


def _sizeable_sample(run) -> None:
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample.py"), str(run.data),
                    "--seconds", "200000", "--metrics", "heart_rate,spo2"], check=True, capture_output=True)


def test_progress_is_drawn_in_place_on_a_terminal(run, db):
    _sizeable_sample(run)
    code, screen = _run_on_a_terminal(run)
    assert code == 0, screen
    assert "all files" in screen and "heart_rate.json" in screen
    assert "\r" in screen  # redrawn in place
    assert "B/s" in screen and "records" in screen  # rate and records
    assert "loaded heart_rate.json" in screen  # log lines still reach the terminal


def test_no_progress_with_quiet_or_without_a_terminal(run, db):
    _sizeable_sample(run)
    code, screen = _run_on_a_terminal(run, "--quiet", "--force")
    assert code == 0 and "all files" not in screen and "loaded" not in screen
    proc = run.subprocess("--force")
    assert proc.returncode == 0 and "all files" not in proc.stderr and "loaded heart_rate.json" in proc.stderr


def test_json_log_lines(run, db):
    run.write("a.json", [rec(value=1), rec(value=2)])
    proc = run.subprocess("--log-format", "json")
    assert proc.returncode == 0
    lines = [json.loads(line) for line in proc.stderr.splitlines()]
    assert all({"time", "level", "message"} <= set(line) for line in lines)
    (file_event,) = [line for line in lines if line.get("event") == "file"]
    assert (file_event["file"], file_event["records_read"], file_event["rows_inserted"]) == ("a.json", 2, 1)
    assert file_event["rows_duplicate"] == 1 and file_event["level"] == "info"
    (summary,) = [line for line in lines if line.get("event") == "summary"]
    assert (summary["records_read"], summary["exit_code"], summary["status"]) == (2, 0, "ok")
    assert any(line.get("conflicting_repeats") == 1 for line in lines)  # the data-quality warning


def test_json_log_error_line(run, monkeypatch):
    run.write("a.json", [rec()])
    proc = run.subprocess("--log-format", "json", env={"POSTGRES_PORT": "1", "CONNECT_TIMEOUT": "2"})
    assert proc.returncode == 3
    errors = [json.loads(line) for line in proc.stderr.splitlines() if '"event": "error"' in line]
    assert len(errors) == 1 and errors[0]["exit_code"] == 3 and "cannot connect" in errors[0]["message"]
    assert "Traceback" not in proc.stderr


def test_repeated_keys_with_different_values_are_reported_once_per_file(run, db, caplog):
    run.write("a.json", [rec(value=1), rec(value=2), rec(value=3), rec(ts="2024-01-01T00:00:01Z"),
                         rec(ts="2024-01-01T00:00:01Z")])  # 2 conflicting repeats, 1 identical repeat
    with caplog.at_level("WARNING", logger="ingest"):
        assert run() == 0
    warnings = [r.getMessage() for r in caplog.records if "repeat a key" in r.getMessage()]
    assert len(warnings) == 1
    assert warnings[0].startswith("a.json: 2 records repeat a key seen earlier in the file with a different value")
    assert "u1 activity 2024-01-01T00:00:00+00:00: 1.0 then 2.0" in warnings[0]
    assert [r[3] for r in db.rows()] == [1.0, 60.0]


def test_status_shows_data_runs_and_failed_files(run, db):
    run.write("a.json", [rec(user="u1", value=1), rec(user="u2", value=2), rec(user="u2", ts="2024-01-02T00:00:00Z")])
    run.write("b.json", "not json")
    assert run() == 1
    proc = subprocess.run([sys.executable, str(ROOT / "ingest.py"), "status", "--json"], capture_output=True,
                          text=True, check=False, cwd=run.tmp)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert [(d["metric"], d["user_id"], d["count"]) for d in report["data"]] == [("activity", "u1", 1),
                                                                                  ("activity", "u2", 2)]
    assert report["data"][1]["min"].startswith("2024-01-01") and report["data"][1]["max"].startswith("2024-01-02")
    (last,) = report["runs"]
    assert (last["status"], last["files_loaded"], last["files_failed"], last["rows_inserted"]) == ("rejects", 1, 1, 3)
    assert [(f["path"], f["run_id"]) for f in report["failed_files"]] == [("b.json", last["run_id"])]
    text = subprocess.run([sys.executable, str(ROOT / "ingest.py"), "status"], capture_output=True, text=True,
                          check=False, cwd=run.tmp).stdout
    assert "raw_data" in text and "recent runs" in text and "files that failed (and have not loaded since)" in text
    assert "u2" in text and "b.json" in text and "rejects" in text


def test_status_without_a_database_exits_3(run, monkeypatch, capsys):
    monkeypatch.setenv("POSTGRES_PORT", "1")
    monkeypatch.setenv("CONNECT_TIMEOUT", "2")
    assert ingest.main(["status"]) == 3
    assert "error: cannot connect" in capsys.readouterr().err


def test_help_lists_every_flag_with_its_variable_and_default():
    proc = subprocess.run([sys.executable, str(ROOT / "ingest.py"), "--help"], capture_output=True, text=True,
                          check=False, env={**os.environ, "COLUMNS": "200"})
    assert proc.returncode == 0
    options = " ".join(proc.stdout.split()).split(" -")  # one entry per option, white space folded
    expected = [("--data-dir", "DATA_DIR", "./Task-0/extracted_data"), ("--source-timezone", "SOURCE_TIMEZONE", "UTC"),
                ("--batch-size", "BATCH_SIZE", "2000"), ("--on-conflict", "ON_CONFLICT", "nothing"),
                ("--workers", "WORKERS", "1"), ("--reject-file", "REJECT_FILE", "./rejects/rejects.jsonl"),
                ("--connect-timeout", "CONNECT_TIMEOUT", "5"), ("--statement-timeout", "STATEMENT_TIMEOUT", "0"),
                ("--stall-timeout", "STALL_TIMEOUT", "120"), ("--log-level", "LOG_LEVEL", "INFO"),
                ("--log-format", "LOG_FORMAT", "text")]
    for flag, env, default in expected:  # written out: the help and this list are two sources
        (entry,) = [o for o in options if o.startswith(flag[1:] + " ")]
        assert f"(env {env}; default {default})" in entry
    for flag in ("--dry-run", "--force", "--quiet", "--summary-json", "--env-file", "--no-bootstrap", "--version"):
        assert flag in proc.stdout
    assert "status" in proc.stdout and "Exit codes" in proc.stdout
