"""Counting answered requests in Redis, once each, however often they ran.

A durable session counts a batch's responses before the batch is acknowledged (its `done`
count is what clients and `soafarm responses` trust). An interactive session's counts are
informational (throttling, the autoscaler, `status()`), so they are written up to
MARK_LINGER later, many batches in one Lua call: one Redis round trip per response batch
cost more CPU than the call itself on a loaded 2-core machine.
"""

from __future__ import annotations

import time
from typing import Protocol

import redis
import structlog

log = structlog.get_logger(__name__)

#: Done counts of an interactive session's acknowledged responses reach Redis at most this
#: much later (seconds).
MARK_LINGER = 0.05

Outcomes = list[tuple[int, bool]]  # (request id, faulted)


class Counts(Protocol):
    """What the call loop needs of a session's counters in Redis (soafarm.state.clients)."""

    def answered(self, session_id: int, client_id: str, ids: list[int]) -> set[int]:
        """Which of `ids` already have a response."""
        ...

    def count_attempt(self, session_id: int, client_id: str, request_id: int) -> int:
        """Count one more execution of a redelivered request; returns the count."""
        ...

    def mark(self, session_id: int, client_id: str, outcomes: Outcomes) -> int:
        """Mark (request id, faulted) pairs answered; returns how many were new."""
        ...

    def client_exists(self, session_id: int, client_id: str) -> bool:
        """True while the client id has its counters (not purged, session open)."""
        ...

    def client_user(self, session_id: int, client_id: str) -> str | None:
        """The RabbitMQ user the client id is for (None: none kept)."""
        ...

    def accepted(self, session_id: int, client_id: str) -> int:
        """The client id's recorded accepted count (0 when it has none)."""
        ...

    def session_exists(self, session_id: int) -> bool:
        """True while the session's record exists."""
        ...


class DoneCounter:
    """Marks responses answered, at once or coalesced (see the module docstring)."""

    def __init__(self, counts: Counts) -> None:
        """Count through `counts`; nothing is pending yet."""
        self.counts = counts
        self.pending: dict[tuple[int, str], Outcomes] = {}
        self.pending_since = 0.0

    def now(self, session_id: int, client_id: str, outcomes: Outcomes) -> None:
        """Count these responses before returning."""
        self.counts.mark(session_id, client_id, outcomes)

    def later(self, session_id: int, client_id: str, outcomes: Outcomes) -> None:
        """Count these responses with the next ones, within MARK_LINGER."""
        if not self.pending:
            self.pending_since = time.monotonic()
        self.pending.setdefault((session_id, client_id), []).extend(outcomes)

    def due_in(self) -> float | None:
        """Seconds until the pending counts are due (0: now); None when nothing is pending."""
        if not self.pending:
            return None
        return max(self.pending_since + MARK_LINGER - time.monotonic(), 0.0)

    def flush(self) -> None:
        """Count everything pending, one Lua call per client id. A client id whose counts
        Redis refuses (its keys were overwritten with another type, say) is logged and
        skipped: its responses were delivered, and the other client ids are counted."""
        pending, self.pending = self.pending, {}
        for (session_id, client_id), outcomes in pending.items():
            try:
                self.counts.mark(session_id, client_id, outcomes)
            except redis.ResponseError as e:
                if not refused(e):
                    raise
                log.error(
                    "done_marks_refused",
                    session_id=session_id,
                    client_id=client_id,
                    responses=len(outcomes),
                    error=str(e),
                )


def refused(error: redis.ResponseError) -> bool:
    """True when Redis refused a command for what it was asked (a key of another type, out of
    memory), not because this connection must go (a replica that became read-only in a
    failover: reconnecting finds the new primary)."""
    return not isinstance(error, redis.ReadOnlyError)
