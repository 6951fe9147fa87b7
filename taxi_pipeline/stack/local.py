"""Start and stop what the local profile needs: Prefect server, worker, bridge.

Used by `taxi-pipeline up|demo` and by the end-to-end tests, so the tests run
the same processes a user does. Every child runs in its own process group and
is stopped by group (SIGTERM, then SIGINT, then SIGKILL), because a
`prefect worker` may ignore the first SIGTERM and leave flow-run children.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import httpx
import psutil

from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.prefect_database import EmbeddedPostgres, sqlite_url

DEFAULT_UI_PORT = 4200
# What the fork server imports once, so that flow runs start warm.
# pandas too: pyarrow imports it lazily on the first datetime scalar (every transform
# makes one), which cost a forked run ~0.1 s of CPU in a profile of a burst.
# DuckDB too: the load imports the warehouse lazily (the GCP profile never needs it),
# which was ~6% of a forked run's CPU.
WARM_PRELOAD = ("flows.transform", "flows.load", "flows.recover", "flows.reconcile",
                "flows.download", "pandas", "taxi_pipeline.warehouse.duckdb_warehouse")


def plain_http_api_env(api_url: str, run_dir: Path) -> dict[str, str]:
    """Settings that spare clients of a plain-HTTP Prefect API a useless TLS set-up.

    Every Prefect API client builds a TLS context from `PREFECT_API_SSL_CERT_FILE`
    (default: certifi's whole bundle, ~20 ms to parse) even for an http:// URL,
    where it is never used; a flow run builds about seven. For an http:// API
    this points the setting at a one-certificate file, which is as unused and
    parses in well under a millisecond. An https:// API keeps the defaults.
    """
    if not api_url.startswith("http://"):
        return {}
    import certifi

    bundle = Path(certifi.where()).read_text()
    end = "-----END CERTIFICATE-----"
    first = bundle[bundle.index("-----BEGIN CERTIFICATE-----"):bundle.index(end) + len(end)]
    path = run_dir / "plain-http-api-ca.pem"
    if not path.exists() or path.read_text() != first + "\n":
        run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(first + "\n")
    return {"PREFECT_API_SSL_CERT_FILE": str(path)}


def free_port(preferred: int | None = None) -> int:
    """`preferred` if nothing listens there, else any free loopback port.

    The probe binds with SO_REUSEADDR, as uvicorn and the bridge do: without it, a
    port whose last connections are still in TIME_WAIT (the UI's 4200 for a minute
    after the previous `up` stopped) looked taken, and `up` moved to a random port.
    """
    if preferred:
        with socket.socket() as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", preferred))
                return preferred
            except OSError:
                pass
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_healthy(api_url: str, timeout: float, process: subprocess.Popen[bytes] | None = None,
                 log_path: Path | None = None) -> None:
    """Poll `/health` until the server answers; fail with its log tail if it dies or stalls."""
    deadline = time.monotonic() + timeout
    port = port_of(api_url)
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            break
        try:
            healthy = httpx.get(f"{api_url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            healthy = False
        # Another server that took the port first (a second `up` started at the
        # same moment) answers too: only our own process listening counts.
        if healthy and (process is None or listens_on(process.pid, port)):
            return
        time.sleep(0.5)
    tail = ""
    if log_path and log_path.exists():
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
    raise RuntimeError(
        f"the Prefect server at {api_url} did not become healthy within {timeout:.0f}s. "
        f"Last lines of its log ({log_path}):\n{tail}"
    )


def own_server_client_env(env: dict[str, str]) -> dict[str, str]:
    """Client settings that skip two handshakes with a server this stack started itself.

    Every flow-run process asks such a server its version (twice: Prefect's HTTP and
    websocket clients key their once-per-process cache differently) and, in each new
    client, for a CSRF token the server then refuses, CSRF protection being off by
    default. That was 4 of about 21 API requests per run in a burst (traced). The
    server is this very installation of Prefect, so the version check cannot fail;
    the CSRF exchange is skipped only while nothing can turn the server's protection
    on (no such variable, no profile chosen: the stack's PREFECT_HOME is its own).
    A value the user set in the environment is kept.
    """
    found = {"PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED":
             env.get("PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED", "false")}
    may_protect = any("CSRF_PROTECTION_ENABLED" in key or key.startswith("PREFECT_PROFILE")
                      for key in env if key.startswith("PREFECT_"))
    if not may_protect:
        found["PREFECT_CLIENT_CSRF_SUPPORT_ENABLED"] = env.get(
            "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED", "false")
    return found


def lost_port_race(log_path: Path, start: int, port: int) -> bool:
    """Whether the server log written from byte `start` says `port` was already taken.

    Two messages say so: Prefect's own check before it starts, and uvicorn's bind
    after the app is built (seconds later, hence the race).
    """
    try:
        with log_path.open("rb") as log:
            log.seek(start)
            text = log.read().decode(errors="replace")
    except OSError:
        return False
    return (f"Port {port} is already in use" in text
            or re.search(rf"bind on address \(.*, {port}\): address already in use",
                         text) is not None)


def port_of(api_url: str) -> int:
    """The port of an API URL such as http://127.0.0.1:4200/api."""
    return int(api_url.rsplit(":", 1)[1].split("/")[0])


def listens_on(pid: int, port: int) -> bool:
    """Whether process `pid` (or one of its children) listens on TCP `port`."""
    try:
        root = psutil.Process(pid)
        family = [root, *root.children(recursive=True)]
    except psutil.Error:
        return False
    for process in family:
        try:
            if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
                   for c in process.net_connections(kind="tcp")):
                return True
        except psutil.Error:
            continue
    return False


@dataclass
class ManagedProcess:
    name: str
    process: subprocess.Popen[bytes]
    log_path: Path
    argv: list[str] = field(default_factory=list)
    log_start: int = 0  # where this process's lines begin in its (appended) log

    def log_since_start(self) -> str:
        """What this process wrote to its log (not its predecessors)."""
        try:
            with self.log_path.open("rb") as log:
                log.seek(self.log_start)
                return log.read().decode(errors="replace")
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.process.poll() is None

    def _signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.process.pid, sig)

    def stop(self, grace: float = 15.0) -> None:
        """SIGTERM, then SIGINT, then SIGKILL of the whole process group."""
        for sig, wait in ((signal.SIGTERM, grace), (signal.SIGINT, 5.0)):
            if not self.alive():
                break
            self._signal_group(sig)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(timeout=wait)
        # Kill leftovers of the group (flow-run children) even when the leader exited.
        self._signal_group(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=5)


