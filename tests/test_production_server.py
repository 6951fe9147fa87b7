"""The Prefect server in its production configuration, run here, SIGKILLed after accepting events.

The server's environment is read from `kubectl kustomize k8s/overlays/gke` (the
`prefect-server` container: its literal values, its ConfigMap and the names of
its secrets) so this test runs what the manifests deploy: PostgreSQL, the Redis
messaging broker (prefect-redis), causal ordering, lease storage and docket on
Redis, API auth. Only addresses (Redis, database, API host and port, the
filesystem under PREFECT_HOME) and the two secrets (database URL, auth string)
are replaced by local values.

Each trial emits a batch of events with deterministic ids, SIGKILLs the server
the moment they are accepted (websocket: the pong that follows the last event;
HTTP: the 204 of `POST /api/events`), restarts it on the same database and
Redis, and reads the events back by id until a positive signal says the
persister is done (a sentinel emitted after the restart is stored and the count
has stopped changing) or a deadline passes.

What Prefect 3.8.8 + prefect-redis 0.3.0 do (read in their source, then measured
here; the assertions rest on it):

- The websocket handler takes events off the socket one at a time and writes
  each to Redis (a dedupe key, then XADD). A pong says only that the bytes
  arrived: events still queued in the server process die with it, Redis or not.
  The Redis publisher also holds 5 events or 10 s in memory unless
  PREFECT_REDIS_MESSAGING_PUBLISHER_BATCH_SIZE=1 (the manifests set it).
- `POST /api/events` answers 204 only after its events are in the Redis stream.
- The event persister acknowledges a stream message as soon as the event is in
  its in-memory queue, and writes the queue to the database every
  PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE events (default 20) or
  5 s. With the default, a SIGKILL loses the unwritten batch although it was
  in Redis (19 of 100 here); with 1 (the manifests set it), each event is
  written before it is acknowledged, and the restarted server re-claims what
  was delivered but not acknowledged.
- An event lost after its dedupe key was set keeps that key for 5 minutes: a
  re-emit with the same id is dropped until then (the bridge re-emits every
  TAXI_BRIDGE_CONFIRM_SECONDS, so such an event is stored late, not never).

So the guarantee stays the bridge's: acknowledge only what was read back by id.

`python tests/test_production_server.py --runs 3` prints the figures docs/benchmarks.md
quotes: the manifests' configuration, the same with a persister batch of 1, and
the local profile's server (SQLite, in-memory broker) for comparison; each
path, each run, and what re-emitting the lost ids achieves.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import httpx
import pytest
from prefect.events import Event
from prefect.events.clients import get_events_client
from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings
from support.emulators import stop_group
from support.k8s import find, render
from support.prefect_server import PrefectServer, postgres_available, postgres_database
from support.redis_server import RedisServer, redis_available, redis_server

from taxi_pipeline.event_delivery import EventDelivery

REPO_ROOT = Path(__file__).resolve().parent.parent
OVERLAY = REPO_ROOT / "k8s" / "overlays" / "gke"
SERVER = "prefect-server"  # the Deployment and its container (contract with k8s/)

# Local stand-ins for the two values the manifests take from Secrets.
AUTH_STRING = "taxi-test:not-a-real-password"
REDIS_PASSWORD = "5eb1f0c2a7d94e3b8c6a"  # hex, as k8s/README.md generates it
LOCAL_SECRETS = {"PREFECT_API_DATABASE_CONNECTION_URL", "PREFECT_SERVER_API_AUTH_STRING",
                 "PREFECT_REDIS_MESSAGING_PASSWORD", "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_PASSWORD"}
DEPENDENT = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")

REDIS_BROKER = "prefect_redis.messaging"
BROKER_SETTINGS = ("PREFECT_MESSAGING_BROKER", "PREFECT_SERVER_EVENTS_MESSAGING_BROKER")
PERSISTER_BATCH = "PREFECT_SERVER_SERVICES_EVENT_PERSISTER_BATCH_SIZE"
# prefect_redis.messaging.Cache keeps one key per published event id (5 min TTL).
DEDUPE_KEY = "message:messaging-cache:{}"

EVENTS_PER_TRIAL = 100
POST_BATCH = 50  # events per POST /api/events, as the bridge batches them
STORE_DEADLINE = 60.0  # seconds after the restart to wait for the events
SETTLE_SECONDS = 6.0  # count unchanged this long (> the persister's 5 s flush interval)
RESEND_WAIT = 15.0  # > the persister's flush interval, far below the 5 min dedupe TTL
MIN_WAIT = 12.0  # > the 5 s idle time after which a restarted consumer re-claims messages
PATH_SETTING = re.compile(r"_(HOME|PATH|DIR|DIRECTORY|FILE)$")
NAMESPACE = uuid.UUID("0b5f3d2a-6a43-4f4e-9d52-3c1f5b8e7a10")


# --- the server's environment, from the manifests -------------------------------------


@dataclass(frozen=True)
class ManifestServer:
    """What the `prefect-server` container gets: settings, secret names, command."""

    env: dict[str, str]
    secret_env: dict[str, str]  # variable -> "secret/key"
    command: list[str]


def manifest_server(overlay: Path = OVERLAY, kind: str = "Deployment",
                    name: str = SERVER) -> ManifestServer:
    """Render the overlay and collect the environment of the container named like its
    workload (the API `prefect-server`, the services `prefect-services`, the migration
    Job `prefect-migrate`) as Kubernetes would."""
    docs = render(overlay)
    deployment = find(docs, kind, name)
    matches = [c for c in deployment["spec"]["template"]["spec"]["containers"]
               if c["name"] == name]
    assert len(matches) == 1, f"{kind} {name} has no container named {name}"
    container = matches[0]
    env: dict[str, str] = {}
    secrets: dict[str, str] = {}
    for source in container.get("envFrom", []):  # envFrom first: env entries win
        if "configMapRef" not in source:
            raise AssertionError(f"{name} takes its environment from {source}: the test "
                                 "cannot tell which settings that sets (use secretKeyRef)")
        data = find(docs, "ConfigMap", source["configMapRef"]["name"]).get("data", {})
        env.update({source.get("prefix", "") + k: str(v) for k, v in data.items()})
    for var in container.get("env", []):
        name, value_from = var["name"], var.get("valueFrom")
        if value_from is None:
            env[name] = str(var.get("value", ""))
        elif "configMapKeyRef" in value_from:
            ref = value_from["configMapKeyRef"]
            env[name] = str(find(docs, "ConfigMap", ref["name"])["data"][ref["key"]])
        elif "secretKeyRef" in value_from:
            ref = value_from["secretKeyRef"]
            secrets[name] = f"{ref['name']}/{ref['key']}"
            env.pop(name, None)
        elif name.startswith("PREFECT_"):
            raise AssertionError(f"{name} comes from {value_from}: teach this test its value")
    return ManifestServer(env, secrets, [*container.get("command", []), *container.get("args", [])])


def expand(value: str, env: dict[str, str]) -> str:
    """Kubernetes' dependent environment variables: $(NAME) of a variable defined before."""
    return DEPENDENT.sub(lambda m: env.get(m[1], m[0]), value)


