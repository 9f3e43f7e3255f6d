"""Authentication end to end: real ``prism serve`` processes (Granian) and real credentials.

``secured``: a gateway checking JWT bearer tokens against a JWKS that this test process serves
over HTTP (an RSA and an EC key generated here), and knowing one API key. Over gRPC, REST and
gRPC-Web: a valid token opens a session whose token alone then carries the data calls, and each
bad credential is refused with UNAUTHENTICATED (HTTP 401 on REST, grpc-status 16 on gRPC-Web)
and a message naming the reason.

Client certificates (mTLS) are tested in tests/test_mtls_e2e.py.

Nothing is mocked: every credential crosses the wire to the gateway, which fetches the JWKS and
verifies signatures, claims and certificates itself.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from app.auth import NO_CREDENTIALS, hash_key
from prism.v1 import config_pb2, session_pb2
from tests.auth.keys import (
    JwksEndpoint,
    hs256_with_public_key,
    unsigned_token,
)
from tests.auth.sessions import CREATE_SESSION, NAMESPACE, Client, open_session, use_session
from tests.clients import CallError, GrpcClient, GrpcWebClient, RestClient
from tests.gateway_process import GatewayProcess, start_gateway

ISSUER = "https://issuer.e2e.test"
AUDIENCE = "prism-e2e"
API_KEY = "prism_e2e-valid-key-0123456789abcdef"
# Once handed out; revoking a key is removing its entry, so the gateway's config no longer has it.
REVOKED_KEY = "prism_e2e-revoked-key-0123456789abcdef"
TRANSPORTS = ("grpc", "rest", "grpc-web")

LIST_CONFIGS = "/prism.v1.ConfigService/ListConfigs"


# --------------------------------------------------------------------------------------------
# Issuer keys and tokens


@dataclass(frozen=True)
class Keys:
    rsa: RSAKey
    ec: ECKey
    impostor: RSAKey  # the RSA key's kid, another key: never published


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=RSAKey.generate_key(2048, parameters={"kid": "rsa-e2e", "use": "sig"}),
        ec=ECKey.generate_key("P-256", parameters={"kid": "ec-e2e"}),
        impostor=RSAKey.generate_key(2048, parameters={"kid": "rsa-e2e"}),
    )


def claims(**overrides: Any) -> dict[str, Any]:
    """Valid claims for the secured gateway (real clock: the gateway's), with overrides."""
    now = int(time.time())
    body = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": now,
        "exp": now + 300,
        "roles": ["writer"],
    }
    return body | overrides


def mint(key: RSAKey | ECKey, **overrides: Any) -> str:
    alg = "ES256" if isinstance(key, ECKey) else "RS256"
    return jwt.encode({"alg": alg, "kid": key.kid, "typ": "JWT"}, claims(**overrides), key, algorithms=[alg])


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


# --------------------------------------------------------------------------------------------
# The JWT / API key gateway


@pytest.fixture(scope="module")
async def jwks(keys: Keys) -> AsyncIterator[JwksEndpoint]:
    """The issuer's JWKS, served by this process on the (session-wide) test event loop."""
    endpoint = JwksEndpoint()
    endpoint.publish(keys.rsa, keys.ec)
    await endpoint.start()
    yield endpoint
    await endpoint.stop()


def secured_config(jwks_url: str) -> str:
    return f"""
backends:
  mem: {{type: memory}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: mem, namespace: {NAMESPACE}}}
namespaces:
  - {{name: {NAMESPACE}}}
auth:
  api_keys:
    - {{identity: ci-bot, sha256: {hash_key(API_KEY)}, roles: [writer]}}
  jwt:
    jwks_url: {jwks_url}
    issuer: {ISSUER}
    audience: {AUDIENCE}
    algorithms: [RS256, ES256]
    leeway_seconds: 5
policies:
  - {{role: writer, namespaces: [{NAMESPACE}], operations: ["SESSION.*", "KEY_VALUE.*", "CONFIG.ListConfigs"]}}
"""


