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


class Clock:
    """Stands in for the relay's `time`: monotonic seconds that a test moves on."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(relay_module, "time", fake)
    return fake


def test_emit_failure_holds_every_fresh_submission_without_nacking(clock: Clock) -> None:
    """A nack costs a Pub/Sub delivery attempt: an outage must not spend them."""
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)
    delivery.fail_emit = True
    ok = asyncio.run(relay.submit([submission(a, calls, "a"), submission(b, calls, "b")]))
    assert ok is False
    assert calls == []
    assert set(relay.held) == {a.id, b.id}
    assert relay.pending == {}
    assert relay.busy
    assert metrics.value("nacked") == 0
    assert metrics.value("emitted") == 0
    assert metrics.value("held") == 2
    assert metrics.value("emit_failures") == 1


def test_held_events_are_emitted_and_acked_once_the_server_is_back(clock: Clock) -> None:
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)

    async def scenario() -> None:
        delivery.fail_emit = True
        assert await relay.submit([submission(a, calls, "a"), submission(b, calls, "b")]) \
            is False
        clock.now += 1.0  # the first backoff
        assert await relay.confirm() == 0  # tried again, still down
        assert delivery.attempts == 2
        delivery.fail_emit = False
        clock.now += 2.0  # the backoff doubled
        await relay.confirm()  # emits the held events
        assert relay.held == {}
        assert set(relay.pending) == {a.id, b.id}
        delivery.stored_ids = {a.id, b.id}
        assert await relay.confirm() == 2

    asyncio.run(scenario())
    assert delivery.emitted_ids == [a.id, b.id]
    assert sorted(calls) == [("ack", "a"), ("ack", "b")]
    assert metrics.value("nacked") == 0
    assert metrics.value("emit_failures") == 2
    assert metrics.value("held") == 0
    assert metrics.value("acked") == 2


def test_while_events_are_held_new_ones_wait_for_the_backoff(clock: Clock) -> None:
    """No emit per arrival during an outage: one attempt per backoff for all of them."""
    relay, delivery, metrics, calls = make()
    assert metrics.value("emit_failures") == 0
    a, b = event(1), event(2)

    async def scenario() -> None:
        delivery.fail_emit = True
        await relay.submit([submission(a, calls, "a")])
        delivery.fail_emit = False  # the server is back, but the backoff has not passed
        assert await relay.submit([submission(b, calls, "b"), submission(a, calls, "a2")]) \
            is False
        assert await relay.confirm() == 0
        assert delivery.attempts == 1
        assert set(relay.held) == {a.id, b.id}
        clock.now += 1.0
        assert await relay.confirm() == 0

    asyncio.run(scenario())
    assert delivery.attempts == 2
    assert delivery.emits == [[a, b]]  # one batch, each event once
    assert set(relay.pending) == {a.id, b.id}
    assert len(relay.pending[a.id].acks) == 2  # the redelivery waits with the original
    assert calls == []
    assert metrics.value("emit_failures") == 1


def test_emit_failure_leaves_duplicates_of_pending_events_attached(clock: Clock) -> None:
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)

    async def scenario() -> None:
        assert await relay.submit([submission(a, calls, "a1")])
        delivery.fail_emit = True
        assert await relay.submit([submission(a, calls, "a2"), submission(b, calls, "b")]) \
            is False
        assert set(relay.held) == {b.id}  # a2 joined the pending a; b is held
        delivery.stored_ids = {a.id}
        await relay.confirm()

    asyncio.run(scenario())
    assert calls == [("ack", "a1"), ("ack", "a2")]
    assert metrics.value("nacked") == 0
    assert metrics.value("acked") == 2


def test_drain_nacks_held_events_without_emitting_them(clock: Clock) -> None:
    relay, delivery, metrics, calls = make()
    a, b = event(1), event(2)

    async def scenario() -> None:
        assert await relay.submit([submission(a, calls, "a")])
        delivery.fail_emit = True
        await relay.submit([submission(b, calls, "b")])
        delivery.fail_emit = False
        clock.now += 60  # the backoff has passed: only the shutdown stops a retry
        delivery.stored_ids = {a.id}
        await asyncio.wait_for(relay.drain(1.0), 30)

    asyncio.run(scenario())
    assert calls == [("ack", "a"), ("nack", "b")]
    assert delivery.emitted_ids == [a.id]
    assert relay.held == {} and relay.pending == {}
    assert metrics.value("nacked") == 1
    assert metrics.value("held") == 0


def test_a_source_held_past_max_hold_is_nacked_for_redelivery(clock: Clock) -> None:
    """A Pub/Sub lease is extended for a bounded time: nack before it lapses unseen."""
    delivery = FakeDelivery()
    metrics = BridgeMetrics()
    relay = Relay(delivery, metrics, resend_after=3600, max_hold=100)  # type: ignore[arg-type]
    calls: list[tuple[str, str]] = []
    old, young, pending = event(1), event(2), event(3)

    def sub(ev: Event, tag: str, age: float) -> Submission:
        return Submission(ev, ack=partial(calls.append, ("ack", tag)),
                          nack=partial(calls.append, ("nack", tag)),
                          received_at=clock.now - age)

    async def scenario() -> None:
        assert await relay.submit([sub(pending, "pending", 50)])
        delivery.fail_emit = True
        await relay.submit([sub(old, "old", 90), sub(young, "young", 10)])
        clock.now += 20  # old: 110 s, pending: 70 s, young: 30 s
        await relay.confirm()
        assert calls == [("nack", "old")]
        assert set(relay.held) == {young.id}
        clock.now += 40  # pending: 110 s, never confirmed
        await relay.confirm()

    asyncio.run(scenario())
    assert calls == [("nack", "old"), ("nack", "pending")]
    assert set(relay.held) == {young.id}
    assert relay.pending == {}
    assert metrics.value("hold_expired") == 2
    assert metrics.value("nacked") == 2


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


def test_a_hung_emit_is_abandoned_and_held(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(relay_module, "CALL_TIMEOUT", 0.2)
    relay, delivery, _, calls = make()
    a = event(1)
    delivery.hang = True
    assert asyncio.run(relay.submit([submission(a, calls, "a")])) is False
    assert calls == []
    assert set(relay.held) == {a.id}
    assert relay.pending == {}


def test_the_pubsub_bridge_holds_through_a_ten_hour_outage(clock: Clock) -> None:
    """Issue 20, defect 2: the relay the Pub/Sub bridge runs never nacks a held message
    for its age (the old one nacked at 55 minutes: one delivery attempt each, ~9 hours
    to dead-letter a valid notification); the oldest message's age is a gauge; the lease
    lasts TAXI_PUBSUB_MAX_HOLD_SECONDS, by default Pub/Sub's default retention (7 days),
    not the client library's one hour."""
    from pubsub_bridge.pubsub_source import flow_control, relay_for
    from taxi_pipeline.settings import Settings

    settings = Settings(profile="emulator", gcp_project="p", bucket="b")
    assert flow_control(settings).max_lease_duration == 7 * 24 * 3600
    assert flow_control(settings.model_copy(update={"pubsub_max_hold_seconds": 90}))\
        .max_lease_duration == 90
    delivery = FakeDelivery()
    metrics = BridgeMetrics()
    relay = relay_for(delivery, metrics, settings)  # type: ignore[arg-type]
    calls: list[tuple[str, str]] = []
    held = event(1)

    async def scenario() -> None:
        delivery.fail_emit = True
        await relay.submit([Submission(held, ack=partial(calls.append, ("ack", "a")),
                                       nack=partial(calls.append, ("nack", "a")),
                                       received_at=clock.now)])
        for _ in range(10 * 60):  # ten hours, a confirm round a minute
            clock.now += 60
            await relay.confirm()
        assert metrics.value("oldest_held_seconds") == pytest.approx(10 * 3600)
        assert relay.oldest == (pytest.approx(10 * 3600), held.resource.id)
        delivery.fail_emit = False
        delivery.stored_ids = {held.id}
        clock.now += 60
        await relay.confirm()
        await relay.confirm()

    asyncio.run(scenario())
    assert calls == [("ack", "a")]
    assert metrics.value("nacked") == 0 and metrics.value("hold_expired") == 0
    assert metrics.value("oldest_held_seconds") == 0