def local_env(manifest: ManifestServer, *, database_url: str, redis: RedisServer,
              home: Path, port: int) -> dict[str, str]:
    """The manifests' settings with only addresses and secrets replaced by local ones.

    Fails (rather than guessing) on a secret or an address it does not know how
    to replace, so the test keeps running what the manifests deploy.
    """
    unknown = set(manifest.secret_env) - LOCAL_SECRETS
    assert not unknown, f"the manifests take {sorted(unknown)} from Secrets: give them " \
                        "local values in LOCAL_SECRETS / local_env"
    env = dict(manifest.env)
    redis_host = env.get("PREFECT_REDIS_MESSAGING_HOST")
    manifest_home = env.get("PREFECT_HOME")
    api_url = f"http://127.0.0.1:{port}/api"
    redis_hosts = {k[: -len("_HOST")] for k, v in env.items()
                   if k.endswith("_HOST") and v == redis_host}
    for key, value in env.items():
        if key == "PREFECT_SERVER_API_HOST":
            env[key] = "127.0.0.1"
        elif key == "PREFECT_SERVER_API_PORT":
            env[key] = str(port)
        elif key in ("PREFECT_API_URL", "PREFECT_UI_API_URL"):
            env[key] = api_url
        elif key == "PREFECT_UI_URL":
            env[key] = api_url.removesuffix("/api")
        elif key.endswith("_HOST") and value == redis_host:
            env[key] = redis.host
        elif key.endswith("_PORT") and key[: -len("_PORT")] in redis_hosts:
            env[key] = str(redis.port)
        elif "://" in value and urlsplit(value).hostname == redis_host:
            parts = urlsplit(value)
            userinfo = parts.netloc.rpartition("@")[0]  # keeps ":$(PASSWORD)"
            netloc = f"{userinfo}@{redis.host}:{redis.port}" if userinfo else \
                f"{redis.host}:{redis.port}"
            env[key] = urlunsplit(parts._replace(netloc=netloc))
        elif manifest_home and value.startswith(manifest_home):
            env[key] = str(home) + value[len(manifest_home):]
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    env["PREFECT_SERVER_API_AUTH_STRING"] = AUTH_STRING
    for name, ref in manifest.secret_env.items():
        if ref == "prefect-redis/password":
            assert redis.password, "the manifests give Redis a password: start it with one"
            env[name] = redis.password
    env = {k: expand(v, env) for k, v in env.items()}
    assert not any(DEPENDENT.search(v) for v in env.values()), "an unexpanded $(...)"
    for key, value in env.items():  # everything that is an address must now be local
        host = urlsplit(value).hostname if "://" in value else (
            value if key.endswith("_HOST") else None)
        assert host in (None, "127.0.0.1", "localhost"), \
            f"{key}={value} is an address the test does not point at a local server"
        assert not PATH_SETTING.search(key) or value.startswith(str(home)), \
            f"{key}={value} is a path outside PREFECT_HOME: give it a local place"
    return env


