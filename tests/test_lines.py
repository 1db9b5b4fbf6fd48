"""One source of validation truth, without a database.

The hot path turns a decoded record into its COPY line through ``_LineMaker``, a cache in front of
``validate_record``, and decodes JSON with a fast decoder that falls back to a careful one. These
properties say that neither shortcut can change an outcome: for any sequence of records (so that
the caches are warm with look-alikes), the line, or the reason for a reject, is exactly what
``validate_record`` alone gives; and any JSON text decodes to a record that validates the same
way on the fast and the careful path.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import ingest

EXAMPLES = int(os.environ.get("HYPOTHESIS_EXAMPLES", "200"))

users = st.one_of(st.sampled_from(["u1", "u2", 'q\t"\\N', "", " ", "x" * 256, "a\x00b", "\ud800"]),
                  st.text(max_size=8))
metrics = st.one_of(st.sampled_from(sorted(ingest.METRICS)), st.sampled_from(["Heart_Rate", "steps", ""]))
stamps = st.one_of(
    st.sampled_from(["2024-01-01T00:00:00", "2024-01-01T00:00:00Z", "2024-01-01T00:00:00+00:00",
                     "2024-01-01T01:00:00+01:00", "2024-01-01 00:00:00.5Z", "2024-03-31T02:30:00",
                     "2024-10-27T02:30:00", "2024-02-30T00:00:00Z", "2024-01-01T00:00:00+99:00", "2024-01-01"]),
    st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)).map(
        lambda d: d.isoformat(timespec="seconds")),
    st.datetimes(timezones=st.sampled_from([dt.UTC, dt.timezone(dt.timedelta(hours=-5, minutes=-30))]),
                 min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)).map(dt.datetime.isoformat),
)
numbers = st.one_of(st.sampled_from([0, 0.0, -0.0, 1, 1.0, -1, 60, 60.0, 300, 300.00000000001, 20, 19.999, 1e-320,
                                     True, False, None, "60", [60]]),
                    st.integers(min_value=-10, max_value=200_000), st.floats(allow_nan=True),
                    st.fractions().map(float))
records = st.one_of(
    st.fixed_dictionaries({"user_id": users, "metric": metrics, "timestamp": stamps, "value": numbers},
                          optional={"extra": st.integers()}),
    st.dictionaries(st.sampled_from(ingest.REQUIRED_KEYS), st.none() | st.integers() | st.text(max_size=3)),
    st.none() | st.integers() | st.lists(st.integers(), max_size=2),
)


def truth(obj, tz) -> tuple:
    """What validate_record alone says: the COPY line and epoch, or the reason."""
    try:
        row = ingest.validate_record(obj, tz)
    except ingest.ValidationError as exc:
        return ("reject", str(exc))
    return ("line", ingest._copy_line(row), int(row.timestamp.timestamp()))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(records, min_size=1, max_size=30), st.sampled_from([dt.UTC, ZoneInfo("Europe/Berlin")]))
def test_the_line_cache_gives_exactly_what_validate_record_gives(sequence, tz):
    make_line = ingest._LineMaker(tz)
    for obj in sequence + sequence:  # the second pass meets every record with warm caches
        try:
            key, tail, epoch = make_line(obj)
            got = ("line", ingest._line(key, tail), epoch)
        except ingest.ValidationError as exc:
            got = ("reject", str(exc))
        assert got == truth(obj, tz)


@pytest.mark.parametrize("first, second", [(0, -0.0), (-0.0, 0), (0.0, -0.0), (1, True), (60, 60.0)])
def test_look_alike_values_keep_their_own_line(first, second):
    """0 == -0.0 == False as dict keys: the cache must not hand one the other's line."""
    make_line = ingest._LineMaker(dt.UTC)
    for value in (first, second):
        obj = {"user_id": "u1", "metric": "hrv", "timestamp": "2024-01-01T00:00:00Z", "value": value}
        try:
            key, tail, _ = make_line(obj)
            assert ("line", ingest._line(key, tail)) == truth(obj, dt.UTC)[:2]
        except ingest.ValidationError as exc:
            assert truth(obj, dt.UTC) == ("reject", str(exc))


