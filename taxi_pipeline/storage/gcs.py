"""A GCS bucket (the `emulator` and `gcp` profiles) behind the ObjectStore protocol.

Every read and every conditional write names an object generation, so a file
replaced while a flow works on it is never half-read or silently overwritten:
the generation is the version the events, the transform and the load agree on.
"""

from __future__ import annotations

import mimetypes
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO, cast

from google.api_core import exceptions as google_exceptions
from google.cloud import storage  # type: ignore[attr-defined]
from google.cloud.storage.fileio import BlobReader
from google.cloud.storage.retry import DEFAULT_RETRY

from taxi_pipeline.events import lineage_in
from taxi_pipeline.objects import ObjectRef, parse_uri
from taxi_pipeline.storage.base import ObjectNotFound, PreconditionFailed, content_md5

# Bytes fetched per ranged GET while streaming: pyarrow asks for a row group's column
# chunks one by one, so this bounds memory to a few chunks, never the whole file.
READ_CHUNK_BYTES = 8 * 2**20


class _GenerationReader(BlobReader):
    """A BlobReader that serves one generation or raises ObjectNotFound, mid-stream too.

    Every ranged GET names the generation, and GCS answers 404 once it is
    replaced or deleted. The reader also checks each response's
    x-goog-generation (the client copies it onto the blob) and any short read,
    so a server that answers with other bytes (fake-gcs-server ignores
    `generation` on ranged reads) fails loudly instead of mixing two versions.
    """

    def __init__(self, blob: Any, generation: int, **kwargs: Any) -> None:
        super().__init__(blob, **kwargs)
        self._generation = generation

    def read(self, size: int = -1) -> bytes:
        start: int = self.tell()
        try:
            data: bytes = super().read(size)
        except google_exceptions.NotFound as exc:
            raise ObjectNotFound(_gone(self._blob, self._generation)) from exc
        served = self._blob.generation
        if served != self._generation:
            raise ObjectNotFound(
                f"{_gone(self._blob, self._generation)} (the server sent generation {served})"
            )
        remaining = max(0, self._blob.size - start)
        expected = remaining if size < 0 else min(size, remaining)
        if len(data) < expected and not self._blob.exists():
            raise ObjectNotFound(_gone(self._blob, self._generation))
        return data

    def read1(self, size: int = -1) -> bytes:
        return self.read(size)

    def seek(self, pos: int, whence: int = 0) -> int:
        try:
            offset: int = super().seek(pos, whence)
        except google_exceptions.NotFound as exc:
            raise ObjectNotFound(_gone(self._blob, self._generation)) from exc
        return offset


def _gone(blob: Any, generation: int) -> str:
    return f"gs://{blob.bucket.name}/{blob.name} generation {generation} no longer exists"


def _content_type(name: str) -> str:
    if name.endswith(".parquet"):
        return "application/vnd.apache.parquet"
    return mimetypes.guess_type(name)[0] or "application/octet-stream"


