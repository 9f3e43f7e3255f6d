"""KeyValueService: validation, TTL, idempotency and batching over any KeyValue adapter."""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import json
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import TypeVar

import grpc
from google.protobuf.message import Message
from google.rpc import status_pb2

from adapters.keyvalue.base import KeyValueAdapter, Record
from app.backends import Backends
from app.errors import PrismError, invalid_argument, too_large
from app.pipeline import Call
from app.settings import Limits
from prism.v1 import keyvalue_pb2 as kv

MAX_KEY_BYTES = 1024
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000
IDEMPOTENCY_WINDOW_SECONDS = 24 * 3600

R = TypeVar("R", bound=Message)


def check_key(key: str, field: str = "key") -> str:
    if not key:
        raise invalid_argument(field, "must not be empty")
    if len(key.encode()) > MAX_KEY_BYTES:
        raise invalid_argument(field, f"longer than {MAX_KEY_BYTES} bytes")
    return key


def _remaining(record: Record, now: float, into: Message) -> None:
    if record.expires_at is not None:
        into.ttl_remaining.FromNanoseconds(max(0, int((record.expires_at - now) * 1e9)))  # type: ignore[attr-defined]


def _idempotency_namespace(namespace: str) -> str:
    # NUL cannot occur in a namespace name, so this never collides with client data.
    return f"\x00idempotency\x00{namespace}"


class KeyValueService:
    SERVICE = "prism.v1.KeyValueService"

    def __init__(self, backends: Backends, limits: Limits, token_key: bytes) -> None:
        self.backends = backends
        self.limits = limits
        self.page_tokens = PageTokens(token_key)
        # Serialises token-carrying writes per namespace so two concurrent retries apply once.
        self._token_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)

    def _store(self, call: Call) -> tuple[KeyValueAdapter, str]:
        return self.backends.for_keyvalue(call.config), call.config.namespace

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
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        record_key = f"{call.method.name}:{token}"
        async with self._token_locks[namespace]:
            seen = await store.get(_idempotency_namespace(namespace), record_key)
            if seen is not None:
                stored = json.loads(seen.value)
                if stored["request"] != fingerprint:
                    raise invalid_argument("idempotencyToken", "reused with a different request")
                return response_type.FromString(base64.b64decode(stored["response"]))
            response = await apply()
            entry = {"request": fingerprint, "response": base64.b64encode(response.SerializeToString()).decode()}
            await store.set(
                _idempotency_namespace(namespace),
                record_key,
                json.dumps(entry).encode(),
                expires_at=store.clock() + IDEMPOTENCY_WINDOW_SECONDS,
            )
            return response

    async def Get(self, request: kv.GetRequest, call: Call) -> kv.GetResponse:
        store, namespace = self._store(call)
        record = await store.get(namespace, check_key(request.key))
        if record is None:
            raise PrismError(grpc.StatusCode.NOT_FOUND, f"key {request.key!r} not found")
        response = kv.GetResponse(key=request.key, value=record.value, etag=record.etag)
        _remaining(record, store.clock(), response)
        return response

    async def _set(self, store: KeyValueAdapter, namespace: str, request: kv.SetRequest, prefix: str = "") -> str:
        check_key(request.key, prefix + "key")
        if len(request.value) > self.limits.max_value_bytes:
            raise too_large(f"{prefix}value", len(request.value), self.limits.max_value_bytes)
        if request.if_match and request.if_absent:
            raise invalid_argument(prefix + "ifAbsent", "cannot be combined with ifMatch")
        return await store.set(
            namespace,
            request.key,
            request.value,
            expires_at=self._expiry(store, request, prefix + "ttl"),
            if_match=request.if_match,
            if_absent=request.if_absent,
        )

    async def Set(self, request: kv.SetRequest, call: Call) -> kv.SetResponse:
        store, namespace = self._store(call)

        async def apply() -> kv.SetResponse:
            return kv.SetResponse(etag=await self._set(store, namespace, request))

        return await self._once(call, request, kv.SetResponse, apply)

    async def Delete(self, request: kv.DeleteRequest, call: Call) -> kv.DeleteResponse:
        store, namespace = self._store(call)
        check_key(request.key)

        async def apply() -> kv.DeleteResponse:
            existed = await store.delete(namespace, request.key, if_match=request.if_match)
            return kv.DeleteResponse(existed=existed)

        return await self._once(call, request, kv.DeleteResponse, apply)

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
                result.etag = await self._set(store, namespace, entry, f"entries[{i}].")
            except PrismError as exc:
                result.status.CopyFrom(status_pb2.Status(code=exc.code.value[0], message=exc.message))
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
                result.status.CopyFrom(status_pb2.Status(code=exc.code.value[0], message=exc.message))
        return response

    async def Scan(self, request: kv.ScanRequest, call: Call) -> kv.ScanResponse:
        store, namespace = self._store(call)
        if request.page_size < 0:
            raise invalid_argument("pageSize", "must not be negative")
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        start_after = self.page_tokens.decode(request.page_token, namespace, request.prefix)
        found = await store.scan(namespace, request.prefix, start_after, limit + 1)
        response = kv.ScanResponse()
        for key, record in found[:limit]:
            response.items.add(key=key, etag=record.etag, value=b"" if request.keys_only else record.value)
        if len(found) > limit:
            response.next_page_token = self.page_tokens.encode(found[limit - 1][0], namespace, request.prefix)
        return response


class PageTokens:
    """Scan cursors: opaque, signed, and bound to the namespace and prefix they came from."""

    def __init__(self, key: bytes) -> None:
        self.key = key

    def _sign(self, namespace: str, payload: bytes) -> bytes:
        return hmac.new(self.key, namespace.encode() + b"\x00" + payload, hashlib.sha256).digest()[:16]

    def encode(self, last_key: str, namespace: str, prefix: str) -> str:
        payload = json.dumps([prefix, last_key]).encode()
        return f"{_b64(payload)}.{_b64(self._sign(namespace, payload))}"

    def decode(self, token: str, namespace: str, prefix: str) -> str:
        if not token:
            return ""
        try:
            encoded, signature = token.split(".")
            payload = _unb64(encoded)
            valid = hmac.compare_digest(_unb64(signature), self._sign(namespace, payload))
            token_prefix, last_key = json.loads(payload) if valid else (None, None)
        except (ValueError, TypeError, binascii.Error):
            valid = False
        if not valid or not isinstance(last_key, str):
            raise invalid_argument("pageToken", "is not a token this gateway issued for this namespace")
        if token_prefix != prefix:
            raise invalid_argument("pageToken", "belongs to a scan with a different prefix")
        return last_key


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.b64decode(text + "=" * (-len(text) % 4), altchars=b"-_", validate=True)
