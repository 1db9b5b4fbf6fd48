"""Nothing mixed, nothing hidden: what a real setup does to the loader never loses, mixes or hides
a file's data, and never stops the files after it.

Each test names a class of failure (issue "Nothing mixed, nothing hidden") and varies it. Real
TimescaleDB; the loader runs in-process (`run`), as plain, with --workers 2 and with --dry-run.
"""
from __future__ import annotations

import datetime as dt
import gzip
import json
import os
import signal
import subprocess
import sys
import zlib

import pytest

import ingest
from tests.conftest import ROOT, rec
from tests.test_privileges import PSQL, _owner_env, init_script, roles  # noqa: F401 (roles: a fixture)

sys.path.insert(0, str(ROOT / "scripts"))
from make_fitbit_export import make_takeout

MODES = pytest.mark.parametrize("args", [(), ("--workers", "2"), ("--dry-run",)], ids=["plain", "workers", "dry-run"])


def statuses(run) -> dict[str, str]:
    return {f["file"]: f["status"] for f in run.summary()["files"]}


def records(n: int, user: str = "u1") -> list[dict]:
    return [rec(user=user, ts=f"2024-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}Z", value=i % 90)
            for i in range(n)]


def damaged(data: bytes, at: float, width: int) -> bytes:
    """A gzip file with ``width`` bytes of its deflate data overwritten, from about ``at`` of its
    length on: bad deflate data in the middle (not a truncation), which zlib itself refuses (the
    first such place from there; most places only spoil the CRC, which gzip has always caught)."""
    for where in range(int(len(data) * at), len(data) - 8 - width):
        spoilt = data[:where] + b"\xff" * width + data[where + width :]
        try:
            gzip.decompress(spoilt)
        except zlib.error:  # the class: neither an OSError nor an EOFError
            return spoilt
        except (OSError, EOFError):
            continue
    raise AssertionError("no place found where zlib refuses the data")


# --- 2. a damaged .json.gz fails alone, in every mode ---------------------------------------
@MODES
@pytest.mark.parametrize("at, width", [(0.3, 64), (0.5, 8), (0.8, 200)])
def test_a_gzip_file_damaged_in_the_middle_fails_alone(run, db, args, at, width):
    run.write("a.json", records(10))
    good = gzip.compress(json.dumps(records(20_000, "u2")).encode(), 6)
    run.write("b.json.gz", damaged(good, at, width))
    run.write("c.json", records(10, "u3"))
    assert run(*args) == 1
    got = statuses(run)
    assert got["b.json.gz"] == "failed"
    assert got["a.json"] in ("loaded", "checked") and got["c.json"] in ("loaded", "checked")
    (failed,) = [f for f in run.summary()["files"] if f["file"] == "b.json.gz"]
    assert "not a valid gzip file" in failed["error"]
    if "--dry-run" not in args:
        assert db.count() == 20  # a and c; nothing of b
        assert db.query("SELECT status FROM ingest_files WHERE path = 'b.json.gz'") == [("failed",)]
        assert run(*args) == 1  # unchanged: still failed, and said so
        assert statuses(run)["b.json.gz"] == "failed_before"


# --- 3. text no database value can hold (NUL, a lone surrogate) in a failure's reason ---------
NUL_FAILURES = [
    pytest.param("Takeout/Fitbit/Oxygen Saturation (SpO2)/Minute SpO2 - 2023-01-01.csv",
                 "time\x00stamp,value\n2023-01-01T00:00:00,97\n", id="csv-header-with-a-NUL"),
    pytest.param("Takeout/Fitbit/Oxygen Saturation (SpO2)/Minute SpO2 - 2023-01-02.csv",
                 "time\ud800stamp,value\n2023-01-01T00:00:00,97\n", id="csv-header-with-a-lone-surrogate"),
]


