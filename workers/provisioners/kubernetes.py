"""The Kubernetes provisioner: a pool is the replicas of one Deployment running `soafarm worker`.

The autoscaler only ever changes the Deployment's `replicas`, through its scale subresource
(RBAC: get/patch on `deployments/scale`, see compose/kubernetes/autoscaler-rbac.yaml).
Kubernetes starts and stops the pods; a stopped pod gets SIGTERM, which `soafarm worker`
turns into a drain, and the manifest's `terminationGracePeriodSeconds` gives it time to finish
the calls it holds before the kubelet sends SIGKILL.

The official `kubernetes` client is an optional extra (`pip install 'soafarm[kubernetes]'`),
so it is imported only when a provisioner is built.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import structlog

from soafarm.config import PoolSettings
from soafarm.errors import ConfigError, ProvisionerError

if TYPE_CHECKING:
    from kubernetes.client import AppsV1Api

log = structlog.get_logger(__name__)

#: The one line shown when the optional extra is not installed.
MISSING_PACKAGE = (
    "the kubernetes provisioner needs the kubernetes package: pip install 'soafarm[kubernetes]'"
)

#: Seconds one API request may take before it fails (a hung API server must not hang the
#: autoscaler's loop).
REQUEST_TIMEOUT = 30.0

#: The patch type sent to the scale subresource: a JSON merge patch `{"spec": {"replicas": n}}`
#: (what `kubectl scale` sends), set explicitly rather than left to the client's choice.
MERGE_PATCH = "application/merge-patch+json"


def _require_kubernetes() -> None:
    """Raise ConfigError with the install hint when the `kubernetes` package is missing."""
    try:
        import kubernetes  # noqa: F401
    except ImportError:
        raise ConfigError(MISSING_PACKAGE) from None


def _api_errors() -> tuple[type[Exception], ...]:
    """The exceptions an API call raises when the cluster answers with an error or not at all."""
    _require_kubernetes()
    import urllib3.exceptions
    from kubernetes.client.exceptions import ApiException

    return (ApiException, urllib3.exceptions.HTTPError)


def connect(pool: PoolSettings) -> AppsV1Api:
    """An apps/v1 API client for `pool`: the in-cluster config when running in a pod and no
    `kubernetes_context` is set, else the kubeconfig (`$KUBECONFIG` or ~/.kube/config) with
    that context (empty: the current context). Raises ConfigError when neither loads."""
    _require_kubernetes()
    from kubernetes import client, config

    configuration = client.Configuration()
    in_cluster = bool(os.environ.get("KUBERNETES_SERVICE_HOST")) and not pool.kubernetes_context
    # The client reads $KUBECONFIG once, at import; read it now so a changed value counts.
    kubeconfig = os.environ.get("KUBECONFIG") or None
    try:
        if in_cluster:
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(
                config_file=kubeconfig,
                context=pool.kubernetes_context or None,
                client_configuration=configuration,
                persist_config=False,
            )
    # Anything that stops the config from loading (missing or malformed file, unknown context,
    # a failing credential plugin) means the same to the user: fix the configuration.
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        if in_cluster:
            raise ConfigError(
                f"kubernetes pool {pool.name!r}: cannot load the in-cluster config ({reason}); "
                "mount the pod's service account token, or set kubernetes_context to use a "
                "kubeconfig"
            ) from None
        where = kubeconfig or config.KUBE_CONFIG_DEFAULT_LOCATION
        context = (
            f"context {pool.kubernetes_context!r}" if pool.kubernetes_context else "current context"
        )
        raise ConfigError(
            f"kubernetes pool {pool.name!r}: cannot load the kubeconfig {context} from {where} "
            f"({reason}); set KUBECONFIG to a valid kubeconfig and kubernetes_context to one "
            "of `kubectl config get-contexts`"
        ) from None
    return client.AppsV1Api(client.ApiClient(configuration))


def _describe(exc: Exception) -> str:
    """One line for an API or connection error: "404 Not Found (the API server's message)"."""
    status = getattr(exc, "status", None)
    if status is None:
        return " ".join(str(exc).split()) or type(exc).__name__
    text = f"{status} {getattr(exc, 'reason', '') or ''}".strip()
    try:
        message = json.loads(getattr(exc, "body", None) or "").get("message")
    except (ValueError, AttributeError):
        message = None
    return f"{text} ({message})" if isinstance(message, str) and message else text


class KubernetesProvisioner:
    """Grows and shrinks a pool by setting the replicas of its Deployment.

    `pool` names the Deployment (`deployment`, `kubernetes_namespace`) and the bounds
    (`min_hosts`, `max_hosts`); `api` is an `AppsV1Api` to use (tests pass one aimed at a fake
    server), else one is built by `connect()` and released by `close()`.
    """

    def __init__(self, pool: PoolSettings, api: AppsV1Api | None = None) -> None:
        #: The pool's name (what the autoscaler and `soafarm worker --pool` call it).
        self.pool: str = pool.name
        #: The pool's settings: Deployment, namespace and bounds.
        self.settings = pool
        self._errors = _api_errors()
        self._owns_api = api is None
        #: The apps/v1 API client every request goes through.
        self.api: AppsV1Api = connect(pool) if api is None else api

    @property
    def deployment(self) -> str:
        """The Deployment as "namespace/name" (how messages and logs name it)."""
        return f"{self.settings.kubernetes_namespace}/{self.settings.deployment}"

    def _fail(self, action: str, exc: Exception) -> ProvisionerError:
        """The ProvisionerError for a failed `action` ("read", "scale") on the Deployment."""
        return ProvisionerError(
            f"kubernetes: cannot {action} deployment {self.deployment}: {_describe(exc)}"
        )

    def _replicas(self, action: str) -> int:
        """The Deployment's `spec.replicas` (0 when unset), read from its scale subresource."""
        try:
            scale = self.api.read_namespaced_deployment_scale(
                self.settings.deployment,
                self.settings.kubernetes_namespace,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except self._errors as exc:
            raise self._fail(action, exc) from exc
        spec = scale.spec
        return (spec.replicas or 0) if spec is not None else 0

    def hosts(self) -> int:
        """The replicas the Deployment asks for (`spec.replicas`), counting pods still starting
        or not yet scheduled. Raises ProvisionerError when the API cannot be read."""
        return self._replicas("read")

    def scale(self, target: int, idle_first: Sequence[str] = ()) -> None:
        """Set the Deployment's replicas to `target`, clamped to [min_hosts, max_hosts]; no
        request is sent when it already has that many. Raises ProvisionerError on API errors.

        `idle_first` is ignored: Kubernetes picks which pods a shrinking Deployment deletes.
        Steering that choice would need a `controller.kubernetes.io/pod-deletion-cost`
        annotation written on each pod before every scale-down, which is not done; the pods
        that go drain (SIGTERM), so no call is lost, only possibly a busier host stops first.
        """
        wanted = max(self.settings.min_hosts, min(self.settings.max_hosts, target))
        current = self._replicas("scale")
        if wanted == current:
            return
        try:
            self.api.patch_namespaced_deployment_scale(
                self.settings.deployment,
                self.settings.kubernetes_namespace,
                body={"spec": {"replicas": wanted}},
                _content_type=MERGE_PATCH,
                _request_timeout=REQUEST_TIMEOUT,
            )
        except self._errors as exc:
            raise self._fail("scale", exc) from exc
        log.info(
            "pool_scaled",
            pool=self.pool,
            replicas=wanted,
            previous=current,
            deployment=self.deployment,
        )

    def close(self) -> None:
        """Leave the Deployment running as it is; only release the HTTP connections of an API
        client this provisioner built itself."""
        if self._owns_api:
            self._owns_api = False
            self.api.api_client.close()
