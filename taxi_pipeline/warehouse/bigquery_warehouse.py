"""The emulator and gcp profiles' warehouse: one BigQuery dataset.

A load never moves row data through the worker: a BigQuery load job reads the
processed object straight from its gs:// URI into a staging table, then ONE
MERGE replaces the source's rows in the target table atomically (a
single DML statement is atomic in BigQuery; multi-statement transactions are
not used because the emulator cannot bind query parameters inside scripts).
A small `_loads` log makes redelivered events and retried runs no-ops.

Exactly once in effect, step by step:
  1. `_loads` says this (source generation, object, object generation) is loaded
     -> "already_loaded"; a newer source generation is loaded -> "superseded".
  2. Load job (deterministic id) -> a staging table of this object generation;
     its rows are checked against the lineage read from the object's footer.
  3. Widen the source's row in `_load_ranges` (the partition months its rows
     may occupy) by the staged rows' months, BEFORE the MERGE: so rows in the
     table always lie inside the recorded months, even after a crash.
  4. MERGE: delete the source's rows, insert the staging rows, touching only the
     recorded months' partitions. It only ever moves a source forward: with rows
     of a newer source generation present it changes nothing, so racing loads
     of one source converge on the newest. If another load widened the months
     meanwhile, the MERGE runs again over the wider months.
  5. Upsert the `_loads` row (never lowering the generation), drop staging.
A crash anywhere re-runs cleanly: the load job is adopted or re-run, and the
MERGE replaces rather than appends, so no row is ever duplicated.

Months only ever widen (unknown, NULL, is the widest: the unbounded MERGE). A
table made before `_load_ranges` existed gets its months from one scan of the
table, the first time this version loads into it.
"""

from __future__ import annotations

import hashlib
import io
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta

import pyarrow as pa
import pyarrow.parquet as pq
from google.api_core import exceptions as api_exceptions
from google.cloud import bigquery

from taxi_pipeline.gcp import names as gcp_names
from taxi_pipeline.objects import month_after
from taxi_pipeline.warehouse.base import LoadResult

LOAD_LOG = "_loads"
LOAD_RANGES = "_load_ranges"
STAGING_PREFIX = "_staging_"
# Leftover staging tables of crashed runs disappear by themselves on BigQuery.
STAGING_TTL = timedelta(days=7)
# Job ids are unique per project forever on BigQuery, so every load job of one object
# generation gets the next attempt id (`_retryN`) once the previous one failed or its
# staging table is gone (see `_stage`). The walk is bounded: past this many attempts a
# person has to look (the error says what the last job said).
MAX_LOAD_ATTEMPTS = 50
# A load job that failed with one of these reasons is tried again at once under the next
# attempt id, this many times (BigQuery's troubleshooting guide: retry backendError,
# internalError; rateLimitExceeded after a backoff).
RETRYABLE_JOB_REASONS = frozenset({"backendError", "internalError", "rateLimitExceeded",
                                   "jobBackendError", "jobInternalError",
                                   "jobRateLimitExceeded", "badGateway"})
JOB_RETRIES_IN_RUN = 2
# The longest statement a load may need reads the source's months of the target twice
# and the staging table once (a few GB for a TLC month); the default cap is far above it.
DEFAULT_MAX_BYTES_BILLED = 100 * 2**30
# Backoff of a statement BigQuery refused because another DML statement held the table.
DML_RETRY_FIRST = 1.0
DML_RETRY_MAX = 60.0
DEFAULT_DML_RETRY_SECONDS = 600.0

# The REST API answers with legacy type names; compare in standard SQL names.
_LEGACY_TYPES = {"INTEGER": "INT64", "FLOAT": "FLOAT64", "BOOLEAN": "BOOL"}

