"""GET /metrics on a two-worker gateway: every family moves as the load says, and a scrape of
either worker adds both workers' counts up (prometheus-client multiprocess mode, app/metrics.py).

The load goes over a fresh connection per call, so Hypercorn's two workers (SO_REUSEPORT)
each serve part of it; the test checks that both did (``prism_worker_info`` names the worker
that answered a scrape) and that every scrape reports the totals of the whole load.
"""

from __future__ import annotations

import asyncio
import pathlib
import re
import uuid
from collections.abc import Callable, Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prism.v1 import keyvalue_pb2 as kv
from prism.v1 import queue_pb2 as q
from tests.gateway_process import GatewayProcess, start_gateway
from tests.servers import POSTGRES_DSN

TOPIC = f"metrics-{uuid.uuid4().hex[:8]}"
CONFIG = f"""
backends:
  local: {{type: sqlite}}
  pg: {{type: postgres, dsn: "{POSTGRES_DSN}"}}
configs:
  - {{name: kv, pattern: KEY_VALUE, backend: local}}
  - {{name: kv-limited, pattern: KEY_VALUE, backend: local, namespace: limited}}
  - {{name: jobs, pattern: QUEUE, backend: pg}}
namespaces:
  - {{name: default}}
  - {{name: limited, rate_limit: {{requests_per_second: 0.01, burst: 1}}}}
metrics: {{sample_interval_seconds: 0.2}}
"""
CALLS = 40  # REST Sets, each on a connection of its own
WORKER_PID = re.compile(r'prism_worker_info\{pid="(\d+)"\}')


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gateway = start_gateway(tmp_path_factory.mktemp("metrics"), "hypercorn", extra_args=("--workers", "2"), config_yaml=CONFIG)
    yield gateway
    gateway.stop()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(scraped: dict, name: str, **labels: str) -> float:
    """The sum over samples of ``name`` whose labels include ``labels``."""
    wanted = set(labels.items())
    return sum(v for (n, sample_labels), v in scraped.items() if n == name and wanted <= sample_labels)


async def scrape(gateway: GatewayProcess) -> tuple[int, dict]:
    async with httpx.AsyncClient(timeout=10) as http:  # a new connection: either worker may answer
        text = (await http.get(f"{gateway.base_url}/metrics")).text
    found = WORKER_PID.search(text)
    assert found is not None
    return int(found.group(1)), samples(text)


async def test_every_family_moves_and_both_workers_add_up(two_workers: GatewayProcess) -> None:
    _, before = await scrape(two_workers)
    base = two_workers.base_url

    async def rest(verb: str, path: str, **kwargs: object) -> httpx.Response:
        async with httpx.AsyncClient(base_url=base, timeout=10) as http:
            return await http.request(verb, path, **kwargs)  # type: ignore[arg-type]

    token = (await rest("POST", "/v1/sessions", json={"configName": "kv"})).json()["token"]
    session = {"x-prism-session": token}
    answers = await asyncio.gather(
        *(rest("PUT", f"/v1/kv/m{i}", json={"value": "dg=="}, headers=session) for i in range(CALLS))
    )
    assert all(a.status_code == 200 for a in answers)
    assert (await rest("GET", "/v1/kv/m0")).status_code == 401  # no session: an auth failure
    assert (await rest("GET", "/v1/kv/m0", headers={"x-prism-session": "nope"})).status_code == 401
    limited = (await rest("POST", "/v1/sessions", json={"configName": "kv-limited"})).json()["token"]
    statuses = [(await rest("GET", "/v1/kv/x", headers={"x-prism-session": limited})).status_code for _ in range(6)]
    assert 429 in statuses
    async with grpc.aio.insecure_channel(two_workers.grpc_target) as channel:
        get = channel.unary_unary(
            "/prism.v1.KeyValueService/Get",
            request_serializer=kv.GetRequest.SerializeToString,
            response_deserializer=kv.GetResponse.FromString,
        )
        assert (await get(kv.GetRequest(key="m1"), metadata=(("x-prism-session", token),))).value == b"v"

    # Both workers served part of the load, and every scrape reports all of it.
    pids: set[int] = set()
    for _ in range(20):
        pid, after = await scrape(two_workers)
        pids.add(pid)
        sets = value(after, "prism_rpc_calls_total", service="prism.v1.KeyValueService", method="Set", transport="rest", code="OK")
        assert sets - value(before, "prism_rpc_calls_total", service="prism.v1.KeyValueService", method="Set", transport="rest", code="OK") == CALLS
        if len(pids) == 2:
            break
    assert len(pids) == 2, "the load and the scrapes reached both workers"

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("prism_rpc_duration_seconds_count", method="Set", transport="rest") == CALLS
    assert moved("prism_rpc_calls_total", method="Get", transport="grpc", code="OK") == 1
    assert moved("prism_auth_failures_total", reason="no_session") == 1
    assert moved("prism_auth_failures_total", reason="session_unknown") == 1
    assert moved("prism_rate_limited_total", scope="namespace") == statuses.count(429)
    assert moved("prism_rpc_calls_total", method="Get", code="RESOURCE_EXHAUSTED") == statuses.count(429)


async def eventually(gateway: GatewayProcess, check: Callable[[dict], bool], seconds: float = 10) -> dict:
    """The first scrape (of either worker) that passes ``check``; sampled gauges lag a round."""
    deadline = asyncio.get_running_loop().time() + seconds
    while True:
        _, scraped = await scrape(gateway)
        if check(scraped) or asyncio.get_running_loop().time() > deadline:
            return scraped
        await asyncio.sleep(0.1)


