"""The KeyValue adapter contract (``adapters/keyvalue/base.py``), checked against each adapter
directly — the contract a remote plugin adapter must pass as well — and against the chunked
decorator (``adapters/keyvalue/chunked.py``) over each. ``tests/conformance/test_keyvalue.py``
checks the service's cases through the gateway's transports.

The backends are the registry's (``adapters/registry.py``): every type it finds that serves
KEY_VALUE, built as the gateway builds it (settings → connection → adapter), each claiming what
its adapter declares. A ``Site`` is where one backend's data lives for one test: a second
``open()`` is another gateway process on the same data. A claimed capability must pass its
cases; an unclaimed one is shown refused — the KeyValue service over that adapter answers a
request needing it with FAILED_PRECONDITION (tests/test_keyvalue_service.py shows it on an
adapter claiming nothing) — and counts as refused in the matrix, never as a silent skip. Every
test uses namespaces of its own.

A new backend type gets its column here with no edit, unless its server needs an address
(``SETTINGS``).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import pathlib
import uuid
from collections.abc import AsyncIterator, Awaitable
from types import SimpleNamespace
from typing import Any, cast

import grpc
import pytest
from google.protobuf import duration_pb2
from pydantic import ValidationError

from adapters.backends import Connection, Environment
from adapters.capabilities import Capability
from adapters.keyvalue.base import KeyValueAdapter, Record
from adapters.keyvalue.chunked import ChunkedKeyValue, chunk_namespace
from adapters.registry import known, lookup
from app.services.keyvalue import KeyValueService
from app.settings import Limits
from prism.errors import PrismError
from prism.v1 import config_pb2
from prism.v1 import keyvalue_pb2 as kv
from tests.conformance.test_keyvalue import AWKWARD_KEYS
from tests.servers import POSTGRES_DSN, REDIS_URL, purge_namespaces

PATTERN = "KEY_VALUE"


def _serves(name: str) -> bool:
    try:
        return PATTERN in lookup(name).patterns
    except Exception:  # a type that does not load fails its cases with its error, not the module
        return True


BACKENDS = [name for name in known() if _serves(name)]
# The suite's servers (tests/servers.py); every other setting is the type's default.
SETTINGS: dict[str, dict[str, Any]] = {"postgres": {"dsn": POSTGRES_DSN}, "redis": {"url": REDIS_URL}}
MATRIX = ("KeyValue adapter", {name: name for name in BACKENDS})  # tests/conformance/conftest.py
CHUNK = 64  # the decorator's chunk size here: most values below span several chunks
WAIT = 10.0  # seconds; bound on every wait
NAMESPACES: set[str] = set()  # every namespace a test used, deleted from the servers at the end
OPENED: set[str] = set()  # the backends whose server answered


class Site:
    """Where one backend's data lives for one test; every ``open()`` is the type's connection
    and adapter, from its registry declaration, behind the chunked decorator if ``chunked``."""

    def __init__(self, name: str, tmp: pathlib.Path, chunked: bool) -> None:
        self.name, self.kind, self.chunked = name, lookup(name), chunked
        try:
            self.settings = self.kind.settings.model_validate({"type": name, **SETTINGS.get(name, {})})
        except ValidationError as exc:
            pytest.skip(f"{name}: this suite has no settings for it: {exc}")
        self.environment = Environment(name, tmp, stream_buffer=64)
        self.opened: list[tuple[KeyValueAdapter, Connection]] = []

    async def open(self) -> KeyValueAdapter:
        connection = self.kind.connect(self.settings, self.environment)
        try:
            await connection.start()
        except PrismError as exc:
            await connection.close()
            if exc.code != grpc.StatusCode.UNAVAILABLE:
                raise
            pytest.skip(exc.message)  # a failure under PRISM_REQUIRE_BACKENDS=1 (CI)
        OPENED.add(self.name)
        adapter = cast(KeyValueAdapter, self.kind.adapters[PATTERN](connection, self.environment))
        await adapter.start()
        self.opened.append((adapter, connection))
        return ChunkedKeyValue(adapter, CHUNK) if self.chunked else adapter

    async def close_all(self) -> None:
        for adapter, connection in self.opened:
            await adapter.close()
            await connection.close()
        self.opened.clear()


@pytest.fixture(scope="module")
async def purge_afterwards() -> AsyncIterator[None]:
    yield
    await purge_namespaces(sorted(OPENED), sorted(NAMESPACES))


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture(params=["plain", "chunked"])
async def site(
    request: pytest.FixtureRequest, backend: str, tmp_path: pathlib.Path, purge_afterwards: None
) -> AsyncIterator[Site]:
    opened = Site(backend, tmp_path, chunked=request.param == "chunked")
    yield opened
    await opened.close_all()


@pytest.fixture
async def store(site: Site) -> KeyValueAdapter:
    return await site.open()


@pytest.fixture
async def chunked(backend: str, tmp_path: pathlib.Path, purge_afterwards: None) -> AsyncIterator[ChunkedKeyValue]:
    """The decorator over the backend's adapter (``.inner``), for the cases about chunks."""
    opened = Site(backend, tmp_path, chunked=True)
    yield cast(ChunkedKeyValue, await opened.open())
    await opened.close_all()


