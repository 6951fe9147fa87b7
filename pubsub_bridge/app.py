"""The bridge's run loop: a source of object notifications -> stored Prefect events."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from functools import partial

from pubsub_bridge.directory_source import DirectorySource
from pubsub_bridge.health import HealthState
from pubsub_bridge.metrics import BridgeMetrics
from pubsub_bridge.relay import Relay, Submission
from taxi_pipeline import events
from taxi_pipeline.event_delivery import EventDelivery
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage.local import LocalStore

log = logging.getLogger(__name__)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), timeout=seconds)


async def drain(relay: Relay, seconds: float) -> None:
    """On shutdown, give in-flight events a last chance to be confirmed."""
    deadline = time.monotonic() + seconds
    while relay.pending and time.monotonic() < deadline:
        await relay.confirm()
        if relay.pending:
            await asyncio.sleep(0.5)
    if relay.pending:
        log.warning("%d events unconfirmed at shutdown; they will be announced again",
                    len(relay.pending))
    relay.release_all()


async def run_directory_bridge(settings: Settings, stop: asyncio.Event,
                               metrics: BridgeMetrics | None = None,
                               health: HealthState | None = None) -> None:
    """Watch the local bucket directory until `stop` is set."""
    metrics = metrics or BridgeMetrics()
    health = health or HealthState()
    store = LocalStore(settings.bucket_dir)
    prefixes = settings.stage_prefixes
    source = DirectorySource(
        store,
        list(prefixes.values()),
        settings.home / "bridge-state.json",
        metrics,
        settle_seconds=settings.settle_seconds,
        stall_seconds=settings.stall_seconds,
    )
    log.info("watching %s (prefixes %s)", store.root, ", ".join(prefixes.values()))
    async with EventDelivery() as delivery:
        relay = Relay(delivery, metrics, resend_after=settings.bridge_confirm_seconds)
        while not stop.is_set():
            ready = source.scan()
            if ready:
                await relay.submit([
                    Submission(events.object_finalized(ref, prefixes),
                               ack=partial(source.ack, ref), nack=partial(source.nack, ref))
                    for ref in ready
                ])
            await relay.confirm()
            source.flush()
            try:
                await delivery.healthcheck()
                health.ok("prefect")
            except Exception as exc:
                health.failed("prefect", str(exc))
            await _sleep_or_stop(stop, settings.poll_seconds)
        await drain(relay, 10.0)
        source.flush()
