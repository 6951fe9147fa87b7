#!/usr/bin/env bash
# Install everything, then run lint, types and the whole test suite (end-to-end included).
#   scripts/test.sh            the full suite (what .ci/run runs)
#   scripts/test.sh --quick    the edit loop: every test not marked e2e, plus the one
#                              end-to-end drop marked quick (a file through the whole chain)
# Extra arguments go to pytest (e.g. `tests/test_transform.py -k green`).
set -euo pipefail
cd "$(dirname "$0")/.."
select=()
if [ "${1:-}" = "--quick" ]; then
  shift
  select=(-m "not e2e or quick")
fi
scripts/bootstrap.sh
# Test stack: fake-gcs-server and the BigQuery emulator (own venv); PostgreSQL for
# the Prefect server of the integration tests. The Pub/Sub emulator ships with gcloud.
scripts/install-emulators.sh
scripts/install-linters.sh
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null
fi
# Redis (Debian's redis-server) for the Prefect server in its production configuration.
if ! command -v redis-server >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null
fi
# systemd-analyze verifies the systemd unit (scripts/systemd/).
if ! command -v systemd-analyze >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq systemd >/dev/null
fi
# Prometheus and promtool (Debian's prometheus package) for the monitoring tests
# (alert rules, a real Prometheus scraping the stack). Its postinst would start the
# service where an init system runs: a policy-rc.d that refuses is put in place first
# if the machine has none (containers usually do), and removed after.
if ! command -v promtool >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  policy_rc=""
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
    policy_rc=1
  fi
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
    --no-install-recommends prometheus >/dev/null
  if [ -n "$policy_rc" ]; then rm -f /usr/sbin/policy-rc.d; fi
fi
.venv/bin/ruff check .
.venv/bin/mypy
# Three workers on two cores, one test file each at a time (files share their
# servers through module fixtures): much of an end-to-end test is waiting on
# schedules, retries and redeliveries, so a third file fills that time (measured:
# 12.1 minutes instead of 15.3 with two; CPU busy 84% instead of 67%).
# TAXI_TEST_WORKERS=0 runs everything in this process.
# Everything a test needs was installed above, so a skip here is a failure (a moved
# file or a broken install must not pass as "skipped"): tests/conftest.py.
export TAXI_TEST_STRICT_SKIPS=1
exec .venv/bin/pytest -n "${TAXI_TEST_WORKERS:-3}" --dist loadfile --no-loadscope-reorder \
  ${select[@]+"${select[@]}"} "$@"