@MODES
@pytest.mark.parametrize("rel, content", NUL_FAILURES)
def test_a_failure_whose_reason_quotes_a_nul_is_recorded_and_ends_that_file_alone(run, db, args, rel, content):
    run.write("a.json", records(5))
    run.write(rel, content.encode("utf-8", "surrogatepass"))
    run.write("z.json", records(5, "u9"))
    code = run("--user-id", "alice", *args)
    assert code == 1
    files = {f["file"]: f for f in run.summary()["files"]}
    assert files[rel]["status"] == "failed" and files[rel]["error"]
    assert files["z.json"]["status"] in ("loaded", "checked")  # the files after it still load
    assert run.summary()["status"] != "ok"  # this run's own summary, not an older one
    if "--dry-run" not in args:
        (error,) = [e for (e,) in db.query("SELECT error FROM ingest_files WHERE path = %s", (rel,))]
        assert "\x00" not in error and error  # stored, in a form PostgreSQL takes
        assert db.count() == 10


# --- 4. rows the database declines without an error (a BEFORE INSERT trigger returning NULL) ---
FILTER = """
CREATE FUNCTION keep_small() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN IF NEW.value > 100 THEN RETURN NULL; END IF; RETURN NEW; END $$;
CREATE TRIGGER keep_small BEFORE INSERT ON raw_data FOR EACH ROW EXECUTE FUNCTION keep_small();
"""


@pytest.mark.parametrize("path", ["direct", "staged"])
def test_rows_a_trigger_declines_fail_that_file_alone_and_are_never_counted_as_duplicates(run, db, path):
    db.query(FILTER)
    if path == "staged":  # a key already there sends the file through the staging table
        db.query("INSERT INTO raw_data VALUES ('u2', 'activity', '2024-01-01T00:00:00Z', 5)")
    run.write("a.json", [rec(user="u1", value=5)])
    run.write("b.json", [rec(user="u2", value=5), rec(user="u2", ts="2024-01-01T00:00:01Z", value=150),
                         rec(user="u2", ts="2024-01-01T00:00:02Z", value=7)])
    run.write("c.json", [rec(user="u3", value=9)])
    assert run() == 1
    files = {f["file"]: f for f in run.summary()["files"]}
    assert files["a.json"]["status"] == "loaded" and files["c.json"]["status"] == "loaded"
    assert files["b.json"]["status"] == "failed" and "trigger or rule on raw_data declined 1" in files["b.json"]["error"]
    assert run.summary()["rows_duplicate"] == 0
    assert db.query("SELECT user_id FROM raw_data ORDER BY user_id") == (
        [("u1",), ("u2",), ("u3",)] if path == "staged" else [("u1",), ("u3",)])
    db.query("DROP TRIGGER keep_small ON raw_data")
    assert run() == 0  # the cause has gone: the file loads whole
    assert statuses(run)["b.json"] == "loaded"


# --- 7. a reachable server that refuses what every run needs: one clear line, exit 2 ----------
def one_error(err: str) -> str:
    assert "Traceback" not in err, err
    (line,) = [line for line in err.splitlines() if line.startswith("error:")]
    return line


def test_a_read_only_database_stops_the_run_with_the_fix_and_exit_2(run, db, capsys):
    run.write("a.json", [rec()])
    assert run() == 0  # the schema is there: nothing is left for a run to create
    db.query(f'ALTER DATABASE "{db.name}" SET default_transaction_read_only = on')
    run.write("b.json", [rec(ts="2024-01-01T00:00:01Z")])
    capsys.readouterr()
    assert run() == 2
    err = capsys.readouterr().err
    assert "read-only transaction" in one_error(err)
    assert "hint: " in err and "default_transaction_read_only = off" in err
    assert run.summary()["status"] == "failed"


@pytest.mark.parametrize("revoke, fragment", [
    ("REVOKE INSERT ON ingest_runs FROM {role}", "ingest_runs"),
    ("REVOKE SELECT ON ingest_files FROM {role}", "ingest_files"),
])
def test_a_role_missing_a_right_stops_the_run_with_the_fix_and_exit_2(run, db, roles, monkeypatch, capsys,  # noqa: F811
                                                                       revoke, fragment):
    role = roles()
    init_script(db, role)
    db.query(revoke.format(role=f'"{role.name}"'))
    monkeypatch.setenv("POSTGRES_USER", role.name)
    monkeypatch.setenv("POSTGRES_PASSWORD", role.password)
    run.write("a.json", [rec()])
    assert run("--no-bootstrap") == 2
    err = capsys.readouterr().err
    line = one_error(err)
    assert "permission denied" in line and fragment in line and role.password not in err
    assert "sql/roles.sql" in err
    assert db.count() == 0


