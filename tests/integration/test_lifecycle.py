"""Session life cycle against the real servers: created -> active -> idle -> closed."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from soafarm import BrokerClient, DurableSession, Session, SessionAttachInfo, SessionStartInfo
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.errors import SessionClosed
from soafarm.local.farm import LocalFarm
from tests.conftest import cli_env
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def state_of(settings: Settings, session_id: int) -> str:
    control = ControlClient(settings)
    try:
        return str(control.call("get", session_id=session_id)["activity"])
    except SessionClosed:
        return "closed"
    finally:
        control.close()


def wait_for(settings: Settings, session_id: int, wanted: str, timeout: float = 20) -> float:
    """Poll the broker until the session reaches `wanted`; return the seconds it took."""
    began = time.monotonic()
    wait_until(
        f"session {session_id} to become {wanted}",
        lambda: state_of(settings, session_id) == wanted,
        timeout,
    )
    return time.monotonic() - began


def test_defaults_are_the_seeds(settings: Settings, farm: LocalFarm) -> None:
    with Session.create(SessionStartInfo("echo"), settings) as session:
        levels = session.status()["broker_settings"]
    assert (levels["client_connection_timeout"], levels["client_idle_timeout"]) == (300, 300)
    assert levels["session_idle_timeout"] == 0
    assert levels["durable_session_idle_timeout"] == 172_800


def test_no_client_within_client_connection_timeout_closes(
    settings: Settings, farm: LocalFarm
) -> None:
    info = SessionStartInfo("echo", broker_settings={"client_connection_timeout": 1})
    session = Session.create(info, settings)
    assert state_of(settings, session.id) == "created"
    assert wait_for(settings, session.id, "closed") < 10
    session.detach()


def test_interactive_session_goes_idle_comes_back_then_closes(
    settings: Settings, farm: LocalFarm
) -> None:
    info = SessionStartInfo("echo", broker_settings={"session_idle_timeout": 3})
    session = Session.create(info, settings)
    with BrokerClient(session) as client:
        client.send_request("echo", 1)
        assert len(list(client.get_responses(timeout=30))) == 1
    wait_for(settings, session.id, "active")
    session.detach()
    wait_for(settings, session.id, "idle")
    again = Session.attach(SessionAttachInfo(session.id), settings)
    wait_for(settings, session.id, "active")
    again.detach()
    assert wait_for(settings, session.id, "closed") >= 2  # idle for session_idle_timeout


def test_default_interactive_session_closes_when_its_last_client_leaves(
    settings: Settings, farm: LocalFarm
) -> None:
    session = Session.create(SessionStartInfo("echo"), settings)
    BrokerClient(session).close()
    session.detach()
    assert wait_for(settings, session.id, "closed") < 10


def test_a_crashed_client_is_gone_after_client_idle_timeout(
    settings: Settings, farm: LocalFarm
) -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "tests.integration.helpers.idle_client", "1"],
        env=cli_env(settings),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    ) as child:
        assert child.stdout is not None
        session_id = int(child.stdout.readline())
        wait_for(settings, session_id, "active")
        child.kill()
    assert wait_for(settings, session_id, "closed") < 10


def test_durable_session_closes_and_purges_after_its_idle_timeout(
    settings: Settings, farm: LocalFarm
) -> None:
    info = SessionStartInfo("echo", broker_settings={"durable_session_idle_timeout": 1})
    with DurableSession.create(info, settings) as session, BrokerClient(session) as client:
        client.send_request("echo", 1)
        client.end_requests()
        assert len(list(client.get_responses(timeout=30))) == 1
    assert wait_for(settings, session.id, "closed") < 10
    with pytest.raises(SessionClosed):
        DurableSession.attach(SessionAttachInfo(session.id), settings)
