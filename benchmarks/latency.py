"""Section 3 — added latency: the gateway's KeyValue Get against the same read through
aiosqlite directly (same table layout, pragmas and statement as adapters/keyvalue/sqlite.py,
in the client process), at a fixed 500 calls/s (open loop, benchmarks/openloop.py) and at
saturation (closed loop, 64 in flight; the gateway's saturation rows come from sections 1-2).

The same client also calls the bare servers (grpc.aio echo, raw ASGI handler) at the same
rate: their latency is the client's and the transport's own cost, which the gateway pays too.

    added = gateway - direct aiosqlite          (what the RFC's latency budget is about)
    over bare = gateway - bare server, same transport and client (what the gateway's code adds)
"""

from __future__ import annotations

from typing import Any

from benchmarks import kv, procs
from benchmarks.context import Context
from benchmarks.procs import Server

TITLE = "Added latency: gateway KeyValue Get vs aiosqlite directly"


def _open_loop(ctx: Context, server: Server | None, *args: str) -> dict[str, Any]:
    d = ctx.durations
    return ctx.least_disturbed(
        lambda: ctx.client(
            "benchmarks.openloop", *args, "--rate", str(d.rate), "--duration", str(d.latency),
            "--warmup", str(max(d.warmup, 0.5)), server=server,
        )
    )


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.durations
    rows: list[dict[str, Any]] = []
    work = ctx.subdir("latency")
    with ctx.serving("latency", f"open loop {d.rate:g} calls/s") as servers:
        echo = procs.grpc_echo(ctx.workdir)
        servers.append(echo)
        gateways, prepared = {}, {}
        for server in ("hypercorn", "granian"):
            gateways[server] = procs.gateway(ctx.workdir, server)
            servers.append(gateways[server])
            prepared[server] = kv.prepare(f"127.0.0.1:{gateways[server].grpc_port}", gateways[server].http_port)
        first = prepared["hypercorn"]
        (work / "get-request.bin").write_bytes(first.request)
        (work / "get-response.bin").write_bytes(first.response)
        (work / "value.bin").write_bytes(kv.VALUE)
        raws = {}
        for server in ("hypercorn", "granian"):
            body = prepared[server].write(ctx.subdir(f"latency-{server}"))["json"]
            raws[server] = procs.asgi_baseline(ctx.workdir, "benchmarks.baselines.raw_asgi:app", server, body)
            servers.append(raws[server])
        for server in servers:
            server.record_idle()

        def grpc_args(port: int, payload: str, token: str) -> list[str]:
            return ["--kind", "grpc", "--port", str(port), "--path", kv.GET_PATH, "--payload-file", str(work / payload),
                    f"--token={token}", "--expect-bytes", str(len(first.response))]

        def http_args(port: int, server: str) -> list[str]:
            return ["--kind", "http", "--port", str(port), "--path", f"/v1/kv/{kv.KEY}",
                    f"--token={prepared[server].token}", "--expect-bytes", str(len(prepared[server].json_body))]

        direct_args = ["--kind", "sqlite", "--db", str(work / "direct.db"), "--payload-file", str(work / "value.bin")]
        plan: list[tuple[str, str, str, Server | None, list[str]]] = [
            ("direct", "aiosqlite directly (client process)", "—", None, direct_args),
            ("grpc/bare", "bare grpc.aio echo", "gRPC", echo,
             grpc_args(echo.grpc_port, "get-response.bin", first.token)),  # type: ignore[arg-type]
            ("grpc/gateway-hypercorn", "gateway (hypercorn)", "gRPC", gateways["hypercorn"],
             grpc_args(gateways["hypercorn"].grpc_port, "get-request.bin", first.token)),  # type: ignore[arg-type]
        ]
        for server in ("hypercorn", "granian"):
            plan.append((f"rest/raw-{server}", f"raw ASGI handler ({server})", "REST HTTP/1.1", raws[server],
                         http_args(raws[server].http_port, server)))  # type: ignore[arg-type]
            plan.append((f"rest/gateway-{server}", f"gateway ({server})", "REST HTTP/1.1", gateways[server],
                         http_args(gateways[server].http_port, server)))  # type: ignore[arg-type]
        by_key: dict[str, dict[str, Any]] = {}
        for key, name, transport, target, args in plan:
            result = _open_loop(ctx, target, *args)
            if result["errors"]:
                raise RuntimeError(f"{name}: {result['errors']} failed calls, first: {result['first_error']}")
            row = {"id": f"latency/{key}", "target": name, "transport": transport, **result}
            by_key[key] = row
            rows.append(row)
        direct = by_key["direct"]
        for key, row in by_key.items():
            if "gateway" not in key:
                continue
            bare = by_key["grpc/bare"] if key.startswith("grpc") else by_key[f"rest/raw-{key.rsplit('-', 1)[1]}"]
            for q in ("p50", "p99"):
                row[f"added_{q}_ms"] = round(row[f"{q}_ms"] - direct[f"{q}_ms"], 3)
                row[f"over_bare_{q}_ms"] = round(row[f"{q}_ms"] - bare[f"{q}_ms"], 3)
        saturated_direct = ctx.client(
            "benchmarks.openloop", *direct_args, "--closed", "64", "--duration", str(d.saturation), "--warmup", "0.5"
        )
    saturation = _saturation(ctx, saturated_direct)
    return {"title": TITLE, "rows": rows, "saturation": saturation}


def _saturation(ctx: Context, direct: dict[str, Any]) -> list[dict[str, Any]]:
    """64 in flight: the direct read here, the rest taken from sections 1 and 2 of this run."""
    rows: list[dict[str, Any]] = [
        {"id": "saturation/direct", "target": "aiosqlite directly (client process)", "transport": "—",
         "source": "closed loop, 64 in flight", **{k: direct[k] for k in ("rps", "p50_ms", "p99_ms")}}
    ]
    wanted = [
        ("grpc", "grpc/bare/c4m16", "bare grpc.aio echo", "gRPC"),
        ("grpc", "grpc/gateway-hypercorn/c4m16", "gateway (hypercorn)", "gRPC"),
        ("grpc", "grpc/gateway-granian/c4m16", "gateway (granian)", "gRPC"),
        ("rest", "rest/hypercorn/h2c/raw", "raw ASGI handler (hypercorn)", "REST h2c"),
        ("rest", "rest/hypercorn/h2c/gateway", "gateway (hypercorn)", "REST h2c"),
        ("rest", "rest/granian/h2c/raw", "raw ASGI handler (granian)", "REST h2c"),
        ("rest", "rest/granian/h2c/gateway", "gateway (granian)", "REST h2c"),
    ]
    for section, row_id, name, transport in wanted:
        source = {r["id"]: r for r in ctx.results.get(section, {}).get("rows", [])}.get(row_id)
        row: dict[str, Any] = {"id": f"saturation/{row_id}", "target": name, "transport": transport}
        if source is None:
            row["source"] = f"not measured: section {section} did not run"
        else:
            row.update(source=f"section {section}, h2load {source['h2load']}",
                       **{k: source[k] for k in ("rps", "p50_ms", "p99_ms")})
            if "gateway" in row_id:
                row["added_p50_ms"] = round(source["p50_ms"] - direct["p50_ms"], 3)
                row["added_p99_ms"] = round(source["p99_ms"] - direct["p99_ms"], 3)
        rows.append(row)
    return rows
