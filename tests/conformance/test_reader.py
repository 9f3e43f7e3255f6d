"""Reader conformance: every backend behind a READER config passes every case, through the
public API of a real `prism serve` process — Read and Query over native gRPC, server-sent
events, gRPC-Web and Connect, Count over REST and gRPC.

The semantics are those of ``adapters/reader/base.py``; ``test_reader_adapter.py`` checks them
against the adapters directly, with the :class:`Model` both suites compare answers with. The
module creates its tables (``reader_test_<run>_*``, the same names and rows on every backend)
before its gateway starts, exposes them as collections of a namespace of this run, and drops
them when it is done.

Adding a backend is one entry in ``BACKENDS`` (and, for a server, its address in ``SERVERS``).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import pathlib
import random
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from google.protobuf.message import Message

from adapters.reader.base import (
    AllOf,
    AnyOf,
    Collection,
    Column,
    Condition,
    Filter,
    Kind,
    Op,
    Query,
    Schema,
    SortKey,
)
from prism.v1 import reader_pb2 as r
from prism.v1 import session_pb2
from tests.clients import CallError, GrpcClient
from tests.conformance.test_reader_adapter import (
    COLUMNS,
    FIELDS,
    Model,
    PostgresSite,
    SqliteSite,
    Table,
    random_filter,
    random_rows,
    to_json_operand,
)
from tests.gateway_process import GatewayProcess, start_gateway
from tests.servers import POSTGRES_DSN, unreachable

RUN = uuid.uuid4().hex[:8]
NAMESPACE = f"reader-{RUN}"
ITEMS = f"reader_test_{RUN}_items"  # the suite's standard table, random rows
LIVE = f"reader_test_{RUN}_live"  # changed while it is read
WIDE = f"reader_test_{RUN}_wide"  # rows of very different sizes, for byte-bounded pages
BIG = f"reader_test_{RUN}_big"  # more than flow control lets through unread: a stream must wait
ROWS = 240
BIG_ROWS = 4000

BACKENDS: dict[str, str] = {
    "sqlite": "{type: sqlite, path: reader.db}",
    "postgres": f'{{type: postgres, dsn: "{POSTGRES_DSN}"}}',
}
SERVERS: dict[str, str] = {"postgres": POSTGRES_DSN}
CONFIG_OF = {backend: f"reader-{backend}" for backend in BACKENDS}
CONFIGS = list(CONFIG_OF.values())
BACKEND_OF = {config: backend for backend, config in CONFIG_OF.items()}
MATRIX = ("Reader", {**BACKEND_OF, **{b: b for b in BACKENDS}})  # for tests/conformance/conftest.py
UNREACHABLE = {b: why for b, url in SERVERS.items() if (why := unreachable(url))}

RS = "/prism.v1.ReaderService/"
WIDE_COLUMNS = [("id", Kind.INTEGER, True), ("body", Kind.STRING, False)]
# ``pad`` makes the table (18 MB) larger than what the sockets and servers buffer, so a stream of
# it waits for its reader, and rows inserted meanwhile are ahead of the reads.
LIVE_COLUMNS = [("id", Kind.INTEGER, True), ("grp", Kind.STRING, True), ("qty", Kind.INTEGER, False), ("pad", Kind.STRING, False)]
PAD = "p" * 3000
LIVE_KEYS = 18_000  # rows 0, 3, 6, … below it; the writer inserts the keys in between


def server_config(sqlite_path: str = "reader.db", **reader: Any) -> str:
    fields = ", ".join(FIELDS)
    backends = {**BACKENDS, "sqlite": f'{{type: sqlite, path: "{sqlite_path}"}}'}
    lines = ["backends:"]
    lines += [f"  {name}: {spec}" for name, spec in backends.items() if name not in UNREACHABLE]
    lines += [f"namespaces: [{{name: default}}, {{name: {NAMESPACE}}}]", "configs:"]
    lines += [
        f"  - {{name: {config}, pattern: READER, backend: {backend}, namespace: {NAMESPACE}}}"
        for backend, config in CONFIG_OF.items()
        if backend not in UNREACHABLE
    ]
    lines += ["reader:", "  collections:", f"    {NAMESPACE}:"]
    lines += [
        f"      items: {{table: {ITEMS}, key: [id], fields: [{fields}]}}",
        f"      live: {{table: {LIVE}, key: [id], fields: [id, grp, qty, pad]}}",
        f"      wide: {{table: {WIDE}, key: [id], fields: [id, body]}}",
        f"      big: {{table: {BIG}, key: [id], fields: [id, body]}}",
    ]
    lines += [f"  {key}: {value}" for key, value in reader.items()]
    return "\n".join(lines) + "\n"


def require(config: str) -> None:
    if BACKEND_OF[config] in UNREACHABLE:
        pytest.skip(UNREACHABLE[BACKEND_OF[config]])


@dataclass
class Data:
    """The tables of one backend, with the rows the model holds."""

    site: Any
    items: Table
    live: Table
    wide: Table
    big: Table


async def create(site: Any, name: str, columns: list[tuple[str, Kind, bool]]) -> Table:
    ddl = ", ".join(
        f"{c} {site.types[k]}{' NOT NULL' if nn else ''}{' PRIMARY KEY' if c == 'id' else ''}" for c, k, nn in columns
    )
    await site.execute(f"DROP TABLE IF EXISTS {name}")
    await site.execute(f"CREATE TABLE {name} ({ddl})")
    return Table(site, name, columns, {})


async def seed(site: Any) -> Data:
    items = await create(site, ITEMS, COLUMNS)
    await items.insert(*random_rows(11, ROWS))
    live = await create(site, LIVE, LIVE_COLUMNS)
    await live.insert(*({"id": i, "grp": "g", "qty": 0, "pad": PAD} for i in range(0, LIVE_KEYS, 3)))
    wide = await create(site, WIDE, WIDE_COLUMNS)
    await wide.insert(*({"id": i, "body": "x" * (50 if i % 10 else 5000)} for i in range(1, 61)))
    big = await create(site, BIG, WIDE_COLUMNS)
    await big.insert(*({"id": i, "body": f"{i:<1000}"} for i in range(1, BIG_ROWS + 1)))
    return Data(site, items, live, wide, big)


async def drop(site: Any) -> None:
    for name in (ITEMS, LIVE, WIDE, BIG):
        await site.execute(f"DROP TABLE IF EXISTS {name}")


class Suite:
    """The gateway and the data behind each of its configs."""

    def __init__(self, gateway: GatewayProcess, data: dict[str, Data]) -> None:
        self.gateway, self.data = gateway, data


def sites(tmp: pathlib.Path) -> dict[str, Any]:
    made: dict[str, Any] = {"sqlite": SqliteSite(tmp / "data")}
    if "postgres" not in UNREACHABLE:
        made["postgres"] = PostgresSite(tmp)
    (tmp / "data").mkdir(parents=True, exist_ok=True)
    return made


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Suite]:
    tmp = tmp_path_factory.mktemp("reader-conformance")
    made = sites(tmp)
    data = {backend: asyncio.run(seed(site)) for backend, site in made.items()}
    gateway = start_gateway(tmp, config_yaml=server_config())
    try:
        yield Suite(gateway, {CONFIG_OF[b]: d for b, d in data.items()})
    finally:
        gateway.stop()
        for site in made.values():
            asyncio.run(drop(site))


@dataclass
class Session:
    client: Any
    token: str
    config: str
    data: Data

    async def call(self, rpc: str, request: Message) -> Any:
        return await self.client.call(RS + rpc, request, self.token)

    async def pages(self, rpc: str, request: Message) -> list[r.Page]:
        return [page async for page in self.client.stream(RS + rpc, request, self.token)]  # type: ignore[misc]

    async def refused(self, rpc: str, request: Message) -> CallError:
        with pytest.raises(CallError) as caught:
            if rpc == "Count":
                await self.call(rpc, request)
            else:
                await self.pages(rpc, request)
        return caught.value


async def open_session(client: Any, suite: Suite, config: str) -> Session:
    require(config)
    response = await client.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config))
    return Session(client, response.token, config, suite.data[config])


@pytest.fixture(params=CONFIGS)
async def reader(request: pytest.FixtureRequest, suite: Suite, client_factory) -> Session:
    return await open_session(client_factory("grpc", suite.gateway), suite, request.param)


def rows_of(pages: list[r.Page]) -> list[dict[str, Any]]:
    from google.protobuf import json_format

    return [json_format.MessageToDict(row) for page in pages for row in page.rows]


def same(got: list[dict[str, Any]], expected: list[dict[str, Any]]) -> bool:
    """Struct numbers are doubles: 3 and 3.0 are the same value."""
    return got == expected


def value(v: Any) -> struct_pb2.Value:
    out = struct_pb2.Value()
    v = to_json_operand(v)
    if v is None:
        out.null_value = struct_pb2.NULL_VALUE
    elif isinstance(v, bool):
        out.bool_value = v
    elif isinstance(v, (int, float)):
        out.number_value = v
    else:
        out.string_value = v
    return out


OPERATORS = {op: r.FilterOperator.Value(f"FILTER_OPERATOR_{op.name}") for op in Op}


def proto_filter(f: Filter) -> r.Filter:
    if isinstance(f, Condition):
        condition = r.FieldCondition(field=f.field, op=OPERATORS[f.op])
        if f.op is Op.IN:
            condition.values.extend(value(v) for v in f.value)
        else:
            condition.value.CopyFrom(value(f.value))
        return r.Filter(condition=condition)
    parts = r.FilterList(filters=[proto_filter(p) for p in f.parts])
    return r.Filter(**{"and" if isinstance(f, AllOf) else "or": parts})


def order_of(*keys: tuple[str, bool]) -> list[r.SortKey]:
    return [r.SortKey(field=f, descending=d) for f, d in keys]


def complete(order: list[SortKey]) -> tuple[SortKey, ...]:
    return tuple(order) + (() if any(k.field == "id" for k in order) else (SortKey("id"),))


# --- Read and Query on every transport -------------------------------------------------------------


@pytest.mark.case("pages")
@pytest.mark.parametrize("transport", ["grpc", "rest", "grpc-web", "grpc-web-text", "connect"])
@pytest.mark.parametrize("config", CONFIGS)
async def test_read_pages_concatenate_to_the_collection_on_every_transport(
    suite: Suite, client_factory, transport: str, config: str
) -> None:
    session = await open_session(client_factory(transport, suite.gateway), suite, config)
    pages = await session.pages("Read", r.ReadRequest(collection="items", page_size=17))
    expected = Model(session.data.items.rows, session.data.items.kinds).answer(Query(FIELDS, (SortKey("id"),)))
    assert rows_of(pages) == expected
    assert [len(p.rows) for p in pages] == [17] * (ROWS // 17) + [ROWS % 17]
    assert all(p.next_cursor for p in pages[:-1]) and not pages[-1].next_cursor


@pytest.mark.case("filters")
@pytest.mark.parametrize("transport", ["grpc", "rest", "grpc-web", "connect-proto"])
@pytest.mark.parametrize("config", CONFIGS)
async def test_query_filters_sorts_and_projects_on_every_transport(
    suite: Suite, client_factory, transport: str, config: str
) -> None:
    session = await open_session(client_factory(transport, suite.gateway), suite, config)
    typed = AllOf(
        (
            AnyOf((Condition("grp", Op.IN, ("a", "é", "😀")), Condition("name", Op.PREFIX, "a"))),
            Condition("qty", Op.NE, None),
            Condition("price", Op.GTE, 0.0),
        )
    )
    order = [SortKey("grp", True), SortKey("at")]
    request = r.QueryRequest(
        collection="items",
        filter=proto_filter(typed),
        order_by=order_of(("grp", True), ("at", False)),
        fields=["id", "grp", "at", "qty"],
        page_size=4,
    )
    pages = await session.pages("Query", request)
    expected = Model(session.data.items.rows, session.data.items.kinds).answer(
        Query(("id", "grp", "at", "qty"), complete(order), typed)
    )
    assert expected and rows_of(pages) == expected
    count = await session.call("Count", r.CountRequest(collection="items", filter=proto_filter(typed)))
    assert count.count == len(expected)


@pytest.mark.case("count")
@pytest.mark.parametrize("transport", ["rest", "grpc", "grpc-web"])
@pytest.mark.parametrize("config", CONFIGS)
async def test_count_with_and_without_a_filter(suite: Suite, client_factory, transport: str, config: str) -> None:
    session = await open_session(client_factory(transport, suite.gateway), suite, config)
    assert (await session.call("Count", r.CountRequest(collection="items"))).count == ROWS
    null_names = r.Filter(condition=r.FieldCondition(field="name", op=r.FILTER_OPERATOR_EQ, value=value(None)))
    expected = sum(1 for row in session.data.items.rows.values() if row["name"] is None)
    assert (await session.call("Count", r.CountRequest(collection="items", filter=null_names))).count == expected


@pytest.mark.case("count")
async def test_count_over_rest_is_a_plain_json_post(suite: Suite) -> None:
    """What curl sends: a JSON body with the filter in the proto's JSON form."""
    require(CONFIGS[0])
    async with httpx.AsyncClient(base_url=suite.gateway.base_url, timeout=10) as http:
        token = (await http.post("/v1/sessions", json={"configName": CONFIGS[0]})).json()["token"]
        body = {"filter": {"condition": {"field": "qty", "op": "FILTER_OPERATOR_GT", "value": 2}}}
        response = await http.post("/v1/collections/items:count", json=body, headers={"x-prism-session": token})
    rows = suite.data[CONFIGS[0]].items.rows.values()
    assert response.status_code == 200 and response.json() == {"count": str(sum(1 for x in rows if x["qty"] is not None and x["qty"] > 2))}


