"""The deploy workflow's release, step by step, against a simulated cluster.

No cluster runs here. The workflow's own `run:` scripts run under bash with a
`kubectl` on PATH that renders with the real `kubectl kustomize` and keeps the
cluster's objects in a JSON file: server-side apply (objects in order, a
namespaced object only into an existing namespace), ApplySet pruning, Job
deletion, `rollout status` and `wait` (which fail for an object that does not
exist). The cluster starts as k8s/README.md leaves it before the first push:
the namespace and its Secrets, nothing else.

The GitOps path runs the workflow's commit step in a copy of the repository,
then renders what Flux and Argo CD would apply from it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.k8s import NAMESPACE, REPO, kubectl, render

WORKFLOW = REPO / ".github" / "workflows" / "deploy.yml"
DIGEST_A = "europe-west4-docker.pkg.dev/acme/taxi-pipeline/taxi-pipeline@sha256:" + "a1" * 32
DIGEST_B = "europe-west4-docker.pkg.dev/acme/taxi-pipeline/taxi-pipeline@sha256:" + "b2" * 32
PIPELINE_WORKLOADS = {("Deployment", "prefect-server"), ("Deployment", "prefect-services"),
                      ("Deployment", "prefect-worker"), ("Deployment", "taxi-bridge"),
                      ("Job", "prefect-migrate"), ("Job", "taxi-deploy")}

FAKE_KUBECTL = textwrap.dedent('''\
    #!{python}
    """A cluster in a JSON file, for the commands k8s/rollout.sh runs."""
    import json, os, subprocess, sys
    import yaml

    state_path = os.environ["FAKE_CLUSTER"]
    args = sys.argv[1:]
    with open(os.environ["FAKE_CLUSTER_LOG"], "a") as log:
        log.write(json.dumps(args) + "\\n")
    if args[0] == "kustomize":
        sys.exit(subprocess.run([os.environ["REAL_KUBECTL"], *args]).returncode)
    state = json.load(open(state_path))
    objects = {{tuple(json.loads(k)): v for k, v in state["objects"].items()}}

    def opt(name):
        for i, a in enumerate(args):
            if a == name:
                return args[i + 1]
            if a.startswith(name + "="):
                return a.split("=", 1)[1]
        return None

    ns = opt("-n") or opt("--namespace") or "default"
    verbs = [a for a in args if not a.startswith("-")]

    def fail(message):
        print("Error from server: " + message, file=sys.stderr)
        sys.exit(1)

    def key(kind, name, namespace):
        return (kind, namespace if kind != "Namespace" else "", name)

    if "delete" in verbs:
        kind, name = verbs[verbs.index("delete") + 1:verbs.index("delete") + 3]
        k = key(kind.capitalize(), name, ns)
        if k not in objects and "--ignore-not-found" not in args:
            fail(f"{{kind}} {{name}} not found")
        objects.pop(k, None)
    elif "apply" in verbs:
        assert "--server-side" in args, "apply must be server-side"
        applyset = opt("--applyset")
        if "--prune" in args:
            assert applyset and os.environ.get("KUBECTL_APPLYSET") == "true", \\
                "server-side prune needs an ApplySet (KUBECTL_APPLYSET=true, --applyset)"
        if key("Namespace", ns, "") not in objects:
            fail(f"namespaces {{ns!r}} not found (the ApplySet parent lives there)")
        docs = [d for d in yaml.safe_load_all(open(opt("--filename") or opt("-f"))) if d]
        applied = []
        for doc in docs:
            meta = doc["metadata"]
            doc_ns = meta.get("namespace", "")
            if doc["kind"] != "Namespace":
                if not doc_ns:
                    fail(f"{{doc['kind']}} {{meta['name']}} has no namespace")
                if doc_ns != ns:
                    fail(f"{{doc['kind']}} {{meta['name']}} is in {{doc_ns}}, not {{ns}}")
                if key("Namespace", doc_ns, "") not in objects:
                    fail(f"namespaces {{doc_ns!r}} not found")
            k = key(doc["kind"], meta["name"], doc_ns)
            old = objects.get(k)
            if old and doc["kind"] == "Job" and old["spec"]["template"] != doc["spec"]["template"]:
                fail(f"Job {{meta['name']}}: field is immutable (spec.template)")
            doc.setdefault("metadata", {{}}).setdefault("labels", {{}})[
                "applyset.kubernetes.io/part-of"] = applyset
            objects[k] = doc
            applied.append(k)
        if "--prune" in args:
            for k, obj in list(objects.items()):
                if (obj["metadata"].get("labels", {{}}).get("applyset.kubernetes.io/part-of")
                        == applyset and k not in applied):
                    del objects[k]
    elif "rollout" in verbs:
        kind, name = verbs[verbs.index("status") + 1].split("/")
        kinds = {{"deployment": "Deployment", "statefulset": "StatefulSet"}}
        if key(kinds[kind], name, ns) not in objects:
            fail(f"{{kind}} {{name}} not found")
    elif "wait" in verbs:
        kind, name = verbs[verbs.index("wait") + 1].split("/")
        if key(kind.capitalize(), name, ns) not in objects:
            fail(f"{{kind}} {{name}} not found")
    else:
        fail(f"the simulated cluster does not know {{args}}")
    state["objects"] = {{json.dumps(list(k)): v for k, v in objects.items()}}
    json.dump(state, open(state_path, "w"))
''')


class FakeCluster:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.bin = root / "bin"
        self.bin.mkdir(parents=True)
        fake = self.bin / "kubectl"
        fake.write_text(FAKE_KUBECTL.format(python=sys.executable))
        fake.chmod(0o755)
        self.state = root / "cluster.json"
        self.log = root / "calls.jsonl"
        # What k8s/README.md creates by hand before the first push.
        self.objects: dict[tuple[str, str, str], dict[str, Any]] = {
            ("Namespace", "", NAMESPACE): {"kind": "Namespace",
                                          "metadata": {"name": NAMESPACE}},
            **{("Secret", NAMESPACE, name): {"kind": "Secret",
                                            "metadata": {"name": name, "namespace": NAMESPACE}}
               for name in ("prefect-api-auth", "prefect-db", "prefect-redis")},
        }
        self.save()

    def save(self) -> None:
        self.state.write_text(json.dumps(
            {"objects": {json.dumps(list(k)): v for k, v in self.objects.items()}}))

    def load(self) -> dict[tuple[str, str, str], dict[str, Any]]:
        data = json.loads(self.state.read_text())["objects"]
        self.objects = {tuple(json.loads(k)): v for k, v in data.items()}  # type: ignore[misc]
        return self.objects

    def calls(self) -> list[list[str]]:
        return [json.loads(line) for line in self.log.read_text().splitlines()]

    def run(self, script: str, env: dict[str, str], cwd: Path = REPO) -> None:
        full_env = {**os.environ, **env, "PATH": f"{self.bin}:{os.environ['PATH']}",
                    "FAKE_CLUSTER": str(self.state), "FAKE_CLUSTER_LOG": str(self.log),
                    "REAL_KUBECTL": kubectl()}
        result = subprocess.run(["bash", "-euo", "pipefail", "-c", script], cwd=cwd,
                                env=full_env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def workflow() -> dict[str, Any]:
    data = yaml.safe_load(WORKFLOW.read_text())
    data["on"] = data.pop(True, data.get("on"))
    return dict(data)


def run_scripts(job: dict[str, Any]) -> list[dict[str, Any]]:
    return [s for s in job["steps"] if "run" in s]


def test_the_direct_deploy_job_gets_credentials_then_rolls_out() -> None:
    jobs = workflow()["jobs"]
    deploy = jobs["deploy"]
    assert deploy["needs"] == "image" and deploy["if"] == "vars.DEPLOY_MODE != 'gitops'"
    assert deploy["env"]["IMAGE"] == "${{ needs.image.outputs.image }}"
    uses = [s.get("uses", "run").split("@")[0] for s in deploy["steps"]]
    assert uses == ["actions/checkout", "google-github-actions/auth",
                    "google-github-actions/get-gke-credentials", "run"]
    # The image job outputs the pushed image by digest, which rollout.sh insists on.
    build = next(s for s in jobs["image"]["steps"] if s.get("id") == "build")
    assert "RepoDigests" in build["run"] and 'echo "image=${digest}"' in build["run"]


@pytest.fixture
def cluster(tmp_path: Path) -> FakeCluster:
    return FakeCluster(tmp_path)


def pipeline_images(objects: dict[tuple[str, str, str], dict[str, Any]]) -> dict[str, list[str]]:
    """The pipeline image of each workload: every container and init container of ours."""
    return {name: sorted({c["image"] for c in [*spec.get("initContainers", []),
                                              *spec["containers"]]
                          if "taxi-pipeline" in c["image"]})
            for (kind, _, name), obj in objects.items() if (kind, name) in PIPELINE_WORKLOADS
            for spec in [obj["spec"]["template"]["spec"]]}


def test_an_empty_cluster_and_one_push_give_running_deployments_with_the_digest(
        cluster: FakeCluster) -> None:
    (step,) = run_scripts(workflow()["jobs"]["deploy"])
    cluster.run(step["run"], {"IMAGE": DIGEST_A})
    objects = cluster.load()
    assert pipeline_images(objects) == {name: [DIGEST_A] for _, name in PIPELINE_WORKLOADS}
    job = objects[("Job", NAMESPACE, "taxi-deploy")]
    env = {e["name"]: e.get("value") for e in job["spec"]["template"]["spec"]["containers"][0]
           ["env"]}
    assert env["TAXI_IMAGE"] == DIGEST_A  # the flow-run image deploy.py registers
    # Everything the overlay renders is on the cluster.
    rendered = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"])
                for d in render(REPO / "k8s" / "overlays" / "gke")}
    assert rendered <= set(objects)
    # Order: render, replace both Jobs, apply; then the datastores, the migration Job,
    # every Deployment, and the registration Job last.
    calls = cluster.calls()
    verbs = [next(a for a in c if not a.startswith("-") and a not in (NAMESPACE,))
             for c in calls]
    assert verbs[:4] == ["kustomize", "delete", "delete", "apply"]
    assert {c[c.index("job") + 1] for c in calls[1:3]} == {"prefect-migrate", "taxi-deploy"}
    waits = [c[c.index("status") + 1] if "rollout" in c else
             next(a for a in c if a.startswith("job/")) for c in calls[4:]]
    assert waits[:3] == ["statefulset/prefect-postgres", "statefulset/prefect-redis",
                         "job/prefect-migrate"], waits
    assert waits[-1] == "job/taxi-deploy", waits
    assert set(waits[3:-1]) == {f"deployment/{name}" for kind, _, name in rendered
                                if kind == "Deployment"}
    assert {"deployment/prefect-server", "deployment/prefect-services"} <= set(waits)


def test_a_second_push_replaces_the_image_and_prunes_what_the_manifests_dropped(
        cluster: FakeCluster) -> None:
    (step,) = run_scripts(workflow()["jobs"]["deploy"])
    cluster.run(step["run"], {"IMAGE": DIGEST_A})
    # An object an earlier release applied and the manifests no longer contain.
    objects = cluster.load()
    objects[("NetworkPolicy", NAMESPACE, "prefect-postgres-ingress")] = {
        "kind": "NetworkPolicy", "metadata": {
            "name": "prefect-postgres-ingress", "namespace": NAMESPACE,
            "labels": {"applyset.kubernetes.io/part-of": "configmaps/taxi-pipeline-release"}}}
    cluster.save()
    cluster.run(step["run"], {"IMAGE": DIGEST_B})
    objects = cluster.load()
    assert pipeline_images(objects) == {name: [DIGEST_B] for _, name in PIPELINE_WORKLOADS}
    assert ("NetworkPolicy", NAMESPACE, "prefect-postgres-ingress") not in objects
    # What was created by hand stays.
    assert {("Secret", NAMESPACE, "prefect-db"), ("Namespace", "", NAMESPACE)} <= set(objects)


def test_a_tag_is_refused(cluster: FakeCluster) -> None:
    with pytest.raises(AssertionError, match="not pinned by digest"):
        cluster.run("k8s/rollout.sh gke \"$IMAGE\"",
                    {"IMAGE": DIGEST_A.split("@")[0] + ":latest"})
    assert len(cluster.load()) == 4  # nothing applied


def test_the_gitops_job_commits_the_digest_flux_and_argo_apply(tmp_path: Path) -> None:
    jobs = workflow()["jobs"]
    gitops = jobs["gitops"]
    assert gitops["needs"] == "image" and gitops["if"] == "vars.DEPLOY_MODE == 'gitops'"
    pin, commit = run_scripts(gitops)
    assert "git push" in commit["run"] and "HEAD:main" in commit["run"]
    # Run the pin step in a copy of the repository's k8s/ tree, as the runner would.
    copy = tmp_path / "repo"
    shutil.copytree(REPO / "k8s", copy / "k8s")
    cluster = FakeCluster(tmp_path / "unused")  # no cluster access: the pin needs none
    cluster.run(pin["run"], {"IMAGE": DIGEST_B}, cwd=copy)
    assert not cluster.log.exists()  # kubectl never ran
    flux = list(yaml.safe_load_all((REPO / "k8s/gitops/flux/taxi-pipeline.yaml").read_text()))
    kustomization = next(d for d in flux if d["kind"] == "Kustomization")
    source = next(d for d in flux if d["kind"] == "GitRepository")
    assert kustomization["spec"]["sourceRef"] == {"kind": "GitRepository",
                                                  "name": source["metadata"]["name"]}
    assert kustomization["spec"]["prune"] is True and kustomization["spec"]["wait"] is True
    argo = yaml.safe_load((REPO / "k8s/gitops/argocd/application.yaml").read_text())
    assert argo["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    assert argo["spec"]["destination"]["namespace"] == NAMESPACE
    paths = {kustomization["spec"]["path"].removeprefix("./"), argo["spec"]["source"]["path"]}
    assert paths == {"k8s/release/gke"}
    docs = render(copy / "k8s" / "release" / "gke")
    images = {c["image"] for d in docs if (d["kind"], d["metadata"]["name"]) in PIPELINE_WORKLOADS
              for c in d["spec"]["template"]["spec"]["containers"]}
    assert images == {DIGEST_B}
    # The committed file renders too (the placeholder digest before the first release).
    assert render(REPO / "k8s" / "release" / "gke")
    # Flux recreates the registration Job on a new image; Argo runs it after the sync.
    jobs = {d["metadata"]["name"]: d["metadata"]["annotations"] for d in docs
            if d["kind"] == "Job"}
    assert jobs["taxi-deploy"]["kustomize.toolkit.fluxcd.io/force"] == "enabled"
    assert jobs["taxi-deploy"]["argocd.argoproj.io/hook"] == "PostSync"
    # The migration: Flux recreates it and (wait: true) waits for it; Argo CD runs it as a
    # Sync hook (with the ConfigMap and PostgreSQL, which a PreSync hook would precede on
    # an empty cluster). Either way the servers' init containers hold them until it is done.
    assert jobs["prefect-migrate"]["kustomize.toolkit.fluxcd.io/force"] == "enabled"
    assert jobs["prefect-migrate"]["argocd.argoproj.io/hook"] == "Sync"
    for name in ("prefect-server", "prefect-services"):
        deployment = next(d for d in docs if d["kind"] == "Deployment"
                          and d["metadata"]["name"] == name)
        (init,) = deployment["spec"]["template"]["spec"]["initContainers"]
        assert init["command"] == ["python", "-m", "taxi_pipeline.stack.prefect_schema"]
        assert init["image"] == DIGEST_B
