#!/usr/bin/env python3
"""The common hand-written loader, as a benchmark baseline for ingest.py.

For each ``*.json`` file under DATA_DIR (recursively, sorted path order): ``json.load`` the whole
file, then ``psycopg2.extras.execute_values(... ON CONFLICT DO NOTHING, page_size=100)`` and one
commit per file. No validation, no streaming. Connection from the POSTGRES_* environment.

Prints one JSON line at the end: files, records_read, seconds.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import psycopg2
import psycopg2.extras

INSERT_SQL = 'INSERT INTO raw_data (user_id, metric, "timestamp", value) VALUES %s ON CONFLICT DO NOTHING'


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bench_baseline.py DATA_DIR", file=sys.stderr)
        return 2
    started = time.monotonic()
    data_dir = Path(argv[0])
    conn = psycopg2.connect(
        host=os.environ.get("POSTGRES_HOST", "localhost"),
        port=os.environ.get("POSTGRES_PORT", "5432"),
        dbname=os.environ.get("POSTGRES_DB", "postgres"),
        user=os.environ.get("POSTGRES_USER", "postgres"),
        password=os.environ.get("POSTGRES_PASSWORD", ""),
        application_name="bench-baseline",
    )
    with conn.cursor() as cur:
        cur.execute("SET TIME ZONE 'UTC'")
    conn.commit()
    files = records = 0
    for path in sorted(data_dir.rglob("*.json")):
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
        rows = [(r["user_id"], r["metric"], r["timestamp"], r["value"]) for r in data]
        with conn.cursor() as cur:
            psycopg2.extras.execute_values(cur, INSERT_SQL, rows, page_size=100)
        conn.commit()
        files += 1
        records += len(rows)
        del data, rows
    conn.close()
    print(json.dumps({"files": files, "records_read": records, "seconds": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
