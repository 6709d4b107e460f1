"""Sessions: a client's handle on a service's pool of instances, created through the broker."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, Self

import structlog
from redis import Redis

from soafarm.client.control import Control, ControlClient, PooledControl
from soafarm.client.heartbeat import Heartbeat
from soafarm.config import (
    BrokerSettings,
    Settings,
    broker_settings_with,
    load_settings,
    priority_value,
)
from soafarm.errors import (
    BrokerNoAnswer,
    ConfigError,
    ResourcesUnavailable,
    SessionClosed,
    SessionError,
    SessionFailed,
    SessionNotFound,
)
from soafarm.names import Names
from soafarm.plain import from_plain
from soafarm.state.commondata import upload
from soafarm.state.control import (
    AddDataArgs,
    CloseArgs,
    ControlCall,
    CreateArgs,
    GetArgs,
    ListArgs,
    R,
    SessionInfo,
)
from soafarm.state.records import SessionState
from soafarm.state.sessions import SessionStore
from soafarm.transport.backoff import Backoff
from soafarm.transport.connections import (
    SharedRedis,
    process_redis_client,
    redis_client,
    with_redis_account,
)
from soafarm.transport.identity import own_user

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class SessionStartInfo:
    """What a session asks for: a service (and version), units, priority, node groups,
    broker settings, and the job template that supplies defaults and limits.

    A field left `None` takes the job template's default (the `Default` template's, unless
    `job_template` names another): by default 1..as many units as the farm can give, of
    cores, at priority `normal` (2000), on any host.
    """

    service: str
    version: str | None = None
    min_units: int | None = None
    max_units: int | None = None
    resource_unit: str | None = None
    #: A name (`lowest`, `below_normal`, `normal`, `above_normal`, `highest`) or 0..4000.
    priority: int | str | None = None
    broker_settings: Mapping[str, Any] = field(default_factory=dict)
    #: Other users may find this session by service name, attach and send their own
    #: batches (only its owner and admins may close it).
    share_session: bool = False
    #: The RabbitMQ users admitted to a shared session besides its owner (empty: every
    #: user); naming any shares the session.
    share_with: Sequence[str] = ()
    #: Named values every service instance can read with `context.common_data(name)`.
    common_data: Mapping[str, Any] = field(default_factory=dict)
    #: The job template (see `soafarm templates list`); "" means `Default`.
    job_template: str = ""
    #: Node groups every host serving the session must be in: a host's pool, one of its
    #: label keys, or a `key=value` label.
    node_groups: Sequence[str] | None = None
    #: Raise `ResourcesUnavailable` (and close the session) when the farm cannot give its
    #: minimum at once, rather than leave it queued until it can.
    fail_if_queued: bool = False

    def __post_init__(self) -> None:
        """Reject bad values now, with the field's name, rather than at the broker."""
        if not self.service:
            raise ConfigError("SessionStartInfo.service must name a registered service")
        if self.min_units is not None and self.min_units < 0:
            raise ConfigError(f"SessionStartInfo.min_units must be >= 0, not {self.min_units}")
        if self.max_units is not None and self.max_units < max(self.min_units or 0, 1):
            raise ConfigError(
                f"SessionStartInfo.max_units ({self.max_units}) must be >= min_units "
                f"({self.min_units or 0}) and >= 1"
            )
        if self.priority is not None:
            priority_value(self.priority, "SessionStartInfo.priority")
        if isinstance(self.share_with, str):
            raise ConfigError("SessionStartInfo.share_with must be a list of user names")
        if isinstance(self.node_groups, str):
            raise ConfigError("SessionStartInfo.node_groups must be a list of names, not a string")
        broker_settings_with(
            BrokerSettings(), self.broker_settings, "SessionStartInfo.broker_settings"
        )

    def to_args(
        self, creator: str, durable: bool = False, data: Mapping[str, str] | None = None
    ) -> CreateArgs:
        """The `create` control request (common data is uploaded first: `data` holds its
        Redis keys)."""
        return CreateArgs(
            durable=durable,
            shared=self.share_session or bool(self.share_with),
            share_with=tuple(self.share_with),
            service=self.service,
            version=self.version,
            min_units=self.min_units,
            max_units=self.max_units,
            resource_unit=self.resource_unit,
            priority=None if self.priority is None else priority_value(self.priority),
            broker_settings=dict(self.broker_settings),
            creator=creator,
            data=dict(data or {}),
            job_template=self.job_template,
            node_groups=None if self.node_groups is None else tuple(self.node_groups),
        )

    def to_params(self, creator: str, durable: bool = False) -> dict[str, Any]:
        """The `create` control request's parameters as plain data."""
        return self.to_args(creator, durable).params()


