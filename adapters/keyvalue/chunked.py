"""Values of any size over any KeyValue adapter: a decorator with the same interface that stores
a value above ``chunk_bytes`` as chunks and reassembles it on every read, so neither the service
above it nor the backend below it knows about chunks.

The stored format, which data already written must keep reading back in (byte-compatible):

    <namespace> key              the value as is; ESCAPE + value when it starts with MARKER or
                                 ESCAPE; or, for a chunked value, MARKER + its manifest as JSON
                                 (chunks, sha256, size, version; keys sorted)
    NUL chunks NUL <namespace>   key NUL version NUL index → the chunk's bytes

Chunks are written first under a fresh version, then the manifest at the key in one ``write``
of the wrapped adapter: that write is the commit point, so if_match / if_absent / TTL / ETag
are the manifest's, and a reader sees either the whole old value or the whole new one. The same
write hands back a replaced manifest (``previous_prefix``), whose chunks are removed next.
Chunks left behind (a failed delete, a crash, a lost race between two writers) are unreachable —
no manifest names their version — never wrong data. Values written before chunking existed are
untagged and read back unchanged; only a stored value that already began with one of the two
17-byte tags (NUL, 0xFF, "prism-…") would be misread: rewrite it through the gateway to migrate.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import grpc

from adapters.keyvalue.base import (
    KeyValueAdapter,
    KeyValueDecorator,
    Record,
    Write,
    check_conditions,
    reported,
)
from prism.errors import PrismError

MARKER = b"\x00\xffprism-chunked1\x00"
ESCAPE = b"\x00\xffprism-literal1\x00"
CHUNK_GRACE_SECONDS = 300  # chunks of an expiring value outlive its manifest by this much
READ_ATTEMPTS = 4  # a reader chasing concurrent overwrites gives up (UNAVAILABLE) after this
GET_MANY_BATCH = 256

log = logging.getLogger(__name__)


def chunk_namespace(namespace: str) -> str:
    """Where a namespace's chunks live: NUL cannot occur in a namespace name, so no client's."""
    return f"\x00chunks\x00{namespace}"


@dataclass(frozen=True, slots=True)
class Manifest:
    version: str
    size: int
    chunks: int
    sha256: str

    def encode(self) -> bytes:
        return MARKER + json.dumps(dataclasses.asdict(self), sort_keys=True).encode()

    def keys(self, key: str) -> list[str]:
        return [f"{key}\x00{self.version}\x00{i}" for i in range(self.chunks)]


def _decode(stored: bytes) -> bytes | Manifest:
    """A stored value as the client's bytes, or the manifest of a chunked value."""
    if stored.startswith(ESCAPE):
        return stored[len(ESCAPE) :]
    if not stored.startswith(MARKER):
        return stored
    try:
        fields = json.loads(stored[len(MARKER) :])
        return Manifest(
            str(fields["version"]), int(fields["size"]), int(fields["chunks"]), str(fields["sha256"])
        )
    except (ValueError, TypeError, KeyError) as exc:
        raise PrismError(grpc.StatusCode.DATA_LOSS, "a chunked value's manifest is unreadable") from exc


def _asking(prefix: bytes | None) -> bytes:
    """What to ask the wrapped adapter to hand back of a replaced value: a manifest (its chunks
    go next), or any value when the caller wants the replaced one."""
    return MARKER if prefix is None else b""


