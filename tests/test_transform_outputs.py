"""The transform flow's decisions about its outputs, on a real bucket directory and DuckDB.

Stale runs never overwrite a newer generation's outputs, a source replaced
mid-read is a skip, the same bytes at a second path load once, and a bad new
version of a loaded file leaves the last good rows in the table and says so.
Prefect's run context, API and events are stubbed; storage and warehouse are real.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest

import flows.transform as transform_flow
from flows.common import RunContext
from flows.transform import OutputSuperseded, output_state, transform_object
from taxi_pipeline import events
from taxi_pipeline.content_twins import earlier_twin
from taxi_pipeline.datasets.schema import CANONICAL_SCHEMA
from taxi_pipeline.lineage import METADATA_SOURCE_GENERATION
from taxi_pipeline.objects import ObjectRef, folder_year_of, sibling_name
from taxi_pipeline.ops.reconcile import find_stalled
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.storage import ObjectNotFound, PreconditionFailed
from taxi_pipeline.storage.local import LocalStore
from taxi_pipeline.transform.streaming import transform_file, transform_parquet
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse

Emitted = list[tuple[str, dict[str, Any]]]


def _drop(store: LocalStore, name: str, rows: int, seed: int) -> ObjectRef:
    sample = generate_month("yellow", 2024, 1, rows, seed=seed)
    with store.publish(name) as target:
        write_month(sample, target)
    return store.ref(name)


def _processed(settings: Settings, obj: ObjectRef) -> str:
    return sibling_name(obj.name, settings.raw_prefix, settings.processed_prefix)


@pytest.fixture
def flow_stubs(monkeypatch: pytest.MonkeyPatch) -> Callable[[Settings, LocalStore], Emitted]:
    """Run `transform.fn` without a Prefect server; returns the list of emitted events."""

    def install(settings: Settings, store: LocalStore) -> Emitted:
        emitted: Emitted = []
        monkeypatch.setattr(transform_flow, "get_run_logger", lambda: logging.getLogger("t"))
        monkeypatch.setattr(
            transform_flow, "begin",
            lambda step, uri, *args: RunContext(settings, store, store.ref(store.name_of(uri)),
                                                {}))
        monkeypatch.setattr(transform_flow, "transient", lambda step, settings: step.fn)
        monkeypatch.setattr(transform_flow, "create_table_artifact", lambda **kwargs: None)
        monkeypatch.setattr(transform_flow, "emit", lambda name, obj, settings, **kw:
                            emitted.append((name, kw.get("payload") or {})))
        monkeypatch.setattr(transform_flow, "emit_event", lambda **kw: None)
        return emitted

    return install


# -- outputs are tied to the source generation ------------------------------------------


def test_a_stale_run_loses_the_race_for_the_outputs_and_then_skips(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Generation N is read; N+1 lands and its run publishes first; N must not overwrite it."""
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    name = raw_object_name(settings.raw_prefix, "yellow", 2024, 1)
    old = _drop(store, name, rows=800, seed=1)
    newer: list[ObjectRef] = []
    real = transform_file

    def newer_run_finishes_first(*args: Any, **kwargs: Any) -> Any:
        stats = real(*args, **kwargs)  # N's outputs are written, not yet published
        if not newer:
            time.sleep(0.01)
            newer.append(_drop(store, name, rows=500, seed=2))
            transform_object.fn(store, newer[0], settings)
        return stats

    monkeypatch.setattr(transform_flow, "transform_file", newer_run_finishes_first)
    with pytest.raises(PreconditionFailed):
        transform_object.fn(store, old, settings)
    processed = store.ref(_processed(settings, old))
    made_from = pq.read_schema(store.root / processed.name).metadata[METADATA_SOURCE_GENERATION]
    assert made_from == str(newer[0].generation).encode()
    assert pq.read_metadata(store.root / processed.name).num_rows <= 500
    # The task's retry then finds the newer outputs and stops for good.
    with pytest.raises(OutputSuperseded, match="newer generation's run owns the outputs"):
        output_state(store, processed.name, old)
    assert transform_object.retry_condition_fn is not None


