"""A tiny flow for the fork-server tests: it writes down what its process sees.

Deployed by module path (`warm_flows_for_tests.probe`), so the worker's children
and the fork server import it from `tests/` on PYTHONPATH. The record is written
before the optional sleep, so a test can find (and watch) the run's process
while it is still running. Like the pipeline's flows it imports pyarrow and
DuckDB, whose native threads and allocators are then inherited through fork,
and uses both (with Arrow's thread pool) in every run.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from prefect import flow
from prefect.runtime import flow_run
from prefect.settings import get_current_settings


@flow(name="warm-probe", log_prints=True)
def probe(out_dir: str, fail: bool = False, sleep: float = 0.0,
          exit_code: int | None = None) -> int:
    """Record pid, parent, cwd and the settings this process sees; then sleep, fail or exit."""
    settings = get_current_settings()
    record = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "cwd": os.getcwd(),
        "api_url": settings.api.url,
        "logging_level": settings.logging.level,
        "prefect_logger_level": logging.getLevelName(logging.getLogger("prefect").level),
        "marker": os.environ.get("WARM_RUNS_MARKER"),
        "flow_run_id": flow_run.id,
    }
    parquet = Path(out_dir) / f"{flow_run.id}.parquet"
    pq.write_table(pa.table({"x": list(range(100_000))}), parquet)
    record["arrow_last"] = pq.read_table(parquet, use_threads=True).column("x").to_pylist()[-1]
    record["duckdb_count"] = duckdb.sql(f"select count(*) from '{parquet}'").fetchone()[0]
    parquet.unlink()
    target = Path(out_dir) / f"{flow_run.id}.json"
    tmp = target.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(target)
    print(f"probe pid {os.getpid()} ppid {os.getppid()}")
    if sleep:
        time.sleep(sleep)
    if exit_code is not None:
        os._exit(exit_code)  # the process dies under the engine, as a crash would
    if fail:
        raise RuntimeError("asked to fail")
    return os.getpid()
