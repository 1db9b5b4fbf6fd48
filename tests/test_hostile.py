"""Hostile input the loader must survive, end to end against the real TimescaleDB.

Files (empty, truncated, wrong encoding, deeply nested, not gzip, huge, very many), the directory
tree (symlink loops and escapes, FIFOs, unreadable and vanishing files) and records (every field
missing, null, mistyped, non-finite, out of range, or carrying characters that COPY must escape).
Every test states the exact exit code, the reject reason, the summary's counts and the rows that
are left in raw_data.
"""
from __future__ import annotations

import builtins
import datetime as dt
import errno
import gzip
import io
import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

import ingest
from tests.conftest import ROOT, rec

UTC = dt.UTC

# The sizes are 100,000 tiny files and a 1 GB file; CI runs those (.ci/run sets both), a
# plain `make test` uses 10,000 files and 100 MB so that it stays quick on a laptop.
N_TINY_FILES = int(os.environ.get("HOSTILE_TINY_FILES", "10000"))
LARGE_FILE_BYTES = int(os.environ.get("HOSTILE_LARGE_BYTES", str(100 * 1024 * 1024)))
HANG_TIMEOUT = 30  # seconds: a run still going after this is hung (e.g. blocked opening a FIFO)

COUNT_KEYS = ("files_seen", "files_loaded", "files_failed", "records_read", "records_rejected",
              "rows_inserted", "rows_duplicate")

# A record that is valid (and plausible) everywhere: proves that a run went on past the bad input.
GOOD = rec(user="good", metric="spo2", ts="2024-01-01T00:00:00Z", value=97)
GOOD_ROW = ("good", "spo2", dt.datetime(2024, 1, 1, tzinfo=UTC), 97.0)
# A valid record inside a file that fails: it must not land (a file is atomic).
LOST = rec(user="lost", metric="spo2", ts="2024-01-01T00:00:00Z", value=96)


def counts(run) -> dict:
    s = run.summary()
    return {k: s[k] for k in COUNT_KEYS}


def expect(seen=1, failed=0, read=0, rejected=0, inserted=0, duplicate=0) -> dict:
    return {"files_seen": seen, "files_loaded": seen - failed, "files_failed": failed,
            "records_read": read, "records_rejected": rejected, "rows_inserted": inserted,
            "rows_duplicate": duplicate}


def utc(*args) -> dt.datetime:
    return dt.datetime(*args, tzinfo=UTC)


def record_text(user='"u1"', metric='"heart_rate"', ts='"2024-01-01T00:00:01Z"', value="60",
                drop=(), extra="") -> str:
    """A record written as JSON text, each field given as raw JSON (so NaN, 1e400 etc. survive)."""
    fields = {"user_id": user, "metric": metric, "timestamp": ts, "value": value}
    parts = [f'"{k}": {v}' for k, v in fields.items() if k not in drop]
    return "{" + ", ".join(parts + ([extra] if extra else [])) + "}"


def j(value) -> str:
    return json.dumps(value)


# =============================================================================================
# Files
# =============================================================================================
LOST_TEXT = json.dumps(LOST)

FILE_FAILURES = [
    pytest.param("a.json", b"", "file is empty", id="empty"),
    pytest.param("a.json", b" \n\t\r\n   ", "file is empty", id="whitespace-only"),
    pytest.param("a.json", b'"hello"', "top-level JSON is a string", id="top-level-string"),
    pytest.param("a.json", b"42", "top-level JSON is a number", id="top-level-number"),
    pytest.param("a.json", b"-1.5e3\n", "top-level JSON is a number", id="top-level-float"),
    pytest.param("a.json", b"null", "top-level JSON is a null", id="top-level-null"),
    pytest.param("a.json", b"true", "top-level JSON is a boolean", id="top-level-true"),
    pytest.param("a.json", f'[{LOST_TEXT}, {{"user_id": "u1", "metr'.encode(), "truncated",
                 id="truncated-inside-record"),
    pytest.param("a.json", f'[{LOST_TEXT}, {{"user_id": "u1", "metric": "sp'.encode(), "truncated",
                 id="truncated-inside-string"),
    pytest.param("a.json", f"[{LOST_TEXT},".encode(), "truncated", id="truncated-after-comma"),
    pytest.param("a.json", f"[{LOST_TEXT}".encode(), "truncated", id="truncated-no-closing-bracket"),
    pytest.param("a.json", f"[{LOST_TEXT}] xyz".encode(), "unexpected data after the JSON array",
                 id="trailing-garbage"),
    pytest.param("a.json", f"[{LOST_TEXT}][{LOST_TEXT}]".encode(), "unexpected data after the JSON array",
                 id="two-arrays"),
    pytest.param("a.json", f"[{LOST_TEXT} {LOST_TEXT}]".encode(), "expected ',' or ']'", id="missing-comma"),
    pytest.param("a.json", f'[{LOST_TEXT}, {{"user_id": "Jos\xe9", "metric": "spo2", '
                 f'"timestamp": "2024-01-01T00:00:05Z", "value": 95}}]'.encode("latin-1"),
                 "not valid utf-8 text", id="invalid-utf8-json"),
    pytest.param("a.jsonl", (LOST_TEXT + "\n").encode() + b'{"user_id": "\xff\xfe\xfd"}\n',
                 "not valid utf-8 text", id="invalid-utf8-jsonl"),
    pytest.param("a.json.gz", b"this is not gzip at all", "not a valid gzip file", id="gz-not-gzip"),
    pytest.param("a.jsonl.gz", gzip.compress(((LOST_TEXT + "\n") * 50).encode())[:-12], "not a valid gzip file",
                 id="gz-truncated"),
    pytest.param("a.json.gz", gzip.compress(f"[{LOST_TEXT}]".encode()) + b"trailing junk!",
                 "not a valid gzip file", id="gz-trailing-junk"),
    pytest.param("a.json", ("[" * 100_000 + "]" * 100_000).encode(), "nested more than 1000 levels deep",
                 id="100k-deep-arrays"),
    pytest.param("a.json", ("[" + record_text(value="[" * 100_000 + "]" * 100_000) + "]").encode(),
                 "nested more than 1000 levels deep", id="100k-deep-inside-a-record"),
    pytest.param("a.json", ('{"user_id": ' + '{"a": ' * 100_000 + "1" + "}" * 100_000 + "}").encode(),
                 "nested more than 1000 levels deep", id="100k-deep-objects"),
]


