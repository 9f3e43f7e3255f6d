"""The Reader adapter contract: paged, filtered, sorted reads of the tables and views the server
configuration exposes as collections, with keyset pagination.

    Collection (configuration: name → table or view, key columns, readable fields)
        │ prepare(): checked once against the introspected schema → Schema (a kind per field)
        ▼
    plan(schema, Query)  filter, sort (the key appended as tie-breaker), projection → SQL, once
        │
        ├─ batch(plan, after, limit) the next ``limit`` rows strictly after position ``after``,
        │                            column by column (``rows``: the same, a Row each)
        └─ count(plan)               how many rows match the filter

Every backend gives these the same meaning; ``tests/conformance/test_reader_adapter.py`` checks
them against an adapter directly, ``tests/conformance/test_reader.py`` through the gateway.

1. **Collections by declaration only.** A :class:`Collection` names a table or view, its key
   (columns that identify one row: unique and not null) and the fields clients may read (the
   key among them). ``prepare`` checks it against the real schema: every field exists and has a
   supported type, and on a table the key is its primary key, or NOT NULL columns with a unique
   index on exactly them (a view's key is taken on trust). A mismatch is FAILED_PRECONDITION
   naming the collection, the table and the column. Names are validated identifiers, always
   quoted; the gateway's own tables (``prism_*``) are never exposed. Values are always bound
   parameters.
2. **Values.** Each field has a :class:`Kind`, from its column type; a value compares and sorts
   the same way on every backend:

   ========= ============================== ================================ =====================
   kind      PostgreSQL                     SQLite (declared type)           JSON
   ========= ============================== ================================ =====================
   integer   smallint, integer, bigint      INT…, not BOOL                   number (a string
                                                                             beyond ±2^53)
   number    real, double precision,        REAL, FLOAT, DOUBLE, NUMERIC,    number ("NaN",
             numeric                        DECIMAL                          "Infinity" strings)
   string    text, varchar                  TEXT, CHAR, VARCHAR, CLOB        string
   boolean   boolean                        BOOL, BOOLEAN (0 and 1)          true / false
   timestamp timestamptz, timestamp (UTC)   TIMESTAMP, DATETIME: UTC text    RFC 3339, UTC, µs:
                                            ``YYYY-MM-DDTHH:MM:SS.ffffffZ``  ``…T…:…:….ffffffZ``
   ========= ============================== ================================ =====================

   Numbers compare numerically, strings by Unicode code point (PostgreSQL compares with
   ``COLLATE "C"`` unless the column's collation is C already), booleans false before true,
   timestamps by instant (SQLite's canonical text sorts as the instant it names; other text in
   such a column is returned as stored and compares as text). **null** sorts before every value:
   first in ascending order, last in descending. A filter operand has the field's kind: an
   integer (a JSON number without fraction, or a decimal string, within int64), a finite number,
   a string without NUL, a boolean, or an RFC 3339 timestamp with an offset and at most
   microseconds; anything else is INVALID_ARGUMENT naming the operand.
3. **Filters.** ``eq v`` matches the field equal to ``v``; ``eq null`` matches null. ``ne v``
   matches everything ``eq v`` does not, null included (``ne null``: every non-null).
   ``lt lte gt gte`` compare with a non-null operand (null is refused) and never match null.
   ``in [v…]`` is ``eq`` any of them (null among them matches null; an empty list nothing).
   ``prefix p`` (string fields) matches strings that start with ``p``, by code point.
   ``and``/``or`` combine one or more filters.
4. **Order.** Rows come in the requested order of fields, each ascending or descending, then by
   the key columns not already in it, ascending: a total order, so a position (the sort values
   of a row) says exactly where a page ended. ``batch`` answers the rows strictly after the
   position, by a keyset condition on the sort fields — never OFFSET — so a page costs the
   same wherever it starts.
5. **Concurrent changes** between pages (each page is its own statement, reading what is
   committed when it runs). A row that exists throughout and keeps its sort values is returned
   exactly once, in its place. A row inserted meanwhile is returned once if it sorts after the
   position the next page starts from, else not at all. A deleted row is returned once if its
   page was read before the delete, else not at all. An update that leaves the sort values
   alone is returned once, as its page found it. An update that changes a sort value moves the
   row: it may then be returned twice (old and new place) or not at all — as a delete plus an
   insert. With the default order (the key) and keys that are never updated, no concurrent
   change loses or repeats a row.
6. **Positions** are the raw sort values of a row; ``encode_position`` makes them JSON for a
   cursor and ``decode_position`` checks them on the way back (INVALID_ARGUMENT ``cursor``).
7. **Giving up.** A caller cancelled while it waits for ``batch`` or ``count`` (its deadline, its
   client gone) stops the statement in the database, so the connection is free for the next.

Errors are :class:`~prism.errors.PrismError`, so no driver exception crosses the contract:
INVALID_ARGUMENT (an operand or a cursor the schema refuses), FAILED_PRECONDITION (a collection
that does not match its table), UNAVAILABLE (the database cannot be reached).
"""

