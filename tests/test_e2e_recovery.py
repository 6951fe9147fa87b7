"""The pipeline heals itself on the local profile: no command is run after a file lands.

A real Prefect server (embedded PostgreSQL), worker, bridge, deployments and
automations, as `taxi-pipeline up` starts them; the scheduler and the
reconcile/recover deployments do the healing. Waits are bounded polls for a
positive signal (rows in the warehouse, an event stored).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterName,
    FlowFilter,
    FlowFilterName,
    FlowRunFilter,
    FlowRunFilterState,
    FlowRunFilterStateType,
)
from prefect.client.schemas.objects import StateType
from support.local_e2e import (
    drop,
    processes_of,
    read_events,
    running_stack,
    start_up,
    stop_up,
    wait_events,
    wait_loaded,
)

from automations.apply import apply_automations
from automations.definitions import ALERT_FAILED_RUN, RAW_LANDED, pipeline_automations
from taxi_pipeline import events
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.stack.local import LocalStack
from taxi_pipeline.storage.local import LocalStore

pytestmark = pytest.mark.e2e

SCHEDULER_LOOP_SECONDS = 5


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("recovery-home")
    settings = Settings(profile="local", home=home, bucket=str(home / "bucket"),
                        stall_seconds=5, reconcile_every_minutes=0.5,
                        reconcile_after_minutes=0.25,
                        # A failing write fails its run after two quick retries, not 42 s.
                        task_retry_delays=[1.0, 1.0])
    env = {"PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": str(SCHEDULER_LOOP_SECONDS)}
    with running_stack(settings, env) as running:
        yield running


def _runs(flow: str, deployment: str, states: list[StateType] | None = None) -> int:
    async def _count() -> int:
        async with get_client() as client:
            return await client.count_flow_runs(
                flow_filter=FlowFilter(name=FlowFilterName(any_=[flow])),
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=states))) if states else None,
            )

    return asyncio.run(_count())


def test_the_scheduler_creates_the_download_and_reconcile_runs(stack: LocalStack) -> None:
    """SQLAlchemy 2.1 broke this silently: no scheduled runs, an error every minute."""
    deadline = time.monotonic() + 6 * SCHEDULER_LOOP_SECONDS + 60
    while time.monotonic() < deadline:
        if _runs("download", "scheduled", [StateType.SCHEDULED]) and \
                _runs("reconcile", "scheduled"):
            break
        time.sleep(1)
    assert _runs("download", "scheduled", [StateType.SCHEDULED]) >= 1
    assert _runs("reconcile", "scheduled") >= 1
    server_log = stack.process("prefect-server").log_path.read_text(errors="replace")
    assert "InvalidRequestError" not in server_log
    assert "schedule_deployments" not in server_log or "Traceback" not in server_log


def test_reconcile_deployment_loads_a_file_the_bridge_never_saw(
        stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    bridge = stack.process("bridge")
    bridge.stop()
    stack.processes.remove(bridge)
    try:
        sample = generate_month("green", 2021, 3, 3_000, seed=21)
        name = raw_object_name(settings.raw_prefix, "green", 2021, 3)
        path = drop(write_month(sample, tmp_path / "g.parquet"), settings, name)
        generation = LocalStore(settings.bucket_dir).ref(name).generation
        # Nobody runs a command: the scheduled reconcile re-emits it.
        assert wait_loaded(settings, path.as_uri(), generation) == sample.expected_good
        finalized = read_events([events.OBJECT_FINALIZED], path.as_uri())
        assert finalized and all(e.resource.get(events.LABEL_REEMIT) == "true"
                                 for e in finalized)
    finally:
        stack.spawn("bridge", [sys.executable, "-m", "pubsub_bridge"])


async def _deployment_ids(names: list[tuple[str, str]]) -> list[Any]:
    async with get_client() as client:
        return [(await client.read_deployment_by_name(f"{flow}/{name}")).id
                for flow, name in names]


def test_a_failed_automation_action_ends_with_the_object_loaded(
        stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    transform_id, load_id, recover_id = asyncio.run(_deployment_ids(
        [("transform", "transform"), ("load", "load"), ("recover", "recover")]))
    healthy = pipeline_automations(transform_id, load_id, recover_id)
    broken = pipeline_automations(transform_id, load_id, recover_id)
    # A parameter the deployment's schema refuses: the server answers 409 and the
    # action fails, as it does when the server answers 503 under load.
    raw_landed = next(a for a in broken if a.name == RAW_LANDED)
    raw_landed.actions[0].parameters["generation"] = "not-a-generation"  # type: ignore[union-attr,index]
    asyncio.run(apply_automations(broken))
    try:
        sample = generate_month("yellow", 2022, 5, 3_000, seed=22)
        name = raw_object_name(settings.raw_prefix, "yellow", 2022, 5)
        path = drop(write_month(sample, tmp_path / "y.parquet"), settings, name)
        generation = LocalStore(settings.bucket_dir).ref(name).generation
        failed = _wait_action_failed(RAW_LANDED, path.as_uri())
        assert failed
    finally:
        asyncio.run(apply_automations(healthy))
    assert wait_loaded(settings, path.as_uri(), generation) == sample.expected_good
    attempts = wait_events([events.RECOVERY_ATTEMPTED], path.as_uri())
    assert "failed" in attempts[0].payload["cause"]


def _wait_action_failed(automation: str, uri: str, timeout: float = 120) -> list[Any]:
    """The `prefect.automation.action.failed` events of `automation` after `uri` landed."""
    from prefect.events.filters import (
        EventFilter,
        EventNameFilter,
        EventOccurredFilter,
        EventResourceFilter,
    )

    async def _read() -> list[Any]:
        async with get_client() as client:
            page = await client.read_events(filter=EventFilter(
                event=EventNameFilter(name=["prefect.automation.action.failed"]),
                resource=EventResourceFilter(labels={"prefect.resource.name": [automation]}),
                occurred=EventOccurredFilter()), limit=50)
            return list(page.events)

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        # Only count failures that happened after the object landed.
        if read_events([events.OBJECT_FINALIZED], uri):
            found = asyncio.run(_read())
            if found:
                return found
        time.sleep(0.5)
    raise AssertionError(f"no failed action of {automation!r} within {timeout:.0f}s")


def test_a_failed_transform_run_is_re_run_and_the_object_loaded(
        stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    settings = stack.settings
    name = raw_object_name(settings.raw_prefix, "yellow", 2019, 8)
    # A file where the output directory must go: every write of the transform fails
    # (after its task retries), so the run ends Failed.
    blocker = settings.bucket_dir / settings.processed_prefix / "yellow" / "2019"
    blocker.parent.mkdir(parents=True, exist_ok=True)
    blocker.write_text("in the way")
    sample = generate_month("yellow", 2019, 8, 3_000, seed=23)
    path = drop(write_month(sample, tmp_path / "y.parquet"), settings, name)
    generation = LocalStore(settings.bucket_dir).ref(name).generation
    failed = wait_events([events.TRANSFORM_FAILED], path.as_uri(), timeout=240)
    assert "Error" in failed[0].payload["error"]
    # While the cause is there, the board says failed (and why); polled, as a re-run
    # started by the recovery shows the object on its way until it fails again.
    deadline = time.monotonic() + 60
    while True:
        code, out = _status(settings, monkeypatch, capsys, name.rsplit("/", 1)[0] + "/",
                            "--json")
        assert code == 0
        row = {o["object"]: o for o in json.loads(out)["objects"]}[name]
        if row["stage"] == "failed" or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert row["stage"] == "failed" and "transform failed" in row["reason"], row
    blocker.unlink()  # the cause goes away; no command is run
    assert wait_loaded(settings, path.as_uri(), generation) == sample.expected_good
    attempts = wait_events([events.RECOVERY_ATTEMPTED], path.as_uri())
    assert attempts[0].payload["attempt"] == 1
    assert "Failed" in attempts[0].payload["cause"]

    # The alert for failed runs fired for that run's Failed event.
    run = next(r.id for r in failed[0].related if r.get("prefect.resource.role") == "flow-run")
    (run_failed,) = wait_events(["prefect.flow-run.Failed"], run, timeout=60)
    alert = f"prefect.automation.{_automation_id(ALERT_FAILED_RUN)}"
    deadline = time.monotonic() + 60
    fired: list[Any] = []
    while not fired and time.monotonic() < deadline:
        fired = [e for e in read_events(["prefect.automation.triggered"], alert)
                 if any(r.id == f"prefect.event.{run_failed.id}" for r in e.related)]
        time.sleep(0.5)
    assert fired, f"{ALERT_FAILED_RUN!r} did not fire for {run_failed.id}"

    # Its story shows the failed attempt and the recovery; it ends loaded (the load's
    # event is stored just after its commit: waited for).
    wait_events([events.LOAD_COMPLETED], path.as_uri().replace(
        f"/{settings.raw_prefix}", f"/{settings.processed_prefix}"))
    code, out = _status(settings, monkeypatch, capsys, name)
    assert code == 0
    assert out.startswith(f"{name}: loaded, {sample.expected_good:,} rows"), out
    for step in (events.TRANSFORM_FAILED, events.RECOVERY_ATTEMPTED, events.LOAD_COMPLETED):
        assert step in out, out


def _automation_id(name: str) -> Any:
    async def read() -> Any:
        async with get_client() as client:
            (found,) = await client.read_automations_by_name(name)
            return found.id

    return asyncio.run(read())


def _status(settings: Settings, monkeypatch: pytest.MonkeyPatch,
            capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """`taxi-pipeline status ARGS` in this process, against the module's stack."""
    from taxi_pipeline.cli import main
    from taxi_pipeline.settings import get_settings

    for key, value in {"TAXI_HOME": str(settings.home), "TAXI_BUCKET": settings.bucket}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    capsys.readouterr()
    code = main(["status", *args])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, out


