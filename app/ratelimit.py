"""Token buckets per namespace and per session configuration (RFC §3.1).

Buckets live in each worker process, so with N workers a namespace may see up to N times its
rate; the retry hint is the time until the next token.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import grpc

from prism.errors import PrismError

Clock = Callable[[], float]


class TokenBucket:
    __slots__ = ("burst", "rate", "tokens", "updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.updated = float(burst), now

    def take(self, now: float) -> float:
        """0 when a token was taken, else the seconds until one is available."""
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now
        if self.tokens >= 1:
            self.tokens -= 1
            return 0.0
        return (1 - self.tokens) / self.rate


class RateLimiter:
    def __init__(self, clock: Clock = time.monotonic, max_buckets: int = 100_000) -> None:
        self.clock = clock
        self.max_buckets = max_buckets
        self._buckets: dict[str, TokenBucket] = {}

    def check(self, key: str, rate: float, burst: int, what: str) -> None:
        """RESOURCE_EXHAUSTED (HTTP 429, Retry-After) when ``key``'s bucket is empty."""
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None or bucket.rate != rate or bucket.burst != burst:
            if len(self._buckets) >= self.max_buckets:  # bounded: forget the oldest bucket
                del self._buckets[next(iter(self._buckets))]
            bucket = self._buckets[key] = TokenBucket(rate, burst, now)
        wait = bucket.take(now)
        if wait:
            raise PrismError(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"rate limit of {what} exceeded ({rate:g}/s, burst {burst}); retry in {wait:.3f}s",
                retry_after=wait,
            )
