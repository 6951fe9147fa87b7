"""Benchmark: flow runs started cold (`python -m prefect.engine`) vs warm (fork server).

Usage: .venv/bin/python benchmarks/warm_runs.py [--runs 20] [--sequential 3]

One Prefect server (SQLite), one fork server, one process worker
(PREFECT_WORKER_QUERY_SECONDS=1) and a trivial flow deployed twice on the same
pool: `cold` (command `python -m prefect.engine`, what the worker runs without
us) and `warm` (the pool's default: the launcher). For each, it measures
`--sequential` runs one after another, then a burst of `--runs` runs created at
once, and prints side by side:

- created -> Completed per run (the server's own timestamps), median / p90 / max,
- the burst's makespan (first created -> last Completed),
- CPU seconds per run of the run processes (reaped children of the worker and of
  the fork server), of the worker itself and of the Prefect server.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from warm_runs_stack import WarmStack  # noqa: E402


def tree_cpu(pid: int) -> float:
    """CPU seconds of a process and its live descendants."""
    total = 0.0
    root = psutil.Process(pid)
    for process in [root, *root.children(recursive=True)]:
        try:
            times = process.cpu_times()
            total += times.user + times.system
        except psutil.Error:
            pass
    return total


def reaped_children_cpu(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return times.children_user + times.children_system


@dataclass
class Sample:
    latencies: list[float]
    makespan: float
    run_cpu: float
    worker_cpu: float
    server_cpu: float


def measure(stack: WarmStack, deployment: str, count: int, burst: bool) -> Sample:
    assert stack.worker and stack.fork_server and stack.server and stack.server.process
    pids = {"worker": stack.worker.pid, "fork": stack.fork_server.pid,
            "server": stack.server.process.pid}
    before = {"runs": reaped_children_cpu(pids["worker"]) + reaped_children_cpu(pids["fork"]),
              "worker": tree_cpu(pids["worker"]), "server": tree_cpu(pids["server"])}
    ids: list[UUID] = []
    if burst:
        ids = stack.create_runs(deployment, count)
        runs = stack.wait_final(ids, timeout=60 + 30 * count)
    else:
        runs = []
        for _ in range(count):
            new = stack.create_runs(deployment, 1)
            ids += new
            runs += stack.wait_final(new, timeout=120)
    # Let the last processes finish their shutdown and be reaped.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(
            psutil.Process(pids[name]).children() for name in ("worker", "fork")):
        time.sleep(0.2)
    bad = [r.state.type.value for r in runs if not r.state or r.state.type.value != "COMPLETED"]
    if bad:
        raise RuntimeError(f"{deployment}: runs ended {bad}")
    latencies = [(r.end_time - r.created).total_seconds() for r in runs
                 if r.end_time and r.created]
    firsts = [r.created for r in runs if r.created]
    lasts = [r.end_time for r in runs if r.end_time]
    after = {"runs": reaped_children_cpu(pids["worker"]) + reaped_children_cpu(pids["fork"]),
             "worker": tree_cpu(pids["worker"]), "server": tree_cpu(pids["server"])}
    return Sample(
        latencies=latencies,
        makespan=(max(lasts) - min(firsts)).total_seconds(),
        run_cpu=(after["runs"] - before["runs"]) / count,
        worker_cpu=(after["worker"] - before["worker"]) / count,
        server_cpu=(after["server"] - before["server"]) / count,
    )


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20, help="runs in the burst")
    parser.add_argument("--sequential", type=int, default=3, help="runs one after another")
    parser.add_argument("--max-children", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="warm-bench-") as tmp:
        stack = WarmStack(Path(tmp), max_children=args.max_children,
                          server_env_like_worker=True)
        try:
            stack.start()
            for deployment in ("cold", "warm"):  # warm-up: the worker's first poll, imports
                stack.wait_final(stack.create_runs(deployment, 1))
            results: dict[str, dict[str, Sample]] = {}
            for deployment in ("cold", "warm"):
                results[deployment] = {
                    "sequential": measure(stack, deployment, args.sequential, burst=False),
                    "burst": measure(stack, deployment, args.runs, burst=True),
                }
        finally:
            stack.stop()

    cold, warm = results["cold"], results["warm"]
    print(f"trivial flow runs on a process worker, {psutil.cpu_count()} CPUs, SQLite server")
    print(f"{'':44}{'cold':>10}{'warm':>10}")

    def row(label: str, c: float, w: float, unit: str = "s") -> None:
        print(f"{label:44}{c:>9.2f}{unit}{w:>9.2f}{unit}")

    for mode, title in (("sequential", f"one at a time ({args.sequential} runs)"),
                        ("burst", f"burst of {args.runs} runs created at once")):
        c, w = cold[mode], warm[mode]
        print(title)
        row("  created -> Completed, median", statistics.median(c.latencies),
            statistics.median(w.latencies))
        row("  created -> Completed, p90", pct(c.latencies, 0.9), pct(w.latencies, 0.9))
        row("  created -> Completed, max", max(c.latencies), max(w.latencies))
        if mode == "burst":
            row("  makespan (first created -> last done)", c.makespan, w.makespan)
        row("  CPU per run: run processes", c.run_cpu, w.run_cpu)
        row("  CPU per run: worker", c.worker_cpu, w.worker_cpu)
        row("  CPU per run: Prefect server", c.server_cpu, w.server_cpu)


if __name__ == "__main__":
    main()
