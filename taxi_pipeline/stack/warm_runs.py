"""A fork server for flow runs: start every local-profile run from a warm, pre-imported process.

A process worker normally starts each flow run as `python -m prefect.engine`:
~3 s of CPU importing Prefect and the flow modules before the run does
anything. The pipeline runs two flow runs per file, so a burst of files is
mostly interpreter start-up. Here one long-lived process imports Prefect, the
engine and the flow modules once (`serve`), and the work pool's `command` is a
tiny stdlib-only launcher (`warm_runs_launch.py`) that asks this server to
fork a child for the run. The child takes over the launcher's environment,
working directory and stdio, rebuilds Prefect's settings and logging from that
environment when they differ from the server's, executes `prefect/engine.py`
as `__main__` (so Prefect's own entry point runs, not a copy of it), and exits
with its exit code, which the server reports back to the launcher, which exits
with it. Signals the worker sends to the launcher (cancellation) are forwarded
to the child; a launcher that dies takes its child with it, and so does the
server (PR_SET_PDEATHSIG).

Fork safety: the server never starts a thread or an event loop; it checks
that before each fork and sends the launcher back to a cold start otherwise.

    python -m taxi_pipeline.stack.warm_runs serve --socket PATH --preload flows.transform flows.load
    python -m taxi_pipeline.stack.warm_runs run --socket PATH      # the launcher, heavier entry
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import gc
import importlib
import importlib.util
import os
import resource
import selectors
import shlex
import signal
import socket
import sys
import threading
import time
import traceback
import types
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.abc import InspectLoader
from importlib.machinery import ModuleSpec
from pathlib import Path
from types import CodeType, FrameType
from typing import Any, NoReturn

from taxi_pipeline.stack import warm_runs_launch
from taxi_pipeline.stack.warm_runs_launch import MAGIC, decode_request

LAUNCHER_PATH = Path(warm_runs_launch.__file__).resolve()

# What `python -m prefect.engine` imports before and while it runs a flow (measured on
# a trivial flow run), so that a child imports next to nothing.
ENGINE_MODULES = (
    "prefect",
    "prefect.engine",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.flows",
    "prefect.tasks",
    "prefect.client.orchestration",
    "prefect.logging.handlers",
    "prefect.results",
    "prefect._internal.metrics",
    "prefect._internal.control_listener",
    "anyio._backends._asyncio",
    "anyio.streams.memory",
    "anyio.streams.stapled",
    "anyio.streams.tls",
    "encodings.idna",
    "rich._emoji_codes",
)

MAX_REQUEST_BYTES = 16 * 2**20
_SERVER_SIGNALS = {signal.SIGCHLD, signal.SIGTERM, signal.SIGINT}
STOP_GRACE_SECONDS = 5.0
_PR_SET_PDEATHSIG = 1


def complete_pydantic_models() -> int:
    """Build now the schemas of pydantic models that defer it to their first use.

    Prefect declares many of its API models with forward references, so pydantic
    builds their validators on first use; in a forked run that first use is in
    every child (read_flow_run, read_deployment, events, logs: ~6% of a run's CPU in
    a burst profile). Built once here, every child inherits them. A model that
    still cannot be built is left as it was (its first use tries again, as before).
    Returns how many were built.
    """
    import pydantic

    built = 0
    pending: list[type[pydantic.BaseModel]] = [pydantic.BaseModel]
    seen: set[type[pydantic.BaseModel]] = set()
    while pending:
        cls = pending.pop()
        for sub in cls.__subclasses__():
            if sub in seen:
                continue
            seen.add(sub)
            pending.append(sub)
            if getattr(sub, "__pydantic_complete__", True) or "[" in sub.__name__:
                continue  # complete, or a parametrised generic (built where it is used)
            with contextlib.suppress(Exception):
                built += bool(sub.model_rebuild(raise_errors=False))
    return built


def launcher_command(socket_path: Path) -> str:
    """The work pool `command`: the stdlib-only launcher, without `site` (~10 ms start-up)."""
    return shlex.join([sys.executable, "-I", "-S", str(LAUNCHER_PATH), "--socket",
                       str(socket_path)])


def process_pool_template(socket_path: Path) -> dict[str, Any]:
    """Prefect's default process work pool template with the launcher as default command."""
    from prefect.workers.process import ProcessWorker

    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = launcher_command(socket_path)
    return template


