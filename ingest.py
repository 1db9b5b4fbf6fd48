#!/usr/bin/env python3
"""Load Task-0's Fitbit JSON files into the TimescaleDB hypertable ``raw_data``.

Reads every ``*.json`` / ``*.jsonl`` / ``*.ndjson`` file (and ``.gz`` versions) under DATA_DIR in
sorted path order, streams and validates each record, and loads the valid ones with COPY. A file
is the unit of atomicity: all of its valid rows land in one transaction, or none do. Existing rows
are never overwritten (ON CONFLICT DO NOTHING semantics); within a run the first record of a key
(files in sorted path order, records in file order) is the one stored.

Exit codes: 0 all loaded; 1 finished, but records or files were rejected; 2 usage or
configuration error; 3 database unreachable or failed.
"""

# ---------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import gzip
import hashlib
import io
import json
import logging
import math
import os
import queue
import re
import select
import signal
import socket
import stat
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

__all__ = ["connect_db", "insert_records", "load_files", "main", "validate_record"]
__version__ = "0.1.0"

# ---------------------------------------------------------------------------------------------
# Constants and configuration
# ---------------------------------------------------------------------------------------------
log = logging.getLogger("ingest")

# Metric -> the values a device can produce (inclusive). Outside them a record is rejected:
# heart rate in bpm, SpO2 in %, HRV (RMSSD) in ms, breaths per minute, steps, zone minutes.
METRIC_BOUNDS = {
    "heart_rate": (20.0, 300.0),
    "spo2": (50.0, 100.0),
    "hrv": (0.0, 500.0),
    "breath_rate": (1.0, 80.0),
    "activity": (0.0, 100_000.0),
    "active_zone_minute": (0.0, 1440.0),
}
METRICS = frozenset(METRIC_BOUNDS)
REQUIRED_KEYS = ("user_id", "metric", "timestamp", "value")
MAX_USER_ID_CHARS = 255  # keeps the primary-key index entry far below btree's ~2.7 kB limit
MAX_RECORD_CHARS = 16 * 1024 * 1024  # one record bigger than this fails its file (bounds memory)
DEDUPE_MAX_KEYS = 200_000  # keys remembered per file to drop in-file repeats before COPY (~45 MB)
REJECT_RECORD_CHARS = 1000  # a rejected record is quoted up to this many characters
READ_CHUNK_CHARS = 1 << 20  # characters read from a file at a time
SCHEMA_PATH = Path(__file__).resolve().parent / "sql" / "schema.sql"
SCHEMA_LOCK_KEY = 0x46_49_54_42  # advisory lock held while the schema is applied ("FITB")
FILE_LOCK_NS = 0x46_49_4C_45  # advisory lock (namespace, hashtext(path)) claims a file ("FILE")
RUN_LOCK_NS = 0x52_55_4E_53  # advisory lock (namespace, run_id) held while a run is alive ("RUNS")
# Transient database errors (connection lost, restart, deadlock, serialization failure): a file is
# retried this many times, waiting 0.5, 1, 2, 4, 8, 8, 8 s between attempts (~30 s in all).
RETRY_ATTEMPTS, RETRY_FIRST_DELAY, RETRY_MAX_DELAY = 8, 0.5, 8.0
LOG_FORMAT = "%(asctime)s %(levelname)s %(message)s"

EXIT_OK, EXIT_REJECTS, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3

DEFAULTS = {
    "POSTGRES_HOST": "localhost",
    "POSTGRES_PORT": "5432",
    "POSTGRES_DB": "postgres",
    "POSTGRES_USER": "postgres",
    "POSTGRES_PASSWORD": "",
    "CONNECT_TIMEOUT": "5",
    "STATEMENT_TIMEOUT": "0",
    "DATA_DIR": "./Task-0/extracted_data",
    "SOURCE_TIMEZONE": "UTC",
    "BATCH_SIZE": "2000",
    "ON_CONFLICT": "nothing",
    "WORKERS": "1",
    "REJECT_FILE": "./rejects/rejects.jsonl",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "text",
}

UTC = dt.UTC


@dataclasses.dataclass(frozen=True)
class Config:
    """Everything a run needs, resolved once in ``main``: flag > environment > .env > default."""

    conninfo: dict  # keyword arguments for psycopg2.connect (may hold "dsn")
    data_dir: Path
    source_tz: dt.tzinfo
    batch_size: int
    reject_file: Path
    log_level: str
    on_conflict: str = "nothing"
    workers: int = 1
    force: bool = False
    bootstrap: bool = True
    dry_run: bool = False
    progress: bool = False
    log_format: str = "text"

    def describe_db(self) -> str:
        return _describe(self.conninfo)


def _describe(info: dict) -> str:
    """Where the database is, for messages; never includes the password."""
    if "dsn" in info:
        return _redact(info["dsn"], info.get("password"))
    return f"{info['host']}:{info['port']}/{info['dbname']} as {info['user']}"


# ---------------------------------------------------------------------------------------------
# Exceptions
# ---------------------------------------------------------------------------------------------
class IngestError(Exception):
    """Base of every error this loader raises on purpose."""

    exit_code = EXIT_DATABASE
    hint = ""


class ConfigError(IngestError):
    exit_code = EXIT_USAGE


class ValidationError(IngestError):
    """One record is not acceptable; the message is the reason shown to people."""

    exit_code = EXIT_REJECTS


class FileFormatError(IngestError):
    """A whole file cannot be read as JSON; the file is reported as failed."""

    exit_code = EXIT_REJECTS


class DatabaseError(IngestError):
    exit_code = EXIT_DATABASE


class RejectFileError(IngestError):
    """Rejects cannot be written (disk full, permissions): the file in flight is rolled back."""

    exit_code = EXIT_USAGE


class ConnectError(DatabaseError):
    """The server could not be reached (or refused the login)."""


# ---------------------------------------------------------------------------------------------
# Record model and pure validation
# ---------------------------------------------------------------------------------------------
class Row(NamedTuple):
    user_id: str
    metric: str
    timestamp: dt.datetime  # aware, UTC
    value: float


# Extended ISO 8601 calendar date and time; the offset is optional (naive = SOURCE_TIMEZONE).
_TIMESTAMP_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(?:Z|z|[+-]\d{2}(?::?\d{2})?)?",
    re.ASCII,
)
_DATE_ONLY_RE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)


def _json_type(obj: object) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, (int, float)):
        return "number"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, list):
        return "array"
    return "object" if isinstance(obj, dict) else type(obj).__name__


def _check_user_id(user_id: object) -> str:
    if type(user_id) is not str:
        raise ValidationError(f"user_id must be a string, got {_json_type(user_id)}")
    if not user_id.strip():
        raise ValidationError("user_id is empty or blank")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise ValidationError(
            f"user_id is {len(user_id)} characters long (at most {MAX_USER_ID_CHARS})"
        )
    if not user_id.isascii():
        try:
            user_id.encode("utf-8")
        except UnicodeEncodeError:
            raise ValidationError("user_id holds an unpaired surrogate (not valid Unicode)") from None
    if "\x00" in user_id:
        raise ValidationError("user_id holds a NUL character, which PostgreSQL text cannot store")
    return user_id


def _check_metric(metric: object) -> str:
    if type(metric) is not str:
        raise ValidationError(f"metric must be a string, got {_json_type(metric)}")
    if metric in METRICS:
        return metric
    hint = metric.strip().lower()
    if hint in METRICS:
        raise ValidationError(f"unknown metric {metric[:50]!r} (did you mean {hint!r}?)")
    raise ValidationError(
        f"unknown metric {metric[:50]!r} (expected one of {', '.join(sorted(METRICS))})"
    )


def _localize(naive: dt.datetime, tz: dt.tzinfo) -> dt.datetime:
    """Attach ``tz`` to a wall-clock time, refusing times a DST change makes ambiguous or void."""
    first, second = naive.replace(tzinfo=tz), naive.replace(tzinfo=tz, fold=1)
    if first.utcoffset() != second.utcoffset():
        back = first.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
        if back != naive:
            raise ValidationError(f"timestamp does not exist in {tz} (skipped by a DST change)")
        raise ValidationError(f"timestamp is ambiguous in {tz} (repeated by a DST change)")
    return first


def _check_timestamp(text: object, tz: dt.tzinfo) -> dt.datetime:
    if type(text) is not str:
        raise ValidationError(
            f"timestamp must be an ISO 8601 string, got {_json_type(text)}"
        )
    if not _TIMESTAMP_RE.fullmatch(text):
        if _DATE_ONLY_RE.fullmatch(text):
            raise ValidationError(f"timestamp {text!r} is a date without a time of day")
        raise ValidationError(
            f"timestamp {text[:60]!r} is not ISO 8601 (expected YYYY-MM-DDTHH:MM:SS[.f][±HH:MM])"
        )
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValidationError(f"timestamp {text!r} does not exist: {exc}") from None
    try:
        if parsed.tzinfo is None:
            if tz is UTC:
                return parsed.replace(tzinfo=UTC)
            parsed = _localize(parsed, tz)
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValidationError(f"timestamp {text!r} is outside years 1..9999 in UTC") from None


