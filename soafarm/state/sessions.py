"""Session records in Redis: ids, records, tombstones, client ids, handles, load errors, targets.

Every key of a session goes through `SessionStore`, so what "delete a session" removes and
what "an open session" means are decided in one place.

Readers never stop on a value they cannot decode (`soafarm.state.garbage`): a corrupt
record, a junk member of a set or a non-integer counter is logged once and skipped. Writers
that change a record another daemon may change too go through `update`, a compare-and-set
on the record's text, so two cooperating broker daemons never resurrect a closed session or
undo each other's changes.

Session ids never repeat in a namespace, even when Redis comes back empty: ids are handed
out from a Redis counter, and the highest id handed out is also recorded outside Redis (an
`IdMark`: RabbitMQ, next to the queues that would otherwise be mistaken for a new session's,
see `soafarm.state.idmark`), in blocks of `ID_BLOCK`. When the counter is gone, it restarts
above that mark, and ids below it that have no record are known to be lost.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import redis
import structlog

from soafarm.errors import ConfigError, DecodeError, SoafarmError
from soafarm.names import Names, check_client_id
from soafarm.state import garbage
from soafarm.state.batch import Batch, Later
from soafarm.state.clients import client_keys
from soafarm.state.records import LoadError, SessionRecord, SessionStatus, as_text

log = structlog.get_logger(__name__)

#: How long `delete` keeps a tombstone, so attaching to a closed session says "closed".
CLOSED_TOMBSTONE_SECONDS = 7 * 24 * 3600

#: Session ids are recorded in the `IdMark` this many at a time: one RabbitMQ write per
#: block; after Redis comes back empty, ids resume at most this far above the last one used.
ID_BLOCK = 100

#: Attempts of a compare-and-set before `update` gives up (each loses only to a concurrent
#: change of the same record, which is rare and short).
UPDATE_ATTEMPTS = 8


# KEYS: counter, ceiling. Returns {id, ceiling}; {-1, 0} when the counter is missing or is
# not an integer (Redis came back empty, or someone overwrote it): the caller recovers it.
_NEXT_ID = """
local c = redis.pcall('GET', KEYS[1])
if type(c) ~= 'string' or not string.match(c, '^%d+$') then return {-1, 0} end
local id = redis.call('INCR', KEYS[1])
local ceiling = redis.pcall('GET', KEYS[2])
if type(ceiling) ~= 'string' or not string.match(ceiling, '^%d+$') then ceiling = '0' end
return {id, tonumber(ceiling)}
"""

# KEYS: counter, ceiling, lost mark. ARGV: next counter value, the id mark (0: none).
# Only if the counter is (still) unusable: a concurrent recovery may have won.
_RECOVER_IDS = """
local c = redis.pcall('GET', KEYS[1])
if type(c) == 'string' and string.match(c, '^%d+$') then return 0 end
redis.call('DEL', KEYS[1], KEYS[2])
redis.call('SET', KEYS[1], ARGV[1])
if tonumber(ARGV[2]) > 0 then
  redis.call('SET', KEYS[2], ARGV[2])
  redis.call('DEL', KEYS[3])
  redis.call('SET', KEYS[3], ARGV[2])
end
return 1
"""

# KEYS: ceiling. ARGV: new ceiling. Only ever raised.
_RAISE_CEILING = """
local c = redis.pcall('GET', KEYS[1])
if type(c) == 'string' and string.match(c, '^%d+$') and tonumber(c) >= tonumber(ARGV[1]) then
  return 0