async def test_messages_sessions_pools_and_queue_gauges(two_workers: GatewayProcess) -> None:
    """Queue messages published, delivered, redelivered, acknowledged and dead-lettered; the
    topic's depth and the group's lag; the sessions the store holds; the Postgres pools."""
    _, before = await scrape(two_workers)
    async with httpx.AsyncClient(base_url=two_workers.base_url, timeout=10) as http:
        token = (await http.post("/v1/sessions", json={"configName": "jobs"})).json()["token"]
        session = {"x-prism-session": token}
        for i in range(3):
            published = await http.post(f"/v1/topics/{TOPIC}:publish", json={"entry": {"payload": "dg==", "partitionKey": f"k{i}"}}, headers=session)
            assert published.status_code == 200, published.text
        async with grpc.aio.insecure_channel(two_workers.grpc_target) as channel:
            subscribe = channel.unary_stream(
                "/prism.v1.QueueService/Subscribe",
                request_serializer=q.QueueSubscribeRequest.SerializeToString,
                response_deserializer=q.QueueMessage.FromString,
            )
            request = q.QueueSubscribeRequest(
                topic=TOPIC, consumer_group="g", start=q.START_POSITION_EARLIEST,
                max_delivery_attempts=2, dead_letter_topic=f"{TOPIC}.dead",
            )  # fmt: skip
            request.ack_deadline.FromMilliseconds(300)
            stream = subscribe(request, metadata=(("x-prism-session", token),))
            first = [await asyncio.wait_for(stream.read(), 10) for _ in range(3)]
            acked = await http.post(
                f"/v1/topics/{TOPIC}:acknowledge",
                json={"consumerGroup": "g", "messageIds": [m.message_id for m in first[:2]]},
                headers=session,
            )
            assert acked.json()["acknowledged"] == 2
            again = await asyncio.wait_for(stream.read(), 10)  # the third, its lease run out
            assert (again.message_id, again.delivery_attempt) == (first[2].message_id, 2)

            def dead_lettered(scraped: dict) -> bool:
                return value(scraped, "prism_messages_dead_lettered_total") - value(before, "prism_messages_dead_lettered_total") == 1

            after = await eventually(two_workers, dead_lettered)  # the next claim, past its lease
            stream.cancel()
        published = await http.post(f"/v1/topics/{TOPIC}:publish", json={"entry": {"payload": "dg=="}}, headers=session)
        assert published.status_code == 200

    def moved(scraped: dict, name: str, **labels: str) -> float:
        return value(scraped, name, **labels) - value(before, name, **labels)

    assert dead_lettered(after)
    assert moved(after, "prism_messages_published_total", pattern="queue") == 3
    assert moved(after, "prism_messages_delivered_total", pattern="queue") == 4
    assert moved(after, "prism_messages_redelivered_total") == 1
    assert moved(after, "prism_messages_acknowledged_total") == 2
    # 4 in the topic; the group finished the first three (two acknowledged, one dead-lettered).
    gauges = {"namespace": "default", "topic": TOPIC}
    after = await eventually(
        two_workers,
        lambda s: value(s, "prism_queue_depth_messages", **gauges) == 4
        and value(s, "prism_queue_consumer_lag_messages", group="g", **gauges) == 1,
    )
    assert value(after, "prism_queue_depth_messages", **gauges) == 4
    assert value(after, "prism_queue_consumer_lag_messages", group="g", **gauges) == 1
    # Sessions: every one this gateway opened (both tests) is live; the store's count, once.
    assert value(after, "prism_sessions_active") == value(after, "prism_rpc_calls_total", method="CreateSession", code="OK")
    pool = value(after, "prism_backend_pool_connections", backend="pg")
    assert pool >= 2, "both workers' Postgres pools hold connections"


async def test_an_open_stream_is_counted_while_it_is_open(tmp_path: pathlib.Path) -> None:
    gateway = start_gateway(tmp_path, "hypercorn")
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            token = (await http.post("/v1/sessions", json={"configName": "events"})).json()["token"]
            streams = {"service": "prism.v1.PubSubService", "method": "Subscribe", "transport": "sse"}
            async with http.stream("GET", f"/v1/subjects/m.>:subscribe?prism_session={token}") as response:
                lines = response.aiter_lines()  # held: a dropped iterator, once collected, closes the response
                while not (await anext(lines)).startswith("data:"):
                    pass  # until subscribed
                _, during = await scrape(gateway)
                assert value(during, "prism_streams_open", **streams) == 1
                for _ in range(2):
                    sent = await http.post("/v1/subjects/m.one:publish", json={"data": "dg=="}, headers={"x-prism-session": token})
                    assert sent.status_code == 200
                    while not (await anext(lines)).startswith("data:"):
                        pass  # until delivered
                _, delivered = await scrape(gateway)
                assert value(delivered, "prism_messages_published_total", pattern="pubsub") == 2
                assert value(delivered, "prism_messages_delivered_total", pattern="pubsub") == 2
            for _ in range(50):  # the server sees the client leave
                _, after = await scrape(gateway)
                if value(after, "prism_streams_open", **streams) == 0:
                    break
                await asyncio.sleep(0.1)
            assert value(after, "prism_streams_open", **streams) == 0
            assert value(after, "prism_rpc_calls_total", method="Subscribe", transport="sse", code="CANCELLED") == 1
    finally:
        gateway.stop()
