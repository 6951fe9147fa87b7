"""`taxi-pipeline query "SQL"`: ask the warehouse of any profile, get a table or one line.

Locally the DuckDB file is attached read-only to an in-memory database, and each
of the pipeline's tables that does not exist yet (nothing loaded, or no file at
all) stands in as an empty temporary table: on an empty warehouse a query
answers 0 rows instead of "table not found", and nothing is written. On the
emulator and gcp profiles the query runs in BigQuery with the dataset as its
default and the bytes-billed cap of every pipeline statement; a pipeline table
that was never created answers 0 rows the same way. Any other error is one line.

`rejects_by_reason` is the ready query for rejected rows: they live in the
bucket's rejects/ files, not in the warehouse, so it reads their `reject_reason`
column through the object store, the same way on every profile.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from taxi_pipeline.objects import dataset_of
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectStore

MAX_ROWS = 1000


class QueryError(Exception):
    """What went wrong, in one line a person can act on."""


@dataclass
class QueryResult:
    columns: list[str]
    rows: list[tuple[Any, ...]]
    truncated: bool = False
    notes: list[str] = field(default_factory=list)


def pipeline_schemas(settings: Settings) -> dict[str, pa.Schema]:
    """Every table the pipeline creates (each dataset's table and `zones`) -> schema."""
    from taxi_pipeline.datasets.zones import ZONES_SCHEMA, ZONES_TABLE
    from taxi_pipeline.ops.zones import dataset_schemas

    return {**dataset_schemas(settings), ZONES_TABLE: ZONES_SCHEMA}


def run_query(settings: Settings, sql: str, max_rows: int = MAX_ROWS) -> QueryResult:
    if not sql.strip():
        raise QueryError("no SQL given: taxi-pipeline query \"select count(*) from trips\"")
    if settings.profile == "local":
        return _duckdb(settings, sql, max_rows)
    return _bigquery(settings, sql, max_rows)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0]


def _duckdb(settings: Settings, sql: str, max_rows: int) -> QueryResult:
    try:
        import duckdb

        from taxi_pipeline.warehouse.duckdb_warehouse import duckdb_type
    except ModuleNotFoundError as exc:  # the image has no local extra
        raise QueryError(f"the local warehouse needs the 'local' extra ({exc.name} is not "
                         "installed): pip install 'taxi-pipeline[local]'") from None
    path = settings.warehouse_file
    con = duckdb.connect()
    result = QueryResult([], [])
    present: set[str] = set()
    try:
        if path.exists():
            quoted = str(path).replace("'", "''")
            try:
                con.execute(f"ATTACH '{quoted}' AS warehouse (READ_ONLY)")
            except duckdb.IOException as exc:
                if "lock" in str(exc).lower():
                    raise QueryError(f"{path} is being written (a load holds it): try again "
                                     "in a few seconds") from None
                raise
            con.execute("USE warehouse")
            present = {str(r[0]) for r in con.execute(
                "SELECT table_name FROM information_schema.tables "
                "WHERE table_catalog = 'warehouse'").fetchall()}
        else:
            result.notes.append(f"the warehouse is empty: no loads yet ({path} does not exist)")
        for table, schema in pipeline_schemas(settings).items():
            if table not in present:
                columns = ", ".join(f'"{f.name}" {duckdb_type(f.type)}' for f in schema)
                con.execute(f'CREATE TEMP TABLE "{table}" ({columns})')
        cursor = con.execute(sql)
        result.columns = [str(d[0]) for d in cursor.description or []]
        rows = cursor.fetchmany(max_rows + 1) if cursor.description else []
        result.rows, result.truncated = rows[:max_rows], len(rows) > max_rows
        return result
    except duckdb.Error as exc:
        raise QueryError(_first_line(exc)) from None
    finally:
        con.close()


def _bigquery(settings: Settings, sql: str, max_rows: int) -> QueryResult:
    from google.api_core import exceptions as gexc
    from google.cloud import bigquery

    from taxi_pipeline.gcp.clients import bigquery_client

    client = bigquery_client(settings)
    config = bigquery.QueryJobConfig(
        default_dataset=f"{settings.gcp_project}.{settings.bq_dataset}",
        maximum_bytes_billed=settings.bq_max_bytes_billed)
    try:
        rows = client.query(sql, job_config=config).result(max_results=max_rows + 1)
        columns = [f.name for f in rows.schema]
        values = [tuple(row.values()) for row in rows]
    except gexc.NotFound as exc:
        found = re.search(r"Not found: (?:Table|Dataset) ([\w.:-]+)", str(exc))
        missing = re.split(r"[.:]", found.group(1))[-1] if found else ""
        if missing in pipeline_schemas(settings) or missing == settings.bq_dataset:
            return QueryResult([], [], notes=[
                f"{missing} does not exist yet: nothing has been loaded into it (0 rows)"])
        raise QueryError(_first_line(exc)) from None
    except gexc.GoogleAPICallError as exc:
        raise QueryError(_first_line(exc)) from None
    return QueryResult(columns, values[:max_rows], len(values) > max_rows)


def rejects_by_reason(settings: Settings, store: ObjectStore) -> QueryResult:
    """Rejected rows per dataset and reason, read from every rejects/ file."""
    counts: Counter[tuple[str, str]] = Counter()
    files = 0
    for ref in store.list(settings.rejects_prefix):
        if not ref.name.endswith(".parquet"):
            continue
        files += 1
        with store.open_read(ref) as reader:
            parquet = pq.ParquetFile(reader)
            if "reject_reason" not in parquet.schema_arrow.names:
                continue
            for batch in parquet.iter_batches(columns=["reject_reason"]):
                for reason, n in Counter(batch.column(0).to_pylist()).items():
                    counts[(dataset_of(ref.name) or "?", str(reason))] += n
    rows = [(dataset, reason, n) for (dataset, reason), n in
            sorted(counts.items(), key=lambda item: (item[0][0], -item[1]))]
    notes = [] if files else [f"no rejects files under {settings.rejects_prefix} yet"]
    return QueryResult(["dataset", "reject_reason", "rows"], rows, notes=notes)


def render(result: QueryResult) -> str:
    """An aligned text table and a row count, as psql and duckdb print them."""
    lines: list[str] = []
    if result.columns:
        cells = [[("NULL" if v is None else f"{v:,}" if isinstance(v, int) and not
                   isinstance(v, bool) else str(v)) for v in row] for row in result.rows]
        widths = [max([len(c), *(len(r[i]) for r in cells)]) for i, c in enumerate(result.columns)]
        lines.append("  ".join(c.ljust(w) for c, w in zip(result.columns, widths, strict=True)))
        lines.append("  ".join("-" * w for w in widths))
        for row in cells:
            lines.append("  ".join(v.rjust(w) if v.replace(",", "").lstrip("-").isdigit()
                                   else v.ljust(w) for v, w in zip(row, widths, strict=True))
                         .rstrip())
    count = len(result.rows)
    lines.append(f"({count:,} row{'s' if count != 1 else ''}"
                 + (f", the first {count:,} only" if result.truncated else "") + ")")
    return "\n".join(lines)
