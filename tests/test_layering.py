"""The layers import downwards only: adapters never reach into the app above them."""

from __future__ import annotations

import ast
import pathlib

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _imported_modules(path: pathlib.Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_adapters_import_nothing_from_app() -> None:
    offenders = {
        str(path.relative_to(ROOT)): sorted(m for m in _imported_modules(path) if m == "app" or m.startswith("app."))
        for path in sorted((ROOT / "adapters").rglob("*.py"))
    }
    assert {path: modules for path, modules in offenders.items() if modules} == {}


def test_the_contract_package_imports_neither_layer() -> None:
    for path in sorted((ROOT / "proto" / "prism").rglob("*.py")):
        modules = _imported_modules(path)
        assert not {m for m in modules if m.split(".")[0] in {"app", "adapters"}}, path
