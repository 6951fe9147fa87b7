"""GCS Pub/Sub notifications (JSON_API_V1 or NONE) -> ObjectRef, or a reason to ignore or reject.

Pure functions, so every poison case is unit-tested without an emulator.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef

FINALIZE = "OBJECT_FINALIZE"
JSON_API_V1 = "JSON_API_V1"
NONE = "NONE"


class Ignored(Exception):
    """A well-formed notification we do not act on (other event, bucket or prefix): ack it."""

    def __init__(self, why: str) -> None:
        super().__init__(why)
        self.why = why


class Rejected(Exception):
    """A message that can never become an event (not JSON, missing attributes)."""

    def __init__(self, why: str, detail: str) -> None:
        super().__init__(f"{why}: {detail}")
        self.why = why
        self.detail = detail


@dataclass(frozen=True)
class Scope:
    """Which objects the bridge announces."""

    buckets: frozenset[str]
    prefixes: tuple[str, ...]


def _time(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None


def parse_notification(attributes: Mapping[str, str], data: bytes, scope: Scope) -> ObjectRef:
    """The object generation a notification announces.

    Raises Ignored for notifications outside `scope` or of other event types,
    Rejected for messages that are not GCS notifications at all.
    """
    missing = [k for k in ("bucketId", "objectId", "objectGeneration", "eventType")
               if not attributes.get(k)]
    if missing:
        raise Rejected("missing_attributes", f"attributes {', '.join(missing)} are missing")
    event_type = attributes["eventType"]
    if event_type != FINALIZE:
        raise Ignored(f"event_type:{event_type}")
    # Scope before format: a message about another bucket or prefix is ignored
    # whatever its payload, never reported as rejected.
    bucket, name = attributes["bucketId"], attributes["objectId"]
    if scope.buckets and bucket not in scope.buckets:
        raise Ignored("bucket")
    if not name.startswith(scope.prefixes):
        raise Ignored("prefix")
    try:
        generation = int(attributes["objectGeneration"])
    except ValueError:
        raise Rejected("bad_generation",
                       f"objectGeneration {attributes['objectGeneration']!r}") from None
    payload_format = attributes.get("payloadFormat", JSON_API_V1)
    if payload_format == NONE:
        # A notification configured without payload: bucket, name and generation are in
        # the attributes, and the flows read the object (pinned to that generation)
        # themselves, so nothing is missing but the metadata the event would carry.
        resource: dict[str, Any] = {}
    elif payload_format != JSON_API_V1:
        raise Rejected("payload_format",
                       f"payloadFormat {payload_format!r}: need JSON_API_V1 or NONE (set the "
                       "bucket notification's payload format to json or none)")
    else:
        try:
            decoded = json.loads(data.decode("utf-8")) if data else {}
        except (UnicodeDecodeError, ValueError) as exc:
            raise Rejected("not_json", f"data is not JSON ({exc})") from None
        if not isinstance(decoded, dict):
            raise Rejected("not_json", "data is JSON but not an object resource")
        resource = decoded
    size = resource.get("size")
    # The transform sets the lineage as custom metadata on processed objects (GCS).
    lineage = events.lineage_in(resource.get("metadata"))
    return ObjectRef(
        bucket=bucket,
        name=name,
        generation=generation,
        scheme="gs",
        size=int(size) if isinstance(size, str | int) and str(size).isdigit() else None,
        md5_hash=resource.get("md5Hash"),
        crc32c=resource.get("crc32c"),
        content_type=resource.get("contentType"),
        created=_time(resource.get("timeCreated")),
        updated=_time(resource.get("updated")),
        extra=lineage,
    )