@pytest.mark.parametrize("name, content, fragment", FILE_FAILURES)
def test_bad_file_fails_alone_with_a_reason_and_the_run_goes_on(run, db, name, content, fragment):
    run.write(name, content)
    run.write("zz_good.json", [GOOD])
    assert run() == 1
    assert db.rows() == [GOOD_ROW]  # nothing of the failed file lands, not even its valid records
    lines = run.reject_lines()
    assert [(r["file"], r["position"]) for r in lines] == [(name, None)]
    assert lines[0]["reason"].startswith("file failed: ") and fragment in lines[0]["reason"], lines[0]
    assert counts(run) == expect(seen=2, failed=1, read=1, inserted=1)
    failed = [(f["file"], f["error"]) for f in run.summary()["files"] if f["status"] == "failed"]
    assert len(failed) == 1 and failed[0][0] == name and fragment in failed[0][1]
    assert run.summary()["status"] == "rejects"


@pytest.mark.parametrize("name, content", [
    pytest.param("a.json", b"[]", id="empty-array"),
    pytest.param("a.json", b" \n[ \n\t]\n ", id="empty-array-with-whitespace"),
    pytest.param("a.json.gz", gzip.compress(b"[]"), id="gzipped-empty-array"),
    pytest.param("a.jsonl", b"", id="empty-jsonl"),
    pytest.param("a.jsonl", b"\n \n\t\n", id="jsonl-blank-lines-only"),
])
def test_file_without_records_loads_nothing_and_exits_0(run, db, name, content):
    run.write(name, content)
    assert run() == 0
    assert db.count() == 0
    assert run.reject_lines() == []
    assert counts(run) == expect(seen=1, read=0)
    assert [(f["file"], f["status"]) for f in run.summary()["files"]] == [(name, "loaded")]


UNICODE_RECORDS = [rec(user="Jürgen", metric="hrv", ts="2024-01-01T00:00:00Z", value=42.5),
                   rec(user="名前🫀", metric="hrv", ts="2024-01-01T00:00:01Z", value=43)]
UNICODE_ROWS = [("Jürgen", "hrv", utc(2024, 1, 1), 42.5), ("名前🫀", "hrv", utc(2024, 1, 1, 0, 0, 1), 43.0)]
_ARRAY = json.dumps(UNICODE_RECORDS, ensure_ascii=False, indent=2)
_LINES = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in UNICODE_RECORDS)


@pytest.mark.parametrize("name, content", [
    pytest.param("a.json", b"\xef\xbb\xbf" + _ARRAY.encode(), id="utf8-bom"),
    pytest.param("a.jsonl", b"\xef\xbb\xbf" + _LINES.encode(), id="utf8-bom-jsonl"),
    pytest.param("a.json.gz", gzip.compress(b"\xef\xbb\xbf" + _ARRAY.encode()), id="utf8-bom-gzipped"),
    pytest.param("a.json", b"\xff\xfe" + _ARRAY.encode("utf-16-le"), id="utf16-le-bom"),
    pytest.param("a.json", b"\xfe\xff" + _ARRAY.encode("utf-16-be"), id="utf16-be-bom"),
    pytest.param("a.jsonl", b"\xff\xfe" + _LINES.encode("utf-16-le"), id="utf16-le-bom-jsonl"),
    pytest.param("a.json", b"\xff\xfe\x00\x00" + _ARRAY.encode("utf-32-le"), id="utf32-le-bom"),
])
def test_byte_order_marks_are_honoured(run, db, name, content):
    run.write(name, content)
    assert run() == 0
    assert db.rows() == UNICODE_ROWS
    assert run.reject_lines() == []
    assert counts(run) == expect(seen=1, read=2, inserted=2)


def test_jsonl_bad_lines_are_rejected_and_the_good_lines_load(run, db):
    good = [json.dumps(rec(ts=f"2024-01-01T00:00:0{i}Z", value=60 + i)) for i in range(4)]
    lines = [good[0], '{"user_id": "u1", "metric": "heart_rate"', good[1], "not json at all",
             good[2], "", good[3], "[" * 100_000]
    run.write("a.jsonl", "\n".join(lines) + "\n")
    assert run() == 1
    assert [r[3] for r in db.rows()] == [60.0, 61.0, 62.0, 63.0]
    rejects = run.reject_lines()
    assert [(r["file"], r["position"]) for r in rejects] == [("a.jsonl", 2), ("a.jsonl", 4), ("a.jsonl", 8)]
    assert "invalid JSON on this line" in rejects[0]["reason"]
    assert rejects[0]["record"] == lines[1]
    assert "invalid JSON on this line" in rejects[1]["reason"]
    assert "nested more than 1000 levels deep" in rejects[2]["reason"]
    assert len(rejects[2]["record"]) == 1000  # the 100,000-character line is quoted cut short
    assert counts(run) == expect(seen=1, read=7, rejected=3, inserted=4)  # the blank line is no record


def test_ten_thousand_tiny_files_all_load_with_exact_counts(run, db):
    base = utc(2024, 1, 1)
    rels = []
    for i in range(N_TINY_FILES):
        rel = f"d{i % 100:02d}/f{i:05d}.json"
        ts = (base + dt.timedelta(seconds=i)).strftime("%Y-%m-%dT%H:%M:%SZ")
        run.write(rel, json.dumps([rec(user="tiny", ts=ts, value=i % 200 + 40)]))
        rels.append(rel)
    assert run() == 0
    assert counts(run) == expect(seen=N_TINY_FILES, read=N_TINY_FILES, inserted=N_TINY_FILES)
    assert [f["file"] for f in run.summary()["files"]] == sorted(rels)
    assert run.reject_lines() == []
    (n, total, first, last), = db.query('SELECT count(*), sum(value), min("timestamp"), max("timestamp") '
                                        "FROM raw_data WHERE user_id = 'tiny'")
    assert (n, total) == (N_TINY_FILES, float(sum(i % 200 + 40 for i in range(N_TINY_FILES))))
    assert (first, last) == (base, base + dt.timedelta(seconds=N_TINY_FILES - 1))


