"""The pipeline exporter: follows Prefect's event stream and serves Prometheus metrics.

Its own process (`python -m taxi_pipeline.monitoring`), not a role of the bridge:
the bridge's job is to get every notification stored and acked, and it scales
with Pub/Sub traffic (several replicas on GKE), whereas the exporter must run
exactly once (two would export every counter twice) and must keep working while
the bridge is down or restarting, which is when its metrics matter. It needs
only read access: the Prefect API, a bucket listing and the load log.

Three loops share one `PipelineModel`:
- history: on start, the stored events of the last TAXI_MONITOR_LOOKBACK_HOURS
  rebuild the state (landings awaiting their load, runs in progress) without
  counting, so a restart resets counters as Prometheus expects;
- live: the events websocket (`get_events_subscriber`), reconnecting; events
  already seen (its replay of the last minute, a reconnect) are dropped by id;
- scan: every TAXI_MONITOR_SCAN_SECONDS, the reconcile logic (`find_stalled`)
  over one bucket listing and one load-log query, for the stalled gauges.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from taxi_pipeline.datasets.registry import tables
from taxi_pipeline.monitoring.http_server import MetricsHttpServer, PortInUse
from taxi_pipeline.monitoring.pipeline_metrics import PipelineMetrics, PipelineModel, ScanResult
from taxi_pipeline.objects import dataset_of
from taxi_pipeline.ops.reconcile import find_stalled
from taxi_pipeline.ops.status_model import LoadRecord, load_log
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import store_from_settings
from taxi_pipeline.warehouse import Warehouse, warehouse_from_settings

log = logging.getLogger(__name__)

FOLLOWED = ("pipeline.", "storage.object.")
# Events are read back this many at a time (the events API's page size).
READ_BATCH = 50

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


def new_model(settings: Settings, metrics: PipelineMetrics | None = None) -> PipelineModel:
    """A model with the settings' bounds; the configured datasets get labels first."""
    return PipelineModel(metrics or PipelineMetrics(), settings.monitor_max_tracked,
                         settings.monitor_max_label_values, settings.download_datasets)


def followed_filter(since: datetime | None = None, until: datetime | None = None) -> Any:
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventOrder,
    )

    filter_ = EventFilter(event=EventNameFilter(prefix=list(FOLLOWED)), order=EventOrder.ASC)
    if since is not None:
        window: dict[str, Any] = {"since": since}
        if until is not None:
            window["until"] = until
        filter_.occurred = EventOccurredFilter(**window)
    return filter_


async def rebuild(model: PipelineModel, since: datetime, until: datetime) -> int:
    """Fold the stored events of [since, until) into the state, counting nothing."""
    from prefect.client.orchestration import get_client

    seen = 0
    async with get_client() as client:
        page = await client.read_events(filter=followed_filter(since, until), limit=READ_BATCH)
        while True:
            for event in page.events:
                model.observe(event, count=False)
                seen += 1
            if not page.next_page:
                break
            page = await client.read_events_page(str(page.next_page))
    return seen


async def catch_up(model: PipelineModel, lookback: timedelta) -> None:
    """History until a pass is short enough for the stream's replay (a minute) to cover
    what happened during it."""
    since = datetime.now(UTC) - lookback
    while True:
        until = datetime.now(UTC)
        started = time.monotonic()
        seen = await rebuild(model, since, until)
        log.info("rebuilt the state from %d stored events since %s", seen, since.isoformat())
        if time.monotonic() - started < 30:
            return
        since = until


async def follow(model: PipelineModel, stop: asyncio.Event, retry_seconds: float = 2.0) -> None:
    """Fold the live events into the model until `stop`, reconnecting after any failure."""
    from prefect.events.clients import get_events_subscriber

    while not stop.is_set():
        try:
            async with get_events_subscriber(filter=followed_filter(),
                                             reconnect_on_clean_close=True) as events_:
                model.connected = True
                log.info("following the Prefect event stream")
                async for event in _until(events_, stop):
                    model.observe(event)
        except Exception as exc:
            model.metrics.subscribe_errors.inc()
            log.warning("event stream failed (%s: %s); reconnecting", type(exc).__name__, exc)
        finally:
            model.connected = False
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), retry_seconds)


