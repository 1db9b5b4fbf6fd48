"""Readers of real Fitbit data (Google Takeout exports, saved Web API responses), without a database.

Per source and file type: exact records and spot values, time conventions, and hostile variants.
The end-to-end loads through main() are in tests/test_fitbit_load.py.
"""
from __future__ import annotations

import datetime as dt
import io
import json
import random
import subprocess
import sys
from collections import Counter
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

import ingest
from ingest import FileFormatError, Unparsable, derive_user_id, fitbit_format, fitbit_kind, read_fitbit
from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "scripts"))
from make_fitbit_export import make_api_responses, make_takeout


def rows(kind: str, text: str, user: str = "u") -> list[tuple[int, object]]:
    return list(read_fitbit(kind, io.StringIO(text, newline=""), user))


def values(kind: str, text: str) -> list[tuple[int, object, object]]:
    """(position, timestamp, value) of dict records; Unparsable kept as is."""
    return [(p, r["timestamp"], r["value"]) if isinstance(r, dict) else (p, r) for p, r in rows(kind, text)]


def rec(metric: str, timestamp: object, value: object, user: str = "u") -> dict:
    return {"user_id": user, "metric": metric, "timestamp": timestamp, "value": value}


def reason(record: dict, tz=dt.UTC) -> str | None:
    try:
        ingest.validate_record(record, tz)
    except ingest.ValidationError as exc:
        return str(exc)
    return None


# =============================================================================================
# Detection
# =============================================================================================
ARRAY = b'[{\n  "dateTime" : "01/01/20 05:00:07",\n  "value" : {\n    "bpm" : 62,\n    "confidence" : 2\n  }\n}'
CSV = b"timestamp,value\n"


@pytest.mark.parametrize("path, head, kind", [
    # older layout
    ("Takeout/Fitbit/Global Export Data/heart_rate-2020-01-01.json", ARRAY, "takeout-heart-rate"),
    ("Takeout/Fitbit/Global Export Data/steps-2020-01-01.json", b'[{"dateTime":"01/01/20 00:00:00","value":"0"}',
     "takeout-steps"),
    ("TAKEOUT/FITBIT/GLOBAL EXPORT DATA/HEART_RATE-2020-01-01.JSON", ARRAY, "takeout-heart-rate"),
    ("Takeout\\Fitbit\\Global Export Data\\heart_rate-2020-01-01.json", ARRAY, "takeout-heart-rate"),
    ("MyFitbitData/Alice/Physical Activity/heart_rate-2019-05-01.json", ARRAY, "takeout-heart-rate"),
    ("Takeout/Fitbit/Global Export Data/heart_rate-2020-01-01.json", b"\xef\xbb\xbf" + ARRAY, "takeout-heart-rate"),
    # newer per-type folders
    ("Takeout/Fitbit/Heart Rate Variability/Heart Rate Variability Details - 2023-01-01.csv", CSV, "takeout-hrv-csv"),
    ("Takeout/Fitbit/Oxygen Saturation (SpO2)/Minute SpO2 - 2023-01-01.csv", CSV, "takeout-spo2-csv"),
    ("Takeout/Fitbit/Heart Rate Variability/Respiratory Rate Summary - 2023-01-01.csv", CSV, "takeout-breath-csv"),
    ("Takeout/Fitbit/Heart Rate Variability/Daily Respiratory Rate Summary - 2023-01-01.csv", CSV,
     "takeout-breath-csv"),
    ("Takeout/Fitbit/Active Zone Minutes (AZM)/Active Zone Minutes - 2023-01-01.csv", CSV, "takeout-azm-csv"),
    ("Takeout/Fitbit/Active Zone Minutes (AZM)/Active Zone Minutes - 2023-01.csv", CSV, "takeout-azm-csv"),
    ("Takeout/Fitbit/Heart Rate Variability/Heart Rate Variability Details - 2024-07-(21).csv", CSV,
     "takeout-hrv-csv"),
    ("takeout/fitbit/oxygen saturation (spo2)/minute spo2 - 2023-01-01.CSV", CSV, "takeout-spo2-csv"),
    # newest (Google Data) files
    ("Takeout/Fitbit/Physical Activity_GoogleData/heart_rate_2024-10-27.csv", CSV, "takeout-heart-rate-csv"),
    ("Takeout/Fitbit/Physical Activity_GoogleData/steps_2023-01-01.csv", CSV, "takeout-steps-csv"),
    ("Takeout/Fitbit/Physical Activity_GoogleData/active_zone_minutes_2023-01-01.csv", CSV, "takeout-azm-csv"),
    ("Takeout/Fitbit/Health Fitness Data_GoogleData/heart_rate_variability_2023-01-01.csv", CSV, "takeout-hrv-csv"),
    ("Takeout/Fitbit/Health Fitness Data_GoogleData/respiratory_rate_sleep_summary_2023-01-01.csv", CSV,
     "takeout-breath-csv"),
    ("Takeout/Fitbit/Health Fitness Data_GoogleData/daily_respiratory_rate_2023-01-01.csv", CSV,
     "takeout-breath-csv"),
])
def test_takeout_files_are_detected_by_name_in_both_layouts(path, head, kind):
    assert fitbit_kind(path, head) == kind
    assert fitbit_format(kind) == "fitbit-takeout"


SLEEP_HEAD = json.dumps([{"logId": 1, "dateOfSleep": "2020-01-01", "levels": {
    "summary": {"deep": {"count": 4, "minutes": 80}}, "data": [{"dateTime": "2020-01-01T00:00:00.000"}]}}]).encode()


