#!/usr/bin/env python3
"""Benchmark ingest.py against psql \\copy (the limit), a hand-written loader (the baseline) and DuckDB.

    eval "$(bash scripts/dev-db.sh env)" && .venv/bin/python scripts/bench.py [--quick] [--only a,b] [--keep]
        [--variants limit,baseline,duckdb,ingest]

Generates deterministic data with scripts/make_sample.py under a scratch directory (default
./bench-data/, reused when already generated with the same parameters), runs every variant against
a fresh database (CREATE DATABASE bench_..., sql/schema.sql applied, dropped afterwards), and
prints a Markdown table; the table and the raw numbers also go to <scratch>/results.{md,json}
(results-quick.* with --quick).

Variants:
  limit     the same rows as a COPY text file (written by the generator, not timed), loaded by one
            `psql -c "\\copy raw_data ... FROM 'file'"` into an empty raw_data. For data sets with
            repeated keys the file holds only the distinct keys (first occurrence).
  baseline  scripts/bench_baseline.py: json.load + execute_values(page_size=100) + ON CONFLICT DO
            NOTHING, one commit per file.
  duckdb    scripts/bench_duckdb.py: DuckDB read_json over the data directory (explicit columns), first
            occurrence of each key kept (row_number() over file name, position), INSERT OR IGNORE into
            the PostgreSQL table ATTACHed with DuckDB's postgres extension. Validates nothing; uses all
            cores. A benchmark-only dependency: installed here, pinned (DUCKDB_PINS), into a virtualenv
            of its own under <scratch>/venv-duckdb (once; not timed); the extension comes from a PyPI
            wheel and is loaded from its file, never downloaded. When that install fails the variant
            is recorded as skipped.
  ingest    ingest.py: 1st load; 2nd run over unchanged files; 3rd run with every record already
            present (--force when ingest.py has it, else a plain re-run). Optionally --workers 2.
            Started as the image starts it: `python -m ingest`, the module compiled beforehand
            (a script run, `python ingest.py`, also compiles the file: 45-70 ms more).

Timing is wall-clock seconds of the loader process (start-up included); peak RSS is that process's
ru_maxrss (os.wait4). Timings on a shared machine are noisy: one run per variant, no repetition.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import hashlib
import json
import os
import platform
import py_compile
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import psycopg2
import psycopg2.errors

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import make_sample
import make_task0

INGEST = ROOT / "ingest.py"
BASELINE = ROOT / "scripts" / "bench_baseline.py"
DUCKDB_LOADER = ROOT / "scripts" / "bench_duckdb.py"
# DuckDB and its postgres extension, as PyPI wheels (duckdb-ext-postgres ships
# duckdb_ext/extensions/v<version>/<platform>/postgres_scanner.duckdb_extension, which bench_duckdb.py
# loads through SET extension_directory). The two versions must match.
DUCKDB_PINS = ("duckdb==1.4.4", "duckdb-ext-postgres==1.4.4.20260205")
# Polars with the ADBC PostgreSQL driver (scripts/bench_polars.py), the second peer.
POLARS_PINS = ("polars==2.1.0", "adbc-driver-postgresql==1.13.0", "adbc-driver-manager==1.13.0", "pyarrow==26.0.1")
POLARS_LOADER = ROOT / "scripts" / "bench_polars.py"
VARIANTS = ("limit", "baseline", "duckdb", "polars", "ingest")
SCHEMA = ROOT / "sql" / "schema.sql"
GEN_VERSION = 1  # bump when the generation code below changes the bytes it writes
START = dt.datetime(2024, 1, 1)
DB_PREFIX = "bench_"
COPY_SQL = '\\copy raw_data (user_id, metric, "timestamp", value) FROM \'{path}\''


# ---------------------------------------------------------------------------------------------
# Data sets
# ---------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FileSpec:
    """One JSON file, written by make_sample.records + make_sample.write."""

    rel: str
    metric: str
    users: int  # make_sample users (uids user_1..user_N) when uid is None
    seconds: int
    repeat: int = 1
    seed: int = 0
    pretty: bool = True
    uid: str | None = None  # one user with this id (per-user files)

    def rows(self) -> Iterator[tuple[str, str, str, object]]:
        rows = make_sample.records(self.metric, self.users, START, self.seconds, self.repeat, self.seed)
        if self.uid is None:
            return rows
        uid = self.uid
        return ((uid, m, ts, v) for _, m, ts, v in rows)


@dataclasses.dataclass(frozen=True)
class DataSet:
    name: str
    description: str
    files: tuple[FileSpec, ...]
    repeated_keys: bool = False  # limit file keeps first occurrences only
    task0: bool = False  # the files are Task-0's real output (scripts/make_task0.py), not make_sample's
    baseline_skip: str | None = None  # reason, when the baseline is not run
    ingest_runs: tuple[str, ...] = ("first", "unchanged", "all-present")
    workers: bool = False  # also ingest --workers 2 (when ingest.py has it)

    def params(self) -> dict:
        return {"gen_version": GEN_VERSION, "start": START.isoformat(),
                "files": [dataclasses.asdict(f) for f in self.files]}


def _per_user(prefix: str, users: int, seconds: int, metrics, pretty: bool, seed0: int) -> list[FileSpec]:
    out = []
    for u in range(1, users + 1):
        uid = f"{prefix}user_{u}"
        for m in metrics:
            out.append(FileSpec(f"{prefix.rstrip('_') + '/' if prefix else ''}user_{u}/{m}.json", m, 1, seconds,
                                seed=seed0 + u, pretty=pretty, uid=uid))
    return out


def datasets(quick: bool) -> list[DataSet]:
    metrics = list(make_sample.METRICS)
    # (task0) the real input: what the task's Task-0 step writes, made by its own generator.
    task0 = DataSet("task0", "Task-0's real output: wearipedia FitbitCharge6(seed=42), January 2024, six pretty "
                             "JSON arrays as Task-0/extract.py writes them (scripts/make_task0.py)",
                    (), repeated_keys=True, task0=True)
    # (a) Task-0 shaped: same files as `make_sample.py OUT --seconds 86400 --repeat 30`.
    a_sec = 1800 if quick else 86400
    a = DataSet(
        "a", f"Task-0 shape: 1 user, one pretty JSON array per metric, {a_sec} s at 1 Hz heart rate x 30 copies "
             f"(= make_sample.py OUT --seconds {a_sec} --repeat 30)",
        tuple(FileSpec(f"{m}.json", m, 1, a_sec, 30 if m == "heart_rate" else 1) for m in metrics),
        repeated_keys=True)
    # (b) many users, unique keys, per-user files from KB to tens of MB.
    groups = ([("g1_", 14, 600), ("g2_", 4, 2400), ("g3_", 2, 9000), ("g4_", 1, 27000)] if quick else
              [("g1_", 70, 3600), ("g2_", 20, 21600), ("g3_", 8, 86400), ("g4_", 2, 259200)])
    b_files: list[FileSpec] = []
    for i, (prefix, users, seconds) in enumerate(groups):
        b_files += _per_user(prefix, users, seconds, metrics, True, 1000 * (i + 1))
    b = DataSet(
        "b", "many users, unique keys, per-user pretty files (6 metrics), groups of "
             + ", ".join(f"{u} users x {s} s" for _, u, s in groups),
        tuple(b_files), workers=True)
    # (c) one ~1 GB pretty-printed JSON array.
    c_users = 2 if quick else 100
    c = DataSet(
        "c", f"one pretty JSON array, heart rate of {c_users} users x 86400 s (unique keys)",
        (FileSpec("heart_rate.json", "heart_rate", c_users, 86400),),
        baseline_skip="skipped: json.load of 1 GB")
    # (d) scaling series: compact JSON, per-user heart-rate files of 100,000 records each.
    d_sec = 2000 if quick else 100_000
    d = []
    for label, users in (("100k", 1), ("1M", 10), ("10M", 100)):
        d.append(DataSet(
            f"d-{label}", f"scaling: {users} compact JSON file(s) of {d_sec} heart-rate records (unique keys)",
            tuple(_per_user("", users, d_sec, ["heart_rate"], False, 0)),
            baseline_skip="skipped: time budget" if label == "10M" else None))
    return [task0, a, b, c, *d]


def snapshot_loader(scratch: Path) -> None:
    """Run a copy of ingest.py and sql/ taken at start, so that edits made while the benchmark
    runs do not mix versions within one table."""
    global INGEST, SCHEMA
    snap = scratch / "work" / "snapshot"
    shutil.rmtree(snap, ignore_errors=True)
    (snap / "sql").mkdir(parents=True)
    shutil.copy2(ROOT / "ingest.py", snap / "ingest.py")
    for f in (ROOT / "sql").glob("*.sql"):
        shutil.copy2(f, snap / "sql" / f.name)
    INGEST, SCHEMA = snap / "ingest.py", snap / "sql" / "schema.sql"
    py_compile.compile(str(INGEST), doraise=True)  # as the image does at build time


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:12]


def generate_task0(ds: DataSet, root: Path) -> dict:
    """Task-0's output under root/json (scripts/make_task0.py, cached there) and its COPY file
    root/limit.tsv: each key's first occurrence, in the loader's file order."""
    meta_path = root / "meta.json"
    started = time.monotonic()
    made = make_task0.make(root / "json", root.parent / "venv-task0")
    if meta_path.exists() and (root / "limit.tsv").exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == made:
            meta["generated"] = False
            return meta
    files = sorted((root / "json").glob("*.json"))
    done = subprocess.run([sys.executable, str(ROOT / "scripts" / "make_task0.py"), str(root / "json"),
                           "--limit", str(root / "limit.tsv.tmp")], capture_output=True, text=True, check=True)
    records = json.loads(done.stdout)["records"]
    (root / "limit.tsv.tmp").rename(root / "limit.tsv")
    sizes = [p.stat().st_size for p in files]
    meta = {"params": made, "records": records, "distinct_keys": made["distinct_keys"], "files": len(files),
            "bytes": sum(sizes),
            "largest_file_bytes": max(sizes), "smallest_file_bytes": min(sizes),
            "generation_seconds": round(time.monotonic() - started, 1)}
    meta_path.write_text(json.dumps(meta, indent=1) + "\n")
    meta["generated"] = True
    return meta


def generate(ds: DataSet, root: Path) -> dict:
    """Write ds under root/json and its COPY file root/limit.tsv; reuse them when up to date."""
    if ds.task0:
        return generate_task0(ds, root)
    meta_path = root / "meta.json"
    params = {**ds.params(), "make_sample_sha": _sha(ROOT / "scripts" / "make_sample.py")}
    if meta_path.exists():
        meta = json.loads(meta_path.read_text())
        if meta.get("params") == params and (root / "limit.tsv").exists():
            meta["generated"] = False
            return meta
    tmp = root.with_name(root.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(root, ignore_errors=True)
    (tmp / "json").mkdir(parents=True)
    started = time.monotonic()
    seen: set[tuple[str, str, str]] = set()
    records = distinct = 0
    with open(tmp / "limit.tsv", "w", encoding="utf-8") as tsv:
        for spec in ds.files:
            def tee(rows):
                nonlocal distinct
                write = tsv.write
                for row in rows:
                    uid, metric, ts, value = row
                    if ds.repeated_keys:
                        key = (uid, metric, ts)
                        if key in seen:
                            yield row
                            continue
                        seen.add(key)
                    distinct += 1
                    write(f"{uid}\t{metric}\t{ts}+00:00\t{value}\n")
                    yield row
            records += make_sample.write(tmp / "json" / spec.rel, tee(spec.rows()), "json", spec.pretty)
    files = sorted((tmp / "json").rglob("*.json"))
    sizes = [p.stat().st_size for p in files]
    meta = {"params": params, "records": records, "distinct_keys": distinct, "files": len(files),
            "bytes": sum(sizes), "largest_file_bytes": max(sizes), "smallest_file_bytes": min(sizes),
            "generation_seconds": round(time.monotonic() - started, 1)}
    (tmp / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    tmp.rename(root)
    meta["generated"] = True
    return meta


# ---------------------------------------------------------------------------------------------
# Database and processes
# ---------------------------------------------------------------------------------------------
def pg_settings() -> dict:
    env = os.environ
    return {"host": env.get("POSTGRES_HOST", "localhost"), "port": env.get("POSTGRES_PORT", "5432"),
            "user": env.get("POSTGRES_USER", "postgres"), "password": env.get("POSTGRES_PASSWORD", ""),
            "dbname": env.get("POSTGRES_DB", "postgres")}


def child_env(dbname: str) -> dict:
    """The environment a loader runs in: database ``dbname``, none of the loader's own settings."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("DATABASE_URL", "DATA_DIR", "BATCH_SIZE", "SOURCE_TIMEZONE", "REJECT_FILE",
                        "LOG_LEVEL", "CONNECT_TIMEOUT", "ON_CONFLICT", "WORKERS", "PGOPTIONS")}
    s = pg_settings()
    env.update(POSTGRES_HOST=s["host"], POSTGRES_PORT=str(s["port"]), POSTGRES_USER=s["user"],
               POSTGRES_PASSWORD=s["password"], POSTGRES_DB=dbname, PGPASSWORD=s["password"],
               PYTHONDONTWRITEBYTECODE="1")
    return env


