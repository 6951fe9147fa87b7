"""GCS Pub/Sub notifications -> ObjectRef (pubsub_bridge/notifications.py) and -> relay
submissions (pubsub_bridge/pubsub_source.to_submission), without an emulator."""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from pubsub_bridge.metrics import BridgeMetrics
from pubsub_bridge.notifications import Ignored, Rejected, Scope, parse_notification
from pubsub_bridge.pubsub_source import rejected_event, scope_of, to_submission
from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef
from taxi_pipeline.settings import Settings

BUCKET = "taxi-bucket"
RAW_NAME = "raw/yellow/2024/yellow_tripdata_2024-01.parquet"
PROCESSED_NAME = "processed/green/2023/green_tripdata_2023-12.parquet"
GENERATION = "1704164645678901"
SCOPE = Scope(buckets=frozenset({BUCKET}), prefixes=("raw/", "processed/"))
SUBSCRIPTION = "projects/taxi-project/subscriptions/taxi-objects-bridge"


def attributes(name: str = RAW_NAME, *, bucket: str = BUCKET, generation: str = GENERATION,
               event_type: str = "OBJECT_FINALIZE", **extra: str) -> dict[str, str]:
    """The attributes GCS puts on a JSON_API_V1 notification."""
    attrs = {
        "bucketId": bucket,
        "objectId": name,
        "objectGeneration": generation,
        "eventType": event_type,
        "eventTime": "2024-01-02T03:04:05.678901Z",
        "notificationConfig": f"projects/_/buckets/{bucket}/notificationConfigs/1",
        "payloadFormat": "JSON_API_V1",
    }
    attrs.update(extra)
    return attrs


def resource(name: str = RAW_NAME, *, bucket: str = BUCKET, generation: str = GENERATION,
             **overrides: Any) -> dict[str, Any]:
    """The object resource GCS sends as data (JSON API v1: numbers as strings)."""
    body: dict[str, Any] = {
        "kind": "storage#object",
        "id": f"{bucket}/{name}/{generation}",
        "selfLink": f"https://www.googleapis.com/storage/v1/b/{bucket}/o/{name}",
        "name": name,
        "bucket": bucket,
        "generation": generation,
        "metageneration": "1",
        "contentType": "application/vnd.apache.parquet",
        "timeCreated": "2024-01-02T03:04:05.678Z",
        "updated": "2024-01-02T03:04:06.123Z",
        "storageClass": "STANDARD",
        "timeStorageClassUpdated": "2024-01-02T03:04:05.678Z",
        "size": "49961641",
        "md5Hash": "Xr4ilOzQ4PCOq3aQ0qbuaQ==",
        "mediaLink": f"https://storage.googleapis.com/download/storage/v1/b/{bucket}/o/x",
        "crc32c": "yZRlqg==",
        "etag": "CNXs4pbx5IMDEAE=",
    }
    body.update(overrides)
    return body


def data(**kw: Any) -> bytes:
    return json.dumps(resource(**kw)).encode()


# -- parse_notification: finalize ----------------------------------------------------


def test_finalize_maps_every_field_onto_the_object_ref() -> None:
    ref = parse_notification(attributes(), data(), SCOPE)
    assert ref == ObjectRef(
        bucket=BUCKET,
        name=RAW_NAME,
        generation=1704164645678901,
        scheme="gs",
        size=49961641,
        md5_hash="Xr4ilOzQ4PCOq3aQ0qbuaQ==",
        crc32c="yZRlqg==",
        content_type="application/vnd.apache.parquet",
        created=datetime(2024, 1, 2, 3, 4, 5, 678000, tzinfo=UTC),
        updated=datetime(2024, 1, 2, 3, 4, 6, 123000, tzinfo=UTC),
    )
    assert isinstance(ref.generation, int)
    assert isinstance(ref.size, int)
    assert ref.created is not None and ref.created.utcoffset() is not None
    assert ref.uri == f"gs://{BUCKET}/{RAW_NAME}"


def test_finalize_under_the_processed_prefix_is_accepted() -> None:
    ref = parse_notification(attributes(PROCESSED_NAME), data(name=PROCESSED_NAME), SCOPE)
    assert ref.name == PROCESSED_NAME


def test_size_zero_is_kept_and_unparseable_metadata_becomes_none() -> None:
    ref = parse_notification(attributes(), data(size="0"), SCOPE)
    assert ref.size == 0
    ref = parse_notification(
        attributes(), data(size="lots", timeCreated="yesterday", updated=12), SCOPE
    )
    assert ref.size is None
    assert ref.created is None
    assert ref.updated is None