@pytest.mark.parametrize("path, head", [
    ("Takeout/Fitbit/Global Export Data/sleep-2020-01-01.json", SLEEP_HEAD),
    ("Takeout/Fitbit/Global Export Data/resting_heart_rate-2020-01-01.json", ARRAY),
    ("Takeout/Fitbit/Global Export Data/calories-2020-01-01.json", b'[{"dateTime":"01/01/20 00:00:00","value":"1.1"}'),
    ("Takeout/Fitbit/Your Profile/Profile.csv", b"id,full_name,timezone\n"),
    ("Takeout/Fitbit/Heart Rate Variability/Daily Heart Rate Variability Summary - 2023-01-01.csv", CSV),
    ("Takeout/Fitbit/Oxygen Saturation (SpO2)/Daily SpO2 - 2023-01-01.csv", CSV),
    ("Takeout/Fitbit/Physical Activity_GoogleData/daily_resting_heart_rate_2023-01-01.csv", CSV),
    ("Takeout/Fitbit/Physical Activity_GoogleData/heart_rate_readme.txt", b"Time Series Data Export\n"),
    ("Takeout/Fitbit/Glucose/Glucose 2023-01.csv", b"timestamp,glucose\n"),
    ("Takeout/Fitbit/Global Export Data/heart_rate-2020-01-01.json.gz", ARRAY),
    ("heart_rate.json", b'[\n  {\n    "user_id": "u1", "metric": "heart_rate"'),  # Task-0's own records
    ("api/profile.json", b'{"user": {"encodedId": "ABC", "offsetFromUTCMillis": 3600000}}'),
    ("api/hrv-summary.json", b'{"hrv": [{"value": {"dailyRmssd": 34.9, "deepRmssd": 30.1}, "dateTime": "2021-10-04"}]}'),
    ("api/steps-summary.json", b'{"dateTime": "2022-06-30", "value": 3450}'),  # wearipedia's intraday_activity
    ("api/notes.txt", b'{"activities-heart-intraday": {}}'),  # API keys, but not a .json file
    ("empty.json", b""),
])
def test_files_without_loadable_data_are_not_detected(path, head):
    assert fitbit_kind(path, head) is None


@pytest.mark.parametrize("head, kind", [
    ({"activities-heart": [{"dateTime": "2019-01-01"}], "activities-heart-intraday": {"dataset": []}}, "api-heart"),
    ({"activities-steps": [{"dateTime": "2019-01-01"}], "activities-steps-intraday": {"dataset": []}}, "api-steps"),
    ({"dateTime": "2021-10-04", "minutes": [{"value": 95.7, "minute": "2021-10-04T00:00:00"}]}, "api-spo2"),
    ([{"dateTime": "2021-10-04", "minutes": [{"value": 95.7, "minute": "2021-10-04T00:00:00"}]}], "api-spo2"),
    ({"hrv": [{"minutes": [{"minute": "2021-10-25T09:10:00.000", "value": {"rmssd": 26.6}}], "dateTime": "x"}]},
     "api-hrv"),
    ({"br": [{"value": {"breathingRate": 17.8}, "dateTime": "2021-10-04"}]}, "api-br"),
    ({"activities-active-zone-minutes-intraday": [{"dateTime": "2022-01-01", "minutes": []}]}, "api-azm"),
    ({"heart_rate_day": [{"activities-heart": [{"dateTime": "2022-06-30"}],
                          "activities-heart-intraday": {"dataset": []}}]}, "api-heart"),  # wearipedia wrapper
])
def test_api_bodies_are_detected_by_their_top_level_keys(head, kind):
    text = json.dumps(head, indent=2).encode()
    assert fitbit_kind("saved/response.json", text[:4096]) == kind
    assert fitbit_kind("saved/heart_rate-2020-01-01.json", text) == kind  # an API object under a Takeout name
    assert fitbit_format(kind) == "fitbit-api"


def test_fitbit_format_rejects_unknown_kinds():
    with pytest.raises(ValueError):
        fitbit_format("sleep")
    with pytest.raises(ValueError):
        read_fitbit("sleep", io.StringIO(""), "u")


# =============================================================================================
# Takeout heart rate / steps JSON
# =============================================================================================
def hr_item(when: object, bpm: object = 62, confidence: int = 2) -> dict:
    return {"dateTime": when, "value": {"bpm": bpm, "confidence": confidence}}


def test_takeout_heart_rate_rows_are_utc_with_two_digit_years_and_optional_seconds():
    text = json.dumps([hr_item("01/01/20 05:00:07"), hr_item("12/31/99 23:59:59", 71),
                       hr_item("01/02/20 03:04", 80), hr_item("3/4/2021 6:07:08", "75"),
                       hr_item("01/01/20 05:00:17", 130.5)], indent=2)
    assert rows("takeout-heart-rate", text, "takeout-alice") == [
        (1, rec("heart_rate", "2020-01-01T05:00:07Z", 62, "takeout-alice")),
        (2, rec("heart_rate", "2099-12-31T23:59:59Z", 71, "takeout-alice")),
        (3, rec("heart_rate", "2020-01-02T03:04:00Z", 80, "takeout-alice")),
        (4, rec("heart_rate", "2021-03-04T06:07:08Z", 75, "takeout-alice")),
        (5, rec("heart_rate", "2020-01-01T05:00:17Z", 130.5, "takeout-alice")),
    ]


def test_takeout_heart_rate_structural_problems_are_unparsable_and_bad_values_pass_through():
    items = [hr_item("01/01/20 05:00:07", None), 5, {"value": {"bpm": 60}}, {"dateTime": "01/01/20 05:00:27"},
             {"dateTime": "01/01/20 05:00:37", "value": 61}, {"dateTime": "01/01/20 05:00:47", "value": {"confidence": 1}},
             hr_item("01/01/20 05:00:57", "abc"), hr_item("yesterday", 60), hr_item(20200101, 60), ["x"]]
    got = rows("takeout-heart-rate", json.dumps(items))
    assert [p for p, _ in got] == list(range(1, 11))
    assert got[0][1] == rec("heart_rate", "2020-01-01T05:00:07Z", None)
    assert got[1][1] == Unparsable("item is not a JSON object (got number)", "5")
    assert got[2][1] == Unparsable("missing key: dateTime", '{"value": {"bpm": 60}}')
    assert got[3][1] == Unparsable("missing key: value", '{"dateTime": "01/01/20 05:00:27"}')
    assert got[4][1].reason == "value is not an object with a bpm key (got number)"
    assert got[5][1].reason == "missing key: value.bpm"
    assert got[6][1] == rec("heart_rate", "2020-01-01T05:00:57Z", "abc")
    assert got[7][1] == rec("heart_rate", "yesterday", 60)
    assert got[8][1] == rec("heart_rate", 20200101, 60)
    assert got[9][1] == Unparsable("item is not a JSON object (got array)", '["x"]')


