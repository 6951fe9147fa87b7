"""`taxi-pipeline reemit`: send `storage.object.finalized` again, for one object or thousands.

Objects are chosen by name (any form `status` accepts: name of any stage,
URI, absolute path, bare file name), by prefix (ending in `/`), by stage and by
object time (`--since`/`--until`: when the current generation was created),
or a stored event is re-sent by id (`--event-id`: a copy with a fresh id and a
related resource naming the original). Each object's event is the one
reconcile and recover send (`events.object_finalized(..., reemit=True)`), so
the automations run the chain again and the flows answer idempotently.

Events go out at most `rate` per second, are confirmed as stored by reading
them back (`EventDelivery`), and the run ends with a summary; the exit code is
1 whenever anything was skipped, failed to send or was not confirmed.
"""

from __future__ import annotations

import asyncio
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol, TextIO

from prefect.events import Event, RelatedResource, Resource

from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.ops.status_model import (
    Family,
    StatusError,
    Target,
    parse_target,
    role_prefixes,
    split_name,
)
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore, store_from_settings

# Only these stages have an automation that acts on `storage.object.finalized`.
STAGES = (events.STAGE_RAW, events.STAGE_PROCESSED)
# Events sent between two read-backs (the events API answers 50 ids a page).
BATCH = 50
# The role of the related resource that names the event a copy was made from.
ORIGINAL_ROLE = "reemit-of"


class Delivery(Protocol):
    """What re-emitting needs of `EventDelivery` (a fake in tests)."""

    async def emit(self, events: Iterable[Event]) -> None: ...

    async def confirm(self, events: list[Event], timeout: float) -> set[uuid.UUID]: ...

    async def read(self, event_id: uuid.UUID, timeout: float = 0.0) -> Event | None: ...


# -- choosing objects --------------------------------------------------------------


def parse_when(text: str) -> datetime:
    """`2024-03-01`, `2024-03-01T12:00`, `...+02:00` or `...Z`; without a zone it is UTC."""
    try:
        value = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{text!r}: expected an ISO date or time, e.g. 2024-03-01 or "
                         "2024-03-01T12:00:00Z") from None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def object_time(ref: ObjectRef) -> datetime | None:
    """When this generation came to be (GCS timeCreated; locally the change time)."""
    return ref.created or ref.updated


def in_window(ref: ObjectRef, since: datetime | None, until: datetime | None) -> bool:
    """`since` <= object time < `until`; an object without a time passes no bound."""
    if since is None and until is None:
        return True
    when = object_time(ref)
    if when is None:
        return False
    return (since is None or when >= since) and (until is None or when < until)


@dataclass
class Selection:
    refs: list[ObjectRef] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (target, why)

    def add(self, ref: ObjectRef) -> None:
        if all(ref.name != seen.name for seen in self.refs):
            self.refs.append(ref)


def _stage_name(name: str, stage: str | None, settings: Settings, store: ObjectStore) -> str:
    """`name`, or its sibling under `stage`'s prefix (raw/x -> processed/x)."""
    role, _ = split_name(name, settings)
    wanted = stage or role
    if wanted not in STAGES:
        raise StatusError(f"{name!r} is a {role or 'non-pipeline'} object; only "
                          f"{settings.raw_prefix} and {settings.processed_prefix} objects start "
                          "a flow (re-emit its raw object instead)")
    return Family.of(name, settings, store).names[wanted]


def _prefix_of(prefix: str, stage: str | None, settings: Settings) -> str:
    """The stage prefix to list: `raw/yellow/` as is, `processed/...` with --stage raw mapped,
    and a prefix outside every stage (`yellow/`, ``) under --stage's prefix (default raw)."""
    role, key = split_name(prefix, settings)
    if role is None:
        return role_prefixes(settings)[stage or events.STAGE_RAW] + prefix
    wanted = stage or role
    if wanted not in STAGES:
        raise StatusError(f"{prefix!r} holds {role} objects; only {settings.raw_prefix} and "
                          f"{settings.processed_prefix} objects start a flow")
    return role_prefixes(settings)[wanted] + key


def _search(fragment: str, stage: str | None, settings: Settings,
            store: ObjectStore) -> list[ObjectRef]:
    prefix = role_prefixes(settings)[stage or events.STAGE_RAW]
    tail = fragment.lstrip("/")
    return [ref for ref in store.list(prefix)
            if ref.name == tail or ref.name.endswith("/" + tail)]


