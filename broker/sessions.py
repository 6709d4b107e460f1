"""The session service: create / get / close / list sessions and attach client ids.

Each operation takes the typed arguments record `decode_request` made of a `ControlRequest`
and returns a typed reply record; user errors are raised as `SoafarmError`s and travel back
to the caller.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable, Mapping
from typing import Any, NoReturn, assert_never

import pika
import structlog

from soafarm.broker.store import BrokerStore
from soafarm.config import BrokerSettings, Settings, broker_settings_with
from soafarm.errors import (
    ConfigError,
    DecodeError,
    SessionClosed,
    SessionFailed,
    SessionNotFound,
)
from soafarm.names import Names, check_client_id
from soafarm.plain import from_plain
from soafarm.registration import Registration, Registry
from soafarm.resources import check_unit
from soafarm.state.control import (
    AddDataArgs,
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
)
from soafarm.state.records import SessionRecord, SessionState
from soafarm.state.sessions import IdMark
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
    ) -> None:
        """`on_change` is called after sessions change, so the allocator runs at once.
        `ids` records the session ids handed out outside Redis (`QueueIdMark`);
        `queue_exists` lets an error say whether a lost session's queue remains."""
        self.settings = settings
        self.store = store
        self.registry = registry
        self.channel = channel
        self.names = Names(settings.namespace)
        self.on_change = on_change
        self.ids = ids
        self.queue_exists = queue_exists

    def handle(self, args: ControlArgs) -> Reply:  # noqa: PLR0911 - one return per operation
        """Run the control operation `args` stands for."""
        match args:
            case CreateArgs():
                return self.create(args)
            case GetArgs():
                return self.get(args)
            case CloseArgs():
                return self.close(args)
            case ListArgs():
                return self.list_sessions(args)
            case AttachClientArgs():
                return self.attach_client(args)
            case PurgeClientArgs():
                return self.purge_client(args)
            case AddDataArgs():
                return self.add_data(args)
            case HostsArgs():
                return self.hosts(args)
            case PingArgs():
                return Pong(self.settings.namespace)
            case _:
                assert_never(args)

    def _session(self, sid: int) -> SessionRecord:
        try:
            record = self.store.sessions.load(sid)
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

    def create(self, args: CreateArgs) -> SessionInfo:
        """Resolve the service, declare the session's queues, record it, allocate hosts."""
        registration = self.registry.resolve(args.service, args.version)
        min_units = args.min_units
        max_units = min_units if args.max_units is None else args.max_units
        if min_units < 0 or max_units < max(min_units, 1):
            raise ConfigError(
                f"need 0 <= min_units <= max_units and max_units >= 1 "
                f"(got {min_units}..{max_units})"
            )
        unit = check_unit(args.resource_unit)
        effective = effective_broker_settings(
            self.settings.broker, registration, args.broker_settings
        )
        data = self._adopt_data(args.data)
        sid = self.store.new_session_id(self.ids)
        record = SessionRecord(
            id=sid,
            service=registration.name,
            version=registration.version,
            state=SessionState.QUEUED,
            min_units=min_units,
            max_units=max_units,
            priority=args.priority,
            resource_unit=unit,
            created=time.time(),
            owner=args.owner,
            broker_settings=effective,
            include_exception_detail_in_faults=registration.include_exception_detail_in_faults,
            max_concurrent_calls=registration.max_concurrent_calls,
            durable=args.durable,
            shared=args.shared,
            data=data,
        )
        self.channel.queue_declare(**request_queue(self.names, sid, args.durable).declare_kwargs())
        self.store.save_session(record)
        log.info(
            "session_created",
            session_id=sid,
            service=registration.label,
            min_units=min_units,
            max_units=max_units,
        )
        self.on_change()
        return self.describe(self.store.get_session(sid) or record)

    def _adopt_data(self, keys: dict[str, str]) -> dict[str, str]:
        """Keep uploaded common data for the session's lifetime (they expire otherwise)."""
        prefix = self.names.common_data_key("")
        if not all(v.startswith(prefix) for v in keys.values()):
            raise ConfigError("data must map names to keys made by soafarm.state.commondata.upload")
        for key in keys.values():
            if not self.store.adopt_data(key):
                raise ConfigError(f"common data key {key} expired before the session used it")
        return dict(keys)

    def add_data(self, args: AddDataArgs) -> DataAdded:
        """Attach more common data to an open session."""
        record = self._session(args.session_id)
        added = self._adopt_data(args.data)
        updated = self.store.update_session(
            record.id, lambda r: dataclasses.replace(r, data={**r.data, **added})
        )
        if updated is None:
            raise SessionClosed(f"session {record.id} was closed")
        return DataAdded(record.id, tuple(sorted(updated.data)))

    def describe(self, record: SessionRecord) -> SessionInfo:
        """The session record plus its live instances and clients."""
        instances = tuple(self.store.instances(record.id))
        clients = tuple(
            from_plain(
                ClientStatus,
                self.store.progress(record.id, c).load().as_dict(),
                "client progress",
            )
            for c in self.store.clients(record.id)
        )
        return SessionInfo(
            record=record,
            request_queue=self.names.request_queue(record.id),
            instances=instances,
            clients=clients,
            load_errors=self.store.load_errors(record.id),
            allocated_units=len(instances),
            target_units=self.store.targets().get(record.id, 0),
            outstanding=sum(c.outstanding for c in clients),
        )

    def get(self, args: GetArgs) -> SessionInfo:
        """One session's record, instances and clients."""
        return self.describe(self._session(args.session_id))

    def list_sessions(self, args: ListArgs) -> SessionList:
        """Every open session, optionally only those of one service."""
        return SessionList(
            tuple(
                self.describe(r)
                for r in self.store.open_sessions()
                if args.service is None or r.service == args.service
            )
        )

    def hosts(self, _args: HostsArgs) -> HostList:
        """Every live worker host with its pool, size, assigned and running instances per
        session, utilisation and heartbeat age."""
        registered = self.store.hosts()
        alive = self.store.alive(sorted(registered))
        assignments = self.store.assignments(sorted(alive))
        running: dict[str, dict[str, int]] = {h: {} for h in alive}
        for session in self.store.open_sessions():
            for instance in self.store.instances(session.id):
                if instance.host_id in running:
                    per = running[instance.host_id]
                    per[str(session.id)] = per.get(str(session.id), 0) + 1
        now = time.time()
        return HostList(
            tuple(
                HostInfo(
                    record=registered[h],
                    assignments={str(k): v for k, v in assignments[h].items()},
                    instances=running[h],
                    uptime=round(now - registered[h].started, 1),
                    heartbeat_age=round(max(0.0, now - registered[h].beat), 1),
                )
                for h in sorted(alive)
            )
        )

    def attach_client(self, args: AttachClientArgs) -> Attached:
        """Declare the response queue of a client id; returns its name.

        Only an open session gets new client ids. A closed or failed one, and any attach
        without `create` (a reader), only looks up a client id it has, and declares nothing:
        read-only commands never create queues or counters.
        """
        record = self._session(args.session_id)
        client_id = check_client_id(args.client_id)
        spec = response_queue(self.names, record.id, client_id, record.durable)
        if args.create and record.state in _TAKES_CLIENTS:
            self.channel.queue_declare(**spec.declare_kwargs())
            self.store.progress(record.id, client_id).create()
            self.store.add_client(record.id, client_id)
            if not self.store.sessions.exists(record.id):
                # closed (purged) meanwhile by another broker daemon, which may have missed
                # this client id: take back what this attach made
                self.channel.queue_delete(queue=spec.name)
                self.store.forget_client(record.id, client_id)
                raise SessionClosed(f"session {record.id} was closed")
        elif client_id not in self.store.clients(record.id):
            raise self._no_client(record, client_id)
        return Attached(
            response_queue=spec.name,
            request_queue=self.names.request_queue(record.id),
            durable=record.durable,
            state=record.state,
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

    def close(self, args: CloseArgs) -> Closed:
        """End a session; its hosts are freed by the next allocation.

        With `purge` (always, for interactive sessions) every queue and key goes. Without it, a
        durable session keeps its responses, readable by attaching, until closed with purge.
        Closing twice, or from two broker daemons at once, is harmless. A session whose
        record is corrupt can be closed with purge (by its id alone).
        """
        sid = args.session_id
        try:
            record = self._session(sid)
        except DecodeError:
            if not args.purge:
                raise
            self._purge(sid)
            log.warning("session_closed", session_id=sid, purge=True, record="corrupt")
            self.on_change()
            return Closed(sid, SessionState.CLOSED, True)
        purge = args.purge or not record.durable
        if purge:
            self._purge(sid)
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

    def _purge(self, sid: int) -> None:
        """Delete every queue and key of a session. Queues go first, so a crash half-way
        leaves the record, and closing again finishes; client ids attached meanwhile (by
        another daemon) are returned by the delete and their queues go after it."""
        self.channel.queue_delete(queue=self.names.request_queue(sid))
        known = self.store.clients(sid)
        for client_id in known:
            self.channel.queue_delete(queue=self.names.response_queue(sid, client_id))
        for client_id in self.store.delete_session(sid):
            if client_id not in known:
                self.channel.queue_delete(queue=self.names.response_queue(sid, client_id))

    def purge_client(self, args: PurgeClientArgs) -> ClientPurged:
        """Delete one client id's responses and counters; the session goes on."""
        record = self._session(args.session_id)
        client_id = check_client_id(args.client_id)
        self.channel.queue_delete(queue=self.names.response_queue(record.id, client_id))
        self.store.forget_client(record.id, client_id)
        log.info("client_purged", session_id=record.id, client_id=client_id)
        return ClientPurged(record.id, client_id, True)