def test_missing_payload_format_defaults_to_json_api_v1() -> None:
    attrs = attributes()
    del attrs["payloadFormat"]
    assert parse_notification(attrs, data(), SCOPE).size == 49961641


def test_empty_bucket_scope_accepts_any_bucket() -> None:
    scope = Scope(buckets=frozenset(), prefixes=("raw/",))
    ref = parse_notification(attributes(bucket="elsewhere"), data(bucket="elsewhere"), scope)
    assert ref.bucket == "elsewhere"


# -- parse_notification: ignored ----------------------------------------------------


@pytest.mark.parametrize("event_type",
                         ["OBJECT_DELETE", "OBJECT_METADATA_UPDATE", "OBJECT_ARCHIVE"])
def test_other_event_types_are_ignored(event_type: str) -> None:
    with pytest.raises(Ignored) as info:
        parse_notification(attributes(event_type=event_type), data(), SCOPE)
    assert info.value.why == f"event_type:{event_type}"


def test_other_bucket_is_ignored() -> None:
    with pytest.raises(Ignored) as info:
        parse_notification(attributes(bucket="someone-else"), data(bucket="someone-else"),
                           SCOPE)
    assert info.value.why == "bucket"


@pytest.mark.parametrize("name", [
    "rejects/yellow/2024/yellow_tripdata_2024-01.parquet",
    "quarantine/yellow_tripdata_2024-01.parquet",
    "rawish/yellow_tripdata_2024-01.parquet",  # "raw/" is a folder, not a word prefix
    "yellow_tripdata_2024-01.parquet",
    "tmp/raw/yellow_tripdata_2024-01.parquet",
])
def test_name_outside_the_prefixes_is_ignored(name: str) -> None:
    with pytest.raises(Ignored) as info:
        parse_notification(attributes(name), data(name=name), SCOPE)
    assert info.value.why == "prefix"


# -- parse_notification: rejected ---------------------------------------------------


@pytest.mark.parametrize("key", ["bucketId", "objectId", "objectGeneration", "eventType"])
def test_missing_attribute_is_rejected_and_named(key: str) -> None:
    attrs = attributes()
    del attrs[key]
    with pytest.raises(Rejected) as info:
        parse_notification(attrs, data(), SCOPE)
    assert info.value.why == "missing_attributes"
    assert key in info.value.detail
    others = {"bucketId", "objectId", "objectGeneration", "eventType"} - {key}
    assert not any(other in info.value.detail for other in others)


def test_empty_attribute_counts_as_missing_and_all_are_named() -> None:
    attrs = attributes(bucket="", generation="")
    with pytest.raises(Rejected) as info:
        parse_notification(attrs, data(), SCOPE)
    assert info.value.why == "missing_attributes"
    assert "bucketId" in info.value.detail
    assert "objectGeneration" in info.value.detail
    assert "objectId" not in info.value.detail


def test_no_attributes_at_all_is_rejected_not_ignored() -> None:
    with pytest.raises(Rejected) as info:
        parse_notification({}, b"hello", SCOPE)
    assert info.value.why == "missing_attributes"
    for key in ("bucketId", "objectId", "objectGeneration", "eventType"):
        assert key in info.value.detail


@pytest.mark.parametrize("payload", [
    b"not json at all",
    b'{"name": "raw/x.parquet", "size": "12"',  # truncated
    b"\xff\xfe\x00\x81 binary",  # not UTF-8
    "{\"name\": \"caf\u00e9\"}".encode("latin-1"),  # JSON, but not UTF-8
])
def test_data_that_is_not_json_is_rejected(payload: bytes) -> None:
    with pytest.raises(Rejected) as info:
        parse_notification(attributes(), payload, SCOPE)
    assert info.value.why == "not_json"


@pytest.mark.parametrize("payload", [b"[]", b'[{"name": "raw/x"}]', b'"a string"', b"null",
                                     b"42"])
def test_json_that_is_not_an_object_resource_is_rejected(payload: bytes) -> None:
    with pytest.raises(Rejected) as info:
        parse_notification(attributes(), payload, SCOPE)
    assert info.value.why == "not_json"


@pytest.mark.parametrize("generation", ["abc", "1.5", "0x10", "12abc", "1e6"])
def test_bad_generation_is_rejected(generation: str) -> None:
    with pytest.raises(Rejected) as info:
        parse_notification(attributes(generation=generation), data(), SCOPE)
    assert info.value.why == "bad_generation"
    assert generation in info.value.detail


