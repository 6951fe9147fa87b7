"""Emit events now; acknowledge their sources only once the server has stored them.

Sources hand over (event, ack, nack) triples. The relay emits at once, so
automations fire without waiting, then reads ids back in batches; stored
events are acked, events not stored within `resend_after` are emitted again
(same id, so the server keeps one copy).

When the emit itself fails (the server is unreachable) the events are held,
not nacked: every nack of a Pub/Sub message costs a delivery attempt, and an
outage of ~40 minutes would move valid notifications to the dead-letter topic.
Held events are emitted again with a growing backoff (new arrivals join them
without an attempt of their own); `nack` runs only at shutdown, and for a source
held longer than `max_hold` when one is given (the Pub/Sub bridge gives none: it
holds for as long as the outage lasts, bounded by the subscription's retention,
because every nack costs a delivery attempt). `bridge_oldest_held_seconds` says
how long the oldest source has waited.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from uuid import UUID

from prefect.events import Event

from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline.event_delivery import EventDelivery
from taxi_pipeline.monitoring import tracing

log = logging.getLogger(__name__)

Callback = Callable[[], None]
# Longest wait for any one call to Prefect (emit, read back): past it the call is
# abandoned and its events stay pending (or held), as if the server were down.
CALL_TIMEOUT = 15.0
# Backoff between emits of held events: doubles from the first to the last.
RETRY_FIRST = 1.0
RETRY_MAX = 30.0


@dataclass
class Pending:
    """One event and every source waiting on it (held: not emitted yet, `emitted_at` 0)."""

    event: Event
    received_at: float
    emitted_at: float
    acks: list[Callback] = field(default_factory=list)
    nacks: list[Callback] = field(default_factory=list)
    held_since: float = 0.0  # when an emit of it first failed; 0 = never


@dataclass(frozen=True)
class Submission:
    event: Event
    ack: Callback
    nack: Callback
    received_at: float = field(default_factory=time.monotonic)


class Relay:
    def __init__(self, delivery: EventDelivery, metrics: BridgeMetrics,
                 resend_after: float = 30.0, max_hold: float | None = None) -> None:
        self.delivery = delivery
        self.metrics = metrics
        self.resend_after = resend_after
        self.max_hold = max_hold  # None: a source may wait as long as the server is down
        self.pending: dict[UUID, Pending] = {}  # emitted, not yet read back
        self.held: dict[UUID, Pending] = {}  # not emitted: the server was unreachable
        self._retry_at = 0.0
        self._retry_delay = 0.0

    def _uri(self, event: Event) -> str:
        return event.resource.id

    @property
    def busy(self) -> bool:
        """Something waits on the server: call `confirm` regularly."""
        return bool(self.pending or self.held)

    async def submit(self, submissions: list[Submission]) -> bool:
        """Emit new events; returns False when they are held (the server is unreachable).

        While events are held, new ones join them without an emit of their own;
        `confirm` emits them all once the backoff has passed.
        """
        now = time.monotonic()
        for sub in submissions:
            known = self.pending.get(sub.event.id) or self.held.get(sub.event.id)
            if known is not None:  # a redelivery, or a twin in this batch: ack both later
                known.acks.append(sub.ack)
                known.nacks.append(sub.nack)
            else:
                self.held[sub.event.id] = Pending(sub.event, sub.received_at, 0.0,
                                                  [sub.ack], [sub.nack])
        return await self._emit_held(now)

    async def _emit_held(self, now: float, timeout: float = CALL_TIMEOUT) -> bool:
        """Emit everything held, unless a failed emit's backoff has not passed yet."""
        if not self.held:
            return True
        if now < self._retry_at:
            self._gauges()
            return False
        items = list(self.held.values())
        try:
            await asyncio.wait_for(self.delivery.emit([p.event for p in items]), timeout)
        except Exception as exc:
            self._retry_delay = min(max(RETRY_FIRST, self._retry_delay * 2), RETRY_MAX)
            self._retry_at = time.monotonic() + self._retry_delay
            self.metrics.emit_failures.inc()
            log.warning("emit failed for %d events (%s); holding them (not nacked) and "
                        "trying again in %.0fs", len(items), exc or type(exc).__name__,
                        self._retry_delay)
            for item in items:
                if not item.held_since:  # logged once, not at every attempt
                    item.held_since = now
                    log.info("held event=%s id=%s uri=%s: the Prefect server is unreachable",
                             item.event.event, item.event.id, self._uri(item.event))
            self._gauges()
            return False
        if self._retry_delay:
            log.info("the Prefect server takes events again: emitted %d held events",
                     len(items))
        self._retry_delay, self._retry_at = 0.0, 0.0
        emitted_at = time.monotonic()
        for item in items:
            del self.held[item.event.id]
            item.emitted_at = emitted_at
            self.pending[item.event.id] = item
            self.metrics.emitted.inc()
            log.info("emitted event=%s id=%s uri=%s", item.event.event, item.event.id,
                     self._uri(item.event))
        self._gauges()
        return True

    def _gauges(self) -> None:
        self.metrics.pending.set(len(self.pending))
        self.metrics.held.set(len(self.held))
        waiting = [p.received_at for p in (*self.pending.values(), *self.held.values())]
        self.metrics.oldest_held.set(time.monotonic() - min(waiting) if waiting else 0.0)

    @property
    def oldest(self) -> tuple[float, str] | None:
        """(age in seconds, object URI) of the oldest unacknowledged source, or None."""
        items = [*self.pending.values(), *self.held.values()]
        if not items:
            return None
        first = min(items, key=lambda p: p.received_at)
        return time.monotonic() - first.received_at, self._uri(first.event)

    async def confirm(self, timeout: float = CALL_TIMEOUT) -> int:
        """Ack whatever is stored now; re-emit what is overdue or held. Returns how many
        were acked.

        Each call to Prefect gets `timeout`: a server that accepts connections and
        never answers must not hold the bridge (or its shutdown) hostage.
        """
        self._release_overdue(time.monotonic())
        stored: set[UUID] = set()
        if self.pending:
            events = [p.event for p in self.pending.values()]
            try:
                stored = await asyncio.wait_for(self.delivery.stored(events), timeout)
            except Exception as exc:
                log.warning("cannot read events back (%s); %d events stay unacknowledged",
                            exc, len(events))
        now = time.monotonic()
        for event_id in stored:
            item = self.pending.pop(event_id)
            self.metrics.stored.inc()
            self.metrics.emit_latency.observe(now - item.received_at)
            tracing.bridge_stored(item.event, now - item.received_at)  # off without OTEL_*
            for ack in item.acks:
                ack()
                self.metrics.acked.inc()
            log.info("stored event=%s id=%s uri=%s", item.event.event, event_id,
                     self._uri(item.event))
        overdue = [p for p in self.pending.values() if now - p.emitted_at > self.resend_after]
        if overdue:
            try:
                await asyncio.wait_for(self.delivery.emit([p.event for p in overdue]), timeout)
                for item in overdue:
                    item.emitted_at = now
                    self.metrics.resent.inc()
                    log.warning("re-emitted event id=%s uri=%s: not stored after %.0fs",
                                item.event.id, self._uri(item.event), self.resend_after)
            except Exception as exc:
                log.warning("re-emit failed (%s); will try again", exc)
        await self._emit_held(time.monotonic(), timeout)
        self._gauges()
        return len(stored)

    def _release_overdue(self, now: float) -> None:
        """Nack sources held past `max_hold`, so they are delivered again, not lost."""
        if self.max_hold is None:
            return
        for table in (self.held, self.pending):
            for event_id in [i for i, p in table.items() if now - p.received_at > self.max_hold]:
                item = table.pop(event_id)
                log.warning("nacked event id=%s uri=%s: not stored after %.0fs (the limit of "
                            "a source's hold); it will be delivered again", event_id,
                            self._uri(item.event), now - item.received_at)
                self.metrics.hold_expired.inc()
                self._nack(item)
        self._gauges()

    def _nack(self, item: Pending) -> None:
        for nack in item.nacks:
            nack()
            self.metrics.nacked.inc()

    async def drain(self, seconds: float, tick: Callable[[], object] | None = None) -> None:
        """On shutdown: confirm (and ack) what is stored for up to `seconds`, nack the rest.

        Held events are not emitted again: their sources deliver them again later.
        `tick` runs between rounds, for sources that must keep releasing new arrivals.
        """
        deadline = time.monotonic() + seconds
        self._retry_at = float("inf")  # shutting down: no new emits of held events
        while self.pending and (left := deadline - time.monotonic()) > 0:
            await self.confirm(timeout=left)
            if tick is not None:
                tick()
            if self.pending:
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if self.pending or self.held:
            log.warning("%d events unconfirmed and %d held at shutdown; their sources will "
                        "deliver them again", len(self.pending), len(self.held))
        self.release_all()

    def release_all(self) -> None:
        """On shutdown: nack everything unconfirmed or held so the source delivers it again."""
        for item in [*self.pending.values(), *self.held.values()]:
            self._nack(item)
        self.pending.clear()
        self.held.clear()
        self._gauges()
