"""Per-client-id progress in Redis: accepted, sealed total, done and faulted, readers.

Counting is exact although execution is at-least-once: a worker marks each answered request
in a bitmap with one Lua call per response batch, and only bits it newly sets are counted.
Readers commit what they handed out the same way, so `new_only` reads skip it, and a reader
lease makes a second reader of the same client id take over from the first.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import redis

from soafarm.names import Names
from soafarm.state import garbage
from soafarm.state.batch import Batch, Later
from soafarm.state.records import as_text

# KEYS: client hash, done bitmap. ARGV: the time (epoch seconds), then runs of consecutive
# ids, each as three arguments: first id, count, one '0'/'1' fault flag per id. Request ids
# in a batch are consecutive, so one GETRANGE/SETRANGE covers a run: no Redis command per id
# (a SETBIT per id costs ~2 us each inside the script). When the client id's done count
# reaches its accepted count, the time is kept as `quiet_at`: its last request answered,
# where `client_idle_timeout` starts (a client waiting for a long call is not idle).
#: Runs of ids per call of _MARK_DONE, to bound the time one script holds Redis.
MARK_RUNS_PER_CALL = 256
_MARK_DONE = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local new, faulted = 0, 0
for run = 2, #ARGV, 3 do
  local start, count, flags = tonumber(ARGV[run]), tonumber(ARGV[run + 1]), ARGV[run + 2]
  local first, last = math.floor(start / 8), math.floor((start + count - 1) / 8)
  local old = redis.call('GETRANGE', KEYS[2], first, last)
  local out = {}
  for byte = first, last do
    local value = string.byte(old, byte - first + 1) or 0
    for pos = 0, 7 do
      local id = byte * 8 + pos
      local mask = bit.rshift(128, pos)
      if id >= start and id < start + count and bit.band(value, mask) == 0 then
        value = bit.bor(value, mask)
        new = new + 1
        if string.byte(flags, id - start + 1) == 49 then faulted = faulted + 1 end
      end
    end
    out[#out + 1] = string.char(value)
  end
  redis.call('SETRANGE', KEYS[2], first, table.concat(out))
end
if new > 0 then
  local done = redis.call('HINCRBY', KEYS[1], 'done', new)
  if done >= (tonumber(redis.call('HGET', KEYS[1], 'accepted')) or 0) then
    redis.call('HSET', KEYS[1], 'quiet_at', ARGV[1])
  end
end
if faulted > 0 then redis.call('HINCRBY', KEYS[1], 'faulted', faulted) end
return new
"""

# KEYS: client hash, read bitmap. ARGV: reader token, next offset, the time (epoch seconds),
# then runs of ids as (first id, count): a response batch's ids are mostly consecutive, and
# one argument per id cost the client more CPU than the rest of its read.
# The ids are recorded even for a reader that was taken over (it did hand them out, and the
# new reader must not wait for them); only the lease holder moves the offset, and records
# when it last handed something out (`read_at`: a client id reading is not idle).
_COMMIT_READ = """
for i = 4, #ARGV, 2 do
  local first = tonumber(ARGV[i])
  for id = first, first + tonumber(ARGV[i + 1]) - 1 do redis.call('SETBIT', KEYS[2], id, 1) end
end
if redis.call('HGET', KEYS[1], 'reader') ~= ARGV[1] then return 0 end
local current = tonumber(redis.call('HGET', KEYS[1], 'read_offset') or '-1')
if tonumber(ARGV[2]) > current then redis.call('HSET', KEYS[1], 'read_offset', ARGV[2]) end
if #ARGV > 3 then redis.call('HSET', KEYS[1], 'read_at', ARGV[3]) end
return 1
"""

# KEYS: client hash. ARGV: the time (epoch seconds). A sender about to publish after a quiet
# spell asks whether the broker disconnected its client id for `client_idle_timeout`: if so
# it gets `idle_out` (how long it was idle) and sends nothing; else its `sent_at` is moved
# now, in the same script, so the broker cannot disconnect it between the answer and the
# publish. A client id without counters (purged) is left alone.
_TOUCH_SENT = """
if redis.call('EXISTS', KEYS[1]) == 0 then return false end
local idle = redis.call('HGET', KEYS[1], 'idle_out')
if idle then return idle end
redis.call('HSET', KEYS[1], 'sent_at', ARGV[1])
return false
"""