@pytest.mark.parametrize("as_json", [False, True])
def test_status_on_a_database_the_loader_never_ran_on_says_so_in_the_format_asked(empty_db, monkeypatch,
                                                                                   capsys, as_json):
    for key, value in empty_db.env().items():
        monkeypatch.setenv(key, str(value))
    assert ingest.main(["status", *(["--json"] if as_json else [])]) == 0
    out = capsys.readouterr().out
    if as_json:
        report = json.loads(out)
        assert report["data"] == [] and report["runs"] == [] and report["failed_files"] == []
        assert any("nothing loaded here yet" in note for note in report["notes"])
    else:
        assert "raw_data" in out and "note: " in out and "nothing loaded here yet" in out


def test_status_that_cannot_connect_answers_in_json_when_asked(monkeypatch, capsys):
    monkeypatch.setenv("POSTGRES_PORT", "1")
    monkeypatch.setenv("CONNECT_TIMEOUT", "2")
    assert ingest.main(["status", "--json"]) == 3
    report = json.loads(capsys.readouterr().out)
    assert report["exit_code"] == 3 and "cannot connect" in report["error"]


# --- 6. a search_path that puts another schema's raw_data first --------------------------------
DECOY = """
CREATE SCHEMA reporting;
CREATE TABLE reporting.raw_data (user_id text, metric text, "timestamp" timestamptz, value float8,
                                 PRIMARY KEY (user_id, metric, "timestamp"));
CREATE TABLE reporting.seen (who text);
CREATE FUNCTION reporting.spy() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN INSERT INTO reporting.seen VALUES (current_user); RETURN NEW; END $$;
CREATE TRIGGER spy BEFORE INSERT ON reporting.raw_data FOR EACH ROW EXECUTE FUNCTION reporting.spy();
CREATE TABLE reporting.ingest_files (LIKE public.ingest_files);
"""


@pytest.mark.parametrize("when", ["before the first run", "after the first run"])
def test_a_search_path_that_puts_another_raw_data_first_sends_no_row_there(run, empty_db, when):
    db = empty_db
    run.mp.setenv("POSTGRES_DB", db.name)
    run.write("a.json", [rec()])
    if when == "after the first run":
        assert run() == 0
        db.query(DECOY)
    else:
        db.query("CREATE EXTENSION IF NOT EXISTS timescaledb")
        db.query(DECOY.replace("(LIKE public.ingest_files)", "(path text)"))
    db.query(f'ALTER DATABASE "{db.name}" SET search_path = "$user", reporting, public')
    run.write("b.json", [rec(ts="2024-01-01T00:00:01Z")])
    assert run() == 0
    assert db.query("SELECT count(*) FROM public.raw_data") == [(2,)]
    assert db.query("SELECT count(*) FROM reporting.raw_data") == [(0,)]
    assert db.query("SELECT count(*) FROM reporting.seen") == [(0,)]
    assert db.query("SELECT count(*) FROM public.ingest_files WHERE status = 'loaded'") == [(2,)]


def test_a_raw_data_that_is_not_a_hypertable_is_refused_before_any_row(run, empty_db, capsys):
    db = empty_db
    run.mp.setenv("POSTGRES_DB", db.name)
    run.write("a.json", [rec()])
    assert run() == 0
    db.query("ALTER TABLE public.raw_data RENAME TO raw_data_hyper")
    db.query('CREATE TABLE public.raw_data (user_id text NOT NULL, metric text NOT NULL, "timestamp" timestamptz '
             'NOT NULL, value float8 NOT NULL, PRIMARY KEY (user_id, metric, "timestamp"))')
    run.write("b.json", [rec(ts="2024-01-01T00:00:01Z")])
    capsys.readouterr()
    assert run("--no-bootstrap") == 2
    assert "not a TimescaleDB hypertable" in one_error(capsys.readouterr().err)
    assert db.query("SELECT count(*) FROM public.raw_data") == [(0,)]


