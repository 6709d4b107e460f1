"""The worker host agent: registers with cores and a heartbeat, runs assigned instances.

The broker writes "session S: N instances" into this host's assignment hash in Redis and
pushes to its wake list; the host reconciles its child processes at once (and at every
heartbeat anyway), starting instances with `python -m soafarm.workers.instance` and stopping extras
with SIGTERM, which lets them finish and acknowledge what they hold (drain).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field

import redis
import structlog

from soafarm.config import Settings, child_environment
from soafarm.metrics import Health, MetricsServer, serve_metrics
from soafarm.names import Names
from soafarm.processes import ChildProcess, Restart, RestartPolicy, reap_strays, with_parent
from soafarm.registration.packages import farm_registry
from soafarm.resources import HostSize, capacity
from soafarm.state.hosts import HostStore
from soafarm.state.instances import InstanceStore
from soafarm.state.records import HostRecord, SessionRecord, SessionState
from soafarm.state.sessions import SessionStore
from soafarm.state.usage import UsageStore
from soafarm.transport.connections import redis_client
from soafarm.workers.instance import (
    DRAIN_GRACE_SECONDS,
    EXIT_LOAD_FAILED,
    EXIT_RECYCLED,
    EXIT_TIMED_OUT,
    InstanceSpec,
)
from soafarm.workers.metrics import HostMetrics, HostView
from soafarm.workers.warm import WarmPool

log = structlog.get_logger(__name__)

STOP_GRACE_SECONDS = DRAIN_GRACE_SECONDS
#: Back-off for a service that keeps failing soon after it starts (non-zero exits, crash
#: signals): 0.2 s doubling to 5 s, counted afresh after 10 s of serving. A restart costs an
#: interpreter start plus the service's import and constructor (about 0.3 s of one core
#: here), so at one try per 5 s a crash loop costs a few percent of a core, and a session
#: whose cause is fixed (a file restored, Redis back) runs again within 5 s, not 30.
INSTANCE_CRASH_POLICY = RestartPolicy(base=0.2, cap=5.0, free_restarts=0, healthy_after=10.0)
#: Signals that end an instance from outside (an operator, a chaos test, the OOM killer's
#: SIGKILL), as opposed to the service crashing itself (SIGSEGV, SIGABRT, ...).
EXTERNAL_SIGNALS = frozenset(
    {signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT}
)


def instance_restart(code: int, ran_for: float, failures: int) -> Restart:
    """When to start a new instance after one exited with `code` on its own (not asked to
    stop, not a load failure) after `ran_for` seconds, `failures` being the crash-loop count
    before it.

    Killed from outside, timed out (5) or recycled for memory (6): at once, and the count
    stays, since waiting stops neither whoever kills nor the redelivered batch that needs a
    unit. Only the service failing by itself backs off (`INSTANCE_CRASH_POLICY`); a poison
    request is stopped by `message_resend_limit`, not by this back-off.
    """
    if code in {EXIT_TIMED_OUT, EXIT_RECYCLED} or -code in EXTERNAL_SIGNALS:
        return Restart(0.0, failures)
    return INSTANCE_CRASH_POLICY.decide(failures, ran_for)


#: Seconds after its service failed to load before a host starts an instance of the session
#: again, if the broker still assigns it one (normally the broker's exclusion has dropped
#: the assignment within a second, and no retry happens here).
LOAD_FAILED_RETRY = 10.0


@dataclass
class SessionProcs:
    """Instance processes of one session on this host, and its restart back-off."""

    running: list[tuple[str, ChildProcess]] = field(default_factory=list)
    started: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    next_start: float = 0.0
    counter: int = 0
    #: its session is closed (or gone): start nothing more until the broker drops it
    ended: bool = False


@dataclass(frozen=True)
class ReconcilePlan:
    """What one reconcile does: instances to stop and start per session, sessions to drop."""

    #: session id -> how many of its running instances get SIGTERM (newest first)
    stop: dict[int, int]
    #: session id -> how many instances to start now
    start: dict[int, int]
    #: sessions this host no longer serves: their restart back-off and load failure are
    #: forgotten, so a later assignment starts afresh
    drop: frozenset[int]


def plan_reconcile(
    sessions: Mapping[int, SessionProcs], wanted: Mapping[int, int], now: float
) -> ReconcilePlan:
    """Decide, without side effects, how to make each session run what `wanted` says.

    Extra instances stop at once; missing ones start only once the session's restart
    back-off (`next_start`, on the monotonic clock `now`) has passed. After its service
    failed to load here the broker excludes this host for it, which drops the assignment;
    one still standing LOAD_FAILED_RETRY later (the broker missed the failure, or had no
    leader) is tried again, which reports the failure afresh, rather than held for ever.
    """
    stop: dict[int, int] = {}
    start: dict[int, int] = {}
    drop: set[int] = set()
    for sid in set(sessions) | set(wanted):
        procs = sessions.get(sid) or SessionProcs()
        want = wanted.get(sid, 0)
        running = len(procs.running)
        if running > want:
            stop[sid] = running - want
        elif running < want and now >= procs.next_start and not procs.ended:
            start[sid] = want - running
        if want == 0:
            drop.add(sid)
    return ReconcilePlan(stop, start, frozenset(drop))


class WorkerHost:
    """One worker host. `run()` blocks until `stop()` (or a signal)."""

    def __init__(
        self,
        settings: Settings,
        name: str | None = None,
        stop_with_parent: bool = False,
        client: redis.Redis | None = None,
    ) -> None:
        """Connect to Redis now (unless given `client`), so a wrong URL fails fast with a
        clear error. With `stop_with_parent` (hosts a local provisioner starts) it drains and
        stops when its parent process dies, so a killed autoscaler leaves no orphan hosts."""
        self.parent = os.getppid() if stop_with_parent else None
        self.settings = settings
        self.names = Names(settings.namespace)
        self.hostname = socket.gethostname()
        self.id = name or f"{self.hostname}-{os.getpid()}-{uuid.uuid4().hex[:4]}"
        self.cores = settings.worker.effective_cores()
        self.size = HostSize(self.cores, settings.worker.effective_sockets())
        self.draining = False
        self.utilisation: float | None = None
        # instance id -> (busy seconds, its clock) at the last sample
        self._busy: dict[str, tuple[float, float]] = {}
        state = client if client is not None else redis_client(settings)
        self.host_store = HostStore(state, self.names)
        self.session_store = SessionStore(state, self.names)
        self.instance_store = InstanceStore(state, self.names)
        self.sessions: dict[int, SessionProcs] = {}
        self._last_beat = 0.0
        self.stopping_procs: list[tuple[str, int, ChildProcess]] = []
        self.stopping = threading.Event()
        # instances get SIGTERM from Linux when this host dies, even by SIGKILL
        self.env = with_parent(child_environment(settings))
        self.warm = WarmPool(
            self.env, settings.worker.warm_instances, keep_services=not settings.worker.isolated()
        )
        #: Deployed service packages, brought up to date before each instance starts: a
        #: redeploy makes the warm servers of the old code stale before they fork it.
        self.registry = farm_registry(settings, state)
        #: Session id -> its service's name, for the metrics' labels.
        self.services: dict[int, str] = {}
        #: Instance id -> when it started (monotonic), for the session's unit-seconds.
        self.instance_started: dict[str, float] = {}
        self.usage = UsageStore(state, self.names)
        self.metrics = (
            HostMetrics(self._metrics_view, settings.metrics.call_duration_buckets)
            if settings.metrics.enabled
            else None
        )
        self.metrics_server: MetricsServer | None = None

    def stop(self) -> None:
        """Ask `run()` to stop every instance (draining) and return."""
        self.stopping.set()
        # The wake is sent from a thread: this runs in a signal handler, which may interrupt
        # the main thread inside redis-py (holding its pool's lock or a half-read reply).
        threading.Thread(target=self._wake_to_stop, name="host-stop", daemon=True).start()

    def _wake_to_stop(self) -> None:
        with contextlib.suppress(redis.RedisError):  # best effort: the BLPOP times out anyway
            self.host_store.wake(self.id, "stop")

    def _sample_load(self) -> None:
        """Utilisation since the last sample: busy call-seconds over capacity-seconds.

        Each instance stamps its report with its own clock, so the rate is taken over the
        instance's interval between reports, not this host's (the two tick independently;
        mixing them would alias into samples of 0% and 200%).
        """
        busy = slot_seconds = 0.0
        seen: dict[str, tuple[float, float]] = {}
        loads = self.host_store.loads(self.id)
        for iid, load in loads.items():
            seen[iid] = (load.busy, load.at)
            before = self._busy.get(iid)
            if before is not None and load.at > before[1]:
                busy += load.busy - before[0]
                slot_seconds += (load.at - before[1]) * load.capacity
        self._busy = seen
        if self.metrics is not None:
            self.metrics.calls.update(loads, lambda sid: self.services.get(sid, ""))
        if slot_seconds > 0:
            self.utilisation = round(min(1.0, max(0.0, busy / slot_seconds)), 3)
        elif not seen:
            self.utilisation = None  # no instance serving (or none has reported twice yet)

    def _metrics_view(self) -> HostView:
        """This host as its metrics describe it."""
        running: dict[tuple[int, str], int] = {}
        for sid, procs in list(self.sessions.items()):
            if procs.running:
                running[(sid, self.services.get(sid, ""))] = len(procs.running)
        pool = self.settings.worker.pool
        return HostView(self.id, pool, self.cores, self.utilisation, running)

    def health(self) -> Health:
        """Healthy while its heartbeat is fresh (`/healthz`): Redis reachable, loop turning."""
        age = time.monotonic() - self._last_beat
        ok = age < self.settings.worker.host_timeout and not self.stopping.is_set()
        return ok, {"host_id": self.id, "heartbeat_age": round(age, 3), "draining": self.draining}

    def _heartbeat(self) -> None:
        self._last_beat = time.monotonic()
        self._sample_load()
        worker = self.settings.worker
        record = HostRecord(
            self.id,
            self.hostname,
            os.getpid(),
            self.cores,
            self.started,
            sockets=self.size.sockets,
            memory_mb=worker.effective_memory_mb(),
            pool=worker.pool,
            labels=worker.label_map(),
            draining=self.draining,
            utilisation=self.utilisation,
            beat=time.time(),
            metrics_url=self.metrics_server.url if self.metrics_server is not None else "",
        )
        self.host_store.beat(record, self.settings.worker.host_timeout)

    def run(self) -> None:
        """Heartbeat and reconcile until stopped; then drain and deregister."""
        self.started = time.time()
        if self.metrics is not None:
            m = self.settings.metrics
            self.metrics_server = serve_metrics(
                self.metrics.registry, self.health, m.bind, m.worker_port, "worker"
            )
        warm = self.warm.open()
        self._heartbeat()
        log.info(
            "host_started",
            host_id=self.id,
            cores=self.cores,
            sockets=self.size.sockets,
            pool=self.settings.worker.pool,
            warm_instances=self.settings.worker.warm_instances if warm else 0,
        )
        # which services this host can load (`soafarm services test`), on a thread of its own
        from soafarm.workers.service_probe import start_prober

        start_prober(self.settings, self.id, self.hostname, self.env, self.stopping)
        try:
            while not self.stopping.is_set():
                try:
                    self.host_store.wait_for_wake(self.id, self._wait_time(time.monotonic()))
                    wanted = self.host_store.assignments_of(self.id)
                except redis.RedisError as e:
                    log.warning("redis_unreachable", error=str(e))
                    self.stopping.wait(1.0)
                    continue
                if self.parent is not None and os.getppid() != self.parent:
                    log.warning("host_parent_gone", host_id=self.id)
                    self.stopping.set()
                if not self.stopping.is_set():
                    try:
                        self.reconcile(wanted)
                        # after the reconcile, not before: a new assignment's instance
                        # starts first; many wakes a second (churn) beat only when due
                        beat = self.settings.worker.heartbeat_interval
                        if time.monotonic() - self._last_beat >= beat / 2:
                            self._heartbeat()
                    except redis.RedisError as e:
                        log.warning("redis_unreachable", error=str(e))
        finally:
            self._shutdown()

    def _wait_time(self, now: float) -> float:
        """Seconds to block for a wake-up: a heartbeat interval, or less when an instance's
        restart back-off ends sooner."""
        waits = [p.next_start - now for p in self.sessions.values() if p.next_start > now]
        return max(0.01, min([self.settings.worker.heartbeat_interval, *waits]))

    def reconcile(self, wanted: dict[int, int]) -> None:
        """Start or stop instance processes so each session has what `wanted` says."""
        self._reap()
        plan = plan_reconcile(self.sessions, wanted, time.monotonic())
        for sid, count in plan.stop.items():
            procs = self.sessions[sid]
            for _ in range(count):
                iid, proc = procs.running.pop()
                log.info("instance_stopping", instance=iid)
                proc.send_signal(signal.SIGTERM)
                self.stopping_procs.append((iid, sid, proc))
        for sid, count in plan.start.items():
            procs = self.sessions.setdefault(sid, SessionProcs())
            record = self.session_store.get(sid)
            if record is None or record.state not in (SessionState.QUEUED, SessionState.RUNNING):
                # closed after this host's assignment was read: an instance would find
                # no queue and exit at once, after costing a start
                procs.ended = True
                continue
            for _ in range(count):
                procs.running.append(self._start(record, procs))
        for sid in plan.drop:
            self.sessions.pop(sid, None)

    def _start(self, record: SessionRecord, procs: SessionProcs) -> tuple[str, ChildProcess]:
        """Start an instance of session `record`: forked warm if a fork server can, else as
        a new interpreter."""
        iid = f"{self.id}.{record.id}.{procs.counter}"
        procs.counter += 1
        units = capacity(record.resource_unit, self.size, record.max_concurrent_calls)
        spec = InstanceSpec(record.id, iid, self.id, self.hostname, units)
        self.registry.sync()
        proc = self.warm.start(spec, (record.service, record.version))
        warm = proc is not None
        if proc is None:
            proc = subprocess.Popen(
                [sys.executable, "-m", "soafarm.workers.instance", spec.to_json()], env=self.env
            )
        procs.started[iid] = time.monotonic()
        self.services[record.id] = record.service
        self.instance_started[iid] = time.monotonic()
        if self.metrics is not None:
            self.metrics.starts.labels(record.service).inc()
        log.info("instance_starting", instance=iid, pid=proc.pid, warm=warm)
        threading.Thread(
            target=self._wake_on_exit, args=(proc,), name=f"wait-{iid}", daemon=True
        ).start()
        return iid, proc

    def _wake_on_exit(self, proc: ChildProcess) -> None:
        """Wake the main loop when `proc` exits, so a killed instance is replaced at once
        rather than at the next heartbeat."""
        proc.wait()
        if not self.stopping.is_set():
            with contextlib.suppress(redis.RedisError):
                self.host_store.wake(self.id, "exited")

    def _reap(self) -> None:
        self.warm.tend()
        known = self.warm.pids()
        known.update(p.pid for s in self.sessions.values() for _, p in s.running)
        known.update(p.pid for _, _, p in self.stopping_procs)
        reap_strays(known)
        now = time.monotonic()
        for sid, procs in self.sessions.items():
            for iid, proc in list(procs.running):
                code = proc.poll()
                if code is None:
                    continue
                procs.running.remove((iid, proc))
                self._forget_instance(sid, iid)
                if self.metrics is not None:
                    self.metrics.exits.labels(self.services.get(sid, ""), str(code)).inc()
                if code == EXIT_LOAD_FAILED:
                    # the broker excludes this host for the session; retrying cannot help
                    # unless the assignment outlives the exclusion (see plan_reconcile)
                    procs.next_start = now + LOAD_FAILED_RETRY
                    log.error("service_load_failed", instance=iid, session_id=sid)
                    continue
                ran_for = now - procs.started.pop(iid, now)
                decision = instance_restart(code, ran_for, procs.failures)
                procs.failures = decision.failures
                procs.next_start = now + decision.delay
                # 0: it drained by itself, which it does when its session's queue is gone
                # (closed, and this host not told yet): expected, not a warning
                report = log.info if code == 0 else log.warning
                report(
                    "instance_exited",
                    instance=iid,
                    code=code,
                    ran_for=round(ran_for, 2),
                    restart_in=decision.delay,
                    failures=procs.failures,
                )
        for entry in list(self.stopping_procs):
            iid, sid, proc = entry
            if proc.poll() is not None:
                self.stopping_procs.remove(entry)
                self._forget_instance(sid, iid)

    def _forget_instance(self, sid: int, iid: str) -> None:
        self._account(sid, iid)
        self.instance_store.forget(sid, self.id, iid)

    def _account(self, sid: int, iid: str) -> None:
        """An instance exited: its calls into the metrics, its time into the usage."""
        last = self.host_store.load_of(self.id, iid)
        if self.metrics is not None:
            self.metrics.calls.retire(iid, last, self.services.get(sid, ""))
        started = self.instance_started.pop(iid, None)
        if started is not None:  # one instance is one unit of its session
            retries = last.retries if last is not None else 0
            self.usage.add(sid, time.monotonic() - started, retries)

    def _shutdown(self) -> None:
        # tell the broker first, so it places this host's work elsewhere while it drains
        self.draining = True
        with contextlib.suppress(redis.RedisError):
            self._heartbeat()
        self.warm.close()  # they hold no work
        procs = [p for s in self.sessions.values() for _, p in s.running]
        procs += [p for _, _, p in self.stopping_procs]
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_GRACE_SECONDS
        beat = self.settings.worker.heartbeat_interval
        # keep beating while instances drain, or the broker would call this host lost
        while (alive := [p for p in procs if p.poll() is None]) and time.monotonic() < deadline:
            with contextlib.suppress(subprocess.TimeoutExpired):
                alive[0].wait(timeout=max(0.0, min(beat, deadline - time.monotonic())))
            with contextlib.suppress(redis.RedisError):
                self._heartbeat()
        for p in procs:
            if p.poll() is None:
                log.warning("instance_killed", pid=p.pid)
                p.kill()
                p.wait()
        # the instances forgot their own records as they drained; their time still counts
        gone = [(sid, iid) for sid, s in self.sessions.items() for iid, _ in s.running]
        gone += [(sid, iid) for iid, sid, _ in self.stopping_procs]
        with contextlib.suppress(redis.RedisError):
            for sid, iid in gone:
                self._account(sid, iid)
        try:
            self.host_store.deregister(self.id)
        except redis.RedisError as e:
            log.warning("deregister_failed", error=str(e))
        if self.metrics_server is not None:
            self.metrics_server.close()
        log.info("host_stopped", host_id=self.id)
