"""The worker host agent: registers with cores and a heartbeat, runs assigned instances.

The broker writes "session S: N instances" into this host's assignment hash in Redis and
pushes to its wake list; the host reconciles its child processes at once (and at every
heartbeat anyway), starting instances with `python -m soafarm.workers.instance` and stopping extras
with SIGTERM, which lets them finish and acknowledge what they hold (drain).
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field

import redis
import structlog

from soafarm.config import Settings, child_environment
from soafarm.names import Names
from soafarm.resources import HostSize, capacity
from soafarm.state.records import HostRecord, SessionRecord, as_text
from soafarm.transport.connections import redis_client
from soafarm.workers.instance import EXIT_LOAD_FAILED, EXIT_TIMED_OUT, InstanceSpec

log = structlog.get_logger(__name__)

STOP_GRACE_SECONDS = 30.0
MAX_RESTART_DELAY = 30.0
HEALTHY_RUN_SECONDS = 30.0


@dataclass
class _SessionProcs:
    """Instance processes of one session on this host, and its restart back-off."""

    running: list[tuple[str, subprocess.Popen[bytes]]] = field(default_factory=list)
    started: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    next_start: float = 0.0
    counter: int = 0
    load_failed: bool = False


class WorkerHost:
    """One worker host. `run()` blocks until `stop()` (or a signal)."""

    def __init__(
        self, settings: Settings, name: str | None = None, stop_with_parent: bool = False
    ) -> None:
        """Connect to Redis now, so a wrong URL fails fast with a clear error. With
        `stop_with_parent` (hosts a local provisioner starts) it drains and stops when its
        parent process dies, so a killed autoscaler leaves no orphan hosts."""
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
        self.redis = redis_client(settings)
        self.sessions: dict[int, _SessionProcs] = {}
        self.stopping_procs: list[tuple[str, int, subprocess.Popen[bytes]]] = []
        self.stopping = threading.Event()
        self.env = child_environment(settings)

    def stop(self) -> None:
        """Ask `run()` to stop every instance (draining) and return."""
        self.stopping.set()
        with contextlib.suppress(redis.RedisError):  # best effort: the BLPOP times out anyway
            self.redis.rpush(self.names.host_wake_key(self.id), "stop")

    def _sample_load(self) -> None:
        """Utilisation since the last sample: busy call-seconds over capacity-seconds.

        Each instance stamps its report with its own clock, so the rate is taken over the
        instance's interval between reports, not this host's (the two tick independently;
        mixing them would alias into samples of 0% and 200%).
        """
        raw = self.redis.hgetall(self.names.host_load_key(self.id))
        busy = slot_seconds = 0.0
        seen: dict[str, tuple[float, float]] = {}
        for key, value in raw.items():
            load = json.loads(value)
            iid = as_text(key)
            seen[iid] = (float(load["busy"]), float(load["at"]))
            before = self._busy.get(iid)
            if before is not None and seen[iid][1] > before[1]:
                busy += seen[iid][0] - before[0]
                slot_seconds += (seen[iid][1] - before[1]) * int(load["capacity"])
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
        pipe = self.redis.pipeline()
        pipe.hset(self.names.hosts_key, self.id, record.to_json())
        pipe.set(
            self.names.host_heartbeat_key(self.id),
            "1",
            px=int(self.settings.worker.host_timeout * 1000),
        )
        pipe.execute()

    def run(self) -> None:
        """Heartbeat and reconcile until stopped; then drain and deregister."""
        self.started = time.time()
        wake = self.names.host_wake_key(self.id)
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
                    self.redis.blpop([wake], timeout=self.settings.worker.heartbeat_interval)
                    self.redis.delete(wake)
                    self._heartbeat()
                    raw = self.redis.hgetall(self.names.host_assignments_key(self.id))
                    wanted = {int(k): int(v) for k, v in raw.items()}
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
        now = time.monotonic()
        for sid in set(self.sessions) | set(wanted):
            procs = self.sessions.setdefault(sid, _SessionProcs())
            want = wanted.get(sid, 0)
            while len(procs.running) > want:
                iid, proc = procs.running.pop()
                log.info("instance_stopping", instance=iid)
                proc.send_signal(signal.SIGTERM)
                self.stopping_procs.append((iid, sid, proc))
            while len(procs.running) < want and now >= procs.next_start and not procs.load_failed:
                procs.running.append(self._start(sid, procs))
            if want == 0 and not procs.running:
                del self.sessions[sid]

    def _capacity(self, sid: int) -> int:
        raw = self.redis.get(self.names.session_key(sid))
        if raw is None:  # closed meanwhile: the instance finds out and exits at once
            return 1
        record = SessionRecord.from_json(raw)
        return capacity(record.resource_unit, self.size, record.max_concurrent_calls)

    def _start(self, sid: int, procs: _SessionProcs) -> tuple[str, subprocess.Popen[bytes]]:
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
        pipe = self.redis.pipeline()
        pipe.hdel(self.names.session_instances_key(sid), iid)
        pipe.hdel(self.names.host_load_key(self.id), iid)
        pipe.execute()

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
            pipe = self.redis.pipeline()
            pipe.hdel(self.names.hosts_key, self.id)
            pipe.delete(
                self.names.host_heartbeat_key(self.id),
                self.names.host_assignments_key(self.id),
                self.names.host_wake_key(self.id),
                self.names.host_load_key(self.id),
            )
            pipe.execute()
        except redis.RedisError as e:
            log.warning("deregister_failed", error=str(e))
        log.info("host_stopped", host_id=self.id)
