#!/usr/bin/env python3
"""Write deterministic synthetic Task-0-like Fitbit data: one JSON file per metric.

The layout copies what Task-0 writes: ``<out>/<metric>.json``, each a pretty-printed JSON array
of ``{"user_id", "metric", "timestamp", "value"}`` records (``--layout per-user`` puts them under
``<out>/<user>/`` instead). ``--repeat N`` reproduces Task-0's habit of stamping N days of heart
rate onto one day: the heart-rate file then holds N records for every key, with different values.

Used by ``make run`` (a small sample), the tests and the benchmark. The same arguments always
produce the same bytes.
"""
from __future__ import annotations

import argparse
import datetime as dt
import gzip
import random
from collections.abc import Iterator
from pathlib import Path

# metric -> (seconds between readings, low, high, integer values?)
METRICS = {
    "heart_rate": (1, 55, 150, True),
    "spo2": (60, 92.0, 100.0, False),
    "activity": (60, 0, 180, True),
    "hrv": (300, 15.0, 120.0, False),
    "breath_rate": (600, 10.0, 22.0, False),
    "active_zone_minute": (60, 0, 3, True),
}


def records(metric: str, users: int, start: dt.datetime, seconds: int, repeat: int = 1,
            seed: int = 0, interval: int | None = None) -> Iterator[tuple[str, str, str, object]]:
    """Yield (user_id, metric, timestamp, value) in file order."""
    step, low, high, integer = METRICS[metric]
    step = interval or step
    rng = random.Random(f"{seed}:{metric}")
    for copy in range(repeat):
        for user in range(1, users + 1):
            uid = f"user_{user}"
            for offset in range(0, seconds, step):
                ts = (start + dt.timedelta(seconds=offset)).strftime("%Y-%m-%dT%H:%M:%S")
                if integer:
                    value: object = rng.randint(low, high)
                else:
                    value = round(rng.uniform(low, high), 1)
                yield uid, metric, ts, value


def write(path: Path, rows: Iterator[tuple[str, str, str, object]], fmt: str = "json",
          pretty: bool = True) -> int:
    """Write rows as a pretty-printed JSON array (Task-0's format), compact array or JSON Lines."""
    path.parent.mkdir(parents=True, exist_ok=True)
    opener = gzip.open if path.suffix == ".gz" else open
    count = 0
    with opener(path, "wt", encoding="utf-8") as out:
        if fmt == "jsonl":
            for uid, metric, ts, value in rows:
                out.write(f'{{"user_id": "{uid}", "metric": "{metric}", "timestamp": "{ts}", "value": {value}}}\n')
                count += 1
            return count
        out.write("[")
        sep = "\n" if pretty else ""
        for uid, metric, ts, value in rows:
            if pretty:
                item = (f'  {{\n    "user_id": "{uid}",\n    "metric": "{metric}",\n'
                        f'    "timestamp": "{ts}",\n    "value": {value}\n  }}')
            else:
                item = f'{{"user_id":"{uid}","metric":"{metric}","timestamp":"{ts}","value":{value}}}'
            out.write(("," if count else "") + sep + item)
            count += 1
        out.write(sep + "]" + ("\n" if pretty else ""))
    return count


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory to write into")
    p.add_argument("--users", type=int, default=1)
    p.add_argument("--seconds", type=int, default=3600, help="time span covered, in seconds")
    p.add_argument("--start", default="2024-01-01T00:00:00")
    p.add_argument("--repeat", type=int, default=1, help="copies of the heart-rate series (Task-0 bug)")
    p.add_argument("--metrics", default=",".join(METRICS))
    p.add_argument("--layout", choices=["task0", "per-user"], default="task0")
    p.add_argument("--format", choices=["json", "jsonl"], default="json")
    p.add_argument("--compact", action="store_true", help="no pretty-printing")
    p.add_argument("--gzip", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    start = dt.datetime.fromisoformat(a.start)
    suffix = (".jsonl" if a.format == "jsonl" else ".json") + (".gz" if a.gzip else "")
    total = 0
    for metric in a.metrics.split(","):
        repeat = a.repeat if metric == "heart_rate" else 1
        if a.layout == "task0":
            rows = records(metric, a.users, start, a.seconds, repeat, a.seed)
            total += write(a.out / f"{metric}{suffix}", rows, a.format, not a.compact)
            continue
        for user in range(1, a.users + 1):
            rows = ((f"user_{user}", m, ts, v) for _, m, ts, v in
                    records(metric, 1, start, a.seconds, repeat, a.seed + user))
            total += write(a.out / f"user_{user}" / f"{metric}{suffix}", rows, a.format, not a.compact)
    print(f"wrote {total} records to {a.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
