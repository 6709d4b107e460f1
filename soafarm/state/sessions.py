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
from collections.abc import Callable, Iterable
from typing import Any, Protocol

import redis
import structlog

from soafarm.errors import ConfigError, DecodeError, SoafarmError
from soafarm.names import Names, check_client_id
from soafarm.state import garbage
from soafarm.state.clients import client_keys
from soafarm.state.records import SessionRecord, as_text

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

# KEYS: record, open sessions set. ARGV: the text read, the new text, the session id.
_REPLACE = """
local current = redis.pcall('GET', KEYS[1])
if current ~= ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
redis.call('SADD', KEYS[2], ARGV[3])
return 1
"""


class IdMark(Protocol):
    """Where the highest session id handed out is kept outside Redis (see the module doc)."""

    def read(self) -> int:
        """Every id handed out is below this (0 when nothing is recorded)."""
        ...

    def write(self, ceiling: int) -> None:
        """Record that ids below `ceiling` may be handed out (never lowers the mark)."""
        ...


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
        pipe.execute()

    def get(self, session_id: int) -> SessionRecord | None:
        """The open session with this id, or None (also when its record cannot be decoded:
        that is logged once, and `load` says why)."""
        key = self.names.session_key(session_id)
        raw = garbage.tolerant(key, self._r.get, None)
        return None if raw is None else _decode(key, raw)

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

    def update(
        self, session_id: int, change: Callable[[SessionRecord], SessionRecord | None]
    ) -> SessionRecord | None:
        """Apply `change` to the current record and store the result, unless the record
        changed meanwhile (then read it again and retry). `change` returns None to leave the
        record as it is. Returns the record as stored, or None if the session is gone (or
        its record cannot be decoded)."""
        key = self.names.session_key(session_id)
        for _ in range(UPDATE_ATTEMPTS):
            raw = garbage.tolerant(key, self._r.get, None)
            current = None if raw is None else _decode(key, raw)
            if raw is None or current is None:
                return None
            new = change(current)
            if new is None or new == current:
                return current
            if self._replace(
                keys=[key, self.names.sessions_key], args=[raw, new.to_json(), session_id]
            ):
                return new
        log.warning("session_update_contended", session_id=session_id)
        return None

    def exists(self, session_id: int) -> bool:
        """True while the session's record exists (it was not closed with purge)."""
        return bool(self._r.exists(self.names.session_key(session_id)))

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
        pipe.delete(self.names.sessions_key)
        if ids:
            pipe.sadd(self.names.sessions_key, *ids)
        pipe.execute()
        log.warning("sessions_set_rebuilt", key=self.names.sessions_key, sessions=len(ids))
        return ids

    def open_sessions(self) -> list[SessionRecord]:
        """Every open session whose record can be decoded, oldest first."""
        ids = self.open_ids()
        if not ids:
            return []
        pipe = self._r.pipeline()
        for i in ids:
            pipe.get(self.names.session_key(i))
        out = []
        for sid, reply in zip(ids, pipe.execute(raise_on_error=False), strict=True):
            key = self.names.session_key(sid)
            raw = garbage.reply(key, reply, None)
            record = None if raw is None else _decode(key, raw)
            if record is not None:
                out.append(record)
        return out

    def delete(self, session_id: int) -> list[str]:
        """Drop every key of the session and leave a tombstone saying it was closed; returns
        the client ids it had (read in the same transaction, so a client id attached
        meanwhile is either returned here or finds the session gone)."""
        n = self.names
        record = self.get(session_id)
        data_keys = list(record.data.values()) if record else []
        known = self.clients(session_id)
        clients = [k for c in known for k in client_keys(n, session_id, c)]
        pipe = self._r.pipeline(transaction=True)
        pipe.smembers(n.session_clients_key(session_id))
        pipe.srem(n.sessions_key, session_id)
        pipe.hdel(n.targets_key, session_id)
        pipe.delete(
            n.session_key(session_id),
            n.session_clients_key(session_id),
            n.session_instances_key(session_id),
            n.session_load_errors_key(session_id),
            n.session_handles_key(session_id),
            *clients,
            *data_keys,
        )
        pipe.set(n.closed_session_key(session_id), "1", ex=CLOSED_TOMBSTONE_SECONDS)
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

    def clients(self, session_id: int) -> list[str]:
        """Client ids that have a response queue in this session (junk members skipped)."""
        key = self.names.session_clients_key(session_id)
        members = garbage.tolerant(key, self._r.smembers, set())
        out = []
        for member in members:
            text = as_text(member)
            if _client_id_ok(text):
                out.append(text)
            else:
                garbage.report(key, f"member {text!r} is not a client id", member)
        return sorted(out)

    def forget_client(self, session_id: int, client_id: str) -> None:
        """Drop a purged client id's keys."""
        pipe = self._r.pipeline()
        pipe.srem(self.names.session_clients_key(session_id), client_id)
        pipe.delete(*client_keys(self.names, session_id, client_id))
        pipe.execute()

    def outstanding(self, session_ids: Iterable[int]) -> dict[int, int]:
        """Requests accepted and not answered yet, per session (over all its client ids);
        a counter that is not an integer counts as 0 (logged once)."""
        session_ids = list(session_ids)
        clients = [self.clients(sid) for sid in session_ids]
        pipe = self._r.pipeline()
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

    # --- client handles (heartbeats) ------------------------------------------------------
    def beat(self, session_id: int, handle: str, at: float | None = None) -> None:
        """Record that client handle `handle` is alive (now, or at `at`)."""
        when = time.time() if at is None else at
        self._r.zadd(self.names.session_handles_key(session_id), {handle: when})

    def drop_handle(self, session_id: int, handle: str) -> None:
        """Forget a client handle that closed."""
        self._r.zrem(self.names.session_handles_key(session_id), handle)

    def connected_handles(self, session_id: int, since: float) -> int:
        """Client handles that beat after `since`; older ones are dropped."""
        key = self.names.session_handles_key(session_id)

        def count(k: str) -> int:
            pipe = self._r.pipeline()
            pipe.zremrangebyscore(k, "-inf", f"({since}")
            pipe.zcard(k)
            return int(pipe.execute()[1])

        return int(garbage.tolerant(key, count, 0))

    # --- load errors and targets ----------------------------------------------------------
    def record_load_error(self, session_id: int, host_id: str, why: str) -> None:
        """Say why the service could not be loaded on `host_id` (the allocator excludes it)."""
        self._r.hset(self.names.session_load_errors_key(session_id), host_id, why)

    def load_errors(self, session_id: int) -> dict[str, str]:
        """Why the service failed to load, per host (empty when it loaded everywhere)."""
        key = self.names.session_load_errors_key(session_id)
        raw = garbage.tolerant(key, self._r.hgetall, {})
        return {as_text(k): as_text(v) for k, v in raw.items()}

    def targets(self) -> dict[int, int]:
        """Units the allocator last gave each session (fields that are not integers are
        skipped; the next allocation round rewrites the hash)."""
        key = self.names.targets_key
        raw = garbage.tolerant(key, self._r.hgetall, {})
        out: dict[int, int] = {}
        for k, v in raw.items():
            try:
                out[int(as_text(k))] = int(as_text(v))
            except ValueError:
                garbage.report(key, f"field {as_text(k)!r} is not session id -> units", v)
        return out

    def set_targets(self, targets: dict[int, int]) -> None:
        """Record the allocator's units per session (replacing the previous round's)."""
        pipe = self._r.pipeline()
        pipe.delete(self.names.targets_key)
        if targets:
            pipe.hset(self.names.targets_key, mapping={str(k): v for k, v in targets.items()})
        pipe.execute()

    # --- helpers --------------------------------------------------------------------------


def _decode(key: str, raw: bytes | str) -> SessionRecord | None:
    try:
        return SessionRecord.from_json(raw)
    except DecodeError as e:
        garbage.report(key, str(e), raw)
        return None


def _client_id_ok(text: str) -> bool:
    try:
        check_client_id(text)
    except ConfigError:
        return False
    return True
