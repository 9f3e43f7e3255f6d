"""Section 4 — streams: PubSub fan-out, 1 publisher → 100 subscribers (config ``events``,
in-process broker), over native gRPC and over SSE, against MemoryPubSub used directly in one
process. Subscribers and publisher run in a client process of their own
(benchmarks/fanout.py); delivered messages/s = all deliveries / time from the first publish
to the last delivery. Later issues add Queue and Reader rows here.
"""

from __future__ import annotations

from typing import Any

from benchmarks import procs
from benchmarks.context import Context
from benchmarks.procs import Server

TITLE = "Streams: PubSub fan-out, 1 publisher → 100 subscribers"
WINDOW = 256  # publisher at most this far ahead of the slowest subscriber (stream buffer: 1024)


def _fanout(ctx: Context, gw: Server | None, transport: str, window: int) -> dict[str, Any]:
    d = ctx.durations
    args = ["--transport", transport, "--subscribers", str(d.subscribers), "--messages", str(d.messages),
            "--window", str(window)]
    if gw is not None:
        args += ["--grpc-port", str(gw.grpc_port), "--http-port", str(gw.http_port)]
    return ctx.client("benchmarks.fanout", *args, server=gw, timeout=600)


def run(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    baseline = _fanout(ctx, None, "inprocess", WINDOW)
    rows.append({**baseline, "id": "streams/inprocess", "target": "MemoryPubSub in one process", "transport": "—"})
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
                paced = f"window {window}" if window else "unpaced"
                row = {
                    **result,
                    "id": f"streams/{transport}/{server}/{'paced' if window else 'unpaced'}",
                    "target": f"gateway ({server})",
                    "transport": name,
                    "publisher": paced,
                }
                row["ratio_vs_inprocess"] = round(result["deliveries_per_s"] / baseline["deliveries_per_s"], 4)
                rows.append(row)
    rows[0]["publisher"] = f"window {WINDOW}"
    return {"title": TITLE, "rows": rows}
