"""The pipeline exporter's model: events in, Prometheus samples out (no server needed).

Each test feeds events built with the event contract (taxi_pipeline.events), the
way the flows and the bridge emit them, and reads the registry's samples. The
end-to-end scrape by a real Prometheus is tests/test_e2e_monitoring.py.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prefect.events import Event, RelatedResource, Resource

from taxi_pipeline import events
from taxi_pipeline.monitoring.exporter import MetricsServer, new_model, scan
from taxi_pipeline.monitoring.pipeline_metrics import PipelineModel
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.settings import Settings

T0 = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)
PREFIXES = {"raw": "raw/", "processed": "processed/"}


def _settings(tmp_path: Path, **extra: object) -> Settings:
    return Settings(profile="local", home=tmp_path, bucket=str(tmp_path / "bucket"),
                    **extra)  # type: ignore[arg-type]


def _obj(name: str, generation: int) -> ObjectRef:
    return ObjectRef("/b", name, generation, scheme="file", created=T0)


def _event(name: str, obj: ObjectRef, at: float, run: str | None = None,
           **payload: object) -> Event:
    related = [RelatedResource({"prefect.resource.id": f"prefect.flow-run.{run}",
                                "prefect.resource.role": "flow-run"})] if run else []
    return Event(event=name, resource=Resource(events.object_resource(obj, PREFIXES)),
                 related=related, occurred=T0 + timedelta(seconds=at), payload=payload,
                 id=uuid.uuid4())


def _one_file(raw: ObjectRef, processed: ObjectRef, rows: int = 7) -> list[Event]:
    """Every event one good file's chain emits, landing at T0, queryable at T0+6s."""
    return [
        events.object_finalized(raw, PREFIXES),
        _event(events.TRANSFORM_STARTED, raw, 1, run="t1"),
        _event(events.TRANSFORM_COMPLETED, raw, 3, run="t1", rows_in=rows + 3,
               rows_out=rows, rows_rejected=3,
               rejected_by_reason={"negative_fare": 2, "zero_passengers": 1}),
        events.object_finalized(processed, PREFIXES),
        _event(events.LOAD_STARTED, processed, 4, run="l1"),
        _event(events.LOAD_COMPLETED, processed, 6, run="l1", status="loaded", rows=rows,
               source_uri=raw.uri, source_generation=raw.generation),
    ]


def sample(model: PipelineModel, name: str, **labels: str) -> float:
    return model.metrics.registry.get_sample_value(name, labels or None) or 0.0


RAW = _obj("raw/yellow/2024/yellow_tripdata_2024-01.parquet", 11)
PROCESSED = _obj("processed/yellow/2024/yellow_tripdata_2024-01.parquet", 12)


def test_one_file_counts_rows_stages_and_durations(tmp_path: Path) -> None:
    model = new_model(_settings(tmp_path))
    for event in _one_file(RAW, PROCESSED):
        assert model.observe(event)
    objects = "taxi_pipeline_objects_total"
    for stage in ("landed", "processed", "transformed", "loaded"):
        assert sample(model, objects, stage=stage, dataset="yellow") == 1, stage
    assert sample(model, objects, stage="quarantined", dataset="yellow") == 0
    assert sample(model, "taxi_pipeline_rows_loaded_total", dataset="yellow") == 7
    assert sample(model, "taxi_pipeline_rows_landed_total", dataset="yellow") == 10
    assert sample(model, "taxi_pipeline_rows_rejected_total", dataset="yellow",
                  reason="negative_fare") == 2
    assert sample(model, "taxi_pipeline_rows_rejected_total", dataset="yellow",
                  reason="zero_passengers") == 1
    # Landed at T0 (the object's own time), loaded at T0+6 s.
    assert sample(model, "taxi_pipeline_drop_to_queryable_seconds_count", dataset="yellow") == 1
    assert sample(model, "taxi_pipeline_drop_to_queryable_seconds_sum", dataset="yellow") == 6
    assert sample(model, "taxi_pipeline_transform_duration_seconds_sum", dataset="yellow",
                  outcome="completed") == 2
    assert sample(model, "taxi_pipeline_load_duration_seconds_sum", dataset="yellow",
                  outcome="completed") == 2
    assert model.tracked()["landings"] == 0  # its load completed: nothing left waiting


