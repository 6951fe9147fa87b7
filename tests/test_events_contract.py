"""The event contract (taxi_pipeline/events.py) and the object helpers it builds on."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest

from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef, dataset_of, month_of, parse_uri, sibling_name

PREFIXES = {"raw": "raw/", "processed": "processed/", "rejects": "rejects/",
            "quarantine": "quarantine/"}
RAW_NAME = "raw/yellow/2024/yellow_tripdata_2024-01.parquet"
PROCESSED_NAME = "processed/green/2023/green_tripdata_2023-12.parquet"


def gcs_ref(name: str = RAW_NAME, generation: int = 1_700_000_000_000_001, **kw: object
            ) -> ObjectRef:
    return ObjectRef(bucket="taxi-bucket", name=name, generation=generation, **kw)  # type: ignore[arg-type]


# -- deterministic ids ----------------------------------------------------------------


def test_event_id_is_a_deterministic_uuid5() -> None:
    a = events.object_event_id("taxi-bucket", RAW_NAME, 5)
    b = events.object_event_id("taxi-bucket", RAW_NAME, 5)
    assert a == b
    assert isinstance(a, uuid.UUID)
    assert a.version == 5


@pytest.mark.parametrize(
    ("bucket", "name", "generation"),
    [
        ("taxi-bucket", RAW_NAME, 6),  # another generation
        ("other-bucket", RAW_NAME, 5),
        ("taxi-bucket", PROCESSED_NAME, 5),
        ("taxi-bucket/raw", "yellow/2024/yellow_tripdata_2024-01.parquet", 5),  # no aliasing
    ],
)
def test_event_id_differs_for_another_object_generation(
    bucket: str, name: str, generation: int
) -> None:
    assert events.object_event_id(bucket, name, generation) != events.object_event_id(
        "taxi-bucket", RAW_NAME, 5
    )


def test_finalized_event_carries_the_deterministic_id() -> None:
    obj = gcs_ref(generation=5)
    first = events.object_finalized(obj, PREFIXES, message_id="1")
    redelivered = events.object_finalized(obj, PREFIXES, message_id="2")
    assert first.id == redelivered.id == events.object_event_id("taxi-bucket", RAW_NAME, 5)
    newer = events.object_finalized(gcs_ref(generation=6), PREFIXES)
    assert newer.id != first.id
    assert first.event == events.OBJECT_FINALIZED == "storage.object.finalized"
    assert events.LABEL_REEMIT not in first.resource


def test_reemit_gets_a_fresh_random_id_and_the_reemit_label() -> None:
    obj = gcs_ref(generation=5)
    deterministic = events.object_event_id(obj.bucket, obj.name, obj.generation)
    one = events.object_finalized(obj, PREFIXES, reemit=True)
    two = events.object_finalized(obj, PREFIXES, reemit=True)
    assert one.id != deterministic
    assert two.id != deterministic
    assert one.id != two.id
    assert one.id.version == 4
    assert one.resource["pipeline.reemit"] == "true"
    # the rest of the resource is the same as for a notification
    plain = events.object_finalized(obj, PREFIXES)
    assert {k: v for k, v in one.resource.items() if k != "pipeline.reemit"} == dict(
        plain.resource.items()
    )


# -- resource and labels -----------------------------------------------------------------


def test_gcs_resource_id_and_labels() -> None:
    event = events.object_finalized(gcs_ref(generation=123), PREFIXES)
    resource = event.resource
    assert resource.id == f"gs://taxi-bucket/{RAW_NAME}"
    assert resource["prefect.resource.name"] == "yellow_tripdata_2024-01.parquet"
    assert resource["storage.bucket"] == "taxi-bucket"
    assert resource["storage.object"] == RAW_NAME
    assert resource["storage.generation"] == "123"
    assert resource["pipeline.stage"] == "raw"
    assert resource["pipeline.dataset"] == "yellow"


def test_file_resource_id_is_the_file_uri(tmp_path: Path) -> None:
    bucket = tmp_path / "my bucket"
    obj = ObjectRef(bucket=str(bucket), name=PROCESSED_NAME, generation=9, scheme="file")
    event = events.object_finalized(obj, PREFIXES)
    assert event.resource.id == (bucket / PROCESSED_NAME).as_uri()
    assert event.resource.id.startswith("file:///")
    assert "my%20bucket" in event.resource.id
    assert event.resource["storage.bucket"] == str(bucket)
    assert event.resource["storage.object"] == PROCESSED_NAME
    assert event.resource["pipeline.stage"] == "processed"
    assert event.resource["pipeline.dataset"] == "green"
    # the URI parses back to the path the object lives at
    assert parse_uri(event.resource.id) == ("file", "", str(bucket / PROCESSED_NAME))


@pytest.mark.parametrize(
    ("name", "stage", "dataset"),
    [
        ("raw/green/2024/green_tripdata_2024-02.parquet", "raw", "green"),
        ("processed/yellow/2024/yellow_tripdata_2024-02.parquet", "processed", "yellow"),
        ("rejects/yellow/2024/yellow_tripdata_2024-02.parquet", "rejects", "yellow"),
        ("quarantine/fhvhv/2024/fhvhv_tripdata_2024-02.parquet", "quarantine", "fhvhv"),
        ("incoming/yellow_tripdata_2024-02.parquet", "other", "yellow"),
        ("raw/green/notes.txt", "raw", "green"),  # any name under raw/ is in the raw stage
    ],
)
def test_stage_and_dataset_labels(name: str, stage: str, dataset: str) -> None:
    event = events.object_finalized(gcs_ref(name=name), PREFIXES)
    assert event.resource["pipeline.stage"] == stage
    assert event.resource["pipeline.dataset"] == dataset


def test_stage_other_when_no_prefix_matches() -> None:
    event = events.object_finalized(gcs_ref(name="raw-old/x.parquet"), {"raw": "raw/"})
    assert event.resource["pipeline.stage"] == "other"
    assert event.resource["pipeline.dataset"] == "unknown"


def test_labels_are_strings() -> None:
    event = events.object_finalized(gcs_ref(generation=2**62), PREFIXES)
    for key, value in event.resource.items():
        assert isinstance(value, str), key
    assert event.resource["storage.generation"] == str(2**62)


# -- payload ------------------------------------------------------------------------------


def test_payload_fields() -> None:
    created = datetime(2024, 2, 1, 3, 4, 5, tzinfo=UTC)
    updated = datetime(2024, 2, 1, 3, 4, 6, tzinfo=UTC)
    published = datetime(2024, 2, 1, 3, 4, 7, tzinfo=UTC)
    obj = gcs_ref(
        size=48_123_456,
        md5_hash="q2hPEzm9aUVuWfXK0wN+Pg==",
        crc32c="AAAAAA==",
        content_type="application/vnd.apache.parquet",
        created=created,
        updated=updated,
    )
    event = events.object_finalized(obj, PREFIXES, message_id="1234567890",
                                    publish_time=published)
    assert event.payload == {
        "size": 48_123_456,
        "md5_hash": "q2hPEzm9aUVuWfXK0wN+Pg==",
        "crc32c": "AAAAAA==",
        "content_type": "application/vnd.apache.parquet",
        "created": created.isoformat(),
        "updated": updated.isoformat(),
        "message_id": "1234567890",
        "publish_time": published.isoformat(),
    }
    # the whole event serialises to JSON (what goes over the wire)
    dumped = event.model_dump(mode="json")
    assert dumped["id"] == str(event.id)
    assert dumped["resource"]["storage.generation"] == str(obj.generation)


def test_payload_omits_unknown_fields() -> None:
    event = events.object_finalized(gcs_ref(size=10), PREFIXES)
    assert event.payload == {"size": 10}


def test_related_object_and_table_resources() -> None:
    out = gcs_ref(name=PROCESSED_NAME, generation=77)
    related = events.object_role_resource(out, "output", PREFIXES)
    assert related["prefect.resource.id"] == f"gs://taxi-bucket/{PROCESSED_NAME}"
    assert related["prefect.resource.role"] == "output"
    assert related["pipeline.stage"] == "processed"
    assert related["storage.generation"] == "77"
    table = events.table_resource("bigquery://p.taxi.trips")
    assert table == {"prefect.resource.id": "bigquery://p.taxi.trips",
                     "prefect.resource.role": "table"}
    resources = events.related_resources([related, table])
    assert [r.role for r in resources] == ["output", "table"]


# -- objects.py helpers -----------------------------------------------------------------


def test_parse_gs_uri() -> None:
    assert parse_uri("gs://taxi-bucket/raw/a b.parquet") == (
        "gs", "taxi-bucket", "raw/a b.parquet")


def test_parse_file_uri_unquotes() -> None:
    assert parse_uri("file:///tmp/my%20bucket/raw/x.parquet") == (
        "file", "", "/tmp/my bucket/raw/x.parquet")


@pytest.mark.parametrize(
    "uri",
    [
        "gs://taxi-bucket",  # no object
        "gs://taxi-bucket/",
        "gs:///raw/x.parquet",  # no bucket
        "s3://taxi-bucket/raw/x.parquet",
        "https://storage.googleapis.com/taxi-bucket/raw/x.parquet",
        "/tmp/bucket/raw/x.parquet",  # a bare path is not a URI
        "",
    ],
)
def test_parse_uri_rejects(uri: str) -> None:
    with pytest.raises(ValueError):
        parse_uri(uri)


def test_object_ref_uri_round_trips() -> None:
    obj = gcs_ref()
    assert parse_uri(obj.uri) == ("gs", obj.bucket, obj.name)
    assert obj.basename == "yellow_tripdata_2024-01.parquet"


@pytest.mark.parametrize(
    ("name", "dataset"),
    [
        ("raw/yellow/2024/yellow_tripdata_2024-01.parquet", "yellow"),
        ("green_tripdata_2019-12.parquet", "green"),
        ("raw/fhv/2024/fhv_tripdata_2024-01.parquet", "fhv"),
        ("raw/fhvhv/2024/fhvhv_tripdata_2024-01.parquet", "fhvhv"),
        # the file name wins over the folder
        ("raw/misc/2024/green_tripdata_2024-01.parquet", "green"),
        # no TLC name: the folder after the stage
        ("raw/yellow/2024/upload.parquet", "yellow"),
        ("raw/green/x.parquet", "green"),
        ("x.parquet", "unknown"),
        ("raw/x.parquet", "unknown"),
    ],
)
def test_dataset_of(name: str, dataset: str) -> None:
    assert dataset_of(name) == dataset


@pytest.mark.parametrize(
    ("name", "month"),
    [
        ("raw/yellow/2024/yellow_tripdata_2024-01.parquet", (2024, 1)),
        ("green_tripdata_2019-12.parquet", (2019, 12)),
        ("raw/yellow/2024/yellow_tripdata_2024-13.parquet", None),
        ("raw/yellow/2024/yellow_tripdata_2024-00.parquet", None),
        ("raw/yellow_tripdata_2024-01/upload.parquet", None),  # only the file name counts
        ("raw/yellow/2024/upload.parquet", None),
    ],
)
def test_month_of(name: str, month: tuple[int, int] | None) -> None:
    assert month_of(name) == month


def test_sibling_name() -> None:
    assert sibling_name(RAW_NAME, "raw/", "processed/") == (
        "processed/yellow/2024/yellow_tripdata_2024-01.parquet")
    assert sibling_name(RAW_NAME, "raw/", "quarantine/") == (
        "quarantine/yellow/2024/yellow_tripdata_2024-01.parquet")
    # outside the from-prefix: the full name goes under the new prefix
    assert sibling_name("incoming/x.parquet", "raw/", "processed/") == (
        "processed/incoming/x.parquet")


def test_a_processed_object_with_lineage_links_its_raw_source_and_keeps_its_id() -> None:
    lineage = {events.EXTRA_SOURCE_URI: f"gs://taxi-bucket/{RAW_NAME}",
               events.EXTRA_SOURCE_GENERATION: "41"}
    bare = events.object_finalized(gcs_ref(PROCESSED_NAME, generation=5), PREFIXES)
    linked = events.object_finalized(gcs_ref(PROCESSED_NAME, generation=5, extra=lineage),
                                     PREFIXES)
    assert bare.related == []
    assert linked.id == bare.id == events.object_event_id("taxi-bucket", PROCESSED_NAME, 5)
    (source,) = linked.related
    assert source.id == f"gs://taxi-bucket/{RAW_NAME}"
    assert source.role == "source"
    assert source[events.LABEL_GENERATION] == "41"
    assert source["prefect.resource.name"] == "yellow_tripdata_2024-01.parquet"