def server_argv(socket_path: Path, preload: list[str] | tuple[str, ...] = (),
                max_children: int = 0) -> list[str]:
    """argv that starts the fork server (run it with the environment the worker has)."""
    argv = [sys.executable, "-m", "taxi_pipeline.stack.warm_runs", "serve", "--socket",
            str(socket_path), "--max-children", str(max_children)]
    return [*argv, "--preload", *preload] if preload else argv


def _log(message: str) -> None:
    now = time.time()
    stamp = time.strftime("%H:%M:%S", time.localtime(now)) + f".{int(now % 1 * 1000):03d}"
    print(f"{stamp} | warm-runs: {message}", file=sys.stderr, flush=True)


def _native_threads() -> list[str]:
    """Names of this process's OS threads, the main one first (Linux; [] elsewhere)."""
    try:
        tasks = sorted(os.listdir("/proc/self/task"), key=lambda tid: tid != str(os.getpid()))
        return [Path("/proc/self/task", tid, "comm").read_text().strip() for tid in tasks]
    except OSError:
        return []


def _exit_code(code: object) -> int:
    """The process exit status `raise SystemExit(code)` gives a normal interpreter."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    with contextlib.suppress(Exception):
        print(code, file=sys.stderr)
    return 1


@dataclass(eq=False)
class Connection:
    """One launcher: its request while it arrives, then its queued or running child."""

    sock: socket.socket
    buffer: bytearray = field(default_factory=bytearray)
    fds: list[int] = field(default_factory=list)
    body_size: int | None = None
    request: tuple[bytes, list[bytes], dict[bytes, bytes]] | None = None
    pid: int | None = None

    def send(self, line: bytes) -> None:
        with contextlib.suppress(OSError):
            self.sock.send(line)

    def close_fds(self) -> None:
        for fd in self.fds:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.fds.clear()


class ForkServer:
    """Single-threaded selector loop: accept launchers, fork children, reap them, report."""

    def __init__(self, socket_path: Path, max_children: int = 0,
                 drain_seconds: float = 30.0) -> None:
        self.socket_path = socket_path
        self.max_children = max_children
        self.drain_seconds = drain_seconds
        self.selector = selectors.DefaultSelector()
        self.listener: socket.socket | None = None
        self.connections: set[Connection] = set()
        self.children: dict[int, Connection | None] = {}
        self.queue: list[Connection] = []
        self.started = 0
        self.stop_requests = 0
        self._drain_deadline = 0.0
        self._terminated_at: float | None = None
        self._wakeup_r, self._wakeup_w = os.pipe()
        self._nofile = resource.getrlimit(resource.RLIMIT_NOFILE)
        self._libc: Any = None
        self._engine: tuple[CodeType, ModuleSpec] | None = None
        self._settings_fingerprint: tuple[object, ...] = ()
        self._profiles_path = Path()

    # -- setup ------------------------------------------------------------------

    def preload(self, modules: list[str]) -> None:
        """Import Prefect's engine and the given modules by name, then freeze them for fork."""
        for name in (*ENGINE_MODULES, *modules):
            try:
                importlib.import_module(name)
            except Exception as exc:  # a broken flow module must not stop warm runs of others
                _log(f"could not preload {name}: {type(exc).__name__}: {exc}; "
                     "its runs will import it themselves")
        complete_pydantic_models()
        with contextlib.suppress(OSError):
            self._libc = ctypes.CDLL(None, use_errno=True)
        self._engine = engine_main_code()
        self._settings_fingerprint, self._profiles_path = current_settings_fingerprint()
        if threading.active_count() != 1:
            raise RuntimeError("preloading started threads, so forking would be unsafe: "
                               f"{[t.name for t in threading.enumerate()]}")
        # Native libraries may start threads of their own (numpy's OpenBLAS pool, pyarrow's
        # jemalloc purger); they hold no Python state and register pthread_atfork handlers
        # (multiprocessing's fork start method relies on that too). Say which ones run.
        native = _native_threads()
        if len(native) > 1:
            _log(f"native threads besides the main one: {', '.join(native[1:])}")
        # Objects that exist now live as long as the server: keep the collector off them,
        # so children neither scan nor copy-on-write their pages.
        gc.collect()
        gc.freeze()

    def bind(self) -> None:
        path = str(self.socket_path)
        if self.socket_path.exists():
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
                try:
                    probe.connect(path)
                except OSError:
                    self.socket_path.unlink()  # stale socket of a dead server
                else:
                    raise RuntimeError(f"a fork server already listens on {path}")
        self.socket_path.parent.mkdir(parents=True, exist_ok=True)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        os.chmod(path, 0o600)
        listener.listen(1024)
        listener.setblocking(False)
        self.listener = listener
        self.selector.register(listener, selectors.EVENT_READ)
        # Every queued launcher holds 4 fds here: allow thousands.
        _soft, hard = self._nofile
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    # -- loop -------------------------------------------------------------------

    def serve_forever(self) -> None:
        os.set_blocking(self._wakeup_r, False)
        os.set_blocking(self._wakeup_w, False)
        self.selector.register(self._wakeup_r, selectors.EVENT_READ)
        signal.set_wakeup_fd(self._wakeup_w, warn_on_full_buffer=False)
        signal.signal(signal.SIGCHLD, self._on_signal)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGINT, self._on_signal)
        _log(f"serving on {self.socket_path} (pid {os.getpid()})")
        try:
            while not (self.stop_requests and not self.children):
                for key, _ in self.selector.select(timeout=1.0):
                    if key.fileobj is self.listener:
                        self._accept()
                    elif key.fileobj == self._wakeup_r:
                        with contextlib.suppress(OSError):
                            os.read(self._wakeup_r, 4096)
                    else:
                        self._readable(key.data)
                self._reap()
                self._start_queued()
                self._handle_stop()
        finally:
            self._shutdown()

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if signum != signal.SIGCHLD:
            self.stop_requests += 1

    def _accept(self) -> None:
        assert self.listener is not None
        for _ in range(64):
            try:
                sock, _addr = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. EMFILE: leave it in the backlog for later
                _log(f"accept failed: {exc}")
                return
            sock.setblocking(False)
            conn = Connection(sock)
            self.connections.add(conn)
            self.selector.register(sock, selectors.EVENT_READ, conn)

    def _readable(self, conn: Connection) -> None:
        if conn not in self.connections:
            return
        try:
            data, fds, flags, _ = socket.recv_fds(conn.sock, 65536, 8)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data, fds, flags = b"", [], 0
        conn.fds.extend(fds)
        if flags & socket.MSG_CTRUNC:
            _log("a launcher sent more fds than expected; dropping it")
            self._drop(conn)
            return
        if not data:
            self._launcher_gone(conn)
            return
        conn.buffer += data
        if conn.request is None:
            self._parse_request(conn)
        if conn.request is not None:
            self._parse_signals(conn)

    def _parse_request(self, conn: Connection) -> None:
        if conn.body_size is None:
            end = conn.buffer.find(b"\n")
            if end < 0:
                if len(conn.buffer) > 64:
                    self._drop(conn)
                return
            magic, _, size = bytes(conn.buffer[:end]).partition(b" ")
            if magic != MAGIC or not size.isdigit() or int(size) > MAX_REQUEST_BYTES:
                _log("malformed request; dropping it")
                self._drop(conn)
                return
            conn.body_size = int(size)
            del conn.buffer[:end + 1]
        if len(conn.buffer) < conn.body_size:
            return
        body = bytes(conn.buffer[:conn.body_size])
        del conn.buffer[:conn.body_size]
        if len(conn.fds) != 3:
            _log(f"request came with {len(conn.fds)} fds instead of 3; dropping it")
            self._drop(conn)
            return
        conn.request = decode_request(body)
        self.queue.append(conn)

    def _parse_signals(self, conn: Connection) -> None:
        while b"\n" in conn.buffer:
            line, _, rest = bytes(conn.buffer).partition(b"\n")
            conn.buffer[:] = rest
            if line[:1] != b"S" or not line[1:].isdigit():
                continue
            signum = int(line[1:])
            if conn.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(conn.pid, signum)
            else:  # not started yet: end it as a process killed by that signal would
                with contextlib.suppress(ValueError):
                    self.queue.remove(conn)
                conn.send(b"X%d\n" % -signum)
                self._drop(conn)
                return

    def _launcher_gone(self, conn: Connection) -> None:
        """The launcher died (e.g. SIGKILL from the worker): its run must not outlive it."""
        if conn.pid is not None:
            self.children[conn.pid] = None
            self._kill_group(conn.pid, signal.SIGKILL)
        elif conn in self.queue:
            self.queue.remove(conn)
        self._drop(conn)

    def _drop(self, conn: Connection) -> None:
        conn.close_fds()
        if conn in self.connections:
            self.connections.discard(conn)
            with contextlib.suppress(KeyError, ValueError):
                self.selector.unregister(conn.sock)
            conn.sock.close()

    @staticmethod
    def _kill_group(pid: int, signum: int) -> None:
        try:
            os.killpg(pid, signum)
        except ProcessLookupError:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signum)

    # -- children ---------------------------------------------------------------

    def _start_queued(self) -> None:
        while self.queue and not self.stop_requests and (
            not self.max_children or len(self.children) < self.max_children
        ):
            conn = self.queue.pop(0)
            if threading.active_count() != 1:
                _log("threads are running in the fork server, refusing to fork: "
                     f"{[t.name for t in threading.enumerate()]}")
                self._drop(conn)  # the launcher falls back to a cold run
                continue
            self._fork(conn)

    def _fork(self, conn: Connection) -> None:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        assert conn.request is not None
        cwd, _args, env = conn.request
        run_env = {os.fsdecode(key): os.fsdecode(value) for key, value in env.items()}
        refresh_settings = settings_fingerprint(
            os.fsdecode(cwd), run_env, self._profiles_path) != self._settings_fingerprint
        # Blocked across fork, so a signal meant for the run (a forwarded SIGTERM) cannot
        # hit the server's handlers in the child: it waits until the child reset them.
        signal.pthread_sigmask(signal.SIG_BLOCK, _SERVER_SIGNALS)
        try:
            pid = os.fork()
            if pid == 0:
                self._child(conn, refresh_settings)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _SERVER_SIGNALS)
        with contextlib.suppress(OSError):
            os.setpgid(pid, pid)  # also done by the child; whoever is first wins the race
        conn.pid = pid
        conn.close_fds()  # the child has them now; holding them would keep pipes open
        self.children[pid] = conn
        self.started += 1
        conn.send(b"P%d\n" % pid)
        how = "its own Prefect settings" if refresh_settings else "the server's Prefect settings"
        _log(f"pid {pid} runs flow run {run_env.get('PREFECT__FLOW_RUN_ID', '?')} with {how}")

    def _reap(self) -> None:
        while self.children:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            code = os.waitstatus_to_exitcode(status)
            _log(f"pid {pid} exited with {code}")
            conn = self.children.pop(pid, None)
            if conn is not None:
                conn.send(b"X%d\n" % code)
                self._drop(conn)

    # -- stop -------------------------------------------------------------------

    def _handle_stop(self) -> None:
        """First signal: stop accepting, let running children finish (up to drain_seconds).

        Queued launchers are let go and start cold. A second signal, or the drain
        deadline, sends the children SIGTERM once, then SIGKILL to their groups.
        """
        if not self.stop_requests:
            return
        now = time.monotonic()
        if self.listener is not None:
            self._close_listener()
            for conn in self.queue:
                self._drop(conn)
            self.queue.clear()
            self._drain_deadline = now + self.drain_seconds
            if self.children:
                _log(f"stopping: waiting for {len(self.children)} running flow run(s)")
        if self.stop_requests < 2 and now < self._drain_deadline:
            return
        if self._terminated_at is None:
            self._terminated_at = now
            for pid in self.children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
        elif now >= self._terminated_at + STOP_GRACE_SECONDS:
            for pid in self.children:
                self._kill_group(pid, signal.SIGKILL)

    def _close_listener(self) -> None:
        if self.listener is None:
            return
        with contextlib.suppress(KeyError, ValueError):
            self.selector.unregister(self.listener)
        self.listener.close()
        self.listener = None
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()

    def _shutdown(self) -> None:
        self._close_listener()
        for pid in list(self.children):
            self._kill_group(pid, signal.SIGKILL)
        deadline = time.monotonic() + 5
        while self.children and time.monotonic() < deadline:
            self._reap()
            time.sleep(0.05)
        for conn in list(self.connections):
            self._drop(conn)
        signal.set_wakeup_fd(-1)
        self.selector.close()
        for fd in (self._wakeup_r, self._wakeup_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        _log(f"stopped after {self.started} flow run(s)")

    # -- in the child -----------------------------------------------------------

    def _child(self, conn: Connection, refresh_settings: bool) -> NoReturn:
        """Become the flow-run process; never return into the server's loop."""
        code = 1
        try:
            code = self._become_run(conn, refresh_settings)
        except BaseException:
            with contextlib.suppress(BaseException):
                traceback.print_exc()
        finally:
            os._exit(code)

    def _become_run(self, conn: Connection, refresh_settings: bool) -> int:
        server_pid = os.getppid()
        signal.set_wakeup_fd(-1)
        for signum in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(signum, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, _SERVER_SIGNALS)
        with contextlib.suppress(OSError):
            os.setpgid(0, 0)  # own group: a kill reaches whatever the flow spawned
        if self._libc is not None:
            self._libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
        if os.getppid() != server_pid:
            return 1  # the server died before the death signal was armed
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, self._nofile)

        # Drop everything of the server's: listener, other launchers, their fds.
        stdio = list(conn.fds)
        conn.fds.clear()
        for other in self.connections:
            other.close_fds()
            other.sock.close()
        if self.listener is not None:
            self.listener.close()
        self.selector.close()
        for fd in (self._wakeup_r, self._wakeup_w):
            os.close(fd)
        for target, fd in enumerate(stdio):
            os.dup2(fd, target)
        for fd in stdio:
            if fd > 2:
                os.close(fd)

        assert conn.request is not None
        cwd, args, env = conn.request
        adopt_environment(os.fsdecode(cwd), env, refresh_settings)
        return run_engine([os.fsdecode(a) for a in args], self._engine)


