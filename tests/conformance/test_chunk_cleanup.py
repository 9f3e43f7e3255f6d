"""No chunk outlives the value it belongs to, on every backend.

A chunked value's pieces live in a hidden namespace that no client call can list, so the
public-API suite (test_large_values.py) cannot see them. Here the KeyValue service runs in this
process over each real adapter, and the hidden namespace is inspected through the same adapter:
after an overwrite, a delete or a refused write, exactly the chunks of the live value remain.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from adapters.keyvalue.base import KeyValueAdapter
from app.backends import Backends
from app.configs import from_settings
from app.services.keyvalue import KeyValueService, _chunk_namespace
from app.settings import Limits, NamedConfig, Settings
from prism.errors import PrismError
from prism.v1 import keyvalue_pb2 as kv
from tests.conformance.test_keyvalue import require
from tests.servers import POSTGRES_DSN, REDIS_URL, purge_namespaces

BACKENDS = {
    "memory": {"type": "memory"},
    "sqlite": {"type": "sqlite", "path": "chunks.db"},
    "postgres": {"type": "postgres", "dsn": POSTGRES_DSN},
    "redis": {"type": "redis", "url": REDIS_URL},
}
MATRIX = ("KeyValue", {b: b for b in BACKENDS})  # tests/conformance/conftest.py
NAMESPACE = f"chunks-{uuid.uuid4().hex[:8]}"
CHUNK = 1024


@dataclass
class Harness:
    service: KeyValueService
    adapter: KeyValueAdapter
    call: Any  # what the service reads of a call: its session's config, the method's name

    async def set(self, key: str, value: bytes, **options: Any) -> str:
        return (await self.service.Set(kv.SetRequest(key=key, value=value, **options), self.call)).etag

    async def chunks(self, *keys: str) -> list[str]:
        """The chunks stored for ``keys`` (chunk keys are the key, NUL, version, NUL, index)."""
        found = []
        for key in keys:
            found += [k for k, _ in await self.adapter.scan(_chunk_namespace(NAMESPACE), key + "\x00", "", 10_000)]
        return found


@pytest.fixture(scope="module")
async def purge_afterwards() -> AsyncIterator[None]:
    yield
    await purge_namespaces([b for b in ("postgres", "redis") if b in BACKENDS], [NAMESPACE])


@pytest.fixture(params=list(BACKENDS))
async def harness(request: pytest.FixtureRequest, tmp_path: Any, purge_afterwards: None) -> AsyncIterator[Harness]:
    require(request.param)
    settings = Settings(
        data_dir=tmp_path,
        backends={request.param: BACKENDS[request.param]},
        configs=[NamedConfig(name="kv", pattern="KEY_VALUE", backend=request.param, namespace=NAMESPACE)],
    )
    backends = Backends(settings)
    await backends.start()
    service = KeyValueService(backends, Limits(max_value_bytes=64 * CHUNK, chunk_bytes=CHUNK), b"k" * 32)
    call = SimpleNamespace(config=from_settings(settings.configs[0], settings), method=SimpleNamespace(name="Set"))
    try:
        yield Harness(service, backends.for_keyvalue(call.config), call)
    finally:
        await backends.close()


def value(chunks: int, seed: int) -> bytes:
    return bytes([seed]) * (chunks * CHUNK)


@pytest.mark.case("large values")
async def test_overwrites_leave_only_the_live_values_chunks(harness: Harness) -> None:
    key = f"o-{uuid.uuid4().hex}"
    await harness.set(key, value(5, 1))
    assert len(await harness.chunks(key)) == 5
    await harness.set(key, value(3, 2))  # chunked over chunked
    assert len(await harness.chunks(key)) == 3
    await harness.set(key, b"small")  # small over chunked
    assert await harness.chunks(key) == []
    await harness.set(key, value(2, 3))  # chunked over small
    assert len(await harness.chunks(key)) == 2


@pytest.mark.case("large values")
async def test_deletes_remove_the_chunks(harness: Harness) -> None:
    one, two = f"d1-{uuid.uuid4().hex}", f"d2-{uuid.uuid4().hex}"
    etag = await harness.set(one, value(4, 4))
    await harness.set(two, value(2, 5))
    response = await harness.service.Delete(kv.DeleteRequest(key=one, if_match=etag), harness.call)
    assert response.existed
    assert len(await harness.chunks(one, two)) == 2
    batch = await harness.service.BatchDelete(kv.BatchDeleteRequest(keys=[two]), harness.call)
    assert [r.existed for r in batch.results] == [True]
    assert await harness.chunks(one, two) == []


@pytest.mark.case("large values")
async def test_refused_writes_leave_the_stored_chunks_alone(harness: Harness) -> None:
    key = f"r-{uuid.uuid4().hex}"
    etag = await harness.set(key, value(3, 6))
    before = await harness.chunks(key)
    for options in ({"if_match": "not-the-etag"}, {"if_absent": True}):
        with pytest.raises(PrismError):
            await harness.set(key, value(4, 7), **options)
        assert await harness.chunks(key) == before
        with pytest.raises(PrismError):
            await harness.set(key, b"small", **options)
        assert await harness.chunks(key) == before
    with pytest.raises(PrismError):
        await harness.service.Delete(kv.DeleteRequest(key=key, if_match="not-the-etag"), harness.call)
    assert await harness.chunks(key) == before
    assert (await harness.service.Get(kv.GetRequest(key=key), harness.call)).etag == etag