def connect(dbname: str | None = None):
    s = pg_settings()
    if dbname:
        s["dbname"] = dbname
    conn = psycopg2.connect(connect_timeout=10, application_name="bench", **s)
    conn.autocommit = True
    return conn


def drop_database(cursor: Callable[[], object], name: str) -> bool:
    """DROP DATABASE, retried for 10 s; False (and said on stderr) if it never succeeds.

    Plain DROP first: it stops an autovacuum worker still busy in the database, which WITH (FORCE)
    refuses to do for a non-superuser ("must be a member of the role ...")."""
    for attempt in range(10):
        try:
            with cursor() as cur:
                cur.execute(f'DROP DATABASE IF EXISTS "{name}"' + (" WITH (FORCE)" if attempt % 2 else ""))
            return True
        except (psycopg2.errors.ObjectInUse, psycopg2.errors.InsufficientPrivilege, psycopg2.OperationalError,
                psycopg2.InterfaceError) as exc:
            if attempt == 9:
                print(f"bench: cannot drop database {name}: {str(exc).strip()}", file=sys.stderr)
                return False
            time.sleep(1)
    return False


class Databases:
    """Creates bench_* databases with sql/schema.sql applied; drops them (unless keep)."""

    def __init__(self, keep: bool) -> None:
        self.keep = keep
        self.admin = connect()
        self.created: list[str] = []
        self.overhead = 0.0  # seconds spent creating, counting and dropping (not timed)

    def cursor(self):
        if self.admin.closed:  # the server restarted under us (a shared dev database)
            self.admin = connect()
        return self.admin.cursor()

    def create(self, label: str) -> str:
        started = time.monotonic()
        name = f"{DB_PREFIX}{re.sub(r'[^a-z0-9]+', '_', label.lower())}_{uuid.uuid4().hex[:6]}"
        with self.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        self.created.append(name)
        conn = connect(name)
        with conn.cursor() as cur:
            cur.execute(SCHEMA.read_text(encoding="utf-8"))
        conn.close()
        self.overhead += time.monotonic() - started
        return name

    def count(self, name: str) -> int:
        started = time.monotonic()
        conn = connect(name)
        with conn.cursor() as cur:
            cur.execute("SELECT count(*) FROM raw_data")
            n = cur.fetchone()[0]
        conn.close()
        self.overhead += time.monotonic() - started
        return n

    def drop(self, name: str) -> None:
        if self.keep or name not in self.created:
            return
        started = time.monotonic()
        if drop_database(self.cursor, name):
            self.created.remove(name)
        self.overhead += time.monotonic() - started

    def close(self) -> None:
        for name in list(self.created):
            self.drop(name)
        if self.created:
            print(f"bench: databases {'kept' if self.keep else 'left behind'}: {', '.join(self.created)}",
                  file=sys.stderr)
        self.admin.close()