def _file_fingerprint(path: Path, needle: bytes | None) -> bytes | None:
    """A settings file's content if it can hold Prefect settings (`needle` in it), else None."""
    try:
        content = path.read_bytes()
    except OSError:
        return None
    return content if needle is None or needle in content else None


def settings_fingerprint(cwd: str, environ: Mapping[str, str],
                         profiles_path: Path) -> tuple[object, ...]:
    """Everything Prefect builds its settings from, for a process in `cwd` with `environ`.

    Settings come from PREFECT_* variables (PREFECT__* are per-run bootstrap values,
    not settings), HOME (the default PREFECT_HOME), `.env`, `prefect.toml` and
    `pyproject.toml` [tool.prefect] in the working directory, and the profiles file.
    Equal fingerprints mean equal settings, so a child can keep the server's.
    """
    env = sorted((key, value) for key, value in environ.items()
                 if key == "HOME" or (key.startswith("PREFECT_")
                                      and not key.startswith("PREFECT__")))
    try:
        profiles = profiles_path.stat()
        profiles_stamp: tuple[int, int] | None = (profiles.st_mtime_ns, profiles.st_size)
    except OSError:
        profiles_stamp = None
    return (tuple(env), profiles_stamp,
            _file_fingerprint(Path(cwd, ".env"), b"PREFECT_"),
            _file_fingerprint(Path(cwd, "prefect.toml"), None),
            _file_fingerprint(Path(cwd, "pyproject.toml"), b"tool.prefect"))