json_values = st.one_of(
    st.sampled_from(["60", "60.0", "-0.0", "0", "0.0", "1e-400", "2.5e-324", "5e-324", "1e309", "9" * 5000,
                     "18446744073709551616", "300.00000000001", "1E2", "true", "null", '"60"', "[60]",
                     '{"a": 1}', "0.0000000000000001", "NaN", "Infinity", "01", "1."]),
    st.floats(allow_nan=False, allow_infinity=False).map(repr), st.integers().map(str),
    st.from_regex(r"-?(0|[1-9][0-9]{0,30})(\.[0-9]{1,30})?([eE][+-]?[0-9]{1,3})?", fullmatch=True))
json_strings = st.one_of(  # user_id as written: plain, escaped, a quote inside, a lone surrogate
    st.sampled_from(['"u1"', '"u\\u0031"', '"q\\"uote"', '"a\\ud800"', '"\\u00fc"', '"tab\\t"', '""', "1"]),
    st.text(max_size=6).map(json.dumps))
json_extras = st.sampled_from(["", ', "value": 61', ', "value": "x"', ', "user_id": "u2"', ', "user\\u005fid": "u2"',
                               ', "metric": "hrv"', ', "timestamp": "2024-01-02T00:00:00Z"', ', "extra": 1',
                               ', "extra": "say \\"hi\\""'])


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(json_values, json_strings, json_extras, st.sampled_from(["heart_rate", "hrv", "activity"])),
                min_size=1, max_size=40))
def test_fast_and_careful_decoding_validate_alike(items):
    """Whatever the typed fast decoder accepts, in a batch or alone, ends exactly as the careful
    decoder's reading of the same text: the same line, or a reject for the same reason. Repeated
    keys (in any spelling), quotes inside strings, zeros, huge and tiny numbers are all tried."""
    texts = []
    for i, (value, user, extra, metric) in enumerate(items):
        texts.append(f'{{"user_id": {user}, "metric": "{metric}", "timestamp": "2024-01-01T00:00:{i % 60:02d}Z", '
                     f'"value": {value}{extra}}}')
    batch = ",\n".join(texts)
    try:
        fast = ingest._typed().decode_list(f"[{batch}]")
    except ingest._typed().errors:
        fast = None
    if fast is not None and ingest._fast_is_exact(batch, fast):
        for obj, text in zip(fast, texts, strict=True):
            assert as_reported(obj, text) == as_reported(careful(text), text)
    for text in texts:  # JSON Lines: one line at a time, through the same choice
        assert as_reported(ingest._decode_line(text), text) == as_reported(careful(text), text)


def test_the_fast_decoder_reads_the_common_record_and_leaves_the_doubtful_to_the_careful_one():
    """The fast path is taken where it is safe (so the property above tests something) and
    refused for each thing it could get wrong."""
    def fast(text: str) -> bool:
        return type(ingest._decode_line(text)) is ingest._typed().Record

    record = '{{"user_id": {u}, "metric": "hrv", "timestamp": "2024-01-01T00:00:00Z", "value": {v}{x}}}'
    assert fast(record.format(u='"u1"', v="42.5", x=""))
    assert fast(record.format(u='"u1"', v="-3", x=""))
    for zero in ("0.0", "-0.0", "0", "0e5", "0.000"):  # a zero as written by json.dumps, pandas and others
        assert fast(record.format(u='"u1"', v=zero, x="")), zero
    for u, v, x in [('"u1"', "42", ', "value": 43'), ('"u1"', "42", ', "user\\u005fid": "u2"'),
                    ('"q\\"u"', "42", ""), ('"u1"', "1e-400", ""), ('"u1"', "1e16", ""), ('"u1"', "0." + "0" * 330 + "1", ""),
                    ('"u1"', "1E-400", ""), ('"u1"', "0.1e-999", ""),
                    ('"u1"', "42", ', "extra": 1'), ('"a\\ud800"', "42", ""), ('"u1"', "true", "")]:
        assert not fast(record.format(u=u, v=v, x=x)), (u, v, x)


