"""Authentication against real credentials: a JWKS served over HTTP by a local endpoint with
keys generated here, tokens signed with them, API keys, and an X.509 CA with client certificates
(also over a real mTLS gRPC connection). Nothing is mocked at the verification step; only the
clock is injected.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import hashlib
import hmac
import json
import pathlib
import socket
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from joserfc import jwt
from joserfc.jwk import ECKey, RSAKey

from app.auth import ANONYMOUS, NO_CREDENTIALS, Authenticator, Identity, hash_key, new_key
from app.auth.api_keys import ApiKeys
from app.auth.jwt import JwtVerifier
from app.auth.mtls import ClientCertificates, grpc_server_credentials, identity_from_auth_context
from app.settings import ApiKey, Auth, Jwt, Mtls
from prism.errors import PrismError
from tests.auth.keys import Issued, JwksEndpoint, b64, issue, x509_name

ISSUER = "https://issuer.test"
AUDIENCE = "prism"
API_KEY = "prism_test-key-0123456789"

# --------------------------------------------------------------------------------------------
# Fixtures: clock, JWKS endpoint, keys, PKI


class Clock:
    """Unix seconds that move only when a test says so."""

    def __init__(self) -> None:
        self.now = float(int(time.time()))

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass(frozen=True)
class Keys:
    rsa: RSAKey
    ec: ECKey
    impostor: RSAKey  # same kid as `rsa`, never published
    rotated: RSAKey  # published only in the rotation test


@pytest.fixture(scope="module")
def keys() -> Keys:
    return Keys(
        rsa=RSAKey.generate_key(2048, parameters={"kid": "rsa-1", "use": "sig"}),
        ec=ECKey.generate_key("P-256", parameters={"kid": "ec-1"}),
        impostor=RSAKey.generate_key(2048, parameters={"kid": "rsa-1"}),
        rotated=RSAKey.generate_key(2048, parameters={"kid": "rsa-2"}),
    )


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def jwks(keys: Keys) -> AsyncIterator[JwksEndpoint]:
    endpoint = JwksEndpoint()
    endpoint.publish(keys.rsa, keys.ec)
    await endpoint.start()
    yield endpoint
    await endpoint.stop()


def jwt_settings(url: str, **overrides: Any) -> Jwt:
    return Jwt(jwks_url=url, issuer=ISSUER, audience=AUDIENCE, algorithms=["RS256", "ES256"], **overrides)


@pytest.fixture
async def auth(jwks: JwksEndpoint, clock: Clock, pki: Pki) -> AsyncIterator[Authenticator]:
    settings = Auth(
        api_keys=[ApiKey(identity="ci-bot", sha256=hash_key(API_KEY), roles=["writer", "reader"])],
        jwt=jwt_settings(jwks.url, leeway_seconds=30, jwks_cache_seconds=300),
        mtls=Mtls(ca_file=pki.ca_file, roles={"svc-a": ["reader"]}),
    )
    async with Authenticator(settings, clock=clock) as authenticator:
        yield authenticator


def sign(
    key: RSAKey | ECKey, clock: Clock, *, alg: str = "RS256", kid: str | None = "rsa-1", **claims: Any
) -> str:
    body: dict[str, Any] = {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "alice",
        "iat": int(clock.now),
        "exp": int(clock.now) + 300,
        "roles": ["reader"],
    }
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    header = {"alg": alg} if kid is None else {"alg": alg, "kid": kid}
    return jwt.encode(header, body, key, algorithms=[alg])


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


async def refused(auth: Authenticator, metadata: dict[str, str], peer: str | None = None) -> PrismError:
    with pytest.raises(PrismError) as caught:
        await auth.authenticate(metadata, peer)
    return caught.value


def unauthenticated(error: PrismError) -> str:
    assert error.code == grpc.StatusCode.UNAUTHENTICATED, error
    assert error.http_status == 401
    return error.message


# --------------------------------------------------------------------------------------------
# Dev mode, no credentials, schemes


async def test_dev_mode_is_anonymous_with_every_role() -> None:
    async with Authenticator(None) as authenticator:
        identity = await authenticator.authenticate({"authorization": "Bearer garbage"}, None)
    assert identity is ANONYMOUS
    assert identity == Identity("anonymous", frozenset({"*"}), "anonymous")


async def test_no_credentials(auth: Authenticator) -> None:
    assert unauthenticated(await refused(auth, {})) == NO_CREDENTIALS
    assert unauthenticated(await refused(auth, {"authorization": "  "})) == NO_CREDENTIALS


async def test_unsupported_scheme(auth: Authenticator) -> None:
    message = unauthenticated(await refused(auth, {"authorization": "Basic YWxpY2U6c2VjcmV0"}))
    assert message.startswith("unsupported authorization scheme")
    assert "YWxp" not in message


async def test_bearer_without_jwt_configured() -> None:
    async with Authenticator(Auth()) as authenticator:
        message = unauthenticated(await refused(authenticator, bearer("a.b.c")))
    assert "no JWT issuer is configured" in message


# --------------------------------------------------------------------------------------------
# API keys


@pytest.mark.parametrize(
    "metadata",
    [
        {"x-api-key": API_KEY},
        {"authorization": f"ApiKey {API_KEY}"},
        {"authorization": f"apikey  {API_KEY} "},
    ],
)
async def test_api_key_valid(auth: Authenticator, metadata: dict[str, str]) -> None:
    identity = await auth.authenticate(metadata, None)
    assert identity == Identity("ci-bot", frozenset({"writer", "reader"}), "api_key")


@pytest.mark.parametrize("key", [API_KEY + "x", "revoked-key", "x" * 5000])
async def test_api_key_unknown_is_never_echoed(auth: Authenticator, key: str) -> None:
    for metadata in ({"x-api-key": key}, {"authorization": f"ApiKey {key}"}):
        error = await refused(auth, metadata)
        assert unauthenticated(error) == "unknown API key"
        assert key not in error.to_json().decode()


async def test_api_key_empty(auth: Authenticator) -> None:
    assert unauthenticated(await refused(auth, {"x-api-key": ""})) == "empty API key"


def test_hash_key_is_sha256_hex() -> None:
    assert hash_key("secret") == hashlib.sha256(b"secret").hexdigest()
    key = new_key()
    assert key.startswith("prism_") and len(key) > 40 and key != new_key()
    assert ApiKeys([ApiKey(identity="a", sha256=hash_key(key))]).verify(key).name == "a"


def test_duplicate_api_key_config_is_refused() -> None:
    digest = hash_key("same")
    with pytest.raises(ValueError, match=r"auth.api_keys\[1\].sha256: the same key as auth.api_keys\[0\]"):
        ApiKeys([ApiKey(identity="a", sha256=digest), ApiKey(identity="b", sha256=digest)])


# --------------------------------------------------------------------------------------------
# JWT: accepted


async def test_jwt_rsa(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    identity = await auth.authenticate(bearer(sign(keys.rsa, clock)), None)
    assert identity == Identity("alice", frozenset({"reader"}), "jwt")


async def test_jwt_ec_with_audience_list_and_space_separated_roles(
    auth: Authenticator, keys: Keys, clock: Clock
) -> None:
    token = sign(keys.ec, clock, alg="ES256", kid="ec-1", aud=["other", AUDIENCE], roles="reader writer")
    identity = await auth.authenticate(bearer(token), None)
    assert identity == Identity("alice", frozenset({"reader", "writer"}), "jwt")


async def test_jwt_custom_claims_nested_roles(jwks: JwksEndpoint, keys: Keys, clock: Clock) -> None:
    settings = Auth(jwt=jwt_settings(jwks.url, identity_claim="email", roles_claim="realm_access.roles"))
    token = sign(keys.rsa, clock, email="alice@example.test", realm_access={"roles": ["admin"]}, roles=None)
    async with Authenticator(settings, clock=clock) as authenticator:
        identity = await authenticator.authenticate(bearer(token), None)
    assert identity == Identity("alice@example.test", frozenset({"admin"}), "jwt")


async def test_jwt_without_roles_has_none(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    identity = await auth.authenticate(bearer(sign(keys.rsa, clock, roles=None)), None)
    assert identity.roles == frozenset()


async def test_jwt_within_leeway(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    token = sign(keys.rsa, clock, exp=int(clock.now) - 10, nbf=int(clock.now) + 10, iat=int(clock.now) + 10)
    assert (await auth.authenticate(bearer(token), None)).name == "alice"


async def test_jwt_without_kid_uses_the_only_fitting_key(
    auth: Authenticator, keys: Keys, clock: Clock
) -> None:
    token = sign(keys.ec, clock, alg="ES256", kid=None)
    assert (await auth.authenticate(bearer(token), None)).name == "alice"


# --------------------------------------------------------------------------------------------
# JWT: refused, each with its reason


@pytest.mark.parametrize(
    ("claims", "reason"),
    [
        ({"exp": -31}, "token expired"),
        ({"nbf": 31}, "token not yet valid"),
        ({"iat": 31}, "token issued in the future"),
        ({"aud": "someone-else"}, "wrong audience"),
        ({"aud": ["a", "b"]}, "wrong audience"),
        ({"iss": "https://evil.test"}, "wrong issuer"),
        ({"exp": None}, "token has no exp claim"),
        ({"aud": None}, "token has no aud claim"),
        ({"iss": None}, "token has no iss claim"),
        ({"sub": None}, "token has no sub claim (a non-empty string)"),
        ({"exp": "tomorrow"}, "malformed token: exp is not a NumericDate"),
        (
            {"roles": {"admin": True}},
            "malformed token: roles must be a list of strings or a space-separated string",
        ),
    ],
)
async def test_jwt_claims_refused(
    auth: Authenticator, keys: Keys, clock: Clock, claims: dict[str, Any], reason: str
) -> None:
    now = int(clock.now)
    relative = {
        k: now + v if k in ("exp", "nbf", "iat") and isinstance(v, int) else v for k, v in claims.items()
    }
    assert unauthenticated(await refused(auth, bearer(sign(keys.rsa, clock, **relative)))) == reason


async def test_jwt_expires_with_the_clock(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    token = sign(keys.rsa, clock)
    await auth.authenticate(bearer(token), None)
    clock.advance(300 + 30)  # exp plus leeway
    assert unauthenticated(await refused(auth, bearer(token))) == "token expired"


async def test_jwt_wrong_signature_same_kid(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    token = sign(keys.impostor, clock, kid="rsa-1")
    assert unauthenticated(await refused(auth, bearer(token))) == "signature invalid"


async def test_jwt_tampered_claims(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    header, _, signature = sign(keys.rsa, clock).split(".")
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "root", "exp": int(clock.now) + 300, "roles": ["admin"]}
    forged = f"{header}.{b64(json.dumps(claims).encode())}.{signature}"
    assert unauthenticated(await refused(auth, bearer(forged))) == "signature invalid"


@pytest.mark.parametrize("alg", ["none", "None", "NONE"])
async def test_jwt_alg_none(auth: Authenticator, clock: Clock, alg: str) -> None:
    header = b64(json.dumps({"alg": alg, "kid": "rsa-1", "typ": "JWT"}).encode())
    claims = b64(
        json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "root", "exp": int(clock.now) + 300}).encode()
    )
    for token in (f"{header}.{claims}.", f"{header}.{claims}.{b64(b'x')}"):
        assert unauthenticated(await refused(auth, bearer(token))) == "algorithm none not allowed"


async def test_jwt_hs256_signed_with_the_public_key(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    """Algorithm confusion: the RSA public key (PEM, and as JWK JSON) used as an HMAC secret."""
    header = b64(json.dumps({"alg": "HS256", "kid": "rsa-1", "typ": "JWT"}).encode())
    claims = b64(
        json.dumps({"iss": ISSUER, "aud": AUDIENCE, "sub": "root", "exp": int(clock.now) + 300}).encode()
    )
    signing_input = f"{header}.{claims}".encode()
    for secret in (keys.rsa.as_pem(private=False), json.dumps(keys.rsa.as_dict(private=False)).encode()):
        token = f"{header}.{claims}.{b64(hmac.new(secret, signing_input, hashlib.sha256).digest())}"
        message = unauthenticated(await refused(auth, bearer(token)))
        assert message == "algorithm 'HS256' not allowed: tokens signed with a shared secret are refused"


async def test_jwt_algorithm_outside_the_allow_list(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    message = unauthenticated(await refused(auth, bearer(sign(keys.rsa, clock, alg="PS256"))))
    assert message == "algorithm 'PS256' not allowed (allowed: RS256, ES256)"


async def test_jwt_key_of_the_wrong_type(auth: Authenticator, keys: Keys, clock: Clock) -> None:
    """An ES256 token naming the RSA key's kid."""
    token = sign(keys.ec, clock, alg="ES256", kid="rsa-1")
    message = unauthenticated(await refused(auth, bearer(token)))
    assert message == "signature invalid: the key 'rsa-1' is not a key for ES256"


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        ("", "empty bearer token"),
        ("not-a-jwt", "malformed token: expected three dot-separated parts"),
        ("a.b.c.d.e", "malformed token: an encrypted JWT (JWE) is not accepted"),
        ("!!.e30.", "malformed token: the header is not base64url JSON with an alg"),
        (f"{b64(b'{}')}.e30.", "malformed token: the header is not base64url JSON with an alg"),
        ("x" * 20000, "malformed token: longer than 16384 characters"),
    ],
)
async def test_jwt_malformed(auth: Authenticator, token: str, reason: str) -> None:
    assert unauthenticated(await refused(auth, bearer(token))) == reason


