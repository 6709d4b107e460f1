"""The monitoring pieces people deploy stay true to what soafarm exports: the Grafana
dashboard and docs/operations.md name only metrics that exist (and the docs name them all),
and compose scrapes the ports the settings default to."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import yaml
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import Collector

from soafarm.broker.metrics import AutoscalerMetrics, BrokerMetrics, host_metrics, session_metrics
from soafarm.config import MetricsSettings, Settings
from soafarm.state.control import ClientStatus, HostInfo, SessionInfo
from soafarm.state.hosts import InstanceLoad
from soafarm.state.records import HostRecord, SessionRecord, SessionState
from soafarm.workers.metrics import HostMetrics, HostView

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "compose"


class _DownStore:
    """A broker store whose Redis is unreachable: the farm collector says so and stops."""

    def open_sessions(self) -> Any:
        raise redis.ConnectionError("down")


class _Farm(Collector):
    def collect(self) -> Iterator[Any]:
        record = SessionRecord(1, "echo", None, SessionState.RUNNING, 1, 2, 2000, "core", 0, "o")
        client = ClientStatus("c", 1, 1, 0, 0, True, 1, True)
        yield from session_metrics([SessionInfo(record, "q", clients=(client,))], {1: 0})
        host = HostRecord("h", "m", 1, 2, 0.0, utilisation=0.5)
        yield from host_metrics((HostInfo(host, instances={"1": 1}),))


def exported() -> set[str]:
    """Every metric family soafarm's processes export, by name."""
    registries = []
    broker = BrokerMetrics(Settings(), _DownStore(), lambda: True)  # type: ignore[arg-type]
    broker.rounds.observe(0.01)
    registries.append(broker.registry)
    farm = CollectorRegistry()
    farm.register(_Farm())
    registries.append(farm)
    host = HostMetrics(lambda: HostView("h", "p", 2, 0.5, {(1, "echo"): 1}), (0.1, 1.0))
    host.calls.update({"i": InstanceLoad(1, 1, 0.0, 0.0, (1, 0, 0), 0.01)}, lambda _s: "echo")
    host.starts.labels("echo").inc()
    host.exits.labels("echo", "0").inc()
    registries.append(host.registry)
    scaler = AutoscalerMetrics()
    scaler.adjusted("p", 0, 1)
    registries.append(scaler.registry)
    names = set()
    for registry in registries:
        for family in text_string_to_metric_families(generate_latest(registry).decode()):
            names.add(family.name + ("_total" if family.type == "counter" else ""))
    return names


def test_the_dashboard_queries_only_metrics_soafarm_exports() -> None:
    dashboard = json.loads((COMPOSE / "grafana/dashboards/soafarm.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    used = {
        re.sub(r"_(bucket|count|sum)$", "", m) for e in exprs for m in re.findall(r"soafarm_\w+", e)
    }
    assert used and used <= exported(), used - exported()
    # the farm at a glance: throughput, faults, units, heat map, durations, autoscaler
    assert {
        "soafarm_session_responses_total",
        "soafarm_session_faults_total",
        "soafarm_session_target_units",
        "soafarm_host_utilisation",
        "soafarm_call_duration_seconds",
        "soafarm_autoscaler_decisions_total",
    } <= used


def test_operations_doc_lists_every_exported_metric_and_no_other() -> None:
    doc = (ROOT / "docs/operations.md").read_text()
    documented = set(re.findall(r"^\| `(soafarm_\w+)`", doc, flags=re.M))
    assert documented == exported()


def test_compose_scrapes_the_default_ports_and_checks_health() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    prom = yaml.safe_load((COMPOSE / "prometheus/prometheus.yml").read_text())
    m = MetricsSettings()
    jobs = {j["job_name"]: j for j in prom["scrape_configs"]}
    assert jobs["soafarm-broker"]["static_configs"][0]["targets"] == [f"broker:{m.broker_port}"]
    assert jobs["soafarm-worker"]["dns_sd_configs"][0]["port"] == m.worker_port
    assert jobs["soafarm-autoscaler"]["static_configs"][0]["targets"] == [
        f"autoscaler:{m.autoscaler_port}"
    ]
    services = compose["services"]
    for name, port in (("broker", m.broker_port), ("worker", m.worker_port)):
        assert f":{port}/healthz" in " ".join(services[name]["healthcheck"]["test"])
    assert services["broker"]["environment"]["SOAFARM_METRICS_BIND"] == "0.0.0.0"
    assert {"prometheus", "grafana"} <= set(services)


@pytest.mark.parametrize(
    ("manifest", "port"),
    [
        ("worker-deployment.yaml", MetricsSettings().worker_port),
        ("broker-deployment.yaml", MetricsSettings().broker_port),
        ("autoscaler-deployment.yaml", MetricsSettings().autoscaler_port),
    ],
)
def test_the_kubernetes_pods_probe_healthz_and_expose_their_metrics(
    manifest: str, port: int
) -> None:
    deployment = next(yaml.safe_load_all((COMPOSE / "kubernetes" / manifest).read_text()))
    pod = deployment["spec"]["template"]
    (container,) = pod["spec"]["containers"]
    assert container["ports"] == [{"name": "metrics", "containerPort": port}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["SOAFARM_METRICS_BIND"] == "0.0.0.0"
    assert pod["metadata"]["annotations"]["prometheus.io/port"] == str(port)
