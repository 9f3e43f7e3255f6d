"""Section 6 — added latency on Redis and Postgres (issue 5): the gateway's KeyValue Get on a
``kv-redis`` / ``kv-postgres`` config against the same read through the backend's own Python
client directly, at a fixed 500 calls/s (open loop, benchmarks/openloop.py).

One gateway (Granian, one worker, as ``prism serve`` runs) started with a server configuration
declaring both backends (local servers, see ../shared/DESIGN.md) and a KEY_VALUE config on each,
in the bench-only namespace ``prism-bench``. The key is set through the gateway; the direct
client (its own process, like the gateway's callers) reads that very record:

    redis     redis.asyncio, a BlockingConnectionPool like the adapter's, HMGET of the record
              hash (fields v, e, x) decoded by the adapter's own function
    postgres  asyncpg, a pool like the adapter's (1..10), the adapter's SELECT and parameters

    added = gateway - direct client, same backend (what the gateway costs on top of the store)

The namespace is removed from both servers at the end (and at the start, should an earlier run
have been interrupted).
"""

from __future__ import annotations

import asyncio
import pathlib
from typing import Any

import yaml

from benchmarks import kv, procs
from benchmarks.context import Context

TITLE = "Added latency on Redis and Postgres: gateway KeyValue Get vs the backend's own client"
NAMESPACE = "prism-bench"  # bench-only: created by this section and removed at its end
REDIS_URL = "redis://127.0.0.1:6379/0"
POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
BACKENDS = {
    "redis": ("Redis", "redis.asyncio HMGET directly (client process)"),
    "postgres": ("Postgres", "asyncpg SELECT directly (client process)"),
}
PROCESS_NAMES = {"redis": "redis-server", "postgres": "postgres"}  # their CPU is counted apart


def write_config(path: pathlib.Path) -> pathlib.Path:
    path.write_text(yaml.safe_dump({
        "backends": {
            "redis": {"type": "redis", "url": REDIS_URL},
            "postgres": {"type": "postgres", "dsn": POSTGRES_DSN},
        },
        "configs": [
            {"name": "kv-redis", "pattern": "KEY_VALUE", "backend": "redis", "namespace": NAMESPACE},
            {"name": "kv-postgres", "pattern": "KEY_VALUE", "backend": "postgres", "namespace": NAMESPACE},
        ],
        "namespaces": [{"name": NAMESPACE}],
    }, sort_keys=False))
    return path


def cleanup() -> dict[str, int]:
    """Remove every trace of the bench namespace (its records, indexes, idempotency entries)."""
    import redis

    removed = {"redis_keys": 0, "postgres_rows": 0}
    client = redis.Redis.from_url(REDIS_URL)
    try:
        names = list(client.scan_iter(match=f"prism:*{NAMESPACE}*".encode(), count=1000))
        if names:
            removed["redis_keys"] = client.delete(*names)
    finally:
        client.close()

    async def postgres() -> int:
        import asyncpg

        con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        try:
            if not await con.fetchval("SELECT to_regclass('prism_kv') IS NOT NULL"):
                return 0
            status = await con.execute(
                "DELETE FROM prism_kv WHERE position($1::bytea in namespace) > 0", NAMESPACE.encode()
            )
            return int(status.split()[-1])
        finally:
            await con.close()

    removed["postgres_rows"] = asyncio.run(postgres())
    return removed


def run(ctx: Context) -> dict[str, Any]:
    d = ctx.durations
    rows: list[dict[str, Any]] = []
    work = ctx.subdir("backends")
    leftover = cleanup()
    prepared: dict[str, kv.Prepared] = {}
    removed: dict[str, int] = {}
    with ctx.serving("backends", f"open loop {d.rate:g} calls/s") as servers:
        gw = procs.gateway(ctx.workdir, "granian", config=write_config(work / "prism.yaml"))
        servers.append(gw)
        target = f"127.0.0.1:{gw.grpc_port}"
        try:
            for backend in BACKENDS:
                prepared[backend] = kv.prepare(target, gw.http_port, config=f"kv-{backend}")
            gw.record_idle()
            for backend, (label, direct_name) in BACKENDS.items():
                p = prepared[backend]
                (work / f"get-request-{backend}.bin").write_bytes(p.request)
                direct_args = ["--kind", backend, "--namespace", NAMESPACE, "--key", kv.KEY,
                               "--expect-bytes", str(len(kv.VALUE))]
                plan = [
                    ("direct", direct_name, "—", None, direct_args),
                    ("grpc/gateway", "gateway (granian)", "gRPC", gw,
                     ["--kind", "grpc", "--port", str(gw.grpc_port), "--path", kv.GET_PATH, "--payload-file",
                      str(work / f"get-request-{backend}.bin"), f"--token={p.token}",
                      "--expect-bytes", str(len(p.response))]),
                    ("rest/gateway", "gateway (granian)", "REST HTTP/1.1", gw,
                     ["--kind", "http", "--port", str(gw.http_port), "--path", f"/v1/kv/{kv.KEY}",
                      f"--token={p.token}", "--expect-bytes", str(len(p.json_body))]),
                ]
                by_key: dict[str, dict[str, Any]] = {}
                for key, name, transport, server, args in plan:
                    result = ctx.least_disturbed(
                        lambda args=args, server=server, name=PROCESS_NAMES[backend]: ctx.client(
                            "benchmarks.openloop", *args, "--rate", str(d.rate), "--duration", str(d.extra_latency),
                            "--warmup", str(max(d.warmup, 0.5)), server=server, backend=name,
                        )
                    )
                    if result["errors"]:
                        raise RuntimeError(f"{label} {name}: {result['errors']} failed calls, first: {result['first_error']}")
                    row = {"id": f"backends/{backend}/{key}", "backend": label, "target": name,
                           "transport": transport, **result}
                    by_key[key] = row
                    rows.append(row)
                for key, row in by_key.items():
                    if key != "direct":
                        for q in ("p50", "p99"):
                            row[f"added_{q}_ms"] = round(row[f"{q}_ms"] - by_key["direct"][f"{q}_ms"], 3)
            for backend, p in prepared.items():  # still answering the same after the load
                if kv.http_get(gw.http_port, f"/v1/kv/{kv.KEY}", p.token) != p.json_body:  # type: ignore[arg-type]
                    raise RuntimeError(f"gateway on {backend} answers differently after the load")
        finally:
            for p in prepared.values():
                try:
                    kv.delete(target, p.token)
                except Exception:  # the sweep below removes it anyway
                    pass
            removed = cleanup()
    return {"title": TITLE, "rows": rows, "namespace": NAMESPACE, "leftover_before": leftover,
            "removed_after": removed}