def careful(text: str) -> object:
    try:
        return ingest._CAREFUL.decode(text)
    except json.JSONDecodeError:
        return ingest.Unparsable("invalid JSON", text)


def as_reported(obj, text: str) -> tuple:
    """What the pipeline reports for a record: its line through the _LineMaker, or the reject's
    reason as the loader writes it (from the record's text)."""
    if type(obj) is ingest.Unparsable:
        return ("unparsable",)
    try:
        key, tail, epoch = ingest._LineMaker(dt.UTC)(obj)
    except ingest.ValidationError as exc:
        return ("reject", ingest._reason_as_written(text, exc, dt.UTC))
    return ("line", ingest._line(key, tail), epoch)


def test_batch_decoding_runs_across_read_chunk_boundaries(tmp_path, monkeypatch):
    """Windows of a few KB: many batches, each cut between records, some records split by a read."""
    monkeypatch.setattr(ingest, "READ_CHUNK_CHARS", 8192)
    records = [{"user_id": f"u{i % 7}", "metric": "heart_rate", "timestamp": f"2024-01-01T{i // 3600:02d}:"
                f"{i // 60 % 60:02d}:{i % 60:02d}Z", "value": 60 + i % 50} for i in range(5000)]
    path = tmp_path / "a.json"
    path.write_text(json.dumps(records, indent=2))
    batches = []
    real = ingest._Buffer.decode_batch

    def counting(self, *args):
        got = real(self, *args)
        batches.append(got is not None)
        return got

    monkeypatch.setattr(ingest._Buffer, "decode_batch", counting)
    df = ingest.DataFile(path, "a.json", "json")
    assert [ingest._plain(obj) for _, obj in df.records()] == records
    assert sum(batches) > 20  # the batch decoder did the work, window after window


# --- windows settled in bulk: the same outcome as one record at a time ------------------------
BULK_PATHS = ("_repeats_of_sent", "_new_keys")  # windows of repeats, windows of new keys


def bulk_paths(monkeypatch, bulk: bool) -> dict:
    """Count the windows each bulk path settles; with ``bulk`` False, let none settle any."""
    settled = dict.fromkeys(BULK_PATHS, 0)
    for name in BULK_PATHS:
        real = getattr(ingest._FileRows, name)

        def spy(self, records, *args, real=real, name=name):
            got = real(self, records, *args) if bulk else None
            settled[name] += got is not None
            return got

        monkeypatch.setattr(ingest._FileRows, name, spy)
    return settled


def file_outcome(path, tz=dt.UTC, part_chunks=None, resume_after=0, bulk=True, monkeypatch=None) -> dict:
    """Everything _FileRows reports for a file: lines per part, counts, conflicts, rejects."""
    if part_chunks is not None:
        monkeypatch.setattr(ingest, "PART_CHUNKS", part_chunks)
    settled = bulk_paths(monkeypatch, bulk)
    spool = path.parent / f"rejects-{bulk}.jsonl"
    spool.unlink(missing_ok=True)
    rejects = ingest._Rejects(spool, None)
    rows = ingest._FileRows(ingest.DataFile(path, path.name, "json"), ingest._LineMaker(tz), rejects, 3600,
                            resume_after)
    parts = []
    while not rows.finished:
        parts.append(list(rows.part()))
    rejects.publish()
    rows.close()
    rejects.close()
    return {"parts": parts, "counts": rows.take_counts(), "conflicting": rows.conflicting,
            "example": rows.conflict_example, "done": rows.done, "rejects": spool.read_text(),
            "settled in bulk": settled}


def task0_like(rng, copies: int, seconds: int, odd: float) -> list:
    """Task-0's shape: the same keys again and again with other values, some records odd."""
    out = []
    for copy in range(copies):
        for i in range(seconds):
            record = {"user_id": "user_1", "metric": "heart_rate",
                      "timestamp": f"2024-01-01T{i // 3600:02d}:{i // 60 % 60:02d}:{i % 60:02d}", "value": 60 + copy % 3}
            if rng.random() < odd:
                record.update(rng.choice([{"value": 0}, {"value": 999}, {"value": 61.5}, {"metric": "hrv"},
                                          {"user_id": "user_2"}, {"timestamp": "2024-02-30T00:00:00"},
                                          {"timestamp": f"2024-01-01T00:00:{i % 60:02d}Z"}, {"value": "60"}]))
            out.append(record)
    return out


