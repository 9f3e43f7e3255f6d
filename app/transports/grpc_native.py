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
``grpc.health.v1`` service (``grpc_standard.py``) are registered beside Prism's services.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from typing import NamedTuple, NoReturn

import grpc
from google.protobuf.message import DecodeError, Message

from app.methods import Method
from app.pipeline import Decode, Pipeline, status_of
from app.transports.grpc_standard import StandardServices
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


async def _read_all(method: Method, context: grpc.aio.ServicerContext) -> AsyncIterator[Message]:
    """A client stream's requests, parsed as the method reads them."""
    name = method.request_type.DESCRIPTOR.full_name
    index = 0
    while (data := await context.read()) is not grpc.aio.EOF:
        try:
            yield method.request_type.FromString(data)
        except DecodeError:
            raise invalid_argument(f"request[{index}]", f"not a valid {name} message") from None
        index += 1


def _streaming(method: Method, pipeline: Pipeline) -> Callable[..., AsyncIterator[bytes]]:
    """Every method with a stream on either side. A client that goes away cancels the handler
    (grpc.aio cancels its task): how a Subscribe ends, and a Transaction learns to roll back."""

    async def handle(requests: Requests, context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        try:
            peer, metadata = pipeline.grpc_peer(context), _metadata(context)
            if method.client_streaming:
                responses = await pipeline.stream_in(method, _read_all(method, context), metadata, "grpc", peer)
            else:
                responses = await pipeline.stream(method, _decoder(method, context), metadata, "grpc", peer)
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


def generic_handlers(methods: list[Method], pipeline: Pipeline) -> list[grpc.GenericRpcHandler]:
    per_service: dict[str, dict[str, grpc.RpcMethodHandler]] = defaultdict(dict)
    for method in methods:
        # No (de)serializers: handlers read and return bytes.
        if method.client_streaming or method.server_streaming:
            handler = grpc.stream_stream_rpc_method_handler(_streaming(method, pipeline))
        else:
            # stream-unary, not stream-stream: the response and the status go in one batch.
            handler = grpc.stream_unary_rpc_method_handler(_unary(method, pipeline))
        per_service[method.service][method.name] = handler
    return [grpc.method_handlers_generic_handler(name, table) for name, table in sorted(per_service.items())]


async def start_grpc_server(
    methods: list[Method],
    pipeline: Pipeline,
    standard: StandardServices,
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
    standard.add_to(server)
    try:
        if credentials is None:
            server.add_insecure_port(address)
        else:
            server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        raise OSError(f"gRPC could not bind {address} (is the port taken?)") from exc
    await server.start()
    log.info("gRPC listening on %s", address)
    return server
