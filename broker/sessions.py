"""The session service: create / get / close / list sessions and attach client ids.

Each operation takes the typed arguments record `decode_request` made of a `ControlRequest`
and returns a typed reply record; user errors are raised as `SoafarmError`s and travel back
to the caller.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, assert_never

import pika
import redis
import structlog

from soafarm.broker.access import (
    SYSTEM,
    Access,
    Caller,
    admits,
    check_admin,
    check_owner,
    check_use,
)
from soafarm.broker.queues import QueueOps
from soafarm.broker.redis_fence import RedisFence
from soafarm.broker.store import BrokerStore
from soafarm.broker.templates import apply_template, find_template
from soafarm.config import BrokerSettings, Settings, broker_settings_with
from soafarm.errors import (
    ConfigError,
    DecodeError,
    PermissionDenied,
    SessionClosed,
    SessionFailed,
    SessionNotFound,
    SoafarmError,
)
from soafarm.names import Names, check_client_id
from soafarm.plain import from_plain
from soafarm.registration import Registration, Registry
from soafarm.state.batch import Later
from soafarm.state.control import (
    HOST_ACTIONS,
    AddDataArgs,
    Admins,
    AdminsArgs,
    AttachClientArgs,
    Attached,
    ClientPurged,
    ClientStatus,
    CloseArgs,
    Closed,
    ControlArgs,
    CreateArgs,
    DataAdded,
    GetArgs,
    HostActionArgs,
    HostActionDone,
    HostInfo,
    HostList,
    HostsArgs,
    ListArgs,
    PingArgs,
    Pong,
    PurgeClientArgs,
    Reply,
    SessionInfo,
    SessionList,
    TemplateList,
    TemplatesArgs,
)
from soafarm.state.namespace import DEFAULT_CLIENT_ID
from soafarm.state.records import LoadError, SessionRecord, SessionState
from soafarm.state.sessions import IdMark
from soafarm.state.usage import UsageRecord
from soafarm.transport.errors import is_queue_gone
from soafarm.transport.topology import request_queue, response_queue

log = structlog.get_logger(__name__)

#: States in which a client id may still be added (and its response queue declared).
_TAKES_CLIENTS = (SessionState.QUEUED, SessionState.RUNNING, SessionState.RELEASED)


def effective_broker_settings(
    farm: BrokerSettings, registration: Registration, overrides: Mapping[str, Any]
) -> BrokerSettings:
    """A session's broker settings, layered once at creation: defaults < broker config <
    registration [broker] table < SessionStartInfo.broker_settings."""
    return broker_settings_with(
        broker_settings_with(farm, registration.broker, str(registration.path)),
        overrides,
        "SessionStartInfo.broker_settings",
    )


#: Distinct (registration, overrides) layerings `Resolved` remembers (an LRU beyond it).
SETTINGS_CACHE = 256


class Resolved:
    """The registry's answers and the layered broker settings of the sessions a daemon
    creates, computed again only when something they depend on changed.

    Resolving parses the service's registration file (~0.5 ms) and layering the settings
    checks every key (~0.6 ms), at every create; a farm creates sessions of a few services.
    A resolution is kept while the registration folders hold the same files with the same
    modification times and sizes (a stat each, ~4 us), so a file added, removed or edited
    is seen by the next create, as before.
    """

    def __init__(self, registry: Registry) -> None:
        """Answer for `registry`."""
        self.registry = registry
        self._resolved: dict[tuple[str, str | None], tuple[object, Registration]] = {}
        self._layered: OrderedDict[tuple[str, str, str, str], BrokerSettings] = OrderedDict()

    def _folders(self) -> object:
        """What the registry's answers depend on: every registration file's name, size and
        modification time, in its search order."""
        out = []
        for folder in self.registry.folders:
            if folder.is_dir():
                for path in sorted(folder.glob("*.toml")):
                    try:
                        st = path.stat()
                    except OSError:
                        continue  # removed meanwhile: resolve() says what it finds
                    # a deployed package's link changes its target, not its own name
                    out.append((str(path.resolve()), st.st_mtime_ns, st.st_size))
        return tuple(out)

    def resolve(self, name: str, version: str | None) -> Registration:
        """`registry.resolve(name, version)`, or its answer from last time if no
        registration file changed since."""
        key = (name, version)
        self.registry.sync()
        folders = self._folders()
        known = self._resolved.get(key)
        if known is not None and known[0] == folders:
            return known[1]
        registration = self.registry.resolve(name, version)
        self._resolved[key] = (folders, registration)
        return registration

    def broker_settings(
        self, farm: BrokerSettings, registration: Registration, overrides: Mapping[str, Any]
    ) -> BrokerSettings:
        """`effective_broker_settings(...)`, remembered per distinct input."""
        key = (
            repr(farm),
            str(registration.path),
            json.dumps(registration.broker, sort_keys=True, default=repr),
            json.dumps(overrides, sort_keys=True, default=repr),
        )
        found = self._layered.get(key)
        if found is None:
            found = effective_broker_settings(farm, registration, overrides)
            self._layered[key] = found
            if len(self._layered) > SETTINGS_CACHE:
                self._layered.popitem(last=False)
        else:
            self._layered.move_to_end(key)
        return found


def describe_sessions(
    store: BrokerStore, names: Names, records: list[SessionRecord]
) -> list[SessionInfo]:
    """Each session record beside its live facts (instances, clients' counters, load errors,
    target, status), in two round trips to Redis for all of them."""
    batch = store.batch()
    reads = [
        (
            store.instance_records.read_of_session(batch, r.id),
            store.sessions.read_clients(batch, r.id),
            store.sessions.read_load_errors(batch, r.id),
            store.sessions.read_target(batch, r.id),
            store.sessions.read_status(batch, r.id),
        )
        for r in records
    ]
    batch.run()
    progress = store.batch()
    counters = [
        [store.progress(r.id, c).read(progress) for c in clients.value]
        for r, (_i, clients, _e, _t, _s) in zip(records, reads, strict=True)
    ]
    progress.run()
    out = []
    for r, (instances, _c, load_errors, target, status), of_clients in zip(
        records, reads, counters, strict=True
    ):
        clients = tuple(
            from_plain(ClientStatus, c.value.as_dict(), "client progress") for c in of_clients
        )
        out.append(
            SessionInfo(
                record=r,
                request_queue=names.request_queue(r.id),
                instances=tuple(instances.value),
                clients=clients,
                load_errors={h: LoadError.parse(v).why for h, v in load_errors.value.items()},
                allocated_units=len(instances.value),
                target_units=target.value,
                status=status.value,
                outstanding=sum(c.outstanding for c in clients),
            )
        )
    return out


def describe_hosts(store: BrokerStore) -> HostList:
    """Every live worker host with its pool, size, assigned and running instances per
    session, utilisation and heartbeat age."""
    registered = store.hosts()
    alive = store.alive(sorted(registered))
    assignments = store.assignments(sorted(alive))
    running: dict[str, dict[str, int]] = {h: {} for h in alive}
    for session in store.open_sessions():
        for instance in store.instances(session.id):
            if instance.host_id in running:
                per = running[instance.host_id]
                per[str(session.id)] = per.get(str(session.id), 0) + 1
    admin = store.host_records.admin_states()
    now = time.time()
    return HostList(
        tuple(
            HostInfo(
                record=registered[h],
                assignments={str(k): v for k, v in assignments[h].items()},
                instances=running[h],
                uptime=round(now - registered[h].started, 1),
                heartbeat_age=round(max(0.0, now - registered[h].beat), 1),
                admin=admin.get(h, ""),
            )
            for h in sorted(alive)
        )
    )


class SessionService:
    """Answers control requests; owns session queues and records."""

    def __init__(
        self,
        settings: Settings,
        store: BrokerStore,
        registry: Registry,
        channel: pika.adapters.blocking_connection.BlockingChannel,
        on_change: Callable[[], None],
        *,
        ids: IdMark | None = None,
        queue_exists: Callable[[str], bool] | None = None,
        queue_ops: QueueOps | None = None,
        fence: RedisFence | None = None,
    ) -> None:
        """`on_change` is called after sessions change, so the allocator runs at once.
        `ids` records the session ids handed out outside Redis (`QueueIdMark`);
        `queue_exists` lets an error say whether a lost session's queue remains;
        `queue_ops` runs a request's queue declares and deletes side by side (without it,
        one after the other on `channel`); `fence` hands out fenced Redis accounts (without
        it, one made from `settings`)."""
        self.settings = settings
        self.store = store
        self.registry = registry
        self.channel = channel
        self.names = Names(settings.namespace)
        self.on_change = on_change
        self.ids = ids
        self.queue_exists = queue_exists
        self.queue_ops = queue_ops
        self.resolved = Resolved(registry)
        self.access = Access(settings, store.admins)
        self.fence = fence or RedisFence.for_farm(settings, store.redis, store.sessions)

    def _queues(self, ops: list[tuple[str, dict[str, Any]]]) -> None:
        """Run queue declares and deletes (`QueueOps.run`), all done when it returns."""
        if self.queue_ops is not None:
            self.queue_ops.run(ops)
            return
        for method, kwargs in ops:
            getattr(self.channel, method)(**kwargs)

    def handle(  # noqa: PLR0911, PLR0912 - one return per operation
        self, args: ControlArgs, caller: Caller = SYSTEM
    ) -> Reply:
        """Run the control operation `args` stands for, as `caller` may (broker.access)."""
        match args:
            case CreateArgs():
                return self.create(args, caller)
            case GetArgs():
                return self.get(args, caller)
            case CloseArgs():
                return self.close(args, caller)
            case ListArgs():
                return self.list_sessions(args, caller)
            case AttachClientArgs():
                return self.attach_client(args, caller)
            case PurgeClientArgs():
                return self.purge_client(args, caller)
            case AddDataArgs():
                return self.add_data(args, caller)
            case HostsArgs():
                return self.hosts(args)
            case HostActionArgs():
                check_admin(caller, f"{args.action} a worker host")
                return self.host_action(args)
            case PingArgs():
                return Pong(self.settings.namespace, caller.user, caller.admin)
            case TemplatesArgs():
                return self.templates()
            case AdminsArgs():
                return self.admins(args, caller)
            case _:
                assert_never(args)

    def _session(
        self, sid: int, loaded: Later[SessionRecord | None] | None = None
    ) -> SessionRecord:
        """Session `sid`'s record, or the error saying why there is none; `loaded`: its
        record read in a batch the caller ran (`SessionStore.read_load`)."""
        try:
            record = self.store.sessions.load(sid) if loaded is None else loaded.value
        except DecodeError as e:
            raise DecodeError(
                f"session {sid} cannot be used: {e}; remove it with "
                f"`soafarm sessions close {sid} --purge`"
            ) from None
        if record is None:
            if self.store.was_closed(sid):
                raise SessionClosed(f"session {sid} is closed")
            self._unknown(sid)
        return record

    def _unknown(self, sid: int) -> NoReturn:
        """Say why `sid` has no record: never created, or lost with Redis's data."""
        sessions = self.store.sessions
        if not sessions.ids_known():  # Redis came back empty since the last create
            sessions.recover_ids(self.ids)
        if 0 < sid < sessions.lost_below():
            queue = self.names.request_queue(sid)
            remains = self.queue_exists is not None and self.queue_exists(queue)
            raise SessionNotFound(
                f"session {sid}'s state was lost: Redis came back without namespace "
                f"{self.settings.namespace!r}'s data (run it with persistence: appendonly "
                "yes)"
                + (f"; its request queue {queue} remains in RabbitMQ" if remains else "")
                + "; its results cannot be read any more (session ids are never reused, so "
                "no other session gets them); remove what is left with `soafarm namespace "
                "delete`"
            )
        raise SessionNotFound(
            f"no session {sid} in namespace {self.settings.namespace!r} "
            "(see `soafarm sessions list`)"
        )

    def create(self, args: CreateArgs, caller: Caller = SYSTEM) -> SessionInfo:
        """Resolve the service and the job template, declare the session's queues, record
        it, allocate hosts."""
        registration = self.resolved.resolve(args.service, args.version)
        asked = apply_template(self.settings.scheduler, args)
        overrides = (
            {**asked.broker, **args.broker_settings} if asked.broker else args.broker_settings
        )
        effective = self.resolved.broker_settings(self.settings.broker, registration, overrides)
        min_units, max_units, unit = asked.min_units, asked.max_units, asked.resource_unit
        data = self._adopt_data(args.data)
        sid = self.store.new_session_id(self.ids)
        record = SessionRecord(
            id=sid,
            service=registration.name,
            version=registration.version,
            state=SessionState.QUEUED,
            min_units=min_units,
            max_units=max_units,
            priority=asked.priority,
            resource_unit=unit,
            created=time.time(),
            owner=caller.user,
            creator=args.creator,
            broker_settings=effective,
            include_exception_detail_in_faults=registration.include_exception_detail_in_faults,
            max_concurrent_calls=registration.max_concurrent_calls,
            durable=args.durable,
            shared=args.shared or bool(args.share_with),
            share_with=args.share_with,
            data=data,
            job_template=asked.template,
            node_groups=asked.node_groups,
        )
        declares = [
            ("queue_declare", request_queue(self.names, sid, args.durable).declare_kwargs())
        ]
        if not args.durable:
            # the response queue of the client library's default client id, declared beside
            # the request queue, so the first BrokerClient's attach finds it: the attach
            # takes ~4 ms less, the create ~1 ms more (the declares run side by side). It is
            # deleted with the session whether a client attached with that id or not. (A
            # durable session's is a stream, heavier: declared when a client id attaches.)
            spec = response_queue(self.names, sid, DEFAULT_CLIENT_ID, caller.user, durable=False)
            declares.append(("queue_declare", spec.declare_kwargs()))
        self._queues(declares)
        # after the declares (they run side by side, on other channels): the owner's
        # request key, and the default client id's give-back key
        binds = [self._request_bind(sid, caller.user)]
        if not args.durable:
            binds.append(self._return_bind(spec.name, sid, DEFAULT_CLIENT_ID, caller.user))
        self._bind(sid, binds)
        self.store.save_session(record)
        log.info(
            "session_created",
            session_id=sid,
            service=registration.label,
            min_units=min_units,
            max_units=max_units,
            template=asked.template,
            node_groups=list(asked.node_groups),
        )
        self.on_change()
        # described as saved, without reading it back: nothing can have attached to it,
        # started for it or failed yet (its id was handed out just now)
        return self._with_account(
            SessionInfo(record=record, request_queue=self.names.request_queue(sid)), caller
        )

    def _with_account(self, described: SessionInfo, caller: Caller) -> SessionInfo:
        """`described` with the caller's fenced Redis account for it, if it gets one."""
        account = self.fence.session_account(caller, described.record.id)
        if account is None:
            return described
        return dataclasses.replace(
            described, redis_user=account.name, redis_password=account.password
        )

    def _adopt_data(self, keys: dict[str, str]) -> dict[str, str]:
        """Keep uploaded common data for the session's lifetime (they expire otherwise)."""
        prefix = self.names.common_data_key("")
        if not all(v.startswith(prefix) for v in keys.values()):
            raise ConfigError("data must map names to keys made by soafarm.state.commondata.upload")
        for key in keys.values():
            if not self.store.adopt_data(key):
                raise ConfigError(f"common data key {key} expired before the session used it")
        return dict(keys)

    def add_data(self, args: AddDataArgs, caller: Caller = SYSTEM) -> DataAdded:
        """Attach more common data to an open session."""
        record = self._session(args.session_id)
        check_owner(caller, record, "add common data to")
        added = self._adopt_data(args.data)
        updated = self.store.update_session(
            record.id, lambda r: dataclasses.replace(r, data={**r.data, **added})
        )
        if updated is None:
            raise SessionClosed(f"session {record.id} was closed")
        return DataAdded(record.id, tuple(sorted(updated.data)))

    def describe(self, record: SessionRecord) -> SessionInfo:
        """The session record plus its live instances and clients."""
        return self.describe_all([record])[0]

    def describe_all(self, records: list[SessionRecord]) -> list[SessionInfo]:
        """`describe` of each record, in two round trips to Redis for all of them."""
        return describe_sessions(self.store, self.names, records)

    def get(self, args: GetArgs, caller: Caller = SYSTEM) -> SessionInfo:
        """One session's record, instances and clients."""
        record = self._session(args.session_id)
        check_use(caller, record, "read")
        described = self.describe(record)
        return self._with_account(described, caller) if args.redis_account else described

    def list_sessions(self, args: ListArgs, caller: Caller = SYSTEM) -> SessionList:
        """Every open session the caller may use, optionally only those of one service."""
        return SessionList(
            tuple(
                self.describe_all(
                    [
                        r
                        for r in self.store.open_sessions()
                        if (args.service is None or r.service == args.service) and admits(caller, r)
                    ]
                )
            )
        )

    def admins(self, args: AdminsArgs, caller: Caller = SYSTEM) -> Admins:
        """Who has the admin role; grant or revoke it (an admin's)."""
        if args.action != "list":
            check_admin(caller, f"{args.action} the admin role")
            if args.action == "grant":
                self.store.admins.grant(args.user)
            else:
                self.store.admins.revoke(args.user)
            log.info("admin_role_changed", action=args.action, user=args.user, by=caller.user)
        return Admins(self.access.broker_user, self.access.configured, self.store.admins.granted())

    def templates(self) -> TemplateList:
        """The job templates this daemon applies, `Default` first (the built-in one when
        the settings define none)."""
        configured = self.settings.scheduler.job_templates
        default = find_template(self.settings.scheduler, "")
        rest = tuple(t for t in configured if t.name.lower() != "default")
        return TemplateList((default, *rest))

    def hosts(self, _args: HostsArgs) -> HostList:
        """Every live worker host with its pool, size, assigned and running instances per
        session, utilisation and heartbeat age."""
        return describe_hosts(self.store)

    def host_action(self, args: HostActionArgs) -> HostActionDone:
        """Set or clear a live host's operator state and run the allocator at once. `online`
        also clears the state of a host that is not live (it would come back with it)."""
        state = HOST_ACTIONS[args.action]
        hosts = self.store.host_records
        registered = self.store.hosts()
        live = self.store.alive(sorted(registered))
        if args.host_id not in live and not (
            state is None and args.host_id in hosts.admin_states()
        ):
            raise SoafarmError(
                f"no live worker host {args.host_id!r} in namespace "
                f"{self.settings.namespace!r}; live hosts: {', '.join(sorted(live)) or 'none'} "
                "(see `soafarm hosts`)"
            )
        previous = hosts.set_admin(args.host_id, state)
        log.info("host_admin_set", host_id=args.host_id, state=state, previous=previous)
        self.on_change()
        return HostActionDone(args.host_id, state or "", previous or "")

    def attach_client(self, args: AttachClientArgs, caller: Caller = SYSTEM) -> Attached:
        """Declare the response queue of a client id; returns its name and how to send.

        Only an open session gets new client ids. A closed or failed one, and any attach
        without `create` (a reader), only looks up a client id it has, and declares nothing:
        read-only commands never create queues or counters.

        A client id is its first attacher's (the default one its session owner's): only that
        user sends under it, and only that user or an admin reads it. The caller's routing
        key is bound to the session's request queue (RabbitMQ's topic permissions let a user
        publish with its own keys only), and, for an interactive session, its give-back key
        to the client id's response queue.
        """
        record = self._session(args.session_id)
        check_use(caller, record, "attach to")
        client_id = check_client_id(args.client_id)
        caller_user = caller.user or record.owner  # the broker's own calls act as the owner
        progress = self.store.progress(record.id, client_id)
        known = progress.user()
        if known is None and client_id == DEFAULT_CLIENT_ID:
            known = record.owner
        user = known or caller_user
        if user != caller_user and (args.create or not caller.admin):
            raise PermissionDenied(
                f"client id {client_id!r} of session {record.id} is {user!r}'s; user "
                f"{caller_user!r} may not "
                + (
                    "send under it: use a client id of your own (BrokerClient(session, "
                    "'my-id'), --client-id)"
                    if args.create
                    else "read it (only its user or an admin may)"
                )
            )
        spec = response_queue(self.names, record.id, client_id, user, record.durable)
        if args.create and record.state in _TAKES_CLIENTS:
            self.channel.queue_declare(**spec.declare_kwargs())
            # counters, client id and the check that the session is still open in one round
            # trip: Redis runs them in this order, so the check sees the client id's add
            batch = self.store.batch()
            created = progress.create_in(batch, user)
            added = self.store.sessions.add_client_in(batch, record.id, client_id)
            still_open = self.store.sessions.read_exists(batch, record.id)
            batch.run()
            created.value, added.value  # noqa: B018 - raise what the writes raised
            if not still_open.value:
                # closed (purged) meanwhile by another broker daemon, which may have missed
                # this client id: take back what this attach made
                self.channel.queue_delete(queue=spec.name)
                self.store.forget_client(record.id, client_id)
                raise SessionClosed(f"session {record.id} was closed")
        elif client_id not in self.store.clients(record.id):
            raise self._no_client(record, client_id)
        # a sender's request key is bound again even when it is the owner's (bound at
        # create): the bind is also how an attach finds the request queue gone; the owner's
        # default client id's give-back key was bound at create
        binds = []
        if args.create and record.state in _TAKES_CLIENTS:
            binds.append(self._request_bind(record.id, caller_user))
        if (
            not record.durable
            and record.state in _TAKES_CLIENTS
            and not (caller_user == record.owner and client_id == DEFAULT_CLIENT_ID)
        ):
            binds.append(self._return_bind(spec.name, record.id, client_id, caller_user))
        self._bind(record.id, binds)
        self.fence.add_client(caller, record.id, client_id)
        return Attached(
            response_queue=spec.name,
            request_queue=self.names.request_queue(record.id),
            durable=record.durable,
            state=record.state,
            responders=self.access.responders,
            request_exchange=self.names.request_exchange,
            request_key=self.names.request_key(record.id, caller_user),
            return_key=self.names.return_key(record.id, client_id, caller_user),
        )

    def _bind(self, sid: int, binds: list[tuple[str, dict[str, Any]]]) -> None:
        """Run queue binds; a queue RabbitMQ no longer has (an interactive session's, after a
        RabbitMQ restart, before the life-cycle round marks it failed) is the session's
        error, not a lost connection for the daemon."""
        try:
            self._queues(binds)
        except pika.exceptions.ChannelClosedByBroker as e:
            if not is_queue_gone(e):
                raise
            raise SessionFailed(
                f"session {sid} failed: its queues are gone from RabbitMQ (a RabbitMQ restart "
                "drops an interactive session's); create a new session"
            ) from None

    def _request_bind(self, sid: int, user: str) -> tuple[str, dict[str, Any]]:
        """The bind that lets `user`'s request batches reach session `sid`'s queue."""
        return (
            "queue_bind",
            {
                "queue": self.names.request_queue(sid),
                "exchange": self.names.request_exchange,
                "routing_key": self.names.request_key(sid, user),
            },
        )

    def _return_bind(
        self, queue: str, sid: int, client_id: str, user: str
    ) -> tuple[str, dict[str, Any]]:
        """The bind that lets `user`'s reader give batches back to a response queue."""
        return (
            "queue_bind",
            {
                "queue": queue,
                "exchange": self.names.request_exchange,
                "routing_key": self.names.return_key(sid, client_id, user),
            },
        )

    def _no_client(self, record: SessionRecord, client_id: str) -> Exception:
        has = ", ".join(self.store.clients(record.id)) or "none"
        if record.state == SessionState.CLOSED:
            return SessionClosed(f"session {record.id} is closed and has no client {client_id!r}")
        if record.state == SessionState.FAILED:
            return SessionFailed(f"session {record.id} failed: {record.error}")
        return SessionNotFound(
            f"session {record.id} has no client id {client_id!r} (it has: {has})"
        )

    def close(self, args: CloseArgs, caller: Caller = SYSTEM) -> Closed:
        """End a session; its hosts are freed by the next allocation.

        With `purge` (always, for interactive sessions) every queue and key goes. Without it, a
        durable session keeps its responses, readable by attaching, until closed with purge.
        Closing twice, or from two broker daemons at once, is harmless. A session whose
        record is corrupt can be closed with purge (by its id alone).
        """
        sid = args.session_id
        batch = self.store.batch()
        loaded = self.store.sessions.read_load(batch, sid)
        listed = self.store.sessions.read_clients(batch, sid)
        batch.run()
        try:
            record = self._session(sid, loaded)
        except DecodeError:
            if not args.purge:
                raise
            check_admin(caller, f"purge session {sid}, whose record is unreadable")
            self._purge(sid)
            log.warning("session_closed", session_id=sid, purge=True, record="corrupt")
            self.on_change()
            return Closed(sid, SessionState.CLOSED, True)
        check_owner(caller, record, "close")
        purge = args.purge or not record.durable
        if record.state != SessionState.CLOSED:  # a durable one closed before was recorded
            self._record_usage(record)
        if purge:
            self._purge(sid, record, listed.value)
        else:
            self.channel.queue_delete(queue=self.names.request_queue(sid))
            self.store.update_session(
                sid,
                lambda r: (
                    None
                    if r.state == SessionState.CLOSED
                    else dataclasses.replace(r, state=SessionState.CLOSED)
                ),
            )
        log.info("session_closed", session_id=sid, service=record.service, purge=purge)
        self.on_change()
        return Closed(sid, SessionState.CLOSED, purge)

    def _record_usage(self, record: SessionRecord) -> None:
        """Write the closing session's usage record (once, whichever daemon closes it). A
        failure is logged, never fails the close: the record is an account, not the work."""
        try:
            taken = self.store.usage.take(record.id)
            if taken is None:
                return
            info = self.describe(record)
            now = time.time()
            loads = self.store.host_records.instance_loads(
                [(i.host_id, i.id) for i in info.instances]
            )
            usage = UsageRecord(
                session=record.id,
                service=record.service,
                version=record.version,
                owner=record.owner,
                durable=record.durable,
                job_template=record.job_template,
                started=record.created,
                ended=now,
                # each instance is one unit; those still running count up to now
                unit_seconds=round(
                    taken.unit_seconds + sum(max(0.0, now - i.started) for i in info.instances),
                    3,
                ),
                requests=sum(c.accepted for c in info.clients),
                responses=sum(c.done for c in info.clients),
                faults=sum(c.faulted for c in info.clients),
                retries=taken.retries + sum(load.retries for load in loads if load is not None),
                state=str(record.state),
                error=record.error,
            )
            self.store.usage.record(usage, self.settings.usage.retention)
        except (redis.RedisError, DecodeError) as e:
            log.warning("usage_record_failed", session_id=record.id, error=str(e))

    def _purge(
        self, sid: int, record: SessionRecord | None = None, known: list[str] | None = None
    ) -> None:
        """Delete every queue and key of a session. Queues go first, so a crash half-way
        leaves the record, and closing again finishes; client ids attached meanwhile (by
        another daemon) are returned by the delete and their queues go after it. `record`
        and `known` (its client ids) as the caller just read them, if it did."""
        known = self.store.clients(sid) if known is None else known
        # the default client id's response queue goes whether it was attached or only
        # declared with the session (deleting a missing queue is harmless)
        responses = sorted({*known, DEFAULT_CLIENT_ID})
        owner = record.owner if record is not None else ""
        users = self.store.client_users(sid, responses)
        self._queues(
            [("queue_delete", {"queue": self.names.request_queue(sid)})]
            + [
                (
                    "queue_delete",
                    {"queue": self.names.response_queue(sid, c, users.get(c) or owner)},
                )
                for c in responses
            ]
        )
        late = [c for c in self.store.delete_session(sid, record, known) if c not in responses]
        if late:
            # attached while this close ran (another daemon), their counters gone with the
            # session: a client id's user is its first attacher, most likely the owner
            self._queues(
                [
                    ("queue_delete", {"queue": self.names.response_queue(sid, c, owner)})
                    for c in late
                ]
            )

    def purge_client(self, args: PurgeClientArgs, caller: Caller = SYSTEM) -> ClientPurged:
        """Delete one client id's responses and counters; the session goes on."""
        record = self._session(args.session_id)
        check_use(caller, record, "purge a client id of")
        client_id = check_client_id(args.client_id)
        user = self.store.progress(record.id, client_id).user() or record.owner
        self.channel.queue_delete(queue=self.names.response_queue(record.id, client_id, user))
        self.store.forget_client(record.id, client_id)
        log.info("client_purged", session_id=record.id, client_id=client_id)
        return ClientPurged(record.id, client_id, True)