@pytest.fixture(scope="module")
async def secured(
    jwks: JwksEndpoint, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[GatewayProcess]:
    # In a thread: the JWKS endpoint lives on this event loop, which must keep running.
    gateway = await asyncio.to_thread(
        start_gateway, tmp_path_factory.mktemp("auth-e2e"), "granian", config_yaml=secured_config(jwks.url)
    )
    yield gateway
    await asyncio.to_thread(gateway.stop)


@pytest.fixture
async def connect() -> AsyncIterator[Callable[..., Client]]:
    """connect(transport, gateway, headers) -> a client sending ``headers`` on every call."""
    made: list[Client] = []

    def make(transport: str, gateway: GatewayProcess, headers: dict[str, str] | None = None) -> Client:
        client: Client
        if transport == "grpc":
            client = GrpcClient(gateway.grpc_target, metadata=headers)
        elif transport == "rest":
            client = RestClient(gateway.base_url, headers=headers)
        else:
            client = GrpcWebClient(gateway.base_url, headers=headers)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


def assert_unauthenticated(transport: str, error: CallError, reason: str) -> None:
    # gRPC: the status itself. gRPC-Web: the client maps the grpc-status trailer (16) to its name
    # (the raw wire form is checked in test_grpc_web_refusal_on_the_wire). REST: the HTTP status.
    assert error.code == "UNAUTHENTICATED", error
    assert error.message == reason
    if transport == "rest":
        assert error.http_status == 401


@pytest.mark.parametrize("alg", ["RS256", "ES256"])
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_jwt_opens_a_session(
    secured: GatewayProcess,
    jwks: JwksEndpoint,
    connect: Callable[..., Client],
    keys: Keys,
    transport: str,
    alg: str,
) -> None:
    subject = f"alice-{transport}-{alg}"
    token = mint(keys.rsa if alg == "RS256" else keys.ec, sub=subject)
    created = await open_session(connect(transport, secured, bearer(token)))
    assert created.token and created.session.identity == subject
    # Data calls carry the session token only: a client with no credentials at all.
    session = await use_session(connect(transport, secured), created.token, f"jwt-{transport}-{alg}")
    assert session.identity == subject
    assert session.session_id == created.session.session_id
    assert session.config.name == "kv" and session.config.namespace == NAMESPACE
    assert jwks.hits >= 1  # the gateway fetched the keys from this process's endpoint


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_api_key_opens_a_session(
    secured: GatewayProcess, connect: Callable[..., Client], transport: str
) -> None:
    created = await open_session(connect(transport, secured, {"x-api-key": API_KEY}))
    session = await use_session(connect(transport, secured), created.token, f"key-{transport}")
    assert session.identity == "ci-bot"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_config_service_is_authenticated(
    secured: GatewayProcess, connect: Callable[..., Client], keys: Keys, transport: str
) -> None:
    listed = await connect(transport, secured, bearer(mint(keys.ec))).call(
        LIST_CONFIGS, config_pb2.ListConfigsRequest()
    )
    assert [c.name for c in listed.configs] == ["kv"]  # type: ignore[attr-defined]
    with pytest.raises(CallError) as refused:
        await connect(transport, secured).call(LIST_CONFIGS, config_pb2.ListConfigsRequest())
    assert_unauthenticated(transport, refused.value, NO_CREDENTIALS)


def _expired(keys: Keys) -> dict[str, str]:
    now = int(time.time())
    return bearer(mint(keys.rsa, iat=now - 600, exp=now - 120))  # well past exp + leeway (5 s)


# case -> (credentials from the keys, the reason the gateway must give)
REFUSALS: dict[str, tuple[Callable[[Keys], dict[str, str]], str]] = {
    "expired": (_expired, "token expired"),
    "wrong-audience": (lambda k: bearer(mint(k.rsa, aud="someone-else")), "wrong audience"),
    "wrong-issuer": (lambda k: bearer(mint(k.ec, iss="https://evil.test")), "wrong issuer"),
    # Signed by another key under the published key's kid: the kid resolves, the signature fails.
    "wrong-signature": (lambda k: bearer(mint(k.impostor)), "signature invalid"),
    "alg-none": (
        lambda k: bearer(unsigned_token(claims(sub="root"), alg="none", kid="rsa-e2e")),
        "algorithm none not allowed",
    ),
    # Algorithm confusion: the issuer's RSA public key (which anyone can fetch) as an HMAC secret.
    "hs256-with-public-key": (
        lambda k: bearer(hs256_with_public_key(claims(sub="root"), k.rsa, kid="rsa-e2e")),
        "algorithm 'HS256' not allowed: tokens signed with a shared secret are refused",
    ),
    "revoked-api-key": (lambda k: {"x-api-key": REVOKED_KEY}, "unknown API key"),
    "no-credentials": (lambda k: {}, NO_CREDENTIALS),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_refused(
    secured: GatewayProcess, connect: Callable[..., Client], keys: Keys, transport: str, case: str
) -> None:
    credentials, reason = REFUSALS[case]
    with pytest.raises(CallError) as refused:
        await open_session(connect(transport, secured, credentials(keys)))
    assert_unauthenticated(transport, refused.value, reason)
    assert REVOKED_KEY not in refused.value.message


async def test_grpc_web_refusal_on_the_wire(secured: GatewayProcess, keys: Keys) -> None:
    """What a browser's gRPC-Web client reads: HTTP 200, grpc-status 16 and the reason (a
    trailers-only response: an error before any message travels in the headers)."""
    request = session_pb2.CreateSessionRequest(config_name="kv").SerializeToString()
    body = b"\x00" + len(request).to_bytes(4, "big") + request
    headers = {"content-type": "application/grpc-web+proto", "x-grpc-web": "1", **_expired(keys)}
    async with httpx.AsyncClient(base_url=secured.base_url, timeout=10) as http:
        response = await http.post(CREATE_SESSION, content=body, headers=headers)
    assert response.status_code == 200
    assert response.headers["grpc-status"] == "16"
    assert urllib.parse.unquote(response.headers["grpc-message"]) == "token expired"