async def test_jwt_claims_not_an_object(auth: Authenticator, keys: Keys) -> None:
    from joserfc import jws

    token = jws.serialize_compact({"alg": "RS256", "kid": "rsa-1"}, b"[1, 2]", keys.rsa)
    assert (
        unauthenticated(await refused(auth, bearer(token)))
        == "malformed token: the claims are not a JSON object"
    )


# --------------------------------------------------------------------------------------------
# JWKS: caching, unknown kids, failures


async def test_jwks_is_cached(auth: Authenticator, jwks: JwksEndpoint, keys: Keys, clock: Clock) -> None:
    for _ in range(5):
        await auth.authenticate(bearer(sign(keys.rsa, clock)), None)
    assert jwks.hits == 1
    clock.advance(301)  # past jwks_cache_seconds
    await auth.authenticate(bearer(sign(keys.rsa, clock)), None)
    assert jwks.hits == 2


async def test_jwks_concurrent_cold_start_fetches_once(
    auth: Authenticator, jwks: JwksEndpoint, keys: Keys, clock: Clock
) -> None:
    token = sign(keys.rsa, clock)
    identities = await asyncio.gather(*(auth.authenticate(bearer(token), None) for _ in range(20)))
    assert {i.name for i in identities} == {"alice"}
    assert jwks.hits == 1


