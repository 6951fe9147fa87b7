"""Register the pipeline's deployments on a work pool and apply its automations.

`python -m deploy` (or `taxi-pipeline up`, which calls it). Idempotent: every
deployment and automation is created or updated by name. Entrypoints are
module paths (`flows.transform.transform`), so the same deployment runs from
the installed package on a process worker and from the image on Kubernetes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate, WorkPoolUpdate
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.flows import Flow
from prefect.schedules import Cron, Interval, Schedule
from prefect.types.entrypoint import EntrypointType

from automations.apply import apply_automations
from automations.definitions import pipeline_automations
from flows.backfill import backfill
from flows.download import download
from flows.load import load
from flows.reconcile import reconcile
from flows.recover import recover
from flows.transform import transform
from taxi_pipeline.settings import GCP_NAME_SETTINGS, Settings, SettingsError, get_settings

log = logging.getLogger("deploy")


BASE_JOB_TEMPLATE = Path(__file__).resolve().parent / "k8s" / "work-pool" / "base-job-template.json"

# Per-flow resources of flow-run pods on the kubernetes pool; flows not named here
# get the base job template's defaults. The transform holds one row group plus one
# batch in memory (381 MiB peak for a 3M-row month) and stages its output in /tmp
# before the upload; the load only starts BigQuery jobs (no row data passes through).
KUBERNETES_JOB_VARIABLES: dict[str, dict[str, Any]] = {
    "transform": {"cpu_request": "1", "cpu_limit": "2", "memory_request": "2Gi",
                  "memory_limit": "2Gi", "ephemeral_storage_request": "2Gi",
                  "ephemeral_storage_limit": "4Gi"},
    "load": {"cpu_request": "250m", "cpu_limit": "500m", "memory_request": "768Mi",
             "memory_limit": "768Mi", "ephemeral_storage_request": "256Mi",
             "ephemeral_storage_limit": "512Mi"},
}

# One load at a time: each load MERGEs into the same BigQuery table, and concurrent
# mutating DML on one table conflicts (serialization errors) or queues at BigQuery.
# Extra runs wait for the slot (ENQUEUE). The grace period covers a pod waiting for
# a new node (GKE Autopilot), so a slow start does not free the slot for a second load.
KUBERNETES_CONCURRENCY: dict[str, ConcurrencyLimitConfig] = {
    "load": ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.ENQUEUE,
                                   grace_period_seconds=900),
}

# A reconcile that starts while another still runs (late runs on a busy machine
# start back to back) would re-emit the same objects twice: it is cancelled instead.
ONE_RECONCILE_AT_A_TIME = ConcurrencyLimitConfig(
    limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)

# Interval schedules count from this instant, the same on every deploy.
INTERVAL_ANCHOR = datetime(2026, 1, 1, tzinfo=UTC)


def pool_type(settings: Settings) -> str:
    return "kubernetes" if settings.profile == "gcp" else "process"


def kubernetes_base_job_template(path: Path = BASE_JOB_TEMPLATE) -> dict[str, Any]:
    """The kubernetes pool's base job template, kept in the repo beside the manifests."""
    if not path.is_file():
        raise RuntimeError(f"base job template {path} not found: run `python -m deploy` from a "
                           "checkout of the repository (it reads k8s/work-pool/), or pass "
                           "--base-job-template (the image has it under "
                           "/opt/taxi-pipeline/k8s/work-pool/).")
    return cast(dict[str, Any], json.loads(path.read_text()))


def process_base_job_template(settings: Settings) -> dict[str, Any]:
    """Prefect's process template; with a warm-runs socket, its launcher is the command.

    `taxi-pipeline up` starts a fork server that keeps Prefect and the flows imported
    and sets TAXI_WARM_RUNS_SOCKET; each run then starts in milliseconds instead of
    paying a new interpreter's imports (taxi_pipeline/stack/warm_runs.py). The launcher
    falls back to a normal cold start when the fork server is not running.
    """
    from prefect.workers.process import ProcessWorker

    from taxi_pipeline.stack.warm_runs import process_pool_template

    if settings.warm_runs_socket:
        return process_pool_template(Path(settings.warm_runs_socket))
    return cast(dict[str, Any], ProcessWorker.get_default_base_job_template())


