"""The systemd unit that runs `taxi-pipeline up` as a service (scripts/systemd/).

systemd itself verifies the unit, pointed at this checkout (its paths and user
are the one thing an installer changes); what the unit relies on from `up` (a
SIGTERM stop well within TimeoutStopSec, exit 0) is measured by
test_e2e_local.py::test_up_stops_everything_on_sigterm against this file.
"""

from __future__ import annotations

import configparser
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
UNIT = REPO / "scripts" / "systemd" / "taxi-pipeline.service"
INSTALLED_AT = "/opt/taxi-pipeline"


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string(UNIT.read_text())
    return parser


def stop_timeout_seconds() -> float:
    return float(unit()["Service"]["TimeoutStopSec"])


def test_systemd_verifies_the_unit_pointed_at_this_checkout(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing (scripts/test.sh installs systemd)"
    cli = Path(sys.executable).with_name("taxi-pipeline")
    assert cli.exists()
    text = UNIT.read_text().replace(f"{INSTALLED_AT}/.venv/bin/taxi-pipeline", str(cli))
    text = text.replace(INSTALLED_AT, str(REPO)).replace("User=taxi", "User=root")
    text = text.replace("Group=taxi", "Group=root")
    local = tmp_path / "taxi-pipeline.service"
    local.write_text(text)
    done = subprocess.run([analyze, "verify", str(local)], capture_output=True, text=True,
                          timeout=60, check=False)
    problems = [line for line in done.stderr.splitlines() if str(local) in line
                or "taxi-pipeline.service" in line]
    assert done.returncode == 0 and not problems, done.stderr
    # The check catches a broken unit: a command that does not exist, a bad value.
    broken = tmp_path / "broken.service"
    broken.write_text(text.replace(str(cli), str(tmp_path / "missing")))
    assert subprocess.run([analyze, "verify", str(broken)], capture_output=True,
                          timeout=60, check=False).returncode != 0


def test_the_unit_runs_up_as_a_user_with_its_state_in_one_directory() -> None:
    service = unit()["Service"]
    assert service["ExecStart"] == f"{INSTALLED_AT}/.venv/bin/taxi-pipeline up"
    assert service["User"] != "root"  # PostgreSQL then runs as that user
    assert service["StateDirectory"] == "taxi-pipeline"
    environment = [line.split("=", 1)[1] for line in UNIT.read_text().splitlines()
                   if line.startswith("Environment=")]  # a key systemd lets repeat
    assert f"TAXI_HOME=/var/lib/{service['StateDirectory']}" in environment
    # SIGTERM to `up` alone: it stops its parts in order; systemd kills leftovers only
    # after the timeout; a crash loop (`up` exits 1) is restarted by systemd.
    assert (service["KillMode"], service["KillSignal"]) == ("mixed", "SIGTERM")
    assert service["Restart"] == "on-failure"
    assert stop_timeout_seconds() >= 60


@pytest.mark.parametrize("name", ["StandardOutput", "StandardError"])
def test_what_up_prints_goes_to_the_journal(name: str) -> None:
    assert unit()["Service"][name] == "journal"
