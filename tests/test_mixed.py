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

from tests.conftest import rec

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
