"""Polling with a deadline, for conditions that live in other processes (Redis, RabbitMQ)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, Protocol

import pytest


def wait_until(what: str, check: Callable[[], Any], timeout: float = 60.0) -> Any:
    """Poll `check` until it returns something truthy and return that, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g}s waiting for {what}")
        time.sleep(0.02)
    return result


class _HasStatus(Protocol):
    def status(self) -> Any: ...


def counted(client: _HasStatus, n: int, timeout: float = 10.0) -> Any:
    """The client id's status once its done count reaches `n`, or the last one read at the
    deadline (the caller asserts on it). An instance counts a durable batch just after
    publishing its responses, so a client can read the last response before it is counted."""
    deadline = time.monotonic() + timeout
    while (status := client.status()).done < n and time.monotonic() < deadline:
        time.sleep(0.02)
    return status
