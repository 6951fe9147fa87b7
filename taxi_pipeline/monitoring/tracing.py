"""Traces per object: one trace per raw object generation, spans from the bridge, the
transform and the load, with no header propagated between them.

The trace id is a uuid5 of the raw object's URI (bucket and name) and generation,
so every process that touches that generation (the bridge announcing the raw or
the processed object, the transform, the load) computes the same id on its own.
A processed object belongs to the trace of the raw generation it was made from
(its lineage). Spans hang off a virtual root span of the same key, never exported.

Off unless the standard OpenTelemetry variables say otherwise: an endpoint
(`OTEL_EXPORTER_OTLP_ENDPOINT` / `..._TRACES_ENDPOINT`, exported with OTLP, or
`OTEL_EXPORTER_OTLP_PROTOCOL=grpc`) or `OTEL_TRACES_EXPORTER` (`otlp`,
`gcp_trace` for Cloud Trace on GKE, `console`, `none`); `OTEL_SDK_DISABLED=true`
turns it off. A process whose global tracer provider is already an SDK provider
(a test's in-memory exporter) uses that one. Prefect's own run telemetry is used
where it helps: a step span links to the flow run's span when Prefect made one,
and carries the flow run's id.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Link, NonRecordingSpan, SpanContext, Status, StatusCode, TraceFlags

from taxi_pipeline import events

log = logging.getLogger(__name__)

_TRACE_NAMESPACE = uuid.UUID("3c2b8f9a-0f51-4d7e-8a35-6a0c1f9b7e44")
_lock = threading.Lock()
_configured = False

# The flow events that end a step, and the span each ends.
TRANSFORM_ENDS = {events.TRANSFORM_COMPLETED, events.TRANSFORM_FAILED,
                  events.OBJECT_QUARANTINED, events.OBJECT_DUPLICATE_CONTENT}
LOAD_ENDS = {events.LOAD_COMPLETED, events.LOAD_FAILED}
FAILED = {events.TRANSFORM_FAILED, events.LOAD_FAILED}


def trace_id_of(uri: str, generation: int | str) -> int:
    """The 128-bit trace id of one raw object generation (bucket and name are its URI)."""
    return uuid.uuid5(_TRACE_NAMESPACE, f"{uri}\x00{generation}").int


def _root_span_id(uri: str, generation: int | str) -> int:
    return uuid.uuid5(_TRACE_NAMESPACE, f"root\x00{uri}\x00{generation}").int >> 64 or 1


def env_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """Whether the OTEL_* variables ask for traces."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    exporter = env.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    if exporter:
        return exporter != "none"
    return bool(env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
                or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def _exporter(name: str) -> Any:
    if name == "gcp_trace":
        from opentelemetry.exporter.cloud_trace import CloudTraceSpanExporter

        return CloudTraceSpanExporter()  # project from ADC / Workload Identity
    if name == "console":
        from opentelemetry.sdk.trace.export import ConsoleSpanExporter

        return ConsoleSpanExporter()
    protocol = (os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "http/protobuf")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter()
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
        OTLPSpanExporter as HTTPSpanExporter,
    )

    return HTTPSpanExporter()


def _configure() -> None:
    """Install a tracer provider once, if the environment asks and nobody else did."""
    global _configured
    with _lock:
        if _configured:
            return
        _configured = True
        if not env_enabled() or _sdk_provider() is not None:
            return
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        names = os.environ.get("OTEL_TRACES_EXPORTER", "otlp") or "otlp"
        provider = TracerProvider(resource=Resource.create(
            {"service.name": os.environ.get("OTEL_SERVICE_NAME", "taxi-pipeline")}))
        for name in (n.strip().lower() for n in names.split(",")):
            if name and name != "none":
                provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
        trace.set_tracer_provider(provider)
        log.info("tracing on: exporting spans with %s", names)


def _sdk_provider() -> Any:
    from opentelemetry.sdk.trace import TracerProvider

    provider = trace.get_tracer_provider()
    return provider if isinstance(provider, TracerProvider) else None


