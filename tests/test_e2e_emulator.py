"""End to end on the emulator profile: GCS (fake-gcs-server) notifications through the
Pub/Sub emulator to the bridge, automations running transform and load on a process
worker, rows landing in BigQuery (bqemulator); the Prefect server runs on the embedded
PostgreSQL. The stack is the one `TAXI_PROFILE=emulator taxi-pipeline up` starts
(taxi_pipeline.stack.emulator); tests/test_e2e_emulator_up.py runs `up` itself.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import signal
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.auth.credentials import AnonymousCredentials
from google.cloud import pubsub_v1, storage
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName
from prefect.settings import PREFECT_API_URL, temporary_settings
from support.bq_proxy import BigQueryJobProxy
from support.local_e2e import (
    bridge_counter,
    read_events,
    wait_bridge_counter,
    wait_warehouse_loaded,
)

import taxi_pipeline.stack.emulator as emulator_module
from taxi_pipeline import events
from taxi_pipeline.settings import Settings
from taxi_pipeline.sources.sample_data import (
    SampleMonth,
    generate_month,
    raw_object_name,
    write_month,
)
from taxi_pipeline.stack.emulator import emulator_stack
from taxi_pipeline.stack.emulators import emulators_available
from taxi_pipeline.stack.local import LocalStack, port_of
from taxi_pipeline.warehouse import Warehouse, warehouse_from_settings

pytestmark = pytest.mark.e2e

PROJECT = "taxi-e2e"
BUCKET = "taxi-e2e-bucket"
LOAD_TIMEOUT = 240.0
# Objects uploaded during the Prefect outage (held by the bridge when it is SIGKILLed)
# and while the bridge is dead, and how long the scheduled reconcile (every 15 s,
# re-emitting what has been quiet for 15 s) may take to load them all.
HELD_UPLOADS, DEAD_UPLOADS = 2, 2
HEAL_TIMEOUT = 150.0


# BigQuery's job-id semantics in front of bqemulator, for every client of the stack
# (worker, flow runs, this process): a repeated load job id is 409, and a load job can be
# made to fail once (support/bq_proxy.py).
PROXIES: list[BigQueryJobProxy] = []


@contextlib.contextmanager
def bigquery_behind_proxy(*args: Any, **kwargs: Any) -> Iterator[Any]:
    with (
        REAL_BIGQUERY_EMULATOR(*args, **kwargs) as emulator,
        BigQueryJobProxy(f"{emulator.host}:{emulator.port}") as proxy,
    ):
        PROXIES.append(proxy)
        yield dataclasses.replace(emulator, host="127.0.0.1", port=proxy.port)


REAL_BIGQUERY_EMULATOR = emulator_module.bigquery_emulator


@pytest.fixture(scope="module")
def chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, Warehouse]]:
    reason = emulators_available()
    if reason:
        pytest.skip(reason)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(emulator_module, "bigquery_emulator", bigquery_behind_proxy)
        yield from _chain(tmp_path_factory)


def _chain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LocalStack, Warehouse]]:
    settings = Settings(profile="emulator", home=tmp_path_factory.mktemp("emu"), bucket=BUCKET,
                        gcp_project=PROJECT, pubsub_ack_deadline_seconds=10,
                        bridge_confirm_seconds=5,
                        # The scheduled reconcile heals what the Pub/Sub emulator
                        # loses (test_uploads_during_outage_and_bridge_sigkill_...):
                        # short, as in the local recovery tests.
                        reconcile_every_minutes=0.25, reconcile_after_minutes=0.25)
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
    return wait_warehouse_loaded(warehouse, table, uri, generation, LOAD_TIMEOUT, poll=1)


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


def test_every_dataset_and_format_reaches_its_bigquery_table(
        chain: tuple[LocalStack, Warehouse], tmp_path: Path) -> None:
    """A green CSV.gz month and an fhvhv month, uploaded to the bucket, land in `trips` and
    `fhvhv_trips` through the same chain; the tables carry the specs' schemas, and a
    re-upload (a new generation) replaces the rows, never adds to them."""
    from taxi_pipeline.datasets.registry import spec_for, table_for

    stack, warehouse = chain
    settings = stack.settings
    months = {
        raw_object_name(settings.raw_prefix, "green", 2020, 10, "csv.gz"):
            generate_month("green", 2020, 10, 3_000, seed=31, file_format="csv.gz"),
        raw_object_name(settings.raw_prefix, "fhvhv", 2024, 3):
            generate_month("fhvhv", 2024, 3, 3_000, seed=32),
    }
    uploaded = {name: upload(sample, tmp_path, name) for name, sample in months.items()}
    for name, (uri, generation) in uploaded.items():
        dataset = name.split("/")[1]
        table = table_for(dataset, settings.table)
        assert wait_loaded(warehouse, table, uri, generation) == months[name].expected_good
        bq_table = warehouse.client.get_table(  # type: ignore[attr-defined]
            f"{PROJECT}.{settings.bq_dataset}.{table}")
        assert [f.name for f in bq_table.schema] == spec_for(dataset).schema.names
    name = raw_object_name(settings.raw_prefix, "fhvhv", 2024, 3)
    uri, generation = upload(months[name], tmp_path, name)  # the same bytes, again
    assert wait_loaded(warehouse, "fhvhv_trips", uri, generation) == months[name].expected_good
    assert warehouse.rows_for("fhvhv_trips", uri) == months[name].expected_good


def wait_bridge_listening(stack: LocalStack, timeout: float = 60) -> None:
    """Until the bridge answers on /metrics (it starts last, after the deployments)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            bridge_counter(stack, "received")
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


