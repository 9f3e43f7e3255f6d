"""The Reader adapter contract (``adapters/reader/base.py``), checked against each adapter
directly: the contract a remote plugin adapter must pass as well.
``tests/conformance/test_reader.py`` checks the same cases through the gateway's transports.

Each backend is a ``Site``: a database where a test creates tables of its own (named
``reader_test_<run>_<n>``, dropped afterwards) and an adapter on its own connection. The
semantics of values, filters and orders are checked against :class:`Model`, a plain-Python
statement of ``base.py``'s rules: the same seeded random queries must give the model's answer
on every backend, so every backend gives the same answer.

Adding a backend is one entry in ``SITES``.
"""

from __future__ import annotations

import asyncio
import datetime
import decimal
import json
import pathlib
import random
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import pytest

from adapters.backends.postgres import PostgresPool, PostgresSettings
from adapters.backends.sqlite import PRAGMAS
from adapters.reader.base import (
    EXACT_DOUBLE,
    AllOf,
    AnyOf,
    Collection,
    Condition,
    Filter,
    Kind,
    Op,
    Query,
    ReaderAdapter,
    Row,
    Schema,
    SortKey,
    complete_order,
    operand,
    rfc3339,
)
from adapters.reader.postgres import PostgresReader
from adapters.reader.sql import SqlPlan, successor
from adapters.reader.sqlite import SqliteReader, timestamp_text
from adapters.sqlite_worker import SqliteWorker
from prism.errors import PrismError
from tests.servers import POSTGRES_DSN, unreachable

RUN = uuid.uuid4().hex[:8]
UTC = datetime.UTC

# The standard table of the suite: (column, kind, not null). ``id`` is the key.
COLUMNS: list[tuple[str, Kind, bool]] = [
    ("id", Kind.INTEGER, True),
    ("grp", Kind.STRING, True),
    ("name", Kind.STRING, False),
    ("qty", Kind.INTEGER, False),
    ("price", Kind.NUMBER, False),
    ("active", Kind.BOOLEAN, False),
    ("at", Kind.TIMESTAMP, False),
]
FIELDS = tuple(c[0] for c in COLUMNS)
KINDS = {name: kind for name, kind, _ in COLUMNS}

# Values the random rows and operands are drawn from: the awkward ones on purpose.
STRINGS = [
    "", "a", "A", "b", "ab", "a%", "a_b", "é", "e", "Ünïcödé", "日本", "😀", "\U0010ffff", "a\U0010ffff",
    "it's", 'say "hi"', "back\\slash", "'; DROP TABLE reader_test; --", "%", "_", "z", "Z",
]
GROUPS = ["a", "b", "B", "é", "😀", "", "a%", "a_b"]
INTEGERS = [-5, -1, 0, 1, 2, 3, 7, 2**53 + 1, -(2**62), 2**62]
NUMBERS = [-1.5, 0.0, 0.1, 2.25, 3.0, 1e10, -1e-3]
TIMES = [
    datetime.datetime(2020, 1, 1, tzinfo=UTC),
    datetime.datetime(2024, 2, 29, 12, 30, 15, 123456, tzinfo=UTC),
    datetime.datetime(2024, 2, 29, 12, 30, 15, 123457, tzinfo=UTC),
    datetime.datetime(2026, 7, 1, 0, 0, 0, 500000, tzinfo=UTC),
    datetime.datetime(1999, 12, 31, 23, 59, 59, tzinfo=UTC),
]
POOLS: dict[Kind, list[Any]] = {
    Kind.INTEGER: INTEGERS,
    Kind.NUMBER: NUMBERS,
    Kind.STRING: STRINGS,
    Kind.BOOLEAN: [False, True],
    Kind.TIMESTAMP: TIMES,
}


# --- Sites ------------------------------------------------------------------------------------


class SqliteSite:
    """One SQLite file, written through its own sqlite3 connection (as an application would)."""

    name = "sqlite"
    types: ClassVar[dict[Kind, str]] = {Kind.INTEGER: "INTEGER", Kind.NUMBER: "REAL", Kind.STRING: "TEXT", Kind.BOOLEAN: "BOOLEAN", Kind.TIMESTAMP: "TIMESTAMP"}

    def __init__(self, tmp: pathlib.Path) -> None:
        self.path = tmp / "reader.db"
        self.workers: list[SqliteWorker] = []

    async def open(self) -> ReaderAdapter:
        worker = SqliteWorker(self.path, PRAGMAS)
        await worker.start()
        self.workers.append(worker)
        return SqliteReader(worker)

    def _connect(self) -> sqlite3.Connection:
        return sqlite3.connect(self.path, isolation_level=None)

    async def execute(self, sql: str, rows: Sequence[Sequence[Any]] = ((),)) -> None:
        def run() -> None:
            with self._connect() as con:
                con.executemany(sql, rows) if rows != ((),) else con.execute(sql)
        await asyncio.to_thread(run)

    def placeholders(self, count: int, first: int = 1) -> str:
        return ", ".join(f"?{i}" for i in range(first, first + count))

    def stored(self, kind: Kind, value: Any) -> Any:
        if value is None:
            return None
        if kind is Kind.BOOLEAN:
            return int(value)
        if kind is Kind.TIMESTAMP:
            return timestamp_text(value)
        return value

    async def close(self) -> None:
        for worker in self.workers:
            await worker.close()