def namespace() -> str:
    made = f"kva-{uuid.uuid4().hex[:10]}"
    NAMESPACES.add(made)
    return made


@pytest.fixture
def ns() -> str:
    return namespace()


async def refused(call: Awaitable[Any]) -> PrismError:
    with pytest.raises(PrismError) as caught:
        await call
    return caught.value


def service_over(adapter: KeyValueAdapter, backend: str) -> tuple[KeyValueService, Any]:
    """The KeyValue service on ``adapter`` alone, and a call of a session on it."""
    backends: Any = SimpleNamespace(for_keyvalue=lambda config: adapter)
    config = config_pb2.ClientConfig(namespace=namespace(), backend=config_pb2.BackendConfig(instance=backend))
    call = SimpleNamespace(config=config, method=SimpleNamespace(name="Set"))
    return KeyValueService(backends, Limits(), b"k" * 32), call


# A request needing each capability the cases below exercise, and the field the refusal names.
NEEDING: dict[Capability, tuple[str, Any, str]] = {
    Capability.TTL: ("Set", kv.SetRequest(key="k", value=b"v", ttl=duration_pb2.Duration(seconds=1)), "ttl"),
    Capability.ETAG: ("Set", kv.SetRequest(key="k", value=b"v", if_match="e"), "ifMatch"),
    Capability.CREATE_ONLY: ("Set", kv.SetRequest(key="k", value=b"v", if_absent=True), "ifAbsent"),
    Capability.SCAN: ("Scan", kv.ScanRequest(prefix="k"), "prefix"),
}


async def claims(adapter: KeyValueAdapter, capability: Capability, request: pytest.FixtureRequest) -> bool:
    """Whether to run a capability's case. An unclaimed one is shown refused by the service
    (app/services/capabilities.py) and reported as refused."""
    if capability in adapter.capabilities:
        return True
    rpc, message, field = NEEDING[capability]
    service, call = service_over(adapter, "under-test")
    error = await refused(getattr(service, rpc)(message, call))
    assert (error.code, error.field) == (grpc.StatusCode.FAILED_PRECONDITION, field)
    assert error.message == f"{field}: backend 'under-test' lacks {capability.value}"
    request.node.user_properties.append(("verdict", "refused"))
    return False


def keys(found: list[tuple[str, Record]]) -> list[str]:
    return [key for key, _ in found]


# --- Round trip ----------------------------------------------------------------------------

MARKER, ESCAPE = b"\x00\xffprism-chunked1\x00", b"\x00\xffprism-literal1\x00"  # chunked.py's tags


@pytest.mark.case("round trip")
@pytest.mark.parametrize(
    "value",
    [b"", bytes(range(256)), bytes(range(255, -1, -1)), b"\x00", "ключ 🙂".encode(), b"x" * 1000, MARKER, ESCAPE + MARKER],
    ids=["empty", "all-256-bytes", "all-256-reversed", "nul", "utf8", "1000-bytes", "marker", "escape-marker"],
)
async def test_value_round_trips_byte_exact(store: KeyValueAdapter, ns: str, value: bytes) -> None:
    etag = await store.set(ns, "v", value)
    assert await store.get(ns, "v") == Record(value, etag, None)
    assert await store.get_many(ns, ["v"]) == [Record(value, etag, None)]
    assert await store.exists(ns, "v"), "an empty value is still a stored key"


