"""Unit tests of the streaming transform (taxi_pipeline/transform/) and the quality rules."""

from __future__ import annotations

import logging
import math
import shutil
import time
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

import flows.transform as transform_flow
import taxi_pipeline.transform.streaming as transform_core
from flows.common import RunContext
from flows.transform import current_generation, output_of, transform_object
from taxi_pipeline import events
from taxi_pipeline.datasets import quality
from taxi_pipeline.datasets.quality import RULES, month_bounds, reject_reasons
from taxi_pipeline.datasets.schema import CANONICAL_SCHEMA, REJECTS_SCHEMA
from taxi_pipeline.lineage import METADATA_SOURCE_GENERATION, METADATA_SOURCE_URI
from taxi_pipeline.objects import ObjectRef, sibling_name
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.storage.local import LocalStore
from taxi_pipeline.transform.streaming import BadInputFile, TransformStats, transform_parquet

INGESTED_AT = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)
SOURCE_URI = "file:///bucket/raw/yellow/2024/yellow_tripdata_2024-01.parquet"


@dataclass
class Result:
    stats: TransformStats
    processed: pa.Table
    rejects: pa.Table
    processed_path: Path
    rejects_path: Path


def run(
    source: Any,
    out_dir: Path,
    *,
    taxi_type: str = "yellow",
    month: tuple[int, int] | None = (2024, 1),
    source_uri: str = SOURCE_URI,
    source_generation: int = 1,
    batch_rows: int = 131_072,
    ingested_at: datetime | None = INGESTED_AT,
    tag: str = "out",
) -> Result:
    out_dir.mkdir(parents=True, exist_ok=True)
    processed_path = out_dir / f"{tag}.processed.parquet"
    rejects_path = out_dir / f"{tag}.rejects.parquet"
    stats = transform_parquet(
        source,
        processed_path,
        rejects_path,
        source_uri=source_uri,
        source_generation=source_generation,
        taxi_type=taxi_type,
        month=month,
        batch_rows=batch_rows,
        ingested_at=ingested_at,
    )
    return Result(
        stats,
        pq.read_table(processed_path),
        pq.read_table(rejects_path),
        processed_path,
        rejects_path,
    )


def both(result: Result) -> pa.Table:
    """Processed and rejected rows together, in the canonical schema."""
    return pa.concat_tables([result.processed,
                             result.rejects.drop_columns(["reject_reason", "reject_detail"])])


def sorted_values(column: pa.ChunkedArray | pa.Array) -> list[Any]:
    """A column as a sortable multiset (nulls first)."""
    values = column.to_pylist()
    return sorted(values, key=lambda v: (v is not None, v if v is not None else 0))


def assert_common_invariants(result: Result, source_rows: int) -> None:
    stats = result.stats
    assert stats.rows_in == source_rows
    assert stats.rows_out + stats.rows_rejected == stats.rows_in
    assert result.processed.num_rows == stats.rows_out
    assert result.rejects.num_rows == stats.rows_rejected
    assert result.processed.schema.remove_metadata().equals(CANONICAL_SCHEMA.remove_metadata())
    assert result.rejects.schema.remove_metadata().equals(REJECTS_SCHEMA.remove_metadata())
    reasons = result.rejects.column("reject_reason")
    assert reasons.null_count == 0
    assert Counter(reasons.to_pylist()) == stats.rejected
    assert set(stats.rejected) <= set(RULES)
    # a detail exactly where the reason is an unparseable value
    detailed = pc.is_valid(result.rejects.column("reject_detail"))
    unparseable = pc.equal(reasons, quality.UNPARSEABLE_VALUE)
    assert detailed.to_pylist() == unparseable.to_pylist()


def assert_lineage(result: Result, *, taxi_type: str, source_uri: str, generation: int) -> None:
    for table in (result.processed, result.rejects):
        if table.num_rows == 0:
            continue
        assert set(table.column("taxi_type").to_pylist()) == {taxi_type}
        assert set(table.column("source_uri").to_pylist()) == {source_uri}
        assert set(table.column("source_generation").to_pylist()) == {generation}
        assert set(table.column("ingested_at").to_pylist()) == {INGESTED_AT}
    metadata = pq.read_schema(result.processed_path).metadata
    assert metadata[METADATA_SOURCE_URI] == source_uri.encode()
    assert metadata[METADATA_SOURCE_GENERATION] == str(generation).encode()


# -- (a) real TLC files ---------------------------------------------------------------