class GcsStore:
    """One bucket through google-cloud-storage (fake-gcs-server answers the same API)."""

    scheme = "gs"

    def __init__(self, client: storage.Client, bucket: str) -> None:
        if not bucket:
            raise ValueError("GcsStore needs a bucket name")
        self.client = client
        self.bucket = bucket
        self._bucket = client.bucket(bucket)

    def _uri(self, name: str) -> str:
        return f"gs://{self.bucket}/{name}"

    def _ref(self, blob: Any) -> ObjectRef:
        extra = {"metageneration": str(blob.metageneration)} if blob.metageneration else {}
        if blob.storage_class:
            extra["storage_class"] = str(blob.storage_class)
        extra.update(lineage_in(blob.metadata))
        return ObjectRef(
            bucket=self.bucket,
            name=blob.name,
            generation=int(blob.generation),
            scheme=self.scheme,
            size=blob.size,
            md5_hash=blob.md5_hash,  # base64, as in notifications; None for composite objects
            crc32c=blob.crc32c,
            content_type=blob.content_type,
            created=blob.time_created,
            updated=blob.updated,
            extra=extra,
        )

    def ref(self, name: str) -> ObjectRef:
        blob = self._bucket.get_blob(name)
        if blob is None:
            raise ObjectNotFound(f"{self._uri(name)} does not exist")
        return self._ref(blob)

    def name_of(self, uri: str) -> str:
        scheme, bucket, name = parse_uri(uri)
        if scheme != "gs" or bucket != self.bucket:
            raise ValueError(f"{uri!r} is not an object of gs://{self.bucket}/")
        return name

    def _check_bucket(self, obj: ObjectRef) -> None:
        if obj.scheme != self.scheme or obj.bucket != self.bucket:
            raise ValueError(f"{obj.uri} is not an object of gs://{self.bucket}/")

    @contextmanager
    def open_read(self, obj: ObjectRef) -> Iterator[BinaryIO]:
        """Stream exactly `obj.generation` in ranged reads (seekable, for parquet footers).

        The metadata is fetched first: a generation that is already gone fails
        here, and the known size lets `seek(0, 2)` work without another request.
        """
        self._check_bucket(obj)
        blob = self._bucket.blob(obj.name, generation=obj.generation)
        try:
            blob.reload()
        except google_exceptions.NotFound as exc:
            raise ObjectNotFound(_gone(blob, obj.generation)) from exc
        reader = _GenerationReader(blob, obj.generation, chunk_size=READ_CHUNK_BYTES,
                                   retry=DEFAULT_RETRY)
        with reader:
            yield cast(BinaryIO, reader)

    def _holds_same_bytes(self, name: str, written: Path, if_generation_match: int | None
                          ) -> bool:
        """True when object `name` already has `written`'s content md5 (and may be kept).

        GCS keeps each object's md5 in its metadata, so this costs one metadata
        GET and a local hash, never a download. Composite objects have no md5
        (`md5_hash` None) and count as changed. A current object that fails
        `if_generation_match` raises PreconditionFailed, as the upload would.
        """
        current = self._bucket.get_blob(name, retry=DEFAULT_RETRY)
        if current is None or current.md5_hash is None:
            return False
        if current.size != written.stat().st_size or current.md5_hash != content_md5(written):
            return False
        if if_generation_match is not None and current.generation != if_generation_match:
            raise PreconditionFailed(
                f"{self._uri(name)}: generation is {current.generation}, "
                f"not {if_generation_match}; not kept")
        return True

    @contextmanager
    def publish(self, name: str, if_generation_match: int | None = None,
                keep_unchanged: bool = False,
                metadata: dict[str, str] | None = None) -> Iterator[Path]:
        """Write to a local temporary file; upload it only if the block ends cleanly.

        GCS uploads are atomic, so readers and notifications only ever see the
        finished object. The temporary file is removed whatever happens.

        With `keep_unchanged`, an object that already holds the same bytes is not
        uploaded again: it keeps its generation, and GCS sends no OBJECT_FINALIZE
        notification (a re-upload would, and would make a new generation of the
        same bytes).
        """
        fd, tmp_name = tempfile.mkstemp(prefix="taxi-publish-", suffix=Path(name).suffix)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            if keep_unchanged and self._holds_same_bytes(name, tmp, if_generation_match):
                return
            blob = self._bucket.blob(name)
            if metadata:
                blob.metadata = metadata
            try:
                # Outputs are deterministic, so even an unconditional upload is safe to
                # retry; with a precondition the library would retry anyway.
                blob.upload_from_filename(
                    str(tmp),
                    content_type=_content_type(name),
                    if_generation_match=if_generation_match,
                    retry=DEFAULT_RETRY,
                )
            except google_exceptions.PreconditionFailed as exc:
                raise PreconditionFailed(
                    f"{self._uri(name)}: generation is no longer {if_generation_match}"
                    + (" (the object exists)" if if_generation_match == 0 else "")
                ) from exc
        finally:
            tmp.unlink(missing_ok=True)

    def move(self, obj: ObjectRef, to_name: str) -> ObjectRef:
        """Copy exactly `obj.generation` to `to_name`, then delete that generation.

        GCS has no rename: this is a server-side rewrite (any size, no bytes
        through this process) plus a conditional delete. If the source was
        replaced in between, the copy is removed again and PreconditionFailed is
        raised, so a newer upload is neither lost nor quarantined by mistake.
        """
        self._check_bucket(obj)
        source = self._bucket.blob(obj.name, generation=obj.generation)
        target = self._bucket.blob(to_name)
        try:
            token: str | None = None
            while True:
                # Rewriting to a fixed name is idempotent: safe to retry.
                token, _, _ = target.rewrite(
                    source,
                    token=token,
                    if_source_generation_match=obj.generation,
                    retry=DEFAULT_RETRY,
                )
                if token is None:
                    break
        except (google_exceptions.NotFound, google_exceptions.PreconditionFailed) as exc:
            # As in the local store: replaced is a lost race, deleted is not found.
            current = self._bucket.get_blob(obj.name)
            if current is None:
                raise ObjectNotFound(_gone(source, obj.generation)) from exc
            raise PreconditionFailed(
                f"{obj.uri} is now generation {current.generation}, not {obj.generation}; "
                "not moved"
            ) from exc
        try:
            self._bucket.delete_blob(obj.name, if_generation_match=obj.generation)
        except google_exceptions.NotFound:
            # That generation is gone (a retried delete that had succeeded, or someone
            # else removed it): the copy is the only one left, so the move is complete.
            pass
        except google_exceptions.PreconditionFailed as exc:
            with suppress(google_exceptions.NotFound):
                self._bucket.delete_blob(to_name, if_generation_match=target.generation)
            raise PreconditionFailed(
                f"{obj.uri} was replaced while being moved to {self._uri(to_name)}; "
                "the copy was removed and the newer generation left in place"
            ) from exc
        return self._ref(target)

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        """Objects under `prefix`, streamed page by page.

        GCS lists in UTF-8 byte order, which is Python's code-point order, so
        the result is sorted by name without holding the listing in memory.
        Folder placeholders (names ending in `/`) are not objects to process.
        """
        for blob in self.client.list_blobs(self.bucket, prefix=prefix):
            if not blob.name.endswith("/"):
                yield self._ref(blob)
