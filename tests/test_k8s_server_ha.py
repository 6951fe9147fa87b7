"""The Prefect server's HA layout, the overlays, and Pod Security on the rendered objects.

- the database connection budget: what every Prefect process may open, at the peak of
  a rollout, fits PostgreSQL's max_connections with a reserve;
- the API is 2 replicas with a PDB, the services and the migration Job exist in every
  overlay, and nothing but the migration Job migrates;
- the cloudsql overlay: Cloud SQL Auth Proxy as a native sidecar, IAM database
  authentication, Workload Identity, no password and no in-cluster PostgreSQL;
- Pod Security Standard "restricted", field by field, on every rendered pod;
- the bridge (and the API) spread over nodes and zones.
"""

from __future__ import annotations

from typing import Any

import pytest
from support.k8s import BASE, OVERLAYS, REPO, containers, find, pod_labels, pod_spec, render

OVERLAY_NAMES = [p.name for p in OVERLAYS]
CLOUD_SQL_MAX_CONNECTIONS_FLAG = "max_connections=100"
# Connections PostgreSQL keeps for superusers, plus room for a person with psql and a
# backup or monitoring session.
RESERVED_CONNECTIONS = 3 + 5
POOL = "PREFECT_SERVER_DATABASE_SQLALCHEMY_POOL_SIZE"
OVERFLOW = "PREFECT_SERVER_DATABASE_SQLALCHEMY_MAX_OVERFLOW"


@pytest.fixture(scope="module", params=["base", *OVERLAY_NAMES])
def docs(request: pytest.FixtureRequest) -> list[dict[str, Any]]:
    if request.param == "base":
        return render(BASE)
    return render(REPO / "k8s" / "overlays" / request.param)


@pytest.fixture(scope="module")
def cloudsql() -> list[dict[str, Any]]:
    return render(REPO / "k8s" / "overlays" / "cloudsql")


def test_the_overlays() -> None:
    assert OVERLAY_NAMES == ["cloudsql", "dev", "gke"]


def main_container(doc: dict[str, Any]) -> dict[str, Any]:
    spec = pod_spec(doc) or {}
    (container,) = [c for c in spec["containers"] if c["name"] == doc["metadata"]["name"]]
    return container


