"""PostgreSQL 15 and Redis of the CeleryExecutor test, each its own server on a free 127.0.0.1 port, stopped
by the test that started it: the metadata database and the broker of docker-compose.yaml, without containers.

PostgreSQL refuses to run as root: as root (CI), the cluster belongs to the `postgres` user and its
commands run through `runuser`.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

from mlfactory.backends.local.processes import free_port, start, stop_group


def _as_postgres() -> list[str]:
    return ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []


@contextlib.contextmanager
def postgres() -> Iterator[str]:
    """A fresh cluster with an `airflow` database; yields its SQLAlchemy URL (psycopg2)."""
    home = Path(tempfile.mkdtemp(prefix="mlfactory-pg-"))  # not under pytest's root-only tmp: postgres reads it
    if os.geteuid() == 0:
        shutil.chown(home, "postgres")
    data, port = home / "data", free_port()
    run = _as_postgres()
    try:
        subprocess.run([*run, "initdb", "-D", str(data), "-U", "airflow", "--auth=trust", "-E", "UTF8"],
                       check=True, capture_output=True)
        subprocess.run([*run, "pg_ctl", "-D", str(data), "-l", str(home / "server.log"), "-w", "-t", "60",
                        "-o", f"-h 127.0.0.1 -p {port} -k {home} -c fsync=off -c max_connections=200", "start"],
                       check=True, capture_output=True)
        try:
            subprocess.run([*run, "createdb", "-h", "127.0.0.1", "-p", str(port), "-U", "airflow", "airflow"],
                           check=True, capture_output=True)
            yield f"postgresql+psycopg2://airflow@127.0.0.1:{port}/airflow"
        finally:
            subprocess.run([*run, "pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop"], capture_output=True)
    finally:
        shutil.rmtree(home, ignore_errors=True)


@contextlib.contextmanager
def redis(workdir: Path) -> Iterator[str]:
    """A Redis server with no persistence; yields its URL."""
    port = free_port()
    log = workdir / "redis.log"
    ping = ["redis-cli", "-p", str(port), "ping"]
    proc = start(["redis-server", "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                  "--dir", str(workdir), "--logfile", str(log)], workdir / "redis-stdout.log",
                 lambda: subprocess.run(ping, capture_output=True, text=True).stdout.strip() == "PONG", "redis-server",
                 timeout=30)
    try:
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        stop_group(proc)
