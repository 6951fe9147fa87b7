"""Settings are checked against Google's naming rules when a process starts, not at the
first load: `gcp setup`, `up`, `demo` (emulator profile), `python -m deploy` and the bridge
refuse bad GCP names at once, naming every bad variable, its rule and a valid example. No
server, emulator or client is started here."""

from __future__ import annotations

import types
from pathlib import Path

import pytest

from taxi_pipeline.cli import main
from taxi_pipeline.gcp import names as gcp_names
from taxi_pipeline.settings import Settings, SettingsError, get_settings


def use_env(monkeypatch: pytest.MonkeyPatch, **values: str) -> None:
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    get_settings.cache_clear()


def emulator_with_demo_project(monkeypatch: pytest.MonkeyPatch) -> None:
    """The README's old example."""
    use_env(monkeypatch, TAXI_PROFILE="emulator", TAXI_GCP_PROJECT="demo", TAXI_BUCKET="taxi")


def never(*_args: object, **_kwargs: object) -> None:
    raise AssertionError("reached past the settings check")


# -- the CLI -------------------------------------------------------------------------------


def test_gcp_setup_refuses_the_readme_demo_project_before_any_client(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator_with_demo_project(monkeypatch)
    import taxi_pipeline.gcp.setup

    monkeypatch.setattr(taxi_pipeline.gcp.setup, "setup", never)
    assert main(["gcp", "setup"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: profile 'emulator' cannot start")
    assert "TAXI_GCP_PROJECT='demo'" in err
    assert "6-30 characters" in err  # the rule
    assert "TAXI_GCP_PROJECT=my-project-123" in err  # what to set instead
    assert "TAXI_BUCKET" not in err  # 'taxi' is a fine bucket name
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["up", "demo"])
def test_up_and_demo_name_the_bad_project_too(
    command: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The emulator profile's `up` checks the names before it starts any emulator."""
    emulator_with_demo_project(monkeypatch)
    monkeypatch.setattr("taxi_pipeline.stack.emulator.require_emulators", never)
    monkeypatch.setattr("taxi_pipeline.stack.emulator.pubsub_emulator", never)
    monkeypatch.setattr("taxi_pipeline.cli.LocalStack", never)
    assert main([command]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: profile 'emulator' cannot start")
    assert "TAXI_GCP_PROJECT='demo'" in err
    assert "e.g. TAXI_GCP_PROJECT=my-project-123" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("command", ["up", "demo"])
def test_up_and_demo_refuse_the_gcp_profile(command: str,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    use_env(monkeypatch, TAXI_PROFILE="gcp", TAXI_GCP_PROJECT="demo", TAXI_BUCKET="taxi")
    monkeypatch.setattr("taxi_pipeline.cli.LocalStack", never)
    with pytest.raises(SystemExit) as exited:
        main([command])
    message = str(exited.value.code)
    assert f"`taxi-pipeline {command}` runs the local profile (the default) or " \
        "TAXI_PROFILE=emulator" in message
    assert "python -m deploy" in message
    assert "TAXI_GCP_PROJECT='demo'" in message  # the bad names too, while at it


def test_other_commands_check_the_settings_first(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    emulator_with_demo_project(monkeypatch)
    monkeypatch.setattr("taxi_pipeline.cli._with_api", never)
    for argv in (["reemit", "raw/x.parquet"], ["status", "raw/x.parquet"], ["reconcile"]):
        assert main(argv) == 1
        assert "TAXI_GCP_PROJECT='demo'" in capsys.readouterr().err


def test_the_readme_emulator_commands_have_valid_names() -> None:
    """The README starts the emulator profile with defaults for project and bucket."""
    from taxi_pipeline.stack.emulator import emulator_settings

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    lines = [line for line in readme.splitlines()
             if line.removeprefix("export ").startswith("TAXI_PROFILE=emulator ")]
    assert any("taxi-pipeline up" in line for line in lines)
    for line in lines:
        values = dict(part.split("=", 1) for part in line.split() if part.startswith("TAXI_"))
        settings = emulator_settings(Settings(
            profile="emulator", gcp_project=values.get("TAXI_GCP_PROJECT", ""),
            bucket=values.get("TAXI_BUCKET", "")))
        settings.validate_for_profile()


# -- deploy and the bridge -----------------------------------------------------------------


def test_deploy_main_refuses_bad_names_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import deploy

    use_env(monkeypatch, TAXI_PROFILE="gcp", TAXI_GCP_PROJECT="demo", TAXI_BUCKET="Bad_Bucket")
    monkeypatch.setattr(deploy, "deploy", never)
    with pytest.raises(SystemExit) as exited:
        deploy.main([])
    message = str(exited.value.code)
    assert message.startswith("error: profile 'gcp' cannot start")
    for expected in ("TAXI_GCP_PROJECT='demo'", "TAXI_BUCKET='Bad_Bucket'", "TAXI_IMAGE"):
        assert expected in message


def test_deploy_main_checks_only_the_names_it_is_given(monkeypatch: pytest.MonkeyPatch) -> None:
    """CI runs `python -m deploy --image` with TAXI_PROFILE=gcp alone: the flows read
    project and bucket from the cluster's ConfigMap, so unset names are not refused."""
    import deploy

    use_env(monkeypatch, TAXI_PROFILE="gcp")
    called: list[Settings] = []
    monkeypatch.setattr(deploy, "deploy", lambda settings, _template: called.append(settings))
    deploy.main(["--image", "europe-west4-docker.pkg.dev/acme/r/taxi-pipeline:1"])
    assert len(called) == 1
    with pytest.raises(SystemExit) as exited:
        deploy.main([])
    assert "TAXI_IMAGE is not set" in str(exited.value.code)
    assert "TAXI_GCP_PROJECT" not in str(exited.value.code)


def test_deploy_main_passes_valid_gcp_settings_on(monkeypatch: pytest.MonkeyPatch) -> None:
    import deploy

    use_env(monkeypatch, TAXI_PROFILE="gcp", TAXI_GCP_PROJECT="acme-data-prod",
            TAXI_BUCKET="acme-tlc-landing")
    called: list[Settings] = []
    monkeypatch.setattr(deploy, "deploy", lambda settings, _template: called.append(settings))
    deploy.main(["--image", "europe-west4-docker.pkg.dev/acme/r/taxi-pipeline:1"])
    assert [s.gcp_project for s in called] == ["acme-data-prod"]


def test_the_bridge_refuses_bad_names_before_it_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    import pubsub_bridge.__main__ as bridge_main

    use_env(monkeypatch, TAXI_PROFILE="emulator", TAXI_GCP_PROJECT="taxi-e2e",
            TAXI_BUCKET="taxi-e2e-bucket", TAXI_PUBSUB_SUBSCRIPTION="goog-bridge")
    monkeypatch.setattr(bridge_main, "_main", never)
    with pytest.raises(SystemExit) as exited:
        bridge_main.main()
    message = str(exited.value.code)
    assert message.startswith("error: ")
    assert "TAXI_PUBSUB_SUBSCRIPTION='goog-bridge'" in message
    assert "TAXI_GCP_PROJECT" not in message


def test_the_bridge_needs_a_project_but_no_bucket(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without TAXI_BUCKET the bridge relays notifications of every bucket."""
    import pubsub_bridge.__main__ as bridge_main

    use_env(monkeypatch, TAXI_PROFILE="gcp")
    monkeypatch.setattr(bridge_main, "_main", never)
    with pytest.raises(SystemExit) as exited:
        bridge_main.main()
    assert "TAXI_GCP_PROJECT is not set" in str(exited.value.code)
    assert "TAXI_BUCKET" not in str(exited.value.code)

    use_env(monkeypatch, TAXI_GCP_PROJECT="taxi-e2e")
    started: list[bool] = []

    async def run() -> None:
        started.append(True)

    monkeypatch.setattr(bridge_main, "_main", run)
    monkeypatch.setattr("logging.basicConfig", lambda **_: None)
    bridge_main.main()
    assert started == [True]


def test_gcp_setup_itself_checks_before_building_clients(monkeypatch: pytest.MonkeyPatch) -> None:
    from taxi_pipeline.gcp import clients as gcp_clients
    from taxi_pipeline.gcp import setup as gcp_setup

    monkeypatch.setattr(gcp_clients, "storage_client", never)
    with pytest.raises(SettingsError, match="TAXI_GCP_PROJECT='demo'"):
        gcp_setup.setup(Settings(profile="emulator", gcp_project="demo", bucket="taxi"))


# -- Settings.validate_for_profile ---------------------------------------------------------


def test_every_bad_value_is_reported_in_one_error() -> None:
    settings = Settings(
        profile="gcp", gcp_project="demo", bucket="My_Bucket", bq_dataset="my-dataset",
        table="trips; drop", pubsub_topic="goog-objects", pubsub_subscription="x",
        pubsub_dead_letter_topic="9-dead-letter",
    )
    with pytest.raises(SettingsError) as raised:
        settings.validate_for_profile()
    message = str(raised.value)
    bad = {
        "TAXI_GCP_PROJECT": "demo", "TAXI_BUCKET": "My_Bucket", "TAXI_BQ_DATASET": "my-dataset",
        "TAXI_TABLE": "trips; drop", "TAXI_PUBSUB_TOPIC": "goog-objects",
        "TAXI_PUBSUB_SUBSCRIPTION": "x", "TAXI_PUBSUB_DEAD_LETTER_TOPIC": "9-dead-letter",
    }
    lines = [line for line in message.splitlines() if line.startswith("  - ")]
    assert len(lines) == len(bad)
    for (variable, value), line in zip(bad.items(), lines, strict=True):
        assert line.startswith(f"  - {variable}={value!r} is not a valid ")
        assert f"; e.g. {variable}=" in line  # an example of a valid value
    assert "TAXI_SETTINGS_FILE" in message  # where to fix it
    assert settings.gcp_name_problems() == [line.removeprefix("  - ") for line in lines]


def test_examples_in_the_message_are_valid_themselves() -> None:
    settings = Settings(profile="gcp", gcp_project="demo", bucket="", bq_dataset="a-b",
                        table="-t", pubsub_topic="t", pubsub_subscription="s",
                        pubsub_dead_letter_topic="d")
    for line in settings.gcp_name_problems():
        example = line.rsplit("; e.g. ", 1)[1]
        name, value = example.split("=", 1)
        field = name.removeprefix("TAXI_").lower()
        assert Settings(profile="gcp", **{"gcp_project": "my-project-123", "bucket": "b-b-b",
                                          field: value}).gcp_name_problems() == []


def test_missing_values_are_named_with_the_rest() -> None:
    settings = Settings(profile="emulator", bucket="", gcp_project="", pubsub_topic="ab")
    problems = settings.gcp_name_problems()
    assert [p.split(" ", 1)[0] for p in problems] == [
        "TAXI_GCP_PROJECT", "TAXI_BUCKET", "TAXI_PUBSUB_TOPIC='ab'"]
    assert problems[0].startswith("TAXI_GCP_PROJECT is not set: profile 'emulator' needs")


def test_a_dead_letter_topic_too_long_for_its_subscription_is_refused() -> None:
    topic = "d" * 252  # a valid topic id, but "-sub" makes a 256-character subscription
    assert gcp_names.PUBSUB_TOPIC.is_valid(topic)
    (problem,) = Settings(profile="gcp", gcp_project="my-project-123", bucket="b-b-b",
                          pubsub_dead_letter_topic=topic).gcp_name_problems()
    assert problem.startswith("TAXI_PUBSUB_DEAD_LETTER_TOPIC=") and "-sub" in problem


# Every project id and bucket the repo's tests, benchmarks, manifests and README use.
VALID_PROJECTS = ["taxi-e2e", "test-project", "taxi-test", "taxi-setup", "taxi-project",
                  "prod-project", "acme-data-prod", "acme-data", "taxi-demo", "taxi-latency",
                  "taxi-bench", "my-project", "my-project-123", "example.com:my-project"]
VALID_BUCKETS = ["taxi", "taxi-lake", "taxi-bridge", "taxi-bucket", "taxi-gcs-store",
                 "taxi-e2e-bucket", "acme-tlc-landing", "acme-landing", "fresh-bucket",
                 "bench-bucket", "taxi-latency-bucket", "my-bucket", "other-bucket",
                 "someone-else", "elsewhere"]


@pytest.mark.parametrize("profile", ["emulator", "gcp"])
@pytest.mark.parametrize("project", VALID_PROJECTS)
def test_project_ids_used_across_the_repo_pass(profile: str, project: str) -> None:
    Settings(profile=profile, gcp_project=project, bucket="taxi").validate_for_profile()


@pytest.mark.parametrize("bucket", VALID_BUCKETS)
def test_buckets_used_across_the_repo_pass(bucket: str) -> None:
    Settings(profile="gcp", gcp_project="taxi-e2e", bucket=bucket).validate_for_profile()


def test_the_repos_own_pubsub_names_pass() -> None:
    for name in ("taxi-objects", "taxi-objects-bridge", "taxi-objects-dead-letter",
                 "bench-topic", "bench-sub", "fresh-objects", "fresh-bridge",
                 "fresh-dead-letter", "taxi-objects-bridge-notifications_become_stored_events"):
        assert gcp_names.PUBSUB_TOPIC.is_valid(name), name
        assert gcp_names.PUBSUB_SUBSCRIPTION.is_valid(name), name


def test_the_local_profile_is_not_affected(monkeypatch: pytest.MonkeyPatch) -> None:
    local = Settings(profile="local", gcp_project="demo", table="not a bigquery name",
                     pubsub_topic="")
    assert local.gcp_name_problems() == []
    local.validate_for_profile()
    use_env(monkeypatch, TAXI_GCP_PROJECT="demo", TAXI_BUCKET="/any/dir/Bucket_Name")
    assert get_settings().profile == "local"
    get_settings().validate_for_profile()
    with pytest.raises(SystemExit, match="needs TAXI_PROFILE=gcp"):
        main(["gcp", "setup"])


# -- the rules -----------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "valid"), [
    ("abcdef", True), ("a" * 30, True), ("a1-2-3", True), ("demo", False), ("abcde", False),
    ("a" * 31, False), ("my-project-", False), ("1project", False), ("My-Project", False),
    ("my_project", False), ("example.com:my-project", True), ("", False),
])
def test_project_id_rule(value: str, valid: bool) -> None:
    assert gcp_names.PROJECT_ID.is_valid(value) is valid


@pytest.mark.parametrize(("value", "valid"), [
    ("abc", True), ("a" * 63, True), ("a_b-c.d", True), ("1bucket", True),
    (".".join(["a" * 63] * 3) + "." + "a" * 30, True),  # 222 characters with dots
    (".".join(["a" * 63] * 3) + "." + "a" * 31, False),  # 223
    ("ab", False), ("a" * 64, False), ("Bucket", False), ("-bucket", False), ("bucket-", False),
    ("b" * 64 + ".com", False), ("a" * 223, False), ("192.168.5.4", False),
    ("goog-bucket", False), ("my-google-bucket", False), ("my-g00gle-bucket", False),
    ("my bucket", False),
])
def test_bucket_rule(value: str, valid: bool) -> None:
    assert gcp_names.BUCKET.is_valid(value) is valid


@pytest.mark.parametrize(("value", "valid"), [
    ("abc", True), ("A.b_c~d+e%f-g", True), ("a" * 255, True), ("ab", False),
    ("a" * 256, False), ("1topic", False), ("goog-topic", False), ("to/pic", False),
])
def test_pubsub_id_rule(value: str, valid: bool) -> None:
    assert gcp_names.PUBSUB_TOPIC.is_valid(value) is valid
    assert gcp_names.PUBSUB_SUBSCRIPTION.is_valid(value) is valid


@pytest.mark.parametrize(("rule", "value", "valid"), [
    (gcp_names.DATASET, "taxi_2024", True), (gcp_names.DATASET, "taxi-2024", False),
    (gcp_names.TABLE, "trips-2024", True), (gcp_names.TABLE, "trips`; --", False),
    (gcp_names.COLUMN, "_col1", True), (gcp_names.COLUMN, "1col", False),
])
def test_bigquery_rules(rule: gcp_names.NameRule, value: str, valid: bool) -> None:
    assert rule.is_valid(value) is valid


def test_check_names_the_rule_and_an_example() -> None:
    with pytest.raises(ValueError, match=r"invalid GCP project id 'demo': .*6-30.*my-project"):
        gcp_names.PROJECT_ID.check("demo")
    assert gcp_names.PROJECT_ID.check("taxi-demo") == "taxi-demo"


def test_the_warehouse_uses_the_same_rules() -> None:
    from taxi_pipeline.warehouse import bigquery_warehouse
    from taxi_pipeline.warehouse.bigquery_warehouse import BigQueryWarehouse

    assert not [name for name, value in vars(bigquery_warehouse).items()
                if hasattr(value, "fullmatch")]  # no patterns of its own
    client = types.SimpleNamespace(project="demo")
    with pytest.raises(ValueError, match="invalid GCP project id 'demo'"):
        BigQueryWarehouse(client, "taxi", "US")  # type: ignore[arg-type]
    ok = BigQueryWarehouse(types.SimpleNamespace(project="taxi-demo"),  # type: ignore[arg-type]
                           "taxi", "US")
    assert ok.table_uri("trips") == "bigquery://taxi-demo.taxi.trips"
