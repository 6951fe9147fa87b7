"""Create the bucket, topics, subscriptions and notifications the pipeline needs.

Idempotent: run it on every deploy. What exists is left alone (a subscription
whose settings drifted is updated in place), so it is safe against production.
Only the official client libraries are used, so it runs wherever the flows run.
"""

from __future__ import annotations

import re
from typing import Any

from google.api_core import exceptions as google_exceptions
from google.api_core.retry import Retry, if_exception_type
from google.cloud import storage  # type: ignore[attr-defined]
from google.protobuf import duration_pb2, field_mask_pb2
from google.pubsub_v1.types import DeadLetterPolicy, RetryPolicy, Subscription

from taxi_pipeline.gcp import clients as gcp_clients
from taxi_pipeline.settings import DEAD_LETTER_SUBSCRIPTION_SUFFIX, Settings

# Redelivery backoff: long enough that a failing Prefect server is not hammered,
# short enough that a transient failure heals within minutes.
RETRY_MIN_BACKOFF_SECONDS = 10
RETRY_MAX_BACKOFF_SECONDS = 600

EMULATOR_NO_NOTIFICATIONS = (
    "not supported by the emulator; fake-gcs-server is started with -event.* flags instead"
)
PUBLISHER_ROLE = "roles/pubsub.publisher"
SUBSCRIBER_ROLE = "roles/pubsub.subscriber"
# A fresh grant takes a while to propagate; until then GCS refuses the notification
# (400/403). Retrying beats failing the first deploy of a new project.
_IAM_PROPAGATION_RETRY = Retry(
    predicate=if_exception_type(google_exceptions.BadRequest, google_exceptions.Forbidden),
    initial=2.0, maximum=20.0, timeout=180.0,
)
_GCS_AGENT = re.compile(r"^service-(?P<number>\d+)@gs-project-accounts\.iam\.gserviceaccount\.com$")


def setup(settings: Settings) -> list[str]:
    """Ensure every resource exists; one line per resource saying what happened."""
    if settings.profile == "local":
        raise ValueError(
            "the local profile uses a directory and a watcher: nothing to set up on GCP"
        )
    # Every name at once, with the rule each breaks (and the missing ones).
    settings.validate_for_profile()
    project = settings.gcp_project
    gcs = gcp_clients.storage_client(settings)
    publisher = gcp_clients.publisher_client(settings)
    subscriber = gcp_clients.subscriber_client(settings)

    topic = publisher.topic_path(project, settings.pubsub_topic)
    dead_letter_topic = publisher.topic_path(project, settings.pubsub_dead_letter_topic)
    subscription = subscriber.subscription_path(project, settings.pubsub_subscription)
    dead_letter_subscription = subscriber.subscription_path(
        project, settings.pubsub_dead_letter_topic + DEAD_LETTER_SUBSCRIPTION_SUFFIX
    )

    lines = [
        ensure_bucket(gcs, settings),
        ensure_topic(publisher, topic),
        ensure_topic(publisher, dead_letter_topic),
        # Without a subscription, dead-lettered messages would be dropped unseen.
        ensure_subscription(subscriber, Subscription(name=dead_letter_subscription,
                                                     topic=dead_letter_topic)),
        ensure_subscription(
            subscriber,
            bridge_subscription(settings, subscription, topic, dead_letter_topic),
            MANAGED_FIELDS,
        ),
    ]
    if settings.profile == "gcp":
        # Before the notifications: GCS refuses a notification whose topic its
        # service agent cannot publish to.
        lines += grant_service_agents(gcs, publisher, subscriber, project, topic,
                                      dead_letter_topic, subscription)
    else:
        lines.append("iam: skipped, the emulators neither implement nor enforce IAM")
    lines += ensure_notifications(gcs.bucket(settings.bucket), settings)
    return lines


