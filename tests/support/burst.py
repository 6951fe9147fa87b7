"""A burst of small TLC files dropped at once, for the burst test and the burst benchmark.

Files span both datasets and many months (distinct objects, as a backfill lands
them); each is a few hundred rows with the usual dirt, so the expected good
rows per file are known. Completion is read from the warehouse's load log, the
same truth `reconcile` uses.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from support.local_e2e import running_stack
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse


@contextmanager
def burst_stack(home: Path) -> Iterator[LocalStack]:
    """The local stack a burst runs on, with the production defaults of reconcile (every
    2 min, objects quiet for 3 min): a shorter wait re-emits objects still queued behind
    the burst and doubles work."""
    settings = Settings(profile="local", home=home, bucket=str(home / "bucket"))
    with running_stack(settings) as running:
        yield running


@dataclass(frozen=True)
class BurstFile:
    name: str
    source: Path
    expected_good: int


def make_burst(count: int, directory: Path, settings: Settings, first_year: int = 2009,
               rows: int = 300) -> list[BurstFile]:
    """`count` distinct months (yellow and green alternately), written under `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(count):
        dataset = "yellow" if index % 2 == 0 else "green"
        year, month = first_year + (index // 2) // 12, (index // 2) % 12 + 1
        sample = generate_month(dataset, year, month, rows, seed=index)
        source = write_month(sample, directory / f"{dataset}-{year}-{month:02d}.parquet")
        files.append(BurstFile(raw_object_name(settings.raw_prefix, dataset, year, month),
                               source, sample.expected_good))
    return files


def drop_all(files: list[BurstFile], settings: Settings) -> float:
    """Copy every file into the bucket as fast as `cp` would; returns when the drop began."""
    for item in files:
        (settings.bucket_dir / item.name).parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    for item in files:
        shutil.copyfile(item.source, settings.bucket_dir / item.name)
    return started


@dataclass(frozen=True)
class BurstOutcome:
    loaded: int
    seconds: float
    rows_by_uri: dict[str, int]
    loads_by_uri: dict[str, int]


def read_outcome(settings: Settings, started: float) -> BurstOutcome:
    """Rows and `_loads` entries per source URI, as the warehouse holds them now."""
    warehouse = DuckDBWarehouse(settings.warehouse_file)
    if not settings.warehouse_file.exists():
        return BurstOutcome(0, time.monotonic() - started, {}, {})
    with warehouse.connect(read_only=True) as con:
        tables = {r[0] for r in con.execute(
            "SELECT table_name FROM information_schema.tables").fetchall()}
        rows = dict(con.execute(  # type: ignore[arg-type]
            f"SELECT source_uri, count(*) FROM {settings.table} GROUP BY 1").fetchall()
        ) if settings.table in tables else {}
        loads = dict(con.execute(  # type: ignore[arg-type]
            "SELECT source_uri, count(*) FROM _loads GROUP BY 1").fetchall()
        ) if "_loads" in tables else {}
    return BurstOutcome(len(loads), time.monotonic() - started, rows, loads)


def wait_all_loaded(files: list[BurstFile], settings: Settings, started: float,
                    timeout: float, poll: float = 2.0) -> BurstOutcome:
    """Poll (read-only, briefly, so loads are not locked out) until every file is loaded."""
    uris = {(settings.bucket_dir / f.name).as_uri() for f in files}
    deadline = time.monotonic() + timeout
    outcome = read_outcome(settings, started)
    while time.monotonic() < deadline:
        outcome = read_outcome(settings, started)
        if uris <= outcome.loads_by_uri.keys():
            return outcome
        time.sleep(poll)
    missing = sorted(uris - outcome.loads_by_uri.keys())
    raise AssertionError(f"{len(missing)} of {len(files)} files not loaded within "
                         f"{timeout:.0f}s, e.g. {missing[:3]}")


# Files per test burst (TAXI_TEST_BURST: smaller for a quick local try) and how
# long a test waits for all of them.
BURST = int(os.environ.get("TAXI_TEST_BURST", "200"))
TIMEOUT = 900.0


def assert_exactly_once(files: list[BurstFile], settings: Settings, rows: dict[str, int],
                        loads: dict[str, int]) -> None:
    for item in files:
        uri = (settings.bucket_dir / item.name).as_uri()
        assert loads.get(uri) == 1, f"{uri}: {loads.get(uri)} load log entries"
        assert rows.get(uri) == item.expected_good, f"{uri}: {rows.get(uri)} rows"
