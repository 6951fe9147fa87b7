"""`up`'s wait loop: a supervisor may stop it the moment it says "Running."."""

from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from taxi_pipeline import cli
from taxi_pipeline.settings import Settings
from taxi_pipeline.stack.local import LocalStack


class SignalOnRunning(io.StringIO):
    """Stdout that sends this process SIGTERM as soon as "Running." is written,
    as a supervisor reading `up`'s output does."""

    def write(self, text: str) -> int:
        written = super().write(text)
        if text.startswith("Running."):
            os.kill(os.getpid(), signal.SIGTERM)
        return written


@pytest.fixture
def restored_handlers() -> Iterator[None]:
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in saved.items():
            signal.signal(sig, handler)


@pytest.mark.usefixtures("restored_handlers")
def test_sigterm_right_after_running_stops_cleanly(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # What `up` installs while starting: SIGTERM unwinds like Ctrl-C (exit 130).
    signal.signal(signal.SIGTERM, cli._interrupt)
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    out = SignalOnRunning()
    monkeypatch.setattr(sys, "stdout", out)
    try:
        settings = Settings(home=tmp_path / "home")
        code = cli._run_until_stopped(LocalStack(settings), settings,
                                      [("sleeper", child, tmp_path / "sleeper.log")])
    except KeyboardInterrupt:
        pytest.fail("SIGTERM just after 'Running.' unwound as Ctrl-C: `up` exits 130")
    finally:
        child.kill()
        child.wait()
    assert code == 0, out.getvalue()
    assert "Stopping..." in out.getvalue()


@pytest.mark.usefixtures("restored_handlers")
def test_a_watched_emulator_that_exits_stops_the_wait_with_its_log(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Emulators are watched, not restarted: one that exits ends `up` (exit 1)."""
    child = subprocess.Popen([sys.executable, "-c", "raise SystemExit(3)"])
    child.wait()
    log = tmp_path / "pubsub.log"
    settings = Settings(home=tmp_path / "home")
    assert cli._run_until_stopped(LocalStack(settings), settings,
                                  [("Pub/Sub emulator", child, log)]) == 1
    assert f"Pub/Sub emulator exited with code 3; see {log}" in capsys.readouterr().err
