"""Client certificates (mTLS) end to end, through real ``prism serve`` processes, on both ports.

``direct``: a Hypercorn gateway with TLS on both ports (server certificate from a CA generated
here). The gRPC port requires a client certificate signed by the configured client CA; the HTTP
port asks for one optionally (callers with an API key still connect) and hands it to the app
through the ASGI TLS extension (app/hypercorn_tls.py). The certificate's CN is the identity.

``proxied``: a plain-HTTP Granian gateway behind a real nginx terminating TLS, which passes the
client certificate on in ``x-forwarded-client-cert`` (``$ssl_client_escaped_cert``). nginx is
told *not* to check the certificate (``optional_no_ca``), so the gateway's own verification
against its CA is what refuses a certificate from another CA. The header is honoured only from
the trusted proxy address; the same header from another peer is refused.

Nothing is mocked: every certificate crosses a real TLS handshake or a real proxy.
"""

from __future__ import annotations

import asyncio
import pathlib
import shutil
import ssl
import subprocess
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import httpx
import pytest

from app.auth import NO_CREDENTIALS, hash_key
from tests.auth.keys import Issued, issue, write_pem
from tests.auth.sessions import NAMESPACE, Client, open_session, refusal, use_session
from tests.clients import GrpcClient, GrpcWebClient, RestClient
from tests.gateway_process import GatewayProcess, free_port, start_gateway, wait_http, wait_ready

READY_SECONDS = 30
API_KEY = "prism_mtls-e2e-key-0123456789abcdef"
NGINX = shutil.which("nginx") or "/usr/sbin/nginx"
HTTP_TRANSPORTS = ("rest-h1", "rest-h2", "grpc-web")


@dataclass(frozen=True)
class Authorities:
    server_ca: Issued  # signed the gateway's (and nginx's) certificate
    client_ca: Issued  # auth.mtls.ca_file
    other_ca: Issued  # unknown to the gateway
    server: Issued


@pytest.fixture(scope="module")
def authorities() -> Authorities:
    server_ca = issue("Prism E2E Server CA", ca=True)
    return Authorities(
        server_ca,
        issue("Prism E2E Client CA", ca=True),
        issue("Some Other CA", ca=True),
        issue("prism-gateway", server_ca, san="127.0.0.1", client_auth=False),
    )


def gateway_config(tmp: pathlib.Path, authorities: Authorities, *, forwarded: bool) -> str:
    ca_file = tmp / "clients-ca.pem"
    ca_file.write_text(authorities.client_ca.pem)
    if forwarded:  # plain HTTP behind a proxy that terminates TLS
        tls, extra = "", "\n    forwarded: {trusted_proxies: [127.0.0.1/32]}"
    else:
        certfile, keyfile = write_pem(tmp, "gateway", authorities.server)
        tls, extra = f"tls: {{certfile: {certfile}, keyfile: {keyfile}}}", ""
    return f"""
{tls}
backends:
  mem: {{type: memory}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: mem, namespace: {NAMESPACE}}}
namespaces:
  - {{name: {NAMESPACE}}}
auth:
  api_keys:
    - {{identity: ci-bot, sha256: {hash_key(API_KEY)}, roles: [service]}}
  mtls:
    ca_file: {ca_file}
    roles: {{svc-a: [service]}}{extra}
policies:
  - {{role: service, namespaces: [{NAMESPACE}], operations: ["SESSION.*", "KEY_VALUE.*"]}}
"""


def client_context(authorities: Authorities, tmp: pathlib.Path, client: Issued | None) -> ssl.SSLContext:
    context = ssl.create_default_context(cadata=authorities.server_ca.pem)
    if client is not None:
        name = client.cert.serial_number
        cert_file, key_file = write_pem(tmp, f"client-{name}", client)
        context.load_cert_chain(cert_file, key_file)
    return context


def http_client(
    transport: str,
    base_url: str,
    context: ssl.SSLContext | None = None,
    headers: dict[str, str] | None = None,
    local_address: str | None = None,
) -> RestClient | GrpcWebClient:
    http2 = transport == "rest-h2"
    pool = httpx.AsyncHTTPTransport(
        verify=context if context is not None else True, http1=not http2, http2=http2, local_address=local_address
    )
    if transport == "grpc-web":
        return GrpcWebClient(base_url, headers=headers, transport=pool)
    return RestClient(base_url, http2=http2, headers=headers, transport=pool)


