"""Idempotency tokens: a write carrying a token applies at most once, across every worker and
gateway instance that shares the backend.

The claim is a create-only write (``if_absent``) of a *pending* record in the backend itself,
so exactly one caller wins, whichever process it reached:

    winner:  claim (pending, leased) ─► apply ─► record the response (if_match the claim)
    others:  claim refused ─► read ─► done: the winner's response
                                   ├─ pending: wait and read again
                                   └─ pending past its lease (the winner died): take it over

A failed apply removes the claim, so a retry applies afresh; a token reused with another request
is ALREADY_EXISTS (409). Any KeyValue adapter can hold the records (they expire after the window).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
from collections.abc import Awaitable, Callable

import grpc
from google.protobuf.message import Message

from adapters.keyvalue.base import KeyValueAdapter
from prism.errors import PrismError

WINDOW_SECONDS = 24 * 3600  # how long a token is remembered
LEASE_SECONDS = 30.0  # how long a claim holds before another caller may take it over
FIRST_POLL, LAST_POLL = 0.005, 0.2


class Idempotency:
    def __init__(self, lease_seconds: float = LEASE_SECONDS, window_seconds: float = WINDOW_SECONDS) -> None:
        self.lease = lease_seconds
        self.window = window_seconds

    async def once(
        self,
        store: KeyValueAdapter,
        namespace: str,
        key: str,
        request: Message,
        response_type: type[Message],
        apply: Callable[[], Awaitable[Message]],
    ) -> Message:
        """``apply()``'s response, from this call or from the first call with this ``key``.

        ``namespace`` must be one no client can write (the service's hidden namespace)."""
        fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).hexdigest()
        claim = await self._claim(store, namespace, key, fingerprint)
        if isinstance(claim, bytes):
            return response_type.FromString(claim)
        try:
            response = await apply()
        except BaseException:
            # Let a retry apply afresh; the write failed, or never happened.
            await asyncio.shield(store.delete(namespace, key, if_match=claim))
            raise
        done = {"state": "done", "request": fingerprint, "response": base64.b64encode(response.SerializeToString()).decode()}
        await store.set(
            namespace, key, json.dumps(done).encode(), expires_at=store.clock() + self.window, if_match=claim
        )
        return response

    async def _claim(self, store: KeyValueAdapter, namespace: str, key: str, fingerprint: str) -> str | bytes:
        """The ETag of our claim when we won; the recorded response when another call did."""
        poll = FIRST_POLL
        deadline = store.clock() + self.lease + 5
        while True:
            now = store.clock()
            pending = json.dumps({"state": "pending", "request": fingerprint, "lease_until": now + self.lease}).encode()
            try:
                return await store.set(namespace, key, pending, expires_at=now + self.window, if_absent=True)
            except PrismError as exc:
                if exc.code != grpc.StatusCode.ALREADY_EXISTS:
                    raise
            record = await store.get(namespace, key)
            if record is None:
                continue  # removed by a failed winner meanwhile: claim again
            entry = json.loads(record.value)
            if entry["request"] != fingerprint:  # 409: the token is taken, by another request
                raise PrismError(
                    grpc.StatusCode.ALREADY_EXISTS,
                    "idempotencyToken: already used by a different request",
                    field="idempotencyToken",
                )
            if entry.get("state", "done") == "done":  # records written before claims had no state
                return base64.b64decode(entry["response"])
            if entry["lease_until"] < now:  # the winner died mid-call: take its claim over
                try:
                    return await store.set(namespace, key, pending, expires_at=now + self.window, if_match=record.etag)
                except PrismError as exc:
                    if exc.code != grpc.StatusCode.ABORTED:
                        raise
                    continue
            if now > deadline:
                raise PrismError(
                    grpc.StatusCode.ABORTED, "a call with this idempotency token is still in progress; retry later"
                )
            await asyncio.sleep(poll)
            poll = min(poll * 2, LAST_POLL)
