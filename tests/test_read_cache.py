"""The per-namespace read cache against consistency levels, with two real gateway processes
sharing one SQLite file: B's writes are what A's cache may hide, within the client's bound."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator

import httpx
import pytest

from prism.v1 import keyvalue_pb2 as kv
from tests.clients import GrpcClient
from tests.conftest import open_session
from tests.gateway_process import GatewayProcess, start_gateway

CONFIG = """
backends:
  local: {type: sqlite, path: SHARED}
configs:
  - {name: strong, pattern: KEY_VALUE, backend: local, namespace: cached}
  - {name: eventual, pattern: KEY_VALUE, backend: local, namespace: cached, consistency: EVENTUAL,
     cache: {ttl_seconds: 60, max_entries: 100}}
  - {name: bounded, pattern: KEY_VALUE, backend: local, namespace: cached, consistency: BOUNDED_STALENESS,
     max_staleness_seconds: 2, cache: {ttl_seconds: 60}}
"""
GET, SET = "/prism.v1.KeyValueService/Get", "/prism.v1.KeyValueService/Set"


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    tmp = tmp_path_factory.mktemp("cache")
    config = CONFIG.replace("SHARED", str(tmp / "shared.db"))  # one file for both processes
    a = start_gateway(tmp / "a", config_yaml=config)
    b = start_gateway(tmp / "b", config_yaml=config)
    yield a, b
    a.stop()
    b.stop()


def hits(gateway: GatewayProcess) -> float:
    text = httpx.get(f"{gateway.base_url}/metrics").text
    found = re.search(r'prism_kv_cache_reads_total\{namespace="cached",result="hit"\} (\S+)', text)
    return float(found.group(1)) if found else 0.0


async def test_consistency_levels_and_invalidation(pair) -> None:
    a, b = pair
    client_a, client_b = GrpcClient(a.grpc_target), GrpcClient(b.grpc_target)
    try:
        tokens = {name: await open_session(client_a, name) for name in ("strong", "eventual", "bounded")}
        writer_b = await open_session(client_b, "strong")

        async def read(name: str) -> bytes:
            return (await client_a.call(GET, kv.GetRequest(key="k"), tokens[name])).value

        await client_a.call(SET, kv.SetRequest(key="k", value=b"v1"), tokens["strong"])
        assert await read("eventual") == b"v1" and await read("bounded") == b"v1"  # both cached now
        before = hits(a)
        await client_b.call(SET, kv.SetRequest(key="k", value=b"v2"), writer_b)  # A does not see this write

        assert await read("strong") == b"v2"  # STRONG bypasses the cache
        assert await read("eventual") == b"v1"  # EVENTUAL may serve the cached value
        assert await read("bounded") == b"v1"  # younger than the bound (2 s: slack for a slow machine): may too
        assert hits(a) >= before + 2
        await asyncio.sleep(2.1)
        assert await read("eventual") == b"v1"  # within its 60 s ttl
        assert await read("bounded") == b"v2"  # older than 2 s: re-read
        assert await read("eventual") == b"v2"  # one cache per namespace: the re-read refreshed it

        await client_a.call(SET, kv.SetRequest(key="k", value=b"v3"), tokens["eventual"])  # a write through A
        assert await read("eventual") == b"v3"  # ...invalidates A's cache
    finally:
        await client_a.close()
        await client_b.close()


async def test_cache_config_is_validated(pair) -> None:
    from google.protobuf import json_format

    from prism.v1 import config_pb2

    a, _ = pair
    client = GrpcClient(a.grpc_target)
    try:
        bad = json_format.ParseDict(
            {"name": "c", "pattern": "ACCESS_PATTERN_KEY_VALUE", "backend": {"instance": "local"}, "namespace": "cached",
             "cache": {"enabled": True}, "consistency": {"level": "CONSISTENCY_LEVEL_BOUNDED_STALENESS"}},
            config_pb2.ClientConfig(),
        )
        answer = await client.call("/prism.v1.ConfigService/ValidateConfig", config_pb2.ValidateConfigRequest(config=bad))
        fields = {v.field for v in answer.violations}
        assert {"cache.ttl", "consistency.maxStaleness"} <= fields
    finally:
        await client.close()
