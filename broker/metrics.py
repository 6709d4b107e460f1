"""The broker daemon's metrics: the farm as Prometheus sees it, read at scrape time.

Sessions and hosts are described exactly as `soafarm sessions list` and `soafarm hosts` see
them (`describe_sessions`, `describe_hosts`), so the numbers match the CLI. Every daemon of a
namespace exports them (Prometheus may scrape any); `soafarm_broker_leading` says which one
runs the allocator. Request queue depths come from a RabbitMQ connection of the scrape thread's
own: pika connections are not shared between threads.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter as Tally
from collections.abc import Callable, Iterator
from typing import Any

import pika
import redis
import structlog
from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from soafarm.broker.sessions import describe_hosts, describe_sessions
from soafarm.broker.store import BrokerStore
from soafarm.config import Settings
from soafarm.metrics import new_registry
from soafarm.names import Names
from soafarm.state.control import HostInfo, SessionInfo
from soafarm.transport.connections import pika_connection

log = structlog.get_logger(__name__)

SESSION_LABELS = ["session", "service"]
HOST_LABELS = ["host", "pool"]


class QueueDepths:
    """Messages ready in each session's request queue, over a connection of its own."""

    def __init__(self, settings: Settings) -> None:
        """Connect on first use."""
        self.settings = settings
        self._connection: pika.BlockingConnection | None = None
        self._lock = threading.Lock()

    def ready(self, queues: dict[int, str]) -> dict[int, int]:
        """Session id -> messages ready in its queue; sessions whose queue is missing (or
        all, with RabbitMQ unreachable) are left out."""
        out: dict[int, int] = {}
        with self._lock:
            try:
                if self._connection is None or not self._connection.is_open:
                    self._connection = pika_connection(self.settings, "soafarm-broker metrics")
                channel = self._connection.channel()
                for sid, queue in queues.items():
                    if not channel.is_open:
                        channel = self._connection.channel()
                    with contextlib.suppress(pika.exceptions.ChannelClosedByBroker):
                        ok = channel.queue_declare(queue=queue, passive=True)
                        out[sid] = int(ok.method.message_count)
                if channel.is_open:
                    channel.close()
            except Exception as e:  # a scrape reports what it could read
                log.debug("metrics_queue_depths_failed", error=repr(e))
                self._connection = None
        return out

    def close(self) -> None:
        """Close the connection, if open."""
        with self._lock, contextlib.suppress(Exception):
            if self._connection is not None and self._connection.is_open:
                self._connection.close()


class FarmCollector(Collector):
    """Sessions, hosts and units of the namespace, read from Redis at each scrape."""

    def __init__(
        self, store: BrokerStore, names: Names, depths: Callable[[dict[int, str]], dict[int, int]]
    ) -> None:
        """`depths` maps session id -> request queue name to messages ready."""
        self.store = store
        self.names = names
        self.depths = depths

    def describe(self) -> list[Any]:
        """Nothing up front: registering must not read Redis."""
        return []

    def collect(self) -> Iterator[Any]:
        """The metrics as of now; nothing when Redis cannot be read (`soafarm_up` says so)."""
        up = GaugeMetricFamily("soafarm_redis_up", "1 when this scrape could read Redis")
        try:
            sessions = describe_sessions(self.store, self.names, self.store.open_sessions())
            hosts = describe_hosts(self.store).items
        except redis.RedisError as e:
            log.debug("metrics_redis_failed", error=str(e))
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from session_metrics(
            sessions, self.depths({s.record.id: s.request_queue for s in sessions})
        )
        yield from host_metrics(hosts)


def session_metrics(sessions: list[SessionInfo], ready: dict[int, int]) -> Iterator[Any]:
    """Per-session counters and gauges (labels: session id, service name)."""
    requests = CounterMetricFamily(
        "soafarm_session_requests", "Requests accepted into the session", labels=SESSION_LABELS
    )
    responses = CounterMetricFamily(
        "soafarm_session_responses",
        "Responses stored for the session (faults included)",
        labels=SESSION_LABELS,
    )
    faults = CounterMetricFamily(
        "soafarm_session_faults", "Responses that are faults", labels=SESSION_LABELS
    )
    outstanding = GaugeMetricFamily(
        "soafarm_session_outstanding",
        "Requests accepted without a response yet",
        labels=SESSION_LABELS,
    )
    queued = GaugeMetricFamily(
        "soafarm_session_queued_messages",
        "Request batches waiting in the session's queue (not yet taken by an instance)",
        labels=SESSION_LABELS,
    )
    allocated = GaugeMetricFamily(
        "soafarm_session_allocated_units",
        "Instances running for the session",
        labels=SESSION_LABELS,
    )
    target = GaugeMetricFamily(
        "soafarm_session_target_units",
        "Units the allocator gives the session",
        labels=SESSION_LABELS,
    )
    by_state: Tally[str] = Tally()
    for s in sessions:
        labels = [str(s.record.id), s.record.service]
        requests.add_metric(labels, sum(c.accepted for c in s.clients))
        responses.add_metric(labels, sum(c.done for c in s.clients))
        faults.add_metric(labels, sum(c.faulted for c in s.clients))
        outstanding.add_metric(labels, s.outstanding)
        if s.record.id in ready:
            queued.add_metric(labels, ready[s.record.id])
        allocated.add_metric(labels, s.allocated_units)
        target.add_metric(labels, s.target_units)
        by_state[str(s.record.state)] += 1
    states = GaugeMetricFamily("soafarm_sessions", "Open sessions by state", labels=["state"])
    for state, count in sorted(by_state.items()):
        states.add_metric([state], count)
    yield from (requests, responses, faults, outstanding, queued, allocated, target, states)


