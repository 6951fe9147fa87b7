"""What the local-profile end-to-end tests share: a running stack, dropping files, waiting.

Waits are bounded polls for a positive signal (rows in the warehouse, an event
stored), never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.local import LocalStack, free_port
from taxi_pipeline.warehouse import Warehouse
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse

LOAD_TIMEOUT = 240.0


@contextlib.contextmanager
def running_stack(settings: Settings, env: dict[str, str] | None = None) -> Iterator[LocalStack]:
    """The stack `taxi-pipeline up` starts, with this process's Prefect client pointed at it."""
    with LocalStack(settings, ui=False, api_url=None, env=dict(env or {})) as running:
        assert running.api_url
        with temporary_settings(updates={PREFECT_API_URL: running.api_url}):
            yield running
            # Flows run in this process queue logs for the API: send them while the
            # server is still up.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=5)


def drop(source: Path, settings: Settings, name: str) -> Path:
    """Copy a file into the bucket the way a user would (not atomically)."""
    target = settings.bucket_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(source, target)
    return target


def wait_loaded(settings: Settings, uri: str, generation: int,
                timeout: float = LOAD_TIMEOUT) -> int:
    """Rows of `uri` once the local warehouse holds `generation` (or a newer one)."""
    return wait_warehouse_loaded(DuckDBWarehouse(settings.warehouse_file), settings.table,
                                 uri, generation, timeout)


def wait_warehouse_loaded(warehouse: Warehouse, table: str, uri: str, generation: int,
                          timeout: float = LOAD_TIMEOUT, poll: float = 0.25) -> int:
    """Rows of `uri` once `warehouse` (any profile's) holds `generation` or a newer one."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        loaded = warehouse.loaded(table, uri)
        if loaded and loaded[0] >= generation:
            return loaded[1]
        time.sleep(poll)
    raise AssertionError(f"{uri} generation {generation} not loaded within {timeout:.0f}s")


def read_events(names: list[str], uri: str) -> list[Any]:
    async def _read() -> list[Any]:
        async with get_client() as client:
            page = await client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=names),
                    resource=EventResourceFilter(id=[uri]),
                    occurred=EventOccurredFilter(),
                ),
                limit=50,
            )
            return list(page.events)

    return asyncio.run(_read())


def wait_events(names: list[str], uri: str, at_least: int = 1, timeout: float = 60) -> list[Any]:
    deadline = time.monotonic() + timeout
    found: list[Any] = []
    while time.monotonic() < deadline:
        found = read_events(names, uri)
        if len(found) >= at_least:
            return found
        time.sleep(0.5)
    raise AssertionError(f"expected {at_least} of {names} about {uri}, found {len(found)}")


def flow_run_count(deployment: str) -> int:
    async def _count() -> int:
        async with get_client() as client:
            return await client.count_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment]))
            )

    return asyncio.run(_count())


def table_rows(settings: Settings) -> int:
    with DuckDBWarehouse(settings.warehouse_file).connect(read_only=True) as con:
        row = con.execute(f"SELECT count(*) FROM {settings.table}").fetchone()
        assert row is not None
        return int(row[0])


def start_up(home: Path) -> subprocess.Popen[str]:
    """`taxi-pipeline up` in its own process group (as a terminal runs it), once it runs."""
    return launch_up(home)[0]


def launch_up(home: Path, extra_env: dict[str, str] | None = None,
              foreign: tuple[str, ...] = ("TAXI_", "PREFECT_API"),
              ) -> tuple[subprocess.Popen[str], list[str]]:
    """`up` with this process's environment minus `foreign`, plus `extra_env`; and what
    it printed up to its "Running." line."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(foreign)}
    # Its own bridge port: two test workers may start `up` at the same moment, and
    # both would otherwise take the default 8080 if it looked free to each.
    env.update({"TAXI_HOME": str(home), "TAXI_BRIDGE_PORT": str(free_port()),
                **(extra_env or {})})
    cli = Path(sys.executable).with_name("taxi-pipeline")
    up = subprocess.Popen([str(cli), "up"], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)
    assert up.stdout is not None
    lines = []
    for line in up.stdout:
        lines.append(line)
        if line.startswith("Running."):
            break
    assert lines and lines[-1].startswith("Running."), "".join(lines)
    return up, lines


@contextlib.contextmanager
def running_up(home: Path, extra_env: dict[str, str] | None = None,
               ) -> Iterator[tuple[subprocess.Popen[str], list[str]]]:
    """`launch_up`, and whatever happens in the test, nothing of it left running after:
    SIGTERM to `up` (it stops its parts), then SIGKILL of whatever still names `home`."""
    up, lines = launch_up(home, extra_env)
    try:
        yield up, lines
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGTERM)
            try:
                up.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(up.pid, signal.SIGKILL)
                up.wait(timeout=30)
        for pid in processes_of(home):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def processes_of(home: Path) -> list[int]:
    """Pids of every process whose environment names this TAXI_HOME (PostgreSQL's too)."""
    marker = f"TAXI_HOME={home}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker in (entry / "environ").read_bytes().split(b"\0"):
                found.append(int(entry.name))
        except OSError:
            continue
    return found


def stop_up(up: subprocess.Popen[str], home: Path, sig: int) -> None:
    """Signal `up`, and check it stops everything it started and says so only then."""
    os.killpg(up.pid, sig) if sig == signal.SIGINT else up.send_signal(sig)
    assert up.wait(timeout=120) == 0
    assert up.stdout is not None
    assert "nothing left running" in up.stdout.read()
    deadline = time.monotonic() + 10
    while processes_of(home) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert processes_of(home) == []
    assert not (home / "api-url").exists()


def bridge_counter(stack: LocalStack, name: str) -> float:
    """A counter of the running bridge's /metrics (e.g. "acked"), as Prometheus reads it."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{stack.bridge_port}/metrics",
                                timeout=5) as response:
        text = response.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == f"bridge_{name}_total" and not sample.labels:
                return float(sample.value)
    raise AssertionError(f"bridge_{name}_total not in the bridge's /metrics")


def wait_bridge_counter(stack: LocalStack, name: str, at_least: float,
                        timeout: float = 60) -> float:
    deadline = time.monotonic() + timeout
    value = bridge_counter(stack, name)
    while value < at_least:
        assert time.monotonic() < deadline, f"bridge_{name}_total stayed at {value}"
        time.sleep(0.25)
        value = bridge_counter(stack, name)
    return value