# --- 8. a file that holds records is never ignored for where it lies --------------------------
def task0_text(user: str, pad: int = 0) -> str:
    first = {"note": "x" * pad, **rec(user=user)} if pad else rec(user=user)
    return json.dumps([first, rec(user=user, ts="2024-01-01T00:00:01Z")], indent=2)


@pytest.mark.parametrize("name, content", [
    ("heart_rate.json.gz", gzip.compress(task0_text("gz").encode())),
    ("heart_rate.json", task0_text("utf16").encode("utf-16")),
    ("heart_rate.json", task0_text("late", pad=10_000).encode()),
    ("heart_rate.jsonl", "\n".join(json.dumps(r) for r in json.loads(task0_text("jsonl"))).encode()),
], ids=["gzip", "utf-16", "user_id-after-4-KB", "json-lines"])
@pytest.mark.parametrize("folder", ["fitbit", "Takeout/Fitbit/Global Export Data"])
def test_task0_files_load_inside_a_folder_named_like_an_export(run, db, folder, name, content):
    run.write(f"{folder}/{name}", content)
    run.write(f"{folder}/sleep-2024-01-01.json", json.dumps([{"logId": 1, "dateOfSleep": "2024-01-01"}]))
    assert run("-q") == 0
    got = statuses(run)
    assert got[f"{folder}/{name}"] == "loaded"
    assert got[f"{folder}/sleep-2024-01-01.json"] == "ignored"  # an export's own JSON, no records
    assert db.count() == 2


# --- 1. one export, one id; two people's exports, two ids ------------------------------------
@pytest.mark.parametrize("layout", ["old", "new"])
def test_two_peoples_takeouts_loaded_from_their_takeout_folders_never_share_an_id(run, db, layout):
    for person, seed in (("alice", 1), ("bob", 2)):
        make_takeout(run.tmp / "homes", layout, days=2, user=person, seed=seed)
    for person in ("alice", "bob"):
        assert ingest.main(["--data-dir", str(run.tmp / "homes" / person / "Takeout"), "-q",
                            "--reject-file", str(run.rejects), "--summary-json", str(run.summary_path)]) in (0, 1)
        assert run.summary()["rows_duplicate"] == 0  # nothing of bob's taken for alice's
    users = {u for (u,) in db.query("SELECT DISTINCT user_id FROM raw_data")}
    assert users == {"takeout-alice", "takeout-bob"}


# --- 10. a file that fails after some of its parts committed -----------------------------------
@pytest.mark.parametrize("days, cut", [(150, 30), (250, 5)])
def test_a_multi_part_file_failing_after_a_part_counts_its_committed_rows_and_says_it_failed(
        run, db, capsys, days, cut):
    text = json.dumps([rec(ts=f"{(dt.date(2024, 1, 1) + dt.timedelta(days=d)).isoformat()}T12:00:00Z")
                       for d in range(days)], indent=1)
    run.write("long.json", text[:-cut])  # truncated at the end: its last part cannot be read
    run.write("z.json", [rec(user="u9")])
    assert run() == 1
    committed = db.count() - 1
    assert committed > 0 and committed % 100 == 0  # whole parts of 100 days
    files = {f["file"]: f for f in run.summary()["files"]}
    assert files["long.json"]["status"] == "failed" and "file ends inside" in files["long.json"]["error"]
    assert files["long.json"]["rows_inserted"] == committed
    assert run.summary()["rows_inserted"] == committed + 1
    assert db.query("SELECT status, error IS NOT NULL FROM ingest_files WHERE path = 'long.json'") == [("failed", True)]
    capsys.readouterr()
    assert ingest.main(["status"]) == 0
    assert "long.json" in capsys.readouterr().out.split("files that failed")[1]
    assert run() == 1  # unchanged: not read again, still failed, the committed part still there
    assert statuses(run)["long.json"] == "failed_before" and db.count() == committed + 1


