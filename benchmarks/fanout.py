"""PubSub fan-out, 1 publisher → N subscribers, run in its own process. Prints one JSON object.

    python -m benchmarks.fanout --transport grpc --grpc-port 8980 --subscribers 100 --messages 2000
    python -m benchmarks.fanout --transport sse --http-port 8080 --grpc-port 8980 ...
    python -m benchmarks.fanout --transport inprocess ...   (MemoryPubSub used directly)

Every subscription must have delivered its first message (``subscription_id`` only: it is
live) before anything is published. The publisher (gRPC unary Publish, the same for both
stream transports) keeps at most ``--window`` messages ahead of the slowest subscriber, below
the gateway's per-stream buffer (limits.stream_buffer, 1024 by default), so what is measured
is sustained delivery rather than how fast a burst overflows the buffers; ``--window 0``
publishes flat out and shows what is lost when subscribers fall behind. Deliveries are
counted without decoding them (the client's CPU is part of the 2 cores too); the first
message of each stream is decoded and checked.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import time
from collections.abc import Awaitable, Callable

import uvloop

SUBJECT = "bench.fanout"
STALL_SECONDS = 10.0  # no delivery for this long: stop and report what was lost


class Tally:
    def __init__(self, subscribers: int) -> None:
        self.counts = [0] * subscribers
        self.cut = [False] * subscribers  # stream ended early (error): no longer waited for
        self.live = 0
        self.all_live = asyncio.Event()
        self.progress = asyncio.Event()
        self.errors: list[str] = []
        self.subscribers = subscribers

    def on_live(self) -> None:
        self.live += 1
        if self.live == self.subscribers:
            self.all_live.set()

    def delivered(self, index: int, n: int = 1) -> None:
        self.counts[index] += n
        self.progress.set()

    def failed(self, index: int, reason: str) -> None:
        if not self.cut[index]:
            self.cut[index] = True
            self.errors.append(reason)
            self.progress.set()

    def slowest(self) -> int | None:
        live = [c for c, cut in zip(self.counts, self.cut, strict=True) if not cut]
        return min(live) if live else None

    def total(self) -> int:
        return sum(self.counts)


# --- subscribers per transport ---------------------------------------------------------------


async def grpc_subscribers(args: argparse.Namespace, tally: Tally, token: str) -> list[asyncio.Task[None]]:
    import grpc

    from prism.v1 import pubsub_pb2

    request = pubsub_pb2.PubSubSubscribeRequest(subject=SUBJECT).SerializeToString()
    metadata = (("x-prism-session", token),)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") for _ in range(args.connections)]

    async def subscriber(index: int) -> None:
        stub = channels[index % len(channels)].unary_stream("/prism.v1.PubSubService/Subscribe")
        call = stub(request, metadata=metadata)
        first = True
        try:
            async for raw in call:
                if first:
                    head = pubsub_pb2.PubSubSubscribeResponse.FromString(raw)
                    if not head.subscription_id or head.HasField("message"):
                        raise RuntimeError(f"unexpected first message {head!r}")
                    first = False
                    tally.on_live()
                    continue
                tally.delivered(index)
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                tally.failed(index, f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # a wrong first message
            tally.failed(index, repr(exc))
        finally:
            call.cancel()

    return [asyncio.create_task(subscriber(i)) for i in range(args.subscribers)]


class _SSE(asyncio.Protocol):
    """One text/event-stream over HTTP/1.1; counts ``event: message`` without parsing JSON."""

    def __init__(self, index: int, tally: Tally) -> None:
        self.index, self.tally = index, tally
        self.head = b""
        self.in_body = False
        self.tail = b""
        self.seen = 0
        self.done = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        if not self.in_body:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return
            if not self.head.startswith(b"HTTP/1.1 200"):
                self._end(f"HTTP {self.head[:end]!r}")
                return
            self.in_body = True
            data, self.head = self.head[end + 4 :], b""
        text = self.tail + data
        n = text.count(b"event: message")
        if n:
            if self.seen == 0:
                self.tally.on_live()
            counted = n - (1 if self.seen == 0 else 0)
            self.seen += n
            if counted:
                self.tally.delivered(self.index, counted)
        if b"event: error" in text:
            found = re.search(rb'event: error\r?\ndata: (\{.*?\})', text)
            self._end(f"event: error {found[1].decode() if found else ''}")
        self.tail = text[-13:]  # shorter than the marker: no occurrence is counted twice

    def _end(self, reason: str) -> None:
        if not self.done.done():
            self.tally.failed(self.index, reason)
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_result(None)


async def sse_subscribers(args: argparse.Namespace, tally: Tally, token: str) -> list[asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    request = (
        f"GET /v1/subjects/{SUBJECT}:subscribe?prism_session={token} HTTP/1.1\r\n"
        f"host: 127.0.0.1:{args.http_port}\r\naccept: text/event-stream\r\n\r\n"
    ).encode()
    transports: list[asyncio.Transport] = []

    async def subscriber(index: int) -> None:
        transport, protocol = await loop.create_connection(lambda: _SSE(index, tally), "127.0.0.1", args.http_port)
        transports.append(transport)  # type: ignore[arg-type]
        transport.write(request)  # type: ignore[attr-defined]
        try:
            await protocol.done
        finally:
            transport.close()

    return [asyncio.create_task(subscriber(i)) for i in range(args.subscribers)]


# --- publishers ------------------------------------------------------------------------------


async def grpc_publisher(args: argparse.Namespace, token: str) -> tuple[Callable[[bytes], Awaitable[None]], Callable[[], Awaitable[None]]]:
    import grpc

    from prism.v1 import pubsub_pb2

    channel = grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}")
    stub = channel.unary_unary("/prism.v1.PubSubService/Publish")
    metadata = (("x-prism-session", token),)

    async def publish(data: bytes) -> None:
        await stub(pubsub_pb2.PubSubPublishRequest(subject=SUBJECT, data=data).SerializeToString(), metadata=metadata)

    return publish, channel.close


async def create_session(args: argparse.Namespace) -> str:
    import grpc

    from prism.v1 import session_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        raw = await channel.unary_unary("/prism.v1.SessionService/CreateSession")(
            session_pb2.CreateSessionRequest(config_name="events").SerializeToString()
        )
    return session_pb2.CreateSessionResponse.FromString(raw).token


async def inprocess(args: argparse.Namespace, tally: Tally) -> tuple[Callable[[bytes], Awaitable[None]], list[asyncio.Task[None]]]:
    from adapters.pubsub.memory import MemoryPubSub
    from adapters.pubsub.subjects import parse_pattern, parse_subject

    broker = MemoryPubSub(buffer_size=args.stream_buffer)
    subject = parse_subject(SUBJECT)

    async def subscriber(index: int) -> None:
        subscription = await broker.subscribe("default", parse_pattern(SUBJECT))
        tally.on_live()
        try:
            async for _ in subscription:
                tally.delivered(index)
        except Exception as exc:
            tally.failed(index, repr(exc))

    async def publish(data: bytes) -> None:
        await broker.publish("default", subject, data, {})

    return publish, [asyncio.create_task(subscriber(i)) for i in range(args.subscribers)]


# --- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, object]:
    tally = Tally(args.subscribers)
    close: Callable[[], Awaitable[None]] | None = None
    if args.transport == "inprocess":
        publish, tasks = await inprocess(args, tally)
    else:
        token = await create_session(args)
        maker = grpc_subscribers if args.transport == "grpc" else sse_subscribers
        tasks = await maker(args, tally, token)
        publish, close = await grpc_publisher(args, token)
    try:
        await asyncio.wait_for(tally.all_live.wait(), timeout=30)
    except TimeoutError:
        raise RuntimeError(f"only {tally.live} of {args.subscribers} subscriptions live after 30s") from None
    payload = b"x" * args.payload_bytes
    messages, window = args.messages, args.window
    expected = messages * args.subscribers
    usage0 = resource.getrusage(resource.RUSAGE_SELF)
    started = time.perf_counter()
    published = 0
    for _ in range(messages):
        while window and (slowest := tally.slowest()) is not None and published - slowest >= window:
            tally.progress.clear()
            await tally.progress.wait()
        await publish(payload)
        published += 1
    publish_seconds = time.perf_counter() - started
    last_total, last_change = -1, time.perf_counter()
    while True:
        slowest = tally.slowest()
        if slowest is None or slowest >= messages:
            break
        total = tally.total()
        if total != last_total:
            last_total, last_change = total, time.perf_counter()
        elif time.perf_counter() - last_change > STALL_SECONDS:
            break
        tally.progress.clear()
        try:
            await asyncio.wait_for(tally.progress.wait(), timeout=1)
        except TimeoutError:
            pass
    elapsed = time.perf_counter() - started
    usage1 = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime)
    delivered = tally.total()
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if close is not None:
        await close()
    return {
        "transport": args.transport,
        "subscribers": args.subscribers,
        "messages": messages,
        "window": window,
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "subscribers_cut_off": sum(tally.cut),
        "errors": sorted(set(tally.errors))[:5],
        "seconds": round(elapsed, 3),
        "publish_seconds": round(publish_seconds, 3),
        "deliveries_per_s": round(delivered / elapsed, 1),
        "client_cpu_share": round(cpu / elapsed, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=("grpc", "sse", "inprocess"), required=True)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4, help="grpc: channels the streams share")
    parser.add_argument("--stream-buffer", type=int, default=1024, help="inprocess: MemoryPubSub buffer")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
