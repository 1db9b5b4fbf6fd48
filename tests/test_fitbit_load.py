"""Real Fitbit data through main() into raw_data: generated Takeout exports (both layouts) and saved
Web API responses, with the flat format's guarantees. Fixtures are made here (no one's real data)."""
from __future__ import annotations

import datetime as dt
import json
import sys
from collections import Counter

import pytest

from tests.conftest import ROOT, rec

sys.path.insert(0, str(ROOT / "scripts"))
from make_fitbit_export import make_api_responses, make_takeout


def instant(text: str, tz: dt.tzinfo = dt.UTC) -> dt.datetime:
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=tz)


def by_user_metric(db) -> dict[tuple[str, str], int]:
    return {(u, m): n for u, m, n in db.query("SELECT user_id, metric, count(*) FROM raw_data GROUP BY 1, 2")}


@pytest.fixture
def export(run):
    """Two Takeout layouts and a folder of API responses, three days each."""
    parts = {"old": make_takeout(run.data, "old", days=3, user="alice-old", seed=1),
             "new": make_takeout(run.data, "new", days=3, user="alice-new", seed=2),
             "api": make_api_responses(run.data, days=3, user="alice", seed=3)}
    return parts


def test_an_export_loads_with_exact_counts_and_spot_values(run, db, export):
    assert run() == 0
    s = run.summary()
    expected_records = sum(sum(p["counts"].values()) for p in export.values())
    assert (s["records_read"], s["records_rejected"], s["files_failed"]) == (expected_records, 0, 0)
    assert s["rows_inserted"] + s["rows_duplicate"] == expected_records
    assert s["files_ignored"] == sum(len(p["skipped"]) for p in export.values())
    rows = by_user_metric(db)
    for part in export.values():  # every metric of every source, under the export's own user id
        for metric, records in part["counts"].items():
            assert 0 < rows[(part["user_id"], metric)] <= records
    assert {u for u, _ in rows} == {"takeout-alice-old", "takeout-alice-new", "api-alice-api"}
    for part in export.values():
        for spot in part["spots"]:
            record = spot["record"]
            got = db.query('SELECT value FROM raw_data WHERE user_id = %s AND metric = %s AND "timestamp" = %s',
                           (record["user_id"], record["metric"], instant(record["timestamp"])))
            assert got == [(float(record["value"]),)], spot
    sources = s["sources"]
    assert sources["takeout-heart-rate"]["records_read"] == export["old"]["counts"]["heart_rate"]
    assert sources["ignored"]["files"] == {"ignored": s["files_ignored"]}
    assert run() == 0  # a re-run skips every file
    assert run.summary()["files_skipped"] == s["files_loaded"] and run.summary()["rows_inserted"] == 0


def test_times_follow_each_sources_convention(run, db):
    """Takeout heart rate is UTC; the CSVs and API bodies are the wearer's wall time (SOURCE_TIMEZONE)."""
    export = make_takeout(run.data, "old", days=1, user="bob", seed=4)
    assert run("--source-timezone", "America/New_York") == 0
    (hr,) = [s["record"] for s in export["spots"] if s["record"]["metric"] == "heart_rate"][:1]
    (local,) = [s["record"] for s in export["spots"] if s["record"]["metric"] == "spo2"][:1]
    assert hr["timestamp"].endswith("Z") and not local["timestamp"].endswith("Z")
    for record, tz in ((hr, dt.UTC), (local, dt.timezone(dt.timedelta(hours=-5)))):  # EST in January
        assert db.query('SELECT count(*) FROM raw_data WHERE metric = %s AND "timestamp" = %s',
                        (record["metric"], instant(record["timestamp"], tz))) == [(1,)]


def test_user_id_setting_and_format_choice(run, db, export, monkeypatch):
    monkeypatch.setenv("USER_ID", "me")
    assert run("--format", "fitbit-takeout") == 0
    s = run.summary()
    assert {u for u, _ in by_user_metric(db)} == {"me"}
    assert not any(k.startswith("api-") for k in s["sources"])  # the API folder was left alone
    assert s["sources"]["ignored"]["files"]["ignored"] >= len(export["api"]["skipped"])


def test_flat_files_beside_an_export_keep_their_own_user_id(run, db):
    make_takeout(run.data, "new", days=1, user="carol", seed=5)
    run.write("task0/heart_rate.json", [rec(user="user_7", metric="heart_rate")])
    assert run() == 0
    assert ("user_7", "heart_rate") in by_user_metric(db)


def test_dry_run_says_what_was_read_mapped_ignored_and_rejected_per_source(run, db, export):
    csv_path = next(run.data.rglob("Minute SpO2 - *.csv"))
    lines = csv_path.read_text().splitlines()
    fields = lines[2].split(",")
    lines[2] = ",".join([fields[0], "abc", *fields[2:]])  # the value column (second in both layouts)
    csv_path.write_text("\n".join(lines) + "\n")
    assert run("--dry-run") == 1
    s = run.summary()
    spo2 = s["sources"]["takeout-spo2-csv"]
    assert spo2["records_rejected"] == 1
    assert spo2["files"] == {"checked": len(list(run.data.rglob("Minute SpO2 - *.csv")))}
    (reject,) = run.reject_lines()
    assert reject["position"] == 3 and 'value must be a number, got string "abc"' in reject["reason"]
    assert db.count() == 0