def test_payload_format_none_is_accepted_from_the_attributes() -> None:
    """Issue 20, defect 7: a notification configured without payload (`payloadFormat: NONE`,
    empty data) names the object generation in its attributes, and the flows read the
    object themselves."""
    ref = parse_notification(attributes(payloadFormat="NONE"), b"", SCOPE)
    assert (ref.bucket, ref.name, ref.generation, ref.scheme) == (BUCKET, RAW_NAME,
                                                                   int(GENERATION), "gs")
    assert ref.uri == f"gs://{BUCKET}/{RAW_NAME}"
    assert ref.size is None and ref.md5_hash is None


def test_an_unknown_payload_format_is_rejected_and_says_which_work() -> None:
    with pytest.raises(Rejected) as info:
        parse_notification(attributes(payloadFormat="PROTOBUF"), b"\x08\x01", SCOPE)
    assert info.value.why == "payload_format"
    assert "JSON_API_V1 or NONE" in info.value.detail


@pytest.mark.parametrize("outside", [{"bucket": "someone-else"},
                                     {"name": "elsewhere/yellow_tripdata_2024-01.parquet"}])
@pytest.mark.parametrize("oddity", [{"payloadFormat": "PROTOBUF"}, {"generation": "abc"},
                                    {"payloadFormat": "NONE"}])
def test_scope_is_checked_before_format(outside: dict[str, str], oddity: dict[str, str]
                                        ) -> None:
    """A message about another bucket or prefix is ignored, whatever its format, not
    reported (and recorded) as rejected."""
    with pytest.raises(Ignored):
        parse_notification(attributes(**outside, **oddity), b"not json", SCOPE)


def test_rejected_and_ignored_are_distinct_exceptions() -> None:
    assert not issubclass(Rejected, Ignored)
    assert not issubclass(Ignored, Rejected)


# -- scope_of --------------------------------------------------------------------------


def test_scope_of_settings(tmp_path: Path) -> None:
    settings = Settings(profile="gcp", home=tmp_path, bucket=BUCKET, raw_prefix="in",
                        processed_prefix="out/")
    assert scope_of(settings) == Scope(buckets=frozenset({BUCKET}), prefixes=("in/", "out/"))
    unbounded = Settings(profile="gcp", home=tmp_path, bucket="")
    assert scope_of(unbounded).buckets == frozenset()


# -- to_submission ----------------------------------------------------------------------


@dataclass
class FakeMessage:
    """What to_submission uses of google.cloud.pubsub_v1 Message."""

    attributes: dict[str, str]
    data: bytes
    message_id: str = "8712345678901234"
    publish_time: datetime = field(
        default_factory=lambda: datetime(2024, 1, 2, 3, 4, 6, 500000, tzinfo=UTC))
    calls: list[str] = field(default_factory=list)

    def ack(self) -> None:
        self.calls.append("ack")

    def nack(self) -> None:
        self.calls.append("nack")


@dataclass
class FakeSource:
    path: str = SUBSCRIPTION


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(profile="gcp", home=tmp_path, bucket=BUCKET, gcp_project="taxi-project")


def submit(message: FakeMessage, settings: Settings, metrics: BridgeMetrics) -> Any:
    return to_submission(message, settings, scope_of(settings), FakeSource(),  # type: ignore[arg-type]
                         metrics)


def test_ignored_message_is_acked_at_once_and_counted(settings: Settings) -> None:
    metrics = BridgeMetrics()
    message = FakeMessage(attributes(bucket="someone-else"), data(bucket="someone-else"))
    assert submit(message, settings, metrics) is None
    assert message.calls == ["ack"]
    assert metrics.value("ignored", why="bucket") == 1
    assert metrics.value("received") == 1
    assert metrics.value("rejected", why="bucket") == 0


def test_ignored_event_type_is_counted_under_its_kind(settings: Settings) -> None:
    metrics = BridgeMetrics()
    for i, event_type in enumerate(["OBJECT_DELETE", "OBJECT_ARCHIVE"]):
        message = FakeMessage(attributes(event_type=event_type), data(), message_id=str(i))
        assert submit(message, settings, metrics) is None
        assert message.calls == ["ack"]
    prefix_msg = FakeMessage(attributes("rejects/x.parquet"), data(name="rejects/x.parquet"))
    assert submit(prefix_msg, settings, metrics) is None
    assert prefix_msg.calls == ["ack"]
    assert metrics.value("ignored", why="event_type") == 2
    assert metrics.value("ignored", why="prefix") == 1
    assert metrics.value("received") == 3


