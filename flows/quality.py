"""Row quality rules: each rejected row gets the reason of the first rule it breaks."""

from __future__ import annotations

from datetime import datetime

import pyarrow as pa
import pyarrow.compute as pc

# TLC taxi zones are numbered 1..265 (264 "Unknown" and 265 "Outside of NYC" are
# real zone ids in the lookup table, so they are accepted).
MIN_LOCATION_ID = 1
MAX_LOCATION_ID = 265
# A yellow or green cab seats at most 6 (+ a child on a lap); anything above 9
# is a keying error, and 0 passengers is not a trip (the original tutorial
# dropped those too).
MIN_PASSENGERS = 1
MAX_PASSENGERS = 9

MISSING_TIMESTAMP = "missing_timestamp"
PICKUP_OUTSIDE_MONTH = "pickup_outside_month"
DROPOFF_BEFORE_PICKUP = "dropoff_before_pickup"
NEGATIVE_DISTANCE = "negative_distance"
NEGATIVE_TOTAL = "negative_total"
UNKNOWN_LOCATION = "unknown_location"
IMPOSSIBLE_PASSENGER_COUNT = "impossible_passenger_count"

RULES = (
    MISSING_TIMESTAMP,
    PICKUP_OUTSIDE_MONTH,
    DROPOFF_BEFORE_PICKUP,
    NEGATIVE_DISTANCE,
    NEGATIVE_TOTAL,
    UNKNOWN_LOCATION,
    IMPOSSIBLE_PASSENGER_COUNT,
)


def month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    """[first instant of the month, first instant of the next month)."""
    start = datetime(year, month, 1)
    end = datetime(year + month // 12, month % 12 + 1, 1)
    return start, end


def _true(mask: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Comparisons with null are null; a rule only fires on a definite True."""
    return pc.fill_null(mask, False)


def _outside(values: pa.Array, low: int, high: int) -> pa.Array:
    """True for a missing id or one outside [low, high] (Kleene or: null never hides True)."""
    out_of_range = _true(pc.or_(pc.less(values, low), pc.greater(values, high)))
    return pc.or_kleene(pc.is_null(values), out_of_range)


def reject_reasons(batch: pa.RecordBatch, month: tuple[int, int] | None) -> pa.Array:
    """A string array: null for a good row, else the first broken rule's name.

    `batch` has canonical column names; `month` is the (year, month) the file
    covers, or None when its name does not say (then that rule is skipped).
    """
    pickup = batch.column("pickup_datetime")
    dropoff = batch.column("dropoff_datetime")
    checks: list[tuple[str, pa.Array]] = [
        (MISSING_TIMESTAMP, pc.or_(pc.is_null(pickup), pc.is_null(dropoff))),
    ]
    if month is not None:
        start, end = month_bounds(*month)
        start_s = pa.scalar(start, type=pickup.type)
        end_s = pa.scalar(end, type=pickup.type)
        checks.append(
            (PICKUP_OUTSIDE_MONTH, _true(pc.or_(pc.less(pickup, start_s),
                                                 pc.greater_equal(pickup, end_s))))
        )
    passengers = batch.column("passenger_count")
    checks += [
        (DROPOFF_BEFORE_PICKUP, _true(pc.less(dropoff, pickup))),
        (NEGATIVE_DISTANCE, _true(pc.less(batch.column("trip_distance"), 0))),
        (NEGATIVE_TOTAL, _true(pc.less(batch.column("total_amount"), 0))),
        (
            UNKNOWN_LOCATION,
            pc.or_(
                _outside(batch.column("pickup_location_id"), MIN_LOCATION_ID, MAX_LOCATION_ID),
                _outside(batch.column("dropoff_location_id"), MIN_LOCATION_ID, MAX_LOCATION_ID),
            ),
        ),
        (
            # null passenger_count is "not recorded" (TLC's payment_type 0 rows), not impossible
            IMPOSSIBLE_PASSENGER_COUNT,
            _true(pc.or_(pc.less(passengers, MIN_PASSENGERS),
                         pc.greater(passengers, MAX_PASSENGERS))),
        ),
    ]
    reasons = pa.nulls(batch.num_rows, pa.string())
    # Apply in reverse so the first rule in RULES order wins.
    for name, mask in reversed(checks):
        reasons = pc.if_else(mask, pa.scalar(name, pa.string()), reasons)
    return reasons
