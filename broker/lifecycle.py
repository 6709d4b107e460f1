"""Session life cycle: created -> active -> idle -> closed, with HPC Pack's timeouts.

- `client_connection_timeout`: a session no client id attached to this long after creation
  is closed.
- `client_idle_timeout`: a client handle (Session or BrokerClient) that has not beaten this
  long is gone (its process died or lost its network).
- `session_idle_timeout` (`durable_session_idle_timeout` for durable sessions): a session with
  no client handle left is closed after this long; 0 closes it at once.

Closing here always purges: nobody is left to read what it held.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import structlog

from soafarm.broker.store import BrokerStore
from soafarm.state.records import SessionActivity, SessionRecord

log = structlog.get_logger(__name__)


def idle_timeout(record: SessionRecord) -> float:
    """How long this session may stay without clients."""
    return record.broker_settings.idle_limit(record.durable)


def expire_sessions(
    store: BrokerStore, close: Callable[[SessionRecord, str], None], now: float
) -> None:
    """One pass of the life-cycle monitor over every open session."""
    for record in store.open_sessions():
        settings = record.broker_settings
        connected = store.connected_handles(record.id, now - settings.client_idle_timeout)
        if not store.clients(record.id):  # created: waiting for its first client id
            limit = settings.client_connection_timeout
            if now - record.created > limit:
                close(record, f"no client connected within client_connection_timeout ({limit:g}s)")
            continue
        if connected:
            if (record.activity, record.idle_since) != (SessionActivity.ACTIVE, 0.0):
                store.save_session(
                    dataclasses.replace(record, activity=SessionActivity.ACTIVE, idle_since=0.0)
                )
            continue
        since = record.idle_since or now
        if record.activity != SessionActivity.IDLE:
            store.save_session(
                dataclasses.replace(record, activity=SessionActivity.IDLE, idle_since=since)
            )
        limit = idle_timeout(record)
        if now - since >= limit:
            close(record, f"idle for {now - since:.0f}s without clients (idle timeout {limit:g}s)")
