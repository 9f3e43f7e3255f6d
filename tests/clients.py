"""Test clients for the four transports, all speaking in proto messages.

Each client has ``call(rpc, request, token)`` returning the response message or raising
:class:`CallError` with the gRPC status name, and ``stream(rpc, request, token)`` yielding
responses. ``rpc`` is the gRPC path, e.g. ``/prism.v1.KeyValueService/Get``. REST requests
are built from the proto's ``google.api.http`` annotation, as an OpenAPI-generated SDK would.
"""

from __future__ import annotations

import base64
import json
import struct
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import httpx
from google.protobuf import json_format
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

from app.methods import Method, all_methods
from prism.errors import HTTP_STATUS

METHODS: dict[str, Method] = {m.path: m for m in all_methods()}
CODE_NAMES = {code.value[0]: code.name for code in grpc.StatusCode}


@dataclass
class CallError(Exception):
    code: str  # gRPC status name, e.g. "INVALID_ARGUMENT"
    message: str
    http_status: int | None = None
    body: Any = None
    violations: tuple[str, ...] = ()  # fields named by a google.rpc.BadRequest in the details

    def __str__(self) -> str:
        return f"{self.code} ({self.http_status}): {self.message}"


class GrpcClient:
    name = "grpc"

    def __init__(
        self,
        target: str,
        metadata: dict[str, str] | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        """``credentials``: TLS (and a client certificate, for mTLS); plaintext without."""
        # Responses may carry a value of up to limits.max_value_bytes (gRPC's default is 4 MiB).
        options = [("grpc.max_receive_message_length", 64 * 1024 * 1024)]
        if credentials is None:
            self.channel = grpc.aio.insecure_channel(target, options=options)
        else:
            self.channel = grpc.aio.secure_channel(target, credentials, options=options)
        self.extra = tuple((metadata or {}).items())  # credentials sent on every call

    def _metadata(self, token: str) -> tuple[tuple[str, str], ...]:
        return ((("x-prism-session", token),) if token else ()) + self.extra

    async def call(self, rpc: str, request: Message, token: str = "") -> Message:
        method = METHODS[rpc]
        stub = self.channel.unary_unary(
            rpc, request_serializer=lambda m: m.SerializeToString(), response_deserializer=method.response_type.FromString
        )
        try:
            return await stub(request, metadata=self._metadata(token), timeout=10)
        except grpc.aio.AioRpcError as exc:
            details = dict(exc.trailing_metadata() or ()).get("grpc-status-details-bin")
            raise CallError(exc.code().name, exc.details() or "", violations=status_violations(details)) from None

    async def stream(self, rpc: str, request: Message, token: str = "") -> AsyncIterator[Message]:
        method = METHODS[rpc]
        stub = self.channel.unary_stream(
            rpc, request_serializer=lambda m: m.SerializeToString(), response_deserializer=method.response_type.FromString
        )
        call = stub(request, metadata=self._metadata(token))
        try:
            async for response in call:
                yield response
        except grpc.aio.AioRpcError as exc:
            raise CallError(exc.code().name, exc.details() or "") from None
        finally:
            call.cancel()

    async def close(self) -> None:
        await self.channel.close()


def rest_request(method: Method, request: Message) -> tuple[str, str, dict[str, Any] | None, list[tuple[str, str]]]:
    """(verb, path, json body or None, query) for a request, from its http annotation."""
    rule = method.http
    assert rule is not None, f"{method.path} has no REST route"
    data = json_format.MessageToDict(request)
    path = rule.openapi_path
    for name in rule.path_fields:
        value = data.pop(method.request_type.DESCRIPTOR.fields_by_name[name].json_name, "")
        path = path.replace("{" + name + "}", urllib.parse.quote(str(value), safe=""))
    if rule.body == "":
        query = []
        for key, value in data.items():
            for item in value if isinstance(value, list) else [value]:
                query.append((key, json.dumps(item) if isinstance(item, bool) else str(item)))
        return rule.verb, path, None, query
    if rule.body != "*":
        data = data.get(method.request_type.DESCRIPTOR.fields_by_name[rule.body].json_name, {})
    return rule.verb, path, data, []


def status_violations(details: bytes | None) -> tuple[str, ...]:
    """The fields named by the BadRequest in a serialized google.rpc.Status."""
    if not details:
        return ()
    status = status_pb2.Status.FromString(details)
    fields: list[str] = []
    for detail in status.details:
        bad_request = error_details_pb2.BadRequest()
        if detail.Unpack(bad_request):
            fields.extend(v.field for v in bad_request.field_violations)
    return tuple(fields)


def _error_from_json(response: httpx.Response) -> CallError:
    try:
        body = response.json()
        violations = tuple(
            v["field"] for d in body["details"] if d.get("@type", "").endswith("google.rpc.BadRequest")
            for v in d.get("fieldViolations", [])
        )
        return CallError(body["code"], body["message"], response.status_code, body, violations)
    except (ValueError, KeyError):
        return CallError("UNKNOWN", response.text, response.status_code)


class RestClient:
    """REST/JSON for unary calls, server-sent events for streams."""

    name = "rest"

    def __init__(
        self,
        base_url: str,
        http2: bool = False,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,  # TLS client certificates, source address
    ) -> None:
        self.http = httpx.AsyncClient(
            base_url=base_url, http1=not http2, http2=http2, timeout=10, headers=headers, transport=transport
        )

    async def call(self, rpc: str, request: Message, token: str = "") -> Message:
        method = METHODS[rpc]
        verb, path, body, query = rest_request(method, request)
        headers = {"x-prism-session": token} if token else {}
        response = await self.http.request(verb, path, json=body, params=query, headers=headers)
        if response.status_code != 200:
            raise _error_from_json(response)
        message = method.response_type()
        json_format.ParseDict(response.json(), message)
        return message

    async def stream(self, rpc: str, request: Message, token: str = "") -> AsyncIterator[Message]:
        method = METHODS[rpc]
        verb, path, body, query = rest_request(method, request)
        headers = {"x-prism-session": token, "accept": "text/event-stream"} if token else {}
        async with self.http.stream(verb, path, json=body, params=query, headers=headers, timeout=None) as response:
            if response.status_code != 200:
                await response.aread()
                raise _error_from_json(response)
            async for event, data in sse_events(response):
                if event == "message":
                    message = method.response_type()
                    json_format.ParseDict(json.loads(data), message)
                    yield message
                elif event == "error":
                    body = json.loads(data)
                    raise CallError(body["code"], body["message"], 200, body)
                elif event == "end":
                    return

    async def close(self) -> None:
        await self.http.aclose()


async def sse_events(response: httpx.Response) -> AsyncIterator[tuple[str, str]]:
    """(event, data) pairs of a text/event-stream body; comments are skipped."""
    event, data = "message", []
    async for line in response.aiter_lines():
        if line == "":
            if data:
                yield event, "\n".join(data)
            event, data = "message", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "event":
                event = value
            elif field == "data":
                data.append(value)


def grpc_web_frames(body: bytes) -> tuple[list[bytes], dict[str, str]]:
    """Data frames and the trailers of a gRPC-Web response body."""
    messages, trailers, offset = [], {}, 0
    while offset < len(body):
        flag, length = struct.unpack(">BI", body[offset : offset + 5])
        payload = body[offset + 5 : offset + 5 + length]
        offset += 5 + length
        if flag & 0x80:
            for line in payload.decode().split("\r\n"):
                if line:
                    key, _, value = line.partition(":")
                    trailers[key.strip().lower()] = value.strip()
        else:
            messages.append(payload)
    return messages, trailers


def decode_grpc_web_text(body: bytes) -> bytes:
    """-text bodies are base64 per frame; every frame is whole 4-character quanta."""
    return b"".join(base64.b64decode(body[i : i + 4]) for i in range(0, len(body) - len(body) % 4, 4))


class GrpcWebClient:
    name = "grpc-web"

    def __init__(
        self,
        base_url: str,
        text: bool = False,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
    ) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=10, headers=headers, transport=transport)
        self.text = text
        self.content_type = "application/grpc-web-text" if text else "application/grpc-web+proto"
        if text:
            self.name = "grpc-web-text"

    def _body(self, request: Message) -> bytes:
        payload = request.SerializeToString()
        framed = struct.pack(">BI", 0, len(payload)) + payload
        return base64.b64encode(framed) if self.text else framed

    def _headers(self, token: str) -> dict[str, str]:
        headers = {"content-type": self.content_type, "x-grpc-web": "1"}
        if token:
            headers["x-prism-session"] = token
        return headers

    def _decode(self, rpc: str, raw: bytes, headers: httpx.Headers, decoded: bool = False) -> list[Message]:
        body = decode_grpc_web_text(raw) if self.text and not decoded else raw
        messages, trailers = grpc_web_frames(body)
        status = trailers.get("grpc-status", headers.get("grpc-status"))
        if status is None:
            raise CallError("UNKNOWN", "no grpc-status in the response")
        if status != "0":
            message = urllib.parse.unquote(trailers.get("grpc-message", headers.get("grpc-message", "")))
            details = trailers.get("grpc-status-details-bin", headers.get("grpc-status-details-bin"))
            raise CallError(
                CODE_NAMES[int(status)],
                message,
                HTTP_STATUS.get(grpc.StatusCode[CODE_NAMES[int(status)]]),
                violations=status_violations(base64.b64decode(details + "=" * (-len(details) % 4)) if details else None),
            )
        return [METHODS[rpc].response_type.FromString(m) for m in messages]

    async def call(self, rpc: str, request: Message, token: str = "") -> Message:
        response = await self.http.post(rpc, content=self._body(request), headers=self._headers(token))
        assert response.status_code == 200, response.text
        (message,) = self._decode(rpc, response.content, response.headers)
        return message

    async def stream(self, rpc: str, request: Message, token: str = "") -> AsyncIterator[Message]:
        async with self.http.stream(
            "POST", rpc, content=self._body(request), headers=self._headers(token), timeout=None
        ) as response:
            assert response.status_code == 200
            raw, source = b"", b""
            async for chunk in response.aiter_raw():
                if self.text:
                    raw += chunk
                    cut = len(raw) - len(raw) % 4
                    source += decode_grpc_web_text(raw[:cut])
                    raw = raw[cut:]
                else:
                    source += chunk
                while len(source) >= 5:
                    flag, length = struct.unpack(">BI", source[:5])
                    if len(source) < 5 + length:
                        break
                    frame, source = source[: 5 + length], source[5 + length :]
                    if flag & 0x80:
                        self._decode(rpc, frame, response.headers, decoded=True)
                        return
                    yield METHODS[rpc].response_type.FromString(frame[5:])
            if response.headers.get("grpc-status", "0") != "0":
                self._decode(rpc, b"", response.headers)

    async def close(self) -> None:
        await self.http.aclose()


