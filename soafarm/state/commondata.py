"""Common data: named values a client attaches to a session once, for every instance to read.

A service that needs market data loads it once per instance, in its constructor, with
`context.common_data("curves")`, instead of receiving it with every request. Values are
msgpack-encoded into Redis (up to `max_common_data_bytes` each) before the session is
created, so an instance never starts before its data exists; the broker adopts the keys
and deletes them with the session.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import msgpack
import redis

from soafarm.errors import ConfigError, DecodeError, EncodeError, MessageTooLarge, SoafarmError
from soafarm.names import Names
from soafarm.state.sessions import SessionStore

#: Uploaded data not adopted by a session within this many seconds expires by itself.
UNADOPTED_TTL = 3600


class CommonDataStore:
    """The common data values of one namespace: uploaded, adopted by a session, read."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` for every common data key of `names`' namespace."""
        self._r = client
        self.names = names

    def upload(self, values: Mapping[str, Any], limit: int) -> dict[str, str]:
        """Store each value under a fresh key; return name -> key for the session to adopt."""
        keys: dict[str, str] = {}
        for name, value in values.items():
            body = _encode(name, value, limit)
            key = self.names.common_data_key(uuid.uuid4().hex)
            self._r.set(key, body, ex=UNADOPTED_TTL)
            keys[name] = key
        return keys

    def adopt(self, key: str) -> bool:
        """Keep an uploaded value for its session's lifetime; False if it already expired."""
        return bool(self._r.persist(key)) or bool(self._r.exists(key))

    def value(self, key: str) -> bytes | None:
        """The encoded value under `key`, or None when it is gone."""
        body = self._r.get(key)
        return body if isinstance(body, bytes) else None


def _encode(name: str, value: Any, limit: int) -> bytes:
    if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
        raise ConfigError(f"common data name {name!r}: use letters, digits, '_', '-', '.'")
    try:
        body: bytes = msgpack.packb(value, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as e:
        raise EncodeError(f"common data {name!r} cannot be encoded with msgpack: {e}") from None
    if len(body) > limit:
        raise MessageTooLarge(
            f"common data {name!r} is {len(body):,} bytes, over max_common_data_bytes ({limit:,})"
        )
    return body


def upload(
    client: redis.Redis, names: Names, values: Mapping[str, Any], limit: int
) -> dict[str, str]:
    """Store each value under a fresh key; return name -> key for the session to adopt."""
    return CommonDataStore(client, names).upload(values, limit)


class CommonDataReader:
    """Instance side: `reader(name)` returns a session's common data value."""

    def __init__(self, client: redis.Redis, names: Names, session_id: int, limit: int) -> None:
        """Read from the session record's `data` keys, decoding at most `limit` bytes."""
        self.sessions = SessionStore(client, names)
        self.data = CommonDataStore(client, names)
        self.session_id = session_id
        self.limit = limit

    def __call__(self, name: str) -> Any:
        """The value of `name`; a SoafarmError naming what exists if there is none."""
        body = self.encoded(name)
        try:
            return msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=False,
                max_bin_len=self.limit,
                max_str_len=self.limit,
            )
        except Exception as e:
            raise DecodeError(f"common data {name!r} is undecodable: {e}") from None

    def encoded(self, name: str) -> bytes:
        """The value of `name` as stored (msgpack); a SoafarmError if there is none."""
        record = self.sessions.get(self.session_id)
        keys = {} if record is None else record.data
        if name not in keys:
            have = ", ".join(sorted(keys)) or "none"
            raise SoafarmError(
                f"session {self.session_id} has no common data named {name!r} (it has: {have})"
            )
        body = self.data.value(keys[name])
        if body is None:
            raise SoafarmError(f"common data {name!r} of session {self.session_id} is gone")
        return body
