"""What every provisioner does: turn a pool's target number of hosts into running hosts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol


class Provisioner(Protocol):
    """Starts and stops worker hosts of one pool.

    The autoscaler calls `scale()` with the number of hosts it wants; a provisioner never
    kills a host outright: hosts it stops get SIGTERM (or a pod deletion, whose SIGTERM the
    worker turns into a drain), finish and acknowledge what they hold, then deregister.
    """

    pool: str

    def hosts(self) -> int:
        """Hosts this pool has now, counting those still starting (what was asked for)."""
        ...

    def scale(self, target: int, idle_first: Sequence[str] = ()) -> None:
        """Make the pool `target` hosts. When shrinking, stop hosts named in `idle_first`
        (host ids, least busy first) before others, where the provisioner can choose."""
        ...

    def close(self) -> None:
        """Release what the provisioner holds (a local provisioner stops its hosts)."""
        ...
