"""Two HPC Pack semantics end to end: `include_exception_detail_in_faults` (off by default:
a fault names the exception type only) and `client_idle_timeout` (a client id that sends
nothing, reads nothing and waits for nothing is disconnected)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from soafarm import BrokerClient, DurableSession, ServiceFault, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import ClientIdleTimeout
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.service import hidden_message
from soafarm.state.clients import IDLE_OUT, QUIET_AT
from soafarm.transport.connections import redis_client
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
IDLE = {"client_idle_timeout": 1.0}


def register_faulty(settings: Settings, name: str, detail: bool | None) -> None:
    """The faulty example under another name, with or without exception detail."""
    line = "" if detail is None else f"include_exception_detail_in_faults = {str(detail).lower()}\n"
    (settings.service_registration_path[0] / f"{name}.toml").write_text(
        f'entry_point = "faulty:FaultyService"\npython_path = ["{EXAMPLES}"]\n{line}'
    )


def fault_of(settings: Settings, service: str, message: str) -> ServiceFault:
    with (
        Session.create(SessionStartInfo(service), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("fail", message)
        client.send_request("ok", 1)
        client.end_requests()
        responses = sorted(client.get_responses(timeout=60), key=lambda r: r.id)
    assert [r.is_fault for r in responses] == [True, False]
    assert responses[1].result == 1  # the batch went on
    with pytest.raises(ServiceFault) as e:
        _ = responses[0].result
    return e.value


def test_a_fault_names_only_the_type_unless_the_registration_includes_detail(
    settings: Settings, farm: LocalFarm
) -> None:
    register_faulty(settings, "hidden", detail=None)  # the default: false
    register_faulty(settings, "shown", detail=True)
    hidden = fault_of(settings, "hidden", "account 991 overdrawn")
    assert hidden.fault_type == "ValueError"
    assert hidden.message == hidden_message("ValueError")
    assert "991" not in str(hidden) and hidden.detail == ""
    shown = fault_of(settings, "shown", "account 991 overdrawn")
    assert shown.fault_type == "ValueError" and shown.message == "account 991 overdrawn"
    assert "Traceback" in shown.detail and "account 991 overdrawn" in shown.detail


def test_a_quiet_client_is_disconnected_while_a_sending_one_is_not(
    settings: Settings, farm: LocalFarm
) -> None:
    with Session.create(SessionStartInfo("echo", broker_settings=IDLE), settings) as session:
        quiet = BrokerClient(session, "quiet")
        busy = BrokerClient(session, "busy")
        try:
            quiet.send_request("echo", "once")
            assert [r.result.endswith(":once") for r in quiet.get_responses(timeout=30)] == [True]
            sent = 0

            def keep_sending() -> bool:
                nonlocal sent
                busy.send_request("echo", sent)
                sent += 1
                assert len(list(busy.get_responses(timeout=30))) == 1
                time.sleep(0.1)  # pacing the busy client, not synchronisation
                return quiet.idle.idle_for is not None

            wait_until("the quiet client to be disconnected", keep_sending, timeout=30)
            assert quiet.idle.idle_for is not None and quiet.idle.idle_for >= 1.0
            with pytest.raises(ClientIdleTimeout, match=r"idle for \d+s .*client_idle_timeout 1s"):
                quiet.send_request("echo", "too late")
            with pytest.raises(ClientIdleTimeout, match="client_idle_timeout"):
                list(quiet.get_responses(timeout=5))
            # the busy client, sending all along, goes on; so does the session
            for i in range(3):
                busy.send_request("echo", f"still {i}")
                assert len(list(busy.get_responses(timeout=30))) == 1
            assert busy.idle.idle_for is None
            assert session.status()["state"] not in ("closed", "failed")
        finally:
            quiet.close()
            busy.close()
        # the quiet client id may attach again: a new handle starts its clock afresh
        with BrokerClient(session, "quiet") as again:
            again.send_request("echo", "back")
            assert [r.result.endswith(":back") for r in again.get_responses(timeout=30)] == [True]


def test_a_client_waiting_for_a_long_call_is_not_idle(settings: Settings, farm: LocalFarm) -> None:
    info = SessionStartInfo("faulty", broker_settings=IDLE)
    with Session.create(info, settings) as session, BrokerClient(session) as client:
        client.send_request("sleep", 4.0)  # four idle limits with one request outstanding
        assert [r.result for r in client.get_responses(timeout=60)] == [4.0]
        # the broker's sweep has seen it with nothing outstanding (its idle clock starts
        # there, not at the send four seconds ago): still connected
        r = redis_client(settings)
        key = Names(settings.namespace).client_key(session.id, "default")
        wait_until("the sweep to see the call answered", lambda: r.hget(key, QUIET_AT), 30)
        assert r.hget(key, IDLE_OUT) is None and client.idle.idle_for is None
        r.close()
        # then, with nothing outstanding, the clock runs out
        wait_until("the client to be disconnected", lambda: client.idle.idle_for is not None, 30)
        with pytest.raises(ClientIdleTimeout):
            client.send_request("ok", 2)


def test_a_disconnected_durable_client_loses_nothing(settings: Settings, farm: LocalFarm) -> None:
    info = SessionStartInfo("echo", broker_settings=IDLE)
    with DurableSession.create(info, settings) as session:
        with BrokerClient(session, "d") as client:
            for i in range(20):
                client.send_request("echo", i, user_data=i)
            client.end_requests()
            wait_until("every request answered", lambda: client.status().done == 20, 60)
            # sent, answered, not read: idle from the answer on
            wait_until(
                "the client to be disconnected", lambda: client.idle.idle_for is not None, 30
            )
            with pytest.raises(ClientIdleTimeout):
                list(client.get_responses(timeout=5))
        # attaching the client id again reads everything: nothing was purged
        with BrokerClient(session, "d", create=False) as reader:
            got = sorted(r.user_data for r in reader.get_responses(timeout=60))
        assert got == list(range(20))
        session.close()