@dataclasses.dataclass
class Proc:
    code: int
    seconds: float
    rss_mb: float
    stdout: str
    stderr_path: str


def run_timed(cmd: list[str], env: dict, log_dir: Path, tag: str, cwd: Path) -> Proc:
    """Run cmd, returning its exit code, wall seconds and peak RSS (the child's own ru_maxrss)."""
    log_dir.mkdir(parents=True, exist_ok=True)
    out_path, err_path = log_dir / f"{tag}.out", log_dir / f"{tag}.err"
    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        started = time.monotonic()
        proc = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=cwd)
        _, status, usage = os.wait4(proc.pid, 0)
        seconds = time.monotonic() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    return Proc(proc.returncode, seconds, usage.ru_maxrss / 1024, out_path.read_text(errors="replace"), str(err_path))


def find_psql(server_major: str) -> str:
    """The real psql binary (not Debian's perl wrapper, whose RSS would be measured instead)."""
    candidate = Path(f"/usr/lib/postgresql/{server_major}/bin/psql")
    if candidate.is_file():
        return str(candidate)
    found = shutil.which("psql")
    if not found:
        sys.exit("bench: psql not found")
    return found


def ingest_flags() -> set[str]:
    text = subprocess.run([sys.executable, str(INGEST), "--help"], capture_output=True, text=True,
                          check=False).stdout
    return set(re.findall(r"(--[a-z][a-z0-9-]*)", text))


