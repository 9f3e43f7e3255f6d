"""Transact conformance through the gateway: Write over gRPC, REST, gRPC-Web and Connect against a
real `prism serve` process, on every backend behind a TRANSACT config; the Transaction stream's
handler called directly (with an async generator of requests and a Call, as the transports will
call it) on an in-process gateway's service and backends.

The semantics are those of ``adapters/transact/base.py``; ``test_transact_adapter.py`` checks them
against the adapters directly. What is checked here is what the service adds: tables and columns
from the server configuration only, fields named as the client spells them, a session of the
TRANSACT pattern, and the stream's lifecycle — every way it can end without a commit rolls back.

Adding a backend is one entry in ``BACKENDS`` (a table it can write, and how to read it back).
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sqlite3
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest

from adapters.transact.base import TransactAdapter
from adapters.transact.postgres import PostgresTransact
from app.auth.identity import Identity
from app.backends import Backends
from app.configs import from_settings
from app.methods import all_methods
from app.pipeline import Call
from app.services.transact import TransactService
from app.sessions import MemorySessionStore
from app.settings import Settings, load_settings
from prism.errors import PrismError
from prism.v1 import config_pb2, session_pb2
from prism.v1 import transact_pb2 as t
from tests.clients import CallError, GrpcClient
from tests.gateway_process import GatewayProcess, start_gateway
from tests.servers import POSTGRES_DSN, unreachable

RUN = uuid.uuid4().hex[:8]
BACKENDS = ("sqlite", "postgres")
NAMESPACE = {backend: f"transact-{backend}-{RUN}" for backend in BACKENDS}
CONFIG = {backend: f"transact-{backend}" for backend in BACKENDS}
INSTANCE = {"sqlite": "lite", "postgres": "pg"}  # the backends' names in the server configuration
# Typed tables the suite makes, as an application's would be (a NOT NULL column among them).
TABLE = {"sqlite": "orders", "postgres": f"tx_orders_{RUN}"}
UNREACHABLE = {"postgres": why} if (why := unreachable(POSTGRES_DSN)) else {}
TRANSPORTS = ("grpc", "rest", "grpc-web", "connect")
WRITE = "/prism.v1.TransactService/Write"
WAIT = 10.0

MATRIX = ("Transact", {**{CONFIG[b]: b for b in BACKENDS}, **{b: b for b in BACKENDS}})  # conftest.py's matrix


def server_config(data_dir: pathlib.Path) -> str:
    columns = "[id, customer, total, status]"
    return f"""
data_dir: {data_dir}
tracing: {{exporter: file, file: "{data_dir.parent / 'spans.jsonl'}"}}
backends:
  lite: {{type: sqlite}}
  {"" if "postgres" not in UNREACHABLE else "# "}pg: {{type: postgres, dsn: "{POSTGRES_DSN}", pool_size: 4}}
configs:
  - {{name: {CONFIG["sqlite"]}, pattern: TRANSACT, backend: lite, namespace: {NAMESPACE["sqlite"]}}}
  {"" if "postgres" not in UNREACHABLE else "# "}- {{name: {CONFIG["postgres"]}, pattern: TRANSACT, backend: pg, namespace: {NAMESPACE["postgres"]}}}
  - {{name: kv, pattern: KEY_VALUE, backend: lite, namespace: {NAMESPACE["sqlite"]}}}
transact:
  {NAMESPACE["sqlite"]}:
    backend: lite
    tables: {{orders: {{key: [id], columns: {columns}}}}}
  {"" if "postgres" not in UNREACHABLE else "# "}{NAMESPACE["postgres"]}: {{backend: pg, isolation: serializable, timeout_seconds: 5, tables: {{{TABLE["postgres"]}: {{key: [id], columns: {columns}}}}}}}
"""


def create_sqlite_table(data_dir: pathlib.Path) -> None:
    """In the file the gateway's SQLite backend opens (``prism.db`` in its data directory)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    connection = sqlite3.connect(data_dir / "prism.db")
    try:
        connection.execute(
            "CREATE TABLE IF NOT EXISTS orders (id TEXT PRIMARY KEY, customer TEXT NOT NULL DEFAULT '', total REAL, "
            "status TEXT) STRICT"
        )
    finally:
        connection.close()


