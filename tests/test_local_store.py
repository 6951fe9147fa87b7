"""The local profile's bucket (LocalStore) and its notification source (DirectorySource)."""

from __future__ import annotations

import base64
import hashlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pubsub_bridge.directory_source import DirectorySource, has_parquet_footer
from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline.settings import get_settings
from taxi_pipeline.storage.base import ObjectNotFound, PreconditionFailed, content_md5
from taxi_pipeline.storage.local import LocalStore, is_partial_name

RAW = "raw/yellow/2024/yellow_tripdata_2024-01.parquet"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


def write(store: LocalStore, name: str, data: bytes) -> Path:
    path = store.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def parquet_bytes(tmp_path: Path, rows: int = 2_000) -> bytes:
    path = tmp_path / "src.parquet"
    pq.write_table(pa.table({"a": list(range(rows)), "b": [f"v{i}" for i in range(rows)]}), path)
    return path.read_bytes()


def rewrite(path: Path, data: bytes) -> None:
    """Write again; file systems with coarse timestamps need a tick between writes."""
    time.sleep(0.01)
    path.write_bytes(data)


def test_settings_are_isolated_per_test(tmp_path: Path) -> None:
    settings = get_settings()
    assert settings.profile == "local"
    assert settings.home == (tmp_path / "home").resolve()
    assert settings.bucket_dir == (tmp_path / "home" / "bucket").resolve()
    assert settings.warehouse_file == (tmp_path / "home" / "warehouse.duckdb").resolve()


# -- LocalStore ---------------------------------------------------------------------------


def test_publish_then_ref_and_read(store: LocalStore) -> None:
    with store.publish(RAW) as path:
        path.write_bytes(b"hello")
        assert not (store.root / RAW).exists()  # nothing visible until the block ends
    ref = store.ref(RAW)
    assert ref.name == RAW
    assert ref.size == 5
    assert ref.scheme == "file"
    assert ref.uri == (store.root / RAW).as_uri()
    assert store.name_of(ref.uri) == RAW
    with store.open_read(ref) as handle:
        assert handle.read() == b"hello"
    assert sorted(p.name for p in (store.root / RAW).parent.iterdir()) == [
        "yellow_tripdata_2024-01.parquet"]


def test_publish_is_atomic_and_cleans_up_on_error(store: LocalStore) -> None:
    with store.publish(RAW) as path:
        path.write_bytes(b"version 1")
    before = store.ref(RAW)
    with pytest.raises(RuntimeError, match="boom"), store.publish(RAW) as path:
        path.write_bytes(b"half of version 2")
        raise RuntimeError("boom")
    # the old object is untouched and no temporary file is left behind
    assert (store.root / RAW).read_bytes() == b"version 1"
    assert store.ref(RAW).generation == before.generation
    assert os.listdir((store.root / RAW).parent) == ["yellow_tripdata_2024-01.parquet"]


def test_publish_of_a_new_name_leaves_nothing_on_error(store: LocalStore) -> None:
    with pytest.raises(ValueError), store.publish("processed/x.parquet") as path:
        path.write_bytes(b"partial")
        raise ValueError("transform failed")
    assert list(store.list("")) == []
    assert os.listdir(store.root / "processed") == []


def test_publish_if_generation_match(store: LocalStore) -> None:
    with store.publish(RAW, if_generation_match=0) as path:  # only if absent
        path.write_bytes(b"one")
    first = store.ref(RAW)
    with pytest.raises(PreconditionFailed), store.publish(RAW, if_generation_match=0) as path:
        path.write_bytes(b"two")
    assert (store.root / RAW).read_bytes() == b"one"
    with store.publish(RAW, if_generation_match=first.generation) as path:
        path.write_bytes(b"three")
    assert (store.root / RAW).read_bytes() == b"three"
    assert [p.name for p in (store.root / RAW).parent.iterdir()] == [
        "yellow_tripdata_2024-01.parquet"]


def test_generation_changes_when_rewritten(store: LocalStore) -> None:
    path = write(store, RAW, b"same bytes")
    first = store.ref(RAW)
    rewrite(path, b"same bytes")
    second = store.ref(RAW)
    assert second.generation != first.generation
    assert second.generation > first.generation
    with store.publish(RAW) as tmp:
        tmp.write_bytes(b"same bytes")
    assert store.ref(RAW).generation not in (first.generation, second.generation)


