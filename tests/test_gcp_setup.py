"""gcp_setup.setup against the Pub/Sub emulator and fake-gcs-server, checked with the clients."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pytest
from google.api_core import exceptions as google_exceptions
from google.iam.v1 import policy_pb2
from support.emulators import emulators_available, fake_gcs_server, pubsub_emulator

from taxi_pipeline.gcp import clients as gcp_clients
from taxi_pipeline.gcp import setup as gcp_setup
from taxi_pipeline.gcp.setup import EMULATOR_NO_NOTIFICATIONS, setup
from taxi_pipeline.settings import Settings

PROJECT = "taxi-setup"


@pytest.fixture(scope="module")
def emulators(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    reason = emulators_available()
    if reason is not None:
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("fake-gcs")
    with (
        pytest.MonkeyPatch.context() as mp,
        pubsub_emulator(PROJECT) as pubsub,
        fake_gcs_server(root) as gcs,
    ):
        mp.setenv("PUBSUB_EMULATOR_HOST", pubsub.host_port)
        mp.setenv("STORAGE_EMULATOR_HOST", gcs.url)
        yield


def emulator_settings(name: str, **overrides: Any) -> Settings:
    """Resources of their own per test: the emulators are shared by the module."""
    return Settings(
        profile="emulator",
        bucket=f"{name}-bucket",
        gcp_project=PROJECT,
        pubsub_topic=f"{name}-objects",
        pubsub_subscription=f"{name}-bridge",
        pubsub_dead_letter_topic=f"{name}-dead-letter",
        **overrides,
    )


def paths(settings: Settings) -> dict[str, str]:
    project = f"projects/{settings.gcp_project}"
    return {
        "topic": f"{project}/topics/{settings.pubsub_topic}",
        "dead_letter_topic": f"{project}/topics/{settings.pubsub_dead_letter_topic}",
        "subscription": f"{project}/subscriptions/{settings.pubsub_subscription}",
        "dead_letter_subscription":
            f"{project}/subscriptions/{settings.pubsub_dead_letter_topic}-sub",
    }


def test_setup_creates_bucket_topics_and_subscriptions(emulators: None) -> None:
    settings = emulator_settings("fresh", pubsub_ack_deadline_seconds=45,
                                 pubsub_max_delivery_attempts=7)
    lines = setup(settings)
    names = paths(settings)

    assert gcp_clients.storage_client(settings).lookup_bucket(settings.bucket) is not None
    publisher = gcp_clients.publisher_client(settings)
    assert publisher.get_topic(topic=names["topic"]).name == names["topic"]
    assert publisher.get_topic(topic=names["dead_letter_topic"]).name == names["dead_letter_topic"]

    subscriber = gcp_clients.subscriber_client(settings)
    bridge = subscriber.get_subscription(subscription=names["subscription"])
    assert bridge.topic == names["topic"]
    assert bridge.ack_deadline_seconds == 45
    # The emulator keeps both policies as sent; check what it really stored.
    assert bridge.retry_policy.minimum_backoff == timedelta(seconds=10)
    assert bridge.retry_policy.maximum_backoff == timedelta(seconds=600)
    assert bridge.dead_letter_policy.dead_letter_topic == names["dead_letter_topic"]
    assert bridge.dead_letter_policy.max_delivery_attempts == 7
    parked = subscriber.get_subscription(subscription=names["dead_letter_subscription"])
    assert parked.topic == names["dead_letter_topic"]
    assert not parked.dead_letter_policy.dead_letter_topic

    assert lines[0] == "bucket gs://fresh-bucket: created in US-CENTRAL1"  # emulator's location
    assert lines[1:5] == [
        f"topic {names['topic']}: created",
        f"topic {names['dead_letter_topic']}: created",
        f"subscription {names['dead_letter_subscription']}: created on "
        f"{names['dead_letter_topic']}",
        f"subscription {names['subscription']}: created on {names['topic']} (ack deadline "
        f"45 s, retry backoff 10-600 s, dead letter to {names['dead_letter_topic']} after "
        "7 attempts)",
    ]
    assert lines[5] == "iam: skipped, the emulators neither implement nor enforce IAM"
    assert lines[6:] == [
        f"notification gs://fresh-bucket/{prefix}* -> {names['topic']}: "
        "not supported by the emulator; fake-gcs-server is started with -event.* flags instead"
        for prefix in ("raw/", "processed/")
    ]


def test_setup_twice_is_idempotent(emulators: None) -> None:
    settings = emulator_settings("twice")
    setup(settings)
    subscriber = gcp_clients.subscriber_client(settings)
    before = subscriber.get_subscription(subscription=paths(settings)["subscription"])

    again = setup(settings)

    assert not [line for line in again if "created" in line or "updated" in line]
    assert sum(line.endswith(": already exists") for line in again) == 5
    assert sum(line.endswith(EMULATOR_NO_NOTIFICATIONS) for line in again) == 2
    assert subscriber.get_subscription(subscription=paths(settings)["subscription"]) == before


def test_setup_brings_a_drifted_subscription_back_in_line(emulators: None) -> None:
    setup(emulator_settings("drift", pubsub_ack_deadline_seconds=30))
    settings = emulator_settings("drift", pubsub_ack_deadline_seconds=120,
                                 pubsub_max_delivery_attempts=5)

    lines = setup(settings)

    names = paths(settings)
    assert any(line.startswith(f"subscription {names['subscription']}: already exists, "
                               "updated ack_deadline_seconds, dead_letter_policy")
               for line in lines)
    bridge = gcp_clients.subscriber_client(settings).get_subscription(
        subscription=names["subscription"])
    assert bridge.ack_deadline_seconds == 120
    assert bridge.dead_letter_policy.max_delivery_attempts == 5
    assert bridge.retry_policy.maximum_backoff == timedelta(seconds=600)


def test_a_subscription_on_another_topic_is_an_error(emulators: None) -> None:
    settings = emulator_settings("wrong")
    names = paths(settings)
    publisher = gcp_clients.publisher_client(settings)
    publisher.create_topic(name=f"projects/{PROJECT}/topics/somewhere-else")
    gcp_clients.subscriber_client(settings).create_subscription(
        name=names["subscription"], topic=f"projects/{PROJECT}/topics/somewhere-else")

    with pytest.raises(RuntimeError, match="cannot change topic"):
        setup(settings)


def test_setup_refuses_the_local_profile() -> None:
    with pytest.raises(ValueError, match="local profile"):
        setup(Settings(profile="local"))


def test_setup_names_missing_settings() -> None:
    with pytest.raises(RuntimeError, match="TAXI_BUCKET"):
        setup(Settings(profile="emulator", gcp_project=PROJECT))


def test_missing_notification_api_is_only_excused_in_the_emulator_profile(
    emulators: None,
) -> None:
    """Outside the emulator profile a 404 from notificationConfigs is a real error."""
    emulator = emulator_settings("notify")
    setup(emulator)
    bucket = gcp_clients.storage_client(emulator).bucket(emulator.bucket)
    as_gcp = emulator.model_copy(update={"profile": "gcp"})
    with pytest.raises(google_exceptions.NotFound):
        gcp_setup.ensure_notifications(bucket, as_gcp)


# -- IAM (no emulator implements it: the emulator answers 501, so a stand-in client) ----------


class PolicyStore:
    """Stands in for get/set_iam_policy of the Pub/Sub clients."""

    def __init__(self, policy: policy_pb2.Policy) -> None:
        self.policy = policy
        self.writes = 0

    def get_iam_policy(self, request: dict[str, Any]) -> policy_pb2.Policy:
        copy = policy_pb2.Policy()
        copy.CopyFrom(self.policy)
        return copy

    def set_iam_policy(self, request: dict[str, Any]) -> policy_pb2.Policy:
        self.writes += 1
        self.policy = request["policy"]
        return self.policy


def test_grant_adds_the_member_once_and_keeps_other_bindings() -> None:
    existing = policy_pb2.Policy(etag=b"v1", bindings=[
        policy_pb2.Binding(role="roles/pubsub.viewer", members=["user:a@example.com"]),
        policy_pb2.Binding(role="roles/pubsub.publisher", members=["user:b@example.com"]),
    ])
    client = PolicyStore(existing)
    member = "serviceAccount:service-42@gs-project-accounts.iam.gserviceaccount.com"

    first = gcp_setup.grant(client, "projects/p/topics/t", "roles/pubsub.publisher", member)
    second = gcp_setup.grant(client, "projects/p/topics/t", "roles/pubsub.publisher", member)

    assert first.endswith(": granted") and second.endswith(": already granted")
    assert client.writes == 1
    assert client.policy.etag == b"v1"  # sent back: a concurrent edit is rejected, not lost
    roles = {b.role: list(b.members) for b in client.policy.bindings}
    assert roles == {
        "roles/pubsub.viewer": ["user:a@example.com"],
        "roles/pubsub.publisher": ["user:b@example.com", member],
    }


def test_pubsub_service_agent_is_derived_from_the_gcs_one() -> None:
    gcs_agent = "service-123456@gs-project-accounts.iam.gserviceaccount.com"
    assert (gcp_setup.pubsub_service_agent(gcs_agent)
            == "service-123456@gcp-sa-pubsub.iam.gserviceaccount.com")
    with pytest.raises(RuntimeError, match="unexpected"):
        gcp_setup.pubsub_service_agent("someone@example.com")


def test_the_emulators_really_lack_iam_and_notifications(emulators: None) -> None:
    """Why the emulator profile skips IAM and notification configs: pin the behaviour."""
    settings = emulator_settings("limits")
    setup(settings)
    publisher = gcp_clients.publisher_client(settings)
    with pytest.raises(google_exceptions.MethodNotImplemented):
        publisher.get_iam_policy(request={"resource": paths(settings)["topic"]})
    bucket = gcp_clients.storage_client(settings).bucket(settings.bucket)
    with pytest.raises(google_exceptions.NotFound):
        list(bucket.list_notifications())