def ensure_bucket(client: storage.Client, settings: Settings) -> str:
    """The bucket, co-located with the BigQuery dataset so load jobs can read it."""
    label = f"bucket gs://{settings.bucket}"
    # lookup first: a name taken by another project answers 403 here, not a misleading 409.
    if client.lookup_bucket(settings.bucket) is not None:
        return f"{label}: already exists"
    bucket = client.bucket(settings.bucket)
    bucket.iam_configuration.uniform_bucket_level_access_enabled = True
    bucket.iam_configuration.public_access_prevention = "enforced"
    try:
        created = client.create_bucket(bucket, project=settings.gcp_project,
                                       location=settings.bq_location)
    except google_exceptions.Conflict:
        return f"{label}: already exists"
    return f"{label}: created in {created.location}"


def ensure_topic(publisher: Any, topic: str) -> str:
    try:
        publisher.create_topic(name=topic)
    except google_exceptions.AlreadyExists:
        return f"topic {topic}: already exists"
    return f"topic {topic}: created"


def bridge_subscription(settings: Settings, name: str, topic: str,
                        dead_letter_topic: str) -> Subscription:
    """The bridge's pull subscription: bounded redelivery, then the dead-letter topic."""
    return Subscription(
        name=name,
        topic=topic,
        ack_deadline_seconds=settings.pubsub_ack_deadline_seconds,
        retry_policy=RetryPolicy(
            minimum_backoff=duration_pb2.Duration(seconds=RETRY_MIN_BACKOFF_SECONDS),
            maximum_backoff=duration_pb2.Duration(seconds=RETRY_MAX_BACKOFF_SECONDS),
        ),
        dead_letter_policy=DeadLetterPolicy(
            dead_letter_topic=dead_letter_topic,
            max_delivery_attempts=settings.pubsub_max_delivery_attempts,
        ),
    )


# Settings of the bridge subscription that setup owns and brings back in line.
MANAGED_FIELDS = ("ack_deadline_seconds", "retry_policy", "dead_letter_policy")


def ensure_subscription(subscriber: Any, wanted: Subscription,
                        managed: tuple[str, ...] = ()) -> str:
    """Create `wanted`; if it exists, update the `managed` settings that drifted.

    A subscription cannot move to another topic: that is reported as an error
    rather than silently leaving the bridge on the wrong feed.
    """
    label = f"subscription {wanted.name}"
    try:
        subscriber.create_subscription(request=wanted)
    except google_exceptions.AlreadyExists:
        pass
    else:
        return f"{label}: created on {wanted.topic}{_describe(wanted, managed)}"
    current: Subscription = subscriber.get_subscription(subscription=wanted.name)
    if current.topic != wanted.topic:
        raise RuntimeError(
            f"{label} is attached to {current.topic}, not {wanted.topic}; a subscription "
            "cannot change topic: delete it and run setup again"
        )
    drifted = [name for name in managed if getattr(current, name) != getattr(wanted, name)]
    if not drifted:
        return f"{label}: already exists"
    subscriber.update_subscription(
        request={"subscription": wanted, "update_mask": field_mask_pb2.FieldMask(paths=drifted)}
    )
    return f"{label}: already exists, updated {', '.join(drifted)}{_describe(wanted, managed)}"


def _describe(sub: Subscription, managed: tuple[str, ...]) -> str:
    if not managed:
        return ""
    retry, dead_letter = sub.retry_policy, sub.dead_letter_policy
    return (
        f" (ack deadline {sub.ack_deadline_seconds} s, retry backoff "
        f"{retry.minimum_backoff.total_seconds():.0f}-{retry.maximum_backoff.total_seconds():.0f}"
        f" s, dead letter to {dead_letter.dead_letter_topic} after "
        f"{dead_letter.max_delivery_attempts} attempts)"
    )


