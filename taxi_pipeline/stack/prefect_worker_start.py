"""`prefect worker start`, with the settings-to-environment step of each submission made cheap.

For every flow run it submits, a Prefect worker serialises all of Prefect's
settings into environment variables, twice (the job configuration's base
environment, then the engine command's environment). `to_environment_variables`
dumps the whole settings tree and then dumps each sub-tree again for each
nested model, so one call is tens of milliseconds; profiled under a 200-file
burst (py-spy) it was 36% of the local worker's CPU. The settings a worker runs
with do not change while it runs (Prefect replaces the settings object, as
`temporary_settings` does, rather than editing it), so the answer for one settings
object is computed once; each caller still gets its own copy of the dict.

Only the root settings object is memoised, keyed by identity and kept alive
so its id() is never reused; a handful are kept, the most recent first. No
released Prefect (3.9.1 is the newest on PyPI as of 2026-11) caches this, hence
the hand-written wrapper; `tests/test_prefect_worker_start.py` fails if
Prefect's side of it changes.

Run it as `python -m taxi_pipeline.stack.prefect_worker_start [prefect worker start options]`.
"""

from __future__ import annotations

import functools
import sys
from collections import OrderedDict
from typing import Any

MEMO_SIZE = 8


def memoize_settings_environment() -> None:
    """Make `Settings.to_environment_variables` a lookup per settings object and arguments."""
    from prefect.settings.base import PrefectBaseSettings
    from prefect.settings.models.root import Settings

    original = PrefectBaseSettings.to_environment_variables
    if getattr(original, "_taxi_memoized", False):
        return
    memo: OrderedDict[tuple[int, bool, bool, bool], tuple[Any, dict[str, str]]] = OrderedDict()

    @functools.wraps(original)
    def to_environment_variables(self: PrefectBaseSettings, exclude_unset: bool = False,
                                 include_secrets: bool = True,
                                 include_aliases: bool = False) -> dict[str, str]:
        if type(self) is not Settings:
            return original(self, exclude_unset, include_secrets, include_aliases)
        key = (id(self), exclude_unset, include_secrets, include_aliases)
        cached = memo.get(key)
        if cached is None or cached[0] is not self:
            cached = (self, original(self, exclude_unset, include_secrets, include_aliases))
            memo[key] = cached
            while len(memo) > MEMO_SIZE:
                memo.popitem(last=False)
        memo.move_to_end(key)
        return dict(cached[1])

    to_environment_variables._taxi_memoized = True  # type: ignore[attr-defined]
    PrefectBaseSettings.to_environment_variables = to_environment_variables  # type: ignore[method-assign]


def main(argv: list[str] | None = None) -> None:
    memoize_settings_environment()
    from prefect.cli import app

    sys.argv = ["prefect", "worker", "start", *(sys.argv[1:] if argv is None else argv)]
    app()


if __name__ == "__main__":
    main()