def select(settings: Settings, store: ObjectStore, targets: list[str], *,
           stage: str | None = None, since: datetime | None = None,
           until: datetime | None = None) -> Selection:
    """The current generations to re-emit, and each target that named nothing and why.

    No target means every object of `stage` (default raw). A prefix that holds
    no object, or a name that is not in the bucket, is skipped; an object outside
    the `since`/`until` window is simply not chosen.
    """
    chosen = Selection()
    for target in targets or [""]:
        try:
            parsed: Target = parse_target(target, settings, store)
            if parsed.prefix is not None:
                prefix = _prefix_of(parsed.prefix, stage, settings)
                found = list(store.list(prefix))
                if not found:
                    raise StatusError(f"no object under {prefix}")
                for listed in found:
                    if in_window(listed, since, until):
                        chosen.add(listed)
                continue
            if parsed.search is not None:
                matches = _search(parsed.search, stage, settings, store)
                if len(matches) > 1:
                    raise StatusError(f"matches {len(matches)} objects: "
                                      + ", ".join(m.name for m in matches)
                                      + "; give the full name")
                names: tuple[str, ...] = tuple(m.name for m in matches)
            else:
                names = tuple(_stage_name(n, stage, settings, store) for n in parsed.names)
            ref = _first_existing(store, names)
            if ref is None:
                shown = names[0] if names else target
                raise StatusError(f"no object {shown!r} in {store.scheme}://{store.bucket}/")
            if in_window(ref, since, until):
                chosen.add(ref)
        except (StatusError, ValueError) as exc:
            chosen.skipped.append((target, str(exc)))
    return chosen


def _first_existing(store: ObjectStore, names: Iterable[str]) -> ObjectRef | None:
    for name in names:
        try:
            return store.ref(name)
        except (ObjectNotFound, ValueError):
            continue
    return None


# -- re-sending a stored event -------------------------------------------------------


def original_resource(event_id: uuid.UUID) -> dict[str, str]:
    """The related resource a copy carries: the id of the event it was made from."""
    return {"prefect.resource.id": f"prefect.event.{event_id}",
            "prefect.resource.role": ORIGINAL_ROLE}


def copy_of(original: Event) -> Event:
    """`original` again: fresh id, now, the reemit label, and a link to the original."""
    resource = dict(original.resource)
    resource[events.LABEL_REEMIT] = "true"
    related = [RelatedResource(dict(r)) for r in original.related]
    related.append(RelatedResource(original_resource(original.id)))
    return Event(id=uuid.uuid4(), event=original.event, resource=Resource(resource),
                 related=related, payload=dict(original.payload))


# -- pacing -----------------------------------------------------------------------------


class RateLimiter:
    """At most `rate` calls of `wait` per second (None: no limit); clock and sleep injectable."""

    def __init__(self, rate: float | None, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep) -> None:
        if rate is not None and rate <= 0:
            raise ValueError("rate must be positive")
        self._interval = 1.0 / rate if rate else 0.0
        self._clock = clock
        self._sleep = sleep
        self._next: float | None = None

    def delay(self) -> float:
        """Seconds to wait before the next send, and book its slot."""
        if not self._interval:
            return 0.0
        now = self._clock()
        slot = now if self._next is None else max(now, self._next)
        self._next = slot + self._interval
        return slot - now

    async def wait(self) -> None:
        pause = self.delay()
        if pause > 0:
            await self._sleep(pause)


# -- sending and the summary -----------------------------------------------------------


@dataclass
class Report:
    events: list[Event] = field(default_factory=list)  # what was (or would be) sent
    emitted: list[Event] = field(default_factory=list)
    confirmed: set[uuid.UUID] = field(default_factory=set)
    skipped: list[tuple[str, str]] = field(default_factory=list)
    errors: list[tuple[Event, str]] = field(default_factory=list)
    dry_run: bool = False

    @property
    def unconfirmed(self) -> list[Event]:
        return [e for e in self.emitted if e.id not in self.confirmed]

    def summary(self) -> str:
        if self.dry_run:
            return (f"dry run: would re-emit {len(self.events)}, skipped {len(self.skipped)}; "
                    "nothing was sent")
        return (f"re-emit: emitted {len(self.emitted)}, confirmed {len(self.confirmed)}, "
                f"skipped {len(self.skipped)}, errors {len(self.errors)}"
                + (f", not confirmed {len(self.unconfirmed)}" if self.unconfirmed else ""))

    @property
    def exit_code(self) -> int:
        if self.skipped or self.errors:
            return 1
        return 0 if self.dry_run or not self.unconfirmed else 1


def describe(event: Event) -> str:
    generation = event.resource.get(events.LABEL_GENERATION)
    what = event.resource.id + (f" generation {generation}" if generation else "")
    return what if event.event == events.OBJECT_FINALIZED else f"{event.event} {what}"


Progress = Callable[[int, int], None]  # (sent so far, total)


async def send(delivery: Delivery, report: Report, *, rate: float | None = None,
               timeout: float = 30.0, limiter: RateLimiter | None = None,
               on_sent: Progress | None = None,
               on_confirmed: Callable[[Event, bool], None] | None = None) -> Report:
    """Emit `report.events` (paced), confirming every `BATCH` of them; fills the report."""
    limiter = limiter or RateLimiter(rate)
    total = len(report.events)
    for start in range(0, total, BATCH):
        batch: list[Event] = []
        for event in report.events[start:start + BATCH]:
            await limiter.wait()
            try:
                await delivery.emit([event])
            except Exception as exc:  # the connection is re-made for the next one
                report.errors.append((event, f"{type(exc).__name__}: {exc}"))
            else:
                batch.append(event)
                report.emitted.append(event)
            if on_sent:
                on_sent(len(report.emitted) + len(report.errors), total)
        if batch:
            try:
                report.confirmed |= await delivery.confirm(batch, timeout)
            except Exception as exc:  # unconfirmed, reported as such
                print(f"warning: reading events back failed: {exc}", file=sys.stderr)
        for event in batch:
            if on_confirmed:
                on_confirmed(event, event.id in report.confirmed)
    return report


