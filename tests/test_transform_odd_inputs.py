"""Odd inputs (issue 9): zoned times, unparseable cells, names that do not say, row groups."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest
from test_transform import (
    INGESTED_AT,
    SOURCE_URI,
    Result,
    _raw_table,
    assert_common_invariants,
    both,
    run,
)

import taxi_pipeline.transform.streaming as transform_core
from taxi_pipeline.datasets import quality
from taxi_pipeline.datasets.schema import CANONICAL_SCHEMA, REJECTS_SCHEMA
from taxi_pipeline.sources.sample_data import generate_month, write_month
from taxi_pipeline.transform.streaming import BadInputFile, inspect_source, transform_parquet

NEW_YORK = "America/New_York"


def _replace(table: pa.Table, name: str, values: pa.Array | pa.ChunkedArray) -> pa.Table:
    return table.set_column(table.schema.get_field_index(name), name, values)


def _zoned(values: pa.ChunkedArray, unit: str = "us") -> pa.ChunkedArray:
    """New York wall-clock times as the same instants tagged UTC (what a zoned export holds)."""
    instants = pc.assume_timezone(values, NEW_YORK)
    return pc.cast(instants, pa.timestamp(unit, "UTC"))


def _without_lineage(table: pa.Table) -> pa.Table:
    return table.drop_columns(["ingested_at"])


# -- 1. zoned timestamps ------------------------------------------------------------------


@pytest.mark.parametrize("unit", ["us", "ns"])
def test_utc_tagged_real_month_is_read_as_new_york_wall_clock(
        tlc_data_dir: Path, tmp_path: Path, unit: str) -> None:
    path = tlc_data_dir / "green_tripdata_2024-01.parquet"
    source = pq.read_table(path)
    zoned = source
    for name in ("lpep_pickup_datetime", "lpep_dropoff_datetime"):
        zoned = _replace(zoned, name, _zoned(source.column(name), unit))
    assert zoned.schema.field("lpep_pickup_datetime").type == pa.timestamp(unit, tz="UTC")
    zoned_path = tmp_path / "green_tripdata_2024-01.parquet"
    pq.write_table(zoned, zoned_path)

    naive = run(path, tmp_path, taxi_type="green", tag="naive")
    result = run(zoned_path, tmp_path, taxi_type="green", tag="zoned")

    assert_common_invariants(result, 56_551)
    # no row wrongly rejected: the month rule sees the same (New York) pickups
    assert result.stats.rejected == naive.stats.rejected
    assert result.stats.rejected["pickup_outside_month"] == 2
    # and the values are the New York wall clock, not UTC's (5 hours later in January)
    assert result.processed.equals(naive.processed)
    assert both(result).column("pickup_datetime").to_pylist() == \
        both(naive).column("pickup_datetime").to_pylist()


def test_utc_tagged_summer_times_use_daylight_saving(tmp_path: Path) -> None:
    sample = generate_month("yellow", 2024, 7, 2_000, seed=5)
    table = sample.table
    for name in ("tpep_pickup_datetime", "tpep_dropoff_datetime"):
        table = _replace(table, name, _zoned(table.column(name)))
    path = tmp_path / "yellow_tripdata_2024-07.parquet"
    pq.write_table(table, path)
    result = run(path, tmp_path, month=(2024, 7))
    assert result.stats.rejected == sample.expected_rejects
    first = table.column("tpep_pickup_datetime")[0].as_py()  # UTC instant
    wall = sample.table.column("tpep_pickup_datetime")[0].as_py()
    assert (first.replace(tzinfo=None) - wall).total_seconds() == 4 * 3600  # EDT
    assert wall in both(result).column("pickup_datetime").to_pylist()


# -- 2. one bad cell rejects its row, not the file --------------------------------------


def _with_cell(values: pa.ChunkedArray, row: int, text: str | None) -> pa.Array:
    items = values.to_pylist()
    items[row] = text
    return pa.array(items, pa.string())


def _numbers_as_text(column: pa.ChunkedArray) -> pa.Array:
    """Doubles as the integer text a CSV export holds ("1", not "1.0"); null stays null."""
    return pc.cast(pc.cast(column, pa.int64()), pa.string())


def test_one_unparseable_passenger_count_rejects_one_row(
        tlc_data_dir: Path, tmp_path: Path) -> None:
    path = tlc_data_dir / "yellow_tripdata_sample.parquet"
    source = pq.read_table(path)
    clean = run(path, tmp_path, month=(2025, 2), tag="clean")
    good_row = 2  # rows 0-2 are all good in the clean run
    assert clean.processed.column("total_amount")[: good_row + 1].to_pylist() == \
        source.column("total_amount")[: good_row + 1].to_pylist()

    text = _with_cell(_numbers_as_text(source.column("passenger_count")), good_row, "abc")
    odd = tmp_path / "yellow_tripdata_2025-02.parquet"
    pq.write_table(_replace(source, "passenger_count", text), odd)
    result = run(odd, tmp_path, month=(2025, 2), tag="odd")

    assert_common_invariants(result, 5_000)
    assert result.stats.rejected == clean.stats.rejected + Counter({"unparseable_value": 1})
    assert result.stats.rows_out == clean.stats.rows_out - 1
    assert result.stats.unparseable == Counter({"passenger_count": 1})
    bad = result.rejects.filter(pc.equal(result.rejects.column("reject_reason"),
                                         "unparseable_value"))
    assert bad.column("reject_detail").to_pylist() == ["passenger_count='abc'"]
    assert bad.column("passenger_count").to_pylist() == [None]
    assert bad.column("total_amount").to_pylist() == [source.column("total_amount")[good_row]
                                                      .as_py()]
    # every other row as from the numeric file
    expected = pa.concat_tables([clean.processed.slice(0, good_row),
                                 clean.processed.slice(good_row + 1)])
    assert _without_lineage(result.processed).equals(_without_lineage(expected))


def _text(values: pa.ChunkedArray, style: str) -> pa.Array:
    """As a CSV export writes them (pyarrow's %S would add ".000000" to microseconds)."""
    seconds = pc.cast(values, pa.timestamp("s"))
    time_format = "%m/%d/%Y %I:%M:%S %p" if style == "us" else "%Y-%m-%d %H:%M:%S"
    return pc.strftime(seconds, format=time_format)


@pytest.mark.parametrize("style", ["us", "iso"])
def test_timestamp_text_us_and_iso_with_bad_and_missing_cells(
        tlc_data_dir: Path, tmp_path: Path, style: str) -> None:
    path = tlc_data_dir / "green_tripdata_2024-01.parquet"
    source = pq.read_table(path)
    clean = run(path, tmp_path, taxi_type="green", tag="clean")
    unparseable_row, missing_row = 100, 200
    table = source
    for name in ("lpep_pickup_datetime", "lpep_dropoff_datetime"):
        values = source.column(name)
        table = _replace(table, name, _text(values, style))
    pickups = table.column("lpep_pickup_datetime")
    pickups = _with_cell(pickups, unparseable_row, "13/45/2024 99:00:00 XM")
    pickups = _with_cell(pa.chunked_array([pickups]), missing_row, None)
    table = _replace(table, "lpep_pickup_datetime", pickups)
    odd = tmp_path / "green_tripdata_2024-01.parquet"
    pq.write_table(table, odd)
    # small batches: most are clean (ISO: the plain cast), two hold the odd cells
    result = run(odd, tmp_path, taxi_type="green", batch_rows=4_096, tag="odd")

    assert_common_invariants(result, 56_551)
    assert result.stats.rejected["unparseable_value"] == 1
    assert result.stats.rejected["missing_timestamp"] == 1  # null is missing, not unparseable
    assert result.stats.unparseable == Counter({"pickup_datetime": 1})
    details = [d for d in result.rejects.column("reject_detail").to_pylist() if d is not None]
    assert details == ["pickup_datetime='13/45/2024 99:00:00 XM'"]
    # every other row parses to the very instants of the timestamp file
    keep = pa.array([i not in (unparseable_row, missing_row) for i in range(source.num_rows)])
    expected = source.filter(keep)
    out = both(result)
    good_pickups = [v for v in out.column("pickup_datetime").to_pylist() if v is not None]
    assert sorted(good_pickups) == sorted(expected.column("lpep_pickup_datetime").to_pylist())
    assert sorted(v for v in out.column("dropoff_datetime").to_pylist() if v is not None) == \
        sorted(v for v in source.column("lpep_dropoff_datetime").to_pylist() if v is not None)
    lost = clean.stats.rows_out - result.stats.rows_out
    assert lost <= 2


def test_unparseable_cells_in_two_columns_are_both_named(tmp_path: Path) -> None:
    table = _raw_table(passenger_count=["1", "two", ""], trip_distance=["1.2", "3,4", " 5.6 "])
    path = tmp_path / "x.parquet"
    pq.write_table(table, path)
    result = run(path, tmp_path)
    assert_common_invariants(result, 3)
    assert result.stats.rejected == Counter({"unparseable_value": 1})
    assert result.rejects.column("reject_detail").to_pylist() == [
        "passenger_count='two'; trip_distance='3,4'"]
    # an empty cell is a missing value; spaces around a number are fine
    assert result.processed.column("passenger_count").to_pylist() == [1, None]
    assert result.processed.column("trip_distance").to_pylist() == [1.2, 5.6]
    assert result.stats.unparseable == Counter({"passenger_count": 1, "trip_distance": 1})


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2024-01-15 08:30:00", datetime(2024, 1, 15, 8, 30)),
        ("2024-01-15T08:30:00.25", datetime(2024, 1, 15, 8, 30, 0, 250_000)),
        ("2024-01-15 08:30", datetime(2024, 1, 15, 8, 30)),
        ("01/15/2024 08:30:00 PM", datetime(2024, 1, 15, 20, 30)),
        ("01/15/2024 12:05:00 AM", datetime(2024, 1, 15, 0, 5)),
        ("1/5/2024 8:30:00 AM", datetime(2024, 1, 5, 8, 30)),
        ("2024-01-15T13:30:00Z", datetime(2024, 1, 15, 8, 30)),  # an instant: New York time
        ("2024-07-01 12:00:00-04:00", datetime(2024, 7, 1, 12, 0)),
        ("2024-02-30 00:00:00", None),  # strptime alone would say March 1st
        ("02/30/2024 01:00:00 AM", None),
        ("2024-13-01 00:00:00", None),
        ("yesterday", None),
    ],
)
def test_time_text_formats(text: str, expected: datetime | None) -> None:
    # next to a bad cell, so the batch takes the format-by-format path
    values, failed = transform_core._convert(pa.array([text, "bad"]), pa.timestamp("us"))
    assert values.to_pylist()[0] == expected
    assert failed is not None
    assert failed.to_pylist() == [expected is None, True]
    if expected is not None and "Z" not in text and "-04" not in text and "/" not in text:
        alone, none = transform_core._convert(pa.array([text]), pa.timestamp("us"))
        assert (alone.to_pylist(), none) == ([expected], None)  # the plain cast agrees


