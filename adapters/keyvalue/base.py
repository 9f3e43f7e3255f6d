"""The KeyValue adapter contract.

Every backend implements the four required operations (``get``, ``write``, ``remove``,
``scan``); ``set``/``replace`` (a :class:`Write` from keyword arguments), ``delete``, batch
reads, ``exists`` and ``scan_keys`` have default implementations built from them, which a
backend (or a decorator: ``chunked.py``) replaces when it does better. An adapter runs on its
backend instance's connection, which it never closes.
Adapters report failures as :class:`prism.errors.PrismError` (``etag_mismatch``,
``already_exists``, ``unavailable``) so no driver exception crosses the contract.
"""

from __future__ import annotations

import secrets
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypedDict, Unpack

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


def check_conditions(key: str, current: Record | None, *, if_match: str = "", if_absent: bool = False) -> None:
    """The refusals of the contract, for a store that reads the live record ``current`` and
    writes in one atomic step (an in-process one): ``etag_mismatch`` or ``already_exists``."""
    if if_match and (current is None or current.etag != if_match):
        raise etag_mismatch(key)
    if if_absent and current is not None:
        raise already_exists(key)


def unavailable(backend: str, exc: BaseException) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, f"{backend} backend unavailable: {type(exc).__name__}")


class WriteOptions(TypedDict, total=False):
    """The conditions and expiry of a write, as keyword arguments of ``set``."""

    expires_at: float | None  # unix seconds; None never expires
    if_match: str  # refuse with ``etag_mismatch`` unless the live record has this ETag
    if_absent: bool  # refuse with ``already_exists`` when a live record exists


class ReplaceOptions(WriteOptions, total=False):
    previous_prefix: bytes | None  # report the replaced value when it starts with this


@dataclass(frozen=True, slots=True)
class Write:
    """One write as the service asks for it. The keyword arguments of ``set`` and ``replace``
    become this one value, so each backend implements one short signature."""

    value: bytes
    expires_at: float | None = None
    if_match: str = ""
    if_absent: bool = False
    previous_prefix: bytes | None = None


class KeyValueAdapter(ABC):
    """Byte values under string keys, isolated by namespace."""

    capabilities: ClassVar[frozenset[Capability]]

    def __init__(self, clock: Clock = time.time) -> None:
        self.clock = clock

    async def start(self) -> None:
        """Create the schema on the backend's connection; called once before the first call."""

    async def close(self) -> None:
        """Release what ``start`` made (never the shared connection: its backend closes it)."""

    @abstractmethod
    async def get(self, namespace: str, key: str) -> Record | None: ...

    @abstractmethod
    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        """Store ``write.value``: (its new ETag, the live value it replaced if that starts with
        ``write.previous_prefix``, else None).

        ``if_match`` refuses with ``etag_mismatch`` unless the live record has that ETag;
        ``if_absent`` refuses with ``already_exists`` when a live record exists. The checks, the
        write and reading the replaced value are one atomic step, in one round trip: the
        chunked decorator learns this way whether a write replaced a chunked value whose chunks
        it must remove, without reading every key first.
        """

    async def replace(
        self, namespace: str, key: str, value: bytes, **options: Unpack[ReplaceOptions]
    ) -> tuple[str, bytes | None]:
        """``write`` with the write's fields as keyword arguments."""
        return await self.write(namespace, key, Write(value, **options))

    async def set(self, namespace: str, key: str, value: bytes, **options: Unpack[WriteOptions]) -> str:
        """``write`` without looking at the replaced value; the new ETag."""
        etag, _ = await self.write(namespace, key, Write(value, **options))
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

    async def scan_keys(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, str]]:
        """(key, ETag) of what ``scan`` finds: for listing keys without the values, which a
        decorator may have to assemble (chunked) and a store may not need to send."""
        return [(key, record.etag) for key, record in await self.scan(namespace, prefix, start_after, limit)]

    async def exists(self, namespace: str, key: str) -> bool:
        return await self.get(namespace, key) is not None

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[Record | None]:
        return [await self.get(namespace, key) for key in keys]

    def live(self, expires_at: float | None) -> bool:
        return expires_at is None or expires_at > self.clock()


class KeyValueDecorator(KeyValueAdapter):
    """An adapter over another one (``chunked.py``, ``encrypted.py``): capabilities, clock and
    lifecycle are the wrapped adapter's, and so are ``exists`` and ``scan_keys``, which see
    no values; a decorator overrides the operations whose values it changes."""

    def __init__(self, inner: KeyValueAdapter) -> None:
        super().__init__(clock=inner.clock)
        self.inner = inner

    @property  # a backend's class attribute; here the wrapped instance's
    def capabilities(self) -> frozenset[Capability]:  # type: ignore[override]
        return self.inner.capabilities

    async def start(self) -> None:
        await self.inner.start()

    async def close(self) -> None:
        await self.inner.close()

    async def exists(self, namespace: str, key: str) -> bool:
        return await self.inner.exists(namespace, key)

    async def scan_keys(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, str]]:
        return await self.inner.scan_keys(namespace, prefix, start_after, limit)
