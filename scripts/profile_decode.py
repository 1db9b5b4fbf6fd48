#!/usr/bin/env python3
"""Profile JSON decoders on Task-0-shaped data, cut into windows the way ingest.py decodes arrays.

    .venv/bin/python scripts/profile_decode.py [--mb 100] [--runs 5] [--out FILE.md]

Generates (once, cached under bench-data/profile/) one pretty-printed JSON array of heart-rate
records written like Task-0's ``json.dump(records, f, indent=2)`` (scripts/make_sample.py, 1 user,
--repeat 30: ~97 % of the records repeat a key), reads it as text in 1 MiB-character chunks and
cuts windows after the last "}," as ingest.py's _Buffer.decode_batch does, then times over all windows
(the file read is not timed; the median of --runs passes is reported):

  - decode only, per approach: stdlib json.loads, orjson.loads, msgspec.json.decode into
    list[Record] (a msgspec.Struct) and into list[Any], pysimdjson (recursive, or lazy proxies);
  - decode + for each record the dedupe key f"{user}\\t{metric}\\t{ts}" and a dict lookup
    (first occurrence kept, as ingest.py's _FileRows.part does);
  - for context: ingest.py's own reader (DataFile.records) and its per-file loop (_FileRows:
    _LineMaker and the dedupe), imported read-only from git HEAD;
  - whether a decoder releases the GIL: the windows decoded twice in a row vs by two threads
    at once (2 threads ~2x faster than sequential would mean it does);
  - how each library handles edge cases (huge integers, 1e309, 1e-400, a duplicate key, a lone
    surrogate escape, invalid UTF-8).

The optional libraries (orjson, msgspec, pysimdjson) are benchmark-only, not in requirements.txt:
    .venv/bin/pip install orjson==3.13.0 msgspec==0.23.0 pysimdjson==7.0.2
A missing one is reported and skipped. Prints a Markdown report (also written to --out).
"""
from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import make_sample

try:
    import orjson
except ImportError:
    orjson = None
try:
    import msgspec
except ImportError:
    msgspec = None
try:
    import simdjson
except ImportError:
    simdjson = None

CHUNK_CHARS = 1 << 20  # ingest.py READ_CHUNK_CHARS
RECORD_BYTES = 118.6  # bytes of one pretty-printed heart-rate record (measured on make_sample output)

if msgspec is not None:
    class Record(msgspec.Struct):
        user_id: str
        metric: str
        timestamp: str
        value: float


# ---------------------------------------------------------------------------------------------
# Data and windows
# ---------------------------------------------------------------------------------------------
def make_file(scratch: Path, mb: float, repeat: int) -> Path:
    seconds = max(1, round(mb * 1e6 / RECORD_BYTES / repeat))
    path = scratch / f"task0_heart_rate_{seconds}s_x{repeat}.json"
    if not path.exists():
        tmp = path.with_suffix(".tmp")
        rows = make_sample.records("heart_rate", 1, dt.datetime(2024, 1, 1), seconds, repeat)
        make_sample.write(tmp, rows, "json", pretty=True)
        tmp.rename(path)
    return path


def windows(path: Path) -> list[str]:
    """The file's array items as ingest.py's _Buffer.decode_batch cuts them: refill when under half a
    chunk is left, cut after the last "},", parse "[" + window + "]"."""
    out = []
    with open(path, encoding="utf-8") as fh:
        text = fh.read(CHUNK_CHARS)
        pos, eof = text.index("[") + 1, False
        while True:
            if len(text) - pos < CHUNK_CHARS // 2 and not eof:
                chunk = fh.read(CHUNK_CHARS)
                eof, text, pos = not chunk, text[pos:] + chunk, 0
            cut = text.rfind("},", pos)
            if cut < 0 or cut - pos < 4096:
                if eof:
                    break
                chunk = fh.read(CHUNK_CHARS)
                eof, text, pos = not chunk, text[pos:] + chunk, 0
                continue
            out.append(f"[{text[pos:cut + 1]}]")
            pos = cut + 2
        rest = text[pos:].rstrip()
        rest = rest.removesuffix("]")
        if rest.strip():
            out.append(f"[{rest}]")
    return out


