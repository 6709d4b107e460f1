"""Values in Redis that cannot be decoded: logged once, then skipped by every reader.

A record someone wrote by hand, a half-applied migration or a bug elsewhere must not stop the
broker daemon or a worker host (issue 15: six kinds of garbage made the daemon exit at every
restart). Each store decodes through `decode_or_skip`-style helpers that report here and go
on without the value; the broker's leader removes what it can safely remove (junk set
members, records of hosts that are gone), and leaves session records for an operator
(`soafarm sessions close N --purge` or `soafarm namespace delete`), since they may hold the
only pointer to a session's queues.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import redis
import structlog

log = structlog.get_logger(__name__)

#: Distinct (key, why) pairs remembered per process; past this the memory starts over (a
#: namespace flooded with garbage logs it again rather than growing without bound).
_MAX_REMEMBERED = 10_000

_seen: set[tuple[str, str]] = set()
_lock = threading.Lock()


def report(key: str, why: str, value: Any = None) -> bool:
    """Log that the value at `key` (a field or member may be named in `why`) cannot be used;
    once per process per (key, why). Returns True when this call logged."""
    with _lock:
        if (key, why) in _seen:
            return False
        if len(_seen) >= _MAX_REMEMBERED:
            _seen.clear()
        _seen.add((key, why))
    log.warning("redis_garbage_skipped", key=key, error=why, value=_shown(value))
    return True


def forget_reports() -> None:
    """Start over (tests: each expects its own first report)."""
    with _lock:
        _seen.clear()


def is_wrong_type(error: redis.RedisError) -> bool:
    """True for Redis's WRONGTYPE reply: the key holds another kind of value than expected."""
    return isinstance(error, redis.ResponseError) and str(error).startswith("WRONGTYPE")


def tolerant(key: str, read: Callable[[str], Any], default: Any) -> Any:
    """`read(key)`, or `default` when the key holds the wrong type of value (reported)."""
    try:
        return read(key)
    except redis.ResponseError as e:
        if not is_wrong_type(e):
            raise
        report(key, "holds the wrong type of value", str(e))
        return default


def reply(key: str, value: Any, default: Any) -> Any:
    """One reply of a pipeline run with `raise_on_error=False`: the value, or `default` when
    the key holds the wrong type of value (reported); any other error is raised."""
    if isinstance(value, redis.ResponseError) and is_wrong_type(value):
        report(key, "holds the wrong type of value", str(value))
        return default
    if isinstance(value, Exception):
        raise value
    return value


def as_int(value: Any, key: str, field: str) -> int:
    """An integer counter read from Redis; garbage (reported) counts as 0."""
    if value is None:
        return 0
    try:
        text = value.decode() if isinstance(value, bytes) else str(value)
        return int(text)
    except (ValueError, UnicodeDecodeError):
        report(key, f"{field} is not an integer", value)
        return 0


def _shown(value: Any) -> str | None:
    if value is None:
        return None
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "..."
