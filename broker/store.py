"""The broker daemon's view of Redis: the state layer's stores over one client.

The stores (`soafarm.state.sessions`, `.hosts`, `.instances`, `.clients`, `.commondata`) own
every key and command; this class only gathers them under the names the broker's modules
use, so the allocator, the life cycle and the control operations share one connection.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import redis

from soafarm.names import Names
from soafarm.state.admins import AdminStore
from soafarm.state.batch import Batch
from soafarm.state.clients import ProgressStore, read_client_users
from soafarm.state.commondata import CommonDataStore
from soafarm.state.hosts import HostStore
from soafarm.state.instances import InstanceStore
from soafarm.state.records import HostRecord, InstanceRecord, SessionRecord
from soafarm.state.sessions import CLOSED_TOMBSTONE_SECONDS, IdMark, SessionStore
from soafarm.state.usage import UsageStore

__all__ = ["CLOSED_TOMBSTONE_SECONDS", "RECORDS_MAX_AGE", "BrokerStore"]

#: Seconds the broker daemon reuses the session records it read last while no session was
#: written (the generation `SessionStore` keeps did not move): one short reply instead of
#: every record, four times a second; only an edit made by hand waits this long to be seen.
RECORDS_MAX_AGE = 5.0


class BrokerStore:
    """Sessions, hosts, instances, client progress and common data of one namespace."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every key of `names`' namespace."""
        self.names = names
        self.sessions = SessionStore(client, names)
        self.host_records = HostStore(client, names)
        self.instance_records = InstanceStore(client, names)
        self.common_data = CommonDataStore(client, names)
        self.usage = UsageStore(client, names)
        self.admins = AdminStore(client, names)
        self._client = client
        #: The farm's Redis client (for what no store wraps: ACL users).
        self.redis = client
        #: Seconds `open_sessions` may answer with the records it read last while no
        #: session was written since (`SessionStore.open_sessions`); 0 reads them every
        #: time. The broker daemon sets RECORDS_MAX_AGE.
        self.records_max_age = 0.0

    def batch(self) -> Batch:
        """Reads of several stores sent in one round trip (`soafarm.state.batch`)."""
        return Batch(self._client)

    def progress(self, session_id: int, client_id: str) -> ProgressStore:
        """The progress counters of one client id of a session."""
        return ProgressStore(self._client, self.names, session_id, client_id)

    # --- sessions -------------------------------------------------------------------------
    def new_session_id(self, mark: IdMark | None = None) -> int:
        """A fresh session id, never used before in this namespace (see `SessionStore`)."""
        return self.sessions.new_session_id(mark)

    def save_session(self, record: SessionRecord) -> None:
        """Create a session record (changes go through `update_session`)."""
        self.sessions.save(record)

    def update_session(
        self, session_id: int, change: Callable[[SessionRecord], SessionRecord | None]
    ) -> SessionRecord | None:
        """Change a session record unless another daemon changed it first (then retry on
        the fresh record); None if the session is gone."""
        return self.sessions.update(session_id, change)

    def get_session(self, session_id: int) -> SessionRecord | None:
        """The open session with this id, or None (also when its record is corrupt)."""
        return self.sessions.get(session_id)

    def was_closed(self, session_id: int) -> bool:
        """True if this session existed and was closed (within the tombstone's lifetime)."""
        return self.sessions.was_closed(session_id)

    def open_sessions(self) -> list[SessionRecord]:
        """Every open session, oldest first (see `records_max_age`)."""
        return self.sessions.open_sessions(self.records_max_age)

    def add_client(self, session_id: int, client_id: str) -> None:
        """Remember a client id so its response queue is deleted with the session."""
        self.sessions.add_client(session_id, client_id)

    def client_users(self, session_id: int, client_ids: list[str]) -> dict[str, str]:
        """The RabbitMQ user of each client id that has one kept (see `ProgressStore.user`)."""
        return read_client_users(self._client, self.names, session_id, client_ids)

    def clients(self, session_id: int) -> list[str]:
        """Client ids that have a response queue in this session."""
        return self.sessions.clients(session_id)

    def instances(self, session_id: int) -> list[InstanceRecord]:
        """Service instances currently serving this session."""
        return self.instance_records.of_session(session_id)

    def outstanding(self, session_ids: list[int]) -> dict[int, int]:
        """Requests accepted and not answered yet, per session (over all its client ids)."""
        return self.sessions.outstanding(session_ids)

    def connected_handles(self, session_id: int, since: float) -> int:
        """Client handles that beat after `since`; older ones are dropped."""
        return self.sessions.connected_handles(session_id, since)

    def load_errors(self, session_id: int) -> dict[str, str]:
        """Why the service failed to load, per host (empty when it loaded everywhere)."""
        return self.sessions.load_errors(session_id)

    def forget_client(self, session_id: int, client_id: str) -> None:
        """Drop a purged client id's keys."""
        self.sessions.forget_client(session_id, client_id)

    def delete_session(
        self,
        session_id: int,
        record: SessionRecord | None = None,
        known: Sequence[str] | None = None,
    ) -> list[str]:
        """Drop every key of the session and leave a tombstone saying it was closed; returns
        the client ids it had (`record` and `known` client ids: as just read, if at hand)."""
        return self.sessions.delete(session_id, record, known)

    def adopt_data(self, key: str) -> bool:
        """Keep uploaded common data for a session's lifetime; False if it expired first."""
        return self.common_data.adopt(key)

    def targets(self) -> dict[int, int]:
        """Units the allocator last gave each session."""
        return self.sessions.targets()

    def set_targets(self, targets: dict[int, int]) -> None:
        """Record the allocator's units per session (replacing the previous round's)."""
        self.sessions.set_targets(targets)

    # --- hosts ----------------------------------------------------------------------------
    def hosts(self) -> dict[str, HostRecord]:
        """Every registered host, alive or not (records that cannot be decoded skipped)."""
        return self.host_records.hosts()

    def scan_hosts(self) -> tuple[dict[str, HostRecord], list[str]]:
        """(registered hosts, ids of hosts whose record cannot be decoded)."""
        return self.host_records.scan_hosts()

    def alive(self, host_ids: list[str]) -> set[str]:
        """The subset of `host_ids` whose heartbeat key still exists."""
        return self.host_records.alive(host_ids)

    def forget_host(self, host_id: str) -> int:
        """Remove a lost host: its record, assignments and load reports, and the records of
        its instances in every session (so `sessions show` and the autoscaler stop counting
        them); returns how many instance records went."""
        self.host_records.forget(host_id)
        return self.instance_records.forget_host(host_id, self.sessions.open_ids())

    def assignments(self, host_ids: list[str]) -> dict[str, dict[int, int]]:
        """Current assignments of each host."""
        return self.host_records.assignments(host_ids)

    def set_assignments(self, host_id: str, assignments: dict[int, int]) -> None:
        """Replace a host's assignments and wake it so it applies them at once."""
        self.host_records.set_assignments(host_id, assignments)
