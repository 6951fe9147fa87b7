"""End to end on the emulator profile: GCS (fake-gcs-server) notifications through the
Pub/Sub emulator to the bridge, automations running transform and load on a process
worker, rows landing in BigQuery (bqemulator); the Prefect server runs on the embedded
PostgreSQL. The stack is the one `TAXI_PROFILE=emulator taxi-pipeline up` starts
(taxi_pipeline.emulator_stack); tests/test_e2e_emulator_up.py runs `up` itself.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings
from support.local_e2e import bridge_counter, wait_bridge_counter

from taxi_pipeline.emulator_stack import emulator_stack
from taxi_pipeline.emulators import emulators_available
from taxi_pipeline.local_stack import LocalStack
from taxi_pipeline.sample_data import SampleMonth, generate_month, raw_object_name, write_month
from taxi_pipeline.settings import Settings
from taxi_pipeline.warehouse import Warehouse, warehouse_from_settings

pytestmark = pytest.mark.e2e

PROJECT = "taxi-e2e"
BUCKET = "taxi-e2e-bucket"
LOAD_TIMEOUT = 240.0


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, Warehouse]]:
    reason = emulators_available()
    if reason:
        pytest.skip(reason)
    settings = Settings(profile="emulator", home=tmp_path_factory.mktemp("emu"), bucket=BUCKET,
                        gcp_project=PROJECT, pubsub_ack_deadline_seconds=10,
                        bridge_confirm_seconds=5)
    with emulator_stack(settings) as running:
        assert any("subscription" in line for line in running.setup_lines), running.setup_lines
        with temporary_settings(updates={PREFECT_API_URL: running.stack.api_url}):
            yield running.stack, warehouse_from_settings(running.settings)


def upload(sample: SampleMonth, tmp_path: Path, name: str) -> tuple[str, int]:
    local = write_month(sample, tmp_path / name.replace("/", "_"))
    blob = storage.Client(project=PROJECT, credentials=AnonymousCredentials()) \
        .bucket(BUCKET).blob(name)
    blob.upload_from_filename(str(local))
    return f"gs://{BUCKET}/{name}", int(blob.generation)


def wait_loaded(warehouse: Warehouse, table: str, uri: str, generation: int) -> int:
    deadline = time.monotonic() + LOAD_TIMEOUT
    while time.monotonic() < deadline:
        loaded = warehouse.loaded(table, uri)
        if loaded and loaded[0] >= generation:
            return loaded[1]
        time.sleep(1)
    raise AssertionError(f"{uri} generation {generation} not loaded within {LOAD_TIMEOUT}s")


def transform_runs(deployment: str) -> int:
    async def _count() -> int:
        async with get_client() as client:
            return await client.count_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=[deployment])))

    return asyncio.run(_count())


def test_uploads_reach_bigquery_once(chain: tuple[LocalStack, Warehouse],
                                     tmp_path: Path) -> None:
    stack, warehouse = chain
    settings = stack.settings
    months = {
        raw_object_name(settings.raw_prefix, "yellow", 2024, 1):
            generate_month("yellow", 2024, 1, 20_000, seed=11),
        raw_object_name(settings.raw_prefix, "yellow", 2024, 2):
            generate_month("yellow", 2024, 2, 15_000, era="2023", seed=12),
    }
    uploaded = {name: upload(sample, tmp_path, name) for name, sample in months.items()}
    for name, (uri, generation) in uploaded.items():
        assert wait_loaded(warehouse, settings.table, uri, generation) == \
            months[name].expected_good
        assert warehouse.rows_for(settings.table, uri) == months[name].expected_good

    # The same notification published again: no second run, no duplicate rows.
    runs = transform_runs(settings.transform_deployment)
    name = next(iter(uploaded))
    uri, generation = uploaded[name]
    acked = bridge_counter(stack, "acked")
    publisher = pubsub_v1.PublisherClient()
    publisher.publish(
        publisher.topic_path(PROJECT, settings.pubsub_topic),
        json.dumps({"bucket": BUCKET, "name": name, "generation": str(generation)}).encode(),
        bucketId=BUCKET, objectId=name, objectGeneration=str(generation),
        eventType="OBJECT_FINALIZE", payloadFormat="JSON_API_V1",
    ).result(timeout=30)
    # Positive signals instead of a sleep: the bridge acked the duplicate (its event is
    # stored), then a sentinel uploaded after it travels the whole chain, so the
    # automations handled the duplicate long before.
    wait_bridge_counter(stack, "acked", acked + 1)
    sentinel = generate_month("green", 2024, 3, 2_000, seed=14)
    sentinel_uri, sentinel_generation = upload(
        sentinel, tmp_path, raw_object_name(settings.raw_prefix, "green", 2024, 3))
    assert wait_loaded(warehouse, settings.table, sentinel_uri, sentinel_generation) == \
        sentinel.expected_good
    assert transform_runs(settings.transform_deployment) == runs + 1
    assert warehouse.rows_for(settings.table, uri) == months[name].expected_good
    assert stack.process("bridge").alive()
