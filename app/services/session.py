"""SessionService and ConfigService: opening sessions on named configurations."""

from __future__ import annotations

import grpc

from app.backends import BACKEND_TYPES
from app.errors import PrismError, invalid_argument, not_found
from app.pipeline import Call
from app.sessions import SessionStore
from app.settings import NamedConfig, Settings
from prism.v1 import config_pb2, session_pb2

DEV_IDENTITY = "anonymous"


def client_config(named: NamedConfig, settings: Settings) -> config_pb2.ClientConfig:
    return config_pb2.ClientConfig(
        name=named.name,
        version="1",
        pattern=config_pb2.AccessPattern.Value(f"ACCESS_PATTERN_{named.pattern}"),
        backend=config_pb2.BackendConfig(
            type=BACKEND_TYPES[settings.backends[named.backend].type], instance=named.backend
        ),
        consistency=config_pb2.ConsistencyConfig(level=config_pb2.CONSISTENCY_LEVEL_STRONG),
        namespace=named.namespace,
    )


class ConfigRegistry:
    """Named client configurations from the server configuration."""

    def __init__(self, settings: Settings) -> None:
        self.configs = {c.name: client_config(c, settings) for c in settings.configs}

    def get(self, name: str) -> config_pb2.ClientConfig:
        try:
            return self.configs[name]
        except KeyError:
            known = ", ".join(sorted(self.configs))
            raise not_found(f"no configuration named {name!r} (known: {known})") from None


class SessionService:
    SERVICE = "prism.v1.SessionService"

    def __init__(self, sessions: SessionStore, configs: ConfigRegistry) -> None:
        self.sessions = sessions
        self.configs = configs

    async def CreateSession(
        self, request: session_pb2.CreateSessionRequest, call: Call
    ) -> session_pb2.CreateSessionResponse:
        if request.HasField("config"):
            raise PrismError(
                grpc.StatusCode.UNIMPLEMENTED,
                "prism.v1.SessionService/CreateSession with an inline config is not implemented yet; "
                "use config_name",
            )
        if not request.config_name:
            raise invalid_argument("configName", "is required (or an inline config)")
        config = self.configs.get(request.config_name)
        token, record = await self.sessions.create(DEV_IDENTITY, config)
        return session_pb2.CreateSessionResponse(token=token, session=record.to_proto())

    async def GetSession(self, request: session_pb2.GetSessionRequest, call: Call) -> session_pb2.GetSessionResponse:
        assert call.session is not None
        return session_pb2.GetSessionResponse(session=call.session.to_proto())

    async def Heartbeat(self, request: session_pb2.HeartbeatRequest, call: Call) -> session_pb2.HeartbeatResponse:
        assert call.session is not None
        response = session_pb2.HeartbeatResponse()
        response.expires_at.FromNanoseconds(int(await self.sessions.heartbeat(call.token, call.session) * 1e9))
        return response

    async def CloseSession(
        self, request: session_pb2.CloseSessionRequest, call: Call
    ) -> session_pb2.CloseSessionResponse:
        assert call.session is not None
        await self.sessions.close(call.token, call.session)
        return session_pb2.CloseSessionResponse()


class ConfigService:
    SERVICE = "prism.v1.ConfigService"

    def __init__(self, configs: ConfigRegistry) -> None:
        self.configs = configs

    async def ListConfigs(self, request: config_pb2.ListConfigsRequest, call: Call) -> config_pb2.ListConfigsResponse:
        configs = [
            c for _, c in sorted(self.configs.configs.items()) if request.pattern in (0, c.pattern)
        ]
        return config_pb2.ListConfigsResponse(configs=configs)

    async def GetConfig(self, request: config_pb2.GetConfigRequest, call: Call) -> config_pb2.GetConfigResponse:
        return config_pb2.GetConfigResponse(config=self.configs.get(request.name))
