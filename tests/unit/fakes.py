"""In-memory Redis for unit tests: the real stores of soafarm.state over fakeredis.

The stores are tested as they run (same commands, same Lua scripts), only without a server:
a test gets a fresh, empty Redis in microseconds. fakeredis runs scripts with lupa; its
default Lua 5.1 runtime has no `bit` library, which real Redis embeds and our counting
scripts use, so scripts run on lupa's LuaJIT, whose built-in `bit` is the same BitOp API.
"""

from __future__ import annotations

# LuaJIT first: fakeredis loads Lua 5.1 with its C symbols global, and a LuaJIT loaded
# after it would open Lua 5.1's standard libraries (no `bit`) instead of its own
import lupa.luajit21

# isort: split
from typing import Any

import fakeredis
import fakeredis.commands_mixins.scripting_mixin as _scripting
import redis

from soafarm.names import Names

# before any FakeServer makes its Lua runtime (one per server, made at its first script)
_scripting.LUA_MODULE = lupa.luajit21

NAMES = Names("unit")


def fake_redis() -> redis.Redis:
    """A fresh, empty in-memory Redis, typed as the real client the stores take."""
    client: redis.Redis = fakeredis.FakeRedis(server=fakeredis.FakeServer())
    has_bit: Any = client.register_script("return type(bit)")
    if has_bit() != b"table":  # fail here, not in a store's script
        raise RuntimeError("fakeredis runs Lua without Redis's `bit` library")
    return client
