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

import queue
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial

import pika
import structlog

from soafarm.errors import DecodeError
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


class CallLoop:
    """Runs on the call thread until the inbox yields None."""

    def __init__(
        self,
        runner: CallRunner,
        marker: DoneMarker,
        link: Link,
        *,
        instance_id: str,
        max_bytes: int,
        watch: CallWatch,
    ) -> None:
        """`runner.resend_limit` is the session's message_resend_limit."""
        self.runner = runner
        self.marker = marker
        self.link = link
        self.instance_id = instance_id
        self.max_bytes = max_bytes
        self.watch = watch
        self.publish_watch = PublishWatch()
        self.props = pika.BasicProperties(
            content_type=CONTENT_TYPE, delivery_mode=2 if link.durable else 1
        )

    def run(self) -> None:
        """Take deliveries from the inbox and run them."""
        while (item := self.link.inbox.get()) is not None:
            tag, body, redelivered = item
            try:
                batch = decode(body, self.max_bytes)
                if not isinstance(batch, RequestBatch):
                    raise DecodeError(f"expected a request batch, got {type(batch).__name__}")
            except DecodeError as e:
                log.error("request_batch_undecodable", error=str(e), dead_lettered=True)
                self._hand_over(partial(self._finish, tag, None, []))
                continue
            if redelivered or self.runner.resend_limit == 0:
                # at-most-once counts every start, so a redelivery knows what already ran
                self._careful(tag, batch)
            else:
                self._fast(tag, batch)

    # --- I/O thread side ------------------------------------------------------------------
    def _publish(self, batch: RequestBatch, outcomes: list[Outcome]) -> None:
        body = encode_response_batch(
            batch.session_id, batch.client_id, self.instance_id, [o.body for o in outcomes]
        )
        with self.publish_watch.running():
            self.link.channel.basic_publish("", batch.reply_to, body, self.props)
        self.marker.mark(
            batch.session_id, batch.client_id, [(o.request_id, o.faulted) for o in outcomes]
        )

    def _finish(
        self,
        tag: int,
        batch: RequestBatch | None,
        outcomes: list[Outcome],
        rest: tuple[Request, ...] = (),
    ) -> None:
        if batch is None:
            self.link.channel.basic_reject(tag, requeue=False)  # to the dead-letter queue
        else:
            if rest:  # before the ack: a crash now re-runs requests, never loses them
                body = encode_request_batch(
                    batch.session_id,
                    batch.client_id,
                    batch.reply_to,
                    [encode_request(r, self.max_bytes) for r in rest],
                )
                with self.publish_watch.running():
                    self.link.channel.basic_publish("", self.link.request_queue, body, self.props)
            if outcomes:
                self._publish(batch, outcomes)
            self.link.channel.basic_ack(tag)
        self.link.settled()

    # --- call thread side -----------------------------------------------------------------
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
                self._hand_over(partial(self._finish, tag, batch, pending, rest))
                return
            outcome = self._call(partial(self.runner.run, request), request.id)
            if pending and size + len(outcome.body) > self.max_bytes - BATCH_HEADER_ALLOWANCE:
                out, pending, size = pending, [], 0
                if not self._hand_over(partial(self._publish, batch, out)):
                    return
            pending.append(outcome)
            size += len(outcome.body)
            now = time.monotonic()
            if now - last >= RESPONSE_LINGER:
                out, pending, size, last = pending, [], 0, now
                if not self._hand_over(partial(self._publish, batch, out)):
                    return
        self._hand_over(partial(self._finish, tag, batch, pending))

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
            published = threading.Event()

            def publish(o: Outcome = outcome, done: threading.Event = published) -> None:
                self._publish(batch, [o])
                done.set()

            if not self._hand_over(publish):
                return
            while not published.wait(0.1):  # before the next request: it may be the culprit
                if not self.link.connection.is_open:
                    return
        self._hand_over(partial(self._finish, tag, batch, []))
