"""The next files' rows, made ahead by a helper process on the second core (``_ReadAhead``).

The helper can only save time. A run whose files it reads ahead ends exactly as a run that reads
every file in the loader's own process: the same rows, manifest, summary, rejects (with their
positions) and warnings, file by file, whatever the files hold (rejects, repeats, broken JSON,
several parts, gzip, JSON Lines) and however they load (the direct COPY, the staging table after a
conflict, --on-conflict update, --force). When the helper dies, fails or sends nonsense, the file
in flight is tried again and the rest are read by the loader; no process is left behind.
"""
from __future__ import annotations

import gzip
import json
import logging
import os
import signal
import time

import pytest

import ingest
from tests.conftest import rec


def _day(day: int, second: int) -> str:
    return f"2024-03-{day:02d}T00:00:{second:02d}Z" if second < 60 else \
        f"2024-03-{day:02d}T00:{second // 60:02d}:{second % 60:02d}Z"


def write_mixed(run) -> None:
    """Files of every shape the loader meets, in two folders (their order is the load order)."""
    first = [rec(user="u1", metric="heart_rate", ts=_day(1, s), value=60 + s % 40) for s in range(300)]
    first[10] = rec(user="u1", metric="bogus", ts=_day(1, 10), value=1)  # rejected: unknown metric
    first[20] = {**first[20], "value": 0}  # rejected: out of range
    first[30] = {**first[5], "value": 99}  # a repeat of record 6 with another value: the first wins
    first[40] = {**first[40], "device": "x"}  # an extra key (a warning)
    run.write("a/01.json", json.dumps(first, indent=2))
    lines = [json.dumps(rec(user="u2", metric="steps", ts=_day(2, s), value=s % 50)) for s in range(200)]
    lines[50] = '{"user_id": "u2", "metric": "steps",'  # a bad line: rejected with its line number
    lines.insert(100, "")
    run.write("a/02.jsonl", "\n".join(lines) + "\n")
    broken = json.dumps([rec(user="u3", ts=_day(3, s)) for s in range(100)])
    run.write("a/03.json", broken[: len(broken) // 2])  # truncated: the file fails, rolled back whole
    run.write("a/04.json.gz", gzip.compress(json.dumps([rec(user="u4", ts=_day(4, s)) for s in range(150)]).encode()))
    days = [rec(user="u5", metric="spo2", ts=_day(1 + s // 20, s % 20), value=95) for s in range(200)]
    days[150] = {**days[150], "value": "high"}  # rejected, in a later part
    run.write("a/05.json", json.dumps(days))  # ten days: several parts with PART_CHUNKS = 3
    run.write("a/06.json", "")  # empty: fails
    run.write("b/07.json", json.dumps(first[100:160] + [rec(user="u7", ts=_day(7, 1))]))  # keys of 01.json
    run.write("b/08.json", json.dumps([rec(user="u8", ts=_day(8, 1))]))


@pytest.fixture(autouse=True)
def small(monkeypatch):
    monkeypatch.setattr(ingest, "PART_CHUNKS", 3)


@pytest.fixture
def taken(monkeypatch) -> list[str]:
    """The files whose rows the loader took from the helper."""
    files = []
    real = ingest._ReadAhead.take

    def take(self, df, *args):
        rows = real(self, df, *args)
        if rows is not None:
            files.append(df.rel)
        return rows

    monkeypatch.setattr(ingest._ReadAhead, "take", take)
    return files


@pytest.fixture
def helper_pids(monkeypatch) -> list[int]:
    """Every helper process started."""
    pids = []
    real = ingest._ReadAhead._fork

    def fork(self, at):
        started = real(self, at)
        if started:
            pids.append(self._pid)
        return started

    monkeypatch.setattr(ingest._ReadAhead, "_fork", fork)
    return pids


def reaped(pids: list[int]) -> bool:
    for pid in pids:
        try:
            os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            continue
        return False
    return True


def outcome(run, db, caplog, *args: str) -> dict:
    """Everything a run leaves in ``db``: exit code, rows and manifest, per-file results, rejects
    (this run's) and warnings."""
    for key, value in db.env().items():
        run.mp.setenv(key, str(value))
    run.rejects.unlink(missing_ok=True)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ingest"):
        code = run("--batch-size", "7", *args)
    summary = run.summary()
    results = [{k: v for k, v in r.items() if k != "seconds"} for r in summary["files"]]
    rejects = [{k: v for k, v in r.items() if k != "run_id"} for r in run.reject_lines()]
    warnings = sorted(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
                      and not r.getMessage().startswith("summary"))
    return {"exit": code, "db": db.fingerprint(), "files": results, "rejects": rejects, "warnings": warnings}


def alone(monkeypatch, *args) -> dict:
    """The outcome of the same run with no helper: every file read in the loader's process."""
    with monkeypatch.context() as m:
        m.setattr(ingest._ReadAhead, "start", classmethod(lambda cls, *a: None))
        return outcome(*args)


@pytest.mark.parametrize("args", [(), ("--on-conflict", "update")], ids=["keep first", "update"])
def test_a_run_read_ahead_ends_as_one_reading_every_file_itself(run, db, other_db, caplog, monkeypatch, taken, args):
    write_mixed(run)
    ahead = outcome(run, db, caplog, *args)
    assert len(taken) == 8  # every file's rows came from the helper
    assert ahead["files"][2]["status"] == "failed" and ahead["files"][5]["status"] == "failed"
    assert {r["file"] for r in ahead["rejects"]} == {"a/01.json", "a/02.jsonl", "a/03.json", "a/05.json", "a/06.json"}
    assert any("carry keys other than" in w for w in ahead["warnings"])
    assert any("repeat a key" in w for w in ahead["warnings"])
    assert ahead["files"][6]["rows_duplicate"] == 60  # b/07.json: its COPY met 01's keys, and was staged
    assert ahead == alone(monkeypatch, run, other_db, caplog, *args)
    assert len(taken) == 8  # none taken without the helper


def test_a_forced_rerun_read_ahead_goes_through_the_staging_table_as_one_without(run, db, other_db, caplog,
                                                                                  monkeypatch, taken):
    """--force over files loaded before: every COPY goes to the staging table, with its lines
    numbered (the helper's batches are split into lines for that)."""
    write_mixed(run)
    assert outcome(run, db, caplog) == alone(monkeypatch, run, other_db, caplog)
    changed = json.dumps([rec(user="u1", metric="heart_rate", ts=_day(1, 1), value=61)])
    (run.data / "a/01.json").write_text(changed)
    ahead = outcome(run, db, caplog, "--force", "--on-conflict", "update")
    assert len(taken) == 16
    assert ahead == alone(monkeypatch, run, other_db, caplog, "--force", "--on-conflict", "update")


def _frame(kind: bytes, payload: bytes) -> bytes:
    return kind + len(payload).to_bytes(4, "big") + payload


def _started(df) -> bytes:
    """The frame that opens a file's frames (its stat), as the helper writes it."""
    st = os.stat(df.path)
    return _frame(b"S", json.dumps([st.st_size, st.st_mtime_ns]).encode())


_REJECT = b'{"run_id": null, "file": "a/02.jsonl", "position": 1, "reason": "spooled, then lost", "record": null}\n'


def _dies_after(count: int, then):
    """A helper that makes the first ``count`` files' frames, writes ``then(next file)``, and is killed."""
    real = ingest._read_ahead

    def helper(files, cfg, run_id, chunk_seconds, fd):
        real(files[:count], cfg, run_id, chunk_seconds, os.dup(fd))
        os.write(fd, then(files[count]))
        os.kill(os.getpid(), signal.SIGKILL)

    return helper


@pytest.mark.parametrize(("count", "then"), [
    pytest.param(3, None, id="killed between files"),
    pytest.param(0, None, id="killed at once"),
    pytest.param(3, lambda df: _started(df) + b"L\0\0\x10\0" + b"\0" * 100, id="killed inside a frame"),
    pytest.param(1, lambda df: _started(df) + _frame(b"Z", b""), id="sends nonsense"),
    pytest.param(1, lambda df: _started(df) + _frame(b"R", _REJECT), id="killed after a file's rejects"),
])
def test_a_helper_that_ends_changes_nothing_but_time(run, db, other_db, caplog, monkeypatch, helper_pids, taken,
                                                     count, then):
    """Ended between files, the loader reads the rest itself; inside a file, that file is tried
    again (and read by the loader), the rejects spooled for it so far dropped."""
    write_mixed(run)
    reference = alone(monkeypatch, run, other_db, caplog)
    monkeypatch.setattr(ingest, "_read_ahead", _dies_after(count, then or (lambda df: b"")))
    broken = outcome(run, db, caplog)
    assert len(helper_pids) == 1 and reaped(helper_pids)
    retried = [w for w in broken["warnings"] if "the read-ahead process" in w]
    in_a_file = then is not None
    assert len(retried) == in_a_file and len(taken) == count + in_a_file
    broken["warnings"] = [w for w in broken["warnings"] if w not in retried]
    assert broken == reference


def test_a_bug_in_the_helper_is_met_again_by_the_loader(run, db, other_db, caplog, monkeypatch, helper_pids):
    """An unexpected error in the helper is not taken for the file's: the loader reads the file
    itself, meets the same error, and ends as it would without the helper."""
    write_mixed(run)
    real = ingest._FileRows.part

    def part(self):
        if self.df.rel == "a/04.json.gz":
            raise RuntimeError("a bug")
        return real(self)

    monkeypatch.setattr(ingest._FileRows, "part", part)
    states = []
    for db_, start in ((db, ingest._ReadAhead.start), (other_db, classmethod(lambda cls, *a: None))):
        with monkeypatch.context() as m:
            m.setattr(ingest._ReadAhead, "start", start)
            for key, value in db_.env().items():
                m.setenv(key, str(value))
            with pytest.raises(RuntimeError, match="a bug"):
                run()
        states.append(db_.fingerprint())
    assert states[0] == states[1]
    assert [path for path, *_ in states[0][1]] == ["a/01.json", "a/02.jsonl", "a/03.json"]  # 04 rolled back
    assert helper_pids and reaped(helper_pids)


def test_files_the_loader_does_not_load_from_their_start_are_passed_over(run, db, monkeypatch, taken, helper_pids):
    """Unchanged files are not given to the helper (it starts at the first file the run loads); a
    file the claim finds loaded meanwhile (by another loader, say) is passed over: a new helper
    starts at the next file, whose rows are still made ahead."""
    write_mixed(run)
    assert run() == 1
    run.write("a/05.json", [rec(user="u9", ts=_day(9, 3))])
    run.write("b/08.json", [rec(user="u9", ts=_day(9, 1))])
    run.write("c/09.json", [rec(user="u9", ts=_day(9, 2))])
    taken.clear()
    real = ingest._Loader._claim

    def claim(self, conn, df, wait_ms):
        if df.rel == "b/08.json":
            return ingest.FileResult(df.rel, "skipped")  # as if another loader had just loaded it
        return real(self, conn, df, wait_ms)

    monkeypatch.setattr(ingest._Loader, "_claim", claim)
    assert run() == 1  # the files that failed in the first run are still failed
    assert taken == ["a/05.json", "c/09.json"]
    assert len(helper_pids) == 1 + 2 and reaped(helper_pids)  # the first run's, this run's two
    assert db.query("SELECT count(*) FROM raw_data WHERE user_id = 'u9'") == [(2,)]


def test_a_file_written_to_after_the_helper_read_it_is_read_again_by_the_loader(run, db, monkeypatch, taken):
    """The helper reads b.json; then a record is appended to it; the loader's claim sees another
    size and mtime than the helper saw, so it reads the file itself: the new record lands, and the
    manifest records the bytes loaded."""
    run.write("a.json", [rec(ts=_day(1, 1))])
    path = run.write("b.json", [rec(ts=_day(2, 1))])
    marker = run.tmp / "written"
    real_helper, real_claim = ingest._read_ahead, ingest._Loader._claim

    def helper(files, cfg, run_id, chunk_seconds, fd):
        real_helper(files, cfg, run_id, chunk_seconds, fd)  # both files' frames, in the pipe
        path.write_text(json.dumps([rec(ts=_day(2, 1)), rec(ts=_day(2, 2))]))
        marker.touch()

    def claim(self, conn, df, wait_ms):
        deadline = time.monotonic() + 30
        while df.rel == "b.json" and not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        return real_claim(self, conn, df, wait_ms)

    monkeypatch.setattr(ingest, "_read_ahead", helper)
    monkeypatch.setattr(ingest._Loader, "_claim", claim)
    assert run() == 0
    assert marker.exists() and taken == ["a.json"]
    assert db.count() == 3
    assert db.query("SELECT size, records_read FROM ingest_files WHERE path = 'b.json'") == [(path.stat().st_size, 2)]
