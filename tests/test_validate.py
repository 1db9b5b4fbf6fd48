"""validate_record: pure, strict, with a reason a person understands."""
from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from ingest import Row, ValidationError, validate_record
from tests.conftest import rec

UTC = dt.UTC


def test_valid_record_becomes_a_row():
    row = validate_record(rec(user="user_1", metric="spo2", ts="2024-03-01T12:30:45Z", value=97.5))
    assert row == Row("user_1", "spo2", dt.datetime(2024, 3, 1, 12, 30, 45, tzinfo=UTC), 97.5)
    assert type(row.value) is float


@pytest.mark.parametrize("metric", ["heart_rate", "spo2", "hrv", "breath_rate", "activity", "active_zone_minute"])
def test_every_metric_is_accepted(metric):
    assert validate_record(rec(metric=metric)).metric == metric


@pytest.mark.parametrize("text, expected", [
    ("2024-01-01T00:00:00", dt.datetime(2024, 1, 1, tzinfo=UTC)),  # naive: SOURCE_TIMEZONE (UTC)
    ("2024-01-01 00:00:00", dt.datetime(2024, 1, 1, tzinfo=UTC)),
    ("2024-01-01T00:00", dt.datetime(2024, 1, 1, tzinfo=UTC)),
    ("2024-01-01T00:00:00Z", dt.datetime(2024, 1, 1, tzinfo=UTC)),
    ("2024-01-01T01:30:00+01:30", dt.datetime(2024, 1, 1, tzinfo=UTC)),
    ("2023-12-31T19:00:00-0500", dt.datetime(2024, 1, 1, tzinfo=UTC)),
    ("2024-01-01T00:00:00.5", dt.datetime(2024, 1, 1, 0, 0, 0, 500000, tzinfo=UTC)),
    ("2024-01-01T00:00:00.123456Z", dt.datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)),
    ("2024-01-01T00:00:00.123456789+00:00", dt.datetime(2024, 1, 1, 0, 0, 0, 123456, tzinfo=UTC)),
])
def test_timestamps_with_and_without_offset_and_fraction(text, expected):
    got = validate_record(rec(ts=text)).timestamp
    assert got == expected and got.utcoffset() == dt.timedelta(0)


def test_naive_timestamp_uses_the_source_timezone():
    berlin = ZoneInfo("Europe/Berlin")
    assert validate_record(rec(ts="2024-07-01T12:00:00"), berlin).timestamp == \
        dt.datetime(2024, 7, 1, 10, 0, tzinfo=UTC)
    # an explicit offset wins over SOURCE_TIMEZONE
    assert validate_record(rec(ts="2024-07-01T12:00:00Z"), berlin).timestamp == \
        dt.datetime(2024, 7, 1, 12, 0, tzinfo=UTC)


@pytest.mark.parametrize("text, reason", [
    ("2024-03-31T02:30:00", "does not exist in Europe/Berlin"),
    ("2024-10-27T02:30:00", "ambiguous in Europe/Berlin"),
])
def test_dst_gaps_and_repeats_are_rejected(text, reason):
    with pytest.raises(ValidationError, match=reason):
        validate_record(rec(ts=text), ZoneInfo("Europe/Berlin"))


def test_extra_keys_are_ignored():
    row = validate_record(rec(unit="bpm", device={"id": 1}))
    assert row.user_id == "u1" and row.value == 60.0


@pytest.mark.parametrize("obj, reason", [
    ([1, 2], "record must be a JSON object, got array"),
    ("x", "record must be a JSON object, got string"),
    (None, "record must be a JSON object, got null"),
    ({}, "missing keys: user_id, metric, timestamp, value"),
    ({"user_id": "u", "metric": "spo2", "timestamp": "2024-01-01T00:00:00"}, "missing key: value"),
    (rec(user=""), "user_id is empty or blank"),
    (rec(user="   "), "user_id is empty or blank"),
    (rec(user=17), "user_id must be a string, got number"),
    (rec(user=None), "user_id must be a string, got null"),
    (rec(user="a" * 256), "user_id is 256 characters long"),
    (rec(user="a\x00b"), "NUL character"),
    (rec(user="a\ud800b"), "unpaired surrogate"),
    (rec(metric="steps"), 'unknown metric "steps"'),
    (rec(metric="Heart_Rate"), "did you mean 'heart_rate'"),
    (rec(metric=" spo2 "), "did you mean 'spo2'"),
    (rec(metric=None), "metric must be a string, got null"),
    (rec(ts=None), "timestamp must be an ISO 8601 string, got null"),
    (rec(ts=1704067200), "timestamp must be an ISO 8601 string, got number"),
    (rec(ts="2024-01-01"), "date without a time of day"),
    (rec(ts="yesterday"), "is not ISO 8601"),
    (rec(ts="2024-02-30T00:00:00"), "is not a real date and time (day is out of range"),
    (rec(ts="2024-01-01T24:00:00"), "is not a real date and time (hour must be in 0..23"),
    (rec(ts="2024-01-01T23:59:60"), "is not a real date and time (second must be in 0..59"),
    (rec(ts="0000-01-01T00:00:00"), "is not a real date and time (year 0 is out of range"),
    (rec(ts="0001-01-01T00:00:00+05:00"), "outside years 1..9999"),
    (rec(ts="20240101T000000"), "is not ISO 8601"),
    (rec(value=None), "value must be a number, got null"),
    (rec(value="72"), "value must be a number, got string"),
    (rec(value=True), "value must be a number, got boolean"),
    (rec(value=[72]), "value must be a number, got array"),
    (rec(value=float("nan")), "value NaN is not a finite number"),
    (rec(value=float("inf")), "value Infinity is not a finite number"),
    (rec(value=float("-inf")), "value -Infinity is not a finite number"),
    (rec(value=10**400), "too large for a double"),
])
def test_invalid_records_are_rejected_with_a_reason(obj, reason):
    with pytest.raises(ValidationError) as info:
        validate_record(obj)
    assert reason in str(info.value)


def test_validate_record_is_pure(monkeypatch):
    """No file, network or logging: it works with open() and sockets made unusable."""
    import builtins
    import logging
    import socket

    def boom(*a, **k):
        raise AssertionError("I/O in validate_record")

    monkeypatch.setattr(builtins, "open", boom)
    monkeypatch.setattr(socket, "socket", boom)
    monkeypatch.setattr(logging.Logger, "_log", boom)
    validate_record(rec())
    with pytest.raises(ValidationError):
        validate_record(rec(value="x"))
