#!/usr/bin/env python3
"""Load Task-0's Fitbit JSON files into the TimescaleDB hypertable ``raw_data``.

Reads every ``*.json`` / ``*.jsonl`` / ``*.ndjson`` file (and ``.gz`` versions) under DATA_DIR in
sorted path order, streams and validates each record, and loads the valid ones with COPY. A file
is the unit of work: it is claimed, read, validated, inserted and recorded in the file manifest in
one transaction (a file spanning more than PART_CHUNKS chunks commits every PART_CHUNKS chunks,
resuming where it stopped). Existing rows are never overwritten (unless ``--on-conflict update``);
within a run the first record of a key (files in sorted path order, records in file order) wins.
One file's problem is that file's problem: it fails alone, with its reason, and the run goes on.

Exit codes: 0 all loaded; 1 finished, but records or files were rejected or are not loaded;
2 usage or configuration error; 3 database unreachable or unusable; 130/143 stopped by a signal.
"""

# ---------------------------------------------------------------------------------------------
# Imports
# ---------------------------------------------------------------------------------------------
from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import functools
import gc
import io
import itertools
import json
import logging
import math
import operator
import os
import queue
import re
import select
import signal
import stat
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

# Imported where first needed, so that a run that finds nothing new starts without them:
# msgspec (the first file read), tempfile (the first spool), zoneinfo (a time zone other than
# UTC), psycopg2 (the first connection), gzip and csv (a .gz file, a Takeout CSV file).
# dataclasses is not used: importing it costs about 10 ms.

__all__ = ["connect_db", "insert_records", "load_files", "main", "validate_record"]
__version__ = "0.2.0"

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
MAX_NESTING = 1000  # deeper JSON is refused (Python's decoder would run out of stack)
DEDUPE_MAX_KEYS = 200_000  # keys remembered per file to drop in-file repeats before COPY (~45 MB)
REJECT_RECORD_CHARS = 1000  # a rejected record is quoted up to this many characters
READ_CHUNK_CHARS = 1 << 20  # characters read from a file at a time
# When this much of a JSON array is left to read as its repeats start being settled in bulk, the
# far half of what is left is settled by a helper process on the second core (see _FarHalf).
FAR_HALF_MIN_BYTES = 64 << 20
# A transaction that writes into many chunks holds a lock on each chunk and its index; under
# PostgreSQL's defaults (64 locks per transaction x 100 connections, shared) a file spanning
# thousands of days would run out of shared memory. Such a file commits every PART_CHUNKS chunks.
PART_CHUNKS = 100
SCHEMA_PATH = Path(__file__).resolve().parent / "sql" / "schema.sql"
SCHEMA_LOCK_KEY = 0x46_49_54_42  # transaction advisory lock held while the schema is applied ("FITB")
CLAIM_WAIT_MS = 200  # how long a first claim waits for a file another loader holds
CLAIM_WAIT_AGAIN_MS = 30_000  # at the end of a run, how long it waits for a file that was busy
# Transient database errors (connection lost or stalled, restart, deadlock, serialization
# failure): a file is retried this many times, waiting 0.5, 1, 2, 4, 8, 8, 8 s in between.
RETRY_ATTEMPTS, RETRY_FIRST_DELAY, RETRY_MAX_DELAY = 8, 0.5, 8.0
HEARTBEAT_SECONDS = 30  # a running run touches its ingest_runs row at most this often, between files
STALE_RUN_MINUTES = 15  # a 'running' run silent for this long is marked 'interrupted' by the next run
STOP_GRACE_SECONDS = 5.0  # after a first signal, a database call silent this long is cancelled
END_GRACE_SECONDS = 1.0  # the same for the calls that end a run (its record, the last commit)
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
    "STALL_TIMEOUT": "120",
    "DATA_DIR": "./Task-0/extracted_data",
    "SOURCE_TIMEZONE": "UTC",
    "BATCH_SIZE": "2000",
    "ON_CONFLICT": "nothing",
    "WORKERS": "1",
    "REJECT_FILE": "./rejects/rejects.jsonl",
    "LOG_LEVEL": "INFO",
    "LOG_FORMAT": "text",
    "FORMAT": "auto",
    "USER_ID": "",
}

UTC = dt.UTC


class Config(NamedTuple):
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
    statement_timeout: int = 0  # seconds; 0 = none
    stall_timeout: int = 120  # seconds a database call may go without progress
    source_format: str = "auto"  # auto | flat | fitbit-takeout | fitbit-api
    user_id: str | None = None  # for Fitbit files (they carry none); None: derived from the directory

    def describe_db(self) -> str:
        return _describe(self.conninfo)


def _describe(info: dict) -> str:
    """Where the database is, for messages; never includes the password."""
    if "dsn" in info:
        parsed = _parse_dsn(info["dsn"])
        return f"{parsed.get('host', 'localhost')}:{parsed.get('port', '5432')}/{parsed.get('dbname', '')} " \
               f"as {parsed.get('user', '')}"
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
    """The file's bytes cannot be read as records (bad JSON, encoding, size): skipped until it changes."""

    exit_code = EXIT_REJECTS


class FileReadError(IngestError):
    """The file cannot be read now (permissions, I/O): retried on every run."""

    exit_code = EXIT_REJECTS


class DatabaseError(IngestError):
    exit_code = EXIT_DATABASE


class ConnectError(DatabaseError):
    """The server could not be reached (or refused the login)."""


class RowsDroppedError(DatabaseError):
    """The database stored fewer of a file's rows than were sent and not because they were there
    already (a trigger or rule on raw_data declined them): that file fails alone, tried again."""


class RejectFileError(IngestError):
    """Rejects cannot be written (disk full, permissions): the file in flight is rolled back."""

    exit_code = EXIT_USAGE


class Interrupted(IngestError):
    def __init__(self, signum: int, how: str = "between files") -> None:
        super().__init__(f"stopped by {signal.Signals(signum).name} {how}")
        self.exit_code = 128 + signum


# ---------------------------------------------------------------------------------------------
# Record model and pure validation
# ---------------------------------------------------------------------------------------------
class Row(NamedTuple):
    user_id: str
    metric: str
    timestamp: dt.datetime  # aware, UTC
    value: float


class Unparsable(NamedTuple):
    """A JSON Lines line that is not JSON: rejected like an invalid record."""

    reason: str
    text: str


class _Float(float):
    """A JSON number decoded carefully: remembers its text, for reasons quoted as written."""

    text: str


class _Unstorable(NamedTuple):
    """A JSON number no double can hold (it overflows, or underflows to zero)."""

    text: str
    problem: str


class _DuplicateKey(NamedTuple):
    """An object that names the same key twice: ambiguous, so rejected rather than guessed."""

    key: str


# Extended ISO 8601 calendar date and time; the offset is optional (naive = SOURCE_TIMEZONE).
_TIMESTAMP_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:[.,]\d+)?)?(Z|z|[+-]\d{2}(?::?\d{2})?)?",
    re.ASCII,
)
_DATE_ONLY_RE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_OFFSET_RE = re.compile(r"[+-](\d{2}):?(\d{2})?", re.ASCII)


def _json_type(obj: object) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "boolean"
    if isinstance(obj, (int, float, _Unstorable)):
        return "number"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, list):
        return "array"
    return "object" if isinstance(obj, (dict, _DuplicateKey)) else type(obj).__name__


def _shown(obj: object, limit: int = 60) -> str:
    """A value as JSON text, cut at ``limit`` characters, for a reason."""
    if isinstance(obj, (_Float, _Unstorable)):
        text = obj.text
    else:
        try:
            text = json.dumps(obj, ensure_ascii=False)
        except (TypeError, ValueError, RecursionError):
            text = repr(obj)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


def _check_user_id(user_id: object) -> str:
    if type(user_id) is not str:
        raise ValidationError(f"user_id must be a string, got {_json_type(user_id)} {_shown(user_id)}")
    if not user_id.strip():
        raise ValidationError(f"user_id is empty or blank: {_shown(user_id)}")
    if len(user_id) > MAX_USER_ID_CHARS:
        raise ValidationError(f"user_id is {len(user_id)} characters long (at most {MAX_USER_ID_CHARS})")
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
        raise ValidationError(f"metric must be a string, got {_json_type(metric)} {_shown(metric)}")
    if metric in METRICS:
        return metric
    hint = metric.strip().lower()
    if hint in METRICS:
        raise ValidationError(f"unknown metric {_shown(metric, 50)} (did you mean {hint!r}?)")
    raise ValidationError(f"unknown metric {_shown(metric, 50)} (expected one of {', '.join(sorted(METRICS))})")


def _localize(naive: dt.datetime, tz: dt.tzinfo, text: str) -> dt.datetime:
    """Attach ``tz`` to a wall-clock time, refusing times a DST change makes ambiguous or void."""
    first, second = naive.replace(tzinfo=tz), naive.replace(tzinfo=tz, fold=1)
    if first.utcoffset() != second.utcoffset():
        back = first.astimezone(UTC).astimezone(tz).replace(tzinfo=None)
        if back != naive:
            raise ValidationError(f"timestamp {_shown(text)} does not exist in {tz} (skipped by a DST change)")
        raise ValidationError(f"timestamp {_shown(text)} is ambiguous in {tz} (repeated by a DST change)")
    return first


def _check_timestamp(text: object, tz: dt.tzinfo) -> dt.datetime:
    if type(text) is not str:
        raise ValidationError(f"timestamp must be an ISO 8601 string, got {_json_type(text)} {_shown(text)}")
    match = _TIMESTAMP_RE.fullmatch(text)
    if not match:
        if _DATE_ONLY_RE.fullmatch(text):
            raise ValidationError(f"timestamp {_shown(text)} is a date without a time of day")
        raise ValidationError(
            f"timestamp {_shown(text)} is not ISO 8601 (expected YYYY-MM-DDTHH:MM:SS[.f][±HH:MM])")
    offset = _OFFSET_RE.fullmatch(match.group(1) or "")
    if offset and (int(offset.group(1)) > 23 or int(offset.group(2) or 0) > 59):
        raise ValidationError(f"timestamp {_shown(text)} has a UTC offset outside -23:59..+23:59")
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise ValidationError(f"timestamp {_shown(text)} is not a real date and time ({exc})") from None
    try:
        if parsed.tzinfo is None:
            if tz is UTC:
                return parsed.replace(tzinfo=UTC)
            parsed = _localize(parsed, tz, text)
        return parsed.astimezone(UTC)
    except OverflowError:
        raise ValidationError(f"timestamp {_shown(text)} is outside years 1..9999 in UTC") from None


