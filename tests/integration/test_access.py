"""Who may do what, with real RabbitMQ users: a private RabbitMQ with users made by the
fixture (alice, bob, carol) beside the farm's own user, who is the admin. Each forbidden
action fails for the second user with `PermissionDenied` naming the user and the session, and
succeeds for the owner or an admin; the caller is the user RabbitMQ logged in, never what the
client says."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import tomllib
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import pika
import pytest
import redis

from soafarm import BrokerClient, DurableSession, Session, SessionAttachInfo, SessionStartInfo
from soafarm.broker.redis_fence import RedisFence
from soafarm.client.control import ControlClient
from soafarm.client.inbox import Authors, QueueInbox
from soafarm.config import SecuritySettings, Settings, load_settings
from soafarm.errors import PermissionDenied
from soafarm.local.embedded import EmbeddedServers, free_port
from soafarm.local.farm import LocalFarm, delete_namespace
from soafarm.names import Names
from soafarm.protocol import (
    CONTENT_TYPE,
    ControlReply,
    ControlRequest,
    Response,
    decode,
    encode,
    encode_request,
    encode_request_batch,
    encode_response,
    encode_response_batch,
)
from soafarm.protocol import Request as Req
from soafarm.state.control import (
    AddDataArgs,
    AdminsArgs,
    AttachClientArgs,
    CloseArgs,
    GetArgs,
    HostActionArgs,
    ListArgs,
    PingArgs,
    PurgeClientArgs,
)
from soafarm.state.namespace import delete_namespace_keys
from soafarm.state.redis_accounts import RedisAccounts
from soafarm.state.sessions import SessionStore
from soafarm.transport.connections import redis_client
from tests.conftest import cli_env
from tests.waiting import wait_until

pytestmark = pytest.mark.integration


@dataclass(frozen=True)
class Users:
    """The farm's settings (its own user: an admin) and each test user's."""

    farm: Settings
    alice: Settings
    bob: Settings
    carol: Settings
    #: A user with every permission on the vhost (a RabbitMQ whose users were made without
    #: soafarm's patterns): only the client's own check stands in its way.
    mallory: Settings


@pytest.fixture(scope="module")
def users(servers: None) -> Iterator[Users]:
    """A private RabbitMQ and Redis (Redis accounts are server-wide: none is made on the
    machine's), a farm on them, and users made on them: three with a client's permissions,
    one with every one in RabbitMQ."""
    base = load_settings(environ={}).replace(
        namespace=f"test-{uuid.uuid4().hex[:10]}",
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",
    )
    embedded = EmbeddedServers(base)
    with embedded as farm_settings:
        assert embedded.rabbitmq_started
        made = Users(
            farm_settings,
            *(
                embedded.add_user(farm_settings, name)
                for name in ("alice", "bob", "carol", "mallory")
            ),
        )
        embedded.rabbitmqctl("set_permissions", "-p", "/", "mallory", ".*", ".*", ".*")
        embedded.rabbitmqctl("clear_topic_permissions", "-p", "/", "mallory")
        try:
            # the broker's settings: group "desk" is carol
            desk = SecuritySettings(groups={"desk": "carol"})
            with LocalFarm(farm_settings.replace(security=desk), workers=1, cores=2):
                yield made
        finally:
            delete_namespace(farm_settings)


def control(settings: Settings) -> ControlClient:
    return ControlClient(settings)


def run_echo(session: Session, client_id: str, n: int = 20) -> list[int]:
    with BrokerClient(session, client_id) as client:
        for i in range(n):
            client.send_request("echo", i)
        client.end_requests()
        return sorted(r.id for r in client.get_responses(timeout=60))


def test_the_caller_is_the_user_rabbitmq_logged_in(users: Users) -> None:
    for settings, user, admin in (
        (users.alice, "alice", False),
        (users.farm, "soafarm", True),
    ):
        c = control(settings)
        try:
            pong = c.request(PingArgs())
        finally:
            c.close()
        assert (pong.user, pong.admin) == (user, admin)


def test_another_users_session_is_refused_and_the_owner_and_an_admin_may(users: Users) -> None:
    with Session.create(SessionStartInfo("echo"), users.alice) as session:
        assert session.record["owner"] == "alice"
        assert run_echo(session, "mine") == list(range(20))
        sid = session.id
        bob = control(users.bob)
        try:
            for args, doing in (
                (GetArgs(sid), "read"),
                (CloseArgs(sid), "close"),
                (PurgeClientArgs(sid, "mine"), "purge a client id of"),
                (AttachClientArgs(sid, "bobs"), "attach to"),
                (AddDataArgs(sid, {}), "add common data to"),
            ):
                with pytest.raises(
                    PermissionDenied,
                    match=f"user 'bob' may not {doing} session {sid}: .*'alice'",
                ):
                    bob.request(args)
            assert sid not in [s.record.id for s in bob.request(ListArgs()).items]
            with pytest.raises(PermissionDenied, match="user 'bob' may not read session"):
                Session.attach(SessionAttachInfo(sid), users.bob)
        finally:
            bob.close()
        # nothing of bob's attempts harmed it: the owner goes on
        assert run_echo(session, "after") == list(range(20))
        admin = control(users.farm)
        try:
            assert admin.request(GetArgs(sid)).record.owner == "alice"
            assert sid in [s.record.id for s in admin.request(ListArgs()).items]
        finally:
            admin.close()


def test_the_cli_says_permission_denied_in_one_line(users: Users) -> None:
    with Session.create(SessionStartInfo("echo"), users.alice) as session:
        done = subprocess.run(
            [sys.executable, "-m", "soafarm", "sessions", "close", str(session.id)],
            env=cli_env(users.bob),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert done.returncode == 1, done.stderr
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and "user 'bob' may not close session" in lines[0], done.stderr
        assert "Traceback" not in done.stderr
        assert session.status()["state"] in ("queued", "running")


def test_a_session_shared_with_named_users_admits_only_them(users: Users) -> None:
    info = SessionStartInfo("echo", share_with=["bob"])
    with Session.create(info, users.alice) as session:
        assert session.record["shared"] and session.record["share_with"] == ["bob"]
        with Session.attach(SessionAttachInfo(session.id), users.bob) as bobs:
            assert run_echo(bobs, "bob") == list(range(20))
            with pytest.raises(PermissionDenied, match="only its owner 'alice' or an admin"):
                bobs.close()
        with pytest.raises(PermissionDenied, match="user 'carol' may not read session"):
            Session.attach(SessionAttachInfo(session.id), users.carol)
        with Session.find("echo", users.bob) as found:
            assert found.id == session.id
        # leaving the `with` of another user's session detaches: it goes on
        assert session.status()["state"] in ("queued", "running")


def test_a_session_shared_with_a_group_admits_its_members(users: Users) -> None:
    info = SessionStartInfo("echo", share_with=["@desk"])
    with Session.create(info, users.alice) as session:
        with Session.attach(SessionAttachInfo(session.id), users.carol) as carols:
            assert run_echo(carols, "carol") == list(range(20))
        with pytest.raises(PermissionDenied, match="user 'bob' may not read session"):
            Session.attach(SessionAttachInfo(session.id), users.bob)


def test_a_session_shared_with_everyone_admits_every_user(users: Users) -> None:
    with (
        Session.create(SessionStartInfo("echo", share_session=True), users.alice) as session,
        Session.attach(SessionAttachInfo(session.id), users.carol) as carols,
    ):
        assert run_echo(carols, "carol") == list(range(20))


def publish_as(settings: Settings, exchange: str, key: str, body: bytes, user: str) -> None:
    """Publish one message as the user `settings` log in as (confirmed: a refusal raises)."""
    connection = pika.BlockingConnection(pika.URLParameters(settings.amqp_url))
    try:
        channel = connection.channel()
        channel.confirm_delivery()
        channel.basic_publish(exchange, key, body, pika.BasicProperties(user_id=user))
    finally:
        if connection.is_open:
            connection.close()


def test_the_data_path_is_fenced_by_rabbitmq(users: Users) -> None:
    """What bob cannot do to alice's session even without the farm's library: RabbitMQ
    refuses it (and the session goes on)."""
    names = Names(users.alice.namespace)
    with (
        Session.create(SessionStartInfo("echo"), users.alice) as session,
        BrokerClient(session, "mine") as client,
    ):
        request = encode_request_batch(
            session.id,
            "bobs",
            names.response_queue(session.id, "bobs", "bob"),
            [encode_request(Req(0, "echo", ("x",)), 1 << 20)],
        )
        refused = pytest.raises(pika.exceptions.ChannelClosedByBroker, match="ACCESS_REFUSED")
        with refused:  # straight into the request queue: the default exchange is the farm's
            publish_as(users.bob, "", names.request_queue(session.id), request, "bob")
        with refused:  # through the request exchange, with alice's routing key
            key = names.request_key(session.id, "alice")
            publish_as(users.bob, names.request_exchange, key, request, "bob")
        with refused:  # into alice's response queue
            publish_as(users.bob, "", client.response_queue, b"forged", "bob")
        connection = pika.BlockingConnection(pika.URLParameters(users.bob.amqp_url))
        try:
            with refused:  # reading alice's results
                connection.channel().basic_get(client.response_queue)
            with refused:  # deleting them
                connection.channel().queue_delete(client.response_queue)
        finally:
            if connection.is_open:
                connection.close()
        # bob's own key is not bound to alice's queue: what he sends there goes nowhere
        publish_as(
            users.bob, names.request_exchange, names.request_key(session.id, "bob"), request, "bob"
        )
        client.send_request("echo", "still mine")
        client.end_requests()
        assert [r.id for r in client.get_responses(timeout=60)] == [0]


@pytest.mark.parametrize("durable", [False, True], ids=["interactive", "durable"])
def test_a_response_forged_where_rabbitmq_lets_it_through_is_dropped_and_counted(
    users: Users, durable: bool
) -> None:
    kind = DurableSession if durable else Session
    session = kind.create(SessionStartInfo("echo"), users.alice)
    try:
        with BrokerClient(session, "forged-at") as client:
            # mallory may publish anywhere (her RabbitMQ user was made without soafarm's
            # patterns), with a plausible id, before the real answer: RabbitMQ stamps her
            forged = encode_response_batch(
                session.id, "forged-at", "mallory", [encode_response(Response(0, "forged"))]
            )
            publish_as(users.mallory, "", client.response_queue, forged, "mallory")
            client.send_request("echo", "real")
            client.end_requests()
            got = [r.result for r in client.get_responses(timeout=60)]
            assert len(got) == 1 and got[0].endswith(":real"), got
            assert client.forged == 1
    finally:
        session.close()


def test_host_actions_and_grants_are_an_admins(users: Users) -> None:
    alice, bob, admin = control(users.alice), control(users.bob), control(users.farm)
    try:
        with pytest.raises(PermissionDenied, match="user 'alice' may not drain a worker host"):
            alice.request(HostActionArgs("any-host", "drain"))
        with pytest.raises(PermissionDenied, match="user 'bob' may not grant the admin role"):
            bob.request(AdminsArgs("grant", "bob"))
        with Session.create(SessionStartInfo("echo"), users.alice) as session:
            granted = admin.request(AdminsArgs("grant", "bob"))
            assert "bob" in granted.granted and granted.broker_user == "soafarm"
            assert bob.request(GetArgs(session.id)).record.owner == "alice"
            admin.request(AdminsArgs("revoke", "bob"))
            with pytest.raises(PermissionDenied, match="may not read"):
                bob.request(GetArgs(session.id))
    finally:
        for c in (alice, bob, admin):
            c.close()


def test_a_user_id_claimed_for_another_user_never_reaches_the_broker(users: Users) -> None:
    """RabbitMQ checks `user_id` against the login: bob cannot speak as alice; and a
    control request without a `user_id` is refused by the broker daemon."""
    names = Names(users.bob.namespace)
    with Session.create(SessionStartInfo("echo"), users.alice) as session:
        close = encode(ControlRequest("close", {"session_id": session.id}))
        connection = pika.BlockingConnection(pika.URLParameters(users.bob.amqp_url))
        try:
            replies: list[bytes] = []
            channel = connection.channel()
            channel.basic_consume(
                "amq.rabbitmq.reply-to", lambda _c, _m, _p, body: replies.append(body), True
            )
            claimed = pika.BasicProperties(
                content_type=CONTENT_TYPE, reply_to="amq.rabbitmq.reply-to", user_id="alice"
            )
            closed: list[BaseException] = []
            channel._impl.add_on_close_callback(lambda _ch, reason: closed.append(reason))
            channel.basic_publish(names.control_exchange, names.control_queue, close, claimed)
            deadline = time.monotonic() + 30
            while not closed and time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.1)
            assert closed and "user_id" in str(closed[0]), closed
            channel = connection.channel()
            channel.basic_consume(
                "amq.rabbitmq.reply-to", lambda _c, _m, _p, body: replies.append(body), True
            )
            anonymous = pika.BasicProperties(
                content_type=CONTENT_TYPE, reply_to="amq.rabbitmq.reply-to"
            )
            channel.basic_publish(names.control_exchange, names.control_queue, close, anonymous)
            deadline = time.monotonic() + 30
            while not replies and time.monotonic() < deadline:
                connection.process_data_events(time_limit=0.1)
        finally:
            if connection.is_open:
                connection.close()
        assert replies, "the broker daemon did not answer"
        reply = decode(replies[0], 1 << 20)
        assert isinstance(reply, ControlReply) and not reply.ok
        assert reply.error_type == "PermissionDenied" and "without a user_id" in reply.error
        assert session.status()["state"] in ("queued", "running")


def refused(call: Callable[[], object]) -> bool:
    try:
        call()
    except redis.exceptions.NoPermissionError:
        return True
    return False


def denials(farm: redis.Redis, accounts: set[str]) -> list[dict[str, Any]]:
    """Redis's ACL log entries of `accounts` (what they were refused)."""
    entries = farm.acl_log(count=1000)
    return [e for e in entries if str(e.get("username")) in accounts]


def test_redis_fences_each_user_to_its_own_sessions_keys(users: Users) -> None:
    names = Names(users.farm.namespace)
    with (
        Session.create(SessionStartInfo("echo"), users.alice) as mine,
        Session.create(SessionStartInfo("echo"), users.bob) as his,
    ):
        assert run_echo(mine, "mine") == list(range(20))
        assert run_echo(his, "his") == list(range(20))
        alice = mine.redis.client  # the account the broker handed alice for her session
        assert alice.acl_whoami() == f"{names.namespace}.s{mine.id}.alice"
        assert alice.hget(names.client_key(mine.id, "mine"), "accepted") == b"20"
        assert alice.get(names.session_key(mine.id))  # her session's record: readable
        for call in (
            lambda: alice.hget(names.client_key(his.id, "his"), "accepted"),
            lambda: alice.hset(names.client_key(his.id, "his"), "done", 0),
            lambda: alice.get(names.session_key(his.id)),
            lambda: alice.set(names.session_key(mine.id), "{}"),  # her record is read-only
            lambda: alice.hgetall(names.redis_accounts_key),
            lambda: alice.smembers(names.admins_key),
            lambda: alice.sadd(names.admins_key, "alice"),
            lambda: alice.keys("*"),
            lambda: alice.scan(0),
            alice.flushall,
            alice.acl_users,
        ):
            assert refused(call)
        # her own account (her settings'): common data, written only
        own = redis_client(users.alice)
        try:
            assert own.acl_whoami() == f"{names.namespace}.u.alice"
            assert refused(lambda: own.hget(names.client_key(mine.id, "mine"), "accepted"))
            assert refused(lambda: own.get(names.session_key(mine.id)))
        finally:
            own.close()


def test_a_fenced_users_whole_workflow_meets_no_refusal(users: Users) -> None:
    """Interactive and durable, common data, reattaching, status, a shared session: every
    Redis command the client library runs for a fenced user is one its accounts allow."""
    farm = redis_client(users.farm)
    made: set[str] = set()
    try:
        info = SessionStartInfo("echo", common_data={"table": [1, 2, 3]})
        with DurableSession.create(info, users.alice) as durable:
            sid = durable.id
            with BrokerClient(durable, "batch") as client:
                for i in range(30):
                    client.send_request("echo", i, user_data=i)
                client.flush()
        with (
            DurableSession.attach(SessionAttachInfo(sid), users.alice) as again,
            BrokerClient(again, "batch") as client,
        ):
            assert client.sent == 30
            client.end_requests()
            assert sorted(r.id for r in client.get_responses(timeout=60)) == list(range(30))
            # counted just after the responses are published (see workers/calls.py)
            wait_until("the done count", lambda: client.status().done == 30, timeout=10)
            again.set_common_data("more", {"x": 1})
            made.add(again.redis.client.acl_whoami())
            again.close()
        shared = SessionStartInfo("echo", share_with=["bob"])
        with Session.create(shared, users.alice) as session:
            assert run_echo(session, "alices") == list(range(20))
            with Session.attach(SessionAttachInfo(session.id), users.bob) as joined:
                assert run_echo(joined, "bobs") == list(range(20))
                made.add(joined.redis.client.acl_whoami())
            made.add(session.redis.client.acl_whoami())
        assert len(made) == 3
        assert denials(farm, made) == []
    finally:
        farm.close()


def test_the_broker_makes_again_accounts_redis_lost_and_drops_those_of_gone_sessions(
    users: Users,
) -> None:
    farm = redis_client(users.farm)
    names = Names(users.farm.namespace)
    fence = RedisFence(
        farm, names, SessionStore(farm, names), {"soafarm"}, enabled=True, drop_after=0.0
    )
    try:
        with Session.create(SessionStartInfo("echo"), users.alice) as session:
            account = session.redis.client.acl_whoami()
            farm.acl_deluser(account)  # as a Redis restart without an ACL file does
            fence.sweep()
            assert run_echo(session, "after") == list(range(20))  # same password, same keys
        # closed (an interactive session is purged): its account goes at the next sweeps
        fence.sweep()
        fence.sweep()
        assert account not in farm.acl_users()
        assert account not in RedisAccounts(farm, names).accounts()
    finally:
        farm.close()


def farm_state_is_not_hers(
    soafarm: Callable[..., subprocess.CompletedProcess[str]], tmp_path: Path
) -> None:
    """A fenced user's CLI: the farm's own state is not hers to read (one line, exit 1),
    nor its deployed packages, but she still lists the services of her folders."""
    report = soafarm("report")
    assert report.returncode == 1 and "Redis refused" in report.stderr, report.stderr
    assert len(report.stderr.strip().splitlines()) == 1, report.stderr
    listed = soafarm("services", "list")
    assert listed.returncode == 0, listed.stderr
    assert "deployed packages not listed" in listed.stderr
    assert any(line.startswith("echo") for line in listed.stdout.splitlines())
    package = tmp_path / "hello"
    package.mkdir()
    (package / "hello.toml").write_text('entry_point = "echo:EchoService"\n')
    deploy = soafarm("services", "deploy", str(package))
    assert deploy.returncode == 1 and "Redis refused" in deploy.stderr, deploy.stderr


def test_up_makes_users_on_its_private_rabbitmq(servers: None, tmp_path: Path) -> None:
    settings = load_settings(environ={}).replace(
        namespace=f"test-{uuid.uuid4().hex[:10]}",
        amqp_url=f"amqp://guest:guest@127.0.0.1:{free_port()}/",
    )
    env = cli_env(settings)
    # the settings files `up` writes name the servers: nothing in the environment may win
    config_env = {
        k: v
        for k, v in env.items()
        if k not in ("SOAFARM_AMQP_URL", "SOAFARM_REDIS_URL", "SOAFARM_NAMESPACE")
    }

    def soafarm(config: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "soafarm", "--config", config, *args],
            env=config_env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    with subprocess.Popen(
        [sys.executable, "-m", "soafarm", "up", "--cores", "1", "--user", "alice"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        assert proc.stderr is not None
        configs: dict[str, str] = {}
        try:
            seen = ""
            for line in proc.stderr:  # blocks on the next line: no sleeping, no polling
                seen += line
                for who, marker in (("farm", "other soafarm commands"), ("alice", "user 'alice'")):
                    if marker in line and "--config " in line:
                        configs[who] = line.split("--config ", 1)[1].split()[0]
                if "soafarm is up" in line:
                    break
            assert set(configs) == {"farm", "alice"}, seen
            # alice's Redis account is her own (common data only), not the farm's
            alice_redis = tomllib.loads(Path(configs["alice"]).read_text())["redis_url"]
            assert f"//{settings.namespace}.u.alice:" in alice_redis
            whoami = soafarm(configs["alice"], "admin", "whoami")
            assert whoami.returncode == 0, whoami.stderr
            assert whoami.stdout.startswith("alice (user)"), whoami.stdout
            farm = soafarm(configs["farm"], "admin", "whoami")
            assert farm.stdout.startswith("soafarm (admin)"), farm.stdout + farm.stderr
            called = soafarm(configs["alice"], "call", "echo", "echo", "as-alice")
            assert called.returncode == 0, called.stderr
            assert called.stdout.strip().endswith(":as-alice")
            denied = soafarm(configs["alice"], "admin", "grant", "alice")
            assert denied.returncode == 1 and "may not grant" in denied.stderr, denied.stderr
            # a durable batch and its responses, through her session's Redis account
            sweep = ("--sweep", "echo", "0:4")
            submitted = soafarm(configs["alice"], "submit", "echo", "--durable", *sweep)
            assert submitted.returncode == 0, submitted.stderr
            sid = submitted.stdout.strip()
            read = soafarm(configs["alice"], "responses", sid, "--follow")
            assert read.returncode == 0, read.stderr
            assert len(read.stdout.strip().splitlines()) == 5, read.stdout
            farm_state_is_not_hers(partial(soafarm, configs["alice"]), tmp_path)
        finally:
            proc.send_signal(signal.SIGINT)
            rest = proc.stderr.read()
            # its RabbitMQ went with it: what is left of the namespace is in the shared Redis
            client = redis_client(settings)
            try:
                delete_namespace_keys(client, Names(settings.namespace))
            finally:
                client.close()
            assert proc.wait(timeout=60) == 0, rest


def test_a_reader_takes_the_farms_batches_and_those_given_back_under_its_own_user(
    users: Users,
) -> None:
    """What a reader's inbox takes, by author, through the real RabbitMQ: the farm's
    batches, the batches a taken-over reader of its own gives back (through the request
    exchange, with its give-back key), never another user's."""
    names = Names(users.alice.namespace)
    queue = names.response_queue(999_999, "inbox-test", "alice")
    back = names.return_key(999_999, "inbox-test", "alice")
    farm = pika.BlockingConnection(pika.URLParameters(users.farm.amqp_url))
    try:
        channel = farm.channel()
        channel.queue_declare(queue, auto_delete=True)
        channel.queue_bind(queue, names.request_exchange, back)
        authors = Authors(("soafarm",), "alice")
        inbox = QueueInbox(
            users.alice, queue, authors=authors, give_back_to=(names.request_exchange, back)
        )
        got: list[bytes] = []
        inbox.start(lambda delivery: got.append(delivery.body))
        try:
            channel.basic_publish("", queue, b"farm", pika.BasicProperties(user_id="soafarm"))
            inbox.give_back([b"given back"])  # as a taken-over reader does
            publish_as(users.mallory, "", queue, b"mallory", "mallory")
            deadline = time.monotonic() + 30
            while (len(got) < 2 or authors.forged < 1) and time.monotonic() < deadline:
                inbox.drain(0.1)
        finally:
            inbox.close()
    finally:
        farm.close()
    assert sorted(got) == [b"farm", b"given back"] and authors.forged == 1
