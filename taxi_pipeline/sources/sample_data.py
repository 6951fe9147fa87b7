"""Synthetic TLC months with the real schemas and the real dirt.

The TLC site cannot be reached from every machine (CI here has no internet),
so the demo, the tests and the benchmark generate months shaped like TLC's
files: the column names, types and drift of each era, and the dirt real files
carry (zero passengers, negative totals, pickups outside the month, dropoffs
before pickups, unknown zones, nulls). Each dirty row gets exactly one defect,
so callers know how many rows each quality rule must reject.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from taxi_pipeline.objects import month_after, raw_object_name, tlc_file_name

__all__ = ["SampleMonth", "generate_month", "raw_object_name", "tlc_file_name", "write_month"]

Dataset = Literal["yellow", "green", "fhv", "fhvhv"]
# The formats `write_month` writes, by the path's ending.
FORMATS = ("parquet", "csv", "csv.gz")
# The schema eras TLC published: 2019-2022 (double codes, ns times, lower-case or
# no airport fee), 2023-2024 (Airport_fee, integer codes), 2025 (cbd_congestion_fee).
Era = Literal["2019", "2022", "2023", "2024", "2025"]

DIRT_SHARES: dict[str, float] = {
    "impossible_passenger_count": 0.010,
    "negative_total": 0.005,
    "pickup_outside_month": 0.002,
    "dropoff_before_pickup": 0.001,
    "unknown_location": 0.001,
    "negative_distance": 0.0005,
}


@dataclass(frozen=True)
class SampleMonth:
    table: pa.Table
    expected_rejects: Counter[str]

    @property
    def expected_good(self) -> int:
        return self.table.num_rows - sum(self.expected_rejects.values())


def era_of(year: int) -> Era:
    if year <= 2021:
        return "2019"
    if year == 2022:
        return "2022"
    if year == 2023:
        return "2023"
    if year == 2024:
        return "2024"
    return "2025"


def generate_month(
    dataset: Dataset,
    year: int,
    month: int,
    rows: int,
    *,
    era: Era | None = None,
    seed: int = 0,
    file_format: str = "parquet",
) -> SampleMonth:
    """A month of trips in the schema of `era` (default: the era of `year`); fhv and
    fhvhv in their era's columns, the CSV mirror's layout for `file_format` csv/csv.gz."""
    if dataset in ("fhv", "fhvhv"):
        from taxi_pipeline.sources.sample_fhv import generate_fhv, generate_fhvhv

        make = generate_fhv if dataset == "fhv" else generate_fhvhv
        table, rejects = make(year, month, rows, csv_layout=file_format != "parquet",
                              seed=seed)
        return SampleMonth(table, rejects)
    era = era or era_of(year)
    rng = np.random.default_rng(seed)
    start = np.datetime64(datetime(year, month, 1), "us")
    end = np.datetime64(datetime(*month_after(year, month), 1), "us")
    span_us = int((end - start) / np.timedelta64(1, "us"))

    pickup = start + rng.integers(0, span_us, rows).astype("timedelta64[us]")
    duration = rng.integers(60, 3_600, rows).astype("timedelta64[s]").astype("timedelta64[us]")
    dropoff = pickup + duration
    passengers = rng.choice([1, 1, 1, 1, 2, 2, 3, 4, 5, 6], rows).astype("float64")
    distance = np.round(rng.gamma(2.0, 1.6, rows), 2)
    fare = np.round(3.0 + distance * 2.5 + rng.random(rows) * 5, 2)
    tip = np.round(fare * rng.choice([0.0, 0.15, 0.2, 0.25], rows), 2)
    tolls = np.where(rng.random(rows) < 0.05, 6.94, 0.0)
    pu = rng.integers(1, 266, rows)
    do = rng.integers(1, 266, rows)
    payment = rng.choice([1, 1, 1, 2, 3, 4], rows)
    ratecode = rng.choice([1, 1, 1, 1, 1, 1, 2, 5, 99], rows).astype("float64")
    vendor = rng.choice([1, 2, 2, 6, 7], rows) if era == "2025" else rng.choice([1, 2, 2], rows)
    extra = rng.choice([0.0, 0.5, 1.0, 2.5], rows)

    # Exactly one defect per dirty row, on disjoint row sets.
    order = rng.permutation(rows)
    expected: Counter[str] = Counter()
    negative_rows = np.empty(0, dtype=np.int64)
    offset = 0
    for reason, share in DIRT_SHARES.items():
        count = int(rows * share)
        idx = order[offset : offset + count]
        offset += count
        expected[reason] = count
        if reason == "impossible_passenger_count":
            passengers[idx] = 0
        elif reason == "negative_total":
            negative_rows = idx  # a refund: every amount negated, below
        elif reason == "pickup_outside_month":
            # real files carry trips from days, months and years away
            days = rng.choice([-1, -2, -40, 1, 400], count)
            base = np.where(days < 0, start, end)
            pickup[idx] = base + (days * 86_400 - (days < 0) * 3_600).astype("timedelta64[s]")
            dropoff[idx] = pickup[idx] + duration[idx]
            dropoff[idx] = pickup[idx] + duration[idx]
        elif reason == "dropoff_before_pickup":
            dropoff[idx] = pickup[idx] - duration[idx]
        elif reason == "unknown_location":
            pu[idx] = rng.choice([0, 266, 300], count)
        elif reason == "negative_distance":
            distance[idx] = -distance[idx] - 0.1
    # TLC's "payment_type 0" rows: passengers and rate code not recorded (null), still good trips.
    unrecorded = order[offset : offset + int(rows * 0.01)]
    passenger_nulls = np.zeros(rows, dtype=bool)
    passenger_nulls[unrecorded] = True
    payment[unrecorded] = 0

    mta = np.full(rows, 0.5)
    improvement = np.full(rows, 1.0 if year >= 2022 else 0.3)
    congestion = np.where(rng.random(rows) < 0.8, 2.5, 0.0)
    airport = np.where(rng.random(rows) < 0.08, 1.75, 0.0)
    cbd = np.where(rng.random(rows) < 0.4, 0.75, 0.0)
    # TLC records a refund as a row with every amount negated
    for amounts in (fare, extra, mta, tip, tolls, improvement, congestion):
        amounts[negative_rows] = -amounts[negative_rows]
    total = np.round(fare + extra + mta + tip + tolls + improvement + congestion, 2)

    double_codes = era in ("2019", "2022", "2025")
    code_type = pa.float64() if double_codes else pa.int64()
    time_unit = "ns" if era in ("2019", "2022") else "us"
    id_type = pa.int64() if era in ("2019", "2022") else pa.int32()
    prefix = "tpep" if dataset == "yellow" else "lpep"

    def codes(values: np.ndarray, mask: np.ndarray | None = None) -> pa.Array:
        return pa.array(values, mask=mask).cast(code_type)

    columns: dict[str, pa.Array] = {
        "VendorID": pa.array(vendor).cast(id_type),
        f"{prefix}_pickup_datetime": pa.array(pickup).cast(pa.timestamp(time_unit)),
        f"{prefix}_dropoff_datetime": pa.array(dropoff).cast(pa.timestamp(time_unit)),
    }
    if dataset == "green":
        columns["store_and_fwd_flag"] = pa.array(np.where(rng.random(rows) < 0.01, "Y", "N"))
        columns["RatecodeID"] = codes(ratecode, passenger_nulls)
        columns["PULocationID"] = pa.array(pu).cast(id_type)
        columns["DOLocationID"] = pa.array(do).cast(id_type)
        columns["passenger_count"] = codes(passengers, passenger_nulls)
        columns["trip_distance"] = pa.array(distance)
    else:
        columns["passenger_count"] = codes(passengers, passenger_nulls)
        columns["trip_distance"] = pa.array(distance)
        columns["RatecodeID"] = codes(ratecode, passenger_nulls)
        columns["store_and_fwd_flag"] = pa.array(
            np.where(rng.random(rows) < 0.01, "Y", "N"), mask=passenger_nulls
        )
        columns["PULocationID"] = pa.array(pu).cast(id_type)
        columns["DOLocationID"] = pa.array(do).cast(id_type)
        columns["payment_type"] = pa.array(payment).cast(pa.int64())
    columns.update(
        {
            "fare_amount": pa.array(fare),
            "extra": pa.array(extra),
            "mta_tax": pa.array(mta),
            "tip_amount": pa.array(tip),
            "tolls_amount": pa.array(tolls),
        }
    )
    if dataset == "green":
        columns["ehail_fee"] = pa.nulls(rows, pa.float64())
    columns["improvement_surcharge"] = pa.array(improvement)
    columns["total_amount"] = pa.array(total)
    if dataset == "green":
        columns["payment_type"] = pa.array(payment).cast(pa.float64())
        columns["trip_type"] = pa.array(rng.choice([1.0, 1.0, 2.0], rows))
    columns["congestion_surcharge"] = pa.array(congestion)
    if dataset == "yellow" and era == "2022":
        columns["airport_fee"] = pa.array(airport)
    elif dataset == "yellow" and era in ("2023", "2024", "2025"):
        columns["Airport_fee"] = pa.array(airport)
    if era == "2025":
        columns["cbd_congestion_fee"] = pa.array(cbd)
    return SampleMonth(pa.table(columns), expected)


def format_of_path(path: Path) -> str:
    name = path.name.lower()
    return "csv.gz" if name.endswith(".gz") else "csv" if name.endswith(".csv") else "parquet"


def write_month(sample: SampleMonth, path: Path, row_group_rows: int = 1_000_000) -> Path:
    """Write like TLC does: snappy parquet, large row groups; or, for a path ending in
    .csv or .csv.gz, a (gzipped) CSV with a header, as the CSV mirror has."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file_format = format_of_path(path)
    if file_format == "parquet":
        pq.write_table(sample.table, path, compression="snappy", row_group_size=row_group_rows)
    else:
        # TLC's CSVs have whole seconds (2020-04-24 08:20:17)
        table = sample.table
        for index, field in enumerate(table.schema):
            if pa.types.is_timestamp(field.type):
                table = table.set_column(index, field.name,
                                         table.column(index).cast(pa.timestamp("s"), safe=False))
        if file_format == "csv.gz":
            with pa.CompressedOutputStream(str(path), "gzip") as out:
                pcsv.write_csv(table, out)
        else:
            pcsv.write_csv(table, path)
    return path
