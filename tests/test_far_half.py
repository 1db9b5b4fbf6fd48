"""A large file's far half, settled by a helper process on the second core (``_FarHalf``).

The helper can only save time. Wherever it stops (a new key, a reject, broken JSON, the array's
end), the file's lines, counts, conflicts, rejects with their positions, digest and errors are
those of one process reading it all; when the helper fails or is killed, or its file is given up,
nothing changes but the time taken, and no process is left behind. Sizes are scaled down: a
"large" file here is 100 kB, read 16 kB at a time.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

import ingest
from tests.conftest import ROOT
from tests.test_lines import task0_like


@pytest.fixture(autouse=True)
def small(monkeypatch):
    monkeypatch.setattr(ingest, "READ_CHUNK_CHARS", 16384)
    monkeypatch.setattr(ingest, "FAR_HALF_MIN_BYTES", 100_000)


@pytest.fixture
def helpers(monkeypatch) -> list:
    """What each helper's report came to: a _Settled, or None when it failed."""
    reports = []
    real = ingest._FarHalf.join

    def join(self):
        reports.append(real(self))
        return reports[-1]

    monkeypatch.setattr(ingest._FarHalf, "join", join)
    return reports


def outcome(path, helper: bool) -> dict:
    """Everything _FileRows reports for a file, read with or without a helper."""
    spool = path.parent / f"rejects-{helper}.jsonl"
    spool.unlink(missing_ok=True)
    rejects = ingest._Rejects(spool, None)
    rows = ingest._FileRows(ingest.DataFile(path, path.name, "json"), ingest._LineMaker(dt.UTC), rejects, 3600,
                            helper=helper)
    parts, error = [], None
    try:
        while not rows.finished:
            parts.append(list(rows.part()))
    except ingest.FileFormatError as exc:
        error = str(exc)
    finally:
        rows.close()
    rejects.publish()
    rejects.close()
    got = {"parts": parts, "counts": rows.take_counts(), "conflicting": rows.conflicting,
           "example": rows.conflict_example, "done": rows.done, "rejects": spool.read_text(), "error": error}
    if error is None:  # (after an error, how far the file was hashed depends on the reads)
        got["digest"] = (rows.digest.hexdigest(), rows.digest.size)
    return got


