"""Every kind of bad input gets INVALID_ARGUMENT / 400 (or 413) naming the problem, through
REST, gRPC-Web and native gRPC, and the stored data is unchanged afterwards."""

from __future__ import annotations

import base64
import struct
import uuid

import grpc
import httpx
import pytest

from app.settings import Limits
from prism.errors import HTTP_STATUS
from prism.v1 import keyvalue_pb2 as kv
from tests.clients import CallError, GrpcClient, GrpcWebClient, decode_grpc_web_text, grpc_web_frames
from tests.conftest import open_session

KV = "/prism.v1.KeyValueService/"
ORIGINAL = b"original \x00 value"
MAX_VALUE = Limits().max_value_bytes  # the default


@pytest.fixture
async def stored(hypercorn_gateway):
    """A session and a key holding ORIGINAL, checked unchanged after each test."""
    client = GrpcClient(hypercorn_gateway.grpc_target)
    token = await open_session(client, "kv")
    key = f"stable-{uuid.uuid4().hex}"
    await client.call(KV + "Set", kv.SetRequest(key=key, value=ORIGINAL), token)
    http = httpx.AsyncClient(base_url=hypercorn_gateway.base_url, headers={"x-prism-session": token}, timeout=30)
    yield http, client, token, key
    after = await client.call(KV + "Get", kv.GetRequest(key=key), token)
    assert after.value == ORIGINAL, "bad input changed stored data"
    await http.aclose()
    await client.close()


def assert_error(response: httpx.Response, status: int, code: str, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == code
    for fragment in fragments:
        assert fragment in body["message"], body["message"]
    assert "Traceback" not in response.text and 'File "' not in response.text
    return body


async def test_rest_malformed_json(stored):
    http, _, _, key = stored
    response = await http.put(f"/v1/kv/{key}", content=b'{"value": "AAAA",', headers={"content-type": "application/json"})
    assert_error(response, 400, "INVALID_ARGUMENT", "malformed JSON", "line 1")


async def test_rest_body_not_an_object(stored):
    http, _, _, key = stored
    assert_error(await http.put(f"/v1/kv/{key}", content=b"[1, 2]"), 400, "INVALID_ARGUMENT", "JSON object")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"value": 12}, "value"),
        ({"value": "not base64!"}, "value"),
        ({"value": "hello world!"}, "value"),  # used to be stored as 7 garbage bytes
        ({"value": "AA=A"}, "value"),
        ({"value": ["AA=="]}, "value"),
        ({"ttl": "soon"}, "ttl"),
        ({"ttl": 5}, "ttl"),
        ({"ttl": {"seconds": 5}}, "ttl"),
        ({"ifAbsent": "yes"}, "ifAbsent"),
        ({"if_absent": 1}, "ifAbsent"),
        ({"ifAbsent": True, "if_absent": True}, "ifAbsent"),
    ],
)
async def test_rest_wrong_types_name_the_field(stored, body, field):
    http, _, _, key = stored
    response = await http.put(f"/v1/kv/{key}", json=body)
    error = assert_error(response, 400, "INVALID_ARGUMENT", field)
    assert error["details"][0]["fieldViolations"][0]["field"] == field


async def test_rest_unknown_field(stored):
    http, _, _, key = stored
    error = assert_error(await http.put(f"/v1/kv/{key}", json={"valu": "AAAA"}), 400, "INVALID_ARGUMENT", '"valu"')
    assert error["details"][0]["fieldViolations"][0]["field"] == "valu"


async def test_rest_unknown_query_parameter(stored):
    http, _, _, key = stored
    assert_error(await http.get(f"/v1/kv/{key}", params={"colour": "red"}), 400, "INVALID_ARGUMENT", "colour")


async def test_rest_bad_query_value(stored):
    http, *_ = stored
    assert_error(await http.get("/v1/kv", params={"pageSize": "many"}), 400, "INVALID_ARGUMENT", "pageSize")
    assert_error(await http.get("/v1/kv", params={"keysOnly": "maybe"}), 400, "INVALID_ARGUMENT", "keysOnly")


async def test_rest_oversized_body_is_413(stored):
    http, _, _, key = stored
    value = base64.b64encode(b"x" * (MAX_VALUE + 1)).decode()
    response = await http.put(f"/v1/kv/{key}", json={"value": value})
    assert_error(response, 413, "RESOURCE_EXHAUSTED", "limit")
    huge = b"{" + b" " * (Limits().max_request_bytes + 1024) + b"}"  # past the body limit: refused while reading
    assert_error(await http.put(f"/v1/kv/{key}", content=huge), 413, "RESOURCE_EXHAUSTED", "request body")


async def test_rest_401_names_the_scheme(stored):
    http, _, _, key = stored
    response = await http.get(f"/v1/kv/{key}", headers={"x-prism-session": "not-a-session"})
    assert_error(response, 401, "UNAUTHENTICATED", "session")
    assert response.headers["www-authenticate"] == 'Bearer realm="prism"'


async def test_rest_unknown_route_and_wrong_verb(stored):
    http, *_ = stored
    assert_error(await http.get("/v1/nothing-here"), 404, "NOT_FOUND", "no route")
    response = await http.post("/v1/kv/some-key", json={})
    assert_error(response, 405, "UNIMPLEMENTED", "POST is not allowed")
    assert set(response.headers["allow"].split(", ")) == {"GET", "PUT", "DELETE"}


async def test_rest_missing_required_field(stored):
    http, *_ = stored
    error = assert_error(await http.post("/v1/kv:exists", json={}), 400, "INVALID_ARGUMENT", "key", "required")
    assert error["details"][0]["fieldViolations"][0]["field"] == "key"


