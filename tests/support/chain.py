"""The whole emulator-profile chain, for the end-to-end test and the latency benchmark.

PostgreSQL + Prefect server, Pub/Sub emulator, fake-gcs-server publishing
notifications, the BigQuery emulator, `gcp setup`, then deployments,
automations, a process worker and the bridge (LocalStack, emulator profile).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from google.cloud import pubsub_v1  # type: ignore[attr-defined]
from prefect.settings import PREFECT_API_URL, temporary_settings

from support.emulators import bigquery_emulator, fake_gcs_server, pubsub_emulator
from support.prefect_server import PrefectServer, postgres_database
from taxi_pipeline.gcp_setup import setup
from taxi_pipeline.local_stack import LocalStack
from taxi_pipeline.settings import Settings
from taxi_pipeline.warehouse import Warehouse, warehouse_from_settings


@dataclass
class EmulatorChain:
    stack: LocalStack
    warehouse: Warehouse
    settings: Settings
    setup_lines: list[str]


@contextlib.contextmanager
def _env(values: dict[str, str]) -> Iterator[None]:
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def emulator_chain(root: Path, project: str, bucket: str) -> Iterator[EmulatorChain]:
    settings = Settings(profile="emulator", home=root / "home", bucket=bucket,
                        gcp_project=project, pubsub_ack_deadline_seconds=10,
                        bridge_confirm_seconds=5)
    with postgres_database() as database_url, pubsub_emulator(project) as pubsub, \
            _env(pubsub.env):
        # The topic must exist before fake-gcs-server starts: it drops events otherwise.
        publisher = pubsub_v1.PublisherClient()
        publisher.create_topic(name=publisher.topic_path(project, settings.pubsub_topic))
        gcs_root = root / "gcs"
        with (
            fake_gcs_server(gcs_root, pubsub.host_port, project, settings.pubsub_topic) as gcs,
            bigquery_emulator(project, gcs_root) as bq,
        ):
            emulator_env = {**pubsub.env, **gcs.env, **bq.env}
            with _env(emulator_env):
                lines = setup(settings)
                server = PrefectServer(database_url, root / "prefect").start()
                try:
                    with (
                        temporary_settings(updates={PREFECT_API_URL: server.api_url}),
                        LocalStack(settings, api_url=server.api_url, ui=False,
                                   env=dict(emulator_env)) as stack,
                    ):
                        yield EmulatorChain(stack, warehouse_from_settings(settings), settings,
                                            lines)
                finally:
                    server.stop()