async def create_postgres_table() -> None:
    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await con.execute(
            f'CREATE TABLE IF NOT EXISTS "{TABLE["postgres"]}" (id text PRIMARY KEY, customer text NOT NULL DEFAULT \'\', '
            "total numeric, status text)"
        )
    finally:
        await con.close()


async def drop_postgres_data() -> None:
    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await con.execute(f'DROP TABLE IF EXISTS "{TABLE["postgres"]}"')
        if await con.fetchval("SELECT to_regclass('prism_transact_mailbox') IS NOT NULL"):
            for table in ("prism_transact_mailbox", "prism_transact_heads", "prism_transact_keys", "prism_transact_cursors"):
                if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                    await con.execute(f"DELETE FROM {table} WHERE namespace = ANY($1::text[])", list(NAMESPACE.values()))
    finally:
        await con.close()


class Store:
    """Reads what a backend holds, behind the gateway's back."""

    def __init__(self, backend: str, data_dir: pathlib.Path) -> None:
        self.backend, self.data_dir = backend, data_dir

    async def query(self, statement: str, *args: Any) -> list[tuple[Any, ...]]:
        if self.backend == "postgres":
            con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
            try:
                return [tuple(r) for r in await con.fetch(statement, *args)]
            finally:
                await con.close()

        def run() -> list[tuple[Any, ...]]:
            connection = sqlite3.connect(self.data_dir / "prism.db", timeout=5)
            try:
                return connection.execute(statement, args).fetchall()
            finally:
                connection.close()

        return await asyncio.to_thread(run)

    async def row(self, key: str) -> tuple[Any, ...] | None:
        placeholder = "$1" if self.backend == "postgres" else "?"
        found = await self.query(f'SELECT id, customer, status FROM "{TABLE[self.backend]}" WHERE id = {placeholder}', key)
        return found[0] if found else None

    async def mailbox(self, mailbox: str) -> list[tuple[int, bytes, str]]:
        return [(seq, payload, destination) for seq, payload, _, destination in await self.mailbox_rows(mailbox)]

    async def mailbox_rows(self, mailbox: str) -> list[tuple[int, bytes, dict[str, str], str]]:
        """(sequence, payload, headers, destination) of each row, in order."""
        where = "namespace = $1 AND mailbox = $2" if self.backend == "postgres" else "namespace = ? AND mailbox = ?"
        statement = f"SELECT seq, payload, headers, destination FROM prism_transact_mailbox WHERE {where} ORDER BY seq"
        rows = await self.query(statement, NAMESPACE[self.backend], mailbox)
        return [(r[0], bytes(r[1]), json.loads(r[2]), r[3]) for r in rows]


def require(backend: str) -> None:
    """Skip (a failure under PRISM_REQUIRE_BACKENDS=1) when the backend's server is down."""
    if backend in UNREACHABLE:
        pytest.skip(UNREACHABLE[backend])


# --- Write through a real gateway ------------------------------------------------------------------


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("transact")
    create_sqlite_table(tmp / "data")
    if "postgres" not in UNREACHABLE:
        await create_postgres_table()
    process = start_gateway(tmp, "hypercorn", config_yaml=server_config(tmp / "data"))
    process.data_dir = tmp / "data"  # type: ignore[attr-defined]
    yield process
    process.stop()
    if "postgres" not in UNREACHABLE:
        await drop_postgres_data()


async def session(client: Any, config: str) -> str:
    created = await client.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config))
    return created.token  # type: ignore[no-any-return]


def write_request(table: str, key: str, mailbox: str = "orders", idempotency_key: str = "", **row: Any) -> t.WriteRequest:
    request = t.WriteRequest(idempotency_key=idempotency_key)
    request.data.table = table
    request.data.operation = t.WRITE_OPERATION_INSERT
    request.data.row.update({"id": key, "customer": "c-42", "total": 12.5, **row})
    request.mailbox.mailbox = mailbox
    request.mailbox.payload = json.dumps({"order": key}).encode()
    request.mailbox.headers["traceparent"] = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    request.mailbox.destination = "orders.created"
    return request


