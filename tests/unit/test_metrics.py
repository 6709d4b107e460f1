"""The metrics' arithmetic and endpoint, without servers: call histograms and totals, the
host's and the broker's families, `/healthz`, and the port fallback."""

from __future__ import annotations

import json
import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from soafarm.broker.metrics import AutoscalerMetrics, host_metrics, session_metrics
from soafarm.metrics import serve_metrics
from soafarm.state.control import ClientStatus, HostInfo, SessionInfo
from soafarm.state.hosts import InstanceLoad
from soafarm.state.records import HostRecord, SessionRecord, SessionState
from soafarm.workers import metrics as worker_metrics
from soafarm.workers.call_stats import CallStats, merged
from soafarm.workers.metrics import CallTotals, HostMetrics, HostView

BOUNDS = (0.01, 0.1, 1.0)


def samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }


def test_a_call_falls_in_the_first_bucket_whose_bound_it_does_not_pass() -> None:
    stats = CallStats(BOUNDS)
    for seconds in (0.005, 0.01, 0.05, 0.5, 2.0):
        stats.record(seconds, faulted=seconds > 1)
    assert stats.buckets == [2, 1, 1, 1]  # 0.01 itself is "le 0.01"
    assert stats.calls == 5 and stats.faults == 1
    assert stats.seconds == pytest.approx(2.565)
    total = merged([stats, stats], BOUNDS)
    assert total.buckets == [4, 2, 2, 2] and total.faults == 2


def test_an_instance_load_report_carries_its_totals_and_old_reports_still_parse() -> None:
    load = InstanceLoad(3, 2, 1.5, 10.0, (1, 2, 3, 4), 0.75, 1, 2)
    assert InstanceLoad.from_json(load.to_json()) == load
    old = InstanceLoad(3, 2, 1.5, 10.0)
    assert "buckets" not in old.to_json()
    assert InstanceLoad.from_json(old.to_json()) == old


def load(session: int, buckets: tuple[int, ...], faults: int = 0) -> InstanceLoad:
    return InstanceLoad(session, 1, 0.0, 0.0, buckets, 0.1 * sum(buckets), faults, 0)


def test_totals_keep_what_gone_instances_counted() -> None:
    totals = CallTotals(BOUNDS)
    service = {1: "echo", 2: "pricer"}.__getitem__
    totals.update({"a": load(1, (1, 0, 0, 0)), "b": load(2, (0, 2, 0, 0), 1)}, service)
    totals.update({"a": load(1, (3, 0, 0, 0)), "b": load(2, (0, 2, 0, 0), 1)}, service)
    assert totals.totals()[(1, "echo")].calls == 3
    # "a" exits with a final report of 5 calls; "b" vanishes (its last report counts)
    totals.retire("a", load(1, (5, 0, 0, 0)), "echo")
    totals.update({"c": load(1, (1, 0, 0, 0))}, service)
    got = totals.totals()
    assert got[(1, "echo")].calls == 6
    assert got[(2, "pricer")].calls == 2 and got[(2, "pricer")].faults == 1
    assert totals.by_service()["echo"].buckets == [6, 0, 0, 0]
    # a report without stats (metrics off in that instance) counts nothing
    totals.update({"c": load(1, (1, 0, 0, 0)), "d": InstanceLoad(1, 1, 0.0, 0.0)}, service)
    assert totals.totals()[(1, "echo")].calls == 6


def test_a_gone_sessions_counters_leave_but_its_service_histogram_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    now = [1000.0]
    monkeypatch.setattr(worker_metrics.time, "monotonic", lambda: now[0])
    totals = CallTotals(BOUNDS)
    totals.retire("a", load(1, (2, 0, 0, 0)), "echo")
    now[0] += worker_metrics.SESSION_SERIES_KEPT + 1
    totals.retire("b", load(2, (1, 0, 0, 0)), "echo")
    assert set(totals.totals()) == {(2, "echo")}
    assert totals.by_service()["echo"].calls == 3


