"""The Job the kubernetes worker submits for a flow run, rendered without a cluster.

prefect-kubernetes builds it from the work pool's base job template
(k8s/work-pool/base-job-template.json) and the deployment's job variables
(deploy.py): `KubernetesWorkerJobConfiguration.from_template_and_values(...)`, then
`prepare_for_flow_run(...)`, then `.job_manifest`, exactly as the worker does.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from support.k8s import (
    IN_CLUSTER_API_URL,
    JOB_TEMPLATE,
    NAMESPACE,
    REPO,
    WORKER_AUTH_STRING,
    render,
    render_flow_run_job,
    validate_schemas,
)

import deploy

IMAGE = "europe-west4-docker.pkg.dev/acme/taxi-pipeline/taxi-pipeline@sha256:" + "ab" * 32


def transform_job_variables() -> dict[str, Any]:
    """What deploy.py registers for the transform deployment on the kubernetes pool."""
    return {**deploy.KUBERNETES_JOB_VARIABLES["transform"], "image": IMAGE}


@pytest.fixture(scope="module")
def job() -> dict[str, Any]:
    return render_flow_run_job("transform", transform_job_variables())


def container(job: dict[str, Any]) -> dict[str, Any]:
    (c,) = job["spec"]["template"]["spec"]["containers"]
    return dict(c)


def test_the_template_keeps_prefect_kubernetes_variables() -> None:
    """Every variable and placeholder of the stock template is still there, but for
    `labels`: the pod's labels are reserved (NetworkPolicies and Services select on
    them; tests/test_k8s_network_policies.py)."""
    from prefect_kubernetes.worker import KubernetesWorker

    stock = KubernetesWorker.get_default_base_job_template()
    ours = json.loads(JOB_TEMPLATE.read_text())
    assert set(stock["variables"]["properties"]) - {"labels"} == (
        set(stock["variables"]["properties"]) & set(ours["variables"]["properties"]))
    assert stock["job_configuration"].keys() - {"labels"} == ours["job_configuration"].keys()
    for key, value in stock["job_configuration"].items():
        if key not in {"job_manifest", "labels"}:
            assert ours["job_configuration"][key] == value, key
    # Every placeholder in the manifest is a declared variable.
    placeholders = set(re.findall(r"\{\{\s*(\w+)\s*\}\}", json.dumps(ours["job_configuration"])))
    assert placeholders <= set(ours["variables"]["properties"])


def test_the_job_validates_against_the_kubernetes_schema(job: dict[str, Any]) -> None:
    """Strictly, but for one quirk of prefect-kubernetes: its job validation requires
    `parallelism` and `completions` in the pod spec (they belong to the Job spec),
    where the API server drops them with a warning (fieldValidation defaults to Warn).
    Nothing else may be unknown."""
    pod_spec = job["spec"]["template"]["spec"]
    assert (pod_spec["parallelism"], pod_spec["completions"]) == (1, 1)
    cleaned = json.loads(json.dumps(job))
    del cleaned["spec"]["template"]["spec"]["parallelism"]
    del cleaned["spec"]["template"]["spec"]["completions"]
    (result,) = validate_schemas([cleaned])
    assert result["error"] is None, result


def test_the_job_runs_the_image_in_the_namespace_as_the_flow_runner(job: dict[str, Any]) -> None:
    spec = job["spec"]["template"]["spec"]
    assert job["metadata"]["namespace"] == NAMESPACE
    assert container(job)["image"] == IMAGE
    assert spec["serviceAccountName"] == "taxi-flow-runner"
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert container(job)["args"] == ["prefect", "flow-run", "execute"]
    assert "command" not in container(job)  # the image has no ENTRYPOINT: args run as is


def test_the_job_gets_the_transform_resources(job: dict[str, Any]) -> None:
    resources = container(job)["resources"]
    assert resources == {
        "requests": {"cpu": "1", "memory": "2Gi", "ephemeral-storage": "2Gi"},
        "limits": {"cpu": "2", "memory": "2Gi", "ephemeral-storage": "4Gi"},
    }
    tmp = {v["name"]: v for v in job["spec"]["template"]["spec"]["volumes"]}["tmp"]
    assert tmp["emptyDir"]["sizeLimit"] == "4Gi"


def test_load_runs_small_and_other_flows_get_the_template_defaults() -> None:
    load = render_flow_run_job("load", {**deploy.KUBERNETES_JOB_VARIABLES["load"],
                                        "image": IMAGE})
    assert container(load)["resources"]["limits"]["memory"] == "768Mi"
    download = render_flow_run_job("download", {"image": IMAGE})
    assert container(download)["resources"] == {
        "requests": {"cpu": "500m", "memory": "1Gi", "ephemeral-storage": "1Gi"},
        "limits": {"cpu": "1", "memory": "1Gi", "ephemeral-storage": "2Gi"},
    }


def test_the_job_runs_the_gcp_profile(job: dict[str, Any]) -> None:
    """TAXI_* come from the ConfigMap that says TAXI_PROFILE=gcp; the API from the worker."""
    c = container(job)
    assert c["envFrom"] == [{"configMapRef": {"name": "taxi-pipeline-config"}}]
    config = next(d for d in render(REPO / "k8s" / "overlays" / "gke")
                  if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "taxi-pipeline-config")
    assert config["data"]["TAXI_PROFILE"] == "gcp"
    env = {e["name"]: e for e in c["env"]}
    assert env["PREFECT_API_URL"]["value"] == IN_CLUSTER_API_URL
    assert not any(name.startswith("TAXI_") for name in env)  # nothing overrides the ConfigMap


def test_the_auth_string_comes_from_the_secret_never_as_a_literal(job: dict[str, Any]) -> None:
    """Stock prefect-kubernetes copies the worker's PREFECT_API_AUTH_STRING into the Job."""
    env = [e for e in container(job)["env"] if e["name"] == "PREFECT_API_AUTH_STRING"]
    assert env == [{"name": "PREFECT_API_AUTH_STRING", "valueFrom": {
        "secretKeyRef": {"name": "prefect-api-auth", "key": "auth-string"}}}]
    assert WORKER_AUTH_STRING not in json.dumps(job)