@pytest.mark.parametrize("odd", [0.0, 0.001, 0.05])
@pytest.mark.parametrize("part_chunks, resume_after", [(None, 0), (2, 0), (None, 700)])
def test_windows_settled_in_bulk_end_exactly_as_one_record_at_a_time(tmp_path, monkeypatch, odd, part_chunks,
                                                                    resume_after):
    """Repeats of keys already sent are counted in bulk, window by window; with odd records among
    them (a zero, out of range, another metric or user, an invalid or differently written
    timestamp, a string value), in parts, and resuming: the lines, counts, conflicts and rejects
    are those of the record-by-record path."""
    import random

    monkeypatch.setattr(ingest, "READ_CHUNK_CHARS", 16384)
    path = tmp_path / "task0.json"
    path.write_text(json.dumps(task0_like(random.Random(odd), copies=8, seconds=2000, odd=odd), indent=2))
    bulk = file_outcome(path, part_chunks=part_chunks, resume_after=resume_after, monkeypatch=monkeypatch)
    one_by_one = file_outcome(path, part_chunks=part_chunks, resume_after=resume_after, bulk=False,
                              monkeypatch=monkeypatch)
    assert sum(one_by_one.pop("settled in bulk").values()) == 0
    settled = bulk.pop("settled in bulk")
    if odd < 0.01:  # with one record in 20 odd, hardly a window of ~130 is free of them
        assert settled["_repeats_of_sent"] > 0 and settled["_new_keys"] > 0
    assert bulk == one_by_one


def unique_keys(rng, users: int, seconds: int, odd: float, step: int = 1) -> list:
    """Unique keys, one user after another (b's and d's shape), some records odd, a few repeated."""
    out = []
    for user in range(users):
        for i in range(0, seconds, step):
            record = {"user_id": f"u{user}", "metric": "heart_rate", "value": 60 + i % 90,
                      "timestamp": (dt.datetime(2024, 1, 1) + dt.timedelta(seconds=i)).isoformat()}
            if rng.random() < odd:
                record.update(rng.choice([{"value": 0}, {"value": 999}, {"value": 61.25}, {"metric": "hrv"},
                                          {"user_id": "u_other"}, {"timestamp": "2024-02-30T00:00:00"},
                                          {"timestamp": record["timestamp"] + "Z"}, {"value": "60"},
                                          {"timestamp": "2024-01-01T00:00:00"}]))
            out.append(record)
    return out


@pytest.mark.parametrize("tz", [dt.UTC, ZoneInfo("Europe/Berlin")], ids=["UTC", "Berlin"])
@pytest.mark.parametrize("odd", [0.0, 0.001, 0.05])
@pytest.mark.parametrize("part_chunks, resume_after, max_keys", [(None, 0, None), (2, 0, None), (None, 700, None),
                                                                 (None, 0, 5000)])
def test_windows_of_new_keys_settled_in_bulk_end_exactly_as_one_record_at_a_time(
        tmp_path, monkeypatch, odd, part_chunks, resume_after, max_keys, tz):
    """Unique keys over several days (so parts end inside windows), with odd records among them
    (invalid values, dates and types, another metric or user, a key written again, or the same
    instant written with a "Z"), resuming, with the memory of keys filling up, in UTC and in a zone
    with DST: the lines, counts, conflicts and rejects are those of the record-by-record path."""
    import random

    monkeypatch.setattr(ingest, "READ_CHUNK_CHARS", 16384)
    if max_keys:
        monkeypatch.setattr(ingest, "DEDUPE_MAX_KEYS", max_keys)
    records = unique_keys(random.Random(odd), users=3, seconds=4 * 86400, odd=odd, step=37)
    records += records[-1000:]  # repeats of keys first met late (past the memory of keys, when it is small)
    path = tmp_path / "unique.json"
    path.write_text(json.dumps(records, indent=2))
    bulk = file_outcome(path, tz, part_chunks, resume_after, monkeypatch=monkeypatch)
    one_by_one = file_outcome(path, tz, part_chunks, resume_after, bulk=False, monkeypatch=monkeypatch)
    assert sum(one_by_one.pop("settled in bulk").values()) == 0
    settled = bulk.pop("settled in bulk")
    if odd < 0.01:
        assert settled["_new_keys"] > 10
    assert bulk == one_by_one
    assert len(bulk["parts"]) > 1 or part_chunks is None