def base_job_template(settings: Settings, path: Path | None = None) -> dict[str, Any]:
    """The template the pool must have (kubernetes: from `path`, default the repo's)."""
    if pool_type(settings) == "kubernetes":
        return kubernetes_base_job_template(path or BASE_JOB_TEMPLATE)
    return process_base_job_template(settings)


async def ensure_work_pool(settings: Settings, template_path: Path | None = None) -> str:
    """Create the pool, or bring its base job template up to date; says which it did."""
    template = base_job_template(settings, template_path)
    async with get_client() as client:
        try:
            pool = await client.read_work_pool(settings.work_pool)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(name=settings.work_pool, type=pool_type(settings),
                               base_job_template=template)
            )
            log.info("created %s work pool %r", pool_type(settings), settings.work_pool)
            return "created"
        if pool.type != pool_type(settings):
            raise RuntimeError(
                f"work pool {settings.work_pool!r} is of type {pool.type!r}, but profile "
                f"{settings.profile!r} needs {pool_type(settings)!r}: set TAXI_WORK_POOL to "
                "another name or delete that pool."
            )
        if pool.base_job_template == template:
            log.info("work pool %r unchanged", settings.work_pool)
            return "unchanged"
        await client.update_work_pool(settings.work_pool,
                                      WorkPoolUpdate(base_job_template=template))
        log.info("updated the base job template of work pool %r", settings.work_pool)
        return "updated"


def deployment_schedule(cron: str | None, interval: timedelta | None) -> Schedule | None:
    """The deployment's one schedule, the same object on every deploy: a slug (the server
    then updates it in place, keeping its id and its scheduled runs, instead of replacing
    it) and, for an interval, a fixed anchor (`interval=` alone anchors at "now")."""
    if cron:
        return Cron(cron, slug="cron")
    if interval:
        return Interval(interval, anchor_date=INTERVAL_ANCHOR, slug="interval")
    return None


def register(flow: Flow[Any, Any], name: str, settings: Settings, cron: str | None = None,
             interval: timedelta | None = None, job_variables: dict[str, Any] | None = None,
             concurrency_limit: int | ConcurrencyLimitConfig | None = None) -> UUID:
    """Create or update one deployment. On the kubernetes pool, job_variables and
    concurrency_limit default to the flow's entries in KUBERNETES_JOB_VARIABLES and
    KUBERNETES_CONCURRENCY."""
    if pool_type(settings) == "kubernetes":
        if job_variables is None:
            job_variables = dict(KUBERNETES_JOB_VARIABLES.get(flow.name, {}))
        if concurrency_limit is None:
            concurrency_limit = KUBERNETES_CONCURRENCY.get(flow.name)
    # to_deployment/apply dispatch to their async twins inside an event loop; here
    # (plain sync code) they return the values.
    deployment = cast(RunnerDeployment, flow.to_deployment(
        name=name,
        work_pool_name=settings.work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=(flow.description or "").strip().splitlines()[0] if flow.description else None,
        tags=["taxi-pipeline"],
        schedule=deployment_schedule(cron, interval),
        job_variables=job_variables,
        concurrency_limit=concurrency_limit,
    ))
    image = settings.image or None
    if pool_type(settings) == "kubernetes" and not image:
        settings.require("image")
    deployment_id = cast(UUID, deployment.apply(work_pool_name=settings.work_pool, image=image))
    log.info("deployment %s/%s -> %s on pool %r", flow.name, name, deployment_id,
             settings.work_pool)
    return deployment_id


