"""Sessions in Redis: every gateway instance connected to the server shares them.

Layout, under a key prefix (``prism:session:``, or the ``key_prefix`` query parameter of
``sessions.redis_url``, e.g. ``redis://127.0.0.1:6379/0?key_prefix=staging:session:``):

    <prefix>s:<digest>  HASH    i session id, u identity, r roles (JSON), c config (protobuf),
                                t created_at, l last activity, e effective deadline (unix
                                seconds). Its Redis TTL is the time left to e, so an abandoned
                                session disappears server-side even if no gateway looks again.
    <prefix>m:<digest>  STRING  created_at, kept until the absolute deadline plus
                                EXPIRED_KEPT_SECONDS: a token whose hash Redis expired is still
                                answered "expired", not "unknown". CloseSession deletes both.
    <prefix>configs     HASH    registered client configurations: name -> protobuf (HSETNX).
    <prefix>live        ZSET    digest scored by its effective deadline, so counting the live
                                sessions (``prism_sessions_active``) is one ZCOUNT, not a SCAN.

Resolving a token is one HMGET. Activity is written by one script (both fields and the TTL,
only if the session still exists and only forward) at most once a second per session.
TTLs are relative (PEXPIRE), computed from the store's clock.

Connection failures become UNAVAILABLE at once; the pool reconnects on the next call.
"""

from __future__ import annotations

import math
import urllib.parse
from typing import Any

import redis.asyncio as aioredis

from adapters.backends.redis import RedisClient, RedisSettings
from app.sessions.base import EXPIRED_KEPT_SECONDS, SessionRecord, SessionStore, roles_of, roles_text
from prism.errors import PrismError
from prism.v1 import config_pb2

DEFAULT_PREFIX = "prism:session:"
WHAT = "session store (redis)"
FIELDS = ["i", "u", "c", "t", "l", "e", "r"]

# KEYS: session hash, live set. ARGV: last activity, effective deadline, TTL in ms, digest.
# 0 if the session is gone.
TOUCH = """
local last = redis.call('HGET', KEYS[1], 'l')
if not last then return 0 end
if tonumber(ARGV[1]) > tonumber(last) then
  redis.call('HSET', KEYS[1], 'l', ARGV[1], 'e', ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[2], ARGV[2], ARGV[4])
end
return 1
"""


def split_prefix(url: str) -> tuple[str, str]:
    """(the URL for redis-py, the key prefix) from a URL that may carry ``key_prefix``."""
    parts = urllib.parse.urlsplit(url)
    query = urllib.parse.parse_qsl(parts.query, keep_blank_values=True)
    prefix = next((value for name, value in query if name == "key_prefix"), DEFAULT_PREFIX)
    rest = urllib.parse.urlencode([(name, value) for name, value in query if name != "key_prefix"])
    return urllib.parse.urlunsplit(parts._replace(query=rest)), prefix


def _ms(seconds: float) -> int:
    return max(1, math.ceil(seconds * 1000))


MARK_END = "if redis.call('EXISTS', KEYS[1]) == 1 then redis.call('HSET', KEYS[1], 'e', 1) end"


