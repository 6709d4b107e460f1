"""The admin role granted at run time: a set of RabbitMQ user names in Redis.

Admins named in the broker's settings (`security.admins`) and the broker daemon's own user
are admins whatever this set holds; `soafarm admin grant|revoke` edits only the set, so a
revoke cannot lock the farm's operators out.
"""

from __future__ import annotations

import redis

from soafarm.names import Names
from soafarm.state.records import as_text


class AdminStore:
    """The granted admins of one namespace."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for `names.admins_key`."""
        self._client = client
        self._key = names.admins_key

    def has(self, user: str) -> bool:
        """Whether `user` was granted the admin role."""
        return bool(self._client.sismember(self._key, user))

    def granted(self) -> tuple[str, ...]:
        """Every granted user, sorted."""
        return tuple(sorted(as_text(u) for u in self._client.smembers(self._key)))

    def grant(self, user: str) -> None:
        """Give `user` the admin role (harmless if it has it)."""
        self._client.sadd(self._key, user)

    def revoke(self, user: str) -> None:
        """Take the granted admin role from `user` (harmless if it has none)."""
        self._client.srem(self._key, user)
