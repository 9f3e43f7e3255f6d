"""Session lifecycle: every store (memory, SQLite, Redis) through the same contract with a fake
clock; streams of a closed session on every transport; two gateway instances sharing Redis.

Store timeline: idle timeout 60 s, maximum lifetime 300 s, clock moved by hand.
"""

from __future__ import annotations

import asyncio
import base64
import pathlib
import secrets
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import pytest
import redis
import redis.asyncio as aioredis

from app.gateway import _session_store
from app.sessions import CLOSED, IDLE, LIFETIME, UNKNOWN, MemorySessionStore, SessionStore, SqliteSessionStore
from app.sessions.base import EXPIRED_KEPT_SECONDS, RECHECK_SECONDS, SWEEP_INTERVAL, token_digest
from app.sessions.redis import DEFAULT_PREFIX, RedisSessionStore, split_prefix
from app.settings import Settings
from prism.errors import PrismError
from prism.v1 import config_pb2, session_pb2
from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import pubsub_pb2 as ps
from tests.clients import CallError, GrpcClient, RestClient
from tests.conftest import TRANSPORTS, open_session
from tests.gateway_process import start_gateway, wait_ready
from tests.servers import REDIS_URL, unreachable

IDLE_S, MAX_S = 60.0, 300.0
SESSION = "/prism.v1.SessionService/"
KV = "/prism.v1.KeyValueService/"
CONFIGS = "/prism.v1.ConfigService/"
PS = "/prism.v1.PubSubService/"
CONFIG = config_pb2.ClientConfig(name="kv", pattern=config_pb2.ACCESS_PATTERN_KEY_VALUE, namespace="default")
REDIS_DOWN = unreachable(REDIS_URL)
RUN_PREFIX = f"prism-test-{uuid.uuid4().hex[:12]}:"  # every Redis key this module writes starts with it


@pytest.fixture(scope="module", autouse=True)
def delete_redis_keys_of_this_run() -> Iterator[None]:
    yield
    if REDIS_DOWN:
        return
    client = redis.Redis.from_url(REDIS_URL)
    try:
        keys = list(client.scan_iter(match=RUN_PREFIX + "*", count=1000))
        if keys:
            client.delete(*keys)
        assert not list(client.scan_iter(match=RUN_PREFIX + "*", count=1000))
    finally:
        client.close()


