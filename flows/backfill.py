"""Backfill flow: download a range of TLC months into raw/, a few at once.

The same work as `taxi-pipeline backfill` (`taxi_pipeline.ops.backfill.run_backfill`),
run by Prefect: each month's outcome is a log line and a `pipeline.download.*`
event, a progress artifact follows the count, and a table artifact holds the
summary. The run fails when any month failed (after its retries), naming them.
Registered by deploy.py without a schedule: run it on demand, e.g.
`prefect deployment run backfill/backfill -p from_month=2019-01 -p to_month=2025-12`.
"""

from __future__ import annotations

from typing import Any, Literal, cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import (
    create_progress_artifact,
    create_table_artifact,
    update_progress_artifact,
)

from flows.common import timed_run_name
from flows.download import emit_outcome
from taxi_pipeline.ops.backfill import progress_line, run_backfill
from taxi_pipeline.settings import get_settings
from taxi_pipeline.sources.tlc_download import (
    FAILED,
    MonthResult,
    default_month,
    month_range,
    parse_datasets,
)
from taxi_pipeline.storage import store_from_settings


@flow(name="backfill", flow_run_name=timed_run_name)
def backfill(from_month: str, to_month: str | None = None,
             datasets: list[str] | None = None,
             concurrency: int | None = None,
             source: Literal["tlc", "mirror"] | None = None) -> dict[str, Any]:
    """Download every month from `from_month` to `to_month` (YYYY-MM, both included;
    default: the newest month TLC should have published) of each dataset (default
    TAXI_DOWNLOAD_DATASETS), `concurrency` at once (default TAXI_BACKFILL_CONCURRENCY),
    from `source` (tlc: parquet; mirror: the 2019-2021 CSV.gz mirror; default
    TAXI_DOWNLOAD_SOURCE)."""
    logger = get_run_logger()
    settings = get_settings()
    if source is not None:
        settings = settings.model_copy(update={"download_source": source})
    store = store_from_settings(settings)
    names = parse_datasets(datasets or settings.download_datasets)
    months = month_range(from_month, to_month or default_month(settings.download_lag_months))
    workers = concurrency or settings.backfill_concurrency
    total = len(names) * len(months)
    logger.info("backfill %s %s..%s: %d files from %s, %d at once", ",".join(names),
                months[0], months[-1], total,
                settings.tlc_mirror_url if settings.download_source == "mirror"
                else settings.tlc_base_url, workers)
    # Sync call in a sync flow: the UUID itself (the annotation also allows a coroutine).
    progress = cast(UUID, create_progress_artifact(
        0.0, key="backfill-progress",
        description=f"{','.join(names)} {months[0]}..{months[-1]}: {total} files"))

    def on_result(result: MonthResult, done: int, total: int) -> None:
        line = progress_line(result, done, total)
        if result.outcome == FAILED:
            logger.error(line)
        else:
            logger.info(line)
        emit_outcome(result, store, settings)
        update_progress_artifact(progress, 100.0 * done / total)

    report = run_backfill(settings, names, months, concurrency=workers, store=store,
                          on_result=on_result, logger=logger)
    for line in report.summary():
        logger.info(line)
    create_table_artifact(
        key="backfill",
        table=[{"dataset": r.dataset, "month": r.month, "outcome": r.outcome,
                "bytes": r.bytes, "detail": r.detail} for r in report.results],
        description=", ".join(f"{k} {v}" for k, v in report.counts().items()))
    if report.failed:
        raise RuntimeError(f"{len(report.failed)} of {total} downloads failed: "
                           + "; ".join(f"{r.key}: {r.detail}" for r in report.failed))
    return report.as_dict()
