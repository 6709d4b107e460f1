"""Robust broker state over an in-memory Redis: garbage of every kind is logged once and
skipped (never stopping a leader round or a host's reads), cooperating daemons share one
lease and never undo each other's changes, session ids survive Redis coming back empty,
lost hosts take their instance records with them, vanished queues fail their sessions, and
idle durable sessions release their units."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import redis
import structlog.testing

from soafarm.broker.assignment import reconcile
from soafarm.broker.lifecycle import (
    DURABLE_QUEUE_GRACE,
    expire_sessions,
    fail_vanished_sessions,
)
from soafarm.broker.store import BrokerStore
from soafarm.config import BrokerSettings
from soafarm.errors import DecodeError
from soafarm.state.clients import ProgressStore
from soafarm.state.hosts import HostStore, InstanceLoad
from soafarm.state.instances import InstanceStore
from soafarm.state.leases import Lease, leader_key
from soafarm.state.records import HostRecord, InstanceRecord, SessionRecord, SessionState
from soafarm.state.sessions import ID_BLOCK, SessionStore
from tests.unit.fakes import NAMES

NOW = 10_000.0


class MemoryMark:
    """An IdMark in memory (the broker's is a RabbitMQ queue: soafarm.state.idmark)."""

    def __init__(self) -> None:
        self.ceiling = 0
        self.writes = 0

    def read(self) -> int:
        return self.ceiling

    def write(self, ceiling: int) -> None:
        self.writes += 1
        self.ceiling = max(self.ceiling, ceiling)


@pytest.fixture
def store(r: redis.Redis) -> BrokerStore:
    return BrokerStore(r, NAMES)


def record(sid: int, **changes: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "id": sid,
        "service": "echo",
        "version": None,
        "state": SessionState.QUEUED,
        "min_units": 1,
        "max_units": 1,
        "priority": 2000,
        "resource_unit": "core",
        "created": NOW,
        "owner": "me",
        "broker_settings": BrokerSettings(client_connection_timeout=1e9),
    }
    fields.update(changes)
    return SessionRecord(**fields)


def open_session(store: BrokerStore, **changes: Any) -> int:
    sid = store.new_session_id()
    store.save_session(record(sid, **changes))
    return sid


def live_host(r: redis.Redis, host_id: str = "h1", cores: int = 4) -> None:
    HostStore(r, NAMES).beat(HostRecord(host_id, "box", 1, cores, 0.0), timeout=60.0)


def leader_round(store: BrokerStore, now: float = NOW) -> list[tuple[int, str]]:
    """What a leading daemon runs each round (queues all exist here); returns the sessions
    the sweep closed."""
    closed: list[tuple[int, str]] = []
    expire_sessions(store, lambda rec, why: closed.append((rec.id, why)), now)
    fail_vanished_sessions(store, lambda _queue: True, now, {})
    store.sessions.open_ids(prune=True)
    reconcile(store)
    return closed


def read_everything(store: BrokerStore) -> None:
    """What `sessions list`, `hosts` and the autoscaler read besides the leader's round."""
    for s in store.open_sessions():
        store.instances(s.id)
        store.load_errors(s.id)
        for c in store.clients(s.id):
            store.progress(s.id, c).load()
    store.assignments(sorted(store.hosts()))
    store.targets()


def assigned(r: redis.Redis, host_id: str = "h1") -> dict[int, int]:
    return HostStore(r, NAMES).assignments_of(host_id)


# --- garbage: each kind is logged once, skipped, and the farm goes on ---------------------

Garbage = Callable[[redis.Redis, BrokerStore], str]


def non_json_session_record(r: redis.Redis, store: BrokerStore) -> str:
    sid = open_session(store)
    r.set(NAMES.session_key(sid), b"{not json")
    return NAMES.session_key(sid)


def mistyped_session_record(r: redis.Redis, store: BrokerStore) -> str:
    sid = open_session(store)
    r.set(
        NAMES.session_key(sid), json.dumps({**json.loads(record(sid).to_json()), "min_units": "x"})
    )
    return NAMES.session_key(sid)


def session_record_of_the_wrong_type(r: redis.Redis, store: BrokerStore) -> str:
    sid = open_session(store)
    r.delete(NAMES.session_key(sid))
    r.hset(NAMES.session_key(sid), "state", "running")
    return NAMES.session_key(sid)


def non_integer_accepted(r: redis.Redis, store: BrokerStore) -> str:
    sid = open_session(store, state=SessionState.RUNNING, durable=True)
    store.add_client(sid, "c")
    ProgressStore(r, NAMES, sid, "c").create()
    r.hset(NAMES.client_key(sid, "c"), "accepted", "lots")
    return NAMES.client_key(sid, "c")


def junk_member_in_the_sessions_set(r: redis.Redis, store: BrokerStore) -> str:
    r.sadd(NAMES.sessions_key, "junk", "-3")
    return NAMES.sessions_key


def sessions_set_of_the_wrong_type(r: redis.Redis, store: BrokerStore) -> str:
    r.set(NAMES.sessions_key, "not a set")
    return NAMES.sessions_key


def junk_client_id(r: redis.Redis, store: BrokerStore) -> str:
    sid = open_session(store)
    r.sadd(NAMES.session_clients_key(sid), "no spaces allowed", "ok")
    return NAMES.session_clients_key(sid)


def garbage_host_record(r: redis.Redis, store: BrokerStore) -> str:
    r.hset(NAMES.hosts_key, "ghost", b"\xff\xfe not a host")
    return NAMES.hosts_key


def mistyped_host_record(r: redis.Redis, store: BrokerStore) -> str:
    r.hset(NAMES.hosts_key, "ghost", json.dumps({"id": "ghost", "cores": "many"}))
    return NAMES.hosts_key


def garbage_assignments(r: redis.Redis, store: BrokerStore) -> str:
    r.hset(NAMES.host_assignments_key("h1"), mapping={"x": "1", "99": "many"})
    return NAMES.host_assignments_key("h1")


def garbage_instance_record(r: redis.Redis, store: BrokerStore) -> str:
    sid = open_session(store)
    r.hset(NAMES.session_instances_key(sid), "h9.1.0", "[1, 2")
    return NAMES.session_instances_key(sid)


def garbage_targets(r: redis.Redis, store: BrokerStore) -> str:
    r.hset(NAMES.targets_key, mapping={"one": "1", "2": "two"})
    return NAMES.targets_key


def garbage_id_counter(r: redis.Redis, store: BrokerStore) -> str:
    open_session(store)
    r.set(NAMES.session_counter_key, "seven")
    return NAMES.session_counter_key


KINDS: list[Garbage] = [
    non_json_session_record,
    mistyped_session_record,
    session_record_of_the_wrong_type,
    non_integer_accepted,
    junk_member_in_the_sessions_set,
    sessions_set_of_the_wrong_type,
    junk_client_id,
    garbage_host_record,
    mistyped_host_record,
    garbage_assignments,
    garbage_instance_record,
    garbage_targets,
    garbage_id_counter,
]


@pytest.mark.parametrize("kind", KINDS, ids=[k.__name__ for k in KINDS])
def test_garbage_is_logged_once_and_the_broker_goes_on_allocating(
    kind: Garbage, r: redis.Redis, store: BrokerStore
) -> None:
    live_host(r)
    key = kind(r, store)
    with structlog.testing.capture_logs() as logs:
        for i in range(3):  # three rounds: the first logs, the others are quiet
            leader_round(store, NOW + i)
            read_everything(store)
        # a new session after the garbage is served like any other
        sid = open_session(store)
        leader_round(store, NOW + 3)
        info = store.get_session(sid)
    assert assigned(r).get(sid) == 1
    assert info is not None and info.state == SessionState.RUNNING
    if kind is garbage_id_counter:
        # a counter that is not a number is restarted above the open sessions' ids
        assert sid == 2
        return
    reports = [e for e in logs if e["event"] == "redis_garbage_skipped"]
    assert reports, f"nothing reported for {key}"
    assert {e["key"] for e in reports} == {key}
    assert len(reports) == len({(e["key"], e["error"]) for e in reports})  # each once


def test_the_leader_cleans_up_what_it_can_and_leaves_session_records(
    r: redis.Redis, store: BrokerStore
) -> None:
    live_host(r)
    r.sadd(NAMES.sessions_key, "junk")
    r.hset(NAMES.hosts_key, "ghost", "garbage")  # no heartbeat: a dead host's garbage
    r.hset(NAMES.host_assignments_key("h1"), "x", "1")
    corrupt = open_session(store)
    r.set(NAMES.session_key(corrupt), "garbage")
    leader_round(store)
    assert r.smembers(NAMES.sessions_key) == {str(corrupt).encode()}
    assert r.hkeys(NAMES.hosts_key) == [b"h1"]
    assert b"x" not in r.hkeys(NAMES.host_assignments_key("h1"))
    # the corrupt record stays for an operator, who is told why it cannot be used
    assert r.get(NAMES.session_key(corrupt)) == b"garbage"
    assert store.get_session(corrupt) is None
    with pytest.raises(DecodeError, match=f"Redis key {NAMES.session_key(corrupt)}"):
        store.sessions.load(corrupt)


def test_a_live_hosts_unreadable_record_is_left_for_its_next_beat(
    r: redis.Redis, store: BrokerStore
) -> None:
    live_host(r, "h1")
    live_host(r, "h2")
    r.hset(NAMES.hosts_key, "h2", "garbage")
    sid = open_session(store, min_units=2, max_units=2)
    leader_round(store)
    assert r.hexists(NAMES.hosts_key, "h2")  # alive: it rewrites its record itself
    assert assigned(r, "h1") == {sid: 2}
    live_host(r, "h2")
    leader_round(store)
    assert set(store.hosts()) == {"h1", "h2"}


def test_a_hosts_reads_survive_garbage(r: redis.Redis) -> None:
    """What workers/host.py reads each round: assignments, load reports, session records."""
    hosts, sessions = HostStore(r, NAMES), SessionStore(r, NAMES)
    r.hset(NAMES.host_assignments_key("h1"), mapping={"3": "2", "x": "y"})
    hosts.report_load("h1", "h1.3.0", InstanceLoad(3, 1, 0.5, 1.0))
    r.hset(NAMES.host_load_key("h1"), "h1.3.1", '{"session": "x"}')
    r.set(NAMES.session_key(3), "[")
    r.hset(NAMES.client_key(3, "c"), mapping={"accepted": "1e9", "total": "?", "done": "2"})
    assert hosts.assignments_of("h1") == {3: 2}
    assert hosts.loads("h1") == {"h1.3.0": InstanceLoad(3, 1, 0.5, 1.0)}
    assert sessions.get(3) is None
    progress = ProgressStore(r, NAMES, 3, "c").load()
    assert (progress.accepted, progress.done, progress.total) == (0, 2, None)


def test_deeply_nested_json_is_garbage_not_a_crash(r: redis.Redis, store: BrokerStore) -> None:
    sid = open_session(store)
    r.set(NAMES.session_key(sid), "[" * 100_000)
    assert store.open_sessions() == []


# --- cooperating daemons ------------------------------------------------------------------


def test_one_lease_holder_at_a_time_and_a_released_lease_passes_at_once(
    r: redis.Redis,
) -> None:
    a, b = Lease(r, NAMES, "a"), Lease(r, NAMES, "b")
    assert a.hold()
    assert not b.hold()
    assert a.hold()  # renewing
    assert a.current() == "a"
    a.release()
    assert b.hold()
    assert not a.hold()
    b.release()
    b.release()  # harmless
    assert a.current() is None


def test_an_expired_lease_is_taken_over(r: redis.Redis) -> None:
    a, b = Lease(r, NAMES, "a", seconds=0.05), Lease(r, NAMES, "b")
    assert a.hold()
    assert not b.hold()
    _wait_gone(r, leader_key(NAMES))  # "a" was SIGKILLed: nobody renews its lease
    assert b.hold()
    assert not a.hold()


@pytest.mark.parametrize("junk", ["no expiry", "wrong type"])
def test_a_garbage_lease_does_not_block_every_daemon(r: redis.Redis, junk: str) -> None:
    if junk == "no expiry":
        r.set(leader_key(NAMES), "someone long gone")
    else:
        r.rpush(leader_key(NAMES), "x")
    assert Lease(r, NAMES, "a").hold()
    assert r.pttl(leader_key(NAMES)) > 0


def test_a_stale_decision_never_undoes_a_close_answered_by_another_daemon(
    r: redis.Redis, store: BrokerStore
) -> None:
    live_host(r)
    durable = open_session(store, durable=True, state=SessionState.RUNNING)
    interactive = open_session(store, state=SessionState.RUNNING)
    stale = {s.id: s for s in store.open_sessions()}
    # another daemon closes both meanwhile
    store.update_session(durable, lambda s: _replace(s, state=SessionState.CLOSED))
    store.delete_session(interactive)
    # the leader acts on what it read before: nothing comes back
    from soafarm.broker.assignment import _set_state

    _set_state(store, stale[durable], SessionState.QUEUED)
    _set_state(store, stale[interactive], SessionState.QUEUED)
    closed = store.get_session(durable)
    assert closed is not None and closed.state == SessionState.CLOSED
    assert store.get_session(interactive) is None
    assert store.sessions.open_ids() == [durable]


def test_update_retries_on_the_fresh_record(r: redis.Redis, store: BrokerStore) -> None:
    sid = open_session(store)
    calls = 0

    def change(current: SessionRecord) -> SessionRecord:
        nonlocal calls
        calls += 1
        if calls == 1:  # someone else writes between our read and our write
            r.set(NAMES.session_key(sid), _replace(current, owner="other").to_json())
        return _replace(current, data={**current.data, "x": "k"})

    updated = store.update_session(sid, change)
    assert calls == 2
    assert updated is not None and (updated.owner, updated.data) == ("other", {"x": "k"})


def test_delete_returns_a_client_id_attached_during_the_close(
    r: redis.Redis, store: BrokerStore
) -> None:
    sid = open_session(store)
    store.add_client(sid, "early")
    original = store.sessions.clients

    def clients_then_attach(session_id: int) -> list[str]:
        seen = original(session_id)
        store.add_client(session_id, "late")  # another daemon's attach lands here
        ProgressStore(r, NAMES, session_id, "late").create()
        return seen

    store.sessions.clients = clients_then_attach  # type: ignore[method-assign]
    assert store.delete_session(sid) == ["early", "late"]
    assert not r.exists(NAMES.client_key(sid, "late"))


# --- session ids across Redis coming back empty ----------------------------------------------


def test_ids_resume_above_the_mark_when_redis_comes_back_empty(r: redis.Redis) -> None:
    sessions, mark = SessionStore(r, NAMES), MemoryMark()
    used = [sessions.new_session_id(mark) for _ in range(5)]
    assert used == [1, 2, 3, 4, 5]
    assert mark.ceiling == ID_BLOCK and mark.writes == 1  # one write per block
    r.flushall()  # Redis restarted without persistence
    sid = sessions.new_session_id(mark)
    assert sid == ID_BLOCK + 1  # never 1 again: old queues of ids 1..5 may remain
    assert sessions.lost_below() == ID_BLOCK
    assert mark.ceiling == 2 * ID_BLOCK


def test_a_fresh_namespace_starts_at_one_and_says_nothing_was_lost(r: redis.Redis) -> None:
    sessions = SessionStore(r, NAMES)
    assert not sessions.ids_known()
    assert sessions.new_session_id(MemoryMark()) == 1
    assert sessions.lost_below() == 0
    assert sessions.ids_known()


def test_each_block_is_marked_before_its_first_id_is_used(r: redis.Redis) -> None:
    sessions, mark = SessionStore(r, NAMES), MemoryMark()
    for _ in range(ID_BLOCK):
        sid = sessions.new_session_id(mark)
        assert mark.ceiling > sid
    assert mark.writes == 2


# --- hosts lost, queues vanished, units released ----------------------------------------------


def test_a_lost_hosts_instance_records_go_with_it(r: redis.Redis, store: BrokerStore) -> None:
    live_host(r, "h1")
    HostStore(r, NAMES).beat(HostRecord("h2", "box", 2, 4, 0.0), timeout=60.0)
    sid = open_session(store, min_units=1, max_units=4)
    instances = InstanceStore(r, NAMES)
    instances.register(sid, InstanceRecord("h1.1.0", "h1", 10, 0.0))
    instances.register(sid, InstanceRecord("h2.1.0", "h2", 20, 0.0))
    r.hset(NAMES.session_instances_key(sid), "h2.1.1", "garbage")
    r.delete(NAMES.host_heartbeat_key("h2"))  # h2 SIGKILLed: its heartbeat expired
    leader_round(store)
    assert [i.id for i in store.instances(sid)] == ["h1.1.0"]
    assert r.hkeys(NAMES.session_instances_key(sid)) == [b"h1.1.0"]
    assert not r.exists(NAMES.host_load_key("h2"))


def test_a_vanished_interactive_queue_fails_its_session_at_once(store: BrokerStore) -> None:
    sid = open_session(store, state=SessionState.RUNNING)
    kept = open_session(store, state=SessionState.RUNNING)
    gone = {store.names.request_queue(sid)}
    failed = fail_vanished_sessions(store, lambda q: q not in gone, NOW, {})
    assert failed == [sid]
    info = store.get_session(sid)
    assert info is not None and info.state == SessionState.FAILED
    assert "a RabbitMQ restart loses interactive sessions' queues" in info.error
    kept_info = store.get_session(kept)
    assert kept_info is not None and kept_info.state == SessionState.RUNNING


def test_a_durable_queue_must_stay_missing_for_the_grace(store: BrokerStore) -> None:
    sid = open_session(store, state=SessionState.RUNNING, durable=True)
    missing: dict[int, float] = {}
    assert fail_vanished_sessions(store, lambda _q: False, NOW, missing) == []
    assert fail_vanished_sessions(store, lambda _q: True, NOW + 1, missing) == []
    assert missing == {}  # it came back: the clock starts over
    assert fail_vanished_sessions(store, lambda _q: False, NOW + 2, missing) == []
    later = NOW + 2 + DURABLE_QUEUE_GRACE
    assert fail_vanished_sessions(store, lambda _q: False, later, missing) == [sid]


def test_a_closed_or_failed_session_is_not_failed_for_its_missing_queue(
    store: BrokerStore,
) -> None:
    open_session(store, state=SessionState.CLOSED, durable=True)
    open_session(store, state=SessionState.FAILED, error="could not load")
    assert fail_vanished_sessions(store, lambda _q: False, NOW, {}) == []
    assert [s.error for s in store.open_sessions()] == ["", "could not load"]


def durable_with_client(
    r: redis.Redis, store: BrokerStore, release: float = 60.0, **changes: Any
) -> tuple[int, ProgressStore]:
    settings = BrokerSettings(
        client_connection_timeout=1e9, client_idle_timeout=30.0, durable_release_timeout=release
    )
    sid = open_session(store, durable=True, broker_settings=settings, **changes)
    store.add_client(sid, "c")
    progress = ProgressStore(r, NAMES, sid, "c")
    progress.create()
    return sid, progress


def test_a_finished_unread_durable_batch_releases_its_units_and_gets_them_back(
    r: redis.Redis, store: BrokerStore
) -> None:
    live_host(r)
    sid, progress = durable_with_client(r, store)
    progress.seal(10)
    r.hset(NAMES.client_key(sid, "c"), "done", 10)  # every request answered, client gone
    leader_round(store, NOW)
    assert assigned(r) == {sid: 1}
    leader_round(store, NOW + 59)
    assert assigned(r) == {sid: 1}
    leader_round(store, NOW + 60)
    released = store.get_session(sid)
    assert released is not None and released.state == SessionState.RELEASED
    assert assigned(r) == {}
    assert store.targets() == {}
    # still open, still readable; a client sending more brings the units back
    progress.record_accepted(15)
    leader_round(store, NOW + 61)
    back = store.get_session(sid)
    assert back is not None and back.state == SessionState.RUNNING
    assert back.quiet_since == 0.0
    assert assigned(r) == {sid: 1}


def test_a_connected_client_or_outstanding_work_keeps_the_units(
    r: redis.Redis, store: BrokerStore
) -> None:
    live_host(r)
    busy, progress = durable_with_client(r, store)
    progress.record_accepted(5)  # a failed submit that got 5 requests in: they still run
    watched, _ = durable_with_client(r, store)
    store.sessions.beat(watched, "client:1", at=NOW + 100)
    for t in (NOW, NOW + 100, NOW + 120):
        leader_round(store, t)
    assert assigned(r) == {busy: 1, watched: 1}
    # the watcher leaves: released a release timeout after its handle went stale
    leader_round(store, NOW + 131)
    leader_round(store, NOW + 191)
    assert assigned(r) == {busy: 1}


def test_release_timeout_zero_releases_at_the_first_quiet_round(
    r: redis.Redis, store: BrokerStore
) -> None:
    live_host(r)
    sid, _ = durable_with_client(r, store, release=0.0)
    leader_round(store)
    released = store.get_session(sid)
    assert released is not None and released.state == SessionState.RELEASED


def _replace(current: SessionRecord, **changes: Any) -> SessionRecord:
    import dataclasses

    return dataclasses.replace(current, **changes)


def _wait_gone(r: redis.Redis, key: str) -> None:
    from tests.waiting import wait_until

    wait_until(f"{key} to expire", lambda: not r.exists(key), 5)


# --- the daemon's round: only the leader allocates, and nothing stops it ------------------------


class _Probe:
    def exists(self, _queue: str) -> bool:
        return True

    def exists_many(self, queues: list[str]) -> dict[str, bool]:
        return dict.fromkeys(queues, True)


def daemons(monkeypatch: pytest.MonkeyPatch, r: redis.Redis, count: int) -> list[Any]:
    from soafarm.broker import daemon as module
    from soafarm.config import load_settings

    monkeypatch.setattr(module, "redis_client", lambda _settings: r)
    settings = load_settings(environ={}).replace(namespace=NAMES.namespace)
    return [module.BrokerDaemon(settings) for _ in range(count)]


def test_only_the_lease_holder_runs_the_rounds_and_a_stopped_one_hands_over(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis, store: BrokerStore
) -> None:
    a, b = daemons(monkeypatch, r, 2)
    live_host(r)
    sid = open_session(store)
    b.round(None, _Probe())
    a.round(None, _Probe())
    assert (b.leading, a.leading) == (True, False)
    assert assigned(r) == {sid: 1}
    # the follower never writes: an assignment it would undo stays
    r.delete(NAMES.host_assignments_key("h1"))
    a.round(None, _Probe())
    assert assigned(r) == {}
    # the leader stops cleanly (run()'s finally releases): the follower leads at once
    b.lease.release()
    a.round(None, _Probe())
    assert a.leading
    assert assigned(r) == {sid: 1}


def test_a_failing_phase_is_logged_once_and_the_others_still_run(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis, store: BrokerStore
) -> None:
    from soafarm.broker import daemon as module

    (d,) = daemons(monkeypatch, r, 1)

    def broken(*_args: Any) -> None:
        raise RuntimeError("a bug in the sweep")

    monkeypatch.setattr(module, "expire_sessions", broken)
    live_host(r)
    sid = open_session(store)
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            d.round(None, _Probe())
    assert assigned(r) == {sid: 1}  # the allocator ran regardless
    failures = [e for e in logs if e["event"] == "broker_round_failed"]
    assert len(failures) == 1 and "a bug in the sweep" in failures[0]["error"]
