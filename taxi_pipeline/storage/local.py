"""A directory standing in for a bucket (the `local` profile).

A file's generation is its last change time in microseconds (the larger of
mtime and ctime), so copying a file in again, even with `cp -p`, is a new
generation, as an upload to GCS would be.

Only regular files are objects. A bucket has no symlinks (following one could
read outside the bucket), no directory objects, no special files and no names
that are not UTF-8, so `entries` reports those as `NotAnObject` with a reason
instead of listing or following them: `list` (reconcile, status) skips them,
and the bridge records each as a `pipeline.notification.rejected` event. Both
go through `entries`, so what counts as an object is decided in one place.
"""

from __future__ import annotations

import mimetypes
import os
import stat
import tempfile
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from taxi_pipeline.objects import ObjectRef, parse_uri
from taxi_pipeline.storage.base import ObjectNotFound, PreconditionFailed, content_md5

# Names the directory source and listings skip: editors' and copy tools' partial files.
PARTIAL_SUFFIXES = (".tmp", ".part", ".partial", ".crdownload", ".swp", ".download", "_COPYING_")


def is_partial_name(name: str) -> bool:
    """True for hidden files and the temporary names copy tools write before renaming."""
    base = name.rsplit("/", 1)[-1]
    return base.startswith((".", "~")) or base.endswith(PARTIAL_SUFFIXES)


PARQUET_MAGIC = b"PAR1"


class NotARegularFile(OSError):
    """The path is a FIFO, socket, device or directory, not a file that can be an object."""


def open_regular(path: Path) -> BinaryIO:
    """Open a regular file for reading; refuse anything else without blocking.

    A plain open() of a FIFO waits for a writer forever, which would hang the
    bridge's poll loop; O_NONBLOCK returns at once and the fstat check refuses it.
    """
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotARegularFile(f"{path} is {file_kind(mode)}, not a regular file")
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def has_parquet_footer(path: Path, *, strict: bool = False) -> bool:
    """True when the file starts and ends with the parquet magic (writing has finished).

    A file that cannot be read counts as "no footer"; with `strict` the OSError
    is raised instead, so the bridge can tell "still being written" from
    "unreadable" or "vanished".
    """
    try:
        with open_regular(path) as handle:
            if os.fstat(handle.fileno()).st_size < 2 * len(PARQUET_MAGIC):
                return False
            head = handle.read(4)
            handle.seek(-4, os.SEEK_END)
            return head == PARQUET_MAGIC and handle.read(4) == PARQUET_MAGIC
    except OSError:
        if strict:
            raise
        return False


GZIP_MAGIC = b"\x1f\x8b"


def gzip_complete(path: Path, *, strict: bool = False) -> bool:
    """True when the file is a whole gzip stream: every member inflates to its end
    and its trailer (CRC-32 and length) checks out (zlib verifies both).

    A gzip file has no footer to look at: the last deflate block and the trailer
    are only known by inflating, which zlib does at ~300 MB/s in 1 MiB chunks and
    bounded memory. A file still being written, or cut short, ends mid-stream.
    `strict` as for `has_parquet_footer`.
    """
    try:
        with open_regular(path) as handle:
            if handle.read(2) != GZIP_MAGIC:
                return False
            handle.seek(0)
            inflater = zlib.decompressobj(wbits=31)
            while True:
                chunk = handle.read(1 << 20)
                if not chunk:
                    break
                while chunk:
                    inflater.decompress(chunk, 1 << 20)
                    chunk = inflater.unconsumed_tail
                    if inflater.eof:
                        rest = inflater.unused_data + chunk
                        if not rest.strip(b"\0"):  # padding after the last member
                            chunk = b""
                            continue
                        inflater = zlib.decompressobj(wbits=31)  # the next member
                        chunk = rest
            return inflater.eof
    except zlib.error:
        return False
    except OSError:
        if strict:
            raise
        return False


def cannot_become_complete(path: Path, name: str) -> bool:
    """The first bytes already rule out the format the name promises (a .parquet that
    does not start with PAR1, a .gz that does not start with 1f8b): waiting for more
    bytes will not make it whole, so the transform can judge (quarantine) it now."""
    lower = name.lower()
    magic = PARQUET_MAGIC if lower.endswith(".parquet") else (
        GZIP_MAGIC if lower.endswith(".gz") else None)
    if magic is None:
        return False
    try:
        with open_regular(path) as handle:
            head = handle.read(len(magic))
    except OSError:
        return False
    return len(head) == len(magic) and head != magic


