"""PII namespaces: values stored encrypted (AES-GCM, adapters/keyvalue/encrypted.py) on SQLite,
Postgres and Redis, read back in clear through the gateway, still read after a key rotation, and
never written in clear to the process log or the audit log."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import os
import pathlib
import sqlite3
import subprocess
import sys
import uuid

import asyncpg
import grpc
import httpx
import pytest
import redis.asyncio as aioredis

from adapters.keyvalue.encrypted import MARKER, Keyring
from adapters.keyvalue.redis import record_key
from app.settings import SettingsError, load_settings
from prism.errors import PrismError
from prism.v1 import keyvalue_pb2 as kv
from tests.gateway_process import start_gateway
from tests.servers import POSTGRES_DSN, REDIS_URL, purge_namespaces, unreachable

NAMESPACE = f"pii-{uuid.uuid4().hex[:8]}"
BACKENDS = ("sqlite", "postgres", "redis")
SECRET = "4111 1111 1111 1111, Jane Q. Public"
K1, K2 = base64.b64encode(os.urandom(32)).decode(), base64.b64encode(os.urandom(32)).decode()


def config(audit: pathlib.Path, keys: dict[str, str], current: str) -> str:
    key_lines = "\n".join(f"    {key_id}: {key}" for key_id, key in keys.items())
    return f"""
backends:
  sqlite: {{type: sqlite}}
  postgres: {{type: postgres, dsn: "{POSTGRES_DSN}"}}
  redis: {{type: redis, url: "{REDIS_URL}"}}
namespaces:
  - {{name: {NAMESPACE}, pii: true}}
configs:
{chr(10).join(f"  - {{name: secret-{b}, pattern: KEY_VALUE, backend: {b}, namespace: {NAMESPACE}}}" for b in BACKENDS)}
encryption:
  current: {current}
  keys:
{key_lines}
audit: {{sink: {audit}}}
"""


async def stored(backend: str, data_dir: pathlib.Path, key: str) -> bytes:
    """The bytes the backend holds for the key, read around the gateway."""
    if backend == "sqlite":
        with sqlite3.connect(data_dir / "prism.db") as db:
            (value,) = db.execute("SELECT value FROM prism_kv WHERE namespace = ? AND key = ?", (NAMESPACE, key)).fetchone()
        return bytes(value)
    if backend == "postgres":
        con = await asyncpg.connect(POSTGRES_DSN)
        try:
            return bytes(await con.fetchval(
                "SELECT value FROM prism_kv WHERE namespace = $1 AND key = $2", NAMESPACE.encode(), key.encode()
            ))
        finally:
            await con.close()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        name = record_key(NAMESPACE, key)
        if (await client.type(name)) == b"hash":
            return b"".join(v for pair in (await client.hgetall(name)).items() for v in pair)
        return await client.get(name) or b""
    finally:
        await client.aclose()


@pytest.fixture(scope="module", autouse=True)
def servers() -> None:
    for url in (POSTGRES_DSN, REDIS_URL):
        if why := unreachable(url):
            pytest.skip(why)


async def test_pii_values_are_ciphertext_at_rest_clear_to_clients_and_survive_rotation(tmp_path: pathlib.Path) -> None:
    audit = tmp_path / "audit.log"
    gateway = start_gateway(tmp_path, "hypercorn", config_yaml=config(audit, {"k1": K1}, "k1"), extra_args=("--log-level", "debug"))
    tokens: dict[str, str] = {}
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            for backend in BACKENDS:
                tokens[backend] = (await http.post("/v1/sessions", json={"configName": f"secret-{backend}"})).json()["token"]
                session = {"x-prism-session": tokens[backend]}
                value = base64.b64encode(SECRET.encode()).decode()
                assert (await http.put("/v1/kv/card", json={"value": value}, headers=session)).status_code == 200
                got = (await http.get("/v1/kv/card", headers=session)).json()
                assert base64.b64decode(got["value"]).decode() == SECRET
                raw = await stored(backend, tmp_path / "data", "card")
                assert SECRET.encode() not in raw and MARKER in raw, (backend, raw[:40])
                assert b"\x02k1" in raw[:40], "the key id is stored with the ciphertext"
    finally:
        gateway.stop()
    first_log = gateway.log()

    # Rotation: k2 current, k1 still listed; the old value reads, a new write uses k2.
    gateway = start_gateway(tmp_path, "hypercorn", config_yaml=config(audit, {"k1": K1, "k2": K2}, "k2"), extra_args=("--log-level", "debug"))
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            for backend in BACKENDS:
                token = (await http.post("/v1/sessions", json={"configName": f"secret-{backend}"})).json()["token"]
                session = {"x-prism-session": token}
                got = (await http.get("/v1/kv/card", headers=session)).json()
                assert base64.b64decode(got["value"]).decode() == SECRET, backend
                value = base64.b64encode(b"new " + SECRET.encode()).decode()
                assert (await http.put("/v1/kv/card2", json={"value": value}, headers=session)).status_code == 200
                raw = await stored(backend, tmp_path / "data", "card2")
                assert b"\x02k2" in raw[:40] and SECRET.encode() not in raw
    finally:
        gateway.stop()
        await purge_namespaces(["postgres", "redis"], [NAMESPACE])

    for text in (first_log, gateway.log(), audit.read_text()):
        assert SECRET not in text and base64.b64encode(SECRET.encode()).decode() not in text
    reads = [json.loads(line) for line in audit.read_text().splitlines() if '"KEY_VALUE.Get"' in line]
    assert len(reads) == 2 * len(BACKENDS), "every read of the PII namespace is audited"


def test_keys_are_checked_at_start_up(tmp_path: pathlib.Path) -> None:
    short = base64.b64encode(b"too short").decode()
    path = tmp_path / "prism.yaml"
    path.write_text(config(tmp_path / "a.log", {"k1": short}, "k1"))
    with pytest.raises(SettingsError, match=r"encryption.*keys.k1: 9 bytes"):
        load_settings(str(path), environ={})
    path.write_text(config(tmp_path / "a.log", {"k1": K1}, "k9").replace(f"  - {{name: {NAMESPACE}, pii: true}}", f"  - {{name: {NAMESPACE}}}"))
    with pytest.raises(SettingsError, match=r"current: no key 'k9'"):
        load_settings(str(path), environ={})
    path.write_text(config(tmp_path / "a.log", {"k1": K1}, "k1").replace("audit: {sink", "#"))
    with pytest.raises(SettingsError, match=r"pii: needs `audit\.sink`"):
        load_settings(str(path), environ={})


def test_tampered_moved_or_unkeyed_ciphertext_is_data_loss() -> None:
    keyring = Keyring({"k1": os.urandom(32)}, "k1")
    sealed = keyring.encrypt(b"secret", b"ns\x00a")
    assert keyring.decrypt(sealed, b"ns\x00a") == b"secret"
    assert keyring.decrypt(b"written before pii", b"ns\x00a") == b"written before pii"
    for bad, associated in ((sealed[:-1] + bytes([sealed[-1] ^ 1]), b"ns\x00a"), (sealed, b"ns\x00b")):
        with pytest.raises(PrismError) as caught:
            keyring.decrypt(bad, associated)
        assert caught.value.code == grpc.StatusCode.DATA_LOSS
    with pytest.raises(PrismError, match="key 'k1', which is not configured"):
        Keyring({"k2": os.urandom(16)}, "k2").decrypt(sealed, b"ns\x00a")


IDENTITY = "jane.q.public@example.com"  # the contract tags Session.identity as PII
API_KEY = "pii-test-" + uuid.uuid4().hex


async def test_identities_are_pseudonyms_in_logs_traces_and_audit(tmp_path: pathlib.Path) -> None:
    """A caller's identity reaches no operator stream in clear; the audit names the caller by
    the pseudonym ``prism pseudonym`` gives, so the operator can still find them."""
    audit, spans = tmp_path / "audit.log", tmp_path / "spans.jsonl"
    digest = hashlib.sha256(API_KEY.encode()).hexdigest()
    yaml = config(audit, {"k1": K1}, "k1") + f"""