def test_the_auth_string_stays_a_reference_when_a_deployment_sets_env() -> None:
    job = render_flow_run_job("transform", {**transform_job_variables(),
                                            "env": {"EXTRA": "1"}})
    env = {e["name"]: e for e in container(job)["env"]}
    assert env["EXTRA"]["value"] == "1"
    assert "valueFrom" in env["PREFECT_API_AUTH_STRING"]
    assert WORKER_AUTH_STRING not in json.dumps(job)


def test_the_job_does_not_retry_and_is_cleaned_up(job: dict[str, Any]) -> None:
    spec = job["spec"]
    assert spec["backoffLimit"] == 0  # Kubernetes never starts a second pod
    assert spec["ttlSecondsAfterFinished"] == 86400
    assert spec["activeDeadlineSeconds"] == 7200
    env = {e["name"]: e.get("value") for e in container(job)["env"]}
    # Not `reschedule` (prefect-kubernetes' choice for backoffLimit 0): the deadline's
    # SIGTERM would loop the run forever (tests/test_k8s_deadline.py).
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"] == "crash"


def test_the_pod_is_hardened_and_may_reach_the_api(job: dict[str, Any]) -> None:
    pod = job["spec"]["template"]
    assert pod["metadata"]["labels"]["taxi-pipeline/prefect-client"] == "true"
    assert pod["metadata"]["annotations"]["cluster-autoscaler.kubernetes.io/safe-to-evict"] == (
        "false")
    security = pod["spec"]["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] >= 10000
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    c = container(job)["securityContext"]
    assert c["allowPrivilegeEscalation"] is False and c["readOnlyRootFilesystem"] is True
    assert c["capabilities"] == {"drop": ["ALL"]}
    mounts = {m["mountPath"] for m in container(job)["volumeMounts"]}
    assert mounts == {"/tmp", "/var/lib/prefect"}
