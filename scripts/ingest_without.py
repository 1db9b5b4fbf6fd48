#!/usr/bin/env python3
"""Run ingest.py with one of its speed mechanisms switched off (benchmark-only).

    python scripts/ingest_without.py MECHANISM [ingest.py arguments]

MECHANISM is "none" (everything on, run through this same wrapper so both sides pay the same
start-up) or one of SWITCHES below. Each switch replaces the mechanism with what the loader does
without it, so the rows, counts and rejects are the same; only the time may differ. Used by
scripts/bench_mechanisms.py; `ingest` is imported from PYTHONPATH (the bench's snapshot).
"""
from __future__ import annotations

import gc
import sys

import ingest


def _no_read_ahead() -> None:
    ingest._Loader._start_read_ahead = lambda self, df: setattr(self, "ahead_files", None)


def _no_far_half() -> None:
    ingest.RecordStream.settle_far_half = lambda self, settle, example: None


def _no_hash_ahead() -> None:
    ingest._HashingReader.hash_ahead = lambda self, ready: None


def _no_bulk_settle() -> None:  # windows of repeats and of new keys go record by record
    ingest._FileRows._repeats_of_sent = lambda self, records: None
    ingest._FileRows._new_keys = lambda self, records, chunks: None


def _no_takeout_bulk() -> None:  # Takeout arrays mapped item by item, as read_fitbit does
    ingest._fb_takeout_shapes = dict  # (called with no arguments: an empty table)


def _no_decoder_windows() -> None:  # every array item decoded alone, by the careful decoder
    ingest._Buffer.decode_batch = lambda self, decode, exact, errors: None


SWITCHES = {
    "read-ahead": _no_read_ahead,
    "far-half": _no_far_half,
    "hash-ahead": _no_hash_ahead,
    "bulk-settle": _no_bulk_settle,
    "takeout-bulk": _no_takeout_bulk,
    "decoder-windows": _no_decoder_windows,
}


def main(argv: list[str]) -> int:
    if not argv or (argv[0] != "none" and argv[0] not in SWITCHES):
        print(f"usage: ingest_without.py none|{'|'.join(SWITCHES)} [ingest.py arguments]", file=sys.stderr)
        return 2
    if argv[0] != "none":
        SWITCHES[argv[0]]()
    code = ingest.main(argv[1:])
    gc.freeze()  # as ingest.py's own __main__ ends
    return code


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
