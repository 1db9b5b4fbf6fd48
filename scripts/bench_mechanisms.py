#!/usr/bin/env python3
"""Does each speed mechanism of ingest.py pay? Each data set loaded with it and without it.

    eval "$(bash scripts/dev-db.sh env)" && .venv/bin/python scripts/bench_mechanisms.py [--rounds 3]
        [--only task0,b,takeout]

For each data set (Task-0's real output, the synthetic unique-key set b of bench.py, the one-year
Takeout export of bench_fitbit.py), every round loads it once with everything on and once with
each mechanism that applies to it switched off (scripts/ingest_without.py), each into a fresh
database, in an order that alternates from round to round. The table gives the median seconds
of each, and what switching the mechanism off costs: (median without / median with) - 1. A
mechanism pays on a data set when that is at least +10 %. Written to
<scratch>/mechanisms.md and .json (default ./bench-data), and printed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench
import make_task0
from make_fitbit_export import make_takeout

WRAPPER = bench.ROOT / "scripts" / "ingest_without.py"
# data set -> the mechanisms that act on it (the others would measure nothing)
APPLIES = {
    "task0": ("read-ahead", "far-half", "hash-ahead", "bulk-settle", "decoder-windows"),
    "b": ("read-ahead", "bulk-settle", "decoder-windows"),
    "takeout": ("read-ahead", "takeout-bulk", "bulk-settle", "decoder-windows"),
}


def data_dirs(scratch: Path, wanted: list[str]) -> dict[str, tuple[Path, list[str]]]:
    """data set -> (its directory, extra loader flags); generated when missing."""
    out = {}
    if "task0" in wanted:
        make_task0.make(scratch / "task0" / "json", scratch / "venv-task0")
        out["task0"] = (scratch / "task0" / "json", [])
    if "b" in wanted:
        ds = next(d for d in bench.datasets(False) if d.name == "b")
        bench.generate(ds, scratch / "full" / "b")
        out["b"] = (scratch / "full" / "b" / "json", [])
    if "takeout" in wanted:
        export = scratch / "fitbit" / "takeout-365d"
        if not export.exists():
            make_takeout(export, "old", days=365, user="alice", seed=11)  # as bench_fitbit.py makes it
        out["takeout"] = (export, ["--user-id", "bench"])
    return out


def load(dbs: bench.Databases, mechanism: str, data: Path, flags: list[str], tag: str, scratch: Path) -> float:
    db = dbs.create(f"mech_{tag}")
    try:
        env = {**bench.child_env(db), "PYTHONPATH": str(bench.INGEST.parent)}
        cmd = [sys.executable, str(WRAPPER), mechanism, "--data-dir", str(data), "-q", *flags,
               "--reject-file", str(scratch / "work" / f"{tag}.rejects.jsonl")]
        p = bench.run_timed(cmd, env, scratch / "logs", tag, scratch / "work")
        if p.code not in (0, 1):
            raise SystemExit(f"bench_mechanisms: {tag}: exit {p.code}, see {p.stderr_path}")
        return p.seconds
    finally:
        dbs.drop(db)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--only", default=",".join(APPLIES))
    p.add_argument("--scratch", type=Path, default=bench.ROOT / "bench-data")
    a = p.parse_args(argv)
    scratch = a.scratch.resolve()
    (scratch / "work").mkdir(parents=True, exist_ok=True)
    bench.snapshot_loader(scratch)
    sets = data_dirs(scratch, [s.strip() for s in a.only.split(",") if s.strip()])
    seconds: dict[tuple[str, str], list[float]] = {}
    dbs = bench.Databases(keep=False)
    started = time.monotonic()
    try:
        for round_ in range(a.rounds):
            for name, (data, flags) in sets.items():
                order = ["none", *APPLIES[name]]
                if round_ % 2:
                    order.reverse()
                for mechanism in order:
                    s = load(dbs, mechanism, data, flags, f"{name}-{mechanism}-r{round_}", scratch)
                    seconds.setdefault((name, mechanism), []).append(s)
                    print(f"  {name:8} {mechanism:16} round {round_ + 1}: {s:.2f} s", flush=True)
    finally:
        dbs.close()
    lines = ["# What each speed mechanism is worth (bench_mechanisms.py)", "",
             (f"- {dt.datetime.now(dt.UTC):%Y-%m-%d %H:%M} UTC, loader {bench._sha(bench.INGEST)}; {a.rounds} rounds, "
              f"alternated; medians of first loads into fresh databases; {time.monotonic() - started:.0f} s in all."),
             "- cost of switching it off = median without / median with - 1; it pays where that is >= +10 %.", "",
             "| data set | mechanism | median with, s | median without, s | cost of switching it off | pays? | runs without |",
             "|---|---|--:|--:|--:|---|---|"]
    results = []
    for name in sets:
        with_ = statistics.median(seconds[name, "none"])
        for mechanism in APPLIES[name]:
            without = statistics.median(seconds[name, mechanism])
            cost = without / with_ - 1
            results.append({"dataset": name, "mechanism": mechanism, "with": seconds[name, "none"],
                            "without": seconds[name, mechanism], "cost": round(cost, 3)})
            lines.append(f"| {name} | {mechanism} | {with_:.2f} | {without:.2f} | {cost:+.0%} | "
                         f"{'yes' if cost >= 0.10 else 'no'} | {', '.join(f'{s:.2f}' for s in seconds[name, mechanism])} |")
    md = "\n".join(lines) + "\n"
    (scratch / "mechanisms.md").write_text(md)
    (scratch / "mechanisms.json").write_text(json.dumps(results, indent=1) + "\n")
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
