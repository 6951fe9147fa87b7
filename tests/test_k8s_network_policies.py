"""NetworkPolicies evaluated the way Kubernetes does: pod and namespace selectors
(matchLabels and matchExpressions), ingress at the destination and egress at the
source, deny-by-default once a policy of that direction selects a pod.

The pods are the rendered workloads of every overlay, the flow-run pod as
prefect-kubernetes renders it, and a spoofed flow run: a deployment and flow
named after the server, with `labels` job variables copying every label of the
server, PostgreSQL and Redis.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from support.k8s import (
    BASE,
    JOB_TEMPLATE,
    NAMESPACE,
    OVERLAYS,
    REPO,
    find,
    pod_labels,
    pod_spec,
    render,
    render_flow_run_job,
)

IMAGE = "registry.example/taxi@sha256:" + "ab" * 32
# Who may open a connection to each datastore: the API, the background services, and
# (PostgreSQL only) the migration Job.
DATABASE_CLIENTS = {
    "prefect-postgres": {"prefect-server", "prefect-services", "prefect-migrate"},
    "prefect-redis": {"prefect-server", "prefect-services"},
}


@pytest.fixture(scope="module", params=["base", *[p.name for p in OVERLAYS]])
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    if request.param == "base":
        return render(BASE)
    return render(REPO / "k8s" / "overlays" / request.param)


def selects(selector: dict[str, Any] | None, labels: dict[str, str]) -> bool:
    """A LabelSelector: matchLabels and matchExpressions; {} selects everything."""
    if selector is None:
        return False
    assert set(selector) <= {"matchLabels", "matchExpressions"}, selector
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, op, values = expr["key"], expr["operator"], expr.get("values", [])
        if op == "In" and labels.get(key) not in values:
            return False
        if op == "NotIn" and key in labels and labels[key] in values:
            return False
        if op == "Exists" and key not in labels:
            return False
        if op == "DoesNotExist" and key in labels:
            return False
        assert op in {"In", "NotIn", "Exists", "DoesNotExist"}, op
    return True


Pod = tuple[str, dict[str, str]]  # (namespace, labels)


def namespace_labels(name: str) -> dict[str, str]:
    return {"kubernetes.io/metadata.name": name}


def peer_matches(peer: dict[str, Any], policy_namespace: str, other: Pod) -> bool:
    """A NetworkPolicyPeer: podSelector alone = same namespace; with namespaceSelector =
    pods so labelled in namespaces so labelled; namespaceSelector alone = all their pods."""
    assert "ipBlock" not in peer, "ipBlock peers are not evaluated here"
    namespace, labels = other
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], namespace_labels(namespace)):
            return False
    elif namespace != policy_namespace:
        return False
    return "podSelector" not in peer or selects(peer["podSelector"], labels)


def _ports_match(rule: dict[str, Any], port: int) -> bool:
    ports = rule.get("ports")
    return not ports or any(p.get("port") in (port, None) and p.get("protocol", "TCP") == "TCP"
                            for p in ports)


def allowed(policies: list[dict[str, Any]], src: Pod, dst: Pod, port: int) -> bool:
    """Whether a TCP connection from `src` to `dst`:`port` is allowed: egress of the
    source's policies and ingress of the destination's, each deny-by-default once a
    policy of that type selects the pod."""
    def side(pod: Pod, other: Pod, kind: str, rules_key: str, peers_key: str) -> bool:
        selecting = [p for p in policies if p["metadata"]["namespace"] == pod[0]
                     and kind in p["spec"].get("policyTypes", ["Ingress"])
                     and selects(p["spec"]["podSelector"], pod[1])]
        if not selecting:
            return True
        for policy in selecting:
            for rule in policy["spec"].get(rules_key) or []:
                if not _ports_match(rule, port):
                    continue
                peers = rule.get(peers_key)
                if not peers or any(peer_matches(p, pod[0], other) for p in peers):
                    return True
        return False

    return (side(src, dst, "Egress", "egress", "to")
            and side(dst, src, "Ingress", "ingress", "from"))


def pods(docs: list[dict[str, Any]]) -> dict[str, Pod]:
    found = {doc["metadata"]["name"]: (NAMESPACE, pod_labels(doc))
             for doc in docs if pod_spec(doc) is not None}
    job = render_flow_run_job("transform", {"image": IMAGE})
    found["flow-run"] = (NAMESPACE, job["spec"]["template"]["metadata"]["labels"])
    return found


def spoofed_flow_run(docs: list[dict[str, Any]]) -> dict[str, str]:
    """A deployment and flow named prefect-server whose `labels` job variable copies
    every label of the API, services, migration, PostgreSQL and Redis pods (what any
    holder of the API auth string can register)."""
    stolen: dict[str, str] = {}
    for name in ("prefect-redis", "prefect-postgres", "prefect-services", "prefect-migrate",
                 "prefect-server"):
        for doc in docs:
            if doc["metadata"]["name"] == name and pod_spec(doc) is not None:
                stolen.update(pod_labels(doc))
    job = render_flow_run_job("prefect-server", {"image": IMAGE, "labels": stolen})
    return dict(job["spec"]["template"]["metadata"]["labels"])


def test_a_spoofed_flow_run_reaches_neither_redis_nor_postgres(
        docs: list[dict[str, Any]]) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    everyone = pods(docs)
    spoof = (NAMESPACE, spoofed_flow_run(docs))
    # prefect-kubernetes labels the pod with the flow's name...
    assert spoof[1]["app.kubernetes.io/name"] == "prefect-server"
    # ...but the reserved label stays the template's.
    assert spoof[1]["taxi-pipeline/workload"] == "flow-run"
    for name, port in (("prefect-redis", 6379), ("prefect-postgres", 5432)):
        if name in everyone:
            assert not allowed(policies, spoof, everyone[name], port), name
            assert allowed(policies, everyone["prefect-server"], everyone[name], port), name
    # It is still a client of the API, like every flow run.
    assert allowed(policies, spoof, everyone["prefect-server"], 4200)


def test_a_spoofed_flow_run_is_no_endpoint_of_a_service(docs: list[dict[str, Any]]) -> None:
    """A Service selecting it would send the server's clients (and their auth string),
    or the server's database connections, to the flow run."""
    spoof = spoofed_flow_run(docs)
    everyone = pods(docs)
    for service in (d for d in docs if d["kind"] == "Service"):
        selector = service["spec"]["selector"]
        assert not selects({"matchLabels": selector}, spoof), service["metadata"]["name"]
        assert [n for n, (_, labels) in everyone.items()
                if selects({"matchLabels": selector}, labels)] == [service["metadata"]["name"]]
    for pdb in (d for d in docs if d["kind"] == "PodDisruptionBudget"):
        assert not selects(pdb["spec"]["selector"], spoof), pdb["metadata"]["name"]


