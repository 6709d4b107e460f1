"""How many hosts each pool should have: pure functions of the sampled load, no I/O.

Per session, load ratio = 100 x outstanding / (instances x capacity per instance). Above the
session's `allocation_grow_load_ratio_threshold` it wants enough units for one outstanding
request per slot (up to `max_units`); below `allocation_shrink_load_ratio_threshold` it wants
only that many (at least `min_units`); in between it keeps what it has. The cores the
sessions want are then filled pool by pool in order, so a later (burst) pool grows only when
the earlier ones are at `max_hosts` and is the first to empty. With no outstanding work for
`idle_timeout`, every pool goes to its `min_hosts` (often zero).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from soafarm.config import PoolSettings
from soafarm.resources import HostSize, capacity, unit_cores


@dataclass(frozen=True)
class SessionLoad:
    """One session as the autoscaler sees it at an adjustment."""

    session_id: int
    outstanding: float  # mean over the samples since the last adjustment
    instances: int
    min_units: int
    max_units: int
    unit: str = "core"
    max_concurrent_calls: int = 0
    grow_threshold: int = 125
    shrink_threshold: int = 75


def load_ratio(load: SessionLoad, host: HostSize) -> float:
    """100 x outstanding / (instances x capacity); infinite when work waits with no instance."""
    slots = load.instances * capacity(load.unit, host, load.max_concurrent_calls)
    if slots == 0:
        return math.inf if load.outstanding > 0 else 0.0
    return 100.0 * load.outstanding / slots


def wanted_units(load: SessionLoad, host: HostSize) -> int:
    """Units this session should have, by its load ratio and thresholds."""
    ratio = load_ratio(load, host)
    per_unit = capacity(load.unit, host, load.max_concurrent_calls)
    enough = math.ceil(load.outstanding / per_unit)
    if ratio > load.grow_threshold:
        return max(load.min_units, min(load.max_units, max(enough, load.instances)))
    if ratio < load.shrink_threshold:
        return max(load.min_units, min(load.max_units, enough))
    return load.instances


def pool_targets(
    pools: tuple[PoolSettings, ...],
    loads: list[SessionLoad],
    idle_for: float,
    idle_timeout: float,
) -> dict[str, int]:
    """Hosts per pool name. `idle_for`: seconds since any session last had outstanding work."""
    if idle_for >= idle_timeout:
        return {p.name: p.min_hosts for p in pools}
    host = HostSize(pools[0].cores_per_host)
    cores = sum(wanted_units(s, host) * unit_cores(s.unit, host) for s in loads)
    out: dict[str, int] = {}
    for pool in pools:
        hosts = min(pool.max_hosts, max(pool.min_hosts, math.ceil(cores / pool.cores_per_host)))
        out[pool.name] = hosts
        cores = max(0, cores - hosts * pool.cores_per_host)
    return out