async def test_unknown_kid_refetches_once_and_is_rate_limited(
    auth: Authenticator, jwks: JwksEndpoint, keys: Keys, clock: Clock
) -> None:
    await auth.authenticate(bearer(sign(keys.rsa, clock)), None)
    assert jwks.hits == 1

    token = sign(keys.rotated, clock, kid="rsa-2")
    assert unauthenticated(await refused(auth, bearer(token))) == "unknown signing key (kid 'rsa-2')"
    assert jwks.hits == 2  # one refetch: the issuer might have rotated its keys

    for n in range(20):  # a flood of made-up kids does not reach the endpoint
        message = unauthenticated(await refused(auth, bearer(sign(keys.rotated, clock, kid=f"bogus-{n}"))))
        assert message == f"unknown signing key (kid 'bogus-{n}')"
    assert jwks.hits == 2

    jwks.publish(keys.rsa, keys.ec, keys.rotated)  # the issuer rotates
    clock.advance(31)  # past the refetch interval
    identity = await auth.authenticate(bearer(sign(keys.rotated, clock, kid="rsa-2")), None)
    assert identity.name == "alice"
    assert jwks.hits == 3
    await auth.authenticate(bearer(sign(keys.rotated, clock, kid="rsa-2")), None)
    assert jwks.hits == 3


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_jwks_down_is_unavailable(keys: Keys, clock: Clock) -> None:
    settings = Auth(jwt=jwt_settings(f"http://127.0.0.1:{free_port()}/.well-known/jwks.json"))
    async with Authenticator(settings, clock=clock) as authenticator:
        error = await refused(authenticator, bearer(sign(keys.rsa, clock)))
    assert error.code == grpc.StatusCode.UNAVAILABLE and error.http_status == 503
    assert error.message == "JWKS endpoint unreachable"
    assert error.retry_after