async def alert_block_id(settings: Settings) -> UUID | None:
    """The notification block named by TAXI_ALERT_BLOCK (`<block-type-slug>/<name>`)."""
    if not settings.alert_block:
        return None
    slug, _, name = settings.alert_block.partition("/")
    if not name:
        raise RuntimeError(f"TAXI_ALERT_BLOCK={settings.alert_block!r}: expected "
                           "<block-type-slug>/<name>, for example slack-webhook/taxi-alerts")
    async with get_client() as client:
        try:
            block = await client.read_block_document_by_name(name, slug)
        except ObjectNotFound:
            raise RuntimeError(f"TAXI_ALERT_BLOCK: no {slug} block named {name!r}; create it "
                               "(`prefect block create " + slug + "`) or unset the variable"
                               ) from None
    return block.id


def deploy(settings: Settings | None = None,
           template_path: Path | None = None) -> dict[str, UUID]:
    """Register download (on its cron), transform, load, reconcile (on its interval),
    recover and backfill (no schedule: run on demand); point the automations at them."""
    settings = settings or get_settings()
    asyncio.run(ensure_work_pool(settings, template_path))
    ids = {
        "download": register(download, "scheduled", settings, cron=settings.download_cron),
        "transform": register(transform, settings.transform_deployment, settings),
        "load": register(load, settings.load_deployment, settings),
        "reconcile": register(reconcile, "scheduled", settings,
                              interval=timedelta(minutes=settings.reconcile_every_minutes),
                              concurrency_limit=ONE_RECONCILE_AT_A_TIME),
        "recover": register(recover, "recover", settings),
        "backfill": register(backfill, "backfill", settings),
    }
    automations = pipeline_automations(ids["transform"], ids["load"], ids["recover"],
                                       asyncio.run(alert_block_id(settings)),
                                       download_deployment_id=ids["download"],
                                       no_data_hours=settings.alert_no_data_hours)
    outcome = asyncio.run(apply_automations(automations))
    for name, what in outcome.items():
        log.info("automation %r %s", name, what)
    prepare_warehouse(settings)
    return ids


def prepare_warehouse(settings: Settings) -> None:
    """Create each dataset's table and load the `zones` table, so the README's first
    query answers before the first load. Never fails the deploy: a registration job
    without warehouse rights logs what to run instead (`taxi-pipeline zones`)."""
    from taxi_pipeline.ops.zones import install_zones

    try:
        done = install_zones(settings)
    except Exception as exc:
        log.warning("zones table not loaded (%s: %s); run `taxi-pipeline zones` with the "
                    "warehouse's credentials", type(exc).__name__, exc)
        return
    log.info("zones: %d rows in %s; tables %s", done.rows, done.table_uri,
             ", ".join(done.dataset_tables))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m deploy",
        description="Register the deployments, the work pool and the automations.")
    parser.add_argument("--image", help="flow-run image of the kubernetes pool (gcp profile), "
                        "e.g. REGION-docker.pkg.dev/PROJECT/REPO/taxi-pipeline@sha256:...; "
                        "default: TAXI_IMAGE")
    parser.add_argument("--base-job-template", type=Path, default=None,
                        help="the kubernetes pool's base job template (default: "
                             "k8s/work-pool/base-job-template.json beside this file; in the "
                             "image: /opt/taxi-pipeline/k8s/work-pool/base-job-template.json)")
    args = parser.parse_args(argv)
    settings = get_settings()
    if args.image:
        settings = settings.model_copy(update={"image": args.image})
    also = []
    if pool_type(settings) == "kubernetes" and not settings.image:
        also.append(f"TAXI_IMAGE is not set: profile {settings.profile!r} runs flows on a "
                    "kubernetes work pool and needs their image; set it, or pass --image "
                    "REGION-docker.pkg.dev/PROJECT/REPO/taxi-pipeline@sha256:...")
    try:
        # Names left unset are not refused: on GKE the flows read theirs from the
        # taxi-config ConfigMap, not from this process (CI sets only TAXI_PROFILE).
        settings.validate_for_profile(also, optional=GCP_NAME_SETTINGS)
    except SettingsError as exc:
        # A user error: the message says what to set; no traceback.
        raise SystemExit(f"error: {exc}") from None
    deploy(settings, args.base_job_template)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    # Importing the flows already gave the root logger Prefect's console handler (so
    # basicConfig did nothing) at level WARNING: let this module's INFO lines through.
    log.setLevel(logging.INFO)
    main()
