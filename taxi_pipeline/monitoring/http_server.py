"""`/metrics` and `/healthz` on a background thread: the bridge's and the exporter's.

The standard library's WSGI server is enough for a Prometheus scrape and a
probe every few seconds (prometheus_client's own start_http_server has no
health endpoint to share the port with). A port already taken is one line,
`... port N is already in use`, which `up` reads to move the part elsewhere.
"""

from __future__ import annotations

import errno
import logging
import threading
from collections.abc import Callable
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger(__name__)

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class PortInUse(RuntimeError):
    """The metrics port is taken by another process."""


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # scraped every few seconds
        return


class MetricsHttpServer:
    """Serves `registry()` at /metrics and `problems()` at /healthz (200 "ok" when
    empty, else 503 with one problem a line); both asked at each request."""

    def __init__(self, registry: Callable[[], CollectorRegistry],
                 problems: Callable[[], list[str]],
                 port: int, host: str, *, what: str, variable: str,
                 thread_name: str) -> None:
        self.registry = registry
        self.problems = problems
        self.what = what
        try:
            self._server: WSGIServer = make_server(host, port, self.app,
                                                   handler_class=_QuietHandler)
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                raise
            raise PortInUse(
                f"the {what} port {port} is already in use ({exc.strerror}); stop what "
                f"listens there, or set {variable} to a free port") from None
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True,
                                        name=thread_name)

    @property
    def port(self) -> int:
        return int(self._server.server_port)

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        path = environ.get("PATH_INFO", "/")
        if path == "/metrics":
            start_response("200 OK", [("Content-Type", CONTENT_TYPE_LATEST)])
            return [generate_latest(self.registry())]
        if path == "/healthz":
            problems = self.problems()
            body = ("ok\n" if not problems else "\n".join(problems) + "\n").encode()
            start_response("200 OK" if not problems else "503 Service Unavailable",
                           [("Content-Type", "text/plain")])
            return [body]
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found: try /metrics or /healthz\n"]

    def start(self) -> MetricsHttpServer:
        self._thread.start()
        log.info("%s on port %d (/metrics, /healthz)", self.what, self.port)
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
