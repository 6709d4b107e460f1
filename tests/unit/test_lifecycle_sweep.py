"""The broker's life-cycle sweep (`expire_sessions`) over an in-memory Redis."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from soafarm.broker.lifecycle import expire_sessions
from soafarm.broker.store import BrokerStore
from soafarm.config import BrokerSettings
from soafarm.state.records import SessionActivity, SessionRecord, SessionState
from tests.unit.fakes import NAMES, fake_redis

CREATED = 1_000.0

Closed = list[tuple[int, str]]


@pytest.fixture
def store() -> BrokerStore:
    return BrokerStore(fake_redis(), NAMES)


@pytest.fixture
def closed() -> Closed:
    return []


@pytest.fixture
def sweep(store: BrokerStore, closed: Closed) -> Callable[[float], None]:
    """One pass at time `now`, recording what it closes (the daemon would purge them)."""

    def close(record: SessionRecord, why: str) -> None:
        closed.append((record.id, why))

    return lambda now: expire_sessions(store, close, now)


def open_session(store: BrokerStore, durable: bool = False, **settings: float) -> int:
    sid = store.new_session_id()
    store.save_session(
        SessionRecord(
            sid, "echo", None, SessionState.RUNNING, 1, 1, 2000, "core", CREATED, "me",
            broker_settings=BrokerSettings(**settings),  # type: ignore[arg-type]
            durable=durable,
        )
    )  # fmt: skip
    return sid


def attach(store: BrokerStore, sid: int, beat_at: float | None = None) -> None:
    store.add_client(sid, "c")
    if beat_at is not None:
        store.sessions.beat(sid, "client:1", at=beat_at)


def record(store: BrokerStore, sid: int) -> SessionRecord:
    found = store.get_session(sid)
    assert found is not None
    return found


def test_a_session_nobody_attaches_to_closes_after_the_connection_timeout(
    store: BrokerStore, sweep: Callable[[float], None], closed: Closed
) -> None:
    sid = open_session(store, client_connection_timeout=60.0)
    sweep(CREATED + 60.0)
    assert closed == []
    sweep(CREATED + 60.5)
    assert closed == [(sid, "no client connected within client_connection_timeout (60s)")]


def test_a_beating_client_keeps_the_session_active(
    store: BrokerStore, sweep: Callable[[float], None], closed: Closed
) -> None:
    sid = open_session(store, client_idle_timeout=30.0, session_idle_timeout=0.0)
    attach(store, sid, beat_at=CREATED + 100.0)
    sweep(CREATED + 120.0)
    assert closed == []
    assert (record(store, sid).activity, record(store, sid).idle_since) == (
        SessionActivity.ACTIVE,
        0.0,
    )


def test_an_idle_session_closes_after_its_idle_timeout(
    store: BrokerStore, sweep: Callable[[float], None], closed: Closed
) -> None:
    sid = open_session(store, client_idle_timeout=30.0, session_idle_timeout=10.0)
    attach(store, sid, beat_at=CREATED)
    sweep(CREATED + 20.0)
    assert record(store, sid).activity == SessionActivity.ACTIVE
    # the handle stops beating: 30 s later it is gone, and the idle clock starts
    sweep(CREATED + 31.0)
    assert (record(store, sid).activity, record(store, sid).idle_since) == (
        SessionActivity.IDLE,
        CREATED + 31.0,
    )
    assert store.connected_handles(sid, 0.0) == 0  # the stale handle was dropped
    sweep(CREATED + 40.0)
    assert closed == []
    sweep(CREATED + 41.0)
    assert closed == [(sid, "idle for 10s without clients (idle timeout 10s)")]


def test_a_client_coming_back_resets_the_idle_clock(
    store: BrokerStore, sweep: Callable[[float], None], closed: Closed
) -> None:
    sid = open_session(store, session_idle_timeout=10.0)
    attach(store, sid)
    sweep(CREATED + 1.0)
    assert record(store, sid).activity == SessionActivity.IDLE
    store.sessions.beat(sid, "client:2", at=CREATED + 5.0)
    sweep(CREATED + 20.0)
    assert closed == []
    assert record(store, sid).idle_since == 0.0


def test_idle_timeout_zero_closes_at_once_and_durable_sessions_wait_longer(
    store: BrokerStore, sweep: Callable[[float], None], closed: Closed
) -> None:
    interactive = open_session(store, session_idle_timeout=0.0)
    durable = open_session(store, True, session_idle_timeout=0.0, durable_session_idle_timeout=60.0)
    attach(store, interactive)
    attach(store, durable)
    sweep(CREATED + 1.0)
    assert [sid for sid, _ in closed] == [interactive]
    sweep(CREATED + 61.0)
    assert [sid for sid, _ in closed] == [interactive, interactive, durable]
