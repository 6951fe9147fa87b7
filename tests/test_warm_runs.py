"""The fork server for flow runs (`taxi_pipeline.stack.warm_runs`) and its launcher.

Fast tests run the launcher against a fork server without a Prefect server (the
engine exits early on a bad flow run id, which is enough to see the plumbing).
The e2e tests run real flow runs: a Prefect server (SQLite), a process work pool
whose command is the launcher, a real `prefect worker`, and a flow deployed from
`tests/warm_flows_for_tests.py`; they compare exit codes and states with a cold
`python -m prefect.engine` run of the same flow, and check cancellation, the
fallback and that nothing is left running.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
import pytest
from prefect.client.orchestration import get_client
from prefect.states import Cancelling
from warm_flows_for_tests import probe
from warm_runs_stack import RUN_LOGGING_LEVEL, TESTS_DIR, UNREACHABLE_API, WarmStack

from taxi_pipeline.stack.warm_runs import launcher_command, server_argv
from taxi_pipeline.stack.warm_runs_launch import decode_request, encode_request

pytestmark = pytest.mark.timeout(900)

ENTRYPOINT = "warm_flows_for_tests.probe"


def wait_for(predicate: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- without a Prefect server ------------------------------------------------------


def test_request_round_trip() -> None:
    env = {b"A": b"1", b"B": b"x=y", b"EMPTY": b"", b"BYTES": b"\xff\xfe"}
    assert decode_request(encode_request(b"/tmp/d", [b"--x", b""], env)) == (
        b"/tmp/d", [b"--x", b""], env)


FINGERPRINT_PROBE = """
import json, os, sys
from pathlib import Path
from prefect.settings import get_current_settings
from taxi_pipeline.stack.warm_runs import current_settings_fingerprint, settings_fingerprint

server, profiles = current_settings_fingerprint()
# What a process worker with this environment hands its run (EngineCommandStarter).
run_env = {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True),
           "PREFECT__FLOW_RUN_ID": "00000000-0000-0000-0000-000000000000",
           "PREFECT__CONTROL_PORT": "1", "PREFECT__CONTROL_TOKEN": "t"}
run_dir = Path(sys.argv[1])
same = settings_fingerprint(str(run_dir), run_env, profiles) == server
other_api = settings_fingerprint(
    str(run_dir), {**run_env, "PREFECT_API_URL": "http://elsewhere/api"}, profiles) == server
