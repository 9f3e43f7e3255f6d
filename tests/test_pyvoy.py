"""pyvoy as the HTTP server: several worker processes on one port, and TLS.

Each worker is its own process and gateway; /metrics answers the process's own figures, and
``prism_worker_info`` names the process that served a connection.
"""

from __future__ import annotations

import asyncio
import pathlib
import re

import httpx

from tests.gateway_process import start_gateway

WORKER_PID = re.compile(r'^prism_worker_info\{pid="(\d+)"\} 1\.0$', re.MULTILINE)


async def test_connections_spread_over_the_workers(tmp_path: pathlib.Path) -> None:
    gateway = start_gateway(tmp_path, "pyvoy", extra_args=("--workers", "2"))
    try:

        async def worker_of_a_new_connection() -> str:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
                found = WORKER_PID.search((await http.get("/metrics")).text)
                assert found is not None
                return found.group(1)

        workers = set(await asyncio.gather(*(worker_of_a_new_connection() for _ in range(40))))
        assert len(workers) == 2, workers
    finally:
        gateway.stop()