def uses_redis_broker(env: dict[str, str]) -> bool:
    return any(env.get(name) == REDIS_BROKER for name in BROKER_SETTINGS)


def start_server(server: PrefectServer) -> PrefectServer:
    """Start the server; run the migrations first where the manifests turn them off at start."""
    if server.env().get("PREFECT_API_DATABASE_MIGRATE_ON_START", "true").lower() == "false":
        subprocess.run([sys.executable, "-m", "prefect", "server", "database", "upgrade", "-y"],
                       env=server.env(), check=True, capture_output=True, timeout=300)
    return server.start()


# --- emitting, killing, reading back ------------------------------------------------------


@dataclass
class Trial:
    """One batch: emitted, accepted, SIGKILL, restart, read back."""

    config: str
    path: str  # "websocket" or "http"
    emitted: set[uuid.UUID]
    reached_redis: set[uuid.UUID] | None  # ids with a dedupe key at the kill; None: no Redis
    stored: set[uuid.UUID] = field(default_factory=set)
    sentinel_stored: bool = False
    restart_seconds: float = 0.0
    waited: float = 0.0
    events: list[Event] = field(default_factory=list, repr=False)
    resent_stored: int | None = None  # of the lost ones, stored after re-emitting them

    @property
    def lost(self) -> list[Event]:
        return [e for e in self.events if e.id not in self.stored]

    def line(self) -> str:
        reached = "" if self.reached_redis is None else \
            f", {len(self.reached_redis)} had reached Redis"
        resent = "" if self.resent_stored is None else \
            f"; re-emitted, same ids: {self.resent_stored} stored in {RESEND_WAIT:.0f} s"
        return (f"{self.config} / {self.path}: {len(self.emitted)} accepted{reached}, "
                f"{len(self.stored)} stored after restart "
                f"({len(self.emitted) - len(self.stored)} lost; "
                f"restart {self.restart_seconds:.0f} s, read back {self.waited:.0f} s{resent})")


def make_events(tag: str, count: int) -> list[Event]:
    now = datetime.now(UTC)
    return [Event(id=uuid.uuid5(NAMESPACE, f"{tag}/{i}"), occurred=now,
                  event="taxi.test.server-kill",
                  resource={"prefect.resource.id": f"taxi.test.server-kill.{tag}.{i}"})
            for i in range(count)]


def auth_header() -> dict[str, str]:
    """Basic auth the way Prefect's clients send PREFECT_API_AUTH_STRING."""
    return {"Authorization": "Basic " + base64.b64encode(AUTH_STRING.encode()).decode()}


async def post_events(api_url: str, events: list[Event]) -> None:
    """`POST /api/events` in batches; each 204 means the server accepted the batch."""
    async with httpx.AsyncClient(base_url=api_url, headers=auth_header(), timeout=60) as http:
        for start in range(0, len(events), POST_BATCH):
            batch = events[start : start + POST_BATCH]
            response = await http.post("/events", json=[e.model_dump(mode="json") for e in batch])
            assert response.status_code == 204, response.text


