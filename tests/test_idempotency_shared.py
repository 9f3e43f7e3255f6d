"""Idempotency tokens hold across worker processes and gateway instances.

20 concurrent retries of one Set, with one token, each on its own connection: spread over two
workers of one gateway (SQLite), and over two gateway instances sharing Redis. The write applies
once — every caller gets the same ETag, the one stored — because the token is claimed with a
create-only write in the backend, not under a lock of one process.
"""

from __future__ import annotations

import asyncio
import pathlib
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.gateway_process import GatewayProcess, start_gateway, wait_ready
from tests.servers import REDIS_URL, unreachable

RETRIES = 20
ATTEMPTS = 5


async def _concurrent_retries(base_urls: list[str], token: str, key: str) -> set[str]:
    """The ETags the retries got. Each retry has its own connection, opened beforehand (so
    SO_REUSEPORT spreads them over the workers), and all are released at once."""
    body = {"value": "b25jZQ==", "idempotencyToken": f"once-{uuid.uuid4().hex}"}
    headers = {"x-prism-session": token}
    clients = [httpx.AsyncClient(base_url=base_urls[i % len(base_urls)], timeout=30) for i in range(RETRIES)]
    try:
        await asyncio.gather(*(c.get("/healthz") for c in clients))  # connected
        go = asyncio.Event()

        async def retry(http: httpx.AsyncClient) -> str:
            await go.wait()
            response = await http.put(f"/v1/kv/{key}", json=body, headers=headers)
            assert response.status_code == 200, response.text
            return response.json()["etag"]

        retries = [asyncio.create_task(retry(c)) for c in clients]
        await asyncio.sleep(0)
        go.set()
        return set(await asyncio.gather(*retries))
    finally:
        await asyncio.gather(*(c.aclose() for c in clients))


async def _session(base_url: str) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        response = await http.post("/v1/sessions", json={"configName": "kv"})
        assert response.status_code == 200, response.text
        return response.json()["token"]


async def _stored_etag(base_url: str, token: str, key: str) -> str:
    async with httpx.AsyncClient(base_url=base_url) as http:
        return (await http.get(f"/v1/kv/{key}", headers={"x-prism-session": token})).json()["etag"]


async def test_two_workers_apply_a_token_once(tmp_path: pathlib.Path) -> None:
    gateway = start_gateway(tmp_path, "granian", extra_args=("--workers", "2"))
    try:
        token = await _session(gateway.base_url)
        for attempt in range(ATTEMPTS):  # a token per race
            key = f"shared-{attempt}"
            etags = await _concurrent_retries([gateway.base_url], token, key)
            assert len(etags) == 1, f"applied more than once: {etags}"
            assert etags == {await _stored_etag(gateway.base_url, token, key)}
    finally:
        gateway.stop()


@pytest.fixture
def run_id() -> Iterator[str]:
    """Unique to this run: the session-store key prefix and the namespace, both deleted after."""
    if reason := unreachable(REDIS_URL):
        pytest.skip(reason)
    run = f"idem{uuid.uuid4().hex[:12]}"
    yield run
    client = redis.Redis.from_url(REDIS_URL)
    try:
        if keys := list(client.scan_iter(match=f"*{run}*", count=1000)):
            client.delete(*keys)
    finally:
        client.close()


async def test_two_instances_on_redis_apply_a_token_once(tmp_path: pathlib.Path, run_id: str) -> None:
    config = (
        f'sessions: {{store: redis, redis_url: "{REDIS_URL}?key_prefix={run_id}:"}}\n'
        f"backends:\n  shared: {{type: redis, url: \"{REDIS_URL}\"}}\n"
        f"configs:\n  - {{name: kv, pattern: KEY_VALUE, backend: shared, namespace: {run_id}}}\n"
        f"namespaces:\n  - {{name: {run_id}}}\n"
    )
    gateways: list[GatewayProcess] = [
        start_gateway(tmp_path / name, "granian", config_yaml=config, wait=False) for name in "ab"
    ]
    try:
        for gateway in gateways:
            wait_ready(gateway)
        token = await _session(gateways[0].base_url)
        for attempt in range(ATTEMPTS):
            key = f"shared-{attempt}"
            etags = await _concurrent_retries([g.base_url for g in gateways], token, key)
            assert len(etags) == 1, f"applied more than once: {etags}"
            assert etags == {await _stored_etag(gateways[1].base_url, token, key)}
    finally:
        for gateway in gateways:
            gateway.stop()
