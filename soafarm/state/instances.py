"""The service instances serving each session, as their processes register themselves."""

from __future__ import annotations

import redis

from soafarm.names import Names
from soafarm.state.records import InstanceRecord


class InstanceStore:
    """Typed reads and writes of the instance records of one namespace's sessions."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every instance key of `names`' namespace."""
        self._r = client
        self.names = names

    def close(self) -> None:
        """Release the Redis client's connections (its owner is done with it)."""
        self._r.close()

    def register(self, session_id: int, record: InstanceRecord) -> None:
        """Record a started instance of a session."""
        self._r.hset(self.names.session_instances_key(session_id), record.id, record.to_json())

    def of_session(self, session_id: int) -> list[InstanceRecord]:
        """Service instances currently serving this session, by id."""
        raws = self._r.hvals(self.names.session_instances_key(session_id))
        return sorted((InstanceRecord.from_json(x) for x in raws), key=lambda i: i.id)

    def forget(self, session_id: int, host_id: str, instance_id: str) -> None:
        """Drop an instance that exited: its record, and its load report to its host (an
        instance's report lives only as long as the instance, so it goes in the same call)."""
        pipe = self._r.pipeline()
        pipe.hdel(self.names.session_instances_key(session_id), instance_id)
        pipe.hdel(self.names.host_load_key(host_id), instance_id)
        pipe.execute()
