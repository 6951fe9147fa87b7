"""A loopback HTTP proxy in front of bqemulator that answers load jobs as BigQuery does.

- A repeated load job id gets 409 Conflict (`duplicate`, "Already Exists: Job ..."),
  where bqemulator would run the job again.
- When armed, the next load job of a processed object fails the way BigQuery fails a
  job it may not read the object for (`accessDenied`, a 403 fixed later by granting
  IAM): jobs.insert answers the job resource with `status.errorResult`, and jobs.get
  of that id keeps answering it. The emulator never sees that job.

Everything else is forwarded unchanged.
"""

from __future__ import annotations

import http.client
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import urlsplit

HOP_HEADERS = {"connection", "keep-alive", "transfer-encoding", "content-length",
               "proxy-connection", "upgrade"}


@dataclass
class ProxyState:
    upstream: str  # host:port of bqemulator
    fail_next_processed_load: bool = False
    load_job_ids: list[str] = field(default_factory=list)
    conflicts: list[str] = field(default_factory=list)
    failed_jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


def _handler(state: ProxyState) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:  # quiet
            pass

        def _reply(self, status: int, body: dict[str, Any]) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json; charset=UTF-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _forward(self, body: bytes) -> None:
            connection = http.client.HTTPConnection(state.upstream, timeout=300)
            headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_HEADERS}
            headers["Content-Length"] = str(len(body))
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            self.send_response(response.status)
            for key, value in response.getheaders():
                if key.lower() not in HOP_HEADERS:
                    self.send_header(key, value)
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
            connection.close()

        def _job_insert(self, body: bytes) -> bool:
            """Handle a load job insert BigQuery's way; False to forward it."""
            try:
                job = json.loads(body or b"{}")
            except ValueError:
                return False
            load = (job.get("configuration") or {}).get("load")
            reference = job.get("jobReference") or {}
            job_id = reference.get("jobId")
            if not load or not job_id:
                return False
            project = reference.get("projectId", "")
            location = reference.get("location", "US")
            with state.lock:
                if job_id in state.load_job_ids:
                    state.conflicts.append(job_id)
                    message = f"Already Exists: Job {project}:{location}.{job_id}"
                    self._reply(409, {"error": {
                        "code": 409, "message": message, "status": "ALREADY_EXISTS",
                        "errors": [{"message": message, "domain": "global",
                                    "reason": "duplicate"}]}})
                    return True
                state.load_job_ids.append(job_id)
                sources = load.get("sourceUris") or []
                if not (state.fail_next_processed_load
                        and any("/processed/" in s for s in sources)):
                    return False
                state.fail_next_processed_load = False
                error = {"reason": "accessDenied", "domain": "global",
                         "message": f"Access Denied: File {sources[0]}: Access Denied"}
                resource = {**job, "kind": "bigquery#job",
                            "id": f"{project}:{location}.{job_id}",
                            "jobReference": {**reference, "location": location},
                            "statistics": {"creationTime": "0", "startTime": "0",
                                           "endTime": "0"},
                            "status": {"state": "DONE", "errorResult": error,
                                       "errors": [error]}}
                state.failed_jobs[job_id] = resource
            self._reply(200, resource)
            return True

        def _job_get(self) -> bool:
            parts = urlsplit(self.path).path.rstrip("/").split("/")
            if len(parts) >= 2 and parts[-2] == "jobs":
                with state.lock:
                    resource = state.failed_jobs.get(parts[-1])
                if resource is not None:
                    self._reply(200, resource)
                    return True
            return False

        def do_GET(self) -> None:
            if not self._job_get():
                self._forward(b"")

        def do_POST(self) -> None:
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            path = urlsplit(self.path).path.rstrip("/")
            if path.endswith("/jobs") and self._job_insert(body):
                return
            self._forward(body)

        def _other(self) -> None:
            self._forward(self.rfile.read(int(self.headers.get("Content-Length") or 0)))

        do_PUT = do_PATCH = do_DELETE = _other

    return Handler


class BigQueryJobProxy:
    """`with BigQueryJobProxy("127.0.0.1:9050") as proxy:` -> proxy.endpoint, proxy.state."""

    def __init__(self, upstream: str) -> None:
        self.state = ProxyState(upstream)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self.state))
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True,
                                       name="bq-job-proxy")

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BigQueryJobProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)
