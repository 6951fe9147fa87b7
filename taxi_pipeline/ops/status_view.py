"""`taxi-pipeline status`: prints the model of status_model as a board, one object's
story, JSON, or a live feed (`--follow`); the command's errors are messages, never
tracebacks.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import Coroutine
from datetime import UTC, datetime, timedelta
from typing import Any

from prefect.events import Event

from taxi_pipeline import events
from taxi_pipeline.ops.status_model import (
    LOOKBACK,
    PROCESSED,
    QUARANTINE,
    RAW,
    SHOWN_PAYLOAD,
    STAGES,
    STALLED,
    Context,
    Family,
    Row,
    StatusError,
    Story,
    Target,
    board,
    classify,
    duration_text,
    generation_of,
    held_files,
    mark_held,
    parse_target,
    queued_uris,
    role_prefixes,
    search,
    short_text,
    split_name,
    stalled_rows,
    story_of,
    uri_of,
)
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectStore, store_from_settings
from taxi_pipeline.warehouse import warehouse_from_settings

# -- output ---------------------------------------------------------------------------


def _when(value: datetime | None) -> str:
    return f"{value.astimezone(UTC):%Y-%m-%d %H:%M:%S} UTC" if value else "-"


def summary_line(row: Row) -> str:
    parts = [f"{row.name}: {row.stage}"]
    if row.rows is not None:
        parts.append(f"{row.rows:,} rows")
    if row.seconds_to_load is not None:
        parts.append(f"landed {_when(row.landed_at)}, loaded "
                     f"{duration_text(row.seconds_to_load)} later")
    elif row.landed_at:
        parts.append(f"landed {_when(row.landed_at)}")
    if row.reason:
        parts.append(row.reason)
    if row.note:
        parts.append(row.note)
    return ", ".join(parts)


def event_name(event: Event) -> str:
    """The event's name, marked when it is a re-emit (`reemit`, reconcile, recover, a
    kept output) rather than a first landing: both are `storage.object.finalized`."""
    reemit = event.resource.get(events.LABEL_REEMIT) == "true"
    return f"{event.event} (re-emit)" if reemit else event.event


def _event_line(event: Event, family: Family) -> str:
    detail = " ".join(f"{k}={short_text(str(event.payload[k]), 80)}" for k in SHOWN_PAYLOAD
                      if k in event.payload)
    role = family.role_of(event.resource.id) or "?"
    generation = generation_of(event)
    return (f"  {event.occurred.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {event_name(event):<40} "
            f"{role:<10} {'' if generation is None else f'gen {generation}':<22} {detail}"
            ).rstrip()


def print_story(story: Story, row: Row, settings: Settings, as_json: bool,
                offline: bool = False) -> None:
    family = story.family
    if as_json:
        print(json.dumps({
            "object": row.as_json(),
            "objects": [{"role": role, "name": family.names[role], "uri": family.uris[role],
                         "generation": story.refs[role].generation
                         if role in story.refs else None,
                         "in_bucket": role in story.refs} for role in family.names],
            "events": [{"occurred": e.occurred.isoformat(), "event": e.event,
                        "role": family.role_of(e.resource.id), "resource": e.resource.id,
                        "generation": generation_of(e), "id": str(e.id), "payload": e.payload}
                       for e in story.events],
            "warehouse": None if story.load is None else {
                "table": settings.table, "source_uri": story.load.source_uri,
                "source_generation": story.load.source_generation, "rows": story.load.rows,
                "loaded_at": story.load.loaded_at.isoformat() if story.load.loaded_at else None},
        }, indent=2, default=str))
        return
    print(summary_line(row))
    for role in family.names:
        ref = story.refs.get(role)
        where = f"generation {ref.generation}" if ref else "not in the bucket"
        print(f"  {role:<10} {where:<28} {family.uris[role]}")
    if offline:
        print("events about it: unavailable (no Prefect server to ask)")
    else:
        print(f"events about it ({len(story.events)}, oldest first):")
    for event in story.events:
        print(_event_line(event, family))
    load = story.load
    if load is not None:
        print(f"warehouse: {load.rows:,} rows of generation {load.source_generation} in "
              f"{settings.table} (loaded {_when(load.loaded_at)})")
    else:
        print(f"warehouse: no rows from {family.main_uri} in {settings.table}")


def print_board(rows: list[Row], prefix: str, as_json: bool, stalled: bool,
                older_than: timedelta) -> None:
    if as_json:
        print(json.dumps({"prefix": prefix, "stalled_only": stalled,
                          "objects": [r.as_json() for r in rows]}, indent=2, default=str))
        return
    where = prefix or "the bucket"
    if not rows:
        if stalled:
            print(f"nothing stalled under {where}: every raw object older than "
                  f"{duration_text(older_than.total_seconds())} is loaded or quarantined")
        else:
            print(f"no objects under {where} (in the bucket, in the events of the last "
                  f"{LOOKBACK.days} days, or in the load log)")
        return
    width = max(len(r.name) for r in rows)
    print(f"{'STAGE':<12} {'ROWS':>10}  {'TO LOADED':>9}  {'OBJECT':<{width}}  REASON")
    for r in rows:
        rows_text = f"{r.rows:,}" if r.rows is not None else "-"
        took = r.seconds_to_load
        reason = "; ".join(x for x in (r.reason, r.why_stalled if stalled else None, r.note)
                           if x)
        took_text = duration_text(took) if took is not None else "-"
        print(f"{r.stage:<12} {rows_text:>10}  {took_text:>9}"
              f"  {r.name:<{width}}  {reason}".rstrip())
    counts = {stage: sum(1 for r in rows if r.stage == stage) for stage in STAGES}
    print(f"{len(rows)} object{'s' if len(rows) != 1 else ''}: "
          + ", ".join(f"{n} {stage}" for stage, n in counts.items() if n))


# -- the command ----------------------------------------------------------------------


OFFLINE_NOTE = ("events unavailable: no Prefect server is running (start it with "
                "`taxi-pipeline up`, or set PREFECT_API_URL); showing what the bucket and "
                "the warehouse's load log know")


async def status(settings: Settings, target: str | None, *, stalled: bool = False,
                 as_json: bool = False, older_than: timedelta = timedelta(minutes=3),
                 offline: bool = False) -> int:
    """`taxi-pipeline status [TARGET]`: 0 when it answered, 1 with a message otherwise.

    `offline`: there is no server to ask; the answer comes from the bucket and the
    load log alone, after one line (on stderr, so JSON stays parseable) saying so.
    """
    try:
        if offline:
            print(f"note: {OFFLINE_NOTE}", file=sys.stderr, flush=True)
        return await _status(settings, target, stalled, as_json, older_than, offline)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:  # `| head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except Exception as exc:  # never a traceback: say what failed, where
        print(f"error: status of {target or 'the bucket'} failed: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 1


async def _status(settings: Settings, target: str | None, stalled: bool, as_json: bool,
                  older_than: timedelta, offline: bool = False) -> int:
    store = store_from_settings(settings)
    now = datetime.now(UTC)
    ctx = Context(settings, store, warehouse_from_settings(settings), now, older_than,
                  offline=offline, held=held_files(settings, now))
    parsed = parse_target(target, settings, store)
    loads = ctx.loads()
    prefix = parsed.prefix
    story: Story | None = None
    if prefix is None and not stalled:
        names = list(parsed.names)
        if parsed.search is not None:
            names = await search(ctx, parsed.search, loads)
            if len(names) > 1:
                raise StatusError(
                    f"{parsed.search!r} matches {len(names)} objects: "
                    + ", ".join(names) + "; give the full name")
        for name in names:
            story = await story_of(ctx, name, loads)
            if story.known:
                break
        if story is None or not story.known:
            folder = (parsed.names[0] if parsed.names else parsed.search or "").rstrip("/") + "/"
            if folder.strip("/") and next(iter(store.list(folder)), None) is not None:
                prefix = folder  # `raw/yellow/2024` is a folder: its board
            else:
                _report(ctx)
                raise StatusError(_not_found(target or "", ctx, parsed))
    if story is not None and story.known:
        row = mark_held(classify(story.family, story.refs, story.events, story.load,
                                 now=ctx.now, older_than=older_than),
                        story.family, ctx.held, ctx.now)
        if row.stage == STALLED and (await queued_uris(ctx)).intersection(
                story.family.uris.values()):
            row = classify(story.family, story.refs, story.events, story.load,
                           now=ctx.now, older_than=older_than, queued=True)
        print_story(story, row, settings, as_json, ctx.offline)
        return _report(ctx)
    if prefix is None:  # --stalled with an object: the board of its folder
        first = parsed.names[0] if parsed.names else (parsed.search or "")
        prefix = first.rsplit("/", 1)[0] + "/" if "/" in first else ""
    rows = await board(ctx, prefix, loads)
    if stalled:
        rows = stalled_rows(ctx, rows)
    print_board(rows, prefix, as_json, stalled, older_than)
    return _report(ctx)


def _report(ctx: Context) -> int:
    for problem in ctx.problems:
        print(f"warning: {problem}", file=sys.stderr)
    return 1 if ctx.problems else 0


def _not_found(target: str, ctx: Context, parsed: Target) -> str:
    settings = ctx.settings
    stages = ", ".join(role_prefixes(settings)[r] for r in (RAW, PROCESSED, QUARANTINE))
    what = parsed.names[0] if parsed.names else target
    events_note = ("events could not be read" if ctx.problems
                   else f"no stored event about it in the last {LOOKBACK.days} days")
    return (f"no object {what!r}: not in the bucket ({stages}), {events_note}, and no load "
            f"of it in the load log of {settings.table}. Names look like "
            f"{settings.raw_prefix}yellow/2024/yellow_tripdata_2024-01.parquet; "
            f"`taxi-pipeline status {settings.raw_prefix}` lists every object")


# -- status --follow ----------------------------------------------------------------

FOLLOWED = ("pipeline.", "storage.object.")


def follow_line(event: Event, name_of: Any) -> str:
    """One streamed event as a line: time, event, object name, key payload (no I/O).

    `name_of(uri)` gives the object's bucket name, or None for a resource that is
    not an object of this bucket (then the resource id is shown).
    """
    name = name_of(event.resource.id) or event.resource.id
    generation = generation_of(event)
    detail = " ".join(f"{k}={short_text(str(event.payload[k]), 80)}" for k in SHOWN_PAYLOAD
                      if k in event.payload)
    gen = "" if generation is None else f" (gen {generation})"
    return (f"{event.occurred.astimezone(UTC):%Y-%m-%d %H:%M:%S}  {event_name(event):<40} "
            f"{name}{gen}  {detail}").rstrip()


def follow_uris(target: str | None, settings: Settings, store: ObjectStore) -> list[str]:
    """The resource URI prefixes `--follow TARGET` watches; [] means every object."""
    parsed = parse_target(target, settings, store)
    if parsed.prefix is not None:
        if not parsed.prefix:
            return []
        role, key_prefix = split_name(parsed.prefix, settings)
        if role is None:  # `yellow/` means `raw/yellow/` and its other stages
            key_prefix = parsed.prefix
        return [uri_of(store, p + key_prefix) for p in role_prefixes(settings).values()]
    if parsed.names:
        return list(Family.of(parsed.names[-1], settings, store).uris.values())
    raise StatusError(f"--follow takes a prefix ending in / or an object's name "
                      f"({settings.raw_prefix}...), not a file name to search for: "
                      f"{parsed.search!r}")


async def follow(settings: Settings, target: str | None,
                 until: datetime | None = None) -> int:
    """`taxi-pipeline status --follow [PREFIX]`: print pipeline events as they arrive.

    Runs until Ctrl-C (or `until`, when given); the events websocket of the
    Prefect API, not polling. Exit 0 when stopped, 1 with a message otherwise.
    """
    try:
        store = store_from_settings(settings)
        prefixes = follow_uris(target, settings, store)
    except StatusError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    try:
        await _until_stopped(_follow(store, prefixes, target, until))
    except (asyncio.CancelledError, KeyboardInterrupt):
        return 0
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        from prefect.settings import PREFECT_API_URL

        print(f"error: following events at {PREFECT_API_URL.value()} failed: "
              f"{type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _until_stopped(work: Coroutine[Any, Any, None], grace: float = 5.0) -> None:
    """Run `work` until it ends or Ctrl-C (SIGINT) / SIGTERM arrives; then cancel it.

    The signal only sets an event the main coroutine waits on, so stopping does
    not depend on the websocket client letting a cancellation through: asyncio.run's
    own Ctrl-C handling cancels the main task, and under load the tests saw
    `status --follow` still waiting on its websocket 30 s after Ctrl-C. The loop's
    signal handlers also wake it through its self-pipe, whichever thread took the
    signal. The cancelled work gets `grace` seconds to close its connection.
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    running = asyncio.ensure_future(work)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        stopping.cancel()
        if not running.done():
            running.cancel()
            await asyncio.wait({running}, timeout=grace)
    if running.done() and not running.cancelled():
        error = running.exception()  # retrieved either way, so asyncio does not log it
        if error is not None and not stop.is_set():
            raise error  # it failed on its own; an error while stopping is not a failure


