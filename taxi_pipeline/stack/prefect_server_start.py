"""`prefect server start`, with the app lookup of the server's automation actions made cheap.

Every automation action (our landing automations run a deployment per object)
builds an in-memory orchestration client, and each client calls
`prefect.server.api.server.create_app()`. That call returns a cached app, but
before the cache lookup it serialises every Prefect setting to hash them and
reloads the logging configuration. Profiled under a 60-file burst (py-spy), that
was 41% of the server's event-loop time, more than all API requests together,
and the event loop is what limits runs per second on this server.

The fix keeps Prefect's own semantics: a call with no arguments under the same
settings object returns the app Prefect itself would return (its cache is keyed
by the settings' hash; one settings object has one hash), without re-hashing.
Any other call goes to Prefect unchanged. `tests/test_prefect_server_start.py`
fails if Prefect's side of it changes.

Prefect 3.9.1 avoids most of this cost itself: its actions consumer
(`prefect.server.events.actions.consumer`) builds one in-memory client for all
the actions it runs (two `create_app()` calls when it starts, none per action),
except with CSRF protection on (PREFECT_SERVER_API_CSRF_PROTECTION_ENABLED),
where it still builds one per action. Neither the local profile nor the
manifests turn that protection on, so on 3.9.1 this wrapper saves next to
nothing there; it is kept for a server started with CSRF protection on, and can
go once Prefect shares the client in that configuration too.

Run it as `python -m taxi_pipeline.stack.prefect_server_start [prefect server start options]`.
"""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fastapi import FastAPI


def memoize_default_app() -> None:
    """Make `create_app()` (no arguments) a lookup by the current settings object."""
    from prefect.server.api import server
    from prefect.settings import get_current_settings

    original = server.create_app
    if getattr(original, "_taxi_memoized", False):
        return
    # Settings object -> app; the object is kept so its id() is never reused.
    apps: dict[int, tuple[Any, FastAPI]] = {}

    @functools.wraps(original)
    def create_app(*args: Any, **kwargs: Any) -> FastAPI:
        if args or any(kwargs.values()):
            return original(*args, **kwargs)
        settings = get_current_settings()
        cached = apps.get(id(settings))
        if cached is None or cached[0] is not settings:
            cached = apps[id(settings)] = (settings, original())
        return cached[1]

    create_app._taxi_memoized = True  # type: ignore[attr-defined]
    server.create_app = create_app


def main(argv: list[str] | None = None) -> None:
    memoize_default_app()
    from prefect.cli import app

    sys.argv = ["prefect", "server", "start", *(sys.argv[1:] if argv is None else argv)]
    app()


if __name__ == "__main__":
    main()
