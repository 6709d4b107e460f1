"""Which hosts run how many service instances of which session: pure functions, no I/O.

Each session gets at least `min_units` in priority order (then by age), then what is left is
shared out one unit at a time, never above `max_units`. Placement keeps instances where they
already run, so a reconcile with nothing new changes nothing.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

Assignments = dict[str, dict[int, int]]  # host id -> session id -> instances


@dataclass(frozen=True)
class Demand:
    """What one session asks for."""

    session_id: int
    min_units: int
    max_units: int
    priority: int


def targets(capacity: int, demands: list[Demand]) -> dict[int, int]:
    """Units per session given `capacity` free units in total."""
    order = sorted(demands, key=lambda d: (-d.priority, d.session_id))
    out = {d.session_id: 0 for d in order}
    left = capacity
    for d in order:  # minimums first, by priority; a minimum is met whole or not at all
        if 0 < d.min_units <= left:
            out[d.session_id] = d.min_units
            left -= d.min_units
    # a session whose minimum is not met waits (queued) rather than run below it
    growing = [
        d
        for d in order
        if out[d.session_id] < d.max_units and (out[d.session_id] > 0 or d.min_units == 0)
    ]
    while left > 0 and growing:  # then share the rest evenly, highest priority first
        for d in list(growing):
            if left == 0:
                break
            out[d.session_id] += 1
            left -= 1
            if out[d.session_id] >= d.max_units:
                growing.remove(d)
    return out


def place(
    cores: Mapping[str, int],
    current: Mapping[str, Mapping[int, int]],
    wanted: Mapping[int, int],
    excluded: Mapping[int, set[str]] | None = None,
) -> Assignments:
    """Spread each session's wanted units over hosts, keeping existing instances in place and
    never using a host `excluded` for the session (its service failed to load there)."""
    excluded = excluded or {}
    result: Assignments = {h: {} for h in cores}
    placed: dict[int, int] = dict.fromkeys(wanted, 0)
    for host in sorted(cores):  # keep what runs, up to what is still wanted
        for sid, n in sorted(current.get(host, {}).items()):
            if host in excluded.get(sid, set()):
                continue
            keep = min(n, wanted.get(sid, 0) - placed.get(sid, 0))
            if keep > 0:
                result[host][sid] = keep
                placed[sid] += keep
    free = {h: cores[h] - sum(result[h].values()) for h in cores}
    for sid in sorted(wanted):
        need = wanted[sid] - placed[sid]
        usable = sorted(h for h in free if h not in excluded.get(sid, set()))
        while need > 0:
            roomiest: str | None = max(usable, key=lambda h: free[h], default=None)
            if roomiest is None or free[roomiest] <= 0:
                break
            result[roomiest][sid] = result[roomiest].get(sid, 0) + 1
            free[roomiest] -= 1
            need -= 1
    return result
