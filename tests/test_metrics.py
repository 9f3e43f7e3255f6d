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
from collections.abc import Iterator

import grpc
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from prism.v1 import keyvalue_pb2 as kv
from tests.gateway_process import GatewayProcess, start_gateway

CONFIG = """
backends:
  local: {type: sqlite}
configs:
  - {name: kv, pattern: KEY_VALUE, backend: local}
  - {name: kv-limited, pattern: KEY_VALUE, backend: local, namespace: limited}
namespaces:
  - {name: default}
  - {name: limited, rate_limit: {requests_per_second: 0.01, burst: 1}}
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
            for _ in range(50):  # the server sees the client leave
                _, after = await scrape(gateway)
                if value(after, "prism_streams_open", **streams) == 0:
                    break
                await asyncio.sleep(0.1)
            assert value(after, "prism_streams_open", **streams) == 0
            assert value(after, "prism_rpc_calls_total", method="Subscribe", transport="sse", code="CANCELLED") == 1
    finally:
        gateway.stop()
