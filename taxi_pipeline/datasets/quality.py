"""Row quality rules of the `trips` datasets (yellow, green), and the building blocks
every dataset's rules share: each rejected row gets the reason of the first rule it breaks.

The order of RULES is the precedence: a value that could not be parsed first
(its cell is null, so later rules would blame the wrong thing), then time,
distance, money, place, passengers; each "implausible" rule right after the
"negative" one on the same column.

Deliberately not rules (kept, queryable in the warehouse):
- `trip_distance = 0 AND fare_amount > 0`: TLC has many legitimate ones (JFK
  and negotiated flat rates, time-only meter, odometer not reporting): 5 % of
  green 2024-01. Nothing in the row tells the impossible ones apart.
- RatecodeID 99 ("null/unknown" in TLC's dictionary) is a value, not a broken
  trip: the transform turns it into null (taxi_pipeline.datasets.schema.NULL_CODES).
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pyarrow as pa
import pyarrow.compute as pc

from taxi_pipeline.objects import month_after

# TLC taxi zones are numbered 1..265 (264 "Unknown" and 265 "Outside of NYC" are
# real zone ids in the lookup table, so they are accepted). The location rule checks
# against the zone lookup itself (taxi_pipeline.datasets.zones); these bounds are
# what TLC's lookup has held since 2017.
MIN_LOCATION_ID = 1
MAX_LOCATION_ID = 265
# A yellow or green cab seats at most 6 (+ a child on a lap); anything above 9
# is a keying error, and 0 passengers is not a trip (the original tutorial
# dropped those too).
MIN_PASSENGERS = 1
MAX_PASSENGERS = 9
# No single fare lasts a day (a driver's shift is 12 h): a trip of over 24 h is
# a meter left running or a clock error.
MAX_DURATION = timedelta(hours=24)
# NYC to Boston is ~215 miles, to Washington ~230: a cab trip past 500 miles is
# an odometer error (120,098 and 201,421 miles are in real files).
MAX_DISTANCE_MILES = 500.0
# The parts of total_amount. One of them negative while the total is positive
# is neither a trip nor a refund (TLC negates every amount for a refund).
FARE_COMPONENTS = (
    "fare_amount",
    "extra",
    "mta_tax",
    "tip_amount",
    "tolls_amount",
    "improvement_surcharge",
    "congestion_surcharge",
    "airport_fee",
    "cbd_congestion_fee",
)

UNPARSEABLE_VALUE = "unparseable_value"
MISSING_TIMESTAMP = "missing_timestamp"
PICKUP_OUTSIDE_MONTH = "pickup_outside_month"
DROPOFF_BEFORE_PICKUP = "dropoff_before_pickup"
IMPLAUSIBLE_DURATION = "implausible_duration"
NEGATIVE_DISTANCE = "negative_distance"
IMPLAUSIBLE_DISTANCE = "implausible_distance"
NEGATIVE_TOTAL = "negative_total"
NEGATIVE_COMPONENT = "negative_component"
UNKNOWN_LOCATION = "unknown_location"
IMPOSSIBLE_PASSENGER_COUNT = "impossible_passenger_count"
# For-hire rows: a dispatching base number that is not TLC's `B` + 5 digits.
INVALID_BASE_NUMBER = "invalid_base_number"
# A CSV line with more or fewer cells than the header: no column can be trusted.
MALFORMED_ROW = "malformed_row"

RULES = (
    UNPARSEABLE_VALUE,
    MISSING_TIMESTAMP,
    PICKUP_OUTSIDE_MONTH,
    DROPOFF_BEFORE_PICKUP,
    IMPLAUSIBLE_DURATION,
    NEGATIVE_DISTANCE,
    IMPLAUSIBLE_DISTANCE,
    NEGATIVE_TOTAL,
    NEGATIVE_COMPONENT,
    UNKNOWN_LOCATION,
    IMPOSSIBLE_PASSENGER_COUNT,
)


def month_bounds(year: int, month: int) -> tuple[datetime, datetime]:
    """[first instant of the month, first instant of the next month)."""
    return datetime(year, month, 1), datetime(*month_after(year, month), 1)


def _true(mask: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """Comparisons with null are null; a rule only fires on a definite True."""
    return pc.fill_null(mask, False)


def _outside(values: pa.Array, low: int, high: int) -> pa.Array:
    """True for a missing id or one outside [low, high] (Kleene or: null never hides True)."""
    out_of_range = _true(pc.or_(pc.less(values, low), pc.greater(values, high)))
    return pc.or_kleene(pc.is_null(values), out_of_range)


def true_only(mask: pa.Array | pa.ChunkedArray) -> pa.Array | pa.ChunkedArray:
    """A rule fires on a definite True only (a comparison with null is null)."""
    return _true(mask)


def not_a_zone(values: pa.Array, zones: pa.Array, *, null_is_unknown: bool = True) -> pa.Array:
    """True for an id that is not in the zone lookup (`zones`); a missing id counts
    as unknown unless `null_is_unknown` is False (FHV records often lack a zone)."""
    unknown = pc.invert(pc.is_in(values, value_set=zones, skip_nulls=True))
    if null_is_unknown:
        return pc.or_kleene(pc.is_null(values), _true(unknown))
    return _true(pc.and_(pc.is_valid(values), unknown))


def first_broken(checks: list[tuple[str, pa.Array]], rows: int) -> pa.Array:
    """A string array: null for a row that breaks no check, else the first one's name.

    The index of each row's first broken check (applied in reverse, so the first
    in order wins), then its name: int8 selects are half the cost of string ones,
    and the names are built once.
    """
    codes = pa.nulls(rows, pa.int8())
    for index, (_, mask) in reversed(list(enumerate(checks))):
        codes = pc.if_else(mask, pa.scalar(index, pa.int8()), codes)
    return pc.take(pa.array([name for name, _ in checks], pa.string()), codes)


def time_checks(batch: pa.RecordBatch, month: tuple[int, int] | None, *,
                dropoff_required: bool = True) -> list[tuple[str, pa.Array]]:
    """Missing times, a pickup outside the file's month, a dropoff before the pickup,
    a trip of over a day: the rules every dataset shares, in this order.

    Without `dropoff_required` only a missing pickup is `missing_timestamp` (FHV
    bases did not have to report dropoffs in every era).
    """
    pickup = batch.column("pickup_datetime")
    dropoff = batch.column("dropoff_datetime")
    missing = pc.is_null(pickup)
    if dropoff_required:
        missing = pc.or_(missing, pc.is_null(dropoff))
    checks: list[tuple[str, pa.Array]] = [(MISSING_TIMESTAMP, missing)]
    if month is not None:
        start, end = month_bounds(*month)
        start_s = pa.scalar(start, type=pickup.type)
        end_s = pa.scalar(end, type=pickup.type)
        checks.append(
            (PICKUP_OUTSIDE_MONTH, _true(pc.or_(pc.less(pickup, start_s),
                                                 pc.greater_equal(pickup, end_s)))))
    longest = pa.scalar(MAX_DURATION, pa.duration(pickup.type.unit))
    checks += [
        (DROPOFF_BEFORE_PICKUP, _true(pc.less(dropoff, pickup))),
        (IMPLAUSIBLE_DURATION, _true(pc.greater(pc.subtract(dropoff, pickup), longest))),
    ]
    return checks


# TLC licenses for-hire bases as `B` and five digits (B02510 is Uber's, B02764 ...).
BASE_NUMBER = r"^[Bb]\d{5}$"


def bad_base_number(values: pa.Array) -> pa.Array:
    """True for a dispatching base number that is missing or not `B` + 5 digits."""
    text = pc.utf8_trim_whitespace(pc.cast(values, pa.string()))
    return pc.fill_null(pc.invert(pc.match_substring_regex(text, BASE_NUMBER)), True)


def any_negative(batch: pa.RecordBatch, columns: tuple[str, ...]) -> pa.Array:
    """True where one of `columns` holds a negative amount."""
    negative = pa.repeat(pa.scalar(False), batch.num_rows)
    for name in columns:
        negative = pc.or_(negative, _true(pc.less(batch.column(name), 0)))
    return negative


def _negative_component(batch: pa.RecordBatch) -> pa.Array:
    total_positive = _true(pc.greater(batch.column("total_amount"), 0))
    return pc.and_(total_positive, any_negative(batch, FARE_COMPONENTS))


def reject_reasons(
    batch: pa.RecordBatch,
    month: tuple[int, int] | None,
    unparseable: pa.Array | None = None,
    zones: pa.Array | None = None,
) -> pa.Array:
    """A string array: null for a good row, else the first broken rule's name (trips).

    `batch` has canonical column names; `month` is the (year, month) the file
    covers, or None when unknown (then that rule is skipped); `unparseable`
    marks the rows where a source value could not be converted (now null);
    `zones` the valid zone ids (default: TLC's zone lookup).
    """
    checks: list[tuple[str, pa.Array]] = []
    if unparseable is not None:
        checks.append((UNPARSEABLE_VALUE, _true(unparseable)))
    checks += trip_checks(batch, month, zones if zones is not None else _default_zones())
    return first_broken(checks, batch.num_rows)


def _default_zones() -> pa.Array:
    from taxi_pipeline.datasets.zones import zone_ids

    return zone_ids()


def trip_checks(batch: pa.RecordBatch, month: tuple[int, int] | None,
                zones: pa.Array) -> list[tuple[str, pa.Array]]:
    """The yellow and green rules after `unparseable_value`, in RULES order."""
    passengers = batch.column("passenger_count")
    distance = batch.column("trip_distance")
    return [
        *time_checks(batch, month),
        (NEGATIVE_DISTANCE, _true(pc.less(distance, 0))),
        (IMPLAUSIBLE_DISTANCE, _true(pc.greater(distance, MAX_DISTANCE_MILES))),
        (NEGATIVE_TOTAL, _true(pc.less(batch.column("total_amount"), 0))),
        (NEGATIVE_COMPONENT, _negative_component(batch)),
        (
            UNKNOWN_LOCATION,
            pc.or_(not_a_zone(batch.column("pickup_location_id"), zones),
                   not_a_zone(batch.column("dropoff_location_id"), zones)),
        ),
        (
            # null passenger_count is "not recorded" (TLC's payment_type 0 rows), not impossible
            IMPOSSIBLE_PASSENGER_COUNT,
            _true(pc.or_(pc.less(passengers, MIN_PASSENGERS),
                         pc.greater(passengers, MAX_PASSENGERS))),
        ),
    ]
