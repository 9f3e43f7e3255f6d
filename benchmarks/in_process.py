"""The gateway's own cost per call, without a network or a client process: its ASGI app called
in this process the way an HTTP/2 server with trailers calls it for native gRPC (the path
``GrpcAsgiApp`` serves under pyvoy), so what is measured is the gateway — dispatch, pipeline,
service, adapter, and for Transact the mailbox listener delivering beside the Writes — and none
of the server, the loopback network or a gRPC client sharing the machine's cores.

Not a section of ``benchmarks.run``: a tool for finding where a gateway row's time goes, run on
demand. The sections measure what users get (a real server, a real client process); on a 2-core
machine those share the cores with the gateway, so comparing a section's row with this one's
tells how much of the row is the transport and the client. Per workload, after one second of
warm-up, ``--seconds`` of ``--callers`` callers calling flat out:

    kv-get           KeyValueService/Get of one 100-byte value on the embedded default (SQLite)
    queue-publish    QueueService/PublishBatch of 100 entries of 100 bytes, no key, no token (the
                     queue section's publish ×100) on the embedded default's ``queue`` (SQLite),
                     or with ``--backend postgres`` on the queue section's PostgreSQL queue
                     (``benchmarks.queue.write_config``); calls/s are batches/s
    transact-write   TransactService/Write, the load of the transact section (an UPSERT of a new
                     row and a 100-byte mailbox row, each caller its own mailbox) on the
                     section's configuration (``benchmarks.transact.write_config``): its mailbox
                     listener delivering every row to a queue on the same backend, unless
                     ``--no-listener``; the run then waits for every row to be delivered

Prints one JSON line: calls/s, CPU µs per call (every thread of this process: the event loop and
SQLite's worker thread), and for transact-write how long the delivery took after the load.

    python -m benchmarks.in_process kv-get
    python -m benchmarks.in_process queue-publish [--backend postgres]
    python -m benchmarks.in_process transact-write --backend postgres [--no-listener]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import pathlib
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import uvloop
from google.protobuf.message import Message

from app.http_app import create_app
from app.settings import load_settings
from app.transports.asgi_util import ASGIApp
from app.transports.grpc_asgi import TRAILERS
from benchmarks import kv as bench_kv
from benchmarks import queue as bench_queue
from benchmarks import transact
from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import queue_pb2 as q
from prism.v1 import session_pb2
from prism.v1 import transact_pb2 as t

POLL = 0.05  # seconds between looks at what the listener has left to deliver
BATCH = 100  # entries a queue-publish call


class InProcessGateway:
    """The gateway's ASGI app, started through its lifespan, answering native gRPC calls."""

    def __init__(self, settings_file: pathlib.Path | None, data_dir: pathlib.Path) -> None:
        environ = {"PRISM_DATA_DIR": str(data_dir), "PRISM_GRPC__SERVER": "asgi"}  # no grpc.aio port of its own
        self.app: ASGIApp = create_app(load_settings(settings_file, environ))
        self._lifespan_in: asyncio.Queue[dict[str, str]] = asyncio.Queue()
        self._lifespan_out: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._lifespan: asyncio.Task[None] | None = None

    async def __aenter__(self) -> InProcessGateway:
        scope = {"type": "lifespan", "asgi": {"version": "3.0"}, "state": {}}
        self._lifespan = asyncio.create_task(self.app(scope, self._lifespan_in.get, self._lifespan_out.put))
        await self._lifespan_in.put({"type": "lifespan.startup"})
        started = await self._lifespan_out.get()
        if started["type"] != "lifespan.startup.complete":
            raise RuntimeError(f"the gateway did not start: {started}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._lifespan_in.put({"type": "lifespan.shutdown"})
        assert self._lifespan is not None
        await self._lifespan

    async def call(self, path: str, request: Message, token: str = "") -> bytes:
        """One unary call; the response message's bytes, or RuntimeError with the status."""
        headers = [(b"content-type", b"application/grpc"), (b"te", b"trailers")]
        if token:
            headers.append((b"x-prism-session", token.encode()))
        scope = {
            "type": "http", "http_version": "2", "method": "POST", "scheme": "http", "path": path,
            "raw_path": path.encode(), "root_path": "", "query_string": b"", "headers": headers,
            "client": ("127.0.0.1", 50000), "server": ("127.0.0.1", 8080), "extensions": {TRAILERS: {}},
        }  # fmt: skip
        body = bench_kv.grpc_frame(request.SerializeToString())
        received = False
        answered: list[bytes] = []
        trailers: list[tuple[bytes, bytes]] = []

        async def receive() -> dict[str, Any]:
            nonlocal received
            if received:  # the body was read: the client stays until the answer is complete
                await asyncio.Event().wait()
            received = True
            return {"type": "http.request", "body": body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.body":
                answered.append(message.get("body", b""))
            elif message["type"] == TRAILERS:
                trailers.extend(message["headers"])

        await self.app(scope, receive, send)
        status = dict(trailers).get(b"grpc-status")
        if status != b"0":
            raise RuntimeError(f"{path}: grpc-status {status!r}: {dict(trailers).get(b'grpc-message', b'')!r}")
        data = b"".join(answered)
        return data[5:]

    async def session(self, config: str) -> str:
        answer = await self.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name=config))
        return session_pb2.CreateSessionResponse.FromString(answer).token


