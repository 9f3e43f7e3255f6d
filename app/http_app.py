"""The ASGI application on the HTTP port.

    CORS ─► dispatch ─┬─ content-type application/grpc-web*  → GrpcWebApp
                      ├─ a method's path, Connect content type → ConnectApp (application/json,
                      │                                         /proto, /connect+json, +proto)
                      ├─ content-type application/grpc       → GrpcAsgiApp on HTTP/2 with trailers,
                      │                                         else 415 (use the gRPC port)
                      ├─ FastAPI's own paths                  → FastAPI (/docs, /openapi.json,
                      │                                         /metrics, /healthz, /readyz, lifespan)
                      └─ everything else                      → RestRouter (REST + SSE; NOT_FOUND)

The hot paths are plain ASGI apps: FastAPI's per-request machinery (routing, dependency
injection, validation) would cost several times the codec itself. FastAPI keeps what it is
good at — docs, the lifespan — and the OpenAPI document comes from the proto, not from it.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpc
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from app import metrics
from app.gateway import Gateway
from app.settings import Settings
from app.transports.asgi_util import ASGIApp, Receive, Scope, Send, respond_error
from app.transports.connect import ConnectApp, is_connect
from app.transports.grpc_asgi import GrpcAsgiApp, supports_trailers
from app.transports.grpc_web import CONTENT_TYPES, GrpcWebApp, trailer_fields
from app.transports.openapi import build_openapi
from app.transports.rest import RestRouter
from prism.errors import HTTP_STATUS, PrismError, unsupported_media_type

GRPC_WEB_HEADERS = ["grpc-status", "grpc-message", "grpc-status-details-bin"]


def create_app(settings: Settings) -> ASGIApp:
    gateway = Gateway(settings, workers=int(os.environ.get("PRISM_WORKERS", "1")))
    metrics.WORKER.info({"pid": str(os.getpid())})

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await gateway.start()
        # Everything built so far (protobuf descriptors, the method table, grpc, the app) lives
        # as long as the worker: out of the collector's reach, a full collection takes
        # microseconds instead of ~40 ms of stalled requests (benchmarks: gRPC p99.9 61 → 7 ms).
        gc.freeze()
        try:
            yield
        finally:
            await gateway.close()

    api = FastAPI(title="Prism", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)
    openapi = build_openapi(gateway.methods)

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi_json() -> JSONResponse:
        return JSONResponse(openapi)

    @api.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="Prism API")

    @api.get("/metrics", include_in_schema=False)
    async def scrape() -> Response:
        # Every worker's files are read with several workers: off the event loop.
        return Response(await asyncio.to_thread(metrics.exposition), media_type=metrics.CONTENT_TYPE)

    @api.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @api.get("/readyz", include_in_schema=False)
    async def readyz() -> JSONResponse:
        """The health monitor's last round (never waits on a backend): 503 while starting or
        while a required backend is down; an optional one down shows as "degraded"."""
        health, started = gateway.health.current, gateway.started
        body = health.to_json() if started else {**health.to_json(), "status": "starting"}
        return JSONResponse(body, status_code=200 if started and health.ready else 503)

    max_body = settings.limits.max_request_bytes
    _error_model(api)
    dispatch = Dispatch(
        grpc=GrpcAsgiApp(gateway.methods, gateway.pipeline, gateway.standard, max_body),
        grpc_web=GrpcWebApp(gateway.methods, gateway.pipeline, max_body),
        connect=ConnectApp(gateway.methods, gateway.pipeline, max_body),
        rest=RestRouter(gateway.methods, gateway.pipeline, max_body, settings.limits.sse_ping_seconds),
        fallback=api,
        fallback_paths={route.path for route in api.routes if isinstance(route, APIRoute)},
    )
    app = BrowserCORS(
        dispatch,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"],
        allow_headers=["*"],
        expose_headers=GRPC_WEB_HEADERS,
        max_age=600,
    )
    app.gateway = gateway  # type: ignore[attr-defined]  # for tests and the CLI
    return app


class BrowserCORS(CORSMiddleware):
    """Starlette's CORS, skipped for requests without an Origin header: only browsers send one,
    and only browsers read CORS headers. Spares non-browser calls the header rewriting."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            for name, _ in scope["headers"]:
                if name == b"origin":
                    break
            else:
                return await self.app(scope, receive, send)
        await super().__call__(scope, receive, send)


class Dispatch:
    """Routes by content type and path; every answer, even to a route nobody serves, comes in
    the one error model."""

    def __init__(
        self,
        grpc: ASGIApp,
        grpc_web: ASGIApp,
        connect: ConnectApp,
        rest: ASGIApp,
        fallback: ASGIApp,
        fallback_paths: set[str],
    ) -> None:
        self.grpc, self.grpc_web, self.connect, self.rest, self.fallback = grpc, grpc_web, connect, rest, fallback
        self.fallback_paths = frozenset(fallback_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.fallback(scope, receive, send)
        for name, value in scope["headers"]:
            if name != b"content-type":
                continue
            if value.startswith(b"application/grpc"):
                if value.startswith(b"application/grpc-web"):
                    return await self.grpc_web(scope, receive, send)
                if supports_trailers(scope):
                    return await self.grpc(scope, receive, send)
                error = unsupported_media_type(
                    value.decode("latin-1"),
                    *CONTENT_TYPES,
                    "native gRPC on the gRPC port (on this port it needs HTTP/2 with trailers: --server hypercorn)",
                )
                return await respond_error(send, error, trailer_fields(error))
            if self.connect.serves(scope["path"]) and is_connect(value):
                return await self.connect(scope, receive, send)
        if scope["path"] in self.fallback_paths:
            return await self.fallback(scope, receive, send)
        await self.rest(scope, receive, send)  # REST and SSE, and NOT_FOUND for any other path


def _error_model(api: FastAPI) -> None:
    """FastAPI's own refusals (405 on /healthz, ...) in the one error model, not {"detail"}."""

    async def http_error(_: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        code = next((c for c, status in HTTP_STATUS.items() if status == exc.status_code), grpc.StatusCode.UNKNOWN)
        error = PrismError(code, str(exc.detail), http_status=exc.status_code)
        return Response(error.to_json(), status_code=exc.status_code, media_type="application/json", headers=exc.headers)

    api.add_exception_handler(StarletteHTTPException, http_error)
