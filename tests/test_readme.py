"""The README's examples work as written: its `Try it` shell blocks run, in order, against a
real gateway (only the ports differ), and print what the README says; its sample outputs agree
with each other; its conformance matrix is the suite's; its configuration example validates and
its dev-mode refusal is the one printed; `grpc_call.py` refuses a bad body in one line."""

from __future__ import annotations

import pathlib
import re
import subprocess
import sys

from app.settings import load_settings
from tests.gateway_process import ROOT, start_gateway

README = ROOT / "README.md"


def section(title: str) -> str:
    return README.read_text().split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


def try_it_blocks() -> list[str]:
    return re.findall(r"```sh\n(.*?)```", section("Try it"), re.S)


def test_readme_starts_with_the_two_commands() -> None:
    first_block = re.search(r"```sh\n(.*?)```", README.read_text(), re.S)
    assert first_block is not None
    commands = [line.split("#")[0].strip() for line in first_block.group(1).splitlines()]
    assert commands == ["make run", "make test"]


def test_readme_examples_run_as_written(tmp_path: pathlib.Path) -> None:
    blocks = try_it_blocks()
    assert len(blocks) == 6  # curl, gRPC via reflection, gRPC-Web binary and text, SSE, Queue
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
    assert '{"messageId":"1-0","partition":1,"offset":"0"}' in out  # Queue publish
    assert '"payload":"eyJpZCI6IDF9","partitionKey":"customer-42","headers":{},"deliveryAttempt":1' in out
    assert '{"acknowledged":1}' in out
    assert '{"partition":1,"lowOffset":"0","highOffset":"1","committedOffset":"1","lag":"0"}' in out
    assert re.search(r'data: \{"messages":\[\{"messageId":"0-0",.*"payload":"eyJpZCI6IDJ9".*\},'
                     r'\{"messageId":"1-1",.*"payload":"eyJpZCI6IDN9"', out)  # one SubscribeBatches event, both


# --- the samples agree with each other -------------------------------------------------------

OD_ESCAPES = {"\\0": 0, "\\a": 7, "\\b": 8, "\\t": 9, "\\n": 10, "\\v": 11, "\\f": 12, "\\r": 13}


def od_bytes(dump: str) -> bytes:
    """The bytes an `od -A d -c` listing shows (7-digit offset, then 4-character columns)."""
    data = bytearray()
    for line in dump.splitlines():
        for i in range(7, len(line), 4):
            cell = line[i:i + 4].strip()
            if cell in OD_ESCAPES:
                data.append(OD_ESCAPES[cell])
            elif re.fullmatch(r"[0-7]{3}", cell):
                data.append(int(cell, 8))
            else:
                data.extend((cell or " ").encode())
    return bytes(data)


def test_readme_samples_show_one_record() -> None:
    """The sample outputs come from one run: one ETag for `greeting` over REST, gRPC and
    gRPC-Web, one message id from the publish call to its delivery."""
    text = section("Try it")
    etags = set(re.findall(r'"etag": ?"([0-9a-f]{16})"', text))
    dump = "\n".join(line[2:] for line in text.splitlines() if re.match(r"# \d{7}", line))
    record = od_bytes(dump)
    head = b"\0\0\0\0#\n\x08greeting\x12\x05hello\x1a\x10"  # frame, GetResponse key, value, etag
    assert record.startswith(head), record
    etags.add(record[len(head):len(head) + 16].decode())
    assert len(etags) == 1, f"the README shows several ETags for one record: {sorted(etags)}"
    published = re.findall(r'# \{"messageId":"([0-9a-f]+)"\}', text)
    delivered = re.findall(r'"message":\{"messageId":"([0-9a-f]+)"', text)
    assert published and published == delivered, (published, delivered)


# --- the conformance matrix -------------------------------------------------------------------

