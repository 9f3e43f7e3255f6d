"""PostgreSQL Reader: tables and views of the backend's database, read on the instance's shared
asyncpg pool (``adapters/backends/postgres.py``), one statement per page.

Each operand is cast to its column's type family (``$1::int8``, ``$1::numeric``, ``$1::text``),
so a value beyond an int4 column's range still compares, and btree indexes serve the
comparison. Strings compare ``COLLATE "C"`` (code point order, as SQLite) unless the column's
collation is C already — then an ordinary index serves a string sort key; otherwise give it an
index ``COLLATE "C"``. ``timestamp`` without time zone is read and compared as UTC.

A timestamp field's JSON text is written by the database for the years 1000–9999 (``to_char``
in UTC, the form :func:`rfc3339` writes: no datetime made and formatted per row in the
gateway), and by rfc3339 from the value for the rest (infinities, other years), as before.
"""

from __future__ import annotations

import datetime
import decimal
import logging
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import TYPE_CHECKING, Any

import asyncpg

from adapters.reader.base import (
    DEMO_FIELDS,
    Batch,
    Collection,
    Column,
    Found,
    Json,
    Kind,
    Plan,
    Query,
    ReaderAdapter,
    Schema,
    bad_cursor,
    demo_rows,
    json_number,
    mismatch,
    plain_numbers,
    rfc3339,
)
from adapters.reader.sql import ColumnOutput, Dialect, SqlPlan, Statement

if TYPE_CHECKING:  # the pool's module imports this one
    from adapters.backends.postgres import PostgresPool

log = logging.getLogger("prism.adapters.reader.postgres")

# PostgreSQL type → (kind, the type operands are cast to)
TYPES: dict[str, tuple[Kind, str]] = {
    "int2": (Kind.INTEGER, "int8"),
    "int4": (Kind.INTEGER, "int8"),
    "int8": (Kind.INTEGER, "int8"),
    "float4": (Kind.NUMBER, "float8"),
    "float8": (Kind.NUMBER, "float8"),
    "numeric": (Kind.NUMBER, "numeric"),
    "text": (Kind.STRING, "text"),
    "varchar": (Kind.STRING, "text"),
    "bool": (Kind.BOOLEAN, "bool"),
    "timestamptz": (Kind.TIMESTAMP, "timestamptz"),
    "timestamp": (Kind.TIMESTAMP, "timestamp"),
}

RELATION = "SELECT c.oid, c.relkind::text AS relkind FROM pg_class c WHERE c.oid = to_regclass($1)"
COLUMNS = """
SELECT a.attnum, a.attname, t.typname, a.attnotnull,
       CASE WHEN a.attcollation = 0 THEN true
            WHEN co.collname = 'default' THEN (
                SELECT coalesce(to_jsonb(d) ->> 'datlocprovider', 'c') = 'c' AND d.datcollate IN ('C', 'POSIX')
                FROM pg_database d WHERE d.datname = current_database())
            ELSE co.collprovider = 'c' AND co.collcollate IN ('C', 'POSIX') END AS bytewise
FROM pg_attribute a
JOIN pg_type t ON t.oid = a.atttypid
LEFT JOIN pg_collation co ON co.oid = a.attcollation
WHERE a.attrelid = $1 AND a.attnum > 0 AND NOT a.attisdropped
ORDER BY a.attnum
"""
UNIQUE = """
SELECT i.indkey::int2[] AS keys, i.indnkeyatts AS width FROM pg_index i
WHERE i.indrelid = $1 AND i.indisunique AND i.indpred IS NULL AND i.indexprs IS NULL
"""
TIMESTAMP_TEXT = 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"'  # to_char's pattern for rfc3339's form
DEMO_LOCK = 0x7072_6973_6D72_6472  # an advisory lock id of the demo table's creation ("prismrdr")


def _as_is(value: Any) -> Json:
    return value


def _number(value: Any) -> Json:
    return None if value is None else json_number(float(value) if isinstance(value, decimal.Decimal) else value)


def _timestamp(value: Any) -> Json:
    return None if value is None or not isinstance(value, datetime.datetime) else rfc3339(value)


def _integer(value: Any) -> Json:
    return None if value is None else json_number(value)


# Faster passes over a whole column, giving what the functions above give value by value (and,
# where the pass learned them, the types of the values it gives).

