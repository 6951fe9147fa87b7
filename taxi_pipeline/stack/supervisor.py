"""`up` as a process manager: restart a part of the stack that exits, give up on a crash loop.

The parts are the processes LocalStack runs (Prefect server, worker, bridge, the
flow-run fork server) and the embedded PostgreSQL. One that exits while `up`
runs is restarted after a backoff that doubles with each crash of that part in
the window (TAXI_RESTART_BACKOFF_SECONDS, at most 30 s), with one line on
stderr and a `pipeline.stack.restarted` event. A part that crashes more than
TAXI_RESTART_LIMIT times within TAXI_RESTART_WINDOW_SECONDS is a crash loop
(like Kubernetes' CrashLoopBackOff, but final): `up` says so, emits
`pipeline.stack.gave_up`, stops everything and exits 1.

Work in flight survives a restart the way it survives a server outage: flow
runs' clients retry, the bridge holds what it could not confirm, and what the
server held only in memory is re-emitted by the recover and reconcile
deployments. Runs a restart orphaned (claimed by a killed worker, or whose
process died while the API was down) are found by an OrphanSweep every
SWEEP_EVERY seconds and crashed, which starts their recovery.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from subprocess import Popen
from typing import TextIO

from prefect.events import Event

from taxi_pipeline import events
from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.stack.orphans import OrphanSweep

BACKOFF_MAX = 30.0
POSTGRES = "postgres"
SWEEP_EVERY = 30.0

# (name, process, log) of processes that are watched but not restarted (the emulators).
Watched = Sequence[tuple[str, Popen[bytes], Path]]


@dataclass
class RestartPolicy:
    """How often a part may crash before `up` gives up, and how long it waits between."""

    limit: int = 5
    window: float = 300.0
    backoff: float = 1.0
    crashes: dict[str, deque[float]] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> RestartPolicy:
        return cls(settings.restart_limit, settings.restart_window_seconds,
                   settings.restart_backoff_seconds)

    def crashed(self, part: str, now: float) -> float | None:
        """Record a crash of `part`; the wait before restarting it, or None to give up."""
        recent = self.crashes.setdefault(part, deque())
        recent.append(now)
        while recent and recent[0] < now - self.window:
            recent.popleft()
        if len(recent) > self.limit:
            return None
        return min(self.backoff * 2 ** (len(recent) - 1), BACKOFF_MAX)

    def recent(self, part: str) -> int:
        return len(self.crashes.get(part, ()))


class Supervisor:
    """Watches a LocalStack's parts until a stop is requested or a part crash-loops."""

    def __init__(self, stack: LocalStack, policy: RestartPolicy, *, watched: Watched = (),
                 out: TextIO | None = None, clock: Callable[[], float] = time.monotonic,
                 on_restart: Callable[[str, list[str]], None] | None = None) -> None:
        self.stack = stack
        self.policy = policy
        self.watched = watched
        self.out = out
        self.clock = clock
        self.on_restart = on_restart
        self.orphans = OrphanSweep(stack.settings.work_pool)
        self._next_sweep = clock() + SWEEP_EVERY

    def dead_parts(self) -> list[tuple[str, int | None, Path | None]]:
        """(part, exit code, log) of every part that is not running, PostgreSQL first."""
        dead: list[tuple[str, int | None, Path | None]] = []
        database = self.stack.database
        if database is not None and not database.alive():
            dead.append((POSTGRES, None, database.pgdata / "log"))
        for managed in self.stack.processes:
            if not managed.alive():
                dead.append((managed.name, managed.process.returncode, managed.log_path))
        return dead

    def say(self, line: str) -> None:
        stream = self.out or sys.stderr
        try:
            print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", file=stream, flush=True)
        except (BrokenPipeError, ValueError, OSError):  # the terminal is gone: keep running
            with contextlib.suppress(OSError, ValueError):
                os.dup2(os.open(os.devnull, os.O_WRONLY), stream.fileno())

    def run(self, stopping: list[int], poll: float = 0.5) -> int:
        """Until `stopping` gets a signal (0) or a part crash-loops or a watched one exits (1)."""
        while not stopping:
            for name, process, log_path in self.watched:
                if process.poll() is not None:
                    self.say(f"{name} exited with code {process.returncode}; see {log_path}. "
                             "Stopping.")
                    return 1
            dead = self.dead_parts()
            if dead and not self.heal(dead[0], stopping):
                return 1
            if not dead:
                if self.clock() >= self._next_sweep:
                    self.sweep_orphans()
                self._sleep(poll, stopping)
        return 0

    def sweep_orphans(self) -> None:
        """Crash runs of the local pool left without a process (see OrphanSweep)."""
        self._next_sweep = self.clock() + SWEEP_EVERY
        names = {m.name for m in self.stack.processes}
        if not (self.stack.api_url and self.stack.owns_server and "worker" in names):
            return  # a server of someone else's, or no local pool: not ours to judge
        try:
            crashed = self.orphans.sweep_now(self.stack.api_url)
        except Exception as exc:  # the server may be restarting: next time
            self.say(f"could not look for orphaned flow runs: {type(exc).__name__}: {exc}")
            return
        for orphan in crashed:
            self.say(f"flow run {orphan.name} ({orphan.run_id}) set Crashed: {orphan.why}; "
                     "the recovery automation re-runs it")

    def heal(self, dead: tuple[str, int | None, Path | None], stopping: list[int]) -> bool:
        """Restart one dead part after its backoff; False when it is a crash loop."""
        part, code, log_path = dead
        how = "was killed" if code is None or code < 0 else f"exited with code {code}"
        if code is not None and code < 0:
            how = f"was killed by signal {-code}"
        wait = self.policy.crashed(part, self.clock())
        limit, window = self.policy.limit, self.policy.window
        if wait is None:
            self.say(f"{part} {how}: {self.policy.recent(part)} crashes within {window:.0f}s "
                     f"(TAXI_RESTART_LIMIT={limit}); giving up. Stopping everything. "
                     f"See {log_path}")
            self.emit(events.STACK_GAVE_UP, part, code, log_path)
            return False
        self.say(f"{part} {how}; restarting it in {wait:.1f}s (crash "
                 f"{self.policy.recent(part)} of {limit} allowed within {window:.0f}s); "
                 f"see {log_path}")
        self._sleep(wait, stopping)
        if stopping:
            return True
        try:
            restarted = self.stack.restart_part(part)
        except Exception as exc:  # counted as the next crash when the loop sees it dead again
            self.say(f"restarting {part} failed: {type(exc).__name__}: "
                     f"{str(exc).splitlines()[0] if str(exc) else ''}")
            return True
        ports = [f"{name} now on port {self.stack.port_of_part(name)}" for name in restarted
                 if self.stack.port_of_part(name) is not None]
        self.say(f"restarted {', '.join(restarted)}" + (f" ({'; '.join(ports)})" if ports else ""))
        if self.on_restart is not None:
            self.on_restart(part, restarted)
        self.emit(events.STACK_RESTARTED, part, code, log_path, restarted=restarted)
        return True

    def emit(self, name: str, part: str, code: int | None, log_path: Path | None,
             **extra: object) -> None:
        """The restart as a Prefect event, confirmed stored; a server that is down only
        costs the event (the line on stderr stays)."""
        if not self.stack.api_url or "prefect-server" not in {
                m.name for m in self.stack.processes if m.alive()}:
            return
        event = events.stack_event(
            name, part, str(self.stack.settings.home), socket.gethostname(),
            exit_code=code, crashes_in_window=self.policy.recent(part),
            window_seconds=self.policy.window, limit=self.policy.limit,
            log=str(log_path) if log_path else None, **extra)
        try:
            deliver(self.stack.api_url, event)
        except Exception as exc:
            self.say(f"could not store the {name} event: {type(exc).__name__}: {exc}")

    def _sleep(self, seconds: float, stopping: list[int]) -> None:
        deadline = self.clock() + seconds
        while not stopping and self.clock() < deadline:
            time.sleep(min(0.1, max(0.0, deadline - self.clock())))


def deliver(api_url: str, event: Event, timeout: float = 15.0) -> None:
    """Emit `event` to the server at `api_url` and wait until it reads it back."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from taxi_pipeline.event_delivery import EventDelivery

    async def _deliver() -> None:
        async with EventDelivery() as delivery:
            if event.id not in await delivery.deliver([event], timeout):
                raise TimeoutError(f"not stored within {timeout:.0f}s")

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        asyncio.run(_deliver())