def pinned_venv(venv: Path, pins: Sequence[str]) -> str | None:
    """Make ``venv`` a virtualenv holding exactly ``pins`` (once: a marker file records them; a
    change of pins makes it again). Returns why it could not, or None."""
    python = venv / "bin" / "python"
    marker = venv / "bench-pins.txt"
    wanted = "\n".join(pins) + "\n"
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return None
    shutil.rmtree(venv, ignore_errors=True)
    print(f"bench: installing {' '.join(pins)} into {venv} (benchmark-only)", flush=True)
    steps = ([sys.executable, "-m", "venv", str(venv)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *pins])
    for cmd in steps:
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
        if p.returncode != 0:
            last = (p.stderr.strip().splitlines() or [f"exit {p.returncode}"])[-1]
            return f"cannot install {' '.join(pins)}: {last}"
    marker.write_text(wanted)
    return None


def ensure_duckdb(scratch: Path) -> tuple[str | None, str]:
    """A Python with DUCKDB_PINS installed (a virtualenv under scratch, made once): (python, "duckdb X")
    or (None, why not)."""
    venv = scratch / "venv-duckdb"
    python = venv / "bin" / "python"
    why = pinned_venv(venv, DUCKDB_PINS)
    if why is not None:
        return None, why
    p = subprocess.run([str(python), "-c", "import duckdb; print(duckdb.__version__)"], capture_output=True,
                       text=True, check=False)
    if p.returncode != 0:
        return None, f"duckdb does not import from {venv}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return str(python), f"duckdb {p.stdout.strip()}"


def ensure_polars(scratch: Path) -> tuple[str | None, str]:
    """A Python with POLARS_PINS installed (a virtualenv under scratch, made once)."""
    venv = scratch / "venv-polars"
    why = pinned_venv(venv, POLARS_PINS)
    if why is not None:
        return None, why
    probe = "import polars, adbc_driver_postgresql; print(polars.__version__)"
    p = subprocess.run([str(venv / "bin" / "python"), "-c", probe], capture_output=True, text=True, check=False)
    if p.returncode != 0:
        return None, f"polars does not import from {venv}: {(p.stderr.strip().splitlines() or ['?'])[-1]}"
    return str(venv / "bin" / "python"), f"polars {p.stdout.strip()} + adbc-driver-postgresql 1.13.0"


