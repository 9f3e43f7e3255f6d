"""Client certificates (mTLS): a certificate signed by ``auth.mtls.ca_file`` authenticates its
subject; the subject's common name (CN) is the identity, ``auth.mtls.roles[CN]`` its roles.

Where the certificate comes from, per transport:

    gRPC port (grpc.aio)   TLS with grpc_server_credentials(): the handshake requires a client
                           certificate signed by ca_file, so an unverified one never reaches a
                           handler. context.auth_context() then carries x509_common_name and
                           x509_subject -> grpc_peer_identity().
    HTTP port, direct      the ASGI TLS extension, scope["extensions"]["tls"]["client_cert_chain"]
                           (PEM, leaf first). Hypercorn asks for an optional certificate from
                           ca_file and fills the extension in (app/hypercorn_tls.py); Granian 2.8
                           cannot pass one to the app (upstream #788), so there only the proxy
                           header below works.
    HTTP port, proxied     auth.mtls.forwarded: a TLS-terminating proxy at one of
                           ``trusted_proxies`` sends the certificate it received in a header.
                           The same header from any other peer is refused, never ignored.

Whatever the source, the chain is verified here against ca_file, so neither a server that asks
for a certificate without checking it nor a proxy can smuggle in one from another CA.

Neither X.509 parsing nor chain building is written here: ``cryptography`` does both.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import logging
import pathlib
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc
from cryptography import x509
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from cryptography.x509.verification import (
    Criticality,
    ExtensionPolicy,
    Policy,
    PolicyBuilder,
    Store,
    VerificationError,
)

from app import pii
from app.auth.identity import Identity
from app.settings import Mtls
from prism.errors import unauthenticated

log = logging.getLogger("prism.auth.mtls")

Clock = Callable[[], float]

MAX_CHAIN = 8  # certificates accepted from a client, leaf included


def load_ca(ca_file: pathlib.Path) -> bytes:
    """The PEM bytes of ``ca_file``, checked to hold at least one certificate."""
    try:
        pem = ca_file.read_bytes()
        if not x509.load_pem_x509_certificates(pem):  # raises on a file with none
            raise ValueError("no certificate")
    except (OSError, ValueError) as exc:
        raise ValueError(
            f"auth.mtls.ca_file: {ca_file}: not a readable PEM certificate file ({exc})"
        ) from exc
    return pem


def grpc_server_credentials(
    private_key: bytes, certificate_chain: bytes, ca_file: pathlib.Path
) -> grpc.ServerCredentials:
    """TLS for the gRPC port that admits only clients with a certificate signed by ``ca_file``.

    grpcio offers no "ask for a certificate but let callers without one in" mode
    (``require_client_auth=False`` does not request one at all), so with mTLS on the gRPC port
    every gRPC client presents a certificate, including those that also send an API key or token.
    """
    return grpc.ssl_server_credentials(
        [(private_key, certificate_chain)], root_certificates=load_ca(ca_file), require_client_auth=True
    )


def identity_from_auth_context(auth_context: Mapping[str, Iterable[bytes]]) -> str | None:
    """The CN (else the whole subject) of the peer certificate grpc verified; None without one."""
    if _first(auth_context, "transport_security_type") != "ssl":
        return None
    return _first(auth_context, "x509_common_name") or _first(auth_context, "x509_subject")


def grpc_peer_identity(context: grpc.aio.ServicerContext) -> str | None:
    return identity_from_auth_context(context.auth_context())


def _first(auth_context: Mapping[str, Iterable[bytes]], key: str) -> str | None:
    for value in auth_context.get(key, ()):
        return value.decode("utf-8", "replace") or None
    return None


def subject_name(certificate: x509.Certificate) -> str:
    """The subject's CN, else its RFC 4514 string (a certificate may have no CN)."""
    return _identity_of(certificate.subject)


def _identity_of(subject: x509.Name) -> str:
    names = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if names and isinstance(names[0].value, str) and names[0].value:
        return names[0].value
    return subject.rfc4514_string()


def _key_usage_allows_signing(_policy: Policy, _cert: x509.Certificate, usage: x509.KeyUsage | None) -> None:
    if usage is not None and not usage.key_cert_sign:
        raise ValueError("keyUsage of a CA certificate must include keyCertSign")


# cryptography's Web PKI profile, loosened where private client-certificate CAs commonly differ and
# OpenSSL/BoringSSL (the gRPC side) accept: a leaf may lack subjectAltName and
# authorityKeyIdentifier, a CA may lack keyUsage (if present it must allow certificate signing).
# basicConstraints, validity, signatures and extended key usage (clientAuth, when present) are
# still enforced.
_LEAF_POLICY = (
    ExtensionPolicy.webpki_defaults_ee()
    .may_be_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
    .may_be_present(x509.AuthorityKeyIdentifier, Criticality.AGNOSTIC, None)
)
_CA_POLICY = ExtensionPolicy.webpki_defaults_ca().may_be_present(
    x509.KeyUsage, Criticality.AGNOSTIC, _key_usage_allows_signing
)


