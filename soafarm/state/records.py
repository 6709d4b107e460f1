"""Records kept in Redis and read by several processes (broker, worker hosts, clients via broker).

Stored as JSON strings: Redis is the control-path state, readable with `redis-cli` by an
operator; nothing here is the only copy of a request or a response.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any, Self

from soafarm.errors import DecodeError


def as_text(value: bytes | str) -> str:
    """A Redis reply as text (clients are built without decode_responses)."""
    return value.decode() if isinstance(value, bytes) else value


class _JsonRecord:
    """Mixin: (de)serialise a flat dataclass as JSON, ignoring unknown fields (newer writers)."""

    def to_json(self) -> str:
        """JSON text of every field."""
        return json.dumps(dataclasses.asdict(self), separators=(",", ":"))  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, raw: bytes | str) -> Self:
        """Parse a record written by `to_json`."""
        try:
            data = json.loads(raw)
            known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
            return cls(**{k: v for k, v in data.items() if k in known})
        except (ValueError, TypeError) as e:
            raise DecodeError(f"corrupt {cls.__name__} record in Redis: {e}") from None


@dataclass(frozen=True)
class SessionRecord(_JsonRecord):
    """A session as the broker daemon keeps it."""

    id: int
    service: str
    version: str | None
    state: str
    min_units: int
    max_units: int
    priority: int
    resource_unit: str
    created: float
    owner: str
    broker_settings: dict[str, Any] = field(default_factory=dict)
    include_exception_detail_in_faults: bool = False
    max_concurrent_calls: int = 0
    durable: bool = False
    error: str = ""
    activity: str = "created"
    idle_since: float = 0.0
    shared: bool = False
    data: dict[str, str] = field(default_factory=dict)


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


@dataclass(frozen=True)
class InstanceRecord(_JsonRecord):
    """A running service instance of a session."""

    id: str
    host_id: str
    pid: int
    started: float
    capacity: int = 1
