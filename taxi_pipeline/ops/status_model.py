"""What happened to each object: the model behind `taxi-pipeline status` (no printing).

An object is followed through its stages as one *family*: `raw/K`,
`processed/K`, `rejects/K` and `quarantine/K` share the key `K`, so a name of
any stage tells the same story. What is known comes from three places: the
bucket (which objects exist now), the Prefect events API (every event names
its object's URI as its resource, and stays stored after the object is moved
or deleted) and the warehouse's load log (rows and load time per raw URI).

A target can be an object URI (percent-encoded `file://`, or `gs://`), a name
of any stage, a name with its spaces or unicode percent-encoded, an absolute
path inside the local bucket directory, or a bare file name (or the end of a
name) that is searched for. Whatever goes wrong is a message and exit code 1,
never a traceback. How it is printed lives in status_view.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import unquote

from prefect.events import Event

from taxi_pipeline import events
from taxi_pipeline.datasets.registry import tables
from taxi_pipeline.objects import ObjectRef, parse_uri
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore
from taxi_pipeline.warehouse import Warehouse

# How far back events are read: Prefect's own default window for event queries
# (the server's retention, PREFECT_SERVER_EVENTS_RETENTION_PERIOD, may be shorter).
LOOKBACK = timedelta(days=180)
READ_BATCH = 50

# What the board says an object reached (the last stage, or what stopped it).
LANDED = "landed"
TRANSFORMED = "transformed"
LOADED = "loaded"
QUARANTINED = "quarantined"
FAILED = "failed"
STALLED = "stalled"
DUPLICATE = "duplicate"
STAGES = (LOADED, QUARANTINED, DUPLICATE, FAILED, STALLED, TRANSFORMED, LANDED)

# Roles of the objects of one family, in the order they are shown.
RAW, PROCESSED, REJECTS, QUARANTINE = "raw", "processed", "rejects", "quarantine"
ROLES = (RAW, PROCESSED, REJECTS, QUARANTINE)
# A name outside every stage prefix is a family of its own, in this role.
OTHER = "object"

_FAILURES = {events.TRANSFORM_FAILED, events.LOAD_FAILED, events.RECOVERY_EXHAUSTED,
             events.NOTIFICATION_REJECTED, events.DOWNLOAD_FAILED}
_PROGRESS = {events.OBJECT_FINALIZED, events.TRANSFORM_STARTED, events.TRANSFORM_COMPLETED,
             events.LOAD_STARTED, events.LOAD_COMPLETED, events.RECOVERY_ATTEMPTED,
             events.DOWNLOAD_COMPLETED}
# Payload keys worth a place on an event's line (all of it is in --json).
SHOWN_PAYLOAD = ("status", "rows", "rows_in", "rows_out", "rows_rejected", "output", "reason",
          "detail", "why", "error", "attempt", "cause", "duplicate_of", "warehouse_keeps")


class StatusError(Exception):
    """What the user is told (exit 1): a target that names nothing, or names it badly."""


# -- names, URIs and paths ---------------------------------------------------------


def role_prefixes(settings: Settings) -> dict[str, str]:
    return {RAW: settings.raw_prefix, PROCESSED: settings.processed_prefix,
            REJECTS: settings.rejects_prefix, QUARANTINE: settings.quarantine_prefix}


def split_name(name: str, settings: Settings) -> tuple[str | None, str]:
    """(role, key): `processed/yellow/x.parquet` -> (processed, yellow/x.parquet).

    The longest matching prefix wins; (None, name) outside every stage prefix.
    """
    found: tuple[str | None, str] = (None, name)
    best = -1
    for role, prefix in role_prefixes(settings).items():
        if name.startswith(prefix) and len(prefix) > best:
            found, best = (role, name[len(prefix):]), len(prefix)
    found_role, key = found
    if found_role in _OUTPUT_ROLES and key.endswith(_CSV_OUTPUT_ENDINGS):
        key = key.removesuffix(".parquet")  # x.csv.gz.parquet is the output of raw x.csv.gz
    return found_role, key


# The transform's outputs always end in .parquet: a CSV source's name gets it appended
# (taxi_pipeline.objects.output_name), so their family key drops it again.
_OUTPUT_ROLES = (PROCESSED, REJECTS)
_CSV_OUTPUT_ENDINGS = (".csv.parquet", ".gz.parquet")


def _role_name(role: str, prefix: str, key: str) -> str:
    if role in _OUTPUT_ROLES and not key.endswith(".parquet"):
        return prefix + key + ".parquet"
    return prefix + key


def uri_of(store: ObjectStore, name: str) -> str:
    """The URI events name `name` by (percent-encoded for file://, as the bridge makes it)."""
    return ObjectRef(bucket=store.bucket, name=name, generation=0, scheme=store.scheme).uri


@dataclass(frozen=True)
class Family:
    """The objects of every stage that share one key, and their URIs."""

    key: str | None
    names: dict[str, str]
    uris: dict[str, str]

    @classmethod
    def of(cls, name: str, settings: Settings, store: ObjectStore) -> Family:
        role, key = split_name(name, settings)
        if role is None:
            names = {OTHER: name}
            return cls(None, names, {OTHER: uri_of(store, name)})
        names = {r: _role_name(r, prefix, key) for r, prefix in role_prefixes(settings).items()}
        return cls(key, names, {r: uri_of(store, n) for r, n in names.items()})

    @property
    def name(self) -> str:
        """The name the family is shown by: the raw object's (where everything starts)."""
        return self.names.get(RAW) or self.names[OTHER]

    @property
    def main_uri(self) -> str:
        return self.uris.get(RAW) or self.uris[OTHER]

    def role_of(self, uri: str) -> str | None:
        for role, candidate in self.uris.items():
            if candidate == uri:
                return role
        return None


@dataclass(frozen=True)
class Target:
    """What the command-line argument asks for.

    `names`: exact object names to try in order (the literal name first, then
    its percent-decoded form). `search`: a bare file name or the end of a name,
    to be looked up. `prefix`: the board of every object whose name starts with it.
    """

    names: tuple[str, ...] = ()
    search: str | None = None
    prefix: str | None = None


def _check_name(name: str) -> str:
    if any(part in (".", "..") for part in name.split("/")):
        raise StatusError(f"{name!r}: an object name has no '.' or '..' parts")
    return name


def _name_variants(name: str) -> tuple[str, ...]:
    decoded = unquote(name)
    return (name,) if decoded == name else (name, decoded)


def path_to_name(text: str, settings: Settings, store: ObjectStore) -> str:
    """The bucket-relative name of an absolute path inside the local bucket directory.

    The path may go through the configured bucket directory (a symbolic link to
    it, say) or its resolved location; it need not exist (a moved or deleted
    object still has its events).
    """
    if store.scheme != "file":
        raise StatusError(
            f"{text}: an absolute path names a file of the local profile's bucket directory; "
            f"TAXI_PROFILE is {settings.profile!r}, whose objects are in gs://{store.bucket}/. "
            "Give its name (raw/...) or its gs:// URI instead")
    lexical = Path(os.path.normpath(os.path.expanduser(text)))
    root = Path(store.bucket)
    configured = Path(os.path.normpath(os.path.abspath(os.path.expanduser(settings.bucket))))
    for base in (configured, root):
        if lexical == base:
            return ""
        if base in lexical.parents:
            return lexical.relative_to(base).as_posix()
    resolved = lexical.resolve()
    if resolved == root:
        return ""
    if root in resolved.parents:
        return resolved.relative_to(root).as_posix()
    raise StatusError(f"{text} is outside the bucket directory {root} (TAXI_BUCKET); "
                      "give a path inside it, or the object's name (raw/...)")


def parse_target(target: str | None, settings: Settings, store: ObjectStore) -> Target:
    """Turn the argument into exact names, a search, or a board prefix (no I/O but paths)."""
    text = (target or "").strip()
    if not text:
        return Target(prefix="")
    if "://" in text:
        if text.startswith("file://") and store.scheme == "file":
            # A file:// URI is percent-encoded: its decoded path is the one name.
            _, _, path = parse_uri(text)
            name = path_to_name(path, settings, store)
            names: tuple[str, ...] = (name,)
        else:
            try:
                name = store.name_of(text)
            except ValueError as exc:
                raise StatusError(f"{exc}; this profile's objects are "
                                  f"{uri_of(store, 'raw/...')}") from None
            names = _name_variants(name)
        if text.endswith("/"):
            return Target(prefix=_check_name(name.rstrip("/") + "/" if name else ""))
        return Target(names=tuple(_check_name(n) for n in names))
    if text.startswith(("/", "~")):
        name = path_to_name(text, settings, store)
        if not name or text.endswith("/") or (Path(store.bucket) / name).is_dir():
            return Target(prefix=_check_name(name + "/" if name else ""))
        return Target(names=(_check_name(name),))
    name = _check_name(text)
    if name.endswith("/") or name + "/" in role_prefixes(settings).values():
        return Target(prefix=name.rstrip("/") + "/")
    role, _ = split_name(name, settings)
    if role is None:
        return Target(search=name)
    return Target(names=_name_variants(name))


# -- what the warehouse says ---------------------------------------------------------


@dataclass(frozen=True)
class LoadRecord:
    """One row of the warehouse's load log."""

    source_uri: str
    source_generation: int
    object_uri: str
    rows: int
    loaded_at: datetime | None


def _aware(value: Any) -> datetime | None:
    if not isinstance(value, datetime):
        return None
    return value if value.tzinfo else value.replace(tzinfo=UTC)


def load_log(warehouse: Warehouse, table: str | tuple[str, ...]) -> dict[str, LoadRecord]:
    """The newest load of each source URI into `table` (or any of several: one per dataset)."""
    wanted = (table,) if isinstance(table, str) else table
    found: dict[str, LoadRecord] = {}
    for row in warehouse.loads():
        if row.get("table_name") not in wanted:
            continue
        record = LoadRecord(str(row["source_uri"]), int(str(row["source_generation"])),
                            str(row.get("object_uri") or ""), int(str(row["rows"])),
                            _aware(row.get("loaded_at")))
        known = found.get(record.source_uri)
        if known is None or record.source_generation > known.source_generation:
            found[record.source_uri] = record
    return found


def load_of(family: Family, loads: dict[str, LoadRecord]) -> LoadRecord | None:
    """The family's load: by its raw URI (the rows' source_uri), else by its processed URI."""
    if family.main_uri in loads:
        return loads[family.main_uri]
    processed = family.uris.get(PROCESSED)
    return next((r for r in loads.values() if processed and r.object_uri == processed), None)


# -- classification (no I/O) ---------------------------------------------------------


def generation_of(event: Event) -> int | None:
    try:
        return int(event.resource.get(events.LABEL_GENERATION) or "")
    except ValueError:
        return None


def _parse_time(value: Any) -> datetime | None:
    if isinstance(value, str):
        try:
            return _aware(datetime.fromisoformat(value))
        except ValueError:
            return None
    return None


def short_text(text: str, limit: int = 160) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def failure_reason(event: Event) -> str:
    """Why this failure event happened, in one line."""
    payload = event.payload
    if event.event == events.RECOVERY_EXHAUSTED:
        return short_text(str(payload.get("message") or payload.get("cause") or "recovery gave up"))
    if event.event == events.NOTIFICATION_REJECTED:
        return short_text(f"not announced ({payload.get('why')}): {payload.get('detail', '')}")
    step = event.event.removeprefix("pipeline.").removesuffix(".failed")
    return short_text(f"{step} failed: {payload.get('error') or payload.get('reason') or '?'}")


@dataclass
class Row:
    """One object family on the board: the last stage reached, and the facts behind it."""

    name: str
    uri: str
    stage: str
    generation: int | None = None
    rows: int | None = None
    landed_at: datetime | None = None
    loaded_at: datetime | None = None
    reason: str | None = None
    note: str | None = None
    loaded_generation: int | None = None
    in_bucket: dict[str, int] = field(default_factory=dict)
    why_stalled: str | None = None

    @property
    def seconds_to_load(self) -> float | None:
        if self.stage != LOADED or not self.landed_at or not self.loaded_at:
            return None
        return max(0.0, (self.loaded_at - self.landed_at).total_seconds())

    def add_note(self, text: str) -> None:
        self.note = f"{self.note}; {text}" if self.note else text

    def as_json(self) -> dict[str, Any]:
        return {
            "object": self.name, "uri": self.uri, "stage": self.stage,
            "generation": self.generation, "rows": self.rows,
            "landed_at": self.landed_at.isoformat() if self.landed_at else None,
            "loaded_at": self.loaded_at.isoformat() if self.loaded_at else None,
            "seconds_to_load": self.seconds_to_load, "reason": self.reason, "note": self.note,
            "loaded_generation": self.loaded_generation, "in_bucket": self.in_bucket,
            **({"why_stalled": self.why_stalled} if self.why_stalled else {}),
        }


def classify(family: Family, refs: dict[str, ObjectRef], found: Iterable[Event],
             load: LoadRecord | None, *, now: datetime, older_than: timedelta,
             queued: bool = False) -> Row:
    """Where the family's current raw generation got to, from its objects, events and load.

    - loaded: the load log holds this generation (or a newer one);
    - quarantined: a quarantine event for this generation, or its quarantined copy
      is newer than any raw object;
    - duplicate: the transform skipped it as a copy of an earlier raw object;
    - failed: its newest transform/load/recovery event is a failure (or the
      bridge could not announce the file);
    - stalled: none of those, in the bucket, quiet for `older_than` and nothing
      queued for it, so `reconcile` would re-emit it;
    - otherwise transformed or landed: on its way.
    """
    from taxi_pipeline.ops.reconcile import why_in_flight

    main_uri = family.main_uri
    history = sorted((e for e in found if family.role_of(e.resource.id)),
                     key=lambda e: e.occurred)
    raw_events = [e for e in history if e.resource.id == main_uri]
    raw = refs.get(RAW) or refs.get(OTHER)
    generations = [g for g in map(generation_of, raw_events) if g is not None]
    if load is not None:
        generations.append(load.source_generation)
    generation = raw.generation if raw else max(generations, default=None)
    current = [e for e in raw_events
               if generation is None or generation_of(e) in (generation, None)]
    landed_at = raw.created if raw and raw.created else None
    if landed_at is None:
        landed_at = next((_parse_time(e.payload.get("created")) for e in current
                          if e.event == events.OBJECT_FINALIZED and e.payload.get("created")),
                         None) or (current[0].occurred if current else None)
    anchor = current[0].occurred if current else landed_at
    relevant = sorted(current + [e for e in history if e.resource.id != main_uri
                                 and (anchor is None or e.occurred >= anchor)],
                      key=lambda e: e.occurred)
    row = Row(family.name, main_uri, LANDED, generation=generation, landed_at=landed_at,
              in_bucket={role: ref.generation for role, ref in refs.items()})
    if load is not None:
        row.loaded_generation = load.source_generation

    if load is not None and (generation is None or load.source_generation >= generation):
        row.stage, row.rows, row.loaded_at = LOADED, load.rows, load.loaded_at
        if raw is None and RAW in family.names:
            row.add_note("the raw object is no longer in the bucket")
        return row
    if load is not None:
        row.add_note(f"the warehouse holds generation {load.source_generation} "
                     f"({load.rows:,} rows)")

    quarantined = [e for e in current if e.event == events.OBJECT_QUARANTINED]
    moved = refs.get(QUARANTINE)
    if quarantined or (moved is not None and (
            raw is None or (moved.updated and raw.updated and moved.updated >= raw.updated))):
        row.stage = QUARANTINED
        if quarantined:
            payload = quarantined[-1].payload
            row.reason = short_text(f"{payload.get('reason', '?')}: {payload.get('detail', '')}")
        else:
            row.reason = f"in {family.names.get(QUARANTINE)} (no stored event says why)"
        return row

    duplicate = [e for e in current if e.event == events.OBJECT_DUPLICATE_CONTENT]
    if duplicate and raw is not None and not any(
            e.event == events.TRANSFORM_COMPLETED and e.occurred > duplicate[-1].occurred
            for e in current):
        row.stage = DUPLICATE
        row.reason = short_text(f"same bytes as {duplicate[-1].payload.get('duplicate_of', '?')}, "
                            "which is loaded instead")
        return row

    significant = [e for e in relevant if e.event in _FAILURES | _PROGRESS]
    failures = [e for e in significant if e.event in _FAILURES]
    newest = significant[-1] if significant else None
    if newest is not None and newest.event in _FAILURES:
        row.stage, row.reason = FAILED, failure_reason(newest)
        return row
    if newest is not None and newest.event == events.RECOVERY_ATTEMPTED and failures:
        row.stage, row.reason = FAILED, failure_reason(failures[-1])
        row.add_note(f"automatic re-run {newest.payload.get('attempt', '?')} is on its way")
        return row

    reached = TRANSFORMED if any(e.event == events.TRANSFORM_COMPLETED for e in current) \
        else LANDED
    row.stage = reached
    if raw is None:
        row.add_note("no longer in the bucket")
        return row
    latest: dict[str, Event] = {}
    for event in relevant:
        latest[event.resource.id] = event
    age = now - (raw.created or raw.updated or now)
    why = why_in_flight(list(latest.values()), older_than, now)
    if why is None and queued:
        why = "a transform or load run for it is queued or running"
    if why is None and age >= older_than:
        row.stage = STALLED
        quiet = now - max([e.occurred for e in relevant], default=raw.updated or now)
        row.reason = (f"{reached}, then nothing for {duration_text(quiet.total_seconds())}; "
                      "`taxi-pipeline reconcile` re-emits it")
    elif why:
        row.add_note(f"on its way: {why}")
    return row


# The local bridge's report of the files it holds back (pubsub_bridge.directory_source
# writes it, refreshed every 10 s); older than this, its bridge is not running.
HELD_FILE = "bridge-held.json"
HELD_STALE = timedelta(seconds=30)


def held_files(settings: Settings, now: datetime) -> dict[str, datetime]:
    """Raw files the running local bridge holds back (a writer still has them open, or
    their end marker has not arrived), with when it first saw them; {} otherwise."""
    if settings.profile != "local":
        return {}
    try:
        report = json.loads((settings.home / HELD_FILE).read_text())
        written = datetime.fromtimestamp(float(report["written"]), UTC)
        held = {str(name): datetime.fromtimestamp(float(since), UTC)
                for name, since in report["held"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}
    return held if now - written <= HELD_STALE else {}


def mark_held(row: Row, family: Family, held: dict[str, datetime], now: datetime) -> Row:
    """A row whose raw file the bridge holds back: landed and waiting, never stalled."""
    since = held.get(family.names.get(RAW, family.name))
    if since is None or row.stage not in (LANDED, STALLED):
        return row
    row.stage = LANDED
    row.reason = (f"waiting for the writer to finish, "
                  f"{duration_text(max(0.0, (now - since).total_seconds()))}")
    return row


def duration_text(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f}s"
    if seconds < 3600:
        return f"{seconds / 60:.1f}min"
    if seconds < 86400:
        return f"{seconds / 3600:.1f}h"
    return f"{seconds / 86400:.1f}d"


# -- reading the bucket, the events and the load log -------------------------------


@dataclass
class Context:
    settings: Settings
    store: ObjectStore
    warehouse: Warehouse
    now: datetime
    older_than: timedelta
    problems: list[str] = field(default_factory=list)
    # No Prefect server to ask (none running, none configured): the bucket and the
    # load log still answer, and the events are simply not read.
    offline: bool = False
    # Raw files the local bridge holds back (still being written): name -> since when.
    held: dict[str, datetime] = field(default_factory=dict)

    @property
    def since(self) -> datetime:
        return self.now - LOOKBACK

    def name_of(self, uri: str) -> str | None:
        try:
            return self.store.name_of(uri)
        except ValueError:
            return None

    def refs(self, family: Family) -> dict[str, ObjectRef]:
        found: dict[str, ObjectRef] = {}
        for role, name in family.names.items():
            try:
                found[role] = self.store.ref(name)
            except (ObjectNotFound, ValueError):
                continue
        return found

    def loads(self) -> dict[str, LoadRecord]:
        return load_log(self.warehouse, tuple(tables(self.settings.table).values()))


async def _read_all(filter_: Any) -> list[Event]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        page = await client.read_events(filter=filter_, limit=READ_BATCH)
        found: list[Event] = list(page.events)
        while page.next_page:
            page = await client.read_events_page(str(page.next_page))
            found += page.events
    return found


def _window(ctx: Context) -> Any:
    from prefect.events.filters import EventOccurredFilter

    window: dict[str, Any] = {"since": ctx.since, "until": ctx.now + timedelta(minutes=5)}
    return EventOccurredFilter(**window)


async def _guarded(ctx: Context, what: Any) -> list[Event]:
    """Events, or none and a problem noted: the bucket and warehouse still answer."""
    from prefect.settings import PREFECT_API_URL

    if ctx.offline:
        what.close()
        return []
    try:
        return list(await what)
    except Exception as exc:  # an unreachable or failing API must not end in a traceback
        ctx.problems.append(f"cannot read events from the Prefect API at "
                            f"{PREFECT_API_URL.value()}: {type(exc).__name__}: {exc}")
        return []


async def events_about(ctx: Context, uris: list[str]) -> list[Event]:
    """Every stored event whose resource is one of `uris` (EventDelivery.about)."""
    from taxi_pipeline.event_delivery import EventDelivery

    async def read() -> list[Event]:
        async with EventDelivery() as delivery:
            return await delivery.about(uris, ctx.since)

    return await _guarded(ctx, read())


async def events_under(ctx: Context, uri_prefixes: list[str]) -> list[Event]:
    """Every stored event whose resource URI starts with one of `uri_prefixes`."""
    from prefect.events.filters import EventFilter, EventOrder, EventResourceFilter

    found = await _guarded(ctx, _read_all(EventFilter(
        resource=EventResourceFilter(id_prefix=uri_prefixes), occurred=_window(ctx),
        order=EventOrder.ASC)))
    # The server matches prefixes with LIKE, where a percent-encoded URI's `%` is a
    # wildcard: keep only true prefixes.
    return [e for e in found if e.resource.id.startswith(tuple(uri_prefixes))]


async def events_named(ctx: Context, basenames: list[str]) -> list[Event]:
    """Every stored event about an object whose file name is one of `basenames`."""
    from prefect.events.filters import EventFilter, EventOrder, EventResourceFilter
    from prefect.events.schemas.events import ResourceSpecification

    return await _guarded(ctx, _read_all(EventFilter(
        resource=EventResourceFilter(labels=ResourceSpecification(
            {"prefect.resource.name": basenames})),
        occurred=_window(ctx), order=EventOrder.ASC)))


async def queued_uris(ctx: Context) -> set[str]:
    from taxi_pipeline.ops.reconcile import active_objects

    if ctx.offline:
        return set()

    try:
        return await active_objects(["transform", "load"])
    except Exception as exc:
        ctx.problems.append(f"cannot read queued flow runs: {type(exc).__name__}: {exc}")
        return set()


@dataclass
class Story:
    """Everything known about one family."""

    family: Family
    refs: dict[str, ObjectRef]
    events: list[Event]
    load: LoadRecord | None

    @property
    def known(self) -> bool:
        return bool(self.refs or self.events or self.load)


async def story_of(ctx: Context, name: str, loads: dict[str, LoadRecord]) -> Story:
    family = Family.of(name, ctx.settings, ctx.store)
    found = await events_about(ctx, list(family.uris.values()))
    return Story(family, ctx.refs(family), found, load_of(family, loads))


async def search(ctx: Context, fragment: str, loads: dict[str, LoadRecord]) -> list[str]:
    """Family names whose object name ends with `fragment` (a file name, or a path's end)."""
    variants = _name_variants(fragment)
    settings = ctx.settings

    def matches(name: str | None) -> bool:
        return name is not None and any(name == v or name.endswith("/" + v) for v in variants)

    names: set[str] = set()
    for role in (RAW, PROCESSED, QUARANTINE):
        prefix = role_prefixes(settings)[role]
        names.update(ref.name for ref in ctx.store.list(prefix) if matches(ref.name))
    basenames = sorted({v.rsplit("/", 1)[-1] for v in variants})
    for event in await events_named(ctx, basenames):
        name = ctx.name_of(event.resource.id)
        if name is not None and matches(name):
            names.add(name)
    for record in loads.values():
        name = ctx.name_of(record.source_uri)
        if name is not None and matches(name):
            names.add(name)
    return sorted({Family.of(n, settings, ctx.store).name for n in names})


async def board(ctx: Context, prefix: str, loads: dict[str, LoadRecord]) -> list[Row]:
    """One row per family whose key starts with `prefix`'s key."""
    settings, store = ctx.settings, ctx.store
    role, key_prefix = split_name(prefix, settings)
    if role is None and prefix:
        # `yellow/` means the same as `raw/yellow/`: every stage of those objects.
        key_prefix = prefix
    roles = (RAW, PROCESSED, QUARANTINE)
    prefixes = role_prefixes(settings)
    families: dict[str, Family] = {}
    refs: dict[str, dict[str, ObjectRef]] = {}

    def add(name: str | None) -> Family | None:
        if name is None:
            return None
        role_, key = split_name(name, settings)
        if role_ is None or not key.startswith(key_prefix):
            return None
        family = families.get(key) or Family.of(name, settings, store)
        families[key] = family
        return family

    for role_ in roles:
        for ref in store.list(prefixes[role_] + key_prefix):
            family = add(ref.name)
            if family is not None and family.key is not None:
                refs.setdefault(family.key, {})[role_] = ref
    found = await events_under(ctx, [uri_of(store, prefixes[r] + key_prefix) for r in roles])
    for event in found:
        add(ctx.name_of(event.resource.id))
    for record in loads.values():
        add(ctx.name_of(record.source_uri))
    by_family: dict[str, list[Event]] = {}
    uri_to_key = {uri: key for key, f in families.items() for uri in f.uris.values()}
    for event in found:
        if (key := uri_to_key.get(event.resource.id)) is not None:
            by_family.setdefault(key, []).append(event)
    ordered = sorted(families.items(), key=lambda item: item[1].name)

    def row_of(key: str, family: Family, queued: bool = False) -> Row:
        row = classify(family, refs.get(key, {}), by_family.get(key, []),
                       load_of(family, loads), now=ctx.now, older_than=ctx.older_than,
                       queued=queued)
        return mark_held(row, family, ctx.held, ctx.now)

    rows = [row_of(key, family) for key, family in ordered]
    # A row about to be called stalled gets a second look: a queued run means on its way.
    if any(r.stage == STALLED for r in rows):
        queued = await queued_uris(ctx)
        rows = [row_of(key, family, queued=True)
                if row.stage == STALLED and queued.intersection(family.uris.values()) else row
                for row, (key, family) in zip(rows, ordered, strict=True)]
    return rows


def stalled_rows(ctx: Context, rows: list[Row]) -> list[Row]:
    """The board's rows that `reconcile` finds stalled: landed, never loaded or quarantined."""
    from taxi_pipeline.ops.reconcile import find_stalled

    by_uri = {row.uri: row for row in rows}
    found: list[Row] = []
    for item in find_stalled(ctx.store, ctx.warehouse, ctx.settings, ctx.older_than, ctx.now):
        row = by_uri.get(item.obj.uri)
        if item.obj.name in ctx.held:
            continue  # still being written: not stalled, and reconcile must not hurry it
        if row is not None:
            row.why_stalled = item.why
            found.append(row)
    return found