@pytest.mark.case("write through the gateway")
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_write_commits_both_rows_and_a_retry_replays(
    gateway: GatewayProcess, client_factory: Any, transport: str, backend: str
) -> None:
    require(backend)
    client = client_factory(transport, gateway)
    token = await session(client, CONFIG[backend])
    key, mailbox = f"o-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    request = write_request(TABLE[backend], key, mailbox, idempotency_key=f"k-{key}")
    first = await client.call(WRITE, request, token)
    assert (first.mailbox_sequence, first.replayed) == (1, False)
    assert first.committed_at.ToNanoseconds() > 0
    again = await client.call(WRITE, request, token)  # applied again, the INSERT would be ALREADY_EXISTS
    assert again.replayed and (again.mailbox_sequence, again.committed_at) == (first.mailbox_sequence, first.committed_at)
    store = Store(backend, gateway.data_dir)  # type: ignore[attr-defined]
    assert await store.row(key) == (key, "c-42", None)
    # What the client wrote, not a copy of the row; its trace context travels in the headers.
    assert await store.mailbox_rows(mailbox) == [(1, request.mailbox.payload, dict(request.mailbox.headers), "orders.created")]
    second = await client.call(WRITE, write_request(TABLE[backend], key + "-2", mailbox), token)
    assert second.mailbox_sequence == 2


@pytest.mark.case("write through the gateway")
@pytest.mark.parametrize("backend", BACKENDS)
async def test_the_calls_trace_travels_in_the_mailbox_row(gateway: GatewayProcess, backend: str) -> None:
    """A mailbox row without trace headers gets the Write's own trace (tracing is on in this
    gateway): the listener's delivery continues the caller's trace."""
    require(backend)
    trace_id = uuid.uuid4().hex
    client = GrpcClient(gateway.grpc_target, metadata={"traceparent": f"00-{trace_id}-{uuid.uuid4().hex[:16]}-01"})
    try:
        token = await session(client, CONFIG[backend])
        key, mailbox = f"o-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
        request = write_request(TABLE[backend], key, mailbox)
        del request.mailbox.headers["traceparent"]
        request.mailbox.headers["order"] = key
        await client.call(WRITE, request, token)
    finally:
        await client.close()
    ((_, _, headers, _),) = await Store(backend, gateway.data_dir).mailbox_rows(mailbox)  # type: ignore[attr-defined]
    assert headers["order"] == key
    version, carried, span, _ = headers["traceparent"].split("-")
    assert (version, carried) == ("00", trace_id) and int(span, 16) != 0


