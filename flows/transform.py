"""Transform flow: one raw object -> processed/ (good rows) and rejects/ (bad rows).

Any dataset (the spec comes from the name, else the columns) in any format
(`.parquet`, `.csv`, `.csv.gz`); the outputs are always canonical parquet.

A file that cannot be transformed at all is moved to quarantine/ with a
`pipeline.object.quarantined` event saying why; the run still completes, so a
bad file never turns into a retry loop.

Same input, same output object: the output bytes depend only on the source
generation (its bytes, URI, generation and landing time) and the code, and both
outputs are published with `keep_unchanged`, so re-transforming a source
generation leaves processed/ at its generation and the load answers
`already_loaded` instead of replacing the rows with identical ones.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.events import Event, emit_event

from flows.common import (
    RETRY_DELAYS,
    TRANSIENT_RETRIES,
    artifact_key,
    begin,
    emit,
    object_run_name,
    retry_unless,
    transient,
)
from taxi_pipeline import events
from taxi_pipeline.content_twins import content_hash, earlier_twin
from taxi_pipeline.datasets.registry import table_for_name
from taxi_pipeline.datasets.zones import zone_ids
from taxi_pipeline.lineage import lineage_extra
from taxi_pipeline.objects import (
    ObjectRef,
    dataset_of,
    folder_year_of,
    month_of,
    output_name,
    sibling_name,
)
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore
from taxi_pipeline.transform.outputs import (
    OutputSuperseded,
    current_generation,
    landed_at,
    output_of,
    output_state,
)
from taxi_pipeline.transform.report import summary_rows, what_was_used
from taxi_pipeline.transform.streaming import (
    BadInputFile,
    TransformStats,
    source_format,
    transform_file,
)
from taxi_pipeline.warehouse import warehouse_from_settings


@task(cache_policy=NO_CACHE, retries=TRANSIENT_RETRIES, retry_delay_seconds=RETRY_DELAYS)
def quarantine(store: ObjectStore, obj: ObjectRef, error: BadInputFile, settings: Settings,
               warehouse_keeps: dict[str, int] | None = None) -> str:
    """Move the file out of raw/ so it is not retried, and say why in an event.

    `warehouse_keeps`: the earlier generation still in the table (kept, not removed).
    """
    logger = get_run_logger()
    target = sibling_name(obj.name, settings.raw_prefix, settings.quarantine_prefix)
    moved = store.move(obj, target)
    logger.warning("quarantined uri=%s to=%s reason=%s", obj.uri, moved.uri, error)
    emit(
        events.OBJECT_QUARANTINED,
        obj,
        settings,
        related=[events.object_role_resource(moved, "quarantine", settings.stage_prefixes)],
        payload={"reason": error.kind, "detail": error.detail, "quarantine_uri": moved.uri,
                 "warehouse_keeps": warehouse_keeps},
    )
    if warehouse_keeps:
        logger.warning("uri=%s: the table keeps generation %d (%d rows), the last good one",
                       obj.uri, warehouse_keeps["source_generation"], warehouse_keeps["rows"])
    return moved.uri


@task(cache_policy=NO_CACHE, retries=TRANSIENT_RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless(ObjectNotFound, OutputSuperseded))
def transform_object(
    store: ObjectStore, obj: ObjectRef, settings: Settings
) -> tuple[TransformStats, ObjectRef, ObjectRef] | BadInputFile:
    """Stream the object through the transform; publish rejects, then processed.

    A file that cannot be transformed at all is returned as its BadInputFile, not
    raised: a quarantine is an outcome of the run, and a raised error would be
    logged as a failed task (ERROR, with a traceback) for something no person
    has to fix.

    An output already holding the same bytes is kept (same generation, no new
    notification): see `transform` for how its load is still started.

    Each output is written only if it is still the generation seen before the
    work began and was not made from a newer source generation, so two runs
    of one source converge on the newest: a lost race (PreconditionFailed) is
    retried and then finds the newer outputs (OutputSuperseded).
    """
    try:
        return _transform_object(store, obj, settings)
    except BadInputFile as bad:
        return bad


def _transform_object(store: ObjectStore, obj: ObjectRef,
                      settings: Settings) -> tuple[TransformStats, ObjectRef, ObjectRef]:
    processed_name = output_name(obj.name, settings.raw_prefix, settings.processed_prefix)
    rejects_name = output_name(obj.name, settings.raw_prefix, settings.rejects_prefix)
    processed_seen = output_state(store, processed_name, obj)
    rejects_seen = output_state(store, rejects_name, obj)
    # Exit order publishes rejects before processed: the processed object's
    # notification starts the load, so everything else must be in place first.
    with (
        store.open_read(obj) as source,
        store.publish(processed_name, if_generation_match=processed_seen, keep_unchanged=True,
                      metadata=lineage_extra(obj)) as processed_path,
        store.publish(rejects_name, if_generation_match=rejects_seen, keep_unchanged=True,
                      metadata=lineage_extra(obj)) as rejects_path,
    ):
        head = source.read(4)
        source.seek(0)
        stats = transform_file(
            source,
            processed_path,
            rejects_path,
            file_format=source_format(obj.name, head),
            source_uri=obj.uri,
            source_generation=obj.generation,
            taxi_type=dataset_of(obj.name),
            month=month_of(obj.name),
            batch_rows=settings.batch_rows,
            ingested_at=landed_at(obj),
            zones=zone_ids(settings.zones_file),
        )
    processed = store.ref(processed_name)
    # The local store has no custom metadata: the lineage is in the footer we just wrote.
    processed = dataclasses.replace(processed, extra={**processed.extra, **lineage_extra(obj)})
    return stats, processed, store.ref(rejects_name)


def announce_kept(processed: ObjectRef, settings: Settings) -> Event | None:
    """Re-emit the kept processed object's `storage.object.finalized`, so its load runs.

    A kept object sends no notification, yet whoever re-ran the raw object (after
    a lost load, say) expects it to end loaded. The event is the one reconcile,
    `taxi-pipeline reemit` and recover send (`events.object_finalized`, fresh id,
    reemit label), so the load automation treats it alike: the load answers
    `already_loaded` without touching a row, or loads what was lost. It goes out
    through the run's events worker like every other event of this flow; were it
    lost, reconcile still finds the raw object unloaded and re-emits this object.
    """
    event = events.object_finalized(processed, settings.stage_prefixes, reemit=True)
    return emit_event(event=event.event, resource=dict(event.resource), payload=event.payload,
                      related=[dict(r) for r in event.related], id=event.id,
                      occurred=event.occurred)


def skip_duplicate(store: ObjectStore, obj: ObjectRef, settings: Settings) -> dict[str, Any] | None:
    """Skip `obj` when an earlier raw object holds the same bytes; None to go on.

    The same month at a second path would load its rows twice (two source URIs).
    """
    if settings.allow_duplicate_content:
        return None
    first = earlier_twin(store, obj, settings.raw_prefix)
    if first is None:
        return None
    md5 = content_hash(store, first)  # filled in by earlier_twin: no second read
    why = (f"{obj.uri} holds the same bytes as {first.uri} (md5 {md5}), "
           "which is loaded instead; remove the copy, or set TAXI_ALLOW_DUPLICATE_CONTENT=true "
           "(or the flow parameter allow_duplicate_content) and re-emit it to load both")
    get_run_logger().warning("duplicate content uri=%s first=%s", obj.uri, first.uri)
    emit(events.OBJECT_DUPLICATE_CONTENT, obj, settings,
         related=[events.object_role_resource(first, "original", settings.stage_prefixes)],
         payload={"duplicate_of": first.uri, "duplicate_of_generation": first.generation,
                  "md5_hash": md5, "detail": why})
    return {"status": "skipped", "reason": why, "duplicate_of": first.uri}


def kept_in_warehouse(obj: ObjectRef, settings: Settings) -> dict[str, int] | None:
    """The generation and rows of `obj`'s source the warehouse still holds, if any.

    A bad new version is quarantined and the last good generation's rows stay
    (deleting them would turn a bad upload into data loss); the event says so.
    """
    try:
        table = table_for_name(obj.name, settings.table)
        loaded = warehouse_from_settings(settings).loaded(table, obj.uri)
    except Exception as exc:  # the quarantine must not fail because the warehouse is away
        get_run_logger().warning("cannot read the load log for uri=%s: %s", obj.uri, exc)
        return None
    return None if loaded is None else {"source_generation": loaded[0], "rows": loaded[1]}


@flow(name="transform", flow_run_name=object_run_name)
def transform(object_uri: str, generation: int | None = None,
              event_id: str | None = None,
              allow_duplicate_content: bool | None = None) -> dict[str, Any]:
    """Validate, normalise and split one raw TLC object (the event's resource)."""
    logger = get_run_logger()
    run = begin("transform", object_uri, generation, event_id, events.TRANSFORM_STARTED)
    if run.obj is None:
        return run.skipped
    settings, store, obj = run.settings, run.store, run.obj
    if allow_duplicate_content is not None:
        settings = settings.model_copy(update={"allow_duplicate_content": allow_duplicate_content})
    duplicate = skip_duplicate(store, obj, settings)
    if duplicate is not None:
        return duplicate
    try:
        # Read before the task (and its retries): an attempt that wrote and then
        # failed counts as written, as it did make a new generation.
        before = current_generation(
            store, output_name(obj.name, settings.raw_prefix, settings.processed_prefix))
        outcome = transient(transform_object, settings)(store, obj, settings)
        if isinstance(outcome, BadInputFile):
            raise outcome
        stats, processed, rejects = outcome
    except BadInputFile as error:
        kept = kept_in_warehouse(obj, settings)
        quarantine_uri = transient(quarantine, settings)(store, obj, error, settings, kept)
        return {"status": "quarantined", "reason": str(error), "quarantine_uri": quarantine_uri,
                "warehouse_keeps": kept}
    except (ObjectNotFound, OutputSuperseded) as gone:
        # Replaced mid-read, or a newer generation's run already wrote the outputs:
        # that run (its own event) does the work, so this is a skip, not a failure.
        logger.warning("skipped transform uri=%s generation=%s: %s", obj.uri, obj.generation,
                       gone)
        return {"status": "skipped", "reason": str(gone)}
    except Exception as exc:
        emit(events.TRANSFORM_FAILED, obj, settings,
             payload={"error": f"{type(exc).__name__}: {exc}"})
        raise
    output = output_of(before, processed)
    prefixes = settings.stage_prefixes
    outputs = [events.object_role_resource(processed, "output", prefixes),
               events.object_role_resource(rejects, "rejects", prefixes)]
    counts = {"rows_in": stats.rows_in, "rows_out": stats.rows_out,
              "rows_rejected": stats.rows_rejected,
              "rejected_by_reason": dict(stats.rejected), "rejects_uri": rejects.uri}
    used = what_was_used(stats, obj.name)
    emit(events.TRANSFORM_COMPLETED, obj, settings, related=outputs,
         payload={**counts, **used, "processed_uri": processed.uri, "output": output})
    if stats.taxi_type_inferred or stats.month_inferred:
        logger.warning("uri=%s: the name does not say it all; used dataset %s (from the %s) "
                       "and month %s (from the %s)", obj.uri, stats.taxi_type,
                       stats.taxi_type_source, used["month"], stats.month_source)
    if used["folder_year_conflict"]:
        logger.warning("uri=%s: filed under year %s but its rows are of %s; move it to the "
                       "right folder (the rows load under their own month either way)",
                       obj.uri, folder_year_of(obj.name), used["month"])
    if stats.month_conflict or stats.dataset_conflict:
        logger.warning("uri=%s: the name disagrees with the data: month %s holds %.0f%% of "
                       "pickups (most are in %s), columns say %s; check the file's name",
                       obj.uri, used["month"], 100 * stats.month_share, used["month_from_data"],
                       stats.dataset_from_schema)
    if stats.rows_in > 0 and stats.rows_out == 0:
        # Triggers match labels, not payload values: the "every row rejected" alert
        # needs an event of its own.
        top = [reason for reason, _ in stats.rejected.most_common(3)]
        emit(events.OBJECT_ALL_REJECTED, obj, settings, related=outputs,
             payload={**counts, "top_reasons": top})
        logger.warning("every row of uri=%s rejected (%d rows): %s", obj.uri, stats.rows_in,
                       dict(stats.rejected))
    if output == "unchanged":
        announced = announce_kept(processed, settings)
        logger.info("processed uri=%s generation=%s unchanged: re-emitted it (event %s) so "
                    "the load runs", processed.uri, processed.generation,
                    announced.id if announced else "not sent")
    create_table_artifact(
        key=artifact_key("transform", obj),
        table=summary_rows(obj, stats),
        description=f"Transform of `{obj.uri}` (generation {obj.generation})",
    )
    logger.info(
        "transformed uri=%s rows_in=%d rows_out=%d rejected=%d -> %s output=%s",
        obj.uri, stats.rows_in, stats.rows_out, stats.rows_rejected, processed.uri, output,
    )
    return {
        "status": "completed",
        "rows_in": stats.rows_in,
        "rows_out": stats.rows_out,
        "rejected": dict(stats.rejected),
        "processed_uri": processed.uri,
        "output": output,
    }