def current_settings_fingerprint() -> tuple[tuple[object, ...], Path]:
    """This process's settings fingerprint, as a run started by a worker like it would have.

    A process worker gives each run its environment plus its settings as PREFECT_*
    variables (`EngineCommandStarter`): ours get the same treatment, so a server
    started with the worker's environment matches its runs. Also the profiles path.
    """
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    as_started = {**os.environ, **settings.to_environment_variables(exclude_unset=True)}
    return (settings_fingerprint(os.getcwd(), as_started, settings.profiles_path),
            settings.profiles_path)


def adopt_environment(cwd: str, env: dict[bytes, bytes], refresh_settings: bool = True) -> None:
    """Make this process look like `python -m prefect.engine` started with `env` in `cwd`.

    Prefect builds its global settings context and logging configuration at import
    time, from the server's environment: with `refresh_settings`, rebuild both from
    the run's (~0.3 s of CPU; not needed when the settings fingerprints agree).
    """
    old_pythonpath = os.environ.get("PYTHONPATH", "")
    os.chdir(cwd)
    os.environ.clear()
    os.environb.update(env)

    # `python -m` puts the working directory first, then PYTHONPATH.
    stale = {sys.path[0], *filter(None, old_pythonpath.split(os.pathsep))} if sys.path else set()
    fresh = [cwd, *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    sys.path[:] = fresh + [p for p in sys.path if p not in stale and p not in fresh]
    importlib.invalidate_caches()

    unbuffered = bool(os.environ.get("PYTHONUNBUFFERED"))
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.reconfigure(  # type: ignore[union-attr]
                line_buffering=unbuffered or stream.isatty() or stream is sys.stderr,
                write_through=unbuffered,
            )

    import prefect.context
    from prefect.logging import configuration

    if refresh_settings:
        prefect.context.refresh_global_settings_context()
        configuration.PROCESS_LOGGING_CONFIG.clear()
        configuration.setup_logging(incremental=False)

    project_settings = sys.modules.get("taxi_pipeline.settings")
    if project_settings is not None:
        project_settings.get_settings.cache_clear()


def engine_main_code() -> tuple[CodeType, ModuleSpec]:
    """The compiled `prefect/engine.py`, whose `__main__` block is what a cold run executes."""
    spec = importlib.util.find_spec("prefect.engine")
    loader = spec.loader if spec is not None else None
    code = loader.get_code("prefect.engine") if isinstance(loader, InspectLoader) else None
    if spec is None or code is None:
        raise RuntimeError("cannot find the code of prefect.engine")
    return code, spec


def run_engine(args: list[str], engine: tuple[CodeType, ModuleSpec] | None = None) -> int:
    """Run `prefect.engine` as `__main__` (what `python -m` does) and finish like an interpreter.

    The module is executed, not imported, so its `if __name__ == "__main__"` block, Prefect's
    own entry point, is exactly what runs.
    """
    code_object, spec = engine or engine_main_code()
    main_module = types.ModuleType("__main__")
    main_module.__dict__.update(__file__=spec.origin, __spec__=spec, __loader__=spec.loader,
                                __package__=spec.parent, __cached__=spec.cached)
    sys.modules["__main__"] = main_module
    sys.argv = [spec.origin or "prefect.engine", *args]
    interrupted = False
    try:
        exec(code_object, main_module.__dict__)
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc.code)
    except KeyboardInterrupt:
        traceback.print_exc()
        interrupted, code = True, 1
    except BaseException as exc:
        sys.excepthook(type(exc), exc, exc.__traceback__)
        code = 1
    # What Py_Finalize does before the process ends: join non-daemon threads, run
    # atexit callbacks (Prefect drains its log and event workers there), flush stdio.
    shutdown_threads = getattr(threading, "_shutdown", None)
    if shutdown_threads is not None:
        with contextlib.suppress(Exception):
            shutdown_threads()
    with contextlib.suppress(Exception):
        atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    if interrupted:  # like CPython: die by SIGINT so the parent sees it
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGINT)
    return code