def test_rejected_message_becomes_a_rejected_event_not_yet_acked(settings: Settings) -> None:
    metrics = BridgeMetrics()
    message = FakeMessage(attributes(), b"\xff\xfe definitely not json")
    sub = submit(message, settings, metrics)
    assert sub is not None
    assert message.calls == []  # acked only once the event is stored
    assert sub.event.event == events.NOTIFICATION_REJECTED
    assert sub.event.resource.id == f"pubsub://{SUBSCRIPTION}/messages/{message.message_id}"
    assert sub.event.payload["why"] == "not_json"
    assert sub.event.payload["message_id"] == message.message_id
    assert sub.event.payload["attributes"] == message.attributes
    assert sub.event.payload["data_bytes"] == len(message.data)
    assert "definitely not json" in sub.event.payload["data_preview"]
    assert metrics.value("rejected", why="not_json") == 1
    assert metrics.value("received") == 1
    sub.ack()
    sub.nack()
    assert message.calls == ["ack", "nack"]  # the relay's callbacks are the message's


def test_rejected_event_id_is_deterministic_per_message_id(settings: Settings) -> None:
    metrics = BridgeMetrics()
    first = submit(FakeMessage(attributes(), b"junk", message_id="111"), settings, metrics)
    again = submit(FakeMessage(attributes(), b"other junk", message_id="111"), settings,
                   metrics)
    other = submit(FakeMessage(attributes(), b"junk", message_id="222"), settings, metrics)
    assert first.event.id == again.event.id
    assert first.event.id != other.event.id
    assert first.event.id.version == 5
    assert metrics.value("rejected", why="not_json") == 3


def test_rejected_event_preview_is_bounded_and_id_depends_on_subscription() -> None:
    message = FakeMessage({}, b"x" * 5000, message_id="333")
    error = Rejected("missing_attributes", "attributes bucketId are missing")
    event = rejected_event(SUBSCRIPTION, message, error)  # type: ignore[arg-type]
    assert len(event.payload["data_preview"]) == 1024
    assert event.payload["data_bytes"] == 5000
    assert event.payload["detail"] == "attributes bucketId are missing"
    elsewhere = rejected_event("projects/p/subscriptions/other", message, error)  # type: ignore[arg-type]
    assert event.id != elsewhere.id


def test_valid_message_becomes_finalized_event_with_deterministic_id(
        settings: Settings) -> None:
    metrics = BridgeMetrics()
    message = FakeMessage(attributes(), data(), message_id="444")
    sub = submit(message, settings, metrics)
    assert sub is not None
    assert message.calls == []
    assert sub.event.event == events.OBJECT_FINALIZED
    assert sub.event.id == events.object_event_id(BUCKET, RAW_NAME, int(GENERATION))
    assert sub.event.resource.id == f"gs://{BUCKET}/{RAW_NAME}"
    assert sub.event.resource[events.LABEL_STAGE] == events.STAGE_RAW
    assert sub.event.resource[events.LABEL_GENERATION] == GENERATION
    assert sub.event.payload["message_id"] == "444"
    assert sub.event.payload["publish_time"] == message.publish_time.isoformat()
    assert sub.event.payload["size"] == 49961641
    assert metrics.value("received") == 1
    assert metrics.value("ignored", why="bucket") == 0
    sub.ack()
    assert message.calls == ["ack"]


def test_two_notifications_of_one_generation_share_the_event_id(settings: Settings) -> None:
    metrics = BridgeMetrics()
    a = submit(FakeMessage(attributes(), data(), message_id="1"), settings, metrics)
    b = submit(FakeMessage(attributes(), data(), message_id="2"), settings, metrics)
    newer = submit(FakeMessage(attributes(generation="1704164645678902"), data(),
                               message_id="3"), settings, metrics)
    assert a.event.id == b.event.id
    assert a.event.id != newer.event.id
    assert isinstance(a.event.id, uuid.UUID)


def test_lineage_custom_metadata_of_a_processed_object_becomes_its_extra() -> None:
    lineage = {"taxi_pipeline.source_uri": f"gs://{BUCKET}/{RAW_NAME}",
               "taxi_pipeline.source_generation": "41", "someone.else": "x"}
    ref = parse_notification(attributes(PROCESSED_NAME),
                             data(name=PROCESSED_NAME, metadata=lineage), SCOPE)
    assert ref.extra == {"taxi_pipeline.source_uri": f"gs://{BUCKET}/{RAW_NAME}",
                         "taxi_pipeline.source_generation": "41"}
    assert parse_notification(attributes(), data(), SCOPE).extra == {}
    assert parse_notification(attributes(), data(metadata="junk"), SCOPE).extra == {}