def test_replays_reemits_and_repeated_loads_count_once(tmp_path: Path) -> None:
    model = new_model(_settings(tmp_path))
    chain = _one_file(RAW, PROCESSED)
    for event in chain:
        model.observe(event)
    # The stream's replay after a reconnect: same ids.
    assert not any(model.observe(event) for event in chain)
    # A re-emit of the same generation runs the chain again: fresh ids, same generation,
    # and the second load answers already_loaded.
    model.observe(events.object_finalized(RAW, PREFIXES, reemit=True))
    model.observe(_event(events.TRANSFORM_COMPLETED, RAW, 20, run="t2", rows_in=10,
                         rejected_by_reason={"negative_fare": 2}))
    model.observe(_event(events.LOAD_COMPLETED, PROCESSED, 25, run="l2",
                         status="already_loaded", rows=7, source_uri=RAW.uri,
                         source_generation=RAW.generation))
    assert sample(model, "taxi_pipeline_objects_total", stage="landed", dataset="yellow") == 1
    assert sample(model, "taxi_pipeline_rows_rejected_total", dataset="yellow",
                  reason="negative_fare") == 2
    assert sample(model, "taxi_pipeline_rows_loaded_total", dataset="yellow") == 7
    assert sample(model, "taxi_pipeline_drop_to_queryable_seconds_count", dataset="yellow") == 1
    # A new generation is a new object generation: counted again.
    raw2, processed2 = _obj(RAW.name, 21), _obj(PROCESSED.name, 22)
    for event in _one_file(raw2, processed2, rows=5):
        model.observe(event)
    assert sample(model, "taxi_pipeline_objects_total", stage="landed", dataset="yellow") == 2
    assert sample(model, "taxi_pipeline_rows_loaded_total", dataset="yellow") == 12


def test_history_rebuilds_state_without_counting(tmp_path: Path) -> None:
    """After a restart: the landing read from history still gives drop-to-queryable for
    the load that completes live, and the counters start from zero."""
    model = new_model(_settings(tmp_path))
    chain = _one_file(RAW, PROCESSED)
    for event in chain[:-1]:
        model.observe(event, count=False)
    assert sample(model, "taxi_pipeline_objects_total", stage="landed", dataset="yellow") == 0
    assert sample(model, "taxi_pipeline_exporter_events_total", source="history") == 5
    model.observe(chain[-1])
    assert sample(model, "taxi_pipeline_objects_total", stage="loaded", dataset="yellow") == 1
    assert sample(model, "taxi_pipeline_drop_to_queryable_seconds_sum", dataset="yellow") == 6
    assert sample(model, "taxi_pipeline_load_duration_seconds_count", dataset="yellow",
                  outcome="completed") == 1


def test_quarantine_and_failures_by_stage_and_reason(tmp_path: Path) -> None:
    model = new_model(_settings(tmp_path))
    bad = _obj("raw/green/2024/green_tripdata_2024-02.parquet", 5)
    model.observe(events.object_finalized(bad, PREFIXES))
    model.observe(_event(events.TRANSFORM_STARTED, bad, 1, run="q"))
    model.observe(_event(events.OBJECT_QUARANTINED, bad, 2, run="q", reason="not_parquet"))
    model.observe(_event(events.LOAD_FAILED, PROCESSED, 3, run="f", error="boom"))
    assert sample(model, "taxi_pipeline_objects_total", stage="quarantined",
                  dataset="green") == 1
    assert sample(model, "taxi_pipeline_quarantined_objects_total", dataset="green",
                  reason="not_parquet") == 1
    assert sample(model, "taxi_pipeline_transform_duration_seconds_count", dataset="green",
                  outcome="quarantined") == 1
    assert sample(model, "taxi_pipeline_objects_total", stage="load_failed",
                  dataset="yellow") == 1


