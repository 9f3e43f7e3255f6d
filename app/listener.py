"""The mailbox listener (the RFC's Listener role, data flow §7.2): committed Transact mailbox
rows become Queue messages or PubSub deliveries, at least once, in order per mailbox.

    Transact adapter (one per backend that holds routed namespaces)
        │ watch(): woken when a mailbox row commits — PostgreSQL NOTIFY, SQLite data_version,
        │          or at once when the Write went through this process; poll_seconds as a safety net
        ▼
    claim(holder, routes): whole mailboxes leased to this listener, their lowest undelivered rows
        │ in rounds: each mailbox's next run of rows to one destination; the runs of every
        │ mailbox to the same destination in one publish (a mailbox's next run waits for the
        │ acknowledgement of its last: its order)
        ▼
    Queue.publish   topic   = the row's destination, else the mailbox's name (one batch publish)
                    key     = the mailbox's name (one partition: the topic keeps the mailbox's order)
                    token   = from (epoch, sequence) where the queue deduplicates: a row published
                              again after a crash is stored once (a mailbox's tokens sort in its order)
    PubSub.publish  subject = the row's destination, else the mailbox's name (one message a call:
                              each mailbox's in turn, the mailboxes side by side)
        │ headers: the row's own (its traceparent among them) + prism-mailbox, prism-mailbox-sequence
        ▼
    mark_delivered: the published run stamped delivered; the mailbox is given back (after a
                    backoff when the rest failed, so a failing destination is not hammered);
                    the row it stopped at keeps the error, and a refusal is counted on it
    delete_delivered: now and then, delivered rows older than retain_delivered_seconds, in
                    bounded batches (undelivered and dead-lettered rows are never deleted)

Where rows go is server configuration (``transact.<namespace>.deliver_to`` and
``.mailboxes.<name>.deliver_to``: a QUEUE or PUBSUB config of ``configs``, whose backend and
namespace the message goes to); a row's ``destination`` only picks the topic or subject there.
A row is published only while its mailbox's lease lives (each publish bounded by what is left of
it), so no other listener delivers it meanwhile; a crash leaves the lease to run out, and the next
claim — this listener's or another's — publishes the unmarked rows again: at least once. A row
that fails stays first in its mailbox and is retried with a growing pause (order per mailbox
means the rows behind it wait); ``attempts`` in the mailbox table counts the tries, ``last_error``
says why. An outage (UNAVAILABLE, a timeout, any error that does not say the row is wrong) is
retried for ever. A refusal (:func:`refused`: the destination says this row can never go) is
counted in ``refusals``; at ``max_delivery_attempts`` refusals the row is dead-lettered
(``dead_ns``), logged, and its mailbox goes on with the rows behind it. A publish of several
mailboxes' runs that fails as a whole fails each of them — except a refusal, which cannot say
whose row it meant: those runs are published again one mailbox at a time, so a refusal counts
against its own mailbox only.

Runs in every gateway process (``app/gateway.py``) unless ``mailbox_listener.in_gateway`` is
false, or alone: ``prism listener`` (:func:`run_alone`). Any number of listeners share the work.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import random
import socket
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field

import grpc
from prometheus_client import Counter, Histogram

from adapters.capabilities import Capability
from adapters.pubsub.base import PubSubAdapter
from adapters.pubsub.subjects import parse_subject
from adapters.queue.base import Entry, QueueAdapter
from adapters.transact.base import (
    MAILBOX_HEADER,
    SEQUENCE_HEADER,
    Changes,
    Claimed,
    Failure,
    MailboxRow,
    Routes,
    TransactAdapter,
)
from app.backends import Backends
from app.configs import from_settings
from app.settings import MailboxListenerSettings, NamedConfig, Settings, SettingsError
from app.tracing import Tracing
from prism.errors import PrismError, failed_precondition, internal

log = logging.getLogger("prism.listener")

RETRY_BASE = 0.1  # seconds before the first retry of a failed delivery; doubles per attempt
LEASE_MARGIN = 0.1  # share of the lease (1 s at most) left unused: no publish runs up to its very end
CLOSE_WAIT = 5.0  # seconds a closing listener lets the deliveries under way finish and be marked
# Claims begin at most this often. A row that commits while the listener is idle is claimed at
# once; under load, the rows that commit meanwhile go together in the next claim (a claim, a
# publish and a mark cost about the same for one row as for many), at the price of this much lag.
CLAIM_EVERY = 0.02
SWEEP_SECONDS = (0.05, 60.0)  # sweeps come every retain_delivered_seconds, within these bounds
SWEEP_BATCH = 500  # rows deleted per statement: a short transaction each
SWEEP_PAUSE = 0.01  # seconds between two batches of one sweep: writers get the lock meanwhile
# A destination's answer that says the row itself can never go: counted towards dead-lettering.
# (RESOURCE_EXHAUSTED too when it names a field of the message: a payload above the broker's limit.)
REFUSALS = frozenset({
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.FAILED_PRECONDITION,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.ALREADY_EXISTS,
    grpc.StatusCode.PERMISSION_DENIED,
    grpc.StatusCode.OUT_OF_RANGE,
    grpc.StatusCode.UNIMPLEMENTED,
})  # fmt: skip
LAG_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0)

DELIVERED = Counter(
    "prism_mailbox_delivered", "Mailbox rows the listener published (again after a crash: counted again)", ["namespace"]
)
FAILURES = Counter(
    "prism_mailbox_delivery_failures", "Deliveries of a mailbox's rows that stopped at a refusal, an outage or the lease's end", ["namespace"]
)
DEAD_LETTERED = Counter(
    "prism_mailbox_dead_lettered", "Mailbox rows dead-lettered after max_delivery_attempts refusals", ["namespace"]
)
DELETED = Counter("prism_mailbox_deleted", "Delivered mailbox rows deleted past retain_delivered_seconds", ["namespace"])
LAG = Histogram(
    "prism_mailbox_delivery_lag_seconds", "From a mailbox row's commit to its publish", ["namespace"], buckets=LAG_BUCKETS
)


def refused(error: BaseException) -> bool:
    """Whether a failed delivery was the destination refusing the row (tried again, it would be
    refused again) rather than an outage: only a PrismError with a refusal's code says so."""
    if not isinstance(error, PrismError):
        return False  # a driver's exception the adapter did not map, a lease run out: an outage
    return error.code in REFUSALS or (error.code == grpc.StatusCode.RESOURCE_EXHAUSTED and error.field is not None)


