"""`python -m pubsub_bridge`: run the bridge of the configured profile until SIGTERM/SIGINT.

SIGTERM stops pulling, finishes (confirms and acks) what is in flight, nacks
the rest and exits; a second signal is not needed.
"""

from __future__ import annotations

import asyncio
import logging
import signal

from pubsub_bridge.health import HealthPortInUse, HealthServer, HealthState
from pubsub_bridge.metrics import BridgeMetrics
from taxi_pipeline.settings import SettingsError, get_settings


async def _main() -> None:
    settings = get_settings()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    metrics = BridgeMetrics()
    health = HealthState()
    if settings.profile == "local":
        from pubsub_bridge.app import run_directory_bridge

        server = HealthServer(health, metrics, ["prefect"], settings.bridge_port).start()
        try:
            await run_directory_bridge(settings, stop, metrics, health)
        finally:
            server.stop()
    else:
        from pubsub_bridge.pubsub_source import run_pubsub_bridge

        server = HealthServer(health, metrics, ["prefect", "pubsub"], settings.bridge_port)
        server.start()
        try:
            await run_pubsub_bridge(settings, stop, metrics, health)
        finally:
            server.stop()


def main() -> None:
    try:
        # Bad GCP names fail here, in a second, instead of at the first pull or load.
        # Without TAXI_BUCKET the bridge relays notifications of any bucket.
        get_settings().validate_for_profile(optional=("bucket",))
    except SettingsError as exc:
        raise SystemExit(f"error: {exc}") from None
    logging.basicConfig(
        level=logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        asyncio.run(_main())
    except HealthPortInUse as exc:
        raise SystemExit(f"error: {exc}") from None


if __name__ == "__main__":
    main()