def host_metrics(hosts: tuple[HostInfo, ...]) -> Iterator[Any]:
    """Per-host gauges (labels: host id, pool): the heat map's data."""
    cores = GaugeMetricFamily("soafarm_host_cores", "Cores a live host offers", labels=HOST_LABELS)
    instances = GaugeMetricFamily(
        "soafarm_host_instances", "Service instances running on a host", labels=HOST_LABELS
    )
    utilisation = GaugeMetricFamily(
        "soafarm_host_utilisation",
        "Busy fraction of a host's instances over the last heartbeat (absent while idle)",
        labels=HOST_LABELS,
    )
    for h in hosts:
        labels = [h.record.id, h.record.pool]
        cores.add_metric(labels, h.record.cores)
        instances.add_metric(labels, sum(h.instances.values()))
        if h.record.utilisation is not None:
            utilisation.add_metric(labels, h.record.utilisation)
    yield from (cores, instances, utilisation)


class BrokerMetrics:
    """The broker daemon's registry: the farm, plus the daemon's own rounds."""

    def __init__(self, settings: Settings, store: BrokerStore, leading: Callable[[], bool]) -> None:
        """`leading()` says whether this daemon holds the allocator's lease now."""
        self.registry = new_registry()
        self.depths = QueueDepths(settings)
        self.registry.register(FarmCollector(store, Names(settings.namespace), self.depths.ready))
        self.registry.register(_LeadingCollector(leading))
        self.rounds = Histogram(
            "soafarm_broker_round_seconds",
            "Duration of the leader's allocation rounds (sweep, queue checks, allocation)",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1.0, 5.0),
            registry=self.registry,
        )

    def close(self) -> None:
        """Free the scrape thread's RabbitMQ connection."""
        self.depths.close()


class _LeadingCollector(Collector):
    def __init__(self, leading: Callable[[], bool]) -> None:
        self.leading = leading

    def collect(self) -> Iterator[Any]:
        g = GaugeMetricFamily(
            "soafarm_broker_leading", "1 when this daemon runs the allocator (holds the lease)"
        )
        g.add_metric([], 1 if self.leading() else 0)
        yield g


def round_timer(metrics: BrokerMetrics | None) -> Any:
    """A context manager timing one allocation round (nothing without metrics)."""
    return metrics.rounds.time() if metrics is not None else contextlib.nullcontext()


__all__ = [
    "AutoscalerMetrics",
    "BrokerMetrics",
    "FarmCollector",
    "host_metrics",
    "round_timer",
    "session_metrics",
]


class AutoscalerMetrics:
    """The autoscaler's registry: its decisions, and each pool's hosts against its target."""

    def __init__(self) -> None:
        """Empty counters and gauges."""
        self.registry = new_registry()
        self.decisions = Counter(
            "soafarm_autoscaler_decisions",
            "Pool size changes the autoscaler asked its provisioners for",
            ["pool", "direction"],
            registry=self.registry,
        )
        self.hosts = Gauge(
            "soafarm_autoscaler_pool_hosts",
            "Hosts a pool's provisioner runs, at the last adjustment",
            ["pool"],
            registry=self.registry,
        )
        self.target = Gauge(
            "soafarm_autoscaler_pool_target_hosts",
            "Hosts the autoscaler wants in a pool",
            ["pool"],
            registry=self.registry,
        )

    def adjusted(self, pool: str, have: int, target: int) -> None:
        """One pool's adjustment: `have` hosts, `target` wanted."""
        self.hosts.labels(pool).set(have)
        self.target.labels(pool).set(target)
        if target != have:
            self.decisions.labels(pool, "grow" if target > have else "shrink").inc()
