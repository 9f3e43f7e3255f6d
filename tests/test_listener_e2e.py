"""Issue 14, end to end through a real ``prism serve`` whose processes run the mailbox listener
(``mailbox_listener.in_gateway``, the default), as an application would see it:

- a Write over REST becomes a message that a Queue subscriber receives over server-sent events,
  on SQLite and on PostgreSQL (each into a Queue on the same backend), with the row's payload,
  its headers (the caller's ``traceparent``) and where it came from, and the delivery is a span
  in the writer's trace;
- a Transaction through grpcio (the bidirectional stream on the gRPC port: Begin, data, mailbox,
  Commit) becomes a PubSub delivery: SQLite into the in-process broker, PostgreSQL into Redis;
- what a delivered namespace refuses at Write (an unrouted mailbox, a PubSub destination that is
  not a subject, the listener's own headers);
- the README's Transact example runs as written against the embedded default, and its
  configuration example validates.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import re
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import grpc
import pytest
import yaml

from adapters.transact.base import MAILBOX_HEADER, SEQUENCE_HEADER
from app.settings import Settings
from prism.v1 import pubsub_pb2 as ps
from prism.v1 import queue_pb2 as q
from prism.v1 import session_pb2
from prism.v1 import transact_pb2 as t
from tests.clients import CallError, GrpcClient, RestClient
from tests.gateway_process import ROOT, GatewayProcess, start_gateway
from tests.servers import POSTGRES_DSN, REDIS_URL, purge_namespaces, unreachable
from tests.test_readme import section

RUN = uuid.uuid4().hex[:8]
BACKENDS = ("sqlite", "postgres")
NAMESPACE = {b: f"listen-{b}-{RUN}" for b in BACKENDS}
OUT = f"listen-out-{RUN}"  # the destinations' namespace
TABLE = {"sqlite": "orders", "postgres": f"listen_orders_{RUN}"}
UNREACHABLE = {name: why for name, url in (("postgres", POSTGRES_DSN), ("redis", REDIS_URL)) if (why := unreachable(url))}
WRITE = "/prism.v1.TransactService/Write"
TRANSACTION = "/prism.v1.TransactService/Transaction"
WAIT = 10.0
TRACE_ID = uuid.uuid4().hex
TRACEPARENT = f"00-{TRACE_ID}-b7ad6b7169203331-01"


def server_config(tmp: pathlib.Path) -> str:
    columns = {"key": ["id"], "columns": ["id", "customer", "total", "status"], "create": True}
    return json.dumps({
        "data_dir": str(tmp / "data"),
        "tracing": {"exporter": "file", "file": str(tmp / "spans.jsonl")},
        "backends": {
            "lite": {"type": "sqlite"},
            "pg": {"type": "postgres", "dsn": POSTGRES_DSN, "pool_size": 4},
            "mem": {"type": "memory"},
            "cache": {"type": "redis", "url": REDIS_URL},
        },
        "configs": [
            {"name": "tx-sqlite", "pattern": "TRANSACT", "backend": "lite", "namespace": NAMESPACE["sqlite"]},
            {"name": "tx-postgres", "pattern": "TRANSACT", "backend": "pg", "namespace": NAMESPACE["postgres"]},
            {"name": "tx-strict", "pattern": "TRANSACT", "backend": "lite", "namespace": f"strict-{RUN}"},
            {"name": "queue-sqlite", "pattern": "QUEUE", "backend": "lite", "namespace": OUT},
            {"name": "queue-postgres", "pattern": "QUEUE", "backend": "pg", "namespace": OUT},
            {"name": "events-sqlite", "pattern": "PUBSUB", "backend": "mem", "namespace": OUT},
            {"name": "events-postgres", "pattern": "PUBSUB", "backend": "cache", "namespace": OUT},
        ],
        "transact": {
            **{
                NAMESPACE[b]: {
                    "backend": "lite" if b == "sqlite" else "pg",
                    "tables": {TABLE[b]: columns},
                    "deliver_to": f"queue-{b}",  # every mailbox to the Queue …
                    "mailboxes": {"alerts": {"deliver_to": f"events-{b}"}},  # … but alerts to PubSub
                }
                for b in BACKENDS
            },
            f"strict-{RUN}": {"backend": "lite", "tables": {"orders": columns}, "mailboxes": {"audit": {"deliver_to": "queue-sqlite"}}},
        },
    })  # fmt: skip


@pytest.fixture(scope="module")
async def gateway(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[GatewayProcess]:
    for name, why in UNREACHABLE.items():
        pytest.skip(f"{name}: {why}")  # both cases of each test need them; PRISM_REQUIRE_BACKENDS=1 fails
    tmp = tmp_path_factory.mktemp("listener")
    process = start_gateway(tmp, "hypercorn", config_yaml=server_config(tmp))
    process.tmp = tmp  # type: ignore[attr-defined]
    yield process
    process.stop()
    con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
    try:
        await con.execute(f'DROP TABLE IF EXISTS "{TABLE["postgres"]}"')
        for table in ("prism_transact_mailbox", "prism_transact_heads", "prism_transact_keys", "prism_transact_cursors"):
            if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                await con.execute(f"DELETE FROM {table} WHERE namespace = $1", NAMESPACE["postgres"])
    finally:
        await con.close()
    await purge_namespaces(["postgres", "redis"], [OUT])


async def session(client: Any, config: str) -> str:
    created = await client.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config))
    return created.token  # type: ignore[no-any-return]


def write_request(backend: str, mailbox: str, destination: str, payload: bytes) -> t.WriteRequest:
    request = t.WriteRequest()
    request.data.table = TABLE[backend]
    request.data.operation = t.WRITE_OPERATION_INSERT
    request.data.row.update({"id": uuid.uuid4().hex, "customer": "c-42", "total": 12.5})
    request.mailbox.mailbox, request.mailbox.destination, request.mailbox.payload = mailbox, destination, payload
    request.mailbox.headers["traceparent"] = TRACEPARENT
    request.mailbox.headers["order-kind"] = "retail"
    return request


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_rest_write_reaches_a_queue_subscriber_over_sse(gateway: GatewayProcess, backend: str) -> None:
    rest = RestClient(gateway.base_url)
    topic = f"orders.{uuid.uuid4().hex[:8]}"
    received: asyncio.Queue[q.QueueMessage] = asyncio.Queue(maxsize=16)
    try:
        tx, queue = await session(rest, f"tx-{backend}"), await session(rest, f"queue-{backend}")

        async def subscriber() -> None:
            request = q.QueueSubscribeRequest(topic=topic, consumer_group="shipping", start=q.START_POSITION_EARLIEST)
            async for message in rest.stream("/prism.v1.QueueService/Subscribe", request, queue):
                await received.put(message)  # type: ignore[arg-type]

        listening = asyncio.create_task(subscriber())
        try:
            payloads = [json.dumps({"order": i}).encode() for i in range(3)]
            for payload in payloads:
                written = await rest.call(WRITE, write_request(backend, "orders", topic, payload), tx)
            started = time.monotonic()
            messages = []
            for _ in payloads:  # a key's next message comes once the one before is acknowledged
                messages.append(await asyncio.wait_for(received.get(), WAIT))
                ack = q.AcknowledgeRequest(topic=topic, consumer_group="shipping", message_ids=[messages[-1].message_id])
                await rest.call("/prism.v1.QueueService/Acknowledge", ack, queue)
            latency = time.monotonic() - started
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
    finally:
        await rest.close()
    assert [m.payload for m in messages] == payloads  # in order: one partition key, the mailbox
    first = messages[0]
    assert (first.topic, first.partition_key, first.delivery_attempt) == (topic, "orders", 1)
    sequence = written.mailbox_sequence - 2  # type: ignore[attr-defined]
    assert dict(first.headers) == {
        "traceparent": TRACEPARENT, "order-kind": "retail", MAILBOX_HEADER: "orders", SEQUENCE_HEADER: str(sequence)
    }
    assert latency < 2.0  # woken by the commit, not a polling interval (poll_seconds is 5)
    # The delivery is a span in the writer's trace (spans are exported in batches: wait for it).
    spans_file = gateway.tmp / "spans.jsonl"  # type: ignore[attr-defined]
    deadline = time.monotonic() + 15
    while True:
        lines = spans_file.read_text().splitlines() if spans_file.exists() else []
        delivered = [s for s in map(json.loads, lines) if s["name"] == "mailbox deliver" and s["context"]["trace_id"] == f"0x{TRACE_ID}"]
        if delivered or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    assert delivered and delivered[0]["attributes"]["prism.mailbox"] == "orders"


@pytest.mark.parametrize("backend", BACKENDS)
async def test_a_grpc_transaction_becomes_a_pubsub_delivery(gateway: GatewayProcess, backend: str) -> None:
    subject = f"alerts.{uuid.uuid4().hex[:8]}"
    subscriber = GrpcClient(gateway.grpc_target)
    received: asyncio.Queue[ps.PubSubSubscribeResponse] = asyncio.Queue(maxsize=16)
    subscribed = asyncio.Event()
    try:
        events = await session(subscriber, f"events-{backend}")

        async def subscribe() -> None:
            request = ps.PubSubSubscribeRequest(subject="alerts.>")
            async for response in subscriber.stream("/prism.v1.PubSubService/Subscribe", request, events):
                if response.HasField("message"):  # type: ignore[attr-defined]
                    await received.put(response)  # type: ignore[arg-type]
                else:
                    subscribed.set()  # the first answer: the subscription is in force

        listening = asyncio.create_task(subscribe())
        try:
            await asyncio.wait_for(subscribed.wait(), WAIT)
            async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
                token = session_pb2.CreateSessionResponse.FromString(
                    await channel.unary_unary("/prism.v1.SessionService/CreateSession")(
                        session_pb2.CreateSessionRequest(config_name=f"tx-{backend}").SerializeToString(), timeout=WAIT
                    )
                ).token
                call = channel.stream_stream(
                    TRANSACTION, request_serializer=t.TransactionRequest.SerializeToString,
                    response_deserializer=t.TransactionResponse.FromString,
                )(metadata=(("x-prism-session", token),), timeout=WAIT)  # fmt: skip
                await call.write(t.TransactionRequest(begin=t.TransactionRequest.Begin()))
                assert (await call.read()).transaction_id
                data = t.DataWrite(table=TABLE[backend], operation=t.WRITE_OPERATION_INSERT)
                data.row.update({"id": uuid.uuid4().hex, "customer": "c-7", "status": "flagged"})
                await call.write(t.TransactionRequest(data=data))
                assert (await call.read()).rows_affected == 1
                mailbox = t.MailboxWrite(mailbox="alerts", destination=subject, payload=b"fraud?", headers={"traceparent": TRACEPARENT})
                await call.write(t.TransactionRequest(mailbox=mailbox))
                sequence = (await call.read()).mailbox_sequence
                assert not received.qsize()  # nothing is delivered before the commit
                await call.write(t.TransactionRequest(commit=t.TransactionRequest.Commit()))
                assert (await call.read()).HasField("committed_at")
                await call.done_writing()
                assert await call.code() == grpc.StatusCode.OK
            delivery = (await asyncio.wait_for(received.get(), WAIT)).message
        finally:
            listening.cancel()
            await asyncio.gather(listening, return_exceptions=True)
    finally:
        await subscriber.close()
    assert (delivery.subject, delivery.data) == (subject, b"fraud?")
    assert dict(delivery.headers) == {"traceparent": TRACEPARENT, MAILBOX_HEADER: "alerts", SEQUENCE_HEADER: str(sequence)}


async def test_a_delivered_namespace_refuses_what_could_not_be_delivered(gateway: GatewayProcess) -> None:
    client = GrpcClient(gateway.grpc_target)
    try:
        tx, strict = await session(client, "tx-sqlite"), await session(client, "tx-strict")

        async def refused(request: t.WriteRequest, token: str) -> CallError:
            with pytest.raises(CallError) as caught:
                await client.call(WRITE, request, token)
            assert caught.value.code == "INVALID_ARGUMENT", caught.value
            return caught.value

        error = await refused(write_request("sqlite", "alerts", "a..b", b"x"), tx)  # a PubSub route
        assert error.violations == ("mailbox.destination",)
        error = await refused(write_request("sqlite", "orders", "", b"x"), strict)  # only `audit` is routed there
        assert error.violations == ("mailbox.mailbox",) and "audit" in error.message
        reserved = write_request("sqlite", "orders", "", b"x")
        reserved.mailbox.headers[SEQUENCE_HEADER] = "7"
        assert (await refused(reserved, tx)).violations == (f"mailbox.headers[{SEQUENCE_HEADER}]",)
        await client.call(WRITE, write_request("sqlite", "audit", "", b"x"), strict)  # routed: accepted
    finally:
        await client.close()


# --- The README's Transact section ---------------------------------------------------------------


def test_readme_transact_example_runs_as_written(tmp_path: pathlib.Path) -> None:
    """Against the embedded default (no configuration): the Writes, then the delivered message
    read from the `queue` config's topic over SSE."""
    blocks = re.findall(r"```sh\n(.*?)```", section("Transact"), re.S)
    assert len(blocks) == 1
    (block,) = blocks
    gateway = start_gateway(tmp_path, "hypercorn")
    try:
        result = subprocess.run(
            ["bash", "-c", "set -eu\n" + block.replace("127.0.0.1:8080", f"127.0.0.1:{gateway.http_port}")],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin"},
        )  # fmt: skip
    finally:
        gateway.stop()
    assert result.returncode == 0, result.stdout + result.stderr
    shown = [line[2:] for line in block.splitlines() if line.startswith("# ")]
    printed = [_comparable(line) for line in result.stdout.splitlines()]
    for line in shown:
        assert _comparable(line) in printed, (line, result.stdout)


