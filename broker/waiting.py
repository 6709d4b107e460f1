"""Why a session waits: the reason the allocator gives a queued session (or one holding
fewer units than its minimum), in words a user can act on (pure functions, no I/O)."""

from __future__ import annotations

import time
from collections.abc import Mapping

from soafarm.resources import HostSize, units_per_host
from soafarm.state.records import HostRecord, LoadError, SessionRecord


def waiting_reason(
    session: SessionRecord,
    alive: Mapping[str, HostRecord],
    usable: Mapping[str, HostSize],
    *,
    outside: set[str],
    load_errors: Mapping[str, LoadError],
    excluded_until: Mapping[str, float],
    now: float | None = None,
) -> str:
    """Why `session` has no unit: no live host, none in its node groups, all of those
    offline or draining, its service failed to load on each, too few units for its minimum,
    or units held by other sessions.

    `alive`: live hosts; `usable`: those taking work (not draining) with their sizes;
    `outside`: hosts outside its node groups; `excluded_until`: host -> when its load
    failure's exclusion ends.
    """
    now = time.time() if now is None else now
    if not alive:
        return "no live worker host (start one with `soafarm worker`; see `soafarm hosts`)"
    groups = ", ".join(session.node_groups)
    mine = [h for h in alive if h not in outside]
    if not mine:
        return (
            f"no live host is in node groups {groups} (hosts join a group by their pool or "
            "labels: `soafarm worker --pool/--labels`; see `soafarm hosts`)"
        )
    taking = [h for h in mine if h in usable]
    if not taking:
        return f"every live host it may use is offline or draining ({', '.join(sorted(mine))})"
    loadable = [h for h in taking if h not in excluded_until]
    if not loadable:
        host = min(taking, key=lambda h: excluded_until[h])
        why = load_errors[host].why if host in load_errors else "unknown error"
        wait = max(0.0, excluded_until[host] - now)
        return (
            f"the service could not be loaded on any host it may use ({host}: {why}); "
            f"next try in {wait:.0f}s (end_point_not_found_retry_period)"
        )
    unit = session.resource_unit
    offered = sum(units_per_host(unit, usable[h]) for h in loadable)
    if offered < session.min_units:
        where = f"in node groups {groups}" if groups else "it may use"
        return (
            f"min_units {session.min_units} needs {session.min_units} {unit} units; the live "
            f"hosts {where} offer {offered} (add hosts, or ask for fewer units)"
        )
    return (
        f"waiting for units: the {offered} {unit} units it may use are held by sessions of "
        "higher priority or older ones (see `soafarm sessions list`)"
    )