def publish_bytes(store: LocalStore, name: str, data: bytes, **options: Any) -> None:
    with store.publish(name, **options) as path:
        path.write_bytes(data)


def test_keep_unchanged_keeps_the_generation_and_mtime_of_the_same_bytes(
        store: LocalStore, tmp_path: Path) -> None:
    data = parquet_bytes(tmp_path)
    publish_bytes(store, RAW, data)
    before, st = store.ref(RAW), (store.root / RAW).stat()
    time.sleep(0.01)  # a replacement would get a later change time
    publish_bytes(store, RAW, data, keep_unchanged=True)
    after, st_after = store.ref(RAW), (store.root / RAW).stat()
    assert after == before
    assert (st_after.st_ino, st_after.st_mtime_ns, st_after.st_ctime_ns) == (
        st.st_ino, st.st_mtime_ns, st.st_ctime_ns)
    # the temporary file is gone too
    assert os.listdir((store.root / RAW).parent) == ["yellow_tripdata_2024-01.parquet"]


@pytest.mark.parametrize("new", [b"other bytes, other size", b"same size, other b"])
def test_keep_unchanged_replaces_different_bytes(store: LocalStore, new: bytes) -> None:
    publish_bytes(store, RAW, b"same size, first b")
    before = store.ref(RAW)
    time.sleep(0.01)
    publish_bytes(store, RAW, new, keep_unchanged=True)
    assert (store.root / RAW).read_bytes() == new
    assert store.ref(RAW).generation > before.generation
    assert os.listdir((store.root / RAW).parent) == ["yellow_tripdata_2024-01.parquet"]


def test_keep_unchanged_creates_an_absent_object(store: LocalStore) -> None:
    publish_bytes(store, RAW, b"first", keep_unchanged=True)
    assert (store.root / RAW).read_bytes() == b"first"
    assert store.ref(RAW).size == 5


def test_without_keep_unchanged_the_same_bytes_are_a_new_generation(store: LocalStore) -> None:
    publish_bytes(store, RAW, b"same")
    before = store.ref(RAW)
    time.sleep(0.01)
    publish_bytes(store, RAW, b"same")
    assert store.ref(RAW).generation > before.generation


def test_keep_unchanged_checks_the_precondition_first(store: LocalStore) -> None:
    publish_bytes(store, RAW, b"same")
    before = store.ref(RAW)
    with pytest.raises(PreconditionFailed):
        publish_bytes(store, RAW, b"same", keep_unchanged=True, if_generation_match=0)
    publish_bytes(store, RAW, b"same", keep_unchanged=True, if_generation_match=before.generation)
    assert store.ref(RAW) == before


def test_md5_is_base64_like_gcs_and_shared_with_publish(store: LocalStore, tmp_path: Path
                                                         ) -> None:
    data = parquet_bytes(tmp_path)
    write(store, RAW, data)
    expected = base64.b64encode(hashlib.md5(data).digest()).decode()
    assert store.md5(RAW) == expected == content_md5(store.root / RAW)


def test_created_is_when_the_generation_came_to_be(store: LocalStore) -> None:
    path = write(store, RAW, b"x")
    old = time.time() - 86_400 * 365
    os.utime(path, (old, old))  # as `cp -p` leaves it: an old mtime, a new ctime
    ref = store.ref(RAW)
    assert ref.created is not None and ref.created.tzinfo is not None
    assert ref.created.timestamp() == pytest.approx(ref.generation / 1e6, abs=1e-6)
    assert abs(ref.created.timestamp() - time.time()) < 60
    assert ref.updated is not None and ref.updated.timestamp() == pytest.approx(old, abs=1e-3)


def test_generation_is_stable_while_unchanged(store: LocalStore) -> None:
    write(store, RAW, b"x")
    assert store.ref(RAW).generation == store.ref(RAW).generation
    assert [r.generation for r in store.list("raw/")] == [store.ref(RAW).generation]


