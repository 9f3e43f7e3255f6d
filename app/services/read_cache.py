"""The optional per-namespace read cache of KeyValue (RFC §3.2 cache + consistency).

A session's ClientConfig decides per read: STRONG (and unspecified) reads always go to the
backend; EVENTUAL reads may be served from cache for up to ``cache.ttl``; BOUNDED_STALENESS
reads only from entries younger than ``consistency.max_staleness`` (and the ttl). Every write
through this gateway process invalidates the key; writes by other processes or instances are
seen once an entry ages out — that is the staleness the client opted into. Each cache is an
LRU bounded by ``cache.max_entries``; hits and misses are counted per namespace.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from prometheus_client import Counter

from adapters.keyvalue.base import Record
from prism.v1 import config_pb2

CACHE_READS = Counter("prism_kv_cache_reads", "KeyValue reads that could use the cache", ["namespace", "result"])

Clock = Callable[[], float]
_CACHED_LEVELS = (config_pb2.CONSISTENCY_LEVEL_EVENTUAL, config_pb2.CONSISTENCY_LEVEL_BOUNDED_STALENESS)


def max_age(config: config_pb2.ClientConfig) -> float | None:
    """How old a cached entry may be for this config's reads; None: do not use the cache."""
    if not config.cache.enabled or config.consistency.level not in _CACHED_LEVELS:
        return None
    age = config.cache.ttl.ToNanoseconds() / 1e9
    if config.consistency.level == config_pb2.CONSISTENCY_LEVEL_BOUNDED_STALENESS:
        age = min(age, config.consistency.max_staleness.ToNanoseconds() / 1e9)
    return age if age > 0 else None


class ReadCache:
    def __init__(self, clock: Clock = time.monotonic, wall_clock: Clock = time.time) -> None:
        self.clock = clock
        self.wall_clock = wall_clock  # record expiry is in unix seconds
        self._caches: dict[tuple[str, str], OrderedDict[str, tuple[Record, float]]] = {}

    def _cache(self, config: config_pb2.ClientConfig) -> OrderedDict[str, tuple[Record, float]]:
        return self._caches.setdefault((config.backend.instance, config.namespace), OrderedDict())

    def lookup(self, config: config_pb2.ClientConfig, key: str) -> Record | None:
        limit = max_age(config)
        if limit is None:
            return None
        cache = self._cache(config)
        entry = cache.get(key)
        fresh = (
            entry is not None
            and self.clock() - entry[1] <= limit
            and (entry[0].expires_at is None or entry[0].expires_at > self.wall_clock())
        )
        CACHE_READS.labels(config.namespace, "hit" if fresh else "miss").inc()
        if not fresh:
            return None
        cache.move_to_end(key)
        return entry[0]  # type: ignore[index]

    def store(self, config: config_pb2.ClientConfig, key: str, record: Record) -> None:
        if max_age(config) is None:
            return
        cache = self._cache(config)
        cache[key] = (record, self.clock())
        cache.move_to_end(key)
        while len(cache) > max(1, config.cache.max_entries):
            cache.popitem(last=False)

    def invalidate(self, config: config_pb2.ClientConfig, key: str) -> None:
        cache = self._caches.get((config.backend.instance, config.namespace))
        if cache is not None:
            cache.pop(key, None)
