"""Apply the allocator to Redis: forget lost hosts, compute targets, tell hosts what to run."""

from __future__ import annotations

import dataclasses

import structlog

from soafarm.broker.allocator import Demand, allocate, totals
from soafarm.broker.lifecycle import HOLDS_UNITS
from soafarm.broker.store import BrokerStore
from soafarm.resources import HostSize
from soafarm.state.records import SessionRecord, SessionState

log = structlog.get_logger(__name__)


def reconcile(store: BrokerStore) -> None:
    """One allocation round. Idempotent: with nothing changed it writes nothing."""
    registered, unreadable = store.scan_hosts()
    alive = store.alive(sorted({*registered, *unreadable}))
    for host_id in sorted(set(registered) - alive):
        instances = store.forget_host(host_id)
        log.warning("host_lost", host_id=host_id, instance_records_removed=instances)
    for host_id in unreadable:
        # a live host rewrites its record at its next beat; a dead one's garbage goes
        if host_id not in alive:
            store.forget_host(host_id)
            log.warning("host_record_removed", host_id=host_id, why="unreadable, no heartbeat")
    alive -= set(unreadable)
    # a draining host (being shrunk) finishes what it holds and gets nothing new
    sizes = {
        h: HostSize(registered[h].cores, registered[h].sockets)
        for h in alive
        if not registered[h].draining
    }
    # a closed (not purged) durable session keeps its responses but runs nothing, as does a
    # released one (until a client sends more); a failed one could not load its service
    # anywhere, or lost its queue
    sessions = [s for s in store.open_sessions() if s.state in HOLDS_UNITS]
    load_errors = {s.id: store.load_errors(s.id) for s in sessions}
    for s in sessions:
        if alive and alive <= set(load_errors[s.id]):
            why = next(iter(sorted(load_errors[s.id].items())))
            error = f"the service could not be loaded on any host ({why[0]}: {why[1]})"
            log.error("session_failed", session_id=s.id, error=error)
            _set_state(store, s, SessionState.FAILED, error)
    sessions = [s for s in sessions if not (alive and alive <= set(load_errors[s.id]))]
    outstanding = store.outstanding([s.id for s in sessions])
    demands = [
        Demand(
            s.id,
            s.min_units,
            s.max_units,
            s.priority,
            s.resource_unit,
            outstanding[s.id],
            running=s.state == SessionState.RUNNING,
        )
        for s in sessions
    ]
    current = store.assignments(sorted(alive))
    excluded = {sid: set(errors) for sid, errors in load_errors.items()}
    new = allocate(sizes, current, demands, excluded)
    new.update({h: {} for h in alive if h not in sizes})
    wanted = totals(new)
    targets = {s.id: wanted.get(s.id, 0) for s in sessions}
    if targets != store.targets():
        store.set_targets(targets)
    for host_id, assignment in new.items():
        if assignment != current.get(host_id, {}):
            log.info("host_assigned", host_id=host_id, assignment=assignment)
            store.set_assignments(host_id, assignment)
    for s in sessions:
        state = SessionState.RUNNING if wanted.get(s.id, 0) > 0 else SessionState.QUEUED
        if state != s.state:
            _set_state(store, s, state)


def _set_state(
    store: BrokerStore, record: SessionRecord, state: SessionState, error: str = ""
) -> None:
    """Change a session's state unless it left the states that hold units meanwhile (closed
    or released by a control request another daemon answered)."""

    def change(current: SessionRecord) -> SessionRecord | None:
        if current.state not in HOLDS_UNITS:
            return None
        return dataclasses.replace(current, state=state, error=error or current.error)

    store.update_session(record.id, change)
