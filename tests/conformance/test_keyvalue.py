"""KeyValue conformance: every backend behind a KEY_VALUE config passes every case, through
the public gRPC API of a real `prism serve` process.

One test per case, split by capability (round trip, batches, ETag, create-only, TTL, scan,
namespaces, idempotency, limits, concurrency), each run against every config in ``CONFIGS``.
Each test writes under its own random key prefix, so tests never see each other's keys.
``test_claimed_capabilities_are_the_ones_exercised`` ties the suite to what each backend
declares: a backend claiming a capability must pass its cases (Dapr's "claimed → must pass").
"""

from __future__ import annotations

import asyncio
import base64
import pathlib
import uuid
from collections.abc import Iterator

import pytest
from google.protobuf import duration_pb2
from google.protobuf.message import Message

from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import plugin_pb2, session_pb2
from tests.clients import CallError, GrpcClient
from tests.gateway_process import GatewayProcess, start_gateway

# KEY_VALUE configs of the default server configuration, one per backend.
CONFIGS = ["kv", "kv-memory"]  # sqlite, memory

KV = "/prism.v1.KeyValueService/"
WAIT = 10  # seconds; bound on every wait

# Keys that trip SQL LIKE (%, _), globs (*, ?, [), quoting ('), escapes and control characters.
AWKWARD_KEYS = [
    "plain",
    "unicode-ключ/🙂",
    "日本語",
    "é-precomposed",
    "e\u0301-decomposed",
    "%",
    "_",
    "*",
    "?",
    "[",
    "[a-z]",
    "'",
    "' OR '1'='1",
    '"',
    "\\",
    "\x00",
    "nul\x00inside",
    "\x01",
    "\x7f",
    "line\nbreak",
    "tab\there",
    "space here",
    "/",
    "a/../b",
    "\uffff",
]

# Capabilities whose cases this suite runs unconditionally: every backend must claim them.
REQUIRED_CAPABILITIES = {"ttl", "etag", "create_only", "scan"}
# Capabilities whose cases run for every backend and check that behaviour matches the claim.
DECLARED_CAPABILITIES = {"durable", "shared"}


class Store:
    """One session on one KEY_VALUE config, with a key prefix private to the test."""

    def __init__(self, client: GrpcClient, token: str, config: str, backend: str) -> None:
        self.client, self.token, self.config, self.backend = client, token, config, backend
        self.prefix = f"conf-{uuid.uuid4().hex[:10]}/"

    def k(self, name: str) -> str:
        return self.prefix + name

    async def call(self, rpc: str, request: Message) -> Message:
        return await self.client.call(KV + rpc, request, self.token)

    async def refused(self, rpc: str, request: Message) -> CallError:
        with pytest.raises(CallError) as caught:
            await self.call(rpc, request)
        return caught.value

    async def get(self, key: str) -> kv.GetResponse:
        return await self.call("Get", kv.GetRequest(key=key))  # type: ignore[return-value]

    async def set(self, key: str, value: bytes, **options) -> str:  # type: ignore[no-untyped-def]
        response = await self.call("Set", kv.SetRequest(key=key, value=value, **options))
        return response.etag  # type: ignore[attr-defined]

    async def delete(self, key: str, **options) -> bool:  # type: ignore[no-untyped-def]
        response = await self.call("Delete", kv.DeleteRequest(key=key, **options))
        return response.existed  # type: ignore[attr-defined]

    async def exists(self, key: str) -> bool:
        return (await self.call("Exists", kv.ExistsRequest(key=key))).exists  # type: ignore[attr-defined]

    async def value(self, key: str) -> bytes | None:
        """The stored value, or None when the key is missing."""
        try:
            return (await self.get(key)).value
        except CallError as exc:
            assert exc.code == "NOT_FOUND", exc
            return None

    async def scan_all(
        self, prefix: str, page_size: int = 0, keys_only: bool = False
    ) -> list[kv.ScanItem]:
        items: list[kv.ScanItem] = []
        token = ""
        for _ in range(1000):
            page = await self.call(
                "Scan",
                kv.ScanRequest(
                    prefix=prefix, page_size=page_size, page_token=token, keys_only=keys_only
                ),
            )
            assert page_size == 0 or len(page.items) <= page_size  # type: ignore[attr-defined]
            items.extend(page.items)  # type: ignore[attr-defined]
            token = page.next_page_token  # type: ignore[attr-defined]
            if not token:
                return items
        raise AssertionError("scan never reached its last page")


