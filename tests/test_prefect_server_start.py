"""The server launcher's create_app memo (taxi_pipeline/stack/prefect_server_start.py).

It must return exactly what Prefect would, hash the settings once per settings
object, and leave every other call to Prefect; if Prefect's in-memory client
stops calling `create_app()` this way, these tests fail and the memo can go.
"""

from __future__ import annotations

from typing import Any

import pytest
from prefect.server.api import server
from prefect.server.api.clients import OrchestrationClient
from prefect.settings import PREFECT_API_DEFAULT_LIMIT, temporary_settings

from taxi_pipeline.stack.prefect_server_start import memoize_default_app


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[Any, ...]]:
    """Calls that reach Prefect's create_app, once the memo is installed (undone after)."""
    original = server.create_app
    seen: list[tuple[Any, ...]] = []

    def counting(*args: Any, **kwargs: Any) -> Any:
        seen.append((args, tuple(sorted(kwargs.items()))))
        return original(*args, **kwargs)

    monkeypatch.setattr(server, "create_app", counting)
    memoize_default_app()
    return seen


def app_of(client: OrchestrationClient) -> Any:
    return client._http_client._transport.app  # type: ignore[attr-defined]


def test_in_memory_clients_reuse_prefects_app_without_rehashing(
        calls: list[tuple[Any, ...]]) -> None:
    clients = [OrchestrationClient() for _ in range(3)]
    assert len(calls) == 1, "Prefect's create_app ran for every client"
    assert app_of(clients[0]) is app_of(clients[2])
    # The very app Prefect's own cache holds for these settings.
    assert app_of(clients[0]) is server.APP_CACHE[next(
        key for key in server.APP_CACHE if key[1:] == (False, False))]


def test_new_settings_get_prefects_answer_for_them(calls: list[tuple[Any, ...]]) -> None:
    first = app_of(OrchestrationClient())
    with temporary_settings(updates={PREFECT_API_DEFAULT_LIMIT: 123}):
        changed = app_of(OrchestrationClient())
        assert app_of(OrchestrationClient()) is changed
    assert len(calls) == 2
    assert changed is not first
    assert app_of(OrchestrationClient()) is first


def test_calls_with_arguments_go_to_prefect(calls: list[tuple[Any, ...]]) -> None:
    server.create_app(ephemeral=True)
    server.create_app(ephemeral=True)
    assert calls == [((), (("ephemeral", True),))] * 2


def test_installing_twice_wraps_once(calls: list[tuple[Any, ...]]) -> None:
    memoize_default_app()
    OrchestrationClient()
    OrchestrationClient()
    assert len(calls) == 1
