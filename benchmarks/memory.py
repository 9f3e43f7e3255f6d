"""Section 5 — memory: resident set size of every server process the run started, right after
start-up and set-up (idle: VmRSS) and at its peak (VmHWM, the kernel's own high-water mark,
read just before the process is stopped, so it covers all the load the section applied).

Run alone (``--only memory``), it applies a short load of its own: gRPC and REST h2c at 64 in
flight against the gateway under each server.
"""

from __future__ import annotations

from typing import Any

from benchmarks import kv, loader, procs
from benchmarks.context import Context
from benchmarks.loader import Shape

TITLE = "Memory: peak RSS per process, idle and under load"
TARGET_MB = 150


def _own_load(ctx: Context) -> None:
    d = ctx.durations
    for server in ("hypercorn", "granian"):
        with ctx.serving("memory", f"h2load gRPC + REST h2c, 64 in flight ({server})") as servers:
            gw = procs.gateway(ctx.workdir, server)
            servers.append(gw)
            prepared = kv.prepare(f"127.0.0.1:{gw.grpc_port}", gw.http_port)
            files = prepared.write(ctx.subdir(f"memory-{server}"))
            gw.record_idle()
            token = f"{kv.SESSION_HEADER}: {prepared.token}"
            loader.run(f"http://127.0.0.1:{gw.grpc_port}{kv.GET_PATH}", Shape(4, 16), duration=d.throughput,
                       warmup=0, server=gw, workdir=ctx.workdir, body=files["gateway_grpc"],
                       headers=["content-type: application/grpc", "te: trailers", token])
            loader.run(f"http://127.0.0.1:{gw.http_port}/v1/kv/{kv.KEY}", Shape(4, 16), duration=d.throughput,
                       warmup=0, server=gw, workdir=ctx.workdir, headers=[token])


def run(ctx: Context) -> dict[str, Any]:
    if not any(m["section"] in ("grpc", "rest") for m in ctx.memory):
        _own_load(ctx)
    rows = []
    for m in ctx.memory:
        row = {
            "id": f"memory/{m['section']}/{m['server']}/{m['role']}",
            "section": m["section"],
            "server": m["server"],
            "role": m["role"],
            "load": m["load"],
            "idle_rss_mb": _mb(m.get("idle_rss_kb")),
            "peak_rss_mb": _mb(m.get("peak_rss_kb")),
        }
        rows.append(row)
    return {"title": TITLE, "rows": rows, "target_mb": TARGET_MB}


def _mb(kb: int | None) -> float | None:
    return None if kb is None else round(kb / 1024, 1)
