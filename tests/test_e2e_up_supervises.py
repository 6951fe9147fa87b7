"""`taxi-pipeline up` keeps the pipeline running while its own parts are killed.

A burst of files is dropped into a running `up`; mid-burst each part is SIGKILLed
in turn (Prefect server, worker, bridge, flow-run fork server, PostgreSQL). `up`
restarts each one, keeps running throughout, and every file loads exactly once
with no command run after the drop. A part that dies at once every time (a
crash loop) ends `up` with exit 1 within a bounded time, with nothing left
running.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.events.filters import EventFilter, EventNameFilter, EventOccurredFilter
from prefect.settings import PREFECT_API_URL, temporary_settings
from support.burst import (
    TIMEOUT,
    assert_exactly_once,
    drop_all,
    make_burst,
    read_outcome,
    wait_all_loaded,
)
from support.local_e2e import processes_of, running_up

from taxi_pipeline import events
from taxi_pipeline.settings import Settings

pytestmark = pytest.mark.e2e

FILES = int(os.environ.get("TAXI_TEST_SUPERVISED_BURST", "100"))


def _pid_running(up: subprocess.Popen[str], *words: str) -> Callable[[], int | None]:
    """The pid of the part `up` started whose command line holds every one of `words`.

    A child of `up` itself: the fork server's forked flow runs carry its command line
    too, and after pid wrap-around one can list before it.
    """

    def find() -> int | None:
        try:
            children = psutil.Process(up.pid).children()
        except psutil.Error:
            return None
        for child in children:
            try:
                cmdline = " ".join(child.cmdline())
            except psutil.Error:
                continue
            if all(word in cmdline for word in words):
                return child.pid
        return None

    return find


def _postmaster(home: Path) -> Callable[[], int | None]:
    def find() -> int | None:
        try:
            pid = int((home / "prefect" / "postgres" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None
        return pid if psutil.pid_exists(pid) else None

    return find


class Output:
    """What `up` prints after "Running.", read by a thread as it comes."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream: object) -> None:
        for line in stream:  # type: ignore[attr-defined]
            self.lines.append(line)

    def join(self) -> None:
        self._thread.join(timeout=30)

    def wait_for(self, text: str, after: int, timeout: float = 240) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for index in range(after, len(self.lines)):
                if text in self.lines[index]:
                    return index + 1
            time.sleep(0.2)
        raise AssertionError(f"`up` never printed {text!r}; it printed:\n"
                             + "".join(self.lines[after:]))


def stack_events(api_url: str, name: str) -> list[str]:
    async def read() -> list[str]:
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(
                event=EventNameFilter(name=[name]), occurred=EventOccurredFilter()), limit=50)
            return [e.resource[events.LABEL_STACK_PART] for e in page.events]

    with temporary_settings(updates={PREFECT_API_URL: api_url}):
        return asyncio.run(read())


def test_every_part_killed_mid_burst_is_restarted_and_every_file_loads_once(
        tmp_path: Path) -> None:
    home = tmp_path / "up-home"
    with running_up(home) as (up, _):
        supervised_burst(up, home, tmp_path)


def supervised_burst(up: subprocess.Popen[str], home: Path, tmp_path: Path) -> None:
    output = Output(up.stdout)
    settings = Settings(profile="local", home=home)
    files = make_burst(FILES, tmp_path / "burst", settings, first_year=2040)
    parts = [
        ("prefect-server", _pid_running(up, "taxi_pipeline.stack.prefect_server_start")),
        ("worker", _pid_running(up, "taxi_pipeline.stack.prefect_worker_start")),
        ("bridge", _pid_running(up, "-m pubsub_bridge")),
        ("flow-runs", _pid_running(up, "taxi_pipeline.stack.warm_runs", "serve")),
        ("postgres", _postmaster(home)),
    ]
    for name, find in parts:
        assert find() is not None, f"no {name} process of this stack"
    started = drop_all(files, settings)
    seen = 0
    for number, (name, find) in enumerate(parts, 1):
        # Mid-burst: the kills are spread over the first ~60% of the files.
        while read_outcome(settings, started).loaded < number * FILES // 8:
            assert read_outcome(settings, started).seconds < TIMEOUT, "the burst stalled"
            assert up.poll() is None, "".join(output.lines)
            time.sleep(0.5)
        pid = find()
        assert pid is not None, f"no {name} to kill"
        os.kill(pid, signal.SIGKILL)
        seen = output.wait_for(f"restarted {name}", seen)
        assert up.poll() is None, "".join(output.lines)
    outcome = wait_all_loaded(files, settings, started, TIMEOUT)
    print(f"{FILES} files loaded {outcome.seconds:.0f}s after the drop, 5 parts killed")
    assert_exactly_once(files, settings, outcome.rows_by_uri, outcome.loads_by_uri)
    assert up.poll() is None
    text = "".join(output.lines)
    assert "giving up" not in text
    for name, find in parts:
        assert find() is not None, f"{name} is not running at the end"
    api_url = (home / "api-url").read_text()
    restarted = stack_events(api_url, events.STACK_RESTARTED)
    assert {name for name, _ in parts} <= set(restarted), restarted
    up.send_signal(signal.SIGTERM)
    assert up.wait(timeout=120) == 0
    output.join()
    assert "Stopped; nothing left running." in "".join(output.lines)
    deadline = time.monotonic() + 10
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(home) == []


def test_a_part_that_always_dies_ends_up_with_1_and_nothing_running(tmp_path: Path) -> None:
    """The bridge's port is held by another process and was chosen explicitly, so every
    restart dies at once: a crash loop."""
    home = tmp_path / "loop-home"
    with socket.create_server(("0.0.0.0", 0)) as taken:
        port = taken.getsockname()[1]
        with running_up(home, {"TAXI_BRIDGE_PORT": str(port), "TAXI_RESTART_LIMIT": "2",
                               "TAXI_RESTART_BACKOFF_SECONDS": "0.2"}) as (up, _):
            began = time.monotonic()
            code = up.wait(timeout=180)
    took = time.monotonic() - began
    assert up.stdout is not None
    text = up.stdout.read()
    assert code == 1, text
    assert text.count("restarted bridge") == 2
    assert "bridge exited with code 1: 3 crashes within 300s (TAXI_RESTART_LIMIT=2); " \
           "giving up. Stopping everything." in text
    assert f"health port {port} is already in use" in (home / "logs" / "bridge.log").read_text()
    print(f"crash loop ended `up` {took:.0f}s after it was running")
    deadline = time.monotonic() + 10
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert processes_of(home) == []
    assert not (home / "api-url").exists()
