"""The worker host's reconcile: assignments in, instance processes started and stopped."""

from __future__ import annotations

import dataclasses
import signal
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import redis

import soafarm.workers.host as host_module
from soafarm.config import BrokerSettings, Settings, WorkerSettings
from soafarm.state.hosts import HostStore, InstanceLoad
from soafarm.state.instances import InstanceStore
from soafarm.state.records import InstanceRecord, SessionRecord, SessionState
from soafarm.workers.host import SessionProcs, WorkerHost, plan_reconcile
from soafarm.workers.instance import EXIT_LOAD_FAILED, EXIT_RECYCLED, InstanceSpec
from tests.unit.fakes import NAMES, fake_redis


@dataclass
class FakeProcess:
    """Stands in for an instance's subprocess.Popen: exits when a test says so."""

    args: list[str]
    env: dict[str, str] | None = None
    pid: int = 4242
    returncode: int | None = None
    signals: list[int] = field(default_factory=list)

    @property
    def spec(self) -> InstanceSpec:
        return InstanceSpec.from_json(self.args[-1])

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)

    def kill(self) -> None:
        self.returncode = -9

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


@pytest.fixture
def started(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[FakeProcess]]:
    """Every instance process the host starts, in order (none is really started)."""
    procs: list[FakeProcess] = []

    def popen(args: list[str], env: dict[str, str] | None = None) -> FakeProcess:
        procs.append(FakeProcess(args, env))
        return procs[-1]

    monkeypatch.setattr(host_module.subprocess, "Popen", popen)
    yield procs


@pytest.fixture
def r() -> redis.Redis:
    return fake_redis()


@pytest.fixture
def host(r: redis.Redis) -> WorkerHost:
    settings = Settings(namespace=NAMES.namespace, worker=WorkerSettings(cores=4, sockets=1))
    worker = WorkerHost(settings, name="h1", client=r)
    for sid in (7, 8):
        worker.session_store.save(
            SessionRecord(
                sid, "echo", None, SessionState.RUNNING, 1, 4, 2000, "core", 0.0, "me",
                broker_settings=BrokerSettings(),
            )
        )  # fmt: skip
    return worker


def procs(running: int = 0, next_start: float = 0.0) -> SessionProcs:
    out = SessionProcs(next_start=next_start)
    out.running = [(f"i{n}", FakeProcess([])) for n in range(running)]  # type: ignore[misc]
    return out


# --- the decision alone ---------------------------------------------------------------------
def test_plan_starts_what_is_missing_and_stops_extras() -> None:
    plan = plan_reconcile({1: procs(running=3), 2: procs(running=1)}, {1: 1, 2: 3, 3: 2}, 10.0)
    assert plan.stop == {1: 2}
    assert plan.start == {2: 2, 3: 2}
    assert plan.drop == frozenset()


def test_plan_waits_for_the_back_off_and_the_load_failure_retry() -> None:
    sessions = {1: procs(next_start=15.0), 2: procs(next_start=30.0)}  # 2 failed to load
    assert plan_reconcile(sessions, {1: 1, 2: 1}, 10.0).start == {}
    assert plan_reconcile(sessions, {1: 1, 2: 1}, 15.0).start == {1: 1}
    # an assignment that outlived the broker's exclusion is tried again, not held for ever
    assert plan_reconcile(sessions, {1: 1, 2: 1}, 30.0).start == {1: 1, 2: 1}


def test_plan_drops_sessions_no_longer_assigned() -> None:
    plan = plan_reconcile({1: procs(running=2), 2: procs(next_start=30.0)}, {}, 0.0)
    assert plan.stop == {1: 2}
    assert plan.drop == {1, 2}


# --- applied by the host --------------------------------------------------------------------
def test_reconcile_starts_instances_with_the_session_capacity(
    host: WorkerHost, started: list[FakeProcess]
) -> None:
    host.reconcile({7: 2})
    assert [p.spec.instance_id for p in started] == ["h1.7.0", "h1.7.1"]
    assert {(p.spec.session_id, p.spec.host_id, p.spec.capacity) for p in started} == {(7, "h1", 1)}
    assert started[0].args[1:3] == ["-m", "soafarm.workers.instance"]
    host.reconcile({7: 2})  # idempotent
    assert len(started) == 2


