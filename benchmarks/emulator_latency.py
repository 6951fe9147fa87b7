"""Benchmark: upload-to-queryable latency on the emulator profile (median of N uploads).

Usage: .venv/bin/python benchmarks/emulator_latency.py [--uploads 5] [--rows 250000]

Starts the whole emulator profile (what `TAXI_PROFILE=emulator taxi-pipeline up`
starts: Pub/Sub emulator, fake-gcs-server, BigQuery emulator, Prefect server on
the embedded PostgreSQL, process worker, bridge), then uploads the same
synthetic month N times with the google-cloud-storage client; each upload is a
new generation that travels notification -> bridge -> transform ->
notification -> bridge -> load. The clock runs from the start of the upload
until the BigQuery emulator's load log holds that generation.

The first upload loads into an empty table; every later one replaces that
object's rows, which the BigQuery emulator does with a slow `MERGE`. The two are
reported apart, each beside the figure in docs/benchmarks.md, with the machine's load
average, since other runs often share these machines.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

from google.auth.credentials import AnonymousCredentials
from google.cloud import storage

from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.stack.emulator import emulator_stack
from taxi_pipeline.warehouse import warehouse_from_settings

PROJECT, BUCKET = "taxi-latency", "taxi-latency-bucket"
# What docs/benchmarks.md reports (250k rows, 2-core machine, otherwise idle).
DOCS_FIRST_LOAD = "11-16 s"
DOCS_REPLACE = "60-100 s"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--uploads", type=int, default=5)
    parser.add_argument("--rows", type=int, default=250_000)
    args = parser.parse_args()
    latencies: list[float] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, \
            emulator_stack(Settings(profile="emulator", home=Path(tmp), gcp_project=PROJECT,
                                    bucket=BUCKET)) as running:
        settings = running.settings
        warehouse = warehouse_from_settings(settings)
        local = write_month(generate_month("yellow", 2024, 1, args.rows, seed=3),
                            Path(tmp) / "month.parquet")
        name = raw_object_name(settings.raw_prefix, "yellow", 2024, 1)
        blob = storage.Client(project=PROJECT, credentials=AnonymousCredentials()) \
            .bucket(BUCKET).blob(name)
        uri = f"gs://{BUCKET}/{name}"
        for attempt in range(1, args.uploads + 1):
            start = time.perf_counter()
            blob.upload_from_filename(str(local))
            generation = int(blob.generation)
            while True:
                loaded = warehouse.loaded(settings.table, uri)
                if loaded and loaded[0] >= generation:
                    break
                if time.perf_counter() - start > 300:
                    raise SystemExit(f"upload {attempt} not loaded within 300 s")
                time.sleep(0.2)
            latencies.append(time.perf_counter() - start)
            print(f"upload {attempt}: {latencies[-1]:.1f}s ({loaded[1]:,} rows)", flush=True)
    load_after = os.getloadavg()[0]
    print(f"upload-to-queryable, emulator profile, {args.rows:,} rows, "
          f"load average {load_before:.1f} before / {load_after:.1f} after:")
    print(f"  first load (empty table):  {latencies[0]:.1f}s   (docs: {DOCS_FIRST_LOAD} "
          "at 250,000 rows)")
    if len(latencies) > 1:
        replaces = latencies[1:]
        print(f"  replace (re-upload, MERGE): median {statistics.median(replaces):.1f}s, "
              f"min {min(replaces):.1f}s, max {max(replaces):.1f}s over {len(replaces)} uploads"
              f"   (docs: {DOCS_REPLACE} at 250,000 rows; the BigQuery emulator's MERGE, "
              "not representative of BigQuery)")


if __name__ == "__main__":
    main()
