"""One scenario, every transport, both HTTP servers: the same KeyValue and PubSub operations
through native gRPC, REST/JSON (HTTP/1.1 and h2c), SSE, gRPC-Web and gRPC-Web-text must give
identical results."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from google.protobuf import duration_pb2

from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import pubsub_pb2 as ps
from tests.clients import CallError
from tests.conftest import TRANSPORTS, open_session

KV = "/prism.v1.KeyValueService/"
PS = "/prism.v1.PubSubService/"

# What every transport must report, step by step.
EXPECTED_KV = [
    ("set", True),
    ("get", b"\x00\xffhello\n", True),
    ("exists", True),
    ("set-stale-etag", "ABORTED"),
    ("get-after-stale", b"\x00\xffhello\n"),
    ("cas", True),
    ("if-absent", "ALREADY_EXISTS"),
    ("ttl", True),
    ("batch-get", [("a", True), ("missing", False), ("unicode-ключ/🙂", True)]),
    ("scan", ["a", "b", "unicode-ключ/🙂"]),
    ("scan-page-2", ["unicode-ключ/🙂"]),
    ("delete", True),
    ("delete-again", False),
    ("get-missing", "NOT_FOUND"),
    ("no-session", "UNAUTHENTICATED"),
    ("wrong-pattern", "FAILED_PRECONDITION"),
]


async def kv_scenario(client, prefix: str) -> list[tuple]:
    token = await open_session(client, "kv")
    events_token = await open_session(client, "events")
    out: list[tuple] = []

    async def outcome(rpc: str, request, tok: str = token):
        try:
            return await client.call(rpc, request, tok)
        except CallError as exc:
            return exc.code

    value = b"\x00\xffhello\n"
    first = await client.call(KV + "Set", kv.SetRequest(key=f"{prefix}a", value=value), token)
    out.append(("set", bool(first.etag)))
    got = await client.call(KV + "Get", kv.GetRequest(key=f"{prefix}a"), token)
    out.append(("get", got.value, got.etag == first.etag))
    out.append(("exists", (await client.call(KV + "Exists", kv.ExistsRequest(key=f"{prefix}a"), token)).exists))
    out.append(("set-stale-etag", await outcome(KV + "Set", kv.SetRequest(key=f"{prefix}a", value=b"x", if_match="stale"))))
    out.append(("get-after-stale", (await client.call(KV + "Get", kv.GetRequest(key=f"{prefix}a"), token)).value))
    cas = await client.call(KV + "Set", kv.SetRequest(key=f"{prefix}b", value=b"1"), token)
    again = await client.call(KV + "Set", kv.SetRequest(key=f"{prefix}b", value=b"2", if_match=cas.etag), token)
    out.append(("cas", again.etag != cas.etag))
    out.append(("if-absent", await outcome(KV + "Set", kv.SetRequest(key=f"{prefix}b", value=b"3", if_absent=True))))
    await client.call(
        KV + "Set", kv.SetRequest(key=f"{prefix}unicode-ключ/🙂", value=b"u", ttl=duration_pb2.Duration(seconds=3600)), token
    )
    ttl = (await client.call(KV + "Get", kv.GetRequest(key=f"{prefix}unicode-ключ/🙂"), token)).ttl_remaining
    out.append(("ttl", 3500 < ttl.seconds <= 3600))
    batch = await client.call(
        KV + "BatchGet", kv.BatchGetRequest(keys=[f"{prefix}a", f"{prefix}missing", f"{prefix}unicode-ключ/🙂"]), token
    )
    out.append(("batch-get", [(r.key.removeprefix(prefix), r.found) for r in batch.results]))
    page = await client.call(KV + "Scan", kv.ScanRequest(prefix=prefix, page_size=2), token)
    page2 = await client.call(KV + "Scan", kv.ScanRequest(prefix=prefix, page_size=2, page_token=page.next_page_token), token)
    out.append(("scan", [i.key.removeprefix(prefix) for i in [*page.items, *page2.items]]))
    out.append(("scan-page-2", [i.key.removeprefix(prefix) for i in page2.items]))
    out.append(("delete", (await client.call(KV + "Delete", kv.DeleteRequest(key=f"{prefix}a"), token)).existed))
    out.append(("delete-again", (await client.call(KV + "Delete", kv.DeleteRequest(key=f"{prefix}a"), token)).existed))
    out.append(("get-missing", await outcome(KV + "Get", kv.GetRequest(key=f"{prefix}a"))))
    out.append(("no-session", await outcome(KV + "Get", kv.GetRequest(key=f"{prefix}b"), "")))
    out.append(("wrong-pattern", await outcome(KV + "Get", kv.GetRequest(key=f"{prefix}b"), events_token)))
    return out


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_keyvalue_scenario_is_identical_on_every_transport(gateway, client_factory, transport):
    client = client_factory(transport, gateway)
    transcript = await kv_scenario(client, f"{transport}-{uuid.uuid4().hex[:6]}/")
    assert transcript == EXPECTED_KV


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_pubsub_stream_is_identical_on_every_transport(gateway, client_factory, transport):
    """Subscribe with a wildcard over the transport's streaming form (gRPC stream, SSE,
    gRPC-Web stream), publish over REST, receive, unsubscribe, and see the stream end."""
    client = client_factory(transport, gateway)
    publisher = client_factory("rest", gateway)
    token = await open_session(client, "events")
    publisher_token = await open_session(publisher, "events")
    root = f"t{uuid.uuid4().hex[:8]}"

    stream = client.stream(PS + "Subscribe", ps.PubSubSubscribeRequest(subject=f"{root}.*.created"), token)
    opened = await asyncio.wait_for(anext(stream), 10)
    assert opened.subscription_id and not opened.HasField("message")

    for subject, data in [(f"{root}.user.created", b"\x01u"), (f"{root}.user.deleted", b"skip"), (f"{root}.order.created", b"o")]:
        await publisher.call(PS + "Publish", ps.PubSubPublishRequest(subject=subject, data=data), publisher_token)
    received = [await asyncio.wait_for(anext(stream), 10) for _ in range(2)]
    assert [(r.message.subject, r.message.data) for r in received] == [
        (f"{root}.user.created", b"\x01u"),
        (f"{root}.order.created", b"o"),
    ]
    assert all(r.subscription_id == opened.subscription_id and r.message.message_id for r in received)

    await publisher.call(PS + "Unsubscribe", ps.UnsubscribeRequest(subscription_id=opened.subscription_id), token)
    with pytest.raises(StopAsyncIteration):
        await asyncio.wait_for(anext(stream), 10)


@pytest.mark.parametrize("transport", TRANSPORTS)
async def test_stream_refused_before_it_starts(gateway, client_factory, transport):
    """An invalid pattern is refused with INVALID_ARGUMENT (HTTP 400 for SSE), not a stream."""
    client = client_factory(transport, gateway)
    token = await open_session(client, "events")
    with pytest.raises(CallError) as refused:
        await anext(client.stream(PS + "Subscribe", ps.PubSubSubscribeRequest(subject="a.>.b"), token))
    assert refused.value.code == "INVALID_ARGUMENT"
    assert "'>' must be the last token" in refused.value.message
    if transport.startswith("rest"):
        assert refused.value.http_status == 400


async def test_sse_sends_ids_and_keep_alive_comments(tmp_path):
    """Idle SSE streams get `: ping` comments; events carry increasing ids."""
    import httpx

    from tests.gateway_process import start_gateway

    gateway = start_gateway(tmp_path, env={"PRISM_LIMITS__SSE_PING_SECONDS": "0.2"})
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            token = (await http.post("/v1/sessions", json={"configName": "events"})).json()["token"]
            lines: list[str] = []
            async with http.stream("GET", f"/v1/subjects/idle.>:subscribe?prism_session={token}") as response:
                assert response.headers["content-type"].startswith("text/event-stream")
                async for line in response.aiter_lines():
                    lines.append(line)
                    if sum(line.startswith(": ping") for line in lines) >= 2:
                        break
        assert "id: 1" in lines and "event: message" in lines
    finally:
        gateway.stop()
