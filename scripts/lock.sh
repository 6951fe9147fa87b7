#!/usr/bin/env bash
# Resolve every dependency afresh (runtime, local and dev) and write constraints.txt, the
# exact versions bootstrap.sh, the image and the deploy job install. Run it after
# changing a dependency in pyproject.toml, then run scripts/test.sh and commit both:
# what ships is what the tests ran on (an unpinned SQLAlchemy once broke Prefect's
# scheduler in a fresh install).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
"$PYTHON" -m venv "$work/venv"
"$work/venv/bin/pip" install --quiet --disable-pip-version-check --upgrade pip
"$work/venv/bin/pip" install --quiet --disable-pip-version-check '.[dev,local]'
{
  echo "# Exact versions of every dependency, runtime and dev, as resolved by"
  echo "# scripts/lock.sh on $(date -u +%Y-%m-%d) with $("$work/venv/bin/python" -V)."
  echo "# Installed with \`pip install -c constraints.txt\` by scripts/bootstrap.sh, the"
  echo "# Dockerfile and the deploy workflow. Do not edit by hand: change pyproject.toml,"
  echo "# run scripts/lock.sh, then scripts/test.sh."
  "$work/venv/bin/pip" freeze --disable-pip-version-check --exclude taxi-pipeline
} > constraints.txt.new
# What moved, for the commit message and the review: "< old" and "> new" pins.
changes=$(diff <(grep -v '^#' constraints.txt 2>/dev/null || true) \
               <(grep -v '^#' constraints.txt.new) | grep '^[<>]' || true)
mv constraints.txt.new constraints.txt
echo "wrote constraints.txt ($(grep -c '==' constraints.txt) pins)"
if [ -n "$changes" ]; then echo "$changes"; else echo "no version changed"; fi
