"""The event contract: names, ids, resources and labels of every pipeline event.

Bridge, flows and automations all build or match events through this module,
so a label renamed here is renamed everywhere.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from typing import Any

from prefect.events import Event, RelatedResource, Resource

from taxi_pipeline.objects import ObjectRef, dataset_of, stage_of

# -- event names ---------------------------------------------------------------
OBJECT_FINALIZED = "storage.object.finalized"
DOWNLOAD_COMPLETED = "pipeline.download.completed"
DOWNLOAD_SKIPPED = "pipeline.download.skipped"
DOWNLOAD_FAILED = "pipeline.download.failed"
TRANSFORM_STARTED = "pipeline.transform.started"
TRANSFORM_COMPLETED = "pipeline.transform.completed"
TRANSFORM_FAILED = "pipeline.transform.failed"
LOAD_STARTED = "pipeline.load.started"
LOAD_COMPLETED = "pipeline.load.completed"
LOAD_FAILED = "pipeline.load.failed"
OBJECT_QUARANTINED = "pipeline.object.quarantined"
OBJECT_ALL_REJECTED = "pipeline.object.all_rejected"
OBJECT_DUPLICATE_CONTENT = "pipeline.object.duplicate_content"
NOTIFICATION_REJECTED = "pipeline.notification.rejected"
RECOVERY_ATTEMPTED = "pipeline.recovery.attempted"
RECOVERY_EXHAUSTED = "pipeline.recovery.exhausted"
RECONCILE_COMPLETED = "pipeline.reconcile.completed"
# `up` restarted a part of the local stack that exited unexpectedly, or gave up on one.
STACK_RESTARTED = "pipeline.stack.restarted"
STACK_GAVE_UP = "pipeline.stack.gave_up"
LABEL_STACK_PART = "pipeline.stack.part"

# -- resource labels -----------------------------------------------------------
LABEL_BUCKET = "storage.bucket"
LABEL_OBJECT = "storage.object"
LABEL_GENERATION = "storage.generation"
LABEL_STAGE = "pipeline.stage"
LABEL_DATASET = "pipeline.dataset"
LABEL_REEMIT = "pipeline.reemit"

STAGE_RAW = "raw"
STAGE_PROCESSED = "processed"

# Namespace of the deterministic ids: a fixed random UUID, so ids never collide
# with another system's uuid5 of the same strings.
_OBJECT_EVENT_NAMESPACE = uuid.UUID("6f0c8f5e-6a43-4c1e-9d0b-2b7e1f6d2a91")


def object_event_id(bucket: str, name: str, generation: int) -> uuid.UUID:
    """Same object generation, same id: a redelivered notification dedupes on the server."""
    return uuid.uuid5(_OBJECT_EVENT_NAMESPACE, f"{bucket}\x00{name}\x00{generation}")


def object_resource(obj: ObjectRef, prefixes: dict[str, str]) -> dict[str, str]:
    """The resource of every event about `obj`: its URI plus labels automations match on."""
    return {
        "prefect.resource.id": obj.uri,
        "prefect.resource.name": obj.basename,
        LABEL_BUCKET: obj.bucket,
        LABEL_OBJECT: obj.name,
        LABEL_GENERATION: str(obj.generation),
        LABEL_STAGE: stage_of(obj.name, prefixes),
        LABEL_DATASET: dataset_of(obj.name),
    }


# ObjectRef.extra keys a source fills from the object's lineage (a processed
# object's parquet footer locally, its GCS custom metadata on GCS).
EXTRA_SOURCE_URI = "taxi_pipeline.source_uri"
EXTRA_SOURCE_GENERATION = "taxi_pipeline.source_generation"


def lineage_in(metadata: object) -> dict[str, str]:
    """The lineage keys of a GCS object's custom metadata (as the API or a notification
    gives it), as `ObjectRef.extra`; empty when there is none."""
    if not isinstance(metadata, dict):
        return {}
    return {key: str(metadata[key]) for key in (EXTRA_SOURCE_URI, EXTRA_SOURCE_GENERATION)
            if key in metadata}


def lineage_related(obj: ObjectRef) -> list[RelatedResource]:
    """The raw object generation a processed object was made from, role `source`.

    Empty for an object without lineage (a raw object, or a source that has none).
    The transform run that wrote it is not here: nothing about the run is in the
    object's bytes (a re-transform keeps them, and its generation, unchanged); the
    run's `pipeline.transform.completed` links it, with this object as `output`.
    """
    source = obj.extra.get(EXTRA_SOURCE_URI)
    if not source:
        return []
    return [RelatedResource(source_resource(source, obj.extra.get(EXTRA_SOURCE_GENERATION)))]


def source_resource(source_uri: str, generation: int | str | None) -> dict[str, str]:
    """The raw object generation a processed object was made from, as a related resource."""
    related = {"prefect.resource.id": source_uri, "prefect.resource.role": "source",
               "prefect.resource.name": source_uri.rsplit("/", 1)[-1]}
    if generation is not None and str(generation):
        related[LABEL_GENERATION] = str(generation)
    return related


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value else None


def object_finalized(
    obj: ObjectRef,
    prefixes: dict[str, str],
    *,
    message_id: str | None = None,
    publish_time: datetime | None = None,
    reemit: bool = False,
) -> Event:
    """`storage.object.finalized` for one object generation.

    A notification gets the deterministic id; a re-emit gets a fresh id and the
    `pipeline.reemit` label, because a re-emit means "process it again".
    """
    resource = object_resource(obj, prefixes)
    if reemit:
        resource[LABEL_REEMIT] = "true"
    payload: dict[str, Any] = {
        "size": obj.size,
        "md5_hash": obj.md5_hash,
        "crc32c": obj.crc32c,
        "content_type": obj.content_type,
        "created": _iso(obj.created),
        "updated": _iso(obj.updated),
        "message_id": message_id,
        "publish_time": _iso(publish_time),
    }
    return Event(
        id=uuid.uuid4() if reemit else object_event_id(obj.bucket, obj.name, obj.generation),
        event=OBJECT_FINALIZED,
        resource=Resource(resource),
        related=lineage_related(obj),
        payload={k: v for k, v in payload.items() if v is not None},
    )


def object_role_resource(obj: ObjectRef, role: str, prefixes: dict[str, str]) -> dict[str, str]:
    """`obj` as a related resource (the output object of a transform, say)."""
    related = object_resource(obj, prefixes)
    related["prefect.resource.role"] = role
    return related


def table_resource(table_uri: str) -> dict[str, str]:
    """A warehouse table as a related resource (`duckdb:///path#trips`, `bigquery://p.d.t`)."""
    return {"prefect.resource.id": table_uri, "prefect.resource.role": "table"}


def related_resources(items: list[dict[str, str]]) -> list[RelatedResource]:
    return [RelatedResource(item) for item in items]


# Namespace of rejected-notification ids (the value the Pub/Sub source always used).
_REJECTED_NAMESPACE = uuid.UUID("0b5d2f4c-31a8-4f57-9a43-7f5d3b0c9e12")


def notification_rejected(resource: dict[str, str], why: str, detail: str, *, key: str,
                          **payload: Any) -> Event:
    """`pipeline.notification.rejected`: what a source can never announce, where people look.

    Both sources build it here (a poison Pub/Sub message, a symlink or
    unreadable file in the local bucket). The id is a uuid5 of `key` (the
    message id, or the file, reason and generation), so a redelivery or a
    restarted bridge reporting it again is stored once.
    """
    return Event(
        id=uuid.uuid5(_REJECTED_NAMESPACE, key),
        event=NOTIFICATION_REJECTED,
        resource=Resource(resource),
        payload={"why": why, "detail": detail, **payload},
    )


def stack_event(name: str, part: str, home: str, host: str, **payload: Any) -> Event:
    """`pipeline.stack.restarted|gave_up` about one part (server, worker, bridge, ...) of the
    stack `up` runs in `home` on `host`: the resource names both, so two stacks' parts
    stay apart in the feed and in alert triggers (which match `pipeline.stack.part`)."""
    return Event(
        event=name,
        resource=Resource({"prefect.resource.id": f"taxi-pipeline.stack.{host}.{part}",
                           "prefect.resource.name": part, LABEL_STACK_PART: part,
                           "pipeline.stack.home": home, "pipeline.stack.host": host}),
        payload=payload,
    )
