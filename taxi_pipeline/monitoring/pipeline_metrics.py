"""The pipeline's Prometheus metrics, and the model that turns Prefect events into them.

No I/O here: `PipelineModel.observe` takes one event at a time (from the live
stream, or from history after a restart with `count=False`), so tests and the
memory benchmark drive it directly. Every piece of state is bounded: the ids
seen, the landings waiting for their load and the runs started are LRU maps of
at most `max_tracked` entries, and label values (dataset, reason) are capped,
so an object name never becomes a label and a flood of odd folder names cannot
grow the series count.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Generic, TypeVar

from prefect.events import Event
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from taxi_pipeline import events

PREFIX = "taxi_pipeline"
OTHER = "other"

# objects_total{stage}: what happened to an object generation, once per generation.
STAGE_LANDED = "landed"
STAGE_PROCESSED = "processed"
STAGE_TRANSFORMED = "transformed"
STAGE_LOADED = "loaded"
STAGE_QUARANTINED = "quarantined"
STAGE_ALL_REJECTED = "all_rejected"
STAGE_DUPLICATE = "duplicate"
STAGE_TRANSFORM_FAILED = "transform_failed"
STAGE_LOAD_FAILED = "load_failed"
STAGE_NOTIFICATION_REJECTED = "notification_rejected"
OBJECT_STAGES = (STAGE_LANDED, STAGE_PROCESSED, STAGE_TRANSFORMED, STAGE_LOADED,
                 STAGE_QUARANTINED, STAGE_ALL_REJECTED, STAGE_DUPLICATE,
                 STAGE_TRANSFORM_FAILED, STAGE_LOAD_FAILED, STAGE_NOTIFICATION_REJECTED)

_BY_EVENT = {
    events.TRANSFORM_COMPLETED: STAGE_TRANSFORMED,
    events.OBJECT_QUARANTINED: STAGE_QUARANTINED,
    events.OBJECT_ALL_REJECTED: STAGE_ALL_REJECTED,
    events.OBJECT_DUPLICATE_CONTENT: STAGE_DUPLICATE,
    events.TRANSFORM_FAILED: STAGE_TRANSFORM_FAILED,
    events.LOAD_FAILED: STAGE_LOAD_FAILED,
    events.NOTIFICATION_REJECTED: STAGE_NOTIFICATION_REJECTED,
}
# Events that end a transform or load run, and the outcome label of its duration.
_TRANSFORM_ENDS = {events.TRANSFORM_COMPLETED: "completed", events.TRANSFORM_FAILED: "failed",
                   events.OBJECT_QUARANTINED: "quarantined",
                   events.OBJECT_DUPLICATE_CONTENT: "duplicate"}
_LOAD_ENDS = {events.LOAD_COMPLETED: "completed", events.LOAD_FAILED: "failed"}

DROP_TO_QUERYABLE_BUCKETS = (1, 2, 4, 8, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
RUN_BUCKETS = (0.5, 1, 2, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Bounded(Generic[K, V]):
    """An LRU map of at most `limit` entries; the oldest goes first (and is counted)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.evicted = 0
        self._items: OrderedDict[K, V] = OrderedDict()

    def __contains__(self, key: K) -> bool:
        return key in self._items

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: K) -> V | None:
        return self._items.get(key)

    def put(self, key: K, value: V) -> None:
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.limit:
            self._items.popitem(last=False)
            self.evicted += 1

    def pop(self, key: K) -> V | None:
        return self._items.pop(key, None)

    def values(self) -> Iterable[V]:
        return self._items.values()


class LabelValues:
    """The first `limit` distinct values of a label pass, later ones become `other`."""

    def __init__(self, limit: int, known: Iterable[str] = ()) -> None:
        self.limit = limit
        self._seen: set[str] = set(known)

    def __call__(self, value: object) -> str:
        text = str(value or "unknown")[:64]
        if text in self._seen:
            return text
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(text)
        return text


