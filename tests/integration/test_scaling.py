"""Resource units, priorities, draining and the autoscaler, on the real servers.

Intervals are short here (sampling 0.2 s, adjusting every second, idle after 3 s) so growth
and scale-to-zero happen within a test's time.
"""

from __future__ import annotations

import dataclasses
import signal
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.broker.store import BrokerStore
from soafarm.config import AutoscalerSettings, PoolSettings, Settings
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.transport.connections import redis_client
from soafarm.workers.provisioners.local import LocalProvisioner
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

# a service that reports the most calls it ever saw running at once in its process
CONCURRENCY_SERVICE = """
import threading, time

class Concurrency:
    def __init__(self, context):
        self.lock = threading.Lock()
        self.running = 0
        self.most = 0

    def hold(self, seconds):
        with self.lock:
            self.running += 1
            self.most = max(self.most, self.running)
        time.sleep(seconds)
        with self.lock:
            self.running -= 1
            return self.most
"""


def store_of(settings: Settings) -> BrokerStore:
    """The broker's view of Redis, for reading hosts and instances."""
    return BrokerStore(redis_client(settings), Names(settings.namespace))


@pytest.fixture
def concurrency(settings: Settings) -> str:
    """Register the concurrency service (with a node-unit variant capped at 3 calls)."""
    folder: Path = settings.service_registration_path[0]
    (folder / "concurrency.py").write_text(CONCURRENCY_SERVICE)
    (folder / "concurrency.toml").write_text('entry_point = "concurrency:Concurrency"\n')
    (folder / "capped.toml").write_text(
        'entry_point = "concurrency:Concurrency"\nmax_concurrent_calls = 3\n'
    )
    return "concurrency"


def most_concurrent(session: Session, calls: int, seconds: float = 0.4) -> int:
    """Send `calls` holds, one message each, and return the highest concurrency seen."""
    with BrokerClient(session) as client:
        for _ in range(calls):
            client.send_request("hold", seconds)
            client.flush()  # one message per request: prefetch decides how many run at once
        client.end_requests()
        return int(max(r.result for r in client.get_responses(timeout=60)))


@pytest.mark.parametrize(
    "case",
    [
        ("concurrency", "core", 4, 1),
        ("concurrency", "socket", 2, 2),
        ("concurrency", "node", 1, 4),
        ("capped", "node", 1, 3),
    ],
    ids=["core", "socket", "node", "node-max-concurrent-calls"],
)
def test_resource_units_start_the_right_instances_with_the_right_capacity(
    settings: Settings, concurrency: str, case: tuple[str, str, int, int]
) -> None:
    service, unit, instances, capacity = case
    two_sockets = settings.replace(worker=dataclasses.replace(settings.worker, sockets=2))
    info = SessionStartInfo(service, min_units=1, max_units=16, resource_unit=unit)
    with (
        LocalFarm(two_sockets, workers=1, cores=4),
        Session.create(info, settings) as session,
    ):
        session.wait_for_instances(instances, timeout=30)
        records = session.status()["instances"]
        assert [r["capacity"] for r in records] == [capacity] * instances
        # never more at once than the capacity: each instance receives at most that many
        if instances == 1:
            assert most_concurrent(session, capacity * 2) == capacity
        info_now = session.status()
        assert (info_now["allocated_units"], info_now["target_units"]) == (instances, instances)


def test_higher_priority_gets_its_minimum_first_and_the_lower_runs_when_units_free(
    settings: Settings,
) -> None:
    low_info = SessionStartInfo("faulty", min_units=2, max_units=2, priority=1000)
    high_info = SessionStartInfo("faulty", min_units=2, max_units=2, priority=3000)
    with (
        LocalFarm(settings, workers=0) as farm,
        Session.create(low_info, settings) as low,
        BrokerClient(low) as low_client,
    ):
        high = Session.create(high_info, settings)
        for i in range(20):
            low_client.send_request("sleep", 0.01, user_data=i)
        low_client.end_requests()
        assert low.status()["state"] == high.status()["state"] == "queued"
        farm.workers = 1
        farm._spawn("worker", "worker")  # one 2-core host: room for one minimum only
        high.wait_for_instances(2, timeout=30)
        assert low.status()["state"] == "queued"
        assert low.status()["instances"] == []
        high.close()
        low.wait_for_instances(2, timeout=30)
        responses = list(low_client.get_responses(timeout=60))
    assert sorted(r.user_data for r in responses) == list(range(20))


