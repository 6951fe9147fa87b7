"""constraints.txt pins what ships to what the tests ran on.

bootstrap.sh, the Dockerfile and the deploy workflow install with
`-c constraints.txt`; these tests fail when pyproject.toml and the pins
disagree (a dependency changed without `scripts/lock.sh`), and when the
environment running the tests is not the pinned one.
"""

from __future__ import annotations

import importlib.metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def pins() -> dict[str, Version]:
    found: dict[str, Version] = {}
    for number, line in enumerate((REPO / "constraints.txt").read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, version = line.partition("==")
        assert sep and name and version and not any(c in line for c in ";@<>~! "), \
            f"constraints.txt:{number}: {line!r} is not an exact pin (name==version)"
        key = canonicalize_name(name)
        assert key not in found, f"constraints.txt:{number}: {name} is pinned twice"
        found[key] = Version(version)
    return found


def requirements() -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in project.get("optional-dependencies", {}).values():
        declared += extra
    return [Requirement(text) for text in declared]


def test_every_declared_dependency_is_pinned_within_its_range() -> None:
    pinned = pins()
    for requirement in requirements():
        key = canonicalize_name(requirement.name)
        assert key in pinned, f"{requirement.name} is not in constraints.txt: run scripts/lock.sh"
        assert requirement.specifier.contains(pinned[key], prereleases=True), (
            f"constraints.txt pins {requirement.name}=={pinned[key]}, outside pyproject's "
            f"{requirement}: run scripts/lock.sh")


def test_the_project_itself_is_not_pinned() -> None:
    assert "taxi-pipeline" not in pins()


def test_the_tests_run_on_the_pinned_versions() -> None:
    wrong = {}
    for name, version in pins().items():
        try:
            installed = Version(importlib.metadata.version(name))
        except importlib.metadata.PackageNotFoundError:
            wrong[name] = "not installed"
            continue
        if installed != version:
            wrong[name] = f"{installed} installed"
    assert not wrong, (f"this environment is not constraints.txt's: {wrong}; "
                       "run scripts/bootstrap.sh")
