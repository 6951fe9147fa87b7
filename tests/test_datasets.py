"""Every TLC dataset in every format: the real samples in ../shared/data/tlc, exactly.

For each real file: rows in = good + rejected, every numeric column sums to the
same total on both sides (nothing dropped, nothing altered), and each reject is
explained by its reason. The CSVs go through the CSV reader (plain and gzipped);
types come from the spec, so no cell is guessed.
"""

from __future__ import annotations

import gc
import gzip
import math
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from taxi_pipeline.datasets import quality
from taxi_pipeline.datasets.base import DatasetSpec
from taxi_pipeline.datasets.registry import (
    DATASETS,
    SPECS,
    dataset_from_columns,
    spec_of_schema,
    table_for,
    table_for_name,
    tables,
)
from taxi_pipeline.datasets.zones import zone_ids, zone_table
from taxi_pipeline.objects import output_name
from taxi_pipeline.transform.streaming import (
    BadInputFile,
    TransformStats,
    source_format,
    transform_file,
)

INGESTED_AT = datetime(2026, 1, 1, tzinfo=UTC)


def transform(path: Path, out: Path, dataset: str | None, month: tuple[int, int] | None,
              fmt: str | None = None, batch_rows: int = 32_768
              ) -> tuple[TransformStats, pa.Table, pa.Table]:
    out.mkdir(parents=True, exist_ok=True)
    processed, rejects = out / "processed.parquet", out / "rejects.parquet"
    stats = transform_file(path, processed, rejects, file_format=fmt or source_format(path.name),
                           source_uri=f"file://{path}", source_generation=7,
                           taxi_type=dataset, month=month, ingested_at=INGESTED_AT,
                           batch_rows=batch_rows)
    return stats, pq.read_table(processed), pq.read_table(rejects)


def gzipped(path: Path, tmp_path: Path) -> Path:
    target = tmp_path / (path.name + ".gz")
    target.write_bytes(gzip.compress(path.read_bytes()))
    return target


def source_table(path: Path) -> pa.Table:
    if path.suffix == ".parquet":
        return pq.read_table(path)
    return pcsv.read_csv(path)


def assert_sums_kept(spec: DatasetSpec, source: pa.Table, good: pa.Table, bad: pa.Table,
                     stats: TransformStats) -> None:
    """Every numeric column: sum over good + rejected rows == sum in the source file."""
    mapping = spec.resolve_columns(source.column_names)
    checked = 0
    for field in spec.data_fields:
        if field.name not in mapping or not (pa.types.is_integer(field.type)
                                             or pa.types.is_floating(field.type)):
            continue
        column = source.column(mapping[field.name])
        if not (pa.types.is_integer(column.type) or pa.types.is_floating(column.type)):
            continue  # an all-empty column (inferred null) sums to nothing on both sides
        want = pc.sum(column).as_py() or 0
        got = (pc.sum(good.column(field.name)).as_py() or 0) + (
            pc.sum(bad.column(field.name)).as_py() or 0)
        # TLC's "unknown" codes (RatecodeID 99) are nulled: counted, so added back
        got += spec.null_codes.get(field.name, 0) * stats.codes_nulled[field.name]
        assert math.isclose(got, want, rel_tol=1e-9, abs_tol=1e-6), (field.name, got, want)
        checked += 1
    assert checked, "no numeric column compared"
    assert stats.rows_in == source.num_rows == good.num_rows + bad.num_rows
    assert stats.rows_out == good.num_rows
    assert Counter(bad.column("reject_reason").to_pylist()) == stats.rejected


# (file, dataset from the name, month, good rows, rejects by reason)
REAL = [
    ("fhv_tripdatasample_2020-04.csv", "fhv", (2020, 4), 1000, {}),
    ("fhvhv_tripdatasample_2020-04.csv", "fhvhv", (2020, 4), 999,
     {"negative_component": 1}),
    ("head.csv", "fhvhv", (2021, 6), 100, {}),
    ("tf_fhvhv_tripdata.csv", "fhvhv", (2019, 2), 100, {"pickup_outside_month": 1600}),
    ("green_tripdata_2025-10.parquet", "green", (2025, 10), 48544,
     {"pickup_outside_month": 21, "negative_total": 131, "impossible_passenger_count": 702,
      "implausible_distance": 17, "negative_component": 1}),
]