@pytest.mark.case("bad input named")
@pytest.mark.parametrize("transport", TRANSPORTS)
@pytest.mark.parametrize("backend", BACKENDS)
async def test_write_refusals_name_the_field(gateway: GatewayProcess, client_factory: Any, transport: str, backend: str) -> None:
    require(backend)
    client = client_factory(transport, gateway)
    token = await session(client, CONFIG[backend])
    table = TABLE[backend]
    key = f"o-{uuid.uuid4().hex[:8]}"

    async def refused(request: t.WriteRequest) -> CallError:
        with pytest.raises(CallError) as caught:
            await client.call(WRITE, request, token)
        return caught.value

    injected = 'id"; DROP TABLE orders; --'
    cases: list[tuple[t.WriteRequest, str, tuple[str, ...]]] = [
        (write_request(table, key, **{injected: 1}), "INVALID_ARGUMENT", (f"data.row.{injected}",)),
        (write_request(f"{table}; DROP TABLE {table}", key), "INVALID_ARGUMENT", ("data.table",)),
        (write_request("prism_transact_mailbox", key), "INVALID_ARGUMENT", ("data.table",)),
        (write_request(table, key, mailbox="no spaces"), "INVALID_ARGUMENT", ("mailbox.mailbox",)),
        (write_request("", key), "INVALID_ARGUMENT", ("data.table",)),  # REQUIRED, inside data
        (write_request(table, key, mailbox=""), "INVALID_ARGUMENT", ("mailbox.mailbox",)),
        (t.WriteRequest(data=write_request(table, key).data), "INVALID_ARGUMENT", ("mailbox",)),
        (write_request(table, key, customer=None), "INVALID_ARGUMENT", ("data.row.customer",)),
    ]
    bad_operation = write_request(table, key)
    bad_operation.data.operation = 42  # type: ignore[assignment]  # a number the contract does not define
    cases.append((bad_operation, "INVALID_ARGUMENT", ("data.operation",)))
    update_missing = write_request(table, key + "-missing")
    update_missing.data.operation = t.WRITE_OPERATION_UPDATE
    cases.append((update_missing, "NOT_FOUND", ()))
    for request, code, fields in cases:
        error = await refused(request)
        assert (error.code, error.violations) == (code, fields), (request, error)
    await client.call(WRITE, write_request(table, key, idempotency_key=f"k-{key}"), token)
    assert (await refused(write_request(table, key))).code == "ALREADY_EXISTS"
    reused = await refused(write_request(table, key + "-other", idempotency_key=f"k-{key}"))
    assert (reused.code, reused.violations) == ("ALREADY_EXISTS", ("idempotencyKey",))
    if transport == "rest":
        assert (await refused(update_missing)).http_status == 404
        assert reused.http_status == 409
    store = Store(backend, gateway.data_dir)  # type: ignore[attr-defined]
    assert await store.query(f'SELECT count(*) FROM "{table}"') != []  # still there


@pytest.mark.case("sessions and configs")
@pytest.mark.parametrize("backend", BACKENDS)
async def test_write_needs_a_transact_session_and_declared_tables(
    gateway: GatewayProcess, client_factory: Any, backend: str
) -> None:
    require(backend)
    client = client_factory("grpc", gateway)
    kv = await session(client, "kv")
    with pytest.raises(CallError) as wrong_pattern:
        await client.call(WRITE, write_request(TABLE[backend], "x"), kv)
    assert wrong_pattern.value.code == "FAILED_PRECONDITION"
    # An inline config may name a namespace, never tables: one whose namespace declares none is refused.
    inline = config_pb2.ClientConfig(
        name="mine", pattern=config_pb2.ACCESS_PATTERN_TRANSACT, namespace="default",
        backend=config_pb2.BackendConfig(instance=INSTANCE[backend]),
    )
    with pytest.raises(CallError) as undeclared:
        await client.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config=inline))
    assert (undeclared.value.code, undeclared.value.violations) == ("INVALID_ARGUMENT", ("config.namespace",))
    inline.namespace = NAMESPACE[backend]
    created = await client.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config=inline))
    response = await client.call(WRITE, write_request(TABLE[backend], f"o-{uuid.uuid4().hex[:8]}"), created.token)
    assert response.mailbox_sequence >= 1


@pytest.mark.case("sessions and configs")
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_declared_table_that_does_not_match_stops_the_gateway(tmp_path: pathlib.Path, backend: str) -> None:
    require(backend)
    missing = f"missing_{RUN}"
    spec = "{type: sqlite}" if backend == "sqlite" else f'{{type: postgres, dsn: "{POSTGRES_DSN}", pool_size: 2}}'
    config = (
        f"backends: {{db: {spec}}}\nconfigs: []\n"
        f"transact: {{shop: {{backend: db, tables: {{{missing}: {{key: [id], columns: [id]}}}}}}}}\n"
    )
    with pytest.raises(RuntimeError) as stopped:
        start_gateway(tmp_path, "hypercorn", config_yaml=config)
    assert f"transact.shop.tables.{missing}: table '{missing}': no such table" in str(stopped.value)