(run_dir / ".env").write_text("PREFECT_LOGGING_LEVEL=DEBUG\\n")
dotenv = settings_fingerprint(str(run_dir), run_env, profiles) == server
print(json.dumps([same, other_api, dotenv]))
"""


def test_runs_keep_the_servers_settings_only_when_their_inputs_match(tmp_path: Path) -> None:
    """A run started by a worker with the fork server's environment may keep its settings
    (the fast path); another API URL, or a `.env` in the run's directory, may not."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "ph"), "PREFECT_API_URL":
           "http://127.0.0.1:9/api", "PREFECT_UI_ENABLED": "false",
           "PREFECT_WORKER_QUERY_SECONDS": "1"}
    result = subprocess.run([sys.executable, "-c", FINGERPRINT_PROBE, str(run_dir)], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [True, False, False]


def test_launcher_imports_only_a_few_stdlib_modules() -> None:
    """The launcher runs once per flow run: no Prefect, no pydantic, not even `socket`."""
    argv = shlex.split(launcher_command(Path("/nonexistent.sock")))
    # Without arguments after the script it prints its usage and exits 2: start-up only.
    result = subprocess.run([argv[0], "-X", "importtime", *argv[1:4]], capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    imported = set(re.findall(r"\|\s+([\w.]+)\s*$", result.stderr, re.MULTILINE))
    assert not {"prefect", "pydantic", "socket", "enum", "site"} & imported
    assert {"_socket", "_signal"} <= imported

    start = psutil.Process().cpu_times()
    for _ in range(5):
        subprocess.run(argv[:4], capture_output=True, timeout=30)
    end = psutil.Process().cpu_times()
    cpu = (end.children_user + end.children_system - start.children_user
           - start.children_system) / 5
    assert cpu < 0.1, f"launcher start-up used {cpu * 1000:.0f} ms of CPU"


def test_preloading_builds_prefects_deferred_models_without_threads() -> None:
    """A child must not rebuild FlowRun & co. on first use: the server builds them once."""
    script = """
import json, threading
import prefect.engine, flows.transform, flows.load
from prefect.client.schemas.objects import FlowRun
from prefect.client.schemas.responses import DeploymentResponse
from taxi_pipeline.stack.warm_runs import complete_pydantic_models
before = [FlowRun.__pydantic_complete__, DeploymentResponse.__pydantic_complete__]
built = complete_pydantic_models()
print(json.dumps([before, [FlowRun.__pydantic_complete__,
                  DeploymentResponse.__pydantic_complete__], built, threading.active_count()]))
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    before, after, built, threads = json.loads(result.stdout)
    assert before == [False, False], "Prefect builds these eagerly now: the step can go"
    assert after == [True, True]
    assert built > 0
    assert threads == 1


@pytest.fixture
def bare_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A fork server with two children at most and no Prefect server anywhere."""
    root = tmp_path_factory.mktemp("bare")
    socket_path, log_path = root / "s.sock", root / "server.log"
    env = {**os.environ, "PREFECT_API_URL": UNREACHABLE_API, "PREFECT_HOME": str(root / "ph")}
    with log_path.open("wb") as log:
        server = subprocess.Popen(server_argv(socket_path, max_children=2), env=env,
                                  stdout=log, stderr=subprocess.STDOUT,
                                  stdin=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for(lambda: socket_path.exists() or server.poll() is not None, 60, "fork server")
        assert server.poll() is None, log_path.read_text()
        yield socket_path, log_path
    finally:
        server.terminate()
        server.wait(timeout=30)
    assert "stopped after" in log_path.read_text()
    assert not socket_path.exists()


def run_launcher(socket_path: Path, env: dict[str, str], cwd: Path) -> subprocess.Popen[str]:
    return subprocess.Popen(shlex.split(launcher_command(socket_path)), env=env, cwd=cwd,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def test_launcher_runs_the_engine_in_a_forked_child(bare_server: tuple[Path, Path],
                                                    tmp_path: Path) -> None:
    """Five at once with room for two: the engine's own error reaches each launcher's stderr."""
    socket_path, log_path = bare_server
    env = {**os.environ, "PREFECT_API_URL": UNREACHABLE_API,
           "PREFECT__FLOW_RUN_ID": "not-a-flow-run-id"}
    launchers = [run_launcher(socket_path, env, tmp_path) for _ in range(5)]
    for launcher in launchers:
        _, err = launcher.communicate(timeout=60)
        assert launcher.returncode == 1, err
        assert "Invalid flow run id" in err
        assert "warm-runs:" not in err  # no cold fallback
    log = log_path.read_text()
    assert log.count("runs flow run not-a-flow-run-id") >= 5
    assert log.count("exited with 1") >= 5


def test_signals_reach_running_and_queued_runs(bare_server: tuple[Path, Path],
                                               tmp_path: Path) -> None:
    """Two runs hang on an API that never answers (the server allows two); a third waits.

    SIGTERM to the waiting launcher ends it as if killed by SIGTERM, without a run;
    SIGTERM to a running one is forwarded (the engine is not yet in its flow, so it
    dies of it, as a cold engine would); SIGKILL of a launcher kills its run.
    """
    socket_path, log_path = bare_server
    with socket.socket() as silent_api:
        silent_api.bind(("127.0.0.1", 0))
        silent_api.listen(16)  # accepts connections (backlog), never answers
        env = {**os.environ,
               "PREFECT_API_URL": f"http://127.0.0.1:{silent_api.getsockname()[1]}/api",
               "PREFECT__FLOW_RUN_ID": "00000000-0000-4000-8000-000000000000"}
        running = [run_launcher(socket_path, env, tmp_path) for _ in range(2)]
        wait_for(lambda: log_path.read_text().count("runs flow run 00000000") == 2, 60,
                 "two forked runs")
        children = [int(pid) for pid in re.findall(r"pid (\d+) runs flow run 00000000",
                                                   log_path.read_text())]
        queued = run_launcher(socket_path, env, tmp_path)
        time.sleep(1)
        assert queued.poll() is None
        queued.send_signal(signal.SIGTERM)
        assert queued.wait(timeout=10) == -signal.SIGTERM
        assert log_path.read_text().count("runs flow run 00000000") == 2  # never started

        running[0].send_signal(signal.SIGTERM)
        assert running[0].wait(timeout=30) == -signal.SIGTERM
        running[1].kill()
        running[1].wait(timeout=10)
        wait_for(lambda: all(gone(pid) for pid in children), 15, "both runs to end")
        for launcher in running:
            launcher.communicate(timeout=5)


def test_launcher_without_server_falls_back_to_a_cold_engine(tmp_path: Path) -> None:
    env = {**os.environ, "PREFECT_API_URL": UNREACHABLE_API,
           "PREFECT__FLOW_RUN_ID": "not-a-flow-run-id"}
    launcher = run_launcher(tmp_path / "missing.sock", env, tmp_path)
    _, err = launcher.communicate(timeout=120)
    assert launcher.returncode == 1
    assert len([line for line in err.splitlines() if line.startswith("warm-runs:")]) == 1
    assert "unreachable" in err and "starting a cold" in err
    assert "Invalid flow run id" in err


def test_preload_that_starts_a_thread_is_refused(tmp_path: Path) -> None:
    (tmp_path / "threaded_module.py").write_text(
        "import threading, time\nthreading.Thread(target=time.sleep, args=(30,), daemon=True)"
        ".start()\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PREFECT_HOME": str(tmp_path / "ph")}
    result = subprocess.run(server_argv(tmp_path / "s.sock", ["threaded_module"]), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "started threads" in result.stderr
    assert not (tmp_path / "s.sock").exists()


# -- real flow runs ------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[WarmStack]:
    running = WarmStack(tmp_path_factory.mktemp("warm-stack"))
    try:
        yield running.start()
    finally:
        running.stop()


def record(stack: WarmStack, flow_run_id: UUID, timeout: float = 120) -> dict[str, Any]:
    path = stack.out_dir / f"{flow_run_id}.json"
    wait_for(path.exists, timeout, f"the record of flow run {flow_run_id}")
    return dict(json.loads(path.read_text()))


def adhoc_run(stack: WarmStack, **parameters: Any) -> UUID:
    """A flow run without deployment (no worker picks it up): the test starts its process."""
    with stack.client(), get_client(sync_client=True) as client:
        return client.create_flow_run(
            probe, parameters={"out_dir": str(stack.out_dir), **parameters}).id


def start_run_process(stack: WarmStack, flow_run_id: UUID, cold: bool,
                      tmp_path: Path) -> subprocess.Popen[bytes]:
    """What the worker does: the launcher (warm) or `python -m prefect.engine` (cold)."""
    argv = ([sys.executable, "-m", "prefect.engine"] if cold
            else shlex.split(launcher_command(stack.socket_path)))
    env = stack.run_env(PREFECT__FLOW_RUN_ID=str(flow_run_id),
                        PREFECT__FLOW_ENTRYPOINT=ENTRYPOINT)
    with (tmp_path / f"{flow_run_id}.log").open("wb") as log:
        return subprocess.Popen(argv, env=env, cwd=tmp_path, stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT)


def state_of(stack: WarmStack, flow_run_id: UUID) -> str:
    (run,) = stack.read_runs([flow_run_id])
    assert run.state is not None
    return run.state.type.value


@pytest.mark.e2e
def test_runs_execute_in_fork_server_children_with_the_runs_settings(stack: WarmStack) -> None:
    ids = stack.create_runs("warm", 6)
    runs = stack.wait_final(ids)
    assert {r.state.type.value for r in runs if r.state} == {"COMPLETED"}
    assert stack.fork_server is not None
    records = [record(stack, flow_run_id) for flow_run_id in ids]
    for seen in records:
        assert seen["ppid"] == stack.fork_server.pid  # forked by the server, not cold
        assert seen["pgid"] == seen["pid"]  # its own process group
        # The server was started with an unreachable API and another logging level:
        # the child runs with the worker's environment instead.
        assert seen["api_url"] == stack.api_url
        assert seen["logging_level"] == RUN_LOGGING_LEVEL
        assert seen["prefect_logger_level"] == RUN_LOGGING_LEVEL
        assert seen["marker"] == "worker"
        assert (seen["arrow_last"], seen["duckdb_count"]) == (99_999, 100_000)  # after fork
        assert seen["cwd"] != str(TESTS_DIR) and seen["cwd"].endswith("prefect")  # worker's tmp
    assert len({seen["pid"] for seen in records}) == len(records)
    assert stack.log("fork-server").count("with its own Prefect settings") >= len(records)
    # Completed is reported before the process finishes its shutdown: give it a moment.
    wait_for(lambda: all(gone(seen["pid"]) for seen in records), 30, "the runs' processes")


@pytest.mark.e2e
@pytest.mark.parametrize("how", ["fail", "exit3", "sigterm"])
def test_exit_code_and_state_match_a_cold_engine(stack: WarmStack, tmp_path: Path,
                                                 how: str) -> None:
    """A failing flow, a process that dies with code 3, and a SIGTERM to the run's
    process (what the worker sends) end exactly as they do with a cold engine.

    (Prefect 3.8.8's engine exits 0 after a flow that failed normally: the attempt
    concluded. The exit code that matters is whatever the cold engine gives.)
    """
    parameters = {"fail": {"fail": True}, "exit3": {"exit_code": 3},
                  "sigterm": {"sleep": 120}}[how]
    outcomes = {}
    for cold in (False, True):
        flow_run_id = adhoc_run(stack, **parameters)
        process = start_run_process(stack, flow_run_id, cold, tmp_path)
        seen = record(stack, flow_run_id)
        if how == "sigterm":
            wait_for(lambda i=flow_run_id: state_of(stack, i) == "RUNNING", 60, "Running")
            process.send_signal(signal.SIGTERM)
        returncode = process.wait(timeout=120)
        wait_for(lambda p=seen["pid"]: gone(p), 10, "the run's process to end")
        outcomes[cold] = (returncode, state_of(stack, flow_run_id))
        if not cold:
            assert seen["ppid"] == stack.fork_server.pid  # type: ignore[union-attr]
    assert outcomes[False] == outcomes[True]
    returncode, state = outcomes[False]
    if how == "fail":
        assert state == "FAILED"
    elif how == "exit3":
        assert returncode == 3
    else:
        assert returncode != 0 and state == "CRASHED"


@pytest.mark.e2e
def test_killed_launcher_takes_its_run_with_it(stack: WarmStack, tmp_path: Path) -> None:
    flow_run_id = adhoc_run(stack, sleep=120)
    launcher = start_run_process(stack, flow_run_id, False, tmp_path)
    child = record(stack, flow_run_id)["pid"]
    launcher.kill()
    launcher.wait(timeout=10)
    wait_for(lambda: gone(child), 15, "the orphaned run to be killed")


@pytest.mark.e2e
def test_cancelling_a_run_stops_its_child(stack: WarmStack) -> None:
    (flow_run_id,) = stack.create_runs("warm", 1, sleep=300)
    child = record(stack, flow_run_id)["pid"]
    wait_for(lambda: state_of(stack, flow_run_id) == "RUNNING", 60, "Running")
    with stack.client(), get_client(sync_client=True) as client:
        client.set_flow_run_state(flow_run_id, Cancelling(), force=True)
    (run,) = stack.wait_final([flow_run_id], timeout=120)
    assert run.state is not None and run.state.type.value == "CANCELLED"
    wait_for(lambda: gone(child), 15, "the cancelled run's process to end")


@pytest.mark.e2e
def test_unreachable_server_falls_back_to_a_cold_run(stack: WarmStack) -> None:
    (flow_run_id,) = stack.create_runs("no-socket", 1)
    (run,) = stack.wait_final([flow_run_id])
    assert run.state is not None and run.state.type.value == "COMPLETED"
    assert record(stack, flow_run_id)["ppid"] != stack.fork_server.pid  # type: ignore[union-attr]
    assert "nobody-serves-this.sock unreachable" in stack.log("worker")


@pytest.mark.e2e
def test_nothing_is_left_running(stack: WarmStack) -> None:
    pids = [json.loads(path.read_text())["pid"] for path in stack.out_dir.glob("*.json")]
    stack.stop()
    assert "stopped after" in stack.log("fork-server")
    assert not stack.leftovers()
    assert all(gone(pid) for pid in pids)
    assert not [p for p in psutil.Process().children(recursive=True)
                if p.status() != psutil.STATUS_ZOMBIE]
