"""The Docker image's "serve publicly" command, without Docker: the command, environment and
health check are read from the Dockerfile, the published command from its comments and from the
README (so the three cannot drift apart), and the gateway is started that way and called over
the machine's non-loopback address, on both ports."""

from __future__ import annotations

import fcntl
import ipaddress
import json
import pathlib
import re
import shlex
import signal
import socket
import struct
import subprocess
import time

import grpc
import httpx
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from prism.v1 import session_pb2
from tests.gateway_process import ROOT, free_port

DOCKERFILE = ROOT / "Dockerfile"
README = ROOT / "README.md"


def _joined(lines: list[str]) -> list[str]:
    return re.sub(r"\\\n\s*", " ", "\n".join(lines)).splitlines()


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    lines = [line for line in DOCKERFILE.read_text().splitlines() if not line.lstrip().startswith("#")]
    return [(line.split(None, 1)[0].upper(), line.split(None, 1)[1]) for line in _joined(lines) if line.strip()]


def last(name: str) -> str:
    return [args for instruction, args in instructions() if instruction == name][-1]


def image_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for instruction, args in instructions():
        if instruction == "ENV":
            env.update(pair.split("=", 1) for pair in shlex.split(args))
    return env


def public_command(lines: list[str]) -> list[str]:
    """The `docker run` command among ``lines`` that binds all interfaces, as arguments."""
    (command,) = [c for c in _joined(lines) if c.strip().startswith("docker run") and "PRISM_HTTP__HOST" in c]
    return shlex.split(command)


def options(command: list[str]) -> tuple[dict[str, list[str]], str]:
    """{option: [values]} of a `docker run` command, and its image."""
    found: dict[str, list[str]] = {}
    args = iter(command[2:])
    for arg in args:
        if arg in ("-p", "-v", "-e"):
            found.setdefault(arg, []).append(next(args))
        elif arg.startswith("-"):
            found.setdefault(arg, [])
        else:
            return found, arg
    raise AssertionError(f"no image in {command}")


def readme_blocks(title: str) -> list[str]:
    text = README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.*?)```", text, re.S)


def documented() -> list[str]:
    comments = [line.lstrip("#").strip() for line in DOCKERFILE.read_text().splitlines() if line.startswith("#")]
    return public_command(comments)


def test_public_command_is_the_readmes_and_fits_the_image() -> None:
    command = documented()
    readme = public_command("\n".join(readme_blocks("Serving other hosts")).splitlines())
    assert command == readme, "the Dockerfile and the README show different commands"
    found, image = options(command)
    env = dict(pair.split("=", 1) for pair in found["-e"])
    assert env["PRISM_HTTP__HOST"] == env["PRISM_GRPC__HOST"] == "0.0.0.0"
    mounts = {m.split(":")[1]: m.split(":")[0] for m in found["-v"]}
    assert env["PRISM_CONFIG"] in mounts, "PRISM_CONFIG names no mounted file"
    published = {p.split(":")[1] for p in found["-p"]}
    assert published == set(last("EXPOSE").split())
    assert image == "prism" and "docker build -t prism ." in "\n".join(readme_blocks("Serving other hosts"))
    assert json.loads(last("CMD")) == ["prism", "serve"]


def non_loopback_ipv4() -> str | None:
    """An IPv4 address of this machine's own interfaces that is not loopback (Linux)."""
    siocgifaddr = 0x8915
    for _, name in socket.if_nameindex():
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            try:
                packed = fcntl.ioctl(probe.fileno(), siocgifaddr, struct.pack("256s", name.encode()[:15]))
            except OSError:
                continue
        address = socket.inet_ntoa(packed[20:24])
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


def test_public_command_serves_other_hosts(tmp_path: pathlib.Path) -> None:
    address = non_loopback_ipv4()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to call the gateway on")
    # The README's prism.yaml (API key + policy), made as the README makes it.
    (make_config,) = [b for b in readme_blocks("Serving other hosts") if "cat > prism.yaml" in b]
    made = subprocess.run(
        ["bash", "-c", make_config + 'printf %s "$KEY"'], cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert made.returncode == 0, made.stderr
    key = made.stdout

    # The container's environment, with this checkout for /app, tmp_path for the mounts and
    # volumes, and free ports for the published ones.
    env = image_env()
    env["PATH"] = env["PATH"].replace("/app/.venv/bin", str(ROOT / ".venv" / "bin")).replace("$PATH", "/usr/bin:/bin")
    env["PRISM_DATA_DIR"] = str(tmp_path / "data")
    found, _ = options(documented())
    mounts = {m.split(":")[1]: m.split(":")[0] for m in found["-v"]}
    for name, value in (pair.split("=", 1) for pair in found["-e"]):
        env[name] = str(tmp_path / mounts[value]) if value in mounts else value
    http_port, grpc_port = free_port(), free_port()
    env.update(PRISM_HTTP__PORT=str(http_port), PRISM_GRPC__PORT=str(grpc_port))
    healthcheck = json.loads(last("HEALTHCHECK").split("CMD", 1)[1])

    log_path = tmp_path / "gateway.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(json.loads(last("CMD")), cwd=tmp_path, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 30
        while subprocess.run(healthcheck, env=env, capture_output=True, timeout=10).returncode != 0:
            assert process.poll() is None, f"the gateway exited:\n{log_path.read_text()}"
            assert time.monotonic() < deadline, f"HEALTHCHECK never passed:\n{log_path.read_text()}"
            time.sleep(0.2)
        assert f"HTTP on http://0.0.0.0:{http_port}" in log_path.read_text()

        with httpx.Client(base_url=f"http://{address}:{http_port}", timeout=5) as http:
            assert http.get("/readyz").status_code == 200
            refused = http.post("/v1/sessions", json={"configName": "kv"})
            assert refused.status_code == 401, refused.text
            opened = http.post("/v1/sessions", json={"configName": "kv"}, headers={"x-api-key": key})
            assert opened.status_code == 200, opened.text
            token = opened.json()["token"]
            put = http.put("/v1/kv/from-afar", json={"value": "aGk="}, headers={"x-prism-session": token})
            assert put.status_code == 200, put.text

        with grpc.insecure_channel(f"{address}:{grpc_port}") as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            create = channel.unary_unary(
                "/prism.v1.SessionService/CreateSession",
                request_serializer=session_pb2.CreateSessionRequest.SerializeToString,
                response_deserializer=session_pb2.CreateSessionResponse.FromString,
            )
            reply = create(session_pb2.CreateSessionRequest(config_name="kv"), metadata=[("x-api-key", key)], timeout=5)
            assert reply.token
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    assert (tmp_path / "data").is_dir()  # the volume is where the gateway wrote
