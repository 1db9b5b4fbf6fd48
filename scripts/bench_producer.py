#!/usr/bin/env python3
"""Does the COPY producer thread still pay? A first load with it (as shipped) and without it.

    eval "$(scripts/dev-db.sh env)"
    .venv/bin/python scripts/bench_producer.py bench-data/full/b/json 6

Without it, the batches are made inside read() by the thread that runs COPY (the same batching:
BATCH_SIZE lines joined), so parsing and sending take turns instead of overlapping. The two
alternate, each into a fresh database, in-process (ingest.main); prints the median wall and CPU
seconds of each. Measurement only: the thread is swapped out by patching ingest._CopySource.
"""
from __future__ import annotations

import itertools
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import connect, drop_database

import ingest


class _NoThread:
    def __init__(self, *args, **kwargs) -> None:
        pass

    def start(self) -> None:
        pass

    def is_alive(self) -> bool:
        return False

    def join(self) -> None:
        pass


class _Inline:
    """read()'s queue, each batch made when read() asks for it, in the thread that asks."""

    def __init__(self, lines, size: int) -> None:
        self.lines, self.size, self.done = iter(lines), size, False

    def get(self, timeout: float | None = None):
        batch = [] if self.done else list(itertools.islice(self.lines, self.size))
        if not batch:
            self.done = True
            return None
        return "".join(batch), len(batch)


THREADED = ingest._CopySource.__init__


def inline(self, lines, batch_size, keep, pulse, numbered=False) -> None:
    thread, ingest.threading.Thread = ingest.threading.Thread, _NoThread
    try:
        THREADED(self, lines, batch_size, keep, pulse, numbered)
    finally:
        ingest.threading.Thread = thread
    if numbered:
        raise SystemExit("bench_producer: a first load into an empty table never stages")
    self._queue = _Inline(lines, batch_size)


def main() -> int:
    data, rounds = str(Path(sys.argv[1]).resolve()), int(sys.argv[2])
    schema = (ROOT / "sql" / "schema.sql").read_text(encoding="utf-8")
    admin = connect()
    times: dict[str, list[tuple[float, float]]] = {"thread": [], "inline": []}
    for r in range(rounds):
        for mode in ("thread", "inline") if r % 2 == 0 else ("inline", "thread"):
            db = f"bench_producer_{mode}"
            drop_database(admin.cursor, db)
            with admin.cursor() as cur:
                cur.execute(f'CREATE DATABASE "{db}"')
            conn = connect(db)
            with conn.cursor() as cur:
                cur.execute(schema)
            conn.close()
            os.environ["POSTGRES_DB"] = db
            ingest._CopySource.__init__ = inline if mode == "inline" else THREADED
            wall, cpu = time.perf_counter(), time.process_time()
            code = ingest.main(["-q", "--data-dir", data, "--reject-file", os.devnull])
            times[mode].append((time.perf_counter() - wall, time.process_time() - cpu))
            drop_database(admin.cursor, db)
            if code != 0:
                raise SystemExit(f"bench_producer: ingest exited {code}")
    for mode, runs in times.items():
        print(f"{mode:6} wall median {statistics.median(w for w, _ in runs):.2f} s "
              f"{[round(w, 2) for w, _ in runs]}, loader CPU median {statistics.median(c for _, c in runs):.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
