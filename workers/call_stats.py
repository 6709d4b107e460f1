"""Counts of an instance's calls, for its host's metrics: a histogram of call durations,
faults and retries. Kept in the call threads as plain numbers (a call pays for one bisect
and a few additions) and sent to the host with the instance's load report each second."""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass, field


@dataclass
class CallStats:
    """One call loop's totals since its instance started."""

    #: Upper bounds (seconds) of the histogram's buckets; a last, unbounded one is implied.
    bounds: tuple[float, ...]
    #: Calls per bucket (not cumulative): len(bounds) + 1 entries.
    buckets: list[int] = field(default_factory=list)
    seconds: float = 0.0
    faults: int = 0
    #: Requests run again after a redelivery (their instance crashed, timed out or lost its
    #: host), and those answered with RetryLimitExceeded instead.
    retries: int = 0

    def __post_init__(self) -> None:
        """Empty buckets."""
        if not self.buckets:
            self.buckets = [0] * (len(self.bounds) + 1)

    def record(self, seconds: float, faulted: bool) -> None:
        """One call took `seconds`; `faulted` if it answered with a fault."""
        # bisect_left: a call of exactly a bound's length falls in that bound's bucket (le)
        self.buckets[bisect_left(self.bounds, seconds)] += 1
        self.seconds += seconds
        if faulted:
            self.faults += 1

    @property
    def calls(self) -> int:
        """Calls recorded."""
        return sum(self.buckets)


def merged(stats: list[CallStats], bounds: tuple[float, ...]) -> CallStats:
    """The totals of several loops' stats (all with `bounds`)."""
    out = CallStats(bounds)
    for s in stats:
        out.buckets = [a + b for a, b in zip(out.buckets, s.buckets, strict=True)]
        out.seconds += s.seconds
        out.faults += s.faults
        out.retries += s.retries
    return out
