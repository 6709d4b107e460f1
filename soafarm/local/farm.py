"""A local farm: a broker daemon and worker hosts as child processes of this one.

Used by `soafarm up` (foreground farm for a laptop or single server) and `soafarm demo`.
The children are the same `soafarm broker` / `soafarm worker` commands an operator runs on
separate machines, started with this process's effective settings.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from types import TracebackType
from typing import Self

import redis
import structlog

from soafarm.client.control import ControlClient
from soafarm.config import Settings, child_environment
from soafarm.errors import BrokerUnavailable, SoafarmError
from soafarm.names import Names
from soafarm.processes import RestartPolicy, stop_processes, with_parent
from soafarm.state.control import PingArgs
from soafarm.state.hosts import HostStore
from soafarm.state.namespace import NamespaceDeleted, delete_namespace_state
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.identity import own_user

log = structlog.get_logger(__name__)

STOP_TIMEOUT = 45.0


def delete_namespace(settings: Settings) -> NamespaceDeleted:
    """Delete every queue and key of `settings.namespace` (see
    `soafarm.state.namespace.delete_namespace_state`; `soafarm namespace delete` checks
    first that no host or broker daemon uses it).

    Only for namespaces nobody else uses: it removes the sessions' pending requests too.
    """
    client = redis_client(settings)
    try:
        connection = pika_connection(settings, f"soafarm-cleanup {settings.namespace}")
        try:
            return delete_namespace_state(
                client, connection, Names(settings.namespace), own_user(settings)
            )
        finally:
            if connection.is_open:
                connection.close()
    finally:
        client.close()


SUPERVISE_INTERVAL = 0.1
#: Back-off for the farm's own processes: the first crash in a row restarts at once (a
#: SIGKILLed broker is back within a second), a crash loop (Redis down at start, say) waits
#: 0.5 s doubling to 10 s, so it costs little and recovers soon after its cause goes.
FARM_RESTART_POLICY = RestartPolicy(base=0.5, cap=10.0, free_restarts=1, healthy_after=30.0)


@dataclass
class Child:
    """One child process of the farm: what it runs, and its restart history."""

    name: str
    #: The `soafarm` command line (after `python -m soafarm`).
    args: tuple[str, ...]
    proc: subprocess.Popen[bytes]
    #: When `proc` started (monotonic clock).
    started: float
    #: A worker host's id; a restarted host gets `<id>-restart<N>`, which `soafarm hosts` shows.
    host_id: str | None = None
    #: Times the supervisor started it again.
    restarts: int = 0
    #: Exits in a row without a healthy run (the back-off's input).
    failures: int = 0
    #: Set once it has exited on its own: its exit code, and when it starts again.
    code: int | None = None
    due: float | None = None

    #: The back-off before its latest restart, in seconds.
    delay: float = 0.0
    #: Settings of its own (`SOAFARM_*` variables over the farm's), restarts included.
    env: dict[str, str] = field(default_factory=dict)
    #: A command it runs under, restarts included (`ip netns exec NAME`: another machine).
    prefix: tuple[str, ...] = ()

    def command(self) -> list[str]:
        """The command line of its next start."""
        return command_line(self.args, self.host_id, self.restarts)


def command_line(args: tuple[str, ...], host_id: str | None, restarts: int) -> list[str]:
    """`args`, with a worker host's `--name` (which says how often it was restarted)."""
    if host_id is None:
        return list(args)
    suffix = f"-restart{restarts}" if restarts else ""
    return [*args, "--name", host_id + suffix]