async def open_store(client: GrpcClient, config: str) -> Store:
    response = await client.call(
        "/prism.v1.SessionService/CreateSession",
        session_pb2.CreateSessionRequest(config_name=config),
    )
    return Store(client, response.token, config, response.session.config.backend.instance)  # type: ignore[attr-defined]


def seconds(value: float) -> duration_pb2.Duration:
    ttl = duration_pb2.Duration()
    ttl.FromNanoseconds(int(value * 1e9))
    return ttl


def utf8_order(keys: list[str]) -> list[str]:
    return sorted(keys, key=lambda k: k.encode())


@pytest.fixture(params=CONFIGS)
async def store(
    request: pytest.FixtureRequest, hypercorn_gateway: GatewayProcess, client_factory
) -> Store:
    return await open_store(client_factory("grpc", hypercorn_gateway), request.param)


# --- Round trip ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value",
    [
        b"",
        bytes(range(256)),
        bytes(range(255, -1, -1)),
        b"\x00",
        b"\x00" * 64,
        "ключ 🙂".encode(),
        b"x" * (1 << 20),
    ],
    ids=["empty", "all-256-bytes", "all-256-reversed", "nul", "nuls", "utf8", "1MiB"],
)
async def test_value_round_trips_byte_exact(store: Store, value: bytes) -> None:
    etag = await store.set(store.k("v"), value)
    got = await store.get(store.k("v"))
    assert (got.key, got.value, got.etag) == (store.k("v"), value, etag)
    assert await store.exists(store.k("v")), "an empty value is still a stored key"
    (batch,) = (await store.call("BatchGet", kv.BatchGetRequest(keys=[store.k("v")]))).results
    assert (batch.found, batch.value) == (True, value)
    (item,) = (await store.call("Scan", kv.ScanRequest(prefix=store.prefix))).items
    assert item.value == value


async def test_awkward_keys_round_trip_and_stay_distinct(store: Store) -> None:
    keys = [store.k(name) for name in AWKWARD_KEYS]
    for i, key in enumerate(keys):
        await store.set(key, f"value-{i}".encode())
    for i, key in enumerate(keys):
        got = await store.get(key)
        assert (got.key, got.value) == (key, f"value-{i}".encode()), repr(key)
        assert await store.exists(key), repr(key)
    batch = await store.call("BatchGet", kv.BatchGetRequest(keys=keys))
    assert [(r.key, r.found, r.value) for r in batch.results] == [
        (key, True, f"value-{i}".encode()) for i, key in enumerate(keys)
    ]
    assert [i.key for i in await store.scan_all(store.prefix)] == utf8_order(keys)
    # Deleting a wildcard-looking key removes that key only.
    for name in ["%", "_", "*", "?", "[", "[a-z]"]:
        assert await store.delete(store.k(name)) is True
    remaining = [
        k for k in keys if k.removeprefix(store.prefix) not in {"%", "_", "*", "?", "[", "[a-z]"}
    ]
    assert [i.key for i in await store.scan_all(store.prefix)] == utf8_order(remaining)


async def test_missing_key_answers_the_same_on_every_backend(
    hypercorn_gateway: GatewayProcess, client_factory
) -> None:
    client = client_factory("grpc", hypercorn_gateway)
    key = f"conf-missing-{uuid.uuid4().hex}/never-written"
    answers = {}
    for config in CONFIGS:
        store = await open_store(client, config)
        error = await store.refused("Get", kv.GetRequest(key=key))
        batch = await store.call("BatchGet", kv.BatchGetRequest(keys=[key]))
        scan = await store.call("Scan", kv.ScanRequest(prefix=key))
        answers[config] = (
            error.code,
            error.message,
            await store.exists(key),
            await store.delete(key),
            [(r.key, r.found, r.value, r.etag, r.HasField("ttl_remaining")) for r in batch.results],
            (list(scan.items), scan.next_page_token),
        )
    expected = (
        "NOT_FOUND",
        f"key {key!r} not found",
        False,
        False,
        [(key, False, b"", "", False)],
        ([], ""),
    )
    assert answers == {config: expected for config in CONFIGS}


async def test_delete_is_idempotent(store: Store) -> None:
    await store.set(store.k("d"), b"x")
    assert await store.delete(store.k("d")) is True
    assert await store.delete(store.k("d")) is False
    assert await store.value(store.k("d")) is None
    assert not await store.exists(store.k("d"))


async def test_exists_follows_set_and_delete(store: Store) -> None:
    assert not await store.exists(store.k("e"))
    await store.set(store.k("e"), b"")
    assert await store.exists(store.k("e"))
    assert not await store.exists(store.k("e/child")), "exists is exact, not by prefix"
    await store.delete(store.k("e"))
    assert not await store.exists(store.k("e"))