def _check_value(value: object, metric: str) -> float:
    kind = type(value)
    if kind is not float and kind is not int:  # bool is a subclass of int: excluded here
        raise ValidationError(f"value must be a number, got {_json_type(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValidationError("value is too large for a double precision number") from None
    if not math.isfinite(number):
        raise ValidationError(f"value must be a finite number, got {value!r}")
    low, high = METRIC_BOUNDS[metric]
    if not low <= number <= high:
        raise ValidationError(f"value {number:g} is outside the plausible range for {metric} ({low:g}..{high:g})")
    return number


def validate_record(obj: object, tz: dt.tzinfo = UTC) -> Row:
    """Check one decoded JSON value and return it as a Row; raise ValidationError otherwise.

    Pure: no I/O. Keys other than the four required ones are ignored (the loader counts them and
    says so once per file), so a producer adding a field does not make every record a reject.
    """
    if type(obj) is not dict:
        raise ValidationError(f"record must be a JSON object, got {_json_type(obj)}")
    missing = [key for key in REQUIRED_KEYS if key not in obj]
    if missing:
        raise ValidationError(f"missing key{'s' if len(missing) > 1 else ''}: {', '.join(missing)}")
    metric = _check_metric(obj["metric"])
    return Row(
        _check_user_id(obj["user_id"]),
        metric,
        _check_timestamp(obj["timestamp"], tz),
        _check_value(obj["value"], metric),
    )


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})
_FAST_TIMESTAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(Z|\+00:00)?", re.ASCII)


def _copy_parts(row: Row, escaped_user: str | None = None) -> tuple[str, str]:
    """One row in COPY text format, as (key part, "\t<value>\n"): user_id escaped; the other
    fields cannot hold specials."""
    user = escaped_user if escaped_user is not None else row.user_id.translate(_COPY_ESCAPES)
    return f"{user}\t{row.metric}\t{row.timestamp.isoformat()}", f"\t{row.value!r}\n"


def _copy_line(row: Row) -> str:
    key, tail = _copy_parts(row)
    return key + tail


class _LineMaker:
    """Validated record -> COPY line as (key part, value part), with a fast path for Task-0's shape.

    The fast path accepts only a subset that it checks completely (a user_id already accepted,
    a known metric, "YYYY-MM-DDTHH:MM:SS" in UTC, a number within bounds) and produces exactly
    what validate_record's Row would. Everything else goes through validate_record, which also
    supplies the reason for a reject. Timestamps and values repeat across records, so their
    checked text is remembered (bounded).
    """

    def __init__(self, tz: dt.tzinfo) -> None:
        self.tz, self.naive_is_utc = tz, tz is UTC
        self.users: dict[str, str] = {}  # accepted user_id -> its escaped COPY text
        self.stamps: dict[str, str] = {}  # timestamp text -> canonical UTC text, "" if not fast
        self.values: dict[float, str] = {}  # number -> "\t<repr>\n"

    def __call__(self, obj: object) -> tuple[str, str]:
        try:
            user, metric, ts, value = obj["user_id"], obj["metric"], obj["timestamp"], obj["value"]
        except (KeyError, TypeError, IndexError):
            user = None
        if type(user) is str and type(metric) is str and type(ts) is str:
            escaped, bounds, kind = self.users.get(user), METRIC_BOUNDS.get(metric), type(value)
            if escaped is not None and bounds is not None and (kind is float or kind is int):
                stamp = self.stamps.get(ts)
                if stamp is None:
                    stamp = self._stamp(ts)
                if stamp and bounds[0] <= value <= bounds[1]:
                    tail = self.values.get(value)
                    if tail is None:
                        tail = f"\t{float(value)!r}\n"
                        if len(self.values) < 10_000:
                            self.values[value] = tail
                    return f"{escaped}\t{metric}\t{stamp}", tail
        row = validate_record(obj, self.tz)
        escaped = self.users.get(row.user_id)
        if escaped is None:
            if len(self.users) >= 100_000:
                self.users.clear()
            escaped = self.users[row.user_id] = row.user_id.translate(_COPY_ESCAPES)
        return _copy_parts(row, escaped)

    def _stamp(self, ts: str) -> str:
        match = _FAST_TIMESTAMP.fullmatch(ts)
        ok = match and (match.group(1) or self.naive_is_utc) and _calendar_ok(ts[:19])
        stamp = f"{ts[:19]}+00:00" if ok else ""
        if len(self.stamps) >= 100_000:  # ~15 MB; a day of one-second readings fits
            self.stamps.clear()
        self.stamps[ts] = stamp
        return stamp


def _calendar_ok(text: str) -> bool:
    try:
        dt.datetime.fromisoformat(text)
    except ValueError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# Reading files (streaming)
# ---------------------------------------------------------------------------------------------
class Unparsable(NamedTuple):
    """A JSON Lines line that is not JSON: rejected like an invalid record."""

    reason: str
    text: str


_KINDS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclasses.dataclass(frozen=True, slots=True)
class DataFile:
    path: Path
    rel: str  # path relative to DATA_DIR, with "/" separators: the name used everywhere
    kind: str  # "json" or "jsonl"
    gzipped: bool

    def records(self, digest: Digest | None = None) -> Iterator[tuple[int, object]]:
        """Yield (position, decoded value): position is the 1-based record (or line) number.

        With ``digest``, the file's bytes as read are hashed and counted into it; a fully read
        file is read to its end, so the digest covers every byte.
        """
        try:
            with self._open(digest) as text:
                if self.kind == "jsonl":
                    yield from _iter_json_lines(text)
                else:
                    yield from _iter_json_document(text)
                while text.buffer.read(READ_CHUNK_CHARS):  # bytes after the last record
                    pass
        except FileFormatError:
            raise
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise FileFormatError(_describe_read_error(exc, self.gzipped)) from None

    def _open(self, digest: Digest | None) -> io.TextIOWrapper:
        # Non-blocking open, then a check on the opened file: a path swapped for a FIFO after it
        # was listed must not hang the loader.
        fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise FileFormatError("not a regular file (any more)")
        os.set_blocking(fd, True)
        raw = open(fd, "rb", buffering=0)  # noqa: SIM115 (closed through the wrapper)
        try:
            binary: io.BufferedIOBase = io.BufferedReader(
                _HashingReader(raw, digest) if digest else raw, buffer_size=1 << 20)
            if self.gzipped:
                binary = gzip.GzipFile(fileobj=binary, mode="rb")
            head = binary.peek(4)[:4]
            return io.TextIOWrapper(binary, encoding=_sniff_encoding(head), newline="")
        except BaseException:
            raw.close()
            raise


class Digest:
    """SHA-256 and byte count of a file, computed while it is read."""

    def __init__(self) -> None:
        self.sha256, self.size = hashlib.sha256(), 0

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


class _HashingReader(io.RawIOBase):
    def __init__(self, raw, digest: Digest) -> None:
        self._raw, self._digest = raw, digest

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        count = self._raw.readinto(buffer)
        if count:
            self._digest.sha256.update(memoryview(buffer)[:count])
            self._digest.size += count
        return count

    def close(self) -> None:
        self._raw.close()
        super().close()


def _file_digest(path: Path) -> Digest:
    digest = Digest()
    with open(path, "rb", buffering=0) as raw, _HashingReader(raw, digest) as reader:
        while reader.read(READ_CHUNK_CHARS):
            pass
    return digest


def _sniff_encoding(head: bytes) -> str:
    """UTF-8 (with or without BOM) is the norm; UTF-16/32 are accepted when a BOM says so."""
    if head.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    return "utf-8"


def _describe_read_error(exc: BaseException, gzipped: bool) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid {exc.encoding} text ({exc.reason})"
    if gzipped and isinstance(exc, (gzip.BadGzipFile, EOFError)):
        return f"not a valid gzip file ({exc})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read file: {exc.strerror}"
    return f"cannot read file: {exc}"


_DECODER = json.JSONDecoder()
_WS = re.compile(r"[ \t\n\r]*")


class _Buffer:
    """A sliding window over a text stream, for decoding one JSON value at a time."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream, self.text, self.pos, self.eof, self.consumed = stream, "", 0, False, 0

    def fill(self) -> bool:
        """Read another chunk; drop what is consumed. False at end of file."""
        if self.eof:
            return False
        chunk = self.stream.read(READ_CHUNK_CHARS)
        self.consumed += self.pos
        self.text, self.pos = self.text[self.pos :] + chunk, 0
        self.eof = not chunk
        return bool(chunk)

    def skip_ws(self) -> str:
        """Skip white space; return the next character ("" at end of file)."""
        while True:
            self.pos = _WS.match(self.text, self.pos).end()
            if self.pos < len(self.text) or not self.fill():
                return self.text[self.pos : self.pos + 1]

    def decode(self) -> object:
        """Decode the value at the cursor, reading more while it may be cut by the window."""
        while True:
            try:
                value, end = _DECODER.raw_decode(self.text, self.pos)
                if end < len(self.text) or self.eof:
                    self.pos = end
                    return value
                # A number at the very end of the window may go on in the next chunk.
            except json.JSONDecodeError as exc:
                if self.eof and _at_end(exc, self.text):
                    raise FileFormatError(f"file ends inside a record at {self.where(self.pos)} (truncated?)") from None
                if self.eof or not _may_be_cut(exc, len(self.text)):
                    raise FileFormatError(f"invalid JSON at {self.where(exc.pos)}: {exc.msg}") from None
            except RecursionError:
                raise FileFormatError(f"JSON nested too deeply at {self.where(self.pos)}") from None
            if len(self.text) - self.pos > MAX_RECORD_CHARS:
                raise FileFormatError(
                    f"a record at {self.where(self.pos)} is larger than {MAX_RECORD_CHARS} characters"
                )
            self.fill()

    def where(self, pos: int) -> str:
        return f"character {self.consumed + pos + 1}"


def _may_be_cut(exc: json.JSONDecodeError, length: int) -> bool:
    """Could this error be the window's end cutting a value (a literal is at most 9 chars)?"""
    return exc.msg.startswith("Unterminated string") or exc.pos >= length - 16


