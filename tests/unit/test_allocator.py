"""The allocator's pure functions: minimums by priority, sharing by outstanding work, unit
types, stable placement."""

import dataclasses
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from soafarm.broker import allocator
from soafarm.broker.allocator import Assignments, Demand, allocate, totals
from soafarm.resources import HostSize, capacity, unit_cores, units_per_host

ONE_HOST = {"a": HostSize(5)}


def test_minimums_go_by_priority_and_the_rest_is_shared_up_to_max() -> None:
    demands = [Demand(1, 1, 4, priority=1000), Demand(2, 2, 2, priority=3000)]
    assert totals(allocate(ONE_HOST, {}, demands)) == {2: 2, 1: 3}


def test_a_minimum_that_does_not_fit_waits_instead_of_running_below_it() -> None:
    demands = [Demand(1, 3, 3, priority=2000), Demand(2, 4, 4, priority=1000)]
    assert totals(allocate({"a": HostSize(4)}, {}, demands)) == {1: 3}


def test_the_higher_priority_minimum_is_met_first_even_when_it_came_later() -> None:
    demands = [Demand(1, 3, 3, priority=1000), Demand(2, 3, 3, priority=3000)]
    assert totals(allocate({"a": HostSize(4)}, {"a": {1: 3}}, demands)) == {2: 3}


def test_no_session_gets_more_than_max_units() -> None:
    assert totals(allocate({"a": HostSize(16)}, {}, [Demand(1, 1, 2, 2000)])) == {1: 2}


def test_spare_units_follow_outstanding_work() -> None:
    demands = [
        Demand(1, 1, 10, 2000, outstanding=3000),
        Demand(2, 1, 10, 2000, outstanding=1000),
        Demand(3, 1, 10, 2000, outstanding=0),
    ]
    got = totals(allocate({"a": HostSize(8), "b": HostSize(8)}, {}, demands))
    assert got[1] > got[2] > got[3] == 1
    assert sum(got.values()) == 16


def test_sessions_with_equal_work_share_evenly() -> None:
    demands = [Demand(1, 0, 8, 2000, outstanding=500), Demand(2, 0, 8, 2000, outstanding=480)]
    assert totals(allocate({"a": HostSize(6)}, {}, demands)) == {1: 3, 2: 3}


def test_placement_keeps_running_instances_and_packs_new_ones() -> None:
    hosts = {"a": HostSize(2), "b": HostSize(4), "c": HostSize(4)}
    result = allocate(hosts, {"b": {7: 1}}, [Demand(7, 1, 1, 2000), Demand(8, 4, 4, 1000)])
    assert result == {"a": {8: 2}, "b": {7: 1, 8: 2}, "c": {}}


def test_placement_shrinks_without_moving_what_stays() -> None:
    hosts = {"a": HostSize(2), "b": HostSize(2)}
    result = allocate(hosts, {"a": {7: 2}, "b": {7: 2}}, [Demand(7, 2, 2, 2000)])
    assert result == {"a": {7: 2}, "b": {}}


def test_placement_never_exceeds_host_cores() -> None:
    assert allocate({"a": HostSize(1)}, {}, [Demand(1, 1, 3, 2000)]) == {"a": {1: 1}}


def test_excluded_hosts_are_never_used() -> None:
    hosts = {"a": HostSize(2), "b": HostSize(2)}
    assert allocate(hosts, {}, [Demand(1, 1, 4, 2000)], {1: {"a"}}) == {"a": {}, "b": {1: 2}}


def test_socket_units_take_a_socket_each_and_node_units_a_whole_host() -> None:
    hosts = {"a": HostSize(8, sockets=2), "b": HostSize(8, sockets=2)}
    sockets = allocate(hosts, {}, [Demand(1, 1, 10, 2000, unit="socket")])
    assert sockets == {"a": {1: 2}, "b": {1: 2}}
    nodes = allocate(hosts, {}, [Demand(1, 1, 10, 2000, unit="node")])
    assert nodes == {"a": {1: 1}, "b": {1: 1}}


