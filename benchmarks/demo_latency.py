"""Benchmark: drop-to-queryable latency of the local profile (median of N drops).

Usage: .venv/bin/python benchmarks/demo_latency.py [--drops 5] [--rows 250000]

Runs `taxi-pipeline demo --drops N` in a throwaway TAXI_HOME and prints each
drop's latency and the median. Each drop is a new generation of the same
month, so every drop runs the whole chain (bridge, transform, bridge, load).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--drops", type=int, default=5)
    parser.add_argument("--rows", type=int, default=250_000)
    args = parser.parse_args()
    cli = Path(sys.executable).with_name("taxi-pipeline")
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "TAXI_HOME": home}
        env.pop("PREFECT_API_URL", None)
        out = subprocess.run(
            [str(cli), "demo", "--drops", str(args.drops), "--rows", str(args.rows)],
            env=env, check=True, capture_output=True, text=True,
        ).stdout
    latencies = [float(x) for x in re.findall(r"drop to queryable ([0-9.]+)s", out)]
    print(f"drop-to-queryable, {args.rows:,} rows, local profile (process worker):")
    for i, value in enumerate(latencies, 1):
        print(f"  drop {i}: {value:.1f}s")
    ordered = sorted(latencies)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    print(f"median {statistics.median(latencies):.1f}s over {len(latencies)} drops "
          f"(target <= 10 s), p95 {p95:.1f}s (target <= 15 s); "
          f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
