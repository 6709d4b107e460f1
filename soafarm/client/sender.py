"""The send side of a client id: the buffer, batches, linger, throttling and `accepted`.

Requests are buffered and sent together as one AMQP message (a batch) when the buffer holds
`client.request_batch_size` requests, would pass `max_message_bytes`, on `flush()`, or a
little later without one (linger, below). In a durable session a request id is its position
in the client id's batch, `flush()` returns only once RabbitMQ has confirmed the requests,
and the confirmed count is recorded as `accepted` in Redis, where a client that reattaches
continues: a request sent again after a crash keeps its id and is answered once.

Linger: a buffered request leaves once the caller has added nothing for LINGER_QUIET, or after
`client.linger` at most; a request sent LINGER_QUIET after the previous one leaves at once.
A caller sending in a loop fills batches of 100 (its requests come microseconds apart); one
that sends a few requests and waits (HPC Pack's LongRunning pattern) gets them out at once.
The caller's thread and the client's linger thread (`client.linger.Linger`) share the buffer
and the channel under one lock.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import amqp.exceptions
import structlog
from kombu import Connection, Producer

from soafarm.client.heartbeat import IdleGuard
from soafarm.client.throttle import Throttle
from soafarm.config import Settings
from soafarm.errors import SessionError
from soafarm.protocol import (
    BATCH_HEADER_ALLOWANCE,
    CONTENT_TYPE,
    Request,
    encode_request,
    encode_request_batch,
)
from soafarm.state.clients import ClientProgress, ProgressStore
from soafarm.transport.connections import (
    UNROUTABLE_RETRY_SECONDS,
    abandon,
    close_quietly,
    close_quietly_channel,
    kombu_connection,
    outage,
    publish_routed,
    reporting_lost_connection,
)
from soafarm.transport.errors import LOST, REDIS_LOST, is_unroutable_return
from soafarm.transport.identity import own_user

log = structlog.get_logger(__name__)

#: Seconds between writes of the confirmed-request count to Redis (and at seal and close):
#: the count others read (throttling, allocator, autoscaler) lags a flush by at most this.
ACCEPTED_RECORD_INTERVAL = 0.05
#: A buffer the caller has stopped adding to for this long is sent, and a request sent this
#: long after the previous one leaves at once. `client.linger` bounds the wait of a buffer
#: that keeps growing slowly, and is the only wait of a caller whose last batch left full (a
#: bulk sender, not woken for every batch).
LINGER_QUIET = 0.0003
#: Seconds between attempts to record the accepted count while Redis does not answer.
RECORD_RETRY = 1.0


class RequestSender:
    """Buffers and publishes one client id's requests to its session's request queue."""

    def __init__(
        self,
        settings: Settings,
        *,
        session_id: int,
        client_id: str,
        queues: tuple[str, str],
        durable: bool,
        progress: ProgressStore,
        throttle: Throttle,
        start: ClientProgress,
        wake: Callable[[float], None],
        session_lost: Callable[[str], BaseException] | None = None,
        connection: Connection | None = None,
        idle: IdleGuard | None = None,
        route: tuple[str, str] | None = None,
    ) -> None:
        """`queues` is (request queue, response queue); `route` (exchange, routing key) where
        batches are published (the attach reply's; by default straight to the request
        queue); `start` the client id's counters
        when it attached (a durable one continues at `accepted`); `wake(at)` has the client's
        linger thread call `on_linger()` at monotonic time `at`; `session_lost(what)` is the
        error for an interactive session whose request queue RabbitMQ no longer has;
        `connection`: one opened for it already (`kombu_connection(settings, confirm=
        durable)`), which it then owns; `idle`: the client's `client_idle_timeout` guard
        (nothing is sent once the broker disconnected the client id)."""
        self.settings = settings
        self.session_id = session_id
        self.client_id = client_id
        self.request_queue, self.response_queue = queues
        self.exchange, self.routing_key = route or ("", self.request_queue)
        self.user = own_user(settings)
        self.durable = durable
        self.progress = progress
        self.throttle = throttle
        self.wake = wake
        self.idle = idle
        self.session_lost = session_lost or (
            lambda what: SessionError(f"session {session_id} has no {what} in RabbitMQ")
        )
        self.connection: Connection | None = None
        #: The session's loss, once found: later sends raise it at once, close drops the buffer.
        self.lost: BaseException | None = None
        self._connect(opened=connection)
        self.amqp_outage = outage(settings)
        self.redis_outage = outage(settings)
        self.lock = threading.RLock()
        self.buffer: list[bytes] = []
        self.buffer_bytes = 0
        self.next_id = start.accepted if durable else 0
        self.sent_here = 0
        self.sealed = start.sealed
        self.recorded = -1  # the accepted count last recorded
        self.recorded_at = 0.0
        self.buffered_at = self.returned_at = 0.0
        self.filling = False  # the last batch left full: the caller sends in bulk
        self.failed: BaseException | None = None  # a linger thread send's error, for the caller

    def send(self, op: str, args: tuple[Any, ...], kwargs: dict[str, Any], user_data: Any) -> int:
        """Buffer one request (sending what is due); returns its id."""
        self.raise_failed()
        if self.idle is not None:
            self.idle.check()
        if self.sealed:
            raise SessionError(
                f"client id {self.client_id!r} is sealed (end_requests() was called)"
            )
        limit = self.settings.max_message_bytes
        with self.lock:
            body = encode_request(Request(self.next_id, op, args, kwargs, user_data), limit)
            if self.buffer and self.buffer_bytes + len(body) > limit - BATCH_HEADER_ALLOWANCE:
                self._flush()
            request_id = self.next_id
            self.next_id += 1
            self.buffer.append(body)
            self.buffer_bytes += len(body)
            linger = self.settings.client.linger
            now = time.monotonic()
            # the caller's own pause since its last send returned (not the time spent here
            # flushing, or a durable sender would send one request at a time)
            quiet = now - self.returned_at > LINGER_QUIET
            full = len(self.buffer) >= self.settings.client.request_batch_size
            if full or linger <= 0 or (quiet and len(self.buffer) == 1):
                # a request after a pause goes at once: a caller that sends one request and
                # waits for it pays no linger (nor a wake-up of the linger thread)
                self._flush()
                self.filling = full
            elif len(self.buffer) == 1:
                self.buffered_at = now
                self.wake(now + (linger if self.filling else min(LINGER_QUIET, linger)))
            self.returned_at = time.monotonic()
        return request_id

    def flush(self) -> None:
        """Send the buffered requests now, as one message (durable: once confirmed)."""
        self.raise_failed()
        with self.lock:
            self._flush()

    def seal(self) -> None:
        """Send what is buffered and record that the batch has exactly `next_id` requests
        (retried through a Redis outage: a reader waits for the seal)."""
        with self.lock:
            self.flush()
            if self.idle is not None:
                self.idle.before_publish()  # a seal after a quiet spell: still connected?
            while True:
                try:
                    self.progress.seal(self.next_id)
                    break
                except REDIS_LOST as e:
                    self.redis_outage.retry(e)
            self.redis_outage.recovered()
            self.sealed = True
            if self.idle is not None:
                self.idle.sent()

    def on_linger(self) -> None:
        """On the linger thread: send a buffer the caller stopped adding to, or that waited
        `client.linger`; record the accepted count a flush left unrecorded. An error is kept
        for the caller's next call."""
        with self.lock:
            try:
                if self.buffer:
                    due = min(
                        self.buffered_at + self.settings.client.linger,
                        self.returned_at + LINGER_QUIET,
                    )
                    if time.monotonic() < due:
                        self.wake(due)  # the caller is still adding requests
                        return
                    self._flush()
                    self.filling = False
                elif not self.sealed:
                    self._record_accepted()
            except Exception as e:  # raised to the caller at its next call
                self.failed = e

    def flush_unless_sending(self) -> None:
        """`flush()`, unless another thread is sending right now: it may be blocked until
        responses are read (the unread bound), and a reader must not wait for it."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            self.flush()
        finally:
            self.lock.release()

    def record_pending(self) -> None:
        """Record the accepted count the last flushes left unrecorded (a reader waits);
        skipped while another thread sends (it records the count itself)."""
        if not self.lock.acquire(blocking=False):
            return
        try:
            if not self.sealed:
                self._record_accepted()
        finally:
            self.lock.release()

    def raise_failed(self) -> None:
        """Raise the error of a send the linger thread made for the caller, once."""
        failed, self.failed = self.failed, None
        if failed is not None:
            raise failed

    def close(self, discard: bool = False) -> None:
        """Send what is buffered (or drop it), record `accepted`, close the connection."""
        try:
            with self.lock:
                disconnected = self.idle is not None and self.idle.idle_for is not None
                if discard or self.lost is not None or disconnected:
                    # their ids were never published: not accepted, so a resumed client
                    # sends under them again (else the batch would wait for them forever)
                    self.next_id -= len(self.buffer)
                    self.buffer, self.buffer_bytes = [], 0
                self._flush()
                if self.sent_here and not self.sealed:
                    try:
                        self.progress.record_accepted(self.next_id)
                    except REDIS_LOST as e:  # a resumed client re-sends a few (same ids)
                        log.warning("accepted_not_recorded", error=repr(e))
        finally:
            if self.connection is not None:
                close_quietly(self.connection)

    def _flush(self) -> None:
        if not self.buffer:
            return
        self.throttle.wait(self.next_id - len(self.buffer))  # what is already published
        if self.idle is not None:
            # after the throttle's wait, right before the publish: the last moment the
            # broker may have disconnected this client id for client_idle_timeout
            self.idle.before_publish()
        body = encode_request_batch(
            self.session_id, self.client_id, self.response_queue, self.buffer
        )
        # persistent and confirmed for a durable session; a publish retried after a lost
        # connection may duplicate the batch: same ids, answered once
        self._publish(body, {"delivery_mode": 2 if self.durable else 1})
        self.sent_here += len(self.buffer)
        self.buffer = []
        self.buffer_bytes = 0
        self._record_accepted()

    def _publish(self, body: bytes, options: dict[str, Any]) -> None:
        """Publish one batch; a durable one is `mandatory` and sent again while RabbitMQ
        returns it (see `publish_routed`). A lost connection is reopened with back-off and
        the batch sent again, for up to `client.reconnect_timeout` (then ConnectionLost);
        an interactive session whose request queue did not survive is lost."""

        def publish() -> None:
            assert self.connection is not None
            with reporting_lost_connection(self.connection, self.settings.amqp_url):
                self.producer.publish(
                    body,
                    routing_key=self.routing_key,
                    exchange=self.exchange,
                    content_type=CONTENT_TYPE,
                    content_encoding="binary",
                    mandatory=self.durable,
                    user_id=self.user,
                    **options,
                )

        if self.lost is not None:
            raise self.lost
        try:
            self._publish_until_sent(publish)
        except (KeyboardInterrupt, SystemExit):
            # cut mid-frame, perhaps waiting for the confirm: this connection cannot be
            # read again (a close handshake on it would wait for ever), and whether the
            # batch arrived is unknown (the next flush sends it again: same ids, answered
            # once); a later publish opens a new connection
            if self.connection is not None:
                abandon(self.connection)
                self.connection = None
            raise

    def _publish_until_sent(self, publish: Callable[[], None]) -> None:
        while True:
            try:
                if self.connection is None:
                    self._connect(check_queue=not self.durable)
                publish_routed(publish, self.request_queue, after_return=self._fresh_channel)
            except amqp.exceptions.ChannelError as e:
                if not is_unroutable_return(e):
                    raise
                raise SessionError(
                    f"RabbitMQ has no queue {self.request_queue} to take requests after "
                    f"{UNROUTABLE_RETRY_SECONDS:g}s; was session {self.session_id} closed?"
                ) from None
            except LOST as e:
                if self.connection is not None:
                    close_quietly(self.connection)
                    self.connection = None
                self.amqp_outage.retry(e)
                continue
            self.amqp_outage.recovered()
            return

    def _connect(self, check_queue: bool = False, opened: Connection | None = None) -> None:
        """Open the publishing connection (or take `opened`); with `check_queue` (an
        interactive session reconnecting), raise `session_lost` if the request queue is
        gone: RabbitMQ drops an interactive session's queues when it restarts, and a publish
        to a missing queue without `mandatory` would vanish silently."""
        connection = (
            opened if opened is not None else kombu_connection(self.settings, confirm=self.durable)
        )
        try:
            if check_queue:
                probe = connection.channel()
                try:
                    probe.queue_declare(queue=self.request_queue, passive=True)
                except amqp.exceptions.NotFound:
                    self.lost = self.session_lost("request queue")
                    raise self.lost from None
                close_quietly_channel(probe)
            self.channel = connection.channel()
            self.producer = Producer(self.channel)
        except BaseException:
            close_quietly(connection)
            raise
        self.connection = connection

    def _fresh_channel(self) -> None:
        """Replace the channel after a returned publish: its confirm is still on its way, and
        would be taken for the next publish's."""
        assert self.connection is not None
        close_quietly_channel(self.channel)
        self.channel = self.connection.channel()
        self.producer = Producer(self.channel)

    def _record_accepted(self) -> None:
        """Record the accepted count in Redis, at most every ACCEPTED_RECORD_INTERVAL (the
        linger thread records one left waiting)."""
        if self.recorded == self.next_id:
            return
        now = time.monotonic()
        if now - self.recorded_at >= ACCEPTED_RECORD_INTERVAL:
            # a Redis write per flush would cost more than the flush; a lagging count only
            # means a resumed client re-sends a few requests (which keep their ids) and the
            # autoscaler sees the work a little late
            try:
                self.progress.record_accepted(self.next_id)
            except REDIS_LOST as e:
                # Redis is restarting: sending goes on (RabbitMQ has the requests), and the
                # linger thread records the count once Redis answers again
                log.warning("accepted_not_recorded", error=repr(e), retry_in=RECORD_RETRY)
                self.recorded_at = now - ACCEPTED_RECORD_INTERVAL + RECORD_RETRY
                self.wake(now + RECORD_RETRY)
                return
            self.recorded, self.recorded_at = self.next_id, now
            if self.idle is not None:
                self.idle.sent()
        else:
            self.wake(self.recorded_at + ACCEPTED_RECORD_INTERVAL)
