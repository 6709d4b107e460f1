"""A service instance: one process that loads a service and serves one session's requests.

Each call thread (`capacity` of them) consumes, calls, publishes and acknowledges on a
connection of its own (`workers.calls.CallLoop`). The main thread supervises: it enforces
service_operation_timeout, hands back what waits behind a call that turned out long, keeps the
call threads' connections alive during long calls, and drains the instance when it is stopped
or its host dies (a deleted session queue cancels the call loops' consumers, which stop it).
A batch is acknowledged only after all its responses are published, so a killed instance
loses nothing: RabbitMQ redelivers it.

Run as `python -m soafarm.workers.instance '<spec json>'` by the worker host, with the farm's
settings in `SOAFARM_*` variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from dataclasses import dataclass
from functools import partial

import pika
import redis
import structlog

from soafarm.config import Settings, load_settings
from soafarm.errors import (
    RegistrationError,
    SessionNotFound,
    SoafarmError,
)
from soafarm.logs import configure_logging
from soafarm.names import Names
from soafarm.processes import follow_parent, stop_on_signals
from soafarm.registration import Registration
from soafarm.registration.packages import farm_registry
from soafarm.registration.registry import load_service_class, service_context
from soafarm.service import CallRunner, construct, operations_of
from soafarm.state.clients import DoneMarker
from soafarm.state.commondata import CommonDataReader
from soafarm.state.hosts import HostStore, InstanceLoad
from soafarm.state.instances import InstanceStore
from soafarm.state.records import InstanceRecord, SessionRecord
from soafarm.state.sessions import SessionStore
from soafarm.transport.connections import pika_connection, redis_client
from soafarm.transport.identity import own_user
from soafarm.workers.call_stats import CallStats, merged
from soafarm.workers.calls import CallLoop, CallWatch, Link, id_slack
from soafarm.workers.sandbox import IsolatedRunner, Sandbox, SandboxSpec

log = structlog.get_logger(__name__)

#: Seconds between the main thread's rounds: timeouts, hand-backs during long calls,
#: heartbeats of busy call threads, a dead host.
TEND_INTERVAL = 0.1
#: Seconds a publish may wait for RabbitMQ's confirm before the instance restarts itself.
PUBLISH_STALL_LIMIT = 30.0
EXIT_LOAD_FAILED = 4
EXIT_TIMED_OUT = 5
#: Drained and stopped because its memory passed `worker.instance_max_memory`: the host
#: starts a new instance at once.
EXIT_RECYCLED = 6
#: Seconds a draining instance whose host died may take to finish its calls before it ends
#: itself (RabbitMQ redelivers what it held): the grace a host gives its instances when it
#: stops, so a SIGKILLed host leaves nothing behind for longer than a stopped one.
DRAIN_GRACE_SECONDS = 30.0
#: An orphan's drain taking longer than this is logged with what each call loop holds.
DRAIN_SLOW_SECONDS = 5.0


def resident_mb() -> float | None:
    """This process's resident memory in MiB, from /proc/self/statm (None off Linux)."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            pages = int(statm.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / (1024 * 1024)


@dataclass
class Prepared:
    """Connections a spare process opened while it waited to become an instance (see
    `soafarm.workers.warm`), so an instance's start does not wait for them; each is used
    once, by the first to ask."""

    redis: redis.Redis | None = None
    amqp: pika.BlockingConnection | None = None
    #: the registration its fork server resolved and imported (which watches its files)
    registration: Registration | None = None

    def take_amqp(self) -> pika.BlockingConnection | None:
        """The AMQP connection if it is still open (only once)."""
        connection, self.amqp = self.amqp, None
        return connection if connection is not None and connection.is_open else None


@dataclass(frozen=True)
class InstanceSpec:
    """What the worker host tells an instance process to serve."""

    session_id: int
    instance_id: str
    host_id: str
    hostname: str
    #: Requests this instance runs at once (its resource unit's cores, or the registration's
    #: max_concurrent_calls); it also receives at most this many batches at a time.
    capacity: int = 1

    def to_json(self) -> str:
        """JSON for the command line."""
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> InstanceSpec:
        """Parse `to_json`'s output."""
        return cls(**json.loads(text))


