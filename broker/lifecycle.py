"""Session life cycle: created -> active -> idle -> closed, with HPC Pack's timeouts.

- `client_connection_timeout`: a session no client id attached to this long after creation
  is closed.
- `client_idle_timeout`: a client handle (Session or BrokerClient) that has not beaten this
  long is gone (its process died or lost its network). And a client id (its BrokerClient
  handles) that has sent nothing and read nothing for this long while it had nothing
  outstanding is disconnected: its handles stop counting and its next send or read raises
  `ClientIdleTimeout` (decided in the same script call that reads the handles, see
  `SessionStore.sweep_activity`). Nothing of it is purged: a durable client id attaches
  again and reads everything. 0: no limit (a silent handle is still gone after
  SILENT_HANDLE_LIMIT: its process died).
- `session_idle_timeout` (`durable_session_idle_timeout` for durable sessions): a session with
  no client handle left is closed after this long; 0 closes it at once.
- `durable_release_timeout`: a durable session with nothing outstanding and no client handle
  for this long is `released`: its units go back to the farm (a failed submit, or a batch
  that is finished and unread, must not hold a core for the 48 h of its idle timeout), it
  stays readable, and it is queued for units again as soon as a client sends more.

Closing here always purges: nobody is left to read what it held.

The sweep also fails sessions whose request queue vanished (`fail_vanished_sessions`): a
RabbitMQ restart loses interactive sessions' classic queues, and such a session would
otherwise stay `running` for ever, its hosts restarting instances that find no queue.

Every change is a compare-and-set (`BrokerStore.update_session`) made only if the record is
still in the state the decision was based on, so a close answered meanwhile by another
broker daemon is never undone.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Collection

import structlog

from soafarm.broker.store import BrokerStore
from soafarm.state.records import SessionActivity, SessionRecord, SessionState

log = structlog.get_logger(__name__)

#: States in which a session holds (or waits for) units.
HOLDS_UNITS = (SessionState.QUEUED, SessionState.RUNNING)

#: A durable (quorum) request queue survives a RabbitMQ restart; one found missing is failed
#: only after it stayed missing this long (a queue recovering after a restart must not fail
#: its session). An interactive session's queue is failed at the first miss: nothing
#: recreates it.
DURABLE_QUEUE_GRACE = 10.0


#: With `client_idle_timeout` 0 (no idle limit), a client handle silent this long still
#: counts as gone: its process died (its heartbeat beats every 10 s then).
SILENT_HANDLE_LIMIT = 300.0


#: A session's client ids are checked against `client_idle_timeout` about this many times
#: per limit (and at least at every sweep's second): the times it compares are written by
#: the clients and workers themselves, so a check that comes later only disconnects later
#: (by a tenth of the limit at most), and 1,000 sessions of idle clients cost the sweep's
#: script a tenth of what checking them every second would.
IDLE_CHECKS_PER_LIMIT = 10


def idle_check_due(record: SessionRecord, now: float, interval: float = 1.0) -> bool:
    """True when this sweep (the previous one `interval` seconds ago) checks the session's
    client ids for `client_idle_timeout`: once per tenth of the limit, at a phase of its
    own (the sessions' checks spread over the rounds), no state kept between sweeps."""
    limit = record.broker_settings.client_idle_timeout
    if limit <= 0:
        return False
    period = max(limit / IDLE_CHECKS_PER_LIMIT, interval)
    phase = (record.id * 0.6180339887) % 1.0 * period
    return math.floor((now + phase) / period) != math.floor((now - interval + phase) / period)


def silent_limit(record: SessionRecord) -> float:
    """How long a client handle may go without beating before it no longer counts."""
    limit = record.broker_settings.client_idle_timeout
    return limit if limit > 0 else SILENT_HANDLE_LIMIT


def idle_timeout(record: SessionRecord) -> float:
    """How long this session may stay without clients."""
    return record.broker_settings.idle_limit(record.durable)


def release_step(
    record: SessionRecord, connected: int, outstanding: int, now: float
) -> tuple[SessionState, float]:
    """The (state, quiet_since) a durable session should have now: released once it had
    nothing outstanding and no client handle for `durable_release_timeout`, queued again as
    soon as something is outstanding. Other sessions keep theirs."""
    if not record.durable:
        return record.state, record.quiet_since
    if record.state == SessionState.RELEASED:
        return (SessionState.QUEUED, 0.0) if outstanding else (record.state, record.quiet_since)
    if record.state not in HOLDS_UNITS:
        return record.state, record.quiet_since
    if connected or outstanding:
        return record.state, 0.0
    since = record.quiet_since or now
    if now - since >= record.broker_settings.durable_release_timeout:
        return SessionState.RELEASED, since
    return record.state, since


def expire_sessions(
    store: BrokerStore, close: Callable[[SessionRecord, str], None], now: float
) -> None:
    """One pass of the life-cycle monitor over every open session.

    Every session's live handles and client ids come from one script call (per 250
    sessions): a round trip per session and key cost a leader with 1,000 idle sessions most
    of a core.
    """
    records = store.open_sessions()
    activity, disconnected = store.sessions.sweep_activity(
        {r.id: now - silent_limit(r) for r in records},
        {
            r.id: now - r.broker_settings.client_idle_timeout
            for r in records
            if idle_check_due(r, now)
        },
        now,
    )
    for gone in disconnected:
        log.info(
            "client_idle_disconnected",
            session_id=gone.session_id,
            client_id=gone.client_id,
            idle_for=gone.idle_for,
            why="nothing sent, read or outstanding for client_idle_timeout",
        )
    durable = [
        r.id for r in records if r.durable and r.state in (*HOLDS_UNITS, SessionState.RELEASED)
    ]
    outstanding = (
        {sid: n for sid, (n, _errors) in store.sessions.demand_facts(durable).items()}
        if durable
        else {}
    )
    for record in records:
        settings = record.broker_settings
        connected, has_clients = activity[record.id]
        state, quiet_since = release_step(record, connected, outstanding.get(record.id, 0), now)
        if not has_clients:  # created: waiting for its first client id
            _apply(store, record, state=state, quiet_since=quiet_since)
            limit = settings.client_connection_timeout
            if now - record.created > limit:
                close(record, f"no client connected within client_connection_timeout ({limit:g}s)")
            continue
        if connected:
            _apply(
                store,
                record,
                activity=SessionActivity.ACTIVE,
                idle_since=0.0,
                state=state,
                quiet_since=quiet_since,
            )
            continue
        since = record.idle_since or now
        _apply(
            store,
            record,
            activity=SessionActivity.IDLE,
            idle_since=since,
            state=state,
            quiet_since=quiet_since,
        )
        limit = idle_timeout(record)
        if now - since >= limit:
            close(record, f"idle for {now - since:.0f}s without clients (idle timeout {limit:g}s)")


def _apply(store: BrokerStore, record: SessionRecord, **changes: object) -> None:
    """Store `changes` if any differs, unless the session changed state meanwhile."""
    if all(getattr(record, k) == v for k, v in changes.items()):
        return
    new_state = changes.get("state", record.state)

    def change(current: SessionRecord) -> SessionRecord | None:
        if current.state != record.state:  # closed or failed meanwhile: next round decides
            return None
        return dataclasses.replace(current, **changes)  # type: ignore[arg-type]

    updated = store.update_session(record.id, change)
    if updated is not None and new_state != record.state and updated.state == new_state:
        if new_state == SessionState.RELEASED:
            log.info(
                "session_units_released",
                session_id=record.id,
                why="durable, nothing outstanding and no client for durable_release_timeout",
            )
        elif record.state == SessionState.RELEASED:
            log.info("session_units_wanted", session_id=record.id, why="requests outstanding")


def fail_vanished_sessions(
    store: BrokerStore,
    queue_exists: Callable[[str], bool],
    now: float,
    missing_since: dict[int, float],
    only: Collection[int] | None = None,
) -> list[int]:
    """Fail every runnable session whose request queue is gone from RabbitMQ (freeing its
    units; its clients see the reason); returns their ids. `missing_since` carries, between
    calls, when each durable session's queue was first found missing. With `only`, the
    queues of those sessions alone are checked (the others' are left for another call)."""
    failed: list[int] = []
    seen: set[int] = set()
    for record in store.open_sessions():
        if record.state not in (*HOLDS_UNITS, SessionState.RELEASED):
            continue
        seen.add(record.id)
        if only is not None and record.id not in only:
            continue
        queue = store.names.request_queue(record.id)
        if queue_exists(queue):
            missing_since.pop(record.id, None)
            continue
        first = missing_since.setdefault(record.id, now)
        if record.durable and now - first < DURABLE_QUEUE_GRACE:
            continue
        error = (
            f"its request queue {queue} is gone from RabbitMQ"
            + (
                " (deleted outside soafarm?)"
                if record.durable
                else " (a RabbitMQ restart loses interactive sessions' queues, which are not"
                " durable, as does stopping the cluster node that holds them)"
            )
            + "; requests without a response are lost: create a new session"
        )

        def change(current: SessionRecord, error: str = error) -> SessionRecord | None:
            if current.state not in (*HOLDS_UNITS, SessionState.RELEASED):
                return None  # closed meanwhile: its queue was deleted on purpose
            return dataclasses.replace(current, state=SessionState.FAILED, error=error)

        updated = store.update_session(record.id, change)
        missing_since.pop(record.id, None)
        if updated is not None and updated.state == SessionState.FAILED:
            log.error("session_failed", session_id=record.id, error=error)
            failed.append(record.id)
    for sid in set(missing_since) - seen:
        del missing_since[sid]
    return failed
