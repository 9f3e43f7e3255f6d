"""The in-process PubSub across the worker processes of one gateway instance.

With ``--workers N`` every worker is a process of its own, so a broker in each would reach
only its own subscribers. Here one worker is the hub: its :class:`~adapters.pubsub.memory.Router`
holds the subscriptions of every worker. The others connect to it, register their
subscriptions and send it their publishes; the hub routes each message and sends each worker
one frame naming which of its subscriptions get it, which that worker offers to their buffers.

    worker ──pub──► hub: Router ──► {"k": "msg", "to": [subscription ids]} + body ──► worker
                                └─► the hub's own subscriptions, directly

Election needs no coordination: the hub is whoever binds the instance's abstract Unix socket
(Linux; named after the data directory and the backend), and the kernel frees the name when
that process exits. A worker that loses its hub binds the name or connects to whoever did,
then registers its subscriptions again; meanwhile a publish or subscribe waits up to
``HUB_WAIT`` seconds, then fails UNAVAILABLE, and what was routed while it had no hub is lost,
as on a broker's reconnect. Both ends accept only a process of the same user (SO_PEERCRED).

A frame is two big-endian lengths, a JSON head and a body (a message's data):

    worker → hub  {"k": "sub", "s": seq, "id", "ns", "p": [tokens], "g"}           ack {"k": "ack", "s"}
                  {"k": "pub", "s": seq, "ns", "p": [tokens], "id", "t", "h"} + data  ack, after routing
                  {"k": "unsub", "id"}
    hub → worker  {"k": "msg", "to": [ids], "id", "subj", "t", "h"} + data

A publish is acknowledged after the hub routed it (a worker gets its deliveries before the
acknowledgement, on the same connection), so it has the in-process broker's meaning. A worker
whose socket holds more than ``PEER_BUFFER`` unread bytes is cut off and reconnects: a stuck
worker never grows the hub's memory, and a slow subscriber is its own worker's business.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import itertools
import json
import logging
import os
import socket
import struct
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grpc

from adapters.capabilities import Capability
from adapters.pubsub.base import Delivery, Overflow, Start, Subscription
from adapters.pubsub.memory import LocalSubscription, MemoryPubSub, Route, new_delivery
from prism.errors import PrismError

log = logging.getLogger(__name__)

HUB_WAIT = 5.0  # seconds a call waits for a hub (start-up, failover) or for its answer
RETRY = 0.05  # seconds between attempts to reach a hub that is coming up
PEER_BUFFER = 64 * 1024 * 1024  # bytes a worker may leave unread before the hub cuts it off
MAX_HEAD, MAX_BODY = 1024 * 1024, 1 << 30
LENGTHS = struct.Struct(">II")
PEERCRED = struct.Struct("3i")  # pid, uid, gid


def hub_address(data_dir: str, backend: str) -> str:
    """The abstract socket name of one instance's hub: every worker of a gateway computes the
    same one from the data directory it was given and the backend's name."""
    digest = hashlib.sha256(f"{os.path.abspath(data_dir)}\0{backend}".encode()).hexdigest()[:32]
    return f"\0prism-pubsub-{digest}"


def _frame(head: dict[str, Any], body: bytes = b"") -> bytes:
    encoded = json.dumps(head, separators=(",", ":")).encode()
    return LENGTHS.pack(len(encoded), len(body)) + encoded + body


async def _read_frame(reader: asyncio.StreamReader) -> tuple[dict[str, Any], bytes]:
    head_size, body_size = LENGTHS.unpack(await reader.readexactly(LENGTHS.size))
    if head_size > MAX_HEAD or body_size > MAX_BODY:
        raise ConnectionError(f"pubsub hub: a {head_size}+{body_size} byte frame")
    head = json.loads(await reader.readexactly(head_size))
    return head, await reader.readexactly(body_size) if body_size else b""


async def _connect(address: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the hub. The socket is connected here, not by the loop: uvloop refuses
    to connect to an abstract name (EINVAL). A Unix socket connects at once or not at all."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        sock.connect(address)  # BlockingIOError (an OSError) when the hub's backlog is full
        return await asyncio.open_unix_connection(sock=sock)
    except BaseException:
        sock.close()
        raise


def _same_user(writer: asyncio.StreamWriter) -> bool:
    sock = writer.get_extra_info("socket")
    _, uid, _ = PEERCRED.unpack(sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, PEERCRED.size))
    return uid == os.getuid()


def _message(delivery: Delivery, ids: Sequence[str]) -> bytes:
    head = {"k": "msg", "to": list(ids), "id": delivery.message_id, "subj": delivery.subject}
    head.update(t=delivery.published_at, h=dict(delivery.headers))
    return _frame(head, delivery.data)


