"""Native gRPC on its own port: a grpc.aio server generic over the method table.

Every Prism method is registered as a request-*stream* handler, whatever its arity. grpc.aio
runs a unary handler only once the whole request message has arrived (and never, if the
stream ends without one); a stream handler runs as soon as the headers are in. So the
pipeline authenticates from the metadata (and the client certificate) before a single
request byte is read: a refused caller's message is never read, and HTTP/2 flow control
leaves the rest of it with the client. ``decode`` then reads exactly one message; a stream
that ends with none, with a truncated one, or carries a second one is INVALID_ARGUMENT at
once. Messages arrive as raw bytes (no deserializer), so a malformed one is INVALID_ARGUMENT
naming the message type rather than grpc's generic INTERNAL.

Errors leave nothing behind. An error becomes plain values (``_Status``) inside the
``except`` block and is sent after it, so the exception, its traceback and the frames it
holds (the request among them) are freed by reference counting at once. Streams end by
setting the status and returning. ``context.abort()`` (unary errors) keeps its exception, and
the traceback through the handler, on the call state in a reference cycle that only the
cyclic GC frees, which a refused call's few allocations rarely trigger: that traceback must
hold no request bytes. (A unary-unary handler's frame held its whole request there.)

Server reflection (``grpc.reflection.v1`` and ``v1alpha``) and the standard
``grpc.health.v1`` service are registered beside Prism's services.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import NamedTuple, NoReturn

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import DecodeError, Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from app.methods import Method
from app.pipeline import Decode, Pipeline, status_of
from prism.errors import invalid_argument

log = logging.getLogger("prism.grpc")

Requests = AsyncIterator[bytes]  # grpc.aio's request iterator; handlers read through context.read()


def _metadata(context: grpc.aio.ServicerContext) -> dict[str, str]:
    return dict(context.invocation_metadata() or ())


def _decoder(method: Method, context: grpc.aio.ServicerContext) -> Decode:
    """Reads the call's one request message, once the pipeline has admitted the caller."""
    name = method.request_type.DESCRIPTOR.full_name

    async def decode() -> Message:
        # EOF when the client half-closes, and when the stream ends mid-message or the call
        # failed (over grpc.max_receive_message_length grpc core has already answered
        # RESOURCE_EXHAUSTED, and the status raised here goes nowhere).
        data = await context.read()
        if data is grpc.aio.EOF:
            raise invalid_argument("request", f"no {name} message: the request stream ended before a whole one")
        if await context.read() is not grpc.aio.EOF:
            raise invalid_argument("request", f"more than one {name} message: {method.path} takes one")
        try:
            return method.request_type.FromString(data)
        except DecodeError:
            raise invalid_argument("request", f"not a valid {name} message") from None

    return decode


class _Status(NamedTuple):
    """A call's error as plain values: holds no exception, so no traceback and no frames."""

    code: grpc.StatusCode
    message: str
    trailing: tuple[tuple[str, bytes], ...]

    @classmethod
    def of(cls, exc: BaseException) -> _Status:
        error = status_of(exc)
        trailing: tuple[tuple[str, bytes], ...] = ()
        if error.field is not None:
            trailing = (("grpc-status-details-bin", error.to_status().SerializeToString()),)
        return cls(error.code, error.message, trailing)

    def set(self, context: grpc.aio.ServicerContext) -> None:
        """For a stream handler: sent when the handler returns."""
        context.set_code(self.code)
        context.set_details(self.message)
        context.set_trailing_metadata(self.trailing)

    async def abort(self, context: grpc.aio.ServicerContext) -> NoReturn:
        """For a unary handler (returning None would send an empty message before the status)."""
        await context.abort(self.code, self.message, trailing_metadata=self.trailing)
        raise AssertionError("unreachable: abort raises")


def _unary(method: Method, pipeline: Pipeline) -> Callable[..., object]:
    async def handle(requests: Requests, context: grpc.aio.ServicerContext) -> bytes:
        try:
            peer = pipeline.grpc_peer(context)
            response = await pipeline.unary(method, _decoder(method, context), _metadata(context), "grpc", peer)
            return response.SerializeToString()
        except Exception as exc:
            status = _Status.of(exc)
        await status.abort(context)  # outside the except block: exc and its frames are gone

    return handle


