"""Section 7 — the added cost of authentication per request (issue 4): the same KeyValue Get
(SQLite, config ``kv`` in the bench namespace ``prism-bench``) on two gateways started from the
same server configuration, one in dev mode and one with everything of issue 4 switched on:

    auth      an API key (``auth.api_keys``; the session is created with ``x-api-key``), a policy
              granting KEY_VALUE.* (and SESSION.*) in the namespace to the key's role, a namespace
              rate limit so high it never refuses (the token bucket is still checked on every
              call) and the audit log written to a file (one JSON line per call)
    dev       no auth: every caller "anonymous", no policy, no rate limit, no audit

Per request both resolve the session token; the auth gateway also authorizes, takes a token
from the bucket and queues an audit record. Measured side by side, both on Granian (one worker):
throughput with h2load (gRPC 4 connections × 16 streams; REST HTTP/1.1 64 connections) and
latency at 500 calls/s open loop (gRPC and REST HTTP/1.1), dev and auth alternating.
"""

from __future__ import annotations

import pathlib
from typing import Any

import yaml

from benchmarks import kv, procs
from benchmarks.context import Context
from benchmarks.loader import Shape

TITLE = "Cost of authentication: gateway with auth, RBAC, rate limit and audit vs dev mode"
NAMESPACE = "prism-bench"
API_KEY = "prism_bench_" + "k" * 40  # a throwaway key for this run's own gateway only
GRPC_SHAPE = Shape(4, 16)
HTTP_SHAPE = Shape(64, 1)
MODES = ("dev", "auth")


def write_config(path: pathlib.Path, mode: str, audit_file: pathlib.Path) -> pathlib.Path:
    from app.auth.api_keys import hash_key

    config: dict[str, Any] = {
        "backends": {"sqlite": {"type": "sqlite"}},
        "configs": [{"name": "kv", "pattern": "KEY_VALUE", "backend": "sqlite", "namespace": NAMESPACE}],
        "namespaces": [{"name": NAMESPACE}],
    }
    if mode == "auth":
        config.update({
            "auth": {"api_keys": [{"identity": "bench-client", "sha256": hash_key(API_KEY), "roles": ["bench"]}]},
            "policies": [{"role": "bench", "namespaces": [NAMESPACE], "operations": ["KEY_VALUE.*", "SESSION.*"]}],
            "namespaces": [{"name": NAMESPACE,
                            "rate_limit": {"requests_per_second": 10_000_000, "burst": 10_000_000}}],
            "audit": {"sink": str(audit_file)},
        })
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def _lines(path: pathlib.Path) -> int:
    try:
        return sum(1 for _ in path.open("rb"))
    except OSError:
        return 0


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.durations
    rows: list[dict[str, Any]] = []
    work = ctx.subdir("auth")
    audit_file = work / "audit.jsonl"
    gateways: dict[str, procs.Server] = {}
    prepared: dict[str, kv.Prepared] = {}
    files: dict[str, dict[str, pathlib.Path]] = {}
    with ctx.serving("auth", f"h2load 64 in flight, open loop {d.rate:g} calls/s") as servers:
        for mode in MODES:
            gw = procs.gateway(ctx.workdir, "granian", config=write_config(work / f"prism-{mode}.yaml", mode, audit_file))
            gw.name = f"gateway (granian, {mode})"
            servers.append(gw)
            gateways[mode] = gw
            prepared[mode] = kv.prepare(f"127.0.0.1:{gw.grpc_port}", gw.http_port, api_key=API_KEY if mode == "auth" else "")
            files[mode] = prepared[mode].write(ctx.subdir(f"auth-{mode}"))
        # The auth gateway really refuses a call without the key (else the comparison is void).
        try:
            kv.create_session(f"127.0.0.1:{gateways['auth'].grpc_port}", "kv")
        except Exception as exc:  # grpc.RpcError expected
            refused = getattr(exc, "code", lambda: None)()
            if refused is None or refused.name != "UNAUTHENTICATED":
                raise
        else:
            raise RuntimeError("the auth gateway opened a session without an API key")
        for gw in servers:
            gw.record_idle()
        audit_before = _lines(audit_file)
        measured: dict[tuple[str, str], dict[str, Any]] = {}

        def keep(key: str, name: str, transport: str, mode: str, result: dict[str, Any], **extra: Any) -> None:
            row = {"id": f"auth/{key}/{mode}", **result, "measurement": name, "transport": transport, "gateway": mode,
                   **extra}
            measured[(key, mode)] = row
            rows.append(row)

        for mode in MODES:  # throughput
            gw, p = gateways[mode], prepared[mode]
            kv.check_grpc(f"127.0.0.1:{gw.grpc_port}", p.request, p.token, p.response)
            result = ctx.h2load(f"http://127.0.0.1:{gw.grpc_port}{kv.GET_PATH}", GRPC_SHAPE, server=gw,
                                body=files[mode]["gateway_grpc"],
                                headers=["content-type: application/grpc", "te: trailers",
                                         f"{kv.SESSION_HEADER}: {p.token}"],
                                expect_body_bytes=5 + len(p.response))
            keep("grpc-throughput", "throughput", "gRPC", mode, result, load=f"h2load {GRPC_SHAPE.label}")
        for mode in MODES:
            gw, p = gateways[mode], prepared[mode]
            result = ctx.h2load(f"http://127.0.0.1:{gw.http_port}/v1/kv/{kv.KEY}", HTTP_SHAPE, server=gw, h1=True,
                                headers=[f"{kv.SESSION_HEADER}: {p.token}"], expect_body_bytes=len(p.json_body))
            keep("rest-throughput", "throughput", "REST HTTP/1.1", mode, result, load=f"h2load --h1 {HTTP_SHAPE.label}")
        for transport_key, transport in (("grpc-latency", "gRPC"), ("rest-latency", "REST HTTP/1.1")):
            for mode in MODES:
                gw, p = gateways[mode], prepared[mode]
                if transport == "gRPC":
                    (work / f"get-request-{mode}.bin").write_bytes(p.request)
                    args = ["--kind", "grpc", "--port", str(gw.grpc_port), "--path", kv.GET_PATH, "--payload-file",
                            str(work / f"get-request-{mode}.bin"), f"--token={p.token}",
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
                    raise RuntimeError(f"{mode} {transport}: {result['errors']} failed calls, first: {result['first_error']}")
                result["rps"] = result["achieved_rps"]
                keep(transport_key, f"open loop {d.rate:g}/s", transport, mode, result,
                     load=f"open loop {d.rate:g}/s, {d.extra_latency:g} s")
        for (key, mode), row in measured.items():
            if mode != "auth":
                continue
            dev = measured[(key, "dev")]
            if "throughput" in key and dev.get("rps"):
                row["rps_vs_dev"] = round(row["rps"] / dev["rps"], 3)
            for q in ("p50", "p99"):
                row[f"vs_dev_{q}_ms"] = round(row[f"{q}_ms"] - dev[f"{q}_ms"], 3)
        for mode in MODES:  # still answering correctly after the load
            gw, p = gateways[mode], prepared[mode]
            kv.check_grpc(f"127.0.0.1:{gw.grpc_port}", p.request, p.token, p.response)
        audit_after = _lines(audit_file)
        for mode in MODES:
            try:
                kv.delete(f"127.0.0.1:{gateways[mode].grpc_port}", prepared[mode].token)
            except Exception:  # the data directory is scratch anyway
                pass
    return {"title": TITLE, "rows": rows, "namespace": NAMESPACE,
            "audit_lines_during_load": audit_after - audit_before}
