"""What the pipeline knows about one object generation, whatever the backend."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from urllib.parse import unquote, urlparse

# TLC names files `<dataset>_tripdata_<YYYY>-<MM>.parquet` (dataset: yellow, green, fhv, fhvhv);
# the CSV mirror `.csv.gz`, and users bring `.csv`.
_TLC_NAME = re.compile(r"(?P<dataset>[a-z]+)_tripdata_(?P<year>\d{4})-(?P<month>\d{2})")


@dataclass(frozen=True)
class ObjectRef:
    """One generation of one object in a bucket (a directory in the local profile)."""

    bucket: str
    name: str
    generation: int
    scheme: str = "gs"
    size: int | None = None
    md5_hash: str | None = None
    crc32c: str | None = None
    content_type: str | None = None
    created: datetime | None = None
    updated: datetime | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False)

    @property
    def uri(self) -> str:
        if self.scheme == "file":
            return Path(self.bucket, self.name).as_uri()
        return f"{self.scheme}://{self.bucket}/{self.name}"

    @property
    def basename(self) -> str:
        return self.name.rsplit("/", 1)[-1]


def parse_uri(uri: str) -> tuple[str, str, str]:
    """Split `gs://bucket/name` into (scheme, bucket, name); `file://` URIs give (file, "", path).

    A file URI has no bucket of its own: the local adapter resolves it against
    the configured bucket directory.
    """
    parsed = urlparse(uri)
    if parsed.scheme == "gs":
        name = parsed.path.lstrip("/")
        if not parsed.netloc or not name:
            raise ValueError(f"{uri!r} is not a gs://bucket/object URI")
        return "gs", parsed.netloc, name
    if parsed.scheme == "file":
        return "file", "", unquote(parsed.path)
    raise ValueError(f"unsupported object URI {uri!r}: expected gs://bucket/name or file:///path")


def stage_of(name: str, prefixes: dict[str, str]) -> str:
    """`raw`, `processed`, ... from the object's prefix; `other` when none matches."""
    for stage, prefix in prefixes.items():
        if name.startswith(prefix):
            return stage
    return "other"


def dataset_of(name: str) -> str:
    """`yellow`/`green`/... from the TLC file name, else from the folder after the stage."""
    match = _TLC_NAME.search(name.rsplit("/", 1)[-1])
    if match:
        return match.group("dataset")
    parts = name.split("/")
    if len(parts) >= 3:
        return parts[1]
    return "unknown"


def month_of(name: str) -> tuple[int, int] | None:
    """(year, month) that a TLC file name claims to cover, or None."""
    match = _TLC_NAME.search(name.rsplit("/", 1)[-1])
    if not match:
        return None
    year, month = int(match.group("year")), int(match.group("month"))
    if not 1 <= month <= 12:
        return None
    return year, month


def month_after(year: int, month: int) -> tuple[int, int]:
    """(year, month) of the month after this one: the exclusive end of a month's range."""
    return year + month // 12, month % 12 + 1


def folder_year_of(name: str) -> int | None:
    """The year a folder of the name claims (`raw/yellow/2024/...` -> 2024), or None.

    Only the folders, not the file name: `month_of` reads that.
    """
    years = [int(part) for part in name.split("/")[:-1] if re.fullmatch(r"(19|20)\d\d", part)]
    return years[-1] if years else None


def sibling_name(name: str, from_prefix: str, to_prefix: str) -> str:
    """The deterministic name of a derived object: same path under another prefix.

    `raw/yellow/2024/x.parquet` -> `processed/yellow/2024/x.parquet`. Names
    outside `from_prefix` keep their full path under `to_prefix`.
    """
    rest = name[len(from_prefix) :] if name.startswith(from_prefix) else name
    return to_prefix + rest


def output_name(name: str, from_prefix: str, to_prefix: str) -> str:
    """The name of a transform output (processed/, rejects/): the sibling name, ending
    in `.parquet` (the outputs always are parquet). A CSV keeps its ending before it,
    `raw/green/2020/green_tripdata_2020-10.csv.gz` ->
    `processed/green/2020/green_tripdata_2020-10.csv.gz.parquet`, so a month dropped
    in two formats still has two outputs, one per source, as every source has."""
    sibling = sibling_name(name, from_prefix, to_prefix)
    return sibling if sibling.endswith(".parquet") else sibling + ".parquet"


def tlc_file_name(dataset: str, year: int, month: int, ext: str = "parquet") -> str:
    return f"{dataset}_tripdata_{year:04d}-{month:02d}.{ext}"


def raw_object_name(raw_prefix: str, dataset: str, year: int, month: int,
                    ext: str = "parquet") -> str:
    """Where the download flow (and the demo) put a month: raw/<dataset>/<year>/<file>."""
    return f"{raw_prefix}{dataset}/{year:04d}/{tlc_file_name(dataset, year, month, ext)}"
