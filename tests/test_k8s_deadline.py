"""A flow run that outlives its Job's activeDeadlineSeconds ends Crashed, once.

At the deadline Kubernetes sends the pod SIGTERM (SIGKILL after the grace
period) and fails the Job; with `backoffLimit: 0` no new pod follows. What
happens to the Prefect run is decided by `PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR`
in the pod: prefect-kubernetes sets `reschedule` when the template does not,
and `prefect flow-run execute` then proposes AwaitingRetry on SIGTERM, with no
cap, so a load that always takes longer than the deadline (or hangs holding
the limit-1 slot) would loop forever. The template sets `crash`.

No cluster runs here: the Job is rendered the way the worker renders it, and its
pod's process (`prefect flow-run execute`, the same command the process worker
runs) is started with the Job's environment against a real Prefect server and
sent SIGTERM when the deadline passes, as the kubelet would. With `crash` the
process proposes nothing and dies; the Job then counts one failed pod, more
than its backoffLimit of 0, and prefect-kubernetes' observer (in the worker)
marks the run Crashed: its real handler runs here on that Job status. With
`reschedule` the run is AwaitingRetry by then, which the observer leaves alone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest.mock import patch
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.objects import StateType
from prefect.settings import PREFECT_API_URL, temporary_settings
from support.k8s import render_flow_run_job
from support.prefect_server import PrefectServer

import deploy

pytestmark = pytest.mark.e2e

IMAGE = "europe-west4-docker.pkg.dev/acme/taxi-pipeline/taxi-pipeline@sha256:" + "ef" * 32
DEADLINE_SECONDS = 4
GRACE_SECONDS = 30  # the pod's terminationGracePeriodSeconds (Kubernetes' default)

SLOW_FLOW = '''
import time
from prefect import flow

@flow(name="slow-load")
def slow_load() -> None:
    time.sleep(600)  # always longer than the deadline
'''


def sigterm_env(job: dict[str, Any]) -> dict[str, str]:
    env = {e["name"]: e for e in job["spec"]["template"]["spec"]["containers"][0]["env"]}
    return {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR":
            env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"]}


def test_the_rendered_job_has_the_deadline_no_retry_and_crashes_on_sigterm() -> None:
    job = render_flow_run_job("load", {**deploy.KUBERNETES_JOB_VARIABLES["load"],
                                       "image": IMAGE,
                                       "active_deadline_seconds": DEADLINE_SECONDS})
    assert job["spec"]["activeDeadlineSeconds"] == DEADLINE_SECONDS
    assert job["spec"]["backoffLimit"] == 0
    assert sigterm_env(job) == {"PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR": "crash"}
    # The template's default deadline applies to every deployment deploy.py registers,
    # and none of them replaces the env default that carries `crash`.
    default = render_flow_run_job("transform", {**deploy.KUBERNETES_JOB_VARIABLES["transform"],
                                                "image": IMAGE})
    assert default["spec"]["activeDeadlineSeconds"] == 7200
    assert sigterm_env(default)["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "crash"
    assert not any("env" in v for v in deploy.KUBERNETES_JOB_VARIABLES.values())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    home = tmp_path_factory.mktemp("prefect-server")
    running = PrefectServer(f"sqlite+aiosqlite:///{home / 'prefect.db'}", home).start()
    try:
        yield running
    finally:
        running.stop()


async def _create_run(flow_dir: Path) -> UUID:
    async with get_client() as client:
        flow_id = await client.create_flow_from_name("slow-load")
        deployment_id = await client.create_deployment(
            flow_id=flow_id, name="deadline", entrypoint="slow_flow.py:slow_load",
            path=str(flow_dir))
        run = await client.create_flow_run_from_deployment(deployment_id)
        return run.id


async def _observer_sees_failed_job(job: dict[str, Any], run_id: UUID) -> None:
    from prefect_kubernetes import observer

    labels = {**job["metadata"]["labels"], "prefect.io/flow-run-id": str(run_id)}
    status = {"failed": 1, "conditions": [{"type": "Failed", "status": "True",
                                           "reason": "DeadlineExceeded"}]}

    async def no_other_jobs(*_: Any, **__: Any) -> list[Any]:
        return []

    with patch.object(observer, "_get_k8s_jobs", no_other_jobs):
        async with get_client() as client:
            observer.orchestration_client = client
            try:
                await observer._mark_flow_run_as_crashed(
                    event={"type": "MODIFIED", "object": {}}, name="slow-load-abcde",
                    labels=labels, status=status, logger=logging.getLogger("observer"),
                    spec=job["spec"], namespace=job["metadata"]["namespace"],
                    uid="0000-job")
            finally:
                observer.orchestration_client = None


async def _states(run_id: UUID) -> tuple[StateType | None, list[str]]:
    async with get_client() as client:
        run = await client.read_flow_run(run_id)
        history = await client.read_flow_run_states(run_id)
    return (run.state.type if run.state else None), [s.name for s in history]


def _wait_for(run_id: UUID, wanted: set[StateType], timeout: float) -> StateType | None:
    deadline = time.monotonic() + timeout
    state = None
    while time.monotonic() < deadline:
        state, _ = asyncio.run(_states(run_id))
        if state in wanted:
            return state
        time.sleep(0.5)
    return state


def test_a_run_past_its_deadline_ends_crashed_once(server: PrefectServer, tmp_path: Path) -> None:
    job = render_flow_run_job("load", {**deploy.KUBERNETES_JOB_VARIABLES["load"],
                                       "image": IMAGE,
                                       "active_deadline_seconds": DEADLINE_SECONDS})
    (tmp_path / "slow_flow.py").write_text(SLOW_FLOW)
    with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
        run_id = asyncio.run(_create_run(tmp_path))
        env = {k: v for k, v in os.environ.items()
               if not k.startswith(("PREFECT_", "TAXI_"))}
        env.update({"PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(tmp_path / "home"),
                    **sigterm_env(job)})
        log = (tmp_path / "run.log").open("wb")
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "flow-run", "execute", str(run_id)],
            cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            started = time.monotonic()
            assert _wait_for(run_id, {StateType.RUNNING}, 120) == StateType.RUNNING, \
                (tmp_path / "run.log").read_text()[-3000:]
            # The pod's clock starts before the run is Running; the kubelet sends SIGTERM
            # at the deadline whatever the run is doing.
            time.sleep(max(0.0, DEADLINE_SECONDS - (time.monotonic() - started)))
            # The kubelet: SIGTERM to the container's PID 1, SIGKILL after the grace
            # period; when PID 1 is gone, every other process of the container dies too.
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(GRACE_SECONDS)
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
            log.close()
        # The Job controller then fails the Job (DeadlineExceeded, one failed pod, no
        # retry), and the worker's observer sees it: the real handler, with the Job as
        # Kubernetes reports it and no other Job for the run.
        asyncio.run(_observer_sees_failed_job(job, run_id))
        output = (tmp_path / "run.log").read_text()[-3000:]
        final = _wait_for(run_id, {StateType.CRASHED, StateType.FAILED, StateType.SCHEDULED},
                          30)
        assert final == StateType.CRASHED, output
        # ...and it stays so: nothing puts it back on the queue (a rescheduled run goes
        # AwaitingRetry -> Scheduled, and its next pod would meet the same deadline).
        time.sleep(3)
        state, history = asyncio.run(_states(run_id))
        assert state == StateType.CRASHED, (history, output)
        assert "AwaitingRetry" not in history, history
