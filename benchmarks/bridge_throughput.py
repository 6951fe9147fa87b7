"""Benchmark: events per second the bridge gets confirmed-stored, vs emitting directly.

Usage: .venv/bin/python benchmarks/bridge_throughput.py [--messages 2000]

Starts a private PostgreSQL, a Prefect server on it and the Pub/Sub emulator
(the tests' launchers), then in one run:
  1. baseline: one process builds the same events, emits them and confirms
     every id through the events API (what the bridge must do, minus Pub/Sub);
  2. bridge: N GCS-style notifications are published first, then
     `python -m pubsub_bridge` starts; the clock runs from its first received
     message to its last ack (every ack follows a confirmed read-back).
Prints both rates, the ratio (target >= 0.9) and the bridge's peak RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

from support.emulators import free_port, pubsub_emulator  # noqa: E402
from support.prefect_server import PrefectServer, postgres_database  # noqa: E402

PROJECT, BUCKET, TOPIC, SUB = "taxi-bench", "bench-bucket", "bench-topic", "bench-sub"


def notification(i: int, generation: int) -> tuple[bytes, dict[str, str]]:
    name = f"raw/bench/object-{i:05d}.parquet"
    data = {"bucket": BUCKET, "name": name, "generation": str(generation), "size": "1024",
            "md5Hash": "AAAA", "crc32c": "AAAA", "contentType": "application/octet-stream"}
    return json.dumps(data).encode(), {
        "bucketId": BUCKET, "objectId": name, "objectGeneration": str(generation),
        "eventType": "OBJECT_FINALIZE", "payloadFormat": "JSON_API_V1"}


async def direct(count: int, generation: int) -> float:
    from taxi_pipeline import events
    from taxi_pipeline.event_delivery import EventDelivery
    from taxi_pipeline.objects import ObjectRef

    prefixes = {"raw": "raw/", "processed": "processed/"}
    to_send = [events.object_finalized(
        ObjectRef(BUCKET, f"raw/direct/object-{i:05d}.parquet", generation, size=1024),
        prefixes) for i in range(count)]
    start = time.perf_counter()
    async with EventDelivery() as delivery:
        stored = await delivery.deliver(to_send, timeout=600)
    elapsed = time.perf_counter() - start
    assert len(stored) == count, f"only {len(stored)} of {count} confirmed"
    return count / elapsed


def metric(port: int, name: str) -> float:
    text = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text
    match = re.search(rf"^bridge_{name}_total (\S+)$", text, re.M)
    return float(match.group(1)) if match else 0.0


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--messages", type=int, default=2000)
    args = parser.parse_args()
    generation = int(time.time() * 1e6)
    with tempfile.TemporaryDirectory() as tmp, postgres_database() as db, \
            pubsub_emulator(PROJECT) as pubsub:
        os.environ["PUBSUB_EMULATOR_HOST"] = pubsub.host_port
        from google.cloud import pubsub_v1

        publisher, subscriber = pubsub_v1.PublisherClient(), pubsub_v1.SubscriberClient()
        topic = publisher.topic_path(PROJECT, TOPIC)
        publisher.create_topic(name=topic)
        subscriber.create_subscription(name=subscriber.subscription_path(PROJECT, SUB),
                                       topic=topic, ack_deadline_seconds=60)
        server = PrefectServer(db, Path(tmp) / "prefect").start()
        try:
            from prefect.settings import PREFECT_API_URL, temporary_settings

            with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
                direct_rate = asyncio.run(direct(args.messages, generation))
            futures = [publisher.publish(topic, data, **attrs)
                       for data, attrs in (notification(i, generation)
                                           for i in range(args.messages))]
            for future in futures:
                future.result(timeout=60)
            port = free_port()
            env = {**os.environ, "TAXI_PROFILE": "emulator", "TAXI_HOME": tmp,
                   "TAXI_BUCKET": BUCKET, "TAXI_GCP_PROJECT": PROJECT,
                   "TAXI_PUBSUB_SUBSCRIPTION": SUB, "TAXI_BRIDGE_PORT": str(port),
                   "PREFECT_API_URL": server.api_url}
            with (Path(tmp) / "bridge.log").open("wb") as log:
                bridge = subprocess.Popen([sys.executable, "-m", "pubsub_bridge"], env=env,
                                          stdout=log, stderr=subprocess.STDOUT)
            try:
                first = None
                deadline = time.monotonic() + 900
                while time.monotonic() < deadline:
                    try:
                        received = metric(port, "received")
                        acked = metric(port, "acked")
                    except httpx.HTTPError:
                        time.sleep(0.1)
                        continue
                    if first is None and received > 0:
                        first = time.perf_counter()
                    if acked >= args.messages:
                        break
                    time.sleep(0.05)
                assert first is not None and acked >= args.messages, "bridge did not finish"
                bridge_rate = args.messages / (time.perf_counter() - first)
                status = Path(f"/proc/{bridge.pid}/status").read_text()
                peak = int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # type: ignore[union-attr]
            finally:
                bridge.terminate()
                bridge.wait(timeout=60)
        finally:
            server.stop()
    print(f"{args.messages} events, Prefect server on PostgreSQL, Pub/Sub emulator")
    print(f"direct emit + confirm (one process): {direct_rate:8.1f} events/s")
    print(f"bridge, confirmed and acked:         {bridge_rate:8.1f} events/s")
    print(f"ratio bridge/direct: {bridge_rate / direct_rate:.2f} (target >= 0.9); "
          f"bridge peak RSS {peak:.0f} MiB")


if __name__ == "__main__":
    main()
