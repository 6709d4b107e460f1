"""The Kubernetes provisioner against the requests the real `kubernetes` client sends.

A tiny fake API server (a thread on 127.0.0.1) serves the scale subresource of Deployments
and records every request; no cluster, RabbitMQ or Redis is needed.
"""

from __future__ import annotations

import json
import re
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

pytest.importorskip("kubernetes")

from kubernetes import client

from soafarm.config import PoolSettings
from soafarm.errors import ConfigError, ProvisionerError
from soafarm.workers.provisioners.kubernetes import (
    MISSING_PACKAGE,
    KubernetesProvisioner,
)

SCALE_PATH = re.compile(r"^/apis/apps/v1/namespaces/([^/]+)/deployments/([^/]+)/scale$")
PATCH_TYPES = {"application/merge-patch+json", "application/strategic-merge-patch+json"}


@dataclass
class Recorded:
    """One request the fake API server received."""

    method: str
    path: str
    body: Any
    content_type: str | None


@dataclass
class FakeCluster:
    """The fake server's state: replicas per (namespace, deployment), and requests seen."""

    replicas: dict[tuple[str, str], int] = field(default_factory=dict)
    requests: list[Recorded] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def patches(self) -> list[Recorded]:
        with self.lock:
            return [r for r in self.requests if r.method == "PATCH"]

    def methods(self) -> list[str]:
        with self.lock:
            return [r.method for r in self.requests]


def scale_object(namespace: str, name: str, replicas: int) -> dict[str, Any]:
    """An autoscaling/v1 Scale, as the API server answers on `.../deployments/{name}/scale`."""
    return {
        "kind": "Scale",
        "apiVersion": "autoscaling/v1",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": "0b5d8f8e-5a52-4c3e-9a53-2b3c1d7e0f11",
            "resourceVersion": "1",
            "creationTimestamp": "2024-01-01T00:00:00Z",
        },
        "spec": {"replicas": replicas},
        "status": {"replicas": replicas, "selector": f"app={name}"},
    }


def status_object(code: int, reason: str, message: str) -> dict[str, Any]:
    """A meta/v1 Status, as the API server answers errors."""
    return {
        "kind": "Status",
        "apiVersion": "v1",
        "metadata": {},
        "status": "Failure",
        "message": message,
        "reason": reason,
        "code": code,
    }


class Handler(BaseHTTPRequestHandler):
    """Serves GET and PATCH of Deployments' scale subresource from the server's FakeCluster."""

    server: FakeServer

    def log_message(self, format: str, *args: Any) -> None:
        """Stay quiet (http.server logs every request to stderr by default)."""

    def _reply(self, code: int, payload: dict[str, Any]) -> None:
        data = json.dumps(payload).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _handle(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = json.loads(raw) if raw else None
        content_type = self.headers.get("Content-Type")
        fake = self.server.fake
        with fake.lock:
            fake.requests.append(Recorded(self.command, self.path, body, content_type))
        match = SCALE_PATH.match(urlsplit(self.path).path)
        if match is None:
            self._reply(404, status_object(404, "NotFound", "the server could not find it"))
            return
        namespace, name = match.groups()
        with fake.lock:
            replicas = fake.replicas.get((namespace, name))
            if replicas is not None and self.command == "PATCH":
                if content_type not in PATCH_TYPES:
                    self._reply(
                        415,
                        status_object(415, "UnsupportedMediaType", f"bad type {content_type}"),
                    )
                    return
                replicas = fake.replicas[(namespace, name)] = int(body["spec"]["replicas"])
        if replicas is None:
            message = f'deployments.apps "{name}" not found'
            self._reply(404, status_object(404, "NotFound", message))
            return
        self._reply(200, scale_object(namespace, name, replicas))

    def do_GET(self) -> None:
        self._handle()

    def do_PATCH(self) -> None:
        self._handle()


class FakeServer(ThreadingHTTPServer):
    """A ThreadingHTTPServer that carries the FakeCluster its handlers serve."""

    def __init__(self, fake: FakeCluster) -> None:
        super().__init__(("127.0.0.1", 0), Handler)
        self.fake = fake


@pytest.fixture(autouse=True)
def _no_proxy_no_pod(monkeypatch: pytest.MonkeyPatch) -> None:
    """Talk to 127.0.0.1 directly, and never take the in-cluster branch."""
    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)


@pytest.fixture
def fake() -> Iterator[FakeCluster]:
    """A running fake API server with Deployment default/soafarm-worker at 1 replica."""
    cluster = FakeCluster(replicas={("default", "soafarm-worker"): 1})
    server = FakeServer(cluster)
    cluster.port = server.server_address[1]
    thread = threading.Thread(
        target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
    )
    thread.start()
    try:
        yield cluster
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def api(fake: FakeCluster) -> Iterator[client.AppsV1Api]:
    """The real client, aimed at the fake server."""
    configuration = client.Configuration(host=fake.url)
    api_client = client.ApiClient(configuration)
    try:
        yield client.AppsV1Api(api_client)
    finally:
        api_client.close()


def pool(**changes: Any) -> PoolSettings:
    """Pool settings for the Kubernetes provisioner, bounds 0..5 unless changed."""
    values: dict[str, Any] = {
        "name": "burst",
        "provisioner": "kubernetes",
        "min_hosts": 0,
        "max_hosts": 5,
        "cores_per_host": 4,
        "deployment": "soafarm-worker",
        "kubernetes_namespace": "default",
        **changes,
    }
    return PoolSettings(**values)


