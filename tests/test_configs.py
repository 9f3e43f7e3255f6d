"""ConfigService and inline configurations: a bad configuration is refused naming the field."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.protobuf import json_format

from prism.v1 import config_pb2, keyvalue_pb2, session_pb2
from tests.clients import CallError, GrpcClient, RestClient
from tests.gateway_process import GatewayProcess, start_gateway

CONFIG = """
backends:
  local: {type: sqlite}
  scratch: {type: memory}
configs:
  - {name: kv, pattern: KEY_VALUE, backend: local}
namespaces: [{name: default}, {name: team-a}]
max_rate_limit_rps: 1000
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("configs"), config_yaml=CONFIG)
    yield process
    process.stop()


def config(**fields) -> config_pb2.ClientConfig:
    return json_format.ParseDict(fields, config_pb2.ClientConfig())


GOOD = {"name": "mine", "pattern": "ACCESS_PATTERN_KEY_VALUE", "backend": {"type": "BACKEND_TYPE_SQLITE"}, "namespace": "team-a"}
BAD = [
    ({**GOOD, "pattern": "ACCESS_PATTERN_PUBSUB"}, "backend.type", "cannot serve PUBSUB"),
    ({**GOOD, "backend": {"type": "BACKEND_TYPE_POSTGRES"}}, "backend.type", "no BACKEND_TYPE_POSTGRES backend"),
    ({**GOOD, "backend": {"instance": "nowhere"}}, "backend.instance", "no backend named 'nowhere'"),
    ({**GOOD, "backend": {"instance": "scratch", "options": {"requires": "durable"}}}, "backend.options.requires", "lacks durable"),
    ({**GOOD, "namespace": "team-z"}, "namespace", "unknown namespace 'team-z'"),
    ({**GOOD, "rateLimit": {"requestsPerSecond": 0, "burst": 5}}, "rateLimit.requestsPerSecond", "must be positive"),
    ({**GOOD, "rateLimit": {"requestsPerSecond": 10, "burst": 0}}, "rateLimit.burst", "at least 1"),
    ({**GOOD, "rateLimit": {"requestsPerSecond": 5000, "burst": 5}}, "rateLimit.requestsPerSecond", "above the server's cap"),
    ({**GOOD, "name": "Bad Name"}, "name", "is not a name"),
    ({**GOOD, "pattern": "ACCESS_PATTERN_UNSPECIFIED"}, "pattern", "is required"),
    # Numbers the contract does not define: legal on the wire, refused by name (once a 500).
    ({**GOOD, "pattern": 99}, "pattern", "99 is not an access pattern"),
    ({**GOOD, "backend": {"type": -58800}}, "backend.type", "-58800 is not a backend type"),
    ({**GOOD, "consistency": {"level": 42}}, "consistency.level", "42 is not a consistency level"),
]


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_validate_names_each_bad_field(gateway, transport: str) -> None:
    client = GrpcClient(gateway.grpc_target) if transport == "grpc" else RestClient(gateway.base_url)
    try:
        ok = await client.call("/prism.v1.ConfigService/ValidateConfig", config_pb2.ValidateConfigRequest(config=config(**GOOD)))
        assert ok.valid and not ok.violations
        for fields, field, fragment in BAD:
            answer = await client.call("/prism.v1.ConfigService/ValidateConfig", config_pb2.ValidateConfigRequest(config=config(**fields)))
            assert not answer.valid
            assert any(v.field == field and fragment in v.description for v in answer.violations), (fields, answer)
    finally:
        await client.close()


@pytest.mark.parametrize("transport", ["grpc", "rest"])
async def test_register_then_open_a_session_by_name_and_inline(gateway, transport: str) -> None:
    client = GrpcClient(gateway.grpc_target) if transport == "grpc" else RestClient(gateway.base_url)
    name = f"registered-{transport}"
    try:
        registered = await client.call(
            "/prism.v1.ConfigService/RegisterConfig", config_pb2.RegisterConfigRequest(config=config(**{**GOOD, "name": name}))
        )
        assert registered.config.backend.instance == "local"  # completed from the type
        listed = await client.call("/prism.v1.ConfigService/ListConfigs", config_pb2.ListConfigsRequest())
        assert name in {c.name for c in listed.configs}
        with pytest.raises(CallError) as twice:
            await client.call("/prism.v1.ConfigService/RegisterConfig", config_pb2.RegisterConfigRequest(config=config(**{**GOOD, "name": name})))
        assert twice.value.code == "ALREADY_EXISTS"
        by_name = await client.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=name))
        inline = await client.call(
            "/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config=config(**{**GOOD, "name": "inline"}))
        )
        await client.call("/prism.v1.KeyValueService/Set", keyvalue_pb2.SetRequest(key="shared", value=b"1"), by_name.token)
        seen = await client.call("/prism.v1.KeyValueService/Get", keyvalue_pb2.GetRequest(key="shared"), inline.token)
        assert seen.value == b"1"  # same namespace, same backend
        with pytest.raises(CallError) as bad_inline:
            await client.call(
                "/prism.v1.SessionService/CreateSession",
                session_pb2.CreateSessionRequest(config=config(**{**GOOD, "namespace": "team-z"})),
            )
        assert bad_inline.value.code == "INVALID_ARGUMENT" and "config.namespace" in bad_inline.value.message
    finally:
        await client.close()
