"""Redis KeyValue store over redis.asyncio.

Layout for namespace ``N`` (both strings as UTF-8 bytes; Redis keys are binary-safe, and the
length prefix means no namespace's keys can be mistaken for another's, whatever they contain):

    prism:kv:<len N>:<N><key>   HASH  v = value, e = ETag, x = expiry in unix ms (with a TTL only);
                                      expires natively (PEXPIREAT)
    prism:kvi:<len N>:<N>       ZSET  every key, score 0, for scans in UTF-8 byte order (ZRANGEBYLEX)
    prism:kvx:<len N>:<N>       ZSET  keys with a TTL, scored by expiry, so expired keys leave the index

Every write is one Lua script (EVALSHA through redis-py's ``Script``, reloaded by it after a
server restart), so the ETag check, the write, the TTL and both indexes change atomically.
Each write also drops a few already-expired keys of its namespace from the indexes; a scan
skips (and forgets) any indexed key whose record is gone. No command takes a glob pattern.

Not DURABLE: what Redis keeps across its own restart depends on its persistence settings
(RDB snapshots lose the last minutes, AOF ``everysec`` the last second, and the servers here
keep nothing on disk), so an acknowledged write may be lost. SHARED: every gateway process
connected to the server sees the same data.

Commands run on the backend instance's client (``adapters/backends/redis.py``): connection
failures and timeouts become UNAVAILABLE at once (no client-side retries, short socket
timeouts); the pool replaces broken connections on the next call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from adapters.capabilities import Capability
from adapters.keyvalue.base import (
    KeyValueAdapter,
    Record,
    Write,
    already_exists,
    etag_mismatch,
    new_etag,
    prefix_end,
)

if TYPE_CHECKING:  # the backend module imports this one to declare its adapters
    import redis.asyncio as aioredis

    from adapters.backends.redis import RedisClient

# Drop up to 32 expired members from both indexes (KEYS[2], KEYS[3]). Redis expires a key once
# its PEXPIREAT time is strictly in the past, so a score below TIME is an expired key.
SWEEP = """
local function sweep(index, expiries)
  local t = redis.call('TIME')
  local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  local gone = redis.call('ZRANGEBYSCORE', expiries, '-inf', '(' .. now, 'LIMIT', 0, 32)
  if #gone > 0 then
    redis.call('ZREM', expiries, unpack(gone))
    redis.call('ZREM', index, unpack(gone))
  end
