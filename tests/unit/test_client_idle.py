"""`client_idle_timeout`'s idle rule: the sweep's script, the client handle's beat and the
client's guard, over an in-memory Redis with the real scripts."""

from __future__ import annotations

import time
from collections.abc import Sequence

import pytest
import redis

from soafarm.broker.lifecycle import SILENT_HANDLE_LIMIT, expire_sessions, idle_check_due
from soafarm.broker.store import BrokerStore
from soafarm.client.heartbeat import Heartbeat, IdleGuard
from soafarm.config import BrokerSettings
from soafarm.errors import ClientIdleTimeout
from soafarm.state.clients import IDLE_OUT, QUIET_AT, SENT_AT, DoneMarker, ProgressStore
from soafarm.state.records import SessionRecord, SessionState, as_text
from soafarm.state.sessions import client_handle
from tests.unit.fakes import NAMES
from tests.waiting import wait_until

CREATED = 1_000.0
LIMIT = 30.0


@pytest.fixture
def store(r: redis.Redis) -> BrokerStore:
    return BrokerStore(r, NAMES)


class Farm:
    """One open session, its client ids' counters and handles, and the sweep at a time."""

    def __init__(
        self, store: BrokerStore, r: redis.Redis, durable: bool = False, **bs: float
    ) -> None:
        self.store, self.r = store, r
        self.closed: list[tuple[int, str]] = []
        self.now = CREATED
        self.sid = store.new_session_id()
        settings = BrokerSettings(
            **{"client_idle_timeout": LIMIT, "session_idle_timeout": 5.0, **bs}  # type: ignore[arg-type]
        )
        store.save_session(
            SessionRecord(
                self.sid, "echo", None, SessionState.RUNNING, 1, 1, 2000, "core", CREATED, "me",
                broker_settings=settings, durable=durable,
            )
        )  # fmt: skip

    def client(self, cid: str, sent_at: float, accepted: int = 0, done: int = 0) -> str:
        """Attach `cid` with a live handle beating at `sent_at`; returns the handle."""
        self.store.add_client(self.sid, cid)
        self.store.progress(self.sid, cid).create()
        self.put(cid, accepted=accepted, done=done, **{SENT_AT: sent_at})
        handle = client_handle(cid, "t")
        self.store.sessions.beat(self.sid, handle, at=sent_at)
        return handle

    def put(self, cid: str, **fields: float) -> None:
        self.r.hset(NAMES.client_key(self.sid, cid), mapping=fields)  # type: ignore[arg-type]

    def field(self, cid: str, name: str) -> str | None:
        raw = self.r.hget(NAMES.client_key(self.sid, cid), name)
        return None if raw is None else as_text(raw)

    def beat(self, handle: str, at: float) -> None:
        """A beat as the handle's heartbeat makes it (a client handle's names its client id)."""
        if handle.startswith("client:"):
            cid = handle.split(":")[1]
            self.store.sessions.beat_client(self.sid, handle, cid, at=at)
        else:
            self.store.sessions.beat(self.sid, handle, at=at)

    def handles(self) -> set[str]:
        members: list[bytes] = self.r.zrange(NAMES.session_handles_key(self.sid), 0, -1)  # type: ignore[assignment]
        return {as_text(m) for m in members}

    def sweep(self, now: float) -> None:
        expire_sessions(self.store, lambda rec, why: self.closed.append((rec.id, why)), now)

    def run_until(self, end: float, beating: Sequence[str] = ()) -> None:
        """The leader's sweeps, once a second up to `end`, with `beating` handles beating."""
        while self.now < end:
            self.now += 1.0
            for handle in beating:
                self.beat(handle, self.now)
            self.sweep(self.now)