@dataclass(frozen=True)
class SessionAttachInfo:
    """Which session to attach to (from `session.id`, `soafarm sessions list`...)."""

    session_id: int


class Session:
    """An interactive session. Use `Session.create(...)`; closing it frees its hosts and
    queues, and leaving its `with` block closes it."""

    durable = False

    def __init__(
        self,
        control: Control,
        record: SessionInfo | Mapping[str, Any],
        settings: Settings,
        state_client: Redis | None = None,
    ) -> None:
        """Wrap a session the broker created; prefer `Session.create`. While this object is
        open it heartbeats, so the broker counts the session as in use. `state_client`: a
        Redis client for it to own (closed with it), else it uses the process's
        (`process_redis_client`)."""
        self.control = control
        self._set_record(record)
        self.settings = settings
        self.closed = False
        if state_client is None and isinstance(record, SessionInfo) and record.redis_user:
            # the farm fences this user: the session's state through its own account
            state_client = redis_client(
                with_redis_account(settings, record.redis_user, record.redis_password)
            )
        #: The session's Redis client, shared with its BrokerClients (each releases it).
        self.redis = (
            SharedRedis(process_redis_client(settings), owned=False)
            if state_client is None
            else SharedRedis(state_client)
        )
        self.sessions = SessionStore(self.redis.client, Names(settings.namespace))
        self.heartbeat = Heartbeat(
            self.sessions,
            self.id,
            self.broker_settings.client_idle_timeout,
            "session",
        )

    @classmethod
    def create(cls, info: SessionStartInfo, settings: Settings | None = None) -> Self:
        """Ask the broker daemon for a new session; raises if none answers or the service is
        unknown. `settings` default to `load_settings()` (the `SOAFARM_*` variables)."""
        settings = settings or load_settings()
        # requests go on a connection borrowed from the process's pool for each: none is
        # opened for the session (~5 ms) nor held by it while it is open
        control = PooledControl(settings)
        try:
            data = _upload(settings, info.common_data) if info.common_data else None
            described = control.request(info.to_args(control.creator, cls.durable, data))
        except BrokerNoAnswer:
            # the broker may have made the session and lost its answer (Redis went away
            # mid-create): close what it made for this creator once it answers again
            control.close()
            close_owned(settings, control.creator, info.service)
            raise
        except BaseException:
            control.close()
            raise
        try:
            if info.fail_if_queued:
                described = dataclasses.replace(
                    _placed_or_refused(control, described, settings),
                    redis_user=described.redis_user,
                    redis_password=described.redis_password,
                )
            return cls(control, described, settings)
        except BaseException as e:
            # the session exists and nothing holds it (Redis went away between the broker's
            # create and this client's first contact): close it rather than leave its units
            # to an idle timeout; the error stays the one to report
            control.close()
            if close_best_effort(settings, described.record.id) is not None:
                log.warning("session_not_closed", session_id=described.record.id, error=repr(e))
            raise

    @classmethod
    def find(cls, service: str, settings: Settings | None = None) -> Self:
        """Attach to the newest open shared session of `service`."""
        settings = settings or load_settings()
        control = PooledControl(settings)
        try:
            shared = [
                s.record
                for s in control.request(ListArgs(service)).items
                if s.record.shared
                # released: a durable session that gave its units back until work comes
                and s.record.state
                in (SessionState.QUEUED, SessionState.RUNNING, SessionState.RELEASED)
                and s.record.durable == cls.durable
            ]
        finally:
            control.close()
        if not shared:
            raise SessionNotFound(
                f"no open shared session of service {service!r} "
                "(create one with SessionStartInfo(share_session=True))"
            )
        newest = max(shared, key=lambda s: s.created)
        return cls.attach(SessionAttachInfo(newest.id), settings)

    def set_common_data(self, name: str, value: Any) -> None:
        """Attach (or replace) common data `name`; instances read it with
        `context.common_data(name)`. Set it before sending requests that need it."""
        keys = _upload(self.settings, {name: value})
        self.control.request(AddDataArgs(self.id, keys))

    @classmethod
    def attach(cls, info: SessionAttachInfo, settings: Settings | None = None) -> Self:
        """Attach to an existing session by id (from this or another process or machine)."""
        settings = settings or load_settings()
        control = PooledControl(settings)
        try:
            described = control.request(GetArgs(info.session_id, redis_account=True))
            if described.record.durable != cls.durable:
                kind, other = (
                    ("durable", "DurableSession")
                    if described.record.durable
                    else ("interactive", "Session")
                )
                raise SessionError(
                    f"session {info.session_id} is {kind}: attach with {other}.attach"
                )
        except BaseException:
            control.close()
            raise
        return cls(control, described, settings)

    def _set_record(self, record: SessionInfo | Mapping[str, Any]) -> None:
        if isinstance(record, SessionInfo):
            #: The session as the broker last described it, as plain data.
            self.record: dict[str, Any] = record.to_wire()
            for secret in ("redis_user", "redis_password"):  # not for `record` printers
                self.record.pop(secret, None)
            #: The session's effective broker settings (fixed when it was created).
            self.broker_settings = record.record.broker_settings
        else:
            # a record made by hand (an id is enough to close a session) may leave the
            # settings out: they take their defaults, as in an old Redis record
            self.record = dict(record)
            self.broker_settings = from_plain(
                BrokerSettings, self.record.get("broker_settings", {}), "session broker_settings"
            )

    @property
    def id(self) -> int:
        """The session id (give it to `soafarm sessions show`)."""
        return int(self.record["id"])

    @property
    def service(self) -> str:
        """The service name."""
        return str(self.record["service"])

    def refresh(self) -> SessionInfo:
        """The session as the broker sees it now: record, instances, clients."""
        info = self.control.request(GetArgs(self.id))
        self._set_record(info)
        return info

    def status(self) -> dict[str, Any]:
        """The session's record as the broker sees it now: state, instances, clients (as
        plain data; `refresh()` returns it typed)."""
        self.refresh()
        return self.record

    def wait_for_instances(self, count: int, timeout: float = 60.0) -> int:
        """Block until at least `count` service instances serve the session; return how many."""
        deadline = time.monotonic() + timeout
        while True:
            n = len(self.refresh().instances)
            if n >= count:
                return n
            if time.monotonic() >= deadline:
                raise SessionError(
                    f"session {self.id} has {n} of {count} service instances after {timeout:g}s; "
                    "are worker hosts running (`soafarm hosts`)?"
                )
            time.sleep(0.05)

    def close(self, purge: bool = True) -> None:
        """Close the session: no more requests; its hosts are freed and its queues deleted.

        A durable session closed with `purge=False` keeps its responses, readable by attaching,
        until it is closed with purge.
        """
        if self.closed:
            return
        self.closed = True
        try:
            # the heartbeat stops after the close: without it the broker could see the
            # session idle and close it first
            self.control.request(CloseArgs(self.id, purge))
        except SessionClosed:
            pass  # closed already (idle timeout, another client): the goal is reached
        finally:
            self.heartbeat.stop()
            self.control.close()
            self.redis.release()

    def detach(self) -> None:
        """Disconnect, leaving the session running (reattach with its id)."""
        if not self.closed:
            self.closed = True
            self.heartbeat.stop()
            self.control.close()
            self.redis.release()

    def __enter__(self) -> Self:
        """Use as a context manager: the session closes on exit (another user's shared
        session is only detached from: only its owner or an admin may close it)."""
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Close the session, or detach from another user's."""
        if self.record.get("owner", "") not in ("", own_user(self.settings)):
            self.detach()
            return
        self.close()