def ensure_notifications(bucket: storage.Bucket, settings: Settings) -> list[str]:
    """One OBJECT_FINALIZE notification per watched prefix, all to the pipeline topic."""
    prefixes = (settings.raw_prefix, settings.processed_prefix)
    project, topic = settings.gcp_project, settings.pubsub_topic
    labels = {p: f"notification gs://{bucket.name}/{p}* -> projects/{project}/topics/{topic}"
              for p in prefixes}
    try:
        existing = list(bucket.list_notifications())
    except google_exceptions.NotFound:
        # fake-gcs-server has no notificationConfigs endpoint (404); real GCS has.
        if settings.profile != "emulator":
            raise
        return [f"{labels[p]}: {EMULATOR_NO_NOTIFICATIONS}" for p in prefixes]
    lines = []
    for prefix in prefixes:
        same = [n for n in existing if n.topic_project == project and n.topic_name == topic
                and n.blob_name_prefix == prefix]
        if same:
            config = same[0]
            line = f"{labels[prefix]}: already exists (id {config.notification_id})"
            if (list(config.event_types or []) != [storage.notification.OBJECT_FINALIZE_EVENT_TYPE]
                    or config.payload_format != storage.notification.JSON_API_V1_PAYLOAD_FORMAT):
                line += (f" but with event types {config.event_types} and payload "
                         f"{config.payload_format}: delete it and run setup again")
            lines.append(line)
            continue
        config = bucket.notification(
            topic_name=topic,
            topic_project=project,
            event_types=[storage.notification.OBJECT_FINALIZE_EVENT_TYPE],
            blob_name_prefix=prefix,
            payload_format=storage.notification.JSON_API_V1_PAYLOAD_FORMAT,
        )
        config.create(retry=_IAM_PROPAGATION_RETRY)
        lines.append(f"{labels[prefix]}: created (id {config.notification_id})")
    return lines


def pubsub_service_agent(gcs_service_agent: str) -> str:
    """The Pub/Sub service agent, derived from the GCS one (both carry the project number)."""
    match = _GCS_AGENT.match(gcs_service_agent)
    if not match:
        raise RuntimeError(f"unexpected Cloud Storage service agent {gcs_service_agent!r}")
    return f"service-{match.group('number')}@gcp-sa-pubsub.iam.gserviceaccount.com"


def grant_service_agents(gcs: storage.Client, publisher: Any, subscriber: Any, project: str,
                         topic: str, dead_letter_topic: str, subscription: str) -> list[str]:
    """The grants GCS notifications and Pub/Sub dead-lettering need to work at all.

    Without them nothing fails loudly: notifications are refused, and messages
    past max delivery attempts are redelivered forever instead of dead-lettered.
    """
    gcs_agent = gcs.get_service_account_email(project=project)
    pubsub_agent = pubsub_service_agent(gcs_agent)
    return [
        grant(publisher, topic, PUBLISHER_ROLE, f"serviceAccount:{gcs_agent}"),
        grant(publisher, dead_letter_topic, PUBLISHER_ROLE, f"serviceAccount:{pubsub_agent}"),
        grant(subscriber, subscription, SUBSCRIBER_ROLE, f"serviceAccount:{pubsub_agent}"),
    ]


def grant(client: Any, resource: str, role: str, member: str) -> str:
    """Add one binding with read-modify-write; the policy's etag rejects a concurrent edit."""
    label = f"iam {role} for {member} on {resource}"
    policy = client.get_iam_policy(request={"resource": resource})
    if not add_binding(policy, role, member):
        return f"{label}: already granted"
    client.set_iam_policy(request={"resource": resource, "policy": policy})
    return f"{label}: granted"


def add_binding(policy: Any, role: str, member: str) -> bool:
    """Add `member` to the unconditional binding of `role`; False if already there."""
    for binding in policy.bindings:
        if binding.role == role and not binding.HasField("condition"):
            if member in binding.members:
                return False
            binding.members.append(member)
            return True
    policy.bindings.add(role=role, members=[member])
    return True