# ---------------------------------------------------------------------------------------------
# Approaches
# ---------------------------------------------------------------------------------------------
def _dict_keys(items, seen: dict) -> None:
    for r in items:
        key = f"{r['user_id']}\t{r['metric']}\t{r['timestamp']}"
        if seen.get(key) is None:
            seen[key] = r["value"]


def _tuple_keys(items, seen: dict) -> None:
    for r in items:
        key = (r["user_id"], r["metric"], r["timestamp"])
        if seen.get(key) is None:
            seen[key] = r["value"]


def _struct_keys(items, seen: dict) -> None:
    for r in items:
        key = f"{r.user_id}\t{r.metric}\t{r.timestamp}"
        if seen.get(key) is None:
            seen[key] = r.value


def _no_gc(decode: Callable) -> Callable:
    def run(window):
        gc.disable()
        try:
            return decode(window)
        finally:
            gc.enable()
    return run


class Approach:
    def __init__(self, name: str, version: str, data: str, decode: Callable, keys: Callable | None = _dict_keys,
                 lazy: bool = False) -> None:
        self.name, self.version, self.data, self.decode, self.keys, self.lazy = name, version, data, decode, keys, lazy


def approaches() -> tuple[list[Approach], list[str]]:
    out = [Approach("json.loads (stdlib), str window [ingest.py before 2026-12-01]", platform.python_version(), "str",
                    json.loads),
           Approach("json.loads (stdlib), str window, tuple key", platform.python_version(), "str", json.loads,
                    _tuple_keys),
           Approach("json.loads (stdlib), str window, gc disabled while decoding", platform.python_version(), "str",
                    _no_gc(json.loads))]
    missing = []
    if orjson is not None:
        v = orjson.__version__
        out += [Approach("orjson.loads, str window", v, "str", orjson.loads),
                Approach("orjson.loads, bytes window", v, "bytes", orjson.loads)]
    else:
        missing.append("orjson")
    if msgspec is not None:
        v = msgspec.__version__
        typed = msgspec.json.Decoder(list[Record])
        untyped = msgspec.json.Decoder(list[Any])
        out += [Approach("msgspec.json.decode -> list[Record], str window [ingest.py now]", v, "str", typed.decode, _struct_keys),
                Approach("msgspec.json.decode -> list[Record], bytes window", v, "bytes", typed.decode, _struct_keys),
                Approach("msgspec.json.decode -> list[Any], bytes window", v, "bytes", untyped.decode)]
    else:
        missing.append("msgspec")
    if simdjson is not None:
        v = metadata.version("pysimdjson")
        parser = simdjson.Parser()
        out += [Approach("pysimdjson Parser.parse(recursive=True), bytes window", v, "bytes",
                         lambda b: parser.parse(b, True)),
                Approach("pysimdjson Parser.parse, lazy proxies, bytes window", v, "bytes", parser.parse, lazy=True)]
    else:
        missing.append("pysimdjson")
    return out, missing


def time_pass(a: Approach, wins: list, with_keys: bool) -> tuple[float, int]:
    seen: dict = {}
    records = 0
    decode, keys = a.decode, a.keys
    gc.collect()
    started = time.perf_counter()
    for w in wins:
        items = decode(w)
        records += len(items)
        if with_keys:
            keys(items, seen)
        del items  # a lazy simdjson document must be gone before the parser is reused
    return time.perf_counter() - started, records


