"""Find object generations that landed but never reached the warehouse.

At-least-once delivery still leaves gaps the bridge cannot see: an event stored
but never acted on after a server crash, an automation action that failed (the
server does not retry those), a notification GCS never sent. The bucket and the
warehouse's load log are the truth: a raw object whose current generation is
not loaded, and not in quarantine, has stalled. Re-emitting it (with the
`pipeline.reemit` label) runs the chain again; flows are idempotent.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from taxi_pipeline.objects import ObjectRef, sibling_name
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore
from taxi_pipeline.warehouse import Warehouse


@dataclass(frozen=True)
class Stalled:
    obj: ObjectRef
    why: str


def find_stalled(store: ObjectStore, warehouse: Warehouse, settings: Settings,
                 older_than: timedelta, now: datetime | None = None) -> Iterator[Stalled]:
    """Raw objects older than `older_than` whose current generation is not loaded.

    Younger objects are left alone: they are most likely still on their way.
    """
    now = now or datetime.now(UTC)
    for obj in store.list(settings.raw_prefix):
        if obj.updated is not None and now - obj.updated < older_than:
            continue
        loaded = warehouse.loaded(settings.table, obj.uri)
        if loaded is not None and loaded[0] >= obj.generation:
            continue
        quarantined = sibling_name(obj.name, settings.raw_prefix, settings.quarantine_prefix)
        try:
            moved = store.ref(quarantined)
            # Quarantine moves the raw object away, so a raw object beside an older
            # quarantined copy is a new drop; one beside a newer copy was quarantined
            # (its delete failed) and has its reason already.
            if moved.updated and obj.updated and moved.updated >= obj.updated:
                continue
        except ObjectNotFound:
            pass
        if loaded is None:
            yield Stalled(obj, "never loaded")
        else:
            yield Stalled(obj, f"warehouse holds generation {loaded[0]}, bucket has "
                               f"{obj.generation}")