async def test_batch_entry_without_key_fails_on_its_own(stored):
    """BatchSet's contract: each entry succeeds or fails on its own, a missing key included."""
    http, *_ = stored
    response = await http.post("/v1/kv:batchSet", json={"entries": [{"value": "AA=="}, {"key": "batch-ok", "value": "AQ=="}]})
    assert response.status_code == 200, response.text
    missing, written = response.json()["results"]
    assert missing["status"]["code"] == 3  # INVALID_ARGUMENT
    assert missing["status"]["details"][0]["fieldViolations"][0]["field"] == "entries[0].key"
    assert "status" not in written and written["etag"]
    assert (await http.get("/v1/kv/batch-ok")).json()["value"] == "AQ=="


@pytest.mark.parametrize("transport", ["grpc", "grpc-web", "grpc-web-text"])
async def test_missing_required_field_over_grpc_transports(stored, hypercorn_gateway, transport):
    _, _, token, _ = stored
    client = (
        GrpcClient(hypercorn_gateway.grpc_target)
        if transport == "grpc"
        else GrpcWebClient(hypercorn_gateway.base_url, text=transport == "grpc-web-text")
    )
    try:
        with pytest.raises(CallError) as missing:
            await client.call(KV + "Set", kv.SetRequest(value=b"no key"), token)
        assert missing.value.code == "INVALID_ARGUMENT" and "key" in missing.value.message
        with pytest.raises(CallError) as bad_ttl:
            request = kv.SetRequest(key=stored[3], value=b"new")
            request.ttl.seconds = -5
            await client.call(KV + "Set", request, token)
        assert bad_ttl.value.code == "INVALID_ARGUMENT" and "ttl" in bad_ttl.value.message
        with pytest.raises(CallError) as too_big:
            await client.call(KV + "Set", kv.SetRequest(key=stored[3], value=b"x" * (MAX_VALUE + 1)), token)
        assert too_big.value.code == "RESOURCE_EXHAUSTED" and "limit" in too_big.value.message
    finally:
        await client.close()


@pytest.mark.parametrize(
    ("content_type", "body", "fragment"),
    [
        ("application/grpc-web+proto", b"\x00\x00\x00", "at least 5"),
        ("application/grpc-web+proto", b"\x00\x00\x00\x00\x10abc", "header says 16 bytes"),
        ("application/grpc-web+proto", b"\x07\x00\x00\x00\x00", "unexpected flag"),
        ("application/grpc-web+proto", b"\x00\x00\x00\x00\x03\xff\xff\xff", "not a valid prism.v1.GetRequest"),
        ("application/grpc-web-text", b"!!!not base64!!!", "not valid base64"),
    ],
)
async def test_invalid_grpc_web_frames(stored, content_type, body, fragment):
    http, *_ = stored
    response = await http.post(KV + "Get", content=body, headers={"content-type": content_type})
    assert response.status_code == 200  # gRPC-Web reports status in headers/trailers
    assert response.content == b""  # trailers-only: the status is in the headers
    assert response.headers["grpc-status"] == str(grpc.StatusCode.INVALID_ARGUMENT.value[0])
    assert fragment in httpx.URL("?m=" + response.headers["grpc-message"]).params["m"]


async def test_grpc_web_text_tolerates_line_breaks(stored):
    """`base64` wraps and ends its output with newlines; curl users send that as is."""
    http, _, _, key = stored
    payload = kv.GetRequest(key=key).SerializeToString()
    body = base64.encodebytes(struct.pack(">BI", 0, len(payload)) + payload)
    response = await http.post(KV + "Get", content=body, headers={"content-type": "application/grpc-web-text"})
    messages, trailers = grpc_web_frames(decode_grpc_web_text(response.content))
    assert trailers["grpc-status"] == "0"
    assert kv.GetResponse.FromString(messages[0]).value == ORIGINAL


async def test_invalid_protobuf_over_native_grpc(stored, hypercorn_gateway):
    _, _, token, _ = stored
    async with grpc.aio.insecure_channel(hypercorn_gateway.grpc_target) as channel:
        raw_call = channel.unary_unary(KV + "Get")
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await raw_call(b"\xff\xff\xff", metadata=(("x-prism-session", token),))
    assert failure.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid prism.v1.GetRequest" in failure.value.details()


async def test_field_violation_details_over_native_grpc(stored, hypercorn_gateway):
    """The rich status (google.rpc.BadRequest) names the field for gRPC clients too."""
    from google.rpc import error_details_pb2, status_pb2

    _, _, token, _ = stored
    async with grpc.aio.insecure_channel(hypercorn_gateway.grpc_target) as channel:
        call = channel.unary_unary(KV + "Exists", request_serializer=kv.ExistsRequest.SerializeToString)
        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await call(kv.ExistsRequest(), metadata=(("x-prism-session", token),))
    details = dict(failure.value.trailing_metadata())["grpc-status-details-bin"]
    status = status_pb2.Status.FromString(details)
    bad_request = error_details_pb2.BadRequest()
    assert status.details[0].Unpack(bad_request)
    assert bad_request.field_violations[0].field == "key"


@pytest.mark.parametrize("code", list(grpc.StatusCode))
def test_every_grpc_status_has_an_http_status(code):
    assert code in HTTP_STATUS
    assert 200 <= HTTP_STATUS[code] < 600


def test_grpc_web_frame_layout():
    """The frame helper writes what the spec says: flag byte, big-endian length, payload."""
    from app.transports.grpc_web import frame, trailers

    assert frame(b"abc") == b"\x00\x00\x00\x00\x03abc"
    assert trailers(None).startswith(b"\x80" + struct.pack(">I", len(b"grpc-status:0\r\ngrpc-message:\r\n")))
