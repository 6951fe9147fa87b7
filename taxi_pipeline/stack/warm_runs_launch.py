"""The flow-run command of the local profile's process worker: ask the fork server to run it.

The worker starts `python -I -S .../warm_runs_launch.py --socket PATH` for every
flow run instead of `python -m prefect.engine`. This file imports only the
standard library (and runs without `site`), so it starts in ~10 ms instead of
the ~3 s a cold engine spends importing Prefect. It hands the fork server
(`taxi_pipeline.stack.warm_runs serve`) its environment, working directory, engine
arguments and its stdin/stdout/stderr (SCM_RIGHTS), then stays alive as the
process the worker watches: it forwards the signals the worker sends
(cancellation, shutdown) and exits with the run's exit status. A child killed
by a signal makes the launcher die by the same signal, so the worker sees
exactly what a cold engine process would have produced.

If the server cannot be reached, or closes the connection before it started
the run, the launcher execs `python -m prefect.engine` itself: a cold run, never
a lost one.

Wire protocol (unix stream socket):
  launcher -> server  b"WR1 <n>\\n" with fds [stdin, stdout, stderr] attached,
                      then n bytes: NUL-joined cwd, argc, args..., env KEY=VALUE...
                      later b"S<signum>\\n" for every forwarded signal
  server -> launcher  b"P<pid>\\n" when the child runs,
                      b"X<status>\\n" when it is gone: exit code, or -signum if killed
"""

from __future__ import annotations

# The C modules, not `socket`/`signal`: those wrappers import enum, selectors and
# collections, which would double this process's start-up CPU.
import _signal
import _socket
import os
import sys

TYPE_CHECKING = False  # `typing` alone costs more start-up than the rest of this file
if TYPE_CHECKING:
    from typing import NoReturn

MAGIC = b"WR1"
FORWARDED_SIGNALS = (_signal.SIGTERM, _signal.SIGINT, _signal.SIGHUP, _signal.SIGQUIT,
                     _signal.SIGUSR1, _signal.SIGUSR2)
USAGE = "usage: warm_runs_launch.py --socket PATH [ENGINE-ARGS...]"


def encode_request(cwd: bytes, args: list[bytes], env: dict[bytes, bytes]) -> bytes:
    """The request body; NUL can appear in none of these, so it is a safe separator."""
    fields = [cwd, str(len(args)).encode(), *args, *(k + b"=" + v for k, v in env.items())]
    return b"\0".join(fields)


def decode_request(body: bytes) -> tuple[bytes, list[bytes], dict[bytes, bytes]]:
    """Inverse of `encode_request`."""
    fields = body.split(b"\0")
    cwd, argc = fields[0], int(fields[1])
    args = fields[2:2 + argc]
    env: dict[bytes, bytes] = {}
    for item in fields[2 + argc:]:
        key, sep, value = item.partition(b"=")
        if sep:
            env[key] = value
    return cwd, args, env


def cold_run(args: list[str], why: str) -> NoReturn:
    """Replace this process with a cold `python -m prefect.engine` (same pid for the worker)."""
    print(f"warm-runs: {why}; starting a cold `python -m prefect.engine`", file=sys.stderr,
          flush=True)
    os.execv(sys.executable, [sys.executable, "-m", "prefect.engine", *args])


def _stdio_fds() -> list[int]:
    """Our fds 0-2; a closed one is replaced by /dev/null so the child gets three."""
    fds = []
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
            fds.append(fd)
        except OSError:
            fds.append(os.open(os.devnull, os.O_RDWR))
    return fds


def _exit_like(status: int) -> NoReturn:
    """Exit with the child's status; die by its signal when it was killed by one."""
    if status < 0:
        _signal.signal(-status, _signal.SIG_DFL)
        os.kill(os.getpid(), -status)
        status = 128 - status
    os._exit(status)


def _send_with_fds(sock: _socket.socket, data: bytes, fds: list[int]) -> None:
    """`socket.send_fds` without importing `socket`: fds go as a C int array (SCM_RIGHTS)."""
    fd_array = b"".join(fd.to_bytes(4, sys.byteorder, signed=True) for fd in fds)
    sock.sendmsg([data], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fd_array)])


def launch(socket_path: str, args: list[str]) -> NoReturn:
    """Have the fork server run the flow run; exit as the run does (never returns)."""
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(socket_path)
        body = encode_request(os.getcwd().encode(), [os.fsencode(a) for a in args],
                              dict(os.environb))
        _send_with_fds(sock, MAGIC + b" %d\n" % len(body), _stdio_fds())
        sock.sendall(body)
    except OSError as exc:
        sock.close()
        cold_run(args, f"fork server at {socket_path} unreachable ({exc})")

    def forward(signum: int, _frame: object) -> None:
        try:  # noqa: SIM105 (contextlib is one more import at start-up)
            sock.sendall(b"S%d\n" % signum)
        except OSError:
            pass

    for signum in FORWARDED_SIGNALS:
        _signal.signal(signum, forward)

    started = False
    buffer = b""
    while True:
        try:
            chunk = sock.recv(4096)
        except OSError:
            chunk = b""
        if not chunk:
            if not started:
                for signum in FORWARDED_SIGNALS:
                    _signal.signal(signum, _signal.SIG_DFL)
                sock.close()
                cold_run(args, "fork server closed the connection before starting the run")
            print("warm-runs: fork server went away while the run was in progress",
                  file=sys.stderr, flush=True)
            os._exit(1)
        buffer += chunk
        while b"\n" in buffer:
            line, buffer = buffer.split(b"\n", 1)
            if line[:1] == b"P":
                started = True
            elif line[:1] == b"X":
                _exit_like(int(line[1:]))


def main(argv: list[str] | None = None) -> NoReturn:
    """`--socket PATH [ENGINE-ARGS...]`; engine args are passed on as `prefect.engine`'s."""
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) < 2 or argv[0] != "--socket":
        print(USAGE, file=sys.stderr)
        os._exit(2)
    launch(argv[1], argv[2:])


if __name__ == "__main__":
    main()