async def _until(events_: Any, stop: asyncio.Event) -> Any:
    """The subscriber's events until `stop` is set (a stop wakes a quiet stream at once)."""
    iterator = aiter(events_)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        while True:
            nxt: asyncio.Future[Any] = asyncio.ensure_future(anext(iterator))
            waiting: set[asyncio.Future[Any]] = {nxt, stopping}
            done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
            if nxt not in done:
                nxt.cancel()
                return
            try:
                yield nxt.result()
            except StopAsyncIteration:
                return
    finally:
        stopping.cancel()


class _LoadLog:
    """`Warehouse.loaded` answered from one load-log read, so a scan of N objects costs
    one query (BigQuery bills each; DuckDB locks out loads while a reader holds it)."""

    def __init__(self, loads: dict[str, LoadRecord]) -> None:
        self._loads = loads

    def loaded(self, table: str, source_uri: str) -> tuple[int, int] | None:
        record = self._loads.get(source_uri)
        return None if record is None else (record.source_generation, record.rows)


def scan(settings: Settings, now: datetime | None = None) -> ScanResult:
    """The stalled and unloaded raw objects now, by the reconcile logic (blocking I/O)."""
    now = now or datetime.now(UTC)
    store = store_from_settings(settings)
    # Every dataset's table (trips, fhv_trips, fhvhv_trips), as status reads the log.
    loads = cast(Warehouse, _LoadLog(load_log(warehouse_from_settings(settings),
                                              tuple(tables(settings.table).values()))))
    stalled_after = timedelta(minutes=settings.reconcile_after_minutes)
    stalled: dict[str, int] = {}
    oldest_stalled: float | None = None
    oldest_unloaded: float | None = None
    for item in find_stalled(store, loads, settings, timedelta(0), now):
        landed = (item.obj.updated or item.obj.created or now).timestamp()
        oldest_unloaded = landed if oldest_unloaded is None else min(oldest_unloaded, landed)
        if now.timestamp() - landed >= stalled_after.total_seconds():
            dataset = dataset_of(item.obj.name)
            stalled[dataset] = stalled.get(dataset, 0) + 1
            oldest_stalled = landed if oldest_stalled is None else min(oldest_stalled, landed)
    newest: float | None = None
    for obj in store.list(settings.raw_prefix):
        if obj.updated is not None:
            newest = max(newest or 0.0, obj.updated.timestamp())
    return ScanResult(time.time(), stalled, oldest_stalled, oldest_unloaded, newest)


async def scan_loop(model: PipelineModel, settings: Settings, stop: asyncio.Event) -> None:
    """Refresh the stalled gauges until `stop`; a failed scan keeps the last values."""
    while not stop.is_set():
        try:
            result = await asyncio.to_thread(scan, settings)
            # Labels through the model's cap, like every other dataset label.
            capped: dict[str, int] = {}
            for dataset, n in result.stalled.items():
                label = model.dataset(dataset)
                capped[label] = capped.get(label, 0) + n
            model.scan = ScanResult(result.at, capped, result.oldest_stalled_landed,
                                    result.oldest_unloaded_landed, result.newest_raw_landed)
        except Exception as exc:
            model.metrics.scan_errors.inc()
            log.warning("scan of the bucket and load log failed: %s: %s",
                        type(exc).__name__, exc)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), settings.monitor_scan_seconds)


# The exporter's port taken at start (`python -m taxi_pipeline.monitoring` says so).
MetricsPortInUse = PortInUse


class MetricsServer(MetricsHttpServer):
    """`/metrics` (Prometheus) and `/healthz` (following the stream) on a thread."""

    def __init__(self, model: PipelineModel, port: int, host: str = "") -> None:
        self.model = model
        super().__init__(
            lambda: self.model.metrics.registry,
            lambda: [] if self.model.connected else ["not following the Prefect event stream"],
            port, host, what="exporter's metrics", variable="TAXI_MONITOR_PORT",
            thread_name="exporter-http")


async def run(settings: Settings, stop: asyncio.Event, port: int | None = None) -> None:
    """Serve metrics at once (history may take a while), rebuild, then follow and scan."""
    model = new_model(settings)
    server = MetricsServer(model, settings.monitor_port if port is None else port).start()
    try:
        scanning = asyncio.ensure_future(scan_loop(model, settings, stop))
        lookback = timedelta(hours=settings.monitor_lookback_hours)
        while lookback and not stop.is_set():
            try:
                await catch_up(model, lookback)
                break
            except Exception as exc:  # the server may still be starting
                log.warning("reading event history failed (%s: %s); retrying",
                            type(exc).__name__, exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 2.0)
        await follow(model, stop)
        await scanning
    finally:
        server.stop()
