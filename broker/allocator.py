"""Which hosts run how many service instances of which session: pure functions, no I/O.

Each session gets at least `min_units`, in priority order (then by age); a starting
session's minimum is met whole or the session waits (queued); a running one keeps what it
can get. What is left goes one unit at a time, never above the session's `max_units` (its
grow/shrink target, `broker.grow_shrink`): in `queued` mode to the sessions in order of
priority, then age, each up to its maximum before the next gets more; in `balanced` mode
shared in proportion to outstanding work. A unit occupies 1 core, a socket's cores or a
whole host, by the session's resource unit. Placement keeps instances where they already
run, so a round with nothing new changes nothing, and packs new ones onto the fullest host
that has room. An offline host keeps what it runs and takes nothing new.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping
from dataclasses import dataclass

from soafarm.resources import HostSize, unit_cores, units_per_host

Assignments = dict[str, dict[int, int]]  # host id -> session id -> instances


# slots, not frozen: the leader builds one per open session four times a second, and a
# frozen dataclass's __init__ costs 7x more (2.1 vs 0.3 us); nothing mutates one
@dataclass(slots=True)
class Demand:
    """What one session asks for."""

    session_id: int
    min_units: int
    max_units: int
    priority: int
    unit: str = "core"
    #: Requests sent and not answered yet: the weight of the session's share of spare units.
    outstanding: int = 0
    #: Already running: it keeps what it can get, even below `min_units` (a lost host must
    #: not stop the rest of its instances); only a starting session waits for its minimum.
    running: bool = False


def weight(outstanding: int) -> int:
    """A session's share weight: outstanding work, rounded to a power of two.

    The rounding is hysteresis: counts drift every second, and an instance moved between
    sessions costs a service start, so only a change of about 2x moves units.
    """
    return int(2 ** round(math.log2(outstanding + 1)))


class _Plan:
    """Placements being built, with the cores left on each host.

    A unit goes to a host where its session runs now and has fewer placed so far (no
    move), else to the fullest host with room. The fullest are found in a heap of (cores
    left, host id) rather than by a scan of every host per unit: at 1,000 hosts x 100 cores
    the scan made the first round of 100 sessions 47 s. Entries go stale as hosts fill and
    are dropped when met; the heap holds only hosts that take new instances, and a full
    host leaves it (the fullest of all, it would otherwise be met first by every unit).
    """

    def __init__(
        self,
        hosts: Mapping[str, HostSize],
        current: Mapping[str, Mapping[int, int]],
        excluded: Mapping[int, set[str]],
        offline: frozenset[str] | set[str] = frozenset(),
    ) -> None:
        self.hosts = hosts
        self.current = current
        self.excluded = excluded
        self.offline = offline
        self.free = {h: s.cores for h, s in hosts.items()}
        self.result: Assignments = {h: {} for h in hosts}
        self.units: dict[int, int] = {}
        self.cores: dict[int, int] = {}
        #: session id -> the hosts it runs on now (where placing it moves nothing)
        self.running_on: dict[int, list[str]] = {}
        for h, assignment in current.items():
            if h in hosts:
                for sid, n in assignment.items():
                    if n > 0:
                        self.running_on.setdefault(sid, []).append(h)
        #: (cores left, host id) of every host that may take a new instance; stale entries
        #: (the host's cores left changed since) are skipped
        self.fullest = [(free, h) for h, free in self.free.items() if self._takes(h)]
        heapq.heapify(self.fullest)
        #: hosts on which some unit could still be placed (see `has_room`)
        self.roomy = sum(1 for h in hosts if self._room(h))

    def _room(self, h: str) -> bool:
        """Whether some unit fits on `h` still: it has cores left, or has none at all (a
        node unit of a host of 0 cores takes none)."""
        return self.free[h] > 0 or self.hosts[h].cores <= 0

    def _takes(self, h: str) -> bool:
        """Whether `h` belongs in the heap of hosts that take new instances."""
        return h not in self.offline and self._room(h)

    def _fits(self, sid: int, unit: str, h: str) -> bool:
        size = self.hosts[h]
        return not (
            h in self.excluded.get(sid, ())
            or self.result[h].get(sid, 0) >= units_per_host(unit, size)
            or self.free[h] < unit_cores(unit, size)
        )

    def _kept_host(self, sid: int, unit: str) -> str | None:
        """The fullest host where `sid` runs now with fewer placed yet, that fits a unit."""
        best: tuple[int, str] | None = None
        for h in self.running_on.get(sid, ()):
            placed_all = self.result[h].get(sid, 0) >= self.current[h][sid]
            if placed_all or not self._fits(sid, unit, h):
                continue
            if best is None or (self.free[h], h) < best:
                best = (self.free[h], h)
        return None if best is None else best[1]

    def _fullest_host(self, sid: int, unit: str) -> str | None:
        """The fullest host (then the first by id) that takes a new unit of `sid`."""
        passed = []
        found = None
        while self.fullest:
            free, h = self.fullest[0]
            if free != self.free[h]:
                heapq.heappop(self.fullest)  # stale: the host's current entry is also in
                continue
            if self._fits(sid, unit, h):
                found = h
                break
            passed.append(heapq.heappop(self.fullest))  # not for this session: put back
        for entry in passed:
            heapq.heappush(self.fullest, entry)
        return found

    def add(self, demand: Demand) -> bool:
        """Place one more unit of `demand`, preferring a host where one already runs, then
        the fullest that has room (packing leaves whole hosts free, for node units and for
        the autoscaler to shrink); False when no host has room."""
        sid, unit = demand.session_id, demand.unit
        host = self._kept_host(sid, unit) or self._fullest_host(sid, unit)
        if host is None:
            return False
        self.place(sid, unit, host)
        return True

    def place(self, sid: int, unit: str, host: str) -> None:
        """Record one unit of session `sid` on `host`."""
        cost = unit_cores(unit, self.hosts[host])
        self.result[host][sid] = self.result[host].get(sid, 0) + 1
        self._take(host, cost)
        self.units[sid] = self.units.get(sid, 0) + 1
        self.cores[sid] = self.cores.get(sid, 0) + cost

    def _take(self, host: str, cost: int) -> None:
        """`cost` cores of `host` used (negative: given back)."""
        had_room = self._room(host)
        self.free[host] -= cost
        if cost and self._takes(host):  # a full host leaves the heap for good
            heapq.heappush(self.fullest, (self.free[host], host))
        self.roomy += self._room(host) - had_room

    def has_room(self) -> bool:
        """False once no unit of any kind can be placed: every host is full and every unit
        there takes a core at least (a node unit on a host of 0 cores takes none). Without
        it, each of 1,000 idle sessions would be tried, in vain, once a round."""
        return self.roomy > 0

    def remove(self, demand: Demand) -> None:
        """Take back every unit placed for `demand`."""
        for h, assignment in self.result.items():
            n = assignment.pop(demand.session_id, 0)
            if n:
                self._take(h, -n * unit_cores(demand.unit, self.hosts[h]))
        self.units[demand.session_id] = self.cores[demand.session_id] = 0


def allocate(
    hosts: Mapping[str, HostSize],
    current: Mapping[str, Mapping[int, int]],
    demands: list[Demand],
    excluded: Mapping[int, set[str]] | None = None,
    *,
    mode: str = "balanced",
    offline: frozenset[str] | set[str] = frozenset(),
) -> Assignments:
    """Instances per host and session. `excluded` names hosts a session must not use (its
    service failed to load there, or the host is outside its node groups); `offline` hosts
    keep their current instances and get no new one; `mode` is "queued" or "balanced"."""
    plan = _Plan(hosts, current, excluded or {}, offline)
    order = sorted(demands, key=lambda d: (-d.priority, d.session_id))
    started: list[Demand] = []
    for d in order:  # minimums first, by priority; met whole or not at all when starting
        placed = sum(1 for _ in range(d.min_units) if plan.add(d))
        if placed == d.min_units or (d.running and placed > 0):
            started.append(d)
        else:
            plan.remove(d)
    # then the rest, one unit at a time to the session with the most outstanding work per
    # core it already has (D'Hondt), higher priority first on ties. A heap, not a scan of
    # every session per unit: a unit changes only its own session's quotient, and with 1,000
    # open sessions the scan cost 0.8 s a round (every session that cannot grow is tried
    # once). Ties are broken by session id, so the order is the scan's exactly.
    # (the list index only keeps two equal keys from comparing Demands)
    key = _queue_key if mode == "queued" else _share_key
    growing = [
        (key(d, plan.cores.get(d.session_id, 0)), i, d)
        for i, d in enumerate(started)
        if plan.units.get(d.session_id, 0) < d.max_units
    ]
    heapq.heapify(growing)
    while growing and plan.has_room():
        _key, i, best = heapq.heappop(growing)
        if plan.add(best) and plan.units[best.session_id] < best.max_units:
            heapq.heappush(growing, (key(best, plan.cores[best.session_id]), i, best))
    return {h: {s: n for s, n in a.items() if n} for h, a in plan.result.items()}


def _share_key(demand: Demand, cores: int) -> tuple[float, int, int]:
    """Heap order of a growing session: the greatest quotient first, then the highest
    priority, then the oldest session (the smallest key pops first)."""
    return (-weight(demand.outstanding) / (cores + 1), -demand.priority, demand.session_id)


def _queue_key(demand: Demand, _cores: int) -> tuple[float, int, int]:
    """Heap order in queued mode: the highest priority, then the oldest session, whatever
    it holds (it grows to its maximum before the next one grows)."""
    return (0.0, -demand.priority, demand.session_id)


def totals(assignments: Mapping[str, Mapping[int, int]]) -> dict[int, int]:
    """Instances per session over every host."""
    out: dict[int, int] = {}
    for assignment in assignments.values():
        for sid, n in assignment.items():
            out[sid] = out.get(sid, 0) + n
    return out
