"""OAuth2 bearer tokens: JWTs signed by an issuer whose public keys are published as a JWKS.

Verification uses ``joserfc``: ``authlib.jose`` is deprecated in favour of joserfc, by the same
author. What is checked, in order, for ``authorization: Bearer <jwt>``:

    header     a JWS compact token (a JWE is refused); ``alg: none`` and HS* (a shared secret,
               the algorithm-confusion attack with a public key as the HMAC secret) are always
               refused; any other alg must be in auth.jwt.algorithms
    key        by ``kid`` from the cached JWKS, never from the token (jwk/jku/x5u headers are
               ignored); the key's type, curve, ``use`` and own ``alg`` must fit the token's alg
    signature  verified with that key
    claims     iss == issuer; aud == audience or a list holding it; exp required and not past;
               nbf not in the future; iat not in the future — each with leeway_seconds
    identity   identity_claim (a non-empty string); roles from roles_claim (a list of strings or
               one space-separated string, like OAuth2 ``scope``); a dotted name such as
               ``realm_access.roles`` reaches into nested objects

Every failure is UNAUTHENTICATED naming the reason ("token expired", "wrong audience",
"signature invalid", "algorithm none not allowed", ...). A JWKS that cannot be fetched is
UNAVAILABLE "JWKS endpoint unreachable": the token may be fine, so the client should retry rather
than sign in again.

The JWKS cache (bounded, never blocking the event loop):

    fetched with httpx.AsyncClient, one fetch at a time (callers waiting on it share its result),
    each bounded by a timeout and a size limit
    fresh for jwks_cache_seconds; after that the next call refetches
    a kid it does not know: one refetch (the issuer may have rotated keys), at most one per
        refetch_interval, so a flood of tokens with made-up kids cannot hammer the endpoint
    a failed fetch: no new attempt for failure_backoff seconds; meanwhile, and up to one more
        jwks_cache_seconds past expiry, the last good key set keeps serving
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
from joserfc import jwk, jws
from joserfc.errors import (
    ExpiredTokenError,
    InvalidClaimError,
    InvalidKeyCurveError,
    InvalidKeyTypeError,
    JoseError,
    MissingClaimError,
    UnsupportedKeyAlgorithmError,
    UnsupportedKeyUseError,
)
from joserfc.jwk import Key
from joserfc.jws import JWSRegistry
from joserfc.jwt import JWTClaimsRegistry

from app.auth.identity import Identity
from app.settings import Jwt
from prism.errors import PrismError, unauthenticated

log = logging.getLogger("prism.auth.jwt")

Clock = Callable[[], float]

MAX_TOKEN_CHARS = 16 * 1024
MAX_JWKS_BYTES = 512 * 1024
MAX_JWKS_KEYS = 64
FETCH_TIMEOUT_SECONDS = 3.0
REFETCH_INTERVAL_SECONDS = 30.0  # at most one unknown-kid refetch per interval
FAILURE_BACKOFF_SECONDS = 5.0  # no new fetch for this long after a failed one

JWKS_UNREACHABLE = "JWKS endpoint unreachable"


def _unavailable(message: str) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, message, retry_after=FAILURE_BACKOFF_SECONDS)


def _shown(value: object) -> str:
    """An attacker-supplied header value, made safe to put in a message."""
    text = str(value)
    return repr(text) if re.fullmatch(r"[A-Za-z0-9._:+/=-]{1,64}", text) else "(unprintable)"


@dataclass(frozen=True, slots=True)
class KeySet:
    """Verification keys from one JWKS fetch: public keys only, never symmetric ones."""

    by_kid: dict[str, Key] = field(default_factory=dict)
    without_kid: tuple[Key, ...] = ()

    def fitting(self, alg: str) -> list[Key]:
        return [key for key in (*self.by_kid.values(), *self.without_kid) if _fits(key, alg)]


def _fits(key: Key, alg: str) -> bool:
    try:
        JWSRegistry.algorithms[alg].check_key(key)
    except JoseError:
        return False
    return True


def parse_jwks(document: object) -> KeySet:
    """A JWK Set document as a KeySet. Entries that are not usable signature-verification keys
    (symmetric, ``use: enc``, unknown type, malformed) are skipped with a warning."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise ValueError("not a JWK Set: no 'keys' list")
    entries = document["keys"]
    if len(entries) > MAX_JWKS_KEYS:
        log.warning("JWKS has %d keys; using the first %d", len(entries), MAX_JWKS_KEYS)
    by_kid: dict[str, Key] = {}
    without_kid: list[Key] = []
    for index, entry in enumerate(entries[:MAX_JWKS_KEYS]):
        if not isinstance(entry, dict):
            log.warning("JWKS keys[%d]: not an object; skipped", index)
            continue
        if entry.get("kty") == "oct" or entry.get("use", "sig") != "sig":
            log.warning("JWKS keys[%d]: not a public signature key; skipped", index)
            continue
        try:
            key = jwk.import_key(entry)
            if key.is_private:  # a misconfigured issuer: keep only the public half
                key = jwk.import_key(key.as_dict(private=False))
        except (JoseError, ValueError, TypeError, KeyError) as exc:
            log.warning("JWKS keys[%d]: %s; skipped", index, exc)
            continue
        kid = entry.get("kid")
        if isinstance(kid, str) and kid:
            if kid in by_kid:
                log.warning("JWKS keys[%d]: duplicate kid %r; the first one is used", index, kid)
                continue
            by_kid[kid] = key
        else:
            without_kid.append(key)
    return KeySet(by_kid, tuple(without_kid))