# Peak RSS from VmHWM, which belongs to this process's own memory: ru_maxrss would also count the
# parent's (pytest's) peak, which Linux carries into a child across fork and exec.
_RSS_DRIVER = """
import sys
sys.path.insert(0, sys.argv[1])
import ingest
code = ingest.main(sys.argv[2:])
with open("/proc/self/status") as status:
    hwm = next(line for line in status if line.startswith("VmHWM:"))
print("maxrss_kib", int(hwm.split()[1]))
sys.exit(code)
"""


def _write_large_file(path: Path, target_bytes: int, prefix: str = "user_") -> tuple[int, float, int]:
    """A pretty-printed array (as Task-0 writes), 20 users a second; returns (records, sum, seconds)."""
    users = [f"{prefix}{k:02d}" for k in range(20)]
    base = utc(2024, 1, 1)
    n, total, second, size = 0, 0, 0, 0
    with open(path, "w", encoding="utf-8") as out:
        out.write("[\n")
        while size < target_bytes:
            ts = (base + dt.timedelta(seconds=second)).strftime("%Y-%m-%dT%H:%M:%SZ")
            parts = []
            for user in users:
                value = n % 150 + 40
                parts.append((",\n" if n else "") + f'  {{\n    "user_id": "{user}",\n    "metric": "heart_rate",\n'
                             f'    "timestamp": "{ts}",\n    "value": {value}\n  }}')
                n, total = n + 1, total + value
            chunk = "".join(parts)
            out.write(chunk)
            size += len(chunk)
            second += 1
        out.write("\n]\n")
    return n, float(total), second


def _load_measuring_memory(run, data_dir: Path, summary: Path) -> int:
    """Run the loader in a child process on ``data_dir``; return its peak RSS in bytes."""
    proc = subprocess.run(
        [sys.executable, "-c", _RSS_DRIVER, str(ROOT), "--data-dir", str(data_dir), "--reject-file",
         str(run.rejects), "--summary-json", str(summary), "--log-level", "WARNING"],
        check=False, capture_output=True, text=True, timeout=600, cwd=run.tmp)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return int(proc.stdout.split("maxrss_kib")[-1]) * 1024


