"""Native gRPC on its own port: a grpc.aio server generic over the method table.

Handlers take raw bytes (no deserializer) so a malformed message is INVALID_ARGUMENT naming
the message type rather than grpc's generic INTERNAL. Server reflection and the standard
``grpc.health.v1`` service are registered beside Prism's services.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable

import grpc
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from app.methods import Method
from app.pipeline import Decode, Pipeline, status_of
from prism.errors import PrismError, invalid_argument

log = logging.getLogger("prism.grpc")


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return dict(context.invocation_metadata() or ())


def _decoder(method: Method, data: bytes) -> Decode:
    async def decode() -> Message:
        try:
            return method.request_type.FromString(data)
        except DecodeError:
            raise invalid_argument("request", f"not a valid {method.request_type.DESCRIPTOR.full_name} message") from None

    return decode


async def _abort(context: grpc.aio.ServicerContext, exc: BaseException) -> None:
    error = status_of(exc)
    trailing: tuple[tuple[str, bytes], ...] = ()
    if error.field is not None:
        trailing = (("grpc-status-details-bin", error.to_status().SerializeToString()),)
    await context.abort(error.code, error.message, trailing_metadata=trailing)


def _unary(method: Method, pipeline: Pipeline) -> Callable[..., object]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> bytes:
        try:
            peer = pipeline.grpc_peer(context)
            response = await pipeline.unary(method, _decoder(method, data), _metadata(context), "grpc", peer)
        except Exception as exc:
            await _abort(context, exc)
            raise  # unreachable: abort raises
        return response.SerializeToString()

    return handle


def _server_stream(method: Method, pipeline: Pipeline) -> Callable[..., AsyncIterator[bytes]]:
    async def handle(data: bytes, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            peer = pipeline.grpc_peer(context)
            responses = await pipeline.stream(method, _decoder(method, data), _metadata(context), "grpc", peer)
            try:
                async for response in responses:
                    yield response.SerializeToString()
            finally:
                await responses.aclose()  # type: ignore[attr-defined]
        except Exception as exc:
            await _abort(context, exc)

    return handle


def _client_stream_unsupported(method: Method) -> Callable[..., AsyncIterator[bytes]]:
    async def handle(requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        await _abort(context, PrismError(grpc.StatusCode.UNIMPLEMENTED, f"{method.service}/{method.name} is not implemented yet"))
        yield b""  # pragma: no cover

    return handle


def generic_handlers(methods: list[Method], pipeline: Pipeline) -> list[grpc.GenericRpcHandler]:
    per_service: dict[str, dict[str, grpc.RpcMethodHandler]] = defaultdict(dict)
    for method in methods:
        serialize = None  # handlers return bytes already
        if method.client_streaming:
            handler = grpc.stream_stream_rpc_method_handler(_client_stream_unsupported(method))
        elif method.server_streaming:
            handler = grpc.unary_stream_rpc_method_handler(_server_stream(method, pipeline), response_serializer=serialize)
        else:
            handler = grpc.unary_unary_rpc_method_handler(_unary(method, pipeline), response_serializer=serialize)
        per_service[method.service][method.name] = handler
    return [grpc.method_handlers_generic_handler(name, table) for name, table in sorted(per_service.items())]


async def start_grpc_server(
    methods: list[Method],
    pipeline: Pipeline,
    *,
    address: str,
    max_message_bytes: int,
    reuse_port: bool,
    credentials: grpc.ServerCredentials | None = None,
) -> grpc.aio.Server:
    """Create, bind and start the server on the running loop (it must run where it is created)."""
    server = grpc.aio.server(
        options=[
            ("grpc.so_reuseport", 1 if reuse_port else 0),
            ("grpc.max_receive_message_length", max_message_bytes),
            ("grpc.max_send_message_length", max_message_bytes),
        ]
    )
    server.add_generic_rpc_handlers(generic_handlers(methods, pipeline))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    services = sorted({m.service for m in methods})
    reflection.enable_server_reflection([*services, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"gRPC could not bind {address} (is the port taken?)") from exc
    await server.start()
    for name in ["", *services]:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC listening on %s", address)
    return server