def test_real_green_month(tlc_data_dir: Path, tmp_path: Path) -> None:
    path = tlc_data_dir / "green_tripdata_2024-01.parquet"
    source = pq.read_table(path)
    uri = "file:///bucket/raw/green/2024/green_tripdata_2024-01.parquet"
    result = run(path, tmp_path, taxi_type="green", month=(2024, 1), source_uri=uri,
                 source_generation=42)

    assert_common_invariants(result, 56_551)
    assert_lineage(result, taxi_type="green", source_uri=uri, generation=42)
    # the month carries real dirt: zero passengers, negative totals, a December pickup
    assert result.stats.rejected["impossible_passenger_count"] > 0
    assert result.stats.rejected["negative_total"] > 0
    assert result.stats.rejected["pickup_outside_month"] > 0
    # and odometer errors (up to 201,421 miles) and a negative fare on a positive total
    assert result.stats.rejected["implausible_distance"] == pc.sum(
        pc.greater(source.column("trip_distance"), 500)).as_py() == 46
    assert result.stats.rejected["negative_component"] == 1
    assert result.stats.codes_nulled == Counter({"ratecode_id": 3})  # RatecodeID 99
    out = both(result)
    # nothing is lost or altered on the way: every value comes out once
    assert sorted_values(out.column("pickup_datetime")) == sorted_values(
        source.column("lpep_pickup_datetime"))
    assert sorted_values(out.column("dropoff_datetime")) == sorted_values(
        source.column("lpep_dropoff_datetime"))
    assert sorted_values(out.column("total_amount")) == sorted_values(
        source.column("total_amount"))
    assert pc.sum(out.column("total_amount")).as_py() == pytest.approx(
        pc.sum(source.column("total_amount")).as_py(), rel=1e-12)
    # double codes become int32 with the same values, nulls stay null
    assert sorted_values(out.column("passenger_count")) == sorted_values(
        pc.cast(source.column("passenger_count"), pa.int32()))
    assert out.column("trip_type").null_count == source.column("trip_type").null_count == 3_418
    assert sorted_values(out.column("pickup_location_id")) == sorted_values(
        source.column("PULocationID"))
    # green has no airport fee and no CBD fee; ehail_fee is all null in the source
    assert out.column("airport_fee").null_count == out.num_rows
    assert out.column("cbd_congestion_fee").null_count == out.num_rows
    assert out.column("ehail_fee").null_count == out.num_rows
    # good rows really are good: all pickups inside January 2024
    start, end = month_bounds(2024, 1)
    pickups = result.processed.column("pickup_datetime")
    assert pc.min(pickups).as_py() >= start
    assert pc.max(pickups).as_py() < end
    assert pc.min(result.processed.column("passenger_count")).as_py() >= 1


def test_real_yellow_2025_sample(tlc_data_dir: Path, tmp_path: Path) -> None:
    path = tlc_data_dir / "yellow_tripdata_sample.parquet"
    source = pq.read_table(path)
    uri = "file:///bucket/raw/yellow/2025/yellow_tripdata_2025-02.parquet"
    result = run(path, tmp_path, taxi_type="yellow", month=(2025, 2), source_uri=uri,
                 source_generation=7)

    assert_common_invariants(result, 5_000)
    assert_lineage(result, taxi_type="yellow", source_uri=uri, generation=7)
    out = both(result)
    # `Airport_fee` (capital A in the file) lands in `airport_fee`
    assert source.column("Airport_fee").null_count == 1_125
    assert out.column("airport_fee").null_count == 1_125
    assert sorted_values(out.column("airport_fee")) == sorted_values(source.column("Airport_fee"))
    assert pc.sum(out.column("airport_fee")).as_py() > 0
    # the 2025 CBD congestion fee is carried over, value for value
    assert out.column("cbd_congestion_fee").null_count == 0
    assert sorted_values(out.column("cbd_congestion_fee")) == sorted_values(
        source.column("cbd_congestion_fee"))
    assert pc.sum(out.column("cbd_congestion_fee")).as_py() > 0
    assert sorted_values(out.column("total_amount")) == sorted_values(
        source.column("total_amount"))
    assert sorted_values(out.column("pickup_datetime")) == sorted_values(
        source.column("tpep_pickup_datetime"))
    assert sorted_values(out.column("payment_type")) == sorted_values(
        pc.cast(source.column("payment_type"), pa.int32()))
    # yellow has no trip_type column
    assert out.column("trip_type").null_count == out.num_rows
    # TLC's payment_type 0 rows have null passenger_count and are kept, not
    # rejected for it; 182 of them break a newer rule: a negative fare_amount on
    # a positive total (181), a 73,364-mile trip (1)
    assert result.stats.rejected == Counter({"negative_component": 181, "negative_total": 92,
                                             "impossible_passenger_count": 24,
                                             "implausible_distance": 1})
    rejected_unrecorded = pc.sum(pc.and_(
        pc.is_null(result.rejects.column("passenger_count")),
        pc.is_in(result.rejects.column("reject_reason"),
                 pa.array(["negative_component", "implausible_distance"])))).as_py()
    assert rejected_unrecorded == 182
    assert result.processed.column("passenger_count").null_count == 1_125 - 182
    # RatecodeID 99 is TLC's "unknown": null in the output, row kept
    assert result.stats.codes_nulled == Counter({"ratecode_id": 58})
    assert pc.sum(pc.equal(out.column("ratecode_id"), 99)).as_py() == 0
    assert out.column("ratecode_id").null_count == source.column("RatecodeID").null_count + 58


def test_real_file_read_from_an_open_handle(tlc_data_dir: Path, tmp_path: Path) -> None:
    """The flow passes the store's open reader, not a path."""
    path = tlc_data_dir / "yellow_tripdata_sample.parquet"
    from_path = run(path, tmp_path, month=(2025, 2), tag="path")
    with path.open("rb") as handle:
        from_handle = run(handle, tmp_path, month=(2025, 2), tag="handle")
    assert from_handle.stats == from_path.stats
    assert from_handle.processed.equals(from_path.processed)