auth:
  api_keys: [{{identity: "{IDENTITY}", sha256: {digest}, roles: [app]}}]
policies: [{{role: app, namespaces: ["*"], operations: ["*"]}}]
tracing: {{exporter: file, file: {spans}}}
"""
    gateway = start_gateway(tmp_path, "hypercorn", config_yaml=yaml, extra_args=("--log-level", "debug"))
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            created = await http.post("/v1/sessions", json={"configName": "secret-sqlite"}, headers={"x-api-key": API_KEY})
            assert created.status_code == 200, created.text
            assert created.json()["session"]["identity"] == IDENTITY  # the caller itself sees it
            session = {"x-prism-session": created.json()["token"]}
            assert (await http.put("/v1/kv/who", json={"value": "dg=="}, headers=session)).status_code == 200
            assert (await http.get("/v1/kv/who", headers=session)).status_code == 200
        async with grpc.aio.insecure_channel(gateway.grpc_target) as channel:
            get = channel.unary_unary("/prism.v1.KeyValueService/Get", request_serializer=kv.GetRequest.SerializeToString,
                                      response_deserializer=kv.GetResponse.FromString)  # fmt: skip
            assert (await get(kv.GetRequest(key="who"), metadata=tuple(session.items()))).value == b"v"
    finally:
        gateway.stop()
        await purge_namespaces(["postgres", "redis"], [NAMESPACE])
    command = [sys.executable, "-m", "app.cli", "pseudonym", IDENTITY, "--data-dir", str(tmp_path / "data")]
    shown = (await asyncio.to_thread(subprocess.run, command, capture_output=True, text=True, check=True)).stdout.strip()
    assert shown.startswith("pii:") and IDENTITY not in shown
    records = [json.loads(line) for line in audit.read_text().splitlines()]
    assert {r["identity"] for r in records if r.get("operation", "").startswith("KEY_VALUE")} == {shown}
    assert len(spans.read_text().splitlines()) >= 4, "the calls were traced"
    logged = gateway.log()
    assert shown in logged, "the log names the caller by its pseudonym"
    for text in (logged, audit.read_text(), spans.read_text()):
        assert IDENTITY not in text and "jane" not in text