# --- 9. a Takeout left in its archive -----------------------------------------------------------
def zipped_export(path, member: str = "Takeout/Fitbit/Global Export Data/heart_rate-2024-01-01.json") -> None:
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(member, json.dumps([{"dateTime": "01/01/24 00:00:00", "value": {"bpm": 60, "confidence": 2}}]))


@pytest.mark.parametrize("name", ["takeout-20240101T000000Z-001.zip", "export.tgz", "Takeout.tar.gz"])
def test_a_data_dir_holding_only_an_archive_says_to_extract_it_and_never_exits_0(run, db, capsys, name):
    if name.endswith(".zip"):
        zipped_export(run.data / name)
    else:
        import tarfile

        with tarfile.open(run.data / name, "w:gz") as archive:
            archive.add(__file__, arcname="Takeout/Fitbit/x.json")
    assert run() == 2
    err = capsys.readouterr().err
    assert "only 1 archive" in one_error(err) and "extract it" in err
    assert db.count() == 0


def test_an_archive_as_data_dir_says_to_extract_it(run, capsys):
    archive = run.tmp / "takeout-20240101T000000Z-001.zip"
    zipped_export(archive)
    assert ingest.main(["--data-dir", str(archive)]) == 2
    err = capsys.readouterr().err
    assert "is a zip archive, not a directory" in one_error(err) and "unzip" in err


def test_an_archive_beside_data_is_named_in_a_warning_that_quiet_shows(run, db, capsys):
    zipped_export(run.data / "takeout-20240101T000000Z-001.zip")
    run.write("a.json", [rec()])
    assert run("-q") == 0
    assert "takeout-20240101T000000Z-001.zip is a zip archive" in capsys.readouterr().err
    assert db.count() == 1


# --- 5. two data directories, one database ------------------------------------------------------
def same_name_same_stat(run, user_a: str, user_b: str, records_of) -> tuple:
    a, b = run.tmp / "dir_a", run.tmp / "dir_b"
    for folder, user in ((a, user_a), (b, user_b)):
        folder.mkdir()
        (folder / "heart_rate.json").write_text(json.dumps(records_of(user)))
    st = (a / "heart_rate.json").stat()
    os.utime(b / "heart_rate.json", ns=(st.st_atime_ns, st.st_mtime_ns))  # as cp -p or rsync -t leave them
    assert (b / "heart_rate.json").stat().st_size == st.st_size
    return a, b


def load_dir(run, folder, *args) -> int:
    return ingest.main(["--data-dir", str(folder), "--reject-file", str(run.rejects), "--summary-json",
                        str(run.summary_path), *args])


def test_two_directories_with_the_same_file_names_sizes_and_times_each_load_their_own(run, db):
    a, b = same_name_same_stat(run, "ua", "ub", lambda user: [rec(user=user, ts=f"2024-01-01T00:00:0{i}Z")
                                                              for i in range(5)])
    assert load_dir(run, a) == 0
    assert load_dir(run, b) == 0
    assert statuses(run)["heart_rate.json"] == "loaded"
    assert db.query("SELECT user_id, count(*) FROM raw_data GROUP BY 1 ORDER BY 1") == [("ua", 5), ("ub", 5)]
    assert load_dir(run, a) == 0 and statuses(run)["heart_rate.json"] == "skipped"  # each its own row
    assert load_dir(run, b) == 0 and statuses(run)["heart_rate.json"] == "skipped"


def days(user: str, n: int = 150) -> list[dict]:
    return [rec(user=user, ts=f"{(dt.date(2024, 1, 1) + dt.timedelta(days=d)).isoformat()}T12:00:00Z")
            for d in range(n)]


def stop_after_the_first_part(monkeypatch):
    """As if the run were stopped between the file's parts: the first part stays committed."""
    def stopped(self, conn, df, done):
        raise ingest.Interrupted(signal.SIGTERM)

    monkeypatch.setattr(ingest._Loader, "_reclaim", stopped)


