"""Read the dead-letter subscription, and send its messages back to the bridge's topic.

Pub/Sub moves a notification to the dead-letter topic after
TAXI_PUBSUB_MAX_DELIVERY_ATTEMPTS failed deliveries; nothing reads it there, so
without this module those objects are never processed (until the reconcile
finds them). `replay` republishes each message (same data, same notification
attributes) to TAXI_PUBSUB_TOPIC and acks the dead letter only after the publish
is confirmed, so a crash in between duplicates a notification, never loses one.

A replay is safe against double processing: the bridge's event id derives from
(bucket, object, generation), not from the message id, so the server stores a
notification it already has once; and should an automation fire again anyway,
the transform keeps identical outputs and the load of a generation already
loaded answers `already_loaded`.

No Prefect server is needed: only the Pub/Sub clients of the profile.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from google.api_core import exceptions as gexc

from taxi_pipeline.gcp import clients as gcp_clients
from taxi_pipeline.settings import DEAD_LETTER_SUBSCRIPTION_SUFFIX, Settings

log = logging.getLogger(__name__)

# Attributes Pub/Sub adds when it dead-letters a message; they describe the
# dead-lettering, not the notification, so a replay drops them.
DEAD_LETTER_ATTRIBUTE_PREFIX = "CloudPubSubDeadLetterSource"
DELIVERY_COUNT_ATTRIBUTE = "CloudPubSubDeadLetterSourceDeliveryCount"
SOURCE_PUBLISH_TIME_ATTRIBUTE = "CloudPubSubDeadLetterSourceTopicPublishTime"
# Messages are leased this long while they are listed or replayed (Pub/Sub's maximum
# is 600 s); a crash meanwhile leaves them in the subscription after that.
LEASE_SECONDS = 120
PULL_BATCH = 100
PULL_TIMEOUT = 3.0
PUBLISH_TIMEOUT = 60.0
# A pull may come back empty while messages remain (Pub/Sub answers quickly rather
# than completely); this many empty pulls in a row end the read.
EMPTY_PULLS = 2


@dataclass(frozen=True)
class DeadLetter:
    """One message of the dead-letter subscription, as pulled."""

    message_id: str
    publish_time: datetime | None
    data: bytes
    attributes: dict[str, str]
    ack_id: str = field(repr=False)

    @property
    def object_uri(self) -> str:
        """gs://bucket/object of the notification, or "" when it names none."""
        bucket, name = self.attributes.get("bucketId"), self.attributes.get("objectId")
        return f"gs://{bucket}/{name}" if bucket and name else ""

    @property
    def generation(self) -> str:
        return self.attributes.get("objectGeneration", "")

    @property
    def delivery_attempts(self) -> int | None:
        """How often the bridge's subscription delivered it before giving up, if known."""
        value = self.attributes.get(DELIVERY_COUNT_ATTRIBUTE, "")
        return int(value) if value.isdigit() else None

    @property
    def replay_attributes(self) -> dict[str, str]:
        """The notification's own attributes: what GCS published, nothing Pub/Sub added."""
        return {k: v for k, v in self.attributes.items()
                if not k.startswith(DEAD_LETTER_ATTRIBUTE_PREFIX)}

    @property
    def first_published(self) -> str:
        """When the notification was first published (not when it was dead-lettered)."""
        original = self.attributes.get(SOURCE_PUBLISH_TIME_ATTRIBUTE)
        if original:
            return original
        return self.publish_time.isoformat() if self.publish_time else "?"

    def describe(self) -> str:
        attempts = "?" if self.delivery_attempts is None else str(self.delivery_attempts)
        published = self.first_published
        what = self.object_uri or f"(not an object notification: {len(self.data)} bytes, " \
            f"attributes {sorted(self.attributes)})"
        generation = f" generation {self.generation}" if self.generation else ""
        return (f"{what}{generation} published {published} delivery attempts {attempts} "
                f"message {self.message_id}")


@dataclass
class ReplayReport:
    replayed: list[DeadLetter] = field(default_factory=list)
    failed: list[tuple[DeadLetter, str]] = field(default_factory=list)


def subscription_id(settings: Settings) -> str:
    """The dead-letter subscription `taxi-pipeline gcp setup` creates."""
    return settings.pubsub_dead_letter_topic + DEAD_LETTER_SUBSCRIPTION_SUFFIX


