#!/usr/bin/env python3
"""Benchmark: a one-year, one-user Takeout-like Fitbit export, and the same records as flat JSON.

    eval "$(bash scripts/dev-db.sh env)" && .venv/bin/python scripts/bench_fitbit.py [--days 365]

Generates the export (scripts/make_fitbit_export.py, old layout: per-day heart rate at 5-15 s and
steps per minute, SpO2/HRV/AZM/breathing CSVs, plus files an export holds that are not data), then
writes the very records its readers produce as flat Task-0 JSON, one file per source file. Each is
loaded by ingest.py into a fresh database: seconds, rows/s and peak RSS (of the loader process).
Target (issue "Load real Fitbit data"): Takeout rows/s >= 0.7 x flat rows/s, RSS <= 200 MB.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

import psycopg2
from make_fitbit_export import make_takeout

import ingest


def admin():
    conn = psycopg2.connect(host=os.environ["POSTGRES_HOST"], port=os.environ["POSTGRES_PORT"],
                            user=os.environ["POSTGRES_USER"], password=os.environ["POSTGRES_PASSWORD"],
                            dbname=os.environ["POSTGRES_DB"])
    conn.autocommit = True
    return conn


def load(data: Path, scratch: Path) -> dict:
    """ingest.py into a fresh database: seconds, rows, peak RSS of the child."""
    name = f"bench_fitbit_{uuid.uuid4().hex[:8]}"
    conn = admin()
    with conn.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    conn.close()
    summary = scratch / f"{name}.json"
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(data), "--quiet",
                           "--user-id", "bench", "--reject-file", str(scratch / "rejects.jsonl"),
                           "--summary-json", str(summary)], env={**os.environ, "POSTGRES_DB": name},
                          capture_output=True, text=True, check=False)
    seconds = time.monotonic() - started
    rss_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    conn = admin()
    for attempt in range(40):  # an autovacuum worker may still be in it; the role cannot end one
        try:
            with conn.cursor() as cur:
                cur.execute(f'DROP DATABASE "{name}"')
            break
        except psycopg2.errors.ObjectInUse:
            time.sleep(0.25)
    conn.close()
    if proc.returncode != 0:
        raise SystemExit(f"ingest.py exited {proc.returncode}: {proc.stderr[-2000:]}")
    s = json.loads(summary.read_text())
    return {"seconds": seconds, "rows": s["rows_inserted"], "records": s["records_read"], "rss_mb": rss_mb,
            "files": s["files_loaded"]}


def flatten(export: Path, flat: Path) -> int:
    """The records the readers produce, as flat JSON arrays: one file per source file."""
    count = 0
    for df in ingest.load_files(export, "auto", "bench"):
        if df.kind not in ingest.FITBIT_KINDS:
            continue
        with open(df.path, encoding="utf-8", newline="") as text:
            records = [r for _, r in ingest.read_fitbit(df.kind, text, "bench") if type(r) is dict]
        out = flat / (df.rel.replace("/", "__") + ".json")
        out.write_text(json.dumps(records))
        count += len(records)
    return count


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--days", type=int, default=365)
    p.add_argument("--scratch", default=str(ROOT / "bench-data" / "fitbit"))
    args = p.parse_args()
    scratch = Path(args.scratch)
    export, flat = scratch / f"takeout-{args.days}d", scratch / f"flat-{args.days}d"
    if not export.exists():
        print(f"bench_fitbit: generating a {args.days}-day export in {export}", flush=True)
        make_takeout(export, "old", days=args.days, user="alice", seed=11)
    if not flat.exists():
        flat.mkdir(parents=True)
        print(f"bench_fitbit: {flatten(export, flat):,} records as flat JSON in {flat}", flush=True)
    results = {"takeout": load(export, scratch), "flat": load(flat, scratch)}  # takeout first: RSS is a max
    print("\n| data | files | records | rows | seconds | rows/s | peak RSS |\n|---|--:|--:|--:|--:|--:|--:|")
    for label, r in results.items():
        print(f"| {label} ({args.days} days) | {r['files']:,} | {r['records']:,} | {r['rows']:,} | {r['seconds']:.1f} | "
              f"{r['rows'] / r['seconds']:,.0f} | {r['rss_mb']:.0f} MB |")
    ratio = (results["takeout"]["rows"] / results["takeout"]["seconds"]) / (
        results["flat"]["rows"] / results["flat"]["seconds"])
    print(f"\nTakeout rows/s = {ratio:.2f} x flat rows/s (target >= 0.7); "
          f"RSS {results['takeout']['rss_mb']:.0f} MB (target <= 200 MB; the flat run's RSS is the max of both)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
