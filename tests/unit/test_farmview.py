"""The dashboard's and `soafarm top`'s data: rates, ETAs, the view of the broker's replies,
its wire shape, and the watcher riding out a failed request (a fake control client)."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from rich.console import Console

from soafarm.cli import farmview
from soafarm.cli.dashboard import render_top
from soafarm.cli.dashboard_page import PAGE, page
from soafarm.cli.farmview import FarmView, FarmWatcher, RateTracker, build_view, eta
from soafarm.config import load_settings
from soafarm.errors import BrokerUnavailable
from soafarm.state.control import (
    ClientStatus,
    HostInfo,
    HostList,
    HostsArgs,
    ListArgs,
    SessionInfo,
    SessionList,
)
from soafarm.state.records import HostRecord, SessionRecord, SessionState, SessionStatus

# -- RateTracker and eta -------------------------------------------------------------------


def test_rate_is_unknown_until_two_samples_at_different_times() -> None:
    rates = RateTracker()
    assert rates.observe("s", 10, 100.0) is None
    assert rates.observe("s", 12, 100.0) is None  # no time has passed
    assert rates.observe("s", 30, 102.0) == pytest.approx(10.0)  # (30 - 10) / 2 s


def test_rate_covers_the_window_and_follows_a_change_of_speed() -> None:
    rates = RateTracker(window=10.0)
    t, done = 0.0, 0
    for _ in range(20):  # 20 s at 5/s
        assert rates.observe("s", done, t) in (None, pytest.approx(5.0))
        t, done = t + 1.0, done + 5
    for _ in range(11):  # then stalled for more than a window
        rate = rates.observe("s", done, t)
        t += 1.0
    assert rate == 0.0
    assert rates.observe("s", done + 50, t) == pytest.approx(50 / 10.0)


def test_a_count_that_goes_down_starts_afresh() -> None:
    rates = RateTracker()
    rates.observe("s", 100, 0.0)
    assert rates.observe("s", 200, 1.0) == pytest.approx(100.0)
    assert rates.observe("s", 5, 2.0) is None  # purged and made again: no negative rate
    assert rates.observe("s", 15, 3.0) == pytest.approx(10.0)


def test_forget_others_drops_the_history_of_gone_keys() -> None:
    rates = RateTracker()
    for key in ("a", "b"):
        rates.observe(key, 0, 0.0)
    rates.forget_others(["a"])
    assert rates.observe("a", 10, 1.0) == pytest.approx(10.0)
    assert rates.observe("b", 10, 1.0) is None  # b's first sample was forgotten


@pytest.mark.parametrize(
    ("remaining", "rate", "expected"),
    [(100, 20.0, 5.0), (0, None, 0.0), (0, 3.0, 0.0), (5, None, None), (5, 0.0, None)],
)
def test_eta(remaining: int, rate: float | None, expected: float | None) -> None:
    assert eta(remaining, rate) == expected


# -- the view of the broker's replies --------------------------------------------------------


def session_info(
    sid: int, clients: tuple[ClientStatus, ...], status: SessionStatus | None = None
) -> SessionInfo:
    record = SessionRecord(
        id=sid,
        service="faulty",
        version=None,
        state=SessionState.RUNNING,
        min_units=1,
        max_units=4,
        priority=2000,
        resource_unit="core",
        created=1000.0,
        owner="me",
        durable=True,
    )
    outstanding = sum(c.outstanding for c in clients)
    return SessionInfo(
        record=record,
        clients=clients,
        allocated_units=2,
        target_units=3,
        status=status,
        outstanding=outstanding,
    )


def client(cid: str, accepted: int, done: int, faulted: int, total: int | None) -> ClientStatus:
    sealed = total is not None
    return ClientStatus(
        cid, accepted, done, faulted, accepted - done, sealed, total, sealed and done == total
    )


HOSTS = HostList(
    (
        HostInfo(
            HostRecord("node-b", "box", 9, 2, 900.0, utilisation=0.75),
            instances={"7": 2},
            assignments={"7": 2},
            heartbeat_age=0.4,
        ),
        HostInfo(HostRecord("node-a", "box", 8, 4, 900.0, draining=True), admin=""),
        HostInfo(HostRecord("node-c", "box", 7, 1, 900.0), admin="offline"),
    )
)


def two_views() -> tuple[FarmView, FarmView]:
    """The same session seen twice, 2 s apart: client a sealed at 100, b still sending."""
    tracker = RateTracker()
    waiting = SessionStatus(target=3, waiting="too few units")
    first = SessionList(
        (session_info(7, (client("a", 100, 20, 1, 100), client("b", 30, 10, 0, None)), waiting),)
    )
    later = SessionList(
        (session_info(7, (client("a", 100, 60, 3, 100), client("b", 50, 20, 0, None)), waiting),)
    )
    one = build_view("ns", first, HOSTS, tracker, now=10.0, taken=1000.0)
    two = build_view("ns", later, HOSTS, tracker, now=12.0, taken=1002.0)
    return one, two


def test_rates_and_etas_come_from_the_previous_view() -> None:
    one, two = two_views()
    (s1,) = one.sessions
    assert (s1.rate, s1.eta) == (None, None)
    (s,) = two.sessions
    a, b = s.clients
    # a: sealed, 100 in all; 40 more done in 2 s
    assert (a.client_id, a.done, a.total, a.faulted, a.sealed) == ("a", 60, 100, 3, True)
    assert a.rate == pytest.approx(20.0)
    assert a.eta == pytest.approx(40 / 20.0)
    # b: not sealed: its total so far is what was accepted
    assert (b.done, b.total, b.sealed, b.finished) == (20, 50, False, False)
    assert b.rate == pytest.approx(5.0)
    assert b.eta == pytest.approx(30 / 5.0)
    # the session: both client ids added up
    assert (s.done, s.total, s.faulted, s.outstanding) == (80, 150, 3, 70)
    assert s.rate == pytest.approx(25.0)
    assert s.eta == pytest.approx(70 / 25.0)
    assert (s.allocated_units, s.target_units, s.state, s.why) == (2, 3, "running", "too few units")


def test_a_session_with_nothing_sent_has_no_eta() -> None:
    tracker = RateTracker()
    empty = SessionList((session_info(9, (client("a", 0, 0, 0, None),)),))
    build_view("ns", empty, HOSTS, tracker, now=1.0, taken=1.0)
    (s,) = build_view("ns", empty, HOSTS, tracker, now=2.0, taken=2.0).sessions
    assert (s.total, s.rate, s.eta, s.clients[0].eta) == (0, 0.0, None, None)


def test_hosts_are_sorted_with_instances_and_state() -> None:
    _, view = two_views()
    assert [(h.id, h.cores, h.instances, h.utilisation, h.state) for h in view.hosts] == [
        ("node-a", 4, 0, None, "draining"),
        ("node-b", 2, 2, 0.75, ""),
        ("node-c", 1, 0, None, "offline"),
    ]


def test_wire_shape_is_plain_json() -> None:
    one, two = two_views()
    wire = two.to_wire()
    assert json.loads(json.dumps(wire, allow_nan=False)) == wire
    assert set(wire) == {"namespace", "taken", "sessions", "hosts", "error"}
    (session,) = wire["sessions"]
    assert set(session) == {
        "id",
        "service",
        "version",
        "state",
        "durable",
        "allocated_units",
        "target_units",
        "done",
        "total",
        "faulted",
        "outstanding",
        "rate",
        "eta",
        "why",
        "clients",
    }
    assert isinstance(session["clients"], list)
    assert set(session["clients"][0]) == {
        "client_id",
        "done",
        "total",
        "faulted",
        "outstanding",
        "sealed",
        "finished",
        "rate",
        "eta",
    }
    assert set(wire["hosts"][0]) == {
        "id",
        "pool",
        "cores",
        "instances",
        "utilisation",
        "state",
        "heartbeat_age",
    }
    assert one.to_wire()["sessions"][0]["rate"] is None  # unknown is null, not 0


# -- the watcher, over a fake control client ---------------------------------------------------


class FakeControl:
    """Answers ListArgs and HostsArgs from a script; `fail` makes the next request raise."""

    made = 0
    fail: Exception | None = None
    done = 0

    def __init__(self, settings: Any) -> None:
        type(self).made += 1
        self.closed = False

    def request(self, args: Any, timeout: float | None = None) -> Any:
        if FakeControl.fail is not None:
            raise FakeControl.fail
        if isinstance(args, ListArgs):
            return SessionList((session_info(7, (client("a", 100, FakeControl.done, 0, 100),)),))
        assert isinstance(args, HostsArgs)
        return HOSTS

    def close(self) -> None:
        self.closed = True


def test_watcher_keeps_the_last_view_on_failure_and_reconnects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(farmview, "ControlClient", FakeControl)
    monkeypatch.setattr(FakeControl, "made", 0)
    clock = iter([1.0, 2.0])
    watcher = FarmWatcher(
        load_settings(environ={}), clock=lambda: next(clock), wall_clock=lambda: 5000.0
    )
    monkeypatch.setattr(FakeControl, "done", 10)
    first = watcher.snapshot_or_last()
    assert first.error == "" and first.sessions[0].done == 10
    monkeypatch.setattr(FakeControl, "fail", BrokerUnavailable("no broker daemon is running"))
    with pytest.raises(BrokerUnavailable):
        watcher.snapshot()
    failed = watcher.snapshot_or_last()
    assert failed.error == "no broker daemon is running"
    assert failed.sessions == first.sessions  # the last view that could be read
    monkeypatch.setattr(FakeControl, "fail", OSError("connection reset"))
    assert watcher.snapshot_or_last().error == "OSError: connection reset"
    monkeypatch.setattr(FakeControl, "fail", None)
    monkeypatch.setattr(FakeControl, "done", 30)
    again = watcher.snapshot_or_last()
    assert again.error == ""
    assert again.sessions[0].rate == pytest.approx(20.0)  # (30 - 10) over 1.0 -> 2.0 s
    assert FakeControl.made == 4  # one, then a new one after each of the three failures
    watcher.close()


# -- what people see -----------------------------------------------------------------------


def test_top_frame_shows_sessions_clients_and_hosts() -> None:
    _, view = two_views()
    console = Console(record=True, width=160, color_system=None)
    console.print(render_top(view))
    text = console.export_text()
    assert re.search(
        r"^ *7 +faulty \(durable\) +running +2/3 +\S+ +80/150 +25\.0/s +3s +3 +too few units",
        text,
        re.M,
    ), text
    assert re.search(r"^ +a +.*60/100 +20\.0/s +2s +3\b", text, re.M), text
    assert "(sending)" in text  # client b is not sealed
    for host in ("node-a (draining)", "node-b", "node-c (offline)", "75%: 2 inst, 2 cores"):
        assert host in text, text


def test_a_narrow_frame_keeps_the_counts_and_drops_the_bars() -> None:
    _, view = two_views()
    console = Console(record=True, width=80, color_system=None)
    console.print(render_top(view))
    text = console.export_text()
    assert "progress" not in text and "━" not in text
    assert re.search(r"^ *7 +faulty \(durable\) +running +2/3 +80/150", text, re.M), text


def test_page_is_self_contained_and_polls_at_the_interval() -> None:
    html = page(2.5)
    assert "const INTERVAL_MS = 2500;" in html
    assert "__INTERVAL_MS__" not in html
    assert "/api/farm" in html
    # nothing from elsewhere: no URL with a host, no external script, style or font
    assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", PAGE, re.I)
    assert not re.search(r"<(script|link|img)[^>]*(src|href)=", PAGE, re.I)
    assert "innerHTML" not in PAGE  # names are text, never markup
