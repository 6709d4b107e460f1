"""The Prometheus endpoints of a real farm: the broker's view of sessions and hosts, a worker
host's call counters and durations, and `/healthz` on each."""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.config import MetricsSettings, Settings
from soafarm.local.embedded import free_port
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.state.hosts import HostStore
from soafarm.transport.connections import redis_client
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    with urllib.request.urlopen(url, timeout=10) as reply:
        text = reply.read().decode()
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and wanted <= ls)


def health(url: str) -> tuple[int, dict[str, object]]:
    with urllib.request.urlopen(url.replace("/metrics", "/healthz"), timeout=10) as reply:
        return reply.status, json.loads(reply.read())


@pytest.fixture
def metered(settings: Settings) -> Iterator[tuple[Settings, LocalFarm]]:
    """A farm whose broker serves its metrics on a free port of the test's own."""
    s = settings.replace(metrics=MetricsSettings(broker_port=free_port()))
    (s.service_registration_path[0] / "faulty.toml").write_text(
        f'entry_point = "faulty:FaultyService"\npython_path = ["{EXAMPLES}"]\n'
    )
    with LocalFarm(s, workers=1, cores=2) as farm:
        yield s, farm


def test_broker_and_host_count_requests_responses_faults_and_durations(
    metered: tuple[Settings, LocalFarm],
) -> None:
    settings, _ = metered
    broker_url = f"http://127.0.0.1:{settings.metrics.broker_port}/metrics"
    with (
        Session.create(SessionStartInfo("faulty"), settings) as session,
        BrokerClient(session) as client,
    ):
        for i in range(20):
            client.send_request("ok", i)
        for i in range(5):
            client.send_request("fail", f"no {i}")
        for _ in range(3):
            client.send_request("sleep", 0.2)
        client.end_requests()
        responses = list(client.get_responses(timeout=60))
        assert len(responses) == 28
        sid = str(session.id)

        broker = scrape(broker_url)
        mine = {"session": sid, "service": "faulty"}
        assert value(broker, "soafarm_session_requests_total", **mine) == 28
        assert value(broker, "soafarm_session_responses_total", **mine) == 28
        assert value(broker, "soafarm_session_faults_total", **mine) == 5
        assert value(broker, "soafarm_session_outstanding", **mine) == 0
        assert value(broker, "soafarm_session_allocated_units", **mine) >= 1
        assert value(broker, "soafarm_host_cores") == 2
        assert value(broker, "soafarm_broker_leading") == 1
        assert value(broker, "soafarm_redis_up") == 1

        hosts = HostStore(redis_client(settings), Names(settings.namespace)).hosts()
        (host,) = hosts.values()
        assert host.metrics_url.startswith("http://127.0.0.1:")

        # the instances report their totals each second
        def counted() -> Samples | None:
            got = scrape(host.metrics_url)
            return got if value(got, "soafarm_calls_total", **mine) == 28 else None

        worker = wait_until("the host's call counters reach 28", counted, timeout=30)
        assert value(worker, "soafarm_call_faults_total", **mine) == 5
        assert value(worker, "soafarm_call_retries_total", **mine) == 0
        faulty = {"service": "faulty"}
        assert value(worker, "soafarm_call_duration_seconds_count", **faulty) == 28
        assert value(worker, "soafarm_call_duration_seconds_bucket", le="0.1", **faulty) == 25
        assert value(worker, "soafarm_call_duration_seconds_bucket", le="0.5", **faulty) == 28
        assert value(worker, "soafarm_call_duration_seconds_sum", **faulty) >= 0.6
        assert value(worker, "soafarm_worker_instances", **mine) >= 1
        assert value(worker, "soafarm_worker_instance_starts_total", **faulty) >= 1

    code, detail = health(broker_url)
    assert code == 200 and detail["status"] == "ok" and detail["leading"] is True
    code, detail = health(host.metrics_url)
    assert code == 200 and detail["host_id"] == host.id


def test_a_session_closes_and_its_series_leave_the_broker(
    metered: tuple[Settings, LocalFarm],
) -> None:
    settings, _ = metered
    broker_url = f"http://127.0.0.1:{settings.metrics.broker_port}/metrics"
    with Session.create(SessionStartInfo("faulty"), settings) as session:
        sid = str(session.id)
        assert value(scrape(broker_url), "soafarm_sessions") >= 1
        assert (
            "soafarm_session_requests_total",
            frozenset({("session", sid), ("service", "faulty")}),
        ) in scrape(broker_url)
    samples = scrape(broker_url)
    assert not [k for k in samples if ("session", sid) in k[1]]


def test_metrics_off_serves_nothing(settings: Settings) -> None:
    s = settings.replace(metrics=MetricsSettings(enabled=False))
    with LocalFarm(s, workers=1, cores=1):
        hosts = HostStore(redis_client(s), Names(s.namespace)).hosts()
        assert [h.metrics_url for h in hosts.values()] == [""]
