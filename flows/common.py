"""What the transform and load flows share: resolving the object, emitting events."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from prefect import get_run_logger
from prefect.events import emit_event

from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore, store_from_settings


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


def begin(step: str, uri: str, generation: int | None, event_id: str | None) -> RunContext:
    """Resolve the event's object; log and describe a skip when it is gone or superseded."""
    logger = get_run_logger()
    settings = get_settings()
    store = store_from_settings(settings)
    obj, why_not = current_object(store, uri, generation)
    if obj is None:
        logger.warning("skipped %s uri=%s event=%s: %s", step, uri, event_id, why_not)
        return RunContext(settings, store, None, {"status": "skipped", "reason": why_not})
    logger.info("%s uri=%s generation=%s event=%s", step, obj.uri, obj.generation, event_id)
    return RunContext(settings, store, obj, {})


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


def artifact_key(prefix: str, obj: ObjectRef) -> str:
    """Artifact keys allow lower-case letters, digits and dashes only."""
    slug = re.sub(r"[^a-z0-9]+", "-", obj.name.lower()).strip("-")
    return f"{prefix}-{slug}"[:200]
