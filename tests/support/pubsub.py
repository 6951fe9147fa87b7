"""Reading a Pub/Sub emulator subscription to the end, for tests."""

from __future__ import annotations

import time
from typing import Any

from google.cloud import pubsub_v1


def drain(subscription: str, topic: str | None = None, timeout: float = 60) -> list[Any]:
    """Every message of `subscription` (acked), read until a sentinel published to `topic`
    (default: the subscription's own) comes through: the positive signal that nothing
    published before it is still on its way."""
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = topic or subscriber.get_subscription(subscription=subscription).topic
    sentinel = f"sentinel {time.time_ns()}".encode()
    publisher.publish(topic, sentinel).result(timeout=30)
    found: list[Any] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        pulled = subscriber.pull(subscription=subscription, max_messages=100, timeout=10)
        if pulled.received_messages:
            subscriber.acknowledge(subscription=subscription,
                                   ack_ids=[m.ack_id for m in pulled.received_messages])
        found += [m.message for m in pulled.received_messages]
        if any(m.data == sentinel for m in found):
            return [m for m in found if m.data != sentinel]
    raise AssertionError(f"the sentinel never came through {subscription}")
