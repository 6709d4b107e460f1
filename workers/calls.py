"""The call threads of a service instance: consume request batches, run them, publish the
responses and acknowledge, each thread on a connection of its own (see CallLoop).

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
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from typing import Any

import pika
import redis
import structlog

from soafarm.errors import ConnectionFailed, DecodeError
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
from soafarm.state.clients import DoneMarker
from soafarm.transport.connections import amqp_error_types, unroutable_retries

log = structlog.get_logger(__name__)

#: Responses of a long batch are published at least this often (seconds), so progress flows.
RESPONSE_LINGER = 0.05
#: A batch still running after this many seconds, when the queue behind it is empty (other
#: instances may be idle), hands its unstarted requests back to the queue, so slow work
#: spreads over every instance instead of waiting while one instance holds it. A draining
#: instance (being stopped) hands them back at once.
RESPLIT_AFTER = 0.05
#: Done counts of an interactive session's acknowledged responses reach Redis at most this
#: much later (seconds), many batches in one call: one Redis round trip per response cost
#: more CPU than the call itself on a loaded 2-core machine (issue 6's latency figure).
MARK_LINGER = 0.05
#: Seconds an idle call loop waits for a delivery before looking at the instance's state.
IDLE_POLL = 0.1
#: A call running this many seconds has the main thread tend its loop's connection.
KEEPALIVE_AFTER = 0.5
#: Seconds before the first reconnect after the connection drops, and the most between two.
RECONNECT_FIRST = 0.5
RECONNECT_MAX = 5.0
NOT_FOUND = 404
#: Failures after which a call loop reconnects (the batch it held comes back redelivered).
LOST: tuple[type[BaseException], ...] = (ConnectionFailed, redis.RedisError, *amqp_error_types())

Delivery = tuple[int, bytes, bool]  # delivery tag, body, redelivered


class CallWatch:
    """What a call thread runs now, so the main thread can enforce service_operation_timeout
    and keep the connection alive during a long call."""

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
    """How long a call thread has been inside a publish (waiting for RabbitMQ's confirm).

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
    """What every call loop of an instance shares with its supervising main thread."""

    durable: bool
    request_queue: str
    queue_empty: threading.Event  # set by the main thread when no batch waits in the queue
    draining: threading.Event  # set when the instance stops: hand back what has not started
    stop: Callable[[], None]  # stops the whole instance (its queue is gone)


class CallLoop:
    """One call thread and its own connection: it consumes one batch at a time (prefetch 1),
    runs it, publishes the responses and acknowledges it, all on this thread.

    No thread hand-off on the request path (issue 6: the hop cost ~0.25 ms per sequential
    request). pika is not thread-safe, so the connection belongs to whoever holds `io`: this
    thread, except while a service call runs, when the instance's main thread keeps its
    heartbeats flowing (`keep_alive`), so RabbitMQ still notices a dead machine holding
    unacknowledged work, and a long call does not lose its connection.

    A batch is acknowledged only after its responses are published (and confirmed and
    counted, in a durable session), so a killed instance loses nothing. When the connection
    drops, the loop reconnects with the service kept loaded; RabbitMQ redelivers the batch
    it held.
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
        loop's connection."""
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
        # the connection belongs to whoever holds `io` (see the class docstring)
        self.io = threading.Lock()
        self.connection: pika.BlockingConnection | None = None
        self.channel: pika.adapters.blocking_connection.BlockingChannel | None = None
        self.deliveries: deque[Delivery] = deque()
        # interactive responses acknowledged but not yet counted, by (session, client id)
        self.unmarked: dict[tuple[int, str], list[tuple[int, bool]]] = {}
        self.unmarked_since = 0.0

    def run(self) -> None:
        """Serve until the instance drains, reconnecting when the connection drops."""
        backoff = RECONNECT_FIRST
        with self.io:
            try:
                while not self.link.draining.is_set():
                    try:
                        self._serve()
                    except LOST as e:
                        if isinstance(e, pika.exceptions.ChannelClosedByBroker) and (
                            e.reply_code == NOT_FOUND
                        ):
                            log.info("session_queue_gone", instance=self.instance_id)
                            self.link.stop()
                            break
                        # no ack for the batch held: RabbitMQ redelivers it once this
                        # connection is closed
                        log.warning("connection_lost", error=repr(e), retry_in=backoff)
                        self._close()
                        self.deliveries.clear()
                        self.link.draining.wait(backoff)
                        backoff = min(backoff * 2, RECONNECT_MAX)
                    else:
                        backoff = RECONNECT_FIRST
            finally:
                try:
                    with contextlib.suppress(redis.RedisError):
                        self._flush_marks()
                finally:
                    self._close()

    def _serve(self) -> None:
        """One connection's life: consume until the instance drains, then hand back or
        finish what this loop holds."""
        self.connection = self.connect()
        self.channel = channel = self.connection.channel()
        if self.link.durable:
            channel.confirm_delivery()  # a response counts only once RabbitMQ has it
        channel.basic_qos(prefetch_count=1)  # one batch held: a slow loop never hoards work
        tag = channel.basic_consume(self.link.request_queue, self._on_delivery)
        channel.add_on_cancel_callback(lambda _frame: self.link.stop())
        while not self.link.draining.is_set():
            if self.unmarked and time.monotonic() - self.unmarked_since >= MARK_LINGER:
                self._flush_marks()
            if self.deliveries:
                self._run(*self.deliveries.popleft())
                continue
            wait = IDLE_POLL
            if self.unmarked:
                wait = max(self.unmarked_since + MARK_LINGER - time.monotonic(), 0.0)
            self.connection.process_data_events(time_limit=wait)
        if channel.is_open:
            channel.basic_cancel(tag)  # pika requeues what came before the cancel-ok
        while self.deliveries:  # handed back: draining is set
            self._run(*self.deliveries.popleft())

    def _on_delivery(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        self.deliveries.append((method.delivery_tag, body, bool(method.redelivered)))

    def _close(self) -> None:
        connection, self.connection, self.channel = self.connection, None, None
        if connection is not None and connection.is_open:
            with contextlib.suppress(Exception):
                connection.close()

    def keep_alive(self) -> None:
        """Called by the instance's main thread: while a call has run KEEPALIVE_AFTER
        seconds, process the connection's I/O (heartbeats) in the call thread's place."""
        started = self.watch.started
        if started is None or time.monotonic() - started < KEEPALIVE_AFTER:
            return
        if not self.io.acquire(blocking=False):
            return  # the call just ended: the call thread has the connection again
        try:
            connection = self.connection
            if connection is not None and connection.is_open:
                connection.process_data_events(time_limit=0)
        except Exception as e:  # the call thread meets the failure at its next publish
            log.debug("keep_alive_failed", error=repr(e))
        finally:
            self.io.release()

    def _run(self, tag: int, body: bytes, redelivered: bool) -> None:
        """Run one delivered batch and acknowledge it (or dead-letter it, if undecodable)."""
        try:
            batch = decode(body, self.max_bytes)
            if not isinstance(batch, RequestBatch):
                raise DecodeError(f"expected a request batch, got {type(batch).__name__}")
        except DecodeError as e:
            log.error("request_batch_undecodable", error=str(e), dead_lettered=True)
            self._reject(tag)
            return
        if redelivered or self.runner.resend_limit == 0:
            # at-most-once counts every start, so a redelivery knows what ran
            self._careful(tag, batch)
        else:
            self._fast(tag, batch)

    def _ack(self, tag: int) -> None:
        assert self.channel is not None
        self.channel.basic_ack(tag)

    def _reject(self, tag: int) -> None:
        assert self.channel is not None
        self.channel.basic_reject(tag, requeue=False)  # to the dead-letter queue, intact

    def _send(self, queue: str, body: bytes, wanted: Callable[[], object]) -> bool:
        """Publish; durable publishes are `mandatory` and sent again while RabbitMQ returns
        them and `wanted()` says the queue should exist (see `unroutable_retries`). False
        when the queue is gone for good (the client id was purged, the session closed)."""
        channel = self.channel
        assert channel is not None
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
                    assert self.connection is not None
                    self.connection.sleep(delay)  # serving heartbeats meanwhile

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

    def _mark_later(self, batch: RequestBatch, outcomes: list[Outcome]) -> None:
        """Count acknowledged interactive responses with the next ones (see MARK_LINGER)."""
        if not self.unmarked:
            self.unmarked_since = time.monotonic()
        pending = self.unmarked.setdefault((batch.session_id, batch.client_id), [])
        pending += [(o.request_id, o.faulted) for o in outcomes]

    def _flush_marks(self) -> None:
        """Count every response `_mark_later` holds."""
        unmarked, self.unmarked = self.unmarked, {}
        for (session_id, client_id), outcomes in unmarked.items():
            self.marker.mark(session_id, client_id, outcomes)

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
            # interactive: ack first and count later, so a capacity-1 instance gets its next
            # batch without waiting on Redis; dying before the count leaves only the
            # informational done counter short (the batch is not redelivered, the client has
            # its responses)
            if self._send_responses(batch, outcomes):
                self._ack(tag)
                self._mark_later(batch, outcomes)
                return
        elif outcomes:
            self._publish(batch, outcomes)
        self._ack(tag)

    def _call(self, request_run: Callable[[], Outcome], request_id: int) -> Outcome:
        """Run one call with the connection left to `keep_alive`."""
        self.watch.begin(request_id)
        self.io.release()
        try:
            return request_run()
        finally:
            self.watch.end()
            self.io.acquire()

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
