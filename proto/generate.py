"""Generate the Python protobuf and gRPC modules from ``proto/prism/v1/*.proto``.

Run ``python proto/generate.py`` (``make proto``) after editing a .proto file; the output is
committed next to the sources, and ``tests/test_contract.py`` fails when it drifts.
"""

from __future__ import annotations

import pathlib
import sys

PROTO_ROOT = pathlib.Path(__file__).resolve().parent


def include_paths() -> list[str]:
    """Our root, googleapis-common-protos' .proto files and protoc's well-known types."""
    import google.api
    import grpc_tools

    googleapis = pathlib.Path(google.api.__path__[0]).parent.parent
    well_known = pathlib.Path(grpc_tools.__file__).parent / "_proto"
    return [str(PROTO_ROOT), str(googleapis), str(well_known)]


def generate(out_dir: pathlib.Path) -> None:
    from grpc_tools import protoc

    sources = sorted(str(p.relative_to(PROTO_ROOT)) for p in PROTO_ROOT.glob("prism/v1/*.proto"))
    args = ["protoc", *(f"-I{p}" for p in include_paths())]
    args += [f"--python_out={out_dir}", f"--pyi_out={out_dir}", f"--grpc_python_out={out_dir}"]
    if protoc.main([*args, *sources]) != 0:
        raise SystemExit("protoc failed")


if __name__ == "__main__":
    generate(pathlib.Path(sys.argv[1]) if len(sys.argv) > 1 else PROTO_ROOT)
