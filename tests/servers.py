"""The real backend servers the suites run against: where they are, whether they answer, how to
stop and start them (fault tests), and how to delete what a test run wrote into them.

The machine starts PostgreSQL and Redis before each session and CI run (see DESIGN.md); a
suite skips a backend whose server does not answer, which PRISM_REQUIRE_BACKENDS=1 (CI) turns
into a failure.
"""

from __future__ import annotations

import pathlib
import re
import shutil
import socket
import subprocess
import time
import urllib.parse
from dataclasses import dataclass

POSTGRES_DSN = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_URL = "redis://127.0.0.1:6379/0"
NATS_URL = "nats://127.0.0.1:4222"


def unreachable(url: str) -> str | None:
    """Why the server at ``url`` cannot be reached, or None when it accepts connections."""
    parts = urllib.parse.urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or {"redis": 6379}.get(parts.scheme, 5432)
    try:
        with socket.create_connection((host, port), timeout=2):
            return None
    except OSError as exc:
        return f"{parts.scheme} at {host}:{port} unreachable ({exc}); start it (see README, Testing)"


@dataclass(frozen=True)
class Server:
    """A local server with the commands that stop and start it (DESIGN.md, Ecosystem facts)."""

    name: str
    url: str
    stop_command: list[str]
    start_command: list[str]

    def missing_tools(self) -> str | None:
        for command in (self.stop_command, self.start_command):
            if not command or shutil.which(command[0]) is None:
                return f"{self.name}: cannot stop and start it here (no {command[0] if command else 'command'})"
        return None

    def up(self) -> bool:
        return unreachable(self.url) is None

    def stop(self) -> None:
        subprocess.run(self.stop_command, check=True, capture_output=True, timeout=60)
        self.wait(up=False)

    def start(self) -> None:
        subprocess.run(self.start_command, check=True, capture_output=True, timeout=60)

    def ensure_started(self) -> None:
        """Leave the server running, whatever happened before."""
        if not self.up():
            self.start()
            self.wait(up=True)

    def wait(self, *, up: bool, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while self.up() != up:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} still {'down' if up else 'up'} after {timeout}s")
            time.sleep(0.1)


def _postgres_cluster() -> list[str]:
    root = pathlib.Path("/etc/postgresql")
    versions = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    return ["pg_ctlcluster", "--skip-systemctl-redirect", versions[-1], "main"] if versions else []


POSTGRES = Server(
    "postgres",
    POSTGRES_DSN,
    stop_command=[*_postgres_cluster(), "stop"] if _postgres_cluster() else [],
    start_command=[*_postgres_cluster(), "start"] if _postgres_cluster() else [],
)
REDIS = Server(
    "redis",
    REDIS_URL,
    stop_command=["redis-cli", "-p", "6379", "shutdown", "nosave"],
    start_command=[
        "redis-server", "--daemonize", "yes", "--bind", "127.0.0.1", "-::1", "--port", "6379",
        "--save", "", "--appendonly", "no", "--dir", "/var/lib/redis",
        "--logfile", "/var/log/redis/ci.log",
    ],
)
NATS = Server(
    "nats",
    NATS_URL,
    stop_command=["start-stop-daemon", "--stop", "--oknodo", "--retry", "10", "--exec", "/usr/sbin/nats-server"],
    start_command=[
        "start-stop-daemon", "--start", "--oknodo", "--background", "--exec", "/usr/sbin/nats-server", "--",
        "-a", "127.0.0.1", "-p", "4222", "-js", "-sd", "/var/lib/nats-server", "-l", "/var/log/nats-server.log",
    ],
)


def _idempotency_namespace(namespace: str) -> str:
    # Where the KeyValue service keeps a namespace's idempotency records (app/services/keyvalue.py).
    return f"\x00idempotency\x00{namespace}"


def _chunk_namespace(namespace: str) -> str:
    # Where adapters/keyvalue/chunked.py keeps the chunks of a namespace's large values.
    return f"\x00chunks\x00{namespace}"


# The Queue adapter's tables (adapters/queue/postgres.py), each with a namespace column.
POSTGRES_QUEUE_TABLES = (
    "prism_queue_deliveries", "prism_queue_groups", "prism_queue_tokens",
    "prism_queue_messages", "prism_queue_partitions", "prism_queue_topics",
)


async def purge_namespaces(backends: list[str], namespaces: list[str]) -> None:
    """Delete everything a test run wrote under ``namespaces`` from the persistent servers."""
    every = [*namespaces, *map(_idempotency_namespace, namespaces), *map(_chunk_namespace, namespaces)]
    if "postgres" in backends:
        import asyncpg

        con = await asyncpg.connect(POSTGRES_DSN, timeout=5)
        try:
            if await con.fetchval("SELECT to_regclass('prism_kv') IS NOT NULL"):  # a fresh database has none
                await con.execute(
                    "DELETE FROM prism_kv WHERE namespace = ANY($1::bytea[])", [ns.encode() for ns in every]
                )
            for table in POSTGRES_QUEUE_TABLES:  # there once a gateway has started the Queue adapter
                if await con.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
                    await con.execute(f"DELETE FROM {table} WHERE namespace = ANY($1::text[])", namespaces)
        finally:
            await con.close()
    if "redis" in backends:
        import redis.asyncio as aioredis

        from adapters.keyvalue.redis import expiry_key, index_key, record_key
        from adapters.queue.redis import namespace_prefix

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            for ns in every:
                members = await client.zrange(index_key(ns), 0, -1)
                for i in range(0, len(members), 500):
                    await client.delete(*(record_key(ns, m.decode()) for m in members[i : i + 500]))
                await client.delete(index_key(ns), expiry_key(ns))
            for ns in namespaces:  # the Queue adapter's topics (adapters/queue/redis.py)
                prefix = namespace_prefix(ns)
                pattern = re.sub(rb"([*?\[\]\\])", rb"\\\1", prefix) + b"*"
                async for key in client.scan_iter(match=pattern, count=500):
                    await client.delete(key)
        finally:
            await client.aclose()
    if "nats" in backends:
        await _purge_nats(namespaces)


async def _purge_nats(namespaces: list[str], prefix: str = "PRISMQ") -> None:
    """Delete the Queue streams of ``namespaces`` (adapters/queue/nats.py names them) and the
    records their groups left in the adapter's key-value buckets."""
    import json

    import nats
    import nats.js.errors

    from adapters.queue.nats import namespace_streams

    starts = tuple(start for ns in namespaces for start in namespace_streams(prefix, ns))
    nc = await nats.connect(NATS_URL, connect_timeout=5, allow_reconnect=False)
    try:
        js, names, offset = nc.jetstream(), [], 0
        while True:
            page = json.loads((await nc.request("$JS.API.STREAM.NAMES", json.dumps({"offset": offset}).encode())).data)
            found = page.get("streams") or []
            names += [n for n in found if n.startswith(starts)]
            offset += len(found)
            if not found or offset >= page.get("total", 0):
                break
        for name in names:
            await js.delete_stream(name)
            for bucket in (f"{prefix}-heads", f"{prefix}-acks"):
                try:
                    await js.purge_stream(f"KV_{bucket}", subject=f"$KV.{bucket}.{name}.>")
                except nats.js.errors.NotFoundError:
                    pass
    finally:
        await nc.close()
