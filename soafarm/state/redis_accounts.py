"""Redis accounts (ACL users) that fence clients to what they must touch.

The farm's own processes (broker daemons, worker hosts) use the farm's Redis account. A
client whose RabbitMQ user is not one of the farm's gets, for each session it may use, an
account of its own made by the broker daemon when it creates the session or hands it to
the client (`get`, which attach uses):

- `<ns>.s<id>.<user>`: read the session's keys (`<ns>:session:<id>` and under it), write
  its heartbeat hash (`:handles`), and write only the keys of the client ids the broker
  attached for this user (`:client:<client id>` and under it), patterns it adds at each
  attach_client;
- `<ns>.u.<user>`, made by whoever makes the user (`soafarm up --user`, or the commands
  `soafarm admin permissions` prints): write only common data (`<ns>:data:*`) before a
  session exists.

Neither may list keys (`KEYS`, `SCAN`), run administrative or dangerous commands, or touch
another session's keys, so a user who knows the key names can neither read another user's
counters nor change them. Passwords live in the farm-only hash `<ns>:redis-accounts`, so a
broker daemon makes an account again after a Redis restart dropped it (Redis keeps ACL
users in memory only unless an ACL file is configured). A session's accounts go when its
keys do (a purge, or expiry of a closed session's state).
"""

from __future__ import annotations

import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import redis

from soafarm.names import Names, user_word
from soafarm.state.records import as_text

#: What every fenced account may run: reads, writes and scripts on the keys its patterns
#: name, and connection commands; never a command of @dangerous (KEYS, FLUSHALL, ACL,
#: CONFIG, CLIENT KILL...), nor a scan, which would list other sessions' key names.
COMMANDS = (
    "-@all",
    "+@read",
    "+@write",
    "+@scripting",
    "+@connection",
    "+@transaction",
    "-@dangerous",
    "-@pubsub",
    "-scan",
    "-randomkey",
    "-script|flush",
    "-script|kill",
    "-function",
    "+acl|whoami",
)


@dataclass(frozen=True)
class RedisAccount:
    """One Redis ACL user: its name and password."""

    name: str
    password: str


def session_account_name(names: Names, session_id: int, user: str) -> str:
    """The account of `user` in session `session_id`."""
    return f"{names.namespace}.s{session_id}.{user_word(user)}"


def user_account_name(names: Names, user: str) -> str:
    """The account `user` uploads common data with before it has a session."""
    return f"{names.namespace}.u.{user_word(user)}"


def session_patterns(names: Names, session_id: int) -> list[str]:
    """Key patterns of a session account, before its client ids'."""
    key = names.session_key(session_id)
    return [f"%R~{key}", f"%R~{key}:*", f"~{names.session_handles_key(session_id)}"]


def client_patterns(names: Names, session_id: int, client_id: str) -> list[str]:
    """Key patterns of one client id (two: a `*` after the id would match longer ids)."""
    key = names.client_key(session_id, client_id)
    return [f"~{key}", f"~{key}:*"]


def user_patterns(names: Names) -> list[str]:
    """Key patterns of a user's own account: common data, written only."""
    return [f"%W~{names.common_data_key('*')}"]


def acl_rules(password: str, patterns: list[str]) -> list[str]:
    """`ACL SETUSER` rules making an account: on, `password`, `patterns`. Without `reset`:
    applied to an account that exists (another broker daemon made it first, with client
    ids' patterns since), they only add."""
    return ["on", f">{password}", *COMMANDS, *patterns]


class RedisAccounts:
    """Makes, extends and drops one namespace's fenced Redis accounts (the farm's account
    must be allowed ACL commands)."""

    def __init__(self, client: redis.Redis, names: Names) -> None:
        """Use `client` (the farm's account) for the ACL commands and the password hash."""
        self._r = client
        self.names = names
        self.key = names.redis_accounts_key

    def _acl(self, *args: str) -> Any:
        """One ACL command, raw: redis-py's acl_setuser cannot say `%R~` (read-only keys)."""
        return self._r.execute_command("ACL", *args)  # type: ignore[no-untyped-call]

    def session_account(
        self, session_id: int, user: str, patterns: Callable[[], list[str]]
    ) -> RedisAccount:
        """`user`'s account in session `session_id`, made with `patterns()` unless it
        exists (then nothing else is read); the same password each time."""
        name = session_account_name(self.names, session_id, user)
        known = self._r.hget(self.key, name)
        if known is not None:
            return RedisAccount(name, as_text(known))
        password = secrets.token_urlsafe(24)
        self._acl("SETUSER", name, *acl_rules(password, patterns()))
        # HSETNX: two broker daemons racing for the first attach agree on the first password
        if not self._r.hsetnx(self.key, name, password):
            password = as_text(self._r.hget(self.key, name) or b"")
            self._acl("SETUSER", name, f">{password}")
        return RedisAccount(name, password)

    def add_client(self, session_id: int, user: str, client_id: str) -> None:
        """Let `user`'s account in the session write `client_id`'s keys (patterns only add,
        so concurrent attaches of other client ids cannot undo each other)."""
        name = session_account_name(self.names, session_id, user)
        if self._r.hexists(self.key, name):
            self._acl("SETUSER", name, *client_patterns(self.names, session_id, client_id))

    def user_account(self, user: str) -> RedisAccount:
        """`user`'s own account (common data uploads), made or made again."""
        name = user_account_name(self.names, user)
        known = self._r.hget(self.key, name)
        password = as_text(known) if known is not None else secrets.token_urlsafe(24)
        self._acl("SETUSER", name, *acl_rules(password, user_patterns(self.names)))
        self._r.hset(self.key, name, password)
        return RedisAccount(name, password)

    def accounts(self) -> dict[str, str]:
        """Every account this namespace made: name -> password."""
        return {as_text(k): as_text(v) for k, v in self._r.hgetall(self.key).items()}

    def drop(self, names: list[str]) -> None:
        """Delete accounts (their connections are closed by Redis)."""
        if not names:
            return
        self._acl("DELUSER", *names)
        self._r.hdel(self.key, *names)

    def existing(self) -> set[str]:
        """The ACL users Redis has now."""
        return {as_text(u) for u in self._acl("USERS")}

    def remake(self, name: str, password: str, patterns: list[str]) -> None:
        """Make an account Redis lost (a restart) again."""
        self._acl("SETUSER", name, *acl_rules(password, patterns))