def setting(docs: list[dict[str, Any]], doc: dict[str, Any], name: str) -> str:
    """A setting as the container sees it: its env wins over the ConfigMap (envFrom)."""
    c = main_container(doc)
    for env in c.get("env", []):
        if env["name"] == name:
            return str(env["value"])
    for source in c.get("envFrom", []):
        data = find(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
        if name in data:
            return str(data[name])
    raise AssertionError(f"{doc['metadata']['name']} has no {name}")


def peak_pods(doc: dict[str, Any]) -> int:
    """Pods of a workload at the peak of a rolling update (replicas + maxSurge)."""
    if doc["kind"] == "Job":
        return int(doc["spec"].get("parallelism", 1))
    spec = doc["spec"]
    surge = spec.get("strategy", {}).get("rollingUpdate", {}).get("maxSurge", "25%")
    assert isinstance(surge, int), f"{doc['metadata']['name']}: give maxSurge as a number"
    assert spec.get("strategy", {}).get("type", "RollingUpdate") == "RollingUpdate"
    return int(spec["replicas"]) + surge


def max_connections(docs: list[dict[str, Any]]) -> int:
    config = find(docs, "ConfigMap", "prefect-server-config")
    budget = int(config["metadata"]["annotations"]["taxi-pipeline/database-max-connections"])
    postgres = [d for d in docs if d["kind"] == "StatefulSet"
                and d["metadata"]["name"] == "prefect-postgres"]
    if postgres:  # the in-cluster PostgreSQL is started with exactly that limit
        (c,) = (pod_spec(postgres[0]) or {})["containers"]
        args = c.get("args", [])
        assert f"max_connections={budget}" in [args[i + 1] for i, a in enumerate(args)
                                                if a == "-c"], args
    else:  # Cloud SQL: the guide creates the instance with that flag
        assert f"max_connections={budget}" == CLOUD_SQL_MAX_CONNECTIONS_FLAG
        assert CLOUD_SQL_MAX_CONNECTIONS_FLAG in (REPO / "k8s" / "README.md").read_text()
    return budget


def test_the_pools_fit_max_connections_through_a_rollout(docs: list[dict[str, Any]]) -> None:
    """Every process that opens database connections, at its rollout peak, with its pool
    and overflow, plus the schema waits and the migration Job, plus a reserve."""
    budget = max_connections(docs)
    peak = RESERVED_CONNECTIONS
    lines = []
    for kind, name in (("Deployment", "prefect-server"), ("Deployment", "prefect-services"),
                       ("Job", "prefect-migrate")):
        doc = find(docs, kind, name)
        per_pod = int(setting(docs, doc, POOL)) + int(setting(docs, doc, OVERFLOW))
        pods = peak_pods(doc)
        peak += pods * per_pod
        lines.append(f"{name}: {pods} x {per_pod}")
        # Init containers that connect (the schema wait) hold one connection each, briefly.
        for init in (pod_spec(doc) or {}).get("initContainers", []):
            env = {e["name"]: e.get("value") for e in init.get("env", [])}
            if "PREFECT_API_DATABASE_CONNECTION_URL" in env:
                assert env[POOL] == "1" and env[OVERFLOW] == "0", init["name"]
                peak += pods
    # Everything else that talks to Prefect goes through the API, never to the database.
    connecting = {(d["kind"], d["metadata"]["name"]) for d in docs if pod_spec(d) is not None
                  and any("PREFECT_API_DATABASE_CONNECTION_URL" in
                          {e["name"] for e in c.get("env", [])}
                          for c in containers(pod_spec(d) or {}))}
    assert connecting == {("Deployment", "prefect-server"), ("Deployment", "prefect-services"),
                          ("Job", "prefect-migrate")}
    assert peak <= budget, f"{peak} connections at the peak ({', '.join(lines)}) > {budget}"
    # The old configuration (20 + 30 per server pod) would not fit two API pods and a surge.
    assert budget < 3 * (20 + 30)


def test_the_api_is_replicated_and_nothing_but_the_job_migrates(
        docs: list[dict[str, Any]]) -> None:
    api = find(docs, "Deployment", "prefect-server")
    assert api["spec"]["replicas"] >= 2
    assert api["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert "--no-services" in main_container(api)["command"]
    pdb = find(docs, "PodDisruptionBudget", "prefect-server")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(api).items()
    assert 1 <= pdb["spec"]["minAvailable"] < api["spec"]["replicas"]
    services = find(docs, "Deployment", "prefect-services")
    assert main_container(services)["command"] == ["prefect", "server", "services", "start"]
    migrate = find(docs, "Job", "prefect-migrate")
    assert main_container(migrate)["command"] == ["prefect", "server", "database", "upgrade",
                                                  "-y"]
    for doc in (api, services):
        assert setting(docs, doc, "PREFECT_API_DATABASE_MIGRATE_ON_START") == "false"
        inits = [c for c in (pod_spec(doc) or {}).get("initContainers", [])
                 if c.get("restartPolicy") != "Always"]  # native sidecars excepted
        assert [c["command"] for c in inits] == [
            ["python", "-m", "taxi_pipeline.stack.prefect_schema"]]


def test_schema_ready_rule() -> None:
    from taxi_pipeline.stack.prefect_schema import schema_ready

    assert not schema_ready(None, {"b"}, {"a", "b"})  # unreachable
    assert not schema_ready(set(), {"b"}, {"a", "b"})  # first install, not migrated yet
    assert not schema_ready({"a"}, {"b"}, {"a", "b"})  # an older schema
    assert schema_ready({"b"}, {"b"}, {"a", "b"})
    assert schema_ready({"c"}, {"b"}, {"a", "b"})  # newer than this image: a rollback


# --- Cloud SQL ------------------------------------------------------------------------------

def test_cloudsql_has_no_database_in_the_cluster_and_no_password(
        cloudsql: list[dict[str, Any]]) -> None:
    names = {(d["kind"], d["metadata"]["name"]) for d in cloudsql}
    assert not {n for n in names if n[1] == "prefect-postgres"}
    assert not {n for n in names if n[1].endswith("-params")}  # local config only
    for doc in cloudsql:
        spec = pod_spec(doc)
        if spec is None:
            continue
        secrets = {e["valueFrom"]["secretKeyRef"]["name"] for c in containers(spec)
                   for e in c.get("env", []) if "secretKeyRef" in e.get("valueFrom", {})}
        secrets |= {v["secret"]["secretName"] for v in spec.get("volumes", []) if "secret" in v}
        assert "prefect-db" not in secrets, doc["metadata"]["name"]


def test_cloudsql_pods_connect_through_the_proxy_as_their_iam_user(
        cloudsql: list[dict[str, Any]]) -> None:
    gsa = find(cloudsql, "ServiceAccount", "prefect-server")["metadata"]["annotations"][
        "iam.gke.io/gcp-service-account"]
    assert gsa.startswith("prefect-server@") and gsa.endswith(".iam.gserviceaccount.com")
    iam_user = gsa.removesuffix(".gserviceaccount.com").replace("@", "%40")
    for kind, name in (("Deployment", "prefect-server"), ("Deployment", "prefect-services"),
                       ("Job", "prefect-migrate")):
        doc = find(cloudsql, kind, name)
        spec = pod_spec(doc) or {}
        assert spec["serviceAccountName"] == "prefect-server"
        proxy = spec["initContainers"][0]  # first: every later container may need it
        assert proxy["name"] == "cloud-sql-proxy" and proxy["restartPolicy"] == "Always"
        assert proxy["image"].startswith("gcr.io/cloud-sql-connectors/cloud-sql-proxy:2.")
        assert {"--auto-iam-authn", "--private-ip", "--port=5432"} <= set(proxy["args"])
        instance = proxy["args"][-1]
        assert instance.count(":") == 2, instance  # PROJECT:REGION:INSTANCE
        assert proxy["startupProbe"]["httpGet"]["path"] == "/startup"
        for c in containers(spec):
            for env in c.get("env", []):
                if env["name"] == "PREFECT_API_DATABASE_CONNECTION_URL":
                    assert env["value"] == (
                        f"postgresql+asyncpg://{iam_user}@127.0.0.1:5432/prefect"), env


def test_cloudsql_params_reach_the_manifests(tmp_path: Any) -> None:
    import shutil

    copy = tmp_path / "k8s"
    shutil.copytree(REPO / "k8s", copy)
    params = copy / "overlays" / "cloudsql" / "params.yaml"
    params.write_text(params.read_text().replace("PROJECT_ID", "acme-prod")
                      .replace("REGION", "europe-west4"))
    docs = render(copy / "overlays" / "cloudsql")
    proxy = (pod_spec(find(docs, "Deployment", "prefect-services")) or {})["initContainers"][0]
    assert proxy["args"][-1] == "acme-prod:europe-west4:taxi-prefect"
    url = next(e["value"] for e in main_container(find(docs, "Job", "prefect-migrate"))["env"]
               if e["name"] == "PREFECT_API_DATABASE_CONNECTION_URL")
    assert url == "postgresql+asyncpg://prefect-server%40acme-prod.iam@127.0.0.1:5432/prefect"


# --- Pod Security Standard "restricted" on the rendered objects ---------------------------

RESTRICTED_VOLUMES = {"configMap", "csi", "downwardAPI", "emptyDir", "ephemeral",
                      "persistentVolumeClaim", "projected", "secret"}


def pss_restricted_violations(spec: dict[str, Any]) -> list[str]:
    """The checks of the Pod Security Standard "restricted" (baseline included)."""
    found = []
    pod = spec.get("securityContext", {})
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(key):
            found.append(key)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {kinds}")
    if pod.get("sysctls"):
        found.append("sysctls")
    if pod.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    all_containers = [*containers(spec), *spec.get("ephemeralContainers", [])]
    for c in all_containers:
        sc = c.get("securityContext", {})
        where = c["name"]
        if sc.get("privileged"):
            found.append(f"{where}: privileged")
        if sc.get("allowPrivilegeEscalation") is not False:
            found.append(f"{where}: allowPrivilegeEscalation not false")
        if sc.get("runAsNonRoot", pod.get("runAsNonRoot")) is not True:
            found.append(f"{where}: runAsNonRoot")
        if sc.get("runAsUser", pod.get("runAsUser")) == 0:
            found.append(f"{where}: runAsUser 0")
        seccomp = sc.get("seccompProfile", pod.get("seccompProfile", {})).get("type")
        if seccomp not in ("RuntimeDefault", "Localhost"):
            found.append(f"{where}: seccompProfile {seccomp}")
        caps = sc.get("capabilities", {})
        if "ALL" not in caps.get("drop", []):
            found.append(f"{where}: capabilities not dropped")
        if set(caps.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{where}: capabilities added {caps['add']}")
        if sc.get("procMount", "Default") != "Default":
            found.append(f"{where}: procMount")
        if sc.get("seLinuxOptions", {}).get("type") not in (None, "", "container_t",
                                                           "container_init_t",
                                                           "container_kvm_t"):
            found.append(f"{where}: seLinuxOptions")
        if sc.get("appArmorProfile", {}).get("type") not in (None, "RuntimeDefault",
                                                            "Localhost"):
            found.append(f"{where}: appArmorProfile")
        for port in c.get("ports", []):
            if port.get("hostPort"):
                found.append(f"{where}: hostPort")
    return found


def test_every_pod_meets_pod_security_restricted(docs: list[dict[str, Any]]) -> None:
    """Every rendered pod template (sidecars and init containers included) of every overlay."""
    checked = 0
    for doc in docs:
        spec = pod_spec(doc)
        if spec is None:
            continue
        checked += 1
        assert not pss_restricted_violations(spec), (doc["metadata"]["name"],
                                                    pss_restricted_violations(spec))
    assert checked >= 7
    # The check catches what it should.
    bad = {"hostPID": True, "volumes": [{"name": "h", "hostPath": {"path": "/"}}],
           "containers": [{"name": "x",
                           "securityContext": {"capabilities": {"add": ["SYS_ADMIN"]}}}]}
    assert len(pss_restricted_violations(bad)) >= 6


# --- placement ------------------------------------------------------------------------------

def spread(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    spec = pod_spec(doc) or {}
    found = {}
    for constraint in spec.get("topologySpreadConstraints", []):
        assert constraint["labelSelector"]["matchLabels"].items() <= pod_labels(doc).items(), \
            constraint
        # Selects on the reserved label: a flow run cannot skew the spread.
        assert "taxi-pipeline/workload" in constraint["labelSelector"]["matchLabels"]
        found[constraint["topologyKey"]] = constraint
    return found


def test_the_bridge_spreads_over_nodes_and_zones(docs: list[dict[str, Any]]) -> None:
    bridge = find(docs, "Deployment", "taxi-bridge")
    assert bridge["spec"]["replicas"] >= 2
    constraints = spread(bridge)
    # Never two replicas on one node (required); zones where the region has them.
    assert constraints["kubernetes.io/hostname"]["whenUnsatisfiable"] == "DoNotSchedule"
    assert constraints["kubernetes.io/hostname"]["maxSkew"] == 1
    assert constraints["topology.kubernetes.io/zone"]["maxSkew"] == 1
    api = spread(find(docs, "Deployment", "prefect-server"))
    assert {"kubernetes.io/hostname", "topology.kubernetes.io/zone"} <= set(api)
