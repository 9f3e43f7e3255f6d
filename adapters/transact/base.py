"""The Transact adapter contract: a data-table row and a mailbox (outbox) row written in one
database transaction, so a change and the message announcing it commit together or not at all.

    Write / Transaction ──► one database transaction
                              ├─ data:    insert, upsert, update or delete one row of a table the
                              │           server configuration declares (name, key, writable columns)
                              └─ mailbox: a row of the mailbox table, the next sequence of its mailbox
                                          (payload, headers, destination) ──► the listener delivers it

Every backend gives these the same meaning; ``tests/conformance/test_transact_adapter.py`` checks
them against an adapter directly, ``tests/conformance/test_transact.py`` through the gateway.

1. **Tables by declaration only.** A :class:`Table` names a real table, its key columns (a unique
   index on exactly them: upserts conflict on it, updates and deletes find one row by it) and the
   columns clients may write. ``prepare`` checks the declaration against the table's real schema
   once (creating the table first when ``create`` is set: embedded demos and tests). A row naming
   a column outside the declaration, or without its key, is INVALID_ARGUMENT naming ``row.<column>``
   before anything runs. Table and column names are validated identifiers, always quoted; values
   are always bound parameters, never written into SQL.
2. **Atomicity.** Everything written between the transaction's start and its commit is committed
   together; any failure (a refused row, a constraint, a timeout, the caller leaving) rolls all of
   it back. No connection goes back to its pool, or is reused, while inside a transaction.
3. **Mailbox rows.** Each mailbox (a name within a namespace) numbers its rows 1, 2, 3 …
   (``mailbox_sequence``) in commit order: a row's sequence is taken under a lock on its mailbox that
   is held until commit, so a reader that has seen sequence N never later finds a committed N-1.
   A row keeps what the client wrote (payload bytes, headers, destination: the Queue topic or PubSub
   subject the listener delivers it to; empty means the mailbox's name), ``committed_ns`` (the
   gateway's clock at commit, unix ns) and the listener's columns (``delivered_ns``, lease holder
   and deadline, attempts), left empty here.
4. **Write** is one transaction of one data write and one mailbox row, at the configured isolation
   level, bounded by ``timeout`` (the whole call: waiting for the database's write lock included).
   An UPDATE or DELETE that finds no row is NOT_FOUND and writes nothing (the message would announce
   a change that did not happen); an INSERT of an existing key is ALREADY_EXISTS. With an
   idempotency key, the key is claimed inside the same transaction, first: a retry of a committed
   Write (same key, same ``fingerprint``) applies nothing and returns the first result with
   ``replayed`` set — also when the retries run concurrently; the key with another request is
   ALREADY_EXISTS; a Write that failed left no claim, so its retry applies afresh. Keys are
   remembered for ``key_window`` seconds (24 h).
5. **Interactive transactions.** ``begin`` opens a :class:`Transaction` on a connection of its own
   (never shared with other callers while open); ``data`` and ``mailbox`` run one statement each and
   report rows affected and the mailbox sequence; ``commit`` answers the commit time. It is rolled
   back on an explicit ``rollback``, on leaving its ``async with`` block uncommitted, on any failed
   step, on the caller being cancelled mid-step (a client that disconnects), and when ``timeout``
   seconds pass without a commit — whatever the caller is doing then. After that every call is
   refused (DEADLINE_EXCEEDED for a timeout, else FAILED_PRECONDITION). An adapter bounds how many
   are open at once (RESOURCE_EXHAUSTED beyond), so they never take every pooled connection.
6. **The listener's side** (``app/listener.py`` delivers what these return). ``claim`` leases
   whole mailboxes: a mailbox of ``routes`` with undelivered rows and no live lease is leased to
   ``holder`` for ``lease`` seconds, and its lowest undelivered rows come back in sequence order —
   a run from the first undelivered one, at most ``rows`` rows in all (shared between the mailboxes
   taken) and ``max_bytes`` of payload (but always one), at most ``mailboxes`` mailboxes, least
   recently leased first — each row's ``attempts`` counted. A mailbox leased to another holder is skipped until its lease runs out;
   then its rows come again (at least once). So while a lease lives, no other claim — on any
   connection, in any process — gets that mailbox's rows, and a mailbox is delivered by one
   holder at a time, in order. An empty claim says when the earliest lease held elsewhere ends
   (``retry_ns``). ``mark_delivered`` stamps ``delivered_ns`` on a run of a claim's rows (from its
   first) and gives the mailbox back: at once, or only after ``retry_after`` seconds (the rest
   failed: nobody, the holder included, claims it sooner). ``watch`` gives a :class:`Changes`
   that wakes when a mailbox row may have been committed, in this process or another, so a
   listener waits for commits instead of polling for them.
7. **Failures, dead letters, retention.** A mark may carry the :class:`Failure` of the row the
   delivery stopped at: its ``last_error`` is kept, a refusal adds one to its ``refusals`` (an
   outage does not: ``attempts`` counts every claim, ``refusals`` only the destination's
   refusals), and ``dead`` dead-letters it — ``dead_ns`` stamped: never claimed again, and kept
   (only delivered rows are ever deleted) — so the rows behind it go on. Only while ``holder``
   still holds the mailbox: a late mark never dead-letters a row another holder has. Claims take
   the lowest rows that are neither delivered nor dead. ``delete_delivered`` deletes at most
   ``limit`` rows of a namespace delivered before ``before_ns``, oldest first, in one short
   transaction that keeps no writer waiting long (rows another transaction locked are left for
   the next call), and never a row without ``delivered_ns``. Both add to a database an older
   gateway made the columns and index they need, keeping its rows.

Errors are :class:`~prism.errors.PrismError`, so no driver exception crosses the contract:
INVALID_ARGUMENT (a row the declaration or the column types refuse, naming ``row``/``row.<col>``),
NOT_FOUND (Write: no row to update or delete), ALREADY_EXISTS (an existing key on insert, a reused
idempotency key), FAILED_PRECONDITION (a table that does not match its declaration, a constraint
refusing the row, a transaction no longer open), ABORTED (a serialization failure or deadlock:
retry), DEADLINE_EXCEEDED (the timeout), RESOURCE_EXHAUSTED (too many open transactions),
UNAVAILABLE (the database cannot be reached, or its write lock was not granted in time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import uuid
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from types import TracebackType
from typing import Any, ClassVar, Generic, TypeVar

import grpc

from adapters.capabilities import Capability
from prism.errors import PrismError, internal, invalid_argument

log = logging.getLogger("prism.adapters.transact")

# Table and column names: plain SQL identifiers, so quoting them is all it takes. Matched exactly
# as declared (quoted: case-sensitive on PostgreSQL).
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
RESERVED_PREFIX = "prism_"  # the gateway's own tables are never exposed
# Mailbox names and destinations: the Queue topic alphabet (a PubSub subject fits it as well).
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,248}$")
# Headers the mailbox listener adds to every message it delivers (a client's row may not carry them).
MAILBOX_HEADER = "prism-mailbox"  # the mailbox's name
SEQUENCE_HEADER = "prism-mailbox-sequence"  # the row's sequence in it
RESERVED_HEADER_PREFIX = "prism-mailbox"
KEY_WINDOW_SECONDS = 24 * 3600.0  # how long a Write's idempotency key is remembered
ERROR_CHARS = 1000  # characters of a delivery's error kept in a mailbox row's last_error
ROLLBACK_SECONDS = 5.0  # a rollback that takes longer abandons the connection (the server rolls back)
MAX_SHOWN = 64  # characters of a client's column name repeated in an error

T = TypeVar("T")
# A row as JSON gives it: nested objects and lists are stored as JSON text (or json columns).
Value = None | bool | int | float | str | list[Any] | dict[str, Any]


class Operation(StrEnum):
    INSERT = "insert"  # a new row; ALREADY_EXISTS when its key is taken
    UPSERT = "upsert"  # insert, or set the given columns of the row with that key
    UPDATE = "update"  # set the given columns of the row with that key
    DELETE = "delete"  # the row with that key (the row names only the key)


class Isolation(StrEnum):
    """The database isolation level of a namespace's transactions. SQLite runs every write
    transaction serializably, which satisfies each of them."""

    READ_COMMITTED = "read_committed"
    REPEATABLE_READ = "repeatable_read"
    SERIALIZABLE = "serializable"


@dataclass(frozen=True, slots=True)
class Table:
    """A table clients may write, as the server configuration declares it."""

    name: str
    key: tuple[str, ...]  # its unique key: the columns that find one row
    columns: tuple[str, ...]  # the columns clients may write, the key's included
    create: bool = False  # create it when missing (untyped columns: demos and tests)

    def __post_init__(self) -> None:
        for name in (self.name, *self.columns):
            if not IDENTIFIER.fullmatch(name):
                raise ValueError(f"{name!r} is not an identifier (a letter or _, then letters, digits, _; at most 63)")
        if self.name.lower().startswith(RESERVED_PREFIX):
            raise ValueError(f"{self.name!r}: tables named {RESERVED_PREFIX}* are the gateway's own")
        if not self.key:
            raise ValueError("key: at least one column")
        if len(set(self.columns)) != len(self.columns) or len(set(self.key)) != len(self.key):
            raise ValueError("a column is named twice")
        if missing := [k for k in self.key if k not in self.columns]:
            raise ValueError(f"key: {', '.join(missing)} not among the columns")

    def ordered(self, row: Mapping[str, Value]) -> list[str]:
        """The row's columns in declaration order: one SQL text per shape, so prepared
        statements are reused whatever order a client sent them in."""
        return [c for c in self.columns if c in row]


@dataclass(frozen=True, slots=True)
class DataWrite:
    table: Table
    operation: Operation
    row: Mapping[str, Value]


@dataclass(frozen=True, slots=True)
class MailboxWrite:
    mailbox: str
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    destination: str = ""  # empty: the mailbox's name


@dataclass(frozen=True, slots=True)
class WriteResult:
    mailbox_sequence: int
    committed_ns: int  # unix nanoseconds, the gateway's clock
    replayed: bool = False  # an earlier Write with the idempotency key, returned again


@dataclass(frozen=True, slots=True)
class MailboxRow:
    """A committed mailbox row, as the listener reads it."""

    mailbox: str
    sequence: int
    payload: bytes
    headers: Mapping[str, str]
    destination: str
    committed_ns: int
    delivered_ns: int | None  # None until the listener delivered it
    attempts: int  # claims that took it: every try, an outage's or a crashed holder's too
    refusals: int = 0  # times its destination refused it (rule 7)
    dead_ns: int | None = None  # when it was dead-lettered: never delivered, kept for a person
    last_error: str = ""  # why its last delivery failed (kept after a later success)


@dataclass(frozen=True, slots=True)
class Failure:
    """The row a delivery stopped at, and why (rule 7)."""

    sequence: int
    error: str  # stored as the row's last_error (cut to ERROR_CHARS)
    refused: bool  # the destination refused the row (counted); else an outage, a lease run out
    dead: bool = False  # refused too often: dead-letter it, so its mailbox moves on

    @property
    def text(self) -> str:
        return self.error[:ERROR_CHARS]


@dataclass(frozen=True, slots=True)
class Routes:
    """The mailboxes a listener delivers: every mailbox of ``namespaces``, and the
    ``(namespace, mailbox)`` pairs of ``mailboxes``."""

    namespaces: frozenset[str] = frozenset()
    mailboxes: frozenset[tuple[str, str]] = frozenset()

    def __bool__(self) -> bool:
        return bool(self.namespaces or self.mailboxes)


@dataclass(frozen=True, slots=True)
class Claimed:
    """One mailbox's lowest undelivered rows, in sequence order, leased to the claim's holder."""

    namespace: str
    mailbox: str
    rows: tuple[MailboxRow, ...]
    # Names this mailbox's sequence numbering: a mailbox table recreated from nothing numbers from
    # 1 again under a new epoch, so (epoch, sequence) names one row for ever (idempotency tokens).
    epoch: str = ""


@dataclass(frozen=True, slots=True)
class Claim:
    batches: tuple[Claimed, ...]
    retry_ns: int | None = None  # nothing claimed: when the earliest lease held elsewhere ends (unix ns)


def headers_text(headers: Mapping[str, str]) -> str:
    """A mailbox row's headers as stored (JSON); most rows have none."""
    return json.dumps(dict(headers)) if headers else "{}"


