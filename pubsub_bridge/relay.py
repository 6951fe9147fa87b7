"""Emit events now; acknowledge their sources only once the server has stored them.

Sources hand over (event, ack, nack) triples. The relay emits at once, so
automations fire without waiting, then reads ids back in batches; stored
events are acked, events not stored within `resend_after` are emitted again
(same id, so the server keeps one copy). `nack` is for sources that should
redeliver when the emit itself fails.
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

log = logging.getLogger(__name__)

Callback = Callable[[], None]
# Longest wait for any one call to Prefect (emit, read back): past it the call is
# abandoned and its events stay pending (or are nacked), as if the server were down.
CALL_TIMEOUT = 15.0


@dataclass
class Pending:
    event: Event
    received_at: float
    emitted_at: float
    acks: list[Callback] = field(default_factory=list)
    nacks: list[Callback] = field(default_factory=list)


@dataclass(frozen=True)
class Submission:
    event: Event
    ack: Callback
    nack: Callback
    received_at: float = field(default_factory=time.monotonic)


class Relay:
    def __init__(self, delivery: EventDelivery, metrics: BridgeMetrics,
                 resend_after: float = 30.0) -> None:
        self.delivery = delivery
        self.metrics = metrics
        self.resend_after = resend_after
        self.pending: dict[UUID, Pending] = {}

    def _uri(self, event: Event) -> str:
        return event.resource.id

    async def submit(self, submissions: list[Submission]) -> bool:
        """Emit new events; returns False (and nacks them) when the server is unreachable."""
        fresh: list[Submission] = []
        twins: dict[UUID, list[Submission]] = {}
        for sub in submissions:
            known = self.pending.get(sub.event.id)
            if known is not None:  # a redelivery of something in flight: ack both later
                known.acks.append(sub.ack)
                known.nacks.append(sub.nack)
            elif sub.event.id in twins:  # the same event twice in this batch: emit once
                twins[sub.event.id].append(sub)
            else:
                twins[sub.event.id] = []
                fresh.append(sub)
        if not fresh:
            return True
        try:
            await asyncio.wait_for(self.delivery.emit([s.event for s in fresh]), CALL_TIMEOUT)
        except Exception as exc:
            log.warning("emit failed for %d events (%s); they will be retried", len(fresh), exc)
            for sub in fresh:
                for each in (sub, *twins[sub.event.id]):
                    self.metrics.nacked.inc()
                    each.nack()
            return False
        now = time.monotonic()
        for sub in fresh:
            same = [sub, *twins[sub.event.id]]
            self.pending[sub.event.id] = Pending(sub.event, sub.received_at, now,
                                                 [s.ack for s in same], [s.nack for s in same])
            self.metrics.emitted.inc()
            log.info("emitted event=%s id=%s uri=%s", sub.event.event, sub.event.id,
                     self._uri(sub.event))
        self.metrics.pending.set(len(self.pending))
        return True

    async def confirm(self, timeout: float = CALL_TIMEOUT) -> int:
        """Ack whatever is stored now; re-emit what is overdue. Returns how many were acked.

        Each call to Prefect gets `timeout`: a server that accepts connections and
        never answers must not hold the bridge (or its shutdown) hostage.
        """
        if not self.pending:
            return 0
        events = [p.event for p in self.pending.values()]
        try:
            stored = await asyncio.wait_for(self.delivery.stored(events), timeout)
        except Exception as exc:
            log.warning("cannot read events back (%s); %d events stay unacknowledged",
                        exc, len(events))
            stored = set()
        now = time.monotonic()
        for event_id in stored:
            item = self.pending.pop(event_id)
            self.metrics.stored.inc()
            self.metrics.emit_latency.observe(now - item.received_at)
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
        self.metrics.pending.set(len(self.pending))
        return len(stored)

    async def drain(self, seconds: float, tick: Callable[[], object] | None = None) -> None:
        """On shutdown: confirm (and ack) what is stored for up to `seconds`, nack the rest.

        `tick` runs between rounds, for sources that must keep releasing new arrivals.
        """
        deadline = time.monotonic() + seconds
        while self.pending and (left := deadline - time.monotonic()) > 0:
            await self.confirm(timeout=left)
            if tick is not None:
                tick()
            if self.pending:
                await asyncio.sleep(min(0.5, max(0.0, deadline - time.monotonic())))
        if self.pending:
            log.warning("%d events unconfirmed at shutdown; their sources will deliver them "
                        "again", len(self.pending))
        self.release_all()

    def release_all(self) -> None:
        """On shutdown: nack everything unconfirmed so the source delivers it again."""
        for item in self.pending.values():
            for nack in item.nacks:
                nack()
                self.metrics.nacked.inc()
        self.pending.clear()
        self.metrics.pending.set(0)
