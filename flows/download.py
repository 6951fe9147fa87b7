"""Download flow: fetch TLC monthly files into the bucket's raw prefix, on a schedule.

Idempotent: a month already in the bucket is skipped, and the object is
written with "only if absent", so two overlapping runs cannot both write it.
Landing the file is all it does; the bucket notification starts the rest.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx
from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import emit
from taxi_pipeline import events
from taxi_pipeline.objects import ObjectRef, raw_object_name, tlc_file_name
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.storage import (
    ObjectNotFound,
    ObjectStore,
    PreconditionFailed,
    store_from_settings,
)
from taxi_pipeline.storage.local import has_parquet_footer

PROGRESS_EVERY = 16 * 2**20


def default_month(lag_months: int, today: datetime | None = None) -> str:
    """The newest month TLC should have published: `lag_months` before this one."""
    today = today or datetime.now(UTC)
    index = today.year * 12 + (today.month - 1) - lag_months
    return f"{index // 12:04d}-{index % 12 + 1:02d}"


def _planned(store: ObjectStore, name: str) -> ObjectRef:
    """A reference for events about an object that does not exist (yet)."""
    return ObjectRef(bucket=store.bucket, name=name, generation=0, scheme=store.scheme)


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30)
def download_month(store: ObjectStore, settings: Settings, dataset: str, month: str) -> str:
    """Returns "downloaded", "exists" or "not_published"."""
    logger = get_run_logger()
    year, mon = (int(part) for part in month.split("-"))
    name = raw_object_name(settings.raw_prefix, dataset, year, mon)
    try:
        existing = store.ref(name)
        logger.info("exists uri=%s generation=%s: skipped", existing.uri, existing.generation)
        emit(events.DOWNLOAD_SKIPPED, existing, settings, payload={"reason": "exists"})
        return "exists"
    except ObjectNotFound:
        pass
    url = f"{settings.tlc_base_url.rstrip('/')}/{tlc_file_name(dataset, year, mon)}"
    with httpx.stream("GET", url, timeout=60, follow_redirects=True) as response:
        if response.status_code in (403, 404):
            # TLC answers 403/404 for months it has not published yet.
            logger.info("not published yet url=%s (HTTP %s)", url, response.status_code)
            emit(events.DOWNLOAD_SKIPPED, _planned(store, name), settings,
                 payload={"reason": "not_published", "url": url,
                          "status": response.status_code})
            return "not_published"
        response.raise_for_status()
        total = int(response.headers.get("content-length") or 0)
        written = 0
        try:
            with store.publish(name, if_generation_match=0) as path:
                with path.open("wb") as out:
                    next_report = PROGRESS_EVERY
                    for chunk in response.iter_bytes(1 << 20):
                        out.write(chunk)
                        written += len(chunk)
                        if written >= next_report:
                            logger.info("downloading url=%s %d/%s MiB", url, written >> 20,
                                        total >> 20 if total else "?")
                            next_report += PROGRESS_EVERY
                if not has_parquet_footer(path):
                    raise ValueError(f"{url} did not return a complete parquet file "
                                     f"({written} bytes); nothing was written to the bucket")
        except PreconditionFailed:
            logger.info("another run wrote %s first: skipped", name)
            return "exists"
    landed = store.ref(name)
    logger.info("downloaded url=%s -> uri=%s bytes=%d", url, landed.uri, written)
    emit(events.DOWNLOAD_COMPLETED, landed, settings, payload={"url": url, "bytes": written})
    return "downloaded"


@flow(name="download")
def download(months: list[str] | None = None,
             datasets: list[str] | None = None) -> dict[str, Any]:
    """Fetch each dataset's month (default: the newest TLC should have published)."""
    logger = get_run_logger()
    settings = get_settings()
    store = store_from_settings(settings)
    months = months or [default_month(settings.download_lag_months)]
    datasets = datasets or settings.download_datasets
    outcome: dict[str, Any] = {}
    failures: list[str] = []
    for month in months:
        for dataset in datasets:
            key = f"{dataset}/{month}"
            try:
                outcome[key] = download_month(store, settings, dataset, month)
            except Exception as exc:
                year, mon = (int(part) for part in month.split("-"))
                planned = _planned(store, raw_object_name(settings.raw_prefix, dataset, year, mon))
                emit(events.DOWNLOAD_FAILED, planned, settings,
                     payload={"error": f"{type(exc).__name__}: {exc}"})
                logger.error("download failed %s: %s", key, exc)
                outcome[key] = "failed"
                failures.append(key)
    if failures:
        raise RuntimeError(f"downloads failed: {', '.join(failures)}; see the flow run logs")
    return outcome
