"""The one error model shared by every transport and every adapter.

It lives in the contract package, below both layers: ``adapters/`` raise it without importing
anything from ``app/``, and the transports turn it into their wire forms.

A service, the pipeline or an adapter raises :class:`PrismError`; each transport turns it
into its own wire form from the single table below:

    PrismError(code, message, field=...)
      ├─ gRPC:      status code + message (+ google.rpc.BadRequest details)
      ├─ REST/SSE:  HTTP_STATUS[code] + {"code", "message", "details"}
      └─ gRPC-Web:  grpc-status / grpc-message trailers

Anything else that escapes a handler is logged and answered as INTERNAL with a fixed message,
so no stack trace reaches a client.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from google.rpc import error_details_pb2, status_pb2

# gRPC status → HTTP status, as grpc-gateway maps them (runtime/errors.go).
HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.OK: 200,
    grpc.StatusCode.CANCELLED: 499,  # nginx's "client closed request"; no standard code
    grpc.StatusCode.UNKNOWN: 500,
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    # The system is not in the state the call needs; the client must change something first.
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.INTERNAL: 500,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DATA_LOSS: 500,
}

INTERNAL_MESSAGE = "internal error; see the gateway log"
# Written when even encoding an error fails.
FALLBACK_BODY = b'{"code":"INTERNAL","message":"failed to encode error","details":[]}'


class PrismError(Exception):
    """A failure a client should see, with a gRPC status and a message naming the problem.

    ``field`` names the offending request field; ``http_status`` overrides the table for the
    few cases HTTP tells apart where gRPC does not (413 for an oversized body).
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        message: str,
        *,
        field: str | None = None,
        http_status: int | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.field = field
        self.http_status = http_status or HTTP_STATUS[code]
        self.retry_after = retry_after
        self.allowed: list[str] = []  # HTTP methods that would match, for 405 answers

    @classmethod
    def cancelled(cls) -> PrismError:
        return cls(grpc.StatusCode.CANCELLED, "the client went away")

    @classmethod
    def no_route(cls, verb: str, path: str) -> PrismError:
        return cls(grpc.StatusCode.NOT_FOUND, f"no route for {verb} {path}")

    @classmethod
    def method_not_allowed(cls, verb: str, path: str, allowed: list[str]) -> PrismError:
        error = cls(
            grpc.StatusCode.UNIMPLEMENTED,
            f"{verb} is not allowed on {path}; use {', '.join(sorted(set(allowed)))}",
            http_status=405,
        )
        error.allowed = sorted(set(allowed))
        return error

    def details(self) -> list[dict[str, Any]]:
        if self.field is None:
            return []
        return [
            {
                "@type": "type.googleapis.com/google.rpc.BadRequest",
                "fieldViolations": [{"field": self.field, "description": self.message}],
            }
        ]

    def to_status(self) -> status_pb2.Status:
        """As google.rpc.Status, with a BadRequest naming the field when there is one: the
        gRPC rich error (grpc-status-details-bin) and a batch entry's result."""
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        if self.field is not None:
            violation = error_details_pb2.BadRequest.FieldViolation(field=self.field, description=self.message)
            status.details.add().Pack(error_details_pb2.BadRequest(field_violations=[violation]))
        return status

    def to_json(self) -> bytes:
        try:
            body = {"code": self.code.name, "message": self.message, "details": self.details()}
            return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()
        except Exception:
            return FALLBACK_BODY

    def __repr__(self) -> str:
        return f"PrismError({self.code.name}, {self.message!r})"


def invalid_argument(field: str, problem: str) -> PrismError:
    return PrismError(grpc.StatusCode.INVALID_ARGUMENT, f"{field}: {problem}", field=field)


def prefixed(error: PrismError, prefix: str) -> PrismError:
    """A refusal of one part of a request as the request names that part (``entries[2].`` +
    ``idempotencyToken``); a refusal naming no field stays as it is."""
    if error.field is None:
        return error
    return PrismError(error.code, prefix + error.message, field=prefix + error.field)


def not_found(message: str) -> PrismError:
    return PrismError(grpc.StatusCode.NOT_FOUND, message)


def unauthenticated(message: str) -> PrismError:
    return PrismError(grpc.StatusCode.UNAUTHENTICATED, message)


def failed_precondition(message: str) -> PrismError:
    return PrismError(grpc.StatusCode.FAILED_PRECONDITION, message)


def too_large(what: str, size: int, limit: int) -> PrismError:
    return PrismError(
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        f"{what} is {size} bytes, above the limit of {limit} bytes",
        http_status=413,
    )


def unsupported_media_type(media_type: str, *supported: str) -> PrismError:
    return PrismError(
        grpc.StatusCode.UNIMPLEMENTED,
        f"content-type {media_type!r} is not supported here; use {' or '.join(supported)}",
        http_status=415,
    )


def internal() -> PrismError:
    return PrismError(grpc.StatusCode.INTERNAL, INTERNAL_MESSAGE)