def _csv_to_parquet(csv_path: Path, out: Path) -> tuple[pa.Table, Path]:
    table = pcsv.read_csv(csv_path)
    pq.write_table(table, out)
    return table, out


def test_real_csv_snake_case_header(tlc_data_dir: Path, tmp_path: Path) -> None:
    """Great Expectations' snake_case copy: vendor_id, pickup_location_id, rate_code_id..."""
    source, path = _csv_to_parquet(tlc_data_dir / "yellow_tripdata_sample_2019-01.csv",
                                   tmp_path / "yellow_tripdata_2019-01.parquet")
    assert "pickup_location_id" in source.column_names
    assert "tpep_pickup_datetime" not in source.column_names
    result = run(path, tmp_path, month=(2019, 1))

    assert_common_invariants(result, 10_000)
    out = both(result)
    pairs = {
        "vendor_id": "vendor_id",
        "pickup_datetime": "pickup_datetime",
        "dropoff_datetime": "dropoff_datetime",
        "ratecode_id": "rate_code_id",
        "pickup_location_id": "pickup_location_id",
        "dropoff_location_id": "dropoff_location_id",
        "total_amount": "total_amount",
    }
    for canonical, original in pairs.items():
        expected = pc.cast(source.column(original), CANONICAL_SCHEMA.field(canonical).type)
        if canonical == "ratecode_id":  # TLC's 99 ("unknown") becomes null: one in the sample
            assert pc.sum(pc.equal(expected, 99)).as_py() == 1
            expected = pc.if_else(pc.equal(expected, 99), None, expected)
        assert out.column(canonical).null_count == expected.null_count, canonical
        assert sorted_values(out.column(canonical)) == sorted_values(expected), canonical
    # congestion_surcharge began in Feb 2019: empty in 6,327 rows of this sample
    assert out.column("congestion_surcharge").null_count == 6_327


def test_real_csv_original_header(tlc_data_dir: Path, tmp_path: Path) -> None:
    source, path = _csv_to_parquet(tlc_data_dir / "yellow_head.csv",
                                   tmp_path / "yellow_tripdata_2021-01.parquet")
    result = run(path, tmp_path, month=(2021, 1))

    assert_common_invariants(result, 99)
    out = both(result)
    assert out.column("pickup_location_id").null_count == 0
    assert out.column("ratecode_id").null_count == 0
    # second-resolution CSV times come out as the same instants in microseconds
    assert sorted_values(out.column("pickup_datetime")) == sorted_values(
        source.column("tpep_pickup_datetime"))
    assert sorted_values(out.column("trip_distance")) == sorted_values(
        source.column("trip_distance"))
    # the first rows of the raw 2021-01 file include zero-passenger trips
    zero = pc.sum(pc.equal(source.column("passenger_count"), 0)).as_py()
    assert zero > 0
    assert result.stats.rejected["impossible_passenger_count"] == zero


# -- (b) synthetic months of every era ------------------------------------------------

ERAS = ("2019", "2022", "2023", "2024", "2025")


@pytest.mark.parametrize("dataset", ["yellow", "green"])
@pytest.mark.parametrize("era", ERAS)
def test_synthetic_month_every_era(era: str, dataset: str, tmp_path: Path) -> None:
    year = int(era)
    month = 12 if dataset == "green" else 2  # December exercises the year wrap
    sample = generate_month(dataset, year, month, 4_000, era=era, seed=11)  # type: ignore[arg-type]
    path = write_month(sample, tmp_path / f"{dataset}_tripdata_{year}-{month:02d}.parquet",
                       row_group_rows=1_500)
    result = run(path, tmp_path, taxi_type=dataset, month=(year, month), batch_rows=1_024)

    assert_common_invariants(result, 4_000)
    assert result.stats.rejected == sample.expected_rejects
    assert result.stats.rows_out == sample.expected_good
    assert all(count > 0 for count in sample.expected_rejects.values())
    names = {n.lower() for n in sample.table.column_names}
    processed = result.processed
    if "airport_fee" in names:
        assert processed.column("airport_fee").null_count == 0
    else:
        assert processed.column("airport_fee").null_count == processed.num_rows
    if era == "2025":
        assert processed.column("cbd_congestion_fee").null_count == 0
    else:
        assert processed.column("cbd_congestion_fee").null_count == processed.num_rows
    # the 1 % "payment_type 0" rows keep their null passenger_count
    assert processed.column("passenger_count").null_count == int(4_000 * 0.01)


# -- (c) quality rules, one by one ----------------------------------------------------

GOOD_ROW: dict[str, Any] = {
    "taxi_type": "yellow",
    "vendor_id": 2,
    "pickup_datetime": datetime(2024, 1, 15, 10, 0),
    "dropoff_datetime": datetime(2024, 1, 15, 10, 20),
    "passenger_count": 1,
    "trip_distance": 2.5,
    "pickup_location_id": 132,
    "dropoff_location_id": 236,
    "total_amount": 25.0,
    "source_uri": SOURCE_URI,
    "source_generation": 1,
    "ingested_at": INGESTED_AT,
}