@pytest.mark.parametrize("key", ["", "k" * 1025], ids=["empty", "over-1KiB"])
async def test_invalid_key_is_refused_naming_key(store: Store, key: str) -> None:
    for rpc, request in [
        ("Get", kv.GetRequest(key=key)),
        ("Set", kv.SetRequest(key=key, value=b"x")),
        ("Delete", kv.DeleteRequest(key=key)),
        ("Exists", kv.ExistsRequest(key=key)),
    ]:
        error = await store.refused(rpc, request)
        assert (error.code, error.message.split(":")[0]) == ("INVALID_ARGUMENT", "key"), rpc


# --- Batches --------------------------------------------------------------------------------


async def test_batch_get_reports_each_key_in_request_order(store: Store) -> None:
    etag_a = await store.set(store.k("a"), b"A")
    etag_b = await store.set(store.k("b"), b"B")
    keys = [store.k("b"), store.k("missing"), store.k("a"), store.k("b")]
    response = await store.call("BatchGet", kv.BatchGetRequest(keys=keys))
    assert [(r.key, r.found, r.value, r.etag) for r in response.results] == [
        (store.k("b"), True, b"B", etag_b),
        (store.k("missing"), False, b"", ""),
        (store.k("a"), True, b"A", etag_a),
        (store.k("b"), True, b"B", etag_b),
    ]


async def test_batch_set_applies_good_entries_and_reports_bad_ones(store: Store) -> None:
    await store.set(store.k("taken"), b"original")
    entries = [
        kv.SetRequest(key=store.k("one"), value=b"1"),
        kv.SetRequest(key=store.k("x" * 1024), value=b"key too long"),
        kv.SetRequest(key=store.k("two"), value=b"2"),
        kv.SetRequest(key=store.k("bad-ttl"), value=b"x", ttl=seconds(-1)),
        kv.SetRequest(key=store.k("taken"), value=b"stale", if_match="not-the-etag"),
        kv.SetRequest(key=store.k("taken"), value=b"create", if_absent=True),
        kv.SetRequest(key=store.k("three"), value=b"3", ttl=seconds(60)),
    ]
    response = await store.call("BatchSet", kv.BatchSetRequest(entries=entries))
    results = list(response.results)
    assert [(r.key, r.status.code) for r in results] == [
        (store.k("one"), 0),
        (store.k("x" * 1024), 3),  # INVALID_ARGUMENT
        (store.k("two"), 0),
        (store.k("bad-ttl"), 3),  # INVALID_ARGUMENT
        (store.k("taken"), 10),  # ABORTED
        (store.k("taken"), 6),  # ALREADY_EXISTS
        (store.k("three"), 0),
    ]
    assert results[1].status.message.startswith("entries[1].key:")
    assert results[3].status.message.startswith("entries[3].ttl:")
    assert all(r.etag for r in results if r.status.code == 0)
    assert not any(r.etag for r in results if r.status.code != 0)
    for name, value in [
        ("one", b"1"),
        ("two", b"2"),
        ("three", b"3"),
        ("taken", b"original"),
        ("bad-ttl", None),
    ]:
        assert await store.value(store.k(name)) == value, name
    for result, name in [(results[0], "one"), (results[2], "two"), (results[6], "three")]:
        assert (await store.get(store.k(name))).etag == result.etag
    assert 0 < (await store.get(store.k("three"))).ttl_remaining.seconds <= 60


async def test_batch_set_with_a_malformed_entry_is_refused_whole(store: Store) -> None:
    """An entry missing a REQUIRED field makes the request itself invalid: nothing applies."""
    entries = [kv.SetRequest(key=store.k("one"), value=b"1"), kv.SetRequest(value=b"no key")]
    error = await store.refused("BatchSet", kv.BatchSetRequest(entries=entries))
    assert (error.code, error.message) == ("INVALID_ARGUMENT", "entries[1].key: is required")
    assert not await store.exists(store.k("one"))


async def test_batch_delete_reports_each_key(store: Store) -> None:
    await store.set(store.k("x"), b"x")
    await store.set(store.k("y"), b"y")
    keys = [store.k("x"), store.k("missing"), "", store.k("y"), store.k("x")]
    response = await store.call("BatchDelete", kv.BatchDeleteRequest(keys=keys))
    assert [(r.key, r.status.code, r.existed) for r in response.results] == [
        (store.k("x"), 0, True),
        (store.k("missing"), 0, False),
        ("", 3, False),
        (store.k("y"), 0, True),
        (store.k("x"), 0, False),
    ]
    assert response.results[2].status.message.startswith("keys[2]:")
    assert await store.scan_all(store.prefix) == []