def generation_of(st: os.stat_result) -> int:
    return max(st.st_mtime_ns, st.st_ctime_ns) // 1000


def generation_time(generation: int) -> datetime:
    """When a local generation came to be (its microseconds as a UTC time), exactly."""
    seconds, micros = divmod(generation, 1_000_000)
    return datetime.fromtimestamp(seconds, UTC).replace(microsecond=micros)


def file_kind(mode: int) -> str:
    """'a FIFO', 'a socket', ... for messages about what a path is."""
    for test, kind in ((stat.S_ISLNK, "a symbolic link"), (stat.S_ISDIR, "a directory"),
                       (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISREG, "a regular file")):
        if test(mode):
            return kind
    return "a special file"


def printable_name(name: str) -> str:
    """The name as valid UTF-8 text: undecodable bytes become `\\xff` escapes."""
    return os.fsencode(name).decode("utf-8", errors="backslashreplace")


# Why something under the bucket directory is not an object (NotAnObject.why).
SYMLINK = "symlink"
DIRECTORY = "directory"
NOT_A_FILE = "not_a_file"
UNMAPPABLE_NAME = "unmappable_name"
UNREADABLE = "unreadable"


@dataclass(frozen=True)
class NotAnObject:
    """A path under the bucket directory that is not (or no longer) an object, and why.

    `name` is bucket-relative and may hold surrogate escapes of undecodable
    bytes; `uri` is the percent-encoded file:// URI, always valid text.
    `generation` is the path's own change time where it has a meaningful one
    (a link, a special file), None for directories.
    """

    name: str
    uri: str
    why: str
    detail: str
    generation: int | None = None


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
        # `created` is when this generation came to be, as GCS's timeCreated is per
        # generation: the change time, not the mtime a `cp -p` carries over.
        generation = generation_of(stat)
        return ObjectRef(
            bucket=self.bucket,
            name=name,
            generation=generation,
            scheme=self.scheme,
            size=stat.st_size,
            content_type=mimetypes.guess_type(path.name)[0] or "application/octet-stream",
            created=generation_time(generation),
            updated=datetime.fromtimestamp(stat.st_mtime, UTC),
        )

    def ref(self, name: str) -> ObjectRef:
        """The current generation of `name`: a regular file reached without any symlink.

        What `entries` would not list is no object here either (a re-emitted
        symlink's name is not followed), so every caller agrees on what exists.
        """
        lexical = Path(os.path.normpath(self.root / name))
        if self.root not in lexical.parents:
            raise ValueError(f"object name {name!r} escapes the bucket directory {self.root}")
        try:
            st = lexical.lstat()
        except (FileNotFoundError, NotADirectoryError) as exc:
            # NotADirectoryError: a file stands where a folder of the name would be.
            raise ObjectNotFound(f"{lexical} does not exist") from exc
        path = lexical.resolve()
        if path != lexical:
            raise ObjectNotFound(f"{lexical} is reached through a symbolic link, not an object")
        if not stat.S_ISREG(st.st_mode):
            raise ObjectNotFound(f"{lexical} is {file_kind(st.st_mode)}, not an object")
        return self._ref(name, path, st)

    def md5(self, name: str) -> str:
        """Base64, as GCS reports it, so payloads look alike in every profile."""
        with open_regular(self._path(name)) as handle:
            return content_md5(handle)

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

    def _holds_same_bytes(self, target: Path, written: Path) -> bool:
        """True when `target` is a regular file with the same content md5 as `written`.

        Sizes are compared first, so a changed file of another size costs no hashing.
        """
        try:
            with open_regular(target) as handle:
                if os.fstat(handle.fileno()).st_size != written.stat().st_size:
                    return False
                return content_md5(handle) == content_md5(written)
        except (FileNotFoundError, NotARegularFile):
            return False

    @contextmanager
    def publish(self, name: str, if_generation_match: int | None = None,
                keep_unchanged: bool = False,
                metadata: dict[str, str] | None = None) -> Iterator[Path]:
        """Write to a hidden temporary file beside the target; os.replace it on clean exit.

        A file has no custom metadata: `metadata` is ignored (the transform's
        lineage is in the parquet footer, which the directory source reads).

        With `keep_unchanged`, a target that already holds the same bytes is left
        alone: its mtime and ctime, hence its generation, stay as they were, and
        the directory source sees no new file to announce.
        """
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
            if keep_unchanged and self._holds_same_bytes(target, tmp):
                return
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
        """Objects under `prefix`, in name order; whatever is not an object is skipped."""
        for entry in self.entries(prefix):
            if isinstance(entry, ObjectRef):
                yield entry

    def entries(self, prefix: str) -> Iterator[ObjectRef | NotAnObject]:
        """Everything under `prefix` in name order: objects, and what cannot be one and why.

        Hidden and partial names (`is_partial_name`) are skipped silently: they
        are how copy tools write before renaming. Nothing found raises: a path
        that vanishes while it is walked is left out, a directory that cannot be
        read is reported as `unreadable`. Symbolic links are reported, never
        followed, including a symlinked prefix directory.
        """
        rel = prefix.strip("/")
        if not rel:
            yield from self._walk(self.root, "")
            return
        parts = rel.split("/")
        if any(part in ("", ".", "..") for part in parts):
            raise ValueError(f"prefix {prefix!r} escapes the bucket directory {self.root}")
        here = self.root
        for depth, part in enumerate(parts, start=1):
            here = here / part
            try:
                st = here.lstat()
            except FileNotFoundError:
                return
            except OSError as exc:
                yield self._not_object("/".join(parts[:depth]), UNREADABLE,
                                       f"cannot inspect the directory: {exc.strerror}")
                return
            if stat.S_ISLNK(st.st_mode):
                yield self._symlink("/".join(parts[:depth]), here, st)
                return
            if not stat.S_ISDIR(st.st_mode):
                return
        yield from self._walk(here, rel + "/")

    def _not_object(self, name: str, why: str, detail: str,
                    generation: int | None = None) -> NotAnObject:
        return NotAnObject(name, Path(self.root, name).as_uri(), why, detail, generation)

    def _symlink(self, name: str, path: Path, st: os.stat_result) -> NotAnObject:
        try:
            target = printable_name(os.readlink(path))
        except OSError:
            target = "?"
        return self._not_object(
            name, SYMLINK,
            f"a symbolic link to {target!r}: a bucket holds no links, and following one could "
            "read outside the bucket; copy the file in instead",
            generation_of(st))

    def _walk(self, directory: Path, base: str) -> Iterator[ObjectRef | NotAnObject]:
        try:
            with os.scandir(directory) as scan:
                found = [(entry, _is_dir(entry)) for entry in scan]
        except FileNotFoundError:
            return
        except OSError as exc:
            yield self._not_object(base.rstrip("/"), UNREADABLE,
                                   f"cannot list the directory: {exc.strerror}")
            return
        # `name/` sorts as its children's names do, so objects come out in name order.
        found.sort(key=lambda item: item[0].name + ("/" if item[1] else ""))
        for entry, is_dir in found:
            name = base + entry.name
            if entry.name.startswith(".") or (not is_dir and is_partial_name(name)):
                continue
            try:
                st = entry.stat(follow_symlinks=False)
            except FileNotFoundError:
                continue  # gone since the directory was read: not in the bucket any more
            except OSError as exc:
                yield self._not_object(name, UNREADABLE, f"cannot inspect it: {exc.strerror}")
                continue
            try:
                name.encode("utf-8")
            except UnicodeEncodeError:
                yield self._not_object(
                    name, UNMAPPABLE_NAME,
                    f"the name {printable_name(name)!r} is not valid UTF-8; object names are "
                    "UTF-8 text in every bucket (and in events): rename it",
                    None if stat.S_ISDIR(st.st_mode) else generation_of(st))
                continue
            mode = st.st_mode
            if stat.S_ISLNK(mode):
                yield self._symlink(name, Path(entry.path), st)
            elif stat.S_ISDIR(mode):
                if entry.name.endswith(".parquet"):
                    yield self._not_object(
                        name, DIRECTORY,
                        "a directory, not a file: objects are files, and a directory named "
                        "*.parquet is a dataset (Spark, pyarrow) whose parts are not TLC files; "
                        "its contents are not announced. Drop each file as an object instead")
                else:
                    yield from self._walk(Path(entry.path), name + "/")
            elif stat.S_ISREG(mode):
                yield self._ref(name, Path(entry.path), st)
            else:
                yield self._not_object(name, NOT_A_FILE,
                                       f"{file_kind(mode)}, not a regular file: never read",
                                       generation_of(st))


def _is_dir(entry: os.DirEntry[str]) -> bool:
    """Without following links; an entry that cannot be inspected counts as a file."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False
