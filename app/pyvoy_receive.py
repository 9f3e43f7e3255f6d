"""pyvoy's ``receive()`` after the request body: wait for the disconnect, as ASGI says.

ASGI has ``receive()`` block, once the body is complete, until the client disconnects. pyvoy
1.3 instead answers at once with another empty ``http.request``; a task that waits for the
disconnect (sse-starlette's listener, the gRPC reset watcher) then spins without yielding and
stalls every other request of the worker. This middleware, installed only under pyvoy (see
app/asgi.py), turns those answers into a wait: it asks again after a short sleep, backing off
to ``MAX_POLL`` seconds, so a disconnect is seen within that long.
"""

from __future__ import annotations

import asyncio

from app.transports.asgi_util import ASGIApp, Message, Receive, Scope, Send

FIRST_POLL, MAX_POLL = 0.01, 0.25


class SettledReceive:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.gateway = getattr(app, "gateway", None)  # as create_app's app offers it

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        body_done = False

        async def settled() -> Message:
            nonlocal body_done
            message = await receive()
            if not body_done:
                body_done = message["type"] != "http.request" or not message.get("more_body", False)
                return message
            delay = FIRST_POLL
            while message["type"] == "http.request":  # pyvoy: "nothing new" means "still connected"
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_POLL)
                message = await receive()
            return message

        await self.app(scope, settled, send)
