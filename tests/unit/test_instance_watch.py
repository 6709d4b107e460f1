"""The instance's watchdog: a publish stalled while the instance drains still ends it."""

from __future__ import annotations

import types

import pytest
import redis

from soafarm.config import load_settings
from soafarm.workers import instance as instance_module
from soafarm.workers.instance import PUBLISH_STALL_LIMIT, InstanceSpec, ServiceInstance


class Ended(Exception):
    """Raised by the patched os._exit."""


def test_a_publish_stalled_in_the_drain_still_ends_the_instance(
    r: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance = ServiceInstance(load_settings(environ={}), InstanceSpec(1, "h.1.0", "h", "box"))
    stuck = types.SimpleNamespace(
        publish_watch=types.SimpleNamespace(stuck_for=lambda: PUBLISH_STALL_LIMIT + 1),
        watch=types.SimpleNamespace(busy_seconds=lambda: 0.0),
    )
    instance.loops = [stuck]  # type: ignore[list-item]
    instance.stop()  # draining: the watchdog used to return here, leaving the publish hung

    def end(code: int) -> None:
        raise Ended(code)

    monkeypatch.setattr(instance_module.os, "_exit", end)
    monkeypatch.setattr(instance_module.time, "sleep", lambda _s: None)
    with pytest.raises(Ended) as e:
        instance._watch(1, r)
    assert e.value.args == (instance_module.EXIT_TIMED_OUT,)