# ---------------------------------------------------------------------------------------------
# Variants
# ---------------------------------------------------------------------------------------------
class Bench:
    def __init__(self, args, scratch: Path, dbs: Databases, psql: str, flags: set[str],
                 duckdb_python: str | None = None, duckdb_status: str = "") -> None:
        self.args, self.scratch, self.dbs, self.psql, self.flags = args, scratch, dbs, psql, flags
        self.duckdb_python, self.duckdb_status = duckdb_python, duckdb_status
        self.logs = scratch / "logs"
        self.work = scratch / "work"
        self.work.mkdir(parents=True, exist_ok=True)
        self.results: list[dict] = []

    def child_env(self, dbname: str) -> dict:
        return child_env(dbname)

    def add(self, ds: DataSet, variant: str, **kw) -> dict:
        row = {"dataset": ds.name, "variant": variant, **kw, "loadavg_after": round(os.getloadavg()[0], 2)}
        self.results.append(row)
        shown = " ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}" for k, v in row.items()
                         if k in ("rows", "records_read", "seconds", "rss_mb", "note") and v not in (None, ""))
        print(f"  {ds.name:7} {variant:34} {shown}", flush=True)
        return row

    def tag(self, ds: DataSet, variant: str) -> str:
        return f"{ds.name}-{re.sub(r'[^A-Za-z0-9]+', '_', variant).strip('_')}"

    def limit(self, ds: DataSet, root: Path, meta: dict) -> None:
        db = self.dbs.create(f"{ds.name}_limit")
        try:
            s = pg_settings()
            path = str((root / "limit.tsv").resolve()).replace("'", "''")
            cmd = [self.psql, "-X", "-v", "ON_ERROR_STOP=1", "-h", s["host"], "-p", str(s["port"]),
                   "-U", s["user"], "-d", db, "-c", COPY_SQL.format(path=path)]
            p = run_timed(cmd, self.child_env(db), self.logs, self.tag(ds, "limit"), self.work)
            copied = re.search(r"COPY (\d+)", p.stdout)
            rows = self.dbs.count(db)
            note = "distinct keys only (first occurrence): COPY has no ON CONFLICT" if ds.repeated_keys else ""
            self.add(ds, "limit", status="ok" if p.code == 0 else f"exit {p.code}", rows=rows,
                     records_read=int(copied.group(1)) if copied else None, rows_inserted=rows,
                     seconds=p.seconds, rss_mb=p.rss_mb, note=note)
        finally:
            self.dbs.drop(db)

    def baseline(self, ds: DataSet, root: Path, meta: dict) -> None:
        if ds.baseline_skip:
            self.add(ds, "baseline", status="skipped", note=ds.baseline_skip)
            return
        db = self.dbs.create(f"{ds.name}_baseline")
        try:
            cmd = [sys.executable, str(BASELINE), str((root / "json").resolve())]
            p = run_timed(cmd, self.child_env(db), self.logs, self.tag(ds, "baseline"), self.work)
            out = _last_json_line(p.stdout)
            rows = self.dbs.count(db)
            self.add(ds, "baseline", status="ok" if p.code == 0 else f"exit {p.code}", rows=rows,
                     records_read=out.get("records_read"), rows_inserted=rows, seconds=p.seconds, rss_mb=p.rss_mb,
                     note="" if p.code == 0 else f"exit {p.code}, see {p.stderr_path}")
        finally:
            self.dbs.drop(db)

    def duckdb(self, ds: DataSet, root: Path, meta: dict) -> None:
        # The 2nd run finds every key present: DuckDB's INSERT OR IGNORE into a postgres table reads
        # the table's keys back (COPY ... TO STDOUT) to find the conflicts, so it costs a table scan.
        self.peer(ds, root, meta, "duckdb", self.duckdb_python, self.duckdb_status, DUCKDB_LOADER,
                  (("duckdb (1st load)", "first-wins, no validation"),
                   ("duckdb (2nd: all present)", "reads the table's keys back")))

    def polars(self, ds: DataSet, root: Path, meta: dict) -> None:
        self.peer(ds, root, meta, "polars", self.polars_python, self.polars_status, POLARS_LOADER,
                  (("polars+adbc (1st load)", "first-wins per file, no validation"),
                   ("polars+adbc (2nd: all present)", "")))

    def peer(self, ds: DataSet, root: Path, meta: dict, name: str, python: str | None, status: str,
             loader: Path, runs: tuple[tuple[str, str], ...]) -> None:
        """A peer's loader run twice into one fresh database: its first load, then a run that
        finds every key present."""
        if not python:
            self.add(ds, name, status="skipped", note=f"skipped: {status}")
            return
        db = self.dbs.create(f"{ds.name}_{name}")
        try:
            for variant, note in runs:
                cmd = [python, str(loader), str((root / "json").resolve())]
                p = run_timed(cmd, self.child_env(db), self.logs, self.tag(ds, variant), self.work)
                out = _last_json_line(p.stdout)
                rows = self.dbs.count(db)
                if p.code != 0:
                    note += f"; exit {p.code}, see {p.stderr_path}"
                if rows != meta["distinct_keys"]:
                    note += f"; ROWS != {meta['distinct_keys']} distinct keys"
                self.add(ds, variant, status="ok" if p.code == 0 else f"exit {p.code}", rows=rows,
                         rows_inserted=out.get("rows_inserted"), seconds=p.seconds, rss_mb=p.rss_mb,
                         note=note.strip("; "))
                if p.code != 0:
                    break
        finally:
            self.dbs.drop(db)

    def ingest(self, ds: DataSet, root: Path, meta: dict, workers: int | None = None) -> None:
        label = f"ingest --workers {workers}" if workers else "ingest"
        db = self.dbs.create(f"{ds.name}_ingest{workers or ''}")
        runs = ("first",) if workers else ds.ingest_runs
        try:
            for which in runs:
                extra: list[str] = ["--workers", str(workers)] if workers else []
                note = ""
                if which == "first":
                    variant = f"{label} (1st load)"
                elif which == "unchanged":
                    variant = f"{label} (2nd: unchanged files)"
                elif "--force" in self.flags:
                    variant, extra = f"{label} (3rd: --force)", [*extra, "--force"]
                else:
                    variant = f"{label} (3rd: re-run)"
                    note = "ingest.py has no --force: same as the 2nd run"
                tag = self.tag(ds, variant)
                summary_path = self.work / f"{tag}.summary.json"
                summary_path.unlink(missing_ok=True)
                # `python -m ingest` from the snapshot's compiled bytecode: the image's entry point
                env = {**self.child_env(db), "PYTHONPATH": str(INGEST.parent)}
                cmd = [sys.executable, "-m", "ingest", "--data-dir", str((root / "json").resolve()),
                       "--reject-file", str(self.work / f"{tag}.rejects.jsonl"),
                       "--summary-json", str(summary_path), *extra]
                p = run_timed(cmd, env, self.logs, tag, self.work)
                summary = json.loads(summary_path.read_text()) if summary_path.exists() else {}
                rows = self.dbs.count(db)
                if p.code != 0:
                    note = (note + "; " if note else "") + f"exit {p.code}, see {p.stderr_path}"
                if rows != meta["distinct_keys"]:
                    note = (note + "; " if note else "") + f"ROWS != {meta['distinct_keys']} distinct keys"
                self.add(ds, variant, status="ok" if p.code == 0 else f"exit {p.code}", rows=rows,
                         records_read=summary.get("records_read"), rows_inserted=summary.get("rows_inserted"),
                         rows_duplicate=summary.get("rows_duplicate"), files_skipped=summary.get("files_skipped"),
                         records_rejected=summary.get("records_rejected"), files_failed=summary.get("files_failed"),
                         ingest_seconds=summary.get("seconds"), seconds=p.seconds, rss_mb=p.rss_mb, note=note)
        finally:
            self.dbs.drop(db)


