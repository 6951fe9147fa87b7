"""A burst of 200 files with the Prefect server SIGKILLed in the middle and started again.

What the server held only in memory (events not yet persisted, automation
actions, queued work) is lost; the pipeline must heal that by itself (recover
and reconcile deployments), with no command run after the copy: every file
loaded exactly once. The burst without the kill is test_e2e_burst.py.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.burst import (
    BURST,
    TIMEOUT,
    assert_exactly_once,
    burst_stack,
    drop_all,
    make_burst,
    read_outcome,
    wait_all_loaded,
)

from taxi_pipeline.stack.local import LocalStack

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with burst_stack(tmp_path_factory.mktemp("burst-kill-home")) as running:
        yield running


def test_a_burst_survives_a_server_killed_in_the_middle(stack: LocalStack,
                                                        tmp_path: Path) -> None:
    settings = stack.settings
    files = make_burst(BURST, tmp_path / "burst", settings, first_year=2030)
    before = read_outcome(settings, 0).loaded
    started = drop_all(files, settings)
    # Mid-burst: some objects of this burst are loaded, most are not.
    while read_outcome(settings, started).loaded < before + BURST // 10:
        assert read_outcome(settings, started).seconds < TIMEOUT / 2, "burst never started"
        time.sleep(1)
    stack.restart_server(kill=True)
    outcome = wait_all_loaded(files, settings, started, TIMEOUT)
    print(f"{BURST} files loaded {outcome.seconds:.0f}s after the drop (server killed)")
    assert_exactly_once(files, settings, outcome.rows_by_uri, outcome.loads_by_uri)
    assert all(p.alive() for p in stack.processes)