class DurableSession(Session):
    """A durable session: every request and response is persisted in RabbitMQ (quorum queue,
    streams, publisher confirms). Leaving its `with` block only detaches: the session goes on,
    and any process can `DurableSession.attach(SessionAttachInfo(id))` to read responses,
    until `close()`."""

    durable = True

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Detach (the session is not closed)."""
        self.detach()


def attach_session(session_id: int, settings: Settings | None = None) -> Session:
    """Attach to session `session_id` as a `Session` or `DurableSession`, whichever it is."""
    settings = settings or load_settings()
    control = PooledControl(settings)
    try:
        described = control.request(GetArgs(session_id, redis_account=True))
    except BaseException:
        control.close()
        raise
    kind = DurableSession if described.record.durable else Session
    return kind(control, described, settings)


#: Seconds a client that failed keeps trying to close the session it created.
CLOSE_RETRY_SECONDS = 10.0


def _request_retrying(settings: Settings, args: ControlCall[R], deadline: float) -> R:
    """`args` sent on a fresh control connection, retried with back-off until the monotonic
    `deadline` (RabbitMQ, Redis or the broker may be restarting); past it, the last error."""
    backoff = Backoff(first=0.2, cap=2.0)
    while True:
        try:
            control = ControlClient(settings)
            try:
                return control.request(args)
            finally:
                control.close()
        except SessionClosed:
            raise  # an answer, not an outage
        except Exception:
            if time.monotonic() + backoff.current > deadline:
                raise
        time.sleep(backoff.next())


def close_best_effort(
    settings: Settings, session_id: int, limit: float = CLOSE_RETRY_SECONDS
) -> BaseException | None:
    """Close (and purge) session `session_id` on a fresh control connection, retrying with
    back-off for `limit` seconds: the client that created it failed, perhaps because RabbitMQ
    or Redis is restarting, and the broker needs both to close it. None once closed (or
    closed already), else the last error."""
    try:
        _request_retrying(settings, CloseArgs(session_id, True), time.monotonic() + limit)
    except SessionClosed:
        return None  # closed already: the goal is reached
    except Exception as e:
        return e
    return None


def close_owned(
    settings: Settings, creator: str, service: str, limit: float = CLOSE_RETRY_SECONDS
) -> None:
    """Close the sessions of `service` that `creator` (a ControlClient's token) created,
    retrying for `limit` seconds while the broker cannot answer; best effort (logged if it
    fails)."""
    deadline = time.monotonic() + limit
    try:
        listed = _request_retrying(settings, ListArgs(service), deadline)
    except Exception as e:
        log.warning("owned_sessions_not_closed", creator=creator, error=repr(e))
        return
    for item in listed.items:
        if item.record.creator == creator:
            left = max(deadline - time.monotonic(), 1.0)
            if close_best_effort(settings, item.record.id, left) is None:
                log.info("orphan_session_closed", session_id=item.record.id)


def _upload(settings: Settings, values: Mapping[str, Any]) -> dict[str, str]:
    client = redis_client(settings)
    try:
        return upload(client, Names(settings.namespace), values, settings.max_common_data_bytes)
    finally:
        client.close()


#: Seconds between looks at a new session while `fail_if_queued` waits for its first
#: allocation round (the leading broker runs one at once after a create: ~5-10 ms).
PLACEMENT_POLL = 0.01


def _placed_or_refused(control: Control, described: SessionInfo, settings: Settings) -> SessionInfo:
    """Wait for the allocator's first decision on a new session: its description once it
    runs, else ResourcesUnavailable with the allocator's reason (the caller closes it)."""
    deadline = time.monotonic() + settings.client.control_timeout
    sid = described.record.id
    while True:
        if described.record.state == SessionState.FAILED:
            raise SessionFailed(f"session {sid} failed: {described.record.error}")
        if described.status is not None:  # the allocator has decided
            if described.record.state == SessionState.QUEUED and described.status.waiting:
                raise ResourcesUnavailable(
                    f"session {sid} cannot start now: {described.status.waiting}"
                )
            return described
        if time.monotonic() >= deadline:
            raise ResourcesUnavailable(
                f"session {sid} was not placed within client.control_timeout "
                f"({settings.client.control_timeout:g}s): is a broker daemon leading?"
            )
        time.sleep(PLACEMENT_POLL)  # the allocator's decision is in Redis, made elsewhere
        described = control.request(GetArgs(sid))
    return described