# --- ETag (capability "etag") ---------------------------------------------------------------


async def test_every_read_returns_the_current_etag(store: Store) -> None:
    first = await store.set(store.k("t"), b"1")
    assert first
    assert (await store.get(store.k("t"))).etag == first
    (batch,) = (await store.call("BatchGet", kv.BatchGetRequest(keys=[store.k("t")]))).results
    assert batch.etag == first
    for keys_only in (False, True):
        (item,) = (
            await store.call("Scan", kv.ScanRequest(prefix=store.prefix, keys_only=keys_only))
        ).items
        assert item.etag == first
    second = await store.set(store.k("t"), b"1")
    assert second and second != first, "every write makes a new ETag, even with the same value"
    assert (await store.get(store.k("t"))).etag == second


async def test_compare_and_set_with_current_etag_applies(store: Store) -> None:
    etag = await store.set(store.k("c"), b"1")
    new = await store.set(store.k("c"), b"2", if_match=etag)
    got = await store.get(store.k("c"))
    assert (got.value, got.etag) == (b"2", new)
    assert await store.delete(store.k("c"), if_match=new) is True
    assert await store.value(store.k("c")) is None


async def test_stale_etag_is_refused_and_leaves_value_unchanged(store: Store) -> None:
    stale = await store.set(store.k("s"), b"first")
    current = await store.set(store.k("s"), b"second")
    error = await store.refused(
        "Set", kv.SetRequest(key=store.k("s"), value=b"lost update", if_match=stale)
    )
    assert error.code == "ABORTED"
    error = await store.refused("Delete", kv.DeleteRequest(key=store.k("s"), if_match=stale))
    assert error.code == "ABORTED"
    got = await store.get(store.k("s"))
    assert (got.value, got.etag) == (b"second", current)


async def test_etag_of_a_deleted_and_recreated_key_is_stale(store: Store) -> None:
    old = await store.set(store.k("r"), b"same")
    await store.delete(store.k("r"))
    error = await store.refused("Set", kv.SetRequest(key=store.k("r"), value=b"x", if_match=old))
    assert error.code == "ABORTED", "if_match on a missing key must not create it"
    assert await store.value(store.k("r")) is None
    new = await store.set(store.k("r"), b"same")
    assert new != old
    error = await store.refused("Set", kv.SetRequest(key=store.k("r"), value=b"x", if_match=old))
    assert error.code == "ABORTED"
    assert (await store.get(store.k("r"))).value == b"same"


# --- Create-only (capability "create_only") -------------------------------------------------


async def test_if_absent_creates_once_and_refuses_after(store: Store) -> None:
    etag = await store.set(store.k("once"), b"first", if_absent=True)
    error = await store.refused(
        "Set", kv.SetRequest(key=store.k("once"), value=b"second", if_absent=True)
    )
    assert error.code == "ALREADY_EXISTS"
    got = await store.get(store.k("once"))
    assert (got.value, got.etag) == (b"first", etag)
    await store.delete(store.k("once"))
    assert await store.set(store.k("once"), b"again", if_absent=True)
    assert (await store.get(store.k("once"))).value == b"again"


# --- TTL (capability "ttl") -----------------------------------------------------------------


async def test_ttl_expires_on_time(store: Store) -> None:
    for name in ("gone", "recreate", "cas"):
        await store.set(store.k(name), b"short-lived", ttl=seconds(1))
    old_etag = (await store.get(store.k("cas"))).etag
    await store.set(store.k("stays"), b"forever")
    assert 0 < (await store.get(store.k("gone"))).ttl_remaining.ToNanoseconds() <= 1e9

    await asyncio.sleep(1.5)

    error = await store.refused("Get", kv.GetRequest(key=store.k("gone")))
    assert error.code == "NOT_FOUND"
    assert not await store.exists(store.k("gone"))
    batch = await store.call(
        "BatchGet", kv.BatchGetRequest(keys=[store.k("gone"), store.k("stays")])
    )
    assert [r.found for r in batch.results] == [False, True]
    assert [i.key for i in await store.scan_all(store.prefix)] == [store.k("stays")]
    # An expired key counts as absent for create-only and as missing for compare-and-set.
    assert await store.set(store.k("recreate"), b"new", if_absent=True)
    assert (await store.get(store.k("recreate"))).value == b"new"
    error = await store.refused(
        "Set", kv.SetRequest(key=store.k("cas"), value=b"x", if_match=old_etag)
    )
    assert error.code == "ABORTED"
    assert await store.delete(store.k("gone")) is False