def test_large_file_is_streamed_and_loads_with_exact_counts(run, db):
    # First a file half the size (other users, so no key overlaps): the memory baseline.
    half = run.tmp / "half"
    half.mkdir()
    _write_large_file(half / "heart_rate.json", LARGE_FILE_BYTES // 2, prefix="half_")
    rss_half = _load_measuring_memory(run, half, run.tmp / "half-summary.json")
    (half / "heart_rate.json").unlink()

    path = run.data / "heart_rate.json"
    n, total, seconds = _write_large_file(path, LARGE_FILE_BYTES)
    assert path.stat().st_size >= LARGE_FILE_BYTES
    rss = _load_measuring_memory(run, run.data, run.summary_path)
    assert counts(run) == expect(seen=1, read=n, inserted=n)
    assert run.reject_lines() == []
    (count, got_total, users, first, last), = db.query(
        'SELECT count(*), sum(value), count(DISTINCT user_id), min("timestamp"), max("timestamp") FROM raw_data '
        "WHERE user_id LIKE 'user^_%%' ESCAPE '^'")
    assert (count, got_total, users) == (n, total, 20)
    assert (first, last) == (utc(2024, 1, 1), utc(2024, 1, 1) + dt.timedelta(seconds=seconds - 1))
    # Streamed: twice the file does not take more memory. A loader holding the file's text would
    # need LARGE_FILE_BYTES / 2 more; one holding its decoded records, several times that.
    assert rss - rss_half < LARGE_FILE_BYTES / 4, f"peak RSS {rss_half} B for half the file, {rss} B for all of it"
    assert rss < 200 * 1024 * 1024, f"peak RSS {rss} B"  # the loader's memory budget, whatever the file size


# =============================================================================================
# The directory
# =============================================================================================
def test_symlink_loop_terminates_and_loads_each_file_once(run, db):
    run.write("a.json", [rec(ts="2024-01-01T00:00:01Z")])
    run.write("sub/b.json", [rec(ts="2024-01-01T00:00:02Z")])
    os.symlink("..", run.data / "sub" / "up")  # sub/up -> data: a loop
    os.symlink(".", run.data / "self")  # self -> data
    os.symlink(str(run.data), run.data / "sub" / "abs.json")  # a directory symlink named like a file
    try:
        proc = run.subprocess("--summary-json", str(run.summary_path), timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the loader did not finish within {HANG_TIMEOUT}s on a symlink loop")
    assert proc.returncode == 0, proc.stderr
    assert counts(run) == expect(seen=2, read=2, inserted=2)
    assert [f["file"] for f in run.summary()["files"]] == ["a.json", "sub/b.json"]
    assert db.count() == 2


@pytest.mark.parametrize("make_link", [
    pytest.param(lambda data, outside: os.symlink(outside / "secret.json", data / "escape.json"), id="absolute"),
    pytest.param(lambda data, outside: os.symlink("../outside/secret.json", data / "escape.json"), id="relative"),
    pytest.param(lambda data, outside: (data / "deep").mkdir() or
                 os.symlink("../../outside/secret.json", data / "deep" / "escape.json"), id="relative-nested"),
    pytest.param(lambda data, outside: (os.symlink(outside, data / "outdir"),
                                        os.symlink("outdir/secret.json", data / "escape.json")),
                 id="through-a-directory-symlink"),
    pytest.param(lambda data, outside: (os.symlink(outside / "secret.json", data / "hop.txt"),
                                        os.symlink("hop.txt", data / "escape.json")), id="chain"),
])
def test_symlink_to_a_file_outside_the_data_directory_is_not_followed(run, db, capsys, make_link):
    outside = run.tmp / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps([rec(user="outsider")]))
    make_link(run.data, outside)
    run.write("good.json", [GOOD])
    assert run() == 0
    assert db.rows() == [GOOD_ROW]  # the outsider's row is absent
    warnings = [line for line in capsys.readouterr().err.splitlines() if " WARNING skipping " in line]
    assert len(warnings) == 1 and "escape.json: symlink to " in warnings[0]
    assert warnings[0].endswith("outside the data directory")
    assert [f["file"] for f in run.summary()["files"]] == ["good.json"]
    assert counts(run) == expect(seen=1, read=1, inserted=1)


def test_directory_symlink_to_outside_is_not_walked(run, db):
    outside = run.tmp / "outside"
    outside.mkdir()
    (outside / "secret.json").write_text(json.dumps([rec(user="outsider")]))
    os.symlink(outside, run.data / "mounted")
    run.write("good.json", [GOOD])
    assert run() == 0
    assert db.rows() == [GOOD_ROW]
    assert counts(run) == expect(seen=1, read=1, inserted=1)


def test_symlink_inside_to_a_file_inside_is_followed(run, db):
    run.write("store/blob.dat", json.dumps([rec(user="linked", metric="heart_rate")]))  # not a data file name
    os.symlink("store/blob.dat", run.data / "linked.json")
    os.symlink(run.data / "store" / "blob.dat", run.data / "store" / "abs.jsonl.txt")  # not a data name
    assert run() == 0
    assert db.rows() == [("linked", "heart_rate", utc(2024, 1, 1), 60.0)]
    assert [f["file"] for f in run.summary()["files"]] == ["linked.json"]
    assert counts(run) == expect(seen=1, read=1, inserted=1)


def test_directory_named_like_a_data_file_is_walked_not_read(run, db):
    run.write("x.json/inner.jsonl", json.dumps(rec()) + "\n")
    (run.data / "y.json.gz").mkdir()
    assert run() == 0
    assert [f["file"] for f in run.summary()["files"]] == ["x.json/inner.jsonl"]
    assert counts(run) == expect(seen=1, read=1, inserted=1)
    assert db.count() == 1


@pytest.mark.skipif(os.geteuid() == 0, reason="running as root: chmod 000 does not stop root from "
                    "reading (see the simulated EACCES test below)")
def test_unreadable_file_fails_with_a_reason(run, db):
    locked = run.write("locked.json", [LOST])
    locked.chmod(0)
    run.write("zz_good.json", [GOOD])
    _assert_only_the_locked_file_failed(run, db, "Permission denied")


def _assert_only_the_locked_file_failed(run, db, reason: str) -> None:
    assert run() == 1
    assert db.rows() == [GOOD_ROW]
    (line,) = run.reject_lines()
    assert (line["file"], line["position"]) == ("locked.json", None)
    assert reason in line["reason"]
    assert counts(run) == expect(seen=2, failed=1, read=1, inserted=1)


def test_file_the_loader_may_not_open_fails_with_a_reason(run, db, monkeypatch):
    """chmod 000 simulated for root: opening locked.json (by open, io.open or os.open) raises EACCES,
    as it would for an unprivileged user; stat() still works, as it does on a mode-000 file."""
    def guarded(opener):
        def fake(file, *args, **kwargs):
            if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file).endswith("/locked.json"):
                raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
            return opener(file, *args, **kwargs)
        return fake

    run.write("locked.json", [LOST])
    run.write("zz_good.json", [GOOD])
    monkeypatch.setattr(builtins, "open", guarded(builtins.open))
    monkeypatch.setattr(io, "open", guarded(io.open))
    monkeypatch.setattr(os, "open", guarded(os.open))
    _assert_only_the_locked_file_failed(run, db, "file failed: cannot read file: Permission denied")


def test_dangling_symlink_is_skipped_with_a_warning(run, db, capsys):
    os.symlink("gone.json", run.data / "dangling.json")
    run.write("good.json", [GOOD])
    assert run() == 0
    assert "WARNING skipping dangling.json: No such file or directory" in capsys.readouterr().err
    assert db.rows() == [GOOD_ROW]
    assert counts(run) == expect(seen=1, read=1, inserted=1)


@pytest.mark.parametrize("replace, fragment", [
    pytest.param(lambda p: p.unlink(), "cannot read file: No such file or directory", id="deleted"),
    pytest.param(lambda p: (p.unlink(), p.mkdir()), "not a regular file", id="replaced-by-a-directory"),
])
def test_file_that_vanishes_between_listing_and_reading_fails_alone(run, db, monkeypatch, replace, fragment):
    original = ingest.load_files

    def load_files(data_dir, *args):
        for df in original(data_dir, *args):
            if df.rel == "b.json":
                replace(df.path)
            yield df

    monkeypatch.setattr(ingest, "load_files", load_files)
    run.write("a.json", [rec(ts="2024-01-01T00:00:01Z")])
    run.write("b.json", [LOST])
    run.write("c.json", [rec(ts="2024-01-01T00:00:03Z")])
    assert run() == 1
    assert [(r[0], r[2]) for r in db.rows()] == [("u1", utc(2024, 1, 1, 0, 0, 1)), ("u1", utc(2024, 1, 1, 0, 0, 3))]
    (line,) = run.reject_lines()
    assert (line["file"], line["position"]) == ("b.json", None)
    assert line["reason"].startswith("file failed: ") and fragment in line["reason"], line["reason"]
    assert counts(run) == expect(seen=3, failed=1, read=2, inserted=2)


