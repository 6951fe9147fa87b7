"""`/healthz` and `/metrics` for the bridge, on a small thread-run WSGI server.

The stdlib WSGI server is enough for a probe and a scrape every few seconds,
and prometheus_client renders the metrics; no web framework is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline.monitoring.http_server import MetricsHttpServer, PortInUse

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


@dataclass
class HealthState:
    """When each dependency last answered; stale means unhealthy."""

    max_age: float = 30.0
    last_ok: dict[str, float] = field(default_factory=dict)
    last_error: dict[str, str] = field(default_factory=dict)

    def ok(self, name: str) -> None:
        self.last_ok[name] = time.monotonic()
        self.last_error.pop(name, None)

    def failed(self, name: str, error: str) -> None:
        self.last_error[name] = error

    def problems(self, required: Iterable[str]) -> list[str]:
        now = time.monotonic()
        found = []
        for name in required:
            seen = self.last_ok.get(name)
            if seen is None or now - seen > self.max_age:
                why = self.last_error.get(name, "no answer yet")
                last = ("never answered" if seen is None
                        else f"last answered {now - seen:.0f}s ago")
                found.append(f"{name}: {why} ({last})")
        return found


async def sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    """Sleep, but wake at once when `stop` is set."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def run_checks(checks: dict[str, Callable[[], Awaitable[object]]], state: HealthState,
                     stop: asyncio.Event, every: float = 5.0, timeout: float = 10.0) -> None:
    """Probe each dependency on its own loop, off the bridge's hot loop, until stop.

    Each probe has its own timeout, so a call that hangs on one dependency (a
    Prefect server that accepts connections but never answers) cannot keep the
    other's status stale.
    """
    await asyncio.gather(*(_check_loop(name, check, state, stop, every, timeout)
                           for name, check in checks.items()))


async def _check_loop(name: str, check: Callable[[], Awaitable[object]], state: HealthState,
                      stop: asyncio.Event, every: float, timeout: float) -> None:
    while not stop.is_set():
        try:
            await asyncio.wait_for(check(), timeout)
            state.ok(name)
        except TimeoutError:
            state.failed(name, f"no answer within {timeout:g}s")
        except Exception as exc:
            state.failed(name, str(exc) or type(exc).__name__)
        await sleep_or_stop(stop, every)


# The bridge's port taken at start (`python -m pubsub_bridge` says so in one line).
HealthPortInUse = PortInUse


class HealthServer(MetricsHttpServer):
    """The bridge's /metrics, and /healthz from the dependencies' last probes."""

    def __init__(self, state: HealthState, metrics: BridgeMetrics, required: list[str],
                 port: int, host: str = "0.0.0.0") -> None:
        self.state = state
        self.metrics = metrics
        self.required = required
        super().__init__(lambda: self.metrics.registry,
                         lambda: self.state.problems(self.required), port, host,
                         what="bridge's health", variable="TAXI_BRIDGE_PORT",
                         thread_name="bridge-health")
