"""find_stalled against a real bucket directory and DuckDB warehouse."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

from taxi_pipeline.datasets.schema import CANONICAL_SCHEMA
from taxi_pipeline.ops.reconcile import find_stalled
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.storage.local import LocalStore
from taxi_pipeline.transform.streaming import transform_parquet
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse


def _load(store: LocalStore, warehouse: DuckDBWarehouse, name: str, tmp: Path) -> None:
    raw = store.ref(name)
    processed = tmp / f"{raw.generation}.parquet"
    transform_parquet(store.root / name, processed, tmp / "rejects.parquet",
                      source_uri=raw.uri, source_generation=raw.generation,
                      taxi_type="yellow", month=None)
    warehouse.load_object(object_uri=processed.as_uri(), object_generation=1, table="trips",
                          schema=CANONICAL_SCHEMA, source_uri=raw.uri,
                          source_generation=raw.generation)


def test_only_raw_objects_that_never_reached_the_warehouse_are_stalled(tmp_path: Path) -> None:
    settings = Settings(home=tmp_path / "home")
    store = LocalStore(settings.bucket_dir)
    warehouse = DuckDBWarehouse(settings.warehouse_file)
    names = {month: raw_object_name(settings.raw_prefix, "yellow", 2024, month)
             for month in (1, 2, 3, 4)}
    for month, name in names.items():
        write_month(generate_month("yellow", 2024, month, 500, seed=month),
                    store.root / name)
    _load(store, warehouse, names[1], tmp_path)             # loaded: fine
    _load(store, warehouse, names[2], tmp_path)             # loaded, then dropped again
    write_month(generate_month("yellow", 2024, 2, 400, seed=22),  # a newer generation
                store.root / names[2])
    quarantine = settings.quarantine_prefix + names[3].removeprefix(settings.raw_prefix)
    (store.root / quarantine).parent.mkdir(parents=True, exist_ok=True)
    (store.root / quarantine).write_text("bad")              # quarantined after it landed
    os.utime(store.root / names[3], ns=(1, 10**9))           # raw copy older than quarantine

    later = datetime.now(UTC) + timedelta(days=1000)
    stalled = {s.obj.name: s.why for s in
               find_stalled(store, warehouse, settings, timedelta(minutes=15), now=later)}
    assert set(stalled) == {names[2], names[4]}
    assert stalled[names[4]] == "never loaded"
    assert "warehouse holds generation" in stalled[names[2]]

    # Nothing younger than the threshold is reported: it is probably in flight.
    assert list(find_stalled(store, warehouse, settings, timedelta(days=100000))) == []


def test_in_flight_objects_are_left_alone_until_they_are_quiet() -> None:
    from prefect.events import Event, Resource

    from taxi_pipeline import events
    from taxi_pipeline.ops.reconcile import RUNNING_GRACE, why_in_flight

    now = datetime.now(UTC)

    def event(name: str, age: timedelta) -> Event:
        return Event(event=name, occurred=now - age,
                     resource=Resource({"prefect.resource.id": "file:///b/raw/x.parquet"}))

    three = timedelta(minutes=3)
    assert why_in_flight([], three, now) is None
    assert "ago" in (why_in_flight([event(events.OBJECT_FINALIZED, timedelta(minutes=1))],
                                   three, now) or "")
    assert why_in_flight([event(events.TRANSFORM_COMPLETED, timedelta(minutes=5))],
                         three, now) is None
    # A transform that started and never finished is presumed running for a while...
    started = event(events.TRANSFORM_STARTED, timedelta(minutes=10))
    assert "not finished" in (why_in_flight([started], three, now) or "")
    # ... but only while its run is queued or running: a run that ended (crashed) does not
    # hold the object back for RUNNING_GRACE; unknown (runs unreadable) keeps the grace.
    assert why_in_flight([started], three, now, active=False) is None
    assert "not finished" in (why_in_flight([started], three, now, active=True) or "")
    assert "not finished" in (why_in_flight([started], three, now, active=None) or "")
    # ... but not forever: its process may be gone.
    lost = event(events.TRANSFORM_STARTED, RUNNING_GRACE + timedelta(minutes=1))
    assert why_in_flight([lost], three, now) is None
    # Automatic recovery gave up on this generation: a person decides, not reconcile.
    gave_up = event(events.RECOVERY_EXHAUSTED, timedelta(days=1))
    assert "gave up" in (why_in_flight([], three, now, [gave_up], now - timedelta(days=2))
                         or "")
    # A newer drop of the object (landed after the give-up) is fair game again.
    assert why_in_flight([], three, now, [gave_up], now - timedelta(hours=1)) is None
