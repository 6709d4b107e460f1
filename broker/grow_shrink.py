"""Grow and shrink per session: each session's target units follow its load ratio, with the
seeds' thresholds and interval (pure functions, no I/O).

load ratio = 100 x outstanding / (units held x calls one unit runs at once). Above
`allocation_grow_load_ratio_threshold` (125) the target grows at the next allocation round to
the units its outstanding work can keep busy (never above `max_units`): waiting with work
queued helps nobody. Below `allocation_shrink_load_ratio_threshold` (75) it shrinks to that
number (never below `min_units`), at most once per `allocation_adjust_interval` (60 s): an
instance handed back costs a service start when the work returns. A new session's target is
its maximum (it starts with what the farm can give), so an idle one hands its spare units to
busy ones one interval after it went quiet.
"""

from __future__ import annotations

import dataclasses
import math

from soafarm.resources import UNBOUNDED_UNITS
from soafarm.state.records import SessionRecord, SessionStatus


def load_ratio(outstanding: int, units: int, capacity: int) -> int | None:
    """100 x outstanding / (units x capacity), rounded; None with no unit."""
    if units <= 0:
        return None
    return round(100 * outstanding / (units * max(capacity, 1)))


def needed_units(record: SessionRecord, outstanding: int, capacity: int, ceiling: int) -> int:
    """Units that keep the outstanding work busy at a load ratio of 100, within the session's
    min_units..max_units and never above `ceiling` (the farm's units)."""
    need = math.ceil(outstanding / max(capacity, 1))
    return max(record.min_units, min(record.max_units, ceiling, need))


def next_status(
    record: SessionRecord,
    previous: SessionStatus | None,
    *,
    units: int,
    outstanding: int,
    capacity: int,
    now: float,
    ceiling: int = UNBOUNDED_UNITS,
) -> SessionStatus:
    """The session's status after this round: its target units and why.

    `units`: instances it holds now; `capacity`: calls one of its units runs at once;
    `ceiling`: units of its kind the farm has now (a target above them means nothing).
    """
    settings = record.broker_settings
    ratio = load_ratio(outstanding, units, capacity)
    top = max(record.min_units, min(record.max_units, ceiling))
    if previous is None:
        return SessionStatus(top, load_ratio=ratio, changed=now, written=now)
    if (
        outstanding == 0
        and ratio == previous.load_ratio
        and record.min_units <= previous.target <= record.max_units
        and (
            previous.target == record.min_units
            or now - previous.changed < settings.allocation_adjust_interval
        )
    ):
        return previous  # idle, and not due to shrink: most sessions of a big farm
    target = max(record.min_units, min(record.max_units, previous.target))
    need = needed_units(record, outstanding, capacity, ceiling)
    reason, changed = previous.reason, previous.changed
    busy = ratio is None and outstanding > 0
    if (busy or (ratio or 0) > settings.allocation_grow_load_ratio_threshold) and need > target:
        shown = "no unit yet" if ratio is None else f"load {ratio}%"
        reason = (
            f"{shown} above {settings.allocation_grow_load_ratio_threshold}%: "
            f"grew from {target} to {need} units"
        )
        target, changed = need, now
    elif need < target and now - previous.changed >= settings.allocation_adjust_interval:
        # measured against the target, not the units held: a session the farm could not
        # give its target yet must hand back its claim too
        held = load_ratio(outstanding, target, capacity) or 0
        if held < settings.allocation_shrink_load_ratio_threshold:
            reason = (
                f"load {held}% of its {target} units below "
                f"{settings.allocation_shrink_load_ratio_threshold}%: shrank to {need}"
            )
            target, changed = need, now
    if (target, reason, ratio, changed) == (
        previous.target,
        previous.reason,
        previous.load_ratio,
        previous.changed,
    ):
        return previous  # the common case, an idle session: no new object a round
    return dataclasses.replace(
        previous, target=target, reason=reason, load_ratio=ratio, changed=changed
    )


def worth_writing(
    new: SessionStatus, old: SessionStatus | None, now: float, interval: float
) -> bool:
    """Whether to write `new` now: at once when the target or reason changed, else when the
    load ratio changed and the last write is `status_update_interval` old."""
    if old is None or (new.target, new.reason, new.waiting) != (
        old.target,
        old.reason,
        old.waiting,
    ):
        return True
    return new.load_ratio != old.load_ratio and now - old.written >= interval
