"""Supervision without servers: the restart policies, the local farm's supervisor round, and
the parent-death signal (real processes, no RabbitMQ or Redis)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

import soafarm.local.farm as farm_module
from soafarm.config import Settings
from soafarm.local.farm import Child, LocalFarm
from soafarm.processes import PARENT_ENV, Restart, RestartPolicy, stop_on_signals, with_parent
from soafarm.state.hosts import HostStore
from soafarm.state.records import HostRecord
from soafarm.workers.host import EXTERNAL_SIGNALS, INSTANCE_CRASH_POLICY, instance_restart
from soafarm.workers.instance import EXIT_RECYCLED, EXIT_TIMED_OUT, resident_mb
from tests.unit.fakes import NAMES, fake_redis
from tests.waiting import wait_until


# --- the policies ---------------------------------------------------------------------------
def test_farm_policy_restarts_the_first_crash_at_once_then_backs_off_to_the_cap() -> None:
    policy = RestartPolicy(base=0.5, cap=10.0, free_restarts=1, healthy_after=30.0)
    failures, delays = 0, []
    for _ in range(8):
        decision = policy.decide(failures, ran_for=1.0)
        failures = decision.failures
        delays.append(decision.delay)
    assert delays == [0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 10.0, 10.0]
    # a process that served a while starts afresh: its exit is news, not a crash loop
    assert policy.decide(failures, ran_for=30.0) == Restart(0.0, 1)


def test_an_instance_killed_from_outside_restarts_at_once_however_often() -> None:
    failures = 0
    for sig in EXTERNAL_SIGNALS:
        for _ in range(20):  # SIGKILL every few seconds (chaos, the OOM killer): no back-off
            decision = instance_restart(-sig, ran_for=0.5, failures=failures)
            assert decision == Restart(0.0, failures)
    assert instance_restart(EXIT_TIMED_OUT, 0.1, 3) == Restart(0.0, 3)
    assert instance_restart(EXIT_RECYCLED, 0.1, 3) == Restart(0.0, 3)


def test_only_a_service_failing_by_itself_backs_off_and_never_past_five_seconds() -> None:
    failures, delays = 0, []
    for code in [1, 1, -signal.SIGSEGV, 1, 1, -signal.SIGABRT, 1, 1, 1]:
        decision = instance_restart(code, ran_for=0.5, failures=failures)
        failures = decision.failures
        delays.append(decision.delay)
    assert delays == [0.2, 0.4, 0.8, 1.6, 3.2, 5.0, 5.0, 5.0, 5.0]
    assert max(delays) == INSTANCE_CRASH_POLICY.cap
    # after 10 s of serving, a crash is the first of a new count
    assert instance_restart(1, ran_for=10.0, failures=failures) == Restart(0.2, 1)


# --- the farm's supervisor round ------------------------------------------------------------
@dataclass
class FakeProc:
    """A child process that exits when a test says so."""

    args: list[str]
    pid: int
    returncode: int | None = None
    signals: list[int] = field(default_factory=list)

    def poll(self) -> int | None:
        return self.returncode

    def send_signal(self, sig: int) -> None:
        self.signals.append(sig)
        self.returncode = -sig

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)

    def wait(self, timeout: float | None = None) -> int | None:
        return self.returncode


@pytest.fixture
def fake_farm(monkeypatch: pytest.MonkeyPatch) -> tuple[LocalFarm, list[FakeProc], redis.Redis]:
    """A supervised farm of fake children: broker, one worker host, autoscaler."""
    started: list[FakeProc] = []
    r = fake_redis()
    farm = LocalFarm(Settings(namespace=NAMES.namespace), workers=1, supervise=True)

    def popen(
        args: list[str], own: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> FakeProc:
        started.append(FakeProc([*prefix, *args], pid=1000 + len(started)))
        return started[-1]

    monkeypatch.setattr(farm, "_popen", popen)
    farm._hosts = HostStore(r, NAMES)
    farm._spawn("broker", "broker")
    farm._spawn("worker 0", "worker", host_id="here-1-w0")
    farm._spawn("autoscaler", "autoscaler")
    return farm, started, r


def test_a_crashed_child_is_restarted_with_back_off_and_counted(
    fake_farm: tuple[LocalFarm, list[FakeProc], redis.Redis],
) -> None:
    farm, started, _r = fake_farm
    broker = started[0]
    t0 = farm.children[0].started
    broker.returncode = -9
    farm.supervise_once(t0 + 1.0)  # first crash in a row: at once
    assert len(started) == 4 and started[3].args == ["broker"]
    assert farm.procs[0] == ("broker", started[3])
    assert farm.restarts == 1

    started[3].returncode = 1
    farm.supervise_once(t0 + 2.0)  # second in a row: 0.5 s
    assert len(started) == 4
    farm.supervise_once(t0 + 2.4)
    assert len(started) == 4
    farm.supervise_once(t0 + 2.6)
    assert len(started) == 5
    child: Child = farm.children[0]
    assert (child.restarts, child.failures, child.code, child.delay) == (2, 2, 1, 0.5)


def test_a_restarted_host_says_so_in_its_id_and_its_predecessor_expires_at_once(
    fake_farm: tuple[LocalFarm, list[FakeProc], redis.Redis],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    farm, started, r = fake_farm
    monkeypatch.setattr(farm_module.socket, "gethostname", lambda: "here")
    hosts = HostStore(r, NAMES)
    worker = started[1]
    assert worker.args == ["worker", "--name", "here-1-w0"]
    hosts.beat(HostRecord("here-1-w0", "here", worker.pid, 2, 0.0), timeout=60)
    hosts.beat(HostRecord("other", "here", 4242, 2, 0.0), timeout=60)
    worker.returncode = -9
    farm.supervise_once(time.monotonic())
    assert started[-1].args == ["worker", "--name", "here-1-w0-restart1"]
    # the broker's next round finds the dead host lost and frees its units
    wait_until("the dead host's heartbeat to expire", lambda: hosts.alive(["here-1-w0"]) == set())
    assert hosts.alive(["other"]) == {"other"}


def test_nothing_restarts_once_the_farm_stops(
    fake_farm: tuple[LocalFarm, list[FakeProc], redis.Redis],
) -> None:
    farm, started, _r = fake_farm
    farm.stop()
    assert all(p.signals == [signal.SIGTERM] for p in started)
    farm.supervise_once(time.monotonic() + 60)
    assert len(started) == 3


# --- the parent-death signal ----------------------------------------------------------------
FOLLOWER = """
import sys, time
from soafarm.processes import follow_parent
print(follow_parent(), flush=True)
time.sleep(60)
"""

MIDDLE = """
import subprocess, sys, time
from soafarm.processes import with_parent
import os
child = subprocess.Popen([sys.executable, "-c", sys.argv[1]], env=with_parent(os.environ),
                         stdout=subprocess.PIPE, text=True)
