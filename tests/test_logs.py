"""Process logs as JSON lines (``--log-format json``, the default outside a terminal): every
line of a worker's output parses, and a line written while a call is served names its session
and identity. The audit log is a separate stream (tests/test_authorization.py)."""

from __future__ import annotations

import json
import pathlib

import httpx
import pytest

from tests.gateway_process import start_gateway


@pytest.mark.parametrize("server", ["hypercorn", "granian", "pyvoy"])
async def test_json_lines_name_the_call_s_session_and_identity(tmp_path: pathlib.Path, server: str) -> None:
    gateway = start_gateway(tmp_path, server, extra_args=("--log-level", "debug", "--log-format", "json"))
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            created = (await http.post("/v1/sessions", json={"configName": "kv"})).json()
            session = {"x-prism-session": created["token"]}
            assert (await http.put("/v1/kv/logged", json={"value": "dg=="}, headers=session)).status_code == 200
    finally:
        gateway.stop()
    lines = [json.loads(line) for line in gateway.log().splitlines() if line.startswith("{")]
    assert lines, gateway.log()
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    (set_line,) = [line for line in lines if line["message"] == "/prism.v1.KeyValueService/Set over rest: OK"]
    assert set_line["logger"] == "prism.pipeline" and set_line["level"] == "DEBUG"
    assert set_line["session_id"] == created["session"]["sessionId"] and set_line["identity"] == "anonymous"
    prism_lines = [line for line in gateway.log().splitlines() if "prism" in line and not line.startswith("prism: ")]
    assert all(line.startswith("{") for line in prism_lines), "every line the gateway's loggers write is JSON"