from __future__ import annotations

import asyncio
import datetime
import math
import re
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, ClassVar

import grpc

from adapters.capabilities import Capability
from prism.errors import PrismError, invalid_argument

# Table, column and schema names: plain SQL identifiers, so quoting them is all it takes.
IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
RESERVED_PREFIX = "prism_"  # the gateway's own tables are never exposed
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
EXACT_DOUBLE = 2**53  # integers beyond ±this are returned as strings (a JSON number is a double)
MAX_SHOWN = 64  # characters of a client's text repeated in an error
RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt ](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?([Zz]|[+-]\d{2}:\d{2})$"
)

# A JSON value as rows carry it (Struct) and filters give it (Value, no lists or objects).
Json = None | bool | int | float | str


class Kind(StrEnum):
    INTEGER = "integer"
    NUMBER = "number"
    STRING = "string"
    BOOLEAN = "boolean"
    TIMESTAMP = "timestamp"


class Op(StrEnum):
    EQ = "eq"
    NE = "ne"
    LT = "lt"
    LTE = "lte"
    GT = "gt"
    GTE = "gte"
    IN = "in"
    PREFIX = "prefix"


ORDERED = frozenset({Op.LT, Op.LTE, Op.GT, Op.GTE})


@dataclass(frozen=True, slots=True)
class Collection:
    """A table or view clients may read, as the server configuration declares it."""

    name: str  # what clients call it
    table: str  # "table", or "schema.table" (PostgreSQL)
    key: tuple[str, ...]  # unique, not null: the tie-breaker of every order
    fields: tuple[str, ...]  # readable columns, the key's among them, in output order
    demo: bool = False  # create and fill the demo table when it is missing (the embedded default)

    def __post_init__(self) -> None:
        parts = self.table.split(".")
        if len(parts) > 2 or not all(IDENTIFIER.fullmatch(p) for p in parts):
            raise ValueError(f"table: {self.table[:MAX_SHOWN]!r} is not a table name (an identifier, or schema.identifier)")
        if parts[-1].lower().startswith(RESERVED_PREFIX):
            raise ValueError(f"table: {self.table!r}: tables named {RESERVED_PREFIX}* are the gateway's own")
        for name in (*self.key, *self.fields):
            if not IDENTIFIER.fullmatch(name):
                raise ValueError(f"{name[:MAX_SHOWN]!r} is not a column name (a letter or _, then letters, digits, _; at most 63)")
        if not self.key:
            raise ValueError("key: at least one column")
        if len(set(self.fields)) != len(self.fields) or len(set(self.key)) != len(self.key):
            raise ValueError("a column is named twice")
        if missing := [k for k in self.key if k not in self.fields]:
            raise ValueError(f"key: {', '.join(missing)} not among the fields")