@pytest.mark.case("filters")
async def test_seeded_random_queries_through_the_gateway_answer_as_the_model(reader: Session) -> None:
    rng = random.Random(99)
    model = Model(reader.data.items.rows, reader.data.items.kinds)

    # random_filter types operands by the columns' kinds: the suite's table's.
    schema = Schema(
        Collection("items", ITEMS, ("id",), FIELDS), {n: Column(n, k, not nn) for n, k, nn in COLUMNS}, view=False
    )
    for _ in range(15):
        order = [SortKey(f, rng.random() < 0.5) for f in rng.sample(FIELDS[1:], rng.randint(0, 2))]
        fields = tuple(rng.sample(FIELDS, rng.randint(1, 4)))
        typed = random_filter(rng, schema)
        request = r.QueryRequest(
            collection="items", filter=proto_filter(typed), order_by=order_of(*((k.field, k.descending) for k in order)),
            fields=list(fields), page_size=rng.choice([3, 50]),
        )
        expected = model.answer(Query(fields, complete(order), typed))
        assert rows_of(await reader.pages("Query", request)) == expected, request


# --- Cursors --------------------------------------------------------------------------------------


@pytest.mark.case("cursors")
async def test_a_cursor_resumes_in_a_new_request_with_other_page_bounds_and_fields(reader: Session) -> None:
    first = (await reader.pages("Read", r.ReadRequest(collection="items", page_size=50)))[0]
    rest = await reader.pages(
        "Read", r.ReadRequest(collection="items", page_size=30, cursor=first.next_cursor, fields=["id"])
    )
    ids = [row["id"] for row in rows_of([first])] + [row["id"] for row in rows_of(rest)]
    assert ids == list(range(1, ROWS + 1))
    # Read and Query without a filter are the same query: their cursors are interchangeable.
    via_query = await reader.pages("Query", r.QueryRequest(collection="items", page_size=1000, cursor=first.next_cursor))
    assert [row["id"] for row in rows_of(via_query)] == list(range(51, ROWS + 1))


