"""`taxi-pipeline --version`, every subcommand's --help, and the folders `up` makes."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from taxi_pipeline import cli
from taxi_pipeline.settings import Settings


def subcommands(parser: argparse.ArgumentParser, prefix: tuple[str, ...] = ()
                ) -> list[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    found = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found.append(((*prefix, name), child))
                found += subcommands(child, (*prefix, name))
    return found


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["--version"])
    assert exit_.value.code == 0
    assert re.fullmatch(r"taxi-pipeline \d+\.\d+\.\d+\S*\n", capsys.readouterr().out)


def test_every_subcommand_has_a_description_defaults_and_an_example() -> None:
    found = subcommands(cli.build_parser())
    assert {names[0] for names, _ in found} >= {"up", "demo", "sample", "reemit", "reconcile",
                                                 "status", "backfill", "gcp"}
    for names, parser in found:
        text = parser.format_help()
        assert parser.description, names
        assert "example" in text, names
        examples = text.split("example", 1)[1].splitlines()[1:]
        assert examples and all(" ".join(("taxi-pipeline", *names)) in line
                                for line in examples if line.strip()), (names, examples)
        # Every shown example parses (comments and leading VAR=value aside).
        for line in filter(str.strip, examples):
            words = [w for w in shlex.split(line.split("#")[0]) if "=" not in w
                     or w.startswith("-")]
            cli.build_parser().parse_args(words[1:])
        for action in parser._actions:
            if (action.option_strings and action.default not in (None, False)
                    and action.default is not argparse.SUPPRESS):
                assert "default" in (action.help or "") or "(default: " in text, (names, action)


def test_sample_help_shows_its_defaults() -> None:
    (sample,) = [p for n, p in subcommands(cli.build_parser()) if n == ("sample",)]
    text = " ".join(sample.format_help().split())
    assert "rows to write (default: 100000)" in text
    assert "(default: 0)" in text


def test_up_makes_a_raw_folder_per_known_dataset(tmp_path: Path) -> None:
    settings = Settings(profile="local", home=tmp_path)
    made = cli.raw_dataset_dirs(settings)
    assert [p.name for p in made] == ["yellow", "green", "fhv", "fhvhv"]
    assert all(p.is_dir() and p.parent == settings.bucket_dir / "raw" for p in made)
    assert cli.raw_dataset_dirs(settings) == made  # again: nothing to do, no error


@pytest.mark.parametrize(("argv", "usage", "hint"), [
    (["status", "--stalld"], "usage: taxi-pipeline status", "did you mean --stalled?"),
    (["dead-letters", "list", "--limt", "3"], "usage: taxi-pipeline dead-letters list",
     "did you mean --limit?"),
    (["reemit", "--prefix", "raw/"], "usage: taxi-pipeline reemit",
     "taxi-pipeline reemit raw/green/ --since"),
])
def test_a_wrong_flag_gets_its_subcommands_usage_and_the_nearest_flag(
        argv: list[str], usage: str, hint: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(usage), err
    assert "usage: taxi-pipeline [-h]" not in err
    assert hint in err


def test_what_the_stack_prints_exists_for_this_run(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The demo's headless server advertises no UI; `up` says whether the TLC download
    is scheduled (and how to turn it off)."""
    from taxi_pipeline.settings import Settings
    from taxi_pipeline.stack.local import LocalStack

    settings = Settings(home=tmp_path / "home")
    cli._print_stack(LocalStack(settings, ui=False, api_url="http://127.0.0.1:5/api"), settings)
    out = capsys.readouterr().out
    assert "UI" not in out.splitlines()[0] or "no UI" in out.splitlines()[0]
    assert "Prefect API          http://127.0.0.1:5/api" in out
    assert "Scheduled download" not in out
    cli._print_stack(LocalStack(settings, ui=True, api_url="http://127.0.0.1:5/api"), settings)
    out = capsys.readouterr().out
    assert "Prefect UI and API   http://127.0.0.1:5" in out
    assert "Scheduled download   on: yellow, green at cron '0 6 * * *'" in out
    quiet = Settings(home=tmp_path / "home", download_cron="")
    assert cli.download_schedule_line(quiet).startswith("off")