def _at_end(exc: json.JSONDecodeError, text: str) -> bool:
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())


def _iter_json_document(text: io.TextIOBase) -> Iterator[tuple[int, object]]:
    """A JSON array of records, or one or more record objects one after the other."""
    buf = _Buffer(text)
    first = buf.skip_ws()
    if first == "":
        raise FileFormatError("file is empty (expected a JSON array of records)")
    if first == "[":
        buf.pos += 1
        yield from _iter_array_items(buf)
        if buf.skip_ws() != "":
            raise FileFormatError(f"unexpected data after the JSON array at {buf.where(buf.pos)}")
        return
    if first != "{":
        value = buf.decode()
        raise FileFormatError(
            f"top-level JSON is a {_json_type(value)}; expected an array of records or a record object"
        )
    position = 0
    while buf.skip_ws() != "":
        position += 1
        yield position, buf.decode()


def _iter_array_items(buf: _Buffer) -> Iterator[tuple[int, object]]:
    position = 0
    if buf.skip_ws() == "]":
        buf.pos += 1
        return
    while True:
        batch = _decode_batch(buf)
        if batch:
            for item in batch:
                position += 1
                yield position, item
            continue
        if buf.skip_ws() == "":
            raise FileFormatError("file ends inside the JSON array (truncated?)")
        position += 1
        yield position, buf.decode()
        separator = buf.skip_ws()
        buf.pos += 1
        if separator == "]":
            return
        if separator != ",":
            where = buf.where(buf.pos - 1)
            if separator == "":
                raise FileFormatError("file ends inside the JSON array (truncated?)")
            raise FileFormatError(f"invalid JSON at {where}: expected ',' or ']'")


def _decode_batch(buf: _Buffer) -> list | None:
    """Decode many array items with one json.loads call (the C decoder then does the looping).

    The window is cut after its last "}," and parsed as an array. That cut can only parse if
    it falls between two items: inside a string or a nested value the brackets or quotes would
    not balance. Anything else (odd formatting, a bad record) returns None, and the caller
    decodes item by item, which finds and reports the exact problem.
    """
    if len(buf.text) - buf.pos < READ_CHUNK_CHARS // 2:
        buf.fill()
    cut = buf.text.rfind("},", buf.pos)
    if cut < 0 or cut - buf.pos < 4096:
        return None
    try:
        items = json.loads(f"[{buf.text[buf.pos:cut + 1]}]")
    except (ValueError, RecursionError):
        return None
    buf.pos = cut + 2
    return items


def _iter_json_lines(text: io.TextIOBase) -> Iterator[tuple[int, object]]:
    """One record per line; a bad line is a rejected record, not a failed file."""
    lineno = 0
    while True:
        line = text.readline(MAX_RECORD_CHARS + 1)
        if not line:
            return
        lineno += 1
        if len(line) > MAX_RECORD_CHARS and not line.endswith("\n"):
            while line and not line.endswith("\n"):  # skip the rest of the oversized line
                line = text.readline(READ_CHUNK_CHARS)
            yield lineno, Unparsable(f"line longer than {MAX_RECORD_CHARS} characters", "")
            continue
        if not line.strip():  # a blank line keeps its number but is not a record
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as exc:
            yield lineno, Unparsable(f"invalid JSON on this line: {exc.msg} (column {exc.colno})", line)
        except RecursionError:
            yield lineno, Unparsable("JSON nested too deeply", line)


def load_files(data_dir: Path) -> Iterator[DataFile]:
    """Yield the loadable files under ``data_dir`` in sorted relative-path order.

    Directory symlinks are not followed (no loops); a file symlink is followed only when its
    target lies inside ``data_dir``. Anything that is not a regular file (FIFO, socket, device)
    is skipped, so the loader never blocks on it.
    """
    root = data_dir.resolve()
    found: list[tuple[str, Path, str, bool]] = []
    for folder, dirs, names in os.walk(root, onerror=_walk_error):
        dirs.sort()
        for name in names:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            kind, gzipped = _kind_of(name)
            if kind is None:
                log.debug("skipping %s: not a .json/.jsonl/.ndjson file (or .gz of one)", rel)
            elif _is_loadable(path, root, rel):
                found.append((rel, path, kind, gzipped))
    for rel, path, kind, gzipped in sorted(found):
        yield DataFile(path, rel, kind, gzipped)


def _kind_of(name: str) -> tuple[str | None, bool]:
    lower = name.lower()
    gzipped = lower.endswith(".gz")
    if gzipped:
        lower = lower[:-3]
    return _KINDS.get(os.path.splitext(lower)[1]), gzipped


def _is_loadable(path: Path, root: Path, rel: str) -> bool:
    if path.is_symlink():
        target = path.resolve()
        if not target.is_relative_to(root):
            log.warning("skipping %s: symlink to %s, outside the data directory", rel, target)
            return False
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        log.warning("skipping %s: %s", rel, exc.strerror or exc)
        return False
    if not stat.S_ISREG(mode):
        log.warning("skipping %s: not a regular file", rel)
        return False
    return True


def _walk_error(exc: OSError) -> None:
    log.warning("cannot list %s: %s", exc.filename, exc.strerror or exc)


# ---------------------------------------------------------------------------------------------
# Database I/O
# ---------------------------------------------------------------------------------------------
def _psycopg2():
    import psycopg2  # imported lazily: validation and --help work without the driver

    return psycopg2


def connect_db(conninfo: dict, *, describe: str = "the database"):
    """Open a connection (fails within connect_timeout); raise DatabaseError with a clean line."""
    psycopg2 = _psycopg2()
    info = dict(conninfo)
    info.setdefault("application_name", "fitbit-ingest")
    try:
        conn = psycopg2.connect(**info)
    except psycopg2.Error as exc:
        first = _redact(str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc), info.get("password"))
        err = ConnectError(f"cannot connect to {describe}: {first}")
        err.hint = "is the database running and are POSTGRES_HOST/POSTGRES_PORT (or DATABASE_URL) right?"
        raise err from None
    conn.set_client_encoding("UTF8")
    return conn


def apply_schema(conn, schema_sql: str) -> None:
    """Apply sql/schema.sql in one transaction, serialised between loaders by an advisory lock.

    The schema's hash is left as a comment on ingest_runs; when it is already there (and
    raw_data exists) the whole step is one catalog query, so a re-run pays nothing for it.
    """
    marker = f"fitbit-ingest schema {hashlib.sha256(schema_sql.encode()).hexdigest()[:16]}"
    check = ("SELECT to_regclass('raw_data') IS NOT NULL "
             "AND obj_description(to_regclass('ingest_runs'), 'pg_class') = %s")
    with conn.cursor() as cur:
        cur.execute(check, (marker,))
        if cur.fetchone()[0]:
            conn.commit()
            return
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        cur.execute(schema_sql)
        cur.execute("COMMENT ON TABLE ingest_runs IS %s", (marker,))
    conn.commit()


class _ServerSpoke(Exception):
    """The server sent something in the middle of COPY: an error, so stop sending."""


class _CopySource:
    """File-like object whose read() hands the next batch of COPY lines to copy_expert.

    A producer thread parses, validates and formats the next batches while the main thread
    sends the current one (psycopg2 releases the GIL while it sends), so Python and the server
    work at the same time; memory stays at a few batches whatever the file size. ``watch`` (the
    connection's socket) makes it stop early when the server reports an error mid-COPY instead
    of sending the rest of the file first.
    """

    def __init__(self, lines: Iterable[str], batch_size: int, numbered: bool, watch: int | None = None) -> None:
        self._lines, self._batch, self._numbered, self._watch = iter(lines), batch_size, numbered, watch
        self.count = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="copy-producer", daemon=True)

    def _produce(self) -> None:
        try:
            while not self._stop.is_set():
                batch = self._next_batch()
                self._queue.put(batch)
                if not batch:
                    return
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which re-raises it)
            self._queue.put(exc)

    def _next_batch(self) -> str:
        batch, count = [], self.count
        for line in self._lines:
            count += 1
            batch.append(f"{count}\t{line}" if self._numbered else line)
            if len(batch) >= self._batch:
                break
        self.count = count
        return "".join(batch)

    def read(self, size: int = -1) -> str:
        try:
            if self._watch is not None and select.select([self._watch], [], [], 0)[0]:
                raise _ServerSpoke
            item = self._queue.get()
            if isinstance(item, BaseException):
                raise item
            return item
        except BaseException as exc:  # also a second SIGINT/SIGTERM: abort the COPY with it
            self.error = exc  # psycopg2 replaces it by its own error: kept to re-raise
            raise

    def _close(self) -> None:
        self._stop.set()
        while self._thread.is_alive():
            try:
                self._queue.get(timeout=0.05)  # unblock a producer waiting to put
            except queue.Empty:
                pass
        self._thread.join()
        # Close the line generator now (its file, buffers and key memory) rather than whenever a
        # reference cycle through a stored exception gets collected.
        close = getattr(self._lines, "close", None)
        if close is not None:
            close()
        self._lines = iter(())

    def copy_into(self, cur, sql: str) -> int:
        """Run COPY with this object as its input; return the rows the server reports."""
        self._thread.start()
        try:
            cur.copy_expert(sql, self, size=1 << 16)
        except _psycopg2().Error:
            error, self.error = self.error, None  # no cycle through self keeps the batches alive
            if error is not None:
                raise error from None
            raise
        finally:
            self._close()
        if cur.rowcount != self.count:
            raise DatabaseError(f"COPY reported {cur.rowcount} rows, but {self.count} were sent")
        return cur.rowcount