def canonical_batch(*rows: dict[str, Any]) -> pa.RecordBatch:
    full = [{f.name: {**GOOD_ROW, **row}.get(f.name) for f in CANONICAL_SCHEMA} for row in rows]
    return pa.RecordBatch.from_pylist(full, schema=CANONICAL_SCHEMA)


def reasons_of(*rows: dict[str, Any], month: tuple[int, int] | None = (2024, 1)) -> list[Any]:
    """Row `{"_unparseable": True}` stands for a source value that could not be parsed."""
    unparseable = pa.array([bool(row.get("_unparseable")) for row in rows])
    return reject_reasons(canonical_batch(*rows), month, unparseable).to_pylist()


def test_good_row_passes() -> None:
    assert reasons_of({}) == [None]


def test_rules_are_in_documented_order() -> None:
    assert RULES == (
        "unparseable_value",
        "missing_timestamp",
        "pickup_outside_month",
        "dropoff_before_pickup",
        "implausible_duration",
        "negative_distance",
        "implausible_distance",
        "negative_total",
        "negative_component",
        "unknown_location",
        "impossible_passenger_count",
    )


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"pickup_datetime": None}, quality.MISSING_TIMESTAMP),
        ({"dropoff_datetime": None}, quality.MISSING_TIMESTAMP),
        ({"pickup_datetime": None, "dropoff_datetime": None}, quality.MISSING_TIMESTAMP),
        ({"pickup_datetime": datetime(2023, 12, 31, 23, 59, 59),
          "dropoff_datetime": datetime(2024, 1, 1, 0, 10)}, quality.PICKUP_OUTSIDE_MONTH),
        ({"pickup_datetime": datetime(2024, 2, 1, 0, 0),
          "dropoff_datetime": datetime(2024, 2, 1, 0, 10)}, quality.PICKUP_OUTSIDE_MONTH),
        ({"pickup_datetime": datetime(2009, 1, 1, 0, 0),
          "dropoff_datetime": datetime(2009, 1, 1, 0, 10)}, quality.PICKUP_OUTSIDE_MONTH),
        ({"dropoff_datetime": datetime(2024, 1, 15, 9, 59, 59)}, quality.DROPOFF_BEFORE_PICKUP),
        ({"trip_distance": -0.01}, quality.NEGATIVE_DISTANCE),
        ({"total_amount": -0.5}, quality.NEGATIVE_TOTAL),
        ({"pickup_location_id": 0}, quality.UNKNOWN_LOCATION),
        ({"pickup_location_id": 266}, quality.UNKNOWN_LOCATION),
        ({"dropoff_location_id": 0}, quality.UNKNOWN_LOCATION),
        ({"dropoff_location_id": 300}, quality.UNKNOWN_LOCATION),
        ({"passenger_count": 0}, quality.IMPOSSIBLE_PASSENGER_COUNT),
        ({"passenger_count": 10}, quality.IMPOSSIBLE_PASSENGER_COUNT),
        ({"passenger_count": -1}, quality.IMPOSSIBLE_PASSENGER_COUNT),
        ({"_unparseable": True}, quality.UNPARSEABLE_VALUE),
        # the unparseable cell is null now: it is not "missing"
        ({"_unparseable": True, "pickup_datetime": None}, quality.UNPARSEABLE_VALUE),
        ({"dropoff_datetime": datetime(2024, 1, 16, 10, 0, 1)}, quality.IMPLAUSIBLE_DURATION),
        ({"dropoff_datetime": datetime(2024, 3, 1)}, quality.IMPLAUSIBLE_DURATION),
        ({"trip_distance": 500.01}, quality.IMPLAUSIBLE_DISTANCE),
        ({"trip_distance": 120_098.0}, quality.IMPLAUSIBLE_DISTANCE),
        *[({name: -0.5}, quality.NEGATIVE_COMPONENT) for name in quality.FARE_COMPONENTS],
    ],
)
def test_each_rule_rejects_with_its_reason(row: dict[str, Any], reason: str) -> None:
    # a good row in the same batch stays good: rules are row by row
    assert reasons_of(row, {}) == [reason, None]


@pytest.mark.parametrize(
    "row",
    [
        {"pickup_datetime": datetime(2024, 1, 1, 0, 0),
         "dropoff_datetime": datetime(2024, 1, 1, 0, 5)},  # first instant of the month
        {"pickup_datetime": datetime(2024, 1, 31, 23, 59, 59, 999_999),
         "dropoff_datetime": datetime(2024, 2, 1, 0, 30)},  # dropoff may be next month
        {"dropoff_datetime": GOOD_ROW["pickup_datetime"]},  # zero-length trip
        {"trip_distance": 0.0},
        {"total_amount": 0.0},
        {"pickup_location_id": 1, "dropoff_location_id": 265},  # 264/265 are real zones
        {"pickup_location_id": 264, "dropoff_location_id": 1},
        {"passenger_count": 1},
        {"passenger_count": 9},
        {"passenger_count": None},  # not recorded (payment_type 0), not impossible
        {"trip_distance": None, "total_amount": None},
        {"dropoff_datetime": datetime(2024, 1, 16, 10, 0)},  # exactly 24 h
        {"trip_distance": 500.0},
        # zero distance with a fare: flat rates and time-only trips are real (kept)
        {"trip_distance": 0.0, "fare_amount": 70.0},
        # a negative part with a zero or negative total is a void/refund, not this rule
        {"fare_amount": -3.0, "total_amount": 0.0},
        {"tip_amount": -1.0, "total_amount": None},
        {"ratecode_id": 99},  # TLC's "unknown" rate: nulled by the transform, not a rule
    ],
)
def test_boundary_values_are_kept(row: dict[str, Any]) -> None:
    assert reasons_of(row) == [None]


