"""The broker daemon's view of Redis: sessions, hosts, assignments and instances."""

from __future__ import annotations

import redis

from soafarm.names import Names
from soafarm.state.records import HostRecord, InstanceRecord, SessionRecord, as_text

CLOSED_TOMBSTONE_SECONDS = 7 * 24 * 3600


class BrokerStore:
    """Typed reads and writes of the broker's Redis state."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every key of `names`' namespace."""
        self.r = client
        self.names = names

    # --- sessions -------------------------------------------------------------------------
    def new_session_id(self) -> int:
        """A fresh session id, unique in this namespace."""
        return int(self.r.incr(self.names.session_counter_key))

    def save_session(self, record: SessionRecord) -> None:
        """Create or update a session record."""
        pipe = self.r.pipeline()
        pipe.set(self.names.session_key(record.id), record.to_json())
        pipe.sadd(self.names.sessions_key, record.id)
        pipe.execute()

    def get_session(self, session_id: int) -> SessionRecord | None:
        """The open session with this id, or None."""
        raw = self.r.get(self.names.session_key(session_id))
        return None if raw is None else SessionRecord.from_json(raw)

    def was_closed(self, session_id: int) -> bool:
        """True if this session existed and was closed (within the tombstone's lifetime)."""
        return bool(self.r.exists(self.names.closed_session_key(session_id)))

    def open_sessions(self) -> list[SessionRecord]:
        """Every open session, oldest first."""
        ids = sorted(int(x) for x in self.r.smembers(self.names.sessions_key))
        if not ids:
            return []
        raws = self.r.mget([self.names.session_key(i) for i in ids])
        return [SessionRecord.from_json(raw) for raw in raws if raw is not None]

    def add_client(self, session_id: int, client_id: str) -> None:
        """Remember a client id so its response queue is deleted with the session."""
        self.r.sadd(self.names.session_clients_key(session_id), client_id)

    def clients(self, session_id: int) -> list[str]:
        """Client ids that have a response queue in this session."""
        members = self.r.smembers(self.names.session_clients_key(session_id))
        return sorted(as_text(x) for x in members)

    def instances(self, session_id: int) -> list[InstanceRecord]:
        """Service instances currently serving this session."""
        raws = self.r.hvals(self.names.session_instances_key(session_id))
        return sorted((InstanceRecord.from_json(x) for x in raws), key=lambda i: i.id)

    def outstanding(self, session_ids: list[int]) -> dict[int, int]:
        """Requests accepted and not answered yet, per session (over all its client ids)."""
        pipe = self.r.pipeline()
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

    def connected_handles(self, session_id: int, since: float) -> int:
        """Client handles that beat after `since`; older ones are dropped."""
        key = self.names.session_handles_key(session_id)
        pipe = self.r.pipeline()
        pipe.zremrangebyscore(key, "-inf", f"({since}")
        pipe.zcard(key)
        return int(pipe.execute()[1])

    def load_errors(self, session_id: int) -> dict[str, str]:
        """Why the service failed to load, per host (empty when it loaded everywhere)."""
        raw = self.r.hgetall(self.names.session_load_errors_key(session_id))
        return {as_text(k): as_text(v) for k, v in raw.items()}

    def client_keys(self, session_id: int, client_id: str) -> list[str]:
        """Every Redis key of one client id (progress hash and bitmaps)."""
        n = self.names
        return [
            n.client_key(session_id, client_id),
            n.client_done_key(session_id, client_id),
            n.client_read_key(session_id, client_id),
            n.client_attempts_key(session_id, client_id),
        ]

    def forget_client(self, session_id: int, client_id: str) -> None:
        """Drop a purged client id's keys."""
        pipe = self.r.pipeline()
        pipe.srem(self.names.session_clients_key(session_id), client_id)
        pipe.delete(*self.client_keys(session_id, client_id))
        pipe.execute()

    def delete_session(self, session_id: int) -> None:
        """Drop every key of the session and leave a tombstone saying it was closed."""
        n = self.names
        record = self.get_session(session_id)
        data_keys = list(record.data.values()) if record else []
        client_keys = [k for c in self.clients(session_id) for k in self.client_keys(session_id, c)]
        pipe = self.r.pipeline()
        pipe.srem(n.sessions_key, session_id)
        pipe.hdel(n.targets_key, session_id)
        pipe.delete(
            n.session_key(session_id),
            n.session_clients_key(session_id),
            n.session_instances_key(session_id),
            n.session_load_errors_key(session_id),
            n.session_handles_key(session_id),
            *client_keys,
            *data_keys,
        )
        pipe.set(n.closed_session_key(session_id), "1", ex=CLOSED_TOMBSTONE_SECONDS)
        pipe.execute()

    def targets(self) -> dict[int, int]:
        """Units the allocator last gave each session."""
        raw = self.r.hgetall(self.names.targets_key)
        return {int(k): int(v) for k, v in raw.items()}

    def set_targets(self, targets: dict[int, int]) -> None:
        """Record the allocator's units per session (replacing the previous round's)."""
        pipe = self.r.pipeline()
        pipe.delete(self.names.targets_key)
        if targets:
            pipe.hset(self.names.targets_key, mapping={str(k): v for k, v in targets.items()})
        pipe.execute()

    # --- hosts ----------------------------------------------------------------------------
    def hosts(self) -> dict[str, HostRecord]:
        """Every registered host, alive or not."""
        raw = self.r.hgetall(self.names.hosts_key)
        return {as_text(k): HostRecord.from_json(v) for k, v in raw.items()}

    def alive(self, host_ids: list[str]) -> set[str]:
        """The subset of `host_ids` whose heartbeat key still exists."""
        pipe = self.r.pipeline()
        for h in host_ids:
            pipe.exists(self.names.host_heartbeat_key(h))
        return {h for h, ok in zip(host_ids, pipe.execute(), strict=True) if ok}

    def forget_host(self, host_id: str) -> None:
        """Remove a lost host and its assignments."""
        pipe = self.r.pipeline()
        pipe.hdel(self.names.hosts_key, host_id)
        pipe.delete(self.names.host_assignments_key(host_id), self.names.host_wake_key(host_id))
        pipe.execute()

    def assignments(self, host_ids: list[str]) -> dict[str, dict[int, int]]:
        """Current assignments of each host."""
        pipe = self.r.pipeline()
        for h in host_ids:
            pipe.hgetall(self.names.host_assignments_key(h))
        return {
            h: {int(k): int(v) for k, v in raw.items()}
            for h, raw in zip(host_ids, pipe.execute(), strict=True)
        }

    def set_assignments(self, host_id: str, assignments: dict[int, int]) -> None:
        """Replace a host's assignments and wake it so it applies them at once."""
        key = self.names.host_assignments_key(host_id)
        pipe = self.r.pipeline()
        pipe.delete(key)
        if assignments:
            pipe.hset(key, mapping={str(k): v for k, v in assignments.items()})
        pipe.rpush(self.names.host_wake_key(host_id), "1")
        pipe.execute()
