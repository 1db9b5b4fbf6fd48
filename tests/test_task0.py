"""A Task-0-like directory: six pretty-printed files, one large with many repeated keys."""
from __future__ import annotations

import datetime as dt
import json
import subprocess
import sys

from tests.conftest import ROOT

SECONDS = 6 * 3600  # six hours of data
REPEAT = 4  # heart rate written four times over the same six hours, like Task-0's 30-days-on-one-day
EXPECTED = {  # per metric: records in the file, distinct keys (= rows)
    "heart_rate": (SECONDS * REPEAT, SECONDS),
    "spo2": (SECONDS // 60, SECONDS // 60),
    "activity": (SECONDS // 60, SECONDS // 60),
    "hrv": (SECONDS // 300, SECONDS // 300),
    "breath_rate": (SECONDS // 600, SECONDS // 600),
    "active_zone_minute": (SECONDS // 60, SECONDS // 60),
}


def test_task0_directory_loads_exact_per_metric_counts_and_reruns_insert_nothing(run, db):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_sample.py"), str(run.data),
                    "--seconds", str(SECONDS), "--repeat", str(REPEAT)], check=True, capture_output=True)
    files = sorted(p.name for p in run.data.iterdir())
    assert files == sorted(f"{m}.json" for m in EXPECTED)
    assert (run.data / "heart_rate.json").read_text()[:40].startswith('[\n  {\n    "user_id"')

    assert run() == 0
    s = run.summary()
    total_records = sum(r for r, _ in EXPECTED.values())
    total_rows = sum(k for _, k in EXPECTED.values())
    assert (s["files_seen"], s["files_loaded"], s["records_read"], s["records_rejected"]) == \
        (6, 6, total_records, 0)
    assert (s["rows_inserted"], s["rows_duplicate"]) == (total_rows, total_records - total_rows)
    per_file = {f["file"]: (f["records_read"], f["rows_inserted"]) for f in s["files"]}
    assert per_file == {f"{m}.json": counts for m, counts in EXPECTED.items()}
    per_metric = dict(db.query("SELECT metric, count(*) FROM raw_data GROUP BY metric"))
    assert per_metric == {m: k for m, (_, k) in EXPECTED.items()}

    # The first copy of each heart-rate key is the one stored.
    first_copy = json.loads((run.data / "heart_rate.json").read_text())[:SECONDS]
    stored = db.query("SELECT value FROM raw_data WHERE metric = 'heart_rate' ORDER BY \"timestamp\"")
    assert [v for (v,) in stored] == [float(r["value"]) for r in first_copy]

    assert db.query("SELECT hypertable_name, num_chunks > 0 FROM timescaledb_information.hypertables") == \
        [("raw_data", True)]
    span = db.query('SELECT min("timestamp"), max("timestamp") FROM raw_data')[0]
    assert span == (dt.datetime(2024, 1, 1, tzinfo=dt.UTC),
                    dt.datetime(2024, 1, 1, 5, 59, 59, tzinfo=dt.UTC))

    assert run() == 0
    again = run.summary()
    assert (again["files_skipped"], again["records_read"], again["rows_inserted"]) == (6, 0, 0)
    assert run("--force") == 0
    again = run.summary()
    assert (again["rows_inserted"], again["rows_duplicate"]) == (0, total_records)
    assert db.count() == total_rows
