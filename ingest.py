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
import io
import json
import logging
import math
import os
import re
import shutil
import socket
import stat
import sys
import tempfile
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

METRICS = frozenset(
    {"heart_rate", "spo2", "activity", "hrv", "breath_rate", "active_zone_minute"}
)
REQUIRED_KEYS = ("user_id", "metric", "timestamp", "value")
MAX_USER_ID_CHARS = 255  # keeps the primary-key index entry far below btree's ~2.7 kB limit
MAX_RECORD_CHARS = 16 * 1024 * 1024  # one record bigger than this fails its file (bounds memory)
REJECT_RECORD_CHARS = 1000  # a rejected record is quoted up to this many characters
READ_CHUNK_CHARS = 1 << 20  # characters read from a file at a time
SCHEMA_PATH = Path(__file__).resolve().parent / "sql" / "schema.sql"
SCHEMA_LOCK_KEY = 0x46_49_54_42  # advisory lock held while the schema is applied ("FITB")
TRANSIENT_RETRIES = 3  # deadlock / serialization failure: a file is tried this many times

EXIT_OK, EXIT_REJECTS, EXIT_USAGE, EXIT_DATABASE = 0, 1, 2, 3

DEFAULTS = {
    "POSTGRES_HOST": "localhost",
    "POSTGRES_PORT": "5432",
    "POSTGRES_DB": "postgres",
    "POSTGRES_USER": "postgres",
    "POSTGRES_PASSWORD": "",
    "CONNECT_TIMEOUT": "5",
    "DATA_DIR": "./Task-0/extracted_data",
    "SOURCE_TIMEZONE": "UTC",
    "BATCH_SIZE": "20000",
    "REJECT_FILE": "./rejects/rejects.jsonl",
    "LOG_LEVEL": "INFO",
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
    summary_json: Path | None
    log_level: str
    bootstrap: bool = True

    def describe_db(self) -> str:
        """Where the database is, for messages; never includes the password."""
        info = self.conninfo
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


def _check_value(value: object) -> float:
    kind = type(value)
    if kind is not float and kind is not int:  # bool is a subclass of int: excluded here
        raise ValidationError(f"value must be a number, got {_json_type(value)}")
    try:
        number = float(value)
    except OverflowError:
        raise ValidationError("value is too large for a double precision number") from None
    if not math.isfinite(number):
        raise ValidationError(f"value must be a finite number, got {value!r}")
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
    return Row(
        _check_user_id(obj["user_id"]),
        _check_metric(obj["metric"]),
        _check_timestamp(obj["timestamp"], tz),
        _check_value(obj["value"]),
    )


# ---------------------------------------------------------------------------------------------
# Reading files (streaming)
# ---------------------------------------------------------------------------------------------
class Unparsable(NamedTuple):
    """A JSON Lines line that is not JSON: rejected like an invalid record."""

    reason: str
    text: str


_KINDS = {".json": "json", ".jsonl": "jsonl", ".ndjson": "jsonl"}


@dataclasses.dataclass(frozen=True)
class DataFile:
    path: Path
    rel: str  # path relative to DATA_DIR, with "/" separators: the name used everywhere
    kind: str  # "json" or "jsonl"
    gzipped: bool

    def records(self) -> Iterator[tuple[int, object]]:
        """Yield (position, decoded value): position is the 1-based record (or line) number."""
        try:
            with self._open() as text:
                if self.kind == "jsonl":
                    yield from _iter_json_lines(text)
                else:
                    yield from _iter_json_document(text)
        except FileFormatError:
            raise
        except (OSError, EOFError, UnicodeDecodeError) as exc:
            raise FileFormatError(_describe_read_error(exc, self.gzipped)) from None

    def _open(self) -> io.TextIOWrapper:
        raw = open(self.path, "rb")  # noqa: SIM115 (closed through the wrapper)
        try:
            binary = gzip.GzipFile(fileobj=raw, mode="rb") if self.gzipped else raw
            head = binary.peek(4)[:4] if hasattr(binary, "peek") else b""
            return io.TextIOWrapper(binary, encoding=_sniff_encoding(head), newline="")
        except BaseException:
            raw.close()
            raise


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
        err = DatabaseError(f"cannot connect to {describe}: {first}")
        err.hint = "is the database running and are POSTGRES_HOST/POSTGRES_PORT (or DATABASE_URL) right?"
        raise err from None
    conn.set_client_encoding("UTF8")
    return conn


def apply_schema(conn, schema_sql: str) -> None:
    """Apply sql/schema.sql in one transaction, serialised between loaders by an advisory lock."""
    with conn.cursor() as cur:
        cur.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK_KEY,))
        cur.execute(schema_sql)
    conn.commit()