def error_text(error: BaseException) -> str:
    """How a failure reads in the log and in the row's ``last_error``."""
    if isinstance(error, PrismError):
        return f"{error.code.name}: {error.message}"
    return f"{type(error).__name__}: {error}"


def message_headers(mailbox: str, row: MailboxRow) -> dict[str, str]:
    """What a delivered message carries: the row's headers (its trace too), and where it came
    from. Deterministic, so a row published twice is the same message (idempotency tokens)."""
    return {**row.headers, MAILBOX_HEADER: mailbox, SEQUENCE_HEADER: str(row.sequence)}


Outgoing = tuple[Claimed, MailboxRow]  # a row on its way, with the claim of its mailbox


def token_prefix(batch: Claimed) -> str:
    """The first part of the idempotency tokens of a mailbox's rows; the row's sequence, fixed
    width, follows. A mailbox's tokens sort in its order, so a queue's token index takes a
    claim's rows as appends to a few pages rather than as that many scattered inserts."""
    name = f"{batch.epoch}\0{batch.namespace}\0{batch.mailbox}".encode()
    return f"prism-mailbox-{hashlib.sha256(name).hexdigest()[:32]}-"


class Target(ABC):
    """Where one route's rows go: a QUEUE or PUBSUB config's backend and namespace."""

    def __init__(self, config: str, namespace: str, capabilities: frozenset[Capability]) -> None:
        self.config, self.namespace, self.capabilities = config, namespace, capabilities

    @abstractmethod
    async def publish(self, destination: str, rows: Sequence[Outgoing]) -> Sequence[BaseException | None]:
        """Publish ``rows`` — runs of one or more mailboxes, each mailbox's in sequence order —
        to ``destination`` (a Queue topic or PubSub subject) in as few calls as the destination
        allows. One outcome per row, in order: None once the destination has acknowledged it,
        else why not (a PrismError). Raising fails every row. A row after a failed row of its
        mailbox does not count as published, whatever its outcome (it goes again: at least once)."""