class InsertResult(NamedTuple):
    inserted: int
    duplicate: int  # already present (unchanged, in update mode) or repeated earlier in the run
    updated: int = 0


_STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS ingest_stage (
    seq BIGINT NOT NULL, user_id TEXT NOT NULL, metric TEXT NOT NULL,
    ts TIMESTAMPTZ NOT NULL, value DOUBLE PRECISION NOT NULL
) ON COMMIT DELETE ROWS
"""
_FIRST_PER_KEY = """
SELECT DISTINCT ON (user_id, metric, ts) user_id, metric, ts, value
FROM ingest_stage ORDER BY user_id, metric, ts, seq
"""
_MERGE_NOTHING_SQL = f"""
INSERT INTO raw_data (user_id, metric, "timestamp", value)
{_FIRST_PER_KEY}
ON CONFLICT (user_id, metric, "timestamp") DO NOTHING
"""
# Update mode: a key an earlier file of this run wrote (ingest_run_keys) is left alone, so the
# first record in order wins within a run; keys from earlier runs get the new value.
_MERGE_UPDATE_SQL = f"""
WITH src AS ({_FIRST_PER_KEY}),
fresh AS (
    INSERT INTO ingest_run_keys (run_id, user_id, metric, "timestamp")
    SELECT %(run_id)s, user_id, metric, ts FROM src
    ON CONFLICT DO NOTHING
    RETURNING user_id, metric, "timestamp" AS ts
),
merged AS (
    INSERT INTO raw_data (user_id, metric, "timestamp", value)
    SELECT src.user_id, src.metric, src.ts, src.value FROM src JOIN fresh USING (user_id, metric, ts)
    ON CONFLICT (user_id, metric, "timestamp") DO UPDATE SET value = EXCLUDED.value
    WHERE raw_data.value IS DISTINCT FROM EXCLUDED.value
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged
"""


def insert_records(conn, rows: Iterable[Row] | Callable[[], Iterable[Row]], *, batch_size: int = 2000,
                   on_conflict: str = "nothing", run_id: int = 0) -> InsertResult:
    """Insert rows into raw_data inside the caller's transaction.

    ``on_conflict="nothing"`` keeps existing rows; ``"update"`` stores the new value where the key
    exists with a different one (``run_id`` names the run, whose earlier keys are not overwritten).
    ``rows`` may be a zero-argument callable that returns a fresh iterable each call: then, in
    "nothing" mode, the rows are first COPY'd straight into raw_data (the fast path), and only if
    a key already exists is that attempt rolled back to a savepoint and the rows sent again
    through a staging table, where the first occurrence of a key wins. Counts come from what the
    database reports for each statement.
    """
    if callable(rows):
        make_rows = rows
        return _insert_lines(conn, lambda: map(_copy_line, make_rows()), batch_size, on_conflict, run_id)
    return _insert_lines(conn, map(_copy_line, rows), batch_size, on_conflict, run_id)


def _insert_lines(conn, lines: Iterable[str] | Callable[[], Iterable[str]], batch_size: int,
                  on_conflict: str, run_id: int, direct: bool = True) -> InsertResult:
    with conn.cursor() as cur:
        if callable(lines) and on_conflict == "nothing" and direct:
            cur.execute("SAVEPOINT ingest_direct")
            try:
                copied = _CopySource(lines(), batch_size, numbered=False, watch=conn.fileno()).copy_into(
                    cur, 'COPY raw_data (user_id, metric, "timestamp", value) FROM STDIN')
            except (_psycopg2().errors.UniqueViolation, _ServerSpoke):
                cur.execute("ROLLBACK TO SAVEPOINT ingest_direct")
            else:
                cur.execute("RELEASE SAVEPOINT ingest_direct")
                return InsertResult(copied, 0)
        cur.execute(_STAGE_SQL)
        staged = _CopySource(lines() if callable(lines) else lines, batch_size, numbered=True).copy_into(
            cur, "COPY ingest_stage (seq, user_id, metric, ts, value) FROM STDIN")
        cur.execute("SET LOCAL work_mem = '256MB'")
        if on_conflict == "update":
            cur.execute(_MERGE_UPDATE_SQL, {"run_id": run_id})
            inserted, updated = cur.fetchone()
        else:
            cur.execute(_MERGE_NOTHING_SQL)
            inserted, updated = cur.rowcount, 0
        cur.execute("TRUNCATE ingest_stage")
        return InsertResult(inserted, staged - inserted - updated, updated)


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
COUNTS = ("records_read", "records_rejected", "rows_inserted", "rows_updated", "rows_duplicate")


@dataclasses.dataclass(slots=True)  # one per file in the summary: 100,000 files stay small
class FileResult:
    file: str
    status: str = "loaded"  # loaded | failed | skipped (unchanged) | busy (claimed by another loader)
    records_read: int = 0
    records_rejected: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_duplicate: int = 0
    error: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class Summary:
    run_id: int | None = None
    files_seen: int = 0
    files_loaded: int = 0
    files_skipped: int = 0
    files_busy: int = 0
    files_failed: int = 0
    files_checked: int = 0  # --dry-run
    records_read: int = 0
    records_rejected: int = 0
    rows_inserted: int = 0
    rows_updated: int = 0
    rows_duplicate: int = 0
    seconds: float = 0.0
    status: str = "running"
    error: str | None = None
    files: list = dataclasses.field(default_factory=list)

    def add(self, result: FileResult) -> None:
        self.files_seen += 1
        self.files.append(result)
        key = f"files_{result.status}"
        setattr(self, key, getattr(self, key) + 1)
        if result.status in ("loaded", "checked"):
            for name in COUNTS:
                setattr(self, name, getattr(self, name) + getattr(result, name))

    def line(self) -> str:
        keys = ("files_seen", "files_loaded", "files_skipped", "files_busy", "files_failed", *COUNTS)
        if self.files_checked:
            keys = ("files_seen", "files_checked", "files_failed", "records_read", "records_rejected")
        return " ".join(f"{k}={getattr(self, k)}" for k in keys) + f" seconds={self.seconds:.2f}"

    def fields(self) -> dict:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "files"}
        return {"event": "summary", **data}


class _RejectLog:
    """Rejects of the current file, spooled, then appended to the reject file after it commits.

    Appends are single O_APPEND writes per file, so several worker processes can share the file.
    """

    def __init__(self, path: Path, run_id: int | None) -> None:
        self.path, self.run_id = path, run_id
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write the reject file {path}: {exc.strerror or exc}") from None
        self._spool = io.StringIO()

    def add(self, file: str, position: int | None, reason: str, record: object = None) -> None:
        entry = {"run_id": self.run_id, "file": file, "position": position, "reason": reason,
                 "record": _quote(record)}
        line = json.dumps(entry, ensure_ascii=False)
        if not line.isascii():  # a lone surrogate ("\ud800") cannot be UTF-8: keep it as its escape
            line = line.encode("utf-8", "backslashreplace").decode("utf-8")
        self._spool.write(line + "\n")
        if self._spool.tell() > 1 << 22:  # keep memory bounded on a file full of rejects
            self._spill()

    def _spill(self) -> None:
        if not hasattr(self, "_disk"):
            self._disk = tempfile.TemporaryFile("w+", encoding="utf-8")  # noqa: SIM115 (closed in discard)
        self._disk.write(self._spool.getvalue())
        self._spool = io.StringIO()

    def discard(self) -> None:
        self._spool = io.StringIO()
        if hasattr(self, "_disk"):
            self._disk.close()
            del self._disk

    def publish(self) -> None:
        try:
            if hasattr(self, "_disk"):
                self._spill()
                self._disk.seek(0)
                while chunk := self._disk.read(1 << 20):
                    _write_all(self._fd, chunk.encode("utf-8"))
            else:
                _write_all(self._fd, self._spool.getvalue().encode("utf-8"))
        except OSError as exc:
            raise RejectFileError(f"cannot write the reject file {self.path}: {exc.strerror or exc}") from None
        finally:
            self.discard()

    def close(self) -> None:
        self.discard()
        os.close(self._fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _quote(record: object) -> str | None:
    if record is None:
        return None
    text = record.text if isinstance(record, Unparsable) else None
    if text is None:
        try:
            text = json.dumps(record, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(record)
    return text[:REJECT_RECORD_CHARS]


class _FileStats:
    """Counts for one pass over one file (a second pass starts from zero)."""

    def __init__(self) -> None:
        self.read = self.rejected = self.extra_keys = self.repeated = self.conflicting = 0
        self.extra_example: str | None = None
        self.conflict_example: str | None = None
        self.digest = Digest()
        self.seen: dict[str, str] = {}  # key part of a COPY line -> its value part, first occurrence

    def repeat(self, key: str, first: str, value: str) -> None:
        """Note a record whose key an earlier record of the file had (with value ``first``)."""
        self.repeated += 1
        if first != value:
            self.conflicting += 1
            if self.conflict_example is None:
                self.conflict_example = f"{key.replace(chr(9), ' ')}: {first.strip()} then {value.strip()}"


def _valid_lines(df: DataFile, make_line: _LineMaker, rejects: _RejectLog, stats: _FileStats) -> Iterator[str]:
    """The file's valid records as COPY lines, each key once (the first; the database still
    settles repeats beyond the remembered keys); rejects are spooled with their reasons."""
    seen = stats.seen
    for position, obj in df.records(stats.digest):
        stats.read += 1
        if type(obj) is Unparsable:
            stats.rejected += 1
            rejects.add(df.rel, position, obj.reason, obj)
            continue
        try:
            key, tail = make_line(obj)
        except ValidationError as exc:
            stats.rejected += 1
            rejects.add(df.rel, position, str(exc), obj)
            continue
        if len(obj) > 4:
            stats.extra_keys += 1
            if stats.extra_example is None:
                stats.extra_example = ", ".join(sorted(k for k in obj if k not in REQUIRED_KEYS)[:5])
        first = seen.get(key)
        if first is None:
            if len(seen) < DEDUPE_MAX_KEYS:
                seen[key] = tail
            yield key + tail
        else:
            stats.repeat(key, first, tail)


_MANIFEST_UPSERT = """
INSERT INTO ingest_files (path, size, mtime_ns, sha256, status, records_read, records_rejected,
                          rows_inserted, rows_updated, rows_duplicate, error, loaded_at, run_id)