class FakeClock:
    """A clock the test moves by hand, and the matching ``sleep`` for the stream watchdog."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now
        self._sleepers: list[tuple[float, asyncio.Future[None]]] = []

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds
        for wake, future in self._sleepers:
            if wake <= self.now and not future.done():
                future.set_result(None)
        self._sleepers = [(w, f) for w, f in self._sleepers if not f.done()]

    async def sleep(self, seconds: float) -> None:
        future = asyncio.get_running_loop().create_future()
        if seconds <= 0:
            future.set_result(None)
        else:
            self._sleepers.append((self.now + seconds, future))
        await future


@dataclass
class Backend:
    name: str
    clock: FakeClock
    tmp: pathlib.Path
    prefix: str  # Redis key prefix of this test
    stores: list[SessionStore] = field(default_factory=list)

    @property
    def redis_url(self) -> str:
        return f"{REDIS_URL}?key_prefix={self.prefix}"

    async def open(self) -> SessionStore:
        """A started store. On SQLite and Redis each one is another process's view of the same
        sessions; in memory there is only the one."""
        if self.name == "memory" and self.stores:
            return self.stores[0]
        lifecycle = {
            "idle_timeout": IDLE_S,
            "max_lifetime": MAX_S,
            "clock": self.clock,
            "sleep": self.clock.sleep,
        }
        store: SessionStore
        if self.name == "memory":
            store = MemorySessionStore(**lifecycle)
        elif self.name == "sqlite":
            store = SqliteSessionStore(self.tmp / "sessions.db", **lifecycle)
        else:
            if REDIS_DOWN:
                pytest.skip(REDIS_DOWN)
            store = RedisSessionStore(self.redis_url, **lifecycle)
        await store.start()
        self.stores.append(store)
        return store


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def backend(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Backend]:
    state = Backend(request.param, FakeClock(), tmp_path, f"{RUN_PREFIX}{uuid.uuid4().hex[:8]}:")
    yield state
    for store in state.stores:
        await store.close_store()


async def refusal(store: SessionStore, token: str) -> str:
    with pytest.raises(PrismError) as refused:
        await store.resolve(token)
    assert refused.value.code.name == "UNAUTHENTICATED"
    return refused.value.message


# The lifecycle, on every store.


async def test_token_is_random_and_session_starts_now(backend: Backend) -> None:
    store, t0 = await backend.open(), backend.clock.now
    token, record = await store.create("alice", CONFIG, frozenset({"reader", "ops ✓"}))
    assert len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))) * 8 >= 128
    assert len({(await store.create("alice", CONFIG))[0] for _ in range(20)} | {token}) == 21
    assert (record.created_at, record.last_activity_at, record.expires_at) == (t0, t0, t0 + IDLE_S)
    resolved = await (await backend.open()).resolve(token)
    assert (resolved.session_id, resolved.identity, resolved.config) == (record.session_id, "alice", CONFIG)
    assert resolved.roles == {"reader", "ops ✓"}
    described = resolved.to_proto()
    assert described.created_at.ToNanoseconds() == int(t0 * 1e9)
    assert described.expires_at.ToNanoseconds() == int((t0 + IDLE_S) * 1e9)


async def test_session_expires_after_idle_timeout(backend: Backend) -> None:
    store, peer = await backend.open(), await backend.open()
    token, _ = await store.create("alice", CONFIG)
    backend.clock.advance(IDLE_S - 1)
    await store.resolve(token)  # activity: the idle deadline moves
    backend.clock.advance(IDLE_S - 1)
    await peer.resolve(token)
    backend.clock.advance(IDLE_S)
    assert await refusal(store, token) == IDLE
    assert await refusal(peer, token) == IDLE  # and stays refused, saying why
    assert await refusal(store, token) == IDLE


async def test_heartbeat_extends_the_idle_deadline(backend: Backend) -> None:
    store, peer = await backend.open(), await backend.open()
    t0 = backend.clock.now
    token, _ = await store.create("alice", CONFIG)
    backend.clock.advance(50)
    assert await store.heartbeat(await store.resolve(token)) == t0 + 50 + IDLE_S
    backend.clock.advance(50)  # past the first deadline (t0 + 60), before the new one
    assert (await peer.resolve(token)).expires_at == t0 + 100 + IDLE_S


async def test_heartbeat_never_extends_past_the_maximum_lifetime(backend: Backend) -> None:
    store, peer = await backend.open(), await backend.open()
    t0 = backend.clock.now
    token, _ = await store.create("alice", CONFIG)
    deadlines = []
    for _ in range(5):
        backend.clock.advance(50)
        deadlines.append(await store.heartbeat(await store.resolve(token)) - t0)
    assert deadlines == [110, 160, 210, 260, MAX_S]  # the last capped at created + 300
    backend.clock.advance(40)
    assert (await peer.resolve(token)).expires_at == t0 + MAX_S
    backend.clock.advance(10)
    assert await refusal(peer, token) == LIFETIME
    assert await refusal(store, token) == LIFETIME


async def test_every_call_records_activity(backend: Backend) -> None:
    store, peer = await backend.open(), await backend.open()
    t0 = backend.clock.now
    token, record = await store.create("alice", CONFIG)
    backend.clock.advance(10)
    resolved = await store.resolve(token)
    assert (resolved.last_activity_at, resolved.expires_at) == (t0 + 10, t0 + 10 + IDLE_S)
    assert resolved.to_proto().last_activity_at.ToNanoseconds() == int((t0 + 10) * 1e9)
    assert await peer.status(record.digest) == (None, t0 + 10 + IDLE_S)
    # Within a second of the last write a shared store is not written again (hot path); the
    # call itself still sees its own time, and memory records every call in place.
    backend.clock.advance(0.5)
    assert (await store.resolve(token)).last_activity_at == t0 + 10.5
    stored = t0 + 10.5 + IDLE_S if backend.name == "memory" else t0 + 10 + IDLE_S
    assert await peer.status(record.digest) == (None, stored)
    backend.clock.advance(2)
    await store.resolve(token)
    assert await peer.status(record.digest) == (None, t0 + 12.5 + IDLE_S)


async def test_closed_session_is_refused_everywhere(backend: Backend) -> None:
    store, peer = await backend.open(), await backend.open()
    token, _ = await store.create("alice", CONFIG)
    other, _ = await store.create("bob", CONFIG)
    record = await peer.resolve(token)
    await store.close(await store.resolve(token))
    assert await refusal(store, token) == UNKNOWN
    assert await refusal(peer, token) == UNKNOWN
    with pytest.raises(PrismError, match=UNKNOWN):
        await peer.heartbeat(record)  # resolved before the close, heartbeat after it
    assert (await peer.resolve(other)).identity == "bob"


async def test_unknown_token_is_refused(backend: Backend) -> None:
    store = await backend.open()
    assert await refusal(store, secrets.token_urlsafe(32)) == UNKNOWN
    assert await refusal(store, "") == UNKNOWN


async def test_tokens_are_never_stored_in_clear(backend: Backend) -> None:
    store = await backend.open()
    tokens = [(await store.create("alice", CONFIG))[0] for _ in range(3)]
    if isinstance(store, MemorySessionStore):
        stored = repr(store._by_digest).encode()
    elif isinstance(store, SqliteSessionStore):
        await store.close_store()  # checkpoint the WAL, then read every file SQLite wrote
        backend.stores.remove(store)
        stored = b"".join(p.read_bytes() for p in backend.tmp.glob("sessions.db*"))
    else:
        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            keys = [key async for key in client.scan_iter(match=backend.prefix + "*")]
            assert len(keys) == 2 * len(tokens) + 1  # a hash and a marker each, and the live set
            values = [repr(await client.zrange(k, 0, -1)) if k.endswith(b"live") else
                repr(await client.hgetall(k) if await client.type(k) == b"hash" else await client.get(k))
                for k in keys
            ]  # fmt: skip
            stored = b" ".join(keys) + " ".join(values).encode()
        finally:
            await client.aclose()
    for token in tokens:
        assert token.encode() not in stored
        assert token_digest(token).encode() in stored  # the right thing was inspected


async def test_records_are_kept_a_while_after_expiry_then_forgotten(backend: Backend) -> None:
    store = await backend.open()
    token, _ = await store.create("alice", CONFIG)
    backend.clock.advance(IDLE_S + EXPIRED_KEPT_SECONDS - SWEEP_INTERVAL)
    await store.create("bob", CONFIG)  # sweeps
    assert await refusal(store, token) == IDLE
    backend.clock.advance(2 * SWEEP_INTERVAL)
    await store.create("carol", CONFIG)
    if isinstance(store, RedisSessionStore):  # Redis's own clock expires its keys; ours is fake
        assert await refusal(store, token) == IDLE
    else:
        assert await refusal(store, token) == UNKNOWN


async def test_sqlite_store_upgrades_a_file_from_before_roles(tmp_path: pathlib.Path) -> None:
    with sqlite3.connect(tmp_path / "sessions.db") as old:
        old.execute(
            "CREATE TABLE prism_sessions (token_hash TEXT PRIMARY KEY, session_id TEXT NOT NULL, "
            "identity TEXT NOT NULL, config BLOB NOT NULL, created_at REAL NOT NULL, "
            "expires_at REAL NOT NULL, last_activity_at REAL NOT NULL)"
        )
        now = time.time()
        old.execute(
            "INSERT INTO prism_sessions VALUES (?, 'id', 'alice', ?, ?, ?, ?)",
            (token_digest("kept"), CONFIG.SerializeToString(), now, now + IDLE_S, now),
        )
    stores = [
        SqliteSessionStore(tmp_path / "sessions.db", idle_timeout=IDLE_S, max_lifetime=MAX_S)
        for _ in range(3)
    ]
    await asyncio.gather(*(store.start() for store in stores))  # several workers at once
    try:
        assert (await stores[0].resolve("kept")).roles == frozenset()
        token, _ = await stores[1].create("bob", CONFIG, frozenset({"writer"}))
        assert (await stores[2].resolve(token)).roles == {"writer"}
    finally:
        for store in stores:
            await store.close_store()


# Streams a session holds.


class StreamProbe:
    """Stands for an open stream: records the status its session ended it with."""

    def __init__(self) -> None:
        self.ended: asyncio.Future[PrismError] = asyncio.get_running_loop().create_future()

    async def __call__(self, status: PrismError) -> None:
        self.ended.set_result(status)

    async def status(self) -> tuple[str, str]:
        status = await asyncio.wait_for(self.ended, 5)
        return status.code.name, status.message


async def test_close_ends_the_sessions_streams(backend: Backend) -> None:
    store = await backend.open()
    token, _ = await store.create("alice", CONFIG)
    other, _ = await store.create("bob", CONFIG)
    mine, its = StreamProbe(), StreamProbe()
    record = await store.resolve(token)
    record.hold_stream("s1", mine)
    (await store.resolve(other)).hold_stream("s2", its)
    await store.close(record)
    assert await mine.status() == ("UNAUTHENTICATED", CLOSED)
    record.release_stream("s1")  # the stream's own cleanup after being ended
    assert not its.ended.done() and len(store.streams) == 1


async def test_streams_end_when_the_session_expires(backend: Backend) -> None:
    store = await backend.open()
    token, _ = await store.create("alice", CONFIG)
    probe = StreamProbe()
    (await store.resolve(token)).hold_stream("s1", probe)
    backend.clock.advance(IDLE_S - 10)
    await store.resolve(token)
    backend.clock.advance(20)  # the first deadline passes, but activity moved it
    await asyncio.sleep(0.2)  # let the watchdog look (a store round trip)
    assert not probe.ended.done()
    backend.clock.advance(IDLE_S)
    assert await probe.status() == ("UNAUTHENTICATED", IDLE)
    assert len(store.streams) == 0


async def test_released_streams_stop_the_watchdog(backend: Backend) -> None:
    store = await backend.open()
    token, _ = await store.create("alice", CONFIG)
    record, probe = await store.resolve(token), StreamProbe()
    record.hold_stream("s1", probe)
    record.hold_stream("s2", probe)
    record.release_stream("s1")
    assert len(store.streams) == 1
    record.release_stream("s2")
    assert len(store.streams) == 0
    backend.clock.advance(IDLE_S)
    await asyncio.sleep(0.05)
    assert not probe.ended.done()


@pytest.mark.parametrize("backend", ["sqlite", "redis"], indirect=True)
async def test_streams_notice_a_close_by_another_process(backend: Backend) -> None:
    here, there = await backend.open(), await backend.open()
    token, _ = await here.create("alice", CONFIG)
    probe = StreamProbe()
    (await here.resolve(token)).hold_stream("s1", probe)
    await there.close(await there.resolve(token))
    backend.clock.advance(RECHECK_SECONDS)
    assert await probe.status() == ("UNAUTHENTICATED", CLOSED)


# Registered client configurations, kept beside the sessions.


async def test_registered_configs_are_shared_and_names_taken_once(backend: Backend) -> None:
    here, there = await backend.open(), await backend.open()
    first = config_pb2.ClientConfig(name="reg-b", namespace="one").SerializeToString()
    assert await here.register_config("reg-b", first)
    assert await there.registered_config("reg-b") == first  # another process's view
    assert not await there.register_config("reg-b", b"another")  # taken: the first one stays
    assert await here.registered_config("reg-b") == first
    assert await there.register_config("reg-a", b"a")
    assert await here.registered_configs() == [b"a", first]  # in name order
    assert await here.registered_config("unknown") is None


async def test_concurrent_registrations_of_one_name_leave_one_winner(backend: Backend) -> None:
    stores = [await backend.open() for _ in range(3)]
    won = await asyncio.gather(*(s.register_config("race", f"v{i}".encode()) for i, s in enumerate(stores)))
    assert sorted(won) == [False, False, True]
    assert await stores[0].registered_config("race") == f"v{won.index(True)}".encode()


# Redis specifics: TTLs and the key prefix.


async def test_redis_ttl_is_the_time_to_the_effective_deadline() -> None:
    if REDIS_DOWN:
        pytest.skip(REDIS_DOWN)
    clock = FakeClock()
    store = RedisSessionStore(
        f"{REDIS_URL}?key_prefix={RUN_PREFIX}ttl:", idle_timeout=IDLE_S, max_lifetime=MAX_S, clock=clock
    )
    await store.start()
    try:
        token, record = await store.create("alice", CONFIG)
        key, marker = store.session_key(record.digest), store.marker_key(record.digest)
        assert 59_000 < await store.redis.pttl(key) <= 60_000
        assert (
            (MAX_S + EXPIRED_KEPT_SECONDS - 1) * 1000
            < await store.redis.pttl(marker)
            <= (MAX_S + EXPIRED_KEPT_SECONDS) * 1000
        )
        clock.advance(30)
        await store.resolve(token)  # activity: the TTL is the full idle timeout again
        assert 59_000 < await store.redis.pttl(key) <= 60_000
        for _ in range(5):
            clock.advance(50)
            record = await store.resolve(token)
        assert await store.heartbeat(record) == record.created_at + MAX_S
        assert 19_000 < await store.redis.pttl(key) <= 20_000  # capped: created + 300
        await store.close(await store.resolve(token))
        assert await store.redis.exists(key, marker) == 0
    finally:
        await store.close_store()


async def test_redis_expires_sessions_server_side() -> None:
    """Redis itself drops an idle session (its own clock, so a real 0.3 s timeout); the marker
    still says why the token is refused."""
    if REDIS_DOWN:
        pytest.skip(REDIS_DOWN)
    store = RedisSessionStore(
        f"{REDIS_URL}?key_prefix={RUN_PREFIX}server-side:", idle_timeout=0.3, max_lifetime=MAX_S
    )
    await store.start()
    try:
        token, record = await store.create("alice", CONFIG)
        assert await store.redis.exists(store.session_key(record.digest))
        await asyncio.sleep(0.5)
        assert not await store.redis.exists(store.session_key(record.digest))
        assert await refusal(store, token) == IDLE
    finally:
        await store.close_store()


def test_redis_key_prefix_comes_from_the_url() -> None:
    assert split_prefix("redis://h:6379/2?key_prefix=a:b:&health_check_interval=5") == (
        "redis://h:6379/2?health_check_interval=5",
        "a:b:",
    )
    assert split_prefix("redis://h:6379/0") == ("redis://h:6379/0", DEFAULT_PREFIX)


def test_gateway_builds_the_configured_store(tmp_path: pathlib.Path) -> None:
    def build(shared: bool = False, **sessions: object) -> SessionStore:
        settings = Settings(
            data_dir=tmp_path, sessions={"idle_timeout_seconds": 30, "max_lifetime_seconds": 600, **sessions}
        )
        return _session_store(settings, shared=shared)

    assert type(build()) is MemorySessionStore
    assert type(build(shared=True)) is SqliteSessionStore
    assert type(build(store="sqlite")) is SqliteSessionStore
    store = build(store="redis", redis_url="redis://127.0.0.1:6379/3?key_prefix=x:")
    assert isinstance(store, RedisSessionStore)
    assert (store.url, store.prefix, store.idle_timeout, store.max_lifetime) == (
        "redis://127.0.0.1:6379/3",
        "x:",
        30,
        600,
    )


# Through the gateway, on every transport.


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_closing_a_session_ends_its_streams_with_unauthenticated(
    gateway, client_factory, transport
) -> None:
    """A PubSub stream of a closed session ends with UNAUTHENTICATED "session closed" (SSE:
    an `event: error`; gRPC and gRPC-Web: the status), not with a clean end."""
    client, closer = client_factory(transport, gateway), client_factory("rest", gateway)
    token = await open_session(client, "events")
    stream = client.stream(
        PS + "Subscribe", ps.PubSubSubscribeRequest(subject=f"s{uuid.uuid4().hex[:8]}.>"), token
    )
    opened = await asyncio.wait_for(anext(stream), 10)
    assert opened.subscription_id
    await closer.call(SESSION + "CloseSession", session_pb2.CloseSessionRequest(), token)
    with pytest.raises(CallError) as ended:
        await asyncio.wait_for(anext(stream), 10)
    assert (ended.value.code, ended.value.message) == ("UNAUTHENTICATED", CLOSED)
    with pytest.raises(CallError) as refused:
        await client.call(SESSION + "GetSession", session_pb2.GetSessionRequest(), token)
    assert (refused.value.code, refused.value.message) == ("UNAUTHENTICATED", UNKNOWN)


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_get_session_describes_the_session(gateway, client_factory, transport) -> None:
    client = client_factory(transport, gateway)
    created = await client.call(SESSION + "CreateSession", session_pb2.CreateSessionRequest(config_name="kv"))
    session = (
        await client.call(SESSION + "GetSession", session_pb2.GetSessionRequest(), created.token)
    ).session
    assert (session.session_id, session.identity, session.config.name) == (
        created.session.session_id,
        "anonymous",
        "kv",
    )
    created_at, last, expires = (
        t.ToNanoseconds() / 1e9 for t in (session.created_at, session.last_activity_at, session.expires_at)
    )
    assert created_at <= last < created_at + 5
    assert expires == pytest.approx(last + 900, abs=1e-3)  # the default idle timeout, sooner than 24 h
    beat = await client.call(SESSION + "Heartbeat", session_pb2.HeartbeatRequest(), created.token)
    assert beat.expires_at.ToNanoseconds() / 1e9 >= expires


# Two gateway instances sharing Redis.


async def test_two_gateway_instances_share_sessions_through_redis(tmp_path: pathlib.Path) -> None:
    """A session created on A works on B; a Heartbeat on B keeps it alive for A past its first
    idle deadline (6 s, real time: the gateways run on their own clocks); CloseSession on B
    makes A refuse it and ends A's stream of it."""
    if REDIS_DOWN:
        pytest.skip(REDIS_DOWN)
    prefix = f"{RUN_PREFIX}two-instances:"
    config = (
        f'sessions: {{store: redis, redis_url: "{REDIS_URL}?key_prefix={prefix}", idle_timeout_seconds: 6}}\n'
        f'backends:\n  shared: {{type: sqlite, path: "{tmp_path / "shared.db"}"}}\n  bus: {{type: memory}}\n'
        "configs:\n  - {name: kv, pattern: KEY_VALUE, backend: shared}\n"
        "  - {name: events, pattern: PUBSUB, backend: bus}\n"
    )
    gateways = [start_gateway(tmp_path / name, config_yaml=config, wait=False) for name in "ab"]
    a_client = b_client = None
    try:
        for gateway in gateways:
            wait_ready(gateway)
        a, b = gateways
        a_client, b_client = GrpcClient(a.grpc_target), RestClient(b.base_url)

        # A configuration registered on B is known to A, and its name is taken on both.
        registered = config_pb2.ClientConfig(
            name="registered-on-b", pattern=config_pb2.ACCESS_PATTERN_KEY_VALUE, namespace="default",
            backend=config_pb2.BackendConfig(instance="shared"),
        )
        await b_client.call(CONFIGS + "RegisterConfig", config_pb2.RegisterConfigRequest(config=registered))
        listed = await a_client.call(CONFIGS + "ListConfigs", config_pb2.ListConfigsRequest())
        assert "registered-on-b" in [c.name for c in listed.configs]  # type: ignore[attr-defined]
        with pytest.raises(CallError) as taken:
            await a_client.call(CONFIGS + "RegisterConfig", config_pb2.RegisterConfigRequest(config=registered))
        assert taken.value.code == "ALREADY_EXISTS"
        await a_client.call(KV + "Set", kv.SetRequest(key="via-registered", value=b"x"), await open_session(a_client, "registered-on-b"))

        token = await open_session(a_client, "kv")
        unattended = await open_session(a_client, "kv")
        await a_client.call(KV + "Set", kv.SetRequest(key="k", value=b"from A"), token)
        assert (await b_client.call(KV + "Get", kv.GetRequest(key="k"), token)).value == b"from A"
        events = await open_session(a_client, "events")  # a stream is not activity: heartbeats are
        stream = a_client.stream(PS + "Subscribe", ps.PubSubSubscribeRequest(subject="two.>"), events)
        assert (await asyncio.wait_for(anext(stream), 10)).subscription_id

        await asyncio.sleep(3.5)
        for session in (token, events):
            beat = await b_client.call(SESSION + "Heartbeat", session_pb2.HeartbeatRequest(), session)
            assert beat.expires_at.ToNanoseconds() / 1e9 == pytest.approx(time.time() + 6, abs=1)
        await asyncio.sleep(3.5)  # past the first idle deadline of every session
        assert (await a_client.call(KV + "Get", kv.GetRequest(key="k"), token)).value == b"from A"
        with pytest.raises(CallError) as expired:
            await a_client.call(KV + "Get", kv.GetRequest(key="k"), unattended)
        assert (expired.value.code, expired.value.message) == ("UNAUTHENTICATED", IDLE)

        for session in (token, events):
            await b_client.call(SESSION + "CloseSession", session_pb2.CloseSessionRequest(), session)
        with pytest.raises(CallError) as refused:
            await a_client.call(KV + "Get", kv.GetRequest(key="k"), token)
        assert (refused.value.code, refused.value.message) == ("UNAUTHENTICATED", UNKNOWN)
        with pytest.raises(CallError) as ended:  # A notices B's close within RECHECK_SECONDS
            await asyncio.wait_for(anext(stream), RECHECK_SECONDS + 5)
        assert (ended.value.code, ended.value.message) == ("UNAUTHENTICATED", CLOSED)
    finally:
        for client in (a_client, b_client):
            if client is not None:
                await client.close()
        for gateway in gateways:
            gateway.stop()


async def test_active_count_is_the_live_sessions(backend: Backend) -> None:
    """``prism_sessions_active``: created and not closed nor past a deadline."""
    store = await backend.open()
    records = [(await store.create("alice", CONFIG))[1] for _ in range(3)]
    assert await store.active_count() == 3
    await store.close(records[0])
    assert await store.active_count() == 2
    backend.clock.advance(IDLE_S + 1)  # the others go idle past their deadline
    assert await store.active_count() == 0