def test_output_state_of_absent_own_and_foreign_outputs(tmp_path: Path) -> None:
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    obj = _drop(store, raw_object_name(settings.raw_prefix, "yellow", 2024, 1), 300, seed=3)
    processed_name = _processed(settings, obj)
    assert output_state(store, processed_name, obj) == 0
    _, processed, _ = transform_object.fn(store, obj, settings)
    assert output_state(store, processed_name, obj) == processed.generation
    foreign = settings.processed_prefix + "other.parquet"  # no lineage: the precondition decides
    with store.publish(foreign) as target:
        target.write_bytes(b"not parquet")
    assert output_state(store, foreign, obj) == store.ref(foreign).generation


def test_a_source_replaced_mid_read_is_a_skip_not_a_failure(
        monkeypatch: pytest.MonkeyPatch, flow_stubs: Callable[[Settings, LocalStore], Emitted]
) -> None:
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    obj = _drop(store, raw_object_name(settings.raw_prefix, "yellow", 2024, 1), 300, seed=4)
    emitted = flow_stubs(settings, store)

    def replaced(*args: Any, **kwargs: Any) -> Any:
        raise ObjectNotFound(f"{obj.uri} generation {obj.generation} no longer exists")

    monkeypatch.setattr(transform_flow, "transform_file", replaced)
    result = transform_flow.transform.fn(obj.uri, obj.generation)
    assert result["status"] == "skipped"
    assert "no longer exists" in result["reason"]
    assert [name for name, _ in emitted] == []  # no transform.failed
    with pytest.raises(ObjectNotFound):
        store.ref(_processed(settings, obj))


# -- the same bytes at a second path -------------------------------------------------------


def _first_and_copy(store: LocalStore, settings: Settings, seed: int
                    ) -> tuple[ObjectRef, ObjectRef]:
    """January under its TLC name, then the same bytes under raw/backup/ a moment later."""
    first = _drop(store, raw_object_name(settings.raw_prefix, "yellow", 2024, 1), 400, seed)
    time.sleep(0.01)
    copy_name = settings.raw_prefix + "backup/yellow_tripdata_2024-01.parquet"
    with store.publish(copy_name) as target:
        target.write_bytes((store.root / first.name).read_bytes())
    return first, store.ref(copy_name)


def test_a_copy_at_a_second_path_is_skipped_and_names_the_first(
        flow_stubs: Callable[[Settings, LocalStore], Emitted]) -> None:
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    first, copy = _first_and_copy(store, settings, seed=5)
    other = _drop(store, raw_object_name(settings.raw_prefix, "yellow", 2024, 2), 400, seed=6)
    emitted = flow_stubs(settings, store)

    # The first one, with its md5 filled in (naming it in the event reads nothing again).
    assert earlier_twin(store, copy, settings.raw_prefix) == dataclasses.replace(
        first, md5_hash=store.md5(first.name))
    assert earlier_twin(store, first, settings.raw_prefix) is None  # the first one loads
    assert earlier_twin(store, other, settings.raw_prefix) is None

    result = transform_flow.transform.fn(copy.uri, copy.generation)
    assert result == {"status": "skipped", "reason": result["reason"], "duplicate_of": first.uri}
    (name, payload), = emitted
    assert name == events.OBJECT_DUPLICATE_CONTENT
    assert payload["duplicate_of"] == first.uri
    assert "TAXI_ALLOW_DUPLICATE_CONTENT" in payload["detail"]
    with pytest.raises(ObjectNotFound):
        store.ref(_processed(settings, copy))

    # Overridable per run: the copy then transforms like any file.
    forced = transform_flow.transform.fn(copy.uri, copy.generation, allow_duplicate_content=True)
    assert forced["status"] == "completed"


def test_reconcile_does_not_call_a_skipped_copy_stalled(tmp_path: Path) -> None:
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    warehouse = DuckDBWarehouse(settings.warehouse_file)
    first, copy = _first_and_copy(store, settings, seed=7)
    processed = tmp_path / "p.parquet"
    transform_parquet(store.root / first.name, processed, tmp_path / "r.parquet",
                      source_uri=first.uri, source_generation=first.generation,
                      taxi_type="yellow", month=(2024, 1))
    warehouse.load_object(object_uri=processed.as_uri(), object_generation=1, table="trips",
                          schema=CANONICAL_SCHEMA, source_uri=first.uri,
                          source_generation=first.generation)
    later = datetime.now(UTC) + timedelta(days=1)
    assert list(find_stalled(store, warehouse, settings, timedelta(minutes=1), now=later)) == []
    allowed = settings.model_copy(update={"allow_duplicate_content": True})
    stalled = list(find_stalled(store, warehouse, allowed, timedelta(minutes=1), now=later))
    assert [s.obj.name for s in stalled] == [copy.name]