def headers_of(text: str) -> dict[str, str]:
    """A stored row's headers."""
    return {} if text == "{}" else json.loads(text)


def check_row(table: Table, operation: Operation, row: Mapping[str, Value]) -> None:
    """The row against the declaration, before any statement: every column declared, the key
    given (and not null), an update setting something, a delete naming only the key."""
    for name in row:
        if name not in table.columns:
            shown = name[:MAX_SHOWN]
            raise invalid_argument(
                f"row.{shown}", f"not a column of table {table.name!r} (its columns: {', '.join(table.columns)})"
            )
    for name in table.key:
        value = row.get(name)
        if value is None:
            raise invalid_argument(f"row.{name}", f"the key column is required (table {table.name!r} key: {', '.join(table.key)})")
        if isinstance(value, (dict, list)):
            raise invalid_argument(f"row.{name}", "a key value is a string, a number or a boolean")
    if operation is Operation.UPDATE and all(name in table.key for name in row):
        raise invalid_argument("row", f"an update sets at least one column besides the key ({', '.join(table.key)})")
    if operation is Operation.DELETE:
        for name in row:
            if name not in table.key:
                raise invalid_argument(f"row.{name}", f"a delete names only the key columns ({', '.join(table.key)})")


def check_mailbox(write: MailboxWrite) -> None:
    """Names a backend can store as they are (the service checks sizes and headers too)."""
    if not NAME.fullmatch(write.mailbox):
        raise invalid_argument("mailbox", "must be 1 to 249 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
    if write.destination and not NAME.fullmatch(write.destination):
        raise invalid_argument("destination", "must be 1 to 249 of A-Z a-z 0-9 . _ -, starting with a letter or digit")


def quoted(identifier: str) -> str:
    """A validated identifier as SQL (both backends quote with double quotes)."""
    if not IDENTIFIER.fullmatch(identifier):  # never reached with a declared Table: a last guard
        raise ValueError(f"not an identifier: {identifier!r}")
    return f'"{identifier}"'


# --- Errors every backend reports the same way ---------------------------------------------------


def no_row(table: Table, row: Mapping[str, Value]) -> PrismError:
    key = ", ".join(f"{k}={row.get(k)!r}" for k in table.key)
    return PrismError(grpc.StatusCode.NOT_FOUND, f"table {table.name!r} has no row with {key}; nothing was written")


def row_exists(table: Table, row: Mapping[str, Value]) -> PrismError:
    key = ", ".join(f"{k}={row.get(k)!r}" for k in table.key)
    return PrismError(grpc.StatusCode.ALREADY_EXISTS, f"table {table.name!r} already has a row with {key}")


def key_reused() -> PrismError:
    return PrismError(
        grpc.StatusCode.ALREADY_EXISTS,
        "idempotencyKey: already used by a different write in this namespace",
        field="idempotencyKey",
    )


def schema_mismatch(table: Table, problem: str) -> PrismError:
    return PrismError(grpc.StatusCode.FAILED_PRECONDITION, f"table {table.name!r}: {problem}")


def conflict(detail: str) -> PrismError:
    return PrismError(grpc.StatusCode.ABORTED, f"the transaction conflicted with another ({detail}); retry it")


def too_many(limit: int) -> PrismError:
    return PrismError(
        grpc.StatusCode.RESOURCE_EXHAUSTED, f"{limit} transactions are open on this backend already; retry later"
    )


def timed_out(what: str, seconds: float) -> PrismError:
    return PrismError(grpc.StatusCode.DEADLINE_EXCEEDED, f"{what}: no commit within {seconds:g}s; rolled back")


def unavailable(backend: str, exc: BaseException) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, f"{backend} backend unavailable: {type(exc).__name__}")