async def _accept_then_kill(server: PrefectServer, events: list[Event], path: str) -> None:
    if path == "http":
        await post_events(server.api_url, events)
        server.kill()
        return
    # The last emit waits for a checkpoint (ping/pong): every event has reached the server.
    client = get_events_client(checkpoint_every=len(events))
    await client.__aenter__()
    try:
        for event in events:
            await client.emit(event)
        server.kill()  # no sleep: right after the pong
    finally:
        with contextlib.suppress(Exception):  # the peer is gone; nothing is resent
            await asyncio.wait_for(client.__aexit__(None, None, None), 10)


async def _read_back(api_url: str, events: list[Event]) -> tuple[set[uuid.UUID], bool, float]:
    """Poll until all are stored, or the restarted persister is demonstrably done, or deadline."""
    sentinel = make_events(f"sentinel-{uuid.uuid4()}", 1)
    await post_events(api_url, sentinel)
    start = time.monotonic()
    found: set[uuid.UUID] = set()
    sentinel_stored = False
    last_change = start
    async with EventDelivery() as delivery:
        while True:
            now_found = await delivery.stored(events)
            sentinel_stored = sentinel_stored or bool(await delivery.stored(sentinel))
            now = time.monotonic()
            if now_found != found:
                found, last_change = now_found, now
            if len(found) == len(events) and sentinel_stored:
                break
            if sentinel_stored and now - last_change >= SETTLE_SECONDS and now - start >= MIN_WAIT:
                break
            if now - start >= STORE_DEADLINE:
                break
            await asyncio.sleep(1)
    return found, sentinel_stored, time.monotonic() - start


def kill_trial(server: PrefectServer, redis: RedisServer | None, config: str, path: str,
               count: int = EVENTS_PER_TRIAL) -> Trial:
    """Emit `count` events, SIGKILL the server once they are accepted, restart, read back."""
    events = make_events(f"{config}/{path}/{uuid.uuid4()}", count)
    asyncio.run(_accept_then_kill(server, events, path))
    reached = None
    if redis is not None:
        with contextlib.closing(redis.client()) as client:
            exists = client.pipeline()
            for event in events:
                exists.exists(DEDUPE_KEY.format(event.id))
            reached = {e.id for e, hit in zip(events, exists.execute(), strict=True) if hit}
    started = time.monotonic()
    start_server(server)
    trial = Trial(config, path, {e.id for e in events}, reached,
                  restart_seconds=time.monotonic() - started, events=events)
    trial.stored, trial.sentinel_stored, trial.waited = asyncio.run(
        _read_back(server.api_url, events))
    return trial


@contextlib.contextmanager
def as_client_of(server: PrefectServer) -> Iterator[None]:
    """This process talks to `server` with the auth string, as the bridge and workers do."""
    with temporary_settings(updates={PREFECT_API_URL: server.api_url,
                                     PREFECT_API_AUTH_STRING: AUTH_STRING}):
        yield


def check_trial(trial: Trial) -> None:
    """What holds in every configuration: the restarted server works and invents nothing."""
    print(trial.line())
    assert trial.sentinel_stored, f"{trial.config}: the restarted server stored nothing new"
    assert trial.stored <= trial.emitted
    if trial.reached_redis is not None:
        # Whatever the server process held in memory is gone: only events that had
        # reached Redis can be stored after the restart.
        assert trial.stored <= trial.reached_redis, trial.line()


# --- configurations ------------------------------------------------------------------------


@dataclass
class Backing:
    database_url: str
    redis: RedisServer
    root: Path


@contextlib.contextmanager
def backing_services(root: Path) -> Iterator[Backing]:
    with postgres_database() as database_url, redis_server(REDIS_PASSWORD) as redis:
        yield Backing(database_url, redis, root)


def production_server(backing: Backing, name: str,
                      extra: dict[str, str] | None = None, split: bool = False) -> PrefectServer:
    """A server with the manifests' settings (plus `extra`), on the shared database and Redis.

    `split`: the manifests' API command as it is (`--no-services`); it then needs a
    `ServicesProcess` beside it. Otherwise API and services in one process."""
    manifest = manifest_server()
    launcher = ["python", "-m", "taxi_pipeline.stack.prefect_server_start"]
    assert manifest.command[:3] == launcher, (
        f"the manifests run {manifest.command}; this test runs the same launcher")
    home = backing.root / name
    # The manifests' own options (--no-services: the API only) unless asked for the
    # all-in-one server the figures of docs/benchmarks.md were measured on.
    args = manifest.command[3:] if split else [a for a in manifest.command[3:]
                                              if a != "--no-services"]
    server = PrefectServer(backing.database_url, home, extra_args=args)
    env = local_env(manifest, database_url=backing.database_url, redis=backing.redis,
                    home=home, port=server.port)
    server.extra_env = {**env, **(extra or {})}
    return server


