"""A server that is reachable but cannot take the loader's rows says so at start: one line with
the fix, exit 2 (a setting to change, which cron's retries would never fix), never exit 3 as if the
database were down.

These tests start a throwaway PostgreSQL 15 cluster with TimescaleDB (as scripts/dev-db.sh builds
it): once without TimescaleDB preloaded (the most common first mistake), and a streaming standby
of it. (A server with no TimescaleDB package at all, or an extension older than 2.0, cannot be
made on this machine; `check_server` words those cases from the same catalog query.)
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, rec
from tests.test_tls import PGBIN, _as_owner, _free_port

pytestmark = pytest.mark.skipif(not (PGBIN / "postgres").exists(),
                                reason=f"needs PostgreSQL's server binaries in {PGBIN} (PGBIN)")


class Cluster:
    def __init__(self, base: Path, name: str) -> None:
        self.base, self.data, self.port = base, base / name, _free_port()
        self.log = base / f"{name}.log"

    def pg_ctl(self, *args: str, options: str = "") -> None:
        opts = f"-p {self.port} -k {self.base} -c listen_addresses=127.0.0.1 -c fsync=off {options}"
        subprocess.run(_as_owner([str(PGBIN / "pg_ctl"), "-D", str(self.data), "-o", opts, "-l", str(self.log),
                                  "-w", *args]), check=True, capture_output=True, timeout=60)

    def psql(self, sql: str, dbname: str = "postgres") -> None:
        subprocess.run(_as_owner([str(PGBIN / "psql"), "-h", str(self.base), "-p", str(self.port), "-U", "postgres",
                                  "-d", dbname, "-q", "-c", sql]), check=True, capture_output=True, timeout=60)


@pytest.fixture(scope="module")
def servers():
    """A primary (TimescaleDB preloaded, the schema applied by one load) and a standby of it."""
    base = Path(tempfile.mkdtemp(prefix="ingest-server-"))
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
    primary, standby = Cluster(base, "primary"), Cluster(base, "standby")
    started = []
    try:
        subprocess.run(_as_owner([str(PGBIN / "initdb"), "-D", str(primary.data), "-U", "postgres", "--auth=trust",
                                  "--no-sync"]), check=True, capture_output=True)
        preload = "-c shared_preload_libraries=timescaledb -c timescaledb.telemetry_level=off"
        primary.pg_ctl("start", options=preload)
        started.append(primary)
        primary.psql("CREATE DATABASE fitbit")
        primary.psql("CREATE EXTENSION timescaledb", "fitbit")
        subprocess.run(_as_owner([str(PGBIN / "pg_basebackup"), "-h", str(base), "-p", str(primary.port), "-U",
                                  "postgres", "-D", str(standby.data), "-R", "-X", "stream", "-c", "fast"]),
                       check=True, capture_output=True, timeout=120)
        standby.pg_ctl("start", options=preload)
        started.append(standby)
        yield primary, standby, preload
    finally:
        for cluster in started:
            subprocess.run(_as_owner([str(PGBIN / "pg_ctl"), "-D", str(cluster.data), "-m", "fast", "stop"]),
                           capture_output=True, check=False, timeout=60)
        shutil.rmtree(base, ignore_errors=True)


def load(tmp_path: Path, cluster: Cluster, dbname: str = "fitbit") -> subprocess.CompletedProcess:
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "a.json").write_text(json.dumps([rec()]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PG", "DATABASE_URL"))}
    env.update(POSTGRES_HOST="127.0.0.1", POSTGRES_PORT=str(cluster.port), POSTGRES_USER="postgres",
               POSTGRES_PASSWORD="unused", POSTGRES_DB=dbname, CONNECT_TIMEOUT="5")
    return subprocess.run([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(data),
                           "--reject-file", str(tmp_path / "rejects.jsonl")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)


def one_error(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    (line,) = [line for line in stderr.splitlines() if line.startswith("error:")]
    return line


def test_a_server_that_does_not_preload_timescaledb_says_so_with_the_fix(servers, tmp_path):
    primary, _, preload = servers
    assert load(tmp_path, primary).returncode == 0  # preloaded: the schema is there, the file loads
    primary.pg_ctl("restart", "-m", "fast")  # the same server without shared_preload_libraries
    try:
        done = load(tmp_path, primary)
        assert done.returncode == 2, done.stderr
        assert "not preloaded" in one_error(done.stderr) and "must be preloaded" in done.stderr
        assert "hint: add timescaledb to shared_preload_libraries" in done.stderr and "restart" in done.stderr
        primary.psql("CREATE DATABASE fresh")  # no extension yet: the loader's bootstrap would make it
        done = load(tmp_path, primary, "fresh")
        assert done.returncode == 2, done.stderr
        assert "not preloaded" in one_error(done.stderr) and "shared_preload_libraries" in done.stderr
    finally:
        primary.pg_ctl("restart", "-m", "fast", options=preload)


def test_a_standby_says_it_is_one_and_exits_2(servers, tmp_path):
    _, standby, _ = servers
    deadline = time.monotonic() + 30
    done = load(tmp_path, standby)
    while done.returncode == 3 and time.monotonic() < deadline:  # (the standby may still be starting)
        time.sleep(1)
        done = load(tmp_path, standby)
    assert done.returncode == 2, done.stderr
    assert "standby (in recovery)" in one_error(done.stderr) and "hint: point the loader at the primary" in done.stderr
