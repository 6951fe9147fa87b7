"""Idempotent per-object loads into BigQuery, against fake-gcs-server and bqemulator.

Processed files come from the real transform of synthetic TLC months and reach
the warehouse the production way: uploaded to (fake) GCS, then a load job from
the gs:// URI. The emulator re-runs a repeated job id where BigQuery answers
409 Conflict; `RealJobIdClient` restores BigQuery's answer so the adopt-or-retry
path is exercised too.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest
from google.api_core.exceptions import Conflict
from google.auth.credentials import AnonymousCredentials
from google.cloud import bigquery, storage
from support.emulators import (
    BigQueryEmulator,
    bigquery_emulator,
    emulators_available,
    fake_gcs_server,
)

from taxi_pipeline.datasets.registry import SPECS, table_for
from taxi_pipeline.datasets.schema import CANONICAL_SCHEMA
from taxi_pipeline.datasets.zones import zone_table
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, write_month
from taxi_pipeline.transform.streaming import transform_parquet
from taxi_pipeline.warehouse import LoadResult, warehouse_from_settings
from taxi_pipeline.warehouse.bigquery_warehouse import (
    LOAD_LOG,
    LOAD_RANGES,
    STAGING_PREFIX,
    BigQueryLoadError,
    BigQueryWarehouse,
    Months,
    bigquery_schema,
)

PROJECT = "taxi-test"
LOCATION = "US"
BUCKET = "taxi-lake"
TABLE = "trips"
YELLOW_URI = f"gs://{BUCKET}/raw/yellow/2024/yellow_tripdata_2024-01.parquet"
GREEN_URI = f"gs://{BUCKET}/raw/green/2024/green_tripdata_2024-01.parquet"


@dataclass(frozen=True)
class Processed:
    """One processed object generation in fake GCS, as the transform flow writes it."""

    path: Path
    uri: str
    generation: int  # the processed object's own generation
    source_uri: str
    source_generation: int
    rows: int


@dataclass
class Stack:
    bq: BigQueryEmulator
    bucket: storage.Bucket
    client: bigquery.Client
    work: Path

    def processed(
        self,
        *,
        dataset: str = "yellow",
        source_uri: str = YELLOW_URI,
        source_generation: int = 1,
        rows: int = 1_500,
        seed: int = 0,
        name: str | None = None,
        month: int = 1,
    ) -> Processed:
        """Transform a synthetic raw month and upload the result (a new object generation)."""
        sample = generate_month(dataset, 2024, month, rows, seed=seed)  # type: ignore[arg-type]
        tag = f"{dataset}-{source_generation}-{rows}-{seed}-{uuid.uuid4().hex[:6]}"
        raw = write_month(sample, self.work / "raw" / f"{tag}.parquet")
        out = self.work / "processed" / f"{tag}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        stats = transform_parquet(
            raw,
            out,
            self.work / "processed" / f"{tag}.rejects.parquet",
            source_uri=source_uri,
            source_generation=source_generation,
            taxi_type=dataset,
            month=(2024, month),
            ingested_at=datetime(2025, 1, 1, tzinfo=UTC),
        )
        blob = self.bucket.blob(name or f"processed/{dataset}/{tag}.parquet")
        blob.upload_from_filename(str(out))
        assert blob.generation is not None
        return Processed(out, f"gs://{BUCKET}/{blob.name}", int(blob.generation), source_uri,
                         source_generation, stats.rows_out)


class WorkerKilled(BaseException):
    """Stands for the worker dying mid-load (not an Exception: nothing may catch it)."""


def crash(*args: object) -> None:
    raise WorkerKilled


class RealJobIdClient(bigquery.Client):
    """Answers a repeated load job id with 409 Conflict, as BigQuery does.

    (bqemulator accepts the id again and re-runs the job.) The job itself stays
    on the emulator, so `get_job` returns its real outcome.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.load_job_ids: list[str] = []
        self.conflicts: list[str] = []

    def load_table_from_uri(self, source_uris: Any, destination: Any,  # type: ignore[override]
                            job_id: str | None = None, **kwargs: Any) -> bigquery.LoadJob:
        if job_id is not None and job_id in self.load_job_ids:
            self.conflicts.append(job_id)
            raise Conflict(f"Already Exists: Job {self.project}:{LOCATION}.{job_id}")
        if job_id is not None:
            self.load_job_ids.append(job_id)
        return super().load_table_from_uri(source_uris, destination, job_id=job_id, **kwargs)


def bq_client(bq: BigQueryEmulator, cls: type[bigquery.Client] = bigquery.Client
              ) -> bigquery.Client:
    return cls(project=PROJECT, credentials=AnonymousCredentials(), location=LOCATION,
               client_options={"api_endpoint": bq.endpoint})


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    reason = emulators_available()
    if reason is not None:
        pytest.skip(reason)
    work = tmp_path_factory.mktemp("bigquery-warehouse")
    with (
        fake_gcs_server(work / "gcs", log_path=work / "fake-gcs-server.log") as gcs,
        bigquery_emulator(PROJECT, gcs.root, log_path=work / "bqemulator.log") as bq,
        pytest.MonkeyPatch.context() as env,
    ):
        env.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        gcs_client = storage.Client(project=PROJECT, credentials=AnonymousCredentials())
        bucket = gcs_client.create_bucket(BUCKET)
        yield Stack(bq, bucket, bq_client(bq), work)


@pytest.fixture
def dataset() -> str:
    """Each test gets its own dataset on the shared emulator."""
    return f"t_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def warehouse(stack: Stack, dataset: str) -> BigQueryWarehouse:
    return BigQueryWarehouse(stack.client, dataset, LOCATION)


def load(warehouse: BigQueryWarehouse, p: Processed, **overrides: Any) -> LoadResult:
    args: dict[str, Any] = {
        "object_uri": p.uri,
        "object_generation": p.generation,
        "table": TABLE,
        "schema": CANONICAL_SCHEMA,
        "source_uri": p.source_uri,
        "source_generation": p.source_generation,
    }
    args.update(overrides)
    return warehouse.load_object(**args)


