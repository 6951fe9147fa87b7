"""End to end on the local profile: bad paths and a paused writer never stop the bridge.

A real Prefect server, worker, bridge and automations (LocalStack, as `up`
runs them). Into the bucket go a symlink, a directory named *.parquet, a file
deleted after the bridge noticed it and before it read it, and a writer that
writes half a parquet file, pauses 45 s holding it open (far past the stall
limit of this stack), then finishes. Each must end as documented: the bad
paths as `pipeline.notification.rejected` events (each logged once), the slow
file loaded whole and never quarantined, a good file dropped afterwards loaded,
and every process of the stack still running.

Every wait is for a positive signal (an event, a warehouse row count, a bridge
log line) with a deadline; the writer's 45 s pause is the only fixed sleep, and
the other cases run while it lasts.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from support.local_e2e import read_events, running_stack, wait_events, wait_loaded

from taxi_pipeline import events
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.storage.local import LocalStore
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse

pytestmark = pytest.mark.e2e

STALL_SECONDS = 5.0  # far below the writer's pause: only the open-for-writing check holds it
PAUSE_SECONDS = 45.0  # the pause issue 7 asks for
TIMEOUT = 240.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("faults-home")
    settings = Settings(profile="local", home=home, bucket=str(home / "bucket"),
                        stall_seconds=STALL_SECONDS)
    with running_stack(settings) as running:
        yield running


@dataclass
class SlowWriter:
    """Writes half a valid parquet file, pauses holding it open, then writes the rest."""

    path: Path
    data: bytes
    expected_rows: int
    paused: threading.Event = field(default_factory=threading.Event)
    finished: threading.Event = field(default_factory=threading.Event)
    cancel: threading.Event = field(default_factory=threading.Event)
    errors: list[BaseException] = field(default_factory=list)
    thread: threading.Thread | None = None

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, name="slow-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            half = len(self.data) // 2
            with self.path.open("wb") as handle:  # held open, for writing, the whole time
                handle.write(self.data[:half])
                handle.flush()
                self.paused.set()
                if self.cancel.wait(PAUSE_SECONDS):  # the pause (cut short at teardown)
                    return
                handle.write(self.data[half:])
            self.finished.set()
        except BaseException as exc:  # reported by the test that waits for it
            self.errors.append(exc)

    def join(self, timeout: float) -> None:
        assert self.thread is not None
        self.thread.join(timeout)
        assert not self.errors, self.errors
        assert self.finished.is_set(), "the slow writer did not finish"


@pytest.fixture(scope="module")
def slow_writer(stack: LocalStack, tmp_path_factory: pytest.TempPathFactory
                ) -> Iterator[SlowWriter]:
    settings = stack.settings
    sample = generate_month("yellow", 2019, 5, 20_000, era="2019", seed=21)
    source = write_month(sample, tmp_path_factory.mktemp("slow") / "m.parquet")
    name = raw_object_name(settings.raw_prefix, "yellow", 2019, 5)
    writer = SlowWriter(settings.bucket_dir / name, source.read_bytes(), sample.expected_good)
    writer.start()
    assert writer.paused.wait(30)
    yield writer
    writer.cancel.set()
    if writer.thread is not None:
        writer.thread.join(10)


# -- helpers ---------------------------------------------------------------------------------


def wait_rejected(uri: str, why: str) -> Any:
    (event,) = wait_events([events.NOTIFICATION_REJECTED], uri, timeout=TIMEOUT)
    assert event.payload["why"] == why, event.payload
    assert event.payload["detail"]
    return event


def bridge_log(stack: LocalStack) -> str:
    return stack.process("bridge").log_path.read_text(errors="replace")


def wait_log(stack: LocalStack, *needles: str, timeout: float) -> str:
    """The first bridge log line holding every needle, waited for."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in bridge_log(stack).splitlines():
            if all(needle in line for needle in needles):
                return line
        time.sleep(0.25)
    raise AssertionError(f"the bridge never logged {needles} within {timeout:.0f}s")


def assert_stack_up(stack: LocalStack) -> None:
    dead = [p.name for p in stack.processes if not p.alive()]
    assert not dead, f"stopped: {dead}; bridge log tail:\n{bridge_log(stack)[-3000:]}"


def bad_name(settings: Settings, month: int) -> str:
    return raw_object_name(settings.raw_prefix, "yellow", 2019, month)


# -- the tests, in the order they run (the slow writer pauses meanwhile) ------------------------


