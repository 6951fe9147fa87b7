"""GcsStore against a real fake-gcs-server, through the real google-cloud-storage client."""

from __future__ import annotations

import base64
import hashlib
import shutil
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import google_crc32c
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from google.cloud import storage
from support.emulators import emulators_available, fake_gcs_server

from flows.transform import transform_object
from taxi_pipeline.datasets.schema import CANONICAL_SCHEMA
from taxi_pipeline.events import EXTRA_SOURCE_GENERATION
from taxi_pipeline.gcp import clients as gcp_clients
from taxi_pipeline.lineage import METADATA_SOURCE_GENERATION
from taxi_pipeline.objects import ObjectRef, sibling_name
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, tlc_file_name, write_month
from taxi_pipeline.storage import ObjectNotFound, PreconditionFailed, store_from_settings
from taxi_pipeline.storage.gcs import READ_CHUNK_BYTES, GcsStore
from taxi_pipeline.transform.streaming import BadInputFile, transform_parquet

PROJECT = "taxi-test"
BUCKET = "taxi-gcs-store"


@pytest.fixture(scope="module")
def gcs_root(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    reason = emulators_available()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("fake-gcs")
    with pytest.MonkeyPatch.context() as mp, fake_gcs_server(root) as server:
        mp.setenv("STORAGE_EMULATOR_HOST", server.url)
        yield server.root


@pytest.fixture(scope="module")
def settings(gcs_root: Path) -> Settings:
    return Settings(profile="emulator", bucket=BUCKET, gcp_project=PROJECT)


@pytest.fixture(scope="module")
def store(settings: Settings) -> GcsStore:
    gcp_clients.storage_client(settings).create_bucket(BUCKET)
    built = store_from_settings(settings)
    assert isinstance(built, GcsStore)
    return built


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """A folder of its own per test: the bucket is shared by the module."""
    return f"t/{request.node.name.replace('[', '-').rstrip(']')}/"


def put(store: GcsStore, name: str, data: bytes, if_generation_match: int | None = None
        ) -> ObjectRef:
    with store.publish(name, if_generation_match=if_generation_match) as path:
        path.write_bytes(data)
    return store.ref(name)


def read(store: GcsStore, obj: ObjectRef) -> bytes:
    with store.open_read(obj) as handle:
        return handle.read()


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode()


# -- wiring -------------------------------------------------------------------------------


def test_store_from_settings_gives_a_gcs_store_for_the_bucket(store: GcsStore) -> None:
    assert (store.scheme, store.bucket) == ("gs", BUCKET)


@pytest.mark.parametrize("missing", ["bucket", "gcp_project"])
def test_store_from_settings_names_the_missing_setting(gcs_root: Path, missing: str) -> None:
    values = {"bucket": BUCKET, "gcp_project": PROJECT, missing: ""}
    with pytest.raises(RuntimeError, match=f"TAXI_{missing.upper()}"):
        store_from_settings(Settings(profile="emulator", **values))


# -- ref / list / name_of -----------------------------------------------------------------


def test_ref_reports_what_gcs_knows(store: GcsStore, prefix: str) -> None:
    data = b"PAR1 not really parquet"
    obj = put(store, prefix + "x.parquet", data)
    assert (obj.bucket, obj.name, obj.scheme) == (BUCKET, prefix + "x.parquet", "gs")
    assert obj.uri == f"gs://{BUCKET}/{prefix}x.parquet"
    assert obj.generation > 0
    assert obj.size == len(data)
    assert obj.md5_hash == b64(hashlib.md5(data).digest())
    assert obj.crc32c == b64(google_crc32c.Checksum(data).digest())
    assert obj.content_type == "application/vnd.apache.parquet"
    assert isinstance(obj.created, datetime) and obj.created.tzinfo is not None
    assert isinstance(obj.updated, datetime) and obj.updated >= obj.created
    assert store.ref(obj.name) == obj


def test_ref_of_a_missing_object_raises_object_not_found(store: GcsStore, prefix: str) -> None:
    with pytest.raises(ObjectNotFound, match="does not exist"):
        store.ref(prefix + "nothing.parquet")


def test_list_is_sorted_by_name_and_stays_under_the_prefix(store: GcsStore, prefix: str) -> None:
    names = ["b.parquet", "a/z.parquet", "a.parquet", "A.parquet", "c-d.parquet", "é.parquet"]
    for name in names:
        put(store, prefix + "in/" + name, name.encode())
    put(store, prefix + "inside-not.parquet", b"sibling prefix, not below in/")
    listed = list(store.list(prefix + "in/"))
    assert [o.name for o in listed] == sorted(prefix + "in/" + n for n in names)
    assert listed == [store.ref(o.name) for o in listed]
    assert list(store.list(prefix + "empty/")) == []


def test_name_of_accepts_only_this_bucket(store: GcsStore) -> None:
    assert store.name_of(f"gs://{BUCKET}/raw/yellow/x.parquet") == "raw/yellow/x.parquet"
    for uri in (
        "gs://other-bucket/raw/yellow/x.parquet",
        f"gs://{BUCKET}/",
        f"s3://{BUCKET}/raw/x.parquet",
        f"file:///tmp/{BUCKET}/raw/x.parquet",
        "raw/x.parquet",
    ):
        with pytest.raises(ValueError):
            store.name_of(uri)


def test_objects_of_another_bucket_are_refused(store: GcsStore, prefix: str) -> None:
    foreign = ObjectRef(bucket="other-bucket", name=prefix + "x", generation=1)
    with pytest.raises(ValueError), store.open_read(foreign):
        pass
    with pytest.raises(ValueError):
        store.move(foreign, prefix + "y")


# -- open_read ----------------------------------------------------------------------------


def test_open_read_streams_only_the_row_groups_asked_for(
    store: GcsStore, prefix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows, groups = 400_000, 8
    rng = np.random.default_rng(7)
    table = pa.table({"id": np.arange(rows * groups), "x": rng.random(rows * groups)})
    local = tmp_path / "big.parquet"
    pq.write_table(table, local, row_group_size=rows, compression="none")
    with store.publish(prefix + "big.parquet") as path:
        shutil.copyfile(local, path)
    obj = store.ref(prefix + "big.parquet")
    assert obj.size is not None and obj.size > 3 * READ_CHUNK_BYTES

    fetched: list[int] = []
    download = storage.Blob.download_as_bytes

    def counting(blob: storage.Blob, *args: Any, **kwargs: Any) -> bytes:
        data: bytes = download(blob, *args, **kwargs)
        fetched.append(len(data))
        return data

    monkeypatch.setattr(storage.Blob, "download_as_bytes", counting)
    with store.open_read(obj) as handle:
        assert handle.seekable()
        parquet = pq.ParquetFile(handle)
        assert parquet.metadata.num_row_groups == groups
        last = parquet.read_row_group(groups - 1)
    assert last.equals(table.slice((groups - 1) * rows, rows))
    # The footer plus one row group (~3.2 MB), each fetch at most one chunk: far from the file.
    assert sum(fetched) <= 2 * READ_CHUNK_BYTES < obj.size
    assert max(fetched) <= READ_CHUNK_BYTES + 1


def test_open_read_of_an_old_generation_raises_object_not_found(
    store: GcsStore, prefix: str
) -> None:
    old = put(store, prefix + "x.parquet", b"one")
    new = put(store, prefix + "x.parquet", b"two", if_generation_match=old.generation)
    with pytest.raises(ObjectNotFound, match=str(old.generation)), store.open_read(old):
        pass
    assert read(store, new) == b"two"


@pytest.mark.parametrize("replacement", ["shorter", "same-size"])
def test_a_generation_replaced_mid_stream_is_object_not_found(
    store: GcsStore, prefix: str, replacement: str
) -> None:
    data = bytes(range(256)) * (READ_CHUNK_BYTES // 256 + 4096)  # one chunk and a bit
    obj = put(store, prefix + "x.bin", data)
    with store.open_read(obj) as handle:
        assert handle.read(16) == data[:16]  # buffers the first chunk
        put(store, prefix + "x.bin", b"short" if replacement == "shorter" else b"Z" * len(data))
        handle.seek(READ_CHUNK_BYTES + 10)
        with pytest.raises(ObjectNotFound, match=f"generation {obj.generation} no longer exists"):
            handle.read(16)


def test_open_read_of_a_deleted_object_raises_object_not_found(
    store: GcsStore, prefix: str
) -> None:
    obj = put(store, prefix + "x.bin", b"data")
    store.client.bucket(BUCKET).delete_blob(obj.name)
    with pytest.raises(ObjectNotFound), store.open_read(obj):
        pass


# -- publish ------------------------------------------------------------------------------


def test_publish_if_absent_twice_raises_precondition_failed(store: GcsStore, prefix: str) -> None:
    temps: list[Path] = []
    with store.publish(prefix + "x.parquet", if_generation_match=0) as path:
        temps.append(path)
        path.write_bytes(b"first")
    first = store.ref(prefix + "x.parquet")
    with (
        pytest.raises(PreconditionFailed, match="exists"),
        store.publish(prefix + "x.parquet", if_generation_match=0) as path,
    ):
        temps.append(path)
        path.write_bytes(b"second")
    assert store.ref(prefix + "x.parquet") == first
    assert read(store, first) == b"first"
    assert not any(p.exists() for p in temps)


def test_publish_overwrite_makes_a_new_generation(store: GcsStore, prefix: str) -> None:
    first = put(store, prefix + "x.parquet", b"first")
    second = put(store, prefix + "x.parquet", b"second", if_generation_match=first.generation)
    assert second.generation > first.generation
    assert second.md5_hash != first.md5_hash
    with pytest.raises(PreconditionFailed):
        put(store, prefix + "x.parquet", b"third", if_generation_match=first.generation)
    third = put(store, prefix + "x.parquet", b"third")  # unconditional
    assert third.generation > second.generation
    assert read(store, third) == b"third"


def test_publish_uploads_nothing_when_the_block_fails(store: GcsStore, prefix: str) -> None:
    with pytest.raises(RuntimeError, match="boom"), store.publish(prefix + "x.parquet") as path:
        path.write_bytes(b"half written")
        raise RuntimeError("boom")
    assert not path.exists()
    with pytest.raises(ObjectNotFound):
        store.ref(prefix + "x.parquet")


def put_kept(store: GcsStore, name: str, data: bytes, **options: Any) -> ObjectRef:
    with store.publish(name, keep_unchanged=True, **options) as path:
        path.write_bytes(data)
    return store.ref(name)


def test_keep_unchanged_uploads_nothing_for_the_same_bytes(store: GcsStore, prefix: str) -> None:
    first = put(store, prefix + "x.parquet", b"same bytes")
    kept = put_kept(store, prefix + "x.parquet", b"same bytes")
    assert kept == first  # same generation, and no metadata change either
    assert (kept.updated, kept.extra) == (first.updated, first.extra)
    # without the flag the same bytes are a new generation (and a notification)
    again = put(store, prefix + "x.parquet", b"same bytes")
    assert again.generation > first.generation


@pytest.mark.parametrize("new", [b"other bytes, other size", b"same size, other b"])
def test_keep_unchanged_uploads_different_bytes(store: GcsStore, prefix: str, new: bytes) -> None:
    first = put(store, prefix + "x.parquet", b"same size, first b")
    second = put_kept(store, prefix + "x.parquet", new)
    assert second.generation > first.generation
    assert read(store, second) == new


def test_keep_unchanged_creates_an_absent_object(store: GcsStore, prefix: str) -> None:
    created = put_kept(store, prefix + "x.parquet", b"first")
    assert read(store, created) == b"first"


def test_keep_unchanged_still_checks_the_precondition(store: GcsStore, prefix: str) -> None:
    first = put(store, prefix + "x.parquet", b"same")
    with pytest.raises(PreconditionFailed):
        put_kept(store, prefix + "x.parquet", b"same", if_generation_match=0)
    with pytest.raises(PreconditionFailed):
        put_kept(store, prefix + "x.parquet", b"other", if_generation_match=0)
    assert put_kept(store, prefix + "x.parquet", b"same",
                    if_generation_match=first.generation) == first


def test_keep_unchanged_uploads_over_an_object_without_md5(
        store: GcsStore, prefix: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Composite objects have no md5 in GCS: they count as changed (compared by nothing)."""
    first = put(store, prefix + "x.parquet", b"same bytes")
    real_get_blob = store._bucket.get_blob

    def composite(*args: Any, **kwargs: Any) -> Any:
        blob = real_get_blob(*args, **kwargs)
        if blob is not None:
            blob.md5_hash = None
        return blob

    monkeypatch.setattr(store._bucket, "get_blob", composite)
    assert put_kept(store, prefix + "x.parquet", b"same bytes").generation > first.generation


# -- move ---------------------------------------------------------------------------------


def test_move_copies_that_generation_and_deletes_the_source(store: GcsStore, prefix: str) -> None:
    obj = put(store, prefix + "raw/x.parquet", b"bad file")
    moved = store.move(obj, prefix + "quarantine/x.parquet")
    assert moved == store.ref(prefix + "quarantine/x.parquet")
    assert (moved.size, moved.md5_hash, moved.crc32c) == (obj.size, obj.md5_hash, obj.crc32c)
    assert read(store, moved) == b"bad file"
    with pytest.raises(ObjectNotFound):
        store.ref(obj.name)


def test_move_of_a_replaced_generation_moves_nothing(store: GcsStore, prefix: str) -> None:
    old = put(store, prefix + "raw/x.parquet", b"old")
    new = put(store, prefix + "raw/x.parquet", b"new")
    with pytest.raises(PreconditionFailed, match=str(new.generation)):
        store.move(old, prefix + "quarantine/x.parquet")
    assert store.ref(new.name) == new
    with pytest.raises(ObjectNotFound):
        store.ref(prefix + "quarantine/x.parquet")


def test_move_of_a_deleted_object_raises_object_not_found(store: GcsStore, prefix: str) -> None:
    obj = put(store, prefix + "raw/x.parquet", b"gone soon")
    store.client.bucket(BUCKET).delete_blob(obj.name)
    with pytest.raises(ObjectNotFound):
        store.move(obj, prefix + "quarantine/x.parquet")


# -- the real transform through the bucket ------------------------------------------------


def test_transform_streams_a_month_from_and_to_the_bucket(
    store: GcsStore, settings: Settings, prefix: str, tmp_path: Path
) -> None:
    sample = generate_month("yellow", 2024, 1, 120_000, seed=3)
    local = write_month(sample, tmp_path / "month.parquet", row_group_rows=25_000)
    raw_name = f"{prefix}{settings.raw_prefix}yellow/2024/{tlc_file_name('yellow', 2024, 1)}"
    with store.publish(raw_name, if_generation_match=0) as path:
        shutil.copyfile(local, path)
    obj = store.ref(raw_name)
    # The transform flow's own task: read that generation, publish rejects then processed.
    flow_settings = settings.model_copy(update={
        "raw_prefix": prefix + settings.raw_prefix,
        "processed_prefix": prefix + settings.processed_prefix,
        "rejects_prefix": prefix + settings.rejects_prefix,
        "batch_rows": 30_000,
    })
    stats, processed, rejects = transform_object.fn(store, obj, flow_settings)
    assert processed.name == sibling_name(obj.name, flow_settings.raw_prefix,
                                          flow_settings.processed_prefix)
    assert rejects.name == sibling_name(obj.name, flow_settings.raw_prefix,
                                        flow_settings.rejects_prefix)
    assert stats.rows_in == 120_000
    assert stats.rows_out == sample.expected_good
    assert stats.rejected == sample.expected_rejects
    assert stats.batches > 1  # streamed, not read whole

    assert processed.generation >= rejects.generation  # processed lands last: it starts the load
    with store.open_read(processed) as handle:
        table = pq.read_table(handle)
    assert table.num_rows == sample.expected_good
    assert table.schema.remove_metadata().equals(CANONICAL_SCHEMA.remove_metadata())
    assert table.schema.metadata[METADATA_SOURCE_GENERATION] == str(obj.generation).encode()
    assert set(table.column("source_uri").unique().to_pylist()) == {obj.uri}
    with store.open_read(rejects) as handle:
        assert pq.read_metadata(handle).num_rows == sum(sample.expected_rejects.values())
    assert set(table.column("ingested_at").to_pylist()) == {obj.created}

    # The same generation again: same bytes, so both outputs keep their generation
    # (nothing uploaded, no notification, the load would answer already_loaded).
    again = transform_object.fn(store, obj, flow_settings)
    assert again[1:] == (processed, rejects)


def test_a_stale_transform_never_overwrites_a_newer_generations_outputs(
    store: GcsStore, settings: Settings, prefix: str, tmp_path: Path
) -> None:
    """Both outputs carry their source generation as custom metadata; a run for an
    older generation that reaches publish after a newer one's stops (OutputSuperseded)
    and the bucket keeps the newer files."""
    from flows.transform import OutputSuperseded, output_state

    flow_settings = settings.model_copy(update={
        "raw_prefix": prefix + settings.raw_prefix,
        "processed_prefix": prefix + settings.processed_prefix,
        "rejects_prefix": prefix + settings.rejects_prefix,
    })
    raw_name = f"{prefix}{settings.raw_prefix}yellow/2024/{tlc_file_name('yellow', 2024, 1)}"
    older = put(store, raw_name, write_month(generate_month("yellow", 2024, 1, 900, seed=4),
                                             tmp_path / "old.parquet").read_bytes())
    newer = put(store, raw_name, write_month(generate_month("yellow", 2024, 1, 700, seed=5),
                                             tmp_path / "new.parquet").read_bytes())
    _, processed, rejects = transform_object.fn(store, newer, flow_settings)
    for output in (processed, rejects):
        assert store.ref(output.name).extra[EXTRA_SOURCE_GENERATION] == str(newer.generation)
        with pytest.raises(OutputSuperseded):
            output_state(store, output.name, older)
        assert output_state(store, output.name, newer) == output.generation
    with pytest.raises(OutputSuperseded):
        transform_object.fn(store, older, flow_settings)
    assert (store.ref(processed.name), store.ref(rejects.name)) == (processed, rejects)


def test_a_non_parquet_object_is_refused_and_can_be_quarantined(
    store: GcsStore, settings: Settings, prefix: str
) -> None:
    obj = put(store, f"{prefix}{settings.raw_prefix}yellow/notes.parquet", b"not parquet at all")
    with (
        pytest.raises(BadInputFile) as error,
        store.open_read(obj) as source,
        store.publish(prefix + "processed/notes.parquet") as processed_path,
        store.publish(prefix + "rejects/notes.parquet") as rejects_path,
    ):
        transform_parquet(source, processed_path, rejects_path, source_uri=obj.uri,
                          source_generation=obj.generation, taxi_type="yellow", month=None)
    assert error.value.kind == "not_parquet"
    assert list(store.list(prefix + "processed/")) == []
    moved = store.move(obj, prefix + "quarantine/notes.parquet")
    assert read(store, moved) == b"not parquet at all"