def test_ctrl_c_on_up_during_a_flow_run_leaves_nothing_behind(tmp_path: Path) -> None:
    home = tmp_path / "up-home"
    up = start_up(home)

    def flow_runs() -> list[int]:
        found = []
        for pid in processes_of(home):
            with contextlib.suppress(OSError):
                if b"PREFECT__FLOW_RUN_ID" in Path(f"/proc/{pid}/environ").read_bytes():
                    found.append(pid)
        return found

    sample = generate_month("yellow", 2024, 3, 200_000, seed=24)
    target = home / "bucket" / raw_object_name("raw/", "yellow", 2024, 3)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(write_month(sample, tmp_path / "m.parquet"), target)
    deadline = time.monotonic() + 120
    while not flow_runs() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert flow_runs(), "no flow run started within 120 s"
    # Ctrl-C in a terminal signals the whole foreground process group.
    stop_up(up, home, signal.SIGINT)


def test_recovery_gives_up_after_its_attempts_and_says_so(
        stack: LocalStack, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A poison object cannot loop: after the budget, `pipeline.recovery.exhausted`."""
    from prefect.events import Event, RelatedResource, Resource

    from flows.recover import recover
    from taxi_pipeline.event_delivery import EventDelivery
    from taxi_pipeline.settings import get_settings

    settings = stack.settings
    for key, value in {"TAXI_HOME": str(settings.home), "TAXI_BUCKET": settings.bucket}.items():
        monkeypatch.setenv(key, value)
    get_settings.cache_clear()
    # A processed-stage name (reconcile lists raw/ only) landed while the bridge is
    # away: nothing but this test acts on it.
    name = raw_object_name(settings.processed_prefix, "green", 2018, 2)
    bridge = stack.process("bridge")
    bridge.stop()
    stack.processes.remove(bridge)
    try:
        target = settings.bucket_dir / name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(b"not parquet at all")
        obj = LocalStore(settings.bucket_dir).ref(name)
        resource = Resource(events.object_resource(obj, settings.stage_prefixes))
        landed = events.object_finalized(obj, settings.stage_prefixes, reemit=True)
        spent = [Event(event=events.RECOVERY_ATTEMPTED, resource=resource,
                       payload={"attempt": n, "cause": "test"})
                 for n in range(1, settings.recovery_max_attempts + 1)]
        failed = Event(
            event="prefect.automation.action.failed",
            resource=Resource({"prefect.resource.id": "prefect.automation.test",
                               "prefect.resource.name": RAW_LANDED}),
            related=[RelatedResource({"prefect.resource.id": f"prefect.event.{landed.id}",
                                      "prefect.resource.role": "triggering-event"})],
            payload={"reason": "Unexpected status from 'run-deployment' action: 503"})

        async def _emit() -> set[Any]:
            async with EventDelivery() as delivery:
                return await delivery.deliver([landed, *spent, failed], timeout=60)

        assert len(asyncio.run(_emit())) == len(spent) + 2
        state = asyncio.run(recover(event_id=str(failed.id), event_name=failed.event,
                                    subject="prefect.automation.test", return_state=True))
        assert state.is_failed()
        assert "reemit" in (state.message or "")
        exhausted = wait_events([events.RECOVERY_EXHAUSTED], obj.uri)
        assert "503" in exhausted[0].payload["cause"]
        target.unlink()
    finally:
        stack.spawn("bridge", [sys.executable, "-m", "pubsub_bridge"])