def test_a_paused_writer_holding_its_file_is_not_announced(
    stack: LocalStack, slow_writer: SlowWriter
) -> None:
    """Past the stall limit the bridge checks /proc, finds this process writing, and waits."""
    uri = slow_writer.path.as_uri()
    line = wait_log(stack, "waiting", f"uri={uri} ", "open for writing",
                    timeout=PAUSE_SECONDS - 10)
    assert not slow_writer.finished.is_set()  # decided while the writer was still paused
    assert "without a parquet footer" in line
    assert_stack_up(stack)


def test_a_symlink_is_rejected(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    target = tmp_path / "elsewhere.parquet"
    sample = generate_month("yellow", 2019, 1, 2_000, era="2019", seed=22)
    write_month(sample, target)
    link = settings.bucket_dir / bad_name(settings, 1)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)  # before issue 7, this stopped the bridge and then the stack
    event = wait_rejected(link.as_uri(), "symlink")
    assert str(target) in event.payload["detail"]
    assert event.resource[events.LABEL_STAGE] == "raw"
    assert DuckDBWarehouse(settings.warehouse_file).loaded(settings.table, link.as_uri()) is None
    assert_stack_up(stack)


def test_a_directory_named_parquet_is_rejected(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    directory = settings.bucket_dir / bad_name(settings, 2)
    directory.mkdir(parents=True)
    sample = generate_month("yellow", 2019, 2, 2_000, era="2019", seed=23)
    write_month(sample, directory / "part-00000.parquet")  # a dataset, as Spark writes one
    wait_rejected(directory.as_uri(), "directory")
    part_uri = (directory / "part-00000.parquet").as_uri()
    assert DuckDBWarehouse(settings.warehouse_file).loaded(settings.table, part_uri) is None
    assert_stack_up(stack)


def test_a_file_deleted_between_notice_and_read_is_rejected(stack: LocalStack) -> None:
    settings = stack.settings
    path = settings.bucket_dir / bad_name(settings, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as handle:
        handle.write(b"PAR1 and the rest is on its way")
        handle.flush()
        # The bridge has listed it and is waiting for the writer: delete it now.
        wait_log(stack, "waiting", f"uri={path.as_uri()} ", timeout=60)
        path.unlink()
    event = wait_rejected(path.as_uri(), "vanished")
    assert event.resource[events.LABEL_GENERATION]
    assert_stack_up(stack)


def test_a_good_file_after_the_bad_ones_is_loaded_and_the_stack_is_up(
    stack: LocalStack, tmp_path: Path
) -> None:
    settings = stack.settings
    sample = generate_month("green", 2019, 6, 5_000, era="2019", seed=24)
    name = raw_object_name(settings.raw_prefix, "green", 2019, 6)
    target = settings.bucket_dir / name
    target.parent.mkdir(parents=True, exist_ok=True)
    write_month(sample, tmp_path / "good.parquet")
    target.write_bytes((tmp_path / "good.parquet").read_bytes())
    ref = LocalStore(settings.bucket_dir).ref(name)
    assert wait_loaded(settings, ref.uri, ref.generation) == sample.expected_good
    assert_stack_up(stack)
    # Each bad path was logged once, not on every 0.5 s poll.
    log = bridge_log(stack)
    for month in (1, 2, 3):
        uri = (settings.bucket_dir / bad_name(settings, month)).as_uri()
        assert log.count(f"rejected uri={uri} ") == 1, uri


def test_the_slow_file_is_loaded_whole_and_never_quarantined(
    stack: LocalStack, slow_writer: SlowWriter
) -> None:
    settings = stack.settings
    slow_writer.join(timeout=PAUSE_SECONDS + 30)
    store = LocalStore(settings.bucket_dir)
    name = store.name_of(slow_writer.path.as_uri())
    ref = store.ref(name)
    assert ref.size == len(slow_writer.data)
    assert wait_loaded(settings, ref.uri, ref.generation) == slow_writer.expected_rows
    assert DuckDBWarehouse(settings.warehouse_file).rows_for(settings.table, ref.uri) == \
        slow_writer.expected_rows
    # Announced once, for the finished generation; never quarantined (before issue 7 it
    # was announced after the stall limit and the writer finished into quarantine/).
    announced = read_events([events.OBJECT_FINALIZED], ref.uri)
    assert [e.resource[events.LABEL_GENERATION] for e in announced] == [str(ref.generation)]
    assert read_events([events.OBJECT_QUARANTINED, events.NOTIFICATION_REJECTED], ref.uri) == []
    quarantined = settings.bucket_dir / settings.quarantine_prefix / name.removeprefix(
        settings.raw_prefix)
    assert not quarantined.exists()
    assert_stack_up(stack)  # after every case above, all of the stack is still running
