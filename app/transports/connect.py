"""The Connect protocol (connectrpc.com/docs/protocol) on the HTTP port, over the method table.

    unary             POST /<service>/<method>   application/json | application/proto
                      200 + the response message, or the error status + Connect error JSON
    server streaming  POST /<service>/<method>   application/connect+json | +proto
                      200 + enveloped messages, then an end-of-stream envelope (flag 0x02)
                      holding {"error": {...}} when the call failed

A Connect error is ``{"code": "invalid_argument", "message": ..., "details": [{"type":
"google.rpc.BadRequest", "value": <base64 of the message>}]}``, the same rich details native
gRPC sends in grpc-status-details-bin. ``connect-timeout-ms`` bounds the call. Written here for
the reasons gRPC-Web is (``grpc_web.py``): the wire format is small, and calls go through the
same pipeline, codecs and error model as every other transport. Browsers get plain JSON over
HTTP/1.1 with server streaming, without gRPC-Web.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import struct
import zlib
from contextlib import aclosing

import grpc
from google.protobuf.message import DecodeError, Message
from google.rpc import error_details_pb2

from app.batches import batches, read_ahead
from app.methods import Method
from app.pipeline import Pipeline, status_of
from app.transports import json_codec
from app.transports.asgi_util import Receive, RequestBody, Scope, Send, header_map, respond, respond_error
from prism.errors import PrismError, invalid_argument, too_large, unsupported_media_type

UNARY_TYPES = {"application/json": "json", "application/proto": "proto"}
STREAM_TYPES = {"application/connect+json": "json", "application/connect+proto": "proto"}
END_STREAM = 0x02
COMPRESSED = 0x01


def media_type(content_type: str) -> str:
    return content_type.split(";", 1)[0].strip().lower()


def is_connect(content_type: bytes) -> bool:
    """Whether a request with this content type is Connect's to serve, on a method's path."""
    kind = media_type(content_type.decode("latin-1"))
    return kind in UNARY_TYPES or kind in STREAM_TYPES


def error_json(error: PrismError) -> dict[str, object]:
    body: dict[str, object] = {"code": error.code.name.lower(), "message": error.message}
    if error.field is not None:
        violation = error_details_pb2.BadRequest.FieldViolation(field=error.field, description=error.message)
        value = error_details_pb2.BadRequest(field_violations=[violation]).SerializeToString()
        body["details"] = [
            {"type": "google.rpc.BadRequest", "value": base64.b64encode(value).decode().rstrip("=")}
        ]
    return body


def envelope(payload: bytes, flags: int = 0) -> bytes:
    return struct.pack(">BI", flags, len(payload)) + payload


class ConnectApp:
    def __init__(self, methods: list[Method], pipeline: Pipeline, max_body: int) -> None:
        self.methods = {m.path: m for m in methods}
        self.pipeline = pipeline
        self.max_body = max_body

    def serves(self, path: str) -> bool:
        return path in self.methods

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = header_map(scope)
        kind = media_type(headers.get("content-type", ""))
        method = self.methods[scope["path"]]
        if kind in STREAM_TYPES:
            await self._stream(method, STREAM_TYPES[kind], kind, headers, scope, receive, send)
        else:
            await self._unary(method, UNARY_TYPES[kind], kind, headers, scope, receive, send)

    async def _unary(
        self, method: Method, codec: str, kind: str, headers: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        body = RequestBody(receive)
        try:
            _check_headers(headers, scope)
            if method.server_streaming or method.client_streaming:
                raise unsupported_media_type(kind, "application/connect+json", "application/connect+proto")
            peer = self.pipeline.asgi_peer(scope)

            async def decode() -> Message:
                raw = _decompress(await body.read(self.max_body), headers.get("content-encoding", "identity"), self.max_body)
                return _parse(method, codec, raw)

            async with _deadline(headers):
                response = await self.pipeline.unary(method, decode, headers, "connect", peer)
        except Exception as exc:
            error = status_of(_timed_out(exc, headers))
            await body.drain(self.max_body)
            if error.http_status == 415:  # a refusal of the request itself, not of the call
                await respond_error(send, error)
                return
            await respond(send, error.http_status, json.dumps(error_json(error)).encode())
            return
        await respond(send, 200, _encode(response, codec), kind.encode())

    async def _stream(
        self, method: Method, codec: str, kind: str, headers: dict[str, str], scope: Scope, receive: Receive, send: Send
    ) -> None:
        body = RequestBody(receive)
        started = False

        async def start() -> None:
            nonlocal started
            started = True
            await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", kind.encode())]})

        error: PrismError | None = None
        try:
            _check_headers(headers, scope)
            if not method.server_streaming or method.client_streaming:
                raise unsupported_media_type(kind, "application/json", "application/proto")
            peer = self.pipeline.asgi_peer(scope)

            async def decode() -> Message:
                raw = await body.read(self.max_body)
                if len(raw) < 5:
                    raise invalid_argument("body", "a Connect stream request needs one enveloped message")
                flags, length = struct.unpack(">BI", raw[:5])
                if len(raw) != 5 + length:
                    raise invalid_argument("body", f"envelope says {length} bytes, body holds {len(raw) - 5}")
                payload = raw[5:]
                if flags & COMPRESSED:
                    payload = _decompress(payload, headers.get("connect-content-encoding", "identity"), self.max_body)
                return _parse(method, codec, payload)

            async with _deadline(headers):
                responses = await self.pipeline.stream(method, decode, headers, "connect", peer)
                try:
                    await start()
                    async with aclosing(batches(responses, read_ahead(method))) as ready:  # what is ready together: one send
                        async for batch in ready:
                            frames = b"".join(envelope(_encode(response, codec)) for response in batch)
                            await send({"type": "http.response.body", "body": frames, "more_body": True})
                finally:
                    await responses.aclose()  # type: ignore[attr-defined]
        except Exception as exc:
            error = status_of(_timed_out(exc, headers))
            if not started:
                await body.drain(self.max_body)
                if error.http_status == 415:
                    await respond_error(send, error)
                    return
                await start()
        end = {} if error is None else {"error": error_json(error)}
        await send({"type": "http.response.body", "body": envelope(json.dumps(end).encode(), END_STREAM)})


def _check_headers(headers: dict[str, str], scope: Scope) -> None:
    version = headers.get("connect-protocol-version")
    if version is not None and version != "1":
        raise invalid_argument("connect-protocol-version", f"unsupported version {version!r}; this server speaks 1")
    if scope["method"] != "POST":
        raise PrismError(grpc.StatusCode.UNIMPLEMENTED, "Connect calls use POST", http_status=405)


def _deadline(headers: dict[str, str]) -> contextlib.AbstractAsyncContextManager[object]:
    """The call's time bound from connect-timeout-ms (milliseconds, at most 10 digits)."""
    timeout = headers.get("connect-timeout-ms")
    if timeout is None:
        return contextlib.nullcontext()
    if not timeout.isdigit() or len(timeout) > 10:
        raise invalid_argument("connect-timeout-ms", "must be a positive integer of at most 10 digits")
    return asyncio.timeout(int(timeout) / 1000)


