"""Start ``prism serve`` as a real subprocess on free ports, as a user would run it."""

from __future__ import annotations

import os
import pathlib
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx

ROOT = pathlib.Path(__file__).resolve().parent.parent
# The process that answered a /metrics scrape (app/http_app.py): the one serving the gateway.
WORKER_PID = re.compile(r'^prism_worker_info\{pid="(\d+)"\} 1\.0$', re.MULTILINE)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class GatewayProcess:
    server: str
    http_port: int
    grpc_port: int
    process: subprocess.Popen[bytes]
    log_path: pathlib.Path

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.http_port}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.grpc_port}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def serving_pid(self) -> int:
        """The pid of the process answering this gateway's HTTP port (``prism_worker_info`` on
        /metrics): the launched process under Hypercorn, a child of it under Granian."""
        found = WORKER_PID.search(httpx.get(f"{self.base_url}/metrics", timeout=5).text)
        assert found is not None, "no prism_worker_info on /metrics"
        return int(found.group(1))

    def crash(self, pid: int | None = None) -> int:
        """SIGKILL the serving process, then the launched one if it is another: no shutdown code
        runs, as on a crash or an OOM kill. ``pid``: the serving pid found beforehand, so the kill
        lands at the caller's moment rather than after a scrape. Returns the pid killed; both
        ports refuse connections afterwards."""
        pid = pid or self.serving_pid()
        os.kill(pid, signal.SIGKILL)
        if self.process.pid != pid and self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=15)
        for port in (self.http_port, self.grpc_port):
            deadline = time.monotonic() + 10  # a killed child is reaped by its parent, not at once
            while _accepts(port):
                assert time.monotonic() < deadline, f"port {port} still served after SIGKILL of {pid}"
                time.sleep(0.05)
        return pid

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def start_gateway(
    tmp: pathlib.Path,
    server: str = "hypercorn",
    *,
    extra_args: tuple[str, ...] = (),
    env: dict[str, str] | None = None,
    config_yaml: str | None = None,
    wait: bool = True,
) -> GatewayProcess:
    """``config_yaml``, when given, is written to ``tmp/prism.yaml`` and passed as --config."""
    http_port, grpc_port = free_port(), free_port()
    tmp.mkdir(parents=True, exist_ok=True)
    if config_yaml is not None:
        (tmp / "prism.yaml").write_text(config_yaml)
        extra_args = ("--config", str(tmp / "prism.yaml"), *extra_args)
    log_path = tmp / f"gateway-{server}-{http_port}.log"
    command = [
        sys.executable, "-m", "app.cli", "serve",
        "--server", server,
        "--port", str(http_port),
        "--grpc-port", str(grpc_port),
        "--data-dir", str(tmp / "data"),
        "--log-level", "warning",
        *extra_args,
    ]
    process_env = {k: v for k, v in os.environ.items() if not k.startswith("PRISM_")}
    process_env.update(env or {})
    with log_path.open("wb") as log:
        process = subprocess.Popen(command, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=process_env)
    gateway = GatewayProcess(server, http_port, grpc_port, process, log_path)
    if wait:
        wait_ready(gateway)
    return gateway


def wait_ready(gateway: GatewayProcess, timeout: float = 30, *, verify: ssl.SSLContext | None = None) -> None:
    """Until /readyz answers 200; over HTTPS checked with ``verify`` when given."""
    base_url = gateway.base_url if verify is None else f"https://127.0.0.1:{gateway.http_port}"
    try:
        wait_http(f"{base_url}/readyz", gateway.process, timeout, verify=verify)
    except RuntimeError as exc:
        gateway.stop()
        raise RuntimeError(f"gateway: {exc}:\n{gateway.log()}") from None


def wait_http(
    url: str, process: subprocess.Popen[bytes], timeout: float = 30, *, verify: ssl.SSLContext | None = None
) -> None:
    """Until ``url`` answers 200, or RuntimeError when ``process`` exits or time runs out."""
    deadline = time.monotonic() + timeout
    with httpx.Client(verify=verify if verify is not None else True, timeout=1) as http:
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise RuntimeError(f"exited with {process.returncode}")
            try:
                if http.get(url).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s")
