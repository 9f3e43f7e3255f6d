"""One error model and one order of checks, on every transport.

The order (README, "Order of checks"): credentials and session first (UNAUTHENTICATED), then
the method (UNIMPLEMENTED / NOT_FOUND), then the request (INVALID_ARGUMENT), then the session's
pattern, authorization and limits. A caller without credentials learns nothing about the API.
Every answer — unknown routes and unsupported content types included — is the same
``{"code", "message", "details"}`` (REST) or grpc-status trailers with the same rich details
(gRPC, gRPC-Web).
"""

from __future__ import annotations

import base64
import pathlib
import struct
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest

from app.auth import hash_key
from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import session_pb2, transact_pb2
from tests.clients import CallError, status_violations
from tests.conftest import make_client, open_session
from tests.gateway_process import GatewayProcess, start_gateway

TRANSPORTS = ("grpc", "rest", "grpc-web", "grpc-web-text")
API_KEY = "prism_order-test-key-0123456789abcdef"
KV_GET = "/prism.v1.KeyValueService/Get"
KV_EXISTS = "/prism.v1.KeyValueService/Exists"
TRANSACT_WRITE = "/prism.v1.TransactService/Write"
CREATE_SESSION = "/prism.v1.SessionService/CreateSession"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    """A gateway that takes API keys: without one, nothing but the probes answers."""
    config = f"""
backends:
  mem: {{type: memory}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: mem, namespace: order}}
  - {{name: events, pattern: PUBSUB, backend: mem, namespace: order}}
namespaces:
  - {{name: order}}
auth:
  api_keys:
    - {{identity: ci-bot, sha256: {hash_key(API_KEY)}, roles: [writer]}}
policies:
  - {{role: writer, namespaces: [order], operations: ["SESSION.*", "KEY_VALUE.*"]}}
"""
    process = start_gateway(tmp_path_factory.mktemp("order"), "hypercorn", config_yaml=config)
    yield process
    process.stop()


@pytest.fixture
async def clients(keyed: GatewayProcess) -> AsyncIterator[dict[str, object]]:
    made = {t: make_client(t, keyed) for t in TRANSPORTS}
    yield made
    for client in made.values():
        await client.close()  # type: ignore[attr-defined]


async def _session(client: object, config: str = "kv") -> str:
    """A session opened with the API key on the client's own transport."""
    client.extra = (("x-api-key", API_KEY),)  # type: ignore[attr-defined]  # gRPC
    headers = {"x-api-key": API_KEY}
    http = getattr(client, "http", None)
    if http is not None:
        http.headers.update(headers)
    token = await open_session(client, config)  # type: ignore[arg-type]
    if http is not None:
        del http.headers["x-api-key"]
    client.extra = ()  # type: ignore[attr-defined]
    return token


async def _refused(client: object, rpc: str, request: object, token: str = "") -> CallError:
    with pytest.raises(CallError) as refused:
        await client.call(rpc, request, token)  # type: ignore[attr-defined]
    return refused.value


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_no_credentials_come_before_everything(clients: dict[str, object], transport: str) -> None:
    client = clients[transport]
    # A method not implemented yet, an invalid request, a valid one: all UNAUTHENTICATED alike.
    for rpc, request in [
        (TRANSACT_WRITE, transact_pb2.WriteRequest()),
        (KV_GET, kv.GetRequest()),
        (KV_GET, kv.GetRequest(key="k")),
        (CREATE_SESSION, session_pb2.CreateSessionRequest()),
    ]:
        error = await _refused(client, rpc, request)
        assert error.code == "UNAUTHENTICATED", (rpc, error)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_then_the_request_then_the_pattern(clients: dict[str, object], transport: str) -> None:
    client = clients[transport]
    # A PubSub session calling KeyValue with an invalid request: the request is refused first,
    # the session's pattern after it.
    events = await _session(client, "events")
    invalid = await _refused(client, KV_EXISTS, kv.ExistsRequest(), events)
    assert invalid.code == "INVALID_ARGUMENT" and invalid.violations == ("key",)
    assert (await _refused(client, KV_EXISTS, kv.ExistsRequest(key="k"), events)).code == "FAILED_PRECONDITION"


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_rich_details_are_the_same_on_every_transport(clients: dict[str, object], transport: str) -> None:
    client = clients[transport]
    token = await _session(client)
    error = await _refused(client, KV_EXISTS, kv.ExistsRequest(), token)
    assert error.code == "INVALID_ARGUMENT"
    assert error.violations == ("key",), "a google.rpc.BadRequest naming the field"


