"""Native gRPC on the HTTP port, through the ASGI app (app/transports/grpc_asgi.py).

The scenario suites (test_transports.py) run grpcio against it as the "grpc-http" transport;
these pin down the framing and the edges: a call with no message or a truncated one gets
INVALID_ARGUMENT at once, deadlines, unknown methods, and a server without HTTP/2 trailers
refusing clearly instead of hanging.
"""

from __future__ import annotations

import logging
import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import grpc
import h2.config
import h2.connection
import h2.events
import pytest

from app.methods import all_methods
from app.transports.grpc_asgi import GrpcAsgiApp
from app.transports.grpc_standard import StandardServices
from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import pubsub_pb2 as ps
from prism.v1 import session_pb2
from tests.gateway_process import GatewayProcess, start_gateway

CREATE_SESSION = "/prism.v1.SessionService/CreateSession"


def _framed(message: bytes) -> bytes:
    return struct.pack(">BI", 0, len(message)) + message


@dataclass
class Answer:
    headers: dict[str, str]
    trailers: dict[str, str]
    data: bytes

    @property
    def status(self) -> tuple[str, str]:
        """grpc-status and grpc-message, from the trailers (or a trailers-only answer)."""
        fields = self.trailers or self.headers
        return fields.get("grpc-status", ""), fields.get("grpc-message", "")


