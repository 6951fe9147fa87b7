"""End to end on the local profile: a real Prefect server, worker, bridge and automations.

Files are dropped into the bucket directory the way a user does (a plain copy)
and the test waits until the warehouse holds them; nothing is called directly.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from support.local_e2e import (
    LOAD_TIMEOUT,
    drop,
    flow_run_count,
    processes_of,
    read_events,
    running_stack,
    start_up,
    stop_up,
    table_rows,
    wait_events,
    wait_loaded,
)

from taxi_pipeline import events
from taxi_pipeline.event_delivery import EventDelivery
from taxi_pipeline.objects import month_of, sibling_name
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.storage.local import LocalStore
from taxi_pipeline.transform.streaming import transform_parquet
from taxi_pipeline.warehouse.duckdb_warehouse import DuckDBWarehouse

pytestmark = pytest.mark.e2e

@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("e2e-home")
    settings = Settings(profile="local", home=home, bucket=str(home / "bucket"), stall_seconds=5)
    with running_stack(settings) as running:
        yield running


@pytest.mark.quick
def test_files_travel_the_whole_chain(stack: LocalStack, tmp_path: Path,
                                      tlc_data_dir: Path) -> None:
    settings = stack.settings
    store = LocalStore(settings.bucket_dir)
    jan = generate_month("yellow", 2024, 1, 40_000, seed=1)
    feb = generate_month("yellow", 2024, 2, 30_000, era="2023", seed=2)
    yellow = {
        raw_object_name(settings.raw_prefix, "yellow", 2024, 1): (
            write_month(jan, tmp_path / "jan.parquet"), jan.expected_good),
        raw_object_name(settings.raw_prefix, "yellow", 2024, 2): (
            write_month(feb, tmp_path / "feb.parquet"), feb.expected_good),
    }
    # The real green month: its expected count comes from the same transform, run here.
    green_source = tlc_data_dir / "green_tripdata_2024-01.parquet"
    green_name = raw_object_name(settings.raw_prefix, "green", 2024, 1)
    green_expected = transform_parquet(
        green_source, tmp_path / "g.parquet", tmp_path / "g-rejects.parquet",
        source_uri="x", source_generation=1, taxi_type="green", month=month_of(green_name),
    ).rows_out
    drops = {**yellow, green_name: (green_source, green_expected)}

    dropped = {name: drop(path, settings, name) for name, (path, _) in drops.items()}
    for name, (_, expected) in drops.items():
        ref = store.ref(name)
        assert wait_loaded(settings, ref.uri, ref.generation) == expected, name
        assert DuckDBWarehouse(settings.warehouse_file).rows_for(settings.table, ref.uri) \
            == expected
    total = sum(expected for _, expected in drops.values())
    assert table_rows(settings) == total

    # Every hop left an event naming the object, with the flow run as related resource.
    jan_name = next(iter(yellow))
    jan_uri = dropped[jan_name].as_uri()
    completed = wait_events([events.TRANSFORM_COMPLETED], jan_uri)
    assert completed[0].payload["rows_out"] == jan.expected_good
    assert any(r.get("prefect.resource.role") == "flow-run" for r in completed[0].related)
    processed_uri = completed[0].payload["processed_uri"]
    wait_events([events.LOAD_COMPLETED], processed_uri)

    # The same file dropped again is a new generation: reloaded, never duplicated.
    runs_before = flow_run_count(settings.transform_deployment)
    again = drop(yellow[jan_name][0], settings, jan_name)
    ref = store.ref(jan_name)
    assert wait_loaded(settings, again.as_uri(), ref.generation) == jan.expected_good
    assert table_rows(settings) == total
    assert flow_run_count(settings.transform_deployment) == runs_before + 1

    # A redelivered notification (same deterministic id) starts no second run.
    async def redeliver() -> set[Any]:
        async with EventDelivery() as delivery:
            event = events.object_finalized(ref, {"raw": settings.raw_prefix,
                                                  "processed": settings.processed_prefix})
            return await delivery.deliver([event], timeout=30)

    assert len(asyncio.run(redeliver())) == 1
    # Positive signal instead of a sleep: a sentinel object dropped after the duplicate
    # is loaded, so the automations have long handled the duplicate before it.
    sentinel = generate_month("yellow", 2024, 3, 2_000, seed=3)
    sentinel_name = raw_object_name(settings.raw_prefix, "yellow", 2024, 3)
    sentinel_uri = drop(write_month(sentinel, tmp_path / "mar.parquet"), settings,
                        sentinel_name).as_uri()
    assert wait_loaded(settings, sentinel_uri, store.ref(sentinel_name).generation) == \
        sentinel.expected_good
    assert flow_run_count(settings.transform_deployment) == runs_before + 2
    assert table_rows(settings) == total + sentinel.expected_good
    assert stack.process("bridge").alive()


def test_the_event_feed_link_shows_every_event_of_the_objects_story(
        stack: LocalStack, tmp_path: Path) -> None:
    """The UI's resource filter (resource or related, by prefix, the API call the event
    feed makes) on the raw object's URI returns every event `status <object>` prints,
    the processed object's load events included (they name the raw object as source)."""
    from prefect.client.orchestration import get_client
    from prefect.events.filters import (
        EventAnyResourceFilter,
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
    )

    from taxi_pipeline.ops.status_model import Context, story_of
    from taxi_pipeline.warehouse import warehouse_from_settings

    settings = stack.settings
    sample = generate_month("green", 2024, 5, 3_000, seed=5)
    name = raw_object_name(settings.raw_prefix, "green", 2024, 5)
    uri = drop(write_month(sample, tmp_path / "may.parquet"), settings, name).as_uri()
    store = LocalStore(settings.bucket_dir)
    wait_loaded(settings, uri, store.ref(name).generation)
    processed = sibling_name(name, settings.raw_prefix, settings.processed_prefix)
    wait_events([events.LOAD_COMPLETED], store.ref(processed).uri)

    async def both() -> tuple[set[str], set[str]]:
        ctx = Context(settings, store, warehouse_from_settings(settings),
                      datetime.now(UTC), timedelta(minutes=3))
        story = await story_of(ctx, name, ctx.loads())
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(
                any_resource=EventAnyResourceFilter(id_prefix=[uri]),
                event=EventNameFilter(prefix=["pipeline.", "storage.object."]),
                occurred=EventOccurredFilter(since=ctx.since)), limit=50)
            linked = list(page.events)
            while page.next_page:  # the UI pages 50 at a time too
                page = await client.read_events_page(str(page.next_page))
                linked += page.events
        return {str(e.id) for e in story.events}, {str(e.id) for e in linked}

    told, linked = asyncio.run(both())
    assert len(told) >= 6  # finalized x2, transform started/completed, load started/completed
    assert told <= linked, f"the link misses {len(told - linked)} of {len(told)} events"