class PostgresSite:
    """The PostgreSQL database; the suite's tables are dropped by the tests that made them."""

    name = "postgres"
    types: ClassVar[dict[Kind, str]] = {
        Kind.INTEGER: "bigint", Kind.NUMBER: "double precision", Kind.STRING: "text",
        Kind.BOOLEAN: "boolean", Kind.TIMESTAMP: "timestamptz",
    }

    def __init__(self, tmp: pathlib.Path) -> None:
        if why := unreachable(POSTGRES_DSN):
            pytest.skip(why)
        self.pools: list[PostgresPool] = []

    async def open(self) -> ReaderAdapter:
        pool = PostgresPool(PostgresSettings(dsn=POSTGRES_DSN, pool_size=4))
        await pool.start()
        self.pools.append(pool)
        return PostgresReader(pool)

    async def execute(self, sql: str, rows: Sequence[Sequence[Any]] = ((),)) -> None:
        import asyncpg

        con = await asyncpg.connect(POSTGRES_DSN)
        try:
            if rows == ((),):
                await con.execute(sql)
            else:
                await con.executemany(sql, rows)
        finally:
            await con.close()

    def placeholders(self, count: int, first: int = 1) -> str:
        return ", ".join(f"${i}" for i in range(first, first + count))

    def stored(self, kind: Kind, value: Any) -> Any:
        return value

    async def close(self) -> None:
        for pool in self.pools:
            await pool.close()


Site = SqliteSite | PostgresSite
SITES: dict[str, Callable[[pathlib.Path], Any]] = {"sqlite": SqliteSite, "postgres": PostgresSite}
MATRIX = ("Reader adapter", {b: b for b in SITES})  # for tests/conformance/conftest.py
COUNTER = iter(range(1_000_000))


@pytest.fixture(params=list(SITES))
async def site(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Any]:
    opened = SITES[request.param](tmp_path)
    yield opened
    await opened.close()


@dataclass
class Table:
    """A table of the suite's shape (or another) on a site, with its rows as the model holds them."""

    site: Any
    name: str
    columns: list[tuple[str, Kind, bool]]
    rows: dict[int, dict[str, Any]]  # id → typed values

    @property
    def kinds(self) -> dict[str, Kind]:
        return {name: kind for name, kind, _ in self.columns}

    async def insert(self, *rows: dict[str, Any]) -> None:
        names = [c[0] for c in self.columns]
        sql = f"INSERT INTO {self.name} ({', '.join(names)}) VALUES ({self.site.placeholders(len(names))})"
        await self.site.execute(sql, [[self.site.stored(self.kinds[n], row.get(n)) for n in names] for row in rows])
        for row in rows:
            self.rows[row["id"]] = {n: row.get(n) for n in names}

    async def update(self, key: int, **values: Any) -> None:
        assignments = ", ".join(f"{n} = {self.site.placeholders(1, i + 2)}" for i, n in enumerate(values))
        first = self.site.placeholders(1)
        sql = f"UPDATE {self.name} SET {assignments} WHERE id = {first}"
        await self.site.execute(sql, [[key, *(self.site.stored(self.kinds[n], v) for n, v in values.items())]])
        self.rows[key].update(values)

    async def delete(self, key: int) -> None:
        await self.site.execute(f"DELETE FROM {self.name} WHERE id = {self.site.placeholders(1)}", [[key]])
        del self.rows[key]

    def collection(self, key: tuple[str, ...] = ("id",), fields: tuple[str, ...] | None = None, name: str = "items") -> Collection:
        return Collection(name, self.name, key, fields or tuple(c[0] for c in self.columns))


async def make_table(site: Any, columns: list[tuple[str, Kind, bool]] = COLUMNS, *, key: str = "PRIMARY KEY") -> Table:
    name = f"reader_test_{RUN}_{next(COUNTER)}"
    ddl = []
    for column, kind, not_null in columns:
        ddl.append(f"{column} {site.types[kind]}{' NOT NULL' if not_null else ''}{' ' + key if column == 'id' and key else ''}")
    await site.execute(f"CREATE TABLE {name} ({', '.join(ddl)})")
    return Table(site, name, columns, {})


@pytest.fixture
async def table(site: Any) -> AsyncIterator[Table]:
    made = await make_table(site)
    yield made
    await site.execute(f"DROP TABLE IF EXISTS {made.name}")


def random_rows(seed: int, count: int, start: int = 1) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    rows = []
    for i in range(start, start + count):
        row: dict[str, Any] = {"id": i, "grp": rng.choice(GROUPS)}
        for name, kind, _ in COLUMNS[2:]:
            row[name] = None if rng.random() < 0.2 else rng.choice(POOLS[kind])
        rows.append(row)
    rng.shuffle(rows)
    return rows


# --- The model: base.py's rules in plain Python -------------------------------------------------


class Model:
    """What a query must answer, computed over the rows the test wrote."""

    def __init__(self, rows: dict[int, dict[str, Any]], kinds: dict[str, Kind]) -> None:
        self.rows, self.kinds = rows, kinds

    def matches(self, row: dict[str, Any], f: Filter | None) -> bool:
        if f is None:
            return True
        if isinstance(f, AllOf):
            return all(self.matches(row, p) for p in f.parts)
        if isinstance(f, AnyOf):
            return any(self.matches(row, p) for p in f.parts)
        value, op, operand_ = row[f.field], f.op, f.value
        if op is Op.EQ:
            return value == operand_ if operand_ is not None else value is None
        if op is Op.NE:
            return not self.matches(row, Condition(f.field, Op.EQ, operand_))
        if op is Op.IN:
            return any(self.matches(row, Condition(f.field, Op.EQ, v)) for v in operand_)
        if value is None:
            return False
        if op is Op.PREFIX:
            return value.startswith(operand_)
        return {Op.LT: value < operand_, Op.LTE: value <= operand_, Op.GT: value > operand_, Op.GTE: value >= operand_}[op]

    def answer(self, query: Query) -> list[dict[str, Any]]:
        found = [row for row in self.rows.values() if self.matches(row, query.filter)]
        for key in reversed(query.order):  # stable sorts, least significant first; null is the least value
            found.sort(key=lambda row: (row[key.field] is not None, row[key.field] if row[key.field] is not None else 0), reverse=key.descending)
        return [{name: json_of(self.kinds[name], row[name]) for name in query.fields} for row in found]


