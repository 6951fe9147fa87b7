"""Every command the README and docs/ show exists: pasted, it gets past the CLI's parser.

The shell blocks (```bash, ```sh, ```shell) of README.md, docs/*.md and
k8s/README.md are split into commands the way a shell would (continuations,
comments, pipes, `&&`, `;`, redirections, `VAR=value` prefixes). Each
`taxi-pipeline` command is handed to the CLI's own argparse parser, so a
renamed subcommand, a dropped flag or a value the parser refuses fails here
with the page and line. Scripts, benchmarks and `python -m` modules the blocks
run must exist too.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest

from taxi_pipeline.cli import build_parser

REPO = Path(__file__).resolve().parent.parent
PAGES = sorted([REPO / "README.md", REPO / "k8s" / "README.md", *(REPO / "docs").glob("*.md")])
SHELL_FENCE = re.compile(r"^(\s*)```(bash|sh|shell|console)\s*$")
OPERATORS = {"|", "||", "&&", ";", "&", ">", ">>", "<", "2>", "2>&1", "(", ")", "$("}
ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")


@dataclass(frozen=True)
class Command:
    page: str
    line: int
    argv: tuple[str, ...]

    def __str__(self) -> str:
        return f"{self.page}:{self.line}: {shlex.join(self.argv)}"


def shell_blocks(page: Path) -> list[tuple[int, str]]:
    """(first line number, text) of each shell block of a Markdown page."""
    blocks: list[tuple[int, str]] = []
    lines = page.read_text().splitlines()
    start: int | None = None
    body: list[str] = []
    for number, line in enumerate(lines, 1):
        if start is None:
            if SHELL_FENCE.match(line):
                start, body = number + 1, []
        elif line.strip().startswith("```"):
            blocks.append((start, "\n".join(body)))
            start = None
        else:
            body.append(line)
    return blocks


def commands_of(text: str) -> list[tuple[int, list[str]]]:
    """Each simple command of a shell block with its line offset, assignments dropped."""
    found: list[tuple[int, list[str]]] = []
    logical, first = "", 0
    for offset, line in enumerate(text.splitlines()):
        if not logical:
            first = offset
        logical += line[:-1] + " " if line.rstrip().endswith("\\") else line
        if line.rstrip().endswith("\\"):
            continue
        lexer = shlex.shlex(logical.replace("$(", " ( "), posix=True,
                            punctuation_chars="|&;<>()")
        lexer.whitespace_split = True
        lexer.commenters = "#"
        current: list[str] = []
        for token in [*lexer, ";"]:
            if token in OPERATORS or set(token) <= set("|&;<>()"):
                while current and ASSIGNMENT.match(current[0]):
                    current.pop(0)
                if current:
                    found.append((first, current))
                current = []
            else:
                current.append(token)
        logical = ""
    return found


def documented_commands() -> list[Command]:
    commands: list[Command] = []
    for page in PAGES:
        for start, text in shell_blocks(page):
            for offset, argv in commands_of(text):
                commands.append(Command(str(page.relative_to(REPO)), start + offset,
                                        tuple(argv)))
    return commands


COMMANDS = documented_commands()
CLI = [c for c in COMMANDS if Path(c.argv[0]).name == "taxi-pipeline"]


def parse_error(argv: tuple[str, ...]) -> str | None:
    """What the CLI's parser says about `argv`, or None when it takes it."""
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            build_parser().parse_args(list(argv))
    except SystemExit as exit_:
        return None if exit_.code in (0, None) else err.getvalue().strip() or str(exit_)
    return None


def test_the_pages_show_the_cli_at_all() -> None:
    """The extraction finds what it must: a test that finds nothing proves nothing."""
    subcommands = {c.argv[1] for c in CLI if len(c.argv) > 1}
    assert {"up", "sample", "status", "reemit", "reconcile"} <= subcommands, subcommands
    assert any(c.page == "README.md" for c in CLI)
    assert len(CLI) >= 30, len(CLI)


@pytest.mark.parametrize("command", CLI, ids=str)
def test_every_taxi_pipeline_command_in_the_docs_parses(command: Command) -> None:
    error = parse_error(command.argv[1:])
    assert error is None, f"{command}\n{error}"


def test_a_wrong_flag_or_subcommand_is_caught() -> None:
    """The check itself: a flag or subcommand that does not exist is refused."""
    assert parse_error(("status", "--stalled")) is None
    assert parse_error(("status", "--no-such-flag")) is not None
    assert parse_error(("reemit", "--prefix", "raw/")) is not None  # reemit takes no --prefix
    assert parse_error(("no-such-command",)) is not None
    block = "TAXI_PROFILE=emulator .venv/bin/taxi-pipeline up && echo done | tee x  # note\n"
    assert [argv for _, argv in commands_of(block)] == [
        [".venv/bin/taxi-pipeline", "up"], ["echo", "done"], ["tee", "x"]]
    assert [argv for _, argv in commands_of("taxi-pipeline status \\\n  --json\n")] == [
        ["taxi-pipeline", "status", "--json"]]


def _runs(command: Command) -> str | None:
    """The repo file or module a command runs, when it names one of ours."""
    argv = list(command.argv)
    if Path(argv[0]).name.startswith("python") and len(argv) > 2 and argv[1] == "-m":
        return argv[2]
    if Path(argv[0]).name.startswith("python") and len(argv) > 1 and argv[1].endswith(".py"):
        return argv[1]
    if argv[0].startswith(("./scripts/", "scripts/", ".ci/")):
        return argv[0]
    if argv[0] in {"bash", "sh"} and len(argv) > 1:
        return argv[1]
    return None


RUNS = [(c, target) for c in COMMANDS if (target := _runs(c)) is not None]


@pytest.mark.parametrize(("command", "target"), RUNS, ids=[str(c) for c, _ in RUNS])
def test_every_script_and_module_the_docs_run_exists(command: Command, target: str) -> None:
    if target.endswith((".py", ".sh")) or "/" in target:
        assert (REPO / target.removeprefix("./")).is_file(), f"{command}: no {target}"
    else:
        assert importlib.util.find_spec(target) is not None, f"{command}: no module {target}"
