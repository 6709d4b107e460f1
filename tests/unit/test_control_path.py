"""The control path's bulk reads and schedules over an in-memory Redis: one script call per
chunk of sessions says what a read per session and key said (garbage included), the
allocator's heap hands out units as its scan did, the daemon sweeps less often than it
allocates, and a session's Redis client is shared by its clients until the last lets go."""

from __future__ import annotations

import dataclasses
import random
import time
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import redis
import structlog.testing

from soafarm.broker import allocator
from soafarm.broker.allocator import Demand, allocate
from soafarm.broker.store import BrokerStore
from soafarm.config import BrokerSettings
from soafarm.errors import DecodeError
from soafarm.resources import HostSize, unit_cores, units_per_host
from soafarm.state.batch import Batch
from soafarm.state.clients import DoneMarker, ProgressStore
from soafarm.state.hosts import HostStore
from soafarm.state.records import HostRecord, LoadError, SessionRecord, SessionState
from soafarm.state.sessions import SCRIPT_CHUNK, SessionStore
from soafarm.transport.connections import SharedRedis
from tests.unit.fakes import NAMES


@pytest.fixture
def sessions(r: redis.Redis) -> SessionStore:
    return SessionStore(r, NAMES)


def record(sid: int, **changes: Any) -> SessionRecord:
    fields: dict[str, Any] = {
        "id": sid,
        "service": "echo",
        "version": None,
        "state": SessionState.QUEUED,
        "min_units": 0,
        "max_units": 1,
        "priority": 2000,
        "resource_unit": "core",
        "created": 1000.0,
        "owner": "me",
        "broker_settings": BrokerSettings(),
    }
    fields.update(changes)
    return SessionRecord(**fields)


def with_client(r: redis.Redis, sessions: SessionStore, sid: int, cid: str, accepted: int) -> None:
    sessions.add_client(sid, cid)
    progress = ProgressStore(r, NAMES, sid, cid)
    progress.create()
    progress.record_accepted(accepted)


def reported(logs: Sequence[Mapping[str, Any]]) -> set[str]:
    return {e["key"] for e in logs if e["event"] == "redis_garbage_skipped"}


# --- demand facts: outstanding work and load errors in one call -----------------------------


def test_demand_facts_match_the_reads_one_key_at_a_time(
    r: redis.Redis, sessions: SessionStore
) -> None:
    for sid in (1, 2, 3):
        sessions.save(record(sid))
    with_client(r, sessions, 1, "a", 10)
    with_client(r, sessions, 1, "b", 4)
    DoneMarker(r, NAMES).mark(1, "a", [(0, False), (1, True), (2, False)])
    with_client(r, sessions, 2, "a", 0)
    sessions.record_load_error(2, "h1", "no module")
    facts = sessions.demand_facts([1, 2, 3])
    assert LoadError.parse(facts[2][1].pop("h1")).why == "no module"
    assert sessions.load_errors(2) == {"h1": "no module"}
    assert facts == {1: (7 + 4, {}), 2: (0, {}), 3: (0, {})}
    assert {sid: n for sid, (n, _e) in facts.items()} == sessions.outstanding([1, 2, 3])


def test_demand_facts_skip_and_report_garbage_as_the_one_key_reads_do(
    r: redis.Redis, sessions: SessionStore
) -> None:
    for sid in (1, 2, 3):
        sessions.save(record(sid))
    with_client(r, sessions, 1, "a", 5)
    r.hset(NAMES.client_key(1, "a"), "done", "lots")  # not a number: counts as 0
    r.set(NAMES.session_clients_key(2), "not a set")
    r.set(NAMES.session_load_errors_key(3), "not a hash")
    with structlog.testing.capture_logs() as logs:
        facts = sessions.demand_facts([1, 2, 3])
    assert facts == {1: (5, {}), 2: (0, {}), 3: (0, {})}
    assert reported(logs) == {
        NAMES.session_clients_key(2),
        NAMES.session_load_errors_key(3),
    }


