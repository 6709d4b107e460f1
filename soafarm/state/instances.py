"""The service instances serving each session, as their processes register themselves."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import redis

from soafarm.errors import DecodeError
from soafarm.names import Names
from soafarm.state import garbage
from soafarm.state.batch import Batch, Later
from soafarm.state.records import InstanceRecord, as_text


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
        """Service instances currently serving this session, by id (a record that cannot be
        decoded is skipped, logged once)."""
        key = self.names.session_instances_key(session_id)
        return _instances(key, garbage.tolerant(key, self._r.hgetall, {}))

    def read_of_session(self, batch: Batch, session_id: int) -> Later[list[InstanceRecord]]:
        """`of_session(session_id)`, read with `batch`."""
        key = self.names.session_instances_key(session_id)
        return batch.add(
            lambda p: p.hgetall(key), lambda r: _instances(key, garbage.reply(key, r[0], {}))
        )

    def forget(
        self, session_id: int, host_id: str, instance_id: str, keep_load: bool = False
    ) -> None:
        """Drop an instance that exited: its record, and its load report to its host (an
        instance's report lives only as long as the instance, so it goes in the same call).
        With `keep_load` the report stays for the host, which reads its last call totals
        for its metrics before it forgets the instance in turn."""
        pipe = self._r.pipeline()
        pipe.hdel(self.names.session_instances_key(session_id), instance_id)
        if not keep_load:
            pipe.hdel(self.names.host_load_key(host_id), instance_id)
        pipe.execute()

    def forget_host(self, host_id: str, session_ids: Iterable[int]) -> int:
        """Drop the records of every instance of a lost host in these sessions (its
        instances died with it, or drain without anyone left to forget them); returns how
        many. A record that cannot be decoded goes too when its id names the host (instance
        ids are `<host id>.<session id>.<n>`)."""
        session_ids = list(session_ids)
        pipe = self._r.pipeline()
        for sid in session_ids:
            pipe.hgetall(self.names.session_instances_key(sid))
        replies = pipe.execute(raise_on_error=False)
        gone = 0
        for sid, reply in zip(session_ids, replies, strict=True):
            key = self.names.session_instances_key(sid)
            fields = []
            for field, raw in garbage.reply(key, reply, {}).items():
                try:
                    mine = InstanceRecord.from_json(raw).host_id == host_id
                except DecodeError:
                    mine = as_text(field).startswith(f"{host_id}.")
                if mine:
                    fields.append(field)
            if fields:
                gone += int(self._r.hdel(key, *fields))
        return gone


def _instances(key: str, raws: dict[Any, Any]) -> list[InstanceRecord]:
    """The instance records of a session's hash, by id (one that cannot be decoded is
    skipped, logged once)."""
    out = []
    for field, raw in raws.items():
        try:
            out.append(InstanceRecord.from_json(raw))
        except DecodeError as e:
            garbage.report(key, f"instance {as_text(field)!r}: {e}", raw)
    return sorted(out, key=lambda i: i.id)
