"""The embedded native gRPC port (app/transports/grpc_native.py) on the wire.

- Refused calls cost nothing: a caller without credentials is answered from its metadata
  before its message is read (flow control keeps the rest with the client), so 40 refused
  20 MiB calls leave the worker's RSS where it was (read from /proc, real ``prism serve``); and
  a call that fails after its message was read holds no request bytes once answered (traced
  in-process with the cyclic GC off: nothing waits for a GC pass).
- Broken request streams get INVALID_ARGUMENT at once, not silence until the deadline: zero
  messages, a truncated one, or two for a unary or server-streaming method (a raw HTTP/2
  client, the ``h2`` package).
- Server reflection answers on ``grpc.reflection.v1`` (what grpcurl, Postman and Kreya ask
  first) as on ``v1alpha``: a grpcurl-style listing, file descriptors and a method resolved.
- Client-streaming and bidirectional methods are admitted when the call opens: credentials,
  then the session's pattern, before a request is read.
"""

from __future__ import annotations

import asyncio
import gc
import pathlib
import struct
import time
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field

import grpc
import h2.config
import h2.connection
import h2.events
import pytest
from google.protobuf import descriptor_database, descriptor_pb2, descriptor_pool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2

from app.auth import hash_key
from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import pubsub_pb2 as ps
from prism.v1 import session_pb2
from tests.clients import status_violations
from tests.gateway_process import GatewayProcess, free_port, start_gateway

MiB = 1024 * 1024
API_KEY = "prism_native-grpc-key-0123456789abcdef"
KV_SET = "/prism.v1.KeyValueService/Set"
KV_GET = "/prism.v1.KeyValueService/Get"
SUBSCRIBE = "/prism.v1.PubSubService/Subscribe"
CREATE_SESSION = "/prism.v1.SessionService/CreateSession"
TRANSACTION = "/prism.v1.TransactService/Transaction"
SESSION_HEADER = "x-prism-session"
INVALID_ARGUMENT = str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
UNAUTHENTICATED = str(grpc.StatusCode.UNAUTHENTICATED.value[0])
REPLY_SECONDS = 5  # generous: a bound so a silent server fails the test, not a speed check

SECURED_CONFIG = f"""
backends:
  mem: {{type: memory}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: mem, namespace: native}}
namespaces:
  - {{name: native}}
auth:
  api_keys:
    - {{identity: native-bot, sha256: {hash_key(API_KEY)}, roles: [writer]}}
policies:
  - {{role: writer, namespaces: [native], operations: ["SESSION.*", "KEY_VALUE.*"]}}
"""


def frame(payload: bytes) -> bytes:
    """One length-prefixed gRPC message: flag 0, 4-byte big-endian length, the message."""
    return struct.pack(">BI", 0, len(payload)) + payload


# --------------------------------------------------------------------------------------------
# A raw HTTP/2 gRPC client: exactly the bytes given, and what came back


@dataclass
class Reply:
    fields: dict[str, str] = field(default_factory=dict)  # response headers and trailers
    data: bytes = b""
    sent: int = 0  # body bytes flow control let through before the call ended
    ended: bool = False

    @property
    def status(self) -> str | None:
        return self.fields.get("grpc-status")

    @property
    def message(self) -> str:
        return self.fields.get("grpc-message", "")


