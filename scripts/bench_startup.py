#!/usr/bin/env python3
"""Start-up cost of ingest.py versions: a run that finds nothing new, timed many times, interleaved.

    eval "$(scripts/dev-db.sh env)"
    .venv/bin/python scripts/bench_startup.py --data-dir bench-data/full/d-100k/json \
        --version before=1f556d7 --version now=HEAD --version work=ingest.py --runs 25

Each version (a git revision, or a path to an ingest.py) gets a directory of its own with its
ingest.py and sql/, the module compiled as the image compiles it, and a database of its own
(bench_startup_<name>), loaded once from --data-dir before the timing. Then every round runs each
version once as a script (`python ingest.py`) and once as a module (`python -m ingest`, from the
bytecode), in turn, so that the machine's drift reaches all of them alike; every run writes a
--summary-json, as in make bench. Prints the median, minimum and maximum wall milliseconds of each
version and mode.
"""
from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import connect, drop_database

ROOT = Path(__file__).resolve().parent.parent


def checkout(name: str, source: str, into: Path) -> Path:
    """A directory holding the version's ingest.py and sql/, the module compiled."""
    home = into / name
    (home / "sql").mkdir(parents=True)
    if Path(source).is_file():
        shutil.copy2(source, home / "ingest.py")
        for f in (Path(source).resolve().parent / "sql").glob("*.sql"):
            shutil.copy2(f, home / "sql" / f.name)
    else:
        for rel in ("ingest.py", "sql/schema.sql"):
            text = subprocess.run(["git", "-C", str(ROOT), "show", f"{source}:{rel}"], check=True,
                                  capture_output=True).stdout
            (home / rel).write_bytes(text)
    py_compile.compile(str(home / "ingest.py"), doraise=True)
    return home


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data-dir", type=Path, required=True)
    ap.add_argument("--version", action="append", required=True, metavar="NAME=REV_OR_PATH")
    ap.add_argument("--runs", type=int, default=25)
    args = ap.parse_args()
    data_dir = args.data_dir.resolve()
    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    conn = connect()
    versions: dict[str, tuple[Path, dict]] = {}
    try:
        for spec in args.version:
            name, _, source = spec.partition("=")
            home = checkout(name, source, work)
            db = f"bench_startup_{name}"
            drop_database(conn.cursor, db)
            with conn.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db}"')
            schema = connect(db)
            with schema.cursor() as cur:  # as make bench does: the schema applied beforehand
                cur.execute((home / "sql" / "schema.sql").read_text(encoding="utf-8"))
            schema.close()
            env = {**os.environ, "POSTGRES_DB": db, "DATA_DIR": str(data_dir), "PYTHONPATH": str(home),
                   "REJECT_FILE": str(work / f"{name}.rejects.jsonl"), "PYTHONDONTWRITEBYTECODE": "1"}
            flags = ["-q", "--summary-json", str(work / f"{name}.summary.json")]  # as make bench runs it
            subprocess.run([sys.executable, str(home / "ingest.py"), *flags], env=env, check=True)  # the load
            versions[name] = (home, env)
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.runs):
            for name, (home, env) in versions.items():
                for mode, cmd in (("script", [sys.executable, str(home / "ingest.py"), *flags]),
                                  ("module", [sys.executable, "-m", "ingest", *flags])):
                    started = time.perf_counter()
                    subprocess.run(cmd, env=env, cwd=home, check=True)
                    times.setdefault((name, mode), []).append((time.perf_counter() - started) * 1000)
        for (name, mode), ms in sorted(times.items(), key=lambda kv: (kv[0][1], kv[0][0])):
            print(f"{mode:6} {name:10} median {statistics.median(ms):4.0f} ms  (min {min(ms):.0f}, "
                  f"max {max(ms):.0f}, {len(ms)} runs)")
    finally:
        for name in versions:
            drop_database(conn.cursor, f"bench_startup_{name}")
        conn.close()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
