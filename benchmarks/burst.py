"""Benchmark: a burst of N files dropped at once on the local profile, SQLite vs PostgreSQL.

Usage: .venv/bin/python benchmarks/burst.py [--files 200] [--rows 300] [--timeout 1800]
       [--databases postgres,sqlite]     (e.g. --files 1000 --databases postgres)

For each Prefect database (embedded PostgreSQL, the default; SQLite, the
fallback) a fresh local stack is started (server, fork server, worker, bridge,
deployments, automations), N small valid files (both datasets, distinct months)
are copied into raw/ at once, and nothing else is done: the bridge,
automations, recover and reconcile deployments must load them. Printed per
database: seconds until all are queryable, flow runs created per second, runs
that did not complete, files loaded exactly once, files per second, the peak
RSS of each part (VmHWM; forked runs are children of `flow-runs`, `postgres`
is the postmaster), and CPU seconds per flow run of each stack process (forked
runs counted under the fork server `flow-runs`; `postgres` is the embedded
cluster, backends included). The two rows are measured in the same run, one
after the other, so they compare.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import psutil

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from prefect.client.orchestration import get_client  # noqa: E402
from prefect.client.schemas.filters import FlowFilter, FlowFilterName  # noqa: E402
from prefect.settings import PREFECT_API_URL, temporary_settings  # noqa: E402
from support.burst import drop_all, make_burst, wait_all_loaded  # noqa: E402

from taxi_pipeline.settings import Settings  # noqa: E402
from taxi_pipeline.stack.local import LocalStack  # noqa: E402


def tree_cpu_seconds(pid: int) -> float:
    """CPU seconds so far of process `pid` and every process below it."""
    root = psutil.Process(pid)
    total = sum(root.cpu_times()[:4])  # user, system, reaped children's user, system
    for child in root.children(recursive=True):
        with contextlib.suppress(psutil.Error):
            total += sum(child.cpu_times()[:4])
    return total


def cpu_seconds(stack: LocalStack) -> dict[str, float]:
    """CPU seconds so far of each stack process, with its children (forked runs), and of
    the embedded PostgreSQL (`postgres`: postmaster and its backends)."""
    pids = {managed.name: managed.process.pid for managed in stack.processes}
    postmaster = stack.database.pid if stack.database is not None else None
    if postmaster is not None:
        pids["postgres"] = postmaster
    found: dict[str, float] = {}
    for name, pid in pids.items():
        with contextlib.suppress(psutil.Error):
            found[name] = tree_cpu_seconds(pid)
    return found


def peak_rss_mib(pid: int) -> float:
    """VmHWM: the process's own peak resident set (not inherited like ru_maxrss)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_counts() -> tuple[int, int, float]:
    """(runs created, runs not Completed, seconds from first to last creation)."""
    runs: list[Any] = []
    async with get_client() as client:
        while True:
            page = await client.read_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=["transform", "load"])),
                limit=200, offset=len(runs))
            runs += page
            if len(page) < 200:
                break
    created = sorted(r.created for r in runs if r.created)
    span = (created[-1] - created[0]).total_seconds() if len(created) > 1 else 0.0
    incomplete = sum(1 for r in runs if not (r.state and r.state.is_completed()))
    return len(runs), incomplete, span


def one(database: str, files_count: int, rows: int, timeout: float) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix=f"burst-{database}-") as tmp:
        home = Path(tmp) / "home"
        settings = Settings(profile="local", home=home, bucket=str(home / "bucket"),
                            prefect_database=database)  # type: ignore[arg-type]
        files = make_burst(files_count, Path(tmp) / "files", settings, rows=rows)
        with LocalStack(settings, ui=False, api_url=None) as stack, \
                temporary_settings(updates={PREFECT_API_URL: stack.api_url}):
            cpu_before = cpu_seconds(stack)
            started = drop_all(files, settings)
            outcome = wait_all_loaded(files, settings, started, timeout)
            cpu_after = cpu_seconds(stack)
            peaks = {m.name: peak_rss_mib(m.process.pid) for m in stack.processes}
            if stack.database is not None and stack.database.pid is not None:
                peaks["postgres"] = peak_rss_mib(stack.database.pid)
            created, incomplete, span = asyncio.run(run_counts())
            uris = {(settings.bucket_dir / f.name).as_uri(): f.expected_good for f in files}
            once = sum(1 for uri, good in uris.items()
                       if outcome.rows_by_uri.get(uri) == good
                       and outcome.loads_by_uri.get(uri) == 1)
            return {
                "database": database,
                "seconds": outcome.seconds,
                "files_per_s": files_count / outcome.seconds,
                "runs": created,
                "runs_per_s": created / span if span else float("nan"),
                "not_completed": incomplete,
                "exactly_once": f"{once}/{files_count}",
                "bridge_peak_mib": peaks["bridge"],
                "peak_mib": {name: round(mib) for name, mib in peaks.items()},
                # CPU per flow run, by process: where a burst's time goes.
                "cpu_per_run_s": {name: round((cpu_after[name] - cpu_before[name])
                                              / max(created, 1), 3)
                                  for name in cpu_after if name in cpu_before},
            }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--files", type=int, default=200)
    parser.add_argument("--rows", type=int, default=300)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--databases", default="postgres,sqlite")
    args = parser.parse_args()
    print(f"burst of {args.files} files x {args.rows} rows; load average before: "
          f"{os.getloadavg()[0]:.1f}; {time.strftime('%Y-%m-%d %H:%M')}", flush=True)
    results = []
    for database in args.databases.split(","):
        try:
            results.append(one(database, args.files, args.rows, args.timeout))
        except AssertionError as exc:
            results.append({"database": database, "error": str(exc)})
        print(results[-1], flush=True)
    print(f"\n{'database':<10} {'all loaded':>10} {'files/s':>7} {'runs':>6} {'runs/s':>7} "
          f"{'not done':>8} {'once':>9} {'bridge MiB':>10}")
    for r in results:
        if "error" in r:
            print(f"{r['database']:<10} FAILED: {r['error']}")
            continue
        print(f"{r['database']:<10} {r['seconds']:>9.0f}s {r['files_per_s']:>7.2f} {r['runs']:>6} "
              f"{r['runs_per_s']:>7.2f} {r['not_completed']:>8} {r['exactly_once']:>9} "
              f"{r['bridge_peak_mib']:>10.0f}")
    for r in results:
        if "cpu_per_run_s" in r:
            print(f"{r['database']}: CPU seconds per flow run: {r['cpu_per_run_s']}")
            print(f"{r['database']}: peak RSS per part, MiB: {r['peak_mib']}")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
