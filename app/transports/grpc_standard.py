"""The standard gRPC services every native gRPC path answers beside Prism's own: server
reflection (``grpc.reflection.v1`` and ``v1alpha``, what grpcurl, Postman and Kreya ask) and
health checking (``grpc.health.v1``, what load balancers and Kubernetes probe).

They are public, like the HTTP probes, so they do not go through the pipeline. One health
servicer, kept in step with the gateway's HealthMonitor, answers on the grpc.aio port and
through the ASGI app alike; the ASGI app calls the same servicers through :data:`Handler`.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import NoReturn

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.message import Message
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2, reflection_pb2_grpc

from app.methods import Method
from prism.errors import PrismError, invalid_argument

# grpcurl, Postman and Kreya ask for grpc.reflection.v1 first; grpcio-reflection ships only
# v1alpha. The two protos differ only in their package, so the v1alpha servicer answers v1
# calls too, and the v1 file (v1alpha's renamed) is in the pool for clients that describe it.
REFLECTION_V1 = "grpc.reflection.v1.ServerReflection"
HEALTH = health.SERVICE_NAME

# A standard method as the ASGI app calls it: the requests in, the responses out.
Handler = Callable[[AsyncIterator[Message]], AsyncIterator[Message]]


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


class StandardServices:
    """Reflection over ``services`` (Prism's, plus these) and one health servicer."""

    def __init__(self, services: list[str]) -> None:
        _register_reflection_v1_descriptor(descriptor_pool.Default())
        self.health = health.aio.HealthServicer()
        self.reflection = reflection.aio.ReflectionServicer(
            [*services, HEALTH, REFLECTION_V1, reflection.SERVICE_NAME]
        )

    def add_to(self, server: grpc.aio.Server) -> None:
        """Register both on a grpc.aio server."""
        health_pb2_grpc.add_HealthServicer_to_server(self.health, server)
        reflection_pb2_grpc.add_ServerReflectionServicer_to_server(self.reflection, server)
        v1 = grpc.stream_stream_rpc_method_handler(
            self.reflection.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
        server.add_generic_rpc_handlers([grpc.method_handlers_generic_handler(REFLECTION_V1, {"ServerReflectionInfo": v1})])

    def asgi_methods(self) -> dict[str, tuple[Method, Handler]]:
        """gRPC path → (its description, its handler), for the ASGI app."""
        reflect: Handler = lambda requests: self.reflection.ServerReflectionInfo(requests, None)  # noqa: E731
        table = {
            (reflection.SERVICE_NAME, "ServerReflectionInfo"): (
                reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse, True, True, reflect,
            ),
            (REFLECTION_V1, "ServerReflectionInfo"): (
                reflection_pb2.ServerReflectionRequest, reflection_pb2.ServerReflectionResponse, True, True, reflect,
            ),
            (HEALTH, "Check"): (
                health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, False, False, self._check,
            ),
            (HEALTH, "Watch"): (
                health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse, False, True, self._watch,
            ),
        }
        methods: dict[str, tuple[Method, Handler]] = {}
        for (service, name), (request, response, client_streaming, server_streaming, handler) in table.items():
            method = Method(service, name, request, response, client_streaming, server_streaming, None, 0, False, "")
            methods[method.path] = (method, handler)
        return methods

    async def _check(self, requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
        yield await self.health.Check(await _one(requests), _Context())

    async def _watch(self, requests: AsyncIterator[Message]) -> AsyncIterator[Message]:
        """The servicer's Watch writes through its context: here into a one-slot queue, so a
        slow reader holds the watch back instead of growing a buffer."""
        context = _Context()
        watch = asyncio.create_task(self.health.Watch(await _one(requests), context))
        try:
            while True:
                yield await context.written.get()
        finally:
            watch.cancel()
            await asyncio.gather(watch, return_exceptions=True)


async def _one(requests: AsyncIterator[Message]) -> Message:
    async for request in requests:
        async for _ in requests:
            raise invalid_argument("request", "more than one request message; the call takes exactly one")
        return request
    raise invalid_argument("request", "no request message: the call needs exactly one")


class _Context:
    """What the grpcio health servicer asks of its context."""

    def __init__(self) -> None:
        self.written: asyncio.Queue[Message] = asyncio.Queue(maxsize=1)

    async def abort(self, code: grpc.StatusCode, details: str = "") -> NoReturn:
        raise PrismError(code, details or "unknown service")

    async def write(self, message: Message) -> None:
        await self.written.put(message)