class JwksCache:
    """The issuer's key set, fetched asynchronously and cached (see the module docstring)."""

    def __init__(
        self,
        url: str,
        *,
        cache_seconds: float,
        clock: Clock = time.time,
        fetch_timeout: float = FETCH_TIMEOUT_SECONDS,
        refetch_interval: float = REFETCH_INTERVAL_SECONDS,
        failure_backoff: float = FAILURE_BACKOFF_SECONDS,
    ) -> None:
        self.url = url
        parsed = httpx.URL(url)
        if parsed.scheme != "https" and parsed.host not in ("127.0.0.1", "::1", "localhost"):
            log.warning("auth.jwt.jwks_url %s is not https: anyone on the path can swap the keys", url)
        self._ttl = cache_seconds
        self._clock = clock
        self._timeout = fetch_timeout
        self._refetch_interval = min(refetch_interval, cache_seconds)
        self._backoff = failure_backoff
        self._client: httpx.AsyncClient | None = None
        self._lock = asyncio.Lock()
        self._keys: KeySet | None = None
        self._fetched_at = -math.inf
        self._failed_at = -math.inf
        self._kid_refetch_at = -math.inf
        self.fetches = 0  # attempts so far, for metrics and tests

    async def start(self) -> None:
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=httpx.Timeout(self._timeout),
                headers={"accept": "application/jwk-set+json, application/json"},
            )

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    async def current(self) -> KeySet:
        """The cached key set, fetched first when missing or older than cache_seconds."""
        if self._keys is not None and self._clock() - self._fetched_at < self._ttl:
            return self._keys
        async with self._lock:
            now = self._clock()
            if self._keys is not None and now - self._fetched_at < self._ttl:
                return self._keys  # fetched by the caller this one waited for
            try:
                if now - self._failed_at < self._backoff:
                    raise _unavailable(JWKS_UNREACHABLE)
                return await self._fetch()
            except PrismError:
                if self._keys is not None and now - self._fetched_at < 2 * self._ttl:
                    return self._keys  # stale, but better than refusing every token
                raise

    async def refetch_for(self, kid: str) -> KeySet | None:
        """After a token named a kid the cached set lacks: the set fetched again, or None when a
        refetch for an unknown kid already happened within refetch_interval."""
        async with self._lock:
            if self._keys is not None and kid in self._keys.by_kid:
                return self._keys  # a refetch this caller waited for brought it
            now = self._clock()
            if now - self._kid_refetch_at < self._refetch_interval or now - self._failed_at < self._backoff:
                return None
            self._kid_refetch_at = now
            return await self._fetch()

    async def _fetch(self) -> KeySet:
        if self._client is None:
            raise RuntimeError("JwksCache.start() was not awaited")
        self.fetches += 1
        try:
            async with asyncio.timeout(self._timeout):
                async with self._client.stream("GET", self.url) as response:
                    if response.status_code != 200:
                        raise _FetchError(f"HTTP {response.status_code}")
                    body = bytearray()
                    async for chunk in response.aiter_bytes():
                        body += chunk
                        if len(body) > MAX_JWKS_BYTES:
                            raise _FetchError(f"response larger than {MAX_JWKS_BYTES} bytes")
        except (httpx.HTTPError, TimeoutError, _FetchError) as exc:
            self._failed_at = self._clock()
            log.warning("JWKS %s: fetch failed: %s", self.url, str(exc) or type(exc).__name__)
            raise _unavailable(JWKS_UNREACHABLE) from exc
        try:
            keys = parse_jwks(json.loads(body))
        except ValueError as exc:
            self._failed_at = self._clock()
            log.warning("JWKS %s: %s", self.url, exc)
            raise _unavailable("JWKS endpoint returned an invalid key set") from exc
        self._keys, self._fetched_at = keys, self._clock()
        self._failed_at = -math.inf
        return keys


