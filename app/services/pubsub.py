"""PubSubService: subjects, patterns and options checked once here, delivery by any
PubSub adapter.

A session's configuration may ask what a full subscription buffer does
(``backend.options.overflow``: ``end``, the default, ends the subscription with
RESOURCE_EXHAUSTED; ``drop_oldest`` drops the oldest waiting message): see
``adapters/pubsub/base.py``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

import grpc

from adapters.capabilities import Capability
from adapters.pubsub.base import (
    AfterMessage,
    Delivery,
    FromTime,
    Overflow,
    PubSubAdapter,
    Start,
    Subscription,
)
from adapters.pubsub.subjects import parse_pattern, parse_subject
from app import metrics
from app.backends import Backends
from app.pipeline import Call
from app.services.capabilities import require
from app.services.pubsub_batches import EncodedBatch, fill
from app.sessions import SessionStore
from app.settings import Limits
from prism.errors import PrismError, invalid_argument, not_found, prefixed, too_large
from prism.v1 import config_pb2
from prism.v1 import pubsub_pb2 as ps

log = logging.getLogger(__name__)
END_WAIT_SECONDS = 2.0
DEFAULT_MAX_BATCH = 100  # SubscribeBatches: messages in one response, at most
MAX_LINGER_MS = 1000  # SubscribeBatches: the longest a waiting message waits for others
OVERFLOW_OPTION = "overflow"


def start_position(request: ps.PubSubSubscribeRequest, broker: PubSubAdapter, call: Call) -> Start | None:
    """Where the subscription starts: ``start`` needs a backend with history (FAILED_PRECONDITION
    elsewhere) and no queue group; ``cursor`` (what an EventSource's Last-Event-ID becomes)
    resumes where the backend can, and is ignored where it cannot."""
    which = request.WhichOneof("start")
    if which == "start_after" and not request.start_after:
        which = None  # `?startAfter=` with nothing after it: no message named, no start
    if which is None:
        if request.cursor and not request.queue_group and Capability.REPLAY in broker.capabilities:
            return AfterMessage(request.cursor, required=False)
        return None
    field = "startTime" if which == "start_time" else "startAfter"
    require(broker, Capability.REPLAY, call, field)
    if request.queue_group:
        raise invalid_argument(field, "a queue group goes on where the group left off: no start position with queueGroup")
    if which == "start_time":
        return FromTime(request.start_time.ToNanoseconds())
    return AfterMessage(request.start_after)


def overflow(config: config_pb2.ClientConfig) -> Overflow:
    """What the session's configuration asks a full subscription buffer to do."""
    value = config.backend.options.get(OVERFLOW_OPTION, Overflow.END.value)
    try:
        return Overflow(value)
    except ValueError:
        field = f"config.backend.options.{OVERFLOW_OPTION}"
        choices = ", ".join(o.value for o in Overflow)
        raise PrismError(
            grpc.StatusCode.FAILED_PRECONDITION, f"{field}: {value!r} is not one of {choices}", field=field
        ) from None


class PubSubService:
    SERVICE = "prism.v1.PubSubService"

    def __init__(self, backends: Backends, limits: Limits, sessions: SessionStore) -> None:
        self.backends = backends
        self.limits = limits
        self.sessions = sessions  # knows every open subscription, whichever process serves it
        self._open: dict[str, tuple[str, Subscription]] = {}  # served here: id → (session id, subscription)

    async def Publish(self, request: ps.PubSubPublishRequest, call: Call) -> ps.PubSubPublishResponse:
        return ps.PubSubPublishResponse(message_id=await self._publish(request, call))

    async def PublishStream(
        self, requests: AsyncIterator[ps.PubSubPublishRequest], call: Call
    ) -> ps.PublishStreamResponse:
        """Each message published before the next is read, so order and rate limits hold as
        for Publish; a refusal names the message by its place in the stream."""
        response = ps.PublishStreamResponse()
        async for request in requests:
            try:
                response.last_message_id = await self._publish(request, call)
            except PrismError as exc:
                raise prefixed(exc, f"request[{response.published}].") from None
            response.published += 1
        return response

    async def _publish(self, request: ps.PubSubPublishRequest, call: Call) -> str:
        subject = parse_subject(request.subject)
        if len(request.data) > self.limits.max_value_bytes:
            raise too_large("data", len(request.data), self.limits.max_value_bytes)
        broker = self.backends.for_pubsub(call.config)
        message_id = await broker.publish(call.config.namespace, subject, request.data, request.headers)
        metrics.PUBLISHED.labels("pubsub", call.config.namespace).inc()
        return message_id

    async def Subscribe(
        self, request: ps.PubSubSubscribeRequest, call: Call
    ) -> AsyncIterator[ps.PubSubSubscribeResponse]:
        if request.max_batch:
            raise invalid_argument("maxBatch", "is for SubscribeBatches; Subscribe sends one message a response")
        if request.linger_ms:
            raise invalid_argument("lingerMs", "is for SubscribeBatches; Subscribe sends each message at once")
        async for subscription_id, deliveries in self._deliveries(request, call, 1):
            response = ps.PubSubSubscribeResponse(subscription_id=subscription_id)
            if deliveries:
                fill(response.message, deliveries[0])
            yield response

    async def SubscribeBatches(self, request: ps.PubSubSubscribeRequest, call: Call) -> AsyncIterator[EncodedBatch]:
        """Subscribe's deliveries, what is waiting together in one response. Each message is
        encoded once for all the subscribers it reaches (app/services/pubsub_batches.py)."""
        cap = self.limits.stream_buffer
        if not 0 <= request.max_batch <= cap:
            raise invalid_argument("maxBatch", f"must be between 1 and {cap} (0: {DEFAULT_MAX_BATCH})")
        if not 0 <= request.linger_ms <= MAX_LINGER_MS:
            raise invalid_argument("lingerMs", f"must be between 0 and {MAX_LINGER_MS}")
        most, linger = request.max_batch or DEFAULT_MAX_BATCH, request.linger_ms / 1000
        async for subscription_id, deliveries in self._deliveries(request, call, most, linger):
            yield EncodedBatch(subscription_id, deliveries)

    async def _deliveries(
        self, request: ps.PubSubSubscribeRequest, call: Call, most: int, linger: float = 0.0
    ) -> AsyncIterator[tuple[str, list[Delivery]]]:
        """(subscription id, []) once the subscription is live, then (id, the deliveries
        waiting, at most ``most``) while it lasts: a reader that is behind takes what piled up
        at once (and, with ``linger`` seconds, what arrives that much longer)."""
        pattern = parse_pattern(request.subject)
        broker = self.backends.for_pubsub(call.config)
        if request.queue_group:
            require(broker, Capability.QUEUE_GROUPS, call, "queueGroup")
        start = start_position(request, broker, call)
        assert call.session is not None
        subscription = await broker.subscribe(call.config.namespace, pattern, request.queue_group, overflow(call.config), start)
        ended_by: list[PrismError] = []  # the session's status, when closing or expiring it ended this

        async def end(status: PrismError | None) -> None:
            if status is not None:
                ended_by.append(status)
            await subscription.close()

        self._open[subscription.id] = (call.session.session_id, subscription)
        call.session.hold_stream(subscription.id, end)
        try:
            await self.sessions.stream_opened(subscription.id, call.session.session_id)
            yield subscription.id, []
            delivered = metrics.DELIVERED.labels("pubsub", call.config.namespace)
            while deliveries := await subscription.take(most, linger):
                delivered.inc(len(deliveries))
                yield subscription.id, deliveries
            if ended_by:  # not a clean end: the client must open a new session
                raise ended_by[0]
        finally:
            self._open.pop(subscription.id, None)
            call.session.release_stream(subscription.id)
            await subscription.close()
            try:
                await asyncio.shield(self.sessions.stream_closed(subscription.id))
            except PrismError as exc:  # the store expires or sweeps the entry later
                log.warning("subscription %s ended, not yet recorded: %s", subscription.id, exc.message)

    async def Unsubscribe(self, request: ps.UnsubscribeRequest, call: Call) -> ps.UnsubscribeResponse:
        """Ends the subscription whichever worker or instance serves it; answers once it ended
        (or, served elsewhere, after END_WAIT_SECONDS at most: its process ends it when it polls)."""
        assert call.session is not None
        subscription_id = request.subscription_id
        missing = not_found(f"no open subscription {subscription_id!r} in this session")
        owner, subscription = self._open.get(subscription_id, ("", None))
        if subscription is not None:
            if owner != call.session.session_id:
                raise missing
            await subscription.close()
            return ps.UnsubscribeResponse()
        if await self.sessions.stream_owner(subscription_id) != call.session.session_id:
            raise missing
        await self.sessions.request_stream_end(subscription_id)
        deadline = asyncio.get_running_loop().time() + END_WAIT_SECONDS
        while await self.sessions.stream_owner(subscription_id) is not None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.05)
        return ps.UnsubscribeResponse()

