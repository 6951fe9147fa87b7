#!/usr/bin/env bash
# Install everything, then run the demo on the embedded local profile:
# start a Prefect server, worker and bridge, drop a sample month, wait until it
# is queryable, print a summary, stop everything. Extra arguments go to `demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/bootstrap.sh
exec .venv/bin/taxi-pipeline demo "$@"
