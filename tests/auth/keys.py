"""Credentials for authentication tests, shared by the unit tests (tests/auth/test_authenticator.py)
and the end-to-end tests through real gateways (tests/test_authentication_e2e.py): a local JWKS
endpoint, hand-built attack tokens, and an X.509 CA issuing client and server certificates.
"""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import ipaddress
import json
import pathlib
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from joserfc.jwk import ECKey, RSAKey

# --------------------------------------------------------------------------------------------
# JWKS and tokens


@dataclass
class JwksEndpoint:
    """A tiny HTTP/1.1 server (asyncio.start_server) serving one JWK Set and counting hits."""

    document: dict[str, Any] = field(default_factory=lambda: {"keys": []})
    status: int = 200
    hits: int = 0
    server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"http://127.0.0.1:{port}/.well-known/jwks.json"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)

    async def stop(self) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    def publish(self, *keys: RSAKey | ECKey) -> None:
        self.document = {"keys": [key.as_dict(private=False) for key in keys]}

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await reader.readuntil(b"\r\n\r\n")
            assert request.startswith(b"GET /.well-known/jwks.json HTTP/1.1\r\n"), request
            self.hits += 1
            body = json.dumps(self.document).encode()
            writer.write(
                b"HTTP/1.1 %d X\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
                b"connection: close\r\n\r\n%s" % (self.status, len(body), body)
            )
            await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # the client gave up (timeout tests); nothing to answer
        finally:
            writer.close()


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def unsigned_token(claims: dict[str, Any], *, alg: str = "none", kid: str | None = None, signature: bytes = b"") -> str:
    """A token whose header says ``alg`` (``none``: no signature at all) with a made-up signature."""
    header = {"alg": alg, "typ": "JWT"} | ({"kid": kid} if kid else {})
    body = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    return f"{body}.{b64(signature)}"


def hs256_with_public_key(claims: dict[str, Any], public_key: RSAKey, *, kid: str | None = None) -> str:
    """Algorithm confusion: HS256 with the issuer's public key (PEM) as the HMAC secret."""
    header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
    signing_input = f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}"
    secret = public_key.as_pem(private=False)
    return f"{signing_input}.{b64(hmac.new(secret, signing_input.encode(), hashlib.sha256).digest())}"


# --------------------------------------------------------------------------------------------
# X.509


@dataclass(frozen=True)
class Issued:
    key: ec.EllipticCurvePrivateKey
    cert: x509.Certificate

    @property
    def pem(self) -> str:
        return self.cert.public_bytes(serialization.Encoding.PEM).decode()

    @property
    def key_pem(self) -> bytes:
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )


def x509_name(cn: str | None) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.COMMON_NAME, cn)]
        if cn
        else [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, "batch"),
        ]
    )


def issue(
    cn: str | None,
    issuer: Issued | None = None,
    *,
    ca: bool = False,
    san: str | None = None,
    client_auth: bool = True,
    valid_from: dt.datetime | None = None,
    valid_days: float = 30,
) -> Issued:
    """A certificate: self-signed when no issuer is given. ``san`` is a DNS name or an IP address;
    ``client_auth=False`` issues a certificate without extendedKeyUsage (fit for a server)."""
    key = ec.generate_private_key(ec.SECP256R1())
    start = valid_from or dt.datetime.now(dt.UTC) - dt.timedelta(hours=1)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509_name(cn))
        .issuer_name(issuer.cert.subject if issuer else x509_name(cn))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(start + dt.timedelta(days=valid_days))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    elif client_auth:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    if san:
        builder = builder.add_extension(x509.SubjectAlternativeName([_general_name(san)]), critical=False)
    signer = issuer.key if issuer else key
    return Issued(key, builder.sign(signer, hashes.SHA256()))


def _general_name(san: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(san))
    except ValueError:
        return x509.DNSName(san)


def write_pem(directory: pathlib.Path, name: str, issued: Issued) -> tuple[pathlib.Path, pathlib.Path]:
    """(certificate file, private key file) written to ``directory``."""
    cert_file, key_file = directory / f"{name}.pem", directory / f"{name}-key.pem"
    cert_file.write_text(issued.pem)
    key_file.write_bytes(issued.key_pem)
    key_file.chmod(0o600)
    return cert_file, key_file