def _comparable(line: str) -> Any:
    """A printed line as the README shows it: JSON as data (a map's order varies), without the
    times, which differ from run to run."""
    text, _, status = line.partition(" (HTTP")
    prefix = "data: " if text.startswith("data: ") else ""
    try:
        value = json.loads(text.removeprefix(prefix))
    except ValueError:
        return line
    if isinstance(value, dict):
        value.pop("committedAt", None)
        value.pop("publishedAt", None)
    return (prefix, value, status)


def test_readme_transact_configuration_validates() -> None:
    (example,) = re.findall(r"```yaml\n(.*?)```", section("Transact"), re.S)
    data = yaml.safe_load(example)
    data["backends"] = {"pg": {"type": "postgres"}, "cache": {"type": "redis"}}  # declared elsewhere in a real file
    settings = Settings.model_validate(data)
    assert settings.transact["shop"].route("alerts") == "shop-alerts"
    assert settings.transact["shop"].route("orders") == "shop-events"
    assert settings.mailbox_listener == Settings().mailbox_listener  # the defaults, as shown


def test_prism_listener_refuses_a_destination_it_cannot_reach(tmp_path: pathlib.Path) -> None:
    """Alone, the listener would publish into an in-process broker no gateway reads: it exits 2
    naming the key, as a bad configuration does."""
    config = tmp_path / "prism.yaml"
    config.write_text(json.dumps({
        "data_dir": str(tmp_path / "data"),
        "transact": {"default": {"backend": "sqlite", "tables": {"orders": {"key": ["id"], "columns": ["id"], "create": True}},
                                 "deliver_to": "events"}},
    }))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "listener", "--config", str(config)], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 2, result.stderr
    assert "transact.default.deliver_to: config 'events' is on backend 'memory'" in result.stderr