def json_of(kind: Kind, value: Any) -> Any:
    """The JSON value base.py says a typed value reads back as."""
    if value is None:
        return None
    if kind is Kind.TIMESTAMP:
        return rfc3339(value)
    if kind is Kind.INTEGER and abs(value) > EXACT_DOUBLE:
        return str(value)
    if kind is Kind.NUMBER:
        return float(value)
    return value


async def read_all(adapter: ReaderAdapter, plan: Any, page_size: int, between: Callable[[list[Row]], Any] | None = None) -> list[Row]:
    """Every page until a short one, as the service pages (``between`` runs between pages)."""
    got: list[Row] = []
    after = None
    while True:
        page = await adapter.rows(plan, after, page_size)
        got.extend(page)
        if len(page) < page_size:
            return got
        if between is not None:
            await between(page)
        # A position survives a cursor: through JSON and back, as the service sends it.
        after = adapter.decode_position(plan, json.loads(json.dumps(adapter.encode_position(plan, page[-1].position))))


async def planned(adapter: ReaderAdapter, table: Table, fields: Sequence[str] = (), order: Sequence[SortKey] = (), f: Filter | None = None) -> tuple[Schema, Any]:
    schema = await adapter.prepare(table.collection())
    query = Query(tuple(fields) or tuple(schema.columns), complete_order(schema, order), f)
    return schema, adapter.plan(schema, query)


def typed(schema: Schema, field: str, op: Op, value: Any) -> Condition:
    """A condition with its operand as the service types it (JSON in, typed out)."""
    column = schema.columns[field]
    as_json = [to_json_operand(v) for v in value] if op is Op.IN else to_json_operand(value)
    if op is Op.IN:
        return Condition(field, op, tuple(operand(column, v, "value") for v in as_json))
    return Condition(field, op, operand(column, as_json, "value"))


def to_json_operand(value: Any) -> Any:
    if isinstance(value, datetime.datetime):
        return rfc3339(value)
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) > EXACT_DOUBLE:
        return str(value)  # beyond a double: a decimal string
    return value


# --- Pages --------------------------------------------------------------------------------------


@pytest.mark.case("pages")
@pytest.mark.parametrize("page_size", [1, 7, 150, 1000])
async def test_pages_concatenate_to_exactly_the_table_in_key_order(site: Any, table: Table, page_size: int) -> None:
    await table.insert(*random_rows(1, 150))
    adapter = await site.open()
    _, plan = await planned(adapter, table)
    got = await read_all(adapter, plan, page_size)
    assert [r.values for r in got] == Model(table.rows, table.kinds).answer(plan.query)
    assert [r.values["id"] for r in got] == list(range(1, 151))


@pytest.mark.case("pages")
async def test_an_empty_table_reads_as_no_rows(site: Any, table: Table) -> None:
    adapter = await site.open()
    _, plan = await planned(adapter, table)
    assert await adapter.rows(plan, None, 10) == []
    assert await adapter.count(plan) == 0


@pytest.mark.case("keyset")
async def test_a_page_is_a_keyset_query_never_offset(site: Any, table: Table) -> None:
    """The statement of a later page starts at the position (a condition on the sort values);
    it has no OFFSET, so a page deep in the table costs what the first one does."""
    await table.insert(*random_rows(2, 30))
    adapter = await site.open()
    _, plan = await planned(adapter, table, order=[SortKey("grp"), SortKey("qty", True)])
    assert isinstance(plan, SqlPlan)
    first = await adapter.rows(plan, None, 5)
    sql, params = plan.page(first[-1].position, 5)
    assert "OFFSET" not in sql.upper()
    assert " WHERE " in sql and "LIMIT" in sql
    assert len(params) >= 3  # the three sort values (grp, qty, id) and the limit, all bound


# --- Order --------------------------------------------------------------------------------------


@pytest.mark.case("sort")
@pytest.mark.parametrize(
    "order",
    [
        [SortKey("grp")],
        [SortKey("grp", True)],
        [SortKey("name"), SortKey("qty", True)],
        [SortKey("active", True), SortKey("at")],
        [SortKey("price"), SortKey("name", True), SortKey("at", True)],
        [SortKey("at", True)],
        [SortKey("id", True)],
    ],
    ids=lambda order: "+".join(f"{k.field}{'↓' if k.descending else '↑'}" for k in order),
)
async def test_multi_key_sort_with_nulls_first_ascending_and_the_key_breaking_ties(
    site: Any, table: Table, order: list[SortKey]
) -> None:
    await table.insert(*random_rows(3, 120))
    adapter = await site.open()
    _, plan = await planned(adapter, table, order=order)
    assert plan.query.order[-1].field == "id" or order[-1].field == "id"
    expected = Model(table.rows, table.kinds).answer(plan.query)
    for page_size in (1, 4, 1000):
        assert [r.values for r in await read_all(adapter, plan, page_size)] == expected, page_size


@pytest.mark.case("sort")
async def test_a_composite_key_is_the_tie_breaker(site: Any) -> None:
    columns = [("a", Kind.STRING, True), ("id", Kind.INTEGER, True), ("v", Kind.INTEGER, False)]
    table = await make_table(site, columns, key="")
    try:
        await site.execute(f"CREATE UNIQUE INDEX {table.name}_key ON {table.name} (a, id)")
        rows = [{"a": a, "id": i, "v": (i * 7) % 3} for a in ("x", "y", "é") for i in range(5)]
        await table.insert(*rows)
        adapter = await site.open()
        schema = await adapter.prepare(table.collection(key=("a", "id")))
        query = Query(("a", "id", "v"), complete_order(schema, [SortKey("v", True)]), None)
        assert [k.field for k in query.order] == ["v", "a", "id"]
        plan = adapter.plan(schema, query)
        got = [r.values for r in await read_all(adapter, plan, 2)]
        assert got == sorted(got, key=lambda r: (-r["v"], r["a"], r["id"]))
        assert len(got) == 15
    finally:
        await site.execute(f"DROP TABLE IF EXISTS {table.name}")


