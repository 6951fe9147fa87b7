"""Flow runs of the local pool whose process is gone: crash them so recovery re-runs them.

A run's own process reports how it ended, and the worker reports a process that
died. Neither can when the worker itself was killed (runs it had just claimed
stay Pending and no new worker takes them) or when the API was down at that
moment (a server or PostgreSQL restart): such a run stays Pending or Running
for ever, and reconcile leaves its object alone as "in flight". Prefect's own
remedy, heartbeats and a zombie automation, covers Running runs only and costs
an event per run every beat; this sweep covers both, here, where the processes
are: a run of the pool is an orphan when it is Running and its process
(`infrastructure_pid`, on this machine) is gone, or Pending for longer than a
process start with no process at all. One found twice in a row (so the worker
had its chance to report it) is set Crashed, which starts the recovery
automation like any crashed run.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any
from uuid import UUID

import psutil

# Longer than any process start seen here (a cold start under a burst on 2 cores).
PENDING_GRACE = timedelta(seconds=60)


@dataclass(frozen=True)
class Orphan:
    run_id: UUID
    name: str
    why: str


def process_alive(infrastructure_pid: str | None) -> bool:
    """Whether a process worker's `infrastructure_pid` (a pid on this host) still runs."""
    if not infrastructure_pid:
        return False
    try:
        pid = int(str(infrastructure_pid).rsplit(":", 1)[-1])
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except (ValueError, psutil.Error):
        return False


async def find_orphans(pool: str, now: datetime | None = None) -> list[Orphan]:
    """Runs of `pool` that are Pending or Running with no live process on this machine."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterState,
        FlowRunFilterStateType,
        WorkPoolFilter,
        WorkPoolFilterName,
    )
    from prefect.client.schemas.objects import StateType

    now = now or datetime.now(UTC)
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(
                any_=[StateType.PENDING, StateType.RUNNING]))),
            work_pool_filter=WorkPoolFilter(name=WorkPoolFilterName(any_=[pool])),
            limit=200)
    found = []
    for run in runs:
        if run.state is None or process_alive(run.infrastructure_pid):
            continue
        if run.state.type == StateType.RUNNING:
            why = (f"its process ({run.infrastructure_pid}) is gone"
                   if run.infrastructure_pid else "it has no process")
            found.append(Orphan(run.id, run.name, why))
        elif now - run.state.timestamp > PENDING_GRACE:
            found.append(Orphan(run.id, run.name, f"pending for over "
                                f"{PENDING_GRACE.total_seconds():.0f}s with no process "
                                "(its worker was stopped before starting it)"))
    return found


async def crash(orphans: list[Orphan]) -> list[Orphan]:
    """Set each orphan Crashed (unless it moved on meanwhile); returns those crashed."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.objects import StateType
    from prefect.states import Crashed

    crashed = []
    async with get_client() as client:
        for orphan in orphans:
            run = await client.read_flow_run(orphan.run_id)
            if run.state is None or run.state.type not in (StateType.PENDING, StateType.RUNNING):
                continue
            result: Any = await client.set_flow_run_state(
                orphan.run_id, Crashed(message=f"taxi-pipeline up: {orphan.why}"))
            if result.state is not None and result.state.type == StateType.CRASHED:
                crashed.append(orphan)
    return crashed


@dataclass
class OrphanSweep:
    """Crash a run once it has been an orphan in two sweeps in a row."""

    pool: str
    suspects: set[UUID] = field(default_factory=set)

    async def sweep(self) -> list[Orphan]:
        found = await find_orphans(self.pool)
        confirmed = [o for o in found if o.run_id in self.suspects]
        self.suspects = {o.run_id for o in found} - {o.run_id for o in confirmed}
        return await crash(confirmed) if confirmed else []

    def sweep_now(self, api_url: str, timeout: float = 30.0) -> list[Orphan]:
        from prefect.settings import PREFECT_API_URL, temporary_settings

        with temporary_settings(updates={PREFECT_API_URL: api_url}):
            return asyncio.run(asyncio.wait_for(self.sweep(), timeout))
