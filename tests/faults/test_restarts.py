"""Stop and start the real PostgreSQL and Redis servers under a running gateway.

While a server is down, every call on it fails fast with UNAVAILABLE — it never hangs. Once the
server is back, the gateway answers again by itself: no gateway restart, nothing done by the
client. And a backend claiming "durable" has lost no acknowledged write, including those
acknowledged while the server was shutting down. Redis here keeps nothing on disk, so its data
does not survive its restart; its adapter does not claim "durable", and the test holds it to
that claim rather than to the backend's name. Each test leaves its server running, whatever
happened.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest
from google.protobuf.message import Message

from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import plugin_pb2, session_pb2
from tests.clients import CallError, GrpcClient
from tests.gateway_process import GatewayProcess, start_gateway
from tests.servers import POSTGRES, POSTGRES_DSN, REDIS, REDIS_URL, purge_namespaces

SERVERS = {"postgres": POSTGRES, "redis": REDIS}
NAMESPACE = f"faults-{uuid.uuid4().hex[:8]}"
FAST = 2.0  # seconds: a call made while the server is down must fail within this
RECOVERY = 30  # seconds: bound on waiting for the gateway to answer again
KV = "/prism.v1.KeyValueService/"


def not_testable(backend: str) -> str | None:
    server = SERVERS[backend]
    return server.missing_tools() or (None if server.up() else f"{backend} is not running")


@pytest.fixture(scope="module")
async def purge_afterwards() -> AsyncIterator[None]:
    yield
    await purge_namespaces([b for b, s in SERVERS.items() if s.up()], [NAMESPACE])


@pytest.fixture(scope="module")
def faults_gateway(
    tmp_path_factory: pytest.TempPathFactory, purge_afterwards: None
) -> Iterator[GatewayProcess]:
    """A gateway on the servers' default client settings (timeouts, pool size)."""
    specs = {"postgres": f'{{type: postgres, dsn: "{POSTGRES_DSN}"}}', "redis": f'{{type: redis, url: "{REDIS_URL}"}}'}
    running = [b for b in SERVERS if not_testable(b) is None]
    config = "backends:\n" + "".join(f"  {b}: {specs[b]}\n" for b in running)
    config += "configs:\n" + "".join(
        f"  - {{name: kv-{b}, pattern: KEY_VALUE, backend: {b}, namespace: {NAMESPACE}}}\n" for b in running
    )
    process = start_gateway(tmp_path_factory.mktemp("faults"), config_yaml=config if running else None)
    yield process
    process.stop()


class Probe:
    """Calls on one KEY_VALUE session, each timed; failures are recorded, not raised."""

    def __init__(self, client: GrpcClient, token: str) -> None:
        self.client, self.token = client, token
        self.failures: list[tuple[str, str, float]] = []  # (rpc, status, seconds)

    async def call(self, rpc: str, request: Message) -> Message:
        return await self.client.call(KV + rpc, request, self.token)

    async def attempt(self, rpc: str, request: Message) -> Message | None:
        started = time.monotonic()
        try:
            return await self.call(rpc, request)
        except CallError as exc:
            self.failures.append((rpc, exc.code, time.monotonic() - started))
            return None


@pytest.mark.parametrize("backend", list(SERVERS))
async def test_server_restart(faults_gateway: GatewayProcess, backend: str) -> None:
    if reason := not_testable(backend):
        pytest.skip(reason)
    server = SERVERS[backend]
    client = GrpcClient(faults_gateway.grpc_target)
    try:
        session = await client.call(
            "/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=f"kv-{backend}")
        )
        probe = Probe(client, session.token)  # type: ignore[attr-defined]
        info = await client.call("/prism.v1.PluginInfoService/GetInfo", plugin_pb2.InfoRequest())
        (entry,) = [b for b in info.backends if b.name == backend and b.pattern == "KEY_VALUE"]  # type: ignore[attr-defined]
        durable = "durable" in entry.capabilities

        acknowledged: dict[str, bytes] = {}
        for i in range(20):
            key, value = f"before/{i:03d}", f"value {i}".encode()
            await probe.call("Set", kv.SetRequest(key=key, value=value))
            acknowledged[key] = value

        # A writer keeps going through the whole outage; what it gets acknowledged must stay.
        writing = True

        async def writer() -> None:
            i = 0
            while writing:
                key, value = f"during/{i:05d}", f"value {i}".encode()
                if await probe.attempt("Set", kv.SetRequest(key=key, value=value)) is not None:
                    acknowledged[key] = value
                i += 1
                await asyncio.sleep(0.02)

        task = asyncio.create_task(writer())
        try:
            await asyncio.sleep(0.3)
            await asyncio.to_thread(server.stop)
            down = [
                ("Get", kv.GetRequest(key="before/000")),
                ("Set", kv.SetRequest(key="before/000", value=b"while down")),
                ("Exists", kv.ExistsRequest(key="before/000")),
                ("Delete", kv.DeleteRequest(key="before/001")),
                ("BatchGet", kv.BatchGetRequest(keys=["before/000", "before/002"])),
                ("Scan", kv.ScanRequest(prefix="before/")),
                ("Set", kv.SetRequest(key="token", value=b"x", idempotency_token=uuid.uuid4().hex)),
            ]
            for rpc, request in down * 2:
                assert await probe.attempt(rpc, request) is None, f"{rpc} answered with {backend} stopped"
            await asyncio.to_thread(server.start)
            started = time.monotonic()
            while await probe.attempt("Exists", kv.ExistsRequest(key="before/000")) is None:
                assert time.monotonic() - started < RECOVERY, f"no recovery {RECOVERY}s after {backend} started"
                await asyncio.sleep(0.1)
            recovery = time.monotonic() - started
            await asyncio.sleep(0.3)  # the writer writes again after recovery
        finally:
            writing = False
            await task
            await asyncio.to_thread(server.ensure_started)

        assert probe.failures, "no call failed: the server was never down"
        print(
            f"{backend}: {len(probe.failures)} calls failed while down, slowest in "
            f"{max(f[2] for f in probe.failures):.3f}s; answering {recovery:.2f}s after the start command"
        )
        slow_or_wrong = [f for f in probe.failures if f[1] != "UNAVAILABLE" or f[2] >= FAST]
        assert slow_or_wrong == [], f"calls must fail with UNAVAILABLE within {FAST}s"

        # Recovered: every operation works again, scripts and prepared statements included.
        etag = (await probe.call("Set", kv.SetRequest(key="after", value=b"after"))).etag  # type: ignore[attr-defined]
        assert (await probe.call("Get", kv.GetRequest(key="after"))).value == b"after"  # type: ignore[attr-defined]
        await probe.call("Set", kv.SetRequest(key="after", value=b"cas", if_match=etag))
        scanned = await probe.call("Scan", kv.ScanRequest(prefix="after"))
        assert [i.key for i in scanned.items] == ["after"]  # type: ignore[attr-defined]

        keys = sorted(acknowledged)
        found: dict[str, bytes] = {}
        for i in range(0, len(keys), 500):
            batch = await probe.call("BatchGet", kv.BatchGetRequest(keys=keys[i : i + 500]))
            found.update((r.key, r.value) for r in batch.results if r.found)  # type: ignore[attr-defined]
        lost = [k for k in keys if found.get(k) != acknowledged[k]]
        assert not (durable and lost), f"{backend} claims durable but lost {len(lost)} acknowledged writes: {lost[:5]}"
        if not durable:
            print(f"{backend} (not durable) kept {len(keys) - len(lost)} of {len(keys)} acknowledged writes")
    finally:
        await client.close()