def test_december_month_bounds_wrap_the_year() -> None:
    assert month_bounds(2024, 12) == (datetime(2024, 12, 1), datetime(2025, 1, 1))
    assert month_bounds(2024, 11) == (datetime(2024, 11, 1), datetime(2024, 12, 1))
    rows = [
        {"pickup_datetime": datetime(2024, 12, 31, 23, 0),
         "dropoff_datetime": datetime(2025, 1, 1, 0, 5)},
        {"pickup_datetime": datetime(2025, 1, 1, 0, 0),
         "dropoff_datetime": datetime(2025, 1, 1, 0, 5)},
    ]
    assert reasons_of(*rows, month=(2024, 12)) == [None, quality.PICKUP_OUTSIDE_MONTH]


def test_without_month_the_month_rule_is_skipped() -> None:
    row = {"pickup_datetime": datetime(2009, 1, 1, 0, 0),
           "dropoff_datetime": datetime(2009, 1, 1, 0, 10)}
    assert reasons_of(row, month=None) == [None]
    assert reasons_of(row, {"total_amount": -1.0}, month=None) == [None, quality.NEGATIVE_TOTAL]


# A row that breaks RULES[i:] (and not RULES[:i]) must be rejected for RULES[i].
_BREAKS: dict[str, dict[str, Any]] = {
    quality.UNPARSEABLE_VALUE: {"_unparseable": True},
    quality.MISSING_TIMESTAMP: {"dropoff_datetime": None},
    quality.PICKUP_OUTSIDE_MONTH: {"pickup_datetime": datetime(2024, 3, 1, 10, 0)},
    quality.DROPOFF_BEFORE_PICKUP: {"dropoff_datetime": datetime(2024, 1, 1, 0, 0)},
    quality.IMPLAUSIBLE_DURATION: {"dropoff_datetime": datetime(2024, 1, 17, 0, 0)},
    quality.NEGATIVE_DISTANCE: {"trip_distance": -1.0},
    quality.IMPLAUSIBLE_DISTANCE: {"trip_distance": 900.0},
    quality.NEGATIVE_TOTAL: {"total_amount": -1.0},
    quality.NEGATIVE_COMPONENT: {"extra": -1.0},
    quality.UNKNOWN_LOCATION: {"pickup_location_id": 0},
    quality.IMPOSSIBLE_PASSENGER_COUNT: {"passenger_count": 0},
}


@pytest.mark.parametrize("first", range(len(RULES)), ids=list(RULES))
def test_first_broken_rule_wins(first: int) -> None:
    row: dict[str, Any] = {}
    # later rules first, so an earlier rule's break wins where both touch a column
    for name in reversed(RULES[first:]):
        row.update(_BREAKS[name])
    assert reasons_of(row) == [RULES[first]]
    # and each of the later rules alone gives its own reason
    for name in RULES[first + 1 :]:
        assert reasons_of(_BREAKS[name]) == [name]


def test_precedence_in_a_mixed_batch() -> None:
    rows = [
        {"passenger_count": 0, "total_amount": -3.0},
        {"pickup_location_id": 999, "passenger_count": 0},
        {"trip_distance": -1.0, "pickup_location_id": 0},
        {},
        {"pickup_datetime": None, "total_amount": -1.0},
    ]
    assert reasons_of(*rows) == [
        quality.NEGATIVE_TOTAL,
        quality.UNKNOWN_LOCATION,
        quality.NEGATIVE_DISTANCE,
        None,
        quality.MISSING_TIMESTAMP,
    ]


@pytest.mark.parametrize(
    "row",
    [
        {"pickup_location_id": None},
        {"dropoff_location_id": None},
        # the null even hides a definitely unknown zone on the other side
        {"pickup_location_id": None, "dropoff_location_id": 300},
    ],
)
def test_null_location_is_unknown_location(row: dict[str, Any]) -> None:
    assert reasons_of(row) == [quality.UNKNOWN_LOCATION]


