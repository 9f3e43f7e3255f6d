"""Every method of the method table is authorized by the one authorization step.

Generated from the table, so a method added later is covered without editing this file: an
identity granted nothing (beyond opening sessions) is refused with PERMISSION_DENIED by every
implemented method but the public probes, and a method the step could not place in a
namespace stops the gateway at start-up.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from google.api import field_behavior_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from app.auth import hash_key
from app.methods import Method, all_methods, bind
from app.pipeline import PUBLIC_SERVICES, policy_gaps
from prism.v1 import config_pb2, session_pb2
from tests.clients import CallError, GrpcClient
from tests.gateway_process import GatewayProcess, start_gateway

OPENER_KEY = "prism_opener-key-0123456789abcdef"
NOBODY_KEY = "prism_nobody-key-0123456789abcdef"
# Requests the generic filling cannot make valid (a config that exists, a valid config).
REQUESTS: dict[str, Message] = {
    "/prism.v1.SessionService/CreateSession": session_pb2.CreateSessionRequest(config_name="kv"),
    "/prism.v1.ConfigService/GetConfig": config_pb2.GetConfigRequest(name="kv"),
    "/prism.v1.ConfigService/RegisterConfig": config_pb2.RegisterConfigRequest(
        config=config_pb2.ClientConfig(
            name="new", pattern=config_pb2.ACCESS_PATTERN_KEY_VALUE, namespace="locked",
            backend=config_pb2.BackendConfig(instance="mem"),
        )
    ),
}
# The session each access pattern's methods are called in.
SESSION_CONFIGS = {
    config_pb2.ACCESS_PATTERN_KEY_VALUE: "kv",
    config_pb2.ACCESS_PATTERN_PUBSUB: "events",
    config_pb2.ACCESS_PATTERN_QUEUE: "queue",
    config_pb2.ACCESS_PATTERN_READER: "reader",
    config_pb2.ACCESS_PATTERN_TRANSACT: "transact",
}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    config = f"""
backends:
  mem: {{type: memory}}
  lite: {{type: sqlite}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: mem, namespace: locked}}
  - {{name: events, pattern: PUBSUB, backend: mem, namespace: locked}}
  - {{name: queue, pattern: QUEUE, backend: lite, namespace: locked}}
  - {{name: reader, pattern: READER, backend: lite, namespace: locked}}
  - {{name: transact, pattern: TRANSACT, backend: lite, namespace: locked}}
transact:
  locked: {{backend: lite, tables: {{orders: {{key: [id], columns: [id], create: true}}}}}}
reader:
  collections: {{locked: {{items: {{table: items, key: [id], fields: [id]}}}}}}
namespaces:
  - {{name: locked}}
auth:
  api_keys:
    - {{identity: opener, sha256: {hash_key(OPENER_KEY)}, roles: [opener]}}
    - {{identity: nobody, sha256: {hash_key(NOBODY_KEY)}, roles: []}}
policies:
  - {{role: opener, namespaces: [locked], operations: ["SESSION.CreateSession"]}}
"""
    process = start_gateway(tmp_path_factory.mktemp("authz-coverage"), "hypercorn", config_yaml=config)
    yield process
    process.stop()


def _filled(message: Message) -> Message:
    """``message`` with every REQUIRED field given a plausible value, so the call gets past
    the request checks to authorization."""
    for field in message.DESCRIPTOR.fields:
        if field_behavior_pb2.REQUIRED not in field.GetOptions().Extensions[field_behavior_pb2.field_behavior]:
            continue
        if field.type == FieldDescriptor.TYPE_MESSAGE:
            target = getattr(message, field.name).add() if field.is_repeated else getattr(message, field.name)
            _filled(target)
            if not field.is_repeated:
                target.SetInParent()
        elif field.type == FieldDescriptor.TYPE_ENUM:
            value = field.enum_type.values[-1].number
            getattr(message, field.name).append(value) if field.is_repeated else setattr(message, field.name, value)
        elif field.type == FieldDescriptor.TYPE_STRING:
            getattr(message, field.name).append("x.y") if field.is_repeated else setattr(message, field.name, "x.y")
        elif field.type == FieldDescriptor.TYPE_BYTES:
            getattr(message, field.name).append(b"x") if field.is_repeated else setattr(message, field.name, b"x")
        else:
            getattr(message, field.name).append(1) if field.is_repeated else setattr(message, field.name, 1)
    return message


def _implemented() -> list[Method]:
    from app.gateway import Gateway
    from app.settings import load_settings

    # A secret key in the settings: building the gateway then writes nothing to disk.
    gateway = Gateway(load_settings(environ={"PRISM_SECRET_KEY": "k" * 32}))
    return [m for m in gateway.methods if m.handler is not None]


def test_every_bound_method_has_a_policy_path() -> None:
    assert policy_gaps(_implemented()) == []


def test_a_method_without_a_policy_path_fails_the_check() -> None:
    class Unscoped:
        SERVICE = "prism.v1.ConfigService"

        async def ListConfigs(self, request: Message, call: object) -> Message:  # no scope declared
            return config_pb2.ListConfigsResponse()

    methods = bind(all_methods(), [Unscoped()])
    assert policy_gaps(methods) == ["/prism.v1.ConfigService/ListConfigs"]


@pytest.mark.parametrize(
    "method", [m for m in _implemented() if m.service not in PUBLIC_SERVICES], ids=lambda m: m.path
)
async def test_an_identity_granted_nothing_is_refused(gateway: GatewayProcess, method: Method) -> None:
    """Session-less methods are called with a key granted nothing; session-bound ones in a
    session opened by a key granted only CreateSession."""
    nobody = GrpcClient(gateway.grpc_target, metadata={"x-api-key": NOBODY_KEY})
    opener = GrpcClient(gateway.grpc_target, metadata={"x-api-key": OPENER_KEY})
    try:
        token = ""
        if method.requires_session:
            config = SESSION_CONFIGS.get(method.pattern, "kv")
            created = await opener.call(
                "/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config)
            )
            token = created.token  # type: ignore[attr-defined]
        request = REQUESTS.get(method.path) or _filled(method.request_type())
        with pytest.raises(CallError) as refused:
            if method.server_streaming:
                async for _ in nobody.stream(method.path, request, token):
                    break
            else:
                await nobody.call(method.path, request, token)
        assert refused.value.code == "PERMISSION_DENIED", refused.value
    finally:
        await nobody.close()
        await opener.close()


async def test_the_public_probes_answer_anyone(gateway: GatewayProcess) -> None:
    from prism.v1 import plugin_pb2

    anyone = GrpcClient(gateway.grpc_target)
    try:
        assert (await anyone.call("/prism.v1.HealthService/Live", plugin_pb2.LiveRequest())).live  # type: ignore[attr-defined]
    finally:
        await anyone.close()