# --- Filters, projection, count: the model on seeded random queries ------------------------------


def random_condition(rng: random.Random, schema: Schema) -> Condition:
    field = rng.choice(FIELDS)
    kind = KINDS[field]
    ops = [Op.EQ, Op.NE, Op.LT, Op.LTE, Op.GT, Op.GTE, Op.IN] + ([Op.PREFIX] if kind is Kind.STRING else [])
    op = rng.choice(ops)
    pool = GROUPS if field == "grp" else POOLS[kind] if field != "id" else list(range(0, 160, 13))
    if op is Op.IN:
        values = rng.sample(pool, min(len(pool), rng.randint(0, 4))) + ([None] if rng.random() < 0.3 else [])
        return typed(schema, field, op, values)
    if op is Op.PREFIX:
        return typed(schema, field, op, rng.choice(["", "a", "a\U0010ffff", "é", "'", "%", "日", "\U0010ffff"]))
    value = None if op in (Op.EQ, Op.NE) and rng.random() < 0.2 else rng.choice(pool)
    return typed(schema, field, op, value)


def random_filter(rng: random.Random, schema: Schema, depth: int = 0) -> Filter:
    if depth >= 2 or rng.random() < 0.5:
        return random_condition(rng, schema)
    parts = tuple(random_filter(rng, schema, depth + 1) for _ in range(rng.randint(1, 3)))
    return AllOf(parts) if rng.random() < 0.5 else AnyOf(parts)


@pytest.mark.case("filters")
async def test_seeded_random_queries_answer_as_the_model_on_every_backend(site: Any, table: Table) -> None:
    """Filters (every operator, and/or, null operands), sorts and projections: each answer —
    every page, and Count — is the model's, so every backend answers alike."""
    await table.insert(*random_rows(4, 150))
    adapter = await site.open()
    schema = await adapter.prepare(table.collection())
    model = Model(table.rows, table.kinds)
    rng = random.Random(20260105)
    for _ in range(60):
        order = [SortKey(f, rng.random() < 0.5) for f in rng.sample(FIELDS[1:], rng.randint(0, 3))]
        fields = tuple(rng.sample(FIELDS, rng.randint(1, len(FIELDS))))
        query = Query(fields, complete_order(schema, order), random_filter(rng, schema))
        plan = adapter.plan(schema, query)
        expected = model.answer(query)
        got = [r.values for r in await read_all(adapter, plan, rng.choice([1, 3, 10, 200]))]
        assert got == expected, query
        assert await adapter.count(plan) == len(expected), query


@pytest.mark.case("filters")
@pytest.mark.parametrize(
    ("field", "op", "value", "ids"),
    [
        ("name", Op.EQ, None, {3}),
        ("name", Op.NE, None, {1, 2, 4, 5}),
        ("name", Op.NE, "x", {2, 3, 4, 5}),  # null is not "x": it matches
        ("name", Op.LT, "y", {1, 4, 5}),  # null never matches an ordered comparison
        ("name", Op.IN, ["x", None], {1, 3}),
        ("name", Op.IN, [], set()),
        ("name", Op.PREFIX, "x", {1, 4}),
        ("name", Op.PREFIX, "", {1, 2, 4, 5}),
        ("name", Op.PREFIX, "%", set()),  # no LIKE wildcards: a prefix is literal
        ("name", Op.EQ, "'; DROP TABLE x; --", {5}),  # a value is a bound parameter, never SQL
        ("qty", Op.GTE, 2, {2, 4}),
        ("qty", Op.LT, 2**62, {1, 2, 4, 5}),
        ("active", Op.EQ, False, {2}),
        ("at", Op.GT, datetime.datetime(2024, 1, 1, tzinfo=UTC), {2}),
        ("price", Op.LTE, 0.1, {1, 4}),
    ],
)
async def test_each_operator_and_null(site: Any, table: Table, field: str, op: Op, value: Any, ids: set[int]) -> None:
    await table.insert(
        {"id": 1, "grp": "g", "name": "x", "qty": 1, "price": 0.1, "active": True, "at": TIMES[0]},
        {"id": 2, "grp": "g", "name": "y", "qty": 3, "price": 2.25, "active": False, "at": TIMES[3]},
        {"id": 3, "grp": "g", "name": None, "qty": None, "price": None, "active": None, "at": None},
        {"id": 4, "grp": "g", "name": "xa", "qty": 2**53 + 1, "price": -1.5, "active": True, "at": TIMES[4]},
        {"id": 5, "grp": "g", "name": "'; DROP TABLE x; --", "qty": 0, "price": 1e10, "active": True, "at": TIMES[0]},
    )
    adapter = await site.open()
    schema = await adapter.prepare(table.collection())
    f = typed(schema, field, op, value)
    plan = adapter.plan(schema, Query(("id",), complete_order(schema, []), f))
    assert {r.values["id"] for r in await read_all(adapter, plan, 2)} == ids
    assert await adapter.count(plan) == len(ids)


@pytest.mark.case("filters")
async def test_prefix_is_by_code_point_up_to_the_last_character(site: Any, table: Table) -> None:
    names = ["a", "a\U0010ffff", "a\U0010ffffz", "b", "\ud7ffx", "\ue000", "\U0010ffff", "\U0010ffff\U0010ffff"]
    await table.insert(*({"id": i, "grp": "g", "name": n} for i, n in enumerate(names, 1)))
    adapter = await site.open()
    schema = await adapter.prepare(table.collection())
    for prefix in ["a", "a\U0010ffff", "\U0010ffff", "\ud7ff"]:
        plan = adapter.plan(schema, Query(("name",), complete_order(schema, []), typed(schema, "name", Op.PREFIX, prefix)))
        got = {r.values["name"] for r in await read_all(adapter, plan, 10)}
        assert got == {n for n in names if n.startswith(prefix)}, prefix
    assert successor("a\U0010ffff") == "b" and successor("\U0010ffff") is None and successor("\ud7ff") == "\ue000"