async def raw_call(port: int, path: str, body: bytes, headers: dict[str, str]) -> Reply:
    """POST ``body`` as a gRPC request (sent as fast as flow control allows, then END_STREAM).
    A call not answered within REPLY_SECONDS fails the test instead of hanging it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
    conn.initiate_connection()
    stream = conn.get_next_available_stream_id()
    request_headers = [
        (":method", "POST"), (":scheme", "http"), (":authority", f"127.0.0.1:{port}"), (":path", path),
        ("content-type", "application/grpc"), ("te", "trailers"), *headers.items(),
    ]
    conn.send_headers(stream, request_headers, end_stream=not body)
    reply = Reply()
    try:
        async with asyncio.timeout(REPLY_SECONDS):
            while not reply.ended:
                while reply.sent < len(body):
                    size = min(conn.local_flow_control_window(stream), conn.max_outbound_frame_size, len(body) - reply.sent)
                    if size <= 0:
                        break
                    conn.send_data(stream, body[reply.sent : reply.sent + size], end_stream=reply.sent + size == len(body))
                    reply.sent += size
                writer.write(conn.data_to_send())
                await writer.drain()
                chunk = await reader.read(65536)
                if not chunk:
                    break
                for event in conn.receive_data(chunk):
                    if isinstance(event, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                        reply.fields.update(dict(event.headers))  # type: ignore[arg-type]
                    elif isinstance(event, h2.events.DataReceived):
                        reply.data += event.data
                        conn.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
                    elif isinstance(event, (h2.events.StreamEnded, h2.events.StreamReset)):
                        reply.ended = True
    finally:
        writer.close()
    return reply


# --------------------------------------------------------------------------------------------
# Worker memory, from /proc


def _children(pid: int) -> list[int]:
    found = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def _listening_inodes(port: int) -> set[str]:
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in pathlib.Path(table).read_text().splitlines()[1:]:
            columns = line.split()
            if columns[3] == "0A" and int(columns[1].rsplit(":", 1)[1], 16) == port:  # LISTEN
                inodes.add(columns[9])
    return inodes


def grpc_worker(gateway: GatewayProcess) -> int:
    """The process that holds the gateway's gRPC listening socket (Granian's worker)."""
    sockets = {f"socket:[{inode}]" for inode in _listening_inodes(gateway.grpc_port)}
    todo = [gateway.process.pid]
    while todo:
        pid = todo.pop()
        for fd in pathlib.Path(f"/proc/{pid}/fd").iterdir():
            try:
                if str(fd.readlink()) in sockets:
                    return pid
            except OSError:
                continue
        todo += _children(pid)
    raise AssertionError(f"no process of {gateway.process.pid} listens on {gateway.grpc_port}")


def rss_mib(pid: int) -> float:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for {pid}")


async def settled_rss(pid: int, bound: float, seconds: float = 5) -> float:
    """RSS once it is under ``bound``, or the last reading after ``seconds``. grpc core keeps
    its socket read buffers (a few MiB a connection, while a big message streams in) until the
    connection idles; what a refused call must not leave is memory held after that."""
    for _ in range(int(seconds * 4)):
        if (rss := rss_mib(pid)) < bound:
            return rss
        await asyncio.sleep(0.25)
    return rss_mib(pid)


@pytest.fixture
def secured(tmp_path: pathlib.Path) -> Iterator[GatewayProcess]:
    """A fresh gateway with API keys (Granian, the default server), for one RSS measurement."""
    gateway = start_gateway(tmp_path, "granian", config_yaml=SECURED_CONFIG)
    yield gateway
    gateway.stop()


@pytest.fixture
def dev(tmp_path: pathlib.Path) -> Iterator[GatewayProcess]:
    """A fresh gateway with no authentication (Granian, embedded defaults)."""
    gateway = start_gateway(tmp_path, "granian")
    yield gateway
    gateway.stop()


@pytest.mark.parametrize(
    ("gateway_name", "calls", "size"),
    [("secured", 40, 20 * MiB), ("dev", 70, 17 * MiB)],
    ids=["api-keys-40x20MiB", "dev-70x17MiB"],
)
async def test_refused_large_calls_leave_worker_memory_flat(
    request: pytest.FixtureRequest, gateway_name: str, calls: int, size: int
) -> None:
    """Set calls with no credentials and no session, each UNAUTHENTICATED: the handler answers
    from the metadata and never reads the message."""
    gateway: GatewayProcess = request.getfixturevalue(gateway_name)
    worker = grpc_worker(gateway)
    options = [("grpc.max_send_message_length", 64 * MiB)]
    async with grpc.aio.insecure_channel(gateway.grpc_target, options=options) as channel:
        set_value = channel.unary_unary(KV_SET)
        for _ in range(3):  # warm the refusal path with small calls
            with pytest.raises(grpc.aio.AioRpcError):
                await set_value(kv.SetRequest(key="k", value=b"v").SerializeToString(), timeout=10)
        before = rss_mib(worker)
        message = kv.SetRequest(key="big", value=b"x" * size).SerializeToString()
        for _ in range(calls):
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await set_value(message, timeout=30)
            assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED, refused.value
        right_after = rss_mib(worker)
    # The connection closed: grpc core's read buffers of it are gone too.
    after = await settled_rss(worker, before + 50)
    assert after - before < 50, (
        f"worker RSS {before:.0f} MB → {right_after:.0f} MB after {calls} refused calls, {after:.0f} MB 5 s later"
    )


async def test_refused_call_is_answered_before_its_body_is_read(secured: GatewayProcess) -> None:
    """The status comes while most of a 20 MiB body is still with the client: the gateway let
    in at most its HTTP/2 flow-control window (64 KiB or 4 MiB here), never the message."""
    body = frame(kv.SetRequest(key="big", value=b"x" * (20 * MiB)).SerializeToString())
    reply = await raw_call(secured.grpc_port, KV_SET, body, {})
    assert reply.status == UNAUTHENTICATED, reply
    assert reply.sent < len(body) // 2, f"the gateway let {reply.sent} of {len(body)} bytes in before refusing"


async def test_client_streaming_checks_credentials_first(secured: GatewayProcess) -> None:
    metadata = (("x-api-key", API_KEY),)
    async with grpc.aio.insecure_channel(secured.grpc_target) as channel:
        transaction = channel.stream_stream(TRANSACTION)
        with pytest.raises(grpc.aio.AioRpcError) as anonymous:
            await transaction(iter(()), timeout=10).read()
        assert anonymous.value.code() == grpc.StatusCode.UNAUTHENTICATED
        created = session_pb2.CreateSessionResponse.FromString(
            await channel.unary_unary(CREATE_SESSION)(
                session_pb2.CreateSessionRequest(config_name="kv").SerializeToString(), metadata=metadata, timeout=10
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as known:  # admitted when it opens, before a request is read
            await transaction(iter(()), metadata=((SESSION_HEADER, created.token),), timeout=10).read()
        assert known.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "TransactService/Transaction needs ACCESS_PATTERN_TRANSACT" in (known.value.details() or "")


# --------------------------------------------------------------------------------------------
# Failed calls hold no request bytes: an in-process gateway, traced


@pytest.fixture
async def in_process(tmp_path: pathlib.Path) -> AsyncIterator[str]:
    """The gateway's gRPC server on this process's loop (values up to 1 MiB); its target."""
    from app.gateway import Gateway
    from app.settings import load_settings

    port = free_port()
    settings = load_settings(
        environ={
            "PRISM_SECRET_KEY": "k" * 32,
            "PRISM_DATA_DIR": str(tmp_path),
            "PRISM_GRPC__PORT": str(port),
            "PRISM_LIMITS__MAX_VALUE_BYTES": str(MiB),
        }
    )
    gateway = Gateway(settings)
    await gateway.start()
    yield f"127.0.0.1:{port}"
    await gateway.close()


async def test_failed_calls_hold_no_request_bytes(in_process: str) -> None:
    """Calls refused before and after their 1.3 MiB message was read, with the cyclic GC off:
    once answered, none of them holds its request (no traceback or frame keeps it)."""
    options = [("grpc.max_send_message_length", 64 * MiB)]
    async with grpc.aio.insecure_channel(in_process, options=options) as channel:
        unary = channel.unary_unary(CREATE_SESSION)
        created = session_pb2.CreateSessionResponse.FromString(
            await unary(session_pb2.CreateSessionRequest(config_name="kv-memory").SerializeToString(), timeout=10)
        )
        set_value = channel.unary_unary(KV_SET)
        session = ((SESSION_HEADER, created.token),)
        value = b"x" * (MiB + MiB // 3)
        cases = [
            ((), kv.SetRequest(key="k", value=value), grpc.StatusCode.UNAUTHENTICATED),  # never read
            (session, kv.SetRequest(key="", value=value), grpc.StatusCode.INVALID_ARGUMENT),  # REQUIRED key
            (session, kv.SetRequest(key="k", value=value), grpc.StatusCode.RESOURCE_EXHAUSTED),  # over the limit
        ]
        for metadata, message, _ in cases:  # warm up
            with pytest.raises(grpc.aio.AioRpcError):
                await set_value(message.SerializeToString(), metadata=metadata, timeout=10)
        gc.collect()
        gc.disable()
        tracemalloc.start()
        try:
            for metadata, message, code in cases * 10:
                with pytest.raises(grpc.aio.AioRpcError) as failed:
                    await set_value(message.SerializeToString(), metadata=metadata, timeout=10)
                assert failed.value.code() == code, failed.value
            await asyncio.sleep(0.2)  # the server's call tasks finish
            held = tracemalloc.get_traced_memory()[0]
        finally:
            tracemalloc.stop()
            gc.enable()
    assert held < 2 * len(value), f"{held / MiB:.1f} MiB still held after 30 failed calls"


async def test_message_over_the_grpc_limit_is_resource_exhausted(in_process: str) -> None:
    """grpc core's own size check still answers an admitted caller (limits.max_request_bytes)."""
    options = [("grpc.max_send_message_length", 64 * MiB)]
    async with grpc.aio.insecure_channel(in_process, options=options) as channel:
        created = session_pb2.CreateSessionResponse.FromString(
            await channel.unary_unary(CREATE_SESSION)(
                session_pb2.CreateSessionRequest(config_name="kv-memory").SerializeToString(), timeout=10
            )
        )
        with pytest.raises(grpc.aio.AioRpcError) as too_big:
            await channel.unary_unary(KV_SET)(
                kv.SetRequest(key="k", value=b"x" * (2 * MiB)).SerializeToString(),
                metadata=((SESSION_HEADER, created.token),),
                timeout=10,
            )
    assert too_big.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, too_big.value


