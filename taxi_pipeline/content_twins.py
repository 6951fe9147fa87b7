"""The same bytes under a second raw name: found by content hash, so a month loads once.

A file copied to two paths (`raw/yellow/2024/...` and `raw/backup/...`) would
otherwise load its rows twice, under two source URIs. The bucket knows each
object's md5 (GCS keeps it in the object's metadata; locally it is computed),
so the transform asks whether an EARLIER raw object holds the same bytes; the
later one is skipped with a `pipeline.object.duplicate_content` event, and
reconcile does not count it as stalled. "Earlier" is the older generation time,
then the name, so two copies landing at once agree on which one loads.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.storage import ObjectNotFound, ObjectStore
from taxi_pipeline.storage.base import content_md5


def content_hash(store: ObjectStore, obj: ObjectRef) -> str | None:
    """The object's base64 md5: from its metadata, else (local files) from its bytes.

    None for a GCS composite object, which has no md5: comparing would mean
    downloading it, so such objects are never called twins.
    """
    if obj.md5_hash:
        return obj.md5_hash
    if obj.scheme != "file":
        return None
    with store.open_read(obj) as handle:
        return content_md5(handle)


def _order(obj: ObjectRef) -> tuple[float, str]:
    stamp = obj.created or obj.updated
    return (stamp.timestamp() if stamp else float(obj.generation), obj.name)


def earlier_twin(store: ObjectStore, obj: ObjectRef, prefix: str,
                 among: Iterable[ObjectRef] | None = None) -> ObjectRef | None:
    """An object under `prefix` that landed before `obj` with exactly its bytes, or None.

    The twin comes back with its `md5_hash` set, so naming it costs no second
    read. `among`: that prefix's listing when the caller already has it (a
    reconcile pass checks many objects against one listing). Sizes are compared
    first (they come with the listing), so only objects of the same size are
    hashed: a local bucket of distinct months costs no reads.
    """
    if obj.size is None:
        return None
    mine: str | None = None
    for other in store.list(prefix) if among is None else among:
        if other.name == obj.name or other.size != obj.size or _order(other) >= _order(obj):
            continue
        if mine is None:
            mine = content_hash(store, obj)
            if mine is None:
                return None
        try:
            if content_hash(store, other) == mine:
                return dataclasses.replace(other, md5_hash=mine)
        except ObjectNotFound:  # replaced or removed while we looked: not a twin now
            continue
    return None
