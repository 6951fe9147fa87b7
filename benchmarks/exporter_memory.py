"""The pipeline exporter's memory while it follows 10,000 events (and more): RSS stays
bounded because its state is capped (TAXI_MONITOR_MAX_TRACKED) and its labels too.

Feeds the exporter's model the events of N files' chains (finalized raw, transform
started/completed, finalized processed, load started/completed; 6 per file), plus
landings that never load (what a stalled backlog looks like), and prints the RSS
after each tenth. No server is needed: the model is what grows.

    .venv/bin/python benchmarks/exporter_memory.py             # 10,000 events
    .venv/bin/python benchmarks/exporter_memory.py --events 100000 --max-tracked 5000
"""

from __future__ import annotations

import argparse
import gc
import uuid
from datetime import UTC, datetime, timedelta

import psutil
from prefect.events import Event, RelatedResource, Resource

from taxi_pipeline import events
from taxi_pipeline.monitoring.exporter import new_model
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.settings import Settings

PREFIXES = {"raw": "raw/", "processed": "processed/"}
T0 = datetime(2026, 12, 1, tzinfo=UTC)


def chain(index: int) -> list[Event]:
    dataset = "yellow" if index % 2 else "green"
    year, month = 2000 + index // 12, index % 12 + 1
    name = f"{dataset}/{year}/{dataset}_tripdata_{year}-{month:02d}"
    raw = ObjectRef("/bucket", f"raw/{name}.parquet", index + 1, scheme="file", created=T0)
    processed = ObjectRef("/bucket", f"processed/{name}.parquet", index + 2, scheme="file")
    at = T0 + timedelta(seconds=index)

    def event(kind: str, obj: ObjectRef, run: str, **payload: object) -> Event:
        return Event(event=kind, resource=Resource(events.object_resource(obj, PREFIXES)),
                     related=[RelatedResource({"prefect.resource.id": f"prefect.flow-run.{run}",
                                               "prefect.resource.role": "flow-run"})],
                     occurred=at, payload=payload, id=uuid.uuid4())

    transform_run, load_run = str(uuid.uuid4()), str(uuid.uuid4())
    result = [events.object_finalized(raw, PREFIXES),
              event(events.TRANSFORM_STARTED, raw, transform_run)]
    if index % 10 == 9:  # a backlog: one file in ten never gets further
        return result
    return [
        *result,
        event(events.TRANSFORM_COMPLETED, raw, transform_run, rows_in=1000, rows_out=990,
              rows_rejected=10, rejected_by_reason={"negative_fare": 6, "zero_passengers": 4}),
        events.object_finalized(processed, PREFIXES),
        event(events.LOAD_STARTED, processed, load_run),
        event(events.LOAD_COMPLETED, processed, load_run, status="loaded", rows=990,
              source_uri=raw.uri, source_generation=raw.generation)]


def rss_mib() -> float:
    return psutil.Process().memory_info().rss / 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=10_000)
    parser.add_argument("--max-tracked", type=int, default=None,
                        help="cap of each piece of state (default: the setting's default)")
    args = parser.parse_args()
    settings = Settings(profile="local", home="/tmp/exporter-memory")  # type: ignore[arg-type]
    if args.max_tracked:
        settings = settings.model_copy(update={"monitor_max_tracked": args.max_tracked})
    model = new_model(settings)
    gc.collect()
    start = rss_mib()
    print(f"RSS before: {start:.1f} MiB; state cap {settings.monitor_max_tracked:,} entries each")
    fed, index, step = 0, 0, max(1, args.events // 10)
    next_report = step
    peak = start
    while fed < args.events:
        for event in chain(index):
            model.observe(event)
            fed += 1
            if fed >= next_report:
                rss = rss_mib()
                peak = max(peak, rss)
                print(f"{fed:>9,} events  RSS {rss:7.1f} MiB  state {model.tracked()}")
                next_report += step
            if fed >= args.events:
                break
        index += 1
    series = sum(len(m.samples) for m in model.metrics.registry.collect())
    print(f"fed {fed:,} events of {index:,} files: RSS {rss_mib():.1f} MiB (peak {peak:.1f}, "
          f"+{peak - start:.1f} MiB over the start), {series} samples per scrape")


if __name__ == "__main__":
    main()