@pytest.mark.case("transaction stream")
@pytest.mark.parametrize("path", ["grpc", "grpc-http"])
@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_transaction_over_grpc_commits_and_a_disconnect_rolls_back(
    gateway: GatewayProcess, backend: str, path: str
) -> None:
    """Through grpcio, on the gRPC port (grpc.aio) and the HTTP port (the ASGI app under
    Hypercorn): a committed transaction is there; one whose client goes away is not, and
    holds no lock afterwards (the same row is written at once)."""
    require(backend)
    target = gateway.grpc_target if path == "grpc" else f"127.0.0.1:{gateway.http_port}"
    store = Store(backend, gateway.data_dir)  # type: ignore[attr-defined]
    async with grpc.aio.insecure_channel(target) as channel:
        created = session_pb2.CreateSessionResponse.FromString(
            await channel.unary_unary("/prism.v1.SessionService/CreateSession")(
                session_pb2.CreateSessionRequest(config_name=CONFIG[backend]).SerializeToString(), timeout=WAIT
            )
        )
        open_stream = channel.stream_stream(
            TRANSACTION.path, request_serializer=t.TransactionRequest.SerializeToString,
            response_deserializer=t.TransactionResponse.FromString,
        )
        key, mailbox = f"o-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"

        async def begun() -> Any:
            call = open_stream(metadata=(("x-prism-session", created.token),), timeout=WAIT)
            await call.write(t.TransactionRequest(begin=t.TransactionRequest.Begin()))
            assert (await call.read()).transaction_id
            await call.write(t.TransactionRequest(data=data(TABLE[backend], key, t.WRITE_OPERATION_UPSERT, status="new")))
            assert (await call.read()).rows_affected == 1
            await call.write(t.TransactionRequest(mailbox=t.MailboxWrite(mailbox=mailbox, payload=b"x")))
            assert (await call.read()).mailbox_sequence >= 1
            return call

        call = await begun()
        call.cancel()  # the client goes away mid-transaction
        async with grpc.aio.insecure_channel(target) as other:  # a Write of the same row must not wait for it
            response = t.WriteResponse.FromString(
                await other.unary_unary(WRITE)(
                    write_request(TABLE[backend], key, mailbox, status="written").SerializeToString(),
                    metadata=(("x-prism-session", created.token),), timeout=WAIT,
                )
            )
        assert response.mailbox_sequence == 1  # the cancelled transaction's row never committed
        assert await store.row(key) == (key, "c-42", "written")

        call = await begun()
        await call.write(t.TransactionRequest(commit=t.TransactionRequest.Commit()))
        assert (await call.read()).HasField("committed_at")
        await call.done_writing()
        assert await call.code() == grpc.StatusCode.OK
        assert await store.row(key) == (key, "c-42", "new")
        assert [s for s, _, _ in await store.mailbox(mailbox)] == [1, 2]


# --- The Transaction stream's handler, called directly ----------------------------------------------


TRANSACTION = next(m for m in all_methods() if m.path == "/prism.v1.TransactService/Transaction")


class Stream:
    """One Transaction call: requests fed one at a time, responses read as the handler yields."""

    def __init__(self, service: TransactService, call: Call) -> None:
        self.inbox: asyncio.Queue[t.TransactionRequest | None] = asyncio.Queue()
        self.responses = service.Transaction(self._requests(), call)

    async def _requests(self) -> AsyncIterator[t.TransactionRequest]:
        while (request := await self.inbox.get()) is not None:
            yield request

    async def send(self, **step: Any) -> t.TransactionResponse:
        self.inbox.put_nowait(t.TransactionRequest(**step))
        return await self.next()

    async def next(self) -> t.TransactionResponse:
        async with asyncio.timeout(WAIT):
            return await anext(self.responses)

    async def refused(self, code: grpc.StatusCode, **step: Any) -> PrismError:
        with pytest.raises(PrismError) as caught:
            await (self.send(**step) if step else self.next())
        assert caught.value.code == code, caught.value
        return caught.value


