#!/usr/bin/env python3
"""How the loader's time grows with the number of records, for each way valid JSON can be written.

    eval "$(bash scripts/dev-db.sh env)" && .venv/bin/python scripts/bench_shapes.py [--records N] [--rounds R]

The same records (one user, activity, one a second, unique keys) are written in many spellings of
valid JSON, at N and 4N records (default N = 100,000). Each file is loaded by `python -m ingest`
into a fresh database; a spelling's time is the best of R rounds (default 2). For each spelling
the table gives the time at N and at 4N, the growth (4N time / N time: 4 is linear, the target is
at most 5) and the 4N time relative to the plainest spelling's (the target is at most 3). Written
to <scratch>/shapes.md and shapes.json (default ./bench-data), and printed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench

START = dt.datetime(2024, 1, 1)
GROWTH_LIMIT, RELATIVE_LIMIT = 5.0, 3.0


def _ts(i: int) -> str:
    return (START + dt.timedelta(seconds=i)).isoformat()


def _rec(i: int, value: str, ts: str | None = None, user: str = '"u1"', extra: str = "") -> str:
    return (f'{{"user_id": {user}, "metric": "activity", "timestamp": "{ts or _ts(i)}", '
            f'"value": {value}{extra}}}')


def _plain_value(i: int) -> str:
    return f"{i % 170 + 1}.5"


# spelling -> one record's text (pretty arrays are made of these), or a whole writer for JSON Lines
SHAPES: dict[str, Callable[[int], str]] = {
    "plain (pretty array, 61.5)": lambda i: _rec(i, _plain_value(i)),
    "integers (61)": lambda i: _rec(i, str(i % 170 + 1)),
    "zeros as 0": lambda i: _rec(i, "0"),
    "zeros as 0.0": lambda i: _rec(i, "0.0"),
    "zeros as -0.0": lambda i: _rec(i, "-0.0"),
    "exponents (6.1e1)": lambda i: _rec(i, f"{(i % 170 + 1) / 10}e1"),
    "trailing zeros (61.500)": lambda i: _rec(i, f"{_plain_value(i)}00"),
    "keys in another order": lambda i: (f'{{"value": {_plain_value(i)}, "timestamp": "{_ts(i)}", '
                                        f'"metric": "activity", "user_id": "u1"}}'),
    "an extra field": lambda i: _rec(i, _plain_value(i), extra=', "unit": "steps"'),
    "\\u escapes in strings": lambda i: _rec(i, _plain_value(i), user='"\\u0075\\u0031"'),
    "timestamps with Z": lambda i: _rec(i, _plain_value(i), ts=_ts(i) + "Z"),
    "timestamps with an offset": lambda i: _rec(i, _plain_value(i), ts=(START + dt.timedelta(seconds=i, hours=1))
                                                .isoformat() + "+01:00"),
    "fractional seconds": lambda i: _rec(i, _plain_value(i), ts=_ts(i) + ".250"),
    "1 % rejects": lambda i: _rec(i, '"n/a"' if i % 100 == 7 else _plain_value(i)),
    "every key twice (repeats)": lambda i: _rec(i // 2, _plain_value(i // 2)),
}
LAYOUTS = {"CRLF and tab white space": "crlf", "JSON Lines": "jsonl"}


def write(path: Path, n: int, spelling: str) -> None:
    if spelling in LAYOUTS:
        layout = LAYOUTS[spelling]
        texts = [SHAPES["plain (pretty array, 61.5)"](i) for i in range(n)]
        if layout == "jsonl":
            path = path.with_suffix(".jsonl")
            path.write_text("\n".join(texts) + "\n")
        else:
            path.write_bytes(("[\r\n\t" + ",\r\n\t".join(t.replace(", ", ",\t") for t in texts) + "\r\n]\r\n").encode())
        return
    make = SHAPES[spelling]
    path.write_text("[\n  " + ",\n  ".join(make(i) for i in range(n)) + "\n]\n")


def load_seconds(dbs: bench.Databases, data: Path, log_dir: Path, tag: str, work: Path) -> tuple[float, int]:
    db = dbs.create(f"shape_{tag}")
    try:
        env = {**bench.child_env(db), "PYTHONPATH": str(bench.INGEST.parent)}
        p = bench.run_timed([sys.executable, "-m", "ingest", "--data-dir", str(data), "-q",
                             "--reject-file", str(work / f"{tag}.rejects.jsonl")], env, log_dir, tag, work)
        if p.code not in (0, 1):  # 1: the rejects of the reject spelling
            raise SystemExit(f"bench_shapes: {tag}: exit {p.code}, see {p.stderr_path}")
        return p.seconds, dbs.count(db)
    finally:
        dbs.drop(db)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--records", type=int, default=100_000)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--scratch", type=Path, default=bench.ROOT / "bench-data")
    a = p.parse_args(argv)
    scratch = a.scratch.resolve()
    bench.snapshot_loader(scratch)
    # (the files are made again whenever this script changes)
    root, work, logs = scratch / "shapes" / bench._sha(Path(__file__)), scratch / "work", scratch / "logs"
    work.mkdir(parents=True, exist_ok=True)
    spellings = [*SHAPES, *LAYOUTS]
    sizes = (a.records, 4 * a.records)
    for spelling in spellings:
        for n in sizes:
            folder = root / f"{spellings.index(spelling):02d}-{n}"
            if not folder.exists():
                folder.mkdir(parents=True)
                write(folder / "a.json", n, spelling)
    dbs = bench.Databases(keep=False)
    seconds: dict[tuple[str, int], list[float]] = {}
    rows: dict[tuple[str, int], int] = {}
    started = time.monotonic()
    try:
        for round_ in range(a.rounds):  # rounds alternate over every spelling: drift hits all alike
            for spelling in spellings:
                for n in sizes:
                    tag = f"shape{spellings.index(spelling):02d}-{n}-r{round_}"
                    s, count = load_seconds(dbs, root / f"{spellings.index(spelling):02d}-{n}", logs, tag, work)
                    seconds.setdefault((spelling, n), []).append(s)
                    rows[spelling, n] = count
    finally:
        dbs.close()
    best = {k: min(v) for k, v in seconds.items()}
    plain = best[spellings[0], sizes[1]]
    lines = ["# Time by JSON spelling (bench_shapes.py)", "",
             (f"- {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC; N = {a.records:,} records; best of {a.rounds} "
              f"rounds, each spelling's file loaded by `python -m ingest` into a fresh database; "
              f"{time.monotonic() - started:.0f} s in all."), "",
             (f"| spelling | rows at 4N | s at N | s at 4N | growth (≤ {GROWTH_LIMIT:g}) | vs plainest at 4N "
              f"(≤ {RELATIVE_LIMIT:g}) | |"), "|---|--:|--:|--:|--:|--:|---|"]
    results = []
    for spelling in spellings:
        small, large = best[spelling, sizes[0]], best[spelling, sizes[1]]
        growth, relative = large / small, large / plain
        ok = growth <= GROWTH_LIMIT and relative <= RELATIVE_LIMIT
        results.append({"spelling": spelling, "seconds": {str(n): seconds[spelling, n] for n in sizes},
                        "rows": rows[spelling, sizes[1]], "growth": round(growth, 2), "relative": round(relative, 2)})
        lines.append(f"| {spelling} | {rows[spelling, sizes[1]]:,} | {small:.2f} | {large:.2f} | {growth:.2f} "
                     f"| {relative:.2f} | {'met' if ok else '**not met**'} |")
    lines.append(f"\nMedian growth {statistics.median(r['growth'] for r in results):.2f}; "
                 f"slowest relative {max(r['relative'] for r in results):.2f}.")
    md = "\n".join(lines) + "\n"
    (scratch / "shapes.md").write_text(md)
    (scratch / "shapes.json").write_text(json.dumps({"records": a.records, "results": results}, indent=1) + "\n")
    print(md)
    return 0 if all(r["growth"] <= GROWTH_LIMIT and r["relative"] <= RELATIVE_LIMIT for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
