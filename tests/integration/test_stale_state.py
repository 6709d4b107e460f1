"""No stale state after faults, against the real servers: cooperating broker daemons, garbage
in Redis, queues lost with a RabbitMQ restart, lost hosts, Redis coming back empty,
`soafarm namespace delete`, read-only commands, and durable sessions releasing their units.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import pika
import pika.exceptions
import pytest
import redis

from soafarm import BrokerClient, DurableSession, Session, SessionAttachInfo, SessionStartInfo
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.errors import (
    BrokerUnavailable,
    DecodeError,
    SessionClosed,
    SessionFailed,
    SessionNotFound,
)
from soafarm.local.farm import LocalFarm
from soafarm.names import Names
from soafarm.state.control import AttachClientArgs, CloseArgs, GetArgs, HostsArgs, ListArgs
from soafarm.state.leases import LEASE_SECONDS, Lease
from soafarm.state.namespace import delete_namespace_keys
from soafarm.state.records import SessionState
from soafarm.transport.errors import is_queue_gone
from soafarm.transport.identity import own_user
from tests.conftest import PrivateServers, cli_env
from tests.waiting import wait_until

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


# --- helpers --------------------------------------------------------------------------------


@pytest.fixture
def fast(settings: Settings) -> Settings:
    """The test's settings with hosts declared lost after 2 s instead of 5."""
    return settings.replace(
        worker=dataclasses.replace(settings.worker, host_timeout=2.0, heartbeat_interval=0.5)
    )


class Procs:
    """`soafarm` child processes of a test, each in its own process group (so a SIGKILL can
    take a host with its instances); all are stopped at the end."""

    def __init__(self) -> None:
        self.running: list[subprocess.Popen[bytes]] = []

    def start(self, settings: Settings, *args: str) -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            [sys.executable, "-m", "soafarm", *args],
            env=cli_env(settings),
            cwd=ROOT,
            start_new_session=True,
        )
        self.running.append(proc)
        return proc

    def kill_group(self, proc: subprocess.Popen[bytes]) -> None:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def stop_all(self) -> None:
        for proc in self.running:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.running:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


@pytest.fixture
def procs() -> Iterator[Procs]:
    running = Procs()
    yield running
    running.stop_all()


def control(settings: Settings) -> ControlClient:
    return ControlClient(settings)


def rpc(settings: Settings, args: Any) -> Any:
    client = ControlClient(settings)
    try:
        return client.request(args)
    finally:
        client.close()


def queue_exists(settings: Settings, name: str) -> bool:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        connection.channel().queue_declare(queue=name, passive=True)
    except pika.exceptions.ChannelClosedByBroker as e:
        if is_queue_gone(e):
            return False
        raise
    finally:
        if connection.is_open:
            connection.close()
    return True


def control_consumers(settings: Settings) -> int:
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        ok = connection.channel().queue_declare(
            queue=Names(settings.namespace).control_queue, passive=True
        )
        return int(ok.method.consumer_count)
    except pika.exceptions.ChannelClosedByBroker:
        return 0
    finally:
        if connection.is_open:
            connection.close()


def echo(settings: Settings, session: Session, value: Any = 1, client_id: str = "c") -> str:
    """Run one echo call in `session`; returns the value echoed (without the host name)."""
    with BrokerClient(session, client_id) as client:
        client.send_request("echo", value)
        (response,) = list(client.get_responses(timeout=30))
    return str(response.result).split(":", 1)[1]


def state_of(settings: Settings, sid: int) -> str:
    return str(rpc(settings, GetArgs(sid)).record.state)


def state_or_none(settings: Settings, sid: int) -> str | None:
    """The session's state, or None while no broker daemon answers (reconnecting)."""
    try:
        return state_of(settings, sid)
    except BrokerUnavailable:
        return None


