"""The allocator's pure functions: minimums by priority, fair sharing, stable placement."""

from broker.allocator import Demand, place, targets


def test_minimums_go_by_priority_and_the_rest_is_shared_up_to_max() -> None:
    demands = [Demand(1, 1, 4, priority=1000), Demand(2, 2, 2, priority=3000)]
    assert targets(5, demands) == {2: 2, 1: 3}


def test_a_minimum_that_does_not_fit_waits_instead_of_running_below_it() -> None:
    demands = [Demand(1, 3, 3, priority=2000), Demand(2, 4, 4, priority=1000)]
    assert targets(4, demands) == {1: 3, 2: 0}


def test_no_session_gets_more_than_max_units() -> None:
    assert targets(16, [Demand(1, 1, 2, 2000)]) == {1: 2}


def test_placement_keeps_running_instances_and_fills_the_roomiest_host() -> None:
    cores = {"a": 2, "b": 2}
    current = {"a": {7: 1}}
    assert place(cores, current, {7: 1, 8: 2}) == {"a": {7: 1, 8: 1}, "b": {8: 1}}


def test_placement_shrinks_without_moving_what_stays() -> None:
    cores = {"a": 2, "b": 2}
    current = {"a": {7: 2}, "b": {7: 2}}
    assert place(cores, current, {7: 2}) == {"a": {7: 2}, "b": {}}


def test_placement_never_exceeds_host_cores() -> None:
    result = place({"a": 1}, {}, {1: 3})
    assert result == {"a": {1: 1}}
