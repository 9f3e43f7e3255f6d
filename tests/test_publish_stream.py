"""PubSubService/PublishStream, the contract's client-streaming method, with grpcio on both
native gRPC paths (the grpc.aio port and the ASGI app on the HTTP port): one answer for the
stream, every message published in order, a bad message refused by its place with the ones
before it kept, the rate limit counted per message, and a refusal at the start when the
stream has no session. (grpc-js: tests/test_js_clients.py.)"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import grpc
import pytest

from prism.v1 import pubsub_pb2 as ps
from prism.v1 import session_pb2
from tests.gateway_process import GatewayProcess, start_gateway

CONFIG = """
backends:
  memory: {type: memory}
configs:
  - {name: events, pattern: PUBSUB, backend: memory}
  - {name: slow, pattern: PUBSUB, backend: memory, namespace: slow}
namespaces:
  - {name: default}
  - {name: slow, rate_limit: {requests_per_second: 0.01, burst: 2}}
"""


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    process = start_gateway(tmp_path_factory.mktemp("publish-stream"), "hypercorn", config_yaml=CONFIG)
    yield process
    process.stop()


@pytest.fixture(params=["grpc-port", "http-port"])
def target(request: pytest.FixtureRequest, gateway: GatewayProcess) -> str:
    return gateway.grpc_target if request.param == "grpc-port" else f"127.0.0.1:{gateway.http_port}"


class Stubs:
    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.create = channel.unary_unary(
            "/prism.v1.SessionService/CreateSession",
            request_serializer=session_pb2.CreateSessionRequest.SerializeToString,
            response_deserializer=session_pb2.CreateSessionResponse.FromString,
        )
        self.subscribe = channel.unary_stream(
            "/prism.v1.PubSubService/Subscribe",
            request_serializer=ps.PubSubSubscribeRequest.SerializeToString,
            response_deserializer=ps.PubSubSubscribeResponse.FromString,
        )
        self.publish_stream = channel.stream_unary(
            "/prism.v1.PubSubService/PublishStream",
            request_serializer=ps.PubSubPublishRequest.SerializeToString,
            response_deserializer=ps.PublishStreamResponse.FromString,
        )

    async def session(self, config: str) -> tuple[tuple[str, str]]:
        token = (await self.create(session_pb2.CreateSessionRequest(config_name=config))).token
        return (("x-prism-session", token),)


async def messages(*subjects: str) -> AsyncIterator[ps.PubSubPublishRequest]:
    for subject in subjects:
        yield ps.PubSubPublishRequest(subject=subject, data=subject.encode(), headers={"n": subject[-1]})


async def test_a_stream_of_publishes_is_delivered_in_order_and_answered_once(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stubs = Stubs(channel)
        metadata = await stubs.session("events")
        deliveries = stubs.subscribe(ps.PubSubSubscribeRequest(subject="stream.>"), metadata=metadata)
        await deliveries.read()  # live
        subjects = [f"stream.m.{i}" for i in range(50)]
        answer = await stubs.publish_stream(messages(*subjects), metadata=metadata)
        got = [(await asyncio.wait_for(deliveries.read(), 10)).message for _ in subjects]
        deliveries.cancel()
    assert answer.published == 50
    assert [m.subject for m in got] == subjects
    assert [m.data for m in got] == [s.encode() for s in subjects] and got[7].headers["n"] == "7"
    assert answer.last_message_id == got[-1].message_id


async def test_a_bad_message_ends_the_stream_naming_its_place(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stubs = Stubs(channel)
        metadata = await stubs.session("events")
        deliveries = stubs.subscribe(ps.PubSubSubscribeRequest(subject="bad.>"), metadata=metadata)
        await deliveries.read()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await stubs.publish_stream(messages("bad.a", "bad.b", "bad.*", "bad.d"), metadata=metadata)
        kept = [(await asyncio.wait_for(deliveries.read(), 10)).message.subject for _ in range(2)]
        with pytest.raises(TimeoutError):  # nothing after the refused one
            await asyncio.wait_for(deliveries.read(), 0.5)
        deliveries.cancel()
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert refused.value.details().startswith("request[2].subject: 'bad.*': wildcards are not allowed")
    assert kept == ["bad.a", "bad.b"]


async def test_the_rate_limit_counts_each_message(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stubs = Stubs(channel)
        metadata = await stubs.session("slow")  # a burst of 2, then 0.01 per second
        with pytest.raises(grpc.aio.AioRpcError) as limited:
            await stubs.publish_stream(messages("s.a", "s.b", "s.c", "s.d"), metadata=metadata)
    assert limited.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_stream_without_a_session_is_refused_before_it_reads(target: str) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await Stubs(channel).publish_stream(messages("x.a"))
    assert refused.value.code() == grpc.StatusCode.UNAUTHENTICATED
