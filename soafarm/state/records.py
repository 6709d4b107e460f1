"""Records kept in Redis and read by several processes (broker, worker hosts, clients via broker).

Stored as JSON strings: Redis is the control-path state, readable with `redis-cli` by an
operator; nothing here is the only copy of a request or a response.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Self

from soafarm.config import BrokerSettings
from soafarm.errors import DecodeError
from soafarm.plain import from_plain, to_plain


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (clients are built without decode_responses)."""
    # "replace": a key or member someone wrote with invalid UTF-8 must not stop a reader; the
    # text then fails the reader's own checks (a client id, a host id) and is skipped there
    return value.decode(errors="replace") if isinstance(value, bytes) else value


class SessionState(StrEnum):
    """Where a session is in its life (`soafarm sessions list` prints the value)."""

    #: Waiting for hosts: the allocator gives it no unit yet.
    QUEUED = "queued"
    #: At least one unit is allocated to it.
    RUNNING = "running"
    #: No live host could load its service.
    FAILED = "failed"
    #: A durable session closed without purge: it runs nothing, its responses stay readable.
    CLOSED = "closed"
    #: A durable session with nothing outstanding and no client for
    #: `durable_release_timeout`: its units went back to the farm; it stays readable and
    #: is queued again as soon as a client sends more.
    RELEASED = "released"


class SessionActivity(StrEnum):
    """Whether clients use a session, as the life-cycle monitor last saw it."""

    #: No client id attached yet (`client_connection_timeout` runs).
    CREATED = "created"
    #: Some client handle heartbeats.
    ACTIVE = "active"
    #: No client handle left (`session_idle_timeout` runs).
    IDLE = "idle"


class _JsonRecord:
    """Mixin: (de)serialise a dataclass as JSON, ignoring unknown fields (newer writers)."""

    def to_json(self) -> str:
        """JSON text of every field (enums as their values)."""
        return json.dumps(to_plain(self), separators=(",", ":"))

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        """Parse a record written by `to_json`; missing fields take their defaults."""
        where = f"corrupt {cls.__name__} record in Redis"
        try:
            data = json.loads(raw)
        except (ValueError, RecursionError) as e:  # not JSON, not UTF-8, nested too deep
            raise DecodeError(f"{where}: {e}") from None
        return from_plain(cls, data, where)


@dataclass(frozen=True)
class SessionRecord(_JsonRecord):
    """A session as the broker daemon keeps it."""

    id: int
    service: str
    version: str | None
    state: SessionState
    min_units: int
    max_units: int
    priority: int
    resource_unit: str
    created: float
    #: The RabbitMQ user that created it (taken by the broker from the connection, never
    #: from what the client says).
    owner: str
    #: The effective per-session settings, layered once at creation (records written before
    #: they were typed hold a partial map: missing keys take BrokerSettings' defaults).
    broker_settings: BrokerSettings = field(default_factory=BrokerSettings)
    include_exception_detail_in_faults: bool = False
    max_concurrent_calls: int = 0
    durable: bool = False
    error: str = ""
    activity: SessionActivity = SessionActivity.CREATED
    idle_since: float = 0.0
    shared: bool = False
    data: dict[str, str] = field(default_factory=dict)
    #: Durable sessions: since when it has had nothing outstanding and no client handle
    #: (0 while busy); its units are released `durable_release_timeout` after that.
    quiet_since: float = 0.0
    #: The job template whose defaults and limits were applied at creation.
    job_template: str = "Default"
    #: Node groups a host must all be in to serve it (its pool, a label key or key=value);
    #: empty: any host.
    node_groups: tuple[str, ...] = ()
    #: With `shared`: the users admitted besides the owner (empty: every user).
    share_with: tuple[str, ...] = ()
    #: The creating process's token (`ControlClient.creator`): a create whose answer was
    #: lost is closed by it (`close_owned`).
    creator: str = ""


@dataclass(frozen=True)
class SessionStatus(_JsonRecord):
    """What the allocator last decided for a session and why (`sessions show` prints it):
    written by the leading broker daemon only."""

    #: Units the session's load asks for (min_units..max_units): grows at once above the
    #: grow threshold, shrinks at most every `allocation_adjust_interval` below the shrink one.
    target: int
    #: Why its target is what it is (the last grow or shrink; "" before the first).
    reason: str = ""
    #: Why it is queued (or holds fewer units than its target): "" when it is not waiting.
    waiting: str = ""
    #: 100 x outstanding / (units x capacity per unit) at the last write; None with no unit.
    load_ratio: int | None = None
    #: When `target` last changed and when this status was written (seconds since the epoch).
    changed: float = 0.0
    written: float = 0.0


@dataclass(frozen=True)
class LoadError(_JsonRecord):
    """Why a session's service failed to load on one host, when, and how many times in a row
    (the allocator excludes the host for `end_point_not_found_retry_period` after each)."""

    why: str
    at: float = 0.0
    tries: int = 1

    @classmethod
    def parse(cls, raw: bytes | str) -> LoadError:
        """A stored load error; plain text (written before errors had times) counts as one
        failure long ago."""
        text = as_text(raw)
        if text.startswith("{"):
            try:
                return cls.from_json(text)
            except DecodeError:
                pass
        return cls(text)


@dataclass(frozen=True)
class HostRecord(_JsonRecord):
    """A worker host as it registered itself."""

    id: str
    hostname: str
    pid: int
    cores: int
    started: float
    sockets: int = 1
    memory_mb: int = 0
    pool: str = "default"
    labels: dict[str, str] = field(default_factory=dict)
    #: Stopping: finishing what it holds; the allocator gives it nothing new.
    draining: bool = False
    #: Busy fraction of its instances' capacity over their last report interval; None while
    #: no instance serves (or none has reported twice yet).
    utilisation: float | None = None
    #: When this record was written (the heartbeat), in seconds since the epoch.
    beat: float = 0.0
    #: Where its Prometheus endpoint answers ("" with metrics off or unbound).
    metrics_url: str = ""


@dataclass(frozen=True)
class InstanceRecord(_JsonRecord):
    """A running service instance of a session."""

    id: str
    host_id: str
    pid: int
    started: float
    capacity: int = 1
