"""The access rules (`broker.access`) and the client's response filter (`client.inbox.Authors`)
on plain records; tests/integration/test_access.py runs them with real RabbitMQ users."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from fnmatch import fnmatchcase
from types import SimpleNamespace
from typing import Any

import pytest

from soafarm.broker.access import Access, Caller, admits, check_admin, check_owner, check_use
from soafarm.client.inbox import Authors
from soafarm.config import SecuritySettings, Settings
from soafarm.errors import ConfigError, PermissionDenied
from soafarm.names import Names, user_word, word_user
from soafarm.state.records import SessionRecord, SessionState
from soafarm.state.redis_accounts import client_patterns, session_account_name, session_patterns
from soafarm.transport.permissions import client_permissions


def record(
    owner: str = "alice", shared: bool = False, share_with: tuple[str, ...] = ()
) -> SessionRecord:
    return SessionRecord(
        id=7,
        service="echo",
        version=None,
        state=SessionState.RUNNING,
        min_units=1,
        max_units=4,
        priority=2000,
        resource_unit="core",
        created=1000.0,
        owner=owner,
        shared=shared,
        share_with=share_with,
    )


def user(name: str, admin: bool = False) -> Caller:
    return Caller(name, admin)


def test_only_the_owner_and_admins_use_a_private_session() -> None:
    r = record()
    assert admits(user("alice"), r) and admits(user("root", admin=True), r)
    assert not admits(user("bob"), r)
    with pytest.raises(
        PermissionDenied, match=r"user 'bob' may not read session 7: it is 'alice''s"
    ):
        check_use(user("bob"), r, "read")


def test_sharing_admits_everyone_or_the_named_users() -> None:
    assert admits(user("bob"), record(shared=True))
    named = record(shared=True, share_with=("bob",))
    assert admits(user("bob"), named) and not admits(user("carol"), named)


def test_closing_is_the_owners_or_an_admins_even_when_shared() -> None:
    r = record(shared=True)
    check_owner(user("alice"), r, "close")
    check_owner(user("root", admin=True), r, "close")
    with pytest.raises(PermissionDenied, match="only its owner 'alice' or an admin may"):
        check_owner(user("bob"), r, "close")
    with pytest.raises(PermissionDenied, match="may not drain a worker host: it takes the admin"):
        check_admin(user("bob"), "drain a worker host")


class Granted:
    """An AdminStore's `has` over a set."""

    def __init__(self, *users: str) -> None:
        self.users = set(users)

    def has(self, name: str) -> bool:
        return name in self.users


def test_admins_are_the_brokers_user_the_configured_and_the_granted() -> None:
    settings = Settings(
        amqp_url="amqp://farm:pw@127.0.0.1:5672/", security=SecuritySettings(admins="ops, root")
    )
    access = Access(settings, Granted("dana"))  # type: ignore[arg-type]
    assert [access.caller(u).admin for u in ("farm", "ops", "root", "dana", "bob")] == [
        True,
        True,
        True,
        True,
        False,
    ]
    assert access.responders == ("farm",)
    with pytest.raises(PermissionDenied, match="without a user_id"):
        access.caller(None)


def test_farm_users_name_the_responders() -> None:
    settings = Settings(security=SecuritySettings(farm_users="hosts,hosts-b"))
    assert Access(settings, Granted()).responders == ("hosts", "hosts-b")  # type: ignore[arg-type]


def message(user_id: str | None) -> SimpleNamespace:
    return SimpleNamespace(properties={} if user_id is None else {"user_id": user_id})


def test_a_client_takes_batches_from_the_farm_and_itself_only() -> None:
    authors = Authors(("farm",), "alice")
    taken = [authors.accept(message(u)) for u in ("farm", "alice", "bob", None)]  # type: ignore[arg-type]
    assert taken == [True, True, False, False]
    assert authors.forged == 2


def test_without_responders_every_batch_is_taken() -> None:
    authors = Authors((), "alice")
    assert authors.accept(message("bob")) and authors.forged == 0  # type: ignore[arg-type]


def test_a_user_is_one_word_of_a_queue_name_or_routing_key() -> None:
    assert [user_word(u) for u in ("alice", "a.b", "al@x.com")] == [
        "alice",
        "a%2Eb",
        "al%40x%2Ecom",
    ]
    assert all(word_user(user_word(u)) == u for u in ("alice", "a.b", "al@x.com", "ü %"))