def soafarm(settings: Settings, *args: str) -> Any:
    """Run a `soafarm` command in this process (a subprocess costs ~2 s of imports here);
    stdin is empty, so a confirmation prompt reads "no". The CLI's logging set-up is left
    out: it is process-wide and caches every logger it serves, so later tests in this
    process could no longer capture their logs."""
    from click.testing import CliRunner

    from soafarm.cli import cli

    with mock.patch("soafarm.cli.configure_logging"):
        return CliRunner().invoke(cli, list(args), env=cli_env(settings), input="")


def redis_of(settings: Settings) -> redis.Redis:
    return redis.Redis.from_url(settings.redis_url)


# --- 1. cooperating broker daemons ------------------------------------------------------------


def test_two_broker_daemons_cooperate_and_a_killed_leader_is_replaced(
    fast: Settings, procs: Procs
) -> None:
    a = procs.start(fast, "broker")
    b = procs.start(fast, "broker")
    procs.start(fast, "worker", "--cores", "3")
    wait_until("two broker daemons on the control queue", lambda: control_consumers(fast) == 2)
    lease = Lease(redis_of(fast), Names(fast.namespace), "test")
    holder = wait_until("a leader", lease.current)
    leader_pid = int(holder.split(":")[1])
    assert leader_pid in (a.pid, b.pid)

    # any daemon answers: several sessions, each served end to end
    # (RabbitMQ hands the control queue's messages to its consumers in turn)
    sessions = [Session.create(SessionStartInfo("echo"), fast) for _ in range(3)]
    assert len({s.id for s in sessions}) == 3
    assert [echo(fast, s, i) for i, s in enumerate(sessions)] == ["0", "1", "2"]

    # closing one session from both daemons at once: closed once, nothing comes back
    target = sessions.pop()
    outcomes: list[str] = []

    def close() -> None:
        try:
            rpc(fast, CloseArgs(target.id))
            outcomes.append("closed")
        except SessionClosed:
            outcomes.append("already closed")

    threads = [threading.Thread(target=close) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    target.detach()
    assert "closed" in outcomes
    with pytest.raises(SessionClosed):
        rpc(fast, GetArgs(target.id))
    assert not queue_exists(fast, Names(fast.namespace).request_queue(target.id))

    # the leader is SIGKILLed: the other daemon takes over within the lease
    killed = a if leader_pid == a.pid else b
    began = time.monotonic()
    killed.kill()
    killed.wait()
    wait_until(
        "the other daemon to take the lease",
        lambda: (lease.current() or holder) != holder,
        LEASE_SECONDS + 5,
    )
    takeover = time.monotonic() - began
    assert takeover < LEASE_SECONDS + 1.5
    # and allocates: a new session (on units the old ones leave) runs
    for s in sessions:
        s.close()
    with Session.create(SessionStartInfo("echo", min_units=2), fast) as late:
        assert echo(fast, late, "after") == "after"
    print(f"lease takeover after SIGKILL of the leader: {takeover:.2f}s")


# --- 2. garbage in Redis ----------------------------------------------------------------------


def test_garbage_in_a_live_namespace_never_stops_the_broker_or_the_host(
    fast: Settings, procs: Procs
) -> None:
    broker = procs.start(fast, "broker")
    host = procs.start(fast, "worker", "--cores", "2", "--name", "h1")
    names = Names(fast.namespace)
    r = redis_of(fast)
    wait_until("the host to register", lambda: r.hexists(names.hosts_key, "h1"))
    wait_until("the broker daemon", lambda: control_consumers(fast) == 1)
    with Session.create(SessionStartInfo("echo", max_units=2), fast) as session:
        assert echo(fast, session, "before") == "before"
        # eight kinds of garbage, written into the live namespace
        r.set(names.session_key(999), "{not json")
        r.sadd(names.sessions_key, 999, "junk")
        r.set(names.session_key(998), '{"id": 998, "service": 3}')
        r.sadd(names.sessions_key, 998)
        r.hset(names.client_key(session.id, "c"), "accepted", "lots")
        r.hset(names.hosts_key, "ghost", "\x00garbage")
        r.hset(names.host_assignments_key("h1"), "x", "y")
        r.hset(names.session_instances_key(session.id), "h1.x", "[")
        r.hset(names.host_load_key("h1"), "h1.x", "{}")
        r.hset(names.targets_key, "t", "u")
        # the broker keeps answering and allocating; the host keeps serving
        assert echo(fast, session, "after") == "after"
        listed = rpc(fast, ListArgs())
        assert session.id in [s.record.id for s in listed.items]
        assert [h.record.id for h in rpc(fast, HostsArgs()).items] == ["h1"]
        with pytest.raises(DecodeError, match="session 999 cannot be used: corrupt SessionRecord"):
            rpc(fast, GetArgs(999))
        with Session.create(SessionStartInfo("echo"), fast) as second:
            assert echo(fast, second, "new") == "new"
        # the leader removed what it safely can; the corrupt records wait for an operator
        wait_until("junk members to go", lambda: not r.sismember(names.sessions_key, "junk"))
        wait_until("the ghost host to go", lambda: not r.hexists(names.hosts_key, "ghost"))
        rpc(fast, CloseArgs(999))  # purge works on a corrupt record
        assert not r.exists(names.session_key(999))
    assert broker.poll() is None and host.poll() is None


# --- 3. a RabbitMQ restart loses interactive queues -------------------------------------------


def test_sessions_whose_queue_vanished_fail_with_a_reason_and_free_their_units(
    private_servers: PrivateServers,
) -> None:
    s = private_servers.settings
    with LocalFarm(s, workers=1, cores=2):
        zombie = Session.create(SessionStartInfo("echo", min_units=2), s)
        durable = DurableSession.create(SessionStartInfo("echo", min_units=0, max_units=1), s)
        client = BrokerClient(zombie, "c")
        client.send_request("echo", 1)
        assert len(list(client.get_responses(timeout=30))) == 1
        began = time.monotonic()
        private_servers.restart("RabbitMQ")
        restarted = time.monotonic()
        wait_until("the session to fail", lambda: state_or_none(s, zombie.id) == "failed", 60)
        detected = time.monotonic() - restarted
        error = rpc(s, GetArgs(zombie.id)).record.error
        assert "request queue" in error and "RabbitMQ restart" in error
        # its clients are told so
        again = Session.attach(SessionAttachInfo(zombie.id), s)
        with pytest.raises(SessionFailed, match=f"session {zombie.id} failed: its request"):
            BrokerClient(again, "c2")
        again.detach()
        with contextlib.suppress(Exception):  # its connections died with RabbitMQ
            client.close(discard=True)
        # the durable session (quorum queue) is not touched
        assert state_of(s, durable.id) in ("queued", "running")
        # its two units are free: a session that needs both runs
        with Session.create(SessionStartInfo("echo", min_units=2), s) as fresh:
            assert echo(s, fresh, "fresh") == "fresh"
        zombie.close()
        durable.close()
    print(f"RabbitMQ restart took {restarted - began:.1f}s; zombie failed {detected:.1f}s later")


def test_an_attach_to_a_session_whose_queue_vanished_is_its_error_not_the_brokers(
    settings: Settings, farm: LocalFarm
) -> None:
    """Between a RabbitMQ restart that dropped an interactive session's queues and the round
    that marks it failed, an attach binds to a queue RabbitMQ no longer has: the caller gets
    the session's error at once, and the broker daemon keeps its connection."""
    with Session.create(SessionStartInfo("echo", min_units=0), settings) as session:
        admin = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
        try:
            admin.channel().queue_delete(Names(settings.namespace).request_queue(session.id))
        finally:
            admin.close()
        began = time.monotonic()
        with pytest.raises(SessionFailed, match="its queues are gone from RabbitMQ"):
            BrokerClient(session, "late")
        assert time.monotonic() - began < 5  # answered, not a control timeout
        assert rpc(settings, HostsArgs()) is not None  # the broker answers at once
        assert control_consumers(settings) >= 1


# --- 4. a lost host's instance records ----------------------------------------------------------


def test_a_lost_hosts_instance_records_go_when_it_is_forgotten(
    fast: Settings, procs: Procs
) -> None:
    procs.start(fast, "broker")
    keep = procs.start(fast, "worker", "--cores", "1", "--name", "keep")
    lost = procs.start(fast, "worker", "--cores", "2", "--name", "lost")
    names = Names(fast.namespace)
    r = redis_of(fast)
    wait_until("both hosts", lambda: r.hlen(names.hosts_key) == 2)
    wait_until("the broker daemon", lambda: control_consumers(fast) == 1)
    with Session.create(SessionStartInfo("echo", min_units=3, max_units=3), fast) as session:
        wait_until("three instances", lambda: len(session.status()["instances"]) == 3)
        procs.kill_group(lost)  # the host and its instances, as a lost machine
        began = time.monotonic()
        wait_until(
            "the lost host's instance records to go",
            lambda: {i["host_id"] for i in session.status()["instances"]} == {"keep"},
            30,
        )
        gone_after = time.monotonic() - began
        assert gone_after < 2.0 + 3.0  # host_timeout, then the next round
        status = session.status()
        assert (status["allocated_units"], status["target_units"]) == (1, 1)
        assert echo(fast, session, "still") == "still"
    assert keep.poll() is None
    print(f"instance records of a SIGKILLed host removed {gone_after:.1f}s after the kill")


# --- 5. Redis comes back empty ---------------------------------------------------------------


def test_redis_coming_back_empty_never_reuses_a_session_id(settings: Settings) -> None:
    names = Names(settings.namespace)
    r = redis_of(settings)
    with LocalFarm(settings, workers=1, cores=2):
        old = DurableSession.create(SessionStartInfo("echo"), settings)
        with BrokerClient(old, "default") as client:
            for i in range(10):
                client.send_request("echo", f"old {i}")
            client.end_requests()
            assert len(list(client.get_responses(timeout=30))) == 10
        old.detach()
        # Redis restarted without persistence: for this namespace, exactly its keys are gone
        delete_namespace_keys(r, names)
        wait_until("the host to register again", lambda: r.hlen(names.hosts_key) == 1)
        with pytest.raises(SessionNotFound, match=f"session {old.id}'s state was lost") as lost:
            DurableSession.attach(SessionAttachInfo(old.id), settings)
        assert "its request queue" in str(lost.value)
        assert "soafarm namespace delete" in str(lost.value)
        with DurableSession.create(SessionStartInfo("echo"), settings) as new:
            assert new.id > old.id
            with BrokerClient(new, "default") as client:
                client.send_request("echo", "new")
                client.end_requests()
                (response,) = list(client.get_responses(timeout=30))
                assert response.result.endswith(":new")
            new.close()
    # the old session's queue and stream are left for `soafarm namespace delete`
    assert queue_exists(settings, names.request_queue(old.id))
    done = soafarm(settings, "namespace", "delete", "--yes")
    assert done.exit_code == 0, done.output
    assert not queue_exists(settings, names.request_queue(old.id))
    assert not queue_exists(settings, names.response_queue(old.id, "default", own_user(settings)))


# --- 6. soafarm namespace delete -----------------------------------------------------------------


def test_namespace_delete_refuses_while_in_use_then_removes_every_queue_and_key(
    settings: Settings,
) -> None:
    names = Names(settings.namespace)
    with LocalFarm(settings, workers=1, cores=2):
        durable = DurableSession.create(SessionStartInfo("echo"), settings)
        with BrokerClient(durable, "t") as client:
            client.send_request("echo", 1)
            client.end_requests()
            assert len(list(client.get_responses(timeout=30))) == 1
        durable.close(purge=False)  # its stream stays readable
        interactive = Session.create(SessionStartInfo("echo"), settings)
        assert echo(settings, interactive) == "1"
        interactive.detach()
        busy = soafarm(settings, "namespace", "delete", "--yes")
        assert busy.exit_code == 1
        assert busy.stderr.count("\n") == 1, busy.stderr
        assert "is in use: 1 live worker host(s)" in busy.stderr
        assert "1 broker daemon(s)" in busy.stderr
    refused = soafarm(settings, "namespace", "delete")  # no tty, no --yes: nothing happens
    assert refused.exit_code != 0
    assert queue_exists(settings, names.response_queue(durable.id, "t", own_user(settings)))
    done = soafarm(settings, "namespace", "delete", "--yes")
    assert done.exit_code == 0, done.output
    assert f"namespace {settings.namespace!r} deleted" in done.stdout
    left = subprocess.run(
        ["rabbitmqctl", "list_queues", "name", "-q"],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.split()
    assert [q for q in left if q.startswith(f"{settings.namespace}.")] == []
    assert list(redis_of(settings).scan_iter(match=f"{settings.namespace}:*")) == []


# --- 7. read-only commands create nothing --------------------------------------------------------


def test_read_only_commands_never_create_queues(settings: Settings, farm: LocalFarm) -> None:
    names = Names(settings.namespace)
    with DurableSession.create(SessionStartInfo("echo"), settings) as session:
        with BrokerClient(session, "t") as client:
            client.send_request("echo", 1)
            client.end_requests()
            assert len(list(client.get_responses(timeout=30))) == 1
        sid = session.id
        # a reader attaching a client id the session does not have creates nothing
        with pytest.raises(SessionNotFound, match=r"has no client id 'nobody' \(it has: t\)"):
            rpc(settings, AttachClientArgs(sid, "nobody", create=False))
        assert not queue_exists(settings, names.response_queue(sid, "nobody", own_user(settings)))
        session.close(purge=False)
    for args, code in (
        (("sessions", "list"), 0),
        (("sessions", "show", str(sid)), 0),
        (("hosts",), 0),
        (("responses", str(sid), "--client-id", "t"), 0),
        (("sessions", "show", "12345"), 1),
    ):
        result = soafarm(settings, *args)
        assert result.exit_code == code, (args, result.output)
    # a closed session's queue is not declared again, nor any other client id's
    assert not queue_exists(settings, names.request_queue(sid))
    with pytest.raises(SessionClosed, match="has no client 'other'"):
        rpc(settings, AttachClientArgs(sid, "other"))
    assert not queue_exists(settings, names.response_queue(sid, "other", own_user(settings)))
    assert not queue_exists(settings, names.request_queue(12345))
    assert not redis_of(settings).exists(names.client_key(sid, "other"))


# --- 8. durable sessions release their units ------------------------------------------------------


def test_a_finished_unread_durable_batch_releases_its_units_and_gets_them_back(
    settings: Settings, farm: LocalFarm
) -> None:
    quick = {"durable_release_timeout": 1.0}
    info = SessionStartInfo("echo", min_units=2, broker_settings=quick)
    session = DurableSession.create(info, settings)
    with BrokerClient(session, "t") as client:
        for i in range(20):
            client.send_request("echo", i)
        client.end_requests()
        wait_until("the batch to finish", lambda: client.status().finished, 30)
    session.detach()  # submitted, finished, unread: nobody is connected
    sid = session.id
    began = time.monotonic()
    wait_until("the units to go", lambda: state_of(settings, sid) == "released", 15)
    released_after = time.monotonic() - began
    info_now = rpc(settings, GetArgs(sid))
    assert (info_now.target_units, info_now.record.state) == (0, SessionState.RELEASED)
    # the 2-core host is free for another session needing both cores
    with Session.create(SessionStartInfo("echo", min_units=2), settings) as other:
        assert echo(settings, other, "other") == "other"
    # a client sends more: units come back and the new requests are answered; the old
    # responses are still there
    with DurableSession.attach(SessionAttachInfo(sid), settings) as again:
        with BrokerClient(again, "more") as client:
            client.send_request("echo", "again")
            client.end_requests()
            (response,) = list(client.get_responses(timeout=30))
            assert response.result.endswith(":again")
        with BrokerClient(again, "t") as reader:
            assert len(list(reader.get_responses(timeout=30))) == 20
    print(f"durable session released its units {released_after:.1f}s after its client left")