#: Fields of a client hash that the idle rule (`client_idle_timeout`) reads: when the
#: client id last sent (written by its sender with `accepted`, and when it attaches), last
#: handed out a response (its reader's commit), last had every request answered (the
#: worker's count of done), and, once the broker disconnected it, how long it had been idle
#: (cleared when it attaches again).
SENT_AT, READ_AT, QUIET_AT, IDLE_OUT = "sent_at", "read_at", "quiet_at", "idle_out"


@dataclass(frozen=True)
class ClientProgress:
    """A client id's counters, as `client.status()` and `soafarm attach` show them."""

    client_id: str
    accepted: int
    done: int
    faulted: int
    sealed: bool
    total: int | None
    read_offset: int | None

    @property
    def outstanding(self) -> int:
        """Accepted requests without a response yet."""
        return max(self.accepted - self.done, 0)

    @property
    def finished(self) -> bool:
        """Sealed, and every request of the batch has a response."""
        return self.sealed and self.total is not None and self.done >= self.total

    def as_dict(self) -> dict[str, Any]:
        """Plain data, with `outstanding` and `finished`."""
        return {
            "client_id": self.client_id,
            "accepted": self.accepted,
            "done": self.done,
            "faulted": self.faulted,
            "outstanding": self.outstanding,
            "sealed": self.sealed,
            "total": self.total,
            "finished": self.finished,
        }


class ProgressStore:
    """Reads and writes the progress keys of one client id of one session."""

    def __init__(self, client: redis.Redis, names: Names, session_id: int, client_id: str) -> None:
        """Bind to `session_id`/`client_id` in `names`' namespace."""
        self._r = client
        self.names = names
        self.session_id = session_id
        self.client_id = client_id
        self.clients_key = names.session_clients_key(session_id)
        self.key = names.client_key(session_id, client_id)
        self.done_key = names.client_done_key(session_id, client_id)
        self.read_key = names.client_read_key(session_id, client_id)
        self._commit_read: Any = client.register_script(_COMMIT_READ)
        self._touch_sent: Any = client.register_script(_TOUCH_SENT)

    def close(self) -> None:
        """Release the Redis client's connections (its owner is done with it)."""
        self._r.close()

    def create(self) -> None:
        """Create the counters if this client id is new (idempotent)."""
        pipe = self._r.pipeline()
        for field in ("accepted", "done", "faulted"):
            pipe.hsetnx(self.key, field, 0)
        pipe.execute()

    def create_in(self, batch: Batch, user: str = "") -> Later[None]:
        """`create()`, sent with `batch` (idempotent, so safe outside a transaction), and
        the RabbitMQ `user` the client id is for (kept from its first attach); the returned
        value raises what the commands raised."""

        def queue(pipe: Any) -> None:
            for field in ("accepted", "done", "faulted"):
                pipe.hsetnx(self.key, field, 0)
            if user:
                pipe.hsetnx(self.key, USER_FIELD, user)

        def check(replies: list[Any]) -> None:
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply

        return batch.add(queue, check)

    def user(self) -> str | None:
        """The RabbitMQ user this client id is for (None: not attached yet, or from before
        users were kept)."""
        return read_client_users(self._r, self.names, self.session_id, [self.client_id]).get(
            self.client_id
        )

    def load(self) -> ClientProgress:
        """The current counters (a counter that is not an integer reads as 0, logged once)."""
        raw = garbage.tolerant(self.key, self._r.hgetall, {})
        return parse_progress(
            self.client_id, {as_text(k): as_text(v) for k, v in raw.items()}, self.key
        )

    def read(self, batch: Batch) -> Later[ClientProgress]:
        """`load()`, read with `batch`."""

        def parse(replies: list[Any]) -> ClientProgress:
            raw = garbage.reply(self.key, replies[0], {})
            return parse_progress(
                self.client_id, {as_text(k): as_text(v) for k, v in raw.items()}, self.key
            )

        return batch.add(lambda p: p.hgetall(self.key), parse)

    def record_accepted(self, count: int) -> None:
        """Requests 0..count-1 are safely in RabbitMQ (one writer per client id); the time
        goes with the count, in the same command (`sent_at`: the broker's
        `client_idle_timeout` runs from the client id's last send)."""
        self._r.hset(self.key, mapping={"accepted": count, SENT_AT: time.time()})

    def seal(self, total: int) -> None:
        """end_requests(): the batch has exactly `total` requests."""
        self._r.hset(
            self.key,
            mapping={"accepted": total, "total": total, "sealed": 1, SENT_AT: time.time()},
        )

    def touch_sent(self) -> float | None:
        """Before a send after a quiet spell: how long the client id was idle when the
        broker disconnected it (`client_idle_timeout`), or None, and then its last send is
        recorded as now (atomically: the broker cannot disconnect it in between)."""
        idle = self._touch_sent(keys=[self.key], args=[time.time()])
        return None if idle is None else _seconds(idle)

    def take_reader(self) -> str:
        """Become the one reader of this client id; the previous reader's next commit fails."""
        token = uuid.uuid4().hex
        self._r.hset(self.key, "reader", token)
        return token

    def is_reader(self, token: str) -> bool:
        """True while `token` still holds the reader lease."""
        return as_text(self._r.hget(self.key, "reader") or b"") == token

    def commit_read(self, token: str, next_offset: int, ids: Iterable[int]) -> bool:
        """Record responses handed out, and (for the lease holder) that the stream is read up to
        offset `next_offset`; False if another reader took over."""
        args: list[Any] = [token, next_offset, time.time()]
        for first, count in id_runs(ids):
            args += (first, count)
        return bool(self._commit_read(keys=[self.key, self.read_key], args=args))

    def read_bitmap(self) -> bytes:
        """The bitmap of responses already handed out (bit N = request N)."""
        raw = self._r.get(self.read_key) or b""
        return raw if isinstance(raw, bytes) else raw.encode("latin-1")

    def session_counts(self) -> tuple[int, int]:
        """(this client id's done count, the other client ids' outstanding requests) of the
        session, in one round trip after listing the client ids (the throttle's view)."""
        members = self._r.smembers(self.clients_key)
        others = [c for c in (as_text(m) for m in members) if c != self.client_id]
        pipe = self._r.pipeline()
        pipe.hget(self.key, "done")
        for c in others:
            pipe.hmget(self.names.client_key(self.session_id, c), "accepted", "done")
        replies = pipe.execute(raise_on_error=False)
        outstanding = 0
        for c, reply in zip(others, replies[1:], strict=True):
            key = self.names.client_key(self.session_id, c)
            a, d = garbage.reply(key, reply, (None, None))
            outstanding += max(
                garbage.as_int(a, key, "accepted") - garbage.as_int(d, key, "done"), 0
            )
        done = garbage.as_int(garbage.reply(self.key, replies[0], None), self.key, "done")
        return done, outstanding


