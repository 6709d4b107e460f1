"""A service that misbehaves on request, for tests and for trying out fault handling."""

from __future__ import annotations

import os
import time

from soafarm.service import ServiceContext


class FaultyService:
    """Each operation fails in a different way; `ok` succeeds."""

    def __init__(self, context: ServiceContext) -> None:
        """Fail to load when the registration environment says so."""
        if context.environment.get("FAULTY_FAIL_INIT") == "1":
            raise RuntimeError("FaultyService told to fail at start-up")
        self.context = context

    def ok(self, value: object) -> object:
        """Return `value` unchanged."""
        return value

    def fail(self, message: str) -> None:
        """Raise ValueError(message): comes back as a fault response."""
        raise ValueError(message)

    def sleep(self, seconds: float) -> float:
        """Sleep, then return the seconds slept."""
        time.sleep(seconds)
        return seconds

    def unencodable(self) -> object:
        """Return a value msgpack cannot encode."""
        return object()

    def crash(self) -> None:
        """Kill this service instance's process without a response."""
        os._exit(17)
