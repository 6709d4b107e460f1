"""`LocalFarm.add_worker` without servers: a host of its own settings, waited for until it
registers, and started again with the same settings when it crashes."""

from __future__ import annotations

import pytest
import redis

import soafarm.local.farm as farm_module
from soafarm.config import Settings
from soafarm.errors import SoafarmError
from soafarm.local.farm import LocalFarm
from soafarm.state.hosts import HostStore
from soafarm.state.records import HostRecord
from tests.unit.fakes import NAMES, fake_redis
from tests.unit.test_supervision import FakeProc


@pytest.fixture
def r(monkeypatch: pytest.MonkeyPatch) -> redis.Redis:
    """The in-memory Redis the farm (and its fake hosts) use."""
    client = fake_redis()
    monkeypatch.setattr(farm_module, "redis_client", lambda _settings: client)
    return client


def fake_starts(
    monkeypatch: pytest.MonkeyPatch, farm: LocalFarm, r: redis.Redis, register: bool = True
) -> list[tuple[list[str], dict[str, str]]]:
    """Replace the farm's process start: each start is recorded (command line, own
    settings) and, with `register`, the host named by `--name` beats at once."""
    started: list[tuple[list[str], dict[str, str]]] = []

    def popen(
        args: list[str], own: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> FakeProc:
        started.append(([*prefix, *args], dict(own or {})))
        if register:
            HostStore(r, NAMES).beat(HostRecord(args[-1], "box", 1, 1, 0.0), timeout=30.0)
        return FakeProc(args, pid=2000 + len(started))

    monkeypatch.setattr(farm, "_popen", popen)
    return started


def test_a_worker_of_its_own_settings_and_machine_restarts_with_them(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    farm = LocalFarm(Settings(namespace=NAMES.namespace), workers=0, cores=4, supervise=True)
    started = fake_starts(monkeypatch, farm, r)
    farm.add_worker(
        "gpu-1",
        cores=2,
        pool="gpu",
        labels="zone=a,gpu=1",
        env={"SOAFARM_AMQP_URL": "amqp://far/"},
        prefix=("ip", "netns", "exec", "far"),
    )
    own = {
        "SOAFARM_WORKER_CORES": "2",
        "SOAFARM_WORKER_POOL": "gpu",
        "SOAFARM_WORKER_LABELS": "zone=a,gpu=1",
        "SOAFARM_AMQP_URL": "amqp://far/",
    }
    far = ["ip", "netns", "exec", "far"]
    assert started == [([*far, "worker", "--name", "gpu-1"], own)]
    (child,) = farm.children
    assert (child.name, child.host_id) == ("worker gpu-1", "gpu-1")

    assert isinstance(child.proc, FakeProc)
    child.proc.returncode = -9  # crashed: restarted at once, with its own settings again
    farm.supervise_once(child.started + 1.0)
    assert started[1] == ([*far, "worker", "--name", "gpu-1-restart1"], own)
    farm.stop()
    assert farm.children == []


def test_a_worker_that_never_registers_fails_after_the_timeout(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    farm = LocalFarm(Settings(namespace=NAMES.namespace), workers=0)
    fake_starts(monkeypatch, farm, r, register=False)
    with pytest.raises(SoafarmError, match=r"worker host h1 did not register within 0\.2s"):
        farm.add_worker("h1", timeout=0.2)
    (child,) = farm.children  # tracked all the same: stop() stops it
    farm.stop()
    assert isinstance(child.proc, FakeProc) and child.proc.signals


def test_a_worker_that_exits_before_registering_says_so(
    monkeypatch: pytest.MonkeyPatch, r: redis.Redis
) -> None:
    farm = LocalFarm(Settings(namespace=NAMES.namespace), workers=0)
    starts = fake_starts(monkeypatch, farm, r, register=False)
    real = farm._popen

    def exits(
        args: list[str], own: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> FakeProc:
        proc = real(args, own, prefix)
        assert isinstance(proc, FakeProc)
        proc.returncode = 2
        return proc

    monkeypatch.setattr(farm, "_popen", exits)
    with pytest.raises(SoafarmError, match="worker host h1 exited with code 2"):
        farm.add_worker("h1", timeout=30.0)
    assert len(starts) == 1
    farm.stop()
