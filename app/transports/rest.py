"""REST/JSON and server-sent events for every RPC with a ``google.api.http`` binding.

A plain ASGI app, generic over the method table: the route, path parameters, query
parameters and body of each call come from the annotation, never from code written per RPC.
Unary RPCs answer JSON; server-streaming RPCs answer ``text/event-stream``:

    id: 1\nevent: message\ndata: {...response as JSON...}\n\n   one per response (id: its message id or
                                                                  next cursor, if any; Last-Event-ID
                                                                  resumes a paged Read there)
    event: end\ndata: {}\n\n                                       when the stream completes
    event: error\ndata: {"code","message","details"}\n\n           when it fails
    : ping                                                       keep-alive comments

An EventSource cannot set headers, so streams also take the session token as the
``prism_session`` query parameter.
"""

from __future__ import annotations

import asyncio
import logging
import re
import urllib.parse
from collections.abc import AsyncIterator
from contextlib import aclosing
from typing import Any

from google.protobuf.message import Message
from sse_starlette.sse import EventSourceResponse, ServerSentEvent

from app.batches import batches, read_ahead
from app.methods import Method
from app.pipeline import SESSION_HEADER, Decode, Pipeline, status_of
from app.transports import json_codec
from app.transports.asgi_util import Receive, RequestBody, Scope, Send, header_map, respond, respond_error
from prism.errors import PrismError, invalid_argument, unsupported_media_type

log = logging.getLogger("prism.rest")

SESSION_QUERY = "prism_session"
HEAD_WAIT_SECONDS = 0.5


def _segment(path: str) -> str:
    """The second segment of a path: "kv" of "/v1/kv/a/b", "kv:exists" of "/v1/kv:exists"."""
    parts = path.split("/", 3)
    return parts[2] if len(parts) > 2 else ""