@dataclass(frozen=True, slots=True)
class Column:
    """A readable field as the backend found it."""

    name: str
    kind: Kind
    nullable: bool
    sql_type: str = ""  # the backend's type, for casts (PostgreSQL: int8, numeric, timestamptz ...)
    collate: str = ""  # appended to the column in string comparisons and orders ('' when bytewise)


@dataclass(frozen=True, slots=True)
class Schema:
    """A collection checked against its table: what every query of it is planned with."""

    collection: Collection
    columns: Mapping[str, Column]  # by field name, in the collection's field order
    view: bool  # a view: nothing known about keys, every column nullable


@dataclass(frozen=True, slots=True)
class Found:
    """What introspection found: the relation, its columns, its unique column sets."""

    view: bool
    columns: Mapping[str, Column | str]  # a Column, or the type name of an unsupported column
    unique: Sequence[frozenset[str]]  # primary key and unique indexes (whole columns, no predicate)


@dataclass(frozen=True, slots=True)
class SortKey:
    field: str
    descending: bool = False


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: Op
    value: Any  # typed for the field's kind (see ``operand``); a tuple of them for IN


@dataclass(frozen=True, slots=True)
class AllOf:
    parts: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class AnyOf:
    parts: tuple[Filter, ...]


Filter = Condition | AllOf | AnyOf


@dataclass(frozen=True, slots=True)
class Query:
    """A read of a collection: fields returned, complete order (key last), optional filter."""

    fields: tuple[str, ...]
    order: tuple[SortKey, ...]
    filter: Filter | None = None


@dataclass(frozen=True, slots=True)
class Row:
    values: dict[str, Json]  # the projected fields, as JSON values
    position: tuple[Any, ...]  # the raw sort values (``Query.order``): where a page after it starts


# A batch's columns as JSON values, and each column's value types where known.
Columns = tuple[Sequence[Sequence[Json]], Sequence[AbstractSet[type] | None] | None]


class Batch:
    """The rows one statement read, column by column: what a page is built from without an
    object per row. ``columns[i]`` holds field ``fields[i]`` of every row as JSON values;
    ``raw`` keeps the driver's rows, whose sort values (at ``order`` in each) are a row's
    position, taken only for the rows a cursor names.

    The columns are made from ``raw`` when first asked for (``convert``), so a reader can
    start the next statement from where these rows end before paying for their values."""

    __slots__ = ("_columns", "_convert", "fields", "order", "raw")

    def __init__(
        self, fields: tuple[str, ...], raw: Sequence[Sequence[Any]], order: Sequence[int], convert: Callable[[], Columns]
    ) -> None:
        self.fields, self.raw, self.order, self._convert = fields, raw, order, convert
        self._columns: Columns | None = None

    @property
    def columns(self) -> Sequence[Sequence[Json]]:
        return self._converted()[0]

    @property
    def types(self) -> Sequence[AbstractSet[type] | None] | None:
        return self._converted()[1]

    def _converted(self) -> Columns:
        if self._columns is None:
            self._columns = self._convert()
        return self._columns

    def __len__(self) -> int:
        return len(self.raw)

    def position(self, index: int) -> tuple[Any, ...]:
        raw = self.raw[index]
        return tuple([raw[i] for i in self.order])

    def rows(self) -> list[Row]:
        fields, columns = self.fields, zip(*self.columns, strict=True)
        return [Row(dict(zip(fields, values, strict=True)), self.position(i)) for i, values in enumerate(columns)]


# --- Planning a query (shared: the same checks and order on every backend) ---------------------


def complete_order(schema: Schema, requested: Sequence[SortKey]) -> tuple[SortKey, ...]:
    """The requested order, then the key columns it does not name yet (ascending): a total
    order. A field named twice keeps its first direction."""
    seen: dict[str, SortKey] = {}
    for key in requested:
        seen.setdefault(key.field, key)
    for name in schema.collection.key:
        seen.setdefault(name, SortKey(name))
    return tuple(seen.values())