class RedisSessionStore(SessionStore):
    shared = True

    def __init__(
        self,
        url: str,
        *,
        pool_size: int = 50,
        connect_timeout: float = 2.0,
        command_timeout: float = 5.0,
        **lifecycle: Any,
    ) -> None:
        super().__init__(**lifecycle)
        self.url, self.prefix = split_prefix(url)
        network = {"pool_size": pool_size, "connect_timeout": connect_timeout, "command_timeout": command_timeout}
        self.client = RedisClient(RedisSettings(url=self.url, **network), WHAT)

    def session_key(self, digest: str) -> str:
        return f"{self.prefix}s:{digest}"

    def marker_key(self, digest: str) -> str:
        return f"{self.prefix}m:{digest}"

    @property
    def live_key(self) -> str:
        return f"{self.prefix}live"

    @property
    def configs_key(self) -> str:
        return f"{self.prefix}configs"

    async def start(self) -> None:
        await self.client.start()
        self._touch_script = self.redis.register_script(TOUCH)

    async def close_store(self) -> None:
        await super().close_store()
        await self.client.close()

    @property
    def redis(self) -> aioredis.Redis:
        return self.client.redis

    async def _insert(self, r: SessionRecord) -> None:
        now = self.clock()
        fields = {
            "i": r.session_id,
            "u": r.identity,
            "c": r.config.SerializeToString(),
            "t": repr(r.created_at),
            "l": repr(r.last_activity_at),
            "e": repr(r.expires_at),
            "r": roles_text(r.roles),
        }
        remembered = r.created_at + self.max_lifetime + EXPIRED_KEPT_SECONDS - now
        with self.client.errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.session_key(r.digest), mapping=fields)
                pipe.pexpire(self.session_key(r.digest), _ms(r.expires_at - now))
                pipe.set(self.marker_key(r.digest), repr(r.created_at), px=_ms(remembered))
                pipe.zadd(self.live_key, {r.digest: r.expires_at})
                await pipe.execute()

    async def _load(self, digest: str) -> SessionRecord | None:
        with self.client.errors():
            i, u, c, t, last, e, r = await self.redis.hmget(self.session_key(digest), FIELDS)
        if i is None or c is None or r is None:
            return None
        config = config_pb2.ClientConfig.FromString(c)
        return SessionRecord(
            i.decode(), u.decode(), config, float(t), float(e), float(last), digest, roles_of(r), self.streams
        )

    async def _touch(self, r: SessionRecord) -> bool:
        ttl = _ms(r.expires_at - self.clock())
        with self.client.errors():
            found = await self._touch_script(
                keys=[self.session_key(r.digest), self.live_key],
                args=[repr(r.last_activity_at), repr(r.expires_at), ttl, r.digest],
            )
        return found == 1

    async def _delete(self, digest: str) -> None:
        with self.client.errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(self.session_key(digest), self.marker_key(digest))
                pipe.zrem(self.live_key, digest)
                await pipe.execute()

    async def active_count(self) -> int:
        now = self.clock()
        with self.client.errors():  # expired entries leave the set here; Redis expired their hashes
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.zremrangebyscore(self.live_key, "-inf", now)
                pipe.zcard(self.live_key)
                _, count = await pipe.execute()
        return int(count)

    async def _sweep(self, expired_before: float) -> None:
        """Nothing to do: Redis expires both keys itself."""

    async def _missing(self, digest: str, now: float) -> PrismError | None:
        with self.client.errors():
            created_at = await self.redis.get(self.marker_key(digest))
        # Which deadline Redis expired the hash at is gone with it: before the absolute deadline
        # it can only have been the idle one; after it, it is reported as the maximum lifetime.
        return None if created_at is None else self.expired(float(created_at), now)

    async def register_config(self, name: str, config: bytes) -> bool:
        with self.client.errors():
            return bool(await self.redis.hsetnx(self.configs_key, name, config))

    async def registered_config(self, name: str) -> bytes | None:
        with self.client.errors():
            found: bytes | None = await self.redis.hget(self.configs_key, name)
        return found

    async def registered_configs(self) -> list[bytes]:
        with self.client.errors():
            found: dict[bytes, bytes] = await self.redis.hgetall(self.configs_key)
        return [config for _, config in sorted(found.items())]

    def stream_key(self, stream_id: str) -> str:
        return f"{self.prefix}st:{stream_id}"

    async def stream_opened(self, stream_id: str, session_id: str) -> None:
        # Expires with the longest a session lives, should the serving worker die first.
        with self.client.errors():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.stream_key(stream_id), mapping={"s": session_id, "e": 0})
                pipe.pexpire(self.stream_key(stream_id), _ms(self.max_lifetime))
                await pipe.execute()

    async def stream_closed(self, stream_id: str) -> None:
        with self.client.errors():
            await self.redis.delete(self.stream_key(stream_id))

    async def stream_owner(self, stream_id: str) -> str | None:
        with self.client.errors():
            owner = await self.redis.hget(self.stream_key(stream_id), "s")
        return None if owner is None else owner.decode()

    async def request_stream_end(self, stream_id: str) -> None:
        with self.client.errors():  # only while it is open: never a key without its expiry
            await self.redis.eval(MARK_END, 1, self.stream_key(stream_id))

    async def ends_requested(self, stream_ids: list[str]) -> list[str]:
        if not stream_ids:
            return []
        with self.client.errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for stream_id in stream_ids:
                    pipe.hget(self.stream_key(stream_id), "e")
                marks = await pipe.execute()
        return [s for s, mark in zip(stream_ids, marks, strict=True) if mark == b"1"]