end
sweep(KEYS[2], KEYS[3])
"""

# The replaced value, returned when the caller asked (ARGV[i] "1") and it starts with ARGV[i+1].
REPORTED = """
local function reported(record, asked, prefix)
  if asked ~= '1' then return nil end
  local value = redis.call('HGET', record, 'v')
  if value and string.sub(value, 1, #prefix) == prefix then return value end
  return nil
end
"""

# KEYS: record, index, expiries. ARGV: value, etag, expiry ms or "", if_match or "",
# "1" for if_absent, member (the key), "1" to report the replaced value, its prefix.
# Returns {'OK'} or {'OK', replaced value}, or the refusal.
SET = SWEEP + REPORTED + """
local current = redis.call('HGET', KEYS[1], 'e')
if ARGV[4] ~= '' and current ~= ARGV[4] then return 'ABORTED' end
if ARGV[5] == '1' and current then return 'ALREADY_EXISTS' end
local previous = reported(KEYS[1], ARGV[7], ARGV[8])
redis.call('HSET', KEYS[1], 'v', ARGV[1], 'e', ARGV[2])
if ARGV[3] == '' then
  redis.call('HDEL', KEYS[1], 'x')
  redis.call('PERSIST', KEYS[1])
  redis.call('ZREM', KEYS[3], ARGV[6])
else
  redis.call('HSET', KEYS[1], 'x', ARGV[3])
  redis.call('PEXPIREAT', KEYS[1], ARGV[3])
  redis.call('ZADD', KEYS[3], ARGV[3], ARGV[6])
end
redis.call('ZADD', KEYS[2], 0, ARGV[6])
return {'OK', previous}
"""

# KEYS: record, index, expiries. ARGV: if_match or "", member, "1" to report the removed value,
# its prefix. Returns {1} or {1, removed value} deleted, {0} absent, -1 ETag mismatch.
DELETE = SWEEP + REPORTED + """
local current = redis.call('HGET', KEYS[1], 'e')
if ARGV[1] ~= '' and current ~= ARGV[1] then return -1 end
redis.call('ZREM', KEYS[2], ARGV[2])
redis.call('ZREM', KEYS[3], ARGV[2])
if current then
  local previous = reported(KEYS[1], ARGV[3], ARGV[4])
  redis.call('DEL', KEYS[1])
  return {1, previous}
end
return {0}
"""

# KEYS: record, index, expiries. ARGV: member. Unindex a key whose record is gone (expired or
# evicted) — unless it was written again since the scan looked.
FORGET = """
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('ZREM', KEYS[2], ARGV[1])
  redis.call('ZREM', KEYS[3], ARGV[1])
end
return 0
"""

FIELDS = ["v", "e", "x"]


def _tag(namespace: str) -> bytes:
    ns = namespace.encode()
    return f"{len(ns)}:".encode() + ns


def record_key(namespace: str, key: str) -> bytes:
    return b"prism:kv:" + _tag(namespace) + key.encode()


def index_key(namespace: str) -> bytes:
    return b"prism:kvi:" + _tag(namespace)


def expiry_key(namespace: str) -> bytes:
    return b"prism:kvx:" + _tag(namespace)


def _record(fields: Sequence[bytes | None]) -> Record | None:
    value, etag, expiry = fields
    if etag is None:
        return None
    return Record(value or b"", etag.decode(), int(expiry) / 1000 if expiry is not None else None)


def _asking(prefix: bytes | None) -> list[bytes]:
    """The scripts' last two arguments: whether to report the replaced value, and its prefix."""
    return [b"", b""] if prefix is None else [b"1", prefix]


class RedisKeyValue(KeyValueAdapter):
    capabilities = frozenset(
        {Capability.TTL, Capability.ETAG, Capability.CREATE_ONLY, Capability.SCAN, Capability.SHARED}
    )

    def __init__(self, client: RedisClient, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.client = client  # the backend's, shared with its other patterns

    async def start(self) -> None:
        """Binds the scripts to the started client; redis-py reloads them after a restart."""
        self.redis: aioredis.Redis = self.client.redis
        self._set = self.redis.register_script(SET)
        self._delete = self.redis.register_script(DELETE)
        self._forget = self.redis.register_script(FORGET)

    async def get(self, namespace: str, key: str) -> Record | None:
        with self.client.errors():
            return _record(await self.redis.hmget(record_key(namespace, key), FIELDS))

    async def exists(self, namespace: str, key: str) -> bool:
        with self.client.errors():
            return bool(await self.redis.exists(record_key(namespace, key)))

    async def get_many(self, namespace: str, keys: Sequence[str]) -> list[Record | None]:
        if not keys:
            return []
        with self.client.errors():
            async with self.redis.pipeline(transaction=False) as pipe:
                for key in keys:
                    pipe.hmget(record_key(namespace, key), FIELDS)
                replies = await pipe.execute()
        return [_record(fields) for fields in replies]

    def _keys(self, namespace: str, key: str) -> list[bytes]:
        return [record_key(namespace, key), index_key(namespace), expiry_key(namespace)]

    async def write(self, namespace: str, key: str, write: Write) -> tuple[str, bytes | None]:
        etag = new_etag()
        expiry = b"" if write.expires_at is None else str(int(write.expires_at * 1000)).encode()
        condition = [write.if_match, b"1" if write.if_absent else b""]
        args = [write.value, etag, expiry, *condition, key.encode(), *_asking(write.previous_prefix)]
        with self.client.errors():
            outcome = await self._set(keys=self._keys(namespace, key), args=args)
        if outcome == b"ABORTED":
            raise etag_mismatch(key)
        if outcome == b"ALREADY_EXISTS":
            raise already_exists(key)
        return etag, outcome[1] if len(outcome) > 1 else None

    async def remove(
        self, namespace: str, key: str, *, if_match: str = "", previous_prefix: bytes | None = None
    ) -> tuple[bool, bytes | None]:
        args = [if_match, key.encode(), *_asking(previous_prefix)]
        with self.client.errors():
            outcome = await self._delete(keys=self._keys(namespace, key), args=args)
        if outcome == -1:
            raise etag_mismatch(key)
        return outcome[0] == 1, outcome[1] if len(outcome) > 1 else None

    async def scan(
        self, namespace: str, prefix: str, start_after: str, limit: int
    ) -> list[tuple[str, Record]]:
        low, after = prefix.encode(), start_after.encode()
        lower = b"(" + after if after and after >= low else b"[" + low
        end = prefix_end(low)
        upper = b"(" + end if end is not None else b"+"
        index = index_key(namespace)
        found: list[tuple[str, Record]] = []
        with self.client.errors():
            while len(found) < limit:
                wanted = limit - len(found)
                members: list[bytes] = await self.redis.zrangebylex(index, lower, upper, start=0, num=wanted)
                if not members:
                    break
                async with self.redis.pipeline(transaction=False) as pipe:
                    for member in members:
                        pipe.hmget(record_key(namespace, member.decode()), FIELDS)
                    replies = await pipe.execute()
                for member, fields in zip(members, replies, strict=True):
                    key = member.decode()
                    record = _record(fields)
                    if record is None:
                        await self._forget(keys=self._keys(namespace, key), args=[member])
                    else:
                        found.append((key, record))
                if len(members) < wanted:
                    break
                lower = b"(" + members[-1]
        return found
