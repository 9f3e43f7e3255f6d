"""Small pure-ASGI helpers shared by the HTTP codecs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from typing import Any

from prism.errors import PrismError, too_large

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

JSON = b"application/json"


def header_map(scope: Scope) -> dict[str, str]:
    """Request headers by lower-case name (ASGI already lower-cases them)."""
    return {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}


class RequestBody:
    """A request's body, read once — or drained unread when the call is refused before it.

    The pipeline refuses a caller (no credentials, unknown method) before reading its body. An
    HTTP/1.1 server whose app answers without consuming the body closes the connection, and a
    client still writing gets EPIPE instead of the refusal: so the body is drained, chunk by
    chunk into nothing, up to the size a call may have."""

    __slots__ = ("disconnected", "done", "receive")

    def __init__(self, receive: Receive) -> None:
        self.receive = receive
        self.done = False
        self.disconnected = False  # the client went away before the body ended

    async def read(self, limit: int) -> bytes:
        """The whole body, refusing (413) as soon as it passes ``limit``."""
        chunks: list[bytes] = []
        size = 0
        while True:
            chunk = await self.next_chunk()
            size += len(chunk)
            if size > limit:
                self.done = True  # the server closes the connection: nothing more to read
                raise too_large("request body", size, limit)
            chunks.append(chunk)
            if self.done:
                return b"".join(chunks)

    async def drain(self, limit: int) -> None:
        """Read and drop what is left of the body, at most ``limit`` bytes."""
        size = 0
        try:
            while not self.done and size <= limit:
                size += len(await self.next_chunk())
        except PrismError:  # the client went away: nothing to drain
            self.done = True

    async def next_chunk(self) -> bytes:
        """The next piece of the body as it arrives; CANCELLED if the client goes away."""
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self.done = self.disconnected = True
            raise PrismError.cancelled()
        if not message.get("more_body", False):
            self.done = True
        return message.get("body", b"")


async def respond(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes = JSON,
    headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [(b"content-type", content_type), (b"content-length", str(len(body)).encode()), *headers],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def respond_error(send: Send, error: PrismError, headers: Iterable[tuple[bytes, bytes]] = ()) -> None:
    extra = list(headers)
    if error.retry_after is not None:
        extra.append((b"retry-after", str(max(1, round(error.retry_after))).encode()))
    if error.http_status == 401:  # RFC 9110 §15.5.2: a 401 names the scheme to use
        extra.append((b"www-authenticate", b'Bearer realm="prism"'))
    await respond(send, error.http_status, error.to_json(), headers=extra)


def first(mapping: Mapping[str, str], *names: str) -> str:
    for name in names:
        if value := mapping.get(name):
            return value
    return ""