def describe(filter_: Filter | None) -> Any:
    """A JSON-able, canonical form of a filter: what a cursor's query hash covers."""
    if filter_ is None:
        return None
    if isinstance(filter_, Condition):
        values = filter_.value if filter_.op is Op.IN else (filter_.value,)
        return [filter_.field, filter_.op.value, [_described(v) for v in values]]
    return ["and" if isinstance(filter_, AllOf) else "or", [describe(p) for p in filter_.parts]]


def _described(value: Any) -> Json:
    return value.isoformat() if isinstance(value, datetime.datetime) else value


def operand(column: Column, value: Json, where: str) -> Any:
    """A filter operand (parsed JSON) as the typed value of the field's kind: int, float, str,
    bool or an aware UTC datetime; None stays None. INVALID_ARGUMENT naming ``where`` otherwise."""
    if value is None:
        return None
    kind = column.kind
    if kind is Kind.INTEGER:
        if isinstance(value, bool):
            raise invalid_argument(where, f"field {column.name!r} is an integer, not a boolean")
        if isinstance(value, float):
            if not value.is_integer():
                raise invalid_argument(where, f"field {column.name!r} is an integer; {value!r} has a fraction")
            value = int(value)
        elif isinstance(value, str):
            if not re.fullmatch(r"-?[0-9]{1,20}", value):
                raise invalid_argument(where, f"field {column.name!r} is an integer; a string must be decimal digits")
            value = int(value)
        if not isinstance(value, int) or not INT64_MIN <= value <= INT64_MAX:
            raise invalid_argument(where, f"field {column.name!r} is an integer within the 64-bit range")
        return value
    if kind is Kind.NUMBER:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise invalid_argument(where, f"field {column.name!r} is a number")
        if not math.isfinite(value):
            raise invalid_argument(where, "a number must be finite")
        return float(value)
    if kind is Kind.STRING:
        if not isinstance(value, str):
            raise invalid_argument(where, f"field {column.name!r} is a string")
        if "\x00" in value:
            raise invalid_argument(where, "a string cannot hold NUL")
        return value
    if kind is Kind.BOOLEAN:
        if not isinstance(value, bool):
            raise invalid_argument(where, f"field {column.name!r} is a boolean")
        return value
    if not isinstance(value, str):
        raise invalid_argument(where, f"field {column.name!r} is a timestamp: an RFC 3339 string")
    return parse_timestamp(value, where)


def parse_timestamp(text: str, where: str) -> datetime.datetime:
    """An RFC 3339 timestamp with an offset and at most microseconds, as an aware UTC datetime."""
    found = RFC3339.fullmatch(text)
    if found is None:
        raise invalid_argument(where, f"{text[:MAX_SHOWN]!r} is not an RFC 3339 timestamp with an offset (…Z or …+01:00)")
    *fields, fraction, offset = found.groups()
    fraction = fraction or ""
    if fraction[6:].strip("0"):
        raise invalid_argument(where, "timestamps have microsecond precision: at most 6 fractional digits")
    try:
        zone = datetime.UTC
        if offset not in ("Z", "z"):
            sign = -1 if offset[0] == "-" else 1
            zone = datetime.timezone(sign * datetime.timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6])))
        parsed = datetime.datetime(*map(int, fields), int(fraction[:6].ljust(6, "0")), tzinfo=zone)
        return parsed.astimezone(datetime.UTC)
    except (ValueError, OverflowError):  # 2026-02-30, an offset of 24 h, a year 1 moved before year 1
        raise invalid_argument(where, f"{text[:MAX_SHOWN]!r} is not a valid date and time") from None


