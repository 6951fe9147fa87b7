"""Probe of the Prefect background-services pod: is this host's services process alive?

    python -m taxi_pipeline.stack.prefect_services_probe [--max-age SECONDS]

`prefect server services start` serves no HTTP, so Kubernetes cannot ask it. It
runs a Docket worker (named "prefect", on PREFECT_SERVER_DOCKET_URL) in the same
event loop as the loop services (event persister, triggers, actions, scheduler,
...), and that worker writes a heartbeat every 2 s into the sorted set
`prefect:workers`, member `HOSTNAME#PID`, score = the time. The probe exits 0 when
a member of this host (the pod's name) beat within --max-age seconds, 1
otherwise: a process whose event loop is stuck, or one that lost Redis (the broker
it consumes from), stops beating.

Standard library and redis-py only, so it costs about 0.1 s per run.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time

# prefect.cli._server_utils._run_all_services: Docket(name="prefect", ...); docket's
# workers set is "<name>:workers" (tests/test_production_server.py checks both).
DOCKET_NAME = "prefect"


def alive(url: str, host: str, max_age: float, now: float | None = None) -> tuple[bool, str]:
    import redis

    client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
    try:
        beats = client.zrange(f"{DOCKET_NAME}:workers", 0, -1, withscores=True)
    except redis.RedisError as exc:
        return False, f"redis: {exc}"
    finally:
        client.close()
    now = time.time() if now is None else now
    mine: dict[str, float] = {}
    for member, score in beats:  # type: ignore[str-unpack]
        name = member.decode() if isinstance(member, bytes) else str(member)
        if name.startswith(f"{host}#"):
            mine[name] = float(score)
    if not mine:
        return False, f"no services process of {host} has sent a heartbeat"
    age = now - max(mine.values())
    return age <= max_age, f"last heartbeat of {host} {age:.1f} s ago"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m taxi_pipeline.stack.prefect_services_probe")
    parser.add_argument("--max-age", type=float, default=30.0)
    args = parser.parse_args(argv)
    url = os.environ.get("PREFECT_SERVER_DOCKET_URL", "")
    if not url.startswith(("redis://", "rediss://")):
        raise SystemExit(f"PREFECT_SERVER_DOCKET_URL={url!r} is no Redis URL")
    ok, why = alive(url, socket.gethostname(), args.max_age)
    print(why)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
