"""The mailbox listener publishes a claim's rows grouped by destination (``app/listener.py``): the
runs of every mailbox bound for one topic go in one batch publish, each mailbox's rows in order,
and a row counts as delivered only once its publish was acknowledged. On SQLite and PostgreSQL,
into a real Queue on the same backend (the Sites and helpers are the conformance suites').

- every mailbox's run to one topic in one publish call, a mailbox whose rows alternate between
  destinations in order across calls, and the topic holding each mailbox's rows in order;
- a batch publish that fails as a whole leaves every row of it undelivered (no mark, the error
  kept on the row), and the rows are delivered later, once each and in order;
- a refusal of a grouped publish is split per mailbox, so it counts against the mailbox whose
  row was refused only;
- a row's idempotency token is the same each time it is published (a redelivery is stored
  once), and a mailbox's tokens sort in its order (the queue's token index takes them as appends).
"""

from __future__ import annotations

import asyncio
import pathlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any

import grpc
import pytest

from adapters.queue.base import Entry, Published, QueueAdapter
from adapters.transact.base import MAILBOX_HEADER, SEQUENCE_HEADER, Claimed, MailboxRow, Operation
from app.listener import MailboxListener, Outgoing, QueueTarget, RouteTable
from app.settings import MailboxListenerSettings
from prism.errors import PrismError
from tests.conformance.test_transact_adapter import SITES, Env, new_env
from tests.conformance.test_transact_listener import open_queue, read_topic, write
from tests.servers import purge_namespaces

WAIT = 15.0
QUEUE_NAMESPACES: list[str] = []


@pytest.fixture(params=list(SITES))
async def site(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Any]:
    opened = SITES[request.param](tmp_path)
    yield opened
    await opened.close_all()


@pytest.fixture(scope="module", autouse=True)
async def purge_queues() -> AsyncIterator[None]:
    yield
    await purge_namespaces(["postgres"], QUEUE_NAMESPACES)


def out_namespace() -> str:
    name = f"out-{uuid.uuid4().hex[:10]}"
    QUEUE_NAMESPACES.append(name)
    return name


class CallsTarget(QueueTarget):
    """A real Queue destination that notes every publish call — its destination and the
    (mailbox, sequence) of its rows — and the rows acknowledged, in order. ``refuse`` and
    ``down`` script failures: a call holding a row of mailbox ``refuse`` is refused as a whole
    (INVALID_ARGUMENT naming the payload); while ``down`` is set, every call fails as a whole
    (UNAVAILABLE), publishing nothing."""

    def __init__(self, queue: QueueAdapter, namespace: str, refuse: str = "") -> None:
        super().__init__("calls", namespace, queue)
        self.refuse = refuse
        self.down = False
        self.calls: list[tuple[str, list[tuple[str, int]]]] = []
        self.published: list[tuple[str, int]] = []

    async def publish(self, destination: str, rows: Sequence[Outgoing]) -> Sequence[BaseException | None]:
        self.calls.append((destination, [(batch.mailbox, row.sequence) for batch, row in rows]))
        if self.down:
            raise PrismError(grpc.StatusCode.UNAVAILABLE, "the destination is down")
        if self.refuse and any(batch.mailbox == self.refuse for batch, _ in rows):
            raise PrismError(grpc.StatusCode.INVALID_ARGUMENT, "payload not welcome", field="payload")
        outcomes = await super().publish(destination, rows)
        self.published.extend((b.mailbox, r.sequence) for (b, r), o in zip(rows, outcomes, strict=True) if o is None)
        return outcomes


async def until(check: Callable[[], Awaitable[bool]], what: str) -> None:
    deadline = time.monotonic() + WAIT
    while not await check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def rows_of(env: Env, mailbox: str) -> list[MailboxRow]:
    return list(await env.adapter.mailbox_rows(env.ns, mailbox, 0, 10_000))


async def all_delivered(env: Env, mailboxes: Sequence[str]) -> bool:
    for mailbox in mailboxes:
        if not all(r.delivered_ns for r in await rows_of(env, mailbox)):
            return False
    return True


def per_mailbox(pairs: Sequence[tuple[str, int]]) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for mailbox, sequence in pairs:
        out.setdefault(mailbox, []).append(sequence)
    return out