async def test_jwks_hanging_endpoint_times_out_without_blocking_the_loop(keys: Keys, clock: Clock) -> None:
    async def never_answer(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the client gives up
        writer.close()

    server = await asyncio.start_server(never_answer, "127.0.0.1", 0)
    url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/.well-known/jwks.json"
    verifier = JwtVerifier(jwt_settings(url), clock=clock, fetch_timeout=0.3)
    await verifier.start()
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    background = asyncio.create_task(ticker())
    try:
        started = time.monotonic()
        with pytest.raises(PrismError) as caught:
            await verifier.verify(sign(keys.rsa, clock))
        elapsed = time.monotonic() - started
    finally:
        background.cancel()
        await verifier.close()
        server.close()
        await server.wait_closed()
    assert (caught.value.code, caught.value.message) == (
        grpc.StatusCode.UNAVAILABLE,
        "JWKS endpoint unreachable",
    )
    assert 0.25 < elapsed < 2
    assert ticks >= 10  # the loop kept running while the fetch waited


async def test_jwks_http_error_is_unavailable_and_backs_off(
    jwks: JwksEndpoint, keys: Keys, clock: Clock
) -> None:
    jwks.status = 500
    async with Authenticator(Auth(jwt=jwt_settings(jwks.url)), clock=clock) as authenticator:
        for _ in range(3):
            error = await refused(authenticator, bearer(sign(keys.rsa, clock)))
            assert (error.code, error.message) == (grpc.StatusCode.UNAVAILABLE, "JWKS endpoint unreachable")
        assert jwks.hits == 1  # no new attempt during the back-off
        jwks.status = 200
        clock.advance(6)
        assert (await authenticator.authenticate(bearer(sign(keys.rsa, clock)), None)).name == "alice"
        assert jwks.hits == 2


async def test_jwks_invalid_document_is_unavailable(jwks: JwksEndpoint, keys: Keys, clock: Clock) -> None:
    jwks.document = {"not": "a key set"}
    async with Authenticator(Auth(jwt=jwt_settings(jwks.url)), clock=clock) as authenticator:
        error = await refused(authenticator, bearer(sign(keys.rsa, clock)))
    assert (error.code, error.message) == (
        grpc.StatusCode.UNAVAILABLE,
        "JWKS endpoint returned an invalid key set",
    )


async def test_jwks_stale_keys_serve_while_the_endpoint_fails(
    jwks: JwksEndpoint, keys: Keys, clock: Clock
) -> None:
    async with Authenticator(
        Auth(jwt=jwt_settings(jwks.url, jwks_cache_seconds=60)), clock=clock
    ) as authenticator:
        await authenticator.authenticate(bearer(sign(keys.rsa, clock)), None)
        jwks.status = 503
        clock.advance(61)  # expired: refetch fails, the last good set still serves
        assert (await authenticator.authenticate(bearer(sign(keys.rsa, clock)), None)).name == "alice"
        assert jwks.hits == 2
        clock.advance(60)  # more than one cache period past expiry: no longer trusted
        error = await refused(authenticator, bearer(sign(keys.rsa, clock)))
        assert error.code == grpc.StatusCode.UNAVAILABLE


async def test_jwks_skips_unusable_keys(jwks: JwksEndpoint, keys: Keys, clock: Clock) -> None:
    """A symmetric key under the RSA key's kid must not be usable, whatever the token says."""
    jwks.document = {
        "keys": [
            {"kty": "oct", "kid": "rsa-1", "k": b64(b"secret")},
            {"kty": "RSA", "kid": "broken", "n": "!!", "e": "AQAB"},
            "not an object",
            {**keys.ec.as_dict(private=False), "use": "enc"},
            keys.rsa.as_dict(private=True),  # private half published by mistake: only the public part is kept
        ]
    }
    async with Authenticator(Auth(jwt=jwt_settings(jwks.url)), clock=clock) as authenticator:
        assert (await authenticator.authenticate(bearer(sign(keys.rsa, clock)), None)).name == "alice"
        message = unauthenticated(
            await refused(authenticator, bearer(sign(keys.ec, clock, alg="ES256", kid="ec-1")))
        )
        assert message == "unknown signing key (kid 'ec-1')"
        assert authenticator.jwt is not None
        assert not authenticator.jwt.jwks._keys.by_kid["rsa-1"].is_private  # type: ignore[union-attr]


# --------------------------------------------------------------------------------------------
# mTLS


@dataclass(frozen=True)
class Pki:
    ca: Issued
    other_ca: Issued
    ca_file: pathlib.Path


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    ca = issue("Prism Test Client CA", ca=True)
    ca_file = tmp_path_factory.mktemp("pki") / "clients-ca.pem"
    ca_file.write_text(ca.pem)
    return Pki(ca=ca, other_ca=issue("Some Other CA", ca=True), ca_file=ca_file)


@pytest.fixture
def certificates(pki: Pki, clock: Clock) -> ClientCertificates:
    return ClientCertificates(Mtls(ca_file=pki.ca_file, roles={"svc-a": ["reader"]}), clock=clock)


async def test_mtls_peer_identity_maps_roles(auth: Authenticator) -> None:
    assert await auth.authenticate({}, "svc-a") == Identity("svc-a", frozenset({"reader"}), "mtls")
    assert await auth.authenticate({}, "svc-unlisted") == Identity("svc-unlisted", frozenset(), "mtls")


async def test_mtls_comes_first(auth: Authenticator) -> None:
    """A verified certificate decides, whatever else the call carries."""
    identity = await auth.authenticate({"x-api-key": "not-a-key", "authorization": "Bearer x"}, "svc-a")
    assert identity.method == "mtls"


async def test_peer_identity_ignored_without_mtls_configured() -> None:
    async with Authenticator(
        Auth(api_keys=[ApiKey(identity="ci-bot", sha256=hash_key(API_KEY))])
    ) as authenticator:
        assert unauthenticated(await refused(authenticator, {}, "svc-a")) == NO_CREDENTIALS
        assert authenticator.asgi_peer({"extensions": {"tls": {"client_cert_chain": ["x"]}}}) is None


def test_client_certificate_from_the_ca(certificates: ClientCertificates, pki: Pki) -> None:
    assert certificates.verify_chain([issue("svc-a", pki.ca).pem]) == "svc-a"
    assert certificates.verify_chain([issue("svc-san", pki.ca, san="svc-san.internal").pem]) == "svc-san"
    # No CN: the whole subject is the name.
    assert certificates.verify_chain([issue(None, pki.ca).pem]) == "OU=batch,O=Example"


def test_client_certificate_through_an_intermediate(certificates: ClientCertificates, pki: Pki) -> None:
    intermediate = issue("Team CA", pki.ca, ca=True)
    leaf = issue("svc-b", intermediate)
    assert certificates.verify_chain([leaf.pem, intermediate.pem]) == "svc-b"
    assert certificates.verify_chain(leaf.pem + intermediate.pem) == "svc-b"  # one PEM string
    message = unauthenticated(_raises(lambda: certificates.verify_chain([leaf.pem])))
    assert message == "client certificate not signed by the configured CA"


def _raises(call: Any) -> PrismError:
    with pytest.raises(PrismError) as caught:
        call()
    return caught.value


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (
            lambda pki: [issue("svc-a", pki.other_ca).pem],
            "client certificate not signed by the configured CA",
        ),
        (
            lambda pki: [issue("svc-a").pem],
            "client certificate not signed by the configured CA",
        ),  # self-signed
        # signed by a leaf of the right CA: not a CA
        (
            lambda pki: (lambda parent: [issue("svc-x", parent).pem, parent.pem])(issue("svc-a", pki.ca)),
            "client certificate not signed by the configured CA",
        ),
        (
            lambda pki: [issue("svc-a", pki.ca, client_auth=False).pem.replace("MII", "MIX", 1)],
            "client certificate is not valid PEM",
        ),
        (
            lambda pki: [
                issue(
                    "svc-a", pki.ca, valid_from=dt.datetime.now(dt.UTC) - dt.timedelta(days=10), valid_days=1
                ).pem
            ],
            "client certificate expired or not yet valid",
        ),
        (
            lambda pki: [
                issue("svc-a", pki.ca, valid_from=dt.datetime.now(dt.UTC) + dt.timedelta(days=1)).pem
            ],
            "client certificate expired or not yet valid",
        ),
        (lambda pki: [], "no client certificate"),
        (lambda pki: [issue("svc-a", pki.ca).pem] * 9, "client certificate chain longer than 8"),
    ],
)
def test_client_certificate_refused(
    certificates: ClientCertificates, pki: Pki, make: Any, reason: str
) -> None:
    assert unauthenticated(_raises(lambda: certificates.verify_chain(make(pki)))) == reason