def in_memory_server(root: Path) -> PrefectServer:
    """The local profile's server: SQLite and the in-memory broker (with the same auth)."""
    home = root / "local-profile"
    home.mkdir(parents=True, exist_ok=True)
    return PrefectServer(f"sqlite+aiosqlite:///{home / 'prefect.db'}", home,
                         extra_env={"PREFECT_SERVER_API_AUTH_STRING": AUTH_STRING})


# --- tests ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def backing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backing]:
    reason = postgres_available() or redis_available()
    if reason:
        pytest.skip(reason)
    if not (OVERLAY / "kustomization.yaml").exists():
        pytest.skip(f"{OVERLAY} is missing")
    with backing_services(tmp_path_factory.mktemp("production-server")) as running:
        yield running


@pytest.mark.e2e
def test_production_configuration_after_sigkill(backing: Backing) -> None:
    """The manifests' server: auth on, Redis in use, what survives a SIGKILL after acceptance."""
    server = production_server(backing, "production")
    assert uses_redis_broker(server.extra_env), "the manifests do not configure the Redis broker"
    assert server.extra_env.get(PERSISTER_BATCH) == "1", (
        f"the manifests must set {PERSISTER_BATCH}=1: with Prefect's default (20) the persister "
        "acknowledges Redis messages before writing them, and a SIGKILL loses up to a batch")
    start_server(server)
    try:
        # Probes and health stay open; the API needs the auth string.
        for path in ("/health", "/ready"):
            assert httpx.get(server.api_url + path, timeout=10).status_code == 200, path
        filter_url = server.api_url + "/events/filter"
        assert httpx.post(filter_url, json={}, timeout=10).status_code == 401
        assert httpx.post(filter_url, json={}, headers=auth_header(), timeout=30).status_code \
            == 200
        with as_client_of(server):
            # The bridge's path (websocket emit, read back by id) works with auth on...
            warmup = make_events("warmup", 1)

            async def deliver() -> set[uuid.UUID]:
                async with EventDelivery() as delivery:
                    return await delivery.deliver(warmup, timeout=STORE_DEADLINE)

            assert asyncio.run(deliver()) == {warmup[0].id}
            # ...and the event went through Redis: stream, persister group, dedupe key.
            # Redis refuses a client without the password (protected by requirepass).
            import redis as redis_client
            anonymous = redis_client.Redis(host=backing.redis.host, port=backing.redis.port,
                                           socket_timeout=10)
            with pytest.raises(redis_client.AuthenticationError):
                anonymous.ping()
            anonymous.close()
            with contextlib.closing(backing.redis.client()) as client:
                groups = {g["name"].decode(): g for g in client.xinfo_groups("events")}
                assert groups["event-persister"]["entries-read"] >= 1, groups
                assert client.exists(DEDUPE_KEY.format(warmup[0].id))

            websocket = kill_trial(server, backing.redis, "production (k8s)", "websocket")
            http = kill_trial(server, backing.redis, "production (k8s)", "http")
    finally:
        server.stop()
    check_trial(websocket)
    check_trial(http)
    # Everything that was in the Redis stream is stored; the only event that had
    # reached Redis and is lost is the one the websocket handler was writing (its
    # dedupe key set, its XADD not yet sent) when the server died.
    assert websocket.reached_redis is not None
    assert len(websocket.reached_redis - websocket.stored) <= 1, websocket.line()
    # A 204 from POST /api/events means the events are in the Redis stream, and
    # each is written to PostgreSQL before its message is acknowledged: none is lost.
    assert http.reached_redis == http.emitted, http.line()
    assert http.stored == http.emitted, http.line()


# --- the split server: API pods, a services pod, a migration Job ---------------------------

SERVICES = "prefect-services"
MIGRATE = "prefect-migrate"
SERVICES_READY_SECONDS = 120.0


