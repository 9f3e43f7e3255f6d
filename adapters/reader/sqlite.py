"""SQLite Reader: the embedded default, reading tables and views of the backend's SQLite file.

Statements run on the backend's :class:`SqliteWorker` thread (shared with the file's other
patterns); their rows become JSON where the page is built (``Batch``).

SQLite types are declared, not enforced; a field's kind comes from its declared type (see
``base.py``). Booleans are stored 0 and 1. Timestamps are UTC text in the canonical form
``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (what :func:`timestamp_text` writes), which sorts and compares as
the instant it names; operands are bound in that form. Strings compare ``COLLATE BINARY``
(UTF-8 bytes: code point order), whatever collation the column declares.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import sqlite3
import threading
from collections.abc import Callable, Sequence
from collections.abc import Set as AbstractSet
from typing import Any, TypeVar

import grpc

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
    demo_rows,
    json_number,
    mismatch,
    plain_numbers,
    rfc3339,
)
from adapters.reader.sql import ColumnOutput, Dialect, SqlPlan, Statement
from adapters.sqlite_worker import SqliteWorker
from prism.errors import PrismError, internal

log = logging.getLogger("prism.adapters.reader.sqlite")

T = TypeVar("T")
CANONICAL_LENGTH = len("2026-01-05T09:00:00.000000Z")
PROGRESS_STEPS = 10_000  # SQLite VM steps between checks whether the caller still waits


def timestamp_text(value: datetime.datetime) -> str:
    """A timestamp as a SQLite timestamp column stores it (naive means UTC)."""
    return rfc3339(value)


def kind_of(declared: str) -> Kind | None:
    """A declared column type's kind, by SQLite's own affinity rules plus BOOL and TIMESTAMP."""
    upper = declared.upper()
    if "BOOL" in upper:
        return Kind.BOOLEAN
    if "TIMESTAMP" in upper or "DATETIME" in upper:
        return Kind.TIMESTAMP
    if "INT" in upper:
        return Kind.INTEGER
    if any(s in upper for s in ("CHAR", "CLOB", "TEXT")):
        return Kind.STRING
    if any(s in upper for s in ("REAL", "FLOA", "DOUB", "NUMERIC", "DECIMAL")):
        return Kind.NUMBER
    return None


def _as_is(value: Any) -> Json:
    return value


def _integer(value: Any) -> Json:
    return json_number(value) if isinstance(value, (int, float)) else value


def _boolean(value: Any) -> Json:
    return value if value is None else bool(value)


def _timestamp(value: Any) -> Json:
    """Canonical text as stored; other text parsed and written canonically when it can be."""
    if value is None or (isinstance(value, str) and len(value) == CANONICAL_LENGTH and value[-1] == "Z"):
        return value
    if isinstance(value, str):
        try:
            return rfc3339(datetime.datetime.fromisoformat(value))
        except ValueError:
            return value
    return value


# Faster passes over a whole column, giving what the functions above give value by value (and,
# where the pass learned them, the types of the values it gives).

_STRINGS = frozenset({str})
_BOOLEANS = frozenset({bool})


def _numbers(values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    types = plain_numbers(values)
    return (values, types) if types is not None else (list(map(_integer, values)), None)


def _strings(values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    return values, None


def _booleans(values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    if set(map(type, values)) == {int}:
        return list(map(bool, values)), _BOOLEANS
    return list(map(_boolean, values)), None


def _timestamps(values: Sequence[Any]) -> tuple[Sequence[Json], AbstractSet[type] | None]:
    """Canonical text, the common case, as it is: strings of the canonical length, every one
    ending in Z (every CANONICAL_LENGTH-th character of them end to end)."""
    if set(map(type, values)) == _STRINGS and set(map(len, values)) == {CANONICAL_LENGTH}:
        if "".join(values)[CANONICAL_LENGTH - 1 :: CANONICAL_LENGTH] == "Z" * len(values):
            return values, _STRINGS
    return list(map(_timestamp, values)), None


class SqliteDialect(Dialect):
    # Backquotes, not double quotes: SQLite reads a double-quoted name that matches no column as
    # a string literal, so a column dropped after the check would silently compare as text.
    quotes = ("`", "`")

    def placeholder(self, index: int, column: Column | None) -> str:
        return f"?{index}"

    def bind(self, column: Column, value: Any) -> Any:
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, datetime.datetime):
            return timestamp_text(value)
        return value

    def in_list(self, statement: Statement, ref: str, column: Column, values: list[Any]) -> str:
        return f"{ref} IN ({', '.join(statement.value(column, v) for v in values)})"

    def output(self, column: Column) -> Callable[[Any], Json]:
        return {
            Kind.INTEGER: _integer,
            Kind.NUMBER: _integer,
            Kind.STRING: _as_is,
            Kind.BOOLEAN: _boolean,
            Kind.TIMESTAMP: _timestamp,
        }[column.kind]

    def output_column(self, column: Column) -> ColumnOutput:
        return {
            Kind.INTEGER: _numbers,
            Kind.NUMBER: _numbers,
            Kind.STRING: _strings,
            Kind.BOOLEAN: _booleans,
            Kind.TIMESTAMP: _timestamps,
        }[column.kind]


DIALECT = SqliteDialect()


def _introspect(con: sqlite3.Connection, collection: Collection) -> Found:
    schema, _, table = collection.table.rpartition(".")
    schema = schema or "main"
    found = con.execute(
        f"SELECT type FROM {DIALECT.identifier(schema)}.sqlite_schema WHERE type IN ('table', 'view') AND name = ?1 COLLATE NOCASE",
        [table],
    ).fetchone()
    if found is None:
        raise mismatch(collection, "does not exist (no such table or view)")
    view = found[0] == "view"
    columns: dict[str, Column | str] = {}
    primary: list[str] = []
    for name, declared, notnull, pk in con.execute(
        'SELECT name, type, "notnull", pk FROM pragma_table_xinfo(?1, ?2)', [table, schema]
    ):
        kind = kind_of(declared or "")
        nullable = view or not (notnull or pk)
        columns[name] = (declared or "") if kind is None else Column(name, kind, nullable, declared, " COLLATE BINARY")
        if pk:
            primary.append(name)
    unique = [frozenset(primary)] if primary else []
    for index, is_unique, partial in con.execute(
        'SELECT name, "unique", partial FROM pragma_index_list(?1, ?2)', [table, schema]
    ).fetchall():
        if is_unique and not partial:
            names = [n for (n,) in con.execute("SELECT name FROM pragma_index_info(?1, ?2)", [index, schema])]
            if names and None not in names:  # an index on an expression is no key
                unique.append(frozenset(names))
    return Found(view, columns, unique)


def _create_demo(con: sqlite3.Connection, table: str) -> None:
    """The demo table and its rows, once: the check and the creation are one transaction, so
    worker processes starting together create it once."""
    con.execute("BEGIN IMMEDIATE")
    try:
        name = table.rpartition(".")[2]
        schema = table.rpartition(".")[0] or "main"
        exists = con.execute(
            f"SELECT 1 FROM {DIALECT.identifier(schema)}.sqlite_schema WHERE name = ?1 COLLATE NOCASE", [name]
        ).fetchone()
        if exists is None:
            con.execute(
                f"CREATE TABLE {DIALECT.relation(table)} (id INTEGER PRIMARY KEY, customer TEXT NOT NULL, "
                "status TEXT NOT NULL, total REAL NOT NULL, paid BOOLEAN NOT NULL, placed_at TIMESTAMP NOT NULL, note TEXT)"
            )
            con.executemany(
                f"INSERT INTO {DIALECT.relation(table)} ({', '.join(map(DIALECT.identifier, DEMO_FIELDS))}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                [(i, c, s, t, int(p), timestamp_text(at), n) for i, c, s, t, p, at, n in demo_rows()],
            )
        con.execute("COMMIT")
    except BaseException:
        con.execute("ROLLBACK")
        raise


class SqliteReader(ReaderAdapter):
    read_ahead_at_once = False  # the statement runs on the worker thread: see ReaderAdapter
    backend = "sqlite"

    def __init__(self, worker: SqliteWorker) -> None:
        super().__init__()
        self.worker = worker  # the backend's connection, shared with its other patterns

    async def _run(self, job: Callable[[sqlite3.Connection], T], collection: Collection) -> T:
        """``job`` on the worker thread. A caller that stops waiting (its deadline, its client
        gone) stops the statement too, at SQLite's next progress check: a long scan does not
        keep the file's thread from the other patterns. (Not ``interrupt()``: that could hit
        another caller's statement on the shared connection.)"""
        stop = threading.Event()

        def guarded(con: sqlite3.Connection) -> T:
            con.set_progress_handler(stop.is_set, PROGRESS_STEPS)
            try:
                return job(con)
            finally:
                con.set_progress_handler(None, 0)

        try:
            return await self.worker.run(guarded)
        except asyncio.CancelledError:
            stop.set()
            raise
        except PrismError:
            raise
        except sqlite3.Error as exc:
            raise self._mapped(exc, collection) from exc

    def _mapped(self, exc: sqlite3.Error, collection: Collection) -> PrismError:
        text = str(exc)
        if "no such table" in text or "no such column" in text:
            self.forget(collection)  # the table changed since it was checked: check again next time
            return mismatch(collection, f"changed since it was checked: {text}")
        if "locked" in text or "busy" in text:
            return PrismError(grpc.StatusCode.UNAVAILABLE, "sqlite backend unavailable: database is locked")
        log.error("sqlite reader statement failed", exc_info=exc)
        return internal()

    async def _introspect(self, collection: Collection) -> Found:
        return await self._run(lambda con: _introspect(con, collection), collection)

    async def _create_demo(self, collection: Collection) -> None:
        await self._run(lambda con: _create_demo(con, collection.table), collection)

    def plan(self, schema: Schema, query: Query) -> Plan:
        return SqlPlan(DIALECT, schema, query)

    async def batch(self, plan: Plan, after: tuple[Any, ...] | None, limit: int) -> Batch:
        assert isinstance(plan, SqlPlan)
        sql, params = plan.page(after, limit)
        return await self._run(lambda con: plan.batch(con.execute(sql, params).fetchall()), plan.schema.collection)

    async def count(self, plan: Plan) -> int:
        assert isinstance(plan, SqlPlan)
        sql, params = plan.count()
        return await self._run(lambda con: con.execute(sql, params).fetchone()[0], plan.schema.collection)
