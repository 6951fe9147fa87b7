#!/usr/bin/env bash
# Create .venv (if missing) and install the project with its dev tools and the local
# profile's extra (embedded PostgreSQL, DuckDB) into it,
# at the versions pinned in constraints.txt.
# Safe to run again: pip skips what is already satisfied.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
  .venv/bin/pip install --quiet --upgrade pip
fi
# constraints.txt: the exact versions the tests ran on (scripts/lock.sh writes it).
stamp=.venv/.installed-$(cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)
if [ ! -f "$stamp" ]; then
  .venv/bin/pip install --quiet --disable-pip-version-check -c constraints.txt -e '.[dev,local]'
  rm -f .venv/.installed-*
  touch "$stamp"
fi
