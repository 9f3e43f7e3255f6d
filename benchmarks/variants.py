"""The cost of a gateway feature per request: the same KeyValue Get (SQLite, config ``kv`` in the
bench namespace ``prism-bench``) on gateways started from configurations that differ only in
that feature, measured side by side — throughput with h2load (gRPC 4 connections × 16 streams,
REST HTTP/1.1 64 connections) and latency at a fixed rate, open loop (gRPC and REST HTTP/1.1),
the variants alternating. Each row of a variant other than the baseline carries its ratio to
the baseline's RPS and its Δ p50 / p99 (variant − baseline). Sections: ``auth_cost.py``,
``tracing_cost.py``.
"""

from __future__ import annotations

import pathlib
from collections.abc import Callable, Sequence
from typing import Any

import yaml

from benchmarks import kv, procs
from benchmarks.context import Context
from benchmarks.loader import Shape

NAMESPACE = "prism-bench"
GRPC_SHAPE = Shape(4, 16)
HTTP_SHAPE = Shape(64, 1)


def base_config() -> dict[str, Any]:
    """What every variant starts from."""
    return {
        "backends": {"sqlite": {"type": "sqlite"}},
        "configs": [{"name": "kv", "pattern": "KEY_VALUE", "backend": "sqlite", "namespace": NAMESPACE}],
        "namespaces": [{"name": NAMESPACE}],
    }


def write(path: pathlib.Path, config: dict[str, Any]) -> pathlib.Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def measure(
    ctx: Context,
    section: str,
    configs: dict[str, pathlib.Path],
    baseline: str,
    *,
    api_keys: dict[str, str] | None = None,
    check: Callable[[dict[str, procs.Server]], None] | None = None,
) -> list[dict[str, Any]]:
    """Rows ``<section>/<measurement>/<variant>``; ``check`` runs once every gateway is up,
    before the load (e.g. that a variant really has its feature on)."""
    d = ctx.durations
    variants: Sequence[str] = list(configs)
    api_keys = api_keys or {}
    rows: list[dict[str, Any]] = []
    work = ctx.subdir(section)
    gateways: dict[str, procs.Server] = {}
    prepared: dict[str, kv.Prepared] = {}
    files: dict[str, dict[str, pathlib.Path]] = {}
    with ctx.serving(section, f"h2load 64 in flight, open loop {d.rate:g} calls/s") as servers:
        for variant in variants:
            gw = procs.gateway(ctx.workdir, "granian", config=configs[variant])
            gw.name = f"gateway (granian, {variant})"
            servers.append(gw)
            gateways[variant] = gw
            prepared[variant] = kv.prepare(f"127.0.0.1:{gw.grpc_port}", gw.http_port, api_key=api_keys.get(variant, ""))
            files[variant] = prepared[variant].write(ctx.subdir(f"{section}-{variant}"))
        if check is not None:
            check(gateways)
        for gw in servers:
            gw.record_idle()
        measured: dict[tuple[str, str], dict[str, Any]] = {}

        def keep(key: str, name: str, transport: str, variant: str, result: dict[str, Any], **extra: Any) -> None:
            row = {"id": f"{section}/{key}/{variant}", **result, "measurement": name, "transport": transport,
                   "gateway": variant, **extra}
            measured[(key, variant)] = row
            rows.append(row)

        for variant in variants:  # throughput
            gw, p = gateways[variant], prepared[variant]
            kv.check_grpc(f"127.0.0.1:{gw.grpc_port}", p.request, p.token, p.response)
            result = ctx.h2load(f"http://127.0.0.1:{gw.grpc_port}{kv.GET_PATH}", GRPC_SHAPE, server=gw,
                                body=files[variant]["gateway_grpc"],
                                headers=["content-type: application/grpc", "te: trailers",
                                         f"{kv.SESSION_HEADER}: {p.token}"],
                                expect_body_bytes=5 + len(p.response))
            keep("grpc-throughput", "throughput", "gRPC", variant, result, load=f"h2load {GRPC_SHAPE.label}")
        for variant in variants:
            gw, p = gateways[variant], prepared[variant]
            result = ctx.h2load(f"http://127.0.0.1:{gw.http_port}/v1/kv/{kv.KEY}", HTTP_SHAPE, server=gw, h1=True,
                                headers=[f"{kv.SESSION_HEADER}: {p.token}"], expect_body_bytes=len(p.json_body))
            keep("rest-throughput", "throughput", "REST HTTP/1.1", variant, result, load=f"h2load --h1 {HTTP_SHAPE.label}")
        for transport_key, transport in (("grpc-latency", "gRPC"), ("rest-latency", "REST HTTP/1.1")):
            for variant in variants:
                gw, p = gateways[variant], prepared[variant]
                if transport == "gRPC":
                    (work / f"get-request-{variant}.bin").write_bytes(p.request)
                    args = ["--kind", "grpc", "--port", str(gw.grpc_port), "--path", kv.GET_PATH, "--payload-file",
                            str(work / f"get-request-{variant}.bin"), f"--token={p.token}",
                            "--expect-bytes", str(len(p.response))]
                else:
                    args = ["--kind", "http", "--port", str(gw.http_port), "--path", f"/v1/kv/{kv.KEY}",
                            f"--token={p.token}", "--expect-bytes", str(len(p.json_body))]
                result = ctx.least_disturbed(
                    lambda args=args, gw=gw: ctx.client(
                        "benchmarks.openloop", *args, "--rate", str(d.rate), "--duration", str(d.extra_latency),
                        "--warmup", str(max(d.warmup, 0.5)), server=gw,
                    )
                )
                if result["errors"]:
                    raise RuntimeError(f"{variant} {transport}: {result['errors']} failed calls, first: {result['first_error']}")
                result["rps"] = result["achieved_rps"]
                keep(transport_key, f"open loop {d.rate:g}/s", transport, variant, result,
                     load=f"open loop {d.rate:g}/s, {d.extra_latency:g} s")
        for (key, variant), row in measured.items():
            if variant == baseline:
                continue
            base = measured[(key, baseline)]
            if "throughput" in key and base.get("rps"):
                row["rps_vs_base"] = round(row["rps"] / base["rps"], 3)
            for q in ("p50", "p99"):
                row[f"vs_base_{q}_ms"] = round(row[f"{q}_ms"] - base[f"{q}_ms"], 3)
        for variant in variants:  # still answering correctly after the load
            gw, p = gateways[variant], prepared[variant]
            kv.check_grpc(f"127.0.0.1:{gw.grpc_port}", p.request, p.token, p.response)
        for variant in variants:
            try:
                kv.delete(f"127.0.0.1:{gateways[variant].grpc_port}", prepared[variant].token)
            except Exception:  # the data directory is scratch anyway
                pass
    return rows
