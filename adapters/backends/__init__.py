"""What a backend type is: its settings, the one connection each configured instance opens, and
the adapter it builds on that connection for every access pattern it serves.

One module per built-in type sits beside this one (``memory``, ``sqlite``, ``postgres``,
``redis``), each ending in a ``BACKEND = BackendType(...)`` declaration; a plugin declares its
own the same way, anywhere (see ``adapters/registry.py`` for how types are found).

    settings entry ──validate──► BackendSettings subclass (``type`` picks it; its own keys only)
                                        │ connect(settings, environment)
                                        ▼
                                  Connection  (one per instance: a pool, a client, a thread)
                                        │ adapters[pattern](connection, environment)
                                        ▼
                         one adapter per pattern, all sharing that connection

An instance opens one connection however many patterns use it: a Transact outbox and a
Postgres Queue can then share a database transaction, and a backend's connection count is one
pool's, not one pool per pattern. Capabilities are declared by each adapter class
(``capabilities``), so shared code asks for a capability, never for a type name.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, NamedTuple, Protocol, TypeVar

from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapters.capabilities import Capability


class BackendSettings(BaseModel):
    """The settings every backend entry has; a type's model adds its own and pins ``type`` to
    its name (``type: Literal["postgres"] = "postgres"``). Frozen: settings never change after
    start-up."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: str
    # Down: the gateway is unready (/readyz 503, grpc.health NOT_SERVING) until it is back.
    # Otherwise the gateway stays ready and reports the backend as degraded.
    required: bool = False

    @model_validator(mode="before")
    @classmethod
    def _only_its_own_settings(cls, data: Any) -> Any:
        """A key of another type's settings (``dsn`` on a redis entry) is named as such, not
        as pydantic's "Extra inputs are not permitted"."""
        if isinstance(data, Mapping):
            if stray := sorted(set(data) - set(cls.model_fields)):
                own = sorted(set(cls.model_fields) - {"type"})
                kind = data.get("type", cls.model_fields["type"].default)
                raise ValueError(
                    f"{', '.join(map(str, stray))}: not a setting of a {kind} backend (its settings: {', '.join(own)})"
                )
        return data


class NetworkSettings(BackendSettings):
    """Settings of a backend reached over the network through a pool of connections."""

    pool_size: int = Field(default=10, gt=0, le=1000)  # connections per worker process
    connect_timeout: float = Field(default=2.0, gt=0)  # seconds
    command_timeout: float = Field(default=5.0, gt=0)  # seconds per call


@dataclass(frozen=True)
class Environment:
    """What a backend may take from the gateway beyond its own settings entry."""

    name: str  # the instance's name in the server configuration, for messages
    data_dir: pathlib.Path  # where embedded stores keep their files
    stream_buffer: int  # bound on messages buffered per subscriber or stream
    workers: int = 1  # processes serving this gateway instance (in-process backends may relay)


class PoolUse(NamedTuple):
    """A connection pool's connections now, for ``prism_backend_pool_connections``."""

    in_use: int
    idle: int


class Connection(ABC):
    """What one backend instance opens once and lends to the adapter of every pattern on it.
    Adapters never close it: the instance does, after closing them."""

    def pool_use(self) -> PoolUse | None:
        """The pool's connections by state; None without a pool (or before ``start``)."""
        return None

    async def start(self) -> None:
        """Open it; fail with UNAVAILABLE naming the server when it cannot be reached."""

    async def close(self) -> None:
        """Release everything ``start`` opened; safe when ``start`` failed or never ran."""

    @abstractmethod
    async def ping(self) -> None:
        """Return when the backend answers a trivial request, raise otherwise. The health
        monitor calls it under its own timeout, so it may simply wait for the driver."""


@contextlib.contextmanager
def cancellation_kept() -> Iterator[None]:
    """Raise the cancellation a driver dropped inside. On Python 3.11, ``asyncio.wait_for``
    returns the result of an awaitable that finished just as its task was cancelled, and the
    cancellation is lost (fixed in 3.12). redis-py sends every command under ``wait_for``,
    nats-py awaits replies under it: a stream's task cancelled during a call would run on (and
    a ``take`` it went on to wait in would never end). A request still counted once the block
    ended normally was dropped: it is raised here, right after the call."""
    try:
        task = asyncio.current_task()
    except RuntimeError:  # no event loop running: nothing to cancel
        task = None
    requested = task.cancelling() if task is not None else 0
    yield
    if task is not None and task.cancelling() > requested:
        raise asyncio.CancelledError


class Adapter(Protocol):
    """What the registry needs of any pattern's adapter: its declared capabilities and a
    lifecycle (schema creation in ``start``, for instance)."""

    capabilities: ClassVar[frozenset[Capability]]

    async def start(self) -> None: ...

    async def close(self) -> None: ...


S = TypeVar("S", bound=BackendSettings)
C = TypeVar("C", bound=Connection)


@dataclass(frozen=True)
class BackendType(Generic[S, C]):
    """A backend type as its module declares it."""

    name: str  # the ``type`` of settings entries
    settings: type[S]
    connect: Callable[[S, Environment], C]
    # Access pattern ("KEY_VALUE", "PUBSUB", ...) → the adapter built on an instance's connection.
    adapters: Mapping[str, Callable[[C, Environment], Adapter]] = field(default_factory=dict)

    @property
    def patterns(self) -> frozenset[str]:
        return frozenset(self.adapters)


class NoConnection(Connection):
    """For a backend that lives in the gateway process: nothing to open, always answers."""

    async def ping(self) -> None:
        return None
