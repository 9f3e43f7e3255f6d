"""Tracing (app/tracing.py): a real gateway exporting its spans as JSON lines to a file.

A REST call and a native gRPC call, each sent with a W3C ``traceparent``, each produce a
SERVER span in the client's trace (the client's span its parent) with the pipeline's steps
(authenticate, execute) as its children; a Postgres-backed call records the
database call under ``execute``. Off by default: no span file, no spans.
"""

from __future__ import annotations

import json
import pathlib
import secrets
from typing import Any

import grpc
import httpx

from prism.v1 import keyvalue_pb2 as kv
from tests.gateway_process import start_gateway
from tests.servers import POSTGRES_DSN

STEPS = {"authenticate", "execute"}


def traceparent() -> tuple[str, str, str]:
    trace_id, span_id = secrets.token_hex(16), secrets.token_hex(8)
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def spans(path: pathlib.Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def tree(all_spans: list[dict[str, Any]], trace_id: str, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The server span called ``name`` in the trace, and every span below it."""
    in_trace = [s for s in all_spans if s["context"]["trace_id"] == f"0x{trace_id}"]
    (server,) = [s for s in in_trace if s["name"] == name and s["kind"] == "SpanKind.SERVER"]
    below, frontier = [], {server["context"]["span_id"]}
    while frontier:
        children = [s for s in in_trace if s["parent_id"] in frontier]
        below += children
        frontier = {s["context"]["span_id"] for s in children}
    return server, below


async def test_rest_and_grpc_calls_continue_the_client_trace_with_step_spans(tmp_path: pathlib.Path) -> None:
    span_file = tmp_path / "spans.jsonl"
    config = f"""
backends:
  sqlite: {{type: sqlite}}
  postgres: {{type: postgres, dsn: "{POSTGRES_DSN}"}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: sqlite}}
  - {{name: kv-pg, pattern: KEY_VALUE, backend: postgres}}
tracing: {{exporter: file, file: {span_file}}}
"""
    gateway = start_gateway(tmp_path, "hypercorn", config_yaml=config)
    rest_parent, rest_trace, rest_span = traceparent()
    grpc_parent, grpc_trace, grpc_span = traceparent()
    pg_parent, pg_trace, _ = traceparent()
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            token = (await http.post("/v1/sessions", json={"configName": "kv"})).json()["token"]
            pg_token = (await http.post("/v1/sessions", json={"configName": "kv-pg"})).json()["token"]
            headers = {"x-prism-session": token, "traceparent": rest_parent}
            assert (await http.put("/v1/kv/traced", json={"value": "dg=="}, headers=headers)).status_code == 200
            headers = {"x-prism-session": pg_token, "traceparent": pg_parent}
            assert (await http.put("/v1/kv/traced", json={"value": "dg=="}, headers=headers)).status_code == 200
        async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
            get = channel.unary_unary(
                "/prism.v1.KeyValueService/Get",
                request_serializer=kv.GetRequest.SerializeToString,
                response_deserializer=kv.GetResponse.FromString,
            )
            metadata = (("x-prism-session", token), ("traceparent", grpc_parent))
            assert (await get(kv.GetRequest(key="traced"), metadata=metadata)).value == b"v"
    finally:
        gateway.stop()  # flushes the batch processor
    exported = spans(span_file)

    server, below = tree(exported, rest_trace, "prism.v1.KeyValueService/Set")
    assert server["parent_id"] == f"0x{rest_span}", "the client's span is the parent"
    assert server["attributes"]["prism.transport"] == "rest" and server["attributes"]["rpc.grpc.status_code"] == "OK"
    assert {s["name"] for s in below if s["parent_id"] == server["context"]["span_id"]} == STEPS

    server, below = tree(exported, grpc_trace, "prism.v1.KeyValueService/Get")
    assert server["parent_id"] == f"0x{grpc_span}"
    assert server["attributes"]["prism.transport"] == "grpc"
    assert {s["name"] for s in below if s["parent_id"] == server["context"]["span_id"]} == STEPS

    server, below = tree(exported, pg_trace, "prism.v1.KeyValueService/Set")
    (execute,) = [s for s in below if s["name"] == "execute"]
    database = [s for s in below if s["parent_id"] == execute["context"]["span_id"]]
    assert database and all(s["attributes"].get("db.system") == "postgresql" for s in database), database


def test_tracing_is_off_by_default(tmp_path: pathlib.Path) -> None:
    gateway = start_gateway(tmp_path, "hypercorn")
    try:
        parent, _, _ = traceparent()
        response = httpx.post(f"{gateway.base_url}/v1/sessions", json={"configName": "kv"}, headers={"traceparent": parent})
        assert response.status_code == 200
    finally:
        gateway.stop()
    assert not list(tmp_path.rglob("*.jsonl"))


async def test_a_queue_message_carries_the_trace_to_its_consumer(tmp_path: pathlib.Path) -> None:
    """Publish over REST inside a client trace; the message a gRPC subscriber receives carries
    that trace in its headers, and its delivery is a CONSUMER span in the publisher's trace."""
    from prism.v1 import queue_pb2 as q

    span_file = tmp_path / "spans.jsonl"
    config = f"""
backends:
  sqlite: {{type: sqlite}}
configs:
  - {{name: queue, pattern: QUEUE, backend: sqlite}}
tracing: {{exporter: file, file: {span_file}}}
"""
    gateway = start_gateway(tmp_path, "hypercorn", config_yaml=config)
    parent, trace_id, _ = traceparent()
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            token = (await http.post("/v1/sessions", json={"configName": "queue"})).json()["token"]
            headers = {"x-prism-session": token, "traceparent": parent}
            body = {"entry": {"payload": "dg==", "partitionKey": "k"}}
            assert (await http.post("/v1/topics/traced:publish", json=body, headers=headers)).status_code == 200
        async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
            subscribe = channel.unary_stream(
                "/prism.v1.QueueService/Subscribe",
                request_serializer=q.QueueSubscribeRequest.SerializeToString,
                response_deserializer=q.QueueMessage.FromString,
            )
            request = q.QueueSubscribeRequest(topic="traced", consumer_group="g", start=q.START_POSITION_EARLIEST)
            stream = subscribe(request, metadata=(("x-prism-session", token),), timeout=10)
            message = await stream.read()
            stream.cancel()
    finally:
        gateway.stop()
    assert message.headers["traceparent"].split("-")[1] == trace_id, message.headers
    exported = spans(span_file)
    publish, _ = tree(exported, trace_id, "prism.v1.QueueService/Publish")
    (received,) = [s for s in exported if s["name"] == "traced receive"]
    assert received["kind"] == "SpanKind.CONSUMER" and received["context"]["trace_id"] == f"0x{trace_id}"
    in_publish = {s["context"]["span_id"] for s in [publish, *tree(exported, trace_id, "prism.v1.QueueService/Publish")[1]]}
    assert received["parent_id"] in in_publish, "the delivery continues the publish's trace"


def test_an_unsampled_call_makes_no_step_spans_a_sampled_parent_s_does() -> None:
    """Step spans cost as much to start unsampled as sampled: under a call the sampler left out
    there are none; a client's sampled traceparent still gets them at sample_ratio 0."""
    from app.tracing import NOT_RECORDED, Tracing, TracingSettings

    tracing = Tracing(TracingSettings(exporter="discard", sample_ratio=0.0))
    try:
        unsampled = tracing.server_span("/p.S/M", "p.S", "M", "grpc", {})
        with tracing.current(unsampled):
            assert tracing.step("execute") is NOT_RECORDED
        sampled_parent = {"traceparent": "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}
        sampled = tracing.server_span("/p.S/M", "p.S", "M", "grpc", sampled_parent)
        with tracing.current(sampled), tracing.step("execute") as step:
            assert step is not NOT_RECORDED and step.is_recording()
    finally:
        tracing.shutdown()
