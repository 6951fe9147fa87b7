"""`taxi-pipeline status`: name/URI/path resolution and the board's stage classification.

No server: events are built in memory as the flows and the bridge build them.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import pytest
from prefect.events import Event, Resource

from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.ops import status_model, status_view
from taxi_pipeline.ops.status_model import (
    DUPLICATE,
    FAILED,
    LANDED,
    LOADED,
    PROCESSED,
    QUARANTINE,
    QUARANTINED,
    RAW,
    STALLED,
    TRANSFORMED,
    Family,
    LoadRecord,
    StatusError,
    Target,
    classify,
    parse_target,
)
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage.local import LocalStore

NAME = "raw/yellow/2024/yellow_tripdata_2024-01.parquet"
SPACED = "raw/yellow/2024/my trips é.parquet"
NOW = datetime(2026, 1, 10, 12, 0, tzinfo=UTC)
QUIET = timedelta(minutes=3)


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(profile="local", home=tmp_path / "home")


@pytest.fixture
def store(settings: Settings) -> LocalStore:
    return LocalStore(settings.bucket_dir)


def put(store: LocalStore, name: str, content: bytes = b"PAR1") -> Path:
    path = store.root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content)
    return path


# -- resolution ---------------------------------------------------------------------


@pytest.mark.parametrize("stage", ["raw", "processed", "rejects", "quarantine"])
def test_a_name_of_any_stage_is_the_same_family(stage: str, settings: Settings,
                                                store: LocalStore) -> None:
    name = NAME.replace("raw/", f"{stage}/", 1)
    assert parse_target(name, settings, store) == Target(names=(name,))
    family = Family.of(name, settings, store)
    assert family.name == NAME
    assert family.key == "yellow/2024/yellow_tripdata_2024-01.parquet"
    assert family.uris[RAW] == (store.root / NAME).as_uri()
    assert family.uris[PROCESSED] == (store.root / "processed" / family.key).as_uri()
    assert family.role_of((store.root / name).as_uri()) == stage


def test_a_bare_file_name_or_the_end_of_a_name_is_searched_for(settings: Settings,
                                                              store: LocalStore) -> None:
    assert parse_target("yellow_tripdata_2024-01.parquet", settings, store) == \
        Target(search="yellow_tripdata_2024-01.parquet")
    assert parse_target("yellow/2024/yellow_tripdata_2024-01.parquet", settings, store) == \
        Target(search="yellow/2024/yellow_tripdata_2024-01.parquet")


def test_an_absolute_path_inside_the_bucket_is_its_name(settings: Settings, store: LocalStore,
                                                        tmp_path: Path) -> None:
    path = put(store, NAME)
    assert parse_target(str(path), settings, store) == Target(names=(NAME,))
    # A moved or deleted object's path still names it (its events are stored).
    path.unlink()
    assert parse_target(str(path), settings, store) == Target(names=(NAME,))
    # Through a symbolic link to the bucket directory.
    link = tmp_path / "link-to-bucket"
    link.symlink_to(store.root)
    assert parse_target(str(link / NAME), settings, store) == Target(names=(NAME,))
    # The bucket directory itself, or a folder in it, is a board.
    assert parse_target(str(store.root), settings, store) == Target(prefix="")
    assert parse_target(str(store.root / "raw") + "/", settings, store) == Target(prefix="raw/")


def test_a_path_outside_the_bucket_is_refused_clearly(settings: Settings,
                                                      store: LocalStore) -> None:
    for outside in ("/etc/passwd", str(store.root.parent / "elsewhere.parquet"),
                    (store.root.parent / "x.parquet").as_uri()):
        with pytest.raises(StatusError, match="outside the bucket directory"):
            parse_target(outside, settings, store)
    with pytest.raises(StatusError, match="file:// URI"):
        parse_target("gs://other/raw/x.parquet", settings, store)
    with pytest.raises(StatusError, match=r"'\.\.'"):
        parse_target("raw/../../etc/passwd", settings, store)


def test_names_with_spaces_and_unicode_match_the_percent_encoded_uris_of_events(
        settings: Settings, store: LocalStore) -> None:
    path = put(store, SPACED)
    uri = store.ref(SPACED).uri  # what the bridge and the flows name it by
    assert "%20" in uri and "%C3%A9" in uri
    assert path.as_uri() == uri
    # Unencoded name, encoded name, encoded URI: one family, whose URI is the event's.
    encoded = "raw/yellow/2024/my%20trips%20%C3%A9.parquet"
    assert parse_target(SPACED, settings, store) == Target(names=(SPACED,))
    assert parse_target(encoded, settings, store) == Target(names=(encoded, SPACED))
    assert parse_target(uri, settings, store) == Target(names=(SPACED,))
    assert parse_target(str(path), settings, store) == Target(names=(SPACED,))
    family = Family.of(SPACED, settings, store)
    assert family.uris[RAW] == uri
    assert family.uris[PROCESSED] == uri.replace("/raw/", "/processed/")


def test_prefixes_are_boards(settings: Settings, store: LocalStore) -> None:
    assert parse_target(None, settings, store) == Target(prefix="")
    assert parse_target("", settings, store) == Target(prefix="")
    assert parse_target("raw/", settings, store) == Target(prefix="raw/")
    assert parse_target("raw", settings, store) == Target(prefix="raw/")
    assert parse_target("processed/yellow/", settings, store) == \
        Target(prefix="processed/yellow/")


def test_an_absolute_path_in_a_gcs_profile_says_what_to_give_instead(
        settings: Settings) -> None:
    class Gcs:
        scheme, bucket = "gs", "my-bucket"

        def name_of(self, uri: str) -> str:
            raise ValueError(f"{uri!r} is not an object of gs://my-bucket/")

    with pytest.raises(StatusError, match="gs://my-bucket/"):
        parse_target("/home/me/x.parquet", settings, Gcs())  # type: ignore[arg-type]


# -- classification -----------------------------------------------------------------


def event(name: str, uri: str, generation: int | None, at: datetime,
          **payload: Any) -> Event:
    labels = {"prefect.resource.id": uri}
    if generation is not None:
        labels[events.LABEL_GENERATION] = str(generation)
    return Event(event=name, resource=Resource(labels), occurred=at, payload=payload,
                 id=uuid.uuid4())


def ref(family: Family, role: str, generation: int, at: datetime) -> ObjectRef:
    return ObjectRef(bucket="/b", name=family.names[role], generation=generation,
                     scheme="file", created=at, updated=at)


@pytest.fixture
def family(settings: Settings, store: LocalStore) -> Family:
    return Family.of(NAME, settings, store)


def chain(family: Family, generation: int, landed: datetime, rows: int) -> list[Event]:
    raw, processed = family.uris[RAW], family.uris[PROCESSED]
    second = timedelta(seconds=1)
    return [
        event(events.OBJECT_FINALIZED, raw, generation, landed + second),
        event(events.TRANSFORM_STARTED, raw, generation, landed + 2 * second),
        event(events.TRANSFORM_COMPLETED, raw, generation, landed + 3 * second,
              rows_in=rows + 10, rows_out=rows, rows_rejected=10),
        event(events.OBJECT_FINALIZED, processed, 99, landed + 4 * second),
        event(events.LOAD_STARTED, processed, 99, landed + 5 * second),
        event(events.LOAD_COMPLETED, processed, 99, landed + 6 * second,
              status="loaded", rows=rows),
    ]


def test_a_loaded_object_has_its_rows_and_time_to_load(family: Family,
                                                       settings: Settings,
                                                       store: LocalStore) -> None:
    landed = NOW - timedelta(hours=1)
    found = chain(family, 7, landed, 55_852)
    load = LoadRecord(family.uris[RAW], 7, family.uris[PROCESSED], 55_852,
                      landed + timedelta(seconds=6.5))
    refs = {RAW: ref(family, RAW, 7, landed), PROCESSED: ref(family, PROCESSED, 99, landed)}
    row = classify(family, refs, found, load, now=NOW, older_than=QUIET)
    assert (row.stage, row.rows, row.generation) == (LOADED, 55_852, 7)
    assert row.seconds_to_load == pytest.approx(6.5)
    # Asked about by its processed name: the same family, the same rows.
    processed = Family.of(family.names[PROCESSED], settings, store)
    assert classify(processed, refs, found, load, now=NOW, older_than=QUIET).rows == 55_852
    # Deleted from the bucket afterwards: still loaded, from events and the load log.
    gone = classify(family, {}, found, load, now=NOW, older_than=QUIET)
    assert (gone.stage, gone.rows, gone.generation) == (LOADED, 55_852, 7)
    assert gone.landed_at is not None
    assert json.loads(json.dumps(row.as_json()))["seconds_to_load"] == pytest.approx(6.5)


def test_a_quarantined_object_says_why(family: Family) -> None:
    landed = NOW - timedelta(hours=1)
    raw = family.uris[RAW]
    found = [event(events.OBJECT_FINALIZED, raw, 5, landed),
             event(events.TRANSFORM_STARTED, raw, 5, landed + timedelta(seconds=1)),
             event(events.OBJECT_QUARANTINED, raw, 5, landed + timedelta(seconds=2),
                   reason="not_parquet", detail="not a parquet file: magic bytes not found")]
    moved = {QUARANTINE: ref(family, QUARANTINE, 6, landed + timedelta(seconds=2))}
    row = classify(family, moved, found, None, now=NOW, older_than=QUIET)
    assert row.stage == QUARANTINED
    assert row.reason is not None and row.reason.startswith("not_parquet: not a parquet file")
    # Its events aged out of the server: the quarantined copy alone still says so.
    row = classify(family, moved, [], None, now=NOW, older_than=QUIET)
    assert row.stage == QUARANTINED and "quarantine/" in (row.reason or "")


def test_a_skipped_copy_is_a_duplicate_not_stalled(family: Family) -> None:
    landed = NOW - timedelta(hours=1)
    raw = family.uris[RAW]
    refs = {RAW: ref(family, RAW, 5, landed)}
    found = [event(events.OBJECT_FINALIZED, raw, 5, landed),
             event(events.TRANSFORM_STARTED, raw, 5, landed + timedelta(seconds=1)),
             event(events.OBJECT_DUPLICATE_CONTENT, raw, 5, landed + timedelta(seconds=2),
                   duplicate_of="file:///b/raw/first.parquet")]
    row = classify(family, refs, found, None, now=NOW, older_than=QUIET)
    assert row.stage == DUPLICATE
    assert "file:///b/raw/first.parquet" in (row.reason or "")
    # Forced through later (allow_duplicate_content): on its way like any file.
    found.append(event(events.TRANSFORM_COMPLETED, raw, 5, NOW - timedelta(seconds=5)))
    assert classify(family, refs, found, None, now=NOW, older_than=QUIET).stage == TRANSFORMED


def test_failures_and_recovery(family: Family) -> None:
    landed = NOW - timedelta(minutes=30)
    raw = family.uris[RAW]
    refs = {RAW: ref(family, RAW, 5, landed)}
    found = [event(events.OBJECT_FINALIZED, raw, 5, landed),
             event(events.TRANSFORM_STARTED, raw, 5, landed + timedelta(seconds=1)),
             event(events.TRANSFORM_FAILED, raw, 5, landed + timedelta(seconds=2),
                   error="OSError: disk full")]
    row = classify(family, refs, found, None, now=NOW, older_than=QUIET)
    assert (row.stage, row.reason) == (FAILED, "transform failed: OSError: disk full")
    found.append(event(events.RECOVERY_ATTEMPTED, raw, 5, landed + timedelta(seconds=3),
                       attempt=1, cause="run transform Failed"))
    row = classify(family, refs, found, None, now=NOW, older_than=QUIET)
    assert row.stage == FAILED and "re-run 1" in (row.note or "")
    # The re-run started: on its way again.
    found.append(event(events.TRANSFORM_STARTED, raw, 5, NOW - timedelta(seconds=5)))
    assert classify(family, refs, found, None, now=NOW, older_than=QUIET).stage == LANDED
    found.append(event(events.RECOVERY_EXHAUSTED, raw, 5, NOW - timedelta(seconds=1),
                       message="failed after 3 automatic re-runs"))
    row = classify(family, refs, found, None, now=NOW, older_than=QUIET)
    assert (row.stage, row.reason) == (FAILED, "failed after 3 automatic re-runs")


def test_a_file_the_bridge_could_not_announce_failed(family: Family) -> None:
    found = [event(events.NOTIFICATION_REJECTED, family.uris[RAW], 3, NOW,
                   why="symlink", detail="a symbolic link to '/etc/passwd'")]
    row = classify(family, {}, found, None, now=NOW, older_than=QUIET)
    assert row.stage == FAILED and "symlink" in (row.reason or "")


def test_stalled_is_quiet_unloaded_and_not_queued(family: Family) -> None:
    raw, landed = family.uris[RAW], NOW - timedelta(minutes=20)
    refs = {RAW: ref(family, RAW, 5, landed)}
    # Nothing ever happened to it (a lost notification): stalled once quiet.
    row = classify(family, refs, [], None, now=NOW, older_than=QUIET)
    assert row.stage == STALLED and "reconcile" in (row.reason or "")
    assert classify(family, refs, [], None, now=landed + timedelta(minutes=1),
                    older_than=QUIET).stage == LANDED
    assert classify(family, refs, [], None, now=NOW, older_than=QUIET,
                    queued=True).stage == LANDED
    # Transformed, and the load never came.
    found = [event(events.OBJECT_FINALIZED, raw, 5, landed),
             event(events.TRANSFORM_COMPLETED, raw, 5, landed + timedelta(seconds=3))]
    row = classify(family, refs, found, None, now=NOW, older_than=QUIET)
    assert row.stage == STALLED and (row.reason or "").startswith("transformed, then nothing")
    soon = landed + timedelta(seconds=30)
    row = classify(family, refs, found, None, now=soon, older_than=QUIET)
    assert row.stage == TRANSFORMED and "on its way" in (row.note or "")
    # A transform started long ago and never finished is presumed running for a while.
    started = [event(events.TRANSFORM_STARTED, raw, 5, landed)]
    assert classify(family, refs, started, None, now=NOW, older_than=QUIET).stage == LANDED


def test_a_new_generation_is_not_loaded_by_the_old_load(family: Family) -> None:
    first, second = NOW - timedelta(hours=2), NOW - timedelta(seconds=30)
    found = [*chain(family, 1, first, 100),
             event(events.OBJECT_FINALIZED, family.uris[RAW], 2, second)]
    load = LoadRecord(family.uris[RAW], 1, family.uris[PROCESSED], 100, first)
    row = classify(family, {RAW: ref(family, RAW, 2, second)}, found, load, now=NOW,
                   older_than=QUIET)
    assert (row.stage, row.rows, row.loaded_generation) == (LANDED, None, 1)
    assert "generation 1 (100 rows)" in (row.note or "")


# -- the command, with the events API stubbed ----------------------------------------


@pytest.fixture
def stubbed(settings: Settings, store: LocalStore,
            monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Event]]:
    """status() against the real bucket and DuckDB, and these events instead of a server."""
    stored: list[Event] = []

    async def about(ctx: Any, uris: list[str]) -> list[Event]:
        return [e for e in stored if e.resource.id in uris]

    async def under(ctx: Any, prefixes: list[str]) -> list[Event]:
        return [e for e in stored if e.resource.id.startswith(tuple(prefixes))]

    async def named(ctx: Any, basenames: list[str]) -> list[Event]:
        return [e for e in stored if unquote(e.resource.id.rsplit("/", 1)[-1]) in basenames]

    async def queued(ctx: Any) -> set[str]:
        return set()

    monkeypatch.setattr(status_model, "events_about", about)
    monkeypatch.setattr(status_model, "events_under", under)
    monkeypatch.setattr(status_model, "events_named", named)
    monkeypatch.setattr(status_model, "queued_uris", queued)
    yield stored


def run(settings: Settings, target: str | None, capsys: pytest.CaptureFixture[str],
        **options: Any) -> tuple[int, str, str]:
    import asyncio

    code = asyncio.run(status_view.status(settings, target, **options))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_missing_name_is_a_clear_message_and_exit_1(
        settings: Settings, stubbed: list[Event], capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(settings, "raw/yellow/2024/nope.parquet", capsys)
    assert code == 1 and out == ""
    assert err.startswith("error: no object 'raw/yellow/2024/nope.parquet'")
    assert "Traceback" not in err
    code, _, err = run(settings, "/etc/passwd", capsys)
    assert code == 1 and "outside the bucket directory" in err


class LoadLog:
    """The warehouse's load log, and nothing else of it."""

    def __init__(self) -> None:
        self.rows: list[dict[str, object]] = []

    def loads(self) -> list[dict[str, object]]:
        return list(self.rows)

    def loaded(self, table: str, source_uri: str) -> tuple[int, int] | None:
        for row in self.rows:
            if row["source_uri"] == source_uri:
                return int(str(row["source_generation"])), int(str(row["rows"]))
        return None


