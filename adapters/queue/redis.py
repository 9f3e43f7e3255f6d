"""Redis Queue on Redis Streams: a stream per topic partition, a Redis consumer group per Prism
group and partition, and every change made by one Lua script (atomic, on the server).

Layout for namespace ``N`` and topic ``T`` (``N`` length-prefixed as in KeyValue; topic names
have no ``:``)::

    prism:q:<len N>:<N><T>          HASH    partitions; per partition p: n<p> next offset,
                                            m<p>/u<p> last publish time (ms, ns within it); rr;
                                            keyless (until a message with a key is published)
    prism:q:<len N>:<N><T>:<p>      STREAM  partition p; entry id <publish ms>-<offset>,
                                            fields k key, h headers (JSON), u ns within the ms, p payload
    prism:q:<len N>:<N><T>:tokens   HASH    idempotency token → fingerprint, partition, entry id
    prism:q:<len N>:<N><T>:wake     (Pub/Sub channel, not a key) "something changed on T"

An entry's id carries both its offset (the sequence part) and its publish time (the millisecond
part; a seek by time reads from there), so the message id ``<partition>-<entry id>`` is
acknowledged with no lookup. Offsets are dense per partition; offset → id is a binary search
over the millisecond part (commit and seek only).

How the contract maps onto a consumer group (``XGROUP CREATE ... MKSTREAM``) of a partition:

- **position**: the group's first pending entry (``XPENDING``), else the one after its
  last-delivered-id. Acknowledging (``XACK``) the head therefore moves it; lag is high − position.
- **lease**: a pending entry owned by the consumer. Its deadline is kept in the entry's idle time:
  a delivery with ack deadline D sets idle to ``LEASE_MS − D`` (``XCLAIM ... IDLE``), so every
  lease runs out when its idle time reaches ``LEASE_MS``, whatever deadline each consumer chose.
  A negative acknowledgement or a closing consumer hands the entry to the ``prism.free`` owner
  with idle ``LEASE_MS``: deliverable at once.
- **delivery_attempt**: the pending entry's delivery count, set explicitly (``RETRYCOUNT``).
- **order per key**: a claim reads the group's pending entries (the first ``LOOKAHEAD``) before
  new ones (``XREADGROUP ... >``, inside the script): an entry is not delivered while an earlier
  one with its key is leased or waiting; a new entry behind its key is kept pending, owned by
  ``prism.free`` with count 0. This is why redeliveries are chosen by ``XPENDING IDLE`` and
  ``XCLAIM`` rather than ``XAUTOCLAIM``, which would hand out a key's later messages too. On a
  topic that never had a key (``keyless``) a live lease holds nothing back, so a claim reads
  only the pending entries whose lease ran out.
- **dead letters**: an expired entry with max_delivery_attempts deliveries is appended to the
  dead-letter topic (with the ``prism-dead-letter-*`` headers) and acknowledged, in the claim.
- **commit** forward acknowledges the pending entries below the offset and moves the
  last-delivered-id up to it (``XGROUP SETID``). **Seek**, and a commit backward, recreate the
  group at the offset (``XGROUP DESTROY`` + ``CREATE``): its leases and acknowledgements from
  there are forgotten and everything is delivered again, with attempts from 1.

State lives in Redis only, so any gateway process may acknowledge, commit or seek.

Waiting: consumers never poll. ``XREADGROUP BLOCK`` is not what wakes them, as it would lease
entries past the key-order rule and wakes only for new entries, not for an acknowledgement that
frees a key or in-flight room. Every script that changes what a group may receive (publish,
acknowledge, commit, seek, a consumer leaving) publishes on the topic's ``wake`` channel, and
each adapter holds one dedicated Pub/Sub connection (never one of the shared pool's) that wakes
its consumers of that topic; they then claim. A consumer holding or waiting behind a lease also
wakes when that lease runs out. After the Pub/Sub connection drops, every consumer is woken
(notifications may have been lost).

Not DURABLE: what Redis keeps across its own restart depends on its persistence settings (the
servers here keep nothing on disk). SHARED: every gateway process sees the same topics. Keys
are built inside the scripts from the topic's key, so this adapter assumes one Redis server,
not a cluster.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import grpc
import redis.asyncio as aioredis
from redis import exceptions as rex
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from adapters.capabilities import Capability
from adapters.queue.base import (
    DEAD_LETTER_HEADERS,
    DEAD_LETTERED,
    INT64_MAX,
    AtOffset,
    AtTime,
    ConsumeOptions,
    Consumer,
    Delivery,
    Entry,
    Leased,
    LeasingConsumer,
    PartitionInfo,
    Published,
    QueueAdapter,
    SeekTarget,
    Start,
    no_partition,
    offset_out_of_range,
    token_reused,
    unknown_topic,
)
from prism.errors import PrismError

if TYPE_CHECKING:  # the backend module imports this one to declare its adapters
    from adapters.backends.redis import RedisClient

log = logging.getLogger(__name__)

LEASE_MS = 3_600_000  # the longest ack deadline (the service's maximum): a lease's idle span
LOOKAHEAD = 512  # pending entries a claim looks at per partition (bounds one claim's work)
FREE = "prism.free"  # owner of pending entries no consumer holds
WAKE_SLACK = 0.002  # seconds past a lease's end before looking again (idle times are in ms)


def _lua(text: str) -> str:
    return json.dumps(text)  # an ASCII JSON string is a valid Lua string literal


CONSTANTS = f"""
local FREE = {_lua(FREE)}
local LEASE = {LEASE_MS}
local LOOKAHEAD = {LOOKAHEAD}
local DEAD = {{{", ".join(map(_lua, DEAD_LETTER_HEADERS))}}}
"""

PRELUDE = CONSTANTS + """
local function n2s(x) return string.format('%.0f', x) end
local function ms_of(id) return tonumber(string.match(id, '^(%d+)')) end
local function offset_of(id) return tonumber(string.match(id, '(%d+)$')) end
local function field(fields, name)
  for i = 1, #fields, 2 do if fields[i] == name then return fields[i + 1] end end
  return nil
