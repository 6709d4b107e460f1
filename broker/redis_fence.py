"""Who gets a fenced Redis account, and keeping those accounts in step with the sessions
(`soafarm.state.redis_accounts` says what an account may touch).

A caller that is not one of the farm's users (the broker daemon's own, and
`security.farm_users`) gets an account for each session it creates or is handed, when
`security.fence_redis` is on and the farm's Redis account may manage ACL users; otherwise
clients keep using the Redis account of their own settings, as before.
"""

from __future__ import annotations

import time
from typing import Self

import redis
import structlog

from soafarm.broker.access import Caller
from soafarm.config import Settings
from soafarm.names import Names, word_user
from soafarm.state.clients import read_client_users
from soafarm.state.redis_accounts import (
    RedisAccount,
    RedisAccounts,
    client_patterns,
    session_patterns,
    user_patterns,
)
from soafarm.state.sessions import SessionStore
from soafarm.transport.identity import own_user

log = structlog.get_logger("soafarm.broker")

#: Seconds a session's accounts outlive its keys (a purge, or expiry of a closed session):
#: a client still reading it meets "closed", not a refused login.
DROP_AFTER = 30.0


class RedisFence:
    """The fenced accounts of one namespace, as the broker daemon hands them out."""

    def __init__(
        self,
        client: redis.Redis,
        names: Names,
        sessions: SessionStore,
        farm_users: set[str],
        *,
        enabled: bool,
        drop_after: float = DROP_AFTER,
    ) -> None:
        """`farm_users` keep the farm's account; `enabled`: the setting, checked against
        what the farm's Redis account may do; `drop_after`: seconds a session's accounts
        outlive its keys."""
        self.names = names
        self.sessions = sessions
        self.farm_users = farm_users
        self.accounts = RedisAccounts(client, names)
        self._client = client
        self.enabled = enabled and _may_manage_acl(client)
        self.drop_after = drop_after
        self._gone_since: dict[str, float] = {}

    @classmethod
    def for_farm(cls, settings: Settings, client: redis.Redis, sessions: SessionStore) -> Self:
        """The fence `settings` ask for: the broker daemon's own user and
        `security.farm_users` keep the farm's account."""
        return cls(
            client,
            Names(settings.namespace),
            sessions,
            {own_user(settings), *settings.security.farm_user_list()},
            enabled=settings.security.fence_redis,
        )

    def fenced(self, caller: Caller) -> bool:
        """Whether `caller` gets accounts of its own (not the broker's own calls)."""
        return self.enabled and bool(caller.user) and caller.user not in self.farm_users

    def session_account(self, caller: Caller, session_id: int) -> RedisAccount | None:
        """`caller`'s account in the session (made now if new), or None: use your own."""
        if not self.fenced(caller):
            return None
        return self.accounts.session_account(
            session_id, caller.user, lambda: self._patterns(session_id, caller.user)
        )

    def add_client(self, caller: Caller, session_id: int, client_id: str) -> None:
        """Let `caller`'s account in the session write `client_id`'s keys."""
        if self.fenced(caller):
            self.accounts.add_client(session_id, caller.user, client_id)

    def sweep(self) -> None:
        """Drop the accounts of sessions whose keys are gone (after DROP_AFTER); make again
        those Redis lost (a restart without an ACL file)."""
        if not self.enabled:
            return
        made = self.accounts.accounts()
        if not made:
            return
        existing = self.accounts.existing()
        now = time.monotonic()
        drop: list[str] = []
        for name, password in made.items():
            parsed = self._parse(name)
            if parsed is None:  # a user's own account
                if name not in existing:
                    self.accounts.remake(name, password, user_patterns(self.names))
                    log.info("redis_account_remade", account=name)
                continue
            sid, user = parsed
            if not self.sessions.exists(sid):
                since = self._gone_since.setdefault(name, now)
                if now - since >= self.drop_after:
                    drop.append(name)
                continue
            self._gone_since.pop(name, None)
            if name not in existing:
                self.accounts.remake(name, password, self._patterns(sid, user))
                log.info("redis_account_remade", account=name)
        if drop:
            self.accounts.drop(drop)
            for name in drop:
                self._gone_since.pop(name, None)
            log.info("redis_accounts_dropped", accounts=drop)

    def _patterns(self, sid: int, user: str) -> list[str]:
        """The session's patterns and those of the client ids Redis keeps as `user`'s."""
        client_ids = self.sessions.clients(sid)
        users = read_client_users(self._client, self.names, sid, client_ids)
        patterns = session_patterns(self.names, sid)
        for client_id, owner in users.items():
            if owner == user:
                patterns += client_patterns(self.names, sid, client_id)
        return patterns

    def _parse(self, name: str) -> tuple[int, str] | None:
        """(session id, user) of a session account's name; None for a user's own."""
        prefix = f"{self.names.namespace}.s"
        sid, _, word = name.removeprefix(prefix).partition(".")
        if not name.startswith(prefix) or not sid.isdigit() or not word:
            return None
        return int(sid), word_user(word)


def _may_manage_acl(client: redis.Redis) -> bool:
    """Whether the farm's Redis account may run ACL commands (and the server has them)."""
    try:
        client.acl_users()
    except redis.ResponseError as e:  # NOPERM, or a Redis before 6
        log.warning(
            "redis_not_fenced",
            error=str(e),
            hint="clients use their own settings' Redis account: give the broker's "
            "account ACL rights (+@admin) to fence each user to its sessions' keys",
        )
        return False
    return True