def _check_value(value: object, metric: str) -> float:
    kind = type(value)
    if kind is _Unstorable:
        raise ValidationError(f"value {_shown(value)} {value.problem}")
    if kind is not float and kind is not int and kind is not _Float:  # bool (an int) is excluded here
        raise ValidationError(f"value must be a number, got {_json_type(value)} {_shown(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValidationError(f"value {_shown(value)} is too large for a double precision number") from None
    if not math.isfinite(number):
        raise ValidationError(f"value {_shown(value)} is not a finite number")
    low, high = METRIC_BOUNDS[metric]
    if not low <= number <= high:
        raise ValidationError(
            f"value {_shown(value)} is outside the plausible range for {metric} ({low:g}..{high:g})")
    return number


def validate_record(obj: object, tz: dt.tzinfo = UTC) -> Row:
    """Check one decoded JSON value and return it as a Row; raise ValidationError otherwise.

    Pure: no I/O. Keys other than the four required ones are ignored (the loader counts them and
    says so once per file), so a producer adding a field does not make every record a reject.
    """
    if type(obj) is _DuplicateKey:
        raise ValidationError(f"key {obj.key!r} appears more than once in the record (ambiguous)")
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


Key = tuple[str, str, str]  # a row's key as its COPY text: escaped user_id, metric, UTC timestamp


def _copy_key(row: Row) -> Key:
    """The key of a row as COPY text (user_id escaped; the others hold no specials)."""
    return row.user_id.translate(_COPY_ESCAPES), row.metric, row.timestamp.isoformat()


def _line(key: Key, tail: str) -> str:
    """The COPY line of a row: its key and its value part ("\t<value>\n")."""
    return f"{key[0]}\t{key[1]}\t{key[2]}{tail}"


def _copy_line(row: Row) -> str:
    """One row as a line of COPY text format (what ``insert_records`` takes)."""
    return _line(_copy_key(row), f"\t{row.value!r}\n")


class _LineMaker:
    """Record -> the key (escaped user, metric, UTC timestamp) and the value part of its COPY line:
    a cache in front of validate_record.

    Each field is checked by the function validate_record uses for it, and what repeats across
    records (users, timestamps, values) is remembered (bounded), so the common case is a few dict
    look-ups. A canonical UTC timestamp ("YYYY-MM-DDTHH:MM:SS", with "Z", "+00:00" or naive in
    UTC) is read by a shortcut that tests/test_lines.py proves gives what validate_record gives.
    A record that fails any check goes through validate_record itself, which supplies the reason.
    """

    def __init__(self, tz: dt.tzinfo) -> None:
        self.tz = tz
        self.users: dict[str, str] = {}  # accepted user_id -> its escaped COPY text
        self.stamps: dict[str, tuple[str, int]] = {}  # timestamp text -> (UTC text, epoch seconds)
        self.values: dict[float, str] = {}  # number within its metric's bounds -> "\t<repr>\n"

    def __call__(self, obj: object) -> tuple[Key, str, int]:
        """(key, tail, epoch seconds) of a valid record; raises ValidationError otherwise. Its COPY
        line is _line(key, tail)."""
        if type(obj) is dict:
            user, metric, ts, value = (obj.get("user_id"), obj.get("metric"), obj.get("timestamp"),
                                       obj.get("value"))
        else:
            try:  # the fast decoder's Record: the four keys, three of them strings
                user, metric, ts, value = obj.user_id, obj.metric, obj.timestamp, obj.value
            except AttributeError:  # any other JSON value, or an Unparsable line
                user = None
        if type(user) is str and type(metric) is str and type(ts) is str:
            escaped = self.users.get(user) or self._user(user)
            stamp = self.stamps.get(ts) or self._stamp(ts)
            kind, bounds = type(value), METRIC_BOUNDS.get(metric)
            if bounds is None:
                tail = None
            elif (kind is float or kind is int) and value and bounds[0] <= value <= bounds[1]:
                tail = self.values.get(value) or self._tail(metric, value)  # the common case
            else:
                tail = self._tail(metric, value)
            if escaped and stamp and tail:
                return (escaped, metric, stamp[0]), tail, stamp[1]
        validate_record(_plain(obj), self.tz)  # raises the reason for the reject
        raise AssertionError(f"validate_record accepted what its own checks refused: {obj!r}")

    def tails(self, metric: str, values: list) -> list[str] | None:
        """The value parts of a decoded window's numbers, in bulk (a call only for a number not in
        the cache above), when the window's one metric is known and every number is valid for it.
        None otherwise (the records then go one by one, for the reasons)."""
        bounds = METRIC_BOUNDS.get(metric)
        if bounds is None or not (bounds[0] <= min(values) and max(values) <= bounds[1]):
            return None
        tails = list(map(self.values.get, values))  # (a zero is never cached)
        if None in tails:
            tails = [tail or self._tail(metric, value) for tail, value in zip(tails, values)]
            if None in tails:
                return None
        return tails

    def stamps_of(self, texts: list) -> list[tuple[str, int]] | None:
        """(UTC text, epoch seconds) of a decoded window's timestamps, in bulk: from the cache
        above, else, when all are written exactly as "YYYY-MM-DDTHH:MM:SS" followed by "Z" (as
        Fitbit's sources are mapped), or all without it in UTC (each read by
        ``datetime.fromisoformat`` and written back the same), computed as _stamp's shortcut does;
        else one by one through _stamp. None if any is not valid."""
        stamps = list(map(self.stamps.get, texts))
        if None not in stamps:
            return stamps
        bodies = self._utc_bodies(texts)
        if bodies is not None:
            try:
                moments = list(map(dt.datetime.fromisoformat, bodies))
            except (ValueError, TypeError):
                moments = None
            if (moments is not None and set(map(_TZINFO_OF, moments)) == {None}
                    and list(map(dt.datetime.isoformat, moments)) == bodies):
                epochs = map(operator.floordiv, map(operator.sub, moments, itertools.repeat(_EPOCH)),
                             itertools.repeat(_SECOND))
                stamps = list(zip(map(operator.add, bodies, itertools.repeat("+00:00")), epochs))
                if len(self.stamps) + len(texts) > 100_000:
                    self.stamps.clear()
                self.stamps.update(zip(texts, stamps))
                return stamps
        stamps = [stamp or self._stamp(text) for stamp, text in zip(stamps, texts)]
        return None if None in stamps else stamps

    def _utc_bodies(self, texts: list) -> list | None:
        """The texts without their "Z" when every one ends in it; the texts themselves when the
        zone is UTC (naive ones are UTC then); else None."""
        try:
            if all(map(_ENDS_IN_Z, texts)):
                return list(map(_ALL_BUT_LAST, texts))
        except (AttributeError, TypeError):  # not a string
            return None
        return texts if self.tz is UTC else None

    def _user(self, user: str) -> str | None:
        try:
            _check_user_id(user)
        except ValidationError:
            return None
        if len(self.users) >= 100_000:
            self.users.clear()
        escaped = self.users[user] = user.translate(_COPY_ESCAPES)
        return escaped

    def _stamp(self, ts: str) -> tuple[str, int] | None:
        match = _CANONICAL_UTC.fullmatch(ts)
        if match and (match.group(2) or self.tz is UTC):
            try:
                moment = dt.datetime.fromisoformat(match.group(1))
            except ValueError:
                return None
            stamp = (f"{match.group(1)}+00:00", (moment - _EPOCH) // _SECOND)
        else:
            try:
                moment = _check_timestamp(ts, self.tz)
            except ValidationError:
                return None
            stamp = (moment.isoformat(), int(moment.timestamp()))
        if len(self.stamps) >= 100_000:  # ~15 MB; a day of one-second readings fits
            self.stamps.clear()
        self.stamps[ts] = stamp
        return stamp

    def _tail(self, metric: str, value: object) -> str | None:
        try:
            tail = f"\t{_check_value(value, metric)!r}\n"
        except ValidationError:
            return None
        kind = type(value)
        # Cached by the number alone (its text does not depend on the metric; the caller checks
        # the metric's bounds before it looks here); 0 == -0.0 == False as keys: never cached.
        if (kind is float or kind is int) and value and len(self.values) < 10_000:
            self.values[value] = tail
        return tail


_USER_OF, _METRIC_OF, _TIMESTAMP_OF = (operator.attrgetter(name) for name in ("user_id", "metric", "timestamp"))
_UTC_TEXT_OF, _EPOCH_OF = operator.itemgetter(0), operator.itemgetter(1)  # of a _LineMaker.stamps entry
_TZINFO_OF = operator.attrgetter("tzinfo")
_ENDS_IN_Z, _ALL_BUT_LAST = operator.methodcaller("endswith", "Z"), operator.itemgetter(slice(-1))
_CANONICAL_UTC = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(Z|\+00:00)?", re.ASCII)
_EPOCH, _SECOND = dt.datetime(1970, 1, 1), dt.timedelta(seconds=1)


# ---------------------------------------------------------------------------------------------
# Reading files (streaming)
# ---------------------------------------------------------------------------------------------
_KINDS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _escape_name(name: str) -> str:
    """A file name as one unambiguous printable line: bytes that are not UTF-8 become \\xNN,
    control characters \\xNN, and a backslash \\\\ (so "\\xff" written in a name stays distinct)."""
    if name.isprintable() and "\\" not in name and name.isascii():
        return name
    out = []
    for char in name:
        code = ord(char)
        if 0xDC80 <= code <= 0xDCFF:  # os.fsdecode's stand-in for an undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif char == "\\":
            out.append("\\\\")
        elif not char.isprintable() or 0xD800 <= code <= 0xDFFF:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(char)
    return "".join(out)


class DataFile(NamedTuple):
    path: Path
    rel: str  # path relative to DATA_DIR, "/" separators, escaped: the name used everywhere
    kind: str  # "json", "jsonl", a Fitbit kind (FITBIT_KINDS), "ignored", or "" (could not be listed)
    gzipped: bool = False
    error: str | None = None  # set when the file (or directory) could not even be listed
    user_id: str | None = None  # for Fitbit files, which carry none

    def records(self, digest: Digest | None = None) -> RecordStream:
        """The file's records, streamed: iterate for (position, value) pairs."""
        return RecordStream(self, digest)


class RecordStream:
    """The records of one file, in batches, plus the text of a record of the batch last yielded.

    ``batches()`` yields (position of the first record, records): a window of an array decoded in
    one call, or a single record. Position is the 1-based record number (the line number in JSON
    Lines); iterating the stream itself yields (position, record) pairs. ``raw(position)`` returns
    the text of a record of the batch last yielded, as written in the file, for rejects and their
    reasons. With ``digest``, every byte read is hashed and counted into it.
    """

    def __init__(self, df: DataFile, digest: Digest | None) -> None:
        self.df, self.digest = df, digest
        self._batch, self._first = _BatchText(""), 0  # the text the last values came from
        self._reader: _HashingReader | None = None  # under the text, while a file that may be split is read
        self._far: _FarHalf | None = None  # the helper settling the far half, until its result is taken

    def raw(self, position: int) -> str:
        if self._batch is None:  # a record a Fitbit reader made: its mapped form is its text
            record = self._records[position - self._first]
            return record.text if type(record) is Unparsable else json.dumps(_plain(record), ensure_ascii=False)
        return self._batch.item(position - self._first)

    def _one(self, position: int, text: str) -> None:
        self._batch, self._first = _BatchText(text, single=True), position

    def __iter__(self) -> Iterator[tuple[int, object]]:
        for first, records in self.batches():
            yield from enumerate(records, first)

    def batches(self) -> Iterator[tuple[int, list]]:
        df = self.df
        try:
            with _open_text(df.path, df.gzipped, self.digest) as text:
                if df.kind == "jsonl":
                    yield from self._lines(text)
                elif df.kind == "json":
                    if type(getattr(text.buffer, "raw", None)) is _HashingReader and text.encoding.startswith("utf-8"):
                        self._reader = text.buffer.raw  # plain bytes on disk: the far half may be split off
                    yield from self._document(_Buffer(text))
                else:
                    yield from self._fitbit(text)
                while text.buffer.read(READ_CHUNK_CHARS):  # bytes after the last record
                    pass
        except (FileFormatError, FileReadError):
            raise
        except (EOFError, UnicodeDecodeError, OSError, *_decompression_errors()) as exc:
            error = FileFormatError if not isinstance(exc, OSError) or _bad_gzip(exc) else FileReadError
            raise error(_describe_read_error(exc, df.gzipped)) from None
        finally:
            self._reader = None
            if self._far is not None:
                self._far.kill()

    def settle_far_half(self, settle: Callable[[list], int | None], example: Callable[[], str | None]) -> None:
        """Called once a window of repeats was settled in bulk: if what is left of the file is large,
        a helper process settles the windows of its far half the same way (``settle``; ``example``
        is the first conflict it noted) while this one reads on up to where that half begins."""
        reader, self._reader = self._reader, None  # one helper per file at most
        if reader is not None and reader.size - reader.done >= FAR_HALF_MIN_BYTES and hasattr(os, "fork"):
            self._far = _FarHalf.fork(reader, settle, example)

    def _far_half_settled(self, buf: _Buffer) -> _Settled | None:
        """At the end of the near half: the helper's result, with the bytes it settled hashed and
        skipped and reading going on after them; None if it failed (reading goes on where the far
        half begins, as if there had been no helper)."""
        far, self._far = self._far, None
        if far.reader.done != far.start:  # the file shrank while it was read
            far.kill()
            raise FileFormatError("file ends inside the JSON array (truncated?)")
        try:
            far.reader.hash_ahead(far.reported)  # rather than wait: the bytes it settles are hashed anyway
            settled = far.join()
        finally:
            far.kill()  # (if the wait was cut short)
        buf.consumed += far.reader.skip_to(far.start if settled is None else settled.end)
        buf.eof = False
        return settled

    # --- JSON: an array of records, or record objects one after another -----------------------
    def _document(self, buf: _Buffer) -> Iterator[tuple[int, list]]:
        first = buf.skip_ws()
        if first == "":
            raise FileFormatError("file is empty (expected a JSON array of records)")
        position = 0
        if first == "[":
            buf.pos += 1
            if buf.skip_ws() == "]":
                buf.pos += 1
            else:
                yield from self._array_items(buf)
            if buf.skip_ws() != "":
                raise FileFormatError(f"unexpected data after the JSON array at {buf.where(buf.pos)}")
            return
        if first != "{":
            value, _ = buf.decode_one()
            raise FileFormatError(f"top-level JSON is a {_json_type(value)}; expected an array of records "
                                  "or a record object")
        while buf.skip_ws() != "":
            position += 1
            value, text = buf.decode_one()
            self._one(position, text)
            yield position, [value]

    def _array_items(self, buf: _Buffer) -> Iterator[tuple[int, list]]:
        position, typed = 0, _typed()
        while True:
            batch = buf.decode_batch(typed.decode_list, _fast_is_exact, typed.errors)
            if batch is not None:
                items, text = batch
                self._batch, self._first = _BatchText(text), position + 1  # split only if asked
                yield position + 1, items
                position += len(items)
                continue
            if buf.skip_ws() == "":
                if self._far is None:
                    raise FileFormatError("file ends inside the JSON array (truncated?)")
                settled = self._far_half_settled(buf)  # the near half ends here: the far one was settled
                if settled is not None and settled.count:
                    yield position + 1, settled
                    position += settled.count
                continue
            position += 1
            value, text = buf.decode_one()
            self._one(position, text)
            yield position, [value]
            if buf.array_ends():
                return

    # --- Fitbit exports and API responses: records mapped from the source's own shape ---------
    def _fitbit(self, text: io.TextIOBase) -> Iterator[tuple[int, list]]:
        """The mapped records in batches, as a JSON array's windows are (_fitbit_batches)."""
        self._batch = None
        for first, records in _fitbit_batches(self.df.kind, text, self.df.user_id or ""):
            self._records, self._first = records, first
            yield first, records

    # --- JSON Lines: one record per line; a bad line is a rejected record ---------------------
    def _lines(self, text: io.TextIOBase) -> Iterator[tuple[int, list]]:
        lineno = 0
        while True:
            line = text.readline(MAX_RECORD_CHARS + 1)
            if not line:
                return
            lineno += 1
            if len(line) > MAX_RECORD_CHARS and not line.endswith("\n"):
                while line and not line.endswith("\n"):  # skip the rest of the oversized line
                    line = text.readline(READ_CHUNK_CHARS)
                self._one(lineno, "")
                yield lineno, [Unparsable(f"line longer than {MAX_RECORD_CHARS} characters", "")]
                continue
            if not line.strip():  # a blank line keeps its number but is not a record
                continue
            line = line.rstrip("\r\n")
            self._one(lineno, line)
            yield lineno, [_decode_line(line)]


def _decode_line(line: str) -> object:
    """One JSON Lines line: the fast decoder when the text shows nothing it could get wrong."""
    typed = _typed()
    try:
        value = typed.decode_one(line)
    except typed.errors:
        pass  # decoded again below, carefully, for the exact reason
    else:
        if _fast_is_exact(line, (value,)):
            return value
    try:
        return _CAREFUL.decode(line)
    except json.JSONDecodeError as exc:
        return Unparsable(f"invalid JSON on this line: {exc.msg} (column {exc.colno})", line)
    except RecursionError:
        where = _deep_nesting_at(line, 0)
        return Unparsable(f"JSON nested more than {MAX_NESTING} levels deep (from column {where + 1})", line)


class _BatchText:
    """The text of one batch of array items; an item's own text is found only when asked."""

    def __init__(self, text: str, single: bool = False) -> None:
        self.text = text
        self.spans: list[tuple[int, int]] | None = [(0, len(text))] if single else None

    def item(self, index: int) -> str:
        if self.spans is None:
            self.spans, pos = [], 0
            while pos < len(self.text):
                pos = _WS.match(self.text, pos).end()
                _, end = _CAREFUL.raw_decode(self.text, pos)
                self.spans.append((pos, end))
                pos = _WS.match(self.text, end).end() + 1  # the comma
        start, end = self.spans[index]
        return self.text[start:end]


def _open_text(path: Path, gzipped: bool, digest: Digest | None) -> io.TextIOWrapper:
    # Non-blocking open, then a check on the opened file: a path swapped for a FIFO after it
    # was listed must not hang the loader.
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise FileReadError("not a regular file (any more)")
    os.set_blocking(fd, True)
    raw = open(fd, "rb", buffering=0)  # noqa: SIM115 (closed through the wrapper)
    try:
        binary: io.BufferedIOBase = io.BufferedReader(
            _HashingReader(raw, digest) if digest else raw, buffer_size=1 << 20)
        if gzipped:
            import gzip  # (imported when needed, like every module only some runs use)

            binary = gzip.GzipFile(fileobj=binary, mode="rb")
        head = binary.peek(4)[:4]
        return io.TextIOWrapper(binary, encoding=_sniff_encoding(head), newline="")
    except BaseException:
        raw.close()
        raise


class Digest:
    """SHA-256 and byte count of a file, computed while it is read; ``progress`` sees each read."""

    def __init__(self, progress: Callable[[int], object] | None = None) -> None:
        import hashlib  # (a run that reads no file does without it)

        self.sha256, self.size, self.progress = hashlib.sha256(), 0, progress

    def hexdigest(self) -> str:
        return self.sha256.hexdigest()


class _HashingReader(io.RawIOBase):
    """The file's bytes, hashed as they are read. With ``limit`` set, reading ends there, for now:
    ``skip_to`` then hashes the bytes up to a later offset without handing them on, and reading
    goes on from there (the far half of a file, settled by a helper: see _FarHalf). ``hash_ahead``
    does that hashing early, while the helper is still at work and this process would only wait."""

    def __init__(self, raw, digest: Digest) -> None:
        self._raw, self._digest = raw, digest
        self.fd = raw.fileno()
        self.size = os.fstat(self.fd).st_size  # when opened
        self.limit: int | None = None
        self._marks: list[tuple[int, object, int]] = []  # (offset, sha256 up to it, characters skipped)

    @property
    def done(self) -> int:
        """Bytes read (or skipped) so far: the offset reading goes on from."""
        return self._digest.size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self.limit is not None:
            buffer = memoryview(buffer)[: max(0, self.limit - self._digest.size)]
        count = self._raw.readinto(buffer)
        if count:
            self._hash(memoryview(buffer)[:count])
        return count

    def hash_ahead(self, ready: Callable[[], bool]) -> None:
        """Until ``ready()``: hash the bytes after those read so far, a chunk at a time, on a copy
        of the digest, keeping its state at each chunk's end. ``skip_to`` then goes on from the
        last of these at or before its ``end`` instead of from here (where the helper stops is
        not known yet: hashing past it costs at most one chunk hashed again)."""
        sha, offset, chars = self._digest.sha256.copy(), self._digest.size, 0
        self._marks = [(offset, sha.copy(), chars)]
        while offset < self.size and not ready():
            chunk = os.pread(self.fd, READ_CHUNK_CHARS, offset)
            if not chunk:
                break
            sha.update(chunk)
            offset, chars = offset + len(chunk), chars + _utf8_chars(chunk)
            self._marks.append((offset, sha.copy(), chars))

    def skip_to(self, end: int) -> int:
        """Hash the bytes up to ``end`` without handing them on, and read on from there. Returns the
        characters they hold (in UTF-8: the bytes that do not continue a character)."""
        chars, marks, self._marks = 0, self._marks, []
        hashed = [mark for mark in marks if self._digest.size <= mark[0] <= end]
        if hashed:  # taken up from the last state hash_ahead kept on the way to end
            offset, sha, chars = hashed[-1]
            skipped, self._digest.sha256, self._digest.size = offset - self._digest.size, sha, offset
            if skipped and self._digest.progress is not None:
                self._digest.progress(skipped)
        while self._digest.size < end:
            chunk = os.pread(self.fd, min(READ_CHUNK_CHARS, end - self._digest.size), self._digest.size)
            if not chunk:
                raise FileFormatError("file ends inside the JSON array (truncated?)")
            self._hash(chunk)
            chars += _utf8_chars(chunk)
        self._raw.seek(end)
        self.limit = None
        return chars

    def _hash(self, data) -> None:
        self._digest.sha256.update(data)
        self._digest.size += len(data)
        if self._digest.progress is not None:
            self._digest.progress(len(data))

    def close(self) -> None:
        self._raw.close()
        super().close()


# Deleting these bytes leaves UTF-8's continuation bytes, 0x80-0xBF (to count characters).
_NOT_CONTINUING = bytes(b for b in range(256) if not 0x80 <= b < 0xC0)


def _utf8_chars(data: bytes) -> int:
    """The characters that whole UTF-8 text holds: its bytes that do not continue a character."""
    return len(data) if data.isascii() else len(data) - len(data.translate(None, _NOT_CONTINUING))


class _Settled(NamedTuple):
    """What a helper settled of a file's far half: ``count`` records, each repeating a key already
    sent, ``conflicting`` of them with another value (``example``: the first such, if it noted one),
    and the byte offset reading goes on from (``end``)."""

    count: int
    conflicting: int
    example: str | None
    end: int


def _fork_helper(work: Callable[[int], None], on_stop: signal.Handlers) -> tuple[int, int] | None:
    """Fork a helper process that runs ``work(fd)``, ``fd`` the write end of a pipe, and ends;
    return (its pid, the read end), or None if no process could be started. The helper logs
    nothing, touches no database, takes no lock the loader's threads may hold and runs no exit
    handlers; SIGINT and SIGTERM get ``on_stop`` there, never the loader's watchdog."""
    pipe = os.pipe()
    stops = {signal.SIGINT, signal.SIGTERM}
    signal.pthread_sigmask(signal.SIG_BLOCK, stops)  # until the helper has its own handlers
    try:
        with warnings.catch_warnings():  # 3.12+: a fork with threads running is deprecated; the
            warnings.simplefilter("ignore", DeprecationWarning)  # helper takes no lock they hold
            pid = os.fork()
    except OSError:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
        for fd in pipe:
            os.close(fd)
        return None
    if pid == 0:
        status = 1
        try:
            os.close(pipe[0])
            signal.set_wakeup_fd(-1)
            for sig in stops:
                signal.signal(sig, on_stop)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
            work(pipe[1])
            status = 0
        finally:
            os._exit(status)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, stops)
    os.close(pipe[1])
    return pid, pipe[0]


class _FarHalf:
    """The far half of a large JSON array, settled by a helper process on the second core.

    Task-0's shape, a day of readings written out again and again with other values, is mostly
    windows whose every record repeats a key already sent, and one thread settles those at about
    100 MB/s. Once such a window was settled and much of the file is left, that rest is cut in two
    at a record boundary: this process reads on up to it (its reader's ``limit``) while a forked
    helper decodes the windows after it, with the same fast decoder and exactness check, and
    settles them with the same function, on its copy of the file's state at the fork (keys and
    first values are only ever added, so what it finds there this process would find too). It
    stops at the first window it cannot settle (a new key, a reject, anything unusual) or at the
    array's last record, and reports where, with how many records it settled and how many of them
    conflicted. This process then hashes the bytes it skipped, counts their records and reads on
    from where the helper stopped. If the helper fails in any way, this process reads the far half
    itself: the helper can only save time.
    """

    def __init__(self, reader: _HashingReader, start: int, pid: int, pipe: int) -> None:
        self.reader, self.start, self._pid = reader, start, pid
        self._pipe: int | None = pipe

    @classmethod
    def fork(cls, reader: _HashingReader, settle: Callable[[list], int | None],
             example: Callable[[], str | None]) -> _FarHalf | None:
        start = _record_start(reader.fd, reader.done + (reader.size - reader.done) * 9 // 20)
        if start is None:
            return None

        def work(fd: int) -> None:
            gc.disable()
            end, count, conflicting = _settle_far_half(reader.fd, start, reader.size, settle)
            report = json.dumps([end, count, conflicting, example()]).encode()
            while report:
                report = report[os.write(fd, report) :]

        forked = _fork_helper(work, signal.SIG_DFL)
        if forked is None:
            return None
        reader.limit = start
        return cls(reader, start, *forked)

    def reported(self) -> bool:
        """Has the helper written its report, or ended? (Then join does not wait.)"""
        return bool(select.select([self._pipe], [], [], 0)[0])

    def join(self) -> _Settled | None:
        """Wait for the helper's report; None if it failed."""
        report = []
        try:
            while chunk := os.read(self._pipe, 1 << 16):
                report.append(chunk)
        finally:
            os.close(self._pipe)
            self._pipe = None
        status, self._pid = os.waitpid(self._pid, 0)[1], 0
        try:
            end, count, conflicting, example = json.loads(b"".join(report))
            if status != 0 or not (self.start <= end <= self.reader.size and 0 <= conflicting <= count):
                return None
        except (ValueError, TypeError):  # no report, or not one the helper writes
            return None
        log.debug("%d records of the far half settled by a helper process", count)
        return _Settled(count, conflicting, example, end)

    def kill(self) -> None:
        """End the helper if it is still there (a file given up, a stop) and reap it."""
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None
        if self._pid:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self._pid, signal.SIGKILL)
            os.waitpid(self._pid, 0)
            self._pid = 0


def _record_start(fd: int, offset: int) -> int | None:
    """The offset of the first array item after ``offset`` that begins a window the fast decoder
    reads exactly (so that it is an item of the array, not text inside a string), or None."""
    data = os.pread(fd, READ_CHUNK_CHARS, offset)
    comma = data.find(b"},")
    begin = len(data) - len(data[comma + 2 :].lstrip(b" \t\r\n")) if comma >= 0 else -1
    if begin < 0 or data[begin : begin + 1] != b"{":
        return None
    typed = _typed()
    window = _decode_window(data, begin, typed.decode_list, _fast_is_exact, typed.errors)
    return None if window is None else offset + begin


def _settle_far_half(fd: int, start: int, size: int, settle: Callable[[list], int | None]) -> tuple[int, int, int]:
    """In the helper: windows from ``start`` read and decoded as the loader's are (_decode_window)
    and settled, until one cannot be (the array's last records make no window). Returns where that
    one begins, and the records settled and conflicting."""
    typed, end, count, conflicting = _typed(), start, 0, 0
    while end < size:
        got = _decode_window(os.pread(fd, READ_CHUNK_CHARS, end), 0, typed.decode_list, _fast_is_exact,
                             typed.errors)
        differ = None if got is None else settle(got[0])
        if differ is None:
            break
        items, window = got
        end, count, conflicting = end + len(window) + 1, count + len(items), conflicting + differ
    return end, count, conflicting


def _file_sha256(path: Path) -> str:
    import hashlib

    with open(path, "rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def _sniff_encoding(head: bytes) -> str:
    """UTF-8 (with or without BOM) is the norm; UTF-16/32 are accepted when a BOM says so."""
    if head.startswith(b"\xef\xbb\xbf"):
        return "utf-8-sig"
    if head.startswith((b"\xff\xfe\x00\x00", b"\x00\x00\xfe\xff")):
        return "utf-32"
    if head.startswith((b"\xff\xfe", b"\xfe\xff")):
        return "utf-16"
    return "utf-8"


def _bad_gzip(exc: BaseException) -> bool:
    gzip = sys.modules.get("gzip")  # not imported: no gzip file was opened
    return gzip is not None and isinstance(exc, (gzip.BadGzipFile, *_decompression_errors()))


def _decompression_errors() -> tuple[type[BaseException], ...]:
    """What a decompressor raises for damaged data that is neither an OSError nor an EOFError
    (zlib.error: bad deflate data in the middle of a .gz file); () while none was imported."""
    zlib = sys.modules.get("zlib")
    return () if zlib is None else (zlib.error,)


def _storable(text: str | None) -> str | None:
    """Text as PostgreSQL's text columns (and psycopg2) take it: a NUL, which no text value can
    hold, written as \\x00, and an unpaired surrogate, which is no UTF-8, as its escape. For
    every reason, name and note the loader stores: they may quote whatever a file holds."""
    if text is None:
        return None
    if "\x00" in text:
        text = text.replace("\x00", "\\x00")
    if not text.isascii():
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return text


def _io_error(exc: OSError) -> FileReadError:
    """An I/O error met while a file was loaded but not in its bytes (a spool on a full disk, say)."""
    return FileReadError(f"I/O error: {exc.strerror or exc}")


def _describe_read_error(exc: BaseException, gzipped: bool) -> str:
    if isinstance(exc, UnicodeDecodeError):
        return f"not valid {exc.encoding} text ({exc.reason} at byte {exc.start})"
    if gzipped and (isinstance(exc, EOFError) or _bad_gzip(exc)):
        return f"not a valid gzip file ({_storable(str(exc))})"
    if isinstance(exc, OSError) and exc.strerror:
        return f"cannot read file: {exc.strerror}"
    return f"cannot read file: {exc}"


# --- JSON decoding: a fast decoder, and a careful one that sees what the fast one cannot -------
def _careful_float(text: str) -> object:
    number = _Float(text)
    if math.isinf(number):
        return _Unstorable(text, "is too large for a double precision number")
    if number == 0.0 and any(c in "123456789" for c in text.split("e")[0].split("E")[0]):
        return _Unstorable(text, "is too small for a double precision number (it would be stored as 0)")
    number.text = text
    return number


def _careful_int(text: str) -> object:
    if len(text.lstrip("-")) > 4000:  # Python refuses to convert more than 4300 digits
        return _Unstorable(text, "is too large for a double precision number")
    return int(text)


def _careful_object(pairs: list[tuple[str, object]]) -> object:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        for key, _ in pairs:
            if key in seen:
                return _DuplicateKey(key)
            seen.add(key)
    return obj


_FAST = json.JSONDecoder()  # for Fitbit's own shapes; records have the typed decoder below
_CAREFUL = json.JSONDecoder(parse_float=_careful_float, parse_int=_careful_int,
                            object_pairs_hook=_careful_object)


class _Typed(NamedTuple):
    """The fast decoder: msgspec, decoding straight into ``Record`` (a msgspec Struct) a window of
    records (``decode_list``) or one line (``decode_one``); ``errors`` are what it raises."""

    Record: type
    decode_list: Callable[[str], list]
    decode_one: Callable[[str], object]
    errors: tuple[type[BaseException], ...]


@functools.cache
def _typed() -> _Typed:
    """Made at the first file read, like a lazy import: importing msgspec takes about 10 ms, which
    a run that finds nothing new does without."""
    import msgspec

    class Record(msgspec.Struct, forbid_unknown_fields=True, gc=False):
        """A record as the fast decoder reads it: exactly the four keys, three strings and a number.

        Anything else (a key missing or unknown, another type, invalid JSON) makes the decoder
        refuse the whole text, which is then read again by the careful decoder for the exact reason.
        """

        user_id: str
        metric: str
        timestamp: str
        value: int | float

    return _Typed(Record, msgspec.json.Decoder(list[Record]).decode, msgspec.json.Decoder(Record).decode,
                  (msgspec.DecodeError, ValueError, RecursionError))


def _plain(obj: object) -> object:
    """A record as the JSON value it stands for: a fast-decoded Record as a dict, others as they are."""
    fields = getattr(type(obj), "__struct_fields__", None)
    return {name: getattr(obj, name) for name in fields} if fields is not None else obj


_VALUE_OF = operator.attrgetter("value")
_PLAIN_NUMBER = 1e15  # beyond every metric's bounds: such values are read carefully, for the reason


def _fast_is_exact(text: str | bytes, items: Sequence) -> bool:
    """Did the fast decoder see all there was? Like any JSON decoder it keeps the last of a key
    named twice and reads 1e-400 as 0; the careful decoder makes both a reject.

    Every item decoded to a Record has its four keys and three string values: at least 14
    double quotes. A key named twice (in any spelling) adds at least two more, as does an
    escaped quote, so a text with exactly 14 per item has neither. No value may be so large that
    its reason needs the digits as written. A float zero is what an underflowing number becomes,
    and a number can only underflow when written with a negative exponent or hundreds of zeros:
    a window with a float zero is exact unless its text holds either ("0.0" is then read fast).
    """
    if text.count('"' if type(text) is str else b'"') != 14 * len(items):
        return False
    values = list(map(_VALUE_OF, items))
    if values and not (-_PLAIN_NUMBER < min(values) and max(values) < _PLAIN_NUMBER):
        return False
    if 0 in values and any(type(v) is float and v == 0 for v in values):
        return not _may_underflow(text)
    return True


def _may_underflow(text: str | bytes) -> bool:
    """Does the text hold a number written with a negative exponent (1e-400), or a run of zeros
    long enough to hide a tiny fraction (0.000…1)? Substring searches first (a window is 1 MB):
    the regular expression only where an "e-" is there at all (in "alice-1" too, say)."""
    if type(text) is str:
        zeros, exponents, pattern = _ZEROS, ("e-", "E-"), _NEGATIVE_EXPONENT
    else:
        zeros, exponents, pattern = _ZEROS_BYTES, (b"e-", b"E-"), _NEGATIVE_EXPONENT_BYTES
    if zeros in text:
        return True
    return any(map(text.__contains__, exponents)) and pattern.search(text) is not None


_ZEROS, _ZEROS_BYTES = "0" * 300, b"0" * 300
_NEGATIVE_EXPONENT = re.compile(r"[0-9.][eE]-")
_NEGATIVE_EXPONENT_BYTES = re.compile(_NEGATIVE_EXPONENT.pattern.encode())


_WS = re.compile(r"[ \t\n\r]*")


class _Buffer:
    """A sliding window over a text stream, for decoding one JSON value at a time."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream, self.text, self.pos, self.eof, self.consumed = stream, "", 0, False, 0
        self.careful_until = 0  # offset in the stream up to which items are decoded one by one

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

    def decode_one(self) -> tuple[object, str]:
        """Decode the value at the cursor (carefully), reading more while the window may cut it;
        return it with its text."""
        while True:
            start = self.pos
            try:
                value, end = _CAREFUL.raw_decode(self.text, start)
                if end < len(self.text) or self.eof:
                    self.pos = end
                    return value, self.text[start:end]
                # A number at the very end of the window may go on in the next chunk.
            except json.JSONDecodeError as exc:
                if self.eof and _at_end(exc, self.text):
                    raise FileFormatError(f"file ends inside a record at {self.where(start)} (truncated?)") from None
                if self.eof or not _may_be_cut(exc, len(self.text)):
                    raise FileFormatError(f"invalid JSON at {self.where(exc.pos)}: {exc.msg}") from None
            except RecursionError:
                if self.eof or len(self.text) - start > MAX_RECORD_CHARS:
                    where = self.where(_deep_nesting_at(self.text, start))
                    raise FileFormatError(f"JSON nested more than {MAX_NESTING} levels deep at {where}") from None
            if len(self.text) - self.pos > MAX_RECORD_CHARS:
                raise FileFormatError(
                    f"a record at {self.where(self.pos)} is larger than {MAX_RECORD_CHARS} characters")
            self.fill()

    def array_ends(self) -> bool:
        """After an array item: consume the "," (False) or the closing "]" (True)."""
        separator = self.skip_ws()
        self.pos += 1
        if separator == "]":
            return True
        if separator != ",":
            if separator == "":
                raise FileFormatError("file ends inside the JSON array (truncated?)")
            raise FileFormatError(f"invalid JSON at {self.where(self.pos - 1)}: expected ',' or ']'")
        return False

    def decode_batch(self, decode: Callable[[str], list], exact: Callable[[str, list], bool],
                     errors: tuple[type[BaseException], ...]) -> tuple[list, str] | None:
        """Decode many array items with one call of the fast decoder (_decode_window); None
        otherwise (odd formatting, a bad record, anything the fast decoder could get wrong), and
        the caller decodes item by item, carefully.

        A window the fast decoder refused is not tried again: None is returned, with no attempt,
        until the items it held were decoded one by one (``careful_until``). So each stretch of the
        text costs at most one refused attempt, and a file the fast decoder keeps refusing costs
        what the careful decoder alone costs, plus one attempt per window (never one per item)."""
        if self.consumed + self.pos < self.careful_until:
            return None
        if len(self.text) - self.pos < READ_CHUNK_CHARS // 2:
            self.fill()
        got = _decode_window(self.text, self.pos, decode, exact, errors)
        if got is not None:
            self.pos += len(got[1]) + 1  # past the window and its last ","
        else:
            cut = self.text.rfind("},", self.pos)
            self.careful_until = self.consumed + (cut + 2 if cut >= self.pos else len(self.text))
        return got

    def where(self, pos: int) -> str:
        return f"character {self.consumed + pos + 1}"


def _decode_window(text: str | bytes, start: int, decode: Callable, exact: Callable,
                   errors: tuple[type[BaseException], ...]) -> tuple[list, str | bytes] | None:
    """The array items of ``text`` from ``start`` up to its last "},", decoded with one call of
    the fast decoder (its C code does the looping), with the text they came from (ending with that
    "}"). None when that is under 4096 characters, does not parse, or not exactly (``exact``).

    The window is cut after its last "}," and parsed as an array. That cut can only parse if it
    falls between two items: inside a string or a nested value the brackets or quotes would not
    balance. The loader's windows are text; the helper's (_FarHalf) are bytes.
    """
    comma, left, right = ("},", "[", "]") if type(text) is str else (b"},", b"[", b"]")
    cut = text.rfind(comma, start)
    if cut - start < 4096:
        return None
    window = text[start : cut + 1]
    try:
        items = decode(left + window + right)
    except errors:
        return None
    return (items, window) if exact(window, items) else None


def _may_be_cut(exc: json.JSONDecodeError, length: int) -> bool:
    """Could this error be the window's end cutting a value (a literal is at most 9 chars)?"""
    return exc.msg.startswith("Unterminated string") or exc.pos >= length - 16


def _at_end(exc: json.JSONDecodeError, text: str) -> bool:
    return exc.msg.startswith("Unterminated string") or exc.pos >= len(text.rstrip())


def _deep_nesting_at(text: str, start: int) -> int:
    """Where the nesting that went too deep begins: the first bracket, inside the value at
    ``start``, of the path that passes MAX_NESTING levels (the value's own start otherwise)."""
    depth, in_string, escaped, opened = 0, False, False, {}
    for pos in range(start, min(len(text), start + MAX_RECORD_CHARS)):
        char = text[pos]
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            opened[depth] = pos
            if depth > MAX_NESTING:
                return opened.get(2, start)
        elif char in "]}":
            depth -= 1
            if depth <= 0:
                break
    return start


def load_files(data_dir: Path, source_format: str = "auto", user_id: str | None = None) -> Iterator[DataFile]:
    """Yield the files under ``data_dir`` in sorted relative-path order, each with its kind.

    ``source_format`` ("auto", "flat", "fitbit-takeout", "fitbit-api") says which kinds to load;
    "auto" tells them apart per file, from the name and the first bytes. A file of no kind to
    load (a Takeout export's sleep or profile files, say) is yielded as "ignored", to be counted.
    Directory symlinks are not followed (no loops); a file symlink is followed only when its
    target lies inside ``data_dir``. FIFOs, sockets and devices are skipped (never opened). A
    directory that cannot be listed, or a file that cannot be looked at, is yielded with its
    ``error`` set, so it shows as a failed entry instead of silently vanishing.
    """
    root = data_dir.resolve()
    found: list[DataFile] = []
    derived: dict[str, str] = {}
    for here, base, entry in _walk(root, found):
        name = entry.name
        rel = _escape_name(base + name)
        if _archive_kind(name) and entry.is_file():
            log.warning("%s is %s: the loader reads folders, not archives; %s", rel, _archive_kind(name),
                        _extract_hint(rel))
            found.append(DataFile(here / name, rel, "ignored"))
            continue
        if not _may_hold_data(rel, source_format):
            log.debug("skipping %s: not a file this loader reads", rel)
            continue
        path = here / name
        error = _unloadable(entry, path, root, rel)
        if error == "skip":
            continue
        kind, gzipped = _kind_of(path, rel, source_format) if error is None else ("json", False)
        owner = None
        if kind in FITBIT_KINDS:
            owner = user_id or derive_user_id(root, path, kind=kind)
            if owner is None and error is None:
                error = ("cannot tell whose data this is (its folders name no person and no export): "
                         "set USER_ID or --user-id")
            elif not user_id and owner not in derived:
                derived[owner] = rel
                log.info("%s and the files beside it carry no user id: loading them as user %r "
                         "(set USER_ID or --user-id to choose one)", rel, owner)
        if kind is None:
            log.debug("skipping %s: not a file this loader reads", rel)
            continue
        found.append(DataFile(path, rel, kind, gzipped, error, owner))
    if source_format == "auto":  # beside Fitbit files, a JSON file without records is one more of theirs
        fitbit_dirs = {df.path.parent for df in found if df.kind in FITBIT_KINDS}
        found = [df._replace(kind="ignored") if df.kind == "json" and df.error is None
                 and df.path.parent in fitbit_dirs
                 and not _holds_flat_records(df.path, df.gzipped, b"" if df.gzipped else _head(df.path))
                 else df for df in found]
    yield from sorted(found, key=lambda df: df.rel)


_EXPORT_DIRS = ("takeout", "fitbit", "global export data")
_ARCHIVES = ((".zip", "a zip archive"), (".tgz", "a tar archive"), (".tar.gz", "a tar archive"),
             (".tar", "a tar archive"), (".tar.bz2", "a tar archive"), (".tar.xz", "a tar archive"))


def _archive_kind(name: str) -> str | None:
    """"a zip archive" / "a tar archive" for a file named like one (a Takeout download), else None."""
    lower = name.lower()
    return next((kind for suffix, kind in _ARCHIVES if lower.endswith(suffix)), None)


def _extract_hint(name: str) -> str:
    from shlex import quote

    folder = quote(re.sub(r"(?i)(\.zip|\.tgz|\.tar(\.gz|\.bz2|\.xz)?)$", "", name) or "export")
    if name.lower().endswith(".zip"):
        return f"extract it (unzip {quote(name)} -d {folder}) and load that folder"
    return f"extract it (mkdir {folder} && tar -xf {quote(name)} -C {folder}) and load that folder"


def _may_hold_data(rel: str, source_format: str) -> bool:
    """By its name alone: a flat file (.json, .jsonl, .ndjson, .gz of one), a .csv, or any file
    inside an export (counted as ignored when it holds no data). Others are never even looked at."""
    lower = rel.lower()
    if lower.endswith((".json", ".jsonl", ".ndjson", ".json.gz", ".jsonl.gz", ".ndjson.gz")):
        return True
    if source_format == "flat":
        return False
    return lower.endswith(".csv") or _in_export(lower)


def _in_export(rel: str) -> bool:
    """Does the file lie in a folder named like a Fitbit export's (any case)?"""
    return "/" in rel and any(part in _EXPORT_DIRS for part in rel.lower().split("/")[:-1])


def _kind_of(path: Path, rel: str, source_format: str) -> tuple[str | None, bool]:
    """(kind, gzipped): the flat format by extension, a Fitbit kind by name and content,
    "ignored" for a file inside an export that holds nothing to load, None for anything else."""
    lower = path.name.lower()
    gzipped = lower.endswith(".gz")
    flat = _KINDS.get(os.path.splitext(lower[:-3] if gzipped else lower)[1])
    if source_format == "flat":
        return flat, gzipped
    fitbit, head = None, b""
    if not gzipped and lower.endswith((".json", ".csv")):
        head = _head(path)
        fitbit = fitbit_kind(rel, head)
    if fitbit is not None and source_format in ("auto", fitbit_format(fitbit)):
        return fitbit, False
    in_export = _in_export(rel)
    if source_format != "auto" or in_export:
        # A data file of the flat format stays one, wherever it lies.
        if flat is not None and source_format == "auto" and _holds_flat_records(path, gzipped, head):
            return flat, gzipped
        return ("ignored" if (in_export or fitbit is not None or flat is not None or lower.endswith(".csv"))
                else None), False
    return flat, gzipped


FLAT_SNIFF_CHARS = 1 << 20  # how much of a file's text is read, at most, to find its first record


def _holds_flat_records(path: Path, gzipped: bool, head: bytes) -> bool:
    """Is the first record of this file an object with the flat format's user_id? Asked of a .json
    (or JSON Lines) file in an export's folder, whose name cannot tell a Task-0 file from the
    export's own JSON. Read as the loader reads it (gzip, UTF-16/32 with a BOM), far enough for its
    first record; the first 4 KB, ``head``, settle most files without opening them again."""
    if head and not head.startswith((b"\xff\xfe", b"\xfe\xff", b"\x00\x00\xfe\xff")):
        verdict = _first_record_is_flat(head.decode("utf-8", "replace"), complete=len(head) < 4096)
        if verdict is not None:
            return verdict
    try:
        with _open_text(path, gzipped, None) as text:
            return bool(_first_record_is_flat(text.read(FLAT_SNIFF_CHARS), complete=True))
    except (OSError, EOFError, UnicodeDecodeError, IngestError, *_decompression_errors()):
        return True  # unreadable: loaded as flat, so that the loader says why it fails


def _first_record_is_flat(text: str, complete: bool) -> bool | None:
    """From a file's first characters: does its first record hold the flat format's "user_id" (a
    key no export's own JSON has; "value" and "timestamp" they have)? None when the record goes on
    past them (and ``complete`` is False: there is more to read)."""
    start = len(text) - len(text.lstrip("\ufeff \t\r\n["))
    try:
        first, _ = _FAST.raw_decode(text, start)
    except (ValueError, RecursionError):  # cut short, or not JSON: by the key as written
        if not complete:
            return None
        return '"user_id"' in text
    return type(first) is dict and "user_id" in first


def _head(path: Path) -> bytes:
    try:
        fd = os.open(path, os.O_RDONLY)  # (no file object: this runs for every file of every run)
    except OSError:
        return b""
    try:
        return os.read(fd, 4096)
    except OSError:
        return b""
    finally:
        os.close(fd)


def _walk(root: Path, found: list[DataFile]) -> Iterator[tuple[Path, str, os.DirEntry]]:
    """(folder, its path relative to root with a trailing "/", entry) for every entry under root
    that is not a directory, folders in sorted order. A directory symlink is neither entered nor
    yielded; a directory that cannot be listed is added to ``found`` as a failed entry."""
    folders = [(root, "")]
    while folders:
        here, base = folders.pop()
        try:
            with os.scandir(here) as listing:
                entries = list(listing)
        except OSError as exc:
            found.append(DataFile(here, _escape_name(base) or "./", "",
                                  error=f"cannot list directory: {exc.strerror or exc}"))
            continue
        subfolders = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if not is_dir:
                yield here, base, entry
            elif not entry.is_symlink():
                subfolders.append(entry.name)
        folders.extend((here / name, f"{base}{name}/") for name in sorted(subfolders, reverse=True))


def _unloadable(entry: os.DirEntry, path: Path, root: Path, rel: str) -> str | None:
    """None for a regular file; "skip" for what is never data; else why it cannot be read."""
    try:
        if entry.is_file(follow_symlinks=False):  # from the directory listing: no stat call
            return None
        mode = entry.stat(follow_symlinks=False).st_mode
    except OSError as exc:
        return f"cannot read file: {exc.strerror or exc}"
    if stat.S_ISLNK(mode):
        if not path.exists():
            log.warning("skipping %s: No such file or directory (a dangling symlink)", rel)
            return "skip"
        target = path.resolve()
        if not target.is_relative_to(root):
            log.warning("skipping %s: symlink to %s, outside the data directory", rel,
                        _escape_name(str(target)))
            return "skip"
        try:
            mode = path.stat().st_mode
        except OSError as exc:
            return f"cannot read file: {exc.strerror or exc}"
    if not stat.S_ISREG(mode):
        log.warning("skipping %s: not a regular file", rel)
        return "skip"
    return None


# ---------------------------------------------------------------------------------------------
# Reading real Fitbit data: Google Takeout exports and saved Fitbit Web API responses
# ---------------------------------------------------------------------------------------------
# These readers only translate a source's shape into the flat record model: timestamps become
# ISO 8601 text ("...Z" where the source is documented as UTC, naive where it is the user's wall
# time, read in SOURCE_TIMEZONE), numeric strings become numbers, and anything else is passed
# through for validate_record to reject with its reason. A structurally broken item is an
# Unparsable; a file that cannot be read as its kind raises FileFormatError. Format facts and
# their sources: docs/fitbit.md.
FITBIT_MAX_API_BODY_CHARS = 64 * 1024 * 1024  # an API response body is read whole; larger fails the file
FITBIT_MAX_CSV_FIELD_CHARS = 64 * 1024
FITBIT_BATCH_RECORDS = 2048  # mapped records handed on together (_fb_batched)
FITBIT_MAX_SHOWN_CHARS = 4096  # Unparsable.text is cut here (the loader cuts again, to 1,000)

# ---------------------------------------------------------------------------------------------
# Kinds and detection
# ---------------------------------------------------------------------------------------------
FITBIT_TAKEOUT_KINDS = (
    "takeout-heart-rate", "takeout-steps", "takeout-heart-rate-csv", "takeout-steps-csv",
    "takeout-spo2-csv", "takeout-hrv-csv", "takeout-breath-csv", "takeout-azm-csv",
)
FITBIT_API_KINDS = ("api-heart", "api-steps", "api-spo2", "api-hrv", "api-br", "api-azm")
FITBIT_KINDS = FITBIT_TAKEOUT_KINDS + FITBIT_API_KINDS

_fb_DATE = r"\d{4}-\d{2}-\d{2}"
# Matched against the lower-cased basename. Order matters only where patterns could overlap.
_fb_NAME_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind) for pattern, kind in (
        # Older layout: Takeout/Fitbit/Global Export Data/ (also the fitbit.com account export's
        # "Physical Activity/" folder): one JSON array per day (heart rate) or period (steps).
        (rf"heart_rate-{_fb_DATE}[^/]*\.json", "takeout-heart-rate"),
        (rf"steps-{_fb_DATE}[^/]*\.json", "takeout-steps"),
        # Per-type folders (Takeout/Fitbit/<Type>/<File Name> - <date>.csv); the date part of
        # these names varies (per day, per month, "2024-07-(21)"), so only the stem is matched.
        (r"minute spo2( - [^/]*)?\.csv", "takeout-spo2-csv"),
        (r"heart rate variability details( - [^/]*)?\.csv", "takeout-hrv-csv"),
        (r"(daily )?respiratory rate summary( - [^/]*)?\.csv", "takeout-breath-csv"),
        (r"active zone minutes( - [^/]*)?\.csv", "takeout-azm-csv"),
        # Newest layout: Takeout/Fitbit/<...>_GoogleData/<type>_YYYY-MM-DD.csv, timestamps in UTC.
        (rf"heart_rate_{_fb_DATE}\.csv", "takeout-heart-rate-csv"),
        (rf"steps_{_fb_DATE}\.csv", "takeout-steps-csv"),
        (rf"heart_rate_variability_{_fb_DATE}\.csv", "takeout-hrv-csv"),
        (rf"respiratory_rate_sleep_summary_{_fb_DATE}\.csv", "takeout-breath-csv"),
        (rf"daily_respiratory_rate_{_fb_DATE}\.csv", "takeout-breath-csv"),
        (rf"active_zone_minutes_{_fb_DATE}\.csv", "takeout-azm-csv"),
    )
)
# The same, by the extension every one of them ends with (a name is tried against its own only).
_fb_NAMES_BY_EXTENSION = {ext: tuple(p for p in _fb_NAME_PATTERNS if p[0].pattern.endswith(f"\\{ext}"))
                          for ext in (".json", ".csv")}

