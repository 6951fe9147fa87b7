"""Recover flow: get an object processed again after a failed run or a failed automation action.

Started by automations (see automations/definitions.py) on
- `prefect.flow-run.Crashed` / `prefect.flow-run.Failed` of the transform and
  load deployments (the run's parameters name the object), and
- `prefect.automation.action.failed` of the landing automations (the server
  does not retry those; the failed event links the triggering event, whose
  resource is the object).

It re-emits `storage.object.finalized` for the object with a fresh id, after a
growing wait, at most TAXI_RECOVERY_MAX_ATTEMPTS times per object generation
(counted from `pipeline.recovery.attempted` events, so a poison file cannot
loop); then it emits `pipeline.recovery.exhausted` and ends Failed, which is
what a person is told about (and what an alert automation can forward).
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.client.orchestration import get_client
from prefect.events import Event, Resource
from prefect.states import Failed

from flows.common import recover_run_name
from taxi_pipeline import events
from taxi_pipeline.datasets.registry import table_for_name
from taxi_pipeline.event_delivery import EventDelivery
from taxi_pipeline.lineage import NotAProcessedObject, read_lineage
from taxi_pipeline.objects import ObjectRef, stage_of
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore, store_from_settings
from taxi_pipeline.warehouse import warehouse_from_settings

FLOW_RUN_PREFIX = "prefect.flow-run."
ACTION_FAILED = "prefect.automation.action.failed"
# Wait before attempt n (1-based): a transient cause (a locked database, a busy
# server) gets time to clear; the last wait is the longest.
ATTEMPT_DELAYS = [5.0, 30.0, 120.0]
# How far back attempts of one generation are counted.
ATTEMPT_WINDOW = timedelta(days=7)


async def _object_of_failed_run(run_id: UUID) -> tuple[str, int | None, str]:
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
    uri = str(run.parameters.get("object_uri") or "")
    generation = run.parameters.get("generation")
    state = run.state.name if run.state else "unknown"
    message = (run.state.message or "") if run.state else ""
    return uri, int(generation) if generation else None, f"run {run.name} {state}: {message}"


async def _object_of_failed_action(delivery: EventDelivery,
                                   failed_event_id: UUID) -> tuple[str, int | None, str]:
    failed = await delivery.read(failed_event_id, timeout=30)
    if failed is None:
        return "", None, f"event {failed_event_id} not found"
    reason = str(failed.payload.get("reason", ""))
    triggering = [r.id.removeprefix("prefect.event.") for r in failed.related
                  if r.role == "triggering-event"]
    if not triggering:
        return "", None, f"action failed ({reason}) without a triggering event"
    source = await delivery.read(UUID(triggering[0]), timeout=30)
    if source is None:
        return "", None, f"triggering event {triggering[0]} not found"
    generation = source.resource.get(events.LABEL_GENERATION)
    return (source.resource.id, int(generation) if generation else None,
            f"automation {failed.resource.get('prefect.resource.name')} failed: {reason}")


def already_done(store: ObjectStore, obj: ObjectRef, settings: Settings) -> str | None:
    """Why nothing needs doing for `obj` any more (loaded since), or None."""
    warehouse = warehouse_from_settings(settings)
    if stage_of(obj.name, settings.stage_prefixes) == events.STAGE_PROCESSED:
        try:
            source_uri, source_generation = read_lineage(store, obj)
        except (NotAProcessedObject, ObjectNotFound):
            return None
    else:
        source_uri, source_generation = obj.uri, obj.generation
    loaded = warehouse.loaded(table_for_name(obj.name, settings.table), source_uri)
    if loaded is not None and loaded[0] >= source_generation:
        return f"{source_uri} generation {loaded[0]} is loaded"
    return None


def _attempts(history: list[Event], generation: int) -> int:
    return sum(1 for e in history if e.event == events.RECOVERY_ATTEMPTED
               and e.resource.get(events.LABEL_GENERATION) == str(generation))


@flow(name="recover", flow_run_name=recover_run_name)
async def recover(event_id: str, event_name: str = "", subject: str = "") -> Any:
    """Re-emit the object behind a failed run or action, within the attempt budget."""
    logger = get_run_logger()
    settings = get_settings()
    store = store_from_settings(settings)
    async with EventDelivery() as delivery:
        if subject.startswith(FLOW_RUN_PREFIX):
            uri, generation, cause = await _object_of_failed_run(
                UUID(subject.removeprefix(FLOW_RUN_PREFIX)))
        elif event_name == ACTION_FAILED:
            uri, generation, cause = await _object_of_failed_action(delivery, UUID(event_id))
        else:
            return {"status": "ignored", "reason": f"no object in {event_name} {subject}"}
        if not uri:
            logger.warning("recover: no object found (%s)", cause)
            return {"status": "ignored", "reason": cause}
        try:
            obj = store.ref(store.name_of(uri))
        except (ObjectNotFound, ValueError) as exc:
            logger.info("recover uri=%s: nothing to do, the object is gone (%s)", uri, exc)
            return {"status": "skipped", "reason": f"{uri} no longer exists"}
        if generation and obj.generation != generation:
            logger.info("recover uri=%s: generation %s superseded by %s", uri, generation,
                        obj.generation)
            return {"status": "skipped", "reason": "superseded"}
        done = already_done(store, obj, settings)
        if done:
            logger.info("recover uri=%s: nothing to do, %s", uri, done)
            return {"status": "skipped", "reason": done}
        history = await delivery.about(
            [obj.uri], datetime.now(UTC) - ATTEMPT_WINDOW,
            names=[events.RECOVERY_ATTEMPTED, events.RECOVERY_EXHAUSTED])
        attempt = _attempts(history, obj.generation) + 1
        resource = Resource(events.object_resource(obj, settings.stage_prefixes))
        if attempt > settings.recovery_max_attempts:
            message = (f"{obj.uri} generation {obj.generation} failed after "
                       f"{settings.recovery_max_attempts} automatic re-runs (last: {cause}). "
                       f"Fix the cause, then run `taxi-pipeline reemit {obj.uri}`.")
            await delivery.deliver([Event(event=events.RECOVERY_EXHAUSTED, resource=resource,
                                          payload={"cause": cause, "message": message,
                                                   "attempts": attempt - 1})], timeout=30)
            logger.error("recovery exhausted uri=%s: %s", obj.uri, message)
            return Failed(message=message)
        delay = ATTEMPT_DELAYS[min(attempt, len(ATTEMPT_DELAYS)) - 1]
        await delivery.deliver([Event(event=events.RECOVERY_ATTEMPTED, resource=resource,
                                      payload={"attempt": attempt, "cause": cause,
                                               "delay_seconds": delay})], timeout=30)
        logger.warning("recover uri=%s attempt %d/%d in %.0fs: %s", obj.uri, attempt,
                       settings.recovery_max_attempts, delay, cause)
        await asyncio.sleep(delay)
        reemit = events.object_finalized(obj, settings.stage_prefixes, reemit=True)
        stored = await delivery.deliver([reemit], timeout=60)
        if reemit.id not in stored:
            raise RuntimeError(f"re-emitted {obj.uri} as {reemit.id}, but the server did not "
                               "confirm storing it; the scheduled reconcile will pick it up")
        logger.info("re-emitted uri=%s id=%s attempt=%d", obj.uri, reemit.id, attempt)
        return {"status": "re-emitted", "attempt": attempt, "event_id": str(reemit.id),
                "cause": cause}

