"""Worker hosts in Redis: host records, heartbeat keys, assignments, wake lists, load reports,
and the states an operator set (`soafarm hosts offline|drain|online`).

The broker writes a host's assignments and pushes to its wake list; the host blocks on that
list (at most one heartbeat interval), so one call gives both instant reaction and the
heartbeat tick. Its instances report their busy time into the host's load hash.

An operator's state lives in one hash of its own, not in the host's record: the host rewrites
its record at every beat, and the state must outlive the host (a host restarted with the same
id comes back offline), so only `online` removes it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import redis

from soafarm.errors import DecodeError
from soafarm.names import Names
from soafarm.state import garbage
from soafarm.state.batch import Batch, Later
from soafarm.state.records import HostRecord, as_text

#: What `HostStore.wake` pushes by default: "look at your assignments now".
WAKE = "1"

#: Operator states (`set_admin`): an offline host gets no new instances and keeps those it
#: runs until their sessions end or shrink; a draining one also has its instances stopped
#: gracefully (calls in flight finish) while the allocator moves their units elsewhere.
OFFLINE = "offline"
DRAINING = "draining"
ADMIN_STATES = (OFFLINE, DRAINING)


@dataclass(frozen=True)
class InstanceLoad:
    """One instance's report to its host: busy call-seconds since it started, on its clock,
    and (with metrics on) its calls' totals: a duration histogram (calls per bucket, not
    cumulative, bounds `metrics.call_duration_buckets`), their seconds, faults, retries."""

    session: int
    capacity: int
    busy: float
    at: float
    buckets: tuple[int, ...] = ()
    seconds: float = 0.0
    faults: int = 0
    retries: int = 0

    def to_json(self) -> str:
        """JSON with the fields in declaration order (as `redis-cli` shows them)."""
        data: dict[str, Any] = {
            "session": self.session,
            "capacity": self.capacity,
            "busy": self.busy,
            "at": self.at,
        }
        if self.buckets:
            data.update(
                buckets=list(self.buckets),
                seconds=self.seconds,
                faults=self.faults,
                retries=self.retries,
            )
        return json.dumps(data)

    @classmethod
    def from_json(cls, raw: bytes | str) -> InstanceLoad:
        """Parse `to_json`'s output (DecodeError for anything else)."""
        try:
            data: dict[str, Any] = json.loads(raw)
            return cls(
                int(data["session"]),
                int(data["capacity"]),
                float(data["busy"]),
                float(data["at"]),
                tuple(int(b) for b in data.get("buckets", ())),
                float(data.get("seconds", 0.0)),
                int(data.get("faults", 0)),
                int(data.get("retries", 0)),
            )
        except (ValueError, TypeError, KeyError, RecursionError, AttributeError) as e:
            raise DecodeError(f"corrupt instance load report: {e!r}") from None