def active() -> bool:
    """Whether spans are recorded in this process (configures tracing on first use)."""
    _configure()
    return _sdk_provider() is not None


def _parent(uri: str, generation: int | str) -> Any:
    root = SpanContext(trace_id=trace_id_of(uri, generation),
                       span_id=_root_span_id(uri, generation), is_remote=True,
                       trace_flags=TraceFlags(TraceFlags.SAMPLED))
    return trace.set_span_in_context(NonRecordingSpan(root))


def record(name: str, key: tuple[str, int | str], start_ns: int, end_ns: int,
           attributes: dict[str, Any], error: str | None = None,
           links: list[Link] | None = None) -> None:
    """One finished span in the trace of raw generation `key` (uri, generation)."""
    if not active():
        return
    tracer = trace.get_tracer("taxi_pipeline")
    span = tracer.start_span(name, context=_parent(*key), start_time=start_ns,
                             attributes={k: v for k, v in attributes.items() if v is not None},
                             links=links or [])
    if error:
        span.set_status(Status(StatusCode.ERROR, error[:500]))
    span.end(end_time=max(end_ns, start_ns))


def key_of_resource(resource: Mapping[str, str], related: list[Mapping[str, str]],
                    payload: Mapping[str, Any] | None = None) -> tuple[str, int | str] | None:
    """The raw generation an event is about: its `source` (lineage) when it has one,
    else the resource itself; None when the resource is no object generation."""
    payload = payload or {}
    if payload.get("source_uri") and payload.get("source_generation") is not None:
        return str(payload["source_uri"]), str(payload["source_generation"])
    for item in related:
        if item.get("prefect.resource.role") == "source" and events.LABEL_GENERATION in item:
            return str(item["prefect.resource.id"]), str(item[events.LABEL_GENERATION])
    generation = resource.get(events.LABEL_GENERATION)
    if generation is None:
        return None
    return str(resource["prefect.resource.id"]), str(generation)


def bridge_stored(event: Any, seconds: float) -> None:
    """The bridge's span: from receiving a notification to its event confirmed stored."""
    if event.event != events.OBJECT_FINALIZED or not active():
        return
    key = key_of_resource(dict(event.resource), [dict(r) for r in event.related])
    if key is None:
        return
    end = time.time_ns()
    record("bridge", key, end - int(seconds * 1e9), end, {
        "taxi_pipeline.object": event.resource.id,
        "taxi_pipeline.generation": event.resource.get(events.LABEL_GENERATION),
        "taxi_pipeline.stage": event.resource.get(events.LABEL_STAGE),
        "prefect.event.id": str(event.id)})


def flow_step(name: str, resource: Mapping[str, str], related: list[Mapping[str, str]],
              payload: Mapping[str, Any]) -> None:
    """The transform or load span, recorded when the flow emits the event that ends it:
    from the flow run's start (Prefect's run) to now."""
    if name in TRANSFORM_ENDS:
        step = "transform"
    elif name in LOAD_ENDS:
        step = "load"
    else:
        return
    if not active():
        return
    key = key_of_resource(resource, related, payload if step == "load" else None)
    if key is None:
        return
    end = time.time_ns()
    start, run_id, links = end, None, []
    from prefect.context import FlowRunContext

    context = FlowRunContext.get()
    if context is not None and context.flow_run is not None:
        run_id = str(context.flow_run.id)
        if context.flow_run.start_time is not None:
            start = int(context.flow_run.start_time.timestamp() * 1e9)
    prefect_span = trace.get_current_span().get_span_context()
    if prefect_span.is_valid:  # Prefect's run telemetry made a span for this run
        links.append(Link(prefect_span, {"taxi_pipeline.link": "prefect flow run"}))
    error = str(payload.get("error")) if name in FAILED else None
    record(step, key, start, end, {
        "taxi_pipeline.object": resource.get("prefect.resource.id"),
        "taxi_pipeline.generation": resource.get(events.LABEL_GENERATION),
        "taxi_pipeline.outcome": name, "prefect.flow_run.id": run_id,
        "taxi_pipeline.rows": payload.get("rows", payload.get("rows_out"))}, error, links)
