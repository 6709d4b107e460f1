"""The one back-off of every reconnect loop: doubling delays with jitter, capped.

Jitter matters when RabbitMQ or Redis comes back: without it every instance of a farm
reconnects in the same instant, in lock-step, after each doubling.
"""

from __future__ import annotations

import random

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