def test_open_read_of_a_stale_generation(store: LocalStore) -> None:
    path = write(store, RAW, b"old")
    old = store.ref(RAW)
    rewrite(path, b"new")
    with pytest.raises(ObjectNotFound), store.open_read(old):
        pass
    with store.open_read(store.ref(RAW)) as handle:
        assert handle.read() == b"new"


def test_missing_object(store: LocalStore) -> None:
    with pytest.raises(ObjectNotFound):
        store.ref("raw/nothing.parquet")
    path = write(store, RAW, b"x")
    ref = store.ref(RAW)
    path.unlink()
    with pytest.raises(ObjectNotFound), store.open_read(ref):
        pass


def test_a_file_where_a_folder_would_be_is_no_object_below_it(store: LocalStore) -> None:
    write(store, "processed/yellow/2024", b"in the way")
    with pytest.raises(ObjectNotFound):
        store.ref("processed/yellow/2024/yellow_tripdata_2024-01.parquet")


def test_move(store: LocalStore) -> None:
    write(store, RAW, b"bad file")
    ref = store.ref(RAW)
    target = "quarantine/yellow/2024/yellow_tripdata_2024-01.parquet"
    moved = store.move(ref, target)
    assert moved.name == target
    assert moved.size == len(b"bad file")
    assert (store.root / target).read_bytes() == b"bad file"
    assert not (store.root / RAW).exists()
    with pytest.raises(ObjectNotFound):
        store.ref(RAW)


def test_move_of_a_stale_generation_is_refused(store: LocalStore) -> None:
    path = write(store, RAW, b"v1")
    old = store.ref(RAW)
    rewrite(path, b"v2")
    with pytest.raises(PreconditionFailed):
        store.move(old, "quarantine/x.parquet")
    assert path.read_bytes() == b"v2"
    assert not (store.root / "quarantine" / "x.parquet").exists()


def test_list_skips_hidden_and_partial_names(store: LocalStore) -> None:
    names = [
        "raw/yellow/2024/a.parquet",
        "raw/yellow/2024/b.parquet",
        "raw/green/2024/c.parquet",
        "raw/yellow/2024/.a.parquet.x1y2.tmp",
        "raw/yellow/2024/.hidden.parquet",
        "raw/yellow/2024/d.parquet.part",
        "raw/yellow/2024/e.parquet.tmp",
        "raw/yellow/2024/f.parquet.crdownload",
        "raw/yellow/2024/~lock.parquet",
        "raw/.git/objects.parquet",
        "processed/yellow/2024/a.parquet",
    ]
    for name in names:
        write(store, name, b"x")
    assert [r.name for r in store.list("raw/")] == [
        "raw/green/2024/c.parquet",
        "raw/yellow/2024/a.parquet",
        "raw/yellow/2024/b.parquet",
    ]
    assert [r.name for r in store.list("")][-1] == "raw/yellow/2024/b.parquet"
    assert len(list(store.list(""))) == 4
    assert list(store.list("nothing/")) == []


@pytest.mark.parametrize(
    ("name", "partial"),
    [
        ("raw/x.parquet", False),
        ("raw/.x.parquet", True),
        ("raw/.x.tmp", True),
        ("raw/x.part", True),
        ("raw/x.parquet.partial", True),
        ("raw/x_COPYING_", True),
        ("raw/.dir/x.parquet", False),  # only the base name counts here; list() skips the dir
    ],
)
def test_is_partial_name(name: str, partial: bool) -> None:
    assert is_partial_name(name) is partial


def test_name_of(store: LocalStore) -> None:
    assert store.name_of((store.root / "raw" / "a b.parquet").as_uri()) == "raw/a b.parquet"
    assert store.name_of(f"file://{store.root}/raw/../processed/x.parquet") == (
        "processed/x.parquet")


@pytest.mark.parametrize(
    "make_uri",
    [
        lambda root: "gs://bucket/raw/x.parquet",
        lambda root: "file:///etc/passwd",
        # a sibling directory whose name starts with the bucket's name
        lambda root: (root.parent / f"{root.name}-other" / "x.parquet").as_uri(),
        lambda root: root.as_uri(),  # the bucket itself is not an object
        lambda root: f"file://{root}/../outside.parquet",
    ],
    ids=["gs", "elsewhere", "sibling-prefix", "root", "dotdot"],
)
def test_name_of_rejects_paths_outside_the_bucket(
    store: LocalStore, make_uri: Callable[[Path], str]
) -> None:
    with pytest.raises(ValueError):
        store.name_of(make_uri(store.root))


