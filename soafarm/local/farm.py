"""A local farm: a broker daemon and worker hosts as child processes of this one.

Used by `soafarm up` (foreground farm for a laptop or single server) and `soafarm demo`.
The children are the same `soafarm broker` / `soafarm worker` commands an operator runs on
separate machines, started with this process's effective settings.
"""

from __future__ import annotations

import subprocess
import sys
import time
from types import TracebackType
from typing import Self

import structlog

from soafarm.client.control import ControlClient
from soafarm.config import Settings, child_environment
from soafarm.errors import BrokerUnavailable, SoafarmError
from soafarm.names import Names
from soafarm.processes import stop_processes
from soafarm.state.namespace import delete_namespace_keys
from soafarm.state.sessions import SessionStore
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.topology import control_queue, dead_letter_queue

log = structlog.get_logger(__name__)

STOP_TIMEOUT = 45.0


def delete_namespace(settings: Settings) -> None:
    """Delete every queue and key of `settings.namespace` (a private demo or test farm's).

    Only for namespaces nobody else uses: it removes the sessions' pending requests too.
    """
    names = Names(settings.namespace)
    client = redis_client(settings)
    sessions = SessionStore(client, names)
    queues = [control_queue(names).name, dead_letter_queue(names).name]
    for sid in sessions.open_ids():
        queues.append(names.request_queue(sid))
        queues += [names.response_queue(sid, c) for c in sessions.clients(sid)]
    connection = pika_connection(settings, f"soafarm-cleanup {settings.namespace}")
    try:
        channel = connection.channel()
        for queue in queues:
            channel.queue_delete(queue=queue)
    finally:
        connection.close()
    delete_namespace_keys(client, names)
    sessions.close()


class LocalFarm:
    """Broker + `workers` worker hosts (each offering `cores` cores; 0 = all), and with
    `autoscale` the autoscaler, which starts and stops more hosts with the load."""

    def __init__(
        self, settings: Settings, workers: int = 1, cores: int = 0, autoscale: bool = False
    ) -> None:
        """Nothing starts until `start()`."""
        self.settings = settings
        self.workers = workers
        self.cores = cores
        self.autoscale = autoscale
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def _spawn(self, what: str, *args: str) -> None:
        env = child_environment(self.settings)
        if self.cores:
            env["SOAFARM_WORKER_CORES"] = str(self.cores)
        proc = subprocess.Popen([sys.executable, "-m", "soafarm", *args], env=env)
        self.procs.append((what, proc))

    def check(self) -> None:
        """Raise if a child process has exited (it logged why on stderr)."""
        for what, proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise SoafarmError(f"the farm's {what} exited with code {code}; see its log above")

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker, then the worker hosts; return once all have registered."""
        self._spawn("broker", "broker")
        for i in range(self.workers):
            self._spawn(f"worker {i}", "worker")
        if self.autoscale:
            self._spawn("autoscaler", "autoscaler")
        deadline = time.monotonic() + timeout
        control = None
        try:
            while True:
                self.check()
                try:
                    control = control or ControlClient(self.settings)
                    if len(control.call("hosts", timeout=5)) >= self.workers:
                        break
                except BrokerUnavailable:
                    pass
                if time.monotonic() > deadline:
                    raise SoafarmError(f"the local farm did not come up within {timeout:g}s")
                time.sleep(0.1)
        except BaseException:
            self.stop()
            raise
        finally:
            if control is not None:
                control.close()
        log.info("farm_started", workers=self.workers, namespace=self.settings.namespace)

    def restart_broker(self) -> None:
        """Kill the broker daemon (SIGKILL, as a crash) and start a new one."""
        for what, proc in self.procs:
            if what == "broker" and proc.poll() is None:
                proc.kill()
                proc.wait()
        self.procs = [(w, p) for w, p in self.procs if w != "broker"]
        self._spawn("broker", "broker")

    def wait(self) -> None:
        """Block until a child exits (or a signal interrupts), then raise if one did."""
        while True:
            self.check()
            time.sleep(0.5)

    def stop(self) -> None:
        """Stop the autoscaler (it drains its hosts) and worker hosts first, then the
        broker."""
        stop_processes(list(reversed(self.procs)), STOP_TIMEOUT)
        self.procs.clear()

    def __enter__(self) -> Self:
        """Start the farm."""
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        """Stop the farm."""
        self.stop()
