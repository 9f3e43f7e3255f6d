"""ReaderService: requests checked here (collection, projection, order, filter, page bounds,
cursor), rows read by any Reader adapter (``adapters/reader/base.py`` says what every backend
guarantees).

Read and Query are async generators of pages, read one page ahead: while the transport sends a
page, the next one is fetched, and the one after only once the transport asks for it, which it
does once the previous one is sent (gRPC and HTTP/2 flow control, the ASGI server's ``send``).
So a stream holds at most two pages however long it is, and a slow client slows the reads
rather than filling memory; a fast one gets the database's reading and the gateway's sending
at the same time. A page ends at ``pageSize`` rows, or earlier
when the next row would take the encoded page past ``maxPageBytes`` (a page holds at least one
row, so a stream always advances). The stream ends after the last page (empty
``nextCursor``), or when the request's deadline (``reader.deadline_seconds``) leaves no time for
the next page: it then ends with an empty page whose ``nextCursor`` resumes where it stopped.

Pages are built from the adapter's columns (``Batch``) by ``app/services/reader_pages.py``,
which encodes them for the transport that sends them (protobuf, or JSON for SSE and Connect)
with no protobuf Struct built per row.

A cursor is the position of the last row sent, signed (``app/services/cursors.py``) for the
namespace and backend of the session and bound to the collection, filter and order; a cursor
altered, expired, or sent with another filter or order is INVALID_ARGUMENT naming ``cursor``.
Projection and page bounds may change between pages.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import grpc
from google.protobuf import struct_pb2

from adapters.reader.base import (
    MAX_SHOWN,
    ORDERED,
    AllOf,
    AnyOf,
    Batch,
    Collection,
    Condition,
    Filter,
    Json,
    Kind,
    Op,
    Plan,
    Query,
    ReaderAdapter,
    Schema,
    SortKey,
    complete_order,
    describe,
    operand,
)
from app.pipeline import Call
from app.services.cursors import Cursors
from app.services.reader_pages import EncodedPage, PageRows
from app.settings import Reader as ReaderSettings
from prism.errors import PrismError, invalid_argument, not_found, unauthenticated
from prism.v1 import config_pb2
from prism.v1 import reader_pb2 as r

# The adapter behind a session's configuration (``Backends.for_reader``).
Readers = Callable[[config_pb2.ClientConfig], ReaderAdapter]

OPS = {
    r.FILTER_OPERATOR_EQ: Op.EQ,
    r.FILTER_OPERATOR_NE: Op.NE,
    r.FILTER_OPERATOR_LT: Op.LT,
    r.FILTER_OPERATOR_LTE: Op.LTE,
    r.FILTER_OPERATOR_GT: Op.GT,
    r.FILTER_OPERATOR_GTE: Op.GTE,
    r.FILTER_OPERATOR_IN: Op.IN,
    r.FILTER_OPERATOR_PREFIX: Op.PREFIX,
}
# Bounds on a filter, so its SQL stays small whatever a client sends.
MAX_CONDITIONS = 64
MAX_IN_VALUES = 1000
MAX_FILTER_DEPTH = 8
MAX_CURSOR_CHARS = 64 * 1024
CURSOR_RESERVE = 256  # bytes of a page's budget kept for its cursor until the real one is known


def _shown(text: str) -> str:
    return repr(text[:MAX_SHOWN] + ("…" if len(text) > MAX_SHOWN else ""))


class _Request:
    """One Read, Query or Count, checked: the adapter, the compiled plan and the cursor scope."""

    def __init__(self, adapter: ReaderAdapter, plan: Plan, scope: str, query: Any) -> None:
        self.adapter, self.plan, self.scope, self.query = adapter, plan, scope, query


class ReaderService:
    SERVICE = "prism.v1.ReaderService"

    def __init__(self, readers: Readers, settings: ReaderSettings, key: bytes) -> None:
        self.readers = readers
        self.settings = settings
        self.cursors = Cursors(key, settings.cursor_ttl_seconds)
        self.collections: dict[tuple[str, str], Collection] = {
            (namespace, name): settings.collection(namespace, name)
            for namespace, collections in settings.collections.items()
            for name in collections
        }

    # --- checking a request ---------------------------------------------------------------------

    def _collection(self, call: Call, name: str) -> Collection:
        namespace = call.config.namespace
        found = self.collections.get((namespace, name))
        if found is None:
            known = sorted(n for ns, n in self.collections if ns == namespace)
            raise not_found(
                f"no collection {_shown(name)} in namespace {namespace!r} (known: {', '.join(known) or 'none'})"
            )
        return found

    @staticmethod
    def _field(schema: Schema, name: str, where: str) -> str:
        if name not in schema.columns:
            readable = ", ".join(schema.columns)
            raise invalid_argument(
                where, f"{_shown(name)} is not a field of collection {schema.collection.name!r} (its fields: {readable})"
            )
        return name

    def _projection(self, schema: Schema, fields: list[str]) -> tuple[str, ...]:
        if not fields:
            return tuple(schema.columns)
        for i, name in enumerate(fields):
            self._field(schema, name, f"fields[{i}]")
            if name in fields[:i]:
                raise invalid_argument(f"fields[{i}]", f"{name!r} is named twice")
        return tuple(fields)

    def _order(self, schema: Schema, order_by: Any) -> tuple[SortKey, ...]:
        requested: list[SortKey] = []
        for i, key in enumerate(order_by):
            name = self._field(schema, key.field, f"orderBy[{i}].field")
            if any(k.field == name for k in requested):
                raise invalid_argument(f"orderBy[{i}].field", f"{name!r} is named twice")
            requested.append(SortKey(name, key.descending))
        return complete_order(schema, requested)

    def _filter(self, schema: Schema, message: r.Filter, where: str, depth: int, budget: list[int]) -> Filter:
        """The proto filter as the adapters take it, every operand typed for its field;
        INVALID_ARGUMENT naming the first bad part (``filter.and.filters[1].condition.value``)."""
        if depth > MAX_FILTER_DEPTH:
            raise invalid_argument(where, f"filters nest at most {MAX_FILTER_DEPTH} deep")
        kind = message.WhichOneof("kind")
        if kind is None:
            raise invalid_argument(where, "one of condition, and, or is required")
        if kind != "condition":
            inner = getattr(message, kind).filters
            if not inner:
                raise invalid_argument(f"{where}.{kind}.filters", "at least one filter")
            parts = tuple(
                self._filter(schema, f, f"{where}.{kind}.filters[{i}]", depth + 1, budget) for i, f in enumerate(inner)
            )
            return AllOf(parts) if kind == "and" else AnyOf(parts)
        budget[0] -= 1
        if budget[0] < 0:
            raise invalid_argument(where, f"a filter holds at most {MAX_CONDITIONS} conditions")
        return self._condition(schema, message.condition, f"{where}.condition")

    def _condition(self, schema: Schema, cond: r.FieldCondition, where: str) -> Condition:
        name = self._field(schema, cond.field, f"{where}.field")
        column = schema.columns[name]
        if cond.op == r.FILTER_OPERATOR_UNSPECIFIED:
            raise invalid_argument(f"{where}.op", "is required")
        op = OPS.get(cond.op)
        if op is None:
            raise invalid_argument(f"{where}.op", f"{cond.op} is not a filter operator")
        if op is Op.IN:
            if cond.HasField("value"):
                raise invalid_argument(f"{where}.value", "IN takes its operands in values")
            if len(cond.values) > MAX_IN_VALUES:
                raise invalid_argument(f"{where}.values", f"{len(cond.values)} values, above the maximum of {MAX_IN_VALUES}")
            typed = tuple(
                operand(column, _scalar(v, f"{where}.values[{i}]"), f"{where}.values[{i}]") for i, v in enumerate(cond.values)
            )
            return Condition(name, op, typed)
        if cond.values:
            raise invalid_argument(f"{where}.values", "only IN takes values; the others take value")
        if not cond.HasField("value"):
            raise invalid_argument(f"{where}.value", "is required (null to compare with null)")
        value = operand(column, _scalar(cond.value, f"{where}.value"), f"{where}.value")
        if value is None and (op in ORDERED or op is Op.PREFIX):
            raise invalid_argument(f"{where}.value", f"{op.value.upper()} needs a value: null is matched by EQ and NE")
        if op is Op.PREFIX and column.kind is not Kind.STRING:
            raise invalid_argument(f"{where}.op", f"PREFIX applies to string fields; {name!r} is {column.kind.value}")
        return Condition(name, op, value)

    def _page_bounds(self, page_size: int, max_page_bytes: int) -> tuple[int, int]:
        settings = self.settings
        if not 0 <= page_size <= settings.max_page_size:
            raise invalid_argument("pageSize", f"must be between 1 and {settings.max_page_size} (0: {settings.default_page_size})")
        if not 0 <= max_page_bytes <= settings.max_page_bytes:
            raise invalid_argument(
                "maxPageBytes", f"must be between 1 and {settings.max_page_bytes} (0: {settings.default_page_bytes})"
            )
        return page_size or settings.default_page_size, max_page_bytes or settings.default_page_bytes

    async def _checked(
        self, call: Call, collection: str, fields: Any, order_by: Any, filter_: r.Filter | None
    ) -> _Request:
        """The request's parts in the order a client reads the errors: collection, fields, order, filter."""
        adapter = self.readers(call.config)
        schema = await adapter.prepare(self._collection(call, collection))
        projection = self._projection(schema, list(fields))
        order = self._order(schema, order_by)
        typed = self._filter(schema, filter_, "filter", 1, [MAX_CONDITIONS]) if filter_ is not None else None
        plan = adapter.plan(schema, Query(projection, order, typed))
        config = call.config
        scope = f"reader\x00{config.namespace}\x00{config.backend.instance}"
        query = {"collection": collection, "filter": describe(typed), "order": [[k.field, k.descending] for k in order]}
        return _Request(adapter, plan, scope, query)

    def _start(self, checked: _Request, cursor: str) -> tuple[Any, ...] | None:
        if not cursor:
            return None
        if len(cursor) > MAX_CURSOR_CHARS:
            raise invalid_argument("cursor", "is not a cursor this gateway issued for this namespace")
        data = self.cursors.redeem(cursor, checked.scope, checked.query, field="cursor")
        return None if data is None else checked.adapter.decode_position(checked.plan, data)

    def _cursor(self, checked: _Request, position: tuple[Any, ...] | None) -> str:
        data = None if position is None else checked.adapter.encode_position(checked.plan, position)
        return self.cursors.issue(checked.scope, checked.query, data)

    # --- the RPCs -------------------------------------------------------------------------------

    async def Read(self, request: r.ReadRequest, call: Call) -> AsyncIterator[r.Page]:
        """The collection in pages, in the requested order (the key's by default)."""
        checked = await self._checked(call, request.collection, request.fields, request.order_by, None)
        # aclosing: the transport closing this stream closes the pages at once (releasing the
        # session's hold), not whenever the garbage collector finalizes them.
        async with contextlib.aclosing(
            self._pages(call, checked, request.cursor, request.page_size, request.max_page_bytes)
        ) as pages:
            async for page in pages:
                yield page

    async def Query(self, request: r.QueryRequest, call: Call) -> AsyncIterator[r.Page]:
        """The rows matching the filter in pages, in the requested order."""
        filter_ = request.filter if request.HasField("filter") else None
        checked = await self._checked(call, request.collection, request.fields, request.order_by, filter_)
        async with contextlib.aclosing(
            self._pages(call, checked, request.cursor, request.page_size, request.max_page_bytes)
        ) as pages:
            async for page in pages:
                yield page

    async def Count(self, request: r.CountRequest, call: Call) -> r.CountResponse:
        filter_ = request.filter if request.HasField("filter") else None
        checked = await self._checked(call, request.collection, (), (), filter_)
        timeout = asyncio.timeout(self.settings.deadline_seconds)
        try:
            async with timeout:
                return r.CountResponse(count=await checked.adapter.count(checked.plan))
        except TimeoutError:
            if not timeout.expired():
                raise
            raise PrismError(
                grpc.StatusCode.DEADLINE_EXCEEDED, f"count: no answer within {self.settings.deadline_seconds:g}s"
            ) from None

    async def _pages(
        self, call: Call, checked: _Request, cursor: str, page_size: int, max_page_bytes: int
    ) -> AsyncIterator[r.Page]:
        rows_per_page, page_bytes = self._page_bounds(page_size, max_page_bytes)
        position = self._start(checked, cursor)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.deadline_seconds
        ended: list[PrismError] = []  # the session's status, when closing or expiring it ends this read

        async def end(status: PrismError | None) -> None:
            ended.append(status or unauthenticated("the session's streams were ended"))

        stream_id = uuid.uuid4().hex
        assert call.session is not None
        call.session.hold_stream(stream_id, end)
        # The next page is read while this one is built and sent: one page ahead, no more (the
        # reads overlap the rest, and a client that stops reading stops them a page later).
        ahead: asyncio.Future[Batch | None] | None = None

        async def read_after(at: tuple[Any, ...] | None) -> asyncio.Future[Batch | None]:
            read = asyncio.ensure_future(self._fetch(checked, at, rows_per_page + 1, deadline - loop.time()))
            if checked.adapter.read_ahead_at_once:
                await asyncio.sleep(0)  # the read starts now (its statement sent), not once this page is sent
            return read

        try:
            batch = await self._fetch(checked, position, rows_per_page + 1, deadline - loop.time())
            while True:
                if ended:
                    raise ended[0]
                if batch is None:  # out of time: the client resumes from here
                    yield r.Page(next_cursor=self._cursor(checked, position))
                    return
                if len(batch) > rows_per_page:  # a full page, unless the byte budget cuts it
                    ahead = await read_after(batch.position(rows_per_page - 1))
                page, taken, more = self._page(checked, batch, rows_per_page, page_bytes)
                position = batch.position(taken - 1) if taken else None
                if ahead is not None and taken < rows_per_page:  # cut: read from where it ends
                    await _stopped(ahead)
                    ahead = None
                if more and ahead is None:
                    ahead = await read_after(position)
                yield page
                if ahead is None:
                    return
                batch, ahead = await ahead, None
        finally:
            if ahead is not None:  # the client left with a page on its way: stop reading it
                await _stopped(ahead)
            call.session.release_stream(stream_id)

    @staticmethod
    async def _fetch(checked: _Request, position: tuple[Any, ...] | None, limit: int, seconds: float) -> Batch | None:
        """The next rows, or None when they do not come within ``seconds``."""
        if seconds <= 0:
            return None
        timeout = asyncio.timeout(seconds)
        try:
            async with timeout:
                return await checked.adapter.batch(checked.plan, position, limit)
        except TimeoutError:
            if timeout.expired():
                return None
            raise

    def _page(
        self, checked: _Request, batch: Batch, rows_per_page: int, page_bytes: int
    ) -> tuple[r.Page | EncodedPage, int, bool]:
        """The page the rows fill within both bounds, how many rows it takes, and whether
        rows remain after it. Rows are taken while the encoded page stays within the budget
        less CURSOR_RESERVE (the first row always); then, should the real cursor take the page
        past ``page_bytes`` (long string sort keys), rows are given back."""
        count = min(len(batch), rows_per_page)
        if count == 0:  # no rows at all: the end
            return r.Page(), 0, False
        rows = PageRows(batch.fields, batch.columns, count, batch.types)
        taken = rows.fitting(page_bytes - CURSOR_RESERVE)
        more = taken < len(batch)
        cursor = ""
        if more:
            cursor = self._cursor(checked, batch.position(taken - 1))
            while not rows.within(taken, cursor, page_bytes) and taken > 1:
                taken -= 1
                cursor = self._cursor(checked, batch.position(taken - 1))
        return EncodedPage(rows, taken, cursor), taken, more


async def _stopped(read: asyncio.Future[Any]) -> None:
    """A read nobody will take, cancelled and waited for (a failure of it is nobody's error)."""
    read.cancel()
    await asyncio.wait([read])
    if not read.cancelled():
        read.exception()


def _scalar(value: struct_pb2.Value, where: str) -> Json:
    """A filter operand as plain JSON: null, a number, a string or a boolean."""
    kind = value.WhichOneof("kind")
    if kind == "null_value" or kind is None:
        return None
    if kind == "number_value":
        return value.number_value
    if kind == "string_value":
        return value.string_value
    if kind == "bool_value":
        return value.bool_value
    raise invalid_argument(where, "an operand is null, a number, a string or a boolean, not a list or an object")
