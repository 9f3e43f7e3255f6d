"""A server stream to a client that reads slowly: the gateway's memory stays flat.

5,000 messages are published (over REST) to a subject a native gRPC client subscribes to and
reads at 50 a second. Between the client and the broker sit HTTP/2 flow control
(the server's ``send`` waits for the client's window; grpcio clients also buffer what their
window admits) and the subscription's bounded buffer, which ends the subscription with
RESOURCE_EXHAUSTED once the reader falls that far behind: nothing in the gateway grows with
the number of messages. Measured as the worker's RSS from /proc, on every
path that serves native gRPC: the grpc.aio port, and the ASGI app under Hypercorn and pyvoy.
"""

from __future__ import annotations

import asyncio
import pathlib

import grpc
import httpx
import pytest

from prism.v1 import pubsub_pb2 as ps
from tests.gateway_process import GatewayProcess, start_gateway

MESSAGES = 5_000
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