def test_fifo_and_socket_are_skipped_and_never_opened(run, db):
    os.mkfifo(run.data / "pipe.json")
    os.mkfifo(run.data / "pipe.jsonl.gz")
    os.symlink("pipe.json", run.data / "to_pipe.ndjson")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind("data/sock.json")  # relative: the run fixture works in tmp_path (AF_UNIX paths are short)
    run.write("good.json", [GOOD])
    try:
        proc = run.subprocess("--summary-json", str(run.summary_path), timeout=HANG_TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the loader hung on a FIFO (still running after {HANG_TIMEOUT}s)")
    finally:
        sock.close()
    assert proc.returncode == 0, proc.stderr
    for name in ("pipe.json", "pipe.jsonl.gz", "to_pipe.ndjson", "sock.json"):
        assert f"skipping {name}: not a regular file" in proc.stderr
    assert db.rows() == [GOOD_ROW]
    assert counts(run) == expect(seen=1, read=1, inserted=1)


_SWAP_DRIVER = """
import os, sys
sys.path.insert(0, sys.argv[1])
import ingest
original = ingest.load_files
def load_files(data_dir, *args):
    for df in original(data_dir, *args):
        if df.rel == "b.json":  # listed as a regular file, then swapped for a FIFO
            os.unlink(df.path)
            os.mkfifo(df.path)
        yield df
ingest.load_files = load_files
sys.exit(ingest.main(sys.argv[2:]))
"""


def test_file_swapped_for_a_fifo_after_listing_does_not_hang_the_loader(run, db):
    run.write("a.json", [rec(ts="2024-01-01T00:00:01Z")])
    run.write("b.json", [LOST])
    run.write("c.json", [rec(ts="2024-01-01T00:00:03Z")])
    try:
        proc = subprocess.run(
            [sys.executable, "-c", _SWAP_DRIVER, str(ROOT), "--data-dir", str(run.data), "--reject-file",
             str(run.rejects), "--summary-json", str(run.summary_path)],
            check=False, capture_output=True, text=True, timeout=HANG_TIMEOUT, cwd=run.tmp)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the loader blocked opening a FIFO that replaced a listed file "
                    f"(still running after {HANG_TIMEOUT}s)")
    assert proc.returncode == 1, proc.stderr
    assert [r[2] for r in db.rows()] == [utc(2024, 1, 1, 0, 0, 1), utc(2024, 1, 1, 0, 0, 3)]
    (line,) = run.reject_lines()
    assert (line["file"], line["position"]) == ("b.json", None)
    assert "regular file" in line["reason"]
    assert counts(run) == expect(seen=3, failed=1, read=2, inserted=2)


# =============================================================================================
# Records
# =============================================================================================
def check_rejected(run, db, bad: str, fragment: str, *args: str) -> dict:
    """One good record, then ``bad`` (JSON text): exactly the bad one is rejected, for ``fragment``."""
    run.write("a.json", "[" + json.dumps(GOOD) + ",\n" + bad + "]")
    assert run(*args) == 1
    assert db.rows() == [GOOD_ROW]
    lines = run.reject_lines()
    assert [(r["file"], r["position"]) for r in lines] == [("a.json", 2)]
    assert fragment in lines[0]["reason"], lines[0]["reason"]
    assert counts(run) == expect(seen=1, read=2, rejected=1, inserted=1)
    return lines[0]


def check_accepted(run, db, text: str, row: tuple, *args: str) -> None:
    run.write("a.json", "[" + text + "]")
    assert run(*args) == 0, run.reject_lines()
    assert db.rows() == [row]
    assert run.reject_lines() == []
    assert counts(run) == expect(seen=1, read=1, inserted=1)


NAN_ETC = [
    pytest.param("NaN", "value NaN is not a finite number", id="NaN"),
    pytest.param("Infinity", "value Infinity is not a finite number", id="Infinity"),
    pytest.param("-Infinity", "value -Infinity is not a finite number", id="-Infinity"),
    pytest.param("1e400", "value 1e400 is too large for a double precision number", id="1e400"),
    pytest.param("-1e400", "value -1e400 is too large for a double precision number", id="-1e400"),
    pytest.param("1e-400", "value 1e-400 is too small for a double precision number (it would be stored as 0)",
                 id="1e-400"),
    pytest.param("1" + "0" * 400, "too large for a double precision number", id="400-digit-integer"),
    pytest.param("-" + "9" * 400, "too large for a double precision number", id="negative-400-digit-integer"),
]