class ChunkedKeyValue(KeyValueDecorator):
    """``inner`` storing values above ``chunk_bytes`` in chunks. Capabilities, clock, lifecycle
    and errors are the wrapped adapter's."""

    def __init__(self, inner: KeyValueAdapter, chunk_bytes: int) -> None:
        super().__init__(inner)
        self.chunk_bytes = chunk_bytes

    async def get(self, namespace: str, key: str) -> Record | None:
        return await self._resolve(namespace, key, await self.inner.get(namespace, key))

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[Record | None]:
        stored = await self.inner.get_many(namespace, keys)
        return [await self._resolve(namespace, k, r) for k, r in zip(keys, stored, strict=True)]

    async def scan(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, Record]]:
        """A key deleted between the inner scan and reading its chunks is left out, and the
        page filled up from further on, so a short page still means the last one."""
        found: list[tuple[str, Record]] = []
        while (wanted := limit - len(found)) > 0:
            page = await self.inner.scan(namespace, prefix, start_after, wanted)
            for key, record in page:
                if (resolved := await self._resolve(namespace, key, record)) is not None:
                    found.append((key, resolved))
            if len(page) < wanted:
                break
            start_after = page[-1][0]
        return found

    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        new: Manifest | None = None
        if len(write.value) <= self.chunk_bytes:
            stored = ESCAPE + write.value if write.value.startswith((MARKER, ESCAPE)) else write.value
        else:
            # Refuse early what the manifest write would refuse, before writing any chunk.
            current = await self.inner.get(namespace, key)
            check_conditions(key, current, if_match=write.if_match, if_absent=write.if_absent)
            new = await self._write_chunks(namespace, key, write.value, write.expires_at)
            stored = new.encode()
        try:
            etag, replaced = await self.inner.write(
                namespace,
                key,
                dataclasses.replace(write, value=stored, previous_prefix=_asking(write.previous_prefix)),
            )
        except BaseException:
            if new is not None:
                await asyncio.shield(self._drop_chunks(namespace, key, new))
            raise
        return etag, await self._replaced(namespace, key, replaced, write.previous_prefix)

    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        existed, removed = await self.inner.remove(
            namespace, key, if_match=if_match, previous_prefix=_asking(previous_prefix)
        )
        return existed, await self._replaced(namespace, key, removed, previous_prefix)

    async def _replaced(
        self, namespace: str, key: str, stored: bytes | None, prefix: bytes | None
    ) -> bytes | None:
        """The replaced value as the caller asked for it (``previous_prefix``), once the chunks
        of a replaced chunked value are gone."""
        if stored is None:
            return None
        try:
            decoded = _decode(stored)
        except PrismError:  # an unreadable manifest names no chunks to remove
            return None
        if isinstance(decoded, bytes):
            return reported(decoded, prefix)
        value = await self._assemble(namespace, key, decoded) if prefix is not None else None
        await self._drop_chunks(namespace, key, decoded)
        return reported(value, prefix)

    async def _resolve(self, namespace: str, key: str, record: Record | None) -> Record | None:
        """The stored record with the client's value: unescaped, or reassembled from chunks.

        A chunked value whose chunks are missing or fail the digest is re-read: a concurrent
        overwrite removes the old chunks right after its manifest lands, so the key then holds
        a newer value. The same manifest failing twice is DATA_LOSS; never a partial value."""
        failures_of_same = 0
        for _ in range(READ_ATTEMPTS):
            if record is None:
                return None
            decoded = _decode(record.value)
            if decoded is record.value:  # a plain value, stored as it came: the record as it is
                return record
            if not isinstance(decoded, Manifest):
                return dataclasses.replace(record, value=decoded)
            value = await self._assemble(namespace, key, decoded)
            if value is not None:
                return dataclasses.replace(record, value=value)
            again = await self.inner.get(namespace, key)
            if again is not None and again.value == record.value:
                failures_of_same += 1
                if failures_of_same > 1:
                    raise PrismError(
                        grpc.StatusCode.DATA_LOSS,
                        f"key {key!r}: chunks of the stored value are missing or corrupt",
                    )
            record = again
        raise PrismError(grpc.StatusCode.UNAVAILABLE, f"key {key!r}: overwritten while being read; retry")

    async def _assemble(self, namespace: str, key: str, manifest: Manifest) -> bytes | None:
        keys = manifest.keys(key)
        chunks: list[Record | None] = []
        for i in range(0, len(keys), GET_MANY_BATCH):
            chunks += await self.inner.get_many(chunk_namespace(namespace), keys[i : i + GET_MANY_BATCH])
        if any(chunk is None for chunk in chunks):
            return None
        value = b"".join(chunk.value for chunk in chunks)  # type: ignore[union-attr]
        if len(value) != manifest.size or hashlib.sha256(value).hexdigest() != manifest.sha256:
            return None
        return value

    async def _write_chunks(
        self, namespace: str, key: str, value: bytes, expires_at: float | None
    ) -> Manifest:
        size = self.chunk_bytes
        pieces = [value[i : i + size] for i in range(0, len(value), size)]
        manifest = Manifest(secrets.token_hex(16), len(value), len(pieces), hashlib.sha256(value).hexdigest())
        chunk_expiry = None if expires_at is None else expires_at + CHUNK_GRACE_SECONDS
        try:
            await asyncio.gather(
                *(
                    self.inner.set(chunk_namespace(namespace), k, piece, expires_at=chunk_expiry)
                    for k, piece in zip(manifest.keys(key), pieces, strict=True)
                )
            )
        except BaseException:
            await asyncio.shield(self._drop_chunks(namespace, key, manifest))
            raise
        return manifest

    async def _drop_chunks(self, namespace: str, key: str, manifest: Manifest) -> None:
        """Best effort: what is left behind is unreachable garbage, never wrong data."""
        results = await asyncio.gather(
            *(self.inner.delete(chunk_namespace(namespace), k) for k in manifest.keys(key)),
            return_exceptions=True,
        )
        if errors := [r for r in results if isinstance(r, BaseException)]:
            log.warning("left %d chunks of %r behind: %s", len(errors), key, errors[0])