# -- 3. names that do not say -------------------------------------------------------------


def test_inspect_source_on_real_files(tlc_data_dir: Path, tmp_path: Path) -> None:
    green = inspect_source(tlc_data_dir / "green_tripdata_2024-01.parquet")
    assert green.dataset_from_schema == "green"
    assert green.month_from_data == (2024, 1)
    assert green.pickups == green.rows == 56_551
    assert green.month_share == pytest.approx(1 - 2 / 56_551)
    yellow = inspect_source(tlc_data_dir / "yellow_tripdata_sample.parquet")
    assert (yellow.dataset_from_schema, yellow.month_from_data) == ("yellow", (2025, 2))
    # a snake_case copy has no tpep_/lpep_ columns and no dataset-only column in 2019
    table = pcsv.read_csv(tlc_data_dir / "yellow_tripdata_sample_2019-01.csv")
    pq.write_table(table, tmp_path / "copy.parquet")
    copy = inspect_source(tmp_path / "copy.parquet")
    assert (copy.dataset_from_schema, copy.month_from_data) == (None, (2019, 1))


def test_name_without_dataset_or_month_is_inferred(tlc_data_dir: Path, tmp_path: Path) -> None:
    path = tlc_data_dir / "green_tripdata_2024-01.parquet"
    named = run(path, tmp_path, taxi_type="green", month=(2024, 1), tag="named")
    result = run(path, tmp_path, taxi_type="unknown", month=None, tag="inferred")
    stats = result.stats
    assert (stats.taxi_type, stats.taxi_type_source, stats.taxi_type_inferred) == \
        ("green", "schema", True)
    assert (stats.month, stats.month_source, stats.month_inferred) == \
        ((2024, 1), "data", True)
    # the month rule is on, as with a proper name
    assert stats.rejected == named.stats.rejected
    assert stats.rejected["pickup_outside_month"] == 2
    assert set(result.processed.column("taxi_type").to_pylist()) == {"green"}
    assert (named.stats.taxi_type_source, named.stats.month_source) == ("name", "name")
    assert not named.stats.month_conflict and not named.stats.dataset_conflict
    assert named.stats.month_from_data == (2024, 1)


