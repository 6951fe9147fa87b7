"""High-volume for-hire trips (`fhvhv`: Uber, Lyft, Via, Juno), from 2019-02.

About 20M rows and 0.5 GB a month, the largest dataset by far. Layouts:

- TLC's parquet (2019-02 on): `hvfhs_license_num, dispatching_base_num,
  originating_base_num, request_datetime, on_scene_datetime, pickup_datetime,
  dropoff_datetime, PULocationID, DOLocationID, trip_miles, trip_time,
  base_passenger_fare, tolls, bcf, sales_tax, congestion_surcharge,
  airport_fee, tips, driver_pay, shared_request_flag, shared_match_flag,
  access_a_ride_flag, wav_request_flag, wav_match_flag`; 2025 adds
  `cbd_congestion_fee`.
- TLC's original 2019-2020 CSVs (and the CSV mirror's of 2019-2020): the
  7-column `hvfhs_license_num, dispatching_base_num, pickup_datetime,
  dropoff_datetime, PULocationID, DOLocationID, SR_Flag`.
- The CSV mirror's 2021 fhvhv files: the FHV layout (`dispatching_base_num ...
  SR_Flag, Affiliated_base_number`, no license number), hence
  `reads_layouts_of=("fhv",)`.

Fares and pay exist, so a negative component, an implausible distance and
duration apply; zones are always recorded, so a missing one is unknown.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from taxi_pipeline.datasets import quality
from taxi_pipeline.datasets.base import DatasetSpec

_MONEY = ("base_passenger_fare", "tolls", "bcf", "sales_tax", "congestion_surcharge",
          "airport_fee", "tips", "driver_pay", "cbd_congestion_fee")
_FLAGS = ("shared_request_flag", "shared_match_flag", "access_a_ride_flag",
          "wav_request_flag", "wav_match_flag")

FIELDS = (
    pa.field("hvfhs_license_num", pa.string()),
    pa.field("dispatching_base_num", pa.string()),
    pa.field("originating_base_num", pa.string()),
    pa.field("request_datetime", pa.timestamp("us")),
    pa.field("on_scene_datetime", pa.timestamp("us")),
    pa.field("pickup_datetime", pa.timestamp("us")),
    pa.field("dropoff_datetime", pa.timestamp("us")),
    pa.field("pickup_location_id", pa.int32()),
    pa.field("dropoff_location_id", pa.int32()),
    pa.field("trip_miles", pa.float64()),
    pa.field("trip_time", pa.int32()),  # seconds
    *(pa.field(name, pa.float64()) for name in _MONEY),
    *(pa.field(name, pa.string()) for name in _FLAGS),
    pa.field("sr_flag", pa.string()),
    pa.field("affiliated_base_number", pa.string()),
)

SOURCE_NAMES: dict[str, tuple[str, ...]] = {
    **{f.name: (f.name,) for f in FIELDS},
    "pickup_location_id": ("pulocationid", "pickup_location_id"),
    "dropoff_location_id": ("dolocationid", "dropoff_location_id"),
    "affiliated_base_number": ("affiliated_base_number", "affiliated_base_num"),
}

REQUIRED = ("dispatching_base_num", "pickup_datetime", "dropoff_datetime",
            "pickup_location_id", "dropoff_location_id")

RULES = (
    quality.UNPARSEABLE_VALUE,
    quality.MISSING_TIMESTAMP,
    quality.PICKUP_OUTSIDE_MONTH,
    quality.DROPOFF_BEFORE_PICKUP,
    quality.IMPLAUSIBLE_DURATION,
    quality.NEGATIVE_DISTANCE,
    quality.IMPLAUSIBLE_DISTANCE,
    quality.NEGATIVE_COMPONENT,
    quality.UNKNOWN_LOCATION,
    quality.INVALID_BASE_NUMBER,
)


def checks(batch: pa.RecordBatch, month: tuple[int, int] | None,
           zones: pa.Array) -> list[tuple[str, pa.Array]]:
    """The fhvhv rules after `unparseable_value`, in RULES order."""
    miles = batch.column("trip_miles")
    return [
        *quality.time_checks(batch, month),
        (quality.NEGATIVE_DISTANCE, quality.true_only(pc.less(miles, 0))),
        (quality.IMPLAUSIBLE_DISTANCE,
         quality.true_only(pc.greater(miles, quality.MAX_DISTANCE_MILES))),
        (quality.NEGATIVE_COMPONENT, quality.any_negative(batch, _MONEY)),
        (quality.UNKNOWN_LOCATION,
         pc.or_(quality.not_a_zone(batch.column("pickup_location_id"), zones),
                quality.not_a_zone(batch.column("dropoff_location_id"), zones))),
        (quality.INVALID_BASE_NUMBER,
         quality.bad_base_number(batch.column("dispatching_base_num"))),
    ]


FHVHV = DatasetSpec(
    name="fhvhv",
    table="fhvhv_trips",
    data_fields=FIELDS,
    source_names=SOURCE_NAMES,
    required=REQUIRED,
    checks=checks,
    rules=RULES,
    markers=("hvfhs_license_num", "trip_miles", "driver_pay", "base_passenger_fare"),
    reads_layouts_of=("fhv",),
    description="high-volume for-hire services (Uber, Lyft, Via, Juno)",
)
