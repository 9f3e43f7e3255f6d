"""Which backend types exist, found by name: the discriminated union of backend settings, open
to types declared outside this package.

A settings entry's ``type`` is looked up, first match wins:

1. a type registered in this process with :func:`register` (embedding the gateway, tests);
2. a built-in type: the module ``adapters.backends.<type>``, imported only when a configuration
   names it, so a driver loads only when its backend is configured;
3. an installed plugin: an entry point named after the type in the group ``prism.backends``,
   whose object is the :class:`~adapters.backends.BackendType`. A plugin package declares it
   in its ``pyproject.toml`` and ``pip install`` is all a user does:

       [project.entry-points."prism.backends"]
       dict-test = "my_package.backend:BACKEND"

Adding a backend type therefore touches only its own module (and its tests); see
``adapters/README.md`` for what the module declares.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import pkgutil
from collections.abc import Mapping
from typing import Any

from pydantic import ValidationError
from pydantic_core import InitErrorDetails, PydanticCustomError

from adapters import backends as builtin
from adapters.backends import BackendSettings, BackendType

ENTRY_POINTS = "prism.backends"

_registered: dict[str, BackendType[Any, Any]] = {}
_loaded: dict[str, BackendType[Any, Any]] = {}  # built-in and plugin types, once imported


class UnknownBackendType(LookupError):
    """No registered, built-in or installed backend type has this name."""


def register(backend: BackendType[Any, Any]) -> BackendType[Any, Any]:
    """Make ``backend`` available by its name in this process (before settings are loaded).
    Registering the same declaration again is a no-op; another under a taken name is refused."""
    taken = _registered.get(backend.name)
    if taken is not None and taken is not backend:
        raise ValueError(f"backend type {backend.name!r} is already registered")
    _registered[backend.name] = backend
    return backend


def lookup(name: str) -> BackendType[Any, Any]:
    """The backend type called ``name``; UnknownBackendType naming the known ones."""
    found = _registered.get(name) or _loaded.get(name)
    if found is None:
        found = _builtin(name) or _installed(name)
        if found is None:
            raise UnknownBackendType(f"unknown backend type {name!r} (known: {', '.join(known())})")
        _loaded[name] = found
    return found


def known() -> list[str]:
    """Every type name that :func:`lookup` can find, without importing any of them."""
    names = {m.name for m in pkgutil.iter_modules(builtin.__path__) if not m.name.startswith("_")}
    names |= {ep.name for ep in importlib.metadata.entry_points(group=ENTRY_POINTS)}
    return sorted(names | set(_registered))


def _declared(found: object, where: str, name: str) -> BackendType[Any, Any]:
    if not isinstance(found, BackendType):
        raise UnknownBackendType(f"{where} is not a BackendType")
    if found.name != name:
        raise UnknownBackendType(f"{where} declares backend type {found.name!r}, not {name!r}")
    return found


def _builtin(name: str) -> BackendType[Any, Any] | None:
    if not name.isidentifier() or name.startswith("_"):
        return None
    module = f"{builtin.__name__}.{name}"
    if importlib.util.find_spec(module) is None:
        return None
    return _declared(getattr(importlib.import_module(module), "BACKEND", None), f"{module}.BACKEND", name)


def _installed(name: str) -> BackendType[Any, Any] | None:
    for entry in importlib.metadata.entry_points(group=ENTRY_POINTS, name=name):
        where = f"entry point {name} = {entry.value} ({ENTRY_POINTS})"
        try:
            found = entry.load()
        except Exception as exc:  # a broken plugin is a configuration problem, named as such
            raise UnknownBackendType(f"{where} failed to load: {type(exc).__name__}: {exc}") from exc
        return _declared(found, where, name)
    return None


def backend_settings(data: Any) -> BackendSettings:
    """A settings entry validated by its type's model: the discriminated union on ``type``,
    over every type :func:`lookup` finds. Errors carry the key inside the entry (``dsn``,
    ``type``), which pydantic prefixes with the entry's own location (``backends.pg``)."""
    if isinstance(data, BackendSettings):
        return data
    if not isinstance(data, Mapping):
        raise _invalid("backend_entry", "expected a mapping with a `type` (e.g. {type: sqlite})", (), data)
    if "type" not in data:
        raise _invalid("missing", "Field required", ("type",), data)
    try:
        backend = lookup(str(data["type"]))
    except UnknownBackendType as exc:
        raise _invalid("backend_type", str(exc), ("type",), data["type"]) from None
    return backend.settings.model_validate(data)


def _invalid(kind: str, message: str, loc: tuple[str, ...], value: Any) -> ValidationError:
    error = PydanticCustomError(kind, message)  # no context: the message is shown as written
    return ValidationError.from_exception_data("BackendSettings", [InitErrorDetails(type=error, loc=loc, input=value)])