# The parts with a port of their own: (LocalStack attribute, variable, setting).
MOVABLE_PORTS = {"bridge": ("bridge_port", "TAXI_BRIDGE_PORT", "bridge_port"),
                 "exporter": ("exporter_port", "TAXI_MONITOR_PORT", "monitor_port")}


@dataclass
class LocalStack:
    """The processes of the local profile, as a context manager."""

    settings: Settings
    api_url: str | None = None
    start_bridge: bool = True
    start_worker: bool = True
    ui: bool = True
    env: dict[str, str] = field(default_factory=dict)
    bridge_port: int | None = None
    start_exporter: bool = True
    exporter_port: int | None = None
    processes: list[ManagedProcess] = field(default_factory=list)
    database: EmbeddedPostgres | None = None
    # Told each step of stop() as it happens (`up` prints them); None: quiet.
    on_stop: Callable[[str], None] | None = None

    @property
    def api_url_file(self) -> Path:
        """Where `reemit`/`status` find the server `up` started (removed on stop)."""
        return self.settings.home / "api-url"

    @property
    def log_dir(self) -> Path:
        return self.settings.home / "logs"

    def log_path(self, name: str) -> Path:
        """Where the process (or step) `name` writes its log."""
        return self.log_dir / f"{name}.log"

    @property
    def owns_server(self) -> bool:
        """Whether the server is one this stack runs (this installation of Prefect)."""
        return any(managed.name == "prefect-server" for managed in self.processes)

    def child_env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Children must see the same settings, including those set in code (tests).
        for name in self.settings.model_fields_set | {"profile", "home", "bucket", "work_pool"}:
            value = getattr(self.settings, name)
            if value is not None:
                env[f"TAXI_{name.upper()}"] = str(value)
        env.update(
            {
                "PREFECT_WORKER_QUERY_SECONDS": env.get("PREFECT_WORKER_QUERY_SECONDS", "1"),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_LOGGING_LEVEL": env.get("PREFECT_LOGGING_LEVEL", "INFO"),
                "PYTHONUNBUFFERED": "1",
            }
        )
        if self.api_url:
            env["PREFECT_API_URL"] = self.api_url
            env.update(plain_http_api_env(self.api_url, self.settings.home / "run"))
        if self.owns_server:
            env.update(own_server_client_env(env))
        env.update(self.env)
        return env

    def spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        """Start `name`; one that replaces a dead process of that name takes its place
        in the list, so the stop order stays the start order."""
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.log_path(name)
        with log_path.open("ab") as log:
            start = log.tell()
            process = subprocess.Popen(
                argv,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=self.child_env(),
                start_new_session=True,
            )
        managed = ManagedProcess(name, process, log_path, list(argv), start)
        for index, old in enumerate(self.processes):
            if old.name == name and not old.alive():
                self.processes[index] = managed
                break
        else:
            self.processes.append(managed)
        return managed

    def start_server(self) -> str:
        prefect_home = self.settings.home / "prefect"
        prefect_home.mkdir(parents=True, exist_ok=True)
        port = free_port(DEFAULT_UI_PORT if self.ui else None)
        api_url = f"http://127.0.0.1:{port}/api"
        if self.settings.prefect_database == "postgres":
            self.database = EmbeddedPostgres(prefect_home / "postgres",
                                             self.settings.postgres_system_user)
            database_url = self.database.start()
            # The default pool (5 + 10 overflow) runs dry under a burst of runs and
            # events ("QueuePool limit ... reached" -> 500s); PostgreSQL allows 100.
            self.env.setdefault("PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE", "20")
            self.env.setdefault("PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW", "30")
        else:
            database_url = sqlite_url(prefect_home)
        self.env.update(
            {
                "PREFECT_HOME": str(prefect_home),
                "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
                "PREFECT_UI_ENABLED": "true" if self.ui else "false",
                "PREFECT_UI_API_URL": api_url,
            }
        )
        self.api_url = api_url
        self._start_server_on(port)
        self.api_url_file.write_text(self.api_url)
        return self.api_url

    def _start_server_on(self, port: int) -> None:
        """Start the server on `port`, or on a free port if it loses that one at bind."""
        try:
            self._spawn_server(port)
        except RuntimeError:
            failed = self.process("prefect-server")
            if not lost_port_race(failed.log_path, failed.log_start, port):
                raise
            # The port was taken between our check and the server's bind (another
            # `up` starting at the same moment wanting 4200, or anything taking the
            # free port we picked): any free port will do. The server's own log
            # decides, not a second look at the port: the other holder may be gone
            # by then (a stack stopping), which is how CI lost it.
            failed.stop(grace=5.0)
            port = free_port(None)
            self.api_url = f"http://127.0.0.1:{port}/api"
            self.env["PREFECT_UI_API_URL"] = self.api_url
            self._spawn_server(port)

    def server_argv(self, port: int) -> list[str]:
        return [sys.executable, "-m", "taxi_pipeline.stack.prefect_server_start",
                "--host", "127.0.0.1", "--port", str(port)]

    def _spawn_server(self, port: int) -> None:
        server = self.spawn("prefect-server", self.server_argv(port))
        assert self.api_url is not None
        wait_healthy(self.api_url, 120, server.process, server.log_path)

    def restart_part(self, name: str) -> list[str]:
        """Start the dead part `name` again, and whatever cannot reconnect to it; returns
        what was restarted, in order. Raises RuntimeError when it does not come up.

        PostgreSQL: the server too (its pool and services hold dead connections, and the
        socket may move). The server: on the same port, so worker, bridge and flow runs
        reconnect by themselves (their clients retry); only a port lost meanwhile moves
        it, and then they restart too, to learn the new URL. The bridge: on its port,
        unless its log says another process took it (a second `up` starting at the
        same moment) and the port was not chosen explicitly: then on a free one.
        """
        if name == "postgres":
            assert self.database is not None
            url = self.database.restart()
            self.env["PREFECT_API_DATABASE_CONNECTION_URL"] = url
            server = self.process("prefect-server")
            server.stop(grace=10.0)
            return ["postgres", *self.restart_part("prefect-server")]
        if name == "prefect-server":
            assert self.api_url is not None
            before = self.api_url
            self._start_server_on(port_of(self.api_url))
            self.api_url_file.write_text(self.api_url)
            if self.api_url == before:
                return ["prefect-server"]
            moved = [m.name for m in self.processes if m.name != "prefect-server"]
            for other in moved:
                self.process(other).stop(grace=10.0)
                self.restart_part(other)
            return ["prefect-server", *moved]
        old = self.process(name)
        if name == "flow-runs":
            self.fork_server_socket.unlink(missing_ok=True)
            self.wait_fork_server(self.spawn(name, old.argv))
            return [name]
        self._move_if_port_lost(old)
        self.spawn(name, old.argv)
        return [name]

    def _move_if_port_lost(self, old: ManagedProcess) -> None:
        """A part whose log says another process took its port at bind (a second `up`
        starting at the same moment) moves to a free one, unless the user chose it."""
        if old.name not in MOVABLE_PORTS:
            return
        attribute, variable, setting = MOVABLE_PORTS[old.name]
        port = getattr(self, attribute)
        chosen = setting in self.settings.model_fields_set or variable in os.environ
        if port is None or chosen or not lost_its_port(old, port):
            return
        setattr(self, attribute, free_port(None))
        self.env[variable] = str(getattr(self, attribute))

    def port_of_part(self, name: str) -> int | None:
        """The port `name` serves on, for the parts that have one."""
        if name not in MOVABLE_PORTS:
            return None
        value = getattr(self, MOVABLE_PORTS[name][0])
        return int(value) if value is not None else None

    def restart_server(self, kill: bool = False) -> None:
        """Stop (or SIGKILL) the server we started and start it again on the same port.

        For outage tests: the database (and so every stored event and run) survives;
        whatever the server held only in memory does not.
        """
        server = self.process("prefect-server")
        if kill:
            server._signal_group(signal.SIGKILL)
            server.process.wait(timeout=30)
        else:
            server.stop()
        self.processes.remove(server)
        assert self.api_url is not None
        port = port_of(self.api_url)
        self._spawn_server(port)

    def deploy(self) -> None:
        """Register deployments and automations (`python -m deploy`) against the server."""
        log_path = self.log_path("deploy")
        self.log_dir.mkdir(parents=True, exist_ok=True)
        with log_path.open("ab") as log:
            result = subprocess.run(
                [sys.executable, "-m", "deploy"], env=self.child_env(), stdout=log,
                stderr=subprocess.STDOUT, timeout=300, check=False,
            )
        if result.returncode != 0:
            tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-30:])
            raise RuntimeError(f"registering deployments failed (see {log_path}):\n{tail}")

    def start(self) -> LocalStack:
        self.settings.home.mkdir(parents=True, exist_ok=True)
        if self.settings.profile == "local":
            self.settings.bucket_dir.mkdir(parents=True, exist_ok=True)
        if self.api_url is None:
            self.api_url = os.environ.get("PREFECT_API_URL") or None
        if self.api_url:
            wait_healthy(self.api_url, 30)
        else:
            self.start_server()
        fork_server = self.start_fork_server() if self.start_worker else None
        self.deploy()
        if fork_server is not None:
            self.wait_fork_server(fork_server)
        if self.start_worker:
            self.spawn(
                "worker",
                [sys.executable, "-m", "taxi_pipeline.stack.prefect_worker_start", "--pool",
                 self.settings.work_pool, "--type", "process",
                 "--limit", str(self.settings.worker_limit)],
            )
        if self.start_bridge:
            if self.bridge_port is None:
                self.bridge_port = bridge_port(self.settings, prefer_default=self.ui)
            self.env["TAXI_BRIDGE_PORT"] = str(self.bridge_port)
            self.spawn("bridge", [sys.executable, "-m", "pubsub_bridge"])
        if self.start_exporter:  # pipeline metrics (docs/monitoring.md)
            if self.exporter_port is None:
                self.exporter_port = exporter_port(self.settings, prefer_default=self.ui)
            self.env["TAXI_MONITOR_PORT"] = str(self.exporter_port)
            self.spawn("exporter", [sys.executable, "-m", "taxi_pipeline.monitoring"])
        return self

    @property
    def fork_server_socket(self) -> Path:
        """Unix socket paths are limited to ~107 bytes: fall back to a short one in /tmp."""
        path = self.settings.home / "run" / "flow-runs.sock"
        if len(str(path)) > 100:
            digest = hashlib.sha1(str(self.settings.home).encode()).hexdigest()[:12]
            path = Path(tempfile.gettempdir()) / f"taxi-pipeline-{digest}.sock"
        return path

    def start_fork_server(self) -> ManagedProcess | None:
        """The warm fork server for flow runs (see taxi_pipeline/stack/warm_runs.py), if enabled."""
        if not self.settings.warm_runs:
            return None
        from taxi_pipeline.stack.warm_runs import server_argv

        socket_path = self.fork_server_socket
        socket_path.parent.mkdir(parents=True, exist_ok=True)
        socket_path.unlink(missing_ok=True)
        self.env["TAXI_WARM_RUNS_SOCKET"] = str(socket_path)
        return self.spawn("flow-runs", server_argv(socket_path, WARM_PRELOAD))

    def wait_fork_server(self, managed: ManagedProcess, timeout: float = 120) -> None:
        """Until the fork server listens; a server that dies only costs warm starts."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and managed.alive():
            if self.fork_server_socket.exists():
                return
            time.sleep(0.1)
        print(f"warning: the flow-run fork server is not listening (see {managed.log_path}); "
              "flow runs start cold", file=sys.stderr)

    def process(self, name: str) -> ManagedProcess:
        for managed in self.processes:
            if managed.name == name:
                return managed
        raise KeyError(name)

    def descendants(self) -> list[psutil.Process]:
        """Every live process below the ones we started (flow runs start their own sessions)."""
        found: list[psutil.Process] = []
        for managed in self.processes:
            with contextlib.suppress(psutil.Error):
                found += psutil.Process(managed.process.pid).children(recursive=True)
        return found

    def stop(self) -> None:
        """Bridge and worker first (they talk to the server), then flow runs, the server last.

        Flow-run processes may sit in sessions of their own, out of reach of a
        process-group signal, so they are found by ancestry before anything stops
        and killed if still alive; their runs are marked Crashed while the server
        is still up, so the database does not keep them Running forever. Each step
        is announced through `on_stop` (`up` prints them) and a step that fails is
        reported and passed: the steps after it still run, so nothing is left behind.
        """
        orphans: list[psutil.Process] = []
        run_ids: dict[int, str] = {}
        server = None
        for managed in reversed(self.processes):
            if managed.name == "prefect-server":
                server = managed
                continue

            def stop_one(managed: ManagedProcess = managed) -> None:
                orphans.extend(self.descendants())  # again before each: runs may have started
                run_ids.update(flow_run_ids(orphans))
                managed.stop()

            self._stop_step(managed.name, stop_one)
        survivors: list[int] = []
        if orphans:
            self._stop_step("flow runs still running",
                            lambda: survivors.extend(kill_all(orphans)))
        if run_ids and self.api_url:
            api_url = self.api_url
            self._stop_step(f"{len(run_ids)} interrupted flow run(s): marking them Crashed",
                            lambda: mark_crashed(api_url, run_ids, survivors))
        if server is not None:
            self.api_url_file.unlink(missing_ok=True)

            def stop_server(server: ManagedProcess = server) -> None:
                server.stop()
                kill_all(orphans)

            self._stop_step("prefect-server", stop_server)
        if self.database is not None:
            self._stop_step("postgres", self.database.stop)
            self.database = None
        self.processes.clear()

    def _stop_step(self, what: str, step: Callable[[], None]) -> None:
        began = time.monotonic()
        if self.on_stop is not None:
            self.on_stop(f"stopping {what}...")
        try:
            step()
        except Exception as exc:
            if self.on_stop is not None:
                self.on_stop(f"stopping {what} failed ({type(exc).__name__}: {exc}); going on")
            return
        if self.on_stop is not None:
            self.on_stop(f"stopped {what} ({time.monotonic() - began:.1f}s)")

    def __enter__(self) -> LocalStack:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def bridge_port_explicit(settings: Settings) -> bool:
    """Whether the user chose the bridge's port (then it is never moved)."""
    return "bridge_port" in settings.model_fields_set or "TAXI_BRIDGE_PORT" in os.environ


