"""Pieces of the local supervisor that need no running stack."""

from __future__ import annotations

import socket
from pathlib import Path

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


def test_a_plain_http_api_gets_a_one_certificate_ca_file(tmp_path: Path) -> None:
    import ssl

    from taxi_pipeline.local_stack import plain_http_api_env

    assert plain_http_api_env("https://prefect.example.com/api", tmp_path) == {}
    env = plain_http_api_env("http://127.0.0.1:4200/api", tmp_path)
    ca = Path(env["PREFECT_API_SSL_CERT_FILE"])
    assert ca.read_text().count("BEGIN CERTIFICATE") == 1
    context = ssl.create_default_context(cafile=str(ca))  # a valid PEM Prefect can load
    assert len(context.get_ca_certs()) == 1
    assert plain_http_api_env("http://127.0.0.1:4200/api", tmp_path) == env  # idempotent