@pytest.mark.case("projection")
async def test_projection_returns_only_the_fields_asked_even_when_sorting_by_others(site: Any, table: Table) -> None:
    await table.insert(*random_rows(5, 40))
    adapter = await site.open()
    _, plan = await planned(adapter, table, fields=["name"], order=[SortKey("qty", True)])
    rows = await read_all(adapter, plan, 6)
    assert all(set(r.values) == {"name"} for r in rows)
    assert [r.values for r in rows] == Model(table.rows, table.kinds).answer(plan.query)


# --- Values -------------------------------------------------------------------------------------


@pytest.mark.case("values")
async def test_values_read_back_as_the_same_json_on_every_backend(site: Any, table: Table) -> None:
    at = datetime.datetime(2024, 2, 29, 23, 59, 59, 5, tzinfo=datetime.timezone(datetime.timedelta(hours=-2)))
    await table.insert(
        {"id": 1, "grp": "é😀", "name": "日本", "qty": 2**53 + 1, "price": 0.1, "active": False, "at": at},
        {"id": 2, "grp": "", "name": None, "qty": -(2**63), "price": -1e-3, "active": True, "at": None},
    )
    adapter = await site.open()
    _, plan = await planned(adapter, table)
    got = [r.values for r in await adapter.rows(plan, None, 10)]
    assert got == [
        {"id": 1, "grp": "é😀", "name": "日本", "qty": "9007199254740993", "price": 0.1, "active": False,
         "at": "2024-03-01T01:59:59.000005Z"},
        {"id": 2, "grp": "", "name": None, "qty": str(-(2**63)), "price": -0.001, "active": True, "at": None},
    ]


@pytest.mark.case("values")
@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("qty", 1.5, "fraction"),
        ("qty", "12a", "decimal digits"),
        ("qty", str(2**63), "64-bit"),
        ("qty", True, "not a boolean"),
        ("price", "1", "is a number"),
        ("price", float("inf"), "finite"),
        ("name", 3.0, "is a string"),
        ("name", "a\x00b", "NUL"),
        ("active", 1.0, "is a boolean"),
        ("at", "2024-01-01T00:00:00", "offset"),
        ("at", "2024-02-30T00:00:00Z", "not a valid date"),
        ("at", "2024-01-01T00:00:00.1234567Z", "microsecond"),
        ("at", 1700000000.0, "RFC 3339"),
    ],
)
async def test_an_operand_of_the_wrong_kind_is_refused_naming_it(site: Any, table: Table, field: str, value: Any, problem: str) -> None:
    adapter = await site.open()
    schema = await adapter.prepare(table.collection())
    with pytest.raises(PrismError) as refused:
        operand(schema.columns[field], value, "filter.condition.value")
    assert refused.value.code.name == "INVALID_ARGUMENT"
    assert refused.value.field == "filter.condition.value" and problem in refused.value.message


@pytest.mark.case("values")
async def test_timestamps_compare_by_instant_whatever_the_operand_s_offset(site: Any, table: Table) -> None:
    await table.insert(*({"id": i, "grp": "g", "at": t} for i, t in enumerate(TIMES, 1)))
    adapter = await site.open()
    schema = await adapter.prepare(table.collection())
    same_instant = operand(schema.columns["at"], "2024-02-29T14:30:15.123456+02:00", "v")
    plan = adapter.plan(schema, Query(("id",), complete_order(schema, []), Condition("at", Op.EQ, same_instant)))
    assert [r.values["id"] for r in await adapter.rows(plan, None, 10)] == [2]
    plan = adapter.plan(schema, Query(("id",), complete_order(schema, []), Condition("at", Op.GT, same_instant)))
    assert {r.values["id"] for r in await adapter.rows(plan, None, 10)} == {3, 4}


# --- Concurrent changes -------------------------------------------------------------------------


@pytest.mark.case("concurrent changes")
async def test_changes_between_pages_do_what_the_contract_says(site: Any, table: Table) -> None:
    """Key order, pages of 7, and between pages: a row inserted behind and one ahead of the
    position, a row behind and one ahead updated, a row behind and one ahead deleted."""
    await table.insert(*({"id": i, "grp": "g", "qty": 0} for i in range(0, 1000, 10)))
    original = set(table.rows)
    adapter = await site.open()
    _, plan = await planned(adapter, table, fields=["id", "qty"])
    inserted_ahead, inserted_behind, deleted_ahead, deleted_behind = set(), set(), set(), set()
    updated: dict[int, int] = {}

    async def change(page: list[Row]) -> None:
        if not page:
            return
        at = page[-1].values["id"]
        behind = [k for k in table.rows if k < at and k % 10 == 0 and k not in deleted_behind and k not in updated]
        ahead = [k for k in table.rows if k > at + 10 and k % 10 == 0 and k not in updated]
        for key in (at - 3, at + 13):  # odd ones never existed
            if key >= 0 and key not in table.rows:
                await table.insert({"id": key, "grp": "g", "qty": 0})
                (inserted_behind if key < at else inserted_ahead).add(key)
        if behind and ahead:
            await table.update(behind[0], qty=1)
            await table.update(ahead[0], qty=1)
            updated[behind[0]] = 0  # read before the update
            updated[ahead[0]] = 1  # read after it
        if len(behind) > 1 and len(ahead) > 1:
            await table.delete(behind[-1])
            await table.delete(ahead[-1])
            deleted_behind.add(behind[-1])
            deleted_ahead.add(ahead[-1])

    rows = await read_all(adapter, plan, 7, between=change)
    ids = [r.values["id"] for r in rows]
    assert ids == sorted(set(ids)), "in key order, none twice"
    assert set(ids) == (original - deleted_ahead) | inserted_ahead
    assert not set(ids) & inserted_behind and not set(ids) & deleted_ahead
    assert deleted_behind <= set(ids)
    seen = {r.values["id"]: r.values["qty"] for r in rows}
    assert {k: seen[k] for k in updated} == updated, "an update is read as its page found it"


