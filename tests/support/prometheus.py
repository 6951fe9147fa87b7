"""A real Prometheus server (Debian's `prometheus` package) on a free loopback port.

scripts/test.sh installs the package; the binaries are looked up on PATH and in
/usr/bin. The server scrapes every second, keeps its data in a temporary
directory, and is stopped (its pid, then SIGKILL) when the context ends.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taxi_pipeline.stack.local import free_port


def binary(name: str) -> str:
    """`prometheus` or `promtool`; a clear failure (never a skip) when absent."""
    found = shutil.which(name) or (f"/usr/bin/{name}" if Path(f"/usr/bin/{name}").exists()
                                   else None)
    assert found, (f"{name} is not installed: scripts/test.sh installs Debian's prometheus "
                   "package (apt-get install prometheus)")
    return found


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of `expr` (each item: metric labels and value)."""
        body = urllib.parse.urlencode({"query": expr}).encode()
        with urllib.request.urlopen(f"{self.url}/api/v1/query", data=body, timeout=10) as r:
            answer = json.load(r)
        assert answer["status"] == "success", answer
        return list(answer["data"]["result"])

    def by(self, expr: str, label: str) -> dict[str, float]:
        """`expr`'s values keyed by one label."""
        return {item["metric"].get(label, ""): float(item["value"][1])
                for item in self.query(expr)}

    def scalar(self, expr: str) -> float | None:
        result = self.query(expr)
        return float(result[0]["value"][1]) if result else None

    def targets_up(self) -> dict[str, float]:
        return self.by("up", "job")


@contextlib.contextmanager
def running_prometheus(targets: dict[str, str], directory: Path) -> Iterator[Prometheus]:
    """Prometheus scraping each job's `host:port` every second, until the context ends."""
    directory.mkdir(parents=True, exist_ok=True)
    jobs = "\n".join(f"  - job_name: {job}\n    static_configs:\n      - targets: ['{target}']"
                     for job, target in targets.items())
    config = directory / "prometheus.yml"
    config.write_text(f"global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
                      f"scrape_configs:\n{jobs}\n")
    port = free_port()
    log = (directory / "prometheus.log").open("wb")
    process = subprocess.Popen(
        [binary("prometheus"), f"--config.file={config}",
         f"--storage.tsdb.path={directory / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert process.poll() is None, (directory / "prometheus.log").read_text()
            with contextlib.suppress(OSError), \
                    urllib.request.urlopen(f"{url}/-/ready", timeout=2) as ready:
                if ready.status == 200:
                    break
            assert time.monotonic() < deadline, "Prometheus not ready within 60s"
            time.sleep(0.2)
        yield Prometheus(url)
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=5)
        log.close()
