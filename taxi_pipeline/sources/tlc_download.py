"""Fetch one TLC month into the bucket's raw prefix: the download flow, the backfill flow
and `taxi-pipeline backfill` all land files through `fetch_month`.

What lands under `raw/` is always a whole file: the body streams into the store's
publish path (a hidden temporary file beside the target locally, a local temporary
file for GCS), its parquet magic and footer metadata (or, from the CSV.gz mirror,
its gzip magic and whole gzip stream) are checked, and only then does the publish
complete. Two sources (`TAXI_DOWNLOAD_SOURCE`, `--source`): `tlc`, TLC's parquet
files of all four datasets; `mirror`, the CSV.gz mirror of 2019-2021 that course
material uses (months outside it are reported not published, without a request).
A month already in the bucket in either format is `present`: it is never landed
twice. Anything else (an HTML error page served with 200, a
truncated body, a 5xx) leaves nothing behind. The object is published "only if absent"
(`if_generation_match=0`), so two runs never both write a month.

Each month ends as one of:

- `landed`: downloaded, verified, published;
- `present`: already in the bucket (or another run published it first): skipped;
- `not_published`: TLC answered 403/404, which is how it answers for months it has
  not published yet;
- `failed`: with the reason (bad content, a 4xx, or 5xx/connection errors/truncated
  bodies on every one of `TAXI_DOWNLOAD_ATTEMPTS` tries).
"""

from __future__ import annotations

import logging
import re
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq

from taxi_pipeline.datasets.registry import DATASETS as REGISTERED_DATASETS
from taxi_pipeline.objects import ObjectRef, raw_object_name, tlc_file_name
from taxi_pipeline.settings import Settings
from taxi_pipeline.storage import ObjectNotFound, ObjectStore, PreconditionFailed
from taxi_pipeline.storage.local import (
    GZIP_MAGIC,
    PARQUET_MAGIC,
    gzip_complete,
    has_parquet_footer,
)

log = logging.getLogger(__name__)

# The datasets the transform understands (taxi_pipeline/datasets/registry.py).
DATASETS = REGISTERED_DATASETS
SOURCES = ("tlc", "mirror")
# The months the CSV.gz mirror holds (yellow, green, fhv and fhvhv of 2019-2021).
MIRROR_FIRST, MIRROR_LAST = "2019-01", "2021-12"
# Formats a month may sit in under raw/ (what the download lands, what users drop).
RAW_FORMATS = ("parquet", "csv.gz", "csv")

LANDED = "landed"
PRESENT = "present"
NOT_PUBLISHED = "not_published"
FAILED = "failed"
OUTCOMES = (LANDED, PRESENT, NOT_PUBLISHED, FAILED)

PROGRESS_EVERY = 16 * 2**20
MAX_RETRY_WAIT = 60.0

_MONTH = re.compile(r"(\d{4})-(\d{2})")

Logger = logging.Logger | logging.LoggerAdapter[Any]


class Cancelled(Exception):
    """The caller asked every download to stop (Ctrl-C)."""


class _Retry(Exception):
    """A failure the next try may not have: 5xx, 429, connection error, truncated body."""


class _Refused(Exception):
    """A failure every try would have: a 4xx, or content that is not parquet."""


@dataclass(frozen=True)
class MonthResult:
    """How one dataset's month ended."""

    dataset: str
    month: str
    outcome: str
    name: str
    url: str
    detail: str = ""
    bytes: int = 0
    attempts: int = 0
    seconds: float = 0.0
    obj: ObjectRef | None = None
    http_status: int | None = None

    @property
    def key(self) -> str:
        return f"{self.dataset}/{self.month}"


def parse_month(text: str) -> tuple[int, int]:
    """`2024-03` -> (2024, 3); ValueError naming the expected form otherwise."""
    match = _MONTH.fullmatch(text.strip())
    if not match or not 1 <= int(match.group(2)) <= 12:
        raise ValueError(f"{text!r} is not a month: expected YYYY-MM, e.g. 2024-03")
    return int(match.group(1)), int(match.group(2))


def month_range(first: str, last: str) -> list[str]:
    """Every month from `first` to `last`, both included, as YYYY-MM."""
    start, end = parse_month(first), parse_month(last)
    begin = start[0] * 12 + start[1] - 1
    stop = end[0] * 12 + end[1] - 1
    if stop < begin:
        raise ValueError(f"the range {first}..{last} is empty: the first month comes after "
                         "the last")
    return [f"{index // 12:04d}-{index % 12 + 1:02d}" for index in range(begin, stop + 1)]


def parse_datasets(values: str | list[str]) -> list[str]:
    """`yellow,green` (or a list of names) -> ["yellow", "green"], checked, in order, once."""
    items = values.split(",") if isinstance(values, str) else [
        part for value in values for part in value.split(",")]
    names = list(dict.fromkeys(item.strip().lower() for item in items if item.strip()))
    unknown = [name for name in names if name not in DATASETS]
    if unknown or not names:
        raise ValueError(f"unknown dataset(s) {', '.join(unknown) or '(none given)'}: the "
                         f"pipeline handles {', '.join(DATASETS)}")
    return names


