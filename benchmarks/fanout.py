"""PubSub fan-out, 1 publisher → N subscribers, run in its own process. Prints one JSON object.

    python -m benchmarks.fanout --transport grpc --grpc-port 8980 --subscribers 100 --messages 2000
    python -m benchmarks.fanout --transport sse --http-port 8080 --grpc-port 8980 ...
    python -m benchmarks.fanout --transport inprocess ...   (MemoryPubSub used directly)
    python -m benchmarks.fanout --transport nats --nats-subject S ...   (nats-py used directly)
    python -m benchmarks.fanout --transport grpc --config events-nats --stall 0 ...

Every subscription must have delivered its first message (``subscription_id`` only: it is
live) before anything is published. The publisher (gRPC unary Publish, the same for both
stream transports) keeps at most ``--window`` messages ahead of the slowest subscriber, below
the gateway's per-stream buffer (limits.stream_buffer, 1024 by default), so what is measured
is sustained delivery rather than how fast a burst overflows the buffers; ``--window 0``
publishes flat out and shows what is lost when subscribers fall behind. Deliveries are
counted without decoding them (the client's CPU is part of the 2 cores too); the first
message of each stream is decoded and checked.

``--transport nats`` is the direct baseline of the NATS rows: the same loop and pacing with
nats-py in place of the gateway — one connection, ``--subscribers`` core subscriptions on
``--nats-subject``, each with a callback that only counts (what 100 subscribers using nats-py
directly in one process cost, issue 12's baseline), live once ``flush()`` has returned; the publisher
is ``await nc.publish(subject, payload)`` on the same connection: no headers, the plain
client's smallest message, where the gateway adds its message id and timestamp (with
``--nats-headers`` the direct publisher sends those very headers too).

``--stall I`` makes subscriber I (gRPC or SSE) stop reading once it is live: gRPC stops
iterating its call, SSE pauses reading its socket. The publisher paces on the others only.
When the others have everything (or stop progressing), the stalled one reads again until its
stream ends or stays quiet for ``RESUME_QUIET`` seconds; the result says what it then received
and how it ended (the gateway's buffer contract: RESOURCE_EXHAUSTED once more than the buffer
waited, or the oldest dropped with ``overflow: drop_oldest``).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import resource
import socket
import time
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop

SUBJECT = "bench.fanout"
STALL_SECONDS = 10.0  # no delivery for this long: stop and report what was lost
STALLED_RCVBUF = 16 * 1024  # bytes: the stalled SSE subscriber's socket receive buffer
RESUME_QUIET = 2.0  # a resumed stalled subscriber quiet for this long: what it had is counted


class Tally:
    """Deliveries per subscriber, and the events the publisher and the run wait on."""

    def __init__(self, subscribers: int, stalled: int = -1) -> None:
        self.counts = [0] * subscribers
        self.responses = 0  # responses (gRPC) or events (SSE) that carried deliveries
        self.cut = [False] * subscribers  # stream ended early (error): no longer waited for
        self.live = 0
        self.all_live = asyncio.Event()
        self.progress = asyncio.Event()
        self.errors: list[str] = []
        self.subscribers = subscribers
        self.stalled = stalled  # index of the subscriber that stops reading (-1: none)
        self.resume = asyncio.Event()  # the stalled subscriber reads again
        self.stall_end: str | None = None  # how the stalled subscriber's stream ended

    def on_live(self) -> None:
        self.live += 1
        if self.live == self.subscribers:
            self.all_live.set()

    def delivered(self, index: int, n: int = 1) -> None:
        self.counts[index] += n
        self.responses += 1
        self.progress.set()

    def failed(self, index: int, reason: str) -> None:
        if index == self.stalled:
            self.stall_end = self.stall_end or reason
            self.cut[index] = True
            self.progress.set()
            return
        if not self.cut[index]:
            self.cut[index] = True
            self.errors.append(reason)
            self.progress.set()

    def slowest(self) -> int | None:
        """The fewest deliveries of a subscriber still reading (the stalled one is not waited for)."""
        live = [c for i, (c, cut) in enumerate(zip(self.counts, self.cut, strict=True))
                if not cut and i != self.stalled]
        return min(live) if live else None

    def total(self) -> int:
        return sum(c for i, c in enumerate(self.counts) if i != self.stalled)


# --- subscribers per transport ---------------------------------------------------------------


async def grpc_subscribers(args: argparse.Namespace, tally: Tally, token: str) -> list[asyncio.Task[None]]:
    import grpc

    from prism.v1 import pubsub_pb2

    request = pubsub_pb2.PubSubSubscribeRequest(subject=SUBJECT, linger_ms=args.linger_ms).SerializeToString()
    metadata = (("x-prism-session", token),)
    channels = [grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") for _ in range(args.connections)]

    # The stalled subscriber has a channel of its own without BDP probing: its HTTP/2 stream
    # window stays at grpc's 64 KiB, so what waits for it waits in the gateway, not here.
    own = [("grpc.http2.bdp_probe", 0)]
    stalled = grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}", options=own) if tally.stalled >= 0 else None

    rpc = "SubscribeBatches" if args.batches else "Subscribe"
    head_type = pubsub_pb2.PubSubMessageBatch if args.batches else pubsub_pb2.PubSubSubscribeResponse

    async def subscriber(index: int) -> None:
        channel = stalled if stalled is not None and index == tally.stalled else channels[index % len(channels)]
        stub = channel.unary_stream(f"/prism.v1.PubSubService/{rpc}")
        call = stub(request, metadata=metadata)
        first = True
        try:
            async for raw in call:
                if first:
                    head = head_type.FromString(raw)
                    if not head.subscription_id or head.ListFields()[1:]:
                        raise RuntimeError(f"unexpected first message {head!r}")
                    first = False
                    tally.on_live()
                    if index == tally.stalled:  # stop reading: what arrives waits in the transport
                        await tally.resume.wait()
                    continue
                tally.delivered(index, len(pubsub_pb2.PubSubMessageBatch.FromString(raw).messages) if args.batches else 1)
            if index == tally.stalled:
                tally.stall_end = tally.stall_end or "OK (stream ended)"
        except grpc.aio.AioRpcError as exc:
            if exc.code() != grpc.StatusCode.CANCELLED:
                tally.failed(index, f"{exc.code().name}: {exc.details()}")
        except Exception as exc:  # a wrong first message
            tally.failed(index, repr(exc))
        finally:
            call.cancel()

    return [asyncio.create_task(subscriber(i)) for i in range(args.subscribers)]


class _SSE(asyncio.Protocol):
    """One text/event-stream over HTTP/1.1; counts ``event: message`` without parsing JSON (with
    ``batches``, the messages in each: a ``"messageId"`` key each, which base64 data cannot hold)."""

    def __init__(self, index: int, tally: Tally, batches: bool = False) -> None:
        self.index, self.tally = index, tally
        self.marker = b'"messageId"' if batches else b"event: message"
        self.head = b""
        self.in_body = False
        self.tail = b""
        self.seen = 0
        self.transport: asyncio.Transport | None = None
        self.resumer: asyncio.Task[None] | None = None  # held: the loop keeps only a weak reference
        self.done = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

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
        n = text.count(self.marker)
        if self.seen == 0 and b"event: message" in text:  # the first event: live (a batch's holds no message)
            n += self.marker != b"event: message"
        if n:
            if self.seen == 0:
                self.tally.on_live()
                if self.index == self.tally.stalled and self.transport is not None:
                    # Stop reading: the kernel's socket buffers fill, then the server's sends wait.
                    self.transport.pause_reading()
                    self.resumer = asyncio.get_running_loop().create_task(self._resume_later())
            counted = n - (1 if self.seen == 0 else 0)
            self.seen += n
            if counted:
                self.tally.delivered(self.index, counted)
        if (at := text.find(b"event: error")) >= 0:
            found = re.search(rb'event: error\r?\ndata: (\{.*?\})\r?\n', text[at:])
            if found is None and len(text) - at < 4096:  # its data line is still on the way
                self.tail = text[at:]  # holds no "event: message": nothing is counted twice
                return
            try:
                body = json.loads(found[1]) if found else {}
                self._end(f"{body['code']}: {body['message']} (SSE event: error)")
            except (ValueError, KeyError, TypeError):
                self._end(f"event: error {found[1].decode(errors='replace') if found else ''}")
        self.tail = text[-(len(self.marker) - 1) :]  # shorter than the marker: no occurrence is counted twice

    async def _resume_later(self) -> None:
        await self.tally.resume.wait()
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()

    def _end(self, reason: str) -> None:
        if not self.done.done():
            self.tally.failed(self.index, reason)
            self.done.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            if self.index == self.tally.stalled:
                self.tally.stall_end = self.tally.stall_end or "connection closed"
            self.done.set_result(None)


async def sse_subscribers(args: argparse.Namespace, tally: Tally, token: str) -> list[asyncio.Task[None]]:
    loop = asyncio.get_running_loop()
    request = (
        f"GET /v1/subjects/{SUBJECT}:{'subscribeBatches' if args.batches else 'subscribe'}?prism_session={token}"
        f"{f'&lingerMs={args.linger_ms}' if args.linger_ms else ''} HTTP/1.1\r\n"
        f"host: 127.0.0.1:{args.http_port}\r\naccept: text/event-stream\r\n\r\n"
    ).encode()

    async def subscriber(index: int) -> None:
        sock = socket.socket()
        if index == tally.stalled:  # a small receive window: what waits for it waits in the gateway
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, STALLED_RCVBUF)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", args.http_port))
        transport, protocol = await loop.create_connection(lambda: _SSE(index, tally, args.batches), sock=sock)
        transport.write(request)
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

    if not args.publish_stream:
        async def publish(data: bytes) -> None:
            await stub(pubsub_pb2.PubSubPublishRequest(subject=SUBJECT, data=data).SerializeToString(), metadata=metadata)

        return publish, channel.close

    # PublishStream: one client-streaming call, each message written without waiting for an
    # answer (as nats-py's publish buffers), the one answer checked at the end.
    call = channel.stream_unary("/prism.v1.PubSubService/PublishStream")(metadata=metadata)
    sent = 0

    async def write(data: bytes) -> None:
        nonlocal sent
        await call.write(pubsub_pb2.PubSubPublishRequest(subject=SUBJECT, data=data).SerializeToString())
        sent += 1

    async def close() -> None:
        await call.done_writing()
        answer = pubsub_pb2.PublishStreamResponse.FromString(await call)
        await channel.close()
        if answer.published != sent:
            raise RuntimeError(f"PublishStream published {answer.published} of {sent}")

    return write, close


async def create_session(args: argparse.Namespace) -> str:
    import grpc

    from prism.v1 import session_pb2

    async with grpc.aio.insecure_channel(f"127.0.0.1:{args.grpc_port}") as channel:
        raw = await channel.unary_unary("/prism.v1.SessionService/CreateSession")(
            session_pb2.CreateSessionRequest(config_name=args.config).SerializeToString()
        )
    return session_pb2.CreateSessionResponse.FromString(raw).token


# --- the direct baselines: no gateway ---------------------------------------------------------


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


async def nats_direct(
    args: argparse.Namespace, tally: Tally
) -> tuple[Callable[[bytes], Awaitable[None]], Callable[[], Awaitable[None]]]:
    """nats-py on its own: one connection, a subscription with a counting callback per
    subscriber, the publisher on the same connection (the gateway's adapter, too, publishes and
    subscribes on its backend's one connection)."""
    import nats
    from nats.aio.msg import Msg

    nc = await nats.connect(args.nats_url, connect_timeout=5, allow_reconnect=False)
    subject = args.nats_subject

    def counter(index: int) -> Callable[[Msg], Awaitable[None]]:
        async def received(msg: Msg) -> None:
            tally.delivered(index)

        return received

    for index in range(args.subscribers):
        await nc.subscribe(subject, cb=counter(index))
    await nc.flush(timeout=10)  # the server has every subscription: live
    for _ in range(args.subscribers):
        tally.on_live()

    if args.nats_headers:  # the adapter's own headers: its message id and publish time
        import uuid

        from adapters.pubsub.nats import encode_headers

        async def publish(data: bytes) -> None:
            await nc.publish(subject, data, headers=encode_headers(uuid.uuid4().hex, time.time(), {}))
    else:

        async def publish(data: bytes) -> None:
            await nc.publish(subject, data)

    return publish, nc.close


# --- the run ---------------------------------------------------------------------------------


async def run(args: argparse.Namespace) -> dict[str, Any]:
    if args.stall >= 0 and args.transport not in ("grpc", "sse"):
        raise SystemExit("--stall: gRPC or SSE subscribers only")
    tally = Tally(args.subscribers, args.stall)
    close: Callable[[], Awaitable[None]] | None = None
    tasks: list[asyncio.Task[None]] = []
    if args.transport == "inprocess":
        publish, tasks = await inprocess(args, tally)
    elif args.transport == "nats":
        publish, close = await nats_direct(args, tally)
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
    readers = args.subscribers - (1 if args.stall >= 0 else 0)
    expected = messages * readers
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
    result: dict[str, Any] = {
        "transport": args.transport,
        "subscribers": args.subscribers,
        "messages": messages,
        "payload_bytes": args.payload_bytes,
        "window": window,
        "expected": expected,
        "delivered": delivered,
        "lost": expected - delivered,
        "subscribers_cut_off": sum(c for i, c in enumerate(tally.cut) if i != args.stall),
        "errors": sorted(set(tally.errors))[:5],
        "seconds": round(elapsed, 3),
        "publish_seconds": round(publish_seconds, 3),
        "deliveries_per_s": round(delivered / elapsed, 1),
        "deliveries_per_response": round(delivered / max(tally.responses, 1), 2),
        "client_cpu_share": round(cpu / elapsed, 3),
    }
    if args.stall >= 0:
        result["stall"] = await _resume_stalled(tally, args.stall, messages)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    if close is not None:
        await close()
    return result


async def _resume_stalled(tally: Tally, index: int, messages: int) -> dict[str, Any]:
    """Let the stalled subscriber read again; what it gets is what the gateway kept for it."""
    before = tally.counts[index]
    tally.resume.set()
    last, quiet_since = before, time.perf_counter()
    while tally.stall_end is None and tally.counts[index] < messages:
        await asyncio.sleep(0.05)
        if tally.counts[index] != last:
            last, quiet_since = tally.counts[index], time.perf_counter()
        elif time.perf_counter() - quiet_since > RESUME_QUIET:
            break
    return {
        "subscriber": index,
        "delivered_while_stalled": before,
        "delivered": tally.counts[index],
        "missed": messages - tally.counts[index],
        "ended": tally.stall_end or f"still open (quiet for {RESUME_QUIET:g}s)",
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", choices=("grpc", "sse", "inprocess", "nats"), required=True)
    parser.add_argument("--grpc-port", type=int)
    parser.add_argument("--http-port", type=int)
    parser.add_argument("--config", default="events", help="grpc/sse: the session's PUBSUB config")
    parser.add_argument("--subscribers", type=int, default=100)
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--payload-bytes", type=int, default=64)
    parser.add_argument("--connections", type=int, default=4, help="grpc: channels the streams share")
    parser.add_argument("--stream-buffer", type=int, default=1024, help="inprocess: MemoryPubSub buffer")
    parser.add_argument("--nats-url", default="nats://127.0.0.1:4222", help="nats: the server")
    parser.add_argument("--nats-subject", default="prism-bench.direct.bench.fanout", help="nats: the subject")
    parser.add_argument("--nats-headers", action="store_true",
                        help="nats: publish with the headers the gateway's adapter adds (id, time)")
    parser.add_argument("--batches", action="store_true", help="grpc/sse: subscribe with SubscribeBatches")
    parser.add_argument("--linger-ms", type=int, default=0, help="with --batches: the subscriptions' lingerMs")
    parser.add_argument("--publish-stream", action="store_true",
                        help="grpc/sse: publish through one PublishStream call (no answer awaited per message)")
    parser.add_argument("--stall", type=int, default=-1, help="grpc/sse: this subscriber stops reading once live")
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
