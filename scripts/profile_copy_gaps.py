#!/usr/bin/env python3
"""When the server waits for the loader: the gaps around each file's COPY in one load.

    eval "$(scripts/dev-db.sh env)"
    .venv/bin/python scripts/profile_copy_gaps.py DATA_DIR [--ingest PATH]

Loads DATA_DIR with ingest.py (or --ingest PATH, e.g. an older version in a git worktree) into a
fresh database on the dev server, in this process, with its COPY source wrapped to time three
gaps, summed over the run's COPYs:

  head      from a COPY's start to its first batch: the server has nothing to do yet
            (the file opened, its first window decoded, its first batch of lines made)
  drain     from the last batch handed to COPY to COPY's end: the server works through what it
            was sent while this process has nothing left to make for the file
  between   from one COPY's end to the next one's start: the file's manifest row and commit, the
            next file's claim and savepoints (round trips) and the Python around them

head + between is time in which the one backend of a single loader is idle, apart from the
short statements of between. The limit (one COPY of every row) has neither. Measurement only:
the wrapping adds two clock reads per batch.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench


def instrument(ingest) -> dict[str, float]:
    """Wrap ingest._CopySource so that each COPY's gaps are added to the returned dict."""
    gaps = {"head": 0.0, "drain": 0.0, "between": 0.0, "copies": 0}
    now: dict[str, float] = {}  # the COPY in flight: start, first batch, last batch; the last end
    read, copy = ingest._CopySource.read, ingest._CopySource.copy

    def timed_read(self, size=-1):
        text = read(self, size)
        t = time.perf_counter()
        if text and "first" not in now:
            now["first"] = t
            gaps["head"] += t - now["start"]
        if not text and "last" not in now:
            now["last"] = t
        return text

    def timed_copy(self, cur, sql, **kw):
        t = time.perf_counter()
        if "end" in now:
            gaps["between"] += t - now["end"]
        now.clear()
        now["start"] = t
        try:
            return copy(self, cur, sql, **kw)
        finally:
            end = time.perf_counter()
            gaps["copies"] += 1
            if "last" in now:
                gaps["drain"] += end - now["last"]
            now["end"] = end

    ingest._CopySource.read, ingest._CopySource.copy = timed_read, timed_copy
    return gaps


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--ingest", type=Path, default=ROOT / "ingest.py", help="the loader to measure")
    args = p.parse_args()
    spec = importlib.util.spec_from_file_location("ingest", args.ingest.resolve())
    ingest = importlib.util.module_from_spec(spec)
    sys.modules["ingest"] = ingest
    spec.loader.exec_module(ingest)
    gaps = instrument(ingest)
    dbs = bench.Databases(keep=False)
    db = dbs.create("gaps")
    rejects = Path(tempfile.gettempdir()) / f"profile-copy-gaps-{uuid.uuid4().hex}.jsonl"
    argv = ["--data-dir", str(args.data_dir), "--reject-file", str(rejects), "--log-level", "WARNING"]
    env = bench.child_env(db)  # (this process's own) the database made above, no loader settings
    os.environ.clear()
    os.environ.update(env)
    try:
        started = time.perf_counter()
        code = ingest.main(argv)
        wall = time.perf_counter() - started
    finally:
        rejects.unlink(missing_ok=True)
        dbs.drop(db)
        dbs.close()
    print(f"{args.ingest}: exit {code}, wall {wall:.2f} s, {gaps['copies']} COPYs: head {gaps['head']:.2f} s, "
          f"drain {gaps['drain']:.2f} s, between {gaps['between']:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