class ServiceInstance:
    """Loads the session's service once, then consumes its request queue until told to stop,
    reconnecting (with the service kept loaded) when the connection to RabbitMQ drops."""

    def __init__(
        self, settings: Settings, spec: InstanceSpec, prepared: Prepared | None = None
    ) -> None:
        """Nothing connects until `run()` (which uses `prepared`'s connections first)."""
        self.settings = settings
        self.spec = spec
        self.prepared = prepared or Prepared()
        self.names = Names(settings.namespace)
        self.stopping = threading.Event()
        self.parent = os.getppid()
        self.loops: list[CallLoop] = []
        self.draining = threading.Event()
        #: What the process exits with once `run()` returns (EXIT_RECYCLED after a recycle).
        self.exit_code = 0
        #: The process running the service code, when services are isolated.
        self.sandbox: Sandbox | None = None

    def stop(self) -> None:
        """Stop taking new work; finish the calls running, hand back what has not started,
        then exit."""
        self.draining.set()
        self.stopping.set()

    def _load(self, record: SessionRecord, r: redis.Redis) -> CallRunner:
        registration = self.prepared.registration
        if registration is None or registration.name != record.service:
            registration = farm_registry(self.settings, r).resolve(record.service, record.version)
        os.environ.update(registration.environment)
        # a hung import or constructor cannot be interrupted: the watchdog ends the process
        watchdog = threading.Timer(
            registration.service_init_timeout,
            self._load_timed_out,
            args=(record.id, registration.service_init_timeout),
        )
        watchdog.daemon = True
        watchdog.start()
        try:
            return self._construct(record, registration, r)
        finally:
            watchdog.cancel()

    def _load_timed_out(self, session_id: int, seconds: float) -> None:
        why = f"the service did not load within service_init_timeout ({seconds:g}s)"
        log.error("service_init_timeout", instance=self.spec.instance_id, timeout=seconds)
        with contextlib.suppress(Exception):
            sessions = SessionStore(redis_client(self.settings), self.names)
            sessions.record_load_error(session_id, self.spec.host_id, why)
        os._exit(EXIT_LOAD_FAILED)

    def _construct(
        self, record: SessionRecord, registration: Registration, r: redis.Redis
    ) -> CallRunner:
        if self.settings.worker.isolated():
            return self._isolated(record, registration, r)
        cls = load_service_class(registration)
        reader = CommonDataReader(r, self.names, record.id, self.settings.max_common_data_bytes)
        context = service_context(
            registration, record.id, self.spec.hostname, self.spec.instance_id, reader
        )
        service = construct(cls, context)
        return CallRunner(
            service,
            operations_of(cls),
            record.include_exception_detail_in_faults,
            self.settings.max_message_bytes,
            record.broker_settings.message_resend_limit,
            where={"session_id": record.id, "instance": self.spec.instance_id},
        )

    def _isolated(
        self, record: SessionRecord, registration: Registration, r: redis.Redis
    ) -> CallRunner:
        """The service started in a process without the farm's credentials (sandbox)."""
        spec = SandboxSpec(
            service=registration.name,
            version=registration.version,
            # its own folder only: the other folders on the path may be closed to its user
            registration_path=[str(registration.path.parent)],
            session_id=record.id,
            host_name=self.spec.hostname,
            instance_id=self.spec.instance_id,
            include_detail=record.include_exception_detail_in_faults,
            max_message_bytes=self.settings.max_message_bytes,
            max_common_data_bytes=self.settings.max_common_data_bytes,
            resend_limit=record.broker_settings.message_resend_limit,
            log_format=self.settings.log_format,
            log_level=self.settings.log_level,
        )
        reader = CommonDataReader(r, self.names, record.id, self.settings.max_common_data_bytes)
        self.sandbox = Sandbox(
            spec,
            dict(registration.environment),
            reader.encoded,
            self.spec.capacity,
            user=self.settings.worker.service_user,
            python=self.settings.worker.service_python,
        )
        operations = self.sandbox.start()
        log.info("service_isolated", instance=self.spec.instance_id, pid=self.sandbox.process.pid)
        return IsolatedRunner(
            self.sandbox,
            operations,
            record.include_exception_detail_in_faults,
            self.settings.max_message_bytes,
            record.broker_settings.message_resend_limit,
            where={"session_id": record.id, "instance": self.spec.instance_id},
        )

    def run(self) -> None:
        """Serve until stopped or the session's queue disappears."""
        r = self.prepared.redis or redis_client(self.settings)
        sessions = SessionStore(r, self.names)
        instances = InstanceStore(r, self.names)
        record = sessions.get(self.spec.session_id)
        if record is None:
            raise SessionNotFound(f"session {self.spec.session_id} no longer exists")
        try:
            runner = self._load(record, r)
        except Exception as e:
            # recorded so the client's timeout and `soafarm sessions show` can say why
            why = str(e) if isinstance(e, SoafarmError) else f"{type(e).__name__}: {e}"
            sessions.record_load_error(record.id, self.spec.host_id, why)
            raise RegistrationError(f"service {record.service!r} failed to load: {why}") from e
        marker = DoneMarker(r, self.names)
        instances.register(
            record.id,
            InstanceRecord(
                self.spec.instance_id,
                self.spec.host_id,
                os.getpid(),
                time.time(),
                self.spec.capacity,
            ),
        )
        log.info("instance_started", instance=self.spec.instance_id, service=record.service)
        threading.Thread(
            target=self._watch, args=(record.id, r), name="watchdog", daemon=True
        ).start()
        try:
            self._serve(record, runner, marker)
        finally:
            with contextlib.suppress(redis.RedisError):
                last = self._load_report(record.id, self.loops)
                if last.buckets:  # the calls since the last report count too
                    HostStore(r, self.names).report_load(
                        self.spec.host_id, self.spec.instance_id, last
                    )
                instances.forget(
                    record.id,
                    self.spec.host_id,
                    self.spec.instance_id,
                    keep_load=bool(last.buckets),
                )
            if self.sandbox is not None:
                self.sandbox.close()
            log.info("instance_stopped", instance=self.spec.instance_id)

    def _serve(self, record: SessionRecord, runner: CallRunner, marker: DoneMarker) -> None:
        """Start the call loops and supervise them until they have drained."""
        link = Link(
            record.durable,
            self.names.request_queue(record.id),
            self.draining,
            self.stop,
            record.id,
            partial(self.names.response_queue, record.id),
            self.names.request_exchange,
        )
        # one call loop per unit of capacity; with capacity 1 the service is never called
        # from two threads at once
        self.loops = [
            CallLoop(
                runner,
                marker,
                link,
                instance_id=self.spec.instance_id,
                max_bytes=self.settings.max_message_bytes,
                watch=CallWatch(),
                connect=partial(
                    self._connect, f"soafarm-instance {self.spec.instance_id} calls {i}"
                ),
                stats=CallStats(self.settings.metrics.call_duration_buckets)
                if self.settings.metrics.enabled
                else None,
                user_id=own_user(self.settings),
                id_slack=id_slack(record.broker_settings),
            )
            for i in range(self.spec.capacity)
        ]
        calls = [
            threading.Thread(target=loop.run, name=f"calls-{i}")
            for i, loop in enumerate(self.loops)
        ]
        for thread in calls:
            thread.start()
        timeout = record.broker_settings.service_operation_timeout
        try:
            while not self.stopping.wait(TEND_INTERVAL):
                self._tend(timeout)
                self._check_memory()
                if os.getppid() != self.parent:
                    # our worker host died: the broker reassigns its work; drain and leave
                    log.warning("host_gone", instance=self.spec.instance_id)
                    self.stop()
                # a loop that stops the instance (its queue is gone) sets `stopping` first
                if not all(t.is_alive() for t in calls) and not self.stopping.is_set():
                    raise SoafarmError("a call thread ended unexpectedly; see its log")
        finally:
            self.stop()
            orphaned: float | None = None
            slow_logged = False
            for thread in calls:  # drain: running calls finish, unstarted work goes back
                while thread.is_alive():
                    thread.join(timeout=TEND_INTERVAL)
                    self._tend(timeout)
                    if os.getppid() != self.parent:
                        orphaned = orphaned or time.monotonic()
                        if not slow_logged and time.monotonic() - orphaned > DRAIN_SLOW_SECONDS:
                            slow_logged = True  # what holds an orphan's drain, for the record
                            log.warning(
                                "host_gone_drain_slow",
                                instance=self.spec.instance_id,
                                seconds=round(time.monotonic() - orphaned, 1),
                                loops=[loop.describe() for loop in self.loops],
                            )
                        if time.monotonic() - orphaned > DRAIN_GRACE_SECONDS:
                            log.error("host_gone_drain_abandoned", instance=self.spec.instance_id)
                            os._exit(1)

    def _connect(self, name: str) -> pika.BlockingConnection:
        """A call loop's connection: the prepared one for the first loop to ask, else new."""
        return self.prepared.take_amqp() or pika_connection(self.settings, name)

    def _check_memory(self) -> None:
        """Past `worker.instance_max_memory`, drain (the running calls finish and are
        acknowledged) and exit with EXIT_RECYCLED; the host starts a fresh instance at once."""
        limit = self.settings.worker.instance_max_memory
        if not limit or self.draining.is_set():
            return
        rss = resident_mb()
        if rss is not None and rss > limit:
            log.warning(
                "instance_recycled",
                instance=self.spec.instance_id,
                rss_mb=round(rss),
                limit_mb=limit,
            )
            self.exit_code = EXIT_RECYCLED
            self.stop()

    def _tend(self, timeout: float) -> None:
        """What the main thread does for the call loops every TEND_INTERVAL."""
        self._enforce_timeout(timeout)
        for loop in self.loops:
            loop.keep_alive()

    def _watch(self, session_id: int, r: redis.Redis) -> None:
        """Each second: report busy time for the host's utilisation figure, and end the
        process if a publish waits for its confirm past PUBLISH_STALL_LIMIT."""
        hosts = HostStore(r, self.names)
        while True:
            loops = self.loops
            if self.stopping.wait(1.0):
                # draining: no load to report, but a publish stalled in the drain (a
                # hand-back, a last response) must still end the process, or it would wait
                # for a confirm forever
                time.sleep(1.0)
            else:
                load = self._load_report(session_id, loops)
                with contextlib.suppress(redis.RedisError):
                    hosts.report_load(self.spec.host_id, self.spec.instance_id, load)
            stuck = max((loop.publish_watch.stuck_for() for loop in loops), default=0.0)
            if stuck > PUBLISH_STALL_LIMIT:
                log.error("publish_stalled", instance=self.spec.instance_id, seconds=stuck)
                os._exit(EXIT_TIMED_OUT)

    def _load_report(self, session_id: int, loops: list[CallLoop]) -> InstanceLoad:
        """The report of this instance's load (and call totals, with metrics on)."""
        busy = round(sum(loop.watch.busy_seconds() for loop in loops), 4)
        at = round(time.monotonic(), 4)
        stats = [loop.stats for loop in loops if loop.stats is not None]
        if not stats:
            return InstanceLoad(session_id, self.spec.capacity, busy, at)
        total = merged(stats, stats[0].bounds)
        return InstanceLoad(
            session_id,
            self.spec.capacity,
            busy,
            at,
            tuple(total.buckets),
            round(total.seconds, 6),
            total.faults,
            total.retries,
        )

    def _enforce_timeout(self, timeout: float) -> None:
        request_id = next(
            (i for loop in self.loops if (i := loop.watch.overdue(timeout)) is not None), None
        )
        if request_id is not None:
            # a Python call cannot be interrupted: end the process; RabbitMQ redelivers the
            # batch and the retry limit decides whether the request runs again
            log.error(
                "service_operation_timeout",
                instance=self.spec.instance_id,
                request_id=request_id,
                timeout=timeout,
            )
            os._exit(EXIT_TIMED_OUT)


def main(argv: list[str]) -> int:
    """Entry point of an instance process started as a new interpreter (the host's cold
    start; warm ones are forked by `soafarm.workers.warm`): see `serve` for exit codes."""
    follow_parent()  # SIGTERM (drain) when the host dies, even by SIGKILL
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    return serve(settings, InstanceSpec.from_json(argv[0]))


def serve(settings: Settings, spec: InstanceSpec, prepared: Prepared | None = None) -> int:
    """Serve `spec`'s session until stopped and return the exit code: 4 means the service
    failed to load, 5 that a call exceeded service_operation_timeout, 6 that it was recycled
    for memory."""
    instance = ServiceInstance(settings, spec, prepared)

    stop_on_signals(instance.stop)
    try:
        instance.run()
    except RegistrationError as e:
        log.error("service_load_failed", instance=spec.instance_id, error=str(e))
        return EXIT_LOAD_FAILED
    except SessionNotFound:
        return 0  # closed before this instance started: nothing to do
    except SoafarmError as e:
        log.error("instance_failed", instance=spec.instance_id, error=str(e))
        return 1
    except Exception as e:
        log.exception("instance_failed", instance=spec.instance_id, error=repr(e))
        return 1
    return instance.exit_code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
