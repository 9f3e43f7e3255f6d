"""Large KeyValue values: above ``limits.chunk_bytes`` a value is stored in chunks and
reassembled transparently, up to ``limits.max_value_bytes``; a partially written chunked value
is never visible. Run against every backend through the public API of a real gateway, like
tests/conformance/test_keyvalue.py (whose configs, sessions and skipping rules it reuses). The
chunks themselves, which no client call can see, are checked in test_keyvalue_adapter.py.

Most cases use a gateway with small limits (64 KiB max, 4 KiB chunks) so that many-chunk values
stay fast; the 5 MiB round trips use the default limits (16 MiB max, 1 MiB chunks).
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from adapters.keyvalue.chunked import ESCAPE, MARKER
from prism.v1 import keyvalue_pb2 as kv
from tests.clients import CallError
from tests.conformance.test_keyvalue import (
    BACKEND_OF,
    CONFIGS,
    UNREACHABLE,
    WAIT,
    Store,
    open_store,
    require,
    server_config,
)
from tests.gateway_process import GatewayProcess, start_gateway
from tests.servers import purge_namespaces

MATRIX = ("KeyValue", {**BACKEND_OF, **{b: b for b in BACKEND_OF.values()}})  # conftest.py's matrix

NAMESPACE = f"large-{uuid.uuid4().hex[:8]}"
CONFIG = server_config({config: (backend, NAMESPACE) for config, backend in BACKEND_OF.items()})
MAX, CHUNK = 64 * 1024, 4 * 1024  # the small-limits gateway
MiB = 1024 * 1024


def big(size: int, seed: int = 0) -> bytes:
    """``size`` bytes that differ chunk to chunk, so a misplaced chunk fails the comparison."""
    return (os.urandom(16) + bytes([seed])) * (size // 17) + os.urandom(size % 17)


@pytest.fixture(scope="module")
async def purge_afterwards() -> AsyncIterator[None]:
    yield
    await purge_namespaces([b for b in ("postgres", "redis") if b not in UNREACHABLE], [NAMESPACE])


@pytest.fixture(scope="module")
def default_gateway(tmp_path_factory: pytest.TempPathFactory, purge_afterwards: None) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("kv-large"), config_yaml=CONFIG)
    yield process
    process.stop()


@pytest.fixture(scope="module")
def small_gateway(tmp_path_factory: pytest.TempPathFactory, purge_afterwards: None) -> Iterator[GatewayProcess]:
    process = start_gateway(
        tmp_path_factory.mktemp("kv-large-small"),
        config_yaml=CONFIG,
        env={"PRISM_LIMITS__MAX_VALUE_BYTES": str(MAX), "PRISM_LIMITS__CHUNK_BYTES": str(CHUNK)},
    )
    yield process
    process.stop()


@pytest.fixture(params=CONFIGS)
async def store(request: pytest.FixtureRequest, small_gateway: GatewayProcess, client_factory) -> Store:
    require(BACKEND_OF[request.param])
    return await open_store(client_factory("grpc", small_gateway), request.param)


async def assert_reads(store: Store, key: str, value: bytes, etag: str) -> None:
    """Get, BatchGet and Scan all return the whole value."""
    got = await store.get(key)
    assert (got.value == value, got.etag) == (True, etag)
    (result,) = (await store.call("BatchGet", kv.BatchGetRequest(keys=[key]))).results
    assert (result.found, result.value == value, result.etag) == (True, True, etag)
    items = {i.key: i for i in await store.scan_all(store.prefix)}
    assert (items[key].value == value, items[key].etag) == (True, etag)


@pytest.mark.case("large values")
@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize("config", CONFIGS)
async def test_5mib_value_round_trips_byte_exact(
    default_gateway: GatewayProcess, client_factory, config: str, transport: str
) -> None:
    require(BACKEND_OF[config])
    store = await open_store(client_factory(transport, default_gateway), config)
    value = big(5 * MiB + 123)
    etag = await store.set(store.k("five"), value)
    got = await store.get(store.k("five"))
    assert (len(got.value), got.value == value, got.etag) == (len(value), True, etag)
    assert await store.delete(store.k("five")) is True


@pytest.mark.case("large values")
async def test_exactly_the_maximum_is_accepted_and_one_more_refused(store: Store) -> None:
    value = big(MAX, 1)
    etag = await store.set(store.k("max"), value)
    await assert_reads(store, store.k("max"), value, etag)
    error = await store.refused("Set", kv.SetRequest(key=store.k("max"), value=value + b"!"))
    assert error.code == "RESOURCE_EXHAUSTED"
    assert str(MAX + 1) in error.message and str(MAX) in error.message and "limit" in error.message
    assert (await store.get(store.k("max"))).value == value, "a refused write leaves the value unchanged"


@pytest.mark.case("large values")
@pytest.mark.parametrize("size", [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7])
async def test_sizes_around_chunk_boundaries_round_trip(store: Store, size: int) -> None:
    value = big(size, 2)
    etag = await store.set(store.k("b"), value)
    await assert_reads(store, store.k("b"), value, etag)


@pytest.mark.case("large values")
@pytest.mark.parametrize(
    "value",
    [MARKER, MARKER + b'{"chunks": 1, "sha256": "", "size": 1, "version": "x"}', ESCAPE, ESCAPE + b"x", ESCAPE + MARKER],
    ids=["marker", "fake-manifest", "escape", "escape-x", "escape-marker"],
)
async def test_values_that_look_like_internal_markers_round_trip(store: Store, value: bytes) -> None:
    etag = await store.set(store.k("m"), value)
    await assert_reads(store, store.k("m"), value, etag)


@pytest.mark.case("large values")
async def test_overwrite_chunked_with_small_and_small_with_chunked(store: Store) -> None:
    key, large = store.k("o"), big(10 * CHUNK + 5, 3)
    etag = await store.set(key, large)
    await assert_reads(store, key, large, etag)
    etag = await store.set(key, b"small now")
    await assert_reads(store, key, b"small now", etag)
    other = big(MAX - 1, 4)
    etag = await store.set(key, other)
    await assert_reads(store, key, other, etag)
    etag = await store.set(key, large)  # chunked over chunked
    await assert_reads(store, key, large, etag)


@pytest.mark.case("large values")
async def test_delete_of_a_chunked_key(store: Store) -> None:
    key = store.k("d")
    await store.set(key, big(5 * CHUNK, 5))
    assert await store.delete(key) is True
    assert await store.value(key) is None
    assert not await store.exists(key)
    assert await store.delete(key) is False
    (result,) = (await store.call("BatchGet", kv.BatchGetRequest(keys=[key]))).results
    assert not result.found
    assert await store.scan_all(store.prefix) == []
    # Re-created, it is a new value, not the old chunks.
    etag = await store.set(key, b"again")
    await assert_reads(store, key, b"again", etag)
    await store.set(store.k("d2"), big(2 * CHUNK, 6))
    response = await store.call("BatchDelete", kv.BatchDeleteRequest(keys=[store.k("d2")]))
    assert [r.existed for r in response.results] == [True]
    assert await store.value(store.k("d2")) is None


@pytest.mark.case("large values")
async def test_compare_and_set_on_a_chunked_key(store: Store) -> None:
    key, first, second = store.k("c"), big(6 * CHUNK, 7), big(7 * CHUNK, 8)
    etag = await store.set(key, first)
    new_etag = await store.set(key, second, if_match=etag)
    assert new_etag != etag
    error = await store.refused("Set", kv.SetRequest(key=key, value=first, if_match=etag))
    assert error.code == "ABORTED"
    error = await store.refused("Set", kv.SetRequest(key=key, value=first, if_absent=True))
    assert error.code == "ALREADY_EXISTS"
    error = await store.refused("Delete", kv.DeleteRequest(key=key, if_match=etag))
    assert error.code == "ABORTED"
    await assert_reads(store, key, second, new_etag)
    assert await store.delete(key, if_match=new_etag) is True
    etag = await store.set(key, first, if_absent=True)
    await assert_reads(store, key, first, etag)


@pytest.mark.case("large values")
async def test_concurrent_reader_never_sees_a_partial_value(store: Store) -> None:
    key, a, b = store.k("race"), big(MAX - 3, 9), big(MAX - 1000, 10)
    await store.set(key, a)
    done = asyncio.Event()
    seen: list[bytes] = []
    retried: list[CallError] = []

    async def writer() -> None:
        try:
            for i in range(30):
                await store.set(key, b if i % 2 == 0 else a)
        finally:
            done.set()

    async def reader(batch: bool) -> None:
        while not done.is_set():
            try:
                if batch:
                    (result,) = (await store.call("BatchGet", kv.BatchGetRequest(keys=[key]))).results
                    assert result.found
                    seen.append(result.value)
                else:
                    seen.append((await store.get(key)).value)
            except CallError as exc:
                # Overwritten faster than read, every attempt: a clean, retryable refusal.
                assert exc.code == "UNAVAILABLE", exc
                retried.append(exc)

    await asyncio.wait_for(asyncio.gather(writer(), reader(False), reader(False), reader(True)), WAIT * 3)
    assert seen, "the readers read nothing"
    assert all(v == a or v == b for v in seen), "a reader saw a value that is neither of the two"
    assert len(retried) <= len(seen), f"{len(retried)} refusals for {len(seen)} reads"
