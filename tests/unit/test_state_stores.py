"""The state layer's stores against an in-memory Redis: keys, life cycles, Lua counting."""

from __future__ import annotations

import time

import pytest

from soafarm.config import BrokerSettings
from soafarm.errors import SoafarmError
from soafarm.state.clients import DoneMarker, ProgressStore
from soafarm.state.commondata import CommonDataReader, CommonDataStore
from soafarm.state.hosts import HostStore, InstanceLoad
from soafarm.state.instances import InstanceStore
from soafarm.state.namespace import delete_namespace_keys
from soafarm.state.records import HostRecord, InstanceRecord, SessionRecord, SessionState
from soafarm.state.sessions import SessionStore
from tests.unit.fakes import NAMES, fake_redis
from tests.waiting import wait_until


def session_record(sid: int, **changes: object) -> SessionRecord:
    fields: dict[str, object] = {
        "id": sid,
        "service": "echo",
        "version": None,
        "state": SessionState.QUEUED,
        "min_units": 1,
        "max_units": 1,
        "priority": 2000,
        "resource_unit": "core",
        "created": 1000.0,
        "owner": "me",
        "broker_settings": BrokerSettings(),
    }
    fields.update(changes)
    return SessionRecord(**fields)  # type: ignore[arg-type]


def test_session_round_trip_delete_and_tombstone() -> None:
    r = fake_redis()
    sessions = SessionStore(r, NAMES)
    sid = sessions.new_session_id()
    assert sessions.new_session_id() == sid + 1
    data = CommonDataStore(r, NAMES).upload({"curves": [1, 2]}, 1000)
    sessions.save(session_record(sid, data=data))
    sessions.add_client(sid, "a")
    ProgressStore(r, NAMES, sid, "a").create()
    sessions.beat(sid, "session:x")
    sessions.record_load_error(sid, "h1", "boom")
    sessions.set_targets({sid: 2})
    assert sessions.open_ids() == [sid]
    assert sessions.get(sid) == session_record(sid, data=data)
    assert sessions.load_errors(sid) == {"h1": "boom"}

    sessions.delete(sid)

    assert sessions.get(sid) is None
    assert sessions.was_closed(sid)
    assert sessions.open_sessions() == []
    assert sessions.targets() == {}
    # only the counter and the tombstone are left
    assert {k.decode() for k in r.keys("*")} == {
        NAMES.session_counter_key,
        NAMES.closed_session_key(sid),
    }


def test_outstanding_and_throttle_view_count_every_client() -> None:
    r = fake_redis()
    sessions = SessionStore(r, NAMES)
    sessions.save(session_record(1))
    progress = {c: ProgressStore(r, NAMES, 1, c) for c in ("a", "b")}
    for c, p in progress.items():
        p.create()
        sessions.add_client(1, c)
    progress["a"].record_accepted(10)
    progress["b"].record_accepted(7)
    DoneMarker(r, NAMES).mark(1, "a", [(0, False), (1, True), (2, False)])
    assert sessions.outstanding([1]) == {1: 7 + 7}
    assert progress["a"].session_counts() == (3, 7)

    sessions.forget_client(1, "b")
    assert sessions.clients(1) == ["a"]
    assert sessions.outstanding([1]) == {1: 7}


def test_handles_older_than_the_idle_limit_are_dropped() -> None:
    sessions = SessionStore(fake_redis(), NAMES)
    sessions.save(session_record(1))
    sessions.beat(1, "old", at=100.0)
    sessions.beat(1, "new", at=200.0)
    assert sessions.connected_handles(1, since=150.0) == 1
    sessions.drop_handle(1, "new")
    assert sessions.connected_handles(1, since=0.0) == 0


def test_a_beat_after_the_session_was_deleted_writes_nothing() -> None:
    # a client's close() deletes the session, then stops its heartbeat thread: a beat in
    # between must not leave a handles key behind the session
    r = fake_redis()
    sessions = SessionStore(r, NAMES)
    sessions.save(session_record(1))
    sessions.beat(1, "session:a")
    sessions.delete(1)
    sessions.beat(1, "session:a")
    assert sessions.beat_client(1, "client:c:x", "c") is None
    assert not r.exists(NAMES.session_handles_key(1))


