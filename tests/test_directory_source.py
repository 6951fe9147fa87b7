"""The directory source never dies on one bad path, and never announces a file still being written.

Each bad path (symlink, FIFO, unreadable or vanishing file, directory named
*.parquet, a name that is not UTF-8) is rejected once, as a
`pipeline.notification.rejected` event, while other files are still announced.
Runs against DirectorySource directly, and once through the bridge's loop
(pubsub_bridge.app) with a stand-in for the Prefect server.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import BinaryIO
from uuid import UUID

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefect.events import Event

from pubsub_bridge import app
from pubsub_bridge.directory_source import (
    VANISHED,
    DirectorySource,
    OpenForWriting,
    rejected_event,
)
from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage.base import ObjectNotFound
from taxi_pipeline.storage.local import (
    DIRECTORY,
    NOT_A_FILE,
    SYMLINK,
    UNMAPPABLE_NAME,
    UNREADABLE,
    LocalStore,
    NotAnObject,
    generation_of,
)

PREFIXES = {"raw": "raw/", "processed": "processed/"}
GOOD = "raw/yellow/2024/yellow_tripdata_2024-01.parquet"
BAD = "raw/yellow/2024/yellow_tripdata_2024-02.parquet"


@pytest.fixture
def store(tmp_path: Path) -> LocalStore:
    return LocalStore(tmp_path / "bucket")


@pytest.fixture
def parquet(tmp_path: Path) -> bytes:
    path = tmp_path / "src.parquet"
    pq.write_table(pa.table({"a": list(range(2_000)), "b": [f"v{i}" for i in range(2_000)]}),
                   path)
    return path.read_bytes()


def write(store: LocalStore, name: str, data: bytes) -> Path:
    path = store.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def make_source(store: LocalStore, tmp_path: Path, *, settle: float = 0.5, stall: float = 10.0,
                metrics: BridgeMetrics | None = None,
                writers: OpenForWriting | None = None) -> DirectorySource:
    return DirectorySource(store, list(PREFIXES.values()), tmp_path / "state" / "bridge.json",
                           metrics or BridgeMetrics(), settle_seconds=settle,
                           stall_seconds=stall, writers=writers)


def settle(source: DirectorySource, start: float = 0.0) -> list[str]:
    """Two scans, `settle` apart: what is announced once everything has held still."""
    first = source.scan(now=start)
    second = source.scan(now=start + source.settle)
    return [r.name for r in first + second]


def acked(source: DirectorySource) -> list[NotAnObject]:
    """Take the queued rejections and confirm them, as the relay does once stored."""
    taken = source.rejections()
    for rejection in taken:
        source.ack_rejection(rejection)
    return taken


def rejected_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("rejected ")]


def test_a_symlink_is_rejected_once_and_other_files_are_still_announced(
    store: LocalStore, tmp_path: Path, parquet: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pubsub_bridge")
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(parquet)
    link = store.root / BAD
    link.parent.mkdir(parents=True)
    link.symlink_to(outside)
    write(store, GOOD, parquet)
    metrics = BridgeMetrics()
    source = make_source(store, tmp_path, metrics=metrics)

    assert settle(source) == [GOOD]  # the bridge goes on; before, it raised ValueError here
    (rejection,) = acked(source)
    assert (rejection.name, rejection.why) == (BAD, SYMLINK)
    assert rejection.uri == link.as_uri()
    assert str(outside) in rejection.detail
    assert rejection.generation == generation_of(link.lstat())  # the link's own change time
    # reported once: later polls neither log nor queue it again
    for now in (1.0, 2.0, 100.0):
        assert source.scan(now=now) == []
        assert source.rejections() == []
    assert len(rejected_lines(caplog)) == 1
    assert link.as_uri() in rejected_lines(caplog)[0]
    assert metrics.value("rejected", why=SYMLINK) == 1
    # listings (reconcile, status) skip it instead of raising or following it
    assert [r.name for r in store.list("raw/")] == [GOOD]


@pytest.mark.parametrize("kind", ["inside", "dangling", "directory"])
def test_every_kind_of_symlink_is_rejected_never_followed(
    store: LocalStore, tmp_path: Path, parquet: bytes, kind: str
) -> None:
    target_dir = store.root / "raw" / "real"
    write(store, "raw/real/yellow_tripdata_2024-03.parquet", parquet)
    link = store.root / "raw" / "yellow" / ("linked" if kind == "directory" else "link.parquet")
    link.parent.mkdir(parents=True)
    target = {"inside": target_dir / "yellow_tripdata_2024-03.parquet",
              "dangling": tmp_path / "nowhere.parquet", "directory": tmp_path}[kind]
    link.symlink_to(target)
    source = make_source(store, tmp_path)
    assert settle(source) == ["raw/real/yellow_tripdata_2024-03.parquet"]
    (rejection,) = acked(source)
    assert rejection.why == SYMLINK
    assert rejection.name == link.relative_to(store.root).as_posix()


def test_a_symlinked_prefix_directory_is_rejected_and_lists_nothing(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    elsewhere = tmp_path / "elsewhere"
    (elsewhere / "yellow").mkdir(parents=True)
    (elsewhere / "yellow" / "yellow_tripdata_2024-01.parquet").write_bytes(parquet)
    (store.root / "raw").symlink_to(elsewhere)
    write(store, "processed/yellow/x.parquet", parquet)
    assert list(store.list("raw/")) == []
    source = make_source(store, tmp_path)
    assert settle(source) == ["processed/yellow/x.parquet"]
    (rejection,) = acked(source)
    assert (rejection.name, rejection.why) == ("raw", SYMLINK)


def test_ref_agrees_with_the_listing_on_what_is_an_object(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    """A re-emitted or reconciled name is resolved by ref(): links are not followed there either."""
    write(store, GOOD, parquet)
    (tmp_path / "outside.parquet").write_bytes(parquet)
    links = {"raw/in.parquet": store.root / GOOD, "raw/out.parquet": tmp_path / "outside.parquet"}
    for name, target in links.items():
        (store.root / name).symlink_to(target)
    (store.root / "raw" / "linked").symlink_to(store.root / "raw" / "yellow")
    (store.root / BAD).mkdir()
    for name in [*links, "raw/linked/2024/yellow_tripdata_2024-01.parquet", BAD]:
        with pytest.raises(ObjectNotFound):
            store.ref(name)
    assert store.ref(GOOD).size == len(parquet)
    with pytest.raises(ValueError):
        store.ref("raw/../../outside.parquet")


def test_a_directory_named_parquet_is_rejected_and_not_entered(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    write(store, BAD + "/part-0000.parquet", parquet)  # a dataset written by Spark or pyarrow
    write(store, GOOD, parquet)
    source = make_source(store, tmp_path)
    assert settle(source) == [GOOD]
    (rejection,) = acked(source)
    assert (rejection.name, rejection.why, rejection.generation) == (BAD, DIRECTORY, None)
    assert [r.name for r in store.list("")] == [GOOD]
    # files added inside later change nothing: its id does not depend on its mtime
    write(store, BAD + "/part-0001.parquet", parquet)
    assert source.scan(now=5.0) == []
    assert source.rejections() == []


@pytest.mark.timeout(30)
def test_a_fifo_is_rejected_without_ever_being_opened(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    fifo = store.root / "raw" / "yellow" / "pipe.parquet"
    fifo.parent.mkdir(parents=True)
    os.mkfifo(fifo)  # a plain open() for reading would block the bridge forever
    write(store, GOOD, parquet)
    source = make_source(store, tmp_path)
    assert settle(source) == [GOOD]
    (rejection,) = acked(source)
    assert rejection.why == NOT_A_FILE
    assert "FIFO" in rejection.detail


def test_an_unreadable_file_is_rejected_once_per_generation(
    store: LocalStore, tmp_path: Path, parquet: bytes, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Tests run as root (chmod 000 reads fine), so the read raises PermissionError instead."""
    caplog.set_level(logging.INFO, logger="pubsub_bridge")
    unreadable = "raw/yellow/2024/notes.csv"
    write(store, unreadable, b"a,b\n")
    write(store, GOOD, parquet)
    real_md5 = store.md5

    def md5(name: str) -> str:
        if name == unreadable:
            raise PermissionError(13, "Permission denied")
        return real_md5(name)

    monkeypatch.setattr(store, "md5", md5)
    source = make_source(store, tmp_path)
    assert settle(source) == [GOOD]
    (rejection,) = acked(source)
    assert (rejection.name, rejection.why) == (unreadable, UNREADABLE)
    assert rejection.generation == store.ref(unreadable).generation
    assert "Permission denied" in rejection.detail
    for now in (2.0, 3.0, 50.0):  # not read (or logged) again on every poll
        assert source.scan(now=now) == []
        assert source.rejections() == []
    assert len(rejected_lines(caplog)) == 1

    # made readable (chmod changes the ctime: a new generation): announced normally
    monkeypatch.setattr(store, "md5", real_md5)
    os.utime(store.root / unreadable)
    assert settle(source, start=60.0) == [unreadable]


