"""A real Prometheus scrapes the pipeline exporter and the bridge of a running local stack.

The stack `up` starts (server, worker, bridge, exporter) takes a burst of small
good files and one bad file; Prometheus (Debian's package, on loopback) scrapes
both /metrics endpoints every second. Its HTTP API must then say, per dataset,
what the warehouse and the bucket say: rows loaded equal the table's rows, rows
rejected equal the rows of the rejects/ files, one quarantined object, one
drop-to-queryable observation per loaded file, nothing stalled.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import pyarrow.parquet as pq
import pytest
from support.burst import assert_exactly_once, drop_all, make_burst, wait_all_loaded
from support.local_e2e import running_stack, wait_events
from support.prometheus import Prometheus, running_prometheus

from taxi_pipeline import events
from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse

pytestmark = pytest.mark.e2e

FILES = 12
T = TypeVar("T")


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("monitoring-home")
    # A bad .parquet without its footer is announced after TAXI_STALL_SECONDS; scans
    # every 2 s so the stalled gauges follow the burst closely.
    settings = Settings(profile="local", home=home, bucket=str(home / "bucket"),
                        stall_seconds=5, monitor_scan_seconds=2)
    with running_stack(settings) as running:
        yield running


def eventually(read: Callable[[], T], ok: Callable[[T], bool], timeout: float = 90) -> T:
    """Poll `read` until `ok` holds (a positive signal), or fail with the last value."""
    deadline = time.monotonic() + timeout
    value = read()
    while not ok(value):
        assert time.monotonic() < deadline, f"not reached within {timeout:.0f}s: {value!r}"
        time.sleep(1)
        value = read()
    return value


def warehouse_rows(settings: Settings) -> dict[str, float]:
    with DuckDBWarehouse(settings.warehouse_file).connect(read_only=True) as con:
        rows = con.execute(f"SELECT taxi_type, count(*) FROM {settings.table} GROUP BY 1"
                           ).fetchall()
    return {str(dataset): float(n) for dataset, n in rows}


def rejected_rows(settings: Settings) -> dict[str, float]:
    """Rows in the rejects/ files, by dataset (the folder after rejects/)."""
    found: dict[str, float] = {}
    for path in (settings.bucket_dir / settings.rejects_prefix).rglob("*.parquet"):
        dataset = path.relative_to(settings.bucket_dir / settings.rejects_prefix).parts[0]
        found[dataset] = found.get(dataset, 0.0) + pq.read_metadata(path).num_rows
    return found


def test_prometheus_sees_what_the_warehouse_holds(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    assert stack.exporter_port and stack.bridge_port
    with running_prometheus({"taxi-exporter": f"127.0.0.1:{stack.exporter_port}",
                             "taxi-bridge": f"127.0.0.1:{stack.bridge_port}"},
                            tmp_path / "prometheus") as prometheus:
        eventually(prometheus.targets_up,
                   lambda up: up == {"taxi-exporter": 1, "taxi-bridge": 1})
        eventually(lambda: prometheus.scalar("taxi_pipeline_exporter_connected"),
                   lambda value: value == 1)

        files = make_burst(FILES, tmp_path / "burst", settings, first_year=2011, rows=300)
        bad = (settings.bucket_dir / settings.raw_prefix
               / "yellow/2030/yellow_tripdata_2030-01.parquet")
        bad.parent.mkdir(parents=True, exist_ok=True)
        bad.write_bytes(b"this is not a parquet file\n" * 20)
        started = drop_all(files, settings)
        outcome = wait_all_loaded(files, settings, started, timeout=600)
        assert_exactly_once(files, settings, outcome.rows_by_uri, outcome.loads_by_uri)
        wait_events([events.OBJECT_QUARANTINED], bad.as_uri(), timeout=120)
        loaded_at = time.time()

        expected_loaded = warehouse_rows(settings)
        expected_rejected = rejected_rows(settings)
        assert set(expected_loaded) == {"yellow", "green"}
        per_dataset = {"yellow": (FILES + 1) // 2, "green": FILES // 2}
        check(prometheus, expected_loaded, expected_rejected, per_dataset)
        # The bridge's own metrics, scraped from the same stack: every file's event stored.
        stored = prometheus.scalar("bridge_stored_total")
        assert stored is not None and stored >= FILES + 1
        # A scan after the loads: nothing stalled, nothing unloaded waiting.
        eventually(lambda: prometheus.scalar(
            "taxi_pipeline_exporter_last_scan_timestamp_seconds"),
            lambda at: at is not None and at > loaded_at + 1)
        eventually(lambda: (prometheus.scalar("sum(taxi_pipeline_stalled_objects)") or 0,
                            prometheus.scalar("taxi_pipeline_oldest_unloaded_seconds")),
                   lambda values: values == (0, 0))


def check(prometheus: Prometheus, loaded: dict[str, float], rejected: dict[str, float],
          files: dict[str, int]) -> None:
    """Prometheus' answers, waited for (the last scrape may lag a second), then compared."""
    eventually(lambda: prometheus.by("sum by (dataset) (taxi_pipeline_rows_loaded_total)",
                                     "dataset"), lambda got: got == loaded)
    eventually(lambda: prometheus.by("sum by (dataset) (taxi_pipeline_rows_rejected_total)",
                                     "dataset"), lambda got: got == rejected)
    eventually(lambda: prometheus.by(
        'sum by (dataset) (taxi_pipeline_objects_total{stage="quarantined"})', "dataset"),
        lambda got: got == {"yellow": 1})
    eventually(lambda: prometheus.by(
        "sum by (dataset) (taxi_pipeline_drop_to_queryable_seconds_count)", "dataset"),
        lambda got: got == {k: float(v) for k, v in files.items()})
    eventually(lambda: prometheus.by(
        'sum by (dataset) (taxi_pipeline_objects_total{stage="loaded"})', "dataset"),
        lambda got: got == {k: float(v) for k, v in files.items()})
    # p95 of drop-to-queryable is a finite number of seconds (the dashboard's panel).
    p95 = prometheus.scalar("histogram_quantile(0.95, sum by (le) "
                            "(taxi_pipeline_drop_to_queryable_seconds_bucket))")
    assert p95 is not None and 0 < p95 < 600