@pytest.mark.parametrize(("name", "dataset", "month", "good", "rejected"), REAL,
                         ids=[r[0] for r in REAL])
def test_real_samples_exactly(tlc_data_dir: Path, tmp_path: Path, name: str, dataset: str,
                              month: tuple[int, int], good: int, rejected: dict[str, int]
                              ) -> None:
    path = tlc_data_dir / name
    stats, processed, rejects = transform(path, tmp_path, dataset, month)
    spec = SPECS[dataset]
    assert processed.schema.equals(spec.schema.with_metadata(processed.schema.metadata))
    assert (stats.rows_out, dict(stats.rejected)) == (good, rejected)
    assert_sums_kept(spec, source_table(path), processed, rejects, stats)
    assert set(processed.column("taxi_type").to_pylist()) == {dataset}
    assert not stats.unparseable


@pytest.mark.parametrize("name", ["fhv_tripdatasample_2020-04.csv",
                                  "fhvhv_tripdatasample_2020-04.csv", "head.csv"])
def test_gzipped_csv_gives_the_same_rows(tlc_data_dir: Path, tmp_path: Path, name: str
                                         ) -> None:
    dataset = "fhv" if name.startswith("fhv_") else "fhvhv"
    month = (2021, 6) if name == "head.csv" else (2020, 4)
    plain = transform(tlc_data_dir / name, tmp_path / "plain", dataset, month)
    packed = transform(gzipped(tlc_data_dir / name, tmp_path), tmp_path / "gz", dataset, month,
                       batch_rows=32)
    assert packed[0].batches > plain[0].batches  # streamed in small batches
    for got, want in ((packed[1], plain[1]), (packed[2], plain[2])):
        same = ["source_uri"]
        assert got.drop_columns(same).replace_schema_metadata(None).equals(
            want.drop_columns(same).replace_schema_metadata(None))


def test_real_values_are_parsed_by_the_spec(tlc_data_dir: Path, tmp_path: Path) -> None:
    _, fhv, _ = transform(tlc_data_dir / "fhv_tripdatasample_2020-04.csv", tmp_path, "fhv",
                          (2020, 4))
    first = fhv.slice(0, 1).to_pylist()[0]
    assert first["dispatching_base_num"] == "B01259"
    assert first["pickup_datetime"] == datetime(2020, 4, 24, 8, 20, 17)
    assert first["dropoff_datetime"] == datetime(2020, 4, 24, 8, 26, 59)
    assert (first["pickup_location_id"], first["dropoff_location_id"]) == (264, 157)
    assert first["sr_flag"] is None and first["affiliated_base_number"] == "B01259"
    # a third of the FHV sample has no pickup zone: kept, "not recorded"
    assert fhv.column("pickup_location_id").null_count == 321
    _, hv, bad = transform(tlc_data_dir / "fhvhv_tripdatasample_2020-04.csv", tmp_path / "hv",
                           "fhvhv", (2020, 4))
    assert hv.schema.field("trip_time").type == pa.int32()
    assert hv.column("hvfhs_license_num").to_pylist()[0] == "HV0003"
    assert hv.column("request_datetime").to_pylist()[0] == datetime(2020, 4, 24, 8, 19, 6)
    assert bad.column("base_passenger_fare").to_pylist() == [-0.18]


def test_old_layouts_fill_what_they_have(tlc_data_dir: Path, tmp_path: Path) -> None:
    stats, head, _ = transform(tlc_data_dir / "head.csv", tmp_path, "fhvhv", (2021, 6))
    # the mirror's 2021 fhvhv file is in the FHV layout: no conflict, no license number
    assert stats.dataset_from_schema == "fhv" and not stats.dataset_conflict
    assert head.column("hvfhs_license_num").null_count == 100
    assert set(head.column("sr_flag").to_pylist()) == {"N"}
    stats, tf, _ = transform(tlc_data_dir / "tf_fhvhv_tripdata.csv", tmp_path / "tf", None,
                             (2019, 2))
    assert (stats.taxi_type, stats.taxi_type_source) == ("fhvhv", "schema")
    assert tf.column("trip_miles").null_count == tf.num_rows  # not in that layout