VALUES (%(path)s, %(size)s, %(mtime_ns)s, %(sha256)s, %(status)s, %(records_read)s,
        %(records_rejected)s, %(rows_inserted)s, %(rows_updated)s, %(rows_duplicate)s, %(error)s,
        now(), %(run_id)s)
ON CONFLICT (path) DO UPDATE SET
    size = EXCLUDED.size, mtime_ns = EXCLUDED.mtime_ns, sha256 = EXCLUDED.sha256,
    status = EXCLUDED.status, records_read = EXCLUDED.records_read,
    records_rejected = EXCLUDED.records_rejected, rows_inserted = EXCLUDED.rows_inserted,
    rows_updated = EXCLUDED.rows_updated, rows_duplicate = EXCLUDED.rows_duplicate,
    error = EXCLUDED.error, loaded_at = EXCLUDED.loaded_at, run_id = EXCLUDED.run_id
"""


def _is_transient(exc: BaseException) -> bool:
    """Connection lost, server restarting, serialization failure or deadlock: worth a retry."""
    psycopg2 = _psycopg2()
    if isinstance(exc, psycopg2.extensions.TransactionRollbackError):
        return True
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return exc.pgcode is None or exc.pgcode.startswith(("08", "57P"))
    return False


class _Loader:
    """Loads files one at a time over its own connection; one per process."""

    def __init__(self, cfg: Config, run_id: int | None, progress: _Progress | None = None,
                 known: dict | None = None) -> None:
        self.cfg, self.run_id, self.progress = cfg, run_id, progress
        self.known = known or {}  # manifest at the start of the run: path -> (size, mtime_ns, status, error)
        self.rejects = _RejectLog(cfg.reject_file, run_id)
        self.make_line = _LineMaker(cfg.source_tz)
        self.conn = None

    def close(self) -> None:
        self.rejects.close()
        if self.conn is None or self.conn.closed:
            return
        psycopg2 = _psycopg2()
        try:
            if self.conn.info.transaction_status == psycopg2.extensions.TRANSACTION_STATUS_IDLE:
                self._flush_commits()
            else:  # stopped inside a file: it rolls back whole
                self.conn.rollback()
        except psycopg2.Error as exc:
            log.warning("could not flush the last commits to disk: %s", _first_line(exc))
        finally:
            self.conn.close()

    def _connection(self):
        if self.conn is None or self.conn.closed:
            self.conn = connect_db(self.cfg.conninfo, describe=self.cfg.describe_db())
            # Each file commits without waiting for its WAL flush: a server crash can undo the
            # last fraction of a second of commits, always a whole file with its manifest row, so
            # the next run simply loads those files again. close() ends with a synchronous commit,
            # so a finished run is durable. This saves an fsync per file (many small files).
            with self.conn.cursor() as cur:
                cur.execute("SET synchronous_commit = off")
            self.conn.commit()
        return self.conn

    def _flush_commits(self) -> None:
        """A synchronous commit flushes the WAL of every earlier asynchronous one."""
        with self.conn.cursor() as cur:
            cur.execute("SET LOCAL synchronous_commit = on")
            cur.execute("SELECT txid_current()")  # a write-transaction, so its commit waits for the flush
        self.conn.commit()

    def load(self, df: DataFile) -> FileResult:
        """Load one file; on a transient database error reconnect and retry it, with backoff."""
        started, delay = time.monotonic(), RETRY_FIRST_DELAY
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                result = self._load_once(df)
                result.seconds = round(time.monotonic() - started, 3)
                return result
            except ConnectError as exc:  # reconnecting after a lost connection
                if attempt == RETRY_ATTEMPTS:
                    raise DatabaseError(f"while loading {df.rel}: {exc} (gave up after {attempt} attempts)") from None
                error = exc
            except IngestError:
                raise
            except Exception as exc:
                self.rejects.discard()
                if _Stop.aborted:  # psycopg2 reports an interrupted COPY as its own error
                    raise KeyboardInterrupt from None
                if not _is_transient(exc) or attempt == RETRY_ATTEMPTS:
                    self._drop_connection()
                    suffix = f" (gave up after {attempt} attempts)" if attempt > 1 else ""
                    raise DatabaseError(f"while loading {df.rel}: {_first_line(exc)}{suffix}") from exc
                error = exc
            log.warning("%s: %s; retrying in %.1fs (attempt %d of %d)", df.rel, _first_line(error),
                        delay, attempt + 1, RETRY_ATTEMPTS)
            self._drop_connection()
            time.sleep(delay)
            delay = min(delay * 2, RETRY_MAX_DELAY)
        raise AssertionError("unreachable")  # pragma: no cover

    def _drop_connection(self) -> None:
        if self.conn is not None:
            _rollback(self.conn)
            self.conn.close()
        self.conn = None

    def _load_once(self, df: DataFile) -> FileResult:
        try:
            st = df.path.stat()
        except OSError as exc:
            return self._fail(None, df, None, f"cannot read file: {exc.strerror or exc}")
        seen = self.known.get(df.rel)
        if seen and not self.cfg.force and seen[:2] == (st.st_size, st.st_mtime_ns):
            # In the manifest as it was when the run started, and untouched since: no claim needed.
            return FileResult(df.rel, "skipped", error=f"it failed before: {seen[3]}" if seen[2] == "failed" else None)
        conn = self._connection()
        with conn.cursor() as cur:
            cur.execute("SELECT pg_try_advisory_xact_lock(%s, hashtext(%s))", (FILE_LOCK_NS, df.rel))
            if not cur.fetchone()[0]:
                conn.rollback()
                return FileResult(df.rel, "busy")
            cur.execute("SELECT size, mtime_ns, sha256, status, error FROM ingest_files WHERE path = %s",
                        (df.rel,))
            known = cur.fetchone()
            if known and not self.cfg.force and _unchanged(cur, df, st, known):
                conn.commit()
                note = f"it failed before: {known[4]}" if known[3] == "failed" else None
                return FileResult(df.rel, "skipped", error=note)
            cur.execute("SAVEPOINT ingest_file")
        # A file loaded before (changed, or --force) will mostly find its keys present: staging
        # straight away saves a direct COPY that would fail.
        return self._insert(conn, df, st, direct=not (known and known[3] == "loaded"))

    def _insert(self, conn, df: DataFile, st: os.stat_result, direct: bool) -> FileResult:
        stats = _FileStats()

        def fresh_lines() -> Iterator[str]:
            nonlocal stats
            stats = _FileStats()
            self.rejects.discard()
            if self.progress is not None:
                self.progress.file_started(df, stats)
            return _valid_lines(df, self.make_line, self.rejects, stats)

        psycopg2 = _psycopg2()
        try:
            res = _insert_lines(conn, fresh_lines, self.cfg.batch_size, self.cfg.on_conflict, self.run_id or 0,
                                direct)
        except FileFormatError as exc:
            return self._fail(conn, df, st, str(exc))
        except (psycopg2.errors.DataError, psycopg2.errors.IntegrityError) as exc:
            return self._fail(conn, df, st, f"the database refused its rows: {_first_line(exc)}")
        result = FileResult(df.rel, "loaded", stats.read, stats.rejected, res.inserted, res.updated,
                            res.duplicate + stats.repeated)
        self._record(conn, df, stats.digest.size, st.st_mtime_ns, stats.digest.hexdigest(), result)
        self._publish_then_commit(conn)
        _quality_warnings(df, stats)
        return result

    def _fail(self, conn, df: DataFile, st: os.stat_result | None, reason: str) -> FileResult:
        """The file is rolled back whole; its one reject line and manifest row say why."""
        result = FileResult(df.rel, "failed", error=reason)
        self.rejects.discard()
        self.rejects.add(df.rel, None, f"file failed: {reason}")
        if conn is not None and st is not None:
            with conn.cursor() as cur:
                cur.execute("ROLLBACK TO SAVEPOINT ingest_file")
            self._record(conn, df, st.st_size, st.st_mtime_ns, None, result)
            self._publish_then_commit(conn)
        else:
            self.rejects.publish()
        return result

    def _publish_then_commit(self, conn) -> None:
        """Rejects are written before the rows commit: if they cannot be, the file rolls back
        (nothing is lost; a crash between the two can repeat a file's reject lines, never rows)."""
        try:
            self.rejects.publish()
        except RejectFileError:
            _rollback(conn)
            raise
        conn.commit()

    def _record(self, conn, df: DataFile, size: int, mtime_ns: int, sha256: str | None,
                result: FileResult) -> None:
        counts = {name: getattr(result, name) for name in COUNTS}
        with conn.cursor() as cur:
            cur.execute(_MANIFEST_UPSERT, {"path": df.rel, "size": size, "mtime_ns": mtime_ns,
                                           "sha256": sha256, "status": result.status, "error": result.error,
                                           "run_id": self.run_id, **counts})


def _quality_warnings(df: DataFile, stats: _FileStats) -> None:
    """Say once per file what the producer should look at; nothing of it is an error."""
    if stats.extra_keys:
        log.warning("%s: %d records carry keys other than %s (ignored), e.g. %s", df.rel,
                    stats.extra_keys, "/".join(REQUIRED_KEYS), stats.extra_example)
    if stats.conflicting:
        more = " at least" if len(stats.seen) >= DEDUPE_MAX_KEYS else ""
        log.warning("%s:%s %d records repeat a key seen earlier in the file with a different value; "
                    "the first was kept (e.g. %s)", df.rel, more, stats.conflicting, stats.conflict_example,
                    extra={"fields": {"file": df.rel, "conflicting_repeats": stats.conflicting}})


def _unchanged(cur, df: DataFile, st: os.stat_result, known: tuple) -> bool:
    """Same size and mtime: unchanged. Same size, new mtime: compare content hashes."""
    size, mtime_ns, sha256 = known[:3]
    if size != st.st_size:
        return False
    if mtime_ns == st.st_mtime_ns:
        return True
    if sha256 is None or _file_digest(df.path).hexdigest() != sha256:
        return False
    cur.execute("UPDATE ingest_files SET mtime_ns = %s WHERE path = %s", (st.st_mtime_ns, df.rel))
    return True


def _rollback(conn) -> None:
    try:
        conn.rollback()
    except _psycopg2().Error:
        pass  # the connection is gone; the server has rolled back already


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _redact(text: str, password: str | None) -> str:
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
    if password:
        text = text.replace(password, "***")
    return text


# --- the run: run log, signals, workers -------------------------------------------------------
class _Stop:
    """Set by SIGINT/SIGTERM: the run stops between files. A second signal aborts at once."""

    signum: int | None = None
    aborted = False  # the second signal came: whatever error it surfaces as, it means "stop now"

    @classmethod
    def install(cls) -> None:
        cls.signum, cls.aborted = None, False
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, cls._handle)

    @classmethod
    def _handle(cls, signum, frame) -> None:
        if cls.signum is not None:
            cls.aborted = True
            raise KeyboardInterrupt
        cls.signum = signum
        log.warning("received %s: stopping after the current file", signal.Signals(signum).name)


