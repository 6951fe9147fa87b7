"""Green taxi trips (`lpep_*` times, trip_type, ehail_fee): the `trips` table."""

from __future__ import annotations

from taxi_pipeline.datasets.base import DatasetSpec
from taxi_pipeline.datasets.quality import RULES, trip_checks
from taxi_pipeline.datasets.schema import (
    NULL_CODES,
    REQUIRED_COLUMNS,
    SOURCE_NAMES,
    TRIP_DATA_FIELDS,
)

GREEN = DatasetSpec(
    name="green",
    table="trips",
    data_fields=TRIP_DATA_FIELDS,
    source_names=SOURCE_NAMES,
    required=REQUIRED_COLUMNS,
    checks=trip_checks,
    rules=RULES,
    markers=("lpep_pickup_datetime", "lpep_dropoff_datetime"),
    hints=("trip_type", "ehail_fee"),
    null_codes=NULL_CODES,
    uses_table_setting=True,
    description="green boro taxis (street hails outside Manhattan's core)",
)