# Content sniffing for saved Web API bodies (first <= 4 KB). A key must appear as an object key.
_fb_KEY = r'"{}"\s*:'
_fb_API_SNIFF: tuple[tuple[re.Pattern[str], str], ...] = tuple(
    (re.compile(pattern), kind) for pattern, kind in (
        (_fb_KEY.format("activities-active-zone-minutes-intraday"), "api-azm"),
        (_fb_KEY.format("activities-heart-intraday"), "api-heart"),
        (_fb_KEY.format("activities-steps-intraday"), "api-steps"),
        (_fb_KEY.format("br"), "api-br"),
    )
)
_fb_HRV_KEY = re.compile(_fb_KEY.format("hrv"))
_fb_MINUTES_LIST = re.compile(r'"minutes"\s*:\s*\[')
_fb_MINUTE_KEY = re.compile(_fb_KEY.format("minute"))
_fb_API_WORDS = ('"activities-', '"br"', '"hrv"', '"minutes"')
# The same as one search of the bytes (ASCII: the same in UTF-8), a third quicker than four `in`s,
# which matters as it runs for every .json file of every run.
_fb_API_BYTES = re.compile(b'"(?:' + b"|".join(re.escape(word[1:].encode()) for word in _fb_API_WORDS) + b")")


def fitbit_kind(rel_path: str, head: bytes) -> str | None:
    """The kind of a Fitbit file from its name and its first bytes, or None if it holds no data
    these readers load (sleep, profile, READMEs, daily summaries, other exports...).

    A known Takeout data-file name decides, except that a ``.json`` file whose first bytes show
    the top-level keys of a Web API response is read as that response whatever its name. Other
    ``.json`` files are recognised as API responses by those keys alone. A Takeout name whose
    content looks wrong keeps its Takeout kind, so that the reader reports why it is broken.
    """
    name = rel_path.replace("\\", "/").rpartition("/")[2].lower()
    api_kind = None
    if name.endswith(".json") and _fb_API_BYTES.search(head):  # else no pattern can match
        api_kind = _fb_sniff_api(head.decode("utf-8", "replace").lstrip("\ufeff \t\r\n"))
    for pattern, kind in _fb_NAMES_BY_EXTENSION.get(os.path.splitext(name)[1], ()):
        if pattern.fullmatch(name):
            return api_kind or kind
    return api_kind


def _fb_sniff_api(text: str) -> str | None:
    # Each pattern below needs one of these words: a plain search rules most files out at once.
    if text[:1] not in ("{", "[") or not any(map(text.__contains__, _fb_API_WORDS)):
        return None
    for pattern, kind in _fb_API_SNIFF:
        if pattern.search(text):
            return kind
    if _fb_HRV_KEY.search(text):
        # Intraday bodies list "minutes"; daily summaries (value.dailyRmssd) are not loaded.
        return "api-hrv" if _fb_MINUTES_LIST.search(text) else None
    if _fb_MINUTES_LIST.search(text) and _fb_MINUTE_KEY.search(text):
        return "api-spo2"
    return None


def fitbit_format(kind: str) -> str:
    """'fitbit-takeout' or 'fitbit-api' (the loader's source-format label for a kind)."""
    if kind in FITBIT_TAKEOUT_KINDS:
        return "fitbit-takeout"
    if kind in FITBIT_API_KINDS:
        return "fitbit-api"
    raise ValueError(f"unknown Fitbit kind {kind!r}")


# ---------------------------------------------------------------------------------------------
# User id
# ---------------------------------------------------------------------------------------------
_fb_GENERIC_DIRS = {"takeout", "fitbit", "google health", "myfitbitdata"}
# The folders Fitbit's and Google's exports sort data into (besides any "…_GoogleData" one).
_fb_DATA_TYPE_DIRS = {
    "global export data", "oxygen saturation (spo2)", "heart rate variability", "active zone minutes (azm)",
    "physical activity", "sleep", "sleep score", "stress", "stress score", "your profile", "personal & account",
    "temperature", "menstrual health", "biometrics", "daily readiness", "heart rate notifications", "mindfulness",
    "health coaching", "ecg", "irregular rhythm notifications", "application", "social", "other",
}
_fb_TAKEOUT_PART = re.compile(r"(?i)(takeout-\d{8}T\d{6}Z)-\d{3}")  # multi-part archive folders
_fb_UNSAFE = re.compile(r"[^A-Za-z0-9._@-]+")


def derive_user_id(data_dir: Path, file_path: Path, *, kind: str | None = None) -> str | None:
    """A stable, readable user id for a file when none is configured: the name of the export's
    own directory, taken from the export as a whole, never from a folder inside it --
      1. the directory that holds the ``Takeout`` folder on the file's path, ``data_dir``'s own
         path included (``DATA/alice/Takeout/Fitbit/...``, or ``--data-dir ~/alice/Takeout``:
         ``alice``);
      2. otherwise the first folder under ``data_dir`` that is neither a product folder
         (``Fitbit``, ``Google Health``, ``MyFitbitData``) nor one an export sorts its data into
         (``Global Export Data``, ``Oxygen Saturation (SpO2)``, ``…_GoogleData``, …):
         ``DATA/bob/Fitbit/...`` -> ``bob``;
      3. otherwise the first such folder from ``data_dir`` upwards (``data_dir`` itself, usually).
    None when every folder on the way is one of those (whose data it is cannot be told: the
    loader then asks for --user-id rather than guess). A multi-part archive folder
    ``takeout-20240102T030405Z-001`` (-002, ...) counts as ``takeout-20240102T030405Z``, so all parts
    of one export get one id. Runs of characters other than letters, digits and ``._@-`` become
    ``_``; the result is ``takeout-<name>`` (``api-<name>`` for an ``api-*`` kind), a name that
    already starts with that prefix not prefixed twice. Pure function of the two paths (no I/O).
    """
    data_dir, file_path = Path(os.path.abspath(data_dir)), Path(os.path.abspath(file_path))
    try:
        inside = file_path.relative_to(data_dir).parts[:-1]
        above = data_dir.parts
    except ValueError:  # a file outside data_dir (a symlink's target): its own folders
        inside, above = (), file_path.parts[:-1]
    folders = (*above, *inside)
    # A Takeout folder above data_dir counts when data_dir is it, or one of its export folders.
    first = len(above) - 1
    while first > 0 and _fb_export_folder(above[first]) and above[first].lower() != "takeout":
        first -= 1
    takeout = [index for index, part in enumerate(folders) if part.lower() == "takeout" and index >= first]
    if takeout and takeout[-1] > 0 and folders[takeout[-1] - 1] not in ("", "/"):
        name = folders[takeout[-1] - 1]
    else:
        name = next((p for p in (*inside, *reversed(above)) if p not in ("", "/") and not _fb_export_folder(p)), None)
    if name is None:
        return None
    name = _fb_TAKEOUT_PART.sub(r"\1", name)
    name = _fb_UNSAFE.sub("_", name).strip("_") or "export"
    prefix = "api-" if kind is not None and kind.startswith("api-") else "takeout-"
    if name.lower().startswith(prefix):
        return name[:255]
    return (prefix + name)[:255]


def _fb_export_folder(name: str) -> bool:
    """Is this a folder every export has, named for the product or a type of data, never for whose
    export it is?"""
    lower = name.lower()
    return lower in _fb_GENERIC_DIRS or lower in _fb_DATA_TYPE_DIRS or lower.endswith("_googledata")


# ---------------------------------------------------------------------------------------------
# Value and time conversion (translation only; the validator judges)
# ---------------------------------------------------------------------------------------------
_fb_INT_TEXT = re.compile(r"[+-]?\d+")
_fb_FLOAT_TEXT = re.compile(r"[+-]?(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?")


def _fb_number(value: object) -> object:
    """A numeric string -> int/float (surrounding blanks ignored); everything else unchanged."""
    if type(value) is str:
        text = value.strip()
        if _fb_INT_TEXT.fullmatch(text):
            return int(text)
        if _fb_FLOAT_TEXT.fullmatch(text):
            return float(text)
    return value


_fb_LEGACY_TIME = re.compile(
    r"\s*(\d{1,2})/(\d{1,2})/(\d{2}|\d{4})[ T](\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d+)?))?\s*")
_fb_ISO_TIME = re.compile(
    r"\s*(\d{4}-\d{2}-\d{2})[T ](\d{2}:\d{2})(:\d{2}(?:[.,]\d+)?)?\s*(Z|z|[+-]\d{2}(?::?\d{2})?)?\s*")
_fb_NORMAL_TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z?")
_fb_DATE_ONLY = re.compile(r"\s*(\d{4}-\d{2}-\d{2})\s*")
_fb_CLOCK = re.compile(r"\s*(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d+)?))?\s*")


def _fb_legacy_utc(text: object) -> object:
    """Takeout's "MM/DD/YY HH:MM:SS" (UTC) -> "20YY-MM-DDTHH:MM:SSZ"; unknown text unchanged.

    Two-digit years are 20YY (Fitbit devices date from 2009; Python's %y pivot would turn 69..99
    into 19xx). Missing seconds become ":00". The result is not checked for being a real date:
    "02/30/20 ..." becomes "2020-02-30T...Z" and the validator says why it is wrong.
    """
    if type(text) is not str:
        return text
    if len(text) == 17 and text[2] == "/" and text[5] == "/" and text[8] == " " and text[11] == ":" \
            and text[14] == ":":  # the usual "MM/DD/YY HH:MM:SS", without the regex
        digits = text[0:2] + text[3:5] + text[6:8] + text[9:11] + text[12:14] + text[15:17]
        if digits.isascii() and digits.isdigit():
            return f"20{text[6:8]}-{text[0:2]}-{text[3:5]}T{text[9:17]}Z"
    m = _fb_LEGACY_TIME.fullmatch(text)
    if not m:
        return text
    month, day, year, hour, minute, second = m.groups()
    if len(year) == 2:
        year = "20" + year
    return f"{year}-{int(month):02d}-{int(day):02d}T{int(hour):02d}:{minute}:{second or '00'}Z"


def _fb_iso(text: object, *, date_only_midnight: bool = False) -> object:
    """An ISO-like CSV/API timestamp -> "YYYY-MM-DDTHH:MM:SS[.f][offset]" (offset/Z kept as
    given, naive stays naive); a bare date -> midnight only where asked; else unchanged."""
    if type(text) is not str:
        return text
    if _fb_NORMAL_TIME.fullmatch(text):  # already "YYYY-MM-DDTHH:MM:SS[Z]": the common case
        return text
    m = _fb_ISO_TIME.fullmatch(text)
    if m:
        date, hm, sec, offset = m.groups()
        sec = (sec or ":00").replace(",", ".")
        if offset in ("z",):
            offset = "Z"
        return f"{date}T{hm}{sec}{offset or ''}"
    if date_only_midnight:
        m = _fb_DATE_ONLY.fullmatch(text)
        if m:
            return f"{m.group(1)}T00:00:00"
    return text


def _fb_on_date(date: str, clock: object) -> object:
    """API date "YYYY-MM-DD" + clock "HH:MM[:SS]" (or an already complete timestamp) -> naive ISO."""
    if type(clock) is not str:
        return clock
    m = _fb_CLOCK.fullmatch(clock)
    if m:
        hour, minute, second = m.groups()
        return f"{date}T{int(hour):02d}:{minute}:{second or '00'}"
    return _fb_iso(clock)


def _fb_record(user_id: str, metric: str, timestamp: object, value: object) -> dict:
    return {"user_id": user_id, "metric": metric, "timestamp": timestamp, "value": value}


def _fb_shown(value: object) -> str:
    if isinstance(value, str):
        text = value
    else:
        try:
            text = json.dumps(value, ensure_ascii=False)
        except (TypeError, ValueError):
            text = repr(value)
    return text[:FITBIT_MAX_SHOWN_CHARS]


