"""Session records in Redis: ids, records, tombstones, client ids, handles, load errors, targets.

Every key of a session goes through `SessionStore`, so what "delete a session" removes and
what "an open session" means are decided in one place.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import redis

from soafarm.names import Names
from soafarm.state.clients import client_keys
from soafarm.state.records import SessionRecord, as_text

#: How long `delete` keeps a tombstone, so attaching to a closed session says "closed".
CLOSED_TOMBSTONE_SECONDS = 7 * 24 * 3600


class SessionStore:
    """Typed reads and writes of the sessions of one namespace."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every session key of `names`' namespace."""
        self._r = client
        self.names = names

    def close(self) -> None:
        """Release the Redis client's connections (its owner is done with it)."""
        self._r.close()

    # --- records --------------------------------------------------------------------------
    def new_session_id(self) -> int:
        """A fresh session id, unique in this namespace."""
        return int(self._r.incr(self.names.session_counter_key))

    def save(self, record: SessionRecord) -> None:
        """Create or update a session record."""
        pipe = self._r.pipeline()
        pipe.set(self.names.session_key(record.id), record.to_json())
        pipe.sadd(self.names.sessions_key, record.id)
        pipe.execute()

    def get(self, session_id: int) -> SessionRecord | None:
        """The open session with this id, or None."""
        raw = self._r.get(self.names.session_key(session_id))
        return None if raw is None else SessionRecord.from_json(raw)

    def exists(self, session_id: int) -> bool:
        """True while the session's record exists (it was not closed with purge)."""
        return bool(self._r.exists(self.names.session_key(session_id)))

    def was_closed(self, session_id: int) -> bool:
        """True if this session existed and was closed (within the tombstone's lifetime)."""
        return bool(self._r.exists(self.names.closed_session_key(session_id)))

    def open_ids(self) -> list[int]:
        """Ids of every open session, oldest first."""
        return sorted(int(x) for x in self._r.smembers(self.names.sessions_key))

    def open_sessions(self) -> list[SessionRecord]:
        """Every open session, oldest first."""
        ids = self.open_ids()
        if not ids:
            return []
        raws = self._r.mget([self.names.session_key(i) for i in ids])
        return [SessionRecord.from_json(raw) for raw in raws if raw is not None]

    def delete(self, session_id: int) -> None:
        """Drop every key of the session and leave a tombstone saying it was closed."""
        n = self.names
        record = self.get(session_id)
        data_keys = list(record.data.values()) if record else []
        clients = [k for c in self.clients(session_id) for k in client_keys(n, session_id, c)]
        pipe = self._r.pipeline()
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
        pipe.execute()

    # --- client ids -----------------------------------------------------------------------
    def add_client(self, session_id: int, client_id: str) -> None:
        """Remember a client id so its response queue is deleted with the session."""
        self._r.sadd(self.names.session_clients_key(session_id), client_id)

    def clients(self, session_id: int) -> list[str]:
        """Client ids that have a response queue in this session."""
        members = self._r.smembers(self.names.session_clients_key(session_id))
        return sorted(as_text(x) for x in members)

    def forget_client(self, session_id: int, client_id: str) -> None:
        """Drop a purged client id's keys."""
        pipe = self._r.pipeline()
        pipe.srem(self.names.session_clients_key(session_id), client_id)
        pipe.delete(*client_keys(self.names, session_id, client_id))
        pipe.execute()

    def outstanding(self, session_ids: Iterable[int]) -> dict[int, int]:
        """Requests accepted and not answered yet, per session (over all its client ids)."""
        session_ids = list(session_ids)
        pipe = self._r.pipeline()
        for sid in session_ids:
            pipe.smembers(self.names.session_clients_key(sid))
        clients = [sorted(as_text(c) for c in m) for m in pipe.execute()]
        for sid, ids in zip(session_ids, clients, strict=True):
            for cid in ids:
                pipe.hmget(self.names.client_key(sid, cid), "accepted", "done")
        counts = iter(pipe.execute())
        out: dict[int, int] = {}
        for sid, ids in zip(session_ids, clients, strict=True):
            total = 0
            for _ in ids:
                accepted, done = next(counts)
                total += max(int(accepted or 0) - int(done or 0), 0)
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
        pipe = self._r.pipeline()
        pipe.zremrangebyscore(key, "-inf", f"({since}")
        pipe.zcard(key)
        return int(pipe.execute()[1])

    # --- load errors and targets ----------------------------------------------------------
    def record_load_error(self, session_id: int, host_id: str, why: str) -> None:
        """Say why the service could not be loaded on `host_id` (the allocator excludes it)."""
        self._r.hset(self.names.session_load_errors_key(session_id), host_id, why)

    def load_errors(self, session_id: int) -> dict[str, str]:
        """Why the service failed to load, per host (empty when it loaded everywhere)."""
        raw = self._r.hgetall(self.names.session_load_errors_key(session_id))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    def targets(self) -> dict[int, int]:
        """Units the allocator last gave each session."""
        raw = self._r.hgetall(self.names.targets_key)
        return {int(k): int(v) for k, v in raw.items()}

    def set_targets(self, targets: dict[int, int]) -> None:
        """Record the allocator's units per session (replacing the previous round's)."""
        pipe = self._r.pipeline()
        pipe.delete(self.names.targets_key)
        if targets:
            pipe.hset(self.names.targets_key, mapping={str(k): v for k, v in targets.items()})
        pipe.execute()