class LocalFarm:
    """Broker + `workers` worker hosts (each offering `cores` cores; 0 = all), and with
    `autoscale` the autoscaler, which starts and stops more hosts with the load.

    With `supervise`, a child that exits on its own (crash, SIGKILL, OOM killer) is started
    again after `policy`'s back-off (logged as `process_exited` / `process_restarted`);
    only `stop()` stops the farm. Without it, the caller sees exits through `check()` (tests
    that kill a process on purpose and watch the broker cope). Either way every child gets
    SIGTERM from Linux when this process dies (`soafarm.processes.follow_parent`); Linux
    sends it when the *thread* that started the child ends, so call `start()` from a thread
    that outlives the farm (the main thread).
    """

    def __init__(  # noqa: PLR0917 - plain knobs, given by name
        self,
        settings: Settings,
        workers: int = 1,
        cores: int = 0,
        autoscale: bool = False,
        supervise: bool = False,
        policy: RestartPolicy = FARM_RESTART_POLICY,
    ) -> None:
        """Nothing starts until `start()`."""
        self.settings = settings
        self.workers = workers
        self.cores = cores
        self.autoscale = autoscale
        self.supervise = supervise
        self.policy = policy
        self.children: list[Child] = []
        self._lock = threading.RLock()
        self._stopping = threading.Event()
        #: Set once stop() has stopped every child: only then may the supervisor thread end.
        self._stopped = threading.Event()
        self._supervisor: threading.Thread | None = None
        self._hosts: HostStore | None = None

    @property
    def procs(self) -> list[tuple[str, subprocess.Popen[bytes]]]:
        """`(name, process)` of each child as it runs now."""
        with self._lock:
            return [(c.name, c.proc) for c in self.children]

    @property
    def restarts(self) -> int:
        """Restarts of crashed children so far."""
        with self._lock:
            return sum(c.restarts for c in self.children)

    def _popen(
        self, args: list[str], own: dict[str, str] | None = None, prefix: tuple[str, ...] = ()
    ) -> subprocess.Popen[bytes]:
        env = with_parent(child_environment(self.settings))
        if self.cores:
            env["SOAFARM_WORKER_CORES"] = str(self.cores)
        env.update(own or {})
        return subprocess.Popen([*prefix, sys.executable, "-m", "soafarm", *args], env=env)

    def _spawn(
        self,
        what: str,
        *args: str,
        host_id: str | None = None,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> Child:
        proc = self._popen(command_line(args, host_id, 0), env, prefix)
        child = Child(what, args, proc, time.monotonic(), host_id, env=env or {}, prefix=prefix)
        with self._lock:
            self.children.append(child)
        return child

    def add_worker(
        self,
        host_id: str,
        cores: int = 1,
        pool: str = "default",
        labels: str = "",
        *,
        timeout: float = 60.0,
        env: dict[str, str] | None = None,
        prefix: tuple[str, ...] = (),
    ) -> None:
        """Start one more worker host named `host_id` with settings of its own (`cores`,
        `pool`, `labels` as "key=value,key=value", and any `SOAFARM_*` variables in `env`),
        run under `prefix` if given (`ip netns exec NAME`: another machine), tracked like the
        others (supervised, stopped by `stop()`); return once its heartbeat is in Redis.
        Works before or after `start()`."""
        env = {
            "SOAFARM_WORKER_CORES": str(cores),
            "SOAFARM_WORKER_POOL": pool,
            "SOAFARM_WORKER_LABELS": labels,
            **(env or {}),
        }
        child = self._spawn(f"worker {host_id}", "worker", host_id=host_id, env=env, prefix=prefix)
        hosts = HostStore(redis_client(self.settings), Names(self.settings.namespace))
        try:
            deadline = time.monotonic() + timeout
            while not hosts.alive([host_id]):
                code = child.proc.poll()
                if code is not None and not self.supervise:
                    raise SoafarmError(
                        f"worker host {host_id} exited with code {code}; see its log above"
                    )
                if time.monotonic() > deadline:
                    raise SoafarmError(
                        f"worker host {host_id} did not register within {timeout:g}s"
                    )
                time.sleep(0.05)  # polling Redis for the registration, with a deadline
        finally:
            hosts.close()

    def check(self) -> None:
        """Raise if a child process has exited (it logged why on stderr)."""
        for what, proc in self.procs:
            code = proc.poll()
            if code is not None:
                raise SoafarmError(f"the farm's {what} exited with code {code}; see its log above")

    def _refuse_if_served(self) -> None:
        """A second farm in a namespace would put two brokers on one control queue."""
        control = ControlClient(self.settings)  # ConnectionFailed: RabbitMQ is unreachable
        try:
            control.request(PingArgs(), timeout=self.settings.client.control_timeout)
        except BrokerUnavailable:
            return  # nobody consumes the control queue
        finally:
            control.close()
        raise SoafarmError(
            f"a broker daemon already serves namespace {self.settings.namespace!r} (another "
            "`soafarm up` or `soafarm broker`); stop it, or start this farm in another "
            "namespace with --namespace NAME"
        )

    def start(self, timeout: float = 60.0) -> None:
        """Start the broker, then the worker hosts; return once all have registered.

        Refuses (SoafarmError) when a broker daemon already answers in the namespace. A child
        that exits before the farm is up fails the start (a bad setup says so at once, even
        when supervised); supervision begins once the farm is up.
        """
        self._refuse_if_served()
        self._spawn("broker", "broker")
        prefix = f"{socket.gethostname()}-{os.getpid()}"
        for i in range(self.workers):
            self._spawn(f"worker {i}", "worker", host_id=f"{prefix}-w{i}")
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
        if self.supervise:
            self._stopping.clear()
            self._stopped.clear()
            self._supervisor = threading.Thread(
                target=self._supervise, name="farm-supervisor", daemon=True
            )
            self._supervisor.start()
        log.info("farm_started", workers=self.workers, namespace=self.settings.namespace)

    def _supervise(self) -> None:
        # Linux sends a child's parent-death signal when the *thread* that started it exits:
        # this thread lives until stop() has stopped every child it restarted, so they get
        # one SIGTERM (stop_processes'), not a second one from the kernel mid-drain.
        while not self._stopped.wait(SUPERVISE_INTERVAL):
            if self._stopping.is_set():
                continue  # stopping: restart nothing, but stay alive for the children
            try:
                self.supervise_once(time.monotonic())
            except Exception as e:  # keep supervising whatever one round ran into
                log.exception("supervisor_error", error=repr(e))

    def supervise_once(self, now: float) -> None:
        """One round: note children that exited, start those whose back-off has passed."""
        with self._lock:
            if self._stopping.is_set():
                return
            for child in self.children:
                if child.due is None:
                    code = child.proc.poll()
                    if code is None:
                        continue
                    decision = self.policy.decide(child.failures, now - child.started)
                    child.failures, child.code = decision.failures, code
                    child.delay, child.due = decision.delay, now + decision.delay
                    log.warning(
                        "process_exited",
                        process=child.name,
                        pid=child.proc.pid,
                        code=code,
                        restart_in=decision.delay,
                    )
                    if child.args[0] == "worker":
                        self._expire_host(child.proc.pid)
                if now >= child.due:
                    child.restarts += 1
                    child.proc = self._popen(child.command(), child.env, child.prefix)
                    child.started, child.due = now, None
                    log.warning(
                        "process_restarted",
                        process=child.name,
                        code=child.code,
                        restarts=child.restarts,
                        failures=child.failures,
                        delay=child.delay,
                        pid=child.proc.pid,
                    )

    def _expire_host(self, pid: int) -> None:
        """A dead worker host's heartbeat ends now, not after `worker.host_timeout`: the
        broker's lost-host round frees its units for the restarted host at once."""
        try:
            if self._hosts is None:
                self._hosts = HostStore(redis_client(self.settings), Names(self.settings.namespace))
            here = socket.gethostname()
            for record in self._hosts.hosts().values():
                if record.pid == pid and record.hostname == here:
                    self._hosts.beat(record, timeout=0.001)  # the key expires in 1 ms
        except (redis.RedisError, SoafarmError) as e:
            log.warning("host_expiry_failed", error=str(e))

    def restart_broker(self) -> None:
        """Kill the broker daemon (SIGKILL, as a crash) and start a new one."""
        with self._lock:
            for child in self.children:
                if child.name == "broker":
                    if child.proc.poll() is None:
                        child.proc.kill()
                        child.proc.wait()
                    child.proc = self._popen(child.command(), child.env, child.prefix)
                    child.started, child.due = time.monotonic(), None

    def wait(self) -> None:
        """Block until a signal interrupts. Unsupervised, raise once a child exits;
        supervised, raise only if the supervisor itself ended."""
        while True:
            if self._supervisor is None:
                self.check()
            elif not self._supervisor.is_alive():
                raise SoafarmError("the farm's supervisor stopped; see its log above")
            time.sleep(0.5)

    def stop_supervising(self) -> None:
        """Restart nothing from now on (safe from a signal handler): a Ctrl-C in a terminal
        reaches the children too, and they must not be started again as they stop."""
        self._stopping.set()

    def stop(self) -> None:
        """Stop the autoscaler (it drains its hosts) and worker hosts first, then the
        broker."""
        self._stopping.set()  # no restart from here on
        with self._lock:
            stop_processes(list(reversed(self.procs)), STOP_TIMEOUT)
            self.children.clear()
        self._stopped.set()
        if self._supervisor is not None:
            self._supervisor.join()
            self._supervisor = None
        if self._hosts is not None:
            self._hosts.close()
            self._hosts = None

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