@pytest.mark.parametrize(
    "ttl",
    [duration_pb2.Duration(), duration_pb2.Duration(seconds=-1), duration_pb2.Duration(nanos=-1)],
    ids=["zero", "minus-1s", "minus-1ns"],
)
async def test_invalid_ttl_is_refused_and_leaves_value_unchanged(
    store: Store, ttl: duration_pb2.Duration
) -> None:
    etag = await store.set(store.k("ttl"), b"before")
    request = kv.SetRequest(key=store.k("ttl"), value=b"after")
    request.ttl.CopyFrom(ttl)  # set explicitly, even when zero
    error = await store.refused("Set", request)
    assert error.code == "INVALID_ARGUMENT"
    assert error.message.startswith("ttl:")
    got = await store.get(store.k("ttl"))
    assert (got.value, got.etag, got.HasField("ttl_remaining")) == (b"before", etag, False)
    new = kv.SetRequest(key=store.k("new"), value=b"x")
    new.ttl.CopyFrom(ttl)
    assert (await store.refused("Set", new)).code == "INVALID_ARGUMENT"
    assert not await store.exists(store.k("new"))


async def test_set_without_ttl_clears_ttl(store: Store) -> None:
    await store.set(store.k("t"), b"1", ttl=seconds(60))
    assert (await store.get(store.k("t"))).HasField("ttl_remaining")
    await store.set(store.k("t"), b"2")
    got = await store.get(store.k("t"))
    assert (got.value, got.HasField("ttl_remaining")) == (b"2", False)
    # A compare-and-set without TTL clears it too: the write replaces the whole record.
    etag = await store.set(store.k("t"), b"3", ttl=seconds(60))
    await store.set(store.k("t"), b"4", if_match=etag)
    assert not (await store.get(store.k("t"))).HasField("ttl_remaining")


async def test_remaining_ttl_is_readable_and_decreasing(store: Store) -> None:
    await store.set(store.k("t"), b"x", ttl=seconds(60))
    await store.set(store.k("no-ttl"), b"x")
    first = (await store.get(store.k("t"))).ttl_remaining.ToNanoseconds()
    second = (await store.get(store.k("t"))).ttl_remaining.ToNanoseconds()
    assert 55e9 < second < first <= 60e9
    results = (
        await store.call("BatchGet", kv.BatchGetRequest(keys=[store.k("t"), store.k("no-ttl")]))
    ).results
    assert 0 < results[0].ttl_remaining.ToNanoseconds() < second
    assert not results[1].HasField("ttl_remaining")
    assert not (await store.get(store.k("no-ttl"))).HasField("ttl_remaining")


# --- Scan (capability "scan") ---------------------------------------------------------------


async def test_scan_pages_return_every_key_once_in_order(store: Store) -> None:
    names = [f"k{i:02d}" for i in range(23)] + ["Z", "a", "ключ", "\uffff", "🙂", "k0", "k00/child"]
    for name in names:
        await store.set(store.k(name), name.encode())
    # Neighbours outside the prefix: a shorter key, a sibling, the next prefix up.
    outside = [store.prefix[:-1], store.prefix[:-1] + "0", store.prefix[:-1] + "~x"]
    for key in outside:
        await store.set(key, b"outside")
    try:
        expected = utf8_order([store.k(n) for n in names])
        for page_size in (1, 4, 7, 0, 1000):
            items = await store.scan_all(store.prefix, page_size=page_size)
            assert [i.key for i in items] == expected, page_size
            assert [i.value for i in items] == [
                i.key.removeprefix(store.prefix).encode() for i in items
            ]
        keys_only = await store.scan_all(store.prefix, page_size=5, keys_only=True)
        assert [(i.key, i.value) for i in keys_only] == [(k, b"") for k in expected]
        assert all(i.etag for i in keys_only)
    finally:
        for key in outside:
            await store.delete(key)


async def test_scan_prefix_is_taken_literally(store: Store) -> None:
    names = [
        "%",
        "%x",
        "_",
        "_x",
        "ab",
        "a_b",
        "a%b",
        "aXb",
        "*",
        "*x",
        "?",
        "?x",
        "[",
        "[x",
        "x",
        "\\",
        "\\x",
    ]
    names += ["n\x00", "n\x00x", "n", "nx", "ключ\x00", "ключ"]
    for name in names:
        await store.set(store.k(name), b"v")
    for prefix, matching in [
        ("%", ["%", "%x"]),
        ("_", ["_", "_x"]),
        ("a_", ["a_b"]),
        ("a%", ["a%b"]),
        ("*", ["*", "*x"]),
        ("?", ["?", "?x"]),
        ("[", ["[", "[x"]),
        ("\\", ["\\", "\\x"]),
        ("x", ["x"]),
        ("n\x00", ["n\x00", "n\x00x"]),  # NUL inside the prefix
        ("ключ\x00", ["ключ\x00"]),
    ]:
        found = [i.key for i in await store.scan_all(store.k(prefix))]
        assert found == utf8_order([store.k(n) for n in matching]), prefix