async def test_unknown_routes_need_credentials_then_answer_the_error_model(keyed: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=keyed.base_url) as http:
        for path in ("/nope", "/v1/nothing-here", "/v2/kv/x"):
            anonymous = await http.get(path)
            assert anonymous.status_code == 401 and anonymous.json()["code"] == "UNAUTHENTICATED", path
            known = await http.get(path, headers={"x-api-key": API_KEY})
            assert known.status_code == 404, path
            assert set(known.json()) == {"code", "message", "details"} and known.json()["code"] == "NOT_FOUND"
        # FastAPI's own routes answer refusals in the same model.
        wrong_verb = await http.post("/healthz")
        assert wrong_verb.status_code == 405 and set(wrong_verb.json()) == {"code", "message", "details"}
        # An unknown gRPC-Web method: credentials first, then UNIMPLEMENTED.
        framed = struct.pack(">BI", 0, 0)
        headers = {"content-type": "application/grpc-web+proto"}
        anonymous = await http.post("/prism.v1.Nope/Nothing", content=framed, headers=headers)
        assert anonymous.headers["grpc-status"] == "16"
        known = await http.post("/prism.v1.Nope/Nothing", content=framed, headers={**headers, "x-api-key": API_KEY})
        assert known.headers["grpc-status"] == "12"


async def test_unsupported_content_types_get_415_naming_the_supported_ones(keyed: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=keyed.base_url, headers={"x-api-key": API_KEY}) as http:
        json_grpc_web = await http.post(
            "/prism.v1.SessionService/CreateSession",
            content=b'{"configName": "kv"}',
            headers={"content-type": "application/grpc-web+json"},
        )
        assert json_grpc_web.status_code == 415
        body = json_grpc_web.json()
        assert body["code"] == "UNIMPLEMENTED" and "application/grpc-web+proto" in body["message"]
        assert json_grpc_web.headers["grpc-status"] == "12"
        native = await http.post(
            "/prism.v1.SessionService/CreateSession", content=b"", headers={"content-type": "application/grpc"}
        )
        assert native.status_code == 415 and "gRPC port" in native.json()["message"]
        xml = await http.post("/v1/sessions", content=b"<configName>kv</configName>", headers={"content-type": "application/xml"})
        assert xml.status_code == 415 and "application/json" in xml.json()["message"]
        # curl -d sends x-www-form-urlencoded; the JSON it carries is read as JSON.
        curl = await http.post(
            "/v1/sessions", content=b'{"configName": "kv"}', headers={"content-type": "application/x-www-form-urlencoded"}
        )
        assert curl.status_code == 200, curl.text


async def test_percent_escapes_that_are_not_utf8_are_invalid_arguments(keyed: GatewayProcess) -> None:
    async with httpx.AsyncClient(base_url=keyed.base_url) as http:
        token = (await http.post("/v1/sessions", json={"configName": "kv"}, headers={"x-api-key": API_KEY})).json()["token"]
        session = {"x-prism-session": token}
        await http.put("/v1/kv/kept", json={"value": "a2VwdA=="}, headers=session)
        for verb, path in [("PUT", "/v1/kv/%FF"), ("DELETE", "/v1/kv/%C3%28"), ("GET", "/v1/kv/%FF")]:
            response = await http.request(verb, path, headers=session, json={"value": "AA=="} if verb == "PUT" else None)
            assert response.status_code == 400, (verb, path, response.text)
            assert response.json()["details"][0]["fieldViolations"][0]["field"] == "key"
        events = (await http.post("/v1/sessions", json={"configName": "events"}, headers={"x-api-key": API_KEY})).json()
        subscribe = await http.get("/v1/subjects/%FF:subscribe", headers={"x-prism-session": events["token"]})
        assert subscribe.status_code == 400, subscribe.text
        assert (await http.get("/v1/kv/kept", headers=session)).json()["value"] == "a2VwdA=="


def test_grpc_web_trailers_carry_the_status_details() -> None:
    """The trailer block itself, as a gRPC-Web client parses it (base64 -bin, padding optional)."""
    from app.transports.grpc_web import trailers
    from prism.errors import invalid_argument
    from tests.clients import grpc_web_frames

    _, fields = grpc_web_frames(trailers(invalid_argument("entries[2].key", "must not be empty")))
    assert fields["grpc-status"] == "3"
    details = fields["grpc-status-details-bin"]
    assert status_violations(base64.b64decode(details + "=" * (-len(details) % 4))) == ("entries[2].key",)



async def test_a_method_without_a_handler_is_unimplemented_before_its_request_is_read(tmp_path: pathlib.Path) -> None:
    """Every RPC of the contract is implemented now; one added to the proto before its service
    method is refused UNIMPLEMENTED, after the credentials and before its request is read."""
    from app.gateway import Gateway
    from app.settings import load_settings
    from prism.errors import PrismError

    gateway = Gateway(load_settings(environ={"PRISM_DATA_DIR": str(tmp_path)}))
    (method,) = [m for m in gateway.methods if m.path == "/prism.v1.ConfigService/ListConfigs"]
    method.handler = None
    read: list[bool] = []

    async def decode() -> object:
        read.append(True)
        return method.request_type()

    with pytest.raises(PrismError) as refused:
        await gateway.pipeline.unary(method, decode, {}, "grpc")  # type: ignore[arg-type]
    assert refused.value.code.name == "UNIMPLEMENTED" and "ListConfigs is not implemented yet" in refused.value.message
    assert not read