@pytest.mark.case("round trip")
async def test_unicode_and_awkward_keys_stay_distinct(store: KeyValueAdapter, ns: str) -> None:
    for i, key in enumerate(AWKWARD_KEYS):
        await store.set(ns, key, f"value-{i}".encode())
    expected = [f"value-{i}".encode() for i in range(len(AWKWARD_KEYS))]
    assert [r.value if r else None for r in await store.get_many(ns, AWKWARD_KEYS)] == expected
    wildcards = {"%", "_", "*", "?", "[", "[a-z]"}
    for key in wildcards:
        assert await store.delete(ns, key) is True, "deleting a wildcard-looking key removes that key only"
    left = [(await store.get(ns, key)) is not None for key in AWKWARD_KEYS]
    assert left == [key not in wildcards for key in AWKWARD_KEYS]


@pytest.mark.case("round trip")
async def test_a_missing_key_is_absent_everywhere(store: KeyValueAdapter, ns: str) -> None:
    assert await store.get(ns, "never") is None
    assert not await store.exists(ns, "never")
    assert await store.get_many(ns, ["never"]) == [None]
    assert await store.remove(ns, "never", previous_prefix=b"") == (False, None)
    assert await store.delete(ns, "never") is False


@pytest.mark.case("round trip")
async def test_delete_is_idempotent(store: KeyValueAdapter, ns: str) -> None:
    await store.set(ns, "d", b"x" * 100)
    assert await store.delete(ns, "d") is True
    assert await store.delete(ns, "d") is False
    assert (await store.get(ns, "d"), await store.exists(ns, "d")) == (None, False)


@pytest.mark.case("round trip")
async def test_a_write_reports_the_replaced_value_it_asks_for(store: KeyValueAdapter, ns: str) -> None:
    """``previous_prefix``: the replaced value when it starts with that prefix."""
    large = b"world" * 20
    assert (await store.replace(ns, "p", b"hello", previous_prefix=b""))[1] is None, "nothing replaced"
    assert (await store.replace(ns, "p", large, previous_prefix=b"he"))[1] == b"hello"
    assert (await store.replace(ns, "p", b"again", previous_prefix=b"he"))[1] is None
    assert (await store.replace(ns, "p", large))[1] is None, "not asked"
    assert (await store.replace(ns, "p", b"x", previous_prefix=b"wor"))[1] == large
    assert await store.remove(ns, "p", previous_prefix=b"") == (True, b"x")


# --- Batches --------------------------------------------------------------------------------


@pytest.mark.case("batches")
async def test_a_batch_read_reports_each_key_in_order(store: KeyValueAdapter, ns: str) -> None:
    a, c = await store.set(ns, "a", b"1"), await store.set(ns, "c", b"3" * 100)
    one, three = Record(b"1", a, None), Record(b"3" * 100, c, None)
    assert await store.get_many(ns, ["a", "b", "c", "a"]) == [one, None, three, one]
    assert await store.get_many(ns, []) == []


# --- ETag and create-only -------------------------------------------------------------------


@pytest.mark.case("etag")
async def test_every_read_returns_the_etag_of_the_last_write(
    store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest
) -> None:
    if not await claims(store, Capability.ETAG, request):
        return
    first = await store.set(ns, "e", b"1")
    second = await store.set(ns, "e", b"2" * 100)
    assert first != second
    assert (await store.get(ns, "e")).etag == second  # type: ignore[union-attr]
    assert [r.etag for r in await store.get_many(ns, ["e"]) if r] == [second]
    assert await store.scan_keys(ns, "e", "", 10) == [("e", second)]


@pytest.mark.case("etag")
async def test_a_stale_etag_is_refused_and_changes_nothing(
    store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest
) -> None:
    if not await claims(store, Capability.ETAG, request):
        return
    stale = await store.set(ns, "s", b"old")
    current = await store.set(ns, "s", b"new" * 50, if_match=stale)
    for value in (b"lost", b"lost" * 50):
        assert (await refused(store.set(ns, "s", value, if_match=stale))).code == grpc.StatusCode.ABORTED
    assert (await refused(store.remove(ns, "s", if_match=stale))).code == grpc.StatusCode.ABORTED
    assert (await refused(store.set(ns, "missing", b"x", if_match=current))).code == grpc.StatusCode.ABORTED
    assert await store.get(ns, "s") == Record(b"new" * 50, current, None)
    assert await store.get(ns, "missing") is None
    assert await store.delete(ns, "s", if_match=current) is True
    await store.set(ns, "s", b"re-created")
    error = await refused(store.set(ns, "s", b"x", if_match=current))
    assert error.code == grpc.StatusCode.ABORTED, "a deleted key's ETag is stale for its next life"