def test_done_marker_counts_each_response_once_and_readers_take_over() -> None:
    r = fake_redis()
    progress = ProgressStore(r, NAMES, 1, "c")
    progress.create()
    marker = DoneMarker(r, NAMES)
    assert marker.mark(1, "c", [(0, False), (1, True), (2, False), (9, False)]) == 4
    assert marker.mark(1, "c", [(0, False), (3, True)]) == 1  # 0 ran twice: counted once
    assert marker.answered(1, "c", [0, 1, 2, 3, 4, 9]) == {0, 1, 2, 3, 9}
    assert marker.count_attempt(1, "c", 4) == 1
    assert marker.count_attempt(1, "c", 4) == 2
    assert marker.mark(1, "gone", [(0, False)]) == 0  # a purged client id counts nothing
    assert marker.client_exists(1, "c")
    assert not marker.client_exists(1, "gone")
    state = progress.load()
    assert (state.done, state.faulted) == (5, 2)

    first = progress.take_reader()
    assert progress.commit_read(first, 5, [0, 1])
    second = progress.take_reader()
    # taken over: the ids it handed out are still recorded, but the offset is not moved
    assert not progress.commit_read(first, 6, [2])
    assert progress.is_reader(second)
    assert progress.read_bitmap() == b"\xe0"
    assert progress.load().read_offset == 5
    # ids travel as runs of consecutive ones: out of order and scattered ids land too
    assert progress.commit_read(second, 7, [9, 10, 11, 4, 15])
    assert progress.read_bitmap() == b"\xe8\x71"


def test_hosts_beat_expire_assign_and_wake() -> None:
    r = fake_redis()
    hosts = HostStore(r, NAMES)
    hosts.beat(HostRecord("h1", "box", 1, 4, 0.0), timeout=30.0)
    hosts.beat(HostRecord("h2", "box", 2, 4, 0.0), timeout=0.001)
    wait_until("h2's heartbeat to expire", lambda: hosts.alive(["h1", "h2"]) == {"h1"}, 5)
    assert set(hosts.hosts()) == {"h1", "h2"}  # the record stays until the broker forgets it

    hosts.set_assignments("h1", {7: 2})
    assert hosts.assignments_of("h1") == {7: 2}
    assert hosts.assignments(["h1", "h2"]) == {"h1": {7: 2}, "h2": {}}
    began = time.monotonic()
    hosts.wait_for_wake("h1", timeout=5.0)  # the assignment woke it: no wait
    assert time.monotonic() - began < 1.0
    assert not r.exists(NAMES.host_wake_key("h1"))

    hosts.report_load("h1", "h1.7.0", InstanceLoad(7, 1, 0.5, 12.0))
    assert hosts.loads("h1") == {"h1.7.0": InstanceLoad(7, 1, 0.5, 12.0)}
    hosts.forget("h2")
    assert set(hosts.hosts()) == {"h1"}
    hosts.deregister("h1")
    assert r.keys("*") == []


def test_instances_register_and_forget_with_their_load_report() -> None:
    r = fake_redis()
    instances = InstanceStore(r, NAMES)
    instances.register(7, InstanceRecord("h1.7.1", "h1", 11, 0.0))
    instances.register(7, InstanceRecord("h1.7.0", "h1", 10, 0.0, capacity=2))
    HostStore(r, NAMES).report_load("h1", "h1.7.0", InstanceLoad(7, 2, 0.0, 0.0))
    assert [i.id for i in instances.of_session(7)] == ["h1.7.0", "h1.7.1"]
    instances.forget(7, "h1", "h1.7.0")
    assert [i.id for i in instances.of_session(7)] == ["h1.7.1"]
    assert HostStore(r, NAMES).loads("h1") == {}


def test_common_data_is_adopted_read_and_expires_unadopted() -> None:
    r = fake_redis()
    data = CommonDataStore(r, NAMES)
    keys = data.upload({"curves": {"a": 1}}, 1000)
    assert r.ttl(keys["curves"]) > 0
    assert data.adopt(keys["curves"])
    assert r.ttl(keys["curves"]) == -1
    assert not data.adopt(NAMES.common_data_key("expired"))
    SessionStore(r, NAMES).save(session_record(3, data=keys))
    reader = CommonDataReader(r, NAMES, 3, 1000)
    assert reader("curves") == {"a": 1}
    with pytest.raises(SoafarmError, match="has no common data named 'x'"):
        reader("x")


def test_delete_namespace_keys_leaves_other_namespaces() -> None:
    r = fake_redis()
    r.set("other:key", "1")
    SessionStore(r, NAMES).save(session_record(1))
    assert delete_namespace_keys(r, NAMES) == 3  # the record, the sessions set, its generation
    assert r.keys("*") == [b"other:key"]


def test_a_throttled_send_says_how_many_are_outstanding() -> None:
    from soafarm.client.throttle import Throttle
    from soafarm.errors import Throttled

    r = fake_redis()
    progress = ProgressStore(r, NAMES, 1, "c")
    progress.create()
    broker = BrokerSettings(message_throttle_start_threshold=3, message_throttle_stop_threshold=2)
    throttle = Throttle(progress, broker, timeout=0.05)
    told: list[int] = []
    throttle.on_wait = told.append
    throttle.wait(2)  # under the threshold: nothing to say
    assert told == []
    with pytest.raises(Throttled, match="5 outstanding requests"):
        throttle.wait(5)  # nothing answered: it waits, says why, then gives up
    assert told and set(told) == {5}
