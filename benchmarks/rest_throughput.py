"""Section 2 — REST throughput: the gateway's ``GET /v1/kv/<key>`` against two baselines that
answer the same JSON bytes — a bare FastAPI route and a raw ASGI handler — over HTTP/1.1,
h2c, and one h2c connection with 64 streams, under Hypercorn and under Granian.

All three run the way ``prism serve`` runs (one worker, uvloop). The baselines answer with the
gateway's own response body, saved right after the gateway answered it; each target is
checked with a real HTTP GET before its timed runs.
"""

from __future__ import annotations

from typing import Any

from benchmarks import kv, procs
from benchmarks.context import Context
from benchmarks.loader import Shape

SERVERS = ("hypercorn", "granian", "pyvoy")
# HTTP/1.1 has no multiplexing: 64 in flight is 64 connections (h2load -m would pipeline).
PROTOCOLS = [
    ("http1", "HTTP/1.1", True, Shape(64, 1)),
    ("h2c", "h2c", False, Shape(4, 16)),
    ("h2c-1conn", "h2c, 1 connection", False, Shape(1, 64)),
]
TITLE = "REST throughput: bare FastAPI route and raw ASGI handler vs gateway REST KeyValue Get"


def run(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    for server in SERVERS:
        with ctx.serving("rest", f"h2load REST, 64 in flight ({server})") as servers:
            gw = procs.gateway(ctx.workdir, server)
            servers.append(gw)
            prepared = kv.prepare(f"127.0.0.1:{gw.grpc_port}", gw.http_port)
            body_file = prepared.write(ctx.subdir(f"rest-{server}"))["json"]
            fastapi = procs.asgi_baseline(ctx.workdir, "benchmarks.baselines.fastapi_route:app", server, body_file)
            servers.append(fastapi)
            raw = procs.asgi_baseline(ctx.workdir, "benchmarks.baselines.raw_asgi:app", server, body_file)
            servers.append(raw)
            targets = [("fastapi", "bare FastAPI route", fastapi), ("raw", "raw ASGI handler", raw), ("gateway", "gateway", gw)]
            path = f"/v1/kv/{kv.KEY}"
            for _, name, srv in targets:
                got = kv.http_get(srv.http_port, path, prepared.token)  # type: ignore[arg-type]
                if got != prepared.json_body:
                    raise RuntimeError(f"{name} ({server}) answered {got!r}, expected {prepared.json_body!r}")
            for srv in servers:
                srv.record_idle()
            for proto_key, proto_name, h1, shape in PROTOCOLS:
                rps: dict[str, float] = {}
                for key, name, srv in targets:
                    result = ctx.h2load(
                        f"http://127.0.0.1:{srv.http_port}{path}",
                        shape,
                        server=srv,
                        h1=h1,
                        headers=[f"{kv.SESSION_HEADER}: {prepared.token}"],
                        expect_body_bytes=len(prepared.json_body),
                    )
                    rps[key] = result["rps"]  # type: ignore[assignment]
                    row = {
                        "id": f"rest/{server}/{proto_key}/{key}",
                        "server": server,
                        "protocol": proto_name,
                        "target": name,
                        "in_flight": shape.in_flight,
                        "h2load": ("--h1 " if h1 else "") + shape.label,
                        **result,
                    }
                    if key == "gateway":
                        row["ratio_vs_fastapi"] = round(rps["gateway"] / rps["fastapi"], 3) if rps["fastapi"] else None
                        row["ratio_vs_raw"] = round(rps["gateway"] / rps["raw"], 3) if rps["raw"] else None
                    rows.append(row)
            for _, name, srv in targets:  # status and body still right after the load
                if kv.http_get(srv.http_port, path, prepared.token) != prepared.json_body:  # type: ignore[arg-type]
                    raise RuntimeError(f"{name} ({server}) answers differently after the load")
    return {"title": TITLE, "rows": rows, "payload": {"response_bytes": len(prepared.json_body)}}
