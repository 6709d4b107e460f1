"""Provisioners: start and stop worker hosts for the autoscaler, one per pool."""

from __future__ import annotations

from soafarm.config import PoolSettings, Settings
from soafarm.provisioning import Provisioner


def make_provisioner(pool: PoolSettings, settings: Settings) -> Provisioner:
    """The provisioner a pool's settings name."""
    if pool.provisioner == "kubernetes":
        from soafarm.workers.provisioners.kubernetes import KubernetesProvisioner

        return KubernetesProvisioner(pool)
    from soafarm.workers.provisioners.local import LocalProvisioner

    return LocalProvisioner(pool, settings)


__all__ = ["Provisioner", "make_provisioner"]
