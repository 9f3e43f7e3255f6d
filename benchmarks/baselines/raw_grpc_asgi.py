"""A raw ASGI unary gRPC answer: reads the request, then sends the gateway's framed GetResponse
(from ``BENCH_BODY_FILE``) and ``grpc-status: 0`` in HTTP/2 trailers. The floor of native gRPC
through an ASGI server with the ``http.response.trailers`` extension (pyvoy, Hypercorn)."""

from __future__ import annotations

from typing import Any

from benchmarks.baselines.body import load

START = {"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/grpc")],
         "trailers": True}
BODY = {"type": "http.response.body", "body": load(), "more_body": False}
# HTTP/1.1 (the readiness probe): no trailers.
PROBE = {"type": "http.response.start", "status": 200, "headers": []}
TRAILERS = {"type": "http.response.trailers", "headers": [(b"grpc-status", b"0")], "more_trailers": False}


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        while (await receive()).get("more_body"):
            pass
        if scope.get("http_version") != "2":
            await send(PROBE)
            await send({"type": "http.response.body"})
            return
        await send(START)
        await send(BODY)
        await send(TRAILERS)
    elif scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})