def _seconds(raw: Any) -> float:
    """A number of seconds a script answered (0.0 if it is not one)."""
    try:
        return float(as_text(raw))
    except ValueError:
        return 0.0


def client_keys(names: Names, session_id: int, client_id: str) -> list[str]:
    """Every Redis key of one client id: progress hash, done and read bitmaps, attempts."""
    return [
        names.client_key(session_id, client_id),
        names.client_done_key(session_id, client_id),
        names.client_read_key(session_id, client_id),
        names.client_attempts_key(session_id, client_id),
    ]


#: The client hash's field that keeps the RabbitMQ user the client id is for.
USER_FIELD = "user"


def read_client_users(
    client: redis.Redis, names: Names, session_id: int, client_ids: list[str]
) -> dict[str, str]:
    """The kept user of each of `client_ids` that has one, in one round trip."""
    pipe = client.pipeline(transaction=False)
    for client_id in client_ids:
        pipe.hget(names.client_key(session_id, client_id), USER_FIELD)
    replies = pipe.execute()
    return {c: as_text(u) for c, u in zip(client_ids, replies, strict=True) if u is not None}


def parse_progress(client_id: str, raw: dict[str, str], key: str = "") -> ClientProgress:
    """Counters from a client hash read with HGETALL (at `key`, named when a counter is not
    an integer: it reads as 0, and `total`/`read_offset` as unset, logged once)."""
    where = key or f"client {client_id}"
    total = raw.get("total")
    offset = raw.get("read_offset")
    total_n = None if total is None else _optional_int(total, where, "total")
    offset_n = None if offset is None else _optional_int(offset, where, "read_offset")
    return ClientProgress(
        client_id=client_id,
        accepted=garbage.as_int(raw.get("accepted"), where, "accepted"),
        done=garbage.as_int(raw.get("done"), where, "done"),
        faulted=garbage.as_int(raw.get("faulted"), where, "faulted"),
        sealed=raw.get("sealed") == "1",
        total=total_n,
        read_offset=offset_n,
    )