def tampered(cursor: str) -> list[str]:
    payload, signature = cursor.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded[1] = [1]  # another position, re-encoded, with the old signature
    forged = base64.urlsafe_b64encode(json.dumps(decoded, separators=(",", ":")).encode()).decode().rstrip("=")
    flipped = payload[:-2] + ("A" if payload[-2] != "A" else "B") + payload[-1]
    return [
        f"{forged}.{signature}",
        f"{flipped}.{signature}",
        f"{payload}.{signature[::-1]}",
        f"{payload}.",
        payload,
        "not-a-cursor",
        "!!!.???",
        cursor + "x",
        "a" * 70_000,
    ]


@pytest.mark.case("cursors")
@pytest.mark.parametrize("transport", ["grpc", "rest"])
@pytest.mark.parametrize("config", CONFIGS)
async def test_an_altered_cursor_is_refused(suite: Suite, client_factory, transport: str, config: str) -> None:
    session = await open_session(client_factory(transport, suite.gateway), suite, config)
    cursor = (await session.pages("Read", r.ReadRequest(collection="items", page_size=100)))[0].next_cursor
    for bad in tampered(cursor):
        if transport == "rest" and len(bad) > 8000:
            continue  # a URL that long is the HTTP server's to refuse
        error = await session.refused("Read", r.ReadRequest(collection="items", cursor=bad))
        assert error.code == "INVALID_ARGUMENT" and error.message.startswith("cursor:"), (bad, error)
        if transport == "rest":
            assert error.http_status == 400 and error.violations == ("cursor",)


