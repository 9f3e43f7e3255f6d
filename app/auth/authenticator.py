"""Authentication: who is calling, from the call's metadata and its verified TLS peer.

    Authenticator.authenticate(metadata, peer_identity)
      no auth configured (dev mode)  -> ANONYMOUS, roles {"*"}
      peer_identity (mTLS)           -> Identity(CN, auth.mtls.roles[CN], "mtls")
      x-api-key / ApiKey <key>       -> ApiKeys.verify          (api_keys.py)
      authorization: Bearer <jwt>    -> JwtVerifier.verify      (jwt.py)
      nothing                        -> UNAUTHENTICATED "no credentials: ..."

The first credential present decides: a caller that sends one and fails is refused, not tried
with the next. ``peer_identity`` is the subject of a client certificate the TLS layer already
verified; the transport gets it with :meth:`Authenticator.grpc_peer` or :meth:`Authenticator.asgi_peer`
(see mtls.py for which servers can supply one).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import Any

import grpc

from app.auth.api_keys import API_KEY_HEADER, ApiKeys
from app.auth.identity import ANONYMOUS, Identity
from app.auth.jwt import JwtVerifier
from app.auth.mtls import ClientCertificates
from app.settings import Auth
from prism.errors import unauthenticated

Clock = Callable[[], float]

NO_CREDENTIALS = "no credentials: send x-api-key, a bearer token or a client certificate"


class Authenticator:
    def __init__(self, auth: Auth | None, *, clock: Clock = time.time) -> None:
        self.dev_mode = auth is None
        self.api_keys = ApiKeys(auth.api_keys if auth else [])
        self.jwt = JwtVerifier(auth.jwt, clock=clock) if auth and auth.jwt else None
        self.certificates = ClientCertificates(auth.mtls, clock=clock) if auth and auth.mtls else None

    async def start(self) -> None:
        if self.jwt is not None:
            await self.jwt.start()

    async def close(self) -> None:
        if self.jwt is not None:
            await self.jwt.close()

    async def __aenter__(self) -> Authenticator:
        await self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    async def authenticate(self, metadata: Mapping[str, str], peer_identity: str | None) -> Identity:
        """The caller's identity, or PrismError UNAUTHENTICATED (UNAVAILABLE when the JWKS
        cannot be fetched). ``metadata`` keys are lower-case header / metadata names."""
        if self.dev_mode:
            return ANONYMOUS
        if peer_identity is not None and self.certificates is not None:
            return self.certificates.identity(peer_identity)
        api_key = metadata.get(API_KEY_HEADER)
        if api_key is not None:
            return self.api_keys.verify(api_key.strip())
        authorization = metadata.get("authorization", "").strip()
        if not authorization:
            raise unauthenticated(NO_CREDENTIALS)
        scheme, _, credentials = authorization.partition(" ")
        scheme = scheme.lower()  # auth schemes are case-insensitive (RFC 9110 §11.1)
        if scheme == "apikey":
            return self.api_keys.verify(credentials.strip())
        if scheme == "bearer":
            if self.jwt is None:
                raise unauthenticated(
                    "bearer tokens are not accepted: no JWT issuer is configured (auth.jwt)"
                )
            return await self.jwt.verify(credentials.strip())
        raise unauthenticated("unsupported authorization scheme: use 'Bearer <token>' or 'ApiKey <key>'")

    def grpc_peer(self, context: grpc.aio.ServicerContext) -> str | None:
        """The verified client-certificate identity of a gRPC call; None without mTLS."""
        return self.certificates.from_grpc(context) if self.certificates is not None else None

    def asgi_peer(self, scope: Mapping[str, Any]) -> str | None:
        """The verified client-certificate identity of an HTTP request (ASGI TLS extension);
        None without mTLS or without a certificate. Raises UNAUTHENTICATED for a bad one."""
        return self.certificates.from_asgi(scope) if self.certificates is not None else None