async def flat_out(call: Callable[[int, int], Awaitable[None]], callers: int, seconds: float) -> dict[str, float]:
    """``callers`` loops of ``call(caller, n)``: one second of warm-up, then ``seconds`` timed."""
    counts = [0] * callers

    async def caller(index: int, until: float) -> None:
        while time.perf_counter() < until:
            await call(index, counts[index])
            counts[index] += 1

    warm = time.perf_counter() + 1
    await asyncio.gather(*(caller(i, warm) for i in range(callers)))
    before, cpu, started = sum(counts), time.process_time(), time.perf_counter()
    until = started + seconds
    await asyncio.gather(*(caller(i, until) for i in range(callers)))
    elapsed, used, calls = time.perf_counter() - started, time.process_time() - cpu, sum(counts) - before
    return {"calls": calls, "seconds": round(elapsed, 3), "calls_per_s": round(calls / elapsed, 1),
            "cpu_us_per_call": round(used / calls * 1e6, 1)}


async def kv_get(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, Any]:
    async with InProcessGateway(None, workdir / "data") as gateway:
        token = await gateway.session("kv")
        await gateway.call("/prism.v1.KeyValueService/Set", kv.SetRequest(key="k", value=bytes(100)), token)
        request = kv.GetRequest(key="k")

        async def get(caller: int, n: int) -> None:
            await gateway.call("/prism.v1.KeyValueService/Get", request, token)

        return await flat_out(get, args.callers, args.seconds)


async def queue_publish(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, Any]:
    config = None
    if args.backend == "postgres":
        config = bench_queue.write_config(workdir / "prism.yaml", only=("postgres",))
    async with InProcessGateway(config, workdir / "data") as gateway:
        token = await gateway.session("queue" if config is None else "queue-postgres")
        request = q.PublishBatchRequest(topic="bench", entries=[q.QueueEntry(payload=bytes(100)) for _ in range(BATCH)])

        async def publish(caller: int, n: int) -> None:
            answer = q.PublishBatchResponse.FromString(await gateway.call("/prism.v1.QueueService/PublishBatch", request, token))
            if len(answer.results) != BATCH or any(r.status.code for r in answer.results):
                raise RuntimeError(f"PublishBatch answered {answer.results[:1]} …")

        try:
            return await flat_out(publish, args.callers, args.seconds)
        finally:
            if config is not None:  # the messages go (the file of the embedded default goes with the run)
                import asyncpg

                con = await asyncpg.connect(bench_queue.POSTGRES_DSN, timeout=5)
                try:
                    await bench_queue.remove_postgres_queues(con)
                finally:
                    await con.close()


async def transact_write(args: argparse.Namespace, workdir: pathlib.Path) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    table = f"{transact.TABLE_PREFIX}_{run}"
    sqlite_file = workdir / "transact.db"
    await transact.cleanup()
    transact.create_sqlite_table(sqlite_file, table)
    await transact.create_postgres_table(table)
    config = transact.write_config(workdir / "prism.yaml", sqlite_file, table, listener=args.listener)
    try:
        async with InProcessGateway(config, workdir / "data") as gateway:
            token = await gateway.session(f"tx-{args.backend}")

            async def write(caller: int, n: int) -> None:
                request = t.WriteRequest(
                    data=t.DataWrite(table=table, operation=t.WRITE_OPERATION_UPSERT),
                    mailbox=t.MailboxWrite(mailbox=transact.mailbox_name(run, caller), payload=transact.PAYLOAD,
                                           destination=transact.DESTINATION),
                )
                request.data.row.update(transact.data_row(run, caller, n))
                answer = t.WriteResponse.FromString(await gateway.call("/prism.v1.TransactService/Write", request, token))
                if answer.mailbox_sequence != n + 1:
                    raise RuntimeError(f"caller {caller}: Write {n + 1} got mailbox sequence {answer.mailbox_sequence}")

            result = await flat_out(write, args.callers, args.seconds)
            if args.listener:  # every row delivered before the gateway stops
                ended = time.perf_counter()
                for _ in range(int(transact.DRAIN_LIMIT / POLL)):  # polled: only the database says what the listener delivered
                    if not (left := (await asyncio.to_thread(transact.stored, args.backend, sqlite_file, table, run)).undelivered):
                        break
                    await asyncio.sleep(POLL)
                if left:
                    raise RuntimeError(f"{left} mailbox rows undelivered {transact.DRAIN_LIMIT:g} s after the load")
                result["drain_s"] = round(time.perf_counter() - ended, 2)
            return result
    finally:
        await transact.cleanup()


Workload = Callable[[argparse.Namespace, pathlib.Path], Awaitable[dict[str, Any]]]
WORKLOADS: dict[str, tuple[Workload, int]] = {  # name → (what runs it, callers by default)
    "kv-get": (kv_get, 64),
    "queue-publish": (queue_publish, 4),
    "transact-write": (transact_write, transact.IN_FLIGHT),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.in_process", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("workload", choices=list(WORKLOADS))
    parser.add_argument("--backend", choices=list(transact.BACKENDS), default="sqlite", help="transact-write, queue-publish")
    parser.add_argument("--no-listener", dest="listener", action="store_false", help="transact-write: rows stay undelivered")
    defaults = ", ".join(f"{callers} for {name}" for name, (_, callers) in WORKLOADS.items())
    parser.add_argument("--callers", type=int, help=f"calls at once (default: {defaults})")
    parser.add_argument("--seconds", type=float, default=4.0, help="timed seconds")
    args = parser.parse_args(argv)
    workload, callers = WORKLOADS[args.workload]
    args.callers = args.callers or callers
    with tempfile.TemporaryDirectory(prefix="prism-in-process-") as workdir:
        result = uvloop.run(workload(args, pathlib.Path(workdir)))
    described = {"backend": args.backend} if args.workload != "kv-get" else {}
    if args.workload == "transact-write":
        described["listener"] = args.listener
    print(json.dumps({"workload": args.workload, **described, "callers": args.callers, **result}))


if __name__ == "__main__":
    sys.exit(main())
