"""Warehouses: a DuckDB file locally, BigQuery in the cloud profiles."""

from __future__ import annotations

from typing import Protocol

import pyarrow as pa

from taxi_pipeline.settings import Settings
from taxi_pipeline.warehouse.base import LoadResult

__all__ = ["LoadResult", "LocalExtraMissing", "Warehouse", "warehouse_from_settings"]


class Warehouse(Protocol):
    def table_uri(self, table: str) -> str: ...

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
        """Replace the rows of `source_uri` in `table` with the object's rows, atomically."""
        ...

    def rows_for(self, table: str, source_uri: str) -> int | None:
        """Rows in `table` from `source_uri`; None when the table does not exist yet."""
        ...

    def loaded(self, table: str, source_uri: str) -> tuple[int, int] | None:
        """(source generation, rows) of the last load of `source_uri`, or None."""
        ...

    def ensure_tables(self, schemas: dict[str, pa.Schema]) -> None:
        """Create every missing table (name -> schema) with the load's properties."""
        ...

    def load_zones(self, rows: pa.Table, table: str) -> int:
        """Replace `table` with the zone lookup's rows; the row count."""
        ...

    def loads(self) -> list[dict[str, object]]:
        """The load log (table_name, source_uri, source_generation, object_uri,
        object_generation, rows, loaded_at), newest first."""
        ...


class LocalExtraMissing(ModuleNotFoundError):
    """A local-profile dependency is not installed: it comes with the `local` extra."""

    def __init__(self, what: str) -> None:
        super().__init__(
            f"{what} is not installed: it comes with the 'local' extra "
            "(pip install 'taxi-pipeline[local]'; scripts/bootstrap.sh installs it). "
            "The production image has only the gcp profile's dependencies.")


def warehouse_from_settings(settings: Settings) -> Warehouse:
    """DuckDB for `local`; BigQuery (the emulator's or Google's) for `emulator` and `gcp`."""
    if settings.profile == "local":
        # DuckDB is in the `local` extra only: the production image (gcp) never has it.
        try:
            from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse
        except ModuleNotFoundError as exc:
            if exc.name != "duckdb":
                raise
            raise LocalExtraMissing("DuckDB (the local profile's warehouse)") from exc

        return DuckDBWarehouse(settings.warehouse_file)
    if settings.profile in ("emulator", "gcp"):
        # Imported here so the local profile never needs the Google clients.
        from taxi_pipeline.gcp.clients import bigquery_client
        from taxi_pipeline.warehouse.bigquery_warehouse import BigQueryWarehouse

        return BigQueryWarehouse(bigquery_client(settings), settings.bq_dataset,
                                 settings.bq_location,
                                 max_bytes_billed=settings.bq_max_bytes_billed,
                                 dml_retry_seconds=settings.bq_dml_retry_seconds)
    raise NotImplementedError(
        f"profile {settings.profile!r} has no warehouse; use local, emulator or gcp"
    )