def test_a_client_that_sends_nothing_is_disconnected_and_one_that_sends_is_not(
    store: BrokerStore, r: redis.Redis
) -> None:
    farm = Farm(store, r)
    quiet = farm.client("quiet", sent_at=CREATED)
    busy = farm.client("busy", sent_at=CREATED)
    for t in range(5, 30, 5):  # "busy" sends every 5 s, answered at once
        farm.put("busy", accepted=t, done=t, **{SENT_AT: CREATED + t, QUIET_AT: CREATED + t})
        farm.run_until(CREATED + t, beating=[quiet, busy])
    farm.run_until(CREATED + LIMIT - 1, beating=[quiet, busy])
    assert farm.handles() == {quiet, busy}  # 29 s idle: not yet
    farm.put("busy", **{SENT_AT: CREATED + LIMIT})
    # checked about ten times per limit: disconnected within a tenth of it
    farm.run_until(CREATED + LIMIT + LIMIT / 10, beating=[busy])
    assert farm.handles() == {busy}
    assert float(farm.field("quiet", IDLE_OUT) or 0) >= LIMIT
    assert farm.field("busy", IDLE_OUT) is None
    # the disconnected handle's next beat learns why and stays out
    assert (store.sessions.beat_client(farm.sid, quiet, "quiet") or 0) >= LIMIT
    assert farm.handles() == {busy}
    # nothing of it is purged: its counters and its client id stay
    assert farm.field("quiet", "accepted") == "0"
    assert "quiet" in store.clients(farm.sid)
    assert farm.closed == []


def test_a_client_waiting_for_a_long_call_is_not_idle_and_its_clock_starts_at_the_answer(
    store: BrokerStore, r: redis.Redis
) -> None:
    farm = Farm(store, r)
    handle = farm.client("waiter", sent_at=CREATED, accepted=1, done=0)
    farm.run_until(CREATED + 3 * LIMIT, beating=[handle])  # a call of three limits
    assert farm.handles() == {handle}
    farm.put("waiter", done=1, **{QUIET_AT: farm.now})  # as the worker marks it answered
    answered = farm.now
    farm.run_until(answered + LIMIT - 1, beating=[handle])
    assert farm.handles() == {handle}
    farm.run_until(answered + LIMIT + LIMIT / 10, beating=[handle])
    assert farm.handles() == set()


def test_the_worker_marks_when_a_client_id_has_nothing_outstanding(r: redis.Redis) -> None:
    progress = ProgressStore(r, NAMES, 1, "c")
    progress.create()
    progress.record_accepted(3)
    marker = DoneMarker(r, NAMES)
    marker.mark(1, "c", [(0, False), (1, False)])
    assert r.hget(NAMES.client_key(1, "c"), QUIET_AT) is None  # one still running
    before = time.time()
    marker.mark(1, "c", [(2, True)])
    assert float(as_text(r.hget(NAMES.client_key(1, "c"), QUIET_AT) or b"0")) >= before
    assert progress.load().done == 3 and progress.load().faulted == 1


def test_reading_responses_counts_as_activity(store: BrokerStore, r: redis.Redis) -> None:
    farm = Farm(store, r)
    handle = farm.client("reader", sent_at=CREATED, accepted=5, done=5)
    farm.put("reader", read_at=CREATED + 20)
    farm.run_until(CREATED + 20 + LIMIT - 1, beating=[handle])
    assert farm.handles() == {handle}  # read 29 s ago
    farm.run_until(CREATED + 20 + LIMIT + LIMIT / 10, beating=[handle])
    assert farm.handles() == set()


def test_zero_means_no_idle_limit_but_a_silent_handle_still_goes(
    store: BrokerStore, r: redis.Redis
) -> None:
    farm = Farm(store, r, client_idle_timeout=0.0)
    handle = farm.client("c", sent_at=CREATED)
    farm.beat("session:s", CREATED)
    farm.run_until(CREATED + SILENT_HANDLE_LIMIT + 1, beating=[handle])
    assert farm.handles() == {handle}  # never idle; the session handle stopped beating
    assert farm.field("c", IDLE_OUT) is None
    assert farm.closed == []


def test_a_durable_client_is_only_disconnected_and_attaching_again_resets_it(
    store: BrokerStore, r: redis.Redis
) -> None:
    farm = Farm(store, r, durable=True)
    handle = farm.client("d", sent_at=CREATED, accepted=3, done=3)
    farm.put("d", **{QUIET_AT: CREATED})
    farm.run_until(CREATED + LIMIT + LIMIT / 10, beating=["session:s", handle])
    assert farm.handles() == {"session:s"}
    assert farm.closed == []
    assert farm.field("d", "done") == "3" and "d" in store.clients(farm.sid)
    # a new BrokerClient of "d": its first beat clears the disconnection
    again = client_handle("d", "u")
    assert store.sessions.beat_client(farm.sid, again, "d", attaching=True) is None
    assert farm.field("d", IDLE_OUT) is None
    assert store.sessions.beat_client(farm.sid, again, "d") is None
    assert farm.handles() == {"session:s", again}
    assert handle not in farm.handles()