def test_a_clients_permissions_name_its_own_resources_only() -> None:
    names = Names("ns")
    p = client_permissions("ns", "a.b")
    assert p.configure == "^$"
    assert re.search(p.write, names.request_exchange) and re.search(p.write, names.control_exchange)
    assert not re.search(p.write, "amq.default") and not re.search(p.write, "ns.control.x")
    assert re.search(p.read, names.response_queue(7, "default", "a.b"))
    for other in ("a", "b", "a.bc", "xa.b"):
        assert not re.search(p.read, names.response_queue(7, "default", other)), other
    assert re.search(p.topic_write, names.request_key(7, "a.b"))
    assert re.search(p.topic_write, names.return_key(7, "c.d", "a.b"))
    assert not re.search(p.topic_write, names.request_key(7, "a"))
    assert not re.search(p.topic_write, names.request_key(7, "a.bc"))


def test_admin_permissions_prints_the_rabbitmqctl_and_redis_cli_commands() -> None:
    # a process of its own: the CLI configures logging for the whole process
    done = subprocess.run(
        [sys.executable, "-m", "soafarm", "admin", "permissions", "alice", "--namespace", "ns"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={k: v for k, v in os.environ.items() if not k.startswith("SOAFARM_")},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == [
        r"rabbitmqctl set_permissions -p / alice '^$' '^(ns\.control|ns\.requests)$' "
        r"'^ns\.session\.[0-9]+\.responses\.alice\.'",
        r"rabbitmqctl set_topic_permissions -p / alice ns.requests '^alice\.' '^$'",
        "redis-cli ACL SETUSER ns.u.alice on '>PASSWORD' -@all +@read +@write +@scripting "
        "+@connection +@transaction -@dangerous -@pubsub -scan -randomkey '-script|flush' "
        "'-script|kill' -function '+acl|whoami' '%W~ns:data:*'",
    ]


def test_a_group_admits_its_members_to_a_session_shared_with_it() -> None:
    security = SecuritySettings(groups={"desk": "carol, dan", "ops": ["erin"]})
    assert security.groups_of("carol") == {"desk"} and security.groups_of("bob") == frozenset()
    r = record(shared=True, share_with=("@desk", "bob"))
    carol = Caller("carol", False, security.groups_of("carol"))
    erin = Caller("erin", False, security.groups_of("erin"))
    assert admits(carol, r) and admits(user("bob"), r) and not admits(erin, r)


def test_groups_load_from_a_file_or_the_environment_and_bad_members_are_refused(
    tmp_path: Any,
) -> None:
    from soafarm.config import load_settings, settings_env

    config = tmp_path / "farm.toml"
    config.write_text('[security.groups]\ndesk = "carol,dan"\nops = ["erin"]\n')
    settings = load_settings(environ={"SOAFARM_CONFIG": str(config)})
    assert settings.security.groups_of("erin") == {"ops"}
    again = load_settings(environ=settings_env(settings))  # as a child process gets them
    assert again.security.groups == settings.security.groups
    hash(again)  # settings key the control pool
    config.write_text("[security.groups]\ndesk = 3\n")
    with pytest.raises(ConfigError, match=r"security\.groups\.desk: expected"):
        load_settings(environ={"SOAFARM_CONFIG": str(config)})


def test_a_fenced_accounts_patterns_name_its_session_and_client_ids_only() -> None:
    names = Names("ns")
    patterns = session_patterns(names, 7) + client_patterns(names, 7, "a")
    allowed = [p.split("~", 1)[1] for p in patterns]

    def matches(key: str) -> list[str]:
        return [p for p, glob in zip(patterns, allowed, strict=True) if fnmatchcase(key, glob)]

    assert matches("ns:session:7") == ["%R~ns:session:7"]  # its record: read only
    assert matches("ns:session:7:handles") == ["%R~ns:session:7:*", "~ns:session:7:handles"]
    assert "~ns:session:7:client:a:*" in matches("ns:session:7:client:a:done")
    assert "~ns:session:7:client:a" in matches("ns:session:7:client:a")
    # another client id of the session (a prefix of it, too), another session: read at most
    for key in ("ns:session:7:client:ab", "ns:session:7:client:b:done"):
        assert matches(key) == ["%R~ns:session:7:*"]
    for key in ("ns:session:70", "ns:session:70:client:a", "ns:session:1", "ns:admins"):
        assert matches(key) == []
    assert session_account_name(names, 7, "a.b") == "ns.s7.a%2Eb"
