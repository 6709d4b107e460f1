"""Usage records: what each closed session used (HPC Pack's usage reports by service and user).

While a session is open, each host adds the unit-seconds (units x seconds) and retries of its
instances that exit to the session's usage hash; when the session closes, the broker takes
that hash, adds the instances still running up to the close, and writes one `UsageRecord`
into a sorted set scored by close time, pruned after `usage.retention` seconds. The take is
atomic and marks the hash closed, so closing twice (durable: close, then purge) records once,
and a host's late addition after the close is dropped rather than recreating the key.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Any

import redis

from soafarm.errors import DecodeError
from soafarm.names import Names
from soafarm.plain import from_plain, to_plain
from soafarm.state.records import as_text

#: Seconds the closed marker of a taken usage hash stays (instances drain within that).
CLOSED_MARK_SECONDS = 3600

# KEYS: usage hash, session record. ARGV: unit-seconds, retries.
_ADD = """
if redis.call('EXISTS', KEYS[2]) == 0 or redis.call('HEXISTS', KEYS[1], 'closed') == 1 then
  return 0
end
redis.call('HINCRBYFLOAT', KEYS[1], 'unit_seconds', ARGV[1])
redis.call('HINCRBY', KEYS[1], 'retries', ARGV[2])
return 1
"""

# KEYS: usage hash. ARGV: seconds the closed marker stays. Returns the hash as it was
# (flat list), or false if it was taken already.
_TAKE = """
if redis.call('HEXISTS', KEYS[1], 'closed') == 1 then return false end
local was = redis.call('HGETALL', KEYS[1])
redis.call('DEL', KEYS[1])
redis.call('HSET', KEYS[1], 'closed', '1')
redis.call('EXPIRE', KEYS[1], ARGV[1])
return was
"""


@dataclass(frozen=True)
class UsageRecord:
    """One closed session's use of the farm."""

    session: int
    service: str
    version: str | None
    owner: str
    durable: bool
    job_template: str
    #: When the session was created and closed (seconds since the epoch).
    started: float
    ended: float
    #: Units (cores, sockets or nodes, by its resource unit) x seconds its instances ran.
    unit_seconds: float
    requests: int
    responses: int
    faults: int
    retries: int
    #: The state it closed from ("failed" with `error`, or "running", "queued", ...).
    state: str = ""
    error: str = ""

    def to_json(self) -> str:
        """JSON text (one member of the sorted set)."""
        return json.dumps(to_plain(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> UsageRecord:
        """Parse `to_json`'s output (DecodeError for anything else)."""
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:
            raise DecodeError(f"corrupt usage record: {e}") from None
        return from_plain(cls, data, "corrupt usage record")


@dataclass(frozen=True)
class Taken:
    """A session's usage hash as its close took it."""

    unit_seconds: float = 0.0
    retries: int = 0


class UsageStore:
    """Typed reads and writes of a namespace's usage hashes and records."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Scripts are registered on `client` (loaded on first use)."""
        self._r = client
        self.names = names
        self._add: Any = client.register_script(_ADD)
        self._take: Any = client.register_script(_TAKE)

    def add(self, session_id: int, unit_seconds: float, retries: int = 0) -> bool:
        """Add an exited instance's use; False when the session is closed or gone."""
        keys = [self.names.session_usage_key(session_id), self.names.session_key(session_id)]
        return bool(self._add(keys=keys, args=[f"{unit_seconds:.6f}", int(retries)]))

    def take(self, session_id: int) -> Taken | None:
        """The exited instances' use, once: None when the session's close took it already."""
        raw = self._take(
            keys=[self.names.session_usage_key(session_id)], args=[CLOSED_MARK_SECONDS]
        )
        if raw is None:
            return None
        fields = {as_text(k): as_text(v) for k, v in zip(raw[::2], raw[1::2], strict=True)}
        try:
            return Taken(float(fields.get("unit_seconds", 0)), int(fields.get("retries", 0)))
        except ValueError:
            return Taken()  # garbage in the hash: the record still gets written

    def record(self, usage: UsageRecord, retention: float) -> None:
        """Keep `usage`, and drop the records older than `retention` seconds."""
        pipe = self._r.pipeline(transaction=False)
        pipe.zadd(self.names.usage_records_key, {usage.to_json(): usage.ended})
        pipe.zremrangebyscore(self.names.usage_records_key, "-inf", f"({time.time() - retention}")
        pipe.execute()

    def since(self, start: float) -> tuple[list[UsageRecord], int]:
        """Records of sessions closed at `start` or later, oldest first, and how many could
        not be decoded (skipped)."""
        out: list[UsageRecord] = []
        bad = 0
        raws: Any = self._r.zrangebyscore(self.names.usage_records_key, start, "+inf")
        for raw in raws:
            try:
                out.append(UsageRecord.from_json(raw))
            except DecodeError:
                bad += 1
        return out, bad
