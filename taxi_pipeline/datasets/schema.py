"""The yellow and green (`trips`) schemas we accept and the canonical one we write.

The `trips` contract (one table for yellow and green) is defined here and used
by the `yellow` and `green` specs (taxi_pipeline.datasets.yellow/green); the
other datasets have their own modules. See taxi_pipeline.datasets.registry.

TLC files changed over the years: `Airport_fee` vs `airport_fee`, integer vs
double `passenger_count`/`RatecodeID`, `cbd_congestion_fee` from 2025, `tpep_`
(yellow) vs `lpep_` (green) timestamps, snake_case copies in the wild. Each
canonical column lists every source spelling; matching ignores case.
"""

from __future__ import annotations

import pyarrow as pa

CANONICAL_SCHEMA = pa.schema(
    [
        pa.field("taxi_type", pa.string(), nullable=False),
        pa.field("vendor_id", pa.int32()),
        pa.field("pickup_datetime", pa.timestamp("us")),
        pa.field("dropoff_datetime", pa.timestamp("us")),
        pa.field("passenger_count", pa.int32()),
        pa.field("trip_distance", pa.float64()),
        pa.field("ratecode_id", pa.int32()),
        pa.field("store_and_fwd_flag", pa.string()),
        pa.field("pickup_location_id", pa.int32()),
        pa.field("dropoff_location_id", pa.int32()),
        pa.field("payment_type", pa.int32()),
        pa.field("trip_type", pa.int32()),
        pa.field("fare_amount", pa.float64()),
        pa.field("extra", pa.float64()),
        pa.field("mta_tax", pa.float64()),
        pa.field("tip_amount", pa.float64()),
        pa.field("tolls_amount", pa.float64()),
        pa.field("ehail_fee", pa.float64()),
        pa.field("improvement_surcharge", pa.float64()),
        pa.field("congestion_surcharge", pa.float64()),
        pa.field("airport_fee", pa.float64()),
        pa.field("cbd_congestion_fee", pa.float64()),
        pa.field("total_amount", pa.float64()),
        # lineage
        pa.field("source_uri", pa.string(), nullable=False),
        pa.field("source_generation", pa.int64(), nullable=False),
        pa.field("ingested_at", pa.timestamp("us", tz="UTC"), nullable=False),
    ]
)

# `reject_reason` is one of taxi_pipeline.datasets.quality.RULES (a short, groupable code);
# `reject_detail` says more where the reason alone cannot: for
# `unparseable_value` it names each bad column and its raw text
# (`passenger_count='abc'; pickup_datetime='13/45/2024'`), else it is null.
REJECTS_SCHEMA = CANONICAL_SCHEMA.append(
    pa.field("reject_reason", pa.string(), nullable=False)
).append(pa.field("reject_detail", pa.string()))

LINEAGE_COLUMNS = ("taxi_type", "source_uri", "source_generation", "ingested_at")
TRIP_DATA_FIELDS = tuple(f for f in CANONICAL_SCHEMA if f.name not in LINEAGE_COLUMNS)

# The datasets this schema describes (fhv and fhvhv have specs of their own).
DATASETS = ("yellow", "green")

# TLC times are New York wall-clock times; a file whose times carry a zone is
# converted to this zone's wall clock.
TLC_TIME_ZONE = "America/New_York"

# Codes TLC's data dictionary defines as "null/unknown": they become SQL null,
# so `GROUP BY ratecode_id` and joins to the rate lookup do not show a fake
# rate. The trip itself is kept: its times, places and fares are fine (1.2 %
# of a 2025 yellow sample carries RatecodeID 99).
NULL_CODES: dict[str, int] = {"ratecode_id": 99}

# canonical name -> accepted source names (lower case)
SOURCE_NAMES: dict[str, tuple[str, ...]] = {
    "vendor_id": ("vendorid", "vendor_id"),
    "pickup_datetime": ("tpep_pickup_datetime", "lpep_pickup_datetime", "pickup_datetime"),
    "dropoff_datetime": ("tpep_dropoff_datetime", "lpep_dropoff_datetime", "dropoff_datetime"),
    "passenger_count": ("passenger_count",),
    "trip_distance": ("trip_distance",),
    "ratecode_id": ("ratecodeid", "rate_code_id", "ratecode_id"),
    "store_and_fwd_flag": ("store_and_fwd_flag",),
    "pickup_location_id": ("pulocationid", "pickup_location_id"),
    "dropoff_location_id": ("dolocationid", "dropoff_location_id"),
    "payment_type": ("payment_type",),
    "trip_type": ("trip_type",),
    "fare_amount": ("fare_amount",),
    "extra": ("extra",),
    "mta_tax": ("mta_tax",),
    "tip_amount": ("tip_amount",),
    "tolls_amount": ("tolls_amount",),
    "ehail_fee": ("ehail_fee",),
    "improvement_surcharge": ("improvement_surcharge",),
    "congestion_surcharge": ("congestion_surcharge",),
    "airport_fee": ("airport_fee",),
    "cbd_congestion_fee": ("cbd_congestion_fee",),
    "total_amount": ("total_amount",),
}

# Without these a row cannot be placed in time and space or valued: the file is
# not trip data we can load.
REQUIRED_COLUMNS = (
    "pickup_datetime",
    "dropoff_datetime",
    "pickup_location_id",
    "dropoff_location_id",
    "trip_distance",
    "total_amount",
)


from taxi_pipeline.datasets.base import SchemaMismatch  # noqa: E402  (re-exported)

__all__ = ["CANONICAL_SCHEMA", "REJECTS_SCHEMA", "SchemaMismatch", "resolve_columns"]


def resolve_columns(source: pa.Schema) -> dict[str, str]:
    """Map canonical column -> the source file's column name, ignoring case.

    Raises SchemaMismatch naming the missing required columns and what the file has.
    """
    by_lower = {name.lower(): name for name in source.names}
    mapping: dict[str, str] = {}
    for canonical, candidates in SOURCE_NAMES.items():
        for candidate in candidates:
            if candidate in by_lower:
                mapping[canonical] = by_lower[candidate]
                break
    missing = [c for c in REQUIRED_COLUMNS if c not in mapping]
    if missing:
        wanted = ", ".join(f"{c} (one of {'/'.join(SOURCE_NAMES[c])})" for c in missing)
        raise SchemaMismatch(
            f"missing required columns: {wanted}; the file has: {', '.join(source.names)}"
        )
    return mapping
