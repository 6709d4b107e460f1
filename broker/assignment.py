"""Apply the allocator to Redis: forget lost hosts, compute targets, tell hosts what to run."""

from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass, field
from typing import Any

import structlog

from soafarm.broker import grow_shrink, node_groups
from soafarm.broker.allocator import Demand, allocate, totals
from soafarm.broker.lifecycle import HOLDS_UNITS
from soafarm.broker.store import BrokerStore
from soafarm.broker.waiting import waiting_reason
from soafarm.resources import RESOURCE_UNITS, HostSize, capacity, units_per_host
from soafarm.state.batch import Batch, Later
from soafarm.state.records import (
    HostRecord,
    LoadError,
    SessionRecord,
    SessionState,
    SessionStatus,
)

log = structlog.get_logger(__name__)

#: Seconds the leader reuses a session's outstanding work and load errors between reads
#: (a new session's are read at once): the allocator shares spare units by outstanding work
#: rounded to a power of two, so a second's lag moves nothing that matters, and reading
#: them for every open session four times a second was most of an idle farm's Redis load.
FACTS_MAX_AGE = 1.0

#: Seconds a host that failed to load a session's service is excluded at least, whatever
#: the session's `end_point_not_found_retry_period`: the leader may read a load error up to
#: FACTS_MAX_AGE (and a round) after it was written, and an exclusion that ended before it
#: was seen would never drop the host's assignment (the host holds it, not retrying).
MIN_LOAD_EXCLUSION = FACTS_MAX_AGE + 1.0

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
    #: Every session's status as the leader last wrote it (None: read the hash). The leader
    #: is their only writer, so it need not read them back each round (1,000 open sessions
    #: made that a 1,000-field hash parsed after every create and close).
    statuses: dict[int, SessionStatus] | None = None
    #: When every session's status was last worked out (`time.time()`): between two such
    #: rounds (facts_max_age apart, when the outstanding work they depend on is read again)
    #: only new sessions' are.
    statuses_at: float = -math.inf
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
        *,
        mode: str = "balanced",
        offline: frozenset[str] | set[str] = frozenset(),
    ) -> dict[str, dict[int, int]]:
        """`allocate(...)`, or its last result again when its inputs are the same."""
        inputs = (sizes, current, demands, excluded, mode, offline)
        if inputs != self.inputs:
            self.inputs = inputs
            self.result = allocate(sizes, current, demands, excluded, mode=mode, offline=offline)
        return {h: dict(a) for h, a in self.result.items()}


@dataclass(frozen=True)
class _Hosts:
    """The live hosts as a round sees them."""

    records: dict[str, HostRecord]
    #: Hosts taking work (not draining), with their sizes.
    sizes: dict[str, HostSize]
    #: Hosts an operator took offline: they keep what they run and take nothing new.
    offline: set[str]
    current: dict[str, dict[int, int]]


@dataclass(slots=True)  # not frozen: see Demand
class _Facts:
    """One session as a round sees it."""

    record: SessionRecord
    outstanding: int
    #: Live hosts outside its node groups, and those in them.
    outside: set[str]
    mine: set[str]
    load_errors: dict[str, LoadError]
    #: Host -> when its exclusion for a load failure ends (only hosts excluded now).
    excluded_until: dict[str, float]

    @property
    def failed(self) -> str:
        """The error of a session whose service failed to load on every live host it may
        use, again after a retry (so twice on each); "" otherwise."""
        return _failed_everywhere(self)


def _read_hosts(store: BrokerStore, first: Batch) -> tuple[Later[Any], Later[dict[str, str]]]:
    """Queue the reads of the hosts' records and their admin states on `first`."""
    return store.host_records.read_hosts(first), store.host_records.read_admin(first)


def _live_hosts(
    store: BrokerStore, hosts_read: Later[Any], admin_read: Later[dict[str, str]]
) -> _Hosts:
    """The live hosts (one more round trip: heartbeats and assignments); lost hosts and
    unreadable records of dead hosts are forgotten."""
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
    admin = admin_read.value
    # a draining host (being shrunk, or drained by an operator) finishes what it holds and
    # gets nothing new; an offline one keeps what it runs and gets nothing new
    sizes = {
        h: HostSize(registered[h].cores, registered[h].sockets)
        for h in alive
        if not registered[h].draining and admin.get(h) != "draining"
    }
    return _Hosts(
        records={h: registered[h] for h in alive},
        sizes=sizes,
        offline={h for h in sizes if admin.get(h) == "offline"},
        current={h: a for h, a in assignments_read.value.items() if h in alive},
    )


