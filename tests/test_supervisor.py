"""`up` restarts the parts of the stack that exit, and gives up on a crash loop.

Stand-in processes play the parts (the supervisor only sees processes, their exit
codes and logs); the real parts are killed under a burst in test_e2e_up_supervises.
"""

from __future__ import annotations

import io
import socket
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.stack.supervisor import BACKOFF_MAX, RestartPolicy, Supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]
CRASHER = [sys.executable, "-c", "raise SystemExit(2)"]
# A bridge or exporter stand-in: fails like the real one when its port is taken, else runs.
def port_part(variable: str) -> list[str]:
    return [sys.executable, "-c", f"""
import os, socket, sys, time
port = int(os.environ["{variable}"])
try:
    socket.create_server(("127.0.0.1", port))
except OSError:
    sys.exit(f"error: the part's port {{port}} is already in use (Address already "
             "in use); stop what listens there, or set {variable} to a free port")
print("listening", port, flush=True)
time.sleep(600)
"""]


BRIDGE = port_part("TAXI_BRIDGE_PORT")


@pytest.fixture
def stack(tmp_path: Path) -> Iterator[LocalStack]:
    running = LocalStack(Settings(home=tmp_path / "home"))
    try:
        yield running
    finally:
        running.stop()
        assert all(not m.alive() for m in running.processes)


