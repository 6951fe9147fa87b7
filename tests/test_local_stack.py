"""Pieces of the local supervisor that need no running stack."""

from __future__ import annotations

import socket

import pytest

from taxi_pipeline.local_stack import bridge_port
from taxi_pipeline.settings import Settings


def test_an_explicit_bridge_port_is_honoured(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAXI_BRIDGE_PORT", "18099")
    assert bridge_port(Settings(), prefer_default=False) == 18099
    assert bridge_port(Settings(), prefer_default=True) == 18099


def test_without_one_up_prefers_the_default_and_headless_stacks_take_any() -> None:
    settings = Settings()
    default = settings.bridge_port
    with socket.socket() as busy:
        try:
            busy.bind(("127.0.0.1", default))
        except OSError:
            pytest.skip(f"port {default} is in use here")
        # Taken: even `up` moves to a free port instead of failing.
        assert bridge_port(settings, prefer_default=True) != default
    assert bridge_port(settings, prefer_default=True) == default  # free again
    assert bridge_port(settings, prefer_default=False) != 0
