"""Nothing mixed, nothing hidden: what a real setup does to the loader never loses, mixes or hides
a file's data, and never stops the files after it.

Each test names a class of failure (issue "Nothing mixed, nothing hidden") and varies it. Real
TimescaleDB; the loader runs in-process (`run`), as plain, with --workers 2 and with --dry-run.
"""
from __future__ import annotations

import gzip
import json
import zlib

import pytest

import ingest
from tests.conftest import rec
from tests.test_privileges import init_script, roles  # noqa: F401 (roles: a fixture)

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