@pytest.fixture
async def clients() -> AsyncIterator[list[Client]]:
    """Clients to close after the test."""
    made: list[Client] = []
    yield made
    for client in made:
        await client.close()


# --------------------------------------------------------------------------------------------
# Direct: Hypercorn verifies the certificate in the handshake and passes it to the app


@dataclass(frozen=True)
class Direct:
    gateway: GatewayProcess
    authorities: Authorities
    tmp: pathlib.Path

    @property
    def https_url(self) -> str:
        return f"https://127.0.0.1:{self.gateway.http_port}"

    def http(self, transport: str, client: Issued | None, headers: dict[str, str] | None = None) -> Client:
        context = client_context(self.authorities, self.tmp, client)
        return http_client(transport, self.https_url, context, headers)

    def grpc(self, client: Issued | None) -> GrpcClient:
        # 127.0.0.1 is the server certificate's subjectAltName (an IP address): no name override.
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.authorities.server_ca.pem.encode(),
            private_key=client.key_pem if client else None,
            certificate_chain=client.pem.encode() if client else None,
        )
        return GrpcClient(self.gateway.grpc_target, credentials=credentials)


@pytest.fixture(scope="module", params=["hypercorn", "pyvoy"])
async def direct(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, authorities: Authorities
) -> AsyncIterator[Direct]:
    """The servers that verify client certificates themselves: Hypercorn (the chain reaches
    the app through app/hypercorn_tls.py) and pyvoy (Envoy verifies it; the subject reaches
    the app in the ASGI TLS extension)."""
    tmp = tmp_path_factory.mktemp(f"mtls-direct-{request.param}")
    config = gateway_config(tmp, authorities, forwarded=False)

    def start() -> GatewayProcess:
        gateway = start_gateway(tmp, request.param, config_yaml=config, wait=False)
        wait_ready(gateway, verify=client_context(authorities, tmp, None))
        return gateway

    gateway = await asyncio.to_thread(start)
    yield Direct(gateway, authorities, tmp)
    await asyncio.to_thread(gateway.stop)


@pytest.mark.parametrize("transport", ("grpc", *HTTP_TRANSPORTS))
async def test_certificate_is_the_identity(direct: Direct, clients: list[Client], transport: str) -> None:
    """The CN of a certificate from the client CA opens a session, on both ports, and no other
    credential is sent."""
    certificate = issue("svc-a", direct.authorities.client_ca)
    client = direct.grpc(certificate) if transport == "grpc" else direct.http(transport, certificate)
    clients.append(client)
    created = await open_session(client)
    assert created.session.identity == "svc-a"
    session = await use_session(client, created.token, f"mtls-{transport}")
    assert session.identity == "svc-a"


@pytest.mark.parametrize("transport", ("grpc", "rest-h1", "grpc-web"))
async def test_identity_without_roles_is_denied(direct: Direct, clients: list[Client], transport: str) -> None:
    """A certificate from the right CA authenticates its CN; a CN with no roles may do nothing."""
    certificate = issue("svc-b", direct.authorities.client_ca)
    client = direct.grpc(certificate) if transport == "grpc" else direct.http(transport, certificate)
    clients.append(client)
    denied = await refusal(client)
    assert denied.code == "PERMISSION_DENIED"
    assert denied.message == f"'svc-b' may not SESSION.CreateSession in namespace {NAMESPACE!r}"
    if transport == "rest-h1":
        assert denied.http_status == 403


@pytest.mark.parametrize("certificate", ["from-another-ca", "none"])
async def test_grpc_port_refuses_at_the_handshake(direct: Direct, clients: list[Client], certificate: str) -> None:
    # Not UNAUTHENTICATED: grpcio's server (require_client_auth=True) checks the client
    # certificate inside the TLS handshake and aborts it (an alert: unknown CA / certificate
    # required) before any HTTP/2 stream, so no handler, and no gRPC status from the gateway,
    # ever exists. The client's channel fails to connect and grpc reports that as UNAVAILABLE.
    cert = issue("svc-a", direct.authorities.other_ca) if certificate == "from-another-ca" else None
    client = direct.grpc(cert)
    clients.append(client)
    refused = await refusal(client)
    # Not the UNAVAILABLE a gateway could answer itself ("JWKS endpoint unreachable"): no connection.
    assert refused.code == "UNAVAILABLE", refused
    assert "failed to connect" in refused.message


