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
from soafarm.state.records import SessionRecord

#: Uploaded data not adopted by a session within this many seconds expires by itself.
UNADOPTED_TTL = 3600


def upload(
    client: redis.Redis, names: Names, values: Mapping[str, Any], limit: int
) -> dict[str, str]:
    """Store each value under a fresh key; return name -> key for the session to adopt."""
    keys: dict[str, str] = {}
    for name, value in values.items():
        if not name or not name.replace("_", "").replace("-", "").replace(".", "").isalnum():
            raise ConfigError(f"common data name {name!r}: use letters, digits, '_', '-', '.'")
        try:
            body = msgpack.packb(value, use_bin_type=True)
        except (TypeError, ValueError, OverflowError) as e:
            raise EncodeError(f"common data {name!r} cannot be encoded with msgpack: {e}") from None
        if len(body) > limit:
            raise MessageTooLarge(
                f"common data {name!r} is {len(body):,} bytes, over max_common_data_bytes "
                f"({limit:,})"
            )
        key = names.common_data_key(uuid.uuid4().hex)
        client.set(key, body, ex=UNADOPTED_TTL)
        keys[name] = key
    return keys


class CommonDataReader:
    """Instance side: `reader(name)` returns a session's common data value."""

    def __init__(self, client: redis.Redis, names: Names, session_id: int, limit: int) -> None:
        """Read from the session record's `data` keys, decoding at most `limit` bytes."""
        self.r = client
        self.names = names
        self.session_id = session_id
        self.limit = limit

    def __call__(self, name: str) -> Any:
        """The value of `name`; a SoafarmError naming what exists if there is none."""
        raw = self.r.get(self.names.session_key(self.session_id))
        keys = {} if raw is None else SessionRecord.from_json(raw).data
        if name not in keys:
            have = ", ".join(sorted(keys)) or "none"
            raise SoafarmError(
                f"session {self.session_id} has no common data named {name!r} (it has: {have})"
            )
        body = self.r.get(keys[name])
        if not isinstance(body, bytes):
            raise SoafarmError(f"common data {name!r} of session {self.session_id} is gone")
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
