"""Yellow taxi trips (`tpep_*` times): the `trips` table, shared with green."""

from __future__ import annotations

from taxi_pipeline.datasets.base import DatasetSpec
from taxi_pipeline.datasets.quality import RULES, trip_checks
from taxi_pipeline.datasets.schema import (
    NULL_CODES,
    REQUIRED_COLUMNS,
    SOURCE_NAMES,
    TRIP_DATA_FIELDS,
)

YELLOW = DatasetSpec(
    name="yellow",
    table="trips",
    data_fields=TRIP_DATA_FIELDS,
    source_names=SOURCE_NAMES,
    required=REQUIRED_COLUMNS,
    checks=trip_checks,
    rules=RULES,
    markers=("tpep_pickup_datetime", "tpep_dropoff_datetime"),
    hints=("airport_fee",),
    null_codes=NULL_CODES,
    uses_table_setting=True,
    description="yellow medallion taxis (street hails anywhere in NYC)",
)
