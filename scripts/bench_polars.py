#!/usr/bin/env python3
"""Polars with the ADBC PostgreSQL driver as a benchmark peer of ingest.py (benchmark-only).

    bench_polars.py DATA_DIR      (connection from POSTGRES_HOST/PORT/DB/USER/PASSWORD)

What a data engineer would write with these two libraries: for each JSON file under DATA_DIR (in
sorted order), `pl.read_json`, the timestamp parsed (`str.to_datetime`, naive read as UTC), the
value cast to Float64, `unique(keep="first", maintain_order=True)` on (user_id, metric,
timestamp), ADBC's bulk ingest (binary COPY) into a temporary table, then `INSERT ... SELECT ...
ON CONFLICT DO NOTHING` into raw_data and a commit, one file a transaction. Validates nothing: a
file Polars cannot read fails the run. scripts/bench.py installs the pinned versions into a
virtualenv of its own. Prints one JSON line at the end.
"""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from urllib.parse import quote

import adbc_driver_postgresql.dbapi as adbc
import polars as pl

KEY = ["user_id", "metric", "timestamp"]
MERGE = ('INSERT INTO raw_data (user_id, metric, "timestamp", value) '
         'SELECT user_id, metric, "timestamp", value FROM stage ON CONFLICT DO NOTHING')


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bench_polars.py DATA_DIR", file=sys.stderr)
        return 2
    started = time.monotonic()
    env = os.environ
    uri = (f"postgresql://{quote(env.get('POSTGRES_USER', 'postgres'))}:{quote(env.get('POSTGRES_PASSWORD', ''))}"
           f"@{env.get('POSTGRES_HOST', 'localhost')}:{env.get('POSTGRES_PORT', '5432')}"
           f"/{quote(env.get('POSTGRES_DB', 'postgres'))}?application_name=bench-polars")
    inserted = read = 0
    with adbc.connect(uri) as conn, conn.cursor() as cur:
        for path in sorted(Path(argv[0]).rglob("*.json")):
            frame = (pl.read_json(path)
                     .select(pl.col("user_id").cast(pl.String), pl.col("metric").cast(pl.String),
                             pl.col("timestamp").str.to_datetime(time_zone="UTC"), pl.col("value").cast(pl.Float64))
                     .unique(subset=KEY, keep="first", maintain_order=True))
            read += frame.height
            cur.adbc_ingest("stage", frame.to_arrow(), mode="replace", temporary=True)
            cur.execute(MERGE)
            inserted += max(cur.rowcount, 0)
            conn.commit()
    print(json.dumps({"polars": pl.__version__, "rows_inserted": inserted, "distinct_in_files": read,
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
