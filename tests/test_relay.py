"""The relay (pubsub_bridge/relay.py): emit now, ack only what the server has stored."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from functools import partial
from uuid import UUID

import pytest
from prefect.events import Event

from pubsub_bridge import relay as relay_module
from pubsub_bridge.metrics import BridgeMetrics
from pubsub_bridge.relay import Relay, Submission
from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef

PREFIXES = {"raw": "raw/", "processed": "processed/"}


class FakeDelivery:
    """Stands in for EventDelivery: records emits, answers `stored` from a set of ids."""

    def __init__(self) -> None:
        self.emits: list[list[Event]] = []  # successful emit calls
        self.attempts = 0
        self.fail_emit = False
        self.fail_stored = False
        self.stored_ids: set[UUID] = set()
        self.stored_calls: list[list[UUID]] = []
        self.hang = False  # a server that accepts the call and never answers

    async def _maybe_hang(self) -> None:
        if self.hang:
            await asyncio.Event().wait()

    async def emit(self, events: Iterable[Event]) -> None:
        batch = list(events)
        self.attempts += 1
        await self._maybe_hang()
        if self.fail_emit:
            raise ConnectionError("prefect server unreachable")
        self.emits.append(batch)

    async def stored(self, events: list[Event]) -> set[UUID]:
        self.stored_calls.append([e.id for e in events])
        await self._maybe_hang()
        if self.fail_stored:
            raise ConnectionError("events API down")
        return {e.id for e in events if e.id in self.stored_ids}

    @property
    def emitted_ids(self) -> list[UUID]:
        return [e.id for batch in self.emits for e in batch]


def event(n: int) -> Event:
    ref = ObjectRef(bucket="taxi-bucket", name=f"raw/yellow/2024/yellow_tripdata_2024-{n:02}"
                    ".parquet", generation=1000 + n)
    return events.object_finalized(ref, PREFIXES)


def submission(ev: Event, calls: list[tuple[str, str]], tag: str) -> Submission:
    return Submission(ev, ack=partial(calls.append, ("ack", tag)),
                      nack=partial(calls.append, ("nack", tag)))


def make() -> tuple[Relay, FakeDelivery, BridgeMetrics, list[tuple[str, str]]]:
    delivery = FakeDelivery()
    metrics = BridgeMetrics()
    relay = Relay(delivery, metrics, resend_after=3600)  # type: ignore[arg-type]
    return relay, delivery, metrics, []


def test_submit_emits_and_keeps_pending_without_acking() -> None:
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)
    ok = asyncio.run(relay.submit([submission(a, calls, "a"), submission(b, calls, "b")]))
    assert ok is True
    assert delivery.emitted_ids == [a.id, b.id]
    assert len(delivery.emits) == 1  # one batch
    assert set(relay.pending) == {a.id, b.id}
    assert calls == []
    assert metrics.value("emitted") == 2
    assert metrics.value("pending") == 2
    assert metrics.value("acked") == 0


def test_confirm_acks_exactly_the_stored_ones() -> None:
    relay, delivery, metrics, calls = make()
    a, b, c = event(1), event(2), event(3)

    async def scenario() -> tuple[int, int, int]:
        await relay.submit([submission(a, calls, "a"), submission(b, calls, "b"),
                            submission(c, calls, "c")])
        delivery.stored_ids = {a.id, c.id}
        first = await relay.confirm()
        assert calls == [("ack", "a"), ("ack", "c")] or calls == [("ack", "c"), ("ack", "a")]
        assert set(relay.pending) == {b.id}
        assert metrics.value("stored") == 2
        assert metrics.value("acked") == 2
        assert metrics.value("pending") == 1
        again = await relay.confirm()  # a and c are not acked a second time
        assert len(calls) == 2
        delivery.stored_ids.add(b.id)
        last = await relay.confirm()
        return first, again, last

    assert asyncio.run(scenario()) == (2, 0, 1)
    assert sorted(calls) == [("ack", "a"), ("ack", "b"), ("ack", "c")]
    assert relay.pending == {}
    assert metrics.value("stored") == 3
    assert metrics.value("acked") == 3
    assert metrics.value("pending") == 0
    assert metrics.value("nacked") == 0
    assert metrics.registry.get_sample_value("bridge_store_latency_seconds_count") == 3
    # only pending events are asked about
    assert delivery.stored_calls[-1] == [b.id]
    assert delivery.emitted_ids == [a.id, b.id, c.id]  # nothing re-emitted


def test_confirm_with_nothing_pending_does_not_ask_the_server() -> None:
    relay, delivery, _, _ = make()
    assert asyncio.run(relay.confirm()) == 0
    assert delivery.stored_calls == []


def test_duplicate_while_pending_is_not_emitted_again_and_both_acks_fire() -> None:
    relay, delivery, metrics, calls = make()
    a = event(1)

    async def scenario() -> None:
        assert await relay.submit([submission(a, calls, "first")])
        assert await relay.submit([submission(a, calls, "redelivery")])
        assert delivery.attempts == 1
        assert calls == []
        delivery.stored_ids = {a.id}
        assert await relay.confirm() == 1

    asyncio.run(scenario())
    assert delivery.emitted_ids == [a.id]
    assert calls == [("ack", "first"), ("ack", "redelivery")]
    assert metrics.value("emitted") == 1
    assert metrics.value("stored") == 1
    assert metrics.value("acked") == 2
    assert relay.pending == {}


def test_duplicate_within_one_batch_is_emitted_once_and_both_acked() -> None:
    relay, delivery, metrics, calls = make()
    a = event(1)

    async def scenario() -> None:
        assert await relay.submit([submission(a, calls, "m1"), submission(a, calls, "m2")])
        delivery.stored_ids = {a.id}
        await relay.confirm()

    asyncio.run(scenario())
    assert sorted(calls) == [("ack", "m1"), ("ack", "m2")]
    assert delivery.emitted_ids == [a.id]
    assert metrics.value("emitted") == 1


def test_emit_failure_nacks_every_fresh_submission_and_returns_false() -> None:
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)
    delivery.fail_emit = True
    ok = asyncio.run(relay.submit([submission(a, calls, "a"), submission(b, calls, "b")]))
    assert ok is False
    assert calls == [("nack", "a"), ("nack", "b")]
    assert relay.pending == {}
    assert metrics.value("nacked") == 2
    assert metrics.value("emitted") == 0
    assert metrics.value("acked") == 0
    # once the server is back, the redelivery goes through
    delivery.fail_emit = False
    assert asyncio.run(relay.submit([submission(a, calls, "a2")])) is True
    assert set(relay.pending) == {a.id}
    assert delivery.emitted_ids == [a.id]


def test_emit_failure_leaves_duplicates_of_pending_events_attached() -> None:
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)

    async def scenario() -> None:
        assert await relay.submit([submission(a, calls, "a1")])
        delivery.fail_emit = True
        assert await relay.submit([submission(a, calls, "a2"), submission(b, calls, "b")]) \
            is False
        assert calls == [("nack", "b")]  # a2 joined the pending a, it is not nacked
        delivery.stored_ids = {a.id}
        await relay.confirm()

    asyncio.run(scenario())
    assert calls == [("nack", "b"), ("ack", "a1"), ("ack", "a2")]
    assert metrics.value("nacked") == 1
    assert metrics.value("acked") == 2


def test_overdue_events_are_reemitted_with_the_same_id() -> None:
    delivery = FakeDelivery()
    metrics = BridgeMetrics()
    relay = Relay(delivery, metrics, resend_after=0)  # type: ignore[arg-type]
    calls: list[tuple[str, str]] = []
    a, b = event(1), event(2)

    async def scenario() -> None:
        await relay.submit([submission(a, calls, "a"), submission(b, calls, "b")])
        time.sleep(0.01)
        delivery.stored_ids = {b.id}
        assert await relay.confirm() == 1

    asyncio.run(scenario())
    assert len(delivery.emits) == 2
    assert [e.id for e in delivery.emits[1]] == [a.id]  # b was stored: not re-emitted
    assert delivery.emits[1][0] is a  # the very same event, same id
    assert calls == [("ack", "b")]
    assert set(relay.pending) == {a.id}
    assert metrics.value("resent") == 1
    assert metrics.value("emitted") == 2  # resends are counted apart


def test_events_not_yet_overdue_are_not_reemitted() -> None:
    relay, delivery, metrics, calls = make()  # resend_after=3600

    async def scenario() -> None:
        await relay.submit([submission(event(1), calls, "a")])
        await relay.confirm()
        await relay.confirm()

    asyncio.run(scenario())
    assert delivery.attempts == 1
    assert metrics.value("resent") == 0


def test_failed_reemit_keeps_the_event_pending_without_nacking() -> None:
    delivery = FakeDelivery()
    metrics = BridgeMetrics()
    relay = Relay(delivery, metrics, resend_after=0)  # type: ignore[arg-type]
    calls: list[tuple[str, str]] = []
    a = event(1)

    async def scenario() -> None:
        await relay.submit([submission(a, calls, "a")])
        time.sleep(0.01)
        delivery.fail_emit = True
        assert await relay.confirm() == 0

    asyncio.run(scenario())
    assert delivery.attempts == 2
    assert set(relay.pending) == {a.id}
    assert calls == []
    assert metrics.value("resent") == 0
    assert metrics.value("nacked") == 0


def test_release_all_nacks_every_pending_source() -> None:
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)

    async def scenario() -> None:
        await relay.submit([submission(a, calls, "a1"), submission(b, calls, "b")])
        await relay.submit([submission(a, calls, "a2")])
        delivery.stored_ids = {b.id}
        await relay.confirm()

    asyncio.run(scenario())
    assert metrics.value("pending") == 1
    relay.release_all()
    assert calls == [("ack", "b"), ("nack", "a1"), ("nack", "a2")]
    assert relay.pending == {}
    assert metrics.value("pending") == 0
    assert metrics.value("nacked") == 2
    relay.release_all()  # nothing left to nack twice
    assert metrics.value("nacked") == 2


def test_failing_stored_acks_nothing() -> None:
    relay, delivery, metrics, calls = make()
    a = event(1)

    async def scenario() -> int:
        await relay.submit([submission(a, calls, "a")])
        delivery.stored_ids = {a.id}  # it is stored, but the read-back fails
        delivery.fail_stored = True
        return await relay.confirm()

    assert asyncio.run(scenario()) == 0
    assert calls == []
    assert set(relay.pending) == {a.id}
    assert metrics.value("acked") == 0
    assert metrics.value("stored") == 0
    assert metrics.value("pending") == 1
    # the next successful read-back acks it
    delivery.fail_stored = False
    assert asyncio.run(relay.confirm()) == 1
    assert calls == [("ack", "a")]


def test_drain_holds_its_limit_when_the_server_never_answers() -> None:
    """SIGTERM with Prefect hung: shutdown takes the drain limit, not the client's retries."""
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)

    async def scenario() -> float:
        await relay.submit([submission(a, calls, "a"), submission(b, calls, "b")])
        delivery.hang = True
        started = time.monotonic()
        await asyncio.wait_for(relay.drain(1.0), 30)  # fail, not hang, if unbounded
        return time.monotonic() - started

    took = asyncio.run(scenario())
    assert took < 2.0, f"drain took {took:.1f}s with a 1s limit"
    assert sorted(calls) == [("nack", "a"), ("nack", "b")]
    assert relay.pending == {}
    assert metrics.value("nacked") == 2


def test_a_hung_emit_is_abandoned_and_nacked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "CALL_TIMEOUT", 0.2)
    relay, delivery, _, calls = make()
    delivery.hang = True
    assert asyncio.run(relay.submit([submission(event(1), calls, "a")])) is False
    assert calls == [("nack", "a")]
    assert relay.pending == {}