class QueueTarget(Target):
    def __init__(self, config: str, namespace: str, queue: QueueAdapter) -> None:
        super().__init__(config, namespace, queue.capabilities)
        self.queue = queue
        self.tokens = Capability.IDEMPOTENT_PUBLISH in queue.capabilities

    async def publish(self, destination: str, rows: Sequence[Outgoing]) -> Sequence[BaseException | None]:
        # One batch publish for every mailbox's run: the adapter stores the entries in order,
        # each mailbox's on one partition (its name is the key), and answers per entry.
        prefixes: dict[int, str] = {}
        entries = []
        for batch, row in rows:
            token = ""
            if self.tokens:
                if (prefix := prefixes.get(id(batch))) is None:
                    prefix = prefixes[id(batch)] = token_prefix(batch)
                token = f"{prefix}{row.sequence:016x}"
            entries.append(Entry(row.payload, batch.mailbox, message_headers(batch.mailbox, row), token))
        results = await self.queue.publish(self.namespace, destination, entries)
        return [result if isinstance(result, PrismError) else None for result in results]


class PubSubTarget(Target):
    def __init__(self, config: str, namespace: str, broker: PubSubAdapter) -> None:
        super().__init__(config, namespace, broker.capabilities)
        self.broker = broker

    async def publish(self, destination: str, rows: Sequence[Outgoing]) -> Sequence[BaseException | None]:
        # A PubSub publish takes one message: each mailbox's rows one after the other (its
        # order), the mailboxes side by side.
        subject = parse_subject(destination, "destination")  # checked at Write: a guard
        outcomes: list[BaseException | None] = [None] * len(rows)
        by_mailbox: dict[int, list[int]] = {}
        for i, (batch, _) in enumerate(rows):
            by_mailbox.setdefault(id(batch), []).append(i)

        async def mailbox(indexes: list[int]) -> None:
            for n, i in enumerate(indexes):
                batch, row = rows[i]
                try:
                    await self.broker.publish(self.namespace, subject, row.payload, message_headers(batch.mailbox, row))
                except Exception as exc:
                    for j in indexes[n:]:  # the rows behind it wait: their mailbox's order
                        outcomes[j] = exc
                    return

        await asyncio.gather(*(mailbox(indexes) for indexes in by_mailbox.values()))
        return outcomes


@dataclass(slots=True)
class Delivery:
    """One claimed mailbox on its way: how many of its rows went out, and what stopped it."""

    batch: Claimed
    target: Target | None
    sent: int = 0  # rows published (acknowledged by the destination) so far, in order
    error: BaseException | None = None

    @property
    def pending(self) -> bool:
        return self.error is None and self.sent < len(self.batch.rows)

    def run(self) -> tuple[str, int]:
        """The destination of the next row, and the end of the run of rows going there."""
        rows, mailbox = self.batch.rows, self.batch.mailbox
        destination = rows[self.sent].destination or mailbox
        end = self.sent + 1
        while end < len(rows) and (rows[end].destination or mailbox) == destination:
            end += 1
        return destination, end


@dataclass
class RouteTable:
    """The routes of one Transact backend's namespaces: namespace-wide, then per mailbox."""

    namespaces: dict[str, Target] = field(default_factory=dict)
    mailboxes: dict[tuple[str, str], Target] = field(default_factory=dict)

    def target(self, namespace: str, mailbox: str) -> Target | None:
        return self.mailboxes.get((namespace, mailbox)) or self.namespaces.get(namespace)

    @property
    def claimed(self) -> Routes:
        return Routes(frozenset(self.namespaces), frozenset(self.mailboxes))