class H2c:
    """One HTTP/2 cleartext connection driven with the h2 library: what a gRPC client sends,
    byte for byte, and the trailers httpx does not show."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=5)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.conn.initiate_connection()
        self.sock.sendall(self.conn.data_to_send())
        self.port = port

    def call(self, path: str, body: bytes, **metadata: str) -> Answer:
        stream = self.conn.get_next_available_stream_id()
        headers = [
            (":method", "POST"), (":scheme", "http"), (":authority", f"127.0.0.1:{self.port}"), (":path", path),
            ("content-type", "application/grpc"), ("te", "trailers"), *metadata.items(),
        ]
        self.conn.send_headers(stream, headers)
        self.conn.send_data(stream, body, end_stream=True)
        self.sock.sendall(self.conn.data_to_send())
        answer = Answer({}, {}, b"")
        while True:  # until the stream ends; the socket's 5 s timeout fails a hang
            for event in self.conn.receive_data(self.sock.recv(65536)):
                if isinstance(event, h2.events.ResponseReceived) and event.stream_id == stream:
                    answer.headers = dict(event.headers)
                elif isinstance(event, h2.events.TrailersReceived) and event.stream_id == stream:
                    answer.trailers = dict(event.headers)
                elif isinstance(event, h2.events.DataReceived) and event.stream_id == stream:
                    answer.data += event.data
                    self.conn.acknowledge_received_data(event.flow_controlled_length, stream)
                elif isinstance(event, h2.events.StreamEnded) and event.stream_id == stream:
                    self.sock.sendall(self.conn.data_to_send())
                    return answer
            self.sock.sendall(self.conn.data_to_send())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def h2c(hypercorn_gateway: GatewayProcess) -> Iterator[H2c]:
    client = H2c(hypercorn_gateway.http_port)
    yield client
    client.close()


def _token(client: H2c, config: str = "kv") -> str:
    answer = client.call(CREATE_SESSION, _framed(session_pb2.CreateSessionRequest(config_name=config).SerializeToString()))
    assert answer.status[0] == "0", answer
    return session_pb2.CreateSessionResponse.FromString(answer.data[5:]).token


def test_zero_messages_and_truncated_frames_are_invalid_at_once(h2c: H2c) -> None:
    token = _token(h2c)
    get = "/prism.v1.KeyValueService/Get"
    message = kv.GetRequest(key="k").SerializeToString()
    for body in (b"", b"\x00\x00\x00", _framed(message)[:-2], _framed(message) + _framed(message)):
        answer = h2c.call(get, body, **{"x-prism-session": token})
        assert answer.headers[":status"] == "200"
        code, text = answer.status
        assert code == "3", (body, text)  # INVALID_ARGUMENT, answered within the socket's 5 s


def test_unknown_methods_deadlines_and_client_streams(h2c: H2c) -> None:
    session = {"x-prism-session": _token(h2c)}
    assert h2c.call("/prism.v1.Nope/Nothing", _framed(b""), **session).status[0] == "12"  # UNIMPLEMENTED
    transaction = h2c.call("/prism.v1.TransactService/Transaction", _framed(b""), **session)
    assert transaction.status[0] == "9" and "needs ACCESS_PATTERN_TRANSACT" in transaction.status[1], transaction
    bad_timeout = h2c.call("/prism.v1.KeyValueService/Get", _framed(b"\x0a\x01k"), **session, **{"grpc-timeout": "soon"})
    assert bad_timeout.status[0] == "3" and "grpc-timeout" in bad_timeout.status[1]
    subscribe = h2c.call(
        "/prism.v1.PubSubService/Subscribe",
        _framed(ps.PubSubSubscribeRequest(subject="deadline.*").SerializeToString()),
        **{"x-prism-session": _token(h2c, "events"), "grpc-timeout": "300m"},
    )
    assert subscribe.status[0] == "4"  # DEADLINE_EXCEEDED, after the first response
    assert ps.PubSubSubscribeResponse.FromString(subscribe.data[5:]).subscription_id


async def test_grpcio_gets_rich_errors_on_the_http_port(hypercorn_gateway: GatewayProcess) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{hypercorn_gateway.http_port}") as channel:
        exists = channel.unary_unary(
            "/prism.v1.KeyValueService/Exists",
            request_serializer=kv.ExistsRequest.SerializeToString,
            response_deserializer=kv.ExistsResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await exists(kv.ExistsRequest(key="k"), timeout=5)
        assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.fixture(scope="module")
def granian_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("granian-no-trailers"), "granian")
    yield process
    process.stop()


async def test_a_server_without_trailers_refuses_native_grpc_clearly(granian_gateway: GatewayProcess) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{granian_gateway.http_port}") as channel:
        create = channel.unary_unary(
            CREATE_SESSION,
            request_serializer=session_pb2.CreateSessionRequest.SerializeToString,
            response_deserializer=session_pb2.CreateSessionResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await create(session_pb2.CreateSessionRequest(config_name="kv"), timeout=5)
        assert refused.value.code() != grpc.StatusCode.DEADLINE_EXCEEDED  # an answer, not a hang


async def test_a_call_whose_client_has_gone_ends_quietly(caplog: pytest.LogCaptureFixture) -> None:
    """When the server's send raises because the client reset the stream (pyvoy raises its
    ClientDisconnectedError; h2load leaves calls in flight at the end of every run), there is
    nobody to answer: the call ends without an error logged or raised to the server."""
    methods = {m.path: m for m in all_methods()}
    get = methods["/prism.v1.KeyValueService/Get"]

    class Answering:  # the pipeline's part: an answer is ready
        @staticmethod
        def asgi_peer(scope: dict[str, Any]) -> str:
            return "127.0.0.1"

        @staticmethod
        async def unary(method: Any, decode: Any, *args: Any) -> Any:
            await decode()
            return kv.GetResponse(key="k")

    app = GrpcAsgiApp([get], Answering(), StandardServices([]), 1 << 20)  # type: ignore[arg-type]
    scope = {"type": "http", "path": get.path, "headers": [(b"content-type", b"application/grpc")]}
    body = [{"type": "http.request", "body": _framed(kv.GetRequest(key="k").SerializeToString()), "more_body": False}]

    async def receive() -> dict[str, Any]:
        return body.pop() if body else {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        raise OSError("the client reset the stream")  # what the ASGI spec has a server raise

    with caplog.at_level(logging.ERROR):
        await app(scope, receive, send)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