def test_demand_facts_cover_more_sessions_than_one_script_call(
    r: redis.Redis, sessions: SessionStore
) -> None:
    count = SCRIPT_CHUNK + 3
    for sid in range(1, count + 1):
        sessions.save(record(sid))
        with_client(r, sessions, sid, "c", sid)
    facts = sessions.demand_facts(range(1, count + 1))
    assert {sid: n for sid, (n, _e) in facts.items()} == {sid: sid for sid in range(1, count + 1)}


# --- activity: handles and client ids in one call -------------------------------------------


def test_activity_drops_old_handles_and_says_who_has_a_client(
    r: redis.Redis, sessions: SessionStore
) -> None:
    for sid in (1, 2, 3):
        sessions.save(record(sid))
    sessions.beat(1, "old", at=100.0)
    sessions.beat(1, "new", at=200.0)
    sessions.add_client(1, "a")
    sessions.beat(2, "new", at=300.0)
    assert sessions.activity({1: 150.0, 2: 150.0, 3: 150.0}) == {
        1: (1, True),
        2: (1, False),
        3: (0, False),
    }
    assert r.zrange(NAMES.session_handles_key(1), 0, -1) == [b"new"]
    # the same as the reads of one key each
    assert sessions.connected_handles(1, 150.0) == 1
    assert sessions.clients(1) == ["a"]


def test_activity_reports_junk_client_ids_and_keys_of_the_wrong_type(
    r: redis.Redis, sessions: SessionStore
) -> None:
    for sid in (1, 2, 3):
        sessions.save(record(sid))
    r.sadd(NAMES.session_clients_key(1), "no spaces allowed")  # only junk: no client id
    r.sadd(NAMES.session_clients_key(2), "no spaces allowed", "ok")
    r.set(NAMES.session_handles_key(3), "not a sorted set")
    with structlog.testing.capture_logs() as logs:
        assert sessions.activity({1: 0.0, 2: 0.0, 3: 0.0}) == {
            1: (0, False),
            2: (0, True),
            3: (0, False),
        }
    assert reported(logs) == {
        NAMES.session_clients_key(1),
        NAMES.session_clients_key(2),
        NAMES.session_handles_key(3),
    }


# --- open sessions: members and records in one call -----------------------------------------


def test_open_sessions_are_read_in_one_call_oldest_first_and_garbage_is_reported(
    r: redis.Redis, sessions: SessionStore
) -> None:
    for sid in (12, 3, 7):
        sessions.save(record(sid))
    r.sadd(NAMES.sessions_key, "junk", "99")  # 99 has no record: skipped quietly
    r.set(NAMES.session_key(7), b"\xff\xfe{not json")
    sessions.save(record(8))
    r.delete(NAMES.session_key(8))
    r.hset(NAMES.session_key(8), "state", "running")
    with structlog.testing.capture_logs() as logs:
        found = sessions.open_sessions()
    assert [s.id for s in found] == [3, 12]
    assert found[0] == record(3)
    assert reported(logs) == {NAMES.sessions_key, NAMES.session_key(7), NAMES.session_key(8)}


def test_a_record_is_decoded_again_only_when_its_text_changed(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis, sessions: SessionStore
) -> None:
    sessions.save(record(1))
    sessions.save(record(2))
    first = sessions.open_sessions()
    decoded: list[int] = []
    original = SessionRecord.from_json

    def counting(raw: bytes | str) -> SessionRecord:
        decoded.append(1)
        return original(raw)

    monkeypatch.setattr(SessionRecord, "from_json", staticmethod(counting))
    assert sessions.open_sessions() == first
    assert decoded == []
    sessions.update(2, lambda s: dataclasses.replace(s, state=SessionState.RUNNING))
    decoded.clear()
    again = sessions.open_sessions()
    assert [s.state for s in again] == [SessionState.QUEUED, SessionState.RUNNING]
    assert len(decoded) == 1


def test_open_sessions_of_a_sessions_set_of_the_wrong_type_is_empty_and_reported(
    r: redis.Redis, sessions: SessionStore
) -> None:
    r.set(NAMES.sessions_key, "not a set")
    with structlog.testing.capture_logs() as logs:
        assert sessions.open_sessions() == []
    assert reported(logs) == {NAMES.sessions_key}


# --- batches ---------------------------------------------------------------------------------