end
local function stream(tk, p) return tk .. ':' .. p end
local function wake(tk) redis.call('PUBLISH', tk .. ':wake', '') end

local function partitions_of(tk)
  local n = redis.call('HGET', tk, 'partitions')
  return n and tonumber(n)
end
-- A new topic is marked keyless until its first message with a key: a claim on a keyless
-- topic need not read the entries leased to others (only keys make them hold anything back).
-- A topic without the mark (made before it existed) is treated as keyed.
local function ensure_topic(tk, default)
  local n = partitions_of(tk)
  if n then return n end
  redis.call('HSET', tk, 'partitions', default, 'keyless', '1')
  return default
end
local function high_of(tk, p) return tonumber(redis.call('HGET', tk, 'n' .. p) or '0') end
local function low_of(s, high)
  local first = redis.call('XRANGE', s, '-', '+', 'COUNT', 1)[1]
  if first then return offset_of(first[1]) end
  return high
end

-- Appends messages to the partitions their keys map to (SHA-1 of the key); the messages of one
-- call without a key all go to one partition, the next in round robin for each call. Publish
-- times strictly increase within a partition, and so do entry ids <ms>-<offset>. Each
-- partition's counters are read once and written back by done().
local function appender(tk, partitions, now_ms, now_sub)
  local state, keyless, keyed = {}, nil, false
  local self = {}
  function self.add(key, headers, payload)
    local p
    if key ~= '' then
      p = tonumber(string.sub(redis.sha1hex(key), 1, 8), 16) % partitions
      keyed = true
    else
      if not keyless then keyless = (redis.call('HINCRBY', tk, 'rr', 1) - 1) % partitions end
      p = keyless
    end
    local st = state[p]
    if not st then
      local last = redis.call('HMGET', tk, 'n' .. p, 'm' .. p, 'u' .. p)
      st = {tonumber(last[1] or '0'), tonumber(last[2] or '0'), tonumber(last[3] or '-1')}
      state[p] = st
    end
    local offset, ms, sub = st[1], st[2], st[3]
    if now_ms > ms or (now_ms == ms and now_sub > sub) then ms, sub = now_ms, now_sub
    elseif sub < 999999 then sub = sub + 1
    else ms, sub = ms + 1, 0 end
    local id = n2s(ms) .. '-' .. n2s(offset)
    redis.call('XADD', stream(tk, p), id, 'k', key, 'h', headers, 'u', n2s(sub), 'p', payload)
    st[1], st[2], st[3] = offset + 1, ms, sub
    return {p, id}
  end
  function self.done()
    for p, st in pairs(state) do
      redis.call('HSET', tk, 'n' .. p, n2s(st[1]), 'm' .. p, n2s(st[2]), 'u' .. p, n2s(st[3]))
    end
    if keyed then redis.call('HDEL', tk, 'keyless') end
  end
  return self
end

local function group_info(s, g)
  local groups = redis.pcall('XINFO', 'GROUPS', s)
  if groups.err then return nil end
  for _, flat in ipairs(groups) do
    local info = {}
    for i = 1, #flat, 2 do info[flat[i]] = flat[i + 1] end
    if info['name'] == g then return info end
  end
  return nil
end

-- The group's position: its first pending entry, else the entry after the last it read.
local function position(s, g, low)
  local info = group_info(s, g)
  if not info then return nil end
  if info['pending'] > 0 then return offset_of(redis.call('XPENDING', s, g, '-', '+', 1)[1][1]) end
  local last = info['last-delivered-id']
  if last == '0-0' then return low end
  return math.max(low, offset_of(last) + 1)
end

-- The id of the entry at offset o (low <= o < high): the largest ms whose first entry is at or
-- before it.
local function id_of(s, o)
  local lo = ms_of(redis.call('XRANGE', s, '-', '+', 'COUNT', 1)[1][1])
  local hi = ms_of(redis.call('XREVRANGE', s, '+', '-', 'COUNT', 1)[1][1])
  while lo < hi do
    local mid = math.floor((lo + hi + 1) / 2)
    if offset_of(redis.call('XRANGE', s, n2s(mid), '+', 'COUNT', 1)[1][1]) <= o then lo = mid else hi = mid - 1 end
  end
  return n2s(lo) .. '-' .. n2s(o)
end