def local_command(argv: list[str]) -> list[str]:
    """A manifest command run by this interpreter (`python` and the `prefect` script)."""
    if argv[0] == "python":
        return [sys.executable, *argv[1:]]
    if argv[0] == "prefect":
        return [sys.executable, "-m", "prefect", *argv[1:]]
    raise AssertionError(f"teach this test to run {argv}")


def workload_env(backing: Backing, kind: str, name: str, port: int) -> tuple[list[str], dict]:
    manifest = manifest_server(kind=kind, name=name)
    home = backing.root / name
    home.mkdir(parents=True, exist_ok=True)
    env = local_env(manifest, database_url=backing.database_url, redis=backing.redis,
                    home=home, port=port)
    return manifest.command, {**os.environ, "PREFECT_UI_ENABLED": "false", **env}


def schema_ready(env: dict[str, str]) -> bool:
    """The API's and services' init container, checking once."""
    init = manifest_init_command()
    result = subprocess.run([*local_command(init), "--timeout", "0"], env=env,
                            capture_output=True, text=True, timeout=120)
    return result.returncode == 0


def manifest_init_command() -> list[str]:
    docs = render(OVERLAY)
    commands = {name: [c["command"] for c in find(docs, "Deployment", name)["spec"]["template"]
                       ["spec"].get("initContainers", [])] for name in (SERVER, SERVICES)}
    assert commands[SERVER] == commands[SERVICES] and len(commands[SERVER]) == 1, commands
    return list(commands[SERVER][0])


def migrate(backing: Backing, port: int) -> None:
    """The Job prefect-migrate: its command with its environment."""
    command, env = workload_env(backing, "Job", MIGRATE, port)
    assert command == ["prefect", "server", "database", "upgrade", "-y"], command
    result = subprocess.run(local_command(command), env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]


