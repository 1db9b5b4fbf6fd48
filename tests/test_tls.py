"""TLS to the database: a server that accepts only encrypted connections, with a certificate the
loader verifies (sslmode=verify-full).

The loader imports psycopg2 without Python's `ssl` module (see `_psycopg2` in ingest.py: that
import only shares OpenSSL locking callbacks that OpenSSL 1.1+ does not use), so libpq sets up
OpenSSL on its own. These tests show that TLS still works end to end in a fresh interpreter, and
that a certificate the loader cannot verify still stops it. They start a throwaway PostgreSQL 15
cluster (with TimescaleDB, as scripts/dev-db.sh builds it) whose pg_hba.conf rejects every
connection that is not TLS.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ROOT, rec

PGBIN = Path(os.environ.get("PGBIN", "/usr/lib/postgresql/15/bin"))

pytestmark = pytest.mark.skipif(
    not (PGBIN / "postgres").exists() or not shutil.which("openssl"),
    reason=f"needs PostgreSQL's server binaries in {PGBIN} (PGBIN) and openssl")


def _as_owner(cmd: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: run them as the postgres user then."""
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else cmd


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _certificate(folder: Path, name: str) -> Path:
    """A self-signed certificate for localhost (its own root), with its key beside it."""
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                    "-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost",
                    "-keyout", str(folder / f"{name}.key"), "-out", str(folder / f"{name}.crt")],
                   check=True, capture_output=True)
    return folder / f"{name}.crt"


@pytest.fixture(scope="module")
def tls_server():
    """(port, the server's certificate, another certificate) of a TLS-only server."""
    base = Path(tempfile.mkdtemp(prefix="ingest-tls-"))
    data = base / "pgdata"
    server_crt, other_crt = _certificate(base, "server"), _certificate(base, "other")
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        for f in base.iterdir():
            shutil.chown(f, "postgres")
    os.chmod(base / "server.key", 0o600)
    port = _free_port()
    proc = None
    server_log = open(base / "server.log", "w")  # noqa: SIM115  # the server writes it until the end
    try:
        subprocess.run(_as_owner([str(PGBIN / "initdb"), "-D", str(data), "-U", "postgres", "--auth=trust",
                                  "--no-sync"]), check=True, capture_output=True)
        (data / "pg_hba.conf").write_text("local all postgres trust\n"  # the set-up below, over the socket
                                          "hostssl all all 127.0.0.1/32 trust\n"
                                          "hostnossl all all 0.0.0.0/0 reject\n")
        proc = subprocess.Popen(_as_owner([
            str(PGBIN / "postgres"), "-D", str(data), "-p", str(port), "-k", str(base),
            "-c", "listen_addresses=127.0.0.1", "-c", "ssl=on",
            "-c", f"ssl_cert_file={server_crt}", "-c", f"ssl_key_file={base / 'server.key'}",
            "-c", "shared_preload_libraries=timescaledb", "-c", "timescaledb.telemetry_level=off",
            "-c", "fsync=off"]), stdout=subprocess.DEVNULL, stderr=server_log)
        deadline = time.monotonic() + 30
        while subprocess.run(_as_owner([str(PGBIN / "pg_isready"), "-h", str(base), "-p", str(port)]),
                             capture_output=True, check=False).returncode != 0:
            if time.monotonic() > deadline or proc.poll() is not None:
                pytest.fail(f"the TLS test server did not start: {(base / 'server.log').read_text()[-2000:]}")
            time.sleep(0.2)
        psql = str(PGBIN / "psql") if (PGBIN / "psql").exists() else "psql"
        for dbname, sql in (("postgres", "CREATE DATABASE fitbit"), ("fitbit", "CREATE EXTENSION timescaledb")):
            subprocess.run(_as_owner([psql, "-h", str(base), "-p", str(port), "-U", "postgres", "-d", dbname, "-q",
                                      "-c", sql]), check=True, capture_output=True)
        yield port, server_crt, other_crt
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=30)
        server_log.close()
        shutil.rmtree(base, ignore_errors=True)


def _load(tmp_path: Path, port: int, rootcert: Path) -> subprocess.CompletedProcess:
    """The loader in a fresh interpreter (as cron runs it) over DATABASE_URL with verify-full."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    (data / "a.json").write_text(json.dumps([rec(ts=f"2024-01-01T00:00:0{i}Z", value=i) for i in range(3)]))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("POSTGRES_", "PG"))}
    env["DATABASE_URL"] = (f"host=localhost port={port} user=postgres dbname=fitbit sslmode=verify-full "
                           f"sslrootcert={rootcert}")
    return subprocess.run([sys.executable, str(ROOT / "ingest.py"), "--data-dir", str(data),
                           "--reject-file", str(tmp_path / "rejects.jsonl"),
                           "--summary-json", str(tmp_path / "summary.json")],
                          env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path, check=False)


def test_loads_over_a_verified_tls_connection(tls_server, tmp_path):
    port, server_crt, _ = tls_server
    done = _load(tmp_path, port, server_crt)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert (summary["files_loaded"], summary["rows_inserted"]) == (1, 3)


def test_a_certificate_that_does_not_verify_stops_the_run(tls_server, tmp_path):
    port, _, other_crt = tls_server
    done = _load(tmp_path, port, other_crt)
    assert done.returncode != 0
    assert "cannot connect to localhost" in done.stderr and "certificate verify failed" in done.stderr


def test_psycopg2_loads_without_python_ssl_and_encrypts(tls_server):
    """What the two tests above rely on: ssl stays unimported, and the session is TLS."""
    port, server_crt, _ = tls_server
    code = ("import sys, ingest\n"
            f"conn = ingest.connect_db({{'host': 'localhost', 'port': {port}, 'user': 'postgres', "
            f"'dbname': 'fitbit', 'sslmode': 'verify-full', 'sslrootcert': {str(server_crt)!r}}})\n"
            "cur = conn.cursor()\n"
            "cur.execute('SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()')\n"
            "print(cur.fetchone()[0], 'ssl' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          check=False, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["True", "False"]
