"""The autoscaler's pure decisions: load ratio, grow/shrink thresholds, pools in order."""

import math

from soafarm.broker.scaling import SessionLoad, load_ratio, pool_targets, wanted_units
from soafarm.config import PoolSettings
from soafarm.resources import HostSize

LOCAL = PoolSettings(name="local", min_hosts=0, max_hosts=3, cores_per_host=2)
BURST = PoolSettings(name="burst", provisioner="kubernetes", max_hosts=10, cores_per_host=2)


def test_load_ratio_is_outstanding_per_slot() -> None:
    host = HostSize(4)
    assert load_ratio(SessionLoad(1, 10, 4, 1, 8), host) == 250.0
    assert load_ratio(SessionLoad(1, 10, 1, 1, 8, unit="node"), host) == 250.0
    assert load_ratio(SessionLoad(1, 5, 0, 1, 8), host) == math.inf
    assert load_ratio(SessionLoad(1, 0, 0, 1, 8), host) == 0.0


def test_above_the_grow_threshold_a_session_wants_a_slot_per_request_up_to_max() -> None:
    host = HostSize(1)
    assert wanted_units(SessionLoad(1, 2000, 2, 1, 8), host) == 8
    assert wanted_units(SessionLoad(1, 5, 2, 1, 8), host) == 5


def test_between_thresholds_nothing_changes_and_below_it_shrinks_to_the_work() -> None:
    host = HostSize(1)
    assert wanted_units(SessionLoad(1, 4, 4, 1, 8), host) == 4  # ratio 100
    assert wanted_units(SessionLoad(1, 2, 4, 1, 8), host) == 2  # ratio 50
    assert wanted_units(SessionLoad(1, 0, 4, 1, 8), host) == 1  # never below min_units


def test_pools_fill_in_order_and_the_burst_pool_only_when_the_first_is_full() -> None:
    small = [SessionLoad(1, 3, 0, 1, 100)]
    assert pool_targets((LOCAL, BURST), small, 0, 60) == {"local": 2, "burst": 0}
    big = [SessionLoad(1, 1000, 2, 1, 10)]
    assert pool_targets((LOCAL, BURST), big, 0, 60) == {"local": 3, "burst": 2}


def test_idle_pools_go_to_their_minimum() -> None:
    pools = (PoolSettings(name="local", min_hosts=1, max_hosts=3), BURST)
    loads = [SessionLoad(1, 0, 4, 1, 8)]
    assert pool_targets(pools, loads, idle_for=61, idle_timeout=60) == {"local": 1, "burst": 0}
    assert pool_targets(pools, [], idle_for=61, idle_timeout=60) == {"local": 1, "burst": 0}
