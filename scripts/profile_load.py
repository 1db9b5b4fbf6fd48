#!/usr/bin/env python3
"""Where the time of one load goes: parse, validate, dedupe, send, server.

    .venv/bin/python scripts/profile_load.py [--ingest PATH] [--runs 1] DATA_DIR

Loads DATA_DIR into a fresh database on the dev server (settings from the environment, as
`eval "$(scripts/dev-db.sh env)"` sets them) with `ingest.py` (or --ingest PATH, e.g. an older
version in a git worktree) running under py-spy, which samples every thread 250 times a second,
idle ones included. Each sample is put in one stage by the innermost ingest.py function on its
stack (names of both the current and the older code are known; see STAGES):

  read      bytes from disk, hashed (sha256) and decoded to text
  parse     JSON to Python values, the exactness check, the careful decoder
  validate  the record's fields (_LineMaker, validate_record)
  dedupe    the per-file loop: the key seen before?, counts, parts
  send      batches joined and handed to COPY; COPY's own wait for the server's answers
  waiting   blocked on the other thread (the producer's queue), not working
  other     start-up (imports, connect, schema, manifest), commit, everything else

The server's share is the CPU time PostgreSQL's processes used during the run (read from /proc:
the postmaster's own and its reaped children's, plus its live children's), so it is measured,
not sampled. py-spy is installed once into <scratch>/venv-profile (benchmark-only, pinned).
Prints a Markdown table, a row per loading thread (main: COPY; copy-producer: everything from
the bytes to the COPY lines; the helper process that settles the far half of a large file, if
one was forked): seconds of wall time in each stage ("waiting" in the copy-producer includes
waiting for the helper's report).
"""
from __future__ import annotations

import argparse
import collections
import os
import re
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench  # the bench's connection settings and pinned virtualenvs

PY_SPY_PIN = "py-spy==0.4.3"
RATE = 250
# Innermost ingest.py function -> stage, by exact name (this version's and 1f556d7's).
STAGES = {
    "read": "_HashingReader.readinto _Buffer.fill _open_text Digest.hexdigest _file_sha256 RecordStream.__iter__ "
            "RecordStream.batches _HashingReader.skip_to _HashingReader._hash RecordStream._far_half_settled "
            "_HashingReader.hash_ahead _utf8_chars _FarHalf.reported",
    "parse": "_Buffer.decode_batch _Buffer.decode_one _Buffer.skip_ws _Buffer.array_ends _Buffer.decode "
             "_decode_batch _iter_json_document _iter_array_items _iter_json_lines RecordStream._document "
             "RecordStream._array_items RecordStream._lines _decode_line _BatchText.item _fast_is_exact "
             "_settle_far_half _record_start "
             "_careful_float _careful_int _careful_object _deep_nesting_at DataFile.records",
    "validate": "_LineMaker.__call__ _LineMaker._user _LineMaker._stamp _LineMaker._tail _LineMaker.repeats "
                "_LineMaker.tails _LineMaker.stamps_of "
                "validate_record _check_user_id _check_metric _check_timestamp _check_value _localize",
    "dedupe": "_valid_lines _FileRows.part _FileRows._repeats_of_sent _FileRows._note_conflict _FileStats.repeat "
              "_FileRows._remember _FileRows._new_keys _FileRows._first_table",
    "send": "_CopySource._produce _CopySource._next_batch _CopySource.read _CopySource.copy "
            "_CopySource.copy_into insert_records _insert_lines _Loader._insert",
}
STAGE_OF = {name: stage for stage, names in STAGES.items() for name in names.split()}


def ensure_py_spy(scratch: Path) -> str:
    venv = scratch / "venv-profile"
    why = bench.pinned_venv(venv, (PY_SPY_PIN,))
    if why is not None:
        sys.exit(f"profile: {why}")
    return str(venv / "bin" / "py-spy")


def server_cpu_seconds() -> float:
    """CPU seconds of every postgres process so far, exited backends included (the postmaster's
    cutime/cstime holds the children it reaped)."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        name = text[text.index("(") + 1 : text.rindex(")")]
        fields = text[text.rindex(")") + 2 :].split()
        if name.startswith(("postgres", "postmaster")):
            utime, stime, cutime, cstime = (int(f) for f in fields[11:15])
            total += (utime + stime + cutime + cstime) / ticks
    return total


def stage_of(stack: list[str]) -> str:
    if stack and stack[-1].startswith("_FarHalf.join "):
        return "waiting"  # for the helper's report
    if stack and re.search(r"\((threading|queue)\.py:", stack[-1]):
        return "waiting"  # for the other thread (a queue or a lock), not working
    for frame in reversed(stack):  # innermost first
        if "(ingest.py:" in frame and not frame.startswith("<"):  # (a comprehension: its function)
            return STAGE_OF.get(frame.split(" (", 1)[0], "other")
    return "other"


def profile(ingest: Path, data_dir: Path, py_spy: str) -> dict:
    admin = bench.connect()
    name = f"profile_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        env = {**os.environ, "POSTGRES_DB": name, "DATA_DIR": str(data_dir), "PYTHONDONTWRITEBYTECODE": "1"}
        env.pop("DATABASE_URL", None)
        with tempfile.TemporaryDirectory() as tmp:
            raw = Path(tmp) / "raw.txt"
            env["REJECT_FILE"] = str(Path(tmp) / "rejects.jsonl")
            cpu0, t0 = server_cpu_seconds(), time.monotonic()
            subprocess.run([py_spy, "record", "--threads", "--idle", "--subprocesses", "--rate", str(RATE),
                            "--format", "raw",
                            "--output", str(raw), "--", sys.executable, str(ingest), "-q"],
                           env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wall, server = time.monotonic() - t0, server_cpu_seconds() - cpu0
            threads: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
            for line in raw.read_text().splitlines():
                stack, _, count = line.rpartition(" ")
                # "process PID:cmd" (twice for the helper: its parent, then itself), "thread (tid): name",
                # then the outermost frame first
                frames = stack.split(";")
                processes = 0
                while frames and frames[0].startswith("process "):
                    frames, processes = frames[1:], processes + 1
                if not frames:
                    continue
                thread = "helper process" if processes > 1 else frames[0].split(": ", 1)[-1]
                threads[thread][stage_of(frames[1:])] += int(count)
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}"')
        admin.close()
    return {"wall": wall, "server": server, "threads": threads}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", type=Path)
    p.add_argument("--ingest", type=Path, default=ROOT / "ingest.py")
    p.add_argument("--scratch", type=Path, default=ROOT / "bench-data")
    args = p.parse_args()
    py_spy = ensure_py_spy(args.scratch)
    got = profile(args.ingest.resolve(), args.data_dir.resolve(), py_spy)
    stages = [*STAGES, "waiting", "other"]
    print(f"{args.ingest}: wall {got['wall']:.2f} s (under py-spy), server CPU {got['server']:.2f} s\n")
    print("| thread | " + " | ".join(stages) + " |")
    print("|---|" + "--:|" * len(stages))
    others = []
    for thread, counts in sorted(got["threads"].items()):
        if thread in ("MainThread", "copy-producer", "helper process"):
            print(f"| {thread} | " + " | ".join(f"{counts[s] / RATE:.2f}" for s in stages) + " |")
        else:  # the stop watchdog (asleep in select) and py-spy's view of start-up threads
            others.append(f"{thread} {sum(counts.values()) / RATE:.2f} s")
    if others:
        print(f"\nOther threads (not working on the load): {', '.join(others)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
