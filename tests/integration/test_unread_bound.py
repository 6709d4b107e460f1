"""Readers and senders ride out RabbitMQ and Redis restarts, exactly once; when they give up
it is one line, exit 3 and a resume command; interactive clients learn their session is lost.

Every fault here lands on private servers (`private_servers_for`), started once for the
module and restarted by the tests; each test has a namespace and a farm of its own.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import subprocess
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from soafarm import BrokerClient, Response, Session, SessionStartInfo
from soafarm.config import Settings, load_settings
from soafarm.errors import BrokerUnavailable, Throttled
from soafarm.local.farm import LocalFarm, delete_namespace
from tests.conftest import PrivateServers, cli_env, private_servers_for
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

N = 3000
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def servers_of_module() -> Iterator[PrivateServers]:
    """One private RabbitMQ and Redis for the module (each starts in ~5 s)."""
    base = load_settings(environ={}).replace(namespace=f"test-{uuid.uuid4().hex[:10]}")
    with private_servers_for(base) as private:
        yield private


@pytest.fixture
def private(servers_of_module: PrivateServers) -> Iterator[PrivateServers]:
    """The module's servers, both up, with settings in a namespace of this test's own."""
    servers = servers_of_module
    for name in ("RabbitMQ", "Redis"):  # an earlier test that failed may have left one down
        servers.start(name)
    with contextlib.suppress(Exception):
        servers.rabbitmqctl("start_app")
    namespace = f"test-{uuid.uuid4().hex[:10]}"
    s = servers.settings.replace(
        namespace=namespace,
        # more, smaller messages: a fault lands mid-batch, and both instances work
        client=dataclasses.replace(servers.settings.client, request_batch_size=20),
    )
    yield PrivateServers(servers.servers, s)
    with contextlib.suppress(Exception):
        delete_namespace(s)


def with_client(s: Settings, **values: object) -> Settings:
    return s.replace(client=dataclasses.replace(s.client, **values))


def sealed_batch(session: Session, client_id: str, seconds: float = 0.001) -> BrokerClient:
    client = BrokerClient(session, client_id)
    for i in range(N):
        client.send_request("sleep", seconds, user_data=i)
    client.end_requests()
    return client


def assert_each_once(ids: list[int], n: int = N) -> None:
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} responses handed out twice"
    assert sorted(ids) == list(range(n)), f"{n - len(set(ids))} responses missing"


def soafarm_child(
    s: Settings, *args: str, env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "soafarm", *args],
        env={**cli_env(s), **(env or {})},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def broker_answers(session: Session) -> bool:
    try:
        session.refresh()
    except BrokerUnavailable:
        return False
    return True


def ids_in(path: Path) -> list[int]:
    if not path.exists():
        return []
    return [json.loads(line)["id"] for line in path.read_text().splitlines() if line.strip()]


class Handler:
    """A response handler that records what it is given, and any error."""

    def __init__(self) -> None:
        self.ids: list[int] = []
        self.errors: list[BaseException] = []

    def __call__(self, response: Response) -> None:
        self.ids.append(response.id)


def test_unread_interactive_responses_block_the_sender_until_read(
    settings: Settings, farm: LocalFarm
) -> None:
    s = with_client(settings, max_unread_responses=500, request_batch_size=50)
    with Session.create(SessionStartInfo("echo"), s) as session, BrokerClient(session) as client:
        blocked = threading.Event()
        client.on_throttled(lambda unread: blocked.set() if unread else None)
        errors: list[BaseException] = []

        def send() -> None:
            try:
                for i in range(5000):
                    client.send_request("echo", i, user_data=i)
                client.end_requests()
            except BaseException as e:
                errors.append(e)

        sender = threading.Thread(target=send)
        sender.start()
        assert blocked.wait(30), "the sender never blocked"
        stuck_at = client.sent
        assert 500 <= stuck_at <= 600, stuck_at  # the bound, plus one batch being sent
        wait_until("RabbitMQ holds the answered part", lambda: client.status().done >= 500)
        assert client.sent == stuck_at, "it went on sending with nothing read"
        handler = Handler()
        client.set_response_handler(handler, on_error=handler.errors.append)
        sender.join(30)
        assert errors == []
        wait_until("every response", lambda: len(handler.ids) >= 5000 or handler.errors)
        assert handler.errors == []
        assert_each_once(handler.ids, 5000)


def test_a_sender_nobody_reads_for_is_told_so_instead_of_hanging(
    settings: Settings, farm: LocalFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    import soafarm.client.throttle

    monkeypatch.setattr(soafarm.client.throttle, "UNREAD_STALL", 1.0)
    s = with_client(settings, max_unread_responses=200, request_batch_size=50)
    with Session.create(SessionStartInfo("echo"), s) as session, BrokerClient(session) as client:
        with pytest.raises(Throttled, match=r"sent and not read back .* read responses while"):
            for i in range(1000):
                client.send_request("echo", i)
        assert client.sent <= 300
        client.close(discard=True)
