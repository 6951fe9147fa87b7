"""Bursts on the local profile: every file loaded exactly once, with no command after the copy.

200 small valid files (both datasets, many months) are copied into raw/ at
once; the bridge, automations, worker, recover and reconcile deployments must
get every one into the warehouse exactly once: rows per source URI equal the
file's good rows and the load log has one entry per object. A burst with every
part of `up` SIGKILLed in turn (the server among them) is in
test_e2e_up_supervises.py (its own file, so the two run on two workers).
"""

from __future__ import annotations

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
    wait_all_loaded,
)

from taxi_pipeline.stack.local import LocalStack

pytestmark = pytest.mark.e2e



@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    with burst_stack(tmp_path_factory.mktemp("burst-home")) as running:
        yield running


def test_a_burst_of_files_is_loaded_exactly_once(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    files = make_burst(BURST, tmp_path / "burst", settings, first_year=2001)
    started = drop_all(files, settings)
    outcome = wait_all_loaded(files, settings, started, TIMEOUT)
    print(f"{BURST} files loaded {outcome.seconds:.0f}s after the drop")
    assert_exactly_once(files, settings, outcome.rows_by_uri, outcome.loads_by_uri)
    assert all(p.alive() for p in stack.processes)
