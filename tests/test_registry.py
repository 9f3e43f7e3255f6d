"""The backend registry: built-in types found by name, each validating its own settings with the
key named on error; one connection per backend instance, shared by its patterns; and a type
declared outside ``adapters/`` (tests/dict_backend.py) installed as a plugin and used through
REST and gRPC without touching any existing module."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

from adapters.registry import ENTRY_POINTS, known, lookup, register
from app.backends import Backends
from app.settings import Settings, SettingsError, load_settings
from prism.v1 import config_pb2, keyvalue_pb2, plugin_pb2, session_pb2
from tests import dict_backend
from tests.clients import CallError, GrpcClient, RestClient
from tests.gateway_process import start_gateway


def test_builtin_types_are_found_by_name_with_their_patterns() -> None:
    assert {"memory", "sqlite", "postgres", "redis"} <= set(known())
    assert lookup("memory").patterns == {"KEY_VALUE", "PUBSUB"}
    assert lookup("sqlite").patterns == {"KEY_VALUE", "QUEUE", "READER", "TRANSACT"}


def _load(tmp_path: pathlib.Path, backends: str) -> Settings:
    config = tmp_path / "prism.yaml"
    config.write_text(f"backends:\n{backends}configs: []\n")
    return load_settings(config, environ={})


@pytest.mark.parametrize(
    ("entry", "named"),
    [
        ("{type: postgres, pool_size: 0}", "backends.b.pool_size: Input should be greater than 0"),
        ("{type: redis, dsn: x}", "backends.b: dsn: not a setting of a redis backend"),
        ("{type: nosuch}", "backends.b.type: unknown backend type 'nosuch' (known: "),
        ("{path: x.db}", "backends.b.type: Field required"),
        ("sqlite", "backends.b: expected a mapping with a `type`"),
        ("{type: memory, required: maybe}", "backends.b.required: Input should be a valid boolean"),
    ],
)
def test_a_bad_backend_entry_names_its_key(tmp_path: pathlib.Path, entry: str, named: str) -> None:
    with pytest.raises(SettingsError) as refused:
        _load(tmp_path, f"  b: {entry}\n")
    assert named in str(refused.value)


def test_a_registered_type_validates_its_own_settings(tmp_path: pathlib.Path) -> None:
    register(dict_backend.BACKEND)
    register(dict_backend.BACKEND)  # the same declaration again: a no-op
    settings = _load(tmp_path, "  notes: {type: dict-test, capacity: 3, required: true}\n")
    assert settings.backends["notes"] == dict_backend.DictSettings(capacity=3, required=True)
    with pytest.raises(SettingsError, match=r"backends\.notes\.capacity: Input should be greater than 0"):
        _load(tmp_path, "  notes: {type: dict-test, capacity: 0}\n")
    with pytest.raises(SettingsError, match=r"backends\.notes: url: not a setting of a dict-test backend"):
        _load(tmp_path, "  notes: {type: dict-test, url: x}\n")
    assert "dict-test" in known()


async def test_one_connection_per_instance_shared_by_its_patterns(tmp_path: pathlib.Path) -> None:
    settings = Settings(data_dir=tmp_path, backends={"local": {"type": "memory"}}, configs=[])
    backends = Backends(settings)
    await backends.start()
    try:
        (instance,) = backends.instances.values()
        assert set(instance.adapters) == {"KEY_VALUE", "PUBSUB"}
        assert await backends.probe("local", 1.0) is None
    finally:
        await backends.close()


def _install_plugin(site: pathlib.Path) -> None:
    """What ``pip install`` of a package declaring the entry point leaves on sys.path."""
    dist = site / "prism_dict_test-0.1.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: prism-dict-test\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text(f"[{ENTRY_POINTS}]\ndict-test = tests.dict_backend:BACKEND\n")


CONFIG = """
backends:
  notes: {type: dict-test, capacity: 4, required: true}
configs:
  - {name: notes, pattern: KEY_VALUE, backend: notes}
"""


async def test_a_plugin_backend_serves_rest_and_grpc(tmp_path: pathlib.Path) -> None:
    _install_plugin(tmp_path / "site")
    gateway = start_gateway(tmp_path, "hypercorn", config_yaml=CONFIG, env={"PYTHONPATH": str(tmp_path / "site")})
    grpc, rest = GrpcClient(gateway.grpc_target), RestClient(gateway.base_url)
    try:
        opened = await grpc.call("/prism.v1.SessionService/CreateSession", session_pb2.CreateSessionRequest(config_name="notes"))
        token = opened.token  # type: ignore[attr-defined]
        etag = (await grpc.call("/prism.v1.KeyValueService/Set", keyvalue_pb2.SetRequest(key="a", value=b"1"), token)).etag  # type: ignore[attr-defined]
        got = await rest.call("/prism.v1.KeyValueService/Get", keyvalue_pb2.GetRequest(key="a"), token)
        assert (got.value, got.etag) == (b"1", etag)  # type: ignore[attr-defined]
        with pytest.raises(CallError) as stale:
            await rest.call("/prism.v1.KeyValueService/Set", keyvalue_pb2.SetRequest(key="a", value=b"2", if_match="0" * 16), token)
        assert stale.value.code == "ABORTED"
        for key in "bcd":  # its own setting at work: four keys at most
            await rest.call("/prism.v1.KeyValueService/Set", keyvalue_pb2.SetRequest(key=key, value=b"x"), token)
        with pytest.raises(CallError) as full:
            await grpc.call("/prism.v1.KeyValueService/Set", keyvalue_pb2.SetRequest(key="e", value=b"x"), token)
        assert full.value.code == "RESOURCE_EXHAUSTED" and "dict-test backend full" in full.value.message

        info = await grpc.call("/prism.v1.PluginInfoService/GetInfo", plugin_pb2.InfoRequest())
        (entry,) = info.backends  # type: ignore[attr-defined]
        assert (entry.name, entry.pattern, entry.type) == ("notes", "KEY_VALUE", "dict-test")
        assert set(entry.capabilities) == {c.value for c in dict_backend.DictKeyValue.capabilities}
        ready = await rest.call("/prism.v1.HealthService/Ready", plugin_pb2.ReadyRequest())
        assert ready.ready and dict(ready.checks) == {"backend/notes": "ok"}  # type: ignore[attr-defined]
        listed = await grpc.call("/prism.v1.ConfigService/ListConfigs", config_pb2.ListConfigsRequest())
        (config,) = [c for c in listed.configs if c.name == "notes"]  # type: ignore[attr-defined]
        # The contract names no such type: clients select it by instance.
        assert (config.backend.type, config.backend.instance) == (config_pb2.BACKEND_TYPE_UNSPECIFIED, "notes")
    finally:
        await grpc.close()
        await rest.close()
        gateway.stop()


def test_without_the_plugin_the_type_is_unknown(tmp_path: pathlib.Path) -> None:
    """A fresh process, nothing installed: the configuration is refused naming the key."""
    (tmp_path / "prism.yaml").write_text(CONFIG)
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--config", str(tmp_path / "prism.yaml")],
        cwd=pathlib.Path(__file__).resolve().parent.parent, capture_output=True, text=True, timeout=60,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert "backends.notes.type: unknown backend type 'dict-test'" in result.stderr
