"""`taxi-pipeline zones` and the deploy step: the `zones` table and every dataset's table.

Run by `up` (local and emulator profiles) and `deploy.py` (gcp) so a fresh
warehouse answers the README's first query (trips per borough) before the first
load, and by hand after TLC publishes a new lookup (`TAXI_ZONES_FILE`).
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa

from taxi_pipeline.datasets.registry import SPECS, table_for
from taxi_pipeline.datasets.zones import ZONES_TABLE, zone_table, zones_path
from taxi_pipeline.settings import Settings
from taxi_pipeline.warehouse import Warehouse, warehouse_from_settings


@dataclass(frozen=True)
class ZonesLoaded:
    table_uri: str
    rows: int
    source: str
    dataset_tables: dict[str, str]


def dataset_schemas(settings: Settings) -> dict[str, pa.Schema]:
    """Table -> schema for every dataset (yellow and green share `trips`)."""
    return {table_for(name, settings.table): spec.schema for name, spec in SPECS.items()}


def install_zones(settings: Settings, warehouse: Warehouse | None = None) -> ZonesLoaded:
    """Create the datasets' tables that are missing and (re)load `zones` from the lookup.

    Idempotent: running it again replaces the 265 zone rows and leaves trip rows alone.
    """
    warehouse = warehouse or warehouse_from_settings(settings)
    schemas = dataset_schemas(settings)
    warehouse.ensure_tables(schemas)
    rows = warehouse.load_zones(zone_table(settings.zones_file), ZONES_TABLE)
    return ZonesLoaded(warehouse.table_uri(ZONES_TABLE), rows,
                       str(zones_path(settings.zones_file)),
                       {table: warehouse.table_uri(table) for table in schemas})
