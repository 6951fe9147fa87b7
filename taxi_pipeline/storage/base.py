"""The object-store interface the flows and the bridge are written against."""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import BinaryIO, Protocol

from taxi_pipeline.objects import ObjectRef


class ObjectNotFound(LookupError):
    """The object (or the asked-for generation of it) does not exist any more."""


class PreconditionFailed(RuntimeError):
    """Someone else wrote the object first; the write was not applied."""


def content_md5(source: Path | BinaryIO) -> str:
    """The base64 md5 of a file's bytes (a path, or a handle read from where it stands).

    Base64 because that is how GCS reports `md5Hash` (in metadata and in
    notifications): one format in every profile, so the local bucket's events
    look like GCS's and `publish(keep_unchanged=True)` compares like with like.
    Read in 1 MiB chunks, so memory does not grow with the file.
    """
    if isinstance(source, Path):
        with source.open("rb") as handle:
            return content_md5(handle)
    digest = hashlib.md5(usedforsecurity=False)
    for chunk in iter(lambda: source.read(1 << 20), b""):
        digest.update(chunk)
    return base64.b64encode(digest.digest()).decode()


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

    def publish(self, name: str, if_generation_match: int | None = None,
                keep_unchanged: bool = False,
                metadata: dict[str, str] | None = None) -> AbstractContextManager[Path]:
        """Yield a local path to write; on clean exit it becomes object `name`.

        `metadata`: custom metadata of the new object where the store has such a
        thing (GCS, where notifications carry it); the local store has none.

        `if_generation_match=0` means "only if absent", another number "only if
        that generation is current"; a lost race raises PreconditionFailed. The
        precondition is checked first, whether or not the object is then kept.

        `keep_unchanged=True`: when `name` exists and its content md5 equals the
        written file's, nothing is replaced: the object keeps its generation and
        (on GCS) nothing is uploaded, so no OBJECT_FINALIZE notification is sent.
        A new generation of the same bytes would look like new data downstream
        (the load replaces rows when the processed generation changes); callers
        tell "kept" from "written" by comparing `ref(name).generation` before and
        after.
        """
        ...

    def move(self, obj: ObjectRef, to_name: str) -> ObjectRef:
        """Move `obj` (that generation only) to `to_name`; returns the new object."""
        ...

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        """Objects under `prefix`, in name order."""
        ...
