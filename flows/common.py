"""What the transform and load flows share: resolving the object, emitting events."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, ParamSpec, TypeVar

from prefect import Task, get_run_logger
from prefect.client.schemas.objects import State, TaskRun
from prefect.events import emit_event
from prefect.runtime import flow_run

from taxi_pipeline import events
from taxi_pipeline.lineage import NotAProcessedObject, source_of
from taxi_pipeline.monitoring import tracing
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore, store_from_settings

P = ParamSpec("P")
R = TypeVar("R")


def current_object(store: ObjectStore, uri: str, generation: int | None) -> tuple[
        ObjectRef | None, str]:
    """The object the event names, or None and why it is gone or superseded.

    A newer generation means a newer event is on its way; that run does the work.
    `generation` None or 0 means "whatever is current" (a hand-made event).
    """
    name = store.name_of(uri)
    try:
        obj = store.ref(name)
    except ObjectNotFound:
        return None, f"{uri} no longer exists (moved or deleted after the event)"
    if generation and obj.generation != generation:
        if obj.generation > generation:
            return None, (f"{uri} generation {generation} was superseded by "
                          f"{obj.generation}; the newer generation's run handles it")
        return None, f"{uri} is at generation {obj.generation}, older than {generation}"
    return obj, ""


@dataclass(frozen=True)
class RunContext:
    """What every object flow starts from: settings, store, and the object (or why not)."""

    settings: Settings
    store: ObjectStore
    obj: ObjectRef | None
    skipped: dict[str, Any]


# Transient failures (storage, warehouse, API) are retried with growing waits; bad
# input is not retried, because it would fail the same way every time. These are
# the decorators' defaults; runs use TAXI_TASK_RETRY_DELAYS through `transient`.
TRANSIENT_RETRIES = 3
RETRY_DELAYS = [2.0, 10.0, 30.0]


def transient(step: Task[P, R], settings: Settings) -> Task[P, R]:
    """`step` retried once per wait of `settings.task_retry_delays`."""
    delays = list(settings.task_retry_delays)
    return step.with_options(retries=len(delays), retry_delay_seconds=delays or 0)


def retry_unless(*permanent: type[BaseException]) -> Any:
    """A task `retry_condition_fn` that retries everything but the `permanent` errors."""

    def should_retry(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
        error = state.result(raise_on_failure=False)
        return not isinstance(error, permanent)

    return should_retry


def object_run_name() -> str:
    """Flow runs named after their object (`transform-yellow_tripdata_2024-01.parquet`)."""
    uri = str(flow_run.parameters.get("object_uri", ""))
    return f"{flow_run.flow_name}-{uri.rsplit('/', 1)[-1] or '?'}"


def timed_run_name() -> str:
    """Runs that act on many objects, named after what and when (`reconcile-2024-05-01T06:00`)."""
    from datetime import UTC, datetime

    return f"{flow_run.flow_name}-{datetime.now(UTC):%Y-%m-%dT%H:%M:%S}"


def recover_run_name() -> str:
    """`recover-crashed-<run>`: what went wrong, and the run or automation it happened to."""
    what = str(flow_run.parameters.get("event_name", "")).rsplit(".", 1)[-1].lower() or "event"
    subject = str(flow_run.parameters.get("subject", "")).rsplit(".", 1)[-1][:8] or "?"
    return f"recover-{what}-{subject}"


def begin(step: str, uri: str, generation: int | None, event_id: str | None,
          started_event: str | None = None) -> RunContext:
    """Resolve the event's object; log and describe a skip when it is gone or superseded.

    `started_event` is emitted once the object resolves, so reconcile can tell a
    run in progress from a stalled object.
    """
    logger = get_run_logger()
    settings = get_settings()
    store = store_from_settings(settings)
    obj, why_not = current_object(store, uri, generation)
    if obj is None:
        logger.warning("skipped %s uri=%s event=%s: %s", step, uri, event_id, why_not)
        return RunContext(settings, store, None, {"status": "skipped", "reason": why_not})
    logger.info("%s uri=%s generation=%s event=%s", step, obj.uri, obj.generation, event_id)
    if started_event:
        emit(started_event, obj, settings, related=source_related(store, obj),
             payload={"event_id": event_id})
    return RunContext(settings, store, obj, {})


def source_related(store: ObjectStore, obj: ObjectRef) -> list[dict[str, str]]:
    """A processed object's raw source as a related resource (role `source`), so the
    event shows under the raw object in the UI's resource filter; [] for a raw object."""
    if not obj.name.startswith(get_settings().processed_prefix):
        return []  # no footer read for what cannot have a source
    try:
        source_uri, source_generation = source_of(store, obj)
    except (NotAProcessedObject, ObjectNotFound):
        return []
    return [events.source_resource(source_uri, source_generation)]


def emit(
    name: str,
    obj: ObjectRef,
    settings: Settings,
    *,
    related: list[dict[str, str]] | None = None,
    payload: dict[str, Any] | None = None,
) -> None:
    """A `pipeline.*` event about `obj`; Prefect adds the flow run as a related resource."""
    emit_event(
        event=name,
        resource=events.object_resource(obj, settings.stage_prefixes),
        related=related or [],
        payload=payload or {},
    )
    # The event that ends a transform or load also ends its span (off without OTEL_*).
    tracing.flow_step(name, events.object_resource(obj, settings.stage_prefixes),
                      [*(related or []), *map(dict, events.lineage_related(obj))], payload or {})


def artifact_key(prefix: str, obj: ObjectRef) -> str:
    """Artifact keys allow lower-case letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", obj.name.lower()).strip("-")
    return f"{prefix}-{slug}"[:200]
