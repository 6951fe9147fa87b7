"""Traces per object, end to end: the bridge, the transform and the load of one raw
object generation land in one trace, whose id every process derives on its own.

One process runs the bridge (the local directory source) and the two flows against
a real Prefect server, with the OpenTelemetry SDK's in-memory exporter as the
tracer provider's only exporter: a file dropped into the bucket is announced by
the bridge, transformed, its processed copy announced, then loaded. No header or
context is passed between them; the trace id comes from the object's URI and
generation (the processed copy's from its lineage).
"""

from __future__ import annotations

import asyncio
import contextvars
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from prefect.settings import PREFECT_API_URL, temporary_settings
from support.prefect_server import PrefectServer

from taxi_pipeline.monitoring import tracing
from taxi_pipeline.settings import get_settings
from taxi_pipeline.sources.sample_data import generate_month, write_month
from taxi_pipeline.storage import store_from_settings

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def spans() -> InMemorySpanExporter:
    exporter = InMemorySpanExporter()
    provider = trace.get_tracer_provider()
    if not isinstance(provider, TracerProvider):
        provider = TracerProvider()
        trace.set_tracer_provider(provider)
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    return exporter


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("tracing-prefect")
    running = PrefectServer(f"sqlite+aiosqlite:///{home}/prefect.db", home).start()
    try:
        yield running
    finally:
        running.stop()


@pytest.fixture
def bridge(server: PrefectServer, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """The directory bridge of this test's bucket, in a thread of this process."""
    monkeypatch.setenv("TAXI_SETTLE_SECONDS", "0.2")
    monkeypatch.setenv("TAXI_POLL_SECONDS", "0.1")
    get_settings.cache_clear()
    from pubsub_bridge.app import run_directory_bridge

    stop: list[asyncio.Event] = []
    loop = asyncio.new_event_loop()

    async def main() -> None:
        stop.append(asyncio.Event())
        await run_directory_bridge(get_settings(), stop[0])

    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        # The thread runs in a copy of this context: the API URL above, not a temporary
        # server of its own.
        context = contextvars.copy_context()
        thread = threading.Thread(target=context.run, args=(loop.run_until_complete, main()),
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            while not stop:
                time.sleep(0.05)
            loop.call_soon_threadsafe(stop[0].set)
            thread.join(timeout=60)
            assert not thread.is_alive(), "the bridge did not stop"
            loop.close()


def wait_span(spans: InMemorySpanExporter, name: str, **attributes: Any) -> ReadableSpan:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        for span in spans.get_finished_spans():
            attrs = dict(span.attributes or {})
            if span.name == name and all(attrs.get(k) == v for k, v in attributes.items()):
                return span
        time.sleep(0.1)
    seen = [(s.name, dict(s.attributes or {})) for s in spans.get_finished_spans()]
    raise AssertionError(f"no {name} span with {attributes}: {seen}")


def drop(month: int) -> tuple[str, int]:
    settings = get_settings()
    name = f"raw/yellow/2024/yellow_tripdata_2024-{month:02d}.parquet"
    path = settings.bucket_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    write_month(generate_month("yellow", 2024, month, 500, seed=month), path)
    ref = store_from_settings(settings).ref(name)
    return ref.uri, ref.generation


def test_one_object_generation_is_one_trace(spans: InMemorySpanExporter, bridge: None,
                                            tmp_path: Path) -> None:
    from flows.load import load
    from flows.transform import transform

    assert tracing.active()
    uri, generation = drop(1)
    expected = tracing.trace_id_of(uri, generation)
    raw_span = wait_span(spans, "bridge", **{"taxi_pipeline.object": uri,
                                             "taxi_pipeline.stage": "raw"})
    result = transform(object_uri=uri, generation=generation)
    assert result["status"] == "completed", result
    processed_uri = result["processed_uri"]
    processed_span = wait_span(spans, "bridge", **{"taxi_pipeline.object": processed_uri,
                                                   "taxi_pipeline.stage": "processed"})
    loaded = load(object_uri=processed_uri)
    assert loaded["status"] == "loaded", loaded
    transform_span = wait_span(spans, "transform", **{"taxi_pipeline.object": uri})
    load_span = wait_span(spans, "load", **{"taxi_pipeline.object": processed_uri})

    ids = {span.name + ":" + str((span.attributes or {}).get("taxi_pipeline.stage", "")):
           span.get_span_context().trace_id
           for span in (raw_span, transform_span, processed_span, load_span)}
    assert set(ids.values()) == {expected}, {k: f"{v:032x}" for k, v in ids.items()}
    # Each span says which Prefect run it was; transform and load took real time.
    for span in (transform_span, load_span):
        assert (span.attributes or {}).get("prefect.flow_run.id")
        assert span.end_time and span.start_time and span.end_time > span.start_time

    # Another object generation is another trace.
    other_uri, other_generation = drop(2)
    other = wait_span(spans, "bridge", **{"taxi_pipeline.object": other_uri})
    assert other.get_span_context().trace_id == tracing.trace_id_of(other_uri, other_generation)
    assert other.get_span_context().trace_id != expected


def test_tracing_is_off_without_otel_variables() -> None:
    assert not tracing.env_enabled({})
    assert not tracing.env_enabled({"OTEL_SERVICE_NAME": "x"})
    assert tracing.env_enabled({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:4318"})
    assert tracing.env_enabled({"OTEL_TRACES_EXPORTER": "gcp_trace"})
    assert not tracing.env_enabled({"OTEL_TRACES_EXPORTER": "none",
                                    "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x"})
    assert not tracing.env_enabled({"OTEL_SDK_DISABLED": "true",
                                    "OTEL_TRACES_EXPORTER": "otlp"})
