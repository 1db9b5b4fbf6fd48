#!/usr/bin/env python3
"""What the server pays for loading file by file: the limit's rows as one COPY, as one COPY per
file (each in its own transaction, as the loader sends them), and a group of files per
transaction; then the loader itself.

    eval "$(scripts/dev-db.sh env)"
    .venv/bin/python scripts/bench_server.py bench-data/full/b 4 [--group 20]

DATA is a data set that `make bench` generated (its json/ directory and limit.tsv, the distinct
rows in file order). limit.tsv is cut where (user_id, metric) changes, which for data set b (one
user and metric per file) gives its files. Each way runs into a fresh database (sql/schema.sql
applied), the ways alternating round by round; prints wall and server CPU seconds (every
PostgreSQL process, from /proc, exited backends included) per run, and the median of each way's
ratio to one COPY in the same round, so the machine's drift cancels. Measurement only.

  one COPY      the limit: every row in one COPY, one transaction.
  per file      one COPY per file, each in its own transaction with the loader's statements around
                it (synchronous_commit off, a savepoint for the file and one for the COPY).
  N per tx      the same COPYs and savepoints, N files to a transaction.
  ingest        python -m ingest (the module compiled first) on DATA/json.
"""
from __future__ import annotations

import argparse
import io
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench
from profile_load import server_cpu_seconds

COPY = 'COPY raw_data (user_id, metric, "timestamp", value) FROM STDIN'


def files_of(limit_tsv: Path) -> list[str]:
    """limit.tsv's lines, joined per (user_id, metric) run."""
    parts, part, key = [], [], None
    with open(limit_tsv, encoding="utf-8") as f:
        for line in f:
            k = line.split("\t", 2)[:2]
            if k != key and part:
                parts.append("".join(part))
                part = []
            key = k
            part.append(line)
    if part:
        parts.append("".join(part))
    return parts


def one_copy(db: str, parts: list[str]) -> None:
    conn = bench.connect(db)
    conn.autocommit = False
    with conn.cursor() as cur:
        cur.copy_expert(COPY, io.StringIO("".join(parts)), size=1 << 16)
    conn.commit()
    conn.close()


def per_file(db: str, parts: list[str], group: int) -> None:
    conn = bench.connect(db)
    conn.autocommit = False
    for i, part in enumerate(parts, 1):
        with conn.cursor() as cur:
            cur.execute("SET LOCAL synchronous_commit = off; SAVEPOINT ingest_file; SAVEPOINT ingest_direct")
            cur.copy_expert(COPY, io.StringIO(part), size=1 << 16)
            cur.execute("RELEASE SAVEPOINT ingest_direct; RELEASE SAVEPOINT ingest_file")
        if i % group == 0:
            conn.commit()
    conn.commit()
    conn.close()


def loader(db: str, data: Path) -> None:
    snapshot = bench.INGEST.parent
    subprocess.run([sys.executable, "-m", "ingest", "--data-dir", str(data / "json"), "--reject-file",
                    str(snapshot / "rejects.jsonl")], cwd=snapshot, env=bench.child_env(db), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data", type=Path, help="a data set of make bench (with json/ and limit.tsv)")
    p.add_argument("rounds", type=int, nargs="?", default=4)
    p.add_argument("--group", type=int, default=20, help="files per transaction in the grouped way")
    args = p.parse_args()
    args.data = args.data.resolve()
    parts = files_of(args.data / "limit.tsv")
    rows = sum(part.count("\n") for part in parts)
    print(f"{args.data}: {rows:,} rows in {len(parts)} files", flush=True)
    scratch = Path(tempfile.mkdtemp(prefix="bench-server-"))
    bench.snapshot_loader(scratch)  # ingest.py and sql/ as they are now, compiled
    ways = {"one COPY": lambda db: one_copy(db, parts),
            "per file": lambda db: per_file(db, parts, 1),
            f"{args.group} per tx": lambda db: per_file(db, parts, args.group),
            "ingest": lambda db: loader(db, args.data)}
    dbs = bench.Databases(keep=False)
    ratios: dict[str, list[float]] = {way: [] for way in ways}
    try:
        for r in range(1, args.rounds + 1):
            first = None
            for way, run in ways.items():
                db = dbs.create("server")
                time.sleep(1)  # the schema's own work settles
                cpu, started = server_cpu_seconds(), time.monotonic()
                run(db)
                wall = time.monotonic() - started
                time.sleep(0.5)  # exited backends are reaped
                server = server_cpu_seconds() - cpu
                dbs.drop(db)
                first = first or server
                ratios[way].append(server / first)
                print(f"round {r}  {way:10}  wall {wall:6.2f} s  server CPU {server:6.2f} s  "
                      f"({server / first:.2f} x one COPY's)", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    print("\nserver CPU, median ratio to one COPY in the same round:")
    for way, values in ratios.items():
        print(f"  {way:10}  {statistics.median(values):.2f}  [{min(values):.2f}-{max(values):.2f}]")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