def wait_for_server(seconds: float = 120) -> bool:
    """After a connection failure (someone restarted the shared dev server): wait until it is back."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            connect().close()
            time.sleep(5)  # a restart in a test suite may come with another one right after
            connect().close()
            return True
        except psycopg2.OperationalError:
            time.sleep(2)
    return False


def _last_json_line(text: str) -> dict:
    for line in reversed(text.strip().splitlines()):
        try:
            return json.loads(line)
        except ValueError:
            continue
    return {}


# ---------------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------------
def machine_info(psql: str) -> dict:
    cpu = "?"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem_gb = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    conn = connect()
    with conn.cursor() as cur:
        cur.execute("SHOW server_version")
        server = cur.fetchone()[0]
        cur.execute("SELECT extversion FROM pg_extension WHERE extname = 'timescaledb'")
        row = cur.fetchone()
        cur.execute("SELECT name, current_setting(name) FROM pg_settings WHERE name IN "
                    "('shared_buffers', 'synchronous_commit', 'fsync', 'max_wal_size', 'wal_level') ORDER BY name")
        settings = dict(cur.fetchall())
    conn.close()
    git = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
                         text=True, check=False).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "--", "ingest.py", "sql"],
                           capture_output=True, text=True, check=False).stdout.strip()
    version = subprocess.run([sys.executable, str(INGEST), "--version"], capture_output=True, text=True,
                             check=False).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC"),
        "cores": os.cpu_count(), "memory_gb": round(mem_gb, 1), "cpu": cpu,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
        "postgresql": server, "timescaledb": row[0] if row else "?", "server_settings": settings,
        "python": platform.python_version(), "psycopg2": psycopg2.__version__.split()[0],
        "psql": subprocess.run([psql, "--version"], capture_output=True, text=True, check=False).stdout.strip(),
        "git": git + (" + uncommitted changes in ingest.py/sql" if dirty else ""), "ingest_py": version,
        "ingest_py_sha256": _sha(INGEST),
    }


def _fmt_int(n) -> str:
    return "" if n is None else f"{n:,}"


def _fmt_rate(n, s) -> str:
    if n is None or not s:
        return ""
    return f"{n / s:,.0f}"


def finish_rows(results: list[dict]) -> None:
    """Add the ratios: vs_limit = limit s / variant s; vs_baseline = variant s / baseline s."""
    first = {}
    for r in results:
        if r["variant"] in ("limit", "baseline") and r.get("status") == "ok":
            first[(r["dataset"], r["variant"])] = r["seconds"]
    for r in results:
        if not r.get("seconds"):
            continue
        lim, base = first.get((r["dataset"], "limit")), first.get((r["dataset"], "baseline"))
        r["vs_limit"] = round(lim / r["seconds"], 3) if lim else None
        r["vs_baseline"] = round(r["seconds"] / base, 3) if base else None


def markdown(results: list[dict], info: dict, sets: dict, extra_notes: list[str]) -> str:
    lines = ["# ingest.py benchmark", ""]
    lines.append(f"- Date: {info['date']}; machine: {info['cores']} cores, {info['memory_gb']} GB RAM, "
                 f"CPU {info['cpu']}; load average at start {info['loadavg_at_start']}")
    lines.append(f"- PostgreSQL {info['postgresql']}, TimescaleDB {info['timescaledb']}, settings "
                 + ", ".join(f"{k}={v}" for k, v in info["server_settings"].items()))
    lines.append(f"- Python {info['python']}, psycopg2 {info['psycopg2']}, {info['psql']}; "
                 f"{info['ingest_py']} (sha256 {info['ingest_py_sha256']}, git {info['git']})")
    lines += ["", "Data sets:", ""]
    for name, m in sets.items():
        lines.append(f"- **{name}**: {m['description']}: {m['files']} file(s), {m['bytes'] / 1e6:,.1f} MB "
                     f"(files {_size(m['smallest_file_bytes'])} to {_size(m['largest_file_bytes'])}), "
                     f"{m['records']:,} records, {m['distinct_keys']:,} distinct keys")
    lines += ["", ("| data set | variant | rows in table | records read | inserted / duplicate | seconds | rows/s "
              "| records/s | peak RSS MB | vs limit | vs baseline | note |"),
              "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|---|"]
    for r in results:
        if r.get("seconds") is None:
            lines.append(f"| {r['dataset']} | {r['variant']} | | | | | | | | | | {r['note']} |")
            continue
        s = r["seconds"]
        ins = r.get("rows_inserted")
        dup = r.get("rows_duplicate")
        insdup = _fmt_int(ins) + (f" / {dup:,}" if dup is not None else "")
        if r.get("files_skipped") is not None:
            insdup += f" ({r['files_skipped']} files skipped)"
        recs = r.get("records_read")
        rec_rate = _fmt_rate(recs, s) if recs is not None and recs != ins else ""
        vs_l, vs_b = _ratio(r.get("vs_limit")), _ratio(r.get("vs_baseline"))
        lines.append(f"| {r['dataset']} | {r['variant']} | {_fmt_int(r.get('rows'))} | {_fmt_int(recs)} | {insdup} "
                     f"| {s:.2f} | {_fmt_rate(ins, s)} | {rec_rate} | {r['rss_mb']:.0f} | {vs_l} | {vs_b} "
                     f"| {r.get('note') or ''} |")
    lines += [
        "",
        ("- seconds: wall time of the loader process, start-up included. rows/s = rows inserted by that run / seconds; "
        "records/s = records read / seconds (shown where it differs)."),
        "- peak RSS: ru_maxrss of the loader process (for the limit, psql's own; the server is not counted).",
        ("- **vs limit** = limit seconds / variant seconds: the share of a single psql \\copy's speed at producing "
        "the same table (1.00 = as fast as COPY of the final rows; 0.25 = 4x slower)."),
        ("- **vs baseline** = variant seconds / baseline seconds (the baseline's first load on the same data set; "
        "below 1 = faster than the baseline)."),
        ("- Each variant runs against a fresh database with sql/schema.sql applied; the ingest re-runs reuse the "
        "database of the 1st load. One run each on a shared machine: expect +-10-20 % noise."),
        *(f"- {n}" for n in extra_notes),
        *targets(results),
    ]
    return "\n".join(lines) + "\n"


def targets(results: list[dict]) -> list[str]:
    """The targets `make bench` checks (docs/benchmarks.md), each met or not, from this run's rows."""
    sec = {(r["dataset"], r["variant"]): r["seconds"] for r in results if r.get("status") == "ok" and r.get("seconds")}
    first = "ingest (1st load)"
    checks: list[tuple[str, float | None, str, float]] = []

    def ratio(ds: str, variant: str, other: str) -> float | None:
        mine, theirs = sec.get((ds, variant)), sec.get((ds, other))
        return None if mine is None or theirs is None else mine / theirs

    checks.append(("task0: 1st load / DuckDB's", ratio("task0", first, "duckdb (1st load)"), "<=", 0.6))
    checks.append(("b: 1st load / DuckDB's", ratio("b", first, "duckdb (1st load)"), "<=", 0.8))
    lim = ratio("b", "limit", first)
    checks.append(("b: rows/s / the COPY limit's", lim, ">=", 0.85))
    for ds in sorted({r["dataset"] for r in results}):
        got = ratio(ds, first, "polars+adbc (1st load)")
        if got is not None:
            checks.append((f"{ds}: 1st load / Polars+ADBC's", got, "<", 1.0))
    rss = [r["rss_mb"] for r in results if r["variant"].startswith("ingest") and r.get("rss_mb")]
    checks.append(("peak RSS of every ingest run, MB", max(rss) if rss else None, "<=", 200))
    rerun = [r["seconds"] for r in results if r["variant"].startswith("ingest (2nd") and r.get("seconds")]
    checks.append(("slowest unchanged re-run, s", max(rerun) if rerun else None, "<=", 0.15))
    lines = ["", "Targets:", "", "| target | limit | measured | |", "|---|--:|--:|---|"]
    for name, got, op, limit in checks:
        if got is None:
            lines.append(f"| {name} | {op} {limit} | | not measured in this run |")
            continue
        met = got <= limit if op == "<=" else got >= limit if op == ">=" else got < limit
        lines.append(f"| {name} | {op} {limit} | {got:.2f} | {'met' if met else '**not met**'} |")
    return lines


