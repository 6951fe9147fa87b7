"""Object stores: pick one from the settings profile."""

from __future__ import annotations

from taxi_pipeline.settings import Settings
from taxi_pipeline.storage.base import ObjectNotFound, ObjectStore, PreconditionFailed

__all__ = ["ObjectNotFound", "ObjectStore", "PreconditionFailed", "store_from_settings"]


def store_from_settings(settings: Settings) -> ObjectStore:
    """The bucket of the configured profile."""
    if settings.profile == "local":
        from taxi_pipeline.storage.local import LocalStore

        return LocalStore(settings.bucket_dir)
    if settings.profile in ("emulator", "gcp"):
        # Imported here so the local profile never needs the Google client libraries.
        from taxi_pipeline.gcp import clients as gcp_clients
        from taxi_pipeline.storage.gcs import GcsStore

        settings.require("bucket", "gcp_project")
        return GcsStore(gcp_clients.storage_client(settings), settings.bucket)
    raise NotImplementedError(f"profile {settings.profile!r} has no object store")