def holder_id() -> str:
    """Who holds a lease: readable in the mailbox table, unique per listener."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class MailboxListener:
    """Delivers the routed mailboxes of one Transact adapter until closed."""

    def __init__(
        self,
        adapter: TransactAdapter,
        routes: RouteTable,
        options: MailboxListenerSettings,
        *,
        backend: str = "",
        tracing: Tracing | None = None,
    ) -> None:
        self.adapter, self.routes, self.options = adapter, routes, options
        self.backend = backend
        self.tracing = tracing
        self.holder = holder_id()
        self.margin = min(1.0, options.lease_seconds * LEASE_MARGIN)
        self.dead_lettered = 0  # rows this listener dead-lettered (each logged at WARNING)
        self.swept = 0  # delivered rows this listener deleted past their retention
        self._namespaces = sorted({*routes.namespaces, *(ns for ns, _ in routes.mailboxes)})
        self._changes: Changes | None = None
        self._task: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._settling: set[asyncio.Task[None]] = set()  # marks that outlive a cancelled delivery
        self._closing = False
        self._stop = asyncio.Event()  # set on close: the sweeper's wake-up (the loop's is the changes)

    async def start(self) -> None:
        self._changes = await self.adapter.watch()
        loop = asyncio.get_running_loop()
        self._task = loop.create_task(self._run(), name=f"mailbox-listener:{self.backend}")
        self._sweeper = loop.create_task(self._sweep(), name=f"mailbox-sweeper:{self.backend}")
        log.info(
            "mailbox listener %s on backend %r: delivering %s; delivered rows kept %gs",
            self.holder, self.backend, self._describe(), self.options.retain_delivered_seconds,
        )  # fmt: skip

    def _describe(self) -> str:
        routes = [f"{ns}/* → {t.config}" for ns, t in sorted(self.routes.namespaces.items())]
        routes += [f"{ns}/{m} → {t.config}" for (ns, m), t in sorted(self.routes.mailboxes.items())]
        return ", ".join(routes)

    async def close(self) -> None:
        """Stop claiming; deliveries under way finish and are marked (``CLOSE_WAIT`` at most,
        then they are cancelled: what they had published is marked, the rest given back)."""
        if self._task is None:
            return
        task, self._task = self._task, None
        sweeper, self._sweeper = self._sweeper, None
        self._closing = True
        self._stop.set()
        assert self._changes is not None
        self._changes.notify()
        try:
            async with asyncio.timeout(CLOSE_WAIT):
                await asyncio.shield(asyncio.gather(task, *([sweeper] if sweeper else [])))
        except TimeoutError:
            task.cancel()
            if sweeper is not None:
                sweeper.cancel()  # a batch under way commits or rolls back whole
        except Exception:  # the loops catch their own failures: a bug, logged, and the gateway stops anyway
            log.exception("mailbox listener %s ended with an error", self.holder)
        finally:
            await asyncio.gather(task, *([sweeper] if sweeper else []), *self._settling, return_exceptions=True)
            await self._changes.close()

    # --- The loop --------------------------------------------------------------------------------

    async def _run(self) -> None:
        assert self._changes is not None
        options = self.options
        failures = 0
        started = time.monotonic() - CLAIM_EVERY  # the first claim at once
        while not self._closing:
            if (left := started + CLAIM_EVERY - time.monotonic()) > 0:
                await self._sleep(left)  # under load, what commits meanwhile goes in the next claim
                if self._closing:
                    break
            self._changes.arm()  # before looking: a commit from now on wakes the wait below
            started = time.monotonic()
            try:
                claim = await self.adapter.claim(
                    self.holder,
                    self.routes.claimed,
                    lease=options.lease_seconds,
                    rows=options.batch_rows,
                    max_bytes=options.batch_bytes,
                    mailboxes=options.batch_mailboxes,
                )
            except Exception as exc:  # the database is down, or a bug: this task must live on
                failures += 1
                pause = self._backoff(failures)
                if isinstance(exc, PrismError):
                    log.warning("mailbox listener %s: claim failed (%s); retrying in %.1fs", self.holder, exc.message, pause)
                else:
                    log.exception("mailbox listener %s: claim failed; retrying in %.1fs", self.holder, pause)
                await self._pause(pause)
                continue
            failures = 0
            if claim.batches:
                await self._deliver(claim.batches, started + options.lease_seconds - self.margin)
                continue  # more may be waiting: look again at once
            wait = options.poll_seconds
            if claim.retry_ns is not None:  # another holder's lease ends then (a crashed listener's too)
                wait = min(wait, max(0.0, (claim.retry_ns - time.time_ns()) / 1e9) + 0.01)
            await self._changes.wait(wait)

    async def _pause(self, seconds: float) -> None:
        """Sleep, unless the listener closes meanwhile (close notifies the changes)."""
        assert self._changes is not None
        deadline = time.monotonic() + seconds
        while not self._closing and (left := deadline - time.monotonic()) > 0:
            self._changes.arm()
            await self._changes.wait(left)

    def _backoff(self, attempts: int) -> float:
        return min(self.options.max_retry_seconds, RETRY_BASE * 2 ** min(max(attempts - 1, 0), 30))

    async def _deliver(self, batches: Sequence[Claimed], deadline: float) -> None:
        """Publish the claimed mailboxes' rows, each mailbox's in order, while the lease lives;
        then mark what went out. Never raises: a failure is logged, counted and retried after a
        pause — or, a row refused ``max_delivery_attempts`` times, dead-lettered so the rows
        behind it go on."""
        deliveries = [Delivery(batch, self.routes.target(batch.namespace, batch.mailbox)) for batch in batches]
        try:
            async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                await self._publish(deliveries)
        except TimeoutError:
            for delivery in deliveries:
                if delivery.pending:
                    delivery.error = TimeoutError(f"the lease of {self.options.lease_seconds:g}s ran out")
        finally:  # also when cancelled (close): what went out is marked, the rest given back
            outcomes = [(d, self._failure(d)) for d in deliveries]
            settle = asyncio.ensure_future(
                asyncio.gather(*(self._settle(d.batch, d.batch.rows[: d.sent], self._retry(d, f), f) for d, f in outcomes))
            )
            self._settling.add(settle)
            settle.add_done_callback(self._settling.discard)
            await asyncio.shield(settle)
        for delivery, failure in outcomes:
            if delivery.error is not None:
                FAILURES.labels(delivery.batch.namespace).inc()
                self._report(delivery, failure, self._retry(delivery, failure))

    async def _publish(self, deliveries: Sequence[Delivery]) -> None:
        """In rounds: every mailbox's next run of rows to one destination, the runs for the same
        destination together in one publish (the common case — every row to one topic — is one
        publish for the whole claim), until each mailbox is done or stopped."""
        while True:
            groups: dict[tuple[int, str], tuple[Target, str, list[tuple[Delivery, int]]]] = {}
            for delivery in deliveries:
                if not delivery.pending:
                    continue
                if delivery.target is None:  # claims take routed mailboxes only: a guard
                    delivery.error = failed_precondition(f"no route for mailbox {delivery.batch.mailbox!r}")
                    continue
                destination, end = delivery.run()
                group = groups.setdefault((id(delivery.target), destination), (delivery.target, destination, []))
                group[2].append((delivery, end))
            if not groups:
                return
            if len(groups) == 1:
                await self._publish_runs(*next(iter(groups.values())))
            else:
                await asyncio.gather(*(self._publish_runs(*group) for group in groups.values()))

    async def _publish_runs(self, target: Target, destination: str, runs: list[tuple[Delivery, int]]) -> None:
        """One publish of several mailboxes' runs (``(delivery, end)``: its rows up to ``end``);
        each mailbox counts the rows acknowledged before its first failure."""
        rows = [(d.batch, row) for d, end in runs for row in d.batch.rows[d.sent : end]]
        try:
            outcomes = await target.publish(destination, rows)
        except Exception as exc:
            if len(runs) > 1 and refused(exc):  # which row was refused? Each mailbox's run on its own
                await asyncio.gather(*(self._publish_runs(target, destination, [run]) for run in runs))
                return
            for delivery, _ in runs:
                delivery.error = exc
            return
        at = 0
        for delivery, end in runs:
            count = end - delivery.sent
            for outcome in outcomes[at : at + count]:
                if outcome is not None:
                    delivery.error = outcome
                    break
                delivery.sent += 1
            at += count
            if delivery.error is None and delivery.sent < end:  # fewer outcomes than rows: a bug, not a delivery
                delivery.error = internal()

    def _failure(self, delivery: Delivery) -> Failure | None:
        """What the row the delivery stopped at gets recorded: the error, a refusal counted,
        dead-lettered at the limit. None: nothing failed, or the failure came after the last row."""
        error, batch, sent = delivery.error, delivery.batch, delivery.sent
        if error is None or sent >= len(batch.rows):
            return None
        row = batch.rows[sent]
        refusal = refused(error)
        limit = self.options.max_delivery_attempts
        dead = refusal and limit > 0 and row.refusals + 1 >= limit
        where = delivery.target.config if delivery.target is not None else "nowhere"
        return Failure(row.sequence, f"{error_text(error)} (delivering to {where})", refusal, dead)

    def _retry(self, delivery: Delivery, failure: Failure | None) -> float:
        """The pause before the mailbox is claimed again: none unless a row is left to retry."""
        if failure is None or failure.dead:
            return 0.0
        return self._backoff(delivery.batch.rows[delivery.sent].attempts)

    def _report(self, delivery: Delivery, failure: Failure | None, retry: float) -> None:
        """One WARNING per failed delivery, saying what happens to the row next."""
        batch, sent, error = delivery.batch, delivery.sent, delivery.error
        assert error is not None
        where = f"{batch.namespace}/{batch.mailbox}"
        config = delivery.target.config if delivery.target is not None else "nowhere"
        if failure is not None and failure.dead:
            self.dead_lettered += 1
            DEAD_LETTERED.labels(batch.namespace).inc()
            log.warning(
                "mailbox listener %s: %s row %d dead-lettered after %d refusals by %s (%s); "
                "the rows behind it go on (see dead_ns in prism_transact_mailbox)",
                self.holder, where, failure.sequence, self.options.max_delivery_attempts, config, error_text(error),
            )  # fmt: skip
            return
        what, limit = "failed", self.options.max_delivery_attempts
        if failure is not None and failure.refused:
            what = f"refused ({batch.rows[sent].refusals + 1} of {limit} before dead-lettering)" if limit else "refused"
        log.warning(
            "mailbox listener %s: %s delivered %d of %d rows to %s, then %s (%s); retrying in %.1fs",
            self.holder, where, sent, len(batch.rows), config, what, error_text(error), retry,
        )  # fmt: skip

    async def _settle(self, batch: Claimed, sent: Sequence[MailboxRow], retry: float, failure: Failure | None) -> None:
        now = time.time_ns()
        if sent:
            DELIVERED.labels(batch.namespace).inc(len(sent))
            lag = LAG.labels(batch.namespace)
            for row in sent:
                lag.observe(max(0.0, (now - row.committed_ns) / 1e9))
                if self.tracing is not None:  # a span in the trace the row carries
                    attributes = {"prism.mailbox": batch.mailbox, "prism.mailbox.sequence": row.sequence}
                    self.tracing.consumed("mailbox deliver", row.headers, attributes)
        try:
            await self.adapter.mark_delivered(
                self.holder, batch.namespace, batch.mailbox, [r.sequence for r in sent], retry_after=retry, failure=failure
            )
        except Exception as exc:  # its lease runs out instead; the rows are delivered again (at least once)
            log.warning(
                "mailbox listener %s: could not mark %d rows of %s/%s delivered (%s)",
                self.holder, len(sent), batch.namespace, batch.mailbox, exc,
            )  # fmt: skip

    # --- Retention -------------------------------------------------------------------------------

    async def _sweep(self) -> None:
        """Until closed: now and then, delete the delivered rows past their retention. Never
        raises (a failed sweep is logged and the next one tries again)."""
        low, high = SWEEP_SECONDS
        every = max(low, min(high, self.options.retain_delivered_seconds))
        await self._sleep(random.uniform(0, every))  # the listeners of a database need not sweep in step
        while not self._closing:
            try:
                await self.sweep()
            except Exception as exc:
                why = exc.message if isinstance(exc, PrismError) else f"{type(exc).__name__}: {exc}"
                log.warning("mailbox listener %s: deleting delivered rows failed (%s); trying again in %gs", self.holder, why, every)
            await self._sleep(every)

    async def sweep(self) -> int:
        """Delete the rows of this listener's namespaces delivered more than
        ``retain_delivered_seconds`` ago; how many."""
        before_ns = time.time_ns() - int(self.options.retain_delivered_seconds * 1e9)
        total = 0
        for namespace in self._namespaces:
            total += await self._sweep_namespace(namespace, before_ns)
        if total:
            log.info(
                "mailbox listener %s: deleted %d rows delivered more than %gs ago",
                self.holder, total, self.options.retain_delivered_seconds,
            )  # fmt: skip
        return total

    async def _sweep_namespace(self, namespace: str, before_ns: int) -> int:
        """``SWEEP_BATCH`` rows at a time, each batch its own short transaction, with a pause
        between them so writers are not kept waiting, until none is left (or the listener closes)."""
        total = 0
        while not self._closing:
            deleted = await self.adapter.delete_delivered(namespace, before_ns=before_ns, limit=SWEEP_BATCH)
            total += deleted
            self.swept += deleted
            DELETED.labels(namespace).inc(deleted)
            if deleted < SWEEP_BATCH:
                break
            await asyncio.sleep(SWEEP_PAUSE)
        return total

    async def _sleep(self, seconds: float) -> None:
        """Sleep, unless the listener closes meanwhile."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stop.wait()


