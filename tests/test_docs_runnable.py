"""The shell blocks the docs mark as runnable run, as pasted, on a fresh TAXI_HOME.

Marker (docs/testing.md): an HTML comment on the line before a ```bash fence,
`<!-- runnable: up -->` for a block that needs `taxi-pipeline up` running (the
test starts one on a fresh TAXI_HOME first), `<!-- runnable -->` for one that
does not. Each block runs with `bash -e` from a scratch directory where `.venv`
points at this checkout's, so files the commands write stay out of the repo;
every command must succeed.
"""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest
from support.local_e2e import running_up

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
MARKER = re.compile(r"^<!--\s*runnable(?::\s*(up))?\s*-->\s*$")


def runnable_blocks() -> list[tuple[str, int, bool, str]]:
    """(page, line, needs up, text) of every marked block."""
    found = []
    for page in PAGES:
        lines = page.read_text().splitlines()
        for number, line in enumerate(lines):
            marker = MARKER.match(line.strip())
            if not marker:
                continue
            assert lines[number + 1].strip() == "```bash", \
                f"{page.name}:{number + 1}: a runnable marker must precede a ```bash fence"
            end = lines.index("```", number + 2)
            found.append((str(page.relative_to(REPO)), number + 2, marker.group(1) == "up",
                          "\n".join(lines[number + 2:end])))
    return found


BLOCKS = runnable_blocks()


def test_the_readme_marks_its_daily_use_block() -> None:
    assert any(page == "README.md" and up for page, _, up, _ in BLOCKS)


def run_block(text: str, home: Path, workdir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("TAXI_", "PREFECT_API"))}
    env["TAXI_HOME"] = str(home)
    return subprocess.run(["bash", "-e", "-c", text], cwd=workdir, env=env,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.e2e
@pytest.mark.parametrize(("page", "line", "needs_up", "text"), BLOCKS,
                         ids=[f"{p}:{n}" for p, n, _, _ in BLOCKS])
def test_a_runnable_block_runs_as_pasted(page: str, line: int, needs_up: bool, text: str,
                                         tmp_path: Path) -> None:
    home = tmp_path / "home"
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / ".venv").symlink_to(REPO / ".venv")
    if needs_up:
        with running_up(home):
            done = run_block(text, home, workdir)
    else:
        done = run_block(text, home, workdir)
    assert done.returncode == 0, f"{page}:{line}\n{text}\n--- out\n{done.stdout}\n" \
                                 f"--- err\n{done.stderr}"
