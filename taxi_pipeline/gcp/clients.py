"""Google Cloud clients for the emulator and gcp profiles, built one way.

The emulator profile is anonymous: the clients find the emulators through
STORAGE_EMULATOR_HOST, PUBSUB_EMULATOR_HOST and BIGQUERY_EMULATOR_HOST. The
gcp profile uses a prefect-gcp GcpCredentials block when one is named, else
Application Default Credentials (Workload Identity on GKE); no key file is
ever read from the image or the manifests.
"""

from __future__ import annotations

import os
from typing import Any

from google.auth.credentials import AnonymousCredentials, Credentials
from google.cloud import bigquery, pubsub_v1, storage  # type: ignore[attr-defined]

from taxi_pipeline.settings import Settings


def credentials(settings: Settings) -> Credentials | None:
    if settings.profile == "emulator":
        return AnonymousCredentials()
    if settings.gcp_credentials_block:
        from prefect_gcp import GcpCredentials

        block = GcpCredentials.load(settings.gcp_credentials_block)
        creds: Credentials = block.get_credentials_from_service_account()
        return creds
    return None  # Application Default Credentials


def storage_client(settings: Settings) -> storage.Client:
    settings.require("gcp_project")
    return storage.Client(project=settings.gcp_project, credentials=credentials(settings))


def bigquery_client(settings: Settings) -> bigquery.Client:
    settings.require("gcp_project")
    options: dict[str, Any] = {}
    endpoint = os.environ.get("BIGQUERY_EMULATOR_HOST")
    if settings.profile == "emulator" and endpoint:
        options["api_endpoint"] = endpoint
    return bigquery.Client(project=settings.gcp_project, credentials=credentials(settings),
                           location=settings.bq_location, client_options=options or None)


def subscriber_client(settings: Settings) -> pubsub_v1.SubscriberClient:
    return pubsub_v1.SubscriberClient(credentials=credentials(settings))


def publisher_client(settings: Settings) -> pubsub_v1.PublisherClient:
    return pubsub_v1.PublisherClient(credentials=credentials(settings))
