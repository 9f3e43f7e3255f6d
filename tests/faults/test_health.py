"""Health tells the truth: with the real PostgreSQL server stopped under a running gateway, all
three health surfaces — ``GET /readyz``, ``prism.v1.HealthService/Ready`` and
``grpc.health.v1`` — report it within a few seconds, each backend with its own state (the
``required`` one down and the gateway unready, an optional one degraded), and recover by
themselves once the server is back. The server is left running, whatever happened.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.v1 import plugin_pb2
from tests.clients import GrpcClient
from tests.faults.test_restarts import not_testable
from tests.gateway_process import GatewayProcess, start_gateway
from tests.servers import POSTGRES, POSTGRES_DSN

SOON = 10.0  # seconds: bound on every surface noticing a change (probes run every second)
CONFIG = f"""
backends:
  pg: {{type: postgres, dsn: "{POSTGRES_DSN}", required: true}}
  pg-optional: {{type: postgres, dsn: "{POSTGRES_DSN}", pool_size: 1}}
  local: {{type: sqlite}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: pg}}
"""
SERVING, NOT_SERVING = health_pb2.HealthCheckResponse.SERVING, health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass
class Surfaces:
    """What each surface says at one moment."""

    readyz_status: int
    readyz: dict[str, object]
    ready: plugin_pb2.ReadyResponse
    grpc_overall: int
    grpc_keyvalue: int


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    if reason := not_testable("postgres"):
        pytest.skip(reason)
    process = start_gateway(tmp_path_factory.mktemp("health"), config_yaml=CONFIG)
    yield process
    process.stop()


async def _look(http: httpx.AsyncClient, client: GrpcClient) -> Surfaces:
    answer = await http.get("/readyz")
    ready = await client.call("/prism.v1.HealthService/Ready", plugin_pb2.ReadyRequest())
    stub = health_pb2_grpc.HealthStub(client.channel)
    overall = await stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    keyvalue = await stub.Check(health_pb2.HealthCheckRequest(service="prism.v1.KeyValueService"), timeout=5)
    return Surfaces(answer.status_code, answer.json(), ready, overall.status, keyvalue.status)  # type: ignore[arg-type]


async def _until(http: httpx.AsyncClient, client: GrpcClient, agree: Callable[[Surfaces], bool]) -> tuple[Surfaces, float]:
    """Polls every surface until ``agree``; what they said then and how long it took."""
    started = time.monotonic()
    while not agree(seen := await _look(http, client)):
        assert time.monotonic() - started < SOON, f"the health surfaces did not agree within {SOON}s: {seen}"
        await asyncio.sleep(0.1)
    return seen, time.monotonic() - started


def _healthy(seen: Surfaces) -> bool:
    return (
        seen.readyz_status == 200
        and seen.readyz["status"] == "ok"
        and seen.ready.ready
        and set(seen.ready.checks.values()) == {"ok"}
        and seen.grpc_overall == SERVING
        and seen.grpc_keyvalue == SERVING
    )


def _postgres_down(seen: Surfaces) -> bool:
    return (
        seen.readyz_status == 503
        and seen.readyz["status"] == "unready"
        and not seen.ready.ready
        and seen.ready.checks["backend/pg"].startswith("down: ")
        and seen.ready.checks["backend/pg-optional"].startswith("degraded: ")
        and seen.grpc_overall == NOT_SERVING
        and seen.grpc_keyvalue == NOT_SERVING
    )


async def test_every_health_surface_follows_postgres_down_and_up(gateway: GatewayProcess) -> None:
    client = GrpcClient(gateway.grpc_target)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=5) as http:
            await _until(http, client, _healthy)
            try:
                await asyncio.to_thread(POSTGRES.stop)
                down, noticed = await _until(http, client, _postgres_down)
                asked = time.monotonic()
                await _look(http, client)  # the last round's result: no backend is asked
                assert time.monotonic() - asked < 1.0
                states = {name: (b["state"], b["required"]) for name, b in down.readyz["backends"].items()}  # type: ignore[attr-defined]
                assert states == {"pg": ("down", True), "pg-optional": ("degraded", False), "local": ("ok", False)}
                assert "problem" in down.readyz["backends"]["pg"]  # type: ignore[index]
                assert down.ready.checks["backend/local"] == "ok"
                await asyncio.to_thread(POSTGRES.start)
                _, recovered = await _until(http, client, _healthy)
            finally:
                await asyncio.to_thread(POSTGRES.ensure_started)
    finally:
        await client.close()
    print(f"postgres stopped: reported on every surface after {noticed:.2f}s; started: recovered after {recovered:.2f}s")