def test_a_node_unit_needs_a_free_host() -> None:
    hosts = {"a": HostSize(4), "b": HostSize(4)}
    demands = [Demand(1, 2, 2, 3000), Demand(2, 1, 1, 1000, unit="node")]
    assert totals(allocate(hosts, {}, demands)) == {1: 2, 2: 1}
    crowded = [Demand(1, 5, 5, 3000), Demand(2, 1, 1, 1000, unit="node")]
    assert totals(allocate(hosts, {}, crowded)) == {1: 5}


def test_capacity_follows_the_unit_unless_max_concurrent_calls_is_set() -> None:
    host = HostSize(8, sockets=2)
    assert [capacity(u, host) for u in ("core", "socket", "node")] == [1, 4, 8]
    assert capacity("node", host, max_concurrent_calls=3) == 3
    assert [units_per_host(u, host) for u in ("core", "socket", "node")] == [8, 2, 1]


def test_a_running_session_that_lost_a_host_keeps_what_it_can_get() -> None:
    demand = Demand(1, 2, 2, 2000, running=True)
    assert allocate({"a": HostSize(1)}, {"a": {1: 1}}, [demand]) == {"a": {1: 1}}
    starting = Demand(1, 2, 2, 2000)
    assert allocate({"a": HostSize(1)}, {}, [starting]) == {"a": {}}


# --- the heap of fullest hosts places exactly as a scan of every host did ----------------


class _ScanPlan(allocator._Plan):
    """The placement as it was first written: every host scanned for each unit."""

    def add(self, demand: Demand) -> bool:
        sid, unit = demand.session_id, demand.unit
        candidates = []
        for h, size in self.hosts.items():
            have = self.result[h].get(sid, 0)
            if (
                h in self.excluded.get(sid, set())
                or have >= units_per_host(unit, size)
                or self.free[h] < unit_cores(unit, size)
            ):
                continue
            moves = have >= self.current.get(h, {}).get(sid, 0)
            if moves and h in self.offline:
                continue
            candidates.append((moves, self.free[h], h))
        if not candidates:
            return False
        self.place(sid, unit, min(candidates)[2])
        return True


@st.composite
def farms(draw: st.DrawFn) -> dict[str, Any]:
    """Hosts, what runs on them, sessions' demands, exclusions, offline hosts and a mode."""
    host_ids = [f"h{i}" for i in range(draw(st.integers(1, 6)))]
    hosts = {h: HostSize(draw(st.integers(0, 8)), draw(st.integers(1, 2))) for h in host_ids}
    sids = list(range(1, draw(st.integers(1, 5)) + 1))
    demands = []
    for sid in sids:
        low = draw(st.integers(0, 4))
        demands.append(
            Demand(
                sid,
                low,
                low + draw(st.integers(0, 10)),
                draw(st.integers(0, 3)),
                draw(st.sampled_from(["core", "core", "socket", "node"])),
                draw(st.integers(0, 1000)),
                draw(st.booleans()),
            )
        )
    current = {
        h: {sid: draw(st.integers(0, 3)) for sid in draw(st.lists(st.sampled_from(sids)))}
        for h in host_ids
    }
    excluded = {sid: set(draw(st.lists(st.sampled_from(host_ids)))) for sid in sids}
    offline = frozenset(draw(st.lists(st.sampled_from(host_ids))))
    mode = draw(st.sampled_from(["queued", "balanced"]))
    return {
        "hosts": hosts,
        "current": current,
        "demands": demands,
        "excluded": excluded,
        "offline": offline,
        "mode": mode,
    }


@given(farms())
@settings(max_examples=400, deadline=None)
def test_placement_is_the_same_as_scanning_every_host(
    farm: dict[str, Any],
) -> None:
    def run(plan: type[allocator._Plan]) -> Assignments:
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr(allocator, "_Plan", plan)
            return allocate(
                farm["hosts"],
                farm["current"],
                [dataclasses.replace(d) for d in farm["demands"]],
                farm["excluded"],
                mode=farm["mode"],
                offline=farm["offline"],
            )

    assert run(allocator._Plan) == run(_ScanPlan)
