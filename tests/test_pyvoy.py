"""pyvoy as the HTTP server: several worker processes on one port, and TLS.

Each worker is its own process and gateway; /metrics answers the process's own figures, so a
worker's ``process_start_time_seconds`` tells which one served a connection.
"""

from __future__ import annotations

import asyncio
import pathlib
import re

import httpx

from tests.gateway_process import start_gateway

START_TIME = re.compile(r"^process_start_time_seconds (\S+)$", re.MULTILINE)


async def test_connections_spread_over_the_workers(tmp_path: pathlib.Path) -> None:
    gateway = start_gateway(tmp_path, "pyvoy", extra_args=("--workers", "2"))
    try:

        async def worker_of_a_new_connection() -> str:
            async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
                found = START_TIME.search((await http.get("/metrics")).text)
                assert found is not None
                return found.group(1)

        workers = set(await asyncio.gather(*(worker_of_a_new_connection() for _ in range(40))))
        assert len(workers) == 2, workers
    finally:
        gateway.stop()
