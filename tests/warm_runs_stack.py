"""A Prefect server, a fork server and a process worker, for the warm-run tests and benchmark.

One work pool whose default command is the fork server's launcher, and three
deployments of `warm_flows_for_tests.probe` on it:

- `warm`: the pool's default command (launcher -> fork server),
- `cold`: job variable `command` = `python -m prefect.engine` (what a worker does without us),
- `no-socket`: the launcher pointed at a socket nobody serves (its cold fallback).

The fork server gets a deliberately wrong `PREFECT_API_URL` and another logging
level than the worker: a run that completes and reports the worker's values
proves the child adopted the run's environment instead of the server's.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

import psutil
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import FlowRun
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect.types.entrypoint import EntrypointType
from support.emulators import stop_group
from support.prefect_server import PrefectServer

from taxi_pipeline.stack.warm_runs import launcher_command, process_pool_template, server_argv

TESTS_DIR = Path(__file__).resolve().parent
UNREACHABLE_API = "http://127.0.0.1:9/api"
SERVER_LOGGING_LEVEL = "WARNING"
RUN_LOGGING_LEVEL = "INFO"
FINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}


def _pythonpath() -> str:
    return os.pathsep.join(filter(None, [str(TESTS_DIR), os.environ.get("PYTHONPATH")]))


@dataclass
class WarmStack:
    root: Path
    pool: str = "warm-runs-test"
    max_children: int = 0
    # False: the fork server gets another API URL and logging level than the worker, so
    # children must rebuild Prefect's settings. True: the worker's environment, as in
    # the local stack, so children keep the server's (the fast path).
    server_env_like_worker: bool = False
    server: PrefectServer | None = None
    fork_server: subprocess.Popen[bytes] | None = None
    worker: subprocess.Popen[bytes] | None = None
    deployments: dict[str, UUID] = field(default_factory=dict)

    @property
    def socket_path(self) -> Path:
        return self.root / "warm.sock"

    @property
    def out_dir(self) -> Path:
        return self.root / "records"

    @property
    def api_url(self) -> str:
        assert self.server is not None
        return self.server.api_url

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.root / f"{name}.log").open("ab") as log:
            return subprocess.Popen(argv, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True)

    def run_env(self, **extra: str) -> dict[str, str]:
        """What a flow-run process gets from the worker (minus the worker's own additions)."""
        assert self.server is not None
        env = {**self.server.env(), "PYTHONPATH": _pythonpath(), "PYTHONUNBUFFERED": "1",
               "PREFECT_LOGGING_LEVEL": RUN_LOGGING_LEVEL, "WARM_RUNS_MARKER": "worker"}
        env.pop("PREFECT_API_DATABASE_CONNECTION_URL")
        return {**env, **extra}

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def start(self) -> WarmStack:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        prefect_home = self.root / "prefect"
        self.server = PrefectServer(f"sqlite+aiosqlite:///{prefect_home / 'prefect.db'}",
                                    prefect_home).start()
        if self.server_env_like_worker:
            self.start_fork_server(self.run_env(PREFECT_WORKER_QUERY_SECONDS="1"))
        else:
            self.start_fork_server(self.run_env(PREFECT_API_URL=UNREACHABLE_API,
                                                PREFECT_LOGGING_LEVEL=SERVER_LOGGING_LEVEL,
                                                WARM_RUNS_MARKER="fork-server"))
        with temporary_settings(updates={PREFECT_API_URL: self.api_url}):
            self._register()
        self.worker = self._spawn(
            "worker",
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", self.pool,
             "--type", "process"],
            self.run_env(PREFECT_WORKER_QUERY_SECONDS="1"),
        )
        return self

    def start_fork_server(self, env: dict[str, str]) -> None:
        self.fork_server = self._spawn(
            "fork-server",
            server_argv(self.socket_path, ["warm_flows_for_tests"], self.max_children), env)
        deadline = time.monotonic() + 60
        while not self.socket_path.exists():
            if self.fork_server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"fork server did not start:\n{self.log('fork-server')}")
            time.sleep(0.1)

    def _register(self) -> None:
        from warm_flows_for_tests import probe

        with get_client(sync_client=True) as client:
            client.create_work_pool(WorkPoolCreate(
                name=self.pool, type="process",
                base_job_template=process_pool_template(self.socket_path)))
        commands = {
            "warm": None,
            "cold": shlex.join([sys.executable, "-m", "prefect.engine"]),
            "no-socket": launcher_command(self.root / "nobody-serves-this.sock"),
        }
        for name, command in commands.items():
            deployment = probe.to_deployment(
                name=name, work_pool_name=self.pool, entrypoint_type=EntrypointType.MODULE_PATH,
                job_variables={"command": command} if command else None,
            )
            self.deployments[name] = deployment.apply(work_pool_name=self.pool)  # type: ignore[assignment]

    def client(self) -> Any:
        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def create_runs(self, deployment: str, count: int = 1, **parameters: Any) -> list[UUID]:
        with self.client(), get_client(sync_client=True) as client:
            return [
                client.create_flow_run_from_deployment(
                    self.deployments[deployment],
                    parameters={"out_dir": str(self.out_dir), **parameters},
                ).id
                for _ in range(count)
            ]

    def read_runs(self, ids: list[UUID]) -> list[FlowRun]:
        with self.client(), get_client(sync_client=True) as client:
            return read_runs(client, ids)

    def wait_final(self, ids: list[UUID], timeout: float = 180) -> list[FlowRun]:
        deadline = time.monotonic() + timeout
        while True:
            runs = self.read_runs(ids)
            if len(runs) == len(ids) and all(r.state and r.state.type.value in FINAL
                                             for r in runs):
                return runs
            if time.monotonic() > deadline:
                states = {str(r.id): r.state.type.value if r.state else None for r in runs}
                raise AssertionError(f"runs not final within {timeout}s: {states}\n"
                                     f"worker log tail:\n{self.log('worker')[-4000:]}")
            time.sleep(0.5)

    def stop(self) -> None:
        """Worker first (it owns the launchers), then the fork server, then Prefect."""
        for name in ("worker", "fork_server"):
            process = getattr(self, name)
            if process is not None:
                stop_group(process, 30)
                setattr(self, name, None)
        if self.server is not None:
            self.server.stop()
            self.server = None

    def leftovers(self) -> list[psutil.Process]:
        """Processes still running whose command line mentions this stack's directory.

        Fork-server children never exec, so they carry the server's command line
        (with the socket path); launchers carry it too.
        """
        found = []
        for process in psutil.process_iter(["cmdline"]):
            with contextlib.suppress(psutil.Error):
                cmdline = process.info["cmdline"] or ()
                if (any(str(self.root) in part for part in cmdline)
                        and process.status() != psutil.STATUS_ZOMBIE):
                    found.append(process)
        return found


def read_runs(client: SyncPrefectClient, ids: list[UUID]) -> list[FlowRun]:
    return client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)),
                                 limit=len(ids))