def _ratio(x: float | None) -> str:
    if x is None:
        return ""
    return f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def _size(n: int) -> str:
    for unit, div in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n} B"


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="Benchmark ingest.py against psql \\copy, a hand-written loader and DuckDB.")
    p.add_argument("--quick", action="store_true", help="small data sets (~1/50 scale), a smoke run in seconds")
    p.add_argument("--only", help="comma-separated data sets: task0,a,b,c,d (all of d) or d-100k,d-1M,d-10M")
    p.add_argument("--keep", action="store_true", help="keep the bench_* databases (not dropped)")
    p.add_argument("--scratch", type=Path, default=ROOT / "bench-data", help="scratch dir (default ./bench-data)")
    p.add_argument("--variants", default=",".join(VARIANTS),
                   help=f"comma-separated subset of {','.join(VARIANTS)} (default all)")
    a = p.parse_args(argv)
    started = time.monotonic()

    all_sets = datasets(a.quick)
    if a.only:
        wanted = {w.strip() for w in a.only.split(",") if w.strip()}
        chosen = [ds for ds in all_sets if ds.name in wanted or ds.name.split("-")[0] in wanted]
        unknown = wanted - {ds.name for ds in all_sets} - {ds.name.split("-")[0] for ds in all_sets}
        if unknown:
            p.error(f"unknown data set(s): {', '.join(sorted(unknown))}")
    else:
        chosen = all_sets
    variants = {v.strip() for v in a.variants.split(",") if v.strip()}
    if variants - set(VARIANTS):
        p.error(f"unknown variant(s): {', '.join(sorted(variants - set(VARIANTS)))}")
    scratch = a.scratch.resolve()
    data_root = scratch / ("quick" if a.quick else "full")

    def root_of(ds: DataSet) -> Path:  # Task-0's output has one size: one copy for both
        return scratch / ds.name if ds.task0 else data_root / ds.name

    admin = connect()
    with admin.cursor() as cur:
        cur.execute("SELECT datname FROM pg_database WHERE datname LIKE 'bench\\_%' ORDER BY 1")
        stale = [r[0] for r in cur.fetchall()]
        cur.execute("SHOW server_version_num")
        major = str(int(cur.fetchone()[0]) // 10000)
    admin.close()
    if stale:
        print(f"bench: note: databases left by an earlier run (--keep?): {', '.join(stale)}", file=sys.stderr)
    psql = find_psql(major)
    snapshot_loader(scratch)
    flags = ingest_flags()
    info = machine_info(psql)
    print(f"bench: {info['cores']} cores, {info['memory_gb']} GB, {info['cpu']}; PostgreSQL {info['postgresql']}, "
          f"TimescaleDB {info['timescaledb']}; Python {info['python']}; {info['date']}", flush=True)

    sets: dict[str, dict] = {}
    gen_seconds = 0.0
    for ds in chosen:
        t = time.monotonic()
        meta = generate(ds, root_of(ds))
        gen_seconds += time.monotonic() - t
        meta["description"] = ds.description
        sets[ds.name] = meta
        print(f"bench: data set {ds.name}: {meta['records']:,} records, {meta['distinct_keys']:,} distinct keys, "
              f"{meta['files']} files, {meta['bytes'] / 1e6:,.1f} MB "
              f"({'generated in %.0f s' % (time.monotonic() - t) if meta['generated'] else 'cached'})", flush=True)

    notes = []
    if "--force" not in flags:
        notes.append("ingest.py has no --force: the 3rd ingest run is a plain re-run, like the 2nd.")
    if "--workers" not in flags:
        notes.append("ingest.py has no --workers: the --workers 2 variant was not run.")
    left_out = [f"ingest 3rd run (--force) on {ds.name}" for ds in chosen if "all-present" not in ds.ingest_runs]
    left_out += [f"baseline on {ds.name} ({ds.baseline_skip})" for ds in chosen if ds.baseline_skip]
    if left_out:
        notes.append("Left out (time budget / memory): " + "; ".join(left_out) + ".")

    duckdb_python, duckdb_status = ensure_duckdb(scratch) if "duckdb" in variants else (None, "")
    if "duckdb" in variants:
        if duckdb_python:
            notes.append(f"duckdb: scripts/bench_duckdb.py on {duckdb_status} with its postgres extension from the "
                         f"PyPI wheel ({', '.join(DUCKDB_PINS)}; loaded from the wheel's file, not downloaded): "
                         "read_json with explicit columns (naive timestamps as UTC), first occurrence of each key kept "
                         "(row_number() over file name, then position in the file), one INSERT OR IGNORE into the "
                         "attached PostgreSQL table (the postgres extension finds the conflicts by reading the table's keys back with "
                         "COPY ... TO STDOUT, then COPYs the new rows in; the 2nd run, every key present, shows that cost). "
                         "It validates nothing (a bad record fails the whole run; no reject "
                         "file, manifest or per-file commit) and uses every core (DuckDB threads); its peak RSS is the "
                         "DuckDB process's own.")
        else:
            notes.append(f"duckdb: not run: {duckdb_status}.")
    polars_python, polars_status = ensure_polars(scratch) if "polars" in variants else (None, "")
    if "polars" in variants:
        notes.append(f"polars: scripts/bench_polars.py on {polars_status}" if polars_python else
                     f"polars: not run: {polars_status}.")
        if polars_python:
            notes.append("polars+adbc: per file read_json, to_datetime (UTC), unique(keep='first', maintain_order=True) "
                         "on the key, ADBC bulk ingest (binary COPY) into a temporary table, INSERT ... ON CONFLICT DO "
                         "NOTHING, commit; validates nothing; uses every core; peak RSS is its process's own.")
    dbs = Databases(a.keep)
    bench = Bench(a, scratch, dbs, psql, flags, duckdb_python, duckdb_status)
    bench.polars_python, bench.polars_status = polars_python, polars_status
    run_started = time.monotonic()
    try:
        for ds in chosen:
            root = root_of(ds)
            meta = sets[ds.name]
            print(f"bench: running {ds.name}", flush=True)
            steps = [(v, getattr(bench, v), {}) for v in VARIANTS if v in variants]
            if "ingest" in variants and ds.workers and "--workers" in flags:
                steps.append(("ingest --workers 2", bench.ingest, {"workers": 2}))
            for variant, step, kw in steps:
                for attempt in (1, 2, 3):
                    try:
                        step(ds, root, meta, **kw)
                        break
                    except (psycopg2.Error, OSError, ValueError) as exc:  # record it, go on with the next
                        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
                        if attempt < 3 and isinstance(exc, psycopg2.OperationalError) and wait_for_server():
                            print(f"bench: {ds.name} {variant}: {first}; the server came back, retrying",
                                  file=sys.stderr)
                            continue
                        bench.add(ds, variant, status="error", note=f"error: {first}")
    finally:
        dbs.close()
    run_seconds = time.monotonic() - run_started
    total = time.monotonic() - started
    timed = sum(r.get("seconds") or 0 for r in bench.results)
    notes.append(f"Total wall time {total:.0f} s: data generation {gen_seconds:.0f} s (cached when unchanged), "
                 f"timed loader runs {timed:.0f} s, database create/schema/count/drop {dbs.overhead:.0f} s "
                 "(DROP DATABASE checkpoints, so every variant starts after a checkpoint).")

    finish_rows(bench.results)
    md = markdown(bench.results, info, sets, notes)
    suffix = "-quick" if a.quick else ""
    scratch.mkdir(parents=True, exist_ok=True)
    (scratch / f"results{suffix}.md").write_text(md, encoding="utf-8")
    (scratch / f"results{suffix}.json").write_text(json.dumps(
        {"machine": info, "datasets": sets, "results": bench.results, "notes": notes,
         "total_seconds": round(total, 1), "generation_seconds": round(gen_seconds, 1),
         "run_seconds": round(run_seconds, 1)}, indent=1) + "\n", encoding="utf-8")
    print()
    print(md)
    print(f"bench: wrote {scratch / f'results{suffix}.md'} and {scratch / f'results{suffix}.json'}")
    bad = [r for r in bench.results if r.get("status") not in ("ok", "skipped")]
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