async def test_scan_refuses_a_tampered_or_foreign_page_token(store: Store) -> None:
    for name in ["a1", "a2", "a3", "b1", "b2", "b3"]:
        await store.set(store.k(name), b"v")
    page = await store.call("Scan", kv.ScanRequest(prefix=store.k("a"), page_size=1))
    token = page.next_page_token
    assert token
    for bad, prefix in [
        (token, store.k("b")),  # issued for another prefix
        (token, ""),
        ("not a token", store.k("a")),
        ("%%%", store.k("a")),
        (token[:-3], store.k("a")),  # truncated
        (base64.urlsafe_b64encode(b'{"a": 1}').decode(), store.k("a")),
        (base64.urlsafe_b64encode(b"[1, 2]").decode(), store.k("a")),
    ]:
        error = await store.refused(
            "Scan", kv.ScanRequest(prefix=prefix, page_size=1, page_token=bad)
        )
        assert error.code == "INVALID_ARGUMENT", bad
        assert error.message.startswith("pageToken:"), error.message
    assert (
        await store.refused("Scan", kv.ScanRequest(prefix=store.prefix, page_size=-1))
    ).code == "INVALID_ARGUMENT"


async def test_scan_page_token_is_tamper_evident(store: Store) -> None:
    """Changing any one character of a page token must never silently give a different page."""
    for name in ["a1", "a2", "a3", "a4"]:
        await store.set(store.k(name), b"v")
    page = await store.call("Scan", kv.ScanRequest(prefix=store.k("a"), page_size=1))
    token = page.next_page_token
    honest = await store.call(
        "Scan", kv.ScanRequest(prefix=store.k("a"), page_size=1, page_token=token)
    )
    silently_moved = []
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    for i, char in enumerate(token):
        if char not in alphabet:  # a separator
            continue
        for replacement in (
            alphabet[(alphabet.index(char) + 1) % 64],
            alphabet[(alphabet.index(char) + 32) % 64],
        ):
            tampered = token[:i] + replacement + token[i + 1 :]
            try:
                other = await store.call(
                    "Scan", kv.ScanRequest(prefix=store.k("a"), page_size=1, page_token=tampered)
                )
            except CallError as exc:
                assert exc.code == "INVALID_ARGUMENT"
                continue
            if other != honest:
                silently_moved.append((tampered, [it.key for it in other.items]))
    assert silently_moved == []


# --- Idempotency tokens ---------------------------------------------------------------------


async def test_retried_set_with_same_token_applies_once(store: Store) -> None:
    token = uuid.uuid4().hex
    first = await store.set(store.k("i"), b"v1", idempotency_token=token)
    later = await store.set(store.k("i"), b"v2")  # someone else writes in between
    retried = await store.set(store.k("i"), b"v1", idempotency_token=token)
    assert retried == first, "a retry answers with the first result"
    got = await store.get(store.k("i"))
    assert (got.value, got.etag) == (b"v2", later), "the retry must not overwrite"


async def test_token_reused_with_a_different_request_is_refused(store: Store) -> None:
    token = uuid.uuid4().hex
    etag = await store.set(store.k("i"), b"v1", idempotency_token=token)
    for request in [
        kv.SetRequest(key=store.k("i"), value=b"v2", idempotency_token=token),
        kv.SetRequest(key=store.k("other"), value=b"v1", idempotency_token=token),
    ]:
        error = await store.refused("Set", request)
        assert error.code == "INVALID_ARGUMENT"
        assert error.message.startswith("idempotencyToken:")
    got = await store.get(store.k("i"))
    assert (got.value, got.etag) == (b"v1", etag)
    assert not await store.exists(store.k("other"))


async def test_concurrent_retries_with_one_token_apply_once(store: Store) -> None:
    token = uuid.uuid4().hex
    etags = await asyncio.wait_for(
        asyncio.gather(
            *(store.set(store.k("i"), b"v", idempotency_token=token) for _ in range(10))
        ),
        WAIT,
    )
    assert len(set(etags)) == 1
    assert (await store.get(store.k("i"))).etag == etags[0]


