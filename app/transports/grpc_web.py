"""gRPC-Web on the HTTP port: ``application/grpc-web(+proto)`` and ``application/grpc-web-text``.

Written here rather than taken from a library: ``sonora`` is unmaintained since 2023 and
``connectrpc`` brings its own protobuf runtime, while the wire format is small — the 5-byte
gRPC framing (flag, big-endian length), a final frame flagged 0x80 carrying the trailers as
HTTP/1 header lines, and base64 for the ``-text`` variant. Calls go through the same pipeline
as every other transport. Unary and server-streaming RPCs only: browsers cannot stream
requests.
"""

from __future__ import annotations

import base64
import binascii
import struct
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError, Message

from app.batches import batches, read_ahead
from app.methods import Method
from app.pipeline import Pipeline, status_of
from app.transports.asgi_util import Receive, RequestBody, Scope, Send, header_map, respond_error
from prism.errors import PrismError, invalid_argument, unsupported_media_type

TRAILER_FLAG = 0x80
CONTENT_TYPES = (
    "application/grpc-web",
    "application/grpc-web+proto",
    "application/grpc-web-text",
    "application/grpc-web-text+proto",
)
COMPRESSED_FLAG = 0x01


def frame(payload: bytes, flag: int = 0) -> bytes:
    return struct.pack(">BI", flag, len(payload)) + payload


def trailer_fields(error: PrismError | None) -> list[tuple[bytes, bytes]]:
    """grpc-status, grpc-message and, for an error with details, grpc-status-details-bin (a
    google.rpc.Status, base64 as every -bin value): the rich error native gRPC sends too."""
    if error is None:
        return [(b"grpc-status", b"0"), (b"grpc-message", b"")]
    fields = [
        (b"grpc-status", str(error.code.value[0]).encode()),
        (b"grpc-message", urllib.parse.quote(error.message, safe=" ").encode()),
    ]
    if error.field is not None:
        details = base64.b64encode(error.to_status().SerializeToString()).rstrip(b"=")
        fields.append((b"grpc-status-details-bin", details))
    return fields


def trailers(error: PrismError | None) -> bytes:
    block = b"".join(name + b":" + value + b"\r\n" for name, value in trailer_fields(error))
    return frame(block, TRAILER_FLAG)


def parse_request(body: bytes, text: bool) -> bytes:
    """The single message of a gRPC-Web request body."""
    if text:
        try:
            body = base64.b64decode(b"".join(body.split()), validate=True)  # tolerate line breaks
        except (binascii.Error, ValueError):
            raise invalid_argument("body", "invalid gRPC-Web frame: not valid base64") from None
    if len(body) < 5:
        raise invalid_argument("body", f"invalid gRPC-Web frame: {len(body)} bytes, a frame needs at least 5")
    flag, length = struct.unpack(">BI", body[:5])
    if flag == COMPRESSED_FLAG:
        raise PrismError(grpc.StatusCode.UNIMPLEMENTED, "compressed gRPC-Web messages are not supported")
    if flag != 0:
        raise invalid_argument("body", f"invalid gRPC-Web frame: unexpected flag 0x{flag:02x}")
    if len(body) != 5 + length:
        raise invalid_argument(
            "body", f"invalid gRPC-Web frame: header says {length} bytes, body holds {len(body) - 5}"
        )
    return body[5:]


class GrpcWebApp:
    def __init__(self, methods: list[Method], pipeline: Pipeline, max_body: int) -> None:
        self.methods = {m.path: m for m in methods}
        self.pipeline = pipeline
        self.max_body = max_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        content_type = headers.get("content-type", "application/grpc-web+proto")
        if content_type.split(";", 1)[0].strip().lower() not in CONTENT_TYPES:
            error = unsupported_media_type(content_type, *CONTENT_TYPES)
            await respond_error(send, error, trailer_fields(error))
            return
        text = content_type.startswith("application/grpc-web-text")
        writer = _Writer(send, content_type, text)
        body = RequestBody(receive)
        try:
            if scope["method"] != "POST":
                raise PrismError(grpc.StatusCode.UNIMPLEMENTED, "gRPC-Web calls use POST", http_status=405)
            peer = self.pipeline.asgi_peer(scope)
            method = self.methods.get(scope["path"])
            if method is None:
                unknown = PrismError(grpc.StatusCode.UNIMPLEMENTED, f"unknown method {scope['path']}")
                await self.pipeline.refuse_unknown(unknown, headers, peer)
            if method.client_streaming:
                raise PrismError(
                    grpc.StatusCode.UNIMPLEMENTED,
                    f"{method.path} streams requests, which gRPC-Web cannot carry; use native gRPC",
                )

            async def decode() -> Message:
                payload = parse_request(await body.read(self.max_body), text)
                try:
                    return method.request_type.FromString(payload)
                except DecodeError:
                    raise invalid_argument(
                        "body", f"not a valid {method.request_type.DESCRIPTOR.full_name} message"
                    ) from None

            if method.server_streaming:
                responses = await self.pipeline.stream(method, decode, headers, "grpc-web", peer)
                await writer.stream(responses, read_ahead(method))
                return
            response = await self.pipeline.unary(method, decode, headers, "grpc-web", peer)
            await writer.finish([response], None)
        except Exception as exc:
            if not writer.started:
                await body.drain(self.max_body)
            await writer.finish([], status_of(exc))


class _Writer:
    """Writes frames; an error before the first message is a trailers-only response."""

    def __init__(self, send: Send, content_type: str, text: bool) -> None:
        self.send = send
        self.content_type = content_type.encode()
        self.text = text
        self.started = False

    def _encode(self, data: bytes) -> bytes:
        return base64.b64encode(data) if self.text else data

    async def _start(self, error: PrismError | None) -> None:
        headers = [(b"content-type", self.content_type)]
        if error is not None:
            headers += trailer_fields(error)
        await self.send({"type": "http.response.start", "status": 200, "headers": headers})
        self.started = True

    async def stream(self, responses: AsyncIterator[Message], ahead: int) -> None:
        error: PrismError | None = None
        try:
            async with aclosing(batches(responses, ahead)) as ready:  # what is ready together goes in one send
                async for batch in ready:
                    if not self.started:
                        await self._start(None)
                    body = b"".join(self._encode(frame(response.SerializeToString())) for response in batch)
                    await self.send({"type": "http.response.body", "body": body, "more_body": True})
        except Exception as exc:
            error = status_of(exc)
        finally:
            await responses.aclose()  # type: ignore[attr-defined]
        await self.finish([], error)

    async def finish(self, messages: list[Message], error: PrismError | None) -> None:
        if not self.started and not messages and error is not None:
            await self._start(error)  # trailers-only: the status travels in the headers alone
            await self.send({"type": "http.response.body", "body": b""})
            return
        if not self.started:
            await self._start(None)
        body = b"".join(frame(m.SerializeToString()) for m in messages) + trailers(error)
        await self.send({"type": "http.response.body", "body": self._encode(body)})
