"""Alert rules and the dashboard as code: promtool checks and unit-tests the rules, every
alert has a firing and a not-firing case (proved by breaking each alert both ways),
the GKE resources carry the same rules, and every metric a dashboard panel queries
is one the exporter or the bridge exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.k8s import REPO, find, render
from support.prometheus import binary

from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline.monitoring.pipeline_metrics import PipelineMetrics, PipelineModel

MONITORING = REPO / "k8s" / "overlays" / "gke" / "monitoring"
RULES = MONITORING / "alerts.rules.yml"
TESTS = MONITORING / "alerts.test.yml"
DASHBOARD = MONITORING / "dashboard.json"


def promtool(*args: str, cwd: Path = MONITORING) -> subprocess.CompletedProcess[str]:
    return subprocess.run([binary("promtool"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=120)


def alerts(groups: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def plain_groups() -> list[dict[str, Any]]:
    return list(yaml.safe_load(RULES.read_text())["groups"])


def test_promtool_checks_the_rules() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alerts(plain_groups()))} rules found" in result.stdout


def test_promtool_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(TESTS))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_the_issue_s_alerts_are_all_there() -> None:
    assert set(alerts(plain_groups())) == {
        "TaxiObjectStalled", "TaxiNoRawObject", "TaxiFailureRate", "TaxiPubSubMessageHeld",
        "TaxiDeadLetters", "TaxiExporterDown", "TaxiExporterNotFollowing", "TaxiBridgeDown"}


@pytest.mark.parametrize("alert", sorted(alerts(plain_groups())))
@pytest.mark.parametrize("broken", ["never fires", "always fires"])
def test_each_alert_has_a_firing_and_a_not_firing_case(alert: str, broken: str,
                                                       tmp_path: Path) -> None:
    """Replace one alert's expression by one that never (always) fires: the unit tests
    must fail, so they hold a case where it fires (does not fire)."""
    groups = plain_groups()
    alerts(groups)[alert]["expr"] = "vector(1) == 0" if broken == "never fires" else "vector(1)"
    (tmp_path / "alerts.rules.yml").write_text(yaml.safe_dump({"groups": groups}))
    shutil.copy(TESTS, tmp_path / "alerts.test.yml")
    result = promtool("test", "rules", "alerts.test.yml", cwd=tmp_path)
    assert result.returncode != 0, f"{alert} {broken}: promtool test rules still passed"
    assert alert in result.stdout + result.stderr


def test_the_gke_resources_carry_the_same_rules() -> None:
    docs = render(REPO / "k8s" / "overlays" / "gke")
    rules = find(docs, "Rules", "taxi-pipeline")
    assert rules["apiVersion"] == "monitoring.googleapis.com/v1"
    global_rules = yaml.safe_load((MONITORING / "global-rules.yaml").read_text())
    assert global_rules["kind"] == "GlobalRules"
    assert rules["spec"]["groups"] + global_rules["spec"]["groups"] == plain_groups()
    # Only Cloud Monitoring metrics (no namespace label) go into the GlobalRules.
    for rule in alerts(global_rules["spec"]["groups"]).values():
        assert "pubsub_googleapis_com:" in rule["expr"]
    for rule in alerts(rules["spec"]["groups"]).values():
        assert "googleapis_com:" not in rule["expr"]


# -- the dashboard ------------------------------------------------------------------

# Series Prometheus itself makes for every target.
PROMETHEUS_SERIES = {"up"}
_KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "and", "or",
             "unless", "bool", "offset", "le", "inf", "nan"}


def metric_names(expr: str) -> set[str]:
    """The series names a PromQL expression selects (not functions, labels, keywords)."""
    expr = re.sub(r'"(?:\\.|[^"\\])*"', '""', expr)           # string literals
    expr = re.sub(r"\{[^}]*\}", "", expr)                     # label matchers
    expr = re.sub(r"\b(by|without|on|ignoring)\s*\([^)]*\)", "", expr)  # grouping labels
    expr = re.sub(r"\[[^\]]*\]", "", expr)                    # range selectors
    names = set()
    for match in re.finditer(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
        rest = expr[match.end():].lstrip()
        if rest.startswith("(") or match.group().lower() in _KEYWORDS:
            continue
        names.add(match.group())
    return names


def exported_series() -> set[str]:
    """Every series name the exporter's and the bridge's registries can expose."""
    names: set[str] = set()
    registries = [BridgeMetrics().registry]
    pipeline = PipelineMetrics()
    PipelineModel(pipeline)  # registers the scrape-time gauges
    registries.append(pipeline.registry)
    suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"],
                "gauge": [""]}
    for registry in registries:
        for family in registry.collect():
            names.update(family.name + s for s in suffixes.get(family.type, [""]))
    return names


def panel_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    return [target["expr"] for panel in dashboard["panels"] for target in panel["targets"]]


def test_metric_names_are_found_in_promql() -> None:
    assert metric_names('histogram_quantile(0.95, sum by (le) (rate('
                        'taxi_pipeline_drop_to_queryable_seconds_bucket{dataset="x"}[1h])))'
                        ) == {"taxi_pipeline_drop_to_queryable_seconds_bucket"}
    assert metric_names('up{job=~"a|b"} and max(bridge_oldest_held_seconds) > 30 * 60'
                        ) == {"up", "bridge_oldest_held_seconds"}


def test_every_panel_queries_an_exported_metric() -> None:
    exported = exported_series() | PROMETHEUS_SERIES
    queried = set().union(*(metric_names(e) for e in panel_exprs()))
    assert queried, "the dashboard queries nothing"
    assert queried <= exported, f"not exported: {sorted(queried - exported)}"
    # A misspelt metric would be caught.
    assert not metric_names("sum(taxi_pipeline_rows_loadded_total)") <= exported


def test_the_dashboard_answers_the_issue_s_questions() -> None:
    queried = set().union(*(metric_names(e) for e in panel_exprs()))
    for needed in ("taxi_pipeline_objects_total", "taxi_pipeline_rows_loaded_total",
                   "taxi_pipeline_rows_rejected_total",
                   "taxi_pipeline_drop_to_queryable_seconds_bucket",
                   "taxi_pipeline_stalled_objects", "taxi_pipeline_oldest_stalled_seconds",
                   "taxi_pipeline_oldest_unloaded_seconds", "bridge_oldest_held_seconds"):
        assert needed in queried, needed


def test_the_dashboard_configmap_holds_the_dashboard() -> None:
    docs = render(REPO / "k8s" / "overlays" / "gke")
    config = find(docs, "ConfigMap", "taxi-pipeline-dashboard")
    assert config["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(config["data"]["taxi-pipeline.json"]) == json.loads(DASHBOARD.read_text())


def test_the_pod_monitorings_scrape_the_exporters_metrics_ports() -> None:
    docs = render(REPO / "k8s" / "overlays" / "gke")
    for name, port in (("taxi-exporter", 9464), ("prefect-exporter", 8000)):
        monitoring = find(docs, "PodMonitoring", name)
        deployment = find(docs, "Deployment", name)
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert monitoring["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert labels["taxi-pipeline/workload"] == name
        ports = {p["name"]: p["containerPort"]
                 for c in deployment["spec"]["template"]["spec"]["containers"]
                 for p in c["ports"]}
        assert [e["port"] for e in monitoring["spec"]["endpoints"]] == ["http"]
        assert ports["http"] == port
    assert find(docs, "Deployment", "taxi-exporter")["spec"]["replicas"] == 1
