"""The README's examples work as written: its `Try it` shell blocks run, in order, against a
real gateway (only the ports differ), and print what the README says."""

from __future__ import annotations

import pathlib
import re
import subprocess

from tests.gateway_process import ROOT, start_gateway


def try_it_blocks() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Try it", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", section, re.S)


def test_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make run", "make test"]


def test_readme_examples_run_as_written(tmp_path: pathlib.Path) -> None:
    blocks = try_it_blocks()
    assert len(blocks) == 5  # curl, gRPC via reflection, gRPC-Web binary and text, SSE
    gateway = start_gateway(tmp_path, "hypercorn")
    try:
        script = "set -eu\n" + "\n".join(blocks).replace("127.0.0.1:8080", f"127.0.0.1:{gateway.http_port}")
        result = subprocess.run(
            ["bash", "-c", script],
            cwd=ROOT, capture_output=True, text=True, timeout=60,
            env={"PATH": f"{ROOT / '.venv' / 'bin'}:/usr/bin:/bin", "GRPC_TARGET": gateway.grpc_target},
        )
    finally:
        gateway.stop()
    out = result.stdout
    assert result.returncode == 0, out + result.stderr
    assert re.search(r'\{"etag":"[0-9a-f]{16}"\}', out)  # PUT
    assert re.search(r'\{"key":"greeting","value":"aGVsbG8=","etag":"[0-9a-f]{16}"\}', out)  # GET
    assert '{"code":"NOT_FOUND","message":"key \'missing\' not found","details":[]}' in out
    assert "prism.v1.KeyValueService" in out  # reflection listing
    assert '"value": "aGVsbG8="' in out  # gRPC Get
    assert out.count("s   t   a   t   u   s   :   0") == 1  # gRPC-Web trailer frame, binary
    assert out.count("h   e   l   l   o 032 020") == 2  # GetResponse, binary and -text
    assert '"subject":"orders.created","data":"eyJpZCI6IDF9"' in out  # SSE delivery
    assert "event: message" in out