_STRINGS = frozenset({str})


def _as_are(values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    return values, None


def _integers(values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    types = plain_numbers(values)
    return (values, types) if types is not None else (list(map(_integer, values)), None)


def _numbers(values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    if (types := plain_numbers(values)) is not None:  # float8, float4
        return values, types
    if set(map(type, values)) == {decimal.Decimal}:  # numeric
        floats = list(map(float, values))
        if (types := plain_numbers(floats)) is not None:
            return floats, types
    return list(map(_number, values)), None


def _timestamps(texts: Sequence[Any], values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    """A timestamp column read as PostgreSQL's own RFC 3339 text (``selected``) for the years
    1000–9999, and as the value itself for the others (null there), which :func:`rfc3339` writes
    as it always did."""
    if set(map(type, texts)) == _STRINGS:  # no null, every one in those years: the common case
        return texts, _STRINGS
    return [_timestamp(value) if text is None else text for text, value in zip(texts, values, strict=True)], None


class PostgresDialect(Dialect):
    def placeholder(self, index: int, column: Column | None) -> str:
        return f"${index}" if column is None else f"${index}::{column.sql_type}"

    def bind(self, column: Column, value: Any) -> Any:
        if column.sql_type == "numeric" and isinstance(value, float):
            return decimal.Decimal(repr(value))  # the number as JSON wrote it, exactly
        if column.sql_type == "timestamp" and isinstance(value, datetime.datetime):
            return value.astimezone(datetime.UTC).replace(tzinfo=None)
        return value

    def in_list(self, statement: Statement, ref: str, column: Column, values: list[Any]) -> str:
        statement.params.append([self.bind(column, v) for v in values])
        return f"{ref} = ANY(${len(statement.params)}::{column.sql_type}[])"

    def output(self, column: Column) -> Callable[[Any], Json]:
        return {
            Kind.INTEGER: _integer,
            Kind.NUMBER: _number,
            Kind.STRING: _as_is,
            Kind.BOOLEAN: _as_is,
            Kind.TIMESTAMP: _timestamp,
        }[column.kind]

    def selected(self, column: Column) -> tuple[str, ...]:
        """A timestamp between the years 1000 and 9999 formatted by the database, exactly as
        :func:`rfc3339` formats it (``to_char`` in UTC: no datetime made, no formatting in the
        gateway), and the value itself only outside those years, where rfc3339 writes it."""
        ref = self.identifier(column.name)
        if column.kind is not Kind.TIMESTAMP:
            return (ref,)
        if column.sql_type == "timestamptz":
            low, high, utc = "'1000-01-01 00:00:00+00'::timestamptz", "'10000-01-01 00:00:00+00'::timestamptz", f"{ref} AT TIME ZONE 'UTC'"
        else:  # timestamp: UTC already
            low, high, utc = "'1000-01-01'::timestamp", "'10000-01-01'::timestamp", ref
        inside = f"{ref} >= {low} AND {ref} < {high}"
        # Named apart: ORDER BY "f" would otherwise find the second one (a CASE takes its ELSE's
        # name) besides the column. No field name holds a "#".
        text = f"to_char({utc}, '{TIMESTAMP_TEXT}')"
        return (
            f'CASE WHEN {inside} THEN {text} END AS "#{column.name}"',
            f'CASE WHEN {inside} THEN NULL ELSE {ref} END AS "#{column.name}#"',
        )

    def output_column(self, column: Column) -> ColumnOutput:
        return {
            Kind.INTEGER: _integers,
            Kind.NUMBER: _numbers,
            Kind.STRING: _as_are,
            Kind.BOOLEAN: _as_are,
            Kind.TIMESTAMP: _timestamps,
        }[column.kind]


DIALECT = PostgresDialect()


class PostgresReader(ReaderAdapter):
    backend = "postgres"

    def __init__(self, pool: PostgresPool) -> None:
        super().__init__()
        self.pool = pool  # the backend instance's pool, shared with its other patterns

    async def _fetch(self, collection: Collection, sql: str, params: list[Any]) -> list[asyncpg.Record]:
        async with self.pool.connection() as con:
            try:
                return await con.fetch(sql, *params)
            except (asyncpg.UndefinedTableError, asyncpg.UndefinedColumnError, asyncpg.FeatureNotSupportedError) as exc:
                # The table changed since it was checked (dropped, a column renamed or retyped).
                self.forget(collection)
                raise mismatch(collection, f"changed since it was checked: {exc}") from exc

    async def _introspect(self, collection: Collection) -> Found:
        name = DIALECT.relation(collection.table)
        async with self.pool.connection() as con:
            found = await con.fetchrow(RELATION, name)
            if found is None or found["oid"] is None:
                raise mismatch(collection, "does not exist (no such table or view on the search path)")
            oid, relkind = found["oid"], found["relkind"]
            attributes = await con.fetch(COLUMNS, oid)
            indexes = await con.fetch(UNIQUE, oid)
        view = relkind in ("v", "f")  # a view or a foreign table: no unique index to check the key with
        columns: dict[str, Column | str] = {}
        by_number: dict[int, str] = {}
        for attribute in attributes:
            by_number[attribute["attnum"]] = attribute["attname"]
            kind = TYPES.get(attribute["typname"])
            if kind is None:
                columns[attribute["attname"]] = attribute["typname"]
                continue
            collate = "" if attribute["bytewise"] else ' COLLATE "C"'
            columns[attribute["attname"]] = Column(
                attribute["attname"], kind[0], view or not attribute["attnotnull"], kind[1], collate
            )
        unique = []
        for index in indexes:
            numbers = list(index["keys"])[: index["width"]]
            if 0 not in numbers:
                unique.append(frozenset(by_number[n] for n in numbers))
        return Found(view, columns, unique)

    async def _create_demo(self, collection: Collection) -> None:
        name = DIALECT.relation(collection.table)
        async with self.pool.connection() as con, con.transaction():
            await con.execute("SELECT pg_advisory_xact_lock($1)", DEMO_LOCK)
            if await con.fetchval("SELECT to_regclass($1)", name) is not None:
                return
            await con.execute(
                f"CREATE TABLE {name} (id bigint PRIMARY KEY, customer text NOT NULL, status text NOT NULL, "
                "total double precision NOT NULL, paid boolean NOT NULL, placed_at timestamptz NOT NULL, note text)"
            )
            await con.executemany(
                f"INSERT INTO {name} ({', '.join(map(DIALECT.identifier, DEMO_FIELDS))}) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                demo_rows(),
            )

    def plan(self, schema: Schema, query: Query) -> Plan:
        return SqlPlan(DIALECT, schema, query)

    async def batch(self, plan: Plan, after: tuple[Any, ...] | None, limit: int) -> Batch:
        assert isinstance(plan, SqlPlan)
        sql, params = plan.page(after, limit)
        return plan.batch(await self._fetch(plan.schema.collection, sql, params))

    async def count(self, plan: Plan) -> int:
        assert isinstance(plan, SqlPlan)
        sql, params = plan.count()
        (record,) = await self._fetch(plan.schema.collection, sql, params)
        return int(record[0])

    def encode_position(self, plan: Plan, position: tuple[Any, ...]) -> list[Json]:
        return [
            str(v) if isinstance(v, decimal.Decimal) else v.isoformat() if isinstance(v, datetime.datetime) else v
            for v in position
        ]

    def decode_position(self, plan: Plan, data: Any) -> tuple[Any, ...]:
        order = plan.query.order
        if not isinstance(data, list) or len(data) != len(order):
            raise bad_cursor()
        return tuple(_decoded(plan.schema.columns[key.field], value) for key, value in zip(order, data, strict=True))


def _decoded(column: Column, value: Any) -> Any:
    """A cursor's value back in the driver's type for the column (INVALID_ARGUMENT if it cannot be)."""
    if value is None:
        return None
    kind, sql_type = column.kind, column.sql_type
    try:
        if kind is Kind.INTEGER and isinstance(value, int) and not isinstance(value, bool):
            return value
        if sql_type == "float8" and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if sql_type == "numeric" and isinstance(value, str):
            return decimal.Decimal(value)
        if kind is Kind.STRING and isinstance(value, str):
            return value
        if kind is Kind.BOOLEAN and isinstance(value, bool):
            return value
        if kind is Kind.TIMESTAMP and isinstance(value, str):
            parsed = datetime.datetime.fromisoformat(value)
            if (parsed.tzinfo is None) == (sql_type == "timestamp"):
                return parsed
    except (ValueError, decimal.InvalidOperation):
        pass
    raise bad_cursor()