end
redis.call('DEL', KEYS[1])
redis.call('SET', KEYS[1], ARGV[1])
return 1
"""

# KEYS: record, open sessions set, generation. ARGV: the text read, the new text, the
# session id, a new generation.
_REPLACE = """
local current = redis.pcall('GET', KEYS[1])
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
redis.call('SET', KEYS[3], ARGV[4])
return 1
"""

# KEYS: open sessions set, generation. ARGV: a new generation. After a session left the set:
# a new generation, or none once no session is open (no key is left behind by sessions that
# all closed; a reader without a generation reads every record).
_RETIRE = """
if redis.call('SCARD', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
else
  redis.call('SET', KEYS[2], ARGV[1])
end
return 1
"""


# The two scripts below read a few keys of each of many sessions in one call: a round trip,
# or a pipelined command, per session and key cost the broker's leader more than the rest of
# its round with 1,000 open sessions, and so did redis-py packing thousands of arguments and
# parsing thousands of replies. So they take the session ids as one comma-separated argument,
# build each key from its parts around the id (`_around_id`: the layout stays in
# `soafarm.names`), and answer with one comma-separated string of integers. Keys built inside
# a script are fine on the one standalone Redis a farm uses (a cluster would refuse them). A
# value of the wrong type, or a client id that is not one, is flagged, never fatal: the
# caller then reads that key alone and reports it as garbage (`soafarm.state.garbage`).

# ARGV: the session ids ("1,2,3"), then the parts around the session id of its clients set's
# key, of its load-errors hash's key, and of its client hashes' keys (the client id follows).
# Returns per session: outstanding requests (sum over its client ids of accepted - done, each
# at least 0; a counter that is not a number counts as 0; -1 when the clients set has the
# wrong type), and its hosts with a load error (-1: the hash has the wrong type).
_DEMAND_FACTS = """
local out = {}
for sid in string.gmatch(ARGV[1], '%d+') do
  local total = 0
  local members = redis.pcall('SMEMBERS', ARGV[2] .. sid .. ARGV[3])
  if members['err'] then
    total = -1
  else
    for _, c in ipairs(members) do
      local v = redis.pcall('HMGET', ARGV[6] .. sid .. ARGV[7] .. c, 'accepted', 'done')
      if not v['err'] then
        local a, d = tonumber(v[1]) or 0, tonumber(v[2]) or 0
        if a > d then total = total + a - d end
      end
    end
  end
  local errors = redis.pcall('HLEN', ARGV[4] .. sid .. ARGV[5])
  if type(errors) ~= 'number' then errors = -1 end
  out[#out + 1] = string.format('%d,%d', total, errors)
end
return table.concat(out, ',')
"""

# ARGV: the session ids ("1,2,3"), the exclusive lower bound of a live handle's score per
# session ("t1,t2,t3"), then the parts around the session id of its handles set's key and of
# its clients set's key; then per session the idle cutoff of its client ids ("c1,-,c3": '-'
# when `client_idle_timeout` is 0, no limit), the time now, and the parts around the session
# id of its client hashes' keys (the client id follows). Drops older handles; returns per
# session: its live handles (-1: wrong type), its members that are client ids, and those
# that are not (-1: the clients set has the wrong type); then the client ids disconnected
# for being idle, as "sid client-id seconds" joined by commas.
#
# The idle rule (`client_idle_timeout`), for each client id with a live handle (a member
# "client:<client id>:<tag>", see `client_handle`): a client id with requests outstanding
# (accepted > done) is busy, never idle; else it is idle since the latest of its last send
# or attach (`sent_at`, its client's), its last read (`read_at`, its reader's) and its last
# request answered (`quiet_at`, the worker's: a long call ending starts the clock). Each
# time is written by whoever acted, so a sweep that comes late only disconnects late. Idle
# up to its cutoff, its handles are dropped and `idle_out` records for how long, which its
# heartbeat and its next send read. Nothing else of it is touched: its responses stay (a
# durable client id attaches again and reads them).
_ACTIVITY = """
local function split(text)
  local t = {}
  for x in string.gmatch(text, '[^,]+') do t[#t + 1] = x end
  return t
end
local cutoffs, idle_cutoffs = split(ARGV[2]), split(ARGV[7])
local now = tonumber(ARGV[8])
local out, gone = {}, {}
local i = 0
for sid in string.gmatch(ARGV[1], '%d+') do
  i = i + 1
  local handles = ARGV[3] .. sid .. ARGV[4]
  local live = -1
  if type(redis.pcall('ZREMRANGEBYSCORE', handles, '-inf', '(' .. cutoffs[i])) == 'number' then
    local limit = tonumber(idle_cutoffs[i] or '-')
    if not limit then
      live = redis.call('ZCARD', handles)
    else
      local members = redis.call('ZRANGE', handles, 0, -1)
      live = #members
      local of, order = {}, {}
      for _, m in ipairs(members) do
        local c = string.match(m, '^client:([%w_%.%-]+):')
        if c and #c <= 64 then
          if not of[c] then
            of[c] = {}
            order[#order + 1] = c
          end
          table.insert(of[c], m)
        end
      end
      for _, c in ipairs(order) do
        local key = ARGV[9] .. sid .. ARGV[10] .. c
        local v = redis.pcall('HMGET', key, 'accepted', 'done', 'sent_at', 'read_at', 'quiet_at')
        if not v['err'] and v[1] and (tonumber(v[1]) or 0) <= (tonumber(v[2]) or 0) then
          local since = math.max(tonumber(v[3]) or 0, tonumber(v[4]) or 0, tonumber(v[5]) or 0)
          if since > 0 and since <= limit then
            local idle = string.format('%.1f', now - since)
            redis.call('HSET', key, 'idle_out', idle)
            redis.call('ZREM', handles, unpack(of[c]))
            live = live - #of[c]
            gone[#gone + 1] = sid .. ' ' .. c .. ' ' .. idle
          end
        end
      end
    end
  end
  local valid, junk = 0, 0
  local members = redis.pcall('SMEMBERS', ARGV[5] .. sid .. ARGV[6])
  if members['err'] then
    junk = -1
  else
    for _, m in ipairs(members) do
      if #m >= 1 and #m <= 64 and not string.find(m, '[^%w%-_%.]') then
        valid = valid + 1
      else
        junk = junk + 1
      end
    end
  end
  out[#out + 1] = string.format('%d,%d,%d', live, valid, junk)
end
return {table.concat(out, ','), table.concat(gone, ',')}
"""

# KEYS: a session's handles set, the client id's hash. ARGV: the handle, the time (epoch
# seconds), '1' when the handle is attaching, the session's record key (an ARGV, not a
# KEYS: Redis checks a script's KEYS for write access, and a client's fenced account may
# only read the record, docs/security.md; the script only reads it). A client handle's
# beat: an attaching handle clears the client id's `idle_out` and starts its idle clock
# (`sent_at`); a later beat of a client id the broker disconnected for
# `client_idle_timeout` answers how long it was idle and leaves its handle out, so it stops
# counting. Counters missing (purged): just beats. A session deleted meanwhile (its close
# raced this beat): nothing is written.
_BEAT_CLIENT = """
if redis.call('EXISTS', ARGV[4]) == 0 then return false end
if redis.call('EXISTS', KEYS[2]) == 1 then
  if ARGV[3] == '1' then
    redis.pcall('HDEL', KEYS[2], 'idle_out')
    redis.pcall('HSET', KEYS[2], 'sent_at', ARGV[2])
  else
    local idle = redis.pcall('HGET', KEYS[2], 'idle_out')
    if type(idle) == 'string' then
      redis.call('ZREM', KEYS[1], ARGV[1])
      return idle
    end
  end
end
redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1])
return false
"""

# KEYS: the session's handles. ARGV: the handle, the time, the session's record key (read
# only: see _BEAT_CLIENT). A beat that comes after the session was deleted (its client's
# close() raced its heartbeat thread) writes nothing: the handle would outlive the
# session's other keys.
_BEAT = """
if redis.call('EXISTS', ARGV[3]) == 1 then redis.call('ZADD', KEYS[1], ARGV[2], ARGV[1]) end
return false
"""

# KEYS: the open sessions set, the sessions' generation. ARGV: the parts of a session
# record's key around the id, the generation the caller read last ('' for none). Returns
# '=' when the generation is still that one (nothing changed: the caller keeps what it
# has), else the generation (maybe '') and ':' followed by every member with its record, framed as
# "<length>:<member><length>:<record>" (binary-safe: a record is whatever bytes the key
# holds); a record's length is -1 for a member that is not a session id (no key read), -2
# for a key of the wrong type, -3 for a missing key. A sessions set of the wrong type is
# the script's error (WRONGTYPE).
_OPEN_RECORDS = """
local generation = redis.pcall('GET', KEYS[2])
if type(generation) ~= 'string' then generation = '' end
if generation ~= '' and generation == ARGV[3] then return '=' end
local members = redis.call('SMEMBERS', KEYS[1])
local out = {generation, ':'}
for _, m in ipairs(members) do
  local size, record = -1, ''
  if string.match(m, '^%d+$') then
    local r = redis.pcall('GET', ARGV[1] .. string.gsub(m, '^0+(%d)', '%1') .. ARGV[2])
    if type(r) == 'string' then
      size, record = #r, r
    elseif type(r) == 'table' and r['err'] then
      size = -2
    else
      size = -3
    end
  end
  out[#out + 1] = #m .. ':' .. m .. size .. ':' .. record
end
return table.concat(out)
"""
_NOT_AN_ID, _WRONG_TYPE = -1, -2

#: Sessions per call of the scripts above: bounds how long one call holds Redis (a few
#: microseconds per key).
SCRIPT_CHUNK = 250


class IdMark(Protocol):
    """Where the highest session id handed out is kept outside Redis (see the module doc)."""

    def read(self) -> int:
        """Every id handed out is below this (0 when nothing is recorded)."""
        ...

    def write(self, ceiling: int) -> None:
        """Record that ids below `ceiling` may be handed out (never lowers the mark)."""
        ...


def _generation_key(names: Names) -> str:
    """A token replaced by every write of a session record or of the open sessions set, so
    a reader of every record can tell that nothing changed (named here: only this store
    uses it; it starts with the namespace, so namespace deletion takes it; it goes when
    the last open session does)."""
    return f"{names.namespace}:sessions:generation"


def _new_generation() -> str:
    """A generation token: random, so one deleted and written again is never taken for an
    older one."""
    return uuid.uuid4().hex[:16]


def _id_keys(names: Names) -> tuple[str, str, str]:
    # beside the counter; named here rather than in soafarm.names because only this store
    # reads them (they still start with the namespace, so namespace deletion takes them)
    base = f"{names.namespace}:session-ids"
    return names.session_counter_key, f"{base}:ceiling", f"{base}:lost_below"


class SessionStore:
    """Typed reads and writes of the sessions of one namespace."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every session key of `names`' namespace."""
        self._r = client
        self.names = names
        self._next_id: Any = client.register_script(_NEXT_ID)
        self._recover_ids: Any = client.register_script(_RECOVER_IDS)
        self._raise_ceiling: Any = client.register_script(_RAISE_CEILING)
        self._replace: Any = client.register_script(_REPLACE)
        self._demand_facts: Any = client.register_script(_DEMAND_FACTS)
        self._activity: Any = client.register_script(_ACTIVITY)
        self._beat_client: Any = client.register_script(_BEAT_CLIENT)
        self._beat: Any = client.register_script(_BEAT)
        self._open_records: Any = client.register_script(_OPEN_RECORDS)
        self._retire: Any = client.register_script(_RETIRE)
        # session id -> (record text, its decoding): the broker reads every open session's
        # record each round, and decoding 1,000 unchanged records cost ~100 ms a round;
        # `open_sessions` keeps the open ones (a record's text is its whole value)
        self._decoded: dict[int, tuple[bytes | str, SessionRecord | None]] = {}
        # what `open_sessions` returned last, at which generation, read whole when
        self._listed: list[SessionRecord] = []
        self._generation = ""
        self._listed_at = 0.0

    def batch(self) -> Batch:
        """A batch of reads of this store's client, sent in one round trip by `run()`."""
        return Batch(self._r)

    def close(self) -> None:
        """Release the Redis client's connections (its owner is done with it)."""
        self._r.close()

    # --- ids ------------------------------------------------------------------------------
    def new_session_id(self, mark: IdMark | None = None) -> int:
        """A fresh session id, never used before in this namespace.

        With `mark` (the broker daemon's), ids are also recorded outside Redis, so a counter
        lost with Redis restarts above every id handed out. Without it (tests, tools), a lost
        counter restarts above the open sessions' ids only.
        """
        counter, ceiling_key, _lost = _id_keys(self.names)
        for _ in range(3):
            sid, ceiling = (int(x) for x in self._next_id(keys=[counter, ceiling_key]))
            if sid < 0:
                self.recover_ids(mark)
                continue
            if mark is not None and sid >= ceiling:
                top = (sid // ID_BLOCK + 1) * ID_BLOCK
                mark.write(top)  # before the id is used: a crash here only skips ids
                self._raise_ceiling(keys=[ceiling_key], args=[top])
            return sid
        raise SoafarmError(f"cannot allocate a session id in namespace {self.names.namespace!r}")

    def recover_ids(self, mark: IdMark | None) -> None:
        """Restart a missing (or garbage) id counter above every id that may have been used:
        the mark's, and the open sessions'. Ids below the mark that have no record are then
        known as lost (`lost_below`)."""
        counter, ceiling_key, lost = _id_keys(self.names)
        marked = mark.read() if mark is not None else 0
        start = max(marked, *self.open_ids(), 0)
        if self._recover_ids(keys=[counter, ceiling_key, lost], args=[start, marked]) and marked:
            log.warning(
                "session_ids_recovered",
                namespace=self.names.namespace,
                lost_below=marked,
                next_id=start + 1,
                why="the id counter was missing: Redis lost this namespace's state",
            )

    def ids_known(self) -> bool:
        """True while the id counter exists and is an integer (Redis did not lose it)."""
        raw = garbage.tolerant(self.names.session_counter_key, self._r.get, None)
        return isinstance(raw, bytes | str) and as_text(raw).isdigit()

    def lost_below(self) -> int:
        """Session ids below this that have no record were lost with Redis's data (0: none)."""
        _counter, _ceiling, lost = _id_keys(self.names)
        raw = garbage.tolerant(lost, self._r.get, None)
        return garbage.as_int(raw, lost, "lost_below")

    # --- records --------------------------------------------------------------------------
    def save(self, record: SessionRecord) -> None:
        """Create or overwrite a session record (a new session's; changes go through
        `update`)."""
        pipe = self._r.pipeline()
        pipe.set(self.names.session_key(record.id), record.to_json())
        pipe.sadd(self.names.sessions_key, record.id)
        pipe.set(_generation_key(self.names), _new_generation())
        pipe.execute()

    def get(self, session_id: int) -> SessionRecord | None:
        """The open session with this id, or None (also when its record cannot be decoded:
        that is logged once, and `load` says why)."""
        key = self.names.session_key(session_id)
        raw = garbage.tolerant(key, self._r.get, None)
        return None if raw is None else self._decode_known(session_id, key, raw)

    def _decode_known(self, session_id: int, key: str, raw: bytes | str) -> SessionRecord | None:
        """`_decode`, skipped when this text was decoded before (by `open_sessions`)."""
        known = self._decoded.get(session_id)
        if known is not None and known[0] == raw:
            return known[1]
        return _decode(key, raw)

    def load(self, session_id: int) -> SessionRecord | None:
        """The open session with this id, or None; DecodeError naming the key when its
        record is corrupt (for the broker, which says so to whoever asked)."""
        key = self.names.session_key(session_id)
        try:
            raw = self._r.get(key)
        except redis.ResponseError as e:
            if not garbage.is_wrong_type(e):
                raise
            raise DecodeError(f"corrupt session record at Redis key {key}: {e}") from None
        if raw is None:
            return None
        try:
            return SessionRecord.from_json(raw)
        except DecodeError as e:
            raise DecodeError(f"{e} (Redis key {key})") from None

    def read_load(self, batch: Batch, session_id: int) -> Later[SessionRecord | None]:
        """`load(session_id)`, read with `batch` (its value raises load's DecodeError)."""
        key = self.names.session_key(session_id)

        def parse(replies: list[Any]) -> SessionRecord | None:
            raw = replies[0]
            if isinstance(raw, redis.ResponseError) and garbage.is_wrong_type(raw):
                raise DecodeError(f"corrupt session record at Redis key {key}: {raw}")
            if isinstance(raw, Exception):
                raise raw
            if raw is None:
                return None
            known = self._decoded.get(session_id)
            if known is not None and known[0] == raw and known[1] is not None:
                return known[1]
            try:
                return SessionRecord.from_json(raw)
            except DecodeError as e:
                raise DecodeError(f"{e} (Redis key {key})") from None

        return batch.add(lambda p: p.get(key), parse)

    def update(
        self, session_id: int, change: Callable[[SessionRecord], SessionRecord | None]
    ) -> SessionRecord | None:
        """Apply `change` to the current record and store the result, unless the record
        changed meanwhile (then read it again and retry). `change` returns None to leave the
        record as it is. Returns the record as stored, or None if the session is gone (or
        its record cannot be decoded)."""
        key = self.names.session_key(session_id)
        known = self._decoded.get(session_id)
        for attempt in range(UPDATE_ATTEMPTS):
            if attempt == 0 and known is not None and known[1] is not None:
                # the text `open_sessions` read: if it changed since, the compare-and-set
                # below fails and the next attempt reads it (a round trip saved otherwise)
                raw, current = known
            else:
                raw = garbage.tolerant(key, self._r.get, None)
                current = None if raw is None else self._decode_known(session_id, key, raw)
            if raw is None or current is None:
                return None
            new = change(current)
            if new is None or new == current:
                return current
            if self._replace(
                keys=[key, self.names.sessions_key, _generation_key(self.names)],
                args=[raw, new.to_json(), session_id, _new_generation()],
            ):
                return new
        log.warning("session_update_contended", session_id=session_id)
        return None

    def exists(self, session_id: int) -> bool:
        """True while the session's record exists (it was not closed with purge)."""
        return bool(self._r.exists(self.names.session_key(session_id)))

    def read_exists(self, batch: Batch, session_id: int) -> Later[bool]:
        """`exists(session_id)`, read with `batch` (after the commands queued before it)."""
        key = self.names.session_key(session_id)
        return batch.add(lambda p: p.exists(key), lambda r: bool(garbage.reply(key, r[0], 0)))

    def was_closed(self, session_id: int) -> bool:
        """True if this session existed and was closed (within the tombstone's lifetime)."""
        return bool(self._r.exists(self.names.closed_session_key(session_id)))

    def open_ids(self, prune: bool = False) -> list[int]:
        """Ids of every open session, oldest first. A member that is not an id is skipped
        (and with `prune`, the broker leader's, removed)."""
        key = self.names.sessions_key
        members = garbage.tolerant(key, self._r.smembers, None)
        if members is None:  # not a set: nobody could create a session
            if not prune:
                return []
            members = self._rebuild_open_ids()
        ids: list[int] = []
        junk: list[Any] = []
        for member in members:
            text = as_text(member)
            if text.isdigit() and text.isascii():
                ids.append(int(text))
            else:
                garbage.report(key, f"member {text!r} is not a session id", member)
                junk.append(member)
        if prune and junk:
            self._r.srem(key, *junk)
        return sorted(ids)

    def _rebuild_open_ids(self) -> set[bytes]:
        """Replace a sessions set of the wrong type with the ids of the session records
        found by a scan (the broker leader's repair; logged)."""
        prefix = f"{self.names.namespace}:session:"
        ids = set()
        for k in self._r.scan_iter(match=f"{prefix}*", count=1000):
            rest = as_text(k)[len(prefix) :]
            if rest.isdigit() and rest.isascii():
                ids.add(rest.encode())
        pipe = self._r.pipeline(transaction=True)
        pipe.delete(self.names.sessions_key, _generation_key(self.names))
        if ids:
            pipe.sadd(self.names.sessions_key, *ids)
        pipe.execute()
        log.warning("sessions_set_rebuilt", key=self.names.sessions_key, sessions=len(ids))
        return ids

    def open_sessions(self, max_age: float = 0.0) -> list[SessionRecord]:
        """Every open session whose record can be decoded, oldest first.

        One script call returns the sessions set's members with their records, framed in one
        string (two big replies, the set and an MGET, cost the broker's round ~15 ms of
        reply parsing per 1,000 sessions); a record unchanged since the last call is not
        decoded again. Junk members and records of the wrong type are reported as
        `open_ids` and `get` report them.

        With `max_age` (the broker leader's rounds), the records of the previous call are
        returned again while the sessions' generation, which every write of this store
        replaces, is the same and they were read at most `max_age` seconds ago: one short
        reply instead of every record. Only a change made by hand (redis-cli) goes unseen,
        for `max_age` at most.
        """
        key = self.names.sessions_key
        fresh = max_age > 0 and time.monotonic() - self._listed_at <= max_age
        known = self._generation if fresh else ""
        try:
            reply = self._open_records(
                keys=[key, _generation_key(self.names)],
                args=[*_around_id(self.names.session_key), known],
            )
        except redis.ResponseError as e:
            if not garbage.is_wrong_type(e):
                raise
            garbage.report(key, "holds the wrong type of value", str(e))
            self._forget_listing()
            return []
        blob = reply if isinstance(reply, bytes) else str(reply).encode()
        if blob == b"=":
            return list(self._listed)
        generation, _, frames = blob.partition(b":")
        found: list[tuple[int, bytes | None]] = []
        for member, size, raw in _frames(frames):
            text = as_text(member)
            if size == _NOT_AN_ID:
                garbage.report(key, f"member {text!r} is not a session id", member)
                continue
            sid = int(text)
            if size == _WRONG_TYPE:
                garbage.report(self.names.session_key(sid), "holds the wrong type of value")
            found.append((sid, raw if size >= 0 else None))
        found.sort(key=lambda f: f[0])
        decoded: dict[int, tuple[bytes | str, SessionRecord | None]] = {}
        out = []
        for sid, text_or_none in found:
            if text_or_none is None:
                continue
            record = self._decode_known(sid, self.names.session_key(sid), text_or_none)
            decoded[sid] = (text_or_none, record)
            if record is not None:
                out.append(record)
        self._decoded = decoded
        self._listed, self._generation = out, as_text(generation)
        if not fresh or not self._generation:
            self._listed_at = time.monotonic()
        return list(out)

    def _forget_listing(self) -> None:
        self._decoded, self._listed, self._generation = {}, [], ""

    def delete(
        self,
        session_id: int,
        record: SessionRecord | None = None,
        known: Sequence[str] | None = None,
    ) -> list[str]:
        """Drop every key of the session and leave a tombstone saying it was closed; returns
        the client ids it had (read in the same transaction, so a client id attached
        meanwhile is either returned here or finds the session gone).

        `record` and `known` (its client ids) save reading them again when the caller has
        just read them (one round trip instead of two); without them they are read here.
        """
        n = self.names
        if record is None:
            record = self.get(session_id)
        if known is None:
            known = self.clients(session_id)
        data_keys = list(record.data.values()) if record else []
        known = list(known)
        clients = [k for c in known for k in client_keys(n, session_id, c)]
        pipe = self._r.pipeline(transaction=True)
        pipe.smembers(n.session_clients_key(session_id))
        pipe.srem(n.sessions_key, session_id)
        pipe.hdel(n.targets_key, session_id)
        pipe.hdel(n.statuses_key, session_id)
        pipe.delete(
            n.session_key(session_id),
            n.session_clients_key(session_id),
            n.session_instances_key(session_id),
            n.session_usage_key(session_id),
            n.session_load_errors_key(session_id),
            n.session_handles_key(session_id),
            *clients,
            *data_keys,
        )
        pipe.set(n.closed_session_key(session_id), "1", ex=CLOSED_TOMBSTONE_SECONDS)
        self._retire(
            keys=[n.sessions_key, _generation_key(n)], args=[_new_generation()], client=pipe
        )
        # the other commands cannot fail on a value (HDEL of a garbage targets key aside,
        # which the next allocation round rewrites)
        replies = pipe.execute(raise_on_error=False)
        members = garbage.reply(n.session_clients_key(session_id), replies[0], set())
        late = sorted(
            c for c in (as_text(m) for m in members) if c not in known and _client_id_ok(c)
        )
        if late:  # attached between the read above and the transaction
            self._r.delete(*(k for c in late for k in client_keys(n, session_id, c)))
        return sorted({*known, *late})

    # --- client ids -----------------------------------------------------------------------
    def add_client(self, session_id: int, client_id: str) -> None:
        """Remember a client id so its response queue is deleted with the session."""
        self._r.sadd(self.names.session_clients_key(session_id), client_id)

    def add_client_in(self, batch: Batch, session_id: int, client_id: str) -> Later[None]:
        """`add_client`, sent with `batch` (idempotent, so safe outside a transaction); the
        returned value raises what the command raised."""
        key = self.names.session_clients_key(session_id)

        def check(replies: list[Any]) -> None:
            if isinstance(replies[0], Exception):
                raise replies[0]

        return batch.add(lambda p: p.sadd(key, client_id), check)

    def clients(self, session_id: int) -> list[str]:
        """Client ids that have a response queue in this session (junk members skipped)."""
        key = self.names.session_clients_key(session_id)
        return _client_ids(key, garbage.tolerant(key, self._r.smembers, set()))

    def read_clients(self, batch: Batch, session_id: int) -> Later[list[str]]:
        """`clients(session_id)`, read with `batch`."""
        key = self.names.session_clients_key(session_id)
        return batch.add(
            lambda p: p.smembers(key),
            lambda r: _client_ids(key, garbage.reply(key, r[0], set())),
        )

    def forget_client(self, session_id: int, client_id: str) -> None:
        """Drop a purged client id's keys."""
        pipe = self._r.pipeline()
        pipe.srem(self.names.session_clients_key(session_id), client_id)
        pipe.delete(*client_keys(self.names, session_id, client_id))
        pipe.execute()

    def outstanding(self, session_ids: Iterable[int]) -> dict[int, int]:
        """Requests accepted and not answered yet, per session (over all its client ids);
        a counter that is not an integer counts as 0 (logged once). Two round trips for all
        the sessions: their client ids, then their counters (`demand_facts` does it in one
        script call)."""
        session_ids = list(session_ids)
        batch = self.batch()
        listed = [self.read_clients(batch, sid) for sid in session_ids]
        batch.run()
        clients = [read.value for read in listed]
        pipe = self._r.pipeline(transaction=False)
        for sid, ids in zip(session_ids, clients, strict=True):
            for cid in ids:
                pipe.hmget(self.names.client_key(sid, cid), "accepted", "done")
        counts = iter(pipe.execute(raise_on_error=False))
        out: dict[int, int] = {}
        for sid, ids in zip(session_ids, clients, strict=True):
            total = 0
            for cid in ids:
                key = self.names.client_key(sid, cid)
                accepted, done = garbage.reply(key, next(counts), (None, None))
                accepted_n = garbage.as_int(accepted, key, "accepted")
                total += max(accepted_n - garbage.as_int(done, key, "done"), 0)
            out[sid] = total
        return out

    def demand_facts(self, session_ids: Iterable[int]) -> dict[int, tuple[int, dict[str, str]]]:
        """(outstanding requests, load errors by host) of each session: what the allocator
        needs besides the records, in one script call per SCRIPT_CHUNK sessions (plus a read
        of each session that has load errors, and of any key holding garbage, which is
        reported as `clients` and `load_errors` report it)."""
        session_ids = list(session_ids)
        n = self.names
        parts = [
            *_around_id(n.session_clients_key),
            *_around_id(n.session_load_errors_key),
            *_around_id(lambda sid: _client_key_prefix(n, sid)),
        ]
        out: dict[int, tuple[int, dict[str, str]]] = {}
        for i in range(0, len(session_ids), SCRIPT_CHUNK):
            chunk = session_ids[i : i + SCRIPT_CHUNK]
            facts = _integers(self._demand_facts(args=[_joined(chunk), *parts]), 2 * len(chunk))
            batch = self.batch()
            errors: dict[int, Later[dict[str, str]]] = {}
            garbage_clients: dict[int, Later[list[str]]] = {}
            for j, sid in enumerate(chunk):
                if facts[2 * j] < 0:  # read alone: reported as garbage there
                    garbage_clients[sid] = self.read_clients(batch, sid)
                if facts[2 * j + 1] != 0:
                    errors[sid] = self.read_load_errors(batch, sid)
            batch.run()
            for j, sid in enumerate(chunk):
                if sid in garbage_clients:
                    garbage_clients[sid].value  # noqa: B018 - reports the wrong type
                out[sid] = (max(facts[2 * j], 0), errors[sid].value if sid in errors else {})
        return out

    def activity(self, cutoffs: Mapping[int, float]) -> dict[int, tuple[int, bool]]:
        """(client handles that beat after the session's cutoff time, whether it has a client
        id) of each session in `cutoffs`; older handles are dropped. What
        `connected_handles` and `clients` say, in one script call per SCRIPT_CHUNK sessions
        (plus a read of any key holding garbage, which is reported as they report it)."""
        return self.sweep_activity(cutoffs, {}, time.time())[0]

    def sweep_activity(
        self, cutoffs: Mapping[int, float], idle_cutoffs: Mapping[int, float], now: float
    ) -> tuple[dict[int, tuple[int, bool]], list[IdleClient]]:
        """`activity(cutoffs)`, and in the same script calls the idle rule of
        `client_idle_timeout` (see `_ACTIVITY`): in each session of `idle_cutoffs`, a client
        id with nothing outstanding whose last send, last read and last outstanding request
        are all at or before its cutoff time is disconnected (its handles dropped, the
        reason kept for it). Returns the activity with the counts of handles left, and the
        client ids disconnected now."""
        session_ids = list(cutoffs)
        n = self.names
        parts = [*_around_id(n.session_handles_key), *_around_id(n.session_clients_key)]
        clients = _around_id(lambda sid: _client_key_prefix(n, sid))
        out: dict[int, tuple[int, bool]] = {}
        gone: list[IdleClient] = []
        for i in range(0, len(session_ids), SCRIPT_CHUNK):
            chunk = session_ids[i : i + SCRIPT_CHUNK]
            times = ",".join(repr(float(cutoffs[sid])) for sid in chunk)
            idle = ",".join(
                repr(float(idle_cutoffs[sid])) if sid in idle_cutoffs else "-" for sid in chunk
            )
            reply = self._activity(
                args=[_joined(chunk), times, *parts, idle, repr(float(now)), *clients]
            )
            counts, disconnected = (reply[0], reply[1]) if isinstance(reply, list) else (reply, "")
            rows = _integers(counts, 3 * len(chunk))
            for j, sid in enumerate(chunk):
                live, valid, junk = rows[3 * j : 3 * j + 3]
                if live < 0:
                    garbage.report(n.session_handles_key(sid), "holds the wrong type of value")
                has_clients = valid > 0
                if junk:  # the set holds garbage: read it alone, which reports it
                    has_clients = bool(self.clients(sid))
                out[sid] = (max(live, 0), has_clients)
            gone += _idle_clients(disconnected)
        return out, gone

    # --- client handles (heartbeats) ------------------------------------------------------
    def beat(self, session_id: int, handle: str, at: float | None = None) -> None:
        """Record that client handle `handle` is alive (now, or at `at`)."""
        when = time.time() if at is None else at
        self._beat(
            keys=[self.names.session_handles_key(session_id)],
            args=[handle, when, self.names.session_key(session_id)],
        )

    def beat_client(
        self,
        session_id: int,
        handle: str,
        client_id: str,
        attaching: bool = False,
        at: float | None = None,
    ) -> float | None:
        """A client handle's beat (now, or at `at`; see `_BEAT_CLIENT`): None while its
        client id is connected; else how long the client id was idle when the broker
        disconnected it for `client_idle_timeout` (the handle is left out). `attaching` (its
        first beat) clears a previous disconnection and starts the client id's idle
        clock."""
        idle = self._beat_client(
            keys=[
                self.names.session_handles_key(session_id),
                self.names.client_key(session_id, client_id),
            ],
            args=[
                handle,
                time.time() if at is None else at,
                "1" if attaching else "0",
                self.names.session_key(session_id),
            ],
        )
        if idle is None:
            return None
        try:
            return float(as_text(idle))
        except ValueError:
            return 0.0

    def drop_handle(self, session_id: int, handle: str) -> None:
        """Forget a client handle that closed."""
        self._r.zrem(self.names.session_handles_key(session_id), handle)

    def connected_handles(self, session_id: int, since: float) -> int:
        """Client handles that beat after `since`; older ones are dropped."""
        batch = self.batch()
        count = self.read_connected(batch, session_id, since)
        batch.run()
        return count.value

    def read_connected(self, batch: Batch, session_id: int, since: float) -> Later[int]:
        """`connected_handles(session_id, since)`, with `batch` (the drop of older handles
        too: it is idempotent)."""
        key = self.names.session_handles_key(session_id)

        def count(replies: list[Any]) -> int:
            dropped, left = (garbage.reply(key, r, None) for r in replies)
            return 0 if dropped is None or left is None else int(left)

        return batch.add(
            lambda p: (p.zremrangebyscore(key, "-inf", f"({since}"), p.zcard(key)), count
        )

    # --- load errors and targets ----------------------------------------------------------
    def record_load_error(self, session_id: int, host_id: str, why: str) -> None:
        """Say why the service could not be loaded on `host_id`, now (the allocator excludes
        it for the session's `end_point_not_found_retry_period`, then tries it again).

        Failures closer together than half that period are one try: the instances a host
        starts side by side fail together."""
        key = self.names.session_load_errors_key(session_id)
        # only this host writes its field: a read, then a write, cannot lose a count
        before = garbage.tolerant(key, lambda k: self._r.hget(k, host_id), None)
        now = time.time()
        tries = 1
        if before is not None:
            last = LoadError.parse(before)
            record = self.get(session_id)
            period = record.broker_settings.end_point_not_found_retry_period if record else 0.0
            tries = last.tries + 1 if now - last.at >= period / 2 else last.tries
        self._r.hset(key, host_id, LoadError(why, now, tries).to_json())

    def load_errors(self, session_id: int) -> dict[str, str]:
        """Why the service failed to load, per host (empty when it loaded everywhere)."""
        key = self.names.session_load_errors_key(session_id)
        raw = garbage.tolerant(key, self._r.hgetall, {})
        return {as_text(k): LoadError.parse(v).why for k, v in raw.items()}

    def read_load_errors(self, batch: Batch, session_id: int) -> Later[dict[str, str]]:
        """Each host's stored load error (`LoadError.parse` reads one), read with `batch`."""
        key = self.names.session_load_errors_key(session_id)
        return batch.add(
            lambda p: p.hgetall(key),
            lambda r: {as_text(k): as_text(v) for k, v in garbage.reply(key, r[0], {}).items()},
        )

    def read_target(self, batch: Batch, session_id: int) -> Later[int]:
        """Units the allocator last gave one session (0 if none, or not an integer), read
        with `batch`: one field, not the whole hash of every session's."""
        key = self.names.targets_key

        def units(replies: list[Any]) -> int:
            raw = garbage.reply(key, replies[0], None)
            if raw is None:
                return 0
            try:
                return int(as_text(raw))
            except ValueError:
                garbage.report(key, f"field {session_id!r} is not session id -> units", raw)
                return 0

        return batch.add(lambda p: p.hget(key, str(session_id)), units)

    def targets(self) -> dict[int, int]:
        """Units the allocator last gave each session (fields that are not integers are
        skipped; the next allocation round rewrites the hash)."""
        key = self.names.targets_key
        return _targets(key, garbage.tolerant(key, self._r.hgetall, {}))

    def read_targets(self, batch: Batch) -> Later[dict[int, int]]:
        """`targets()`, read with `batch`."""
        key = self.names.targets_key
        return batch.add(
            lambda p: p.hgetall(key), lambda r: _targets(key, garbage.reply(key, r[0], {}))
        )

    def set_targets(self, targets: dict[int, int]) -> None:
        """Record the allocator's units per session (replacing the previous round's)."""
        pipe = self._r.pipeline()
        pipe.delete(self.names.targets_key)
        if targets:
            pipe.hset(self.names.targets_key, mapping={str(k): v for k, v in targets.items()})
        pipe.execute()

    # --- statuses (the allocator's decisions and reasons) ----------------------------------
    def read_statuses(self, batch: Batch) -> Later[dict[int, SessionStatus]]:
        """Every session's last SessionStatus, read with `batch` (garbage fields skipped:
        the leader writes them again)."""
        key = self.names.statuses_key
        return batch.add(
            lambda p: p.hgetall(key), lambda r: _statuses(key, garbage.reply(key, r[0], {}))
        )

    def read_status(self, batch: Batch, session_id: int) -> Later[SessionStatus | None]:
        """One session's SessionStatus (None before its first allocation round)."""
        key = self.names.statuses_key

        def parse(replies: list[Any]) -> SessionStatus | None:
            raw = garbage.reply(key, replies[0], None)
            return None if raw is None else _statuses(key, {str(session_id): raw}).get(session_id)

        return batch.add(lambda p: p.hget(key, str(session_id)), parse)

    def set_statuses(self, changed: Mapping[int, SessionStatus], gone: Iterable[int]) -> None:
        """Write the statuses that changed and drop those of sessions no longer open."""
        key = self.names.statuses_key
        pipe = self._r.pipeline(transaction=False)
        if changed:
            pipe.hset(key, mapping={str(k): v.to_json() for k, v in changed.items()})
        fields = [str(g) for g in gone]
        if fields:
            pipe.hdel(key, *fields)
        pipe.execute()

    # --- helpers --------------------------------------------------------------------------


def _statuses(key: str, raw: Mapping[Any, Any]) -> dict[int, SessionStatus]:
    out: dict[int, SessionStatus] = {}
    for field_, value in raw.items():
        try:
            out[int(as_text(field_))] = SessionStatus.from_json(value)
        except (ValueError, DecodeError):
            garbage.report(key, f"field {as_text(field_)!r} is not session id -> status", value)
    return out


@dataclass(frozen=True)
class IdleClient:
    """A client id the life-cycle sweep disconnected for `client_idle_timeout`."""

    session_id: int
    client_id: str
    idle_for: float


def client_handle(client_id: str, tag: str) -> str:
    """The handle of one `BrokerClient` of `client_id` (`tag` tells its handles apart): the
    sweep finds a handle's client id in it to apply `client_idle_timeout`."""
    return f"client:{check_client_id(client_id)}:{tag}"


def _idle_clients(text: Any) -> list[IdleClient]:
    """The client ids `_ACTIVITY` disconnected ("sid client-id seconds,...")."""
    out = []
    for item in as_text(text).split(",") if text else []:
        sid, client_id, idle = item.split(" ")
        out.append(IdleClient(int(sid), client_id, float(idle)))
    return out


def _decode(key: str, raw: bytes | str) -> SessionRecord | None:
    try:
        return SessionRecord.from_json(raw)
    except DecodeError as e:
        garbage.report(key, str(e), raw)
        return None


def _targets(key: str, raw: dict[Any, Any]) -> dict[int, int]:
    """Session id -> units of the targets hash (fields that are not integers reported)."""
    out: dict[int, int] = {}
    for k, v in raw.items():
        try:
            out[int(as_text(k))] = int(as_text(v))
        except ValueError:
            garbage.report(key, f"field {as_text(k)!r} is not session id -> units", v)
    return out


def _client_key_prefix(names: Names, session_id: int) -> str:
    """The part of a client hash's key before the client id (`Names.client_key` builds it)."""
    return names.client_key(session_id, "x")[:-1]


#: A session id no namespace uses, to find where a key builder puts the id.
_MARK_ID = 987_654_321_012


def _around_id(key_of: Callable[[int], str]) -> tuple[str, str]:
    """(head, tail) of the keys `key_of` builds: key_of(sid) == head + str(sid) + tail (the
    scripts build keys so, and the layout stays in `soafarm.names`)."""
    head, _, tail = key_of(_MARK_ID).rpartition(str(_MARK_ID))
    return head, tail


def _frames(reply: Any) -> Iterator[tuple[bytes, int, bytes]]:
    """(member, record length or a negative code, record) of `_OPEN_RECORDS`'s reply."""
    blob = reply if isinstance(reply, bytes) else str(reply).encode()
    pos, end = 0, len(blob)
    while pos < end:
        colon = blob.index(b":", pos)
        stop = colon + 1 + int(blob[pos:colon])
        member = blob[colon + 1 : stop]
        colon = blob.index(b":", stop)
        size = int(blob[stop:colon])
        pos = colon + 1 + max(size, 0)
        yield member, size, blob[colon + 1 : pos]


def _joined(session_ids: Iterable[int]) -> str:
    """Session ids as one script argument."""
    return ",".join(str(int(sid)) for sid in session_ids)


def _integers(reply: Any, count: int) -> list[int]:
    """A script's comma-separated integers (exactly `count` of them)."""
    text = as_text(reply) if reply else ""
    values = [int(x) for x in text.split(",")] if text else []
    if len(values) != count:
        raise SoafarmError(f"a Redis script answered {len(values)} values, not {count}")
    return values


def _client_ids(key: str, members: Iterable[Any]) -> list[str]:
    """The client ids among a session's clients set's members (junk reported, skipped)."""
    out = []
    for member in members:
        text = as_text(member)
        if _client_id_ok(text):
            out.append(text)
        else:
            garbage.report(key, f"member {text!r} is not a client id", member)
    return sorted(out)


def _client_id_ok(text: str) -> bool:
    try:
        check_client_id(text)
    except ConfigError:
        return False
    return True