bulk_users = st.sampled_from(["u1", "u2", 'q\t"\\N'])
bulk_metrics = st.sampled_from(["heart_rate", "hrv", "spo2", "Heart_Rate"])
bulk_stamps = st.sampled_from(["2024-01-01T00:00:00", "2024-01-01T00:00:00Z", "2024-01-01T00:00:01+00:00",
                               "2024-01-01T01:00:00+01:00", "2024-03-31T02:30:00", "2024-02-30T00:00:00"])
bulk_values = st.sampled_from([0, 0.0, -0.0, 1, 20, 60, 60.0, 61.5, 100, 100.5, 300, 300.5, 499.9, 1e-300])
bulk_record = st.tuples(bulk_users, bulk_metrics, bulk_stamps, bulk_values)
valid_record = st.tuples(bulk_users, st.sampled_from(["heart_rate", "hrv"]), st.sampled_from(
    ["2024-01-01T00:00:00", "2024-01-01T00:00:00Z", "2024-01-01T00:00:01+00:00", "2024-01-01T00:00:02"]),
    st.sampled_from([20, 60, 60.0, 61.5, 100, 300]))
# Windows of look-alikes, most of them valid (or no window would ever be settled in bulk), some not.
bulk_windows = st.lists(st.lists(valid_record, min_size=1, max_size=12) |
                        st.lists(valid_record | bulk_record, min_size=1, max_size=12), min_size=1, max_size=12)


def windows_outcome(windows: list, tz, bulk: bool, tmp_path, monkeypatch) -> dict:
    """What _FileRows reports for these decoded windows of Records (as the batch decoder yields
    them), with windows of repeats settled in bulk or not at all."""
    settled = bulk_paths(monkeypatch, bulk)
    Record = ingest._typed().Record
    batches, position = [], 1
    for window in windows:
        batches.append((position, [Record(*fields) for fields in window]))
        position += len(window)
    spool = tmp_path / f"rejects-{bulk}.jsonl"
    spool.unlink(missing_ok=True)
    rejects = ingest._Rejects(spool, None)
    rows = ingest._FileRows(ingest.DataFile(tmp_path / "w.json", "w.json", "json"), ingest._LineMaker(tz),
                            rejects, 3600)
    every = [record for _, window in batches for record in window]
    rows.batches = iter(batches)
    rows.stream.raw = lambda position: json.dumps(ingest._plain(every[position - 1]))
    lines = list(rows.part())
    rejects.publish()
    rejects.close()
    return {"lines": lines, "counts": rows.take_counts(), "conflicting": rows.conflicting,
            "example": rows.conflict_example, "done": rows.done, "rejects": spool.read_text(),
            "settled in bulk": sum(settled.values())}


@settings(max_examples=EXAMPLES, deadline=None)
@given(bulk_windows, st.sampled_from([dt.UTC, ZoneInfo("Europe/Berlin")]))
def test_any_windows_end_exactly_as_one_record_at_a_time(tmp_path_factory, windows, tz):
    """Windows of look-alike records (users and metrics mixed or not, timestamps written in several
    ways for one instant, zeros, out-of-range numbers, a number valid for one metric only, an
    invalid date), each window repeated so that some are settled in bulk: the lines, counts,
    conflicts and rejects are those of the record-by-record path."""
    tmp_path = tmp_path_factory.mktemp("w")
    windows = windows + windows + [list(reversed(w)) for w in windows] + windows
    with pytest.MonkeyPatch.context() as monkeypatch:
        bulk = windows_outcome(windows, tz, True, tmp_path, monkeypatch)
        one_by_one = windows_outcome(windows, tz, False, tmp_path, monkeypatch)
    assert one_by_one["settled in bulk"] == 0
    assert {k: v for k, v in bulk.items() if k != "settled in bulk"} == \
           {k: v for k, v in one_by_one.items() if k != "settled in bulk"}


