"""`taxi-pipeline reemit` without a server: choosing objects, pacing, the summary, exit codes.

The bucket is a LocalStore in tmp; the events API is a fake delivery that
records what was sent and confirms what it is told to.
"""

from __future__ import annotations

import asyncio
import io
import os
import time
import uuid
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest
from prefect.events import Event, RelatedResource, Resource

from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.ops.reemit import (
    ORIGINAL_ROLE,
    RateLimiter,
    Report,
    copy_of,
    in_window,
    parse_when,
    reemit,
    select,
    send,
)
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.storage.local import LocalStore

DAY = 86_400


def _settings(tmp_path: Path) -> Settings:
    return Settings(profile="local", home=tmp_path / "home", bucket=str(tmp_path / "bucket"))


def _put(settings: Settings, name: str, days_ahead: float | None = None) -> None:
    """An object; `days_ahead` sets its time (local generation: max(mtime, ctime))."""
    path = settings.bucket_dir / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PAR1 not really PAR1")
    if days_ahead is not None:
        when = time.time() + days_ahead * DAY
        os.utime(path, (when, when))


@pytest.fixture
def bucket(tmp_path: Path) -> tuple[Settings, LocalStore]:
    settings = _settings(tmp_path)
    for month, ahead in (("01", 1), ("02", 2), ("03", 3)):
        _put(settings, f"raw/yellow/2024/yellow_tripdata_2024-{month}.parquet", ahead)
    _put(settings, "raw/green/2024/green_tripdata_2024-01.parquet")
    _put(settings, "processed/yellow/2024/yellow_tripdata_2024-01.parquet")
    _put(settings, "quarantine/yellow/2023/yellow_tripdata_2023-07.parquet")
    return settings, LocalStore(settings.bucket_dir)


def _names(refs: Iterable[ObjectRef]) -> list[str]:
    return [r.name for r in refs]


class FakeDelivery:
    """Records emits; confirms every event unless its id is in `lose`."""

    def __init__(self, stored: dict[uuid.UUID, Event] | None = None,
                 lose: set[uuid.UUID] | None = None, fail_emit: int = 0) -> None:
        self.sent: list[Event] = []
        self.stored = stored or {}
        self.lose = lose or set()
        self.fail_emit = fail_emit
        self.entered = 0

    async def __aenter__(self) -> FakeDelivery:
        self.entered += 1
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        return None

    async def emit(self, events: Iterable[Event]) -> None:
        if self.fail_emit:
            self.fail_emit -= 1
            raise ConnectionError("socket closed")
        self.sent += list(events)

    async def confirm(self, events: list[Event], timeout: float) -> set[uuid.UUID]:
        return {e.id for e in events if e.id not in self.lose}

    async def read(self, event_id: uuid.UUID, timeout: float = 0.0) -> Event | None:
        return self.stored.get(event_id)


# -- choosing objects ------------------------------------------------------------------


def test_a_prefix_chooses_every_object_under_it(bucket: tuple[Settings, LocalStore]) -> None:
    settings, store = bucket
    chosen = select(settings, store, ["raw/yellow/"])
    assert _names(chosen.refs) == [f"raw/yellow/2024/yellow_tripdata_2024-0{m}.parquet"
                                   for m in (1, 2, 3)]
    assert not chosen.skipped
    # no target: every raw object (never processed/, rejects/ or quarantine/)
    assert len(select(settings, store, []).refs) == 4
    # a folder without the slash, given as a path
    assert len(select(settings, store, [str(settings.bucket_dir / "raw/yellow") + "/"]).refs) == 3


def test_stage_chooses_that_stages_copy(bucket: tuple[Settings, LocalStore]) -> None:
    settings, store = bucket
    assert _names(select(settings, store, [], stage="processed").refs) == [
        "processed/yellow/2024/yellow_tripdata_2024-01.parquet"]
    by_name = select(settings, store, ["raw/yellow/2024/yellow_tripdata_2024-01.parquet",
                                       "raw/yellow/2024/yellow_tripdata_2024-02.parquet"],
                     stage="processed")
    assert _names(by_name.refs) == ["processed/yellow/2024/yellow_tripdata_2024-01.parquet"]
    assert len(by_name.skipped) == 1  # 2024-02 has no processed object
    assert _names(select(settings, store, ["raw/yellow/"], stage="processed").refs) == [
        "processed/yellow/2024/yellow_tripdata_2024-01.parquet"]