class Interrupted(IngestError):
    def __init__(self, signum: int) -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} between files")
        self.exit_code = 128 + signum


def _start_run(conn, cfg: Config) -> int:
    """Insert this run's row and hold its advisory lock; mark runs whose holder died interrupted."""
    with conn.cursor() as cur:
        cur.execute("SELECT run_id FROM ingest_runs WHERE status = 'running'")
        for (stale,) in cur.fetchall():
            cur.execute("SELECT pg_try_advisory_lock(%s, %s)", (RUN_LOCK_NS, stale % 2**31))
            if cur.fetchone()[0]:
                cur.execute("UPDATE ingest_runs SET status = 'interrupted', finished_at = now() "
                            "WHERE run_id = %s AND status = 'running'", (stale,))
                cur.execute("DELETE FROM ingest_run_keys WHERE run_id = %s", (stale,))
                cur.execute("SELECT pg_advisory_unlock(%s, %s)", (RUN_LOCK_NS, stale % 2**31))
        cur.execute("INSERT INTO ingest_runs (host, pid, version, data_dir, on_conflict) "
                    "VALUES (%s, %s, %s, %s, %s) RETURNING run_id",
                    (socket.gethostname(), os.getpid(), __version__, str(cfg.data_dir.resolve()),
                     cfg.on_conflict))
        run_id = cur.fetchone()[0]
        cur.execute("SELECT pg_advisory_lock(%s, %s)", (RUN_LOCK_NS, run_id % 2**31))
    conn.commit()
    return run_id


def _finish_run(cfg: Config, conn, summary: Summary) -> None:
    """Record the run's outcome; reconnect once if the connection was lost meanwhile."""
    psycopg2 = _psycopg2()
    counts = {k: getattr(summary, k) for k in ("files_seen", "files_loaded", "files_failed", *COUNTS)}
    counts["files_skipped"] = summary.files_skipped + summary.files_busy
    sets = ", ".join(f"{k} = %({k})s" for k in counts)
    for attempt in (1, 2):
        try:
            if attempt == 2 or conn.closed:
                conn = connect_db(cfg.conninfo, describe=cfg.describe_db())
            with conn.cursor() as cur:
                cur.execute(f"UPDATE ingest_runs SET finished_at = now(), status = %(status)s, "
                            f"error = %(error)s, {sets} WHERE run_id = %(run_id)s",
                            {**counts, "status": summary.status, "error": summary.error, "run_id": summary.run_id})
                cur.execute("DELETE FROM ingest_run_keys WHERE run_id = %s", (summary.run_id,))
            conn.commit()
            return
        except (psycopg2.Error, IngestError) as exc:
            if attempt == 2:
                log.warning("could not record the end of run %s in ingest_runs: %s", summary.run_id,
                            _first_line(exc))
        finally:
            if attempt == 2 or not conn.closed:
                conn.close()


def _report(summary: Summary, result: FileResult, progress: _Progress | None = None) -> None:
    summary.add(result)
    if progress is not None:
        progress.file_done(result.file)
    fields = {"fields": {"event": "file", **dataclasses.asdict(result)}}
    if result.status in ("skipped", "busy"):
        why = "unchanged" if result.status == "skipped" else "claimed by another loader"
        log.info("skipped %s: %s%s", result.file, why, f" ({result.error})" if result.error else "", extra=fields)
        return
    level = logging.ERROR if result.status == "failed" else logging.INFO
    log.log(level, "%s %s: read=%d rejected=%d inserted=%d updated=%d duplicate=%d (%.2fs)%s",
            result.status, result.file, result.records_read, result.records_rejected, result.rows_inserted,
            result.rows_updated, result.rows_duplicate, result.seconds,
            f" - {result.error}" if result.error else "", extra=fields)


class _Progress:
    """Progress bars on a terminal (tqdm): the file being read and all files, by bytes."""

    def __init__(self, files: list[DataFile]) -> None:
        from tqdm import tqdm

        self.sizes = {df.rel: _size_or_zero(df.path) for df in files}
        columns, lines = _terminal_size()
        size = {"ncols": columns, "nrows": lines, "file": sys.stderr}
        self.overall = tqdm(total=sum(self.sizes.values()), unit="B", unit_scale=True, desc="all files",
                            position=0, **size)
        self.current = tqdm(total=0, unit="B", unit_scale=True, position=1, leave=False, **size)
        self.stats: _FileStats | None = None
        self._stop = threading.Event()
        self._ticker = threading.Thread(target=self._tick, name="progress", daemon=True)
        self._ticker.start()

    def file_started(self, df: DataFile, stats: _FileStats) -> None:
        self.stats = stats
        self.current.reset(total=self.sizes.get(df.rel, 0))
        self.current.set_description_str(df.rel, refresh=False)

    def file_done(self, rel: str) -> None:
        self.stats = None
        self.overall.update(self.sizes.get(rel, 0))

    def _tick(self) -> None:
        while not self._stop.wait(0.2):
            stats = self.stats
            if stats is not None:
                self.current.n = min(stats.digest.size, self.current.total or stats.digest.size)
                self.current.set_postfix_str(f"{stats.read:,} records", refresh=False)
                self.current.refresh()

    def close(self) -> None:
        self._stop.set()
        self._ticker.join()
        self.current.close()
        self.overall.close()

    @staticmethod
    def write(text: str) -> None:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr)


