"""Stream a raw TLC parquet file into the canonical schema, row group by row group.

No Prefect here: the flow wraps this, the benchmark and the unit tests call it
directly. Memory is bounded by one batch (`batch_rows`) whatever the file size.
"""

from __future__ import annotations

from collections import Counter
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from flows.quality import reject_reasons
from flows.tlc_schema import (
    CANONICAL_SCHEMA,
    REJECTS_SCHEMA,
    SchemaMismatch,
    resolve_columns,
)
from taxi_pipeline.lineage import lineage_metadata

_INT32_LIMIT = 2**31 - 1


class BadInputFile(ValueError):
    """The file as a whole cannot be transformed; it goes to quarantine with this reason."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind
        self.detail = detail


@dataclass
class TransformStats:
    rows_in: int = 0
    rows_out: int = 0
    rejected: Counter[str] = field(default_factory=Counter)
    batches: int = 0

    @property
    def rows_rejected(self) -> int:
        return sum(self.rejected.values())


def _to_int32(values: pa.Array) -> pa.Array:
    """Integer codes stored as double in some years: NaN or out-of-range become null."""
    if pa.types.is_floating(values.type):
        bad = pc.or_(pc.is_nan(values), pc.greater(pc.abs(values), _INT32_LIMIT))
        values = pc.if_else(pc.fill_null(bad, False), pa.scalar(None, values.type), values)
        return pc.cast(pc.trunc(values), pa.int32(), safe=False)
    if pa.types.is_integer(values.type):
        too_big = pc.fill_null(pc.greater(pc.abs(values), _INT32_LIMIT), False)
        values = pc.if_else(too_big, pa.scalar(None, values.type), values)
        return pc.cast(values, pa.int32(), safe=False)
    return pc.cast(values, pa.int32())


def _to_timestamp(values: pa.Array) -> pa.Array:
    if pa.types.is_timestamp(values.type) and values.type.tz is not None:
        # TLC times are New York wall-clock times; keep the wall clock, drop the zone.
        values = pc.local_timestamp(values)
    if pa.types.is_timestamp(values.type):
        # ns -> us drops sub-microsecond digits, which TLC never records
        return pc.cast(values, pa.timestamp("us"), safe=False)
    return pc.cast(values, pa.timestamp("us"))


def _convert(values: pa.Array, target: pa.DataType) -> pa.Array:
    if pa.types.is_int32(target):
        return _to_int32(values)
    if pa.types.is_timestamp(target):
        return _to_timestamp(values)
    if pa.types.is_string(target) and not pa.types.is_string(values.type):
        return pc.cast(pc.cast(values, pa.large_string()), pa.string())
    return pc.cast(values, target)


def normalise(
    batch: pa.RecordBatch,
    mapping: dict[str, str],
    lineage: dict[str, pa.Scalar],
) -> pa.RecordBatch:
    """One source batch in the canonical schema; absent optional columns are null."""
    n = batch.num_rows
    arrays: list[pa.Array] = []
    for field_ in CANONICAL_SCHEMA:
        if field_.name in lineage:
            arrays.append(pa.repeat(lineage[field_.name], n))
        elif field_.name in mapping:
            arrays.append(_convert(batch.column(mapping[field_.name]), field_.type))
        else:
            arrays.append(pa.nulls(n, field_.type))
    return pa.RecordBatch.from_arrays(arrays, schema=CANONICAL_SCHEMA)


def _split(batch: pa.RecordBatch, month: tuple[int, int] | None
           ) -> tuple[pa.RecordBatch, pa.RecordBatch | None, pa.Array | None]:
    """(good rows, rejected rows with their reason or None, the reasons or None)."""
    reasons = reject_reasons(batch, month)
    is_good = pc.is_null(reasons)
    good = batch.filter(is_good)
    if good.num_rows == batch.num_rows:
        return good, None, None
    is_bad = pc.invert(is_good)
    bad_reasons = reasons.filter(is_bad)
    bad = batch.filter(is_bad).append_column(REJECTS_SCHEMA.field("reject_reason"), bad_reasons)
    return good, bad, bad_reasons


def _write(good_writer: pq.ParquetWriter, good: pa.RecordBatch,
           bad_writer: pq.ParquetWriter, bad: pa.RecordBatch | None) -> None:
    if good.num_rows:
        good_writer.write_batch(good)
    if bad is not None:
        bad_writer.write_batch(bad)


def _open_parquet(source: BinaryIO | Path | str) -> pq.ParquetFile:
    try:
        return pq.ParquetFile(source)
    except (pa.ArrowInvalid, OSError) as exc:
        raise BadInputFile("not_parquet", f"not a readable parquet file ({exc})") from exc


def transform_parquet(
    source: BinaryIO | Path | str,
    processed_path: Path,
    rejects_path: Path,
    *,
    source_uri: str,
    source_generation: int,
    taxi_type: str,
    month: tuple[int, int] | None,
    batch_rows: int = 131_072,
    ingested_at: datetime | None = None,
) -> TransformStats:
    """Write good rows to `processed_path` and rejected rows (with reason) to `rejects_path`.

    Raises BadInputFile for a file that is not parquet, is empty, is truncated
    or lacks required columns; nothing written is then to be published.
    """
    parquet = _open_parquet(source)
    try:
        mapping = resolve_columns(parquet.schema_arrow)
    except SchemaMismatch as exc:
        raise BadInputFile("schema_mismatch", str(exc)) from exc
    if parquet.metadata.num_rows == 0:
        raise BadInputFile("empty", "the file has a schema but no rows")

    lineage = {
        "taxi_type": pa.scalar(taxi_type, pa.string()),
        "source_uri": pa.scalar(source_uri, pa.string()),
        "source_generation": pa.scalar(source_generation, pa.int64()),
        "ingested_at": pa.scalar(ingested_at or datetime.now(UTC), pa.timestamp("us", tz="UTC")),
    }
    metadata = lineage_metadata(source_uri, source_generation)
    stats = TransformStats()
    # Encoding and compressing the output is most of the work (profiled: ~60%)
    # and pyarrow releases the GIL for it, so one thread writes batch n while
    # this one reads and checks batch n+1. At most one batch waits: memory stays
    # bounded by two batches. Only reading and checking errors are bad input; a
    # failed write (a full disk) is raised as it is, to be retried. The pool is
    # entered last, so it has finished writing before the writers close.
    with (
        pq.ParquetWriter(processed_path, CANONICAL_SCHEMA.with_metadata(metadata),
                         compression="snappy") as good_writer,
        pq.ParquetWriter(rejects_path, REJECTS_SCHEMA.with_metadata(metadata),
                         compression="snappy") as bad_writer,
        ThreadPoolExecutor(max_workers=1, thread_name_prefix="parquet-write") as writer,
    ):
        pending: Future[None] | None = None
        try:
            batches = parquet.iter_batches(batch_size=batch_rows,
                                           columns=list(mapping.values()))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
            raise BadInputFile("unreadable", f"reading row data failed ({exc})") from exc
        while True:
            try:
                raw = next(batches, None)
                if raw is None:
                    break
                good, bad, bad_reasons = _split(normalise(raw, mapping, lineage), month)
            except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError) as exc:
                raise BadInputFile("unreadable", f"reading row data failed ({exc})") from exc
            stats.rows_in += good.num_rows + (bad.num_rows if bad is not None else 0)
            stats.rows_out += good.num_rows
            stats.batches += 1
            if bad_reasons is not None:
                for item in pc.value_counts(bad_reasons).to_pylist():
                    stats.rejected[item["values"]] += item["counts"]
            if pending is not None:
                pending.result()
            pending = writer.submit(_write, good_writer, good, bad_writer, bad)
        if pending is not None:
            pending.result()
    if stats.rows_in != parquet.metadata.num_rows:
        raise BadInputFile(
            "truncated",
            f"footer promises {parquet.metadata.num_rows} rows, read {stats.rows_in}",
        )
    return stats