def test_invalid_month_in_the_name_is_inferred(tmp_path: Path) -> None:
    path = write_month(generate_month("yellow", 2025, 12, 1_000, seed=2),
                       tmp_path / "yellow_tripdata_2025-13.parquet")
    result = run(path, tmp_path, month=(2025, 13))
    assert (result.stats.month, result.stats.month_source) == ((2025, 12), "data")


def test_month_conflict_is_reported(tmp_path: Path) -> None:
    sample = generate_month("yellow", 2024, 1, 1_000, seed=4)
    path = write_month(sample, tmp_path / "yellow_tripdata_2024-02.parquet")
    result = run(path, tmp_path, month=(2024, 2))
    stats = result.stats
    assert stats.month == (2024, 2) and stats.month_source == "name"
    assert stats.month_conflict
    assert stats.month_from_data == (2024, 1)
    assert stats.month_share < 0.01
    assert stats.rejected["pickup_outside_month"] > 900


def test_dataset_conflict_is_reported(tlc_data_dir: Path, tmp_path: Path) -> None:
    result = run(tlc_data_dir / "green_tripdata_2024-01.parquet", tmp_path, taxi_type="yellow")
    assert result.stats.dataset_conflict
    assert (result.stats.taxi_type, result.stats.dataset_from_schema) == ("yellow", "green")


