"""Benchmark: the fhvhv month (20M rows) and a CSV.gz month, each against its floor.

Usage: .venv/bin/python benchmarks/datasets_transform.py [--fhvhv-rows 20000000]
       [--csv-rows 3000000] [--only fhvhv|csv]

- fhvhv: a synthetic month with TLC's 2024 columns, written chunk by chunk (it would not
  fit in memory at once). In fresh processes: the floor (iter_batches into a
  ParquetWriter, snappy, same batch size: a bare read and write of the same file), then
  our transform; time and peak RSS (VmHWM) of each. Targets: peak <= 700 MiB, time <=
  1.5x the floor.
- CSV.gz: a synthetic green month in the mirror's layout, gzipped; pyarrow's own
  streaming CSV read of the file (open_csv, types inferred, nothing written) as the
  floor, then our transform (types from the spec, rules, parquet written); rows/s.

Prints every figure beside its floor, with the date and the load average: the machine
is shared; a figure taken under load is not a quiet measurement.
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
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BATCH_ROWS = 32_768


def make_fhvhv(path: Path, rows: int, chunk: int = 1_000_000) -> None:
    import pyarrow.parquet as pq

    from taxi_pipeline.sources.sample_fhv import generate_fhvhv

    writer = None
    for index, start in enumerate(range(0, rows, chunk)):
        table, _ = generate_fhvhv(2024, 3, min(chunk, rows - start), seed=index)
        if writer is None:
            writer = pq.ParquetWriter(path, table.schema, compression="snappy")
        writer.write_table(table, row_group_size=chunk)
    assert writer is not None
    writer.close()


def make_csv_gz(path: Path, rows: int) -> None:
    from taxi_pipeline.sources.sample_data import generate_month, write_month

    write_month(generate_month("green", 2020, 10, rows, seed=1, file_format="csv.gz"), path)


def floor_parquet(source: Path, out: Path) -> dict[str, Any]:
    import pyarrow.parquet as pq

    start = time.perf_counter()
    parquet = pq.ParquetFile(source)
    with pq.ParquetWriter(out / "floor.parquet", parquet.schema_arrow,
                          compression="snappy") as writer:
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS):
            writer.write_batch(batch)
    return {"seconds": time.perf_counter() - start, "rows": parquet.metadata.num_rows}


def floor_csv(source: Path, out: Path) -> dict[str, Any]:
    import pyarrow as pa
    import pyarrow.csv as pcsv

    start = time.perf_counter()
    rows = 0
    reader = pcsv.open_csv(pa.CompressedInputStream(pa.OSFile(str(source)), "gzip"),
                           read_options=pcsv.ReadOptions(block_size=BATCH_ROWS * 160))
    for batch in reader:
        rows += batch.num_rows
    return {"seconds": time.perf_counter() - start, "rows": rows}


def ours(source: Path, out: Path) -> dict[str, Any]:
    from taxi_pipeline.transform.streaming import source_format, transform_file

    dataset = "fhvhv" if "fhvhv" in source.name else "green"
    month = (2024, 3) if dataset == "fhvhv" else (2020, 10)
    start = time.perf_counter()
    stats = transform_file(source, out / "processed.parquet", out / "rejects.parquet",
                           file_format=source_format(source.name), source_uri=source.as_uri(),
                           source_generation=1, taxi_type=dataset, month=month,
                           batch_rows=BATCH_ROWS)
    return {"seconds": time.perf_counter() - start, "rows": stats.rows_in,
            "rows_out": stats.rows_out,
            "row_groups_mib": [round(b / 2**20, 1) for b in stats.row_group_disk_bytes]}


def child(mode: str, source: str, out: str) -> None:
    result = {"floor_parquet": floor_parquet, "floor_csv": floor_csv, "ours": ours}[mode](
        Path(source), Path(out))
    status = Path("/proc/self/status").read_text()
    result["peak_mib"] = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
    print(json.dumps(result))


def measure(mode: str, source: Path, out: Path) -> dict[str, Any]:
    done = subprocess.run([sys.executable, __file__, "--child", mode, str(source), str(out)],
                          check=True, capture_output=True, text=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def header() -> str:
    load = " ".join(f"{x:.2f}" for x in os.getloadavg())
    return (f"{datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {os.cpu_count()} cores, "
            f"load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fhvhv-rows", type=int, default=20_000_000)
    parser.add_argument("--csv-rows", type=int, default=3_000_000)
    parser.add_argument("--only", choices=["fhvhv", "csv"])
    parser.add_argument("--child", nargs=3, metavar=("MODE", "SOURCE", "OUT"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if args.only != "csv":
            source = work / "fhvhv_tripdata_2024-03.parquet"
            make_fhvhv(source, args.fhvhv_rows)
            print(f"fhvhv {args.fhvhv_rows:,} rows, {source.stat().st_size / 2**20:.0f} MiB; "
                  f"{header()}")
            floor = measure("floor_parquet", source, work)
            got = measure("ours", source, work)
            print(f"  floor (read+write): {floor['seconds']:.1f} s, peak {floor['peak_mib']:.0f} "
                  f"MiB")
            print(f"  transform:          {got['seconds']:.1f} s = "
                  f"{got['seconds'] / floor['seconds']:.2f}x the floor (target <= 1.5x), "
                  f"peak {got['peak_mib']:.0f} MiB (target <= 700), "
                  f"{got['rows'] / got['seconds']:,.0f} rows/s; row groups (MiB) "
                  f"{got['row_groups_mib'][:3]}...; load now {os.getloadavg()[0]:.2f}")
            source.unlink()
        if args.only != "fhvhv":
            source = work / "green_tripdata_2020-10.csv.gz"
            make_csv_gz(source, args.csv_rows)
            print(f"green CSV.gz {args.csv_rows:,} rows, {source.stat().st_size / 2**20:.0f} "
                  f"MiB; {header()}")
            floor = measure("floor_csv", source, work)
            got = measure("ours", source, work)
            print(f"  pyarrow streaming CSV read: {floor['rows'] / floor['seconds']:,.0f} rows/s "
                  f"({floor['seconds']:.1f} s, peak {floor['peak_mib']:.0f} MiB)")
            print(f"  transform:                  {got['rows'] / got['seconds']:,.0f} rows/s "
                  f"({got['seconds']:.1f} s = {got['seconds'] / floor['seconds']:.2f}x, "
                  f"peak {got['peak_mib']:.0f} MiB); load now {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    main()
