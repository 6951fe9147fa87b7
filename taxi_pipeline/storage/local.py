"""A directory standing in for a bucket (the `local` profile).

A file's generation is its last change time in microseconds (the larger of
mtime and ctime), so copying a file in again, even with `cp -p`, is a new
generation, as an upload to GCS would be.
"""

from __future__ import annotations

import base64
import hashlib
import mimetypes
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from taxi_pipeline.objects import ObjectRef, parse_uri
from taxi_pipeline.storage.base import ObjectNotFound, PreconditionFailed

# Names the directory source and listings skip: editors' and copy tools' partial files.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".download", "_COPYING_")


def is_partial_name(name: str) -> bool:
    """True for hidden files and the temporary names copy tools write before renaming."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith((".", "~")) or base.endswith(PARTIAL_SUFFIXES)


PARQUET_MAGIC = b"PAR1"


def has_parquet_footer(path: Path) -> bool:
    """True when the file starts and ends with the parquet magic (writing has finished)."""
    try:
        with path.open("rb") as handle:
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            return head == PARQUET_MAGIC and handle.read(4) == PARQUET_MAGIC
    except OSError:
        return False


def generation_of(stat: os.stat_result) -> int:
    return max(stat.st_mtime_ns, stat.st_ctime_ns) // 1000


class LocalStore:
    """Objects are files below `root`; names use `/` whatever the OS."""

    scheme = "file"

    def __init__(self, root: Path) -> None:
        self.root = root.expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.bucket = str(self.root)

    def _path(self, name: str) -> Path:
        path = (self.root / name).resolve()
        if self.root not in path.parents:
            raise ValueError(f"object name {name!r} escapes the bucket directory {self.root}")
        return path

    def name_of(self, uri: str) -> str:
        scheme, _, path = parse_uri(uri)
        if scheme != "file":
            raise ValueError(f"{uri!r} is not a file:// URI; the local profile stores files only")
        resolved = Path(path).resolve()
        if self.root not in resolved.parents:
            raise ValueError(f"{uri!r} is outside the bucket directory {self.root}")
        return resolved.relative_to(self.root).as_posix()

    def _ref(self, name: str, path: Path, stat: os.stat_result) -> ObjectRef:
        return ObjectRef(
            bucket=self.bucket,
            name=name,
            generation=generation_of(stat),
            scheme=self.scheme,
            size=stat.st_size,
            content_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            updated=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def ref(self, name: str) -> ObjectRef:
        path = self._path(name)
        try:
            return self._ref(name, path, path.stat())
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path} does not exist") from exc

    def md5(self, name: str) -> str:
        """Base64, as GCS reports it, so payloads look alike in every profile."""
        digest = hashlib.md5(usedforsecurity=False)
        with self._path(name).open("rb") as handle:
            for chunk in iter(lambda: handle.read(1 << 20), b""):
                digest.update(chunk)
        return base64.b64encode(digest.digest()).decode()

    @contextmanager
    def open_read(self, obj: ObjectRef) -> Iterator[BinaryIO]:
        path = self._path(obj.name)
        try:
            handle = path.open("rb")
        except FileNotFoundError as exc:
            raise ObjectNotFound(f"{path} does not exist") from exc
        with handle:
            current = generation_of(os.fstat(handle.fileno()))
            if current != obj.generation:
                raise ObjectNotFound(
                    f"{path} is now generation {current}, not {obj.generation}"
                )
            yield handle

    def _check_generation(self, path: Path, name: str, if_generation_match: int | None) -> None:
        if if_generation_match is None:
            return
        current = generation_of(path.stat()) if path.exists() else 0
        if current != if_generation_match:
            raise PreconditionFailed(
                f"{name}: expected generation {if_generation_match}, found {current}"
            )

    @contextmanager
    def publish(self, name: str, if_generation_match: int | None = None) -> Iterator[Path]:
        target = self._path(name)
        target.parent.mkdir(parents=True, exist_ok=True)
        # A hidden temporary name in the same directory: invisible to the watcher,
        # and os.replace makes the finished file appear at once.
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            yield tmp
            self._check_generation(target, name, if_generation_match)
            os.replace(tmp, target)
        finally:
            tmp.unlink(missing_ok=True)

    def move(self, obj: ObjectRef, to_name: str) -> ObjectRef:
        source = self._path(obj.name)
        self._check_generation(source, obj.name, obj.generation)
        target = self._path(to_name)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(source, target)
        return self.ref(to_name)

    def list(self, prefix: str) -> Iterator[ObjectRef]:
        base = self._path(prefix) if prefix.strip("/") else self.root
        if not base.is_dir():
            return
        for dirpath, dirnames, filenames in os.walk(base):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for filename in sorted(filenames):
                path = Path(dirpath, filename)
                name = path.relative_to(self.root).as_posix()
                if is_partial_name(name):
                    continue
                try:
                    yield self._ref(name, path, path.stat())
                except FileNotFoundError:
                    continue
