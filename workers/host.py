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
from soafarm.names import Names
from soafarm.resources import HostSize, capacity
from soafarm.state.hosts import HostStore
from soafarm.state.instances import InstanceStore
from soafarm.state.records import HostRecord
from soafarm.state.sessions import SessionStore
from soafarm.transport.connections import redis_client
from soafarm.workers.instance import EXIT_LOAD_FAILED, EXIT_TIMED_OUT, InstanceSpec

log = structlog.get_logger(__name__)

STOP_GRACE_SECONDS = 30.0
MAX_RESTART_DELAY = 30.0
HEALTHY_RUN_SECONDS = 30.0


@dataclass
class SessionProcs:
    """Instance processes of one session on this host, and its restart back-off."""

    running: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    started: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    next_start: float = 0.0
    counter: int = 0
    load_failed: bool = False


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
    back-off (`next_start`, on the monotonic clock `now`) has passed, and never after its
    service failed to load here (the broker excludes this host for it instead).
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
        elif running < want and now >= procs.next_start and not procs.load_failed:
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
        self.stopping_procs: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        self.stopping = threading.Event()
        self.env = child_environment(settings)

    def stop(self) -> None:
        """Ask `run()` to stop every instance (draining) and return."""
        self.stopping.set()
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
        for iid, load in self.host_store.loads(self.id).items():
            seen[iid] = (load.busy, load.at)
            before = self._busy.get(iid)
            if before is not None and load.at > before[1]:
                busy += load.busy - before[0]
                slot_seconds += (load.at - before[1]) * load.capacity
        self._busy = seen
        if slot_seconds > 0:
            self.utilisation = round(min(1.0, max(0.0, busy / slot_seconds)), 3)
        elif not seen:
            self.utilisation = None  # no instance serving (or none has reported twice yet)

    def _heartbeat(self) -> None:
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
        )
        self.host_store.beat(record, self.settings.worker.host_timeout)

    def run(self) -> None:
        """Heartbeat and reconcile until stopped; then drain and deregister."""
        self.started = time.time()
        self._heartbeat()
        log.info(
            "host_started",
            host_id=self.id,
            cores=self.cores,
            sockets=self.size.sockets,
            pool=self.settings.worker.pool,
        )
        try:
            while not self.stopping.is_set():
                try:
                    self.host_store.wait_for_wake(self.id, self.settings.worker.heartbeat_interval)
                    self._heartbeat()
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
                    except redis.RedisError as e:
                        log.warning("redis_unreachable", error=str(e))
        finally:
            self._shutdown()

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
            for _ in range(count):
                procs.running.append(self._start(sid, procs))
        for sid in plan.drop:
            self.sessions.pop(sid, None)

    def _capacity(self, sid: int) -> int:
        record = self.session_store.get(sid)
        if record is None:  # closed meanwhile: the instance finds out and exits at once
            return 1
        return capacity(record.resource_unit, self.size, record.max_concurrent_calls)

    def _start(self, sid: int, procs: SessionProcs) -> tuple[str, subprocess.Popen[bytes]]:
        iid = f"{self.id}.{sid}.{procs.counter}"
        procs.counter += 1
        spec = InstanceSpec(sid, iid, self.id, self.hostname, self._capacity(sid))
        proc = subprocess.Popen(
            [sys.executable, "-m", "soafarm.workers.instance", spec.to_json()], env=self.env
        )
        procs.started[iid] = time.monotonic()
        log.info("instance_starting", instance=iid, pid=proc.pid)
        return iid, proc

    def _reap(self) -> None:
        now = time.monotonic()
        for sid, procs in self.sessions.items():
            for iid, proc in list(procs.running):
                code = proc.poll()
                if code is None:
                    continue
                procs.running.remove((iid, proc))
                self._forget_instance(sid, iid)
                if code == EXIT_LOAD_FAILED:
                    # the broker excludes this host for the session; retrying cannot help
                    procs.load_failed = True
                    log.error("service_load_failed", instance=iid, session_id=sid)
                    continue
                if now - procs.started.pop(iid, now) > HEALTHY_RUN_SECONDS:
                    procs.failures = 0  # it served a while: this exit is news, not a crash loop
                procs.failures += 1
                # quick at first: a crash or timeout is retried by redelivery, and the retry
                # limit (not this back-off) is what stops a poison request
                delay = (
                    0.0
                    if code == EXIT_TIMED_OUT
                    else min(0.2 * 2.0 ** (procs.failures - 1), MAX_RESTART_DELAY)
                )
                procs.next_start = now + delay
                log.warning("instance_exited", instance=iid, code=code, restart_in=delay)
        for entry in list(self.stopping_procs):
            iid, sid, proc = entry
            if proc.poll() is not None:
                self.stopping_procs.remove(entry)
                self._forget_instance(sid, iid)

    def _forget_instance(self, sid: int, iid: str) -> None:
        self.instance_store.forget(sid, self.id, iid)

    def _shutdown(self) -> None:
        # tell the broker first, so it places this host's work elsewhere while it drains
        self.draining = True
        with contextlib.suppress(redis.RedisError):
            self._heartbeat()
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
        try:
            self.host_store.deregister(self.id)
        except redis.RedisError as e:
            log.warning("deregister_failed", error=str(e))
        log.info("host_stopped", host_id=self.id)
