"""`taxi-pipeline dead-letters list|replay` against the real Pub/Sub emulator.

Dead letters are published straight to the dead-letter topic, with the
attributes Pub/Sub adds when it dead-letters (the emulator adds the same ones;
tests/test_bridge_pubsub.py runs the bridge on a subscription with a
dead-letter policy).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import Future

import pytest
from google.cloud import pubsub_v1
from google.protobuf.duration_pb2 import Duration
from google.pubsub_v1.types import DeadLetterPolicy, RetryPolicy, Subscription
from support.emulators import emulators_available, pubsub_emulator
from support.pubsub import drain

from taxi_pipeline import cli
from taxi_pipeline.ops import dead_letters
from taxi_pipeline.ops.dead_letters import DeadLetterQueue
from taxi_pipeline.settings import Settings, get_settings

PROJECT = "taxi-dead-letters"
TOPIC = "taxi-objects"
BRIDGE = "taxi-objects-bridge"
DEAD_TOPIC = "taxi-objects-dead-letter"
BUCKET = "taxi-bucket"
DEAD_LETTER_ATTEMPTS = 5  # the fewest Pub/Sub allows


@pytest.fixture(scope="module")
def emulator() -> Iterator[str]:
    reason = emulators_available()
    if reason:
        pytest.skip(reason)
    with pubsub_emulator(PROJECT) as pubsub:
        yield pubsub.host_port


@pytest.fixture
def settings(emulator: str, monkeypatch: pytest.MonkeyPatch,
             request: pytest.FixtureRequest) -> Iterator[Settings]:
    """The topics and subscriptions `gcp setup` makes, named for this test alone."""
    monkeypatch.setenv("PUBSUB_EMULATOR_HOST", emulator)
    suffix = request.node.name.removeprefix("test_")[:30]
    values = {"TAXI_PROFILE": "emulator", "TAXI_GCP_PROJECT": PROJECT,
              "TAXI_PUBSUB_TOPIC": f"{TOPIC}-{suffix}",
              "TAXI_PUBSUB_SUBSCRIPTION": f"{BRIDGE}-{suffix}",
              "TAXI_PUBSUB_DEAD_LETTER_TOPIC": f"{DEAD_TOPIC}-{suffix}"}
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()
    settings = get_settings()
    publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
    topic = publisher.topic_path(PROJECT, settings.pubsub_topic)
    dead_topic = publisher.topic_path(PROJECT, settings.pubsub_dead_letter_topic)
    bridge = subscriber.subscription_path(PROJECT, settings.pubsub_subscription)
    dead = subscriber.subscription_path(PROJECT, dead_letters.subscription_id(settings))
    publisher.create_topic(name=topic)
    publisher.create_topic(name=dead_topic)
    subscriber.create_subscription(name=dead, topic=dead_topic)
    subscriber.create_subscription(request=Subscription(
        name=bridge, topic=topic, ack_deadline_seconds=10,
        retry_policy=RetryPolicy(minimum_backoff=Duration(seconds=1),
                                 maximum_backoff=Duration(seconds=2)),
        dead_letter_policy=DeadLetterPolicy(dead_letter_topic=dead_topic,
                                            max_delivery_attempts=DEAD_LETTER_ATTEMPTS)))
    yield settings
    for path in (bridge, dead):
        subscriber.delete_subscription(subscription=path)
    for path in (topic, dead_topic):
        publisher.delete_topic(topic=path)


def notification(name: str, generation: int) -> tuple[bytes, dict[str, str]]:
    data = json.dumps({"bucket": BUCKET, "name": name, "generation": str(generation)}).encode()
    return data, {"bucketId": BUCKET, "objectId": name, "objectGeneration": str(generation),
                  "eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}


def dead_letter(settings: Settings, name: str, generation: int,
                extra: dict[str, str] | None = None) -> None:
    """Publish a notification straight to the dead-letter topic."""
    publisher = pubsub_v1.PublisherClient()
    data, attributes = notification(name, generation)
    publisher.publish(publisher.topic_path(PROJECT, settings.pubsub_dead_letter_topic), data,
                      **attributes, **(extra or {})).result(timeout=30)


# What Pub/Sub (and the emulator, seen in a standalone run) adds to a message it dead-letters.
DEAD_LETTERED = {"CloudPubSubDeadLetterSourceDeliveryCount": str(DEAD_LETTER_ATTEMPTS),
                 "CloudPubSubDeadLetterSourceSubscription": BRIDGE,
                 "CloudPubSubDeadLetterSourceSubscriptionProject": PROJECT,
                 "CloudPubSubDeadLetterSourceTopicPublishTime": "2026-01-02T03:04:05.678Z"}


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = cli.main(["dead-letters", *argv])
    return code, capsys.readouterr().out


def test_list_dry_run_and_replay_move_dead_letters_back_to_the_bridge(
        settings: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    dead_letter(settings, "raw/yellow/nacked.parquet", 101, DEAD_LETTERED)
    dead_letter(settings, "raw/yellow/published.parquet", 202)
    publisher = pubsub_v1.PublisherClient()
    queue = DeadLetterQueue(settings)
    topic = publisher.topic_path(PROJECT, settings.pubsub_topic)
    bridge = queue.subscriber.subscription_path(PROJECT, settings.pubsub_subscription)

    code, out = run_cli(capsys, "list")
    assert code == 0
    assert f"gs://{BUCKET}/raw/yellow/nacked.parquet generation 101 " in out
    assert (f"generation 101 published 2026-01-02T03:04:05.678Z delivery attempts "
            f"{DEAD_LETTER_ATTEMPTS} ") in out  # what Pub/Sub recorded
    assert f"gs://{BUCKET}/raw/yellow/published.parquet generation 202 " in out
    assert "delivery attempts ? " in out  # published by hand: unknown
    assert f"2 dead letter(s) in {queue.path}" in out

    code, out = run_cli(capsys, "replay", "--dry-run")
    assert code == 0
    assert out.count("would replay gs://") == 2
    assert "(dry run: nothing changed)" in out
    assert len(queue.list()) == 2  # still there, released at once (no lease to wait out)
    assert drain(bridge, topic) == []

    code, out = run_cli(capsys, "replay")
    assert code == 0, out
    assert out.count("replayed gs://") == 2
    replayed = drain(bridge, topic)
    assert sorted((m.attributes["objectId"], m.attributes["objectGeneration"])
                  for m in replayed) == [("raw/yellow/nacked.parquet", "101"),
                                         ("raw/yellow/published.parquet", "202")]
    for message in replayed:  # the notification as GCS sent it, nothing Pub/Sub added
        expected_data, expected_attributes = notification(message.attributes["objectId"],
                                                          int(message.attributes[
                                                              "objectGeneration"]))
        assert message.data == expected_data
        assert dict(message.attributes) == expected_attributes
    assert drain(queue.path, publisher.topic_path(PROJECT,
                                                  settings.pubsub_dead_letter_topic)) == []


class FailingPublisher:
    """Publishes nothing: every future fails, as when the topic is gone or access denied."""

    def topic_path(self, project: str, topic: str) -> str:
        return f"projects/{project}/topics/{topic}"

    def publish(self, topic: str, data: bytes, **attributes: str) -> Future[str]:
        future: Future[str] = Future()
        future.set_exception(RuntimeError("publish refused"))
        return future


def test_a_dead_letter_whose_publish_fails_stays(settings: Settings) -> None:
    dead_letter(settings, "raw/green/stays.parquet", 7)
    queue = DeadLetterQueue(settings, publisher=FailingPublisher())
    report = queue.replay()
    assert report.replayed == []
    assert [(d.object_uri, why) for d, why in report.failed] == [
        (f"gs://{BUCKET}/raw/green/stays.parquet", "RuntimeError: publish refused")]
    assert [d.object_uri for d in DeadLetterQueue(settings).list()] == [
        f"gs://{BUCKET}/raw/green/stays.parquet"]


def test_a_missing_dead_letter_subscription_says_to_run_setup(
        settings: Settings, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAXI_PUBSUB_DEAD_LETTER_TOPIC", "no-such-dead-letter-topic")
    get_settings.cache_clear()
    assert cli.main(["dead-letters", "list"]) == 1
    assert "gcp setup" in capsys.readouterr().err