@dataclass(frozen=True)
class ScanResult:
    """What one pass over the bucket and the load log found (the reconcile logic)."""

    at: float
    # dataset -> raw objects landed more than the reconcile age ago, neither loaded nor
    # quarantined (what reconcile would re-emit).
    stalled: dict[str, int] = field(default_factory=dict)
    oldest_stalled_landed: float | None = None
    # The oldest raw object not yet loaded (stalled or still on its way), and the newest
    # raw object in the bucket: unix times.
    oldest_unloaded_landed: float | None = None
    newest_raw_landed: float | None = None


class PipelineMetrics:
    """One registry of the exporter's metrics (one per exporter, so tests can run several)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = r = registry or CollectorRegistry()
        self.objects = Counter(
            f"{PREFIX}_objects", "Object generations that reached a stage (landed, processed, "
            "transformed, loaded, quarantined, all_rejected, duplicate, transform_failed, "
            "load_failed, notification_rejected), counted once per generation",
            ["stage", "dataset"], registry=r)
        self.rows_landed = Counter(
            f"{PREFIX}_rows_landed", "Rows read from raw objects by their first transform",
            ["dataset"], registry=r)
        self.rows_loaded = Counter(
            f"{PREFIX}_rows_loaded", "Rows loaded into the warehouse (loads that wrote rows; "
            "a repeated load of the same generation adds nothing)", ["dataset"], registry=r)
        self.rows_rejected = Counter(
            f"{PREFIX}_rows_rejected", "Rows the quality rules rejected (in rejects/), by "
            "reason, from the first transform of each raw generation",
            ["dataset", "reason"], registry=r)
        self.quarantined = Counter(
            f"{PREFIX}_quarantined_objects", "Raw objects moved to quarantine/, by reason",
            ["dataset", "reason"], registry=r)
        self.drop_to_queryable = Histogram(
            f"{PREFIX}_drop_to_queryable_seconds", "Seconds from a raw object generation "
            "landing in the bucket to the load.completed that made its rows queryable",
            ["dataset"], buckets=DROP_TO_QUERYABLE_BUCKETS, registry=r)
        self.transform_duration = Histogram(
            f"{PREFIX}_transform_duration_seconds", "Seconds from transform.started to the "
            "event that ended the run (completed, failed, quarantined, duplicate)",
            ["dataset", "outcome"], buckets=RUN_BUCKETS, registry=r)
        self.load_duration = Histogram(
            f"{PREFIX}_load_duration_seconds", "Seconds from load.started to load.completed "
            "or load.failed", ["dataset", "outcome"], buckets=RUN_BUCKETS, registry=r)
        self.events = Counter(
            f"{PREFIX}_exporter_events", "Events the exporter read, live (counted into the "
            "metrics) or from history after a start (state only)", ["source"], registry=r)
        self.scan_errors = Counter(
            f"{PREFIX}_exporter_scan_errors", "Bucket and load-log scans that failed "
            "(the stalled gauges keep their last values)", registry=r)
        self.subscribe_errors = Counter(
            f"{PREFIX}_exporter_subscribe_errors", "Event stream connections that failed "
            "or dropped (the exporter reconnects)", registry=r)


class PipelineModel:
    """Bounded state plus the metrics: what the live event stream means for an operator."""

    def __init__(self, metrics: PipelineMetrics, max_tracked: int = 50_000,
                 max_label_values: int = 32, datasets: Iterable[str] = ()) -> None:
        self.metrics = metrics
        self.seen_ids: Bounded[Any, None] = Bounded(max_tracked)
        # (raw uri, generation) -> unix time it landed, until its load completes.
        self.landed: Bounded[tuple[str, int], float] = Bounded(max_tracked)
        # (step, run key) -> unix time the run started.
        self.started: Bounded[tuple[str, str], float] = Bounded(max_tracked)
        # (stage, uri, generation) already counted: a re-emit or a re-run counts once.
        self.counted: Bounded[tuple[str, str, int], None] = Bounded(max_tracked)
        self.dataset = LabelValues(max_label_values, datasets)
        self.reason = LabelValues(max_label_values)
        self.scan: ScanResult | None = None
        self.connected = False
        self.last_event_at: float | None = None
        metrics.registry.register(_StateCollector(self))

    # -- the one entry point ---------------------------------------------------------

    def observe(self, event: Event, count: bool = True) -> bool:
        """Fold one event in; False when it was seen before (a replay or a reconnect).

        `count=False` (history read after a start) rebuilds the state only: the
        counters start from zero, as Prometheus expects of a restarted process,
        rather than jumping by a day of history that `increase()` would count again.
        """
        if event.id in self.seen_ids:
            return False
        self.seen_ids.put(event.id, None)
        self.metrics.events.labels("live" if count else "history").inc()
        self.last_event_at = time.time()
        name = event.event
        labels = event.resource
        uri = event.resource.id
        generation = _int(labels.get(events.LABEL_GENERATION))
        dataset = self.dataset(labels.get(events.LABEL_DATASET))
        if name == events.OBJECT_FINALIZED:
            self._finalized(event, uri, generation, dataset, count)
        elif name in (events.TRANSFORM_STARTED, events.LOAD_STARTED):
            self.started.put(_run_key(event), _ts(event.occurred))
        else:
            self._ended(event, uri, generation, dataset, count)
        return True

    def _finalized(self, event: Event, uri: str, generation: int | None, dataset: str,
                   count: bool) -> None:
        stage = event.resource.get(events.LABEL_STAGE)
        if generation is None or stage not in (events.STAGE_RAW, events.STAGE_PROCESSED):
            return
        if stage == events.STAGE_RAW:
            landed = _landed_at(event)
            known = self.landed.get((uri, generation))
            if known is None or landed < known:
                self.landed.put((uri, generation), landed)
        self._count_once(STAGE_LANDED if stage == events.STAGE_RAW else STAGE_PROCESSED,
                         uri, generation, dataset, count)

    def _ended(self, event: Event, uri: str, generation: int | None, dataset: str,
               count: bool) -> None:
        name, payload = event.event, event.payload
        for ends, histogram, step in ((_TRANSFORM_ENDS, self.metrics.transform_duration,
                                       events.TRANSFORM_STARTED),
                                      (_LOAD_ENDS, self.metrics.load_duration,
                                       events.LOAD_STARTED)):
            if name in ends:
                started = self.started.pop(_run_key(event, step))
                if started is not None and count:
                    histogram.labels(dataset, ends[name]).observe(
                        max(0.0, _ts(event.occurred) - started))
        if name == events.LOAD_COMPLETED:
            if payload.get("status") != "loaded" or generation is None:
                return
            source = (str(payload.get("source_uri") or ""),
                      _int(payload.get("source_generation")) or 0)
            landed = self.landed.pop(source)
            if not self._count_once(STAGE_LOADED, uri, generation, dataset, count):
                return
            if count:
                self.metrics.rows_loaded.labels(dataset).inc(_int(payload.get("rows")) or 0)
                if landed is not None:
                    self.metrics.drop_to_queryable.labels(dataset).observe(
                        max(0.0, _ts(event.occurred) - landed))
            return
        stage = _BY_EVENT.get(name)
        if stage is None or (generation is None and stage != STAGE_NOTIFICATION_REJECTED):
            return
        first = self._count_once(stage, uri, generation or 0, dataset, count)
        if not (first and count):
            return
        if name == events.TRANSFORM_COMPLETED:
            self.metrics.rows_landed.labels(dataset).inc(_int(payload.get("rows_in")) or 0)
            by_reason = payload.get("rejected_by_reason") or {}
            if isinstance(by_reason, dict):
                for reason, rows in by_reason.items():
                    self.metrics.rows_rejected.labels(dataset, self.reason(reason)).inc(
                        _int(rows) or 0)
        elif name == events.OBJECT_QUARANTINED:
            self.metrics.quarantined.labels(dataset, self.reason(payload.get("reason"))).inc()

    def _count_once(self, stage: str, uri: str, generation: int, dataset: str,
                    count: bool) -> bool:
        key = (stage, uri, generation)
        if key in self.counted:
            return False
        self.counted.put(key, None)
        if count:
            self.metrics.objects.labels(stage, dataset).inc()
        return True

    def tracked(self) -> dict[str, int]:
        return {"event_ids": len(self.seen_ids), "landings": len(self.landed),
                "runs": len(self.started), "counted": len(self.counted)}


class _StateCollector(Collector):
    """Gauges computed at scrape time: ages grow between scans, as they should."""

    def __init__(self, model: PipelineModel) -> None:
        self.model = model

    def collect(self) -> Iterator[GaugeMetricFamily]:
        model, now = self.model, time.time()
        stalled = GaugeMetricFamily(
            f"{PREFIX}_stalled_objects", "Raw objects landed more than "
            "TAXI_RECONCILE_AFTER_MINUTES ago and neither loaded nor quarantined (what "
            "reconcile would re-emit), at the last scan", labels=["dataset"])
        oldest_stalled = GaugeMetricFamily(
            f"{PREFIX}_oldest_stalled_seconds",
            "Age of the oldest stalled raw object (0 when none)")
        oldest_unloaded = GaugeMetricFamily(
            f"{PREFIX}_oldest_unloaded_seconds", "Age of the oldest raw object not yet "
            "loaded nor quarantined, stalled or still on its way (0 when none)")
        newest_raw = GaugeMetricFamily(
            f"{PREFIX}_newest_raw_object_timestamp_seconds",
            "When the newest raw object in the bucket landed (unix time)")
        last_scan = GaugeMetricFamily(
            f"{PREFIX}_exporter_last_scan_timestamp_seconds",
            "When the last successful bucket and load-log scan ended (unix time)")
        scan = model.scan
        if scan is not None:
            for dataset, n in sorted(scan.stalled.items()):
                stalled.add_metric([dataset], n)
            oldest_stalled.add_metric([], _age(now, scan.oldest_stalled_landed))
            oldest_unloaded.add_metric([], _age(now, scan.oldest_unloaded_landed))
            if scan.newest_raw_landed is not None:
                newest_raw.add_metric([], scan.newest_raw_landed)
            last_scan.add_metric([], scan.at)
        yield from (stalled, oldest_stalled, oldest_unloaded, newest_raw, last_scan)
        connected = GaugeMetricFamily(
            f"{PREFIX}_exporter_connected",
            "1 while the exporter follows the Prefect event stream")
        connected.add_metric([], 1.0 if model.connected else 0.0)
        yield connected
        tracked = GaugeMetricFamily(
            f"{PREFIX}_exporter_tracked", "Entries of the exporter's bounded state "
            "(each capped at TAXI_MONITOR_MAX_TRACKED)", labels=["what"])
        for what, n in model.tracked().items():
            tracked.add_metric([what], n)
        yield tracked


def _age(now: float, since: float | None) -> float:
    return 0.0 if since is None else max(0.0, now - since)


def _int(value: object) -> int | None:
    try:
        return int(str(value))
    except (TypeError, ValueError):
        return None


def _ts(value: datetime) -> float:
    return value.timestamp()


def _landed_at(event: Event) -> float:
    """When the generation landed: the object's own time if the event carries it."""
    for key in ("created", "updated"):
        text = event.payload.get(key)
        if isinstance(text, str):
            try:
                return datetime.fromisoformat(text).timestamp()
            except ValueError:
                continue
    return _ts(event.occurred)


def _run_key(event: Event, started: str | None = None) -> tuple[str, str]:
    """The run an event belongs to: its flow run (Prefect relates it), else the object."""
    step = started or event.event
    for related in event.related:
        if related.id.startswith("prefect.flow-run."):
            return step, related.id
    return step, f"{event.resource.id}#{event.resource.get(events.LABEL_GENERATION)}"
