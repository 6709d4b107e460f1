"""The control RPCs' contracts: one frozen record per operation's arguments and per reply.

The wire is unchanged (a `ControlRequest` envelope with an op name and a msgpack map of
arguments, a `ControlReply` with plain data); `decode_request` is the one edge where the
broker daemon turns that map into a typed record, and `ControlCall.decode_reply` the edge
where the client turns a reply into one. Anything else is a `ControlRequestError` (or a
`DecodeError` for replies) that names the operation and the field. These live with the
state records because replies carry them (a session description is its `SessionRecord`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Self, TypeVar

from soafarm.config import JobTemplate
from soafarm.errors import ControlRequestError, DecodeError
from soafarm.plain import FLAT, from_plain, to_plain
from soafarm.protocol import ControlRequest
from soafarm.state.hosts import DRAINING, OFFLINE
from soafarm.state.records import (
    HostRecord,
    InstanceRecord,
    SessionRecord,
    SessionState,
    SessionStatus,
)


class Reply:
    """Base of every reply record: plain data out (`to_wire`), checked data in."""

    def to_wire(self) -> Any:
        """The reply as the plain data the control RPC carries."""
        return to_plain(self)

    @classmethod
    def from_wire(cls, data: Any, where: str) -> Self:
        """Check a reply from the wire (unknown keys are ignored: a newer broker's)."""
        return from_plain(cls, data, where)


class _ListReply(Reply):
    """A reply that is a list on the wire; the record holds it as `items`."""

    items: tuple[Any, ...]

    def to_wire(self) -> Any:
        """The items as a plain list."""
        return to_plain(self.items)

    @classmethod
    def from_wire(cls, data: Any, where: str) -> Self:
        """Check a list of items from the wire."""
        return from_plain(cls, {"items": data}, where)


@dataclass(frozen=True)
class ClientStatus:
    """A client id's counters in a session description."""

    client_id: str
    accepted: int
    done: int
    faulted: int
    outstanding: int
    sealed: bool
    total: int | None
    finished: bool


@dataclass(frozen=True)
class SessionInfo(Reply):
    """A session described (reply to create and get): its record beside live facts."""

    record: SessionRecord = field(metadata={FLAT: True})
    request_queue: str = ""
    instances: tuple[InstanceRecord, ...] = ()
    clients: tuple[ClientStatus, ...] = ()
    #: Host id -> why the service did not load there.
    load_errors: dict[str, str] = field(default_factory=dict)
    #: Instances running now, against what the allocator gives the session.
    allocated_units: int = 0
    target_units: int = 0
    #: The allocator's last decision for it and why (None until its first round).
    status: SessionStatus | None = None
    #: Requests of every client id without a response yet.
    outstanding: int = 0
    #: The caller's own Redis account for this session (broker.redis_fence), when the
    #: farm fences users to their sessions' keys: the client's state connection uses it.
    redis_user: str = ""
    redis_password: str = field(default="", repr=False)


@dataclass(frozen=True)
class SessionList(_ListReply):
    """Reply to list: open sessions described."""

    items: tuple[SessionInfo, ...] = ()


@dataclass(frozen=True)
class HostInfo:
    """A live worker host as `soafarm hosts` shows it."""

    record: HostRecord = field(metadata={FLAT: True})
    #: Session id (as text) -> instances assigned, and running.
    assignments: dict[str, int] = field(default_factory=dict)
    instances: dict[str, int] = field(default_factory=dict)
    uptime: float = 0.0
    heartbeat_age: float = 0.0
    #: The state an operator set (`soafarm hosts offline|drain`): "offline", "draining", or
    #: "" for none (apart from `draining`, which the host sets on itself when it stops).
    admin: str = ""


@dataclass(frozen=True)
class HostList(_ListReply):
    """Reply to hosts: every live worker host."""

    items: tuple[HostInfo, ...] = ()


@dataclass(frozen=True)
class HostActionDone(Reply):
    """Reply to host_action: the host's operator state now and before ("" for none)."""

    host_id: str
    state: str
    previous: str = ""


@dataclass(frozen=True)
class Closed(Reply):
    """Reply to close."""

    session_id: int
    state: SessionState
    purged: bool


@dataclass(frozen=True)
class Attached(Reply):
    """Reply to attach_client: where the client id sends and reads."""

    response_queue: str
    request_queue: str
    durable: bool
    state: SessionState
    #: The RabbitMQ users the farm's responses come from (`security.farm_users`): a
    #: response published by anyone else is dropped and counted (empty: any).
    responders: tuple[str, ...] = ()
    #: Where the client publishes its request batches: the exchange and its own routing
    #: key (bound to the request queue for the caller's user).
    request_exchange: str = ""
    request_key: str = ""
    #: The routing key a reader taken over gives batches back to its response queue with.
    return_key: str = ""


@dataclass(frozen=True)
class ClientPurged(Reply):
    """Reply to purge_client."""

    session_id: int
    client_id: str
    purged: bool


@dataclass(frozen=True)
class DataAdded(Reply):
    """Reply to add_data: the names of every common data item the session now has."""

    session_id: int
    data: tuple[str, ...]


@dataclass(frozen=True)
class Pong(Reply):
    """Reply to ping: the namespace the answering broker daemon serves, and who the caller
    is to it."""

    namespace: str
    #: The caller's RabbitMQ user, and whether it has the admin role.
    user: str = ""
    admin: bool = False


@dataclass(frozen=True)
class Admins(Reply):
    """Reply to admins: who has the admin role, and why."""

    #: The broker daemon's own user (always an admin).
    broker_user: str
    #: From the broker's settings (`security.admins`).
    configured: tuple[str, ...]
    #: Granted at run time (`soafarm admin grant`).
    granted: tuple[str, ...]


R = TypeVar("R", bound=Reply)


class ControlCall(Generic[R]):
    """Base of every operation's arguments record: its op name and reply type."""

    op: ClassVar[str]
    reply_type: type[R]

    def params(self) -> dict[str, Any]:
        """The arguments as the plain map a `ControlRequest` carries."""
        params: dict[str, Any] = to_plain(self)
        return params

    def envelope(self) -> ControlRequest:
        """The request to send."""
        return ControlRequest(self.op, self.params())

    def decode_reply(self, result: Any) -> R:
        """Check the broker's result for this operation (DecodeError when malformed)."""
        return self.reply_type.from_wire(result, f"control reply to {self.op!r}")


@dataclass(frozen=True)
class CreateArgs(ControlCall[SessionInfo]):
    """Create a session of a registered service."""

    op: ClassVar[str] = "create"
    reply_type = SessionInfo

    service: str
    #: None (in the fields below too): the job template's default.
    version: str | None = None
    min_units: int | None = None
    max_units: int | None = None
    resource_unit: str | None = None
    priority: int | None = None
    #: Per-session overrides (SessionStartInfo.broker_settings), layered by the broker.
    broker_settings: dict[str, Any] = field(default_factory=dict)
    #: The creating process's token (its owner is the RabbitMQ user it connects as).
    creator: str = ""
    durable: bool = False
    shared: bool = False
    #: With `shared`: the only users admitted besides the owner (empty: every user).
    share_with: tuple[str, ...] = ()
    #: Common data: name -> Redis key made by `soafarm.state.commondata.upload`.
    data: dict[str, str] = field(default_factory=dict)
    #: The job template to apply ("": `Default`).
    job_template: str = ""
    node_groups: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        """A session needs a service to resolve."""
        if not self.service:
            raise ValueError("service must be a non-empty string")


@dataclass(frozen=True)
class GetArgs(ControlCall[SessionInfo]):
    """Describe one session."""

    op: ClassVar[str] = "get"
    reply_type = SessionInfo

    session_id: int
    #: Also hand out the caller's Redis account for the session (attach does; `sessions
    #: show` does not, so no password is printed).
    redis_account: bool = False


@dataclass(frozen=True)
class ListArgs(ControlCall[SessionList]):
    """Describe every open session, or those of one service."""

    op: ClassVar[str] = "list"
    reply_type = SessionList

    service: str | None = None


@dataclass(frozen=True)
class CloseArgs(ControlCall[Closed]):
    """Close a session (a durable one keeps its responses unless `purge`)."""

    op: ClassVar[str] = "close"
    reply_type = Closed

    session_id: int
    purge: bool = True


@dataclass(frozen=True)
class AttachClientArgs(ControlCall[Attached]):
    """Declare a client id's response queue in a session (or, without `create`, only look
    an existing one up)."""

    op: ClassVar[str] = "attach_client"
    reply_type = Attached

    session_id: int
    client_id: str
    #: False: only attach a client id the session already has, and declare nothing (a
    #: reader such as `soafarm responses` must not create queues or counters).
    create: bool = True


@dataclass(frozen=True)
class PurgeClientArgs(ControlCall[ClientPurged]):
    """Delete one client id's responses and counters."""

    op: ClassVar[str] = "purge_client"
    reply_type = ClientPurged

    session_id: int
    client_id: str


@dataclass(frozen=True)
class AddDataArgs(ControlCall[DataAdded]):
    """Attach more common data to an open session."""

    op: ClassVar[str] = "add_data"
    reply_type = DataAdded

    session_id: int
    data: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class HostsArgs(ControlCall[HostList]):
    """List the live worker hosts."""

    op: ClassVar[str] = "hosts"
    reply_type = HostList


#: `soafarm hosts ACTION HOST`: the operator state each action sets (None: clears it).
HOST_ACTIONS: dict[str, str | None] = {"offline": OFFLINE, "drain": DRAINING, "online": None}


@dataclass(frozen=True)
class HostActionArgs(ControlCall[HostActionDone]):
    """Take a worker host offline (no new instances; it keeps those it runs), drain it (its
    instances also stop after their calls, and their sessions move elsewhere), or bring it
    back online."""

    op: ClassVar[str] = "host_action"
    reply_type = HostActionDone

    host_id: str
    #: One of HOST_ACTIONS.
    action: str

    def __post_init__(self) -> None:
        """Only the known actions, on a named host."""
        if not self.host_id:
            raise ValueError("host_id must be a non-empty string")
        if self.action not in HOST_ACTIONS:
            raise ValueError(
                f"action must be one of {', '.join(HOST_ACTIONS)}, not {self.action!r}"
            )


@dataclass(frozen=True)
class PingArgs(ControlCall[Pong]):
    """Check a broker daemon answers."""

    op: ClassVar[str] = "ping"
    reply_type = Pong


@dataclass(frozen=True)
class TemplateList(_ListReply):
    """Reply to templates: the broker's job templates, `Default` first."""

    items: tuple[JobTemplate, ...] = ()


@dataclass(frozen=True)
class TemplatesArgs(ControlCall[TemplateList]):
    """List the job templates the broker applies (from its settings)."""

    op: ClassVar[str] = "templates"
    reply_type = TemplateList


#: `soafarm admin ACTION`: what an `admins` request does.
ADMIN_ACTIONS = ("list", "grant", "revoke")


@dataclass(frozen=True)
class AdminsArgs(ControlCall[Admins]):
    """List the users with the admin role, or grant or revoke it (an admin's operation)."""

    op: ClassVar[str] = "admins"
    reply_type = Admins

    #: One of ADMIN_ACTIONS.
    action: str = "list"
    #: The RabbitMQ user to grant or revoke.
    user: str = ""

    def __post_init__(self) -> None:
        """A known action; grant and revoke name a user."""
        if self.action not in ADMIN_ACTIONS:
            raise ValueError(
                f"action must be one of {', '.join(ADMIN_ACTIONS)}, not {self.action!r}"
            )
        if self.action != "list" and not self.user:
            raise ValueError(f"{self.action} needs a user name")


ControlArgs = (
    CreateArgs
    | GetArgs
    | ListArgs
    | CloseArgs
    | AttachClientArgs
    | PurgeClientArgs
    | AddDataArgs
    | HostsArgs
    | HostActionArgs
    | PingArgs
    | TemplatesArgs
    | AdminsArgs
)

_BY_OP: dict[str, type[ControlArgs]] = {
    c.op: c
    for c in (
        CreateArgs,
        GetArgs,
        ListArgs,
        CloseArgs,
        AttachClientArgs,
        PurgeClientArgs,
        AddDataArgs,
        HostsArgs,
        HostActionArgs,
        PingArgs,
        TemplatesArgs,
        AdminsArgs,
    )
}

#: Every operation the broker daemon answers.
OPS = tuple(_BY_OP)


def decode_request(request: ControlRequest) -> ControlArgs:
    """The typed arguments of a control request, or ControlRequestError saying what is wrong
    (unknown operation, unknown or missing argument, wrong type)."""
    cls = _BY_OP.get(request.op)
    if cls is None:
        raise ControlRequestError(
            f"unknown control operation {request.op!r}; known: {', '.join(OPS)}"
        )
    try:
        return from_plain(cls, request.params, f"control request {request.op!r}", strict=True)
    except DecodeError as e:
        raise ControlRequestError(str(e)) from None