@pytest.mark.parametrize("transport", HTTP_TRANSPORTS)
async def test_http_port_refuses_another_ca_at_the_handshake(
    direct: Direct, clients: list[Client], transport: str
) -> None:
    """The HTTP port's certificate is optional, not unchecked: one from another CA aborts the
    TLS handshake, so no request is ever answered. (In TLS 1.3 the server checks the client's
    certificate after the client considers the handshake done, so the client may see the
    server's alert on its first read rather than while connecting.)"""
    client = direct.http(transport, issue("svc-a", direct.authorities.other_ca))
    clients.append(client)
    with pytest.raises((httpx.TransportError, ssl.SSLError)):  # no HTTP response at all (pyvoy: the alert surfaces raw)
        await open_session(client)


@pytest.mark.parametrize("transport", HTTP_TRANSPORTS)
async def test_http_port_without_certificate(direct: Direct, clients: list[Client], transport: str) -> None:
    """Without a certificate the HTTP port still serves callers with another credential, and
    refuses those with none."""
    with_key = direct.http(transport, None, {"x-api-key": API_KEY})
    anonymous = direct.http(transport, None)
    clients.extend([with_key, anonymous])
    created = await open_session(with_key)
    assert created.session.identity == "ci-bot"
    refused = await refusal(anonymous)
    assert refused.code == "UNAUTHENTICATED"
    assert refused.message == NO_CREDENTIALS


async def test_header_is_no_credential_without_forwarded(direct: Direct, clients: list[Client]) -> None:
    """Without auth.mtls.forwarded, a certificate in a header is no credential at all."""
    pem = urllib.parse.quote(issue("svc-a", direct.authorities.client_ca).pem)
    client = direct.http("rest-h1", None, {"x-forwarded-client-cert": pem})
    clients.append(client)
    refused = await refusal(client)
    assert refused.message == NO_CREDENTIALS


# --------------------------------------------------------------------------------------------
# Proxied: nginx terminates TLS and forwards the certificate in a header


NGINX_CONF = """
daemon off;
worker_processes 1;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log info;
events {{ worker_connections 64; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client-body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    server {{
        listen 127.0.0.1:{port} ssl http2;
        ssl_certificate {certfile};
        ssl_certificate_key {keyfile};
        ssl_client_certificate {client_ca};
        ssl_verify_client optional_no_ca;  # checking is left to the gateway, on purpose
        location / {{
            proxy_pass http://127.0.0.1:{upstream};
            proxy_http_version 1.1;
            proxy_buffering off;
            proxy_set_header X-Forwarded-Client-Cert $ssl_client_escaped_cert;
        }}
    }}
}}
"""


@dataclass(frozen=True)
class Proxied:
    gateway: GatewayProcess
    nginx_port: int
    authorities: Authorities
    tmp: pathlib.Path

    def via_nginx(self, transport: str, client: Issued | None, headers: dict[str, str] | None = None) -> Client:
        context = client_context(self.authorities, self.tmp, client)
        return http_client(transport, f"https://127.0.0.1:{self.nginx_port}", context, headers)

    def bypassing(self, headers: dict[str, str], local_address: str = "127.0.0.1") -> Client:
        return http_client("rest-h1", self.gateway.base_url, headers=headers, local_address=local_address)


