"""The one request pipeline every transport goes through.

    transport decodes ─► Pipeline.unary / Pipeline.stream
                           ├─ check required fields (google.api.field_behavior)
                           ├─ resolve the session (x-prism-session) and its access pattern
                           └─ call the service method
    transport encodes ◄─ response message(s) or PrismError

Authentication beyond the session token, RBAC, rate limits and audit plug in here, so gRPC
and HTTP can never disagree about them.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import grpc
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from app.errors import PrismError, failed_precondition, internal, invalid_argument, unauthenticated
from app.methods import Method
from app.sessions import SessionRecord, SessionStore
from prism.v1 import config_pb2

log = logging.getLogger("prism.pipeline")

SESSION_HEADER = "x-prism-session"


@dataclass(slots=True)
class Call:
    """What a service method knows about the call besides its request."""

    method: Method
    session: SessionRecord | None
    token: str
    transport: str  # "grpc", "rest", "sse" or "grpc-web"

    @property
    def config(self) -> config_pb2.ClientConfig:
        assert self.session is not None, "only session-bound methods read call.config"
        return self.session.config


def check_required(message: Message, required: Mapping[str, tuple[str, ...]], prefix: str = "") -> None:
    """INVALID_ARGUMENT naming the first REQUIRED field left empty, at any depth."""
    descriptor = message.DESCRIPTOR
    for name in required.get(descriptor.full_name, ()):
        field = descriptor.fields_by_name[name]
        if field.is_repeated:
            present = len(getattr(message, name)) > 0
        elif field.type == FieldDescriptor.TYPE_MESSAGE:
            present = message.HasField(name)
        else:
            present = bool(getattr(message, name))
        if not present:
            raise invalid_argument(prefix + field.json_name, "is required")
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or field.message_type.GetOptions().map_entry:
            continue
        if field.is_repeated:
            for i, item in enumerate(value):
                check_required(item, required, f"{prefix}{field.json_name}[{i}].")
        else:
            check_required(value, required, f"{prefix}{field.json_name}.")


class Pipeline:
    def __init__(self, sessions: SessionStore) -> None:
        self.sessions = sessions

    async def begin(self, method: Method, request: Message, metadata: Mapping[str, str], transport: str) -> Call:
        if method.handler is None:
            raise PrismError(grpc.StatusCode.UNIMPLEMENTED, f"{method.service}/{method.name} is not implemented yet")
        if method.required_fields:
            check_required(request, method.required_fields)
        if not method.requires_session:
            return Call(method, None, "", transport)
        token = metadata.get(SESSION_HEADER, "")
        if not token:
            raise unauthenticated(
                f"{method.service}/{method.name} needs a session: send the token from "
                f"CreateSession as {SESSION_HEADER}"
            )
        session = await self.sessions.resolve(token)
        if method.pattern and session.config.pattern != method.pattern:
            raise failed_precondition(
                f"session config {session.config.name!r} is for "
                f"{config_pb2.AccessPattern.Name(session.config.pattern)}, but "
                f"{method.service}/{method.name} needs "
                f"{config_pb2.AccessPattern.Name(method.pattern)}"
            )
        return Call(method, session, token, transport)

    async def unary(self, method: Method, request: Message, metadata: Mapping[str, str], transport: str) -> Message:
        call = await self.begin(method, request, metadata, transport)
        try:
            return await method.handler(request, call)  # type: ignore[misc]
        except PrismError:
            raise
        except Exception as exc:
            log.exception("%s failed", method.path)
            raise internal() from exc

    async def stream(
        self, method: Method, request: Message, metadata: Mapping[str, str], transport: str
    ) -> AsyncIterator[Message]:
        """Validates and resolves eagerly, so errors surface before the first message."""
        call = await self.begin(method, request, metadata, transport)
        return self._guarded(method, method.handler(request, call))  # type: ignore[arg-type]

    @staticmethod
    async def _guarded(method: Method, responses: AsyncIterator[Message]) -> AsyncIterator[Message]:
        try:
            async for response in responses:
                yield response
        except PrismError:
            raise
        except Exception as exc:
            log.exception("%s failed", method.path)
            raise internal() from exc
        finally:
            await responses.aclose()  # type: ignore[attr-defined]


def status_of(exc: BaseException) -> PrismError:
    """Any exception as the PrismError a client may see."""
    if isinstance(exc, PrismError):
        return exc
    log.error("unhandled error", exc_info=exc)
    return PrismError(grpc.StatusCode.INTERNAL, internal().message)
