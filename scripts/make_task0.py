#!/usr/bin/env python3
"""Write the real output of the task's Task-0 step: the files `ingest.py` exists to load.

    python scripts/make_task0.py OUT [--venv DIR]

Task-0 (the task's public extraction step, `Task-0/extract.py`) asks PyPI's `wearipedia` for a
synthetic Fitbit Charge 6 (seed 42, 2024-01-01 to 2024-01-31), flattens six of its intraday
series to records `{"user_id": "synthetic_001", "metric", "timestamp", "value"}` and writes each
series with `json.dump(records, f, indent=2)` to `<metric>.json`. This script does the same, with
the same library, in a virtualenv of its own (wearipedia and its many dependencies are no
dependency of the loader): made once under --venv (default bench-data/venv-task0), then this
script runs again inside it with --inside to write the files. OUT is written only when it does
not already hold the same output (OUT.meta.json, beside it, records the pins and the counts), so
the bench caches it.

What Task-0's step does, and this script does too, quirks included:
- heart rate: every day's intraday dataset is stamped with the day record's "dateTime", which
  the generator's day records do not carry, so every day is written as 2024-01-01 (30 days of
  readings on one day's keys: 2.59 M records, 86,400 distinct keys);
- spo2, hrv: the minute's own timestamp; activity and breath rate: the day at T00:00:00;
  active zone minutes: the day and the minute; every value through float(), so zeros are 0.0.
The result is checked: 2,661,756 records and 156,156 distinct keys, or the script fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# wearipedia 0.1.7 asks for typer[all]; typer dropped that extra after 0.9, and pip then walks back
# through every typer release: 0.9.4 is pinned so the install resolves at once. Python <= 3.12.
PINS = ("wearipedia==0.1.7", "typer[all]==0.9.4")
USER_ID = "synthetic_001"
START, END = "2024-01-01", "2024-01-31"
EXPECTED = {"records": 2_661_756, "distinct_keys": 156_156}
METRICS = ("heart_rate", "spo2", "activity", "breath_rate", "hrv", "active_zone_minute")


# ---------------------------------------------------------------------------------------------
# Inside the virtualenv: wearipedia's days flattened as Task-0 flattens them
# ---------------------------------------------------------------------------------------------
def _number(value) -> float:
    """A numpy scalar as its Python value (json.dump cannot write numpy ints), else float()."""
    return value.item() if hasattr(value, "item") else float(value)


def heart_rate(days: list) -> list:
    out = []
    for day in days:
        for day_record in day.get("heart_rate_day") or []:
            date = day_record.get("dateTime", START)  # absent in the generator's records: always START
            for point in day_record.get("activities-heart-intraday", {}).get("dataset", []):
                out.append((f"{date}T{point['time']}", _number(point["value"])))
    return out


def spo2(days: list) -> list:
    return [(m["minute"], m["value"]) for day in days for m in day.get("minutes", []) if m.get("value") is not None]


def activity(days: list) -> list:
    return [(f"{day['dateTime']}T00:00:00", float(day["value"])) for day in days]


def breath_rate(days: list) -> list:
    out = []
    for day in days:
        for entry in day.get("br", []):
            rate = entry.get("value", {}).get("fullSleepSummary", {}).get("breathingRate")
            if entry.get("dateTime") and rate is not None:
                out.append((f"{entry['dateTime']}T00:00:00", float(rate)))
    return out


def hrv(days: list) -> list:
    out = []
    for day in days:
        for entry in day.get("hrv", []):
            for minute in entry.get("minutes", []):
                rmssd = minute.get("value", {}).get("rmssd")
                if minute.get("minute") and rmssd is not None:
                    out.append((minute["minute"], float(rmssd)))
    return out


def active_zone_minute(days: list) -> list:
    out = []
    for day in days:
        for entry in day.get("activities-active-zone-minutes-intraday", []):
            date = entry.get("dateTime", "")
            for minute in entry.get("minutes", []):
                azm = minute.get("value", {}).get("activeZoneMinutes")
                if date and minute.get("minute") and azm is not None:
                    out.append((f"{date}T{minute['minute']}", float(azm)))
    return out


def write_inside(out: Path) -> dict:
    from wearipedia.devices.fitbit.fitbit_charge_6 import FitbitCharge6

    device = FitbitCharge6(seed=42, synthetic_start_date=START, synthetic_end_date=END)
    device._gen_synthetic()
    counts, keys = {}, set()
    for metric in METRICS:
        pairs = globals()[metric](device.get_data(f"intraday_{metric}"))
        records = [{"user_id": USER_ID, "metric": metric, "timestamp": ts, "value": value} for ts, value in pairs]
        with open(out / f"{metric}.json", "w") as f:
            json.dump(records, f, indent=2)
        counts[metric] = len(records)
        keys.update((metric, ts) for ts, _ in pairs)
    return {"records": sum(counts.values()), "distinct_keys": len(keys), "per_metric": counts}


# ---------------------------------------------------------------------------------------------
# Outside: the virtualenv, the cache, the check
# ---------------------------------------------------------------------------------------------
def _venv_python(venv: Path) -> Path:
    python, marker = venv / "bin" / "python", venv / "task0-pins.txt"
    if python.exists() and marker.exists() and marker.read_text() == "\n".join(PINS) + "\n":
        return python
    base = next((p for p in (sys.executable, shutil.which("python3.12"), shutil.which("python3.11"))
                 if p and subprocess.run([p, "-c", "import sys; sys.exit(sys.version_info >= (3, 13))"],
                                         check=False).returncode == 0),
                None)
    if base is None:
        sys.exit("make_task0: wearipedia needs Python 3.10-3.12; none found")
    shutil.rmtree(venv, ignore_errors=True)
    print(f"make_task0: installing {' '.join(PINS)} into {venv} (once; a few minutes)", flush=True)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *PINS], check=True)
    marker.write_text("\n".join(PINS) + "\n")
    return python


def make(out: Path, venv: Path) -> dict:
    """OUT holding Task-0's six files (made now, or already there); returns what OUT.meta.json says."""
    stamp = _stamp(out)
    if stamp.exists():
        meta = json.loads(stamp.read_text())
        if meta.get("pins") == list(PINS) and all((out / f"{m}.json").exists() for m in METRICS):
            return meta
    python = _venv_python(venv)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    subprocess.run([str(python), __file__, str(tmp), "--inside"], check=True,
                   env={**os.environ, "PYTHONHASHSEED": "0"})
    meta = json.loads(_stamp(tmp).read_text())
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    _stamp(tmp).rename(stamp)
    return meta


