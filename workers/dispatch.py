"""How much of a request batch a call loop keeps: only what it can start about now.

Requests travel in batches (one AMQP message for up to 100 of them) because a round trip per
request caps tiny calls at a few thousand per second. A batch must never make calls that
take time wait, though: a loop that held 8 one-second calls would run them one after another
while the session's other units idle. So before each call a loop keeps the longest prefix of
its unstarted requests whose expected duration fits KEEP_WORK (at least one request) and
hands the rest back to the session's queue at once, where every idle unit (another call
loop, another instance, another host) takes it. Expected durations are a moving average per
operation of this loop's own calls; an operation never seen counts as long, so a loop's
first batch keeps one request. Echo-sized calls fit a whole batch in KEEP_WORK and are never
split; calls of 50 ms or more are kept one at a time. What is handed back goes in pieces that
each fit KEEP_WORK, so the unit that takes a piece starts all of it instead of handing most of
it back again.

A call that turns out long while requests of its batch wait (the estimate was wrong: one slow
call among fast ones) is covered by the instance's main thread, which hands those back
during the call (`CallLoop.keep_alive`).
"""

from __future__ import annotations

from collections.abc import Iterable

from soafarm.protocol import Request

#: Seconds of expected work a loop keeps from a batch before handing the rest back.
KEEP_WORK = 0.02
#: Weight of the newest call in an operation's moving average.
SMOOTHING = 0.3


class CallTimes:
    """Moving averages of call durations, per operation, of one call loop."""

    def __init__(self) -> None:
        """No operation seen yet."""
        self.mean: dict[str, float] = {}

    def record(self, op: str, seconds: float) -> None:
        """A call of `op` took `seconds`."""
        old = self.mean.get(op)
        self.mean[op] = seconds if old is None else old + SMOOTHING * (seconds - old)

    def keep(self, requests: Iterable[Request], budget: float = KEEP_WORK) -> int:
        """How many of `requests` (in order) to keep: the longest prefix expected to take at
        most `budget` seconds, never fewer than one."""
        total = 0.0
        kept = 0
        for request in requests:
            expected = self.mean.get(request.op)
            if expected is None:
                return max(kept, 1)  # never seen: it may be long
            total += expected
            if total > budget:
                return max(kept, 1)
            kept += 1
        return kept

    def piece(self, requests: list[Request], budget: float = KEEP_WORK) -> int:
        """How many of `requests` to hand back together: what another unit can start at once
        (`keep`), or all of them when the first one's operation was never seen here (its
        taker learns how long it takes)."""
        if requests and requests[0].op not in self.mean:
            return len(requests)
        return self.keep(requests, budget)