class ServicesProcess:
    """The prefect-services container: its command and environment; its probe says ready."""

    def __init__(self, backing: Backing, port: int) -> None:
        self.command, self.env = workload_env(backing, "Deployment", SERVICES, port)
        assert self.command == ["prefect", "server", "services", "start"], self.command
        self.log = backing.root / SERVICES / "services.log"
        self.process: subprocess.Popen[bytes] | None = None

    def probe(self, *extra: str) -> bool:
        docs = render(OVERLAY)
        (container,) = find(docs, "Deployment", SERVICES)["spec"]["template"]["spec"][
            "containers"]
        argv = [*container["readinessProbe"]["exec"]["command"], *extra]
        result = subprocess.run(local_command(argv), env=self.env, capture_output=True,
                                text=True, timeout=60)
        return result.returncode == 0

    def start(self) -> ServicesProcess:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(local_command(self.command), env=self.env,
                                            stdout=log, stderr=subprocess.STDOUT,
                                            stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + SERVICES_READY_SECONDS
        while not self.probe():  # the manifests' readiness probe: a fresh Docket heartbeat
            assert self.process.poll() is None, self.log.read_text(errors="replace")[-3000:]
            assert time.monotonic() < deadline, "the services never sent a heartbeat"
            time.sleep(1)
        return self

    def kill(self) -> None:
        if self.process is not None:
            stop_group(self.process, 10, signal.SIGKILL)
            self.process = None

    def stop(self) -> None:
        if self.process is not None:
            stop_group(self.process, 30)
            self.process = None


async def _read_all(api_url: str, events: list[Event]) -> set[uuid.UUID]:
    """Read back by id until every event is stored (the positive signal) or the deadline."""
    deadline = time.monotonic() + STORE_DEADLINE
    async with EventDelivery() as delivery:
        while True:
            found = await delivery.stored(events)
            if len(found) == len(events) or time.monotonic() > deadline:
                return found
            await asyncio.sleep(0.5)


@pytest.fixture
def split_backing(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Backing]:
    """A database of its own: the schema starts empty, as on a first install."""
    reason = postgres_available() or redis_available()
    if reason:
        pytest.skip(reason)
    with backing_services(tmp_path_factory.mktemp("split-server")) as running:
        yield running


@pytest.mark.e2e
def test_split_server_survives_a_sigkill_of_either_part(split_backing: Backing) -> None:
    """The manifests' HA layout, run here: the migration Job's command, then the API
    (`--no-services`) and the background services as two processes, each with its own
    environment from the rendered manifests. Events accepted by the API (HTTP 204) while
    the services are SIGKILLed and down, and right before the API is SIGKILLed, are all
    stored once both are back (read back by id)."""
    backing = split_backing
    api = production_server(backing, SERVER, split=True)
    assert "--no-services" in api.extra_args
    assert api.extra_env["PREFECT_API_DATABASE_MIGRATE_ON_START"] == "false"
    _, api_env = workload_env(backing, "Deployment", SERVER, api.port)
    # First install: the init container holds the servers until the Job has migrated.
    assert not schema_ready(api_env)
    migrate(backing, api.port)
    assert schema_ready(api_env)
    services = ServicesProcess(backing, api.port)
    assert not services.probe(), "the probe passes with no services process running"
    api.start()
    try:
        services.start()
        with as_client_of(api):
            # The API alone serves reads: no services process runs inside it.
            assert httpx.get(api.api_url + "/ready", timeout=10).status_code == 200
            before = make_events("split/before", 20)
            asyncio.run(post_events(api.api_url, before))
            assert asyncio.run(_read_all(api.api_url, before)) == {e.id for e in before}

            # 1. SIGKILL the services right after the API accepted a batch; accept more
            #    while they are down; start them again: everything is stored.
            first = make_events(f"split/services/{uuid.uuid4()}", EVENTS_PER_TRIAL)
            asyncio.run(post_events(api.api_url, first))
            services.kill()
            while_down = make_events(f"split/down/{uuid.uuid4()}", EVENTS_PER_TRIAL)
            asyncio.run(post_events(api.api_url, while_down))
            services.start()
            stored = asyncio.run(_read_all(api.api_url, first + while_down))
            assert stored == {e.id for e in first + while_down}, (
                f"{len(first + while_down) - len(stored)} of {len(first + while_down)} "
                "events lost across a services SIGKILL")

            # 2. SIGKILL the API right after its 204s; start it again: everything is stored.
            second = make_events(f"split/api/{uuid.uuid4()}", EVENTS_PER_TRIAL)
            asyncio.run(post_events(api.api_url, second))
            api.kill()
            api.start()
            stored = asyncio.run(_read_all(api.api_url, second))
            assert stored == {e.id for e in second}, (
                f"{len(second) - len(stored)} of {len(second)} events lost across an API "
                "SIGKILL")
    finally:
        services.stop()
        api.stop()


# --- figures for docs/benchmarks.md--------------------------------------------------------------


def measure(runs: int, root: Path, resend: bool = True) -> list[Trial]:
    """Every configuration and path, `runs` times; one line per trial as it comes."""
    trials: list[Trial] = []

    def run(server: PrefectServer, redis: RedisServer | None, config: str) -> None:
        start_server(server)
        try:
            with as_client_of(server):
                for index in range(runs):
                    for path in ("websocket", "http"):
                        trial = kill_trial(server, redis, config, path)
                        if resend:
                            resend_lost(server, trial)
                        print(f"run {index + 1}: {trial.line()}", flush=True)
                        trials.append(trial)
        finally:
            server.stop()

    with backing_services(root) as backing:
        run(production_server(backing, "production"), backing.redis, "production (k8s)")
        # The same with Prefect's default persister batch, to show what the setting buys.
        run(production_server(backing, "batch-20", {PERSISTER_BATCH: "20"}), backing.redis,
            "production, persister batch 20")
    run(in_memory_server(root), None, "local profile (in-memory)")
    return trials


def resend_lost(server: PrefectServer, trial: Trial) -> None:
    """Re-emit the lost events with their ids, as the bridge does; count what gets stored."""
    lost = trial.lost
    if not lost:
        return

    async def resend() -> int:
        await post_events(server.api_url, lost)
        await asyncio.sleep(RESEND_WAIT)
        async with EventDelivery() as delivery:
            return len(await delivery.stored(lost))

    trial.resent_stored = asyncio.run(resend())


def _summary(trials: list[Trial]) -> list[str]:
    rows: dict[tuple[str, str], list[Trial]] = {}
    for trial in trials:
        rows.setdefault((trial.config, trial.path), []).append(trial)
    lines = []
    for (config, path), group in rows.items():
        stored = ", ".join(f"{len(t.stored)}/{len(t.emitted)}" for t in group)
        lines.append(f"{config:32} {path:9} stored after SIGKILL + restart: {stored}")
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="taxi-prod-server-") as tmp:
        trials = measure(args.runs, Path(tmp))
    print("\n".join(_summary(trials)))


if __name__ == "__main__":
    main()