def _raw_table(**overrides: list[Any]) -> pa.Table:
    """A tiny raw TLC-style (2024 yellow) table of three good trips."""
    columns: dict[str, list[Any]] = {
        "VendorID": [1, 2, 2],
        "tpep_pickup_datetime": [datetime(2024, 1, 2, 8, 0), datetime(2024, 1, 3, 9, 0),
                                 datetime(2024, 1, 4, 10, 0)],
        "tpep_dropoff_datetime": [datetime(2024, 1, 2, 8, 30), datetime(2024, 1, 3, 9, 15),
                                  datetime(2024, 1, 4, 10, 45)],
        "passenger_count": [1.0, 2.0, 1.0],
        "trip_distance": [1.2, 3.4, 5.6],
        "RatecodeID": [1.0, 1.0, 2.0],
        "PULocationID": [132, 236, 48],
        "DOLocationID": [1, 265, 264],
        "payment_type": [1, 2, 0],
        "fare_amount": [10.0, 20.0, 52.0],
        "total_amount": [15.0, 25.5, 70.0],
        "Airport_fee": [0.0, 1.75, 1.75],
    }
    columns.update(overrides)
    return pa.table(columns)


def test_null_passenger_count_is_kept_through_the_transform(tmp_path: Path) -> None:
    table = _raw_table(passenger_count=[None, 0.0, float("nan")])
    path = tmp_path / "raw.parquet"
    pq.write_table(table, path)
    result = run(path, tmp_path)
    assert result.stats.rejected == Counter({quality.IMPOSSIBLE_PASSENGER_COUNT: 1})
    # null and NaN (TLC's "not recorded") both become null and the trips stay
    assert result.processed.column("passenger_count").to_pylist() == [None, None]
    assert result.processed.column("total_amount").to_pylist() == [15.0, 70.0]
    assert result.rejects.column("total_amount").to_pylist() == [25.5]


def test_missing_location_in_a_raw_file_is_rejected(tmp_path: Path) -> None:
    table = _raw_table(PULocationID=pa.array([132.0, None, float("nan")], pa.float64()))
    path = tmp_path / "raw.parquet"
    pq.write_table(table, path)
    result = run(path, tmp_path)
    assert result.stats.rejected == Counter({quality.UNKNOWN_LOCATION: 2})
    assert result.processed.column("pickup_location_id").to_pylist() == [132]


# -- (d) bad files are quarantined with a kind ----------------------------------------


def _good_parquet(path: Path, rows: int = 2_000, row_group_rows: int = 500) -> Path:
    sample = generate_month("yellow", 2024, 1, rows, seed=3)
    return write_month(sample, path, row_group_rows=row_group_rows)


def _bad(path: Path, tmp_path: Path) -> BadInputFile:
    with pytest.raises(BadInputFile) as info:
        run(path, tmp_path / "out")
    return info.value


def test_csv_file_is_not_parquet(tlc_data_dir: Path, tmp_path: Path) -> None:
    path = tmp_path / "yellow_tripdata_2024-01.parquet"
    path.write_bytes((tlc_data_dir / "yellow_head.csv").read_bytes())
    error = _bad(path, tmp_path)
    assert error.kind == "not_parquet"
    assert str(error).startswith("not_parquet: ")


def test_text_file_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_text("VendorID,tpep_pickup_datetime\n1,2024-01-01 00:00:00\n")
    assert _bad(path, tmp_path).kind == "not_parquet"


def test_empty_bytes_file_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "zero.parquet"
    path.write_bytes(b"")
    assert _bad(path, tmp_path).kind == "not_parquet"


