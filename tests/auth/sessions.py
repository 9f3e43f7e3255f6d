"""Session calls shared by the end-to-end authentication tests (JWT / API keys and mTLS)."""

from __future__ import annotations

import pytest

from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import session_pb2
from tests.clients import CallError, GrpcClient, GrpcWebClient, RestClient

NAMESPACE = "e2e"
CREATE_SESSION = "/prism.v1.SessionService/CreateSession"
GET_SESSION = "/prism.v1.SessionService/GetSession"
KV_SET = "/prism.v1.KeyValueService/Set"
KV_GET = "/prism.v1.KeyValueService/Get"

Client = GrpcClient | RestClient | GrpcWebClient


async def open_session(client: Client) -> session_pb2.CreateSessionResponse:
    """CreateSession on the "kv" config with whatever credentials ``client`` sends."""
    response = await client.call(CREATE_SESSION, session_pb2.CreateSessionRequest(config_name="kv"))
    assert isinstance(response, session_pb2.CreateSessionResponse)
    return response


async def refusal(client: Client) -> CallError:
    """The error CreateSession fails with (the test fails if it succeeds)."""
    with pytest.raises(CallError) as refused:
        await open_session(client)
    return refused.value


async def use_session(client: Client, token: str, key: str) -> session_pb2.Session:
    """Set then Get a key with the session token alone; the session as GetSession shows it."""
    await client.call(KV_SET, kv.SetRequest(key=key, value=b"value-" + key.encode()), token)
    got = await client.call(KV_GET, kv.GetRequest(key=key), token)
    assert got.value == b"value-" + key.encode()  # type: ignore[attr-defined]
    described = await client.call(GET_SESSION, session_pb2.GetSessionRequest(), token)
    return described.session  # type: ignore[attr-defined]