def test_reconcile_drains_extras_and_forgets_them_once_they_exit(
    host: WorkerHost, started: list[FakeProcess], r: redis.Redis
) -> None:
    instances = InstanceStore(r, NAMES)
    host.reconcile({7: 2, 8: 1})
    for p in started:
        instances.register(p.spec.session_id, InstanceRecord(p.spec.instance_id, "h1", 1, 0.0))

    by_id = {p.spec.instance_id: p for p in started}
    host.reconcile({7: 1})
    assert by_id["h1.7.1"].signals == [signal.SIGTERM]  # the newest goes
    assert by_id["h1.8.0"].signals == [signal.SIGTERM]
    assert by_id["h1.7.0"].signals == []
    assert 8 not in host.sessions
    assert len(host.stopping_procs) == 2

    host.reconcile({7: 1})  # still draining: their records stay
    assert len(instances.of_session(7)) == 2
    by_id["h1.7.1"].returncode = by_id["h1.8.0"].returncode = 0
    host.reconcile({7: 1})
    assert host.stopping_procs == []
    assert [i.id for i in instances.of_session(7)] == ["h1.7.0"]
    assert instances.of_session(8) == []


def test_a_crashed_instance_restarts_after_a_back_off(
    host: WorkerHost, started: list[FakeProcess]
) -> None:
    host.reconcile({7: 1})
    started[0].returncode = 1
    host.reconcile({7: 1})
    assert len(started) == 1  # 0.2 s back-off first
    assert host.sessions[7].failures == 1
    host.sessions[7].next_start = time.monotonic()
    host.reconcile({7: 1})
    assert [p.spec.instance_id for p in started] == ["h1.7.0", "h1.7.1"]


def test_an_instance_killed_from_outside_is_replaced_in_the_same_round(
    host: WorkerHost, started: list[FakeProcess]
) -> None:
    host.reconcile({7: 1})
    for n in range(5):  # killed again and again (chaos, the OOM killer): never a back-off
        started[-1].returncode = -signal.SIGKILL
        host.reconcile({7: 1})
        assert len(started) == n + 2
    started[-1].returncode = EXIT_RECYCLED  # recycled for memory: at once too
    host.reconcile({7: 1})
    assert len(started) == 7
    assert host.sessions[7].failures == 0


def test_the_host_wakes_when_a_back_off_ends_not_at_the_next_heartbeat(
    host: WorkerHost, started: list[FakeProcess]
) -> None:
    host.reconcile({7: 1})
    assert host._wait_time(time.monotonic()) == host.settings.worker.heartbeat_interval
    started[0].returncode = 1
    host.reconcile({7: 1})
    assert 0.1 < host._wait_time(time.monotonic()) <= 0.2  # the 0.2 s crash back-off


def test_a_load_failure_is_not_retried_until_reassigned(
    host: WorkerHost, started: list[FakeProcess]
) -> None:
    host.reconcile({7: 1})
    started[0].returncode = EXIT_LOAD_FAILED
    host.reconcile({7: 1})
    host.reconcile({7: 1})
    assert len(started) == 1
    host.reconcile({})  # unassigned: the failure is forgotten with the session
    host.reconcile({7: 1})
    assert len(started) == 2


def test_a_closed_session_gets_no_new_instance(
    host: WorkerHost, started: list[FakeProcess]
) -> None:
    host.reconcile({7: 1})
    # closed: its instance drained (exit 0) before this host's assignment was updated
    record = host.session_store.get(7)
    assert record is not None
    host.session_store.save(dataclasses.replace(record, state=SessionState.CLOSED))
    started[0].returncode = 0
    host.reconcile({7: 1})  # reaped, with the usual back-off
    host.sessions[7].next_start = 0.0  # ... which has passed
    host.reconcile({7: 1})
    assert len(started) == 1
    assert host.sessions[7].ended
    host.reconcile({})  # dropped by the broker: forgotten
    assert 7 not in host.sessions


def test_utilisation_is_busy_time_over_capacity_time(host: WorkerHost, r: redis.Redis) -> None:
    hosts = HostStore(r, NAMES)
    hosts.report_load("h1", "a", InstanceLoad(7, 2, busy=1.0, at=10.0))
    host._sample_load()
    assert host.utilisation is None  # one report: no interval yet
    hosts.report_load("h1", "a", InstanceLoad(7, 2, busy=2.0, at=11.0))
    host._sample_load()
    assert host.utilisation == 0.5