def test_client_certificate_for_servers_only_is_refused(certificates: ClientCertificates, pki: Pki) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509_name("web"))
        .issuer_name(pki.ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(hours=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(pki.ca.key, hashes.SHA256())
    )
    error = _raises(
        lambda: certificates.verify_chain([cert.public_bytes(serialization.Encoding.PEM).decode()])
    )
    assert unauthenticated(error) == "client certificate is not for client authentication (extendedKeyUsage)"


async def test_asgi_tls_extension(auth: Authenticator, pki: Pki) -> None:
    good = issue("svc-a", pki.ca).pem
    assert auth.asgi_peer({"type": "http", "extensions": {}}) is None  # plain HTTP, or a server without it
    assert auth.asgi_peer({"type": "http", "extensions": {"tls": {"client_cert_chain": []}}}) is None
    scope = {"type": "http", "extensions": {"tls": {"client_cert_chain": [good], "client_cert_error": None}}}
    peer = auth.asgi_peer(scope)
    assert await auth.authenticate({}, peer) == Identity("svc-a", frozenset({"reader"}), "mtls")
    assert auth.asgi_peer({"extensions": {"tls": {"client_cert_chain": good}}}) == "svc-a"
    bad = {"extensions": {"tls": {"client_cert_chain": [issue("svc-a", pki.other_ca).pem]}}}
    assert (
        unauthenticated(_raises(lambda: auth.asgi_peer(bad)))
        == "client certificate not signed by the configured CA"
    )
    failed = {"extensions": {"tls": {"client_cert_chain": [good], "client_cert_error": "unknown issuer"}}}
    assert (
        unauthenticated(_raises(lambda: auth.asgi_peer(failed)))
        == "client certificate refused by the TLS layer"
    )


@pytest.mark.parametrize(
    ("peer", "trusted"),
    [("10.1.2.3", True), ("::ffff:10.1.2.3", True), ("11.0.0.1", False), ("::1", False), ("unix-socket", False)],
)
def test_forwarded_certificate_only_from_trusted_proxies(pki: Pki, clock: Clock, peer: str, trusted: bool) -> None:
    """The header counts only from ``trusted_proxies`` (an IPv4 proxy on a dual-stack listener
    arrives as ::ffff:a.b.c.d); from anyone else it is refused, not ignored."""
    settings = Mtls(ca_file=pki.ca_file, forwarded={"trusted_proxies": ["10.0.0.0/8"]})
    certificates = ClientCertificates(settings, clock=clock)
    pem = urllib.parse.quote(issue("svc-a", pki.ca).pem).encode()
    scope = {"client": (peer, 40000), "headers": [(b"x-forwarded-client-cert", pem)]}
    if trusted:
        assert certificates.from_asgi(scope) == "svc-a"
    else:
        error = _raises(lambda: certificates.from_asgi(scope))
        assert unauthenticated(error) == "x-forwarded-client-cert is accepted only from a trusted proxy"


def test_identity_from_grpc_auth_context() -> None:
    context = {
        "transport_security_type": [b"ssl"],
        "x509_common_name": [b"svc-a"],
        "x509_subject": [b"CN=svc-a,O=Example"],
    }
    assert identity_from_auth_context(context) == "svc-a"
    assert identity_from_auth_context({**context, "x509_common_name": []}) == "CN=svc-a,O=Example"
    assert identity_from_auth_context({"transport_security_type": [b"ssl"]}) is None
    assert identity_from_auth_context({}) is None  # insecure port


def test_mtls_bad_ca_file(tmp_path: pathlib.Path) -> None:
    (tmp_path / "ca.pem").write_text("not a certificate")
    for path in (tmp_path / "ca.pem", tmp_path / "missing.pem"):
        with pytest.raises(ValueError, match=r"auth\.mtls\.ca_file"):
            ClientCertificates(Mtls(ca_file=path))


@pytest.fixture
async def mtls_grpc(auth: Authenticator, pki: Pki) -> AsyncIterator[tuple[int, list[Identity]]]:
    """A grpc.aio server on grpc_server_credentials whose one method authenticates its caller."""
    server_cert = issue("localhost", pki.ca, san="localhost", client_auth=False)
    seen: list[Identity] = []

    async def whoami(_request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        identity = await auth.authenticate(dict(context.invocation_metadata() or ()), auth.grpc_peer(context))
        seen.append(identity)
        return json.dumps(
            {"name": identity.name, "roles": sorted(identity.roles), "method": identity.method}
        ).encode()

    server = grpc.aio.server()
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "test.Auth", {"WhoAmI": grpc.unary_unary_rpc_method_handler(whoami)}
            )
        ]
    )
    port = server.add_secure_port(
        "127.0.0.1:0", grpc_server_credentials(server_cert.key_pem, server_cert.pem.encode(), pki.ca_file)
    )
    await server.start()
    yield port, seen
    await server.stop(None)