@pytest.mark.case("cursors")
async def test_a_cursor_is_bound_to_its_query(reader: Session, suite: Suite, client_factory) -> None:
    f = r.Filter(condition=r.FieldCondition(field="qty", op=r.FILTER_OPERATOR_GT, value=value(0)))
    base = r.QueryRequest(collection="items", filter=f, order_by=order_of(("grp", False)), page_size=5)
    cursor = (await reader.pages("Query", base))[0].next_cursor
    other_filter = r.Filter(condition=r.FieldCondition(field="qty", op=r.FILTER_OPERATOR_GT, value=value(1)))
    for changed in (
        r.QueryRequest(collection="items", filter=other_filter, order_by=base.order_by, cursor=cursor),
        r.QueryRequest(collection="items", filter=f, order_by=order_of(("grp", True)), cursor=cursor),
        r.QueryRequest(collection="items", filter=f, cursor=cursor),
        r.QueryRequest(collection="live", filter=f, order_by=order_of(("grp", False)), cursor=cursor),
    ):
        error = await reader.refused("Query", changed)
        assert error.code == "INVALID_ARGUMENT" and "cursor: belongs to another query" in error.message, changed
    # The same query on another backend (another config, same namespace) is another scope.
    for other in CONFIGS:
        if other != reader.config and BACKEND_OF[other] not in UNREACHABLE:
            elsewhere = await open_session(client_factory("grpc", suite.gateway), suite, other)
            base.cursor = cursor
            error = await elsewhere.refused("Query", base)
            assert error.code == "INVALID_ARGUMENT" and error.message.startswith("cursor:")
    # Unchanged, it goes on: fields and page size may change.
    base.cursor, base.page_size = cursor, 1000
    assert rows_of(await reader.pages("Query", base))


