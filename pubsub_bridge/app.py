"""The bridge's run loop: a source of object notifications -> stored Prefect events.

The directory loop never stops on one bad path: the source turns whatever it
cannot announce into rejections, and those travel as events like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from pubsub_bridge.directory_source import DirectorySource, rejected_event
from pubsub_bridge.health import HealthState, run_checks, sleep_or_stop
from pubsub_bridge.metrics import BridgeMetrics
from pubsub_bridge.relay import Relay, Submission
from taxi_pipeline import events
from taxi_pipeline.event_delivery import EventDelivery
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage.local import LocalStore

log = logging.getLogger(__name__)


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
        lineage_prefixes=(settings.processed_prefix,),
    )
    log.info("watching %s (prefixes %s)", store.root, ", ".join(prefixes.values()))
    async with EventDelivery() as delivery:
        relay = Relay(delivery, metrics, resend_after=settings.bridge_confirm_seconds)
        health_task = asyncio.create_task(
            run_checks({"prefect": delivery.healthcheck}, health, stop))
        while not stop.is_set():
            submissions = [
                Submission(events.object_finalized(ref, prefixes),
                           ack=partial(source.ack, ref), nack=partial(source.nack, ref))
                for ref in source.scan()
            ]
            # What can never be announced is recorded like a poison Pub/Sub message:
            # stored through the same relay, and remembered as reported once stored.
            submissions += [
                Submission(rejected_event(rejection, store.bucket, prefixes),
                           ack=partial(source.ack_rejection, rejection),
                           nack=partial(source.nack_rejection, rejection))
                for rejection in source.rejections()
            ]
            if submissions:
                await relay.submit(submissions)
            await relay.confirm()
            source.flush()
            await sleep_or_stop(stop, settings.poll_seconds)
        await relay.drain(10.0)
        source.flush()
        health_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await health_task
