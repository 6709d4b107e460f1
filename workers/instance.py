"""A service instance: one process that loads a service and serves one session's requests.

The pika I/O loop runs on the main thread (so heartbeats keep flowing during long calls);
calls run on a worker thread, which hands each response publish and the final ack back to the
I/O thread with `add_callback_threadsafe`. A batch is acknowledged only after all its
responses are published, so a killed instance loses nothing: RabbitMQ redelivers the batch.

Run as `python -m workers.instance '<spec json>'` by the worker host, with the farm's
settings in `SOAFARM_*` variables.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType
from typing import Any

import pika
import redis
import structlog

from registration import Registry
from registration.registry import load_service_class
from soafarm.config import Settings, load_settings
from soafarm.connections import amqp_error_types, pika_connection, redis_client
from soafarm.errors import (
    ConnectionFailed,
    DecodeError,
    RegistrationError,
    SessionNotFound,
    SoafarmError,
)
from soafarm.logs import configure_logging
from soafarm.names import Names
from soafarm.progress import DoneMarker
from soafarm.protocol import (
    BATCH_HEADER_ALLOWANCE,
    CONTENT_TYPE,
    RequestBatch,
    decode,
    encode_response_batch,
)
from soafarm.records import InstanceRecord, SessionRecord
from soafarm.service import CallRunner, Outcome, ServiceContext, construct, operations_of

log = structlog.get_logger(__name__)

#: Responses of a long batch are published at least this often (seconds), so progress flows.
RESPONSE_LINGER = 0.05
EXIT_LOAD_FAILED = 4


@dataclass(frozen=True)
class InstanceSpec:
    """What the worker host tells an instance process to serve."""

    session_id: int
    instance_id: str
    host_id: str
    hostname: str

    def to_json(self) -> str:
        """JSON for the command line."""
        return json.dumps(self.__dict__)

    @classmethod
    def from_json(cls, text: str) -> InstanceSpec:
        """Parse `to_json`'s output."""
        return cls(**json.loads(text))


@dataclass(frozen=True)
class _Link:
    """One connection's objects, shared by the I/O thread and the call thread."""

    connection: pika.BlockingConnection
    channel: pika.adapters.blocking_connection.BlockingChannel
    inbox: queue.Queue[tuple[int, bytes] | None]


