"""Durable sessions: each guarantee shown with a batch of 10,000 requests, real servers."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from soafarm import BrokerClient, DurableSession, SessionAttachInfo, SessionStartInfo
from soafarm.config import Settings
from soafarm.errors import BrokerUnavailable, ReaderTakenOver, SessionClosed, SessionError
from soafarm.local.embedded import EmbeddedServers, free_port
from soafarm.local.farm import LocalFarm
from tests.conftest import cli_env
from tests.waiting import counted, wait_until

pytestmark = pytest.mark.integration

N = 10_000
ROOT = Path(__file__).resolve().parents[2]


def small_batches(settings: Settings, size: int = 20) -> Settings:
    """More, smaller messages: crashes land mid-batch, and instances share the work."""
    return settings.replace(client=dataclasses.replace(settings.client, request_batch_size=size))


def child(settings: Settings, module: str, *args: object) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", f"tests.integration.helpers.{module}", *map(str, args)],
        env=cli_env(settings),
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )


def assert_each_once(responses: list, n: int = N) -> None:  # type: ignore[type-arg]
    ids = [r.id for r in responses]
    assert len(ids) == len(set(ids)), "a response was handed out twice"
    assert sorted(ids) == list(range(n)), f"{n - len(set(ids))} responses missing"
    assert all(r.user_data == r.id for r in responses)


def test_client_killed_while_sending_and_while_reading(settings: Settings, farm: LocalFarm) -> None:
    s = small_batches(settings)
    session = DurableSession.create(SessionStartInfo("echo"), s)
    sid = session.id
    session.detach()

    with child(s, "durable_sender", sid, N) as sender:
        assert sender.stdout is not None
        for line in sender.stdout:
            if line.startswith("sent") and int(line.split()[1]) >= 2000:
                break
        sender.kill()  # SIGKILL, mid-send

    with (
        DurableSession.attach(SessionAttachInfo(sid), s) as again,
        BrokerClient(again, "crashy") as client,
    ):
        resumed_at = client.sent  # the confirmed count the dead client last recorded
        assert 0 < resumed_at < N, resumed_at
        for i in range(resumed_at, N):  # continue where RabbitMQ's confirms say it stopped
            client.send_request("echo", i, user_data=i)
        client.end_requests()

    printed: list[int] = []
    with child(s, "durable_reader", sid, "crashy") as reader:
        assert reader.stdout is not None
        for line in reader.stdout:
            printed.append(int(line))
            if len(printed) >= 3000:
                break
        reader.kill()  # SIGKILL, mid-read
    assert len(printed) == len(set(printed))

    with (
        DurableSession.attach(SessionAttachInfo(sid), s) as again,
        BrokerClient(again, "crashy") as client,
    ):
        unread = list(client.get_responses(timeout=60, new_only=True))
        assert len({r.id for r in unread}) == len(unread)
        assert {r.id for r in unread} | set(printed) == set(range(N))
        assert list(client.get_responses(timeout=60)) == []  # a cursor: nothing new
    with (
        DurableSession.attach(SessionAttachInfo(sid), s) as again,
        BrokerClient(again, "crashy") as client,
    ):
        everything = list(client.get_responses(timeout=60))
        assert_each_once(everything)
        assert all(r.result.endswith(f":{r.id}") for r in everything)
        status = counted(client, N)
        assert (status.accepted, status.done, status.total, status.finished) == (N, N, N, True)
        again.close()


def test_requests_dropped_by_close_discard_are_not_counted_sent(
    settings: Settings, farm: LocalFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # a long linger and large batches, and no pause counts as the caller done sending (the
    # linger thread would send a buffer the caller left for LINGER_QUIET): the last
    # requests wait in the buffer until the close drops them
    monkeypatch.setattr("soafarm.client.sender.LINGER_QUIET", 3600.0)
    s = settings.replace(
        client=dataclasses.replace(settings.client, linger=60.0, request_batch_size=1000)
    )
    session = DurableSession.create(SessionStartInfo("echo"), s)
    sid = session.id
    with BrokerClient(session, "dropping") as client:
        for i in range(10):
            client.send_request("echo", i, user_data=i)
        client.flush()
        for i in range(10, 15):
            client.send_request("echo", i, user_data=i)
        dropped = len(client.sender.buffer)
        assert dropped == 5
        client.close(discard=True)
    session.detach()
    with (
        DurableSession.attach(SessionAttachInfo(sid), s) as again,
        BrokerClient(again, "dropping") as client,
    ):
        # the dropped ids were never published: a resumed client sends them again
        assert client.sent == 15 - dropped
        for i in range(client.sent, 20):
            client.send_request("echo", i, user_data=i)
        client.end_requests()
        assert_each_once(list(client.get_responses(timeout=60)), 20)
        again.close()


def slow_batch(session: DurableSession, client_id: str) -> BrokerClient:
    client = BrokerClient(session, client_id)
    for i in range(N):
        client.send_request("sleep", 0.0003, user_data=i)
    client.end_requests()
    return client


def test_instance_killed_mid_request_loses_and_repeats_nothing(
    settings: Settings, farm: LocalFarm
) -> None:
    s = small_batches(settings)
    with DurableSession.create(SessionStartInfo("faulty"), s) as session:
        session.wait_for_instances(2)
        client = slow_batch(session, "k")
        wait_until("2,000 responses", lambda: client.status().done >= 2000)
        victim = session.status()["instances"][0]["pid"]
        os.kill(victim, signal.SIGKILL)
        assert client.status().done < N, "the batch finished before the kill"
        assert_each_once(list(client.get_responses(timeout=60)))
        client.close()
        out = Path(farm.settings.service_registration_path[0]) / "responses.jsonl"
        cli = subprocess.run(
            [
                sys.executable,
                "-m",
                "soafarm",
                "responses",
                str(session.id),
                "--client-id",
                "k",
                "--output",
                str(out),
            ],
            env=cli_env(s),
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        lines = [json.loads(x) for x in out.read_text().splitlines()]
        assert sorted(x["id"] for x in lines) == list(range(N))
        session.close()


def test_broker_daemon_restarted_mid_batch(settings: Settings, farm: LocalFarm) -> None:
    s = small_batches(settings)
    with DurableSession.create(SessionStartInfo("faulty"), s) as session:
        client = slow_batch(session, "b")
        wait_until("2,000 responses", lambda: client.status().done >= 2000)
        farm.restart_broker()
        assert client.status().done < N, "the batch finished before the restart"
        assert_each_once(list(client.get_responses(timeout=60)))
        client.close()

        def broker_answers() -> bool:
            try:
                return session.status()["clients"][0]["finished"] is True
            except BrokerUnavailable:
                return False

        wait_until("the new broker daemon", broker_answers)
        session.close()


def queues_running(servers: EmbeddedServers, namespace: str) -> bool:
    out = servers.rabbitmqctl("list_queues", "name", "state", timeout=60)
    states = [
        line.split()[-1]
        for line in out.splitlines()[1:]
        if line.startswith(f"{namespace}.session.")
    ]
    return bool(states) and all(state == "running" for state in states)


def test_rabbitmq_restarted_mid_batch(settings: Settings) -> None:
    # a private RabbitMQ of this test's own: the machine's is never stopped
    nothing_there = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    private = EmbeddedServers(settings.replace(amqp_url=nothing_there))
    with private as effective, LocalFarm(effective, workers=1, cores=2):
        s = small_batches(effective)
        with DurableSession.create(SessionStartInfo("faulty"), s) as session:
            client = BrokerClient(session, "r")
            for i in range(N // 2):
                client.send_request("sleep", 0.0003, user_data=i)
            client.flush()
            wait_until("1,000 responses", lambda: client.status().done >= 1000)
            assert client.status().done < N // 2, "the first half finished before the restart"
            try:
                private.rabbitmqctl("stop_app")
            finally:
                private.rabbitmqctl("start_app")
            private.rabbitmqctl("await_startup")
            # await_startup returns before quorum queues and streams have recovered
            wait_until(
                "the session's queues to recover", lambda: queues_running(private, s.namespace)
            )
            for i in range(N // 2, N):  # the client reconnects by itself
                client.send_request("sleep", 0.0003, user_data=i)
            client.end_requests()
            assert_each_once(list(client.get_responses(timeout=60)))
            client.close()
            session.close()


def test_second_reader_takes_over_and_closed_sessions_keep_responses(
    settings: Settings, farm: LocalFarm
) -> None:
    with DurableSession.create(SessionStartInfo("echo"), settings) as session:
        with BrokerClient(session, "t") as client:
            for i in range(500):
                client.send_request("echo", i, user_data=i)
            client.end_requests()
        first = BrokerClient(session, "t")
        second = BrokerClient(session, "t")
        reading = first.get_responses(timeout=30)
        next(reading)
        assert len(list(second.get_responses(timeout=30))) == 500
        with pytest.raises(ReaderTakenOver, match="another reader took over client id 't'"):
            list(reading)
        first.close()
        second.close()
        sid = session.id
        session.close(purge=False)
    with DurableSession.attach(SessionAttachInfo(sid), settings) as closed:
        client = BrokerClient(closed, "t")
        assert len(list(client.get_responses(timeout=30))) == 500
        with pytest.raises(SessionClosed, match=f"session {sid} is closed"):
            client.send_request("echo", 1)
        client.close()
        closed.close(purge=True)
    with pytest.raises(SessionClosed):
        DurableSession.attach(SessionAttachInfo(sid), settings)


def test_a_durable_publish_no_queue_takes_is_sent_again_not_dropped(
    settings: Settings, farm: LocalFarm, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What RabbitMQ does for a moment after a restart: the queue takes nothing, yet a
    # publish without `mandatory` is confirmed (and dropped). Here the queue is deleted,
    # then declared again while the client retries.
    import pika

    from soafarm.names import Names
    from soafarm.transport import connections
    from soafarm.transport.identity import own_user
    from soafarm.transport.topology import request_queue

    with DurableSession.create(SessionStartInfo("echo"), settings) as session:
        client = BrokerClient(session, "q")
        names = Names(settings.namespace)
        spec = request_queue(names, session.id, durable=True)
        admin = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        try:
            channel = admin.channel()
            channel.queue_delete(spec.name)
            monkeypatch.setattr(connections, "UNROUTABLE_RETRY_SECONDS", 1.0)
            with pytest.raises(SessionError, match="has no queue"):
                # a request after a pause is sent at once: gone for good, one clear error
                # and not a silent drop; it stays buffered for the next flush
                client.send_request("echo", "lost?")
            monkeypatch.setattr(connections, "UNROUTABLE_RETRY_SECONDS", 60.0)

            def again() -> None:
                # declared again with its binding (a RabbitMQ restart keeps both: the queue
                # and the request exchange are durable)
                channel.queue_declare(**spec.declare_kwargs())
                channel.queue_bind(
                    spec.name,
                    names.request_exchange,
                    names.request_key(session.id, own_user(settings)),
                )

            admin.call_later(0.3, again)
            sender = threading.Thread(target=client.flush)
            sender.start()
            while sender.is_alive():
                admin.process_data_events(time_limit=0.05)
            sender.join()
        finally:
            admin.close()
        client.end_requests()
        (response,) = client.get_responses(timeout=60)
        assert response.result.endswith(":lost?")
        client.close()
