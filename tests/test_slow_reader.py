"""A server stream to a client that reads slowly: the gateway's memory stays flat.

PubSub: 5,000 messages are published (over REST) to a subject a native gRPC client subscribes to and
reads at 50 a second. Between the client and the broker sit HTTP/2 flow control
(the server's ``send`` waits for the client's window; grpcio clients also buffer what their
window admits) and the subscription's bounded buffer, which ends the subscription with
RESOURCE_EXHAUSTED once the reader falls that far behind: nothing in the gateway grows with
the number of messages. Measured as the worker's RSS from /proc, on every
path that serves native gRPC: the grpc.aio port, and the ASGI app under Hypercorn and pyvoy.

Queue: 100,000 messages stream to one subscriber that reads in bursts and acknowledges as it
goes. The subscription leases at most ``maxInFlight`` messages ahead of the acknowledgements
and the transport's send waits on HTTP/2 flow control, so nothing in the gateway grows with
the length of the stream; every message arrives.
"""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import httpx
import pytest

from prism.v1 import pubsub_pb2 as ps
from prism.v1 import queue_pb2 as q
from tests.gateway_process import GatewayProcess, start_gateway

MESSAGES = 5_000
QUEUE_MESSAGES = 100_000
BATCH = 1_000
CONCURRENT = 20
PAYLOAD = "eA==" * 64  # 192 bytes a message


def rss_mb(gateway: GatewayProcess) -> float:
    """The gateway worker's resident memory: the server process or its worker child, whichever
    holds more (Hypercorn and pyvoy serve in the process prism serve starts, or a child)."""
    pids = [gateway.process.pid]
    children = pathlib.Path(f"/proc/{gateway.process.pid}/task/{gateway.process.pid}/children")
    if children.exists():
        pids += [int(p) for p in children.read_text().split()]
    sizes = []
    for pid in pids:
        for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                sizes.append(int(line.split()[1]) / 1024)
    return max(sizes)


@pytest.mark.parametrize(("server", "port"), [("granian", "grpc"), ("hypercorn", "http"), ("pyvoy", "http")])
async def test_a_slow_reader_keeps_memory_flat(tmp_path: pathlib.Path, server: str, port: str) -> None:
    gateway = start_gateway(tmp_path, server)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
            token = (await http.post("/v1/sessions", json={"configName": "events"})).json()["token"]
            session = {"x-prism-session": token}
            target = gateway.grpc_target if port == "grpc" else f"127.0.0.1:{gateway.http_port}"
            async with grpc.aio.insecure_channel(target) as channel:
                subscribe = channel.unary_stream(
                    "/prism.v1.PubSubService/Subscribe",
                    request_serializer=ps.PubSubSubscribeRequest.SerializeToString,
                    response_deserializer=ps.PubSubSubscribeResponse.FromString,
                )
                stream = subscribe(ps.PubSubSubscribeRequest(subject="flood.*"), metadata=tuple(session.items()))
                await stream.read()  # subscribed
                before = rss_mb(gateway)
                received, ended = 0, None

                async def read_slowly() -> None:
                    nonlocal received, ended
                    try:
                        while (await stream.read()) is not grpc.aio.EOF:
                            received += 1
                            await asyncio.sleep(0.02)  # 50 messages a second
                    except grpc.aio.AioRpcError as exc:
                        ended = exc.code()

                reader = asyncio.create_task(read_slowly())
                peak, published = before, 0
                while ended is None and published < MESSAGES:
                    await asyncio.gather(
                        *(
                            http.post("/v1/subjects/flood.x:publish", json={"data": PAYLOAD}, headers=session)
                            for _ in range(CONCURRENT)
                        )
                    )
                    published += CONCURRENT
                    if published % 1_000 == 0:
                        peak = max(peak, rss_mb(gateway))
                        await asyncio.sleep(0)  # let the reader see its end
                peak = max(peak, rss_mb(gateway))
                stream.cancel()
                await asyncio.gather(reader, return_exceptions=True)  # cancelled if still reading
        # Either the subscription's buffer filled (RESOURCE_EXHAUSTED) or flow control kept the
        # rest with the client; never the gateway.
        assert ended in (None, grpc.StatusCode.RESOURCE_EXHAUSTED), (ended, received)
        assert received < published, "the reader was meant to fall behind"
        assert peak - before < 50, f"RSS grew from {before:.0f} to {peak:.0f} MB"
    finally:
        gateway.stop()


@pytest.mark.parametrize(("server", "port"), [("granian", "grpc"), ("pyvoy", "http")])
async def test_a_hundred_thousand_queue_messages_to_a_slow_reader(tmp_path: pathlib.Path, server: str, port: str) -> None:
    gateway = start_gateway(tmp_path, server)
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=30) as http:
            token = (await http.post("/v1/sessions", json={"configName": "queue"})).json()["token"]
        metadata = (("x-prism-session", token),)
        target = gateway.grpc_target if port == "grpc" else f"127.0.0.1:{gateway.http_port}"
        async with grpc.aio.insecure_channel(target) as channel:
            publish = channel.unary_unary(
                "/prism.v1.QueueService/PublishBatch",
                request_serializer=q.PublishBatchRequest.SerializeToString,
                response_deserializer=q.PublishBatchResponse.FromString,
            )
            acknowledge = channel.unary_unary(
                "/prism.v1.QueueService/Acknowledge",
                request_serializer=q.AcknowledgeRequest.SerializeToString,
                response_deserializer=q.AcknowledgeResponse.FromString,
            )
            subscribe = channel.unary_stream(
                "/prism.v1.QueueService/Subscribe",
                request_serializer=q.QueueSubscribeRequest.SerializeToString,
                response_deserializer=q.QueueMessage.FromString,
            )
            entries = [q.QueueEntry(payload=b"x" * 192) for _ in range(BATCH)]
            for _ in range(QUEUE_MESSAGES // BATCH):
                results = (await publish(q.PublishBatchRequest(topic="flood", entries=entries), metadata=metadata)).results
                assert all(r.status.code == 0 for r in results)
            before = peak = rss_mb(gateway)
            request = q.QueueSubscribeRequest(
                topic="flood", consumer_group="slow", start=q.START_POSITION_EARLIEST, max_in_flight=BATCH
            )
            stream = subscribe(request, metadata=metadata)
            seen: set[str] = set()
            pending: list[str] = []
            while len(seen) < QUEUE_MESSAGES:
                message = await asyncio.wait_for(stream.read(), 30)
                assert message is not grpc.aio.EOF
                seen.add(message.message_id)
                pending.append(message.message_id)
                if len(pending) == BATCH // 2:  # a burst read: acknowledge it, then dawdle
                    await acknowledge(q.AcknowledgeRequest(topic="flood", consumer_group="slow", message_ids=pending), metadata=metadata)
                    pending = []
                    if len(seen) % 10_000 == 0:
                        peak = max(peak, rss_mb(gateway))
                        await asyncio.sleep(0.05)
            peak = max(peak, rss_mb(gateway))
            stream.cancel()
        assert len(seen) == QUEUE_MESSAGES
        assert peak - before < 50, f"RSS grew from {before:.0f} to {peak:.0f} MB over {QUEUE_MESSAGES} messages"
        print(f"{server}/{port}: RSS {before:.0f} → peak {peak:.0f} MB over {QUEUE_MESSAGES} messages")
    finally:
        gateway.stop()