def test_labels_stay_bounded_and_never_name_an_object(tmp_path: Path) -> None:
    model = new_model(_settings(tmp_path, monitor_max_label_values=4))
    for index in range(50):
        obj = _obj(f"raw/folder{index}/file{index}.parquet", index + 1)
        model.observe(events.object_finalized(obj, PREFIXES))
    datasets = {s.labels["dataset"] for m in model.metrics.registry.collect()
                for s in m.samples if "dataset" in s.labels}
    # yellow and green are configured first, two more pass, the rest are `other`.
    assert datasets == {"folder0", "folder1", "other"}
    names = {value for m in model.metrics.registry.collect() for s in m.samples
             for value in s.labels.values()}
    assert not any("file" in value or "parquet" in value for value in names)
    assert sample(model, "taxi_pipeline_objects_total", stage="landed", dataset="other") == 48


def test_state_is_bounded(tmp_path: Path) -> None:
    model = new_model(_settings(tmp_path, monitor_max_tracked=100))
    for index in range(1_000):  # landings whose loads never come
        model.observe(events.object_finalized(_obj(f"raw/yellow/x{index}.parquet", 1),
                                              PREFIXES))
    assert all(n <= 100 for n in model.tracked().values()), model.tracked()
    assert sample(model, "taxi_pipeline_objects_total", stage="landed", dataset="yellow") == 1000


def test_scan_uses_the_reconcile_logic(tmp_path: Path) -> None:
    settings = _settings(tmp_path, reconcile_after_minutes=10)
    raw = settings.bucket_dir / "raw" / "yellow" / "2024"
    raw.mkdir(parents=True)
    old, fresh = raw / "yellow_tripdata_2024-01.parquet", raw / "yellow_tripdata_2024-02.parquet"
    old.write_bytes(b"old bytes")
    fresh.write_bytes(b"fresh bytes")
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    os.utime(old, (hour_ago, hour_ago))
    result = scan(settings)
    assert result.stalled == {"yellow": 1}
    assert result.oldest_stalled_landed == pytest.approx(hour_ago, abs=1)
    assert result.oldest_unloaded_landed == pytest.approx(hour_ago, abs=1)
    assert result.newest_raw_landed == pytest.approx(fresh.stat().st_mtime, abs=1)
    model = new_model(settings)
    model.scan = result
    assert sample(model, "taxi_pipeline_stalled_objects", dataset="yellow") == 1
    assert sample(model, "taxi_pipeline_oldest_stalled_seconds") >= 3599


def test_metrics_server_serves_metrics_and_health(tmp_path: Path) -> None:
    model = new_model(_settings(tmp_path))
    for event in _one_file(RAW, PROCESSED):
        model.observe(event)
    server = MetricsServer(model, 0, "127.0.0.1").start()
    try:
        base = f"http://127.0.0.1:{server.port}"
        body = urllib.request.urlopen(f"{base}/metrics", timeout=5).read().decode()
        assert 'taxi_pipeline_rows_loaded_total{dataset="yellow"} 7.0' in body
        assert "taxi_pipeline_exporter_connected 0.0" in body
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{base}/healthz", timeout=5)
        assert refused.value.code == 503
        model.connected = True
        assert urllib.request.urlopen(f"{base}/healthz", timeout=5).status == 200
    finally:
        server.stop()


def test_a_raw_object_loaded_into_another_datasets_table_is_not_stalled(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """fhv and fhvhv rows go to their own tables: the scan reads every dataset's table."""
    from taxi_pipeline.monitoring import exporter
    from taxi_pipeline.storage.local import LocalStore

    settings = _settings(tmp_path, reconcile_after_minutes=10)
    path = settings.bucket_dir / "raw" / "fhvhv" / "2024" / "fhvhv_tripdata_2024-01.parquet"
    path.parent.mkdir(parents=True)
    path.write_bytes(b"loaded bytes")
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).timestamp()
    os.utime(path, (hour_ago, hour_ago))
    ref = LocalStore(settings.bucket_dir).ref("raw/fhvhv/2024/fhvhv_tripdata_2024-01.parquet")

    class Log:
        def loads(self) -> list[dict[str, object]]:
            return [{"table_name": "fhvhv_trips", "source_uri": ref.uri,
                     "source_generation": ref.generation, "object_uri": "", "rows": 5,
                     "loaded_at": None}]

    monkeypatch.setattr(exporter, "warehouse_from_settings", lambda _: Log())
    assert exporter.scan(settings).stalled == {}
