"""The call thread of a service instance: run request batches, hand the results back.

pika is not thread-safe, so every publish and ack is handed to the I/O thread with
`add_callback_threadsafe`; a batch is acknowledged only after all its responses are published
(and counted), so a killed instance loses nothing.

A batch RabbitMQ delivers again (`redelivered`: an instance crashed, timed out or lost its
host while holding it), and every batch of an at-most-once session (message_resend_limit 0),
is run carefully: requests that already have a response are skipped,
each remaining one counts an attempt in Redis first, and its response is published before the
next one starts. So the request that kills its instance is the one whose attempts grow, and
after `message_resend_limit` retries it is answered with a RetryLimitExceeded fault instead of
being run again, while the innocent requests of its batch run normally.
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import pika
import structlog

from soafarm.connections import unroutable_retries
from soafarm.errors import ConnectionFailed, DecodeError
from soafarm.progress import DoneMarker
from soafarm.protocol import (
    BATCH_HEADER_ALLOWANCE,
    CONTENT_TYPE,
    Request,
    RequestBatch,
    decode,
    encode_request,
    encode_request_batch,
    encode_response_batch,
)
from soafarm.service import CallRunner, Outcome

log = structlog.get_logger(__name__)

#: Responses of a long batch are published at least this often (seconds), so progress flows.
RESPONSE_LINGER = 0.05
#: A batch still running after this many seconds, when the queue behind it is empty (other
#: instances may be idle), hands its unstarted requests back to the queue, so slow work
#: spreads over every instance instead of waiting while one instance holds it. A draining
#: instance (being stopped) hands them back at once.
RESPLIT_AFTER = 0.05

Delivery = tuple[int, bytes, bool]  # delivery tag, body, redelivered


class CallWatch:
    """What the call thread runs now, so the I/O thread can enforce service_operation_timeout."""

    def __init__(self) -> None:
        """Nothing is running yet."""
        self.started: float | None = None
        self.request_id = -1
        self.busy = 0.0  # seconds spent in finished calls

    def begin(self, request_id: int) -> None:
        """A call starts."""
        self.request_id = request_id
        self.started = time.monotonic()

    def end(self) -> None:
        """The call returned (or raised)."""
        started, self.started = self.started, None
        if started is not None:
            self.busy += time.monotonic() - started

    def busy_seconds(self) -> float:
        """Seconds spent in calls so far, the running one included."""
        started = self.started
        return self.busy + (0.0 if started is None else time.monotonic() - started)

    def overdue(self, timeout: float) -> int | None:
        """The id of a call running longer than `timeout` seconds (0: no limit), else None."""
        started = self.started
        if timeout > 0 and started is not None and time.monotonic() - started > timeout:
            return self.request_id
        return None


class PublishWatch:
    """How long the I/O thread has been inside a publish (waiting for RabbitMQ's confirm).

    pika's blocking publish has no timeout, and a confirm can be held back while a queue
    recovers from a RabbitMQ restart; the instance's watchdog ends a process stuck too long,
    and the batch is redelivered.
    """

    def __init__(self) -> None:
        """No publish in progress."""
        self.started: float | None = None

    @contextmanager
    def running(self) -> Iterator[None]:
        """Mark a publish in progress for the duration of the block."""
        self.started = time.monotonic()
        try:
            yield
        finally:
            self.started = None

    def stuck_for(self) -> float:
        """Seconds the current publish has been waiting (0 when none is)."""
        started = self.started
        return 0.0 if started is None else time.monotonic() - started


@dataclass(frozen=True)
class Link:
    """One connection's objects, shared by the I/O thread and the call thread."""

    connection: pika.BlockingConnection
    channel: pika.adapters.blocking_connection.BlockingChannel
    inbox: queue.Queue[Delivery | None]
    settled: Callable[[], None]  # called on the I/O thread when a delivery is acked/rejected
    durable: bool
    request_queue: str
    queue_empty: threading.Event  # set by the I/O thread when no batch waits in the queue
    draining: threading.Event  # set when the instance stops: hand back what has not started


class PublisherLost(ConnectionFailed):
    """Raised on the I/O thread when the call thread's publishing connection failed."""


class CallLoop:
    """Runs on the call thread until the inbox yields None.

    Responses are published from this thread on a connection of its own (no hand-off to the
    I/O thread on the response path); only acks and rejects go through the I/O thread, and
    an ack is handed over only after the batch's responses are published (and confirmed, in
    a durable session) and counted.
    """

    def __init__(
        self,
        runner: CallRunner,
        marker: DoneMarker,
        link: Link,
        *,
        instance_id: str,
        max_bytes: int,
        watch: CallWatch,
        connect: Callable[[], pika.BlockingConnection],
    ) -> None:
        """`runner.resend_limit` is the session's message_resend_limit; `connect` opens the
        publishing connection (without heartbeats: it idles through long calls)."""
        self.runner = runner
        self.marker = marker
        self.link = link
        self.instance_id = instance_id
        self.max_bytes = max_bytes
        self.watch = watch
        self.connect = connect
        self.publish_watch = PublishWatch()
        self.props = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2 if link.durable else 1
        )
        self.publisher: pika.BlockingConnection | None = None
        self.channel: pika.adapters.blocking_connection.BlockingChannel | None = None

    def run(self) -> None:
        """Take deliveries from the inbox and run them."""
        try:
            while (item := self.link.inbox.get()) is not None:
                tag, body, redelivered = item
                try:
                    batch = decode(body, self.max_bytes)
                    if not isinstance(batch, RequestBatch):
                        raise DecodeError(f"expected a request batch, got {type(batch).__name__}")
                except DecodeError as e:
                    log.error("request_batch_undecodable", error=str(e), dead_lettered=True)
                    self._hand_over(partial(self._reject, tag))
                    continue
                try:
                    if redelivered or self.runner.resend_limit == 0:
                        # at-most-once counts every start, so a redelivery knows what ran
                        self._careful(tag, batch)
                    else:
                        self._fast(tag, batch)
                except pika.exceptions.AMQPError as e:
                    # no ack: the batch comes back once the I/O thread reconnects
                    log.warning("publisher_lost", error=repr(e))
                    self._close_publisher()
                    self._hand_over(partial(_raise_lost, repr(e)))
        finally:
            self._close_publisher()

    # --- I/O thread side ------------------------------------------------------------------
    def _ack(self, tag: int) -> None:
        self.link.channel.basic_ack(tag)
        self.link.settled()

    def _reject(self, tag: int) -> None:
        self.link.channel.basic_reject(tag, requeue=False)  # to the dead-letter queue, intact
        self.link.settled()

    # --- call thread side -----------------------------------------------------------------
    def _channel(self) -> pika.adapters.blocking_connection.BlockingChannel:
        if self.channel is None or not self.channel.is_open:
            self._close_publisher()
            self.publisher = self.connect()
            self.channel = self.publisher.channel()
            if self.link.durable:
                self.channel.confirm_delivery()  # a response counts once RabbitMQ has it
        return self.channel

    def _close_publisher(self) -> None:
        if self.publisher is not None and self.publisher.is_open:
            with contextlib.suppress(Exception):
                self.publisher.close()
        self.publisher = self.channel = None

    def _send(self, queue: str, body: bytes, wanted: Callable[[], object]) -> bool:
        """Publish; durable publishes are `mandatory` and sent again while RabbitMQ returns
        them and `wanted()` says the queue should exist (see `unroutable_retries`). False
        when the queue is gone for good (the client id was purged, the session closed)."""
        channel = self._channel()
        retries = unroutable_retries(queue)
        with self.publish_watch.running():
            while True:
                try:
                    channel.basic_publish("", queue, body, self.props, mandatory=self.link.durable)
                    return True
                except pika.exceptions.UnroutableError:
                    if not wanted():
                        log.warning("publish_dropped", queue=queue, reason="queue deleted")
                        return False
                    delay = next(retries, None)
                    if delay is None:
                        raise  # no ack: the batch comes back after the reconnect
                    time.sleep(delay)

    def _send_responses(self, batch: RequestBatch, outcomes: list[Outcome]) -> bool:
        """Publish one response batch; False when its client id is gone for good."""
        body = encode_response_batch(
            batch.session_id, batch.client_id, self.instance_id, [o.body for o in outcomes]
        )
        client = self.marker.names.client_key(batch.session_id, batch.client_id)
        return self._send(batch.reply_to, body, partial(self.marker.client.exists, client))

    def _mark(self, batch: RequestBatch, outcomes: list[Outcome]) -> None:
        """Count the responses as done (once each, however often they ran)."""
        self.marker.mark(
            batch.session_id, batch.client_id, [(o.request_id, o.faulted) for o in outcomes]
        )

    def _publish(self, batch: RequestBatch, outcomes: list[Outcome]) -> None:
        if self._send_responses(batch, outcomes):
            self._mark(batch, outcomes)

    def _finish(
        self, tag: int, batch: RequestBatch, outcomes: list[Outcome], rest: tuple[Request, ...] = ()
    ) -> None:
        if rest:  # before the ack: a crash now re-runs requests, never loses them
            body = encode_request_batch(
                batch.session_id,
                batch.client_id,
                batch.reply_to,
                [encode_request(r, self.max_bytes) for r in rest],
            )
            session = self.marker.names.session_key(batch.session_id)
            self._send(self.link.request_queue, body, partial(self.marker.client.exists, session))
        if outcomes and not self.link.durable:
            # interactive: ack first, so a capacity-1 instance gets its next batch one Redis
            # round trip sooner; dying before the count leaves only the informational done
            # counter short (the batch is not redelivered, the client has its responses)
            if self._send_responses(batch, outcomes):
                self._hand_over(partial(self._ack, tag))
                self._mark(batch, outcomes)
                return
        elif outcomes:
            self._publish(batch, outcomes)
        self._hand_over(partial(self._ack, tag))

    def _hand_over(self, callback: Callable[[], None]) -> bool:
        try:
            self.link.connection.add_callback_threadsafe(callback)
        except Exception:  # the connection is gone: RabbitMQ redelivers this batch
            return False
        return True

    def _call(self, request_run: Callable[[], Outcome], request_id: int) -> Outcome:
        self.watch.begin(request_id)
        try:
            return request_run()
        finally:
            self.watch.end()

    def _fast(self, tag: int, batch: RequestBatch) -> None:
        pending: list[Outcome] = []
        size = 0
        began = last = time.monotonic()
        for index, request in enumerate(batch.requests):
            rest = batch.requests[index:]
            if self.link.draining.is_set() or (
                len(rest) > 1
                and time.monotonic() - began > RESPLIT_AFTER
                and self.link.queue_empty.is_set()
            ):
                self._finish(tag, batch, pending, rest)
                return
            outcome = self._call(partial(self.runner.run, request), request.id)
            if pending and size + len(outcome.body) > self.max_bytes - BATCH_HEADER_ALLOWANCE:
                self._publish(batch, pending)
                pending, size = [], 0
            pending.append(outcome)
            size += len(outcome.body)
            now = time.monotonic()
            if now - last >= RESPONSE_LINGER:
                self._publish(batch, pending)
                pending, size, last = [], 0, now
        self._finish(tag, batch, pending)

    def _careful(self, tag: int, batch: RequestBatch) -> None:
        sid, cid = batch.session_id, batch.client_id
        answered = self.marker.answered(sid, cid, [r.id for r in batch.requests])
        log.info(
            "batch_redelivered",
            instance=self.instance_id,
            requests=len(batch.requests),
            answered=len(answered),
        )
        limit = self.runner.resend_limit
        for request in batch.requests:
            if request.id in answered:
                continue
            counted = self.marker.count_attempt(sid, cid, request.id)
            # with a limit, the first run (fast path) is not counted; at-most-once counts it
            retry = counted - 1 if limit == 0 else counted
            if retry > limit:
                outcome = self.runner.retry_limit_fault(
                    request, retry - 1, "its instance crashed, timed out or lost its host"
                )
            else:
                outcome = self._call(partial(self.runner.run, request), request.id)
            self._publish(batch, [outcome])  # before the next request: it may be the culprit
        self._finish(tag, batch, [])


def _raise_lost(why: str) -> None:
    raise PublisherLost(why)
