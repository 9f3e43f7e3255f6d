"""The ASGI TLS extension (``scope["extensions"]["tls"]``) for Hypercorn.

Hypercorn verifies client certificates (``ca_certs`` + ``verify_mode``) but does not tell the app
whose certificate it verified (upstream: pgjones/hypercorn#62). Without that, a client
certificate cannot be a credential on the HTTP port. This module adds the extension for Hypercorn
0.18's asyncio worker: every connection's TCPServer wraps the app so that each request scope on
a TLS connection carries the peer's certificate, as the ASGI spec describes
(https://asgi.readthedocs.io/en/latest/specs/tls.html).

The hook is one module global — ``hypercorn.asyncio.run.TCPServer``, looked up per accepted
connection — replaced by a subclass that only wraps the app. ``install()`` checks that the
global is still Hypercorn's own TCPServer with the signature this was written against, and
fails loudly otherwise, so an upgrade cannot silently lose certificate identities
(tests/test_mtls_e2e.py exercises the real server).

Only the leaf certificate is passed: Python 3.11's ``ssl`` exposes no verified chain. That is
enough here because the gateway re-verifies it against ``auth.mtls.ca_file`` (app/auth/mtls.py).
"""

from __future__ import annotations

import inspect
import ssl
from typing import Any

import hypercorn.asyncio.run as hypercorn_run
from hypercorn.asyncio.tcp_server import TCPServer
from hypercorn.typing import AppWrapper

EXPECTED_PARAMETERS = ["self", "app", "loop", "config", "context", "state", "reader", "writer"]


def tls_extension(ssl_object: ssl.SSLObject) -> dict[str, Any]:
    """The ASGI TLS extension dict for one established TLS connection."""
    der = ssl_object.getpeercert(binary_form=True)
    return {
        "server_cert": None,
        "client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)] if der else [],
        "client_cert_name": None,
        "client_cert_error": None,  # a certificate that fails verification aborts the handshake
        "tls_version": None,  # likewise
        "cipher_suite": None,  # the spec wants IANA numbers, which ssl does not expose
    }


class _TlsScopeApp:
    """Hypercorn's app wrapper, adding one connection's TLS extension to each scope."""

    def __init__(self, app: AppWrapper, tls: dict[str, Any]) -> None:
        self.app, self.tls = app, tls

    async def __call__(self, scope: Any, receive: Any, send: Any, sync_spawn: Any, call_soon: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("extensions", {})["tls"] = self.tls
        await self.app(scope, receive, send, sync_spawn, call_soon)


class TlsTCPServer(TCPServer):
    def __init__(self, app: AppWrapper, loop: Any, config: Any, context: Any, state: Any, reader: Any, writer: Any) -> None:
        ssl_object = writer.get_extra_info("ssl_object")
        if ssl_object is not None:
            app = _TlsScopeApp(app, tls_extension(ssl_object))
        super().__init__(app, loop, config, context, state, reader, writer)


def install() -> None:
    """Make Hypercorn's asyncio/uvloop workers in this process fill in the TLS extension."""
    current = hypercorn_run.TCPServer
    if current is TlsTCPServer:
        return
    parameters = list(inspect.signature(TCPServer.__init__).parameters)
    if current is not TCPServer or parameters != EXPECTED_PARAMETERS:
        raise RuntimeError(
            "hypercorn's TCPServer is not the one app/hypercorn_tls.py was written for "
            f"(parameters {parameters}); client certificates on the HTTP port need updating it"
        )
    hypercorn_run.TCPServer = TlsTCPServer  # type: ignore[misc]