# --- Interactive transactions ---------------------------------------------------------------------


class State(StrEnum):
    OPEN = "open"
    COMMITTED = "committed"
    ROLLED_BACK = "rolled back"


_ENDING: set[asyncio.Task[None]] = set()  # rollbacks under way, kept from the garbage collector


class Transaction(ABC):
    """An open database transaction on a connection of its own.

    The lifecycle lives here, once for every backend: one step at a time (a lock: a connection
    runs one statement at a time), each bounded by the deadline; any failed step, a cancelled
    caller or the deadline ends it with a rollback that runs to its end even if the caller is
    cancelled again (a task of its own); a rollback that fails abandons the connection (the
    server then rolls back) rather than return it to a pool inside a transaction. A backend
    supplies the statements: ``_data``, ``_mailbox``, ``_commit``, ``_rollback``, and
    ``_release`` (give the connection back), ``_abandon`` (close it without a word) and
    ``_interrupt`` (stop a statement the caller stopped waiting for)."""

    def __init__(self, timeout: float) -> None:
        loop = asyncio.get_running_loop()
        self.id = uuid.uuid4().hex
        self.timeout = timeout
        self.deadline = loop.time() + timeout  # loop time
        self.state = State.OPEN
        self.finished = asyncio.Event()  # set once ended and the connection given back
        self._why: PrismError | None = None  # what ended it, for the calls after
        self._lock = asyncio.Lock()
        self._ending: asyncio.Task[None] | None = None
        self._timer = loop.call_at(self.deadline, self._expire)

    # The contract.

    @property
    def open(self) -> bool:
        return self.state is State.OPEN

    async def data(self, write: DataWrite) -> int:
        """Apply one data write; the rows it affected (0 or 1)."""

        async def checked() -> int:
            check_row(write.table, write.operation, write.row)  # a refused row fails the step too
            return await self._data(write)

        return await self._step(checked)

    async def mailbox(self, write: MailboxWrite) -> int:
        """Add a mailbox row; its sequence in the mailbox."""

        async def checked() -> int:
            check_mailbox(write)
            return await self._mailbox(write)

        return await self._step(checked)

    async def commit(self) -> int:
        """Commit; the commit time (unix ns). A failed commit has rolled back."""
        return await self._step(self._commit, last=True)

    async def rollback(self) -> None:
        """Roll back (idempotent; nothing after a commit). Returns once the connection is back."""
        async with self._lock:
            if self.open:
                self._end(None)
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Until the transaction has ended and its connection is released."""
        if self._ending is not None:
            await asyncio.shield(self._ending)

    async def __aenter__(self) -> Transaction:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.rollback()

    # The lifecycle.

    async def _step(self, op: Callable[[], Awaitable[T]], *, last: bool = False) -> T:
        async with self._lock:
            self._refuse_unless_open()
            try:
                async with asyncio.timeout_at(self.deadline):
                    result = await op()
            except TimeoutError:
                self._interrupt()
                error = timed_out(f"transaction {self.id}", self.timeout)
            except PrismError as exc:
                error = exc
            except asyncio.CancelledError:  # the caller left mid-statement: roll back, then let it go
                self._interrupt()
                await asyncio.shield(self._end(PrismError.cancelled()))
                raise
            except Exception as exc:  # a driver error the backend did not map: a bug, logged
                log.exception("transaction step failed")
                error = internal()
                error.__cause__ = exc
            else:
                if last:
                    self.state = State.COMMITTED
                    await asyncio.shield(self._end_task(rollback=False))
                return result
            await asyncio.shield(self._end(error))
            raise error

    def _refuse_unless_open(self) -> None:
        if self.state is State.OPEN:
            return
        why = self._why
        if why is not None and why.code == grpc.StatusCode.DEADLINE_EXCEEDED:
            raise PrismError(why.code, why.message)
        raise PrismError(grpc.StatusCode.FAILED_PRECONDITION, f"transaction {self.id} is {self.state.value}")

    def _end(self, why: PrismError | None) -> asyncio.Task[None]:
        """Mark it rolled back now (later calls are refused at once) and roll back in a task of
        its own, which a cancelled caller cannot interrupt."""
        if self.state is State.OPEN:
            self.state = State.ROLLED_BACK
            self._why = why
        return self._end_task(rollback=True)

    def _end_task(self, *, rollback: bool) -> asyncio.Task[None]:
        if self._ending is None:
            self._timer.cancel()
            self._ending = asyncio.get_running_loop().create_task(self._finish(rollback))
            _ENDING.add(self._ending)
            self._ending.add_done_callback(_ENDING.discard)
        return self._ending

    async def _finish(self, rollback: bool) -> None:
        try:
            if rollback:
                try:
                    async with asyncio.timeout(ROLLBACK_SECONDS):
                        await self._rollback()
                except Exception as exc:
                    log.warning("transaction %s: rollback failed (%s: %s); closing its connection", self.id, type(exc).__name__, exc)
                    self._abandon()
        finally:
            try:
                await self._release()
            except Exception:
                log.exception("transaction %s: releasing its connection failed", self.id)
            self.finished.set()

    def _expire(self) -> None:
        """The deadline passed: roll back, whether or not a step is waiting (it times out too)."""
        task = asyncio.get_running_loop().create_task(self._expire_now())
        _ENDING.add(task)
        task.add_done_callback(_ENDING.discard)

    async def _expire_now(self) -> None:
        async with self._lock:
            if self.open:
                await asyncio.shield(self._end(timed_out(f"transaction {self.id}", self.timeout)))

    # What a backend supplies.

    @abstractmethod
    async def _data(self, write: DataWrite) -> int: ...

    @abstractmethod
    async def _mailbox(self, write: MailboxWrite) -> int: ...

    @abstractmethod
    async def _commit(self) -> int: ...

    @abstractmethod
    async def _rollback(self) -> None: ...

    @abstractmethod
    async def _release(self) -> None:
        """Give the connection back (after a commit or a rollback, or after ``_abandon``)."""

    @abstractmethod
    def _abandon(self) -> None:
        """Close the connection at once: the server rolls back what it held."""

    def _interrupt(self) -> None:
        """Stop the statement under way, if the backend can (the caller stopped waiting)."""


# --- Calls that go together ------------------------------------------------------------------------

Item = TypeVar("Item")


class Batcher(Generic[Item, T]):
    """Calls that arrive while one runs go together in the next, so a burst costs one round trip
    (one transaction) instead of one each — group commit. ``run`` takes the items and returns
    one outcome per item, in order: its result, or the exception that call raises; an exception
    ``run`` raises is every item's. At most one ``run`` is under way at a time, so there is no
    added wait when calls come one by one. A call cancelled before its batch started is left
    out; one cancelled later is not stopped (its outcome is dropped)."""

    def __init__(self, run: Callable[[list[Item]], Awaitable[Sequence[T | BaseException]]], name: str) -> None:
        self._run = run
        self._name = name
        self._pending: list[tuple[Item, asyncio.Future[T]]] = []
        self._task: asyncio.Task[None] | None = None

    def submit(self, item: Item) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._pending.append((item, future))
        if self._task is None:
            self._task = loop.create_task(self._drain(), name=self._name)
        return future

    async def _drain(self) -> None:
        try:
            while self._pending:
                batch = [(item, future) for item, future in self._pending if not future.done()]
                self._pending = []
                if not batch:
                    continue
                try:
                    outcomes: Sequence[T | BaseException] = await self._run([item for item, _ in batch])
                except BaseException as exc:
                    for _, future in batch:
                        if future.done():
                            continue
                        if isinstance(exc, asyncio.CancelledError):
                            future.cancel()
                        else:
                            future.set_exception(exc)
                    if isinstance(exc, asyncio.CancelledError):
                        raise
                    continue
                for (_, future), outcome in zip(batch, outcomes, strict=True):
                    if future.done():  # its caller left meanwhile
                        continue
                    if isinstance(outcome, BaseException):
                        future.set_exception(outcome)
                    else:
                        future.set_result(outcome)
        finally:
            self._task = None
            pending, self._pending = self._pending, []
            for _, future in pending:  # only when cancelled (the adapter closing): they end too
                future.cancel()


# --- Wake-ups for the listener ---------------------------------------------------------------------


class Changes:
    """One listener's wake-ups. ``arm`` before looking at the mailboxes, then ``wait``: it
    returns at once when a change came since (none is lost between a look and the wait), else
    at the next change or after ``seconds``. ``close`` when done."""

    def __init__(self, watchers: Watchers) -> None:
        self._watchers = watchers
        self._event = asyncio.Event()

    def arm(self) -> None:
        self._event.clear()

    def notify(self) -> None:
        self._event.set()

    async def wait(self, seconds: float) -> bool:
        """Whether a change came (False: ``seconds`` passed without one)."""
        # asyncio.timeout, not wait_for: see LeasingConsumer.__anext__ (adapters/queue/base.py).
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(max(0.0, seconds)):
                await self._event.wait()
        return self._event.is_set()

    async def close(self) -> None:
        await self._watchers.remove(self)


class Watchers:
    """The :class:`Changes` an adapter handed out, and the task that notices other processes'
    commits (``follow``: a backend's LISTEN connection or file watch) while any is open, so an
    adapter nobody watches costs nothing."""

    def __init__(self, follow: Callable[[Watchers], Awaitable[None]]) -> None:
        self._follow = follow
        self._open: set[Changes] = set()
        self._task: asyncio.Task[None] | None = None

    def notify(self) -> None:
        """Wake every listener of this adapter (a commit here, or one another process made)."""
        for changes in self._open:
            changes.notify()

    async def add(self) -> Changes:
        changes = Changes(self)
        changes.notify()  # rows committed before it was watched are waiting too
        self._open.add(changes)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._follow(self), name="transact-changes")
        return changes

    async def remove(self, changes: Changes) -> None:
        self._open.discard(changes)
        if not self._open:
            await self.close()

    async def close(self) -> None:
        self._open.clear()
        if self._task is not None:
            task, self._task = self._task, None
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    @property
    def watched(self) -> bool:
        return bool(self._open)


class TransactAdapter(ABC):
    """Data rows and mailbox rows in one transaction, isolated by namespace (mailboxes and
    idempotency keys; data tables are shared by every namespace that declares them)."""

    capabilities: ClassVar[frozenset[Capability]]

    async def start(self) -> None:
        """Nothing is created until a table is prepared or a write comes: a backend that serves
        no Transact namespace gets no Transact tables."""

    async def close(self) -> None:
        """Roll back every open transaction; release what the adapter opened (never the shared
        connection)."""

    @abstractmethod
    async def prepare(self, table: Table) -> None:
        """Check the declaration against the real table (creating it first with ``create``):
        FAILED_PRECONDITION naming what does not match. Idempotent; ``write`` and ``data``
        prepare a table on first use."""

    @abstractmethod
    async def write(
        self,
        namespace: str,
        data: DataWrite,
        mailbox: MailboxWrite,
        *,
        isolation: Isolation,
        time_limit: float,
        idempotency_key: str = "",
        fingerprint: bytes = b"",
    ) -> WriteResult:
        """The data write and the mailbox row in one transaction (rule 4)."""

    @abstractmethod
    async def begin(self, namespace: str, *, isolation: Isolation, time_limit: float) -> Transaction:
        """An interactive transaction, rolled back unless committed within ``timeout`` seconds."""

    @abstractmethod
    async def mailbox_rows(self, namespace: str, mailbox: str, after: int = 0, limit: int = 100) -> Sequence[MailboxRow]:
        """Committed rows of a mailbox with a sequence above ``after``, in sequence order."""

    # The listener's side (rule 6).

    @abstractmethod
    async def claim(
        self, holder: str, routes: Routes, *, lease: float, rows: int, max_bytes: int, mailboxes: int
    ) -> Claim:
        """Lease mailboxes of ``routes`` with undelivered rows and no live lease to ``holder``
        for ``lease`` seconds; their lowest undelivered rows (rule 6)."""

    @abstractmethod
    async def mark_delivered(
        self,
        holder: str,
        namespace: str,
        mailbox: str,
        sequences: Sequence[int],
        *,
        retry_after: float = 0.0,
        failure: Failure | None = None,
    ) -> None:
        """Stamp ``delivered_ns`` on ``sequences`` (a run of a claim's rows, from its first; may
        be empty), record ``failure`` on the row after them (rule 7) and give the mailbox back,
        to be claimed again at once or after ``retry_after`` seconds."""

    @abstractmethod
    async def delete_delivered(self, namespace: str, *, before_ns: int, limit: int) -> int:
        """Delete at most ``limit`` rows of ``namespace`` delivered before ``before_ns`` (unix
        ns), oldest first; how many (rule 7). Undelivered and dead-lettered rows stay."""

    @abstractmethod
    async def watch(self) -> Changes:
        """Wake-ups when a mailbox row may have been committed (close it when done)."""