class Local:
    """An in-process gateway's Transact service over one backend, and sessions of its config."""

    def __init__(self, settings: Settings, backend: str) -> None:
        self.settings, self.backend = settings, backend
        self.backends = Backends(settings)
        self.service = TransactService(self.backends.for_transact, settings)
        self.sessions = MemorySessionStore(idle_timeout=60, max_lifetime=600)
        self.config = from_settings(next(c for c in settings.configs if c.name == CONFIG[backend]), settings)
        self.store = Store(backend, settings.data_dir)

    async def start(self) -> None:
        await self.backends.start()
        await self.service.prepare(self.backends.adapters("TRANSACT"))

    async def stream(self) -> tuple[Stream, Any]:
        token, record = await self.sessions.create("tester", self.config)
        call = Call(TRANSACTION, record, token, "grpc", Identity("tester", frozenset(), "session"), "TRANSACT.Transaction")
        return Stream(self.service, call), record

    @property
    def adapter(self) -> TransactAdapter:
        return self.backends.for_transact(self.config)

    async def assert_clean(self) -> None:
        adapter = self.adapter
        for transaction in list(adapter._open):  # type: ignore[attr-defined]
            async with asyncio.timeout(WAIT):  # a rollback shielded from a cancelled handler finishes
                await transaction.finished.wait()
        assert not adapter._open  # type: ignore[attr-defined]
        if isinstance(adapter, PostgresTransact):
            assert adapter.pool._pool is not None
            for holder in adapter.pool._pool._holders:
                assert holder._con is None or holder._con.is_closed() or not holder._con.is_in_transaction()

    async def close(self) -> None:
        await self.backends.close()


@pytest.fixture(params=BACKENDS)
async def local(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Local]:
    require(request.param)
    if request.param == "postgres":
        await create_postgres_table()
    create_sqlite_table(tmp_path / "data")
    path = tmp_path / "prism.yaml"
    path.write_text(server_config(tmp_path / "data"))
    made = Local(load_settings(path, environ={}), request.param)
    await made.start()
    yield made
    await made.close()


def data(table: str, key: str, operation: int = t.WRITE_OPERATION_INSERT, **row: Any) -> t.DataWrite:
    message = t.DataWrite(table=table, operation=operation)  # type: ignore[arg-type]
    message.row.update({"id": key, **row})
    return message


@pytest.mark.case("transaction stream")
async def test_a_transaction_commits(local: Local) -> None:
    stream, _ = await local.stream()
    table, key, mailbox = TABLE[local.backend], f"o-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    assert len((await stream.send(begin=t.TransactionRequest.Begin(timeout_ms=3000))).transaction_id) == 32
    assert (await stream.send(data=data(table, key, customer="c"))).rows_affected == 1
    assert (await stream.send(data=data(table, key, t.WRITE_OPERATION_UPDATE, status="paid"))).rows_affected == 1
    assert (await stream.send(mailbox=t.MailboxWrite(mailbox=mailbox, payload=b"1"))).mailbox_sequence == 1
    assert (await stream.send(mailbox=t.MailboxWrite(mailbox=mailbox, payload=b"2"))).mailbox_sequence == 2
    assert await local.store.row(key) is None  # not before the commit
    committed = await stream.send(commit=t.TransactionRequest.Commit())
    assert committed.HasField("committed_at")
    with pytest.raises(StopAsyncIteration):
        await stream.next()
    assert await local.store.row(key) == (key, "c", "paid")
    assert [s for s, _, _ in await local.store.mailbox(mailbox)] == [1, 2]
    await local.assert_clean()


async def _begun(local: Local, timeout_ms: int = 0) -> tuple[Stream, Any, str, str]:
    stream, record = await local.stream()
    key, mailbox = f"o-{uuid.uuid4().hex[:8]}", f"m-{uuid.uuid4().hex[:8]}"
    await stream.send(begin=t.TransactionRequest.Begin(timeout_ms=timeout_ms))
    assert (await stream.send(data=data(TABLE[local.backend], key))).rows_affected == 1
    assert (await stream.send(mailbox=t.MailboxWrite(mailbox=mailbox, payload=b"x"))).mailbox_sequence == 1
    return stream, record, key, mailbox


async def _nothing_written(local: Local, key: str, mailbox: str) -> None:
    await local.assert_clean()
    assert await local.store.row(key) is None
    assert await local.store.mailbox(mailbox) == []


