"""The seeds' scheduling semantics as pure functions: job templates, named priorities, node
groups, queued and balanced modes, offline hosts, grow/shrink per session, and the reasons a
session waits."""

from __future__ import annotations

import dataclasses

import pytest

from soafarm.broker.allocator import Demand, allocate, totals
from soafarm.broker.grow_shrink import load_ratio, next_status, worth_writing
from soafarm.broker.node_groups import host_groups, outside
from soafarm.broker.templates import apply_template, find_template
from soafarm.broker.waiting import waiting_reason
from soafarm.config import (
    BrokerSettings,
    JobTemplate,
    SchedulerSettings,
    load_settings,
    priority_value,
)
from soafarm.errors import ConfigError, TemplateLimitExceeded
from soafarm.resources import UNBOUNDED_UNITS, HostSize
from soafarm.state.control import CreateArgs
from soafarm.state.records import HostRecord, LoadError, SessionRecord, SessionState

GPU = JobTemplate(
    "gpu",
    min_units=2,
    max_units=4,
    units_limit=8,
    allowed_resource_units="core,socket",
    priority="above_normal",
    max_priority="above_normal",
    node_groups="gpu",
    force_node_groups=True,
    broker={"message_resend_limit": 7},
)
SCHED = SchedulerSettings(job_templates=(JobTemplate(), GPU))


# --- priorities and templates ---------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "value"),
    [
        ("lowest", 0),
        ("BelowNormal", 1000),
        ("below-normal", 1000),
        ("normal", 2000),
        ("Above_Normal", 3000),
        ("highest", 4000),
        (2500, 2500),
        ("17", 17),
    ],
)
def test_named_priorities_map_to_the_seeds_values(given: int | str, value: int) -> None:
    assert priority_value(given) == value


@pytest.mark.parametrize("bad", ["urgent", -1, 4001, True])
def test_a_priority_that_is_no_priority_is_refused_with_the_names(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"lowest|between 0 and 4000|name or an integer"):
        priority_value(bad)  # type: ignore[arg-type]


def test_a_session_naming_no_template_gets_the_defaults_of_before() -> None:
    asked = apply_template(SchedulerSettings(), CreateArgs("echo"))
    assert (asked.template, asked.min_units, asked.max_units) == ("Default", 1, UNBOUNDED_UNITS)
    assert (asked.resource_unit, asked.priority, asked.node_groups) == ("core", 2000, ())


def test_a_template_fills_what_the_session_leaves_unset() -> None:
    asked = apply_template(SCHED, CreateArgs("echo", job_template="GPU"))
    assert (asked.template, asked.min_units, asked.max_units) == ("gpu", 2, 4)
    assert (asked.priority, asked.node_groups) == (3000, ("gpu",))
    assert asked.broker == {"message_resend_limit": 7}
    own = apply_template(SCHED, CreateArgs("echo", min_units=1, max_units=8, job_template="gpu"))
    assert (own.min_units, own.max_units) == (1, 8)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (CreateArgs("e", max_units=9, job_template="gpu"), "max_units 9 is above the 8 units"),
        (CreateArgs("e", min_units=9, max_units=9, job_template="gpu"), "min_units 9 is above"),
        (CreateArgs("e", resource_unit="node", job_template="gpu"), "'node' is not allowed"),
        (CreateArgs("e", priority=4000, job_template="gpu"), "above job template 'gpu'"),
        (CreateArgs("e", node_groups=("cpu",), job_template="gpu"), "fixes the node groups"),
    ],
)
def test_a_session_outside_its_templates_limits_is_refused(args: CreateArgs, match: str) -> None:
    with pytest.raises(TemplateLimitExceeded, match=match):
        apply_template(SCHED, args)


def test_an_unknown_template_is_refused_with_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"no job template 'big'.*known: Default, gpu"):
        apply_template(SCHED, CreateArgs("echo", job_template="big"))
    assert find_template(SchedulerSettings(job_templates=(GPU,)), "") == JobTemplate()


def test_templates_load_from_toml_and_travel_to_child_processes(tmp_path: object) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "farm.toml"
    path.write_text(
        '[scheduler]\nmode = "balanced"\n'
        '[[scheduler.job_templates]]\nname = "Default"\nmax_units = 4\n'
        '[[scheduler.job_templates]]\nname = "gpu"\nnode_groups = "gpu"\n'
        "[scheduler.job_templates.broker]\nmessage_resend_limit = 5\n"
    )
    settings = load_settings(path, environ={})
    assert settings.scheduler.mode == "balanced"
    assert settings.scheduler.template("GPU") == JobTemplate(
        "gpu", node_groups="gpu", broker={"message_resend_limit": 5}
    )
    from soafarm.config import settings_env

    assert load_settings(environ=settings_env(settings)) == settings