def test_the_host_exports_cumulative_histograms_and_its_gauges() -> None:
    view = HostView("h1", "gpu", 8, 0.5, {(4, "echo"): 2})
    m = HostMetrics(lambda: view, BOUNDS)
    m.calls.update({"i": load(4, (1, 2, 3, 4), 2)}, lambda _sid: "echo")
    m.starts.labels("echo").inc()
    got = samples(m.registry)
    base = (("host", "h1"), ("service", "echo"))
    assert got[("soafarm_call_duration_seconds_bucket", (*base[:1], ("le", "0.01"), base[1]))] == 1
    assert got[("soafarm_call_duration_seconds_bucket", (*base[:1], ("le", "1.0"), base[1]))] == 6
    assert got[("soafarm_call_duration_seconds_bucket", (*base[:1], ("le", "+Inf"), base[1]))] == 10
    assert got[("soafarm_call_duration_seconds_count", base)] == 10
    per_session = (("host", "h1"), ("service", "echo"), ("session", "4"))
    assert got[("soafarm_calls_total", per_session)] == 10
    assert got[("soafarm_call_faults_total", per_session)] == 2
    assert got[("soafarm_worker_instances", per_session)] == 2
    assert got[("soafarm_worker_utilisation", (("host", "h1"), ("pool", "gpu")))] == 0.5
    assert got[("soafarm_worker_instance_starts_total", (("service", "echo"),))] == 1


def test_the_broker_families_sum_each_sessions_clients() -> None:
    record = SessionRecord(7, "echo", None, SessionState.RUNNING, 1, 4, 2000, "core", 0.0, "ann")
    clients = (
        ClientStatus("a", 10, 8, 1, 2, True, 10, False),
        ClientStatus("b", 5, 5, 2, 0, True, 5, True),
    )
    info = SessionInfo(
        record, "q7", clients=clients, allocated_units=2, target_units=3, outstanding=2
    )
    families = {f.name: f for f in session_metrics([info], {7: 4})}

    def one(name: str) -> float:
        (s,) = [s for s in families[name].samples if not s.name.endswith("_created")]
        return float(s.value)

    assert one("soafarm_session_requests") == 15
    assert one("soafarm_session_responses") == 13
    assert one("soafarm_session_faults") == 3
    assert one("soafarm_session_outstanding") == 2
    assert one("soafarm_session_queued_messages") == 4
    assert one("soafarm_session_target_units") == 3
    assert families["soafarm_sessions"].samples[0].labels == {"state": "running"}
    host = HostInfo(HostRecord("h", "m", 1, 4, 0.0, utilisation=None), instances={"7": 3})
    fams = {f.name: f for f in host_metrics((host,))}
    assert fams["soafarm_host_instances"].samples[0].value == 3
    assert fams["soafarm_host_utilisation"].samples == []  # idle: absent, not 0


def test_the_autoscaler_counts_each_change_by_direction() -> None:
    m = AutoscalerMetrics()
    m.adjusted("cpu", 1, 3)
    m.adjusted("cpu", 3, 3)
    m.adjusted("cpu", 3, 0)
    got = samples(m.registry)
    assert (
        got[("soafarm_autoscaler_decisions_total", (("direction", "grow"), ("pool", "cpu")))] == 1
    )
    assert (
        got[("soafarm_autoscaler_decisions_total", (("direction", "shrink"), ("pool", "cpu")))] == 1
    )
    assert got[("soafarm_autoscaler_pool_target_hosts", (("pool", "cpu"),))] == 0


def test_healthz_answers_503_when_unhealthy_and_a_taken_port_falls_back() -> None:
    state = {"ok": True}
    registry = CollectorRegistry()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = serve_metrics(registry, lambda: (state["ok"], {"x": 1}), "127.0.0.1", port, "t")
        assert server is not None
        try:
            assert not server.url.endswith(f":{port}/metrics")  # another port
            health = server.url.replace("/metrics", "/healthz")
            with urllib.request.urlopen(health, timeout=5) as reply:
                assert reply.status == 200
                assert json.loads(reply.read()) == {"status": "ok", "x": 1}
            state["ok"] = False
            with pytest.raises(urllib.error.HTTPError) as e:
                urllib.request.urlopen(health, timeout=5)
            assert e.value.code == 503
            assert json.loads(e.value.read())["status"] == "unhealthy"
            with urllib.request.urlopen(server.url, timeout=5) as reply:
                assert reply.status == 200
        finally:
            server.close()