def query(warehouse: BigQueryWarehouse, sql: str, **params: str | int) -> list[tuple[Any, ...]]:
    """Run SQL with `{t}` = the trips table, `{log}` = the load log."""
    sql = sql.format(t=f"`{PROJECT}.{warehouse.dataset}.{TABLE}`",
                     log=f"`{PROJECT}.{warehouse.dataset}.{LOAD_LOG}`")
    config = bigquery.QueryJobConfig(query_parameters=[
        bigquery.ScalarQueryParameter(k, "STRING" if isinstance(v, str) else "INT64", v)
        for k, v in params.items()])
    return [tuple(row.values()) for row in warehouse.client.query(sql, job_config=config)]


def total_rows(warehouse: BigQueryWarehouse) -> int:
    [(n,)] = query(warehouse, "SELECT COUNT(*) AS n FROM {t}")
    return int(n)


def tables(warehouse: BigQueryWarehouse) -> set[str]:
    return {t.table_id for t in warehouse.client.list_tables(f"{PROJECT}.{warehouse.dataset}")}


def test_schema_conversion() -> None:
    fields = {f.name: (f.field_type, f.mode) for f in bigquery_schema(CANONICAL_SCHEMA)}
    assert list(fields) == CANONICAL_SCHEMA.names  # position matters to the emulator
    assert fields["pickup_datetime"] == ("DATETIME", "NULLABLE")  # New York wall clock
    assert fields["dropoff_datetime"] == ("DATETIME", "NULLABLE")
    assert fields["ingested_at"] == ("TIMESTAMP", "REQUIRED")
    assert fields["passenger_count"] == ("INT64", "NULLABLE")
    assert fields["total_amount"] == ("FLOAT64", "NULLABLE")
    assert fields["taxi_type"] == ("STRING", "REQUIRED")
    assert {n for n, (_, mode) in fields.items() if mode == "REQUIRED"} == {
        "taxi_type", "source_uri", "source_generation", "ingested_at"}


def test_nothing_loaded_yet(warehouse: BigQueryWarehouse) -> None:
    assert warehouse.loaded(TABLE, YELLOW_URI) is None
    assert warehouse.rows_for(TABLE, YELLOW_URI) is None
    assert warehouse.loads() == []
    assert warehouse.table_uri(TABLE) == f"bigquery://{PROJECT}.{warehouse.dataset}.trips"


def test_first_load_creates_a_partitioned_clustered_table(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    p = stack.processed()
    result = load(warehouse, p)
    assert result == LoadResult(TABLE, YELLOW_URI, 1, p.rows, 0, "loaded")
    assert p.rows > 1_000

    table = warehouse.client.get_table(f"{PROJECT}.{warehouse.dataset}.{TABLE}")
    assert table.time_partitioning is not None
    assert table.time_partitioning.type_ == "MONTH"
    assert table.time_partitioning.field == "pickup_datetime"
    assert table.clustering_fields == ["source_uri"]
    assert [f.name for f in table.schema] == CANONICAL_SCHEMA.names
    types = {f.name: f.field_type for f in table.schema}
    assert types["pickup_datetime"] == types["dropoff_datetime"] == "DATETIME"
    assert types["ingested_at"] == "TIMESTAMP"
    assert types["vendor_id"] in ("INT64", "INTEGER")
    assert {f.name for f in table.schema if f.mode == "REQUIRED"} == {
        "taxi_type", "source_uri", "source_generation", "ingested_at"}
    assert tables(warehouse) == {TABLE, LOAD_LOG, LOAD_RANGES}  # the staging table is gone

    # exactly the processed file's rows, value for value
    expected = pq.read_table(p.path)
    [(n, total, first, last, ingested)] = query(
        warehouse,
        "SELECT COUNT(*), SUM(total_amount), MIN(pickup_datetime), MAX(pickup_datetime),"
        " MAX(ingested_at) FROM {t}",
    )
    assert n == p.rows
    assert total == pytest.approx(pc.sum(expected.column("total_amount")).as_py())
    assert first == pc.min(expected.column("pickup_datetime")).as_py()  # wall clock, naive
    assert last == pc.max(expected.column("pickup_datetime")).as_py()
    assert ingested == datetime(2025, 1, 1, tzinfo=UTC)

    assert warehouse.rows_for(TABLE, YELLOW_URI) == p.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, p.rows)
    [log] = warehouse.loads()
    assert (log["table_name"], log["source_uri"], log["object_uri"], log["object_generation"],
            log["rows"]) == (TABLE, YELLOW_URI, p.uri, p.generation, p.rows)


