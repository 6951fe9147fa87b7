"""`python -m taxi_pipeline.monitoring`: the pipeline exporter, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import logging
import signal

from taxi_pipeline.monitoring.exporter import MetricsPortInUse, run
from taxi_pipeline.settings import get_settings


async def _main() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await run(get_settings(), stop)


def main() -> None:
    logging.basicConfig(level=logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        asyncio.run(_main())
    except MetricsPortInUse as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