def test_names_uris_file_names_and_what_names_nothing(
        bucket: tuple[Settings, LocalStore]) -> None:
    settings, store = bucket
    ref = store.ref("raw/green/2024/green_tripdata_2024-01.parquet")
    for target in (ref.name, ref.uri, str(settings.bucket_dir / ref.name), ref.basename):
        chosen = select(settings, store, [target])
        assert _names(chosen.refs) == [ref.name], target
        assert not chosen.skipped
    chosen = select(settings, store, [ref.name, "raw/green/2024/green_tripdata_2030-01.parquet",
                                      "nothing-here/", "quarantine/yellow/",
                                      "quarantine/yellow/2023/yellow_tripdata_2023-07.parquet"])
    assert _names(chosen.refs) == [ref.name]
    assert [target for target, _ in chosen.skipped] == [
        "raw/green/2024/green_tripdata_2030-01.parquet", "nothing-here/", "quarantine/yellow/",
        "quarantine/yellow/2023/yellow_tripdata_2023-07.parquet"]
    # the same object twice is sent once
    assert len(select(settings, store, [ref.name, ref.uri]).refs) == 1


def test_since_and_until_choose_by_object_time(bucket: tuple[Settings, LocalStore]) -> None:
    settings, store = bucket
    now = datetime.now(UTC)
    chosen = select(settings, store, ["raw/yellow/"], since=now + timedelta(days=1.5),
                    until=now + timedelta(days=2.5))
    assert _names(chosen.refs) == ["raw/yellow/2024/yellow_tripdata_2024-02.parquet"]
    assert not chosen.skipped  # outside the window is not "skipped"
    assert len(select(settings, store, ["raw/yellow/"],
                      since=now + timedelta(days=2.5)).refs) == 1


def test_parse_when_and_the_window() -> None:
    assert parse_when("2024-03-01") == datetime(2024, 3, 1, tzinfo=UTC)
    assert parse_when("2024-03-01T12:00:00Z") == datetime(2024, 3, 1, 12, tzinfo=UTC)
    assert parse_when("2024-03-01T14:00+02:00") == datetime(2024, 3, 1, 12, tzinfo=UTC)
    with pytest.raises(ValueError, match="ISO"):
        parse_when("last tuesday")
    ref = ObjectRef("b", "raw/x", 1, created=datetime(2024, 3, 1, tzinfo=UTC))
    assert in_window(ref, datetime(2024, 3, 1, tzinfo=UTC), None)
    assert not in_window(ref, None, datetime(2024, 3, 1, tzinfo=UTC))  # until is exclusive
    assert not in_window(ObjectRef("b", "raw/x", 1), datetime(2024, 1, 1, tzinfo=UTC), None)


# -- pacing -------------------------------------------------------------------------------


def test_rate_limiter_books_one_slot_per_interval() -> None:
    now = [100.0]
    limiter = RateLimiter(4, clock=lambda: now[0])
    assert [limiter.delay() for _ in range(4)] == [0.0, 0.25, 0.5, 0.75]
    now[0] += 10  # idle for a while: no burst credit beyond the next slot
    assert limiter.delay() == 0.0
    assert limiter.delay() == 0.25
    assert RateLimiter(None).delay() == 0.0
    with pytest.raises(ValueError):
        RateLimiter(0)


def test_send_waits_between_events_with_an_injected_clock() -> None:
    now = [0.0]
    slept: list[float] = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
        now[0] += seconds

    report = Report(events=[_finalized(f"raw/yellow/x{i}.parquet") for i in range(5)])
    limiter = RateLimiter(2, clock=lambda: now[0], sleep=sleep)
    asyncio.run(send(FakeDelivery(), report, limiter=limiter))
    assert slept == [0.5] * 4
    assert now[0] == 2.0
    assert len(report.confirmed) == 5 and report.exit_code == 0


# -- summary and exit codes ---------------------------------------------------------------


def _finalized(name: str) -> Event:
    ref = ObjectRef("b", name, 7, scheme="gs")
    return events.object_finalized(ref, {"raw": "raw/", "processed": "processed/"},
                                   reemit=True)


def test_summary_and_exit_codes() -> None:
    ok = Report(events=[_finalized("raw/a")])
    asyncio.run(send(FakeDelivery(), ok))
    assert ok.summary() == "re-emit: emitted 1, confirmed 1, skipped 0, errors 0"
    assert ok.exit_code == 0

    lost = Report(events=[_finalized("raw/a"), _finalized("raw/b")])
    asyncio.run(send(FakeDelivery(lose={lost.events[1].id}), lost))
    assert lost.exit_code == 1 and "not confirmed 1" in lost.summary()

    broken = Report(events=[_finalized("raw/a"), _finalized("raw/b")])
    delivery = FakeDelivery(fail_emit=1)
    asyncio.run(send(delivery, broken))
    assert len(broken.errors) == 1 and len(delivery.sent) == 1 and broken.exit_code == 1

    skipped = Report(events=[_finalized("raw/a")], skipped=[("bad", "no object")])
    asyncio.run(send(FakeDelivery(), skipped))
    assert skipped.exit_code == 1


