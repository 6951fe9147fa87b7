"""Helpers for the tests of the Kubernetes manifests, the image and the workflows.

The scanners (checkov, hadolint, actionlint, zizmor, kubernetes-validate) live in
their own virtualenv, `.venv-lint` (scripts/install-linters.sh), because checkov's
pins clash with Prefect's; tests call them as programs. Without that venv the
tests that need a scanner skip and say how to install it.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BASE = K8S / "base"
OVERLAYS = sorted(p.parent for p in (K8S / "overlays").glob("*/kustomization.yaml"))
JOB_TEMPLATE = K8S / "work-pool" / "base-job-template.json"
LINT_VENV = REPO / ".venv-lint"
NAMESPACE = "data-pipeline"

# The Kubernetes minor version the manifests are validated against (schemas bundled
# by kubernetes-validate). Keep it at the cluster's minor version (`kubectl version`).
K8S_VERSION = "1.34.0"

WORKLOAD_KINDS = {"Deployment", "StatefulSet", "DaemonSet", "Job", "CronJob", "ReplicaSet"}


def lint_tool(name: str) -> Path:
    path = LINT_VENV / "bin" / name
    if not path.exists():
        pytest.skip(f"{path} is missing: run scripts/install-linters.sh (scripts/test.sh does)")
    return path


def kubectl() -> str:
    found = shutil.which("kubectl") or str(LINT_VENV / "bin" / "kubectl")
    if not Path(found).exists():
        pytest.skip("kubectl is missing: install it, or run scripts/install-linters.sh")
    return found


def render(kustomization_dir: Path) -> list[dict[str, Any]]:
    """`kubectl kustomize DIR`, parsed; fails with kustomize's message."""
    result = subprocess.run([kubectl(), "kustomize", str(kustomization_dir)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kustomize {kustomization_dir} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def validate_schemas(docs: list[dict[str, Any]],
                     version: str = K8S_VERSION) -> list[dict[str, Any]]:
    """Validate each document with kubernetes-validate (strict: unknown fields fail).

    Returns one result per document: {"kind", "name", "error"} with error None when
    valid, "no-schema" for kinds the bundled schemas do not know (CRDs).
    """
    python = lint_tool("python")
    script = r"""
import json, sys
import kubernetes_validate
from kubernetes_validate.utils import SchemaNotFoundError
docs, version = json.load(sys.stdin)
out = []
for doc in docs:
    meta = doc.get("metadata", {})
    result = {"kind": doc.get("kind"), "name": meta.get("name") or meta.get("generateName")}
    try:
        kubernetes_validate.validate(doc, version, strict=True)
        result["error"] = None
    except SchemaNotFoundError:
        result["error"] = "no-schema"
    except kubernetes_validate.ValidationError as exc:
        where = "/".join(str(p) for p in exc.absolute_path)
        result["error"] = f"{exc.message} at /{where}"
    out.append(result)
print(json.dumps(out))
"""
    result = subprocess.run([str(python), "-c", script], input=json.dumps([docs, version]),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    return list(json.loads(result.stdout))


def pod_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The pod template's spec of a workload, or None for other kinds."""
    kind = doc.get("kind")
    if kind not in WORKLOAD_KINDS:
        return None
    spec = doc["spec"]
    if kind == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"]["spec"])


def pod_labels(doc: dict[str, Any]) -> dict[str, str]:
    spec = doc["spec"]
    if doc["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return dict(spec["template"].get("metadata", {}).get("labels", {}))


def containers(spec: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from spec.get("initContainers", [])
    yield from spec.get("containers", [])


def find(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    for doc in docs:
        if doc.get("kind") == kind and doc.get("metadata", {}).get("name") == name:
            return doc
    raise AssertionError(f"no {kind} named {name!r} among the rendered documents")


def write_yaml(path: Path, docs: list[dict[str, Any]]) -> Path:
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


IN_CLUSTER_API_URL = f"http://prefect-server.{NAMESPACE}.svc.cluster.local:4200/api"
WORKER_AUTH_STRING = "worker-user:not-a-real-password"


def render_flow_run_job(flow_name: str, job_variables: dict[str, Any],
                        template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The Job prefect-kubernetes' worker would submit for a run of `flow_name`, without
    a cluster or a server: the pool's base job template and the deployment's job
    variables, prepared for a flow run the way the worker does it, with the worker's
    own settings (in-cluster API URL and an auth string, as in k8s/base/worker.yaml).
    """
    import asyncio
    from uuid import uuid4

    from prefect.client.schemas.objects import Flow, FlowRun, WorkPool
    from prefect.client.schemas.responses import DeploymentResponse
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = template or json.loads(JOB_TEMPLATE.read_text())
    flow = Flow(id=uuid4(), name=flow_name)
    deployment = DeploymentResponse(id=uuid4(), name=flow_name, flow_id=flow.id,
                                    job_variables=job_variables)
    flow_run = FlowRun(id=uuid4(), name="gentle-otter", flow_id=flow.id,
                       deployment_id=deployment.id)
    pool = WorkPool(id=uuid4(), name="taxi-kubernetes", type="kubernetes",
                    base_job_template=template)
    with temporary_settings(updates={PREFECT_API_URL: IN_CLUSTER_API_URL,
                                     PREFECT_API_AUTH_STRING: WORKER_AUTH_STRING}):
        # The template has no block or variable references, so no API client is used.
        configuration = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(
            template, job_variables, client=object()))
        configuration.prepare_for_flow_run(flow_run, deployment, flow, work_pool=pool,
                                           worker_name="prefect-worker-0")
    return dict(configuration.job_manifest)