def _session_facts(
    store: BrokerStore,
    memo: RoundMemo | None,
    hosts: _Hosts,
    sessions: list[SessionRecord],
    now: float,
) -> list[_Facts]:
    """Each session's outstanding work, node-group and load-failure exclusions: outstanding
    work and load errors of every session in one script call (per 250), so a round's Redis
    calls do not grow with the number of open sessions."""
    ids = [s.id for s in sessions]
    facts = memo.facts_of(store, ids) if memo else store.sessions.demand_facts(ids)
    out = []
    # shared by the sessions with no node group and no load error, most of them: a round
    # over 1,000 idle sessions must not build 4,000 empty containers
    everywhere, nowhere = set(hosts.records), set[str]()
    for s in sessions:
        outstanding, raw_errors = facts[s.id]
        errors, until = {}, {}
        if raw_errors:
            errors = {h: LoadError.parse(why) for h, why in raw_errors.items()}
            # a host that failed to load the service is left out for the session's
            # end_point_not_found_retry_period, then tried again
            period = max(s.broker_settings.end_point_not_found_retry_period, MIN_LOAD_EXCLUSION)
            until = {h: e.at + period for h, e in errors.items() if now < e.at + period}
        outside, mine = nowhere, everywhere
        if s.node_groups:
            outside = node_groups.outside(hosts.records, s.node_groups)
            mine = everywhere - outside
        out.append(_Facts(s, outstanding, outside, mine, errors, until))
    return out


def reconcile(
    store: BrokerStore,
    memo: RoundMemo | None = None,
    mode: str = "queued",
    now: float | None = None,
) -> None:
    """One allocation round. Idempotent: with nothing changed it writes nothing. With
    `memo` (the leader's), it reuses what the previous rounds read as `RoundMemo` says;
    `mode` is the scheduler's ("queued" or "balanced")."""
    now = time.time() if now is None else now
    # the hosts, the targets and the statuses in one round trip, the heartbeats and the
    # assignments in one more (the assignments of hosts found dead are not used)
    first = store.batch()
    hosts_read, admin_read = _read_hosts(store, first)
    targets_read = store.sessions.read_targets(first)
    known = memo.statuses if memo else None
    statuses_read = store.sessions.read_statuses(first) if known is None else None
    first.run()
    hosts = _live_hosts(store, hosts_read, admin_read)
    # a closed (not purged) durable session keeps its responses but runs nothing, as does a
    # released one (until a client sends more); a failed one could not load its service
    # anywhere, or lost its queue
    open_ = [s for s in store.open_sessions() if s.state in HOLDS_UNITS]
    sessions = []
    for f in _session_facts(store, memo, hosts, open_, now):
        failed = f.failed
        if failed:
            log.error("session_failed", session_id=f.record.id, error=failed)
            _set_state(store, f.record, SessionState.FAILED, failed)
        else:
            sessions.append(f)
    previous = (known or {}) if statuses_read is None else statuses_read.value
    every = memo is None or now - memo.statuses_at >= memo.facts_max_age
    statuses = _next_statuses(hosts, sessions, previous, now, every)
    if memo and every:
        memo.statuses_at = now
    demands = [
        Demand(
            f.record.id,
            f.record.min_units,
            statuses[f.record.id].target,
            f.record.priority,
            f.record.resource_unit,
            f.outstanding,
            running=f.record.state == SessionState.RUNNING,
        )
        for f in sessions
    ]
    excluded = {
        f.record.id: f.outside | set(f.excluded_until)
        for f in sessions
        if f.outside or f.excluded_until
    }
    place = memo.allocate if memo else allocate
    new = place(hosts.sizes, hosts.current, demands, excluded, mode=mode, offline=hosts.offline)
    new.update({h: {} for h in hosts.records if h not in hosts.sizes})
    wanted = totals(new)
    # sessions given no unit are left out: the hash stays as small as the farm, not as the
    # number of open sessions (readers take a missing session as 0)
    targets = {f.record.id: wanted[f.record.id] for f in sessions if wanted.get(f.record.id)}
    if targets != targets_read.value:
        store.set_targets(targets)
    for host_id, assignment in new.items():
        if assignment != hosts.current.get(host_id, {}):
            log.info("host_assigned", host_id=host_id, assignment=assignment)
            store.set_assignments(host_id, assignment)
    written = _write_statuses(store, hosts, sessions, statuses, previous, wanted, now)
    if memo:
        memo.statuses = written
    for f in sessions:
        state = SessionState.RUNNING if wanted.get(f.record.id, 0) > 0 else SessionState.QUEUED
        if state != f.record.state:
            _set_state(store, f.record, state)