RECORD_REJECTS = [
    # missing and misspelt keys
    pytest.param(record_text(drop=("value",)), "missing key: value", id="missing-value"),
    pytest.param(record_text(drop=("user_id",)), "missing key: user_id", id="missing-user_id"),
    pytest.param("{}", "missing keys: user_id, metric, timestamp, value", id="empty-object"),
    pytest.param(record_text(drop=("user_id",), extra='"userid": "u1"'), "missing key: user_id", id="misspelt-key"),
    pytest.param(record_text(drop=("metric",), extra='"Metric": "spo2"'), "missing key: metric", id="key-wrong-case"),
    # null in each field
    pytest.param(record_text(user="null"), "user_id must be a string, got null", id="null-user_id"),
    pytest.param(record_text(metric="null"), "metric must be a string, got null", id="null-metric"),
    pytest.param(record_text(ts="null"), "timestamp must be an ISO 8601 string, got null", id="null-timestamp"),
    pytest.param(record_text(value="null"), "value must be a number, got null", id="null-value"),
    # wrong types
    pytest.param(record_text(value='"60"'), "value must be a number, got string", id="value-string"),
    pytest.param(record_text(value="true"), "value must be a number, got boolean", id="value-true"),
    pytest.param(record_text(value="false"), "value must be a number, got boolean", id="value-false"),
    pytest.param(record_text(value="[60]"), "value must be a number, got array", id="value-array"),
    pytest.param(record_text(value='{"bpm": 60}'), "value must be a number, got object", id="value-object"),
    pytest.param(record_text(user="42"), "user_id must be a string, got number", id="user_id-number"),
    pytest.param(record_text(user="true"), "user_id must be a string, got boolean", id="user_id-boolean"),
    pytest.param(record_text(user='["u1"]'), "user_id must be a string, got array", id="user_id-array"),
    pytest.param(record_text(metric="1"), "metric must be a string, got number", id="metric-number"),
    pytest.param(record_text(ts="1704067200"), "timestamp must be an ISO 8601 string, got number",
                 id="timestamp-epoch-number"),
    pytest.param(record_text(ts="1704067200.5"), "timestamp must be an ISO 8601 string, got number",
                 id="timestamp-epoch-float"),
    pytest.param(record_text(ts='"1704067200"'), "is not ISO 8601", id="timestamp-epoch-string"),
    # not a record at all
    pytest.param('"just a string"', "record must be a JSON object, got string", id="record-string"),
    pytest.param("42", "record must be a JSON object, got number", id="record-number"),
    pytest.param("null", "record must be a JSON object, got null", id="record-null"),
    pytest.param("[]", "record must be a JSON object, got array", id="record-array"),
    # NaN, infinities, numbers beyond a double
    *[pytest.param(record_text(value=v), frag, id=f"value-{p.id}") for p in NAN_ETC for v, frag in [p.values]],
    # metric
    pytest.param(record_text(metric='"steps"'), 'unknown metric "steps" (expected one of', id="metric-unknown"),
    pytest.param(record_text(metric='"Heart_Rate"'), "(did you mean 'heart_rate'?)", id="metric-wrong-case"),
    pytest.param(record_text(metric='"HEART_RATE"'), "(did you mean 'heart_rate'?)", id="metric-upper-case"),
    pytest.param(record_text(metric='" spo2 "'), "(did you mean 'spo2'?)", id="metric-surrounding-spaces"),
    pytest.param(record_text(metric='"spo2\\n"'), "(did you mean 'spo2'?)", id="metric-trailing-newline"),
    pytest.param(record_text(metric='""'), 'unknown metric ""', id="metric-empty"),
    pytest.param(record_text(metric='"heart-rate"'), 'unknown metric "heart-rate"', id="metric-hyphen"),
    # user_id
    pytest.param(record_text(user='""'), "user_id is empty or blank", id="user_id-empty"),
    pytest.param(record_text(user='"   "'), "user_id is empty or blank", id="user_id-spaces"),
    pytest.param(record_text(user='"\\t\\n"'), "user_id is empty or blank", id="user_id-tab-newline"),
    pytest.param(record_text(user=j("x" * 256)), "user_id is 256 characters long (at most 255)", id="user_id-256"),
    pytest.param(record_text(user=j("x" * 10_000)), "user_id is 10000 characters long (at most 255)",
                 id="user_id-10000"),
    pytest.param(record_text(user='"a\\u0000b"'), "NUL character", id="user_id-NUL"),
    pytest.param(record_text(user='"\\u0000"'), "NUL character", id="user_id-only-NUL"),
    pytest.param(record_text(user='"\\ud800"'), "unpaired surrogate", id="user_id-lone-high-surrogate"),
    pytest.param(record_text(user='"x\\udc00"'), "unpaired surrogate", id="user_id-lone-low-surrogate"),
    pytest.param(record_text(metric='"spo\\udc00"'), "unknown metric", id="metric-lone-surrogate"),
    pytest.param(record_text(ts='"2024-01-01T00:00:0\\ud800"'), "is not ISO 8601", id="timestamp-lone-surrogate"),
    pytest.param(record_text(user='""', extra='"note": "\\udfff"'), "user_id is empty or blank",
                 id="rejected-record-with-a-lone-surrogate-elsewhere"),
    # timestamps that do not exist
    pytest.param(record_text(ts='"2024-02-30T00:00:00Z"'), "is not a real date and time", id="feb-30-utc"),
    pytest.param(record_text(ts='"2024-02-30T00:00:00"'), "is not a real date and time", id="feb-30-naive"),
    pytest.param(record_text(ts='"2023-02-29T12:00:00+02:00"'), "is not a real date and time", id="feb-29-non-leap-offset"),
    pytest.param(record_text(ts='"2024-01-01T24:00:00Z"'), "is not a real date and time", id="hour-24-utc"),
    pytest.param(record_text(ts='"2024-01-01T24:00:00"'), "is not a real date and time", id="hour-24-naive"),
    pytest.param(record_text(ts='"2024-12-31T23:59:60Z"'), "is not a real date and time", id="second-60-utc"),
    pytest.param(record_text(ts='"2024-12-31T23:59:60+05:00"'), "is not a real date and time", id="second-60-offset"),
    pytest.param(record_text(ts='"2024-12-31T23:59:60"'), "is not a real date and time", id="second-60-naive"),
    pytest.param(record_text(ts='"2024-01-01T00:60:00Z"'), "is not a real date and time", id="minute-60"),
    pytest.param(record_text(ts='"2024-13-01T00:00:00Z"'), "is not a real date and time", id="month-13"),
    pytest.param(record_text(ts='"2024-01-01T00:00:00+24:00"'), "has a UTC offset outside -23:59..+23:59", id="offset-24h"),
    pytest.param(record_text(ts='"2024-01-01T00:00:00+99:00"'), "has a UTC offset outside -23:59..+23:59", id="offset-99h"),
    pytest.param(record_text(ts='"2024-01-01"'), "is a date without a time of day", id="date-only"),
    pytest.param(record_text(ts='"2024-01-01Z"'), "is not ISO 8601", id="date-only-with-Z"),
    pytest.param(record_text(ts='"yesterday"'), "is not ISO 8601", id="not-a-date"),
    pytest.param(record_text(ts='"2024-01-01T00:00:00Z "'), "is not ISO 8601", id="trailing-space"),
    pytest.param(record_text(ts='"\\uff12\\uff10\\uff12\\uff14-01-01T00:00:00Z"'), "is not ISO 8601",
                 id="fullwidth-digits"),
    pytest.param(record_text(ts='"0000-01-01T00:00:00Z"'), "is not a real date and time", id="year-0"),
    pytest.param(record_text(ts='"10000-01-01T00:00:00Z"'), "is not ISO 8601", id="year-10000"),
    pytest.param(record_text(ts='"0001-01-01T00:30:00+01:00"'), "outside years 1..9999 in UTC",
                 id="year-1-positive-offset"),
    pytest.param(record_text(ts='"9999-12-31T23:30:00-01:00"'), "outside years 1..9999 in UTC",
                 id="year-9999-negative-offset"),
]