# --- Built from the server configuration ----------------------------------------------------------


def _target(settings: Settings, backends: Backends, named: NamedConfig, key: str, *, alone: bool) -> Target:
    config = from_settings(named, settings)
    if named.pattern == "QUEUE":
        target: Target = QueueTarget(named.name, named.namespace, backends.for_queue(config))
    else:
        target = PubSubTarget(named.name, named.namespace, backends.for_pubsub(config))
    if alone and Capability.SHARED not in target.capabilities:
        raise SettingsError(
            f"{key}: config {named.name!r} is on backend {named.backend!r}, which lives in each process: "
            "what `prism listener` published there would reach no gateway. Deliver to a shared backend "
            "(SQLite, PostgreSQL, Redis, NATS …), or run the listener inside the gateway (mailbox_listener.in_gateway)"
        )
    return target


def routed_backends(settings: Settings) -> set[str]:
    """The backends a listener opens: those of delivered namespaces and of their destinations."""
    named = {c.name: c for c in settings.configs}
    needed: set[str] = set()
    for spec in settings.transact.values():
        if spec.delivered:
            needed.add(spec.backend)
            routes = [spec.deliver_to, *(m.deliver_to for m in spec.mailboxes.values())]
            needed.update(named[r].backend for r in routes if r is not None)
    return needed