async def _whoami(port: int, pki: Pki, client: Issued | None) -> dict[str, Any]:
    credentials = grpc.ssl_channel_credentials(
        root_certificates=pki.ca.pem.encode(),
        private_key=client.key_pem if client else None,
        certificate_chain=client.pem.encode() if client else None,
    )
    options = [("grpc.ssl_target_name_override", "localhost")]
    async with grpc.aio.secure_channel(f"127.0.0.1:{port}", credentials, options=options) as channel:
        response = await channel.unary_unary("/test.Auth/WhoAmI")(b"", timeout=5)
    return json.loads(response)


async def test_grpc_mtls_end_to_end(mtls_grpc: tuple[int, list[Identity]], pki: Pki) -> None:
    port, seen = mtls_grpc
    assert await _whoami(port, pki, issue("svc-a", pki.ca)) == {
        "name": "svc-a",
        "roles": ["reader"],
        "method": "mtls",
    }
    # CN-only certificates without subjectAltName are common for clients and accepted.
    assert (await _whoami(port, pki, issue("svc-c", pki.ca)))["name"] == "svc-c"
    assert len(seen) == 2


@pytest.mark.parametrize("client", ["other-ca", "self-signed", "none"])
async def test_grpc_mtls_refuses_at_the_handshake(
    mtls_grpc: tuple[int, list[Identity]], pki: Pki, client: str
) -> None:
    """grpcio refuses the TLS handshake itself: the client sees UNAVAILABLE, no handler runs."""
    port, seen = mtls_grpc
    cert = {"other-ca": issue("svc-a", pki.other_ca), "self-signed": issue("svc-a"), "none": None}[client]
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await _whoami(port, pki, cert)
    assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert seen == []