class ConnectClient:
    """The Connect protocol: unary POSTs of JSON or binary, server streams as enveloped
    messages ending with an end-of-stream envelope."""

    def __init__(self, base_url: str, binary: bool = False, headers: dict[str, str] | None = None) -> None:
        self.http = httpx.AsyncClient(base_url=base_url, timeout=10, headers=headers)
        self.binary = binary
        self.name = "connect-proto" if binary else "connect"

    def _headers(self, token: str, stream: bool) -> dict[str, str]:
        codec = "proto" if self.binary else "json"
        content_type = f"application/connect+{codec}" if stream else f"application/{codec}"
        headers = {"content-type": content_type, "connect-protocol-version": "1"}
        if token:
            headers["x-prism-session"] = token
        return headers

    def _encode(self, message: Message) -> bytes:
        return message.SerializeToString() if self.binary else json.dumps(json_format.MessageToDict(message)).encode()

    def _decode(self, rpc: str, payload: bytes) -> Message:
        if self.binary:
            return METHODS[rpc].response_type.FromString(payload)
        return json_format.ParseDict(json.loads(payload), METHODS[rpc].response_type())

    @staticmethod
    def _error(body: dict[str, Any], http_status: int | None) -> CallError:
        violations: list[str] = []
        for detail in body.get("details", []):
            if detail.get("type") == "google.rpc.BadRequest":
                value = detail["value"]
                bad = error_details_pb2.BadRequest.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))
                violations.extend(v.field for v in bad.field_violations)
        return CallError(body["code"].upper(), body.get("message", ""), http_status, body, tuple(violations))

    async def call(self, rpc: str, request: Message, token: str = "") -> Message:
        response = await self.http.post(rpc, content=self._encode(request), headers=self._headers(token, False))
        if response.status_code != 200:
            raise self._error(response.json(), response.status_code)
        return self._decode(rpc, response.content)

    async def stream(self, rpc: str, request: Message, token: str = "") -> AsyncIterator[Message]:
        payload = self._encode(request)
        body = struct.pack(">BI", 0, len(payload)) + payload
        async with self.http.stream("POST", rpc, content=body, headers=self._headers(token, True), timeout=None) as response:
            if response.status_code != 200:
                await response.aread()
                raise self._error(response.json(), response.status_code)
            source = b""
            async for chunk in response.aiter_raw():
                source += chunk
                while len(source) >= 5:
                    flags, length = struct.unpack(">BI", source[:5])
                    if len(source) < 5 + length:
                        break
                    frame, source = source[5 : 5 + length], source[5 + length :]
                    if flags & 0x02:
                        end = json.loads(frame)
                        if "error" in end:
                            raise self._error(end["error"], 200)
                        return
                    yield self._decode(rpc, frame)

    async def close(self) -> None:
        await self.http.aclose()