print(child.pid, child.stdout.readline().strip(), flush=True)
time.sleep(60)
"""


def gone(pid: int) -> bool:
    """The process exited (a zombie waiting for its reaper counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def test_a_child_gets_sigterm_when_its_parent_is_sigkilled() -> None:
    with subprocess.Popen(
        [sys.executable, "-c", MIDDLE, FOLLOWER], stdout=subprocess.PIPE, text=True
    ) as middle:
        try:
            assert middle.stdout is not None
            child_pid, parent_seen = middle.stdout.readline().split()
            assert parent_seen == str(middle.pid)  # follow_parent returns the supervisor's pid
            assert not gone(int(child_pid))
        finally:
            middle.kill()  # SIGKILL: no code of the parent runs
    wait_until("the child to follow its parent", lambda: gone(int(child_pid)), timeout=10)


def test_a_child_whose_parent_died_before_it_armed_the_signal_stops_at_once() -> None:
    # the variable names a pid that is not our parent: as if it had died before the prctl
    env = {**os.environ, PARENT_ENV: str(os.getpid() + 1_000_000)}
    child = subprocess.run([sys.executable, "-c", FOLLOWER], env=env, timeout=30, check=False)
    assert child.returncode == -signal.SIGTERM


def test_with_parent_names_this_process() -> None:
    assert with_parent({"A": "1"}) == {"A": "1", PARENT_ENV: str(os.getpid())}


def test_resident_memory_is_read_from_proc() -> None:
    before = resident_mb()
    assert before is not None and before > 5
    ballast = b"x" * (64 * 1024 * 1024)
    after = resident_mb()
    assert after is not None and after - before > 50
    del ballast


def test_a_stop_signal_never_deadlocks_on_a_lock_the_main_thread_holds() -> None:
    # a handler runs in the main thread between two bytecodes, possibly inside Event.wait()
    # with the event's lock held: stop() must not take that lock on the same thread
    stopped = threading.Event()
    before = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        stop_on_signals(stopped.set)
        handler = signal.getsignal(signal.SIGTERM)
        assert callable(handler)
        with stopped._cond:  # type: ignore[attr-defined]  # as inside Event.wait()
            handler(signal.SIGTERM, None)  # returns: the set waits on a thread of its own
            assert not stopped.is_set()
        assert stopped.wait(timeout=10)
    finally:
        for s, h in before.items():
            signal.signal(s, h)