async def test_stream_errors_carry_rich_details(in_process: str) -> None:
    """A server-streaming call refused before its first message: the status and the
    google.rpc.BadRequest naming the field, in the trailers."""
    async with grpc.aio.insecure_channel(in_process) as channel:
        created = session_pb2.CreateSessionResponse.FromString(
            await channel.unary_unary(CREATE_SESSION)(
                session_pb2.CreateSessionRequest(config_name="events").SerializeToString(), timeout=10
            )
        )
        call = channel.unary_stream(SUBSCRIBE)(
            ps.PubSubSubscribeRequest(subject="").SerializeToString(),
            metadata=((SESSION_HEADER, created.token),),
            timeout=10,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await call.read()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    details = dict(refused.value.trailing_metadata() or ())["grpc-status-details-bin"]
    assert status_violations(details) == ("subject",)


# --------------------------------------------------------------------------------------------
# Broken request streams: INVALID_ARGUMENT at once


@pytest.fixture(scope="module")
def sessions(hypercorn_gateway: GatewayProcess) -> dict[str, str]:
    """Session tokens for a KeyValue and a PubSub config on the shared gateway."""
    tokens = {}
    with grpc.insecure_channel(hypercorn_gateway.grpc_target) as channel:
        create = channel.unary_unary(CREATE_SESSION)
        for config in ("kv", "events"):
            raw = create(session_pb2.CreateSessionRequest(config_name=config).SerializeToString(), timeout=10)
            tokens[config] = session_pb2.CreateSessionResponse.FromString(raw).token
    return tokens


BROKEN_BODIES = {
    "zero-messages": b"",
    "half-a-header": b"\x00\x00",
    "truncated-message": struct.pack(">BI", 0, 100) + b"abc",
}
METHODS = {
    "unary": (KV_GET, "kv", kv.GetRequest(key="k")),
    "server-streaming": (SUBSCRIBE, "events", ps.PubSubSubscribeRequest(subject="native.test")),
}


@pytest.mark.parametrize("body", BROKEN_BODIES.values(), ids=BROKEN_BODIES.keys())
@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
async def test_broken_request_stream_is_invalid_argument(
    hypercorn_gateway: GatewayProcess, sessions: dict[str, str], method: tuple, body: bytes
) -> None:
    path, config, request = method
    started = time.monotonic()
    reply = await raw_call(hypercorn_gateway.grpc_port, path, body, {SESSION_HEADER: sessions[config]})
    assert reply.status == INVALID_ARGUMENT, reply
    assert request.DESCRIPTOR.full_name in reply.message, reply.message
    assert time.monotonic() - started < REPLY_SECONDS


@pytest.mark.parametrize("method", METHODS.values(), ids=METHODS.keys())
async def test_two_request_messages_are_invalid_argument(
    hypercorn_gateway: GatewayProcess, sessions: dict[str, str], method: tuple
) -> None:
    path, config, request = method
    body = frame(request.SerializeToString()) * 2
    reply = await raw_call(hypercorn_gateway.grpc_port, path, body, {SESSION_HEADER: sessions[config]})
    assert reply.status == INVALID_ARGUMENT, reply
    assert "more than one" in reply.message


async def test_one_request_message_still_answers(hypercorn_gateway: GatewayProcess, sessions: dict[str, str]) -> None:
    """The same raw client, a well-formed call: the missing key is NOT_FOUND, the call complete."""
    body = frame(kv.GetRequest(key="native-missing").SerializeToString())
    reply = await raw_call(hypercorn_gateway.grpc_port, KV_GET, body, {SESSION_HEADER: sessions["kv"]})
    assert reply.status == str(grpc.StatusCode.NOT_FOUND.value[0]), reply


# --------------------------------------------------------------------------------------------
# Reflection v1, as grpcurl asks


REFLECTION_V1 = "/grpc.reflection.v1.ServerReflection/ServerReflectionInfo"


@pytest.fixture(params=["grpc-port", "http-port"])
def native_target(request: pytest.FixtureRequest, hypercorn_gateway: GatewayProcess) -> str:
    """Both paths that serve native gRPC: the grpc.aio port, and the ASGI app on the HTTP port."""
    if request.param == "grpc-port":
        return hypercorn_gateway.grpc_target
    return f"127.0.0.1:{hypercorn_gateway.http_port}"


async def test_grpcurl_style_listing_through_reflection_v1(native_target: str) -> None:
    """One reflection stream, like grpcurl's: list the services, fetch the file declaring
    KeyValueService (and the files it imports), resolve a method from them. The v1 request and
    response messages are v1alpha's bytes: the two protos differ only in their package."""
    async with grpc.aio.insecure_channel(native_target) as channel:
        stub = channel.stream_stream(
            REFLECTION_V1,
            request_serializer=reflection_pb2.ServerReflectionRequest.SerializeToString,
            response_deserializer=reflection_pb2.ServerReflectionResponse.FromString,
        )
        call = stub(timeout=10)
        database = descriptor_database.DescriptorDatabase()
        added: set[str] = set()

        async def ask(**kwargs: str) -> reflection_pb2.ServerReflectionResponse:
            await call.write(reflection_pb2.ServerReflectionRequest(**kwargs))
            response = await call.read()
            assert not response.HasField("error_response"), response.error_response
            for raw in response.file_descriptor_response.file_descriptor_proto:
                file = descriptor_pb2.FileDescriptorProto.FromString(raw)
                if file.name not in added:
                    database.Add(file)
                    added.add(file.name)
            return response

        listed = await ask(list_services="")
        names = {service.name for service in listed.list_services_response.service}
        assert {
            "prism.v1.KeyValueService",
            "grpc.health.v1.Health",
            "grpc.reflection.v1.ServerReflection",
            "grpc.reflection.v1alpha.ServerReflection",
        } <= names
        await ask(file_containing_symbol="prism.v1.KeyValueService")
        described = await ask(file_containing_symbol="grpc.reflection.v1.ServerReflection")
        await call.done_writing()
        assert described.file_descriptor_response.file_descriptor_proto
    pool = descriptor_pool.DescriptorPool(database)
    method = pool.FindMethodByName("prism.v1.KeyValueService.Get")
    assert method.input_type.full_name == "prism.v1.GetRequest"
    assert method.output_type.full_name == "prism.v1.GetResponse"
    v1 = pool.FindServiceByName("grpc.reflection.v1.ServerReflection").FindMethodByName("ServerReflectionInfo")
    assert v1.input_type.full_name == "grpc.reflection.v1.ServerReflectionRequest"


async def test_grpc_health_v1_check_and_watch(native_target: str) -> None:
    """grpc.health.v1 as grpcio's stub calls it, on both paths: the server ("") and each
    Prism service SERVING, an unknown service NOT_FOUND, and Watch streaming the status."""
    async with grpc.aio.insecure_channel(native_target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "prism.v1.KeyValueService", "prism.v1.QueueService"):
            reply = await stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING, service
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(health_pb2.HealthCheckRequest(service="no.such.Service"), timeout=5)
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=""), timeout=5)
        first = await watch.read()
        assert first.status == health_pb2.HealthCheckResponse.SERVING
        watch.cancel()