def _stamp(out: Path) -> Path:
    return out.with_name(out.name + ".meta.json")  # beside OUT: everything in OUT is data


def write_limit(json_dir: Path, tsv: Path) -> int:
    """The COPY text of each key's first occurrence, in the loader's (sorted) file order, for the
    bench's limit; returns the records read. Run as its own process (--limit): json.load of
    heart_rate.json takes 1.5 GB, which a parent would pass on to every child's peak RSS."""
    seen: set[tuple[str, str, str]] = set()
    records = 0
    with open(tsv, "w", encoding="utf-8") as out:
        for path in sorted(json_dir.glob("*.json")):
            with open(path) as f:
                for r in json.load(f):
                    records += 1
                    key = (r["user_id"], r["metric"], r["timestamp"])
                    if key not in seen:
                        seen.add(key)
                        out.write(f"{r['user_id']}\t{r['metric']}\t{r['timestamp']}+00:00\t{float(r['value'])!r}\n")
    return records


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path)
    p.add_argument("--venv", type=Path, default=ROOT / "bench-data" / "venv-task0")
    p.add_argument("--inside", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--limit", type=Path, metavar="TSV", help="also write the COPY text of OUT's distinct keys here")
    a = p.parse_args(argv)
    if a.limit is not None:
        print(json.dumps({"records": write_limit(a.out, a.limit)}))
        return 0
    if a.inside:
        got = write_inside(a.out)
        _stamp(a.out).write_text(json.dumps({"pins": list(PINS), **got}, indent=1) + "\n")
        return 0
    else:
        got = make(a.out.resolve(), a.venv.resolve())
    wrong = {k: (got[k], v) for k, v in EXPECTED.items() if got[k] != v}
    if wrong:
        print(f"make_task0: not Task-0's output: {wrong} (got, expected)", file=sys.stderr)
        return 1
    print(f"make_task0: {a.out}: {got['records']:,} records, {got['distinct_keys']:,} distinct keys", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
