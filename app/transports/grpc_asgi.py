"""Native gRPC through the ASGI app: ``application/grpc[+proto]`` over HTTP/2 with trailers.

An HTTP/2 server that offers the ASGI ``http.response.trailers`` extension (Hypercorn, pyvoy)
carries everything gRPC needs, so the same method table and pipeline serve native gRPC clients
on the HTTP port as well, without grpc.aio's per-call cost:

    request   HEADERS (:path /<service>/<method>, grpc-timeout, grpc-encoding, metadata)
              DATA    5-byte frames (flag: compressed; length) — one message for unary and
                      server-streaming methods, any number for client-streaming and bidi
    response  HEADERS (:status 200, content-type application/grpc, grpc-accept-encoding)
              DATA    one frame per response message
              HEADERS (trailers) grpc-status, grpc-message, grpc-status-details-bin

Errors before the first message are still sent as headers then trailers, so every client reads
the status from the trailers. ``send`` waits on HTTP/2 flow control, so a slow reader slows the
stream instead of growing a buffer; a request stream is parsed as the method reads it, so a
fast writer waits on flow control too. A reset stream (``http.disconnect``) cancels the call.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import struct
import zlib
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError, Message

from app.batches import READ_AHEAD, batches, read_ahead
from app.methods import Method
from app.pipeline import Pipeline, status_of
from app.transports.asgi_util import Receive, RequestBody, Scope, Send, header_map
from app.transports.grpc_standard import StandardServices
from app.transports.grpc_web import trailer_fields
from prism.errors import PrismError, invalid_argument, too_large

TRAILERS = "http.response.trailers"
COMPRESSED = 0x01
_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")
_UNIT_SECONDS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
RESPONSE_HEADERS = [(b"content-type", b"application/grpc"), (b"grpc-accept-encoding", b"identity,gzip")]


def supports_trailers(scope: Scope) -> bool:
    return TRAILERS in scope.get("extensions", {}) and scope.get("http_version") == "2"


def deadline_seconds(value: str) -> float:
    """A grpc-timeout header (``100m``, ``5S``) in seconds."""
    found = _TIMEOUT.match(value.strip())
    if found is None:
        raise invalid_argument("grpc-timeout", f"{value!r} is not a gRPC timeout (1 to 8 digits and a unit)")
    return int(found.group(1)) * _UNIT_SECONDS[found.group(2)]


def one_message(body: bytes, encoding: str, limit: int) -> bytes:
    """The single message of a unary or server-streaming request body."""
    if len(body) < 5:
        what = "no request message" if not body else f"a truncated frame ({len(body)} bytes)"
        raise invalid_argument("request", f"{what}: the call needs exactly one message")
    flag, length = struct.unpack(">BI", body[:5])
    if len(body) < 5 + length:
        raise invalid_argument("request", f"a truncated frame: {length} bytes announced, {len(body) - 5} sent")
    if len(body) > 5 + length:
        raise invalid_argument("request", "more than one request message; the call takes exactly one")
    return _payload(flag, body[5:], encoding, limit)


async def messages(body: RequestBody, encoding: str, limit: int) -> AsyncIterator[bytes]:
    """The messages of a request stream, each as soon as its frame is whole; at most one
    message and one received chunk are held."""
    buffer = bytearray()
    while True:
        while len(buffer) >= 5:
            flag, length = struct.unpack_from(">BI", buffer)
            if length > limit:
                raise too_large("request message", length, limit)
            if len(buffer) < 5 + length:
                break
            payload = bytes(buffer[5 : 5 + length])
            del buffer[: 5 + length]
            yield _payload(flag, payload, encoding, limit)
        if body.done:
            break
        buffer += await body.next_chunk()
    if buffer:
        raise invalid_argument("request", f"the request stream ended inside a frame ({len(buffer)} bytes)")


def _payload(flag: int, payload: bytes, encoding: str, limit: int) -> bytes:
    if flag & COMPRESSED:
        if encoding != "gzip":
            raise PrismError(
                grpc.StatusCode.UNIMPLEMENTED, f"grpc-encoding {encoding!r} is not supported; use identity or gzip"
            )
        inflater = zlib.decompressobj(wbits=31)
        try:
            payload = inflater.decompress(payload, limit + 1)
        except zlib.error:
            raise invalid_argument("request", "not valid gzip data") from None
        if len(payload) > limit:
            raise too_large("decompressed request message", len(payload), limit)
    return payload


class GrpcAsgiApp:
    def __init__(self, methods: list[Method], pipeline: Pipeline, standard: StandardServices, max_body: int) -> None:
        self.methods = {m.path: m for m in methods}
        self.standard = standard.asgi_methods()  # public, outside the pipeline
        self.pipeline = pipeline
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = _Stream(send)
        body = RequestBody(receive)
        error: PrismError | None = None
        answer: Message | None = None  # a unary call's response, sent with the end of the body
        task = asyncio.current_task()
        watcher: asyncio.Task[None] | None = None
        finished = False  # the answer is under way: a disconnect from then on is its normal end
        try:
            headers = header_map(scope)
            peer = self.pipeline.asgi_peer(scope)
            method, public = self.standard.get(scope["path"], (self.methods.get(scope["path"]), None))
            if method is None:
                unknown = PrismError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {scope['path']}")
                await self.pipeline.refuse_unknown(unknown, headers, peer)
            timeout = headers.get("grpc-timeout")
            bound = asyncio.timeout(deadline_seconds(timeout)) if timeout else contextlib.nullcontext()
            encoding = headers.get("grpc-encoding", "identity")

            def watch_for_reset() -> None:
                """Once the body has ended, what comes next is a reset: it cancels the call."""
                nonlocal watcher
                if method.unary:
                    return
                watcher = asyncio.create_task(_cancel_on_reset(receive, task, lambda: finished))
                _WATCHERS.add(watcher)
                watcher.add_done_callback(_WATCHERS.discard)

            def parse(payload: bytes, at: str) -> Message:
                try:
                    return method.request_type.FromString(payload)
                except DecodeError:
                    raise invalid_argument(at, f"not a valid {method.request_type.DESCRIPTOR.full_name} message") from None

            async def decode() -> Message:
                payload = one_message(await body.read(self.max_body + 5), encoding, self.max_body)
                watch_for_reset()
                return parse(payload, "request")

            async def requests() -> AsyncIterator[Message]:
                index = 0
                async for payload in messages(body, encoding, self.max_body):
                    yield parse(payload, f"request[{index}]")
                    index += 1
                watch_for_reset()

            try:
                async with bound:
                    if public is not None:
                        await stream.send_all(public(requests()))
                    elif method.client_streaming:
                        responses = await self.pipeline.stream_in(method, requests(), headers, "grpc", peer)
                        await stream.send_all(responses)
                    elif method.server_streaming:
                        responses = await self.pipeline.stream(method, decode, headers, "grpc", peer)
                        await stream.send_all(responses, read_ahead(method))
                    else:
                        answer = await self.pipeline.unary(method, decode, headers, "grpc", peer)
            except TimeoutError:
                raise PrismError(grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within grpc-timeout {timeout}") from None
        except asyncio.CancelledError:
            if watcher is None or not watcher.done():
                raise
            return  # the client reset the stream: nobody to answer
        except ClientGone:
            return  # a send found the stream reset (a unary call has no watcher): nobody to answer
        except Exception as exc:
            if body.disconnected:
                return  # the client reset the stream while sending: nobody to answer
            error = status_of(exc)
            await body.drain(self.max_body)
        finished = True
        with contextlib.suppress(ClientGone):
            await stream.finish(error, answer)


# Reset watchers of open streams. A watcher is never cancelled while it waits in receive()
# (pyvoy logs a failed callback when a pending receive is cancelled); the server's
# http.disconnect, sent when the stream closes either way, ends it.
_WATCHERS: set[asyncio.Task[None]] = set()


async def _cancel_on_reset(receive: Receive, task: asyncio.Task[object] | None, finished: Callable[[], bool]) -> None:
    """Cancel the call when the client resets the stream (or the connection goes)."""
    while (await receive())["type"] != "http.disconnect":
        pass
    if task is not None and not finished():
        task.cancel()


class ClientGone(Exception):
    """A send failed because the client reset the stream or closed the connection: the ASGI
    spec has the server raise then (pyvoy raises its ClientDisconnectedError), and a call that
    finds nobody to answer is not an error of the gateway's."""


