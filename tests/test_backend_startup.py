"""Backend settings and start-up: a backend entry takes only its own type's settings, and several
gateway processes starting at once on an empty PostgreSQL schema all come up, creating it once."""

from __future__ import annotations

import asyncio
import uuid

import asyncpg
import pytest

from adapters.keyvalue.postgres import MIGRATIONS, migrate
from app.settings import SettingsError, load_settings
from tests.gateway_process import start_gateway, wait_ready
from tests.servers import POSTGRES_DSN, unreachable


def test_backend_settings_have_defaults_and_belong_to_their_type(tmp_path) -> None:  # type: ignore[no-untyped-def]
    config = tmp_path / "prism.yaml"
    config.write_text("backends:\n  pg: {type: postgres}\n  cache: {type: redis, pool_size: 4}\nconfigs: []\n")
    settings = load_settings(config, environ={})
    assert settings.backends["pg"].dsn == "postgresql://postgres@127.0.0.1:5432/test"
    assert (settings.backends["cache"].url, settings.backends["cache"].pool_size) == ("redis://127.0.0.1:6379/0", 4)
    config.write_text("backends:\n  cache: {type: redis, dsn: 'postgresql://x'}\nconfigs: []\n")
    with pytest.raises(SettingsError, match=r"backends\.cache: .*dsn: not a setting of a redis backend"):
        load_settings(config, environ={})


async def test_gateways_starting_together_create_the_postgres_schema_once(tmp_path) -> None:  # type: ignore[no-untyped-def]
    if reason := unreachable(POSTGRES_DSN):
        pytest.skip(reason)
    schema = f"prism_startup_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f"CREATE SCHEMA {schema}")
    config = (
        f'backends:\n  pg: {{type: postgres, dsn: "{POSTGRES_DSN}?search_path={schema}", pool_size: 2}}\n'
        "configs:\n  - {name: kv, pattern: KEY_VALUE, backend: pg}\n"
    )
    gateways = [start_gateway(tmp_path / f"g{i}", config_yaml=config, wait=False) for i in range(4)]
    try:
        for gateway in gateways:
            wait_ready(gateway)
        tables = await admin.fetch(
            "SELECT table_name FROM information_schema.tables WHERE table_schema = $1 ORDER BY 1", schema
        )
        # The KeyValue tables, once (the Queue adapter on the same backend adds its own prism_q_*).
        assert [t["table_name"] for t in tables if not t["table_name"].startswith("prism_q")] == ["prism_kv", "prism_schema"]
        assert await admin.fetchval(f"SELECT version FROM {schema}.prism_schema WHERE component = 'keyvalue'") == len(MIGRATIONS)
    finally:
        for gateway in gateways:
            gateway.stop()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()


async def test_concurrent_migrations_take_turns() -> None:
    """Eight connections migrating one empty schema at the same instant: without the advisory
    lock, all but one fail on CREATE TABLE's catalog unique index."""
    if reason := unreachable(POSTGRES_DSN):
        pytest.skip(reason)
    schema = f"prism_startup_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(POSTGRES_DSN)
    await admin.execute(f"CREATE SCHEMA {schema}")
    connections = []
    try:
        connections = await asyncio.gather(
            *(asyncpg.connect(f"{POSTGRES_DSN}?search_path={schema}") for _ in range(8))
        )
        outcomes = await asyncio.gather(*(migrate(c) for c in connections), return_exceptions=True)
        assert outcomes == [None] * 8
        assert await admin.fetchval(f"SELECT version FROM {schema}.prism_schema") == len(MIGRATIONS)
    finally:
        for connection in connections:
            await connection.close()
        await admin.execute(f"DROP SCHEMA {schema} CASCADE")
        await admin.close()