@pytest.fixture(scope="module")
def nginx_dir(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    if not pathlib.Path(NGINX).exists():
        pytest.skip("nginx is not installed (make test-deps)")
    return tmp_path_factory.mktemp("nginx")


@pytest.fixture(scope="module")
async def proxied(
    tmp_path_factory: pytest.TempPathFactory, authorities: Authorities, nginx_dir: pathlib.Path
) -> AsyncIterator[Proxied]:
    tmp = nginx_dir  # holds the client CA file both nginx and the gateway read
    gateway = await asyncio.to_thread(
        start_gateway,
        tmp_path_factory.mktemp("mtls-proxied"),
        "granian",
        config_yaml=gateway_config(tmp, authorities, forwarded=True),
    )
    certfile, keyfile = write_pem(tmp, "nginx", authorities.server)
    port = free_port()
    conf = tmp / "nginx.conf"
    conf.write_text(
        NGINX_CONF.format(
            tmp=tmp,
            port=port,
            certfile=certfile,
            keyfile=keyfile,
            client_ca=tmp / "clients-ca.pem",
            upstream=gateway.http_port,
        )
    )
    nginx = await asyncio.to_thread(
        subprocess.Popen, [NGINX, "-c", str(conf), "-p", str(tmp)], stderr=subprocess.DEVNULL
    )
    try:
        context = client_context(authorities, tmp, None)
        await asyncio.to_thread(wait_http, f"https://127.0.0.1:{port}/readyz", nginx, verify=context)
        yield Proxied(gateway, port, authorities, tmp)
    finally:
        nginx.terminate()
        await asyncio.to_thread(nginx.wait, 10)
        await asyncio.to_thread(gateway.stop)


@pytest.mark.parametrize("transport", HTTP_TRANSPORTS)
async def test_certificate_through_the_proxy(proxied: Proxied, clients: list[Client], transport: str) -> None:
    client = proxied.via_nginx(transport, issue("svc-a", proxied.authorities.client_ca))
    clients.append(client)
    created = await open_session(client)
    assert created.session.identity == "svc-a"
    session = await use_session(client, created.token, f"proxied-{transport}")
    assert session.identity == "svc-a"


async def test_proxy_passing_another_ca_is_refused(proxied: Proxied, clients: list[Client]) -> None:
    """nginx here forwards any certificate; the gateway checks it against its own CA."""
    client = proxied.via_nginx("rest-h1", issue("svc-a", proxied.authorities.other_ca))
    clients.append(client)
    refused = await refusal(client)
    assert refused.code == "UNAUTHENTICATED" and refused.http_status == 401
    assert refused.message == "client certificate not signed by the configured CA"


async def test_forged_header_through_the_proxy_is_replaced(proxied: Proxied, clients: list[Client]) -> None:
    """A client without a certificate cannot pass one in the header: the proxy sets the header
    itself (empty, so dropped) and the request arrives with no credential."""
    forged = urllib.parse.quote(issue("svc-a", proxied.authorities.client_ca).pem)
    client = proxied.via_nginx("rest-h1", None, {"x-forwarded-client-cert": forged})
    clients.append(client)
    refused = await refusal(client)
    assert refused.message == NO_CREDENTIALS


async def test_header_from_an_untrusted_peer_is_refused(proxied: Proxied, clients: list[Client]) -> None:
    """Straight to the gateway from 127.0.0.2 (not in trusted_proxies), with a genuine
    certificate in the header: refused, not silently ignored."""
    pem = urllib.parse.quote(issue("svc-a", proxied.authorities.client_ca).pem)
    client = proxied.bypassing({"x-forwarded-client-cert": pem}, local_address="127.0.0.2")
    clients.append(client)
    refused = await refusal(client)
    assert refused.http_status == 401
    assert refused.message == "x-forwarded-client-cert is accepted only from a trusted proxy"


ENVOY_FORMS = {
    # Envoy's XFCC element, the certificate URL-encoded in Cert="..." (commas in quoted values
    # belong to the value, not the element list).
    "envoy-xfcc": lambda pem: f'Hash=abc123;Subject="CN=svc-a,O=Example";Cert="{urllib.parse.quote(pem)}"',
    "url-encoded-pem": lambda pem: urllib.parse.quote(pem),
}


@pytest.mark.parametrize("form", sorted(ENVOY_FORMS))
async def test_header_forms_from_a_trusted_proxy(proxied: Proxied, clients: list[Client], form: str) -> None:
    pem = issue("svc-a", proxied.authorities.client_ca).pem
    client = proxied.bypassing({"x-forwarded-client-cert": ENVOY_FORMS[form](pem)})
    clients.append(client)
    created = await open_session(client)
    assert created.session.identity == "svc-a"


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("garbage", 'x-forwarded-client-cert holds no certificate: expected URL-encoded PEM or Cert="..."'),
        ("-----BEGIN%20CERTIFICATE-----%0Anope%0A-----END%20CERTIFICATE-----", "client certificate is not valid PEM"),
        ('Cert="a",Cert="b"', "x-forwarded-client-cert holds several proxies' elements; let the edge proxy set it"),
    ],
)
async def test_bad_header_from_a_trusted_proxy(
    proxied: Proxied, clients: list[Client], value: str, reason: str
) -> None:
    client = proxied.bypassing({"x-forwarded-client-cert": value})
    clients.append(client)
    refused = await refusal(client)
    assert refused.http_status == 401
    assert refused.message == reason