def test_object_names_cannot_escape_the_bucket(store: LocalStore) -> None:
    with pytest.raises(ValueError):
        store.ref("../outside.parquet")
    with pytest.raises(ValueError), store.publish("../outside.parquet"):
        pass
    assert not (store.root.parent / "outside.parquet").exists()


# -- DirectorySource ------------------------------------------------------------------------


def make_source(store: LocalStore, tmp_path: Path, *, settle: float = 1.0,
                stall: float = 30.0, metrics: BridgeMetrics | None = None) -> DirectorySource:
    return DirectorySource(
        store,
        ["raw/", "processed/"],
        tmp_path / "state" / "bridge-state.json",
        metrics or BridgeMetrics(),
        settle_seconds=settle,
        stall_seconds=stall,
    )


def names(refs: list) -> list[str]:
    return [r.name for r in refs]


def test_file_is_reported_only_once_stable(store: LocalStore, tmp_path: Path) -> None:
    metrics = BridgeMetrics()
    source = make_source(store, tmp_path, settle=1.0, metrics=metrics)
    write(store, RAW, parquet_bytes(tmp_path))
    ready = source.scan(now=100.0)  # a finished parquet file: reported at first sight
    assert names(ready) == [RAW]
    ref = ready[0]
    assert ref.generation == store.ref(RAW).generation
    assert ref.md5_hash  # base64 md5, as GCS reports it
    assert metrics.value("received") == 1
    # in flight: not reported again while unanswered
    assert source.scan(now=200.0) == []


def test_changing_file_restarts_the_settle_clock(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=1.0)
    path = write(store, "raw/notes.csv", b"a,b\n")
    assert source.scan(now=0.0) == []
    rewrite(path, b"a,b\n1,2\n")
    assert source.scan(now=0.5) == []  # changed: the clock restarts at 0.5
    assert source.scan(now=1.25) == []  # 1.0 after first sight, but only 0.75 quiet
    assert names(source.scan(now=1.5)) == ["raw/notes.csv"]


def test_slowly_written_parquet_is_never_reported_incomplete(
    store: LocalStore, tmp_path: Path
) -> None:
    source = make_source(store, tmp_path, settle=1.0, stall=30.0)
    data = parquet_bytes(tmp_path)
    half = len(data) // 2
    path = write(store, RAW, data[:half])
    assert has_parquet_footer(path) is False
    assert source.scan(now=0.0) == []
    assert source.scan(now=5.0) == []  # settled, but no footer: still being written
    assert source.scan(now=29.0) == []
    with path.open("ab") as handle:
        handle.write(data[half:])
        handle.flush()
        assert has_parquet_footer(path) is True
        # Footer there but still open for writing: the settle clock starts again.
        assert source.scan(now=29.5) == []
        assert source.scan(now=30.4) == []  # the old watch's stall limit does not count
    ready = source.scan(now=30.5)  # closed: finished
    assert names(ready) == [RAW]
    assert ready[0].size == len(data)