-- The group starts over at offset o: no leases, no acknowledgements from there.
local function reset(s, g, o, low)
  local before = '0-0'
  if o > low then before = id_of(s, o - 1) end
  redis.call('XGROUP', 'DESTROY', s, g)
  redis.call('XGROUP', 'CREATE', s, g, before, 'MKSTREAM', 'ENTRIESREAD', o)
end

-- The partition of a commit or seek, or the refusal.
local function existing(tk, p)
  local partitions = partitions_of(tk)
  if not partitions then return nil, {'UNKNOWN_TOPIC'} end
  if p >= partitions then return nil, {'NO_PARTITION', partitions} end
  return stream(tk, p), nil
end
"""

# KEYS: topic, its tokens. ARGV: default partitions, now ms, ns within it, then per entry:
# key, headers, payload, token or "", fingerprint or "". Per entry: {partition, entry id} or 0
# (the token was taken by another entry).
PUBLISH = PRELUDE + """
local tk, tokens = KEYS[1], KEYS[2]
local partitions = ensure_topic(tk, tonumber(ARGV[1]))
local now_ms, now_sub = tonumber(ARGV[2]), tonumber(ARGV[3])
local out = {}
local log = appender(tk, partitions, now_ms, now_sub)
for i = 4, #ARGV, 5 do
  local key, headers, payload, token, fp = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3], ARGV[i + 4]
  local stored = token ~= '' and redis.call('HGET', tokens, token)
  if stored then
    local sfp, p, id = string.match(stored, '^(%x+) (%d+) (%S+)$')
    if sfp == fp then out[#out + 1] = {tonumber(p), id} else out[#out + 1] = 0 end
  else
    local r = log.add(key, headers, payload)
    if token ~= '' then redis.call('HSET', tokens, token, fp .. ' ' .. r[1] .. ' ' .. r[2]) end
    out[#out + 1] = r
  end
end
log.done()
wake(tk)
return out
"""

# KEYS: topic. ARGV: group, default partitions, start ("0" earliest, "$" latest). A group that
# has a position on a partition keeps it.
JOIN = PRELUDE + """
local tk, g = KEYS[1], ARGV[1]
local partitions = ensure_topic(tk, tonumber(ARGV[2]))
for p = 0, partitions - 1 do
  local made = redis.pcall('XGROUP', 'CREATE', stream(tk, p), g, ARGV[3], 'MKSTREAM')
  if type(made) == 'table' and made.err and not string.find(made.err, 'BUSYGROUP', 1, true) then return made end
end
return partitions
"""

# KEYS: topic [, dead-letter topic]. ARGV: group, consumer, ack deadline ms, max in flight,
# first partition, max delivery attempts, dead-letter topic name, topic name, now ms, ns
# within it, default partitions. Returns {deliveries, ms until a lease that matters runs out or
# -1 (the consumer's own leases are not read: it times them itself), dead-lettered}; a delivery
# is {partition, entry id, fields, attempt}.
CLAIM = PRELUDE + """
local tk, dtk = KEYS[1], KEYS[2]
local g, c, deadline = ARGV[1], ARGV[2], tonumber(ARGV[3])
local first, max_attempts = tonumber(ARGV[5]), tonumber(ARGV[6])
local dead_topic, topic = ARGV[7], ARGV[8]
local now_ms, now_sub, default = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local partitions = partitions_of(tk) or 0
local keyless = redis.call('HEXISTS', tk, 'keyless') == 1
local out, wake_in = {}, -1
local function soon(ms) if wake_in < 0 or ms < wake_in then wake_in = ms end end

-- This consumer's run-out leases go to the free owner; the rest are its live ones. Only the
-- run-out entries are read (XPENDING IDLE), the live ones counted from the summary: reading
-- every lease cost more than the claim itself. When the first live one runs out, the
-- consumer knows itself (each of its leases ends its ack deadline after the claim).
local live = 0
for p = 0, partitions - 1 do
  local s = stream(tk, p)
  local summary = redis.pcall('XPENDING', s, g)
  if not summary.err and summary[1] > 0 then
    local held = 0
    for _, owner in ipairs(summary[4]) do
      if owner[1] == c then held = tonumber(owner[2]) end
    end
    if held > 0 then
      local due = redis.call('XPENDING', s, g, 'IDLE', LEASE, '-', '+', LOOKAHEAD, c)
      for _, e in ipairs(due) do redis.call('XCLAIM', s, g, FREE, 0, e[1], 'IDLE', LEASE, 'JUSTID') end
      live = live + held - #due
    end
  end
end
local room = tonumber(ARGV[4]) - live
local dead = 0

local function dead_letter(s, p, entry, count)
  local fields = entry[2]
  local headers = cjson.decode(field(fields, 'h'))
  local values = {
    'not acknowledged after ' .. n2s(count) .. ' deliveries (max_delivery_attempts ' .. n2s(max_attempts) .. ')',
    topic, g, p .. '-' .. entry[1], tostring(p), n2s(offset_of(entry[1])), n2s(count),
  }
  for i, name in ipairs(DEAD) do headers[name] = values[i] end
  local copy = appender(dtk, ensure_topic(dtk, default), now_ms, now_sub)
  copy.add(field(fields, 'k'), cjson.encode(headers), field(fields, 'p'))
  copy.done()
  wake(dtk)
  redis.call('XACK', s, g, entry[1])
  dead = dead + 1
end

local function lease(s, p, entry, attempt)
  redis.call('XCLAIM', s, g, c, 0, entry[1], 'IDLE', LEASE - deadline, 'RETRYCOUNT', attempt, 'JUSTID')
  out[#out + 1] = {p, entry[1], entry[2], attempt}
  room = room - 1
end

for i = 0, partitions - 1 do
  if room <= 0 then break end
  local p = (first + i) % partitions
  local s = stream(tk, p)
  -- Without keys a live lease holds nothing back: only run-out entries are read.
  local pending
  if keyless then
    pending = redis.pcall('XPENDING', s, g, 'IDLE', LEASE, '-', '+', LOOKAHEAD)
  else
    pending = redis.pcall('XPENDING', s, g, '-', '+', LOOKAHEAD)
  end
  if not pending.err then
    local window = LOOKAHEAD - #pending
    local waiting = {}  -- keys with an earlier entry leased or waiting
    -- One pending entry: false once nothing more can be delivered from this partition.
    local function visit(e, entry)
      if not entry then
        redis.call('XACK', s, g, e[1])  -- removed from the stream: nothing left to deliver
        return true
      end
      local key, idle, count = field(entry[2], 'k'), e[3], e[4]
      if idle < LEASE then
        soon(LEASE - idle)
        if key ~= '' then waiting[key] = true end
      elseif key == '' or not waiting[key] then
        if max_attempts > 0 and dtk and count >= max_attempts then
          dead_letter(s, p, entry, count)  -- done for the group: the key's next may follow
        elseif room > 0 then
          if key ~= '' then waiting[key] = true end
          lease(s, p, entry, count + 1)
        else
          return false
        end
      end
      return true
    end
    -- Pending entries with consecutive offsets are read from the stream by one XRANGE.
    local i, going = 1, true
    while going and i <= #pending do
      local j = i
      while j < #pending and j - i < 63 and offset_of(pending[j + 1][1]) == offset_of(pending[j][1]) + 1 do j = j + 1 end
      local found = {}
      for _, entry in ipairs(redis.call('XRANGE', s, pending[i][1], pending[j][1])) do found[entry[1]] = entry end
      for k = i, j do
        going = visit(pending[k], found[pending[k][1]])
        if not going then break end
      end
      i = j + 1
    end
    -- New entries: XREADGROUP made them pending with this consumer, delivered once; one
    -- XCLAIM then sets every lease's idle time (its deadline).
    local fresh = {'XCLAIM', s, g, c, 0}
    while room > 0 and window > 0 do
      local want = math.min(room, window)
      local read = redis.call('XREADGROUP', 'GROUP', g, c, 'COUNT', want, 'STREAMS', s, '>')
      if not read then break end
      local entries = read[1][2]
      for _, entry in ipairs(entries) do
        local key = field(entry[2], 'k')
        window = window - 1
        if key ~= '' and waiting[key] then
          redis.call('XCLAIM', s, g, FREE, 0, entry[1], 'IDLE', LEASE, 'RETRYCOUNT', 0, 'JUSTID')
        else
          if key ~= '' then waiting[key] = true end
          out[#out + 1] = {p, entry[1], entry[2], 1}
          fresh[#fresh + 1] = entry[1]
          room = room - 1
        end
      end
      if #entries < want then break end
    end
    if #fresh > 5 then
      for _, word in ipairs({'IDLE', LEASE - deadline, 'RETRYCOUNT', 1, 'JUSTID'}) do fresh[#fresh + 1] = word end
      redis.call(unpack(fresh))
    end
  end
end
-- Room left over: nothing more is deliverable now, so look again when the group's first
-- lease runs out (on a keyed topic the loop above saw every lease it looked at).
if keyless and room > 0 then
  for p = 0, partitions - 1 do
    local leased = redis.pcall('XPENDING', stream(tk, p), g, '-', '+', LOOKAHEAD)
    if not leased.err then
      for _, e in ipairs(leased) do soon(math.max(LEASE - e[3], 0)) end
    end
  end
end
return {out, wake_in, dead}
"""

# KEYS: topic. ARGV: group, "ack" or "nack", then per partition: the partition, how many ids,
# and its entry ids in ascending order. How many were delivered (count > 0) and not yet
# acknowledged. Per partition, XPENDING over the ids' range finds them (in pages, as other
# entries may lie between), and one XACK or XCLAIM settles them all.
SETTLE = PRELUDE + """
local tk, g, ack = KEYS[1], ARGV[1], ARGV[2] == 'ack'
local partitions = partitions_of(tk) or 0
local PAGE = 1000
local settled = 0
local i = 3
while i <= #ARGV do
  local p, n = tonumber(ARGV[i]), tonumber(ARGV[i + 1])
  local first, last = ARGV[i + 2], ARGV[i + 1 + n]
  if p < partitions then
    local s = stream(tk, p)
    local wanted = {}
    for k = i + 2, i + 1 + n do wanted[ARGV[k]] = true end
    local from = first
    while true do
      local found = redis.pcall('XPENDING', s, g, from, last, PAGE)
      if found.err then break end
      -- At most a page of ids per command (Lua unpacks a few thousand values at most).
      local command = ack and {'XACK', s, g} or {'XCLAIM', s, g, FREE, 0}
      local base = #command
      for _, e in ipairs(found) do
        if wanted[e[1]] and e[4] > 0 then command[#command + 1] = e[1] end
      end
      local count = #command - base
      if count > 0 then
        if not ack then
          for _, word in ipairs({'IDLE', LEASE, 'JUSTID'}) do command[#command + 1] = word end
        end
        redis.call(unpack(command))
        settled = settled + count
      end
      if #found < PAGE then break end
      from = '(' .. found[#found][1]
    end
  end
  i = i + 2 + n
end
if settled > 0 then wake(tk) end
return settled
"""

# KEYS: topic. ARGV: group, consumer, then "<partition> <entry id>" of the entries it leased but
# never handed out (those deliveries do not count). Its leases end now; it leaves the group.
RELEASE = PRELUDE + """
local tk, g, c = KEYS[1], ARGV[1], ARGV[2]
local unsent = {}
for i = 3, #ARGV do unsent[ARGV[i]] = true end
for p = 0, (partitions_of(tk) or 0) - 1 do
  local s = stream(tk, p)
  local consumers = redis.pcall('XINFO', 'CONSUMERS', s, g)
  if not consumers.err then
    while true do
      local mine = redis.call('XPENDING', s, g, '-', '+', 1000, c)
      if #mine == 0 then break end
      for _, e in ipairs(mine) do
        local count = e[4]
        if unsent[p .. ' ' .. e[1]] then count = math.max(count - 1, 0) end
        redis.call('XCLAIM', s, g, FREE, 0, e[1], 'IDLE', LEASE, 'RETRYCOUNT', count, 'JUSTID')
      end
    end
    redis.call('XGROUP', 'DELCONSUMER', s, g, c)
    -- Consumers that vanished without leaving (a crashed process), once they hold nothing.
    for _, flat in ipairs(consumers) do
      local info = {}
      for i = 1, #flat, 2 do info[flat[i]] = flat[i + 1] end
      if info['name'] ~= c and info['pending'] == 0 and info['idle'] > LEASE then
        redis.call('XGROUP', 'DELCONSUMER', s, g, info['name'])
      end
    end
  end
end
wake(tk)
return 0
"""

# KEYS: topic. ARGV: group, partition, offset.
COMMIT = PRELUDE + """
local tk, g, o = KEYS[1], ARGV[1], tonumber(ARGV[3])
local s, refusal = existing(tk, tonumber(ARGV[2]))
if not s then return refusal end
local high = high_of(tk, tonumber(ARGV[2]))
local low = low_of(s, high)
if o < low or o > high then return {'OUT_OF_RANGE', low, high} end
local at = position(s, g, low)
if not at or o < at then
  reset(s, g, o, low)
elseif o > at then
  local bound = '+'
  if o < high then bound = '(' .. id_of(s, o) end
  while true do
    local below = redis.call('XPENDING', s, g, '-', bound, 1000)
    if #below == 0 then break end
    local ids = {}
    for i, e in ipairs(below) do ids[i] = e[1] end
    redis.call('XACK', s, g, unpack(ids))
  end
  local last = group_info(s, g)['last-delivered-id']
  if last == '0-0' or offset_of(last) + 1 < o then
    redis.call('XGROUP', 'SETID', s, g, id_of(s, o - 1), 'ENTRIESREAD', o)
  end
end
wake(tk)
return {'OK', o}
"""

# KEYS: topic. ARGV: group, partition, target ("offset", "time", "earliest", "latest",
# "committed"), offset or time ms, time ns within the ms.
SEEK = PRELUDE + """
local tk, g, p, target = KEYS[1], ARGV[1], tonumber(ARGV[2]), ARGV[3]
local s, refusal = existing(tk, p)
if not s then return refusal end
local high = high_of(tk, p)
local low = low_of(s, high)
local o
if target == 'offset' then
  o = tonumber(ARGV[4])
  if o < low or o > high then return {'OUT_OF_RANGE', low, high} end
elseif target == 'time' then
  -- the first entry published at or after the time: from its millisecond on, by the ns field
  local t_ms, t_sub = tonumber(ARGV[4]), tonumber(ARGV[5])
  local start = n2s(math.max(t_ms, 0))
  o = high
  while o == high do
    local batch = redis.call('XRANGE', s, start, '+', 'COUNT', 64)
    if #batch == 0 then break end
    for _, e in ipairs(batch) do
      if ms_of(e[1]) > t_ms or tonumber(field(e[2], 'u')) >= t_sub then o = offset_of(e[1]) break end
      start = '(' .. e[1]
    end
  end
elseif target == 'earliest' then o = low
elseif target == 'latest' then o = high
else o = position(s, g, low) or high end
reset(s, g, o, low)
wake(tk)
return {'OK', o}
"""

# KEYS: topic. ARGV: group or "". Per partition {low, high, position or -1}.
TOPIC_INFO = PRELUDE + """
local tk, g = KEYS[1], ARGV[1]
local partitions = partitions_of(tk)
if not partitions then return {'UNKNOWN_TOPIC'} end
local out = {}
for p = 0, partitions - 1 do
  local s = stream(tk, p)
  local high = high_of(tk, p)
  local low = low_of(s, high)
  local at = -1
  if g ~= '' then at = position(s, g, low) or -1 end
  out[#out + 1] = {low, high, at}
end
return {'OK', out}
"""


def _tag(namespace: str) -> bytes:
    ns = namespace.encode()
    return f"{len(ns)}:".encode() + ns


def namespace_prefix(namespace: str) -> bytes:
    """Every key of the namespace's topics starts with this (purging tests use it)."""
    return b"prism:q:" + _tag(namespace)


def topic_key(namespace: str, topic: str) -> bytes:
    return namespace_prefix(namespace) + topic.encode()


def _message_id(partition: int, entry_id: bytes | str) -> str:
    return f"{partition}-{entry_id.decode() if isinstance(entry_id, bytes) else entry_id}"


def _parse_message_id(text: str) -> tuple[int, str] | None:
    """(partition, entry id) of a message id ``<partition>-<ms>-<offset>``; None otherwise."""
    parts = text.split("-")
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        return None
    partition, ms, offset = map(int, parts)
    if partition > 2**31 or max(ms, offset) > INT64_MAX:
        return None
    return partition, f"{ms}-{offset}"


def _id_order(entry_id: str) -> tuple[int, int]:
    """How a stream orders entry ids ``<ms>-<offset>``."""
    ms, _, offset = entry_id.partition("-")
    return int(ms), int(offset)


def _published(partition: int, entry_id: bytes) -> Published:
    return Published(_message_id(partition, entry_id), partition, int(entry_id.rsplit(b"-", 1)[1]))


_ENTRY_FIELDS = [b"k", b"h", b"u", b"p"]  # as PUBLISH writes an entry's fields


def _delivery(topic: str, partition: int, entry_id: bytes, flat: list[bytes], attempt: int) -> Delivery:
    if flat[::2] == _ENTRY_FIELDS:  # every entry PUBLISH wrote: no dict a message
        key, headers, sub, payload = flat[1::2]
    else:
        fields = dict(zip(flat[::2], flat[1::2], strict=True))
        key, headers, sub, payload = (fields[name] for name in _ENTRY_FIELDS)
    text = entry_id.decode()
    ms, _, offset = text.partition("-")
    return Delivery(
        _message_id(partition, text),
        topic,
        partition,
        int(offset),
        payload,
        key.decode(),
        json.loads(headers) if headers != b"{}" else {},
        attempt,
        int(ms) * 1_000_000 + int(sub),
    )


def _refusal(reply: list[Any], topic: str, partition: int, offset: int = 0) -> PrismError | None:
    match reply[0]:
        case b"UNKNOWN_TOPIC":
            return unknown_topic(topic)
        case b"NO_PARTITION":
            return no_partition(topic, partition, reply[1])
        case b"OUT_OF_RANGE":
            return offset_out_of_range(partition, offset, reply[1], reply[2])
    return None


class Wakeups:
    """One Pub/Sub connection of an adapter, opened on first use, on which its consumers wait
    for their topics' ``wake`` channels. A consumer joins before its first claim and only once
    the server confirmed the subscription, so no change after that claim goes unnoticed."""

    def __init__(self, client: RedisClient) -> None:
        self.client = client
        self._redis: aioredis.Redis | None = None
        self._pubsub: Any = None
        self._listener: asyncio.Task[None] | None = None
        self._members: dict[bytes, set[RedisConsumer]] = {}
        self._active: set[bytes] = set()  # channels the server confirmed
        self._confirming: dict[bytes, asyncio.Future[None]] = {}

    async def join(self, channel: bytes, consumer: RedisConsumer) -> None:
        self._members.setdefault(channel, set()).add(consumer)
        if channel in self._active:
            return
        confirmed = self._confirming.get(channel)
        if confirmed is None:
            confirmed = self._confirming[channel] = asyncio.get_running_loop().create_future()
            try:
                with self.client.errors():
                    if self._pubsub is None:
                        settings = self.client.settings
                        self._redis = aioredis.Redis.from_url(
                            settings.url,
                            socket_connect_timeout=settings.connect_timeout,
                            socket_timeout=settings.command_timeout,
                            socket_keepalive=True,
                            client_name="prism-queue-wakeups",
                            retry=Retry(NoBackoff(), 0),
                        )
                        self._pubsub = self._redis.pubsub()
                    await self._pubsub.subscribe(channel)
            except BaseException:
                self._confirming.pop(channel, None)
                self._members.get(channel, set()).discard(consumer)
                raise
            if self._listener is None:
                self._listener = asyncio.create_task(self._listen(), name="redis-queue-wakeups")
        try:
            async with asyncio.timeout(self.client.settings.command_timeout):
                await asyncio.shield(confirmed)
        except TimeoutError:
            self._confirming.pop(channel, None)
            self._members.get(channel, set()).discard(consumer)
            raise PrismError(grpc.StatusCode.UNAVAILABLE, f"{self.client.what} unavailable: no subscription") from None

    async def leave(self, channel: bytes, consumer: RedisConsumer) -> None:
        members = self._members.get(channel)
        if members is None:
            return
        members.discard(consumer)
        if members or channel in self._confirming:
            return
        del self._members[channel]
        self._active.discard(channel)
        try:
            await self._pubsub.unsubscribe(channel)
        except (rex.RedisError, OSError) as exc:  # gone with the connection anyway
            log.warning("redis queue: cannot unsubscribe from %r: %r", channel, exc)

    def _wake(self, channel: bytes | None = None) -> None:
        groups = self._members.values() if channel is None else [self._members.get(channel, set())]
        for members in groups:
            for consumer in members:
                consumer.wake()

    async def _listen(self) -> None:
        backoff = 0.05
        while True:
            try:
                message = await self._pubsub.get_message(timeout=None)
            except (rex.RedisError, OSError) as exc:
                # Notifications may have been lost: every consumer looks again (and reports
                # the outage). Reading again reconnects and subscribes to every channel again.
                log.warning("redis queue: wake-up connection lost: %r", exc)
                self._active.clear()
                self._wake()
                with contextlib.suppress(rex.RedisError, OSError):
                    await self._pubsub.connection.disconnect()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 1.0)
                continue
            backoff = 0.05
            if not message:
                continue
            kind, channel = message["type"], message["channel"]
            if kind == "subscribe":
                if channel in self._members:
                    self._active.add(channel)
                elif channel not in self._confirming:  # its last consumer left meanwhile
                    with contextlib.suppress(rex.RedisError, OSError):
                        await self._pubsub.unsubscribe(channel)
                if (confirmed := self._confirming.pop(channel, None)) is not None and not confirmed.done():
                    confirmed.set_result(None)
                self._wake(channel)  # after a reconnection: what changed meanwhile
            elif kind == "message":
                self._wake(channel)

    async def close(self) -> None:
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
            self._listener = None
        for confirmed in self._confirming.values():
            confirmed.cancel()
        self._confirming.clear()
        if self._pubsub is not None:
            with contextlib.suppress(rex.RedisError, OSError):
                await self._pubsub.aclose()
        if self._redis is not None:
            with contextlib.suppress(rex.RedisError, OSError):
                await self._redis.aclose(close_connection_pool=True)
        self._pubsub = self._redis = None


class RedisQueue(QueueAdapter):
    capabilities = frozenset(
        {
            Capability.SHARED,
            Capability.SEEK_TIMESTAMP,
            Capability.DEAD_LETTER,
            Capability.IDEMPOTENT_PUBLISH,
        }
    )

    def __init__(self, client: RedisClient, *, partitions: int = 4) -> None:
        self.client = client  # the backend's, shared with its other patterns
        self.partitions = partitions  # of each topic this adapter creates
        self._consumers: set[RedisConsumer] = set()
        self.wakeups = Wakeups(client)

    async def start(self) -> None:
        """Binds the scripts to the started client; redis-py reloads them after a restart."""
        self.redis: aioredis.Redis = self.client.redis
        self._publish = self.redis.register_script(PUBLISH)
        self._join = self.redis.register_script(JOIN)
        self._claim = self.redis.register_script(CLAIM)
        self._settle = self.redis.register_script(SETTLE)
        self._release = self.redis.register_script(RELEASE)
        self._commit = self.redis.register_script(COMMIT)
        self._seek = self.redis.register_script(SEEK)
        self._topic_info = self.redis.register_script(TOPIC_INFO)

    async def close(self) -> None:
        outcomes = await asyncio.gather(*(c.close() for c in list(self._consumers)), return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.warning("redis queue: a consumer did not leave its group cleanly: %r", outcome)
        await self.wakeups.close()

    async def publish(self, namespace: str, topic: str, entries: Sequence[Entry]) -> list[Published | PrismError]:
        if not entries:
            return []
        key = topic_key(namespace, topic)
        now_ms, now_sub = divmod(time.time_ns(), 1_000_000)
        args: list[Any] = [self.partitions, now_ms, now_sub]
        for entry in entries:
            headers = json.dumps(dict(entry.headers), ensure_ascii=False, separators=(",", ":"))
            fingerprint = entry.fingerprint().hex() if entry.idempotency_token else ""
            args += [entry.partition_key.encode(), headers.encode(), entry.payload, entry.idempotency_token.encode(), fingerprint]
        with self.client.errors():
            replies = await self._publish(keys=[key, key + b":tokens"], args=args)
        return [token_reused() if reply == 0 else _published(reply[0], reply[1]) for reply in replies]

    async def consume(self, namespace: str, topic: str, options: ConsumeOptions) -> Consumer:
        start = "0" if options.start is Start.EARLIEST else "$"
        key = topic_key(namespace, topic)
        consumer = RedisConsumer(self, namespace, topic, options)
        self._consumers.add(consumer)
        try:
            await self.wakeups.join(consumer.channel, consumer)
            with self.client.errors():
                await self._join(keys=[key], args=[options.group, self.partitions, start])
        except BaseException:
            self._consumers.discard(consumer)
            await self.wakeups.leave(consumer.channel, consumer)
            raise
        return consumer

    async def _settle_ids(self, namespace: str, topic: str, group: str, message_ids: Sequence[str], mode: str) -> int:
        by_partition: dict[int, set[str]] = {}
        for parsed in map(_parse_message_id, message_ids):
            if parsed is not None:
                by_partition.setdefault(parsed[0], set()).add(parsed[1])
        if not by_partition:
            return 0
        args: list[Any] = [group, mode]
        for partition, ids in sorted(by_partition.items()):
            args += [partition, len(ids), *sorted(ids, key=_id_order)]
        with self.client.errors():
            return int(await self._settle(keys=[topic_key(namespace, topic)], args=args))

    async def acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        return await self._settle_ids(namespace, topic, group, message_ids, "ack")

    async def negative_acknowledge(self, namespace: str, topic: str, group: str, message_ids: Sequence[str]) -> int:
        return await self._settle_ids(namespace, topic, group, message_ids, "nack")

    async def commit(self, namespace: str, topic: str, group: str, partition: int, offset: int) -> None:
        with self.client.errors():
            reply = await self._commit(keys=[topic_key(namespace, topic)], args=[group, partition, offset])
        if (refusal := _refusal(reply, topic, partition, offset)) is not None:
            raise refusal

    async def seek(self, namespace: str, topic: str, group: str, partition: int, target: SeekTarget) -> int:
        if isinstance(target, AtOffset):
            args: list[Any] = ["offset", min(target.offset, INT64_MAX), 0]
        elif isinstance(target, AtTime):
            args = ["time", *divmod(target.unix_ns, 1_000_000)]
        else:
            args = [target.value, 0, 0]
        with self.client.errors():
            reply = await self._seek(keys=[topic_key(namespace, topic)], args=[group, partition, *args])
        if (refusal := _refusal(reply, topic, partition, args[1])) is not None:
            raise refusal
        return int(reply[1])

    async def topic_info(self, namespace: str, topic: str, group: str = "") -> list[PartitionInfo]:
        with self.client.errors():
            reply = await self._topic_info(keys=[topic_key(namespace, topic)], args=[group])
        if (refusal := _refusal(reply, topic, 0)) is not None:
            raise refusal
        found = []
        for partition, (low, high, position) in enumerate(reply[1]):
            if position < 0:
                found.append(PartitionInfo(partition, low, high, -1, high - low if group else 0))
            else:
                found.append(PartitionInfo(partition, low, high, position, high - position))
        return found


class RedisConsumer(LeasingConsumer):
    def __init__(self, queue: RedisQueue, namespace: str, topic: str, options: ConsumeOptions) -> None:
        super().__init__(options)
        self.queue, self.namespace, self.topic = queue, namespace, topic
        self.key = topic_key(namespace, topic)
        self.channel = self.key + b":wake"
        self._dead_key = topic_key(namespace, options.dead_letter_topic) if options.dead_letter_topic else None
        self._deadline_ms = min(max(round(options.ack_deadline * 1000), 1), LEASE_MS)
        self._ends: deque[float] = deque()  # when this consumer's claims' leases end (monotonic)

    async def _claim(self) -> float | None:
        if self._closed:
            return None
        options = self.options
        keys = [self.key] if self._dead_key is None else [self.key, self._dead_key]
        now_ms, now_sub = divmod(time.time_ns(), 1_000_000)
        args = [
            options.group, self.id, self._deadline_ms, options.max_in_flight, next(self._turn),
            options.max_delivery_attempts, options.dead_letter_topic, self.topic, now_ms, now_sub,
            self.queue.partitions,
        ]
        started = time.monotonic()
        with self.queue.client.errors():
            taken, wake_in, dead = await self.queue._claim(keys=keys, args=args)
        if dead:
            DEAD_LETTERED.labels(self.namespace).inc(dead)
        deadline = self._deadline_ms / 1000
        lease_end = started + deadline  # at the earliest: the script set the leases after this
        for partition, entry_id, fields, attempt in taken:
            self._buffer.append(Leased(_delivery(self.topic, partition, entry_id, fields, attempt), lease_end, entry_id))
        return self._next_look(started, bool(taken), deadline, None if wake_in < 0 else wake_in / 1000)

    def _next_look(self, started: float, leased: bool, deadline: float, script: float | None) -> float | None:
        """Seconds until the next claim without a wake-up: the script's answer (a lease of the
        group it saw), or when this consumer's first live lease runs out, which the script no
        longer reads. Those ends are kept per claim (``_ends``); one within 1/64 of the deadline
        of the last one replaces it, so they stay few and a lease is looked at that much late
        at most."""
        now = time.monotonic()
        ends = self._ends
        if leased:
            end = now + deadline  # Redis set the leases before now: they end by then
            if ends and end - ends[-1] < deadline / 64:
                ends[-1] = end
            else:
                ends.append(end)
        while ends and ends[0] <= started:  # ended before the script ran: it saw them run out
            ends.popleft()
        waits = [w for w in (script, ends[0] - now if ends else None) if w is not None]
        return min(waits) + WAKE_SLACK if waits else None

    async def _release(self, unsent: list[Leased]) -> None:
        # Redis releases what this consumer holds in the group's pending list, and the unsent
        # entries named here.
        names = [f"{leased.delivery.partition} {leased.ref.decode()}" for leased in unsent]  # type: ignore[union-attr]
        with self.queue.client.errors():
            await self.queue._release(keys=[self.key], args=[self.options.group, self.id, *names])

    async def _leave(self) -> None:
        self.queue._consumers.discard(self)
        await self.queue.wakeups.leave(self.channel, self)