@pytest.mark.parametrize(
    ("toml", "match"),
    [
        ('[scheduler]\nmode = "fair"\n', "scheduler.mode must be 'queued' or 'balanced'"),
        ('[[scheduler.job_templates]]\nname = "a"\npriority = "top"\n', "'top' is not a prio"),
        ("[[scheduler.job_templates]]\nname = 'a'\n[scheduler.job_templates.broker]\nx = 1\n", "x"),
        (
            "[[scheduler.job_templates]]\nname = 'a'\n[[scheduler.job_templates]]\nname = 'A'\n",
            "unique",
        ),
    ],
)
def test_bad_scheduler_settings_are_refused_naming_the_setting(
    tmp_path: object, toml: str, match: str
) -> None:
    from pathlib import Path

    path = Path(str(tmp_path)) / "farm.toml"
    path.write_text(toml)
    with pytest.raises(ConfigError, match=match):
        load_settings(path, environ={})


# --- node groups --------------------------------------------------------------------------


def host(hid: str, pool: str = "default", **labels: str) -> HostRecord:
    return HostRecord(hid, hid, 1, 2, 0.0, pool=pool, labels=labels)


def test_a_host_is_in_the_groups_of_its_pool_its_label_keys_and_its_labels() -> None:
    assert host_groups(host("h", "burst", gpu="a100")) == {"burst", "gpu", "gpu=a100"}
    hosts = {"a": host("a", gpu="a100"), "b": host("b", "burst"), "c": host("c", gpu="t4")}
    assert outside(hosts, ["gpu"]) == {"b"}
    assert outside(hosts, ["gpu=a100"]) == {"b", "c"}
    assert outside(hosts, ["gpu", "burst"]) == {"a", "b", "c"}  # in all of them
    assert outside(hosts, []) == set()


# --- modes and offline hosts --------------------------------------------------------------

FOUR = {"h1": HostSize(2), "h2": HostSize(2)}


def test_queued_mode_fills_the_first_session_to_its_maximum_before_the_next() -> None:
    demands = [Demand(1, 1, 3, 2000, outstanding=1), Demand(2, 1, 3, 2000, outstanding=100)]
    queued = totals(allocate(FOUR, {}, demands, mode="queued"))
    balanced = totals(allocate(FOUR, {}, demands, mode="balanced"))
    assert queued == {1: 3, 2: 1}
    assert balanced == {1: 1, 2: 3}  # by outstanding work


def test_queued_mode_serves_priority_first_then_age() -> None:
    demands = [Demand(1, 1, 4, 2000), Demand(2, 1, 4, 4000)]
    assert totals(allocate(FOUR, {}, demands, mode="queued")) == {1: 1, 2: 3}


def test_an_offline_host_keeps_what_it_runs_and_takes_nothing_new() -> None:
    current = {"h1": {1: 1}, "h2": {}}
    demands = [Demand(1, 1, 4, 2000, outstanding=10, running=True), Demand(2, 1, 1, 2000)]
    got = allocate(FOUR, current, demands, mode="queued", offline={"h1"})
    assert got["h1"] == {1: 1}
    assert got["h2"] == {1: 1, 2: 1}


def test_node_groups_keep_a_session_on_its_hosts() -> None:
    hosts = {"a": host("a", gpu="x"), "b": host("b")}
    demands = [Demand(1, 1, 4, 2000, outstanding=9)]
    got = allocate(FOUR | {"a": HostSize(2), "b": HostSize(2)}, {}, demands)
    assert totals(got) == {1: 4}
    only = allocate({"a": HostSize(2), "b": HostSize(2)}, {}, demands, {1: outside(hosts, ["gpu"])})
    assert only == {"a": {1: 2}, "b": {}}


# --- grow and shrink ----------------------------------------------------------------------


def session(**changes: object) -> SessionRecord:
    base = SessionRecord(
        1, "echo", None, SessionState.RUNNING, 1, 8, 2000, "core", 0.0, "me",
        broker_settings=BrokerSettings(allocation_adjust_interval=60.0),
    )  # fmt: skip
    return dataclasses.replace(base, **changes)  # type: ignore[arg-type]


def test_a_new_session_starts_with_its_maximum_as_target() -> None:
    status = next_status(session(), None, units=0, outstanding=0, capacity=1, now=10.0)
    assert (status.target, status.changed) == (8, 10.0)


