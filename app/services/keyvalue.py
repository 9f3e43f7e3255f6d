"""KeyValueService: validation, TTL, idempotency and batching over any KeyValue adapter.

Values of any size up to ``limits.max_value_bytes``: the service uses each backend's adapter
through the chunked decorator (``adapters/keyvalue/chunked.py``), which stores the large ones.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from adapters.capabilities import Capability
from adapters.keyvalue.base import KeyValueAdapter, Record
from adapters.keyvalue.chunked import ChunkedKeyValue
from adapters.keyvalue.encrypted import EncryptedKeyValue, Keyring
from app.backends import Backends
from app.pipeline import Call
from app.services.capabilities import require
from app.services.cursors import Cursors
from app.services.idempotency import Idempotency
from app.services.read_cache import ReadCache
from app.settings import Limits
from prism.errors import PrismError, invalid_argument, too_large
from prism.v1 import keyvalue_pb2 as kv

MAX_KEY_BYTES = 1024
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
# Request fields that need a capability of the backend. An idempotency token is claimed with a
# create-only write and settled with a conditional one (app/services/idempotency.py).
NEEDS: dict[str, tuple[Capability, ...]] = {
    "ttl": (Capability.TTL,),
    "if_match": (Capability.ETAG,),
    "if_absent": (Capability.CREATE_ONLY,),
    "idempotency_token": (Capability.CREATE_ONLY, Capability.ETAG),
}

R = TypeVar("R", bound=Message)


def check_key(key: str, field: str = "key") -> str:
    if not key:
        raise invalid_argument(field, "must not be empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise invalid_argument(field, f"longer than {MAX_KEY_BYTES} bytes")
    return key


def _capable(store: KeyValueAdapter, call: Call, request: Message, prefix: str = "") -> None:
    """FAILED_PRECONDITION for the first field set in ``request`` that the backend cannot honour."""
    for field, _ in request.ListFields():
        for capability in NEEDS.get(field.name, ()):
            require(store, capability, call, prefix + field.json_name)


def _remaining(record: Record, now: float, into: Message) -> None:
    if record.expires_at is not None:
        into.ttl_remaining.FromNanoseconds(max(0, int((record.expires_at - now) * 1e9)))  # type: ignore[attr-defined]


def _idempotency_namespace(namespace: str) -> str:
    # NUL cannot occur in a namespace name, so this never collides with client data.
    return f"\x00idempotency\x00{namespace}"


class KeyValueService:
    SERVICE = "prism.v1.KeyValueService"

    def __init__(
        self,
        backends: Backends,
        limits: Limits,
        token_key: bytes,
        encryption: tuple[Keyring, frozenset[str]] | None = None,
    ) -> None:
        """``encryption``: the keyring and the (PII) namespaces whose values it encrypts."""
        self.backends = backends
        self.limits = limits
        self.cursors = Cursors(token_key)
        self.cache = ReadCache()
        self.idempotency = Idempotency()
        self.encryption = encryption
        self._decorated: dict[KeyValueAdapter, KeyValueAdapter] = {}  # backend adapter → decorated

    def _store(self, call: Call) -> tuple[KeyValueAdapter, str]:
        adapter = self.backends.for_keyvalue(call.config)
        store = self._decorated.get(adapter)
        if store is None:
            # Encrypted above chunked: a large value is encrypted once, and its chunks (in a
            # namespace of their own) hold only ciphertext.
            store = ChunkedKeyValue(adapter, self.limits.chunk_bytes)
            if self.encryption is not None:
                store = EncryptedKeyValue(store, *self.encryption)
            self._decorated[adapter] = store
        return store, call.config.namespace

    def _expiry(self, store: KeyValueAdapter, request: kv.SetRequest, field: str) -> float | None:
        if not request.HasField("ttl"):
            return None
        seconds = request.ttl.ToNanoseconds() / 1e9
        if seconds <= 0:
            raise invalid_argument(field, "must be positive (leave it unset for no expiry)")
        if seconds > MAX_TTL_SECONDS:
            raise invalid_argument(field, f"above the maximum of {MAX_TTL_SECONDS} seconds")
        return store.clock() + seconds

    async def _once(
        self, call: Call, request: Message, response_type: type[R], apply: Callable[[], Awaitable[R]]
    ) -> R:
        """Apply a write at most once per idempotency token; a retry gets the first response."""
        token: str = request.idempotency_token
        if not token:
            return await apply()
        store, namespace = self._store(call)
        key = f"{call.method.name}:{token}"
        response = await self.idempotency.once(store, _idempotency_namespace(namespace), key, request, response_type, apply)
        return response  # type: ignore[return-value]

    async def Get(self, request: kv.GetRequest, call: Call) -> kv.GetResponse:
        store, namespace = self._store(call)
        key = check_key(request.key)
        record = self.cache.lookup(call.config, key)
        if record is None:
            record = await store.get(namespace, key)
            if record is not None:
                self.cache.store(call.config, key, record)
        if record is None:
            raise PrismError(grpc.StatusCode.NOT_FOUND, f"key {request.key!r} not found")
        response = kv.GetResponse(key=request.key, value=record.value, etag=record.etag)
        _remaining(record, store.clock(), response)
        return response

    async def _set(self, store: KeyValueAdapter, namespace: str, request: kv.SetRequest, prefix: str = "") -> str:
        key = check_key(request.key, prefix + "key")
        if len(request.value) > self.limits.max_value_bytes:
            raise too_large(f"{prefix}value", len(request.value), self.limits.max_value_bytes)
        if request.if_match and request.if_absent:
            raise invalid_argument(prefix + "ifAbsent", "cannot be combined with ifMatch")
        expires_at = self._expiry(store, request, prefix + "ttl")
        return await store.set(
            namespace, key, request.value, expires_at=expires_at, if_match=request.if_match, if_absent=request.if_absent
        )

    async def Set(self, request: kv.SetRequest, call: Call) -> kv.SetResponse:
        store, namespace = self._store(call)
        _capable(store, call, request)
        self.cache.invalidate(call.config, request.key)

        async def apply() -> kv.SetResponse:
            return kv.SetResponse(etag=await self._set(store, namespace, request))

        try:
            return await self._once(call, request, kv.SetResponse, apply)
        finally:  # again: a read racing the write may have cached the old value meanwhile
            self.cache.invalidate(call.config, request.key)

    async def Delete(self, request: kv.DeleteRequest, call: Call) -> kv.DeleteResponse:
        store, namespace = self._store(call)
        _capable(store, call, request)
        self.cache.invalidate(call.config, request.key)
        check_key(request.key)

        async def apply() -> kv.DeleteResponse:
            return kv.DeleteResponse(existed=await store.delete(namespace, request.key, if_match=request.if_match))

        try:
            return await self._once(call, request, kv.DeleteResponse, apply)
        finally:
            self.cache.invalidate(call.config, request.key)

    async def Exists(self, request: kv.ExistsRequest, call: Call) -> kv.ExistsResponse:
        store, namespace = self._store(call)
        return kv.ExistsResponse(exists=await store.exists(namespace, check_key(request.key)))

    def _check_batch(self, count: int, field: str) -> None:
        if count > self.limits.max_batch_keys:
            raise invalid_argument(field, f"{count} entries, above the maximum of {self.limits.max_batch_keys}")

    async def BatchGet(self, request: kv.BatchGetRequest, call: Call) -> kv.BatchGetResponse:
        store, namespace = self._store(call)
        self._check_batch(len(request.keys), "keys")
        for i, key in enumerate(request.keys):
            check_key(key, f"keys[{i}]")
        records = await store.get_many(namespace, list(request.keys))
        now = store.clock()
        response = kv.BatchGetResponse()
        for key, record in zip(request.keys, records, strict=True):
            result = response.results.add(key=key, found=record is not None)
            if record is not None:
                result.value, result.etag = record.value, record.etag
                _remaining(record, now, result)
        return response

    async def BatchSet(self, request: kv.BatchSetRequest, call: Call) -> kv.BatchSetResponse:
        store, namespace = self._store(call)
        self._check_batch(len(request.entries), "entries")
        response = kv.BatchSetResponse()
        for i, entry in enumerate(request.entries):
            if entry.idempotency_token:
                # A batch is retried whole; per-entry tokens would half-apply it.
                raise invalid_argument(f"entries[{i}].idempotencyToken", "is not supported in BatchSet; use Set")
        for i, entry in enumerate(request.entries):
            result = response.results.add(key=entry.key)
            try:
                _capable(store, call, entry, f"entries[{i}].")
                result.etag = await self._set(store, namespace, entry, f"entries[{i}].")
            except PrismError as exc:
                result.status.CopyFrom(exc.to_status())
            finally:
                self.cache.invalidate(call.config, entry.key)
        return response

    async def BatchDelete(self, request: kv.BatchDeleteRequest, call: Call) -> kv.BatchDeleteResponse:
        store, namespace = self._store(call)
        self._check_batch(len(request.keys), "keys")
        response = kv.BatchDeleteResponse()
        for i, key in enumerate(request.keys):
            result = response.results.add(key=key)
            try:
                result.existed = await store.delete(namespace, check_key(key, f"keys[{i}]"))
            except PrismError as exc:
                result.status.CopyFrom(exc.to_status())
            finally:
                self.cache.invalidate(call.config, key)
        return response

    async def Scan(self, request: kv.ScanRequest, call: Call) -> kv.ScanResponse:
        store, namespace = self._store(call)
        require(store, Capability.SCAN, call, "prefix")
        if request.page_size < 0:
            raise invalid_argument("pageSize", "must not be negative")
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = {"scan": request.prefix}
        start_after = self.cursors.redeem(request.page_token, namespace, query) if request.page_token else ""
        response = kv.ScanResponse()
        found: list[tuple[str, str]] | list[tuple[str, Record]]
        if request.keys_only:  # no values read: a chunked one is not assembled to be dropped
            found = await store.scan_keys(namespace, request.prefix, start_after, limit + 1)
            response.items.extend(kv.ScanItem(key=key, etag=etag) for key, etag in found[:limit])
        else:
            found = await store.scan(namespace, request.prefix, start_after, limit + 1)
            response.items.extend(kv.ScanItem(key=k, etag=r.etag, value=r.value) for k, r in found[:limit])
        if len(found) > limit:
            response.next_page_token = self.cursors.issue(namespace, query, found[limit - 1][0])
        return response
