"""An interactive client that sends without reading is held at client.max_unread_responses,
and told so when nothing reads, instead of piling responses up in RabbitMQ or hanging."""

from __future__ import annotations

import dataclasses
import threading

import pytest

from soafarm import BrokerClient, Response, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import Throttled
from soafarm.local.farm import LocalFarm
from tests.waiting import wait_until

pytestmark = pytest.mark.integration

N = 3000


def with_client(s: Settings, **values: object) -> Settings:
    return s.replace(client=dataclasses.replace(s.client, **values))


def assert_each_once(ids: list[int], n: int = N) -> None:
    assert len(ids) == len(set(ids)), f"{len(ids) - len(set(ids))} responses handed out twice"
    assert sorted(ids) == list(range(n)), f"{n - len(set(ids))} responses missing"


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
