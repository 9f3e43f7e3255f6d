"""Section 1 — gRPC throughput: the gateway's KeyValue Get over native gRPC against a bare
grpc.aio echo server, same payload, same concurrency, same loader, in one run.

The echo is sent the gateway's serialized GetResponse and answers with it, so both answer
with the same number of bytes. The gateway's call is session-authenticated (``kv`` config,
SQLite) and reads a key set beforehand. Every target is checked with a real gRPC client
(grpc-status 0, the expected bytes) before and after its timed runs.
"""

from __future__ import annotations

from typing import Any

from benchmarks import kv, procs
from benchmarks.context import Context
from benchmarks.loader import Shape

SHAPES = [Shape(1, 1), Shape(1, 16), Shape(4, 16), Shape(1, 64)]
# The gateway under Granian too (gRPC shares the worker's loop with the HTTP server), at 64 in flight.
GRANIAN_SHAPES = [Shape(4, 16), Shape(1, 64)]

TITLE = "gRPC throughput: bare grpc.aio echo vs gateway KeyValue Get (native gRPC)"


def _h2load_headers(token: str) -> list[str]:
    return ["content-type: application/grpc", "te: trailers", f"{kv.SESSION_HEADER}: {token}"]


def run(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with ctx.serving("grpc", "h2load gRPC unary, 1–64 in flight") as servers:
        echo = procs.grpc_echo(ctx.workdir)
        servers.append(echo)
        gateways = {}
        for server in ("hypercorn", "granian"):
            gateways[server] = procs.gateway(ctx.workdir, server)
            servers.append(gateways[server])
        targets: list[dict[str, Any]] = []
        for server, gw in gateways.items():
            target = f"127.0.0.1:{gw.grpc_port}"
            prepared = kv.prepare(target, gw.http_port)
            files = prepared.write(ctx.subdir(f"grpc-{server}"))
            targets.append(
                {
                    "key": f"gateway-{server}",
                    "name": f"gateway ({server})",
                    "server": gw,
                    "target": target,
                    "request": prepared.request,
                    "body": files["gateway_grpc"],
                    "token": prepared.token,
                    "response": prepared.response,
                    "shapes": SHAPES if server == "hypercorn" else GRANIAN_SHAPES,
                }
            )
            if server == "hypercorn":
                echo_target = f"127.0.0.1:{echo.grpc_port}"
                targets.insert(
                    0,
                    {
                        "key": "bare",
                        "name": "bare grpc.aio echo",
                        "server": echo,
                        "target": echo_target,
                        "request": prepared.response,
                        "body": files["echo_grpc"],
                        "token": prepared.token,
                        "response": prepared.response,
                        "shapes": SHAPES,
                    },
                )
        for server in servers:
            server.record_idle()
        for t in targets:
            kv.check_grpc(t["target"], t["request"], t["token"], t["response"])
        bare_rps: dict[str, float] = {}
        for shape in SHAPES:
            for t in targets:
                if shape not in t["shapes"]:
                    continue
                result = ctx.h2load(
                    f"http://{t['target']}{kv.GET_PATH}",
                    shape,
                    server=t["server"],
                    body=t["body"],
                    headers=_h2load_headers(t["token"]),
                    expect_body_bytes=5 + len(t["response"]),
                )
                row = {
                    "id": f"grpc/{t['key']}/{shape.key}",
                    "target": t["name"],
                    "in_flight": shape.in_flight,
                    "h2load": shape.label,
                    **result,
                }
                if t["key"] == "bare":
                    bare_rps[shape.key] = result["rps"]  # type: ignore[assignment]
                elif bare_rps.get(shape.key):
                    row["ratio_vs_bare"] = round(result["rps"] / bare_rps[shape.key], 3)  # type: ignore[operator]
                rows.append(row)
        for t in targets:  # still answering correctly after the load
            kv.check_grpc(t["target"], t["request"], t["token"], t["response"])
    return {
        "title": TITLE,
        "rows": rows,
        "payload": {
            "request_bytes_gateway": len(targets[1]["request"]),
            "request_bytes_echo": len(targets[0]["request"]),
            "response_bytes": len(targets[0]["response"]),
        },
    }

