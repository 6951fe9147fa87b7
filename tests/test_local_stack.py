"""Pieces of the local supervisor that need no running stack."""

from __future__ import annotations

import os
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


def test_listens_on_sees_this_process_s_listening_socket() -> None:
    from taxi_pipeline.local_stack import listens_on

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert listens_on(os.getpid(), port)
    assert not listens_on(os.getpid(), port)


def test_a_health_answer_from_someone_else_s_server_is_not_ours() -> None:
    """Two `up` at once: the second must not take the first one's server for its own."""
    import http.server
    import subprocess
    import sys
    import threading

    from taxi_pipeline.local_stack import wait_healthy

    class Healthy(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    other = http.server.HTTPServer(("127.0.0.1", 0), Healthy)
    threading.Thread(target=other.serve_forever, daemon=True).start()
    # "Our" server: a process that never listens and exits (as a failed bind does).
    ours = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(1.5)"])
    try:
        with pytest.raises(RuntimeError, match="did not become healthy"):
            wait_healthy(f"http://127.0.0.1:{other.server_port}/api", 30, ours)
        assert ours.poll() is not None  # it waited for ours to exit, not for the timeout
    finally:
        ours.kill()
        ours.wait()
        other.shutdown()
