"""Bursts on the local profile: every file loaded exactly once, with no command after the copy.

200 small valid files (both datasets, many months) are copied into raw/ at
once; the bridge, automations, worker, recover and reconcile deployments must
get every one into the warehouse exactly once: rows per source URI equal the
file's good rows and the load log has one entry per object. The second burst
SIGKILLs the Prefect server in the middle and starts it again: what the server
held only in memory is lost, and the pipeline must heal that by itself.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.burst import BurstFile, drop_all, make_burst, read_outcome, wait_all_loaded
from support.local_e2e import running_stack

from taxi_pipeline.local_stack import LocalStack
from taxi_pipeline.settings import Settings

pytestmark = pytest.mark.e2e

BURST = int(os.environ.get("TAXI_TEST_BURST", "200"))  # smaller for a quick local try
TIMEOUT = 900.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    home = tmp_path_factory.mktemp("burst-home")
    # The production defaults of reconcile (every 2 min, objects quiet for 3 min): a
    # shorter wait re-emits objects still queued behind the burst and doubles work.
    settings = Settings(profile="local", home=home, bucket=str(home / "bucket"))
    with running_stack(settings) as running:
        yield running


def assert_exactly_once(files: list[BurstFile], settings: Settings, rows: dict[str, int],
                        loads: dict[str, int]) -> None:
    for item in files:
        uri = (settings.bucket_dir / item.name).as_uri()
        assert loads.get(uri) == 1, f"{uri}: {loads.get(uri)} load log entries"
        assert rows.get(uri) == item.expected_good, f"{uri}: {rows.get(uri)} rows"


def test_a_burst_of_files_is_loaded_exactly_once(stack: LocalStack, tmp_path: Path) -> None:
    settings = stack.settings
    files = make_burst(BURST, tmp_path / "burst", settings, first_year=2001)
    started = drop_all(files, settings)
    outcome = wait_all_loaded(files, settings, started, TIMEOUT)
    print(f"{BURST} files loaded {outcome.seconds:.0f}s after the drop")
    assert_exactly_once(files, settings, outcome.rows_by_uri, outcome.loads_by_uri)
    assert all(p.alive() for p in stack.processes)


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
