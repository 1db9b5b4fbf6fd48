"""Synthetic Fitbit data in the real file formats, for tests and benchmarks.

``make_takeout`` writes a Google-Takeout-like tree ``ROOT/<user>/Takeout/Fitbit/...`` in one of two
layouts, ``make_api_responses`` writes saved Fitbit Web API response bodies under
``ROOT/<user>-api/``. Both return what a correct reader must produce:

    {"user_id": ..., "counts": {metric: records}, "files": {relpath: [kind, records]},
     "skipped": [relpaths that no reader should load], "spots": [{"file", "position", "record"}]}

(paths relative to ROOT, POSIX style). Counts are exact: every generated data point is valid.

Layouts:
  old  Fitbit/Global Export Data/heart_rate-D.json (5-15 s, UTC "MM/DD/YY HH:MM:SS"),
       Global Export Data/steps-D.json (per minute, value a string), Oxygen Saturation (SpO2)/
       Minute SpO2 - D.csv (naive local), Heart Rate Variability/Heart Rate Variability Details - D.csv,
       Heart Rate Variability/Respiratory Rate Summary - D.csv, Active Zone Minutes (AZM)/
       Active Zone Minutes - D.csv (date_time without seconds, some minutes in two zones = two rows);
       skipped: sleep-D.json, resting_heart_rate-D.json, Daily Heart Rate Variability Summary - D.csv,
       Your Profile/Profile.csv.
  new  Fitbit/Physical Activity_GoogleData/heart_rate_D.csv and steps_D.csv (UTC, ...Z), per-month
       active_zone_minutes_YYYY-MM-01.csv (UTC), Minute SpO2 with Z and extra columns, HRV details,
       Daily Respiratory Rate Summary (daily_respiratory_rate), CRLF line ends;
       skipped: READMEs, daily_resting_heart_rate_D.csv, sleep-D.json, Profile.csv.

CLI:  python make_export.py OUT [--days 365] [--layout old|new|both] [--api] [--start 2023-01-01]
      [--user alice] [--seed 0]      (prints the expected counts as JSON)
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import random
import sys
from pathlib import Path

SPOTS_PER_FILE = 2  # first and last record of the first file of each type


def _rel(root: Path, path: Path) -> str:
    return path.relative_to(root).as_posix()


class _Result:
    def __init__(self, user_id: str) -> None:
        self.user_id = user_id
        self.counts: dict[str, int] = {}
        self.files: dict[str, list] = {}
        self.skipped: list[str] = []
        self.spots: list[dict] = []
        self._spotted: set[str] = set()

    def add(self, root: Path, path: Path, kind: str, metric: str, records: list[tuple[int, object, object]]) -> None:
        """records: (position, timestamp, value) in file order."""
        rel = _rel(root, path)
        self.files[rel] = [kind, len(records)]
        self.counts[metric] = self.counts.get(metric, 0) + len(records)
        if kind not in self._spotted and records:
            self._spotted.add(kind)
            for position, timestamp, value in (records[0], records[-1]):
                self.spots.append({"file": rel, "position": position, "record": {
                    "user_id": self.user_id, "metric": metric, "timestamp": timestamp, "value": value}})

    def skip(self, root: Path, path: Path) -> None:
        self.skipped.append(_rel(root, path))

    def as_dict(self) -> dict:
        return {"user_id": self.user_id, "counts": dict(sorted(self.counts.items())), "files": self.files,
                "skipped": self.skipped, "spots": self.spots}


def _write(path: Path, text: str, newline: str = "\n") -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline=newline) as f:
        f.write(text)


def _legacy(moment: dt.datetime) -> str:
    return moment.strftime("%m/%d/%y %H:%M:%S")


def _heart_times(rng: random.Random, day: dt.date):
    """Sample times of one UTC day at irregular 5..15 s steps."""
    second = rng.randint(0, 4)
    base = dt.datetime.combine(day, dt.time())
    while second < 86400:
        yield base + dt.timedelta(seconds=second)
        second += rng.randint(5, 15)


def make_takeout(root: Path, layout: str = "old", days: int = 2, start: dt.date = dt.date(2023, 1, 1),
                 user: str = "alice", seed: int = 0) -> dict:
    if layout not in ("old", "new"):
        raise ValueError("layout must be 'old' or 'new'")
    rng = random.Random(seed)
    root = Path(root)
    fitbit = root / user / "Takeout" / "Fitbit"
    result = _Result(f"takeout-{user}")
    crlf = "\r\n" if layout == "new" else "\n"
    azm_month: dict[str, list[str]] = {}
    azm_month_records: dict[str, list] = {}
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        iso = day.isoformat()
        # --- heart rate --------------------------------------------------------------------
        bpm, records, parts = 70, [], []
        for moment in _heart_times(rng, day):
            bpm = max(45, min(150, bpm + rng.randint(-3, 3)))
            stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
            if layout == "old":
                parts.append(
                    '{\n  "dateTime" : "%s",\n  "value" : {\n    "bpm" : %d,\n    "confidence" : %d\n  }\n}'  # noqa: UP031
                             % (_legacy(moment), bpm, rng.randint(0, 3)))
                records.append((len(records) + 1, stamp, bpm))
            else:
                parts.append(f"{stamp},{bpm}.0")
                records.append((len(records) + 2, stamp, float(bpm)))
        if layout == "old":
            path = fitbit / "Global Export Data" / f"heart_rate-{iso}.json"
            _write(path, "[" + ",".join(parts) + "]")
            result.add(root, path, "takeout-heart-rate", "heart_rate", records)
        else:
            path = fitbit / "Physical Activity_GoogleData" / f"heart_rate_{iso}.csv"
            _write(path, "timestamp,beats per minute\n" + "\n".join(parts) + "\n", crlf)
            result.add(root, path, "takeout-heart-rate-csv", "heart_rate", records)
        # --- steps, per minute ----------------------------------------------------------------
        records, parts = [], []
        for minute in range(1440):
            moment = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=minute)
            steps = 0 if minute < 420 or minute > 1320 else rng.choice((0, 0, rng.randint(1, 130)))
            stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
            if layout == "old":
                parts.append('{\n  "dateTime" : "%s",\n  "value" : "%d"\n}' % (_legacy(moment), steps))  # noqa: UP031
                records.append((len(records) + 1, stamp, steps))
            else:
                parts.append(f"{stamp},{steps}")
                records.append((len(records) + 2, stamp, steps))
        if layout == "old":
            path = fitbit / "Global Export Data" / f"steps-{iso}.json"
            _write(path, "[" + ",".join(parts) + "]")
            result.add(root, path, "takeout-steps", "activity", records)
        else:
            path = fitbit / "Physical Activity_GoogleData" / f"steps_{iso}.csv"
            _write(path, "timestamp,steps\n" + "\n".join(parts) + "\n", crlf)
            result.add(root, path, "takeout-steps-csv", "activity", records)
        # --- night: SpO2 per minute, HRV every 5 min (01:00-06:59 local / UTC in "new" SpO2) --
        night = dt.datetime.combine(day, dt.time(1, 0))
        records, lines = [], []
        spo2 = 96.0
        for minute in range(360):
            moment = night + dt.timedelta(minutes=minute)
            spo2 = round(max(88.0, min(100.0, spo2 + rng.choice((-0.3, 0.0, 0.3)))), 1)
            if layout == "old":
                stamp = moment.strftime("%Y-%m-%dT%H:%M:%S")
                lines.append(f"{stamp},{spo2}")
            else:
                stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
                lines.append(f"{stamp},{spo2},{rng.randint(1, 3)},{rng.randint(40, 60)},true,false")
            records.append((len(records) + 2, stamp, spo2))
        header = "timestamp,value" if layout == "old" else "timestamp,value,confidence,coverage,valid,unused"
        path = fitbit / "Oxygen Saturation (SpO2)" / f"Minute SpO2 - {iso}.csv"
        _write(path, header + "\n" + "\n".join(lines) + "\n", crlf)
        result.add(root, path, "takeout-spo2-csv", "spo2", records)

        records, lines = [], []
        for slot in range(72):
            moment = night + dt.timedelta(minutes=5 * slot)
            stamp = moment.strftime("%Y-%m-%dT%H:%M:%S")
            rmssd = round(rng.uniform(15, 90), 3)
            lines.append(f"{stamp},{rmssd},{round(rng.uniform(0.8, 1.0), 3)},{round(rng.uniform(100, 900), 3)},"
                         f"{round(rng.uniform(100, 900), 3)}")
            records.append((len(records) + 2, stamp, rmssd))
        path = fitbit / "Heart Rate Variability" / f"Heart Rate Variability Details - {iso}.csv"
        _write(path, "timestamp,rmssd,coverage,low_frequency,high_frequency\n" + "\n".join(lines) + "\n", crlf)
        result.add(root, path, "takeout-hrv-csv", "hrv", records)
        path = fitbit / "Heart Rate Variability" / f"Daily Heart Rate Variability Summary - {iso}.csv"
        _write(path, f"timestamp,rmssd,nremhr,entropy\n{iso}T00:00:00,{round(rng.uniform(20, 60), 3)},52.1,2.5\n", crlf)
        result.skip(root, path)

        # --- breathing rate: one summary per night ------------------------------------------
        rate = round(rng.uniform(12, 20), 1)
        if layout == "old":
            path = fitbit / "Heart Rate Variability" / f"Respiratory Rate Summary - {iso}.csv"
            stamp = f"{iso}T07:00:00"
            cols = ["timestamp"] + [f"{stage}_sleep_{what}" for stage in ("full", "deep", "light", "rem")
                                    for what in ("breathing_rate", "standard_deviation", "signal_to_noise")]
            values = [stamp] + [str(v) for stage in range(4) for v in (rate + stage * 0.1, 1.2, 3.4)]
            _write(path, ",".join(cols) + "\n" + ",".join(values) + "\n")
        else:
            path = fitbit / "Heart Rate Variability" / f"Daily Respiratory Rate Summary - {iso}.csv"
            stamp = f"{iso}T00:00:00"
            _write(path, f"timestamp,daily_respiratory_rate\n{stamp},{rate}\n", crlf)
        result.add(root, path, "takeout-breath-csv", "breath_rate", [(2, stamp, rate)])

        # --- active zone minutes ------------------------------------------------------------
        zones = (("FAT_BURN", "fat burn", 1), ("CARDIO", "cardio", 2), ("PEAK", "peak", 2))
        workout = dt.datetime.combine(day, dt.time(17, rng.randint(0, 30)))
        records, lines = [], []
        for minute in range(rng.randint(20, 40)):
            moment = workout + dt.timedelta(minutes=minute)
            zone = zones[min(2, minute // 10)]
            if layout == "old":
                stamp = moment.strftime("%Y-%m-%dT%H:%M")  # as exported: no seconds
                line_no = len(lines) + 2
                lines.append(f"{stamp},{zone[0]},{zone[2]}")
                total = zone[2]
                if minute % 7 == 3:  # the minute the zone changed: one row per zone, adjacent
                    other = zones[(zones.index(zone) + 1) % 3]
                    lines.append(f"{stamp},{other[0]},{other[2]}")
                    total += other[2]
                records.append((line_no, stamp + ":00", total))
            else:
                stamp = moment.strftime("%Y-%m-%dT%H:%M:%SZ")
                month = azm_month.setdefault(day.strftime("%Y-%m-01"), [])
                azm_month_records.setdefault(day.strftime("%Y-%m-01"), []).append((len(month) + 2, stamp, zone[2]))
                month.append(f"{stamp},{zone[1]},{zone[2]}")
        if layout == "old":
            path = fitbit / "Active Zone Minutes (AZM)" / f"Active Zone Minutes - {iso}.csv"
            _write(path, "date_time,heart_zone_id,total_minutes\n" + "\n".join(lines) + "\n")
            result.add(root, path, "takeout-azm-csv", "active_zone_minute", records)

        # --- files no reader loads ----------------------------------------------------------
        sleep = [{"logId": 1000 + offset, "dateOfSleep": iso, "startTime": f"{iso}T00:55:00.000",
                  "endTime": f"{iso}T07:05:00.000", "duration": 22200000, "minutesAsleep": 340,
                  "type": "stages", "mainSleep": True,
                  "levels": {"summary": {"deep": {"count": 4, "minutes": 80, "thirtyDayAvgMinutes": 75}},
                             "data": [{"dateTime": f"{iso}T00:55:00.000", "level": "wake", "seconds": 300}]}}]
        path = fitbit / "Global Export Data" / f"sleep-{iso}.json"
        _write(path, json.dumps(sleep, indent=2))
        result.skip(root, path)
        if layout == "old":
            path = fitbit / "Global Export Data" / f"resting_heart_rate-{iso}.json"
            _write(path, json.dumps([{"dateTime": _legacy(dt.datetime.combine(day, dt.time())),
                                      "value": {"date": day.strftime("%m/%d/%y"), "value": 55.2, "error": 6.7}}]))
            result.skip(root, path)
        else:
            path = fitbit / "Physical Activity_GoogleData" / f"daily_resting_heart_rate_{iso}.csv"
            _write(path, f"timestamp,beats per minute\n{iso}T00:00:00Z,55.0\n", crlf)
            result.skip(root, path)
    if layout == "new":
        for month, lines in sorted(azm_month.items()):
            path = fitbit / "Physical Activity_GoogleData" / f"active_zone_minutes_{month}.csv"
            _write(path, "timestamp,heart rate zone,total minutes\n" + "\n".join(lines) + "\n", crlf)
            result.add(root, path, "takeout-azm-csv", "active_zone_minute", azm_month_records[month])
        for name in ("heart_rate_readme.txt", "steps_readme.txt"):
            path = fitbit / "Physical Activity_GoogleData" / name
            _write(path, "Time Series Data Export\n\ntimestamp - Date and time at which the entry was logged.\n")
            result.skip(root, path)
    path = fitbit / "Your Profile" / "Profile.csv"
    _write(path, "id,full_name,timezone\nABC123,Alice Example,Europe/Berlin\n")
    result.skip(root, path)
    return result.as_dict()


def make_api_responses(root: Path, days: int = 2, start: dt.date = dt.date(2023, 1, 1), user: str = "alice",
                       seed: int = 0) -> dict:
    """Saved Web API bodies under ROOT/<user>-api/: per day heart (1min), steps (1min), SpO2
    intraday, HRV intraday, breathing rate (summary shape on even days, intraday shape on odd
    days), AZM intraday (1min); plus one SpO2 by-interval list and files no reader loads."""
    rng = random.Random(seed)
    root = Path(root)
    base = root / f"{user}-api"
    result = _Result(f"api-{user}-api")
    spo2_days = []
    for offset in range(days):
        day = start + dt.timedelta(days=offset)
        iso = day.isoformat()
        for resource, metric, kind in (("heart", "heart_rate", "api-heart"), ("steps", "activity", "api-steps")):
            dataset, records = [], []
            for minute in range(1440):
                clock = f"{minute // 60:02d}:{minute % 60:02d}:00"
                value = rng.randint(50, 110) if resource == "heart" else rng.choice((0, 0, rng.randint(1, 120)))
                dataset.append({"time": clock, "value": value})
                records.append((minute + 1, f"{iso}T{clock}", value))
            summary = {"dateTime": iso, "value": {"customHeartRateZones": [], "heartRateZones": [
                {"caloriesOut": 1200.5, "max": 98, "min": 30, "minutes": 1300, "name": "Out of Range"}],
                "restingHeartRate": 58}} if resource == "heart" else {"dateTime": iso, "value": "8123"}
            body = {f"activities-{resource}": [summary],
                    f"activities-{resource}-intraday": {"dataset": dataset, "datasetInterval": 1,
                                                        "datasetType": "minute"}}
            path = base / f"{resource}-{iso}.json"
            _write(path, json.dumps(body))
            result.add(root, path, kind, metric, records)

        night = dt.datetime.combine(day, dt.time(1, 0))
        minutes, records = [], []
        for i in range(300):
            stamp = (night + dt.timedelta(minutes=i)).strftime("%Y-%m-%dT%H:%M:%S")
            value = round(rng.uniform(92, 99), 1)
            minutes.append({"value": value, "minute": stamp})
            records.append((i + 1, stamp, value))
        body = {"dateTime": iso, "minutes": minutes}
        if offset == 0:
            spo2_days.append(body)
        path = base / f"spo2-{iso}.json"
        _write(path, json.dumps(body))
        result.add(root, path, "api-spo2", "spo2", records)

        minutes, records = [], []
        for i in range(60):
            stamp = (night + dt.timedelta(minutes=5 * i)).strftime("%Y-%m-%dT%H:%M:%S.000")
            rmssd = round(rng.uniform(15, 90), 3)
            minutes.append({"minute": stamp, "value": {"rmssd": rmssd, "coverage": 0.95, "hf": 300.1, "lf": 500.2}})
            records.append((i + 1, stamp, rmssd))
        path = base / f"hrv-{iso}.json"
        _write(path, json.dumps({"hrv": [{"minutes": minutes, "dateTime": iso}]}))
        result.add(root, path, "api-hrv", "hrv", records)

        rate = round(rng.uniform(12, 20), 1)
        value = {"breathingRate": rate} if offset % 2 == 0 else {
            "deepSleepSummary": {"breathingRate": rate - 1}, "remSleepSummary": {"breathingRate": -1},
            "fullSleepSummary": {"breathingRate": rate}, "lightSleepSummary": {"breathingRate": rate + 0.5}}
        path = base / f"br-{iso}.json"
        _write(path, json.dumps({"br": [{"value": value, "dateTime": iso}]}))
        result.add(root, path, "api-br", "breath_rate", [(1, f"{iso}T00:00:00", rate)])

        minutes, records = [], []
        for minute in range(1440):
            stamp = f"{iso}T{minute // 60:02d}:{minute % 60:02d}:00"
            active = 1020 <= minute < 1060
            azm = {"activeZoneMinutes": 0} if not active else \
                {"activeZoneMinutes": 2, "cardioActiveZoneMinutes": 2} if minute % 3 == 0 else \
                {"activeZoneMinutes": 1, "fatBurnActiveZoneMinutes": 1}
            minutes.append({"minute": stamp, "value": azm})
            records.append((minute + 1, stamp, azm["activeZoneMinutes"]))
        path = base / f"azm-{iso}.json"
        _write(path, json.dumps({"activities-active-zone-minutes-intraday": [{"dateTime": iso, "minutes": minutes}]}))
        result.add(root, path, "api-azm", "active_zone_minute", records)

    if spo2_days:  # the by-interval endpoint returns a list of day objects
        day_records = [(i + 1, m["minute"], m["value"]) for i, m in enumerate(spo2_days[0]["minutes"])]
        path = base / "spo2-interval.json"
        _write(path, json.dumps(spo2_days))
        result.add(root, path, "api-spo2", "spo2", day_records)
    path = base / "profile.json"
    _write(path, json.dumps({"user": {"encodedId": "ABC123", "timezone": "Europe/Berlin", "offsetFromUTCMillis": 3600000}}))
    result.skip(root, path)
    path = base / "hrv-summary.json"
    _write(path, json.dumps({"hrv": [{"value": {"dailyRmssd": 34.9, "deepRmssd": 30.1}, "dateTime": start.isoformat()}]}))
    result.skip(root, path)
    path = base / "sleep.json"
    _write(path, json.dumps({"sleep": [{"dateOfSleep": start.isoformat(), "levels": {"summary": {"deep": {"minutes": 80}}}}]}))
    result.skip(root, path)
    return result.as_dict()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--days", type=int, default=365)
    parser.add_argument("--layout", choices=("old", "new", "both"), default="old")
    parser.add_argument("--api", action="store_true", help="also write saved Web API responses")
    parser.add_argument("--start", type=dt.date.fromisoformat, default=dt.date(2023, 1, 1))
    parser.add_argument("--user", default="alice")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    summary = {}
    layouts = ("old", "new") if args.layout == "both" else (args.layout,)
    for i, layout in enumerate(layouts):
        user = args.user if len(layouts) == 1 else f"{args.user}-{layout}"
        expected = make_takeout(args.out, layout, args.days, args.start, user, args.seed + i)
        summary[f"takeout-{layout}"] = {"user_id": expected["user_id"], "counts": expected["counts"],
                                        "files": len(expected["files"]), "skipped": len(expected["skipped"])}
    if args.api:
        expected = make_api_responses(args.out, args.days, args.start, args.user, args.seed)
        summary["api"] = {"user_id": expected["user_id"], "counts": expected["counts"],
                          "files": len(expected["files"]), "skipped": len(expected["skipped"])}
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())
    summary["bytes"] = size
    json.dump(summary, sys.stdout, indent=2)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