HOSTILE = [
    pytest.param("Takeout/Fitbit/Oxygen Saturation (SpO2)/Minute SpO2 - 2023-01-01.csv",
                 "timestamp\n2023-01-01T00:00:00\n", "failed", "value", id="csv-missing-column"),
    pytest.param("Takeout/Fitbit/Global Export Data/heart_rate-2023-01-01.json",
                 '[{"dateTime": "01/01/23 00:00:00", "value": {"bpm": null, "confidence": 2}},'
                 ' {"dateTime": "01/01/23 00:00:05", "value": {"bpm": 61, "confidence": 2}}]',
                 "loaded", "value must be a number, got null", id="bpm-null"),
    pytest.param("Takeout/Fitbit/Global Export Data/steps-2023-01-01.json",
                 '[{"dateTime": "01/01/23 00:00:00", "value": "lots"}, {"dateTime": "01/01/23 00:01", "value": "7"}]',
                 "loaded", 'value must be a number, got string "lots"', id="steps-not-a-number"),
    pytest.param("Takeout/Fitbit/Global Export Data/heart_rate-2023-01-01.json",
                 '[{"dateTime": "01/01/23 00:00:00", "value": {"bpm": 60, "confidence": 2}}, {"dateT',
                 "failed", "", id="truncated-json"),
    pytest.param("Takeout/Fitbit/Heart Rate Variability/Heart Rate Variability Details - 2023-01-01.csv",
                 "\ufefftimestamp,rmssd,coverage,low_frequency,high_frequency\r\n2023-01-01T00:00:00,41.5,0.9,1,2\r\n",
                 "loaded", None, id="bom-and-crlf"),
]


@pytest.mark.parametrize("rel, content, status, fragment", HOSTILE)
def test_hostile_export_files_fail_or_reject_alone(run, db, rel, content, status, fragment):
    run.write(rel, content)
    run.write("Takeout/Fitbit/Global Export Data/steps-2023-01-02.json",
              '[{"dateTime": "01/02/23 00:00:00", "value": "12"}]')
    code = run()
    files = {f["file"]: f for f in run.summary()["files"]}
    assert files[rel]["status"] == status
    assert files["Takeout/Fitbit/Global Export Data/steps-2023-01-02.json"]["status"] == "loaded"
    if status == "failed":
        assert code == 1 and fragment in files[rel]["error"]
    elif fragment:
        assert code == 1 and [fragment in r["reason"] for r in run.reject_lines()] == [True]
    else:
        assert code == 0
    assert Counter(m for _, m in by_user_metric(db))["activity"] == 1


def test_dry_run_on_a_generated_export_prints_a_line_per_source(run, db, export, capsys):
    assert run("--dry-run") == 0
    err = capsys.readouterr().err
    for kind in ("takeout-heart-rate", "takeout-steps-csv", "api-hrv", "ignored"):
        assert f"by source {kind}: files " in err
    assert json.loads(run.summary_path.read_text())["sources"]["api-br"]["records_read"] == \
        export["api"]["counts"]["breath_rate"]


def test_a_long_takeout_file_keeps_positions_reasons_and_first_wins_across_its_batches(run, db):
    """Mapped records go on in batches (FITBIT_BATCH_RECORDS): a bad record anywhere in a batch is
    rejected alone, at its own position, with its own mapped text; a repeat is dropped even when
    its first occurrence was in an earlier batch."""
    start = dt.datetime(2023, 1, 1, tzinfo=dt.UTC)
    items = [{"dateTime": (start + dt.timedelta(seconds=5 * i)).strftime("%m/%d/%y %H:%M:%S"),
              "value": {"bpm": 60 + i % 50, "confidence": 2}} for i in range(5000)]
    items[9]["value"]["bpm"] = None  # position 10: not a number (handed on alone)
    items[2999]["value"]["bpm"] = 900  # position 3000: a number, out of range (inside a batch)
    items[4499]["dateTime"] = "02/30/23 00:00:10"  # position 4500: no such day (inside a batch)
    items[2049] = {"dateTime": items[0]["dateTime"], "value": {"bpm": 99, "confidence": 2}}  # repeats position 1
    run.write("Takeout/Fitbit/Global Export Data/heart_rate-2023-01-01.json", items)
    assert run("--user-id", "u1") == 1
    s = run.summary()
    assert (s["records_read"], s["records_rejected"], s["rows_inserted"], s["rows_duplicate"]) == (5000, 3, 4996, 1)
    rejects = run.reject_lines()
    assert [r["position"] for r in rejects] == [10, 3000, 4500]
    assert "value must be a number, got null" in rejects[0]["reason"]
    assert "900" in rejects[1]["reason"] and json.loads(rejects[1]["record"])["value"] == 900
    assert json.loads(rejects[2]["record"])["timestamp"] == "2023-02-30T00:00:10Z"
    assert db.count() == 4996
    assert db.query('SELECT value FROM raw_data WHERE "timestamp" = %s', (start,)) == [(60.0,)]