def test_hosts_reads_spec_replicas(fake: FakeCluster, api: client.AppsV1Api) -> None:
    provisioner = KubernetesProvisioner(pool(), api=api)
    assert provisioner.pool == "burst"
    assert provisioner.hosts() == 1
    fake.replicas[("default", "soafarm-worker")] = 4
    assert provisioner.hosts() == 4
    assert fake.methods() == ["GET", "GET"]
    assert all(
        urlsplit(r.path).path == "/apis/apps/v1/namespaces/default/deployments/soafarm-worker/scale"
        for r in fake.requests
    )
    provisioner.close()


def test_scale_sends_one_merge_patch(fake: FakeCluster, api: client.AppsV1Api) -> None:
    provisioner = KubernetesProvisioner(pool(), api=api)
    provisioner.scale(3, idle_first=["host-a", "host-b"])

    patches = fake.patches()
    assert len(patches) == 1
    patch = patches[0]
    assert urlsplit(patch.path).path == (
        "/apis/apps/v1/namespaces/default/deployments/soafarm-worker/scale"
    )
    assert patch.body == {"spec": {"replicas": 3}}
    assert patch.content_type in PATCH_TYPES
    assert fake.replicas[("default", "soafarm-worker")] == 3
    assert provisioner.hosts() == 3


def test_scale_to_the_same_value_sends_no_patch(fake: FakeCluster, api: client.AppsV1Api) -> None:
    provisioner = KubernetesProvisioner(pool(), api=api)
    provisioner.scale(1)
    assert fake.patches() == []
    assert fake.methods() == ["GET"]


def test_scale_clamps_to_the_pool_bounds(fake: FakeCluster, api: client.AppsV1Api) -> None:
    provisioner = KubernetesProvisioner(pool(min_hosts=2, max_hosts=4), api=api)

    provisioner.scale(10)
    assert [p.body for p in fake.patches()] == [{"spec": {"replicas": 4}}]

    provisioner.scale(0)
    assert [p.body for p in fake.patches()][-1] == {"spec": {"replicas": 2}}
    assert provisioner.hosts() == 2

    # already at the bound: clamping leaves nothing to do
    provisioner.scale(-3)
    assert len(fake.patches()) == 2


def test_other_namespace_and_deployment(fake: FakeCluster, api: client.AppsV1Api) -> None:
    fake.replicas[("farm", "gpu-workers")] = 0
    provisioner = KubernetesProvisioner(
        pool(deployment="gpu-workers", kubernetes_namespace="farm"), api=api
    )
    provisioner.scale(2)
    (patch,) = fake.patches()
    path = urlsplit(patch.path).path
    assert path == "/apis/apps/v1/namespaces/farm/deployments/gpu-workers/scale"
    assert fake.replicas[("farm", "gpu-workers")] == 2
    assert fake.replicas[("default", "soafarm-worker")] == 1


def test_missing_deployment_raises_provisioner_error(
    fake: FakeCluster, api: client.AppsV1Api
) -> None:
    provisioner = KubernetesProvisioner(pool(deployment="nothing-here"), api=api)
    with pytest.raises(ProvisionerError, match=r"default/nothing-here") as info:
        provisioner.hosts()
    assert "404 Not Found" in str(info.value)
    assert "\n" not in str(info.value)

    with pytest.raises(ProvisionerError, match=r"cannot scale deployment default/nothing-here"):
        provisioner.scale(2)
    assert fake.patches() == []


def test_unreachable_api_raises_provisioner_error(api: client.AppsV1Api) -> None:
    # a port nothing listens on: bind, note it, close
    with FakeServer(FakeCluster()) as probe:
        port = probe.server_address[1]
    configuration = client.Configuration(host=f"http://127.0.0.1:{port}")
    configuration.retries = 0
    with client.ApiClient(configuration) as api_client:
        provisioner = KubernetesProvisioner(pool(), api=client.AppsV1Api(api_client))
        expected = r"cannot read deployment default/soafarm-worker"
        with pytest.raises(ProvisionerError, match=expected):
            provisioner.hosts()


def write_kubeconfig(path: Path, server: str) -> Path:
    """A minimal valid kubeconfig with one context, "fake", aimed at `server`."""
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": "fake", "cluster": {"server": server}}],
        "users": [{"name": "fake", "user": {"token": "not-a-secret"}}],
        "contexts": [{"name": "fake", "context": {"cluster": "fake", "user": "fake"}}],
        "current-context": "fake",
    }
    path.write_text(json.dumps(config))  # JSON is YAML
    return path


def test_unknown_context_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    kubeconfig = write_kubeconfig(tmp_path / "kubeconfig", "http://127.0.0.1:1")
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    with pytest.raises(ConfigError, match=r"context 'nope'") as info:
        KubernetesProvisioner(pool(kubernetes_context="nope"))
    message = str(info.value)
    assert "\n" not in message
    assert str(kubeconfig) in message
    assert "kubernetes_context" in message


def test_missing_kubeconfig_is_a_config_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    with pytest.raises(ConfigError, match=r"cannot load the kubeconfig current context"):
        KubernetesProvisioner(pool())


def test_kubeconfig_context_reaches_the_server(
    fake: FakeCluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "kubeconfig", fake.url)))
    provisioner = KubernetesProvisioner(pool(kubernetes_context="fake"))
    try:
        assert provisioner.hosts() == 1
        provisioner.scale(2)
    finally:
        provisioner.close()
    assert [p.body for p in fake.patches()] == [{"spec": {"replicas": 2}}]


def test_missing_package_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kubernetes", None)
    with pytest.raises(ConfigError) as info:
        KubernetesProvisioner(pool())
    assert str(info.value) == MISSING_PACKAGE