def test_repeated_windows_of_one_user_are_settled_in_bulk(tmp_path, monkeypatch):
    """The generated windows above would prove nothing if none were ever settled in bulk."""
    window = [("u1", "heart_rate", f"2024-01-01T00:00:{s:02d}", 60 + s) for s in range(10)]
    mixed = [("u1" if s % 2 else "u2", "heart_rate", f"2024-01-01T00:00:{s:02d}", 60 + s) for s in range(10)]
    changed = [(u, m, t, v + 1) for u, m, t, v in window]
    got = windows_outcome([window, window, window, mixed, mixed, mixed, changed], dt.UTC, True, tmp_path,
                          monkeypatch)
    assert got["settled in bulk"] == 6  # all but the first mixed one (a new user among repeats)
    assert got["counts"].rows_duplicate == 10 + 10 + 5 + 10 + 10 + 10 and got["conflicting"] == 10
    assert got["example"] == "u1 heart_rate 2024-01-01T00:00:00+00:00: 60.0 then 61.0"


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.tuples(bulk_metrics, bulk_values), max_size=20), bulk_metrics,
       st.lists(bulk_values, min_size=1, max_size=12))
def test_bulk_value_parts_are_those_of_each_record(earlier, metric, values):
    """Whenever _LineMaker.tails gives the value parts of a window, each is the one the record
    alone gets, with the cache warmed by numbers of any metric (a number accepted for hrv is not
    thereby within heart_rate's bounds)."""
    make_line = ingest._LineMaker(dt.UTC)
    for other, value in earlier + [(metric, value) for value in values]:
        with contextlib.suppress(ingest.ValidationError):
            make_line(ingest._typed().Record("u1", other, "2024-01-01T00:00:00", value))
    tails = make_line.tails(metric, values)
    if tails is not None:
        assert tails == [make_line(ingest._typed().Record("u1", metric, "2024-01-01T00:00:00", v))[1]
                         for v in values]


canonical = st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)).map(
    lambda d: d.isoformat(timespec="seconds"))


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.lists(st.one_of(canonical, stamps), min_size=1, max_size=12) | st.lists(canonical, min_size=1, max_size=12)
       | st.lists(canonical.map("{}Z".format), min_size=1, max_size=12)
       | st.lists(st.one_of(canonical.map("{}Z".format), stamps.map("{}Z".format)), min_size=1, max_size=12),
       st.sampled_from([dt.UTC, ZoneInfo("Europe/Berlin")]), st.booleans())
def test_bulk_timestamps_are_those_of_each_record(texts, tz, warm):
    """Whenever _LineMaker.stamps_of gives the UTC texts and epochs of a window's timestamps (the
    cache cold, or warm with some of them), each is what validate_record gives the record alone;
    when it gives none, one of them is a reject."""
    make_line = ingest._LineMaker(tz)
    if warm:
        make_line.stamps_of(texts[::2])
    got = make_line.stamps_of(texts)
    truths = [truth({"user_id": "u1", "metric": "heart_rate", "timestamp": text, "value": 60}, tz) for text in texts]
    if got is None:
        assert any(t[0] == "reject" for t in truths)
    else:
        assert [("line", f"u1\theart_rate\t{utc}\t60.0\n", epoch) for utc, epoch in got] == truths


def test_a_number_accepted_for_one_metric_is_checked_against_another_metrics_bounds():
    make_line = ingest._LineMaker(dt.UTC)
    make_line(ingest._typed().Record("u1", "hrv", "2024-01-01T00:00:00", 499.9))  # cached for hrv
    make_line(ingest._typed().Record("u1", "heart_rate", "2024-01-01T00:00:00", 60))
    assert make_line.tails("heart_rate", [60, 499.9]) is None
    assert make_line.tails("heart_rate", [60, 60]) is not None