def test_half_written_parquet_is_not_parquet(tmp_path: Path) -> None:
    good = _good_parquet(tmp_path / "good.parquet")
    data = good.read_bytes()
    half = tmp_path / "half.parquet"
    half.write_bytes(data[: len(data) // 2])
    error = _bad(half, tmp_path)
    # the footer (and its magic) is at the end, so half a file has none
    assert error.kind == "not_parquet"
    assert "magic" in error.detail.lower()


def test_corrupt_row_data_with_intact_footer_is_unreadable(tmp_path: Path) -> None:
    good = _good_parquet(tmp_path / "good.parquet")
    data = bytearray(good.read_bytes())
    data[100 : len(data) // 2] = bytes(len(data) // 2 - 100)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(bytes(data))
    assert _bad(corrupt, tmp_path).kind == "unreadable"


def test_missing_required_column_is_schema_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "nopu.parquet"
    pq.write_table(_raw_table().drop_columns(["PULocationID"]), path)
    error = _bad(path, tmp_path)
    assert error.kind == "schema_mismatch"
    assert "pickup_location_id" in error.detail
    assert "dropoff_location_id" not in error.detail.split(";")[0]
    assert "DOLocationID" in error.detail  # says what the file has


def test_unrelated_parquet_is_schema_mismatch(tmp_path: Path) -> None:
    path = tmp_path / "zones.parquet"
    pq.write_table(pa.table({"LocationID": [1, 2], "Borough": ["EWR", "Queens"]}), path)
    error = _bad(path, tmp_path)
    assert error.kind == "schema_mismatch"
    for column in ("pickup_datetime", "dropoff_datetime", "trip_distance", "total_amount"):
        assert column in error.detail


def test_zero_row_parquet_is_empty(tmp_path: Path) -> None:
    path = tmp_path / "empty.parquet"
    pq.write_table(_raw_table().slice(0, 0), path)
    assert pq.ParquetFile(path).metadata.num_rows == 0
    assert _bad(path, tmp_path).kind == "empty"


def test_bad_input_from_an_open_handle(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    path.write_bytes(b"definitely not parquet")
    with path.open("rb") as handle, pytest.raises(BadInputFile) as info:
        run(handle, tmp_path / "out")
    assert info.value.kind == "not_parquet"


# -- (e) streaming ----------------------------------------------------------------------


def test_several_row_groups_stream_in_bounded_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, batch_rows = 6_000, 1_024
    path = _good_parquet(tmp_path / "yellow_tripdata_2024-01.parquet", rows=rows,
                         row_group_rows=1_000)
    assert pq.ParquetFile(path).num_row_groups == 6

    seen: list[int] = []
    real_normalise = transform_core.normalise

    def recording_normalise(batch: pa.RecordBatch, *args: Any) -> pa.RecordBatch:
        seen.append(batch.num_rows)
        return real_normalise(batch, *args)

    monkeypatch.setattr(transform_core, "normalise", recording_normalise)
    result = run(path, tmp_path, batch_rows=batch_rows)

    assert result.stats.batches > 1
    assert result.stats.batches >= math.ceil(rows / batch_rows)
    assert result.stats.batches == len(seen)
    assert max(seen) <= batch_rows
    assert sum(seen) == rows == result.stats.rows_in
    whole = run(path, tmp_path, tag="whole")
    assert whole.stats.batches == 1
    assert whole.processed.equals(result.processed)
    assert whole.stats.rejected == result.stats.rejected


# -- (f) determinism ----------------------------------------------------------------------


def test_same_input_gives_identical_output(tmp_path: Path) -> None:
    path = _good_parquet(tmp_path / "yellow_tripdata_2024-01.parquet", rows=3_000)
    first = run(path, tmp_path, tag="first", batch_rows=1_024)
    second = run(path, tmp_path, tag="second", batch_rows=1_024)
    assert first.stats == second.stats
    assert first.processed.equals(second.processed)
    assert first.rejects.equals(second.rejects)
    assert first.processed.num_rows > 0


def test_same_input_gives_identical_output_bytes(tmp_path: Path) -> None:
    """Same source bytes, lineage and code: byte-identical files, so a store can keep them."""
    path = _good_parquet(tmp_path / "yellow_tripdata_2024-01.parquet", rows=3_000)
    first = run(path, tmp_path, tag="first", batch_rows=1_024)
    second = run(path, tmp_path, tag="second", batch_rows=1_024)
    assert first.stats.rows_rejected > 0  # both files have content to compare
    assert first.processed_path.read_bytes() == second.processed_path.read_bytes()
    assert first.rejects_path.read_bytes() == second.rejects_path.read_bytes()


def test_the_transform_clock_makes_different_bytes(tmp_path: Path) -> None:
    """Why the flow passes the source's landing time as `ingested_at`, not the clock."""
    path = _good_parquet(tmp_path / "yellow_tripdata_2024-01.parquet", rows=500)
    first = run(path, tmp_path, tag="first", ingested_at=None)
    time.sleep(0.002)
    second = run(path, tmp_path, tag="second", ingested_at=None)
    assert first.processed_path.read_bytes() != second.processed_path.read_bytes()


def test_only_ingested_at_differs_between_runs(tmp_path: Path) -> None:
    path = _good_parquet(tmp_path / "yellow_tripdata_2024-01.parquet", rows=1_000)
    first = run(path, tmp_path, tag="first", ingested_at=None)
    second = run(path, tmp_path, tag="second",
                 ingested_at=datetime(2030, 1, 1, tzinfo=UTC))
    assert first.processed.drop_columns(["ingested_at"]).equals(
        second.processed.drop_columns(["ingested_at"]))
    stamps = set(first.processed.column("ingested_at").to_pylist())
    assert len(stamps) == 1
    (stamp,) = stamps
    assert stamp.tzinfo is not None
    assert abs((datetime.now(UTC) - stamp).total_seconds()) < 300


# -- (g) the flow's task: same source generation, same output objects ---------------------


def _raw_object(store: LocalStore, settings: Settings, path: Path) -> ObjectRef:
    name = raw_object_name(settings.raw_prefix, "yellow", 2024, 1)
    with store.publish(name) as target:
        shutil.copyfile(path, target)
    return store.ref(name)


def test_transforming_a_generation_again_keeps_both_outputs(tmp_path: Path) -> None:
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    obj = _raw_object(store, settings, _good_parquet(tmp_path / "src.parquet", rows=3_000))
    before = current_generation(store, sibling_name(obj.name, settings.raw_prefix,
                                                    settings.processed_prefix))
    assert before is None
    stats, processed, rejects = transform_object.fn(store, obj, settings)
    assert stats.rows_rejected > 0
    assert output_of(before, processed) == "written"
    table = pq.read_table(store.root / processed.name)
    assert set(table.column("ingested_at").to_pylist()) == {obj.created}
    processed_bytes = (store.root / processed.name).read_bytes()

    time.sleep(0.01)  # a rewrite would get a later generation
    again_stats, again_processed, again_rejects = transform_object.fn(store, obj, settings)
    assert again_stats == stats
    assert (again_processed, again_rejects) == (processed, rejects)
    assert output_of(processed.generation, again_processed) == "unchanged"
    assert (store.root / processed.name).read_bytes() == processed_bytes


def test_a_new_generation_of_the_same_bytes_is_written_again(tmp_path: Path) -> None:
    """Its rows carry the new source generation: the load must replace them."""
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    source = _good_parquet(tmp_path / "src.parquet", rows=1_000)
    first = _raw_object(store, settings, source)
    _, processed, _ = transform_object.fn(store, first, settings)
    time.sleep(0.01)
    second = _raw_object(store, settings, source)
    assert second.generation > first.generation
    _, again, _ = transform_object.fn(store, second, settings)
    assert output_of(processed.generation, again) == "written"
    assert again.generation > processed.generation
    assert pq.read_schema(store.root / again.name).metadata[METADATA_SOURCE_GENERATION] == \
        str(second.generation).encode()


def test_a_kept_processed_object_is_announced_like_a_reemit(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[dict[str, Any]] = []
    monkeypatch.setattr(transform_flow, "emit_event", lambda **kwargs: sent.append(kwargs))
    settings = get_settings()
    processed = ObjectRef(bucket="b", name="processed/yellow/2024/yellow_tripdata_2024-01.parquet",
                          generation=42, size=10)
    transform_flow.announce_kept(processed, settings)
    (kwargs,) = sent
    expected = events.object_finalized(processed, settings.stage_prefixes, reemit=True)
    assert kwargs["event"] == events.OBJECT_FINALIZED
    assert kwargs["resource"] == dict(expected.resource)
    assert kwargs["resource"][events.LABEL_REEMIT] == "true"
    assert kwargs["resource"][events.LABEL_STAGE] == events.STAGE_PROCESSED
    assert kwargs["resource"][events.LABEL_GENERATION] == "42"
    assert kwargs["payload"] == expected.payload


def test_the_flow_re_emits_a_kept_processed_object_and_says_so(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The flow's wiring, with Prefect's run context, API and events stubbed out."""
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    obj = _raw_object(store, settings, _good_parquet(tmp_path / "src.parquet", rows=1_000))
    emitted: list[tuple[str, dict[str, Any]]] = []
    reemitted: list[dict[str, Any]] = []
    monkeypatch.setattr(transform_flow, "get_run_logger", lambda: logging.getLogger("t"))
    monkeypatch.setattr(transform_flow, "begin",
                        lambda *args: RunContext(settings, store, store.ref(obj.name), {}))
    monkeypatch.setattr(transform_flow, "transform_object", transform_object.fn)
    monkeypatch.setattr(transform_flow, "transient", lambda step, settings: step)
    monkeypatch.setattr(transform_flow, "create_table_artifact", lambda **kwargs: None)
    monkeypatch.setattr(transform_flow, "emit", lambda name, obj, settings, **kw: emitted.append(
        (name, kw["payload"])))
    monkeypatch.setattr(transform_flow, "emit_event", lambda **kw: reemitted.append(kw))

    first = transform_flow.transform.fn(obj.uri, obj.generation)
    assert first["output"] == "written"
    assert emitted[-1][0] == events.TRANSFORM_COMPLETED
    assert emitted[-1][1]["output"] == "written"
    assert reemitted == []
    processed = store.ref(sibling_name(obj.name, settings.raw_prefix, settings.processed_prefix))

    time.sleep(0.01)
    second = transform_flow.transform.fn(obj.uri, obj.generation)
    assert second["output"] == "unchanged"
    assert emitted[-1][1]["output"] == "unchanged"
    assert store.ref(processed.name) == processed
    (event,) = reemitted
    assert event["event"] == events.OBJECT_FINALIZED
    assert event["resource"]["prefect.resource.id"] == processed.uri
    assert event["resource"][events.LABEL_GENERATION] == str(processed.generation)
    assert event["resource"][events.LABEL_REEMIT] == "true"


def test_output_of() -> None:
    ref = ObjectRef(bucket="b", name="processed/x.parquet", generation=7)
    assert output_of(None, ref) == "written"
    assert output_of(6, ref) == "written"
    assert output_of(7, ref) == "unchanged"


def test_transient_steps_retry_once_per_configured_wait() -> None:
    from flows.common import transient

    settings = Settings(profile="local", task_retry_delays=[1.0, 4.0])
    step = transient(transform_object, settings)
    assert (step.retries, step.retry_delay_seconds) == (2, [1.0, 4.0])
    assert step.retry_condition_fn is transform_object.retry_condition_fn  # bad input: no retry
    none = transient(transform_object, Settings(profile="local", task_retry_delays=[]))
    assert none.retries == 0


def test_a_failed_write_is_not_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A full disk must fail the run (to be retried), never quarantine a good file."""
    import errno

    def disk_full(*args: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(transform_core, "_write", disk_full)
    source = _good_parquet(tmp_path / "src.parquet", rows=1_000)
    with pytest.raises(OSError, match="No space left") as raised:
        transform_parquet(source, tmp_path / "p.parquet", tmp_path / "r.parquet",
                          source_uri="x", source_generation=1, taxi_type="yellow",
                          month=(2024, 1))
    assert not isinstance(raised.value, BadInputFile)
