"""`TAXI_PROFILE=emulator taxi-pipeline up` as a new user runs it: one command starts the
three emulators, the Prefect server, worker and bridge; what it prints works when pasted
(the sample, `gcloud storage cp` and query lines); SIGTERM leaves nothing running."""

from __future__ import annotations

import shlex
import signal
import subprocess
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import storage
from support.emulator_up import RunningUp, start_emulator_up
from support.local_e2e import stop_up, wait_warehouse_loaded

from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import generate_month, raw_object_name, write_month
from taxi_pipeline.stack.emulators import emulators_available
from taxi_pipeline.warehouse import Warehouse, warehouse_from_settings

pytestmark = pytest.mark.e2e

LOAD_TIMEOUT = 120.0


def wait_loaded(warehouse: Warehouse, table: str, uri: str, generation: int) -> int:
    return wait_warehouse_loaded(warehouse, table, uri, generation, LOAD_TIMEOUT, poll=0.5)


def test_up_on_the_emulator_profile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    reason = emulators_available()
    if reason:
        pytest.skip(reason)
    home = tmp_path / "home"
    up = start_emulator_up(home)
    try:
        check_what_up_printed(up, tmp_path, monkeypatch)
    except BaseException:
        up.process.send_signal(signal.SIGTERM)
        up.process.wait(timeout=120)
        raise
    stop_up(up.process, home, signal.SIGTERM)  # nothing left running, and `up` says so


def check_what_up_printed(up: RunningUp, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> None:
    exports = up.exports()
    for key, value in exports.items():
        monkeypatch.setenv(key, value)
    assert exports["STORAGE_EMULATOR_HOST"] == up.field("fake-gcs-server")
    assert exports["BIGQUERY_EMULATOR_HOST"] == up.field("BigQuery emulator")
    settings = Settings()
    assert (settings.profile, settings.home) == ("emulator", up.home)
    warehouse = warehouse_from_settings(settings)
    export_line = up.command_after("For status / reemit / reconcile / query", 1)
    query_line = up.command_after("For status / reemit / reconcile / query", 3)
    assert " query " in query_line

    def printed_count() -> int:
        """The printed count command, pasted after the printed export, as a user does."""
        done = subprocess.run(["bash", "-c", f"{export_line}\n{query_line}"],
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, f"{query_line}\n{done.stdout}{done.stderr}"
        lines = done.stdout.strip().splitlines()
        assert lines[-1] == "(1 row)", done.stdout
        return int(lines[-2].strip().replace(",", ""))

    # Before the first load the printed count answers 0, not a NotFound traceback.
    assert printed_count() == 0

    # A month uploaded with google-cloud-storage to the printed endpoint ...
    name = raw_object_name(settings.raw_prefix, "green", 2024, 2)
    sample = generate_month("green", 2024, 2, 3_000, seed=21)
    local = write_month(sample, tmp_path / "green_tripdata_2024-02.parquet")
    blob = storage.Client(project=settings.gcp_project, credentials=AnonymousCredentials()) \
        .bucket(settings.bucket).blob(name)
    blob.upload_from_filename(str(local))
    uploaded = [(f"gs://{settings.bucket}/{name}", int(blob.generation),
                 sample.expected_good)]

    # ... and one written and uploaded by the printed commands, pasted into a shell.
    workdir = tmp_path / "user"
    workdir.mkdir()
    sample_line = up.command_after("Write a sample month", 1)
    gcloud_line = up.command_after("Write a sample month", 2)
    assert "gcloud storage cp" in gcloud_line
    for line in (sample_line, gcloud_line):
        done = subprocess.run(["bash", "-c", line], cwd=workdir, capture_output=True,
                              text=True, timeout=120)
        assert done.returncode == 0, f"{line}\n{done.stdout}{done.stderr}"
    gcloud_name = raw_object_name(settings.raw_prefix, "yellow", 2024, 1)
    gcloud_blob = storage.Client(project=settings.gcp_project,
                                 credentials=AnonymousCredentials()) \
        .bucket(settings.bucket).get_blob(gcloud_name)
    assert gcloud_blob is not None
    words = shlex.split(sample_line)
    assert words[1:4] == ["sample", "yellow", "2024-01"], sample_line
    rows = int(words[words.index("--rows") + 1])
    printed_sample = generate_month("yellow", 2024, 1, rows, seed=0)  # `sample`'s default seed
    uploaded.append((f"gs://{settings.bucket}/{gcloud_name}", int(gcloud_blob.generation),
                     printed_sample.expected_good))

    for uri, generation, expected in uploaded:
        assert wait_loaded(warehouse, settings.table, uri, generation) == expected

    assert printed_count() == sum(expected for _, _, expected in uploaded)
