"""Usage records of closed sessions, end to end: what the broker writes at close, what
`soafarm report` sums, a durable session recorded once, and the retention."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings, UsageSettings
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.state.usage import UsageRecord, UsageStore
from soafarm.transport.connections import redis_client
from tests.integration.test_cli import assert_one_line_error, soafarm
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def register(settings: Settings) -> None:
    (settings.service_registration_path[0] / "faulty.toml").write_text(
        f'entry_point = "faulty:FaultyService"\npython_path = ["{EXAMPLES}"]\n'
    )


def records(settings: Settings) -> list[UsageRecord]:
    got, bad = UsageStore(redis_client(settings), Names(settings.namespace)).since(0)
    assert bad == 0
    return got


def test_a_closed_session_is_recorded_with_its_units_time_calls_and_faults(
    settings: Settings, farm: LocalFarm
) -> None:
    register(settings)
    start = SessionStartInfo("faulty", min_units=2, max_units=2)
    with Session.create(start, settings) as session, BrokerClient(session) as client:
        for _ in range(4):
            client.send_request("sleep", 0.5)
        client.send_request("fail", "no")
        client.end_requests()
        assert len(list(client.get_responses(timeout=60))) == 5
        sid = session.id
        # every response counted before the close (interactive counts lag up to 50 ms)
        wait_until("the done counters", lambda: client.status().done == 5, timeout=10)
    (usage,) = records(settings)
    assert (usage.session, usage.service, usage.durable) == (sid, "faulty", False)
    assert (usage.requests, usage.responses, usage.faults, usage.retries) == (5, 5, 1, 0)
    # two instances ran at least the 2 s of sleep between them, both up to the close
    assert usage.unit_seconds >= 2.0
    assert usage.unit_seconds < 2 * (usage.ended - usage.started) + 0.5
    assert usage.owner == session.record["owner"]

    by_service = soafarm(settings, "report", "--json")
    assert by_service.returncode == 0, by_service.stderr
    (line,) = json.loads(by_service.stdout)
    assert line["service"] == "faulty" and line["sessions"] == 1 and line["faults"] == 1
    assert line["unit_hours"] == round(usage.unit_seconds / 3600, 4)
    assert line["last_end"].endswith("+00:00")
    by_owner = json.loads(soafarm(settings, "report", "--by", "owner", "--json").stdout)
    assert [o["owner"] for o in by_owner] == [usage.owner]
    table = soafarm(settings, "report", "--by", "session")
    assert table.returncode == 0 and f"{sid}\tfaulty" in table.stdout.replace("  ", "\t")
    future = soafarm(settings, "report", "--since", "2999-01-01", "--json")
    assert json.loads(future.stdout) == []
    assert_one_line_error(soafarm(settings, "report", "--since", "last tuesday"), 2, "--since")


def test_a_durable_session_closed_then_purged_is_recorded_once(
    settings: Settings, farm: LocalFarm
) -> None:
    register(settings)
    with DurableSession.create(SessionStartInfo("faulty"), settings) as session:
        with BrokerClient(session) as client:
            client.send_request("ok", 1)
            client.end_requests()
            assert len(list(client.get_responses(timeout=60))) == 1
            # an instance publishes a durable batch's responses, then counts them: a client
            # can read the response a moment before the count that the record sums
            wait_until("the done counter", lambda: client.status().done == 1, timeout=10)
        session.close(purge=False)
        session.close(purge=True)
    (usage,) = records(settings)
    assert usage.durable and usage.requests == 1 and usage.responses == 1


def test_records_older_than_the_retention_are_dropped(settings: Settings, farm: LocalFarm) -> None:
    register(settings)
    store = UsageStore(redis_client(settings), Names(settings.namespace))
    old = UsageRecord(99, "x", None, "o", False, "Default", 0.0, 1.0, 0.0, 0, 0, 0, 0)
    store.record(old, UsageSettings().retention)  # ended in 1970
    assert [r.session for r in records(settings)] == []  # pruned by its own write
    store.record(old, 1e12)
    assert [r.session for r in records(settings)] == [99]
    with Session.create(SessionStartInfo("faulty"), settings):
        pass
    assert [r.service for r in records(settings)] == ["faulty"]  # the close pruned it
