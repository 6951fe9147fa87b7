"""`python -m deploy --image ...` in the gcp profile, against a real Prefect server.

It creates the kubernetes work pool with the repo's base job template, the
deployments with their job variables and the load's concurrency limit, and a
second run changes none of it. The server runs on SQLite here (the pool logic
does not depend on the database); no cluster is needed to register deployments.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from support.k8s import JOB_TEMPLATE, REPO
from support.prefect_server import PrefectServer

import deploy

pytestmark = pytest.mark.e2e

IMAGE = "europe-west4-docker.pkg.dev/acme/taxi-pipeline/taxi-pipeline@sha256:" + "cd" * 32


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-server")
    running = PrefectServer(f"sqlite+aiosqlite:///{home / 'prefect.db'}", home).start()
    try:
        yield running
    finally:
        running.stop()


def run_deploy(server: PrefectServer, home: Path, *args: str) -> str:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("TAXI_", "PREFECT_"))}
    env.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(home / "prefect"),
                "TAXI_PROFILE": "gcp", "TAXI_HOME": str(home), "TAXI_GCP_PROJECT": "acme-data",
                "TAXI_BUCKET": "acme-landing"})
    result = subprocess.run([sys.executable, "-m", "deploy", *args], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout + result.stderr


async def snapshot() -> dict[str, Any]:
    """What deploy.py owns on the server, without timestamps."""
    async with get_client() as client:
        pool = await client.read_work_pool("taxi-kubernetes")
        deployments = await client.read_deployments()
        automations = await client.read_automations()
        limits = await client.read_global_concurrency_limits(limit=100)
    return {
        "pool": {"id": str(pool.id), "type": pool.type, "template": pool.base_job_template},
        "deployments": {
            f"{d.name}:{d.entrypoint}": {
                "id": str(d.id), "pool": d.work_pool_name, "job_variables": d.job_variables,
                "concurrency_limit": (d.global_concurrency_limit.limit
                                      if d.global_concurrency_limit else None),
                "collision": (d.concurrency_options.collision_strategy.value
                              if d.concurrency_options else None),
                "schedules": sorted((str(s.id), json.dumps(s.schedule.model_dump(mode="json"),
                                                           sort_keys=True)) for s in d.schedules),
            } for d in deployments},
        "automations": sorted((a.name, str(a.id)) for a in automations),
        "limits": sorted((c.name, c.limit) for c in limits),
    }


@pytest.fixture(scope="module")
def two_runs(server: PrefectServer, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[dict[str, Any], dict[str, Any], str, str]:
    home = tmp_path_factory.mktemp("deploy-home")
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        first_log = run_deploy(server, home, "--image", IMAGE)
        first = asyncio.run(snapshot())
        second_log = run_deploy(server, home, "--image", IMAGE)
        second = asyncio.run(snapshot())
    return first, second, first_log, second_log


def by_entrypoint(state: dict[str, Any], entrypoint: str) -> dict[str, Any]:
    (found,) = [d for key, d in state["deployments"].items() if key.endswith(":" + entrypoint)]
    return dict(found)


def test_the_kubernetes_pool_gets_the_repo_template(two_runs: tuple[Any, ...]) -> None:
    first, _, first_log, _ = two_runs
    assert first["pool"]["type"] == "kubernetes"
    assert first["pool"]["template"] == json.loads(JOB_TEMPLATE.read_text())
    assert "created kubernetes work pool 'taxi-kubernetes'" in first_log


def test_deployments_carry_the_image_and_their_resources(two_runs: tuple[Any, ...]) -> None:
    first = two_runs[0]
    transform = by_entrypoint(first, "flows.transform.transform")
    assert transform["pool"] == "taxi-kubernetes"
    assert transform["job_variables"] == {**deploy.KUBERNETES_JOB_VARIABLES["transform"],
                                          "image": IMAGE}
    load = by_entrypoint(first, "flows.load.load")
    assert load["job_variables"] == {**deploy.KUBERNETES_JOB_VARIABLES["load"], "image": IMAGE}
    download = by_entrypoint(first, "flows.download.download")
    assert download["job_variables"] == {"image": IMAGE}
    backfill = by_entrypoint(first, "flows.backfill.backfill")
    assert backfill["job_variables"] == {"image": IMAGE}
    assert backfill["schedules"] == []  # run on demand only
    for state in first["deployments"].values():
        assert state["job_variables"]["image"] == IMAGE


def test_loads_queue_one_at_a_time_and_a_late_reconcile_is_dropped(
        two_runs: tuple[Any, ...]) -> None:
    first = two_runs[0]
    load = by_entrypoint(first, "flows.load.load")
    assert load["concurrency_limit"] == 1
    assert load["collision"] == "ENQUEUE"  # extra loads wait for the slot, none is dropped
    reconcile = by_entrypoint(first, "flows.reconcile.reconcile")
    assert reconcile["concurrency_limit"] == 1
    assert reconcile["collision"] == "CANCEL_NEW"  # never two passes re-emitting the same
    others = [d for key, d in first["deployments"].items()
              if not key.endswith(("flows.load.load", "flows.reconcile.reconcile"))]
    assert others and all(d["concurrency_limit"] is None for d in others)


def test_a_second_run_changes_nothing(two_runs: tuple[Any, ...]) -> None:
    first, second, _, second_log = two_runs
    assert second == first
    assert "work pool 'taxi-kubernetes' unchanged" in second_log


def test_a_changed_template_is_applied_to_the_existing_pool(
        server: PrefectServer, two_runs: tuple[Any, ...]) -> None:
    """An older template on the server (say, the stock one) is replaced, not kept."""
    from prefect.client.schemas.actions import WorkPoolUpdate
    from prefect_kubernetes.worker import KubernetesWorker

    from taxi_pipeline.settings import Settings

    async def set_stock_template() -> None:
        async with get_client() as client:
            await client.update_work_pool("taxi-kubernetes", WorkPoolUpdate(
                base_job_template=KubernetesWorker.get_default_base_job_template()))

    async def template() -> dict[str, Any]:
        async with get_client() as client:
            return dict((await client.read_work_pool("taxi-kubernetes")).base_job_template)

    settings = Settings(profile="gcp", image=IMAGE)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        asyncio.run(set_stock_template())
        assert asyncio.run(deploy.ensure_work_pool(settings)) == "updated"
        assert asyncio.run(template()) == json.loads(JOB_TEMPLATE.read_text())
        assert asyncio.run(deploy.ensure_work_pool(settings)) == "unchanged"


def test_the_gcp_profile_needs_an_image(server: PrefectServer, tmp_path: Path) -> None:
    env = {name: value for name, value in os.environ.items()
           if not name.startswith(("TAXI_", "PREFECT_"))}
    env.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(tmp_path),
                "TAXI_PROFILE": "gcp", "TAXI_HOME": str(tmp_path)})
    result = subprocess.run([sys.executable, "-m", "deploy"], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode != 0
    assert "TAXI_IMAGE" in result.stderr
