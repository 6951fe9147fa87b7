"""The bridge's directory source and CSV / CSV.gz drops: when is such a file complete?

- .csv.gz: once its gzip stream inflates to the trailer (a cut one waits for the
  stall limit, like a parquet file without its footer);
- .csv: no end marker, so settling (and no writer) decides;
- a file whose first bytes rule out the format its name promises (a .csv.gz that
  is not gzip, a .parquet that is not parquet) cannot become whole: it is
  announced once settled, without waiting for the stall limit.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import pytest

from pubsub_bridge.directory_source import DirectorySource, OpenForWriting, whole_format
from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline.storage.local import LocalStore, cannot_become_complete, gzip_complete

PREFIXES = ["raw/", "processed/"]
CSV = b"dispatching_base_num,pickup_datetime\n" + b"B00001,2020-04-01 00:00:00\n" * 20_000


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


def source_of(store: LocalStore, tmp_path: Path) -> DirectorySource:
    # no /proc: the stall timer alone decides about files without their end marker
    return DirectorySource(store, PREFIXES, tmp_path / "state.json", BridgeMetrics(),
                           settle_seconds=0.5, stall_seconds=5.0,
                           writers=OpenForWriting(store.root, proc=tmp_path / "no-proc"))


def put(store: LocalStore, name: str, data: bytes) -> Path:
    path = store.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def test_gzip_completeness(tmp_path: Path) -> None:
    whole = gzip.compress(CSV)
    path = tmp_path / "x.csv.gz"
    for data, expected in ((whole, True), (whole[:-4], False), (whole[: len(whole) // 2], False),
                           (whole + gzip.compress(b"more\n"), True),  # two members
                           (whole + b"\0" * 8, True), (b"plain text", False), (b"", False)):
        path.write_bytes(data)
        assert gzip_complete(path) is expected, data[:20]
    path.write_bytes(b"plain text")
    assert cannot_become_complete(path, "x.csv.gz")
    assert not cannot_become_complete(path, "x.csv")
    path.write_bytes(whole[:10])
    assert not cannot_become_complete(path, "x.csv.gz")
    assert whole_format(path, "a.csv") is None
    assert whole_format(path, "a.csv.gz") is False


def test_a_whole_csv_gz_is_announced_once_settled(store: LocalStore, tmp_path: Path) -> None:
    name = "raw/green/2020/green_tripdata_2020-10.csv.gz"
    put(store, name, gzip.compress(CSV))
    source = source_of(store, tmp_path)
    assert source.scan(now=0.0) == []
    assert [r.name for r in source.scan(now=0.5)] == [name]


def test_a_cut_csv_gz_waits_for_the_stall_limit(store: LocalStore, tmp_path: Path) -> None:
    name = "raw/green/2020/green_tripdata_2020-10.csv.gz"
    whole = gzip.compress(CSV)
    path = put(store, name, whole[: len(whole) // 2])
    source = source_of(store, tmp_path)
    assert source.scan(now=0.0) == []
    assert source.scan(now=1.0) == []  # settled but not whole: still being written?
    assert source.scan(now=4.0) == []
    assert [r.name for r in source.scan(now=5.5)] == [name]  # stalled: announced, quarantined
    # a copy that finishes before the stall limit is announced whole, once
    other = "raw/fhv/2020/fhv_tripdata_2020-04.csv.gz"
    put(store, other, whole[:100])
    assert source.scan(now=6.0) == []
    put(store, other, whole)
    os.utime(store.root / other)
    assert source.scan(now=6.1) == []
    assert [r.name for r in source.scan(now=6.7)] == [other]
    assert path.exists()


def test_a_plain_csv_is_announced_by_quiescence(store: LocalStore, tmp_path: Path) -> None:
    name = "raw/fhv/2020/fhv_tripdata_2020-04.csv"
    put(store, name, CSV[:1000])
    source = source_of(store, tmp_path)
    assert source.scan(now=0.0) == []
    put(store, name, CSV)  # still growing: the settle clock starts again
    assert source.scan(now=0.4) == []
    assert source.scan(now=0.8) == []
    assert [r.name for r in source.scan(now=1.0)] == [name]


@pytest.mark.parametrize("name", ["raw/fhvhv/2020/fhvhv_tripdata_2020-04.csv.gz",
                                  "raw/fhvhv/2020/fhvhv_tripdata_2020-04.parquet"])
def test_a_file_that_cannot_be_its_format_is_decided_at_once(
        store: LocalStore, tmp_path: Path, name: str) -> None:
    put(store, name, CSV)  # plain text under a .csv.gz or .parquet name
    source = source_of(store, tmp_path)
    assert source.scan(now=0.0) == []
    assert [r.name for r in source.scan(now=0.5)] == [name]  # not after the 5 s stall