class RestRouter:
    def __init__(self, methods: list[Method], pipeline: Pipeline, max_body: int, ping_seconds: float) -> None:
        self.pipeline = pipeline
        self.max_body = max_body
        self.ping_seconds = ping_seconds
        bound = [m for m in methods if m.http is not None and not m.client_streaming]
        # Literal routes first, so "/v1/kv:exists" never reads as a key.
        self.routes = sorted(bound, key=lambda m: bool(m.http and m.http.path_fields))
        # Candidates by a path's second segment ("kv", "kv:exists", "topics"), so a request tries
        # a few patterns rather than all; templates with a variable there are tried for any path.
        segments = [(_segment(m.http.template if m.http else ""), m) for m in self.routes]
        self.anywhere = [m for segment, m in segments if "{" in segment]
        self.candidates: dict[str, list[Method]] = {}
        for segment, method in segments:
            if "{" not in segment:
                self.candidates.setdefault(segment, []).append(method)
        for routes in self.candidates.values():
            routes.extend(self.anywhere)
        # Bodyless routes whose path fields are plain strings build the request directly.
        self.direct = {m.path for m in bound if m.http and m.http.body == "" and all(_plain_string(m, f) for f in m.http.path_fields)}

    def match(self, verb: str, path: str) -> tuple[Method, dict[str, str]]:
        """The method and its path parameters, still percent-encoded (decoding them is part of
        reading the request, which comes after the credentials)."""
        allowed: list[str] = []
        for method in self.candidates.get(_segment(path), self.anywhere):
            rule = method.http
            assert rule is not None
            found = rule.regex.match(path)
            if found is None:
                continue
            if rule.verb != verb:
                allowed.append(rule.verb)
                continue
            return method, found.groupdict()
        if allowed:
            raise PrismError.method_not_allowed(verb, path, allowed)
        raise PrismError.no_route(verb, path)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        raw_path = scope.get("raw_path") or scope["path"].encode()
        try:
            path = raw_path.split(b"?", 1)[0].decode("ascii")
        except UnicodeDecodeError:
            path = urllib.parse.quote(scope["path"])
        metadata = header_map(scope)
        body = RequestBody(receive)
        try:
            peer = self.pipeline.asgi_peer(scope)
            try:
                method, path_params = self.match(scope["method"], path)
            except PrismError as unknown:
                await self.pipeline.refuse_unknown(unknown, metadata, peer)
            query = urllib.parse.parse_qsl(scope.get("query_string", b"").decode("latin-1"), keep_blank_values=True)
            if method.server_streaming:
                token = next((v for k, v in query if k == SESSION_QUERY), "")
                if token and SESSION_HEADER not in metadata:
                    metadata[SESSION_HEADER] = token
                query = [(k, v) for k, v in query if k != SESSION_QUERY]

            async def decode() -> Message:
                request = await self._decode(method, path_params, query, metadata, body)
                return _resumed(request, metadata) if method.server_streaming else request

            if method.server_streaming:
                await self._stream(method, decode, metadata, peer, scope, receive, send)
                return
            response = await self.pipeline.unary(method, decode, metadata, "rest", peer)
        except Exception as exc:
            error = status_of(exc)
            allow = [(b"allow", ", ".join(error.allowed).encode())] if error.allowed else []
            await body.drain(self.max_body)
            await respond_error(send, error, allow)
            return
        await respond(send, 200, json_codec.to_json(response))

    async def _decode(
        self,
        method: Method,
        raw_params: dict[str, str],
        query: list[tuple[str, str]],
        metadata: dict[str, str],
        body: RequestBody,
    ) -> Message:
        rule = method.http
        assert rule is not None
        path_params = _unquote(raw_params)
        if not query and method.path in self.direct:
            return method.request_type(**path_params)
        descriptor = method.request_type.DESCRIPTOR
        fields = json_codec.text_params(descriptor, path_params.items())
        if rule.body == "":
            return json_codec.parse_message(
                json_codec.merge(json_codec.text_params(descriptor, query), fields), method.request_type, "query"
            )
        if query:
            raise invalid_argument(query[0][0], f"unknown parameter: {method.name} takes its fields in the body")
        _check_content_type(metadata.get("content-type", ""))
        raw = await body.read(self.max_body)
        data = json_codec.parse_body(raw)
        if rule.body != "*":  # the body is one field: no body leaves it unset, "{}" sets it empty
            data = {descriptor.fields_by_name[rule.body].json_name: data} if raw.strip() else {}
        return json_codec.parse_message(json_codec.merge(data, fields), method.request_type)

    async def _stream(
        self,
        method: Method,
        decode: Decode,
        metadata: dict[str, str],
        peer: str | None,
        scope: Scope,
        receive: Receive,
        send: Send,
    ) -> None:
        responses = await self.pipeline.stream(method, decode, metadata, "sse", peer)
        # Wait a moment for the first response before answering: a call its service refuses at
        # once (a bad pattern) then gets its HTTP status. A stream with nothing to send yet
        # (an empty queue) is answered after HEAD_WAIT_SECONDS all the same, and pinged.
        first = asyncio.ensure_future(anext(responses))
        try:
            async with asyncio.timeout(HEAD_WAIT_SECONDS):
                await asyncio.shield(first)
        except TimeoutError:
            pass
        except StopAsyncIteration:
            pass
        except BaseException:
            if first.done():
                await responses.aclose()  # type: ignore[attr-defined]
                raise  # refused before anything was sent: the error response
            first.cancel()
            raise
        events = EventSourceResponse(
            _events(first, responses, read_ahead(method)),
            ping=self.ping_seconds,
            headers={"cache-control": "no-store", "x-accel-buffering": "no"},
        )
        await events(scope, receive, send)


def _unquote(params: dict[str, str]) -> dict[str, str]:
    decoded = {}
    for name, value in params.items():
        try:
            decoded[name] = urllib.parse.unquote(value, errors="strict")
        except UnicodeDecodeError:
            raise invalid_argument(name, "is not UTF-8 once percent-decoded") from None
    return decoded


# Request bodies are JSON. curl -d sends x-www-form-urlencoded and fetch() with a string body
# text/plain (a CORS "simple" request): both are read as the JSON they carry.
JSON_BODY_TYPES = ("application/json", "text/plain", "application/x-www-form-urlencoded")


