"""`TAXI_PROFILE=emulator taxi-pipeline up` without starting anything: missing emulators
are named with how to install them, and unset names get working defaults. The running
stack is tested end to end in test_e2e_emulator_up.py."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from taxi_pipeline.cli import main
from taxi_pipeline.settings import Settings, get_settings
from taxi_pipeline.stack import emulators
from taxi_pipeline.stack.emulator import DEFAULT_BUCKET, DEFAULT_PROJECT, emulator_settings


def never(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("started something although an emulator is missing")


@pytest.fixture
def emulator_profile(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("TAXI_PROFILE", "emulator")
    monkeypatch.delenv("TAXI_GCP_PROJECT", raising=False)
    monkeypatch.delenv("TAXI_BUCKET", raising=False)
    get_settings.cache_clear()
    monkeypatch.setattr("taxi_pipeline.stack.emulator.pubsub_emulator", never)
    monkeypatch.setattr("taxi_pipeline.cli.LocalStack", never)
    yield
    get_settings.cache_clear()


@pytest.mark.parametrize("command", ["up", "demo"])
def test_missing_emulator_binaries_name_the_install_script(
    command: str, emulator_profile: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(emulators, "fake_gcs_server_binary", lambda: None)
    monkeypatch.setattr(emulators, "bqemulator_executable",
                        lambda venv: venv / "bin" / "no-such-bqemulator")
    assert main([command]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: the emulator profile cannot start:")
    assert "fake-gcs-server binary not found" in err
    assert "bqemulator" in err
    assert "run scripts/install-emulators.sh" in err
    assert "Traceback" not in err


def test_a_missing_pubsub_emulator_names_the_gcloud_component(
    emulator_profile: None, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setattr(emulators, "pubsub_emulator_launcher", lambda: None)
    assert main(["up"]) == 1
    err = capsys.readouterr().err
    assert "Pub/Sub emulator component" in err
    assert "gcloud components install pubsub-emulator" in err


def test_unset_project_and_bucket_get_defaults_set_ones_stay() -> None:
    filled = emulator_settings(Settings(profile="emulator"))
    assert (filled.gcp_project, filled.bucket) == (DEFAULT_PROJECT, DEFAULT_BUCKET)
    filled.validate_for_profile()
    # Exported to every child (deploy, worker, bridge, flow runs) like any explicit setting.
    assert {"gcp_project", "bucket"} <= filled.model_fields_set
    mine = emulator_settings(Settings(profile="emulator", gcp_project="my-project-1",
                                      bucket="my-bucket"))
    assert (mine.gcp_project, mine.bucket) == ("my-project-1", "my-bucket")
