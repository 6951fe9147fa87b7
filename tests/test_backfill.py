"""Backfill against a loopback HTTP server standing in for the TLC site.

Real files (../shared/data/tlc) and synthetic months are served from 127.0.0.1 on a
free port; every reply can be scripted (status, body, content type, a Content-Length
that lies, a slow body), and the server counts requests and how many ran at once.
No Prefect server: the CLI runs in-process (`main([...])`), the flows' functions run
with Prefect's run context, events and artifacts stubbed out.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import logging
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pyarrow.csv as pcsv
import pyarrow.parquet as pq
import pytest

from taxi_pipeline import events
from taxi_pipeline.cli import main
from taxi_pipeline.datasets.registry import DATASETS
from taxi_pipeline.ops.backfill import run_backfill
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.sources.sample_data import generate_month
from taxi_pipeline.sources.tlc_download import (
    FAILED,
    LANDED,
    NOT_PUBLISHED,
    PRESENT,
    fetch_month,
    month_object_name,
    month_range,
    parse_datasets,
)
from taxi_pipeline.storage.local import LocalStore

HTML_PAGE = (b"<!DOCTYPE html><html><head><title>Service Unavailable</title></head>"
             b"<body><h1>We'll be back soon</h1></body></html>")


@dataclass
class Reply:
    status: int = 200
    body: bytes = b""
    content_type: str = "application/octet-stream"
    # Content-Length sent: None = the body's length, -1 = none (the body ends at close).
    length: int | None = None
    chunk_delay: float = 0.0


class Site:
    """What the loopback server answers, and what it was asked."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url
        self.routes: dict[str, list[Reply]] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self.in_flight = 0
        self.max_in_flight = 0

    def serve(self, name: str, *replies: Reply) -> None:
        """Answer GETs of `name` with `replies` in turn; the last one repeats."""
        self.routes[name] = list(replies)

    def serve_bytes(self, name: str, body: bytes, **kwargs: Any) -> bytes:
        self.serve(name, Reply(body=body, **kwargs))
        return body

    def next_reply(self, name: str) -> Reply:
        with self.lock:
            self.requests.append(name)
            replies = self.routes.get(name)
            if not replies:
                # CloudFront in front of TLC's bucket: 403 AccessDenied for unknown
                # keys; the test site answers 404 unless a test scripts a 403.
                return Reply(404, b"<?xml version='1.0'?><Error>NoSuchKey</Error>",
                             "application/xml")
            return replies.pop(0) if len(replies) > 1 else replies[0]

    def gets(self, name: str) -> int:
        return self.requests.count(name)


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            name = self.path.rsplit("/", 1)[-1]
            reply = site.next_reply(name)
            with site.lock:
                site.in_flight += 1
                site.max_in_flight = max(site.max_in_flight, site.in_flight)
            try:
                self.send_response(reply.status)
                self.send_header("Content-Type", reply.content_type)
                if reply.length != -1:
                    length = len(reply.body) if reply.length is None else reply.length
                    self.send_header("Content-Length", str(length))
                self.end_headers()
                for start in range(0, len(reply.body), 64 * 1024):
                    if reply.chunk_delay:
                        time.sleep(reply.chunk_delay)
                    self.wfile.write(reply.body[start:start + 64 * 1024])
                    self.wfile.flush()
                if reply.chunk_delay and not reply.body:
                    time.sleep(reply.chunk_delay)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (a cancelled download)
            finally:
                with site.lock:
                    site.in_flight -= 1
                self.close_connection = True

        def log_message(self, format: str, *args: Any) -> None:
            pass

    return Handler


