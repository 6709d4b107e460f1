"""A service that misbehaves on request, for tests and for trying out fault handling."""

from __future__ import annotations

import os
import time

from soafarm.errors import RetryOperationError
from soafarm.service import ServiceContext


class FaultyService:
    """Each operation fails in a different way; `ok` succeeds."""

    def __init__(self, context: ServiceContext) -> None:
        """Fail to load when the registration environment says so."""
        if context.environment.get("FAULTY_FAIL_INIT") == "1":
            raise RuntimeError("FaultyService told to fail at start-up")
        time.sleep(float(context.environment.get("FAULTY_INIT_SECONDS", "0")))
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

    def sleep_whoami(self, seconds: float) -> str:
        """Sleep, then return the id of the instance that ran the call."""
        time.sleep(seconds)
        return self.context.instance_id

    def crash(self) -> None:
        """Kill this service instance's process without a response."""
        os._exit(17)

    def crash_logged(self, path: str) -> None:
        """Append a line to `path` (one per execution), then crash the process."""
        _log_execution(path)
        os._exit(17)

    def retry_logged(self, path: str, succeed_after: int) -> int:
        """Append a line to `path`; ask for a retry until `path` has `succeed_after` lines."""
        executions = _log_execution(path)
        if executions < succeed_after:
            raise RetryOperationError(f"execution {executions}: not yet")
        return executions

    def sleep_logged(self, path: str, seconds: float) -> float:
        """Append a line to `path`, then sleep."""
        _log_execution(path)
        time.sleep(seconds)
        return seconds


def _log_execution(path: str) -> int:
    """Append one line to `path`; return how many lines it now has."""
    with open(path, "a+", encoding="utf-8") as fh:
        fh.write("x\n")
        fh.flush()
        fh.seek(0)
        return len(fh.readlines())