def test_reachability_matrix(docs: list[dict[str, Any]]) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    deny = find(docs, "NetworkPolicy", "default-deny-ingress")["spec"]
    assert deny == {"podSelector": {}, "policyTypes": ["Ingress"]}
    everyone = pods(docs)
    everyone["stranger"] = (NAMESPACE, {"app.kubernetes.io/name": "something-else"})
    everyone["other-namespace"] = ("default", {"taxi-pipeline/prefect-client": "true",
                                               "taxi-pipeline/workload": "prefect-server"})
    clients = {"prefect-worker", "taxi-bridge", "flow-run", "taxi-deploy", "taxi-exporter",
               "prefect-exporter"} & set(everyone)
    for name, pod in everyone.items():
        assert allowed(policies, pod, everyone["prefect-server"], 4200) is (name in clients), name
        for db, port in (("prefect-postgres", 5432), ("prefect-redis", 6379)):
            if db in everyone:
                assert allowed(policies, pod, everyone[db], port) is (
                    name in DATABASE_CLIENTS[db]), (name, db)
        assert not allowed(policies, pod, everyone["prefect-worker"], 8080), name
        assert not allowed(policies, pod, everyone["taxi-bridge"], 8080), name
    labelled = {n for n, (_, labels) in everyone.items()
                if labels.get("taxi-pipeline/prefect-client") == "true" and n != "other-namespace"}
    assert labelled == clients


def test_postgres_and_redis_reach_nothing(docs: list[dict[str, Any]]) -> None:
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    everyone = pods(docs)
    outside = ("kube-system", {"k8s-app": "kube-dns"})
    for db in ("prefect-postgres", "prefect-redis"):
        if db not in everyone:
            continue
        for target in [*everyone.values(), outside]:
            for port in (53, 443, 4200, 5432, 6379):
                assert not allowed(policies, everyone[db], target, port), (db, target, port)
    # The server still reaches both, and the bridge and flow runs the outside world.
    assert allowed(policies, everyone["taxi-bridge"], outside, 53)
    assert allowed(policies, everyone["flow-run"], ("elsewhere", {}), 443)


@pytest.mark.parametrize("collector_namespace", ["gke-gmp-system", "gmp-system"])
def test_managed_prometheus_scrapes_the_bridge(docs: list[dict[str, Any]],
                                               collector_namespace: str) -> None:
    """Managed collection (the GKE default, Autopilot's only mode) runs its collectors
    in gke-gmp-system; self-deployed collection in gmp-system."""
    policies = [d for d in docs if d["kind"] == "NetworkPolicy"]
    everyone = pods(docs)
    collector = (collector_namespace, {"app.kubernetes.io/name": "collector"})
    assert allowed(policies, collector, everyone["taxi-bridge"], 8080)
    assert not allowed(policies, collector, everyone["prefect-server"], 4200)
    assert not allowed(policies, ("default", {}), everyone["taxi-bridge"], 8080)
    # The pipeline exporter and PrefectHQ's exporter (k8s/base/monitoring.yaml).
    for exporter, port in (("taxi-exporter", 9464), ("prefect-exporter", 8000)):
        assert allowed(policies, collector, everyone[exporter], port), exporter
        assert not allowed(policies, ("default", {}), everyone[exporter], port), exporter
        assert not allowed(policies, everyone["flow-run"], everyone[exporter], port), exporter


def test_the_job_template_offers_no_labels_variable() -> None:
    template = json.loads(JOB_TEMPLATE.read_text())
    assert "labels" not in template["variables"]["properties"]
    assert "{{ labels }}" not in json.dumps(template["job_configuration"])
    pod_labels_ = template["job_configuration"]["job_manifest"]["spec"]["template"][
        "metadata"]["labels"]
    assert pod_labels_["taxi-pipeline/workload"] == "flow-run"
