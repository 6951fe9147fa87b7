"""The emulator/gcp notification source: a Pub/Sub streaming pull.

The subscriber client delivers messages on its own threads; they are handed to
the asyncio loop, turned into events and given to the relay, which acks each
message only once its event is read back from the Prefect server. While a
message waits, the client's lease manager keeps extending its ack deadline (up
to FlowControl.max_lease_duration = TAXI_PUBSUB_MAX_HOLD_SECONDS, the
subscription's retention), so nothing expires mid-confirmation.

While the Prefect server is unreachable the relay holds the messages instead
of nacking them (a nack costs a delivery attempt; enough of them dead-letter a
valid notification), and flow control stops the pull once
TAXI_PUBSUB_MAX_MESSAGES are outstanding. Held messages are never nacked for
their age (see `relay_for`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

from google.api_core import exceptions as gexc
from google.cloud import pubsub_v1  # type: ignore[attr-defined]
from google.cloud.pubsub_v1.subscriber.message import Message
from prefect.events import Event

from pubsub_bridge.health import HealthState, run_checks
from pubsub_bridge.metrics import BridgeMetrics
from pubsub_bridge.notifications import Ignored, Rejected, Scope, parse_notification
from pubsub_bridge.relay import Relay, Submission
from taxi_pipeline import events
from taxi_pipeline.event_delivery import EventDelivery
from taxi_pipeline.gcp.clients import subscriber_client
from taxi_pipeline.settings import Settings

log = logging.getLogger(__name__)

BATCH = 500
CONSUME_PERMISSION = "pubsub.subscriptions.consume"
CONFIRM_EVERY = 0.5


def relay_for(delivery: EventDelivery, metrics: BridgeMetrics, settings: Settings) -> Relay:
    """The relay of the Pub/Sub bridge: it never nacks a message for its age.

    A nack is a delivery attempt, and the subscription dead-letters a valid
    notification after TAXI_PUBSUB_MAX_DELIVERY_ATTEMPTS of them; nacking every
    55 minutes dead-lettered everything after a Prefect outage of about 9 hours.
    Instead the client extends the message's lease for up to
    TAXI_PUBSUB_MAX_HOLD_SECONDS (FlowControl.max_lease_duration, whose one-hour
    default is the client library's, not a Pub/Sub limit), which is set to the
    subscription's message retention: past it Pub/Sub drops the message anyway.
    If the client stops extending earlier, Pub/Sub redelivers the message and the
    relay joins it to the held event (same id). The age of the oldest waiting
    message is the gauge `bridge_oldest_held_seconds`, which the alert watches.
    """
    return Relay(delivery, metrics, resend_after=settings.bridge_confirm_seconds,
                 max_hold=None)


def flow_control(settings: Settings) -> pubsub_v1.types.FlowControl:
    return pubsub_v1.types.FlowControl(
        max_messages=settings.pubsub_max_messages,
        max_bytes=settings.pubsub_max_bytes,
        # Hold (keep extending the lease) for as long as the message can exist.
        max_lease_duration=settings.pubsub_max_hold_seconds,
        # Each lease extension is at most the subscription's ack deadline, so the
        # messages a crashed bridge held come back within that time, not 10 minutes.
        max_duration_per_lease_extension=settings.pubsub_ack_deadline_seconds,
    )


def rejected_event(subscription: str, message: Message, error: Rejected) -> Event:
    """`pipeline.notification.rejected`: the poison message, recorded where people look.

    The id is derived from the message id, so a redelivery is stored once.
    """
    preview = bytes(message.data[:1024]).decode("utf-8", errors="replace")
    return events.notification_rejected(
        {
            "prefect.resource.id": f"pubsub://{subscription}/messages/{message.message_id}",
            "pubsub.subscription": subscription,
        },
        error.why,
        error.detail,
        key=f"{subscription}\x00{message.message_id}",
        attributes=dict(message.attributes),
        data_preview=preview,
        data_bytes=len(message.data),
        message_id=message.message_id,
    )


def scope_of(settings: Settings) -> Scope:
    return Scope(buckets=frozenset({settings.bucket}) if settings.bucket else frozenset(),
                 prefixes=(settings.raw_prefix, settings.processed_prefix))


class PubSubSource:
    """Streaming pull into an asyncio queue, with flow control from the settings."""

    def __init__(self, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        settings.require("gcp_project", "pubsub_subscription")
        self.settings = settings
        self.loop = loop
        self.queue: asyncio.Queue[Message] = asyncio.Queue()
        self.client = subscriber_client(settings)
        self.path = self.client.subscription_path(settings.gcp_project,
                                                  settings.pubsub_subscription)
        self.future: Any = None

    def _on_message(self, message: Message) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, message)

    def can_consume(self, timeout: float = 30) -> None:
        """Raise unless this identity may pull from the subscription.

        `testIamPermissions` needs no permission of its own, so the bridge's
        service account needs only roles/pubsub.subscriber on its subscription
        (`get_subscription` would need pubsub.subscriptions.get, which that role
        lacks). The emulator has no IAM; there the subscription is read instead.
        """
        try:
            granted = self.client.test_iam_permissions(
                request={"resource": self.path, "permissions": [CONSUME_PERMISSION]},
                timeout=timeout).permissions
        except gexc.MethodNotImplemented:
            try:
                self.client.get_subscription(subscription=self.path, timeout=timeout)
            except gexc.NotFound:
                raise RuntimeError(
                    f"subscription {self.path} does not exist: run `taxi-pipeline gcp setup` "
                    "(or create it with gcloud, see docs/gcp.md)") from None
            return
        if CONSUME_PERMISSION not in granted:
            raise RuntimeError(
                f"cannot pull from {self.path}: it does not exist, or this identity lacks "
                "roles/pubsub.subscriber on it. Run `taxi-pipeline gcp setup` and grant the "
                "bridge's service account that role on the subscription (see k8s/README.md).")

    def start(self) -> None:
        self.can_consume()
        self.future = self.client.subscribe(self.path, self._on_message,
                                            flow_control=flow_control(self.settings))
        log.info("pulling %s (max %d messages, %d bytes outstanding)", self.path,
                 self.settings.pubsub_max_messages, self.settings.pubsub_max_bytes)

    def check(self) -> None:
        """Raise if the streaming pull died or Pub/Sub does not answer (health loop)."""
        if self.future is not None and self.future.done():
            raise RuntimeError(f"streaming pull stopped: {self.future.exception()}")
        self.can_consume(timeout=10)

    async def take(self, limit: int, wait: float) -> list[Message]:
        batch: list[Message] = []
        with contextlib.suppress(TimeoutError):
            batch.append(await asyncio.wait_for(self.queue.get(), timeout=wait))
        while batch and len(batch) < limit and not self.queue.empty():
            batch.append(self.queue.get_nowait())
        return batch

    def stop_pulling(self) -> None:
        if self.future is not None:
            self.future.cancel()
            with contextlib.suppress(Exception):
                self.future.result(timeout=10)

    def release_queued(self) -> int:
        """Nack what was pulled but never submitted, so it is redelivered at once."""
        count = 0
        while not self.queue.empty():
            self.queue.get_nowait().nack()
            count += 1
        return count

    def close(self) -> None:
        self.client.close()


def to_submission(message: Message, settings: Settings, scope: Scope, source: PubSubSource,
                  metrics: BridgeMetrics) -> Submission | None:
    """An event for the relay, or None when the message is acked as out of scope."""
    received = time.monotonic()
    metrics.received.inc()
    prefixes = settings.stage_prefixes
    try:
        ref = parse_notification(message.attributes, message.data, scope)
    except Ignored as ignored:
        metrics.ignored.labels(why=ignored.why.split(":")[0]).inc()
        log.info("ignored message=%s why=%s object=gs://%s/%s", message.message_id, ignored.why,
                 message.attributes.get("bucketId"), message.attributes.get("objectId"))
        message.ack()
        return None
    except Rejected as rejected:
        metrics.rejected.labels(why=rejected.why).inc()
        log.warning("rejected message=%s: %s", message.message_id, rejected)
        return Submission(rejected_event(source.path, message, rejected),
                          ack=message.ack, nack=message.nack, received_at=received)
    event = events.object_finalized(ref, prefixes, message_id=message.message_id,
                                    publish_time=message.publish_time)
    return Submission(event, ack=message.ack, nack=message.nack, received_at=received)


async def run_pubsub_bridge(settings: Settings, stop: asyncio.Event, metrics: BridgeMetrics,
                            health: HealthState) -> None:
    """Pull until `stop` is set; then stop pulling and finish what is in flight."""
    source = PubSubSource(settings, asyncio.get_running_loop())
    scope = scope_of(settings)
    source.start()
    async with EventDelivery() as delivery:
        relay = relay_for(delivery, metrics, settings)
        health_task = asyncio.create_task(run_checks(
            {"pubsub": lambda: asyncio.to_thread(source.check),
             "prefect": delivery.healthcheck},
            health, stop))
        last_confirm = 0.0
        try:
            while not stop.is_set():
                if source.future is not None and source.future.done():
                    raise RuntimeError(f"streaming pull stopped: {source.future.exception()}")
                messages = await source.take(BATCH, wait=0.2)
                submissions = [s for m in messages
                               if (s := to_submission(m, settings, scope, source, metrics))]
                if submissions:  # Prefect unreachable: held, emitted again with backoff
                    await relay.submit(submissions)
                if relay.busy and time.monotonic() - last_confirm >= CONFIRM_EVERY:
                    await relay.confirm()
                    last_confirm = time.monotonic()
        finally:
            log.info("stopping: finishing %d in-flight events (%d held)", len(relay.pending),
                     len(relay.held))
            # Acks and nacks only reach Pub/Sub while the stream is open, so finish
            # first and close last: messages that arrive meanwhile are nacked at once
            # (redelivered now, not after their lease runs out); emitted events get a
            # last chance to be confirmed and acked; whatever is left is nacked.
            released = [source.release_queued()]
            await relay.drain(20.0, tick=lambda: released.append(source.release_queued()))
            released.append(source.release_queued())
            source.stop_pulling()
            released.append(source.release_queued())
            health_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health_task
            source.close()
            log.info("stopped (%d queued messages released)", sum(released))