def _timed_out(exc: BaseException, headers: dict[str, str]) -> BaseException:
    if isinstance(exc, TimeoutError):
        return PrismError(
            grpc.StatusCode.DEADLINE_EXCEEDED, f"no answer within connect-timeout-ms {headers['connect-timeout-ms']}"
        )
    return exc


def _decompress(raw: bytes, encoding: str, limit: int) -> bytes:
    """The body as sent before compression: identity or gzip, at most ``limit`` bytes
    decompressed (a small body must not inflate past what a request may hold)."""
    encoding = encoding.strip().lower()
    if encoding == "identity":
        return raw
    if encoding != "gzip":
        raise PrismError(
            grpc.StatusCode.UNIMPLEMENTED, f"content encoding {encoding!r} is not supported; use identity or gzip"
        )
    inflater = zlib.decompressobj(wbits=31)
    try:
        data = inflater.decompress(raw, limit + 1)
    except zlib.error:
        raise invalid_argument("body", "not valid gzip data") from None
    if len(data) > limit:
        raise too_large("decompressed request body", len(data), limit)
    if not inflater.eof:
        raise invalid_argument("body", "truncated gzip data")
    return data


def _parse(method: Method, codec: str, raw: bytes) -> Message:
    if codec == "json":
        return json_codec.parse_message(json_codec.parse_body(raw), method.request_type)
    try:
        return method.request_type.FromString(raw)
    except DecodeError:
        raise invalid_argument("body", f"not a valid {method.request_type.DESCRIPTOR.full_name} message") from None


def _encode(message: Message, codec: str) -> bytes:
    return json_codec.to_json(message) if codec == "json" else message.SerializeToString()