# --- Bounds: rows, bytes, time --------------------------------------------------------------------


@pytest.mark.case("page bounds")
async def test_pages_are_bounded_by_bytes_and_a_row_alone_may_exceed_the_budget(reader: Session) -> None:
    budget = 1200
    pages = await reader.pages("Read", r.ReadRequest(collection="wide", page_size=1000, max_page_bytes=budget))
    assert [row["id"] for row in rows_of(pages)] == list(range(1, 61))
    for page in pages:
        if len(page.rows) > 1:
            assert page.ByteSize() <= budget, page.ByteSize()
        else:
            assert page.ByteSize() > budget // 2, "a page ends early only when the next row does not fit"
    assert any(len(p.rows) == 1 and p.ByteSize() > budget for p in pages), "a 5,000-byte row comes alone"
    assert max(len(p.rows) for p in pages) > 5
    # Fewer rows a page than the budget holds, but some rows long enough to cut a page early:
    # the page read ahead from where a full one would end is dropped, the next starts where
    # the cut one ended.
    pages = await reader.pages("Read", r.ReadRequest(collection="wide", page_size=4, max_page_bytes=budget))
    assert [row["id"] for row in rows_of(pages)] == list(range(1, 61))
    assert {len(p.rows) for p in pages} >= {4, 1}, [len(p.rows) for p in pages]


@pytest.mark.case("page bounds")
async def test_page_size_defaults_and_is_bounded(reader: Session) -> None:
    pages = await reader.pages("Read", r.ReadRequest(collection="items"))
    assert [len(p.rows) for p in pages] == [100, 100, ROWS - 200]
    one = await reader.pages("Read", r.ReadRequest(collection="items", page_size=1000, fields=["id"]))
    assert len(one) == 1 and len(one[0].rows) == ROWS and not one[0].next_cursor


@pytest.fixture(scope="module")
def impatient(tmp_path_factory: pytest.TempPathFactory, suite: Suite) -> Iterator[GatewayProcess]:
    """A gateway on the same tables whose reads end after a second and whose cursors expire
    after two."""
    tmp = tmp_path_factory.mktemp("reader-impatient")
    shared = suite.gateway.log_path.parent / "data" / "reader.db"  # the suite's file, by its full path
    gateway = start_gateway(tmp, config_yaml=server_config(str(shared), deadline_seconds=1, cursor_ttl_seconds=2))
    yield gateway
    gateway.stop()


@pytest.mark.case("deadline")
@pytest.mark.parametrize("config", CONFIGS)
async def test_a_read_past_its_deadline_ends_with_a_cursor_that_resumes_it(impatient: GatewayProcess, suite: Suite, config: str) -> None:
    """A slow client: once the stream's flow-control window is full the gateway waits to send,
    and the deadline passes before the client asks for more. (The client's window is kept at
    its initial 64 KiB: grpcio would otherwise grow it to take the whole table.)"""
    session = await open_session(GrpcClient(impatient.grpc_target), suite, config)
    channel = grpc.aio.insecure_channel(impatient.grpc_target, options=[("grpc.http2.bdp_probe", 0)])
    try:
        read = channel.unary_stream(RS + "Read", request_serializer=r.ReadRequest.SerializeToString, response_deserializer=r.Page.FromString)
        stream = read(r.ReadRequest(collection="big", page_size=10), metadata=(("x-prism-session", session.token),))
        got = [await stream.read()]
        await asyncio.sleep(1.3)
        while (page := await stream.read()) is not grpc.aio.EOF:
            got.append(page)
        last = got[-1]
        assert not last.rows and last.next_cursor, f"ended early, with where to resume (read {len(rows_of(got))})"
        assert len(rows_of(got)) < BIG_ROWS
        rest = await session.pages("Read", r.ReadRequest(collection="big", page_size=1000, cursor=last.next_cursor))
        assert [row["id"] for row in rows_of(got + rest)] == list(range(1, BIG_ROWS + 1))
    finally:
        await channel.close()
        await session.client.close()


@pytest.mark.case("cursors")
@pytest.mark.parametrize("config", CONFIGS)
async def test_an_expired_cursor_is_refused(impatient: GatewayProcess, suite: Suite, config: str) -> None:
    session = await open_session(GrpcClient(impatient.grpc_target), suite, config)
    try:
        cursor = (await session.pages("Read", r.ReadRequest(collection="items", page_size=100)))[0].next_cursor
        await asyncio.sleep(2.2)
        error = await session.refused("Read", r.ReadRequest(collection="items", cursor=cursor))
        assert error.code == "INVALID_ARGUMENT" and "cursor: has expired" in error.message
    finally:
        await session.client.close()