def delivered_by_pubsub(uri: str) -> bool:
    """Whether the bridge stored a `storage.object.finalized` for `uri` from a notification
    (a reconcile re-emit carries the `pipeline.reemit` label)."""
    return any(event.resource.get(events.LABEL_REEMIT) != "true"
               for event in read_events([events.OBJECT_FINALIZED], uri))


def test_uploads_during_outage_and_bridge_sigkill_all_load_once(
        chain: tuple[LocalStack, Warehouse], tmp_path: Path) -> None:
    """Objects uploaded during a fault, on the subscription `gcp setup` made (retry
    policy, dead letter): first the Prefect server is down (the bridge receives the
    notifications but cannot store their events, so it holds them), then the bridge is
    SIGKILLed and more objects are uploaded. The Pub/Sub emulator, unlike Pub/Sub,
    may never redeliver what the killed bridge held, nor deliver what was published
    while it was dead (how much it delivers varies from run to run, so it is printed,
    not asserted); the scheduled reconcile deployment loads the rest, with no command
    run, and every object is loaded exactly once."""
    stack, warehouse = chain
    settings = stack.settings
    wait_bridge_listening(stack)
    subscription = pubsub_v1.SubscriberClient().get_subscription(
        subscription=pubsub_v1.SubscriberClient.subscription_path(
            PROJECT, settings.pubsub_subscription))
    assert subscription.retry_policy.minimum_backoff, "not the subscription gcp setup makes"
    assert subscription.dead_letter_policy.dead_letter_topic

    def month_batch(first: int, count: int) -> dict[str, SampleMonth]:
        return {raw_object_name(settings.raw_prefix, "green", 2023, month):
                generate_month("green", 2023, month, 1_000, seed=40 + month)
                for month in range(first, first + count)}

    held, published_dead = month_batch(1, HELD_UPLOADS), month_batch(7, DEAD_UPLOADS)
    samples = {**held, **published_dead}
    assert stack.api_url is not None
    port = port_of(stack.api_url)
    server = stack.process("prefect-server")
    server._signal_group(signal.SIGKILL)
    server.process.wait(timeout=30)
    stack.processes.remove(server)
    fault_started = time.monotonic()
    received = bridge_counter(stack, "received")
    uploaded = {name: upload(sample, tmp_path, name) for name, sample in held.items()}
    wait_bridge_counter(stack, "received", received + len(held))
    bridge = stack.process("bridge")
    bridge._signal_group(signal.SIGKILL)
    bridge.process.wait(timeout=30)
    stack.processes.remove(bridge)
    uploaded |= {name: upload(sample, tmp_path, name) for name, sample in published_dead.items()}
    stack._spawn_server(port)
    stack.spawn("bridge", [sys.executable, "-m", "pubsub_bridge"])
    restarted_at = time.monotonic()

    pending = dict(uploaded)
    deadline = restarted_at + HEAL_TIMEOUT
    while pending and time.monotonic() < deadline:
        for name, (uri, generation) in list(pending.items()):
            loaded = warehouse.loaded(settings.table, uri)
            if loaded and loaded[0] >= generation:
                del pending[name]
        if pending:
            time.sleep(1)
    healed = time.monotonic() - restarted_at
    delivered_held = sum(delivered_by_pubsub(uploaded[name][0]) for name in held)
    delivered_dead = sum(delivered_by_pubsub(uploaded[name][0]) for name in published_dead)
    summary = (f"delivered by the Pub/Sub emulator after the restart: {delivered_held} of "
               f"{len(held)} held by the killed bridge, {delivered_dead} of "
               f"{len(published_dead)} published while it was dead; the rest re-emitted by "
               f"the scheduled reconcile; all loaded {healed:.0f} s after the restart "
               f"(fault {restarted_at - fault_started:.0f} s)")
    print("\n" + summary)
    assert not pending, f"not loaded {HEAL_TIMEOUT:.0f} s after the restart: {sorted(pending)}" \
        f" ({summary})"
    for name, (uri, _generation) in uploaded.items():
        assert warehouse.rows_for(settings.table, uri) == samples[name].expected_good, uri
    assert stack.process("bridge").alive()


def test_a_load_job_that_fails_once_loads_exactly_once_with_no_command(
        chain: tuple[LocalStack, Warehouse], tmp_path: Path) -> None:
    """Issue 20, defect 1, end to end: BigQuery fails the first load job of the processed
    object (accessDenied, as before an IAM grant; the proxy answers as BigQuery does,
    including 409 for a repeated job id). The load flow's own retry runs it again under
    the next attempt id, and the object is in `trips` exactly once, with no command run.
    (The old code adopted the failed job on each retry and never loaded the object.)"""
    stack, warehouse = chain
    settings = stack.settings
    [proxy] = PROXIES
    proxy.state.fail_next_processed_load = True
    sample = generate_month("yellow", 2023, 5, 5_000, seed=51)
    name = raw_object_name(settings.raw_prefix, "yellow", 2023, 5)
    uri, generation = upload(sample, tmp_path, name)
    assert wait_loaded(warehouse, settings.table, uri, generation) == sample.expected_good
    [failed] = proxy.state.failed_jobs
    assert failed in proxy.state.conflicts  # the retry met the failed job and passed over it
    assert f"{failed}_retry1" in proxy.state.load_job_ids
    assert warehouse.rows_for(settings.table, uri) == sample.expected_good
    assert warehouse.loaded(settings.table, uri) == (generation, sample.expected_good)
