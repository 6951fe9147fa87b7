"""Idempotent per-object loads into the local profile's DuckDB warehouse."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow.parquet as pq
import pytest

from taxi_pipeline.datasets.schema import CANONICAL_SCHEMA
from taxi_pipeline.sources.sample_data import generate_month, write_month
from taxi_pipeline.transform.streaming import transform_parquet
from taxi_pipeline.warehouse.duckdb_warehouse import LOAD_LOG, DuckDBWarehouse

TABLE = "trips"
YELLOW_URI = "file:///bucket/raw/yellow/2024/yellow_tripdata_2024-01.parquet"
GREEN_URI = "file:///bucket/raw/green/2024/green_tripdata_2024-01.parquet"


@dataclass(frozen=True)
class Processed:
    path: Path
    uri: str
    generation: int  # the processed object's own generation
    source_uri: str
    source_generation: int
    rows: int


def make_processed(
    tmp_path: Path,
    *,
    dataset: str = "yellow",
    source_uri: str = YELLOW_URI,
    source_generation: int = 1,
    rows: int = 1_500,
    seed: int = 0,
    tag: str = "",
) -> Processed:
    """Transform a synthetic raw month into a processed parquet file, as the flow does."""
    sample = generate_month(dataset, 2024, 1, rows, seed=seed)  # type: ignore[arg-type]
    name = f"{dataset}-{source_generation}-{seed}{tag}"
    raw = write_month(sample, tmp_path / "raw" / f"{name}.parquet")
    out = tmp_path / "processed" / f"{name}.parquet"
    out.parent.mkdir(parents=True, exist_ok=True)
    stats = transform_parquet(
        raw,
        out,
        tmp_path / "processed" / f"{name}.rejects.parquet",
        source_uri=source_uri,
        source_generation=source_generation,
        taxi_type=dataset,
        month=(2024, 1),
        ingested_at=datetime(2025, 1, 1, tzinfo=UTC),
    )
    assert stats.rows_out == pq.ParquetFile(out).metadata.num_rows
    return Processed(out, out.as_uri(), 1_000 + source_generation * 10 + seed, source_uri,
                     source_generation, stats.rows_out)


def load(warehouse: DuckDBWarehouse, p: Processed, *, object_uri: str | None = None):
    return warehouse.load_object(
        object_uri=object_uri or p.uri,
        object_generation=p.generation,
        table=TABLE,
        schema=CANONICAL_SCHEMA,
        source_uri=p.source_uri,
        source_generation=p.source_generation,
    )


def query(warehouse: DuckDBWarehouse, sql: str, params: list | None = None) -> list[tuple]:
    with duckdb.connect(str(warehouse.path), read_only=True) as con:
        return con.execute(sql, params or []).fetchall()


@pytest.fixture
def warehouse(tmp_path: Path) -> DuckDBWarehouse:
    return DuckDBWarehouse(tmp_path / "wh" / "warehouse.duckdb", lock_timeout=5.0)


def test_nothing_loaded_yet(warehouse: DuckDBWarehouse) -> None:
    assert warehouse.loaded(TABLE, YELLOW_URI) is None
    assert warehouse.rows_for(TABLE, YELLOW_URI) is None
    assert warehouse.loads() == []


def test_first_load(warehouse: DuckDBWarehouse, tmp_path: Path) -> None:
    p = make_processed(tmp_path)
    result = load(warehouse, p)
    assert result.status == "loaded"
    assert result.rows == p.rows > 0
    assert result.replaced_rows == 0
    assert result.table == TABLE
    assert result.source_uri == YELLOW_URI
    assert warehouse.rows_for(TABLE, YELLOW_URI) == p.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, p.rows)
    # the rows are the processed file's rows, column for column
    expected = pq.read_table(p.path)
    [(total, passengers, pickups)] = query(
        warehouse,
        f"SELECT sum(total_amount), sum(passenger_count), count(DISTINCT pickup_datetime)"
        f" FROM {TABLE}",
    )
    assert total == pytest.approx(sum(v for v in expected.column("total_amount").to_pylist()))
    assert passengers == sum(v or 0 for v in expected.column("passenger_count").to_pylist())
    assert pickups == len(set(expected.column("pickup_datetime").to_pylist()))
    [log] = warehouse.loads()
    assert log["object_uri"] == p.uri
    assert log["object_generation"] == p.generation
    assert log["rows"] == p.rows


def test_same_object_generation_again_is_already_loaded(
    warehouse: DuckDBWarehouse, tmp_path: Path
) -> None:
    p = make_processed(tmp_path)
    load(warehouse, p)
    for _ in range(3):  # redelivered notifications, retried load runs
        again = load(warehouse, p)
        assert again.status == "already_loaded"
        assert again.rows == p.rows  # what the table holds for it, not 0
    assert warehouse.rows_for(TABLE, YELLOW_URI) == p.rows
    assert query(warehouse, f"SELECT count(*) FROM {TABLE}") == [(p.rows,)]
    assert len(warehouse.loads()) == 1


def test_newer_source_generation_replaces_rows(
    warehouse: DuckDBWarehouse, tmp_path: Path
) -> None:
    old = make_processed(tmp_path, source_generation=1, rows=1_500)
    new = make_processed(tmp_path, source_generation=2, rows=2_500)
    assert new.rows != old.rows
    load(warehouse, old)
    result = load(warehouse, new)
    assert result.status == "loaded"
    assert result.rows == new.rows
    assert result.replaced_rows == old.rows
    assert warehouse.rows_for(TABLE, YELLOW_URI) == new.rows  # replaced, not doubled
    assert warehouse.loaded(TABLE, YELLOW_URI) == (2, new.rows)
    assert query(warehouse, f"SELECT DISTINCT source_generation FROM {TABLE}") == [(2,)]


def test_retransform_of_the_same_source_generation_replaces_rows(
    warehouse: DuckDBWarehouse, tmp_path: Path
) -> None:
    """A new processed object of the same raw generation (a re-emit) is loaded again."""
    first = make_processed(tmp_path, source_generation=5, rows=1_000)
    second = make_processed(tmp_path, source_generation=5, rows=1_000, seed=1)
    load(warehouse, first)
    result = load(warehouse, second)
    assert result.status == "loaded"
    assert warehouse.rows_for(TABLE, YELLOW_URI) == second.rows


def test_older_source_generation_is_superseded(
    warehouse: DuckDBWarehouse, tmp_path: Path
) -> None:
    old = make_processed(tmp_path, source_generation=1, rows=1_500)
    new = make_processed(tmp_path, source_generation=2, rows=2_500)
    load(warehouse, new)
    result = load(warehouse, old)  # a late delivery of the older generation
    assert result.status == "superseded"
    assert result.rows == 0
    assert warehouse.rows_for(TABLE, YELLOW_URI) == new.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (2, new.rows)
    assert query(warehouse, f"SELECT DISTINCT source_generation FROM {TABLE}") == [(2,)]


def test_two_sources_coexist(warehouse: DuckDBWarehouse, tmp_path: Path) -> None:
    yellow = make_processed(tmp_path, rows=1_500)
    green = make_processed(tmp_path, dataset="green", source_uri=GREEN_URI, rows=1_200)
    load(warehouse, yellow)
    load(warehouse, green)
    assert warehouse.rows_for(TABLE, YELLOW_URI) == yellow.rows
    assert warehouse.rows_for(TABLE, GREEN_URI) == green.rows
    assert sorted(query(warehouse, f"SELECT taxi_type, count(*) FROM {TABLE} GROUP BY 1")) == [
        ("green", green.rows), ("yellow", yellow.rows)]
    # replacing one source leaves the other alone
    newer_green = make_processed(tmp_path, dataset="green", source_uri=GREEN_URI,
                                 source_generation=2, rows=800)
    load(warehouse, newer_green)
    assert warehouse.rows_for(TABLE, YELLOW_URI) == yellow.rows
    assert warehouse.rows_for(TABLE, GREEN_URI) == newer_green.rows
    assert len(warehouse.loads()) == 2


def test_failed_load_keeps_previous_rows(warehouse: DuckDBWarehouse, tmp_path: Path) -> None:
    good = make_processed(tmp_path, source_generation=1)
    load(warehouse, good)
    broken = tmp_path / "processed" / "broken.parquet"
    broken.write_text("VendorID,total_amount\n1,2.5\n")
    newer = make_processed(tmp_path, source_generation=2, rows=3_000)
    with pytest.raises(duckdb.Error):
        load(warehouse, newer, object_uri=broken.as_uri())
    # the delete of the old rows was rolled back with the failed insert
    assert warehouse.rows_for(TABLE, YELLOW_URI) == good.rows
    assert warehouse.loaded(TABLE, YELLOW_URI) == (1, good.rows)
    assert query(warehouse, f"SELECT count(*), min(source_generation) FROM {TABLE}") == [
        (good.rows, 1)]
    # and the warehouse is usable afterwards: the real newer file loads
    assert load(warehouse, newer).status == "loaded"
    assert warehouse.rows_for(TABLE, YELLOW_URI) == newer.rows


def test_missing_object_file_fails_without_damage(
    warehouse: DuckDBWarehouse, tmp_path: Path
) -> None:
    good = make_processed(tmp_path, source_generation=1)
    load(warehouse, good)
    newer = make_processed(tmp_path, source_generation=2)
    with pytest.raises(duckdb.Error):
        load(warehouse, newer, object_uri=(tmp_path / "gone.parquet").as_uri())
    assert warehouse.rows_for(TABLE, YELLOW_URI) == good.rows


def test_non_file_uri_is_refused(warehouse: DuckDBWarehouse, tmp_path: Path) -> None:
    p = make_processed(tmp_path)
    with pytest.raises(ValueError, match="file://"):
        load(warehouse, p, object_uri="gs://bucket/processed/x.parquet")
    assert warehouse.rows_for(TABLE, YELLOW_URI) is None


def test_table_schema_matches_canonical(warehouse: DuckDBWarehouse, tmp_path: Path) -> None:
    load(warehouse, make_processed(tmp_path))
    columns = query(
        warehouse,
        "SELECT column_name, data_type, is_nullable FROM information_schema.columns"
        " WHERE table_name = ? ORDER BY ordinal_position",
        [TABLE],
    )
    assert [c[0] for c in columns] == CANONICAL_SCHEMA.names
    types = {c[0]: c[1] for c in columns}
    assert types["pickup_datetime"] == "TIMESTAMP"
    assert types["ingested_at"] == "TIMESTAMP WITH TIME ZONE"
    assert types["passenger_count"] == "INTEGER"
    assert {c[0] for c in columns if c[2] == "NO"} == {
        "taxi_type", "source_uri", "source_generation", "ingested_at"}
    assert query(warehouse, f"SELECT count(*) FROM {LOAD_LOG}") == [(1,)]


def test_loaded_and_rows_for_of_an_unknown_source(
    warehouse: DuckDBWarehouse, tmp_path: Path
) -> None:
    load(warehouse, make_processed(tmp_path))
    assert warehouse.loaded(TABLE, GREEN_URI) is None
    assert warehouse.rows_for(TABLE, GREEN_URI) == 0
    assert warehouse.rows_for("other_table", YELLOW_URI) is None
    assert warehouse.loaded("other_table", YELLOW_URI) is None
    assert warehouse.table_uri(TABLE) == f"duckdb://{warehouse.path}#trips"


def test_a_replacement_load_advances_loaded_at(
    warehouse: DuckDBWarehouse, tmp_path: Path
) -> None:
    """`INSERT OR REPLACE` keeps unnamed columns of the replaced row, so it must name loaded_at."""
    load(warehouse, make_processed(tmp_path, source_generation=1, rows=500))
    [first] = warehouse.loads()
    time.sleep(0.01)
    load(warehouse, make_processed(tmp_path, source_generation=2, rows=600))
    [second] = warehouse.loads()
    assert second["source_generation"] == 2
    assert isinstance(first["loaded_at"], datetime) and isinstance(second["loaded_at"], datetime)
    assert second["loaded_at"] > first["loaded_at"]