def test_reemit_good_bad_exits_non_zero(bucket: tuple[Settings, LocalStore],
                                       capsys: pytest.CaptureFixture[str]) -> None:
    settings, _ = bucket
    delivery = FakeDelivery()
    code = asyncio.run(reemit(settings, ["raw/green/2024/green_tripdata_2024-01.parquet",
                                         "raw/green/2024/nope.parquet"],
                              delivery_factory=lambda: delivery))
    out, err = capsys.readouterr()
    assert code == 1
    assert len(delivery.sent) == 1
    assert "(stored)" in out and "skipping raw/green/2024/nope.parquet" in err
    assert "emitted 1, confirmed 1, skipped 1, errors 0" in out
    assert asyncio.run(reemit(settings, ["raw/green/"], delivery_factory=lambda: delivery)) == 0


def test_dry_run_sends_nothing(bucket: tuple[Settings, LocalStore],
                               capsys: pytest.CaptureFixture[str]) -> None:
    settings, _ = bucket

    def no_server() -> Any:
        raise AssertionError("a dry run of objects needs no server")

    code = asyncio.run(reemit(settings, ["raw/yellow/"], dry_run=True,
                              delivery_factory=no_server))
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("would re-emit file://") == 3
    assert "dry run: would re-emit 3, skipped 0; nothing was sent" in out

    original = _finalized("raw/a")
    delivery = FakeDelivery(stored={original.id: original})
    assert asyncio.run(reemit(settings, [], event_ids=[str(original.id)], dry_run=True,
                              delivery_factory=lambda: delivery)) == 0
    assert delivery.sent == [] and "would re-emit gs://b/raw/a" in capsys.readouterr().out


def test_event_id_sends_a_copy_related_to_the_original(
        bucket: tuple[Settings, LocalStore], capsys: pytest.CaptureFixture[str]) -> None:
    settings, _ = bucket
    original = _finalized("raw/a").model_copy(update={
        "related": [RelatedResource({"prefect.resource.id": "prefect.flow-run.1",
                                     "prefect.resource.role": "flow-run"})]})
    delivery = FakeDelivery(stored={original.id: original})
    missing = str(uuid.uuid4())
    code = asyncio.run(reemit(settings, [], event_ids=[str(original.id), missing, "x"],
                              delivery_factory=lambda: delivery))
    assert code == 1  # the missing id and the bad one are skipped
    [copy] = delivery.sent
    assert copy.id != original.id and copy.event == original.event
    assert copy.resource[events.LABEL_REEMIT] == "true"
    assert copy.payload == original.payload
    roles = {r.role: r.id for r in copy.related}
    assert roles[ORIGINAL_ROLE] == f"prefect.event.{original.id}"
    assert roles["flow-run"] == "prefect.flow-run.1"
    assert "skipped 2" in capsys.readouterr().out


def test_copy_of_a_plain_event() -> None:
    original = Event(event=events.LOAD_COMPLETED, resource=Resource({"prefect.resource.id": "x"}),
                     payload={"rows": 3})
    copy = copy_of(original)
    assert copy.id != original.id and copy.payload == {"rows": 3}
    assert [r.role for r in copy.related] == [ORIGINAL_ROLE]


def test_cli_dry_run_needs_no_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    from taxi_pipeline.cli import main

    monkeypatch.setenv("TAXI_BUCKET", str(tmp_path / "bucket"))
    get_settings.cache_clear()
    settings = get_settings()
    _put(settings, "raw/yellow/2024/yellow_tripdata_2024-01.parquet")
    assert main(["reemit", "--dry-run", "raw/yellow/", "--since", "2000-01-01"]) == 0
    assert "would re-emit 1" in capsys.readouterr().out
    assert main(["reemit", "--dry-run", "raw/green/"]) == 1
    for argv in (["--since", "soon", "raw/"], [], ["--rate", "0", "raw/"]):
        with pytest.raises(SystemExit):
            main(["reemit", *argv])


def test_progress_bar_on_a_terminal(bucket: tuple[Settings, LocalStore]) -> None:
    settings, _ = bucket

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    out = Terminal()
    delivery = FakeDelivery()
    assert asyncio.run(reemit(settings, ["raw/yellow/"], out=out,
                              delivery_factory=lambda: delivery)) == 0
    assert len(delivery.sent) == 3
    text = out.getvalue()
    assert text.count("(stored)") == 3 and "emitted 3, confirmed 3" in text