def _next_statuses(
    hosts: _Hosts,
    sessions: list[_Facts],
    previous: dict[int, SessionStatus],
    now: float,
    every: bool = True,
) -> dict[int, SessionStatus]:
    """Each session's grow/shrink target from its load (`broker.grow_shrink`); unless
    `every`, only of the sessions with no status yet (the others keep theirs)."""
    if not every:
        stale = [f for f in sessions if f.record.id not in previous]
        kept = {f.record.id: previous[f.record.id] for f in sessions if f.record.id in previous}
        return {**kept, **(_next_statuses(hosts, stale, previous, now) if stale else {})}
    held = totals(hosts.current)
    largest = max(hosts.sizes.values(), key=lambda z: z.cores, default=HostSize(1))
    # per resource unit, not per session: 1,000 sessions of one unit share the answers
    ceilings = {u: sum(units_per_host(u, z) for z in hosts.sizes.values()) for u in RESOURCE_UNITS}
    capacities = {u: capacity(u, largest) for u in RESOURCE_UNITS}
    return {
        f.record.id: grow_shrink.next_status(
            f.record,
            previous.get(f.record.id),
            units=held.get(f.record.id, 0),
            outstanding=f.outstanding,
            capacity=f.record.max_concurrent_calls or capacities[f.record.resource_unit],
            now=now,
            ceiling=ceilings[f.record.resource_unit],
        )
        for f in sessions
    }


def _write_statuses(  # noqa: PLR0917 - the round's parts, in its order
    store: BrokerStore,
    hosts: _Hosts,
    sessions: list[_Facts],
    statuses: dict[int, SessionStatus],
    previous: dict[int, SessionStatus],
    wanted: dict[int, int],
    now: float,
) -> dict[int, SessionStatus]:
    """Write the statuses worth writing (`grow_shrink.worth_writing`), each with why the
    session waits when it got no unit, and drop those of sessions no longer open; return
    every open session's status as stored now."""
    changed: dict[int, SessionStatus] = {}
    for f in sessions:
        sid = f.record.id
        waiting = ""
        if not wanted.get(sid) and (f.record.min_units > 0 or f.outstanding > 0):
            waiting = waiting_reason(
                f.record,
                hosts.records,
                hosts.sizes,
                outside=f.outside,
                load_errors=f.load_errors,
                excluded_until=f.excluded_until,
                now=now,
            )
        status = statuses[sid]
        if status.waiting != waiting:
            status = dataclasses.replace(status, waiting=waiting)
        old = previous.get(sid)
        if grow_shrink.worth_writing(
            status, old, now, f.record.broker_settings.status_update_interval
        ):
            if old is not None and status.target != old.target:
                log.info("session_target", session_id=sid, target=status.target, why=status.reason)
            changed[sid] = dataclasses.replace(status, written=now)
    gone = [sid for sid in previous if sid not in statuses]
    if changed or gone:
        store.sessions.set_statuses(changed, gone)
    return {**{sid: previous[sid] for sid in statuses if sid in previous}, **changed}


def _failed_everywhere(facts: _Facts) -> str:
    """See `_Facts.failed`."""
    mine, until, errors = facts.mine, facts.excluded_until, facts.load_errors
    if not until or not mine or not all(h in until and errors[h].tries >= 2 for h in mine):
        return ""
    host = sorted(mine)[0]
    return (
        "the service could not be loaded on any host it may use, twice each "
        f"({host}: {errors[host].why})"
    )


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