def test_status_of_a_processed_name_shows_the_rows_of_its_source(
        settings: Settings, store: LocalStore, stubbed: list[Event],
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    log = LoadLog()
    monkeypatch.setattr(status_view, "warehouse_from_settings", lambda _: log)
    put(store, SPACED)
    raw = store.ref(SPACED)
    family = Family.of(SPACED, settings, store)
    landed = raw.created or NOW
    stubbed.extend(chain(family, raw.generation, landed, 55_852))
    log.rows.append({"table_name": settings.table, "source_uri": raw.uri,
                     "source_generation": raw.generation, "object_uri": family.uris[PROCESSED],
                     "object_generation": 99, "rows": 55_852,
                     "loaded_at": landed + timedelta(seconds=6)})
    for target in (family.names[PROCESSED], "my trips é.parquet",
                   "raw/yellow/2024/my%20trips%20%C3%A9.parquet", str(store.root / SPACED),
                   raw.uri):
        code, out, err = run(settings, target, capsys)
        assert code == 0, err
        assert out.startswith(f"{SPACED}: loaded, 55,852 rows"), out
        assert "loaded 6.0s later" in out
        assert f"warehouse: 55,852 rows of generation {raw.generation}" in out
        assert events.LOAD_COMPLETED in out and events.TRANSFORM_COMPLETED in out
    code, out, _ = run(settings, "raw/", capsys, as_json=True)
    board = json.loads(out)
    assert [(o["object"], o["stage"], o["rows"]) for o in board["objects"]] == \
        [(SPACED, LOADED, 55_852)]
    code, out, _ = run(settings, "", capsys)
    assert code == 0 and "1 object: 1 loaded" in out
    code, out, _ = run(settings, "raw/", capsys, stalled=True, older_than=timedelta(0))
    assert code == 0 and out.startswith("nothing stalled under raw/")
    # The same basename in two folders is ambiguous: say which, do not guess.
    put(store, "raw/green/2024/my trips é.parquet")
    code, _, err = run(settings, "my trips é.parquet", capsys)
    assert code == 1 and "matches 2 objects" in err


# -- status --follow -------------------------------------------------------------------


def test_a_followed_event_is_one_line_with_its_object_and_key_payload(
        settings: Settings, store: LocalStore, family: Family) -> None:
    at = datetime(2026, 1, 10, 12, 0, 5, tzinfo=UTC)
    loaded = event(events.LOAD_COMPLETED, family.uris[PROCESSED], 7, at,
                   rows=1234, status="loaded", table="trips")
    line = status_view.follow_line(loaded, store.name_of)
    assert line.startswith("2026-01-10 12:00:05  pipeline.load.completed")
    assert family.names[PROCESSED] + " (gen 7)" in line
    assert "status=loaded rows=1234" in line and "table" not in line
    failed = event(events.TRANSFORM_FAILED, family.uris[RAW], None, at,
                   error="boom\n  at line 3")
    assert status_view.follow_line(failed, store.name_of).endswith(
        f"{NAME}  error=boom at line 3")

    def nothing(uri: str) -> None:
        return None

    first = event(events.OBJECT_FINALIZED, family.uris[RAW], 7, at)
    again = Event(event=events.OBJECT_FINALIZED, occurred=at, id=uuid.uuid4(), resource=Resource(
        {**dict(first.resource), events.LABEL_REEMIT: "true"}))
    assert "(re-emit)" not in status_view.follow_line(first, store.name_of)
    assert "storage.object.finalized (re-emit)" in status_view.follow_line(again,
                                                                           store.name_of)
    other = event(events.RECONCILE_COMPLETED, "taxi-pipeline.reconcile", None, at, emitted=0)
    assert "taxi-pipeline.reconcile" in status_view.follow_line(other, nothing)


def test_follow_watches_every_stage_of_a_prefix_or_one_object(
        settings: Settings, store: LocalStore, family: Family) -> None:
    assert status_view.follow_uris("", settings, store) == []
    watched = status_view.follow_uris("raw/yellow/", settings, store)
    assert watched == [status_model.uri_of(store, p + "yellow/")
                       for p in ("raw/", "processed/", "rejects/", "quarantine/")]
    assert status_view.follow_uris("yellow/", settings, store) == watched
    assert status_view.follow_uris(NAME, settings, store) == list(family.uris.values())
    with pytest.raises(StatusError, match="--follow takes a prefix"):
        status_view.follow_uris("yellow_tripdata_2024-01.parquet", settings, store)


STOP_SCRIPT = """
import asyncio, os, signal, sys, time
from taxi_pipeline.ops.status_view import _until_stopped

async def stubborn():  # swallows the first cancellation, like a client mid-reconnect
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        await asyncio.sleep(3600)

async def failing_close():  # its clean-up fails once cancelled
    try:
        await asyncio.sleep(3600)
    except asyncio.CancelledError:
        raise RuntimeError("close handshake failed") from None

async def main():
    asyncio.get_running_loop().call_later(0.5, os.kill, os.getpid(), signal.{signal})
    started = time.monotonic()
    await _until_stopped({work}(), grace=1.0)
    print(round(time.monotonic() - started, 1))

asyncio.run(main())
"""


@pytest.mark.parametrize("signal_name", ["SIGINT", "SIGTERM"])
@pytest.mark.parametrize("work", ["stubborn", "failing_close"])
def test_follow_stops_on_a_signal_even_when_its_work_ignores_one_cancellation(
        signal_name: str, work: str) -> None:
    """Stopped within the grace, exit 0, and an error while stopping is neither raised
    nor logged as a never-retrieved task exception."""
    import subprocess
    import sys

    script = STOP_SCRIPT.replace("{signal}", signal_name).replace("{work}", work)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    assert float(result.stdout) < 5, result.stdout
    assert "Traceback" not in result.stderr and "never retrieved" not in result.stderr


def test_status_with_no_server_shows_the_bucket_and_says_events_are_unavailable(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """`up` stopped, no PREFECT_API_URL: the board still answers from the bucket."""
    from taxi_pipeline.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = Settings()
    assert not (settings.home / "api-url").exists()
    name = "raw/yellow/2024/yellow_tripdata_2024-03.parquet"
    (settings.bucket_dir / name).parent.mkdir(parents=True)
    (settings.bucket_dir / name).write_bytes(b"PAR1" + b"\0" * 16 + b"PAR1")
    assert main(["status"]) == 0
    out, err = capsys.readouterr()
    assert any(line.split() == ["landed", "-", "-", name] for line in out.splitlines())
    assert "1 object: 1 landed" in out
    assert err.count("events unavailable: no Prefect server is running") == 1
    assert main(["status", name, "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["object"]["stage"] == "landed"
    assert "events unavailable" in err


def test_a_file_the_bridge_holds_back_is_waiting_not_stalled(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The bridge's held report (a writer still has the file open) makes the board say
    why the file waits, and --stalled leave it out, however long the copy takes."""
    import os
    import time

    from taxi_pipeline.cli import main

    monkeypatch.delenv("PREFECT_API_URL", raising=False)
    settings = Settings()
    name = "raw/yellow/2024/yellow_tripdata_2024-03.parquet"
    path = settings.bucket_dir / name
    path.parent.mkdir(parents=True)
    path.write_bytes(b"PAR1" + b"\0" * 16)  # half a file: no footer yet
    long_ago = time.time() - 3600
    os.utime(path, (long_ago, long_ago))
    assert main(["status", "--stalled"]) == 0
    assert name in capsys.readouterr().out  # without the report: stalled
    (settings.home / "bridge-held.json").write_text(json.dumps(
        {"written": time.time(), "held": {name: time.time() - 42}}))
    assert main(["status"]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if name in x)
    assert line.split()[0] == "landed" and "waiting for the writer to finish, 4" in line
    assert main(["status", "--stalled"]) == 0
    assert name not in capsys.readouterr().out
    # A report its bridge stopped refreshing (the bridge is gone) is ignored.
    (settings.home / "bridge-held.json").write_text(json.dumps(
        {"written": time.time() - 600, "held": {name: time.time() - 700}}))
    assert main(["status", "--stalled"]) == 0
    assert name in capsys.readouterr().out