async def test_retried_delete_with_same_token_applies_once(store: Store) -> None:
    token = uuid.uuid4().hex
    await store.set(store.k("d"), b"v1")
    assert await store.delete(store.k("d"), idempotency_token=token) is True
    etag = await store.set(store.k("d"), b"v2")  # re-created after the delete
    assert await store.delete(store.k("d"), idempotency_token=token) is True, (
        "the retry answers the first result"
    )
    got = await store.get(store.k("d"))
    assert (got.value, got.etag) == (b"v2", etag), "the retry must not delete the new value"
    assert (
        await store.delete(store.k("d"), idempotency_token=uuid.uuid4().hex) is True
    )  # a new token applies


async def test_idempotency_token_in_a_batch_entry_is_honoured_or_refused(store: Store) -> None:
    token = uuid.uuid4().hex
    batch = kv.BatchSetRequest(
        entries=[kv.SetRequest(key=store.k("b"), value=b"v1", idempotency_token=token)]
    )
    try:
        (first,) = (await store.call("BatchSet", batch)).results
    except CallError as exc:
        assert exc.code == "INVALID_ARGUMENT"  # refusing the field outright is fine too
        return
    later = await store.set(store.k("b"), b"v2")
    (retried,) = (await store.call("BatchSet", batch)).results
    got = await store.get(store.k("b"))
    assert (retried.etag, got.value, got.etag) == (first.etag, b"v2", later)


# --- Concurrency ----------------------------------------------------------------------------


async def test_concurrent_compare_and_set_increments_are_all_counted(store: Store) -> None:
    key = store.k("counter")
    await store.set(key, b"0")

    async def increment() -> None:
        while True:
            current = await store.get(key)
            try:
                await store.set(key, str(int(current.value) + 1).encode(), if_match=current.etag)
                return
            except CallError as exc:
                assert exc.code == "ABORTED", exc

    await asyncio.wait_for(asyncio.gather(*(increment() for _ in range(50))), WAIT)
    assert (await store.get(key)).value == b"50"


# --- Limits ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_values_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(
        tmp_path_factory.mktemp("kv-small-values"), env={"PRISM_LIMITS__MAX_VALUE_BYTES": "1024"}
    )
    yield process
    process.stop()


@pytest.mark.parametrize("config", CONFIGS)
async def test_value_over_the_maximum_is_refused(
    small_values_gateway: GatewayProcess, client_factory, config: str
) -> None:
    store = await open_store(client_factory("grpc", small_values_gateway), config)
    etag = await store.set(store.k("big"), b"a" * 1024)  # exactly the limit is allowed
    error = await store.refused("Set", kv.SetRequest(key=store.k("big"), value=b"b" * 1025))
    assert error.code == "RESOURCE_EXHAUSTED"
    assert "1025" in error.message and "1024" in error.message
    # Far above it, the transport's own message limit answers the same way.
    error = await store.refused("Set", kv.SetRequest(key=store.k("big"), value=b"b" * 200_000))
    assert error.code == "RESOURCE_EXHAUSTED"
    got = await store.get(store.k("big"))
    assert (got.value, got.etag) == (b"a" * 1024, etag)
    response = await store.call(
        "BatchSet",
        kv.BatchSetRequest(
            entries=[
                kv.SetRequest(key=store.k("big"), value=b"c" * 2000),
                kv.SetRequest(key=store.k("small"), value=b"s"),
            ]
        ),
    )
    assert [r.status.code for r in response.results] == [8, 0]  # RESOURCE_EXHAUSTED, OK
    assert (await store.value(store.k("big")), await store.value(store.k("small"))) == (
        b"a" * 1024,
        b"s",
    )


# --- Namespaces -----------------------------------------------------------------------------

NAMESPACED_CONFIG = """
backends:
  sqlite: {type: sqlite}
  memory: {type: memory}
configs:
  - {name: sqlite-a, pattern: KEY_VALUE, backend: sqlite, namespace: tenant-a}
  - {name: sqlite-b, pattern: KEY_VALUE, backend: sqlite, namespace: tenant-b}
  - {name: memory-a, pattern: KEY_VALUE, backend: memory, namespace: tenant-a}
  - {name: memory-b, pattern: KEY_VALUE, backend: memory, namespace: tenant-b}
"""


@pytest.fixture(scope="module")
def namespaced_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("kv-namespaces")
    process = start_gateway(tmp, config_yaml=NAMESPACED_CONFIG)
    yield process
    process.stop()