def test_a_file_that_is_not_parquet_is_quarantined(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    name = raw_object_name(settings.raw_prefix, "yellow", 2023, 7)
    bogus = tmp_path / "bogus.parquet"
    bogus.write_text("VendorID,tpep_pickup_datetime\n1,2023-07-01 00:00:00\n")
    uri = drop(bogus, settings, name).as_uri()
    quarantined = wait_events([events.OBJECT_QUARANTINED], uri, timeout=LOAD_TIMEOUT)
    assert quarantined[0].payload["reason"] == "not_parquet"
    assert "parquet" in quarantined[0].payload["detail"]
    assert "supported formats are .parquet, .csv and .csv.gz" in \
        quarantined[0].payload["detail"]
    quarantine_path = settings.bucket_dir / settings.quarantine_prefix / "yellow/2023" / \
        "yellow_tripdata_2023-07.parquet"
    assert quarantine_path.read_text().startswith("VendorID")
    assert not (settings.bucket_dir / name).exists()
    assert DuckDBWarehouse(settings.warehouse_file).loaded(settings.table, uri) is None
    assert stack.process("bridge").alive()
    # A quarantine is an outcome, not an error: no failed task, no ERROR line for it.
    logs = "".join(stack.log_path(part).read_text(errors="replace")
                   for part in ("worker", "flow-runs") if stack.log_path(part).exists())
    assert "quarantined uri=" in logs
    assert not [line for line in logs.splitlines()
                if "BadInputFile" in line and ("ERROR" in line or "Failed" in line)]


def test_a_truncated_parquet_file_is_quarantined(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    sample = generate_month("yellow", 2023, 8, 5_000, seed=3)
    whole = write_month(sample, tmp_path / "whole.parquet").read_bytes()
    cut = tmp_path / "cut.parquet"
    cut.write_bytes(whole[: len(whole) // 2])
    name = raw_object_name(settings.raw_prefix, "yellow", 2023, 8)
    uri = drop(cut, settings, name).as_uri()
    # Without its footer the bridge waits `stall_seconds` before announcing it.
    quarantined = wait_events([events.OBJECT_QUARANTINED], uri,
                              timeout=settings.stall_seconds + LOAD_TIMEOUT)
    assert quarantined[0].payload["reason"] == "not_parquet"
    assert DuckDBWarehouse(settings.warehouse_file).loaded(settings.table, uri) is None
    assert pq.read_metadata(tmp_path / "whole.parquet").num_rows == 5_000


@pytest.fixture
def tlc_site(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    """A loopback HTTP server standing in for the TLC download site."""
    import functools
    import threading
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    root = tmp_path / "site"
    root.mkdir()
    handler = functools.partial(SimpleHTTPRequestHandler, directory=str(root))
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/trip-data", root / "trip-data"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def test_download_lands_the_month_and_the_chain_loads_it(
    stack: LocalStack, tlc_site: tuple[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from flows.download import download
    from taxi_pipeline.settings import get_settings

    settings = stack.settings
    base_url, site_dir = tlc_site
    sample = generate_month("green", 2022, 5, 8_000, seed=5)
    write_month(sample, site_dir / "green_tripdata_2022-05.parquet")
    for key, value in {"TAXI_HOME": str(settings.home), "TAXI_BUCKET": settings.bucket,
                       "TAXI_TLC_BASE_URL": base_url}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()

    # yellow 2022-05 is not on the site: skipped as "not published", not a failure
    first = download(months=["2022-05"], datasets=["green", "yellow"])
    assert first == {"green/2022-05": "downloaded", "yellow/2022-05": "not_published"}
    ref = LocalStore(settings.bucket_dir).ref(raw_object_name(settings.raw_prefix, "green",
                                                              2022, 5))
    assert wait_loaded(settings, ref.uri, ref.generation) == sample.expected_good
    wait_events([events.DOWNLOAD_COMPLETED], ref.uri)

    # The next scheduled run finds it in the bucket and leaves it alone.
    assert download(months=["2022-05"], datasets=["green"]) == {"green/2022-05": "exists"}
    assert LocalStore(settings.bucket_dir).ref(ref.name).generation == ref.generation


def use_stack_settings(stack: LocalStack, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """Point this process's settings (the CLI's) at the running stack's bucket."""
    from taxi_pipeline.settings import get_settings

    settings = stack.settings
    for key, value in {"TAXI_HOME": str(settings.home), "TAXI_BUCKET": settings.bucket}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    return settings


def test_reemit_runs_the_chain_again_and_status_tells_the_story(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from taxi_pipeline.cli import main

    settings = use_stack_settings(stack, monkeypatch)
    sample = generate_month("yellow", 2021, 3, 6_000, seed=9)
    name = raw_object_name(settings.raw_prefix, "yellow", 2021, 3)
    ref_uri = drop(write_month(sample, tmp_path / "m.parquet"), settings, name).as_uri()
    ref = LocalStore(settings.bucket_dir).ref(name)
    assert wait_loaded(settings, ref_uri, ref.generation) == sample.expected_good
    runs = flow_run_count(settings.transform_deployment)
    processed = LocalStore(settings.bucket_dir).ref(
        sibling_name(name, settings.raw_prefix, settings.processed_prefix))

    assert main(["reemit", name]) == 0
    assert "(stored)" in capsys.readouterr().out
    deadline = time.monotonic() + LOAD_TIMEOUT
    while flow_run_count(settings.transform_deployment) == runs:
        assert time.monotonic() < deadline, "re-emit started no transform run"
        time.sleep(0.5)
    loads = wait_events([events.LOAD_COMPLETED], processed.uri, at_least=2,
                        timeout=LOAD_TIMEOUT)
    assert DuckDBWarehouse(settings.warehouse_file).rows_for(settings.table, ref_uri) == \
        sample.expected_good
    # Same source generation, same bytes: the processed object kept its generation,
    # the transform re-emitted it itself, and the load left every row in place.
    assert LocalStore(settings.bucket_dir).ref(processed.name) == processed
    assert max(loads, key=lambda e: e.occurred).payload["status"] == "already_loaded"
    transforms = wait_events([events.TRANSFORM_COMPLETED], ref_uri, at_least=2)
    assert max(transforms, key=lambda e: e.occurred).payload["output"] == "unchanged"

    assert main(["status", name]) == 0
    story = capsys.readouterr().out
    for step in (events.OBJECT_FINALIZED, events.TRANSFORM_COMPLETED, events.LOAD_COMPLETED):
        assert step in story
    assert f"{sample.expected_good:,} rows" in story


def test_reemit_by_prefix_dry_run_event_id_and_a_missing_name(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from taxi_pipeline.cli import main
    from taxi_pipeline.ops.reemit import ORIGINAL_ROLE

    settings = use_stack_settings(stack, monkeypatch)
    store = LocalStore(settings.bucket_dir)
    prefix = f"{settings.raw_prefix}green/2018/"
    expected: dict[str, int] = {}
    for month in (1, 2, 3):
        sample = generate_month("green", 2018, month, 1_500, seed=20 + month)
        name = raw_object_name(settings.raw_prefix, "green", 2018, month)
        drop(write_month(sample, tmp_path / f"{month}.parquet"), settings, name)
        expected[name] = sample.expected_good
    raw = {name: store.ref(name) for name in expected}
    for name, ref in raw.items():
        assert wait_loaded(settings, ref.uri, ref.generation) == expected[name]
    processed = {name: store.ref(sibling_name(name, settings.raw_prefix,
                                              settings.processed_prefix)).uri
                 for name in expected}
    for name in raw:
        wait_events([events.LOAD_COMPLETED], processed[name])
    rows = table_rows(settings)
    transforms = flow_run_count(settings.transform_deployment)
    loads = flow_run_count(settings.load_deployment)
    capsys.readouterr()

    # A dry run lists the three and sends nothing (checked below: one more run each, not two).
    assert main(["reemit", "--dry-run", prefix]) == 0
    out = capsys.readouterr().out
    assert out.count("would re-emit") == 4 and "nothing was sent" in out

    assert main(["reemit", "--rate", "20", prefix]) == 0
    out = capsys.readouterr().out
    assert out.count("(stored)") == 3
    assert "emitted 3, confirmed 3, skipped 0, errors 0" in out
    for name, ref in raw.items():
        wait_events([events.TRANSFORM_COMPLETED], ref.uri, at_least=2, timeout=LOAD_TIMEOUT)
        done = wait_events([events.LOAD_COMPLETED], processed[name], at_least=2,
                           timeout=LOAD_TIMEOUT)
        assert max(done, key=lambda e: e.occurred).payload["status"] == "already_loaded"
    for name, ref in raw.items():
        assert len(read_events([events.TRANSFORM_COMPLETED], ref.uri)) == 2, name
        assert len(read_events([events.LOAD_COMPLETED], processed[name])) == 2, name
    assert flow_run_count(settings.transform_deployment) == transforms + 3
    assert flow_run_count(settings.load_deployment) == loads + 3
    assert table_rows(settings) == rows

    # A stored event by id: sent again with a fresh id, related to the original.
    first = raw[next(iter(raw))]
    original = next(e for e in read_events([events.OBJECT_FINALIZED], first.uri)
                    if events.LABEL_REEMIT not in e.resource)
    assert main(["reemit", "--event-id", str(original.id)]) == 0
    assert "(stored)" in capsys.readouterr().out
    link = f"prefect.event.{original.id}"
    copies = [e for e in wait_events([events.OBJECT_FINALIZED], first.uri, at_least=3)
              if any(r.id == link and r.role == ORIGINAL_ROLE for r in e.related)]
    assert len(copies) == 1 and copies[0].id != original.id
    assert copies[0].resource[events.LABEL_GENERATION] == str(first.generation)
    wait_events([events.TRANSFORM_COMPLETED], first.uri, at_least=3, timeout=LOAD_TIMEOUT)

    # A name that names nothing: the others are still listed, and the exit code is 1.
    missing = f"{prefix}green_tripdata_2018-04.parquet"
    assert main(["reemit", "--dry-run", first.name, missing]) == 1
    out, err = capsys.readouterr()
    assert "would re-emit 1, skipped 1" in out and f"skipping {missing}" in err
    assert main(["reemit", missing]) == 1
    assert table_rows(settings) == rows


def test_up_stops_everything_on_sigterm(tmp_path: Path) -> None:
    """`taxi-pipeline up` under a supervisor: SIGTERM leaves no process behind, well
    within the stop timeout of the systemd unit that runs it as a service."""
    from test_systemd_unit import stop_timeout_seconds

    home = tmp_path / "up-home"
    up = start_up(home)
    # The CLI, PostgreSQL, server, fork server, worker, bridge.
    assert len(processes_of(home)) >= 6
    began = time.monotonic()
    stop_up(up, home, signal.SIGTERM)
    took = time.monotonic() - began
    print(f"`up` stopped {took:.1f}s after SIGTERM")
    assert took < stop_timeout_seconds() / 2


def test_reconcile_re_emits_what_never_reached_the_warehouse(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from taxi_pipeline.cli import main

    settings = use_stack_settings(stack, monkeypatch)
    sample = generate_month("green", 2020, 6, 4_000, seed=13)
    name = raw_object_name(settings.raw_prefix, "green", 2020, 6)
    uri = drop(write_month(sample, tmp_path / "g.parquet"), settings, name).as_uri()
    generation = LocalStore(settings.bucket_dir).ref(name).generation
    assert wait_loaded(settings, uri, generation) == sample.expected_good
    # Rows are visible before the load's completed event is stored; until it is,
    # reconcile rightly sees a load started and not finished, and leaves it alone.
    wait_events([events.LOAD_COMPLETED], uri.replace("/raw/", "/processed/"))

    # Lose the load, as a failed automation action would (the server never retries those).
    with DuckDBWarehouse(settings.warehouse_file).connect() as con:
        con.execute(f"DELETE FROM {settings.table} WHERE source_uri = ?", [uri])
        con.execute("DELETE FROM _loads WHERE source_uri = ?", [uri])
    assert main(["reconcile", "--older-than-minutes", "0", "--dry-run"]) == 0
    assert f"stalled {uri}" in capsys.readouterr().out
    assert main(["reconcile", "--older-than-minutes", "0"]) == 0
    assert "re-emitted" in capsys.readouterr().out
    assert wait_loaded(settings, uri, generation) == sample.expected_good
    assert main(["reconcile", "--older-than-minutes", "0", "--dry-run"]) == 0
    assert "nothing to re-emit" in capsys.readouterr().out


def test_status_answers_for_any_name_of_any_object_and_lists_the_board(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import json

    from taxi_pipeline.cli import main

    settings = use_stack_settings(stack, monkeypatch)
    store = LocalStore(settings.bucket_dir)
    sample = generate_month("yellow", 2019, 2, 2_000, seed=17)
    spaced = f"{settings.raw_prefix}yellow/2019/yellow_tripdata_2019-02 copy é.parquet"
    path = drop(write_month(sample, tmp_path / "s.parquet"), settings, spaced)
    bogus = f"{settings.raw_prefix}green/2019/green_tripdata_2019-03.parquet"
    (tmp_path / "bogus").write_text("not parquet at all\n")
    bogus_uri = drop(tmp_path / "bogus", settings, bogus).as_uri()
    raw = store.ref(spaced)
    assert "%20" in raw.uri  # events name it by its percent-encoded URI
    assert wait_loaded(settings, raw.uri, raw.generation) == sample.expected_good
    wait_events([events.LOAD_COMPLETED], raw.uri.replace("/raw/", "/processed/"))
    wait_events([events.OBJECT_QUARANTINED], bogus_uri,
                timeout=settings.stall_seconds + LOAD_TIMEOUT)
    capsys.readouterr()

    def status(*args: str) -> tuple[int, str, str]:
        code = main(["status", *args])
        out, err = capsys.readouterr()
        assert "Traceback" not in out + err
        return code, out, err

    # The space name, encoded or not, its URI, its absolute path, its file name, its
    # processed name: the whole story (processed and load events too) and its rows.
    processed = sibling_name(spaced, settings.raw_prefix, settings.processed_prefix)
    rows = f"{sample.expected_good:,} rows"
    for target in (spaced, spaced.replace(" ", "%20").replace("é", "%C3%A9"), raw.uri,
                   str(path), path.name, processed):
        code, out, err = status(target)
        assert code == 0, (target, err)
        assert out.startswith(f"{spaced}: loaded, {rows}"), (target, out)
        for step in (events.OBJECT_FINALIZED, events.TRANSFORM_COMPLETED,
                     events.LOAD_COMPLETED):
            assert step in out, (target, out)
        assert f"warehouse: {rows} of generation {raw.generation}" in out, (target, out)

    # A quarantined object: by its raw name (gone from raw/) and by its quarantine name.
    quarantined = sibling_name(bogus, settings.raw_prefix, settings.quarantine_prefix)
    for target in (bogus, quarantined):
        code, out, err = status(target)
        assert code == 0, err
        assert out.startswith(f"{bogus}: quarantined") and "not_parquet" in out, out
        assert events.OBJECT_QUARANTINED in out

    # A name that names nothing: one clear line, exit 1.
    code, out, err = status(f"{settings.raw_prefix}yellow/2019/nope.parquet")
    assert code == 1 and out == ""
    assert err.startswith(f"error: no object '{settings.raw_prefix}yellow/2019/nope.parquet'")
    code, _, err = status(str(tmp_path / "s.parquet"))
    assert code == 1 and "outside the bucket directory" in err

    # The board: one line per object, loaded and quarantined ones included.
    code, out, _ = status(settings.raw_prefix)
    assert code == 0
    lines = {line.split()[0]: line for line in out.splitlines() if spaced in line or bogus in line}
    assert lines["loaded"].split()[1] == f"{sample.expected_good:,}"
    assert "not_parquet" in lines["quarantined"]
    code, out, _ = status(settings.raw_prefix, "--json")
    board = {o["object"]: o for o in json.loads(out)["objects"]}
    assert board[spaced]["stage"] == "loaded" and board[spaced]["rows"] == sample.expected_good
    assert board[spaced]["seconds_to_load"] > 0
    assert board[bogus]["stage"] == "quarantined"
    code, out, _ = status("--stalled", f"{settings.raw_prefix}yellow/2019/")
    assert code == 0 and out.startswith("nothing stalled"), out


def test_the_alerts_exist_and_a_file_with_every_row_rejected_fires_one(
        stack: LocalStack, tmp_path: Path) -> None:
    """No TAXI_ALERT_BLOCK: every alert automation still exists, and fires (doing nothing)."""
    from prefect.client.orchestration import get_client
    from prefect.events.actions import DoNothing

    from automations.definitions import ALERT_ALL_REJECTED, ALERT_NO_DATA, ALERTS

    async def automations() -> dict[str, Any]:
        async with get_client() as client:
            return {a.name: a for a in await client.read_automations()}

    found = asyncio.run(automations())
    assert set(ALERTS) <= set(found)
    for name in ALERTS:
        assert [type(a) for a in found[name].actions] == [DoNothing], name
    assert found[ALERT_NO_DATA].trigger.posture == "Proactive"  # type: ignore[union-attr]

    # June's name, May's trips: every pickup is outside the file's month.
    settings = stack.settings
    may = generate_month("yellow", 2022, 5, 2_000, seed=7)
    name = raw_object_name(settings.raw_prefix, "yellow", 2022, 6)
    uri = drop(write_month(may, tmp_path / "may.parquet"), settings, name).as_uri()
    (rejected,) = wait_events([events.OBJECT_ALL_REJECTED], uri, timeout=LOAD_TIMEOUT)
    assert rejected.payload["rows_in"] == rejected.payload["rows_rejected"] == 2_000
    assert set(rejected.payload["rejected_by_reason"]) == {"pickup_outside_month"}
    roles = {r["prefect.resource.role"]: r.id for r in rejected.related}
    assert roles["rejects"] == rejected.payload["rejects_uri"] and "flow-run" in roles

    # The processed object's events link back to the raw object they came from.
    processed_uri = roles["output"]
    landed = wait_events([events.OBJECT_FINALIZED], processed_uri, timeout=LOAD_TIMEOUT)
    assert (uri, "source") in {(r.id, r.role) for e in landed for r in e.related}
    (loaded,) = wait_events([events.LOAD_COMPLETED], processed_uri, timeout=LOAD_TIMEOUT)
    assert (uri, "source") in {(r.id, r.role) for r in loaded.related}
    assert loaded.payload["rows"] == 0

    alert = f"prefect.automation.{found[ALERT_ALL_REJECTED].id}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        fired = [e for e in read_events(["prefect.automation.triggered"], alert)
                 if any(r.id == f"prefect.event.{rejected.id}" for r in e.related)]
        if fired:
            break
        time.sleep(0.5)
    assert fired, f"{ALERT_ALL_REJECTED!r} did not fire for {rejected.id}"


def signal_another_thread(pid: int, signum: int) -> None:
    """Send `signum` to one of `pid`'s threads other than its main one (tgkill(2))."""
    import ctypes
    import os
    import platform

    def accepts(tid: int) -> bool:  # a thread that blocks it would keep it pending forever
        status = Path(f"/proc/{pid}/task/{tid}/status").read_text()
        blocked = int(next(line.split()[1] for line in status.splitlines()
                           if line.startswith("SigBlk:")), 16)
        return not blocked & (1 << (signum - 1))

    others = sorted(int(tid) for tid in os.listdir(f"/proc/{pid}/task")
                    if int(tid) != pid and accepts(int(tid)))
    assert others, "the follower has no thread besides its main one that takes the signal"
    tgkill = {"x86_64": 234, "aarch64": 131}[platform.machine()]  # syscall numbers
    libc = ctypes.CDLL(None, use_errno=True)
    assert libc.syscall(tgkill, pid, others[0], signum) == 0, os.strerror(ctypes.get_errno())


def test_status_follow_streams_a_dropped_file_and_a_deleted_object_keeps_its_story(
    stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import os
    import queue
    import subprocess
    import sys
    import threading

    from taxi_pipeline.cli import main

    settings = use_stack_settings(stack, monkeypatch)
    prefix = f"{settings.raw_prefix}yellow/2018/"
    env = {**os.environ, "TAXI_HOME": str(settings.home), "TAXI_BUCKET": settings.bucket,
           "PREFECT_API_URL": str(stack.api_url), "PYTHONFAULTHANDLER": "1"}
    follower = subprocess.Popen(
        [sys.executable, "-m", "taxi_pipeline.cli", "status", "--follow", prefix],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.Queue[str] = queue.Queue()
    seen: list[str] = []
    threading.Thread(target=lambda: [lines.put(x) for x in follower.stdout or ()],
                     daemon=True).start()

    def wait_line(text: str, timeout: float) -> str:
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            seen.append(line)
            if text in line:
                return line
        raise AssertionError(f"no line with {text!r} within {timeout}s: {seen}")

    try:
        wait_line("following pipeline events", 120)
        sample = generate_month("yellow", 2018, 4, 2_000, seed=23)
        name = raw_object_name(settings.raw_prefix, "yellow", 2018, 4)
        drop(write_month(sample, tmp_path / "apr.parquet"), settings, name)
        ref = LocalStore(settings.bucket_dir).ref(name)
        assert wait_loaded(settings, ref.uri, ref.generation) == sample.expected_good
        processed = sibling_name(name, settings.raw_prefix, settings.processed_prefix)
        finalized = wait_line(events.OBJECT_FINALIZED, 60)
        assert name in finalized and f"gen {ref.generation}" in finalized
        transformed = wait_line(events.TRANSFORM_COMPLETED, 60)
        assert name in transformed and f"rows_out={sample.expected_good}" in transformed
        loaded = wait_line(events.LOAD_COMPLETED, 60)
        assert processed in loaded and f"rows={sample.expected_good}" in loaded
        # Ctrl-C as the kernel may deliver it: to a thread other than the main one
        # (pyarrow's native threads), the harder case for a Python-level handler.
        signal_another_thread(follower.pid, signal.SIGINT)
        try:
            code = follower.wait(timeout=30)
        except subprocess.TimeoutExpired:
            # PYTHONFAULTHANDLER: SIGABRT makes it print where every thread is.
            follower.send_signal(signal.SIGABRT)
            follower.wait(timeout=30)
            stuck = follower.stderr.read() if follower.stderr else ""
            raise AssertionError(f"status --follow still ran 30 s after Ctrl-C:\n{stuck}") from None
        assert code == 0
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert "Traceback" not in (follower.stderr.read() if follower.stderr else "")

    # Deleted from the bucket after loading: its stored events still tell the story.
    # (The websocket can show an event before the events API returns it: waited for.)
    wait_events([events.LOAD_COMPLETED], LocalStore(settings.bucket_dir).ref(processed).uri)
    (settings.bucket_dir / name).unlink()
    capsys.readouterr()
    assert main(["status", name]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert out.startswith(f"{name}: loaded, {sample.expected_good:,} rows"), out
    assert "the raw object is no longer in the bucket" in out
    assert "not in the bucket" in out
    for step in (events.OBJECT_FINALIZED, events.TRANSFORM_COMPLETED, events.LOAD_COMPLETED):
        assert step in out