@pytest.mark.parametrize("bad, fragment", RECORD_REJECTS)
def test_bad_record_is_rejected_with_a_reason(bad, fragment):
    """The rule itself, without a database: the record read as the loader reads it, its reason as
    the loader reports it (from the record's own text)."""
    obj = ingest._decode_line(bad)
    with pytest.raises(ingest.ValidationError) as info:
        ingest.validate_record(obj)
    assert fragment in ingest._reason_as_written(bad, info.value, dt.UTC)


@pytest.mark.parametrize("suffix", [".json", ".jsonl"])
def test_bad_records_are_rejected_end_to_end_and_the_good_ones_load(run, db, suffix):
    """A sample of the rules above through main(): position, reason and quoted text per reject."""
    sample = [p.values for p in RECORD_REJECTS[::9]]
    texts = [json.dumps(GOOD)] + [bad for bad, _ in sample]
    run.write("a" + suffix, "[" + ",\n".join(texts) + "]" if suffix == ".json" else "\n".join(texts) + "\n")
    assert run() == 1
    assert db.rows() == [GOOD_ROW]
    lines = run.reject_lines()
    assert [r["position"] for r in lines] == list(range(2, len(texts) + 1))
    for (bad, fragment), line in zip(sample, lines, strict=True):
        assert fragment in line["reason"] and line["record"] == bad[:1000]


@pytest.mark.parametrize("ts, fragment", [
    pytest.param("2024-03-31T02:30:00", "does not exist in Europe/Berlin (skipped by a DST change)", id="gap"),
    pytest.param("2024-03-31T02:00:00", "does not exist in Europe/Berlin (skipped by a DST change)",
                 id="gap-start"),
    pytest.param("2024-10-27T02:30:00", "is ambiguous in Europe/Berlin (repeated by a DST change)", id="repeat"),
    pytest.param("2024-10-27 02:00:00", "is ambiguous in Europe/Berlin (repeated by a DST change)",
                 id="repeat-start"),
    pytest.param("0001-01-01T00:00:00", "outside years 1..9999 in UTC", id="year-1-local-time"),
])
def test_local_time_that_a_dst_change_skips_or_repeats_is_rejected(run, db, ts, fragment):
    check_rejected(run, db, record_text(ts=j(ts)), fragment, "--source-timezone", "Europe/Berlin")


@pytest.mark.parametrize("text, stored, args", [
    pytest.param(record_text(ts='"2024-01-01T00:00:00.123456789Z"'), utc(2024, 1, 1, 0, 0, 0, 123456), (),
                 id="nanoseconds-truncated"),
    pytest.param(record_text(ts='"2024-01-01T00:00:00.9999999Z"'), utc(2024, 1, 1, 0, 0, 0, 999999), (),
                 id="truncated-not-rounded"),
    pytest.param(record_text(ts='"2024-01-01T00:00:00.1234567"'), utc(2024, 1, 1, 0, 0, 0, 123456), (),
                 id="naive-7-digit-fraction"),
    pytest.param(record_text(ts='"2024-01-01T00:00:00,5Z"'), utc(2024, 1, 1, 0, 0, 0, 500000), (),
                 id="comma-fraction"),
    pytest.param(record_text(ts='"2024-01-01 12:00:00+05:30"'), utc(2024, 1, 1, 6, 30), (), id="space-and-offset"),
    pytest.param(record_text(ts='"2024-01-01T00:00:00+0100"'), utc(2023, 12, 31, 23), (), id="basic-offset"),
    pytest.param(record_text(ts='"2024-01-01T00:00Z"'), utc(2024, 1, 1), (), id="no-seconds"),
    pytest.param(record_text(ts='"2024-02-29T00:00:00Z"'), utc(2024, 2, 29), (), id="leap-day"),
    pytest.param(record_text(ts='"0001-01-01T00:00:00Z"'), utc(1, 1, 1), (), id="year-1"),
    pytest.param(record_text(ts='"9999-12-31T23:59:59.999999Z"'), utc(9999, 12, 31, 23, 59, 59, 999999), (),
                 id="year-9999"),
    pytest.param(record_text(ts='"2024-03-31T02:30:00+02:00"'), utc(2024, 3, 31, 0, 30),
                 ("--source-timezone", "Europe/Berlin"), id="berlin-gap-with-offset"),
    pytest.param(record_text(ts='"2024-10-27T02:30:00+01:00"'), utc(2024, 10, 27, 1, 30),
                 ("--source-timezone", "Europe/Berlin"), id="berlin-repeat-with-offset"),
    pytest.param(record_text(ts='"2024-10-27T03:30:00"'), utc(2024, 10, 27, 2, 30),
                 ("--source-timezone", "Europe/Berlin"), id="berlin-after-the-repeat"),
    pytest.param(record_text(ts='"2024-03-31T03:00:00"'), utc(2024, 3, 31, 1),
                 ("--source-timezone", "Europe/Berlin"), id="berlin-after-the-gap"),
])
def test_timestamp_is_accepted_and_stored_in_utc(run, db, text, stored, args):
    check_accepted(run, db, text, ("u1", "heart_rate", stored, 60.0), *args)


