"""The Kubernetes manifests and the compose file, checked offline: each object is one the
Kubernetes API defines, with no unknown field (kubernetes' own models, round-tripped), and
each holds to what the docs promise: probes, requests and limits, non-root pods, disruption
budgets, the image the repository builds, settings soafarm accepts."""

from __future__ import annotations

import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes.client import ApiClient

from soafarm.config import load_settings

ROOT = Path(__file__).resolve().parents[2]
KUBERNETES = ROOT / "compose" / "kubernetes"
MODELS = {
    ("apps/v1", "Deployment"): "V1Deployment",
    ("apps/v1", "StatefulSet"): "V1StatefulSet",
    ("v1", "Service"): "V1Service",
    ("v1", "ServiceAccount"): "V1ServiceAccount",
    ("rbac.authorization.k8s.io/v1", "Role"): "V1Role",
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): "V1RoleBinding",
    ("policy/v1", "PodDisruptionBudget"): "V1PodDisruptionBudget",
}


def objects() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(KUBERNETES.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {o["metadata"]["name"]: o for _, o in objects() if o["kind"] == kind}


def workloads() -> dict[str, dict[str, Any]]:
    return {**by_kind("Deployment"), **by_kind("StatefulSet")}


def test_every_manifest_is_an_object_of_the_kubernetes_api_with_no_unknown_field() -> None:
    api = ApiClient()
    seen = []
    for name, doc in objects():
        model = MODELS.get((doc["apiVersion"], doc["kind"]))
        assert model, f"{name}: unexpected {doc['apiVersion']} {doc['kind']}"
        # required fields and types are checked as the model is built; a field the API does
        # not define is dropped, so the round trip differs
        built = api._ApiClient__deserialize(doc, model)  # type: ignore[attr-defined]
        assert api.sanitize_for_serialization(built) == doc, f"{name}: {doc['kind']} differs"
        seen.append(doc["kind"])
    assert {"Deployment", "StatefulSet", "PodDisruptionBudget"} <= set(seen)


def test_every_container_has_probes_requests_limits_and_runs_as_non_root() -> None:
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        for container in pod["containers"]:
            where = f"{name}/{container['name']}"
            assert "livenessProbe" in container and "readinessProbe" in container, where
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container["resources"][bound]), where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where


def test_soafarm_pods_run_the_image_the_repository_builds_as_its_user() -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    dockerfile = (ROOT / "compose" / "Dockerfile").read_text()
    user = re.search(r"^USER (\d+)$", dockerfile, re.M)
    assert user, "the Dockerfile runs as root"
    soafarm = {name: w for name, w in by_kind("Deployment").items() if name.startswith("soafarm-")}
    assert set(soafarm) == {"soafarm-broker", "soafarm-worker", "soafarm-autoscaler"}
    for name, deployment in soafarm.items():
        pod = deployment["spec"]["template"]["spec"]
        assert [c["image"] for c in pod["containers"]] == [f"soafarm:{version}"], name
        assert pod["securityContext"]["runAsUser"] == int(user.group(1)), name


def test_the_broker_and_the_workers_have_a_disruption_budget() -> None:
    budgets = by_kind("PodDisruptionBudget")
    for name in ("soafarm-broker", "soafarm-worker"):
        labels = by_kind("Deployment")[name]["spec"]["template"]["metadata"]["labels"]
        matching = [
            b
            for b in budgets.values()
            if b["spec"]["selector"]["matchLabels"].items() <= labels.items()
        ]
        assert matching, f"no PodDisruptionBudget selects {name}"


def test_the_autoscaler_scales_the_worker_deployment_with_its_service_account() -> None:
    autoscaler = by_kind("Deployment")["soafarm-autoscaler"]["spec"]["template"]["spec"]
    assert autoscaler["serviceAccountName"] in by_kind("ServiceAccount")
    assert "replicas" not in by_kind("Deployment")["soafarm-worker"]["spec"]  # the autoscaler's
    settings = load_settings(environ=literal_env(autoscaler["containers"][0]))
    (pool,) = settings.autoscaler.pools
    assert (pool.provisioner, pool.deployment) == ("kubernetes", "soafarm-worker")


@pytest.mark.parametrize("name", sorted(by_kind("Deployment")))
def test_every_soafarm_variable_a_manifest_sets_is_a_setting(name: str) -> None:
    for container in by_kind("Deployment")[name]["spec"]["template"]["spec"]["containers"]:
        load_settings(environ=literal_env(container))  # unknown SOAFARM_* raise ConfigError


def literal_env(container: dict[str, Any]) -> dict[str, str]:
    """The container's SOAFARM_* variables, a Secret's replaced by a value of the right form."""
    stand_ins = {"amqp-url": "amqp://u:p@rabbitmq:5672/", "redis-url": "redis://redis:6379/0"}
    env = {}
    for item in container.get("env", []):
        if not item["name"].startswith("SOAFARM_"):
            continue
        if "value" in item:
            env[item["name"]] = item["value"]
        else:
            env[item["name"]] = stand_ins[item["valueFrom"]["secretKeyRef"]["key"]]
    return env


def test_compose_runs_one_image_with_healthchecks_and_a_persistent_redis() -> None:
    compose = yaml.safe_load((ROOT / "compose" / "docker-compose.yml").read_text())
    services = compose["services"]
    built = {n: s for n, s in services.items() if "build" in s}
    assert set(built) == {"broker", "worker", "autoscaler"}
    assert {s["build"]["dockerfile"] for s in built.values()} == {"compose/Dockerfile"}
    # one image, the one the Kubernetes manifests run
    assert {s["image"] for s in built.values()} == {"soafarm:0.1.0"}
    for name in (*built, "rabbitmq", "redis"):
        assert "healthcheck" in services[name], name
    command = " ".join(services["redis"]["command"])
    assert "--appendonly yes" in command and "--appendfsync everysec" in command
    assert services["redis"]["volumes"], "Redis keeps its AOF on a volume"
