#!/usr/bin/env python3
"""The bulk path's dedupe with a key tuple per record (as shipped) against one without.

    .venv/bin/python scripts/profile_dedupe.py bench-data/full/a/json/heart_rate.json

Reads the first 60 MB of a Task-0-shaped file (records repeating the keys of its first 86,400),
remembers the first 86,400 keys, then settles the rest in windows of 4,000 records, both ways, five
times each, and prints the median nanoseconds per record:

- **as shipped**: `_LineMaker.repeats` builds a (user, metric, UTC time) tuple per record, looked up
  in one dict of first values;
- **without**: one dict per (user, metric), looked up by the UTC text from the timestamp cache
  (the same string object each time), so no object is made per record. Windows of one user and
  one metric only (Task-0's shape); what the loader does with any other window is not modelled.

No database. A measurement, not a second implementation: nothing here is used by ingest.py.
"""
from __future__ import annotations

import operator
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import ingest


def main() -> int:
    text = Path(sys.argv[1]).read_text(encoding="utf-8")[:60_000_000]
    records = ingest._typed().decode_list("[" + text[text.index("{") : text.rfind("},") + 1] + "]")
    make_line = ingest._LineMaker(ingest.UTC)
    flat: dict = {}
    nested: dict = {}
    for record in records[:86_400]:
        key, tail, _ = make_line(record)
        flat.setdefault(key, tail)
        nested.setdefault(key[:2], {}).setdefault(key[2], tail)
    utc_of = {ts: stamp[0] for ts, stamp in make_line.stamps.items()}
    windows = [records[i : i + 4000] for i in range(86_400, len(records) - 4000, 4000)]

    def with_tuples(window: list) -> int:
        keys, tails = make_line.repeats(window)
        return sum(map(operator.ne, map(flat.get, keys), tails))

    def without(window: list) -> int:
        users, metrics = list(map(ingest._USER_OF, window)), list(map(ingest._METRIC_OF, window))
        user, metric = users[0], metrics[0]
        assert users.count(user) == len(users) and metrics.count(metric) == len(metrics)
        low, high = ingest.METRIC_BOUNDS[metric]
        values = list(map(ingest._VALUE_OF, window))
        assert low <= min(values) and max(values) <= high
        tails = list(map(make_line.values.get, values))
        utcs = list(map(utc_of.get, map(ingest._TIMESTAMP_OF, window)))
        assert None not in tails and None not in utcs
        firsts = list(map(nested[(make_line.users[user], metric)].get, utcs))
        assert None not in firsts
        return sum(map(operator.ne, firsts, tails))

    count = sum(map(len, windows))
    seconds: dict[str, list[float]] = {"as shipped": [], "without": []}
    for _ in range(5):
        for name, settle in (("as shipped", with_tuples), ("without", without)):
            started = time.perf_counter()
            differ = sum(map(settle, windows))
            seconds[name].append(time.perf_counter() - started)
    for name, runs in seconds.items():
        print(f"{name:10} {statistics.median(runs) / count * 1e9:4.0f} ns a record "
              f"({count:,} records, {differ:,} conflicting)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
