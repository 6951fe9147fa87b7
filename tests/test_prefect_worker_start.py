"""The worker launcher's settings memo (taxi_pipeline/stack/prefect_worker_start.py).

It must return exactly what Prefect would, compute it once per settings object,
and hand out copies; if Prefect's worker stops building a run's environment
this way, the last test fails and the memo can go.
"""

from __future__ import annotations

from typing import Any

import pytest
from prefect.settings import PREFECT_API_DEFAULT_LIMIT, get_current_settings, temporary_settings
from prefect.settings.base import PrefectBaseSettings
from prefect.workers.base import BaseJobConfiguration

from taxi_pipeline.stack.prefect_worker_start import memoize_settings_environment


@pytest.fixture
def computed(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, tuple[Any, ...]]]:
    """Root-settings calls that reach Prefect, once the memo is installed (undone after)."""
    original = PrefectBaseSettings.to_environment_variables
    seen: list[tuple[str, tuple[Any, ...]]] = []

    def counting(self: PrefectBaseSettings, *args: Any, **kwargs: Any) -> dict[str, str]:
        if type(self).__name__ == "Settings":
            seen.append((type(self).__name__, args))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PrefectBaseSettings, "to_environment_variables", counting)
    memoize_settings_environment()
    return seen


def prefects_answer(settings: PrefectBaseSettings, **kwargs: Any) -> dict[str, str]:
    return PrefectBaseSettings.to_environment_variables.__wrapped__(  # type: ignore[attr-defined]
        settings, **kwargs)


def test_one_computation_per_settings_object_with_prefects_answer(
        computed: list[tuple[str, tuple[Any, ...]]]) -> None:
    settings = get_current_settings()
    first = settings.to_environment_variables(exclude_unset=True)
    again = settings.to_environment_variables(exclude_unset=True)
    assert len(computed) == 1
    assert first == again
    computed.clear()
    assert first == prefects_answer(settings, exclude_unset=True)
    # Other arguments are another answer, computed once too.
    everything = settings.to_environment_variables()
    assert everything == settings.to_environment_variables()
    assert len(computed) == 2  # prefects_answer's own call, then this one
    assert len(everything) > len(first)


def test_callers_get_copies(computed: list[tuple[str, tuple[Any, ...]]]) -> None:
    settings = get_current_settings()
    mine = settings.to_environment_variables(exclude_unset=True)
    mine["PREFECT_API_URL"] = "http://changed.invalid"
    mine["EXTRA"] = "1"
    fresh = settings.to_environment_variables(exclude_unset=True)
    assert "EXTRA" not in fresh
    assert fresh.get("PREFECT_API_URL") != "http://changed.invalid"


def test_new_settings_get_their_own_answer(computed: list[tuple[str, tuple[Any, ...]]]) -> None:
    before = get_current_settings().to_environment_variables(exclude_unset=True)
    with temporary_settings(updates={PREFECT_API_DEFAULT_LIMIT: 123}):
        changed = get_current_settings().to_environment_variables(exclude_unset=True)
        assert changed["PREFECT_SERVER_API_DEFAULT_LIMIT"] == "123"
    assert get_current_settings().to_environment_variables(exclude_unset=True) == before
    assert before.get("PREFECT_SERVER_API_DEFAULT_LIMIT") != "123"
    assert len(computed) == 2


def test_the_workers_run_environment_is_what_the_memo_serves(
        computed: list[tuple[str, tuple[Any, ...]]]) -> None:
    """Prefect's worker builds each run's base environment from this call (per run)."""
    first = BaseJobConfiguration._base_environment()
    second = BaseJobConfiguration._base_environment()
    assert first == second == prefects_answer(get_current_settings(), exclude_unset=True)
    assert len(computed) == 2, "the worker no longer asks the settings for its environment"