def test_parquet_without_footer_is_reported_after_the_stall_limit(
    store: LocalStore, tmp_path: Path
) -> None:
    source = make_source(store, tmp_path, settle=1.0, stall=10.0)
    data = parquet_bytes(tmp_path)
    write(store, RAW, data[: len(data) // 2])
    assert source.scan(now=0.0) == []
    for now in (1.0, 5.0, 9.99):
        assert source.scan(now=now) == [], now
    # given up on: announced so the transform quarantines it as truncated
    assert names(source.scan(now=10.0)) == [RAW]


def test_non_parquet_file_is_reported_after_settling(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=2.0, stall=30.0)
    write(store, "raw/yellow/2024/yellow_tripdata_2024-01.csv", b"VendorID\n1\n")
    write(store, "raw/yellow/2024/notes.parquet.txt", b"text")
    assert source.scan(now=0.0) == []
    assert source.scan(now=1.0) == []
    assert names(source.scan(now=2.0)) == [
        "raw/yellow/2024/notes.parquet.txt",
        "raw/yellow/2024/yellow_tripdata_2024-01.csv",
    ]


def test_hidden_and_partial_names_are_never_reported(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=0.5, stall=1.0)
    for name in ("raw/.x.tmp", "raw/x.part", "raw/.x.parquet", "raw/x.parquet.tmp",
                 "raw/y.crdownload"):
        write(store, name, parquet_bytes(tmp_path, rows=10))
    for now in (0.0, 1.0, 10.0, 1000.0):
        assert source.scan(now=now) == []


def test_only_watched_prefixes_are_reported(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=0.5)
    data = parquet_bytes(tmp_path, rows=10)
    write(store, "rejects/yellow/x.parquet", data)
    write(store, "quarantine/yellow/x.parquet", data)
    write(store, "processed/yellow/x.parquet", data)
    write(store, RAW, data)
    assert names(source.scan(now=0.0)) == [RAW, "processed/yellow/x.parquet"]


def test_ack_persists_across_restarts(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=0.5)
    write(store, RAW, parquet_bytes(tmp_path))
    (ref,) = source.scan(now=0.0)
    source.ack(ref)
    source.flush()
    assert (tmp_path / "state" / "bridge-state.json").exists()
    assert not (tmp_path / "state" / "bridge-state.tmp").exists()
    assert source.scan(now=2.0) == []
    assert source.scan(now=100.0) == []

    restarted = make_source(store, tmp_path, settle=0.5)
    assert restarted.done == {RAW: ref.generation}
    for now in (0.0, 1.0, 100.0):
        assert restarted.scan(now=now) == []


def test_rewritten_file_is_reported_again(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=0.5)
    data = parquet_bytes(tmp_path)
    path = write(store, RAW, data)
    (first,) = source.scan(now=0.0)
    source.ack(first)
    source.flush()
    rewrite(path, data)  # same bytes, new upload: a new generation
    restarted = make_source(store, tmp_path, settle=0.5)
    (second,) = restarted.scan(now=10.0)
    assert second.name == RAW
    assert second.generation != first.generation
    assert second.generation == store.ref(RAW).generation


def test_nack_makes_it_reportable_again(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=0.5)
    write(store, RAW, parquet_bytes(tmp_path))
    (ref,) = source.scan(now=0.0)
    assert source.scan(now=2.0) == []  # in flight
    source.nack(ref)
    (again,) = source.scan(now=3.0)  # seen again
    assert again.name == RAW
    assert again.generation == ref.generation
    # a nack is not persisted as done
    source.flush()
    assert make_source(store, tmp_path).done == {}


def test_unacked_in_flight_is_reported_again_after_restart(
    store: LocalStore, tmp_path: Path
) -> None:
    """Nothing lost: an event never confirmed is announced again by the next bridge."""
    source = make_source(store, tmp_path, settle=0.5)
    write(store, RAW, parquet_bytes(tmp_path))
    assert names(source.scan(now=0.0)) == [RAW]
    source.flush()
    restarted = make_source(store, tmp_path, settle=0.5)
    assert names(restarted.scan(now=0.0)) == [RAW]


def test_deleted_file_is_forgotten(store: LocalStore, tmp_path: Path) -> None:
    source = make_source(store, tmp_path, settle=0.5)
    path = write(store, RAW, parquet_bytes(tmp_path))
    (ref,) = source.scan(now=0.0)
    source.ack(ref)
    path.unlink()
    assert source.scan(now=2.0) == []
    assert source.done == {}
    source.flush()
    assert make_source(store, tmp_path).done == {}


def test_unreadable_state_file_starts_afresh(store: LocalStore, tmp_path: Path) -> None:
    state = tmp_path / "state" / "bridge-state.json"
    state.parent.mkdir(parents=True)
    state.write_text("{not json")
    source = make_source(store, tmp_path, settle=0.5)
    assert source.done == {}
    write(store, RAW, parquet_bytes(tmp_path, rows=10))
    assert names(source.scan(now=0.0)) == [RAW]
