"""TransactService: a data row and a mailbox row committed together (RFC §5.5, data flow §7.2),
requests checked here, transactions run by any Transact adapter (``adapters/transact/base.py``
says what every backend guarantees).

Which tables a session may write is server configuration only (``transact.<namespace>`` in
``app/settings.py``): a session's namespace names its tables, their backend, the isolation level
and the timeout. A client never names a column or a table the configuration does not declare.
Where the mailbox listener delivers its rows (``app/listener.py``) is configuration too: a
namespace that routes its mailboxes refuses, at Write, a row the listener could not deliver — a
mailbox with no route, a PubSub destination that is not a subject, the listener's own headers.

Write is one call, one transaction. Transaction is a bidirectional stream:

    client                         gateway
    Begin{timeout_ms}      ──►     begin (a connection of its own)   ──► transaction_id
    DataWrite              ──►     one statement                     ──► rows_affected
    MailboxWrite           ──►     one mailbox row                   ──► mailbox_sequence
    Commit | Rollback      ──►     commit | rollback                 ──► committed_at | rolled_back, end
    (stream ends early)            rollback                          ──► rolled_back, end
    (disconnect, timeout, error, session closed)  rollback, the error ends the stream
"""

from __future__ import annotations

import asyncio
import hashlib
import math
import uuid
from collections.abc import AsyncIterator, Callable, Mapping

import grpc
from google.protobuf import struct_pb2

from adapters.backends import Adapter
from adapters.pubsub.subjects import parse_subject
from adapters.transact.base import (
    MAILBOX_HEADER,
    NAME,
    RESERVED_HEADER_PREFIX,
    SEQUENCE_HEADER,
    DataWrite,
    MailboxWrite,
    Operation,
    Table,
    TransactAdapter,
    Value,
    timed_out,
)
from app.pipeline import Call
from app.services.queue import HEADER_NAME, MAX_HEADER_BYTES, MAX_HEADERS
from app.settings import Settings, SettingsError, TransactNamespace
from app.tracing import Tracing
from prism.errors import PrismError, failed_precondition, invalid_argument, prefixed, too_large
from prism.v1 import config_pb2
from prism.v1 import transact_pb2 as t

# The adapter behind a session's configuration (``Backends.for_transact``).
TransactAdapters = Callable[[config_pb2.ClientConfig], TransactAdapter]

OPERATIONS = {
    t.WRITE_OPERATION_UNSPECIFIED: Operation.UPSERT,
    t.WRITE_OPERATION_INSERT: Operation.INSERT,
    t.WRITE_OPERATION_UPSERT: Operation.UPSERT,
    t.WRITE_OPERATION_UPDATE: Operation.UPDATE,
    t.WRITE_OPERATION_DELETE: Operation.DELETE,
}
MAX_IDEMPOTENCY_KEY_CHARS = 256
LISTENER_HEADERS = (MAILBOX_HEADER, SEQUENCE_HEADER)  # what the listener adds to a row's headers
MAX_SAFE_INTEGER = 2**53  # a JSON number beyond it is not an exact integer
MAX_SHOWN = 64  # characters of a client's table name repeated in an error


def _value(value: struct_pb2.Value, field: str) -> Value:
    """A Struct value as the adapters take it: integral numbers as int (so an integer column
    reads "3", not "3.0"), nested objects and lists kept for JSON."""
    kind = value.WhichOneof("kind")
    if kind == "number_value":
        number = value.number_value
        if not math.isfinite(number):
            raise invalid_argument(field, "not a finite number")
        return int(number) if number.is_integer() and abs(number) <= MAX_SAFE_INTEGER else number
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    if kind == "struct_value":
        return {k: _value(v, f"{field}.{k}") for k, v in value.struct_value.fields.items()}
    if kind == "list_value":
        return [_value(v, f"{field}[{i}]") for i, v in enumerate(value.list_value.values)]
    return None  # null_value, or no kind at all