class _Stream:
    def __init__(self, send: Send) -> None:
        self._asgi_send = send
        self.started = False

    async def send(self, message: dict[str, object]) -> None:
        try:
            await self._asgi_send(message)
        except Exception as exc:
            raise ClientGone from exc

    async def _start(self) -> None:
        self.started = True
        await self.send({"type": "http.response.start", "status": 200, "headers": RESPONSE_HEADERS, "trailers": True})

    async def send_messages(self, messages: list[Message], more: bool = True) -> None:
        """Length-prefixed messages in one DATA send (``more``: the body goes on)."""
        if not self.started:
            await self._start()
        frames = []
        for message in messages:
            payload = message.SerializeToString()
            frames += (struct.pack(">BI", 0, len(payload)), payload)
        await self.send({"type": "http.response.body", "body": b"".join(frames), "more_body": more})

    async def send_all(self, responses: AsyncIterator[Message], ahead: int = READ_AHEAD) -> None:
        try:
            async with aclosing(batches(responses, ahead)) as ready:  # what is ready together goes in one send
                async for batch in ready:
                    await self.send_messages(batch)
        finally:
            await responses.aclose()  # type: ignore[attr-defined]

    async def finish(self, error: PrismError | None, last: Message | None = None) -> None:
        """The end of the body (with ``last``, a unary call's response: one send less), then the trailers."""
        await self.send_messages([last] if last is not None and error is None else [], more=False)
        await self.send({"type": TRAILERS, "headers": trailer_fields(error), "more_trailers": False})