@pytest.mark.case("create-only")
async def test_create_only_writes_once(store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest) -> None:
    if not await claims(store, Capability.CREATE_ONLY, request):
        return
    etag = await store.set(ns, "c", b"first", if_absent=True)
    for value in (b"second", b"second" * 50):
        assert (await refused(store.set(ns, "c", value, if_absent=True))).code == grpc.StatusCode.ALREADY_EXISTS
    assert await store.get(ns, "c") == Record(b"first", etag, None)
    await store.delete(ns, "c")
    etag = await store.set(ns, "c", b"again" * 50, if_absent=True)
    assert await store.get(ns, "c") == Record(b"again" * 50, etag, None)


# --- TTL ------------------------------------------------------------------------------------


@pytest.mark.case("ttl")
async def test_ttl_expires_on_time_and_a_write_without_one_clears_it(
    store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest
) -> None:
    if not await claims(store, Capability.TTL, request):
        return
    value, at = b"t" * 100, store.clock() + 0.6
    etag = await store.set(ns, "gone", value, expires_at=at)
    await store.set(ns, "kept", value, expires_at=at)
    await store.set(ns, "kept", value)
    record = await store.get(ns, "gone")
    assert record is not None and (record.value, record.etag) == (value, etag)
    assert record.expires_at == pytest.approx(at, abs=0.01), "the remaining TTL is readable"
    assert (await store.get(ns, "kept")).expires_at is None  # type: ignore[union-attr]
    await asyncio.sleep(at - store.clock() + 0.2)
    assert (await store.get(ns, "gone"), await store.exists(ns, "gone")) == (None, False)
    assert await store.get_many(ns, ["gone", "kept"]) == [None, await store.get(ns, "kept")]
    if Capability.SCAN in store.capabilities:
        assert keys(await store.scan(ns, "", "", 10)) == ["kept"]
    if Capability.CREATE_ONLY in store.capabilities:
        await store.set(ns, "gone", b"new life", if_absent=True)


# --- Scan -----------------------------------------------------------------------------------


@pytest.mark.case("scan")
async def test_scan_pages_through_a_prefix_in_key_order(
    store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest
) -> None:
    if not await claims(store, Capability.SCAN, request):
        return
    inside = [f"p/{i:02}" for i in range(20)] + ["p/ключ", "p/日本", "p/é", "p/\x7f", "p/%", "p/_", "p/%x", "p/"]
    etags = {key: await store.set(ns, key, key.encode() * 10) for key in [*inside, "p", "o/1", "q/1"]}
    found: list[tuple[str, Record]] = []
    after = ""
    for _ in range(100):
        page = await store.scan(ns, "p/", after, 7)
        assert len(page) <= 7
        found += page
        if len(page) < 7:
            break
        after = page[-1][0]
    expected = sorted(inside, key=str.encode)
    assert keys(found) == expected
    assert all(record == Record(key.encode() * 10, etags[key], None) for key, record in found)
    assert await store.scan_keys(ns, "p/", "", 100) == [(key, etags[key]) for key in expected]
    assert keys(await store.scan(ns, "p/%", "", 10)) == ["p/%", "p/%x"], "a prefix is literal, not LIKE"
    assert keys(await store.scan(ns, "p/_", "", 10)) == ["p/_"]
    assert keys(await store.scan(ns, "", "", 100)) == sorted(etags, key=str.encode)
    assert await store.scan(ns, "p/", expected[-1], 10) == [], "after the last key"


# --- Namespaces -----------------------------------------------------------------------------


@pytest.mark.case("namespaces")
async def test_namespaces_are_isolated(store: KeyValueAdapter, ns: str) -> None:
    other = ns + "-other"  # a namespace whose name extends another's
    NAMESPACES.add(other)
    here = await store.set(ns, "k", b"here")
    await store.set(other, "k", b"there" * 30)
    if Capability.ETAG in store.capabilities:
        assert (await refused(store.set(other, "k", b"x", if_match=here))).code == grpc.StatusCode.ABORTED
    assert [r.value if r else None for r in await store.get_many(other, ["k"])] == [b"there" * 30]
    assert await store.delete(other, "k") is True
    assert await store.get(ns, "k") == Record(b"here", here, None)
    if Capability.SCAN in store.capabilities:
        assert keys(await store.scan(ns, "", "", 10)) == ["k"]
        assert await store.scan(other, "", "", 10) == []


