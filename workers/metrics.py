"""A worker host's metrics: its instances, utilisation, and its instances' calls.

Instances are processes of their own; each sends its call totals (a duration histogram,
faults, retries) to the host with the load report it writes every second
(`soafarm.state.hosts.InstanceLoad`). The host folds in the last report of every instance
that went away, so its counters only grow while the host lives.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import accumulate
from typing import Any

from prometheus_client import Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.registry import Collector

from soafarm.metrics import new_registry
from soafarm.state.hosts import InstanceLoad
from soafarm.workers.call_stats import CallStats


@dataclass(frozen=True)
class HostView:
    """What the host knows of itself at a scrape."""

    host_id: str
    pool: str
    cores: int
    utilisation: float | None
    #: (session id, service) -> instances running.
    instances: dict[tuple[int, str], int]


class CallTotals:
    """Call totals of a host's instances, live and gone: per (session, service) for the
    counters, per service for the duration histogram.

    A session's series stop `SESSION_SERIES_KEPT` seconds after its last instance here went
    away (a host serves many sessions over its life; their series must not pile up), while
    the per-service histogram keeps everything, so it never goes backwards.
    """

    def __init__(self, bounds: tuple[float, ...]) -> None:
        """`bounds` are the histogram's bucket bounds (`metrics.call_duration_buckets`)."""
        self.bounds = bounds
        self._live: dict[str, tuple[tuple[int, str], InstanceLoad]] = {}
        #: (session, service) -> totals of its gone instances, and when the last went.
        self._gone: dict[tuple[int, str], tuple[CallStats, float]] = {}
        self._gone_by_service: dict[str, CallStats] = {}

    def _fits(self, load: InstanceLoad) -> bool:
        return len(load.buckets) == len(self.bounds) + 1  # reports without stats add nothing

    def update(self, loads: dict[str, InstanceLoad], service_of: Callable[[int], str]) -> None:
        """The instances' latest reports; an instance missing from `loads` is gone, and its
        last report is kept in the totals."""
        for iid in set(self._live) - set(loads):
            key, load = self._live.pop(iid)
            self._retired(key, load)
        for iid, load in loads.items():
            if self._fits(load):
                self._live[iid] = ((load.session, service_of(load.session)), load)

    def retire(self, iid: str, last: InstanceLoad | None, service: str) -> None:
        """Instance `iid` exited; `last` is its final report (None: keep what was seen)."""
        seen = self._live.pop(iid, None)
        if last is not None and self._fits(last):
            self._retired((last.session, service), last)
        elif seen is not None:
            self._retired(*seen)

    def _retired(self, key: tuple[int, str], load: InstanceLoad) -> None:
        now = time.monotonic()
        stats, _ = self._gone.get(key, (CallStats(self.bounds), now))
        _add(stats, load)
        self._gone[key] = (stats, now)
        _add(self._gone_by_service.setdefault(key[1], CallStats(self.bounds)), load)
        live = {k for k, _ in self._live.values()}
        for old, (_, at) in list(self._gone.items()):
            if old not in live and now - at > SESSION_SERIES_KEPT:
                del self._gone[old]

    def totals(self) -> dict[tuple[int, str], CallStats]:
        """(session id, service) -> totals so far."""
        out = {k: _copy(v) for k, (v, _) in self._gone.items()}
        for key, load in self._live.values():
            _add(out.setdefault(key, CallStats(self.bounds)), load)
        return out

    def by_service(self) -> dict[str, CallStats]:
        """Service -> totals over the host's life."""
        out = {k: _copy(v) for k, v in self._gone_by_service.items()}
        for (_, service), load in self._live.values():
            _add(out.setdefault(service, CallStats(self.bounds)), load)
        return out


def _add(into: CallStats, load: InstanceLoad) -> None:
    into.buckets = [a + b for a, b in zip(into.buckets, load.buckets, strict=True)]
    into.seconds += load.seconds
    into.faults += load.faults
    into.retries += load.retries


def _copy(s: CallStats) -> CallStats:
    return CallStats(s.bounds, list(s.buckets), s.seconds, s.faults, s.retries)


#: Seconds a gone session's call counters stay exported (Prometheus sees their last value).
SESSION_SERIES_KEPT = 600.0


class HostCollector(Collector):
    """The host's gauges and its instances' call counters, as of the last heartbeat."""

    def __init__(self, view: Callable[[], HostView], totals: CallTotals) -> None:
        """`view()` describes the host now."""
        self.view = view
        self.call_totals = totals

    def collect(self) -> Iterator[Any]:
        """Host gauges, then calls per (session, service), then durations per service."""
        v = self.view()
        host = [v.host_id, v.pool]
        cores = GaugeMetricFamily(
            "soafarm_worker_cores", "Cores this host offers", labels=["host", "pool"]
        )
        cores.add_metric(host, v.cores)
        util = GaugeMetricFamily(
            "soafarm_worker_utilisation",
            "Busy fraction of this host's instances over the last heartbeat (absent while idle)",
            labels=["host", "pool"],
        )
        if v.utilisation is not None:
            util.add_metric(host, v.utilisation)
        running = GaugeMetricFamily(
            "soafarm_worker_instances",
            "Service instances running on this host",
            labels=["host", "session", "service"],
        )
        for (sid, service), n in sorted(v.instances.items()):
            running.add_metric([v.host_id, str(sid), service], n)
        yield from (cores, util, running)
        yield from self._calls(v.host_id)

    def _calls(self, host_id: str) -> Iterator[Any]:
        labels = ["host", "session", "service"]
        calls = CounterMetricFamily(
            "soafarm_calls", "Service calls this host's instances ran", labels=labels
        )
        faults = CounterMetricFamily(
            "soafarm_call_faults", "Calls that answered with a fault", labels=labels
        )
        retries = CounterMetricFamily(
            "soafarm_call_retries",
            "Requests run again after a redelivery (or answered RetryLimitExceeded)",
            labels=labels,
        )
        durations = HistogramMetricFamily(
            "soafarm_call_duration_seconds",
            "How long service calls ran on this host",
            labels=["host", "service"],
        )
        bounds = self.call_totals.bounds
        for (sid, service), s in sorted(self.call_totals.totals().items()):
            key = [host_id, str(sid), service]
            calls.add_metric(key, s.calls)
            faults.add_metric(key, s.faults)
            retries.add_metric(key, s.retries)
        for service, s in sorted(self.call_totals.by_service().items()):
            cumulative = list(accumulate(s.buckets))
            les = [*(_le(b) for b in bounds), "+Inf"]
            durations.add_metric(
                [host_id, service], list(zip(les, cumulative, strict=True)), s.seconds
            )
        yield from (calls, faults, retries, durations)


def _le(bound: float) -> str:
    """A bucket bound as Prometheus' clients print it (0.5, 1.0, 60.0)."""
    return repr(float(bound))


class HostMetrics:
    """A worker host's registry, and the counters the host updates itself."""

    def __init__(self, view: Callable[[], HostView], bounds: tuple[float, ...]) -> None:
        """`bounds`: the call-duration histogram's buckets."""
        self.registry = new_registry()
        self.calls = CallTotals(bounds)
        self.registry.register(HostCollector(view, self.calls))
        self.starts = Counter(
            "soafarm_worker_instance_starts",
            "Service instances this host started",
            ["service"],
            registry=self.registry,
        )
        self.exits = Counter(
            "soafarm_worker_instance_exits",
            "Service instances that exited, by exit code (docs/cli.md lists them)",
            ["service", "code"],
            registry=self.registry,
        )
