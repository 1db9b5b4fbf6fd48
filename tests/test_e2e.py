"""End to end through main([...]) against a real TimescaleDB: rows, rejects, summary, exit codes."""
from __future__ import annotations

import datetime as dt
import gzip
import json
import subprocess
import sys
import time

import pytest

import ingest
from tests.conftest import ROOT, SETTINGS, rec

UTC = dt.UTC


def ts(hms: str) -> dt.datetime:
    return dt.datetime.fromisoformat(f"2024-01-01T{hms}+00:00")


def test_loads_valid_records_and_summarises(run, db):
    run.write("heart_rate.json", [rec(ts=f"2024-01-01T00:00:0{i}", value=60 + i) for i in range(5)])
    assert run() == 0
    assert db.rows() == [("u1", "activity", ts(f"00:00:0{i}"), 60.0 + i) for i in range(5)]
    s = run.summary()
    assert {k: s[k] for k in ("files_seen", "files_loaded", "files_failed", "records_read",
                              "records_rejected", "rows_inserted", "rows_duplicate")} == {
        "files_seen": 1, "files_loaded": 1, "files_failed": 0, "records_read": 5,
        "records_rejected": 0, "rows_inserted": 5, "rows_duplicate": 0}
    assert s["status"] == "ok" and s["seconds"] > 0
    assert run.reject_lines() == []


def test_second_run_skips_unchanged_files_and_force_inserts_nothing(run, db):
    run.write("a.json", [rec(ts=f"2024-01-01T00:00:0{i}") for i in range(3)])
    assert run() == 0
    before = db.rows()
    assert run() == 0
    s = run.summary()
    assert (s["files_skipped"], s["files_loaded"], s["records_read"], s["rows_inserted"]) == (1, 0, 0, 0)
    assert run("--force") == 0
    s = run.summary()
    assert (s["files_loaded"], s["rows_inserted"], s["rows_duplicate"], s["records_read"]) == (1, 0, 3, 3)
    assert db.rows() == before


def test_existing_rows_are_never_overwritten(run, db):
    db.query("INSERT INTO raw_data VALUES ('u1', 'spo2', '2024-01-01T00:00:00Z', 99)")
    run.write("a.json", [rec(metric="spo2", value=90), rec(metric="spo2", ts="2024-01-01T00:00:01Z", value=91)])
    assert run() == 0
    assert db.rows() == [("u1", "spo2", ts("00:00:00"), 99.0), ("u1", "spo2", ts("00:00:01"), 91.0)]
    assert (run.summary()["rows_inserted"], run.summary()["rows_duplicate"]) == (1, 1)


def test_first_record_in_file_order_wins(run, db):
    """Duplicates inside a file, across files (sorted path order), and after a direct-COPY attempt."""
    run.write("b/2.json", [rec(value=3), rec(ts="2024-01-01T00:00:05Z", value=30)])
    run.write("a.json", [rec(ts="2024-01-01T00:00:05Z", value=10), rec(value=1),
                         rec(ts="2024-01-01T00:00:05Z", value=11), rec(value=2)])
    run.write("b/1.json", [rec(value=4), rec(ts="2024-01-01T00:00:07Z", value=40)])
    assert run("--batch-size", "1") == 0
    assert db.rows() == [("u1", "activity", ts("00:00:00"), 1.0),
                         ("u1", "activity", ts("00:00:05"), 10.0),
                         ("u1", "activity", ts("00:00:07"), 40.0)]
    s = run.summary()
    assert (s["records_read"], s["rows_inserted"], s["rows_duplicate"]) == (8, 3, 5)
    assert [f["file"] for f in s["files"]] == ["a.json", "b/1.json", "b/2.json"]


def test_same_instant_written_with_different_offsets_is_one_key(run, db):
    run.write("a.json", [rec(ts="2024-01-01T01:00:00+01:00", value=1), rec(ts="2024-01-01T00:00:00Z", value=2),
                         rec(ts="2024-01-01T00:00:00", value=3)])
    assert run() == 0
    assert db.rows() == [("u1", "activity", ts("00:00:00"), 1.0)]


