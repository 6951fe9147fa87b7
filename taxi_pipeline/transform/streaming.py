"""Stream a raw TLC file (parquet, CSV or gzipped CSV) into its dataset's canonical
schema, batch by batch.

No Prefect here: the flow wraps this, the benchmark and the unit tests call it
directly. Memory is bounded by one batch (`batch_rows`) plus the rows buffered
for one output row group (see `ROW_GROUP_BYTES`), whatever the file size.

The dataset (name, else columns) picks the spec (taxi_pipeline.datasets.registry):
its canonical columns, aliases, required columns and rules. CSV is read with
pyarrow's streaming reader, every used column as text, and converted by the
spec's types exactly as parquet text cells are: a cell that does not parse
rejects its row (`unparseable_value`, with the column and the text), never a
type guessed from the first rows.
"""

from __future__ import annotations

import csv
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pcsv
import pyarrow.parquet as pq

from taxi_pipeline.datasets import quality
from taxi_pipeline.datasets.base import DatasetSpec, SchemaMismatch
from taxi_pipeline.datasets.quality import month_bounds
from taxi_pipeline.datasets.registry import (
    DATASETS,
    SPECS,
    dataset_from_columns,
    layout_conflict,
    spec_for,
)
from taxi_pipeline.datasets.schema import (
    CANONICAL_SCHEMA,
    LINEAGE_COLUMNS,
    TLC_TIME_ZONE,
)
from taxi_pipeline.datasets.yellow import YELLOW
from taxi_pipeline.datasets.zones import zone_ids
from taxi_pipeline.lineage import lineage_metadata

_INT32_LIMIT = 2**31 - 1

# Output row groups are sized by their bytes ON DISK: BigQuery's guidance for
# parquet loads is row groups of at least 16 MiB (smaller ones slow loads and
# queries), and at most 128 MiB. A canonical row is ~140 bytes in Arrow memory
# and ~25 on disk (snappy), so a 17 MiB group is ~700k rows, ~95 MiB while it
# is buffered. The first group of a file closes at ROW_GROUP_DISK_BYTES x
# ARROW_PER_DISK_BYTE of Arrow memory; later ones at the row count the bytes per
# row written so far predict. ROW_GROUP_BYTES (Arrow memory) and ROW_GROUP_ROWS
# bound a group whatever the data (a highly compressible file gets smaller groups
# rather than more memory). Groups are written in the reading thread, with the
# current batch released first, so memory is one group plus one batch and the
# reader: a writer thread overlapping the next group doubled the buffer (measured
# on the 3M-row month, 2026-12-06: 100 MiB groups peaked at 601 MiB with the
# thread, 482 without; the target is <= 0.3x of the pandas path's ~1,500 MiB).
ROW_GROUP_DISK_BYTES = 17 * 2**20
ROW_GROUP_MIN_DISK_BYTES = 16 * 2**20
ROW_GROUP_MAX_DISK_BYTES = 128 * 2**20
ARROW_PER_DISK_BYTE = 5.6
ROW_GROUP_ROWS = 4 * 1_048_576
ROW_GROUP_BYTES = 128 * 2**20

# Encoding (measured on a 514k-row group): dictionary pages for the nearly
# unique timestamps only fill up and fall back to plain, and min/max of the
# per-file constant strings and the Y/N flag help no query; skipping both
# writes a group in 0.13 s instead of 0.175 s, and 4 % smaller. Every other
# column keeps both.
# The same choice for every dataset: plain pages for its (naive) timestamps, no
# statistics for the per-file constants and the Y/N flags.
_NO_STATISTICS = ("taxi_type", "source_uri")

# Said in every "what is this file" reason, so a person knows what to upload instead.
SUPPORTED_FORMATS = (".parquet, .csv and .csv.gz, named <dataset>_tripdata_YYYY-MM.<ext> "
                     "(yellow, green, fhv, fhvhv)")


def _write_options(spec: DatasetSpec) -> dict[str, Any]:
    plain = {f.name for f in spec.data_fields
             if pa.types.is_timestamp(f.type) and f.type.tz is None}
    no_stats = {*_NO_STATISTICS, *(f.name for f in spec.data_fields
                                   if pa.types.is_string(f.type) and f.name.endswith("flag"))}
    names = spec.rejects_schema.names
    return {"compression": "snappy",
            "use_dictionary": [name for name in names if name not in plain],
            "write_statistics": [name for name in names if name not in no_stats]}


_WRITE_OPTIONS = _write_options(YELLOW)

# Parsing text cells. What pyarrow's string->double cast accepts, as a regex,
# so a batch with one bad cell parses its good cells exactly as a clean batch.
_NUMBER = r"(?i)^[+-]?((\d+\.?\d*|\.\d+)(e[+-]?\d+)?|nan|inf|infinity)$"
# Times: ISO (what the cast accepts) and the US format of NYC Open Data's CSV
# exports (01/15/2024 08:30:00 AM); fractions of a second and a zone suffix are
# split off first (strptime has neither), then added back.
_TIME_FORMATS = (
    "%Y-%m-%d %H:%M:%S", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M",
    "%Y-%m-%d %H", "%Y-%m-%dT%H", "%Y-%m-%d",
    "%m/%d/%Y %I:%M:%S %p", "%m/%d/%Y %I:%M %p", "%m/%d/%Y %H:%M:%S", "%m/%d/%Y %H:%M",
)
# (nanoseconds, as pandas writes them, are cut to microseconds)
_TIME_PARTS = (r"^(?P<base>.*?\d:\d{2}(?::\d{2})?)(?P<fraction>\.\d{1,9})?"
               r"(?P<zone>Z|[+-]\d{2}:?\d{2})?$")
_HAS_PARTS = r"\d\.\d|\d(?:Z|[+-]\d{2}:?\d{2})$"
_ZONE = r"^(?P<sign>[+-])(?P<hours>\d{2}):?(?P<minutes>\d{2})$"
# strptime rolls 2024-02-30 over to March 1st: the written day must survive.
_WRITTEN_DAY = r"^(?:\d{4}-\d{1,2}-(?P<iso>\d{1,2})|\d{1,2}/(?P<us>\d{1,2})/\d{4})"
# How much of a bad cell `reject_detail` quotes.
_DETAIL_CHARS = 40
# A month is the file's month when it holds more than this share of the pickups.
MONTH_MAJORITY = 0.5


