"""The local profile's notification source: a watched bucket directory.

Polling, not inotify: a file is only ready once its size and change time have
held still for `settle_seconds` (a slow copy keeps changing), and a .parquet
file additionally once its footer magic is present. Polling sees both without
tracking write events, and works on every OS and on network mounts.

Confirmed (name, generation) pairs are kept in a state file, so a restarted
bridge does not announce the whole bucket again.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.storage.local import LocalStore, has_parquet_footer

__all__ = ["DirectorySource", "has_parquet_footer"]

log = logging.getLogger(__name__)


@dataclass
class _Watch:
    size: int
    generation: int
    stable_since: float


class DirectorySource:
    def __init__(
        self,
        store: LocalStore,
        prefixes: list[str],
        state_path: Path,
        metrics: BridgeMetrics,
        settle_seconds: float = 1.0,
        stall_seconds: float = 30.0,
    ) -> None:
        self.store = store
        self.prefixes = prefixes
        self.state_path = state_path
        self.metrics = metrics
        self.settle = settle_seconds
        self.stall = stall_seconds
        self.done: dict[str, int] = self._load_state()
        self.watching: dict[str, _Watch] = {}
        self.in_flight: dict[str, int] = {}
        self._dirty = False

    def _load_state(self) -> dict[str, int]:
        try:
            data = json.loads(self.state_path.read_text())
            return {str(k): int(v) for k, v in data.get("confirmed", {}).items()}
        except FileNotFoundError:
            return {}
        except (ValueError, AttributeError) as exc:
            log.warning("state file %s is unreadable (%s); starting afresh", self.state_path, exc)
            return {}

    def flush(self) -> None:
        """Write the confirmed set if it changed (atomically: temp file + rename)."""
        if not self._dirty:
            return
        self.state_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"confirmed": self.done}, indent=0, sort_keys=True))
        os.replace(tmp, self.state_path)
        self._dirty = False

    def scan(self, now: float | None = None) -> list[ObjectRef]:
        """Objects that are complete, new, and not already announced or in flight."""
        now = time.monotonic() if now is None else now
        ready: list[ObjectRef] = []
        seen: set[str] = set()
        for prefix in self.prefixes:
            for ref in self.store.list(prefix):
                seen.add(ref.name)
                if self.done.get(ref.name) == ref.generation:
                    continue
                if self.in_flight.get(ref.name) == ref.generation:
                    continue
                size = ref.size or 0
                watch = self.watching.get(ref.name)
                if watch is None or (watch.size, watch.generation) != (size, ref.generation):
                    self.watching[ref.name] = _Watch(size, ref.generation, now)
                    continue
                quiet = now - watch.stable_since
                if quiet < self.settle:
                    continue
                path = self.store.root / ref.name
                if (ref.name.endswith(".parquet") and quiet < self.stall
                        and not has_parquet_footer(path)):
                    continue  # still being written, or truncated: wait for the stall limit
                try:
                    ref = dataclasses.replace(ref, md5_hash=self.store.md5(ref.name))
                except FileNotFoundError:
                    continue
                del self.watching[ref.name]
                self.in_flight[ref.name] = ref.generation
                self.metrics.received.inc()
                ready.append(ref)
        for name in [n for n in self.watching if n not in seen]:
            del self.watching[name]
        gone = [n for n in self.done if n not in seen]
        if gone:
            for name in gone:
                del self.done[name]
            self._dirty = True
        return ready

    def ack(self, ref: ObjectRef) -> None:
        self.done[ref.name] = ref.generation
        if self.in_flight.get(ref.name) == ref.generation:
            del self.in_flight[ref.name]
        self._dirty = True

    def nack(self, ref: ObjectRef) -> None:
        if self.in_flight.get(ref.name) == ref.generation:
            del self.in_flight[ref.name]