def test_a_batch_raises_each_reads_own_error_where_its_value_is_used(
    r: redis.Redis, sessions: SessionStore
) -> None:
    sessions.save(record(1))
    r.set(NAMES.session_key(2), "{corrupt")
    batch = Batch(r)
    good = sessions.read_load(batch, 1)
    corrupt = sessions.read_load(batch, 2)
    missing = sessions.read_load(batch, 3)
    assert len(batch) == 3
    batch.run()
    assert good.value == record(1)
    assert missing.value is None
    with pytest.raises(DecodeError, match=NAMES.session_key(2)):
        corrupt.value  # noqa: B018


def test_describe_reads_use_one_target_field(r: redis.Redis, sessions: SessionStore) -> None:
    sessions.set_targets({1: 2})
    batch = Batch(r)
    one, other = sessions.read_target(batch, 1), sessions.read_target(batch, 5)
    batch.run()
    assert (one.value, other.value) == (2, 0)


# --- the allocator's heap ----------------------------------------------------------------------


def scan_allocate(
    hosts: Mapping[str, HostSize],
    current: Mapping[str, Mapping[int, int]],
    demands: list[Demand],
    excluded: Mapping[int, set[str]],
) -> dict[str, dict[int, int]]:
    """The allocator as it was: every growing session scanned for each unit (reference)."""
    plan = allocator._Plan(hosts, current, excluded)
    started = []
    for d in sorted(demands, key=lambda d: (-d.priority, d.session_id)):
        placed = sum(1 for _ in range(d.min_units) if plan.add(d))
        if placed == d.min_units or (d.running and placed > 0):
            started.append(d)
        else:
            plan.remove(d)
    growing = [d for d in started if plan.units.get(d.session_id, 0) < d.max_units]
    while growing:
        best = max(
            growing,
            key=lambda d: (
                allocator.weight(d.outstanding) / (plan.cores.get(d.session_id, 0) + 1),
                d.priority,
                -d.session_id,
            ),
        )
        if not plan.add(best) or plan.units[best.session_id] >= best.max_units:
            growing.remove(best)
    return {h: {s: n for s, n in a.items() if n} for h, a in plan.result.items()}


def test_the_heap_hands_out_units_exactly_as_the_scan_did() -> None:
    rnd = random.Random(14)
    for _ in range(400):
        hosts = {
            f"h{i}": HostSize(rnd.choice([0, 1, 2, 4, 8]), rnd.choice([1, 2]))
            for i in range(rnd.randint(0, 3))
        }
        demands = []
        for sid in rnd.sample(range(1, 40), rnd.randint(0, 15)):
            low = rnd.randint(0, 3)
            demands.append(
                Demand(
                    sid,
                    low,
                    max(low, 1) + rnd.choice([0, 1, 4, 2**31]),
                    rnd.choice([1000, 2000]),
                    rnd.choice(["core", "core", "socket", "node"]),
                    rnd.choice([0, 3, 100, 5000]),
                    rnd.random() < 0.5,
                )
            )
        current = {h: {d.session_id: 1 for d in demands[:2]} for h in hosts}
        excluded = {d.session_id: {h for h in hosts if rnd.random() < 0.2} for d in demands}
        assert allocate(hosts, current, demands, excluded) == scan_allocate(
            hosts, current, demands, excluded
        )