@pytest.mark.case("transaction stream")
async def test_rollback_on_request(local: Local) -> None:
    stream, _, key, mailbox = await _begun(local)
    assert (await stream.send(rollback=t.TransactionRequest.Rollback())).rolled_back
    with pytest.raises(StopAsyncIteration):
        await stream.next()
    await _nothing_written(local, key, mailbox)


@pytest.mark.case("transaction stream")
async def test_rollback_when_the_requests_end_without_a_commit(local: Local) -> None:
    stream, _, key, mailbox = await _begun(local)
    stream.inbox.put_nowait(None)  # the client half-closes
    assert (await stream.next()).rolled_back
    with pytest.raises(StopAsyncIteration):
        await stream.next()
    await _nothing_written(local, key, mailbox)


@pytest.mark.case("transaction stream")
async def test_rollback_on_an_error(local: Local) -> None:
    stream, _, key, mailbox = await _begun(local)
    error = await stream.refused(grpc.StatusCode.INVALID_ARGUMENT, data=data(TABLE[local.backend], "y", nope=1))
    assert error.field == "data.row.nope"
    await _nothing_written(local, key, mailbox)
    stream, _, key, mailbox = await _begun(local)
    await stream.refused(grpc.StatusCode.ALREADY_EXISTS, data=data(TABLE[local.backend], key))  # the database refuses
    await _nothing_written(local, key, mailbox)


@pytest.mark.case("transaction stream")
async def test_rollback_at_the_timeout(local: Local) -> None:
    stream, _, key, mailbox = await _begun(local, timeout_ms=300)
    error = await stream.refused(grpc.StatusCode.DEADLINE_EXCEEDED)  # no request came in time
    assert "rolled back" in error.message
    await _nothing_written(local, key, mailbox)


@pytest.mark.case("transaction stream")
async def test_rollback_when_the_client_disconnects(local: Local) -> None:
    """The transport cancels the handler's task when the client goes away, here while the
    handler waits for the next request; then it closes the generator."""
    stream, _, key, mailbox = await _begun(local)
    waiting = asyncio.ensure_future(stream.next())
    await asyncio.sleep(0.05)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await stream.responses.aclose()  # type: ignore[attr-defined]
    await _nothing_written(local, key, mailbox)


@pytest.mark.case("transaction stream")
async def test_rollback_when_the_session_ends(local: Local) -> None:
    stream, record, key, mailbox = await _begun(local)
    waiting = asyncio.ensure_future(stream.next())
    await asyncio.sleep(0.05)
    await local.sessions.close(record)
    with pytest.raises(PrismError) as ended:
        await waiting
    assert ended.value.code == grpc.StatusCode.UNAUTHENTICATED
    await _nothing_written(local, key, mailbox)


@pytest.mark.case("transaction stream")
async def test_the_stream_is_checked(local: Local) -> None:
    stream, _ = await local.stream()
    error = await stream.refused(grpc.StatusCode.INVALID_ARGUMENT, commit=t.TransactionRequest.Commit())
    assert error.field == "begin"
    stream, _ = await local.stream()
    error = await stream.refused(grpc.StatusCode.INVALID_ARGUMENT, begin=t.TransactionRequest.Begin(timeout_ms=60_000))
    assert error.field == "begin.timeoutMs"
    stream, _ = await local.stream()
    stream.inbox.put_nowait(None)  # closed before beginning: nothing to answer
    with pytest.raises(StopAsyncIteration):
        await stream.next()
    stream, _, key, mailbox = await _begun(local)
    error = await stream.refused(grpc.StatusCode.INVALID_ARGUMENT, begin=t.TransactionRequest.Begin())
    assert error.field == "begin"
    await _nothing_written(local, key, mailbox)
    stream, _, key, mailbox = await _begun(local)
    error = await stream.refused(grpc.StatusCode.INVALID_ARGUMENT, data=data("prism_kv", "x"))
    assert error.field == "data.table"
    await _nothing_written(local, key, mailbox)
