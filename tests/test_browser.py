"""The browser example, driven in headless Chromium from another origin (CORS, gRPC-Web,
SSE): `frontend-examples/browser-test/check.mjs` against a real gateway. Needs Node.js,
Debian's chromium and `npm ci` in browser-test (`make test-deps`)."""

from __future__ import annotations

import pathlib
import shutil
import subprocess
import sys

import pytest

from tests.gateway_process import ROOT, free_port, start_gateway

BROWSER_TEST = ROOT / "frontend-examples" / "browser-test"


def test_browser_example_works_cross_origin(tmp_path: pathlib.Path) -> None:
    node, chromium = shutil.which("node"), pathlib.Path("/usr/bin/chromium")
    if node is None or not chromium.exists() or not (BROWSER_TEST / "node_modules" / "playwright-core").exists():
        pytest.skip("node, /usr/bin/chromium or browser-test/node_modules missing: run `make browser-deps`")
    gateway = start_gateway(tmp_path, "hypercorn")
    page_port = free_port()
    page = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(page_port), "--bind", "127.0.0.1", "-d", str(ROOT / "frontend-examples" / "browser")],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        result = subprocess.run(
            [node, "check.mjs"],
            cwd=BROWSER_TEST,
            env={"PATH": "/usr/bin:/bin", "PAGE_URL": f"http://127.0.0.1:{page_port}/", "GATEWAY_URL": gateway.base_url},
            capture_output=True, text=True, timeout=120,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert "browser check: 3 passed, 0 failed" in result.stdout
    finally:
        page.terminate()
        page.wait()
        gateway.stop()