def _prefixed(error: PrismError, prefix: str) -> PrismError:
    """An adapter's refusal of ``row.<column>`` as the client spells it (``data.row.total``)."""
    return prefixed(error, prefix) if (error.field or "").startswith("row") else error


class TransactService:
    SERVICE = "prism.v1.TransactService"

    def __init__(self, adapters: TransactAdapters, settings: Settings) -> None:
        self.adapters = adapters
        self.settings = settings
        self.limits = settings.limits
        self.patterns = {c.name: c.pattern for c in settings.configs}  # a mailbox route's QUEUE or PUBSUB
        self.traced = settings.tracing.exporter != "none"  # as Tracing.of decides: off, no trace to carry
        self.tables: dict[tuple[str, str], Table] = {
            (namespace, name): spec.table(name)
            for namespace, spec in settings.transact.items()
            for name in spec.tables
        }

    async def prepare(self, adapters: Mapping[str, Adapter]) -> None:
        """At start-up: every declared table against the real one (created first where the
        declaration says so). One that does not match stops the gateway, naming its key."""
        for namespace, spec in self.settings.transact.items():
            adapter = adapters.get(spec.backend)
            if not isinstance(adapter, TransactAdapter):
                raise SettingsError(f"transact.{namespace}.backend: backend {spec.backend!r} serves no TRANSACT")
            for name in spec.tables:
                try:
                    await adapter.prepare(self.tables[(namespace, name)])
                except PrismError as exc:
                    raise SettingsError(f"transact.{namespace}.tables.{name}: {exc.message}") from None

    # --- Requests --------------------------------------------------------------------------------

    def _target(self, call: Call) -> tuple[TransactAdapter, str, TransactNamespace]:
        config = call.config
        namespace = config.namespace
        if problem := self.settings.transact_problem(namespace, config.backend.instance):
            raise failed_precondition(problem)
        return self.adapters(config), namespace, self.settings.transact[namespace]

    def _data(self, message: t.DataWrite, namespace: str, at: str) -> DataWrite:
        """The data write as the adapter takes it; refusals name ``at`` + the field."""
        table = self.tables.get((namespace, message.table))
        if table is None:
            known = ", ".join(name for ns, name in sorted(self.tables) if ns == namespace)
            raise invalid_argument(
                f"{at}table", f"namespace {namespace!r} has no table {message.table[:MAX_SHOWN]!r} (its tables: {known})"
            )
        operation = OPERATIONS.get(message.operation)
        if operation is None:
            raise invalid_argument(f"{at}operation", f"unknown operation {message.operation}")
        if (size := message.row.ByteSize()) > self.limits.max_value_bytes:
            raise too_large(f"{at}row", size, self.limits.max_value_bytes)
        row = {name: _value(value, f"{at}row.{name[:MAX_SHOWN]}") for name, value in message.row.fields.items()}
        return DataWrite(table, operation, row)

    def _mailbox(self, message: t.MailboxWrite, namespace: str, at: str) -> MailboxWrite:
        if not NAME.fullmatch(message.mailbox):
            raise invalid_argument(f"{at}mailbox", "must be 1 to 249 of A-Z a-z 0-9 . _ -, starting with a letter or digit")
        if message.destination and not NAME.fullmatch(message.destination):
            raise invalid_argument(
                f"{at}destination", "a Queue topic or PubSub subject: 1 to 249 of A-Z a-z 0-9 . _ -, starting with a letter or digit"
            )
        self._check_route(message, namespace, at)
        if len(message.payload) > self.limits.max_value_bytes:
            raise too_large(f"{at}payload", len(message.payload), self.limits.max_value_bytes)
        # The listener delivers headers as Queue and PubSub messages carry them: the same rules,
        # with room for the two it adds.
        most = MAX_HEADERS - len(LISTENER_HEADERS)
        if len(message.headers) > most:
            raise invalid_argument(f"{at}headers", f"{len(message.headers)} headers, above the maximum of {most}")
        size = 0
        for name, value in sorted(message.headers.items()):
            if not HEADER_NAME.fullmatch(name):
                raise invalid_argument(f"{at}headers[{name[:MAX_SHOWN]}]", "a header name is 1 to 256 of A-Z a-z 0-9 . _ -")
            if name.lower().startswith(RESERVED_HEADER_PREFIX):
                raise invalid_argument(f"{at}headers[{name}]", f"{RESERVED_HEADER_PREFIX}* headers are the mailbox listener's")
            if any(c in value for c in "\r\n\x00"):
                raise invalid_argument(f"{at}headers[{name}]", "a header value cannot hold CR, LF or NUL")
            size += len(name) + len(value.encode())
        if size > MAX_HEADER_BYTES:
            raise invalid_argument(f"{at}headers", f"{size} bytes, above the maximum of {MAX_HEADER_BYTES}")
        headers = dict(message.headers)
        # The call's trace travels with the row to whoever the listener delivers it to (a
        # client's own traceparent wins; with tracing off there is no trace to add).
        if self.traced:
            Tracing.inject(headers)
        return MailboxWrite(message.mailbox, message.payload, headers, message.destination)

    def _check_route(self, message: t.MailboxWrite, namespace: str, at: str) -> None:
        """A namespace whose mailboxes are delivered: the mailbox has a route, and a PubSub
        destination is a subject (a row its destination would refuse would block its mailbox)."""
        spec = self.settings.transact[namespace]
        if not spec.delivered:
            return  # the rows stay in the mailbox table for a reader of its own
        route = spec.route(message.mailbox)
        if route is None:
            known = ", ".join(sorted(spec.mailboxes))
            raise invalid_argument(
                f"{at}mailbox", f"namespace {namespace!r} delivers only mailboxes {known}, not {message.mailbox[:MAX_SHOWN]!r}"
            )
        if self.patterns[route] == "PUBSUB":
            parse_subject(message.destination or message.mailbox, f"{at}destination" if message.destination else f"{at}mailbox")

    # --- Write -----------------------------------------------------------------------------------

    async def Write(self, request: t.WriteRequest, call: Call) -> t.WriteResponse:
        """The data write and the mailbox row in one transaction; with an idempotency key, a
        retry answers the first result with ``replayed``."""
        adapter, namespace, spec = self._target(call)
        for name in ("data", "mailbox"):
            if not request.HasField(name):
                raise invalid_argument(name, "is required: a Write commits a data row and a mailbox row together")
        data = self._data(request.data, namespace, "data.")
        mailbox = self._mailbox(request.mailbox, namespace, "mailbox.")
        key = request.idempotency_key
        if len(key) > MAX_IDEMPOTENCY_KEY_CHARS:
            raise invalid_argument("idempotencyKey", f"longer than {MAX_IDEMPOTENCY_KEY_CHARS} characters")
        fingerprint = b""
        if key:  # what a retry must repeat exactly: the request without its key
            unkeyed = t.WriteRequest(data=request.data, mailbox=request.mailbox)
            fingerprint = hashlib.sha256(unkeyed.SerializeToString(deterministic=True)).digest()
        try:
            result = await adapter.write(
                namespace,
                data,
                mailbox,
                isolation=spec.isolation,
                time_limit=spec.timeout_seconds,
                idempotency_key=key,
                fingerprint=fingerprint,
            )
        except PrismError as exc:
            raise _prefixed(exc, "data.") from None
        response = t.WriteResponse(mailbox_sequence=result.mailbox_sequence, replayed=result.replayed)
        response.committed_at.FromNanoseconds(result.committed_ns)
        return response

    # --- Transaction -----------------------------------------------------------------------------

    @staticmethod
    def _timeout(begin: t.TransactionRequest.Begin, spec: TransactNamespace) -> float:
        """Begin's timeout, which may only shorten the namespace's."""
        most = spec.timeout_seconds
        if begin.timeout_ms < 0:
            raise invalid_argument("begin.timeoutMs", f"must not be negative (0: this namespace's {most:g}s)")
        if begin.timeout_ms == 0:
            return most
        if begin.timeout_ms / 1000 > most:
            raise invalid_argument("begin.timeoutMs", f"above this namespace's maximum of {round(most * 1000)} ms")
        return begin.timeout_ms / 1000

    async def Transaction(
        self, requests: AsyncIterator[t.TransactionRequest], call: Call
    ) -> AsyncIterator[t.TransactionResponse]:
        """Begin first, then writes, then Commit or Rollback. Anything else ends it rolled back:
        the request stream ending (answered ``rolled_back``), an error, the timeout, the client
        leaving (the transport cancels this generator) or the session ending."""
        adapter, namespace, spec = self._target(call)
        assert call.session is not None
        loop = asyncio.get_running_loop()
        ended: asyncio.Future[PrismError] = loop.create_future()  # the session's status, once it ends

        async def end(status: PrismError | None) -> None:
            if not ended.done():
                ended.set_result(status or PrismError(grpc.StatusCode.ABORTED, "the stream was ended; rolled back"))

        stream = uuid.uuid4().hex
        call.session.hold_stream(stream, end)
        transaction = None
        try:
            first = await _next(requests, loop.time() + spec.timeout_seconds, ended)
            if first is None:
                return  # the client closed without beginning: nothing to undo
            if first.WhichOneof("step") != "begin":
                raise invalid_argument("begin", "the first request must be begin")
            timeout = self._timeout(first.begin, spec)
            transaction = await adapter.begin(namespace, isolation=spec.isolation, time_limit=timeout)
            yield t.TransactionResponse(transaction_id=transaction.id)
            while True:
                request = await _next(requests, transaction.deadline, ended, f"transaction {transaction.id}", timeout)
                step = request.WhichOneof("step") if request is not None else None
                if request is None or step == "rollback":
                    await transaction.rollback()
                    yield t.TransactionResponse(rolled_back=True)
                    return
                if step == "data":
                    try:
                        rows = await transaction.data(self._data(request.data, namespace, "data."))
                    except PrismError as exc:
                        raise _prefixed(exc, "data.") from None
                    yield t.TransactionResponse(rows_affected=rows)
                elif step == "mailbox":
                    sequence = await transaction.mailbox(self._mailbox(request.mailbox, namespace, "mailbox."))
                    yield t.TransactionResponse(mailbox_sequence=sequence)
                elif step == "commit":
                    response = t.TransactionResponse()
                    response.committed_at.FromNanoseconds(await transaction.commit())
                    yield response
                    return
                elif step == "begin":
                    raise invalid_argument("begin", f"transaction {transaction.id} has begun already")
                else:
                    raise invalid_argument("step", "one of begin, data, mailbox, commit or rollback is required")
        finally:
            call.session.release_stream(stream)
            if transaction is not None:
                # Whatever ended the stream (an error, a cancelled client, a closed generator):
                # nothing stays open. A no-op after a commit or a rollback.
                await asyncio.shield(transaction.rollback())


async def _next(
    requests: AsyncIterator[t.TransactionRequest],
    deadline: float,
    ended: asyncio.Future[PrismError],
    what: str = "begin",
    seconds: float | None = None,
) -> t.TransactionRequest | None:
    """The next request; None when the client closed its side. Waiting ends at ``deadline``
    (DEADLINE_EXCEEDED) or when the session ends (its status)."""
    loop = asyncio.get_running_loop()
    read: asyncio.Future[t.TransactionRequest | None] = asyncio.ensure_future(anext(requests, None))
    try:
        await asyncio.wait({read, ended}, timeout=max(0.0, deadline - loop.time()), return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not read.done():
            read.cancel()
            await asyncio.wait({read})  # let it unwind before the request stream is closed
    if ended.done():
        if read.done() and not read.cancelled():
            read.exception()  # seen: the session's end is what the client hears
        raise ended.result()
    if read.done() and not read.cancelled():
        return read.result()  # a request, or a PrismError for one that could not be read
    if what == "begin":
        raise PrismError(grpc.StatusCode.DEADLINE_EXCEEDED, "begin: none arrived within the namespace's timeout")
    raise timed_out(what, seconds or 0)
