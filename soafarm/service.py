"""What a service author sees: the context a service instance is constructed with.

A service is a plain Python class; its public methods are its operations. It is constructed
once per service instance, so it can load data at start-up:

    class Pricer:
        def __init__(self, context: ServiceContext) -> None:
            self.curves = load_curves(context.environment["CURVES"])

        def price(self, option: dict) -> float:
            ...
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class ServiceContext:
    """Where a service instance runs: its session, host, instance id and environment."""

    session_id: int
    host_name: str
    instance_id: str
    service_name: str
    service_version: str | None = None
    environment: dict[str, str] = field(default_factory=dict)


def operations_of(cls: type) -> frozenset[str]:
    """The operation names of a service class: its public callables."""
    return frozenset(
        name
        for name, member in inspect.getmembers(cls)
        if not name.startswith("_") and callable(member)
    )


def construct(cls: type, context: ServiceContext) -> Any:
    """Build a service instance, passing the context if the constructor takes an argument."""
    try:
        params = inspect.signature(cls).parameters
    except (TypeError, ValueError):
        params = {}  # type: ignore[assignment]
    return cls(context) if params else cls()