def default_month(lag_months: int, today: datetime | None = None) -> str:
    """The newest month TLC should have published: `lag_months` before this one."""
    today = today or datetime.now(UTC)
    index = today.year * 12 + (today.month - 1) - lag_months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def source_format(settings: Settings) -> str:
    """The file format the configured source serves: parquet (tlc) or csv.gz (mirror)."""
    return "csv.gz" if settings.download_source == "mirror" else "parquet"


def month_url(settings: Settings, dataset: str, month: str) -> str:
    year, mon = parse_month(month)
    if settings.download_source == "mirror":
        name = tlc_file_name(dataset, year, mon, "csv.gz")
        return f"{settings.tlc_mirror_url.rstrip('/')}/{dataset}/{name}"
    return f"{settings.tlc_base_url.rstrip('/')}/{tlc_file_name(dataset, year, mon)}"


def month_object_name(settings: Settings, dataset: str, month: str) -> str:
    year, mon = parse_month(month)
    return raw_object_name(settings.raw_prefix, dataset, year, mon, source_format(settings))


def in_source(settings: Settings, month: str) -> bool:
    """Whether the configured source can have the month at all (the mirror: 2019-2021)."""
    return settings.download_source != "mirror" or MIRROR_FIRST <= month <= MIRROR_LAST


def planned_ref(store: ObjectStore, name: str) -> ObjectRef:
    """A reference for events about an object that does not exist (yet)."""
    return ObjectRef(bucket=store.bucket, name=name, generation=0, scheme=store.scheme)


def gzip_problem(path: Path) -> str | None:
    """Why the file is not a whole gzip stream, or None when it is one."""
    if gzip_complete(path):
        return None
    with path.open("rb") as handle:
        head = handle.read(16)
    if not head.startswith(GZIP_MAGIC):
        return f"not gzip ({path.stat().st_size} bytes starting {head!r})"
    return f"truncated: the gzip stream ends early after {path.stat().st_size} bytes"


def content_problem(path: Path, file_format: str) -> str | None:
    return gzip_problem(path) if file_format == "csv.gz" else parquet_problem(path)


def parquet_problem(path: Path) -> str | None:
    """Why the file is not a complete parquet file, or None when it is one.

    Magic bytes at both ends (the same check the bridge makes), then the footer
    metadata must parse with pyarrow: a body cut off after a chunk that happens to
    end in `PAR1` still fails here.
    """
    if not has_parquet_footer(path):
        size = path.stat().st_size
        with path.open("rb") as handle:
            head = handle.read(16)
        if not head.startswith(PARQUET_MAGIC):
            return f"not parquet ({size} bytes starting {head!r})"
        return f"truncated: no parquet footer after {size} bytes"
    try:
        pq.read_metadata(path)
    except Exception as exc:
        return f"unreadable parquet footer: {type(exc).__name__}: {exc}"
    return None


def present(store: ObjectStore, name: str) -> ObjectRef | None:
    try:
        return store.ref(name)
    except ObjectNotFound:
        return None


def present_any(store: ObjectStore, settings: Settings, dataset: str, month: str
                ) -> ObjectRef | None:
    """The month's raw object in any format (parquet from TLC, csv.gz from the mirror,
    a csv someone dropped): loading one month from two sources would double its rows."""
    year, mon = parse_month(month)
    for ext in RAW_FORMATS:
        found = present(store, raw_object_name(settings.raw_prefix, dataset, year, mon, ext))
        if found is not None:
            return found
    return None


def fetch_month(store: ObjectStore, settings: Settings, dataset: str, month: str, *,
                logger: Logger | None = None,
                cancel: threading.Event | None = None) -> MonthResult:
    """Land one dataset's month under raw/ unless it is there already.

    Never raises: HTTP and content problems, a cancel, and unexpected errors (the
    store's, say) end as `failed` with the reason, so one bad month does not stop a
    backfill of many.
    """
    logger = logger or log
    try:
        return _fetch_month(store, settings, dataset, month, logger,
                            cancel or threading.Event())
    except Exception as exc:
        logger.error("%s %s failed: %s: %s", dataset, month, type(exc).__name__, exc,
                     exc_info=True)
        return MonthResult(dataset, month, FAILED, month_object_name(settings, dataset, month),
                           month_url(settings, dataset, month), f"{type(exc).__name__}: {exc}")