def load_ingest(scratch: Path):
    """ingest.py as committed at git HEAD (the working tree may be mid-edit), imported from a copy."""
    head = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                          check=False).stdout.strip()
    src = subprocess.run(["git", "-C", str(ROOT), "show", "HEAD:ingest.py"], capture_output=True, text=True,
                         check=False)
    if src.returncode != 0:
        raise RuntimeError(f"git show HEAD:ingest.py failed: {src.stderr.strip()}")
    copy = scratch / "ingest_at_head.py"
    copy.write_text(src.stdout, encoding="utf-8")
    spec = importlib.util.spec_from_file_location("ingest_at_head", copy)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    for name in ("DataFile", "_FileRows", "_LineMaker", "_Rejects", "UTC"):
        if not hasattr(module, name):
            raise RuntimeError(f"ingest.py at {head} has no {name}")
    return module, head


def ingest_context(path: Path, runs: int, scratch: Path) -> dict:
    """ingest.py's own reader, and its reader + _LineMaker + dedupe loop (read-only import)."""
    try:
        ingest, head = load_ingest(scratch)
    except Exception as exc:  # noqa: BLE001 - context only
        return {"error": f"cannot import ingest.py: {exc}"}
    out: dict[str, list[float]] = {"reader": [], "reader+lines": []}
    df = ingest.DataFile(path, path.name, "json")
    for _ in range(runs):
        gc.collect()
        started = time.perf_counter()
        n = sum(1 for _ in df.records())
        out["reader"].append(time.perf_counter() - started)
        gc.collect()
        rejects = ingest._Rejects(scratch / "profile-rejects.jsonl", None)
        started = time.perf_counter()
        rows = ingest._FileRows(df, ingest._LineMaker(ingest.UTC), rejects, 86_400)
        while not rows.finished:
            for _ in rows.part():
                pass
        out["reader+lines"].append(time.perf_counter() - started)
        rows.close()
        rejects.close()
    return {k: statistics.median(v) for k, v in out.items()} | {"records": n, "head": head}


def gil_test(a: Approach, wins: list, runs: int) -> tuple[float, float]:
    """Median seconds: the windows decoded twice in one thread vs once in each of two threads."""
    if a.lazy:
        return float("nan"), float("nan")
    seq, par = [], []
    decoders = [a.decode, a.decode]
    if a.name.startswith("pysimdjson"):  # a parser is not shared between threads
        parsers = [simdjson.Parser(), simdjson.Parser()]
        decoders = [lambda b, p=p: p.parse(b, True) for p in parsers]

    def work(decode):
        for w in wins:
            decode(w)

    for _ in range(runs):
        gc.collect()
        started = time.perf_counter()
        work(decoders[0])
        work(decoders[0])
        seq.append(time.perf_counter() - started)
        gc.collect()
        threads = [threading.Thread(target=work, args=(d,)) for d in decoders]
        started = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        par.append(time.perf_counter() - started)
    return statistics.median(seq), statistics.median(par)


# ---------------------------------------------------------------------------------------------
# Edge cases
# ---------------------------------------------------------------------------------------------
def _rec(value: bytes, user: bytes = b'"u"') -> bytes:
    return b'[{"user_id":' + user + b',"metric":"heart_rate","timestamp":"2024-01-01T00:00:00","value":' + value + b"}]"


EDGE_CASES = {
    "5000-digit integer value": _rec(b"9" * 5000),
    "30-digit integer value": _rec(b"9" * 30),
    "1e309": _rec(b"1e309"),
    "1e-400": _rec(b"1e-400"),
    'NaN literal (not JSON)': _rec(b"NaN"),
    'duplicate key {"value": 60, "value": 500}': b'[{"user_id":"u","metric":"heart_rate",'
                                                 b'"timestamp":"2024-01-01T00:00:00","value":60,"value":500}]',
    'lone surrogate "\\ud800" in user_id': _rec(b"1", b'"\\ud800"'),
    "invalid UTF-8 bytes (0xff 0xfe) in user_id": _rec(b"1", b'"\xff\xfe"'),
}