def test_an_idle_session_shrinks_to_its_minimum_one_interval_after_its_last_change() -> None:
    start = next_status(session(), None, units=8, outstanding=0, capacity=1, now=0.0)
    early = next_status(session(), start, units=8, outstanding=0, capacity=1, now=59.0)
    assert early.target == 8
    late = next_status(session(), early, units=8, outstanding=0, capacity=1, now=60.0)
    assert late.target == 1
    assert "below 75%: shrank to 1" in late.reason


def test_a_busy_session_grows_at_once_to_what_its_work_keeps_busy() -> None:
    small = dataclasses.replace(
        next_status(session(), None, units=1, outstanding=0, capacity=1, now=0.0),
        target=1,
    )
    grown = next_status(session(), small, units=1, outstanding=5, capacity=1, now=1.0)
    assert grown.target == 5
    assert grown.load_ratio == 500
    assert "load 500% above 125%: grew from 1 to 5" in grown.reason
    capped = next_status(session(), grown, units=5, outstanding=500, capacity=1, now=2.0)
    assert capped.target == 8  # never above max_units


def test_a_load_between_the_thresholds_changes_nothing() -> None:
    status = dataclasses.replace(
        next_status(session(), None, units=4, outstanding=0, capacity=1, now=0.0), target=4
    )
    for outstanding in (3, 4, 5):  # 75%..125%
        same = next_status(session(), status, units=4, outstanding=outstanding, capacity=1, now=99)
        assert same.target == 4


def test_capacity_counts_calls_per_unit() -> None:
    assert load_ratio(8, 2, 4) == 100
    assert load_ratio(3, 0, 4) is None
    status = dataclasses.replace(
        next_status(session(), None, units=1, outstanding=0, capacity=4, now=0.0), target=1
    )
    assert next_status(session(), status, units=1, outstanding=12, capacity=4, now=1).target == 3


def test_a_status_is_written_on_a_change_and_on_load_only_every_status_interval() -> None:
    status = next_status(session(), None, units=1, outstanding=0, capacity=1, now=0.0)
    assert worth_writing(status, None, 0.0, 15.0)
    loaded = dataclasses.replace(status, load_ratio=90)
    assert not worth_writing(loaded, status, 14.0, 15.0)
    assert worth_writing(loaded, status, 15.0, 15.0)
    assert worth_writing(dataclasses.replace(status, waiting="why"), status, 1.0, 15.0)


# --- why a session waits ------------------------------------------------------------------


def test_waiting_reasons_say_what_to_do() -> None:
    s = session(min_units=5, node_groups=("gpu",))
    live = {"a": host("a", gpu="x"), "b": host("b")}
    sizes = {"a": HostSize(2), "b": HostSize(2)}

    def why(**kw: object) -> str:
        args: dict[str, object] = {
            "outside": {"b"},
            "load_errors": {},
            "excluded_until": {},
            "now": 0.0,
        }
        args.update(kw)
        return waiting_reason(s, live, sizes, **args)  # type: ignore[arg-type]

    assert "no live worker host" in waiting_reason(
        s, {}, {}, outside=set(), load_errors={}, excluded_until={}
    )
    assert "no live host is in node groups gpu" in why(outside={"a", "b"})
    assert "offline or draining" in waiting_reason(
        s, live, {"b": HostSize(2)}, outside={"b"}, load_errors={}, excluded_until={}
    )
    failing = why(load_errors={"a": LoadError("No module named x", 0.0)}, excluded_until={"a": 30})
    assert "could not be loaded on any host it may use (a: No module named x)" in failing
    assert "next try in 30s" in failing
    assert "min_units 5 needs 5 core units; the live hosts in node groups gpu offer 2" in why()
    assert "held by sessions of higher priority" in waiting_reason(
        session(min_units=2), live, sizes, outside=set(), load_errors={}, excluded_until={}
    )


def test_between_facts_reads_only_new_sessions_statuses_are_worked_out() -> None:
    from soafarm.broker import assignment

    hosts = assignment._Hosts({}, {"h": HostSize(4)}, set(), {})
    old = assignment._Facts(session(id=1), 50, set(), {"h"}, {}, {})
    new = assignment._Facts(session(id=2), 0, set(), {"h"}, {}, {})
    kept = dataclasses.replace(
        next_status(session(), None, units=1, outstanding=0, capacity=1, now=0.0), target=1
    )
    between = assignment._next_statuses(hosts, [old, new], {1: kept}, 5.0, every=False)
    assert between[1] is kept  # its load (50 outstanding) waits for the next full round
    assert between[2].target == 4  # a new session starts at its maximum (the farm's 4)
    full = assignment._next_statuses(hosts, [old, new], {1: kept}, 5.0)
    assert full[1].target == 4 and "grew from 1 to 4" in full[1].reason  # the farm has 4
