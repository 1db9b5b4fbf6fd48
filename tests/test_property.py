"""Property-based: any mix of valid and invalid records, over 1-4 files, loads like a simple model.

The model is independent of ingest.validate_record: every generated record is valid or invalid
by construction (a valid record drawn from a small key space, or one broken on purpose in a way
that no reading of the rules accepts), and its key's instant in UTC is known from how its
timestamp was spelt. Walking the files in sorted path order and the records in file order, the
model keeps the first valid record of each (user_id, metric, instant); raw_data must equal it.

HYPOTHESIS_EXAMPLES (default 200) sets the number of examples.
"""
from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import ingest
from tests.conftest import rec

UTC = dt.UTC
EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "200"))

# The key space is small, so duplicates (within a file, across files) are frequent.
USERS = ("u1", "u2", "u3", 'q\t"\\N')  # the last one needs COPY escaping on both load paths
METRICS = ("heart_rate", "spo2")
BOUNDS = {"heart_rate": (20, 300), "spo2": (50, 100)}  # plausible values only: valid in any version
BASE = dt.datetime(2024, 1, 1, 23, 59, 58, tzinfo=UTC)
INSTANTS = tuple(BASE + dt.timedelta(seconds=k) for k in range(4))  # crosses midnight: two chunks
ZONES = {"UTC": dt.timedelta(0), "Europe/Berlin": dt.timedelta(hours=1)}  # Berlin's offset in January


def _fmt(moment: dt.datetime, suffix: str, sep: str = "T", frac: str = "") -> str:
    return moment.strftime(f"%Y-%m-%d{sep}%H:%M:%S") + frac + suffix


# Several spellings of one instant: (instant in UTC, UTC offset of the source zone) -> text.
SPELLINGS = {
    "Z": lambda i, off: _fmt(i, "Z"),
    "+00:00": lambda i, off: _fmt(i, "+00:00"),
    "+01:00": lambda i, off: _fmt(i + dt.timedelta(hours=1), "+01:00"),
    "-05:30": lambda i, off: _fmt(i - dt.timedelta(hours=5, minutes=30), "-05:30"),
    "+0200": lambda i, off: _fmt(i + dt.timedelta(hours=2), "+0200"),
    "space": lambda i, off: _fmt(i, "Z", sep=" "),
    "nanoseconds": lambda i, off: _fmt(i, "Z", frac=".000000999"),  # truncated to the same instant
    "naive": lambda i, off: _fmt(i + off, ""),  # wall time in the source zone
}

# Replacements that make a record invalid under any source zone.
BAD_FIELDS = {
    "user_id": [None, "", "   ", 7, True, "x" * 256, "a\u0000b"],
    "metric": [None, "Heart_Rate", "steps", " spo2", "", 3],
    "timestamp": [None, "2024-02-30T00:00:00Z", "2024-01-01", 1704067200, "2024-01-01T24:00:00Z",
                  "2024-12-31T23:59:60Z", "0000-01-01T00:00:00Z", "0001-01-01T00:30:00+01:00", "yesterday"],
    "value": [None, "60", True, False, [60], float("nan"), float("inf"), float("-inf"),
              "RAW:1e400", "RAW:-1e400", "RAW:1" + "0" * 400],
}
NON_RECORDS = ['"just a string"', "42", "null", "[]", "true", "{}"]
BROKEN_LINES = ['{"user_id": "u1", "metric": "spo2"', "{oops", "not json", "[1, 2"]  # JSON Lines only
NAMES = ("a", "b", "B", "sub/a", "sub-x", "sub/zz/c", "é")  # sorted by code point: "sub-x" < "sub/a"


@dataclasses.dataclass
class Item:
    text: str  # the record as JSON text (one line)
    key: tuple | None = None  # (user_id, metric, instant in UTC) when valid
    value: float | None = None


@dataclasses.dataclass
class DataFile:
    rel: str
    items: list
    broken: bool = False  # truncated JSON: the whole file fails

    def content(self) -> str:
        texts = [item.text for item in self.items]
        if self.rel.endswith(".jsonl"):
            return "".join(text + "\n" for text in texts)
        body = "[" + ",\n".join(texts)
        return body + (', {"user_id": "u' if self.broken else "]\n")


def _dumps(obj: dict) -> str:
    text = json.dumps(obj)  # NaN and Infinity are written as the JSON extensions
    for raw in ("RAW:1e400", "RAW:-1e400", "RAW:1" + "0" * 400):
        text = text.replace(json.dumps(raw), raw[4:])
    return text