# --- Refusals, naming the field -------------------------------------------------------------------


def condition(field: str = "qty", op: int = r.FILTER_OPERATOR_EQ, v: Any = 1, **extra: Any) -> r.Filter:
    return r.Filter(condition=r.FieldCondition(field=field, op=op, value=value(v), **extra))


def nested(depth: int) -> r.Filter:
    f = condition()
    for _ in range(depth):
        f = r.Filter(**{"and": r.FilterList(filters=[f])})
    return f


@pytest.mark.case("validation")
@pytest.mark.parametrize(
    ("rpc", "request_", "field"),
    [
        ("Read", r.ReadRequest(collection="items", page_size=-1), "pageSize"),
        ("Read", r.ReadRequest(collection="items", page_size=1001), "pageSize"),
        ("Read", r.ReadRequest(collection="items", max_page_bytes=-1), "maxPageBytes"),
        ("Read", r.ReadRequest(collection="items", max_page_bytes=64 * 1024 * 1024), "maxPageBytes"),
        ("Read", r.ReadRequest(collection="items", fields=["id", "nope"]), "fields[1]"),
        ("Read", r.ReadRequest(collection="items", fields=["id", "id"]), "fields[1]"),
        ("Read", r.ReadRequest(collection="items", order_by=order_of(("qty", False), ("nope", True))), "orderBy[1].field"),
        ("Read", r.ReadRequest(collection="items", order_by=order_of(("qty", False), ("qty", True))), "orderBy[1].field"),
        ("Query", r.QueryRequest(collection="items", filter=condition(field="nope")), "filter.condition.field"),
        ("Query", r.QueryRequest(collection="items", filter=condition(op=0)), "filter.condition.op"),
        ("Query", r.QueryRequest(collection="items", filter=condition(op=99)), "filter.condition.op"),
        ("Query", r.QueryRequest(collection="items", filter=condition(v="x")), "filter.condition.value"),
        ("Query", r.QueryRequest(collection="items", filter=condition(v=1.5)), "filter.condition.value"),
        ("Query", r.QueryRequest(collection="items", filter=condition(op=r.FILTER_OPERATOR_LT, v=None)), "filter.condition.value"),
        ("Query", r.QueryRequest(collection="items", filter=condition(op=r.FILTER_OPERATOR_PREFIX, v=1)), "filter.condition.op"),
        ("Query", r.QueryRequest(collection="items", filter=condition(op=r.FILTER_OPERATOR_IN)), "filter.condition.value"),
        ("Query", r.QueryRequest(collection="items", filter=condition(field="at", v="yesterday")), "filter.condition.value"),
        ("Query", r.QueryRequest(collection="items", filter=r.Filter(condition=r.FieldCondition(field="qty", op=1))), "filter.condition.value"),
        ("Query", r.QueryRequest(collection="items", filter=r.Filter(**{"or": r.FilterList()})), "filter.or.filters"),
        ("Query", r.QueryRequest(collection="items", filter=r.Filter()), "filter"),
        ("Query", r.QueryRequest(collection="items", filter=nested(9)), "filter" + ".and.filters[0]" * 8),
        (
            "Query",
            r.QueryRequest(collection="items", filter=r.Filter(**{"or": r.FilterList(filters=[condition()] * 65)})),
            "filter.or.filters[64]",
        ),
        (
            "Query",
            r.QueryRequest(
                collection="items",
                filter=r.Filter(condition=r.FieldCondition(field="qty", op=r.FILTER_OPERATOR_EQ, value=struct_pb2.Value(list_value={}))),
            ),
            "filter.condition.value",
        ),
        ("Count", r.CountRequest(collection="items", filter=condition(field="grp", v=True)), "filter.condition.value"),
    ],
)
async def test_bad_input_is_refused_naming_the_field(reader: Session, rpc: str, request_: Message, field: str) -> None:
    error = await reader.refused(rpc, request_)
    assert error.code == "INVALID_ARGUMENT", error
    assert error.message.startswith(field.rstrip(".") + ":") or error.message.startswith(field), (field, error.message)


@pytest.mark.case("validation")
async def test_an_unknown_collection_is_not_found_and_names_the_known_ones(reader: Session) -> None:
    error = await reader.refused("Read", r.ReadRequest(collection="nope"))
    assert error.code == "NOT_FOUND" and "big, items, live, wide" in error.message


