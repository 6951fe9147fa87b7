"""`python -m pubsub_bridge`: run the bridge of the configured profile until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from pubsub_bridge.app import run_directory_bridge
from taxi_pipeline.settings import get_settings


async def _main() -> None:
    settings = get_settings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if settings.profile == "local":
        await run_directory_bridge(settings, stop)
    else:
        raise SystemExit(f"profile {settings.profile!r}: the Pub/Sub source is not built yet")


def main() -> None:
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    asyncio.run(_main())


if __name__ == "__main__":
    main()
