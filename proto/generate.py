"""Generate the Python protobuf and gRPC modules from ``proto/prism/v1/*.proto``.

Run ``python proto/generate.py`` (``make proto``) after editing a .proto file; the output is
committed next to the sources, and ``tests/test_contract.py`` fails when it drifts.

Imports resolve from this folder alone (``google/api``, ``google/rpc`` are vendored, see
``google/README.md``) plus the ``google/protobuf`` well-known types bundled with protoc, so other
languages generate from the same ``-I proto``.
"""

from __future__ import annotations

import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent


def include_paths() -> list[str]:
    """Our root (with the vendored google/api and google/rpc protos) and protoc's well-known types."""
    import grpc_tools

    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    return [str(PROTO_ROOT), str(well_known)]


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("prism/v1/*.proto"))
    args = ["protoc", *(f"-I{p}" for p in include_paths())]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main([*args, *sources]) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
