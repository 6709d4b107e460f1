"""Redis URLs, including Redis Sentinel's: where a component's Redis client connects.

`redis://` and `rediss://` name one server. `redis+sentinel://` names the Sentinels that
watch a master, and the master's name:

    redis+sentinel://[[user]:password@]host1:26379,host2:26379,host3:26379/mymaster[/db]

The password (and user) is the master's; the Sentinels are asked without one. A client made
from it asks the Sentinels for the master at connect and again after a lost connection or a
READONLY reply, so a failover is an outage the callers already ride out (it reconnects
within `client.reconnect_timeout`, to the promoted replica).
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from soafarm.errors import ConfigError

SENTINEL_SCHEME = "redis+sentinel"
SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelUrl:
    """A `redis+sentinel://` URL, parsed."""

    sentinels: tuple[tuple[str, int], ...]
    master: str
    db: int
    username: str | None
    password: str | None


def is_sentinel(url: str) -> bool:
    """Whether `url` names Sentinels rather than one server."""
    return url.split("://", 1)[0].lower() == SENTINEL_SCHEME


def parse_sentinel_url(url: str) -> SentinelUrl:
    """Parse a `redis+sentinel://` URL; a ConfigError says what is wrong with it."""
    parts = urlsplit(url)
    userinfo, _, hosts = parts.netloc.rpartition("@")
    username, _, password = userinfo.partition(":")
    sentinels = []
    for item in hosts.split(","):
        host, _, port = item.strip().rpartition(":") if ":" in item else (item.strip(), "", "")
        if not host or (port and not port.isdigit()):
            raise ConfigError(
                f"redis_url: Sentinel {item!r} must be host:port "
                "(redis+sentinel://host1:26379,host2:26379/mymaster/0)"
            )
        sentinels.append((host.strip("[]"), int(port) if port else SENTINEL_PORT))
    path = [p for p in parts.path.split("/") if p]
    if not path or len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ConfigError(
            "redis_url: a Sentinel URL names the master, then optionally the db "
            "(redis+sentinel://host1:26379,host2:26379/mymaster/0)"
        )
    return SentinelUrl(
        tuple(sentinels),
        unquote(path[0]),
        int(path[1]) if len(path) == 2 else 0,
        unquote(username) or None,
        unquote(password) or None,
    )
