"""Writes openapi/prism.v1.json from the method table: ``python openapi/generate.py``.

The committed document is checked for drift by tests/test_openapi.py.
"""

from __future__ import annotations

import json
import pathlib
import sys

ROOT = pathlib.Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "openapi" / "prism.v1.json"


def render() -> str:
    from app.methods import all_methods
    from app.transports.openapi import build_openapi

    return json.dumps(build_openapi(all_methods()), indent=2, sort_keys=True) + "\n"


def main() -> None:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT.relative_to(ROOT)}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))  # run as a script from anywhere, not only as an installed package
    main()
