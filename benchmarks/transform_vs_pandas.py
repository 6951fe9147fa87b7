"""Benchmark: our streaming transform vs the original tutorial's pandas path, same month.

Usage: .venv/bin/python benchmarks/transform_vs_pandas.py [--rows 3000000]

Each side runs in its own fresh process on the same synthetic yellow month, so
peak memory (VmHWM) is that side's alone. The pandas path is the tutorial's:
read_parquet, to_datetime on both timestamps, drop passenger_count == 0,
to_parquet with gzip. The floor is a bare pyarrow read and write of the same file
(iter_batches into a ParquetWriter, snappy), measured in the same run, so the
transform's time is a ratio to what this machine can do at all (target <= 1.5x).
Prints all three times and peaks, the ratios, the date and the load average, and
the on-disk size of each row group ours wrote (BigQuery wants >= 16 MiB).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def run_ours(source: Path, out_dir: Path) -> dict[str, Any]:
    from taxi_pipeline.transform.streaming import transform_parquet

    start = time.perf_counter()
    stats = transform_parquet(
        source, out_dir / "processed.parquet", out_dir / "rejects.parquet",
        source_uri=source.as_uri(), source_generation=1, taxi_type="yellow", month=(2024, 1),
    )
    return {"seconds": time.perf_counter() - start, "rows_out": stats.rows_out,
            "row_groups_mib": [round(b / 2**20, 1) for b in stats.row_group_disk_bytes]}


def run_floor(source: Path, out_dir: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    parquet = pq.ParquetFile(source)
    rows = 0
    with pq.ParquetWriter(out_dir / "floor.parquet", parquet.schema_arrow,
                          compression="snappy") as writer:
        for batch in parquet.iter_batches():
            writer.write_batch(batch)
            rows += batch.num_rows
    return {"seconds": time.perf_counter() - start, "rows_out": rows}


def run_pandas(source: Path, out_dir: Path) -> dict[str, Any]:
    import pandas as pd

    start = time.perf_counter()
    df = pd.read_parquet(source)
    df.tpep_pickup_datetime = pd.to_datetime(df.tpep_pickup_datetime)
    df.tpep_dropoff_datetime = pd.to_datetime(df.tpep_dropoff_datetime)
    df = df[df.passenger_count != 0]
    df.to_parquet(out_dir / "pandas.parquet.gz", compression="gzip")
    return {"seconds": time.perf_counter() - start, "rows_out": len(df)}


def child(mode: str, source: str, out_dir: str) -> None:
    runner = {"ours": run_ours, "floor": run_floor, "pandas": run_pandas}[mode]
    result = runner(Path(source), Path(out_dir))
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss across fork+exec, so a child
    # would report the parent's peak (the parent generated the month).
    status = Path("/proc/self/status").read_text()
    result["peak_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    print(json.dumps(result))


def measure(mode: str, source: Path, out_dir: Path) -> dict[str, Any]:
    output = subprocess.run(
        [sys.executable, __file__, "--child", mode, str(source), str(out_dir)],
        check=True, capture_output=True, text=True,
    ).stdout
    return dict(json.loads(output.strip().splitlines()[-1]))


def main() -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, {os.cpu_count()} cores, "
          f"load average before: {os.getloadavg()[0]:.1f}")
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=3_000_000)
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SOURCE", "OUT"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return

    from taxi_pipeline.sources.sample_data import generate_month, write_month

    with tempfile.TemporaryDirectory() as tmp:
        tmp_path = Path(tmp)
        source = write_month(generate_month("yellow", 2024, 1, args.rows, seed=42),
                             tmp_path / "yellow_tripdata_2024-01.parquet")
        size_mib = source.stat().st_size / 2**20
        print(f"source: {args.rows:,} rows, {size_mib:.0f} MiB (synthetic yellow 2024-01)")
        floor = measure("floor", source, tmp_path)
        ours = measure("ours", source, tmp_path)
        pandas = measure("pandas", source, tmp_path)
    print(f"{'path':<28}{'seconds':>10}{'peak MiB':>12}{'rows out':>12}")
    for name, result in (("floor (pyarrow read+write)", floor),
                         ("ours (arrow, streaming)", ours), ("tutorial (pandas, gzip)", pandas)):
        print(f"{name:<28}{result['seconds']:>10.2f}{result['peak_mib']:>12.0f}"
              f"{int(result['rows_out']):>12,}")
    print(f"ours / floor: {ours['seconds'] / floor['seconds']:.2f}x (target <= 1.5x); "
          f"speed-up over pandas: {pandas['seconds'] / ours['seconds']:.1f}x; "
          f"memory: ours uses {ours['peak_mib'] / pandas['peak_mib']:.2f}x of pandas' peak "
          "(target <= 0.3x)")
    groups = ours["row_groups_mib"]
    print(f"ours: {len(groups)} row groups on disk (MiB): {groups} "
          "(target: each but the last >= 16 MiB, <= 128 MiB)")
    print(f"load average after: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
