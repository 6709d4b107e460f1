"""A lease in Redis: which of several cooperating broker daemons runs the allocator.

Any broker daemon of a namespace answers control RPCs (they share the control queue); only
the holder of this lease runs the allocation rounds and the life-cycle sweep, which must not
run twice at once (two allocators would move instances back and forth, two sweeps would
both close a session). The lease is a key holding the holder's id with a short expiry,
renewed every round; a holder that dies (SIGKILL, a lost machine) is replaced within one
expiry, and one that stops cleanly releases it at once.
"""

from __future__ import annotations

import os
import socket
import uuid
from typing import Any

import redis

from soafarm.names import Names
from soafarm.state import garbage
from soafarm.state.records import as_text

#: Seconds the lease lasts without renewal: how long the allocator may stand still after
#: its daemon was killed. Renewed four times a second, so a round may take up to ~2.7 s
#: before another daemon takes over.
LEASE_SECONDS = 3.0

# KEYS: the lease. ARGV: holder id, milliseconds. Take it if free (or if it holds garbage
# without an expiry, which would otherwise block every daemon forever), renew it if ours.
_HOLD = """
local kind = redis.call('TYPE', KEYS[1])
if type(kind) == 'table' then kind = kind['ok'] end
if kind ~= 'none' and kind ~= 'string' then redis.call('DEL', KEYS[1]) end
local current = redis.pcall('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if type(current) ~= 'string' or redis.call('PTTL', KEYS[1]) < 0 then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
  return 1
end
return 0
"""

# KEYS: the lease. ARGV: holder id. Delete it only if ours.
_RELEASE = """
if redis.pcall('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def leader_key(names: Names) -> str:
    """The allocator lease of `names`' namespace (named here: only this module uses it)."""
    return f"{names.namespace}:broker:leader"


def holder_id() -> str:
    """An id for this process: host, pid (so an operator can find it) and a random part."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


class Lease:
    """The allocator lease of one namespace, as seen by one broker daemon."""

    def __init__(
        self, client: redis.Redis, names: Names, holder: str, seconds: float = LEASE_SECONDS
    ) -> None:
        """`holder`: this daemon's id (`holder_id()`)."""
        self._r = client
        self.key = leader_key(names)
        self.holder = holder
        self.ms = int(seconds * 1000)
        self._hold: Any = client.register_script(_HOLD)
        self._release: Any = client.register_script(_RELEASE)

    def hold(self) -> bool:
        """Take or renew the lease; True while this daemon holds it."""
        return bool(self._hold(keys=[self.key], args=[self.holder, self.ms]))

    def release(self) -> None:
        """Give the lease up now (if held), so another daemon takes over without waiting."""
        self._release(keys=[self.key], args=[self.holder])

    def current(self) -> str | None:
        """The holder's id, or None when nobody holds it."""
        raw = garbage.tolerant(self.key, self._r.get, None)
        return None if raw is None else as_text(raw)
