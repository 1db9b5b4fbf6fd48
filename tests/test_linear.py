"""Reading costs the same per record however valid JSON is spelled.

The fast decoder reads a window of an array (up to READ_CHUNK_CHARS characters) in one call and
refuses whatever it could get wrong; the careful decoder then reads that window's items one by
one. A refused window must cost one refused attempt, never one per record: so the characters
handed to the window decoder stay within a small multiple of the file's size, and the careful
decoder is called about once per record, at N records as at 4N. These tests count that work;
they time nothing. They run at the real window size (1 M characters), where a retry per record
would cost a million characters per record.
"""
from __future__ import annotations

import io
import json
import os

import pytest

import ingest


class Work:
    """Counts the characters handed to the window decoder and the careful decodes; stops the
    test as soon as the window decoder has been handed more than ``budget`` characters."""

    def __init__(self, monkeypatch, budget: int) -> None:
        self.window_chars = self.windows = self.careful = 0
        self.budget = budget
        real_window, real_careful = ingest._decode_window, ingest._CAREFUL

        def counting_window(text, start, *args):
            self.windows += 1
            self.window_chars += len(text) - start
            if self.window_chars > self.budget:
                raise AssertionError(f"window decoder handed {self.window_chars:,} characters "
                                     f"(budget {self.budget:,}): a retry per record")
            return real_window(text, start, *args)

        class CountingCareful:
            def raw_decode(inner, text, start=0):
                self.careful += 1
                return real_careful.raw_decode(text, start)

            def decode(inner, text):
                self.careful += 1
                return real_careful.decode(text)

        monkeypatch.setattr(ingest, "_decode_window", counting_window)
        monkeypatch.setattr(ingest, "_CAREFUL", CountingCareful())


def record(i: int, spelling: str) -> str:
    ts = f"2024-01-{1 + i // 86400:02d}T{i // 3600 % 24:02d}:{i // 60 % 60:02d}:{i % 60:02d}"
    if spelling == "extra field":
        return f'{{"user_id": "u", "metric": "activity", "timestamp": "{ts}", "value": {i % 90}, "unit": "steps"}}'
    if spelling == "escaped quote":
        return f'{{"user_id": "u\\"1", "metric": "activity", "timestamp": "{ts}", "value": {i % 90}}}'
    if spelling == "value as a string":  # a reject each: every window holds some
        return f'{{"user_id": "u", "metric": "activity", "timestamp": "{ts}", "value": "{i % 90}"}}'
    if spelling == "tiny number":  # 1e-400 underflows: read carefully, a reject each
        return f'{{"user_id": "u", "metric": "activity", "timestamp": "{ts}", "value": 1e-400}}'
    raise ValueError(spelling)


def write_array(path, n: int, spelling: str, sep: str = ",\n  ") -> int:
    text = "[\n  " + sep.join(record(i, spelling) for i in range(n)) + "\n]\n"
    path.write_text(text)
    return len(text)


REFUSED_SPELLINGS = ["extra field", "escaped quote", "value as a string", "tiny number"]


@pytest.mark.parametrize("spelling", REFUSED_SPELLINGS)
def test_a_file_whose_every_window_is_refused_costs_one_attempt_per_window(tmp_path, monkeypatch, spelling):
    counted = {}
    for n in (10_000, 40_000):
        path = tmp_path / f"{n}.json"
        size = write_array(path, n, spelling)
        with monkeypatch.context() as patches:
            work = Work(patches, budget=3 * size)
            df = ingest.DataFile(path, path.name, "json")
            assert sum(1 for _ in df.records()) == n
        assert work.window_chars <= 2 * size  # each stretch of the text tried once, at most
        assert n <= work.careful <= n + work.windows + 2  # each record decoded carefully once
        counted[n] = work
    small, large = counted[10_000], counted[40_000]
    assert large.window_chars <= 5 * small.window_chars
    assert large.windows <= 5 * max(small.windows, 1)  # grows with windows, not with records


def test_a_file_the_fast_decoder_reads_is_not_read_carefully(tmp_path, monkeypatch):
    path = tmp_path / "a.json"
    records = [{"user_id": "u", "metric": "activity", "timestamp": f"2024-01-01T00:{i // 60 % 60:02d}:{i % 60:02d}",
                "value": 0.0 if i % 3 else 60.0} for i in range(3600)]
    path.write_text(json.dumps(records, indent=2))  # zeros as json.dumps writes them: 0.0
    work = Work(monkeypatch, budget=10 * path.stat().st_size)
    df = ingest.DataFile(path, path.name, "json")
    assert sum(1 for _ in df.records()) == 3600
    assert work.careful <= 2  # the last record, which no "}," follows, and nothing else


def test_a_whole_pipeline_over_refused_windows_stays_linear(tmp_path, monkeypatch):
    """Through _FileRows, as the loader and its read-ahead helper run it: rows and rejects
    come out right, and the work is one pass."""
    path = tmp_path / "a.json"
    lines = [record(i, "extra field" if i % 1000 else "value as a string") for i in range(20_000)]
    path.write_text("[" + ",".join(lines) + "]")
    work = Work(monkeypatch, budget=3 * path.stat().st_size)
    rejects = ingest._Rejects(None, None)
    rows = ingest._FileRows(ingest.DataFile(path, path.name, "json"), ingest._LineMaker(ingest.UTC), rejects, 86400)
    sent = [line for line in rows.part()]
    assert len(sent) == 20_000 - 20 and rows.counts.records_rejected == 20
    assert work.careful <= 20_000 + 20 + work.windows + 2  # (a reject's reason reads its text once more)


def test_takeout_arrays_stay_linear_when_every_window_is_refused(monkeypatch):
    """The Fitbit readers walk arrays with the same window loop: a decoder that refuses every
    window costs one attempt per window there too."""
    items = [{"dateTime": f"01/01/24 00:{i // 60 % 60:02d}:{i % 60:02d}", "value": {"bpm": 60, "confidence": 2}}
             for i in range(30_000)]
    text = json.dumps(items, indent=1)
    work = Work(monkeypatch, budget=3 * len(text))

    def refuses(window: str) -> list:
        raise ValueError("refused")

    got = [item for batch in ingest._fb_ArrayStream(io.StringIO(text)).batches(refuses) for item in batch]
    assert got == items
    assert work.window_chars <= 2 * len(text)
    assert work.careful <= len(items) + work.windows + 2


def test_the_far_half_helper_stops_at_the_first_window_it_cannot_settle(tmp_path, monkeypatch):
    """The far half's helper never retries: the first window it cannot settle ends its work."""
    path = tmp_path / "a.json"
    size = write_array(path, 40_000, "extra field")
    work = Work(monkeypatch, budget=3 * size)
    fd = os.open(path, os.O_RDONLY)
    try:
        end, count, conflicting = ingest._settle_far_half(fd, 2, size, lambda records: 0)
    finally:
        os.close(fd)
    assert (end, count, conflicting) == (2, 0, 0)
    assert work.windows == 1


def test_json_lines_decode_each_line_at_most_twice(tmp_path, monkeypatch):
    path = tmp_path / "a.jsonl"
    path.write_text("\n".join(record(i, "extra field") for i in range(20_000)) + "\n")
    work = Work(monkeypatch, budget=0)
    df = ingest.DataFile(path, path.name, "jsonl")
    assert sum(1 for _ in df.records()) == 20_000
    assert work.careful == 20_000 and work.windows == 0
