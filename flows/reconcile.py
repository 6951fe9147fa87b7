"""Reconcile flow: the scheduled safety net that re-emits what stalled, in every profile.

`deploy.py` registers it on a short interval (TAXI_RECONCILE_EVERY_MINUTES), so a
file stranded by a lost notification, a failed automation action or a server
crash is picked up within minutes without anyone running a command.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import acreate_table_artifact

from flows.common import timed_run_name
from taxi_pipeline.ops.reconcile import reconcile as reconcile_pass
from taxi_pipeline.settings import get_settings


@flow(name="reconcile", flow_run_name=timed_run_name)
async def reconcile(older_than_minutes: float | None = None,
                    dry_run: bool = False) -> dict[str, Any]:
    """Re-emit raw objects whose current generation never reached the warehouse."""
    logger = get_run_logger()
    settings = get_settings()
    minutes = settings.reconcile_after_minutes if older_than_minutes is None \
        else older_than_minutes
    report = await reconcile_pass(settings, timedelta(minutes=minutes), dry_run)
    rows: list[dict[str, Any]] = []
    for item in report.stalled:
        why = report.left_alone(item)
        action = f"left alone: {why}" if why else (
            "listed (dry run)" if dry_run else "re-emitted")
        logger.info("stalled uri=%s generation=%s why=%s action=%s", item.obj.uri,
                    item.obj.generation, item.why, action)
        rows.append({"object": item.obj.uri, "generation": item.obj.generation,
                     "why": item.why, "action": action})
    if rows:
        await acreate_table_artifact(
            key="reconcile", table=rows,
            description=f"Objects stalled for more than {minutes} minutes")
    summary = {"stalled": len(report.stalled), "in_flight": len(report.in_flight),
               "re_emitted": len(report.emitted), "confirmed": len(report.confirmed)}
    logger.info("reconcile %s", summary)
    if report.unconfirmed:
        raise RuntimeError(f"{report.unconfirmed} re-emitted events were not confirmed as stored "
                           "by the Prefect server; the next reconcile run tries again")
    return summary
