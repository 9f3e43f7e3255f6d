"""Section 4 — streams: PubSub fan-out, 1 publisher → 100 subscribers, over native gRPC and over
SSE. Subscribers and publisher run in a client process of their own (benchmarks/fanout.py);
delivered messages/s = all deliveries / time from the first publish to the last delivery.

In process (config ``events``, the embedded default): the gateway under Hypercorn and Granian
against MemoryPubSub used directly with 100 subscriptions in one process.

On NATS (issue 12): one gateway (Granian, one worker, as ``prism serve`` runs) whose PUBSUB
config ``events-nats`` uses the local NATS server, with the bench-only subject prefix
``PRISMBENCHPS`` and namespace ``prism-bench-streams`` (its subjects are
``PRISMBENCHPS.ps.prism-bench-streams.…``), against nats-py used directly in a client process:

    direct   one connection, 100 core subscriptions on one subject (a counting callback each,
             live once flush() returned), the publisher awaiting nc.publish on that same
             connection (what 100 subscribers using nats-py in one process cost: the server
             sends every message 100 times and the client parses and dispatches each copy);
             same message count, 64-byte payload and pacing (at most 256 messages ahead of the
             slowest subscriber) as the gateway rows. Plain publishes, no headers; a second
             direct row publishes with the adapter's own headers (message id, time), for
             reference. The gateway's adapter shares one NATS subscription among its
             subscriptions to the same pattern (adapters/pubsub/nats.py): NATS sends it each
             message once, and its 100 streams are fed from that one copy.
    gateway  the same fan-out through the gateway, 100 gRPC server streams (4 channels) or 100 SSE
             connections: SubscribeBatches with lingerMs 20 and one PublishStream call (each
             message written without awaiting an answer, as nats-py's publish buffers): the
             target rows; and Subscribe (one message a response) with a unary Publish per
             message, for reference

    gateway/direct = gateway deliveries/s ÷ direct (plain) deliveries/s; issue 12's target ≥ 50%
    (the SubscribeBatches rows)

Then a stalled subscriber, per transport: subscriber 0 stops reading once live (gRPC: stops
iterating its call, on a channel of its own without BDP probing so its HTTP/2 window stays at
64 KiB; SSE: pauses reading a socket with a 16 KiB receive buffer) while 2,000 messages of 4 KiB
go to all 100, paced on the other 99 (at most 64 ahead). The gateway's RSS is sampled every
50 ms meanwhile (before, peak, peak in each half of the row); then the stalled one reads again
and the row records what it got and how its stream ended — RESOURCE_EXHAUSTED once more than
``limits.stream_buffer`` (1,024) messages waited for it (adapters/pubsub/base.py). The payloads
are 4 KiB so that the bytes the kernel's socket buffers hold (up to 4 MiB on the gateway's
side of an SSE connection) are a few hundred messages rather than many thousands: the gateway's
own buffer, not the kernel's, has to overflow within the row.

Core NATS stores nothing; afterwards the section removes any JetStream stream named with the
prefix (none is expected: no QUEUE config is declared) and records what it removed.
"""

from __future__ import annotations

import asyncio
import itertools
import pathlib
import threading
import time
from types import TracebackType
from typing import Any

import yaml

from benchmarks import procs
from benchmarks.context import Context
from benchmarks.procs import Server

TITLE = "Streams: PubSub fan-out, 1 publisher → 100 subscribers"
WINDOW = 256  # publisher at most this far ahead of the slowest subscriber (stream buffer: 1024)
LINGER_MS = 20  # the batched rows' lingerMs: a message waits at most this long for others
SUBJECT = "bench.fanout"  # benchmarks/fanout.py's subject, inside the config's namespace
NATS_URL = "nats://127.0.0.1:4222"
NATS_PREFIX = "PRISMBENCHPS"  # bench-only: the gateway's subjects, and the direct rows', start with it
NAMESPACE = "prism-bench-streams"
NATS_CONFIG = "events-nats"
# The direct rows' subject: as many tokens as the gateway's, in a namespace of their own.
DIRECT_SUBJECT = f"{NATS_PREFIX}.ps.{NAMESPACE}-direct.{SUBJECT}"
STALL_MESSAGES = 2000  # overflows the stalled subscriber's 1,024 plus what its transport holds (≤ ~750)
STALL_PAYLOAD = 4096
STALL_WINDOW = 64  # the other 99 at most this far behind: keeps the in-flight bytes small
RSS_INTERVAL = 0.05  # seconds between samples of the gateway's RSS during a stall row