@pytest.mark.case("concurrent changes")
async def test_rows_inserted_concurrently_never_make_a_row_lost_or_repeated(site: Any, table: Table) -> None:
    """A writer inserts rows with random keys while pages are read: every row that existed
    before is read once, in order, and nothing is read twice."""
    await table.insert(*({"id": i, "grp": "g"} for i in range(0, 3000, 3)))
    original = set(table.rows)
    adapter = await site.open()
    _, plan = await planned(adapter, table, fields=["id"])
    stop = asyncio.Event()
    rng = random.Random(7)

    async def writer() -> None:
        while not stop.is_set():
            fresh = {rng.randrange(1, 3000) for _ in range(20)} - set(table.rows)
            fresh = {k for k in fresh if k % 3}
            if fresh:
                await table.insert(*({"id": k, "grp": "g"} for k in sorted(fresh)))
            await asyncio.sleep(0)

    writing = asyncio.create_task(writer())
    try:
        rows = await read_all(adapter, plan, 25, between=lambda page: asyncio.sleep(0.001))
    finally:
        stop.set()
        await writing
    ids = [r.values["id"] for r in rows]
    assert ids == sorted(set(ids))
    assert original <= set(ids)
    assert len(set(ids) - original) > 0, "the writer was meant to insert ahead of the reader"


@pytest.mark.case("concurrent changes")
async def test_an_update_moving_a_row_across_the_position_reads_it_twice_or_not_at_all(site: Any, table: Table) -> None:
    """Sorted by qty: a row read, then moved ahead, comes again; a row ahead moved behind the
    position is not read. Every unchanged row is read exactly once."""
    await table.insert(*({"id": i, "grp": "g", "qty": i} for i in range(1, 21)))
    adapter = await site.open()
    _, plan = await planned(adapter, table, fields=["id", "qty"], order=[SortKey("qty")])
    moved = False

    async def move(page: list[Row]) -> None:
        nonlocal moved
        if not moved:
            moved = True
            await table.update(1, qty=100)  # read already: comes again at the end
            await table.update(20, qty=-1)  # not read yet: now behind the position, never read

    ids = [r.values["id"] for r in await read_all(adapter, plan, 5, between=move)]
    assert ids.count(1) == 2 and 20 not in ids
    assert sorted(set(ids) - {1, 20}) == list(range(2, 20)) and len(ids) == 20


# --- Declarations against the schema --------------------------------------------------------------


@pytest.mark.case("schema")
async def test_a_declaration_that_does_not_match_its_table_is_refused_naming_the_problem(site: Any, table: Table) -> None:
    adapter = await site.open()
    cases = [
        (Collection("c", f"{table.name}_missing", ("id",), ("id",)), "does not exist"),
        (Collection("c", table.name, ("id",), ("id", "nope")), "no column 'nope'"),
        (Collection("c", table.name, ("grp",), ("grp", "id")), "neither its primary key nor a unique index"),
        (Collection("c", table.name, ("id", "grp"), ("id", "grp")), "neither its primary key nor a unique index"),
        (Collection("c", table.name, ("name",), ("id", "name")), "key column 'name' may be null"),
    ]
    await site.execute(f"CREATE UNIQUE INDEX {table.name}_name ON {table.name} (name)")
    for collection, problem in cases:
        with pytest.raises(PrismError) as refused:
            await adapter.prepare(collection)
        assert refused.value.code.name == "FAILED_PRECONDITION", collection
        assert problem in refused.value.message and repr(collection.table) in refused.value.message


@pytest.mark.case("schema")
async def test_an_unsupported_column_type_is_refused_naming_it(site: Any) -> None:
    table = await make_table(site, [("id", Kind.INTEGER, True)])
    blob = "BLOB" if site.name == "sqlite" else "bytea"
    try:
        await site.execute(f"ALTER TABLE {table.name} ADD COLUMN data {blob}")
        adapter = await site.open()
        assert (await adapter.prepare(table.collection(fields=("id",)))).columns.keys() == {"id"}
        with pytest.raises(PrismError) as refused:
            await adapter.prepare(Collection("c", table.name, ("id",), ("id", "data")))
        assert refused.value.code.name == "FAILED_PRECONDITION" and "'data'" in refused.value.message
    finally:
        await site.execute(f"DROP TABLE IF EXISTS {table.name}")


@pytest.mark.case("schema")
async def test_a_view_is_read_with_its_declared_key(site: Any, table: Table) -> None:
    await table.insert(*random_rows(6, 30))
    view = f"{table.name}_v"
    await site.execute(f"CREATE VIEW {view} AS SELECT id, grp, qty FROM {table.name} WHERE qty IS NOT NULL")
    try:
        adapter = await site.open()
        schema = await adapter.prepare(Collection("v", view, ("id",), ("id", "grp", "qty")))
        assert schema.view and all(c.nullable for c in schema.columns.values())
        query = Query(("id", "qty"), complete_order(schema, [SortKey("qty", True)]), None)
        got = [r.values for r in await read_all(adapter, adapter.plan(schema, query), 4)]
        model_rows = {k: v for k, v in table.rows.items() if v["qty"] is not None}
        assert got == Model(model_rows, table.kinds).answer(query)
    finally:
        await site.execute(f"DROP VIEW IF EXISTS {view}")