def _server_stream(method: Method, pipeline: Pipeline) -> Callable[..., AsyncIterator[bytes]]:
    async def handle(requests: Requests, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            peer = pipeline.grpc_peer(context)
            responses = await pipeline.stream(method, _decoder(method, context), _metadata(context), "grpc", peer)
        except Exception as exc:
            _Status.of(exc).set(context)
            return
        try:
            async for response in responses:
                yield response.SerializeToString()
        except Exception as exc:
            _Status.of(exc).set(context)
        finally:
            await responses.aclose()  # type: ignore[attr-defined]

    return handle


def _client_stream_unsupported(method: Method, pipeline: Pipeline) -> Callable[..., object]:
    async def handle(requests: Requests, context: grpc.aio.ServicerContext) -> None:
        try:
            # Credentials and session first, as for every method; no request is read.
            await pipeline.begin(method, _metadata(context), "grpc", pipeline.grpc_peer(context))
        except Exception as exc:
            _Status.of(exc).set(context)
            return
        _Status(grpc.StatusCode.UNIMPLEMENTED, f"{method.service}/{method.name} is not implemented yet", ()).set(context)

    return handle


def generic_handlers(methods: list[Method], pipeline: Pipeline) -> list[grpc.GenericRpcHandler]:
    per_service: dict[str, dict[str, grpc.RpcMethodHandler]] = defaultdict(dict)
    for method in methods:
        # No (de)serializers: handlers read and return bytes.
        if method.client_streaming:
            handler = grpc.stream_stream_rpc_method_handler(_client_stream_unsupported(method, pipeline))
        elif method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(_server_stream(method, pipeline))
        else:
            # stream-unary, not stream-stream: the response and the status go in one batch.
            handler = grpc.stream_unary_rpc_method_handler(_unary(method, pipeline))
        per_service[method.service][method.name] = handler
    return [grpc.method_handlers_generic_handler(name, table) for name, table in sorted(per_service.items())]


# grpcurl, Postman and Kreya ask for grpc.reflection.v1 first; grpcio-reflection ships only
# v1alpha. The two protos differ only in their package, so the v1alpha servicer answers v1
# calls too, and the v1 file (v1alpha's renamed) is in the pool for clients that describe it.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"


def _register_reflection_v1_descriptor(pool: descriptor_pool.DescriptorPool) -> None:
    try:
        pool.FindServiceByName(REFLECTION_V1)
        return  # already there (a grpcio-reflection that ships v1)
    except KeyError:
        pass
    alpha, v1 = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    file = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(file)
    file.name, file.package = "grpc/reflection/v1/reflection.proto", "grpc.reflection.v1"
    file.options.Clear()
    file.options.java_package = "io.grpc.reflection.v1"
    file.options.java_outer_classname = "ServerReflectionProto"
    file.options.java_multiple_files = True
    file.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    for message in file.message_type:
        for field in message.field:
            if field.HasField("type_name"):
                field.type_name = field.type_name.replace(alpha, v1, 1)
    for rpc in file.service[0].method:
        rpc.input_type = rpc.input_type.replace(alpha, v1, 1)
        rpc.output_type = rpc.output_type.replace(alpha, v1, 1)
    pool.Add(file)


def _add_reflection(server: grpc.aio.Server, services: list[str]) -> None:
    _register_reflection_v1_descriptor(descriptor_pool.Default())
    servicer = reflection.aio.ReflectionServicer([*services, REFLECTION_V1, reflection.SERVICE_NAME])
    reflection_pb2_grpc.add_ServerReflectionServicer_to_server(servicer, server)
    v1 = grpc.stream_stream_rpc_method_handler(
        servicer.ServerReflectionInfo,
        request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
        response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
    )
    server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})])


async def start_grpc_server(
    methods: list[Method],
    pipeline: Pipeline,
    *,
    address: str,
    max_message_bytes: int,
    reuse_port: bool,
    credentials: grpc.ServerCredentials | None = None,
    watch_health: Callable[[health.aio.HealthServicer, list[str]], Awaitable[None]] | None = None,
) -> grpc.aio.Server:
    """Create, bind and start the server on the running loop (it must run where it is created).
    ``watch_health`` keeps grpc.health.v1 in step with the gateway's health monitor."""
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
    _add_reflection(server, [*services, health.SERVICE_NAME])
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
    if watch_health is not None:  # statuses now and on every change
        await watch_health(health_servicer, services)
    log.info("gRPC listening on %s", address)
    return server
