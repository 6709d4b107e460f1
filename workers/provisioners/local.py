"""The local provisioner: worker hosts as `soafarm worker` processes on this machine."""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from collections.abc import Sequence

import structlog

from soafarm.config import PoolSettings, Settings, child_environment
from soafarm.processes import stop_processes, with_parent

log = structlog.get_logger(__name__)

#: Seconds `close()` waits for draining hosts before killing them.
STOP_TIMEOUT = 45.0


class LocalProvisioner:
    """Starts and stops `soafarm worker --pool P --cores C` child processes.

    A stopped host gets SIGTERM and drains (its instances finish their calls and hand back
    requests they had not started); it is no longer counted from that moment.
    """

    def __init__(self, pool: PoolSettings, settings: Settings) -> None:
        """Nothing starts until `scale()`."""
        self.pool = pool.name
        self.pool_settings = pool
        # each host gets SIGTERM from Linux when this process dies (and polls for it too)
        self.env = with_parent(child_environment(settings))
        self.running: dict[str, subprocess.Popen[bytes]] = {}  # host id -> process
        self.stopping: list[subprocess.Popen[bytes]] = []

    def _reap(self) -> None:
        for host_id, proc in list(self.running.items()):
            if proc.poll() is not None:
                log.warning("host_exited", pool=self.pool, host_id=host_id, code=proc.returncode)
                del self.running[host_id]
        self.stopping = [p for p in self.stopping if p.poll() is None]

    def hosts(self) -> int:
        """Hosts started and not asked to stop (dead ones are forgotten)."""
        self._reap()
        return len(self.running)

    def scale(self, target: int, idle_first: Sequence[str] = ()) -> None:
        """Start or stop worker processes until `target` (within min/max_hosts) run."""
        target = max(self.pool_settings.min_hosts, min(self.pool_settings.max_hosts, target))
        self._reap()
        while len(self.running) < target:
            host_id = f"{self.pool}-{uuid.uuid4().hex[:8]}"
            args = ["worker", "--name", host_id, "--pool", self.pool, "--stop-with-parent"]
            args += ["--cores", str(self.pool_settings.cores_per_host)]
            self.running[host_id] = subprocess.Popen(
                [sys.executable, "-m", "soafarm", *args], env=self.env
            )
            log.info("host_provisioned", pool=self.pool, host_id=host_id)
        # idle hosts first, then the newest (they hold the least warm work)
        order = [h for h in idle_first if h in self.running]
        order += [h for h in reversed(self.running) if h not in order]
        for host_id in order[: max(0, len(self.running) - target)]:
            proc = self.running.pop(host_id)
            proc.send_signal(signal.SIGTERM)
            self.stopping.append(proc)
            log.info("host_released", pool=self.pool, host_id=host_id)

    def close(self) -> None:
        """Stop every host of this pool (draining) and wait for them."""
        procs = [(f"host {h}", p) for h, p in self.running.items()]
        procs += [("stopping host", p) for p in self.stopping]
        self.running.clear()
        stop_processes(procs, STOP_TIMEOUT)
        self.stopping.clear()
