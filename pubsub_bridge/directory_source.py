"""The local profile's notification source: a watched bucket directory.

Polling, not inotify: a file is only ready once its size and change time have
held still for `settle_seconds` (a slow copy keeps changing), and a .parquet
file additionally once its footer magic is present, a .csv.gz once its gzip
stream inflates to its trailer (a plain .csv has no end marker: settling
decides). A file whose first bytes rule out the format its name promises is
not waited for past the settle time: it can never become whole. Polling sees both without
tracking write events, and works on every OS and on network mounts. A .parquet
file that already has its footer and that no process holds open for writing
is finished: it is announced at once, without the settle wait (every transform
output, and a copy that has completed by the next poll).

A file without a footer is never announced while a process holds it open for
writing (seen in /proc, see `OpenForWriting`): a writer that pauses is not a
truncated file. Only a .parquet file that has stopped changing, that no
process the bridge can see holds open for writing, and that still has no
footer after `stall_seconds` is announced (the transform then quarantines it
as truncated). Where /proc cannot be read, the stall timer alone decides.
Whatever the path, a file is announced only if its generation is still the
listed one after every check: a writer finishing mid-check waits a poll.

What can never be announced (a symlink, a directory named *.parquet, a FIFO,
a name that is not UTF-8, a file that cannot be read or that vanishes before it
is read) is logged once and handed to the relay as a
`pipeline.notification.rejected` event; the bridge goes on with other files.
One bad path never stops the loop.

Confirmed (name, generation) pairs and reported rejections are kept in a state
file, so a restarted bridge neither announces the whole bucket again nor
reports the same rejection again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from prefect.events import Event

from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline import events
from taxi_pipeline.lineage import lineage_of
from taxi_pipeline.objects import ObjectRef, dataset_of, stage_of
from taxi_pipeline.storage.base import ObjectNotFound
from taxi_pipeline.storage.local import (
    NOT_A_FILE,
    UNREADABLE,
    LocalStore,
    NotAnObject,
    NotARegularFile,
    cannot_become_complete,
    gzip_complete,
    has_parquet_footer,
    printable_name,
)

# What each format with an end marker lacks while it is being written.
_END_MARKERS = {"parquet": "a parquet footer", "gzip": "the end of its gzip stream"}


def format_of(name: str) -> str:
    """`parquet`, `gzip` (.csv.gz) or `text` (plain CSV and anything else) by the name."""
    lower = name.lower()
    return "parquet" if lower.endswith(".parquet") else "gzip" if lower.endswith(".gz") \
        else "text"


def whole_format(path: Path, name: str) -> bool | None:
    """Whether the file has its format's end marker (parquet footer, a gzip stream
    inflated to its trailer); None for a format without one (plain CSV): only settling
    tells. Raises OSError when the file cannot be read."""
    kind = format_of(name)
    if kind == "parquet":
        return has_parquet_footer(path, strict=True)
    if kind == "gzip":
        return gzip_complete(path, strict=True)
    return None

__all__ = ["VANISHED", "DirectorySource", "OpenForWriting", "has_parquet_footer",
           "rejected_event"]

log = logging.getLogger(__name__)

VANISHED = "vanished"
ERROR = "error"  # an unexpected exception while reading one file: reported, not fatal

_WRITE_MODES = (os.O_WRONLY, os.O_RDWR)


class OpenForWriting:
    """Which files under a directory some process holds open for writing (Linux /proc).

    For each `/proc/<pid>/fd/<n>` whose link points below `root`, the access
    mode in `/proc/<pid>/fdinfo/<n>` (`flags:`, octal) tells O_WRONLY/O_RDWR
    from O_RDONLY, so readers (the transform, a `cat`) never hold a file back.

    `snapshot` reads /proc once (a few milliseconds for a few hundred
    processes); the source calls it at most once per poll, and only when a
    file past its settle time lacks a footer. It returns None where /proc is
    missing or unreadable: then nobody is known to write, and the stall timer
    alone decides. Processes the bridge may not inspect (another user's, when
    the bridge is not root; a writer on another host of a network mount) are
    not seen either; for them, too, only the stall timer protects.
    """

    def __init__(self, root: Path, proc: Path = Path("/proc")) -> None:
        self.prefix = str(root).rstrip("/") + "/"
        self.proc = proc
        self._warned = False

    def snapshot(self) -> dict[str, set[int]] | None:
        """Path -> pids holding it open for writing, or None when /proc cannot be read."""
        try:
            pids = [p for p in os.listdir(self.proc) if p.isdigit()]
        except OSError as exc:
            if not self._warned:
                log.warning("cannot read %s (%s): files still open for writing are recognised "
                            "by TAXI_STALL_SECONDS only", self.proc, exc)
                self._warned = True
            return None
        writers: dict[str, set[int]] = {}
        for pid in pids:
            fd_dir = f"{self.proc}/{pid}/fd"
            try:
                fds = os.listdir(fd_dir)
            except OSError:  # exited, or not ours to inspect
                continue
            for fd in fds:
                try:
                    target = os.readlink(f"{fd_dir}/{fd}")
                except OSError:
                    continue
                if target.startswith(self.prefix) and self._writes(pid, fd):
                    writers.setdefault(target, set()).add(int(pid))
        return writers

    def _writes(self, pid: str, fd: str) -> bool:
        try:
            with open(f"{self.proc}/{pid}/fdinfo/{fd}") as info:
                for line in info:
                    if line.startswith("flags:"):
                        return int(line.split()[1], 8) & os.O_ACCMODE in _WRITE_MODES
        except (OSError, ValueError, IndexError):  # closed meanwhile: not a writer any more
            return False
        return False


# Beside the bridge's state file: the files held back, for `taxi-pipeline status`.
HELD_FILE = "bridge-held.json"
HELD_REFRESH = 10.0


@dataclass
class _Watch:
    size: int
    generation: int
    stable_since: float
    held_logged: bool = False


def _failure(ref: ObjectRef, uri: str, exc: Exception) -> NotAnObject:
    """Why reading a listed file failed, as a rejection of that generation."""
    if isinstance(exc, FileNotFoundError | ObjectNotFound):
        why, detail = VANISHED, "it vanished between listing and reading; nothing was announced"
    elif isinstance(exc, NotARegularFile):
        why, detail = NOT_A_FILE, str(exc)
    elif isinstance(exc, OSError):
        why, detail = UNREADABLE, f"the bridge cannot read it: {exc.strerror or exc}"
    else:
        why, detail = ERROR, f"{type(exc).__name__}: {exc}"
    return NotAnObject(ref.name, uri, why, detail, ref.generation)


def rejected_event(rejection: NotAnObject, bucket: str, prefixes: dict[str, str]) -> Event:
    """`pipeline.notification.rejected` about one path in the bucket directory.

    The resource is the path's file:// URI with the usual object labels (so
    `taxi-pipeline status` and event filters find it like any object); the id
    is deterministic per (path, reason, generation), so a restarted bridge
    reporting it again is stored once.
    """
    name = printable_name(rejection.name)
    resource = {
        "prefect.resource.id": rejection.uri,
        "prefect.resource.name": name.rsplit("/", 1)[-1],
        events.LABEL_BUCKET: bucket,
        events.LABEL_OBJECT: name,
        events.LABEL_STAGE: stage_of(name, prefixes),
        events.LABEL_DATASET: dataset_of(name),
    }
    generation = "" if rejection.generation is None else str(rejection.generation)
    if generation:
        resource[events.LABEL_GENERATION] = generation
    return events.notification_rejected(
        resource, rejection.why, rejection.detail,
        key=f"{rejection.uri}\x00{rejection.why}\x00{generation}")


Token = tuple[str, int | None]  # (why, generation): one rejection of one path


class DirectorySource:
    def __init__(
        self,
        store: LocalStore,
        prefixes: list[str],
        state_path: Path,
        metrics: BridgeMetrics,
        settle_seconds: float = 1.0,
        stall_seconds: float = 120.0,
        writers: OpenForWriting | None = None,
        lineage_prefixes: tuple[str, ...] = (),
    ) -> None:
        self.store = store
        self.prefixes = prefixes
        # Objects under these prefixes (the processed one) are announced with the
        # lineage in their parquet footer: the raw object they were made from.
        self.lineage_prefixes = lineage_prefixes
        self.state_path = state_path
        self.metrics = metrics
        self.settle = settle_seconds
        self.stall = stall_seconds
        self.writers = writers or OpenForWriting(store.root)
        self.done: dict[str, int] = {}
        self.reported: dict[str, Token] = {}  # rejections confirmed stored
        self._load_state()
        self.watching: dict[str, _Watch] = {}
        self.in_flight: dict[str, int] = {}
        self.rejecting: dict[str, NotAnObject] = {}  # rejections queued or in flight
        self._queue: list[NotAnObject] = []
        self._logged: set[tuple[str, Token]] = set()
        self._listing_errors: dict[str, str] = {}
        self._open: dict[str, set[int]] | None = None
        self._open_read = False
        self._dirty = False
        # What `taxi-pipeline status` shows as held: name -> when first seen (epoch s).
        self.held_path = state_path.with_name(HELD_FILE)
        self.first_seen: dict[str, float] = {}
        self._held_written: tuple[dict[str, float], float] = ({}, 0.0)

    def _load_state(self) -> None:
        try:
            data = json.loads(self.state_path.read_text())
            self.done = {str(k): int(v) for k, v in data.get("confirmed", {}).items()}
            self.reported = {str(k): (str(v[0]), None if v[1] is None else int(v[1]))
                             for k, v in data.get("rejected", {}).items()}
        except FileNotFoundError:
            pass
        except (ValueError, AttributeError, TypeError, IndexError, KeyError) as exc:
            log.warning("state file %s is unreadable (%s); starting afresh", self.state_path, exc)
            self.done, self.reported = {}, {}

    def report_held(self, wall: float | None = None) -> None:
        """Write the files the bridge is holding back (still being written, or waiting
        for their end marker) for `status`, when that changed or every HELD_REFRESH s,
        so a report from a bridge that died goes stale and is ignored."""
        wall = time.time() if wall is None else wall
        for name in self.watching:
            self.first_seen.setdefault(name, wall)
        for name in [n for n in self.first_seen if n not in self.watching]:
            del self.first_seen[name]
        held, written_at = self._held_written
        if held == self.first_seen and wall - written_at < HELD_REFRESH:
            return
        self.held_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.held_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"written": wall, "held": self.first_seen}, sort_keys=True))
        os.replace(tmp, self.held_path)
        self._held_written = (dict(self.first_seen), wall)

    def flush(self) -> None:
        """Write the confirmed set if it changed (atomically: temp file + rename)."""
        self.report_held()
        if not self._dirty:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        state = {"confirmed": self.done,
                 "rejected": {k: list(v) for k, v in self.reported.items()}}
        tmp.write_text(json.dumps(state, indent=0, sort_keys=True))
        os.replace(tmp, self.state_path)
        self._dirty = False

    # -- scanning ----------------------------------------------------------------------

    def scan(self, now: float | None = None) -> list[ObjectRef]:
        """Objects that are complete, new, and not already announced or in flight.

        Paths that can never be announced are queued for `rejections()`.
        """
        now = time.monotonic() if now is None else now
        ready: list[ObjectRef] = []
        seen: set[str] = set()
        complete = True
        self._open_read = False  # one /proc snapshot per poll, taken when first needed
        for prefix in self.prefixes:
            try:
                for entry in self.store.entries(prefix):
                    seen.add(entry.name)
                    if isinstance(entry, NotAnObject):
                        self.watching.pop(entry.name, None)
                        self._reject(entry)
                        continue
                    ref = self._consider(entry, now)
                    if ref is not None:
                        ready.append(ref)
                self._listing_errors.pop(prefix, None)
            except Exception as exc:  # a listing that breaks off must not stop the bridge
                complete = False
                message = f"{type(exc).__name__}: {exc}"
                if self._listing_errors.get(prefix) != message:
                    log.exception("listing prefix=%s failed; trying again next poll", prefix)
                    self._listing_errors[prefix] = message
        if complete:  # a partial listing says nothing about what is gone
            self._forget_missing(seen)
        return ready

    def _consider(self, ref: ObjectRef, now: float) -> ObjectRef | None:
        """`ref` with its md5 when it is ready to announce now, else None."""
        if self.done.get(ref.name) == ref.generation:
            return None
        if self.in_flight.get(ref.name) == ref.generation:
            return None
        known = self._known(ref.name)
        if known is not None and known[1] == ref.generation:
            return None  # this generation was rejected (unreadable, ...): reported once
        size = ref.size or 0
        watch = self.watching.get(ref.name)
        if watch is None or (watch.size, watch.generation) != (size, ref.generation):
            watch = self.watching[ref.name] = _Watch(size, ref.generation, now)
        quiet = now - watch.stable_since
        finished = self._finished(ref)
        if quiet < self.settle and not finished:
            return None
        try:
            if not finished and not self._complete(ref, watch, quiet):
                return None
            ref = dataclasses.replace(ref, md5_hash=self.store.md5(ref.name))
            ref = self._with_lineage(ref)
            # The listing's stat, the footer check and the /proc snapshot are
            # moments apart: a writer finishing between them makes the listed
            # generation look finished, or abandoned without a footer. Announce only
            # what is still the listed generation; the next poll sees the new one.
            if self._changed_since_listed(ref):
                del self.watching[ref.name]
                return None
        except Exception as exc:
            del self.watching[ref.name]
            self._reject(_failure(ref, ref.uri, exc), exc)
            return None
        del self.watching[ref.name]
        self.in_flight[ref.name] = ref.generation
        self.metrics.received.inc()
        return ref

    def _changed_since_listed(self, ref: ObjectRef) -> bool:
        current = self.store.ref(ref.name)
        if (current.generation, current.size) == (ref.generation, ref.size):
            return False
        log.info("changed uri=%s generation=%d -> %d while it was checked; the next poll "
                 "takes the new generation", ref.uri, ref.generation, current.generation)
        return True

    def _with_lineage(self, ref: ObjectRef) -> ObjectRef:
        """`ref` with the footer's lineage in `extra`; unchanged when there is none.

        Reads the footer only, and never fails the announcement: an unreadable
        footer announces the object without links (the load will say why).
        """
        if not (self.lineage_prefixes and ref.name.startswith(self.lineage_prefixes)
                and ref.name.endswith(".parquet")):
            return ref
        try:
            found = lineage_of(pq.read_metadata(self.store.root / ref.name).metadata)
        except (OSError, pa.ArrowException) as exc:
            log.info("no lineage for uri=%s: %s", ref.uri, exc)
            return ref
        return dataclasses.replace(ref, extra={**ref.extra, **found}) if found else ref

    def _finished(self, ref: ObjectRef) -> bool:
        """A parquet file with its footer that no process holds open for writing.

        Such a file is complete now: waiting for it to settle would only add
        `settle_seconds` to every hop (the transform's outputs appear by an
        atomic rename, finished). Where /proc cannot be read nobody is known to
        write, so the settle wait stays the rule there.
        """
        if not ref.name.endswith(".parquet"):
            return False
        path = self.store.root / ref.name
        try:
            if not has_parquet_footer(path, strict=True):
                return False
        except OSError:
            return False  # `_complete` reports what cannot be read, after the settle wait
        writers = self._snapshot()
        return writers is not None and str(path) not in writers

    def _complete(self, ref: ObjectRef, watch: _Watch, quiet: float) -> bool:
        """Settled; is it finished? Raises OSError when the file cannot be read.

        A format with an end marker (parquet's footer, gzip's trailer: `whole_format`)
        waits for it up to `stall_seconds`, unless its first bytes already rule the
        format out (it can never become whole: announced now, and quarantined). A plain
        CSV has no end marker: settling (and no writer) is all there is.
        """
        path = self.store.root / ref.name
        whole = whole_format(path, ref.name)
        if whole:
            return True
        marker = _END_MARKERS.get(format_of(ref.name), "")
        if whole is False and quiet < self.stall and not cannot_become_complete(path, ref.name):
            return False  # still being written, or truncated: wait for the stall limit
        holders = self._writers_of(path)
        if holders:
            if not watch.held_logged:
                log.info("waiting uri=%s generation=%d: unchanged for %.0fs%s but open for "
                         "writing by pid %s; announced once it is closed", ref.uri,
                         ref.generation, quiet, f" without {marker}" if whole is False else "",
                         ",".join(map(str, sorted(holders))))
                watch.held_logged = True
            return False
        if whole is False:
            log.warning("announcing uri=%s generation=%d without %s: unchanged for %.0fs and "
                        "open for writing by no process the bridge can see (it will be "
                        "quarantined)", ref.uri, ref.generation, marker, quiet)
        return True

    def _snapshot(self) -> dict[str, set[int]] | None:
        """This poll's /proc snapshot (path -> writing pids), read once when first needed."""
        if not self._open_read:
            self._open = self.writers.snapshot()
            self._open_read = True
        return self._open

    def _writers_of(self, path: Path) -> set[int]:
        return (self._snapshot() or {}).get(str(path), set())

    def _forget_missing(self, seen: set[str]) -> None:
        for name in [n for n in self.watching if n not in seen]:
            watch = self.watching.pop(name)
            self._reject(NotAnObject(
                name, Path(self.store.root, name).as_uri(), VANISHED,
                "it vanished after the bridge listed it and before it was complete; nothing "
                "was announced", watch.generation))
        gone = [n for n in self.done if n not in seen]
        gone_rejected = [n for n in self.reported if n not in seen]
        for name in gone:
            del self.done[name]
        for name in gone_rejected:
            del self.reported[name]
        if gone or gone_rejected:
            self._dirty = True
        self._logged = {item for item in self._logged
                        if item[0] in seen or item[0] in self.rejecting}

    # -- rejections ----------------------------------------------------------------------

    def _known(self, name: str) -> Token | None:
        pending = self.rejecting.get(name)
        if pending is not None:
            return (pending.why, pending.generation)
        return self.reported.get(name)

    def _reject(self, rejection: NotAnObject, exc: Exception | None = None) -> None:
        """Queue a rejection for the relay, once per (path, reason, generation)."""
        token: Token = (rejection.why, rejection.generation)
        if self._known(rejection.name) == token:
            return
        if (rejection.name, token) not in self._logged:
            self._logged.add((rejection.name, token))
            self.metrics.rejected.labels(why=rejection.why).inc()
            log.warning("rejected uri=%s why=%s generation=%s: %s", rejection.uri, rejection.why,
                        rejection.generation, rejection.detail,
                        exc_info=exc if rejection.why == ERROR else None)
        self.rejecting[rejection.name] = rejection
        self._queue.append(rejection)

    def rejections(self) -> list[NotAnObject]:
        """Rejections to hand to the relay now (new ones, and nacked ones again)."""
        queued, self._queue = self._queue, []
        current = [r for r in queued if self.rejecting.get(r.name) is r]
        self.metrics.received.inc(len(current))
        return current

    def ack_rejection(self, rejection: NotAnObject) -> None:
        """Its event is stored: remember it was reported (across restarts too)."""
        pending = self.rejecting.get(rejection.name)
        if pending is not None and pending is not rejection:
            return  # superseded by a newer rejection of the same path, still in flight
        self.rejecting.pop(rejection.name, None)
        self.reported[rejection.name] = (rejection.why, rejection.generation)
        self._dirty = True

    def nack_rejection(self, rejection: NotAnObject) -> None:
        """Not stored (the server is unreachable): report it again next poll."""
        if self.rejecting.get(rejection.name) is rejection:
            self._queue.append(rejection)

    # -- announcements -------------------------------------------------------------------

    def ack(self, ref: ObjectRef) -> None:
        self.done[ref.name] = ref.generation
        if self.in_flight.get(ref.name) == ref.generation:
            del self.in_flight[ref.name]
        self.reported.pop(ref.name, None)  # an older rejection of this name is history
        self._dirty = True

    def nack(self, ref: ObjectRef) -> None:
        if self.in_flight.get(ref.name) == ref.generation:
            del self.in_flight[ref.name]