def bridge_port(settings: Settings, prefer_default: bool) -> int:
    """An explicit TAXI_BRIDGE_PORT as is (the bridge fails loudly if it is taken);
    otherwise the default port when free and wanted (`up`), else any free port
    (demo, tests, stacks side by side)."""
    if bridge_port_explicit(settings):
        return settings.bridge_port
    return free_port(settings.bridge_port if prefer_default else None)


def exporter_port(settings: Settings, prefer_default: bool) -> int:
    """TAXI_MONITOR_PORT when set; else its default if free (for `up`), or any free port."""
    if "monitor_port" in settings.model_fields_set or "TAXI_MONITOR_PORT" in os.environ:
        return settings.monitor_port
    return free_port(settings.monitor_port if prefer_default else None)


def lost_its_port(part: ManagedProcess, port: int) -> bool:
    """Whether a part's log since its start says its port was taken at bind (the bridge
    and the exporter both say `... port N is already in use`)."""
    return f"port {port} is already in use" in part.log_since_start()


def flow_run_ids(processes: list[psutil.Process]) -> dict[int, str]:
    """pid -> flow run id, for processes running a flow run (the engine reads it from env)."""
    found: dict[int, str] = {}
    for process in processes:
        with contextlib.suppress(psutil.Error):
            run_id = process.environ().get("PREFECT__FLOW_RUN_ID")
            if run_id:
                found[process.pid] = run_id
    return found


