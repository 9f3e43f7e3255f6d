"""SessionService: opening sessions on named or inline configurations."""

from __future__ import annotations

from app.configs import ConfigRegistry
from app.pipeline import Call
from app.sessions import SessionStore
from prism.errors import invalid_argument
from prism.v1 import config_pb2, session_pb2


class SessionService:
    SERVICE = "prism.v1.SessionService"

    def __init__(self, sessions: SessionStore, configs: ConfigRegistry) -> None:
        self.sessions = sessions
        self.configs = configs
        self.scopes = {"CreateSession": self._config_namespace}

    async def _config(self, request: session_pb2.CreateSessionRequest) -> config_pb2.ClientConfig:
        if request.HasField("config") == bool(request.config_name):
            raise invalid_argument("configName", "set exactly one of configName and config")
        if request.config_name:
            return await self.configs.get(request.config_name)
        return await self.configs.validated(request.config)

    async def _config_namespace(self, request: session_pb2.CreateSessionRequest, call: Call) -> str:
        """Authorization's scope: the namespace of the configuration asked for."""
        call.resource = await self._config(request)
        return call.resource.namespace

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, call: Call
    ) -> session_pb2.CreateSessionResponse:
        config = call.resource or await self._config(request)  # resolved once, by the scope
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