def edge_decoders() -> dict[str, Callable[[bytes], object]]:
    def text(b: bytes) -> str:
        return b.decode("utf-8")  # what ingest.py's text reader does first (strict UTF-8)

    out: dict[str, Callable[[bytes], object]] = {"json.loads(file text)": lambda b: json.loads(text(b))}
    if orjson is not None:
        out["orjson.loads(bytes)"] = orjson.loads
        out["orjson.loads(file text)"] = lambda b: orjson.loads(text(b))
    if msgspec is not None:
        out["msgspec -> list[Any] (bytes)"] = msgspec.json.Decoder(list[Any]).decode
        out["msgspec -> list[Record] (bytes)"] = msgspec.json.Decoder(list[Record]).decode
    if simdjson is not None:
        out["pysimdjson parse(bytes, recursive)"] = lambda b: simdjson.Parser().parse(b, True)
    return out


def _describe(value: object) -> str:
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**20:
        return f"int ({len(str(abs(value)))} digits)"
    if isinstance(value, str):
        return ascii(value)
    return repr(value)


def edge_table() -> list[str]:
    decs = edge_decoders()
    lines = ["| case | " + " | ".join(decs) + " |", "|---|" + "---|" * len(decs)]
    for case, doc in EDGE_CASES.items():
        cells = []
        for decode in decs.values():
            try:
                rec = decode(doc)[0]
                if msgspec is not None and isinstance(rec, msgspec.Struct):
                    rec = msgspec.structs.asdict(rec)
                field = "user_id" if "user_id" in case else "value"
                cells.append(f"ok: {field} = {_describe(rec[field])}")
            except Exception as exc:  # noqa: BLE001 - reporting what each library raises
                msg = str(exc).replace("|", "\\|").replace("\n", " ")
                if len(msg) > 110:
                    msg = msg[:107] + "..."
                cells.append(f"**{type(exc).__name__}**: {msg}")
        lines.append(f"| {case} | " + " | ".join(cells) + " |")
    return lines


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mb", type=float, default=100, help="size of the generated file (default 100 MB)")
    p.add_argument("--repeat", type=int, default=30, help="heart-rate copies per key (default 30, like bench.py a)")
    p.add_argument("--runs", type=int, default=5, help="timed passes per measurement; the median is reported")
    p.add_argument("--scratch", type=Path, default=ROOT / "bench-data" / "profile")
    p.add_argument("--out", type=Path, help="also write the report here")
    p.add_argument("--no-gil", action="store_true", help="skip the two-thread test")
    p.add_argument("--no-ingest", action="store_true", help="skip the ingest.py context rows")
    a = p.parse_args(argv)

    a.scratch.mkdir(parents=True, exist_ok=True)
    path = make_file(a.scratch, a.mb, a.repeat)
    size = path.stat().st_size
    str_wins = windows(path)
    byte_wins = [w.encode("utf-8") for w in str_wins]
    progress = sys.stderr

    # Cost of getting the windows at all: the file read as UTF-8 text in 1 MiB chunks (page cache).
    reads = []
    for _ in range(a.runs):
        started = time.perf_counter()
        with open(path, encoding="utf-8") as fh:
            while fh.read(CHUNK_CHARS):
                pass
        reads.append(time.perf_counter() - started)
    read_s = statistics.median(reads)

    apps, missing = approaches()
    rows = []
    for ap in apps:
        wins = str_wins if ap.data == "str" else byte_wins
        dec, full = [], []
        records = 0
        for _ in range(a.runs):
            s, records = time_pass(ap, wins, with_keys=False)
            dec.append(s)
            s, _ = time_pass(ap, wins, with_keys=True)
            full.append(s)
        rows.append((ap, statistics.median(dec), statistics.median(full), records, min(dec), max(dec)))
        print(f"profile: {ap.name}: decode {statistics.median(dec):.3f} s, +keys {statistics.median(full):.3f} s",
              file=progress, flush=True)
    base_records = rows[0][3]

    ctx = {} if a.no_ingest else ingest_context(path, max(3, a.runs // 2 + 1), a.scratch)
    gil = []
    if not a.no_gil:
        for ap in apps:
            if ap.lazy or "tuple key" in ap.name or "gc disabled" in ap.name or ap.name.startswith("orjson.loads, str"):
                continue
            wins = str_wins if ap.data == "str" else byte_wins
            seq, par = gil_test(ap, wins, a.runs)
            gil.append((ap, seq, par))
            print(f"profile: GIL {ap.name}: sequential {seq:.3f} s, 2 threads {par:.3f} s", file=progress, flush=True)

    mb = size / 1e6
    lines = ["# JSON decoder profile (Task-0 shape)", ""]
    lines.append(f"- File: {path.name}: {mb:,.1f} MB pretty-printed JSON array, {base_records:,} records "
                 f"(1 user, heart rate x {a.repeat}: {1 - 1 / a.repeat:.0%} of the records repeat a key); "
                 f"{len(str_wins)} windows of ~{size / max(1, len(str_wins)) / 1e6:.2f} MB cut after the last "
                 "\"},\" like ingest.py's _Buffer.decode_batch.")
    lines.append(f"- Python {platform.python_version()}, {os.cpu_count()} cores ({_cpu()}), load average "
                 f"{os.getloadavg()[0]:.2f}; median of {a.runs} passes; file in the page cache; reading it as UTF-8 "
                 f"text in 1 MiB chunks takes {read_s:.3f} s ({mb / read_s:,.0f} MB/s), not included below.")
    if missing:
        lines.append(f"- Not installed, skipped: {', '.join(missing)}.")
    lines += ["", ("| approach | version | decode s | decode MB/s | decode records/s | decode + key + dict s "
              "| MB/s | records/s | vs stdlib (decode + key) |"),
              "|---|---|--:|--:|--:|--:|--:|--:|--:|"]
    base_full = rows[0][2]
    for ap, d, f, n, _lo, _hi in rows:
        dec_cells = (f"{d:.3f} | {mb / d:,.0f} | {n / d:,.0f}" if not ap.lazy else
                     f"{d:.3f} | ({mb / d:,.0f}) | (lazy: nothing built)")
        lines.append(f"| {ap.name} | {ap.version} | {dec_cells} | {f:.3f} | {mb / f:,.0f} | {n / f:,.0f} "
                     f"| {base_full / f:.2f}x |")
    if ctx and "error" not in ctx:
        lines += ["", (f"For context, ingest.py itself as committed at git {ctx['head']} (imported from a copy, "
                  "unchanged) on the same file:"), "",
                  "| step | s | MB/s | records/s |", "|---|--:|--:|--:|"]
        for label, key in (("DataFile.records (read text + windows + decode)", "reader"),
                           ("... + _FileRows (validate, COPY line, first-wins dedupe)", "reader+lines")):
            s = ctx[key]
            lines.append(f"| {label} | {s:.3f} | {mb / s:,.0f} | {ctx['records'] / s:,.0f} |")
    elif ctx:
        lines += ["", f"ingest.py context skipped: {ctx['error']}"]
    if gil:
        lines += ["", ("GIL: the windows decoded twice in one thread vs once in each of two threads at once "
                  "(speed-up ~2 = the decoder releases the GIL; ~1 = it holds it):"), "",
                  "| approach | sequential s | 2 threads s | speed-up |", "|---|--:|--:|--:|"]
        for ap, seq, par in gil:
            lines.append(f"| {ap.name} | {seq:.3f} | {par:.3f} | {seq / par:.2f} |")
    lines += ["", ("Edge cases (one record in an array; `file text` = the bytes decoded as strict UTF-8 first, "
              "as ingest.py's reader does):"), "", *edge_table()]
    report = "\n".join(lines) + "\n"
    print(report)
    if a.out:
        a.out.write_text(report, encoding="utf-8")
    return 0


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "?"


if __name__ == "__main__":
    raise SystemExit(main())