class _FetchError(Exception):
    pass


class JwtVerifier:
    """Turns a bearer token into an Identity, or a PrismError naming why not."""

    def __init__(
        self,
        settings: Jwt,
        *,
        clock: Clock = time.time,
        fetch_timeout: float = FETCH_TIMEOUT_SECONDS,
        refetch_interval: float = REFETCH_INTERVAL_SECONDS,
        failure_backoff: float = FAILURE_BACKOFF_SECONDS,
    ) -> None:
        self.settings = settings
        self._clock = clock
        self.jwks = JwksCache(
            settings.jwks_url,
            cache_seconds=settings.jwks_cache_seconds,
            clock=clock,
            fetch_timeout=fetch_timeout,
            refetch_interval=refetch_interval,
            failure_backoff=failure_backoff,
        )
        # Per algorithm, so a token is checked against exactly the alg its header names.
        # Unknown header parameters are ignored, as RFC 7515 asks (unless listed in "crit").
        self._registries = {
            alg: JWSRegistry(algorithms=[alg], strict_check_header=False) for alg in settings.algorithms
        }

    async def start(self) -> None:
        await self.jwks.start()

    async def close(self) -> None:
        await self.jwks.close()

    async def verify(self, token: str) -> Identity:
        compact, alg = self._parse(token)
        kid = compact.headers().get("kid")
        if kid is not None and (not isinstance(kid, str) or not kid):
            raise unauthenticated("malformed token: kid must be a non-empty string")
        key = await self._key(kid, alg)
        try:
            valid = jws.validate_compact(compact, key, registry=self._registries[alg])
        except (
            InvalidKeyTypeError,
            InvalidKeyCurveError,
            UnsupportedKeyAlgorithmError,
            UnsupportedKeyUseError,
        ):
            raise unauthenticated(
                f"signature invalid: the key {_shown(kid)} is not a key for {alg}"
            ) from None
        except JoseError as exc:
            raise unauthenticated(f"malformed token: {exc.description or exc.error}") from None
        if not valid:
            raise unauthenticated("signature invalid")
        claims = self._claims(compact.payload or b"")
        return self._identity(claims)

    def _parse(self, token: str) -> tuple[Any, str]:
        if not token:
            raise unauthenticated("empty bearer token")
        if len(token) > MAX_TOKEN_CHARS:
            raise unauthenticated(f"malformed token: longer than {MAX_TOKEN_CHARS} characters")
        dots = token.count(".")
        if dots == 4:
            raise unauthenticated("malformed token: an encrypted JWT (JWE) is not accepted")
        if dots != 2:
            raise unauthenticated("malformed token: expected three dot-separated parts")
        try:
            compact = jws.extract_compact(token.encode("ascii"))
        except (JoseError, ValueError):
            raise unauthenticated("malformed token: the header is not base64url JSON with an alg") from None
        alg = compact.headers().get("alg")
        if not isinstance(alg, str) or not alg:
            raise unauthenticated("malformed token: no alg")
        if alg.lower() == "none":
            raise unauthenticated("algorithm none not allowed")
        if alg.upper().startswith("HS"):
            raise unauthenticated(
                f"algorithm {_shown(alg)} not allowed: tokens signed with a shared secret are refused"
            )
        if alg not in self._registries:
            raise unauthenticated(
                f"algorithm {_shown(alg)} not allowed (allowed: {', '.join(self.settings.algorithms)})"
            )
        return compact, alg

    async def _key(self, kid: str | None, alg: str) -> Key:
        keys = await self.jwks.current()
        if kid is None:
            fitting = keys.fitting(alg)
            if len(fitting) == 1:
                return fitting[0]
            if not fitting:
                raise unauthenticated(f"no key in the JWKS verifies {alg}")
            raise unauthenticated(f"token has no kid and the JWKS holds {len(fitting)} keys for {alg}")
        key = keys.by_kid.get(kid)
        if key is None:
            refreshed = await self.jwks.refetch_for(kid)
            key = refreshed.by_kid.get(kid) if refreshed is not None else None
        if key is None:
            raise unauthenticated(f"unknown signing key (kid {_shown(kid)})")
        return key

    def _claims(self, payload: bytes) -> dict[str, Any]:
        try:
            claims = json.loads(payload)
        except ValueError:
            raise unauthenticated("malformed token: the claims are not JSON") from None
        if not isinstance(claims, dict):
            raise unauthenticated("malformed token: the claims are not a JSON object")
        for name in ("exp", "nbf", "iat"):
            if name in claims and not _numeric_date(claims[name]):
                raise unauthenticated(f"malformed token: {name} is not a NumericDate")
        settings = self.settings
        registry = JWTClaimsRegistry(
            now=int(self._clock()),
            leeway=int(settings.leeway_seconds),
            iss={"essential": True, "value": settings.issuer},
            aud={"essential": True, "value": settings.audience},
            exp={"essential": True},
        )
        try:
            registry.validate(claims)
        except MissingClaimError as exc:
            raise unauthenticated(f"token has no {exc.claim} claim") from None
        except ExpiredTokenError:
            raise unauthenticated("token expired") from None
        except InvalidClaimError as exc:
            raise unauthenticated(_CLAIM_PROBLEMS.get(exc.claim, f"invalid {exc.claim} claim")) from None
        return claims

    def _identity(self, claims: Mapping[str, Any]) -> Identity:
        settings = self.settings
        name = _claim(claims, settings.identity_claim)
        if not isinstance(name, str) or not name:
            raise unauthenticated(f"token has no {settings.identity_claim} claim (a non-empty string)")
        roles = _claim(claims, settings.roles_claim)
        if roles is None:
            roles = []
        elif isinstance(roles, str):
            roles = roles.split()
        elif not (isinstance(roles, list) and all(isinstance(r, str) for r in roles)):
            raise unauthenticated(
                f"malformed token: {settings.roles_claim} must be a list of strings or a space-separated string"
            )
        return Identity(name, frozenset(roles), "jwt")


_CLAIM_PROBLEMS = {
    "aud": "wrong audience",
    "iss": "wrong issuer",
    "nbf": "token not yet valid",
    "iat": "token issued in the future",
}


def _numeric_date(value: object) -> bool:
    return not isinstance(value, bool) and (
        isinstance(value, int) or (isinstance(value, float) and math.isfinite(value))
    )


def _claim(claims: Mapping[str, Any], name: str) -> Any:
    """A claim by name; a dotted name not present as such walks nested objects."""
    if name in claims:
        return claims[name]
    value: Any = claims
    for part in name.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value