# --- Concurrency, sharing and restarts -----------------------------------------------------


@pytest.mark.case("concurrency")
async def test_50_concurrent_compare_and_set_increments_end_at_50(
    site: Site, store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest
) -> None:
    """Split between two processes when the backend is shared."""
    if not await claims(store, Capability.ETAG, request):
        return
    stores = [store, await site.open()] if Capability.SHARED in store.capabilities else [store]
    await store.set(ns, "counter", b"0")

    async def increment(on: KeyValueAdapter) -> None:
        while True:
            current = await on.get(ns, "counter")
            assert current is not None
            try:
                await on.set(ns, "counter", str(int(current.value) + 1).encode(), if_match=current.etag)
                return
            except PrismError as exc:
                assert exc.code == grpc.StatusCode.ABORTED, exc

    await asyncio.wait_for(asyncio.gather(*(increment(stores[i % len(stores)]) for i in range(50))), WAIT * 3)
    assert (await store.get(ns, "counter")).value == b"50"  # type: ignore[union-attr]


@pytest.mark.case("shared")
async def test_shared_claim_matches_a_second_process(
    site: Site, store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest
) -> None:
    """Claimed: another process sees the write. Not claimed: it has a store of its own."""
    there = await site.open()
    etag = await store.set(ns, "s", b"from the first" * 10)
    claimed = Capability.SHARED in store.capabilities
    assert (await there.get(ns, "s") == Record(b"from the first" * 10, etag, None)) == claimed
    if not claimed:
        request.node.user_properties.append(("verdict", "refused"))


@pytest.mark.case("durable")
async def test_durable_claim_matches_a_restart(
    site: Site, store: KeyValueAdapter, ns: str, request: pytest.FixtureRequest
) -> None:
    """Claimed: a write survives closing every adapter and connection. Neither durable nor
    shared: it lived in the process and is gone. Shared only: the server, which did not
    restart, still has it (tests/faults restarts servers)."""
    etag = await store.set(ns, "d", b"before" * 20)
    await site.close_all()
    survived = await (await site.open()).get(ns, "d") == Record(b"before" * 20, etag, None)
    if Capability.DURABLE in store.capabilities:
        assert survived
        return
    request.node.user_properties.append(("verdict", "refused"))
    if Capability.SHARED not in store.capabilities:
        assert not survived


# --- Chunks (the decorator over each backend) ----------------------------------------------


async def stored_chunks(chunked: ChunkedKeyValue, ns: str, *names: str) -> list[str]:
    """The chunks kept for ``names``: their keys are the key, NUL, version, NUL, index."""
    found: list[str] = []
    for name in names:
        found += keys(await chunked.inner.scan(chunk_namespace(ns), name + "\x00", "", 10_000))
    return found


