"""Synthetic FHV and high-volume FHV months with each era's real columns and dirt.

Shaped like the real files (see ../shared/data/tlc and the spec modules): TLC's
parquet columns and types, or, for `--format csv.gz`, the layout the CSV.gz
mirror has for that year (fhv: 6 columns in 2019, 7 from 2020; fhvhv: the old
7-column layout in 2019-2020, the FHV layout in 2021). As in `sample_data`,
each dirty row has exactly one defect, so callers know every rule's count.
"""

from __future__ import annotations

from collections import Counter
from datetime import datetime

import numpy as np
import pyarrow as pa

from taxi_pipeline.objects import month_after

# share of rows per defect (each on its own rows)
FHV_DIRT = {"pickup_outside_month": 0.002, "dropoff_before_pickup": 0.001,
            "unknown_location": 0.001, "invalid_base_number": 0.001}
FHVHV_DIRT = {**FHV_DIRT, "negative_component": 0.002, "negative_distance": 0.0005,
              "implausible_distance": 0.0005}
_BASES = np.array(["B02510", "B02764", "B02875", "B02872", "B02617", "B02869", "B02887"])
_LICENSES = np.array(["HV0003", "HV0003", "HV0003", "HV0005", "HV0004"])


def _times(rng: np.random.Generator, year: int, month: int, rows: int
           ) -> tuple[np.ndarray, np.ndarray, np.datetime64, np.datetime64]:
    start = np.datetime64(datetime(year, month, 1), "us")
    end = np.datetime64(datetime(*month_after(year, month), 1), "us")
    span = int((end - start) / np.timedelta64(1, "us"))
    pickup = start + rng.integers(0, span, rows).astype("timedelta64[us]")
    seconds = rng.integers(120, 3_600, rows)
    return pickup, seconds, start, end


def _defects(rng: np.random.Generator, rows: int, shares: dict[str, float]
             ) -> tuple[dict[str, np.ndarray], Counter[str]]:
    order = rng.permutation(rows)
    picked: dict[str, np.ndarray] = {}
    offset = 0
    for reason, share in shares.items():
        count = int(rows * share)
        picked[reason] = order[offset:offset + count]
        offset += count
    return picked, Counter({reason: len(idx) for reason, idx in picked.items()})


def _dirty_times(pickup: np.ndarray, dropoff: np.ndarray, picked: dict[str, np.ndarray],
                 end: np.datetime64) -> None:
    outside = picked["pickup_outside_month"]
    pickup[outside] = end + np.timedelta64(3, "D")
    dropoff[outside] = pickup[outside] + np.timedelta64(600, "s")
    before = picked["dropoff_before_pickup"]
    dropoff[before] = pickup[before] - np.timedelta64(600, "s")


def generate_fhv(year: int, month: int, rows: int, *, csv_layout: bool = False,
                 seed: int = 0) -> tuple[pa.Table, Counter[str]]:
    """An FHV month: 2017-2018, 2019 or 2020-on columns (TLC's parquet and the mirror's
    CSV have the same columns for FHV); a third of the zones not recorded (kept)."""
    del csv_layout  # the same columns either way
    rng = np.random.default_rng(seed)
    pickup, seconds, _, end = _times(rng, year, month, rows)
    dropoff = pickup + seconds.astype("timedelta64[s]").astype("timedelta64[us]")
    picked, expected = _defects(rng, rows, FHV_DIRT)
    _dirty_times(pickup, dropoff, picked, end)
    pu = rng.integers(1, 266, rows)
    do = rng.integers(1, 266, rows)
    zone_missing = rng.random(rows) < 0.3
    zone_missing[picked["unknown_location"]] = False
    pu[picked["unknown_location"]] = 300
    bases = rng.choice(_BASES, rows)
    bases[picked["invalid_base_number"]] = "X0000"
    pu_array = pa.array(pu, mask=zone_missing)
    do_array = pa.array(do, mask=zone_missing)
    if year <= 2018:
        names = ("Dispatching_base_num", "Pickup_DateTime", "DropOff_datetime",
                 "PUlocationID", "DOlocationID")
    elif year == 2019:
        names = ("dispatching_base_num", "pickup_datetime", "dropoff_datetime",
                 "PULocationID", "DOLocationID")
    else:
        names = ("dispatching_base_num", "pickup_datetime", "dropOff_datetime",
                 "PUlocationID", "DOlocationID")
    columns: dict[str, pa.Array] = dict(zip(names, [
        pa.array(bases), pa.array(pickup).cast(pa.timestamp("ns")),
        pa.array(dropoff).cast(pa.timestamp("ns")), pu_array.cast(pa.float64()),
        do_array.cast(pa.float64())], strict=True))
    if year >= 2018:
        columns["SR_Flag"] = pa.array(np.where(rng.random(rows) < 0.05, 1.0, np.nan),
                                      from_pandas=True)
    if year >= 2020:
        columns["Affiliated_base_number"] = pa.array(bases)
    return pa.table(columns), expected


