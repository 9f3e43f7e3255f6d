"""Values of PII namespaces encrypted at rest, over any KeyValue adapter: a decorator with the
same interface that encrypts each value of those namespaces with AES-GCM before the adapter
stores it and decrypts it on every read, so no backend (SQLite file, Postgres table, Redis
key) ever holds the client's bytes in clear. Other namespaces pass through untouched.

    stored value = MARKER + len(key id) (1 byte) + key id + nonce (12 bytes) + ciphertext + tag

The key id travels with the ciphertext, so keys rotate: new writes use the keyring's current
key, and a value written under an older key still reads as long as that key stays in the
keyring. The namespace and the key are the associated data: a stored value copied under
another key or into another namespace fails to decrypt (DATA_LOSS) rather than reading as
someone else's. A value stored before its namespace was marked PII has no MARKER and reads
back as it is (rewrite it through the gateway to encrypt it).

ETags, conditions and expiry are the wrapped adapter's: encryption changes only the bytes.
Large values are encrypted off the event loop.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
from collections.abc import Collection, Mapping, Sequence
from dataclasses import replace

import grpc
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from adapters.keyvalue.base import KeyValueAdapter, KeyValueDecorator, Record, Write, reported
from prism.errors import PrismError

MARKER = b"\x00\xffprism-aesgcm1\x00"
NONCE_BYTES = 12
OFF_LOOP_BYTES = 64 * 1024  # larger values are encrypted and decrypted in a thread


class Keyring:
    """AES keys by id; ``current`` encrypts, every one decrypts."""

    def __init__(self, keys: Mapping[str, bytes], current: str) -> None:
        if current not in keys:
            raise ValueError(f"current: no key {current!r} in keys")
        for key_id, key in keys.items():
            if not 1 <= len(key_id.encode()) <= 255:
                raise ValueError(f"keys.{key_id}: a key id is 1 to 255 bytes")
            if len(key) not in (16, 24, 32):
                raise ValueError(f"keys.{key_id}: {len(key)} bytes; AES needs 16, 24 or 32")
        self._ciphers = {key_id: AESGCM(key) for key_id, key in keys.items()}
        self.current = current

    @classmethod
    def from_base64(cls, keys: Mapping[str, str], current: str) -> Keyring:
        decoded = {}
        for key_id, text in keys.items():
            try:
                decoded[key_id] = base64.b64decode(text, validate=True)
            except (binascii.Error, ValueError):
                raise ValueError(f"keys.{key_id}: not base64") from None
        return cls(decoded, current)

    def encrypt(self, plain: bytes, associated: bytes) -> bytes:
        key_id = self.current.encode()
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[self.current].encrypt(nonce, plain, associated)
        return MARKER + bytes([len(key_id)]) + key_id + nonce + sealed

    def decrypt(self, stored: bytes, associated: bytes) -> bytes:
        if not stored.startswith(MARKER):
            return stored  # written before the namespace was marked PII
        at = len(MARKER)
        size = stored[at] if len(stored) > at else 0
        key_id = stored[at + 1 : at + 1 + size].decode(errors="replace")
        nonce_at = at + 1 + size
        cipher = self._ciphers.get(key_id)
        if cipher is None:
            raise PrismError(grpc.StatusCode.DATA_LOSS, f"a value is encrypted with key {key_id!r}, which is not configured")
        try:
            return cipher.decrypt(stored[nonce_at : nonce_at + NONCE_BYTES], stored[nonce_at + NONCE_BYTES :], associated)
        except (InvalidTag, ValueError):
            raise PrismError(grpc.StatusCode.DATA_LOSS, "an encrypted value does not decrypt (altered, or moved from another key)") from None


class EncryptedKeyValue(KeyValueDecorator):
    def __init__(self, inner: KeyValueAdapter, keyring: Keyring, namespaces: Collection[str]) -> None:
        super().__init__(inner)
        self.keyring = keyring
        self.namespaces = frozenset(namespaces)

    @staticmethod
    def _associated(namespace: str, key: str) -> bytes:
        return f"{namespace}\x00{key}".encode()

    async def _seal(self, namespace: str, key: str, value: bytes) -> bytes:
        associated = self._associated(namespace, key)
        if len(value) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(self.keyring.encrypt, value, associated)
        return self.keyring.encrypt(value, associated)

    async def _open(self, namespace: str, key: str, stored: bytes) -> bytes:
        associated = self._associated(namespace, key)
        if len(stored) > OFF_LOOP_BYTES:
            return await asyncio.to_thread(self.keyring.decrypt, stored, associated)
        return self.keyring.decrypt(stored, associated)

    async def _record(self, namespace: str, key: str, record: Record | None) -> Record | None:
        if record is None:
            return None
        return replace(record, value=await self._open(namespace, key, record.value))

    async def get(self, namespace: str, key: str) -> Record | None:
        record = await self.inner.get(namespace, key)
        return record if namespace not in self.namespaces else await self._record(namespace, key, record)

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[Record | None]:
        records = await self.inner.get_many(namespace, keys)
        if namespace not in self.namespaces:
            return records
        return [await self._record(namespace, key, record) for key, record in zip(keys, records, strict=True)]

    async def scan(self, namespace: str, prefix: str, start_after: str, limit: int) -> list[tuple[str, Record]]:
        found = await self.inner.scan(namespace, prefix, start_after, limit)
        if namespace not in self.namespaces:
            return found
        return [(key, await self._record(namespace, key, record)) for key, record in found]  # type: ignore[misc]

    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        if namespace not in self.namespaces:
            return await self.inner.write(namespace, key, write)
        wanted = write.previous_prefix
        sealed = replace(write, value=await self._seal(namespace, key, write.value), previous_prefix=None if wanted is None else b"")
        etag, previous = await self.inner.write(namespace, key, sealed)
        if previous is None:
            return etag, None
        return etag, reported(await self._open(namespace, key, previous), wanted)

    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        if namespace not in self.namespaces or previous_prefix is None:
            return await self.inner.remove(namespace, key, if_match=if_match, previous_prefix=previous_prefix)
        existed, previous = await self.inner.remove(namespace, key, if_match=if_match, previous_prefix=b"")
        if previous is None:
            return existed, None
        return existed, reported(await self._open(namespace, key, previous), previous_prefix)