def test_each_session_is_checked_about_ten_times_per_limit() -> None:
    def due(sid: int, limit: float) -> int:
        settings = BrokerSettings(client_idle_timeout=limit)
        record = SessionRecord(
            sid, "echo", None, SessionState.RUNNING, 1, 1, 2000, "core", CREATED, "me",
            broker_settings=settings,
        )  # fmt: skip
        return sum(idle_check_due(record, CREATED + t) for t in range(1, 601))

    assert [due(sid, 300.0) for sid in (1, 2, 3)] == [20, 20, 20]  # 600 s / 30 s
    assert due(1, 1.0) == 600  # a limit of a few seconds: every sweep
    assert due(1, 0.0) == 0


def test_the_client_guard_asks_redis_only_after_a_quiet_spell(
    store: BrokerStore, r: redis.Redis
) -> None:
    farm = Farm(store, r)
    farm.client("c", sent_at=time.time())
    progress = ProgressStore(r, NAMES, farm.sid, "c")
    guard = IdleGuard(progress, farm.sid, "c", limit=LIMIT)
    farm.put("c", **{IDLE_OUT: 31.0})  # disconnected, the heartbeat has not seen it yet
    guard.before_publish()  # sent less than half the limit ago: no question asked
    guard.recorded_at -= LIMIT / 2
    expected = r"idle for 31s \(nothing sent, read or outstanding; client_idle_timeout 30s\)"
    with pytest.raises(ClientIdleTimeout, match=expected):
        guard.before_publish()
    with pytest.raises(ClientIdleTimeout, match='broker_settings=\\{"client_idle_timeout"'):
        guard.check()


def test_the_client_guard_moves_the_last_send_before_publishing(
    store: BrokerStore, r: redis.Redis
) -> None:
    farm = Farm(store, r)
    farm.client("c", sent_at=CREATED)
    guard = IdleGuard(ProgressStore(r, NAMES, farm.sid, "c"), farm.sid, "c", limit=LIMIT)
    guard.recorded_at -= LIMIT
    before = time.time()
    guard.before_publish()
    assert float(farm.field("c", SENT_AT) or 0) >= before


def test_a_heartbeat_stops_once_its_client_id_is_disconnected(
    store: BrokerStore, r: redis.Redis
) -> None:
    farm = Farm(store, r)
    farm.client("c", sent_at=time.time())
    guard = IdleGuard(ProgressStore(r, NAMES, farm.sid, "c"), farm.sid, "c", limit=0.3)
    beat = Heartbeat(store.sessions, farm.sid, 0.3, "client", guard)
    try:
        assert beat.member.startswith("client:c:") and beat.member in farm.handles()
        farm.put("c", **{IDLE_OUT: 0.5})
        beat.thread.join(timeout=5)  # the next beat (0.1 s) finds it out and ends the thread
        assert not beat.thread.is_alive()
        assert beat.member not in farm.handles()
        with pytest.raises(ClientIdleTimeout):
            guard.check()
    finally:
        beat.stop()


def test_redis_down_at_attach_is_no_error_and_the_thread_attaches_when_it_is_back(
    store: BrokerStore, r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    farm = Farm(store, r)
    farm.client("c", sent_at=time.time())
    guard = IdleGuard(ProgressStore(r, NAMES, farm.sid, "c"), farm.sid, "c", limit=0.3)
    real = store.sessions.beat_client
    calls: list[bool] = []

    def flaky(sid: int, member: str, client_id: str, attaching: bool) -> float | None:
        calls.append(attaching)
        if len(calls) == 1:
            raise redis.ConnectionError("Redis restarting")
        return real(sid, member, client_id, attaching)

    monkeypatch.setattr(store.sessions, "beat_client", flaky)
    beat = Heartbeat(store.sessions, farm.sid, 0.3, "client", guard)  # raised a raw error before
    try:
        assert not beat.attached
        wait_until("the thread's first beat", lambda: beat.attached, timeout=5)
        assert calls[:2] == [True, True]  # the beat that got through still attached
        assert beat.member in farm.handles()
    finally:
        beat.stop()