def serve(socket_path: Path, preload: list[str], max_children: int = 0,
          drain_seconds: float = 30.0) -> None:
    server = ForkServer(socket_path, max_children=max_children, drain_seconds=drain_seconds)
    server.preload(preload)
    server.bind()
    server.serve_forever()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m taxi_pipeline.stack.warm_runs",
                                     description=__doc__.split("\n\n")[0] if __doc__ else None)
    commands = parser.add_subparsers(dest="command", required=True)
    serve_cmd = commands.add_parser("serve", help="pre-import Prefect and flows; fork runs")
    serve_cmd.add_argument("--socket", type=Path, required=True)
    serve_cmd.add_argument("--preload", nargs="*", default=[],
                           help="modules to import up front, e.g. flows.transform flows.load")
    serve_cmd.add_argument("--max-children", type=int, default=0,
                           help="runs at once; more wait in the server (0 = no limit)")
    serve_cmd.add_argument("--drain-seconds", type=float, default=30.0,
                           help="on SIGTERM, how long running flow runs may finish")
    run_cmd = commands.add_parser("run", help="the launcher (the work pool command)")
    run_cmd.add_argument("--socket", required=True)
    run_cmd.add_argument("engine_args", nargs="*")
    options = parser.parse_args(argv)
    if options.command == "serve":
        serve(options.socket, options.preload, options.max_children, options.drain_seconds)
    else:
        warm_runs_launch.launch(options.socket, options.engine_args)


if __name__ == "__main__":
    main()
