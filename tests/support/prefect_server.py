"""A private PostgreSQL cluster and a Prefect server on it, for integration tests.

PostgreSQL runs from the Debian packages' binaries in a temporary directory on
a free loopback port (as the `postgres` user when the tests run as root), so
tests never touch a system cluster. The Prefect server can be stopped, killed
and started again on the same port and database, for outage tests.
"""

from __future__ import annotations

import contextlib
import glob
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path

from support.emulators import free_port, stop_group
from taxi_pipeline.stack.local import wait_healthy


def postgres_bin() -> Path | None:
    found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"))
    return Path(found[-1]).parent if found else None


def postgres_available() -> str | None:
    """None when a PostgreSQL server can be started here, else why not."""
    if postgres_bin() is None:
        return "PostgreSQL server binaries are not installed (apt-get install postgresql)"
    return None


def _as_postgres(argv: list[str]) -> list[str]:
    if os.geteuid() == 0:
        return ["runuser", "-u", "postgres", "--", *argv]
    return argv


@contextlib.contextmanager
def postgres_database(name: str = "prefect") -> Iterator[str]:
    """Yield an asyncpg SQLAlchemy URL of a fresh database; remove everything afterwards."""
    bindir = postgres_bin()
    if bindir is None:
        raise RuntimeError(postgres_available() or "no PostgreSQL")
    root = Path(tempfile.mkdtemp(prefix="taxi-pg-"))
    data = root / "data"
    if os.geteuid() == 0:
        shutil.chown(root, "postgres", "postgres")
        os.chmod(root, 0o755)
    subprocess.run(_as_postgres([str(bindir / "initdb"), "-D", str(data), "-A", "trust",
                                 "-U", "postgres", "--no-sync"]),
                   check=True, capture_output=True)
    port = free_port()
    log = (root / "postgres.log").open("wb")
    process = subprocess.Popen(
        _as_postgres([str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                      "-k", str(root), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off",
                      "-c", "max_connections=200"]),
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            ready = subprocess.run([str(bindir / "pg_isready"), "-h", "127.0.0.1", "-p",
                                    str(port)], capture_output=True)
            if ready.returncode == 0:
                break
            if process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("PostgreSQL did not start: "
                                   + (root / "postgres.log").read_text(errors="replace")[-2000:])
            time.sleep(0.2)
        subprocess.run(_as_postgres([str(bindir / "createdb"), "-h", "127.0.0.1", "-p", str(port),
                                     "-U", "postgres", name]), check=True, capture_output=True)
        yield f"postgresql+asyncpg://postgres@127.0.0.1:{port}/{name}"
    finally:
        stop_group(process, 30, signal.SIGINT)  # SIGINT = fast shutdown
        log.close()
        shutil.rmtree(root, ignore_errors=True)


class PrefectServer:
    """`prefect server start` on a fixed port; stop, kill and start again at will."""

    def __init__(self, database_url: str, home: Path, port: int | None = None,
                 extra_env: Mapping[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.database_url = database_url
        self.home = home
        self.port = port or free_port()
        # Applied last, e.g. the production server's settings (Redis broker, auth).
        self.extra_env = dict(extra_env or {})
        # More `prefect server start` options, e.g. the manifests' --no-services.
        self.extra_args = list(extra_args or [])
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def api_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api"

    def env(self) -> dict[str, str]:
        return {
            **os.environ,
            "PREFECT_HOME": str(self.home),
            "PREFECT_API_DATABASE_CONNECTION_URL": self.database_url,
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_UI_ENABLED": "false",
            "PREFECT_API_URL": self.api_url,
            **self.extra_env,
        }

    def start(self, timeout: float = 120) -> PrefectServer:
        self.home.mkdir(parents=True, exist_ok=True)
        log = (self.home / "server.log").open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "taxi_pipeline.stack.prefect_server_start",
             "--host", "127.0.0.1", "--port", str(self.port), *self.extra_args],
            env=self.env(), stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        try:
            wait_healthy(self.api_url, timeout, self.process, self.home / "server.log")
        except RuntimeError:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, 20)
            self.process = None

    def kill(self) -> None:
        """SIGKILL: whatever the server holds in memory is lost."""
        if self.process is not None:
            stop_group(self.process, 10, signal.SIGKILL)
            self.process = None
