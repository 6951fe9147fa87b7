"""The GitHub Actions workflows: actionlint and zizmor find nothing, and they do
what the production path needs (tests on pull requests; on main a keyless build
tagged with the commit SHA, then a release by digest: k8s/rollout.sh or a GitOps commit)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from support.k8s import REPO, lint_tool

WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
PINNED = re.compile(r"^[\w.-]+/[\w./-]+@[0-9a-f]{40}$")


def load(path: Path) -> dict[Any, Any]:
    data = yaml.safe_load(path.read_text())
    # YAML 1.1 reads the key `on` as True.
    if True in data:
        data["on"] = data.pop(True)
    return dict(data)


def steps(workflow: dict[str, Any]) -> list[dict[str, Any]]:
    return [step for job in workflow["jobs"].values() for step in job.get("steps", [])]


def test_there_are_a_test_and_a_deploy_workflow() -> None:
    assert [p.name for p in WORKFLOWS] == ["deploy.yml", "tests.yml"]


def test_actionlint_finds_nothing() -> None:
    actionlint = lint_tool("actionlint")
    shellcheck = lint_tool("shellcheck")
    result = subprocess.run([str(actionlint), "-no-color", "-shellcheck", str(shellcheck),
                             *map(str, WORKFLOWS)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_zizmor_finds_nothing() -> None:
    """Offline: the audits that ask GitHub's API (impostor commits, tag/commit
    mismatches) cannot run here; pins are checked against the action's tag by hand."""
    zizmor = lint_tool("zizmor")
    result = subprocess.run([str(zizmor), "--offline", "--no-progress", "--format", "plain",
                             str(REPO / ".github" / "workflows")],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_action_is_pinned_by_commit_sha() -> None:
    for path in WORKFLOWS:
        for step in steps(load(path)):
            uses = step.get("uses")
            if uses and not uses.startswith(("./", "$/")):
                assert PINNED.match(uses), f"{path.name}: {uses}"
        text = path.read_text()
        for line in text.splitlines():
            if re.search(r"uses: [\w-]+/[\w./-]+@[0-9a-f]{40}", line):
                assert re.search(r"# v\d", line), f"{path.name}: say which tag: {line.strip()}"


def test_tests_run_on_pull_requests_with_read_only_permissions() -> None:
    tests = load(REPO / ".github" / "workflows" / "tests.yml")
    assert "pull_request" in tests["on"] and "workflow_call" in tests["on"]
    assert tests["permissions"] == {"contents": "read"}
    runs = [step.get("run", "") for step in steps(tests)]
    assert "scripts/test.sh" in runs
    for step in steps(tests):
        if step.get("uses", "").startswith("actions/checkout@"):
            assert step["with"]["persist-credentials"] is False


def test_deploy_builds_keyless_tags_by_sha_and_runs_deploy() -> None:
    workflow = load(REPO / ".github" / "workflows" / "deploy.yml")
    assert workflow["on"] == {"push": {"branches": ["main"]}}
    assert workflow["permissions"] == {}
    jobs = workflow["jobs"]
    assert jobs["tests"]["uses"].endswith(".github/workflows/tests.yml")
    assert jobs["image"]["needs"] == "tests" and jobs["deploy"]["needs"] == "image"
    for name in ("image", "deploy"):
        assert jobs[name]["permissions"] == {"contents": "read", "id-token": "write"}
    # The GitOps job never touches Google Cloud or the cluster: it commits a digest.
    assert jobs["gitops"]["permissions"] == {"contents": "write"}
    for step in steps(workflow):
        if step.get("uses", "").startswith("google-github-actions/auth@"):
            assert set(step["with"]) <= {"workload_identity_provider", "service_account",
                                         "token_format"}
            assert step["with"]["workload_identity_provider"] and step["with"]["service_account"]
    text = (REPO / ".github" / "workflows" / "deploy.yml").read_text()
    assert "credentials_json" not in text
    build = next(s for s in jobs["image"]["steps"] if s.get("id") == "build")
    assert build["env"]["SHA"] == "${{ github.sha }}"
    assert '--tag "${REPOSITORY}:${SHA}"' in build["run"]
    assert 'docker push "${REPOSITORY}:${SHA}"' in build["run"]
    # What the release jobs do, step by step: tests/test_k8s_rollout.py.


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_expressions_never_reach_a_shell_directly(path: Path) -> None:
    """Values go through env: (no template injection into `run:`)."""
    for step in steps(load(path)):
        assert "${{" not in step.get("run", ""), f"{path.name}: {step.get('name')}"
