"""The one back-off of every reconnect loop: doubling delays with jitter, capped.

Jitter matters when RabbitMQ or Redis comes back: without it every instance of a farm
reconnects in the same instant, in lock-step, after each doubling.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable
from typing import TypeVar

import structlog

log = structlog.get_logger(__name__)

T = TypeVar("T")

#: Seconds before the first retry, and the most between two.
FIRST = 0.5
CAP = 5.0
#: Each delay is drawn from [delay * (1 - JITTER), delay * (1 + JITTER)].
JITTER = 0.25


class Backoff:
    """Delays for successive retries; `reset()` after a success."""

    def __init__(self, first: float = FIRST, cap: float = CAP, jitter: float = JITTER) -> None:
        """Start at `first` seconds, double up to `cap`, spread by ±`jitter` (a fraction)."""
        self.first = first
        self.cap = cap
        self.jitter = jitter
        self.current = first

    def next(self) -> float:
        """The delay before the next retry (and double the one after it)."""
        base = self.current
        self.current = min(self.current * 2, self.cap)
        return base * random.uniform(1 - self.jitter, 1 + self.jitter)

    def reset(self) -> None:
        """The connection works again: the next failure starts from `first`."""
        self.current = self.first


class Outage:
    """Retrying through one outage of RabbitMQ or Redis, for at most `limit` seconds.

    A client loop calls `retry(error)` after each failed attempt: it waits the next back-off
    delay, or, once the first failure of this outage is `limit` seconds old, raises what
    `give_up(error, seconds)` makes of it. `recovered()` after a success ends the outage (and
    says whether there was one: a reader then checks what the server may have lost).
    """

    def __init__(
        self,
        limit: float,
        give_up: Callable[[BaseException, float], BaseException],
        *,
        backoff: Backoff | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        """`limit` in seconds (`client.reconnect_timeout`); `clock` and `sleep` are the
        monotonic clock and the wait (tests pass fakes)."""
        self.limit = limit
        self.give_up = give_up
        self.backoff = backoff or Backoff(first=0.2, cap=2.0)
        self.clock = clock
        self.sleep = sleep
        #: When the current outage began (None: no outage).
        self.since: float | None = None
        #: Outages ridden out so far (for logs and tests).
        self.count = 0

    @property
    def down(self) -> bool:
        """True between a failure and the next `recovered()`."""
        return self.since is not None

    def retry(self, error: BaseException) -> None:
        """After a failed attempt: wait before the next one, or raise past the limit."""
        now = self.clock()
        if self.since is None:
            self.since = now
            self.count += 1
            log.warning("connection_lost_retrying", error=_describe(error), limit=self.limit)
        waited = now - self.since
        if waited >= self.limit:
            raise self.give_up(error, waited) from None
        self.sleep(min(self.backoff.next(), self.limit - waited))

    def run(self, call: Callable[[], T], errors: tuple[type[BaseException], ...]) -> T:
        """`call()`, tried again through an outage while it raises one of `errors`."""
        while True:
            try:
                result = call()
            except errors as e:
                self.retry(e)
                continue
            self.recovered()
            return result

    def recovered(self) -> bool:
        """An attempt succeeded: end the outage; True if there was one."""
        if self.since is None:
            return False
        log.info("connection_recovered", after=round(self.clock() - self.since, 2))
        self.since = None
        self.backoff.reset()
        return True

    def elapsed(self) -> float:
        """Seconds since the current outage began (0 without one)."""
        return 0.0 if self.since is None else self.clock() - self.since


def _describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__