@pytest.mark.case("deadline")
async def test_a_caller_that_gives_up_stops_its_statement(site: Any, table: Table) -> None:
    """A statement whose caller stops waiting (a deadline, a client gone) is stopped in the
    database, so the connection serves the next call at once (on SQLite the file's one thread):
    a billion-row cross join is abandoned after 0.3 s."""
    await table.insert(*({"id": i, "grp": "g"} for i in range(1000)))
    view = f"{table.name}_slow"
    await site.execute(f"CREATE VIEW {view} AS SELECT a.id AS id FROM {table.name} a, {table.name} b, {table.name} c")
    try:
        adapter = await site.open()
        schema = await adapter.prepare(Collection("slow", view, ("id",), ("id",)))
        plan = adapter.plan(schema, Query(("id",), complete_order(schema, []), None))
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.3):
                await adapter.count(plan)
        _, quick = await planned(adapter, table, fields=["id"])
        started = asyncio.get_running_loop().time()
        assert len(await adapter.rows(quick, None, 5)) == 5
        assert asyncio.get_running_loop().time() - started < 1.0, "the abandoned statement held the connection"
    finally:
        await site.execute(f"DROP VIEW IF EXISTS {view}")


@pytest.mark.case("schema")
async def test_a_table_changed_after_it_was_checked_fails_cleanly_then_is_checked_again(site: Any, table: Table) -> None:
    await table.insert(*random_rows(8, 5))
    adapter = await site.open()
    _, plan = await planned(adapter, table)
    await site.execute(f"ALTER TABLE {table.name} RENAME COLUMN name TO label")
    with pytest.raises(PrismError) as refused:
        await adapter.rows(plan, None, 10)
    assert refused.value.code.name == "FAILED_PRECONDITION" and "changed since it was checked" in refused.value.message
    with pytest.raises(PrismError) as again:
        await adapter.prepare(table.collection())
    assert again.value.code.name == "FAILED_PRECONDITION" and "no column 'name'" in again.value.message


@pytest.mark.case("injection")
@pytest.mark.parametrize(
    "bad",
    [
        {"table": "t; DROP TABLE t"},
        {"table": 'x"y'},
        {"table": "a.b.c"},
        {"table": "prism_kv"},
        {"key": ("id; --",)},
        {"fields": ("id", 'name" FROM t; --')},
        {"fields": ("id", "1=1")},
    ],
)
def test_names_that_are_not_identifiers_never_make_a_collection(bad: dict[str, Any]) -> None:
    spec = {"name": "c", "table": "t", "key": ("id",), "fields": ("id", "name")} | bad
    with pytest.raises(ValueError):
        Collection(**spec)


# --- Positions --------------------------------------------------------------------------------------


@pytest.mark.case("cursors")
async def test_a_position_survives_json_and_a_wrong_one_is_refused(site: Any, table: Table) -> None:
    await table.insert(*random_rows(9, 20))
    adapter = await site.open()
    _, plan = await planned(adapter, table, order=[SortKey("at", True), SortKey("price"), SortKey("active")])
    first = await adapter.rows(plan, None, 5)
    encoded = json.loads(json.dumps(adapter.encode_position(plan, first[-1].position)))
    after = await adapter.rows(plan, adapter.decode_position(plan, encoded), 5)
    everything = await adapter.rows(plan, None, 10)
    assert [r.values for r in first + after] == [r.values for r in everything]
    for wrong in ([1], "x", [[1], 2, 3, 4], None):
        with pytest.raises(PrismError) as refused:
            adapter.decode_position(plan, wrong)
        assert refused.value.code.name == "INVALID_ARGUMENT" and refused.value.field == "cursor"


@pytest.mark.case("values")
@pytest.mark.parametrize("site", ["postgres"], indirect=True)
async def test_postgres_types_numeric_int4_and_timestamp_without_time_zone(site: Any) -> None:
    """PostgreSQL's other types of each kind: numeric stays exact through a cursor, an int4
    column compares with an operand beyond its range, a timestamp without time zone is UTC."""
    name = f"reader_test_{RUN}_{next(COUNTER)}"
    await site.execute(f"CREATE TABLE {name} (id int4 PRIMARY KEY, amount numeric(12, 2), at timestamp, label varchar(10))")
    try:
        await site.execute(
            f"INSERT INTO {name} VALUES ($1, $2, $3, $4)",
            [[i, decimal.Decimal("0.10") * i, datetime.datetime(2024, 1, 1, i), f"l{i}"] for i in range(1, 11)],
        )
        adapter = await site.open()
        schema = await adapter.prepare(Collection("p", name, ("id",), ("id", "amount", "at", "label")))
        plan = adapter.plan(schema, Query(("id", "amount", "at"), complete_order(schema, [SortKey("amount", True)]), None))
        rows = await read_all(adapter, plan, 3)
        assert [r.values["id"] for r in rows] == list(range(10, 0, -1))
        assert rows[0].values == {"id": 10, "amount": 1.0, "at": "2024-01-01T10:00:00.000000Z"}
        big = Condition("id", Op.LT, operand(schema.columns["id"], 2**40, "v"))
        at = Condition("at", Op.GTE, operand(schema.columns["at"], "2024-01-01T10:00:00+01:00", "v"))
        plan = adapter.plan(schema, Query(("id",), complete_order(schema, []), AllOf((big, at))))
        assert [r.values["id"] for r in await adapter.rows(plan, None, 20)] == list(range(9, 11))
        exact = Condition("amount", Op.EQ, operand(schema.columns["amount"], 0.3, "v"))
        assert await adapter.count(adapter.plan(schema, Query(("id",), complete_order(schema, []), exact))) == 1
    finally:
        await site.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.case("values")