@pytest.mark.case("validation")
async def test_order_by_cannot_be_set_in_a_read_url(suite: Suite) -> None:
    """REST reads are GETs: a repeated message (orderBy) has no URL form in the transport, so a
    sorted read is a Query (POST)."""
    require(CONFIGS[0])
    async with httpx.AsyncClient(base_url=suite.gateway.base_url, timeout=10) as http:
        token = (await http.post("/v1/sessions", json={"configName": CONFIGS[0]})).json()["token"]
        response = await http.get(f"/v1/collections/items:read?orderBy=qty&prism_session={token}")
    assert response.status_code == 400 and response.json()["code"] == "INVALID_ARGUMENT"


# --- SQL injection: names and values ----------------------------------------------------------------


INJECTIONS = [
    "id; DROP TABLE items",
    'id" FROM items; --',
    "id`; --",
    "1=1 OR id",
    "(SELECT 1)",
    "id DESC, (SELECT count(*) FROM sqlite_master)",
    "prism_kv",
    "",
    "ID",
]


@pytest.mark.case("injection")
async def test_injection_in_field_names_sort_keys_and_collection_names_is_refused(reader: Session) -> None:
    for name in INJECTIONS:
        error = await reader.refused("Read", r.ReadRequest(collection="items", fields=["id", name]))
        assert error.code == "INVALID_ARGUMENT" and error.message.startswith("fields[1]:"), name
        error = await reader.refused("Read", r.ReadRequest(collection="items", order_by=order_of((name, True))))
        assert error.code == "INVALID_ARGUMENT" and error.message.startswith("orderBy[0].field:"), name
        error = await reader.refused("Count", r.CountRequest(collection="items", filter=condition(field=name)))
        assert error.code == "INVALID_ARGUMENT" and error.message.startswith("filter.condition.field:"), name
        error = await reader.refused("Count", r.CountRequest(collection=name or "x"))
        assert error.code in ("NOT_FOUND", "INVALID_ARGUMENT"), name
    for collection in ("items; DROP TABLE items", f"{ITEMS}", "../items", "items%00", "items--"):
        error = await reader.refused("Read", r.ReadRequest(collection=collection))
        assert error.code == "NOT_FOUND", collection
    assert (await reader.call("Count", r.CountRequest(collection="items"))).count == ROWS, "the table is intact"


@pytest.mark.case("injection")
@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_injection_in_values_matches_only_the_literal(suite: Suite, client_factory, transport: str) -> None:
    for config in CONFIGS:
        if BACKEND_OF[config] in UNREACHABLE:
            continue
        session = await open_session(client_factory(transport, suite.gateway), suite, config)
        rows = session.data.items.rows.values()
        for literal in ("'; DROP TABLE reader_test; --", "' OR '1'='1", "%", "_", 'x" OR "1"="1', "\\"):
            for op in (r.FILTER_OPERATOR_EQ, r.FILTER_OPERATOR_PREFIX):
                f = condition(field="name", op=op, v=literal)
                expected = [
                    {"id": row["id"]}
                    for row in sorted(rows, key=lambda x: x["id"])
                    if row["name"] is not None and (row["name"] == literal if op == r.FILTER_OPERATOR_EQ else row["name"].startswith(literal))
                ]
                pages = await session.pages("Query", r.QueryRequest(collection="items", filter=f, fields=["id"]))
                assert rows_of(pages) == expected, (literal, op)
        assert (await session.call("Count", r.CountRequest(collection="items"))).count == ROWS


# --- Concurrent changes ---------------------------------------------------------------------------


async def insert_until(stop: asyncio.Event, live: Table, rng: random.Random) -> None:
    """Rows with new keys (not multiples of 3: those were there before), until ``stop``."""
    while not stop.is_set():
        fresh = sorted({k for k in (rng.randrange(1, LIVE_KEYS) for _ in range(10)) if k % 3 and k not in live.rows})
        if fresh:
            await live.insert(*({"id": k, "grp": "g", "qty": 1, "pad": PAD} for k in fresh))
        await asyncio.sleep(0.002)


@pytest.mark.case("concurrent changes")
@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_rows_inserted_while_a_stream_is_read_are_never_lost_or_repeated(
    suite: Suite, client_factory, transport: str
) -> None:
    """A writer inserts rows into the collection while its pages stream (read slowly, a page at
    a time): every row that existed before arrives once, in key order, nothing twice."""
    for config in CONFIGS:
        if BACKEND_OF[config] in UNREACHABLE:
            continue
        session = await open_session(client_factory(transport, suite.gateway), suite, config)
        live = session.data.live
        original = set(live.rows)
        stop = asyncio.Event()
        writing = asyncio.create_task(insert_until(stop, live, random.Random(config)))
        ids: list[int] = []
        try:
            async for page in session.client.stream(RS + "Read", r.ReadRequest(collection="live", page_size=20), session.token):
                ids += [int(row["id"]) for row in rows_of([page])]
                await asyncio.sleep(0.005)
        finally:
            stop.set()
            await writing
        assert ids == sorted(set(ids)), "in key order, none twice"
        assert original <= set(ids)
        assert set(ids) - original, "the writer was meant to insert ahead of the reader"