class RssSampler:
    """VmRSS of a server's serving processes, sampled in a thread while a row runs: VmHWM is
    the whole life's peak, this is the row's own, and its shape (does the second half of the
    row climb above the first?) tells bounded memory from a slow leak."""

    def __init__(self, server: Server, interval: float = RSS_INTERVAL) -> None:
        self.pids = [pid for pid, role in server.roles().items() if role.startswith("worker")]
        self.interval = interval
        self.samples: list[tuple[float, int]] = []  # (monotonic seconds, kB)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)
        self.before_kb = self._rss()

    def _rss(self) -> int:
        return sum(procs.memory_kb(pid).get("VmRSS", 0) for pid in self.pids)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.samples.append((time.monotonic(), self._rss()))

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def summary(self) -> dict[str, float | None]:
        def mb(kb: int | None) -> float | None:
            return None if kb is None else round(kb / 1024, 1)

        if not self.samples:
            return {"rss_before_mb": mb(self.before_kb)}
        middle = (self.samples[0][0] + self.samples[-1][0]) / 2
        first = [kb for t, kb in self.samples if t <= middle]
        second = [kb for t, kb in self.samples if t > middle] or first
        return {
            "rss_before_mb": mb(self.before_kb),
            "rss_peak_mb": mb(max(kb for _, kb in self.samples)),
            "rss_peak_first_half_mb": mb(max(first)),
            "rss_peak_second_half_mb": mb(max(second)),
            "rss_after_mb": mb(self.samples[-1][1]),
            "rss_samples": len(self.samples),
            "rss_by_tenth_mb": [mb(max(part)) for part in _tenths([kb for _, kb in self.samples])],
        }


