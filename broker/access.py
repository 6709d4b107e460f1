"""Who may do what: a control request's caller against a session's owner, its sharing and
the admin role.

The caller is the RabbitMQ user its connection logged in as, read from the request's
`user_id` property (RabbitMQ refuses a `user_id` that is not the connection's user), never
from anything the client writes in the request. The rules:

- anyone may create a session (they own it), list hosts and templates, and ping;
- a session's owner, the users it is shared with and admins may read it, attach client
  ids, send into it, read its responses and purge a client id; only its owner and admins may
  close it, purge it or add common data;
- a shared session admits the users it names (`share_with`; `@name` names a group of
  `security.groups`), or every user when it names none; `sessions list` shows a user
  their own sessions and those shared with them;
- host actions and `soafarm admin` grants and revokes are an admin's; admins are the broker
  daemon's own user, the users of `security.admins` and those granted at run time.

A farm whose processes all log in as one user (the default) is one user's farm: everyone
is that user, and an admin.
"""

from __future__ import annotations

from dataclasses import dataclass

from soafarm.config import Settings
from soafarm.errors import PermissionDenied
from soafarm.state.admins import AdminStore
from soafarm.state.records import SessionRecord
from soafarm.transport.identity import own_user

HOW_TO_SHARE = (
    "its owner can share it (SessionStartInfo(share_session=True, share_with=[...])), "
    "or an admin can act on it"
)


@dataclass(frozen=True)
class Caller:
    """Who sent a control request: a RabbitMQ user, and whether it has the admin role."""

    user: str
    admin: bool
    #: The groups of `security.groups` the user is in.
    groups: frozenset[str] = frozenset()


#: The broker daemon's own calls (expiry, sweeps): every power.
SYSTEM = Caller("", admin=True)


class Access:
    """Decides each control request against the caller (see the module docstring)."""

    def __init__(self, settings: Settings, admins: AdminStore) -> None:
        """The broker daemon's own user and `security.admins` are admins always; `admins`
        holds those granted at run time."""
        self.broker_user = own_user(settings)
        self.configured = tuple(settings.security.admin_list())
        self.admins = admins
        self.security = settings.security
        #: Whom clients accept responses from: the users worker hosts connect as.
        self.responders = settings.security.farm_user_list() or (self.broker_user,)

    def caller(self, user_id: str | None) -> Caller:
        """The caller of a request whose AMQP `user_id` property is `user_id`."""
        if not user_id:
            raise PermissionDenied(
                "control request without a user_id property: the broker daemon takes the "
                "caller from it (soafarm's clients set it; upgrade the client)"
            )
        return Caller(user_id, self.is_admin(user_id), self.security.groups_of(user_id))

    def is_admin(self, user: str) -> bool:
        """Whether `user` has the admin role now."""
        return user == self.broker_user or user in self.configured or self.admins.has(user)


def admits(caller: Caller, record: SessionRecord) -> bool:
    """Whether `caller` may use the session (read, attach, send, read responses)."""
    if caller.admin or record.owner == caller.user:
        return True
    if not record.shared:
        return False
    named = record.share_with
    return not named or caller.user in named or any(f"@{g}" in named for g in caller.groups)


def check_use(caller: Caller, record: SessionRecord, doing: str) -> None:
    """PermissionDenied unless `caller` may use the session (`doing`: "attach to", ...)."""
    if not admits(caller, record):
        raise PermissionDenied(
            f"user {caller.user!r} may not {doing} session {record.id}: it is "
            f"{record.owner!r}'s and not shared with them; {HOW_TO_SHARE}"
        )


def check_owner(caller: Caller, record: SessionRecord, doing: str) -> None:
    """PermissionDenied unless `caller` owns the session or is an admin."""
    if not (caller.admin or record.owner == caller.user):
        raise PermissionDenied(
            f"user {caller.user!r} may not {doing} session {record.id}: only its owner "
            f"{record.owner!r} or an admin may"
        )


def check_admin(caller: Caller, doing: str) -> None:
    """PermissionDenied unless `caller` has the admin role."""
    if not caller.admin:
        raise PermissionDenied(
            f"user {caller.user!r} may not {doing}: it takes the admin role (an admin "
            "grants it with `soafarm admin grant USER`, or the broker's security.admins)"
        )