def _fb_json_type(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"


# ---------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------
def read_fitbit(kind: str, text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    """Yield (position, record) for one file of the given kind (see the module docstring).

    ``text`` should be opened with ``newline=""`` (as the loader does) so that CSV fields with
    embedded line breaks and CR/LF line ends are read exactly; a leading BOM is ignored.
    Raises FileFormatError for whole-file problems.
    """
    reader = _fb_READERS.get(kind)
    if reader is None:
        raise ValueError(f"unknown Fitbit kind {kind!r}")
    return reader(text, user_id)  # a generator: FileFormatError surfaces while iterating


def _fitbit_batches(kind: str, text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, list]]:
    """What read_fitbit yields, in batches for the loader: (position of the first, records), a
    batch either consecutive records with a number for a value, as Records (settled in bulk
    like a JSON array's windows, _FileRows.part), or one record of any other kind alone, as the
    reader made it. Takeout's heart-rate and steps arrays are mapped in bulk where they can be."""
    if kind in _fb_takeout_shapes():
        return _fb_takeout_batches(kind, text, user_id)
    return _fb_batched(read_fitbit(kind, text, user_id))


def _fb_batched(pairs: Iterable[tuple[int, dict | Unparsable]]) -> Iterator[tuple[int, list]]:
    """(position, record) pairs in batches, as _fitbit_batches describes them."""
    record_type, batch, first = _typed().Record, [], 0
    for position, record in pairs:
        numeric = type(record) is dict and type(record["value"]) in (int, float) and type(record["timestamp"]) is str
        if batch and (not numeric or position != first + len(batch) or len(batch) >= FITBIT_BATCH_RECORDS):
            yield first, batch
            batch = []
        if not numeric:
            yield position, [record]
            continue
        if not batch:
            first = position
        batch.append(record_type(record["user_id"], record["metric"], record["timestamp"], record["value"]))
    if batch:
        yield first, batch


# ---------------------------------------------------------------------------------------------
# Takeout JSON arrays, streamed
# ---------------------------------------------------------------------------------------------
class _fb_ArrayStream(_Buffer):
    """Items of a top-level JSON array (a Takeout file), through the loader's own sliding window.

    Fast path: the window up to its last "}," is decoded as one array by the C decoder (a cut can
    only parse when it falls between two items). Otherwise items are decoded one by one
    (``_Buffer.decode_one``). Invalid or truncated JSON raises FileFormatError: the loader fails
    such a file as a whole, as it does for its own JSON arrays.
    """

    def items(self) -> Iterator[object]:
        for batch in self.batches(_FAST.decode):
            yield from batch

    def batches(self, decode: Callable[[str], list]) -> Iterator[list]:
        """The items a window at a time (``decode`` reads a window as an array; whatever it
        raises of ValueError or RecursionError sends that window item by item), or one alone."""
        self.fill()
        if self.text.startswith("\ufeff"):
            self.pos = 1
        first = self.skip_ws()
        if first == "":
            raise FileFormatError("file is empty (expected a JSON array)")
        if first != "[":
            raise FileFormatError(f"expected a JSON array, found {first!r} at {self.where(self.pos)}")
        self.pos += 1
        if self.skip_ws() == "]":
            self.pos += 1
        else:
            while True:
                batch = self.decode_batch(decode, _fb_any_items, (ValueError, RecursionError))  # checked later
                if batch is not None:
                    yield batch[0]
                    continue
                if self.skip_ws() == "":
                    raise FileFormatError("file ends inside the JSON array (truncated?)")
                yield [self.decode_one()[0]]
                if self.array_ends():
                    break
        if self.skip_ws() != "":
            raise FileFormatError(f"unexpected data after the JSON array at {self.where(self.pos)}")

def _fb_any_items(text: str, items: list) -> bool:
    return True


def _fb_object_item(item: object, keys: tuple[str, ...]) -> str | None:
    """Why an array item is structurally unusable (None if it is an object with these keys)."""
    if type(item) is not dict:
        return f"item is not a JSON object (got {_fb_json_type(item)})"
    missing = [key for key in keys if key not in item]
    if missing:
        return f"missing key{'s' if len(missing) > 1 else ''}: {', '.join(missing)}"
    return None


def _fb_heart_rate_item(item: object, user_id: str) -> dict | Unparsable:
    """{"dateTime": "MM/DD/YY HH:MM:SS" (UTC), "value": {"bpm": 62, "confidence": 2}}"""
    problem = _fb_object_item(item, ("dateTime", "value"))
    if problem is None:
        value = item["value"]
        if type(value) is not dict:
            problem = f"value is not an object with a bpm key (got {_fb_json_type(value)})"
        elif "bpm" not in value:
            problem = "missing key: value.bpm"
    if problem is not None:
        return Unparsable(problem, _fb_shown(item))
    return _fb_record(user_id, "heart_rate", _fb_legacy_utc(item["dateTime"]), _fb_number(item["value"]["bpm"]))


def _fb_steps_item(item: object, user_id: str) -> dict | Unparsable:
    """{"dateTime": "MM/DD/YY HH:MM:SS" (UTC), "value": "12"} (value is a string)"""
    problem = _fb_object_item(item, ("dateTime", "value"))
    if problem is not None:
        return Unparsable(problem, _fb_shown(item))
    return _fb_record(user_id, "activity", _fb_legacy_utc(item["dateTime"]), _fb_number(item["value"]))


def _fb_read_takeout_heart_rate(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    for position, item in enumerate(_fb_ArrayStream(text).items(), 1):
        yield position, _fb_heart_rate_item(item, user_id)


def _fb_read_takeout_steps(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    for position, item in enumerate(_fb_ArrayStream(text).items(), 1):
        yield position, _fb_steps_item(item, user_id)


# --- the same arrays in bulk, for the loader ---------------------------------------------------
_fb_LEGACY_TIMES = re.compile(r"(?:\d\d/\d\d/\d\d \d\d:\d\d:\d\d\n)*\d\d/\d\d/\d\d \d\d:\d\d:\d\d", re.ASCII)
_fb_PLAIN_INTS = re.compile(r"(?:\d{1,15}\n)*\d{1,15}", re.ASCII)
_fb_DATETIME_OF, _fb_BPM_OF = operator.attrgetter("dateTime"), operator.attrgetter("value.bpm")


def _fb_lines(texts: list[str]) -> str:
    """The texts joined a line each ("" where one holds a line break of its own, or none is there)."""
    joined = "\n".join(texts)
    return joined if joined.count("\n") == len(texts) - 1 else ""


def _fb_legacy_utc_all(texts: list[str]) -> list[str] | None:
    """_fb_legacy_utc of each text when every one is written the usual way, "MM/DD/YY HH:MM:SS"
    (its shortcut), checked by one regular expression over them all; None otherwise."""
    if not _fb_LEGACY_TIMES.fullmatch(_fb_lines(texts)):
        return None
    return [f"20{text[6:8]}-{text[0:2]}-{text[3:5]}T{text[9:17]}Z" for text in texts]


def _fb_plain_ints(texts: list[str]) -> list[int] | None:
    """_fb_number of each text, when every one is plain ASCII digits (a step count); else None."""
    return list(map(int, texts)) if _fb_PLAIN_INTS.fullmatch(_fb_lines(texts)) else None


class _fb_TakeoutShape(NamedTuple):
    metric: str
    decode: Callable[[str], list]  # a window, straight into the items' usual shape (msgspec)
    numbers: Callable[[list], list | None]  # the decoded items' values as numbers; None if one is not plain
    item: Callable[[object, str], dict | Unparsable]  # what read_fitbit maps one item (of any shape) to


@functools.cache
def _fb_takeout_shapes() -> dict[str, _fb_TakeoutShape]:
    """The Takeout arrays the loader reads in bulk. Their decoders ignore unknown keys and keep the
    last of a key written twice, as the standard library's decoder does."""
    import msgspec

    bpm = msgspec.defstruct("Bpm", [("bpm", int | float)], gc=False)  # (types, not annotations to resolve)
    heart_rate = msgspec.defstruct("HeartRate", [("dateTime", str), ("value", bpm)], gc=False)
    steps = msgspec.defstruct("Steps", [("dateTime", str), ("value", str)], gc=False)
    return {"takeout-heart-rate": _fb_TakeoutShape("heart_rate", msgspec.json.Decoder(list[heart_rate]).decode,
                                                   lambda items: list(map(_fb_BPM_OF, items)), _fb_heart_rate_item),
            "takeout-steps": _fb_TakeoutShape("activity", msgspec.json.Decoder(list[steps]).decode,
                                              lambda items: _fb_plain_ints(list(map(_VALUE_OF, items))),
                                              _fb_steps_item)}


def _fb_takeout_batches(kind: str, text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, list]]:
    """A Takeout heart-rate or steps array as _fitbit_batches gives it. A window of items in their
    usual shape, every time written the usual way and every value a plain number, becomes Records
    without a Python call per item: what the shape's ``item`` would map each to, made in bulk. Any
    other window, or item alone, goes through ``item``, as read_fitbit does."""
    shape, typed = _fb_takeout_shapes()[kind], _typed()

    def decode(window: str) -> list:
        try:
            items = shape.decode(window)
            stamps, values = _fb_legacy_utc_all(list(map(_fb_DATETIME_OF, items))), shape.numbers(items)
            if stamps is not None and values is not None:
                return list(map(typed.Record, itertools.repeat(user_id), itertools.repeat(shape.metric), stamps, values))
        except typed.errors:
            pass
        return _FAST.decode(window)  # dicts, mapped one by one below

    position = 1
    for items in _fb_ArrayStream(text).batches(decode):
        if type(items[0]) is typed.Record:
            yield position, items
        else:
            yield from _fb_batched(zip(itertools.count(position), map(shape.item, items, itertools.repeat(user_id))))
        position += len(items)


# ---------------------------------------------------------------------------------------------
# Takeout CSV files
# ---------------------------------------------------------------------------------------------
class _fb_Column(NamedTuple):
    names: tuple[str, ...]  # accepted header names, lower case, first match wins
    scale: float | None = None  # multiply a converted number by this (None: keep as read)


class _fb_CsvSpec(NamedTuple):
    metric: str
    time: _fb_Column
    value: tuple[_fb_Column, ...]  # alternatives, in order of preference
    date_only_midnight: bool = False
    sum_same_time: bool = False


_fb_CSV_SPECS: dict[str, _fb_CsvSpec] = {
    "takeout-heart-rate-csv": _fb_CsvSpec("heart_rate", _fb_Column(("timestamp",)), (_fb_Column(("beats per minute",)),)),
    "takeout-steps-csv": _fb_CsvSpec("activity", _fb_Column(("timestamp",)), (_fb_Column(("steps",)),)),
    "takeout-spo2-csv": _fb_CsvSpec("spo2", _fb_Column(("timestamp",)), (_fb_Column(("value",)),)),
    "takeout-hrv-csv": _fb_CsvSpec(
        "hrv", _fb_Column(("timestamp",)),
        (_fb_Column(("rmssd", "root mean square of successive differences milliseconds")),)),
    "takeout-breath-csv": _fb_CsvSpec(
        "breath_rate", _fb_Column(("timestamp",)),
        (_fb_Column(("full_sleep_breathing_rate",)), _fb_Column(("daily_respiratory_rate",)),
         _fb_Column(("full sleep stats - milli breaths per minute",), 0.001), _fb_Column(("breaths per minute",))),
        date_only_midnight=True),
    "takeout-azm-csv": _fb_CsvSpec(
        "active_zone_minute", _fb_Column(("date_time", "timestamp")),
        (_fb_Column(("total_minutes", "total minutes")),), date_only_midnight=True, sum_same_time=True),
}


class _fb_LineTap:
    """Feeds a text stream to csv.reader line by line, keeping the physical lines of the row
    being read (for the row's text and its first line number)."""

    def __init__(self, stream: io.TextIOBase) -> None:
        self.stream, self.lines, self.count, self.first = stream, [], 0, True

    def __iter__(self) -> _fb_LineTap:
        return self

    def __next__(self) -> str:
        line = self.stream.readline()
        if not line:
            raise StopIteration
        if self.first:
            self.first = False
            line = line.removeprefix("\ufeff")
        self.count += 1
        self.lines.append(line)
        return line

    def take(self) -> tuple[int, str]:
        """(first line number, text without its line end) of the row just read."""
        start = self.count - len(self.lines) + 1
        text = "".join(self.lines).rstrip("\r\n")
        self.lines = []
        return start, text


def _fb_resolve(header: list[str], column: _fb_Column) -> int | None:
    for name in column.names:
        if name in header:
            return header.index(name)
    return None


def _fb_read_csv(kind: str, text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    import csv  # (only Takeout's CSV files need it)

    spec = _fb_CSV_SPECS[kind]
    tap = _fb_LineTap(text)
    rows = csv.reader(tap, strict=False)
    try:
        header_row = next(rows, None)
    except csv.Error as exc:
        raise FileFormatError(f"unreadable CSV header: {exc}") from None
    if header_row is None:
        raise FileFormatError("file is empty (no CSV header row)")
    tap.take()
    header = [cell.strip().lower() for cell in header_row]
    time_at = _fb_resolve(header, spec.time)
    if time_at is None:
        raise FileFormatError(f"missing column {spec.time.names[0]!r} (header: {', '.join(header_row)})")
    value_at = scale = None
    for column in spec.value:
        value_at = _fb_resolve(header, column)
        if value_at is not None:
            scale = column.scale
            break
    if value_at is None:
        wanted = " or ".join(repr(column.names[0]) for column in spec.value)
        raise FileFormatError(f"missing column {wanted} (header: {', '.join(header_row)})")
    width = len(header)

    pending: list | None = None  # AZM: [position, timestamp, total or raw value]
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:
            position, raw = tap.take()
            yield position, Unparsable(f"unreadable CSV row: {exc}", raw[:FITBIT_MAX_SHOWN_CHARS])
            continue
        position, raw = tap.take()
        if not row or (len(row) == 1 and not row[0].strip()):
            continue  # a blank line is not a record (it keeps its number)
        if len(row) != width:
            missing = header_row[len(row)] if len(row) < width else None
            reason = f"row has {len(row)} columns, the header has {width}"
            if missing is not None:
                reason += f" (no {missing.strip()!r})"
            yield position, Unparsable(reason, raw[:FITBIT_MAX_SHOWN_CHARS])
            continue
        timestamp = _fb_iso(row[time_at], date_only_midnight=spec.date_only_midnight)
        value = _fb_number(row[value_at])
        if scale is not None and type(value) in (int, float):
            value = value * scale
        if not spec.sum_same_time:
            yield position, _fb_record(user_id, spec.metric, timestamp, value)
            continue
        # AZM: rows of one minute (one per heart-rate zone) that follow each other are summed.
        if pending is not None and pending[1] == timestamp:
            if type(pending[2]) in (int, float) and type(value) in (int, float):
                pending[2] += value
            elif type(pending[2]) in (int, float):
                pending[2] = value  # a non-number in the group: the whole minute is rejected
            continue
        if pending is not None:
            yield pending[0], _fb_record(user_id, spec.metric, pending[1], pending[2])
        pending = [position, timestamp, value]
    if pending is not None:
        yield pending[0], _fb_record(user_id, spec.metric, pending[1], pending[2])


def _fb_csv_reader(kind: str):
    def read(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
        yield from _fb_read_csv(kind, text, user_id)
    return read


# ---------------------------------------------------------------------------------------------
# Web API response bodies (read whole; a day of 1-second heart rate is ~3 MB)
# ---------------------------------------------------------------------------------------------
def _fb_load_body(text: io.TextIOBase) -> object:
    body = text.read(FITBIT_MAX_API_BODY_CHARS + 1)
    if len(body) > FITBIT_MAX_API_BODY_CHARS:
        raise FileFormatError(f"API response larger than {FITBIT_MAX_API_BODY_CHARS} characters")
    body = body.lstrip("\ufeff")
    if not body.strip():
        raise FileFormatError("file is empty (expected a Fitbit Web API response)")
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        if exc.msg.startswith("Unterminated string") or exc.pos >= len(body.rstrip()):
            raise FileFormatError("file ends inside the JSON (truncated?)") from None
        raise FileFormatError(f"invalid JSON at character {exc.pos + 1}: {exc.msg}") from None
    except RecursionError:
        raise FileFormatError("JSON nested too deeply") from None


def _fb_bodies(data: object, key: str, depth: int = 0) -> list[dict]:
    """The response objects holding ``key``: the body itself, the items of a top-level list of
    bodies (e.g. SpO2 by interval, or responses saved one after another), or bodies wrapped one
    level deep in a single-key object (wearipedia's ``{"heart_rate_day": [...]}``)."""
    if depth > 3:
        return []
    if type(data) is dict:
        if key in data:
            return [data]
        if len(data) == 1:
            return _fb_bodies(next(iter(data.values())), key, depth + 1)
        return []
    if type(data) is list:
        found: list[dict] = []
        for item in data:
            found.extend(_fb_bodies(item, key, depth + 1))
        return found
    return []


def _fb_need_bodies(data: object, key: str) -> list[dict]:
    bodies = _fb_bodies(data, key)
    if not bodies:
        raise FileFormatError(f"no {key!r} key in the API response")
    return bodies


def _fb_date_text(value: object, where: str) -> str:
    if type(value) is str:
        try:
            return dt.date.fromisoformat(value.strip()).isoformat()
        except ValueError:
            pass
    raise FileFormatError(f"{where} is not a date YYYY-MM-DD: {_fb_shown(value)[:80]}")


def _fb_clock_seconds(clock: object) -> float | None:
    if type(clock) is not str:
        return None
    m = _fb_CLOCK.fullmatch(clock)
    if not m:
        return None
    hour, minute, second = m.groups()
    return int(hour) * 3600 + int(minute) * 60 + float(second or 0)


def _fb_read_api_dataset(text: io.TextIOBase, user_id: str, resource: str, metric: str) -> Iterator[tuple[int, dict | Unparsable]]:
    """activities-<resource>[].dateTime + activities-<resource>-intraday.dataset[].{time, value}.

    Times are the user's local wall time (naive). A range response (at most 24 h) may run past
    midnight: when a time is earlier than the one before, the next day's date is used
    (activities-<resource>[i+1].dateTime, or the day after).
    """
    summary_key, intraday_key = f"activities-{resource}", f"activities-{resource}-intraday"
    position = 0
    for body in _fb_need_bodies(_fb_load_body(text), intraday_key):
        summary = body.get(summary_key)
        if type(summary) is not list or not summary or type(summary[0]) is not dict or "dateTime" not in summary[0]:
            raise FileFormatError(f"missing {summary_key}[0].dateTime (the date of the intraday times)")
        dates = [_fb_date_text(entry.get("dateTime"), f"{summary_key}[{i}].dateTime")
                 for i, entry in enumerate(summary) if type(entry) is dict and "dateTime" in entry]
        intraday = body[intraday_key]
        if type(intraday) is not dict or type(intraday.get("dataset")) is not list:
            raise FileFormatError(f"{intraday_key}.dataset is missing or not an array")
        day, date, previous = 0, dates[0], None
        for item in intraday["dataset"]:
            position += 1
            problem = _fb_object_item(item, ("time", "value"))
            if problem is not None:
                yield position, Unparsable(problem, _fb_shown(item))
                continue
            clock = item["time"]
            if type(clock) is str and len(clock) == 8 and clock[2] == ":" and clock[5] == ":" \
                    and clock.replace(":", "").isdigit() and clock.isascii():  # "HH:MM:SS", the usual
                seconds = int(clock[:2]) * 3600 + int(clock[3:5]) * 60 + int(clock[6:])
                fast = True
            else:
                seconds, fast = _fb_clock_seconds(clock), False
            if seconds is not None:
                if previous is not None and seconds < previous:
                    day += 1
                    date = dates[day] if day < len(dates) else \
                        (dt.date.fromisoformat(date) + dt.timedelta(days=1)).isoformat()
                previous = seconds
            timestamp = f"{date}T{clock}" if fast else _fb_on_date(date, clock)
            yield position, _fb_record(user_id, metric, timestamp, _fb_number(item["value"]))


def _fb_read_api_heart(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    yield from _fb_read_api_dataset(text, user_id, "heart", "heart_rate")


def _fb_read_api_steps(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    yield from _fb_read_api_dataset(text, user_id, "steps", "activity")


def _fb_minutes(days: list, where: str, user_id: str, metric: str, value_of, start: int) -> Iterator[tuple[int, dict | Unparsable]]:
    """Shared walk over [{dateTime, minutes: [{minute, value}]}] (SpO2, HRV, AZM intraday)."""
    position = start
    for index, day in enumerate(days):
        if type(day) is not dict or type(day.get("minutes")) is not list:
            raise FileFormatError(f"{where}[{index}].minutes is missing or not an array")
        date = day.get("dateTime")
        date = date.strip() if type(date) is str else None
        for item in day["minutes"]:
            position += 1
            problem = _fb_object_item(item, ("minute", "value"))
            if problem is None:
                value, problem = value_of(item["value"])
            if problem is not None:
                yield position, Unparsable(problem, _fb_shown(item))
                continue
            minute = item["minute"]
            if type(minute) is str and _fb_CLOCK.fullmatch(minute) and date:
                timestamp = _fb_on_date(date, minute)  # a bare clock time (wearipedia's AZM)
            else:
                timestamp = _fb_iso(minute)
            yield position, _fb_record(user_id, metric, timestamp, _fb_number(value))


def _fb_plain_value(value: object) -> tuple[object, str | None]:
    return value, None


def _fb_keyed_value(key: str):
    def value_of(value: object) -> tuple[object, str | None]:
        if type(value) is not dict:
            return None, f"value is not an object with a {key} key (got {_fb_json_type(value)})"
        if key not in value:
            return None, f"missing key: value.{key}"
        return value[key], None
    return value_of


def _fb_read_api_spo2(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    """{"dateTime": "2021-10-04", "minutes": [{"minute": "2021-10-04T00:00:00", "value": 95.7}]}
    or a list of such objects (the by-interval endpoint)."""
    days = _fb_need_bodies(_fb_load_body(text), "minutes")
    yield from _fb_minutes(days, "spo2", user_id, "spo2", _fb_plain_value, 0)


def _fb_read_api_hrv(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    """{"hrv": [{"dateTime": ..., "minutes": [{"minute": "...T09:10:00.000", "value": {"rmssd": 26.6, ...}}]}]}"""
    position = 0
    for body in _fb_need_bodies(_fb_load_body(text), "hrv"):
        days = body["hrv"]
        if type(days) is not list:
            raise FileFormatError("hrv is not an array")
        for item in _fb_minutes(days, "hrv", user_id, "hrv", _fb_keyed_value("rmssd"), position):
            position = item[0]
            yield item


def _fb_read_api_azm(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    """{"activities-active-zone-minutes-intraday": [{"dateTime": ..., "minutes": [{"minute": ...,
    "value": {"activeZoneMinutes": 1, "fatBurnActiveZoneMinutes": 1}}]}]}"""
    key = "activities-active-zone-minutes-intraday"
    position = 0
    for body in _fb_need_bodies(_fb_load_body(text), key):
        days = body[key]
        if type(days) is dict:
            days = [days]
        if type(days) is not list:
            raise FileFormatError(f"{key} is not an array")
        for item in _fb_minutes(days, key, user_id, "active_zone_minute", _fb_keyed_value("activeZoneMinutes"), position):
            position = item[0]
            yield item


def _fb_read_api_br(text: io.TextIOBase, user_id: str) -> Iterator[tuple[int, dict | Unparsable]]:
    """{"br": [{"dateTime": "2021-10-25", "value": {"breathingRate": 17.8}}]} (summary) or
    {"br": [{"dateTime": ..., "value": {"fullSleepSummary": {"breathingRate": 17.8}, ...}}]}
    (intraday). One value per night, stamped at local midnight of dateTime."""
    position = 0
    for body in _fb_need_bodies(_fb_load_body(text), "br"):
        entries = body["br"]
        if type(entries) is not list:
            raise FileFormatError("br is not an array")
        for item in entries:
            position += 1
            problem = _fb_object_item(item, ("dateTime", "value"))
            rate = None
            if problem is None:
                value = item["value"]
                if type(value) is not dict:
                    problem = f"value is not an object with a breathingRate key (got {_fb_json_type(value)})"
                elif "breathingRate" in value:
                    rate = value["breathingRate"]
                elif type(value.get("fullSleepSummary")) is dict and "breathingRate" in value["fullSleepSummary"]:
                    rate = value["fullSleepSummary"]["breathingRate"]
                else:
                    problem = "missing key: value.breathingRate (or value.fullSleepSummary.breathingRate)"
            if problem is not None:
                yield position, Unparsable(problem, _fb_shown(item))
                continue
            yield position, _fb_record(user_id, "breath_rate", _fb_iso(item["dateTime"], date_only_midnight=True), _fb_number(rate))


_fb_READERS = {
    "takeout-heart-rate": _fb_read_takeout_heart_rate,
    "takeout-steps": _fb_read_takeout_steps,
    **{kind: _fb_csv_reader(kind) for kind in _fb_CSV_SPECS},
    "api-heart": _fb_read_api_heart,
    "api-steps": _fb_read_api_steps,
    "api-spo2": _fb_read_api_spo2,
    "api-hrv": _fb_read_api_hrv,
    "api-br": _fb_read_api_br,
    "api-azm": _fb_read_api_azm,
}


# ---------------------------------------------------------------------------------------------
# From records to rows: validation, rejects, in-file repeats, parts
# ---------------------------------------------------------------------------------------------
_COUNT_FIELDS = ("records_read", "records_rejected", "rows_inserted", "rows_updated", "rows_duplicate")


class Counts:
    """What happened to records and rows: per part, per file and per run alike."""

    __slots__ = _COUNT_FIELDS

    def __init__(self, records_read: int = 0, records_rejected: int = 0, rows_inserted: int = 0,
                 rows_updated: int = 0, rows_duplicate: int = 0) -> None:
        self.records_read, self.records_rejected = records_read, records_rejected
        self.rows_inserted, self.rows_updated = rows_inserted, rows_updated
        self.rows_duplicate = rows_duplicate  # already present, or a repeat of a key met earlier in the run

    def __eq__(self, other: object) -> bool:
        return type(other) is Counts and self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"Counts({', '.join(f'{k}={v}' for k, v in self.as_dict().items())})"

    def copy(self) -> Counts:
        return Counts(*self.as_dict().values())

    def __iadd__(self, other: Counts) -> Counts:  # noqa: PYI034
        for name in _COUNT_FIELDS:
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in _COUNT_FIELDS}


class _Rejects:
    """Rejects of the file in flight, spooled, then appended to the reject file before it commits.

    Appends are single O_APPEND writes per file part, so worker processes can share the file.
    """

    def __init__(self, path: Path | None, run_id: int | None) -> None:
        self.path, self.run_id = path, run_id
        self._fd = None  # no path: a spool only, handed over as bytes (the read-ahead process's)
        self._spool = None  # made at the first reject
        if path is None:
            return
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ConfigError(f"cannot write the reject file {path}: {exc.strerror or exc}") from None

    def add(self, file: str, position: int | None, reason: str, text: str | None = None) -> None:
        entry = {"run_id": self.run_id, "file": file, "position": position, "reason": reason,
                 "record": None if text is None else text[:REJECT_RECORD_CHARS]}
        # A lone surrogate ("\ud800" in the input) cannot be UTF-8: it stays as its escape.
        self.add_lines(json.dumps(entry, ensure_ascii=False).encode("utf-8", "backslashreplace") + b"\n")

    def add_lines(self, data: bytes) -> None:
        """Spool reject lines made elsewhere (by the read-ahead process: take())."""
        if self._spool is None:
            import tempfile

            self._spool = tempfile.SpooledTemporaryFile(max_size=1 << 22, mode="w+b")  # noqa: SIM115 (closed in discard())
        self._spool.write(data)

    def take(self) -> bytes:
        """What is spooled, emptying the spool."""
        if self._spool is None:
            return b""
        self._spool.seek(0)
        data = self._spool.read()
        self.discard()
        return data

    def discard(self) -> None:
        if self._spool is not None:
            self._spool.close()
            self._spool = None

    def publish(self) -> None:
        """Append what is spooled to the reject file; RejectFileError if it cannot be written."""
        if self._spool is None:
            return
        try:
            self._spool.seek(0)
            while chunk := self._spool.read(1 << 20):
                view = memoryview(chunk)
                while view:
                    view = view[os.write(self._fd, view):]
        except OSError as exc:
            raise RejectFileError(f"cannot write the reject file {self.path}: {exc.strerror or exc}") from None
        finally:
            self.discard()

    def close(self) -> None:
        self.discard()
        if self._fd is not None:
            os.close(self._fd)


class _Notes(NamedTuple):
    """What the producer of a file should look at, said once per file; nothing of it is an error."""

    extra_keys: int
    extra_example: str | None
    conflicting: int
    conflict_example: str | None
    seen_full: bool  # the memory of keys filled up: there may be more conflicting repeats

    def warn(self, rel: str) -> None:
        if self.extra_keys:
            log.warning("%s: %d records carry keys other than %s (ignored), e.g. %s", rel,
                        self.extra_keys, "/".join(REQUIRED_KEYS), self.extra_example)
        if self.conflicting:
            more = " at least" if self.seen_full else ""
            log.warning("%s:%s %d records repeat a key seen earlier in the file with a different value; "
                        "the first was kept (e.g. %s)", rel, more, self.conflicting, self.conflict_example,
                        extra={"fields": {"file": rel, "conflicting_repeats": self.conflicting}})


class _FileRows:
    """One file's records as the COPY lines of its valid rows: the generator chain of the pipeline.

    ``part()`` yields the lines of the next part: each key once (the first; the database still
    settles repeats beyond DEDUPE_MAX_KEYS remembered keys), rejects spooled with their reasons.
    A decoded window of records that all repeat keys already sent is counted in bulk: each record
    found by its user_id and timestamp as written in a table of the keys met before (``firsts``).
    A part ends at the end of the file, or before a row that would make it touch more than
    PART_CHUNKS chunks. Records up to ``resume_after`` were committed by an earlier run: they are
    read again (for the digest and the memory of keys) but not sent or counted.
    """

    def __init__(self, df: DataFile, make_line: _LineMaker, rejects: _Rejects, chunk_seconds: int,
                 resume_after: int = 0, progress: Callable[[int], object] | None = None,
                 helper: bool = False) -> None:
        self.df, self.make_line, self.rejects = df, make_line, rejects
        self.helper = helper  # may a helper process settle the far half (_FarHalf)?
        self.chunk_seconds, self.resume_after = chunk_seconds, resume_after
        self.digest = Digest(progress)
        self.stream = df.records(self.digest)
        self.batches = self.stream.batches()
        self.counts = Counts()  # of the part in flight: records read and rejected, repeats dropped
        self.done = resume_after  # the last record handled in a part (committed when the part is)
        self.finished = False
        self.seen: dict[Key, str] = {}  # key of a line -> its value part, first occurrence
        # (user_id, metric) as written -> timestamp as written -> the value part of the first
        # occurrence of that key: made at the first window of repeats, added to by repeats met one
        # by one, read by windows of repeats settled in bulk
        self.firsts: dict[tuple[str, str], dict[str, str]] = {}
        self.firsts_size = 0  # entries in all of them (bounded like seen)
        self.scan_budget = 2 * DEDUPE_MAX_KEYS  # cache entries _first_table may still look at
        self._pending: tuple[int, list] | None = None  # the batch (its rest) opening the next part
        self.extra_keys = self.conflicting = 0
        self.extra_example: str | None = None
        self.conflict_example: str | None = None

    def part(self) -> Iterator[str]:
        chunks: set[int] = set()
        batches: Iterator[tuple[int, list]] = self.batches
        if self._pending is not None:  # the records that opened this part, when the last one ended
            batches, self._pending = itertools.chain((self._pending,), batches), None
        seen, resume_after, make_line, chunk_seconds = self.seen, self.resume_after, self.make_line, self.chunk_seconds
        record_type = _typed().Record
        read = rejected = duplicate = conflicting = 0  # locals in the hot loop, added up at the end
        done = self.done
        try:
            for first_position, records in batches:
                if type(records) is _Settled:  # the far half's records, settled by the helper
                    read, duplicate = read + records.count, duplicate + records.count
                    conflicting, done = conflicting + records.conflicting, first_position + records.count - 1
                    if self.conflict_example is None:
                        self.conflict_example = records.example
                    continue
                if len(records) > 1 and first_position > resume_after:
                    differ = self._repeats_of_sent(records)
                    if differ is not None:  # settled in bulk: every record repeats a key already sent
                        read, duplicate = read + len(records), duplicate + len(records)
                        conflicting, done = conflicting + differ, first_position + len(records) - 1
                        if self.helper:
                            self.helper = False
                            self.stream.settle_far_half(self._repeats_of_sent, lambda: self.conflict_example)
                        continue
                    lines = self._new_keys(records, chunks)
                    if lines is not None:  # settled in bulk: every record a new key
                        yield from lines
                        read, done = read + len(records), first_position + len(records) - 1
                        continue
                for position, obj in enumerate(records, first_position):
                    try:
                        key, tail, epoch = make_line(obj)
                    except ValidationError as exc:
                        if position > resume_after:
                            read, rejected, done = read + 1, rejected + 1, position
                            self._reject(position, obj, exc)
                        continue
                    if position <= resume_after:  # committed before: only remembered
                        if len(seen) < DEDUPE_MAX_KEYS:
                            seen.setdefault(key, tail)
                        continue
                    if type(obj) is dict and len(obj) > 4:  # a Record has exactly the four
                        self._extra_keys(obj, position)
                    first = seen.get(key)
                    if first is None:
                        chunk = epoch // chunk_seconds
                        if chunk not in chunks:
                            if len(chunks) >= PART_CHUNKS:  # read again, and counted, in the next part
                                self._pending = (position, records[position - first_position :])
                                return
                            chunks.add(chunk)
                        if len(seen) < DEDUPE_MAX_KEYS:
                            seen[key] = tail
                        read, done = read + 1, position
                        yield _line(key, tail)
                    else:
                        read, duplicate, done = read + 1, duplicate + 1, position
                        if first != tail:
                            conflicting += 1
                            if self.conflict_example is None:
                                self._note_conflict(key, first, tail)
                        if type(obj) is record_type:
                            self._remember(obj, first)
            self.finished = True
        finally:
            counts = self.counts
            counts.records_read += read
            counts.records_rejected += rejected
            counts.rows_duplicate += duplicate
            self.conflicting += conflicting
            self.done = done

    def _repeats_of_sent(self, records: list) -> int | None:
        """A decoded window whose every record repeats a key already sent, settled in bulk: the
        same checks and the same outcome as one by one, with no call per record. Returns how many
        records repeat their key with a different value, or None when the window must go one by
        one. The first and the last key are probed first, so a window of new keys costs two calls.

        A record is a repeat here when its (user_id, metric, timestamp) as written is in the table
        of its user and metric (``firsts``): made, at the first window of repeats, from the
        timestamps in the cache whose key is in ``seen`` (_first_table), and added to by repeats
        met one by one (``_remember``)."""
        make_line = self.make_line
        try:
            if make_line(records[0])[0] not in self.seen or make_line(records[-1])[0] not in self.seen:
                return None
        except ValidationError:
            return None
        metric_tails = self._metric_and_tails(records)
        if metric_tails is None:
            return None
        metric, tails = metric_tails
        users, stamps = list(map(_USER_OF, records)), map(_TIMESTAMP_OF, records)
        tables = {user: self._first_table(user, metric) for user in set(users)}
        if len(tables) == 1:
            firsts = list(map(tables[users[0]].get, stamps))
        else:
            firsts = list(map(dict.get, map(tables.__getitem__, users), stamps))
        if None in firsts:
            return None
        differ = sum(map(operator.ne, firsts, tails))
        if differ and self.conflict_example is None:
            at = next(i for i, (first, tail) in enumerate(zip(firsts, tails)) if first != tail)
            self._note_conflict(make_line(records[at])[0], firsts[at], tails[at])
        return differ

    def _new_keys(self, records: list, chunks: set[int]) -> list[str] | None:
        """A decoded window whose every record is a key not seen before (unique-key data), settled
        in bulk: the same checks and the same outcome as one by one, the COPY lines made without a
        Python call per record (a timestamp not in the cache is read once, by _LineMaker._stamp).
        Returns the lines, or None when the window must go one by one: more than one user or
        metric, a record that is not valid or repeats a key, or a window that would end the part
        (PART_CHUNKS) or fill the memory of keys (DEDUPE_MAX_KEYS)."""
        users = list(map(_USER_OF, records))
        metric_tails = self._metric_and_tails(records) if users.count(users[0]) == len(users) else None
        if metric_tails is None:
            return None
        (metric, tails), make_line, seen = metric_tails, self.make_line, self.seen
        escaped = make_line.users.get(users[0]) or make_line._user(users[0])
        if not escaped or len(seen) + len(records) > DEDUPE_MAX_KEYS:
            return None
        stamps = make_line.stamps_of(list(map(_TIMESTAMP_OF, records)))
        if stamps is None:
            return None
        utcs = list(map(_UTC_TEXT_OF, stamps))
        fresh = dict(zip(zip(itertools.repeat(escaped), itertools.repeat(metric), utcs), tails))
        if len(fresh) != len(records) or not fresh.keys().isdisjoint(seen):
            return None
        touched = chunks.union(map(operator.floordiv, map(_EPOCH_OF, stamps), itertools.repeat(self.chunk_seconds)))
        if len(touched) > PART_CHUNKS:
            return None
        chunks |= touched
        seen.update(fresh)
        return list(map(f"{escaped}\t{metric}\t".__add__, map(str.__add__, utcs, tails)))

    def _metric_and_tails(self, records: list) -> tuple[str, list[str]] | None:
        """A decoded window's one metric and the value parts of its records (_LineMaker.tails);
        None if it holds several metrics or a number not valid for its one."""
        metrics = set(map(_METRIC_OF, records))
        if len(metrics) != 1:
            return None
        metric = metrics.pop()
        tails = self.make_line.tails(metric, list(map(_VALUE_OF, records)))
        return None if tails is None else (metric, tails)

    def _first_table(self, user: str, metric: str) -> dict[str, str]:
        """The table of a user and metric. Made when first needed, from what is known then: each
        timestamp text in _LineMaker's cache (up to 100,000) whose key is in ``seen``, with that
        key's first value part (a file's first window of repeats is usually settled in bulk at
        once). At most 2 x DEDUPE_MAX_KEYS cache entries are looked at per file: a file of many
        users does not pay this for each of them, its tables fill as repeats are met."""
        firsts_of = self.firsts.get((user, metric))
        if firsts_of is None:
            firsts_of = self.firsts[user, metric] = {}
            escaped, seen, stamps = self.make_line.users.get(user), self.seen, self.make_line.stamps
            if escaped is not None and self.scan_budget >= len(stamps):
                self.scan_budget -= len(stamps)
                for text, (utc, _) in stamps.items():
                    first = seen.get((escaped, metric, utc))
                    if first is not None and self.firsts_size < DEDUPE_MAX_KEYS:
                        firsts_of[text] = first
                        self.firsts_size += 1
        return firsts_of

    def _remember(self, record: object, first: str) -> None:
        """A repeat met one by one: its user_id, metric and timestamp as written, for the windows
        settled in bulk (``_repeats_of_sent``). Bounded: at most DEDUPE_MAX_KEYS entries a file."""
        if self.firsts_size < DEDUPE_MAX_KEYS:
            firsts_of = self._first_table(record.user_id, record.metric)
            if record.timestamp not in firsts_of:
                firsts_of[record.timestamp] = first
                self.firsts_size += 1

    def _note_conflict(self, key: Key, first: str, tail: str) -> None:
        self.conflict_example = f"{' '.join(key)}: {first.strip()} then {tail.strip()}"

    def take_counts(self) -> Counts:
        counts, self.counts = self.counts, Counts()
        return counts

    def _reject(self, position: int, obj: object, exc: ValidationError) -> None:
        if type(obj) is Unparsable:
            self.rejects.add(self.df.rel, position, obj.reason, obj.text)
            return
        text = self.stream.raw(position)
        self.rejects.add(self.df.rel, position, _reason_as_written(text, exc, self.make_line.tz), text)

    def _extra_keys(self, obj: dict, position: int) -> None:
        if self._pending is not None and self._pending[0] == position:
            return  # counted when its part comes
        self.extra_keys += 1
        if self.extra_example is None:
            self.extra_example = ", ".join(sorted(k for k in obj if k not in REQUIRED_KEYS)[:5])

    def notes(self) -> _Notes:
        return _Notes(self.extra_keys, self.extra_example, self.conflicting, self.conflict_example,
                      len(self.seen) >= DEDUPE_MAX_KEYS)

    def warn(self) -> None:
        self.notes().warn(self.df.rel)

    def close(self) -> None:
        close = getattr(self.batches, "close", None)
        if close is not None:
            close()


# --- reading ahead: the next files' rows, made by a helper process --------------------------
# Frames on the helper's pipe: a type byte, the payload's length (4 bytes), the payload.
_AHEAD_HEADER = 5
_AHEAD_START, _AHEAD_LINES, _AHEAD_REJECTS, _AHEAD_PART, _AHEAD_END, _AHEAD_ERROR = b"S", b"L", b"R", b"P", b"F", b"E"
AHEAD_PIPE_BYTES = 1 << 20  # what the helper may have made before the loader takes it (Linux)


class _Batches:
    """An iterator of (COPY text, number of lines): a part of a file made ahead (_AheadRows.part)."""

    def __init__(self, batches: Iterator[tuple[str, int]]) -> None:
        self._batches = batches

    def __iter__(self) -> _Batches:
        return self

    def __next__(self) -> tuple[str, int]:
        return next(self._batches)


class _ReadAhead:
    """The rows of the files to come, made by one helper process on the second core while this
    one sends the file in flight.

    With many small files the reading and the sending of a file cannot overlap much: each file's
    first window is decoded before its COPY can start, and its last rows are made while the server
    still works through the ones before. The helper makes for each file of its list in turn
    exactly what _FileRows makes in this process (the same code, on a copy of the same state):
    batches of COPY lines, each part's counts and rejects, the digest, the notes, or the error that
    fails the file. It writes them to a pipe, as far ahead as the pipe holds.

    The loader takes a file's frames only for a file it claimed to load from its first record, and
    only if the file's size and mtime at its claim are those the helper saw before reading it: a
    file written to meanwhile is read here, so the manifest never records a newer state than the
    rows loaded. When it loads a file that is not next in the pipe (it skipped, found busy or
    resumed one before, or gave one up half-read), it does not wait for the helper to get there:
    a new helper starts at that file. If a helper ends in any other way, a file in flight is tried
    again (_Lost), and this process reads every file after it: the helper can only save time.
    """

    def __init__(self, files: list[DataFile], cfg: Config, run_id: int | None, chunk_seconds: int) -> None:
        self._files, self._args = files, (cfg, run_id, chunk_seconds)
        self._index = {df.rel: i for i, df in enumerate(files)}
        self._next = 0  # the first file whose frames are not read yet
        self._open = False  # the file before it has frames left (given up, or read in part)
        self._pid, self._reader = 0, None
        self.gone = not self._fork(0)

    @classmethod
    def start(cls, files: list[DataFile], cfg: Config, run_id: int | None, chunk_seconds: int) -> _ReadAhead | None:
        if len(files) < 2 or not hasattr(os, "fork"):
            return None
        ahead = cls(files, cfg, run_id, chunk_seconds)
        return None if ahead.gone else ahead

    def _fork(self, at: int) -> bool:
        """A helper for the files from ``at`` on; False if none could be started. A ^C reaches
        the whole process group: the helper ignores it, the loader decides when to stop."""
        def work(fd: int) -> None:
            with contextlib.suppress(ImportError, OSError):
                import fcntl

                fcntl.fcntl(fd, getattr(fcntl, "F_SETPIPE_SZ", 1031), AHEAD_PIPE_BYTES)
            _read_ahead(self._files[at:], *self._args, fd)

        forked = _fork_helper(work, signal.SIG_IGN)
        if forked is None:
            return False
        self._pid, self._reader = forked[0], open(forked[1], "rb", buffering=1 << 16)  # noqa: SIM115 (closed in _end())
        self._next, self._open = at, False
        return True

    def take(self, df: DataFile, st: os.stat_result, rejects: _Rejects,
             progress: Callable[[int], object] | None) -> _AheadRows | None:
        """The file's rows as the helper made them, or None: read it in this process. ``st``: the
        file's stat at its claim."""
        at = self._index.get(df.rel)
        if self.gone or at is None or at < self._next:
            return None  # not the helper's, or taken before (a file tried again)
        if self._open or at > self._next:  # frames to pass over: a new helper starts at this file
            self._end()
            if not self._fork(at):
                self.gone = True
                return None
        self._next, self._open = at + 1, True
        try:
            kind, payload = self.frame()
        except _Lost:
            return None
        if kind != _AHEAD_START or json.loads(payload) != [st.st_size, st.st_mtime_ns]:
            return None  # changed since the helper looked at it (or it could not): passed over
        return _AheadRows(self, df, rejects, progress)

    def frame(self) -> tuple[bytes, bytes]:
        """The next frame: (type, payload). _Lost if the helper ended (it is not used again)."""
        if not self.gone:
            header = self._reader.read(_AHEAD_HEADER)
            if len(header) == _AHEAD_HEADER:
                size = int.from_bytes(header[1:], "big")
                payload = self._reader.read(size)
                if len(payload) == size:
                    return header[:1], payload
            self.gone = True
        raise _Lost("the read-ahead process ended")

    def file_done(self) -> None:
        self._open = False

    def _end(self) -> None:
        """End the helper (wherever it is) and reap it."""
        self._reader.close()
        with contextlib.suppress(ProcessLookupError):
            os.kill(self._pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self._pid, 0)

    def close(self) -> None:
        if self._reader is not None and not self._reader.closed:
            self._end()
        self.gone = True


class _AheadDigest:
    def __init__(self) -> None:
        self.hex = ""

    def hexdigest(self) -> str:
        return self.hex


class _AheadRows:
    """A file's rows as the read-ahead process made them: what _FileRows gives, from its frames."""

    def __init__(self, ahead: _ReadAhead, df: DataFile, rejects: _Rejects,
                 progress: Callable[[int], object] | None) -> None:
        self.ahead, self.df, self.rejects, self.progress = ahead, df, rejects, progress
        self.counts, self.done, self.finished = Counts(), 0, False
        self.digest = _AheadDigest()
        self._notes = _Notes(0, None, 0, None, False)

    def part(self) -> _Batches:
        return _Batches(self._part())

    def _part(self) -> Iterator[tuple[str, int]]:
        frame = self.ahead.frame
        while True:
            kind, payload = frame()
            if kind == _AHEAD_LINES:
                yield payload[4:].decode("utf-8"), int.from_bytes(payload[:4], "big")
            elif kind == _AHEAD_REJECTS:
                self.rejects.add_lines(payload)
            elif kind == _AHEAD_PART:
                read, rejected, duplicate, self.done, finished = json.loads(payload)
                self.counts += Counts(records_read=read, records_rejected=rejected, rows_duplicate=duplicate)
                if finished:
                    kind, payload = frame()
                    if kind != _AHEAD_END:
                        raise _Lost("the read-ahead process sent an unexpected frame")
                    size, self.digest.hex, *notes = json.loads(payload)
                    self._notes, self.finished = _Notes(*notes), True
                    self.ahead.file_done()
                    if self.progress is not None:
                        self.progress(size)
                return
            elif kind == _AHEAD_ERROR:
                self.ahead.file_done()
                error, message = json.loads(payload)
                if error == "FileFormatError":
                    raise FileFormatError(message)
                if error == "FileReadError":
                    raise FileReadError(message)
                self.ahead.gone = True  # anything else: this process reads the file, and finds it too
                raise _Lost(f"the read-ahead process failed ({message})")
            else:
                self.ahead.gone = True
                raise _Lost("the read-ahead process sent an unexpected frame")

    def take_counts(self) -> Counts:
        counts, self.counts = self.counts, Counts()
        return counts

    def warn(self) -> None:
        self._notes.warn(self.df.rel)

    def close(self) -> None:
        """Nothing to do: what is left of the file's frames is passed over by the next take()."""


def _read_ahead(files: list[DataFile], cfg: Config, run_id: int | None, chunk_seconds: int, fd: int) -> None:
    """In the helper: each file's frames, in turn (a closed pipe ends it: the loader is gone)."""
    gc.disable()  # short-lived, and what it keeps is bounded per file
    out = open(fd, "wb", buffering=1 << 16)  # noqa: SIM115 (the process ends with os._exit)
    make_line, rejects = _LineMaker(cfg.source_tz), _Rejects(None, run_id)

    def send(kind: bytes, payload: bytes) -> None:
        out.write(kind + len(payload).to_bytes(4, "big"))
        out.write(payload)

    for df in files:
        try:
            st = os.stat(df.path)  # before the first byte is read, as the claim does
            send(_AHEAD_START, json.dumps([st.st_size, st.st_mtime_ns]).encode())
        except BrokenPipeError:
            return
        except OSError:
            send(_AHEAD_START, b"[]")  # the loader reads it, and says why it cannot
        rows = _FileRows(df, make_line, rejects, chunk_seconds)
        try:
            while not rows.finished:
                for text, count in _joined(rows.part(), cfg.batch_size):
                    send(_AHEAD_LINES, count.to_bytes(4, "big") + text.encode("utf-8"))
                counts, reject_lines = rows.take_counts(), rejects.take()
                if reject_lines:
                    send(_AHEAD_REJECTS, reject_lines)
                send(_AHEAD_PART, json.dumps([counts.records_read, counts.records_rejected, counts.rows_duplicate,
                                              rows.done, rows.finished]).encode())
                out.flush()  # the loader commits the part when it has this frame
            send(_AHEAD_END, json.dumps([rows.digest.size, rows.digest.hexdigest(), *rows.notes()]).encode())
            out.flush()
        except (FileFormatError, FileReadError) as exc:
            rejects.discard()
            send(_AHEAD_ERROR, json.dumps([type(exc).__name__, str(exc)]).encode())
            out.flush()
        except BrokenPipeError:
            return  # the loader is gone
        except OSError as exc:
            rejects.discard()
            send(_AHEAD_ERROR, json.dumps(["FileReadError", str(_io_error(exc))]).encode())
            out.flush()
        except BaseException as exc:  # noqa: BLE001 (the loader reads the file itself, and meets it there)
            send(_AHEAD_ERROR, json.dumps(["other", f"{type(exc).__name__}: {exc}"[:500]]).encode())
            out.flush()
            return
        finally:
            rows.close()


def _reason_as_written(text: str, exc: ValidationError, tz: dt.tzinfo) -> str:
    """The reason for a reject, from the record's own text: a record the fast decoder read is read
    again carefully, so numbers are quoted as written and a repeated key is named."""
    if text:
        try:
            validate_record(_CAREFUL.decode(text), tz)
        except ValidationError as careful:
            return str(careful)
        except (ValueError, RecursionError):
            pass
    return str(exc)


# ---------------------------------------------------------------------------------------------
# Database I/O
# ---------------------------------------------------------------------------------------------
def _psycopg2():
    """psycopg2, imported lazily: validation and --help work without the driver.

    Importing it also imports Python's ``ssl`` (a tenth of a run that finds nothing new), only to
    hand libpq Python's OpenSSL locking callbacks, which OpenSSL 1.1 and later neither needs nor
    uses (the wheel's libpq has its own OpenSSL 3). Unless something has imported ``ssl`` already,
    that import is refused for the moment psycopg2 loads, the case psycopg2 handles as "Python
    without ssl": libpq then sets up OpenSSL itself, and TLS connections work as before.
    """
    if "psycopg2" not in sys.modules and "ssl" not in sys.modules:
        sys.modules["ssl"] = None  # type: ignore[assignment]  # import ssl raises ImportError
        try:
            import psycopg2
        finally:
            del sys.modules["ssl"]
    import psycopg2
    import psycopg2.errors
    import psycopg2.extensions

    return psycopg2


def _parse_dsn(dsn: str) -> dict:
    """DATABASE_URL as libpq reads it; {} if it cannot (the caller has checked it already)."""
    try:
        return _psycopg2().extensions.parse_dsn(dsn)
    except _psycopg2().Error:
        return {}


def _check_dsn(dsn: str) -> dict:
    """Refuse a DATABASE_URL libpq would misread, without ever quoting it (it holds the password)."""
    if "://" in dsn:
        rest = dsn.split("://", 1)[1]
        userinfo = rest.rsplit("@", 1)[0] if "@" in rest else ""
        if rest.count("@") > 1 or any(c in userinfo for c in "/?#"):
            raise ConfigError("DATABASE_URL: the user name or password holds an unencoded '@', '/', '?' or '#' "
                              "(percent-encode it: '@' is %40, '/' is %2F); the URL is not shown, as it holds "
                              "the password")
    try:
        return _psycopg2().extensions.parse_dsn(dsn)
    except _psycopg2().Error:
        raise ConfigError("DATABASE_URL is not a valid connection URI or key=value string (check '%' escapes "
                          "and quotes); it is not shown, as it holds the password") from None


def _secrets(info: dict) -> list[str]:
    found = [info.get("password") or ""]
    if "dsn" in info:
        found.append(_parse_dsn(info["dsn"]).get("password") or "")
    return [s for s in found if s]


def _redact(text: str, secrets: Iterable[str]) -> str:
    text = re.sub(r"(://[^:/@\s]*:)[^@\s]*@", r"\1***@", text)
    text = re.sub(r"(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)", r"\1***", text, flags=re.IGNORECASE)
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


def _pg_message(exc: BaseException) -> str:
    """PostgreSQL's whole message: primary text, DETAIL and HINT (one line each, joined)."""
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if not primary:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
        return " / ".join(lines) if lines else type(exc).__name__
    parts = [primary]
    if diag.message_detail:
        parts.append(f"DETAIL: {diag.message_detail}")
    if diag.message_hint:
        parts.append(f"HINT: {diag.message_hint}")
    return " ".join(parts)


_LOGIN_PROBLEMS = ("password authentication failed", "no password supplied", "does not exist",
                   "authentication failed", "permission denied", "pg_hba.conf")


def connect_db(conninfo: dict, *, describe: str = "the database"):
    """Open a connection (fails within connect_timeout); raise ConnectError with the server's words."""
    psycopg2 = _psycopg2()
    info = dict(conninfo)
    info.setdefault("application_name", "fitbit-ingest")
    try:
        conn = psycopg2.connect(**info)
    except psycopg2.Error as exc:
        lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [repr(exc)]
        said = _redact(" / ".join(lines), _secrets(info))
        err = ConnectError(f"cannot connect to {describe}: {said}")
        if any(problem in said for problem in _LOGIN_PROBLEMS):
            err.exit_code = EXIT_USAGE
            err.hint = "check POSTGRES_USER, POSTGRES_PASSWORD and POSTGRES_DB (or DATABASE_URL)"
        elif "FATAL" not in said:
            err.hint = "is the database running and are POSTGRES_HOST/POSTGRES_PORT (or DATABASE_URL) right?"
        raise err from None
    conn.set_client_encoding("UTF8")
    return conn


MIN_TIMESCALEDB = (2, 0)  # timescaledb_information.dimensions, create_hypertable(migrate_data)
# What the server is, from its catalogs alone: nothing here loads TimescaleDB's library, which a
# server that does not preload it answers with a FATAL that ends the connection. Preloaded, it
# defines the setting timescaledb.license in every session of a database that has the extension
# (shared_preload_libraries itself is readable by superusers only).
_SERVER_SQL = """
SELECT coalesce(current_setting('timescaledb.license', true), '') <> '', pg_is_in_recovery(),
       (SELECT default_version FROM pg_available_extensions WHERE name = 'timescaledb'),
       (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'), current_setting('server_version')
"""


def check_server(conn) -> None:
    """Refuse, before anything else, a server that cannot take this loader's rows: TimescaleDB
    not installed, not preloaded, too old; a standby. Each is a ConfigError (exit 2) that names the
    setting and the fix: waiting and retrying (cron) would not help."""
    with conn.cursor() as cur:
        cur.execute(_SERVER_SQL)
        preloaded, recovering, available, installed, version = cur.fetchone()
    conn.commit()
    problem = None
    if recovering:
        problem = ConfigError("the server is a standby (in recovery): it cannot take writes")
        problem.hint = "point the loader at the primary server"
    elif available is None and installed is None:
        problem = ConfigError(f"TimescaleDB is not installed on this server (PostgreSQL {version})")
        problem.hint = "install the timescaledb package for this PostgreSQL major, preload it, and restart the server"
    elif installed is not None and not preloaded:
        problem = _not_preloaded()
    elif installed is not None and _version_tuple(installed) < MIN_TIMESCALEDB:
        problem = ConfigError(f"TimescaleDB {installed} in this database is older than this loader supports "
                              f"({'.'.join(map(str, MIN_TIMESCALEDB))} or newer)")
        problem.hint = "update it as its owner: ALTER EXTENSION timescaledb UPDATE (after installing a newer package)"
    if problem is not None:
        raise problem


def _not_preloaded(what: str = 'TimescaleDB is installed but not preloaded: the server ends every session that '
                   'touches it with "FATAL: extension "timescaledb" must be preloaded"') -> ConfigError:
    problem = ConfigError(what)
    problem.hint = ("add timescaledb to shared_preload_libraries (ALTER SYSTEM SET shared_preload_libraries = "
                    "'timescaledb', or postgresql.conf), then restart the server")
    return problem


def _extension_would_not_load(cfg: Config) -> bool:
    """After the session that applied the schema was lost: is the timescaledb extension still
    missing here, though the server has it? (A server that does not preload TimescaleDB ends the
    session that runs CREATE EXTENSION, before a database has it.)"""
    try:
        probe = connect_db({**cfg.conninfo, "connect_timeout": 3}, describe=cfg.describe_db())
    except IngestError:
        return False
    try:
        with probe.cursor() as cur:
            cur.execute("SELECT NOT EXISTS (SELECT FROM pg_extension WHERE extname = 'timescaledb') "
                        "AND EXISTS (SELECT FROM pg_available_extensions WHERE name = 'timescaledb')")
            return cur.fetchone()[0]
    except _psycopg2().Error:
        return False
    finally:
        probe.close()


def _version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", text)[:3])


def apply_schema(conn, schema_sql: str) -> None:
    """Apply sql/schema.sql in one transaction, serialised between loaders by an advisory lock.

    The schema's checksum is left as a comment on ingest_runs; when it is already there (and
    raw_data exists) the whole step is one catalog query, so a re-run pays nothing for it. (A
    CRC: it tells versions of one file apart, and zlib imports in a tenth of hashlib's time.)
    """
    import zlib

    marker = f"fitbit-ingest schema crc32 {zlib.crc32(schema_sql.encode()):08x}"
    check = ("SELECT to_regclass('public.raw_data') IS NOT NULL "
             "AND obj_description(to_regclass('public.ingest_runs'), 'pg_class') = %s")
    with conn.cursor() as cur:
        cur.execute(check, (marker,))
        if cur.fetchone()[0]:
            conn.commit()
            return
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        cur.execute(check, (marker,))  # another loader may have applied it while this one waited
        if cur.fetchone()[0]:
            conn.commit()
            return
        cur.execute(schema_sql)
        cur.execute("COMMENT ON TABLE public.ingest_runs IS %s", (marker,))
    conn.commit()


# The contract with downstream readers: these columns, these types, a key on all three.
_CONTRACT = {"user_id": "text", "metric": "text", "timestamp": "timestamp with time zone",
             "value": "double precision"}
_FIXES = {
    "timestamp": 'ALTER TABLE public.raw_data ALTER COLUMN "timestamp" TYPE timestamptz USING "timestamp" AT TIME ZONE '
                 "'UTC' (if the stored times are UTC)",
    "value": "ALTER TABLE public.raw_data ALTER COLUMN value TYPE double precision",
    "user_id": "ALTER TABLE public.raw_data ALTER COLUMN user_id TYPE text",
    "metric": "ALTER TABLE public.raw_data ALTER COLUMN metric TYPE text",
}


def check_table(conn) -> int:
    """Compare raw_data with the contract in sql/schema.sql before any row is written; return
    its chunk interval in seconds. A mismatch is a ConfigError naming the column and the fix."""
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass('public.raw_data') IS NOT NULL")
        if not cur.fetchone()[0]:
            raise ConfigError("table raw_data does not exist; run without --no-bootstrap once, or apply "
                              "sql/schema.sql")
        cur.execute("SELECT attname, format_type(atttypid, atttypmod), attnotnull, "
                    "pg_get_expr(d.adbin, d.adrelid) IS NOT NULL OR attidentity <> '' OR attgenerated <> '' "
                    "FROM pg_attribute a LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum "
                    "WHERE attrelid = 'public.raw_data'::regclass AND attnum > 0 AND NOT attisdropped")
        columns = {name: (kind, notnull, has_default) for name, kind, notnull, has_default in cur.fetchall()}
        for name, expected in _CONTRACT.items():
            if name not in columns:
                raise ConfigError(f'raw_data has no column "{name}" ({expected}); it does not match sql/schema.sql')
            if columns[name][0] != expected:
                raise ConfigError(f'raw_data column "{name}" is {columns[name][0]}, but the loader writes {expected}; '
                                  f"writing would lose information. Fix: {_FIXES[name]}")
        for name, (kind, notnull, has_default) in columns.items():
            if name not in _CONTRACT and notnull and not has_default:
                raise ConfigError(f'raw_data has an extra column "{name}" ({kind}) that is NOT NULL without a '
                                  f"default, so no row can be inserted. Fix: ALTER TABLE public.raw_data ALTER COLUMN "
                                  f'"{name}" DROP NOT NULL (or give it a default)')
        cur.execute("SELECT count(*) FROM pg_index i WHERE i.indrelid = 'public.raw_data'::regclass AND i.indisunique "
                    "AND (SELECT array_agg(a.attname::text ORDER BY a.attname) FROM unnest(i.indkey) AS k(n) "
                    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.n) "
                    "= ARRAY['metric', 'timestamp', 'user_id']")
        if not cur.fetchone()[0]:
            raise ConfigError('raw_data has no unique key on (user_id, metric, "timestamp"), which exactly-once '
                              'loading relies on. Fix: CREATE UNIQUE INDEX ON public.raw_data (user_id, metric, "timestamp") '
                              "(after removing duplicate rows)")
        cur.execute("SELECT extract(epoch FROM time_interval)::bigint FROM timescaledb_information.dimensions "
                    "WHERE hypertable_name = 'raw_data' AND column_name = 'timestamp' "
                    "AND hypertable_schema = 'public' LIMIT 1")
        found = cur.fetchone()
        if found is None:  # a plain table (or one partitioned on another column) is not what the schema makes
            raise ConfigError("public.raw_data is not a TimescaleDB hypertable partitioned on \"timestamp\"; it is "
                              "not the table sql/schema.sql makes. Fix: SELECT create_hypertable('public.raw_data', "
                              "'timestamp', migrate_data => TRUE) as its owner")
    conn.commit()
    return int(found[0]) if found[0] else 86_400


def _joined(lines: Iterable[str], size: int) -> Iterator[tuple[str, int]]:
    """COPY lines joined ``size`` at a time: (text, number of lines)."""
    batch: list[str] = []
    for line in lines:
        batch.append(line)
        if len(batch) >= size:
            yield "".join(batch), len(batch)
            batch = []
    if batch:
        yield "".join(batch), len(batch)


class _CopySource:
    """File-like object whose read() hands copy_expert the next batch of COPY lines.

    A producer thread joins lines into batches while the main thread sends the current one
    (psycopg2 releases the GIL while it sends), so Python and the server work at the same time and
    memory stays at a few batches. With ``keep``, every batch handed out is also written to a
    spool, so that after a key conflict the same rows can be sent again (``replay``) without
    reading the file again. ``watch`` (the connection's socket) ends a COPY early when the server
    speaks in the middle of it (an error, usually), instead of sending the rest of the file first.
    Batches made ahead by the read-ahead process (_Batches) are only taken off its pipe: read()
    takes them itself, with no thread (starting one cost more than it saved, at every file).
    """

    def __init__(self, lines: Iterator[str], batch_size: int, keep: bool, pulse: Callable[[], None],
                 numbered: bool = False) -> None:
        self._lines, self._batch, self._pulse, self._numbered = lines, batch_size, pulse, numbered
        self.sent = 0  # lines handed out (each once, replays not counted)
        self.exhausted = False
        self.error: BaseException | None = None  # raised by the reading: psycopg2 would hide it
        self.watch: int | None = None
        if keep:
            import tempfile

            self._spool = tempfile.SpooledTemporaryFile(  # noqa: SIM115 (closed in close())
                max_size=32 << 20, mode="w+", encoding="utf-8")
        else:
            self._spool = None
        self._keeping, self._replaying = keep, False
        self._made: Iterator[tuple[str, int]] | None = None  # batches read() takes itself
        if type(lines) is _Batches and not numbered:
            self._made, self._thread = lines, None
            return
        self._queue: queue.Queue = queue.Queue(maxsize=2)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._produce, name="copy-producer", daemon=True)
        self._thread.start()

    def _produce(self) -> None:
        try:
            lines = self._lines
            if type(lines) is _Batches:  # numbered: each line of them gets its number
                lines = (line + "\n" for text, _ in lines for line in text.split("\n")[:-1])
            if self._numbered:
                lines = (f"{n}\t{line}" for n, line in enumerate(lines, 1))
            for item in _joined(lines, self._batch):
                self._queue.put(item)
                if self._stop.is_set():
                    return
            self._queue.put(None)
        except BaseException as exc:  # noqa: BLE001 (handed to the consumer, which raises it)
            self._queue.put(exc)

    def read(self, size: int = -1) -> str:
        self._pulse()
        if self._replaying:
            chunk = self._spool.read(1 << 20)
            if chunk:
                return chunk
            self._replaying = False
        if self.exhausted or (self.watch is not None and select.select([self.watch], [], [], 0)[0]):
            return ""  # ends this COPY; the server's answer says why it spoke
        if self._made is not None:
            try:
                item = next(self._made, None)
            except BaseException as exc:
                self.exhausted, self.error = True, exc
                raise
        else:
            item = self._queue.get()
        if item is None:
            self.exhausted = True
            return ""
        if isinstance(item, BaseException):
            self.exhausted, self.error = True, item
            raise item
        text, count = item
        self.sent += count
        if self._keeping:
            self._spool.write(text)
        return text

    def replay(self) -> None:
        """Hand out again, from the start, what was handed out so far, then the rest."""
        self._spool.seek(0)
        self._keeping, self._replaying, self.watch = False, True, None

    def copy(self, cur, sql: str, before_sql: str = "") -> int:
        """Run COPY with this object as input, until the lines run out; return the rows loaded.
        ``before_sql`` (a SAVEPOINT, say) goes in the same round trip as the first COPY only."""
        loaded, first = 0, f"{before_sql}; {sql}" if before_sql else sql
        while True:
            before = self.sent
            try:
                cur.copy_expert(first, self, size=1 << 16)
                first = sql
            except _psycopg2().Error:
                error, self.error = self.error, None
                if error is not None:
                    raise error from None  # what went wrong in the file, not "COPY failed"
                raise
            loaded += cur.rowcount
            if self.exhausted and not self._replaying:
                return loaded
            # The server spoke without an error (a notice, say): go on in another COPY, and stop
            # watching if the socket stays readable without anything being sent.
            if self.sent == before:
                self.watch = None

    def close(self) -> None:
        if self._thread is not None:
            self._stop.set()
            while self._thread.is_alive():
                with contextlib.suppress(queue.Empty):
                    self._queue.get(timeout=0.05)  # unblock a producer waiting to put
            self._thread.join()
        close = getattr(self._lines, "close", None)
        if close is not None:
            close()
        if self._spool is not None:
            self._spool.close()


_STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS ingest_stage (
    seq BIGINT GENERATED BY DEFAULT AS IDENTITY, user_id TEXT NOT NULL, metric TEXT NOT NULL,
    ts TIMESTAMPTZ NOT NULL, value DOUBLE PRECISION NOT NULL
) ON COMMIT DROP
"""
_FIRST_PER_KEY = """
SELECT DISTINCT ON (user_id, metric, ts) user_id, metric, ts, value
FROM pg_temp.ingest_stage ORDER BY user_id, metric, ts, seq
"""
_MERGE_NOTHING_SQL = f"""
INSERT INTO public.raw_data (user_id, metric, "timestamp", value)
{_FIRST_PER_KEY}
ON CONFLICT (user_id, metric, "timestamp") DO NOTHING
"""
# Update mode: a key an earlier file of this run wrote (ingest_run_keys) is left alone, so the
# first record in order wins within a run; keys from earlier runs get the new value.
_MERGE_UPDATE_SQL = f"""
WITH src AS ({_FIRST_PER_KEY}),
fresh AS (
    INSERT INTO public.ingest_run_keys (run_id, user_id, metric, "timestamp")
    SELECT %(run_id)s, user_id, metric, ts FROM src
    ON CONFLICT DO NOTHING
    RETURNING user_id, metric, "timestamp" AS ts
),
merged AS (
    INSERT INTO public.raw_data (user_id, metric, "timestamp", value)
    SELECT src.user_id, src.metric, src.ts, src.value FROM src JOIN fresh USING (user_id, metric, ts)
    ON CONFLICT (user_id, metric, "timestamp") DO UPDATE SET value = EXCLUDED.value
    WHERE raw_data.value IS DISTINCT FROM EXCLUDED.value
    RETURNING (xmax = 0) AS inserted
)
SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM merged
"""
_COPY_DIRECT = 'COPY public.raw_data (user_id, metric, "timestamp", value) FROM STDIN'
_COPY_STAGE = "COPY pg_temp.ingest_stage (user_id, metric, ts, value) FROM STDIN"  # seq from the identity
_COPY_STAGE_NUMBERED = "COPY pg_temp.ingest_stage (seq, user_id, metric, ts, value) FROM STDIN"  # seq sent


def insert_records(conn, lines: Iterable[str], *, batch_size: int = 2000, on_conflict: str = "nothing",
                   run_id: int = 0, direct: bool = True, pulse: Callable[[], None] = lambda: None) -> Counts:
    """Insert rows, given as COPY text lines (``_copy_line(row)``), into raw_data inside the
    caller's transaction; return what the database reports: rows inserted, updated, duplicate.

    ``on_conflict="nothing"`` keeps existing rows: the lines are first COPY'd straight into
    raw_data (the fast path, unless ``direct`` is False), and only if a key is already present is
    that attempt rolled back to a savepoint and the same lines sent through a staging table, where
    the first occurrence of a key wins. ``"update"`` always stages, and stores the new value where
    the key exists with a different one (keys written earlier in run ``run_id`` are left alone).
    """
    unique_violation = _psycopg2().errors.UniqueViolation
    keep = direct and on_conflict == "nothing"
    # Staging from the start: the client numbers the lines (cheaper than the identity's nextval).
    source = _CopySource(iter(lines), batch_size, keep=keep, pulse=pulse, numbered=not keep)
    try:
        with conn.cursor() as cur:
            if direct and on_conflict == "nothing":
                source.watch = conn.fileno()
                try:  # (the savepoint is not released: the caller's commit ends it, one round trip less)
                    copied = source.copy(cur, _COPY_DIRECT, before_sql="SAVEPOINT ingest_direct")
                except unique_violation:
                    cur.execute("ROLLBACK TO SAVEPOINT ingest_direct")
                    source.replay()
                else:
                    _check_stored(copied, source.sent)
                    return Counts(rows_inserted=copied)
            cur.execute(_STAGE_SQL)
            staged = source.copy(cur, _COPY_STAGE if keep else _COPY_STAGE_NUMBERED)
            _check_sent(staged, source.sent)
            pulse()
            cur.execute("SET LOCAL work_mem = '256MB'")
            cur.execute(_INSERT_FILTERS_SQL)
            filtered = cur.fetchone()[0]
            if filtered:  # duplicates are then counted, not inferred: a dropped row is no duplicate
                cur.execute(_PRESENT_SQL)
                distinct, present = cur.fetchone()
            if on_conflict == "update":
                cur.execute(_MERGE_UPDATE_SQL, {"run_id": run_id})
                inserted, updated = cur.fetchone()
            else:
                cur.execute(_MERGE_NOTHING_SQL)
                inserted, updated = cur.rowcount, 0
            if filtered and on_conflict == "nothing":
                _check_stored(inserted, distinct - present)
            cur.execute("TRUNCATE pg_temp.ingest_stage")
            return Counts(rows_inserted=inserted, rows_updated=updated, rows_duplicate=staged - inserted - updated)
    finally:
        source.close()


def _check_sent(loaded: int, sent: int) -> None:
    if loaded != sent:
        raise DatabaseError(f"COPY reported {loaded} rows, but {sent} were sent")


def _check_stored(stored: int, expected: int) -> None:
    """Fewer rows stored than there were new keys: something in the database declined them."""
    if stored < expected:
        raise RowsDroppedError(
            f"the database stored {stored} of {expected} new rows: a trigger or rule on raw_data declined "
            f"{expected - stored} (the file was rolled back; it is tried again next run)")


# Is there anything on raw_data that may decline a row without an error (a BEFORE INSERT row
# trigger returning NULL, a rule)? TimescaleDB's own insert blocker raises instead.
_INSERT_FILTERS_SQL = """
SELECT EXISTS (SELECT FROM pg_trigger WHERE tgrelid = 'public.raw_data'::regclass AND NOT tgisinternal
               AND tgenabled <> 'D' AND tgtype & 7 = 7 AND tgname <> 'ts_insert_blocker')
    OR EXISTS (SELECT FROM pg_rewrite WHERE ev_class = 'public.raw_data'::regclass AND ev_type = '3')
"""
_PRESENT_SQL = f"""
SELECT count(*), count(*) FILTER (WHERE EXISTS (
    SELECT FROM public.raw_data r WHERE r.user_id = s.user_id AND r.metric = s.metric AND r."timestamp" = s.ts))
FROM ({_FIRST_PER_KEY}) s
"""


# ---------------------------------------------------------------------------------------------
# Stopping: signals and stalls
# ---------------------------------------------------------------------------------------------
class _Stop:
    """The one way a run stops early.

    A first SIGINT/SIGTERM asks the run to stop after the file in flight. A second one, or a
    database call that shows no progress for ``stall_timeout`` seconds (STOP_GRACE_SECONDS once a
    stop was asked), cuts the connection in flight: the statement fails at once, and its file rolls
    back whole. After a stall the loader reconnects and retries; after a signal it exits 130/143.

    Signals reach a watchdog thread through ``signal.set_wakeup_fd``, so all of this works while
    the main thread is blocked inside libpq (a frozen server, a full socket buffer). ``forward`` is
    called with each signal (the parent process passes it on to its workers).
    """

    def __init__(self, stall_timeout: float, forward: Callable[[int], None] | None = None) -> None:
        self.stall_timeout, self.forward = stall_timeout, forward
        self.signum: int | None = None
        self.aborted = False  # a second signal came: whatever error it surfaces as, it means "stop now"
        self.stalled = False  # the connection was cut for a stall: a lost connection, retried
        self.event = threading.Event()  # set by the first signal: sleeps between retries end early
        self._fd: int | None = None  # the socket of the connection being watched
        self._last = 0.0  # when the watched call last made progress
        self._busy: Callable[[], bool] | None = None  # asks the server whether it is working on the call
        self._grace = STOP_GRACE_SECONDS  # how long the watched call may be silent once a stop was asked
        self._pipe = os.pipe()
        self._done = threading.Event()
        self._old: dict = {}
        self._thread = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)

    # --- installed by main (or a worker process), removed when it ends --------------------------
    def install(self, signals: Sequence[int] = (signal.SIGINT, signal.SIGTERM)) -> _Stop:
        os.set_blocking(self._pipe[1], False)
        self._old_wakeup = None
        if threading.current_thread() is threading.main_thread():  # only there can signals be caught
            for sig in signals:
                self._old[sig] = signal.signal(sig, self._ignore)
            self._old_wakeup = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
        self._thread.start()
        return self

    def uninstall(self) -> None:
        self._done.set()
        os.write(self._pipe[1], b"\0")  # wakes the watchdog now, not at its next tick
        self._thread.join()
        if self._old_wakeup is not None:
            signal.set_wakeup_fd(self._old_wakeup)
        for sig, handler in self._old.items():
            signal.signal(sig, handler)
        for fd in self._pipe:
            os.close(fd)

    @staticmethod
    def _ignore(signum, frame) -> None:
        """The Python-level handler does nothing: the watchdog thread has already seen the signal."""

    # --- used by the loader ----------------------------------------------------------------------
    @contextlib.contextmanager
    def watching(self, conn, busy: Callable[[], bool] | None = None,
                 grace: float = STOP_GRACE_SECONDS) -> Iterator[None]:
        """Database calls inside may be cut when they stall or a second signal comes, or when they
        stay silent ``grace`` seconds after a first one. ``busy`` asks the server, over another
        connection, whether it is still working on the call (a long statement is not a stall); it
        returns False when the server cannot be reached or waits for us."""
        self.stalled = False
        self._last, self._fd, self._busy, self._grace = time.monotonic(), conn.fileno(), busy, grace
        try:
            yield
        finally:
            self._fd = self._busy = None

    def pulse(self) -> None:
        """The watched call made progress (a batch handed to COPY, a statement started)."""
        self._last = time.monotonic()

    def check(self) -> None:
        """Raise Interrupted if a second signal came (for loops that touch no database)."""
        if self.aborted:
            raise Interrupted(self.signum or signal.SIGINT, "in the middle of a file (it was rolled back)")

    # --- the watchdog thread ---------------------------------------------------------------------
    def _watch(self) -> None:
        while not self._done.is_set():
            if select.select([self._pipe[0]], [], [], 0.25)[0]:
                for signum in os.read(self._pipe[0], 64):
                    self._signal(signum)
            fd, limit = self._fd, self._grace if self.signum is not None else self.stall_timeout
            if fd is not None and limit and time.monotonic() - self._last > limit:
                if self.signum is None and self._busy is not None and self._busy():
                    self._last = time.monotonic()  # a long statement the server is working on: not a stall
                    continue
                if self._fd != fd:
                    continue  # the call ended while the server was asked
                if self.signum is not None:
                    self.aborted = True
                    log.warning("the database did not answer for %.0fs after the stop request: cancelling", limit)
                else:
                    self.stalled = True
                    log.warning("no progress from the database for %.0fs (STALL_TIMEOUT): dropping the connection",
                                limit)
                self._cut(fd)

    def _signal(self, signum: int) -> None:
        if signum not in (signal.SIGINT, signal.SIGTERM):
            return
        if self.forward is not None:
            self.forward(signum)
        if self.signum is None:
            self.signum = signum
            self.event.set()
            log.warning("received %s: stopping after the current file (a second signal stops at once)",
                        signal.Signals(signum).name)
            return
        self.aborted = True
        log.warning("received %s again: stopping now; the file in flight is rolled back",
                    signal.Signals(signum).name)
        fd = self._fd
        if fd is not None:
            self._cut(fd)

    def _cut(self, fd: int) -> None:
        """Shut the socket down under libpq: a blocked send or receive returns with an error at once."""
        self._fd = None
        with contextlib.suppress(OSError):
            import socket

            sock = socket.socket(fileno=os.dup(fd))
            try:
                sock.shutdown(socket.SHUT_RDWR)
            finally:
                sock.close()


# ---------------------------------------------------------------------------------------------
# Orchestration: one file, then a run
# ---------------------------------------------------------------------------------------------
# A file's status in a run: loaded; skipped (unchanged since it loaded); failed (in this run);
# failed_before (unchanged since its bytes failed: not loaded); busy (another loader has it);
# checked (--dry-run); ignored (inside an export, but holding no data this loader reads).
FILE_STATUSES = ("loaded", "skipped", "failed", "failed_before", "busy", "checked", "ignored")


class FileResult:
    """One per file in the summary (slots: 100,000 files stay small)."""

    __slots__ = ("counts", "error", "file", "kind", "seconds", "status")

    def __init__(self, file: str, status: str, counts: Counts | None = None, error: str | None = None,
                 seconds: float = 0.0, kind: str = "json") -> None:
        self.file, self.status, self.counts, self.error = file, status, counts or Counts(), error
        self.seconds = seconds
        self.kind = kind  # the source file type: json, jsonl, or a Fitbit kind

    def __repr__(self) -> str:
        return f"FileResult({self.fields()})"

    def fields(self) -> dict:
        return {"file": self.file, "status": self.status, **self.counts.as_dict(), "error": self.error,
                "seconds": self.seconds, "kind": self.kind}


class Summary:
    """The run's: every file's result, files by status, the counts added up."""

    def __init__(self) -> None:
        self.run_id: int | None = None
        self.files: Counter = Counter()  # status -> number of files
        self.counts = Counts()
        self.seconds = 0.0
        self.status = "running"
        self.error: str | None = None
        self.results: list[FileResult] = []

    def add(self, result: FileResult) -> None:
        self.results.append(result)
        self.files[result.status] += 1
        self.counts += result.counts

    def by_source(self) -> dict[str, dict]:
        """Per source file type: files by status, records read and rejected, rows inserted."""
        sources: dict[str, tuple[Counter, Counts]] = {}
        for r in self.results:
            kind = r.kind or "unlisted"
            if kind not in sources:
                sources[kind] = (Counter(), Counts())
            files, counts = sources[kind]
            files[r.status] += 1
            counts += r.counts
        return {kind: {"files": dict(files), **counts.as_dict()} for kind, (files, counts) in sorted(sources.items())}

    @property
    def not_loaded(self) -> int:
        """Files under DATA_DIR this run leaves unloaded: failed, failed before, or held elsewhere."""
        return self.files["failed"] + self.files["failed_before"] + self.files["busy"]

    def fields(self) -> dict:
        files = {f"files_{status}": self.files[status] for status in FILE_STATUSES}
        return {"run_id": self.run_id, "files_seen": len(self.results) - self.files["ignored"], **files,
                **self.counts.as_dict(), "seconds": self.seconds, "status": self.status, "error": self.error}

    def line(self) -> str:
        data = self.fields()
        keys = ["files_seen", "files_loaded", "files_skipped", "files_failed", "files_failed_before", "files_busy",
                *_COUNT_FIELDS]
        if self.files["checked"]:
            keys = ["files_seen", "files_checked", "files_failed", "records_read", "records_rejected", "rows_duplicate"]
        return " ".join(f"{k}={data[k]}" for k in keys) + f" seconds={self.seconds:.2f}"


_MANIFEST_COLUMNS = ("size, mtime_ns, sha256, status, error, records_done, settings, records_read, records_rejected, "
                     "rows_inserted, rows_updated, rows_duplicate")
# Claim a file: its manifest row, made if missing, locked for this transaction. A row another
# loader holds (or is making) answers "lock not available" after lock_timeout: the file is busy.
# Row locks are exact: two different paths never block each other. Only the lock waits: then
# lock_timeout is 0 again, and the savepoint a failed file rolls back to is set, in the same round
# trip (the row is read again last, as only the last statement's rows come back).
_CLAIM_SQL = f"""
SET LOCAL synchronous_commit = off;
SET LOCAL statement_timeout = %(timeout_ms)s;
SET LOCAL lock_timeout = %(wait_ms)s;
INSERT INTO public.ingest_files (data_dir, path, size, mtime_ns, status) VALUES (%(data_dir)s, %(path)s, -1, -1, 'new')
ON CONFLICT DO NOTHING;
SELECT FROM public.ingest_files WHERE data_dir = %(data_dir)s AND path = %(path)s FOR UPDATE;
SET LOCAL lock_timeout = 0;
SAVEPOINT ingest_file;
SELECT {_MANIFEST_COLUMNS} FROM public.ingest_files WHERE data_dir = %(data_dir)s AND path = %(path)s
"""
_MANIFEST_UPDATE = """
UPDATE public.ingest_files SET size = %(size)s, mtime_ns = %(mtime_ns)s, sha256 = %(sha256)s, status = %(status)s,
    error = %(error)s, records_done = %(records_done)s, records_read = %(records_read)s,
    records_rejected = %(records_rejected)s, rows_inserted = %(rows_inserted)s, rows_updated = %(rows_updated)s,
    rows_duplicate = %(rows_duplicate)s, settings = %(settings)s, loaded_at = now(), run_id = %(run_id)s
WHERE data_dir = %(data_dir)s AND path = %(path)s
"""
_MANIFEST_COMMIT = f"{_MANIFEST_UPDATE}; COMMIT; BEGIN"  # (see _Loader._commit)


class _Lost(Exception):
    """The connection was lost or stalled: the file is tried again over a new one."""


class _Claim(NamedTuple):
    """A file claimed for loading: where to start, and what earlier parts already did."""

    stat: os.stat_result
    resume_after: int  # records committed by an earlier, unfinished load of the same bytes
    counts: Counts  # what those records did
    direct: bool  # try the direct COPY (False: the file loaded before, its keys are mostly there)


class _Loader:
    """Loads files one at a time over its own connection; one per process."""

    def __init__(self, cfg: Config, run_id: int | None, stop: _Stop, chunk_seconds: int,
                 known: dict | None = None, progress: _Progress | None = None, helper: bool = False) -> None:
        self.cfg, self.run_id, self.stop, self.chunk_seconds = cfg, run_id, stop, chunk_seconds
        self.helper = helper  # the only loader of the run: a large file's far half may go to a helper
        self.known = known or {}  # manifest at the start: path -> (size, mtime_ns, status, error, settings)
        self.data_dir = _data_dir_key(cfg)  # with the path, a file's key in the manifest
        self.other_settings: Counter = Counter()  # unchanged files loaded with other settings, by those settings
        self.progress = progress
        self.rejects = _Rejects(cfg.reject_file, run_id)
        self.make_line = _LineMaker(cfg.source_tz)
        self.conn = None
        self.ahead: _ReadAhead | None = None  # the helper making the next files' rows (read_ahead)
        self.ahead_files: list[DataFile] | None = None  # the files it is for, until it starts
        self.heartbeat_at = time.monotonic()
        self.in_file = False  # inside a claimed file's transaction, after its savepoint
        # the file in flight, as committed: records done, its counts, and this run's part of them
        self.committed = (0, Counts(), Counts())

    # --- the pipeline for one file ---------------------------------------------------------------
    def settings_of(self, df: DataFile) -> str:
        """The settings that shape a file's rows, as the manifest records them."""
        user = f"user_id={df.user_id}; " if df.user_id else ""
        return f"{user}source_timezone={self.cfg.source_tz}; format={self.cfg.source_format}"

    def _unchanged(self, df: DataFile, status: str, error: str | None, settings: str | None) -> FileResult:
        if settings is not None and settings != self.settings_of(df):
            self.other_settings[settings] += 1
        return _unchanged_result(df, status, error)

    def warn_of_other_settings(self) -> None:
        """Once a run: unchanged files skipped that were loaded with other settings than this run's."""
        for settings, count in self.other_settings.items():
            log.warning("%d unchanged file(s) were loaded with other settings (%s) than this run's: not loaded "
                        "again. To load them with these, see docs/operations.md, 'Loaded with the wrong settings'",
                        count, settings)
        self.other_settings.clear()

    def _load_file(self, conn, df: DataFile, wait_ms: int) -> FileResult:
        """Claim → read and validate → insert → record → commit (per part: usually one)."""
        claim = self._claim(conn, df, wait_ms)
        if isinstance(claim, FileResult):
            return claim  # unchanged, unchanged and bad, or another loader's
        rows = self._rows(df, claim)
        total, here = claim.counts, Counts()  # the file's counts (earlier runs' parts too), this run's
        partial_sha256 = None
        try:
            while True:
                part = insert_records(conn, rows.part(), batch_size=self.cfg.batch_size,
                                      on_conflict=self.cfg.on_conflict, run_id=self.run_id or 0,
                                      direct=claim.direct, pulse=self.stop.pulse)
                part += rows.take_counts()
                total += part
                here += part
                status = "loaded" if rows.finished else "partial"
                # (a part committed: the whole file's hash, for a later run to prove a resume with)
                sha256 = rows.digest.hexdigest() if rows.finished else partial_sha256 or _file_sha256(df.path)
                partial_sha256 = sha256
                self._commit(conn, df, claim.stat, status, total, rows.done, sha256)
                self.committed = (rows.done, total.copy(), here.copy())
                if rows.finished:
                    break
                if not self._reclaim(conn, df, rows.done):
                    return FileResult(df.rel, "busy", here, "another loader took over between its parts")
        finally:
            rows.close()
        rows.warn()
        return FileResult(df.rel, "loaded", here)

    def _rows(self, df: DataFile, claim: _Claim) -> _FileRows | _AheadRows:
        """The file's rows: made ahead by the helper process when it has them, else read here."""
        progress = self.progress.reading(df) if self.progress else None
        if claim.resume_after == 0:  # (a file resumed is read here, from its start, to the records to skip)
            if self.ahead_files is not None:
                self._start_read_ahead(df)
            rows = self.ahead.take(df, claim.stat, self.rejects, progress) if self.ahead is not None else None
            if rows is not None:
                return rows
        return _FileRows(df, self.make_line, self.rejects, self.chunk_seconds, claim.resume_after, progress,
                         self.helper)

    def _claim(self, conn, df: DataFile, wait_ms: int) -> _Claim | FileResult:
        try:
            st = df.path.stat()
        except OSError as exc:
            raise FileReadError(f"cannot read file: {exc.strerror or exc}") from None
        psycopg2 = _psycopg2()
        with conn.cursor() as cur:
            try:
                cur.execute(_CLAIM_SQL, {"data_dir": self.data_dir, "path": df.rel,
                                         "timeout_ms": self.cfg.statement_timeout * 1000, "wait_ms": wait_ms})
            except psycopg2.errors.LockNotAvailable:
                conn.rollback()
                return FileResult(df.rel, "busy")
            size, mtime_ns, sha256, status, error, done, settings, *counts = cur.fetchone()
            same = size == st.st_size and (mtime_ns == st.st_mtime_ns or (
                sha256 is not None and _file_sha256(df.path) == sha256))
            if same and mtime_ns != st.st_mtime_ns:
                cur.execute("UPDATE public.ingest_files SET mtime_ns = %s WHERE data_dir = %s AND path = %s",
                            (st.st_mtime_ns, self.data_dir, df.rel))
            if same and status in ("loaded", "failed") and not self.cfg.force:
                conn.commit()
                return self._unchanged(df, status, error, settings)
        self.in_file = True
        # A resume must prove it is the same file: its content hash, taken when its first part committed.
        if same and status in ("partial", "error") and done and sha256 is not None and _file_sha256(df.path) == sha256:
            log.info("%s: resuming after record %d (committed by an earlier run)", df.rel, done)
            self.committed = (done, Counts(*counts), Counts())
            return _Claim(st, done, Counts(*counts), direct=True)
        self.committed = (0, Counts(), Counts())
        return _Claim(st, 0, Counts(), direct=status not in ("loaded", "failed"))

    def _reclaim(self, conn, df: DataFile, done: int) -> bool:
        """After a part's commit: lock the file again, unless another loader took it over."""
        psycopg2 = _psycopg2()
        with conn.cursor() as cur:
            try:
                cur.execute(_CLAIM_SQL, {"data_dir": self.data_dir, "path": df.rel,
                                         "timeout_ms": self.cfg.statement_timeout * 1000, "wait_ms": CLAIM_WAIT_MS})
            except psycopg2.errors.LockNotAvailable:
                conn.rollback()
                return False
            if cur.fetchone()[5] != done:
                conn.rollback()
                return False
        self.in_file = True  # a later part's failure is recorded on the row, as the first part's would be
        return True

    def _commit(self, conn, df: DataFile, st: os.stat_result, status: str, counts: Counts, done: int,
                sha256: str | None, error: str | None = None) -> None:
        """Record the file (or its part) in the manifest and commit it with its rows, in one round
        trip that also begins the next transaction (psycopg2, which does not see the COMMIT, takes
        the connection to be in the same one; close() commits it, empty, at the end). Rejects are
        written first: if they cannot be, the file rolls back (nothing is lost; a failure between
        the two can repeat reject lines, never rows)."""
        try:
            self.rejects.publish()
        except RejectFileError:
            _rollback(conn)
            raise
        with conn.cursor() as cur:
            cur.execute(_MANIFEST_COMMIT, {"data_dir": self.data_dir, "path": df.rel, "size": st.st_size,
                                           "mtime_ns": st.st_mtime_ns, "sha256": sha256, "status": status,
                                           "error": error, "records_done": done, "settings": self.settings_of(df),
                                           "run_id": self.run_id, **counts.as_dict()})
        self.in_file = False

    # --- around the pipeline: retries and failures -----------------------------------------------
    def load(self, df: DataFile, wait_ms: int = CLAIM_WAIT_MS) -> FileResult:
        """Load one file. A lost (or stalled) connection is retried with backoff; any other
        failure is the file's alone: it is rolled back, recorded with its reason, and the run goes on.
        ``wait_ms``: how long to wait for the file when another loader holds it."""
        started, delay = time.monotonic(), RETRY_FIRST_DELAY
        if df.error or df.kind == "ignored":
            return FileResult(df.rel, "failed" if df.error else "ignored", error=df.error, kind=df.kind)
        for attempt in range(1, RETRY_ATTEMPTS + 1):
            try:
                result = self._known_unchanged(df) or self._attempt(df, wait_ms, retrying=attempt > 1)
            except _Lost as lost:
                self.rejects.discard()  # the file starts over
                self._drop_connection()
                if attempt == RETRY_ATTEMPTS:
                    raise DatabaseError(f"while loading {df.rel}: {lost} (gave up after {attempt} attempts)") from None
                log.warning("%s: %s; retrying in %.1fs (attempt %d of %d)", df.rel, lost, delay, attempt + 1,
                            RETRY_ATTEMPTS)
                if self.stop.event.wait(delay):
                    raise Interrupted(self.stop.signum or signal.SIGTERM) from None
                delay = min(delay * 2, RETRY_MAX_DELAY)
                continue
            result.seconds, result.kind = round(time.monotonic() - started, 3), df.kind
            return result
        raise AssertionError("unreachable")  # pragma: no cover

    def _known_unchanged(self, df: DataFile) -> FileResult | None:
        """The file's result when the manifest, as read at the start of the run, shows it loaded
        (or failed) with the same size and mtime: no connection, no round trip. Otherwise None,
        and the claim decides (on the manifest row itself)."""
        seen = self._known_state(df)
        return None if seen is None else self._unchanged(df, *seen[2:5])

    def _known_state(self, df: DataFile) -> tuple | None:
        """The file's manifest row as read at the start, when it shows the file loaded (or failed)
        with the size and mtime it has now; else None."""
        seen = self.known.get(df.rel)
        if not seen or self.cfg.force or seen[2] not in ("loaded", "failed"):
            return None
        try:
            st = df.path.stat()
        except OSError:
            return None  # the claim says why
        return seen if seen[:2] == (st.st_size, st.st_mtime_ns) else None

    def _attempt(self, df: DataFile, wait_ms: int, retrying: bool) -> FileResult:
        """One try of the pipeline; the file's own failures become a failed result. Raises _Lost
        when the connection was lost or stalled, or the lost one still holds the file's claim."""
        self.in_file, self.committed = False, (0, Counts(), Counts())  # nothing of this file yet
        try:
            conn = self._connection()
            with self.stop.watching(conn, functools.partial(self._server_busy, conn.info.backend_pid)):
                result = self._load_file(conn, df, wait_ms)
        except (FileFormatError, FileReadError, RowsDroppedError) as exc:
            return self._fail(df, exc, "failed" if isinstance(exc, FileFormatError) else "error")
        except OSError as exc:  # a spool on a full disk, say: the file's problem, tried again next run
            return self._fail(df, _io_error(exc), "error")
        except ConnectError as exc:
            if exc.exit_code == EXIT_USAGE:
                raise
            raise _Lost(str(exc)) from None
        except _psycopg2().Error as exc:
            self.rejects.discard()
            self.stop.check()
            if self.stop.stalled:
                raise _Lost("no progress from the database for STALL_TIMEOUT") from None
            if _is_transient(exc):
                raise _Lost(_pg_message(exc)) from None
            return self._fail(df, exc, "error")
        if result.status == "busy" and retrying:
            raise _Lost("the file is still claimed by this loader's lost connection")
        return result

    def _fail(self, df: DataFile, exc: BaseException, status: str) -> FileResult:
        """Roll the file back (to its claim), record why, and go on. ``status`` is "failed" when the
        cause is in the file's bytes (skipped until they change), "error" when it may go away."""
        reason = _storable(str(exc) if isinstance(exc, IngestError) else f"the database refused it: {_pg_message(exc)}")
        self.rejects.discard()
        self.rejects.add(df.rel, None, f"file failed: {reason}")
        done, counts, here = self.committed  # parts committed before the failure stay, and count
        result = FileResult(df.rel, "failed", here.copy(), error=reason)
        conn = self.conn
        if conn is not None and not conn.closed and self.in_file:
            try:
                with conn.cursor() as cur:
                    cur.execute("ROLLBACK TO SAVEPOINT ingest_file")
                self._commit(conn, df, df.path.stat(), status, counts, done, None, reason)
                return result
            except (OSError, ValueError, _psycopg2().Error) as recording:  # the failure is still reported, the
                log.warning("%s: could not record its failure: %s", df.rel, recording)  # file tried again next run
        if conn is not None and not conn.closed:
            _rollback(conn)
        self.rejects.publish()
        return result

    def _server_busy(self, pid: int) -> bool:
        """Over a second, short-lived connection: is backend ``pid`` working (or waiting on a lock,
        or unseen, as behind a pooler), rather than unreachable or waiting for this client?"""
        try:
            probe = connect_db({**self.cfg.conninfo, "connect_timeout": 3}, describe=self.cfg.describe_db())
        except IngestError:
            return False
        try:
            with probe.cursor() as cur:
                cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
                row = cur.fetchone()
        except _psycopg2().Error:
            return False
        finally:
            probe.close()
        return row is None or row[0] != "Client"

    def _connection(self):
        if self.conn is None or self.conn.closed:
            self.conn = connect_db(self.cfg.conninfo, describe=self.cfg.describe_db())
        return self.conn

    def _drop_connection(self) -> None:
        if self.conn is not None:
            _rollback(self.conn)
            self.conn.close()
        self.conn = None

    def heartbeat(self) -> None:
        """Between files, at most every HEARTBEAT_SECONDS: this run is alive (see _start_run)."""
        if time.monotonic() - self.heartbeat_at >= HEARTBEAT_SECONDS and self.run_id is not None:
            self.heartbeat_at = time.monotonic()
            with contextlib.suppress(_psycopg2().Error, IngestError):
                conn = self._connection()
                with self.stop.watching(conn):
                    _heartbeat(conn, self.run_id)

    def read_ahead(self, files: list[DataFile]) -> None:
        """Let a helper process make the rows of ``files`` ahead of the loader, from the first file
        this run loads on (a run that finds nothing to load starts none)."""
        self.ahead_files = files

    def _start_read_ahead(self, df: DataFile) -> None:
        """The helper, for the files from ``df`` on that this run will load: not those known
        unchanged, and not files big enough for the far half's helper (FAR_HALF_MIN_BYTES),
        which are read here, with it."""
        files, self.ahead_files = self.ahead_files, None
        at = next((i for i, f in enumerate(files) if f.rel == df.rel), len(files))
        ahead = [f for f in files[at:] if f.error is None and f.kind != "ignored" and self._known_state(f) is None
                 and _size_or_zero(f.path) < FAR_HALF_MIN_BYTES]
        self.ahead = _ReadAhead.start(ahead, self.cfg, self.run_id, self.chunk_seconds)

    def close(self) -> None:
        """End the connection: a last synchronous commit makes every earlier one durable."""
        self.warn_of_other_settings()
        if self.ahead is not None:
            self.ahead.close()
        self.rejects.close()
        if self.conn is None or self.conn.closed:
            return
        psycopg2 = _psycopg2()
        try:
            with self.stop.watching(self.conn, grace=END_GRACE_SECONDS):
                status = self.conn.info.transaction_status
                if status == psycopg2.extensions.TRANSACTION_STATUS_IDLE or (
                        status == psycopg2.extensions.TRANSACTION_STATUS_INTRANS and not self.in_file):
                    with self.conn.cursor() as cur:
                        # Files commit without waiting for their WAL flush (a crash can undo the
                        # last fraction of a second of commits: whole files with their manifest
                        # rows, loaded again next run); this synchronous commit flushes all of them.
                        cur.execute("SET LOCAL synchronous_commit = on; SELECT txid_current()")
                    self.conn.commit()
                else:
                    self.conn.rollback()
        except psycopg2.Error as exc:
            log.warning("could not flush the last commits to disk: %s", _pg_message(exc))
        finally:
            self.conn.close()


def _unchanged_result(df: DataFile, status: str, error: str | None) -> FileResult:
    if status == "failed":
        return FileResult(df.rel, "failed_before", error=f"unchanged since it failed: {error}")
    return FileResult(df.rel, "skipped")


def _is_transient(exc: BaseException) -> bool:
    """Connection lost, server restarting, serialization failure or deadlock: worth a retry."""
    psycopg2 = _psycopg2()
    if isinstance(exc, psycopg2.extensions.TransactionRollbackError):
        return True
    if isinstance(exc, (psycopg2.OperationalError, psycopg2.InterfaceError)):
        return exc.pgcode is None or exc.pgcode.startswith(("08", "57P"))
    return False


def _rollback(conn) -> None:
    with contextlib.suppress(_psycopg2().Error):
        conn.rollback()  # a connection that is gone has been rolled back by the server already


# --- the run: run log, sequential and parallel loading, dry run -------------------------------
def _start_run(conn, cfg: Config) -> int:
    """Insert this run's row. Mark as interrupted the runs that are gone: silent for
    STALE_RUN_MINUTES, or started on this host by a process that no longer exists."""
    with conn.cursor() as cur:
        cur.execute("SELECT run_id, host, pid, coalesce(heartbeat_at, started_at) < now() - "
                    f"interval '{STALE_RUN_MINUTES} minutes' FROM public.ingest_runs WHERE status = 'running'")
        here = _hostname()
        stale = [run_id for run_id, host, pid, silent in cur.fetchall() if silent or (host == here and not _alive(pid))]
        if stale:
            cur.execute("UPDATE public.ingest_runs SET status = 'interrupted', finished_at = now() WHERE run_id = ANY(%s)",
                        (stale,))
            cur.execute("DELETE FROM public.ingest_run_keys WHERE run_id = ANY(%s)", (stale,))
        cur.execute("INSERT INTO public.ingest_runs (host, pid, version, data_dir, on_conflict, heartbeat_at) "
                    "VALUES (%s, %s, %s, %s, %s, now()) RETURNING run_id",
                    (here, os.getpid(), __version__, _data_dir_key(cfg),
                     cfg.on_conflict))
        run_id = cur.fetchone()[0]
    conn.commit()
    return run_id


def _hostname() -> str:
    """socket.gethostname() without importing socket (a few milliseconds of every run's start)."""
    if hasattr(os, "uname"):
        return os.uname().nodename
    import socket  # Windows

    return socket.gethostname()


def _alive(pid: int) -> bool:
    """Is a process of this host (and PID namespace) still running under ``pid``?"""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # it exists, owned by someone else
    return True


def _heartbeat(conn, run_id: int) -> None:
    with conn.cursor() as cur:
        cur.execute("UPDATE public.ingest_runs SET heartbeat_at = now() WHERE run_id = %s", (run_id,))
    conn.commit()


def _finish_run(cfg: Config, conn, summary: Summary, stop: _Stop) -> None:
    """Record the run's outcome; reconnect once if the connection was lost meanwhile. Watched like
    any database call: a server that froze (a backend stopped while it held WAL, say, so that no
    commit can complete) cannot hold the loader; after a stop request it gets END_GRACE_SECONDS."""
    psycopg2 = _psycopg2()
    data = summary.fields()
    counts = {k: data[k] for k in ("files_seen", "files_loaded", *_COUNT_FIELDS)}
    counts["files_failed"] = summary.not_loaded
    counts["files_skipped"] = data["files_skipped"] + data["files_busy"]
    sets = ", ".join(f"{k} = %({k})s" for k in counts)
    for attempt in (1, 2):
        try:
            if attempt == 2 or conn.closed:
                conn = connect_db(cfg.conninfo, describe=cfg.describe_db())
            with stop.watching(conn, grace=END_GRACE_SECONDS), conn.cursor() as cur:
                cur.execute(f"UPDATE public.ingest_runs SET finished_at = now(), status = %(status)s, "
                            f"error = %(error)s, {sets} WHERE run_id = %(run_id)s",
                            {**counts, "status": summary.status, "error": _storable(summary.error),
                             "run_id": summary.run_id})
                cur.execute("DELETE FROM public.ingest_run_keys WHERE run_id = %s", (summary.run_id,))
                conn.commit()
            return
        except (psycopg2.Error, IngestError) as exc:
            if attempt == 2 or stop.aborted or stop.stalled:  # the last try, or cut: no second one
                log.warning("could not record the end of run %s in ingest_runs: %s", summary.run_id,
                            _pg_message(exc) if isinstance(exc, psycopg2.Error) else exc)
                return
        finally:
            conn.close()


def _report(summary: Summary, result: FileResult, progress: _Progress | None) -> None:
    summary.add(result)
    if progress is not None:
        progress.file_done(result.file)
    if result.status in ("ignored", "skipped") and not log.isEnabledFor(logging.DEBUG):
        return  # one line each at DEBUG only: a re-run over 10,000 unchanged files says so in its summary
    fields = {"fields": {"event": "file", **result.fields()}}
    if result.status == "ignored":
        log.debug("ignored %s: it holds no data this loader reads", result.file, extra=fields)
    elif result.status == "skipped":
        log.debug("skipped %s: unchanged", result.file, extra=fields)
    elif result.status == "busy":
        log.info("skipped %s: claimed by another loader%s", result.file,
                 f" ({result.error})" if result.error else "", extra=fields)
    elif result.status == "failed_before":
        log.error("not loaded %s: %s", result.file, result.error, extra=fields)
    else:
        c = result.counts
        log.log(logging.ERROR if result.status == "failed" else logging.INFO,
                "%s %s: read=%d rejected=%d inserted=%d updated=%d duplicate=%d (%.2fs)%s",
                result.status, result.file, c.records_read, c.records_rejected, c.rows_inserted, c.rows_updated,
                c.rows_duplicate, result.seconds, f" - {result.error}" if result.error else "", extra=fields)


def _load_each(loader: _Loader, files: Iterable[DataFile], stop: _Stop) -> Iterator[FileResult]:
    """Load files in order. One another loader holds (busy) is tried again at the end, waiting
    for it: by then that loader has usually finished it (and it is skipped as unchanged), or the
    server has ended a lost connection that still held it."""
    busy = []
    for df in files:
        if stop.signum is not None:
            return
        result = loader.load(df)
        if result.status == "busy":
            busy.append(df)
        else:
            yield result
        loader.heartbeat()
    wait_ms = min(CLAIM_WAIT_AGAIN_MS, int(loader.cfg.stall_timeout * 500) or CLAIM_WAIT_AGAIN_MS)
    for df in busy:
        if stop.signum is not None:
            return
        result = loader.load(df, wait_ms)
        if result.status == "busy":
            result.error = result.error or f"still claimed by another loader after waiting {wait_ms / 1000:g}s"
        yield result


def _load_sequential(cfg: Config, run_id: int, files: list[DataFile], summary: Summary, stop: _Stop,
                     progress: _Progress | None, known: dict, chunk_seconds: int) -> None:
    loader = _Loader(cfg, run_id, stop, chunk_seconds, known, progress, helper=True)
    try:
        loader.read_ahead(files)
        for result in _load_each(loader, files, stop):
            _report(summary, result, progress)
    finally:
        loader.close()
    if stop.signum is not None and len(summary.results) < len(files):
        raise Interrupted(stop.signum)


def _worker_main(cfg: Config, run_id: int, known: dict, chunk_seconds: int, tasks, results) -> None:
    """A worker process: load files from ``tasks`` until it is empty or a stop is asked."""
    _setup_logging(cfg.log_level, cfg.log_format)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C goes to the parent, which passes it on
    stop = _Stop(cfg.stall_timeout).install((signal.SIGTERM,))
    loader = _Loader(cfg, run_id, stop, chunk_seconds, known)
    try:
        for result in _load_each(loader, iter(tasks.get, None), stop):
            results.put(("file", result))
    except IngestError as exc:
        results.put(("error", str(exc), exc.exit_code, exc.hint))
    finally:
        loader.close()
        stop.uninstall()
        results.put(("done", os.getpid()))


def _load_parallel(cfg: Config, run_id: int, files: list[DataFile], summary: Summary, stop: _Stop,
                   progress: _Progress | None, known: dict, chunk_seconds: int, conn) -> None:
    """Hand files to worker processes; each claims its file through the same manifest row lock."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    tasks, results = context.Queue(), context.Queue()
    for df in files:
        tasks.put(df)
    count = min(cfg.workers, len(files))
    for _ in range(count):
        tasks.put(None)
    procs = [context.Process(target=_worker_main, args=(cfg, run_id, known, chunk_seconds, tasks, results),
                             daemon=True) for _ in range(count)]
    for proc in procs:
        proc.start()
    stop.forward = lambda signum: [os.kill(p.pid, signal.SIGTERM) for p in procs if p.is_alive()]
    error, running, beat = None, count, time.monotonic()
    try:
        while running:
            try:
                message = results.get(timeout=1.0)
            except queue.Empty:
                if not any(p.is_alive() for p in procs):
                    error = error or IngestError("a worker process ended unexpectedly")
                    break
                continue
            if message[0] == "file":
                _report(summary, message[1], progress)
            elif message[0] == "error":
                error = error or IngestError(message[1])
                error.exit_code, error.hint = message[2], message[3]
            else:
                running -= 1
            if time.monotonic() - beat >= HEARTBEAT_SECONDS:
                beat = time.monotonic()
                with contextlib.suppress(_psycopg2().Error), stop.watching(conn):
                    _heartbeat(conn, run_id)
    finally:
        stop.forward = None
        for proc in procs:
            proc.join(timeout=30)
    if error is not None:
        raise error
    if stop.signum is not None and len(summary.results) < len(files):
        raise Interrupted(stop.signum)


def _check_files(cfg: Config, files: list[DataFile], summary: Summary, stop: _Stop,
                 progress: _Progress | None) -> None:
    """--dry-run: read and validate every file, write rejects, touch no database."""
    rejects, make_line = _Rejects(cfg.reject_file, None), _LineMaker(cfg.source_tz)
    try:
        for df in files:
            if stop.signum is not None:
                raise Interrupted(stop.signum)
            started = time.monotonic()
            if df.error or df.kind == "ignored":
                result = FileResult(df.rel, "failed" if df.error else "ignored", error=df.error)
            else:
                rows = _FileRows(df, make_line, rejects, 86_400, 0, progress.reading(df) if progress else None,
                                 helper=True)
                try:
                    while not rows.finished:
                        for count, _ in enumerate(rows.part()):
                            if count % 4096 == 0:
                                stop.check()
                except (FileFormatError, FileReadError) as exc:
                    rejects.discard()
                    rejects.add(df.rel, None, f"file failed: {exc}")
                    result = FileResult(df.rel, "failed", error=str(exc))
                else:
                    result = FileResult(df.rel, "checked", rows.take_counts())
                    rows.warn()
                finally:
                    rows.close()
            rejects.publish()
            result.seconds, result.kind = round(time.monotonic() - started, 3), df.kind
            _report(summary, result, progress)
    finally:
        rejects.close()


def _data_dir_key(cfg: Config) -> str:
    """The data directory as the manifest and the run log name it: absolute, escaped."""
    return _escape_name(str(cfg.data_dir.resolve()))


def _manifest(conn, cfg: Config) -> dict:
    """What the manifest knows of the files of this run's data directory, by path."""
    with conn.cursor() as cur:
        cur.execute("SELECT path, size, mtime_ns, status, error, settings FROM public.ingest_files WHERE data_dir = %s",
                    (_data_dir_key(cfg),))
        known = {path: tuple(rest) for path, *rest in cur.fetchall()}
    conn.commit()
    return known


def _run(cfg: Config, summary: Summary, stop: _Stop) -> None:
    """List the files, then check them (--dry-run) or load them; settle the summary's status."""
    conn = None
    try:
        if cfg.dry_run:
            files = list(load_files(cfg.data_dir, cfg.source_format, cfg.user_id))
        else:
            listing = _Listing(cfg)  # the files are listed while the database answers
            try:
                conn = connect_db(cfg.conninfo, describe=cfg.describe_db())
                chunk_seconds = _prepare(conn, cfg)
                try:
                    summary.run_id = _start_run(conn, cfg)
                    known = _manifest(conn, cfg)
                except _psycopg2().Error as exc:
                    _rollback(conn)
                    raise _refused_at_start(exc, "cannot start a run") from None
            finally:
                files = listing.files()
        if files and all(df.kind == "ignored" and _archive_kind(df.rel) for df in files):
            err = ConfigError(f"DATA_DIR holds no data, only {len(files)} archive(s), e.g. {files[0].rel}")
            err.hint = _extract_hint(files[0].rel)
            raise err
        with _Progress.shown(cfg.progress, files) as progress:
            if cfg.dry_run:
                _check_files(cfg, files, summary, stop, progress)
            else:
                if cfg.workers > 1 and len(files) > 1:
                    _load_parallel(cfg, summary.run_id, files, summary, stop, progress, known, chunk_seconds, conn)
                else:
                    _load_sequential(cfg, summary.run_id, files, summary, stop, progress, known, chunk_seconds)
        summary.status = "rejects" if summary.not_loaded or summary.counts.records_rejected else "ok"
        if summary.results and summary.files["failed"] == len(summary.results) and all(
                r.error and r.error.startswith("the database refused it") for r in summary.results):
            raise DatabaseError(f"the database refused every file; the first: {summary.results[0].error}")
    except Interrupted as exc:
        summary.status, summary.error = "interrupted", str(exc)
        raise
    except BaseException as exc:
        summary.status, summary.error = "failed", str(exc) or type(exc).__name__
        raise
    finally:
        summary.results.sort(key=lambda r: r.file)
        if conn is not None:
            if summary.run_id is not None:
                _finish_run(cfg, conn, summary, stop)
            elif not conn.closed:
                conn.close()


class _Listing:
    """load_files in a thread, while the main thread connects, applies the schema and reads the
    manifest: both mostly wait (on the disk, on the server), each with the GIL released. The
    switch interval is shortened meanwhile, so that the main thread, back from each round trip,
    takes the GIL within a fraction of a millisecond instead of up to 5."""

    def __init__(self, cfg: Config) -> None:
        self._files: list[DataFile] = []
        self._error: BaseException | None = None
        self._interval = sys.getswitchinterval()
        sys.setswitchinterval(min(self._interval, 0.0002))
        self._thread = threading.Thread(target=self._list, args=(cfg,), name="list-files", daemon=True)
        self._thread.start()

    def _list(self, cfg: Config) -> None:
        try:
            self._files = list(load_files(cfg.data_dir, cfg.source_format, cfg.user_id))
        except BaseException as exc:  # noqa: BLE001 (raised in the main thread by files())
            self._error = exc

    def files(self) -> list[DataFile]:
        """The files found; what load_files raised, if it did (before any error of the database's)."""
        self._thread.join()
        sys.setswitchinterval(self._interval)
        if self._error is not None:
            raise self._error
        return self._files


def _prepare(conn, cfg: Config) -> int:
    """Bootstrap the schema (unless --no-bootstrap) and check raw_data; return its chunk interval."""
    psycopg2 = _psycopg2()
    try:
        check_server(conn)
        if cfg.bootstrap:
            try:
                apply_schema(conn, SCHEMA_PATH.read_text(encoding="utf-8"))
            except psycopg2.OperationalError as exc:
                if _is_transient(exc) and _extension_would_not_load(cfg):
                    raise _not_preloaded("the server ended the session that created the timescaledb extension: "
                                         "TimescaleDB is installed but, most likely, not preloaded") from None
                raise
        return check_table(conn)
    except psycopg2.Error as exc:
        _rollback(conn)
        if _is_transient(exc):
            raise DatabaseError(f"cannot prepare the database: {_pg_message(exc)}") from None
        err = _refused_at_start(exc, f"cannot apply {SCHEMA_PATH.name}")
        if isinstance(exc, psycopg2.errors.InsufficientPrivilege):
            err.hint = "a loader role without CREATE runs with --no-bootstrap, once the owner has applied the schema"
        elif not err.hint:
            err.hint = "fix raw_data as the message says (see docs/operations.md, 'Failure modes'), then run again"
        raise err from None


def _refused_at_start(exc: BaseException, what: str) -> IngestError:
    """A reachable server refusing what every run needs (the schema, its run row, the manifest):
    one line with the server's words and the fix, exit 2 (a setting to change: cron's retries
    would not help), unless the refusal may pass by itself (a lost connection: exit 3)."""
    errors = _psycopg2().errors
    if _is_transient(exc):
        return DatabaseError(f"{what}: {_pg_message(exc)}")
    err = ConfigError(f"{what}: {_pg_message(exc)}")
    if isinstance(exc, errors.ReadOnlySqlTransaction):
        err.hint = ("the server or this role only reads (a standby, or default_transaction_read_only): point the "
                    "loader at the primary, or run ALTER ROLE (or DATABASE) ... SET default_transaction_read_only = off")
    elif isinstance(exc, errors.InsufficientPrivilege):
        err.hint = ("the loader's role needs SELECT, INSERT and UPDATE on raw_data and the ingest_* tables: "
                    "have the owner grant them as sql/roles.sql does")
    return err


# --- progress bars -----------------------------------------------------------------------------
class _Progress:
    """Progress bars on a terminal (tqdm): all files and the file being read, by bytes, fed by the
    reading itself; log lines go through tqdm's logging redirect while the bars are shown."""

    def __init__(self, files: list[DataFile]) -> None:
        from tqdm import tqdm

        self.sizes = {df.rel: _size_or_zero(df.path) for df in files}
        columns, lines = _terminal_size()
        size = {"ncols": columns, "nrows": lines, "file": sys.stderr, "unit": "B", "unit_scale": True}
        self.overall = tqdm(total=sum(self.sizes.values()), desc="all files", position=0, **size)
        self.current = tqdm(total=0, position=1, leave=False, **size)
        self._read = 0

    @classmethod
    @contextlib.contextmanager
    def shown(cls, enabled: bool, files: list[DataFile]) -> Iterator[_Progress | None]:
        if not enabled:
            yield None
            return
        from tqdm.contrib.logging import logging_redirect_tqdm

        progress = cls(files)
        try:
            with logging_redirect_tqdm(loggers=[log]):
                yield progress
        finally:
            progress.current.close()
            progress.overall.close()

    def reading(self, df: DataFile) -> Callable[[int], object]:
        """Start the file's bar; return what the reader calls with each number of bytes read."""
        self.current.reset(total=self.sizes.get(df.rel, 0))
        self.current.set_description_str(df.rel, refresh=False)
        self._read = 0
        return self._advance

    def _advance(self, count: int) -> None:
        self._read += count
        self.current.update(count)
        self.overall.update(count)

    def file_done(self, rel: str) -> None:
        self.overall.update(max(0, self.sizes.get(rel, 0) - self._read))  # a skipped file counts whole
        self._read = 0


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
    """stderr; marked so that main can replace its own handler and no other."""


def _setup_logging(level: str, fmt: str) -> None:
    handler = _Handler(sys.stderr)  # a new one: sys.stderr may have been replaced since
    handler.setFormatter(_JsonFormatter() if fmt == "json" else logging.Formatter(LOG_FORMAT))
    for old in [h for h in log.handlers if isinstance(h, _Handler)]:
        log.removeHandler(old)
    log.addHandler(handler)  # on the "ingest" logger only: an embedding program keeps its own
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
     "seconds one statement (a file's COPY, say) may run on the server; 0 means no limit"),
    ("--stall-timeout", "STALL_TIMEOUT", _non_negative_int,
     "seconds a database call may show no progress before the connection counts as lost; 0 means never"),
    ("--log-level", "LOG_LEVEL", _choice("debug", "info", "warning", "error"), "log level"),
    ("--log-format", "LOG_FORMAT", _choice("text", "json"), "log lines as text, or one JSON object each"),
    ("--format", "FORMAT", _choice("auto", "flat", "fitbit-takeout", "fitbit-api"),
     ("what to read: Task-0's flat records, a Google Takeout Fitbit export, saved Fitbit Web API responses, "
      "or auto (each file by its name and content)")),
    ("--user-id", "USER_ID", str,
     "user id for Fitbit data, which carries none (default: from the export's directory name)"),
)


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's own, told the width it would otherwise import shutil to find (2 ms of every run)."""

    def __init__(self, prog: str) -> None:
        try:
            columns = int(os.environ.get("COLUMNS", ""))
        except ValueError:
            columns = 0
        if columns <= 0:
            try:
                columns = os.get_terminal_size(sys.__stdout__.fileno()).columns
            except (AttributeError, ValueError, OSError):
                columns = 80
        super().__init__(prog, width=columns - 2)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ingest.py",
        formatter_class=_HelpFormatter,
        description="Load Task-0 Fitbit JSON files into the TimescaleDB hypertable raw_data. "
        "Settings: flag > environment > .env file > default. The database is set by DATABASE_URL, "
        "or POSTGRES_HOST, POSTGRES_PORT, POSTGRES_DB, POSTGRES_USER, POSTGRES_PASSWORD, and TLS by "
        "POSTGRES_SSLMODE, POSTGRES_SSLROOTCERT, POSTGRES_SSLCERT, POSTGRES_SSLKEY (environment or .env only, "
        "so the password never shows in a process list).",
        epilog="Also: 'ingest.py status [--json]' shows what the database holds and what the last runs did. "
        "Exit codes: 0 all loaded; 1 some records or files rejected; 2 usage or configuration "
        "error; 3 database unreachable or unusable; 130/143 stopped by SIGINT/SIGTERM.",
    )
    for flag, env, parse, text in SETTINGS:
        p.add_argument(flag, type=parse, help=f"{text} (env {env}; default {DEFAULTS[env]})")
    p.add_argument("--env-file", help="dotenv file to read settings from (default ./.env, if present)")
    p.add_argument("--summary-json", help="also write the run's counts to this JSON file (checked at start)")
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
    path = Path(env_file or ".env")
    if env_file and not path.is_file():
        raise ConfigError(f"--env-file {env_file}: no such file")
    from_file = {}
    if path.is_file():
        from dotenv import dotenv_values  # imported only when there is a file (it takes ~40 ms)

        from_file = {k: v for k, v in dotenv_values(path).items() if v}
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
        if data_dir.is_file() and _archive_kind(data_dir.name):
            err = ConfigError(f"DATA_DIR {_escape_name(str(data_dir))} is {_archive_kind(data_dir.name)}, not a directory")
            err.hint = _extract_hint(str(data_dir)) + " as DATA_DIR"
            raise err
        raise ConfigError(f"DATA_DIR {_escape_name(str(data_dir))} is not a directory")
    try:
        os.listdir(data_dir)
    except OSError as exc:
        raise ConfigError(f"DATA_DIR {_escape_name(str(data_dir))} cannot be read: {exc.strerror or exc}") from None
    level = "DEBUG" if args.verbose else "WARNING" if args.quiet else values["LOG_LEVEL"].upper()
    conninfo = _conninfo(s, values["CONNECT_TIMEOUT"], port, values["STALL_TIMEOUT"])
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
        statement_timeout=values["STATEMENT_TIMEOUT"],
        stall_timeout=values["STALL_TIMEOUT"],
        source_format=values["FORMAT"],
        user_id=_check_user_id_setting(values["USER_ID"]),
    )


def _check_user_id_setting(text: str) -> str | None:
    if not text:
        return None
    try:
        return _check_user_id(text)
    except ValidationError as exc:
        raise ConfigError(f"USER_ID: {exc}") from None


def _conninfo(s: dict, timeout: int, port: int, stall: int = 0) -> dict:
    conninfo: dict = {"connect_timeout": timeout}
    if stall:  # a peer that vanished (a host down, a cable cut) is noticed by TCP within ~stall seconds
        conninfo.update(keepalives=1, keepalives_idle=max(1, min(30, stall // 4)), keepalives_interval=5,
                        keepalives_count=3, tcp_user_timeout=stall * 1000)
    for key in ("sslmode", "sslrootcert", "sslcert", "sslkey"):  # libpq's TLS settings, if given
        if s.get(f"POSTGRES_{key.upper()}"):
            conninfo[key] = s[f"POSTGRES_{key.upper()}"]
    if s.get("DATABASE_URL"):
        _check_dsn(s["DATABASE_URL"])
        conninfo["dsn"] = s["DATABASE_URL"]
    else:
        conninfo.update(host=s["POSTGRES_HOST"], port=port, dbname=s["POSTGRES_DB"],
                        user=s["POSTGRES_USER"], password=s["POSTGRES_PASSWORD"])
    return conninfo


def _timezone(name: str) -> dt.tzinfo:
    if name.upper() in ("UTC", "Z", "ETC/UTC"):
        return UTC
    import zoneinfo

    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError):
        raise ConfigError(f"SOURCE_TIMEZONE: unknown time zone {name!r} (use an IANA name such as Europe/Berlin)") from None


def _summary_writable(path: Path) -> None:
    """Fail at start (exit 2) if the summary file could not be written at the end."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        probe = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # made, then removed
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
        probe.unlink()
        if path.exists() and (path.is_dir() or not os.access(path, os.W_OK)):
            raise OSError(21 if path.is_dir() else 13, "Is a directory" if path.is_dir() else "Permission denied")
    except OSError as exc:
        raise ConfigError(f"cannot write the summary {_escape_name(str(path))}: {exc.strerror or exc}") from None


def _write_summary(path: Path, summary: Summary) -> None:
    data = {**summary.fields(), "host": _hostname(), "sources": summary.by_source()}
    # One line per file: json's C encoder writes those (with indent it falls back to Python, about
    # 20 microseconds a file); the run's own fields stay indented.
    files = ",\n".join(f"    {json.dumps(r.fields())}" for r in summary.results)
    body = f"[\n{files}\n  ]" if files else "[]"
    text = f'{json.dumps(data, indent=2)[:-2]},\n  "files": {body}\n}}\n'  # [:-2]: the closing "\n}"
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as exc:
        log.error("cannot write the summary %s: %s", path, exc.strerror or exc)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["status"]:
        return _status_main(argv[1:])
    args = _parser().parse_args(argv)  # exits 2 on bad flags, before any I/O
    _setup_logging("DEBUG" if args.verbose else "INFO", "text")
    started, summary, cfg = time.monotonic(), Summary(), None
    stop = _Stop(float(DEFAULTS["STALL_TIMEOUT"])).install()
    try:
        cfg = _resolve_config(args, dict(os.environ))
        stop.stall_timeout = cfg.stall_timeout
        _setup_logging(cfg.log_level, cfg.log_format)
        _Rejects(cfg.reject_file, None).close()  # fail early (exit 2) if it cannot be written
        if args.summary_json:
            _summary_writable(Path(args.summary_json))
        _run(cfg, summary, stop)
        code = EXIT_REJECTS if summary.status == "rejects" else EXIT_OK
    except IngestError as exc:
        if isinstance(exc, DatabaseError) and stop.aborted:
            exc = Interrupted(stop.signum or signal.SIGINT, "in the middle of a file (it was rolled back)")
        if summary.status == "running":
            summary.status, summary.error = "failed", str(exc)
        code = exc.exit_code
        _report_error(exc, code, cfg, args.verbose)
    finally:
        stop.uninstall()
    summary.seconds = round(time.monotonic() - started, 3)
    if code != EXIT_USAGE or summary.results:
        _log_sources(summary)
        log.log(logging.WARNING if code else logging.INFO, "summary: %s", summary.line(),
                extra={"fields": {"event": "summary", **summary.fields(), "exit_code": code}})
    if args.summary_json and (cfg is not None or code != EXIT_USAGE):
        _write_summary(Path(args.summary_json), summary)
    return code


def _log_sources(summary: Summary) -> None:
    """One line per source file type, when there is more than Task-0's flat JSON to tell apart."""
    sources = summary.by_source()
    if set(sources) <= {"json", "jsonl"}:
        return
    for kind, entry in sources.items():
        files = " ".join(f"{status}={n}" for status, n in sorted(entry["files"].items()))
        log.info("by source %s: files %s, records read=%d rejected=%d, rows inserted=%d duplicate=%d", kind, files,
                 entry["records_read"], entry["records_rejected"], entry["rows_inserted"], entry["rows_duplicate"],
                 extra={"fields": {"event": "source", "kind": kind, **entry}})


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
    "data": 'SELECT metric, user_id, count(*), min("timestamp"), max("timestamp") FROM public.raw_data '
            "GROUP BY metric, user_id ORDER BY metric, user_id",
    "runs": "SELECT run_id, started_at, finished_at, status, host, files_seen, files_loaded, files_skipped, "
            "files_failed, records_read, records_rejected, rows_inserted, rows_updated, rows_duplicate, error "
            "FROM public.ingest_runs ORDER BY run_id DESC LIMIT %(limit)s",
    "failed_files": "SELECT path, data_dir, error, run_id, loaded_at FROM public.ingest_files "
                    "WHERE status IN ('failed', 'error') "
                    "ORDER BY run_id DESC NULLS LAST, path",
}


def _status_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="ingest.py status", formatter_class=_HelpFormatter, description="Show what raw_data holds (rows, first "
                                "and last timestamp per metric and user), the last runs, and the files whose "
                                "last load failed, with the run that tried. Database settings as for a load.")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of tables")
    p.add_argument("--runs", type=_positive_int, default=10, help="how many recent runs to show (default 10)")
    p.add_argument("--env-file", help="dotenv file to read settings from (default ./.env, if present)")
    args = p.parse_args(argv)
    _setup_logging("WARNING", "text")
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
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        if args.json:  # what it knows, in the format asked for
            print(json.dumps({"error": str(exc), "hint": exc.hint or None, "exit_code": exc.exit_code}, indent=2))
        return exc.exit_code
    print(json.dumps(report, indent=2, default=str) if args.json else _status_text(report))
    return EXIT_OK


def _status_report(conn, runs: int) -> dict:
    """What the database holds, section by section; a section whose table is not there (a
    database the loader never ran on) is empty, and ``notes`` says so."""
    psycopg2 = _psycopg2()
    report: dict = {"notes": []}
    conn.autocommit = True  # one statement's failure leaves the others their answers
    try:
        with conn.cursor() as cur:
            for name, sql in _STATUS_QUERIES.items():
                try:
                    cur.execute(sql, {"limit": runs})
                except psycopg2.errors.UndefinedTable as exc:
                    report[name] = []
                    report["notes"].append(f"{_pg_message(exc)}: nothing loaded here yet (run the loader once)")
                    continue
                columns = [c.name for c in cur.description]
                report[name] = [dict(zip(columns, row, strict=True)) for row in cur.fetchall()]
    except psycopg2.Error as exc:
        err = _refused_at_start(exc, "cannot read the database")
        raise err from None
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
        *(["", *(f"note: {note}" for note in report["notes"])] if report["notes"] else []),
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
    exit_code = main()
    # What is left is freed by the exit itself: no collection of all of it on the way out, which
    # takes a run that finds nothing new a tenth of its time. (Files and connections are closed.)
    gc.freeze()
    raise SystemExit(exit_code)