def rfc3339(value: datetime.datetime) -> str:
    """The one JSON form of a timestamp: UTC, microseconds, ``Z`` (naive means UTC)."""
    if value.tzinfo is not None:
        value = value.astimezone(datetime.UTC).replace(tzinfo=None)
    return value.isoformat(timespec="microseconds") + "Z"  # four-digit years, as RFC 3339 has them


def json_number(value: int | float) -> Json:
    """A number as a JSON value can carry it exactly: a double, or a string when it cannot."""
    if isinstance(value, int):
        return value if -EXACT_DOUBLE <= value <= EXACT_DOUBLE else str(value)
    if math.isfinite(value):
        return value
    return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")


_NONE = type(None)
_PLAIN_NUMBER_TYPES = frozenset({int, float, _NONE})


def plain_numbers(values: Sequence[Any]) -> frozenset[type] | None:
    """The types of a column's values when every one is None, an int within ±2^53 or a finite
    float — what :func:`json_number` leaves as it is, so the column needs no converting — else
    None. A few passes over the column, each a loop in C."""
    types = frozenset(map(type, values))
    if not types <= _PLAIN_NUMBER_TYPES:
        return None
    present = values if _NONE not in types else [v for v in values if v is not None]
    if not present:
        return types
    if float in types:
        try:
            if not all(map(math.isfinite, present)):
                return None
        except OverflowError:  # an int beyond a double's range
            return None
    if int in types:
        ints = present if float not in types else [v for v in present if type(v) is int]
        if min(ints) < -EXACT_DOUBLE or max(ints) > EXACT_DOUBLE:
            return None
    return types


def check(collection: Collection, found: Found) -> Schema:
    """The collection against what introspection found; FAILED_PRECONDITION naming the problem."""
    columns: dict[str, Column] = {}
    for name in collection.fields:
        column = found.columns.get(name)
        if column is None:
            raise mismatch(collection, f"has no column {name!r} (its columns: {', '.join(found.columns) or 'none'})")
        if isinstance(column, str):
            raise mismatch(
                collection,
                f"column {name!r} is {column or 'untyped'}; a readable field is an integer, number, string, "
                "boolean or timestamp column",
            )
        columns[name] = column
    if not found.view and frozenset(collection.key) not in found.unique:
        raise mismatch(
            collection, f"key ({', '.join(collection.key)}) is neither its primary key nor a unique index on exactly those columns"
        )
    if not found.view:
        for name in collection.key:  # a unique index lets nulls repeat: the key must be NOT NULL too
            if columns[name].nullable:
                raise mismatch(collection, f"key column {name!r} may be null (declare it NOT NULL)")
    return Schema(collection, columns, found.view)


def mismatch(collection: Collection, problem: str) -> PrismError:
    return PrismError(
        grpc.StatusCode.FAILED_PRECONDITION, f"collection {collection.name!r}: table {collection.table!r} {problem}"
    )


def bad_cursor(problem: str = "does not fit this collection's schema any more; start again without it") -> PrismError:
    return invalid_argument("cursor", problem)


def unavailable(backend: str, exc: BaseException) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, f"{backend} backend unavailable: {type(exc).__name__}")


# --- The demo collection (the embedded default's, and what the README shows) -------------------

DEMO_FIELDS = ("id", "customer", "status", "total", "paid", "placed_at", "note")
DEMO_CUSTOMERS = ("ada", "grace", "linus", "barbara", "edsger")
DEMO_STATUSES = ("placed", "paid", "shipped", "delivered")


def demo_rows(count: int = 20) -> list[tuple[int, str, str, float, bool, datetime.datetime, str | None]]:
    """The demo table's rows, the same on every backend: typed values in DEMO_FIELDS order."""
    start = datetime.datetime(2026, 1, 5, 9, 0, tzinfo=datetime.UTC)
    return [
        (
            i,
            DEMO_CUSTOMERS[i % len(DEMO_CUSTOMERS)],
            DEMO_STATUSES[i % len(DEMO_STATUSES)],
            round(9.5 + (i * 7.25) % 90, 2),
            i % 4 != 0,
            start + datetime.timedelta(hours=5 * i, minutes=7 * i),
            "gift wrap" if i % 6 == 0 else None,
        )
        for i in range(1, count + 1)
    ]


