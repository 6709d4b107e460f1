"""One snapshot of the farm for people: what `soafarm dashboard` and `soafarm top` show.

Both ask the broker daemon the same two control requests as `soafarm sessions list` and
`soafarm hosts` (`ListArgs`, `HostsArgs`) and turn the replies into a `FarmView`: frozen
records of sessions (with each client id's progress), hosts, and responses/s and ETA worked
out by a `RateTracker` from how the done counts moved since earlier snapshots. `to_wire()`
gives the plain JSON the dashboard's page reads.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import structlog

from soafarm.cli.rates import RateTracker, eta
from soafarm.client.control import ControlClient
from soafarm.config import Settings
from soafarm.errors import SoafarmError
from soafarm.plain import to_plain
from soafarm.state.control import ClientStatus, HostInfo, HostList, HostsArgs, ListArgs, SessionInfo
from soafarm.state.control import SessionList as SessionListReply

log = structlog.get_logger(__name__)


@dataclass(frozen=True)
class ClientView:
    """One client id's batch in a session: responses done of its total (the sealed batch's
    size, else what was accepted so far), faults among them, speed and ETA (None while
    unknown, and with nothing sent yet)."""

    client_id: str
    done: int
    total: int
    faulted: int
    outstanding: int
    sealed: bool
    finished: bool
    rate: float | None
    eta: float | None


@dataclass(frozen=True)
class SessionView:
    """A session: its service, state, units, and progress over all its client ids."""

    id: int
    service: str
    version: str | None
    state: str
    durable: bool
    #: Instances running now against what the allocator gives it.
    allocated_units: int
    target_units: int
    done: int
    total: int
    faulted: int
    outstanding: int
    rate: float | None
    eta: float | None
    #: Why it fails, waits, or last grew or shrank ("" if nothing to say).
    why: str
    clients: tuple[ClientView, ...]


@dataclass(frozen=True)
class HostView:
    """A worker host, as a cell of the heat map."""

    id: str
    pool: str
    cores: int
    #: Service instances running on it (all sessions).
    instances: int
    #: Busy fraction of its instances' capacity over its last heartbeat; None while idle.
    utilisation: float | None
    #: "offline" or "draining" (set by an operator, or "draining" while it stops), else "".
    state: str
    heartbeat_age: float


@dataclass(frozen=True)
class FarmView:
    """The farm at one moment: its sessions and hosts, and what went wrong asking for them
    (`error` non-empty: the lists are the last ones that could be read)."""

    namespace: str
    #: When it was taken, in seconds since the epoch.
    taken: float
    sessions: tuple[SessionView, ...]
    hosts: tuple[HostView, ...]
    error: str = ""

    def to_wire(self) -> dict[str, Any]:
        """Plain JSON data: a map with namespace, taken, error, sessions (each with its
        clients) and hosts; unknown rates and ETAs are null."""
        plain: dict[str, Any] = to_plain(self)
        return plain


def _client_view(
    session_id: int, client: ClientStatus, tracker: RateTracker, now: float
) -> ClientView:
    total = client.total if client.sealed and client.total is not None else client.accepted
    rate = tracker.observe((session_id, client.client_id), client.done, now)
    return ClientView(
        client_id=client.client_id,
        done=client.done,
        total=total,
        faulted=client.faulted,
        outstanding=client.outstanding,
        sealed=client.sealed,
        finished=client.finished,
        rate=rate,
        eta=eta(total - client.done, rate) if total else None,
    )


def _why(info: SessionInfo) -> str:
    if info.record.error:
        return info.record.error
    if info.status is None:
        return ""
    return info.status.waiting or info.status.reason


def _session_view(info: SessionInfo, tracker: RateTracker, now: float) -> SessionView:
    sid = info.record.id
    clients = tuple(_client_view(sid, c, tracker, now) for c in info.clients)
    done = sum(c.done for c in clients)
    total = sum(c.total for c in clients)
    rate = tracker.observe(sid, done, now)
    return SessionView(
        id=sid,
        service=info.record.service,
        version=info.record.version,
        state=str(info.record.state),
        durable=info.record.durable,
        allocated_units=info.allocated_units,
        target_units=info.target_units,
        done=done,
        total=total,
        faulted=sum(c.faulted for c in clients),
        outstanding=info.outstanding,
        rate=rate,
        eta=eta(total - done, rate) if total else None,
        why=_why(info),
        clients=clients,
    )


def _host_view(host: HostInfo) -> HostView:
    record = host.record
    return HostView(
        id=record.id,
        pool=record.pool,
        cores=record.cores,
        instances=sum(host.instances.values()),
        utilisation=record.utilisation,
        state=host.admin or ("draining" if record.draining else ""),
        heartbeat_age=host.heartbeat_age,
    )


def build_view(
    namespace: str,
    sessions: SessionListReply,
    hosts: HostList,
    tracker: RateTracker,
    *,
    now: float,
    taken: float,
) -> FarmView:
    """The `FarmView` of one pair of replies; `tracker` has seen the earlier ones, `now` is
    its clock (monotonic) and `taken` the wall-clock time the page shows."""
    views = tuple(
        _session_view(s, tracker, now) for s in sorted(sessions.items, key=lambda s: s.record.id)
    )
    tracker.forget_others(
        [v.id for v in views] + [(v.id, c.client_id) for v in views for c in v.clients]
    )
    return FarmView(
        namespace=namespace,
        taken=taken,
        sessions=views,
        hosts=tuple(_host_view(h) for h in sorted(hosts.items, key=lambda h: h.record.id)),
    )


class FarmWatcher:
    """Takes `FarmView`s of one namespace, one after another, over one control connection
    (opened again after a failure); rates come from the views it took before.

    Not thread-safe: one thread calls `snapshot()`. `snapshot()` raises the broker's or the
    connection's `SoafarmError` (a command that shows one view fails with it);
    `snapshot_or_last()` instead returns the last view with `error` set, so a display that
    runs for hours outlives a broker restart.
    """

    def __init__(
        self,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        """Nothing connects until the first snapshot."""
        self.settings = settings
        self.tracker = RateTracker()
        self._clock = clock
        self._wall_clock = wall_clock
        self._control: ControlClient | None = None
        self._last: FarmView | None = None

    def snapshot(self) -> FarmView:
        """Ask the broker daemon for its sessions and hosts now; return them as a view."""
        try:
            if self._control is None:
                self._control = ControlClient(self.settings)
            sessions = self._control.request(ListArgs())
            hosts = self._control.request(HostsArgs())
        except Exception:
            self.close()  # its channel may be half-broken: the next snapshot starts afresh
            raise
        view = build_view(
            self.settings.namespace,
            sessions,
            hosts,
            self.tracker,
            now=self._clock(),
            taken=self._wall_clock(),
        )
        self._last = view
        return view

    def snapshot_or_last(self) -> FarmView:
        """`snapshot()`, or on failure the last view (empty at first) with the error."""
        try:
            return self.snapshot()
        except SoafarmError as e:
            error = str(e)
            log.warning("farm_view_failed", error=error)
        except Exception as e:  # a display that runs for hours shows what it cannot read
            error = f"{type(e).__name__}: {e}"
            log.exception("farm_view_failed", error=error)
        last = self._last or FarmView(self.settings.namespace, 0.0, (), ())
        return replace(last, error=error, taken=self._wall_clock())

    def close(self) -> None:
        """Close the control connection (a later snapshot opens another)."""
        control, self._control = self._control, None
        if control is not None:
            control.close()  # quietly: a broken connection has nothing left to save
