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
    raise NotImplementedError(
        f"profile {settings.profile!r} has no object store yet; use TAXI_PROFILE=local"
    )
