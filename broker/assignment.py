"""Apply the allocator to Redis: forget lost hosts, compute targets, tell hosts what to run."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field

import structlog

from soafarm.broker.allocator import Demand, allocate, totals
from soafarm.broker.lifecycle import HOLDS_UNITS
from soafarm.broker.store import BrokerStore
from soafarm.resources import HostSize
from soafarm.state.records import SessionRecord, SessionState

log = structlog.get_logger(__name__)

#: Seconds the leader reuses a session's outstanding work and load errors between reads
#: (a new session's are read at once): the allocator shares spare units by outstanding work
#: rounded to a power of two, so a second's lag moves nothing that matters, and reading
#: them for every open session four times a second was most of an idle farm's Redis load.
FACTS_MAX_AGE = 1.0

Facts = dict[int, tuple[int, dict[str, str]]]


@dataclass
class RoundMemo:
    """What the leader's previous allocation rounds read and decided, so that a round with
    nothing new reads and computes little (the broker daemon keeps one; without it every
    round reads and computes everything)."""

    facts_max_age: float = FACTS_MAX_AGE
    #: Outstanding work and load errors per session, read at `facts_at` (monotonic).
    facts: Facts = field(default_factory=dict)
    facts_at: float = -math.inf
    #: The allocator's last inputs and result.
    inputs: tuple[object, ...] | None = None
    result: dict[str, dict[int, int]] = field(default_factory=dict)

    def facts_of(self, store: BrokerStore, session_ids: list[int]) -> Facts:
        """Every session's facts: all read again once they are `facts_max_age` old, else
        only those of sessions not seen before."""
        now = time.monotonic()
        if now - self.facts_at > self.facts_max_age:
            self.facts, self.facts_at = store.sessions.demand_facts(session_ids), now
            return self.facts
        new = [sid for sid in session_ids if sid not in self.facts]
        known = {sid: self.facts[sid] for sid in session_ids if sid in self.facts}
        self.facts = {**known, **store.sessions.demand_facts(new)} if new else known
        return self.facts

    def allocate(
        self,
        sizes: dict[str, HostSize],
        current: dict[str, dict[int, int]],
        demands: list[Demand],
        excluded: dict[int, set[str]],
    ) -> dict[str, dict[int, int]]:
        """`allocate(...)`, or its last result again when its inputs are the same."""
        inputs = (sizes, current, demands, excluded)
        if inputs != self.inputs:
            self.inputs, self.result = inputs, allocate(sizes, current, demands, excluded)
        return {h: dict(a) for h, a in self.result.items()}


def reconcile(store: BrokerStore, memo: RoundMemo | None = None) -> None:
    """One allocation round. Idempotent: with nothing changed it writes nothing. With
    `memo` (the leader's), it reuses what the previous rounds read as `RoundMemo` says."""
    # the hosts and the targets in one round trip, the heartbeats and the assignments in
    # one more (the assignments of hosts found dead are not used)
    first = store.batch()
    hosts_read = store.host_records.read_hosts(first)
    targets_read = store.sessions.read_targets(first)
    first.run()
    registered, unreadable = hosts_read.value
    second = store.batch()
    alive_read = store.host_records.read_alive(second, sorted({*registered, *unreadable}))
    assignments_read = store.host_records.read_assignments(second, sorted(registered))
    second.run()
    alive = alive_read.value
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
    # outstanding work and load errors of every session in one script call (per 250): a
    # round's Redis calls do not grow with the number of open sessions
    ids = [s.id for s in sessions]
    facts = memo.facts_of(store, ids) if memo else store.sessions.demand_facts(ids)
    load_errors = {sid: errors for sid, (_outstanding, errors) in facts.items()}
    for s in sessions:
        if alive and alive <= set(load_errors[s.id]):
            why = next(iter(sorted(load_errors[s.id].items())))
            error = f"the service could not be loaded on any host ({why[0]}: {why[1]})"
            log.error("session_failed", session_id=s.id, error=error)
            _set_state(store, s, SessionState.FAILED, error)
    sessions = [s for s in sessions if not (alive and alive <= set(load_errors[s.id]))]
    outstanding = {sid: n for sid, (n, _errors) in facts.items()}
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
    current = {h: a for h, a in assignments_read.value.items() if h in alive}
    excluded = {sid: set(errors) for sid, errors in load_errors.items()}
    new = (memo.allocate if memo else allocate)(sizes, current, demands, excluded)
    new.update({h: {} for h in alive if h not in sizes})
    wanted = totals(new)
    # sessions given no unit are left out: the hash stays as small as the farm, not as the
    # number of open sessions (readers take a missing session as 0)
    targets = {s.id: wanted[s.id] for s in sessions if wanted.get(s.id, 0) > 0}
    if targets != targets_read.value:
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