async def collect(settings: Settings, store: ObjectStore, delivery: Delivery | None,
                  targets: list[str], *, stage: str | None, since: datetime | None,
                  until: datetime | None, event_ids: list[str]) -> Report:
    """The events to send: one per chosen object, one copy per stored event id."""
    report = Report()
    if targets or not event_ids or stage or since or until:
        chosen = select(settings, store, targets, stage=stage, since=since, until=until)
        report.skipped += chosen.skipped
        report.events += [events.object_finalized(ref, settings.stage_prefixes, reemit=True)
                          for ref in chosen.refs]
    for text in event_ids:
        try:
            event_id = uuid.UUID(text)
        except ValueError:
            report.skipped.append((text, "not an event id (a UUID)"))
            continue
        original = await delivery.read(event_id) if delivery is not None else None
        if original is None:
            report.skipped.append((text, "no stored event with this id"))
            continue
        report.events.append(copy_of(original))
    return report


async def reemit(settings: Settings, targets: list[str], *, stage: str | None = None,
                 since: datetime | None = None, until: datetime | None = None,
                 event_ids: list[str] | None = None, dry_run: bool = False,
                 rate: float | None = None, timeout: float = 30.0,
                 out: TextIO | None = None,
                 delivery_factory: Callable[[], Any] | None = None) -> int:
    """`taxi-pipeline reemit`: lines per event, a progress bar on a terminal, the summary.

    0 only when every chosen event was sent and confirmed stored (or, with
    `dry_run`, would be) and no target or event id was skipped.
    """
    out = out or sys.stdout
    store = store_from_settings(settings)
    event_ids = event_ids or []
    if dry_run and not event_ids:
        report = await collect(settings, store, None, targets, stage=stage, since=since,
                               until=until, event_ids=[])
        return _finish(_dry(report, out), out)
    if delivery_factory is None:
        from taxi_pipeline.event_delivery import EventDelivery

        delivery_factory = EventDelivery
    async with delivery_factory() as delivery:
        report = await collect(settings, store, delivery, targets, stage=stage, since=since,
                               until=until, event_ids=event_ids)
        if dry_run:
            return _finish(_dry(report, out), out)
        for target, why in report.skipped:
            print(f"skipping {target}: {why}", file=sys.stderr)
        if not report.events:
            print("nothing to re-emit", file=out)
            return _finish(report, out)
        pace = f", at most {rate:g}/s" if rate else ""
        print(f"re-emitting {len(report.events)} event(s){pace}", file=out, flush=True)

        def line(event: Event, stored: bool) -> None:
            state = "stored" if stored else "NOT CONFIRMED (retry)"
            print(f"{describe(event)}: re-emitted as {event.id} ({state})", file=out,
                  flush=True)

        if out.isatty():
            await _with_progress_bar(delivery, report, rate, timeout, out)
        else:
            await send(delivery, report, rate=rate, timeout=timeout, on_confirmed=line)
        for event, error in report.errors:
            print(f"{describe(event)}: NOT SENT: {error}", file=sys.stderr)
    return _finish(report, out)


def _dry(report: Report, out: TextIO) -> Report:
    report.dry_run = True
    for target, why in report.skipped:
        print(f"skipping {target}: {why}", file=sys.stderr)
    for event in report.events:
        print(f"would re-emit {describe(event)}", file=out)
    return report


def _finish(report: Report, out: TextIO) -> int:
    print(report.summary(), file=out, flush=True)
    return report.exit_code


async def _with_progress_bar(delivery: Delivery, report: Report, rate: float | None,
                             timeout: float, out: TextIO) -> None:
    # rich comes with Prefect; imported here so plain runs never load it.
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = Console(file=out, highlight=False)
    with Progress(TextColumn("reemit"), BarColumn(), MofNCompleteColumn(),
                  TextColumn("{task.description}"), TimeElapsedColumn(),
                  console=console) as bar:
        task = bar.add_task("", total=len(report.events))

        def sent(done: int, total: int) -> None:
            bar.update(task, completed=done,
                       description=f"confirmed {len(report.confirmed)}")

        def confirmed(event: Event, stored: bool) -> None:
            state = "stored" if stored else "NOT CONFIRMED (retry)"
            bar.console.print(f"{describe(event)}: re-emitted as {event.id} ({state})",
                              markup=False)
            bar.update(task, description=f"confirmed {len(report.confirmed)}")

        await send(delivery, report, rate=rate, timeout=timeout, on_sent=sent,
                   on_confirmed=confirmed)