async def test_a_claims_runs_to_one_topic_go_in_one_publish_each_mailbox_in_order(site: Any) -> None:
    """Three mailboxes of five rows to one topic, and one whose rows go to that topic, another,
    then the first again: three rounds, one publish call each — the first holding every
    mailbox's run — and every mailbox's rows in order, in the calls and in the topics."""
    env = await new_env(site)
    queue, connection = await open_queue(site)
    out = out_namespace()
    target = CallsTarget(queue, out)
    listener = MailboxListener(env.adapter, RouteTable({env.ns: target}), MailboxListenerSettings(poll_seconds=1))
    for mailbox in ("a", "b", "c"):
        await write(env, mailbox, 5)
    for destination in ("orders.created", "orders.created", "orders.other", "orders.created"):
        await env.write(Operation.INSERT, {"id": uuid.uuid4().hex}, mailbox="d", destination=destination)
    try:
        await listener.start()
        await until(lambda: all_delivered(env, "abcd"), "every row delivered")
    finally:
        await listener.close()
    created = [(m, s) for m in "abc" for s in range(1, 6)]
    assert target.calls == [
        ("orders.created", [*created, ("d", 1), ("d", 2)]),  # one claim: every mailbox's first run, one call
        ("orders.other", [("d", 3)]),
        ("orders.created", [("d", 4)]),
    ], target.calls
    assert per_mailbox(target.published) == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 4, 5], "c": [1, 2, 3, 4, 5], "d": [1, 2, 3, 4]}
    messages = await read_topic(queue, out, "orders.created", 18)
    stored = per_mailbox([(m.headers[MAILBOX_HEADER], int(m.headers[SEQUENCE_HEADER])) for m in messages])
    assert stored == {"a": [1, 2, 3, 4, 5], "b": [1, 2, 3, 4, 5], "c": [1, 2, 3, 4, 5], "d": [1, 2, 4]}
    assert {m.partition_key for m in messages if m.headers[MAILBOX_HEADER] == "d"} == {"d"}
    other = await read_topic(queue, out, "orders.other", 1)
    assert [(m.headers[MAILBOX_HEADER], m.headers[SEQUENCE_HEADER]) for m in other] == [("d", "3")]
    await queue.close()
    await connection.close()


async def test_a_failed_batch_publish_leaves_its_rows_undelivered_for_the_retry(site: Any) -> None:
    """While the destination is down, every grouped publish fails as a whole: no row is marked
    delivered (each keeps the error, and is tried again), nothing reaches the topic. Once it is
    back, every row is delivered once, each mailbox's in order."""
    env = await new_env(site)
    queue, connection = await open_queue(site)
    out = out_namespace()
    target = CallsTarget(queue, out)
    target.down = True
    options = MailboxListenerSettings(poll_seconds=1, max_retry_seconds=0.2)
    listener = MailboxListener(env.adapter, RouteTable({env.ns: target}), options)
    for mailbox in ("a", "b"):
        await write(env, mailbox, 4)

    async def tried_twice() -> bool:
        return len(target.calls) >= 2

    try:
        await listener.start()
        await until(tried_twice, "two failed publishes")
        for mailbox in ("a", "b"):
            rows = await rows_of(env, mailbox)
            assert [r.delivered_ns for r in rows] == [None] * 4  # nothing marked: nothing was acknowledged
            assert rows[0].last_error.startswith("UNAVAILABLE: the destination is down")
            assert rows[0].attempts >= 1 and rows[0].refusals == 0
        assert len(target.calls[0][1]) == 8 and target.published == []  # both mailboxes in one call
        target.down = False
        await until(lambda: all_delivered(env, "ab"), "every row delivered once the destination is back")
    finally:
        await listener.close()
    assert per_mailbox(target.published) == {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]}  # once each, in order
    messages = await read_topic(queue, out, "orders.created", 8)
    stored = per_mailbox([(m.headers[MAILBOX_HEADER], int(m.headers[SEQUENCE_HEADER])) for m in messages])
    assert stored == {"a": [1, 2, 3, 4], "b": [1, 2, 3, 4]}
    await queue.close()
    await connection.close()