def kill_all(processes: list[psutil.Process], grace: float = 5.0) -> list[int]:
    """SIGTERM what is still alive, SIGKILL what ignores it; returns pids that had to be killed."""
    alive = [p for p in processes if p.is_running()]
    for process in alive:
        with contextlib.suppress(psutil.Error):
            process.terminate()
    _, stubborn = psutil.wait_procs(alive, timeout=grace)
    for process in stubborn:
        with contextlib.suppress(psutil.Error):
            process.kill()
    psutil.wait_procs(stubborn, timeout=grace)
    return [p.pid for p in alive]


def mark_crashed(api_url: str, run_ids: dict[int, str], killed: list[int]) -> None:
    """Crash the runs whose processes were stopped, unless they already reached a final state."""
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings
    from prefect.states import Crashed

    async def _mark() -> None:
        async with get_client() as client:
            for pid, run_id in run_ids.items():
                with contextlib.suppress(Exception):
                    run = await client.read_flow_run(run_id)  # type: ignore[arg-type]
                    if run.state is None or run.state.is_final():
                        continue
                    why = "killed" if pid in killed else "gone"
                    await client.set_flow_run_state(
                        run.id, Crashed(message=f"taxi-pipeline stopped the stack; the run's "
                                                f"process (pid {pid}) was {why}"), force=True)

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        try:
            asyncio.run(asyncio.wait_for(_mark(), timeout=20))
        except Exception as exc:  # the server may already be unreachable
            print(f"could not mark {len(run_ids)} interrupted flow run(s) Crashed: {exc}",
                  file=sys.stderr)
