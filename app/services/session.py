"""SessionService: opening sessions on named or inline configurations."""

from __future__ import annotations

from app.configs import ConfigRegistry
from app.pipeline import Call
from app.policy import Authorizer
from app.sessions import SessionStore
from prism.errors import invalid_argument
from prism.v1 import session_pb2


class SessionService:
    SERVICE = "prism.v1.SessionService"

    def __init__(self, sessions: SessionStore, configs: ConfigRegistry, authorizer: Authorizer) -> None:
        self.sessions = sessions
        self.configs = configs
        self.authorizer = authorizer

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, call: Call
    ) -> session_pb2.CreateSessionResponse:
        if request.HasField("config") == bool(request.config_name):
            raise invalid_argument("configName", "set exactly one of configName and config")
        if request.config_name:
            config = await self.configs.get(request.config_name)
        else:
            config = await self.configs.validated(request.config)
        self.authorizer.check(call.identity, call.operation, config.namespace)
        token, record = await self.sessions.create(call.identity.name, config, call.identity.roles)
        return session_pb2.CreateSessionResponse(token=token, session=record.to_proto())

    async def GetSession(self, request: session_pb2.GetSessionRequest, call: Call) -> session_pb2.GetSessionResponse:
        assert call.session is not None
        return session_pb2.GetSessionResponse(session=call.session.to_proto())

    async def Heartbeat(self, request: session_pb2.HeartbeatRequest, call: Call) -> session_pb2.HeartbeatResponse:
        assert call.session is not None
        response = session_pb2.HeartbeatResponse()  # the effective deadline: idle, or absolute if sooner
        response.expires_at.FromNanoseconds(int(await self.sessions.heartbeat(call.session) * 1e9))
        return response

    async def CloseSession(
        self, request: session_pb2.CloseSessionRequest, call: Call
    ) -> session_pb2.CloseSessionResponse:
        assert call.session is not None
        await self.sessions.close(call.session)  # its open streams end with UNAUTHENTICATED
        return session_pb2.CloseSessionResponse()