def test_idle_sessions_are_not_each_tried_once_the_farm_is_full(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tries: list[int] = []
    original = allocator._Plan.add

    def counting(plan: Any, demand: Demand) -> bool:
        tries.append(demand.session_id)
        return original(plan, demand)

    monkeypatch.setattr(allocator._Plan, "add", counting)
    demands = [Demand(sid, 0, 1, 2000) for sid in range(1, 1001)]
    got = allocate({"a": HostSize(2)}, {}, demands)
    assert got == {"a": {1: 1, 2: 1}}
    assert len(tries) == 2
    # a node unit on a host of 0 cores takes no core: such a host never counts as full
    assert unit_cores("node", HostSize(0)) == 0 and units_per_host("node", HostSize(0)) == 1
    assert allocate({"z": HostSize(0)}, {}, [Demand(1, 0, 1, 2000, "node")]) == {"z": {1: 1}}


# --- the daemon's schedule -----------------------------------------------------------------


class _Probe:
    def exists(self, _queue: str) -> bool:
        return True

    def exists_many(self, queues: list[str]) -> dict[str, bool]:
        return dict.fromkeys(queues, True)


def test_the_sweep_runs_once_a_second_and_allocation_every_round(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    from soafarm.broker import daemon as module
    from soafarm.config import load_settings

    monkeypatch.setattr(module, "redis_client", lambda _settings: r)
    clock = [100.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    monkeypatch.setattr(f"{module.__name__}.time", fake_time)
    calls: list[str] = []
    monkeypatch.setattr(module, "expire_sessions", lambda *_a: calls.append("sweep"))
    monkeypatch.setattr(module, "reconcile", lambda *_a: calls.append("allocate"))
    d = module.BrokerDaemon(load_settings(environ={}).replace(namespace=NAMES.namespace))
    for _ in range(4):  # a second of rounds
        d.round(None, _Probe())  # type: ignore[arg-type]
        clock[0] += module.RECONCILE_INTERVAL
    assert calls.count("sweep") == 1 and calls.count("allocate") == 4
    # a create between rounds: the allocator alone, at once, without renewing the lease
    calls.clear()
    holds: list[int] = []
    hold = d.lease.hold

    def counted_hold() -> bool:
        holds.append(1)
        return hold()

    monkeypatch.setattr(d.lease, "hold", counted_hold)
    d.allocate_now(None, _Probe())  # type: ignore[arg-type]
    assert (calls, holds) == (["allocate"], [])
    # a lease not renewed lately is renewed first (a whole round)
    clock[0] += module.LEASE_FRESH
    d.allocate_now(None, _Probe())  # type: ignore[arg-type]
    assert holds == [1] and calls[-1] == "allocate"


def test_a_failing_sweep_is_logged_once_though_allocations_succeed_between(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    from soafarm.broker import daemon as module
    from soafarm.config import load_settings

    monkeypatch.setattr(module, "redis_client", lambda _settings: r)
    clock = [100.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    monkeypatch.setattr(f"{module.__name__}.time", fake_time)

    def broken(*_args: Any) -> None:
        raise RuntimeError("a bug in the sweep")

    monkeypatch.setattr(module, "expire_sessions", broken)
    HostStore(r, NAMES).beat(HostRecord("h1", "box", 1, 2, 0.0), timeout=60.0)
    store = BrokerStore(r, NAMES)
    store.save_session(record(1, min_units=1))
    d = module.BrokerDaemon(load_settings(environ={}).replace(namespace=NAMES.namespace))
    with structlog.testing.capture_logs() as logs:
        for _ in range(12):  # three seconds: three sweeps, each failing the same way
            d.round(None, _Probe())  # type: ignore[arg-type]
            d.allocate_now(None, _Probe())  # type: ignore[arg-type]
            clock[0] += module.RECONCILE_INTERVAL
    assert HostStore(r, NAMES).assignments_of("h1") == {1: 1}
    failures = [e for e in logs if e["event"] == "broker_round_failed"]
    assert len(failures) == 1 and "a bug in the sweep" in failures[0]["error"]


# --- a session's Redis client, shared ----------------------------------------------------------


def test_a_shared_redis_client_closes_with_its_last_user() -> None:
    closed: list[int] = []

    class Client:
        def close(self) -> None:
            closed.append(1)

    shared = SharedRedis(Client())  # type: ignore[arg-type]
    assert shared.share() is shared.client
    shared.release()  # the session closed first
    assert closed == []
    shared.release()  # its client closes last
    assert closed == [1]


# --- the leader reads every record only when some session was written ----------------------


def test_unchanged_records_are_not_read_again_and_any_write_is_seen_at_once(
    r: redis.Redis, sessions: SessionStore
) -> None:
    other = SessionStore(r, NAMES)  # another broker daemon's store
    sessions.save(record(1))
    assert [s.id for s in sessions.open_sessions(max_age=60.0)] == [1]
    r.set(NAMES.session_key(1), record(1, priority=1).to_json())  # by hand: not seen yet
    assert sessions.open_sessions(max_age=60.0)[0].priority == 2000
    other.save(record(2))  # any write of the store is seen at the next read
    assert [(s.id, s.priority) for s in sessions.open_sessions(max_age=60.0)] == [(1, 1), (2, 2000)]
    other.update(2, lambda s: dataclasses.replace(s, state=SessionState.RUNNING))
    assert sessions.open_sessions(max_age=60.0)[1].state == SessionState.RUNNING
    other.delete(1)
    assert [s.id for s in sessions.open_sessions(max_age=60.0)] == [2]
    # without max_age every call reads every record
    r.set(NAMES.session_key(2), record(2, priority=5).to_json())
    assert sessions.open_sessions()[0].priority == 5


def test_the_generation_goes_with_the_last_open_session(
    r: redis.Redis, sessions: SessionStore
) -> None:
    sessions.save(record(1))
    sessions.save(record(2))
    generation = f"{NAMES.namespace}:sessions:generation"
    assert r.exists(generation)
    sessions.delete(1)
    assert r.exists(generation)
    sessions.delete(2)
    assert not r.exists(generation)
    # a reader that saw the old generation reads everything again
    sessions.save(record(3))
    assert [s.id for s in sessions.open_sessions(max_age=60.0)] == [3]


def test_the_memo_reads_new_sessions_facts_at_once_and_the_rest_once_a_second(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    from soafarm.broker import assignment

    store = BrokerStore(r, NAMES)
    read: list[list[int]] = []
    original = store.sessions.demand_facts

    def counting(ids: Any) -> Any:
        read.append(list(ids))
        return original(ids)

    monkeypatch.setattr(store.sessions, "demand_facts", counting)
    clock = [50.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0])
    monkeypatch.setattr(f"{assignment.__name__}.time", fake_time)
    memo = assignment.RoundMemo(facts_max_age=1.0)
    assert memo.facts_of(store, [1, 2]) == {1: (0, {}), 2: (0, {})}
    clock[0] += 0.25
    store.sessions.record_load_error(3, "h1", "boom")
    outstanding, errors = memo.facts_of(store, [1, 3])[3]
    assert (outstanding, {h: LoadError.parse(e).why for h, e in errors.items()}) == (
        0,
        {"h1": "boom"},
    )
    assert read == [[1, 2], [3]]
    clock[0] += 1.0
    memo.facts_of(store, [1, 3])
    assert read[-1] == [1, 3]
    # the allocator runs again only when its inputs changed
    calls: list[int] = []

    def counted_allocate(*_args: Any, **_kwargs: Any) -> dict[str, dict[int, int]]:
        calls.append(1)
        return {"h": {1: 1}}

    monkeypatch.setattr(assignment, "allocate", counted_allocate)
    inputs: Any = ({"h": HostSize(2)}, {}, [Demand(1, 0, 1, 2000)], {})
    assert memo.allocate(*inputs) == memo.allocate(*inputs) == {"h": {1: 1}}
    assert len(calls) == 1


class _RecordingProbe:
    def __init__(self, missing: set[str]) -> None:
        self.missing = missing
        self.asked: list[list[str]] = []

    def exists(self, queue: str) -> bool:
        self.asked.append([queue])
        return queue not in self.missing

    def exists_many(self, queues: list[str]) -> dict[str, bool]:
        self.asked.append(list(queues))
        return {q: q not in self.missing for q in queues}


def test_queues_are_checked_whole_after_a_connect_then_in_slices_and_misses_each_round(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    from soafarm.broker import daemon as module
    from soafarm.config import load_settings

    monkeypatch.setattr(module, "redis_client", lambda _settings: r)
    monkeypatch.setattr(module, "QUEUE_CHECK_SLICE", 3)
    clock = [100.0]
    fake_time = types.SimpleNamespace(monotonic=lambda: clock[0], time=time.time)
    monkeypatch.setattr(f"{module.__name__}.time", fake_time)
    store = BrokerStore(r, NAMES)
    for sid in range(1, 8):
        store.save_session(record(sid, durable=sid == 7))
    gone = NAMES.request_queue(7)  # durable: failed only after the grace
    probe = _RecordingProbe({gone})
    d = module.BrokerDaemon(load_settings(environ={}).replace(namespace=NAMES.namespace))
    d.round(None, probe)  # type: ignore[arg-type]
    assert len(probe.asked[-1]) == 7  # leading afresh: every queue at once
    probe.asked.clear()
    for _ in range(3):
        clock[0] += module.RECONCILE_INTERVAL
        d.round(None, probe)  # type: ignore[arg-type]
    assert probe.asked == [[gone]] * 3  # between passes: only the missing one
    probe.asked.clear()
    clock[0] += module.QUEUE_CHECK_INTERVAL
    for _ in range(3):
        d.round(None, probe)  # type: ignore[arg-type]
        clock[0] += module.RECONCILE_INTERVAL
    slices = [sorted(set(asked) - {gone}) for asked in probe.asked]
    assert slices == [
        [NAMES.request_queue(s) for s in (1, 2, 3)],
        [NAMES.request_queue(s) for s in (4, 5, 6)],
        [],
    ]
    assert all(gone in asked for asked in probe.asked)
    session = store.get_session(7)
    assert session is not None and session.state == SessionState.QUEUED  # still in its grace
    clock[0] += 60.0
    fake_time.time = lambda: time.time() + 60.0
    d.round(None, probe)  # type: ignore[arg-type]
    session = store.get_session(7)
    assert session is not None and session.state == SessionState.FAILED


# --- resolving a service once, while its registration files stay the same ------------------


def test_a_resolution_is_reused_until_a_registration_file_changes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from soafarm.broker.sessions import Resolved
    from soafarm.registration import Registry

    service = tmp_path / "calc.toml"
    service.write_text('entry_point = "calc:Calc"\n[broker]\nsession_idle_timeout = 5\n')
    registry = Registry([tmp_path], include_builtin=False)
    parsed: list[str] = []
    original = registry.resolve

    def counting(name: str, version: str | None = None) -> Any:
        parsed.append(name)
        return original(name, version)

    monkeypatch.setattr(registry, "resolve", counting)
    resolved = Resolved(registry)
    first = resolved.resolve("calc", None)
    assert resolved.resolve("calc", None) is first
    assert parsed == ["calc"]
    settings = resolved.broker_settings(BrokerSettings(), first, {"client_idle_timeout": 7})
    assert (settings.session_idle_timeout, settings.client_idle_timeout) == (5, 7)
    assert resolved.broker_settings(BrokerSettings(), first, {"client_idle_timeout": 7}) is settings
    # an edit is seen by the next create (another size, or another modification time)
    service.write_text('entry_point = "calc:Calc"\n[broker]\nsession_idle_timeout = 60\n')
    again = resolved.resolve("calc", None)
    assert parsed == ["calc", "calc"]
    assert resolved.broker_settings(BrokerSettings(), again, {}).session_idle_timeout == 60


# --- the process's pool of control connections -----------------------------------------------


def test_the_control_pool_lends_one_connection_at_a_time_and_keeps_few_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from soafarm.client import control as module
    from soafarm.config import load_settings

    opened: list[FakeControl] = []

    class FakeControl:
        def __init__(self, settings: Any) -> None:
            self.settings = settings
            self.replies: dict[str, bytes] = {"stale": b""}
            self.closed = False
            opened.append(self)

        def close(self) -> None:
            self.closed = True

    monkeypatch.setattr(module, "ControlClient", FakeControl)
    pool = module._ControlPool()
    a = load_settings(environ={}).replace(namespace="pool-a")
    first, second = pool.take(a), pool.take(a)  # two requests at once: two connections
    assert first is not second and len(opened) == 2
    pool.give(first, reusable=True)
    pool.give(second, reusable=False)  # lost, or an unexpected error: closed
    assert opened[1].closed and not opened[0].closed
    again = pool.take(a)
    assert again is first and again.replies == {}  # stale answers dropped
    pool.give(again, reusable=True)
    # many settings (a namespace per test): the least recently used idle ones are closed
    others = [pool.take(a.replace(namespace=f"pool-{i}")) for i in range(module.POOL_IDLE_TOTAL)]
    for control in others:
        pool.give(control, reusable=True)
    assert opened[0].closed and not any(c.closed for c in opened[2:])
    pool.close_all()
    assert all(c.closed for c in opened)