@pytest.fixture
def site(monkeypatch: pytest.MonkeyPatch) -> Iterator[Site]:
    """A TLC site on a free loopback port; the settings point at it, retries are quick."""
    tlc = Site("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(tlc))
    server.daemon_threads = True
    tlc.base_url = f"http://127.0.0.1:{server.server_address[1]}/trip-data"
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    monkeypatch.setenv("TAXI_TLC_BASE_URL", tlc.base_url)
    monkeypatch.setenv("TAXI_DOWNLOAD_ATTEMPTS", "3")
    monkeypatch.setenv("TAXI_DOWNLOAD_RETRY_SECONDS", "0.01")
    monkeypatch.setenv("TAXI_DOWNLOAD_TIMEOUT_SECONDS", "10")
    get_settings.cache_clear()
    try:
        yield tlc
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def synthetic(dataset: str, month: str, rows: int = 400) -> bytes:
    year, mon = (int(part) for part in month.split("-"))
    sample = generate_month(dataset, year, mon, rows, seed=year * 12 + mon)  # type: ignore[arg-type]
    buffer = io.BytesIO()
    pq.write_table(sample.table, buffer)
    return buffer.getvalue()


def files_under(root: Path) -> list[str]:
    """Every file below `root`, hidden and temporary ones included."""
    if not root.exists():
        return []
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def raw_dir(settings: Settings) -> Path:
    return settings.bucket_dir / settings.raw_prefix


def tlc(dataset: str, month: str) -> str:
    return f"{dataset}_tripdata_{month}.parquet"


# -- the issue's cases ---------------------------------------------------------------


def test_six_months_land_once_and_a_second_run_skips_all_six(
        site: Site, tlc_data_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    real = (tlc_data_dir / "green_tripdata_2024-01.parquet").read_bytes()
    served = {tlc("green", "2024-01"): site.serve_bytes(tlc("green", "2024-01"), real)}
    for dataset in ("yellow", "green"):
        for month in ("2024-01", "2024-02", "2024-03"):
            if (dataset, month) != ("green", "2024-01"):
                served[tlc(dataset, month)] = site.serve_bytes(tlc(dataset, month),
                                                               synthetic(dataset, month))

    code = main(["backfill", "--dataset", "yellow,green", "--from", "2024-01", "--to", "2024-03",
                 "--concurrency", "3"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(" landed ") == 6
    assert "[6/6]" in out
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    generations = {}
    for dataset in ("yellow", "green"):
        for month in ("2024-01", "2024-02", "2024-03"):
            name = month_object_name(settings, dataset, month)
            path = settings.bucket_dir / name
            assert hashlib.sha256(path.read_bytes()).digest() == hashlib.sha256(
                served[tlc(dataset, month)]).digest()
            generations[name] = store.ref(name).generation
    assert pq.read_metadata(settings.bucket_dir / month_object_name(
        settings, "green", "2024-01")).num_rows == 56_551
    assert sorted(files_under(raw_dir(settings))) == sorted(
        name.removeprefix(settings.raw_prefix) for name in generations)
    assert len(site.requests) == 6

    code = main(["backfill", "--dataset", "yellow,green", "--from", "2024-01", "--to", "2024-03"])
    again = capsys.readouterr().out
    assert code == 0, again
    assert again.count(" present ") == 6
    assert len(site.requests) == 6, "a present month is not requested again"
    assert {name: store.ref(name).generation for name in generations} == generations


@pytest.mark.parametrize("status", [404, 403])
def test_a_month_tlc_has_not_published_is_skipped(
        site: Site, status: int, capsys: pytest.CaptureFixture[str]) -> None:
    site.serve_bytes(tlc("yellow", "2025-11"), synthetic("yellow", "2025-11"))
    site.serve(tlc("yellow", "2025-12"), Reply(status, b"<Error>AccessDenied</Error>",
                                                 "application/xml"))

    code = main(["backfill", "--dataset", "yellow", "--from", "2025-11", "--to", "2025-12"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert f"not_published  HTTP {status}" in out
    assert "not_published      1  yellow/2025-12" in out
    assert site.gets(tlc("yellow", "2025-12")) == 1, "not retried"
    assert files_under(raw_dir(get_settings())) == ["yellow/2025/yellow_tripdata_2025-11.parquet"]


def test_500_then_200_lands_after_a_retry(site: Site) -> None:
    body = synthetic("green", "2023-05")
    site.serve(tlc("green", "2023-05"), Reply(500, b"Internal Server Error", "text/plain"),
               Reply(body=body))
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)

    result = fetch_month(store, settings, "green", "2023-05")
    assert (result.outcome, result.attempts) == (LANDED, 2)
    assert site.gets(tlc("green", "2023-05")) == 2
    assert (settings.bucket_dir / result.name).read_bytes() == body


def test_retries_are_bounded_and_then_the_month_fails(
        site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.serve(tlc("green", "2023-06"), Reply(503, b"Slow Down", "text/plain"))

    code = main(["backfill", "--dataset", "green", "--from", "2023-06", "--to", "2023-06"])
    out = capsys.readouterr().out
    assert code == 1
    assert "failed green/2023-06: HTTP 503 (gave up after 3 tries)" in out
    assert site.gets(tlc("green", "2023-06")) == 3
    assert files_under(raw_dir(get_settings())) == []


def test_a_refused_connection_is_retried_and_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    with socket.socket() as sock:  # a free port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setenv("TAXI_TLC_BASE_URL", f"http://127.0.0.1:{port}/trip-data")
    monkeypatch.setenv("TAXI_DOWNLOAD_ATTEMPTS", "2")
    monkeypatch.setenv("TAXI_DOWNLOAD_RETRY_SECONDS", "0.01")
    get_settings.cache_clear()
    settings = get_settings()
    result = fetch_month(LocalStore(settings.bucket_dir), settings, "yellow", "2020-01")
    assert (result.outcome, result.attempts) == (FAILED, 2)
    assert "ConnectError" in result.detail


@pytest.mark.parametrize("content_type", ["text/html; charset=utf-8", "application/octet-stream"])
def test_an_html_error_page_served_with_200_never_lands(
        site: Site, content_type: str, capsys: pytest.CaptureFixture[str]) -> None:
    site.serve_bytes(tlc("yellow", "2022-02"), HTML_PAGE, content_type=content_type)

    code = main(["backfill", "--dataset", "yellow", "--from", "2022-02", "--to", "2022-02"])
    out = capsys.readouterr().out
    assert code == 1
    assert "failed yellow/2022-02:" in out
    assert ("error page" in out) if content_type.startswith("text/html") else (
        "not parquet (starts b'<!DOCTYPE html" in out)
    assert site.gets(tlc("yellow", "2022-02")) == 1, "content that is not parquet is not retried"
    assert files_under(get_settings().bucket_dir) == []


def _cut(body: bytes) -> dict[str, Reply]:
    half = body[: len(body) // 2]
    return {
        # The connection closes before the Content-Length the server announced.
        "short_of_content_length": Reply(body=half, length=len(body)),
        # No Content-Length: the body "ends" at the close, without a footer.
        "no_footer": Reply(body=half, length=-1),
        # Magic bytes at both ends, but the footer metadata is garbage.
        "bad_footer": Reply(body=half + b"\x00\x10\x00\x00PAR1"),
    }


@pytest.mark.parametrize("how", ["short_of_content_length", "no_footer", "bad_footer"])
def test_a_truncated_body_never_lands_under_raw(site: Site, how: str) -> None:
    body = synthetic("yellow", "2021-07", rows=3_000)
    site.serve(tlc("yellow", "2021-07"), _cut(body)[how])
    settings = get_settings()

    result = fetch_month(LocalStore(settings.bucket_dir), settings, "yellow", "2021-07")
    assert result.outcome == FAILED
    assert "gave up after 3 tries" in result.detail, "a cut-off body may be whole next time"
    assert site.gets(tlc("yellow", "2021-07")) == 3
    assert files_under(settings.bucket_dir) == [], "no object and no temporary file left"


def test_a_truncated_body_then_a_whole_one_lands(site: Site) -> None:
    body = synthetic("yellow", "2021-08", rows=3_000)
    site.serve(tlc("yellow", "2021-08"), _cut(body)["no_footer"], Reply(body=body))
    settings = get_settings()

    result = fetch_month(LocalStore(settings.bucket_dir), settings, "yellow", "2021-08")
    assert (result.outcome, result.attempts) == (LANDED, 2)
    assert (settings.bucket_dir / result.name).read_bytes() == body


def test_a_store_error_fails_that_month_only(site: Site) -> None:
    for month in ("2023-01", "2023-02"):
        site.serve_bytes(tlc("green", month), synthetic("green", month))
    settings = get_settings()
    full = month_object_name(settings, "green", "2023-01")

    class FullDisk(LocalStore):
        def publish(self, name: str, *args: Any, **kwargs: Any) -> Any:
            if name == full:
                raise OSError(28, "No space left on device")
            return super().publish(name, *args, **kwargs)

    report = run_backfill(settings, ["green"], ["2023-01", "2023-02"], concurrency=2,
                          store=FullDisk(settings.bucket_dir))
    assert [r.outcome for r in report.results] == [FAILED, LANDED]
    assert report.failed[0].detail == "OSError: [Errno 28] No space left on device"


# -- dry run, summary, exit code, concurrency ----------------------------------------


def test_dry_run_sends_nothing(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    settings = get_settings()
    present = settings.bucket_dir / month_object_name(settings, "green", "2019-02")
    present.parent.mkdir(parents=True)
    present.write_bytes(synthetic("green", "2019-02"))

    code = main(["backfill", "--dataset", "yellow,green", "--from", "2019-01", "--to", "2019-03",
                 "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0
    assert site.requests == []
    assert out.count(" to_download ") == 5
    assert out.count(" present ") == 1
    assert "to_download        5  yellow/2019-01, green/2019-01, yellow/2019-02" in out
    assert "dry run: nothing was downloaded" in out
    assert files_under(raw_dir(settings)) == ["green/2019/green_tripdata_2019-02.parquet"]


def test_summary_and_exit_code(site: Site, capsys: pytest.CaptureFixture[str]) -> None:
    site.serve_bytes(tlc("yellow", "2024-05"), synthetic("yellow", "2024-05"))
    site.serve(tlc("green", "2024-05"), Reply(400, b"Bad Request", "text/plain"))
    # yellow and green 2024-06: not on the site (404)
    settings = get_settings()
    existing = settings.bucket_dir / month_object_name(settings, "green", "2024-04")
    existing.parent.mkdir(parents=True)
    existing.write_bytes(synthetic("green", "2024-04"))
    site.serve_bytes(tlc("yellow", "2024-04"), synthetic("yellow", "2024-04"))

    code = main(["backfill", "--dataset", "yellow,green", "--from", "2024-04", "--to", "2024-06"])
    out = capsys.readouterr().out
    assert code == 1
    summary = out[out.index("outcome "):].splitlines()
    assert summary[1].split()[:2] == ["landed", "2"]
    assert summary[2] == "present            1  already in the bucket"
    assert summary[3] == "not_published      2  yellow/2024-06, green/2024-06"
    assert summary[4] == "failed             1  see below"
    assert summary[5].startswith("failed green/2024-05: HTTP 400 from http://127.0.0.1:")
    assert site.gets(tlc("green", "2024-04")) == 0

    # Nothing failing: exit code 0.
    site.serve_bytes(tlc("green", "2024-05"), synthetic("green", "2024-05"))
    assert main(["backfill", "--dataset", "yellow,green", "--from", "2024-04",
                 "--to", "2024-06"]) == 0
    assert "landed             1" in capsys.readouterr().out


def test_concurrency_is_bounded(site: Site) -> None:
    for month in month_range("2020-01", "2020-06"):
        site.serve(tlc("yellow", month), Reply(body=synthetic("yellow", month),
                                               chunk_delay=0.15))
    settings = get_settings()
    done: list[int] = []

    report = run_backfill(settings, ["yellow"], month_range("2020-01", "2020-06"), concurrency=2,
                          on_result=lambda result, n, total: done.append(n))
    assert report.counts()[LANDED] == 6
    assert site.max_in_flight == 2
    assert done == [1, 2, 3, 4, 5, 6]
    assert [r.month for r in report.results] == month_range("2020-01", "2020-06")


def test_an_interrupted_backfill_leaves_no_partial_file(site: Site) -> None:
    big = synthetic("yellow", "2020-02", rows=40_000)
    assert len(big) > 1_000_000  # 20 chunks, 1 s: still streaming when Ctrl-C comes
    site.serve(tlc("yellow", "2020-02"), Reply(body=big, chunk_delay=0.05))
    site.serve(tlc("yellow", "2020-03"), Reply(body=big, chunk_delay=0.05))
    settings = get_settings()

    def interrupt(result: Any, done: int, total: int) -> None:
        raise KeyboardInterrupt  # Ctrl-C while two months are still streaming

    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        run_backfill(settings, ["yellow"], month_range("2020-01", "2020-03"), concurrency=3,
                     on_result=interrupt)
    assert time.monotonic() - started < 3
    assert files_under(settings.bucket_dir) == []


@pytest.mark.parametrize(("args", "message"), [
    (["--dataset", "taxi", "--from", "2024-01", "--to", "2024-02"], "unknown dataset(s) taxi"),
    (["--from", "2024-13", "--to", "2024-02"], "'2024-13' is not a month"),
    (["--from", "2024-03", "--to", "2024-02"], "the range 2024-03..2024-02 is empty"),
])
def test_bad_arguments_are_refused_with_the_reason(
        site: Site, args: list[str], message: str) -> None:
    with pytest.raises(SystemExit) as exited:
        main(["backfill", *args])
    assert message in str(exited.value)
    assert site.requests == []


def test_month_range_and_datasets() -> None:
    assert month_range("2019-11", "2020-02") == ["2019-11", "2019-12", "2020-01", "2020-02"]
    assert len(month_range("2019-01", "2025-12")) == 84
    assert parse_datasets("yellow, green,yellow") == ["yellow", "green"]
    assert parse_datasets(["green"]) == ["green"]


# -- the flows' wiring (Prefect's run context, events and artifacts stubbed) ---------------


def test_the_backfill_flow_emits_an_event_per_month_and_fails_when_one_failed(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.backfill as backfill_flow
    import flows.download as download_flow

    site.serve_bytes(tlc("green", "2022-01"), synthetic("green", "2022-01"))
    site.serve_bytes(tlc("yellow", "2022-01"), HTML_PAGE, content_type="text/html")
    emitted: list[tuple[str, str, dict[str, Any]]] = []
    progress: list[float] = []
    tables: list[Any] = []
    monkeypatch.setattr(backfill_flow, "get_run_logger", lambda: logging.getLogger("t"))
    monkeypatch.setattr(download_flow, "emit", lambda name, obj, settings, **kw: emitted.append(
        (name, obj.name, kw["payload"])))
    monkeypatch.setattr(backfill_flow, "create_progress_artifact", lambda *a, **kw: "id")
    monkeypatch.setattr(backfill_flow, "update_progress_artifact",
                        lambda artifact, value, **kw: progress.append(value))
    monkeypatch.setattr(backfill_flow, "create_table_artifact",
                        lambda **kw: tables.append(kw["table"]))

    with pytest.raises(RuntimeError, match="1 of 4 downloads failed: yellow/2022-01: HTTP 200"):
        backfill_flow.backfill.fn("2022-01", "2022-02", ["yellow", "green"], 2)
    by_object = {name.rsplit("/", 1)[-1]: (event, payload) for event, name, payload in emitted}
    assert by_object[tlc("green", "2022-01")][0] == events.DOWNLOAD_COMPLETED
    assert by_object[tlc("yellow", "2022-01")][0] == events.DOWNLOAD_FAILED
    assert by_object[tlc("yellow", "2022-02")] == (
        events.DOWNLOAD_SKIPPED,
        {"reason": "not_published", "url": f"{site.base_url}/{tlc('yellow', '2022-02')}",
         "status": 404})
    assert sorted(progress) == [25.0, 50.0, 75.0, 100.0]
    assert [row["outcome"] for row in tables[0]] == [FAILED, LANDED, NOT_PUBLISHED,
                                                     NOT_PUBLISHED]

    site.serve_bytes(tlc("yellow", "2022-01"), synthetic("yellow", "2022-01"))
    outcome = backfill_flow.backfill.fn("2022-01", "2022-02", ["yellow", "green"], 2)
    assert outcome["counts"] == {LANDED: 1, PRESENT: 1, NOT_PUBLISHED: 2, FAILED: 0}


def test_the_backfill_flow_takes_the_issues_parameters() -> None:
    from flows.backfill import backfill

    assert backfill.name == "backfill"
    assert set(backfill.parameters.properties) == {"datasets", "from_month", "to_month",
                                                   "concurrency", "source"}


def test_the_download_flow_lands_through_the_same_checks(
        site: Site, monkeypatch: pytest.MonkeyPatch) -> None:
    import flows.download as download_flow

    site.serve_bytes(tlc("green", "2022-05"), synthetic("green", "2022-05"))
    site.serve_bytes(tlc("yellow", "2022-05"), HTML_PAGE, content_type="text/html")
    emitted: list[str] = []
    monkeypatch.setattr(download_flow, "get_run_logger", lambda: logging.getLogger("t"))
    monkeypatch.setattr(download_flow, "emit", lambda name, obj, settings, **kw: emitted.append(
        name))
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)

    assert download_flow.download_month.fn(store, settings, "green", "2022-05") == "downloaded"
    assert download_flow.download_month.fn(store, settings, "green", "2022-05") == "exists"
    assert download_flow.download_month.fn(store, settings, "green", "2022-06") == "not_published"
    with pytest.raises(download_flow.DownloadFailed, match="error page"):
        download_flow.download_month.fn(store, settings, "yellow", "2022-05")
    assert emitted == [events.DOWNLOAD_COMPLETED, events.DOWNLOAD_SKIPPED,
                       events.DOWNLOAD_SKIPPED]
    assert files_under(raw_dir(settings)) == ["green/2022/green_tripdata_2022-05.parquet"]


def test_deploy_registers_the_backfill_flow_without_a_schedule(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import uuid

    import deploy

    registered: dict[str, dict[str, Any]] = {}

    def register(flow: Any, name: str, settings: Settings, **kwargs: Any) -> uuid.UUID:
        registered[flow.name] = {"name": name, **kwargs}
        return uuid.uuid4()

    async def nothing(*args: Any) -> dict[str, str]:
        return {}

    monkeypatch.setattr(deploy, "register", register)
    monkeypatch.setattr(deploy, "ensure_work_pool", nothing)
    monkeypatch.setattr(deploy, "apply_automations", nothing)
    ids = deploy.deploy(get_settings())
    assert "backfill" in ids
    assert registered["backfill"] == {"name": "backfill"}
    assert registered["download"]["cron"]


# -- all four datasets, both sources (issue 17) --------------------------------------------


def gz(body: bytes) -> bytes:
    return gzip.compress(body)


def synthetic_csv(dataset: str, month: str, rows: int = 300) -> bytes:
    """A month as the CSV.gz mirror serves it (that year's mirror layout), gzipped."""
    year, mon = (int(part) for part in month.split("-"))
    sample = generate_month(dataset, year, mon, rows, seed=year * 12 + mon,  # type: ignore[arg-type]
                            file_format="csv.gz")
    buffer = io.BytesIO()
    pcsv.write_csv(sample.table, buffer)
    return gz(buffer.getvalue())


def test_all_four_datasets_land_from_tlc(site: Site, tlc_data_dir: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    served = {
        tlc("green", "2025-10"): (tlc_data_dir / "green_tripdata_2025-10.parquet").read_bytes(),
        tlc("yellow", "2025-10"): synthetic("yellow", "2025-10"),
        tlc("fhv", "2025-10"): synthetic("fhv", "2025-10"),
        tlc("fhvhv", "2025-10"): synthetic("fhvhv", "2025-10"),
    }
    for name, body in served.items():
        site.serve_bytes(name, body)
    code = main(["backfill", "--dataset", "yellow,green,fhv,fhvhv", "--from", "2025-10",
                 "--to", "2025-10"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(" landed ") == 4
    settings = get_settings()
    for dataset in DATASETS:
        name = month_object_name(settings, dataset, "2025-10")
        assert name == f"raw/{dataset}/2025/{dataset}_tripdata_2025-10.parquet"
        assert (settings.bucket_dir / name).read_bytes() == served[tlc(dataset, "2025-10")]


def test_the_csv_gz_mirror_lands_its_months_and_skips_what_it_lacks(
        site: Site, tlc_data_dir: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("TAXI_TLC_MIRROR_URL", site.base_url.replace("/trip-data", "/releases"))
    get_settings.cache_clear()
    served = {
        "fhv_tripdata_2020-04.csv.gz": gz(
            (tlc_data_dir / "fhv_tripdatasample_2020-04.csv").read_bytes()),
        "fhvhv_tripdata_2020-04.csv.gz": gz(
            (tlc_data_dir / "fhvhv_tripdatasample_2020-04.csv").read_bytes()),
        "green_tripdata_2020-04.csv.gz": synthetic_csv("green", "2020-04"),
        # yellow 2020-04 is not served: 404, reported not published
    }
    for name, body in served.items():
        site.serve_bytes(name, body, content_type="application/gzip")
    code = main(["backfill", "--source", "mirror", "--dataset", "yellow,green,fhv,fhvhv",
                 "--from", "2020-04", "--to", "2020-04"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert out.count(" landed ") == 3 and "not published" in out
    settings = get_settings()
    assert files_under(raw_dir(settings)) == [
        "fhv/2020/fhv_tripdata_2020-04.csv.gz", "fhvhv/2020/fhvhv_tripdata_2020-04.csv.gz",
        "green/2020/green_tripdata_2020-04.csv.gz"]
    for name, body in served.items():
        dataset = name.split("_", 1)[0]
        assert (raw_dir(settings) / dataset / "2020" / name).read_bytes() == body
    assert site.requests.count("yellow_tripdata_2020-04.csv.gz") == 1
    # the same months from TLC are present already (in the other format): no request
    before = len(site.requests)
    assert main(["backfill", "--dataset", "green,fhv", "--from", "2020-04",
                 "--to", "2020-04"]) == 0
    assert "2 present" in capsys.readouterr().out or len(site.requests) == before
    assert len(site.requests) == before


def test_the_mirror_outside_2019_2021_and_its_bad_bodies(
        site: Site, tlc_data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TAXI_TLC_MIRROR_URL", site.base_url)
    monkeypatch.setenv("TAXI_DOWNLOAD_SOURCE", "mirror")
    get_settings.cache_clear()
    settings = get_settings()
    store = LocalStore(settings.bucket_dir)
    outside = fetch_month(store, settings, "fhvhv", "2023-01")
    assert outside.outcome == NOT_PUBLISHED and "2019-01..2021-12" in outside.detail
    assert site.requests == []
    whole = gz((tlc_data_dir / "head.csv").read_bytes())
    site.serve_bytes("fhvhv_tripdata_2021-06.csv.gz", whole[: len(whole) // 2], length=-1)
    cut = fetch_month(store, settings, "fhvhv", "2021-06")
    assert cut.outcome == FAILED and "gzip stream ends early" in cut.detail
    assert site.gets("fhvhv_tripdata_2021-06.csv.gz") == 3  # retried, as a truncated body
    site.serve_bytes("fhv_tripdata_2021-06.csv.gz", b"dispatching_base_num,pickup\n")
    plain = fetch_month(store, settings, "fhv", "2021-06")
    assert plain.outcome == FAILED and "not csv.gz" in plain.detail
    assert site.gets("fhv_tripdata_2021-06.csv.gz") == 1  # refused at once
    assert files_under(settings.bucket_dir) == []
    site.serve_bytes("fhvhv_tripdata_2021-06.csv.gz", whole)
    landed = fetch_month(store, settings, "fhvhv", "2021-06")
    assert landed.outcome == LANDED
    assert (settings.bucket_dir / landed.name).read_bytes() == whole
