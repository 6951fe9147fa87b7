"""The whole emulator profile in one context manager: `taxi-pipeline up` on TAXI_PROFILE=emulator.

The Pub/Sub emulator, fake-gcs-server publishing OBJECT_FINALIZE notifications to it,
the BigQuery emulator reading fake-gcs-server's files, `gcp setup`, then what
`up` starts for the local profile (LocalStack: a Prefect server on the embedded
PostgreSQL, the warm flow-run fork server, deployments and automations, a
process worker and the Pub/Sub bridge), every process pointed at the emulators.
The end-to-end tests and the emulator benchmark start the same thing.

The BigQuery emulator keeps its tables in memory, so each start begins with an
empty bucket too (its files live in TAXI_HOME/emulator/gcs); the Prefect
server's database (TAXI_HOME/prefect) persists, as in the local profile.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.emulators import (
    BigQueryEmulator,
    FakeGcsServer,
    PubSubEmulator,
    bigquery_emulator,
    fake_gcs_server,
    pubsub_emulator,
    require_emulators,
)
from taxi_pipeline.stack.local import LocalStack, free_port

# What `up` uses when TAXI_GCP_PROJECT / TAXI_BUCKET are unset (the emulators take any name).
DEFAULT_PROJECT = "taxi-emulator"
DEFAULT_BUCKET = "taxi-emulator"
# The emulators' customary ports: `up` takes them when free, so the printed
# endpoints stay the same from one run to the next (tests take any free port).
PREFERRED_PORTS = {"pubsub": 8085, "gcs": 4443, "bigquery": 9050, "bigquery-grpc": 9060}
# gcloud accepts any token when its storage endpoint is overridden to the emulator.
GCLOUD_TOKEN = "emulator"


def emulator_settings(settings: Settings) -> Settings:
    """`settings` with a project and a bucket when unset: the emulators accept any name."""
    updates: dict[str, object] = {}
    if not settings.gcp_project:
        updates["gcp_project"] = DEFAULT_PROJECT
    if not settings.bucket:
        updates["bucket"] = DEFAULT_BUCKET
    return settings.model_copy(update=updates) if updates else settings


@contextlib.contextmanager
def environ(values: dict[str, str]) -> Iterator[None]:
    """Set `values` in os.environ for the block (this process's clients read them)."""
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


@dataclass
class EmulatorStack:
    """A running emulator profile: the emulators, what `gcp setup` did, and the LocalStack."""

    settings: Settings
    stack: LocalStack
    pubsub: PubSubEmulator
    gcs: FakeGcsServer
    bigquery: BigQueryEmulator
    setup_lines: list[str]

    @property
    def env(self) -> dict[str, str]:
        """What points the Google client libraries at the emulators."""
        return {**self.pubsub.env, **self.gcs.env, **self.bigquery.env}

    @property
    def gcloud_config(self) -> Path:
        """A throwaway gcloud configuration directory (the user's own is left alone)."""
        return self.settings.home / "emulator" / "gcloud"

    @property
    def gcloud_env(self) -> dict[str, str]:
        """What makes `gcloud storage` talk to fake-gcs-server, anonymously."""
        return {
            "CLOUDSDK_CONFIG": str(self.gcloud_config),
            "CLOUDSDK_API_ENDPOINT_OVERRIDES_STORAGE": f"{self.gcs.url}/storage/v1/",
            "CLOUDSDK_AUTH_ACCESS_TOKEN": GCLOUD_TOKEN,
            "CLOUDSDK_CORE_PROJECT": self.settings.gcp_project,
        }

    def gcloud_cp(self, source: str, dataset: str = "yellow", year: str = "2024") -> str:
        """A `gcloud storage cp` command line that uploads `source` as a raw object."""
        env = " ".join(f"{key}={shlex.quote(value)}" for key, value in self.gcloud_env.items())
        target = f"gs://{self.settings.bucket}/{self.settings.raw_prefix}{dataset}/{year}/"
        return f"{env} gcloud storage cp {shlex.quote(source)} {target}"

    def client_env(self) -> dict[str, str]:
        """What another shell needs for `taxi-pipeline status|reemit|reconcile` on this stack."""
        settings = self.settings
        return {
            "TAXI_PROFILE": "emulator",
            "TAXI_HOME": str(settings.home),
            "TAXI_GCP_PROJECT": settings.gcp_project,
            "TAXI_BUCKET": settings.bucket,
            "PREFECT_API_URL": self.stack.api_url or "",
            **self.env,
        }

    def endpoints(self) -> list[str]:
        """Where everything runs."""
        settings, stack = self.settings, self.stack
        project = settings.gcp_project
        api = stack.api_url or ""
        lines = [
            f"Prefect UI and API   {api.removesuffix('/api')}  (API {api})" if stack.ui
            else f"Prefect API          {api}",
            f"Pub/Sub emulator     {self.pubsub.host_port}  topic projects/{project}/topics/"
            f"{settings.pubsub_topic}, subscription {settings.pubsub_subscription}",
            f"fake-gcs-server      {self.gcs.url}  bucket gs://{settings.bucket} "
            f"(files in {self.gcs.root / settings.bucket})",
            f"BigQuery emulator    {self.bigquery.endpoint}  table {project}.{settings.bq_dataset}."
            f"{settings.table}",
        ]
        if stack.bridge_port:
            lines.append(f"Bridge health        http://127.0.0.1:{stack.bridge_port}/healthz"
                         "  (/metrics)")
        lines.append(f"Logs                 {stack.log_dir}")
        return lines

    def describe(self) -> list[str]:
        """Where everything is, and commands that work when pasted (what `up` prints)."""
        cli = shlex.quote(str(Path(sys.executable).with_name("taxi-pipeline")))
        exports = " ".join(f"{key}={shlex.quote(value)}"
                           for key, value in self.client_env().items())
        return [
            *self.endpoints(),
            "",
            "Write a sample month and upload it with gcloud (each upload is a new generation):",
            f"  {cli} sample yellow 2024-01 --rows 20000",
            f"  {self.gcloud_cp('yellow_tripdata_2024-01.parquet')}",
            "For status / reemit / reconcile / query in another shell, first:",
            f"  export {exports}",
            "Then count the rows in the BigQuery emulator (0 until the first load):",
            f"  {cli} query "
            + shlex.quote(f"select count(*) from {self.settings.table}"),
        ]

    def upload(self, source: Path, name: str) -> None:
        """Upload `source` as object `name` (google-cloud-storage, anonymous)."""
        from taxi_pipeline.gcp.clients import storage_client

        storage_client(self.settings).bucket(self.settings.bucket).blob(name) \
            .upload_from_filename(str(source))

    def processes(self) -> list[tuple[str, subprocess.Popen[bytes], Path]]:
        """(name, process, log) of everything running, the emulators included."""
        found = [(m.name, m.process, m.log_path) for m in self.stack.processes]
        for name, emulator in (("Pub/Sub emulator", self.pubsub), ("fake-gcs-server", self.gcs),
                               ("BigQuery emulator", self.bigquery)):
            if emulator.process is not None:
                found.append((name, emulator.process, emulator.log_path))
        return found


@contextlib.contextmanager
def emulator_stack(settings: Settings, *, ui: bool = False,
                   preferred_ports: bool = False) -> Iterator[EmulatorStack]:
    """Start the emulators, set them up, start the LocalStack against them; stop all on exit.

    Fails at once, naming what to install, when an emulator is missing. While the
    block runs, os.environ points this process's Google clients at the emulators
    too. `preferred_ports`: the emulators' customary ports when free (for `up`).
    """
    from taxi_pipeline.gcp.clients import publisher_client
    from taxi_pipeline.gcp.setup import ensure_topic, setup

    settings = emulator_settings(settings)
    settings.validate_for_profile()
    require_emulators()
    project = settings.gcp_project

    def port(name: str) -> int:
        return free_port(PREFERRED_PORTS[name] if preferred_ports else None)

    log_dir = settings.home / "logs"
    gcs_root = settings.home / "emulator" / "gcs"
    # The BigQuery emulator starts empty: so does the bucket, or the two would disagree.
    shutil.rmtree(gcs_root, ignore_errors=True)
    with (
        pubsub_emulator(project, port=port("pubsub"),
                        log_path=log_dir / "pubsub-emulator.log") as pubsub,
        environ(pubsub.env),
    ):
        # fake-gcs-server drops its notifications when the topic is missing at its start.
        publisher = publisher_client(settings)
        ensure_topic(publisher, publisher.topic_path(project, settings.pubsub_topic))
        with (
            fake_gcs_server(gcs_root, pubsub.host_port, project, settings.pubsub_topic,
                            port=port("gcs"), log_path=log_dir / "fake-gcs-server.log") as gcs,
            bigquery_emulator(project, gcs_root, port=port("bigquery"),
                              grpc_port=port("bigquery-grpc"),
                              log_path=log_dir / "bigquery-emulator.log") as bigquery,
        ):
            env = {**pubsub.env, **gcs.env, **bigquery.env}
            with environ(env):
                lines = setup(settings)
                with LocalStack(settings, ui=ui, env=dict(env)) as stack:
                    yield EmulatorStack(settings, stack, pubsub, gcs, bigquery, lines)
