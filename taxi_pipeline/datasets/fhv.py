"""For-hire vehicle trips (`fhv`): community cars, black cars, limousines.

No fares in any era: the rules are times, zones and the base number. Layouts:

- 2015-2016: `Dispatching_base_num, Pickup_date, locationID` (pickup zone only);
- 2017: `Dispatching_base_num, Pickup_DateTime, DropOff_datetime, PUlocationID,
  DOlocationID`, 2018 adds `SR_Flag`;
- 2019: `dispatching_base_num, pickup_datetime, dropoff_datetime, PULocationID,
  DOLocationID, SR_Flag`;
- 2020 on: `dispatching_base_num, pickup_datetime, dropOff_datetime,
  PUlocationID, DOlocationID, SR_Flag, Affiliated_base_number` (the CSV mirror's
  2019-2021 files, and its fhvhv files of 2021, are in this layout).

Matching ignores case, so the case drift (`dropOff_datetime`, `PUlocationID`)
needs no alias. A missing zone is common (a third of the 2020-04 sample) and is
"not recorded", not wrong: only a zone id the lookup does not have is rejected.
A missing dropoff time is kept for the same reason.
"""

from __future__ import annotations

import pyarrow as pa
import pyarrow.compute as pc

from taxi_pipeline.datasets import quality
from taxi_pipeline.datasets.base import DatasetSpec

FIELDS = (
    pa.field("dispatching_base_num", pa.string()),
    pa.field("pickup_datetime", pa.timestamp("us")),
    pa.field("dropoff_datetime", pa.timestamp("us")),
    pa.field("pickup_location_id", pa.int32()),
    pa.field("dropoff_location_id", pa.int32()),
    # 1 for a shared ride ("N" or empty otherwise in some years): kept as written
    pa.field("sr_flag", pa.string()),
    pa.field("affiliated_base_number", pa.string()),
)

SOURCE_NAMES: dict[str, tuple[str, ...]] = {
    "dispatching_base_num": ("dispatching_base_num", "dispatching_base_number"),
    "pickup_datetime": ("pickup_datetime", "pickup_date"),
    "dropoff_datetime": ("dropoff_datetime",),
    "pickup_location_id": ("pulocationid", "pickup_location_id", "locationid"),
    "dropoff_location_id": ("dolocationid", "dropoff_location_id"),
    "sr_flag": ("sr_flag",),
    "affiliated_base_number": ("affiliated_base_number", "affiliated_base_num"),
}

REQUIRED = ("dispatching_base_num", "pickup_datetime", "pickup_location_id")

RULES = (
    quality.UNPARSEABLE_VALUE,
    quality.MISSING_TIMESTAMP,
    quality.PICKUP_OUTSIDE_MONTH,
    quality.DROPOFF_BEFORE_PICKUP,
    quality.IMPLAUSIBLE_DURATION,
    quality.UNKNOWN_LOCATION,
    quality.INVALID_BASE_NUMBER,
)


def checks(batch: pa.RecordBatch, month: tuple[int, int] | None,
           zones: pa.Array) -> list[tuple[str, pa.Array]]:
    """The FHV rules after `unparseable_value`, in RULES order."""
    return [
        *quality.time_checks(batch, month, dropoff_required=False),
        (quality.UNKNOWN_LOCATION,
         pc.or_(quality.not_a_zone(batch.column("pickup_location_id"), zones,
                                   null_is_unknown=False),
                quality.not_a_zone(batch.column("dropoff_location_id"), zones,
                                   null_is_unknown=False))),
        (quality.INVALID_BASE_NUMBER,
         quality.bad_base_number(batch.column("dispatching_base_num"))),
    ]


FHV = DatasetSpec(
    name="fhv",
    table="fhv_trips",
    data_fields=FIELDS,
    source_names=SOURCE_NAMES,
    required=REQUIRED,
    checks=checks,
    rules=RULES,
    markers=("affiliated_base_number",),
    hints=("dispatching_base_num", "sr_flag"),
    not_with=("hvfhs_license_num", "trip_miles", "driver_pay", "base_passenger_fare"),
    description="for-hire vehicles other than the high-volume companies",
)
