"""The KeyValue adapter contract.

Every backend implements the five required operations; batch reads and ``exists`` have
default implementations built from them, which a backend replaces when its store does better.
Adapters report failures as :class:`prism.errors.PrismError` (``etag_mismatch``,
``already_exists``, ``unavailable``) so no driver exception crosses the contract.
"""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import grpc

from adapters.capabilities import Capability
from prism.errors import PrismError

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class Record:
    value: bytes
    etag: str
    expires_at: float | None  # unix seconds; None never expires


def new_etag() -> str:
    """Random, so a deleted and re-created key never reuses a stale client's ETag."""
    return secrets.token_hex(8)


def prefix_end(prefix: bytes) -> bytes | None:
    """The least byte string greater than every string starting with ``prefix``; None when
    there is none (empty prefix, or all 0xFF). ``prefix <= key < prefix_end(prefix)`` is a
    literal prefix match as a key range, with no wildcard syntax to escape."""
    stripped = prefix.rstrip(b"\xff")
    return stripped[:-1] + bytes([stripped[-1] + 1]) if stripped else None


def reported(value: bytes | None, prefix: bytes | None) -> bytes | None:
    """``value`` when the caller asked for values starting with ``prefix`` and it does."""
    return value if prefix is not None and value is not None and value.startswith(prefix) else None


def etag_mismatch(key: str) -> PrismError:
    return PrismError(grpc.StatusCode.ABORTED, f"key {key!r}: if_match does not match the stored ETag")


def already_exists(key: str) -> PrismError:
    return PrismError(grpc.StatusCode.ALREADY_EXISTS, f"key {key!r} already exists (if_absent)")


def unavailable(backend: str, exc: BaseException) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, f"{backend} backend unavailable: {type(exc).__name__}")


class KeyValueAdapter(ABC):
    """Byte values under string keys, isolated by namespace."""

    capabilities: ClassVar[frozenset[Capability]]

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock

    async def start(self) -> None:
        """Open connections and create the schema; called once before the first call."""

    async def close(self) -> None:
        """Release everything ``start`` opened."""

    @abstractmethod
    async def get(self, namespace: str, key: str) -> Record | None: ...

    @abstractmethod
    async def replace(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_match: str = "",
        if_absent: bool = False,
        previous_prefix: bytes | None = None,
    ) -> tuple[str, bytes | None]:
        """Store ``value``: (its new ETag, the live value it replaced if that starts with
        ``previous_prefix``, else None).

        ``if_match`` refuses with ``etag_mismatch`` unless the live record has that ETag;
        ``if_absent`` refuses with ``already_exists`` when a live record exists. The checks, the
        write and reading the replaced value are one atomic step, in one round trip: the
        KeyValue service learns this way whether a write replaced a chunked value whose chunks
        it must remove, without reading every key first.
        """

    async def set(
        self,
        namespace: str,
        key: str,
        value: bytes,
        *,
        expires_at: float | None = None,
        if_match: str = "",
        if_absent: bool = False,
    ) -> str:
        """``replace`` without looking at the replaced value; the new ETag."""
        etag, _ = await self.replace(namespace, key, value, expires_at=expires_at, if_match=if_match, if_absent=if_absent)
        return etag

    @abstractmethod
    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        """Remove the key: (whether a live record existed, its value if that starts with
        ``previous_prefix``, else None), atomically as ``replace``."""

    async def delete(self, namespace: str, key: str, *, if_match: str = "") -> bool:
        """``remove`` without looking at the removed value; True when a live record existed."""
        existed, _ = await self.remove(namespace, key, if_match=if_match)
        return existed

    @abstractmethod
    async def scan(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, Record]]:
        """Live records whose key starts with ``prefix`` (literally), after ``start_after``,
        in key order (by UTF-8 bytes), at most ``limit``."""

    async def exists(self, namespace: str, key: str) -> bool:
        return await self.get(namespace, key) is not None

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[Record | None]:
        return [await self.get(namespace, key) for key in keys]

    def live(self, expires_at: float | None) -> bool:
        return expires_at is None or expires_at > self.clock()