_COPY_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


class _CopySource:
    """File-like object whose read() formats the next batch of rows as COPY text on demand.

    Handing this to copy_expert streams the rows: the server works on one batch while Python
    parses and validates the next, and memory stays at one batch whatever the file size.
    """

    def __init__(self, rows: Iterable[Row], batch_size: int, numbered: bool) -> None:
        self._rows, self._batch, self._numbered = iter(rows), batch_size, numbered
        self.count = 0
        self.error: Exception | None = None
        self._escaped: dict[str, str] = {}

    def _escape(self, user_id: str) -> str:
        text = self._escaped.get(user_id)
        if text is None:
            if len(self._escaped) > 100_000:
                self._escaped.clear()
            text = self._escaped[user_id] = user_id.translate(_COPY_ESCAPES)
        return text

    def read(self, size: int = -1) -> str:
        lines = []
        escape, count = self._escape, self.count
        try:
            for row in self._rows:
                count += 1
                line = f"{escape(row[0])}\t{row[1]}\t{row[2].isoformat()}\t{row[3]!r}\n"
                lines.append(f"{count}\t{line}" if self._numbered else line)
                if len(lines) >= self._batch:
                    break
        except Exception as exc:
            self.error = exc  # psycopg2 replaces it by its own error: kept to re-raise
            raise
        self.count = count
        return "".join(lines)

    def copy_into(self, cur, sql: str) -> int:
        """Run COPY with this object as its input; return the rows the server reports."""
        try:
            cur.copy_expert(sql, self, size=1 << 16)
        except _psycopg2().Error:
            if self.error is not None:
                raise self.error from None
            raise
        if cur.rowcount != self.count:
            raise DatabaseError(f"COPY reported {cur.rowcount} rows, but {self.count} were sent")
        return cur.rowcount


class InsertResult(NamedTuple):
    inserted: int
    duplicate: int


_STAGE_SQL = """
CREATE TEMP TABLE IF NOT EXISTS ingest_stage (
    seq BIGINT NOT NULL, user_id TEXT NOT NULL, metric TEXT NOT NULL,
    ts TIMESTAMPTZ NOT NULL, value DOUBLE PRECISION NOT NULL
) ON COMMIT DELETE ROWS
"""
_MERGE_SQL = """
INSERT INTO raw_data (user_id, metric, "timestamp", value)
SELECT DISTINCT ON (user_id, metric, ts) user_id, metric, ts, value
FROM ingest_stage
ORDER BY user_id, metric, ts, seq
ON CONFLICT (user_id, metric, "timestamp") DO NOTHING
"""


def insert_records(conn, rows: Iterable[Row] | Callable[[], Iterable[Row]], *, batch_size: int = 20000) -> InsertResult:
    """Insert rows into raw_data inside the caller's transaction; existing keys are kept.

    ``rows`` may be a zero-argument callable that returns a fresh iterable each call: then the
    rows are first COPY'd straight into raw_data (the fast path), and only if a key already
    exists is that attempt rolled back to a savepoint and the rows sent again through a staging
    table, where the first occurrence of a key wins. A plain iterable goes to staging directly.
    Counts come from what the database reports for each statement.
    """
    with conn.cursor() as cur:
        if callable(rows):
            cur.execute("SAVEPOINT ingest_direct")
            source = _CopySource(rows(), batch_size, numbered=False)
            try:
                copied = source.copy_into(cur, 'COPY raw_data (user_id, metric, "timestamp", value) FROM STDIN')
            except _psycopg2().errors.UniqueViolation:
                cur.execute("ROLLBACK TO SAVEPOINT ingest_direct")
            else:
                cur.execute("RELEASE SAVEPOINT ingest_direct")
                return InsertResult(copied, 0)
            rows = rows()
        cur.execute(_STAGE_SQL)
        staged = _CopySource(rows, batch_size, numbered=True).copy_into(
            cur, "COPY ingest_stage (seq, user_id, metric, ts, value) FROM STDIN")
        cur.execute("SET LOCAL work_mem = '256MB'")
        cur.execute(_MERGE_SQL)
        inserted = cur.rowcount
        cur.execute("TRUNCATE ingest_stage")
        return InsertResult(inserted, staged - inserted)