def test_a_host_stopped_while_holding_work_hands_it_back_and_nothing_is_lost(
    settings: Settings,
) -> None:
    info = SessionStartInfo("faulty", min_units=2, max_units=2)
    with LocalFarm(settings, workers=2, cores=1) as farm, Session.create(info, settings) as session:
        session.wait_for_instances(2, timeout=30)
        with BrokerClient(session) as client:
            for i in range(200):  # two messages of 100: each instance holds 5 s of work
                client.send_request("sleep_whoami", 0.05, user_data=i)
            client.end_requests()
            seen: list[Any] = []
            stream = client.get_responses(timeout=60)
            seen.append(next(stream))
            # stop the host whose instance answered first (it holds the rest of its batch)
            victim_instance = seen[0].result
            host_id = victim_instance.rsplit(".", 2)[0]
            pid = store_of(settings).hosts()[host_id].pid
            next(p for _w, p in farm.procs if p.pid == pid).send_signal(signal.SIGTERM)
            seen.extend(stream)
    counts = Counter(r.user_data for r in seen)
    assert sorted(counts) == list(range(200))
    assert set(counts.values()) == {1}, "every response exactly once"
    by_instance = Counter(r.result for r in seen)
    assert by_instance[victim_instance] < 100, "the stopped instance handed work back"
    assert len(by_instance) == 2


def test_local_provisioner_starts_and_drains_real_worker_processes(settings: Settings) -> None:
    pool = PoolSettings(name="p", min_hosts=0, max_hosts=2, cores_per_host=1)
    provisioner = LocalProvisioner(pool, settings)
    store = store_of(settings)
    try:
        provisioner.scale(5)  # clamped to max_hosts
        assert provisioner.hosts() == 2
        hosts = wait_until(
            "two hosts registered", lambda: len(store.hosts()) == 2 and store.hosts()
        )
        assert {h.pool for h in hosts.values()} == {"p"}
        assert {h.cores for h in hosts.values()} == {1}
        keep, drop = sorted(hosts)
        provisioner.scale(1, idle_first=[drop])
        assert provisioner.hosts() == 1
        wait_until("the idle host deregistered", lambda: set(store.hosts()) == {keep})
    finally:
        provisioner.close()
    assert store.hosts() == {}


def test_autoscaler_grows_from_zero_for_a_backlog_then_scales_to_zero(settings: Settings) -> None:
    scaled = settings.replace(
        broker=dataclasses.replace(
            settings.broker, load_sampling_interval=0.2, allocation_adjust_interval=1.0
        ),
        autoscaler=AutoscalerSettings(
            idle_timeout=3.0,
            pools=(PoolSettings(name="local", min_hosts=0, max_hosts=4, cores_per_host=1),),
        ),
    )
    store = store_of(settings)
    most_hosts = 0
    info = SessionStartInfo("faulty", min_units=1, max_units=8)
    with LocalFarm(scaled, workers=0, autoscale=True), Session.create(info, scaled) as session:
        assert store.hosts() == {}
        with BrokerClient(session) as client:
            for i in range(800):
                client.send_request("sleep", 0.05, user_data=i)
            client.end_requests()
            responses = []
            for response in client.get_responses(timeout=120):
                responses.append(response)
                most_hosts = max(most_hosts, len(store.hosts()))
        counts = Counter(r.user_data for r in responses)
        assert sorted(counts) == list(range(800))
        assert set(counts.values()) == {1}, "every response exactly once"
        assert most_hosts >= 3, f"grew to only {most_hosts} host(s)"
        wait_until("scale to zero", lambda: store.hosts() == {}, timeout=60)
