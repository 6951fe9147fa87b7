"""The emulator launchers live in the product (`taxi_pipeline.stack.emulators`); re-exported here
for the tests and benchmarks that import them from `support.emulators`."""

from taxi_pipeline.stack.emulators import (
    BigQueryEmulator,
    EmulatorStartError,
    FakeGcsServer,
    PubSubEmulator,
    bigquery_emulator,
    emulators_available,
    fake_gcs_server,
    free_port,
    pubsub_emulator,
    run_server,
    stop_group,
)

__all__ = [
    "BigQueryEmulator",
    "EmulatorStartError",
    "FakeGcsServer",
    "PubSubEmulator",
    "bigquery_emulator",
    "emulators_available",
    "fake_gcs_server",
    "free_port",
    "pubsub_emulator",
    "run_server",
    "stop_group",
]
