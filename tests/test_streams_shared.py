"""A subscription is ended by Unsubscribe reaching any process that shares the session store.

Two gateway processes share sessions — the SQLite file of one data directory (as the workers
of one gateway do) or Redis (as instances do). A subscription served by A is ended by an
Unsubscribe sent to B: its stream ends cleanly on A, and B answers once it has.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis

from tests.clients import sse_events
from tests.gateway_process import GatewayProcess, start_gateway, wait_ready
from tests.servers import REDIS_URL, unreachable


@pytest.fixture(params=["sqlite", "redis"])
def store(request: pytest.FixtureRequest) -> Iterator[str]:
    """The sessions: block of the server config; Redis keys of the run deleted after."""
    if request.param == "sqlite":
        yield "sessions: {store: sqlite}\n"
        return
    if reason := unreachable(REDIS_URL):
        pytest.skip(reason)
    run = f"streams{uuid.uuid4().hex[:12]}"
    yield f'sessions: {{store: redis, redis_url: "{REDIS_URL}?key_prefix={run}:"}}\n'
    client = redis.Redis.from_url(REDIS_URL)
    try:
        if keys := list(client.scan_iter(match=f"{run}:*", count=1000)):
            client.delete(*keys)
    finally:
        client.close()


@pytest.fixture
def pair(tmp_path: pathlib.Path, store: str) -> Iterator[tuple[GatewayProcess, GatewayProcess]]:
    gateways = [start_gateway(tmp_path, "granian", config_yaml=store, wait=False) for _ in "ab"]
    try:
        for gateway in gateways:
            wait_ready(gateway)
        yield gateways[0], gateways[1]
    finally:
        for gateway in gateways:
            gateway.stop()


async def test_unsubscribe_on_another_process_ends_the_stream(pair: tuple[GatewayProcess, GatewayProcess]) -> None:
    a, b = pair
    async with httpx.AsyncClient(base_url=a.base_url, timeout=10) as on_a, httpx.AsyncClient(
        base_url=b.base_url, timeout=10
    ) as on_b:
        token = (await on_a.post("/v1/sessions", json={"configName": "events"})).json()["token"]
        session = {"x-prism-session": token}
        unknown = await on_b.post("/v1/subscriptions/nope:unsubscribe", json={}, headers=session)
        assert unknown.status_code == 404, unknown.text

        async def subscribe() -> list[str]:
            events: list[str] = []
            async with on_a.stream(
                "GET", "/v1/subjects/news.*:subscribe", headers={**session, "accept": "text/event-stream"}, timeout=None
            ) as response:
                assert response.status_code == 200
                async for event, data in sse_events(response):
                    events.append(event)
                    if event == "message" and not subscription.done():
                        subscription.set_result(json.loads(data)["subscriptionId"])
                    if event in ("end", "error"):
                        events.append(data)
                        return events
            return events

        subscription: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        stream = asyncio.create_task(subscribe())
        subscription_id = await asyncio.wait_for(subscription, 10)
        # Another session may not end it, even knowing its id.
        other = (await on_b.post("/v1/sessions", json={"configName": "events"})).json()["token"]
        refused = await on_b.post(
            f"/v1/subscriptions/{subscription_id}:unsubscribe", json={}, headers={"x-prism-session": other}
        )
        assert refused.status_code == 404, refused.text
        assert not stream.done()

        answered = await on_b.post(f"/v1/subscriptions/{subscription_id}:unsubscribe", json={}, headers=session)
        assert answered.status_code == 200, answered.text
        events = await asyncio.wait_for(stream, 5)
        assert events[-2:] == ["end", "{}"], events
