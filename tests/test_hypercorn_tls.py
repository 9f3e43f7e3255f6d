"""app/hypercorn_tls.py hooks one Hypercorn global; it must refuse, loudly, a Hypercorn that no
longer looks like the one it was written for (the end-to-end proof is tests/test_mtls_e2e.py)."""

from __future__ import annotations

import hypercorn.asyncio.run as hypercorn_run
import pytest
from hypercorn.asyncio.tcp_server import TCPServer

from app import hypercorn_tls


def test_install_replaces_the_tcp_server_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(hypercorn_run, "TCPServer", TCPServer)
    hypercorn_tls.install()
    hypercorn_tls.install()
    assert hypercorn_run.TCPServer is hypercorn_tls.TlsTCPServer


def test_install_refuses_an_unknown_tcp_server(monkeypatch: pytest.MonkeyPatch) -> None:
    class Other:
        pass

    monkeypatch.setattr(hypercorn_run, "TCPServer", Other)
    with pytest.raises(RuntimeError, match="client certificates on the HTTP port need updating it"):
        hypercorn_tls.install()
    assert hypercorn_run.TCPServer is Other