@pytest.mark.case("chunks")
@pytest.mark.parametrize("size", [CHUNK - 1, CHUNK, CHUNK + 1, 3 * CHUNK, 3 * CHUNK + 7, 300 * CHUNK + 5])
async def test_sizes_around_chunk_boundaries_round_trip(chunked: ChunkedKeyValue, ns: str, size: int) -> None:
    value = bytes(i % 251 for i in range(size))  # differs chunk to chunk: a misplaced chunk shows
    etag = await chunked.set(ns, "b", value)
    assert await chunked.get(ns, "b") == Record(value, etag, None)
    assert await chunked.scan(ns, "", "", 10) == [("b", Record(value, etag, None))]
    assert len(await stored_chunks(chunked, ns, "b")) == (-(-size // CHUNK) if size > CHUNK else 0)


@pytest.mark.case("chunks")
async def test_overwrites_and_deletes_leave_only_the_live_values_chunks(chunked: ChunkedKeyValue, ns: str) -> None:
    await chunked.set(ns, "o", b"1" * 5 * CHUNK)
    assert len(await stored_chunks(chunked, ns, "o")) == 5
    await chunked.set(ns, "o", b"2" * 3 * CHUNK)  # chunked over chunked
    assert len(await stored_chunks(chunked, ns, "o")) == 3
    await chunked.set(ns, "o", b"small")  # small over chunked
    assert await stored_chunks(chunked, ns, "o") == []
    await chunked.set(ns, "o", b"3" * 2 * CHUNK)  # chunked over small
    etag = await chunked.set(ns, "d", b"4" * 4 * CHUNK)
    assert await chunked.delete(ns, "d", if_match=etag) is True
    assert (len(await stored_chunks(chunked, ns, "o")), await stored_chunks(chunked, ns, "d")) == (2, [])
    assert await chunked.remove(ns, "o", previous_prefix=b"3") == (True, b"3" * 2 * CHUNK)
    assert await stored_chunks(chunked, ns, "o") == []


@pytest.mark.case("chunks")
async def test_refused_writes_leave_the_stored_chunks_alone(chunked: ChunkedKeyValue, ns: str) -> None:
    etag = await chunked.set(ns, "r", b"5" * 3 * CHUNK)
    before = await stored_chunks(chunked, ns, "r")
    for conditions in ({"if_match": "not-the-etag"}, {"if_absent": True}):
        for value in (b"6" * 4 * CHUNK, b"small"):
            await refused(chunked.set(ns, "r", value, **conditions))  # type: ignore[arg-type]
            assert await stored_chunks(chunked, ns, "r") == before
    await refused(chunked.remove(ns, "r", if_match="not-the-etag"))
    assert await stored_chunks(chunked, ns, "r") == before
    assert await chunked.get(ns, "r") == Record(b"5" * 3 * CHUNK, etag, None)


@pytest.mark.case("chunks")
async def test_the_stored_format_is_unchanged(chunked: ChunkedKeyValue, ns: str) -> None:
    """Data written by earlier gateways reads back, and what is written now is that format.
    Spelled out here, not imported, so that a change to it fails this test."""
    inner, value = chunked.inner, bytes(range(256)) * 2
    fields = {"chunks": 3, "sha256": hashlib.sha256(value).hexdigest(), "size": 512, "version": "v1"}
    await inner.set(ns, "old", b"\x00\xffprism-chunked1\x00" + json.dumps(fields, sort_keys=True).encode())
    for i, piece in enumerate([value[:200], value[200:400], value[400:]]):  # another chunk size
        await inner.set(f"\x00chunks\x00{ns}", f"old\x00v1\x00{i}", piece)
    await inner.set(ns, "escaped", b"\x00\xffprism-literal1\x00\x00\xffprism-chunked1\x00tail")
    await inner.set(ns, "untagged", b"written before chunking")
    got = await chunked.get_many(ns, ["old", "escaped", "untagged"])
    assert [r.value if r else None for r in got] == [value, MARKER + b"tail", b"written before chunking"]

    await chunked.set(ns, "new", value)
    stored = (await inner.get(ns, "new")).value  # type: ignore[union-attr]
    assert stored.startswith(b"\x00\xffprism-chunked1\x00")
    manifest = json.loads(stored[len(MARKER) :])
    assert stored[len(MARKER) :] == json.dumps(manifest, sort_keys=True).encode()
    assert (manifest["size"], manifest["chunks"], manifest["sha256"]) == (512, 8, fields["sha256"])
    names = [f"new\x00{manifest['version']}\x00{i}" for i in range(8)]
    assert b"".join(r.value for r in await inner.get_many(f"\x00chunks\x00{ns}", names) if r) == value
    await chunked.set(ns, "marker", MARKER)
    assert (await inner.get(ns, "marker")).value == ESCAPE + MARKER  # type: ignore[union-attr]


@pytest.mark.case("chunks")
async def test_missing_or_corrupt_chunks_are_data_loss_never_a_partial_value(
    chunked: ChunkedKeyValue, ns: str
) -> None:
    etag = await chunked.set(ns, "l", b"7" * 4 * CHUNK)
    await chunked.inner.delete(chunk_namespace(ns), (await stored_chunks(chunked, ns, "l"))[1])
    for read in (chunked.get(ns, "l"), chunked.get_many(ns, ["l"]), chunked.scan(ns, "", "", 10)):
        assert (await refused(read)).code == grpc.StatusCode.DATA_LOSS
    assert await chunked.scan_keys(ns, "", "", 10) == [("l", etag)], "listing keys reads no chunk"
    assert await chunked.exists(ns, "l")
    await chunked.inner.set(ns, "m", MARKER + b"{not json")
    assert (await refused(chunked.get(ns, "m"))).code == grpc.StatusCode.DATA_LOSS