def test_a_multi_month_file_without_a_month_in_its_name_is_quarantined(
        tlc_data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(BadInputFile) as info:
        transform(tlc_data_dir / "tf_fhvhv_tripdata.csv", tmp_path, "fhvhv", None)
    assert info.value.kind == "unknown_month"


def test_dataset_from_columns_of_each_real_file(tlc_data_dir: Path) -> None:
    said = {name: dataset_from_columns(source_table(tlc_data_dir / name).schema)
            for name in ("fhv_tripdatasample_2020-04.csv", "fhvhv_tripdatasample_2020-04.csv",
                         "head.csv", "tf_fhvhv_tripdata.csv", "green_tripdata_2025-10.parquet",
                         "yellow_tripdata_sample.parquet")}
    assert said == {"fhv_tripdatasample_2020-04.csv": "fhv",
                    "fhvhv_tripdatasample_2020-04.csv": "fhvhv", "head.csv": "fhv",
                    "tf_fhvhv_tripdata.csv": "fhvhv", "green_tripdata_2025-10.parquet": "green",
                    "yellow_tripdata_sample.parquet": "yellow"}
    # the 2015-2016 and 2019 FHV layouts
    assert dataset_from_columns(["Dispatching_base_num", "Pickup_date", "locationID"]) == "fhv"
    assert dataset_from_columns(["dispatching_base_num", "pickup_datetime", "dropoff_datetime",
                                 "PULocationID", "DOLocationID", "SR_Flag"]) == "fhv"


# -- CSV dirt -------------------------------------------------------------------------------

HEADER = "hvfhs_license_num,dispatching_base_num,pickup_datetime,dropoff_datetime," \
         "PULocationID,DOLocationID,SR_Flag\n"
GOOD_LINE = "HV0003,B02867,2019-02-01 00:05:18,2019-02-01 00:14:57,245,251,\n"


def test_a_cell_that_does_not_parse_rejects_its_row_with_column_and_text(tmp_path: Path
                                                                         ) -> None:
    path = tmp_path / "fhvhv_tripdata_2019-02.csv"
    path.write_text(HEADER + GOOD_LINE * 3
                    + "HV0003,B02867,2019-02-31 00:05:18,2019-02-01 00:14:57,245,251,\n"
                    + "HV0005,B02510,2019-02-01 00:51:34,2019-02-01 01:28:29,2x1,234,\n"
                    + "HV0005,B02510,2019-02-01 00:51:34,2019-02-01 01:28:29,261.5,234,\n"
                    + "HV0005,X2510,2019-02-01 00:51:34,2019-02-01 01:28:29,261,234,\n"
                    + "HV0005,B02510,2019-02-01 00:51:34,2019-02-01 01:28:29,261,999,\n")
    stats, good, bad = transform(path, tmp_path / "out", "fhvhv", (2019, 2))
    assert good.num_rows == 3
    assert dict(stats.rejected) == {"unparseable_value": 3, "invalid_base_number": 1,
                                    "unknown_location": 1}
    details = [d for d in bad.column("reject_detail").to_pylist() if d]
    assert details == ["pickup_datetime='2019-02-31 00:05:18'", "pickup_location_id='2x1'",
                       "pickup_location_id='261.5'"]
    assert stats.unparseable == Counter({"pickup_location_id": 2, "pickup_datetime": 1})


def test_types_come_from_the_spec_not_the_first_rows(tmp_path: Path) -> None:
    """A column that is integers for its first 10,000 rows and then holds a text cell:
    sampling would type it int64 and then fail the whole batch; the spec reads text."""
    path = tmp_path / "fhvhv_tripdata_2019-02.csv"
    path.write_text(HEADER + GOOD_LINE * 10_000
                    + "HV0003,B02867,2019-02-01 00:05:18,2019-02-01 00:14:57,N/A,251,\n")
    stats, _good, bad = transform(path, tmp_path / "out", "fhvhv", (2019, 2), batch_rows=4096)
    assert (stats.rows_out, dict(stats.rejected)) == (10_000, {"unparseable_value": 1})
    assert bad.column("reject_detail").to_pylist() == ["pickup_location_id='N/A'"]


def test_a_line_with_the_wrong_cell_count_is_a_malformed_row(tmp_path: Path) -> None:
    path = tmp_path / "fhvhv_tripdata_2019-02.csv"
    path.write_text(HEADER + GOOD_LINE + "HV0003,B02867,2019-02-01 00:05:18\n" + GOOD_LINE)
    stats, _good, bad = transform(path, tmp_path / "out", "fhvhv", (2019, 2))
    assert (stats.rows_in, stats.rows_out, dict(stats.rejected)) == (3, 2, {"malformed_row": 1})
    assert bad.column("reject_detail").to_pylist()[0].endswith("HV0003,B02867,2019-02-01 00:05:18")


def test_truncated_gzip_is_bad_input(tlc_data_dir: Path, tmp_path: Path) -> None:
    whole = gzipped(tlc_data_dir / "fhvhv_tripdatasample_2020-04.csv", tmp_path)
    cut = tmp_path / "fhvhv_tripdata_2020-04.csv.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size * 2 // 3])
    with pytest.raises(BadInputFile) as info:
        transform(cut, tmp_path / "out", "fhvhv", (2020, 4))
    assert info.value.kind == "truncated"
    assert "upload the whole file again" in info.value.detail


def test_csv_without_required_columns_is_schema_mismatch(tlc_data_dir: Path, tmp_path: Path
                                                         ) -> None:
    path = tmp_path / "fhv_tripdata_2020-04.csv"
    path.write_text("dispatching_base_num,dropoff_datetime\nB00001,2020-04-01 00:00:00\n")
    with pytest.raises(BadInputFile) as info:
        transform(path, tmp_path / "out", None, None)
    assert info.value.kind == "schema_mismatch"
    with pytest.raises(BadInputFile) as info:
        transform(path, tmp_path / "out", "fhv", (2020, 4))
    assert info.value.kind == "schema_mismatch"
    assert "pickup_datetime" in info.value.detail and "the file has" in info.value.detail


@pytest.mark.parametrize(("content", "fmt", "kind"), [
    (b"", "csv", "empty"),
    (HEADER.encode(), "csv", "empty"),
    (b"not gzip at all", "csv.gz", "not_gzip"),
    # mtime=0: gzip stamps the time, and xdist workers must collect the same test ids
    (gzip.compress(b"", mtime=0), "csv.gz", "empty"),
], ids=["empty-csv", "header-only-csv", "not-gzip", "empty-gzip"])
def test_odd_csv_files(tmp_path: Path, content: bytes, fmt: str, kind: str) -> None:
    path = tmp_path / f"fhvhv_tripdata_2019-02.{fmt}"
    path.write_bytes(content)
    with pytest.raises(BadInputFile) as info:
        transform(path, tmp_path / "out", "fhvhv", (2019, 2))
    assert info.value.kind == kind


def test_fhv_rules_in_order(tmp_path: Path) -> None:
    header = "dispatching_base_num,pickup_datetime,dropOff_datetime,PUlocationID," \
             "DOlocationID,SR_Flag,Affiliated_base_number\n"
    lines = [
        "B00001,2020-04-02 10:00:00,2020-04-02 10:10:00,,,,\n",  # good: zones not recorded
        "B00001,2020-04-02 10:00:00,,7,,,\n",  # good: no dropoff recorded
        "B00001,,2020-04-02 10:10:00,7,8,,\n",  # missing_timestamp
        "B00001,2020-05-02 10:00:00,2020-05-02 10:10:00,7,8,,\n",  # pickup_outside_month
        "B00001,2020-04-02 10:00:00,2020-04-02 09:10:00,7,8,,\n",  # dropoff_before_pickup
        "B00001,2020-04-02 10:00:00,2020-04-04 10:10:00,7,8,,\n",  # implausible_duration
        "B00001,2020-04-02 10:00:00,2020-04-02 10:10:00,0,8,,\n",  # unknown_location
        "BX0001,2020-04-02 10:00:00,2020-04-02 10:10:00,7,8,,\n",  # invalid_base_number
        ",2020-04-02 10:00:00,2020-04-02 10:10:00,7,8,,\n",  # invalid_base_number
    ]
    path = tmp_path / "fhv_tripdata_2020-04.csv"
    path.write_text(header + "".join(lines))
    stats, good, bad = transform(path, tmp_path / "out", "fhv", (2020, 4))
    assert good.num_rows == 2
    assert bad.column("reject_reason").to_pylist() == [
        "missing_timestamp", "pickup_outside_month", "dropoff_before_pickup",
        "implausible_duration", "unknown_location", "invalid_base_number",
        "invalid_base_number"]
    assert set(stats.rejected) <= set(SPECS["fhv"].rules)


def test_fhvhv_rules(tmp_path: Path) -> None:
    names = [f.name for f in SPECS["fhvhv"].data_fields if f.name not in
             ("pickup_location_id", "dropoff_location_id")] + ["PULocationID", "DOLocationID"]
    base = {name: "" for name in names}
    base.update(hvfhs_license_num="HV0003", dispatching_base_num="B02510",
                pickup_datetime="2024-03-02 10:00:00", dropoff_datetime="2024-03-02 10:20:00",
                PULocationID="7", DOLocationID="8", trip_miles="3.2", trip_time="1200",
                base_passenger_fare="20.5", driver_pay="15.1", tips="0")
    cases = [({}, None), ({"trip_miles": "-1"}, "negative_distance"),
             ({"trip_miles": "900"}, "implausible_distance"),
             ({"driver_pay": "-3"}, "negative_component"),
             ({"tips": "-0.5"}, "negative_component"),
             ({"DOLocationID": ""}, "unknown_location"),
             ({"PULocationID": "266"}, "unknown_location"),
             ({"dispatching_base_num": "2510"}, "invalid_base_number"),
             ({"trip_time": "12.5"}, "unparseable_value")]
    rows = [",".join({**base, **change}.values()) for change, _ in cases]
    path = tmp_path / "fhvhv_tripdata_2024-03.csv"
    path.write_text(",".join(base) + "\n" + "\n".join(rows) + "\n")
    _stats, good, bad = transform(path, tmp_path / "out", "fhvhv", (2024, 3))
    assert good.num_rows == 1
    assert bad.column("reject_reason").to_pylist() == [reason for _, reason in cases[1:]]


# -- the registry, tables, zones ------------------------------------------------------------


def test_registry_names_every_dataset_and_table() -> None:
    assert DATASETS == ("yellow", "green", "fhv", "fhvhv")
    assert tables() == {"yellow": "trips", "green": "trips", "fhv": "fhv_trips",
                        "fhvhv": "fhvhv_trips"}
    assert table_for("green", "my_trips") == "my_trips"
    assert table_for_name("raw/fhv/2020/fhv_tripdata_2020-04.csv.gz") == "fhv_trips"
    assert table_for_name("processed/x/upload.parquet", "trips") == "trips"
    for spec in SPECS.values():
        assert spec_of_schema(spec.schema) in (spec, SPECS["yellow"])
        assert spec.rules[0] == quality.UNPARSEABLE_VALUE
        assert {"pickup_datetime", "source_uri"} <= set(spec.schema.names)  # partition, cluster
        assert spec.schema.names[0] == "taxi_type"


def test_output_names_keep_one_output_per_source() -> None:
    assert output_name("raw/green/2020/green_tripdata_2020-10.csv.gz", "raw/", "processed/") \
        == "processed/green/2020/green_tripdata_2020-10.csv.gz.parquet"
    assert output_name("raw/green/2020/green_tripdata_2020-10.parquet", "raw/", "rejects/") \
        == "rejects/green/2020/green_tripdata_2020-10.parquet"
    assert source_format("x.CSV.GZ") == "csv.gz" and source_format("x.csv") == "csv"
    assert source_format("upload", b"\x1f\x8b\x08") == "csv.gz"
    assert source_format("upload", b"PAR1") == "parquet"


def test_zone_lookup_is_tlc_s(tlc_data_dir: Path) -> None:
    zones = zone_table()
    assert zones.num_rows == 265
    assert zone_ids().to_pylist() == list(range(1, 266))
    assert zones.slice(0, 1).to_pylist()[0] == {
        "location_id": 1, "borough": "EWR", "zone": "Newark Airport", "service_zone": "EWR"}
    assert zone_table(tlc_data_dir / "taxi_zone_lookup.csv").equals(zones)


def test_location_rule_checks_the_lookup_it_is_given(tlc_data_dir: Path, tmp_path: Path
                                                     ) -> None:
    lookup = tmp_path / "zones.csv"
    lookup.write_text("LocationID,Borough,Zone,service_zone\n7,Queens,Astoria,Boro Zone\n"
                      "8,Queens,Astoria Park,Boro Zone\n")
    path = tmp_path / "fhvhv_tripdata_2019-02.csv"
    path.write_text(HEADER + GOOD_LINE + GOOD_LINE.replace("245,251", "7,8"))
    out = tmp_path / "out"
    out.mkdir()
    stats = transform_file(path, out / "p.parquet", out / "r.parquet", file_format="csv",
                           source_uri="file:///x", source_generation=1, taxi_type="fhvhv",
                           month=(2019, 2), zones=zone_ids(lookup))
    assert (stats.rows_out, dict(stats.rejected)) == (1, {"unknown_location": 1})


def test_nanosecond_text_times_are_cut_to_microseconds(tmp_path: Path) -> None:
    """pandas writes ns times to CSV (`08:20:17.123456789`): TLC never records below a
    second, so the digits past the microsecond are cut, not the row rejected."""
    path = tmp_path / "fhvhv_tripdata_2019-02.csv"
    path.write_text(HEADER + GOOD_LINE.replace("00:05:18", "00:05:18.123456789"))
    stats, good, _ = transform(path, tmp_path / "out", "fhvhv", (2019, 2))
    assert stats.rows_out == 1
    assert good.column("pickup_datetime").to_pylist() == [datetime(2019, 2, 1, 0, 5, 18, 123456)]


@pytest.mark.parametrize("packed", [False, True])
def test_csv_from_an_open_handle_as_the_flow_passes_it(tlc_data_dir: Path, tmp_path: Path,
                                                       packed: bool) -> None:
    """The flow hands the store's open file: it is read three times (header, a month scan,
    the rows) and stays the caller's to close."""
    path = tlc_data_dir / "head.csv"
    if packed:
        path = gzipped(path, tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    with path.open("rb") as handle:
        stats = transform_file(handle, out / "p.parquet", out / "r.parquet",
                               file_format="csv.gz" if packed else "csv", source_uri="x",
                               source_generation=1, taxi_type="fhvhv", month=None,
                               batch_rows=32)
        gc.collect()  # pyarrow's wrappers are gone: the file is still open
        assert not handle.closed
    assert (stats.rows_in, stats.rows_out, stats.month, stats.month_source) == (
        100, 100, (2021, 6), "data")


def test_a_csv_source_and_its_parquet_outputs_are_one_family(tmp_path: Path) -> None:
    """The status board follows raw/x.csv.gz to processed/x.csv.gz.parquet as one object."""
    from taxi_pipeline.ops.status_model import PROCESSED, RAW, REJECTS, Family, split_name
    from taxi_pipeline.settings import Settings
    from taxi_pipeline.storage.local import LocalStore

    settings = Settings(profile="local", home=tmp_path)
    store = LocalStore(settings.bucket_dir)
    raw = "raw/green/2020/green_tripdata_2020-10.csv.gz"
    family = Family.of(raw, settings, store)
    assert family.names[PROCESSED] == "processed/green/2020/green_tripdata_2020-10.csv.gz.parquet"
    assert family.names[REJECTS] == "rejects/green/2020/green_tripdata_2020-10.csv.gz.parquet"
    assert split_name(family.names[PROCESSED], settings) == (PROCESSED, raw.split("/", 1)[1])
    assert Family.of(family.names[PROCESSED], settings, store).names[RAW] == raw
    parquet = Family.of("processed/green/2024/green_tripdata_2024-01.parquet", settings, store)
    assert parquet.names[RAW] == "raw/green/2024/green_tripdata_2024-01.parquet"