_LOG_SCHEMA = [
    bigquery.SchemaField("table_name", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("source_uri", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("source_generation", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("object_uri", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("object_generation", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("rows", "INT64", mode="REQUIRED"),
    bigquery.SchemaField("loaded_at", "TIMESTAMP", mode="REQUIRED"),
]

# First days of the lowest and highest partition month holding rows of a source;
# NULL when unknown (rows without a partition value): then nothing is bounded.
_RANGES_SCHEMA = [
    bigquery.SchemaField("table_name", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("source_uri", "STRING", mode="REQUIRED"),
    bigquery.SchemaField("min_partition", "DATE"),
    bigquery.SchemaField("max_partition", "DATE"),
    bigquery.SchemaField("updated_at", "TIMESTAMP", mode="REQUIRED"),
]

logger = logging.getLogger(__name__)


class BigQueryLoadError(RuntimeError):
    """A load could not complete; the target table is unchanged. The message says why."""


def error_reason(exc: BaseException) -> tuple[str, str]:
    """(reason, message) of a BigQuery API error (its first structured error)."""
    errors = getattr(exc, "errors", None) or []
    first = errors[0] if errors and isinstance(errors[0], Mapping) else {}
    reason = str(first.get("reason") or "")
    message = str(first.get("message") or getattr(exc, "message", None) or exc)
    return reason, message


def is_dml_conflict(exc: BaseException) -> bool:
    """Whether BigQuery refused a DML statement because of other DML on the same table.

    Two errors, neither retried by python-bigquery's default retry (their reasons are
    `invalidQuery` and `resourcesExceeded`, which also mean real mistakes):
    - "Could not serialize access to table P:D.T due to concurrent update" (invalidQuery):
      a concurrent mutating statement committed first;
    - "Resources exceeded during query execution: Too many DML statements outstanding
      against table P:D.T, limit is 20" (resourcesExceeded): the table's DML queue is full.
    Both leave the table as it was, so running the statement again is safe.
    """
    if not isinstance(exc, api_exceptions.GoogleAPICallError):
        return False
    texts = [str(getattr(exc, "message", "") or "")]
    texts += [str(e.get("message", "")) for e in (exc.errors or []) if isinstance(e, Mapping)]
    reasons = {str(e.get("reason", "")) for e in (exc.errors or []) if isinstance(e, Mapping)}
    text = " ".join(texts)
    if "due to concurrent update" in text and (not reasons or reasons & {"invalidQuery",
                                                                          "invalid"}):
        return True
    return ("Too many DML statements outstanding" in text
            and (not reasons or bool(reasons & {"resourcesExceeded", "quotaExceeded"})))


def is_retryable_job_failure(error_result: Mapping[str, object] | None) -> bool:
    """A load job's errorResult that BigQuery says may succeed when run again."""
    return bool(error_result) and str((error_result or {}).get("reason")) in \
        RETRYABLE_JOB_REASONS


def bigquery_type(arrow_type: pa.DataType) -> str:
    """Standard SQL type for an Arrow type.

    A naive timestamp is a wall-clock time (TLC pickups are New York local time)
    and becomes a DATETIME; as a TIMESTAMP it would read as that time in UTC.
    """
    if pa.types.is_timestamp(arrow_type):
        return "DATETIME" if arrow_type.tz is None else "TIMESTAMP"
    if pa.types.is_integer(arrow_type) and arrow_type != pa.uint64():
        return "INT64"
    if pa.types.is_floating(arrow_type):
        return "FLOAT64"
    if pa.types.is_string(arrow_type) or pa.types.is_large_string(arrow_type):
        return "STRING"
    if pa.types.is_boolean(arrow_type):
        return "BOOL"
    if pa.types.is_date32(arrow_type):
        return "DATE"
    raise TypeError(f"no BigQuery column type for Arrow type {arrow_type}")


def bigquery_schema(schema: pa.Schema) -> list[bigquery.SchemaField]:
    """The explicit BigQuery schema of an Arrow schema, same column order.

    The order matters: the emulator matches parquet columns by position.
    """
    fields = []
    for field in schema:
        gcp_names.COLUMN.check(field.name)
        fields.append(bigquery.SchemaField(
            field.name, bigquery_type(field.type), mode="NULLABLE" if field.nullable else "REQUIRED"
        ))
    return fields


def _digest(*parts: object) -> str:
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()


ParamValue = str | int | date | datetime


def _param(name: str, value: ParamValue) -> bigquery.ScalarQueryParameter:
    """A typed parameter: naive datetimes are DATETIME, aware ones TIMESTAMP."""
    if isinstance(value, bool):
        raise TypeError(f"no query parameter type for {value!r}")
    if isinstance(value, datetime):
        kind = "DATETIME" if value.tzinfo is None else "TIMESTAMP"
    elif isinstance(value, date):
        kind = "DATE"
    else:
        kind = "STRING" if isinstance(value, str) else "INT64"
    return bigquery.ScalarQueryParameter(name, kind, value)


def _month(value: date) -> date:
    """First day of the partition month of a DATE, DATETIME or (UTC) TIMESTAMP value."""
    if isinstance(value, datetime) and value.tzinfo is not None:
        value = value.astimezone(UTC)
    return date(value.year, value.month, 1)


def _next_month(first: date) -> date:
    return date(*month_after(first.year, first.month), 1)


@dataclass(frozen=True)
class Months:
    """Partition months `first`..`last` (first days, inclusive) holding a source's rows."""

    first: date
    last: date

    def covers(self, other: Months) -> bool:
        return self.first <= other.first and other.last <= self.last


# What the partition filter bounds by; None means unbounded (unknown months).
Bound = Months | None


@dataclass(frozen=True)
class _Staged:
    """What the staging table holds after the load job."""

    rows: int
    newer_generation: int | None  # set when the live object is a newer source generation
    # Months of the staged rows: None if some row has no partition value (or there
    # is no partition field); an empty staging table has no months either.
    months: Bound = None


class BigQueryWarehouse:
    """Idempotent per-object loads into partitioned, clustered tables of one dataset."""

    def __init__(
        self,
        client: bigquery.Client,
        dataset: str,
        location: str,
        *,
        partition_field: str | None = "pickup_datetime",
        cluster_fields: tuple[str, ...] = ("source_uri",),
        max_bytes_billed: int = DEFAULT_MAX_BYTES_BILLED,
        dml_retry_seconds: float = DEFAULT_DML_RETRY_SECONDS,
    ) -> None:
        self.client = client
        # Identifiers are formatted into SQL, so only valid spellings get through
        # (ValueError otherwise; settings are checked earlier, at process start).
        self.project = gcp_names.PROJECT_ID.check(str(client.project))
        self.dataset = gcp_names.DATASET.check(dataset)
        self.location = location
        self.partition_field = partition_field
        self.cluster_fields = cluster_fields
        self.max_bytes_billed = max_bytes_billed
        self.dml_retry_seconds = dml_retry_seconds
        self._ready: set[str] = set()
        # Overridable in tests: how the warehouse waits between attempts.
        self._sleep: Callable[[float], None] = time.sleep

    # -- names -----------------------------------------------------------------

    def table_uri(self, table: str) -> str:
        return f"bigquery://{self._table_id(table)}"

    def _table_id(self, table: str) -> str:
        gcp_names.TABLE.check(table)
        return f"{self.project}.{self.dataset}.{table}"

    def _sql(self, table: str) -> str:
        """A validated table path quoted for SQL."""
        return f"`{self._table_id(table)}`"

    @staticmethod
    def staging_table(table: str, source_uri: str, object_uri: str, object_generation: int
                      ) -> str:
        """One staging table per source and object generation.

        Retries of one load overwrite it (WRITE_TRUNCATE); concurrent loads of two
        generations of one source never share it, so neither merges the other's rows.
        """
        key = _digest(table, source_uri, object_uri, object_generation)[:16]
        return f"{STAGING_PREFIX}{table}_{key}"

    def _job_id(self, purpose: str, object_uri: str, object_generation: int,
                destination: str, attempt: int) -> str:
        """Deterministic: a retried load of the same object generation reuses the id.

        The destination is part of the key so two datasets of one project can load
        the same object without colliding.
        """
        key = _digest(object_uri, object_generation, purpose, destination)[:40]
        job_id = f"taxi_{purpose}_{key}"
        return job_id if attempt == 0 else f"{job_id}_retry{attempt}"

    # -- DDL ---------------------------------------------------------------------

    def _ensure_dataset(self) -> None:
        dataset_id = f"{self.project}.{self.dataset}"
        try:
            dataset = self.client.get_dataset(dataset_id)
        except api_exceptions.NotFound:
            new = bigquery.Dataset(dataset_id)
            new.location = self.location
            dataset = self.client.create_dataset(new, exists_ok=True)
        if dataset.location and dataset.location.upper() != self.location.upper():
            raise BigQueryLoadError(
                f"dataset {dataset_id} is in {dataset.location}, not {self.location}: set "
                f"TAXI_BQ_LOCATION={dataset.location} or choose another TAXI_BQ_DATASET."
            )

    def ensure_table(self, table: str, schema: pa.Schema) -> None:
        """Create the dataset, the table (partitioned, clustered) and `_loads` if missing.

        An existing table must have the schema's columns and types: loading into
        a table of another shape would fail half-way with a cryptic error.
        """
        if table in self._ready:
            return
        wanted = bigquery_schema(schema)
        self._ensure_dataset()
        target = bigquery.Table(self._table_id(table), schema=wanted)
        if self.partition_field is not None:
            self._require_column(schema, self.partition_field, "partition")
            target.time_partitioning = bigquery.TimePartitioning(
                type_=bigquery.TimePartitioningType.MONTH, field=self.partition_field
            )
        if self.cluster_fields:
            for name in self.cluster_fields:
                self._require_column(schema, name, "cluster")
            target.clustering_fields = list(self.cluster_fields)
        existing = self._get_or_create(target)
        self._check_columns(table, existing.schema, wanted)
        if self.cluster_fields and list(existing.clustering_fields or []) != list(
                self.cluster_fields):
            # Still correct, only dearer: the DELETE by source cannot skip blocks.
            logger.info("table %s is clustered on %s, not %s; loads work but scan more",
                        self._table_id(table), existing.clustering_fields,
                        list(self.cluster_fields))
        self._get_or_create(bigquery.Table(self._table_id(LOAD_LOG), schema=_LOG_SCHEMA))
        if self.partition_field is not None:
            self._get_or_create(bigquery.Table(self._table_id(LOAD_RANGES),
                                               schema=_RANGES_SCHEMA))
            self._init_ranges(table, self._partition_type(wanted))
        self._ready.add(table)

    def ensure_tables(self, schemas: dict[str, pa.Schema]) -> None:
        """Create every table that is missing (one per dataset), partitioned and clustered."""
        for table, schema in schemas.items():
            self.ensure_table(table, schema)

    def load_zones(self, rows: pa.Table, table: str) -> int:
        """Replace `table` with the zone lookup's rows: one load job, WRITE_TRUNCATE (atomic
        on BigQuery: a query sees the old lookup or the new one)."""
        self._ensure_dataset()
        wanted = bigquery_schema(rows.schema)
        self._get_or_create(bigquery.Table(self._table_id(table), schema=wanted))
        body = io.BytesIO()
        pq.write_table(rows, body)
        body.seek(0)
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET, schema=wanted,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE)
        job = self.client.load_table_from_file(body, self._table_id(table), job_config=config,
                                               location=self.location)
        job.result()
        return rows.num_rows

    def _partition_type(self, fields: list[bigquery.SchemaField]) -> str:
        return next(f.field_type for f in fields if f.name == self.partition_field)

    def _init_ranges(self, table: str, partition_type: str) -> None:
        """Record the months of every source in a table that has no `_load_ranges` rows.

        A table loaded before `_load_ranges` existed holds rows nobody recorded;
        one scan of its source and partition columns records them. Free on an
        empty (new) table; never needed again once a load recorded any months.
        """
        _, rows = self._query(
            f"SELECT COUNT(*) AS n FROM {self._sql(LOAD_RANGES)} WHERE table_name = @table_name",
            {"table_name": table},
        )
        if int(rows[0]["n"]) > 0:
            return
        field = f"`{self.partition_field}`"
        low, high = (f"MIN({field})", f"MAX({field})") if partition_type == "DATE" else (
            f"DATE(MIN({field}))", f"DATE(MAX({field}))")
        self._query(
            f"MERGE {self._sql(LOAD_RANGES)} AS R\n"
            f"USING (SELECT @table_name AS table_name, source_uri,"
            f" IF(COUNTIF({field} IS NULL) > 0, NULL, DATE_TRUNC({low}, MONTH)) AS lo,"
            f" IF(COUNTIF({field} IS NULL) > 0, NULL, DATE_TRUNC({high}, MONTH))"
            f" AS hi FROM {self._sql(table)} GROUP BY source_uri) AS N\n"
            "ON R.table_name = N.table_name AND R.source_uri = N.source_uri\n"
            + self._widen_clauses(),
            {"table_name": table},
        )

    @staticmethod
    def _widen_clauses() -> str:
        """MERGE clauses that widen a `_load_ranges` row by N.lo..N.hi (NULL: unknown)."""
        return (
            "WHEN MATCHED AND R.min_partition IS NOT NULL THEN UPDATE SET"
            " min_partition = IF(N.lo IS NULL OR N.hi IS NULL, NULL, LEAST(R.min_partition, N.lo)),"
            " max_partition = IF(N.lo IS NULL OR N.hi IS NULL, NULL,"
            " GREATEST(R.max_partition, N.hi)), updated_at = CURRENT_TIMESTAMP()\n"
            "WHEN NOT MATCHED THEN INSERT (table_name, source_uri, min_partition, max_partition,"
            " updated_at) VALUES (N.table_name, N.source_uri, N.lo, N.hi, CURRENT_TIMESTAMP())"
        )

    @staticmethod
    def _require_column(schema: pa.Schema, name: str, role: str) -> None:
        if name not in schema.names:
            raise ValueError(f"{role} column {name!r} is not in the schema ({schema.names})")

    def _get_or_create(self, table: bigquery.Table) -> bigquery.Table:
        try:
            return self.client.get_table(table.reference)
        except api_exceptions.NotFound:
            return self.client.create_table(table, exists_ok=True)

    def _check_columns(self, table: str, existing: list[bigquery.SchemaField],
                       wanted: list[bigquery.SchemaField]) -> None:
        have = {f.name: (_LEGACY_TYPES.get(f.field_type, f.field_type), f.mode) for f in existing}
        problems = []
        wall_clock = []  # TIMESTAMP columns an earlier version made of wall-clock times
        for field in wanted:
            found = have.get(field.name)
            if found is None:
                problems.append(f"{field.name} is missing")
            elif found[0] != field.field_type:
                problems.append(f"{field.name} is {found[0]}, expected {field.field_type}")
                if (found[0], field.field_type) == ("TIMESTAMP", "DATETIME"):
                    wall_clock.append(field.name)
            elif found[1] == "REQUIRED" and field.mode != "REQUIRED":
                problems.append(f"{field.name} is REQUIRED but the data may hold nulls")
        if problems and len(wall_clock) == len(problems):
            raise BigQueryLoadError(self._wall_clock_migration(table, wall_clock))
        if problems:
            raise BigQueryLoadError(
                f"table {self._table_id(table)} does not fit the processed files: "
                f"{'; '.join(problems)}. Migrate it, or load into a new table (TAXI_TABLE)."
            )

    def _wall_clock_migration(self, table: str, columns: list[str]) -> str:
        """What to do with a table whose wall-clock columns an earlier version made TIMESTAMP.

        That version loaded New York wall-clock times as if they were UTC, so the
        stored instants carry the wall-clock digits in UTC: DATETIME(ts, 'UTC')
        gives them back unchanged (a New York zone would shift them by 4-5 hours).
        """
        new = f"{table}_datetime"
        replace = ", ".join(f"DATETIME(`{c}`, 'UTC') AS `{c}`" for c in columns)
        partition = ""
        if self.partition_field is not None:
            trunc = "DATETIME_TRUNC" if self.partition_field in columns else "TIMESTAMP_TRUNC"
            partition = f" PARTITION BY {trunc}(`{self.partition_field}`, MONTH)"
        cluster = (f" CLUSTER BY {', '.join(f'`{c}`' for c in self.cluster_fields)}"
                   if self.cluster_fields
                   else "")
        return (
            f"table {self._table_id(table)} stores {', '.join(columns)} as TIMESTAMP (an earlier "
            "version's wall-clock times read as UTC); they are DATETIME now. Either set "
            "TAXI_TABLE to a new table name and re-emit the processed files to fill it "
            "(taxi-pipeline reemit --stage processed <prefix>), or convert this table while "
            "no load runs (pause the load deployment), keeping the wall-clock digits:\n"
            f"  CREATE TABLE {self._sql(new)}{partition}{cluster} AS SELECT * REPLACE "
            f"({replace}) FROM {self._sql(table)};\n"
            f"  DROP TABLE {self._sql(table)};\n"
            f"  ALTER TABLE {self._sql(new)} RENAME TO `{table}`;"
        )

    # -- queries -----------------------------------------------------------------

    def _query(self, sql: str, params: Mapping[str, ParamValue] | None = None
               ) -> tuple[bigquery.QueryJob, list[bigquery.Row]]:
        """Run one parameterised statement; (finished job, result rows).

        Every statement is capped at `max_bytes_billed` (TAXI_BQ_MAX_BYTES_BILLED). A
        statement refused because other DML held the table (`is_dml_conflict`) runs
        again after a backoff with jitter, for up to `dml_retry_seconds`: a second
        writer (a manual re-emit, another pool, a person's query) delays a load but
        cannot fail it. Each attempt is a new job (the client names it), and a refused
        DML statement changed nothing, so running it again is safe.
        """
        config = bigquery.QueryJobConfig(
            query_parameters=[_param(name, value) for name, value in (params or {}).items()],
            maximum_bytes_billed=self.max_bytes_billed,
        )
        deadline = time.monotonic() + self.dml_retry_seconds
        delay = DML_RETRY_FIRST
        attempt = 0
        while True:
            attempt += 1
            try:
                job = self.client.query(sql, job_config=config, location=self.location,
                                        job_id_prefix="taxi_")
                return job, list(job.result())
            except api_exceptions.GoogleAPICallError as exc:
                reason, message = error_reason(exc)
                if reason == "bytesBilledLimitExceeded" or "limit for bytes billed" in message:
                    raise BigQueryLoadError(
                        f"BigQuery refused a statement that would bill more than "
                        f"{self.max_bytes_billed} bytes ({message}); nothing changed. A load "
                        "never needs that much: check that the table is partitioned by month "
                        "and clustered on source_uri. For a one-off (the first load into a "
                        "large table made before this version), raise "
                        "TAXI_BQ_MAX_BYTES_BILLED and re-emit the object. Statement: "
                        f"{sql.splitlines()[0][:160]}"
                    ) from exc
                wait = min(delay, DML_RETRY_MAX) * random.uniform(0.5, 1.0)
                if not is_dml_conflict(exc) or time.monotonic() + wait > deadline:
                    raise
                logger.warning("statement refused by concurrent DML (%s), attempt %d; running "
                               "it again in %.1fs: %s", message, attempt, wait,
                               sql.splitlines()[0][:120])
                self._sleep(wait)
                delay *= 2

    def _previous_load(self, table: str, source_uri: str) -> tuple[int, str, int, int] | None:
        """(source generation, object URI, object generation, rows) of the last load."""
        _, rows = self._query(
            "SELECT source_generation, object_uri, object_generation, rows FROM "
            f"{self._sql(LOAD_LOG)}"
            " WHERE table_name = @table_name AND source_uri = @source_uri"
            " ORDER BY source_generation DESC, loaded_at DESC LIMIT 1",
            {"table_name": table, "source_uri": source_uri},
        )
        if not rows:
            return None
        row = rows[0]
        return (int(row["source_generation"]), str(row["object_uri"]),
                int(row["object_generation"]), int(row["rows"] or 0))

    # -- the load ------------------------------------------------------------------

    def load_object(
        self,
        *,
        object_uri: str,
        object_generation: int,
        table: str,
        schema: pa.Schema,
        source_uri: str,
        source_generation: int,
    ) -> LoadResult:
        """Replace the rows of `source_uri` in `table` with the object's rows, atomically.

        Loading the same object generation again changes nothing; an older
        generation of the source than the one loaded is refused as superseded.
        """
        if not object_uri.startswith("gs://"):
            raise ValueError(f"the BigQuery warehouse loads gs:// objects, not {object_uri!r}")
        try:
            return self._load(object_uri, object_generation, table, schema, source_uri,
                              source_generation)
        except api_exceptions.Forbidden as exc:
            raise BigQueryLoadError(
                f"BigQuery refused the load of {object_uri} into {self._table_id(table)}: "
                f"{exc.message}. The identity needs roles/bigquery.jobUser on project "
                f"{self.project}, roles/bigquery.dataEditor on dataset {self.dataset} and "
                "roles/storage.objectViewer on the bucket."
            ) from exc

    def _load(self, object_uri: str, object_generation: int, table: str, schema: pa.Schema,
              source_uri: str, source_generation: int) -> LoadResult:
        def result(status: str, rows: int = 0, replaced: int = 0) -> LoadResult:
            return LoadResult(table, source_uri, source_generation, rows, replaced, status)

        self.ensure_table(table, schema)
        previous = self._previous_load(table, source_uri)
        if previous is not None:
            if previous[0] > source_generation:
                return result("superseded")
            if previous[:3] == (source_generation, object_uri, object_generation):
                return result("already_loaded", rows=previous[3])  # the rows it holds

        staging = self.staging_table(table, source_uri, object_uri, object_generation)
        staged = self._stage(object_uri, object_generation, staging, schema, source_uri,
                             source_generation)
        if staged.newer_generation is not None:
            logger.info("%s now holds source generation %d, not %d: superseded", object_uri,
                        staged.newer_generation, source_generation)
            self._drop(staging)
            return result("superseded")

        inserted, deleted = self._replace_rows_within_months(
            table, staging, schema, source_uri, source_generation, staged)
        if inserted == 0 and staged.rows > 0:  # a newer generation was merged meanwhile
            self._drop(staging)
            return result("superseded", 0, deleted)
        self._record(table, source_uri, source_generation, object_uri, object_generation,
                     inserted)
        self._drop(staging)
        return result("loaded", inserted, deleted)

    def _stage(self, object_uri: str, object_generation: int, staging: str, schema: pa.Schema,
               source_uri: str, source_generation: int) -> _Staged:
        """Load the object into the staging table and check its rows' lineage.

        Attempt n runs under job id `_job_id(..., n)`. BigQuery answers 409 for an id
        that ran before; that job is adopted (waited for) and trusted only if it
        succeeded and the staging table still holds its rows. Otherwise (it failed,
        or a finished run already dropped its staging table) the next attempt id is
        tried: a failed job never blocks the object, and the load log, not the job,
        decides what counts as loaded, so another attempt never doubles rows.
        A job of this run that fails with a transient reason (backendError,
        internalError, rateLimitExceeded) is run again at once, at most
        JOB_RETRIES_IN_RUN times; other failures are raised, and the next run (task
        retry, recover, reconcile, a re-emit) starts from the next attempt id.
        """
        fields = bigquery_schema(schema)
        retried = 0
        last_failure = ""
        for attempt in range(MAX_LOAD_ATTEMPTS):
            self._create_staging(staging, fields)
            job_id = self._job_id("stage", object_uri, object_generation,
                                  self._table_id(staging), attempt)
            job, adopted, failure = self._run_load_job(job_id, object_uri, staging, fields)
            if failure is not None:
                last_failure = failure
                if adopted:
                    logger.info("load job %s for %s failed on an earlier run (%s); loading "
                                "under the next attempt id", job_id, object_uri, failure)
                    continue
                if is_retryable_job_failure(job.error_result) and retried < JOB_RETRIES_IN_RUN:
                    retried += 1
                    wait = min(2.0 ** retried, 30.0) * random.uniform(0.5, 1.0)
                    logger.warning("load job %s for %s failed (%s), which BigQuery says may "
                                   "succeed when run again; loading under the next attempt id "
                                   "in %.1fs", job_id, object_uri, failure, wait)
                    self._sleep(wait)
                    continue
                raise BigQueryLoadError(
                    f"load job {job_id} could not read {object_uri}: {failure}. Nothing in "
                    "the table changed. If the object is missing or is not a parquet file "
                    "written by the transform flow, re-run the transform for its source; if "
                    "BigQuery lacks access, grant it (roles/storage.objectViewer on the "
                    "bucket). The next run of this load uses a new job id, so once the cause "
                    "is fixed it loads by itself (task retries, the recover and reconcile "
                    "deployments) or at once when you re-emit it (`taxi-pipeline reemit`)."
                )
            staged = self._inspect_staging(staging, object_uri, source_uri, source_generation)
            if staged is not None and staged.rows == (job.output_rows or 0):
                return staged
            if not adopted:
                raise BigQueryLoadError(
                    f"load job {job_id} reported {job.output_rows} rows of {object_uri} but "
                    f"staging table {self._table_id(staging)} holds "
                    f"{'none' if staged is None else staged.rows}: another run loaded the same "
                    "object at the same time. Retry; it will find the object loaded."
                )
            logger.info("job %s for %s ran before but staging no longer holds its rows; "
                        "loading again", job_id, object_uri)
        raise BigQueryLoadError(
            f"{object_uri} (generation {object_generation}) has had {MAX_LOAD_ATTEMPTS} load "
            f"jobs, none of them recorded in the load log; the last said: "
            f"{last_failure or 'succeeded, but its staging table was gone'}. Look at the "
            "jobs in the BigQuery console (ids taxi_stage_...), fix the cause, then write a "
            "new generation of the object (re-run the transform for its source)."
        )

    def _create_staging(self, staging: str, fields: list[bigquery.SchemaField]) -> None:
        """The emulator cannot load into a missing table, so create it first."""
        table = bigquery.Table(self._table_id(staging), schema=fields)
        table.expires = datetime.now(UTC) + STAGING_TTL
        self.client.create_table(table, exists_ok=True)

    def _run_load_job(self, job_id: str, object_uri: str, staging: str,
                      fields: list[bigquery.SchemaField]
                      ) -> tuple[bigquery.LoadJob, bool, str | None]:
        """(finished load job, adopted, why it failed or None).

        Adopted means the id existed already (409 Conflict): that job is waited for.
        """
        config = bigquery.LoadJobConfig(
            source_format=bigquery.SourceFormat.PARQUET,
            write_disposition=bigquery.WriteDisposition.WRITE_TRUNCATE,
            create_disposition=bigquery.CreateDisposition.CREATE_IF_NEEDED,
            schema=fields,
        )
        adopted = False
        try:
            job = self.client.load_table_from_uri(
                object_uri, self._table_id(staging), job_id=job_id, location=self.location,
                job_config=config,
            )
        except api_exceptions.Conflict:
            adopted = True
            found = self.client.get_job(job_id, location=self.location)
            if not isinstance(found, bigquery.LoadJob):
                raise BigQueryLoadError(
                    f"job id {job_id} is taken by a {type(found).__name__}, not a load job"
                ) from None
            job = found
        try:
            job.result()
        except api_exceptions.GoogleAPICallError as exc:
            result = job.error_result or {}
            reason = str(result.get("reason") or error_reason(exc)[0] or type(exc).__name__)
            message = str(result.get("message") or error_reason(exc)[1])
            return job, adopted, f"{reason}: {message}"
        return job, adopted, None

    def _inspect_staging(self, staging: str, object_uri: str, source_uri: str,
                         source_generation: int) -> _Staged | None:
        """Rows in staging and whether they carry the expected lineage; None if it is gone.

        A load job reads the live object, which may be a newer generation than the
        event named: its rows then carry a newer source generation.
        """
        partition = ""
        if self.partition_field is not None:
            field = f"`{self.partition_field}`"
            partition = (f" MIN({field}) AS min_partition, MAX({field}) AS max_partition,"
                         f" COUNTIF({field} IS NULL) AS unpartitioned,")
        try:
            _, rows = self._query(
                "SELECT COUNT(*) AS n, COUNTIF(source_uri != @source_uri) AS foreign_rows,"
                f"{partition} MIN(source_generation) AS min_generation,"
                f" MAX(source_generation) AS max_generation FROM {self._sql(staging)}",
                {"source_uri": source_uri},
            )
        except api_exceptions.NotFound:
            return None
        row = rows[0]
        count = int(row["n"])
        if count == 0:
            return _Staged(0, None)
        months = None
        if self.partition_field is not None and int(row["unpartitioned"]) == 0:
            months = Months(_month(row["min_partition"]), _month(row["max_partition"]))
        low, high = int(row["min_generation"]), int(row["max_generation"])
        if int(row["foreign_rows"]) == 0 and low == high:
            if high == source_generation:
                return _Staged(count, None, months)
            if high > source_generation:
                return _Staged(count, high, months)
        self._drop(staging)
        raise BigQueryLoadError(
            f"{object_uri} does not hold the rows of {source_uri} generation "
            f"{source_generation} (its rows name {row['foreign_rows']} other sources and "
            f"generations {low}..{high}); the table was not changed. Re-run the transform "
            "for the source so the processed object matches its lineage."
        )

    def _months(self, table: str, source_uri: str) -> tuple[bool, Bound]:
        """(recorded, months): whether `_load_ranges` has a row for the source, and its months."""
        _, rows = self._query(
            f"SELECT min_partition, max_partition FROM {self._sql(LOAD_RANGES)}"
            " WHERE table_name = @table_name AND source_uri = @source_uri",
            {"table_name": table, "source_uri": source_uri},
        )
        if not rows:
            return False, None
        low, high = rows[0]["min_partition"], rows[0]["max_partition"]
        return True, (None if low is None or high is None else Months(low, high))

    def _widen(self, table: str, source_uri: str, staged: _Staged) -> Bound:
        """Add the staged rows' months to the source's months; the months to bound by.

        Written before the MERGE, so a crash after it cannot leave rows outside
        the recorded months for a later load to miss.
        """
        if staged.rows == 0:  # nothing to add
            recorded, months = self._months(table, source_uri)
            return months if recorded else None
        params: dict[str, ParamValue] = {"table_name": table, "source_uri": source_uri}
        if staged.months is None:
            values = "CAST(NULL AS DATE) AS lo, CAST(NULL AS DATE) AS hi"
        else:
            values = "@lo AS lo, @hi AS hi"
            params.update(lo=staged.months.first, hi=staged.months.last)
        self._query(
            f"MERGE {self._sql(LOAD_RANGES)} AS R\n"
            f"USING (SELECT @table_name AS table_name, @source_uri AS source_uri, {values}) AS N\n"
            "ON R.table_name = N.table_name AND R.source_uri = N.source_uri\n"
            + self._widen_clauses(),
            params,
        )
        return self._months(table, source_uri)[1]

    def _replace_rows_within_months(self, table: str, staging: str, schema: pa.Schema,
                                    source_uri: str, source_generation: int,
                                    staged: _Staged) -> tuple[int, int]:
        """(inserted, deleted): the MERGE bounded by the source's recorded months.

        A racing load of the same source widens the months before its MERGE; if
        that happened before ours committed, the months read after ours are wider
        and the MERGE runs again over them (it replaces, so running twice is
        harmless): no row of the source is ever outside the partitions scanned.
        """
        if self.partition_field is None:
            return self._replace_rows(table, staging, schema, source_uri, source_generation,
                                      staged.rows, None)
        bound = self._widen(table, source_uri, staged)
        deleted = 0
        if bound is None and staged.rows == 0 and not self._months(table, source_uri)[0]:
            # Nothing to insert and no months recorded: the table holds no row of this
            # source (`_init_ranges` recorded every older one), so there is nothing to
            # delete either, and the MERGE, with no months to bound it, would scan the
            # whole table for nothing. (Recorded but unknown months still take the
            # unbounded MERGE, capped by TAXI_BQ_MAX_BYTES_BILLED: rows are out there.)
            return 0, 0
        while True:
            inserted, removed = self._replace_rows(table, staging, schema, source_uri,
                                                   source_generation, staged.rows, bound)
            deleted += removed
            if bound is None:
                return inserted, deleted
            recorded, now = self._months(table, source_uri)
            if recorded and now is not None and bound.covers(now):
                return inserted, deleted
            logger.info("months of %s widened to %s during the load; merging again", source_uri,
                        now)
            bound = now
            deleted -= inserted  # our own rows, deleted again by the next MERGE

    def _partition_filter(self, alias: str, bound: Bound, schema: pa.Schema
                          ) -> tuple[str, dict[str, ParamValue]]:
        """` AND <alias>.<partition> >= @part_lo AND ... < @part_hi` in the column's type.

        Constant bounds of the column's own type let BigQuery prune partitions.
        """
        if bound is None or self.partition_field is None:
            return "", {}
        low, high = bound.first, _next_month(bound.last)
        kind = self._partition_type(bigquery_schema(schema))
        values: dict[str, ParamValue]
        if kind == "DATETIME":
            values = {"part_lo": datetime(low.year, low.month, 1),
                      "part_hi": datetime(high.year, high.month, 1)}
        elif kind == "TIMESTAMP":
            values = {"part_lo": datetime(low.year, low.month, 1, tzinfo=UTC),
                      "part_hi": datetime(high.year, high.month, 1, tzinfo=UTC)}
        else:
            values = {"part_lo": low, "part_hi": high}
        column = f"{alias}`{self.partition_field}`"
        return f" AND {column} >= @part_lo AND {column} < @part_hi", values

    def _replace_rows(self, table: str, staging: str, schema: pa.Schema, source_uri: str,
                      source_generation: int, staged_rows: int, bound: Bound
                      ) -> tuple[int, int]:
        """(inserted, deleted) by ONE atomic MERGE.

        `ON FALSE` makes every source row of the target "not matched by source"
        (deleted) and every staging row "not matched" (inserted). The USING guard
        inserts nothing while the target holds a newer generation of the source,
        and the DELETE spares such rows. Both only look at the partitions of
        `bound` (all of them when None). The explicit INSERT column list (not
        `INSERT ROW`) is needed by the emulator and fine on BigQuery.
        """
        columns = [f"`{name}`" for name in schema.names]  # validated by bigquery_schema
        target = self._sql(table)
        inner, params = self._partition_filter("G.", bound, schema)
        outer, _ = self._partition_filter("T.", bound, schema)
        job, _ = self._query(
            f"MERGE {target} AS T\n"
            f"USING (\n"
            f"  SELECT * FROM {self._sql(staging)}\n"
            f"  WHERE NOT EXISTS (SELECT 1 FROM {target} AS G\n"
            f"    WHERE G.source_uri = @source_uri AND G.source_generation > @source_generation"
            f"{inner})\n"
            f") AS S\n"
            f"ON FALSE\n"
            f"WHEN NOT MATCHED BY SOURCE AND T.source_uri = @source_uri\n"
            f"  AND T.source_generation <= @source_generation{outer} THEN DELETE\n"
            f"WHEN NOT MATCHED THEN INSERT ({', '.join(columns)})\n"
            f"  VALUES ({', '.join('S.' + c for c in columns)})",
            {"source_uri": source_uri, "source_generation": source_generation, **params},
        )
        stats = job.dml_stats
        if stats is not None:
            return int(stats.inserted_row_count), int(stats.deleted_row_count)
        # The emulator reports only the total; the guard inserts all staged rows or none.
        affected = int(job.num_dml_affected_rows or 0)
        inserted = staged_rows if affected >= staged_rows else 0
        return inserted, affected - inserted

    def _record(self, table: str, source_uri: str, source_generation: int, object_uri: str,
                object_generation: int, rows: int) -> None:
        """Upsert the `_loads` row; a lower generation never overwrites a higher one."""
        self._query(
            f"MERGE {self._sql(LOAD_LOG)} AS L\n"
            "USING (SELECT @table_name AS table_name, @source_uri AS source_uri,"
            " @source_generation AS source_generation, @object_uri AS object_uri,"
            " @object_generation AS object_generation, @rows AS `rows`) AS N\n"
            "ON L.table_name = N.table_name AND L.source_uri = N.source_uri\n"
            "WHEN MATCHED AND L.source_generation <= N.source_generation THEN UPDATE SET"
            " source_generation = N.source_generation, object_uri = N.object_uri,"
            " object_generation = N.object_generation, `rows` = N.`rows`,"
            " loaded_at = CURRENT_TIMESTAMP()\n"
            "WHEN NOT MATCHED THEN INSERT (table_name, source_uri, source_generation,"
            " object_uri, object_generation, `rows`, loaded_at) VALUES (N.table_name,"
            " N.source_uri, N.source_generation, N.object_uri, N.object_generation, N.`rows`,"
            " CURRENT_TIMESTAMP())",
            {"table_name": table, "source_uri": source_uri,
             "source_generation": source_generation, "object_uri": object_uri,
             "object_generation": object_generation, "rows": rows},
        )

    def _drop(self, staging: str) -> None:
        """Best effort: a leftover staging table expires by itself."""
        try:
            self.client.delete_table(self._table_id(staging), not_found_ok=True)
        except api_exceptions.GoogleAPICallError as exc:
            logger.warning("could not drop staging table %s: %s", staging, exc)

    # -- reads ---------------------------------------------------------------------

    def loaded(self, table: str, source_uri: str) -> tuple[int, int] | None:
        """(source generation, rows) of the last load of `source_uri`, or None."""
        try:
            _, rows = self._query(
                f"SELECT source_generation, `rows` FROM {self._sql(LOAD_LOG)}"
                " WHERE table_name = @table_name AND source_uri = @source_uri"
                " ORDER BY source_generation DESC, loaded_at DESC LIMIT 1",
                {"table_name": table, "source_uri": source_uri},
            )
        except api_exceptions.NotFound:
            return None
        return (int(rows[0]["source_generation"]), int(rows[0]["rows"])) if rows else None

    def rows_for(self, table: str, source_uri: str) -> int | None:
        """Rows loaded from `source_uri`, or None when the table does not exist yet."""
        try:
            _, rows = self._query(
                f"SELECT COUNT(*) AS n FROM {self._sql(table)} WHERE source_uri = @source_uri",
                {"source_uri": source_uri},
            )
        except api_exceptions.NotFound:
            return None
        return int(rows[0]["n"])

    def loads(self) -> list[dict[str, object]]:
        """The load log, newest first (what the status command shows)."""
        try:
            _, rows = self._query(f"SELECT * FROM {self._sql(LOAD_LOG)} ORDER BY loaded_at DESC")
        except api_exceptions.NotFound:
            return []
        return [dict(row.items()) for row in rows]