@pytest.mark.parametrize("backend", ["sqlite", "memory"])
async def test_namespaces_are_isolated(
    namespaced_gateway: GatewayProcess, client_factory, backend: str
) -> None:
    client = client_factory("grpc", namespaced_gateway)
    a, b = await open_store(client, f"{backend}-a"), await open_store(client, f"{backend}-b")
    assert a.backend == b.backend == backend
    key = a.k("shared-name")
    etag = await a.set(key, b"from a")

    assert (await b.refused("Get", kv.GetRequest(key=key))).code == "NOT_FOUND"
    assert not await b.exists(key)
    assert [
        r.found for r in (await b.call("BatchGet", kv.BatchGetRequest(keys=[key]))).results
    ] == [False]
    assert await b.scan_all(a.prefix) == []
    assert await b.delete(key) is False
    assert (
        await b.refused("Set", kv.SetRequest(key=key, value=b"x", if_match=etag))
    ).code == "ABORTED"
    assert await b.set(key, b"from b", if_absent=True), "create-only in b ignores a's key"

    got = await a.get(key)
    assert (got.value, got.etag) == (b"from a", etag)
    assert (await b.get(key)).value == b"from b"
    await b.delete(key)
    assert (await a.get(key)).value == b"from a"

    # Idempotency tokens are per namespace too: b's write with a's token is a write of its own.
    token = uuid.uuid4().hex
    await a.set(a.k("tok"), b"a", idempotency_token=token)
    await b.set(a.k("tok"), b"b", idempotency_token=token)
    assert ((await a.get(a.k("tok"))).value, (await b.get(a.k("tok"))).value) == (b"a", b"b")


# --- Declared capabilities ------------------------------------------------------------------


async def backend_capabilities(client: GrpcClient, backend: str) -> set[str]:
    info = await client.call("/prism.v1.PluginInfoService/GetInfo", plugin_pb2.InfoRequest())
    (entry,) = [b for b in info.backends if b.name == backend and b.pattern == "KEY_VALUE"]  # type: ignore[attr-defined]
    return set(entry.capabilities)


@pytest.mark.parametrize("config", CONFIGS)
async def test_claimed_capabilities_are_the_ones_exercised(
    hypercorn_gateway: GatewayProcess, client_factory, config: str
) -> None:
    """Claimed → must pass: this suite runs the ttl, etag, create_only and scan cases against
    every config unconditionally, so every backend must claim them; any other claim must be one
    whose behaviour this suite checks (durable, shared)."""
    client = client_factory("grpc", hypercorn_gateway)
    store = await open_store(client, config)
    claimed = await backend_capabilities(client, store.backend)
    assert REQUIRED_CAPABILITIES <= claimed, f"{store.backend} runs cases it does not claim"
    assert claimed <= REQUIRED_CAPABILITIES | DECLARED_CAPABILITIES, (
        f"{store.backend} claims untested capabilities"
    )


async def test_shared_claim_matches_a_second_gateway_on_the_same_data(
    hypercorn_gateway: GatewayProcess, client_factory
) -> None:
    """A backend claiming "shared" shows a second gateway process the same data; one not
    claiming it does not."""
    second = start_gateway(hypercorn_gateway.log_path.parent)  # same --data-dir
    try:
        first_client, second_client = (
            client_factory("grpc", hypercorn_gateway),
            client_factory("grpc", second),
        )
        for config in CONFIGS:
            here = await open_store(first_client, config)
            there = await open_store(second_client, config)
            await here.set(here.k("s"), b"written by the first gateway")
            claimed = "shared" in await backend_capabilities(first_client, here.backend)
            seen = await there.value(here.k("s"))
            assert (seen == b"written by the first gateway") == claimed, (config, claimed, seen)
    finally:
        second.stop()


async def test_durable_claim_matches_a_gateway_restart(
    tmp_path: pathlib.Path, client_factory
) -> None:
    """A backend claiming "durable" keeps its data across a restart; one not claiming it may not
    and, being in-process memory, does not."""
    gateway = start_gateway(tmp_path)
    keys: dict[str, tuple[str, str]] = {}
    try:
        client = client_factory("grpc", gateway)
        for config in CONFIGS:
            store = await open_store(client, config)
            await store.set(store.k("d"), b"before restart")
            keys[config] = (store.k("d"), store.backend)
        claims = {
            config: await backend_capabilities(client, backend)
            for config, (_, backend) in keys.items()
        }
    finally:
        gateway.stop()
    gateway = start_gateway(tmp_path)  # same --data-dir
    try:
        client = client_factory("grpc", gateway)
        for config, (key, _) in keys.items():
            store = await open_store(client, config)
            survived = await store.value(key) == b"before restart"
            assert survived == ("durable" in claims[config]), config
    finally:
        gateway.stop()