def build_listeners(
    settings: Settings, backends: Backends, tracing: Tracing | None = None, *, alone: bool = False
) -> list[MailboxListener]:
    """One listener per Transact backend that holds a delivered namespace (none: nothing routed).
    SettingsError naming the key when a destination cannot work."""
    named = {c.name: c for c in settings.configs}
    tables: dict[str, RouteTable] = {}
    for namespace, spec in settings.transact.items():
        if not spec.delivered:
            continue
        table = tables.setdefault(spec.backend, RouteTable())
        if spec.deliver_to is not None:
            key = f"transact.{namespace}.deliver_to"
            table.namespaces[namespace] = _target(settings, backends, named[spec.deliver_to], key, alone=alone)
        for mailbox, route in spec.mailboxes.items():
            key = f"transact.{namespace}.mailboxes.{mailbox}.deliver_to"
            table.mailboxes[(namespace, mailbox)] = _target(settings, backends, named[route.deliver_to], key, alone=alone)
    adapters = backends.adapters("TRANSACT")
    listeners = []
    for backend, table in tables.items():
        adapter = adapters.get(backend)
        if not isinstance(adapter, TransactAdapter):
            raise SettingsError(f"transact: backend {backend!r} serves no TRANSACT")
        listeners.append(MailboxListener(adapter, table, settings.mailbox_listener, backend=backend, tracing=tracing))
    return listeners


