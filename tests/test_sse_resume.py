"""SSE streams name their events so an EventSource can pick up where it left off: a paged Read's
event id is the page's ``next_cursor``, and a reconnect's ``Last-Event-ID`` is taken as the
request's ``cursor`` — the pages that follow, none repeated (the embedded default's ``reader``
config over its 20 demo rows)."""

from __future__ import annotations

import json
import pathlib
from typing import Any

import httpx

from tests.gateway_process import start_gateway


async def read_events(http: httpx.AsyncClient, url: str, headers: dict[str, str], most: int) -> list[tuple[str, dict[str, Any]]]:
    """(id, data) of the first ``most`` message events; the connection then dropped, as a
    network failure would."""
    got: list[tuple[str, dict[str, Any]]] = []
    async with http.stream("GET", url, headers={"accept": "text/event-stream", **headers}) as response:
        assert response.status_code == 200, await response.aread()
        event_id = ""
        async for line in response.aiter_lines():
            if line.startswith("id:"):
                event_id = line[3:].strip()
            elif line.startswith("event:") and line[6:].strip() != "message":
                break  # end (or error)
            elif line.startswith("data:"):
                got.append((event_id, json.loads(line[5:])))
                if len(got) == most:
                    break
    return got


async def test_last_event_id_resumes_a_paged_read_after_the_last_page_received(tmp_path: pathlib.Path) -> None:
    gateway = start_gateway(tmp_path, "hypercorn")
    try:
        async with httpx.AsyncClient(base_url=gateway.base_url, timeout=10) as http:
            token = (await http.post("/v1/sessions", json={"configName": "reader"})).json()["token"]
            url = f"/v1/collections/orders:read?pageSize=5&prism_session={token}"
            everything = await read_events(http, url, {}, 100)
            first = await read_events(http, url, {}, 2)
            assert [event_id for event_id, _ in first] == [page["nextCursor"] for _, page in first]
            rest = await read_events(http, url, {"last-event-id": first[-1][0]}, 100)
    finally:
        gateway.stop()

    def ids(pages: list[tuple[str, dict[str, Any]]]) -> list[Any]:
        return [row["id"] for _, page in pages for row in page["rows"]]

    assert len(ids(everything)) == 20
    assert ids(first) + ids(rest) == ids(everything), "resumed after the second page: nothing lost or repeated"
    assert len(ids(first)) == 10