# --- The adapter -----------------------------------------------------------------------------


class Plan(ABC):
    """A query compiled for one backend, once per request: every page of it runs its SQL."""

    schema: Schema
    query: Query


class ReaderAdapter(ABC):
    """Keyset-paged reads of declared collections. ``prepare`` is cached per collection; a
    statement failing on a changed table drops the cache, so the next call checks again."""

    capabilities: ClassVar[frozenset[Capability]] = frozenset({Capability.SHARED, Capability.DURABLE})
    backend: ClassVar[str]
    # Whether a page read ahead should start at once, before the current page is built and
    # sent: yes where the statement runs in another process (the database server works
    # meanwhile); no where it runs on a thread of this one, which would only contend with the
    # page's building for the interpreter (measured on SQLite: ~15% fewer rows/s).
    read_ahead_at_once: ClassVar[bool] = True

    def __init__(self) -> None:
        self._schemas: dict[Collection, Schema] = {}
        self._preparing: dict[Collection, asyncio.Lock] = {}

    async def start(self) -> None:
        """Nothing to create: the collections' tables belong to the application."""

    async def close(self) -> None:
        """Nothing of its own to release (the connection is the backend instance's)."""

    async def prepare(self, collection: Collection) -> Schema:
        """The collection checked against its table (once; concurrent callers wait for one check)."""
        if (schema := self._schemas.get(collection)) is not None:
            return schema
        lock = self._preparing.setdefault(collection, asyncio.Lock())
        async with lock:
            if (schema := self._schemas.get(collection)) is None:
                if collection.demo:
                    await self._create_demo(collection)
                schema = self._schemas[collection] = check(collection, await self._introspect(collection))
        return schema

    def forget(self, collection: Collection) -> None:
        """Check the collection again on its next use (its table changed under it)."""
        self._schemas.pop(collection, None)

    @abstractmethod
    async def _introspect(self, collection: Collection) -> Found:
        """The relation's columns and unique column sets; FAILED_PRECONDITION (``mismatch``)
        when it does not exist."""

    @abstractmethod
    async def _create_demo(self, collection: Collection) -> None:
        """Create ``collection.table`` with DEMO_FIELDS and ``demo_rows()`` unless it exists."""

    @abstractmethod
    def plan(self, schema: Schema, query: Query) -> Plan:
        """Compile ``query`` (fields, order and filter already checked against ``schema``)."""

    @abstractmethod
    async def batch(self, plan: Plan, after: tuple[Any, ...] | None, limit: int) -> Batch:
        """Up to ``limit`` rows in the plan's order, strictly after position ``after`` (None:
        from the first), column by column (what the service builds pages from)."""

    async def rows(self, plan: Plan, after: tuple[Any, ...] | None, limit: int) -> list[Row]:
        """The same rows as :meth:`batch`, a :class:`Row` each."""
        return (await self.batch(plan, after, limit)).rows()

    @abstractmethod
    async def count(self, plan: Plan) -> int:
        """How many rows match the plan's filter."""

    def encode_position(self, plan: Plan, position: tuple[Any, ...]) -> list[Json]:
        """A position as JSON, for a cursor (raw values that are JSON already, by default)."""
        return list(position)

    def decode_position(self, plan: Plan, data: Any) -> tuple[Any, ...]:
        """A position back from a cursor, checked against the plan's order."""
        if not isinstance(data, list) or len(data) != len(plan.query.order):
            raise bad_cursor()
        for value in data:
            if value is not None and not isinstance(value, (bool, int, float, str)):
                raise bad_cursor()
        return tuple(data)

