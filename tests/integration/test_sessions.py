"""Interactive sessions end to end: real broker daemon, worker host and service instances."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pika
import pytest

from soafarm import BrokerClient, ServiceFault, Session, SessionStartInfo
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.errors import (
    BrokerUnavailable,
    ConnectionFailed,
    EncodeError,
    MessageTooLarge,
    RegistrationError,
    ServiceNotFound,
    SessionClosed,
    SessionFailed,
    SessionNotFound,
)
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.transport.identity import own_user
from tests.proxy import CuttableProxy

pytestmark = pytest.mark.integration


def test_thousand_echo_requests_each_answered_once_by_both_instances(
    settings: Settings, farm: LocalFarm
) -> None:
    # small batches so the 1,000 requests travel as 100 messages, spread over both instances
    small = settings.replace(client=settings.client.__class__(request_batch_size=10))
    with Session.create(SessionStartInfo("echo", min_units=1, max_units=4), small) as session:
        assert session.wait_for_instances(2, timeout=30) == 2
        with BrokerClient(session) as client:
            for i in range(1000):
                client.send_request("whoami", user_data=i)
            for i in range(1000, 1010):
                client.send_request("echo", f"hello {i}", user_data=i)
            client.end_requests()
            responses = list(client.get_responses(timeout=30))
    user_data = [r.user_data for r in responses]
    assert sorted(user_data) == list(range(1010))
    instances = {r.result for r in responses if r.user_data < 1000}
    assert len(instances) == 2, instances
    echoed = {r.user_data: r.result for r in responses if r.user_data >= 1000}
    assert all(v.endswith(f":hello {k}") for k, v in echoed.items())


def test_service_exception_is_a_fault_and_the_batch_goes_on(
    settings: Settings, farm: LocalFarm
) -> None:
    with (
        Session.create(SessionStartInfo("faulty"), settings) as session,
        BrokerClient(session) as client,
    ):
        for i in range(20):
            if i % 5 == 0:
                client.send_request("fail", f"bad {i}", user_data=i)
            else:
                client.send_request("ok", i, user_data=i)
        client.send_request("unencodable", user_data="enc")
        client.send_request("no_such_op", user_data="op")
        client.end_requests()
        by_data = {r.user_data: r for r in client.get_responses(timeout=30)}
    assert len(by_data) == 22
    for i in range(20):
        if i % 5:
            assert by_data[i].result == i
            continue
        with pytest.raises(ServiceFault) as e:
            _ = by_data[i].result
        assert e.value.fault_type == "ValueError" and e.value.message == f"bad {i}"
        assert "Traceback" in e.value.detail  # faulty.toml includes exception detail
    assert by_data["enc"].fault is not None and by_data["enc"].fault.type == "EncodeError"
    assert by_data["op"].fault is not None and by_data["op"].fault.type == "UnknownOperation"


def test_unknown_service_is_a_clear_error(settings: Settings, farm: LocalFarm) -> None:
    with pytest.raises(ServiceNotFound, match=r"unknown service 'nosuch'; registered: .*echo"):
        Session.create(SessionStartInfo("nosuch"), settings)


def test_malformed_registration_file_is_reported_to_the_client(
    settings: Settings, farm: LocalFarm
) -> None:
    folder = settings.service_registration_path[0]
    (folder / "broken.toml").write_text('entry_point = "x:Y"\nmax_concurrent_calls = "lots"\n')
    with pytest.raises(RegistrationError, match=r"broken\.toml: max_concurrent_calls: expected"):
        Session.create(SessionStartInfo("broken"), settings)


def test_unencodable_and_oversized_requests_fail_at_once_and_lose_nothing(
    settings: Settings, farm: LocalFarm
) -> None:
    small = settings.replace(max_message_bytes=4096)
    with (
        Session.create(SessionStartInfo("echo"), small) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("echo", "before", user_data=1)
        with pytest.raises(EncodeError, match="cannot encode"):
            client.send_request("echo", object())
        with pytest.raises(MessageTooLarge, match="over the 4,096-byte limit"):
            client.send_request("echo", "x" * 5000)
        client.send_request("echo", "after", user_data=2)
        client.end_requests()
        results = {r.user_data: r.result for r in client.get_responses(timeout=30)}
    assert set(results) == {1, 2}
    assert results[1].endswith(":before") and results[2].endswith(":after")


def test_batches_are_split_to_stay_under_the_size_limit(
    settings: Settings, farm: LocalFarm
) -> None:
    small = settings.replace(max_message_bytes=8192)
    with (
        Session.create(SessionStartInfo("echo"), small) as session,
        BrokerClient(session) as client,
    ):
        for i in range(20):  # 20 x ~3 KiB would be one 60 KiB batch without the byte limit
            client.send_request("echo", "y" * 3000, user_data=i)
        client.end_requests()
        assert sorted(r.user_data for r in client.get_responses(timeout=30)) == list(range(20))


def test_response_handler_receives_every_response_once(settings: Settings, farm: LocalFarm) -> None:
    import threading

    got: list[int] = []
    done = threading.Event()

    def on_response(response: object) -> None:
        got.append(response.user_data)  # type: ignore[attr-defined]
        if len(got) == 300:
            done.set()

    with (
        Session.create(SessionStartInfo("echo"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.set_response_handler(on_response)
        for i in range(300):
            client.send_request("echo", i, user_data=i)
        client.end_requests()
        assert done.wait(30)
    assert sorted(got) == list(range(300))


def test_close_deletes_queues_and_later_use_says_closed(
    settings: Settings, farm: LocalFarm
) -> None:
    session = Session.create(SessionStartInfo("echo"), settings)
    with BrokerClient(session, client_id="c1") as client:
        client.send_request("echo", 1)
        client.end_requests()
        assert len(list(client.get_responses(timeout=30))) == 1
    sid = session.id
    session.close()
    names = Names(settings.namespace)
    conn = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        for queue in (
            names.request_queue(sid),
            names.response_queue(sid, "c1", own_user(settings)),
        ):
            channel = conn.channel()
            with pytest.raises(pika.exceptions.ChannelClosedByBroker):
                channel.queue_declare(queue, passive=True)
    finally:
        conn.close()
    other = Session.create(SessionStartInfo("echo"), settings)
    try:
        with pytest.raises(SessionClosed, match=f"session {sid} is closed"):
            other.control.call("get", session_id=sid)
        with pytest.raises(SessionNotFound, match="no session 999999"):
            other.control.call("get", session_id=999999)
    finally:
        other.close()


def test_no_broker_daemon_fails_fast_and_says_what_to_do(settings: Settings) -> None:
    with pytest.raises(BrokerUnavailable, match=r"no broker daemon is running.*soafarm up"):
        Session.create(SessionStartInfo("echo"), settings)


def test_own_service_from_registration_path(settings: Settings, farm: LocalFarm) -> None:
    folder: Path = settings.service_registration_path[0]
    (folder / "adder.py").write_text(
        "class Adder:\n"
        "    def __init__(self, context):\n"
        "        self.offset = int(context.environment['OFFSET'])\n"
        "    def add(self, a, b):\n"
        "        return a + b + self.offset\n"
    )
    (folder / "adder.toml").write_text(
        'entry_point = "adder:Adder"\n[environment]\nOFFSET = "100"\n'
    )
    with (
        Session.create(SessionStartInfo("adder"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("add", 1, b=2)
        client.end_requests()
        (response,) = client.get_responses(timeout=30)
    assert response.result == 103


def test_a_service_no_host_can_load_fails_the_session_with_the_error(
    settings: Settings, farm: LocalFarm
) -> None:
    folder: Path = settings.service_registration_path[0]
    # excluded, tried again after a second, failed again: the session fails
    (folder / "noload.toml").write_text(
        'entry_point = "does_not_exist:Nothing"\n[broker]\nend_point_not_found_retry_period = 1\n'
    )
    with (
        Session.create(SessionStartInfo("noload"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("anything")
        with pytest.raises(SessionFailed) as e:
            list(client.get_responses(timeout=60))
        assert "could not be loaded on any host" in str(e.value)
        assert "does_not_exist" in str(e.value)
        status = session.status()
        assert status["state"] == "failed"
        assert "does_not_exist" in str(status["load_errors"])


def test_rabbitmq_connection_lost_mid_session_is_one_clear_error(
    settings: Settings, farm: LocalFarm
) -> None:
    with CuttableProxy(("127.0.0.1", 5672)) as proxy:
        # the client retries a lost connection for client.reconnect_timeout before it gives up
        through = settings.replace(
            amqp_url=f"amqp://guest:guest@127.0.0.1:{proxy.port}/",
            client=dataclasses.replace(settings.client, reconnect_timeout=1.0),
        )
        session = Session.create(SessionStartInfo("echo"), through)
        client = BrokerClient(session)
        client.send_request("echo", "before")
        assert len(list(client.get_responses(timeout=30))) == 1
        proxy.cut()
        with pytest.raises(ConnectionFailed) as e:
            # a request after a pause is sent at once: the send or the read reports the loss
            client.send_request("echo", "after")
            list(client.get_responses(timeout=30))
        assert f"lost the connection to RabbitMQ at amqp://guest:**@127.0.0.1:{proxy.port}/" in (
            str(e.value)
        )
        client.close(discard=True)  # its connections are gone: closing them raises nothing
        # (detached, not only its control closed: its heartbeat would otherwise beat into
        # the namespace after the test deleted it, until pytest exits)
        session.detach()
    # the session itself lives on in the broker: close it over a working connection
    with Session(ControlClient(settings), {"id": session.id}, settings):
        pass