def test_naive_timestamps_follow_source_timezone(run, db):
    run.write("a.json", [rec(ts="2024-07-01T12:00:00", value=1), rec(ts="2024-07-01T12:00:00+00:00", value=2)])
    assert run("--source-timezone", "America/New_York") == 0
    got = {r[2]: r[3] for r in db.rows()}
    assert got == {dt.datetime(2024, 7, 1, 16, 0, tzinfo=UTC): 1.0, dt.datetime(2024, 7, 1, 12, 0, tzinfo=UTC): 2.0}


def test_rejects_are_explained_and_kept_out(run, db):
    run.write("a.json", [rec(value=1), rec(value="x", ts="2024-01-01T00:00:01Z"), rec(metric="steps"),
                         "just a string", rec(ts="2024-01-01T00:00:02Z", value=2)])
    assert run() == 1
    assert [r[3] for r in db.rows()] == [1.0, 2.0]
    lines = run.reject_lines()
    assert [(r["file"], r["position"]) for r in lines] == [("a.json", 2), ("a.json", 3), ("a.json", 4)]
    assert "value must be a number, got string" in lines[0]["reason"]
    assert 'unknown metric "steps"' in lines[1]["reason"]
    assert "record must be a JSON object, got string" in lines[2]["reason"]
    assert json.loads(lines[0]["record"])["value"] == "x"
    s = run.summary()
    assert (s["records_read"], s["records_rejected"], s["rows_inserted"], s["status"]) == (5, 3, 2, "rejects")


def test_rejected_record_is_quoted_to_1000_characters(run, db):
    run.write("a.json", [rec(value="v" * 5000)])
    assert run() == 1
    assert len(run.reject_lines()[0]["record"]) == 1000


def test_invalid_json_file_fails_alone_and_the_run_goes_on(run, db):
    run.write("a.json", '[{"user_id": "u1", "metric": "spo2", "timestamp": "2024-01-01T00:00:00", "value": 1},')
    run.write("b.json", '[{"user_id": "u1", "metric": "spo2", "timestamp": "2024-01-01T00:00:01", "value": 2}] junk')
    run.write("c.json", [rec(metric="spo2", ts="2024-01-01T00:00:02Z", value=93)])
    assert run() == 1
    assert [r[3] for r in db.rows()] == [93.0]  # nothing of a failed file lands
    s = run.summary()
    assert (s["files_seen"], s["files_loaded"], s["files_failed"]) == (3, 1, 2)
    failed = {f["file"]: f["error"] for f in s["files"] if f["status"] == "failed"}
    assert "truncated" in failed["a.json"] and "unexpected data after the JSON array" in failed["b.json"]
    assert [(r["file"], r["position"]) for r in run.reject_lines()] == [("a.json", None), ("b.json", None)]


def test_a_file_is_atomic_even_after_many_batches(run, db):
    good = [rec(ts=f"2024-01-01T00:{i // 60:02d}:{i % 60:02d}Z", value=i) for i in range(500)]
    text = json.dumps(good)[:-1] + ", {broken"
    run.write("a.json", text)
    assert run("--batch-size", "7") == 1
    assert db.count() == 0


def test_input_formats_json_jsonl_ndjson_gz_and_single_object(run, db):
    run.write("1.json", rec(ts="2024-01-01T00:00:01Z"))
    run.write("2.jsonl", "\n".join(json.dumps(rec(ts=f"2024-01-01T00:00:1{i}Z")) for i in range(3)) + "\n\n")
    run.write("3.ndjson", json.dumps(rec(ts="2024-01-01T00:00:20Z")) + "\n")
    run.write("4.json.gz", gzip.compress(json.dumps([rec(ts="2024-01-01T00:00:30Z")]).encode()))
    run.write("5.jsonl.gz", gzip.compress((json.dumps(rec(ts="2024-01-01T00:00:40Z")) + "\n").encode()))
    run.write("deep/er/6.JSON", json.dumps([rec(ts="2024-01-01T00:00:50Z")], indent=4))
    run.write("notes.txt", "not data")
    run.write("7.csv", "user_id,metric\n")
    assert run() == 0
    assert db.count() == 8
    assert run.summary()["files_seen"] == 6


def test_jsonl_bad_line_is_a_record_reject(run, db):
    run.write("a.jsonl", json.dumps(rec()) + "\n{oops\n" + json.dumps(rec(ts="2024-01-01T00:00:01Z")) + "\n")
    assert run() == 1
    assert db.count() == 2
    (line,) = run.reject_lines()
    assert line["position"] == 2 and "invalid JSON on this line" in line["reason"] and line["record"] == "{oops"