def _optional_int(value: str, key: str, field: str) -> int | None:
    try:
        return int(value)
    except ValueError:
        garbage.report(key, f"{field} is not an integer", value)
        return None


class DoneMarker:
    """Worker side: count responses once each, however often a request ran."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Load the counting script once."""
        self._r = client
        self.names = names
        self.script: Any = client.register_script(_MARK_DONE)

    def answered(self, session_id: int, client_id: str, ids: list[int]) -> set[int]:
        """Which of `ids` already have a response (one GETRANGE over their span)."""
        if not ids:
            return set()
        low, high = min(ids), max(ids)
        raw = self._r.getrange(
            self.names.client_done_key(session_id, client_id), low // 8, high // 8
        )
        bits = raw if isinstance(raw, bytes) else raw.encode("latin-1")
        base = (low // 8) * 8
        out = set()
        for i in ids:
            byte, pos = divmod(i - base, 8)
            if byte < len(bits) and bits[byte] & (0x80 >> pos):
                out.add(i)
        return out

    def client_exists(self, session_id: int, client_id: str) -> bool:
        """True while the client id has its counters (it was not purged, its session is open)."""
        return bool(self._r.exists(self.names.client_key(session_id, client_id)))

    def client_user(self, session_id: int, client_id: str) -> str | None:
        """The RabbitMQ user the client id is for (None: none kept)."""
        return read_client_users(self._r, self.names, session_id, [client_id]).get(client_id)

    def session_exists(self, session_id: int) -> bool:
        """True while the session's record exists (it was not closed)."""
        return bool(self._r.exists(self.names.session_key(session_id)))

    def accepted(self, session_id: int, client_id: str) -> int:
        """The client id's recorded accepted count (0 when it has none, or garbage)."""
        key = self.names.client_key(session_id, client_id)
        return garbage.as_int(self._r.hget(key, "accepted"), key, "accepted")

    def count_attempt(self, session_id: int, client_id: str, request_id: int) -> int:
        """Count one more execution of a request whose batch came back after a failure."""
        key = self.names.client_attempts_key(session_id, client_id)
        return int(self._r.hincrby(key, str(request_id), 1))

    def mark(self, session_id: int, client_id: str, outcomes: list[tuple[int, bool]]) -> int:
        """Mark (request id, faulted) pairs answered; returns how many were new."""
        keys = [
            self.names.client_key(session_id, client_id),
            self.names.client_done_key(session_id, client_id),
        ]
        runs = _runs(outcomes)
        new = 0
        # one round trip for many runs: ids of one client alternate between instances, so
        # an instance's coalesced responses (workers/calls.py, MARK_LINGER) are rarely
        # consecutive
        for i in range(0, len(runs), MARK_RUNS_PER_CALL):
            args: list[Any] = [time.time()]
            args += [
                a
                for start, flags in runs[i : i + MARK_RUNS_PER_CALL]
                for a in (start, len(flags), flags)
            ]
            new += max(int(self.script(keys=keys, args=args)), 0)
        return new


def id_runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Ids (in any order) as runs of consecutive ones, in the order met: (first, count)."""
    runs: list[tuple[int, int]] = []
    first = count = 0
    for request_id in ids:
        if count and request_id == first + count:
            count += 1
            continue
        if count:
            runs.append((first, count))
        first, count = request_id, 1
    if count:
        runs.append((first, count))
    return runs


def _runs(outcomes: list[tuple[int, bool]]) -> list[tuple[int, str]]:
    """Split (id, faulted) pairs into runs of consecutive ids: (first id, fault flags)."""
    runs: list[tuple[int, str]] = []
    start, flags = -1, ""
    for request_id, faulted in outcomes:
        if flags and request_id == start + len(flags):
            flags += "1" if faulted else "0"
            continue
        if flags:
            runs.append((start, flags))
        start, flags = request_id, "1" if faulted else "0"
    if flags:
        runs.append((start, flags))
    return runs