def wait_until(condition: object, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition never held"
        time.sleep(0.02)


def test_backoff_doubles_per_crash_in_the_window_and_a_loop_gives_up() -> None:
    policy = RestartPolicy(limit=3, window=60, backoff=1.0)
    assert [policy.crashed("worker", t) for t in (0, 1, 2)] == [1.0, 2.0, 4.0]
    assert policy.crashed("worker", 3) is None  # a 4th crash within 60 s: give up
    assert policy.crashed("bridge", 3) == 1.0  # counted per part
    calm = RestartPolicy(limit=3, window=60, backoff=1.0)
    assert [calm.crashed("worker", t) for t in (0, 100, 200, 300)] == [1.0] * 4
    assert RestartPolicy(limit=20, backoff=1.0).crashed("x", 0) == 1.0
    many = RestartPolicy(limit=20, window=600, backoff=1.0)
    assert max(many.crashed("x", t) or 0 for t in range(10)) == BACKOFF_MAX
    assert RestartPolicy(limit=0).crashed("x", 0) is None  # 0: never restart


def test_a_killed_part_is_restarted_in_place_with_one_line(stack: LocalStack) -> None:
    worker = stack.spawn("worker", SLEEPER)
    bridge = stack.spawn("bridge", SLEEPER)
    out = io.StringIO()
    stopping: list[int] = []
    restarted: list[list[str]] = []
    supervisor = Supervisor(stack, RestartPolicy(limit=3, backoff=0.01), out=out,
                            on_restart=lambda part, parts: (restarted.append(parts),
                                                            stopping.append(0)))
    worker.process.kill()
    worker.process.wait()
    assert supervisor.run(stopping, poll=0.01) == 0
    assert restarted == [["worker"]]
    new = stack.process("worker")
    assert new is not worker and new.alive() and new.argv == SLEEPER
    assert [m.name for m in stack.processes] == ["worker", "bridge"]  # stop order kept
    assert stack.process("bridge") is bridge
    lines = out.getvalue().splitlines()
    assert "worker was killed by signal 9; restarting it in 0.0s (crash 1 of 3" in lines[0]
    assert lines[1].endswith("restarted worker")


def test_a_crash_loop_stops_with_1_and_says_why(stack: LocalStack) -> None:
    stack.spawn("worker", SLEEPER)
    stack.spawn("bridge", CRASHER)
    out = io.StringIO()
    started = time.monotonic()
    code = Supervisor(stack, RestartPolicy(limit=3, window=60, backoff=0.01),
                      out=out).run([], poll=0.01)
    assert code == 1
    assert time.monotonic() - started < 20
    text = out.getvalue()
    assert text.count("restarted bridge") == 3
    assert "bridge exited with code 2: 4 crashes within 60s (TAXI_RESTART_LIMIT=3); " \
           "giving up. Stopping everything." in text
    assert stack.process("worker").alive()  # the rest runs until `up` stops it all


def test_a_stop_during_the_backoff_restarts_nothing(stack: LocalStack) -> None:
    worker = stack.spawn("worker", CRASHER)
    worker.process.wait()
    stopping: list[int] = []
    out = io.StringIO()

    class StopWhileWaiting(io.StringIO):
        def write(self, text: str) -> int:
            if "restarting it in" in text:
                stopping.append(15)  # SIGTERM arrives during the 5 s backoff
            return out.write(text)

    assert Supervisor(stack, RestartPolicy(backoff=5.0), out=StopWhileWaiting()).run(
        stopping, poll=0.01) == 0
    assert stack.process("worker") is worker
    assert "restarted" not in out.getvalue()


@pytest.mark.parametrize(("part", "attribute", "variable"), [
    ("bridge", "bridge_port", "TAXI_BRIDGE_PORT"),
    ("exporter", "exporter_port", "TAXI_MONITOR_PORT")])
def test_a_part_that_lost_its_port_moves_to_a_free_one(
        stack: LocalStack, part: str, attribute: str, variable: str) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    with taken:
        port = taken.getsockname()[1]
        setattr(stack, attribute, port)
        stack.env[variable] = str(port)
        stack.spawn(part, port_part(variable)).process.wait(timeout=30)
        stopping: list[int] = []
        out = io.StringIO()
        Supervisor(stack, RestartPolicy(backoff=0.01), out=out,
                   on_restart=lambda *_: stopping.append(0)).run(stopping, poll=0.01)
        moved = stack.process(part)
        wait_until(lambda: "listening" in moved.log_since_start())
        now = getattr(stack, attribute)
        assert now != port
        assert f"listening {now}" in moved.log_since_start()
        assert f"{part} now on port {now}" in out.getvalue()


def test_an_explicit_bridge_port_is_never_moved(
        stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> None:
    taken = socket.create_server(("127.0.0.1", 0))
    with taken:
        port = taken.getsockname()[1]
        monkeypatch.setenv("TAXI_BRIDGE_PORT", str(port))
        stack.bridge_port = port
        stack.spawn("bridge", BRIDGE).process.wait(timeout=30)
        out = io.StringIO()
        assert Supervisor(stack, RestartPolicy(limit=1, backoff=0.01), out=out).run(
            [], poll=0.01) == 1
        assert stack.bridge_port == port
        assert "giving up" in out.getvalue()


def test_a_run_is_crashed_only_when_orphaned_in_two_sweeps_in_a_row(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The worker gets one sweep's time to report a dead run itself."""
    import asyncio
    import os
    import uuid

    from taxi_pipeline.stack import orphans

    one, two = uuid.uuid4(), uuid.uuid4()
    rounds = [[orphans.Orphan(one, "load a", "gone")],
              [orphans.Orphan(one, "load a", "gone"), orphans.Orphan(two, "load b", "gone")],
              [orphans.Orphan(two, "load b", "gone")]]
    crashed: list[list[uuid.UUID]] = []

    async def find(pool: str) -> list[orphans.Orphan]:
        assert pool == "taxi-process"
        return rounds.pop(0)

    async def crash(found: list[orphans.Orphan]) -> list[orphans.Orphan]:
        crashed.append([o.run_id for o in found])
        return found

    monkeypatch.setattr(orphans, "find_orphans", find)
    monkeypatch.setattr(orphans, "crash", crash)
    sweep = orphans.OrphanSweep("taxi-process")
    assert [asyncio.run(sweep.sweep()) for _ in range(3)] == [
        [], [orphans.Orphan(one, "load a", "gone")], [orphans.Orphan(two, "load b", "gone")]]
    assert crashed == [[one], [two]]
    assert orphans.process_alive(str(os.getpid()))
    assert orphans.process_alive(f"host:{os.getpid()}")
    assert not orphans.process_alive(None) and not orphans.process_alive("not-a-pid")