class HostStore:
    """Typed reads and writes of the worker hosts of one namespace."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every host key of `names`' namespace."""
        self._r = client
        self.names = names

    def close(self) -> None:
        """Release the Redis client's connections (its owner is done with it)."""
        self._r.close()

    # --- records and heartbeats -----------------------------------------------------------
    def beat(self, record: HostRecord, timeout: float) -> None:
        """Write the host's record and renew its heartbeat key for `timeout` seconds."""
        pipe = self._r.pipeline()
        pipe.hset(self.names.hosts_key, record.id, record.to_json())
        pipe.set(self.names.host_heartbeat_key(record.id), "1", px=int(timeout * 1000))
        pipe.execute()

    def hosts(self) -> dict[str, HostRecord]:
        """Every registered host, alive or not, whose record can be decoded."""
        return self.scan_hosts()[0]

    def scan_hosts(self) -> tuple[dict[str, HostRecord], list[str]]:
        """(every registered host whose record can be decoded, the ids of those whose record
        cannot: logged once; a live host overwrites its record at its next beat, and the
        broker's leader forgets the others)."""
        key = self.names.hosts_key
        return _hosts(key, garbage.tolerant(key, self._r.hgetall, {}))

    def read_hosts(self, batch: Batch) -> Later[tuple[dict[str, HostRecord], list[str]]]:
        """`scan_hosts()`, read with `batch`."""
        key = self.names.hosts_key
        return batch.add(
            lambda p: p.hgetall(key), lambda r: _hosts(key, garbage.reply(key, r[0], {}))
        )

    def alive(self, host_ids: list[str]) -> set[str]:
        """The subset of `host_ids` whose heartbeat key still exists."""
        batch = Batch(self._r)
        found = self.read_alive(batch, host_ids)
        batch.run()
        return found.value

    def read_alive(self, batch: Batch, host_ids: list[str]) -> Later[set[str]]:
        """`alive(host_ids)`, read with `batch`."""

        def queue(pipe: Any) -> None:
            for h in host_ids:
                pipe.exists(self.names.host_heartbeat_key(h))

        def alive(replies: list[Any]) -> set[str]:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return {h for h, ok in zip(host_ids, replies, strict=True) if ok}

        return batch.add(queue, alive)

    def forget(self, host_id: str) -> None:
        """Broker side: remove a lost host, its assignments and its instances' load reports
        (its instance records are the instance store's: `InstanceStore.forget_host`)."""
        n = self.names
        pipe = self._r.pipeline()
        pipe.hdel(n.hosts_key, host_id)
        pipe.delete(
            n.host_heartbeat_key(host_id),
            n.host_assignments_key(host_id),
            n.host_wake_key(host_id),
            n.host_load_key(host_id),
        )
        pipe.execute()

    def deregister(self, host_id: str) -> None:
        """Host side: remove every key of a host that stopped."""
        n = self.names
        pipe = self._r.pipeline()
        pipe.hdel(n.hosts_key, host_id)
        pipe.delete(
            n.host_heartbeat_key(host_id),
            n.host_assignments_key(host_id),
            n.host_wake_key(host_id),
            n.host_load_key(host_id),
        )
        pipe.execute()

    # --- states an operator set ----------------------------------------------------------
    def admin_states(self) -> dict[str, str]:
        """Host id -> "offline" or "draining", for every host an operator set one on (live or
        not); a field holding anything else is skipped, logged once."""
        batch = Batch(self._r)
        found = self.read_admin(batch)
        batch.run()
        return found.value

    def read_admin(self, batch: Batch) -> Later[dict[str, str]]:
        """`admin_states()`, read with `batch`."""
        key = self.names.host_admin_key
        return batch.add(
            lambda p: p.hgetall(key), lambda r: _admin(key, garbage.reply(key, r[0], {}))
        )

    def set_admin(self, host_id: str, state: str | None) -> str | None:
        """Set a host's operator state (`OFFLINE` or `DRAINING`), or with None clear it;
        returns the state it had before (None: none, or garbage). A key of the wrong type
        (only this method writes it) is reported and replaced."""
        if state is not None and state not in ADMIN_STATES:
            raise ValueError(f"host state must be one of {', '.join(ADMIN_STATES)}, not {state!r}")
        key = self.names.host_admin_key

        def write() -> list[Any]:
            pipe = self._r.pipeline()  # MULTI: the state before is the one replaced
            pipe.hget(key, host_id)
            if state is None:
                pipe.hdel(key, host_id)
            else:
                pipe.hset(key, host_id, state)
            replies: list[Any] = pipe.execute(raise_on_error=False)
            return replies

        replies = write()
        if isinstance(replies[0], redis.ResponseError) and garbage.is_wrong_type(replies[0]):
            garbage.report(key, "holds the wrong type of value", str(replies[0]))
            self._r.delete(key)
            replies = write()
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        before = replies[0]
        text = None if before is None else as_text(before)
        return text if text in ADMIN_STATES else None

    # --- assignments and wake-ups ---------------------------------------------------------
    def assignments(self, host_ids: list[str]) -> dict[str, dict[int, int]]:
        """Current assignments (session id -> instances) of each host (broker side: a field
        that is not session id -> count is logged once and removed, as is a value of the
        wrong type; only the broker writes these)."""
        batch = Batch(self._r)
        found = self.read_assignments(batch, host_ids)
        batch.run()
        return found.value

    def read_assignments(
        self, batch: Batch, host_ids: list[str]
    ) -> Later[dict[str, dict[int, int]]]:
        """`assignments(host_ids)`, read with `batch` (garbage is removed as it is read)."""

        def queue(pipe: Any) -> None:
            for h in host_ids:
                pipe.hgetall(self.names.host_assignments_key(h))

        def decode(replies: list[Any]) -> dict[str, dict[int, int]]:
            out: dict[str, dict[int, int]] = {}
            for h, raw in zip(host_ids, replies, strict=True):
                key = self.names.host_assignments_key(h)
                value = garbage.reply(key, raw, None)
                if value is None:  # not a hash: only the broker writes it, so it goes
                    self._r.delete(key)
                    value = {}
                out[h] = _assignment(key, value)
                junk = [k for k in value if not _is_int(k) or not _is_int(value[k])]
                if junk:  # the same fields `_assignment` skipped
                    self._r.hdel(key, *junk)
            return out

        return batch.add(queue, decode)

    def assignments_of(self, host_id: str) -> dict[int, int]:
        """One host's assignments: session id -> instances it should run (garbage skipped)."""
        key = self.names.host_assignments_key(host_id)
        return _assignment(key, garbage.tolerant(key, self._r.hgetall, {}))

    def set_assignments(self, host_id: str, assignments: dict[int, int]) -> None:
        """Replace a host's assignments and wake it so it applies them at once."""
        key = self.names.host_assignments_key(host_id)
        pipe = self._r.pipeline()
        pipe.delete(key)
        if assignments:
            pipe.hset(key, mapping={str(k): v for k, v in assignments.items()})
        pipe.rpush(self.names.host_wake_key(host_id), WAKE)
        pipe.execute()

    def wake(self, host_id: str, why: str = WAKE) -> None:
        """Make the host's `wait_for_wake` return now."""
        self._r.rpush(self.names.host_wake_key(host_id), why)

    def wait_for_wake(self, host_id: str, timeout: float) -> None:
        """Block until the host is woken or `timeout` seconds pass, then clear the wake list
        (many wake-ups while the host was busy need one look at the assignments)."""
        key = self.names.host_wake_key(host_id)
        self._r.blpop([key], timeout=timeout)
        self._r.delete(key)

    # --- load reports ---------------------------------------------------------------------
    def report_load(self, host_id: str, instance_id: str, load: InstanceLoad) -> None:
        """An instance's latest busy-time report to its host."""
        self._r.hset(self.names.host_load_key(host_id), instance_id, load.to_json())

    def load_of(self, host_id: str, instance_id: str) -> InstanceLoad | None:
        """One instance's latest report (None: none, or not decodable)."""
        raw = self._r.hget(self.names.host_load_key(host_id), instance_id)
        if raw is None:
            return None
        try:
            return InstanceLoad.from_json(raw)
        except DecodeError:
            return None

    def instance_loads(self, instances: list[tuple[str, str]]) -> list[InstanceLoad | None]:
        """The latest report of each (host id, instance id), in one round trip (None: no
        report, or not decodable)."""
        if not instances:
            return []
        pipe = self._r.pipeline(transaction=False)
        for host_id, instance_id in instances:
            pipe.hget(self.names.host_load_key(host_id), instance_id)
        out: list[InstanceLoad | None] = []
        for raw in pipe.execute(raise_on_error=False):
            try:
                out.append(InstanceLoad.from_json(raw) if isinstance(raw, bytes | str) else None)
            except DecodeError:
                out.append(None)
        return out

    def loads(self, host_id: str) -> dict[str, InstanceLoad]:
        """The latest report of each instance of the host, by instance id (a report that
        cannot be decoded is skipped, logged once)."""
        key = self.names.host_load_key(host_id)
        raw = garbage.tolerant(key, self._r.hgetall, {})
        out: dict[str, InstanceLoad] = {}
        for k, v in raw.items():
            try:
                out[as_text(k)] = InstanceLoad.from_json(v)
            except DecodeError as e:
                garbage.report(key, f"instance {as_text(k)!r}: {e}", v)
        return out


