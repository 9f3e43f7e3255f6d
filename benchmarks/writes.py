"""Section 8 — the KeyValue write path: Set and Delete through the KeyValue service, in this
process, on each durable backend (SQLite file, local Postgres, local Redis), one call at a time.

No transport and no session: what is measured is the service's own work per write — the adapter
calls it makes and their round trips to the backend — which the transports then add to equally.
Each row is ``CALLS`` sequential calls over 50 keys with 100-byte values after a warm-up; the
values are small, so no chunking, and each write also learns whether it replaced a chunked value
(the KeyValue service's chunk cleanup). Run at two commits with the same module to compare write
paths: ``python -m benchmarks.run --only writes``.
"""

from __future__ import annotations

import pathlib
import statistics
import tempfile
import time
from types import SimpleNamespace
from typing import Any

import uvloop

from benchmarks.context import Context

TITLE = "KeyValue write path: Set and Delete through the service, one at a time, per backend"
NAMESPACE = "prism-bench-writes"
CALLS, WARMUP, KEYS = 3000, 300, 50
BACKENDS = {
    "sqlite": {"type": "sqlite", "path": "writes.db"},
    "postgres": {"type": "postgres", "dsn": "postgresql://postgres@127.0.0.1:5432/test"},
    "redis": {"type": "redis", "url": "redis://127.0.0.1:6379/0"},
}


async def _measure(backend: str, data_dir: pathlib.Path) -> list[dict[str, Any]]:
    from app.backends import Backends
    from app.configs import from_settings
    from app.services.keyvalue import KeyValueService
    from app.settings import Limits, NamedConfig, Settings
    from prism.v1 import keyvalue_pb2 as kv

    settings = Settings(
        data_dir=data_dir,
        backends={backend: BACKENDS[backend]},
        configs=[NamedConfig(name="kv", pattern="KEY_VALUE", backend=backend, namespace=NAMESPACE)],
    )
    backends = Backends(settings)
    await backends.start()
    service = KeyValueService(backends, Limits(), b"k" * 32)
    call = SimpleNamespace(config=from_settings(settings.configs[0], settings), method=SimpleNamespace(name="Set"))
    value = b"v" * 100
    operations = {
        "Set": lambda i: service.Set(kv.SetRequest(key=f"k{i % KEYS}", value=value), call),
        "Delete": lambda i: service.Delete(kv.DeleteRequest(key=f"k{i % KEYS}"), call),
    }
    rows = []
    try:
        for operation, run in operations.items():
            for i in range(WARMUP):
                await run(i)
            seconds = []
            for i in range(CALLS):
                if operation == "Delete":  # each Delete removes a stored key, as in use
                    await operations["Set"](i)
                started = time.perf_counter()
                await run(i)
                seconds.append(time.perf_counter() - started)
            cuts = statistics.quantiles(seconds, n=100)
            rows.append({
                "id": f"writes/{backend}/{operation}",
                "backend": backend,
                "operation": operation,
                "calls": CALLS,
                "mean_ms": statistics.fmean(seconds) * 1000,
                "p50_ms": cuts[49] * 1000,
                "p99_ms": cuts[98] * 1000,
            })
        for i in range(KEYS):
            await service.Delete(kv.DeleteRequest(key=f"k{i}"), call)
    finally:
        await backends.close()
    return rows


def run(ctx: Context) -> dict[str, Any]:
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        for backend in BACKENDS:
            rows += uvloop.run(_measure(backend, pathlib.Path(scratch)))
    return {"title": TITLE, "rows": rows}
