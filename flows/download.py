"""Download flow: fetch TLC monthly files into the bucket's raw prefix, on a schedule.

Idempotent: a month already in the bucket is skipped, and the object is
written with "only if absent", so two overlapping runs cannot both write it.
Each month goes through `taxi_pipeline.sources.tlc_download.fetch_month` (as the backfill
does): streamed to the store's temporary path and verified as parquet (magic bytes
and footer metadata) before it is published, so an error page or a cut-off body
never appears under raw/.
Landing the file is all it does; the bucket notification starts the rest.
"""

from __future__ import annotations

from typing import Any, Literal

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE

from flows.common import emit, timed_run_name
from taxi_pipeline import events
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.sources.tlc_download import (
    FAILED,
    LANDED,
    NOT_PUBLISHED,
    PRESENT,
    MonthResult,
    default_month,
    fetch_month,
    month_object_name,
    planned_ref,
)
from taxi_pipeline.storage import ObjectStore, store_from_settings

# What the task returns for each outcome of `fetch_month` (the names the flow always used).
RETURNS = {LANDED: "downloaded", PRESENT: "exists", NOT_PUBLISHED: "not_published"}

__all__ = ["default_month", "download", "download_month", "emit_outcome"]


def emit_outcome(result: MonthResult, store: ObjectStore, settings: Settings) -> None:
    """The `pipeline.download.*` event of one month's result (download and backfill flows)."""
    obj = result.obj or planned_ref(store, result.name)
    if result.outcome == LANDED:
        emit(events.DOWNLOAD_COMPLETED, obj, settings,
             payload={"url": result.url, "bytes": result.bytes})
    elif result.outcome == PRESENT:
        emit(events.DOWNLOAD_SKIPPED, obj, settings, payload={"reason": "exists"})
    elif result.outcome == NOT_PUBLISHED:
        emit(events.DOWNLOAD_SKIPPED, obj, settings,
             payload={"reason": "not_published", "url": result.url,
                      "status": result.http_status})
    else:
        emit(events.DOWNLOAD_FAILED, obj, settings, payload={"error": result.detail})


class DownloadFailed(RuntimeError):
    """The month could not be landed; the reason says why (the task retries it)."""


@task(cache_policy=NO_CACHE, retries=2, retry_delay_seconds=30)
def download_month(store: ObjectStore, settings: Settings, dataset: str, month: str) -> str:
    """Returns "downloaded", "exists" or "not_published"; raises DownloadFailed.

    `fetch_month` already retries 5xx, connection errors and truncated bodies within
    seconds (TAXI_DOWNLOAD_ATTEMPTS); the task's retries come back after 30 s.
    """
    logger = get_run_logger()
    result = fetch_month(store, settings, dataset, month, logger=logger)
    if result.outcome == FAILED:
        raise DownloadFailed(f"{result.url}: {result.detail}; nothing was written to the "
                             "bucket")
    if result.outcome == PRESENT:
        logger.info("exists %s: skipped", result.detail)
    elif result.outcome == NOT_PUBLISHED:
        # TLC answers 403/404 for months it has not published yet.
        logger.info("not published yet url=%s (%s)", result.url, result.detail)
    emit_outcome(result, store, settings)
    return RETURNS[result.outcome]


@flow(name="download", flow_run_name=timed_run_name)
def download(months: list[str] | None = None,
             datasets: list[str] | None = None,
             source: Literal["tlc", "mirror"] | None = None) -> dict[str, Any]:
    """Fetch each dataset's month (default: the newest TLC should have published) from
    `source` (default TAXI_DOWNLOAD_SOURCE: tlc parquet, or the 2019-2021 CSV.gz mirror)."""
    logger = get_run_logger()
    settings = get_settings()
    if source is not None:
        settings = settings.model_copy(update={"download_source": source})
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
                planned = planned_ref(store, month_object_name(settings, dataset, month))
                emit(events.DOWNLOAD_FAILED, planned, settings,
                     payload={"error": f"{type(exc).__name__}: {exc}"})
                logger.error("download failed %s: %s", key, exc)
                outcome[key] = "failed"
                failures.append(key)
    if failures:
        raise RuntimeError(f"downloads failed: {', '.join(failures)}; see the flow run logs")
    return outcome
