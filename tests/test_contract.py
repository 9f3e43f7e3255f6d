"""The proto is the contract: the committed generated code must match it exactly."""

from __future__ import annotations

import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "proto"))

import generate  # noqa: E402  (proto/generate.py)


def test_generated_code_matches_the_proto(tmp_path: pathlib.Path) -> None:
    generate.generate(tmp_path)
    fresh = {p.relative_to(tmp_path): p.read_bytes() for p in tmp_path.rglob("*.py*")}
    committed = {
        p.relative_to(ROOT / "proto"): p.read_bytes()
        for p in (ROOT / "proto" / "prism" / "v1").glob("*_pb2*.py*")
    }
    assert fresh.keys() == committed.keys(), "generated files differ: run `make proto`"
    stale = sorted(str(name) for name in fresh if fresh[name] != committed[name])
    assert not stale, f"generated code is out of date with the proto: {stale}; run `make proto`"


def test_every_service_of_the_rfc_is_in_the_contract() -> None:
    from app.methods import all_methods

    rpcs = {m.path for m in all_methods()}
    for service, names in {
        "SessionService": ["CreateSession", "GetSession", "Heartbeat", "CloseSession"],
        "ConfigService": ["ListConfigs", "GetConfig", "RegisterConfig", "ValidateConfig"],
        "KeyValueService": ["Get", "Set", "Delete", "Exists", "BatchGet", "BatchSet", "BatchDelete", "Scan"],
        "QueueService": ["Publish", "PublishBatch", "Subscribe", "SubscribeBatches", "Acknowledge", "Nack", "Commit", "Seek", "GetTopicInfo"],
        "PubSubService": ["Publish", "Subscribe", "SubscribeBatches", "Unsubscribe"],
        "ReaderService": ["Read", "Query", "Count"],
        "TransactService": ["Write", "Transaction"],
        "HealthService": ["Live", "Ready"],
        "MetricsService": ["GetMetrics"],
        "PluginInfoService": ["GetInfo"],
    }.items():
        for name in names:
            assert f"/prism.v1.{service}/{name}" in rpcs


def test_every_unary_rpc_has_a_rest_route_and_streams_have_sse() -> None:
    from app.methods import all_methods

    for method in all_methods():
        if method.client_streaming:
            assert method.http is None  # gRPC only: HTTP cannot stream requests
        else:
            assert method.http is not None and method.http.template.startswith("/v1/"), method.path


def test_pii_option_is_declared_and_used() -> None:
    from prism.v1 import options_pb2, session_pb2

    identity = session_pb2.Session.DESCRIPTOR.fields_by_name["identity"]
    assert identity.GetOptions().Extensions[options_pb2.pii] == "identity"
