"""`/healthz` and `/metrics` of the bridge (pubsub_bridge/health.py), on a real local port."""

from __future__ import annotations

import asyncio
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from pubsub_bridge.health import HealthServer, HealthState, run_checks
from pubsub_bridge.metrics import BridgeMetrics

# No proxy from the environment may get between the test and 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def get(server: HealthServer, path: str) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, for 2xx and error statuses alike."""
    url = f"http://127.0.0.1:{server.port}{path}"
    try:
        with _OPENER.open(url, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        with error:
            return error.code, error.headers["Content-Type"], error.read().decode()


@pytest.fixture(scope="module")
def shared() -> Iterator[HealthServer]:
    """One server for the module: each stop() waits out serve_forever's 0.5 s poll."""
    srv = HealthServer(HealthState(), BridgeMetrics(), [], port=0, host="127.0.0.1").start()
    yield srv
    srv.stop()


@pytest.fixture
def server(shared: HealthServer) -> HealthServer:
    """The shared server with fresh state and metrics, requiring prefect and pubsub."""
    shared.state = HealthState(max_age=30.0)
    shared.metrics = BridgeMetrics()
    shared.required = ["prefect", "pubsub"]
    return shared


@pytest.fixture
def state(server: HealthServer) -> HealthState:
    return server.state


@pytest.fixture
def metrics(server: HealthServer) -> BridgeMetrics:
    return server.metrics


def test_port_zero_binds_a_free_port(server: HealthServer) -> None:
    assert server.port > 0


def test_unhealthy_before_any_check_names_every_dependency(server: HealthServer) -> None:
    status, content_type, body = get(server, "/healthz")
    assert status == 503
    assert content_type.startswith("text/plain")
    assert "prefect: no answer yet (never answered)" in body
    assert "pubsub: no answer yet (never answered)" in body


def test_healthy_only_once_every_required_dependency_answered(
        server: HealthServer, state: HealthState) -> None:
    state.ok("prefect")
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert "pubsub" in body
    assert "prefect" not in body
    state.ok("pubsub")
    assert get(server, "/healthz") == (200, "text/plain", "ok\n")


def test_failure_reason_is_reported(server: HealthServer, state: HealthState) -> None:
    state.ok("prefect")
    state.failed("pubsub", "subscription projects/p/subscriptions/s does not exist")
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert body == ("pubsub: subscription projects/p/subscriptions/s does not exist "
                    "(never answered)\n")


def test_stale_checks_make_it_unhealthy_again(server: HealthServer,
                                              state: HealthState) -> None:
    server.required = ["prefect"]
    state.max_age = 0.2
    state.ok("prefect")
    assert get(server, "/healthz")[0] == 200
    state.failed("prefect", "connection refused")  # a failure alone is not stale yet
    assert get(server, "/healthz")[0] == 200
    time.sleep(0.3)
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert body == "prefect: connection refused (last answered 0s ago)\n"
    state.ok("prefect")
    assert get(server, "/healthz")[0] == 200


def test_stale_without_recorded_error_is_unhealthy(server: HealthServer,
                                                   state: HealthState) -> None:
    server.required = ["prefect"]
    state.max_age = 0.1
    state.ok("prefect")
    assert get(server, "/healthz")[0] == 200
    time.sleep(0.2)  # the health loop stopped reporting altogether
    status, _, body = get(server, "/healthz")
    assert status == 503
    assert body.startswith("prefect: ")


def test_metrics_are_served_in_prometheus_text_format(
        server: HealthServer, metrics: BridgeMetrics) -> None:
    metrics.received.inc(3)
    metrics.emitted.inc(2)
    metrics.ignored.labels(why="bucket").inc()
    metrics.pending.set(1)
    metrics.emit_latency.observe(0.3)
    status, content_type, body = get(server, "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert "version=" in content_type
    assert "# TYPE bridge_received_total counter" in body.splitlines()
    assert "bridge_received_total 3.0" in body.splitlines()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(body)
        for s in family.samples
    }
    assert samples[("bridge_received_total", ())] == 3
    assert samples[("bridge_emitted_total", ())] == 2
    assert samples[("bridge_acked_total", ())] == 0
    assert samples[("bridge_ignored_total", (("why", "bucket"),))] == 1
    assert samples[("bridge_pending", ())] == 1
    assert samples[("bridge_store_latency_seconds_count", ())] == 1
    assert samples[("bridge_store_latency_seconds_bucket", (("le", "0.5"),))] == 1
    assert samples[("bridge_store_latency_seconds_bucket", (("le", "0.25"),))] == 0


def test_metrics_do_not_leak_between_bridges(server: HealthServer) -> None:
    other = BridgeMetrics()
    other.received.inc(7)
    _, _, body = get(server, "/metrics")
    assert "bridge_received_total 0.0" in body.splitlines()


@pytest.mark.parametrize("path", ["/", "/health", "/healthz/extra", "/metricsx"])
def test_unknown_path_is_404(server: HealthServer, path: str) -> None:
    status, _, body = get(server, path)
    assert status == 404
    assert "/healthz" in body


def test_query_string_does_not_change_the_route(server: HealthServer,
                                                state: HealthState) -> None:
    state.ok("prefect")
    state.ok("pubsub")
    assert get(server, "/healthz?probe=liveness")[0] == 200


def test_stop_closes_the_port_and_leaves_no_thread() -> None:
    srv = HealthServer(HealthState(), BridgeMetrics(), [], port=0, host="127.0.0.1").start()
    port = srv.port
    assert get(srv, "/healthz") == (200, "text/plain", "ok\n")  # nothing required
    thread = srv._thread
    assert thread.name == "bridge-health"
    assert thread in threading.enumerate()
    srv.stop()
    assert not thread.is_alive()
    assert thread not in threading.enumerate()
    with pytest.raises(urllib.error.URLError):
        _OPENER.open(f"http://127.0.0.1:{port}/healthz", timeout=2)


def test_a_hung_check_does_not_starve_the_other() -> None:
    """Prefect accepting connections and never answering must not make Pub/Sub look stale."""
    state = HealthState(max_age=30.0)
    answered = 0

    async def hangs() -> None:
        await asyncio.Event().wait()

    async def answers() -> None:
        nonlocal answered
        answered += 1

    async def scenario() -> None:
        stop = asyncio.Event()
        checks = asyncio.create_task(run_checks({"prefect": hangs, "pubsub": answers}, state,
                                                stop, every=0.05, timeout=0.3))
        # Positive signal: the hung probe has timed out once; meanwhile the other kept going.
        while "prefect" not in state.last_error:
            await asyncio.sleep(0.01)
        stop.set()
        await asyncio.wait_for(checks, 5)

    asyncio.run(scenario())
    assert answered >= 3
    assert state.problems(["pubsub"]) == []
    assert state.problems(["prefect"]) == ["prefect: no answer within 0.3s (never answered)"]


def test_a_failing_check_reports_its_error_and_recovers() -> None:
    state = HealthState(max_age=30.0)
    outcomes = iter([ConnectionRefusedError(), None])

    async def flaky() -> None:
        outcome = next(outcomes, None)
        if outcome is not None:
            raise outcome

    async def scenario() -> None:
        stop = asyncio.Event()
        checks = asyncio.create_task(run_checks({"prefect": flaky}, state, stop, every=0.01))
        while "prefect" not in state.last_ok:
            assert "prefect" in state.last_error or not state.last_ok
            await asyncio.sleep(0.005)
        stop.set()
        await asyncio.wait_for(checks, 5)

    asyncio.run(scenario())
    assert state.problems(["prefect"]) == []
    assert "prefect" not in state.last_error
