"""Register the pipeline's deployments on a work pool and apply its automations.

`python -m deploy` (or `taxi-pipeline up`, which calls it). Idempotent: every
deployment and automation is created or updated by name. Entrypoints are
module paths (`flows.transform.transform`), so the same deployment runs from
the installed package on a process worker and from the image on Kubernetes.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta
from typing import Any, cast
from uuid import UUID

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.deployments.runner import RunnerDeployment
from prefect.exceptions import ObjectNotFound
from prefect.flows import Flow
from prefect.types.entrypoint import EntrypointType

from automations.apply import apply_automations
from automations.definitions import pipeline_automations
from flows.download import download
from flows.load import load
from flows.reconcile import reconcile
from flows.recover import recover
from flows.transform import transform
from taxi_pipeline.settings import Settings, get_settings

log = logging.getLogger("deploy")


def pool_type(settings: Settings) -> str:
    return "kubernetes" if settings.profile == "gcp" else "process"


async def ensure_work_pool(settings: Settings) -> None:
    async with get_client() as client:
        try:
            pool = await client.read_work_pool(settings.work_pool)
        except ObjectNotFound:
            await client.create_work_pool(
                WorkPoolCreate(name=settings.work_pool, type=pool_type(settings))
            )
            log.info("created %s work pool %r", pool_type(settings), settings.work_pool)
            return
        if pool.type != pool_type(settings):
            raise RuntimeError(
                f"work pool {settings.work_pool!r} is of type {pool.type!r}, but profile "
                f"{settings.profile!r} needs {pool_type(settings)!r}: set TAXI_WORK_POOL to "
                "another name or delete that pool."
            )


def register(flow: Flow[Any, Any], name: str, settings: Settings, cron: str | None = None,
             interval: timedelta | None = None) -> UUID:
    # to_deployment/apply dispatch to their async twins inside an event loop; here
    # (plain sync code) they return the values.
    deployment = cast(RunnerDeployment, flow.to_deployment(
        name=name,
        work_pool_name=settings.work_pool,
        entrypoint_type=EntrypointType.MODULE_PATH,
        description=(flow.description or "").strip().splitlines()[0] if flow.description else None,
        tags=["taxi-pipeline"],
        cron=cron,
        interval=interval,
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


def deploy(settings: Settings | None = None) -> dict[str, UUID]:
    """Register download (on its cron), transform, load, reconcile (on its interval) and
    recover; point the automations at them."""
    settings = settings or get_settings()
    asyncio.run(ensure_work_pool(settings))
    ids = {
        "download": register(download, "scheduled", settings, cron=settings.download_cron),
        "transform": register(transform, settings.transform_deployment, settings),
        "load": register(load, settings.load_deployment, settings),
        "reconcile": register(reconcile, "scheduled", settings,
                              interval=timedelta(minutes=settings.reconcile_every_minutes)),
        "recover": register(recover, "recover", settings),
    }
    automations = pipeline_automations(ids["transform"], ids["load"], ids["recover"],
                                       asyncio.run(alert_block_id(settings)))
    outcome = asyncio.run(apply_automations(automations))
    for name, what in outcome.items():
        log.info("automation %r %s", name, what)
    return ids


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s %(message)s")
    deploy()
