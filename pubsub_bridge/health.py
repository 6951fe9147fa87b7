"""`/healthz` and `/metrics` for the bridge, on a small thread-run WSGI server.

The stdlib WSGI server is enough for a probe and a scrape every few seconds,
and prometheus_client renders the metrics; no web framework is needed.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from pubsub_bridge.metrics import BridgeMetrics

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


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # probes every few seconds
        return


class HealthPortInUse(RuntimeError):
    """The health and metrics port is taken by another process."""


class HealthServer:
    def __init__(self, state: HealthState, metrics: BridgeMetrics, required: list[str],
                 port: int, host: str = "0.0.0.0") -> None:
        self.state = state
        self.metrics = metrics
        self.required = required
        try:
            self._server: WSGIServer = make_server(host, port, self.app,
                                                   handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            # `up` reads this line to move the bridge when another process won the port.
            raise HealthPortInUse(
                f"the bridge's health port {port} is already in use ({exc.strerror}); "
                "stop what listens there, or set TAXI_BRIDGE_PORT to a free port") from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name="bridge-health")

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [generate_latest(self.metrics.registry)]
        if path == "/healthz":
            problems = self.state.problems(self.required)
            body = ("ok\n" if not problems else "\n".join(problems) + "\n").encode()
            start_response("200 OK" if not problems else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /healthz or /metrics\n"]

    def start(self) -> HealthServer:
        self._thread.start()
        log.info("health and metrics on port %d (/healthz, /metrics)", self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