def _terminal_size() -> tuple[int, int]:
    """Columns and lines of stderr's terminal; one that reports no size (0x0) gets 100x24."""
    try:
        columns, lines = os.get_terminal_size(sys.stderr.fileno())
    except (OSError, ValueError):
        columns = lines = 0
    return (columns if columns >= 40 else 100), (lines if lines >= 4 else 24)


def _size_or_zero(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _load_sequential(cfg: Config, run_id: int, files: list[DataFile], summary: Summary,
                     progress: _Progress | None, known: dict) -> None:
    loader = _Loader(cfg, run_id, progress, known)
    try:
        for df in files:
            if _Stop.signum is not None:
                raise Interrupted(_Stop.signum)
            _report(summary, loader.load(df), progress)
    finally:
        loader.close()


def _check_files(cfg: Config, files: list[DataFile], summary: Summary, progress: _Progress | None) -> None:
    """--dry-run: read and validate every file, write rejects, touch no database."""
    rejects, make_line = _RejectLog(cfg.reject_file, None), _LineMaker(cfg.source_tz)
    try:
        for df in files:
            if _Stop.signum is not None:
                raise Interrupted(_Stop.signum)
            stats, started = _FileStats(), time.monotonic()
            if progress is not None:
                progress.file_started(df, stats)
            try:
                for _ in _valid_lines(df, make_line, rejects, stats):
                    pass
            except FileFormatError as exc:
                rejects.discard()
                rejects.add(df.rel, None, f"file failed: {exc}")
                result = FileResult(df.rel, "failed", error=str(exc))
            else:
                result = FileResult(df.rel, "checked", stats.read, stats.rejected, rows_duplicate=stats.repeated)
                _quality_warnings(df, stats)
            rejects.publish()
            result.seconds = round(time.monotonic() - started, 3)
            _report(summary, result, progress)
    finally:
        rejects.close()


_WORKER: _Loader | None = None


def _worker_init(cfg: Config, run_id: int, known: dict) -> None:
    global _WORKER
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _setup_logging(cfg.log_level, cfg.log_format, None)
    _WORKER = _Loader(cfg, run_id, None, known)


def _worker_load(df: DataFile) -> FileResult:
    return _WORKER.load(df)


def _load_parallel(cfg: Config, run_id: int, files: list[DataFile], summary: Summary,
                   progress: _Progress | None, known: dict) -> None:
    """Hand files to worker processes; each claims its file through the same database lock."""
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    todo = iter(files)
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(cfg.workers, mp_context=context, initializer=_worker_init,
                             initargs=(cfg, run_id, known)) as pool:
        pending = {}

        def submit_next() -> None:
            df = next(todo, None) if _Stop.signum is None else None
            if df is not None:
                pending[pool.submit(_worker_load, df)] = df

        for _ in range(cfg.workers):
            submit_next()
        while pending:
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                del pending[future]
                _report(summary, future.result(), progress)
                submit_next()
    if _Stop.signum is not None and len(summary.files) < len(files):
        raise Interrupted(_Stop.signum)


def _run(cfg: Config, summary: Summary) -> None:
    _RejectLog(cfg.reject_file, None).close()  # fail early (exit 2) if it cannot be written
    if cfg.dry_run:
        _with_progress(cfg, summary, lambda files, progress: _check_files(cfg, files, summary, progress))
        return
    conn = connect_db(cfg.conninfo, describe=cfg.describe_db())
    try:
        if cfg.bootstrap:
            try:
                apply_schema(conn, SCHEMA_PATH.read_text(encoding="utf-8"))
            except _psycopg2().Error as exc:
                raise DatabaseError(f"cannot apply {SCHEMA_PATH.name}: {_first_line(exc)}") from None
        try:
            summary.run_id = _start_run(conn, cfg)
        except _psycopg2().Error as exc:
            raise DatabaseError(f"cannot start the run: {_first_line(exc)}") from None
        try:
            known = _manifest(conn)

            def load(files: list[DataFile], progress: _Progress | None) -> None:
                parallel = cfg.workers > 1 and len(files) > 1
                (_load_parallel if parallel else _load_sequential)(cfg, summary.run_id, files, summary, progress,
                                                                   known)

            _with_progress(cfg, summary, load)
        finally:
            _finish_run(cfg, conn, summary)
    finally:
        if not conn.closed:
            conn.close()


def _manifest(conn) -> dict:
    with conn.cursor() as cur:
        cur.execute("SELECT path, size, mtime_ns, status, error FROM ingest_files")
        known = {path: tuple(rest) for path, *rest in cur.fetchall()}
    conn.commit()
    return known


def _with_progress(cfg: Config, summary: Summary, work: Callable) -> None:
    """List the files, run ``work(files, progress)``, and settle the summary's status."""
    files = list(load_files(cfg.data_dir))
    progress = _Progress(files) if cfg.progress else None
    _LOG_HANDLER.progress = progress
    try:
        work(files, progress)
        summary.status = "rejects" if summary.files_failed or summary.records_rejected else "ok"
    except (Interrupted, KeyboardInterrupt) as exc:
        summary.status, summary.error = "interrupted", str(exc) or "stopped by a second signal"
        raise
    except BaseException as exc:
        summary.status, summary.error = "failed", str(exc) or type(exc).__name__
        raise
    finally:
        _LOG_HANDLER.progress = None
        if progress is not None:
            progress.close()
        summary.files.sort(key=lambda f: f.file)


# --- logging ----------------------------------------------------------------------------------
class _JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, message, and the record's structured fields."""

    def format(self, record: logging.LogRecord) -> str:
        data = {"time": dt.datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
                "level": record.levelname.lower(), "message": record.getMessage()}
        data.update(getattr(record, "fields", None) or {})
        if record.exc_info:
            data["traceback"] = self.formatException(record.exc_info)
        return json.dumps(data, ensure_ascii=False, default=str)


class _Handler(logging.StreamHandler):
    """stderr, written around the progress bars while they are shown."""

    progress: _Progress | None = None

    def emit(self, record: logging.LogRecord) -> None:
        if self.progress is None:
            super().emit(record)
            return
        try:
            self.progress.write(self.format(record))
        except Exception:  # noqa: BLE001 (logging must never raise)
            self.handleError(record)


_LOG_HANDLER = _Handler()


def _setup_logging(level: str, fmt: str, progress: _Progress | None) -> None:
    global _LOG_HANDLER
    _LOG_HANDLER = _Handler(sys.stderr)  # a new one: sys.stderr may have been replaced since
    _LOG_HANDLER.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    _LOG_HANDLER.progress = progress
    for handler in [h for h in log.handlers if isinstance(h, _Handler)]:
        log.removeHandler(handler)
    log.addHandler(_LOG_HANDLER)  # on the "ingest" logger only: an embedding program keeps its own
    log.setLevel(level)


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        number = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
    return number


def _non_negative_int(text: str) -> int:
    return 0 if text.strip() == "0" else _positive_int(text)


def _choice(*allowed: str) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text.lower() not in allowed:
            raise argparse.ArgumentTypeError(f"{text!r} is not one of {', '.join(allowed)}")
        return text.lower()

    return parse


# (flag, environment variable, parser, help). Defaults live in DEFAULTS, keyed by the variable.
SETTINGS = (
    ("--data-dir", "DATA_DIR", str, "directory to read, recursively"),
    ("--source-timezone", "SOURCE_TIMEZONE", str, "IANA zone for timestamps without an offset"),
    ("--batch-size", "BATCH_SIZE", _positive_int, "rows handed to COPY at a time"),
    ("--on-conflict", "ON_CONFLICT", _choice("nothing", "update"),
     "existing key: keep the stored row (nothing) or store the new value (update)"),
    ("--workers", "WORKERS", _positive_int, "files loaded in parallel by worker processes"),
    ("--reject-file", "REJECT_FILE", str, "rejected records are appended here, as JSON Lines"),
    ("--connect-timeout", "CONNECT_TIMEOUT", _positive_int, "seconds to wait for the database"),
    ("--statement-timeout", "STATEMENT_TIMEOUT", _non_negative_int,
     "seconds one statement (a file's COPY, say) may run; 0 means no limit"),
    ("--log-level", "LOG_LEVEL", _choice("debug", "info", "warning", "error"), "log level"),
    ("--log-format", "LOG_FORMAT", _choice("text", "json"), "log lines as text, or one JSON object each"),
)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ingest.py",
        description="Load Task-0 Fitbit JSON files into the TimescaleDB hypertable raw_data. "
        "Settings: flag > environment > .env file > default. The database is set by DATABASE_URL, "
        "or POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD, and TLS by "
        "POSTGRES_SSLMODE, POSTGRES_SSLROOTCERT, POSTGRES_SSLCERT, POSTGRES_SSLKEY (environment or .env only, "
        "so the password never shows in a process list).",
        epilog="Also: 'ingest.py status [--json]' shows what the database holds and what the last runs did. "
        "Exit codes: 0 all loaded; 1 some records or files rejected; 2 usage or configuration "
        "error; 3 database unreachable or failed; 130/143 stopped by SIGINT/SIGTERM between files.",
    )
    for flag, env, parse, text in SETTINGS:
        p.add_argument(flag, type=parse, help=f"{text} (env {env}; default {DEFAULTS[env]})")
    p.add_argument("--env-file", help="dotenv file to read settings from (default ./.env, if present)")
    p.add_argument("--summary-json", help="also write the run's counts to this JSON file")
    p.add_argument("--force", action="store_true", help="load every file, even those the manifest "
                   "shows unchanged since their last load")
    p.add_argument("--dry-run", action="store_true", help="read and validate everything, write the reject file "
                   "and summary, touch no database")
    p.add_argument("--no-bootstrap", action="store_true", help="do not apply sql/schema.sql (it must exist already)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _settings(env_file: str | None, environ: dict) -> dict:
    """Environment over .env over defaults (flags are applied on top by the caller)."""
    from dotenv import dotenv_values

    path = Path(env_file or ".env")
    if env_file and not path.is_file():
        raise ConfigError(f"--env-file {env_file}: no such file")
    from_file = {k: v for k, v in dotenv_values(path).items() if v} if path.is_file() else {}
    return {**DEFAULTS, **from_file, **{k: v for k, v in environ.items() if v != ""}}


def _resolve_config(args: argparse.Namespace, environ: dict) -> Config:
    s = _settings(args.env_file, environ)
    values = {}
    for flag, env, parse, _ in SETTINGS:
        given = getattr(args, flag[2:].replace("-", "_"))
        if given is not None:
            values[env] = given
            continue
        try:
            values[env] = parse(s[env])
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{env}: {exc}") from None
    try:
        port = _positive_int(s["POSTGRES_PORT"])
    except argparse.ArgumentTypeError as exc:
        raise ConfigError(f"POSTGRES_PORT: {exc}") from None
    data_dir = Path(values["DATA_DIR"])
    if not data_dir.is_dir():
        raise ConfigError(f"DATA_DIR {data_dir} is not a directory")
    level = "DEBUG" if args.verbose else "WARNING" if args.quiet else values["LOG_LEVEL"].upper()
    conninfo = _conninfo(s, values["CONNECT_TIMEOUT"], port)
    if values["STATEMENT_TIMEOUT"]:
        conninfo["options"] = f"-c statement_timeout={values['STATEMENT_TIMEOUT'] * 1000}"
    return Config(
        conninfo=conninfo,
        data_dir=data_dir,
        source_tz=_timezone(values["SOURCE_TIMEZONE"]),
        batch_size=values["BATCH_SIZE"],
        reject_file=Path(values["REJECT_FILE"]),
        log_level=level,
        on_conflict=values["ON_CONFLICT"],
        workers=values["WORKERS"],
        force=args.force,
        bootstrap=not args.no_bootstrap,
        dry_run=args.dry_run,
        progress=not args.quiet and values["LOG_FORMAT"] == "text" and sys.stderr.isatty(),
        log_format=values["LOG_FORMAT"],
    )


def _conninfo(s: dict, timeout: int, port: int) -> dict:
    conninfo: dict = {"connect_timeout": timeout}
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):  # libpq's TLS settings, if given
        if s.get(f"POSTGRES_{key.upper()}"):
            conninfo[key] = s[f"POSTGRES_{key.upper()}"]
    if s.get("DATABASE_URL"):
        conninfo["dsn"] = s["DATABASE_URL"]
    else:
        conninfo.update(host=s["POSTGRES_HOST"], port=port, dbname=s["POSTGRES_DB"],
                        user=s["POSTGRES_USER"], password=s["POSTGRES_PASSWORD"])
    return conninfo