@st.composite
def valid_items(draw, offset: dt.timedelta) -> Item:
    user, metric = draw(st.sampled_from(USERS)), draw(st.sampled_from(METRICS))
    instant, spelling = draw(st.sampled_from(INSTANTS)), draw(st.sampled_from(sorted(SPELLINGS)))
    lo, hi = BOUNDS[metric]
    value = draw(st.one_of(st.integers(lo, hi), st.floats(lo, hi, allow_nan=False, allow_infinity=False)))
    obj = rec(user=user, metric=metric, ts=SPELLINGS[spelling](instant, offset), value=value)
    if draw(st.booleans()) and draw(st.booleans()):
        obj["unit"] = "bpm"  # extra keys are ignored
    return Item(json.dumps(obj), (user, metric, instant), float(value))


@st.composite
def invalid_items(draw, jsonl: bool) -> Item:
    kind = draw(st.sampled_from(["field", "field", "field", "missing", "non-record"] + (["line"] if jsonl else [])))
    if kind == "non-record":
        return Item(draw(st.sampled_from(NON_RECORDS)))
    if kind == "line":
        return Item(draw(st.sampled_from(BROKEN_LINES)))
    obj = rec(user=draw(st.sampled_from(USERS)), metric=draw(st.sampled_from(METRICS)),
              ts=SPELLINGS["Z"](draw(st.sampled_from(INSTANTS)), dt.timedelta(0)), value=70)
    field = draw(st.sampled_from(sorted(BAD_FIELDS)))
    if kind == "missing":
        del obj[field]
    else:
        obj[field] = draw(st.sampled_from(BAD_FIELDS[field]))
    return Item(_dumps(obj))


@st.composite
def scenarios(draw):
    zone = draw(st.sampled_from(sorted(ZONES)))
    names = draw(st.lists(st.sampled_from(NAMES), min_size=1, max_size=4, unique=True))  # written unsorted
    files = []
    for name in names:
        jsonl = draw(st.booleans())
        items = draw(st.lists(st.one_of(valid_items(ZONES[zone]), invalid_items(jsonl)), max_size=12))
        broken = not jsonl and draw(st.integers(0, 9)) == 0
        files.append(DataFile(name + (".jsonl" if jsonl else ".json"), items, broken))
    batch_size = draw(st.sampled_from([1, 3, 20000]))
    return zone, batch_size, files


def model(files: list[DataFile]) -> dict:
    """What one run must do: first valid record per key wins, files in sorted path order."""
    table, rejects, read, failed = {}, [], 0, []
    for f in sorted(files, key=lambda f: f.rel):
        if f.broken:
            failed.append(f.rel)
            rejects.append((f.rel, None))
            continue
        for position, item in enumerate(f.items, start=1):
            read += 1
            if item.key is None:
                rejects.append((f.rel, position))
            elif item.key not in table:
                table[item.key] = item.value
    return {"table": table, "rejects": rejects, "read": read, "failed": failed}


def _reset(db) -> None:
    """A fresh database for each example: the table and whatever bookkeeping tables exist."""
    names = ["raw_data", "ingest_files", "ingest_runs", "ingest_run_keys"]
    present = [n for n in names if db.query("SELECT to_regclass(%s)", (n,))[0][0] is not None]
    db.query(f"TRUNCATE {', '.join(present)}")


@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(scenario=scenarios())
def test_any_mix_of_records_loads_like_the_model(run, db, scenario):
    zone, batch_size, files = scenario
    _reset(db)
    work = Path(tempfile.mkdtemp(dir=run.tmp))
    data = work / "data"
    for f in files:
        path = data / f.rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f.content(), encoding="utf-8")
    reject_file, summary_file = work / "rejects.jsonl", work / "summary.json"

    code = ingest.main(["--data-dir", str(data), "--reject-file", str(reject_file), "--summary-json",
                        str(summary_file), "--batch-size", str(batch_size), "--source-timezone", zone,
                        "--log-level", "ERROR"])

    want = model(files)
    rejected = len([r for r in want["rejects"] if r[1] is not None])
    assert code == (1 if want["rejects"] else 0)
    s = json.loads(summary_file.read_text())
    assert s["records_read"] == s["rows_inserted"] + s["rows_duplicate"] + s["records_rejected"]
    assert (s["files_seen"], s["files_failed"]) == (len(files), len(want["failed"]))
    assert (s["records_read"], s["records_rejected"], s["rows_inserted"]) == (want["read"], rejected,
                                                                                len(want["table"]))
    assert [f["file"] for f in s["files"]] == sorted(f.rel for f in files)
    lines = [json.loads(line) for line in reject_file.read_text(encoding="utf-8").splitlines()]
    assert [(r["file"], r["position"]) for r in lines] == want["rejects"]
    got = sorted((u, m, t, v) for u, m, t, v in db.rows())
    assert got == sorted((*key, value) for key, value in want["table"].items())
