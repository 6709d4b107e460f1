"""Resource units: what one service instance of a session occupies on a host, and its capacity.

`core`: one instance per core, capacity 1 (code that is not thread-safe). `socket`: one
instance per CPU socket, covering its cores (memory-bound code). `node`: one instance per
host, covering every core (multi-threaded code). A registration's `max_concurrent_calls`
overrides the capacity; the cores an instance occupies stay those of its unit.
"""

from __future__ import annotations

from dataclasses import dataclass

from soafarm.errors import ConfigError

RESOURCE_UNITS = ("core", "socket", "node")
#: Stored for "no upper bound" on a session's units: the allocator never gives more than the
#: farm has.
UNBOUNDED_UNITS = 2**31 - 1


@dataclass(frozen=True)
class HostSize:
    """The cores and sockets a host offers."""

    cores: int
    sockets: int = 1


def check_unit(unit: str) -> str:
    """`unit` if it is a known resource unit, else a ConfigError listing the known ones."""
    if unit not in RESOURCE_UNITS:
        raise ConfigError(
            f"resource_unit {unit!r} is not supported; use one of: {', '.join(RESOURCE_UNITS)}"
        )
    return unit


def unit_cores(unit: str, host: HostSize) -> int:
    """Cores one instance of this unit occupies on `host`."""
    if unit == "node":
        return host.cores
    if unit == "socket":
        return max(1, host.cores // max(1, host.sockets))
    return 1


def units_per_host(unit: str, host: HostSize) -> int:
    """How many instances of this unit `host` can run (when nothing else runs there)."""
    if unit == "node":
        return 1
    if unit == "socket":
        return min(max(1, host.sockets), host.cores)
    return host.cores


def capacity(unit: str, host: HostSize, max_concurrent_calls: int = 0) -> int:
    """Requests one instance runs at once: its unit's cores, or `max_concurrent_calls`."""
    return max_concurrent_calls if max_concurrent_calls > 0 else unit_cores(unit, host)
