"""``PRISM_*`` variables: one naming a setting overrides the file; one naming none (a typo, or
a variable meant for another program sharing the environment) is a warning naming it, never a
failure to start."""

from __future__ import annotations

import logging
import pathlib
import uuid

import pytest

from app.settings import SettingsError, load_settings
from tests.gateway_process import start_gateway


def _unique(name: str) -> str:
    """Each unknown variable is reported once per process: a fresh name per test."""
    return f"{name}_{uuid.uuid4().hex[:6].upper()}"


def test_a_variable_naming_no_setting_is_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    stray, typo = _unique("PRISM_PLUGIN_ROLE"), _unique("PRISM_HTTP__PROT")
    with caplog.at_level(logging.WARNING, logger="prism.settings"):
        settings = load_settings(environ={stray: "publisher", typo: "9000", "PRISM_HTTP__PORT": "9001"})
    assert settings.http.port == 9001
    warned = [r.getMessage() for r in caplog.records]
    assert any(m.startswith(f"{stray}: no setting ") and "ignored" in m for m in warned), warned
    assert any(m.startswith(f"{typo}: no setting http.") for m in warned), warned


def test_backend_variables_are_checked_against_their_type(tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture) -> None:
    config = tmp_path / "prism.yaml"
    config.write_text("backends:\n  pg: {type: postgres}\nconfigs: []\n")
    typo = "PRISM_BACKENDS__PG__POOL_SIZ" + uuid.uuid4().hex[:4].upper()
    environ = {"PRISM_BACKENDS__PG__POOL_SIZE": "3", "PRISM_BACKENDS__PG__REQUIRED": "true", typo: "4"}
    with caplog.at_level(logging.WARNING, logger="prism.settings"):
        settings = load_settings(config, environ=environ)
    pg = settings.backends["pg"]
    assert (pg.pool_size, pg.required) == (3, True)  # type: ignore[attr-defined]
    assert any(r.getMessage().startswith(f"{typo}: no setting backends.pg.") for r in caplog.records)


def test_a_whole_backend_from_variables() -> None:
    environ = {"PRISM_BACKENDS__CACHE__TYPE": "redis", "PRISM_BACKENDS__CACHE__POOL_SIZE": "2", "PRISM_CONFIGS": "[]"}
    settings = load_settings(environ=environ)
    assert settings.backends["cache"].type == "redis" and settings.backends["cache"].pool_size == 2  # type: ignore[attr-defined]


def test_a_bad_value_of_a_known_setting_still_fails_naming_it() -> None:
    with pytest.raises(SettingsError, match=r"http\.port: "):
        load_settings(environ={"PRISM_HTTP__PORT": "-1"})


def test_the_gateway_starts_with_a_stray_variable(tmp_path: pathlib.Path) -> None:
    gateway = start_gateway(tmp_path, "hypercorn", env={"PRISM_PLUGIN_ROLE": "publisher"})
    gateway.stop()
    assert "PRISM_PLUGIN_ROLE: no setting plugin_role; the variable is ignored" in gateway.log()
