"""The local profile's warehouse: one DuckDB file.

DuckDB reads the parquet file itself, so no row passes through Python. A DuckDB
file takes one writer process at a time, so every operation opens, works and
closes, retrying while another process holds the lock.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb
import pyarrow as pa

from taxi_pipeline.objects import parse_uri
from taxi_pipeline.warehouse.base import LoadResult

LOAD_LOG = "_loads"

_ARROW_TO_DUCKDB = {
    pa.int16(): "SMALLINT",
    pa.int32(): "INTEGER",
    pa.int64(): "BIGINT",
    pa.float64(): "DOUBLE",
    pa.string(): "VARCHAR",
    pa.large_string(): "VARCHAR",
    pa.bool_(): "BOOLEAN",
    pa.timestamp("us"): "TIMESTAMP",
    pa.timestamp("us", tz="UTC"): "TIMESTAMPTZ",
    pa.date32(): "DATE",
}


def duckdb_type(arrow_type: pa.DataType) -> str:
    try:
        return _ARROW_TO_DUCKDB[arrow_type]
    except KeyError:
        raise TypeError(f"no DuckDB column type for Arrow type {arrow_type}") from None


def _has_table(con: duckdb.DuckDBPyConnection, name: str) -> bool:
    row = con.execute(
        "SELECT count(*) FROM information_schema.tables WHERE table_name = ?", [name]
    ).fetchone()
    return bool(row and row[0])


def _quote(identifier: str) -> str:
    return '"' + identifier.replace('"', '""') + '"'


class DuckDBWarehouse:
    """Idempotent per-object loads into one table of a DuckDB file."""

    def __init__(self, path: Path, lock_timeout: float = 120.0) -> None:
        self.path = path
        self.lock_timeout = lock_timeout

    def table_uri(self, table: str) -> str:
        return f"duckdb://{self.path}#{table}"

    @contextmanager
    def connect(self, read_only: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection, waiting while another process holds the file's lock."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + self.lock_timeout
        delay = 0.05
        while True:
            try:
                con = duckdb.connect(str(self.path), read_only=read_only and self.path.exists())
                break
            except duckdb.IOException as exc:
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"cannot open warehouse {self.path}: {exc}. Another process holds it; "
                        "stop it or raise the lock timeout."
                    ) from exc
                time.sleep(delay)
                delay = min(delay * 2, 1.0)
        try:
            yield con
        finally:
            con.close()

    def ensure_table(self, con: duckdb.DuckDBPyConnection, table: str, schema: pa.Schema) -> None:
        columns = ",\n  ".join(
            f"{_quote(f.name)} {duckdb_type(f.type)}{'' if f.nullable else ' NOT NULL'}"
            for f in schema
        )
        con.execute(f"CREATE TABLE IF NOT EXISTS {_quote(table)} (\n  {columns}\n)")
        con.execute(
            f"CREATE TABLE IF NOT EXISTS {LOAD_LOG} ("
            " table_name VARCHAR, source_uri VARCHAR, source_generation BIGINT,"
            " object_uri VARCHAR, object_generation BIGINT, rows BIGINT,"
            " loaded_at TIMESTAMPTZ DEFAULT current_timestamp,"
            " PRIMARY KEY (table_name, source_uri))"
        )

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
        """Replace the rows of `source_uri` with the rows of the parquet file, atomically.

        Loading the same object generation again changes nothing; an older
        generation of the source than the one loaded is refused as superseded.
        """
        scheme, _, local_path = parse_uri(object_uri)
        if scheme != "file":
            raise ValueError(f"the DuckDB warehouse loads file:// objects, not {object_uri!r}")
        columns = ", ".join(_quote(f.name) for f in schema)
        with self.connect() as con:
            self.ensure_table(con, table, schema)
            con.execute("BEGIN TRANSACTION")
            try:
                previous = con.execute(
                    f"SELECT source_generation, object_uri, object_generation, rows "
                    f"FROM {LOAD_LOG} WHERE table_name = ? AND source_uri = ?",
                    [table, source_uri],
                ).fetchone()
                if previous is not None:
                    loaded_generation, loaded_object, loaded_object_generation, held = previous
                    status = None
                    if loaded_generation > source_generation:
                        status = "superseded"
                    elif (loaded_generation, loaded_object, loaded_object_generation) == (
                        source_generation, object_uri, object_generation
                    ):
                        status = "already_loaded"
                    if status:
                        con.execute("ROLLBACK")
                        # already_loaded: the rows the table holds for it, not 0 (a re-run
                        # reads "already loaded, N rows", which is what a person asks)
                        rows = int(held) if status == "already_loaded" else 0
                        return LoadResult(table, source_uri, source_generation, rows, 0, status)
                deleted_row = con.execute(
                    f"DELETE FROM {_quote(table)} WHERE source_uri = ?", [source_uri]
                ).fetchone()
                deleted = int(deleted_row[0]) if deleted_row else 0
                inserted_row = con.execute(
                    f"INSERT INTO {_quote(table)} ({columns}) "
                    f"SELECT {columns} FROM read_parquet(?)",
                    [local_path],
                ).fetchone()
                inserted = int(inserted_row[0]) if inserted_row else 0
                # loaded_at is named: on conflict DuckDB keeps the columns left out,
                # which would keep the first load's time after a replacement.
                con.execute(
                    f"INSERT OR REPLACE INTO {LOAD_LOG} (table_name, source_uri,"
                    " source_generation, object_uri, object_generation, rows, loaded_at)"
                    " VALUES (?, ?, ?, ?, ?, ?, current_timestamp)",
                    [table, source_uri, source_generation, object_uri, object_generation,
                     inserted],
                )
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return LoadResult(table, source_uri, source_generation, inserted, deleted, "loaded")

    def ensure_tables(self, schemas: dict[str, pa.Schema]) -> None:
        """Create every table that is missing (one per dataset), and the load log."""
        with self.connect() as con:
            for table, schema in schemas.items():
                self.ensure_table(con, table, schema)

    def load_zones(self, rows: pa.Table, table: str) -> int:
        """Replace `table` with the zone lookup's rows (one statement: readers see the
        old lookup or the new one, never none)."""
        columns = ",\n  ".join(
            f"{_quote(f.name)} {duckdb_type(f.type)}{'' if f.nullable else ' NOT NULL'}"
            for f in rows.schema)
        with self.connect() as con:
            con.register("_zone_rows", rows)
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(f"CREATE OR REPLACE TABLE {_quote(table)} (\n  {columns}\n)")
                con.execute(f"INSERT INTO {_quote(table)} SELECT * FROM _zone_rows")
                con.execute("COMMIT")
            except BaseException:
                con.execute("ROLLBACK")
                raise
        return rows.num_rows

    def loaded(self, table: str, source_uri: str) -> tuple[int, int] | None:
        """(source generation, rows) of the last load of `source_uri`, or None."""
        if not self.path.exists():
            return None
        with self.connect(read_only=True) as con:
            if not _has_table(con, LOAD_LOG):
                return None
            row = con.execute(
                f"SELECT source_generation, rows FROM {LOAD_LOG}"
                " WHERE table_name = ? AND source_uri = ?",
                [table, source_uri],
            ).fetchone()
            return (int(row[0]), int(row[1])) if row else None

    def rows_for(self, table: str, source_uri: str) -> int | None:
        """Rows loaded from `source_uri`, or None when the table does not exist yet."""
        if not self.path.exists():
            return None
        with self.connect(read_only=True) as con:
            if not _has_table(con, table):
                return None
            row = con.execute(
                f"SELECT count(*) FROM {_quote(table)} WHERE source_uri = ?", [source_uri]
            ).fetchone()
            return int(row[0]) if row else 0

    def loads(self) -> list[dict[str, object]]:
        """The load log, newest first (what the status command shows)."""
        if not self.path.exists():
            return []
        with self.connect(read_only=True) as con:
            if not _has_table(con, LOAD_LOG):
                return []
            cursor = con.execute(f"SELECT * FROM {LOAD_LOG} ORDER BY loaded_at DESC")
            names = [d[0] for d in cursor.description or []]
            return [dict(zip(names, row, strict=True)) for row in cursor.fetchall()]
