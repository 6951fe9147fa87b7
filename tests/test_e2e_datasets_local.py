"""End to end on the local profile, every dataset and format (issue 17): a CSV.gz green
month, an FHV CSV and an fhvhv parquet month are dropped into the bucket as a user
does; each lands in its own table through the same bridge, automations, transform and
load. One stack for the module (it is the slow part)."""

from __future__ import annotations

import gzip
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.local_e2e import drop, running_stack, wait_warehouse_loaded

from taxi_pipeline.datasets.registry import table_for
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.storage.local import LocalStore
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("e2e-datasets")
    settings = Settings(profile="local", home=home, bucket=str(home / "bucket"), stall_seconds=5)
    with running_stack(settings) as running:
        yield running


def query(settings: Settings, sql: str) -> list[tuple[object, ...]]:
    with DuckDBWarehouse(settings.warehouse_file).connect(read_only=True) as con:
        return con.execute(sql).fetchall()


def test_three_datasets_in_three_formats_land_in_their_tables(
        stack: LocalStack, tmp_path: Path, tlc_data_dir: Path) -> None:
    settings = stack.settings
    store = LocalStore(settings.bucket_dir)
    green = generate_month("green", 2020, 10, 20_000, seed=11, file_format="csv.gz")
    hv = generate_month("fhvhv", 2024, 3, 30_000, seed=12)
    fhv_csv = tmp_path / "fhv_tripdata_2020-04.csv"
    shutil.copyfile(tlc_data_dir / "fhv_tripdatasample_2020-04.csv", fhv_csv)
    drops = {
        raw_object_name(settings.raw_prefix, "green", 2020, 10, "csv.gz"):
            (write_month(green, tmp_path / "green_tripdata_2020-10.csv.gz"),
             green.expected_good, "trips"),
        raw_object_name(settings.raw_prefix, "fhv", 2020, 4, "csv"): (fhv_csv, 1000, "fhv_trips"),
        raw_object_name(settings.raw_prefix, "fhvhv", 2024, 3):
            (write_month(hv, tmp_path / "fhvhv.parquet"), hv.expected_good, "fhvhv_trips"),
    }
    for name, (path, _, _) in drops.items():
        drop(path, settings, name)
    warehouse = DuckDBWarehouse(settings.warehouse_file)
    for name, (_, expected, table) in drops.items():
        ref = store.ref(name)
        assert table_for(name.split("/")[1], settings.table) == table
        assert wait_warehouse_loaded(warehouse, table, ref.uri, ref.generation) == expected, name
        assert warehouse.rows_for(table, ref.uri) == expected
    assert query(settings, "SELECT count(*) FROM trips")[0][0] == green.expected_good
    assert query(settings, "SELECT count(*) FROM fhv_trips")[0][0] == 1000
    assert query(settings, "SELECT count(*) FROM fhvhv_trips")[0][0] == hv.expected_good
    # outputs are canonical parquet beside the source's name
    assert (settings.bucket_dir / "processed/green/2020/green_tripdata_2020-10.csv.gz.parquet"
            ).exists()
    # the zones table (loaded at deploy) and the README's first query: trips per borough
    assert query(settings, "SELECT count(*) FROM zones")[0][0] == 265
    boroughs = dict(query(settings, "SELECT z.borough, count(*) FROM trips t JOIN zones z "
                                    "ON t.pickup_location_id = z.location_id GROUP BY 1"))
    assert sum(boroughs.values()) == green.expected_good and "Queens" in boroughs

    # a new generation of the fhv file (now gzipped under the same month: another
    # source) and the same CSV again: the CSV's rows are replaced, never duplicated
    fhv_name = raw_object_name(settings.raw_prefix, "fhv", 2020, 4, "csv")
    again = drop(fhv_csv, settings, fhv_name)
    ref = store.ref(fhv_name)
    assert wait_warehouse_loaded(warehouse, "fhv_trips", again.as_uri(), ref.generation) == 1000
    assert query(settings, "SELECT count(*) FROM fhv_trips")[0][0] == 1000

    # a truncated gzip is quarantined with its reason, nothing loads
    cut_name = raw_object_name(settings.raw_prefix, "fhvhv", 2021, 6, "csv.gz")
    whole = gzip.compress((tlc_data_dir / "head.csv").read_bytes())
    cut = tmp_path / "cut.csv.gz"
    cut.write_bytes(whole[: len(whole) // 2])
    drop(cut, settings, cut_name)
    quarantined = settings.bucket_dir / cut_name.replace(settings.raw_prefix,
                                                         settings.quarantine_prefix, 1)
    import time

    deadline = time.monotonic() + 90
    while not quarantined.exists() and time.monotonic() < deadline:
        time.sleep(0.25)
    assert quarantined.exists()
