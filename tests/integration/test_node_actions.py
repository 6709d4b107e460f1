"""`soafarm hosts offline|drain|online HOST` on a farm of two hosts: the state an operator
sets, what `soafarm hosts` shows, and what the allocator gives an offline or draining host."""

from __future__ import annotations

import json
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.broker.store import BrokerStore
from soafarm.config import Settings
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.transport.connections import redis_client
from tests.integration.test_cli import assert_one_line_error, soafarm
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

#: A call long enough to be in flight while `soafarm hosts drain` starts and is answered.
CALL_SECONDS = 5.0


@pytest.fixture
def store(settings: Settings) -> Iterator[BrokerStore]:
    """The broker's view of Redis, for reading hosts, assignments and instances."""
    store = BrokerStore(redis_client(settings), Names(settings.namespace))
    yield store
    store.host_records.close()


def hosts_json(settings: Settings) -> dict[str, dict[str, Any]]:
    """`soafarm hosts --json`, by host id."""
    result = soafarm(settings, "hosts", "--json")
    assert result.returncode == 0, result.stderr
    return {h["id"]: h for h in json.loads(result.stdout)}


def table_of(settings: Settings) -> subprocess.CompletedProcess[str]:
    """`soafarm hosts` on a wide terminal (rich wraps a long cell on 80 columns)."""
    return soafarm(settings, "hosts", env={"COLUMNS": "200"})


def act(settings: Settings, *args: str) -> str:
    """Run `soafarm hosts ARGS...` and return its output line."""
    result = soafarm(settings, "hosts", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def placements(store: BrokerStore, session_id: int) -> Counter[str]:
    """Host id -> instances of the session running there."""
    return Counter(i.host_id for i in store.instances(session_id))


def test_offline_drain_online_set_and_show_the_state(settings: Settings) -> None:
    with LocalFarm(settings, workers=0) as farm:
        farm.add_worker("h1")
        farm.add_worker("h2", pool="other", labels="zone=b")
        hosts = hosts_json(settings)
        assert {h: (i["admin"], i["pool"], i["cores"]) for h, i in hosts.items()} == {
            "h1": ("", "default", 1),
            "h2": ("", "other", 1),
        }
        assert hosts["h2"]["labels"] == {"zone": "b"}

        assert act(settings, "offline", "h1").startswith("host h1 is offline")
        assert {h: i["admin"] for h, i in hosts_json(settings).items()} == {
            "h1": "offline",
            "h2": "",
        }
        table = table_of(settings)
        assert table.returncode == 0 and "h1 (offline)" in table.stdout, table.stdout
        assert "h2 (" not in table.stdout

        # options before the subcommand count as after it: here the namespace, which
        # the environment gives wrong (a broker-less namespace would exit 3)
        moved = {"SOAFARM_NAMESPACE": settings.namespace + "-elsewhere"}
        drain = soafarm(
            settings, "hosts", "--namespace", settings.namespace, "drain", "h1", env=moved
        )
        assert drain.returncode == 0, drain.stderr
        assert drain.stdout.startswith("host h1 is draining") and "(was offline)" in drain.stdout
        assert hosts_json(settings)["h1"]["admin"] == "draining"
        assert "h1 (draining)" in table_of(settings).stdout

        assert act(settings, "online", "h1") == "host h1 is online (was draining)"
        assert {h: i["admin"] for h, i in hosts_json(settings).items()} == {"h1": "", "h2": ""}
        assert act(settings, "online", "h1") == "host h1 is online"  # again: harmless

        unknown = soafarm(settings, "hosts", "offline", "nosuch")
        assert_one_line_error(unknown, 1, "no live worker host 'nosuch'", "live hosts: h1, h2")
        json_too = soafarm(settings, "hosts", "--json", "offline", "h1")
        assert json_too.returncode == 2 and "takes no subcommand" in json_too.stderr
        assert hosts_json(settings)["h1"]["admin"] == ""


def test_the_state_survives_a_restart_of_the_host(settings: Settings, store: BrokerStore) -> None:
    def stop_h1(farm: LocalFarm) -> None:
        (child,) = [c for c in farm.children if c.host_id == "h1" and c.proc.poll() is None]
        child.proc.terminate()  # a clean stop: the host deregisters
        assert child.proc.wait(timeout=60) == 0
        wait_until("h1 to deregister", lambda: "h1" not in store.hosts())

    with LocalFarm(settings, workers=0) as farm:
        farm.add_worker("h1")
        assert act(settings, "offline", "h1").startswith("host h1 is offline")
        stop_h1(farm)
        gone = soafarm(settings, "hosts", "drain", "h1")
        assert_one_line_error(gone, 1, "no live worker host 'h1'", "live hosts: none")
        farm.add_worker("h1")  # back under the same id
        assert hosts_json(settings)["h1"]["admin"] == "offline"
        stop_h1(farm)
        # `online` clears the state of a host that is not running, too
        assert act(settings, "online", "h1") == "host h1 is online (was offline)"
        assert store.host_records.admin_states() == {}


def test_offline_keeps_what_it_runs_and_drain_moves_it_after_its_calls(
    settings: Settings, store: BrokerStore, tmp_path: Path
) -> None:
    """Needs the allocator to read the operator states (`HostStore.read_admin`)."""
    with LocalFarm(settings, workers=0) as farm:
        farm.add_worker("h1", cores=2)
        first = Session.create(SessionStartInfo("faulty", min_units=1, max_units=1), settings)
        try:
            wait_until("the first session to run on h1", lambda: placements(store, first.id))
            (instance,) = store.instances(first.id)
            assert instance.host_id == "h1"
            farm.add_worker("h2", cores=1)
            act(settings, "offline", "h1")

            # h1 has a free core, but is offline: the second session gets h2's core alone
            info = SessionStartInfo("faulty", min_units=1, max_units=2)
            with Session.create(info, settings) as second:
                wait_until("the second session to run", lambda: placements(store, second.id))
                assert store.targets().get(second.id) == 1
                assert placements(store, second.id) == Counter({"h2": 1})
                assert store.assignments(["h1"])["h1"] == {first.id: 1}
                # the first session's instance stayed where it was, untouched
                assert [i.id for i in store.instances(first.id)] == [instance.id]

            # h2 is free again; a call in flight on h1 when it is drained finishes there
            log = tmp_path / "calls.log"
            with BrokerClient(first) as client:
                client.send_request("sleep_logged", str(log), CALL_SECONDS)
                client.end_requests()
                wait_until("the call to start on h1", log.exists)
                started = time.monotonic()
                act(settings, "drain", "h1")
                assert time.monotonic() - started < CALL_SECONDS, "drained after the call"
                (response,) = list(client.get_responses(timeout=60))
                assert response.result == CALL_SECONDS
            assert log.read_text() == "x\n", "the call ran again after the drain"
            wait_until(
                "the first session's unit to move to h2",
                lambda: placements(store, first.id) == Counter({"h2": 1}),
            )
            assert store.assignments(["h1"])["h1"] == {}

            act(settings, "online", "h1")
            with Session.create(info, settings) as third:
                # h2's one core is the first session's: the third runs on h1 alone
                wait_until("h1 to be given work again", lambda: placements(store, third.id))
                assert set(placements(store, third.id)) == {"h1"}
        finally:
            first.close()