def test_an_unreadable_parquet_file_is_rejected_at_the_footer_check(
    store: LocalStore, tmp_path: Path, parquet: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import pubsub_bridge.directory_source as directory_source

    write(store, BAD, parquet)

    def footer(path: Path, *, strict: bool = False) -> bool:
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(directory_source, "has_parquet_footer", footer)
    source = make_source(store, tmp_path)
    assert settle(source) == []
    (rejection,) = acked(source)
    assert (rejection.name, rejection.why) == (BAD, UNREADABLE)


def test_a_file_that_vanishes_between_listing_and_reading_is_rejected(
    store: LocalStore, tmp_path: Path, parquet: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = write(store, BAD, parquet)
    write(store, GOOD, parquet)
    generation = store.ref(BAD).generation
    real_md5 = store.md5

    def md5(name: str) -> str:
        if name == BAD:
            path.unlink()  # deleted after the listing, before the read
        return real_md5(name)

    monkeypatch.setattr(store, "md5", md5)
    source = make_source(store, tmp_path)
    assert settle(source) == [GOOD]
    (rejection,) = acked(source)
    assert (rejection.name, rejection.why, rejection.generation) == (BAD, VANISHED, generation)
    assert source.scan(now=5.0) == []
    assert source.rejections() == []
    assert source.watching == {}


def test_a_file_deleted_after_the_bridge_noticed_it_is_rejected_as_vanished(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    path = write(store, BAD, parquet[: len(parquet) // 2])  # noticed, waiting for its footer
    source = make_source(store, tmp_path, stall=30.0)
    assert source.scan(now=0.0) == []
    assert source.scan(now=1.0) == []
    generation = store.ref(BAD).generation
    path.unlink()
    assert source.scan(now=2.0) == []
    (rejection,) = acked(source)
    assert (rejection.why, rejection.generation) == (VANISHED, generation)
    assert source.scan(now=3.0) == []
    assert source.rejections() == []
    assert source.reported == {}  # forgotten once the path is gone for good


def test_a_name_that_is_not_utf8_is_rejected_and_its_event_serialises(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    raw_dir = store.root / "raw" / "yellow"
    raw_dir.mkdir(parents=True)
    with open(os.fsencode(raw_dir) + b"/trips-\xff.parquet", "wb") as handle:
        handle.write(parquet)
    write(store, GOOD, parquet)
    source = make_source(store, tmp_path)
    assert settle(source) == [GOOD]
    (rejection,) = acked(source)
    assert rejection.why == UNMAPPABLE_NAME
    assert rejection.uri.endswith("/raw/yellow/trips-%FF.parquet")
    event = rejected_event(rejection, store.bucket, PREFIXES)
    body = json.loads(event.model_dump_json())  # an object event of this name would not
    assert body["resource"][events.LABEL_OBJECT] == "raw/yellow/trips-\\xff.parquet"
    assert [r.name for r in store.list("")] == [GOOD]


def test_rejected_event_contract(store: LocalStore) -> None:
    rejection = NotAnObject(BAD, (store.root / BAD).as_uri(), SYMLINK, "a symbolic link", 123)
    event = rejected_event(rejection, store.bucket, PREFIXES)
    assert event.event == events.NOTIFICATION_REJECTED == "pipeline.notification.rejected"
    assert event.resource.id == (store.root / BAD).as_uri()
    assert event.resource[events.LABEL_STAGE] == "raw"
    assert event.resource[events.LABEL_DATASET] == "yellow"
    assert event.resource[events.LABEL_GENERATION] == "123"
    assert event.payload == {"why": SYMLINK, "detail": "a symbolic link"}
    # deterministic per (path, reason, generation): reported again, stored once
    assert rejected_event(rejection, store.bucket, PREFIXES).id == event.id
    assert event.id.version == 5
    newer = NotAnObject(BAD, rejection.uri, SYMLINK, "a symbolic link", 124)
    other = NotAnObject(BAD, rejection.uri, VANISHED, "gone", 123)
    assert len({event.id, rejected_event(newer, store.bucket, PREFIXES).id,
                rejected_event(other, store.bucket, PREFIXES).id}) == 3
    directory = NotAnObject(BAD, rejection.uri, DIRECTORY, "a directory")
    assert events.LABEL_GENERATION not in rejected_event(directory, store.bucket,
                                                         PREFIXES).resource


def test_reported_rejections_survive_a_restart(
    store: LocalStore, tmp_path: Path, parquet: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pubsub_bridge")
    (store.root / "raw").mkdir(parents=True)
    (store.root / "raw" / "link.parquet").symlink_to(tmp_path)
    source = make_source(store, tmp_path)
    settle(source)
    acked(source)
    source.flush()
    restarted = make_source(store, tmp_path)
    assert settle(restarted) == []
    assert restarted.rejections() == []
    assert len(rejected_lines(caplog)) == 1


def test_a_rejection_not_stored_is_offered_again_but_logged_once(
    store: LocalStore, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pubsub_bridge")
    (store.root / "raw").mkdir(parents=True)
    (store.root / "raw" / "link.parquet").symlink_to(tmp_path)
    source = make_source(store, tmp_path)
    source.scan(now=0.0)
    (first,) = source.rejections()
    source.nack_rejection(first)  # the server was unreachable
    source.scan(now=1.0)
    (again,) = source.rejections()
    assert again is first
    assert source.rejections() == []  # in flight: not offered twice
    source.ack_rejection(again)
    source.scan(now=2.0)
    assert source.rejections() == []
    assert len(rejected_lines(caplog)) == 1


# -- files still being written ----------------------------------------------------------------


def test_a_parquet_file_held_open_for_writing_is_never_announced_as_truncated(
    store: LocalStore, tmp_path: Path, parquet: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pubsub_bridge")
    source = make_source(store, tmp_path, settle=0.5, stall=2.0)
    path = store.root / BAD
    path.parent.mkdir(parents=True)
    half = len(parquet) // 2
    with path.open("wb") as writer:  # this process is the slow writer
        writer.write(parquet[:half])
        writer.flush()
        for now in (0.0, 1.0, 2.0, 5.0, 100.0, 1000.0):  # far past the stall limit
            assert source.scan(now=now) == [], now
        waiting = [r.getMessage() for r in caplog.records if "open for writing" in
                   r.getMessage()]
        assert len(waiting) == 1  # logged once, not on every poll
        assert path.as_uri() in waiting[0] and str(os.getpid()) in waiting[0]
        writer.write(parquet[half:])
    # Closed with its footer: finished, so announced at the next poll, no settle wait.
    (ref,) = source.scan(now=1000.1)
    assert ref.name == BAD
    assert ref.size == len(parquet)
    assert source.rejections() == []


def test_a_truncated_file_nobody_writes_is_announced_after_the_stall_limit(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    path = store.root / BAD
    path.parent.mkdir(parents=True)
    with path.open("wb") as writer:
        writer.write(parquet[: len(parquet) // 2])
        source = make_source(store, tmp_path, settle=0.5, stall=2.0)
        assert source.scan(now=0.0) == []
        assert source.scan(now=1.9) == []
        assert source.scan(now=3.0) == []  # past the limit, but still open for writing
    # closed: the writer gave up; it has been unchanged long enough, so it goes now
    assert [r.name for r in source.scan(now=3.5)] == [BAD]


def test_a_reader_does_not_hold_a_file_back(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    path = write(store, BAD, parquet[: len(parquet) // 2])
    source = make_source(store, tmp_path, settle=0.5, stall=2.0)
    with path.open("rb"):
        assert source.scan(now=0.0) == []
        assert [r.name for r in source.scan(now=2.0)] == [BAD]


def test_any_file_held_open_for_writing_waits_past_its_settle_time(
    store: LocalStore, tmp_path: Path
) -> None:
    path = store.root / "raw" / "notes.csv"
    path.parent.mkdir(parents=True)
    source = make_source(store, tmp_path, settle=0.5)
    with path.open("w") as writer:
        writer.write("a,b\n")
        writer.flush()
        for now in (0.0, 1.0, 60.0):
            assert source.scan(now=now) == []
    assert [r.name for r in source.scan(now=61.0)] == ["raw/notes.csv"]


def test_one_proc_snapshot_per_poll_and_only_when_needed(
    store: LocalStore, tmp_path: Path, parquet: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    writers = OpenForWriting(store.root)
    calls: list[int] = []
    real = writers.snapshot

    def snapshot() -> dict[str, set[int]] | None:
        calls.append(1)
        return real()

    monkeypatch.setattr(writers, "snapshot", snapshot)
    source = make_source(store, tmp_path, settle=0.5, stall=2.0, writers=writers)
    write(store, GOOD, parquet)  # complete: one /proc read says nobody writes it
    for n in range(3):
        write(store, f"raw/yellow/2024/cut-{n}.parquet", parquet[:100])
    assert [r.name for r in source.scan(now=0.0)] == [GOOD]
    assert calls == [1]
    assert source.scan(now=1.0) == []
    assert calls == [1]  # files without a footer ask /proc only at the stall limit
    assert len(source.scan(now=3.0)) == 3
    assert calls == [1, 1]  # three candidates, one /proc read


def test_without_proc_the_stall_timer_decides(
    store: LocalStore, tmp_path: Path, parquet: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pubsub_bridge")
    writers = OpenForWriting(store.root, proc=tmp_path / "no-proc")
    source = make_source(store, tmp_path, settle=0.5, stall=2.0, writers=writers)
    path = store.root / BAD
    path.parent.mkdir(parents=True)
    with path.open("wb") as writer:
        writer.write(parquet[:100])
        writer.flush()
        assert source.scan(now=0.0) == []
        assert source.scan(now=1.0) == []
        # the writer is invisible: the documented fallback announces it at the limit
        assert [r.name for r in source.scan(now=2.0)] == [BAD]
    assert any("no-proc" in r.getMessage() for r in caplog.records)


def fake_proc(root: Path, target: Path, flags: str) -> Path:
    proc = root / "proc"
    (proc / "4242" / "fd").mkdir(parents=True)
    (proc / "4242" / "fdinfo").mkdir()
    (proc / "4242" / "fd" / "7").symlink_to(target)
    (proc / "4242" / "fdinfo" / "7").write_text(f"pos:\t0\nflags:\t{flags}\nmnt_id:\t1\n")
    (proc / "self").symlink_to(proc / "4242")  # not a pid: ignored
    return proc


@pytest.mark.parametrize(("flags", "writing"),
                         [("0100001", True), ("02100002", True), ("0100000", False)],
                         ids=["O_WRONLY", "O_RDWR", "O_RDONLY"])
def test_open_for_writing_reads_the_access_mode(
    store: LocalStore, tmp_path: Path, flags: str, writing: bool
) -> None:
    path = write(store, BAD, b"x")
    writers = OpenForWriting(store.root, proc=fake_proc(tmp_path, path, flags))
    assert writers.snapshot() == ({str(path): {4242}} if writing else {})


# -- through the bridge loop ----------------------------------------------------------------


class FakeDelivery:
    """EventDelivery's part the bridge uses; every emitted event counts as stored."""

    instances: list[FakeDelivery] = []  # noqa: RUF012 - the test reads what the bridge used
    fail_from_start = False

    def __init__(self) -> None:
        self.emitted: list[Event] = []
        self.attempts = 0
        self.fail = FakeDelivery.fail_from_start
        FakeDelivery.instances.append(self)

    async def __aenter__(self) -> FakeDelivery:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        return None

    async def emit(self, batch: Iterable[Event]) -> None:
        self.attempts += 1
        if self.fail:
            raise ConnectionError("prefect server unreachable")
        self.emitted.extend(batch)

    async def stored(self, batch: list[Event]) -> set[UUID]:
        return {e.id for e in batch}

    async def healthcheck(self) -> None:
        return None


@pytest.fixture
def bridge_settings(tmp_path: Path) -> Settings:
    home = tmp_path / "home"
    return Settings(profile="local", home=home, bucket=str(home / "bucket"),
                    settle_seconds=0.2, stall_seconds=1.0, poll_seconds=0.05)


@contextlib.contextmanager
def running_bridge(settings: Settings, monkeypatch: pytest.MonkeyPatch, *, failing: bool = False
                   ) -> Iterator[tuple[FakeDelivery, asyncio.AbstractEventLoop, asyncio.Event]]:
    FakeDelivery.instances.clear()
    monkeypatch.setattr(FakeDelivery, "fail_from_start", failing)
    monkeypatch.setattr(app, "EventDelivery", FakeDelivery)
    loop = asyncio.new_event_loop()
    stop = asyncio.Event()
    task = loop.create_task(app.run_directory_bridge(settings, stop))
    loop.run_until_complete(asyncio.sleep(0.1))
    try:
        yield FakeDelivery.instances[0], loop, stop
    finally:
        stop.set()
        loop.run_until_complete(asyncio.wait_for(task, 30))
        loop.close()


def run_until(loop: asyncio.AbstractEventLoop, done: Callable[[], bool],
              timeout: float = 20.0) -> None:
    """Let the bridge run until `done()` holds (a positive signal), or fail at the deadline."""

    async def wait() -> None:
        for _ in range(int(timeout / 0.05)):
            if done():
                return
            await asyncio.sleep(0.05)
        raise AssertionError("condition not met in time")

    loop.run_until_complete(wait())


def test_the_bridge_loop_reports_bad_paths_and_keeps_announcing(
    bridge_settings: Settings, tmp_path: Path, parquet: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(bridge_settings.bucket_dir)
    (store.root / "raw" / "yellow").mkdir(parents=True)
    (store.root / "raw" / "yellow" / "link.parquet").symlink_to(tmp_path / "src.parquet")
    (store.root / BAD).mkdir(parents=True)  # a directory named *.parquet
    with running_bridge(bridge_settings, monkeypatch) as (delivery, loop, _):

        def names(kind: str) -> list[str]:
            return sorted(e.resource[events.LABEL_OBJECT] for e in delivery.emitted
                          if e.event == kind)

        run_until(loop, lambda: len(names(events.NOTIFICATION_REJECTED)) == 2)
        write(store, GOOD, parquet)  # dropped after the bad ones
        run_until(loop, lambda: names(events.OBJECT_FINALIZED) == [GOOD])
        assert names(events.NOTIFICATION_REJECTED) == [BAD, "raw/yellow/link.parquet"]
        whys = {e.resource[events.LABEL_OBJECT]: e.payload["why"] for e in delivery.emitted
                if e.event == events.NOTIFICATION_REJECTED}
        assert whys == {BAD: DIRECTORY, "raw/yellow/link.parquet": SYMLINK}
    state = json.loads((bridge_settings.home / "bridge-state.json").read_text())
    assert set(state["rejected"]) == {BAD, "raw/yellow/link.parquet"}
    assert state["confirmed"] == {GOOD: store.ref(GOOD).generation}


def test_the_bridge_loop_retries_a_rejection_the_server_did_not_take(
    bridge_settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = LocalStore(bridge_settings.bucket_dir)
    (store.root / "raw").mkdir(parents=True)
    (store.root / "raw" / "link.parquet").symlink_to(tmp_path)
    scans: list[int] = []
    real_scan = DirectorySource.scan

    def counted_scan(self: DirectorySource, now: float | None = None) -> list[ObjectRef]:
        scans.append(1)
        return real_scan(self, now)

    monkeypatch.setattr(DirectorySource, "scan", counted_scan)
    with running_bridge(bridge_settings, monkeypatch, failing=True) as (delivery, loop, _):
        run_until(loop, lambda: delivery.attempts >= 3)  # nacked, offered again each poll
        assert delivery.emitted == []
        delivery.fail = False
        run_until(loop, lambda: len(delivery.emitted) == 1)
        polls = len(scans)
        run_until(loop, lambda: len(scans) >= polls + 10)
        assert len(delivery.emitted) == 1  # stored once, then remembered
        assert delivery.emitted[0].payload["why"] == SYMLINK


def test_a_processed_object_is_announced_with_the_lineage_in_its_footer(
        store: LocalStore, tmp_path: Path) -> None:
    from taxi_pipeline.lineage import lineage_metadata
    table = pa.table({"a": [1, 2]})
    source_uri = (store.root / GOOD).as_uri()
    with_lineage = tmp_path / "p.parquet"
    pq.write_table(table.replace_schema_metadata(lineage_metadata(source_uri, 41)), with_lineage)
    without = tmp_path / "n.parquet"
    pq.write_table(table, without)
    processed = "processed/yellow/2024/yellow_tripdata_2024-01.parquet"
    bare = "processed/yellow/2024/yellow_tripdata_2024-02.parquet"
    write(store, processed, with_lineage.read_bytes())
    write(store, bare, without.read_bytes())
    write(store, GOOD, with_lineage.read_bytes())  # lineage outside processed/ is not read
    source = DirectorySource(store, list(PREFIXES.values()), tmp_path / "state" / "bridge.json",
                             BridgeMetrics(), settle_seconds=0.5, stall_seconds=10.0,
                             writers=OpenForWriting(store.root, proc="/nonexistent"),
                             lineage_prefixes=("processed/",))
    refs = {r.name: r for r in source.scan(now=0.0) + source.scan(now=0.5)}
    assert set(refs) == {processed, bare, GOOD}
    assert refs[processed].extra == {events.EXTRA_SOURCE_URI: source_uri,
                                     events.EXTRA_SOURCE_GENERATION: "41"}
    assert refs[bare].extra == {} and refs[GOOD].extra == {}
    (link,) = events.object_finalized(refs[processed], PREFIXES).related
    assert link.id == source_uri and link.role == "source"


def test_a_finished_parquet_file_is_announced_at_once_and_an_open_one_settles(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    """A footer and no writer: finished now. A writer still holding it: the settle wait."""
    source = make_source(store, tmp_path, settle=5.0, stall=60.0)
    done = store.root / GOOD
    done.parent.mkdir(parents=True, exist_ok=True)
    done.write_bytes(parquet)
    held = store.root / BAD
    held.parent.mkdir(parents=True, exist_ok=True)
    with held.open("wb") as writer:
        writer.write(parquet)
        writer.flush()
        assert [r.name for r in source.scan(now=0.0)] == [GOOD]
        assert source.scan(now=4.9) == []
        assert [r.name for r in source.scan(now=5.0)] == [BAD]


@dataclasses.dataclass
class HalfWritten:
    """A copy of BAD written half-way and held open; `finish` writes the rest and closes."""

    handle: BinaryIO
    rest: bytes

    def finish(self) -> None:
        if not self.handle.closed:
            self.handle.write(self.rest)
            self.handle.close()


def half_written(store: LocalStore, data: bytes) -> HalfWritten:
    path = store.root / BAD
    path.parent.mkdir(parents=True, exist_ok=True)
    half = len(data) // 2
    handle = path.open("wb")
    handle.write(data[:half])
    handle.flush()
    return HalfWritten(handle, data[half:])


class FinishesAfterListing(LocalStore):
    """A store whose listing is taken, then `finish` runs, then the listing is returned:
    a copy that completes between the bridge's stat and its footer check."""

    finish: Callable[[], None] | None = None

    def entries(self, prefix: str) -> Iterator[ObjectRef | NotAnObject]:
        listed = list(super().entries(prefix))
        if self.finish is not None and listed:
            self.finish()
            self.finish = None
        yield from listed


def test_a_copy_finishing_after_the_listing_is_announced_once_as_its_final_generation(
    tmp_path: Path, parquet: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pubsub_bridge")
    store = FinishesAfterListing(tmp_path / "bucket")
    source = make_source(store, tmp_path, settle=0.5, stall=2.0)
    copy = half_written(store, parquet)
    stale = store.ref(BAD)
    store.finish = copy.finish
    # Listed half-written; checked finished (footer, no writer): not the listed generation.
    assert source.scan(now=0.0) == []
    assert any(f"generation={stale.generation} ->" in r.getMessage() for r in caplog.records)
    (ref,) = source.scan(now=0.1)
    final = store.ref(BAD)
    assert (ref.generation, ref.size) == (final.generation, len(parquet))
    assert ref.generation != stale.generation
    assert ref.md5_hash == store.md5(BAD)
    assert source.scan(now=10.0) == []


def test_a_writer_finishing_between_the_footer_check_and_proc_is_not_announced_truncated(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    """Seen in CI: past the stall limit, no footer yet; the writer then writes the rest
    and closes before /proc is read, so nobody holds it. Not a truncated file."""
    writers = OpenForWriting(store.root)
    real = writers.snapshot
    copy = half_written(store, parquet)
    finish_first: list[bool] = []

    def snapshot() -> dict[str, set[int]] | None:
        if finish_first:
            copy.finish()
        return real()

    writers.snapshot = snapshot  # type: ignore[method-assign]
    source = make_source(store, tmp_path, settle=0.5, stall=2.0, writers=writers)
    try:
        assert source.scan(now=0.0) == []
        assert source.scan(now=2.5) == []  # held open past the stall limit: waits
        finish_first.append(True)
        assert source.scan(now=3.0) == []  # listed half-written, finished meanwhile
        (ref,) = source.scan(now=3.1)
    finally:
        copy.handle.close()
    assert (ref.generation, ref.size) == (store.ref(BAD).generation, len(parquet))


def test_files_held_back_are_reported_for_status(
    store: LocalStore, tmp_path: Path, parquet: bytes
) -> None:
    """A file still being written (no footer yet, open for writing) is listed in the
    held report with when it was first seen; once announced it leaves the report."""
    from pubsub_bridge.directory_source import HELD_FILE

    source = make_source(store, tmp_path, settle=0.5, stall=2.0)
    path = write(store, GOOD, parquet[: len(parquet) // 2])
    with path.open("ab") as writer:  # a copy in progress
        assert source.scan(now=0.0) == []
        assert source.scan(now=5.0) == []  # past the stall limit, but a writer holds it
        source.report_held(wall=1_000.0)
        report = json.loads((tmp_path / "state" / HELD_FILE).read_text())
        assert report == {"written": 1_000.0, "held": {GOOD: 1_000.0}}
        writer.write(parquet[len(parquet) // 2:])
    assert [r.name for r in source.scan(now=6.0)] == [GOOD]
    source.report_held(wall=1_001.0)
    report = json.loads((tmp_path / "state" / HELD_FILE).read_text())
    assert report == {"written": 1_001.0, "held": {}}
