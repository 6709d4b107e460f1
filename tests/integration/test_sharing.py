"""Shared sessions, common data and service versions, against the real servers."""

from __future__ import annotations

from pathlib import Path

import pytest

from soafarm import BrokerClient, Session, SessionStartInfo
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.errors import MessageTooLarge, ServiceNotFound, SessionNotFound
from soafarm.local.farm import LocalFarm

pytestmark = pytest.mark.integration
EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def whoami_batch(client: BrokerClient, n: int) -> set[str]:
    for i in range(n):
        client.send_request("whoami", user_data=f"{client.client_id}-{i}")
    client.end_requests()
    responses = list(client.get_responses(timeout=30))
    assert sorted(r.user_data for r in responses) == sorted(
        f"{client.client_id}-{i}" for i in range(n)
    )  # each client reads its own responses, all of them, and no one else's
    return {r.result for r in responses}


def test_shared_session_serves_several_clients_with_warm_instances(
    settings: Settings, farm: LocalFarm
) -> None:
    info = SessionStartInfo("echo", min_units=2, max_units=2, share_session=True)
    with Session.create(info, settings) as owner:
        owner.wait_for_instances(2)
        with pytest.raises(SessionNotFound, match="no open shared session of service 'faulty'"):
            Session.find("faulty", settings)
        with Session.find("echo", settings) as other:
            assert other.id == owner.id
            with BrokerClient(owner, "alice") as alice, BrokerClient(other, "bob") as bob:
                served_alice = whoami_batch(alice, 300)
                served_bob = whoami_batch(bob, 300)
            other.detach()
        instances = {i["id"] for i in owner.status()["instances"]}
    assert served_alice | served_bob <= instances  # the same warm instances served both
    control = ControlClient(settings)
    try:
        assert control.call("list", service="echo") == []  # closed with its owner
    finally:
        control.close()


def test_common_data_is_read_by_every_instance_at_start_up(
    settings: Settings, farm: LocalFarm
) -> None:
    folder = settings.service_registration_path[0]
    (folder / "table.py").write_text(
        "class Table:\n"
        "    def __init__(self, context):\n"
        "        self.rates = context.common_data('rates')\n"
        "    def rate(self, key):\n"
        "        return self.rates[key]\n"
    )
    (folder / "table.toml").write_text('entry_point = "table:Table"\n')
    rates = {f"k{i}": i / 100 for i in range(1000)}
    info = SessionStartInfo("table", min_units=2, max_units=2, common_data={"rates": rates})
    with Session.create(info, settings) as session, BrokerClient(session) as client:
        for i in range(0, 1000, 7):
            client.send_request("rate", f"k{i}", user_data=i)
        client.end_requests()
        got = {r.user_data: r.result for r in client.get_responses(timeout=30)}
    assert got == {i: i / 100 for i in range(0, 1000, 7)}


def test_common_data_size_limit(settings: Settings, farm: LocalFarm) -> None:
    small = settings.replace(max_common_data_bytes=1024)
    info = SessionStartInfo("echo", common_data={"big": "x" * 5000})
    with pytest.raises(MessageTooLarge, match=r"common data 'big' is 5,00\d bytes"):
        Session.create(info, small)


def test_service_versions(settings: Settings, farm: LocalFarm) -> None:
    folder = settings.service_registration_path[0]
    for version in ("1.0", "2.0"):
        (folder / f"ver_{version}.toml").write_text(
            f'entry_point = "echo:EchoService"\npython_path = ["{EXAMPLES}"]\n'
            f'description = "v{version}"\n'
        )
    with Session.create(SessionStartInfo("ver"), settings) as newest:
        assert newest.status()["version"] == "2.0"  # no unversioned file: the highest
    with Session.create(SessionStartInfo("ver", version="1.0"), settings) as asked:
        assert asked.status()["version"] == "1.0"
    with pytest.raises(ServiceNotFound, match=r"no version 3\.0; versions available: 1\.0, 2\.0"):
        Session.create(SessionStartInfo("ver", version="3.0"), settings)