def test_same_object_generation_again_is_already_loaded(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    p = stack.processed()
    load(warehouse, p)
    for _ in range(3):  # redelivered notifications, retried load runs
        assert load(warehouse, p) == LoadResult(TABLE, YELLOW_URI, 1, p.rows, 0,
                                                "already_loaded")
    assert total_rows(warehouse) == p.rows
    assert len(warehouse.loads()) == 1


def test_rerun_after_losing_the_log_row_does_not_duplicate(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """A crash between the MERGE and the log write: the rerun replaces, never appends."""
    p = stack.processed()
    load(warehouse, p)
    query(warehouse, "DELETE FROM {log} WHERE source_uri = @u", u=YELLOW_URI)
    assert warehouse.loaded(TABLE, YELLOW_URI) is None
    result = load(warehouse, p)
    assert result == LoadResult(TABLE, YELLOW_URI, 1, p.rows, p.rows, "loaded")
    assert total_rows(warehouse) == p.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, p.rows)
    assert tables(warehouse) == {TABLE, LOAD_LOG, LOAD_RANGES}


def test_crash_after_merge_before_log_reruns_cleanly(
    warehouse: BigQueryWarehouse, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    p = stack.processed()
    monkeypatch.setattr(warehouse, "_record", crash)
    with pytest.raises(WorkerKilled):
        load(warehouse, p)
    assert warehouse.rows_for(TABLE, YELLOW_URI) == p.rows  # the MERGE had committed
    assert warehouse.loaded(TABLE, YELLOW_URI) is None
    assert len(tables(warehouse)) == 4  # staging left behind
    monkeypatch.undo()
    assert load(warehouse, p).status == "loaded"
    assert total_rows(warehouse) == p.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, p.rows)
    assert tables(warehouse) == {TABLE, LOAD_LOG, LOAD_RANGES}


def test_newer_source_generation_replaces_rows(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    old = stack.processed(source_generation=1, rows=1_500)
    new = stack.processed(source_generation=2, rows=2_500)
    assert new.rows != old.rows
    load(warehouse, old)
    result = load(warehouse, new)
    assert result == LoadResult(TABLE, YELLOW_URI, 2, new.rows, old.rows, "loaded")
    assert warehouse.rows_for(TABLE, YELLOW_URI) == new.rows  # replaced, not summed
    assert total_rows(warehouse) == new.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (2, new.rows)
    assert query(warehouse, "SELECT DISTINCT source_generation FROM {t}") == [(2,)]

    # an older generation delivered late changes nothing
    late = load(warehouse, old)
    assert late == LoadResult(TABLE, YELLOW_URI, 1, 0, 0, "superseded")
    assert total_rows(warehouse) == new.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (2, new.rows)


def test_the_merge_never_moves_a_source_backwards(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """Two loads of one source racing past the log check: the older one changes nothing."""
    old = stack.processed(source_generation=1, rows=1_500)
    new = stack.processed(source_generation=2, rows=2_500)
    load(warehouse, new)
    query(warehouse, "DELETE FROM {log} WHERE source_uri = @u", u=YELLOW_URI)  # the race
    assert load(warehouse, old) == LoadResult(TABLE, YELLOW_URI, 1, 0, 0, "superseded")
    assert query(warehouse, "SELECT source_generation, COUNT(*) FROM {t} GROUP BY 1") == [
        (2, new.rows)]
    assert tables(warehouse) == {TABLE, LOAD_LOG, LOAD_RANGES}


def test_retransform_of_the_same_source_generation_replaces_rows(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """A new processed object of the same raw generation (a re-emit) is loaded again."""
    first = stack.processed(source_generation=5, rows=1_000)
    second = stack.processed(source_generation=5, rows=1_200, seed=1)
    load(warehouse, first)
    assert load(warehouse, second).status == "loaded"
    assert total_rows(warehouse) == second.rows


def test_two_sources_coexist(warehouse: BigQueryWarehouse, stack: Stack) -> None:
    yellow = stack.processed(rows=1_500)
    green = stack.processed(dataset="green", source_uri=GREEN_URI, rows=1_200)
    load(warehouse, yellow)
    load(warehouse, green)
    assert warehouse.rows_for(TABLE, YELLOW_URI) == yellow.rows
    assert warehouse.rows_for(TABLE, GREEN_URI) == green.rows
    assert sorted(query(warehouse, "SELECT taxi_type, COUNT(*) FROM {t} GROUP BY 1")) == [
        ("green", green.rows), ("yellow", yellow.rows)]
    newer_green = stack.processed(dataset="green", source_uri=GREEN_URI, source_generation=2,
                                  rows=800)
    load(warehouse, newer_green)
    assert warehouse.rows_for(TABLE, YELLOW_URI) == yellow.rows  # untouched
    assert warehouse.rows_for(TABLE, GREEN_URI) == newer_green.rows
    assert warehouse.loaded(TABLE, GREEN_URI) == (2, newer_green.rows)
    assert len(warehouse.loads()) == 2
    # unknown sources and tables
    assert warehouse.rows_for(TABLE, "gs://elsewhere/x.parquet") == 0
    assert warehouse.loaded(TABLE, "gs://elsewhere/x.parquet") is None
    assert warehouse.rows_for("other_table", YELLOW_URI) is None
    assert warehouse.loaded("other_table", YELLOW_URI) is None


def test_object_overwritten_since_the_event_is_superseded(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """A load job reads the live object: a stale event must not load newer rows as old."""
    name = f"processed/yellow/{uuid.uuid4().hex}.parquet"
    old = stack.processed(source_generation=1, name=name)
    new = stack.processed(source_generation=2, rows=900, name=name)  # overwrites the object
    assert old.uri == new.uri and old.generation != new.generation
    assert load(warehouse, old).status == "superseded"
    assert warehouse.rows_for(TABLE, YELLOW_URI) == 0
    assert warehouse.loaded(TABLE, YELLOW_URI) is None
    assert load(warehouse, new).status == "loaded"
    assert warehouse.rows_for(TABLE, YELLOW_URI) == new.rows


def test_rows_of_another_source_are_refused(warehouse: BigQueryWarehouse, stack: Stack) -> None:
    p = stack.processed()
    with pytest.raises(BigQueryLoadError, match="does not hold the rows of"):
        load(warehouse, p, source_uri=GREEN_URI)
    assert warehouse.rows_for(TABLE, GREEN_URI) == 0
    assert total_rows(warehouse) == 0
    assert tables(warehouse) == {TABLE, LOAD_LOG, LOAD_RANGES}


def test_missing_object_fails_without_damage(warehouse: BigQueryWarehouse, stack: Stack) -> None:
    good = stack.processed(source_generation=1)
    load(warehouse, good)
    newer = stack.processed(source_generation=2)
    with pytest.raises(BigQueryLoadError, match=r"(?s)could not read .*gone\.parquet.*re-emit"):
        load(warehouse, newer, object_uri=f"gs://{BUCKET}/processed/gone.parquet")
    assert warehouse.rows_for(TABLE, YELLOW_URI) == good.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, good.rows)
    assert load(warehouse, newer).status == "loaded"  # and the warehouse still works
    assert total_rows(warehouse) == newer.rows


def test_non_gs_uri_is_refused(warehouse: BigQueryWarehouse, stack: Stack) -> None:
    p = stack.processed()
    with pytest.raises(ValueError, match="gs://"):
        load(warehouse, p, object_uri=p.path.as_uri())


def test_existing_table_of_another_shape_is_refused(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    warehouse.client.create_dataset(f"{PROJECT}.{warehouse.dataset}")
    warehouse.client.create_table(bigquery.Table(
        f"{PROJECT}.{warehouse.dataset}.{TABLE}",
        schema=[bigquery.SchemaField("source_uri", "STRING"),
                bigquery.SchemaField("pickup_datetime", "STRING")],
    ))
    with pytest.raises(BigQueryLoadError, match=r"pickup_datetime is STRING.*TAXI_TABLE"):
        load(warehouse, stack.processed())


def test_identifiers_are_validated(stack: Stack) -> None:
    with pytest.raises(ValueError, match="dataset name"):
        BigQueryWarehouse(stack.client, "taxi`; DROP SCHEMA x; --", LOCATION)
    warehouse = BigQueryWarehouse(stack.client, "fine", LOCATION)
    with pytest.raises(ValueError, match="table name"):
        warehouse.rows_for("trips` WHERE TRUE; --", YELLOW_URI)


# -- BigQuery's job-id semantics (409 Conflict on a repeated id) ---------------------------


@pytest.fixture
def real_ids(stack: Stack, dataset: str) -> tuple[BigQueryWarehouse, RealJobIdClient]:
    client = bq_client(stack.bq, RealJobIdClient)
    assert isinstance(client, RealJobIdClient)
    return BigQueryWarehouse(client, dataset, LOCATION), client


def test_conflict_adopts_the_finished_load_job(
    real_ids: tuple[BigQueryWarehouse, RealJobIdClient], stack: Stack,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Crash after the MERGE: the rerun adopts the earlier load job and its staging table."""
    warehouse, client = real_ids
    p = stack.processed()
    monkeypatch.setattr(warehouse, "_record", crash)
    with pytest.raises(WorkerKilled):
        load(warehouse, p)
    monkeypatch.undo()
    assert load(warehouse, p).status == "loaded"
    assert client.conflicts == client.load_job_ids[:1]  # adopted, not loaded again
    assert len(client.load_job_ids) == 1
    assert total_rows(warehouse) == p.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, p.rows)


def test_conflict_with_staging_gone_loads_again_under_a_new_id(
    real_ids: tuple[BigQueryWarehouse, RealJobIdClient], stack: Stack
) -> None:
    """The log row was lost after a complete run: the old job's staging table is gone."""
    warehouse, client = real_ids
    p = stack.processed()
    load(warehouse, p)
    query(warehouse, "DELETE FROM {log} WHERE source_uri = @u", u=YELLOW_URI)
    assert load(warehouse, p).status == "loaded"
    first, retry = client.load_job_ids
    assert client.conflicts == [first]
    assert retry == f"{first}_retry1"
    assert total_rows(warehouse) == p.rows


def test_conflict_with_a_failed_job_tries_the_next_id(
    real_ids: tuple[BigQueryWarehouse, RealJobIdClient], stack: Stack
) -> None:
    """An object that stays unreadable fails under a new job id each run, never blocks on
    the old failed job, and the error says what to do."""
    warehouse, client = real_ids
    good = stack.processed(source_generation=1)
    load(warehouse, good)
    gone = f"gs://{BUCKET}/processed/not-there.parquet"
    newer = stack.processed(source_generation=2)
    for _ in range(2):
        with pytest.raises(BigQueryLoadError,
                           match=r"(?s)could not read .*not-there.*new job id.*re-emit"):
            load(warehouse, newer, object_uri=gone)
    failed = [i for i in client.load_job_ids if i.startswith("taxi_stage_")][1:]
    assert failed == [failed[0], f"{failed[0]}_retry1"]
    assert client.conflicts == [failed[0]]
    assert warehouse.rows_for(TABLE, YELLOW_URI) == good.rows


class FailsOnceClient(RealJobIdClient):
    """BigQuery's job ids, and the first load job fails: it reads an object that is not
    there, so the emulator itself fails the job, as BigQuery fails a job whose object it
    may not read yet (a 403 fixed later by granting IAM)."""

    def load_table_from_uri(self, source_uris: Any, destination: Any,  # type: ignore[override]
                            job_id: str | None = None, **kwargs: Any) -> bigquery.LoadJob:
        if not self.load_job_ids:
            source_uris = f"gs://{BUCKET}/processed/denied-for-now.parquet"
        return super().load_table_from_uri(source_uris, destination, job_id=job_id, **kwargs)


def test_a_failed_load_job_does_not_block_the_object(stack: Stack, dataset: str) -> None:
    """Issue 20, defect 1: the job fails once; the next run of the same object generation
    loads it under the next attempt id, exactly once, with nothing written by hand."""
    client = bq_client(stack.bq, FailsOnceClient)
    assert isinstance(client, FailsOnceClient)
    warehouse = BigQueryWarehouse(client, dataset, LOCATION)
    p = stack.processed()
    with pytest.raises(BigQueryLoadError, match=r"could not read"):
        load(warehouse, p)
    assert warehouse.rows_for(TABLE, YELLOW_URI) == 0
    assert load(warehouse, p).status == "loaded"  # the next run (task retry, recover, ...)
    first, second = client.load_job_ids
    assert client.conflicts == [first]  # the failed job was found and passed over
    assert second == f"{first}_retry1"
    assert total_rows(warehouse) == p.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, p.rows)
    assert load(warehouse, p).status == "already_loaded"
    assert total_rows(warehouse) == p.rows


BACKEND_ERROR = {"reason": "backendError", "message": "Error encountered during execution. "
                 "Retrying may solve the problem."}


class BackendErrorJob(bigquery.LoadJob):
    """A load job as BigQuery reports one that failed with backendError."""

    @property
    def error_result(self) -> dict[str, str]:
        return BACKEND_ERROR

    def result(self, *args: Any, **kwargs: Any) -> Any:
        from google.cloud.bigquery.job.base import _error_result_to_exception
        raise _error_result_to_exception(BACKEND_ERROR, [BACKEND_ERROR])


class BackendErrorOnceClient(RealJobIdClient):
    def load_table_from_uri(self, source_uris: Any, destination: Any,  # type: ignore[override]
                            job_id: str | None = None, **kwargs: Any) -> bigquery.LoadJob:
        if not self.load_job_ids and job_id is not None:
            self.load_job_ids.append(job_id)
            return BackendErrorJob(job_id, [source_uris],
                                   bigquery.TableReference.from_string(destination), self)
        return super().load_table_from_uri(source_uris, destination, job_id=job_id, **kwargs)


def test_a_backend_error_is_loaded_again_at_once_under_a_new_id(
    stack: Stack, dataset: str
) -> None:
    """BigQuery's troubleshooting guide: a job that failed with backendError can be retried."""
    client = bq_client(stack.bq, BackendErrorOnceClient)
    assert isinstance(client, BackendErrorOnceClient)
    warehouse = BigQueryWarehouse(client, dataset, LOCATION)
    waits: list[float] = []
    warehouse._sleep = waits.append
    p = stack.processed()
    assert load(warehouse, p).status == "loaded"
    first, second = client.load_job_ids
    assert second == f"{first}_retry1"
    assert len(waits) == 1 and 0 < waits[0] <= 2
    assert total_rows(warehouse) == p.rows


def test_a_permanent_job_failure_is_not_retried_in_the_run(stack: Stack, dataset: str) -> None:
    client = bq_client(stack.bq, RealJobIdClient)
    warehouse = BigQueryWarehouse(client, dataset, LOCATION)
    with pytest.raises(BigQueryLoadError, match="could not read"):
        load(warehouse, stack.processed(), object_uri=f"gs://{BUCKET}/processed/nope.parquet")
    assert len(client.load_job_ids) == 1  # type: ignore[attr-defined]


# -- settings --------------------------------------------------------------------------


def test_warehouse_from_settings(stack: Stack, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("BIGQUERY_EMULATOR_HOST", stack.bq.endpoint)
    settings = Settings(profile="emulator", gcp_project=PROJECT, bq_dataset="from_settings",
                        bq_location=LOCATION)
    warehouse = warehouse_from_settings(settings)
    assert isinstance(warehouse, BigQueryWarehouse)
    assert (warehouse.dataset, warehouse.location) == ("from_settings", LOCATION)
    assert warehouse.table_uri("trips") == f"bigquery://{PROJECT}.from_settings.trips"
    assert warehouse.loaded("trips", YELLOW_URI) is None  # talks to the emulator

    monkeypatch.setattr("taxi_pipeline.gcp.clients.credentials",
                        lambda settings: AnonymousCredentials())
    gcp = warehouse_from_settings(Settings(profile="gcp", gcp_project="prod-project",
                                           bq_dataset="taxi", bq_location="EU"))
    assert isinstance(gcp, BigQueryWarehouse)
    assert gcp.table_uri("trips") == "bigquery://prod-project.taxi.trips"
    assert gcp.location == "EU"


def test_staging_tables_are_per_table_source_and_object_generation() -> None:
    obj = f"gs://{BUCKET}/processed/x.parquet"
    names = {BigQueryWarehouse.staging_table(t, s, obj, g)
             for t in ("trips", "trips2") for s in (YELLOW_URI, GREEN_URI) for g in (1, 2)}
    assert len(names) == 8
    assert all(n.startswith(STAGING_PREFIX) for n in names)


# -- wall-clock times (DATETIME) --------------------------------------------------------


def wall_clock(path: Path) -> list[tuple[datetime, datetime]]:
    table = pq.read_table(path, columns=["pickup_datetime", "dropoff_datetime"])
    return sorted(zip(table.column(0).to_pylist(), table.column(1).to_pylist(), strict=True))


def test_wall_clock_times_load_as_datetime_unchanged(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """Every pickup/dropoff equals the parquet's naive New York wall-clock value."""
    p = stack.processed(rows=800)
    load(warehouse, p)
    rows = query(warehouse, "SELECT pickup_datetime, dropoff_datetime FROM {t}")
    assert sorted(rows) == wall_clock(p.path)
    assert all(r[0].tzinfo is None for r in rows)


def old_version_table(warehouse: BigQueryWarehouse, p: Processed) -> list[bigquery.SchemaField]:
    """The table an earlier version made: wall-clock columns as TIMESTAMP, loaded from `p`."""
    old_schema = [bigquery.SchemaField(f.name, "TIMESTAMP" if f.field_type == "DATETIME"
                                       else f.field_type, mode=f.mode)
                  for f in bigquery_schema(CANONICAL_SCHEMA)]
    table_id = f"{PROJECT}.{warehouse.dataset}.{TABLE}"
    warehouse.client.create_dataset(f"{PROJECT}.{warehouse.dataset}")
    old = bigquery.Table(table_id, schema=old_schema)
    old.time_partitioning = bigquery.TimePartitioning(type_="MONTH", field="pickup_datetime")
    old.clustering_fields = ["pickup_location_id"]
    warehouse.client.create_table(old)
    warehouse.client.load_table_from_uri(p.uri, table_id, job_config=bigquery.LoadJobConfig(
        source_format=bigquery.SourceFormat.PARQUET, schema=old_schema)).result()
    return old_schema


def test_old_timestamp_table_gets_the_migration_statement(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """The hint's CREATE TABLE ... AS SELECT gives back the parquet's wall-clock values.

    (The emulator runs the CREATE TABLE AS SELECT; it keeps no partitioning of it and
    ignores ALTER TABLE RENAME in its table metadata, so those two steps are only
    checked as text.)
    """
    p = stack.processed(rows=600)
    old_version_table(warehouse, p)
    [(stored,)] = query(warehouse, "SELECT MIN(pickup_datetime) FROM {t}")
    assert stored.tzinfo is not None  # the wall clock read as UTC
    with pytest.raises(BigQueryLoadError) as failure:
        load(warehouse, stack.processed(source_generation=2, rows=600))
    message = str(failure.value)
    table = f"`{PROJECT}.{warehouse.dataset}.{TABLE}`"
    new = f"`{PROJECT}.{warehouse.dataset}.{TABLE}_datetime`"
    assert "pickup_datetime, dropoff_datetime as TIMESTAMP" in message
    assert "TAXI_TABLE" in message
    create = (
        f"CREATE TABLE {new} PARTITION BY DATETIME_TRUNC(`pickup_datetime`, MONTH)"
        " CLUSTER BY `source_uri` AS SELECT * REPLACE (DATETIME(`pickup_datetime`, 'UTC')"
        " AS `pickup_datetime`, DATETIME(`dropoff_datetime`, 'UTC') AS `dropoff_datetime`)"
        f" FROM {table};"
    )
    assert create in message
    assert f"DROP TABLE {table};" in message
    assert f"ALTER TABLE {new} RENAME TO `{TABLE}`;" in message
    assert "America/New_York" not in message
    assert warehouse.rows_for(TABLE, YELLOW_URI) == p.rows  # nothing changed

    warehouse.client.query(create.rstrip(";")).result()
    converted = [tuple(r.values()) for r in warehouse.client.query(
        f"SELECT pickup_datetime, dropoff_datetime FROM {new}").result()]
    assert sorted(converted) == wall_clock(p.path)


def test_old_timestamp_table_leaves_a_new_table_loadable(stack: Stack, dataset: str) -> None:
    """The hint's other way: TAXI_TABLE names a new table, which gets DATETIME columns."""
    warehouse = BigQueryWarehouse(stack.client, dataset, LOCATION)
    old_version_table(warehouse, stack.processed(rows=300))
    p = stack.processed(rows=500)
    assert load(warehouse, p, table="trips_v2").status == "loaded"
    table = warehouse.client.get_table(f"{PROJECT}.{dataset}.trips_v2")
    assert {f.name: f.field_type for f in table.schema}["pickup_datetime"] == "DATETIME"
    assert warehouse.rows_for("trips_v2", YELLOW_URI) == p.rows


# -- partition bounds -------------------------------------------------------------------


class SpyClient(bigquery.Client):
    """Records each query's SQL and parameters (name -> (type, value))."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.queries: list[tuple[str, dict[str, tuple[str, Any]]]] = []
        self.configs: list[Any] = []

    def query(self, query: str, job_config: Any = None,  # type: ignore[override]
              **kwargs: Any) -> bigquery.QueryJob:
        params = {p.name: (p.type_, p.value)
                  for p in (job_config.query_parameters if job_config else [])}
        self.queries.append((query, params))
        self.configs.append(job_config)
        return super().query(query, job_config=job_config, **kwargs)

    def merges(self, table: str) -> list[tuple[str, dict[str, tuple[str, Any]]]]:
        return [(sql, params) for sql, params in self.queries
                if sql.startswith(f"MERGE `{PROJECT}.") and f".{table}` AS T" in sql]


@pytest.fixture
def spied(stack: Stack, dataset: str) -> tuple[BigQueryWarehouse, SpyClient]:
    client = bq_client(stack.bq, SpyClient)
    assert isinstance(client, SpyClient)
    return BigQueryWarehouse(client, dataset, LOCATION), client


BOUNDED = ("G.`pickup_datetime` >= @part_lo AND G.`pickup_datetime` < @part_hi",
           "T.`pickup_datetime` >= @part_lo AND T.`pickup_datetime` < @part_hi THEN DELETE")


def test_the_merge_scans_only_the_months_of_the_source(
    spied: tuple[BigQueryWarehouse, SpyClient], stack: Stack
) -> None:
    """Both the newer-generation guard and the DELETE carry month-aligned partition bounds
    covering the staged rows AND the previous generation's rows (another month here).

    The saving is shown on the SQL and its parameters: the emulator answers a dry run
    with total_bytes_processed 0, whatever the statement, so it cannot measure it.
    """
    warehouse, client = spied
    january = stack.processed(source_generation=1, rows=700, month=1)
    february = stack.processed(source_generation=2, rows=900, month=2)
    other = stack.processed(dataset="green", source_uri=GREEN_URI, rows=400, month=3)
    load(warehouse, other)
    load(warehouse, january)
    [(sql, params)] = client.merges(TABLE)[1:]
    assert all(part in sql for part in BOUNDED)
    assert params["part_lo"] == ("DATETIME", datetime(2024, 1, 1))
    assert params["part_hi"] == ("DATETIME", datetime(2024, 2, 1))

    result = load(warehouse, february)
    assert result == LoadResult(TABLE, YELLOW_URI, 2, february.rows, january.rows, "loaded")
    [(sql, params)] = client.merges(TABLE)[2:]
    assert all(part in sql for part in BOUNDED)
    # January (the previous generation's rows) through February (the staged rows)
    assert params["part_lo"] == ("DATETIME", datetime(2024, 1, 1))
    assert params["part_hi"] == ("DATETIME", datetime(2024, 3, 1))
    assert query(warehouse, "SELECT source_generation, COUNT(*) FROM {t}"
                 " WHERE source_uri = @u GROUP BY 1", u=YELLOW_URI) == [(2, february.rows)]
    assert warehouse.rows_for(TABLE, GREEN_URI) == other.rows


def test_the_bounded_merge_sql_and_parameters() -> None:
    """The generated statement itself (no emulator): bounded by months, or not at all."""
    class FakeJob:
        dml_stats = None
        num_dml_affected_rows = 0

        def result(self) -> list[Any]:
            return []

    class FakeClient:
        project = PROJECT

        def __init__(self) -> None:
            self.calls: list[tuple[str, Any]] = []

        def query(self, sql: str, job_config: Any, **kwargs: Any) -> FakeJob:
            self.calls.append((sql, job_config))
            return FakeJob()

    fake = FakeClient()
    warehouse = BigQueryWarehouse(fake, "taxi", LOCATION)  # type: ignore[arg-type]
    warehouse._replace_rows(TABLE, "_staging_x", CANONICAL_SCHEMA, YELLOW_URI, 3, 10,
                            Months(date(2023, 12, 1), date(2024, 1, 1)))
    warehouse._replace_rows(TABLE, "_staging_x", CANONICAL_SCHEMA, YELLOW_URI, 3, 10, None)
    (bounded, config), (unbounded, _) = fake.calls
    assert all(part in bounded for part in BOUNDED)
    params = {p.name: (p.type_, p.value) for p in config.query_parameters}
    assert params == {"source_uri": ("STRING", YELLOW_URI), "source_generation": ("INT64", 3),
                      "part_lo": ("DATETIME", datetime(2023, 12, 1)),
                      "part_hi": ("DATETIME", datetime(2024, 2, 1))}  # across the year end
    assert "@part_lo" not in unbounded and "NOT MATCHED BY SOURCE" in unbounded


def test_a_crashed_load_in_other_months_is_still_replaced(
    warehouse: BigQueryWarehouse, stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows merged by a load that died before its log write lie in months nobody logged in
    `_loads`; the months were recorded before the MERGE, so the next generation's bounded
    MERGE still removes them.

    (This guards exactly-once under the new bounds; the unbounded MERGE of before passed
    it too.)
    """
    january = stack.processed(source_generation=1, rows=700, month=1)
    march = stack.processed(source_generation=2, rows=500, month=3)
    monkeypatch.setattr(warehouse, "_record", crash)
    with pytest.raises(WorkerKilled):
        load(warehouse, january)
    monkeypatch.undo()
    assert load(warehouse, march).status == "loaded"
    assert query(warehouse, "SELECT source_generation, COUNT(*) FROM {t} GROUP BY 1") == [
        (2, march.rows)]
    assert load(warehouse, january).status == "superseded"


def test_a_table_from_before_load_ranges_gets_its_months_from_one_scan(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """Unrecorded rows (a table loaded by the previous version) are found and replaced."""
    january = stack.processed(source_generation=1, rows=700, month=1)
    load(warehouse, january)
    query(warehouse, f"DELETE FROM `{PROJECT}.{warehouse.dataset}.{LOAD_RANGES}` WHERE TRUE")
    fresh = BigQueryWarehouse(warehouse.client, warehouse.dataset, LOCATION)
    march = stack.processed(source_generation=2, rows=500, month=3)
    assert load(fresh, march).status == "loaded"
    assert query(warehouse, "SELECT source_generation, COUNT(*) FROM {t} GROUP BY 1") == [
        (2, march.rows)]
    assert query(warehouse, "SELECT min_partition, max_partition FROM"
                 f" `{PROJECT}.{warehouse.dataset}.{LOAD_RANGES}`") == [
        (date(2024, 1, 1), date(2024, 3, 1))]


def test_a_table_clustered_the_old_way_keeps_loading(
    stack: Stack, dataset: str, caplog: pytest.LogCaptureFixture
) -> None:
    old = BigQueryWarehouse(stack.client, dataset, LOCATION,
                            cluster_fields=("pickup_location_id",))
    load(old, stack.processed(rows=300))
    warehouse = BigQueryWarehouse(stack.client, dataset, LOCATION)
    p = stack.processed(source_generation=2, rows=400)
    with caplog.at_level(logging.INFO, logger="taxi_pipeline.warehouse.bigquery_warehouse"):
        assert load(warehouse, p).status == "loaded"
    assert "clustered on ['pickup_location_id'], not ['source_uri']" in caplog.text
    assert warehouse.rows_for(TABLE, YELLOW_URI) == p.rows


def test_a_replacement_load_advances_loaded_at(
    warehouse: BigQueryWarehouse, stack: Stack
) -> None:
    """`_record`'s UPDATE sets loaded_at (verifies the current behaviour; the DuckDB
    warehouse had kept the first load's time)."""
    load(warehouse, stack.processed(source_generation=1, rows=300))
    [first] = warehouse.loads()
    time.sleep(0.01)
    load(warehouse, stack.processed(source_generation=2, rows=400))
    [second] = warehouse.loads()
    assert second["source_generation"] == 2
    assert isinstance(first["loaded_at"], datetime) and isinstance(second["loaded_at"], datetime)
    assert second["loaded_at"] > first["loaded_at"]


# -- DML conflicts, bytes billed (issue 20, defects 5 and 6) -------------------------------

# The error payloads BigQuery returns, as python-bigquery turns them into exceptions: from
# a job's errorResult (`_error_result_to_exception`) and from an HTTP 400 response body
# (`from_http_response`, the body of jobs.getQueryResults).
SERIALIZE = {"reason": "invalidQuery", "location": "q", "locationType": "parameter",
             "domain": "global",
             "message": "Could not serialize access to table taxi-test:taxi.trips due to "
                        "concurrent update"}
OUTSTANDING = {"reason": "resourcesExceeded", "domain": "global",
               "message": "Resources exceeded during query execution: Too many DML statements "
                          "outstanding against table taxi-test:taxi.trips, limit is 20"}


def from_job(error: dict[str, str]) -> Exception:
    from google.cloud.bigquery.job.base import _error_result_to_exception
    return _error_result_to_exception(error, [error])


def from_http(error: dict[str, str]) -> Exception:
    import json

    import requests
    from google.api_core.exceptions import from_http_response
    response = requests.Response()
    response.status_code = 400
    response._content = json.dumps({"error": {
        "code": 400, "message": error["message"], "errors": [error],
        "status": "INVALID_ARGUMENT"}}).encode()
    response.request = requests.Request(
        "GET", "https://bigquery.googleapis.com/bigquery/v2/projects/p/queries/j").prepare()
    return from_http_response(response)


@pytest.mark.parametrize("make", [from_job, from_http])
def test_dml_conflicts_are_told_apart_from_real_mistakes(make: Any) -> None:
    from taxi_pipeline.warehouse.bigquery_warehouse import is_dml_conflict

    assert is_dml_conflict(make(SERIALIZE))
    assert is_dml_conflict(make(OUTSTANDING))
    syntax = {"reason": "invalidQuery", "message": "Syntax error: Unexpected keyword MERGE"}
    memory = {"reason": "resourcesExceeded",
              "message": "Resources exceeded during query execution: The query could not be "
                         "executed in the allotted memory."}
    assert not is_dml_conflict(make(syntax))
    assert not is_dml_conflict(make(memory))
    assert not is_dml_conflict(ValueError("due to concurrent update"))
    # python-bigquery's own retry leaves both to the caller (the reason of this code):
    from google.cloud.bigquery.retry import _job_should_retry, _should_retry
    for error in (SERIALIZE, OUTSTANDING):
        assert not _should_retry(make(error)) and not _job_should_retry(make(error))


class ScriptedJob:
    def __init__(self, error: Exception | None) -> None:
        self.error = error
        self.dml_stats = None
        self.num_dml_affected_rows = 0

    def result(self) -> list[Any]:
        if self.error is not None:
            raise self.error
        return []


class ScriptedClient:
    """Answers queries with the scripted errors first, then successes; records configs."""

    project = PROJECT

    def __init__(self, *errors: Exception) -> None:
        self.errors = list(errors)
        self.configs: list[Any] = []

    def query(self, sql: str, job_config: Any, **kwargs: Any) -> ScriptedJob:
        self.configs.append(job_config)
        return ScriptedJob(self.errors.pop(0) if self.errors else None)


def test_a_statement_refused_by_concurrent_dml_runs_again_with_backoff_and_jitter() -> None:
    client = ScriptedClient(from_http(SERIALIZE), from_job(OUTSTANDING), from_job(SERIALIZE))
    warehouse = BigQueryWarehouse(client, "taxi", LOCATION)  # type: ignore[arg-type]
    waits: list[float] = []
    warehouse._sleep = waits.append
    warehouse._replace_rows(TABLE, "_staging_x", CANONICAL_SCHEMA, YELLOW_URI, 3, 10, None)
    assert len(client.configs) == 4  # three refusals, then it ran
    assert [0.5 <= w <= 1 for w in waits] == [True, False, False]
    assert 1 <= waits[1] <= 2 and 2 <= waits[2] <= 4  # doubling, jittered


def test_concurrent_dml_past_the_retry_budget_and_other_errors_are_raised() -> None:
    warehouse = BigQueryWarehouse(ScriptedClient(*[from_job(SERIALIZE)] * 50),  # type: ignore[arg-type]
                                  "taxi", LOCATION, dml_retry_seconds=0)
    with pytest.raises(Exception, match="concurrent update"):
        warehouse._replace_rows(TABLE, "_staging_x", CANONICAL_SCHEMA, YELLOW_URI, 3, 10, None)
    syntax = from_job({"reason": "invalidQuery", "message": "Syntax error"})
    client = ScriptedClient(syntax)
    warehouse = BigQueryWarehouse(client, "taxi", LOCATION)  # type: ignore[arg-type]
    warehouse._sleep = lambda seconds: pytest.fail("a real mistake must not be retried")
    with pytest.raises(Exception, match="Syntax error"):
        warehouse._replace_rows(TABLE, "_staging_x", CANONICAL_SCHEMA, YELLOW_URI, 3, 10, None)
    assert len(client.configs) == 1


def test_every_statement_is_capped_in_bytes_billed(
    spied: tuple[BigQueryWarehouse, SpyClient], stack: Stack
) -> None:
    warehouse, client = spied
    load(warehouse, stack.processed(rows=300))
    configs = client.configs
    assert configs and all(c.maximum_bytes_billed == 100 * 2**30 for c in configs)
    capped = BigQueryWarehouse(client, warehouse.dataset, LOCATION, max_bytes_billed=2**30)
    load(capped, stack.processed(source_generation=2, rows=300))
    assert configs[-1].maximum_bytes_billed == 2**30


def test_the_bytes_billed_cap_says_what_to_do() -> None:
    error = {"reason": "bytesBilledLimitExceeded",
             "message": "Query exceeded limit for bytes billed: 10485760. 20971520 or higher "
                        "required."}
    warehouse = BigQueryWarehouse(ScriptedClient(from_job(error)),  # type: ignore[arg-type]
                                  "taxi", LOCATION, max_bytes_billed=10485760)
    with pytest.raises(BigQueryLoadError, match=r"(?s)10485760 bytes.*TAXI_BQ_MAX_BYTES_BILLED"):
        warehouse._replace_rows(TABLE, "_staging_x", CANONICAL_SCHEMA, YELLOW_URI, 3, 10, None)


def empty_processed(stack: Stack, source_generation: int = 1) -> Processed:
    """A processed object with no rows (every row of its source rejected)."""
    from taxi_pipeline.lineage import lineage_metadata
    path = stack.work / f"empty-{uuid.uuid4().hex[:6]}.parquet"
    pq.write_table(CANONICAL_SCHEMA.with_metadata(lineage_metadata(YELLOW_URI, source_generation))
                   .empty_table(), path)
    blob = stack.bucket.blob(f"processed/yellow/{path.name}")
    blob.upload_from_filename(str(path))
    return Processed(path, f"gs://{BUCKET}/{blob.name}", int(blob.generation or 0), YELLOW_URI,
                     source_generation, 0)


def test_an_empty_first_load_runs_no_unbounded_merge(
    spied: tuple[BigQueryWarehouse, SpyClient], stack: Stack
) -> None:
    """Issue 20, defect 6: an empty processed object as a source's first load scanned the
    whole table (a MERGE with no partition filter); now nothing needs merging."""
    warehouse, client = spied
    other = stack.processed(dataset="green", source_uri=GREEN_URI, rows=400)
    load(warehouse, other)
    empty = empty_processed(stack)
    assert load(warehouse, empty).status == "loaded"
    merges = client.merges(TABLE)
    assert len(merges) == 1  # the green load's; none for the empty one
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, 0)
    # Its rows once there are some, then empty again: bounded by the recorded months.
    january = stack.processed(source_generation=2, rows=300)
    load(warehouse, january)
    load(warehouse, empty_processed(stack, source_generation=3))
    for sql, _ in client.merges(TABLE)[1:]:
        assert all(part in sql for part in BOUNDED)
    assert warehouse.rows_for(TABLE, YELLOW_URI) == 0
    assert warehouse.rows_for(TABLE, GREEN_URI) == other.rows


# -- every dataset's table, and zones (issue 17) -------------------------------------------


@pytest.mark.parametrize("name", ["fhv", "fhvhv"])
def test_for_hire_tables_have_their_schema_and_replace_by_generation(
        warehouse: BigQueryWarehouse, stack: Stack, name: str) -> None:
    spec = SPECS[name]
    table = spec.table
    uri = f"gs://{BUCKET}/raw/{name}/2024/{name}_tripdata_2024-01.csv.gz"
    first = stack.processed(dataset=name, source_uri=uri, rows=1_200, seed=1)
    assert load(warehouse, first, table=table, schema=spec.schema).rows == first.rows
    created = warehouse.client.get_table(f"{PROJECT}.{warehouse.dataset}.{table}")
    assert [f.name for f in created.schema] == spec.schema.names
    types = {f.name: f.field_type for f in created.schema}
    assert types["pickup_datetime"] == types["dropoff_datetime"] == "DATETIME"
    assert created.time_partitioning is not None
    assert (created.time_partitioning.type_, created.time_partitioning.field) == (
        "MONTH", "pickup_datetime")
    assert created.clustering_fields == ["source_uri"]
    # the user uploads the month again (a new generation, other rows): replaced, not added
    second = stack.processed(dataset=name, source_uri=uri, source_generation=2, rows=900,
                             seed=2)
    result = load(warehouse, second, table=table, schema=spec.schema)
    assert (result.status, result.rows, result.replaced_rows) == (
        "loaded", second.rows, first.rows)
    [(n,)] = query(warehouse, f"SELECT COUNT(*) FROM `{PROJECT}.{warehouse.dataset}.{table}`")
    assert n == second.rows
    assert load(warehouse, second, table=table, schema=spec.schema).status == "already_loaded"


def test_zones_and_every_table_are_made_by_the_deploy_step(
        warehouse: BigQueryWarehouse, stack: Stack) -> None:
    warehouse.ensure_tables({table_for(n): spec.schema for n, spec in SPECS.items()})
    assert {"trips", "fhv_trips", "fhvhv_trips"} <= tables(warehouse)
    assert warehouse.load_zones(zone_table(), "zones") == 265
    assert warehouse.load_zones(zone_table(), "zones") == 265  # replaced, not appended
    p = stack.processed()
    load(warehouse, p)
    rows = query(warehouse, "SELECT z.borough, COUNT(*) FROM {t} t JOIN "
                 f"`{PROJECT}.{warehouse.dataset}.zones` z "
                 "ON t.pickup_location_id = z.location_id GROUP BY 1")
    assert sum(n for _, n in rows) == p.rows
    assert {"Manhattan", "Queens"} <= {b for b, _ in rows}
