"""Benchmark: where drop-to-queryable goes, hop by hop (local profile).

Usage: .venv/bin/python benchmarks/hops.py [--drops 5] [--rows 250000]

Starts the stack `taxi-pipeline up` starts (in this process, throwaway
TAXI_HOME), drops the same month N times (each drop a new generation, so each
runs the whole chain), then reads back from the Prefect API when each step
happened and prints the median of every hop:

  drop -> raw event stored            bridge: settle wait, emit (server receipt time)
  raw event -> transform run created  automation (triggers service + action)
  run created -> run started          worker poll, process start, engine start-up
  run started -> transform done       the work (read, check, write, publish)
  transform done -> processed event   bridge again (the processed object's notification)
  processed event -> load run created automation
  run created -> run started          worker, process, engine
  run started -> loaded               the work (one DuckDB transaction)

The floor is the two "work" hops; everything else is orchestration. The hops
add up to the drop-to-queryable figure of `demo_latency.py` (both measured on
the same chain).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.client.schemas.sorting import FlowRunSort
from prefect.events.filters import (
    EventFilter,
    EventNameFilter,
    EventOccurredFilter,
    EventResourceFilter,
)
from prefect.settings import PREFECT_API_URL, temporary_settings

from taxi_pipeline import events
from taxi_pipeline.cli import wait_for_load
from taxi_pipeline.objects import ObjectRef, output_name, raw_object_name
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, write_month
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.storage.local import LocalStore

HOPS = [
    ("drop -> raw event stored", "bridge"),
    ("raw event -> transform run created", "automation"),
    ("transform run created -> started", "worker + process"),
    ("transform run started -> done", "work"),
    ("transform done -> processed event stored", "bridge"),
    ("processed event -> load run created", "automation"),
    ("load run created -> started", "worker + process"),
    ("load run started -> loaded", "work"),
]


@dataclass
class Drop:
    raw: ObjectRef
    dropped: datetime
    loaded: datetime


async def _events(name: str, uri: str) -> list[Any]:
    async with get_client() as client:
        page = await client.read_events(filter=EventFilter(
            event=EventNameFilter(name=[name]), resource=EventResourceFilter(id=[uri]),
            occurred=EventOccurredFilter()), limit=50)
        return list(page.events)


async def _runs(deployment: str) -> list[Any]:
    async with get_client() as client:
        return list(await client.read_flow_runs(
            deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
            sort=FlowRunSort.EXPECTED_START_TIME_ASC, limit=200))


def _run_for(runs: list[Any], uri: str, generation: int) -> Any:
    for run in runs:
        if (run.parameters.get("object_uri") == uri
                and int(run.parameters.get("generation") or 0) == generation
                and run.start_time is not None):
            return run
    raise LookupError(f"no started run for {uri} generation {generation}")


def _stored(found: list[Any], generation: int) -> datetime:
    times = [e.received for e in found
             if e.resource.get(events.LABEL_GENERATION) == str(generation)]
    if not times:
        raise LookupError(f"no event for generation {generation}")
    return min(times)


def _processed_generation(found: list[Any], source_generation: int) -> tuple[int, datetime]:
    """The processed object's finalized event made from this raw generation."""
    for event in sorted(found, key=lambda e: e.received):
        sources = [r for r in event.related if r.get("prefect.resource.role") == "source"]
        if any(r.get(events.LABEL_GENERATION) == str(source_generation) for r in sources):
            return int(event.resource[events.LABEL_GENERATION]), event.received
    raise LookupError(f"no processed event from source generation {source_generation}")


async def hop_times(drop: Drop, settings: Settings) -> list[float]:
    raw_uri = drop.raw.uri
    processed_name = output_name(drop.raw.name, settings.raw_prefix, settings.processed_prefix)
    processed_uri = ObjectRef(bucket=drop.raw.bucket, scheme="file", generation=0,
                              name=processed_name).uri
    raw_stored = _stored(await _events(events.OBJECT_FINALIZED, raw_uri), drop.raw.generation)
    transform = _run_for(await _runs("transform"), raw_uri, drop.raw.generation)
    done = min(e.received for e in await _events(events.TRANSFORM_COMPLETED, raw_uri)
               if e.received >= transform.start_time)
    processed_generation, processed_stored = _processed_generation(
        await _events(events.OBJECT_FINALIZED, processed_uri), drop.raw.generation)
    load = _run_for(await _runs("load"), processed_uri, processed_generation)
    marks = [drop.dropped, raw_stored, transform.created, transform.start_time, done,
             processed_stored, load.created, load.start_time, drop.loaded]
    return [(b - a).total_seconds() for a, b in itertools.pairwise(marks)]


def wait_loaded(settings: Settings, store: LocalStore, raw: ObjectRef,
                timeout: float) -> datetime:
    """When the warehouse held this generation (the demo's own wait, polled every 0.1 s)."""
    outcome = wait_for_load(settings, store, raw, timeout)
    if isinstance(outcome, str):
        raise SystemExit(outcome)
    return datetime.now(UTC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drops", type=int, default=5)
    parser.add_argument("--rows", type=int, default=250_000)
    parser.add_argument("--timeout", type=float, default=180.0)
    args = parser.parse_args()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as home:
        for key in [k for k in os.environ if k.startswith(("TAXI_", "PREFECT_API"))]:
            os.environ.pop(key)
        os.environ["TAXI_HOME"] = home
        settings = Settings()
        store = LocalStore(settings.bucket_dir)
        name = raw_object_name(settings.raw_prefix, "yellow", 2024, 1)
        source = write_month(generate_month("yellow", 2024, 1, args.rows, seed=7),
                             Path(home) / "sample.parquet")
        drops: list[Drop] = []
        with LocalStack(settings, ui=False) as stack:
            assert stack.api_url
            with temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
                for _ in range(args.drops):
                    target = settings.bucket_dir / name
                    target.parent.mkdir(parents=True, exist_ok=True)
                    dropped = datetime.now(UTC)
                    shutil.copyfile(source, target)
                    raw = store.ref(name)
                    loaded = wait_loaded(settings, store, raw, args.timeout)
                    drops.append(Drop(raw, dropped, loaded))
                # Events are persisted in batches (every 20 or 5 s): let the last ones land.
                rows = []
                deadline = time.monotonic() + 30
                for drop in drops:
                    while True:
                        try:
                            rows.append(asyncio.run(hop_times(drop, settings)))
                            break
                        except LookupError:
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.5)
    totals = [sum(r) for r in rows]
    print(f"drop-to-queryable by hop, {args.rows:,} rows, local profile, {len(rows)} drops, "
          f"median (min-max) seconds; load average {load_before:.1f} before, "
          f"{os.getloadavg()[0]:.1f} after, {datetime.now(UTC):%Y-%m-%d}, "
          f"{os.cpu_count()} CPUs, Python {sys.version.split()[0]}")
    work = 0.0
    for index, (hop, kind) in enumerate(HOPS):
        values = [r[index] for r in rows]
        median = statistics.median(values)
        work += median if kind == "work" else 0.0
        print(f"  {hop:<42} {median:6.2f}  ({min(values):.2f}-{max(values):.2f})  [{kind}]")
    total = statistics.median(totals)
    print(f"  {'total (drop -> loaded)':<42} {total:6.2f}  ({min(totals):.2f}-{max(totals):.2f})")
    print(f"work {work:.2f}s of {total:.2f}s ({work / total:.0%}); orchestration "
          f"{total - work:.2f}s (target: drop-to-queryable p50 <= 10 s)")


if __name__ == "__main__":
    main()