def _tenths(values: list[int]) -> list[list[int]]:
    """``values`` in ten consecutive parts (fewer when there are fewer values), none empty."""
    n = len(values)
    bounds = sorted({round(i * n / 10) for i in range(11)})
    return [values[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _fanout(ctx: Context, gw: Server | None, transport: str, window: int, *extra: str,
            backend: str | None = None, messages: int | None = None) -> dict[str, Any]:
    d = ctx.durations
    args = ["--transport", transport, "--subscribers", str(d.subscribers), "--messages", str(messages or d.messages),
            "--window", str(window), *extra]
    if gw is not None:
        args += ["--grpc-port", str(gw.grpc_port), "--http-port", str(gw.http_port)]
    return ctx.client("benchmarks.fanout", *args, server=gw, timeout=600, backend=backend)


def write_config(path: pathlib.Path) -> pathlib.Path:
    """The NATS gateway's server configuration: one backend, one PUBSUB config, bench-only names."""
    path.write_text(yaml.safe_dump({
        "backends": {"nats": {"type": "nats", "url": NATS_URL, "prefix": NATS_PREFIX}},
        "configs": [{"name": NATS_CONFIG, "pattern": "PUBSUB", "backend": "nats", "namespace": NAMESPACE}],
        "namespaces": [{"name": NAMESPACE}],
    }, sort_keys=False))
    return path


async def cleanup() -> dict[str, int]:
    """Core NATS keeps no message; remove any JetStream stream named with the bench prefix."""
    import nats

    removed = {"nats_streams": 0}
    nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name or ""
            if name.startswith(NATS_PREFIX):
                await js.delete_stream(name)
                removed["nats_streams"] += 1
    finally:
        await nc.close()
    return removed


def _in_process_rows(ctx: Context) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    baseline = _fanout(ctx, None, "inprocess", WINDOW)
    rows.append({**baseline, "id": "streams/inprocess", "backend": "in process",
                 "target": "MemoryPubSub in one process", "transport": "—", "publisher": f"window {WINDOW}"})
    plan = [
        ("hypercorn", "grpc", "gRPC", WINDOW),
        ("hypercorn", "grpc", "gRPC", 0),
        ("hypercorn", "sse", "SSE (HTTP/1.1)", WINDOW),
        ("granian", "sse", "SSE (HTTP/1.1)", WINDOW),
    ]
    for server in ("hypercorn", "granian"):
        with ctx.serving("streams", f"fan-out to {ctx.durations.subscribers} subscribers ({server})") as servers:
            gw = procs.gateway(ctx.workdir, server)
            servers.append(gw)
            gw.record_idle()
            for srv, transport, name, window in plan:
                if srv != server:
                    continue
                result = _fanout(ctx, gw, transport, window)
                row = {
                    **result,
                    "id": f"streams/{transport}/{server}/{'paced' if window else 'unpaced'}",
                    "backend": "in process",
                    "target": f"gateway ({server})",
                    "transport": name,
                    "publisher": f"window {window}" if window else "unpaced",
                }
                row["ratio_vs_inprocess"] = round(result["deliveries_per_s"] / baseline["deliveries_per_s"], 4)
                row["vs_baseline"] = row["ratio_vs_inprocess"]
                rows.append(row)
    return rows


def _nats_rows(ctx: Context) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    direct_args = ["--nats-url", NATS_URL, "--nats-subject", DIRECT_SUBJECT]
    with ctx.serving("streams", f"fan-out to {ctx.durations.subscribers} subscribers on NATS (granian)") as servers:
        gw = procs.gateway(ctx.workdir, "granian", config=write_config(ctx.subdir("streams") / "prism-nats.yaml"))
        servers.append(gw)
        gw.record_idle()
        direct = ctx.least_disturbed(lambda: _fanout(ctx, None, "nats", WINDOW, *direct_args, backend="nats-server"))
        rows.append({**direct, "id": "streams/nats/direct", "backend": "NATS", "target": "nats-py directly",
                     "transport": "—", "publisher": f"window {WINDOW}", "vs_baseline": None})
        headed = _fanout(ctx, None, "nats", WINDOW, *direct_args, "--nats-headers", backend="nats-server")
        rows.append({**headed, "id": "streams/nats/direct-headers", "backend": "NATS",
                     "target": "nats-py directly, the adapter's headers", "transport": "—",
                     "publisher": f"window {WINDOW}"})
        # Subscribe (one message a response) with a unary Publish per message: for reference.
        for transport, name in (("grpc", "gRPC"), ("sse", "SSE (HTTP/1.1)")):
            result = ctx.least_disturbed(
                lambda t=transport: _fanout(ctx, gw, t, WINDOW, "--config", NATS_CONFIG, backend="nats-server"))
            ratio = round(result["deliveries_per_s"] / direct["deliveries_per_s"], 4)
            rows.append({**result, "id": f"streams/nats/{transport}/granian/paced", "backend": "NATS",
                         "target": "gateway (granian), Subscribe", "transport": name,
                         "publisher": f"Publish, window {WINDOW}", "vs_baseline": ratio})
        # The targets: SubscribeBatches with lingerMs, and PublishStream (no answer awaited per
        # message, as nats-py's publish buffers).
        for transport, name in (("grpc", "gRPC"), ("sse", "SSE (HTTP/1.1)")):
            result = ctx.least_disturbed(
                lambda t=transport: _fanout(ctx, gw, t, WINDOW, "--config", NATS_CONFIG, "--batches", "--linger-ms",
                                            str(LINGER_MS), "--publish-stream", backend="nats-server"))
            ratio = round(result["deliveries_per_s"] / direct["deliveries_per_s"], 4)
            rows.append({**result, "id": f"streams/nats/{transport}/granian/batches", "backend": "NATS",
                         "target": f"gateway (granian), SubscribeBatches lingerMs {LINGER_MS}", "transport": name,
                         "publisher": f"PublishStream, window {WINDOW}", "ratio_vs_direct": ratio, "vs_baseline": ratio,
                         "ratio_vs_direct_headers": round(result["deliveries_per_s"] / headed["deliveries_per_s"], 4)})
        headed["ratio_vs_plain_direct"] = round(headed["deliveries_per_s"] / direct["deliveries_per_s"], 4)
        rows[1]["vs_baseline"] = headed["ratio_vs_plain_direct"]
        for transport, name in (("grpc", "gRPC"), ("sse", "SSE (HTTP/1.1)")):
            with RssSampler(gw) as rss:
                result = _fanout(ctx, gw, transport, STALL_WINDOW, "--config", NATS_CONFIG, "--stall", "0",
                                 "--payload-bytes", str(STALL_PAYLOAD), backend="nats-server",
                                 messages=STALL_MESSAGES)
            rows.append({**result, **rss.summary(), "id": f"streams/nats/{transport}/granian/stalled",
                         "backend": "NATS", "target": "gateway (granian), 1 subscriber stalled", "transport": name,
                         "publisher": f"window {STALL_WINDOW} (on the other {ctx.durations.subscribers - 1})"})
    return rows


def run(ctx: Context) -> dict[str, Any]:
    rows = _in_process_rows(ctx)
    leftover = asyncio.run(cleanup())
    try:
        rows += _nats_rows(ctx)
    finally:
        removed = asyncio.run(cleanup())
    for row in rows:
        stall = row.get("stall")
        if stall:
            row["stalled"] = f"{stall['delivered']:,} then {stall['ended'].split(':')[0]}"
        if row.get("rss_peak_mb") is not None:
            row["rss"] = f"{row['rss_before_mb']:.0f} → {row['rss_peak_mb']:.0f}"
    return {"title": TITLE, "rows": rows, "namespace": NAMESPACE, "nats_prefix": NATS_PREFIX,
            "direct_subject": DIRECT_SUBJECT, "leftover_before": leftover, "removed_after": removed}
