"""Emit events and learn which ones the Prefect server has really stored.

The server acknowledges an event before it is durable (it is queued in memory
and persisted in batches), so the only proof of storage is reading it back by
id. Sources acknowledge their input (a Pub/Sub message, a file) only for ids
this module reports as stored.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient, get_client
from prefect.events import Event
from prefect.events.clients import EventsClient, get_events_client
from prefect.events.filters import (
    EventFilter,
    EventIDFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventOrder,
    EventResourceFilter,
)

log = logging.getLogger(__name__)

# The events API answers at most this many events per page.
READ_BATCH = 50
# A redelivered notification carries the id of a copy stored up to this long ago
# (Pub/Sub keeps unacknowledged messages at most 31 days); the server keeps the
# first copy with its original time, so confirmation must look back that far.
REDELIVERY_WINDOW = timedelta(days=31)
CLOSE_TIMEOUT = 5.0


class EventDelivery:
    """One events connection plus one API client, reused for every batch."""

    def __init__(self, confirm_poll_seconds: float = 0.5) -> None:
        self._poll = confirm_poll_seconds
        self._events: EventsClient | None = None
        self._api: PrefectClient | None = None

    async def __aenter__(self) -> EventDelivery:
        self._api = get_client()
        await self._api.__aenter__()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self._close_events()
        if self._api is not None:
            await self._api.__aexit__(exc_type, exc, tb)
            self._api = None

    async def _close_events(self) -> None:
        if self._events is not None:
            events, self._events = self._events, None
            try:  # a hung server must not stall the close handshake for long
                await asyncio.wait_for(events.__aexit__(None, None, None), CLOSE_TIMEOUT)
            except Exception:  # the connection is being discarded anyway
                log.debug("closing the events client failed", exc_info=True)

    async def emit(self, events: Iterable[Event]) -> None:
        """Send events; a broken connection is dropped so the next call reconnects."""
        try:
            if self._events is None:
                client = get_events_client()
                await client.__aenter__()
                self._events = client
            for event in events:
                await self._events.emit(event)
        except BaseException:  # a timeout's cancellation too: the connection is suspect
            await self._close_events()
            raise

    async def healthcheck(self) -> None:
        """Raise unless the Prefect API answers its health endpoint."""
        assert self._api is not None, "use EventDelivery as an async context manager"
        error = await self._api.api_healthcheck()
        if error is not None:
            raise error

    async def stored(self, events: list[Event]) -> set[UUID]:
        """The ids among `events` that the server has persisted (read back, 50 at a time)."""
        assert self._api is not None, "use EventDelivery as an async context manager"
        found: set[UUID] = set()
        for start in range(0, len(events), READ_BATCH):
            batch = events[start : start + READ_BATCH]
            since = min(e.occurred for e in batch) - REDELIVERY_WINDOW
            until = max(e.occurred for e in batch) + timedelta(minutes=5)
            page = await self._api.read_events(
                filter=EventFilter(
                    id=EventIDFilter(id=[e.id for e in batch]),
                    occurred=EventOccurredFilter(since=since, until=until),
                ),
                limit=READ_BATCH,
            )
            found.update(e.id for e in page.events)
        return found

    async def about(self, resource_ids: list[str], since: datetime,
                    names: list[str] | None = None) -> list[Event]:
        """Every stored event (named one of `names`) whose resource is one of `resource_ids`."""
        assert self._api is not None, "use EventDelivery as an async context manager"
        window: dict[str, Any] = {"since": since,
                                  "until": datetime.now(UTC) + timedelta(minutes=5)}
        page = await self._api.read_events(
            filter=EventFilter(
                resource=EventResourceFilter(id=resource_ids),
                event=EventNameFilter(name=names) if names else None,
                occurred=EventOccurredFilter(**window),
                order=EventOrder.ASC,
            ),
            limit=READ_BATCH,
        )
        found: list[Event] = list(page.events)
        while page.next_page:
            page = await self._api.read_events_page(str(page.next_page))
            found += page.events
        return found

    async def read(self, event_id: UUID, timeout: float = 0.0) -> Event | None:
        """One stored event by id; waits up to `timeout` for it to be persisted."""
        assert self._api is not None, "use EventDelivery as an async context manager"
        deadline = time.monotonic() + timeout
        window: dict[str, Any] = {"since": datetime.now(UTC) - REDELIVERY_WINDOW,
                                  "until": datetime.now(UTC) + timedelta(minutes=5)}
        while True:
            page = await self._api.read_events(
                filter=EventFilter(id=EventIDFilter(id=[event_id]),
                                   occurred=EventOccurredFilter(**window)),
                limit=1,
            )
            if page.events:
                return page.events[0]
            if time.monotonic() >= deadline:
                return None
            await asyncio.sleep(self._poll)

    async def deliver(self, events: list[Event], timeout: float) -> set[UUID]:
        """Emit `events` and wait up to `timeout` seconds until they are stored.

        Returns the ids confirmed as stored; the caller must not acknowledge the
        source of any other event.
        """
        if not events:
            return set()
        await self.emit(events)
        return await self.confirm(events, timeout)

    async def confirm(self, events: list[Event], timeout: float) -> set[UUID]:
        """Poll the events API until every event is stored or `timeout` passes."""
        deadline = time.monotonic() + timeout
        pending = list(events)
        confirmed: set[UUID] = set()
        while pending:
            try:
                confirmed |= await self.stored(pending)
            except Exception as exc:  # API down: keep waiting until the deadline
                log.warning("reading events back failed: %s", exc)
            pending = [e for e in pending if e.id not in confirmed]
            if not pending or time.monotonic() >= deadline:
                break
            await asyncio.sleep(self._poll)
        return confirmed