async def _follow(store: ObjectStore, prefixes: list[str], target: str | None,
                  until: datetime | None) -> None:
    from prefect.events.clients import get_events_subscriber
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter

    def name_of(uri: str) -> str | None:
        try:
            return store.name_of(uri)
        except ValueError:
            return None

    filter_ = EventFilter(event=EventNameFilter(prefix=list(FOLLOWED)))
    if prefixes:
        filter_.resource = EventResourceFilter(id_prefix=prefixes)
    started = datetime.now(UTC)
    async with get_events_subscriber(filter=filter_, reconnect_on_clean_close=True) as events_:
        print(f"following pipeline events under {target or 'the bucket'} "
              "(Ctrl-C to stop)", flush=True)
        iterator = aiter(events_)
        while True:
            timeout = None if until is None else (until - datetime.now(UTC)).total_seconds()
            if timeout is not None and timeout <= 0:
                return
            try:
                event = await asyncio.wait_for(anext(iterator), timeout)
            except TimeoutError:
                return
            except StopAsyncIteration:
                return
            # The subscriber replays the last minute first: only what happens from now on.
            if event.occurred < started:
                continue
            if prefixes and not event.resource.id.startswith(tuple(prefixes)):
                continue
            print(follow_line(event, name_of), flush=True)
