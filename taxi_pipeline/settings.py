"""One settings object for every process (CLI, bridge, flows, deploy).

Values come from `TAXI_*` environment variables, then from a settings file
(`TAXI_SETTINGS_FILE`, default `taxi-pipeline.env` in the working directory),
then from the defaults below, which give the embedded `local` profile.
"""

from __future__ import annotations

import os
from collections.abc import Collection, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from taxi_pipeline.gcp import names as gcp_names

Profile = Literal["local", "emulator", "gcp"]

# The names the emulator and gcp profiles hand to Google, and the rule of each.
GCP_NAME_SETTINGS: dict[str, gcp_names.NameRule] = {
    "gcp_project": gcp_names.PROJECT_ID,
    "bucket": gcp_names.BUCKET,
    "bq_dataset": gcp_names.DATASET,
    "table": gcp_names.TABLE,
    "pubsub_topic": gcp_names.PUBSUB_TOPIC,
    "pubsub_subscription": gcp_names.PUBSUB_SUBSCRIPTION,
    "pubsub_dead_letter_topic": gcp_names.PUBSUB_TOPIC,
}
# `gcp setup` names the dead-letter topic's subscription after the topic.
DEAD_LETTER_SUBSCRIPTION_SUFFIX = "-sub"


class SettingsError(RuntimeError):
    """Settings a profile cannot run with; the message names each variable and the fix."""


def variable(name: str) -> str:
    """The environment variable of a settings field."""
    return f"TAXI_{name.upper()}"


def _default_home() -> Path:
    return Path.home() / ".taxi-pipeline"