def test_loader_bootstraps_an_empty_database_and_makes_a_hypertable(run, empty_db, monkeypatch):
    monkeypatch.setenv("POSTGRES_DB", empty_db.name)
    run.write("a.json", [rec()])
    assert run() == 0
    assert empty_db.query("SELECT hypertable_name FROM timescaledb_information.hypertables") == [("raw_data",)]
    assert empty_db.query("SELECT time_interval FROM timescaledb_information.dimensions "
                          "WHERE hypertable_name = 'raw_data'") == [(dt.timedelta(days=1),)]
    cols = empty_db.query("SELECT column_name, data_type, is_nullable FROM information_schema.columns "
                          "WHERE table_name = 'raw_data' ORDER BY ordinal_position")
    assert cols == [("user_id", "text", "NO"), ("metric", "text", "NO"),
                    ("timestamp", "timestamp with time zone", "NO"), ("value", "double precision", "NO")]


def test_plain_raw_data_from_an_older_loader_is_migrated(run, empty_db, monkeypatch):
    empty_db.query('CREATE TABLE raw_data (user_id TEXT NOT NULL, metric TEXT NOT NULL, '
                   '"timestamp" TIMESTAMPTZ NOT NULL, value DOUBLE PRECISION NOT NULL)')
    empty_db.query("INSERT INTO raw_data VALUES ('old', 'spo2', '2023-06-01T00:00:00Z', 95)")
    monkeypatch.setenv("POSTGRES_DB", empty_db.name)
    run.write("a.json", [rec(user="old", metric="spo2", ts="2023-06-01T00:00:00Z", value=90), rec()])
    assert run() == 0
    assert empty_db.query("SELECT count(*) FROM timescaledb_information.hypertables "
                          "WHERE hypertable_name = 'raw_data'") == [(1,)]
    assert empty_db.query("SELECT value FROM raw_data WHERE user_id = 'old'") == [(95.0,)]
    assert (run.summary()["rows_inserted"], run.summary()["rows_duplicate"]) == (1, 1)


def test_schema_is_reapplied_safely_by_loaders_starting_together(run, empty_db):
    run.write("a.json", [rec()])
    env = {**SETTINGS, "POSTGRES_DB": empty_db.name}
    procs = [subprocess.Popen([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(run.data),
                               "--reject-file", str(run.tmp / f"r{i}.jsonl")],
                              env={**os_environ(), **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for i in range(4)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0, 0], outs
    assert empty_db.count() == 1


def os_environ() -> dict:
    import os

    return {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "DATABASE_URL"))}


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "must be at least 1"),
    (["--batch-size", "many"], "not a whole number"),
    (["--log-level", "LOUD"], "'LOUD' is not one of debug, info, warning, error"),
    (["--on-conflict", "replace"], "'replace' is not one of nothing, update"),
    (["--workers", "0"], "must be at least 1"),
    (["--no-such-flag"], "unrecognized arguments"),
])
def test_bad_flags_exit_2_before_any_io(run, args, message, capsys):
    with pytest.raises(SystemExit) as info:
        run(*args)
    assert info.value.code == 2
    assert message in capsys.readouterr().err
    assert not run.summary_path.exists()