class Counting:
    """A Reader adapter that counts the pages asked of the one it wraps."""

    def __init__(self, inner: Any) -> None:
        self.inner, self.fetched = inner, 0
        self.capabilities = inner.capabilities

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def batch(self, plan: Any, after: Any, limit: int) -> Any:
        self.fetched += 1
        return await self.inner.batch(plan, after, limit)


class HeldStreams:
    """The part of a session record a stream uses."""

    def __init__(self) -> None:
        self.held: set[str] = set()

    def hold_stream(self, stream_id: str, closer: Any) -> None:
        self.held.add(stream_id)

    def release_stream(self, stream_id: str) -> None:
        self.held.discard(stream_id)


@pytest.mark.case("flow")
async def test_pages_are_read_at_most_one_ahead_of_the_consumer(suite: Suite, request: pytest.FixtureRequest) -> None:
    """The service reads one page ahead of its consumer and no further: a consumer that stops
    after two pages has caused three reads however long it waits, and closing the stream
    releases it at once (the RSS tests in tests/test_reader_million.py show the transports
    pull only as their client reads)."""
    request.node.user_properties.append(("backends", ["sqlite"]))
    from adapters.backends.sqlite import PRAGMAS
    from adapters.reader.sqlite import SqliteReader
    from adapters.sqlite_worker import SqliteWorker
    from app.services.reader import ReaderService
    from app.settings import load_settings
    from prism.v1 import config_pb2

    data_dir = suite.gateway.log_path.parent / "data"
    worker = SqliteWorker(data_dir / "reader.db", PRAGMAS)
    await worker.start()
    try:
        adapter = Counting(SqliteReader(worker))
        settings = load_settings(data_dir.parent / "prism.yaml", environ={})
        service = ReaderService(lambda config: adapter, settings.reader, b"k" * 32)  # type: ignore[arg-type,return-value]
        config = config_pb2.ClientConfig(namespace=NAMESPACE, backend=config_pb2.BackendConfig(instance="sqlite"))
        session = HeldStreams()
        call = type("Call", (), {"config": config, "session": session})()
        pages = service.Read(r.ReadRequest(collection="big", page_size=10), call)  # type: ignore[arg-type]
        first, second = await anext(pages), await anext(pages)
        await asyncio.sleep(0.2)
        assert len(first.rows) == len(second.rows) == 10 and adapter.fetched == 3
        assert [int(row.fields["id"].number_value) for row in second.rows] == list(range(11, 21))
        assert session.held, "the stream is held by its session while it is open"
        await pages.aclose()  # type: ignore[attr-defined]
        assert adapter.fetched == 3 and not session.held
        resumed = service.Read(r.ReadRequest(collection="big", page_size=10, cursor=second.next_cursor), call)  # type: ignore[arg-type]
        async with contextlib.aclosing(resumed):
            third = await anext(resumed)
        assert [int(row.fields["id"].number_value) for row in third.rows] == list(range(21, 31))
    finally:
        await worker.close()


@pytest.mark.case("session")
async def test_closing_the_session_ends_its_read(reader: Session) -> None:
    stream = reader.client.stream(RS + "Read", r.ReadRequest(collection="big", page_size=1), reader.token)
    await anext(stream)
    await reader.client.call("/prism.v1.SessionService/CloseSession", session_pb2.CloseSessionRequest(), reader.token)
    with pytest.raises(CallError) as ended:
        async for _ in stream:
            pass
    assert ended.value.code == "UNAUTHENTICATED"


@pytest.mark.case("validation")
async def test_a_reader_session_cannot_call_another_pattern_and_vice_versa(reader: Session, suite: Suite) -> None:
    from prism.v1 import keyvalue_pb2 as kv

    with pytest.raises(CallError) as refused:
        await reader.client.call("/prism.v1.KeyValueService/Get", kv.GetRequest(key="x"), reader.token)
    assert refused.value.code == "FAILED_PRECONDITION"


@pytest.mark.case("claimed capabilities")
async def test_reader_backends_are_listed_with_their_capabilities(reader: Session) -> None:
    from prism.v1 import plugin_pb2

    info = await reader.client.call("/prism.v1.PluginInfoService/GetInfo", plugin_pb2.InfoRequest())
    readers = {b.name for b in info.backends if b.pattern == "READER"}
    assert readers == {b for b in BACKENDS if b not in UNREACHABLE}