def task0_file(tmp_path, odd: float = 0.0, user: str = "user_1", copies: int = 12, seconds: int = 2500):
    records = task0_like(random.Random(odd), copies=copies, seconds=seconds, odd=odd)
    for record in records:
        record["user_id"] = record["user_id"].replace("user_1", user)
    path = tmp_path / "task0.json"
    path.write_text(json.dumps(records, indent=2, ensure_ascii=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("user", ["user_1", "usér_ü"])
@pytest.mark.parametrize("odd", [0.0, 0.0005, 0.01])
def test_the_far_half_settled_by_a_helper_ends_as_one_process_reading_it_all(tmp_path, helpers, odd, user):
    """Odd records (a zero, out of range, another metric or user, an invalid or differently written
    timestamp, a string value) stop the helper where the first of them is; the loader reads on from
    there and rejects them at their own positions."""
    path = task0_file(tmp_path, odd, user)
    with_helper = outcome(path, helper=True)
    assert len(helpers) == 1
    alone = outcome(path, helper=False)
    assert len(helpers) == 1  # none without
    assert with_helper == alone
    if odd == 0.0:
        assert helpers[0].count > 5000  # records of the far half settled by the helper
        assert helpers[0].end > path.stat().st_size - 8192  # to the array's last few records (under 4 kB)
    assert alone["counts"].records_read == 12 * 2500


@pytest.fixture
def hashed_ahead(monkeypatch) -> list:
    """How far the loader hashed ahead while it waited for each helper (the offset it got to)."""
    got = []
    real = ingest._HashingReader.hash_ahead

    def hash_ahead(self, ready):
        real(self, ready)
        got.append(self._marks[-1][0])

    monkeypatch.setattr(ingest._HashingReader, "hash_ahead", hash_ahead)
    return got


@pytest.mark.parametrize("odd", [0.0, 0.01], ids=["to the array's end", "stopped early by odd records"])
def test_a_slow_helpers_bytes_are_hashed_while_the_loader_waits(tmp_path, helpers, hashed_ahead, monkeypatch, odd):
    """The loader hashes the bytes after its near half while the helper works, past wherever the
    helper will stop; the digest, counts, rejects and positions stay those of one process."""
    real = ingest._settle_far_half

    def slow(*args):
        time.sleep(0.3)
        return real(*args)

    monkeypatch.setattr(ingest, "_settle_far_half", slow)
    path = task0_file(tmp_path, odd, user="usér_ü")
    with_helper = outcome(path, helper=True)
    assert with_helper == outcome(path, helper=False)
    assert len(helpers) == 1 and helpers[0] is not None and len(hashed_ahead) == 1
    assert hashed_ahead[0] == path.stat().st_size  # all of it, while the helper slept
    assert hashed_ahead[0] > helpers[0].end  # so the digest was taken up from a state before the end


@pytest.mark.parametrize("damage", [
    pytest.param(lambda text: text[: text.rindex('"value"') + 9], id="truncated in the last record"),
    pytest.param(lambda text: text[: len(text) * 4 // 5] + "," + text[len(text) * 4 // 5 :], id="a stray comma"),
    pytest.param(lambda text: text.rstrip()[:-1] + "}\n", id="no closing bracket"),
])
def test_broken_json_after_the_helpers_start_fails_the_file_with_the_same_message(tmp_path, helpers, damage):
    """Character positions in the message count what the helper settled (non-ASCII users too)."""
    path = task0_file(tmp_path, user="usér_ü")
    path.write_text(damage(path.read_text(encoding="utf-8")), encoding="utf-8")
    with_helper, alone = outcome(path, helper=True), outcome(path, helper=False)
    assert with_helper["error"] is not None and with_helper["error"] == alone["error"]
    assert with_helper == alone
    assert helpers and helpers[0] is not None and helpers[0].count > 0


def _fails(*args):
    raise RuntimeError("the helper fails")


def _dies(*args):
    os.kill(os.getpid(), signal.SIGKILL)


def _lies(fd, start, size, settle):
    return size + 1, 10, 0  # an end beyond the file


def _garbles(fd, start, size, settle):
    return "end", None, 0  # not numbers


@pytest.mark.parametrize("helper_work", [_fails, _dies, _lies, _garbles],
                         ids=["raises", "killed", "reports an end beyond the file", "reports no numbers"])
def test_a_helper_that_fails_changes_nothing_but_time(tmp_path, helpers, monkeypatch, helper_work):
    path = task0_file(tmp_path)
    monkeypatch.setattr(ingest, "_settle_far_half", helper_work)
    assert outcome(path, helper=True) == outcome(path, helper=False)
    assert helpers == [None]


def test_a_file_given_up_while_its_helper_works_leaves_no_process(tmp_path, monkeypatch):
    """The loader stops reading a file (a stop, a database error) while the helper is still at
    work: the helper is killed and reaped at once, not waited for."""
    records = task0_like(random.Random(1), copies=12, seconds=2500, odd=0.0)
    for i in range(2 * 2500, len(records), 400):  # new keys all along: the loader has lines to send
        records[i] = {**records[i], "user_id": f"new_{i}"}
    path = tmp_path / "task0.json"
    path.write_text(json.dumps(records, indent=2))
    pids = []
    real_fork = ingest._FarHalf.fork

    def fork(*args):
        far = real_fork(*args)
        pids.append(far._pid)
        return far

    monkeypatch.setattr(ingest._FarHalf, "fork", fork)
    monkeypatch.setattr(ingest, "_settle_far_half", lambda *args: time.sleep(60))
    rejects = ingest._Rejects(tmp_path / "rejects.jsonl", None)
    rows = ingest._FileRows(ingest.DataFile(path, path.name, "json"), ingest._LineMaker(dt.UTC), rejects, 3600,
                            helper=True)
    lines = rows.part()
    while not pids:
        next(lines)
    next(lines)  # a line sent after the helper began
    started = time.monotonic()
    lines.close()
    rows.close()
    assert time.monotonic() - started < 5
    with pytest.raises(ChildProcessError):
        os.waitpid(pids[0], os.WNOHANG)  # reaped already
    rejects.close()


def test_a_task0_file_loads_first_wins_with_its_far_half_settled_by_a_helper(run, db, helpers):
    """Through the database: what lands, and the summary's counts, for a file whose far half a
    helper settled."""
    records = task0_like(random.Random(7), copies=12, seconds=2500, odd=0.0)
    run.write("heart_rate.json", json.dumps(records, indent=2))
    assert run() == 0
    assert helpers[0].count > 5000
    first = {}
    for r in records:
        first.setdefault(r["timestamp"], float(r["value"]))
    landed = {row[2].strftime("%Y-%m-%dT%H:%M:%S"): row[3] for row in db.rows()}
    assert landed == first
    s = run.summary()
    assert (s["records_read"], s["rows_inserted"], s["rows_duplicate"]) == (12 * 2500, 2500, 11 * 2500)


_DRIVER = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
import ingest
ingest.READ_CHUNK_CHARS, ingest.FAR_HALF_MIN_BYTES = 16384, 100_000
real = ingest._settle_far_half

def slow(*args):  # the helper says who it is, then takes its time
    os.write(1, f"helper {os.getpid()}\\n".encode())
    time.sleep(2)
    return real(*args)

ingest._settle_far_half = slow
sys.exit(ingest.main(sys.argv[2:]))
"""


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has ended
    except FileNotFoundError:
        return False


def test_a_helper_outlives_a_killed_loader_only_as_long_as_its_work(run, db):
    """kill -9 of the loader while its helper works: the helper ends by itself when its work is
    done (its report finds no reader), and the next run loads the file as a clean load would."""
    records = task0_like(random.Random(3), copies=12, seconds=2500, odd=0.0)
    run.write("heart_rate.json", json.dumps(records, indent=2))
    proc = subprocess.Popen([sys.executable, "-c", _DRIVER, str(ROOT), "--data-dir", str(run.data),
                             "--reject-file", str(run.rejects)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            cwd=run.tmp)
    try:
        helper = int(proc.stdout.readline().split()[1])
        proc.kill()
        proc.wait(timeout=10)
    finally:
        proc.kill()
        proc.wait()
        proc.stdout.close()  # (the helper holds the other end: no waiting for it here)
    assert _running(helper)  # still at work
    deadline = time.monotonic() + 20
    while _running(helper) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _running(helper)
    assert run() == 0
    first = {}
    for r in records:
        first.setdefault(r["timestamp"], float(r["value"]))
    assert {row[2].strftime("%Y-%m-%dT%H:%M:%S"): row[3] for row in db.rows()} == first
