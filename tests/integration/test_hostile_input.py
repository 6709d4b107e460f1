"""Crafted request batches on a real farm: each is dead-lettered at its first delivery, and
the session goes on answering its own client (issue 16's wedged-session and cross-session
findings)."""

from __future__ import annotations

import msgpack
import pika
import pytest

from soafarm import BrokerClient, DurableSession, Session, SessionStartInfo
from soafarm.config import Settings
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.protocol import Request as Req
from soafarm.protocol import (
    Response,
    encode_request,
    encode_request_batch,
    encode_response,
    encode_response_batch,
)
from soafarm.transport.connections import redis_client
from soafarm.transport.identity import own_user
from soafarm.transport.topology import dead_letter_queue
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


def dead_letters(settings: Settings) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        name = dead_letter_queue(Names(settings.namespace)).name
        return int(connection.channel().queue_declare(name, passive=True).method.message_count)
    finally:
        connection.close()


def test_crafted_batches_are_dead_lettered_and_the_session_goes_on(
    settings: Settings, farm: LocalFarm
) -> None:
    names = Names(settings.namespace)
    with (
        Session.create(SessionStartInfo("echo"), settings) as session,
        BrokerClient(session) as client,
    ):
        client.send_request("echo", "before")
        client.end_requests()
        assert len(list(client.get_responses(timeout=60))) == 1
        sid = session.id
        reply = names.response_queue(sid, "default", own_user(settings))

        def raw(request_id: int, session_id: int = sid, reply_to: str = reply) -> bytes:
            body: bytes = msgpack.packb(
                [
                    "rq",
                    1,
                    session_id,
                    "default",
                    reply_to,
                    [[request_id, "echo", ["x"], {}, None, 0]],
                ]
            )
            return body

        crafted = [
            raw(-5),  # made Redis refuse the done mark: the instance reconnected forever
            raw(4_000_000_000 * 2),  # past the done bitmap's offsets
            raw(4_000_000_000),  # a valid offset, far past what was sent: grew Redis by 512 MB
            raw(7, session_id=sid + 1000),  # aimed at another session: ran and counted there
            raw(
                8, reply_to=names.response_queue(sid + 1000, "default", own_user(settings))
            ),  # forged reply address
        ]
        before = dead_letters(settings)
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        try:
            channel = connection.channel()
            # as the farm's user (RabbitMQ checks user_id): the sender is known, so each
            # batch meets the check made for it
            props = pika.BasicProperties(user_id=own_user(settings))
            for body in crafted:
                channel.basic_publish("", names.request_queue(sid), body, props)
        finally:
            connection.close()
        wait_until(
            "the crafted batches dead-lettered",
            lambda: dead_letters(settings) - before == len(crafted),
            timeout=30,
        )
        # the session still answers its own client, at once
        with BrokerClient(session, "after") as later:
            for i in range(300):
                later.send_request("echo", i)
            later.end_requests()
            got = sorted(r.id for r in later.get_responses(timeout=60))
        assert got == list(range(300))
        # nothing crafted was counted as this client's (its done counter is informational in
        # an interactive session, written up to 50 ms late: the bitmap is what is checked)
        r = redis_client(settings)
        done_key = names.client_done_key(sid, "default")
        assert [r.getbit(done_key, i) for i in (7, 8)] == [0, 0]
        assert r.strlen(done_key) < 1000  # bytes: the bitmap never reached id 4,000,000,000
        assert client.status().done <= 1
        r.close()


def test_a_valid_but_foreign_batch_made_by_the_library_is_refused_too(
    settings: Settings, farm: LocalFarm
) -> None:
    names = Names(settings.namespace)
    with (
        Session.create(SessionStartInfo("echo"), settings) as a,
        Session.create(SessionStartInfo("echo"), settings) as b,
    ):
        # well-formed, encoded by soafarm itself, but for session b, published into a's queue
        body = encode_request_batch(
            b.id,
            "default",
            names.response_queue(b.id, "default", own_user(settings)),
            [encode_request(Req(0, "echo", ("x",)), settings.max_message_bytes)],
        )
        before = dead_letters(settings)
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        try:
            connection.channel().basic_publish("", names.request_queue(a.id), body)
        finally:
            connection.close()
        with BrokerClient(a) as client:  # a's instance is up once it answers
            client.send_request("echo", "a")
            client.end_requests()
            assert len(list(client.get_responses(timeout=60))) == 1
        wait_until("the foreign batch dead-lettered", lambda: dead_letters(settings) == before + 1)


def test_a_forged_response_is_ignored_and_counted(settings: Settings, farm: LocalFarm) -> None:
    names = Names(settings.namespace)
    with (
        Session.create(SessionStartInfo("echo"), settings) as session,
        BrokerClient(session) as client,
    ):
        # published by anyone who can reach the response queue, before the real answers
        forged = encode_response_batch(
            session.id,
            "default",
            "not-an-instance",
            [encode_response(Response(3_000_000_000, "x"))],
        )
        connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        try:
            # as the farm's own user: only the id gives it away
            connection.channel().basic_publish(
                "",
                names.response_queue(session.id, "default", own_user(settings)),
                forged,
                pika.BasicProperties(user_id=own_user(settings)),
            )
        finally:
            connection.close()
        for i in range(5):
            client.send_request("echo", i)
        client.end_requests()
        assert sorted(r.id for r in client.get_responses(timeout=60)) == list(range(5))
        assert client.forged == 1


def test_a_batch_redis_refuses_is_dead_lettered_not_looped_on(
    settings: Settings, farm: LocalFarm
) -> None:
    """A client id's done bitmap overwritten with a list (anyone with the Redis password can):
    Redis refuses every count of its batches with WRONGTYPE. The instance used to take that
    for a lost connection and reconnect for ever; now the batch is requeued up to
    message_resend_limit times, then dead-lettered, and the session serves other batches."""
    names = Names(settings.namespace)
    info = SessionStartInfo("echo", broker_settings={"message_resend_limit": 2})
    session = DurableSession.create(info, settings)
    r = redis_client(settings)
    try:
        before = dead_letters(settings)
        with BrokerClient(session, "spoilt") as spoilt:
            done_key = names.client_done_key(session.id, "spoilt")
            r.delete(done_key)
            r.rpush(done_key, "not a bitmap")
            spoilt.send_request("echo", "refused")
            spoilt.flush()
            wait_until(
                "the refused batch dead-lettered",
                lambda: dead_letters(settings) == before + 1,
                timeout=60,
            )
        with BrokerClient(session, "fine") as fine:
            for i in range(20):
                fine.send_request("echo", i)
            fine.end_requests()
            assert sorted(x.id for x in fine.get_responses(timeout=60)) == list(range(20))
    finally:
        r.close()
        session.close()