# -- a bad new version of a loaded file -----------------------------------------------------


def test_a_bad_new_version_keeps_the_last_good_rows_and_says_so(
        tmp_path: Path, flow_stubs: Callable[[Settings, LocalStore], Emitted]) -> None:
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    warehouse = DuckDBWarehouse(settings.warehouse_file)
    good = _drop(store, raw_object_name(settings.raw_prefix, "yellow", 2024, 1), 600, seed=8)
    _, processed, _ = transform_object.fn(store, good, settings)
    loaded = warehouse.load_object(
        object_uri=processed.uri, object_generation=processed.generation, table=settings.table,
        schema=CANONICAL_SCHEMA, source_uri=good.uri, source_generation=good.generation)
    time.sleep(0.01)
    with store.publish(good.name) as target:
        target.write_bytes(b"an upload that went wrong")
    bad = store.ref(good.name)
    assert bad.generation > good.generation
    emitted = flow_stubs(settings, store)

    result = transform_flow.transform.fn(bad.uri, bad.generation)
    kept = {"source_generation": good.generation, "rows": loaded.rows}
    assert result["status"] == "quarantined"
    assert result["warehouse_keeps"] == kept
    assert emitted[-1][0] == events.OBJECT_QUARANTINED
    assert emitted[-1][1]["warehouse_keeps"] == kept
    assert warehouse.rows_for(settings.table, good.uri) == loaded.rows
    assert not os.path.exists(store.root / good.name)


# -- what the name did not say is inferred, and the event says so ---------------------------


def test_a_file_named_outside_the_tlc_pattern_records_what_was_inferred(
        flow_stubs: Callable[[Settings, LocalStore], Emitted]) -> None:
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    obj = _drop(store, settings.raw_prefix + "foo.parquet", rows=700, seed=9)
    emitted = flow_stubs(settings, store)
    result = transform_flow.transform.fn(obj.uri, obj.generation)
    assert result["status"] == "completed"
    payload = dict(emitted)[events.TRANSFORM_COMPLETED]
    assert (payload["taxi_type"], payload["taxi_type_source"]) == ("yellow", "schema")
    assert (payload["month"], payload["month_source"]) == ("2024-01", "data")
    assert payload["month_conflict"] is False
    table = pq.read_table(store.root / settings.processed_prefix / "foo.parquet",
                          columns=["taxi_type"])
    assert set(table.column("taxi_type").to_pylist()) == {"yellow"}


def test_a_name_the_data_contradicts_is_flagged(
        flow_stubs: Callable[[Settings, LocalStore], Emitted]) -> None:
    """January's trips under February's name: the month rule uses the name, the event warns."""
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    obj = _drop(store, raw_object_name(settings.raw_prefix, "yellow", 2024, 2), 700, seed=10)
    emitted = flow_stubs(settings, store)
    transform_flow.transform.fn(obj.uri, obj.generation)
    payload = dict(emitted)[events.TRANSFORM_COMPLETED]
    assert (payload["month"], payload["month_source"]) == ("2024-02", "name")
    assert payload["month_conflict"] is True
    assert payload["month_from_data"] == "2024-01"
    assert payload["rejected_by_reason"]["pickup_outside_month"] > 600


def test_data_of_another_year_than_its_folder_is_flagged(
        flow_stubs: Callable[[Settings, LocalStore], Emitted]) -> None:
    """`raw/yellow/2024/data.parquet` holding 2025 trips: checked as 2025, flagged."""
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    name = settings.raw_prefix + "yellow/2024/data.parquet"
    with store.publish(name) as target:
        write_month(generate_month("yellow", 2025, 3, 500, seed=11), target)
    obj = store.ref(name)
    emitted = flow_stubs(settings, store)
    transform_flow.transform.fn(obj.uri, obj.generation)
    payload = dict(emitted)[events.TRANSFORM_COMPLETED]
    assert (payload["month"], payload["month_source"]) == ("2025-03", "data")
    assert payload["folder_year_conflict"] is True
    assert folder_year_of(name) == 2024
    assert folder_year_of(settings.raw_prefix + "foo.parquet") is None
    assert folder_year_of(settings.raw_prefix + "yellow_tripdata_2024-01.parquet") is None