def _timezone(name: str) -> dt.tzinfo:
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"SOURCE_TIMEZONE: unknown time zone {name!r} (use an IANA name such as Europe/Berlin)") from None


def _write_summary(path: Path, summary: Summary) -> None:
    data = dataclasses.asdict(summary)
    data["host"] = socket.gethostname()
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot write the summary %s: %s", path, exc.strerror or exc)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return _status_main(argv[1:])
    args = _parser().parse_args(argv)  # exits 2 on bad flags, before any I/O
    _setup_logging("DEBUG" if args.verbose else "INFO", "text", None)
    started = time.monotonic()
    summary = Summary()
    _Stop.install()
    cfg = None
    try:
        cfg = _resolve_config(args, dict(os.environ))
        _setup_logging(cfg.log_level, cfg.log_format, None)
        _run(cfg, summary)
        code = EXIT_REJECTS if summary.status == "rejects" else EXIT_OK
    except (IngestError, KeyboardInterrupt) as exc:
        if isinstance(exc, KeyboardInterrupt):  # a second signal: the file in flight was rolled back
            exc = Interrupted(_Stop.signum or signal.SIGINT)
        if summary.status == "running":
            summary.status, summary.error = "failed", str(exc)
        code = exc.exit_code
        _report_error(exc, code, cfg, args.verbose)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else signal.SIG_DFL)
    summary.seconds = round(time.monotonic() - started, 3)
    if code != EXIT_USAGE:
        log.log(logging.WARNING if code else logging.INFO, "summary: %s", summary.line(),
                extra={"fields": {**summary.fields(), "exit_code": code}})
    if args.summary_json:
        _write_summary(Path(args.summary_json), summary)
    return code


def _report_error(exc: IngestError, code: int, cfg: Config | None, verbose: bool) -> None:
    """One line on stderr (a JSON log line with --log-format json); a traceback only if verbose."""
    if cfg is not None and cfg.log_format == "json":
        log.error("%s", exc, exc_info=verbose, extra={"fields": {"event": "error", "exit_code": code,
                                                                 "hint": exc.hint or None}})
        return
    if verbose:
        log.exception("error")
    print(f"error: {exc}", file=sys.stderr)
    if exc.hint:
        print(f"hint: {exc.hint}", file=sys.stderr)


# --- ingest.py status --------------------------------------------------------------------------
_STATUS_QUERIES = {
    "data": 'SELECT metric, user_id, count(*), min("timestamp"), max("timestamp") FROM raw_data '
            "GROUP BY metric, user_id ORDER BY metric, user_id",
    "runs": "SELECT run_id, started_at, finished_at, status, host, files_seen, files_loaded, files_skipped, "
            "files_failed, records_read, records_rejected, rows_inserted, rows_updated, rows_duplicate, error "
            "FROM ingest_runs ORDER BY run_id DESC LIMIT %(limit)s",
    "failed_files": "SELECT path, error, run_id, loaded_at FROM ingest_files WHERE status = 'failed' "
                    "ORDER BY run_id DESC NULLS LAST, path",
}


def _status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ingest.py status", description="Show what raw_data holds (rows, first "
                                "and last timestamp per metric and user), the last runs, and the files whose "
                                "last load failed, with the run that tried. Database settings as for a load.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--runs", type=_positive_int, default=10, help="how many recent runs to show (default 10)")
    p.add_argument("--env-file", help="dotenv file to read settings from (default ./.env, if present)")
    args = p.parse_args(argv)
    _setup_logging("WARNING", "text", None)
    try:
        s = _settings(args.env_file, dict(os.environ))
        try:
            timeout, port = _positive_int(s["CONNECT_TIMEOUT"]), _positive_int(s["POSTGRES_PORT"])
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(str(exc)) from None
        info = _conninfo(s, timeout, port)
        report = _status_report(connect_db(info, describe=_describe(info)), args.runs)
    except IngestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    print(json.dumps(report, indent=2, default=str) if args.json else _status_text(report))
    return EXIT_OK


def _status_report(conn, runs: int) -> dict:
    psycopg2 = _psycopg2()
    report = {}
    try:
        with conn.cursor() as cur:
            for name, sql in _STATUS_QUERIES.items():
                cur.execute(sql, {"limit": runs})
                columns = [c.name for c in cur.description]
                report[name] = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    except psycopg2.errors.UndefinedTable as exc:
        raise DatabaseError(f"{_first_line(exc)}: nothing loaded here yet (run the loader once)") from None
    except psycopg2.Error as exc:
        raise DatabaseError(_first_line(exc)) from None
    finally:
        conn.close()
    return report


def _status_text(report: dict) -> str:
    def stamp(value) -> str:
        return value.strftime("%Y-%m-%d %H:%M:%S%z") if value else "-"

    data = [[r["metric"], r["user_id"], f"{r['count']:,}", stamp(r["min"]), stamp(r["max"])] for r in report["data"]]
    runs = [[r["run_id"], stamp(r["started_at"]), r["status"], r["files_loaded"], r["files_skipped"],
             r["files_failed"], f"{r['records_read']:,}", f"{r['records_rejected']:,}", f"{r['rows_inserted']:,}",
             f"{r['rows_updated']:,}", f"{r['rows_duplicate']:,}"] for r in report["runs"]]
    failed = [[r["path"], r["run_id"], (r["error"] or "")[:100]] for r in report["failed_files"]]
    return "\n".join([
        "raw_data", _table(["metric", "user_id", "rows", "first", "last"], data), "",
        "recent runs", _table(["run", "started", "status", "loaded", "skipped", "failed", "read", "rejected",
                               "inserted", "updated", "duplicate"], runs), "",
        "files that failed (and have not loaded since)", _table(["file", "run", "error"], failed),
    ])


def _table(headers: list[str], rows: list[list]) -> str:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    lines = [line.rstrip() for line in lines]
    return "\n".join(lines) if rows else lines[0] + "\n(none)"


if __name__ == "__main__":
    raise SystemExit(main())
