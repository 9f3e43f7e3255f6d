"""The Connect protocol on the HTTP port, byte by byte as the spec writes it.

Connect-ES itself runs against the gateway in tests/test_js_clients.py; these pin down the
wire details a client library hides: content types, error JSON and its details, the
end-of-stream envelope, timeouts, compression and refusals.
"""

from __future__ import annotations

import base64
import gzip
import json
import struct

import httpx
import pytest
from google.rpc import error_details_pb2

from prism.v1 import keyvalue_pb2 as kv
from tests.gateway_process import GatewayProcess

KV = "/prism.v1.KeyValueService/"
SUBSCRIBE = "/prism.v1.PubSubService/Subscribe"


@pytest.fixture
async def http(gateway: GatewayProcess):
    async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as client:
        yield client


async def _session(http: httpx.AsyncClient, config: str = "kv") -> dict[str, str]:
    response = await http.post(
        "/prism.v1.SessionService/CreateSession",
        json={"configName": config},
        headers={"connect-protocol-version": "1"},
    )
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    return {"x-prism-session": response.json()["token"], "connect-protocol-version": "1"}


def _frames(body: bytes) -> list[tuple[int, bytes]]:
    frames, offset = [], 0
    while offset < len(body):
        flags, length = struct.unpack(">BI", body[offset : offset + 5])
        frames.append((flags, body[offset + 5 : offset + 5 + length]))
        offset += 5 + length
    return frames


async def test_unary_json_and_binary(http: httpx.AsyncClient) -> None:
    session = await _session(http)
    put = await http.post(KV + "Set", json={"key": "connect-k", "value": "AAH/"}, headers=session)
    assert put.status_code == 200, put.text
    etag = put.json()["etag"]
    binary = await http.post(
        KV + "Get",
        content=kv.GetRequest(key="connect-k").SerializeToString(),
        headers={**session, "content-type": "application/proto"},
    )
    assert binary.status_code == 200 and binary.headers["content-type"] == "application/proto"
    got = kv.GetResponse.FromString(binary.content)
    assert (got.value, got.etag) == (b"\x00\x01\xff", etag)
    gzipped = await http.post(
        KV + "Get",
        content=gzip.compress(b'{"key": "connect-k"}'),
        headers={**session, "content-type": "application/json", "content-encoding": "gzip"},
    )
    assert gzipped.json()["etag"] == etag


async def test_errors_are_connect_json_with_details(http: httpx.AsyncClient) -> None:
    session = await _session(http)
    bad = await http.post(KV + "Get", json={"key": ""}, headers=session)
    assert bad.status_code == 400
    body = bad.json()
    assert body["code"] == "invalid_argument" and "key" in body["message"]
    [detail] = body["details"]
    assert detail["type"] == "google.rpc.BadRequest"
    value = base64.b64decode(detail["value"] + "=" * (-len(detail["value"]) % 4))
    assert [v.field for v in error_details_pb2.BadRequest.FromString(value).field_violations] == ["key"]
    anonymous = await http.post(KV + "Get", json={"key": "k"})
    assert anonymous.status_code == 401 and anonymous.json()["code"] == "unauthenticated"
    missing = await http.post(KV + "Get", json={"key": "never-set"}, headers=session)
    assert missing.status_code == 404 and missing.json()["code"] == "not_found"
    version = await http.post(KV + "Get", json={"key": "k"}, headers={**session, "connect-protocol-version": "2"})
    assert version.status_code == 400 and "connect-protocol-version" in version.json()["message"]
    bomb = await http.post(
        KV + "Get",
        content=gzip.compress(b" " * (40 * 1024 * 1024)),
        headers={**session, "content-type": "application/json", "content-encoding": "gzip"},
    )
    assert bomb.status_code == 413, bomb.text
    # A streaming method asked for with a unary content type: 415 naming the stream types.
    wrong = await http.post(SUBSCRIBE, json={"subject": "a.b"}, headers=session)
    assert wrong.status_code == 415 and "application/connect+json" in wrong.json()["message"]


async def test_server_stream_ends_with_an_end_of_stream_envelope(http: httpx.AsyncClient) -> None:
    session = await _session(http, "events")
    request = json.dumps({"subject": "connect.*"}).encode()
    headers = {**session, "content-type": "application/connect+json", "connect-timeout-ms": "300"}
    response = await http.post(SUBSCRIBE, content=struct.pack(">BI", 0, len(request)) + request, headers=headers)
    assert response.status_code == 200 and response.headers["content-type"] == "application/connect+json"
    frames = _frames(response.content)
    assert frames[0][0] == 0 and json.loads(frames[0][1])["subscriptionId"]
    flags, end = frames[-1]
    assert flags == 0x02
    assert json.loads(end)["error"]["code"] == "deadline_exceeded"

    refused = await http.post(
        SUBSCRIBE, content=struct.pack(">BI", 0, 2) + b"{}", headers={**headers, "x-prism-session": "nope"}
    )
    assert refused.status_code == 200
    [(flags, end)] = _frames(refused.content)
    assert flags == 0x02 and json.loads(end)["error"]["code"] == "unauthenticated"
