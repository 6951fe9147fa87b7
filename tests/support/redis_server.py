"""A private Redis server for tests of the production Prefect server configuration.

Production runs the Prefect server with the Redis messaging broker
(prefect-redis). Tests run the real `redis-server` from Debian's package on a
free loopback port in a temporary directory, so they never touch a system Redis
and leave nothing behind. Install it with `apt-get install redis-server`
(`scripts/test.sh` does); call :func:`redis_available` to skip with a reason
where it is missing.

Persistence is configured the way a production Redis for Prefect should be:
`appendonly yes` with `appendfsync everysec`. Every write (an event added to
the `events` stream, a consumer group's pending-entries list, a dedupe key) is
appended to a log that a restarted Redis replays, so a Redis restart keeps the
stream and its consumer groups; a Redis crash can lose at most the last second
of writes (the log is fsynced once a second), and a clean SHUTDOWN loses none.
Without it (RDB snapshots only, or no persistence) a Redis restart would drop
whatever events were in the stream but not yet written to PostgreSQL.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import redis

from support.emulators import free_port, stop_group

LOOPBACK = "127.0.0.1"
START_TIMEOUT = 30.0


def redis_server_binary() -> Path | None:
    """The `redis-server` executable, or None where it is not installed."""
    found = shutil.which("redis-server")
    return Path(found) if found else None


def redis_available() -> str | None:
    """None when a Redis server can be started here, else why not (a skip reason)."""
    if redis_server_binary() is None:
        return "redis-server is not installed (apt-get install redis-server)"
    return None


@dataclass(frozen=True)
class RedisServer:
    """A running Redis server on the loopback interface."""

    host: str
    port: int
    root: Path
    log_path: Path
    password: str | None = None

    def url(self, db: int = 0) -> str:
        """A `redis://` URL of database `db` (e.g. for PREFECT_SERVER_DOCKET_URL)."""
        return f"redis://{self.host}:{self.port}/{db}"

    def client(self, db: int = 0) -> redis.Redis:
        """A synchronous client, for tests that look at what Prefect wrote."""
        return redis.Redis(host=self.host, port=self.port, db=db, socket_timeout=10,
                           password=self.password)


def _wait_ready(server: RedisServer, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    client = server.client()
    try:
        while True:
            try:
                if client.ping():
                    return
            except redis.RedisError:
                pass
            if process.poll() is not None or time.monotonic() > deadline:
                tail = (server.log_path.read_text(errors="replace")[-2000:]
                        if server.log_path.exists() else "")
                raise RuntimeError(f"redis-server did not start on port {server.port}: {tail}")
            time.sleep(0.1)
    finally:
        client.close()


@contextlib.contextmanager
def redis_server(password: str | None = None) -> Iterator[RedisServer]:
    """Start `redis-server` with production-like persistence (and `requirepass` when a
    password is given, as k8s/base/redis.yaml does); stop it and remove its files."""
    binary = redis_server_binary()
    if binary is None:
        raise RuntimeError(redis_available() or "no redis-server")
    root = Path(tempfile.mkdtemp(prefix="taxi-redis-"))
    server = RedisServer(LOOPBACK, free_port(), root, root / "redis.log", password)
    auth = []
    if password:
        # From a config file, as in the manifests (never on the command line).
        (root / "auth.conf").write_text(f'requirepass "{password}"\n')
        (root / "auth.conf").chmod(0o600)
        auth = [str(root / "auth.conf")]
    process = subprocess.Popen(
        [str(binary), *auth, "--bind", LOOPBACK, "--port", str(server.port),
         "--dir", str(root), "--logfile", str(server.log_path), "--daemonize", "no",
         # Durable like production: see the module docstring for what a restart keeps.
         "--appendonly", "yes", "--appendfsync", "everysec"],
        stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        _wait_ready(server, process)
        yield server
    finally:
        # SIGTERM is Redis's clean shutdown (fsyncs the append-only file).
        stop_group(process, 20, signal.SIGTERM)
        shutil.rmtree(root, ignore_errors=True)
