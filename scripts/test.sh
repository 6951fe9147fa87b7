#!/usr/bin/env bash
# Install everything, then run lint, types and the whole test suite (end-to-end included).
# Extra arguments go to pytest (e.g. `-m "not e2e"` for the fast tests only).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
.venv/bin/ruff check .
.venv/bin/mypy
exec .venv/bin/pytest "$@"
