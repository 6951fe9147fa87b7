"""Find object generations that landed but never reached the warehouse, and re-emit them.

At-least-once delivery still leaves gaps the bridge cannot see: an event stored
but never acted on after a server crash, an automation action that failed (the
server does not retry those), a notification GCS never sent. The bucket and the
warehouse's load log are the truth: a raw object whose current generation is
not loaded, and not in quarantine, has stalled. Re-emitting it (with the
`pipeline.reemit` label) runs the chain again; flows are idempotent.

The event history keeps a scheduled reconcile from piling work onto objects
already on their way: an object with any pipeline event in the last
`older_than`, or a transform/load started within RUNNING_GRACE and not yet
finished, is left alone. A raw object holding the same bytes as an earlier one
was skipped on purpose (`pipeline.object.duplicate_content`) and is not stalled.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect.events import Event

from taxi_pipeline import events
from taxi_pipeline.content_twins import earlier_twin
from taxi_pipeline.datasets.registry import table_for_name
from taxi_pipeline.event_delivery import EventDelivery
from taxi_pipeline.lineage import NotAProcessedObject, source_of
from taxi_pipeline.objects import ObjectRef, output_name, sibling_name
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore, store_from_settings
from taxi_pipeline.warehouse import Warehouse, warehouse_from_settings

log = logging.getLogger(__name__)

# A transform or load that started this recently and has not finished is presumed
# running (a 3M-row month transforms in seconds; this leaves a wide margin).
RUNNING_GRACE = timedelta(minutes=30)
_STARTED = {events.TRANSFORM_STARTED, events.LOAD_STARTED}
# URIs per events query (each object adds its processed sibling).
_QUERY_BATCH = 25
# An object whose automatic recovery gave up (pipeline.recovery.exhausted) within
# this window waits for a person (`taxi-pipeline reemit`) instead of looping.
EXHAUSTED_WINDOW = timedelta(days=7)


@dataclass(frozen=True)
class Stalled:
    """A raw object generation that never reached the warehouse, and where to resume."""

    obj: ObjectRef
    why: str
    resume: ObjectRef | None = None

    @property
    def to_emit(self) -> ObjectRef:
        """The processed object when the transform already made it, else the raw object."""
        return self.resume or self.obj


@dataclass
class ReconcileReport:
    """What one reconcile pass found and did."""

    stalled: list[Stalled] = field(default_factory=list)
    # Raw object URI -> why it is left alone this pass.
    in_flight: dict[str, str] = field(default_factory=dict)
    emitted: list[Event] = field(default_factory=list)
    confirmed: set[UUID] = field(default_factory=set)

    def left_alone(self, item: Stalled) -> str | None:
        return self.in_flight.get(item.obj.uri)

    @property
    def to_emit(self) -> list[Stalled]:
        return [item for item in self.stalled if item.obj.uri not in self.in_flight]

    @property
    def unconfirmed(self) -> int:
        return sum(1 for event in self.emitted if event.id not in self.confirmed)


def find_stalled(store: ObjectStore, warehouse: Warehouse, settings: Settings,
                 older_than: timedelta, now: datetime | None = None) -> Iterator[Stalled]:
    """Raw objects older than `older_than` whose current generation is not loaded.

    Younger objects are left alone: they are most likely still on their way.
    """
    now = now or datetime.now(UTC)
    listing: list[ObjectRef] | None = None  # raw/ once, when a twin check first needs it
    for obj in store.list(settings.raw_prefix):
        if obj.updated is not None and now - obj.updated < older_than:
            continue
        loaded = warehouse.loaded(table_for_name(obj.name, settings.table), obj.uri)
        if loaded is not None and loaded[0] >= obj.generation:
            continue
        quarantined = sibling_name(obj.name, settings.raw_prefix, settings.quarantine_prefix)
        try:
            moved = store.ref(quarantined)
            # Quarantine moves the raw object away, so a raw object beside an older
            # quarantined copy is a new drop; one beside a newer copy was quarantined
            # (its delete failed) and has its reason already.
            if moved.updated and obj.updated and moved.updated >= obj.updated:
                continue
        except ObjectNotFound:
            pass
        if not settings.allow_duplicate_content:
            if listing is None:
                listing = list(store.list(settings.raw_prefix))
            if earlier_twin(store, obj, settings.raw_prefix, listing):
                continue  # a copy of an earlier raw object: skipped on purpose, not stalled
        resume = transformed(store, obj, settings)
        why = "never loaded" if loaded is None else (
            f"warehouse holds generation {loaded[0]}, bucket has {obj.generation}")
        if resume is not None:
            why += "; its processed object is ready, so only the load is re-run"
        yield Stalled(obj, why, resume)


def transformed(store: ObjectStore, raw: ObjectRef, settings: Settings) -> ObjectRef | None:
    """The processed object made from exactly this raw generation, if there is one.

    Re-emitting it re-runs only the load (a lost notification of the processed
    object must not cost a second transform, and may never heal otherwise).
    """
    name = output_name(raw.name, settings.raw_prefix, settings.processed_prefix)
    try:
        processed = store.ref(name)
        source_uri, source_generation = source_of(store, processed)
    except (ObjectNotFound, NotAProcessedObject):
        return None
    except Exception as exc:  # unreadable footer: the transform will write it again
        log.warning("cannot read lineage of %s in the bucket: %s", name, exc)
        return None
    if source_uri == raw.uri and source_generation == raw.generation:
        return processed
    return None


def _processed_uri(obj: ObjectRef, settings: Settings) -> str:
    processed = output_name(obj.name, settings.raw_prefix, settings.processed_prefix)
    return ObjectRef(bucket=obj.bucket, name=processed, generation=0, scheme=obj.scheme).uri


async def latest_events(delivery: EventDelivery, uris: list[str], since: datetime,
                        names: list[str] | None = None) -> dict[str, Event]:
    """The newest event (named one of `names`) about each URI since `since`."""
    latest: dict[str, Event] = {}
    for start in range(0, len(uris), _QUERY_BATCH):
        for event in await delivery.about(uris[start:start + _QUERY_BATCH], since, names):
            uri = event.resource.id
            if uri not in latest or event.occurred > latest[uri].occurred:
                latest[uri] = event
    return latest


def why_in_flight(latest: list[Event], older_than: timedelta, now: datetime,
                  exhausted: list[Event] | None = None,
                  landed: datetime | None = None, active: bool | None = None) -> str | None:
    """Why an object with these newest events should be left alone, or None.

    `active`: whether a transform or load run of the object is queued or running
    (None: unknown). A step that started and never finished is only in flight
    while its run is: one whose run ended (crashed with its process, or set
    Crashed after a restart) is re-emitted at once rather than after
    RUNNING_GRACE. The grace stays for when the runs cannot be read, and because
    the server may take 15 minutes to act on such a crash itself (its triggers
    wait for a state event it lost in a restart before acting on the next).
    """
    for event in exhausted or []:
        if landed is None or event.occurred >= landed:
            return (f"automatic recovery gave up at {event.occurred:%Y-%m-%d %H:%M}; "
                    "re-emit it by hand once the cause is fixed")
    if not latest:
        return None
    newest = max(latest, key=lambda e: e.occurred)
    age = now - newest.occurred
    if age < older_than:
        return f"{newest.event} {age.total_seconds():.0f}s ago"
    if newest.event in _STARTED and age < RUNNING_GRACE and active is not False:
        return f"{newest.event} {age.total_seconds():.0f}s ago and not finished"
    return None


# Flow runs in these states will still do their object's work.
_ACTIVE_STATES = ["SCHEDULED", "PENDING", "RUNNING", "PAUSED", "CANCELLING"]
_RUNS_PAGE = 200


async def active_objects(flows: list[str]) -> set[str]:
    """Object URIs of the runs of `flows` that are queued or running.

    Under a burst an object's run can wait minutes for a worker slot without any
    event: its queued run, not its event history, says it is on its way.
    """
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowFilter,
        FlowFilterName,
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
    )
    from prefect.client.schemas.objects import StateType

    found: set[str] = set()
    async with get_client() as client:
        offset = 0
        while True:
            runs = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=flows)),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType(s) for s in _ACTIVE_STATES]))),
                limit=_RUNS_PAGE, offset=offset)
            stale = datetime.now(UTC) - RUNNING_GRACE
            # A run Running for longer than RUNNING_GRACE lost its process (a killed
            # worker never reports it): it no longer counts as on its way.
            found.update(str(r.parameters["object_uri"]) for r in runs
                         if r.parameters.get("object_uri") and not (
                             r.state_type == StateType.RUNNING and r.start_time is not None
                             and r.start_time < stale))
            if len(runs) < _RUNS_PAGE:
                return found
            offset += _RUNS_PAGE


async def reconcile(settings: Settings, older_than: timedelta, dry_run: bool,
                    confirm_timeout: float = 60.0) -> ReconcileReport:
    """One pass: find stalled objects, skip those in flight, re-emit the rest (confirmed)."""
    store = store_from_settings(settings)
    warehouse = warehouse_from_settings(settings)
    now = datetime.now(UTC)
    report = ReconcileReport(stalled=list(find_stalled(store, warehouse, settings, older_than,
                                                       now)))
    async with EventDelivery() as delivery:
        if report.stalled:
            uris = [u for item in report.stalled
                    for u in (item.obj.uri, _processed_uri(item.obj, settings))]
            latest = await latest_events(delivery, uris, now - max(older_than, RUNNING_GRACE))
            gave_up = await latest_events(delivery, uris, now - EXHAUSTED_WINDOW,
                                          [events.RECOVERY_EXHAUSTED])
            queued: set[str] | None
            try:
                queued = await active_objects(["transform", "load"])
            except Exception as exc:  # unknown: started steps keep their grace
                log.warning("cannot read queued and running flow runs: %s", exc)
                queued = None
            for item in report.stalled:
                pair = (item.obj.uri, _processed_uri(item.obj, settings))
                active = None if queued is None else bool(queued.intersection(pair))
                why = why_in_flight([latest[u] for u in pair if u in latest], older_than, now,
                                    [gave_up[u] for u in pair if u in gave_up],
                                    item.obj.updated, active)
                if why is None and active:
                    why = "a transform or load run for it is queued or running"
                if why:
                    report.in_flight[item.obj.uri] = why
        if dry_run or not report.to_emit:
            return report
        report.emitted = [events.object_finalized(item.to_emit, settings.stage_prefixes,
                                                  reemit=True)
                          for item in report.to_emit]
        report.confirmed = await delivery.deliver(report.emitted, timeout=confirm_timeout)
    for event in report.emitted:
        log.info("re-emitted uri=%s id=%s stored=%s", event.resource.id, event.id,
                 event.id in report.confirmed)
    return report