# ---------------------------------------------------------------------------------------------
# Orchestration
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass
class FileResult:
    file: str
    status: str = "loaded"  # loaded | failed
    records_read: int = 0
    records_rejected: int = 0
    rows_inserted: int = 0
    rows_duplicate: int = 0
    error: str | None = None
    seconds: float = 0.0


@dataclasses.dataclass
class Summary:
    files_seen: int = 0
    files_loaded: int = 0
    files_failed: int = 0
    records_read: int = 0
    records_rejected: int = 0
    rows_inserted: int = 0
    rows_duplicate: int = 0
    seconds: float = 0.0
    status: str = "ok"
    error: str | None = None
    files: list = dataclasses.field(default_factory=list)

    def add(self, result: FileResult) -> None:
        self.files_seen += 1
        self.files.append(dataclasses.asdict(result))
        if result.status == "failed":
            self.files_failed += 1
            return
        self.files_loaded += 1
        for key in ("records_read", "records_rejected", "rows_inserted", "rows_duplicate"):
            setattr(self, key, getattr(self, key) + getattr(result, key))

    def line(self) -> str:
        keys = ("files_seen", "files_loaded", "files_failed", "records_read", "records_rejected",
                "rows_inserted", "rows_duplicate")
        return " ".join(f"{k}={getattr(self, k)}" for k in keys) + f" seconds={self.seconds:.2f}"