@pytest.mark.parametrize("env, message", [
    ({"BATCH_SIZE": "-5"}, "BATCH_SIZE: must be at least 1"),
    ({"POSTGRES_PORT": "http"}, "POSTGRES_PORT: not a whole number"),
    ({"SOURCE_TIMEZONE": "Mars/Olympus"}, "SOURCE_TIMEZONE: unknown time zone 'Mars/Olympus'"),
    ({"LOG_LEVEL": "chatty"}, "LOG_LEVEL: 'chatty' is not one of debug, info, warning, error"),
    ({"ON_CONFLICT": "merge"}, "ON_CONFLICT: 'merge' is not one of nothing, update"),
    ({"WORKERS": "two"}, "WORKERS: not a whole number"),
])
def test_bad_configuration_exits_2(run, monkeypatch, capsys, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert run() == 2
    err = capsys.readouterr().err
    assert f"error: {message}" in err


def test_missing_data_dir_exits_2(run, capsys):
    assert ingest.main(["--data-dir", str(run.tmp / "nope"), "--reject-file", str(run.rejects)]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_settings_precedence_flag_env_dotenv_default(run, db, monkeypatch):
    """flag > environment > .env > default, shown with DATA_DIR and SOURCE_TIMEZONE."""
    (run.tmp / "from_env").mkdir()
    (run.tmp / "from_dotenv").mkdir()
    (run.tmp / "from_dotenv" / "a.json").write_text(json.dumps([rec(ts="2024-01-01T00:00:00")]))
    (run.tmp / "from_env" / "a.json").write_text(json.dumps([rec(ts="2024-01-01T05:00:00")]))
    (run.tmp / ".env").write_text(f"DATA_DIR={run.tmp / 'from_dotenv'}\nSOURCE_TIMEZONE=Asia/Tokyo\n"
                                  f"POSTGRES_DB={db.name}\n")
    monkeypatch.delenv("POSTGRES_DB")
    base = ["--reject-file", str(run.rejects)]
    assert ingest.main(base) == 0  # .env: Tokyo, from_dotenv
    assert db.rows()[-1][2] == dt.datetime(2023, 12, 31, 15, 0, tzinfo=UTC)
    monkeypatch.setenv("DATA_DIR", str(run.tmp / "from_env"))
    monkeypatch.setenv("SOURCE_TIMEZONE", "UTC")
    assert ingest.main(base) == 0  # environment beats .env
    assert (dt.datetime(2024, 1, 1, 5, 0, tzinfo=UTC)) in [r[2] for r in db.rows()]
    # (from_dotenv/a.json is unchanged since the first run: loading it with other settings takes --force)
    assert ingest.main([*base, "--source-timezone", "Europe/Paris", "--data-dir", str(run.tmp / "from_dotenv"),
                        "--force"]) == 0
    assert dt.datetime(2023, 12, 31, 23, 0, tzinfo=UTC) in [r[2] for r in db.rows()]  # flags beat both
    assert db.count() == 3


def test_explicit_env_file_must_exist(run, capsys):
    assert run("--env-file", str(run.tmp / "missing.env")) == 2
    assert "--env-file" in capsys.readouterr().err


def test_database_url_wins_over_postgres_settings(run, db, monkeypatch):
    s = SETTINGS
    monkeypatch.setenv("DATABASE_URL", f"postgresql://{s['POSTGRES_USER']}:{s['POSTGRES_PASSWORD']}"
                                       f"@{s['POSTGRES_HOST']}:{s['POSTGRES_PORT']}/{db.name}")
    monkeypatch.setenv("POSTGRES_PORT", "1")  # would fail if used
    run.write("a.json", [rec()])
    assert run() == 0
    assert db.count() == 1


def test_unreachable_database_exits_3_quickly_without_password_or_traceback(run):
    secret = "Sup3r-Secret-Pa55"
    run.write("a.json", [rec()])
    started = time.monotonic()
    proc = run.subprocess(env={"POSTGRES_HOST": "127.0.0.1", "POSTGRES_PORT": "1",
                               "POSTGRES_PASSWORD": secret, "CONNECT_TIMEOUT": "2"})
    assert time.monotonic() - started < 30
    assert proc.returncode == 3
    err_lines = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(err_lines) == 1 and "cannot connect to 127.0.0.1:1/" in err_lines[0]
    assert "Traceback" not in proc.stderr and secret not in proc.stderr + proc.stdout


def test_wrong_password_in_url_is_not_printed_even_verbose(run):
    secret = "Another-Secret-9"
    run.write("a.json", [rec()])
    s = SETTINGS
    url = f"postgresql://{s['POSTGRES_USER']}:{secret}@{s['POSTGRES_HOST']}:{s['POSTGRES_PORT']}/nodb"
    proc = run.subprocess("--verbose", "--summary-json", str(run.summary_path), env={"DATABASE_URL": url})
    assert proc.returncode == 2  # a login the server refuses is configuration, not an outage
    assert "password authentication failed" in proc.stderr or "does not exist" in proc.stderr
    assert "is the database running" not in proc.stderr
    assert secret not in proc.stderr + proc.stdout + run.summary_path.read_text()


def test_main_module_exit_code_and_version(run):
    proc = subprocess.run([sys.executable, str(ROOT / "ingest.py"), "--version"], check=False, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout.startswith("ingest.py ")
