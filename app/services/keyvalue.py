"""KeyValueService: validation, TTL, idempotency and batching over any KeyValue adapter."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import secrets
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from typing import TypeVar

import grpc
from google.protobuf.message import Message

from adapters.keyvalue.base import KeyValueAdapter, Record, already_exists, etag_mismatch
from app.backends import Backends
from app.pipeline import Call
from app.services.cursors import Cursors
from app.services.idempotency import Idempotency
from app.services.read_cache import ReadCache
from app.settings import Limits
from prism.errors import PrismError, invalid_argument, too_large
from prism.v1 import keyvalue_pb2 as kv

MAX_KEY_BYTES = 1024
MAX_TTL_SECONDS = 10 * 365 * 24 * 3600
DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE = 100, 1000

R = TypeVar("R", bound=Message)
log = logging.getLogger(__name__)


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


# --- Large values ----------------------------------------------------------------------------
#
# A value above ``limits.chunk_bytes`` is stored as chunks in a hidden namespace, under
# key + NUL + a fresh version id + NUL + index, and only then is a small manifest (MARKER +
# JSON: version, size, chunk count, sha256) written at the key itself, in one adapter ``set``:
# that write is the commit point, so if_match / if_absent / TTL / ETag are the manifest's, and
# a reader sees either the whole old value or the whole new one. Every other value is stored as
# is, except one that happens to start with MARKER or ESCAPE, which is stored behind ESCAPE.
# Data written before chunking existed is untagged and reads back unchanged; only a stored value
# that already began with one of these two 17-byte sequences (NUL, 0xFF, "prism-…") would be
# misread — such values must be rewritten through this gateway version to migrate.
MARKER = b"\x00\xffprism-chunked1\x00"
ESCAPE = b"\x00\xffprism-literal1\x00"
CHUNK_GRACE_SECONDS = 300  # chunks of an expiring value outlive its manifest by this much
READ_ATTEMPTS = 4  # a reader chasing concurrent overwrites gives up (UNAVAILABLE) after this
GET_MANY_BATCH = 256


def _chunk_namespace(namespace: str) -> str:
    return f"\x00chunks\x00{namespace}"  # reserved like the idempotency namespace


def _chunk_key(key: str, version: str, index: int) -> str:
    return f"{key}\x00{version}\x00{index}"


@dataclass(frozen=True, slots=True)
class Manifest:
    version: str
    size: int
    chunks: int
    sha256: str

    def encode(self) -> bytes:
        fields = {"version": self.version, "size": self.size, "chunks": self.chunks, "sha256": self.sha256}
        return MARKER + json.dumps(fields, sort_keys=True).encode()

    def keys(self, key: str) -> list[str]:
        return [_chunk_key(key, self.version, i) for i in range(self.chunks)]


def _encode_small(value: bytes) -> bytes:
    return ESCAPE + value if value.startswith((MARKER, ESCAPE)) else value


def _decode_stored(value: bytes) -> bytes | Manifest:
    """A stored value as the client's bytes, or the manifest of a chunked value."""
    if value.startswith(ESCAPE):
        return value[len(ESCAPE):]
    if not value.startswith(MARKER):
        return value
    try:
        fields = json.loads(value[len(MARKER):])
        manifest = Manifest(
            str(fields["version"]), int(fields["size"]), int(fields["chunks"]), str(fields["sha256"])
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise PrismError(grpc.StatusCode.DATA_LOSS, "a chunked value's manifest is unreadable") from exc
    return manifest


def _manifest_of(stored: bytes | None) -> Manifest | None:
    if stored is None or not stored.startswith(MARKER):
        return None
    try:
        decoded = _decode_stored(stored)
    except PrismError:
        return None
    return decoded if isinstance(decoded, Manifest) else None


class KeyValueService:
    SERVICE = "prism.v1.KeyValueService"

    def __init__(self, backends: Backends, limits: Limits, token_key: bytes) -> None:
        self.backends = backends
        self.limits = limits
        self.cursors = Cursors(token_key)
        self.cache = ReadCache()
        self.idempotency = Idempotency()

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
        key = f"{call.method.name}:{token}"
        response = await self.idempotency.once(store, _idempotency_namespace(namespace), key, request, response_type, apply)
        return response  # type: ignore[return-value]

    async def Get(self, request: kv.GetRequest, call: Call) -> kv.GetResponse:
        store, namespace = self._store(call)
        key = check_key(request.key)
        record = self.cache.lookup(call.config, key)
        if record is None:
            record = await self._resolve(store, namespace, key, await store.get(namespace, key))
            if record is not None:
                self.cache.store(call.config, key, record)
        if record is None:
            raise PrismError(grpc.StatusCode.NOT_FOUND, f"key {request.key!r} not found")
        response = kv.GetResponse(key=request.key, value=record.value, etag=record.etag)
        _remaining(record, store.clock(), response)
        return response

    async def _resolve(
        self, store: KeyValueAdapter, namespace: str, key: str, record: Record | None
    ) -> Record | None:
        """The stored record with the client's value: unescaped, or reassembled from chunks.

        A chunked value whose chunks are missing or fail the digest is re-read: a concurrent
        overwrite removes the old chunks right after its manifest lands, so the key then holds
        a newer value. The same manifest failing twice is DATA_LOSS; never a partial value."""
        failures_of_same = 0
        for _ in range(READ_ATTEMPTS):
            if record is None:
                return None
            decoded = _decode_stored(record.value)
            if not isinstance(decoded, Manifest):
                return replace(record, value=decoded)
            value = await self._assemble(store, namespace, key, decoded)
            if value is not None:
                return replace(record, value=value)
            again = await store.get(namespace, key)
            if again is not None and again.value == record.value:
                failures_of_same += 1
                if failures_of_same > 1:
                    raise PrismError(
                        grpc.StatusCode.DATA_LOSS,
                        f"key {key!r}: chunks of the stored value are missing or corrupt",
                    )
            record = again
        raise PrismError(grpc.StatusCode.UNAVAILABLE, f"key {key!r}: overwritten while being read; retry")

    async def _assemble(self, store: KeyValueAdapter, namespace: str, key: str, manifest: Manifest) -> bytes | None:
        keys = manifest.keys(key)
        chunks: list[Record | None] = []
        for i in range(0, len(keys), GET_MANY_BATCH):
            chunks += await store.get_many(_chunk_namespace(namespace), keys[i : i + GET_MANY_BATCH])
        if any(chunk is None for chunk in chunks):
            return None
        value = b"".join(chunk.value for chunk in chunks)  # type: ignore[union-attr]
        if len(value) != manifest.size or hashlib.sha256(value).hexdigest() != manifest.sha256:
            return None
        return value

    async def _drop_chunks(self, store: KeyValueAdapter, namespace: str, key: str, manifest: Manifest) -> None:
        """Best effort: chunks left behind (a failed delete, a crash, a lost race between two
        writers) are unreachable garbage — no manifest names their version — never wrong data."""
        results = await asyncio.gather(
            *(store.delete(_chunk_namespace(namespace), k) for k in manifest.keys(key)), return_exceptions=True
        )
        if errors := [r for r in results if isinstance(r, BaseException)]:
            log.warning("left %d chunks of %r behind: %s", len(errors), key, errors[0])

    async def _set(self, store: KeyValueAdapter, namespace: str, request: kv.SetRequest, prefix: str = "") -> str:
        key = check_key(request.key, prefix + "key")
        value = request.value
        if len(value) > self.limits.max_value_bytes:
            raise too_large(f"{prefix}value", len(value), self.limits.max_value_bytes)
        if request.if_match and request.if_absent:
            raise invalid_argument(prefix + "ifAbsent", "cannot be combined with ifMatch")
        expires_at = self._expiry(store, request, prefix + "ttl")
        new: Manifest | None = None
        if len(value) <= self.limits.chunk_bytes:
            stored = _encode_small(value)
        else:
            # Refuse early what the manifest write would refuse, before writing any chunk.
            old = await store.get(namespace, key)
            if request.if_absent and old is not None:
                raise already_exists(key)
            if request.if_match and (old is None or old.etag != request.if_match):
                raise etag_mismatch(key)
            new = await self._write_chunks(store, namespace, key, value, expires_at)
            stored = new.encode()
        try:
            # The replaced value comes back only if it is a manifest: its chunks go next.
            etag, replaced = await store.replace(
                namespace, key, stored,
                expires_at=expires_at, if_match=request.if_match, if_absent=request.if_absent, previous_prefix=MARKER,
            )
        except BaseException:
            if new is not None:
                await asyncio.shield(self._drop_chunks(store, namespace, key, new))
            raise
        if (previous := _manifest_of(replaced)) is not None:
            await self._drop_chunks(store, namespace, key, previous)
        return etag

    async def _write_chunks(
        self, store: KeyValueAdapter, namespace: str, key: str, value: bytes, expires_at: float | None
    ) -> Manifest:
        size = self.limits.chunk_bytes
        pieces: Sequence[bytes] = [value[i : i + size] for i in range(0, len(value), size)]
        manifest = Manifest(secrets.token_hex(16), len(value), len(pieces), hashlib.sha256(value).hexdigest())
        chunk_expiry = None if expires_at is None else expires_at + CHUNK_GRACE_SECONDS
        try:
            await asyncio.gather(
                *(
                    store.set(_chunk_namespace(namespace), k, piece, expires_at=chunk_expiry)
                    for k, piece in zip(manifest.keys(key), pieces, strict=True)
                )
            )
        except BaseException:
            await asyncio.shield(self._drop_chunks(store, namespace, key, manifest))
            raise
        return manifest

    async def _delete(self, store: KeyValueAdapter, namespace: str, key: str, if_match: str = "") -> bool:
        existed, removed = await store.remove(namespace, key, if_match=if_match, previous_prefix=MARKER)
        if (previous := _manifest_of(removed)) is not None:
            await self._drop_chunks(store, namespace, key, previous)
        return existed

    async def Set(self, request: kv.SetRequest, call: Call) -> kv.SetResponse:
        store, namespace = self._store(call)
        self.cache.invalidate(call.config, request.key)

        async def apply() -> kv.SetResponse:
            return kv.SetResponse(etag=await self._set(store, namespace, request))

        try:
            return await self._once(call, request, kv.SetResponse, apply)
        finally:  # again: a read racing the write may have cached the old value meanwhile
            self.cache.invalidate(call.config, request.key)

    async def Delete(self, request: kv.DeleteRequest, call: Call) -> kv.DeleteResponse:
        store, namespace = self._store(call)
        self.cache.invalidate(call.config, request.key)
        check_key(request.key)

        async def apply() -> kv.DeleteResponse:
            existed = await self._delete(store, namespace, request.key, request.if_match)
            return kv.DeleteResponse(existed=existed)

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
        stored = await store.get_many(namespace, list(request.keys))
        records = [await self._resolve(store, namespace, k, r) for k, r in zip(request.keys, stored, strict=True)]
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
                result.existed = await self._delete(store, namespace, check_key(key, f"keys[{i}]"))
            except PrismError as exc:
                result.status.CopyFrom(exc.to_status())
            finally:
                self.cache.invalidate(call.config, key)
        return response

    async def Scan(self, request: kv.ScanRequest, call: Call) -> kv.ScanResponse:
        store, namespace = self._store(call)
        if request.page_size < 0:
            raise invalid_argument("pageSize", "must not be negative")
        limit = min(request.page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
        query = {"scan": request.prefix}
        start_after = self.cursors.redeem(request.page_token, namespace, query) if request.page_token else ""
        found = await store.scan(namespace, request.prefix, start_after, limit + 1)
        response = kv.ScanResponse()
        for key, record in found[:limit]:
            if request.keys_only:
                response.items.add(key=key, etag=record.etag)
            elif (resolved := await self._resolve(store, namespace, key, record)) is not None:
                response.items.add(key=key, etag=resolved.etag, value=resolved.value)
        if len(found) > limit:
            response.next_page_token = self.cursors.issue(namespace, query, found[limit - 1][0])
        return response