def _unavailable(why: str) -> PrismError:
    return PrismError(grpc.StatusCode.UNAVAILABLE, f"pubsub across workers: {why}")


class Peer:
    """The hub's end of a connection from another worker: a sink for that worker's routes."""

    def __init__(self, hub: WorkersPubSub, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.hub, self.reader, self.writer = hub, reader, writer

    def deliver(self, ids: Sequence[str], delivery: Delivery) -> None:
        self._send(_message(delivery, ids))

    def _send(self, frame: bytes) -> None:
        transport = self.writer.transport
        if transport.is_closing():
            return
        if transport.get_write_buffer_size() > PEER_BUFFER:
            log.warning("pubsub hub: a worker left %d bytes unread; cutting it off", transport.get_write_buffer_size())
            transport.abort()
            return
        self.writer.write(frame)

    async def serve(self) -> None:
        router = self.hub.router
        try:
            while True:
                head, body = await _read_frame(self.reader)
                kind = head["k"]
                if kind == "pub":
                    subject = tuple(head["p"])
                    delivery = Delivery(head["id"], ".".join(subject), body, head["h"], head["t"])
                    router.route(head["ns"], subject, delivery)
                elif kind == "sub":
                    router.add(Route(head["id"], head["ns"], tuple(head["p"]), head["g"], self))
                elif kind == "unsub":
                    route = router.routes.get(head["id"])
                    if route is not None and route.sink is self:
                        router.remove(route.id)
                    continue
                self._send(_frame({"k": "ack", "s": head["s"]}))
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass  # the worker went away
        except (ValueError, KeyError, TypeError) as exc:
            log.error("pubsub hub: a worker sent a malformed frame (%r); disconnecting it", exc)
        finally:
            for route in [r for r in router.routes.values() if r.sink is self]:
                router.remove(route.id)
            self.writer.close()


class WorkersPubSub(MemoryPubSub):
    """The memory backend's PubSub when the gateway runs several worker processes."""

    capabilities = frozenset({Capability.WILDCARDS, Capability.QUEUE_GROUPS, Capability.SHARED})

    def __init__(self, buffer_size: int, address: str, name: str = "memory") -> None:
        super().__init__(buffer_size)
        self.address, self.name = address, name
        self._wanted: dict[str, tuple[str, tuple[str, ...], str]] = {}  # this process's subscriptions
        self._server: asyncio.Server | None = None  # set: this process is the hub
        self._peers: set[Peer] = set()
        self._link: asyncio.StreamWriter | None = None  # set: connected to the hub
        self._ready = asyncio.Event()
        self._pending: dict[int, asyncio.Future[None]] = {}
        self._seq = itertools.count()
        self._task: asyncio.Task[None] | None = None

    @property
    def is_hub(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if sys.platform != "linux":
            raise PrismError(
                grpc.StatusCode.FAILED_PRECONDITION,
                f"backend {self.name!r}: PubSub across worker processes needs Linux (abstract Unix "
                "sockets); run one worker, or put PUBSUB configs on a nats or redis backend",
            )
        self._task = asyncio.create_task(self._run())
        try:
            async with asyncio.timeout(HUB_WAIT):
                await self._ready.wait()
        except TimeoutError:
            await self.close()
            raise _unavailable(f"backend {self.name!r}: no hub among the workers within {HUB_WAIT:g}s") from None

    async def close(self) -> None:
        await super().close()  # this process's subscriptions first: they leave the hub
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        if self._server is not None:
            self._server.close()
            for peer in list(self._peers):
                peer.writer.close()
            self._server = None

    # --- The calls -----------------------------------------------------------------------------

    async def publish(
        self, namespace: str, subject: tuple[str, ...], data: bytes, headers: Mapping[str, str]
    ) -> str:
        delivery = new_delivery(subject, data, headers)
        link = await self._hub()
        if link is None:
            self.router.route(namespace, subject, delivery)
        else:
            head = {"k": "pub", "ns": namespace, "p": list(subject), "id": delivery.message_id}
            head.update(t=delivery.published_at, h=delivery.headers)
            await self._call(link, head, data)
        return delivery.message_id

    async def subscribe(
        self,
        namespace: str,
        pattern: tuple[str, ...],
        queue_group: str = "",
        overflow: Overflow = Overflow.END,
        start: Start | None = None,  # no history here: the service passes none (no Capability.REPLAY)
    ) -> Subscription:
        link = await self._hub()
        subscription = LocalSubscription(self, namespace, overflow)
        self.local[subscription.id] = subscription
        self._wanted[subscription.id] = (namespace, pattern, queue_group)
        if link is None:
            self.router.add(Route(subscription.id, namespace, pattern, queue_group, self))
            return subscription
        try:
            await self._call(link, self._registration(subscription.id))
        except BaseException:
            self.local.pop(subscription.id, None)
            self._wanted.pop(subscription.id, None)
            raise
        return subscription

    async def forget(self, subscription: Subscription) -> None:
        self.local.pop(subscription.id, None)
        self._wanted.pop(subscription.id, None)
        if self.is_hub:
            self.router.remove(subscription.id)
        elif self._link is not None and not self._link.transport.is_closing():
            self._link.write(_frame({"k": "unsub", "id": subscription.id}))

    async def _hub(self) -> asyncio.StreamWriter | None:
        """The connection to the hub; None when this process is the hub."""
        if not self._ready.is_set():
            try:
                async with asyncio.timeout(HUB_WAIT):
                    await self._ready.wait()
            except TimeoutError:
                raise _unavailable(f"no hub among the workers for {HUB_WAIT:g}s") from None
        return self._link

    def _registration(self, subscription_id: str) -> dict[str, Any]:
        namespace, pattern, group = self._wanted[subscription_id]
        return {"k": "sub", "id": subscription_id, "ns": namespace, "p": list(pattern), "g": group}

    async def _call(self, link: asyncio.StreamWriter, head: dict[str, Any], body: bytes = b"") -> None:
        """Send a frame the hub acknowledges, and wait for that."""
        seq = head["s"] = next(self._seq)
        answered = self._pending[seq] = asyncio.get_running_loop().create_future()
        try:
            if link.transport.is_closing():
                raise _unavailable("the hub went away; retry")
            link.write(_frame(head, body))
            async with asyncio.timeout(HUB_WAIT):
                await answered
        except TimeoutError:
            raise _unavailable(f"the hub did not answer within {HUB_WAIT:g}s") from None
        finally:
            self._pending.pop(seq, None)

    # --- Finding the hub -----------------------------------------------------------------------

    async def _run(self) -> None:
        """Become the hub, or connect to it; again whenever the hub goes away."""
        while True:
            try:
                self._server = await asyncio.start_unix_server(self._accept, path=self.address)
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    log.error("pubsub across workers: cannot bind the hub socket: %s", exc)
                    await asyncio.sleep(1.0)
                    continue
            else:
                for subscription_id in self._wanted:  # those this process made as a client
                    namespace, pattern, group = self._wanted[subscription_id]
                    self.router.add(Route(subscription_id, namespace, pattern, group, self))
                self._ready.set()
                log.info("pubsub across workers: this worker (pid %d) is the hub", os.getpid())
                return
            try:
                reader, writer = await _connect(self.address)
            except OSError:  # the name is taken but nobody answers yet, or any more
                await asyncio.sleep(RETRY)
                continue
            if not _same_user(writer):
                log.error("pubsub across workers: the hub socket is held by another user; retrying")
                writer.close()
                await asyncio.sleep(1.0)
                continue
            await self._follow(reader, writer)
            log.warning("pubsub across workers: lost the hub; finding it again")

    async def _follow(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Register this process's subscriptions with the hub, then take its frames until it
        goes away."""
        reading = asyncio.create_task(self._read_hub(reader))
        try:
            await asyncio.gather(*(self._call(writer, self._registration(i)) for i in list(self._wanted)))
            self._link = writer
            self._ready.set()
            await reading
        except PrismError:  # the hub went away while registering
            pass
        finally:
            self._ready.clear()
            self._link = None
            reading.cancel()
            writer.close()
            self._fail_pending()

    def _fail_pending(self) -> None:
        for answered in self._pending.values():
            if not answered.done():
                answered.set_exception(_unavailable("the hub went away; retry"))

    async def _read_hub(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                head, body = await _read_frame(reader)
                if head["k"] == "msg":
                    self.deliver(head["to"], Delivery(head["id"], head["subj"], body, head["h"], head["t"]))
                elif (answered := self._pending.get(head["s"])) is not None and not answered.done():
                    answered.set_result(None)
        except (asyncio.IncompleteReadError, ConnectionError, OSError):
            pass
        except (ValueError, KeyError, TypeError) as exc:
            log.error("pubsub across workers: a malformed frame from the hub (%r)", exc)
        finally:
            self._fail_pending()  # nothing will answer them now

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not _same_user(writer):
            log.error("pubsub hub: refused a connection from another user")
            writer.close()
            return
        peer = Peer(self, reader, writer)
        self._peers.add(peer)
        try:
            await peer.serve()
        finally:
            self._peers.discard(peer)
