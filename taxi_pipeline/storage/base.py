"""The object-store interface the flows and the bridge are written against."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from taxi_pipeline.objects import ObjectRef


class ObjectNotFound(LookupError):
    """The object (or the asked-for generation of it) does not exist any more."""


class PreconditionFailed(RuntimeError):
    """Someone else wrote the object first; the write was not applied."""


class ObjectStore(Protocol):
    """A bucket: a local directory, fake-gcs-server or GCS."""

    scheme: str
    bucket: str

    def ref(self, name: str) -> ObjectRef:
        """The current generation of `name`; raises ObjectNotFound."""
        ...

    def name_of(self, uri: str) -> str:
        """The object name inside this store of a URI; raises ValueError for other stores."""
        ...

    def open_read(self, obj: ObjectRef) -> AbstractContextManager[BinaryIO]:
        """A seekable reader of exactly `obj.generation`; raises ObjectNotFound."""
        ...

    def publish(self, name: str, if_generation_match: int | None = None
                ) -> AbstractContextManager[Path]:
        """Yield a local path to write; on clean exit it becomes object `name`.

        `if_generation_match=0` means "only if absent", another number "only if
        that generation is current"; a lost race raises PreconditionFailed.
        """
        ...

    def move(self, obj: ObjectRef, to_name: str) -> ObjectRef:
        """Move `obj` (that generation only) to `to_name`; returns the new object."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        """Objects under `prefix`, in name order."""
        ...