@pytest.mark.parametrize("text, row", [
    pytest.param(record_text(extra='"unit": "bpm", "device": {"id": 7}'),
                 ("u1", "heart_rate", utc(2024, 1, 1, 0, 0, 1), 60.0), id="extra-keys-ignored"),
    pytest.param(record_text(user=j("x" * 255)), ("x" * 255, "heart_rate", utc(2024, 1, 1, 0, 0, 1), 60.0),
                 id="user_id-255-characters"),
    pytest.param(record_text(user=j("🫀" * 255)), ("🫀" * 255, "heart_rate", utc(2024, 1, 1, 0, 0, 1), 60.0),
                 id="user_id-255-emoji-as-surrogate-pairs"),
    pytest.param(record_text(metric='"hrv"', value="5e-324"), ("u1", "hrv", utc(2024, 1, 1, 0, 0, 1), 5e-324),
                 id="subnormal-value"),
    pytest.param(record_text(value="72.25"), ("u1", "heart_rate", utc(2024, 1, 1, 0, 0, 1), 72.25), id="float"),
])
def test_edge_records_are_accepted(run, db, text, row):
    check_accepted(run, db, text, row)


@pytest.mark.parametrize("literal, sign", [
    # Python's json reads the integer -0 as int 0, so it arrives at PostgreSQL as +0.
    pytest.param("-0", 1.0, id="integer-minus-zero"),
    # A float -0.0 is sent as "-0.0"; float8 keeps the sign and PostgreSQL returns -0.
    pytest.param("-0.0", -1.0, id="float-minus-zero"),
    pytest.param("-0e0", -1.0, id="exponent-minus-zero"),
])
def test_minus_zero_is_accepted(run, db, literal, sign):
    run.write("a.json", "[" + record_text(metric='"activity"', value=literal) + "]")
    assert run() == 0
    ((value,),) = db.query("SELECT value FROM raw_data")
    assert value == 0.0 and math.copysign(1.0, value) == sign
    assert counts(run) == expect(seen=1, read=1, inserted=1)


TRICKY_USER_IDS = [
    "tab\there", "new\nline", "carriage\rreturn", "crlf\r\n", "back\\slash", "\\", "trailing\\",
    'double"quote', "single'quote", "\\N", "\\.", "\\t (backslash t, not a tab)", "\\\\N",
    "'); DROP TABLE raw_data; --", "x\"; DELETE FROM raw_data; --", "%s %(x)s {0} $1",
    "emoji 🫀❤️‍🔥", "e\u0301 combining", "\u00e9 precomposed", "\u0041\u030a\u0328 stacked",
    "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "\ufeffbom-prefixed", "zero\u200bwidth", "line\u2028separator", "\x01\x07\x1b\x7f controls",
    "\x0b\x0c vertical tab and form feed", "  leading and trailing  ", "a,b;c|d", "ü" * 3,
]


@pytest.mark.parametrize("path", ["direct-copy", "staging"])
@pytest.mark.parametrize("ensure_ascii", [True, False], ids=["escaped-json", "raw-utf8-json"])
def test_user_ids_round_trip_exactly(run, db, path, ensure_ascii):
    """Each user_id is stored exactly as written, through COPY straight into raw_data and through
    the staging table (forced by a key already in the table; repeated keys: the first value wins)."""
    records = [rec(user=u, metric="heart_rate", ts="2024-01-01T00:00:00Z", value=100 + i)
               for i, u in enumerate(TRICKY_USER_IDS)]
    if path == "staging":
        db.query("INSERT INTO raw_data VALUES ('pre-existing', 'heart_rate', '2024-01-01T00:00:00Z', 99)")
        records += [rec(user=u, metric="heart_rate", ts="2024-01-01T00:00:00Z", value=200 + i)
                    for i, u in enumerate(TRICKY_USER_IDS)]
        records.append(rec(user="pre-existing", metric="heart_rate", ts="2024-01-01T00:00:00Z", value=250))
    run.write("a.json", json.dumps(records, ensure_ascii=ensure_ascii))
    assert run("--batch-size", "7") == 0
    stored = db.query("SELECT user_id, value FROM raw_data WHERE user_id <> 'pre-existing' ORDER BY value")
    assert stored == [(u, 100.0 + i) for i, u in enumerate(TRICKY_USER_IDS)]
    n = len(TRICKY_USER_IDS)
    assert counts(run) == expect(seen=1, read=len(records), inserted=n, duplicate=len(records) - n)
    assert db.query("SELECT value FROM raw_data WHERE user_id = 'pre-existing'") == ([(99.0,)] if path == "staging"
                                                                                     else [])
    assert db.query("SELECT to_regclass('raw_data') IS NOT NULL") == [(True,)]


# =============================================================================================
# Value plausibility per metric (was xfail(strict=True) until ingest.py implemented the bounds)
# =============================================================================================
PLAUSIBLE = {"heart_rate": (20, 300), "spo2": (50, 100), "hrv": (0, 500), "breath_rate": (1, 80),
             "activity": (0, 100_000), "active_zone_minute": (0, 1440)}


@pytest.mark.parametrize("metric, value", [
    ("heart_rate", -1), ("heart_rate", 19.9), ("heart_rate", 301), ("heart_rate", 10_000),
    ("spo2", 100.5), ("spo2", 49), ("spo2", -1),
    ("hrv", -3), ("hrv", 500.5),
    ("breath_rate", 0), ("breath_rate", 80.1),
    ("activity", -1), ("activity", 100_001),
    ("active_zone_minute", -1), ("active_zone_minute", 1441),
])
def test_implausible_value_is_rejected(run, db, metric, value):
    check_rejected(run, db, record_text(metric=j(metric), value=j(value)), "outside the plausible range")


def test_values_on_the_plausibility_bounds_are_accepted(run, db):
    records = [rec(metric=m, ts=f"2024-01-01T00:00:0{i}Z", value=v)
               for m, bounds in PLAUSIBLE.items() for i, v in enumerate(bounds)]
    run.write("a.json", records)
    assert run() == 0
    assert sorted((r[1], r[3]) for r in db.rows()) == sorted((m, float(v)) for m, b in PLAUSIBLE.items() for v in b)
    assert counts(run) == expect(seen=1, read=12, inserted=12)