class MailboxListeners:
    """Every listener of a gateway process, started and closed with it."""

    def __init__(self, listeners: Sequence[MailboxListener]) -> None:
        self.listeners = list(listeners)

    @classmethod
    async def start(
        cls, settings: Settings, backends: Backends, tracing: Tracing | None = None, *, alone: bool = False
    ) -> MailboxListeners:
        group = cls(build_listeners(settings, backends, tracing, alone=alone))
        try:
            for listener in group.listeners:
                await listener.start()
        except BaseException:
            await group.close()
            raise
        return group

    async def close(self) -> None:
        for listener in self.listeners:
            await listener.close()


async def run_alone(settings: Settings, stop: asyncio.Event) -> None:
    """``prism listener``: only the backends the routes need, the listeners, until ``stop``."""
    needed = routed_backends(settings)
    if not needed:
        raise SettingsError(
            "transact: no namespace routes its mailboxes (transact.<namespace>.deliver_to, or .mailboxes): nothing to deliver"
        )
    mine = settings.model_copy(update={"backends": {n: b for n, b in settings.backends.items() if n in needed}})
    backends = Backends(mine)
    tracing = Tracing.of(settings.tracing)
    try:
        await backends.start()
        group = await MailboxListeners.start(mine, backends, tracing, alone=True)
        try:
            await stop.wait()
        finally:
            await group.close()
    finally:
        await backends.close()
        if tracing is not None:
            await asyncio.to_thread(tracing.shutdown)