def test_unknown_dataset_is_bad_input(tlc_data_dir: Path, tmp_path: Path) -> None:
    table = pcsv.read_csv(tlc_data_dir / "yellow_tripdata_sample_2019-01.csv")
    path = tmp_path / "upload.parquet"
    pq.write_table(table, path)
    with pytest.raises(BadInputFile) as info:
        run(path, tmp_path, taxi_type="unknown", month=None)
    assert info.value.kind == "unknown_dataset"
    assert "tpep_" in info.value.detail and "_tripdata_YYYY-MM" in info.value.detail
    # with the dataset from the name, the month comes from the data
    ok = run(path, tmp_path, taxi_type="yellow", month=None, tag="ok")
    assert (ok.stats.month, ok.stats.month_source) == ((2019, 1), "data")


def _two_months(tmp_path: Path, jan: int, feb: int) -> Path:
    pickups = [datetime(2024, 1, 10, 8)] * jan + [datetime(2024, 2, 10, 8)] * feb
    n = jan + feb
    base = _raw_table()
    columns: dict[str, Any] = {name: [base.column(name)[0].as_py()] * n
                               for name in base.column_names}
    columns["tpep_pickup_datetime"] = pickups
    columns["tpep_dropoff_datetime"] = [p.replace(minute=30) for p in pickups]
    path = tmp_path / "trips.parquet"
    pq.write_table(pa.table(columns), path, row_group_size=2)
    return path


def test_no_month_with_most_pickups_is_bad_input(tmp_path: Path) -> None:
    with pytest.raises(BadInputFile) as info:
        run(_two_months(tmp_path, 3, 3), tmp_path, month=None)
    assert info.value.kind == "unknown_month"
    assert "2024-01: 3" in info.value.detail and "2024-02: 3" in info.value.detail
    result = run(_two_months(tmp_path, 4, 3), tmp_path, month=None)
    assert result.stats.month == (2024, 1)
    assert result.stats.month_share == pytest.approx(4 / 7)
    assert result.stats.rejected == Counter({"pickup_outside_month": 3})