def test_passed_through_values_are_rejected_by_the_loader_with_its_reason():
    got = dict(rows("takeout-heart-rate", json.dumps(
        [hr_item("01/01/20 05:00:07", None), hr_item("01/01/20 05:00:17", "abc"), hr_item("01/01/20 05:00:27", ""),
         hr_item("02/30/20 05:00:37", 60), hr_item("yesterday", 60), hr_item("01/01/20 05:00:47", 19)])))
    assert reason(got[1]) == "value must be a number, got null null"
    assert reason(got[2]).startswith("value must be a number, got string")
    assert reason(got[3]).startswith("value must be a number, got string")
    assert "is not a real date and time" in reason(got[4])
    assert "is not ISO 8601" in reason(got[5])
    assert "outside the plausible range for heart_rate" in reason(got[6])


def test_takeout_steps_values_are_strings_converted_to_numbers():
    items = [{"dateTime": "01/01/20 00:00:00", "value": "0"}, {"dateTime": "01/01/20 00:01:00", "value": "12"},
             {"dateTime": "01/01/20 00:02:00", "value": " 7 "}, {"dateTime": "01/01/20 00:03:00", "value": "abc"},
             {"dateTime": "01/01/20 00:04:00", "value": ""}, {"dateTime": "01/01/20 00:05:00", "value": None},
             {"dateTime": "01/01/20 00:06:00", "value": 3}, {"dateTime": "01/01/20 00:07:00", "value": "NaN"},
             {"dateTime": "01/01/20 00:08:00"}]
    assert values("takeout-steps", json.dumps(items)) == [
        (1, "2020-01-01T00:00:00Z", 0), (2, "2020-01-01T00:01:00Z", 12), (3, "2020-01-01T00:02:00Z", 7),
        (4, "2020-01-01T00:03:00Z", "abc"), (5, "2020-01-01T00:04:00Z", ""), (6, "2020-01-01T00:05:00Z", None),
        (7, "2020-01-01T00:06:00Z", 3), (8, "2020-01-01T00:07:00Z", "NaN"),
        (9, Unparsable("missing key: value", '{"dateTime": "01/01/20 00:08:00"}'))]


def _drain(kind: str, text: str) -> tuple[list, Exception | None]:
    got = []
    try:
        for item in read_fitbit(kind, io.StringIO(text, newline=""), "u"):
            got.append(item)  # noqa: PERF402 (the items before the error are kept)
    except FileFormatError as exc:
        return got, exc
    return got, None


@pytest.mark.parametrize("text, message", [
    ('[{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 62}}, {"dateTime": "01/01/20 05:0', "truncated"),
    ('[{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 62}},', "truncated"),
    ('[{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 62}}', "truncated"),
    ('[{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 62}} {"dateTime": 1}]', "expected ',' or ']'"),
    ('[{"dateTime": "01/01/20 05:00:07", "value": {bpm: 62}}]', "invalid JSON"),
    ('{"dateTime": "01/01/20 05:00:07"}', "expected a JSON array"),
    ("", "empty"),
    ("[]  x", "unexpected data after the JSON array"),
])
def test_broken_takeout_json_fails_the_file(text, message):
    got, error = _drain("takeout-heart-rate", text)
    assert error is not None and message in str(error)
    assert all(isinstance(r, dict) for _, r in got)  # what came before is well formed (the loader rolls it back)