def _check_content_type(content_type: str) -> None:
    media_type = content_type.split(";", 1)[0].strip().lower()
    if media_type and media_type not in JSON_BODY_TYPES and not media_type.endswith("+json"):
        raise unsupported_media_type(media_type, "application/json")


def _plain_string(method: Method, name: str) -> bool:
    field = method.request_type.DESCRIPTOR.fields_by_name.get(name)
    return field is not None and field.type == field.TYPE_STRING and not field.is_repeated


def _event(response: Message, count: int) -> ServerSentEvent:
    """A response as an SSE event. Its id is what the response names itself by: a message's
    ``message_id`` (a browser acknowledges ``event.lastEventId``), a page's ``next_cursor`` (an
    EventSource that reconnects sends it back as Last-Event-ID and resumes after that page);
    else its position in the stream. A PubSub delivery is named by its message's id: an
    EventSource that reconnects sends it back as Last-Event-ID, the request's ``cursor``. A
    batch of messages is named by its last message's id."""
    inner = getattr(response, "message", None)  # a PubSub delivery's message
    inner_id = getattr(inner, "message_id", "") if isinstance(inner, Message) else ""
    if batch := getattr(response, "messages", None):  # a SubscribeBatches response
        inner_id = batch[-1].message_id
    event_id = getattr(response, "message_id", "") or inner_id or getattr(response, "next_cursor", "") or str(count)
    if not isinstance(response, Message):  # a Reader page, its JSON made by its service (app/services/reader_pages.py)
        return _OneLine(response.to_json(), event_id)  # type: ignore[attr-defined]
    return ServerSentEvent(data=json_codec.to_json(response).decode(), event="message", id=event_id)


LINE_BREAK = re.compile(r"\r\n|\r|\n")  # what ServerSentEvent removes from an id


class _OneLine(ServerSentEvent):
    """A message event whose data is JSON already encoded, written as ServerSentEvent writes
    it without splitting, decoding and encoding it again: the same bytes when the JSON is one
    line (which it is: JSON text holds no raw line break), else ServerSentEvent's own."""

    def __init__(self, data: bytes, event_id: str) -> None:
        super().__init__(data=None, event="message", id=event_id)
        self.payload = data

    def encode(self) -> bytes:
        if b"\n" in self.payload or b"\r" in self.payload:
            return ServerSentEvent(data=self.payload.decode(), event="message", id=self.id).encode()
        event_id = LINE_BREAK.sub("", self.id or "").encode()
        return b"".join((b"id: ", event_id, b"\r\nevent: message\r\ndata: ", self.payload, b"\r\n\r\n"))


def _resumed(request: Message, metadata: dict[str, str]) -> Message:
    """A stream request an EventSource reconnected with: its Last-Event-ID (the last page's
    ``next_cursor``, the last PubSub message's id) is the request's ``cursor``, unless the
    request names one itself."""
    last_event_id = metadata.get("last-event-id", "")
    if last_event_id and "cursor" in request.DESCRIPTOR.fields_by_name and not request.cursor:  # type: ignore[attr-defined]
        request.cursor = last_event_id  # type: ignore[attr-defined]
    return request


async def _events(first: asyncio.Future[Message], responses: AsyncIterator[Message], ahead: int) -> AsyncIterator[Any]:
    count = 0
    try:
        try:
            head: Message | None = await first
        except StopAsyncIteration:
            head = None
        if head is not None:
            count += 1
            yield _event(head, count)
            async with aclosing(batches(responses, ahead)) as ready:  # what is ready together goes in one send
                async for batch in ready:
                    chunk = []
                    for response in batch:
                        count += 1
                        chunk.append(_event(response, count).encode())
                    yield b"".join(chunk)
        yield ServerSentEvent(data="{}", event="end")
    except Exception as exc:
        yield ServerSentEvent(data=status_of(exc).to_json().decode(), event="error")
    finally:
        first.cancel()  # the client left before the first response: stop waiting for it
        await asyncio.gather(first, return_exceptions=True)
        await responses.aclose()  # type: ignore[attr-defined]