async def test_a_refused_grouped_publish_counts_against_the_refused_mailbox_only(site: Any) -> None:
    """The destination refuses any call holding a row of ``bad``: the grouped call is refused,
    then each mailbox's run goes on its own — ``good``'s rows are delivered and never counted
    as refused; ``bad``'s first row takes the refusal (and, at one refusal allowed, is
    dead-lettered, so its next row gets the next one)."""
    env = await new_env(site)
    queue, connection = await open_queue(site)
    out = out_namespace()
    target = CallsTarget(queue, out, refuse="bad")
    options = MailboxListenerSettings(poll_seconds=1, max_delivery_attempts=1)
    listener = MailboxListener(env.adapter, RouteTable({env.ns: target}), options)
    await write(env, "good", 3)
    await write(env, "bad", 2)

    async def settled() -> bool:
        good, bad = await rows_of(env, "good"), await rows_of(env, "bad")
        return all(r.delivered_ns for r in good) and all(r.dead_ns for r in bad)

    try:
        await listener.start()
        await until(settled, "good delivered, bad dead-lettered")
    finally:
        await listener.close()
    assert target.calls[0] == ("orders.created", [("bad", 1), ("bad", 2), ("good", 1), ("good", 2), ("good", 3)])
    assert sorted(target.calls[1:3]) == [("orders.created", [("bad", 1), ("bad", 2)]), ("orders.created", [("good", 1), ("good", 2), ("good", 3)])]
    assert per_mailbox(target.published) == {"good": [1, 2, 3]}
    assert [(r.refusals, r.delivered_ns is not None) for r in await rows_of(env, "good")] == [(0, True)] * 3
    assert [(r.sequence, r.refusals) for r in await rows_of(env, "bad")] == [(1, 1), (2, 1)]
    assert listener.dead_lettered == 2
    await queue.close()
    await connection.close()



class TokensSeen(QueueTarget):
    """A real Queue destination that notes the idempotency token of every entry it publishes."""

    def __init__(self, queue: QueueAdapter, namespace: str) -> None:
        super().__init__("tokens", namespace, queue)
        self.seen: list[tuple[str, int, str]] = []  # (mailbox, sequence, token)
        real = queue.publish

        async def publish(namespace: str, topic: str, entries: Sequence[Entry]) -> Sequence[Published | PrismError]:
            self.seen += [(e.partition_key, int(e.headers[SEQUENCE_HEADER]), e.idempotency_token) for e in entries]
            return await real(namespace, topic, entries)

        queue.publish = publish  # type: ignore[method-assign]


async def test_a_rows_token_is_stable_across_redeliveries_and_a_mailboxs_tokens_sort_in_its_order(site: Any) -> None:
    """Two mailboxes of 40 rows (sequences past 0xf and 0x1f: the width is fixed), published to a
    real queue, then all of them again as a redelivery after a crash would: every entry of the
    second round is answered as the first stored it, and the topic holds each row once. Each
    mailbox's tokens sort as its sequences do; two mailboxes, or one under another epoch, never
    share a token."""
    queue, connection = await open_queue(site)
    out = out_namespace()
    target = TokensSeen(queue, out)
    now = time.time_ns()
    claims = [
        Claimed("ns", mailbox, tuple(MailboxRow(mailbox, n, f"{mailbox}{n}".encode(), {}, "", now, None, 1) for n in range(1, 41)), "e1")
        for mailbox in ("a", "b")
    ]
    rows: list[Outgoing] = [(claim, row) for claim in claims for row in claim.rows]
    try:
        for _ in range(2):
            assert list(await target.publish("orders.created", rows)) == [None] * 80
        first, again = target.seen[:80], target.seen[80:]
        assert again == first
        for mailbox in ("a", "b"):
            mine = [(sequence, token) for m, sequence, token in first if m == mailbox]
            assert [sequence for sequence, _ in mine] == list(range(1, 41))
            assert sorted(token for _, token in mine) == [token for _, token in mine]
        assert len({token for _, _, token in first}) == 80
        other_epoch = Claimed("ns", "a", claims[0].rows, "e2")
        assert list(await target.publish("orders.created", [(other_epoch, claims[0].rows[0])])) == [None]
        assert target.seen[-1][2] not in {token for _, _, token in first}
        messages = await read_topic(queue, out, "orders.created", 81)
        assert len(messages) == 81
        assert sorted(m.payload for m in messages) == sorted([*(row.payload for _, row in rows), b"a1"])
    finally:
        await queue.close()
        await connection.close()