def test_a_resume_is_never_taken_from_another_directorys_file_of_the_same_name(run, db, monkeypatch):
    a, b = same_name_same_stat(run, "ua", "ub", days)
    with monkeypatch.context() as patches:
        stop_after_the_first_part(patches)
        load_dir(run, a)
    assert db.count() == 100  # dir_a's first part, committed
    assert load_dir(run, b) == 0
    assert db.query("SELECT count(*) FROM raw_data WHERE user_id = 'ub'") == [(150,)]  # all of dir_b's


def test_a_resume_proves_it_is_the_same_file(run, db, monkeypatch):
    path = run.write("heart_rate.json", days("u1"))
    with monkeypatch.context() as patches:
        stop_after_the_first_part(patches)
        run()
    assert db.count() == 100
    st = path.stat()
    path.write_text(json.dumps(days("u2")))  # other bytes, the same size and time
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert path.stat().st_size == st.st_size
    assert run() == 0
    assert db.query("SELECT count(*) FROM raw_data WHERE user_id = 'u2'") == [(150,)]  # read from its start


# --- 11. a re-run with corrected settings --------------------------------------------------------
def test_a_rerun_with_other_settings_says_the_files_were_loaded_with_others(run, db, capsys):
    make_takeout(run.data, "old", days=1, user="alice", seed=3)
    assert run("--user-id", "wrong", "-q") in (0, 1)
    recorded = {s for (s,) in db.query("SELECT DISTINCT settings FROM ingest_files WHERE status = 'loaded'")}
    assert "user_id=wrong; source_timezone=UTC; format=auto" in recorded  # (a flat file among them has no user id)
    assert all(s.endswith("source_timezone=UTC; format=auto") for s in recorded)
    capsys.readouterr()
    assert run("--user-id", "alice", "-q") in (0, 1)
    err = capsys.readouterr().err
    assert "were loaded with other settings (user_id=wrong; source_timezone=UTC; format=auto)" in err
    assert "Loaded with the wrong settings" in err  # where the fix is documented
    capsys.readouterr()
    assert run("--user-id", "wrong", "-q") in (0, 1)  # the same settings again: nothing to say
    assert "other settings" not in capsys.readouterr().err


def test_a_manifest_keyed_by_path_alone_is_keyed_again_by_the_run_that_wrote_each_row(run, db):
    run.write("a.json", [rec()])
    assert run() == 0
    db.query("ALTER TABLE public.ingest_files DROP CONSTRAINT ingest_files_pkey")  # as 0.2 left it
    db.query("UPDATE public.ingest_files SET data_dir = ''")
    db.query("ALTER TABLE public.ingest_files ADD PRIMARY KEY (path)")
    db.query("COMMENT ON TABLE public.ingest_runs IS NULL")  # so that the schema is applied again
    assert run() == 0
    assert statuses(run) == {"a.json": "skipped"}  # known, not read again
    assert db.query("SELECT data_dir FROM public.ingest_files") == [(str(run.data.resolve()),)]


def test_forget_export_sql_lets_the_owner_replace_an_exports_rows(run, db):
    make_takeout(run.data, "old", days=1, user="alice", seed=3)
    assert run("--user-id", "wrong", "-q") in (0, 1)
    loaded = db.query("SELECT count(*) FROM raw_data WHERE user_id = 'wrong'")[0][0]
    assert loaded > 0
    proc = subprocess.run([PSQL, "-X", "-v", "user_id=wrong", "-v", f"data_dir={run.data.resolve()}",
                           "-v", "path_prefix=alice/", "-f", str(ROOT / "sql" / "forget_export.sql")],
                          env=_owner_env(db), capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    assert f"{loaded}" in proc.stdout
    assert run("--user-id", "alice", "-q") in (0, 1)
    assert db.query("SELECT user_id, count(*) FROM raw_data GROUP BY 1") == [("alice", loaded)]


def test_forget_export_sql_does_nothing_without_its_settings(db):
    proc = subprocess.run([PSQL, "-X", "-v", "user_id=wrong", "-f", str(ROOT / "sql" / "forget_export.sql")],
                          env=_owner_env(db), capture_output=True, text=True, timeout=60, check=False)
    assert "set the data directory" in proc.stdout + proc.stderr
