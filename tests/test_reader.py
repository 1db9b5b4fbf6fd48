"""load_files and the streaming reader: order, formats, memory, file-level errors (no database)."""
from __future__ import annotations

import gzip
import json
import os
import tracemalloc
from pathlib import Path

import pytest

import ingest
from ingest import FileFormatError, Unparsable, load_files
from tests.conftest import rec


def write(root: Path, rel: str, data) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(data, bytes):
        path.write_bytes(data)
    else:
        path.write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return path


def records(root: Path, rel: str) -> list:
    """(position, record) pairs, a record the fast decoder read shown as the dict it stands for."""
    (df,) = [f for f in load_files(root) if f.rel == rel]
    return [(p, ingest._plain(r)) for p, r in df.records()]


def test_files_are_found_recursively_in_sorted_relative_path_order(tmp_path):
    for rel in ["b/z.json", "a.json", "b/a.jsonl", "a/b.ndjson.gz", "c.JSON", "b.json.gz"]:
        write(tmp_path, rel, b"[]" if not rel.endswith(".gz") else gzip.compress(b"[]"))
    write(tmp_path, "readme.txt", "x")
    write(tmp_path, "data.csv", "x")
    write(tmp_path, "x.gz", gzip.compress(b"x"))
    got = [(f.rel, f.kind, f.gzipped) for f in load_files(tmp_path)]
    assert got == [("a.json", "json", False), ("a/b.ndjson.gz", "jsonl", True), ("b.json.gz", "json", True),
                   ("b/a.jsonl", "jsonl", False), ("b/z.json", "json", False), ("c.JSON", "json", False)]


def test_other_files_are_skipped_with_a_debug_log(tmp_path, caplog):
    write(tmp_path, "notes.txt", "x")
    with caplog.at_level("DEBUG", logger="ingest"):
        assert list(load_files(tmp_path)) == []
    assert "skipping notes.txt" in caplog.text


def test_array_single_object_and_concatenated_objects(tmp_path):
    write(tmp_path, "a.json", json.dumps([rec(value=1), rec(value=2)], indent=2))
    write(tmp_path, "b.json", json.dumps(rec(value=3)))
    write(tmp_path, "c.json", json.dumps(rec(value=4)) + "\n" + json.dumps(rec(value=5)))
    assert [(p, r["value"]) for p, r in records(tmp_path, "a.json")] == [(1, 1), (2, 2)]
    assert [(p, r["value"]) for p, r in records(tmp_path, "b.json")] == [(1, 3)]
    assert [(p, r["value"]) for p, r in records(tmp_path, "c.json")] == [(1, 4), (2, 5)]


def test_values_split_across_read_chunks_decode_exactly(tmp_path, monkeypatch):
    """Numbers, strings and objects cut at every possible chunk boundary come out whole."""
    monkeypatch.setattr(ingest, "READ_CHUNK_CHARS", 7)
    data = [rec(user="ü" * 9, value=123456.789), rec(value=-0.0), rec(user='q"\\uote', value=1e-7), [1, [2]]]
    write(tmp_path, "a.json", json.dumps(data))
    assert [r for _, r in records(tmp_path, "a.json")] == data


def test_jsonl_positions_are_line_numbers_and_bad_lines_are_unparsable(tmp_path):
    write(tmp_path, "a.jsonl", json.dumps(rec(value=1)) + "\n\n{bad\n" + json.dumps(rec(value=2)) + "\n")
    got = records(tmp_path, "a.jsonl")
    assert [p for p, _ in got] == [1, 3, 4]
    assert isinstance(got[1][1], Unparsable) and "invalid JSON on this line" in got[1][1].reason


@pytest.mark.parametrize("content, message", [
    ("", "file is empty"),
    ("   \n", "file is empty"),
    ('"text"', "top-level JSON is a string"),
    ("42", "top-level JSON is a number"),
    ("null", "top-level JSON is a null"),
    ('[{"a": 1}', "file ends inside the JSON array"),
    ('[{"a": 1', "file ends inside a record"),
    ('[{"a": 1}] trailing', "unexpected data after the JSON array"),
    ('[{"a": 1},]', "invalid JSON"),
    ('[{"a": 1} {"b": 2}]', "expected ',' or ']'"),
])
def test_file_level_errors(tmp_path, content, message):
    write(tmp_path, "a.json", content)
    with pytest.raises(FileFormatError, match=message):
        records(tmp_path, "a.json")


def test_gzip_file_that_is_not_gzip(tmp_path):
    write(tmp_path, "a.json.gz", b"plain text, not gzip")
    with pytest.raises(FileFormatError, match="not a valid gzip file"):
        records(tmp_path, "a.json.gz")


def _peak_while_reading(root: Path, count: int) -> int:
    root.mkdir()
    one = json.dumps(rec(), indent=2)
    with open(root / "big.json", "w") as out:
        out.write("[\n" + ",\n".join([one] * count) + "\n]")
    (df,) = load_files(root)
    tracemalloc.start()
    assert sum(1 for _ in df.records()) == count
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return peak


def test_reading_is_streamed_memory_does_not_grow_with_file_size(tmp_path):
    """A 4x larger pretty-printed array (10 MB vs 40 MB) is read with the same bounded peak."""
    small = _peak_while_reading(tmp_path / "small", 100_000)
    large = _peak_while_reading(tmp_path / "large", 400_000)
    assert (tmp_path / "large" / "big.json").stat().st_size > 40_000_000
    assert large < 32 * 1024 * 1024, f"peak {large} bytes"
    assert large < small * 1.5, f"peak grew with the file: {small} -> {large} bytes"


def test_a_directory_named_like_a_json_file_is_not_a_file(tmp_path):
    (tmp_path / "x.json").mkdir()
    write(tmp_path, "x.json/inner.json", "[]")
    assert [f.rel for f in load_files(tmp_path)] == ["x.json/inner.json"]


def test_fifo_is_skipped_and_never_opened(tmp_path, caplog):
    os.mkfifo(tmp_path / "pipe.json")
    with caplog.at_level("WARNING", logger="ingest"):
        assert list(load_files(tmp_path)) == []
    assert "pipe.json: not a regular file" in caplog.text
