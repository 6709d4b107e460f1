"""Rates and times left, for live progress (`submit`, `attach --follow`, `responses
--follow`) and the farm views (`soafarm dashboard`, `soafarm top`): one way to measure and
print them everywhere."""

from __future__ import annotations

from collections import deque
from collections.abc import Hashable, Iterable

#: Seconds of samples the rate is measured over: recent enough to follow a change of pace,
#: long enough not to jump with every poll.
RATE_WINDOW = 10.0


class RateMeter:
    """Count per second over the last `window` seconds of samples, and the time left."""

    def __init__(self, window: float = RATE_WINDOW) -> None:
        """An empty meter: no rate until two samples are some time apart."""
        self.window = window
        self._samples: deque[tuple[float, int]] = deque()

    def add(self, now: float, count: int) -> None:
        """Record that `count` (a running total) was reached at `now` (monotonic seconds)."""
        if len(self._samples) >= 2 and now - self._samples[-2][0] < self.window / 50:
            self._samples[-1] = (now, count)  # a sample per request would pile up: coalesce
        else:
            self._samples.append((now, count))
        # keep one sample older than the window, so the rate always spans the whole window
        while len(self._samples) > 2 and self._samples[1][0] <= now - self.window:
            self._samples.popleft()

    def rate(self) -> float | None:
        """Per second over the last `window` seconds before the latest sample (or since the
        first sample, when younger); None before two samples in time."""
        if len(self._samples) < 2:
            return None
        (t0, c0), (t1, c1) = self._samples[0], self._samples[-1]
        # the count is a step function: at the window's start it was the count of the last
        # sample before it (the oldest kept, the next one being inside the window)
        t0 = max(t0, t1 - self.window)
        if t1 <= t0:
            return None
        return max(c1 - c0, 0) / (t1 - t0)

    def eta(self, remaining: int | None) -> float | None:
        """Seconds until `remaining` more at the current rate: 0 when nothing remains, None
        when it is unknown (no total yet, no rate yet, nothing moving)."""
        return None if remaining is None else eta(remaining, self.rate())


def eta(remaining: int, rate: float | None) -> float | None:
    """Seconds until `remaining` more arrive at `rate` a second: 0 with nothing remaining,
    None when the rate is unknown or zero (nothing moves: no estimate)."""
    if remaining <= 0:
        return 0.0
    if rate is None or rate <= 0:
        return None
    return remaining / rate


class RateTracker:
    """A `RateMeter` per key (a session, or a session's client id), fed with done counts.

    A count that goes down (its client id was purged and made again) starts the key afresh;
    `forget_others(keys)` drops keys that are gone, so a long-running view does not keep
    every session it ever saw.
    """

    def __init__(self, window: float = RATE_WINDOW) -> None:
        """Keep `window` seconds of samples per key."""
        self.window = window
        self._meters: dict[Hashable, tuple[RateMeter, float, int]] = {}

    def observe(self, key: Hashable, done: int, now: float) -> float | None:
        """Record `done` at `now` (monotonic seconds) for `key`; return its rate over the
        window, or None when not known yet."""
        meter, last_t, last_done = self._meters.get(key, (None, 0.0, 0))
        if meter is None or done < last_done or now < last_t:
            meter = RateMeter(self.window)
        meter.add(now, done)
        self._meters[key] = (meter, now, done)
        return meter.rate()

    def forget_others(self, keys: Iterable[Hashable]) -> None:
        """Drop the history of every key not in `keys`."""
        keep = set(keys)
        for key in [k for k in self._meters if k not in keep]:
            del self._meters[key]


def format_rate(rate: float | None) -> str:
    """`1,234.5`, or `-` when unknown."""
    return "-" if rate is None else f"{rate:,.1f}"


def format_eta(seconds: float | None, nothing_left: str = "0s") -> str:
    """`45s`, `3m05s`, `2h03m`, `-` when unknown, `nothing_left` at 0."""
    if seconds is None:
        return "-"
    if seconds <= 0:
        return nothing_left
    whole = round(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    return f"{whole // 3600}h{whole // 60 % 60:02d}m"