def test_month_from_row_group_statistics_reads_no_rows(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write_month(generate_month("yellow", 2024, 3, 3_000, seed=1),
                       tmp_path / "trips.parquet")
    table = pq.read_table(path)
    start, end = datetime(2024, 3, 1), datetime(2024, 4, 1)
    inside = pc.and_(pc.greater_equal(table.column("tpep_pickup_datetime"), start),
                     pc.less(table.column("tpep_pickup_datetime"), end))
    pq.write_table(table.filter(inside), path, row_group_size=500)

    def no_reading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("read rows although the statistics settle the month")

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", no_reading)
    facts = inspect_source(path)
    assert (facts.month_from_data, facts.month_share) == ((2024, 3), 1.0)
    assert facts.pickups == pc.sum(inside).as_py()


def test_no_pickup_time_at_all_rejects_every_row(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(_raw_table(tpep_pickup_datetime=pa.nulls(3, pa.timestamp("us"))), path)
    result = run(path, tmp_path, month=None)
    assert (result.stats.month, result.stats.month_source) == (None, None)
    assert result.stats.rejected == Counter({"missing_timestamp": 3})


# -- 5. row groups -----------------------------------------------------------------------


def _row_groups(path: Path) -> list[int]:
    metadata = pq.ParquetFile(path).metadata
    return [metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)]


def test_row_groups_are_buffered_across_batches(tmp_path: Path) -> None:
    sample = generate_month("yellow", 2024, 1, 30_000, seed=8)
    path = write_month(sample, tmp_path / "yellow_tripdata_2024-01.parquet")
    result = run(path, tmp_path, batch_rows=1_000)
    assert result.stats.batches == 30
    # defaults: a file this small is one row group, rejects too
    assert _row_groups(result.processed_path) == [sample.expected_good]
    assert _row_groups(result.rejects_path) == [sum(sample.expected_rejects.values())]
    assert result.stats.row_groups_out == 1

    capped: Result = _run_capped(path, tmp_path, rows=7_000)
    groups = _row_groups(capped.processed_path)
    assert groups[:-1] == [7_000] * (len(groups) - 1)  # exactly the cap, across batches
    assert sum(groups) == sample.expected_good
    assert capped.processed.equals(result.processed)
    assert capped.stats.row_groups_out == len(groups)


def test_row_groups_are_capped_by_bytes(tmp_path: Path) -> None:
    sample = generate_month("yellow", 2024, 1, 20_000, seed=8)
    path = write_month(sample, tmp_path / "yellow_tripdata_2024-01.parquet")
    capped = _run_capped(path, tmp_path, rows=1_000_000, nbytes=1_000_000)
    groups = _row_groups(capped.processed_path)
    # ~150 bytes a row in memory (lineage excluded): a few thousand rows a group
    assert 3 <= len(groups) <= 10
    assert max(groups) <= 1_000_000 // 100 + 1_000


def _run_capped(path: Path, tmp_path: Path, rows: int, nbytes: int = 2**40) -> Result:
    out = tmp_path / f"capped-{rows}-{nbytes}"
    out.mkdir()
    stats = transform_parquet(path, out / "p.parquet", out / "r.parquet", source_uri=SOURCE_URI,
                              source_generation=1, taxi_type="yellow", month=(2024, 1),
                              batch_rows=1_000, row_group_rows=rows, row_group_bytes=nbytes,
                              ingested_at=INGESTED_AT)
    return Result(stats, pq.read_table(out / "p.parquet"), pq.read_table(out / "r.parquet"),
                  out / "p.parquet", out / "r.parquet")


def test_rejects_schema_has_a_nullable_detail() -> None:
    assert REJECTS_SCHEMA.names[-2:] == ["reject_reason", "reject_detail"]
    assert REJECTS_SCHEMA.field("reject_detail").nullable
    assert REJECTS_SCHEMA.names[:-2] == CANONICAL_SCHEMA.names
    assert quality.RULES[0] == quality.UNPARSEABLE_VALUE


def test_numbers_that_are_no_integer_reject_their_rows_with_column_and_value(
        tlc_data_dir: Path, tmp_path: Path) -> None:
    """Issue 20, defect 3: the real yellow file (passenger_count and RatecodeID are doubles
    there) with a fractional, an out-of-range and an infinite passenger count, an out-of-range
    RatecodeID and an out-of-range zone id (an int64 column). Each such row is rejected as
    `unparseable_value` naming the column and the value; none is truncated or nulled.
    (NaN stays "not recorded", like null: test_null_passenger_count_is_kept_...)"""
    path = tlc_data_dir / "yellow_tripdata_sample.parquet"
    source = pq.read_table(path)
    clean = run(path, tmp_path, month=(2025, 2), tag="clean")
    # Source rows the clean run keeps (processed rows keep the source order).
    kept = clean.processed.column("pickup_datetime").to_pylist()
    pickups = source.column("tpep_pickup_datetime").to_pylist()
    good_rows, j = [], 0
    for i, pickup in enumerate(pickups[:200]):
        if j < len(kept) and kept[j] == pickup:
            good_rows.append(i)
            j += 1
    a, b, c, d, e = good_rows[:5]
    passengers = source.column("passenger_count").to_pylist()
    ratecodes = source.column("RatecodeID").to_pylist()
    zones = source.column("PULocationID").to_pylist()
    passengers[a], passengers[b], passengers[c] = 1.7, 1e12, float("inf")
    ratecodes[d] = 3e10
    zones[e] = 2**31 + 5
    odd_table = _replace(_replace(_replace(
        source, "passenger_count", pa.array(passengers, pa.float64())),
        "RatecodeID", pa.array(ratecodes, pa.float64())),
        "PULocationID", pa.array(zones, pa.int64()))
    odd = tmp_path / "yellow_tripdata_2025-02.parquet"
    pq.write_table(odd_table, odd)
    result = run(odd, tmp_path, month=(2025, 2), tag="odd")

    assert_common_invariants(result, source.num_rows)
    assert result.stats.rejected == clean.stats.rejected + Counter({"unparseable_value": 5})
    assert result.stats.rows_out == clean.stats.rows_out - 5
    assert result.stats.unparseable == Counter(
        {"passenger_count": 3, "ratecode_id": 1, "pickup_location_id": 1})
    bad = result.rejects.filter(pc.equal(result.rejects.column("reject_reason"),
                                         "unparseable_value"))
    assert sorted(bad.column("reject_detail").to_pylist()) == sorted([
        "passenger_count='1.7'", "passenger_count='1e+12'", "passenger_count='inf'",
        "ratecode_id='3e+10'", f"pickup_location_id='{2**31 + 5}'"])
    # Whole numbers stored as doubles (the real file's own cells) still load as integers.
    assert result.processed.column("passenger_count").type == pa.int32()
    assert pc.sum(pc.is_valid(result.processed.column("passenger_count"))).as_py() > 0


def test_integer_text_with_a_fraction_is_rejected(tmp_path: Path) -> None:
    table = _raw_table(passenger_count=["1", "2.5", "3.0"])
    path = tmp_path / "x.parquet"
    pq.write_table(table, path)
    result = run(path, tmp_path)
    assert result.rejects.column("reject_detail").to_pylist() == ["passenger_count='2.5'"]
    assert result.processed.column("passenger_count").to_pylist() == [1, 3]


def test_row_groups_are_at_least_16_mib_on_disk(tmp_path: Path) -> None:
    """Issue 20, defect 4: BigQuery's parquet guidance is row groups of at least 16 MiB
    (at most 128 MiB); the old transform wrote ~6 MiB groups (32 MiB of Arrow memory)."""
    sample = generate_month("yellow", 2024, 1, 1_600_000, seed=9)
    path = write_month(sample, tmp_path / "yellow_tripdata_2024-01.parquet")
    result = run(path, tmp_path, batch_rows=32_768)
    metadata = pq.ParquetFile(result.processed_path).metadata
    on_disk = [sum(metadata.row_group(g).column(c).total_compressed_size
                   for c in range(metadata.num_columns))
               for g in range(metadata.num_row_groups)]
    assert len(on_disk) >= 2
    assert all(16 * 2**20 <= size <= 128 * 2**20 for size in on_disk[:-1]), on_disk
    assert sum(metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)) == \
        sample.expected_good
    # what the run reports (the artifact) is what the file holds, give or take page headers
    reported = getattr(result.stats, "row_group_disk_bytes", [])
    assert len(reported) == len(on_disk)
    assert all(abs(a - b) < 2**20 for a, b in zip(reported, on_disk, strict=True))