class ServiceInstance:
    """Loads the session's service once, then consumes its request queue until told to stop,
    reconnecting (with the service kept loaded) when the connection to RabbitMQ drops."""

    def __init__(self, settings: Settings, spec: InstanceSpec) -> None:
        """Nothing connects until `run()`."""
        self.settings = settings
        self.spec = spec
        self.names = Names(settings.namespace)
        self.stopping = threading.Event()
        # deliveries received and not yet acknowledged; touched only on the I/O thread
        self.held = 0

    def stop(self) -> None:
        """Stop taking new work; finish and acknowledge what is held, then exit."""
        self.stopping.set()

    def _load(self, record: SessionRecord) -> CallRunner:
        registration = Registry(self.settings.service_registration_path).resolve(
            record.service, record.version
        )
        os.environ.update(registration.environment)
        cls = load_service_class(registration)
        context = ServiceContext(
            session_id=record.id,
            host_name=self.spec.hostname,
            instance_id=self.spec.instance_id,
            service_name=registration.name,
            service_version=registration.version,
            environment=dict(registration.environment),
        )
        service = construct(cls, context)
        return CallRunner(
            service,
            operations_of(cls),
            record.include_exception_detail_in_faults,
            self.settings.max_message_bytes,
        )

    def run(self) -> None:
        """Serve until stopped or the session's queue disappears."""
        r = redis_client(self.settings)
        raw = r.get(self.names.session_key(self.spec.session_id))
        if raw is None:
            raise SessionNotFound(f"session {self.spec.session_id} no longer exists")
        record = SessionRecord.from_json(raw)
        try:
            runner = self._load(record)
        except Exception as e:
            # recorded so the client's timeout and `soafarm sessions show` can say why
            why = str(e) if isinstance(e, SoafarmError) else f"{type(e).__name__}: {e}"
            r.hset(self.names.session_load_errors_key(record.id), self.spec.host_id, why)
            raise RegistrationError(f"service {record.service!r} failed to load: {why}") from e
        marker = DoneMarker(r, self.names)
        instances_key = self.names.session_instances_key(record.id)
        r.hset(
            instances_key,
            self.spec.instance_id,
            InstanceRecord(
                self.spec.instance_id, self.spec.host_id, os.getpid(), time.time()
            ).to_json(),
        )
        log.info("instance_started", instance=self.spec.instance_id, service=record.service)
        backoff = 0.5
        lost: tuple[type[BaseException], ...] = (ConnectionFailed, *amqp_error_types())
        try:
            while not self.stopping.is_set():
                try:
                    self._serve(record, runner, marker)
                except lost as e:
                    # the loaded service is kept: reconnect instead of paying its start-up again
                    log.warning("rabbitmq_connection_lost", error=repr(e), retry_in=backoff)
                    self.stopping.wait(backoff)
                    backoff = min(backoff * 2, 5.0)
        finally:
            with contextlib.suppress(redis.RedisError):
                r.hdel(instances_key, self.spec.instance_id)
            log.info("instance_stopped", instance=self.spec.instance_id)

    def _serve(self, record: SessionRecord, runner: CallRunner, marker: DoneMarker) -> None:
        """One connection's life: consume until stopped (then drain) or the connection fails."""
        connection = pika_connection(self.settings, f"soafarm-instance {self.spec.instance_id}")
        inbox: queue.Queue[tuple[int, bytes] | None] = queue.Queue()
        calls: threading.Thread | None = None
        try:
            channel = connection.channel()
            if record.durable:
                channel.confirm_delivery()  # a response counts only once RabbitMQ has it
            channel.basic_qos(prefetch_count=1)
            self.held = 0
            link = _Link(connection, channel, inbox)
            calls = threading.Thread(
                target=self._work, args=(runner, marker, link, record), name="calls"
            )

            def on_message(ch: Any, method: Any, props: Any, body: bytes) -> None:
                self.held += 1
                inbox.put((method.delivery_tag, body))

            tag = channel.basic_consume(self.names.request_queue(record.id), on_message)
            channel.add_on_cancel_callback(lambda _frame: self.stop())
            calls.start()
            while not self.stopping.is_set():
                connection.process_data_events(time_limit=0.2)
            if channel.is_open:
                channel.basic_cancel(tag)
            while self.held:  # drain: finish and ack what this instance holds
                connection.process_data_events(time_limit=0.05)
            connection.process_data_events(time_limit=0)
        finally:
            inbox.put(None)
            if calls is not None and calls.is_alive():
                # one call thread at a time: services need not be thread-safe
                calls.join()
            if connection.is_open:
                with contextlib.suppress(*amqp_error_types()):
                    connection.close()

    def _work(
        self,
        runner: CallRunner,
        marker: DoneMarker,
        link: _Link,
        record: SessionRecord,
    ) -> None:
        """The call thread: run each batch, hand publishes and the ack to the I/O thread."""
        connection, channel, inbox = link.connection, link.channel, link.inbox
        limit = self.settings.max_message_bytes
        props = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2 if record.durable else 1
        )

        def publish(batch: RequestBatch, outcomes: list[Outcome]) -> None:
            body = encode_response_batch(
                batch.session_id,
                batch.client_id,
                self.spec.instance_id,
                [o.body for o in outcomes],
            )
            channel.basic_publish("", batch.reply_to, body, props)
            marker.mark(
                batch.session_id, batch.client_id, [(o.request_id, o.faulted) for o in outcomes]
            )

        def finish(tag: int, batch: RequestBatch | None, outcomes: list[Outcome]) -> None:
            if batch is None:
                channel.basic_reject(tag, requeue=False)  # dead-letter
            else:
                if outcomes:
                    publish(batch, outcomes)
                channel.basic_ack(tag)
            self.held -= 1

        def hand_over(callback: Any) -> bool:
            try:
                connection.add_callback_threadsafe(callback)
            except Exception:  # the connection is gone: RabbitMQ redelivers this batch
                return False
            return True

        while (item := inbox.get()) is not None:
            tag, body = item
            try:
                message = decode(body, limit)
                if not isinstance(message, RequestBatch):
                    raise DecodeError(f"expected a request batch, got {type(message).__name__}")
            except DecodeError as e:
                log.error("request_batch_undecodable", error=str(e), dead_lettered=True)
                hand_over(lambda t=tag: finish(t, None, []))
                continue
            pending: list[Outcome] = []
            size = 0
            last = time.monotonic()
            for request in message.requests:
                outcome = runner.run(request)
                if pending and size + len(outcome.body) > limit - BATCH_HEADER_ALLOWANCE:
                    out, pending, size = pending, [], 0
                    if not hand_over(lambda b=message, o=out: publish(b, o)):
                        break
                pending.append(outcome)
                size += len(outcome.body)
                now = time.monotonic()
                if now - last >= RESPONSE_LINGER:
                    out, pending, size, last = pending, [], 0, now
                    if not hand_over(lambda b=message, o=out: publish(b, o)):
                        break
            else:
                hand_over(lambda t=tag, b=message, o=pending: finish(t, b, o))


def main(argv: list[str]) -> int:
    """Entry point of an instance process; exit code 4 means the service failed to load."""
    settings = load_settings()
    configure_logging(settings.log_format, settings.log_level)
    spec = InstanceSpec.from_json(argv[0])
    instance = ServiceInstance(settings, spec)

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        instance.stop()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        instance.run()
    except SoafarmError as e:
        log.error("instance_failed", instance=spec.instance_id, error=str(e))
        return EXIT_LOAD_FAILED
    except Exception as e:
        log.exception("instance_failed", instance=spec.instance_id, error=repr(e))
        return EXIT_LOAD_FAILED
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
