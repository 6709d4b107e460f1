"""The session service: create / get / close / list sessions and attach client ids.

Each operation takes the params dict of a `ControlRequest` and returns plain data for the
`ControlReply`; user errors are raised as `SoafarmError`s and travel back to the caller.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from typing import Any

import pika
import structlog

from soafarm.broker.store import BrokerStore
from soafarm.config import Settings, broker_settings_with
from soafarm.errors import ConfigError, SessionClosed, SessionNotFound
from soafarm.names import Names, check_client_id
from soafarm.registration import Registry
from soafarm.resources import check_unit
from soafarm.state.clients import ProgressStore
from soafarm.state.records import SessionRecord
from soafarm.transport.topology import request_queue, response_queue

log = structlog.get_logger(__name__)


def _int_param(params: dict[str, Any], key: str, default: int | None = None) -> int:
    value = params.get(key, default)
    if not isinstance(value, int) or isinstance(value, bool):
        raise ConfigError(f"{key} must be an integer, not {value!r}")
    return value


class SessionService:
    """Answers control requests; owns session queues and records."""

    def __init__(
        self,
        settings: Settings,
        store: BrokerStore,
        registry: Registry,
        channel: pika.adapters.blocking_connection.BlockingChannel,
        on_change: Callable[[], None],
    ) -> None:
        """`on_change` is called after sessions change, so the allocator runs at once."""
        self.settings = settings
        self.store = store
        self.registry = registry
        self.channel = channel
        self.names = Names(settings.namespace)
        self.on_change = on_change

    def handle(self, op: str, params: dict[str, Any]) -> Any:
        """Run control operation `op`; unknown operations are a ConfigError."""
        handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            "create": self.create,
            "get": self.get,
            "close": self.close,
            "list": self.list_sessions,
            "attach_client": self.attach_client,
            "purge_client": self.purge_client,
            "add_data": self.add_data,
            "hosts": self.hosts,
            "ping": lambda _p: {"namespace": self.settings.namespace},
        }
        if op not in handlers:
            raise ConfigError(f"unknown control operation {op!r}; known: {', '.join(handlers)}")
        return handlers[op](params)

    def _session(self, params: dict[str, Any]) -> SessionRecord:
        sid = _int_param(params, "session_id")
        record = self.store.get_session(sid)
        if record is None:
            if self.store.was_closed(sid):
                raise SessionClosed(f"session {sid} is closed")
            raise SessionNotFound(
                f"no session {sid} in namespace {self.settings.namespace!r} "
                "(see `soafarm sessions list`)"
            )
        return record

    def create(self, params: dict[str, Any]) -> dict[str, Any]:
        """Resolve the service, declare the session's queues, record it, allocate hosts."""
        service = params.get("service")
        if not isinstance(service, str) or not service:
            raise ConfigError("service must be a non-empty string")
        version = params.get("version")
        if version is not None and not isinstance(version, str):
            raise ConfigError(f"version must be a string like '1.0', not {version!r}")
        registration = self.registry.resolve(service, version)
        min_units = _int_param(params, "min_units", 1)
        max_units = _int_param(params, "max_units", min_units)
        if min_units < 0 or max_units < max(min_units, 1):
            raise ConfigError(
                f"need 0 <= min_units <= max_units and max_units >= 1 "
                f"(got {min_units}..{max_units})"
            )
        unit = check_unit(str(params.get("resource_unit", "core")))
        overrides = params.get("broker_settings") or {}
        if not isinstance(overrides, dict):
            raise ConfigError("broker_settings must be a table of broker settings")
        effective = broker_settings_with(
            broker_settings_with(self.settings.broker, registration.broker, str(registration.path)),
            overrides,
            "SessionStartInfo.broker_settings",
        )
        durable = bool(params.get("durable", False))
        data = self._adopt_data(params.get("data") or {})
        sid = self.store.new_session_id()
        record = SessionRecord(
            id=sid,
            service=registration.name,
            version=registration.version,
            state="queued",
            min_units=min_units,
            max_units=max_units,
            priority=_int_param(params, "priority", 2000),
            resource_unit=unit,
            created=time.time(),
            owner=str(params.get("owner", "")),
            broker_settings=dataclasses.asdict(effective),
            include_exception_detail_in_faults=registration.include_exception_detail_in_faults,
            max_concurrent_calls=registration.max_concurrent_calls,
            durable=durable,
            shared=bool(params.get("shared", False)),
            data=data,
        )
        self.channel.queue_declare(**request_queue(self.names, sid, durable).declare_kwargs())
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

    def _adopt_data(self, keys: Any) -> dict[str, str]:
        """Keep uploaded common data for the session's lifetime (they expire otherwise)."""
        prefix = self.names.common_data_key("")
        if not isinstance(keys, dict) or not all(
            isinstance(k, str) and isinstance(v, str) and v.startswith(prefix)
            for k, v in keys.items()
        ):
            raise ConfigError("data must map names to keys made by soafarm.state.commondata.upload")
        for key in keys.values():
            if not self.store.r.persist(key) and not self.store.r.exists(key):
                raise ConfigError(f"common data key {key} expired before the session used it")
        return dict(keys)

    def add_data(self, params: dict[str, Any]) -> dict[str, Any]:
        """Attach more common data to an open session."""
        record = self._session(params)
        data = {**record.data, **self._adopt_data(params.get("data") or {})}
        self.store.save_session(dataclasses.replace(record, data=data))
        return {"session_id": record.id, "data": sorted(data)}

    def describe(self, record: SessionRecord) -> dict[str, Any]:
        """The session record plus its live instances and clients, as plain data."""
        out = dataclasses.asdict(record)
        out["request_queue"] = self.names.request_queue(record.id)
        out["instances"] = [dataclasses.asdict(i) for i in self.store.instances(record.id)]
        out["clients"] = [
            ProgressStore(self.store.r, self.names, record.id, c).load().as_dict()
            for c in self.store.clients(record.id)
        ]
        out["load_errors"] = self.store.load_errors(record.id)
        out["allocated_units"] = len(out["instances"])
        out["target_units"] = self.store.targets().get(record.id, 0)
        out["outstanding"] = sum(c["outstanding"] for c in out["clients"])
        return out

    def get(self, params: dict[str, Any]) -> dict[str, Any]:
        """One session's record, instances and clients."""
        return self.describe(self._session(params))

    def list_sessions(self, params: dict[str, Any]) -> list[dict[str, Any]]:
        """Every open session, optionally only those of one service."""
        service = params.get("service")
        return [
            self.describe(r)
            for r in self.store.open_sessions()
            if service is None or r.service == service
        ]

    def hosts(self, params: dict[str, Any]) -> list[dict[str, Any]]:
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
        return [
            {
                **dataclasses.asdict(registered[h]),
                "assignments": {str(k): v for k, v in assignments[h].items()},
                "instances": running[h],
                "uptime": round(now - registered[h].started, 1),
                "heartbeat_age": round(max(0.0, now - registered[h].beat), 1),
            }
            for h in sorted(alive)
        ]

    def attach_client(self, params: dict[str, Any]) -> dict[str, Any]:
        """Declare the response queue of a client id; returns its name."""
        record = self._session(params)
        client_id = check_client_id(str(params.get("client_id", "")))
        spec = response_queue(self.names, record.id, client_id, record.durable)
        if record.state != "closed":  # a closed durable session only serves its responses
            self.channel.queue_declare(**spec.declare_kwargs())
            ProgressStore(self.store.r, self.names, record.id, client_id).create()
            self.store.add_client(record.id, client_id)
        elif client_id not in self.store.clients(record.id):
            raise SessionClosed(f"session {record.id} is closed and has no client {client_id!r}")
        return {
            "response_queue": spec.name,
            "request_queue": self.names.request_queue(record.id),
            "durable": record.durable,
            "state": record.state,
        }

    def close(self, params: dict[str, Any]) -> dict[str, Any]:
        """End a session; its hosts are freed by the next allocation.

        With `purge` (always, for interactive sessions) every queue and key goes. Without it, a
        durable session keeps its responses, readable by attaching, until closed with purge.
        """
        record = self._session(params)
        purge = bool(params.get("purge", True)) or not record.durable
        self.channel.queue_delete(queue=self.names.request_queue(record.id))
        if purge:
            for client_id in self.store.clients(record.id):
                self.channel.queue_delete(queue=self.names.response_queue(record.id, client_id))
            self.store.delete_session(record.id)
        else:
            self.store.save_session(dataclasses.replace(record, state="closed"))
        log.info("session_closed", session_id=record.id, service=record.service, purge=purge)
        self.on_change()
        return {"session_id": record.id, "state": "closed", "purged": purge}

    def purge_client(self, params: dict[str, Any]) -> dict[str, Any]:
        """Delete one client id's responses and counters; the session goes on."""
        record = self._session(params)
        client_id = check_client_id(str(params.get("client_id", "")))
        self.channel.queue_delete(queue=self.names.response_queue(record.id, client_id))
        self.store.forget_client(record.id, client_id)
        log.info("client_purged", session_id=record.id, client_id=client_id)
        return {"session_id": record.id, "client_id": client_id, "purged": True}
