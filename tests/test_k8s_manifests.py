"""The Kubernetes manifests (k8s/): they render, validate against the Kubernetes
schemas, pass checkov, and meet what this pipeline needs in production.

No cluster runs here: everything is checked on the output of `kubectl kustomize`.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
from support.k8s import (
    BASE,
    JOB_TEMPLATE,
    NAMESPACE,
    OVERLAYS,
    REPO,
    containers,
    find,
    lint_tool,
    pod_labels,
    pod_spec,
    render,
    render_flow_run_job,
    validate_schemas,
    write_yaml,
)

from taxi_pipeline.settings import Settings

# Kinds without a bundled schema (CRDs) that an overlay may use on purpose.
CRD_KINDS = {("monitoring.googleapis.com/v1", "PodMonitoring"),
             ("monitoring.googleapis.com/v1", "Rules")}

# checkov findings accepted everywhere, each for a reason. Resource-specific
# exceptions are annotated on the resource itself (checkov.io/skip1).
CHECKOV_SKIPS = {
    "CKV_K8S_43": "Image should use digest: the manifests pin exact tags; the deploy "
                  "workflow rolls the pipeline image out by digest (kubectl set image "
                  "...@sha256:...), and k8s/README.md says to pin params.yaml's IMAGE by "
                  "digest. Digests of the postgres/redis tags depend on the mirror used.",
    "CKV_K8S_35": "Secrets as files instead of environment variables: Prefect reads its "
                  "settings (PREFECT_API_AUTH_STRING, PREFECT_API_DATABASE_CONNECTION_URL) "
                  "only from the environment. PostgreSQL, which can, reads its password "
                  "from a file.",
}
# The Dockerfile: Kubernetes probes own health (issue 6: HEALTHCHECK-free image).
CHECKOV_DOCKERFILE_SKIPS = {
    "CKV_DOCKER_2": "HEALTHCHECK: Kubernetes ignores it; readiness and liveness probes in "
                    "k8s/base own health, and each process has its own health endpoint.",
}

SECRET_NAME = re.compile(r"PASSWORD|SECRET|TOKEN|AUTH_STRING|API_KEY|CREDENTIAL|CONNECTION_URL",
                         re.IGNORECASE)
# Settings that name a Secret or a file, not a secret value.
SECRET_REFERENCE_NAME = re.compile(r"(_SECRET_NAME|_SECRET_KEY|_FILE|_BLOCK)$")
URL_WITH_PASSWORD = re.compile(r"://[^/\s:@]+:[^@\s/]+@")


@pytest.fixture(scope="module")
def base_docs() -> list[dict[str, Any]]:
    return render(BASE)


@pytest.fixture(scope="module", params=[p.name for p in OVERLAYS])
def overlay_docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    return render(REPO / "k8s" / "overlays" / request.param)


@pytest.fixture(scope="module")
def gke_docs() -> list[dict[str, Any]]:
    return render(REPO / "k8s" / "overlays" / "gke")


@pytest.fixture(scope="module", params=["base", *[p.name for p in OVERLAYS]])
def any_docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    if request.param == "base":
        return render(BASE)
    return render(REPO / "k8s" / "overlays" / request.param)


def workloads(docs: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, Any]]]:
    return [(doc, spec) for doc in docs if (spec := pod_spec(doc)) is not None]


def test_there_is_a_gke_overlay() -> None:
    # gke: what both others build on; dev: in-cluster PostgreSQL; cloudsql: production.
    assert [p.name for p in OVERLAYS] == ["cloudsql", "dev", "gke"]


# --- schemas ---------------------------------------------------------------------------

def test_every_rendered_document_validates_against_the_kubernetes_schemas(
        any_docs: list[dict[str, Any]]) -> None:
    results = validate_schemas(any_docs)
    errors = [r for r in results if r["error"] not in (None, "no-schema")]
    assert not errors, errors
    unknown = {(d["apiVersion"], d["kind"]) for d, r in zip(any_docs, results, strict=True)
               if r["error"] == "no-schema"}
    assert unknown <= CRD_KINDS, f"no schema for {unknown - CRD_KINDS}"


def test_the_pod_monitoring_scrapes_the_bridge_metrics_port(gke_docs: list[dict[str, Any]]) -> None:
    monitoring = find(gke_docs, "PodMonitoring", "taxi-bridge")
    bridge = find(gke_docs, "Deployment", "taxi-bridge")
    assert monitoring["spec"]["selector"]["matchLabels"].items() <= pod_labels(bridge).items()
    ports = {p["name"] for c in containers(pod_spec(bridge) or {}) for p in c.get("ports", [])}
    assert [e["port"] for e in monitoring["spec"]["endpoints"]] == ["http"]
    assert "http" in ports
    assert monitoring["spec"]["endpoints"][0]["path"] == "/metrics"


# --- checkov, on the rendered overlay, the flow-run Job and the Dockerfile -------------

@pytest.fixture(scope="module")
def checkov_report(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """One checkov run (it takes ~10 s to start) over everything we ship."""
    checkov = lint_tool("checkov")
    root = tmp_path_factory.mktemp("checkov")
    for overlay in OVERLAYS:
        write_yaml(root / f"overlay-{overlay.name}.yaml", render(overlay))
    write_yaml(root / "base.yaml", render(BASE))
    # What ships: the overlay with the image by digest (k8s/release.py).
    write_yaml(root / "release-gke.yaml", render(REPO / "k8s" / "release" / "gke"))
    write_yaml(root / "flow-run-job.yaml",
               [render_flow_run_job("transform", {"image": "registry.example/taxi:1"})])
    (root / "Dockerfile").write_text((REPO / "Dockerfile").read_text())
    skips = ",".join([*CHECKOV_SKIPS, *CHECKOV_DOCKERFILE_SKIPS])
    result = subprocess.run(
        [str(checkov), "--directory", str(root), "--framework", "kubernetes", "dockerfile",
         "--skip-check", skips, "--skip-download", "--compact", "--output", "json"],
        capture_output=True, text=True, timeout=600)
    # 0 = no findings, 1 = findings; anything else is checkov failing to run.
    assert result.returncode in (0, 1), result.stderr[-3000:]
    report = json.loads(result.stdout)
    return report if isinstance(report, list) else [report]


def test_checkov_finds_nothing(checkov_report: list[dict[str, Any]]) -> None:
    failed = [(r["check_type"], c["check_id"], c["check_name"], c["resource"], c["file_path"])
              for r in checkov_report for c in r["results"]["failed_checks"]]
    assert not failed, "\n".join(map(str, failed))


def test_checkov_scanned_the_manifests_the_job_and_the_dockerfile(
        checkov_report: list[dict[str, Any]]) -> None:
    kinds = {r["check_type"]: r["summary"] for r in checkov_report}
    assert kinds["kubernetes"]["passed"] > 100
    assert kinds["kubernetes"]["parsing_errors"] == 0
    assert kinds["dockerfile"]["passed"] > 10
    resources = {c["resource"] for r in checkov_report for c in r["results"]["passed_checks"]}
    assert any(r.startswith("Job.") for r in resources), "the flow-run Job was not scanned"


def test_checkov_skips_are_justified() -> None:
    """Each skipped check says why; resource-level skips too, and only for the worker."""
    for reason in [*CHECKOV_SKIPS.values(), *CHECKOV_DOCKERFILE_SKIPS.values()]:
        assert len(reason) > 40
    annotated = {}
    for doc in render(BASE):
        for key, value in doc.get("metadata", {}).get("annotations", {}).items():
            if key.startswith("checkov.io/skip"):
                annotated[(doc["kind"], doc["metadata"]["name"])] = value
    assert set(annotated) == {("Deployment", "prefect-worker")}
    check, _, reason = annotated[("Deployment", "prefect-worker")].partition("=")
    assert check == "CKV_K8S_38" and "Kubernetes API" in reason


def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = lint_tool("hadolint")
    result = subprocess.run([str(hadolint), "--no-color", str(REPO / "Dockerfile")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


# --- the project's own policies ----------------------------------------------------------

def test_every_container_has_requests_and_limits(any_docs: list[dict[str, Any]]) -> None:
    for doc, spec in workloads(any_docs):
        for c in containers(spec):
            res = c.get("resources", {})
            for bound in ("requests", "limits"):
                missing = {"cpu", "memory", "ephemeral-storage"} - set(res.get(bound, {}))
                assert not missing, f"{doc['metadata']['name']}/{c['name']} {bound}: {missing}"


def test_every_pod_is_hardened(any_docs: list[dict[str, Any]]) -> None:
    """Non-root (a high UID), seccomp, read-only root, no escalation, no capabilities."""
    for doc, spec in workloads(any_docs):
        pod = spec.get("securityContext", {})
        for c in containers(spec):
            where = f"{doc['metadata']['name']}/{c['name']}"
            sc = c.get("securityContext", {})
            assert sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, where
            assert sc.get("runAsUser", pod.get("runAsUser", 0)) >= 10000, where
            seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {}))
            assert seccomp.get("type") == "RuntimeDefault", where
            assert sc.get("allowPrivilegeEscalation") is False, where
            assert sc.get("readOnlyRootFilesystem") is True, where
            assert sc.get("privileged") is not True, where
            assert sc.get("capabilities", {}).get("drop") == ["ALL"], where
            assert not sc.get("capabilities", {}).get("add"), where
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), doc["metadata"]["name"]


def test_writable_paths_are_emptydirs_or_claims(any_docs: list[dict[str, Any]]) -> None:
    """A read-only root needs writable /tmp; Prefect's processes need PREFECT_HOME."""
    for doc, spec in workloads(any_docs):
        volumes = {v["name"]: v for v in spec.get("volumes", [])}
        claims = {t["metadata"]["name"] for t in doc["spec"].get("volumeClaimTemplates", [])}
        for c in containers(spec):
            mounts = {m["mountPath"]: m["name"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{doc['metadata']['name']}/{c['name']}: no /tmp volume"
            for name in mounts.values():
                assert name in claims or name in volumes
                if name in volumes and "emptyDir" in volumes[name]:
                    assert volumes[name]["emptyDir"].get("sizeLimit"), name
            if c.get("command", [""])[0] in {"prefect", "python"}:  # the pipeline image
                assert "/var/lib/prefect" in mounts, f"{c['name']}: PREFECT_HOME not writable"


def test_only_the_worker_gets_a_kubernetes_api_token(any_docs: list[dict[str, Any]]) -> None:
    accounts = {d["metadata"]["name"]: d for d in any_docs if d["kind"] == "ServiceAccount"}
    for doc, spec in workloads(any_docs):
        name = doc["metadata"]["name"]
        sa = spec.get("serviceAccountName", "default")
        assert sa in accounts, f"{name} uses ServiceAccount {sa!r}, which is not defined here"
        mounted = spec.get("automountServiceAccountToken",
                           accounts[sa].get("automountServiceAccountToken", True))
        assert mounted is (name == "prefect-worker"), name
    assert accounts["default"]["automountServiceAccountToken"] is False


def test_no_secret_data_in_the_manifests(any_docs: list[dict[str, Any]]) -> None:
    """Secrets are created out of band and only referenced; nothing secret-looking is literal."""
    assert not [d for d in any_docs if d["kind"] == "Secret"]
    text = "\n".join(json.dumps(d) for d in any_docs)
    assert not URL_WITH_PASSWORD.search(text), "a URL with a password in it"
    for doc in any_docs:
        if doc["kind"] == "ConfigMap":
            for key, value in doc.get("data", {}).items():
                assert not (SECRET_NAME.search(key) and not SECRET_REFERENCE_NAME.search(key)), key
                assert not URL_WITH_PASSWORD.search(value), key
    for doc, spec in workloads(any_docs):
        for c in containers(spec):
            for env in c.get("env", []):
                if "value" in env and SECRET_NAME.search(env["name"]):
                    # The cloudsql overlay's database URL names an IAM user, no password.
                    passwordless_url = (env["name"] == "PREFECT_API_DATABASE_CONNECTION_URL"
                                        and "://" in env["value"]
                                        and urlsplit(env["value"]).password is None)
                    assert SECRET_REFERENCE_NAME.search(env["name"]) or passwordless_url, (
                        f"{doc['metadata']['name']}/{c['name']}: {env['name']} is a literal")
                ref = env.get("valueFrom", {})
                assert set(ref) <= {"secretKeyRef", "configMapKeyRef", "fieldRef"}, env


def test_secrets_come_from_the_documented_secrets(base_docs: list[dict[str, Any]]) -> None:
    """The only Secrets are prefect-api-auth and prefect-db, listed in the base's header."""
    used: set[tuple[str, str]] = set()
    for _, spec in workloads(base_docs):
        for c in containers(spec):
            for env in c.get("env", []):
                if ref := env.get("valueFrom", {}).get("secretKeyRef"):
                    used.add((ref["name"], ref["key"]))
        for volume in spec.get("volumes", []):
            if secret := volume.get("secret"):
                used |= {(secret["secretName"], item["key"]) for item in secret["items"]}
    assert used == {("prefect-api-auth", "auth-string"), ("prefect-db", "password"),
                    ("prefect-db", "connection-url"), ("prefect-redis", "password")}
    header = (BASE / "kustomization.yaml").read_text()
    for name, key in used:
        assert name in header and key in header
    readme = (REPO / "k8s" / "README.md").read_text()
    assert all(name in readme for name, _ in used)


def test_auth_and_database_settings_are_secret_references(
        base_docs: list[dict[str, Any]]) -> None:
    for doc, spec in workloads(base_docs):
        for c in containers(spec):
            for env in c.get("env", []):
                if env["name"] in {"PREFECT_API_AUTH_STRING", "PREFECT_SERVER_API_AUTH_STRING",
                                   "PREFECT_API_DATABASE_CONNECTION_URL"}:
                    assert env["valueFrom"]["secretKeyRef"], (doc["metadata"]["name"], env)


def test_every_long_running_container_has_probes(any_docs: list[dict[str, Any]]) -> None:
    for doc, spec in workloads(any_docs):
        if doc["kind"] not in {"Deployment", "StatefulSet"}:
            continue
        for c in spec["containers"]:
            assert "readinessProbe" in c and "livenessProbe" in c, doc["metadata"]["name"]


def test_everything_is_in_the_namespace_with_restricted_pod_security(
        any_docs: list[dict[str, Any]]) -> None:
    namespace = find(any_docs, "Namespace", NAMESPACE)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for doc in any_docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == NAMESPACE, doc["metadata"]["name"]


# --- the worker's permissions -------------------------------------------------------------

def test_the_worker_role_is_namespaced_and_explicit(any_docs: list[dict[str, Any]]) -> None:
    kinds = {d["kind"] for d in any_docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    role = find(any_docs, "Role", "prefect-worker")
    allowed_verbs = {"get", "list", "watch", "create", "delete", "update", "patch"}
    granted: dict[str, set[str]] = {}
    for rule in role["rules"]:
        for field in ("apiGroups", "resources", "verbs"):
            assert "*" not in rule[field], rule
        assert set(rule["verbs"]) <= allowed_verbs, rule
        for resource in rule["resources"]:
            granted.setdefault(resource, set()).update(rule["verbs"])
    assert set(granted) == {"jobs", "pods", "pods/log", "events"}
    assert granted["jobs"] >= {"create", "get", "list", "watch", "delete"}
    assert granted["pods"] == {"get", "list", "watch"}
    assert granted["pods/log"] == {"get"}
    binding = find(any_docs, "RoleBinding", "prefect-worker")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": "prefect-worker"}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "prefect-worker",
                                    "namespace": NAMESPACE}]
    worker = find(any_docs, "Deployment", "prefect-worker")
    spec = pod_spec(worker) or {}
    assert spec["serviceAccountName"] == "prefect-worker"
    env = {e["name"]: e for e in spec["containers"][0]["env"]}
    # The observer must watch only this namespace: a cluster-wide watch needs a ClusterRole.
    assert env["PREFECT_INTEGRATIONS_KUBERNETES_OBSERVER_NAMESPACES"]["value"] == NAMESPACE


# --- the bridge ------------------------------------------------------------------------------

def test_bridge_liveness_does_not_depend_on_prefect(any_docs: list[dict[str, Any]]) -> None:
    """/healthz answers 503 while Prefect is away: fine for readiness, fatal for liveness."""
    bridge = find(any_docs, "Deployment", "taxi-bridge")
    spec = pod_spec(bridge) or {}
    c = spec["containers"][0]
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    config = find(any_docs, "ConfigMap", "taxi-pipeline-config")["data"]
    assert ports["http"] == int(config["TAXI_BRIDGE_PORT"])
    readiness, liveness = c["readinessProbe"], c["livenessProbe"]
    assert readiness["httpGet"]["path"] == "/healthz"
    assert readiness["httpGet"]["port"] in ("http", ports["http"])
    if "httpGet" in liveness:
        assert liveness["httpGet"]["path"] == "/metrics"
    else:
        assert "tcpSocket" in liveness, liveness
    # The HTTP server serves /metrics without asking Prefect or Pub/Sub anything.
    source = (REPO / "taxi_pipeline" / "monitoring" / "http_server.py").read_text()
    metrics_branch = source.split('if path == "/metrics":')[1].split("if path ==")[0]
    assert "problems" not in metrics_branch and "state" not in metrics_branch


def test_bridge_outlives_its_drain_and_keeps_a_replica(any_docs: list[dict[str, Any]]) -> None:
    bridge = find(any_docs, "Deployment", "taxi-bridge")
    spec = pod_spec(bridge) or {}
    drain_seconds = 20  # pubsub_bridge: SIGTERM -> confirm and ack in flight for up to 20 s
    assert spec["terminationGracePeriodSeconds"] >= drain_seconds + 15
    assert spec["containers"][0]["command"] == ["python", "-m", "pubsub_bridge"]
    pdb = find(any_docs, "PodDisruptionBudget", "taxi-bridge")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(bridge).items()
    assert pdb["spec"]["minAvailable"] >= 1
    assert bridge["spec"]["replicas"] > pdb["spec"]["minAvailable"]


def test_workload_identity_accounts(gke_docs: list[dict[str, Any]]) -> None:
    annotation = "iam.gke.io/gcp-service-account"
    bridge_sa = find(gke_docs, "ServiceAccount", "taxi-bridge")
    runner_sa = find(gke_docs, "ServiceAccount", "taxi-flow-runner")
    assert bridge_sa["metadata"]["annotations"][annotation].startswith("taxi-bridge@")
    assert runner_sa["metadata"]["annotations"][annotation].startswith("taxi-flow-runner@")
    assert (pod_spec(find(gke_docs, "Deployment", "taxi-bridge")) or {})[
        "serviceAccountName"] == "taxi-bridge"
    template = json.loads(JOB_TEMPLATE.read_text())
    assert template["variables"]["properties"]["service_account_name"]["default"] == (
        "taxi-flow-runner")
    # No Google account for the worker or the server: they call no Google API.
    for name in ("prefect-worker", "prefect-server", "prefect-datastore", "default"):
        assert annotation not in find(gke_docs, "ServiceAccount", name)["metadata"].get(
            "annotations", {})


# Network policies: tests/test_k8s_network_policies.py evaluates them.


# --- settings ------------------------------------------------------------------------------

def test_the_taxi_config_runs_the_gcp_profile(any_docs: list[dict[str, Any]],
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    data = find(any_docs, "ConfigMap", "taxi-pipeline-config")["data"]
    fields = set(Settings.model_fields)
    for key in data:
        if key.startswith("TAXI_"):
            assert key.removeprefix("TAXI_").lower() in fields, f"{key} is not a setting"
    assert data["TAXI_PROFILE"] == "gcp"
    for needed in ("GCP_PROJECT", "BUCKET", "BQ_DATASET", "BQ_LOCATION", "PUBSUB_SUBSCRIPTION",
                   "WORK_POOL"):
        assert data[f"TAXI_{needed}"], needed
    # The values parse, from the environment as in a pod, as the settings of the gcp profile.
    for key, value in data.items():
        if key.startswith("TAXI_"):
            monkeypatch.setenv(key, value)
    settings = Settings()
    assert settings.profile == "gcp" and settings.work_pool == "taxi-kubernetes"
    assert settings.download_datasets == ["yellow", "green"]
    service = find(any_docs, "Service", "prefect-server")
    port = service["spec"]["ports"][0]["port"]
    assert data["PREFECT_API_URL"] == (
        f"http://prefect-server.{NAMESPACE}.svc.cluster.local:{port}/api")


def test_gke_params_reach_the_manifests(tmp_path: Path) -> None:
    """params.yaml is the one file to edit: its values land where they belong."""
    overlay = REPO / "k8s" / "overlays" / "gke"
    copy = tmp_path / "k8s"
    subprocess.run(["cp", "-r", str(REPO / "k8s"), str(copy)], check=True)
    values = {"PROJECT_ID": "acme-data-prod", "BUCKET": "acme-tlc-landing",
              "REGION-": "europe-west4-", "COMMIT_SHA": "0123abc"}
    lines = []
    for line in (copy / "overlays" / "gke" / "params.yaml").read_text().splitlines():
        key, sep, value = line.partition(": ")
        for placeholder, replacement in values.items():
            value = value.replace(placeholder, replacement)
        lines.append(key + sep + value)
    (copy / "overlays" / "gke" / "params.yaml").write_text("\n".join(lines) + "\n")
    docs = render(copy / "overlays" / "gke")
    data = find(docs, "ConfigMap", "taxi-pipeline-config")["data"]
    assert data["TAXI_GCP_PROJECT"] == "acme-data-prod"
    assert data["TAXI_BUCKET"] == "acme-tlc-landing"
    # The image is not a parameter: each release pins it by digest (tests/test_k8s_rollout.py).
    assert "IMAGE:" not in (overlay / "params.yaml").read_text()
    sa = find(docs, "ServiceAccount", "taxi-bridge")["metadata"]["annotations"]
    assert sa["iam.gke.io/gcp-service-account"] == (
        "taxi-bridge@acme-data-prod.iam.gserviceaccount.com")
    assert not [d for d in docs if d["metadata"]["name"] == "gke-params"]
    assert "PROJECT_ID" in (overlay / "params.yaml").read_text()  # the repo keeps placeholders


def _known_prefect_settings() -> set[str]:
    from prefect.settings.legacy import _get_valid_setting_names
    from prefect.settings.models.root import Settings as PrefectSettings
    from prefect_kubernetes.settings import KubernetesSettings
    from prefect_redis.cleanup_queue import RedisWorkerCleanupQueueSettings
    from prefect_redis.client import RedisMessagingSettings
    from prefect_redis.messaging import RedisMessagingPublisherSettings

    names: set[str] = set()
    for model in (PrefectSettings, KubernetesSettings, RedisMessagingSettings,
                  RedisMessagingPublisherSettings, RedisWorkerCleanupQueueSettings):
        names |= set(_get_valid_setting_names(model))
    return names


def test_every_prefect_setting_name_exists(any_docs: list[dict[str, Any]]) -> None:
    """A misspelt PREFECT_* variable is silently ignored: check each against Prefect."""
    known = _known_prefect_settings()
    found: set[str] = set()
    for doc in any_docs:
        if doc["kind"] == "ConfigMap":
            found |= {k for k in doc.get("data", {}) if k.startswith("PREFECT_")}
    for _, spec in workloads(any_docs):
        for c in containers(spec):
            found |= {e["name"] for e in c.get("env", []) if e["name"].startswith("PREFECT_")}
    assert found - known == set()


def test_prefect_server_contract_and_production_settings(
        any_docs: list[dict[str, Any]]) -> None:
    """The server runs PostgreSQL + Redis the way the local server test reproduces it."""
    server = find(any_docs, "Deployment", "prefect-server")
    spec = pod_spec(server) or {}
    (c,) = spec["containers"]
    assert c["name"] == "prefect-server" and c["command"] == [
        "python", "-m", "taxi_pipeline.stack.prefect_server_start", "--no-services"]
    assert c["envFrom"] == [{"configMapRef": {"name": "prefect-server-config"}}]
    env = {e["name"]: e for e in c["env"]}
    assert all("valueFrom" in e or "value" in e for e in env.values())
    database_url = env["PREFECT_API_DATABASE_CONNECTION_URL"]
    if any(d["metadata"]["name"] == "prefect-postgres" for d in any_docs):
        assert database_url["valueFrom"]["secretKeyRef"]["name"] == "prefect-db"
    else:  # cloudsql: through the Auth Proxy as an IAM user, no password
        assert urlsplit(database_url["value"]).hostname == "127.0.0.1"
    assert env["PREFECT_SERVER_API_AUTH_STRING"]["valueFrom"]["secretKeyRef"][
        "name"] == "prefect-api-auth"
    config = find(any_docs, "ConfigMap", "prefect-server-config")["data"]
    expected = {
        "PREFECT_SERVER_API_HOST": "0.0.0.0",
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_REDIS_MESSAGING_HOST": "prefect-redis",
        "PREFECT_REDIS_MESSAGING_PORT": "6379",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_SERVER_WORKER_CHANNEL_CLEANUP_QUEUE_STORAGE": "prefect_redis.cleanup_queue",
    }
    assert {k: config.get(k) for k in expected} == expected
    # Redis requires its password (prefect-helm's settings); the docket URL carries it,
    # expanded by Kubernetes from the secret-backed variable before it.
    for name in ("PREFECT_REDIS_MESSAGING_PASSWORD", "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_PASSWORD"):
        assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "prefect-redis",
                                                          "key": "password"}
    names = [e["name"] for e in c["env"]]
    assert names.index("PREFECT_REDIS_MESSAGING_PASSWORD") < names.index(
        "PREFECT_SERVER_DOCKET_URL")
    assert env["PREFECT_SERVER_DOCKET_URL"]["value"] == (
        "redis://:$(PREFECT_REDIS_MESSAGING_PASSWORD)@prefect-redis:6379/1")
    assert "PREFECT_SERVER_DOCKET_URL" not in config
    redis = pod_spec(find(any_docs, "StatefulSet", "prefect-redis")) or {}
    (rc,) = redis["containers"]
    assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in rc["env"]} == {
        "REDISCLI_AUTH": {"name": "prefect-redis", "key": "password"}}
    script = " ".join(rc["command"] + rc["args"])
    assert "requirepass" in script and "protected-mode" not in script
    # Module settings name modules that exist in the image's dependencies.
    for key, value in config.items():
        if value.startswith(("prefect_redis.", "prefect.")):
            assert importlib.util.find_spec(value) is not None, f"{key}={value}"
    # The server's probes use the paths that stay open without the auth string.
    assert c["readinessProbe"]["httpGet"]["path"] == "/api/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/api/health"
    service = find(any_docs, "Service", "prefect-redis")
    assert service["spec"]["ports"][0]["port"] == int(config["PREFECT_REDIS_MESSAGING_PORT"])


