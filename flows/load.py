"""Load flow: one processed object -> the warehouse table, idempotent per generation.

The warehouse reads the object itself (DuckDB's read_parquet, a BigQuery load
job from the gs:// URI); only the file footer is read here, for lineage and for
the dataset its columns are (which picks the table: `trips`, `fhv_trips`, ...).
"""

from __future__ import annotations

from typing import Any

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import (
    RETRY_DELAYS,
    TRANSIENT_RETRIES,
    begin,
    emit,
    object_run_name,
    retry_unless,
    transient,
)
from taxi_pipeline import events
from taxi_pipeline.datasets.registry import table_for
from taxi_pipeline.lineage import NotAProcessedObject, read_lineage
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.settings import get_settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore
from taxi_pipeline.transform.outputs import processed_spec
from taxi_pipeline.warehouse import LoadResult, warehouse_from_settings


@task(cache_policy=NO_CACHE, retries=TRANSIENT_RETRIES, retry_delay_seconds=RETRY_DELAYS,
      retry_condition_fn=retry_unless(NotAProcessedObject, ObjectNotFound))
def load_object(store: ObjectStore, obj: ObjectRef) -> tuple[LoadResult, str]:
    settings = get_settings()
    source_uri, source_generation = read_lineage(store, obj)
    spec = processed_spec(store, obj)
    table = table_for(spec.name, settings.table)
    warehouse = warehouse_from_settings(settings)
    result = warehouse.load_object(
        object_uri=obj.uri,
        object_generation=obj.generation,
        table=table,
        schema=spec.schema,
        source_uri=source_uri,
        source_generation=source_generation,
    )
    return result, warehouse.table_uri(table)


@flow(name="load", flow_run_name=object_run_name)
def load(object_uri: str, generation: int | None = None,
         event_id: str | None = None) -> dict[str, Any]:
    """Load one processed object into the warehouse (replacing its source's older rows)."""
    logger = get_run_logger()
    run = begin("load", object_uri, generation, event_id, events.LOAD_STARTED)
    if run.obj is None:
        return run.skipped
    settings, store, obj = run.settings, run.store, run.obj
    try:
        result, table_uri = transient(load_object, settings)(store, obj)
    except Exception as exc:
        emit(events.LOAD_FAILED, obj, settings, payload={"error": f"{type(exc).__name__}: {exc}"})
        raise
    emit(
        events.LOAD_COMPLETED,
        obj,
        settings,
        related=[events.table_resource(table_uri),
                 events.source_resource(result.source_uri, result.source_generation)],
        payload={
            "status": result.status,
            "rows": result.rows,
            "replaced_rows": result.replaced_rows,
            "source_uri": result.source_uri,
            "source_generation": result.source_generation,
            "table": table_uri,
        },
    )
    logger.info("load uri=%s status=%s rows=%d replaced=%d table=%s", obj.uri, result.status,
                result.rows, result.replaced_rows, table_uri)
    return {"status": result.status, "rows": result.rows, "source_uri": result.source_uri}
