"""`TAXI_PROFILE=emulator taxi-pipeline up` as a user runs it, and what it prints.

Stopping it and checking that nothing is left is `support.local_e2e.stop_up`
(the same for both profiles).
"""

from __future__ import annotations

import shlex
import subprocess
from dataclasses import dataclass
from pathlib import Path

from support.local_e2e import launch_up

# Set by a user's shell for one stack; `up` must not need (or be confused by) any of them.
_FOREIGN = ("TAXI_", "PREFECT_API", "PUBSUB_EMULATOR_HOST", "STORAGE_EMULATOR_HOST",
            "BIGQUERY_EMULATOR_HOST", "CLOUDSDK_")


@dataclass
class RunningUp:
    process: subprocess.Popen[str]
    home: Path
    lines: list[str]

    def line(self, prefix: str) -> str:
        """The first printed line that starts with `prefix` (indentation stripped)."""
        for line in self.lines:
            if line.strip().startswith(prefix):
                return line.strip()
        raise AssertionError(f"`up` printed no line starting with {prefix!r}:\n"
                             + "".join(self.lines))

    def field(self, label: str, index: int = 1) -> str:
        """A whitespace-separated field of the line labelled `label`, e.g. an endpoint."""
        return self.line(label)[len(label):].split()[index - 1]

    def command_after(self, header: str, offset: int = 1) -> str:
        """The command printed `offset` lines below the line starting with `header`."""
        stripped = [line.strip() for line in self.lines]
        for number, line in enumerate(stripped):
            if line.startswith(header):
                return stripped[number + offset]
        raise AssertionError(f"`up` printed no {header!r}:\n" + "".join(self.lines))

    def exports(self) -> dict[str, str]:
        """The variables of the printed `export ...` line."""
        words = shlex.split(self.line("export "))[1:]
        return dict(word.split("=", 1) for word in words)


def start_emulator_up(home: Path) -> RunningUp:
    """`taxi-pipeline up` on the emulator profile, in its own process group, once it runs."""
    up, lines = launch_up(home, {"TAXI_PROFILE": "emulator"}, _FOREIGN)
    return RunningUp(up, home, lines)
