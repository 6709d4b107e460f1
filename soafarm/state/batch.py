"""Reads of several keys, from several stores, sent to Redis in one round trip.

A store's `read_*` method adds its commands to a `Batch` and returns a `Later`; `run()` sends
every command in one pipeline (no MULTI: these are reads, or idempotent trims) and decodes
each reply with the store's own rules (`soafarm.state.garbage`), so a value a store cannot
use is skipped exactly as its one-key method would skip it. The broker daemon's round reads
a few keys per open session: one round trip for all of them instead of one per key keeps the
round's cost from growing with the Redis latency times the number of sessions.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

import redis

T = TypeVar("T")

_UNSET: Any = object()


class Later(Generic[T]):
    """A value a `Batch` fills in when it runs: the decoded reply, or the error decoding
    it raised, raised again where the value is used (as the one-key read would raise it)."""

    __slots__ = ("_error", "_value")

    def __init__(self) -> None:
        """Empty until its batch has run."""
        self._value: Any = _UNSET
        self._error: BaseException | None = None

    @property
    def value(self) -> T:
        """The decoded reply (RuntimeError before the batch ran)."""
        if self._error is not None:
            raise self._error
        if self._value is _UNSET:
            raise RuntimeError("read before its batch ran")
        result: T = self._value
        return result

    def set(self, value: T) -> None:
        """Fill in the value (the batch does this)."""
        self._value = value

    def fail(self, error: BaseException) -> None:
        """Hold the error `value` raises (the batch does this)."""
        self._error = error


class Batch:
    """Commands queued by stores, sent together by `run()`."""

    def __init__(self, client: redis.Redis) -> None:
        """Queue commands for `client`."""
        self.pipe: Any = client.pipeline(transaction=False)
        self._decoders: list[tuple[int, int, Callable[[list[Any]], None]]] = []

    def __len__(self) -> int:
        """Commands queued so far."""
        return len(self.pipe)

    def add(self, queue: Callable[[Any], object], decode: Callable[[list[Any]], T]) -> Later[T]:
        """Queue the commands `queue(pipeline)` adds; once run, the returned `Later` holds
        `decode(their replies)` (replies may be exceptions: `raise_on_error=False`)."""
        start = len(self.pipe)
        queue(self.pipe)
        later: Later[T] = Later()

        def fill(replies: list[Any]) -> None:
            try:
                later.set(decode(replies))
            except Exception as e:  # this read's error, for whoever uses its value
                later.fail(e)

        self._decoders.append((start, len(self.pipe), fill))
        return later

    def run(self) -> None:
        """Send every queued command in one round trip and decode the replies in order. A
        lost connection raises here; an error of one reply (a key holding a value no store
        expected) is raised where that read's value is used."""
        replies: list[Any] = self.pipe.execute(raise_on_error=False) if len(self.pipe) else []
        decoders, self._decoders = self._decoders, []
        for start, end, fill in decoders:
            fill(replies[start:end])
