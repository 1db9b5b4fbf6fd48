#!/usr/bin/env python3
"""DuckDB as a benchmark peer of ingest.py (benchmark-only: DuckDB is not a dependency of the project).

    bench_duckdb.py DATA_DIR      (connection from POSTGRES_HOST/PORT/DB/USER/PASSWORD)

One SQL statement: DuckDB's read_json over DATA_DIR/**/*.json (JSON arrays, explicit columns
user_id VARCHAR, metric VARCHAR, timestamp TIMESTAMPTZ, value DOUBLE; naive timestamps read as
UTC), first occurrence of each (user_id, metric, timestamp) kept (row_number() over file name,
then position in the scan: read_json has no file_row_number, WITH ORDINALITY stands in), then
INSERT OR IGNORE into raw_data of the PostgreSQL database ATTACHed with the postgres extension
(which turns it into ON CONFLICT DO NOTHING). Validates nothing: a record that does not fit the
columns fails the whole run, nothing is written to a reject file, no manifest, no per-file commit.

The postgres extension is loaded from the PyPI wheel duckdb-ext-postgres (its extension directory
is laid out like DuckDB's own), never downloaded: autoinstall/autoload are off. scripts/bench.py
installs the pinned versions into a virtualenv of its own. Prints one JSON line at the end.
"""
from __future__ import annotations

import importlib.util
import json
import os
import sys
import time
from pathlib import Path

import duckdb

LOAD_SQL = """
INSERT OR IGNORE INTO pg.public.raw_data (user_id, metric, "timestamp", value)
SELECT user_id, metric, "timestamp", value
FROM read_json(?, format = 'array', filename = true, columns = {
         user_id: 'VARCHAR', metric: 'VARCHAR', "timestamp": 'TIMESTAMPTZ', value: 'DOUBLE'})
     WITH ORDINALITY
QUALIFY row_number() OVER (PARTITION BY user_id, metric, "timestamp" ORDER BY filename, ordinality) = 1
"""


def _libpq_quote(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: bench_duckdb.py DATA_DIR", file=sys.stderr)
        return 2
    started = time.monotonic()
    data_dir = Path(argv[0]).resolve()
    ext_dir = Path(next(iter(importlib.util.find_spec("duckdb_ext").submodule_search_locations))) / "extensions"
    env = os.environ
    dsn = " ".join(f"{k}={_libpq_quote(v)}" for k, v in (
        ("host", env.get("POSTGRES_HOST", "localhost")), ("port", env.get("POSTGRES_PORT", "5432")),
        ("dbname", env.get("POSTGRES_DB", "postgres")), ("user", env.get("POSTGRES_USER", "postgres")),
        ("application_name", "bench-duckdb")))
    if "POSTGRES_PASSWORD" in env:  # via the environment: libpq's errors echo the connection string
        os.environ["PGPASSWORD"] = env["POSTGRES_PASSWORD"]
    con = duckdb.connect()  # in-memory
    con.execute("SET autoinstall_known_extensions = false")
    con.execute("SET autoload_known_extensions = false")
    con.execute("SET TimeZone = 'UTC'")  # naive timestamps -> UTC, like ingest.py's default
    con.execute(f"SET extension_directory = '{str(ext_dir).replace(chr(39), chr(39) * 2)}'")
    con.execute("LOAD postgres")
    con.execute(f"ATTACH '{dsn.replace(chr(39), chr(39) * 2)}' AS pg (TYPE postgres)")
    inserted = con.execute(LOAD_SQL, [str(data_dir / "**" / "*.json")]).fetchone()[0]
    con.close()
    print(json.dumps({"duckdb": duckdb.__version__, "rows_inserted": inserted,
                      "seconds": round(time.monotonic() - started, 3)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