def generate_fhvhv(year: int, month: int, rows: int, *, csv_layout: bool = False,
                   seed: int = 0) -> tuple[pa.Table, Counter[str]]:
    """A high-volume FHV month: TLC's parquet columns (2025 adds cbd_congestion_fee), or
    the mirror's CSV layout of the year (7 columns to 2020, the FHV layout in 2021)."""
    rng = np.random.default_rng(seed)
    pickup, seconds, _, end = _times(rng, year, month, rows)
    dropoff = pickup + seconds.astype("timedelta64[s]").astype("timedelta64[us]")
    shares = FHV_DIRT if csv_layout else FHVHV_DIRT
    picked, expected = _defects(rng, rows, shares)
    _dirty_times(pickup, dropoff, picked, end)
    pu = rng.integers(1, 266, rows)
    do = rng.integers(1, 266, rows)
    pu[picked["unknown_location"]] = 0
    bases = rng.choice(_BASES, rows)
    bases[picked["invalid_base_number"]] = "02510"
    licenses = rng.choice(_LICENSES, rows)
    if csv_layout:
        times = {"pickup_datetime": pa.array(pickup.astype("datetime64[s]")),
                 "dropoff_datetime": pa.array(dropoff.astype("datetime64[s]")),
                 "PULocationID": pa.array(pu), "DOLocationID": pa.array(do)}
        if year >= 2021:
            return pa.table({"dispatching_base_num": pa.array(bases), **times,
                             "SR_Flag": pa.array(np.full(rows, "N")),
                             "Affiliated_base_number": pa.array(bases)}), expected
        return pa.table({"hvfhs_license_num": pa.array(licenses),
                         "dispatching_base_num": pa.array(bases), **times,
                         "SR_Flag": pa.array(np.where(rng.random(rows) < 0.1, "1", ""))}
                        ), expected
    miles = np.round(rng.gamma(2.0, 2.2, rows), 3)
    miles[picked["negative_distance"]] = -miles[picked["negative_distance"]] - 0.1
    miles[picked["implausible_distance"]] = 1_200.5
    fare = np.round(5 + miles * 1.9 + seconds * 0.006, 2)
    fare[picked["negative_component"]] = -np.abs(fare[picked["negative_component"]])
    request = pickup - rng.integers(60, 900, rows).astype("timedelta64[s]").astype(
        "timedelta64[us]")
    on_scene = np.where(licenses == "HV0003", pickup - np.timedelta64(90, "s"),
                        np.datetime64("NaT"))
    int_type = pa.int64() if year <= 2022 else pa.int32()
    columns: dict[str, pa.Array] = {
        "hvfhs_license_num": pa.array(licenses),
        "dispatching_base_num": pa.array(bases),
        "originating_base_num": pa.array(bases, mask=licenses != "HV0003"),
        "request_datetime": pa.array(request).cast(pa.timestamp("us")),
        "on_scene_datetime": pa.array(on_scene).cast(pa.timestamp("us")),
        "pickup_datetime": pa.array(pickup).cast(pa.timestamp("us")),
        "dropoff_datetime": pa.array(dropoff).cast(pa.timestamp("us")),
        "PULocationID": pa.array(pu).cast(int_type),
        "DOLocationID": pa.array(do).cast(int_type),
        "trip_miles": pa.array(miles),
        "trip_time": pa.array(seconds).cast(pa.int64()),
        "base_passenger_fare": pa.array(fare),
        "tolls": pa.array(np.where(rng.random(rows) < 0.05, 6.94, 0.0)),
        "bcf": pa.array(np.round(np.abs(fare) * 0.025, 2)),
        "sales_tax": pa.array(np.round(np.abs(fare) * 0.08875, 2)),
        "congestion_surcharge": pa.array(np.where(rng.random(rows) < 0.6, 2.75, 0.0)),
        "airport_fee": pa.array(np.where(rng.random(rows) < 0.05, 2.5, 0.0)),
        "tips": pa.array(np.where(rng.random(rows) < 0.2, 3.0, 0.0)),
        "driver_pay": pa.array(np.round(np.abs(fare) * 0.75, 2)),
        "shared_request_flag": pa.array(np.where(rng.random(rows) < 0.02, "Y", "N")),
        "shared_match_flag": pa.array(np.full(rows, "N")),
        "access_a_ride_flag": pa.array(np.full(rows, "N")),
        "wav_request_flag": pa.array(np.full(rows, "N")),
        "wav_match_flag": pa.array(np.where(rng.random(rows) < 0.05, "Y", "N")),
    }
    if year >= 2025:
        columns["cbd_congestion_fee"] = pa.array(np.where(rng.random(rows) < 0.3, 1.5, 0.0))
    return pa.table(columns), expected
