"""The whole of a namespace's Redis state, for tearing down a private farm."""

from __future__ import annotations

import redis

from soafarm.names import Names


def delete_namespace_keys(client: redis.Redis, names: Names) -> int:
    """Delete every key of `names`' namespace (a private test or demo farm's); returns how
    many there were. Only for namespaces nobody else uses: it drops open sessions' state."""
    keys = list(client.scan_iter(match=f"{names.namespace}:*", count=1000))
    if keys:
        client.delete(*keys)
    return len(keys)