class _RejectLog:
    """Rejects of the current file, spooled, and appended to the reject file once it commits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(path, "w", encoding="utf-8")  # noqa: SIM115 (closed in close())
        except OSError as exc:
            raise ConfigError(f"cannot write the reject file {path}: {exc.strerror or exc}") from None
        self._spool = self._new_spool()

    @staticmethod
    def _new_spool():
        return tempfile.SpooledTemporaryFile(max_size=1 << 20, mode="w+", encoding="utf-8")

    def add(self, file: str, position: int | None, reason: str, record: object = None) -> None:
        entry = {"file": file, "position": position, "reason": reason, "record": _quote(record)}
        self._spool.write(json.dumps(entry, ensure_ascii=False) + "\n")

    def discard(self) -> None:
        self._spool.close()
        self._spool = self._new_spool()

    def publish(self) -> None:
        self._spool.seek(0)
        try:
            shutil.copyfileobj(self._spool, self._out)
            self._out.flush()
        except OSError as exc:
            raise IngestError(f"cannot write the reject file {self.path}: {exc.strerror or exc}") from None
        self.discard()

    def close(self) -> None:
        self._spool.close()
        self._out.close()


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
    """Counts for one pass over one file (a retried pass starts from zero)."""

    def __init__(self) -> None:
        self.read = self.rejected = self.extra_keys = 0
        self.extra_example: str | None = None


def _valid_rows(df: DataFile, tz: dt.tzinfo, rejects: _RejectLog, stats: _FileStats) -> Iterator[Row]:
    for position, obj in df.records():
        stats.read += 1
        if type(obj) is Unparsable:
            stats.rejected += 1
            rejects.add(df.rel, position, obj.reason, obj)
            continue
        try:
            row = validate_record(obj, tz)
        except ValidationError as exc:
            stats.rejected += 1
            rejects.add(df.rel, position, str(exc), obj)
            continue
        if len(obj) > 4:
            stats.extra_keys += 1
            if stats.extra_example is None:
                stats.extra_example = ", ".join(sorted(k for k in obj if k not in REQUIRED_KEYS)[:5])
        yield row


def _load_file(conn, df: DataFile, cfg: Config, rejects: _RejectLog) -> FileResult:
    """Load one file in one transaction; retry it on deadlock or serialization failure."""
    psycopg2 = _psycopg2()
    started = time.monotonic()
    for attempt in range(1, TRANSIENT_RETRIES + 1):
        stats = _FileStats()

        def fresh_rows() -> Iterator[Row]:
            nonlocal stats
            stats = _FileStats()
            rejects.discard()
            return _valid_rows(df, cfg.source_tz, rejects, stats)

        try:
            result = insert_records(conn, fresh_rows, batch_size=cfg.batch_size)
            conn.commit()
        except FileFormatError as exc:
            return _fail_file(conn, df, rejects, str(exc), started)
        except (psycopg2.errors.DataError, psycopg2.errors.IntegrityError) as exc:
            reason = f"the database refused its rows: {_first_line(exc)}"
            return _fail_file(conn, df, rejects, reason, started)
        except psycopg2.extensions.TransactionRollbackError as exc:
            _rollback(conn)
            if attempt == TRANSIENT_RETRIES:
                raise DatabaseError(f"{df.rel}: {_first_line(exc)} (tried {attempt} times)") from None
            log.warning("%s: %s; retrying (attempt %d)", df.rel, _first_line(exc), attempt + 1)
            time.sleep(0.1 * 2**attempt)
            continue
        except psycopg2.Error as exc:
            _rollback(conn)
            raise DatabaseError(f"while loading {df.rel}: {_first_line(exc)}") from None
        rejects.publish()
        if stats.extra_keys:
            log.warning("%s: %d records carry keys other than %s (ignored), e.g. %s",
                        df.rel, stats.extra_keys, "/".join(REQUIRED_KEYS), stats.extra_example)
        return FileResult(df.rel, "loaded", stats.read, stats.rejected, result.inserted,
                          result.duplicate, seconds=time.monotonic() - started)
    raise AssertionError("unreachable")  # pragma: no cover


def _fail_file(conn, df: DataFile, rejects: _RejectLog, reason: str, started: float) -> FileResult:
    """Roll the file back whole and record one reject line for it instead of its records."""
    _rollback(conn)
    rejects.discard()
    rejects.add(df.rel, None, f"file failed: {reason}")
    rejects.publish()
    return FileResult(df.rel, "failed", error=reason, seconds=time.monotonic() - started)


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


def _run(cfg: Config, summary: Summary) -> None:
    rejects = _RejectLog(cfg.reject_file)
    conn = None
    try:
        conn = connect_db(cfg.conninfo, describe=cfg.describe_db())
        if cfg.bootstrap:
            try:
                apply_schema(conn, SCHEMA_PATH.read_text(encoding="utf-8"))
            except _psycopg2().Error as exc:
                raise DatabaseError(f"cannot apply {SCHEMA_PATH.name}: {_first_line(exc)}") from None
        for df in load_files(cfg.data_dir):
            result = _load_file(conn, df, cfg, rejects)
            summary.add(result)
            level = logging.INFO if result.status == "loaded" else logging.ERROR
            log.log(level, "%s %s: read=%d rejected=%d inserted=%d duplicate=%d (%.2fs)%s",
                    result.status, df.rel, result.records_read, result.records_rejected,
                    result.rows_inserted, result.rows_duplicate, result.seconds,
                    f" - {result.error}" if result.error else "")
    finally:
        rejects.close()
        if conn is not None:
            conn.close()


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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ingest.py",
        description="Load Task-0 Fitbit JSON files into the TimescaleDB hypertable raw_data.",
        epilog="Exit codes: 0 all loaded; 1 some records or files rejected; "
        "2 usage or configuration error; 3 database unreachable or failed.",
    )
    p.add_argument("--data-dir", help="directory to read (env DATA_DIR; default ./Task-0/extracted_data)")
    p.add_argument("--env-file", help="dotenv file to read settings from (default ./.env, if present)")
    p.add_argument("--batch-size", type=_positive_int, help="rows per COPY batch (env BATCH_SIZE; default 20000)")
    p.add_argument("--source-timezone", help="zone for timestamps without an offset (env SOURCE_TIMEZONE; default UTC)")
    p.add_argument("--reject-file", help="where rejected records go, JSON Lines (env REJECT_FILE; default ./rejects/rejects.jsonl)")
    p.add_argument("--summary-json", help="also write the run's counts to this JSON file")
    p.add_argument("--connect-timeout", type=_positive_int, help="seconds to wait for the database (env CONNECT_TIMEOUT; default 5)")
    p.add_argument("--log-level", type=str.upper, choices=["DEBUG", "INFO", "WARNING", "ERROR"],
                   help="log level (env LOG_LEVEL; default INFO)")
    p.add_argument("--no-bootstrap", action="store_true", help="do not apply sql/schema.sql (it must exist already)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, and tracebacks on errors")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    return p


def _settings(env_file: str | None, environ: dict) -> dict:
    """Environment over .env over defaults (flags are applied on top by the caller)."""
    from dotenv import dotenv_values

    path = Path(env_file or ".env")
    if env_file and not path.is_file():
        raise ConfigError(f"--env-file {env_file}: no such file")
    from_file = {k: v for k, v in dotenv_values(path).items() if v is not None} if path.is_file() else {}
    return {**DEFAULTS, **from_file, **{k: v for k, v in environ.items() if v != ""}}


def _resolve_config(args: argparse.Namespace, environ: dict) -> Config:
    s = _settings(args.env_file, environ)
    for flag, key in (("data_dir", "DATA_DIR"), ("batch_size", "BATCH_SIZE"),
                      ("source_timezone", "SOURCE_TIMEZONE"), ("reject_file", "REJECT_FILE"),
                      ("connect_timeout", "CONNECT_TIMEOUT"), ("log_level", "LOG_LEVEL")):
        if getattr(args, flag) is not None:
            s[key] = str(getattr(args, flag))
    numbers = {}
    for key in ("BATCH_SIZE", "CONNECT_TIMEOUT", "POSTGRES_PORT"):
        try:
            numbers[key] = _positive_int(s[key])
        except argparse.ArgumentTypeError as exc:
            raise ConfigError(f"{key}: {exc}") from None
    level = s["LOG_LEVEL"].upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ConfigError(f"LOG_LEVEL: unknown level {s['LOG_LEVEL']!r}")
    data_dir = Path(s["DATA_DIR"])
    if not data_dir.is_dir():
        raise ConfigError(f"DATA_DIR {data_dir} is not a directory")
    conninfo: dict = {"connect_timeout": numbers["CONNECT_TIMEOUT"]}
    if s.get("DATABASE_URL"):
        conninfo["dsn"] = s["DATABASE_URL"]
    else:
        conninfo.update(host=s["POSTGRES_HOST"], port=numbers["POSTGRES_PORT"], dbname=s["POSTGRES_DB"],
                        user=s["POSTGRES_USER"], password=s["POSTGRES_PASSWORD"])
    return Config(
        conninfo=conninfo,
        data_dir=data_dir,
        source_tz=_timezone(s["SOURCE_TIMEZONE"]),
        batch_size=numbers["BATCH_SIZE"],
        reject_file=Path(s["REJECT_FILE"]),
        summary_json=Path(args.summary_json) if args.summary_json else None,
        log_level="DEBUG" if args.verbose else level,
        bootstrap=not args.no_bootstrap,
    )


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
    parser = _parser()
    args = parser.parse_args(argv)  # exits 2 on bad flags, before any I/O
    logging.basicConfig(format="%(asctime)s %(levelname)s %(message)s", stream=sys.stderr, force=True)
    log.setLevel(logging.DEBUG if args.verbose else logging.INFO)
    started = time.monotonic()
    summary = Summary()
    try:
        cfg = _resolve_config(args, dict(os.environ))
        log.setLevel(cfg.log_level)
        _run(cfg, summary)
    except IngestError as exc:
        summary.status, summary.error = "error", str(exc)
        if args.verbose:
            log.exception("error")
        print(f"error: {exc}", file=sys.stderr)
        if exc.hint:
            print(f"hint: {exc.hint}", file=sys.stderr)
        code = exc.exit_code
    else:
        code = EXIT_REJECTS if summary.files_failed or summary.records_rejected else EXIT_OK
        summary.status = "ok" if code == EXIT_OK else "rejects"
    summary.seconds = round(time.monotonic() - started, 3)
    if code != EXIT_USAGE:
        log.info("summary: %s", summary.line())
    if args.summary_json:
        _write_summary(Path(args.summary_json), summary)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