def _hosts(key: str, raw: dict[Any, Any]) -> tuple[dict[str, HostRecord], list[str]]:
    """(host records of the hosts hash, ids of those that cannot be decoded: reported)."""
    good: dict[str, HostRecord] = {}
    bad: list[str] = []
    for k, v in raw.items():
        host_id = as_text(k)
        try:
            good[host_id] = HostRecord.from_json(v)
        except DecodeError as e:
            garbage.report(key, f"host {host_id!r}: {e}", v)
            bad.append(host_id)
    return good, sorted(bad)


def _admin(key: str, raw: dict[Any, Any]) -> dict[str, str]:
    """Host id -> operator state of the admin hash; other values are reported and skipped
    (the host is then treated as online: nobody meant a value no one can read)."""
    out: dict[str, str] = {}
    for k, v in raw.items():
        host_id, state = as_text(k), as_text(v)
        if state in ADMIN_STATES:
            out[host_id] = state
        else:
            garbage.report(key, f"host {host_id!r}: state is not one of {ADMIN_STATES}", v)
    return out


def _is_int(value: Any) -> bool:
    try:
        int(as_text(value))
    except ValueError:
        return False
    return True


def _assignment(key: str, raw: dict[Any, Any]) -> dict[int, int]:
    out: dict[int, int] = {}
    for k, v in raw.items():
        try:
            out[int(as_text(k))] = int(as_text(v))
        except ValueError:
            garbage.report(key, f"field {as_text(k)!r} is not session id -> instances", v)
    return out