class BadInputFile(ValueError):
    """The file as a whole cannot be transformed; it goes to quarantine with this reason."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class TransformStats:
    """Counts, and what the transform took the file to be (and from where).

    `taxi_type_source` is `name` or `schema`; `month_source` is `name`, `data`
    or None (no pickup time in any row: nothing to check). `month_share` is the
    share of rows with a pickup time that fall in `month`; `month_conflict`
    says the name's month holds less than half of them (a misnamed file).
    """

    rows_in: int = 0
    rows_out: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    batches: int = 0
    taxi_type: str = ""
    taxi_type_source: str = ""
    dataset_from_schema: str | None = None
    dataset_conflict: bool = False
    month: tuple[int, int] | None = None
    month_source: str | None = None
    month_from_data: tuple[int, int] | None = None
    month_share: float = 0.0
    month_conflict: bool = False
    # canonical column -> cells that could not be parsed (their rows: unparseable_value)
    unparseable: Counter[str] = field(default_factory=Counter)
    # canonical column -> TLC "unknown" codes turned into null (RatecodeID 99)
    codes_nulled: Counter[str] = field(default_factory=Counter)
    row_groups_out: int = 0
    # On-disk bytes of each processed row group (BigQuery wants >= 16 MiB).
    row_group_disk_bytes: list[int] = field(default_factory=list)

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())

    @property
    def taxi_type_inferred(self) -> bool:
        return self.taxi_type_source == "schema"

    @property
    def month_inferred(self) -> bool:
        return self.month_source == "data"


@dataclass(frozen=True)
class SourceFacts:
    """What a file says about itself, whatever its name."""

    dataset_from_schema: str | None
    month_from_data: tuple[int, int] | None  # the month holding most pickups
    month_share: float  # its share of the rows with a pickup time
    pickups: int  # rows with a pickup time
    rows: int


@dataclass(frozen=True)
class Normalised:
    """A source batch in the canonical data columns (no lineage), and its bad cells.

    `bad_cells`: canonical column -> (mask of cells that could not be parsed,
    their raw text); only columns that have any.
    """

    batch: pa.RecordBatch
    bad_cells: dict[str, tuple[pa.Array, pa.Array]]


# The trips data columns (yellow and green); each spec has its own `data_schema`.
DATA_SCHEMA = pa.schema([f for f in CANONICAL_SCHEMA if f.name not in LINEAGE_COLUMNS])


# -- converting cells --------------------------------------------------------------------


def _is_text(values: pa.Array) -> bool:
    return pa.types.is_string(values.type) or pa.types.is_large_string(values.type)


def _blank_to_null(values: pa.Array) -> pa.Array:
    """Trimmed text, with empty cells null: an empty CSV cell is a missing value."""
    trimmed = pc.utf8_trim_whitespace(values)
    return pc.if_else(pc.equal(pc.utf8_length(trimmed), 0), pa.scalar(None, trimmed.type),
                      trimmed)


def _parse_number(text: pa.Array) -> pa.Array:
    """float64; a cell that is not a number becomes null (vectorised either way)."""
    try:
        return pc.cast(text, pa.float64())
    except pa.ArrowInvalid:
        number = pc.fill_null(pc.match_substring_regex(text, _NUMBER), False)
        return pc.cast(pc.if_else(number, text, pa.scalar(None, text.type)), pa.float64())


def _ny_wall_clock(values: pa.Array) -> pa.Array:
    """Zoned instants as New York wall-clock times (TLC's convention), zone dropped."""
    return pc.local_timestamp(pc.cast(values, pa.timestamp(values.type.unit, TLC_TIME_ZONE)))


def _parse_times_slowly(text: pa.Array) -> pa.Array:
    """timestamp[us] from ISO or US-format text; null where no format fits.

    Only for batches the plain cast refused: every format is tried in turn on
    what is still unparsed, so a clean batch of one format costs one pass.
    """
    fraction = zone = None
    base = text
    if pc.any(pc.match_substring_regex(text, _HAS_PARTS)).as_py():  # the split is 5x dearer
        parts = pc.extract_regex(text, _TIME_PARTS)
        base = pc.coalesce(pc.struct_field(parts, "base"), text)
        fraction = _nonempty(pc.struct_field(parts, "fraction"))
        zone = _nonempty(pc.struct_field(parts, "zone"))
    us_style = pc.match_substring(base, "/")
    parsed = pa.nulls(len(text), pa.timestamp("us"))
    for time_format in _TIME_FORMATS:
        todo = pc.and_(pc.is_valid(base), pc.is_null(parsed))
        if not pc.any(todo).as_py():
            break
        style = us_style if "/" in time_format else pc.invert(us_style)
        if not pc.any(pc.and_(todo, style)).as_py():
            continue  # no cell left of this format's style: skip a full pass
        parsed = pc.coalesce(parsed, pc.strptime(base, format=time_format, unit="us",
                                                 error_is_null=True))
    written = pc.extract_regex(text, _WRITTEN_DAY)
    day = pc.cast(pc.coalesce(_nonempty(pc.struct_field(written, "iso")),
                              _nonempty(pc.struct_field(written, "us"))), pa.int64())
    parsed = pc.if_else(pc.fill_null(pc.equal(pc.day(parsed), day), False), parsed,
                        pa.scalar(None, parsed.type))
    if fraction is not None:
        micros = pc.cast(pc.utf8_rpad(pc.utf8_slice_codeunits(fraction, 1, 7), width=6,
                                      padding="0"), pa.int64())
        parsed = pc.add(parsed, pc.cast(pc.fill_null(micros, 0), pa.duration("us")))
    if zone is not None and pc.any(pc.is_valid(zone)).as_py():
        offset = pc.extract_regex(pc.replace_substring(zone, "Z", "+00:00"), _ZONE)
        minutes = pc.add(pc.multiply(pc.cast(pc.struct_field(offset, "hours"), pa.int64()), 60),
                         pc.cast(pc.struct_field(offset, "minutes"), pa.int64()))
        signed = pc.if_else(pc.equal(pc.struct_field(offset, "sign"), "-"),
                            pc.negate(minutes), minutes)
        utc = pc.subtract(parsed, pc.cast(pc.multiply(signed, 60_000_000), pa.duration("us")))
        wall = _ny_wall_clock(pc.cast(pc.cast(utc, pa.int64()), pa.timestamp("us", "UTC")))
        parsed = pc.if_else(pc.is_valid(zone), wall, parsed)
    return parsed


def _nonempty(text: pa.Array) -> pa.Array:
    """extract_regex gives "" for a group that did not take part: make it null."""
    return pc.if_else(pc.equal(text, ""), pa.scalar(None, text.type), text)


def _parse_times(text: pa.Array) -> pa.Array:
    try:
        return pc.cast(text, pa.timestamp("us"))
    except pa.ArrowInvalid:
        return _parse_times_slowly(text)


def _not_int32(values: pa.Array) -> pa.Array | None:
    """Cells of a numeric array that are no int32 value: fractional, infinite or out of
    range (a passenger count of 1.7, a zone id of 3e10). None when there are none.

    Nulls and NaN are not bad: both are "not recorded" (how pandas-written files of
    some years store a missing code), which the quality rules judge.
    """
    if pa.types.is_floating(values.type):
        bad = pc.and_(pc.invert(pc.is_nan(values)),
                      pc.or_(pc.is_inf(values),
                             pc.or_(pc.greater(pc.abs(values), _INT32_LIMIT),
                                    pc.not_equal(values, pc.trunc(values)))))
    elif pa.types.is_integer(values.type) and pa.types.is_signed_integer(values.type) \
            and values.type.bit_width <= 32:
        return None
    elif pa.types.is_integer(values.type):
        bad = pc.greater(values, _INT32_LIMIT) if pa.types.is_unsigned_integer(values.type) \
            else pc.or_(pc.greater(values, _INT32_LIMIT), pc.less(values, -_INT32_LIMIT))
    else:
        return None
    bad = pc.fill_null(bad, False)
    return bad if pc.any(bad).as_py() else None


def _to_int32(values: pa.Array, bad: pa.Array | None = None) -> pa.Array:
    """Integer codes stored as double in some years; NaN and the `bad` cells (see
    `_not_int32`) become null here, and the caller rejects the rows of the bad ones."""
    if pa.types.is_floating(values.type):
        nan = pc.fill_null(pc.is_nan(values), False)
        bad = nan if bad is None else pc.or_(bad, nan)
    if bad is not None:
        values = pc.if_else(bad, pa.scalar(None, values.type), values)
    if pa.types.is_floating(values.type) or pa.types.is_integer(values.type):
        return pc.cast(values, pa.int32(), safe=False)
    return pc.cast(values, pa.int32())


def _either(first: pa.Array | None, second: pa.Array | None) -> pa.Array | None:
    if first is None or second is None:
        return first if second is None else second
    return pc.or_(first, second)


def _to_timestamp(values: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(values.type) and values.type.tz is not None:
        # TLC times are New York wall-clock times: a zoned file (UTC, say) is
        # converted to New York's wall clock, not read as its own zone's.
        values = _ny_wall_clock(values)
    if pa.types.is_timestamp(values.type):
        # ns -> us drops sub-microsecond digits, which TLC never records
        return pc.cast(values, pa.timestamp("us"), safe=False)
    return pc.cast(values, pa.timestamp("us"))


def _convert(values: pa.Array, target: pa.DataType) -> tuple[pa.Array, pa.Array | None]:
    """(the values as `target`, mask of cells that are no value of it, or None).

    Bad cells: text that is not a number or time, and for integer columns a number
    that is no int32 (fractional, infinite, out of range; NaN is null, "not
    recorded"). They are null in the result and their rows are rejected
    (`unparseable_value`, with the raw value in `reject_detail`), never coerced
    silently.
    """
    if _is_text(values) and (pa.types.is_int32(target) or pa.types.is_floating(target)
                             or pa.types.is_timestamp(target)):
        text = _blank_to_null(values)
        parsed = _parse_times(text) if pa.types.is_timestamp(target) else _parse_number(text)
        failed: pa.Array | None = pc.and_(pc.is_valid(text), pc.is_null(parsed))
        if not pc.any(failed).as_py():
            failed = None
        if pa.types.is_int32(target):
            not_int = _not_int32(parsed)
            return _to_int32(parsed, not_int), _either(failed, not_int)
        return parsed, failed
    if pa.types.is_int32(target):
        not_int = _not_int32(values)
        return _to_int32(values, not_int), not_int
    if pa.types.is_timestamp(target):
        return _to_timestamp(values), None
    if pa.types.is_string(target) and not pa.types.is_string(values.type):
        return pc.cast(pc.cast(values, pa.large_string()), pa.string()), None
    return pc.cast(values, target), None


def _null_codes(values: pa.Array, code: int) -> tuple[pa.Array, int]:
    is_code = pc.fill_null(pc.equal(values, code), False)
    count = pc.sum(is_code).as_py() or 0
    if not count:
        return values, 0
    return pc.if_else(is_code, pa.scalar(None, values.type), values), count


def normalise(
    batch: pa.RecordBatch,
    mapping: dict[str, str],
    codes_nulled: Counter[str] | None = None,
    spec: DatasetSpec = YELLOW,
) -> Normalised:
    """One source batch in the spec's canonical data columns; absent optional columns
    are null.

    Lineage columns are added when writing (they are the same on every row).
    TLC's "unknown" codes become null and are counted in `codes_nulled`.
    """
    n = batch.num_rows
    arrays: list[pa.Array] = []
    bad_cells: dict[str, tuple[pa.Array, pa.Array]] = {}
    for field_ in spec.data_schema:
        if field_.name not in mapping:
            arrays.append(pa.nulls(n, field_.type))
            continue
        raw = batch.column(mapping[field_.name])
        values, failed = _convert(raw, field_.type)
        if failed is not None:
            bad_cells[field_.name] = (failed, raw)
        if field_.name in spec.null_codes:
            values, count = _null_codes(values, spec.null_codes[field_.name])
            if count and codes_nulled is not None:
                codes_nulled[field_.name] += count
        arrays.append(values)
    return Normalised(pa.RecordBatch.from_arrays(arrays, schema=spec.data_schema), bad_cells)


def _detail(bad_cells: dict[str, tuple[pa.Array, pa.Array]]) -> pa.Array:
    """`column='raw text'; ...` for each row's unparseable cells, null elsewhere."""
    pieces = []
    for name, (failed, raw) in bad_cells.items():
        quoted = pc.binary_join_element_wise(
            f"{name}='", pc.utf8_slice_codeunits(pc.cast(raw, pa.string()), 0, _DETAIL_CHARS),
            "'", "")
        pieces.append(pc.if_else(failed, quoted, pa.scalar(None, pa.string())))
    joined = pieces[0]
    for piece in pieces[1:]:
        # not null_handling="skip": pyarrow 26 drops the all-null rows with it
        joined = pc.coalesce(pc.binary_join_element_wise(joined, piece, "; "), joined, piece)
    return joined


def _split(normalised: Normalised, month: tuple[int, int] | None,
           spec: DatasetSpec = YELLOW, zones: pa.Array | None = None,
           ) -> tuple[pa.RecordBatch, pa.RecordBatch | None, pa.Array | None]:
    """(good rows, rejected rows with reason and detail or None, the reasons or None)."""
    batch, bad_cells = normalised.batch, normalised.bad_cells
    checks: list[tuple[str, pa.Array]] = []
    if bad_cells:
        masks = [failed for failed, _ in bad_cells.values()]
        unparseable = masks[0]
        for mask in masks[1:]:
            unparseable = pc.or_(unparseable, mask)
        checks.append((quality.UNPARSEABLE_VALUE, quality.true_only(unparseable)))
    checks += spec.checks(batch, month, zones if zones is not None else zone_ids())
    reasons = quality.first_broken(checks, batch.num_rows)
    is_good = pc.is_null(reasons)
    good = batch.filter(is_good)
    if good.num_rows == batch.num_rows:
        return good, None, None
    is_bad = pc.invert(is_good)
    bad_reasons = reasons.filter(is_bad)
    detail = (_detail(bad_cells).filter(is_bad) if bad_cells
              else pa.nulls(len(bad_reasons), pa.string()))
    bad = pa.RecordBatch.from_arrays(
        [*batch.filter(is_bad).columns, bad_reasons, detail], schema=spec.reject_data_schema)
    return good, bad, bad_reasons


# -- what the file says about itself --------------------------------------------------------


class _MonthCounter:
    """Pickups per calendar month, from a per-day count (cheap: date32 + value_counts)."""

    def __init__(self) -> None:
        self.months: Counter[tuple[int, int]] = Counter()

    def add(self, pickups: pa.Array, expected: tuple[int, int] | None = None) -> None:
        """Count `pickups`; those in the `expected` month by a cheap range check."""
        if expected is not None:
            start, end = month_bounds(*expected)
            inside = pc.and_(pc.greater_equal(pickups, pa.scalar(start, pickups.type)),
                             pc.less(pickups, pa.scalar(end, pickups.type)))
            self.months[expected] += pc.sum(inside).as_py() or 0
            pickups = pickups.filter(pc.invert(inside))  # a null pickup is dropped
        for item in pc.value_counts(pc.cast(pickups, pa.date32())).to_pylist():
            day: date | None = item["values"]
            if day is not None:
                self.months[(day.year, day.month)] += item["counts"]

    @property
    def pickups(self) -> int:
        return sum(self.months.values())

    def share(self, month: tuple[int, int] | None) -> float:
        total = self.pickups
        return self.months[month] / total if total and month is not None else 0.0

    def most_common(self) -> tuple[int, int] | None:
        ranked = self.months.most_common(1)
        return ranked[0][0] if ranked else None


def _months_from_statistics(parquet: pq.ParquetFile, column: str) -> _MonthCounter | None:
    """All pickups in one month by the row-group min/max: no data read. None if unsure."""
    kind = parquet.schema_arrow.field(column).type
    if not pa.types.is_timestamp(kind) or kind.tz is not None:
        return None  # zoned statistics are UTC instants, not New York months
    index = parquet.schema_arrow.get_field_index(column)
    counter = _MonthCounter()
    for group in range(parquet.metadata.num_row_groups):
        meta = parquet.metadata.row_group(group)
        stats = meta.column(index).statistics
        if stats is None or not stats.has_min_max or stats.null_count is None:
            return None
        low, high = stats.min, stats.max
        if not isinstance(low, datetime) or (low.year, low.month) != (high.year, high.month):
            return None
        counter.months[(low.year, low.month)] += meta.num_rows - stats.null_count
    return counter


def _scan_months(parquet: pq.ParquetFile, column: str, batch_rows: int) -> _MonthCounter:
    counter = _months_from_statistics(parquet, column)
    if counter is not None:
        return counter
    counter = _MonthCounter()
    target = CANONICAL_SCHEMA.field("pickup_datetime").type
    try:
        for batch in parquet.iter_batches(batch_size=batch_rows, columns=[column]):
            counter.add(_convert(batch.column(0), target)[0])
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
        raise BadInputFile("unreadable", f"reading the pickup times failed ({exc})") from exc
    return counter


# Column chunks are read through a buffered stream of this size instead of whole: a
# whole-chunk read of a 20M-row fhvhv month (1M-row row groups) grew the reader's peak
# with the file (999 MiB at 20M rows, 521 at 9M, measured 2026-12-06); buffered, it
# stays ~190 MiB whatever the length, and was no slower.
PARQUET_READ_BUFFER = 1 << 20


def _open_parquet(source: BinaryIO | Path | str | pq.ParquetFile) -> pq.ParquetFile:
    if isinstance(source, pq.ParquetFile):
        return source
    try:
        return pq.ParquetFile(source, buffer_size=PARQUET_READ_BUFFER, pre_buffer=False)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputFile("not_parquet", f"not a readable parquet file ({exc}); the "
                           f"supported formats are {SUPPORTED_FORMATS}") from exc


def _unknown_dataset(taxi_type: str | None, names: list[str]) -> BadInputFile:
    """Neither the name nor the columns say the dataset. Columns that fit no dataset at
    all are the clearer story (schema_mismatch, with what the trips would need)."""
    fits = []
    for spec in SPECS.values():
        try:
            spec.resolve_columns(names)
        except SchemaMismatch as exc:
            if spec is YELLOW:
                mismatch = exc
            continue
        fits.append(spec.name)
    if not fits:
        return BadInputFile("schema_mismatch", str(mismatch))
    return BadInputFile(
        "unknown_dataset",
        f"the name says {taxi_type!r} and the columns say none of the datasets (yellow: "
        "tpep_* times, green: lpep_* times, fhv: Affiliated_base_number, fhvhv: "
        "hvfhs_license_num): name the file <dataset>_tripdata_YYYY-MM.<parquet|csv|csv.gz> "
        f"with a dataset of {'/'.join(DATASETS)}")


def _missing(spec: DatasetSpec, names: list[str]) -> bool:
    try:
        spec.resolve_columns(names)
    except SchemaMismatch:
        return True
    return False


def _choose_dataset(taxi_type: str | None, names: list[str],
                    stats: TransformStats) -> tuple[DatasetSpec, dict[str, str]]:
    """The spec (from the name if it names a dataset, else from the columns) and the
    file's column for each canonical one. Raises BadInputFile when neither tells, or
    the file lacks the spec's required columns."""
    from_schema = dataset_from_columns(names)
    stats.dataset_from_schema = from_schema
    if taxi_type in SPECS:
        spec = spec_for(taxi_type)
        stats.taxi_type, stats.taxi_type_source = taxi_type, "name"
        stats.dataset_conflict = layout_conflict(taxi_type, from_schema)
    elif from_schema is not None:
        spec = spec_for(from_schema)
        stats.taxi_type, stats.taxi_type_source = from_schema, "schema"
    else:
        raise _unknown_dataset(taxi_type, names)
    try:
        return spec, spec.resolve_columns(names)
    except SchemaMismatch as exc:
        raise BadInputFile("schema_mismatch", str(exc)) from exc


def inspect_source(source: BinaryIO | Path | str | pq.ParquetFile, *,
                   batch_rows: int = 131_072, taxi_type: str | None = None) -> SourceFacts:
    """The dataset its columns say and the month most of its pickups fall in.

    Reads the footer and, unless the row-group statistics settle the month,
    the pickup column alone, batch by batch. Raises BadInputFile like the
    transform for a file that is not parquet or lacks the trip columns.
    """
    parquet = _open_parquet(source)
    names = parquet.schema_arrow.names
    if taxi_type is None and dataset_from_columns(names) is None:
        # Only the pickup column is needed: any dataset whose columns the file has.
        taxi_type = next((name for name, spec in SPECS.items()
                          if not _missing(spec, names)), None)
    _, mapping = _choose_dataset(taxi_type, names, TransformStats())
    counter = _scan_months(parquet, mapping["pickup_datetime"], batch_rows)
    month = counter.most_common()
    return SourceFacts(dataset_from_columns(parquet.schema_arrow), month, counter.share(month),
                       counter.pickups, parquet.metadata.num_rows)


def _choose_month(month: tuple[int, int] | None, scan: Callable[[], _MonthCounter],
                  stats: TransformStats) -> None:
    if month is not None and 1 <= month[1] <= 12:
        stats.month, stats.month_source = month, "name"
        return
    counter = scan()
    data_month = counter.most_common()
    stats.month_from_data = data_month
    if data_month is None:
        return  # no row has a pickup time: every row is rejected, no month to check
    share = counter.share(data_month)
    if share <= MONTH_MAJORITY:
        top = ", ".join(f"{y:04d}-{m:02d}: {n}" for (y, m), n in counter.months.most_common(3))
        raise BadInputFile(
            "unknown_month",
            f"the name gives no month and no month holds most pickups ({top} of "
            f"{counter.pickups}): name the file <dataset>_tripdata_YYYY-MM.parquet or "
            "split it by month")
    stats.month, stats.month_source, stats.month_share = data_month, "data", share


# -- CSV and gzipped CSV -------------------------------------------------------------------

GZIP_MAGIC = b"\x1f\x8b"
# Bytes of (decompressed) text the streaming CSV reader parses at a time; its batches
# are then cut to `batch_rows` rows. A TLC CSV row is 100-250 bytes.
CSV_BYTES_PER_ROW = 160
CSV_MIN_BLOCK = 1 << 20
# The header line must end within this many bytes.
CSV_MAX_HEADER = 1 << 20
_DETAIL_LINE_CHARS = 80


class _KeepOpen:
    """The caller's file, lent to pyarrow: pyarrow closes a PythonFile's file when it is
    done with (or collects) it, and the CSV is read more than once (header, months, rows)."""

    def __init__(self, handle: BinaryIO) -> None:
        self._handle = handle

    def read(self, size: int = -1) -> bytes:
        return self._handle.read(size)

    def seek(self, offset: int, whence: int = 0) -> int:
        return self._handle.seek(offset, whence)

    def tell(self) -> int:
        return self._handle.tell()

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    @property
    def closed(self) -> bool:
        return self._handle.closed

    def close(self) -> None:
        """Not ours to close."""


def _rewound(source: BinaryIO | Path | str) -> tuple[Any, bool]:
    """An open binary file at its start, and whether we opened it (so must close it)."""
    if isinstance(source, (str, Path)):
        return pa.OSFile(str(source), "rb"), True
    source.seek(0)
    return pa.PythonFile(_KeepOpen(source), mode="r"), False


def _text_stream(raw: Any, compressed: bool) -> Any:
    return pa.CompressedInputStream(raw, "gzip") if compressed else raw


def _csv_header(source: BinaryIO | Path | str, compressed: bool) -> list[str]:
    """The header's column names, read from the first line (nothing else is read)."""
    raw, opened = _rewound(source)
    try:
        if compressed:
            magic = raw.read(2)
            if magic != GZIP_MAGIC:
                raise BadInputFile(
                    "not_gzip", f"a .csv.gz file must start with the gzip magic 1f8b, this one "
                    f"starts {magic!r}: upload the gzipped file, or name a plain CSV .csv")
            raw.seek(0)
        stream = _text_stream(raw, compressed)
        head = b""
        try:
            while b"\n" not in head and len(head) < CSV_MAX_HEADER:
                chunk = stream.read(64 * 1024)
                if not chunk:
                    break
                head += chunk
        except OSError as exc:
            raise BadInputFile("truncated" if "runcated" in str(exc) else "unreadable",
                               f"reading the CSV header failed ({exc})") from exc
    finally:
        if opened:
            raw.close()
    line = head.split(b"\n", 1)[0].rstrip(b"\r")
    if not line.strip():
        raise BadInputFile("empty", "the file has no header line (no CSV data)")
    try:
        text = line.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise BadInputFile("not_csv", f"the first line is not UTF-8 text ({exc}): not a CSV "
                           "file") from exc
    return [name.strip() for name in next(csv.reader([text]))]


class _CsvBatches:
    """The CSV's batches (used columns as text), at most `batch_rows` rows each.

    Lines with more or fewer cells than the header are collected in `malformed`
    (line number, text) instead of stopping the read; the caller rejects them.
    """

    def __init__(self, source: BinaryIO | Path | str, compressed: bool,
                 columns: list[str], batch_rows: int) -> None:
        self.malformed: list[tuple[int | None, str]] = []
        self.rows = 0
        self.source, self.compressed, self.columns = source, compressed, columns
        self.batch_rows = batch_rows

    def _invalid(self, row: Any) -> str:
        self.malformed.append((row.number, row.text))
        return "skip"

    def _open(self) -> Any:
        block = max(CSV_MIN_BLOCK, self.batch_rows * CSV_BYTES_PER_ROW)
        return pcsv.open_csv(  # reads (and can fail on) the first block already
            _text_stream(self.raw, self.compressed),
            read_options=pcsv.ReadOptions(block_size=block),
            parse_options=pcsv.ParseOptions(invalid_row_handler=self._invalid),
            convert_options=pcsv.ConvertOptions(
                column_types={name: pa.string() for name in self.columns},
                include_columns=self.columns, strings_can_be_null=True, null_values=[""],
                quoted_strings_can_be_null=True),
        )

    def __iter__(self) -> Iterator[pa.RecordBatch]:
        self.raw, self.opened = _rewound(self.source)
        try:
            for batch in self._open():
                for start in range(0, batch.num_rows, self.batch_rows):
                    piece = batch.slice(start, self.batch_rows)
                    self.rows += piece.num_rows
                    yield piece
        except OSError as exc:
            if "runcated" in str(exc):
                raise BadInputFile(
                    "truncated", f"the gzip stream ends early, after {self.rows} rows "
                    f"({exc}): the upload was cut off; upload the whole file again") from exc
            raise BadInputFile("unreadable", f"reading the CSV failed after {self.rows} "
                               f"rows ({exc})") from exc
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise BadInputFile("unreadable", f"reading the CSV failed after {self.rows} rows "
                               f"({exc})") from exc
        finally:
            if self.opened:
                self.raw.close()

    def take_malformed(self) -> list[tuple[int | None, str]]:
        taken, self.malformed = self.malformed, []
        return taken


def _malformed_rejects(lines: list[tuple[int | None, str]], spec: DatasetSpec) -> pa.RecordBatch:
    """Reject rows for CSV lines that do not have the header's cell count: every data
    column null, reason `malformed_row`, the line (its start) in `reject_detail`."""
    n = len(lines)
    detail = pa.array([f"line {number if number is not None else '?'}: "
                       f"{text[:_DETAIL_LINE_CHARS]}" for number, text in lines], pa.string())
    arrays = [pa.nulls(n, f.type) for f in spec.data_fields]
    arrays += [pa.array([quality.MALFORMED_ROW] * n, pa.string()), detail]
    return pa.RecordBatch.from_arrays(arrays, schema=spec.reject_data_schema)


def _scan_csv_months(source: BinaryIO | Path | str, compressed: bool, column: str,
                     batch_rows: int) -> _MonthCounter:
    counter = _MonthCounter()
    target = CANONICAL_SCHEMA.field("pickup_datetime").type
    for batch in _CsvBatches(source, compressed, [column], batch_rows):
        counter.add(_convert(batch.column(0), target)[0])
    return counter


class _RowGroup:
    """Batches waiting to be written as one row group.

    Full at `max_rows` rows, at `max_bytes` of Arrow memory, or when the rows are
    predicted to fill `disk_bytes` on disk: at first from the Arrow size
    (ARROW_PER_DISK_BYTE), then from the bytes per row the groups written so far took.
    """

    def __init__(self, max_rows: int, max_bytes: int,
                 disk_bytes: int = ROW_GROUP_DISK_BYTES) -> None:
        if max_rows < 1 or max_bytes < 1 or disk_bytes < 1:
            raise ValueError(f"row groups need at least 1 row and 1 byte, not {max_rows} rows, "
                             f"{max_bytes} bytes and {disk_bytes} bytes on disk")
        self.max_rows, self.max_bytes, self.disk_bytes = max_rows, max_bytes, disk_bytes
        self.batches: list[pa.RecordBatch] = []
        self.rows = self.nbytes = 0
        self.overflow = False
        self.written_rows = self.written_bytes = 0  # on disk, of the groups written so far
        self.disk_sizes: list[int] = []

    def add(self, batch: pa.RecordBatch | None) -> pa.RecordBatch | None:
        """Take what fits; the rest of the batch (for the next group) is returned."""
        if batch is None or not batch.num_rows:
            return None
        room = self.target_rows - self.rows
        if not self.written_rows:  # first group: stop at the Arrow size of the disk target
            per_row = max(batch.nbytes / batch.num_rows, 1e-3)
            room = min(room, max(1, int((self.disk_bytes * ARROW_PER_DISK_BYTE - self.nbytes)
                                        / per_row)))
        batch, rest = batch.slice(0, room), batch.slice(room) if batch.num_rows > room else None
        self.batches.append(batch)
        self.rows += batch.num_rows
        self.nbytes += batch.nbytes
        self.overflow = rest is not None  # what did not fit goes to the next group
        return rest

    @property
    def target_rows(self) -> int:
        """Rows of this group: the row cap, or the rows predicted to fill `disk_bytes`."""
        if not self.written_rows:
            return self.max_rows
        per_row = max(self.written_bytes / self.written_rows, 1e-3)
        return max(1, min(self.max_rows, int(self.disk_bytes / per_row)))

    @property
    def full(self) -> bool:
        if self.overflow or self.rows >= self.target_rows or self.nbytes >= self.max_bytes:
            return True
        return not self.written_rows and self.nbytes >= self.disk_bytes * ARROW_PER_DISK_BYTE

    def take(self) -> list[pa.RecordBatch]:
        batches, self.batches, self.rows, self.nbytes = self.batches, [], 0, 0
        self.overflow = False
        return batches

    def written(self, rows: int, disk_bytes: int) -> None:
        """A group of `rows` took `disk_bytes` in the file."""
        self.written_rows += rows
        self.written_bytes += disk_bytes
        self.disk_sizes.append(disk_bytes)


def _with_lineage(batches: list[pa.RecordBatch], schema: pa.Schema,
                  lineage: dict[str, pa.Array]) -> pa.Table:
    """The batches with their lineage columns (zero-copy slices of one array each)."""
    full = []
    for batch in batches:
        arrays = [lineage[f.name].slice(0, batch.num_rows) if f.name in lineage
                  else batch.column(f.name) for f in schema]
        full.append(pa.RecordBatch.from_arrays(arrays, schema=schema))
    return pa.Table.from_batches(full, schema=schema)


def _write(writer: pq.ParquetWriter, table: pa.Table) -> None:
    writer.write_table(table, row_group_size=max(table.num_rows, 1))


def source_format(name: str | Path, head: bytes = b"") -> str:
    """`parquet`, `csv` or `csv.gz` from the file name's ending; a name with none of
    them by its first bytes (gzip magic: csv.gz; else parquet, which a non-parquet
    file then fails as `not_parquet`, as it always did)."""
    lower = str(name).lower()
    if lower.endswith(".parquet"):
        return "parquet"
    if lower.endswith((".csv.gz", ".gz")):
        return "csv.gz"
    if lower.endswith(".csv"):
        return "csv"
    return "csv.gz" if head.startswith(GZIP_MAGIC) else "parquet"


def transform_file(
    source: BinaryIO | Path | str,
    processed_path: Path,
    rejects_path: Path,
    *,
    file_format: str,
    **options: Any,
) -> TransformStats:
    """`transform_parquet` or `transform_csv` by `file_format` (see `source_format`)."""
    if file_format == "parquet":
        return transform_parquet(source, processed_path, rejects_path, **options)
    if file_format in ("csv", "csv.gz"):
        return transform_csv(source, processed_path, rejects_path,
                             compressed=file_format == "csv.gz", **options)
    raise ValueError(f"unknown file format {file_format!r}: parquet, csv or csv.gz")


def transform_parquet(
    source: BinaryIO | Path | str,
    processed_path: Path,
    rejects_path: Path,
    *,
    source_uri: str,
    source_generation: int,
    taxi_type: str | None,
    month: tuple[int, int] | None,
    batch_rows: int = 32_768,
    ingested_at: datetime | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
    row_group_bytes: int = ROW_GROUP_BYTES,
    row_group_disk_bytes: int = ROW_GROUP_DISK_BYTES,
    zones: pa.Array | None = None,
) -> TransformStats:
    """Write good rows to `processed_path` and rejected rows (with reason) to `rejects_path`.

    `taxi_type` and `month` are what the file's name says; a name that names no
    dataset (or None) leaves it to the columns, a missing month to the pickups
    (a first pass over that column). The stats say what was used and from where.
    Raises BadInputFile for a file that is not parquet, is empty, is truncated,
    lacks required columns, or whose dataset or month neither its name nor its
    data tells; nothing written is then to be published. `zones`: the valid
    zone ids (default: the packaged TLC lookup).
    """
    parquet = _open_parquet(source)
    stats = TransformStats()
    spec, mapping = _choose_dataset(taxi_type, parquet.schema_arrow.names, stats)
    if parquet.metadata.num_rows == 0:
        raise BadInputFile("empty", "the file has a schema but no rows")
    _choose_month(month, lambda: _scan_months(parquet, mapping["pickup_datetime"], batch_rows),
                  stats)

    def batches() -> Iterator[pa.RecordBatch]:
        # Only reading errors are bad input; a failed write (a full disk) is raised
        # as it is, to be retried.
        try:
            source_batches = parquet.iter_batches(batch_size=batch_rows,
                                                  columns=list(mapping.values()))
            while (raw := next(source_batches, None)) is not None:
                yield raw
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise BadInputFile("unreadable", f"reading row data failed ({exc})") from exc

    _stream(batches(), spec, mapping, stats, processed_path, rejects_path,
            source_uri=source_uri, source_generation=source_generation,
            batch_rows=batch_rows, ingested_at=ingested_at, zones=zones,
            group_limits=(row_group_rows, row_group_bytes, row_group_disk_bytes))
    if stats.rows_in != parquet.metadata.num_rows:
        raise BadInputFile(
            "truncated",
            f"footer promises {parquet.metadata.num_rows} rows, read {stats.rows_in}",
        )
    return stats


def transform_csv(
    source: BinaryIO | Path | str,
    processed_path: Path,
    rejects_path: Path,
    *,
    compressed: bool,
    source_uri: str,
    source_generation: int,
    taxi_type: str | None,
    month: tuple[int, int] | None,
    batch_rows: int = 32_768,
    ingested_at: datetime | None = None,
    row_group_rows: int = ROW_GROUP_ROWS,
    row_group_bytes: int = ROW_GROUP_BYTES,
    row_group_disk_bytes: int = ROW_GROUP_DISK_BYTES,
    zones: pa.Array | None = None,
) -> TransformStats:
    """`transform_parquet` for a CSV file (gzipped when `compressed`), streamed.

    The header picks the columns; every used column is read as text and converted by
    the spec's types, so a bad cell rejects its row instead of failing the batch or
    the type of a column being guessed from its first rows. A line with the wrong
    number of cells is rejected as `malformed_row`. A gzip stream that ends early is
    BadInputFile `truncated`, a .csv.gz that is not gzip `not_gzip`.
    """
    names = _csv_header(source, compressed)
    stats = TransformStats()
    spec, mapping = _choose_dataset(taxi_type, names, stats)
    columns = list(dict.fromkeys(mapping.values()))
    _choose_month(month, lambda: _scan_csv_months(source, compressed,
                                                  mapping["pickup_datetime"], batch_rows),
                  stats)
    reader = _CsvBatches(source, compressed, columns, batch_rows)
    _stream(iter(reader), spec, mapping, stats, processed_path, rejects_path,
            source_uri=source_uri, source_generation=source_generation,
            batch_rows=batch_rows, ingested_at=ingested_at, zones=zones,
            group_limits=(row_group_rows, row_group_bytes, row_group_disk_bytes),
            malformed=reader.take_malformed)
    if stats.rows_in == 0:
        raise BadInputFile("empty", "the CSV has a header but no rows")
    return stats


def _stream(
    batches: Iterator[pa.RecordBatch],
    spec: DatasetSpec,
    mapping: dict[str, str],
    stats: TransformStats,
    processed_path: Path,
    rejects_path: Path,
    *,
    source_uri: str,
    source_generation: int,
    batch_rows: int,
    ingested_at: datetime | None,
    zones: pa.Array | None,
    group_limits: tuple[int, int, int],
    malformed: Callable[[], list[tuple[int | None, str]]] | None = None,
) -> None:
    """Normalise, check and write every batch: good rows to `processed_path`, rejected
    ones (reason, detail) to `rejects_path`, in row groups sized by their bytes on disk."""
    processed_path, rejects_path = Path(processed_path), Path(rejects_path)
    zones = zones if zones is not None else zone_ids()
    schema, rejects_schema = spec.schema, spec.rejects_schema
    write_options = _write_options(spec)
    lineage_values = {
        "taxi_type": pa.scalar(stats.taxi_type, pa.string()),
        "source_uri": pa.scalar(source_uri, pa.string()),
        "source_generation": pa.scalar(source_generation, pa.int64()),
        "ingested_at": pa.scalar(ingested_at or datetime.now(UTC), pa.timestamp("us", tz="UTC")),
    }
    # One array per lineage column, as long as a batch; each batch takes a slice.
    lineage = {name: pa.repeat(value, batch_rows) for name, value in lineage_values.items()}
    metadata = lineage_metadata(source_uri, source_generation)
    good_group = _RowGroup(*group_limits)
    bad_group = _RowGroup(*group_limits)
    months = _MonthCounter()
    with (
        pq.ParquetWriter(processed_path, schema.with_metadata(metadata),
                         **write_options) as good_writer,
        pq.ParquetWriter(rejects_path, rejects_schema.with_metadata(metadata),
                         **write_options) as bad_writer,
    ):
        def flush(group: _RowGroup, out: pq.ParquetWriter, path: Path,
                  schema: pa.Schema) -> None:
            """Write the group as one row group; record its size on disk."""
            if not group.rows:
                return
            rows = group.rows
            before = path.stat().st_size
            _write(out, _with_lineage(group.take(), schema, lineage))
            group.written(rows, path.stat().st_size - before)
            if out is good_writer:
                stats.row_groups_out += 1

        def add(group: _RowGroup, rows: pa.RecordBatch | None, out: pq.ParquetWriter,
                path: Path, schema: pa.Schema) -> None:
            rest = group.add(rows)
            del rows
            while group.full:
                flush(group, out, path, schema)
                rest = group.add(rest)

        def reject_malformed() -> None:
            lines = malformed() if malformed is not None else []
            if lines:
                stats.rows_in += len(lines)
                stats.rejected[quality.MALFORMED_ROW] += len(lines)
                add(bad_group, _malformed_rejects(lines, spec), bad_writer, rejects_path,
                    rejects_schema)

        for raw in batches:
            try:
                normalised = normalise(raw, mapping, stats.codes_nulled, spec)
                good, bad, bad_reasons = _split(normalised, stats.month, spec, zones)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
                raise BadInputFile("unreadable", f"reading row data failed ({exc})") from exc
            if stats.month_source == "name":
                months.add(normalised.batch.column("pickup_datetime"), stats.month)
            for name, (failed, _) in normalised.bad_cells.items():
                stats.unparseable[name] += pc.sum(failed).as_py() or 0
            stats.rows_in += raw.num_rows
            stats.rows_out += good.num_rows
            stats.batches += 1
            if bad_reasons is not None:
                for item in pc.value_counts(bad_reasons).to_pylist():
                    stats.rejected[item["values"]] += item["counts"]
            # The batch as read and normalised is not needed any more: release it
            # before a group is written (the groups keep only the rows they took).
            del raw, normalised, bad_reasons
            add(good_group, good, good_writer, processed_path, schema)
            add(bad_group, bad, bad_writer, rejects_path, rejects_schema)
            del good, bad
            reject_malformed()
        reject_malformed()
        flush(good_group, good_writer, processed_path, schema)
        flush(bad_group, bad_writer, rejects_path, rejects_schema)
    stats.row_group_disk_bytes = list(good_group.disk_sizes)
    if stats.month_source == "name":
        stats.month_from_data = months.most_common()
        if months.pickups:
            stats.month_share = months.share(stats.month)
            stats.month_conflict = stats.month_share < MONTH_MAJORITY