class ClientCertificates:
    """Verifies client certificate chains against ``ca_file`` and maps their CN to roles."""

    def __init__(self, settings: Mtls, *, clock: Clock = time.time) -> None:
        self._store = Store(x509.load_pem_x509_certificates(load_ca(settings.ca_file)))
        self._roles = {name: frozenset(roles) for name, roles in settings.roles.items()}
        self._clock = clock
        self._forwarded = settings.forwarded

    def identity(self, name: str) -> Identity:
        """A verified peer's identity; a CN with no roles entry authenticates with no roles."""
        return Identity(name, self._roles.get(name, frozenset()), "mtls")

    def verify_chain(self, chain: str | bytes | Sequence[str | bytes]) -> str:
        """The subject name of the leaf of a PEM chain (leaf first) that leads to ``ca_file``:
        a list of PEM certificates, or one PEM string holding them all."""
        certificates = _load_chain(chain)
        now = dt.datetime.fromtimestamp(self._clock(), dt.UTC)
        verifier = (
            PolicyBuilder()
            .store(self._store)
            .time(now)
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_LEAF_POLICY)
            .build_client_verifier()
        )
        leaf = certificates[0]
        try:
            verifier.verify(leaf, certificates[1:])
        except VerificationError as exc:
            log.info("client certificate %s refused: %s", pii.identity(subject_name(leaf)), exc)
            if not leaf.not_valid_before_utc <= now <= leaf.not_valid_after_utc:
                raise unauthenticated("client certificate expired or not yet valid") from exc
            if not _for_client_auth(leaf):
                raise unauthenticated(
                    "client certificate is not for client authentication (extendedKeyUsage)"
                ) from exc
            raise unauthenticated("client certificate not signed by the configured CA") from exc
        return subject_name(leaf)

    def from_asgi(self, scope: Mapping[str, Any]) -> str | None:
        """The verified peer identity of an HTTP request, None when it came without a certificate
        (or through a server that does not implement the ASGI TLS extension). Raises
        UNAUTHENTICATED for a certificate that does not verify or a forwarded one from an
        untrusted peer."""
        if self._forwarded is not None:
            header = self._forwarded.header.encode()
            for name, value in scope.get("headers", ()):
                if name == header:
                    return self.verify_chain(self._forwarded_chain(scope, value.decode("latin-1")))
        tls = (scope.get("extensions") or {}).get("tls")
        if not tls:
            return None
        if tls.get("client_cert_error"):
            raise unauthenticated("client certificate refused by the TLS layer")
        # A list of PEM strings (extension 0.2); a proposed revision sends one string.
        chain = tls.get("client_cert_chain")
        if chain:
            return self.verify_chain(chain)
        # pyvoy sends only the subject, of a certificate Envoy verified against ca_file itself.
        name = tls.get("client_cert_name")
        if not name:
            return None
        try:
            return _identity_of(x509.Name.from_rfc4514_string(name))
        except ValueError:
            raise unauthenticated("client certificate subject unreadable") from None

    def _forwarded_chain(self, scope: Mapping[str, Any], value: str) -> str:
        assert self._forwarded is not None
        header = self._forwarded.header
        peer = (scope.get("client") or ("", 0))[0]
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            trusted = False
        else:  # a dual-stack listener reports an IPv4 proxy as ::ffff:a.b.c.d
            address = getattr(address, "ipv4_mapped", None) or address
            trusted = any(address in net for net in self._forwarded.trusted_proxies)
        if not trusted:
            log.warning("%s from %s refused: not in auth.mtls.forwarded.trusted_proxies", header, peer or "?")
            raise unauthenticated(f"{header} is accepted only from a trusted proxy")
        return forwarded_pem(value, header)

    def from_grpc(self, context: grpc.aio.ServicerContext) -> str | None:
        return grpc_peer_identity(context)


# Envoy's x-forwarded-client-cert: ``key=value`` pairs split by ';', the PEM URL-encoded in
# a quoted Cert (leaf) and Chain (leaf first, whole chain).
_XFCC_PEM = re.compile(r'(?:^|;)\s*(Chain|Cert)="([^"]*)"', re.IGNORECASE)


def forwarded_pem(value: str, header: str) -> str:
    """The PEM a proxy put in ``header``: Envoy's XFCC with one element, else URL-encoded PEM."""
    found = {key.lower(): pem for key, pem in _XFCC_PEM.findall(value)}
    if found:
        if "," in re.sub(r'"[^"]*"', "", value):  # commas outside quoted values split elements
            raise unauthenticated(f"{header} holds several proxies' elements; let the edge proxy set it")
        return urllib.parse.unquote(found.get("chain") or found["cert"])
    pem = urllib.parse.unquote(value.strip())
    if "-----BEGIN" not in pem:
        raise unauthenticated(f"{header} holds no certificate: expected URL-encoded PEM or Cert=\"...\"")
    return pem


def _for_client_auth(certificate: x509.Certificate) -> bool:
    try:
        usage = certificate.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True
    return ExtendedKeyUsageOID.CLIENT_AUTH in usage


def _load_chain(chain: str | bytes | Sequence[str | bytes]) -> list[x509.Certificate]:
    pems = [chain] if isinstance(chain, str | bytes) else list(chain)
    if len(pems) > MAX_CHAIN:
        raise unauthenticated(f"client certificate chain longer than {MAX_CHAIN}")
    try:
        certificates = [c for pem in pems for c in x509.load_pem_x509_certificates(_bytes(pem))]
    except ValueError:
        raise unauthenticated("client certificate is not valid PEM") from None
    if not certificates:
        raise unauthenticated("no client certificate")
    if len(certificates) > MAX_CHAIN:
        raise unauthenticated(f"client certificate chain longer than {MAX_CHAIN}")
    return certificates


def _bytes(pem: str | bytes) -> bytes:
    return pem.encode("ascii") if isinstance(pem, str) else pem
