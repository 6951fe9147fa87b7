"""Pieces of the local supervisor that need no running stack."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.local import LocalStack, ManagedProcess, bridge_port


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

    from taxi_pipeline.stack.local import plain_http_api_env

    assert plain_http_api_env("https://prefect.example.com/api", tmp_path) == {}
    env = plain_http_api_env("http://127.0.0.1:4200/api", tmp_path)
    ca = Path(env["PREFECT_API_SSL_CERT_FILE"])
    assert ca.read_text().count("BEGIN CERTIFICATE") == 1
    context = ssl.create_default_context(cafile=str(ca))  # a valid PEM Prefect can load
    assert len(context.get_ca_certs()) == 1
    assert plain_http_api_env("http://127.0.0.1:4200/api", tmp_path) == env  # idempotent


def test_listens_on_sees_this_process_s_listening_socket() -> None:
    from taxi_pipeline.stack.local import listens_on

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

    from taxi_pipeline.stack.local import wait_healthy

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


# Stand-ins for the Prefect server in the port-race tests: what uvicorn logs when it
# loses the bind (the line CI printed), and a server that answers /api/health.
_LOST_BIND = ("import sys; print(\"ERROR | uvicorn.error - [Errno 98] error while attempting "
              "to bind on address ('127.0.0.1', \" + sys.argv[1] + \"): address already in "
              "use\"); sys.exit(1)")
_HEALTHY = """
import http.server, sys
class Healthy(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"true")
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), Healthy).serve_forever()
"""


def _stack_with_servers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                        scripts: list[str], ui: bool = True) -> tuple[LocalStack, list[int]]:
    """A stack whose successive "servers" run `scripts`; and the ports they were given."""
    import sys

    from taxi_pipeline.stack import local as local_stack

    # The UI's usual port is some free port here: a real `up` elsewhere may hold 4200.
    monkeypatch.setattr(local_stack, "DEFAULT_UI_PORT", local_stack.free_port())
    ports: list[int] = []

    def server_argv(self: LocalStack, port: int) -> list[str]:
        ports.append(port)
        return [sys.executable, "-c", scripts[len(ports) - 1], str(port)]

    monkeypatch.setattr(LocalStack, "server_argv", server_argv)
    settings = Settings(home=tmp_path / "home", prefect_database="sqlite")
    return LocalStack(settings, ui=ui), ports


@pytest.mark.parametrize("ui", [True, False], ids=["usual-ui-port", "any-free-port"])
def test_a_server_that_loses_its_port_to_a_racing_process_moves_to_a_free_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ui: bool) -> None:
    """CI lost this race: the usual port was taken at the server's bind and free again
    when `up` looked a second time (the other stack was stopping). The server's log,
    not a second look at the port, decides. A headless stack's free port can be
    taken between the check and the bind as well."""
    from taxi_pipeline.stack import local as local_stack

    stack, ports = _stack_with_servers(tmp_path, monkeypatch, [_LOST_BIND, _HEALTHY], ui=ui)
    try:
        api_url = stack.start_server()
        assert (ports[0] == local_stack.DEFAULT_UI_PORT) == ui and ports[1] != ports[0]
        assert api_url == f"http://127.0.0.1:{ports[1]}/api" == stack.api_url
        assert stack.env["PREFECT_UI_API_URL"] == api_url
        assert stack.api_url_file.read_text() == api_url
        assert [p.name for p in stack.processes] == ["prefect-server"]
        assert stack.process("prefect-server").alive()
    finally:
        stack.stop()


def test_a_server_that_fails_for_another_reason_is_not_retried(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack, ports = _stack_with_servers(
        tmp_path, monkeypatch,
        ["import sys; print('database is locked'); sys.exit(1)", _HEALTHY])
    try:
        with pytest.raises(RuntimeError, match="database is locked"):
            stack.start_server()
    finally:
        stack.stop()
    assert len(ports) == 1


def test_only_this_start_s_part_of_the_server_log_counts(tmp_path: Path) -> None:
    """The log is appended to across `up`s in one home: an old lost race is not news."""
    from taxi_pipeline.stack.local import lost_port_race

    log = tmp_path / "prefect-server.log"
    log.write_text("Port 4200 is already in use. Please specify a different port\n")
    start = log.stat().st_size
    assert lost_port_race(log, 0, 4200)
    assert not lost_port_race(log, start, 4200)
    assert not lost_port_race(log, 0, 4201)
    with log.open("a") as more:
        more.write("ERROR | uvicorn.error - [Errno 98] error while attempting to bind on "
                   "address ('127.0.0.1', 4200): address already in use\n")
    assert lost_port_race(log, start, 4200)
    assert not lost_port_race(tmp_path / "missing.log", 0, 4200)


def test_clients_of_a_server_the_stack_started_skip_the_version_and_csrf_handshakes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import subprocess
    import sys

    for name in [k for k in os.environ if k.startswith("PREFECT_")]:
        monkeypatch.delenv(name)
    stack = LocalStack(Settings(home=tmp_path / "home"), api_url="http://127.0.0.1:1/api")
    skipped = {"PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED": "false",
               "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED": "false"}
    # Someone else's server (PREFECT_API_URL given to `up`): both handshakes stay.
    assert not skipped.keys() & stack.child_env().keys()
    # A server the stack runs itself (a finished stand-in process is enough here).
    stand_in = subprocess.Popen([sys.executable, "-c", "pass"])
    stand_in.wait()
    stack.processes.append(ManagedProcess("prefect-server", stand_in, tmp_path / "log"))
    assert stack.owns_server
    assert skipped.items() <= stack.child_env().items()
    # What the user set wins; a server that may protect against CSRF keeps the exchange.
    monkeypatch.setenv("PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED", "true")
    monkeypatch.setenv("PREFECT_SERVER_CSRF_PROTECTION_ENABLED", "true")
    env = stack.child_env()
    assert env["PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED"] == "true"
    assert "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED" not in env
    monkeypatch.delenv("PREFECT_SERVER_CSRF_PROTECTION_ENABLED")
    monkeypatch.setenv("PREFECT_PROFILE", "hardened")
    assert "PREFECT_CLIENT_CSRF_SUPPORT_ENABLED" not in stack.child_env()


def test_a_port_left_in_time_wait_by_a_stopped_server_is_still_free() -> None:
    """The previous `up`'s UI port, its connections in TIME_WAIT, is taken again."""
    from taxi_pipeline.stack.local import free_port

    server = socket.create_server(("127.0.0.1", 0))
    port = server.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    accepted, _ = server.accept()
    accepted.close()  # the server side closes first: its end goes to TIME_WAIT
    client.recv(1)
    client.close()
    server.close()
    with socket.socket() as probe, pytest.raises(OSError):  # what the old check tripped on
        probe.bind(("127.0.0.1", port))
    assert free_port(port) == port