class DeadLetterQueue:
    """The dead-letter subscription of the settings, and the topic replays go to."""

    def __init__(self, settings: Settings, subscriber: Any = None, publisher: Any = None
                 ) -> None:
        settings.require("gcp_project")
        self.subscriber = subscriber or gcp_clients.subscriber_client(settings)
        self.publisher = publisher or gcp_clients.publisher_client(settings)
        self.path = self.subscriber.subscription_path(settings.gcp_project,
                                                      subscription_id(settings))
        self.topic = self.publisher.topic_path(settings.gcp_project, settings.pubsub_topic)

    def _pull(self, limit: int | None) -> Iterator[list[DeadLetter]]:
        """Batches of leased messages, each message once, until the subscription is
        (as far as pulls can tell) empty or `limit` messages were pulled.

        Callers release what they do not ack only once the pull is over: a message
        released meanwhile would come straight back and the read would never end.
        """
        seen: set[str] = set()
        twice: list[str] = []  # delivered again while we read (a lapsed lease)
        try:
            yield from self._pull_rounds(limit, seen, twice)
        finally:
            self.release(twice)

    def _pull_rounds(self, limit: int | None, seen: set[str], twice: list[str]
                     ) -> Iterator[list[DeadLetter]]:
        empty = 0
        while empty < EMPTY_PULLS and (limit is None or len(seen) < limit):
            wanted = PULL_BATCH if limit is None else min(PULL_BATCH, limit - len(seen))
            try:
                response = self.subscriber.pull(subscription=self.path, max_messages=wanted,
                                                timeout=PULL_TIMEOUT)
            except gexc.NotFound:
                raise RuntimeError(
                    f"dead-letter subscription {self.path} does not exist: run `taxi-pipeline "
                    "gcp setup` (it creates it; without it dead letters are dropped)") from None
            except gexc.DeadlineExceeded:  # nothing to deliver within the timeout
                response = None
            received = list(response.received_messages) if response is not None else []
            if received:
                # Hold them while they are shown or republished, not the subscription's
                # default ack deadline.
                self.subscriber.modify_ack_deadline(
                    subscription=self.path, ack_ids=[m.ack_id for m in received],
                    ack_deadline_seconds=LEASE_SECONDS)
            batch = []
            for item in received:
                message = item.message
                if message.message_id in seen:
                    twice.append(item.ack_id)
                    continue
                seen.add(message.message_id)
                batch.append(DeadLetter(
                    message_id=message.message_id,
                    publish_time=message.publish_time or None,
                    data=bytes(message.data),
                    attributes=dict(message.attributes),
                    ack_id=item.ack_id,
                ))
            empty = 0 if batch else empty + 1
            if batch:
                yield batch

    def release(self, ack_ids: list[str]) -> None:
        """Give messages back to the subscription at once, unchanged."""
        if ack_ids:
            self.subscriber.modify_ack_deadline(subscription=self.path, ack_ids=ack_ids,
                                                ack_deadline_seconds=0)

    def list(self, limit: int | None = None) -> list[DeadLetter]:
        """Up to `limit` dead letters; each stays in the subscription."""
        found: list[DeadLetter] = []
        leased: list[str] = []
        try:
            for batch in self._pull(limit):
                found += batch
                leased += [d.ack_id for d in batch]
        finally:
            self.release(leased)
        return found

    def replay(self, limit: int | None = None, dry_run: bool = False) -> ReplayReport:
        """Republish each dead letter to the topic, then ack it; `dry_run` only lists."""
        report = ReplayReport()
        if dry_run:
            report.replayed = self.list(limit)
            return report
        try:
            self._replay(limit, report)
        finally:  # failed ones stay dead-lettered, available to the next replay at once
            self.release([letter.ack_id for letter, _ in report.failed])
        return report

    def _replay(self, limit: int | None, report: ReplayReport) -> None:
        for batch in self._pull(limit):
            futures = [(d, self.publisher.publish(self.topic, d.data, **d.replay_attributes))
                       for d in batch]
            done: list[DeadLetter] = []
            for letter, future in futures:
                try:
                    new_id = future.result(timeout=PUBLISH_TIMEOUT)
                except Exception as exc:
                    report.failed.append((letter, f"{type(exc).__name__}: {exc}"))
                    log.warning("replay of message=%s uri=%s failed: %s", letter.message_id,
                                letter.object_uri, exc)
                    continue
                log.info("replayed message=%s uri=%s as message=%s", letter.message_id,
                         letter.object_uri, new_id)
                done.append(letter)
            if done:  # only now: a crash before this line duplicates, never loses
                self.subscriber.acknowledge(subscription=self.path,
                                            ack_ids=[d.ack_id for d in done])
            report.replayed += done