def _fetch_month(store: ObjectStore, settings: Settings, dataset: str, month: str,
                 logger: Logger, cancel: threading.Event) -> MonthResult:
    name = month_object_name(settings, dataset, month)
    url = month_url(settings, dataset, month)
    started = time.monotonic()

    def result(outcome: str, detail: str = "", attempts: int = 0, size: int = 0,
               obj: ObjectRef | None = None, status: int | None = None) -> MonthResult:
        return MonthResult(dataset, month, outcome, name, url, detail, size, attempts,
                           time.monotonic() - started, obj, status)

    existing = present_any(store, settings, dataset, month)
    if existing is not None:
        return result(PRESENT, f"{existing.uri} generation {existing.generation}",
                      obj=existing)
    if not in_source(settings, month):
        return result(NOT_PUBLISHED, f"the CSV.gz mirror holds {MIRROR_FIRST}..{MIRROR_LAST} "
                      "only; use --source tlc for other months")
    attempts = settings.download_attempts
    for attempt in range(1, attempts + 1):
        try:
            status, written = _download_once(store, settings, name, url, logger, cancel)
        except Cancelled:
            return result(FAILED, "cancelled", attempt)
        except PreconditionFailed:
            # Another run published it between our check and our publish.
            obj = present(store, name)
            return result(PRESENT, "another run published it first", attempt, obj=obj)
        except _Refused as exc:
            return result(FAILED, str(exc), attempt)
        except _Retry as exc:
            if attempt == attempts:
                return result(FAILED, f"{exc} (gave up after {attempts} tries)", attempt)
            wait = min(settings.download_retry_seconds * 2 ** (attempt - 1), MAX_RETRY_WAIT)
            logger.warning("%s try %d of %d: %s; retrying in %.1f s", url, attempt, attempts,
                           exc, wait)
            if cancel.wait(wait):
                return result(FAILED, f"cancelled while waiting to retry ({exc})", attempt)
            continue
        if status in (403, 404):
            return result(NOT_PUBLISHED, f"HTTP {status}", attempt, status=status)
        obj = store.ref(name)
        logger.info("landed url=%s -> uri=%s bytes=%d", url, obj.uri, written)
        return result(LANDED, obj.uri, attempt, written, obj, status)
    raise AssertionError("unreachable: the last try returns")


def _download_once(store: ObjectStore, settings: Settings, name: str, url: str,
                   logger: Logger, cancel: threading.Event) -> tuple[int, int]:
    """One GET: (403 or 404, 0) when TLC has not published it, (200, bytes) when it landed.

    Raises `_Retry`, `_Refused`, `Cancelled` or `PreconditionFailed`; in every case the
    store's temporary file is gone and nothing was published.
    """
    timeout = httpx.Timeout(settings.download_timeout_seconds)
    try:
        with httpx.Client(timeout=timeout, follow_redirects=True) as client, \
                client.stream("GET", url) as response:
            status = response.status_code
            if status in (403, 404):
                return status, 0
            if status == 429 or status >= 500:
                raise _Retry(f"HTTP {status}")
            if status != 200:
                raise _Refused(f"HTTP {status} from {url}")
            content_type = response.headers.get("content-type", "")
            file_format = source_format(settings)
            if content_type.lower().startswith(("text/html", "application/xhtml")):
                raise _Refused(f"HTTP 200 with {content_type}: an error page, not {file_format}")
            expected = int(response.headers.get("content-length") or 0)
            with store.publish(name, if_generation_match=0) as path:
                written = _stream(response, path, url, expected, logger, cancel, file_format)
                if expected and response.num_bytes_downloaded != expected:
                    raise _Retry(f"truncated: {response.num_bytes_downloaded} of "
                                 f"{expected} bytes")
                problem = content_problem(path, file_format)
                if problem is not None:
                    if problem.startswith("not "):
                        raise _Refused(problem)
                    raise _Retry(problem)
            return status, written
    except httpx.TransportError as exc:
        # Connection refused or reset, timeouts, a body cut short of its Content-Length.
        raise _Retry(f"{type(exc).__name__}: {exc or 'connection error'}") from exc


def _stream(response: httpx.Response, path: Path, url: str, expected: int, logger: Logger,
            cancel: threading.Event, file_format: str = "parquet") -> int:
    """Copy the body to `path`; refuse a body that does not start like the format at once."""
    magic = GZIP_MAGIC if file_format == "csv.gz" else PARQUET_MAGIC
    written = 0
    head = b""
    next_report = PROGRESS_EVERY
    with path.open("wb") as out:
        # As the bytes arrive (no 1 MiB buffering), so a cancel stops within one read.
        for chunk in response.iter_bytes():
            if cancel.is_set():
                raise Cancelled
            if len(head) < 16:
                head += chunk[: 16 - len(head)]
                if len(head) >= len(magic) and not head.startswith(magic):
                    raise _Refused(f"not {file_format} (starts {head!r})")
            out.write(chunk)
            written += len(chunk)
            if written >= next_report:
                logger.info("downloading url=%s %d/%s MiB", url, written >> 20,
                            expected >> 20 if expected else "?")
                next_report += PROGRESS_EVERY
    return written
