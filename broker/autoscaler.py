"""The autoscaler loop: sample load, adjust the pools, tell the provisioners.

Every `load_sampling_interval` it reads each open session's outstanding requests from Redis
(the clients' progress counters: accepted minus answered); every
`allocation_adjust_interval` it turns their mean into hosts per pool (`broker.scaling`). It
adjusts at once, without waiting for the interval, when work waits and no instance serves it
(growing from zero must not wait half a minute). Hosts are stopped through their provisioner,
which drains them: running calls finish, requests not started go back to the queue.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence

import redis
import structlog

from soafarm.broker.metrics import AutoscalerMetrics
from soafarm.broker.scaling import SessionLoad, load_ratio, pool_targets
from soafarm.broker.store import BrokerStore
from soafarm.config import Settings
from soafarm.errors import SoafarmError
from soafarm.metrics import Health, serve_metrics
from soafarm.names import Names
from soafarm.provisioning import Provisioner
from soafarm.resources import HostSize
from soafarm.state.records import SessionRecord, SessionState
from soafarm.transport.connections import redis_client

log = structlog.get_logger(__name__)

#: A closed durable session keeps its responses but runs nothing, as does a released one
#: (until a client sends more); a failed one cannot load, or lost its queue.
_NOT_RUNNABLE = (SessionState.CLOSED, SessionState.FAILED, SessionState.RELEASED)


class Autoscaler:
    """Grows and shrinks the pools of `settings.autoscaler`. `run()` blocks until `stop()`."""

    def __init__(self, settings: Settings, provisioners: Sequence[Provisioner]) -> None:
        """`provisioners`: one per pool of `settings.autoscaler.pools`, in the same order."""
        self.settings = settings
        self.pools = settings.autoscaler.pools
        self.provisioners = {p.pool: p for p in provisioners}
        missing = [p.name for p in self.pools if p.name not in self.provisioners]
        if missing:
            raise SoafarmError(f"no provisioner for pool(s) {missing}")
        self.store = BrokerStore(redis_client(settings), Names(settings.namespace))
        self.stopping = threading.Event()
        self.samples: dict[int, list[int]] = {}
        self.sessions: list[SessionRecord] = []
        self.last_busy = time.monotonic()
        self.targets: dict[str, int] = {}
        self.metrics = AutoscalerMetrics() if settings.metrics.enabled else None
        #: Monotonic time of the last round that read Redis (`/healthz`).
        self.round_at = -float("inf")

    def health(self) -> Health:
        """Healthy while its rounds read Redis (`/healthz`)."""
        age = time.monotonic() - self.round_at
        limit = 3 * self.settings.broker.load_sampling_interval + 10.0
        return age < limit, {"round_age": round(age, 3) if age != float("inf") else None}

    def stop(self) -> None:
        """Ask `run()` to return (the provisioners are closed by their owner)."""
        self.stopping.set()

    def run(self) -> None:
        """Sample and adjust until stopped; Redis outages are logged and waited out."""
        broker = self.settings.broker
        log.info("autoscaler_started", pools=[p.name for p in self.pools])
        server = None
        if self.metrics is not None:
            m = self.settings.metrics
            server = serve_metrics(
                self.metrics.registry, self.health, m.bind, m.autoscaler_port, "autoscaler"
            )
        try:
            self._loop(broker.allocation_adjust_interval, broker.load_sampling_interval)
        finally:
            if server is not None:
                server.close()

    def _loop(self, adjust_interval: float, sampling_interval: float) -> None:
        last_adjust = 0.0
        while not self.stopping.is_set():
            try:
                starved = self.sample()
                now = self.round_at = time.monotonic()
                if starved or now - last_adjust >= adjust_interval:
                    self.adjust()
                    last_adjust = now
            except redis.RedisError as e:
                log.warning("redis_unreachable", error=str(e))
            except SoafarmError as e:  # a provisioner failed: say so, try again next round
                log.error("provisioner_failed", error=str(e))
            except Exception:  # a bug must not stop scaling (or leave hosts running forever)
                log.exception("autoscaler_round_failed")
            self.stopping.wait(sampling_interval)

    def sample(self) -> bool:
        """Record each session's outstanding requests; True when some session has work and
        no instance (adjust now rather than at the next interval)."""
        sessions = [s for s in self.store.open_sessions() if s.state not in _NOT_RUNNABLE]
        self.sessions = sessions
        outstanding = self.store.outstanding([s.id for s in sessions])
        self.samples = {
            s.id: [*self.samples.get(s.id, []), outstanding[s.id]][-1000:] for s in sessions
        }
        if any(outstanding.values()):
            self.last_busy = time.monotonic()
        return any(outstanding[s.id] and not self.store.instances(s.id) for s in sessions)

    def loads(self) -> list[SessionLoad]:
        """The sessions' mean load since the last adjustment."""
        out = []
        for s in self.sessions:  # as of the latest sample
            samples = self.samples.get(s.id)
            if not samples:
                continue
            broker = s.broker_settings
            out.append(
                SessionLoad(
                    s.id,
                    sum(samples) / len(samples),
                    len(self.store.instances(s.id)),
                    s.min_units,
                    s.max_units,
                    s.resource_unit,
                    s.max_concurrent_calls,
                    broker.allocation_grow_load_ratio_threshold,
                    broker.allocation_shrink_load_ratio_threshold,
                )
            )
        return out

    def adjust(self) -> dict[str, int]:
        """Compute hosts per pool and ask each provisioner for them; returns the targets."""
        loads = self.loads()
        self.samples = {sid: v[-1:] for sid, v in self.samples.items()}  # start a new window
        idle_for = time.monotonic() - self.last_busy
        targets = pool_targets(self.pools, loads, idle_for, self.settings.autoscaler.idle_timeout)
        idle_first = self._idle_first()
        host = HostSize(self.pools[0].cores_per_host)
        for pool in self.pools:
            provisioner = self.provisioners[pool.name]
            have = provisioner.hosts()
            if self.metrics is not None:
                self.metrics.adjusted(pool.name, have, targets[pool.name])
            if targets[pool.name] != have:
                log.info(
                    "pool_adjusted",
                    pool=pool.name,
                    hosts=have,
                    target=targets[pool.name],
                    load_ratios={s.session_id: f"{load_ratio(s, host):.0f}" for s in loads},
                )
                provisioner.scale(targets[pool.name], idle_first.get(pool.name, []))
        self.targets = targets
        return targets

    def _idle_first(self) -> dict[str, list[str]]:
        """Host ids per pool, least busy first (fewest assigned instances, then utilisation)."""
        hosts = self.store.hosts()
        assigned = self.store.assignments(sorted(hosts))
        by_pool: dict[str, list[str]] = {}
        for h in sorted(
            hosts, key=lambda h: (sum(assigned[h].values()), hosts[h].utilisation or 0)
        ):
            by_pool.setdefault(hosts[h].pool, []).append(h)
        return by_pool