def test_prefect_reads_the_server_config_as_intended(any_docs: list[dict[str, Any]]) -> None:
    """Load Prefect's settings from exactly that ConfigMap, in a clean process."""
    config = find(any_docs, "ConfigMap", "prefect-server-config")["data"]
    server = pod_spec(find(any_docs, "Deployment", "prefect-server")) or {}
    docket = next(e["value"] for e in server["containers"][0]["env"]
                  if e["name"] == "PREFECT_SERVER_DOCKET_URL")
    config = {**config, "PREFECT_SERVER_DOCKET_URL": docket.replace(
        "$(PREFECT_REDIS_MESSAGING_PASSWORD)", "0a1b2c")}
    script = (
        "import json; from prefect.settings import get_current_settings; "
        "s = get_current_settings().server; "
        "print(json.dumps([s.events.messaging_broker, s.events.messaging_cache, "
        "s.events.causal_ordering, s.concurrency.lease_storage, s.docket.url, "
        "s.api.host, s.api.port, s.worker_channel.cleanup_queue_storage]))"
    )
    env = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", **config}
    result = subprocess.run([sys.executable, "-c", script], env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == [
        "prefect_redis.messaging", "prefect_redis.messaging", "prefect_redis.ordering",
        "prefect_redis.lease_storage", config["PREFECT_SERVER_DOCKET_URL"], "0.0.0.0", 4200,
        "prefect_redis.cleanup_queue"]