# Collects tests/conformance in a child pytest and renders its matrix as the end of a run would
# print it when every case passes: a case of a capability group ("shared", "durable") is
# *refused* on a backend whose adapter does not declare that capability.
MATRIX_SCRIPT = r"""
import sys
import pytest
from adapters.capabilities import Capability
from adapters.keyvalue.memory import MemoryKeyValue
from adapters.keyvalue.postgres import PostgresKeyValue
from adapters.keyvalue.redis import RedisKeyValue
from adapters.keyvalue.sqlite import SqliteKeyValue
from adapters.pubsub.kafka import KafkaPubSub
from adapters.pubsub.memory import MemoryPubSub
from adapters.pubsub.nats import NatsHistoryPubSub, NatsPubSub
from adapters.pubsub.redis import RedisPubSub
from adapters.pubsub.workers import WorkersPubSub
from adapters.queue.kafka import KafkaQueue
from adapters.queue.nats import NatsQueue
from adapters.queue.postgres import PostgresQueue
from adapters.queue.redis import RedisQueue
from adapters.queue.sqlite import SqliteQueue

DECLARED = {
    ("KeyValue", "memory"): MemoryKeyValue.capabilities,
    ("KeyValue", "sqlite"): SqliteKeyValue.capabilities,
    ("KeyValue", "postgres"): PostgresKeyValue.capabilities,
    ("KeyValue", "redis"): RedisKeyValue.capabilities,
    ("Queue", "sqlite"): SqliteQueue.capabilities,
    ("Queue", "redis"): RedisQueue.capabilities,
    ("Queue", "postgres"): PostgresQueue.capabilities,
    ("Queue", "nats"): NatsQueue.capabilities,
    ("Queue", "kafka"): KafkaQueue.capabilities,
    ("PubSub", "memory"): MemoryPubSub.capabilities,  # one worker; across workers WorkersPubSub's
    ("PubSub", "nats"): NatsPubSub.capabilities,
    ("PubSub", "nats-history"): NatsHistoryPubSub.capabilities,  # pubsub_history: true
    ("PubSub", "redis"): RedisPubSub.capabilities,
    ("PubSub", "kafka"): KafkaPubSub.capabilities,
    ("PubSub", "workers"): WorkersPubSub.capabilities,  # the adapter suite's column ("… adapter" is dropped)
    ("PubSub adapter", "memory"): MemoryPubSub.capabilities,
    ("PubSub adapter", "workers"): WorkersPubSub.capabilities,
    ("PubSub adapter", "nats"): NatsPubSub.capabilities,
    ("PubSub adapter", "nats-history"): NatsHistoryPubSub.capabilities,
    ("PubSub adapter", "redis"): RedisPubSub.capabilities,
    ("PubSub adapter", "kafka"): KafkaPubSub.capabilities,
}
CAPABILITIES = {c.value for c in Capability}


class Render:
    def pytest_collection_finish(self, session):
        from tests.conformance.conftest import COLLECTED

        for case in COLLECTED.cases.values():
            # An adapter-level suite ("KeyValue adapter") claims what its pattern's adapters do.
            declared = [DECLARED.get((case.pattern.removesuffix(" adapter"), b)) for b in case.backends]
            refused = case.group in CAPABILITIES and all(
                claims is not None and case.group not in claims for claims in declared
            )
            case.outcome = "refused" if refused else "passed"
        with open(sys.argv[1], "w") as out:
            out.write("\n".join(COLLECTED.table()))


sys.exit(pytest.main(["--collect-only", "-qq", "-p", "no:cacheprovider", "tests/conformance"], plugins=[Render()]))
"""


def test_readme_conformance_matrix_is_the_suites(tmp_path: pathlib.Path) -> None:
    rendered = tmp_path / "matrix.md"
    result = subprocess.run(
        [sys.executable, "-c", MATRIX_SCRIPT, str(rendered)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    expected = [line for line in rendered.read_text().splitlines() if line]
    shown = [line for line in section("Conformance").splitlines() if line.startswith("|")]
    assert shown == expected, "README's Conformance matrix is out of date; the suite's is:\n" + "\n".join(expected)


# --- grpc_call.py -------------------------------------------------------------------------------


def test_grpc_call_refuses_a_body_that_is_not_json_in_one_line() -> None:
    result = subprocess.run(
        [sys.executable, "clients/python/grpc_call.py", "prism.v1.KeyValueService/Get", '{"key": greeting}'],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.stderr, result.stderr
    assert "not valid JSON" in result.stderr and "line 1 column 9" in result.stderr


# --- configuration and start-up --------------------------------------------------------------


def test_readme_configuration_example_is_valid(tmp_path: pathlib.Path) -> None:
    (example,) = re.findall(r"```yaml\n(.*?)```", section("Configuration"), re.S)
    (tmp_path / "prism.yaml").write_text(example)
    settings = load_settings(tmp_path / "prism.yaml", environ={})
    assert {c.name for c in settings.configs} == {"profiles", "events", "profiles-fast", "orders"}


def test_readme_shows_the_dev_mode_refusal_as_printed() -> None:
    (shown,) = re.findall(r"```\n\$ \.venv/bin/prism serve --host 0\.0\.0\.0\n(.*?)```", section("Serving other hosts"), re.S)
    result = subprocess.run(
        [sys.executable, "-m", "app.cli", "serve", "--host", "0.0.0.0"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2
    assert result.stderr == shown