@pytest.mark.parametrize("site", ["postgres"], indirect=True)
async def test_postgres_timestamps_read_as_rfc3339_writes_them_in_every_year(site: Any) -> None:
    """The database writes a timestamp's text for the years 1000–9999 (``to_char``), the gateway
    for the others (``rfc3339`` of the value asyncpg reads): both columns types, every year,
    infinities and nulls give what rfc3339 gives for the value itself, and sort keys among them
    still make positions."""
    import asyncpg

    from adapters.reader.postgres import _timestamp

    name = f"reader_test_{RUN}_{next(COUNTER)}"
    await site.execute(f"CREATE TABLE {name} (id int8 PRIMARY KEY, tz timestamptz, naive timestamp)")
    rng = random.Random(13)
    seconds = [rng.uniform(-62135596800, 253402300798) for _ in range(400)]  # years 1 to 9999
    seconds += [-30610224000.0, -30610224000.000001, 253402300798.999999, 0.0, 1e9 + 0.000001]  # the edges of 1000
    stamps = [datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC) + datetime.timedelta(seconds=x) for x in seconds]
    literals = ["infinity", "-infinity", "10000-01-01 00:00:00+00", "0001-01-01 00:00:00+00 BC", None]
    try:
        await site.execute(f"INSERT INTO {name} VALUES ($1, $2, $3)", [[i, t, t.replace(tzinfo=None)] for i, t in enumerate(stamps)])
        offset = len(stamps)
        for i, literal in enumerate(literals):
            value = "NULL" if literal is None else f"'{literal}'"
            await site.execute(f"INSERT INTO {name} VALUES ({offset + i}, {value}::timestamptz, {value}::timestamp)")
        adapter = await site.open()
        schema = await adapter.prepare(Collection("t", name, ("id",), ("id", "tz", "naive")))
        con = await asyncpg.connect(POSTGRES_DSN)
        try:
            order = complete_order(schema, [SortKey("tz"), SortKey("naive", True)])
            for i in range(len(stamps) + len(literals)):
                try:  # the value as asyncpg reads it, written by the value-by-value path
                    raw = await con.fetchrow(f"SELECT tz, naive FROM {name} WHERE id = $1", i)
                    expected: Any = {"id": i, "tz": _timestamp(raw["tz"]), "naive": _timestamp(raw["naive"])}
                except (OverflowError, ValueError) as exc:  # beyond a datetime: the read fails as before
                    expected = type(exc)
                plan = adapter.plan(schema, Query(("id", "tz", "naive"), order, Condition("id", Op.EQ, i)))
                if isinstance(expected, type):
                    with pytest.raises(expected):
                        await adapter.rows(plan, None, 5)
                    continue
                (row,) = await adapter.rows(plan, None, 5)
                assert row.values == expected, (i, raw)
        finally:
            await con.close()
        # Ordered by both timestamps through cursors, years 1000–9999 only (the rest cannot all be read).
        inside = Condition("id", Op.LT, offset)
        plan = adapter.plan(schema, Query(("id", "tz"), complete_order(schema, [SortKey("tz"), SortKey("naive", True)]), inside))
        rows = await read_all(adapter, plan, 7)
        assert [r.values["id"] for r in rows] == sorted(range(offset), key=lambda i: stamps[i])
        assert [r.values["tz"] for r in rows] == [rfc3339(stamps[r.values["id"]]) for r in rows]
    finally:
        await site.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.case("values")
@pytest.mark.parametrize("site", ["sqlite"], indirect=True)
async def test_sqlite_declared_types_give_the_kinds_and_other_timestamp_text_reads_as_an_instant(site: Any) -> None:
    """SQLite types are declared, not enforced: the declaration picks the kind. Timestamp text
    in another ISO 8601 form than the canonical one is returned canonically."""
    name = f"reader_test_{RUN}_{next(COUNTER)}"
    await site.execute(
        f"CREATE TABLE {name} (id BIGINT PRIMARY KEY, a VARCHAR(10), b DOUBLE PRECISION, c BOOL, d DATETIME, e NUMERIC)"
    )
    try:
        await site.execute(f"INSERT INTO {name} VALUES (1, 'x', 1.5, 1, '2024-01-02 03:04:05', 7)")
        adapter = await site.open()
        schema = await adapter.prepare(Collection("t", name, ("id",), ("id", "a", "b", "c", "d", "e")))
        kinds = {n: c.kind for n, c in schema.columns.items()}
        assert kinds == {"id": Kind.INTEGER, "a": Kind.STRING, "b": Kind.NUMBER, "c": Kind.BOOLEAN, "d": Kind.TIMESTAMP, "e": Kind.NUMBER}
        plan = adapter.plan(schema, Query(tuple(schema.columns), complete_order(schema, []), None))
        (row,) = await adapter.rows(plan, None, 10)
        assert row.values == {"id": 1, "a": "x", "b": 1.5, "c": True, "d": "2024-01-02T03:04:05.000000Z", "e": 7}
    finally:
        await site.execute(f"DROP TABLE IF EXISTS {name}")


@pytest.mark.case("schema")
async def test_the_demo_table_is_created_once_and_read(site: Any) -> None:
    name = f"reader_test_{RUN}_{next(COUNTER)}"
    collection = Collection("orders", name, ("id",), ("id", "customer", "total", "paid", "placed_at", "note"), demo=True)
    try:
        first, second = await site.open(), await site.open()
        schemas = await asyncio.gather(first.prepare(collection), second.prepare(collection))
        plan = first.plan(schemas[0], Query(("id", "placed_at", "paid"), complete_order(schemas[0], []), None))
        rows = await first.rows(plan, None, 100)
        assert len(rows) == 20 and rows[0].values == {"id": 1, "placed_at": "2026-01-05T14:07:00.000000Z", "paid": True}
    finally:
        await site.execute(f"DROP TABLE IF EXISTS {name}")