class Settings(BaseSettings):
    """Everything that differs between a laptop, the emulators and production."""

    model_config = SettingsConfigDict(
        env_prefix="TAXI_",
        env_file=os.environ.get("TAXI_SETTINGS_FILE", "taxi-pipeline.env"),
        env_file_encoding="utf-8",
        extra="ignore",
    )

    profile: Profile = "local"
    home: Path = Field(
        default_factory=_default_home,
        description="Working directory of the local profile: bucket, warehouse, Prefect data.",
    )

    # -- objects ---------------------------------------------------------------
    bucket: str = Field(
        default="",
        description="GCS bucket name (emulator/gcp) or bucket directory (local; "
        "default HOME/bucket).",
    )
    raw_prefix: str = "raw/"
    processed_prefix: str = "processed/"
    rejects_prefix: str = "rejects/"
    quarantine_prefix: str = "quarantine/"
    allow_duplicate_content: bool = Field(
        default=False,
        description="Load a raw object even when an earlier raw object holds the same bytes "
        "(by default the copy is skipped with a pipeline.object.duplicate_content event, so a "
        "file dropped at two paths does not load its rows twice).",
    )

    # -- GCP / emulators ---------------------------------------------------------
    gcp_credentials_block: str = Field(
        default="",
        description="Name of a prefect-gcp GcpCredentials block; empty = Application Default "
        "Credentials (Workload Identity on GKE). The emulator profile is anonymous.",
    )
    pubsub_topic: str = "taxi-objects"
    pubsub_subscription: str = "taxi-objects-bridge"
    pubsub_dead_letter_topic: str = "taxi-objects-dead-letter"
    pubsub_max_messages: int = Field(default=500, ge=1, description="Flow control: messages")
    pubsub_max_bytes: int = Field(default=50 * 2**20, ge=1024, description="Flow control: bytes")
    pubsub_max_delivery_attempts: int = Field(default=10, ge=5, le=100)
    pubsub_ack_deadline_seconds: int = Field(default=60, ge=10, le=600)
    pubsub_max_hold_seconds: float = Field(
        default=7 * 24 * 3600, ge=10,
        description="How long the bridge holds (keeps extending the lease of) a message whose "
        "event the Prefect server has not stored, e.g. during an outage; set it to the "
        "subscription's message retention (Pub/Sub's default: 7 days), after which Pub/Sub "
        "drops the message anyway. Held messages are never nacked for their age.",
    )
    bridge_port: int = Field(default=8080, description="Bridge /healthz and /metrics port")
    bridge_confirm_seconds: float = Field(
        default=30.0, description="Re-emit an event not confirmed as stored after this long"
    )

    # -- monitoring (taxi_pipeline/monitoring, docs/monitoring.md) -----------------
    monitor_port: int = Field(default=9464, description="Pipeline exporter /metrics port")
    monitor_lookback_hours: float = Field(
        default=24.0, ge=0,
        description="On start the exporter rebuilds its state (landings awaiting their load, "
        "runs in progress) from this many hours of stored events; counters restart at 0.",
    )
    monitor_scan_seconds: float = Field(
        default=60.0, gt=0,
        description="How often the exporter lists raw/ and reads the load log for the "
        "stalled and oldest-unloaded gauges (one listing and one load-log query per scan).",
    )
    monitor_max_tracked: int = Field(
        default=50_000, ge=100,
        description="Cap on each piece of the exporter's state (event ids, landings, runs); "
        "the oldest entries go first, so memory stays bounded.",
    )
    monitor_max_label_values: int = Field(
        default=32, ge=1,
        description="Distinct datasets (and reject or quarantine reasons) the exporter "
        "labels; later ones are labelled `other`, so the series count stays bounded.",
    )

    # -- local directory source --------------------------------------------------
    settle_seconds: float = Field(
        default=1.0,
        description="A file must keep the same size and mtime this long before it is emitted; "
        "a .parquet file must also have its footer, and a file without one is never emitted "
        "while a process holds it open for writing (seen in /proc on Linux).",
    )
    stall_seconds: float = Field(
        default=120.0,
        description="A .parquet file without its footer is emitted anyway (and quarantined as "
        "truncated) once it has been unchanged this long and no process the bridge can see "
        "holds it open for writing. Only writers the bridge cannot see rely on this timer: a "
        "writer on another host of a network mount, another user's process, a writer that "
        "closes and reopens the file between chunks, or any writer where /proc is unreadable. "
        "Longer is safer for those; it only delays the answer for a truly truncated file.",
    )
    poll_seconds: float = 0.5

    # -- warehouse ---------------------------------------------------------------
    warehouse_path: Path | None = Field(
        default=None,
        description="DuckDB file of the local profile (default HOME/warehouse.duckdb).",
    )
    table: str = "trips"
    gcp_project: str = ""
    bq_dataset: str = "taxi"
    bq_location: str = "US"
    bq_max_bytes_billed: int = Field(
        default=100 * 2**30, ge=10 * 2**20,
        description="Cap on the bytes one BigQuery statement of the load may bill "
        "(maximum_bytes_billed); a load reads about one month of the table, a few GB, so "
        "the default only stops a statement that went wrong. BigQuery bills at least 10 MiB.",
    )
    bq_dml_retry_seconds: float = Field(
        default=600.0, ge=0,
        description="How long a load keeps re-running a statement BigQuery refused because "
        "other DML held the table ('Could not serialize access ... due to concurrent update', "
        "'Too many DML statements outstanding'), with backoff and jitter.",
    )

    # -- orchestration -----------------------------------------------------------
    prefect_database: Literal["postgres", "sqlite"] = Field(
        default="postgres",
        description="Database of the Prefect server `up`/`demo` start: an embedded PostgreSQL "
        "(HOME/prefect/postgres) or, as a fallback, SQLite (locks under bursts).",
    )
    postgres_system_user: str = Field(
        default="embedded_postgres", pattern=r"^[a-z_][a-z0-9_-]{0,30}$",
        description="System user the embedded PostgreSQL runs as when `up` runs as root "
        "(PostgreSQL refuses root); created on first use.",
    )
    work_pool: str = ""
    worker_limit: int = Field(
        default=8, ge=1,
        description="Flow runs the local worker runs at once (each takes ~100 MB); more wait "
        "in the queue.",
    )
    restart_limit: int = Field(
        default=5, ge=0,
        description="Restarts of one crashed part (server, worker, bridge, fork server, "
        "PostgreSQL) `up` makes within TAXI_RESTART_WINDOW_SECONDS; one more crash and it "
        "stops everything and exits 1 (0: never restart).",
    )
    restart_window_seconds: float = Field(
        default=300.0, gt=0, description="The window TAXI_RESTART_LIMIT counts crashes in.")
    restart_backoff_seconds: float = Field(
        default=1.0, ge=0,
        description="Wait before the first restart of a part; doubles with each crash in "
        "the window, at most 30 s.",
    )
    warm_runs: bool = Field(
        default=True,
        description="`up`/`demo` start flow runs from a warm fork server (process pool) "
        "instead of a new Python process each.",
    )
    warm_runs_socket: str = Field(
        default="",
        description="Set by `up` for `deploy`: the fork server's socket, which the process "
        "pool's command then uses.",
    )
    transform_deployment: str = "transform"
    load_deployment: str = "load"
    image: str = Field(default="", description="Flow image for the kubernetes work pool.")

    # -- download ----------------------------------------------------------------
    tlc_base_url: str = Field(
        default="https://d37ci6vzurychx.cloudfront.net/trip-data",
        description="Where TLC publishes monthly files (<dataset>_tripdata_<YYYY-MM>.parquet).",
    )
    download_datasets: list[str] = Field(
        default=["yellow", "green"], description="Datasets the scheduled download fetches: "
        "any of yellow, green, fhv, fhvhv (fhvhv is ~0.5 GB a month).")
    download_source: Literal["tlc", "mirror"] = Field(
        default="tlc", description="tlc: TLC's parquet files (TAXI_TLC_BASE_URL); mirror: "
        "the CSV.gz mirror of 2019-2021 most course material uses (TAXI_TLC_MIRROR_URL).")
    tlc_mirror_url: str = Field(
        default="https://github.com/DataTalksClub/nyc-tlc-data/releases/download",
        description="The CSV.gz mirror's release URL: <url>/<dataset>/<dataset>_tripdata_"
        "<YYYY-MM>.csv.gz.")
    download_cron: str = Field(
        default="0 6 * * *",
        description="Download schedule; daily, because TLC's publication day varies and "
        "months already in the bucket are skipped.",
    )
    download_lag_months: int = Field(
        default=2, ge=0, description="TLC publishes a month about two months after it ends."
    )
    download_attempts: int = Field(
        default=4, ge=1,
        description="Tries per month (download and backfill) when TLC answers 5xx or 429, the "
        "connection fails or the body arrives truncated; an error page or a 4xx is not retried.",
    )
    download_retry_seconds: float = Field(
        default=2.0, ge=0,
        description="Wait before the second try; it doubles for each further try (at most 60 s).",
    )
    download_timeout_seconds: float = Field(
        default=60.0, gt=0,
        description="Connect/read timeout of one download request (per read, not per file).",
    )
    backfill_concurrency: int = Field(
        default=4, ge=1, le=32, description="Months `backfill` downloads at once.",
    )

    # -- recovery ----------------------------------------------------------------
    reconcile_every_minutes: float = Field(
        default=2.0, gt=0,
        description="Schedule of the reconcile deployment (every profile).",
    )
    reconcile_after_minutes: float = Field(
        default=3.0, ge=0,
        description="Reconcile re-emits an object only when it landed, and was last emitted, "
        "at least this long ago (younger ones are probably still in flight).",
    )
    recovery_max_attempts: int = Field(
        default=3, ge=1,
        description="Automatic re-runs of one object generation after failed or crashed runs "
        "and failed automation actions; then a person is told.",
    )
    alert_block: str = Field(
        default="",
        description="Prefect notification block (`<block-type-slug>/<name>`, e.g. "
        "slack-webhook/taxi-alerts) the alert automations send through; empty = the alert "
        "automations still exist and fire, but only their events record it.",
    )
    alert_no_data_hours: float = Field(
        default=24.0, ge=0,
        description="Alert when no raw object has landed for this many hours "
        "(a proactive automation); 0 = no such alert.",
    )

    task_retry_delays: list[float] = Field(
        default=[2.0, 10.0, 30.0], max_length=10,
        description="Waits (seconds) before each retry of a transform or load step that "
        "failed on a transient error (storage, warehouse, API); one retry per wait. "
        "JSON list, e.g. TAXI_TASK_RETRY_DELAYS='[2, 10, 30]'.",
    )

    # -- transform ---------------------------------------------------------------
    batch_rows: int = Field(
        default=32_768, ge=1_024, description="Rows per streamed batch (bounds memory; "
        "32768 keeps the transform of a 3M-row month at ~0.3x the pandas path's peak with "
        "16 MiB row groups, see docs/benchmarks.md)."
    )
    zones_file: Path | None = Field(
        default=None, description="TLC's taxi_zone_lookup.csv (LocationID,Borough,Zone,"
        "service_zone) for the `zones` table and the transform's unknown_location rule; "
        "default: the copy that ships with the package (265 zones).",
    )

    @model_validator(mode="after")
    def _fill_profile_defaults(self) -> Settings:
        self.home = self.home.expanduser().resolve()
        if self.profile == "local" and not self.bucket:
            self.bucket = str(self.home / "bucket")
        if self.warehouse_path is None:
            self.warehouse_path = self.home / "warehouse.duckdb"
        if not self.work_pool:
            self.work_pool = "taxi-kubernetes" if self.profile == "gcp" else "taxi-process"
        for name in ("raw_prefix", "processed_prefix", "rejects_prefix", "quarantine_prefix"):
            value = getattr(self, name)
            if not value.endswith("/"):
                setattr(self, name, value + "/")
        return self

    @property
    def stage_prefixes(self) -> dict[str, str]:
        """`pipeline.stage` label -> object prefix; anything else is stage `other`."""
        from taxi_pipeline.events import STAGE_PROCESSED, STAGE_RAW

        return {STAGE_RAW: self.raw_prefix, STAGE_PROCESSED: self.processed_prefix}

    @property
    def bucket_dir(self) -> Path:
        """The directory standing in for the bucket in the local profile."""
        return Path(self.bucket).expanduser().resolve()

    @property
    def warehouse_file(self) -> Path:
        assert self.warehouse_path is not None  # filled by the validator
        return self.warehouse_path

    def require(self, *names: str) -> None:
        """Fail early, naming the variables to set, when a profile lacks a value."""
        missing = [n for n in names if not getattr(self, n)]
        if missing:
            variables = ", ".join(variable(n) for n in missing)
            raise SettingsError(
                f"profile {self.profile!r} needs {variables}: set them in the environment "
                f"or in the settings file (TAXI_SETTINGS_FILE)."
            )

    def gcp_name_problems(self, *, optional: Collection[str] = ()) -> list[str]:
        """One line per GCP name the profile cannot use (none for `local`).

        Each line names the variable, its value, the rule and a valid example.
        `optional`: fields that may be unset (checked only when set).
        """
        if self.profile == "local":
            return []
        problems = []
        for name, rule in GCP_NAME_SETTINGS.items():
            value: str = getattr(self, name)
            default = type(self).model_fields[name].default
            example = f"{variable(name)}={default or rule.example}"
            if not value:
                if name in optional:
                    continue
                problems.append(f"{variable(name)} is not set: profile {self.profile!r} "
                                f"needs a {rule.what} ({rule.rule}); e.g. {example}")
                continue
            problem = rule.problem(value)
            if problem is None and name == "pubsub_dead_letter_topic":
                problem = gcp_names.PUBSUB_SUBSCRIPTION.problem(
                    value + DEAD_LETTER_SUBSCRIPTION_SUFFIX)
                if problem is not None:
                    problem = (f"its subscription {value}{DEAD_LETTER_SUBSCRIPTION_SUFFIX} "
                               f"breaks the rule: {problem}")
            if problem is not None:
                problems.append(f"{variable(name)}={value!r} is not a valid {rule.what}: "
                                f"{problem}; e.g. {example}")
        return problems

    def validate_for_profile(self, also: Sequence[str] = (), *,
                             optional: Collection[str] = ()) -> None:
        """Raise SettingsError listing every GCP name the emulator or gcp profile
        cannot use, so a bad value fails at start rather than at the first load.

        `also`: problems the caller found besides the names, reported in the same error.
        `optional`: fields this process can do without, checked only when set (e.g.
        `python -m deploy` uses none of the names: on GKE the flows read theirs from
        the cluster's ConfigMap).
        """
        problems = [*self.gcp_name_problems(optional=optional), *also]
        if problems:
            lines = "\n".join(f"  - {problem}" for problem in problems)
            raise SettingsError(
                f"profile {self.profile!r} cannot start with these settings:\n{lines}\n"
                "Fix them in the environment or in the settings file (TAXI_SETTINGS_FILE, "
                "default taxi-pipeline.env), then run the command again."
            )


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings; tests call `get_settings.cache_clear()` after changing env."""
    return Settings()