def test_truncated_large_file_yields_its_complete_items_then_fails():
    items = [hr_item(f"01/01/20 {h:02d}:{m:02d}:{s:02d}", 60 + s % 40) for h in range(2) for m in range(60)
             for s in range(0, 60, 10)]
    text = json.dumps(items)
    got, error = _drain("takeout-heart-rate", text[: len(text) * 2 // 3])
    assert error is not None and "truncated" in str(error)
    assert 0 < len(got) < len(items) and [p for p, _ in got] == list(range(1, len(got) + 1))


def test_bom_crlf_and_empty_array():
    text = "\ufeff[\r\n" + ",\r\n".join(json.dumps(hr_item(f"01/01/20 00:00:{s:02d}")) for s in (5, 15)) + "\r\n]\r\n"
    assert values("takeout-heart-rate", text) == [(1, "2020-01-01T00:00:05Z", 62), (2, "2020-01-01T00:00:15Z", 62)]
    assert rows("takeout-heart-rate", " [ ] \n") == []


@pytest.mark.parametrize("chunk", [7, 64, 4096, 256 * 1024])
def test_streaming_gives_the_same_items_whatever_the_window_and_stays_small(monkeypatch, chunk):
    rng_items = [hr_item(f"01/{d:02d}/20 {h:02d}:{m:02d}:{s:02d}", 40 + (d * h + m + s) % 100, s % 4)
                 for d in (1, 2) for h in range(24) for m in range(60) for s in (3, 13, 27, 41, 55)]
    text = "[" + ",".join(json.dumps(item, indent=2) for item in rng_items) + "]"  # ~5 MB, Takeout-like
    largest = []
    original = ingest._Buffer.fill

    def spy(self):
        result = original(self)
        largest.append(len(self.text))
        return result

    monkeypatch.setattr(ingest, "READ_CHUNK_CHARS", chunk)
    monkeypatch.setattr(ingest._Buffer, "fill", spy)
    got = rows("takeout-heart-rate", text)
    assert len(got) == len(rng_items) == 14400
    assert got[0] == (1, rec("heart_rate", "2020-01-01T00:00:03Z", 40 + 3))
    assert got[-1][0] == 14400 and got[-1][1]["timestamp"] == "2020-01-02T23:59:55Z"
    assert all(type(r) is dict for _, r in got)
    assert max(largest) <= 2 * chunk + 1024  # the window, never the file (len(text) is ~5 MB)


# Odd items, written as JSON text (a key twice cannot be written with json.dumps), for the bulk path.
ODD_HEART = [
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": "62"}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 61.5}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 0}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": true}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": null}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 1e400}}',
    '{"dateTime": "3/1/23 5:00", "value": {"bpm": 60}}',
    '{"dateTime": "01/01/20 05:00:07\\n", "value": {"bpm": 60}}',
    '{"dateTime": "01/01/20 05:00:07\\n01/01/20 05:00:07", "value": {"bpm": 60}}',
    '{"dateTime": 20200101, "value": {"bpm": 60}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {}}',
    '{"dateTime": "01/01/20 05:00:07", "value": 61}',
    '{"value": {"bpm": 60}}',
    '5',
    '[]',
    '{"dateTime": "02/30/20 05:00:07", "dateTime": "01/01/20 06:00:07", "value": {"bpm": 60, "bpm": 70}}',
    '{"dateTime": "\\u00301/01/20 05:00:07", "value": {"bpm": 60}, "more": {"x": [1, NaN]}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 99999999999999999999999}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 1e-400}}',
    '{"dateTime": "01/01/20 05:00:07", "value": {"bpm": 62}, "value": {"bpm": 63, "confidence": 0}}',
]
ODD_STEPS = [
    '{"dateTime": "01/01/20 00:00:00", "value": " 12"}',
    '{"dateTime": "01/01/20 00:00:00", "value": "12.5"}',
    '{"dateTime": "01/01/20 00:00:00", "value": "-3"}',
    '{"dateTime": "01/01/20 00:00:00", "value": "+3"}',
    '{"dateTime": "01/01/20 00:00:00", "value": "1234567890123456"}',
    '{"dateTime": "01/01/20 00:00:00", "value": 12}',
    '{"dateTime": "01/01/20 00:00:00", "value": ""}',
    '{"dateTime": "01/01/20 00:00:00", "value": "１２"}',
    '{"dateTime": "01/01/20 00:00:00", "value": "007"}',
    '{"dateTime": "01/01/20 00:00:00", "value": "1\\n2"}',
    '{"dateTime": "01/01/20 00:00:00"}',
    '{"dateTime": "1/1/20 0:00", "value": "5"}',
    '{"dateTime": "01/01/20 00:00:00", "value": "5", "value": "6"}',
]


def _takeout_array(kind: str, seed: int, odd: float, count: int = 6000, only: str | None = None) -> str:
    """A Takeout array of usual items in Takeout's own layout, with odd ones at random places (or
    the one odd item ``only``, in the middle)."""
    rng, items = random.Random(seed), []
    for i in range(count):
        when = f"{1 + i // 3600 % 12:02d}/{1 + i // 86400:02d}/2{seed % 10} {i // 60 % 24:02d}:{i % 60:02d}:{i * 7 % 60:02d}"
        if rng.random() < odd:
            items.append(rng.choice(ODD_HEART if kind == "takeout-heart-rate" else ODD_STEPS))
        elif only is not None and i == count // 2:
            items.append(only)
        elif kind == "takeout-heart-rate":
            value = rng.choice([60 + i % 50, 72.25])
            items.append(json.dumps({"dateTime": when, "value": {"bpm": value, "confidence": i % 4}}, indent=2))
        else:
            items.append(json.dumps({"dateTime": when, "value": str(i % 130)}, indent=2))
    return "[" + ",".join(items) + "]\n"


def _bulk_as_read_fitbit(monkeypatch, kind: str, text: str) -> int:
    """Assert that the loader's batches of a Takeout array give what read_fitbit gives; return how
    many times were made in bulk."""
    monkeypatch.setattr(ingest, "READ_CHUNK_CHARS", 16384)
    bulk = []
    real = ingest._fb_legacy_utc_all
    monkeypatch.setattr(ingest, "_fb_legacy_utc_all", lambda texts: bulk.append(real(texts)) or bulk[-1])
    batches = list(ingest._fitbit_batches(kind, io.StringIO(text, newline=""), "u"))
    got = [(position, ingest._plain(record)) for first, batch in batches for position, record in enumerate(batch, first)]
    assert got == rows(kind, text)
    record_type = ingest._typed().Record
    for first, batch in batches:  # a batch is Records only, or one record of another kind alone
        assert all(type(record) is record_type for record in batch) or len(batch) == 1
    return sum(len(stamps) for stamps in bulk if stamps is not None)


@pytest.mark.parametrize("kind", ["takeout-heart-rate", "takeout-steps"])
@pytest.mark.parametrize("seed, odd", [(1, 0.0), (2, 0.001), (3, 0.02), (4, 0.3), (5, 1.0)])
def test_the_loaders_bulk_reading_of_takeout_arrays_gives_what_read_fitbit_gives(monkeypatch, kind, seed, odd):
    """Windows of usual items become Records in bulk (a Python call per window, not per item); a
    window with anything unusual in it goes item by item. Either way each position maps to what
    read_fitbit maps it to, as the loader passes it on (records with a number for a value as
    Records, in order, with their positions)."""
    made_in_bulk = _bulk_as_read_fitbit(monkeypatch, kind, _takeout_array(kind, seed, odd))
    if odd < 0.01:
        assert made_in_bulk > 4000
    if odd == 1.0:
        assert made_in_bulk == 0


@pytest.mark.parametrize("kind, item", [*(("takeout-heart-rate", item) for item in ODD_HEART),
                                        *(("takeout-steps", item) for item in ODD_STEPS)])
def test_one_odd_item_among_usual_ones_is_mapped_as_read_fitbit_maps_it(monkeypatch, kind, item):
    """The odd item alone in a window of usual ones: that window goes item by item, or in bulk
    only where the item is usual after all (a "\\u0030" is a "0", a key written twice keeps its last)."""
    made_in_bulk = _bulk_as_read_fitbit(monkeypatch, kind, _takeout_array(kind, 6, 0.0, count=2000, only=item))
    assert made_in_bulk >= 1000  # the windows without it


# =============================================================================================
# Takeout CSV files
# =============================================================================================
def test_spo2_csv_times_naive_or_utc_as_written_with_physical_line_numbers():
    text = ("\ufefftimestamp,value\r\n"
            "2023-01-01T01:00:00,95.5\r\n"
            "2023-01-01T01:01,96\r\n"            # no seconds
            "2023-01-01 01:02:00,97.0\r\n"       # space separator
            "\r\n"                               # a blank line keeps its number
            "2023-01-01T01:03:00Z,abc\r\n"       # Z kept
            "2023-01-01T01:04:00+01:00,\r\n"     # offset kept, empty value passed through
            "2023-01-01T01:05:00.500z,50\r\n")
    assert values("takeout-spo2-csv", text) == [
        (2, "2023-01-01T01:00:00", 95.5), (3, "2023-01-01T01:01:00", 96), (4, "2023-01-01T01:02:00", 97.0),
        (6, "2023-01-01T01:03:00Z", "abc"), (7, "2023-01-01T01:04:00+01:00", ""),
        (8, "2023-01-01T01:05:00.500Z", 50)]


def test_csv_maps_columns_by_name_with_extra_columns_and_any_order():
    text = "valid,Value ,confidence,TIMESTAMP,unused\ntrue,95.1,2,2023-01-01T01:00:00Z,false\n"
    assert values("takeout-spo2-csv", text) == [(2, "2023-01-01T01:00:00Z", 95.1)]


def test_csv_missing_required_column_fails_the_file_once_naming_it():
    got, error = _drain("takeout-spo2-csv", "timestamp,confidence\n2023-01-01T01:00:00,3\n")
    assert got == [] and isinstance(error, FileFormatError) and "missing column 'value'" in str(error)
    got, error = _drain("takeout-hrv-csv", "time,rmssd\n2023-01-01T01:00:00,30\n")
    assert got == [] and "missing column 'timestamp'" in str(error)
    got, error = _drain("takeout-breath-csv", "timestamp,deep_sleep_breathing_rate\n2023-01-01T00:00:00,14\n")
    assert "'full_sleep_breathing_rate' or 'daily_respiratory_rate'" in str(error)
    got, error = _drain("takeout-azm-csv", "")
    assert "empty" in str(error)


def test_csv_rows_with_the_wrong_number_of_columns_are_unparsable():
    text = ('timestamp,rmssd,coverage\n2023-01-01T01:00:00,30.5,0.9\n2023-01-01T01:05:00\n'
            '2023-01-01T01:10:00,31,0.9,extra\n"2023-01-01T01:15:00","32","multi\nline"\n2023-01-01T01:20:00,33,1\n')
    assert values("takeout-hrv-csv", text) == [
        (2, "2023-01-01T01:00:00", 30.5),
        (3, Unparsable("row has 1 columns, the header has 3 (no 'rmssd')", "2023-01-01T01:05:00")),
        (4, Unparsable("row has 4 columns, the header has 3", "2023-01-01T01:10:00,31,0.9,extra")),
        (5, "2023-01-01T01:15:00", 32),
        (7, "2023-01-01T01:20:00", 33)]


def test_header_only_csv_has_no_rows():
    assert rows("takeout-hrv-csv", "timestamp,rmssd,coverage,low_frequency,high_frequency\n") == []


def test_hrv_csv_both_layouts():
    assert values("takeout-hrv-csv", "timestamp,rmssd,coverage,low_frequency,high_frequency\n"
                                     "2023-01-01T01:00:00,26.617,0.935,717.578,126.514\n") == \
        [(2, "2023-01-01T01:00:00", 26.617)]
    assert values("takeout-hrv-csv", "timestamp,root mean square of successive differences milliseconds,"
                                     "standard deviation milliseconds,data source\n"
                                     "2024-01-01T03:05:00Z,41.2,12.0,Fitbit\n") == [(2, "2024-01-01T03:05:00Z", 41.2)]


def test_breath_csv_value_columns_units_and_date_only_timestamps():
    header = ("timestamp,full_sleep_breathing_rate,full_sleep_standard_deviation,full_sleep_signal_to_noise,"
              "deep_sleep_breathing_rate,deep_sleep_standard_deviation,deep_sleep_signal_to_noise\n")
    assert values("takeout-breath-csv", header + "2023-01-01T07:00:00,15.2,1.1,3.4,14.0,0.9,2.2\n"
                                                 "2023-01-02,-1,0,0,-1,0,0\n") == [
        (2, "2023-01-01T07:00:00", 15.2), (3, "2023-01-02T00:00:00", -1)]
    assert values("takeout-breath-csv", "timestamp,daily_respiratory_rate\n2024-07-21T00:00:00,16.4\n") == \
        [(2, "2024-07-21T00:00:00", 16.4)]
    got = values("takeout-breath-csv", "timestamp,full sleep stats - milli breaths per minute,data source\n"
                                       "2024-07-21T06:30:00Z,15400,Fitbit\n")
    assert got[0][:2] == (2, "2024-07-21T06:30:00Z") and got[0][2] == pytest.approx(15.4)
    assert values("takeout-breath-csv", "timestamp,breaths per minute,data source\n2024-07-21T00:00:00Z,14.9,x\n") == \
        [(2, "2024-07-21T00:00:00Z", 14.9)]


def test_azm_csv_sums_adjacent_rows_of_one_minute_and_accepts_missing_seconds():
    text = ("date_time,heart_zone_id,total_minutes\n"
            "2023-01-01T17:05,FAT_BURN,1\n"
            "2023-01-01T17:06,FAT_BURN,1\n"
            "2023-01-01T17:06,CARDIO,2\n"     # same minute, adjacent: summed (3), position of the first row
            "2023-01-01T17:07:00,PEAK,2\n"
            "2023-01-01T17:05,FAT_BURN,1\n"   # same minute as line 2 but not adjacent: its own record
            "2023-01-01T17:08,FAT_BURN,1\n"
            "2023-01-01T17:08,CARDIO,x\n"     # a non-number in the group: the minute is passed through as "x"
            "2023-01-02,FAT_BURN,12\n")       # a daily total: local midnight
    assert values("takeout-azm-csv", text) == [
        (2, "2023-01-01T17:05:00", 1), (3, "2023-01-01T17:06:00", 3), (5, "2023-01-01T17:07:00", 2),
        (6, "2023-01-01T17:05:00", 1), (7, "2023-01-01T17:08:00", "x"), (9, "2023-01-02T00:00:00", 12)]


def test_azm_csv_google_data_layout():
    text = ("timestamp,heart rate zone,total minutes\r\n2023-01-03T09:23:00Z,fat burn,1\r\n"
            "2023-01-14T15:55:00Z,peak,2\r\n")
    assert values("takeout-azm-csv", text) == [(2, "2023-01-03T09:23:00Z", 1), (3, "2023-01-14T15:55:00Z", 2)]


def test_google_data_heart_rate_and_steps_csv():
    assert values("takeout-heart-rate-csv", "timestamp,beats per minute\n2024-10-27T00:00:04Z,65.0\n"
                                            "2024-10-27T00:00:09Z,null\n") == [
        (2, "2024-10-27T00:00:04Z", 65.0), (3, "2024-10-27T00:00:09Z", "null")]
    assert values("takeout-steps-csv", "timestamp,steps\n2023-01-01T00:09:00Z,8\n") == [(2, "2023-01-01T00:09:00Z", 8)]


def test_legacy_times_that_are_not_times_pass_through_unchanged():
    got = values("takeout-steps", json.dumps([{"dateTime": "ab/cd/ef gh:ij:kl", "value": "1"},
                                              {"dateTime": "01/01/20  00:00:00", "value": "1"},
                                              {"dateTime": " 01/01/20 00:00:00 ", "value": "1"}]))
    assert got == [(1, "ab/cd/ef gh:ij:kl", 1), (2, "01/01/20  00:00:00", 1), (3, "2020-01-01T00:00:00Z", 1)]


def test_csv_per_minute_date_only_is_passed_through_for_the_validator():
    assert values("takeout-spo2-csv", "timestamp,value\n2023-01-01,95\n") == [(2, "2023-01-01", 95)]


# =============================================================================================
# Web API bodies
# =============================================================================================
def heart_body(date: str = "2019-01-01", dataset: list | None = None, resource: str = "heart") -> str:
    return json.dumps({f"activities-{resource}": [{"dateTime": date, "value": {"restingHeartRate": 58}}],
                       f"activities-{resource}-intraday": {"dataset": dataset if dataset is not None else [
                           {"time": "00:00:00", "value": 64}, {"time": "00:01:00", "value": "63"},
                           {"time": "00:02", "value": 62.5}], "datasetInterval": 1, "datasetType": "minute"}})


def test_api_heart_intraday_is_local_time_on_the_summary_date():
    assert rows("api-heart", heart_body(), "api-bob") == [
        (1, rec("heart_rate", "2019-01-01T00:00:00", 64, "api-bob")),
        (2, rec("heart_rate", "2019-01-01T00:01:00", 63, "api-bob")),
        (3, rec("heart_rate", "2019-01-01T00:02:00", 62.5, "api-bob"))]


def test_api_steps_intraday():
    body = heart_body("2019-01-01", [{"time": "08:00:00", "value": 0}, {"time": "08:01:00", "value": 17}], "steps")
    assert values("api-steps", body) == [(1, "2019-01-01T08:00:00", 0), (2, "2019-01-01T08:01:00", 17)]


def test_api_range_past_midnight_moves_to_the_next_date():
    body = json.loads(heart_body("2019-01-01", [{"time": "23:59:00", "value": 70}, {"time": "00:00:00", "value": 71},
                                                {"time": "00:01:00", "value": 72}]))
    body["activities-heart"].append({"dateTime": "2019-01-02", "value": {}})
    assert values("api-heart", json.dumps(body)) == [
        (1, "2019-01-01T23:59:00", 70), (2, "2019-01-02T00:00:00", 71), (3, "2019-01-02T00:01:00", 72)]


def test_api_heart_item_problems():
    body = heart_body("2019-01-01", [{"time": "00:00:00"}, 7, {"value": 60}, {"time": "00:03:00", "value": None},
                                     {"time": 5, "value": 60}])
    assert values("api-heart", body) == [
        (1, Unparsable("missing key: value", '{"time": "00:00:00"}')),
        (2, Unparsable("item is not a JSON object (got number)", "7")),
        (3, Unparsable("missing key: time", '{"value": 60}')),
        (4, "2019-01-01T00:03:00", None),
        (5, 5, 60)]


@pytest.mark.parametrize("body, message", [
    ({"activities-heart-intraday": {"dataset": []}}, "missing activities-heart[0].dateTime"),
    ({"activities-heart": [{"dateTime": "today"}], "activities-heart-intraday": {"dataset": []}}, "not a date"),
    ({"activities-heart": [{"dateTime": "2019-01-01"}], "activities-heart-intraday": []}, "dataset"),
    ({"something": 1, "else": 2}, "no 'activities-heart-intraday' key"),
])
def test_api_heart_body_problems_fail_the_file(body, message):
    got, error = _drain("api-heart", json.dumps(body))
    assert got == [] and error is not None and message in str(error)


def test_truncated_api_body_fails_the_file():
    got, error = _drain("api-heart", heart_body()[:-40])
    assert got == [] and "truncated" in str(error)
    got, error = _drain("api-spo2", "")
    assert "empty" in str(error)


def test_api_spo2_single_day_and_interval_list():
    day = {"dateTime": "2021-10-04", "minutes": [{"value": 95.7, "minute": "2021-10-04T00:00:00"},
                                                 {"value": 96.1, "minute": "2021-10-04T00:01:00"}]}
    assert values("api-spo2", json.dumps(day)) == [(1, "2021-10-04T00:00:00", 95.7), (2, "2021-10-04T00:01:00", 96.1)]
    other = {"dateTime": "2021-10-05", "minutes": [{"value": "97", "minute": "23:59:00"}, {"minute": "x"}]}
    assert values("api-spo2", json.dumps([day, other])) == [
        (1, "2021-10-04T00:00:00", 95.7), (2, "2021-10-04T00:01:00", 96.1), (3, "2021-10-05T23:59:00", 97),
        (4, Unparsable("missing key: value", '{"minute": "x"}'))]


def test_api_hrv_intraday():
    body = {"hrv": [{"minutes": [
        {"minute": "2021-10-25T09:10:00.000", "value": {"rmssd": 26.617, "coverage": 0.935, "hf": 126.5, "lf": 717.5}},
        {"minute": "2021-10-25T09:15:00.000", "value": {"coverage": 0.9}},
        {"minute": "2021-10-25T09:20:00.000", "value": 30}], "dateTime": "2021-10-25"}]}
    assert values("api-hrv", json.dumps(body)) == [
        (1, "2021-10-25T09:10:00.000", 26.617),
        (2, Unparsable("missing key: value.rmssd", json.dumps(body["hrv"][0]["minutes"][1]))),
        (3, Unparsable("value is not an object with a rmssd key (got number)",
                       json.dumps(body["hrv"][0]["minutes"][2])))]


def test_api_breathing_rate_summary_and_intraday_shapes():
    body = {"br": [{"value": {"breathingRate": 17.8}, "dateTime": "2021-10-04"},
                   {"value": {"deepSleepSummary": {"breathingRate": 16.8}, "remSleepSummary": {"breathingRate": -1},
                              "fullSleepSummary": {"breathingRate": 17.1}}, "dateTime": "2021-10-05"},
                   {"value": {"fullSleepSummary": {"breathingRate": -1}}, "dateTime": "2021-10-06"},
                   {"value": {"deepSleepSummary": {"breathingRate": 16.8}}, "dateTime": "2021-10-07"}]}
    assert values("api-br", json.dumps(body)) == [
        (1, "2021-10-04T00:00:00", 17.8), (2, "2021-10-05T00:00:00", 17.1), (3, "2021-10-06T00:00:00", -1),
        (4, Unparsable("missing key: value.breathingRate (or value.fullSleepSummary.breathingRate)",
                       json.dumps(body["br"][3])))]


def test_api_azm_intraday_full_and_bare_clock_minutes():
    body = {"activities-active-zone-minutes-intraday": [{"dateTime": "2022-01-01", "minutes": [
        {"minute": "2022-01-01T00:00:00", "value": {"activeZoneMinutes": 0}},
        {"minute": "17:01:00", "value": {"activeZoneMinutes": 2, "cardioActiveZoneMinutes": 2}},
        {"minute": "2022-01-01T17:02:00", "value": {"fatBurnActiveZoneMinutes": 1}}]}]}
    assert values("api-azm", json.dumps(body)) == [
        (1, "2022-01-01T00:00:00", 0), (2, "2022-01-01T17:01:00", 2),
        (3, Unparsable("missing key: value.activeZoneMinutes",
                       json.dumps(body["activities-active-zone-minutes-intraday"][0]["minutes"][2])))]


def test_api_wrapped_bodies_from_wearipedia_are_unwrapped():
    body = {"heart_rate_day": [json.loads(heart_body("2022-06-30"))]}
    assert [r["timestamp"] for _, r in rows("api-heart", json.dumps(body))] == [
        "2022-06-30T00:00:00", "2022-06-30T00:01:00", "2022-06-30T00:02:00"]


# =============================================================================================
# User id
# =============================================================================================
@pytest.mark.parametrize("rel, kind, expected", [
    ("alice/Takeout/Fitbit/Global Export Data/heart_rate-2020-01-01.json", None, "takeout-alice"),
    ("exports/Bob Smith/Takeout/Fitbit/Oxygen Saturation (SpO2)/Minute SpO2 - 2023-01-01.csv", None,
     "takeout-Bob_Smith"),
    ("takeout-20240102T030405Z-001/Takeout/Fitbit/Global Export Data/steps-2020-01-01.json", None,
     "takeout-20240102T030405Z"),
    ("takeout-20240102T030405Z-002/Takeout/Fitbit/Global Export Data/steps-2020-01-02.json", None,
     "takeout-20240102T030405Z"),
    ("Takeout/Fitbit/Global Export Data/heart_rate-2020-01-01.json", None, "takeout-data"),
    ("carol/Fitbit/Global Export Data/heart_rate-2020-01-01.json", None, "takeout-carol"),
    ("Fitbit/dave/heart_rate-2020-01-01.json", None, "takeout-dave"),
    ("heart_rate-2020-01-01.json", None, "takeout-data"),
    ("bob-api/heart-2023-01-01.json", "api-heart", "api-bob-api"),
    ("Global Export Data/heart_rate-2020-01-01.json", None, "takeout-data"),
    ("Fitbit/Physical Activity_GoogleData/steps_2023-01-01.csv", None, "takeout-data"),
])
def test_derive_user_id(tmp_path, rel, kind, expected):
    data_dir = tmp_path / "data"
    assert derive_user_id(data_dir, data_dir / rel, kind=kind) == expected
    assert derive_user_id(data_dir, data_dir / rel, kind=kind) == expected  # deterministic


@pytest.mark.parametrize("data_dir, rel, expected", [
    ("alice/Takeout", "Fitbit/Global Export Data/heart_rate-2020-01-01.json", "takeout-alice"),
    ("alice/Takeout", "Fitbit/Oxygen Saturation (SpO2)/Minute SpO2 - 2023-01-01.csv", "takeout-alice"),
    ("alice/Takeout/Fitbit", "Heart Rate Variability/Heart Rate Variability Details - 2023-01-01.csv", "takeout-alice"),
    ("bob/Takeout", "Fitbit/Global Export Data/heart_rate-2020-01-01.json", "takeout-bob"),
    ("srv/takeout/carol", "Fitbit/Global Export Data/heart_rate-2020-01-01.json", "takeout-carol"),
    ("dave/Fitbit/Global Export Data", "heart_rate-2020-01-01.json", "takeout-dave"),
])
def test_an_exports_id_comes_from_the_export_as_a_whole_wherever_data_dir_points(tmp_path, data_dir, rel, expected):
    """Never a folder inside the export (one export, one id), and two people's exports, loaded
    the same way, never one id."""
    root = tmp_path / data_dir
    assert derive_user_id(root, root / rel) == expected


def test_an_export_whose_folders_name_no_one_has_no_derived_id():
    root = Path("/Takeout")
    assert derive_user_id(root, root / "Fitbit/Global Export Data/heart_rate-2020-01-01.json") is None


def test_derive_user_id_outside_data_dir_uses_the_parent(tmp_path):
    assert derive_user_id(tmp_path / "a", tmp_path / "elsewhere" / "x.json") == "takeout-elsewhere"


# =============================================================================================
# Generated exports: detection + readers give exactly what the generator wrote
# =============================================================================================
def read_tree(root: Path) -> tuple[dict, dict, list, Counter]:
    files, records, skipped, counts = {}, {}, [], Counter()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        with open(path, "rb") as f:
            kind = fitbit_kind(rel, f.read(4096))
        if kind is None:
            skipped.append(rel)
            continue
        user = derive_user_id(root, path, kind=kind)
        with open(path, encoding="utf-8", newline="") as f:
            got = list(read_fitbit(kind, f, user))
        files[rel] = [kind, len(got)]
        for position, record in got:
            assert isinstance(record, dict), (rel, position, record)
            records[(rel, position)] = record
            counts[record["metric"]] += 1
    return files, records, skipped, counts


@pytest.mark.parametrize("layout", ["old", "new"])
def test_generated_takeout_reads_back_exactly(tmp_path, layout):
    expected = make_takeout(tmp_path, layout, days=3, start=dt.date(2023, 3, 25), user="alice", seed=7)
    files, records, skipped, counts = read_tree(tmp_path)
    assert files == expected["files"]
    assert sorted(skipped) == sorted(expected["skipped"])
    assert dict(counts) == expected["counts"]
    assert set(counts) == {"heart_rate", "activity", "spo2", "hrv", "breath_rate", "active_zone_minute"}
    for spot in expected["spots"]:
        assert records[(spot["file"], spot["position"])] == spot["record"]
    assert {r["user_id"] for r in records.values()} == {"takeout-alice"}


def test_generated_api_responses_read_back_exactly(tmp_path):
    expected = make_api_responses(tmp_path, days=2, start=dt.date(2023, 3, 25), user="bob", seed=3)
    files, records, skipped, counts = read_tree(tmp_path)
    assert files == expected["files"]
    assert sorted(skipped) == sorted(expected["skipped"])
    assert dict(counts) == expected["counts"] == {
        "heart_rate": 2880, "activity": 2880, "spo2": 900, "hrv": 120, "breath_rate": 2, "active_zone_minute": 2880}
    for spot in expected["spots"]:
        assert records[(spot["file"], spot["position"])] == spot["record"]


def test_every_generated_record_passes_the_loaders_validator_and_time_conventions_hold(tmp_path):
    make_takeout(tmp_path / "t", "old", days=2, start=dt.date(2023, 3, 25), user="a", seed=1)
    make_takeout(tmp_path / "t", "new", days=2, start=dt.date(2023, 3, 25), user="b", seed=2)
    make_api_responses(tmp_path / "t", days=2, start=dt.date(2023, 3, 25), user="c", seed=3)
    _, records, _, _ = read_tree(tmp_path / "t")
    berlin = ZoneInfo("Europe/Berlin")
    gap = Counter()
    for record in records.values():
        utc_row = ingest.validate_record(record, dt.UTC)
        absolute = record["timestamp"].endswith("Z")
        try:
            local_row = ingest.validate_record(record, berlin)
        except ingest.ValidationError as exc:
            # Naive (local wall) times in the hour the clocks skip on 2023-03-26 do not exist there.
            assert not absolute and record["timestamp"].startswith("2023-03-26T02:"), record
            assert "skipped by a DST change" in str(exc)
            gap[record["metric"]] += 1
            continue
        # Z times are the same instant whatever SOURCE_TIMEZONE is; naive ones are wall time there.
        assert (utc_row.timestamp == local_row.timestamp) == absolute, record
        if not absolute:
            naive = dt.datetime.fromisoformat(record["timestamp"])
            assert local_row.timestamp == naive.replace(tzinfo=berlin).astimezone(dt.UTC)
    # local night-time SpO2/HRV run through 02:xx every night, and API data are local all day;
    # Takeout heart rate and steps (UTC) never fall in the gap.
    assert gap["spo2"] > 0 and gap["hrv"] > 0 and gap["heart_rate"] == 60 and gap["activity"] == 60


def test_cli_writes_an_export_and_prints_counts(tmp_path):
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_fitbit_export.py"), str(tmp_path / "out"), "--days", "1",
                           "--layout", "both", "--api"], capture_output=True, text=True, check=True)
    summary = json.loads(done.stdout)
    assert summary["takeout-old"]["user_id"] == "takeout-alice-old"
    assert summary["api"]["counts"]["heart_rate"] == 1440
    _, _, _, counts = read_tree(tmp_path / "out")
    total = Counter()
    for part in ("takeout-old", "takeout-new", "api"):
        total.update(summary[part]["counts"])
    assert dict(counts) == dict(total)
