"""Fixtures shared by the unit tests: real TLC files in place, and isolated settings."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from taxi_pipeline.settings import get_settings

REPO_ROOT = Path(__file__).resolve().parent.parent
TLC_DATA_DIR = REPO_ROOT.parent / "shared" / "data" / "tlc"


@pytest.fixture
def tlc_data_dir() -> Path:
    """The real TLC files, read in place (never copied into the repo)."""
    if not TLC_DATA_DIR.is_dir():
        pytest.skip(
            "../shared/data/tlc is absent (real TLC files live outside the repo): "
            f"looked for {TLC_DATA_DIR}"
        )
    return TLC_DATA_DIR


@pytest.fixture(autouse=True)
def isolated_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Every test sees default settings with TAXI_HOME in its own temporary directory."""
    for name in list(os.environ):
        if name.startswith("TAXI_"):
            monkeypatch.delenv(name)
    monkeypatch.setenv("TAXI_HOME", str(tmp_path / "home"))
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


# The longest files run first: with three workers (scripts/test.sh, `--dist loadfile
# --no-loadscope-reorder`) two start one 200-file burst each (the server-kill one
# mostly waits for the scheduled reconcile after the kill) while the third works
# through the other long files, instead of the bursts being the tail.
# The rest of the list is the other long files, longest first (measured on three
# workers), so the last minutes are spent on short files on every worker.
_FIRST = ("test_e2e_up_supervises.py", "test_e2e_burst.py", "test_e2e_recovery.py",
          "test_e2e_local.py", "test_bridge_pubsub.py", "test_e2e_bridge_faults.py",
          "test_e2e_emulator.py", "test_warm_runs.py", "test_bigquery_warehouse.py",
          "test_e2e_emulator_up.py", "test_production_server.py", "test_dead_letters.py",
          "test_k8s_deploy.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """With TAXI_TEST_STRICT_SKIPS (scripts/test.sh, which installs every tool and
    emulator first), a skip is a failure: a test that cannot find what it needs there
    is broken, and a skip would hide it (a path one folder off once skipped every
    BigQuery emulator test)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if (report.skipped and os.environ.get("TAXI_TEST_STRICT_SKIPS")
            and not hasattr(report, "wasxfail")):
        report.outcome = "failed"
        report.longrepr = (f"skipped where nothing may be (TAXI_TEST_STRICT_SKIPS, set by "
                           f"scripts/test.sh after installing everything): {report.longrepr}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    def rank(item: pytest.Item) -> int:
        name = item.path.name
        return _FIRST.index(name) if name in _FIRST else len(_FIRST)

    items.sort(key=rank)  # stable: the order within and among the other files holds
